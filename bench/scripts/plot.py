#!/usr/bin/env python3
"""Plots from a run_benchmarks.py result: throughput against connections and
latency against offered rate, halfsync beside the inline baseline.

Usage: python3 bench/scripts/plot.py [bench/results/latest.json]
Writes throughput_vs_connections.png and latency_vs_rate.png next to the
JSON file. Needs matplotlib (pip install matplotlib).
"""

import json
import os
import re
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def med(runs, f):
    return statistics.median(f(r) for r in runs)


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(__file__), "..", "results", "latest.json")
    with open(path) as f:
        data = json.load(f)
    outdir = os.path.dirname(os.path.abspath(path))
    note = f"{data['machine']}, {data['date']}, {'pinned' if data['pinned'] else 'unpinned'}"

    # Throughput against connections, depth 1.
    conns = []
    for r in data["results"]:
        m = re.fullmatch(r"echo 64 B, (\d+) conns, depth 1", r["name"])
        if m:
            conns.append((int(m.group(1)), med(r["inline"], lambda x: x["rps"]), med(r["halfsync"], lambda x: x["rps"])))
    conns.sort()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot([c[0] for c in conns], [c[1] / 1e3 for c in conns], "o--", label="inline baseline (no isolation)")
    ax.plot([c[0] for c in conns], [c[2] / 1e3 for c in conns], "o-", label="halfsync (proxy + 2 worker processes)")
    ax.set_xscale("log")
    ax.set_xlabel("connections (1 request in flight each)")
    ax.set_ylabel("thousand requests / s")
    ax.set_title("Echo, 64 B: throughput against connections")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.text(0.99, 0.01, note, ha="right", fontsize=7, color="gray")
    fig.tight_layout()
    fig.savefig(os.path.join(outdir, "throughput_vs_connections.png"), dpi=110)

    # Latency against offered rate (open loop).
    rates = []
    for r in data["results"]:
        if r["name"].startswith("open loop"):
            rate = float(r["args"][r["args"].index("--rate") + 1])
            if "pooled_us" in r:
                # All rounds pooled into one histogram per server.
                i, h = r["pooled_us"]["inline"], r["pooled_us"]["halfsync"]
                rates.append((rate, i["p50"], i["p99"], h["p50"], h["p99"]))
                continue
            rates.append((
                rate,
                med(r["inline"], lambda x: x["latency_us"]["p50"]),
                med(r["inline"], lambda x: x["latency_us"]["p99"]),
                med(r["halfsync"], lambda x: x["latency_us"]["p50"]),
                med(r["halfsync"], lambda x: x["latency_us"]["p99"]),
            ))
    rates.sort()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = [r[0] / 1e3 for r in rates]
    ax.plot(xs, [r[1] for r in rates], "o--", color="tab:blue", label="inline p50")
    ax.plot(xs, [r[2] for r in rates], "s--", color="tab:blue", alpha=0.6, label="inline p99")
    ax.plot(xs, [r[3] for r in rates], "o-", color="tab:orange", label="halfsync p50")
    ax.plot(xs, [r[4] for r in rates], "s-", color="tab:orange", alpha=0.6, label="halfsync p99")
    ax.set_yscale("log")
    ax.set_xlabel("offered rate, thousand requests / s (50 connections, open loop)")
    ax.set_ylabel("latency, µs (from intended send time)")
    ax.set_title("Echo, 64 B: latency against offered rate")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend()
    fig.text(0.99, 0.01, note, ha="right", fontsize=7, color="gray")
    fig.tight_layout()
    fig.savefig(os.path.join(outdir, "latency_vs_rate.png"), dpi=110)
    print(f"wrote {outdir}/throughput_vs_connections.png and latency_vs_rate.png")


if __name__ == "__main__":
    main()
