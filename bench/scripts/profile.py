#!/usr/bin/env python3
"""Where halfsync's processes spend their CPU under load, kernel included:
`perf record -e cpu-clock` (a software timer, so it works on VMs without
hardware counters) on the proxy and on each worker while the load
generator runs, then the top symbols of each process.

It answers what the instruction counts cannot: how much of a process's
time goes to the kernel's context switch (`finish_task_switch`, where a
task switched in resumes) and to waking other processes
(`try_to_wake_up`, `_raw_spin_unlock_irqrestore`).

Usage:
    cargo build --release --workspace
    python3 bench/scripts/profile.py [--depth 16] [--rate R] [--inline] [--pin] [--seconds 3]

Needs perf (`apt-get install linux-perf` or `linux-tools-$(uname -r)`)
and root (or kernel.perf_event_paranoid <= 1). Writes
bench/results/profile.json (profile_inline.json, profile_pinned.json,
profile_inline_pinned.json for those runs).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_benchmarks import BENCH, ROOT, Server  # noqa: E402

TOP = 12


def top_symbols(data):
    """(symbol, percent) of one perf.data, most first."""
    r = subprocess.run(
        ["perf", "report", "-i", data, "--no-children", "--sort", "sym", "--stdio",
         "--percent-limit", "0.5"],
        capture_output=True, text=True, timeout=300)
    out = []
    for line in r.stdout.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "%" not in line:
            continue
        pct, _, rest = line.partition("%")
        try:
            out.append((rest.split("]", 1)[-1].strip(), float(pct)))
        except ValueError:
            continue
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--rate", type=int, help="open loop at this rate instead of --depth")
    ap.add_argument("--inline", action="store_true", help="profile the inline baseline")
    ap.add_argument("--pin", action="store_true", help="servers on CPU 0, load generator on CPU 1")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--max-inflight", type=int, default=1024, help="per worker (64 sends most requests at depth 16 through the wait queue)")
    ap.add_argument("--out", help="JSON file to write (default: bench/results/profile.json, with "
                                   "_inline and _pinned in the name for those runs)")
    a = ap.parse_args()
    if not a.out:
        name = "profile" + ("_inline" if a.inline else "") + ("_pinned" if a.pin else "") + ".json"
        a.out = os.path.join(ROOT, "bench", "results", name)
    if not shutil.which("perf"):
        sys.exit("perf not found: apt-get install linux-perf (or linux-tools-$(uname -r))")
    load = ["--rate", a.rate] if a.rate else ["--depth", a.depth]
    tmp = tempfile.mkdtemp(prefix="halfsync-profile-")
    s = Server(inline=a.inline, pin=a.pin, max_inflight=a.max_inflight)
    perfs = []
    gen = None
    try:
        cmd = [BENCH, "--addr", f"127.0.0.1:{s.port}", "-c", "50", "--warmup", "1s",
               "--duration", f"{a.seconds + 2}s"] + [str(x) for x in load]
        if a.pin:
            cmd = ["taskset", "-c", "1"] + cmd
        gen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1.5)
        targets = [("proxy", p) for p in s.proxy] + [(f"worker{i}", p) for i, p in enumerate(s.workers)]
        for name, pid in targets:
            data = os.path.join(tmp, f"{name}.data")
            p = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "4999", "-o", data,
                                  "-p", str(pid), "--", "sleep", str(a.seconds)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            perfs.append((name, data, p))
        for _, _, p in perfs:
            p.wait(timeout=a.seconds + 60)
        out = gen.communicate(timeout=a.seconds + 60)[0]
        rps = next((ln for ln in out.splitlines() if ln.startswith("requests")), "").strip()
        result = {"load": " ".join(str(x) for x in load), "inline": a.inline, "pinned": a.pin,
                  "generator": rps, "processes": {}}
        print(f"{'inline' if a.inline else 'halfsync'}, 50 connections, {result['load']}"
              f"{', pinned' if a.pin else ''}: {rps}")
        for name, data, _ in perfs:
            syms = top_symbols(data)
            result["processes"][name] = syms
            print(f"\n{name}:")
            for sym, pct in syms[:TOP]:
                print(f"  {pct:6.2f}%  {sym}")
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {a.out}")
    finally:
        if gen and gen.poll() is None:
            gen.kill()
            gen.wait()
        for _, _, p in perfs:
            if p.poll() is None:
                p.kill()
                p.wait()
        s.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
