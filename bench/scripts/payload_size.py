#!/usr/bin/env python3
"""Throughput against payload size: the inline baseline, halfsync, and
halfsync as it was before its rings kept to their first pages
(`HALFSYNC_TUNING=no_ring_rewind,reserve_max_reply`: rings walk their whole
capacity, and each worker reserves room for a `max_frame` reply before
every request), 50 connections, alternating rounds in one run.

Usage:
    cargo build --release --workspace
    python3 bench/scripts/payload_size.py [--rounds 3] [--seconds 4] [--pin] [--depths 1,16]

Writes bench/results/payload_size.json (payload_size_pinned.json with --pin).
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_benchmarks import alternate, save_results  # noqa: E402
SIZES = [64, 1024, 4096, 16384]
# name: (inline, environment)
CASES = {
    "inline": (True, {}),
    "halfsync": (False, {}),
    "halfsync, whole-ring rings": (False, {"HALFSYNC_TUNING": "no_ring_rewind,reserve_max_reply"}),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--pin", action="store_true", help="server on CPU 0, load generator on CPU 1")
    ap.add_argument("--depths", default="16", help="comma-separated depths (default 16)")
    a = ap.parse_args()
    out = {"pinned": a.pin, "rounds": a.rounds, "seconds": a.seconds, "rows": []}
    for depth in [int(d) for d in a.depths.split(",")]:
        for size in SIZES:
            args = ["-c", 50, "-d", depth, "-p", size, "--warmup", "1s", "--duration", f"{a.seconds}s"]
            cases = {name: {"inline": inline, "env": env} for name, (inline, env) in CASES.items()}
            runs = alternate(cases, args, a.rounds, a.pin, f"depth {depth}, {size} B, ")
            med = {name: statistics.median(v) for name, v in runs.items()}
            out["rows"].append({"depth": depth, "payload": size, "runs": runs, "median": med})
    print("\n| depth | payload | inline | halfsync | ratio | before (whole-ring rings) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in out["rows"]:
        m = r["median"]
        i, h, b = m["inline"], m["halfsync"], m["halfsync, whole-ring rings"]
        print(f"| {r['depth']} | {r['payload']:,} B | {i:,.0f} | {h:,.0f} | **{h / i:.2f}** | {b:,.0f} | {b / i:.2f} |")
    save_results(out, "payload_size", a.pin)


if __name__ == "__main__":
    main()
