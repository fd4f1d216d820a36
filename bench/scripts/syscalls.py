#!/usr/bin/env python3
"""System calls and context switches per request, per process: what the
worker hop adds to the inline baseline's `epoll_wait` + `recv` + `send`,
counted rather than inferred.

`perf stat` counts the kernel's syscall tracepoints and `context-switches`
on the proxy and on each worker (or on the inline server) while the load
generator runs; every count is divided by the requests answered in the
same window. The figures are counts, so they do not depend on how noisy
the machine is; the CPU column (`task-clock`) does, and includes perf's
own overhead.

Usage:
    cargo build --release --workspace
    python3 bench/scripts/syscalls.py [--pin] [--seconds 3] [--rate R ...] [--depth D ...]

Without --rate/--depth it runs the three target loads: 50 connections at
depth 1, at depth 16, and open loop at 54,000 req/s (about half the inline
peak at depth 1 on this machine). Needs perf and root (or
kernel.perf_event_paranoid <= 1 and readable tracefs). Writes
bench/results/syscalls.json (syscalls_pinned.json with --pin).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_benchmarks import BENCH, ROOT, Server  # noqa: E402

# (column, perf event)
EVENTS = [
    ("syscalls", "raw_syscalls:sys_enter"),
    ("epoll_wait", "syscalls:sys_enter_epoll_wait"),
    ("recvfrom", "syscalls:sys_enter_recvfrom"),
    ("sendto", "syscalls:sys_enter_sendto"),
    ("futex", "syscalls:sys_enter_futex"),
    ("read", "syscalls:sys_enter_read"),
    ("write", "syscalls:sys_enter_write"),
    ("switches", "context-switches"),
    ("cpu_ms", "task-clock"),
]


def perf_counts(stderr):
    """{column: value} from `perf stat -x,` output."""
    by_event = {}
    for line in stderr.splitlines():
        f = line.split(",")
        if len(f) < 3:
            continue
        try:
            by_event[f[2]] = float(f[0])
        except ValueError:
            continue  # "<not counted>" and the like
    return {col: by_event.get(ev, 0.0) for col, ev in EVENTS}


def measure(inline, load, pin, seconds):
    s = Server(inline=inline, pin=pin)
    gen = None
    perfs = []
    try:
        cmd = [BENCH, "--addr", f"127.0.0.1:{s.port}", "-c", "50", "--warmup", "1s",
               "--duration", f"{seconds + 2}s", "--json"] + load
        if pin:
            cmd = ["taskset", "-c", "1"] + cmd
        gen = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        time.sleep(1.5)
        names = [("proxy" if not inline else "inline", p) for p in s.proxy]
        names += [(f"worker{i}", p) for i, p in enumerate(s.workers)]
        events = ",".join(ev for _, ev in EVENTS)
        for name, pid in names:
            p = subprocess.Popen(["perf", "stat", "-x,", "-e", events, "-p", str(pid), "--",
                                  "sleep", str(seconds)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            perfs.append((name, p))
        errs = {}
        counts = {}
        for name, p in perfs:
            err = p.communicate(timeout=seconds + 60)[1]
            counts[name] = perf_counts(err)
            errs[name] = err
        # The event-loop process always makes system calls under load: none
        # counted means perf could not read the tracepoints.
        first = names[0][0]
        if counts[first]["syscalls"] == 0:
            sys.exit("perf counted no system calls for the server: the syscall tracepoints need "
                     "root, or kernel.perf_event_paranoid = -1 and a readable "
                     "/sys/kernel/tracing. perf said:\n" + errs[first][-1000:])
        r = json.loads(gen.communicate(timeout=seconds + 60)[0])
        # The generator's rate over its measured window; perf's window lies inside it.
        n = r["rps"] * seconds
        per_req = {name: {k: (v / n if k != "cpu_ms" else v * 1000 / n) for k, v in c.items()}
                   for name, c in counts.items()}
        return {"rps": r["rps"], "p50_us": r["latency_us"]["p50"], "p99_us": r["latency_us"]["p99"],
                "per_request": per_req}
    finally:
        if gen and gen.poll() is None:
            gen.kill()
            gen.wait()
        for _, p in perfs:
            if p.poll() is None:
                p.kill()
                p.wait()
        s.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=int, action="append", default=[])
    ap.add_argument("--depth", type=int, action="append", default=[])
    ap.add_argument("--pin", action="store_true", help="servers on CPU 0, load generator on CPU 1")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--out", help="JSON file to write (default: bench/results/syscalls.json, "
                                   "syscalls_pinned.json with --pin)")
    a = ap.parse_args()
    if not a.out:
        name = "syscalls_pinned.json" if a.pin else "syscalls.json"
        a.out = os.path.join(ROOT, "bench", "results", name)
    if not shutil.which("perf"):
        sys.exit("perf not found: apt-get install linux-perf (or linux-tools-$(uname -r))")
    loads = [["--depth", str(d)] for d in a.depth] + [["--rate", str(r)] for r in a.rate]
    if not loads:
        loads = [["--depth", "1"], ["--depth", "16"], ["--rate", "54000"]]
    results = []
    cols = [c for c, _ in EVENTS]
    print(f"per request, 50 connections{', pinned' if a.pin else ''} "
          f"(cpu_us includes perf's overhead)\n")
    print(f"| load | server | process | {' | '.join(c.replace('cpu_ms', 'cpu_us') for c in cols)} |")
    print("|---|---|---|" + "---|" * len(cols))
    for load in loads:
        for inline in (True, False):
            m = measure(inline, load, a.pin, a.seconds)
            m.update(load=" ".join(load), server="inline" if inline else "halfsync", pinned=a.pin)
            results.append(m)
            rows = list(m["per_request"].items())
            if not inline:
                total = {c: sum(v[c] for _, v in rows) for c in cols}
                rows.append(("all", total))
            for name, v in rows:
                print(f"| {m['load']} ({m['rps']:,.0f} req/s) | {m['server']} | {name} | "
                      + " | ".join(f"{v[c]:.2f}" if c == "cpu_ms" else f"{v[c]:.3f}" for c in cols)
                      + " |", flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
