#!/usr/bin/env python3
"""User-space instructions per request, counted by valgrind's callgrind
(this VM exposes no hardware counters to `perf`), for halfsync's proxy and
workers against the inline baseline, at depth 1 and 16.

Each server runs under `valgrind --tool=callgrind --trace-children=yes`, so
the master, the proxy and every worker are counted separately. After a
warm-up the counters of every child are zeroed (`callgrind_control -z`),
then a fixed number of requests run and the server stops; a process's Ir
(instructions executed) divided by the requests is its per-request cost.
Kernel instructions (the syscalls themselves) are not counted; the CPU
split in BENCHMARKS.md covers them.

Usage:
    cargo build --release --workspace
    python3 bench/scripts/instructions.py [--requests 100000] [--depth 16] [--keep DIR]

Needs valgrind (`apt-get install valgrind`). Writes
bench/results/instructions.json.
"""

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_benchmarks import ECHO, HALFSYNC, bench, children, errors, free_port  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def role(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for kv in f.read().split(b"\0"):
                if kv.startswith(b"HALFSYNC_ROLE="):
                    return kv.split(b"=", 1)[1].decode()
    except OSError:
        pass
    return "master"


def ready(port, deadline):
    while time.time() < deadline:
        r = bench(port, ["-c", 1, "-n", 10, "--warmup", "0s"])
        if r["exit_code"] == 0 and not errors(r):
            return
        time.sleep(0.5)
    raise RuntimeError("server under valgrind did not start")


def one(inline, depth, requests, keep=None, max_inflight=1024):
    d = tempfile.mkdtemp(prefix="halfsync-callgrind-")
    port = free_port()
    cfg = os.path.join(d, "bench.toml")
    with open(cfg, "w") as f:
        f.write(
            f'[server]\nlisten = ["127.0.0.1:{port}"]\nadmin_socket = "{d}/admin.sock"\n\n'
            f'[[group]]\nname = "echo"\nplugin = "{ECHO}"\nworkers = 2\n'
            f'init_timeout = "60s"\nmax_inflight = {max_inflight}\nmax_queue = 100000\n'
            # Under valgrind the plugin runs ~50x slower, and the time cap
            # would shrink the rings to match: count the path the rings take
            # on real hardware.
            f'max_inflight_time = "0s"\n'
        )
    cmd = ["valgrind", "--tool=callgrind", "--trace-children=yes",
           f"--callgrind-out-file={d}/callgrind.%p", HALFSYNC, "run", "--config", cfg]
    if inline:
        cmd.append("--inline")
    log = open(os.path.join(d, "server.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                            env=dict(os.environ, HALFSYNC_LOG="warn"))
    try:
        ready(port, time.time() + 120)
        bench(port, ["-c", 50, "-d", depth, "-n", requests // 10, "--warmup", "0s"])
        kids = {p: role(p) for p in children(proc.pid)}
        for p in kids:
            subprocess.run(["callgrind_control", "-z", str(p)], capture_output=True, timeout=60)
        r = bench(port, ["-c", 50, "-d", depth, "-n", requests, "--warmup", "0s"])
        if errors(r):
            raise RuntimeError(f"errors under valgrind: {r}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    per = {}
    for path in glob.glob(f"{d}/callgrind.*"):
        pid = int(path.rsplit(".", 1)[1])
        if pid not in kids:
            continue
        ir = 0
        # A zeroed process writes its counts since the zeroing in the last part.
        for part in [path] + sorted(glob.glob(path + ".*")):
            with open(part) as f:
                for line in f:
                    if line.startswith("totals:"):
                        ir = int(line.split()[1])
        name = kids[pid] + ("s" if kids[pid] == "worker" else "")
        per[name] = per.get(name, 0) + ir / r["requests"]
    if keep:
        # For `callgrind_annotate`: where each process's instructions go.
        dest = os.path.join(keep, f"{'inline' if inline else 'halfsync'}-d{depth}")
        os.makedirs(dest, exist_ok=True)
        for path in glob.glob(f"{d}/callgrind.*"):
            shutil.copy(path, dest)
    shutil.rmtree(d, ignore_errors=True)
    return per


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--depth", type=int, action="append", help="only these depths (default 1 and 16)")
    ap.add_argument("--keep", help="copy the callgrind output files under this directory")
    ap.add_argument("--max-inflight", type=int, default=1024,
                    help="per worker (the benchmark config's 1024; 64 sends most requests at depth 16 "
                         "through the wait queue)")
    a = ap.parse_args()
    if not shutil.which("valgrind"):
        sys.exit("needs valgrind: apt-get install valgrind")
    out = {"requests": a.requests, "workers": 2, "scenarios": {}}
    for depth in a.depth or (1, 16):
        inline = one(True, depth, a.requests, a.keep)
        hs = one(False, depth, a.requests, a.keep, a.max_inflight)
        total_inline = sum(inline.values())
        total_hs = sum(hs.values())
        out["scenarios"][f"d{depth}"] = {"inline": inline, "halfsync": hs,
                                         "ratio": total_hs / total_inline}
        print(f"depth {depth}: inline {inline}; halfsync {hs}; "
              f"total ratio {total_hs / total_inline:.2f}", flush=True)
    path = os.path.join(HERE, "..", "results", "instructions.json")
    if a.depth or a.max_inflight != 1024:
        print("partial run (--depth or --max-inflight): results not written")
        return
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", os.path.normpath(path))


if __name__ == "__main__":
    main()
