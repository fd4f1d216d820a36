#!/usr/bin/env python3
"""Connection scale: one proxy holding as many connections as its open-file
limit allows, most idle and 1,000 active, against the inline baseline in
the same run. Reports the proxy's memory growth per connection and the
active connections' latency.

Usage:
    cargo build --release --workspace
    python3 bench/scripts/connection_scale.py [--connections 19000] [--active 1000]
    python3 bench/scripts/connection_scale.py --proxies 4 --connections 70000

The machine's hard open-file limit is 20,000 per process, so the load
generator spreads its connections over processes of at most 18,000 each
(two at least) and source addresses 127.0.0.2, .3, ... (three at least,
one per 25,000 connections plus one: the ephemeral port range gives each
source ~28,000 ports towards one server address). With `--proxies N` both
servers run `proxy_processes = N` (SO_REUSEPORT listeners, each proxy
under its own open-file limit), which is how one machine serves more than
one process's limit; memory is then the sum over the proxies, and the
results go to connection_scale_p<N>.json.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_benchmarks import BENCH, Server  # noqa: E402


def mem(pid):
    """(VmRSS, RssAnon) in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon"):
                out[k] = int(v.split()[0])
    return out.get("VmRSS", 0), out.get("RssAnon", 0)


def mem_all(pids):
    """`mem` summed over the proxies."""
    ms = [mem(p) for p in pids]
    return sum(m[0] for m in ms), sum(m[1] for m in ms)


def one(inline, conns, active, rate, seconds, proxies):
    s = Server(inline=inline, workers=max(2, proxies), extra_server=f"proxy_processes = {proxies}")
    try:
        assert len(s.proxy) == proxies, s.proxy
        base = mem_all(s.proxy)
        peak = [base]
        done = threading.Event()

        def sample():
            while not done.is_set():
                try:
                    peak.append(mem_all(s.proxy))
                except OSError:
                    return
                time.sleep(0.2)

        t = threading.Thread(target=sample)
        t.start()
        processes = max(2, math.ceil(conns / 18000))
        sources = ",".join(f"127.0.0.{2 + i}" for i in range(max(3, conns // 25000 + 1)))
        cmd = [BENCH, "--addr", f"127.0.0.1:{s.port}", "--json", "-c", conns, "--active", active,
               "--rate", rate, "--warmup", "2s", "--duration", f"{seconds}s", "--processes", processes,
               "--source", sources, "--connect-timeout", "30s"]
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600)
        done.set()
        t.join()
        try:
            rep = json.loads(r.stdout)
        except json.JSONDecodeError:
            sys.exit(f"halfsync-bench failed: {r.stderr[-2000:]}")
        top = max(peak, key=lambda m: m[0])
        rep["proxy_rss_kib"] = {"before": base[0], "peak": top[0]}
        rep["proxy_anon_kib"] = {"before": base[1], "peak": max(m[1] for m in peak)}
        rep["proxies"] = proxies
        rep["generator_processes"] = processes
        rep["sources"] = sources
        return rep
    finally:
        s.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=19000)
    ap.add_argument("--active", type=int, default=1000)
    ap.add_argument("--rate", type=int, default=20000)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--proxies", type=int, default=1, help="proxy_processes for both servers")
    a = ap.parse_args()
    res = {}
    for mode in ("inline", "halfsync"):
        print(f"== {mode}", file=sys.stderr, flush=True)
        res[mode] = one(mode == "inline", a.connections, a.active, a.rate, a.seconds, a.proxies)
    print("| server | connected | active | rate | p50 | p99 | p99.9 | errors | proxy RSS growth | per connection (RSS / anonymous) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, r in res.items():
        c = max(r["connected"], 1)
        grow = r["proxy_rss_kib"]["peak"] - r["proxy_rss_kib"]["before"]
        anon = r["proxy_anon_kib"]["peak"] - r["proxy_anon_kib"]["before"]
        errs = sum(v for k, v in r["status"].items() if k not in ("OK", "other_codes")) + r["verify_errors"] + sum(r["conn_errors"].values())
        lat = r["latency_us"]
        print(f"| {mode} | {r['connected']:,} | {r['active']:,} | {r['rps']:,.0f}/s | {lat['p50']} µs | "
              f"{lat['p99']} µs | {lat['p999']} µs | {errs} | {grow / 1024:.1f} MiB | "
              f"{grow * 1024 / c:,.0f} B / {anon * 1024 / c:,.0f} B |")
    name = "connection_scale.json" if a.proxies == 1 else f"connection_scale_p{a.proxies}.json"
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results", name)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
