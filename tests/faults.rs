use std::path::Path;
use std::time::{Duration, Instant};

use halfsync_protocol::{Client, status};
use halfsync_testkit::fault;

use crate::support::*;

/// A group of `workers` fault-plugin workers with tight timeouts.
fn fault_config(port: u16, plugin: &Path, workers: u32, extra_group: &str) -> String {
    format!(
        r#"[server]
listen = ["127.0.0.1:{port}"]
shutdown_grace = "10s"

[[group]]
name = "fault"
plugin = "{}"
workers = {workers}
request_timeout = "3s"
slow_request = "100ms"
{extra_group}
"#,
        plugin.display()
    )
}

fn be32(n: u32) -> Vec<u8> {
    n.to_be_bytes().to_vec()
}

/// The bad requests, each with the one status it must get.
fn faults() -> Vec<(&'static str, u16, Vec<u8>, u16)> {
    let scribble = |variant: u8| {
        // Pause first so the proxy has collected the replies this worker
        // already published (a corrupt ring loses those). 100 ms: on a
        // loaded 2-vCPU test machine the proxy can be off-CPU for 20.
        let mut p = vec![variant];
        p.extend(be32(100));
        p
    };
    vec![
        ("segv", fault::SEGV, vec![], status::WORKER_DIED),
        ("abort", fault::ABORT, vec![], status::WORKER_DIED),
        ("panic", fault::PANIC, vec![], status::PLUGIN_ERROR),
        (
            "escaping panic",
            fault::ESCAPING_PANIC,
            vec![],
            status::WORKER_DIED,
        ),
        ("exit(0)", fault::EXIT, vec![], status::WORKER_DIED),
        ("hang", fault::HANG, vec![], status::TIMEOUT),
        ("slow", fault::SLOW, be32(150), status::OK),
        ("leak", fault::LEAK, be32(8), status::OK),
        (
            "scribble reply ring",
            fault::SCRIBBLE,
            scribble(0),
            status::WORKER_DIED,
        ),
        (
            "scribble control block",
            fault::SCRIBBLE,
            scribble(1),
            status::WORKER_DIED,
        ),
        (
            "scribble reply data",
            fault::SCRIBBLE,
            scribble(3),
            status::TIMEOUT,
        ),
        ("sigbus", fault::SIGBUS, vec![], status::WORKER_DIED),
        ("sigkill (oom)", fault::SIGKILL, vec![], status::WORKER_DIED),
        (
            "reply too big",
            fault::REPLY_TOO_BIG,
            vec![],
            status::PLUGIN_ERROR,
        ),
        // The C plugin really returns 4; the worker maps it. The Rust SDK
        // cannot express it and replies PLUGIN_ERROR itself.
        (
            "reserved status",
            fault::RESERVED_STATUS,
            vec![],
            status::PLUGIN_ERROR,
        ),
        ("custom status", fault::CUSTOM, vec![], fault::CUSTOM_STATUS),
    ]
}

/// Waits until the group runs `n` workers again and a request is served.
/// How many workers the log says ended because they were recycled (the
/// master's exit line names the cause).
fn recycled(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("worker exited (exit code 0)") && l.contains("cause=\"recycle\""))
        .count()
}

/// Waits until the log says a worker was recycled (its replacement took
/// over and it exited).
fn wait_replaced(s: &Server) {
    let replaced = wait_for(Duration::from_secs(20), || {
        (recycled(&s.log()) > 0).then_some(())
    });
    assert!(replaced.is_some(), "{}", s.log());
}

fn wait_workers(s: &mut Server, n: usize) {
    let back = wait_for(Duration::from_secs(20), || {
        (s.worker_pids().len() == n).then_some(())
    });
    assert!(
        back.is_some(),
        "worker count stuck at {:?}",
        s.worker_pids()
    );
}

/// Whether the worker running request `id` died of fault `what` itself
/// (waits up to 20 s for the master to report it): for faults that kill
/// their own process; false for the others.
fn died_late(s: &Server, what: &str, id: u64) -> bool {
    let how = match what {
        "segv" => "killed by SIGSEGV",
        "abort" | "escaping panic" => "killed by SIGABRT",
        "exit(0)" => "exit code 0",
        "sigbus" => "killed by SIGBUS",
        // (The proxy's own kill is a SIGKILL too: the worker's line says
        // the fault fired.)
        "sigkill (oom)"
            if s.log()
                .contains(&format!("fault: SIGKILL (request id {id})")) =>
        {
            "killed by SIGKILL"
        }
        _ => return false,
    };
    let line = wait_for(Duration::from_secs(20), || {
        s.log()
            .lines()
            .find(|l| {
                l.contains(&format!("worker died ({how}"))
                    && l.contains(&format!("request_id={id} "))
            })
            .map(str::to_owned)
    });
    line.is_some()
}

fn every_fault_under_load(plugin: std::path::PathBuf, lang: &str) {
    let port = free_port();
    let mut s = Server::start(&fault_config(port, &plugin, 4, ""), port);
    let load = Load::start(s.addr, 50, 4, 2000);
    load.progress(2000);
    let mut bad = s.client();
    let mut id = 1_000_000u64;
    // Crash faults answered TIMEOUT because the death itself was late
    // (see below): a rare stall of this machine, not the rule. A broken
    // death detection would make every crash late.
    let mut late = 0;
    for round in 0..3 {
        for (what, cmd, payload, want) in faults() {
            // The faults that only a request_timeout ends cost 3 s each:
            // once is enough.
            if round > 0 && want == status::TIMEOUT {
                continue;
            }
            id += 1;
            let t = Instant::now();
            let r = bad
                .call(id, cmd, &payload)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            if r.code == status::TIMEOUT && died_late(&s, what, id) {
                // This VM sometimes stalls a dying process in the kernel for
                // seconds (seen: 4 and 6.5 s, together with an unrelated
                // process's exec): past request_timeout, so the proxy
                // answered TIMEOUT first. The log shows the injected fault
                // did kill the worker while it ran this very request.
                println!("round {round}, {what}: the worker's death outlasted request_timeout");
                late += 1;
                assert!(late <= 1, "{late} crashes answered TIMEOUT:\n{}", s.log());
                load.progress(200);
                continue;
            }
            assert_eq!(
                (r.id, r.code),
                (id, want),
                "round {round}, {what}: got {} ({}) after {:?}",
                r.code,
                String::from_utf8_lossy(&r.payload),
                t.elapsed()
            );
            // The rest of the traffic keeps flowing.
            load.progress(200);
        }
    }
    wait_workers(&mut s, 4);
    let ok = load.finish();
    let injected = id - 1_000_000;
    println!(
        "faults ({lang} plugin): {injected} bad requests, each with its exact status; {ok} echo requests on 50 connections, 0 errors, 0 connections closed"
    );
    assert!(ok > 10_000, "only {ok} requests served");
    let log = s.log();
    for needle in [
        "killed by SIGSEGV",
        "killed by SIGABRT",
        "killed by SIGBUS",
        "killed by SIGKILL",
        "slow request",
        "past request_timeout",
        "shared memory is corrupt",
    ] {
        assert!(log.contains(needle), "log lacks {needle:?}");
    }
    assert_eq!(s.stop(Duration::from_secs(10)).code(), Some(0));
    s.assert_clean();
}

/// Every kind of plugin failure costs exactly its own request: it gets
/// its status, 50 connections of echo traffic through 4 workers see no
/// error and no closed connection, and the pool heals.
#[test]
fn every_rust_fault_under_load_costs_only_its_request() {
    every_fault_under_load(fault_plugin_so(), "Rust");
}

#[test]
fn every_c_fault_under_load_costs_only_its_request() {
    every_fault_under_load(c_fault_plugin_so(), "C");
}

fn fault_plugin_so() -> std::path::PathBuf {
    halfsync_testkit::fault_plugin()
}

fn c_fault_plugin_so() -> std::path::PathBuf {
    halfsync_testkit::c_fault_plugin()
}

/// Replies longer than the room a worker reserves in its reply ring for
/// each request (64 KiB) are assembled on the side and copied in whole,
/// up to the largest `max_frame` allows, one at a time and pipelined; the
/// C plugin fills a length prefix last, through the pointer `reserve`
/// gave it before the reply outgrew the reservation.
fn long_replies_arrive_whole(plugin: std::path::PathBuf) {
    let port = free_port();
    let mut s = Server::start(&fault_config(port, &plugin, 1, ""), port);
    // Default max_frame (1 MiB), less the HSP/1 header and the prefix.
    let max = (1 << 20) - 12 - 4;
    let sizes = [
        0, 1, 4095, 65_531, 65_532, 65_533, 65_536, 65_537, 70_001, 300_000, max,
    ];
    let payload =
        |n: usize, id: u64| -> Vec<u8> { (0..n as u64).map(|i| (i * 31 + id) as u8).collect() };
    let check = |r: &halfsync_protocol::Frame, n: usize| {
        assert_eq!(
            r.code,
            status::OK,
            "{n} bytes: {:?}",
            String::from_utf8_lossy(&r.payload)
        );
        assert_eq!(r.payload.len(), n + 4, "{n} bytes");
        assert_eq!(
            r.payload[..4],
            (n as u32).to_be_bytes(),
            "{n} bytes: prefix"
        );
        assert!(
            r.payload[4..] == payload(n, r.id)[..],
            "{n} bytes: body differs"
        );
    };
    let mut c = s.client();
    c.stream()
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    for round in 0..2u64 {
        for (i, &n) in sizes.iter().enumerate() {
            let id = round * 100 + i as u64;
            let r = c.call(id, fault::PREFIXED, &payload(n, id)).unwrap();
            assert_eq!(r.id, id);
            check(&r, n);
        }
        for (i, &n) in sizes.iter().enumerate() {
            let id = 1000 + round * 100 + i as u64;
            c.send(id, fault::PREFIXED, &payload(n, id)).unwrap();
        }
        for (i, &n) in sizes.iter().enumerate() {
            let r = c.recv().unwrap();
            assert_eq!(r.id, 1000 + round * 100 + i as u64);
            check(&r, n);
        }
    }
    // Short replies after long ones: the ring is in order.
    let r = c.call(7, 1, b"short").unwrap();
    assert_eq!((r.code, &r.payload[..]), (status::OK, &b"short"[..]));
    assert_eq!(s.stop(Duration::from_secs(10)).code(), Some(0));
    s.assert_clean();
}

#[test]
fn long_rust_replies_arrive_whole() {
    long_replies_arrive_whole(fault_plugin_so());
}

#[test]
fn long_c_replies_arrive_whole() {
    long_replies_arrive_whole(c_fault_plugin_so());
}

/// Requests queued behind a crashing request on the same worker are not
/// lost: they run on another worker.
#[test]
fn requests_queued_behind_a_crash_are_redispatched() {
    let port = free_port();
    let s = Server::start(
        &fault_config(
            port,
            &fault_plugin_so(),
            2,
            // Deep rings whatever the run-time estimate says.
            "max_inflight = 64\nmax_inflight_time = \"0s\"",
        ),
        port,
    );
    for round in 0..5u64 {
        let mut c = s.client();
        // A slow request first, so the crash and the echoes behind it pile
        // up in the rings.
        let base = round * 1000;
        c.send(base, fault::SLOW, &be32(50)).unwrap();
        c.send(base + 1, fault::SEGV, b"").unwrap();
        for i in 2..200 {
            c.send(base + i, 1, &i.to_be_bytes()).unwrap();
        }
        let mut died = 0;
        for _ in 0..200 {
            let r = c.recv().unwrap();
            match r.id - base {
                0 => assert_eq!(r.code, status::OK),
                1 => {
                    assert_eq!(r.code, status::WORKER_DIED);
                    died += 1;
                }
                i => {
                    assert_eq!(r.code, status::OK, "echo {i}");
                    assert_eq!(r.payload, i.to_be_bytes());
                }
            }
        }
        assert_eq!(died, 1);
    }
}

#[test]
fn stale_requests_time_out_without_running() {
    let port = free_port();
    let s = Server::start(
        &fault_config(
            port,
            &fault_plugin_so(),
            1,
            "queue_timeout = \"200ms\"\nmax_inflight = 4",
        ),
        port,
    );
    let mut c = s.client();
    // One worker: a 400 ms request, then 10 more that wait behind it, 3 in
    // the worker's ring and 7 in the proxy's queue.
    c.send(1, fault::SLOW, &be32(400)).unwrap();
    for id in 2..12 {
        // Each would take 100 ms if it ran.
        c.send(id, fault::SLOW, &be32(100)).unwrap();
    }
    let t = Instant::now();
    let mut codes = std::collections::BTreeMap::new();
    for _ in 0..11 {
        let r = c.recv().unwrap();
        codes.insert(r.id, r.code);
    }
    assert_eq!(codes[&1], status::OK);
    for id in 2..12 {
        assert_eq!(codes[&id], status::TIMEOUT, "request {id}");
    }
    let log = s.log();
    assert!(
        log.contains("overloaded: 0 answered BUSY")
            && log.contains("TIMEOUT (waited past queue_timeout) so far"),
        "{log}"
    );
    // Had any of them run, the worker would have spent 100 ms on it.
    assert!(
        t.elapsed() < Duration::from_millis(400 + 800),
        "{:?}",
        t.elapsed()
    );
    // The worker serves again. (On a starved machine a fresh request may
    // itself wait past the 200 ms queue_timeout: TIMEOUT, then try again.)
    let served = wait_for(Duration::from_secs(10), || {
        let r = c.call(99, 1, b"fresh").unwrap();
        assert!(
            r.code == status::OK || r.code == status::TIMEOUT,
            "{}",
            r.code
        );
        (r.code == status::OK).then_some(())
    });
    assert!(served.is_some());
}

#[test]
fn overload_is_answered_busy_at_once() {
    let port = free_port();
    let s = Server::start(
        &fault_config(
            port,
            &fault_plugin_so(),
            1,
            "max_inflight = 1\nmax_queue = 2",
        ),
        port,
    );
    let mut c = s.client();
    c.send(1, fault::SLOW, &be32(2000)).unwrap();
    s.wait_busy();
    for id in 2..8 {
        c.send(id, 1, b"x").unwrap();
    }
    let t = Instant::now();
    // 1 runs, 2 and 3 queue, 4..7 are refused at once.
    let mut order = Vec::new();
    for _ in 0..7 {
        let r = c.recv().unwrap();
        order.push((r.id, r.code, t.elapsed()));
    }
    let busy: Vec<_> = order.iter().filter(|o| o.1 == status::BUSY).collect();
    assert_eq!(
        busy.iter().map(|o| o.0).collect::<Vec<_>>(),
        vec![4, 5, 6, 7],
        "{order:?}"
    );
    // At once: all four before the running request's reply (2 s), not
    // after a wait in the queue.
    assert!(order[..4].iter().all(|o| o.1 == status::BUSY), "{order:?}");
    let ok: Vec<u64> = order
        .iter()
        .filter(|o| o.1 == status::OK)
        .map(|o| o.0)
        .collect();
    assert_eq!(ok.len(), 3, "{order:?}");
    // The log says so once (the next warning would come 10 s later).
    let log = s.log();
    assert_eq!(
        log.matches("overloaded: 1 answered BUSY (wait queue full, max_queue = 2), 0 TIMEOUT")
            .count(),
        1,
        "{log}"
    );
    // The 3 held back are logged when those 10 s are over, though the
    // overload has ended (they used to wait for the next one).
    let rest = wait_for(Duration::from_secs(20), || {
        s.log()
            .contains("overloaded: 3 answered BUSY (wait queue full, max_queue = 2), 0 TIMEOUT (waited past queue_timeout) since the last such warning, 1")
            .then_some(())
    });
    assert!(rest.is_some(), "{}", s.log());
}

/// A plugin that starts crashing in init is restarted with backoff; while
/// no worker runs, requests get BUSY at once; when the cause goes away,
/// the group comes back by itself.
#[test]
fn respawn_storm_backs_off_and_answers_busy() {
    let port = free_port();
    let trigger = temp_dir();
    let flag = trigger.path().join("crash");
    let extra = format!(
        "restart_delay = \"1s\"\nrestart_delay_max = \"2s\"\n[group.config]\ncrash_in_init_if_exists = \"{}\"\n",
        flag.display()
    );
    let mut s = Server::start(&fault_config(port, &fault_plugin_so(), 2, &extra), port);
    std::fs::write(&flag, b"").unwrap();
    // Kill both workers; their replacements now crash in init.
    let mut c = s.client();
    for id in 0..2 {
        let _ = c.call(id, fault::SIGKILL, b"");
    }
    let busy = wait_for(Duration::from_secs(20), || {
        let t = Instant::now();
        let r = c.call(100, 1, b"anyone?").ok()?;
        (r.code == status::BUSY).then_some(t.elapsed())
    });
    let first = busy.expect("never answered BUSY while the group was down");
    // At once: not after the (1 s or more) restart delay, and not held
    // for a worker that is only retrying. Three of four tries (a stalled
    // machine can slow one; a request held for a retry waits in most).
    let mut took = vec![first];
    for id in 101..104 {
        let t = Instant::now();
        let r = c.call(id, 1, b"anyone?").unwrap();
        assert_eq!(
            r.code,
            status::BUSY,
            "the group came back while its cause stayed"
        );
        took.push(t.elapsed());
    }
    let quick = took
        .iter()
        .filter(|t| **t < Duration::from_millis(500))
        .count();
    assert!(quick >= 3, "BUSY took {took:?}");
    // The master tells the proxy before it logs: the line may trail BUSY.
    let logged = wait_for(Duration::from_secs(5), || {
        s.log()
            .contains("worker keeps failing; restarting in")
            .then_some(())
    });
    assert!(logged.is_some(), "{}", s.log());
    // Backoff, not a storm: far fewer starts than a tight loop would make.
    std::thread::sleep(Duration::from_secs(2));
    let crashes = s.log().matches("fault: crashing in init").count();
    assert!(crashes < 30, "{crashes} init crashes in ~2 s");
    // The cause goes away: the group recovers on its own.
    std::fs::remove_file(&flag).unwrap();
    let back = wait_for(Duration::from_secs(20), || {
        let r = c.call(101, 1, b"back").ok()?;
        (r.code == status::OK).then_some(())
    });
    assert!(back.is_some());
    wait_workers(&mut s, 2);
    // The crashes in init count as init failures, not as crashes (which
    // would read as requests that kill workers): only the kills are (one
    // or two: the second SIGKILL may find no worker, and get BUSY).
    let st = s.status();
    let ended = &st["groups"][0]["workers_ended"];
    assert!(
        (1..=2).contains(&ended["crash"].as_u64().unwrap_or(0)),
        "{st}"
    );
    assert!(ended["init_failed"].as_u64().unwrap_or(0) >= 2, "{st}");
}

/// max_requests with jitter: workers are replaced under load without a
/// single failed request, and not all at once.
#[test]
fn recycling_by_max_requests_fails_no_request() {
    let port = free_port();
    let s_text = fault_config(
        port,
        &fault_plugin_so(),
        4,
        "max_requests = 300\nmax_requests_jitter = 100",
    );
    let mut s = Server::start(&s_text, port);
    let first = s.worker_pids();
    // Enough in flight that every worker has work: at light load the proxy
    // keeps requests on awake workers and lets the others sleep.
    let load = Load::start(s.addr, 20, 16, 500);
    let replaced = wait_for(Duration::from_secs(60), || {
        let recycled = recycled(&s.log()) >= 12;
        let all_new = s.worker_pids().iter().all(|p| !first.contains(p));
        (recycled && all_new).then_some(())
    });
    let ok = load.finish();
    assert!(replaced.is_some(), "too few recycles; log:\n{}", s.log());
    assert!(ok > 3000);
    wait_workers(&mut s, 4);
    let now = s.worker_pids();
    assert!(
        now.iter().all(|p| !first.contains(p)),
        "{first:?} -> {now:?}"
    );
    assert!(s.log().contains("recycling limit reached"));
    assert_eq!(s.stop(Duration::from_secs(10)).code(), Some(0));
    s.assert_clean();
}

#[test]
fn recycling_by_max_rss_fails_no_request() {
    let port = free_port();
    let mut s = Server::start(
        &fault_config(port, &fault_plugin_so(), 2, "max_rss = \"96MiB\""),
        port,
    );
    let load = Load::start(s.addr, 10, 2, 500);
    let mut c = s.client();
    // Each leak keeps 24 MiB; a worker passes 96 MiB after about four.
    for id in 0..16 {
        let r = c.call(id, fault::LEAK, &be32(24)).unwrap();
        assert_eq!(r.code, status::OK);
    }
    wait_replaced(&s);
    load.finish();
    wait_workers(&mut s, 2);
}

/// `max_rss` is read every 64 requests under load (it costs a system call)
/// and whenever a worker's ring runs empty: a worker that grew past it
/// and then went quiet is still replaced, long before 64 more requests.
#[test]
fn max_rss_is_checked_when_a_worker_goes_idle() {
    let port = free_port();
    let mut s = Server::start(
        &fault_config(port, &fault_plugin_so(), 1, "max_rss = \"96MiB\""),
        port,
    );
    let mut c = s.client();
    // One at a time, no other load: each leak of 24 MiB is followed by an
    // empty ring. The fifth takes the worker past 96 MiB.
    for id in 0..5 {
        let r = c.call(id, fault::LEAK, &be32(24)).unwrap();
        assert_eq!(r.code, status::OK);
    }
    wait_replaced(&s);
    assert!(
        s.log().contains("recycling limit reached: max_rss"),
        "{}",
        s.log()
    );
    wait_workers(&mut s, 1);
    let r = c.call(99, 1, b"still here").unwrap();
    assert_eq!(r.code, status::OK);
    assert_eq!(s.stop(Duration::from_secs(10)).code(), Some(0));
    s.assert_clean();
}

/// The proxy should never die; if it does, the master restarts it on the
/// same port and resets every worker.
#[test]
fn proxy_death_is_survived_on_the_same_port() {
    let port = free_port();
    let mut s = Server::start(&fault_config(port, &fault_plugin_so(), 2, ""), port);
    let proxy = s.pids_titled("halfsync: proxy");
    assert_eq!(proxy.len(), 1);
    let workers = s.worker_pids();
    // SAFETY: kill has no memory effects; the pid is our server's proxy.
    unsafe { libc::kill(proxy[0], libc::SIGKILL) };
    let back = wait_for(Duration::from_secs(20), || {
        let mut c = Client::connect(s.addr).ok()?;
        c.stream()
            .set_read_timeout(Some(Duration::from_secs(2)))
            .ok()?;
        (c.call(1, 1, b"again").ok()?.code == status::OK).then_some(())
    });
    assert!(back.is_some(), "{}", s.log());
    let new_proxy = s.pids_titled("halfsync: proxy");
    assert_eq!(new_proxy.len(), 1);
    assert_ne!(new_proxy, proxy);
    // Two workers, none of the dead proxy's (the master gives up waiting
    // for a stuck one after 5 s, so it may outlive the new proxy a while).
    let fresh = wait_for(Duration::from_secs(30), || {
        let now = s.worker_pids();
        (now.len() == 2 && now.iter().all(|p| !workers.contains(p))).then_some(())
    });
    assert!(
        fresh.is_some(),
        "workers {:?}, before {workers:?}",
        s.worker_pids()
    );
    many_pipelines(s.addr, 4, 100, 1000);
    assert_eq!(s.stop(Duration::from_secs(10)).code(), Some(0));
    s.assert_clean();
}

/// `proxy_processes = 2`: two proxies share the port (SO_REUSEPORT), each
/// with its own half of the workers; both serve; one dying takes only its
/// own connections and workers with it; scaling keeps both halves.
#[test]
fn two_proxy_processes_share_the_port_and_fail_apart() {
    let port = free_port();
    // The pipelines below put up to 1,600 requests on one proxy when the
    // kernel gives it most connections: room for them all, no BUSY.
    let text = fault_config(port, &fault_plugin_so(), 4, "max_queue = 4096")
        .replace("[server]\n", "[server]\nproxy_processes = 2\n");
    let mut s = Server::start(&text, port);
    let proxies = s.pids_titled("halfsync: proxy");
    assert_eq!(proxies.len(), 2, "{}", s.log());
    wait_workers(&mut s, 4);
    let per_proxy = |st: &serde_json::Value| -> [Vec<i64>; 2] {
        let mut out = [Vec::new(), Vec::new()];
        for w in st["groups"][0]["workers"].as_array().unwrap() {
            if let (Some(p), Some(pid)) = (w["proxy"].as_u64(), w["pid"].as_i64()) {
                out[p as usize].push(pid);
            }
        }
        out
    };
    let halves = per_proxy(&s.status());
    assert_eq!((halves[0].len(), halves[1].len()), (2, 2), "{}", s.status());
    assert_eq!(s.status()["proxy"]["pids"].as_array().unwrap().len(), 2);

    // SO_REUSEPORT must not let a second server join the port.
    let dir = temp_dir();
    let path = dir.path().join("second.toml");
    let second = text.replace(
        "[server]\n",
        &format!(
            "[server]\nadmin_socket = \"{}\"\n",
            dir.path().join("admin.sock").display()
        ),
    );
    std::fs::write(&path, second).unwrap();
    let (st, _, err) = run_cmd(
        std::process::Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(&path),
        Duration::from_secs(20),
    );
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot listen on")
            && err.contains("in use")
            && err.contains("stop it, or change `server.listen`"),
        "{err}"
    );

    // 40 connections: the kernel spreads them over both proxies (all on one
    // has odds of 2^-39), so the workers of both serve.
    let mut clients: Vec<Client> = (0..40).map(|_| s.client()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.call(i as u64, 1, b"hi").unwrap().code, status::OK);
    }
    many_pipelines(s.addr, 8, 200, 1000);
    let st = s.status();
    for p in 0..2 {
        let served: u64 = st["groups"][0]["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["proxy"] == p)
            .map(|w| w["dispatched"].as_u64().unwrap_or(0))
            .sum();
        assert!(served > 0, "proxy {p} served nothing: {st}");
    }
    // (Server::start's readiness probe is one more connection.)
    assert!(st["proxy"]["accepted"].as_u64() >= Some(40 + 8), "{st}");

    // Kill proxy 0: its connections drop, proxy 1's carry on untouched.
    let victim = st["proxy"]["pids"][0].as_i64().unwrap() as i32;
    // SAFETY: kill has no memory effects; the pid is our server's proxy.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    let mut alive = 0;
    let mut dropped = 0;
    for (i, c) in clients.iter_mut().enumerate() {
        c.stream()
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        match c.call(100 + i as u64, 1, b"still?") {
            Ok(r) if r.code == status::OK => alive += 1,
            _ => dropped += 1,
        }
    }
    assert!(alive > 0 && dropped > 0, "alive {alive} dropped {dropped}");
    let back = wait_for(Duration::from_secs(20), || {
        let st = s.status();
        let h = per_proxy(&st);
        let up = st["proxy"]["pids"].as_array()?.iter().all(|p| p.is_i64());
        (up && h[0].len() == 2 && h[1].len() == 2 && h[0].iter().all(|p| !halves[0].contains(p)))
            .then_some(h)
    });
    let after = back.unwrap_or_else(|| panic!("proxy 0 not back: {}\n{}", s.status(), s.log()));
    assert_eq!(after[1], halves[1], "proxy 1's workers were touched");
    many_pipelines(s.addr, 8, 200, 1000);

    // Scaling keeps every proxy served and refuses to starve one.
    let (code, _, err) = s.ctl(&["scale", "fault", "1"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("every proxy needs a worker"), "{err}");
    for n in [3usize, 2] {
        let (code, out, err) = s.ctl(&["scale", "fault", &n.to_string()]);
        assert_eq!(code, Some(0), "{out}{err}");
        let settled = wait_for(Duration::from_secs(20), || {
            let h = per_proxy(&s.status());
            (h[0].len() + h[1].len() == n
                && !h[0].is_empty()
                && !h[1].is_empty()
                && s.worker_pids().len() == n)
                .then_some(())
        });
        assert!(settled.is_some(), "scale {n}: {}", s.status());
        many_pipelines(s.addr, 8, 100, 1000);
    }
    assert_eq!(s.stop(Duration::from_secs(10)).code(), Some(0));
    s.assert_clean();
}

/// With `timeout_kill_grace`, a hung worker first gets SIGABRT (a crash
/// handler's chance to say where it hung); the request still gets TIMEOUT.
#[test]
fn hung_worker_gets_sigabrt_first_with_a_kill_grace() {
    let port = free_port();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\n\n[[group]]\nname = \"g\"\nplugin = \"{}\"\nworkers = 1\nrequest_timeout = \"300ms\"\ntimeout_kill_grace = \"200ms\"\n",
        fault_plugin_so().display()
    );
    let mut s = Server::start(&text, port);
    let mut c = s.client();
    let r = c.call(1, fault::HANG, b"").unwrap();
    assert_eq!(r.code, status::TIMEOUT);
    assert_eq!(c.call(2, 1, b"next").unwrap().code, status::OK);
    assert!(
        s.log().contains(
            "worker died (killed by SIGABRT (6)) after its request ran past request_timeout"
        ),
        "{}",
        s.log()
    );
    // The same during a stop: the master's own SIGABRT, not a crash in
    // the plugin's fini.
    c.send(3, fault::HANG, b"").unwrap();
    s.wait_busy();
    assert_eq!(s.stop(Duration::from_secs(30)).code(), Some(0));
    assert!(!s.log().contains("failed while exiting"), "{}", s.log());
    s.assert_clean();
}

/// A plugin whose init never returns: `init_timeout` kills it; when no
/// worker of a group can start at all, halfsync exits 1 instead of
/// serving nothing but BUSY, and says why. Beside a healthy group too,
/// and with an `init_timeout` longer than a second (a kill that late was
/// once not counted as a failed start, so it restarted forever).
#[test]
fn init_that_never_returns_is_killed_and_halfsync_gives_up_at_startup() {
    for (timeout, healthy) in [
        ("300ms", ""),
        (
            "1200ms",
            "[[group]]\nname = \"farm\"\nplugin = \"ECHO\"\nworkers = 1\ncommands = [2]\n\n",
        ),
    ] {
        let port = free_port();
        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\n\n{}[[group]]\nname = \"stuck\"\nplugin = \"{}\"\nworkers = 2\ninit_timeout = \"{timeout}\"\n[group.config]\nhang_in_init = true\n",
            healthy.replace("ECHO", &echo_so().display().to_string()),
            fault_plugin_so().display()
        );
        let mut s = Server::spawn(&text, port);
        let st = s.wait_exit(Duration::from_secs(30));
        assert_eq!(st.code(), Some(1), "{}", s.log());
        let log = s.log();
        let ms = timeout.trim_end_matches("ms");
        assert!(
            log.contains(&format!(
                "group stuck: no worker could start: plugin init ran past init_timeout ({ms} ms)"
            )),
            "{log}"
        );
        s.assert_clean();
    }
}

/// A slow request does not hold up the requests queued behind it on the
/// same worker: after `requeue_after` they move to the other worker.
#[test]
fn requests_behind_a_slow_one_move_to_another_worker() {
    let port = free_port();
    let s = Server::start(
        &fault_config(
            port,
            &fault_plugin_so(),
            2,
            "requeue_after = \"100ms\"\nmax_inflight_time = \"0s\"",
        ),
        port,
    );
    let mut c = s.client();
    // Idle first: the proxy checks idle workers once a second, and must
    // look at a worker that just got a request at the busy rate at once.
    // (The idle checks are in step with the worker becoming ready, so
    // 1.1 s puts the next one ~0.9 s away: the bug this guards against
    // showed as ~900 ms here.)
    std::thread::sleep(Duration::from_millis(1100));
    let t = Instant::now();
    c.send(0, fault::SLOW, &be32(2500)).unwrap();
    // Pipelined behind it, spread over both workers' rings.
    for id in 1..=40 {
        c.send(id, 1, &id.to_be_bytes()).unwrap();
    }
    let mut last_echo = Duration::ZERO;
    for _ in 0..41 {
        let r = c.recv().unwrap();
        assert_eq!(r.code, status::OK);
        if r.id == 0 {
            assert!(
                !last_echo.is_zero(),
                "the slow one came back before the echoes"
            );
        } else {
            last_echo = t.elapsed();
        }
    }
    // Moved after requeue_after (100 ms), not at the next idle check.
    assert!(
        last_echo < Duration::from_millis(700),
        "echoes waited {last_echo:?} behind the slow request"
    );
    assert!(s.log().contains("moved to other workers"), "{}", s.log());
}

/// A worker that dies while running a request past `requeue_after` (its
/// queue moved away, new requests kept from it) hands its slot to a
/// replacement that takes requests as soon as it is ready: the slot's
/// "stuck on that request" mark does not outlive the worker. (It did, and
/// a one-worker group answered nothing for ~1 s, until the next idle-rate
/// check of the slot cleared it.)
#[test]
fn a_replacement_takes_requests_at_once_after_a_stuck_worker_dies() {
    let port = free_port();
    let mut s = Server::start(
        &fault_config(
            port,
            &fault_plugin_so(),
            1,
            "requeue_after = \"100ms\"\nmax_inflight_time = \"0s\"",
        ),
        port,
    );
    let stuck = s.worker_pids()[0];
    let mut c = s.client();
    c.stream()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    c.send(1, fault::SLOW, &be32(5000)).unwrap();
    c.send(2, 1, b"behind").unwrap();
    // Past requeue_after, the proxy marks the slot stuck on it and takes
    // back the request behind it.
    let marked = wait_for(Duration::from_secs(10), || {
        s.log().contains("moved to other workers").then_some(())
    });
    assert!(marked.is_some(), "{}", s.log());
    kill(stuck, libc::SIGKILL);
    let r = c.recv().unwrap_or_else(|e| panic!("{e}: {}", s.log()));
    assert_eq!((r.id, r.code), (1, status::WORKER_DIED));
    let ready = wait_for(Duration::from_secs(20), || {
        let pids = s.worker_pids();
        (pids.len() == 1 && pids[0] != stuck && state_of(&s, pids[0]) == "idle").then_some(())
    });
    assert!(ready.is_some(), "{}\n{}", s.status(), s.log());
    let t = Instant::now();
    for id in 10..20 {
        c.send(id, 1, &id.to_be_bytes()).unwrap();
    }
    // The one taken back (answered already, or now), then the new ones.
    let mut ids = Vec::new();
    while ids.last() != Some(&19) {
        let r = c.recv().unwrap_or_else(|e| panic!("{e}: {}", s.log()));
        assert_eq!(r.code, status::OK);
        ids.push(r.id);
        assert!(ids.len() <= 11, "{ids:?}");
    }
    assert!(
        ids == (10..20).collect::<Vec<_>>()
            || ids == [2].into_iter().chain(10..20).collect::<Vec<_>>(),
        "{ids:?}"
    );
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "the replacement took {:?} to answer: {}",
        t.elapsed(),
        s.log()
    );
}

/// A worker that writes a start time in the future for its running
/// request (a scribble over its control block) still has that request
/// timed out at `request_timeout`: the proxy counts from when it first saw
/// the request running, if that is earlier. (It trusted the worker's
/// time, and the hung worker was never killed.)
#[test]
fn a_request_start_time_in_the_future_does_not_escape_request_timeout() {
    for plugin in [fault_plugin_so(), c_fault_plugin_so()] {
        let port = free_port();
        let mut s = Server::start(
            &fault_config(port, &plugin, 1, "")
                .replace("request_timeout = \"3s\"", "request_timeout = \"1s\""),
            port,
        );
        let mut c = s.client();
        c.stream()
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let t = Instant::now();
        let r = c
            .call(1, fault::SCRIBBLE, &[fault::SCRIBBLE_FUTURE_START_HANG])
            .unwrap_or_else(|e| panic!("{e}: {}", s.log()));
        assert_eq!(r.code, status::TIMEOUT, "{}", s.log());
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert_eq!(s.stop(Duration::from_secs(30)).code(), Some(0));
        s.assert_clean();
    }
}

/// Stops process `pid` and waits (bounded) until it is stopped: a signal
/// is delivered when the process next runs, and a worker woken a moment
/// earlier may yet take a request first.
fn stop_and_wait(pid: i32) {
    kill(pid, libc::SIGSTOP);
    let stopped = wait_for(Duration::from_secs(10), || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let state = stat[stat.rfind(')')? + 1..]
            .split_whitespace()
            .next()?
            .to_owned();
        (state == "T").then_some(())
    });
    assert!(stopped.is_some(), "{pid} never stopped");
}

/// The state `status` shows for the worker with this pid.
fn state_of(s: &Server, pid: i32) -> String {
    let st = s.status();
    st["groups"][0]["workers"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["pid"] == pid))
        .and_then(|w| w["state"].as_str())
        .unwrap_or("gone")
        .to_owned()
}

/// A worker stopped while idle (SIGSTOP, a debugger; or starved of CPU)
/// takes none of the requests in its ring: after `requeue_after` they move
/// to the other worker, it gets no new ones and shows as unresponsive
/// until it runs again; one that stays so past `request_timeout` is killed
/// and replaced. (Its requests used to wait for ever, unanswered, while
/// status called it idle and `/ping` said pong.)
#[test]
fn an_idle_worker_that_stops_running_has_its_requests_moved() {
    let port = free_port();
    let mut s = Server::start(
        &fault_config(port, &fault_plugin_so(), 2, "requeue_after = \"100ms\""),
        port,
    );
    // Both workers up and idle, holding nothing (the start's readiness
    // request answered), so that the one stopped is stopped idle.
    let idle = wait_for(Duration::from_secs(10), || {
        let st = s.status();
        let ws = st["groups"][0]["workers"].as_array()?.clone();
        (ws.len() == 2 && ws.iter().all(|w| w["state"] == "idle" && w["pending"] == 0))
            .then_some(())
    });
    assert!(idle.is_some(), "{}", s.status());
    let stopped = s.worker_pids()[0];
    stop_and_wait(stopped);
    // Several connections' pipelined requests, so that some go to it.
    let round = |s: &Server, base: u64| {
        let mut clients: Vec<Client> = (0..4).map(|_| s.client()).collect();
        for (k, c) in clients.iter_mut().enumerate() {
            c.stream()
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            for id in 0..20 {
                c.send(base + (k as u64) * 100 + id, 1, b"x").unwrap();
            }
        }
        for c in &mut clients {
            for _ in 0..20 {
                let r = c.recv().unwrap_or_else(|e| panic!("{e}: {}", s.log()));
                assert_eq!(r.code, status::OK);
            }
        }
    };
    // Every round is answered whole. Which worker gets what is the
    // proxy's choice (a busy or descheduled worker 0 may take all of a
    // round): rounds go on until some were handed to the stopped one.
    let mut base = 0;
    let flagged = wait_for(Duration::from_secs(20), || {
        round(&s, base);
        base += 10_000;
        s.log().contains("worker unresponsive").then_some(())
    });
    assert!(flagged.is_some(), "{}", s.log());
    assert_eq!(state_of(&s, stopped), "unresponsive", "{}", s.status());
    // The table form shows it too, holding nothing now.
    let (_, out, _) = s.ctl(&["status"]);
    let line = out
        .lines()
        .find(|l| l.contains(&format!("pid {stopped} ")))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("unresponsive") && line.contains("holds 0 "),
        "{line}"
    );
    // Now nothing is handed to it.
    round(&s, 1000);
    assert_eq!(state_of(&s, stopped), "unresponsive", "{}", s.status());
    // Running again, it reads its ring and takes requests again.
    kill(stopped, libc::SIGCONT);
    let back = wait_for(Duration::from_secs(10), || {
        (state_of(&s, stopped) == "idle").then_some(())
    });
    assert!(back.is_some(), "{}\n{}", s.status(), s.log());
    assert!(s.log().contains("worker responsive again"), "{}", s.log());
    // Stopped for longer than request_timeout: killed and replaced.
    stop_and_wait(stopped);
    round(&s, 2000);
    let replaced = wait_for(Duration::from_secs(15), || {
        let pids = s.worker_pids();
        (pids.len() == 2 && !pids.contains(&stopped)).then_some(())
    });
    assert!(replaced.is_some(), "{}\n{}", s.status(), s.log());
    assert!(
        s.log().contains("took none of its requests for"),
        "{}",
        s.log()
    );
    assert!(
        s.log()
            .contains("after it took none of its requests past request_timeout"),
        "{}",
        s.log()
    );
    round(&s, 3000);
    // Its replacement in the same slot starts out responsive, and the
    // server says it serves.
    let serving = wait_for(Duration::from_secs(10), || {
        let st = s.status();
        let all = st["groups"][0]["workers"]
            .as_array()?
            .iter()
            .all(|w| w["state"] == "idle" || w["state"] == "busy");
        (all && st["not_serving"].is_null()).then_some(st)
    });
    let st = serving.unwrap_or_else(|| panic!("{}", s.status()));
    assert_eq!(st["groups"][0]["workers_ended"]["unresponsive"], 1, "{st}");
}

/// Per-worker requests served, by worker number, once the counts stop
/// moving (a worker counts a request just after publishing its reply).
fn served_by_worker(s: &Server, at_least: u64) -> Vec<u64> {
    let read = || -> Vec<u64> {
        let st = s.status();
        let mut v: Vec<(u64, u64)> = st["groups"][0]["workers"]
            .as_array()
            .map(|ws| {
                ws.iter()
                    .filter_map(|w| Some((w["worker"].as_u64()?, w["served"].as_u64()?)))
                    .collect()
            })
            .unwrap_or_default();
        v.sort_unstable();
        v.into_iter().map(|(_, n)| n).collect()
    };
    // At least the requests answered so far (a worker counts one just
    // after publishing its reply), and unchanged for 20 ms.
    let mut last = read();
    for _ in 0..500 {
        std::thread::sleep(Duration::from_millis(20));
        let now = read();
        if now == last && now.iter().sum::<u64>() >= at_least {
            return now;
        }
        last = now;
    }
    panic!("served counts never settled at {at_least} or more: {last:?}");
}

/// Sends `n` frames in one write, so the proxy reads them as one batch,
/// and checks every reply.
fn one_batch(c: &mut Client, base: u64, code: u16, payload: &[u8], n: u64) {
    let mut out = Vec::new();
    for i in 0..n {
        halfsync_protocol::write_frame(&mut out, base + i, code, payload);
    }
    std::io::Write::write_all(c.stream(), &out).unwrap();
    for _ in 0..n {
        let r = c.recv().unwrap();
        assert_eq!(r.code, status::OK, "reply {}", r.id);
        assert_eq!(r.payload, payload);
    }
}

/// Batch affinity: a batch of cheap requests read at once goes to one
/// worker (its replies then leave in one send); a batch of slow ones is
/// spread over the workers to run in parallel. Workers report sampled run
/// times, so the proxy knows which is which.
#[test]
fn cheap_batches_stay_on_one_worker_and_slow_ones_are_spread() {
    let port = free_port();
    let s = Server::start(&fault_config(port, &fault_plugin_so(), 2, ""), port);
    let mut c = s.client();
    // Echo requests one at a time, so their run times reach the proxy,
    // then a batch. A sample taken while a busy test machine preempted the
    // worker can hide the cheapness for a while, and a worker's sleep
    // hint can end a batch early: up to ten attempts (five once failed
    // all, on a quiet machine, in one of about ten full runs). Without
    // affinity the batch is split evenly every time.
    let mut splits = Vec::new();
    // Answered so far: the readiness check's request(s).
    let mut answered: u64 = served_by_worker(&s, 1).iter().sum();
    for attempt in 0..10u64 {
        let base = 10_000 + attempt * 1000;
        for id in 0..64 {
            assert_eq!(c.call(base + id, 1, b"warm").unwrap().code, status::OK);
        }
        answered += 64;
        let before = served_by_worker(&s, answered);
        one_batch(&mut c, base + 100, 1, b"cheap", 16);
        answered += 16;
        let after = served_by_worker(&s, answered);
        let delta: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        assert_eq!(delta.len(), 2, "{after:?}");
        assert_eq!(delta.iter().sum::<u64>(), 16);
        if delta.contains(&16) {
            break;
        }
        splits.push(delta);
    }
    assert!(
        splits.len() < 10,
        "a cheap batch should stay on one worker: {splits:?}; status: {}",
        s.status()["groups"][0]
    );

    // Slow requests one at a time (several get sampled), then a batch.
    for id in 8000..8064 {
        assert_eq!(c.call(id, fault::SLOW, &be32(1)).unwrap().code, status::OK);
    }
    answered += 64;
    let before = served_by_worker(&s, answered);
    one_batch(&mut c, 3000, fault::SLOW, &be32(20), 8);
    let after = served_by_worker(&s, answered + 8);
    let delta: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(delta.iter().sum::<u64>(), 8);
    assert!(
        delta.iter().all(|&d| d > 0),
        "a slow batch should be spread over both workers: {delta:?}"
    );
}
/// Slow requests go to idle workers, from the first one on: a worker busy
/// running one is not preferred to a sleeping idle one (that preference
/// is for cheap requests only), and the run-time estimate follows a slow
/// plugin within a couple of requests. (Requests arriving one after
/// another once piled on the busy worker, each waiting for the one before
/// it, and status reported tens of µs for a plugin taking 200 ms.)
#[test]
fn slow_requests_go_to_idle_workers_from_the_start() {
    // The whole experiment once more, on a fresh server (a cold estimate
    // is the point), before failing: a stalled machine can slow a round;
    // requests piling up on a busy worker slow every try.
    if let Err(first) = slow_requests_on_a_fresh_server() {
        println!("first try: {first}; once more");
        if let Err(second) = slow_requests_on_a_fresh_server() {
            panic!("{first}; then {second}");
        }
    }
}

fn slow_requests_on_a_fresh_server() -> Result<(), String> {
    let port = free_port();
    // requeue_after off, so only the choice of worker is measured.
    let mut s = Server::start(
        &fault_config(port, &fault_plugin_so(), 4, "requeue_after = \"0s\""),
        port,
    );
    let run = |round: u64| {
        let t = Instant::now();
        let mut clients: Vec<_> = (0..4u64)
            .map(|i| {
                let mut c = s.client();
                c.send(round * 10 + i, fault::SLOW, &be32(300)).unwrap();
                // A separate loop turn each.
                std::thread::sleep(Duration::from_millis(20));
                c
            })
            .collect();
        let mut latest = Duration::ZERO;
        for c in &mut clients {
            c.stream()
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            assert_eq!(c.recv().unwrap().code, status::OK);
            latest = latest.max(t.elapsed());
        }
        latest
    };
    // Four 300 ms requests 20 ms apart on four workers: all done in about
    // 360 ms; two on one worker take over 600 ms, all on one 1.2 s.
    for round in 0..3 {
        let took = run(round);
        if took >= Duration::from_millis(600) {
            return Err(format!("round {round}: {took:?}"));
        }
    }
    // By now each worker has sampled a run time: the estimate is the
    // plugin's 300 ms, not a cold start's clamp (nor a saturated 65 ms).
    let st = s.status();
    let mean = st["groups"][0]["mean_run_us"].as_f64().unwrap_or(0.0);
    assert!((250_000.0..400_000.0).contains(&mean), "{st}");
    assert_eq!(s.stop(Duration::from_secs(10)).code(), Some(0));
    s.assert_clean();
    Ok(())
}

/// A plugin `.so` overwritten in place while workers have it loaded (`cp`
/// onto it) crashes them: the log says that the file changed under them
/// and how to install a new version instead. (A file replaced with `mv`
/// is not blamed: see
/// `ops::a_plugin_installed_with_mv_waits_for_the_reload`.)
#[test]
fn a_plugin_file_overwritten_in_place_is_named_as_the_cause() {
    let port = free_port();
    let dir = temp_dir();
    let so = dir.path().join("libecho_copy.so");
    std::fs::copy(echo_so(), &so).unwrap();
    let mut s = Server::start(&config(port, &so, 1, ""), port);
    let mut c = s.client();
    assert_eq!(c.call(1, 1, b"before").unwrap().payload, b"before");
    // In place (same inode), and shorter: the worker's mapped code pages
    // past the new end of file are gone, so running them faults (SIGBUS).
    let f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&so)
        .unwrap();
    drop(f);
    // The next request runs the plugin's code and the worker dies.
    let reply = c.call(2, 1, b"after").unwrap();
    assert_eq!(reply.code, status::WORKER_DIED, "{}", s.log());
    let said = wait_for(Duration::from_secs(10), || {
        s.log()
            .contains("was rewritten in place after this worker loaded it")
            .then_some(())
    });
    assert!(said.is_some(), "{}", s.log());
    assert!(s.log().contains("libecho_copy.so"), "{}", s.log());
    let st = s.status();
    assert_eq!(
        st["groups"][0]["plugin_version"],
        "echo 0.1.0 (file rewritten in place since it was loaded)",
        "{st}"
    );
    s.stop(Duration::from_secs(30));
    s.assert_clean();
}

/// A `touch` of the plugin file changes its mtime and none of its bytes:
/// a crash after it is the plugin's own, and neither the log nor `status`
/// blames the file.
#[test]
fn a_touched_plugin_file_is_not_blamed_for_a_crash() {
    let port = free_port();
    let dir = temp_dir();
    let so = dir.path().join("libfault_copy.so");
    std::fs::copy(fault_plugin_so(), &so).unwrap();
    let mut s = Server::start(&fault_config(port, &so, 1, ""), port);
    let f = std::fs::File::options().write(true).open(&so).unwrap();
    f.set_modified(std::time::SystemTime::now() + Duration::from_secs(60))
        .unwrap();
    drop(f);
    let mut c = s.client();
    assert_eq!(
        c.call(1, fault::SEGV, b"").unwrap().code,
        status::WORKER_DIED
    );
    let died = wait_for(Duration::from_secs(10), || {
        s.log().contains("worker died").then_some(())
    });
    assert!(died.is_some(), "{}", s.log());
    assert!(!s.log().contains("rewritten in place"), "{}", s.log());
    assert_eq!(s.status()["groups"][0]["plugin_version"], "fault 0.1.0");
    s.stop(Duration::from_secs(30));
    s.assert_clean();
}

/// A stray SIGUSR2 (or SIGUSR1 without a log file) sent to the whole
/// process tree kills nobody: the proxy and the workers catch them as the
/// master does.
#[test]
fn stray_user_signals_kill_no_process() {
    let port = free_port();
    let mut s = Server::start(&config(port, &fault_plugin_so(), 2, ""), port);
    let proxy = s.pids_titled("halfsync: proxy");
    let workers = s.worker_pids();
    for sig in [libc::SIGUSR2, libc::SIGUSR1] {
        for &pid in proxy.iter().chain(&workers) {
            kill(pid, sig);
        }
        s.signal(sig);
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut c = s.client();
    for id in 0..10 {
        assert_eq!(c.call(id, 1, b"x").unwrap().payload, b"x");
    }
    assert_eq!(s.pids_titled("halfsync: proxy"), proxy, "{}", s.log());
    assert_eq!(s.worker_pids(), workers, "{}", s.log());
    assert!(!s.log().contains("died"), "{}", s.log());
    // The master says what SIGUSR2 does not do (PHP-FPM reloads on it).
    assert!(
        s.log()
            .contains("SIGUSR2 ignored: to reload, send SIGHUP or run `halfsync reload`"),
        "{}",
        s.log()
    );
    assert_eq!(s.stop(Duration::from_secs(10)).code(), Some(0));
    s.assert_clean();
}

/// A C plugin's `printf` to stdout (a pipe, which C stdio would buffer in
/// 4 KiB blocks until exit) reaches the log line by line while the worker
/// runs: the worker makes its stdout line-buffered before loading the
/// plugin.
#[test]
fn a_c_plugins_printf_is_logged_while_the_worker_runs() {
    let printer = halfsync_testkit::c_plugin("plugins/c/test/printer.c");
    let port = free_port();
    let mut s = Server::start(&config(port, &printer, 1, ""), port);
    let worker = s.worker_pids();
    let mut c = s.client();
    for id in 1..=3 {
        assert_eq!(c.call(id, 1, b"x").unwrap().payload, b"x");
    }
    let logged = wait_for(Duration::from_secs(10), || {
        s.log()
            .contains("worker output: handled request 3")
            .then_some(())
    });
    assert!(logged.is_some(), "{}", s.log());
    assert_eq!(s.worker_pids(), worker, "the worker is still the same");
    s.stop(Duration::from_secs(30));
    s.assert_clean();
}

/// What one printed line, or one log call, can put in the log is bounded:
/// a 1 MiB line of output is logged cut at 4 KiB, a 1 MiB log message cut
/// at 16 KiB, each saying so, and the lines after them are logged as
/// usual. (A 1 MiB message was one 1 MB log line, and 40 of them 40 MB in
/// under two seconds; a 1 MiB print was 256 lines, which used up the
/// worker's line budget.)
#[test]
fn a_plugins_huge_lines_are_cut() {
    let printer = halfsync_testkit::c_plugin("plugins/c/test/printer.c");
    let port = free_port();
    let mut s = Server::start(&config(port, &printer, 1, ""), port);
    let mut c = s.client();
    assert_eq!(c.call(1, 4, b"a").unwrap().payload, b"a");
    assert_eq!(c.call(2, 5, b"b").unwrap().payload, b"b");
    let logged = wait_for(Duration::from_secs(10), || {
        s.log()
            .contains("worker output: handled request 2")
            .then_some(())
    });
    assert!(logged.is_some(), "{}", s.log().len());
    let log = s.log();
    let long: Vec<&str> = log.lines().filter(|l| l.contains("xxxxxxxx")).collect();
    assert_eq!(long.len(), 2, "{}", log.len());
    assert!(
        long[0].contains("[line cut at 4096 bytes; the rest dropped]") && long[0].len() < 4400,
        "{}",
        long[0].len()
    );
    assert!(
        long[1].contains("[message cut at 16384 bytes; 1032192 more dropped]")
            && long[1].len() < 17000,
        "{}",
        long[1].len()
    );
    assert!(log.contains("worker output: after the long line"), "{log}");
    assert!(!log.contains("lines of worker output dropped"), "{log}");
    s.stop(Duration::from_secs(30));
    s.assert_clean();
}

/// What a worker holds of the host's (its shared memory, its eventfd, the
/// master's log descriptor, its role in the environment) does not pass to
/// processes its plugin starts: the test plugin's init fails if it would.
/// (The memfd reached them, so a plugin's helper could map the request
/// ring writable; and `halfsync status` run from one acted as a worker.)
#[test]
fn processes_a_plugin_starts_inherit_no_host_descriptor() {
    let plugin = halfsync_testkit::c_plugin("plugins/c/test/fd_check.c");
    let port = free_port();
    let mut s = Server::start(&config(port, &plugin, 2, ""), port);
    assert_eq!(s.client().call(1, 1, b"x").unwrap().payload, b"x");
    assert!(!s.log().contains("inheritable"), "{}", s.log());
    assert_eq!(s.stop(Duration::from_secs(10)).code(), Some(0));
    s.assert_clean();
}

/// The header's promise to C authors: a request's payload is 8-byte
/// aligned and never NULL, even empty, wherever its record falls in the
/// ring (sizes 0 to 40, over enough requests to wrap a 64 KiB ring).
/// The test plugins' handle answers PLUGIN_ERROR otherwise.
#[test]
fn a_c_plugin_gets_aligned_payloads_never_null() {
    let plugin = halfsync_testkit::c_plugin("plugins/c/test/fd_check.c");
    let port = free_port();
    let text = config(
        port,
        &plugin,
        1,
        "max_frame = \"16KiB\"\nring_size = \"64KiB\"",
    );
    let mut s = Server::start(&text, port);
    let mut c = s.client();
    for id in 0..3_000u64 {
        let payload = vec![b'p'; (id % 41) as usize];
        let r = c.call(id, 1, &payload).unwrap();
        assert_eq!(
            (r.code, r.payload.as_slice()),
            (0, payload.as_slice()),
            "request {id}: {}",
            String::from_utf8_lossy(&r.payload)
        );
    }
    s.stop(Duration::from_secs(30));
    s.assert_clean();
}

/// A plugin that logs (here: panics) or prints on every request gets at
/// most `PLUGIN_LINES_PER_SECOND` lines a second per worker into the log;
/// the rest are counted and the count is logged. (Before, 59,000 panics a
/// second wrote 59,000 lines, and a printing plugin cut the server's
/// throughput by half with the master writing its output.)
#[test]
fn a_plugin_flooding_the_log_is_held_to_a_budget() {
    let budget = halfsync_config::PLUGIN_LINES_PER_SECOND as usize;
    for (plugin, command, line, dropped, source) in [
        (
            fault_plugin_so(),
            fault::PANIC,
            "plugin panicked: fault: requested panic",
            "more plugin log lines dropped (more than",
            "plugin",
        ),
        (
            halfsync_testkit::c_plugin("plugins/c/test/printer.c"),
            1,
            "worker output: handled request",
            "more lines of worker output dropped (more than",
            "output",
        ),
    ] {
        let port = free_port();
        let mport = free_port();
        let text = config(
            port,
            &plugin,
            1,
            &format!("metrics_listen = \"127.0.0.1:{mport}\""),
        );
        let mut s = Server::start(&text, port);
        let mut c = s.client();
        let n = 3 * budget as u64;
        let t = Instant::now();
        for id in 0..n {
            c.send(id, command, b"x").unwrap();
        }
        for _ in 0..n {
            c.recv().unwrap();
        }
        let seconds = t.elapsed().as_secs() as usize + 1;
        let reported = wait_for(Duration::from_secs(10), || {
            s.log().contains(dropped).then_some(())
        });
        // The metric counts what the log says was dropped (once the
        // worker has reported, when its ring runs empty).
        let logged_count = |log: &str| -> u64 {
            log.lines()
                .filter_map(|l| {
                    l.split_once(dropped)?
                        .0
                        .rsplit(' ')
                        .nth(1)?
                        .parse::<u64>()
                        .ok()
                })
                .sum()
        };
        let series =
            format!("halfsync_log_lines_dropped_total{{group=\"echo\",source=\"{source}\"}}");
        let counted = wait_for(Duration::from_secs(10), || {
            let n = metric(&scrape(mport), &series);
            (n > 0 && n == logged_count(&s.log())).then_some(n)
        });
        let log = s.log();
        assert!(
            counted.is_some(),
            "{series}: {} in the metrics, {} in the log\n{log}",
            metric(&scrape(mport), &series),
            logged_count(&log)
        );
        let lines = log.lines().filter(|l| l.contains(line)).count();
        s.stop(Duration::from_secs(30));
        s.assert_clean();
        assert!(reported.is_some(), "no count of dropped lines: {log}");
        // (The plugin's own lines at start count too.)
        // (Windows start at the plugin's first line, not at the test's
        // clock: a burst across a window's end admits two budgets.)
        assert!(
            (budget - 10..=budget * (seconds + 1)).contains(&lines),
            "{lines} lines in {seconds} s, budget {budget}"
        );
    }
}

/// A Rust plugin's `log::warn!` (and that of any library it uses) reaches
/// halfsync's log once the plugin called `Host::forward_log` in init; it
/// went nowhere before (the plugin's copy of `log` had no logger). Lines
/// logged from the plugin's own threads name their worker too.
#[test]
fn a_plugins_log_crate_records_reach_the_log() {
    let port = free_port();
    let mut s = Server::start(&config(port, &fault_plugin_so(), 1, ""), port);
    let mut c = s.client();
    let r = c
        .call(1, fault::LOG_CRATE, b"hello from the log crate")
        .unwrap();
    assert_eq!(r.code, status::OK);
    // Both lines name their worker, the one from the plugin's own thread
    // too (the worker's span is entered around every plugin log line).
    let worker = format!("worker{{group=echo worker=0 pid={}}}", s.worker_pids()[0]);
    for thread in [false, true] {
        let logged = wait_for(Duration::from_secs(10), || {
            s.log()
                .lines()
                .any(|l| {
                    l.contains("WARN")
                        && l.contains(&worker)
                        && l.contains("fault: hello from the log crate")
                        && l.contains("(from a thread)") == thread
                })
                .then_some(())
        });
        assert!(logged.is_some(), "from a thread: {thread}: {}", s.log());
    }
    s.stop(Duration::from_secs(30));
    s.assert_clean();
}

/// Whether process `pid` is gone (or a zombie, dead and waiting for
/// whoever adopted it to reap it).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state == "Z"),
    }
}

/// A process a plugin started and forgot ends with its worker, whether
/// the worker crashed or was stopped: each worker leads a process group,
/// which the master kills when it reaps the worker. (They used to live
/// on, adopted by init, across every reload and stop.)
#[test]
fn processes_a_plugin_starts_end_with_its_worker() {
    let spawner = halfsync_testkit::c_plugin("plugins/c/test/spawner.c");
    let port = free_port();
    let mut s = Server::start(&config(port, &spawner, 1, ""), port);
    // The pid of a child its worker starts (on a fresh connection, retried
    // while a worker is coming back).
    let child = |s: &Server| -> i32 {
        wait_for(Duration::from_secs(20), || {
            let mut c = Client::connect(s.addr).ok()?;
            let r = c.call(1, 2, b"").ok()?;
            (r.code == status::OK).then(|| String::from_utf8_lossy(&r.payload).parse().ok())?
        })
        .unwrap_or_else(|| panic!("{}", s.log()))
    };
    // The worker dies (as by a crash): its child goes with it.
    let first = child(&s);
    assert!(!gone(first));
    let worker = s.worker_pids()[0];
    kill(worker, libc::SIGKILL);
    let ended = wait_for(Duration::from_secs(10), || gone(first).then_some(()));
    assert!(
        ended.is_some(),
        "pid {first} outlived its worker\n{}",
        s.log()
    );
    let back = wait_for(Duration::from_secs(10), || {
        (s.worker_pids().len() == 1 && s.worker_pids()[0] != worker).then_some(())
    });
    assert!(back.is_some(), "{}", s.log());
    let second = child(&s);
    assert!(!gone(second));
    // The proxy dies: its workers are killed with it, and their children.
    let proxy = s.pids_titled("halfsync: proxy");
    kill(proxy[0], libc::SIGKILL);
    let ended = wait_for(Duration::from_secs(10), || gone(second).then_some(()));
    assert!(
        ended.is_some(),
        "pid {second} outlived its proxy's death\n{}",
        s.log()
    );
    // A stop: the next worker's child goes too.
    let third = child(&s);
    assert!(!gone(third));
    assert_eq!(s.stop(Duration::from_secs(30)).code(), Some(0));
    let ended = wait_for(Duration::from_secs(10), || gone(third).then_some(()));
    assert!(ended.is_some(), "pid {third} outlived the server");
    s.assert_clean();
}

/// A process a plugin starts while the plugin probe loads it (at start and
/// at each reload) ends with the probe, and the master's threads that read
/// the probe's output leave the master's signals alone. (Such a process
/// held the probe's pipes, so their reader threads lived on with no signal
/// blocked: a SIGUSR1 to rotate logs, or a SIGTERM, killed the master by
/// its default action, and a SIGCHLD could be lost.)
#[test]
fn a_process_a_plugin_starts_in_the_probe_ends_with_it() {
    let spawner = halfsync_testkit::c_plugin("plugins/c/test/spawner.c");
    let dir = temp_dir();
    let pids = dir.path().join("pids");
    let port = free_port();
    let pidfile = pids.display().to_string();
    let mut s = Server::start_env(
        &config(port, &spawner, 1, ""),
        port,
        &[("SPAWNER_LOAD_PIDFILE", &pidfile)],
    );
    let children = |role: &str| -> Vec<i32> {
        std::fs::read_to_string(&pids)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix(role)?.trim().parse().ok())
            .collect()
    };
    let probed = children("halfsync-probe ");
    assert_eq!(probed.len(), 1, "{:?}", std::fs::read_to_string(&pids));
    let ended = wait_for(Duration::from_secs(10), || gone(probed[0]).then_some(()));
    assert!(ended.is_some(), "pid {} outlived the probe", probed[0]);
    // The master takes SIGUSR1 (reopen logs) and goes on serving, and it
    // sees each of its workers die.
    s.signal(libc::SIGUSR1);
    for round in 0..3u64 {
        let worker = s.worker_pids()[0];
        kill(worker, libc::SIGKILL);
        let back = wait_for(Duration::from_secs(10), || {
            let w = s.worker_pids();
            (w.len() == 1 && w[0] != worker).then_some(())
        });
        assert!(back.is_some(), "round {round}: {}", s.log());
    }
    let mut c = s.client();
    assert_eq!(c.call(1, 1, b"x").unwrap().code, status::OK);
    // A reload's probe: the same.
    let (code, _, err) = s.ctl(&["reload"]);
    assert_eq!(code, Some(0), "{err}");
    let probed = children("halfsync-probe ");
    assert_eq!(probed.len(), 2, "{:?}", std::fs::read_to_string(&pids));
    let ended = wait_for(Duration::from_secs(10), || gone(probed[1]).then_some(()));
    assert!(
        ended.is_some(),
        "pid {} outlived the reload's probe",
        probed[1]
    );
    assert_eq!(s.stop(Duration::from_secs(30)).code(), Some(0));
    for pid in children("") {
        let ended = wait_for(Duration::from_secs(10), || gone(pid).then_some(()));
        assert!(ended.is_some(), "pid {pid} outlived the server");
    }
    s.assert_clean();
}

/// Process `pid`'s open-file limit.
fn nofile(pid: i32) -> libc::rlimit {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is valid storage for the old limit; no new one is set.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut lim) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    lim
}

/// The lowest descriptor number process `pid` has free.
fn lowest_free_fd(pid: i32) -> u64 {
    let open: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !open.contains(n)).unwrap_or(0)
}

/// Waits (up to 10 s) until a new connection's echo is answered OK.
fn wait_served(s: &Server) {
    let served = wait_for(Duration::from_secs(10), || {
        let mut c = Client::connect(s.addr).ok()?;
        (c.call(1, 1, b"x").ok()?.code == status::OK).then_some(())
    });
    assert!(served.is_some(), "{}", s.log());
}

/// Sets process `pid`'s open-file limit (soft and hard).
fn set_nofile(pid: i32, soft: u64, hard: u64) {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `lim` is a valid rlimit; a null old-limit pointer is allowed.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// A worker the master cannot start (out of descriptors) is retried about
/// once a second, even with no restart delay, and starts once it can. (A
/// failed start called the timers that retried it, recursively: with
/// `restart_delay = "0s"` the master overflowed its stack and died.)
#[test]
fn a_worker_the_master_cannot_start_is_retried_without_a_storm() {
    let port = free_port();
    let mut s = Server::start(
        &fault_config(
            port,
            &fault_plugin_so(),
            1,
            "restart_delay = \"0s\"\nrestart_delay_max = \"0s\"",
        ),
        port,
    );
    let master = s.pid;
    let lim = nofile(master);
    let worker = s.worker_pids()[0];
    // Every descriptor the master opens from now on fails.
    set_nofile(master, 16, lim.rlim_max);
    kill(worker, libc::SIGKILL);
    let failing = wait_for(Duration::from_secs(10), || {
        (s.log().matches("Too many open files").count() >= 2).then_some(())
    });
    assert!(failing.is_some(), "{}", s.log());
    std::thread::sleep(Duration::from_millis(1500));
    assert!(alive(master), "the master died: {}", s.log());
    let tries = s.log().matches("Too many open files").count();
    assert!(tries <= 8, "{tries} attempts in ~3 s: {}", s.log());
    set_nofile(master, lim.rlim_cur, lim.rlim_max);
    let back = wait_for(Duration::from_secs(10), || {
        let w = s.worker_pids();
        (w.len() == 1 && w[0] != worker).then_some(())
    });
    assert!(back.is_some(), "{}", s.log());
    let mut c = s.client();
    let r = wait_for(Duration::from_secs(10), || {
        c.call(1, 1, b"x").ok().filter(|r| r.code == status::OK)
    });
    assert!(r.is_some(), "{}", s.log());
    assert_eq!(s.stop(Duration::from_secs(30)).code(), Some(0));
    s.assert_clean();
}

/// A proxy that dies and cannot be started again at once (the master out
/// of descriptors) is retried until it starts, with its workers; the
/// server does not stop. (It stopped: "starting the proxy: Too many open
/// files; stopping".)
#[test]
fn a_proxy_that_cannot_be_restarted_at_once_is_retried() {
    let port = free_port();
    let mut s = Server::start(&fault_config(port, &fault_plugin_so(), 1, ""), port);
    let master = s.pid;
    let lim = nofile(master);
    // No descriptor free below the limit: the master can open none.
    let lowest_free = lowest_free_fd(master);
    set_nofile(master, lowest_free, lim.rlim_max);
    let proxy = s.pids_titled("halfsync: proxy")[0];
    kill(proxy, libc::SIGKILL);
    let failing = wait_for(Duration::from_secs(10), || {
        s.log().contains("trying again in 1 s").then_some(())
    });
    assert!(failing.is_some(), "{}", s.log());
    std::thread::sleep(Duration::from_millis(1500));
    assert!(alive(master), "the master stopped: {}", s.log());
    assert!(!s.log().contains("stopping"), "{}", s.log());
    // Meanwhile, resizing is refused: the waiting proxy's workers are not
    // gone, and would be doubled. (The admin client's descriptor is one
    // the dead proxy's channel freed.)
    let (code, out, err) = s.ctl(&["scale", "fault", "2"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("could not be restarted yet"), "{err}");
    let (code, out, err) = s.ctl(&["reload"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("could not be restarted yet"), "{err}");
    set_nofile(master, lim.rlim_cur, lim.rlim_max);
    wait_served(&s);
    assert_eq!(s.stop(Duration::from_secs(30)).code(), Some(0));
    s.assert_clean();
}

/// A group left short of workers by a start that failed in the master
/// (here, a proxy's restart that got its proxy but not its worker, the
/// master out of descriptors) is filled again once starting works: the
/// master checks every second that each group has its workers. (The slot
/// stayed unused, the group at "0 workers, 1 wanted", for good.)
#[test]
fn a_group_short_of_workers_is_filled_again() {
    let port = free_port();
    let mut s = Server::start(&fault_config(port, &fault_plugin_so(), 1, ""), port);
    let master = s.pid;
    let lim = nofile(master);
    let lowest_free = lowest_free_fd(master);
    // Room for the proxy's descriptors (with the dead one's given back),
    // not for its worker's as well (measured: 5 to 7 above the lowest
    // free one does that).
    set_nofile(master, lowest_free + 6, lim.rlim_max);
    let proxy = s.pids_titled("halfsync: proxy")[0];
    kill(proxy, libc::SIGKILL);
    let short = wait_for(Duration::from_secs(10), || {
        s.log()
            .contains("group short of workers (a start failed); starting the rest")
            .then_some(())
    });
    assert!(short.is_some(), "{}", s.log());
    set_nofile(master, lim.rlim_cur, lim.rlim_max);
    wait_served(&s);
    assert_eq!(s.worker_pids().len(), 1);
    assert_eq!(s.stop(Duration::from_secs(30)).code(), Some(0));
    s.assert_clean();
}

/// A worker that floods its output and dies: of what the master had not
/// read yet, only the last lines get past the budget (its last words are
/// kept), and the rest is counted. (All of it, up to the pipe's 64 KiB and
/// more, was logged at once.)
#[test]
fn a_dying_workers_unread_flood_is_held_to_its_last_words() {
    let printer = halfsync_testkit::c_plugin("plugins/c/test/printer.c");
    let port = free_port();
    let mut s = Server::start(&config(port, &printer, 1, ""), port);
    let mut c = s.client();
    assert_eq!(c.call(1, 3, b"").unwrap().code, status::WORKER_DIED);
    // (Read to its end once the worker is gone, a turn or two later.)
    let died = wait_for(Duration::from_secs(10), || {
        let log = s.log();
        (log.contains("worker died") && log.contains("worker output: dying now")).then_some(())
    });
    assert!(died.is_some(), "{}", s.log());
    let log = s.log();
    let lines = log
        .lines()
        .filter(|l| l.contains("worker output: flood line"))
        .count();
    let budget = halfsync_config::PLUGIN_LINES_PER_SECOND as usize;
    assert!(lines <= 3 * budget + 16, "{lines} lines logged");
    assert!(log.contains("worker output: dying now"), "{log}");
    assert!(log.contains("more lines of worker output dropped"), "{log}");
    s.stop(Duration::from_secs(30));
    s.assert_clean();
}

/// What a worker writes to its stderr (here a Rust plugin's panic that
/// cannot unwind, printed by the panic hook as the worker aborts) is
/// logged by the master as the worker's, in the log's format: with
/// `log_format = "json"` every line stays a JSON object, and the worker's
/// last words come before the line saying it died.
#[test]
fn a_workers_stderr_is_logged_as_its_own_lines() {
    let port = free_port();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\nlog_format = \"json\"\n\n[[group]]\nname = \"g\"\nplugin = \"{}\"\nworkers = 1\n",
        fault_plugin_so().display()
    );
    let mut s = Server::start(&text, port);
    let mut c = s.client();
    let r = c.call(1, fault::ESCAPING_PANIC, b"").unwrap();
    assert_eq!(r.code, status::WORKER_DIED);
    let died = wait_for(Duration::from_secs(10), || {
        s.log().contains("worker died").then_some(())
    });
    assert!(died.is_some(), "{}", s.log());
    s.stop(Duration::from_secs(30));
    let log = s.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}\n{log}")))
        .collect();
    let message = |v: &serde_json::Value| v["message"].as_str().unwrap_or("").to_owned();
    let said = lines
        .iter()
        .position(|v| message(v).starts_with("worker output: ") && message(v).contains("panic"))
        .unwrap_or_else(|| panic!("no output line of the worker's panic:\n{log}"));
    assert_eq!(lines[said]["group"], "g", "{}", lines[said]);
    assert!(lines[said]["pid"].is_number(), "{}", lines[said]);
    let died = lines
        .iter()
        .position(|v| message(v).starts_with("worker died"))
        .unwrap();
    assert!(
        said < died,
        "the worker's last words after its death:\n{log}"
    );
    s.assert_clean();
}

/// A worker told to exit (scaled down, or the server stopping) that dies
/// on its way out, in its plugin's `fini`, is a warning naming the
/// signal, not an "exited" info line: a plugin whose cleanup crashes every
/// time would otherwise go unnoticed.
#[test]
fn a_crash_in_fini_is_a_warning() {
    let port = free_port();
    let text = fault_config(
        port,
        &fault_plugin_so(),
        2,
        "[group.config]\ncrash_in_fini = true\n",
    );
    let mut s = Server::start(&text, port);
    // Both workers past their init (one still starting when scaled away
    // is stopped before its plugin could run fini: a flake under load).
    let ready = wait_for(Duration::from_secs(20), || {
        let st = s.status();
        let ws = st["groups"][0]["workers"].as_array()?.clone();
        (ws.len() == 2 && ws.iter().all(|w| w["state"] == "idle")).then_some(())
    });
    assert!(ready.is_some(), "{}", s.status());
    let warning = "worker failed while exiting (killed by SIGSEGV";
    let (code, out, err) = s.ctl(&["scale", "fault", "1"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let logged = wait_for(Duration::from_secs(10), || {
        s.log().contains(warning).then_some(())
    });
    assert!(logged.is_some(), "{}", s.log());
    assert!(s.log().contains("fault: crashing in fini"), "{}", s.log());
    // The stop still succeeds; the last worker's crash is named too.
    assert_eq!(s.stop(Duration::from_secs(30)).code(), Some(0));
    assert_eq!(s.log().matches(warning).count(), 2, "{}", s.log());
    s.assert_clean();
}

/// A plugin that keeps the `hs_reply` of a finished `handle` call and
/// writes through it later (the header says it must not) gets -1 and
/// NULL: its bytes do not land in the reply of the request running then,
/// which may be another client's. (They did: the late "LATE" came out at
/// the head of the next reply.)
#[test]
fn a_reply_kept_past_its_call_is_refused() {
    let plugin = halfsync_testkit::c_plugin("plugins/c/test/late_reply.c");
    let port = free_port();
    let mut s = Server::start(&config(port, &plugin, 1, ""), port);
    let mut c = s.client();
    assert_eq!(c.call(1, 116, b"").unwrap().payload, b"kept");
    let r = c.call(2, 117, b"").unwrap();
    assert_eq!(
        String::from_utf8_lossy(&r.payload),
        "write -1, write via ctx -1, reserve NULL"
    );
    // The worker goes on serving.
    assert_eq!(c.call(3, 1, b"still").unwrap().payload, b"still");
    s.stop(Duration::from_secs(30));
    s.assert_clean();
}

/// Plugins learn which group they serve and which worker of it they are
/// (`hs_host.group`, `.worker`; the SDK's `Host::group`, `Host::worker`),
/// the same number after a restart: Rust and C alike. The fault plugins
/// say it when ready, inside the worker's own span, which must agree.
#[test]
fn a_plugin_knows_its_group_and_worker_number() {
    for plugin in [fault_plugin_so(), halfsync_testkit::c_fault_plugin()] {
        let port = free_port();
        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\n\n\
             [[group]]\nname = \"game\"\nplugin = \"{}\"\nworkers = 2\n",
            plugin.display()
        );
        let mut s = Server::start(&text, port);
        s.wait_tree(3);
        // (worker, pid) of each "ready" line whose plugin-side number
        // matches the worker span's.
        let ready = |log: &str| -> Vec<(u32, i32)> {
            log.lines()
                .filter_map(|l| {
                    let (_, span) = l.split_once("worker{group=game worker=")?;
                    let (n, rest) = span.split_once(" pid=")?;
                    let (pid, _) = rest.split_once('}')?;
                    l.contains(&format!("fault plugin ready (group=game worker={n})"))
                        .then(|| Some((n.parse().ok()?, pid.parse().ok()?)))?
                })
                .collect()
        };
        let both = wait_for(Duration::from_secs(10), || {
            let r = ready(&s.log());
            let mut n: Vec<u32> = r.iter().map(|x| x.0).collect();
            n.sort_unstable();
            (n == [0, 1]).then_some(r)
        });
        let both = both.unwrap_or_else(|| panic!("{}: {}", plugin.display(), s.log()));
        // Through the server: a WHOAMI comes back from one of them.
        let r = s.client().call(1, fault::WHOAMI, b"").unwrap();
        let who = String::from_utf8_lossy(&r.payload).into_owned();
        assert!(
            who == "group=game worker=0" || who == "group=game worker=1",
            "{who}"
        );
        // After a restart, worker 1 is worker 1 again, in a new process.
        let old = both.iter().find(|x| x.0 == 1).map(|x| x.1).unwrap();
        kill(old, libc::SIGKILL);
        let again = wait_for(Duration::from_secs(10), || {
            ready(&s.log())
                .iter()
                .any(|&(n, pid)| n == 1 && pid != old)
                .then_some(())
        });
        assert!(again.is_some(), "{}", s.log());
        s.stop(Duration::from_secs(30));
        s.assert_clean();
    }
}

/// A worker that scribbles over its control block (where it reports the
/// log lines it dropped) cannot poison `halfsync_log_lines_dropped_total`:
/// the master believes the count only from a block that still names the
/// worker and only up to what a worker could drop. (It jumped to ~1.2e19
/// and stayed there.)
#[test]
fn a_scribbled_control_block_does_not_poison_the_dropped_log_counter() {
    let port = free_port();
    let mport = free_port();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\nmetrics_listen = \"127.0.0.1:{mport}\"\n\n\
         [[group]]\nname = \"fault\"\nplugin = \"{}\"\nworkers = 1\nrequest_timeout = \"3s\"\n",
        fault_plugin_so().display()
    );
    let mut s = Server::start(&text, port);
    let before = s.worker_pids();
    let mut c = s.client();
    let mut payload = vec![fault::SCRIBBLE_CONTROL_HANG];
    payload.extend(100u32.to_be_bytes());
    let r = c.call(1, fault::SCRIBBLE, &payload).unwrap();
    assert_eq!(r.code, status::WORKER_DIED);
    let replaced = wait_for(Duration::from_secs(20), || {
        let now = s.worker_pids();
        (now.len() == 1 && now != before).then_some(())
    });
    assert!(replaced.is_some(), "{}", s.log());
    let series = "halfsync_log_lines_dropped_total{group=\"fault\",source=\"plugin\"}";
    let scraped = scrape(mport);
    assert_eq!(metric(&scraped, series), 0, "{scraped}");
    s.stop(Duration::from_secs(30));
    s.assert_clean();
}

/// Every line a plugin logs is either in the log or counted as dropped,
/// also in the second a worker exits in: a worker recycled right after a
/// burst of 1,000 log lines (caught panics) reports the last second's
/// drops on its way out, in the log and in
/// `halfsync_log_lines_dropped_total`, which keeps them after the worker
/// is gone. (They were lost: the count waited for the second to end.)
#[test]
fn a_log_burst_just_before_a_recycle_is_fully_counted() {
    const BURST: u64 = 1000;
    let port = free_port();
    let mport = free_port();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\nmetrics_listen = \"127.0.0.1:{mport}\"\n\n\
         [[group]]\nname = \"fault\"\nplugin = \"{}\"\nworkers = 1\nmax_requests = {BURST}\n",
        fault_plugin_so().display()
    );
    let mut s = Server::start(&text, port);
    // (The readiness probe was request 1 of the first worker.)
    let mut c = s.client();
    for id in 0..BURST {
        c.send(id, fault::PANIC, b"").unwrap();
    }
    for _ in 0..BURST {
        let _ = c.recv().unwrap();
    }
    let recycled = wait_for(Duration::from_secs(20), || {
        s.log().contains("cause=\"recycle\"").then_some(())
    });
    assert!(recycled.is_some(), "{}", s.log());
    let series = "halfsync_log_lines_dropped_total{group=\"fault\",source=\"plugin\"}";
    let whole = wait_for(Duration::from_secs(10), || {
        let log = s.log();
        let logged = log
            .matches("plugin panicked: fault: requested panic")
            .count() as u64;
        let counted: u64 = log
            .lines()
            .filter_map(|l| {
                l.split_once("more plugin log lines dropped")?
                    .0
                    .rsplit(' ')
                    .nth(1)?
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        let metric = metric(&scrape(mport), series);
        (logged + counted == BURST && metric == counted).then_some(())
    });
    assert!(
        whole.is_some(),
        "{} in the metric\n{}",
        metric(&scrape(mport), series),
        s.log()
    );
    s.stop(Duration::from_secs(30));
    s.assert_clean();
}
