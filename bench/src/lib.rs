//! `halfsync-bench`: the load generator that ships with halfsync, in the
//! spirit of `redis-benchmark` and `wrk2`. It speaks HSP/1 (see
//! `halfsync_protocol`) to any server: halfsync itself, or anything else
//! that answers the same frames.
//!
//! # Common invocations
//!
//! ```text
//! # closed loop: 50 connections, each keeping 1 request in flight, 10 s
//! halfsync-bench --addr 127.0.0.1:7878 --connections 50 --depth 1
//!
//! # pipelined: 16 in flight per connection, 2 event-loop threads
//! halfsync-bench -c 50 --depth 16 --threads 2
//!
//! # open loop at 50,000 req/s in total; latency from the intended send
//! # time, so a stall shows up in the percentiles (no coordinated omission)
//! halfsync-bench -c 100 --rate 50000 --duration 30s
//!
//! # exactly 100,000 measured replies, 1 KiB payloads, JSON report
//! halfsync-bench -c 10 --depth 4 --requests 100000 --payload 1024 --json
//!
//! # many idle connections, 1,000 of them active; past one process's
//! # 20,000 file descriptors, split over processes and source addresses
//! halfsync-bench --connect-only -c 19000 --active 1000 --depth 1 --hold 30s
//! halfsync-bench --connect-only -c 60000 --active 1000 --rate 20000 \
//!     --processes 4 --source 127.0.0.2,127.0.0.3,127.0.0.4 --hold 60s
//!
//! # a plugin that answers other statuses by design
//! halfsync-bench --command 100 --allow-status 1,100
//! ```
//!
//! # What it measures
//!
//! - **Closed loop** (`--depth D`): each active connection keeps exactly D
//!   requests in flight; a reply triggers the next request at once. Latency
//!   is from the moment a request was queued for sending.
//! - **Open loop** (`--rate R`): request `k` (over all connections) is due
//!   at `start + k/R` on active connection `k mod A`; it is sent then,
//!   whether or not earlier ones were answered (pipelining), and its latency
//!   is measured from that *intended* time (see [`schedule`]).
//! - Replies during `--warmup` are not measured; the measured window is
//!   `--duration` long or ends at the `--requests`-th measured reply. After
//!   it, sending stops and outstanding replies are awaited for up to
//!   `--drain` (verified; in the closed loop not measured). The closed
//!   loop measures the replies that come inside the window; the open loop
//!   measures the requests that were *due* inside it, whenever their
//!   replies come, the drain included, so a stall at the end of the window
//!   is counted rather than cut off. Idle connections stay open for at
//!   least `--hold` from the start.
//! - **Verification** (unless `--no-verify`): a reply's id must be one its
//!   connection sent and has not seen answered (ids embed the connection's
//!   index, see [`make_id`]); for command 1 (echo) a status-0 reply's
//!   payload must equal the request's (payloads are a pattern of the id,
//!   see [`payload`]); the status must be 0 or in `--allow-status`.
//!
//! The run is *ok* ([`Report::ok`], and exit status 0 of the binary) only
//! with no verification error, no connection error, every connection
//! established and every request answered.
//!
//! # From Rust
//!
//! ```no_run
//! use std::time::Duration;
//! use halfsync_bench::{Config, Load};
//!
//! let mut cfg = Config::new("127.0.0.1:7878".parse().unwrap());
//! cfg.connections = 8;
//! cfg.active = 8;
//! cfg.load = Load::Closed { depth: 4 };
//! cfg.warmup = Duration::ZERO;
//! cfg.duration = None;
//! cfg.requests = Some(10_000);
//! let report = halfsync_bench::run(&cfg).unwrap();
//! assert!(report.ok, "{report}");
//! println!("{} req/s, p99 {} us", report.rps, report.latency_us.p99);
//! println!("{}", serde_json::to_string(&report).unwrap());
//! ```
//!
//! `--processes` needs the binary: [`run_with`] with [`RunOptions::exe`]
//! pointing at `halfsync-bench` (`env!("CARGO_BIN_EXE_halfsync-bench")` in
//! this crate's integration tests).

#![deny(missing_docs)]

pub mod cpu;
mod engine;
mod multi;
pub mod payload;
pub mod schedule;
pub mod stats;
mod sys;

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde::{Deserialize, Serialize};

pub use engine::{ID_SEQ_BITS, Snapshot, make_id};
pub use stats::{ConnErrors, Latency, Report, Stats, StatusCounts, VerifyErrors};

/// How traffic is generated.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Load {
    /// Each active connection keeps `depth` requests in flight.
    Closed {
        /// Requests in flight per connection.
        depth: u32,
    },
    /// `rate` requests per second in total, on a fixed schedule.
    Open {
        /// Requests per second over all active connections.
        rate: f64,
    },
}

/// Everything a run needs. [`Config::new`] gives the CLI's defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Server address.
    pub addr: SocketAddr,
    /// Connections to open.
    pub connections: u64,
    /// Of which carrying traffic (spread evenly; the rest stay idle).
    pub active: u64,
    /// Closed or open loop.
    pub load: Load,
    /// Request payload bytes.
    pub payload: usize,
    /// Every request's payload, as given (`--payload-file`), instead of
    /// `payload` generated bytes; an echo's reply must equal it.
    #[serde(default)]
    pub payload_data: Option<Vec<u8>>,
    /// Request command.
    pub command: u16,
    /// Unmeasured time at the start.
    pub warmup: Duration,
    /// Measured time (None: until `requests`).
    pub duration: Option<Duration>,
    /// Stop after this many measured replies.
    pub requests: Option<u64>,
    /// Event-loop threads per process.
    pub threads: usize,
    /// Local addresses to bind before connecting, round-robin.
    pub sources: Vec<std::net::IpAddr>,
    /// Check ids, echo payloads and statuses.
    pub verify: bool,
    /// Non-zero statuses that are not verification errors.
    pub allow_status: Vec<u16>,
    /// Keep (idle) connections open at least this long from the start.
    pub hold: Duration,
    /// Closed loop, connection churn: after this many requests a
    /// connection waits for their replies, closes and connects again.
    /// 0 keeps connections for the whole run.
    #[serde(default)]
    pub per_connection: u64,
    /// Per-connection connect timeout.
    pub connect_timeout: Duration,
    /// A request unanswered this long drops its connection (timeout
    /// error); zero disables.
    pub timeout: Duration,
    /// After the measurement, wait this long at most for outstanding
    /// replies.
    pub drain: Duration,
    /// Print a progress line on stderr every second.
    pub progress: bool,
    /// Bytes asked of one `recv`. A read that returns less ends reading
    /// that socket until its next (edge-triggered) event. Not on the
    /// command line: tests shrink it to exercise replies longer than a read.
    #[serde(default = "default_read_buffer")]
    pub read_buffer: usize,
}

fn default_read_buffer() -> usize {
    256 << 10
}

impl Config {
    /// The defaults of the command line: 50 connections, all active,
    /// closed loop depth 1, 64-byte echo requests, 1 s warmup, 10 s.
    pub fn new(addr: SocketAddr) -> Config {
        Config {
            addr,
            connections: 50,
            active: 50,
            load: Load::Closed { depth: 1 },
            payload: 64,
            payload_data: None,
            command: 1,
            warmup: Duration::from_secs(1),
            duration: Some(Duration::from_secs(10)),
            requests: None,
            threads: 1,
            sources: Vec::new(),
            verify: true,
            allow_status: Vec::new(),
            hold: Duration::ZERO,
            per_connection: 0,
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
            drain: Duration::from_secs(2),
            progress: false,
            read_buffer: default_read_buffer(),
        }
    }

    /// `"closed"`, `"open"` or `"idle"`.
    pub fn mode(&self) -> &'static str {
        match (self.active, self.load) {
            (0, _) => "idle",
            (_, Load::Closed { .. }) => "closed",
            (_, Load::Open { .. }) => "open",
        }
    }

    /// Checks the values make sense together.
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(self.connections >= 1, "--connections must be at least 1");
        ensure!(
            self.connections <= 1 << (64 - ID_SEQ_BITS),
            "--connections is limited to {}",
            1u64 << (64 - ID_SEQ_BITS)
        );
        ensure!(
            self.active <= self.connections,
            "--active ({}) exceeds --connections ({})",
            self.active,
            self.connections
        );
        match self.load {
            Load::Closed { depth } => ensure!(depth >= 1, "--depth must be at least 1"),
            Load::Open { rate } => ensure!(
                rate.is_finite() && rate >= 0.001,
                "--rate must be a positive number of requests per second"
            ),
        }
        ensure!(self.threads >= 1, "--threads must be at least 1");
        ensure!(
            self.per_connection == 0 || matches!(self.load, Load::Closed { .. }),
            "--per-connection needs the closed loop (no --rate)"
        );
        ensure!(
            self.payload <= (64 << 20) - 12,
            "--payload is limited to 64 MiB"
        );
        if self.active > 0 {
            ensure!(
                self.duration.is_some() || self.requests.is_some(),
                "give --duration or --requests"
            );
        }
        if self.requests == Some(0) {
            bail!("--requests must be at least 1");
        }
        for s in &self.sources {
            ensure!(
                s.is_ipv4() == self.addr.is_ipv4(),
                "--source {s} is not of the same family as --addr {}",
                self.addr
            );
        }
        Ok(())
    }
}

/// How to run a [`Config`].
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Processes to split the connections over (0 or 1: this one).
    pub processes: usize,
    /// The `halfsync-bench` binary to start with `--child` when
    /// `processes > 1` (default: the current executable).
    pub exe: Option<PathBuf>,
    /// Set it (e.g. from a signal handler) to stop early; the report then
    /// covers what was measured.
    pub interrupt: Option<Arc<AtomicBool>>,
    /// Report the CPU time per request of these processes, their
    /// descendants and the generator (see [`cpu`]); with `processes <= 1`
    /// only.
    pub cpu: Vec<u32>,
}

/// Runs `cfg` in this process.
pub fn run(cfg: &Config) -> anyhow::Result<Report> {
    run_with(cfg, &RunOptions::default())
}

/// Runs `cfg`, over several processes if asked.
pub fn run_with(cfg: &Config, opts: &RunOptions) -> anyhow::Result<Report> {
    cfg.validate()?;
    let processes = opts.processes.max(1);
    ensure!(
        processes as u64 <= cfg.connections,
        "--processes ({processes}) exceeds --connections ({})",
        cfg.connections
    );
    ensure!(
        opts.cpu.is_empty() || processes == 1,
        "--cpu needs a single generator process (no --processes)"
    );
    for &pid in &opts.cpu {
        ensure!(
            cpu::is_process(pid),
            "--cpu {pid}: no such process on this host (give the pid of a running server, e.g. the halfsync master's)"
        );
    }
    let mut progress = ProgressLine::new(cfg);
    let interrupt = opts.interrupt.as_deref();
    let mut cpu = (!opts.cpu.is_empty()).then(|| cpu::CpuWatch::new(opts.cpu.clone()));
    let stats = if processes == 1 {
        let mut hooks = LocalHooks {
            progress: &mut progress,
            interrupt,
            cpu: cpu.as_mut(),
        };
        engine::run_local(cfg, 0..cfg.connections, cfg.requests, &mut hooks)?
    } else {
        let exe = match &opts.exe {
            Some(p) => p.clone(),
            None => std::env::current_exe().context("finding the current executable")?,
        };
        multi::run_processes(cfg, processes, &exe, interrupt, &mut progress)?
    };
    progress.finish();
    let mut report = Report::build(cfg, processes, stats);
    report.interrupted = interrupt.is_some_and(|i| i.load(std::sync::atomic::Ordering::Relaxed));
    report.cpu = cpu.and_then(|mut c| c.report(report.rps));
    Ok(report)
}

/// Entry point of a child process (`halfsync-bench --child`, started by
/// `--processes`): reads its part from stdin, runs it, prints its raw
/// results on stdout.
pub fn child_main() -> anyhow::Result<()> {
    multi::child_main()
}

impl Report {
    /// The report of a run of `cfg` over `processes` with results `st`.
    pub fn build(cfg: &Config, processes: usize, st: Stats) -> Report {
        let requests = st.requests();
        let rps = if st.seconds > 0.0 {
            requests as f64 / st.seconds
        } else {
            0.0
        };
        let verify_errors = st.verify.total();
        let ok = verify_errors == 0
            && st.conn_errors.total() == 0
            && st.connected == cfg.connections
            && st.unanswered == 0;
        let (depth, rate) = match (cfg.active, cfg.load) {
            (0, _) => (None, None),
            (_, Load::Closed { depth }) => (Some(depth), None),
            (_, Load::Open { rate }) => (None, Some(rate)),
        };
        Report {
            mode: cfg.mode(),
            addr: cfg.addr.to_string(),
            connections: cfg.connections,
            active: cfg.active,
            connected: st.connected,
            threads: cfg.threads,
            processes,
            depth,
            rate,
            payload: cfg.payload,
            command: cfg.command,
            warmup_s: cfg.warmup.as_secs_f64(),
            duration_s: cfg.duration.map(|d| d.as_secs_f64()),
            requests,
            seconds: (st.seconds * 1e6).round() / 1e6,
            rps: (rps * 10.0).round() / 10.0,
            latency_us: Latency::of(&st.hist),
            send_lag_us: rate.map(|_| Latency::of(&st.send_lag)),
            status: st.status.clone(),
            conn_errors: st.conn_errors.clone(),
            verify_errors,
            verify: st.verify.clone(),
            sent: st.sent,
            replies: st.replies,
            unanswered: st.unanswered,
            reconnects: st.reconnects,
            connect_seconds: (st.connect_seconds * 1e6).round() / 1e6,
            errors: st.errors.clone(),
            ok,
            interrupted: false,
            cpu: None,
            histogram: st.hist,
        }
    }
}

/// Parses a duration: `10s`, `500ms`, `250us`, `1.5s`, `2m`, `1h`, or a bare
/// number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (try 10s, 500ms, 2m)"))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "ns" => 1e-9,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        u => {
            return Err(format!(
                "unknown unit {u:?} in {s:?} (use ns, us, ms, s, m, h)"
            ));
        }
    };
    let secs = n * scale;
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The live progress line on stderr.
pub(crate) struct ProgressLine {
    enabled: bool,
    tty: bool,
    printed: bool,
    warmup: Duration,
    duration: Option<Duration>,
    connections: u64,
    last: (Duration, u64),
}

impl ProgressLine {
    fn new(cfg: &Config) -> ProgressLine {
        let tty = std::io::stderr().is_terminal();
        ProgressLine {
            enabled: cfg.progress || tty,
            tty,
            printed: false,
            warmup: cfg.warmup,
            duration: cfg.duration,
            connections: cfg.connections,
            last: (Duration::ZERO, 0),
        }
    }

    /// One progress line; `elapsed` is the time since the start, `None`
    /// while connecting.
    pub(crate) fn print(&mut self, s: &Snapshot, elapsed: Option<Duration>) {
        if !self.enabled {
            return;
        }
        let line = match elapsed {
            None => format!(
                "[connect] connected {}/{}  errors {}",
                s.connected, self.connections, s.errors
            ),
            Some(elapsed) => {
                let dt = elapsed.saturating_sub(self.last.0).as_secs_f64();
                let rate = if dt > 0.0 {
                    s.replies.saturating_sub(self.last.1) as f64 / dt
                } else {
                    0.0
                };
                self.last = (elapsed, s.replies);
                // the line covers the second that just ended
                let phase = if elapsed <= self.warmup {
                    "warmup"
                } else if self.duration.is_none_or(|d| elapsed <= self.warmup + d) {
                    "measure"
                } else {
                    "drain/hold"
                };
                format!(
                    "[{:>5.1}s] {phase:<10} {rate:>10.0} req/s  measured {:<10} sent {:<10} open {}/{}  errors {}",
                    elapsed.as_secs_f64(),
                    s.measured,
                    s.sent,
                    s.open,
                    self.connections,
                    s.errors
                )
            }
        };
        let mut err = std::io::stderr().lock();
        let _ = if self.tty {
            write!(err, "\r\x1b[K{line}")
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
        self.printed = true;
    }

    fn finish(&mut self) {
        if self.tty && self.printed {
            let _ = writeln!(std::io::stderr());
        }
    }
}

struct LocalHooks<'a> {
    progress: &'a mut ProgressLine,
    interrupt: Option<&'a AtomicBool>,
    cpu: Option<&'a mut cpu::CpuWatch>,
}

impl engine::Hooks for LocalHooks<'_> {
    fn ready(&mut self, _snap: &Snapshot) -> anyhow::Result<u64> {
        Ok(sys::now_ns() + 1_000_000)
    }

    fn tick(&mut self, snap: &Snapshot, elapsed: Option<Duration>) {
        self.progress.print(snap, elapsed);
    }

    fn should_stop(&mut self) -> bool {
        self.interrupt.is_some_and(|f| f.load(Relaxed))
    }

    fn window(&mut self, open: bool) {
        if let Some(c) = self.cpu.as_deref_mut() {
            c.window(open);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn validation() {
        let base = Config::new("127.0.0.1:1".parse().unwrap());
        base.validate().unwrap();
        let mut c = base.clone();
        c.active = 51;
        assert!(c.validate().is_err());
        let mut c = base.clone();
        c.load = Load::Open { rate: 0.0 };
        assert!(c.validate().is_err());
        let mut c = base.clone();
        c.duration = None;
        assert!(c.validate().is_err());
        c.active = 0;
        c.validate().unwrap();
        let mut c = base.clone();
        c.sources = vec!["::1".parse().unwrap()];
        assert!(c.validate().is_err());
    }

    #[test]
    fn ids_carry_the_connection() {
        let id = make_id(5, 7);
        assert_eq!(id >> ID_SEQ_BITS, 5);
        assert_eq!(id & ((1 << ID_SEQ_BITS) - 1), 7);
        assert_ne!(make_id(1, 0), make_id(0, 1));
    }

    #[test]
    fn config_round_trips_through_json() {
        let mut c = Config::new("127.0.0.1:7878".parse().unwrap());
        c.load = Load::Open { rate: 1234.5 };
        c.sources = vec!["127.0.0.2".parse().unwrap()];
        let back: Config = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }
}
