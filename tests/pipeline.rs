use std::time::Duration;

use halfsync_protocol::status;

use crate::support::*;

fn pipeline_then_sigterm(plugin: std::path::PathBuf) {
    let port = free_port();
    // Up to 10,000 requests in flight at once: a wait queue with room for
    // all of them, so none is refused BUSY (overload has its own test).
    let text = config(port, &plugin, 2, "") + "max_queue = 10000\n";
    let mut s = Server::start(&text, port);
    // The proxy and 2 workers.
    s.wait_tree(3);

    // 50 connections x 200 pipelined requests, payloads of 0..=64 KiB.
    many_pipelines(s.addr, 50, 200, 64 << 10);

    let st = s.stop(Duration::from_secs(10));
    assert_eq!(st.code(), Some(0), "exit status {st:?}; log:\n{}", s.log());
    s.assert_clean();
}

#[test]
fn rust_echo_50_connections_200_pipelined_each() {
    pipeline_then_sigterm(echo_so());
}

#[test]
fn c_echo_50_connections_200_pipelined_each() {
    pipeline_then_sigterm(c_echo_so());
}

/// A C++ plugin written against the C header alone (no `extern "C"` of
/// its own, built with `-fvisibility=hidden`): the header gives the entry
/// point C linkage and default visibility.
#[test]
fn cxx_echo_50_connections_200_pipelined_each() {
    pipeline_then_sigterm(halfsync_testkit::cxx_echo_plugin());
}

/// In-flight requests finish during a graceful stop: the replies of
/// requests already sent arrive before the connection closes.
#[test]
fn sigterm_lets_inflight_requests_finish() {
    let port = free_port();
    let mut s = Server::start(&config(port, &echo_so(), 2, ""), port);
    let mut c = s.client();
    for id in 0..500u64 {
        c.send(id, 1, &payload(9, 0, id, 4096)).unwrap();
    }
    // SIGTERM while those are in flight: once the first is answered (so
    // that the proxy has read some before the stop even on a loaded
    // machine, where the signal could otherwise come first).
    let first = c.recv().unwrap();
    assert_eq!(first.code, status::OK);
    s.signal(libc::SIGTERM);
    let (mut ok, mut refused) = (1, 0);
    while let Ok(f) = c.recv() {
        match f.code {
            status::OK => {
                assert_eq!(f.payload, payload(9, 0, f.id, 4096));
                ok += 1;
            }
            status::SHUTTING_DOWN => refused += 1,
            other => panic!("status {other}"),
        }
    }
    // Requests the proxy read before the stop are answered OK; ones it
    // read after it are refused with SHUTTING_DOWN, never dropped
    // silently or failed.
    assert!(ok > 0, "no request finished");
    assert!(ok + refused <= 500);
    let st = s.wait_exit(Duration::from_secs(10));
    assert_eq!(st.code(), Some(0));
    s.assert_clean();
}

/// Requests a client sent just before a graceful stop, which its proxy had
/// not read yet (the connection idle as far as it knew), are answered
/// SHUTTING_DOWN, and the connection ends with an EOF after the last
/// reply, never a reset. (Such a connection was closed with the requests
/// unread, which resets it: the client got ECONNRESET, its requests no
/// answer, and replies it had not read yet were lost with it.)
#[test]
fn requests_unread_when_a_stop_begins_are_answered() {
    let port = free_port();
    let mut s = Server::start(&config(port, &echo_so(), 1, ""), port);
    let mut c = s.client();
    c.stream()
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    assert_eq!(c.call(1, 1, b"x").unwrap().code, status::OK);
    // The proxy stopped, so that it takes the master's stop before it
    // reads what comes after it.
    let proxy = s.pids_titled("halfsync: proxy")[0];
    kill(proxy, libc::SIGSTOP);
    let stopped = wait_for(Duration::from_secs(10), || {
        let stat = std::fs::read_to_string(format!("/proc/{proxy}/stat")).ok()?;
        let state = stat[stat.rfind(')')? + 1..]
            .split_whitespace()
            .next()?
            .to_owned();
        (state == "T").then_some(())
    });
    assert!(stopped.is_some());
    s.signal(libc::SIGTERM);
    let told = wait_for(Duration::from_secs(10), || {
        s.log().contains("stopping: draining").then_some(())
    });
    assert!(told.is_some(), "{}", s.log());
    std::thread::sleep(Duration::from_millis(100));
    for id in 10..15u64 {
        c.send(id, 1, b"late").unwrap();
    }
    kill(proxy, libc::SIGCONT);
    let mut answered = Vec::new();
    loop {
        match c.recv() {
            Ok(f) => {
                assert!(
                    matches!(f.code, status::OK | status::SHUTTING_DOWN),
                    "status {}",
                    f.code
                );
                answered.push(f.id);
                assert!(answered.len() <= 5, "{answered:?}");
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => panic!("{e} after {answered:?}: {}", s.log()),
        }
    }
    assert_eq!(answered, (10..15).collect::<Vec<_>>());
    let st = s.wait_exit(Duration::from_secs(10));
    assert_eq!(st.code(), Some(0));
    s.assert_clean();
}

/// Every benchmark switch that turns a technique off (HALFSYNC_TUNING)
/// still serves correctly: the switches only change how fast.
#[test]
fn benchmark_switches_do_not_change_behaviour() {
    for switch in [
        "plain_accept",
        "no_direct_send",
        "flush_per_reply",
        "clock_per_event",
        "publish_per_request",
        "always_wake",
        "no_read_budget",
        "fifo_queue",
        "no_batch_affinity",
        "no_midturn_dispatch",
    ] {
        let port = free_port();
        let mut s = Server::start_env(
            &config(port, &echo_so(), 2, ""),
            port,
            &[("HALFSYNC_TUNING", switch)],
        );
        many_pipelines(s.addr, 8, 100, 8 << 10);
        assert!(
            s.log().contains("benchmark tuning switches in effect"),
            "{switch}"
        );
        assert_eq!(s.stop(Duration::from_secs(10)).code(), Some(0), "{switch}");
    }
}

/// The inline baseline (`run --inline`) serves the same protocol with the
/// plugin inside the proxy and no worker processes; the plugin is told it
/// is its group's worker 0.
#[test]
fn inline_baseline_serves_without_workers() {
    let port = free_port();
    let dir = temp_dir();
    let path = dir.path().join("inline.toml");
    std::fs::write(
        &path,
        with_admin_socket(
            &config(port, &halfsync_testkit::fault_plugin(), 2, ""),
            dir.path(),
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(BIN)
        .args(["run", "--inline", "--config"])
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let ready = wait_for(Duration::from_secs(20), || {
        let mut c = halfsync_protocol::Client::connect(("127.0.0.1", port)).ok()?;
        (c.call(1, 1, b"in").ok()?.payload == b"in").then_some(())
    });
    let tree = descendants(pid);
    let who = halfsync_protocol::Client::connect(("127.0.0.1", port))
        .and_then(|mut c| c.call(2, halfsync_testkit::fault::WHOAMI, b""))
        .map(|r| r.payload);
    let ok = ready.is_some()
        && tree.len() == 1
        && tree.iter().all(|&p| cmdline(p).contains("halfsync: proxy"))
        && who.as_deref().ok() == Some(&b"group=echo worker=0"[..]);
    if ok {
        many_pipelines(
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            8,
            100,
            8 << 10,
        );
    }
    // SAFETY: kill has no memory effects; the pid is our child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let st = wait_for(Duration::from_secs(10), || child.try_wait().ok().flatten());
    if st.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(
        ok,
        "inline server: ready {:?}, processes {tree:?}, whoami {who:?}",
        ready.is_some()
    );
    assert_eq!(st.and_then(|s| s.code()), Some(0));
}

/// A client that pipelines far more than it reads has its reading paused
/// behind its replies; a stop then still reads what it had sent into the
/// proxy's socket and answers it (OK or SHUTTING_DOWN) as the replies
/// drain, and the connection ends with an EOF after the last reply, not a
/// reset. (What sat in the socket was dropped unanswered at the stop, and
/// the close 500 ms after the FIN reset a connection whose replies were
/// still on their way.)
#[test]
fn a_stop_answers_what_a_paused_connection_had_sent() {
    paused_connection_at_a_stop(false);
}

/// The same, for a client that reads its replies slowly: the proxy's
/// lingering close waits while they are still on their way (the kernel's
/// send queue shrinks), instead of resetting the connection 500 ms after
/// its FIN.
#[test]
fn a_stop_waits_for_a_slow_readers_replies() {
    paused_connection_at_a_stop(true);
}

fn paused_connection_at_a_stop(slow_reader: bool) {
    use std::io::{Read, Write};
    let port = free_port();
    let mut s = Server::start(&config(port, &echo_so(), 1, ""), port);
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    // A small receive buffer: the proxy's replies back up at once.
    sock.set_recv_buffer_size(8 << 10).unwrap();
    sock.connect(&s.addr.into()).unwrap();
    let stream: std::net::TcpStream = sock.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    const N: u64 = 20_000;
    let mut w = stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let payload = vec![b'p'; 1024];
        for id in 0..N {
            let mut frame = halfsync_protocol::encode_header(id, 1, 0, payload.len()).to_vec();
            frame.extend_from_slice(&payload);
            if w.write_all(&frame).is_err() {
                return id;
            }
        }
        N
    });
    // Reading paused behind the replies, the rest in the sockets.
    std::thread::sleep(Duration::from_millis(700));
    s.signal(libc::SIGTERM);
    let mut r = Reader(stream);
    let (mut ok, mut refused) = (0u64, 0u64);
    // (SHUTTING_DOWN answers come at once, so they may overtake the OK
    // replies of requests still running: by id, once each.)
    let mut seen = std::collections::HashSet::new();
    loop {
        match r.frame() {
            Ok(f) => {
                assert!(f.id < N && seen.insert(f.id), "reply id {}", f.id);
                if slow_reader && seen.len() % 32 == 0 {
                    // About 1.5 MB/s: seconds for what is queued.
                    std::thread::sleep(Duration::from_millis(20));
                }
                match f.code {
                    // (BUSY: past max_queue, a load this deep is refused.)
                    status::OK | status::BUSY => ok += 1,
                    status::SHUTTING_DOWN => refused += 1,
                    other => panic!("status {other}"),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => panic!(
                "{e} after {ok} OK or BUSY and {refused} SHUTTING_DOWN: {}",
                s.log()
            ),
        }
    }
    let written = writer.join().unwrap();
    assert!(
        ok > 0 && ok + refused <= written,
        "{ok} + {refused} of {written}"
    );
    assert!(
        refused > 0,
        "nothing answered SHUTTING_DOWN ({ok} OK of {written} written)"
    );
    let mut rest = Vec::new();
    let _ = r.0.read_to_end(&mut rest);
    let st = s.wait_exit(Duration::from_secs(20));
    assert_eq!(st.code(), Some(0));
    s.assert_clean();
}
