#!/usr/bin/env python3
"""Two builds of halfsync against each other: the same echo benchmark on
each, alternating A B / B A round by round so machine noise hits both
alike; prints each round's throughput and the ratio A/B, and their median.

Usage (B is usually a checkout of the commit before a change):
    git worktree add /tmp/before <commit> && (cd /tmp/before && cargo build --release --workspace)
    cargo build --release --workspace
    python3 bench/scripts/ab_builds.py /tmp/before/target/release [--rounds 8] [--depth 16] [--pin]

A is this checkout's target/release. Both servers run their own build's
binary and echo plugin; the load generator is this checkout's. Writes
nothing; the figures go to stdout.
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_benchmarks as rb  # noqa: E402


def one(release, depth, seconds, pin):
    # Server() reads the module's paths: point them at this build.
    rb.HALFSYNC = os.path.join(release, "halfsync")
    rb.ECHO = os.path.join(release, "libecho.so")
    s = rb.Server(workers=2, pin=pin)
    try:
        r = rb.bench(s.port, ["-c", 50, "-d", depth, "--warmup", "1s", "--duration", f"{seconds}s"], pin=pin)
    finally:
        s.stop()
    if rb.errors(r):
        raise RuntimeError(f"errors with {release}: {r}")
    return r["rps"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("baseline", help="the other build's target/release directory (B)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--pin", action="store_true", help="server on CPU 0, load generator on CPU 1")
    a = ap.parse_args()
    mine = os.path.dirname(rb.HALFSYNC)
    for d in (mine, a.baseline):
        if not os.path.exists(os.path.join(d, "halfsync")):
            sys.exit(f"no halfsync in {d}: build it with cargo build --release --workspace")
    ratios = []
    for i in range(a.rounds):
        order = [("A", mine), ("B", a.baseline)]
        if i % 2:
            order.reverse()
        rps = {name: one(d, a.depth, a.seconds, a.pin) for name, d in order}
        ratios.append(rps["A"] / rps["B"])
        print(f"round {i + 1}: A {rps['A']:.0f} req/s, B {rps['B']:.0f} req/s, A/B {ratios[-1]:.3f}", flush=True)
    print(f"A/B over {a.rounds} rounds: median {statistics.median(ratios):.3f}, "
          f"range {min(ratios):.3f}-{max(ratios):.3f} (50 connections x {a.depth}, {'pinned' if a.pin else 'unpinned'})")


if __name__ == "__main__":
    main()
