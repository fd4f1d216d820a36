#!/usr/bin/env python3
"""End-to-end benchmarks of halfsync against its inline baseline.

Every figure is measured in this run, next to the inline baseline (the same
plugin called inside the proxy's own event loop: `halfsync run --inline`),
and reported as a ratio to it, so the cost of isolation is a number that
survives a noisy machine. Runs interleave (baseline, halfsync, baseline,
halfsync, ...) and each configuration reports the median of its rounds.

Usage:
    cargo build --release --workspace
    python3 bench/scripts/run_benchmarks.py [--quick] [--targets] [--pin] [--out FILE]
    python3 bench/scripts/plot.py bench/results/latest.json

Writes a JSON file with every run and prints the tables that go into
BENCHMARKS.md. Unless --out says otherwise, the file is named after the
kind of run, so a run never replaces another kind's figures:
bench/results/latest.json (full run; latest_pinned.json with --pin),
targets_unpinned.json / targets_pinned.json (--targets), and quick.json
(--quick, a smoke run, not tracked by git). Standard library only.
"""

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REL = os.path.join(ROOT, "target", "release")
HALFSYNC = os.path.join(REL, "halfsync")
BENCH = os.path.join(REL, "halfsync-bench")
ECHO = os.path.join(REL, "libecho.so")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def children(pid):
    """Every descendant of pid (from /proc)."""
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read()
                parents[int(d)] = int(st[st.rfind(")") + 2:].split()[1])
            except OSError:
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c, pp in parents.items():
            if pp == p:
                out.append(c)
                todo.append(c)
    return out


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Server:
    """A halfsync (or inline baseline) server on a free port."""

    def __init__(self, inline=False, workers=2, env=None, extra_server="", pin=False, max_inflight=1024, extra_group=""):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="halfsync-bench-")
        cfg = os.path.join(self.dir, "bench.toml")
        with open(cfg, "w") as f:
            f.write(
                f'[server]\nlisten = ["127.0.0.1:{self.port}"]\n'
                f'admin_socket = "{self.dir}/admin.sock"\nmax_connections = 100000\n'
                f"{extra_server}\n\n"
                f'[[group]]\nname = "echo"\nplugin = "{ECHO}"\nworkers = {workers}\n'
                f"max_inflight = {max_inflight}\nmax_queue = 100000\n{extra_group}\n"
            )
        cmd = [HALFSYNC, "run", "--config", cfg] + (["--inline"] if inline else [])
        if pin:
            cmd = ["taskset", "-c", "0"] + cmd
        e = dict(os.environ, HALFSYNC_LOG="warn")
        e.update(env or {})
        self.log = open(os.path.join(self.dir, "server.log"), "w")
        self.proc = subprocess.Popen(cmd, env=e, stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)
        self.kids = []
        try:
            self.wait_ready()
        except RuntimeError:
            # Show why, then leave nothing behind (the caller has no object to stop).
            with open(os.path.join(self.dir, "server.log")) as f:
                print(f.read()[-2000:], file=sys.stderr)
            self.stop()
            raise
        self.kids = children(self.proc.pid)
        self.proxy = [p for p in self.kids if "halfsync: proxy" in cmdline(p)]
        self.workers = [p for p in self.kids if "halfsync: worker" in cmdline(p)]

    def wait_ready(self):
        deadline = time.time() + 30
        while time.time() < deadline and self.proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    s.sendall(struct.pack(">IQHH", 16, 1, 1, 0) + b"ping")
                    head = s.recv(16, socket.MSG_WAITALL)
                    if len(head) == 16 and struct.unpack(">IQHH", head)[2] == 0:
                        s.recv(4, socket.MSG_WAITALL)
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not start (its log is above)")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for p in self.kids:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        self.log.close()
        subprocess.run(["rm", "-rf", self.dir])


def bench(port, args, pin=False, cpu_pid=None):
    """One halfsync-bench run's JSON report; with `cpu_pid`, the report's
    `cpu` section covers that process and its descendants (`--cpu`)."""
    cmd = [BENCH, "--addr", f"127.0.0.1:{port}", "--json"] + [str(a) for a in args]
    if "--rate" in cmd:
        # Open loop: keep the histogram, so the rounds can be pooled.
        cmd.append("--histogram")
    if cpu_pid is not None:
        cmd += ["--cpu", str(cpu_pid)]
    if pin:
        cmd = ["taskset", "-c", "1"] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    try:
        out = json.loads(r.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"halfsync-bench failed ({r.returncode}): {r.stderr[-2000:]}")
    out["exit_code"] = r.returncode
    out["command"] = "halfsync-bench " + " ".join(str(a) for a in args)
    return out


def errors(r):
    bad = sum(v for k, v in r.get("status", {}).items() if k not in ("OK", "other_codes"))
    return bad + r.get("verify_errors", 0) + sum(r.get("conn_errors", {}).values())


def measured(server, args, pin):
    """A run of `args`, with the CPU time each process spent per measured
    request over exactly the measured window (`halfsync-bench --cpu` on the
    master: the proxy, the workers, and the generator itself)."""
    r = bench(server.port, args, pin, cpu_pid=server.proc.pid)
    cpu = r.get("cpu", {})
    rows = cpu.get("processes", [])
    gen = cpu.get("generator") or {"user_us": 0.0, "sys_us": 0.0}

    def total(prefix, key):
        return sum(p[key] for p in rows if p["name"].startswith(prefix))

    r["cpu_us_per_request"] = {
        "proxy_user": total("halfsync: proxy", "user_us"),
        "proxy_sys": total("halfsync: proxy", "sys_us"),
        "workers_user": total("halfsync: worker", "user_us"),
        "workers_sys": total("halfsync: worker", "sys_us"),
        # The load generator (user + system), for what each request costs
        # everything on the machine: unpinned, that bounds the ratio.
        "generator": gen["user_us"] + gen["sys_us"],
    }
    return r


def alternate(cases, args, rounds, pin, label=""):
    """Req/s of each case in `cases` (name: `Server` keyword arguments),
    `rounds` alternating rounds of `args`; stops at the first reply error."""
    runs = {name: [] for name in cases}
    for _ in range(rounds):
        for name, kw in cases.items():
            s = Server(pin=pin, **kw)
            try:
                r = bench(s.port, args, pin)
            finally:
                s.stop()
            if errors(r):
                raise RuntimeError(f"{name}: {errors(r)} errors")
            runs[name].append(r["rps"])
            print(f"{label}{name}: {r['rps']:,.0f} req/s", flush=True)
    return runs


def save_results(out, stem, pin):
    """Writes `out` to bench/results/STEM.json (STEM_pinned.json with
    `pin`) and says where."""
    path = os.path.join(ROOT, "bench", "results", f"{stem}_pinned.json" if pin else f"{stem}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)


def compare(name, args, rounds, pin, env=None, workers=2, extra_server=""):
    """Interleaved rounds: inline baseline vs halfsync. Returns both series."""
    res = {"name": name, "args": [str(a) for a in args], "inline": [], "halfsync": []}
    for _ in range(rounds):
        for mode in ("inline", "halfsync"):
            s = Server(inline=(mode == "inline"), workers=workers, env=env, extra_server=extra_server, pin=pin)
            try:
                res[mode].append(measured(s, args, pin))
            finally:
                s.stop()
    return res


def med(runs, key):
    return statistics.median(r[key] for r in runs)


def med_lat(runs, p):
    return statistics.median(r["latency_us"][p] for r in runs)


POOLED = {0.5: "p50", 0.99: "p99", 0.999: "p999"}


def pool_rounds(out):
    """Open-loop rows: the percentiles of all rounds pooled, per server,
    into `pooled_us`; the raw histograms are then dropped from the JSON
    (thousands of buckets per round)."""
    for r in out["results"]:
        for mode in ("inline", "halfsync"):
            runs = r[mode]
            if runs and all("latency_histogram" in x for x in runs):
                r.setdefault("pooled_us", {})[mode] = {k: pooled(runs, q) for q, k in POOLED.items()}
                for x in runs:
                    del x["latency_histogram"]


def pooled(runs, q):
    """The q-quantile (0..1) of all rounds' latencies together, from the
    histograms `halfsync-bench --histogram` printed; None without them."""
    counts = {}
    for r in runs:
        if "latency_histogram" not in r:
            return None
        for v, n in r["latency_histogram"]:
            counts[v] = counts.get(v, 0) + n
    total = sum(counts.values())
    seen = 0
    for v in sorted(counts):
        seen += counts[v]
        if seen >= q * total:
            return v
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="short runs, one round (a smoke test)")
    ap.add_argument("--pin", action="store_true", help="servers on CPU 0, load generator on CPU 1")
    ap.add_argument("--targets", action="store_true",
                    help="only the targets: 50 connections at depth 1 and 16, open loop at half "
                         "the depth-1 and the depth-16 peak")
    ap.add_argument("--rounds", type=int, help="interleaved rounds per cell (default 3; 1 with --quick)")
    ap.add_argument("--out", help="JSON file to write (default: named after the kind of run)")
    a = ap.parse_args()
    if not a.out:
        if a.quick:
            name = "quick.json"
        elif a.targets:
            name = "targets_pinned.json" if a.pin else "targets_unpinned.json"
        else:
            name = "latest_pinned.json" if a.pin else "latest.json"
        a.out = os.path.join(ROOT, "bench", "results", name)
    for f in (HALFSYNC, BENCH, ECHO):
        if not os.path.exists(f):
            sys.exit(f"{f} missing: run `cargo build --release --workspace` first")
    dur = "2s" if a.quick else "5s"
    rounds = a.rounds or (1 if a.quick else 3)
    common = ["--warmup", "1s", "--duration", dur, "--payload", 64]
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} vCPU, {platform.machine()}, Linux {platform.release()}",
        "pinned": a.pin,
        "rounds": rounds,
        "duration": dur,
        "results": [],
    }

    def run(name, args, **kw):
        print(f"== {name}", file=sys.stderr, flush=True)
        r = compare(name, common + args, rounds, a.pin, **kw)
        out["results"].append(r)
        return r

    # 1. Throughput at depth 1 and 16, 50 connections, 2 workers.
    d1 = run("echo 64 B, 50 conns, depth 1", ["-c", 50, "--depth", 1])
    d16 = run("echo 64 B, 50 conns, depth 16", ["-c", 50, "--depth", 16])
    if a.targets:
        peak = med(d1["inline"], "rps")
        out["open_loop_peak_rps"] = peak
        run("open loop 50% of peak", ["-c", 50, "--rate", int(peak * 0.5)])
        # The other reading of "half the maximum rate": half the most the
        # inline baseline answered at all (depth 16), where requests come
        # in batches rather than one at a time.
        peak16 = med(d16["inline"], "rps")
        out["open_loop_peak16_rps"] = peak16
        run("open loop 50% of depth-16 peak", ["-c", 50, "--rate", int(peak16 * 0.5)])
        pool_rounds(out)
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {a.out}", file=sys.stderr)
        return report(out)
    # 2. Throughput against connections (depth 1).
    for c in ([1, 10, 200] if a.quick else [1, 10, 100, 200, 500]):
        run(f"echo 64 B, {c} conns, depth 1", ["-c", c, "--depth", 1])
    # 3. Open loop: latency against offered rate, as fractions of the
    # closed-loop maximum of the inline baseline at depth 1.
    peak = med(d1["inline"], "rps")
    out["open_loop_peak_rps"] = peak
    for frac in ([0.5] if a.quick else [0.1, 0.3, 0.5, 0.7, 0.9]):
        run(f"open loop {int(frac * 100)}% of peak", ["-c", 50, "--rate", int(peak * frac)])
    # 4. Techniques: each switched off (HALFSYNC_TUNING), against all on, at
    # depth 1 and 16 (halfsync only; the inline column is all-on too).
    if not a.quick:
        out["switches"] = []
        for sw in ["plain_accept", "no_direct_send", "flush_per_reply", "clock_per_event",
                   "publish_per_request", "always_wake", "no_batch_affinity"]:
            for depth in (1, 16):
                print(f"== switch {sw}, depth {depth}", file=sys.stderr, flush=True)
                series = {"switch": sw, "depth": depth, "on": [], "off": []}
                for _ in range(rounds):
                    for mode in ("on", "off"):
                        env = {"HALFSYNC_TUNING": sw} if mode == "off" else {}
                        s = Server(env=env, pin=a.pin)
                        try:
                            series[mode].append(measured(s, common + ["-c", 50, "--depth", depth], a.pin))
                        finally:
                            s.stop()
                out["switches"].append(series)
    pool_rounds(out)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {a.out}", file=sys.stderr)
    report(out)


def report(out):
    print(f"\nMeasured {out['date']} on {out['machine']}; pinned: {out['pinned']}; "
          f"{out['rounds']} interleaved rounds of {out['duration']}, medians.\n")
    print("| scenario | inline baseline | halfsync | ratio | p99 inline | p99 halfsync | errors |")
    print("|---|---|---|---|---|---|---|")
    for r in out["results"]:
        i, h = r["inline"], r["halfsync"]
        ri, rh = med(i, "rps"), med(h, "rps")
        errs = sum(errors(x) for x in i + h)
        print(f"| {r['name']} | {ri:,.0f} req/s | {rh:,.0f} req/s | **{rh / ri:.2f}** | "
              f"{med_lat(i, 'p99'):,.0f} µs | {med_lat(h, 'p99'):,.0f} µs | {errs} |")
    open_rows = [r for r in out["results"] if "--rate" in r["args"]]
    if open_rows:
        print("\nOpen loop, every round (p99 µs, interleaved) and the load generator's own "
              "send lag (p99 µs, how late it sent against its schedule):\n")
        print("| scenario | p99 inline, each round | p99 halfsync, each round | send lag inline | send lag halfsync |")
        print("|---|---|---|---|---|")
        for r in open_rows:
            i, h = r["inline"], r["halfsync"]
            each = lambda runs: ", ".join(f"{x['latency_us']['p99']:,}" for x in runs)
            lag = lambda runs: statistics.median(x["send_lag_us"]["p99"] for x in runs)
            print(f"| {r['name']} | {each(i)} | {each(h)} | {lag(i):,.0f} | {lag(h):,.0f} |")
        if all("pooled_us" in r for r in open_rows):
            print("\nOpen loop, all rounds pooled (one histogram per server, µs):\n")
            print("| scenario | p50 inline | p50 halfsync | p99 inline | p99 halfsync | p99 ratio | p99.9 inline | p99.9 halfsync |")
            print("|---|---|---|---|---|---|---|---|")
            for r in open_rows:
                i, h = r["pooled_us"]["inline"], r["pooled_us"]["halfsync"]
                print(f"| {r['name']} | {i['p50']:,} | {h['p50']:,} | {i['p99']:,} | {h['p99']:,} | "
                      f"**{h['p99'] / i['p99']:.2f}** | {i['p999']:,} | {h['p999']:,} |")
    print("\nCPU per request (µs), 50 connections; the generator's and everything's "
          "(servers + generator) in the halfsync and the inline runs:\n")
    print("| scenario | proxy user | proxy sys | workers user | workers sys | inline user | inline sys "
          "| generator h / i | everything h / i | ratio i / h |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in out["results"][:2] + [r for r in open_rows if "50%" in r["name"]]:
        h = r["halfsync"]
        i = r["inline"]
        c = lambda runs, k: statistics.median(x["cpu_us_per_request"].get(k, float("nan")) for x in runs)
        all_h = c(h, "proxy_user") + c(h, "proxy_sys") + c(h, "workers_user") + c(h, "workers_sys") + c(h, "generator")
        all_i = c(i, "proxy_user") + c(i, "proxy_sys") + c(i, "generator")
        print(f"| {r['name']} | {c(h, 'proxy_user'):.2f} | {c(h, 'proxy_sys'):.2f} | "
              f"{c(h, 'workers_user'):.2f} | {c(h, 'workers_sys'):.2f} | "
              f"{c(i, 'proxy_user'):.2f} | {c(i, 'proxy_sys'):.2f} | "
              f"{c(h, 'generator'):.2f} / {c(i, 'generator'):.2f} | {all_h:.2f} / {all_i:.2f} | "
              f"{all_i / all_h:.2f} |")
    if out.get("switches"):
        print("\nEach technique switched off (HALFSYNC_TUNING), throughput relative to all on:\n")
        print("| switched off | depth | all on | switched off | ratio |")
        print("|---|---|---|---|---|")
        for s in out["switches"]:
            on, off = med(s["on"], "rps"), med(s["off"], "rps")
            print(f"| {s['switch']} | {s['depth']} | {on:,.0f} | {off:,.0f} | {off / on:.2f} |")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--report":
        with open(sys.argv[2]) as f:
            report(json.load(f))
    else:
        main()
