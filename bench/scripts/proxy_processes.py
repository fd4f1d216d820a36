#!/usr/bin/env python3
"""proxy_processes = 2 against 1, same workers, same run, with the inline
baseline (one proxy, `--inline`) in every round; alternating rounds so
machine noise hits all three alike. Reports each configuration's
throughput and p99, the ratio 2/1 and each one's ratio to inline, per
round and as medians.

Usage:
    cargo build --release --workspace
    python3 bench/scripts/proxy_processes.py [--rounds 3] [--seconds 5]

Writes bench/results/proxy_processes.json. On a 2-vCPU machine a second
proxy has no idle core to run on (the workers and the load generator use
them), so expect a ratio near or below 1 there; the setting is for hosts
where one proxy's core is the limit.
"""

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_benchmarks import Server, bench, errors  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def one(pp, depth, seconds, inline=False):
    s = Server(inline=inline, workers=2, extra_server=f"proxy_processes = {pp}")
    try:
        assert len(s.proxy) == pp, f"expected {pp} proxies, found {s.proxy}"
        r = bench(s.port, ["-c", 50, "-d", depth, "--warmup", "1s", "--duration", f"{seconds}s"])
    finally:
        s.stop()
    if errors(r):
        raise RuntimeError(f"errors with proxy_processes={pp}: {r}")
    return {"rps": r["rps"], "p99_us": r["latency_us"]["p99"], "command": r["command"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    a = ap.parse_args()
    out = {"cpus": os.cpu_count(), "workers": 2, "scenarios": {}}
    for depth in (1, 16):
        rounds = []
        for _ in range(a.rounds):
            inline = one(1, depth, a.seconds, inline=True)
            one_proxy = one(1, depth, a.seconds)
            two = one(2, depth, a.seconds)
            rounds.append({"inline": inline, "proxy_processes_1": one_proxy, "proxy_processes_2": two,
                           "ratio": two["rps"] / one_proxy["rps"],
                           "ratio_1_inline": one_proxy["rps"] / inline["rps"],
                           "ratio_2_inline": two["rps"] / inline["rps"]})
            print(f"d{depth}: inline {inline['rps']:,.0f} req/s, 1 proxy {one_proxy['rps']:,.0f}, "
                  f"2 proxies {two['rps']:,.0f}, ratio 2/1 {rounds[-1]['ratio']:.2f}", flush=True)
        med = {k: statistics.median(r[k] for r in rounds) for k in ("ratio", "ratio_1_inline", "ratio_2_inline")}
        out["scenarios"][f"d{depth}"] = {"rounds": rounds, "median_ratio": med["ratio"],
                                         "median_ratio_1_inline": med["ratio_1_inline"],
                                         "median_ratio_2_inline": med["ratio_2_inline"]}
        print(f"d{depth}: median ratios: 2 proxies / 1 {med['ratio']:.2f}, 1 proxy / inline "
              f"{med['ratio_1_inline']:.2f}, 2 proxies / inline {med['ratio_2_inline']:.2f}")
    path = os.path.join(HERE, "..", "results", "proxy_processes.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", os.path.normpath(path))


if __name__ == "__main__":
    main()
