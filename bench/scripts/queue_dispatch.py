#!/usr/bin/env python3
"""Deep pipelining (50 connections x 16 in flight) at the default
`max_inflight` (1024, held to `max_inflight_time` = 1 ms of work, which
for echo is never less), and at 256, against the old default of 64, where 800
requests meet 2 x 64 ring places and most wait in the proxy's queue;
with that queue handed to workers every few events of a loop turn, and
only at the end of a turn (`HALFSYNC_TUNING=no_midturn_dispatch`). The
inline baseline runs in the same rounds; every figure is a ratio to it.

Usage:
    cargo build --release --workspace
    python3 bench/scripts/queue_dispatch.py [--rounds 3] [--seconds 5] [--pin]

Writes bench/results/queue_dispatch.json (queue_dispatch_pinned.json
with --pin).
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_benchmarks import alternate, save_results  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--pin", action="store_true", help="servers on CPU 0, load generator on CPU 1")
    a = ap.parse_args()
    cases = {
        "inline": {"inline": True, "max_inflight": 1024},
        "default (max_inflight 1024, max_inflight_time 1ms)": {"max_inflight": 1024},
        "max_inflight 256": {"max_inflight": 256},
        "max_inflight 64 (the old default)": {"max_inflight": 64},
        "max_inflight 64, no_midturn_dispatch": {
            "max_inflight": 64, "env": {"HALFSYNC_TUNING": "no_midturn_dispatch"}},
    }
    args = ["-c", 50, "-d", 16, "--warmup", "1s", "--duration", f"{a.seconds}s"]
    runs = alternate(cases, args, a.rounds, a.pin)
    med = {name: statistics.median(v) for name, v in runs.items()}
    ref = med["inline"]
    for name, m in med.items():
        print(f"{name}: {m:,.0f} req/s ({m / ref:.2f} of inline)")
    save_results({"pinned": a.pin, "runs": runs, "median": med,
                  "ratio_to_inline": {k: v / ref for k, v in med.items()}}, "queue_dispatch", a.pin)


if __name__ == "__main__":
    main()
