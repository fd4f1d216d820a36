use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use halfsync_protocol::{encode_header, status};

use crate::support::*;

/// A well-behaved client calling in a loop until told to stop; returns
/// (successes, errors).
struct Bystander {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    handle: Option<thread::JoinHandle<Result<(), String>>>,
}

impl Bystander {
    fn start(s: &Server) -> Bystander {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let mut c = s.client();
        let (stop2, ok2) = (stop.clone(), ok.clone());
        let handle = thread::spawn(move || {
            let mut id = 0u64;
            // Bounded: at most 10 minutes of calls even if never stopped.
            while !stop2.load(Ordering::Relaxed) && id < 10_000_000 {
                let p = payload(1, 0, id, 300);
                let r = c
                    .call(id, 1, &p)
                    .map_err(|e| format!("bystander call {id}: {e}"))?;
                if r.id != id || r.code != status::OK || r.payload != p {
                    return Err(format!("bystander: bad reply to {id}: {r:?}"));
                }
                ok2.fetch_add(1, Ordering::Relaxed);
                id += 1;
            }
            Ok(())
        });
        Bystander {
            stop,
            ok,
            handle: Some(handle),
        }
    }

    /// Waits until it has made `n` more successful calls.
    fn progress(&self, n: u64) {
        let start = self.ok.load(Ordering::Relaxed);
        let done = wait_for(Duration::from_secs(20), || {
            (self.ok.load(Ordering::Relaxed) >= start + n).then_some(())
        });
        assert!(done.is_some(), "bystander stalled");
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let r = self
            .handle
            .take()
            .unwrap()
            .join()
            .expect("bystander panicked");
        r.unwrap();
        self.ok.load(Ordering::Relaxed)
    }
}

fn connect(s: &Server) -> TcpStream {
    let t = TcpStream::connect(s.addr).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    t
}

/// Reads one reply, then expects the server to close the connection.
fn expect_bad_request_then_close(mut t: TcpStream, id: u64) -> String {
    let f = Reader(t.try_clone().unwrap())
        .frame()
        .expect("a BAD_REQUEST reply");
    assert_eq!(f.code, status::BAD_REQUEST);
    assert_eq!(f.id, id);
    let mut rest = Vec::new();
    // EOF (or a reset) follows: the server closed the connection.
    let _ = t.read_to_end(&mut rest);
    assert!(rest.is_empty(), "bytes after BAD_REQUEST: {rest:?}");
    String::from_utf8_lossy(&f.payload).into_owned()
}

#[test]
fn bad_clients_do_not_disturb_a_good_one() {
    let port = free_port();
    let s = Server::start(
        &config(
            port,
            &echo_so(),
            2,
            "max_frame = \"64KiB\"\nring_size = \"1MiB\"",
        ),
        port,
    );
    let by = Bystander::start(&s);
    by.progress(10);

    // 1. Oversized frame: length above max_frame, rejected from the header alone.
    let mut t = connect(&s);
    let mut h = encode_header(77, 1, 0, 0).to_vec();
    h[0..4].copy_from_slice(&(64u32 * 1024 + 1).to_be_bytes());
    t.write_all(&h).unwrap();
    let msg = expect_bad_request_then_close(t, 77);
    assert!(msg.contains("max_frame"), "{msg}");
    by.progress(10);

    // 2. Length below 12.
    let mut t = connect(&s);
    let mut h = encode_header(78, 1, 0, 0).to_vec();
    h[0..4].copy_from_slice(&5u32.to_be_bytes());
    t.write_all(&h).unwrap();
    let msg = expect_bad_request_then_close(t, 78);
    assert!(msg.contains("below the minimum"), "{msg}");
    by.progress(10);

    // 3. Good requests, then a bad frame on the same connection: the good
    // ones are still answered, then BAD_REQUEST, then close.
    let mut t = connect(&s);
    let mut buf = Vec::new();
    for id in 0..5 {
        halfsync_protocol::write_frame(&mut buf, id, 1, b"ok");
    }
    buf.extend_from_slice(&3u32.to_be_bytes());
    t.write_all(&buf).unwrap();
    let mut r = Reader(t.try_clone().unwrap());
    let mut codes = Vec::new();
    while let Ok(f) = r.frame() {
        codes.push((f.id, f.code));
    }
    codes.sort();
    let mut expected: Vec<(u64, u16)> = (0..5).map(|id| (id, status::OK)).collect();
    expected.insert(0, (0, status::BAD_REQUEST)); // the bad frame's id is unknown: 0
    expected.sort();
    assert_eq!(codes, expected);
    by.progress(10);

    // 4. Half a frame, then disconnect.
    for _ in 0..20 {
        let mut t = connect(&s);
        let mut f = Vec::new();
        halfsync_protocol::write_frame(&mut f, 5, 1, &[1u8; 1000]);
        t.write_all(&f[..600]).unwrap();
        drop(t);
    }
    by.progress(10);

    // 5. 100 requests in flight, then disconnect without reading.
    for round in 0..10 {
        let mut t = connect(&s);
        let mut f = Vec::new();
        for id in 0..100 {
            halfsync_protocol::write_frame(&mut f, id, 1, &payload(round, 1, id, 8192));
        }
        t.write_all(&f).unwrap();
        drop(t);
    }
    by.progress(10);

    // 6. Garbage bytes.
    let mut t = connect(&s);
    t.write_all(&[0xff; 64]).unwrap();
    let _ = expect_bad_request_then_close(t, u64::MAX);
    by.progress(10);

    // The server is still whole: a fresh pipeline works.
    many_pipelines(s.addr, 4, 100, 4096);
    let n = by.finish();
    assert!(n >= 70);
}
