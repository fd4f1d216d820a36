#!/usr/bin/env python3
"""What the operator's options cost per request: halfsync with one option
turned on, at a value that never triggers (no worker is recycled, no
request is slow or late), against the benchmark configuration, 50
connections at depth 1 and 16, alternating rounds in one run. An option
that costs a system call or a lock per request shows here as lost
throughput; one checked per loop turn or per worker sleep does not.

Usage:
    cargo build --release --workspace
    python3 bench/scripts/options_cost.py [--rounds 5] [--seconds 4] [--pin]

Writes bench/results/options_cost.json (options_cost_pinned.json with
--pin).
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_benchmarks import alternate, save_results  # noqa: E402

# name: (lines added to the group, environment)
CASES = {
    "benchmark config": ("", {}),
    'max_rss = "64GiB"': ('max_rss = "64GiB"', {}),
    "max_requests = 10^12": ("max_requests = 1000000000000", {}),
    'slow_request = "10s"': ('slow_request = "10s"', {}),
    'queue_timeout = "10s"': ('queue_timeout = "10s"', {}),
    "hang detection off (request_timeout, requeue_after 0s)": (
        'request_timeout = "0s"\nrequeue_after = "0s"', {}),
    "log level info (the default; the scripts use warn)": ("", {"HALFSYNC_LOG": "info"}),
}
BASE = "benchmark config"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--pin", action="store_true", help="server on CPU 0, load generator on CPU 1")
    a = ap.parse_args()
    out = {"pinned": a.pin, "rounds": a.rounds, "seconds": a.seconds, "depths": {}}
    for depth in (1, 16):
        args = ["-c", 50, "-d", depth, "--warmup", "1s", "--duration", f"{a.seconds}s"]
        cases = {name: {"extra_group": extra, "env": env} for name, (extra, env) in CASES.items()}
        runs = alternate(cases, args, a.rounds, a.pin, f"depth {depth}, ")
        med = {name: statistics.median(v) for name, v in runs.items()}
        ratios = {name: [x / y for x, y in zip(v, runs[BASE])] for name, v in runs.items()}
        out["depths"][str(depth)] = {"runs": runs, "median": med, "ratio_per_round": ratios}
    print(f"\n| option | depth | req/s (median) | median of the rounds' ratios to {BASE} |")
    print("|---|---|---|---|")
    for depth, d in out["depths"].items():
        for name in CASES:
            r = statistics.median(d["ratio_per_round"][name])
            print(f"| {name} | {depth} | {d['median'][name]:,.0f} | {r:.2f} |")
    save_results(out, "options_cost", a.pin)


if __name__ == "__main__":
    main()
