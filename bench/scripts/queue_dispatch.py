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
    ap.add_argument("--pin", action="store_true", help="servers on CPU 0, load generator on CPU 1")
    a = ap.parse_args()
    cases = {
        "inline": ({}, 1024, True),
        "default (max_inflight 1024, max_inflight_time 1ms)": ({}, 1024, False),
        "max_inflight 256": ({}, 256, False),
        "max_inflight 64 (the old default)": ({}, 64, False),
        "max_inflight 64, no_midturn_dispatch": ({"HALFSYNC_TUNING": "no_midturn_dispatch"}, 64, False),
    }
    runs = {name: [] for name in cases}
    for _ in range(a.rounds):
        for name, (env, mi, inline) in cases.items():
            s = Server(env=env, max_inflight=mi, inline=inline, pin=a.pin)
            try:
                r = bench(s.port, ["-c", 50, "-d", 16, "--warmup", "1s", "--duration", f"{a.seconds}s"], a.pin)
            finally:
                s.stop()
            if errors(r):
                raise RuntimeError(f"{name}: {errors(r)} errors")
            runs[name].append(r["rps"])
            print(name, r["rps"], flush=True)
    med = {name: statistics.median(v) for name, v in runs.items()}
    ref = med["inline"]
    for name, m in med.items():
        print(f"{name}: {m:,.0f} req/s ({m / ref:.2f} of inline)")
    name = "queue_dispatch_pinned.json" if a.pin else "queue_dispatch.json"
    path = os.path.join(HERE, "..", "results", name)
    with open(path, "w") as f:
        json.dump({"pinned": a.pin, "runs": runs, "median": med,
                   "ratio_to_inline": {k: v / ref for k, v in med.items()}}, f, indent=1)
    print("wrote", os.path.normpath(path))


if __name__ == "__main__":
    main()
