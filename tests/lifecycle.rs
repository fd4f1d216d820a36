use std::time::Duration;

use halfsync_protocol::status;

use crate::support::*;

#[test]
fn every_process_names_its_role() {
    let port = free_port();
    let mut s = Server::start(&config(port, &echo_so(), 2, ""), port);
    s.wait_tree(3);
    assert!(
        cmdline(s.pid).starts_with("halfsync: master"),
        "{}",
        cmdline(s.pid)
    );
    assert_eq!(s.pids_titled("halfsync: proxy").len(), 1);
    assert_eq!(s.pids_titled("halfsync: worker echo 0").len(), 1);
    assert_eq!(s.pids_titled("halfsync: worker echo 1").len(), 1);
    assert_eq!(s.stop(Duration::from_secs(10)).code(), Some(0));
    s.assert_clean();
}

#[test]
fn a_killed_worker_is_replaced_and_service_continues() {
    let port = free_port();
    let mut s = Server::start(&config(port, &echo_so(), 2, ""), port);
    s.wait_tree(3);
    let mut c = s.client();
    for round in 0..3 {
        let before = s.worker_pids();
        assert_eq!(before.len(), 2, "{before:?}");
        // SAFETY: kill has no memory effects; the pid is our test server's worker.
        unsafe { libc::kill(before[0], libc::SIGKILL) };
        let replaced = wait_for(Duration::from_secs(10), || {
            let now = s.worker_pids();
            (now.len() == 2 && !now.contains(&before[0])).then_some(now)
        });
        assert!(replaced.is_some(), "round {round}: worker not replaced");
        for id in 0..100 {
            let r = c.call(id, 1, b"still here").unwrap();
            assert_eq!(
                (r.id, r.code, &r.payload[..]),
                (id, status::OK, &b"still here"[..])
            );
        }
    }
    assert!(
        s.log().contains("worker died (killed by SIGKILL (9))"),
        "{}",
        s.log()
    );
    assert_eq!(s.stop(Duration::from_secs(10)).code(), Some(0));
    s.assert_clean();
}

#[test]
fn killing_the_master_takes_every_child_with_it() {
    let port = free_port();
    let mut s = Server::start(&config(port, &echo_so(), 3, ""), port);
    s.wait_tree(4);
    s.signal(libc::SIGKILL);
    let st = s.wait_exit(Duration::from_secs(10));
    assert_eq!(st.code(), None, "killed by a signal");
    s.assert_clean();
}

/// The README's first command: `halfsync run` with no config serves the
/// bundled echo plugin on 127.0.0.1:7878.
#[test]
fn embedded_default_serves_echo_on_7878() {
    // The bundled plugin must sit next to the binary, where `cargo build
    // --workspace` puts it.
    let so = echo_so();
    assert_eq!(so.parent(), std::path::Path::new(BIN).parent());
    let mut s = Server::spawn_with(None, 7878);
    s.wait_ready();
    s.wait_tree(3);
    let two = wait_for(Duration::from_secs(10), || {
        (s.worker_pids().len() == 2).then_some(())
    });
    assert!(two.is_some(), "{}", s.log());
    many_pipelines(s.addr, 4, 50, 1000);
    assert_eq!(s.stop(Duration::from_secs(10)).code(), Some(0));
    s.assert_clean();
}

/// A supervisor may send SIGTERM again while halfsync drains (systemd does
/// after an ExecStop): the drain still completes; only a second SIGINT
/// cuts it short.
#[test]
fn repeated_sigterm_does_not_cut_the_drain_short() {
    let port = free_port();
    let text = config(port, &halfsync_testkit::fault_plugin(), 1, "");
    let mut s = Server::start(&text, port);
    let mut c = s.client();
    c.send(1, halfsync_testkit::fault::SLOW, &2000u32.to_be_bytes())
        .unwrap();
    s.wait_busy();
    s.signal(libc::SIGTERM);
    // The second only once the first is handled (two pending would merge).
    let stopping = wait_for(Duration::from_secs(10), || {
        s.log().contains("stopping: draining").then_some(())
    });
    assert!(stopping.is_some(), "{}", s.log());
    s.signal(libc::SIGTERM);
    let r = c.recv().unwrap();
    assert_eq!((r.id, r.code), (1, status::OK));
    assert_eq!(s.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert!(s.log().contains("already stopping"));
    s.assert_clean();
}

/// A server whose one worker runs request `id` for ever (`HANG`), with
/// shutdown grace `grace`; and the client that sent it.
fn one_request_hanging(id: u64, grace: &str) -> (Server, halfsync_protocol::Client) {
    let port = free_port();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\nshutdown_grace = \"{grace}\"\n\n[[group]]\nname = \"g\"\nplugin = \"{}\"\nworkers = 1\nrequest_timeout = \"60s\"\n",
        halfsync_testkit::fault_plugin().display()
    );
    let s = Server::start(&text, port);
    let mut c = s.client();
    c.send(id, halfsync_testkit::fault::HANG, b"").unwrap();
    s.wait_busy();
    (s, c)
}

/// The stop ended with exit 0, no reply came for request `id`, and the
/// log names it as abandoned.
fn assert_abandoned(s: &mut Server, c: &mut halfsync_protocol::Client, id: u64, code: Option<i32>) {
    assert_eq!(code, Some(0), "{}", s.log());
    assert!(c.recv().is_err(), "a reply came for the abandoned request");
    let log = s.log();
    assert!(
        log.contains(&format!(
            "abandoning request id {id} (command 15), running for "
        )),
        "{log}"
    );
    s.assert_clean();
}

/// A request still running when the shutdown grace ends is abandoned: its
/// client sees the connection close without a reply, the stop still ends
/// with exit 0, and the log names the request (id, command, how long it
/// ran).
#[test]
fn a_request_running_past_the_grace_is_abandoned_and_named() {
    let (mut s, mut c) = one_request_hanging(77, "1s");
    let code = s.stop(Duration::from_secs(30)).code();
    assert_abandoned(&mut s, &mut c, 77, code);
}

/// A fast stop (a second SIGINT, or `stop --fast`) names the requests it
/// abandons as the end of the grace period does.
#[test]
fn a_fast_stop_names_the_requests_it_abandons() {
    let (mut s, mut c) = one_request_hanging(78, "60s");
    s.signal(libc::SIGINT);
    // (Two signals sent at once would merge into one.)
    let draining = wait_for(Duration::from_secs(10), || {
        s.log().contains("stopping: draining").then_some(())
    });
    assert!(draining.is_some(), "{}", s.log());
    s.signal(libc::SIGINT);
    let code = s.wait_exit(Duration::from_secs(30)).code();
    assert_abandoned(&mut s, &mut c, 78, code);
}

/// A binary replaced under a running server (a package upgrade moves a new
/// file onto its path) changes nothing until a restart: a worker restarted
/// after a crash runs the master's own build, not the new file.
#[test]
fn children_run_the_masters_build_after_the_binary_is_replaced() {
    let dir = temp_dir();
    let bin = dir.path().join("halfsync");
    std::fs::copy(BIN, &bin).unwrap();
    let port = free_port();
    let mut s = Server::start_bin(&bin, &config(port, &echo_so(), 2, ""), port);
    let before = s.wait_tree(3);

    // The "new version": a script that leaves a mark if anything runs it.
    let marker = dir.path().join("the new file ran");
    let new = dir.path().join("halfsync.new");
    std::fs::write(
        &new,
        format!("#!/bin/sh\necho ran > '{}'\nexit 3\n", marker.display()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&new, &bin).unwrap();

    let replaced = s.kill_one_of_two_workers("halfsync: worker");
    assert!(
        !marker.exists(),
        "a child ran the new file; log:\n{}",
        s.log()
    );
    assert!(replaced, "{before:?}\n{}", s.log());
    let mut c = s.client();
    for id in 0..10 {
        assert_eq!(c.call(id, 1, b"same build").unwrap().payload, b"same build");
    }
    s.stop(Duration::from_secs(30));
    s.assert_clean();
}

/// Under systemd's `Type=notify` (`NOTIFY_SOCKET` set), the master sends
/// READY=1 once every group has a worker serving and STOPPING=1 when a
/// stop begins; its children do not get the variable.
#[test]
fn systemd_hears_ready_and_stopping() {
    let dir = temp_dir();
    let path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let port = free_port();
    let mut s = Server::start_env(
        &config(port, &echo_so(), 2, ""),
        port,
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    );
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("READY=1 within 10 s");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.starts_with("READY=1\nSTATUS=serving"), "{msg}");
    for pid in s.wait_tree(3) {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&env).contains("NOTIFY_SOCKET="),
            "{pid} ({}) has NOTIFY_SOCKET",
            cmdline(pid)
        );
    }
    // A reload (Type=notify-reload): RELOADING=1 with the time, then
    // READY=1 and the new generation in STATUS; a refused one too.
    let mut next = || {
        let n = sock.recv(&mut buf).expect("a notification within 10 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    s.signal(libc::SIGHUP);
    let msg = next();
    assert!(msg.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{msg}");
    let msg = next();
    assert!(
        msg.starts_with("READY=1\nSTATUS=serving: 2 workers, generation 2"),
        "{msg}"
    );
    s.write_config("this is not toml [[[");
    s.signal(libc::SIGHUP);
    assert!(next().starts_with("RELOADING=1"));
    let msg = next();
    assert!(
        msg.starts_with("READY=1\nSTATUS=serving: 2 workers, generation 2; reload refused:"),
        "{msg}"
    );
    // A scale changes what STATUS says.
    s.write_config(&config(port, &echo_so(), 2, ""));
    let (code, out, err) = s.ctl(&["scale", "echo", "3"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let msg = next();
    assert!(
        msg.starts_with("READY=1\nSTATUS=serving: 3 workers"),
        "{msg}"
    );
    s.signal(libc::SIGTERM);
    let msg = next();
    assert!(msg.starts_with("STOPPING=1"), "{msg}");
    assert_eq!(s.wait_exit(Duration::from_secs(30)).code(), Some(0));
    // Said once.
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(
        sock.recv(&mut buf).is_err(),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    s.assert_clean();
}

/// A server whose stderr reader goes away (`halfsync run | head`, a log
/// collector restarting) keeps serving: log lines that cannot be written
/// are dropped. (tracing's complaint about the failed write went to the
/// same stderr with `eprintln!`, which panicked the master.)
#[test]
fn a_closed_stderr_does_not_stop_the_server() {
    let port = free_port();
    let mut s = Server::start_stderr_closing(&config(port, &echo_so(), 2, ""), port);
    let mut c = s.client();
    for id in 0..20 {
        assert_eq!(c.call(id, 1, b"x").unwrap().payload, b"x");
    }
    // Lines are logged on the way (a worker killed and replaced).
    assert!(
        s.kill_one_of_two_workers("halfsync: worker"),
        "{}",
        s.status()
    );
    assert_eq!(s.status()["ok"], true);
    assert_eq!(s.stop(Duration::from_secs(10)).code(), Some(0));
    s.assert_clean();
}

/// The usual dual-stack pair, `0.0.0.0:P` and `[::]:P`, starts: an IPv6
/// listener takes IPv6 only (IPV6_V6ONLY, as nginx sets it), whatever
/// `net.ipv6.bindv6only` says. (With the Linux default, `[::]:P` took
/// IPv4 too, and the second listener failed with "Address already in
/// use".) Skipped on a machine without IPv6 loopback.
#[test]
fn an_ipv4_and_an_ipv6_wildcard_listener_share_a_port() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback here; skipped");
        return;
    }
    let port = free_port();
    let text = config(port, &echo_so(), 1, "").replace(
        &format!("listen = [\"127.0.0.1:{port}\"]"),
        &format!("listen = [\"0.0.0.0:{port}\", \"[::]:{port}\"]"),
    );
    assert!(text.contains("[::]"), "{text}");
    let mut s = Server::start(&text, port);
    for addr in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        let mut c = halfsync_protocol::Client::connect(addr).unwrap();
        assert_eq!(c.call(1, 1, b"x").unwrap().payload, b"x", "{addr}");
    }
    assert_eq!(s.stop(Duration::from_secs(10)).code(), Some(0));
    s.assert_clean();
}
