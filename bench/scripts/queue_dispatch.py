#!/usr/bin/env python3
"""Deep pipelining with the default `max_inflight` (64): 50 connections x 16
in flight is 800 requests for 2 x 64 ring places, so most wait in the
proxy's queue. Measures halfsync with queued requests handed to workers
every few events of a loop turn (the default) against only at the end of
the turn (`HALFSYNC_TUNING=no_midturn_dispatch`), and `max_inflight = 1024`
(no queue) as the reference, alternating rounds in one run.

Usage:
    cargo build --release --workspace
    python3 bench/scripts/queue_dispatch.py [--rounds 3] [--seconds 5]

Writes bench/results/queue_dispatch.json.
"""

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_benchmarks import Server, bench, errors  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    a = ap.parse_args()
    cases = {
        "max_inflight 64": ({}, 64),
        "max_inflight 64, no_midturn_dispatch": ({"HALFSYNC_TUNING": "no_midturn_dispatch"}, 64),
        "max_inflight 1024": ({}, 1024),
    }
    runs = {name: [] for name in cases}
    for _ in range(a.rounds):
        for name, (env, mi) in cases.items():
            s = Server(env=env, max_inflight=mi)
            try:
                r = bench(s.port, ["-c", 50, "-d", 16, "--warmup", "1s", "--duration", f"{a.seconds}s"])
            finally:
                s.stop()
            if errors(r):
                raise RuntimeError(f"{name}: errors {r['errors']}")
            runs[name].append(r["rps"])
            print(name, r["rps"], flush=True)
    med = {name: statistics.median(v) for name, v in runs.items()}
    ref = med["max_inflight 1024"]
    for name, m in med.items():
        print(f"{name}: {m:,.0f} req/s ({m / ref:.2f} of max_inflight 1024)")
    path = os.path.join(HERE, "..", "results", "queue_dispatch.json")
    with open(path, "w") as f:
        json.dump({"runs": runs, "median": med}, f, indent=1)
    print("wrote", os.path.normpath(path))


if __name__ == "__main__":
    main()
