#!/usr/bin/env python3
"""What a stall of the whole server costs, halfsync against the inline
baseline: an open-loop run at a fixed rate during which every server
process is stopped (SIGSTOP) for a while and then continued, as a VM
whose vCPU is descheduled, or a host under memory pressure, would do.

The open-loop generator keeps its schedule through the stall, so when the
server resumes it finds the whole backlog (rate x stall) at once. The
inline loop has no queue of its own: the backlog waits in the sockets and
is served in order. halfsync's proxy reads it into its wait queue; a loop
turn reads about 8,192 requests shared equally among the connections with
data (`proxy/src/event_loop.rs`, `read_share`), so reading keeps in step
with answering and the rest of the backlog waits in the sockets too. What
does not fit in the group's wait queue (`max_queue`, 100,000 in the
benchmark config) is still answered BUSY at once, by design (README,
Overload: bounded queues, then BUSY), but it takes a longer stall than
before: until the share, 50 connections x 64 KiB (40,000 requests) were
read per turn and 250 and 400 ms stalls overflowed the queue.

Reported per server and round: throughput, OK and BUSY replies, p99, max
latency, and max minus the stall (how long the oldest request caught by
the stall waited once the server was running again).

Usage:
    cargo build --release --workspace
    python3 bench/scripts/freeze_recovery.py [--rate 650000] [--freeze-ms 0,250,400] [--rounds 2] [--pin]

Writes bench/results/freeze_recovery.json.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_benchmarks import BENCH, ROOT, Server  # noqa: E402

MAX_QUEUE = 100_000  # the benchmark config's (run_benchmarks.Server)


def one(inline, rate, freeze_ms, pin, seconds):
    s = Server(inline=inline, pin=pin)
    try:
        pids = [s.proc.pid] + s.kids
        cmd = [BENCH, "--addr", f"127.0.0.1:{s.port}", "--json", "-c", "50", "--rate", str(rate),
               "--warmup", "1s", "--duration", f"{seconds}s", "--allow-status", "2"]
        if pin:
            cmd = ["taskset", "-c", "1"] + cmd
        gen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # Warm-up, then half the measured time.
            time.sleep(1 + seconds / 2)
            if freeze_ms > 0:
                try:
                    for p in pids:
                        os.kill(p, signal.SIGSTOP)
                    time.sleep(freeze_ms / 1000)
                finally:
                    for p in pids:
                        os.kill(p, signal.SIGCONT)
            out, err = gen.communicate(timeout=seconds + 120)
        finally:
            if gen.poll() is None:
                gen.kill()
                gen.wait()
    finally:
        s.stop()
    try:
        r = json.loads(out)
    except json.JSONDecodeError:
        raise RuntimeError(f"halfsync-bench failed ({gen.returncode}): {err[-2000:]}")
    lat = r["latency_us"]
    st = r.get("status", {})
    other = sum(v for k, v in st.items() if k not in ("OK", "BUSY")) + r.get("verify_errors", 0) \
        + sum(r.get("conn_errors", {}).values())
    return {
        "server": "inline" if inline else "halfsync",
        "freeze_ms": freeze_ms,
        "rps": r["rps"],
        "ok": st.get("OK", 0),
        "busy": st.get("BUSY", 0),
        "other_errors": other,
        "p99_us": lat["p99"],
        "max_us": lat["max"],
        "after_freeze_ms": round(lat["max"] / 1000 - freeze_ms, 1) if freeze_ms else None,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=int, default=650_000,
                    help="requests/s in total (default: about half the pinned depth-16 peak here)")
    ap.add_argument("--freeze-ms", default="0,250,400", help="stall lengths to try, comma-separated")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=6.0, help="measured time per run")
    ap.add_argument("--pin", action="store_true", help="servers on CPU 0, load generator on CPU 1")
    a = ap.parse_args()
    rows = []
    for r in range(a.rounds):
        for f in [int(x) for x in a.freeze_ms.split(",")]:
            for inline in (True, False):
                row = one(inline, a.rate, f, a.pin, a.seconds)
                row["round"] = r
                rows.append(row)
                print(f"round {r} stall {f:4d} ms {row['server']:8s} {row['rps']:9.0f} req/s "
                      f"OK {row['ok']:8d} BUSY {row['busy']:7d} other {row['other_errors']} "
                      f"p99 {row['p99_us'] / 1000:7.1f} ms max {row['max_us'] / 1000:7.1f} ms "
                      f"after {row['after_freeze_ms']} ms", flush=True)
    out = {"rate": a.rate, "pinned": a.pin, "max_queue": MAX_QUEUE, "connections": 50,
           "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": rows}
    path = os.path.join(ROOT, "bench", "results", "freeze_recovery.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
