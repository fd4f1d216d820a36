//! End-to-end tests of the load generator against an in-test HSP/1 server.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use halfsync_bench::{Config, Load, Report, RunOptions};
use support::{Mode, Server, dead_port};

const EXE: &str = env!("CARGO_BIN_EXE_halfsync-bench");

fn cfg(server: &Server) -> Config {
    let mut c = Config::new(server.addr);
    c.connections = 4;
    c.active = 4;
    c.load = Load::Closed { depth: 4 };
    c.warmup = Duration::ZERO;
    c.duration = None;
    c.requests = Some(2000);
    c.timeout = Duration::from_secs(10);
    c.drain = Duration::from_secs(2);
    c
}

fn run(c: &Config) -> Report {
    let t = Instant::now();
    let r = halfsync_bench::run(c).expect("run");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "run took {:?}",
        t.elapsed()
    );
    r
}

fn assert_clean(r: &Report) {
    assert!(r.ok, "expected a clean run:\n{r}");
    assert_eq!(r.verify_errors, 0, "{r}");
    assert_eq!(r.conn_errors.total(), 0, "{r}");
    assert_eq!(r.unanswered, 0, "{r}");
    assert_eq!(r.replies, r.sent, "{r}");
}

#[test]
fn closed_loop_measures_exactly_the_requested_count() {
    let s = Server::start(Mode::Echo);
    let r = run(&cfg(&s));
    assert_clean(&r);
    assert_eq!(r.requests, 2000);
    assert_eq!(r.status.ok, 2000);
    assert_eq!(r.status.total(), 2000);
    assert_eq!(r.histogram.len(), 2000);
    // depth 4 on 4 connections: at most 16 more sent than measured
    assert!(r.sent >= 2000 && r.sent <= 2016, "sent {}", r.sent);
    assert_eq!(r.connected, 4);
    assert_eq!(r.mode, "closed");
    assert!(r.rps > 0.0 && r.seconds > 0.0);
    assert!(r.latency_us.p50 <= r.latency_us.p99 && r.latency_us.p99 <= r.latency_us.max);
}

#[test]
fn closed_loop_for_a_duration_on_two_threads() {
    let s = Server::start(Mode::Echo);
    let mut c = cfg(&s);
    c.requests = None;
    c.connections = 6;
    c.active = 6;
    c.threads = 2;
    c.payload = 300;
    c.warmup = Duration::from_millis(200);
    c.duration = Some(Duration::from_millis(500));
    let r = run(&c);
    assert_clean(&r);
    assert!(r.requests > 100, "{r}");
    assert!((r.seconds - 0.5).abs() < 0.01, "seconds {}", r.seconds);
    // warmup replies were received but not measured
    assert!(r.replies > r.requests, "{r}");
    assert_eq!(s.frames.load(std::sync::atomic::Ordering::SeqCst), r.sent);
}

/// `--per-connection`: every connection closes after its requests are
/// answered and connects again; each reconnect is a new accept.
#[test]
fn per_connection_churns_connections_without_losing_a_request() {
    let s = Server::start(Mode::Echo);
    let mut c = cfg(&s);
    c.load = Load::Closed { depth: 3 };
    c.per_connection = 10;
    let r = run(&c);
    assert_clean(&r);
    assert_eq!(r.requests, 2000);
    assert_eq!(r.connected, 4);
    // 2000 measured requests at 10 per connection: ~200 reconnects.
    assert!((190..=210).contains(&r.reconnects), "{r}");
    let accepted = s.accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(accepted >= 4 + r.reconnects, "accepted {accepted}: {r}");
    assert!(r.to_string().contains("reconnects"), "{r}");

    let mut open = cfg(&s);
    open.load = Load::Open { rate: 1000.0 };
    open.per_connection = 10;
    let e = open.validate().unwrap_err().to_string();
    assert!(e.contains("--per-connection needs the closed loop"), "{e}");
}

#[test]
fn open_loop_follows_the_schedule() {
    let s = Server::start(Mode::Echo);
    let mut c = cfg(&s);
    c.requests = None;
    c.load = Load::Open { rate: 2000.0 };
    c.warmup = Duration::from_millis(250);
    c.duration = Some(Duration::from_secs(1));
    let r = run(&c);
    assert_clean(&r);
    // 2000 due in the measured second, give or take those in flight at its edges
    assert!((1900..=2100).contains(&r.requests), "{r}");
    // 0.25 s + 1 s of schedule
    assert!((2450..=2550).contains(&r.sent), "{r}");
    assert_eq!(r.rate, Some(2000.0));
    assert_eq!(r.depth, None);
    assert!(r.latency_us.p50 < 20_000, "{r}");
    let lag = r.send_lag_us.as_ref().expect("open loop reports send lag");
    assert!(lag.p50 < 5_000, "{r}");
}

/// One connection, open loop at 1,000 req/s for `ms`, no warm-up.
fn open_loop_1000(s: &Server, ms: u64) -> Config {
    let mut c = cfg(s);
    c.connections = 1;
    c.active = 1;
    c.requests = None;
    c.load = Load::Open { rate: 1000.0 };
    c.warmup = Duration::ZERO;
    c.duration = Some(Duration::from_millis(ms));
    c
}

#[test]
fn open_loop_latency_includes_the_time_a_stall_delayed_sending() {
    // One connection stalls for 300 ms a third of the way in. Open loop: every
    // request due during the stall is late by up to 300 ms, and that shows.
    let s = Server::start(Mode::StallOnce { at: 400, ms: 300 });
    let r = run(&open_loop_1000(&s, 1200));
    assert_clean(&r);
    assert!(r.latency_us.max >= 290_000, "{r}");
    assert!(r.latency_us.p90 >= 50_000, "{r}");
    // Closed loop, depth 1: the same stall is one slow request.
    let s = Server::start(Mode::StallOnce { at: 400, ms: 300 });
    let mut c = cfg(&s);
    c.connections = 1;
    c.active = 1;
    c.load = Load::Closed { depth: 1 };
    c.requests = Some(1200);
    let r = run(&c);
    assert_clean(&r);
    assert!(r.latency_us.max >= 290_000, "{r}");
    assert!(r.latency_us.p99 < 50_000, "{r}");
}

/// Coordinated omission, from the generator's side: when the generator
/// itself is held up (here stopped with SIGSTOP for 300 ms), the requests
/// due meanwhile go out late, and their latency counts from when they were
/// due, not from when they were sent. (Timing from the actual send would
/// give them the server's sub-millisecond latency, and the p90 and max
/// below would stay small.)
#[test]
fn open_loop_latency_counts_from_the_due_time_when_the_generator_stalls() {
    let r = open_loop_with_generator_stopped("1500ms", 500, 300);
    // ~300 of ~1,500 requests were due during the stop, late by 0-300 ms.
    let lat = &r["latency_us"];
    assert!(lat["max"].as_u64() >= Some(250_000), "{r}");
    assert!(lat["p90"].as_u64() >= Some(50_000), "{r}");
    assert!(lat["p50"].as_u64() < Some(50_000), "{r}");
    // The send lag says the delay was the generator's own.
    assert!(r["send_lag_us"]["max"].as_u64() >= Some(250_000), "{r}");
}

/// Open loop: a request due inside the window is measured even when its
/// reply comes after the window closed, so a stall at the very end of a
/// run is not cut off. (Measuring by reply time, the requests due in the
/// last 100 ms, answered after the 300 ms stall, would all be dropped.)
#[test]
fn open_loop_measures_a_stall_at_the_end_of_the_window() {
    let s = Server::start(Mode::StallOnce { at: 900, ms: 300 });
    let r = run(&open_loop_1000(&s, 1000));
    assert_clean(&r);
    assert!(r.latency_us.max >= 250_000, "{r}");
    // Every request due in the window was measured, the late ones too.
    assert!((950..=1050).contains(&r.requests), "{r}");
}

/// `--command`: every request carries it; replies to commands other than
/// 1 (echo) are checked for their id and status but not their payload
/// (the generator cannot know what another command answers).
#[test]
fn other_commands_are_sent_and_their_payloads_not_checked() {
    let s = Server::start(Mode::CorruptPayload(50));
    let mut c = cfg(&s);
    c.command = 7;
    let r = run(&c);
    assert_clean(&r);
    assert_eq!(r.requests, 2000);
    assert_eq!(s.commands.load(std::sync::atomic::Ordering::SeqCst), 1 << 7);
    // The same server and load with echo: the corrupt payloads are caught.
    let r = run(&cfg(&s));
    assert!(r.verify.payload >= 30, "{r}");
    assert_eq!(
        s.commands.load(std::sync::atomic::Ordering::SeqCst),
        (1 << 7) | (1 << 1)
    );
}

/// `--payload-file`: every request carries the file's bytes (a real
/// command's request), and an echo's reply is checked against them.
#[test]
fn a_payload_file_is_sent_as_every_request_and_checked() {
    let dir = std::env::temp_dir().join(format!("halfsync-bench-payload-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(dir.clone());
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("request.json");
    std::fs::write(&file, br#"{"cmd":"get","player":42}"#).unwrap();
    let s = Server::start(Mode::Echo);
    let addr = s.addr.to_string();
    let args = [
        "--addr", &addr, "-c", "2", "-n", "200", "--warmup", "0s", "--json",
    ];
    let payload = ["--payload-file", file.to_str().unwrap()];
    let (code, out, err) = cli(&[&args[..], &payload[..]].concat());
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["verify_errors"], 0, "{out}");
    assert_eq!(v["requests"], 200, "{out}");
    // Echoed wrong, it is caught.
    let bad = Server::start(Mode::CorruptPayload(10));
    let addr = bad.addr.to_string();
    let args = [
        "--addr", &addr, "-c", "2", "-n", "200", "--warmup", "0s", "--json",
    ];
    let (code, out, _) = cli(&[&args[..], &payload[..]].concat());
    assert_ne!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["verify"]["payload"].as_u64() >= Some(10), "{out}");
    // A file that is not there is named.
    let (code, _, err) = cli(&["--addr", &addr, "--payload-file", "/nonexistent/x"]);
    assert_ne!(code, 0);
    assert!(err.contains("--payload-file /nonexistent/x"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Open loop, the generator itself held up across the end of the window
/// (SIGSTOP from 800 to 1,200 ms of a 1 s window): the requests due in
/// its last 200 ms are still sent, late, and measured from when they were
/// due; none is silently skipped.
#[test]
fn open_loop_sends_and_measures_what_was_due_when_the_window_closed() {
    let r = open_loop_with_generator_stopped("1s", 800, 400);
    // All ~1,000 requests of the window, the ~200 late ones included.
    let n = r["requests"].as_u64().unwrap();
    assert!((950..=1050).contains(&n), "{r}");
    assert_eq!(r["unanswered"].as_u64(), Some(0), "{r}");
    let lat = &r["latency_us"];
    assert!(lat["max"].as_u64() >= Some(300_000), "{r}");
    assert!(lat["p90"].as_u64() >= Some(100_000), "{r}");
}

#[test]
fn corrupt_payloads_are_caught() {
    let s = Server::start(Mode::CorruptPayload(50));
    let r = run(&cfg(&s));
    assert!(!r.ok);
    assert!(r.verify.payload >= 30, "{r}");
    assert_eq!(r.verify.unknown_id, 0);
    assert_eq!(r.verify_errors, r.verify.payload);
    assert!(
        r.errors.iter().any(|e| e.contains("payload")),
        "{:?}",
        r.errors
    );
    assert_eq!(r.requests, 2000, "errors are counted, not fatal");
}

#[test]
fn corrupt_and_duplicate_ids_are_caught() {
    // A reply with a wrong id leaves its request unanswered, holding one of
    // the connection's `depth` slots; after 4 of them a connection stalls
    // until the reply timeout drops it.
    let s = Server::start(Mode::CorruptId(100));
    let mut c = cfg(&s);
    c.timeout = Duration::from_millis(300);
    let r = run(&c);
    assert!(!r.ok);
    assert_eq!(r.verify.unknown_id, 16, "{r}");
    assert_eq!(r.unanswered, 16, "{r}");
    assert_eq!(r.conn_errors.timeout, 4, "{r}");
    assert!(
        r.errors.iter().any(|e| e.starts_with("unknown id: ")),
        "{:?}",
        r.errors
    );

    let s = Server::start(Mode::Duplicate(100));
    let r = run(&cfg(&s));
    assert!(!r.ok);
    assert!(r.verify.unknown_id >= 15, "{r}");
    assert_eq!(r.verify.payload, 0);
}

#[test]
fn statuses_are_counted_and_checked() {
    let s = Server::start(Mode::Status(2));
    let mut c = cfg(&s);
    c.requests = Some(500);
    let r = run(&c);
    assert!(!r.ok);
    assert_eq!(r.status.busy, 500);
    assert!(r.verify.status >= 500, "{r}");
    c.allow_status = vec![2];
    let r = run(&c);
    assert_clean(&r);
    assert_eq!(r.status.busy, 500);
    // plugin codes land in "other"; --no-verify accepts anything
    let s = Server::start(Mode::Status(150));
    let mut c = cfg(&s);
    c.requests = Some(300);
    c.verify = false;
    let r = run(&c);
    assert_clean(&r);
    assert_eq!(r.status.other, 300);
    assert_eq!(r.status.other_codes, [(150, 300)].into());
    // From the command line: a plugin's status counted by code, failing
    // the run unless allowed, and --allow-status refused with --no-verify
    // (which would ignore it).
    let addr = s.addr.to_string();
    let args = ["--addr", &addr, "-c", "1", "-n", "100", "--warmup", "0s"];
    let (code, out, err) = cli(&args);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("other 100 (150: 100)"), "{out}");
    let (code, out, err) = cli(&[&args[..], &["--allow-status", "150"]].concat());
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = cli(&[&args[..], &["--allow-status", "150", "--no-verify"]].concat());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot be used with '--no-verify'"), "{err}");
}

#[test]
fn connection_errors_by_kind() {
    // refused
    let mut c = Config::new(dead_port());
    c.connections = 3;
    c.active = 3;
    c.requests = Some(10);
    c.duration = None;
    let r = run(&c);
    assert!(!r.ok);
    assert_eq!(r.conn_errors.refused, 3, "{r}");
    assert_eq!(r.connected, 0);

    // closed by the server mid-run
    let s = Server::start(Mode::CloseAfter(100));
    let mut c = cfg(&s);
    c.requests = None;
    c.duration = Some(Duration::from_millis(500));
    let r = run(&c);
    assert!(!r.ok);
    // FIN, or RST if the server closed with requests unread
    assert_eq!(r.conn_errors.closed + r.conn_errors.reset, 4, "{r}");
    assert!(r.unanswered > 0);

    // a server that never answers: timeout
    let s = Server::start(Mode::Silent);
    let mut c = cfg(&s);
    c.requests = None;
    c.duration = Some(Duration::from_secs(3));
    c.timeout = Duration::from_millis(300);
    let t = Instant::now();
    let r = run(&c);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "all connections dead, so it ends early"
    );
    assert!(!r.ok);
    assert_eq!(r.conn_errors.timeout, 4, "{r}");
    assert_eq!(r.requests, 0);
    assert_eq!(r.unanswered, 16);
}

#[test]
fn connect_only_with_a_few_active() {
    let s = Server::start(Mode::Echo);
    let mut c = cfg(&s);
    c.connections = 40;
    c.active = 4;
    c.load = Load::Closed { depth: 2 };
    c.requests = None;
    c.duration = Some(Duration::from_millis(300));
    c.hold = Duration::from_millis(700);
    let t = Instant::now();
    let r = run(&c);
    assert!(t.elapsed() >= Duration::from_millis(700), "held");
    assert_clean(&r);
    assert_eq!(r.connected, 40);
    assert_eq!(r.active, 4);
    assert_eq!(s.accepted.load(std::sync::atomic::Ordering::SeqCst), 40);
    assert!(r.requests > 0);

    // no traffic at all
    let s = Server::start(Mode::Echo);
    let mut c = cfg(&s);
    c.connections = 25;
    c.active = 0;
    c.requests = None;
    c.duration = None;
    c.hold = Duration::from_millis(200);
    let r = run(&c);
    assert_clean(&r);
    assert_eq!(
        (r.mode, r.requests, r.sent, r.connected),
        ("idle", 0, 0, 25)
    );
}

#[test]
fn source_addresses_are_used_round_robin() {
    let s = Server::start(Mode::Echo);
    let mut c = cfg(&s);
    c.connections = 4;
    c.sources = vec!["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()];
    c.requests = Some(100);
    let r = run(&c);
    assert_clean(&r);
    let mut peers: Vec<String> = s
        .peers
        .lock()
        .unwrap()
        .iter()
        .map(|p| p.to_string())
        .collect();
    peers.sort();
    assert_eq!(peers, ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"]);
}

#[test]
fn two_processes_merge_exactly() {
    let s = Server::start(Mode::Echo);
    let mut c = cfg(&s);
    c.connections = 6;
    c.active = 6;
    c.requests = Some(3001);
    let opts = RunOptions {
        processes: 2,
        exe: Some(EXE.into()),
        interrupt: None,
        ..Default::default()
    };
    let r = halfsync_bench::run_with(&c, &opts).unwrap();
    assert_clean(&r);
    assert_eq!(r.processes, 2);
    assert_eq!(r.requests, 3001);
    assert_eq!(r.histogram.len(), 3001);
    assert_eq!(r.status.ok, 3001);
    assert_eq!(r.connected, 6);
    assert_eq!(s.accepted.load(std::sync::atomic::Ordering::SeqCst), 6);

    // open loop: the two halves make one schedule
    let mut c = cfg(&s);
    c.requests = None;
    c.load = Load::Open { rate: 1000.0 };
    c.warmup = Duration::from_millis(200);
    c.duration = Some(Duration::from_secs(1));
    let r = halfsync_bench::run_with(&c, &opts).unwrap();
    assert_clean(&r);
    assert!((950..=1050).contains(&r.requests), "{r}");
    assert!((1180..=1220).contains(&r.sent), "{r}");

    // verification errors from both children add up
    let s = Server::start(Mode::CorruptPayload(10));
    let mut c = cfg(&s);
    c.requests = Some(1000);
    let r = halfsync_bench::run_with(&c, &opts).unwrap();
    assert!(!r.ok);
    assert!(r.verify.payload >= 90, "{r}");
}

fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(EXE).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_json_schema_and_exit_codes() {
    let s = Server::start(Mode::Echo);
    let addr = s.addr.to_string();
    let (code, out, err) = cli(&[
        "--addr",
        &addr,
        "-c",
        "3",
        "--depth",
        "2",
        "--requests",
        "600",
        "--warmup",
        "0",
        "--json",
        "--processes",
        "2",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for k in [
        "requests",
        "seconds",
        "rps",
        "latency_us",
        "status",
        "conn_errors",
        "verify_errors",
        "connections",
        "depth",
        "payload",
    ] {
        assert!(v.get(k).is_some(), "missing {k} in {v}");
    }
    for k in ["p50", "p90", "p99", "p999", "max", "mean"] {
        assert!(v["latency_us"].get(k).is_some(), "missing latency_us.{k}");
    }
    for k in ["refused", "reset", "closed", "timeout", "other"] {
        assert_eq!(v["conn_errors"][k], 0);
    }
    assert_eq!(v["requests"], 600);
    assert_eq!(v["status"]["OK"], 600);
    assert_eq!(v["status"]["BUSY"], 0);
    assert_eq!(v["depth"], 2);
    assert!(v.get("rate").is_none());
    assert_eq!(v["payload"], 64);
    assert_eq!(v["ok"], true);
    assert!(v.get("latency_histogram").is_none());

    // --histogram: the merged latency histogram of both processes, whose
    // counts are the measured replies and whose values span p50..max.
    let (code, out, err) = cli(&[
        "--addr",
        &addr,
        "-c",
        "3",
        "-n",
        "500",
        "--warmup",
        "0",
        "--json",
        "--histogram",
        "--processes",
        "2",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let pairs = v["latency_histogram"]
        .as_array()
        .expect("latency_histogram");
    let count: u64 = pairs.iter().map(|p| p[1].as_u64().unwrap()).sum();
    assert_eq!(count, v["requests"].as_u64().unwrap());
    let values: Vec<u64> = pairs.iter().map(|p| p[0].as_u64().unwrap()).collect();
    assert!(values.windows(2).all(|w| w[0] < w[1]), "{values:?}");
    let max = v["latency_us"]["max"].as_u64().unwrap();
    assert!(values[0] <= v["latency_us"]["p50"].as_u64().unwrap());
    assert!(
        *values.last().unwrap() >= max * 999 / 1000,
        "{values:?} max {max}"
    );

    let (code, out, _) = cli(&[
        "--addr",
        &addr,
        "-c",
        "2",
        "--rate",
        "500",
        "--warmup",
        "0",
        "--duration",
        "400ms",
        "--json",
    ]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["rate"], 500.0);
    assert!(v.get("depth").is_none());

    // text report
    let (code, out, _) = cli(&["--addr", &addr, "-c", "2", "-n", "100", "--warmup", "0"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("requests     100 in"), "{out}");
    assert!(out.contains("result       OK"), "{out}");

    // a wrong server fails the run
    let bad = Server::start(Mode::CorruptPayload(7));
    let (code, out, _) = cli(&[
        "--addr",
        &bad.addr.to_string(),
        "-c",
        "2",
        "-n",
        "200",
        "--warmup",
        "0",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("result       FAILED"), "{out}");

    // nothing listening: the report shows the refusals, exit 2
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap().to_string();
    drop(closed);
    let (code, out, err) = cli(&[
        "--addr",
        &dead,
        "-c",
        "2",
        "--duration",
        "300ms",
        "--warmup",
        "0",
    ]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("no connection to") && err.contains(&dead),
        "{err}"
    );
    assert!(
        out.contains("latency      - (no measured replies)"),
        "{out}"
    );
    assert!(out.contains("refused 2"), "{out}");

    // usage errors
    let (code, _, err) = cli(&["--depth", "2", "--rate", "5"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = cli(&["--addr", &addr, "-c", "2", "--active", "3"]);
    assert_eq!(code, 2);
    assert!(err.contains("--active"), "{err}");
}

#[test]
fn progress_lines_when_asked() {
    let s = Server::start(Mode::Echo);
    let (code, out, err) = cli(&[
        "--addr",
        &s.addr.to_string(),
        "-c",
        "2",
        "--warmup",
        "0",
        "--duration",
        "1500ms",
        "--progress",
        "--json",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("req/s") && err.contains("measure"), "{err}");
}

#[test]
fn an_interrupt_ends_the_run_with_what_was_measured() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    let s = Server::start(Mode::Echo);
    let mut c = cfg(&s);
    c.requests = None;
    c.duration = Some(Duration::from_secs(30));
    c.hold = Duration::from_secs(60);
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        f.store(true, SeqCst);
    });
    let t = Instant::now();
    let opts = RunOptions {
        processes: 1,
        exe: None,
        interrupt: Some(flag),
        ..Default::default()
    };
    let r = halfsync_bench::run_with(&c, &opts).unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_clean(&r);
    assert!(r.requests > 0);
    assert!(r.seconds > 0.2 && r.seconds < 2.0, "{r}");
}

#[test]
fn replies_longer_than_a_read_or_split_over_reads_arrive_whole() {
    // The generator stops reading a socket at a read that does not fill
    // its buffer. A reply longer than the buffer (4 KiB here, 16 KiB
    // replies, one in flight so the server is silent after each) must
    // still be read to its end: no later data would raise another event.
    let s = Server::start(Mode::Echo);
    let mut c = cfg(&s);
    c.connections = 2;
    c.active = 2;
    c.load = Load::Closed { depth: 1 };
    c.payload = 16 << 10;
    c.read_buffer = 4096;
    c.requests = Some(40);
    c.timeout = Duration::from_secs(5);
    let r = run(&c);
    assert_clean(&r);
    assert_eq!(r.requests, 40, "{r}");

    // A reply whose rest comes 5 ms later (split inside its header).
    let s = Server::start(Mode::Split { ms: 5 });
    let mut c = cfg(&s);
    c.connections = 2;
    c.active = 2;
    c.load = Load::Closed { depth: 1 };
    c.requests = Some(40);
    c.timeout = Duration::from_secs(5);
    let r = run(&c);
    assert_clean(&r);
    assert_eq!(r.requests, 40, "{r}");
}

#[test]
fn a_bad_request_reply_is_read_before_the_close() {
    // The server answers BAD_REQUEST and closes: both are reported.
    let s = Server::start(Mode::BadRequest);
    let mut c = cfg(&s);
    c.connections = 2;
    c.active = 2;
    c.load = Load::Closed { depth: 1 };
    c.requests = Some(10);
    let r = run(&c);
    assert!(!r.ok);
    assert_eq!(r.status.bad_request, 2, "{r}");
    assert_eq!(r.verify.status, 2, "{r}");
    assert_eq!(r.conn_errors.closed + r.conn_errors.reset, 2, "{r}");
    // a request sent after the reply and before the close was seen is lost
    assert!(r.unanswered <= 2, "{r}");
}

/// SIGINT delivered twice at once (as `timeout -s INT` does: to the
/// process and to its group) stops the run with its report, like one.
#[test]
fn a_doubled_interrupt_still_reports() {
    let s = Server::start(Mode::Echo);
    let mut child = Command::new(EXE)
        .args(["--addr", &s.addr.to_string(), "-c", "2", "--warmup", "0s"])
        .args(["--duration", "30s", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Running (both connections accepted, so its handler is installed),
    // then a little more.
    wait_accepted(&s, 2, &mut child);
    std::thread::sleep(Duration::from_millis(200));
    // Two deliveries 20 ms apart (back to back, the kernel would merge
    // them into one).
    for _ in 0..2 {
        // SAFETY: kill(2) on the child this test started; no memory passed.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = wait_output(child, "still running 10 s after SIGINT");
    assert_eq!(out.status.code(), Some(0));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["requests"].as_u64() > Some(0), "{r}");
    assert!(r["seconds"].as_f64().is_some_and(|x| x < 5.0), "{r}");
    // The report says it was cut short.
    assert_eq!(r["interrupted"], true, "{r}");
}

/// A --source address that is not this machine's gets a hint naming it,
/// not "out of local ports".
#[test]
fn a_foreign_source_address_is_named_in_the_error() {
    let s = Server::start(Mode::Echo);
    let mut c = cfg(&s);
    c.connections = 1;
    c.active = 1;
    c.sources = vec!["192.0.2.1".parse().unwrap()];
    c.connect_timeout = Duration::from_secs(2);
    let r = run(&c);
    assert!(!r.ok);
    assert!(
        r.errors
            .iter()
            .any(|e| e.contains("is --source 192.0.2.1 one of this machine's addresses")),
        "{:?}",
        r.errors
    );
}

/// `--cpu` on a run interrupted during its warm-up: no window was
/// measured, so there is no CPU section, and stderr says why instead of
/// leaving it out silently.
#[test]
fn cpu_interrupted_in_the_warmup_says_so() {
    let s = Server::start(Mode::Echo);
    let me = std::process::id().to_string();
    let mut child = Command::new(EXE)
        .args(["--addr", &s.addr.to_string(), "-c", "2", "--warmup", "30s"])
        .args(["--duration", "1s", "--cpu", &me])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_accepted(&s, 2, &mut child);
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: kill(2) on the child this test started; no memory passed.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let out = wait_output(child, "still running 10 s after SIGINT");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stdout.contains("cpu  "), "{stdout}");
    assert!(
        stderr.contains("--cpu: no CPU figures, the run stopped during the warm-up"),
        "{stderr}"
    );
}

/// An open-loop run of the generator binary (1 connection, 1,000 req/s,
/// no warm-up, `duration`) against an echo server, the generator itself
/// stopped with SIGSTOP `at_ms` into it for `for_ms`; its JSON report.
fn open_loop_with_generator_stopped(duration: &str, at_ms: u64, for_ms: u64) -> serde_json::Value {
    let s = Server::start(Mode::Echo);
    let mut child = Command::new(EXE)
        .args(["--addr", &s.addr.to_string(), "-c", "1", "--rate", "1000"])
        .args(["--warmup", "0s", "--duration", duration, "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    // Timed from the run's first request, not from the spawn (a slow exec
    // would otherwise move the stop before the run).
    let t = Instant::now();
    while s.frames.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        if t.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the generator sent nothing in 10 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(at_ms));
    // SAFETY: kill(2) on the child this test started; no memory passed.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_millis(for_ms));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let out = wait_output(child, "still running 10 s after SIGCONT");
    assert_eq!(out.status.code(), Some(0));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits (at most 10 s) until the test server accepted `n` connections:
/// the generator runs, its signal handlers installed.
fn wait_accepted(s: &Server, n: u64, child: &mut std::process::Child) {
    let t = Instant::now();
    while s.accepted.load(std::sync::atomic::Ordering::SeqCst) < n as _ {
        if t.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the generator never connected");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits (at most 10 s, in 20 ms polls) for a generator the test started
/// and returns its output; kills it and fails with `late` if it is still
/// running by then.
fn wait_output(mut child: std::process::Child, late: &str) -> std::process::Output {
    let t = Instant::now();
    loop {
        if let Some(_status) = child.try_wait().unwrap() {
            return child.wait_with_output().unwrap();
        }
        if t.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{late}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills a process group when dropped (the test's CPU burners), even if
/// the test fails.
struct KillGroup(std::process::Child);

impl Drop for KillGroup {
    fn drop(&mut self) {
        let pgid = self.0.id() as libc::pid_t;
        // SAFETY: kill(2) with a negative pid signals the group this test
        // created (`process_group(0)` below); no memory is passed.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// `--cpu`: the given process and its descendants, each with its CPU per
/// request and share of a CPU over the measured window; processes that
/// exit during it (like recycled workers) in a row of their own, from
/// their parent's count of its reaped children; and the generator.
#[test]
fn cpu_split_of_a_process_tree() {
    use std::os::unix::process::CommandExt;
    let s = Server::start(Mode::Echo);
    // A shell that starts a burning child (`burn &`, ~20 s of CPU at most)
    // and then runs short-lived burning children one after another (~0.2 s
    // of CPU each), in a process group of its own for `KillGroup`.
    let script = "burn() { i=0; while [ $i -lt 12000000 ]; do i=$((i+1)); done; }; burn & \
                  k=0; while [ $k -lt 100 ]; do \
                  sh -c 'j=0; while [ $j -lt 100000 ]; do j=$((j+1)); done'; k=$((k+1)); done; wait";
    let burners = KillGroup(
        Command::new("sh")
            .args(["-c", script])
            .process_group(0)
            .spawn()
            .unwrap(),
    );
    let root = burners.0.id();
    let mut c = cfg(&s);
    c.warmup = Duration::from_millis(300);
    c.requests = None;
    c.duration = Some(Duration::from_millis(1500));
    let opts = RunOptions {
        cpu: vec![root],
        ..Default::default()
    };
    let r = halfsync_bench::run_with(&c, &opts).unwrap();
    drop(burners);
    assert_clean(&r);
    let cpu = r.cpu.clone().expect("a cpu report");
    assert!((cpu.seconds - 1.5).abs() < 0.1, "{r}");
    assert!(cpu.missing.is_empty(), "{r}");
    // The root shell, its long-lived burner, perhaps one short-lived child.
    assert!(cpu.processes.iter().any(|p| p.pid == root), "{r}");
    assert!((2..=3).contains(&cpu.processes.len()), "{r}");
    let burner = cpu
        .processes
        .iter()
        .filter(|p| p.pid != root && p.cpu_share > 0.1 && p.user_us > 0.0)
        .count();
    assert!(burner >= 1, "{r}");
    for p in &cpu.processes {
        // A short-lived child may end between being sampled and named, or
        // be named in the middle of its exec (plain `sh`).
        assert!(p.name.starts_with("sh") || p.name == "(gone)", "{r}");
        // Only the window counts: nobody is above one CPU.
        assert!(p.cpu_share <= 1.05, "{r}");
    }
    let exited = cpu.exited.as_ref().expect("children exited in the window");
    assert!(exited.cpu_share > 0.05 && exited.cpu_share <= 1.05, "{r}");
    let sum: f64 = cpu
        .processes
        .iter()
        .map(|p| p.user_us + p.sys_us)
        .sum::<f64>()
        + exited.user_us
        + exited.sys_us;
    assert!(
        (cpu.total.user_us + cpu.total.sys_us - sum).abs() < 1e-6,
        "{r}"
    );
    let me = cpu.generator.as_ref().expect("the generator's row");
    assert_eq!(
        (me.pid, me.name.as_str()),
        (std::process::id(), "halfsync-bench")
    );
    assert!(me.cpu_share > 0.0, "{r}");
    let text = r.to_string();
    assert!(
        text.contains("user/req") && text.contains("(exited during the window)"),
        "{text}"
    );
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(
        json["cpu"]["processes"].as_array().map(Vec::len),
        Some(cpu.processes.len())
    );

    // Without --cpu there is no such section; a pid that is not running
    // and --processes are refused before the run.
    assert!(run(&cfg(&s)).cpu.is_none());
    let addr = s.addr.to_string();
    let (code, _, err) = cli(&["--addr", &addr, "-n", "10", "--cpu", "4294967295"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--cpu 4294967295: no such process"), "{err}");
    let (code, _, err) = cli(&[
        "--addr",
        &addr,
        "-n",
        "10",
        "--processes",
        "2",
        "--cpu",
        &root.to_string(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--cpu needs a single generator process"),
        "{err}"
    );
}

/// Removes a test's directory when dropped, also when an assertion fails.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
