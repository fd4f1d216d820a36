//! A tiny HSP/1 server for the tests: one thread per connection, std::net,
//! with modes that misbehave on purpose. Everything it does is bounded: it
//! stops (and its threads end within ~50 ms) when dropped.

#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use halfsync_protocol::{Parsed, parse, write_frame};

#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// Status 0, same id and payload.
    Echo,
    /// Every `n`-th reply (per connection) has one payload byte flipped.
    CorruptPayload(u64),
    /// Every `n`-th reply (per connection) carries a wrong id.
    CorruptId(u64),
    /// Every `n`-th reply (per connection) is sent twice.
    Duplicate(u64),
    /// Every reply has this status (payload echoed).
    Status(u16),
    /// Close each connection after this many replies.
    CloseAfter(u64),
    /// Read everything, answer nothing.
    Silent,
    /// Answer the first frame BAD_REQUEST and close, like halfsync does
    /// with a malformed or oversized frame.
    BadRequest,
    /// Echo, but the connection that reads its `at`-th frame sleeps `ms`
    /// first (once per connection).
    StallOnce { at: u64, ms: u64 },
    /// Echo, each read's replies written in two pieces `ms` apart (the
    /// first is 7 bytes: inside the header when one request was read), so
    /// the generator sees a frame over two events.
    Split { ms: u64 },
}

pub struct Server {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    pub accepted: Arc<AtomicU64>,
    pub frames: Arc<AtomicU64>,
    /// Bit `k` set: a frame with command `k` (mod 64) came in.
    pub commands: Arc<AtomicU64>,
    pub peers: Arc<Mutex<Vec<IpAddr>>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start(mode: Mode) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let frames = Arc::new(AtomicU64::new(0));
        let commands = Arc::new(AtomicU64::new(0));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let (s, a, f, c, p) = (
            stop.clone(),
            accepted.clone(),
            frames.clone(),
            commands.clone(),
            peers.clone(),
        );
        let thread = std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !s.load(SeqCst) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        a.fetch_add(1, SeqCst);
                        p.lock().unwrap().push(peer.ip());
                        let (s, f, c) = (s.clone(), f.clone(), c.clone());
                        conns.push(std::thread::spawn(move || serve(stream, mode, &s, &f, &c)));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        });
        Server {
            addr,
            stop,
            accepted,
            frames,
            commands,
            peers,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    mut stream: TcpStream,
    mode: Mode,
    stop: &AtomicBool,
    frames: &AtomicU64,
    commands: &AtomicU64,
) {
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    let mut n_replies = 0u64;
    let mut n_frames = 0u64;
    let mut stalled = false;
    while !stop.load(SeqCst) {
        let n = match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut out = Vec::new();
        let mut pos = 0;
        while let Parsed::Frame(h, len) = parse(&buf[pos..], 1 << 26) {
            let payload = buf[pos + 16..pos + len].to_vec();
            pos += len;
            n_frames += 1;
            frames.fetch_add(1, SeqCst);
            commands.fetch_or(1 << (h.code % 64), SeqCst);
            if let Mode::StallOnce { at, ms } = mode
                && !stalled
                && n_frames >= at
            {
                stalled = true;
                let _ = stream.write_all(&out);
                out.clear();
                std::thread::sleep(Duration::from_millis(ms));
            }
            n_replies += 1;
            let nth = |k: u64| n_replies.is_multiple_of(k);
            match mode {
                Mode::Echo | Mode::StallOnce { .. } => write_frame(&mut out, h.id, 0, &payload),
                Mode::Split { ms } => {
                    write_frame(&mut out, h.id, 0, &payload);
                    if stream.write_all(&out[..7]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(ms));
                    out.drain(..7);
                }
                Mode::CorruptPayload(k) => {
                    let mut p = payload;
                    if nth(k) && !p.is_empty() {
                        p[0] ^= 0xff;
                    }
                    write_frame(&mut out, h.id, 0, &p);
                }
                Mode::CorruptId(k) => {
                    let id = if nth(k) { h.id ^ 0xdead } else { h.id };
                    write_frame(&mut out, id, 0, &payload);
                }
                Mode::Duplicate(k) => {
                    write_frame(&mut out, h.id, 0, &payload);
                    if nth(k) {
                        write_frame(&mut out, h.id, 0, &payload);
                    }
                }
                Mode::Status(code) => write_frame(&mut out, h.id, code, &payload),
                Mode::CloseAfter(k) => {
                    if n_replies > k {
                        let _ = stream.write_all(&out);
                        return;
                    }
                    write_frame(&mut out, h.id, 0, &payload);
                }
                Mode::Silent => {}
                Mode::BadRequest => {
                    write_frame(&mut out, h.id, 5, b"bad frame");
                    let _ = stream.write_all(&out);
                    return;
                }
            }
        }
        buf.drain(..pos);
        if !out.is_empty() && stream.write_all(&out).is_err() {
            return;
        }
    }
}

/// A port with nothing listening on it.
pub fn dead_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}
