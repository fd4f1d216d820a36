#!/usr/bin/env python3
"""What the recycling limits cost per request: halfsync with `max_rss` and
with `max_requests` set (to values never reached, so no worker is actually
replaced) against neither, 50 connections at depth 1 and 16, alternating
rounds in one run. A limit checked with a system call per request would
show here as lost throughput.

Usage:
    cargo build --release --workspace
    python3 bench/scripts/recycling_cost.py [--rounds 5] [--seconds 4] [--pin]

Writes bench/results/recycling_cost.json (recycling_cost_pinned.json with
--pin).
"""

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_benchmarks import Server, bench, errors  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

CASES = {
    "no limit": "",
    "max_rss = 64 GiB": 'max_rss = "64GiB"',
    "max_requests = 10^12": "max_requests = 1000000000000",
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--pin", action="store_true", help="server on CPU 0, load generator on CPU 1")
    a = ap.parse_args()
    out = {"pinned": a.pin, "rounds": a.rounds, "seconds": a.seconds, "depths": {}}
    for depth in (1, 16):
        args = ["-c", 50, "-d", depth, "--warmup", "1s", "--duration", f"{a.seconds}s"]
        runs = {name: [] for name in CASES}
        for _ in range(a.rounds):
            for name, extra in CASES.items():
                s = Server(extra_group=extra, pin=a.pin)
                try:
                    r = bench(s.port, args, a.pin)
                finally:
                    s.stop()
                if errors(r):
                    raise RuntimeError(f"{name}: errors {r['errors']}")
                runs[name].append(r["rps"])
                print(f"depth {depth}, {name}: {r['rps']:,.0f} req/s", flush=True)
        med = {name: statistics.median(v) for name, v in runs.items()}
        ratios = {name: [x / y for x, y in zip(v, runs["no limit"])] for name, v in runs.items()}
        out["depths"][str(depth)] = {"runs": runs, "median": med, "ratio_per_round": ratios}
    print("\n| limit | depth | req/s (median) | median of the rounds' ratios to no limit |")
    print("|---|---|---|---|")
    for depth, d in out["depths"].items():
        for name in CASES:
            r = statistics.median(d["ratio_per_round"][name])
            print(f"| {name} | {depth} | {d['median'][name]:,.0f} | {r:.2f} |")
    name = "recycling_cost_pinned.json" if a.pin else "recycling_cost.json"
    path = os.path.normpath(os.path.join(HERE, "..", "results", name))
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
