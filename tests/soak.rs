use std::fs;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use halfsync_protocol::status;
use halfsync_testkit::fault;

use crate::support::*;

/// Open fds, private resident KiB (heap and stacks: `RssAnon`, not the
/// shared ring pages, which become resident as rings are used) and
/// threads of a process.
/// A process's descriptors (pipes left out: the master holds one per
/// running worker, its stderr, so their number follows the pool; see
/// `pipes`), anonymous RSS (KiB) and threads.
fn footprint(pid: i32) -> (usize, u64, u64) {
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    !fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("pipe:"))
                })
                .count()
        })
        .unwrap_or(0);
    let st = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        st.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (fds, field("RssAnon:"), field("Threads:"))
}

/// How many pipes process `pid` holds open.
fn pipes(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("pipe:"))
                })
                .count()
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// At least 1,000 worker crashes under load: no request but the crashing
/// ones fails, and the proxy's and master's fds, memory and threads do not
/// grow. Prints the replacement times the proxy logged.
#[test]
fn a_thousand_crashes_leak_nothing() {
    const CRASHERS: u64 = 4;
    // HALFSYNC_SOAK_CRASHES raises the count for longer soaks by hand.
    let crashes_wanted: u64 = std::env::var("HALFSYNC_SOAK_CRASHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1100)
        .max(1000);
    let port = free_port();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\n\n[[group]]\nname = \"soak\"\nplugin = \"{}\"\nworkers = 4\n",
        halfsync_testkit::fault_plugin().display()
    );
    let mut s = Server::start(&text, port);
    let proxy = s.pids_titled("halfsync: proxy")[0];
    let master = s.pid;
    // With all 4 workers up: one stderr pipe each, and whatever pipes the
    // master inherited (cargo's jobserver).
    s.wait_tree(5);
    let pipes0 = pipes(master);
    let load = Load::start(s.addr, 20, 4, 1000);
    load.progress(1000);

    let crashes = Arc::new(AtomicU64::new(0));
    let mut baseline = None;
    let started = Instant::now();
    let crashers: Vec<_> = (0..CRASHERS)
        .map(|c| {
            let mut client = s.client();
            let crashes = crashes.clone();
            thread::spawn(move || -> Result<halfsync_protocol::Client, String> {
                for i in 0..crashes_wanted / CRASHERS {
                    let id = c << 32 | i;
                    // Alternate a segfault and an OOM-style SIGKILL.
                    let cmd = if i % 2 == 0 {
                        fault::SEGV
                    } else {
                        fault::SIGKILL
                    };
                    let r = client
                        .call(id, cmd, b"")
                        .map_err(|e| format!("crasher {c}: {e}"))?;
                    if (r.id, r.code) != (id, status::WORKER_DIED) {
                        return Err(format!(
                            "crasher {c}: request {i} got {} {:?}",
                            r.code,
                            String::from_utf8_lossy(&r.payload)
                        ));
                    }
                    crashes.fetch_add(1, Ordering::Relaxed);
                }
                // Kept open, so the final footprint counts the same connections.
                Ok(client)
            })
        })
        .collect();
    // Measure once the pool has been through its first 100 crashes (so
    // buffers reached their working size), and again at the end.
    let deadline = Instant::now() + Duration::from_secs(600);
    while crashers.iter().any(|c| !c.is_finished()) && Instant::now() < deadline {
        if baseline.is_none() && crashes.load(Ordering::Relaxed) >= 100 {
            baseline = Some((footprint(proxy), footprint(master)));
        }
        thread::sleep(Duration::from_millis(20));
    }
    let held: Vec<_> = crashers
        .into_iter()
        .map(|c| c.join().expect("crasher panicked").unwrap())
        .collect();
    let elapsed = started.elapsed();
    let n = crashes.load(Ordering::Relaxed);
    assert!(n >= 1000, "only {n} crashes");
    wait_for(Duration::from_secs(20), || {
        (s.worker_pids().len() == 4).then_some(())
    })
    .expect("pool did not return to 4 workers");
    // Let the last replacements settle, then measure with the same client
    // connections open as at the baseline.
    thread::sleep(Duration::from_millis(300));
    let ((p_fd0, p_rss0, p_thr0), (m_fd0, m_rss0, m_thr0)) = baseline.expect("no baseline");
    let (p_fd1, p_rss1, p_thr1) = footprint(proxy);
    let (m_fd1, m_rss1, m_thr1) = footprint(master);
    let served = load.finish();
    drop(held);

    // Every crash is followed by a logged replacement, except the few
    // restarts delayed by backoff (a fresh worker's first request was a
    // crash five times in a row), which are logged as such. The proxy logs
    // a replacement once it is ready, a moment after the worker has its
    // title: wait (bounded) for the last ones.
    let count = |log: &str| {
        let mut replaced: Vec<u64> = log
            .lines()
            .filter_map(|l| l.split("replaced_after_us=").nth(1))
            .filter_map(|v| v.split_whitespace().next()?.parse().ok())
            .collect();
        replaced.sort_unstable();
        let delayed = log.matches("worker keeps failing").count() as u64;
        (replaced, delayed)
    };
    let _ = wait_for(Duration::from_secs(20), || {
        let (r, d) = count(&s.log());
        (r.len() as u64 + d >= n).then_some(())
    });
    let (replaced, delayed) = count(&s.log());
    println!(
        "soak: {n} crashes in {:.1} s, {served} echo requests served with 0 errors",
        elapsed.as_secs_f64()
    );
    println!(
        "soak: replacement worker ready after a death (us): p50 {} p99 {} max {} (n = {})",
        percentile(&replaced, 0.5),
        percentile(&replaced, 0.99),
        replaced.last().copied().unwrap_or(0),
        replaced.len()
    );
    println!(
        "soak: proxy  fds {p_fd0} -> {p_fd1}, private rss {p_rss0} -> {p_rss1} KiB, threads {p_thr0} -> {p_thr1}"
    );
    println!(
        "soak: master fds {m_fd0} -> {m_fd1}, private rss {m_rss0} -> {m_rss1} KiB, threads {m_thr0} -> {m_thr1}"
    );

    println!("soak: restarts delayed by backoff: {delayed}");
    assert!(
        replaced.len() as u64 + delayed >= n,
        "{} replacements logged for {n} crashes",
        replaced.len()
    );
    assert!(p_fd1 <= p_fd0 && m_fd1 <= m_fd0, "fd growth");
    // One stderr pipe per running worker, none left of the 1,000 dead.
    assert_eq!(pipes(master), pipes0, "the master's pipes");
    assert!(p_thr1 == p_thr0 && m_thr1 == m_thr0, "thread growth");
    // Allocator noise, not growth: a leak per crash would show 1000x.
    assert!(
        p_rss1 <= p_rss0 + 1024,
        "proxy RSS grew {p_rss0} -> {p_rss1} KiB"
    );
    assert!(
        m_rss1 <= m_rss0 + 1024,
        "master RSS grew {m_rss0} -> {m_rss1} KiB"
    );
    assert_eq!(s.stop(Duration::from_secs(10)).code(), Some(0));
    s.assert_clean();
}

/// From a worker's death to its replacement answering: one worker, so
/// the request sent right after the death can only be served by the
/// replacement. Prints the distribution.
#[test]
fn a_replacement_serves_promptly_after_a_death() {
    let port = free_port();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\n\n[[group]]\nname = \"one\"\nplugin = \"{}\"\nworkers = 1\n",
        halfsync_testkit::fault_plugin().display()
    );
    let s = Server::start(&text, port);
    let mut c = s.client();
    let mut times = Vec::new();
    for i in 0..100u64 {
        // Serve one request first so the crash is not a failed start
        // (which would be restarted with backoff).
        assert_eq!(c.call(i * 3, 1, b"warm").unwrap().code, status::OK);
        let r = c.call(i * 3 + 1, fault::SIGKILL, b"").unwrap();
        assert_eq!(r.code, status::WORKER_DIED);
        let t = Instant::now();
        let r = c.call(i * 3 + 2, 1, b"after").unwrap();
        assert_eq!((r.code, &r.payload[..]), (status::OK, &b"after"[..]));
        times.push(t.elapsed().as_micros() as u64);
    }
    times.sort_unstable();
    println!(
        "respawn: death reply -> replacement's reply (us): p50 {} p99 {} max {}",
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        times[times.len() - 1]
    );
}
