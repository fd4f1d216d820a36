#!/usr/bin/env python3
"""The techniques that only show under connection churn or an unfair mix
of clients, each against halfsync with it on, alternating rounds in one run:

- churn (`--per-connection 1`: connect, one request, close; 50 at a time):
  `accept4` against accept + 2 fcntl (`HALFSYNC_TUNING=plain_accept`), and
  `server.tcp_defer_accept = true` against off;
- fairness: one light client (1 connection, 1 request in flight) beside a
  flooder (4 connections x 2,048 requests of 4 KiB in flight), with
  `max_inflight = 8`; the light client's latency with the wait queue
  served connection by connection against plain arrival order
  (`HALFSYNC_TUNING=fifo_queue`), with per-connection read budgets
  against without (`HALFSYNC_TUNING=no_read_budget`), and with
  `max_inflight = 8` against 64 (requests already in a worker's ring are
  served in order, so the ring's depth bounds what fairness can do), and
  against the shipped defaults (`max_inflight = 1024`, held to
  `max_inflight_time` = 1 ms of work per worker).

Usage:
    cargo build --release --workspace
    python3 bench/scripts/churn_fairness.py [--rounds 3] [--seconds 5]

Writes bench/results/churn_fairness.json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_benchmarks import BENCH, Server, bench, errors  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def churn(env, extra, seconds):
    s = Server(env=env, extra_server=extra)
    try:
        r = bench(s.port, ["-c", 50, "-d", 1, "--per-connection", 1,
                           "--warmup", "1s", "--duration", f"{seconds}s"])
    finally:
        s.stop()
    if errors(r):
        raise RuntimeError(f"churn errors: {r['errors']}")
    return {"rps": r["rps"], "reconnects": r["reconnects"], "p99_us": r["latency_us"]["p99"]}


def fairness(env, seconds, max_inflight=8):
    # Few requests per worker ring, so the wait queue is where requests wait.
    s = Server(env=env, max_inflight=max_inflight)
    try:
        flood = subprocess.Popen(
            [BENCH, "--addr", f"127.0.0.1:{s.port}", "--json", "-c", "4", "-d", "2048", "-p", "4096",
             "--warmup", "0s", "--duration", f"{seconds + 2}s"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        light = bench(s.port, ["-c", 1, "-d", 1, "--warmup", "1s", "--duration", f"{seconds}s"])
        f = json.loads(flood.communicate(timeout=120)[0])
    finally:
        s.stop()
    if errors(light):
        raise RuntimeError(f"light client errors: {light['errors']}")
    return {"light_p50_us": light["latency_us"]["p50"], "light_p99_us": light["latency_us"]["p99"],
            "light_rps": light["rps"], "flood_rps": f["rps"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--only", default="", help="run only the cases whose name starts with this")
    a = ap.parse_args()
    path = os.path.join(HERE, "..", "results", "churn_fairness.json")
    # --only updates its cases and keeps the others' latest results.
    out = {}
    if a.only and os.path.exists(path):
        with open(path) as f:
            out = json.load(f)
    out.update({"cpus": os.cpu_count(), "rounds": a.rounds, "seconds": a.seconds})
    cases = {
        "churn: plain_accept": (lambda: churn({}, "", a.seconds),
                                lambda: churn({"HALFSYNC_TUNING": "plain_accept"}, "", a.seconds)),
        "churn: tcp_defer_accept": (lambda: churn({}, "", a.seconds),
                                    lambda: churn({}, "tcp_defer_accept = true", a.seconds)),
        "fairness: fifo_queue": (lambda: fairness({}, a.seconds),
                                 lambda: fairness({"HALFSYNC_TUNING": "fifo_queue"}, a.seconds)),
        "fairness: no_read_budget": (lambda: fairness({}, a.seconds),
                                     lambda: fairness({"HALFSYNC_TUNING": "no_read_budget"}, a.seconds)),
        "fairness: max_inflight 64": (lambda: fairness({}, a.seconds),
                                      lambda: fairness({}, a.seconds, max_inflight=64)),
        # The shipped defaults: max_inflight 1024, held to 1 ms of work.
        "fairness: defaults": (lambda: fairness({}, a.seconds),
                               lambda: fairness({}, a.seconds, max_inflight=1024)),
    }
    cases = {n: c for n, c in cases.items() if n.startswith(a.only)}
    for name, (base, other) in cases.items():
        rounds = []
        for _ in range(a.rounds):
            rounds.append({"base": base(), "other": other()})
            print(name, rounds[-1], flush=True)
        out[name] = rounds
    key = {"churn: plain_accept": "rps", "churn: tcp_defer_accept": "rps",
           "fairness: fifo_queue": "light_p50_us", "fairness: no_read_budget": "light_p50_us",
           "fairness: max_inflight 64": "light_p50_us", "fairness: defaults": "light_p50_us"}
    print()
    for name, k in key.items():
        if name not in out:
            continue
        b = statistics.median(r["base"][k] for r in out[name])
        o = statistics.median(r["other"][k] for r in out[name])
        print(f"{name}: {k} base {b:,.0f}, other {o:,.0f}, ratio {o / b:.2f}")
        out[name + " summary"] = {"metric": k, "base": b, "other": o, "ratio": o / b}
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", os.path.normpath(path))


if __name__ == "__main__":
    main()
