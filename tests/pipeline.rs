use std::time::Duration;

use halfsync_protocol::status;

use crate::support::*;

fn pipeline_then_sigterm(plugin: std::path::PathBuf) {
    let port = free_port();
    let mut s = Server::start(&config(port, &plugin, 2, ""), port);
    let tree = s.refresh_tree();
    assert_eq!(tree.len(), 3, "proxy + 2 workers expected, got {tree:?}");

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
    // SIGTERM while those are in flight.
    s.signal(libc::SIGTERM);
    let (mut ok, mut refused) = (0, 0);
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
