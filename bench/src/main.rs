//! `halfsync-bench`: the HSP/1 load generator. See the library docs
//! (`cargo doc -p halfsync-bench --open`) for the model; `--help` for flags.
//!
//! Exit status: 0 clean run; 1 the run finished with errors (verification,
//! connection, unanswered requests; the report is still printed); 2 bad
//! arguments, no connection could be made, or the run could not take place
//! (also a second SIGINT or SIGTERM, 200 ms or more after the first: the
//! first stops the run and prints what was measured).

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;

use halfsync_bench::{Config, Load, RunOptions, parse_duration};

/// Load generator for HSP/1 servers (halfsync and anything speaking its
/// protocol): closed or open loop, latency percentiles from an HdrHistogram,
/// every reply verified.
#[derive(Parser, Debug)]
#[command(name = "halfsync-bench", version, about, long_about = None)]
#[command(after_help = "\
Examples:
  halfsync-bench -c 50 --depth 1                       closed loop, 10 s
  halfsync-bench -c 100 --rate 50000 --duration 30s    open loop (wrk2-style latency)
  halfsync-bench -c 10 --depth 16 --requests 1000000 --json
  halfsync-bench --connect-only -c 19000 --active 1000 --rate 20000 --hold 30s
  halfsync-bench -c 60000 --processes 4 --source 127.0.0.2,127.0.0.3,127.0.0.4
  halfsync-bench -c 50 --depth 16 --cpu $(pgrep -n -f '^halfsync: master')   CPU per process

Exit status: 0 clean; 1 errors found (report printed); 2 could not run (bad arguments, or no connection could be made).
Ctrl-C (SIGINT) or SIGTERM stops the run and prints what was measured; a second one ends it at once.")]
struct Cli {
    /// Server address (HOST:PORT).
    #[arg(long, default_value = "127.0.0.1:7878")]
    addr: String,
    /// Connections to open.
    #[arg(short = 'c', long, default_value_t = 50)]
    connections: u64,
    /// Closed loop: requests in flight per connection [default: 1].
    #[arg(short = 'd', long, conflicts_with = "rate")]
    depth: Option<u32>,
    /// Open loop: requests per second in total, on a fixed schedule; latency
    /// is measured from each request's intended send time.
    #[arg(short = 'r', long)]
    rate: Option<f64>,
    /// Request payload bytes.
    #[arg(short = 'p', long, default_value_t = 64)]
    payload: usize,
    /// Send this file's bytes as every request's payload (a real command's
    /// request for a plugin under test), instead of `--payload` generated
    /// bytes; an echo's reply is checked against it.
    #[arg(long, conflicts_with = "payload")]
    payload_file: Option<std::path::PathBuf>,
    /// Request command (1 is echo; its payloads are checked).
    #[arg(long, default_value_t = 1)]
    command: u16,
    /// Unmeasured warmup.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// Measured duration [default: 10s unless --requests].
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Stop after this many measured replies.
    #[arg(short = 'n', long)]
    requests: Option<u64>,
    /// Event-loop threads (per process), each owning a share of the
    /// connections.
    #[arg(short = 't', long, default_value_t = 1)]
    threads: usize,
    /// Local addresses to bind before connecting, round-robin (e.g.
    /// 127.0.0.2,127.0.0.3): each gives another ~28k ephemeral ports.
    #[arg(long, value_delimiter = ',')]
    source: Vec<IpAddr>,
    /// Split the connections (and the rate) over this many child processes
    /// and merge their results (one process may open 20,000 files).
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    json: bool,
    /// With --json: add the latency histogram as `latency_histogram`,
    /// `[value_us, count]` pairs (to pool several runs' percentiles).
    #[arg(long, requires = "json")]
    histogram: bool,
    /// Do not verify replies: neither ids, nor echo payloads (command 1),
    /// nor statuses; every reply then counts as a success.
    #[arg(long)]
    no_verify: bool,
    /// Non-zero reply statuses that are not errors (comma-separated);
    /// any other non-zero status fails the run.
    #[arg(long, value_delimiter = ',', conflicts_with = "no_verify")]
    allow_status: Vec<u16>,
    /// Open the connections; only --active of them (default none) send.
    #[arg(long)]
    connect_only: bool,
    /// Connections that carry traffic (spread evenly); the others stay idle.
    #[arg(long)]
    active: Option<u64>,
    /// Keep the connections open at least this long from the start.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    hold: Duration,
    /// Connection churn (closed loop): each connection sends this many
    /// requests, waits for the replies, closes and connects again.
    #[arg(long, default_value_t = 0)]
    per_connection: u64,
    /// Connect timeout per connection.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    connect_timeout: Duration,
    /// A request unanswered this long drops its connection (counted as a
    /// timeout error); 0 disables.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    timeout: Duration,
    /// After measuring, wait at most this long for outstanding replies
    /// (open loop: those of requests due in the window are still measured).
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    drain: Duration,
    /// Print a progress line every second even when stderr is not a terminal.
    #[arg(long)]
    progress: bool,
    /// Also report the CPU time per request (user and system) of these
    /// processes and all their descendants over the measured window, and
    /// of this generator: give the halfsync master's pid for the proxy and
    /// every worker (Linux /proc, so the server must run on this host; not
    /// with --processes).
    #[arg(long, value_delimiter = ',', value_name = "PID")]
    cpu: Vec<u32>,
}

fn config(cli: &Cli) -> anyhow::Result<Config> {
    let addr: SocketAddr = cli
        .addr
        .to_socket_addrs()
        .with_context(|| format!("resolving --addr {}", cli.addr))?
        .next()
        .with_context(|| format!("--addr {} resolves to nothing", cli.addr))?;
    let mut cfg = Config::new(addr);
    cfg.connections = cli.connections;
    cfg.active = match (cli.active, cli.connect_only) {
        (Some(a), _) => a,
        (None, true) => 0,
        (None, false) => cli.connections,
    };
    cfg.load = match (cli.rate, cli.depth) {
        (Some(rate), _) => Load::Open { rate },
        (None, d) => Load::Closed {
            depth: d.unwrap_or(1),
        },
    };
    cfg.payload = cli.payload;
    if let Some(path) = &cli.payload_file {
        let data =
            std::fs::read(path).with_context(|| format!("--payload-file {}", path.display()))?;
        cfg.payload = data.len();
        cfg.payload_data = Some(data);
    }
    cfg.command = cli.command;
    cfg.warmup = cli.warmup;
    cfg.requests = cli.requests;
    cfg.duration = match (cli.duration, cli.requests) {
        (Some(d), _) => Some(d),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(10)),
    };
    cfg.threads = cli.threads;
    cfg.sources = cli.source.clone();
    cfg.verify = !cli.no_verify;
    cfg.allow_status = cli.allow_status.clone();
    cfg.hold = cli.hold;
    cfg.per_connection = cli.per_connection;
    cfg.connect_timeout = cli.connect_timeout;
    cfg.timeout = cli.timeout;
    cfg.drain = cli.drain;
    cfg.progress = cli.progress;
    if cli.processes == 0 {
        bail!("--processes must be at least 1");
    }
    cfg.validate()?;
    Ok(cfg)
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--child") {
        return match halfsync_bench::child_main() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("halfsync-bench (child): {e:#}");
                ExitCode::from(2)
            }
        };
    }
    let cli = Cli::parse();
    let cfg = match config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("halfsync-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    // SIGINT or SIGTERM: stop and report what was measured. Another one
    // at least 200 ms later ends the process at once (exit status 2);
    // closer ones are the same signal delivered twice, as `timeout -s INT`
    // does (to the process, then to its process group).
    let interrupt = Arc::new(AtomicBool::new(false));
    match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ]) {
        Ok(mut signals) => {
            let flag = interrupt.clone();
            std::thread::spawn(move || {
                let mut first: Option<Instant> = None;
                for _ in signals.forever() {
                    match first {
                        None => {
                            first = Some(Instant::now());
                            flag.store(true, Ordering::Relaxed);
                        }
                        Some(t) if t.elapsed() >= Duration::from_millis(200) => {
                            std::process::exit(2)
                        }
                        Some(_) => {}
                    }
                }
            });
        }
        Err(e) => eprintln!(
            "halfsync-bench: cannot handle SIGINT/SIGTERM ({e}): they will end the run without a report"
        ),
    }
    let opts = RunOptions {
        processes: cli.processes,
        exe: None,
        interrupt: Some(interrupt),
        cpu: cli.cpu.clone(),
    };
    let report = match halfsync_bench::run_with(&cfg, &opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("halfsync-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    if !cli.cpu.is_empty() && report.cpu.is_none() {
        // Stopped before the warm-up ended: no measured window to split.
        eprintln!(
            "halfsync-bench: --cpu: no CPU figures, the run stopped during the warm-up (before the measured window opened)"
        );
    }
    if cli.json {
        let mut json = serde_json::to_value(&report).expect("report serializes");
        if cli.histogram {
            let pairs: Vec<[u64; 2]> =
                halfsync_bench::stats::histogram_pairs(&report.histogram).collect();
            json["latency_histogram"] = serde_json::json!(pairs);
        }
        println!("{json}");
    } else {
        println!("{report}");
    }
    if report.ok {
        ExitCode::SUCCESS
    } else if report.connected == 0 {
        // Nothing to measure: the run could not take place.
        eprintln!(
            "halfsync-bench: no connection to {} could be established; is the server running there?",
            cli.addr
        );
        ExitCode::from(2)
    } else {
        ExitCode::from(1)
    }
}
