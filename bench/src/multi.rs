//! `--processes P`: the parent spawns P copies of the binary (`--child`),
//! each running its share of the connections, and merges their results.
//!
//! Protocol, one JSON or text line each:
//! - parent → child stdin: a [`ChildSpec`] (config, connection range,
//!   request budget); later `go <t0>` (start time on `CLOCK_MONOTONIC`,
//!   which every process shares, so the open-loop schedule is one global
//!   schedule) or `stop`. EOF on stdin also means stop.
//! - child → parent stdout: [`ChildMsg`]s: `ready` once connected,
//!   `progress` every second, then `result` with the raw counters and the
//!   histogram as `[value_us, count]` bucket pairs (exact merge), or
//!   `error`.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::engine::{Hooks, Snapshot, run_local};
use crate::schedule::{active_before, quota_share, split};
use crate::stats::Stats;
use crate::{Config, ProgressLine, sys};

/// What a child runs.
#[derive(Serialize, Deserialize)]
pub(crate) struct ChildSpec {
    config: Config,
    range: [u64; 2],
    quota: Option<u64>,
}

/// A line from a child.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ChildMsg {
    Ready(Snapshot),
    Progress(Snapshot),
    Result(Box<Stats>),
    Error(String),
}

/// Kills (by pid) and reaps children still running when dropped.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn send_all(stdins: &mut [Option<ChildStdin>], line: &str) {
    for s in stdins.iter_mut() {
        if let Some(w) = s
            && writeln!(w, "{line}").and_then(|_| w.flush()).is_err()
        {
            *s = None;
        }
    }
}

pub(crate) fn run_processes(
    cfg: &Config,
    processes: usize,
    exe: &Path,
    interrupt: Option<&AtomicBool>,
    progress: &mut ProgressLine,
) -> anyhow::Result<Stats> {
    let p = processes as u64;
    let mut kids = Children(Vec::new());
    let mut stdins = Vec::new();
    let (tx, rx) = mpsc::channel::<(usize, Option<String>)>();
    for i in 0..processes {
        let range = split(&(0..cfg.connections), p, i as u64);
        let actives = active_before(range.start, cfg.connections, cfg.active)
            ..active_before(range.end, cfg.connections, cfg.active);
        let spec = ChildSpec {
            config: cfg.clone(),
            range: [range.start, range.end],
            quota: cfg.requests.map(|q| quota_share(q, &actives, cfg.active)),
        };
        let mut child = Command::new(exe)
            .arg("--child")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        kids.0.push(child);
        writeln!(stdin, "{}", serde_json::to_string(&spec)?)
            .and_then(|_| stdin.flush())
            .with_context(|| format!("writing to process {i}"))?;
        stdins.push(Some(stdin));
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((i, Some(line))).is_err() {
                    return;
                }
            }
            let _ = tx.send((i, None));
        });
    }
    drop(tx);

    let parse = |i: usize, line: &str| -> anyhow::Result<ChildMsg> {
        serde_json::from_str(line)
            .with_context(|| format!("process {i} sent an unreadable line: {line:.200}"))
    };

    // Everyone connects. Children report progress every second while connecting, so silence,
    // not the total time, is what counts as stuck.
    let mut snaps = vec![Snapshot::default(); processes];
    let mut ready = vec![false; processes];
    let silence = cfg.connect_timeout + Duration::from_secs(30);
    let mut last_seen = vec![Instant::now(); processes];
    let mut next_tick = Instant::now() + Duration::from_secs(1);
    while ready.iter().any(|r| !r) {
        if interrupt.is_some_and(|f| f.load(Relaxed)) {
            bail!("interrupted while connecting");
        }
        let now = Instant::now();
        if let Some(i) =
            (0..processes).find(|&i| !ready[i] && now.duration_since(last_seen[i]) > silence)
        {
            bail!("process {i} stopped reporting while connecting");
        }
        if now >= next_tick {
            let mut sum = Snapshot::default();
            for s in &snaps {
                sum.add(s);
            }
            progress.print(&sum, None);
            next_tick += Duration::from_secs(1);
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((i, Some(line))) => match parse(i, &line)? {
                ChildMsg::Ready(s) => {
                    snaps[i] = s;
                    ready[i] = true;
                }
                ChildMsg::Progress(s) => {
                    snaps[i] = s;
                    last_seen[i] = Instant::now();
                }
                ChildMsg::Error(e) => bail!("process {i}: {e}"),
                ChildMsg::Result(_) => bail!("process {i} sent a result before starting"),
            },
            Ok((i, None)) => bail!("process {i} exited before it was ready"),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => bail!("every child process is gone"),
        }
    }

    // Start together.
    let t0 = sys::now_ns() + 20_000_000;
    send_all(&mut stdins, &format!("go {t0}"));

    let stall = cfg.timeout + cfg.drain + Duration::from_secs(30);
    let mut results: Vec<Option<Stats>> = (0..processes).map(|_| None).collect();
    last_seen.fill(Instant::now());
    let mut stopped = false;
    // A progress line each time every child has sent one more tick.
    let mut ticks = vec![0u64; processes];
    let mut printed = 0u64;
    while results.iter().any(|r| r.is_none()) {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((i, Some(line))) => {
                last_seen[i] = Instant::now();
                match parse(i, &line)? {
                    ChildMsg::Progress(s) | ChildMsg::Ready(s) => {
                        snaps[i] = s;
                        ticks[i] += 1;
                    }
                    ChildMsg::Result(w) => results[i] = Some(*w),
                    ChildMsg::Error(e) => bail!("process {i}: {e}"),
                }
            }
            Ok((i, None)) => {
                if results[i].is_none() {
                    bail!("process {i} exited without a result");
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => bail!("every child process is gone"),
        }
        if !stopped && interrupt.is_some_and(|f| f.load(Relaxed)) {
            send_all(&mut stdins, "stop");
            stopped = true;
        }
        let now = Instant::now();
        for i in 0..processes {
            if results[i].is_none() && now.duration_since(last_seen[i]) > stall {
                bail!("process {i} stopped reporting for {}s", stall.as_secs());
            }
        }
        let done = ticks.iter().copied().min().unwrap_or(0);
        if done > printed {
            printed = done;
            let mut sum = Snapshot::default();
            for s in &snaps {
                sum.add(s);
            }
            progress.print(&sum, Some(Duration::from_secs(done)));
        }
    }
    drop(stdins);
    // Children exit right after their result; give them a moment.
    let reap_by = Instant::now() + Duration::from_secs(5);
    for c in &mut kids.0 {
        while let Ok(None) = c.try_wait() {
            if Instant::now() > reap_by {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let mut total = Stats::default();
    for r in results.into_iter().flatten() {
        total.merge(&r);
    }
    Ok(total)
}

struct ChildHooks {
    rx: Receiver<Option<String>>,
    stop: Arc<AtomicBool>,
}

fn emit(msg: &ChildMsg) {
    let line = serde_json::to_string(msg).expect("serializable");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|_| out.flush());
}

impl Hooks for ChildHooks {
    fn ready(&mut self, snap: &Snapshot) -> anyhow::Result<u64> {
        emit(&ChildMsg::Ready(*snap));
        // The parent sends `go` once every child is connected; it exits
        // (closing our stdin) if one gets stuck. This is only a backstop.
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if self.stop.load(Relaxed) {
                bail!("interrupted before the start");
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no start signal from the parent");
            }
            match self.rx.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(Some(line)) => {
                    if let Some(t) = line.strip_prefix("go ") {
                        return t.trim().parse().context("bad start time");
                    }
                    if line.trim() == "stop" {
                        bail!("stopped before the start");
                    }
                }
                Ok(None) | Err(RecvTimeoutError::Disconnected) => bail!("parent went away"),
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    fn tick(&mut self, snap: &Snapshot, _elapsed: Option<Duration>) {
        emit(&ChildMsg::Progress(*snap));
    }

    fn should_stop(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(Some(line)) if line.trim() == "stop" => self.stop.store(true, Relaxed),
                Ok(Some(_)) => {}
                Ok(None) | Err(mpsc::TryRecvError::Disconnected) => {
                    self.stop.store(true, Relaxed);
                    break;
                }
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        self.stop.load(Relaxed)
    }
}

/// The child side: reads its spec from stdin, runs, prints its result.
pub(crate) fn child_main() -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("signal handler")?;
    }
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(Some(line)).is_err() {
                return;
            }
        }
        let _ = tx.send(None);
    });
    let first = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Some(l)) => l,
        _ => bail!("--child expects its spec on stdin (it is started by --processes)"),
    };
    let spec: ChildSpec = serde_json::from_str(&first).context("reading the child spec")?;
    let mut hooks = ChildHooks { rx, stop };
    match run_local(
        &spec.config,
        spec.range[0]..spec.range[1],
        spec.quota,
        &mut hooks,
    ) {
        Ok(st) => {
            emit(&ChildMsg::Result(Box::new(st)));
            Ok(())
        }
        Err(e) => {
            emit(&ChildMsg::Error(format!("{e:#}")));
            Err(anyhow!("{e:#}"))
        }
    }
}
