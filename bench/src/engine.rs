//! The per-thread event loop and the in-process driver that runs threads
//! over a range of connections.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Context, bail};
use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};

use halfsync_protocol::{Header, Parsed, encode_header, parse};

use crate::schedule::{Schedule, active_before, is_active, split};
use crate::stats::{ConnErrorKind, Stats};
use crate::{Config, Load, payload, sys};

/// Bits of a request id that count requests on one connection; the bits
/// above hold the connection's global index, so ids are unique across the
/// whole run and a reply delivered to the wrong connection is caught.
pub const ID_SEQ_BITS: u32 = 40;
/// Largest reply frame accepted (length field), as in the blocking client.
const MAX_FRAME: u32 = 64 << 20;
/// Connects in progress at once, per thread.
const MAX_PENDING_CONNECTS: usize = 256;
/// Open loop: past this many unsent bytes on one connection, the thread
/// stops issuing scheduled requests until the socket drains (latency keeps
/// being measured from the intended times, so the stall shows).
const OUT_CAP: usize = 4 << 20;
/// Housekeeping period (reply timeouts, progress, stop flag).
const TICK_NS: u64 = 100_000_000;
/// Below this, the loop spins instead of arming the timer.
const SPIN_NS: u64 = 20_000;
const TIMER: Token = Token(usize::MAX - 1);

/// Builds a request id.
pub fn make_id(g: u64, seq: u64) -> u64 {
    (g << ID_SEQ_BITS) | (seq & ((1 << ID_SEQ_BITS) - 1))
}

#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type IdMap = HashMap<u64, u64, BuildHasherDefault<IdHasher>>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    New,
    Connecting,
    Ready,
    Dead,
}

struct Conn {
    g: u64,
    active: bool,
    state: State,
    stream: Option<TcpStream>,
    out: Vec<u8>,
    out_pos: usize,
    partial: Vec<u8>,
    /// id -> send time (closed loop) or intended send time (open loop), ns.
    outstanding: IdMap,
    next_seq: u64,
    /// No request with a smaller sequence number is outstanding.
    oldest_seq: u64,
    connect_deadline: u64,
    dirty: bool,
    /// Requests sent on the current socket (`--per-connection`).
    sent_here: u64,
    /// Closed to churn and connecting again; still counted as open.
    rejoining: bool,
}

impl Conn {
    fn pending_out(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// Send time of the oldest outstanding request. Send times grow with
    /// the sequence number, so it is the one with the smallest id.
    fn oldest(&mut self) -> Option<(u64, u64)> {
        while self.oldest_seq < self.next_seq {
            let id = make_id(self.g, self.oldest_seq);
            if let Some(&t) = self.outstanding.get(&id) {
                return Some((id, t));
            }
            self.oldest_seq += 1;
        }
        None
    }

    fn push(&mut self, command: u16, payload_len: usize, t: u64) {
        if self.out_pos > 0 && self.out_pos * 2 >= self.out.len() {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
        let id = make_id(self.g, self.next_seq);
        self.next_seq += 1;
        self.out
            .extend_from_slice(&encode_header(id, command, 0, payload_len));
        payload::fill(id, payload_len, &mut self.out);
        self.outstanding.insert(id, t);
    }

    /// Writes what the socket takes.
    fn flush(&mut self) -> io::Result<()> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(());
        };
        while self.out_pos < self.out.len() {
            match stream.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.out_pos = 0;
        if self.out.capacity() > 1 << 20 {
            self.out.shrink_to(64 << 10);
        }
        Ok(())
    }
}

/// Live counters of one thread, published every tick.
#[derive(Default)]
pub(crate) struct Progress {
    sent: AtomicU64,
    replies: AtomicU64,
    measured: AtomicU64,
    errors: AtomicU64,
    open: AtomicU64,
    connected: AtomicU64,
}

/// A point-in-time view of progress (summed over threads, or processes).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Snapshot {
    /// Requests sent.
    pub sent: u64,
    /// Replies received.
    pub replies: u64,
    /// Replies measured.
    pub measured: u64,
    /// Connection plus verification errors.
    pub errors: u64,
    /// Connections open now.
    pub open: u64,
    /// Connections established so far.
    pub connected: u64,
}

impl Snapshot {
    /// Adds `o` into `self`.
    pub fn add(&mut self, o: &Snapshot) {
        self.sent += o.sent;
        self.replies += o.replies;
        self.measured += o.measured;
        self.errors += o.errors;
        self.open += o.open;
        self.connected += o.connected;
    }
}

/// State shared by the threads of one process.
pub(crate) struct Shared {
    /// Start (warmup begins) on the [`sys::now_ns`] clock; 0 = not yet.
    start_ns: AtomicU64,
    /// Stop sending (request budget spent, or interrupted).
    stop: AtomicBool,
    /// Also cut the hold.
    interrupt: AtomicBool,
    /// When the measurement was stopped early.
    stop_at_ns: AtomicU64,
    /// Requests still to measure (`--requests`).
    quota: Option<AtomicI64>,
    ready: AtomicUsize,
    progress: Vec<Progress>,
}

impl Shared {
    fn stop_now(&self, interrupt: bool) {
        self.stop_at_ns.fetch_min(sys::now_ns(), Relaxed);
        self.stop.store(true, Relaxed);
        if interrupt {
            self.interrupt.store(true, Relaxed);
        }
    }

    fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::default();
        for p in &self.progress {
            s.sent += p.sent.load(Relaxed);
            s.replies += p.replies.load(Relaxed);
            s.measured += p.measured.load(Relaxed);
            s.errors += p.errors.load(Relaxed);
            s.open += p.open.load(Relaxed);
            s.connected += p.connected.load(Relaxed);
        }
        s
    }
}

/// Measurement state and counters of one thread.
struct Meter<'a> {
    st: Stats,
    verify: bool,
    allow: &'a [u16],
    echo: bool,
    payload: usize,
    warm_end: u64,
    end: u64,
    /// Open loop: a request is measured if it was *due* in the window,
    /// whenever its reply comes (the drain awaits it), so a stall at the
    /// window's end is not cut off; the closed loop measures the replies
    /// that come in the window.
    by_due: bool,
    shared: &'a Shared,
}

impl Meter<'_> {
    /// Whether a reply coming at `now` to a request sent (open loop: due)
    /// at `sent` is measured.
    fn measure(&mut self, sent: u64, now: u64) -> bool {
        let at = if self.by_due { sent } else { now };
        if at < self.warm_end || at >= self.end {
            return false;
        }
        if let Some(q) = &self.shared.quota {
            let prev = q.fetch_sub(1, Relaxed);
            if prev <= 1 {
                self.shared.stop_at_ns.fetch_min(now, Relaxed);
                self.shared.stop.store(true, Relaxed);
            }
            if prev <= 0 {
                return false;
            }
        }
        true
    }

    fn reply(&mut self, conn: &mut Conn, h: &Header, body: &[u8], now: u64) {
        self.st.replies += 1;
        let sent = conn.outstanding.remove(&h.id);
        if self.verify {
            if sent.is_none() {
                self.st.verify.unknown_id += 1;
                self.st.note("unknown id", || {
                    format!(
                        "connection {}: reply id {:#x} was not sent on it or was already answered",
                        conn.g, h.id
                    )
                });
            }
            if h.code != 0 && !self.allow.contains(&h.code) {
                self.st.verify.status += 1;
                self.st.note("status", || {
                    format!(
                        "connection {}: reply id {:#x} has status {} ({})",
                        conn.g,
                        h.id,
                        h.code,
                        halfsync_protocol::status::name(h.code)
                    )
                });
            }
            if h.code == 0
                && self.echo
                && sent.is_some()
                && !payload::matches(h.id, self.payload, body)
            {
                self.st.verify.payload += 1;
                self.st.note("payload", || {
                    format!(
                        "connection {}: reply id {:#x}: payload ({} bytes) differs from the request's ({} bytes)",
                        conn.g,
                        h.id,
                        body.len(),
                        self.payload
                    )
                });
            }
        }
        if let Some(t) = sent
            && self.measure(t, now)
        {
            self.st.status.add(h.code);
            self.st.hist.saturating_record(now.saturating_sub(t) / 1000);
        }
    }

    /// Handles every whole frame at the start of `buf`; returns the bytes
    /// used, or `None` if a frame is malformed.
    fn frames(&mut self, conn: &mut Conn, buf: &[u8], now: u64) -> Option<usize> {
        let mut pos = 0;
        loop {
            match parse(&buf[pos..], MAX_FRAME) {
                Parsed::Frame(h, n) => {
                    self.reply(conn, &h, &buf[pos + 16..pos + n], now);
                    pos += n;
                }
                Parsed::Incomplete(_) => return Some(pos),
                Parsed::Bad(e, _) => {
                    self.st.verify.frame += 1;
                    self.st.note("frame", || {
                        format!("connection {}: bad reply frame: {e}", conn.g)
                    });
                    return None;
                }
            }
        }
    }
}

struct Engine<'a> {
    cfg: &'a Config,
    shared: &'a Shared,
    tid: usize,
    poll: Poll,
    timer: sys::TimerFd,
    armed_for: u64,
    conns: Vec<Conn>,
    meter: Meter<'a>,
    scratch: Vec<u8>,
    open: u64,
    in_flight: u64,
    sending: bool,
    depth: usize,
    /// Open loop.
    sched: Option<Schedule>,
    actives: Vec<usize>,
    a_first: u64,
    cur_i: usize,
    cur_round: u64,
    blocked: bool,
    dirty: Vec<usize>,
    t0: u64,
}

impl<'a> Engine<'a> {
    fn new(
        cfg: &'a Config,
        shared: &'a Shared,
        tid: usize,
        range: Range<u64>,
    ) -> anyhow::Result<Self> {
        let poll = Poll::new().context("epoll_create")?;
        let timer = sys::TimerFd::new().context("timerfd_create")?;
        poll.registry()
            .register(&mut SourceFd(&timer.as_raw_fd()), TIMER, Interest::READABLE)?;
        let mut conns = Vec::with_capacity((range.end - range.start) as usize);
        let mut actives = Vec::new();
        for g in range.clone() {
            let active = is_active(g, cfg.connections, cfg.active);
            if active {
                actives.push(conns.len());
            }
            conns.push(Conn {
                g,
                active,
                state: State::New,
                stream: None,
                out: Vec::new(),
                out_pos: 0,
                partial: Vec::new(),
                outstanding: IdMap::default(),
                next_seq: 0,
                oldest_seq: 0,
                connect_deadline: 0,
                dirty: false,
                sent_here: 0,
                rejoining: false,
            });
        }
        let (depth, sched) = match cfg.load {
            Load::Closed { depth } => (depth as usize, None),
            Load::Open { rate } => (0, Some(Schedule::new(rate, cfg.active))),
        };
        let st = Stats {
            connections: conns.len() as u64,
            ..Stats::default()
        };
        Ok(Engine {
            cfg,
            shared,
            tid,
            poll,
            timer,
            armed_for: 0,
            conns,
            meter: Meter {
                st,
                verify: cfg.verify,
                allow: &cfg.allow_status,
                echo: cfg.command == 1,
                payload: cfg.payload,
                warm_end: u64::MAX,
                end: u64::MAX,
                by_due: matches!(cfg.load, Load::Open { .. }),
                shared,
            },
            scratch: vec![0; cfg.read_buffer.max(1)],
            open: 0,
            in_flight: 0,
            sending: false,
            depth,
            sched,
            actives,
            a_first: active_before(range.start, cfg.connections, cfg.active),
            cur_i: 0,
            cur_round: 0,
            blocked: false,
            dirty: Vec::new(),
            t0: 0,
        })
    }

    fn publish(&self) {
        let p = &self.shared.progress[self.tid];
        let st = &self.meter.st;
        p.sent.store(st.sent, Relaxed);
        p.replies.store(st.replies, Relaxed);
        p.measured.store(st.hist.len(), Relaxed);
        p.errors
            .store(st.conn_errors.total() + st.verify.total(), Relaxed);
        p.open.store(self.open, Relaxed);
        p.connected.store(st.connected, Relaxed);
    }

    /// Drops connection `ci`, counting `kind` if it is an error.
    fn kill(&mut self, ci: usize, kind: Option<ConnErrorKind>, msg: impl FnOnce() -> String) {
        let c = &mut self.conns[ci];
        if matches!(c.state, State::Dead | State::New) {
            return;
        }
        if let Some(mut s) = c.stream.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        if c.state == State::Ready || c.rejoining {
            self.open -= 1;
        }
        c.rejoining = false;
        c.state = State::Dead;
        let lost = c.outstanding.len() as u64;
        c.outstanding = IdMap::default();
        c.out = Vec::new();
        c.out_pos = 0;
        c.partial = Vec::new();
        self.in_flight -= lost;
        let st = &mut self.meter.st;
        st.unanswered += lost;
        if let Some(kind) = kind {
            st.conn_errors.add(kind);
            let g = c.g;
            st.note(kind.name(), || format!("connection {g}: {}", msg()));
        }
    }

    fn fail_io(&mut self, ci: usize, what: &str, e: io::Error) {
        let kind = ConnErrorKind::of(&e);
        self.kill(ci, Some(kind), || format!("{what}: {e}"));
    }

    fn start_connect(&mut self, ci: usize, now: u64) {
        let source = (!self.cfg.sources.is_empty())
            .then(|| self.cfg.sources[(self.conns[ci].g % self.cfg.sources.len() as u64) as usize]);
        let c = &mut self.conns[ci];
        c.state = State::Connecting;
        c.connect_deadline = now + self.cfg.connect_timeout.as_nanos() as u64;
        match open_socket(self.cfg.addr, source) {
            Ok(mut s) => {
                match self.poll.registry().register(
                    &mut s,
                    Token(ci),
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    Ok(()) => c.stream = Some(s),
                    Err(e) => self.fail_io(ci, "epoll register", e),
                }
            }
            Err(e) => {
                let hint = match (e.raw_os_error(), source) {
                    (Some(libc::EADDRNOTAVAIL), None) => {
                        " (out of local ports? add --source addresses)".to_owned()
                    }
                    (Some(libc::EADDRNOTAVAIL), Some(a)) => format!(
                        " (is --source {a} one of this machine's addresses, with ports left?)"
                    ),
                    _ => String::new(),
                };
                let what = format!("connect to {}{hint}", self.cfg.addr);
                self.fail_io(ci, &what, e);
            }
        }
    }

    fn finish_connect(&mut self, ci: usize) {
        let Some(s) = self.conns[ci].stream.as_ref() else {
            return;
        };
        let res = match s.take_error() {
            Ok(Some(e)) | Err(e) => Err(e),
            Ok(None) => match s.peer_addr() {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
                Err(e) => Err(e),
            },
        };
        match res {
            Ok(true) => {
                let c = &mut self.conns[ci];
                c.state = State::Ready;
                if c.rejoining {
                    c.rejoining = false;
                } else {
                    self.open += 1;
                    self.meter.st.connected += 1;
                }
            }
            Ok(false) => {}
            Err(e) => {
                let what = format!("connect to {}", self.cfg.addr);
                self.fail_io(ci, &what, e)
            }
        }
    }

    fn on_event(&mut self, ev: &mio::event::Event) {
        let ci = ev.token().0;
        if ci >= self.conns.len() {
            return;
        }
        if self.conns[ci].state == State::Connecting {
            self.finish_connect(ci);
            if self.conns[ci].state == State::Ready && self.closed_loop_sending(ci) {
                // A churned connection is back: start it again.
                self.top_up(ci, sys::now_ns());
            }
        }
        if self.conns[ci].state != State::Ready {
            return;
        }
        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
            // Read to the end (EOF or the error) only when the event says
            // there is one; otherwise a short read means the socket is empty.
            self.on_readable(ci, ev.is_read_closed() || ev.is_error());
        }
        if self.conns[ci].state == State::Ready && (ev.is_writable() || ev.is_write_closed()) {
            if let Err(e) = self.conns[ci].flush() {
                self.send_failed(ci, e);
            } else if self.conns[ci].pending_out() < OUT_CAP {
                self.blocked = false;
            }
        }
    }

    fn on_readable(&mut self, ci: usize, to_eof: bool) {
        if !self.read_all(ci, to_eof) {
            return;
        }
        // Closed loop: top the connection up at once.
        if self.closed_loop_sending(ci) {
            let now = sys::now_ns();
            let k = self.cfg.per_connection;
            let c = &self.conns[ci];
            if k > 0 && c.sent_here >= k && c.outstanding.is_empty() && c.pending_out() == 0 {
                self.rejoin(ci, now);
                return;
            }
            self.top_up(ci, now);
        }
        if let Err(e) = self.conns[ci].flush() {
            self.send_failed(ci, e);
        }
    }

    fn closed_loop_sending(&self, ci: usize) -> bool {
        self.sending && self.depth > 0 && self.conns[ci].active && !self.shared.stop.load(Relaxed)
    }

    /// `--per-connection`: closes connection `ci` (all its requests were
    /// answered) and connects it again.
    fn rejoin(&mut self, ci: usize, now: u64) {
        let c = &mut self.conns[ci];
        if let Some(mut s) = c.stream.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        c.partial.clear();
        c.out.clear();
        c.out_pos = 0;
        c.sent_here = 0;
        c.rejoining = true;
        if now >= self.meter.warm_end && now < self.meter.end {
            self.meter.st.reconnects += 1;
        }
        self.start_connect(ci, now);
    }

    /// A send failed: first take whatever the server sent before it went
    /// away (e.g. a BAD_REQUEST reply), then count the error.
    fn send_failed(&mut self, ci: usize, e: io::Error) {
        if self.read_all(ci, true) {
            self.fail_io(ci, "send", e);
        }
    }

    /// Reads and handles everything the socket holds; false if the
    /// connection is gone. Without `to_eof` it stops after a read that did
    /// not fill the buffer (`Config::read_buffer`): the socket is then
    /// empty, and more data raises a new (edge-triggered) event, so the
    /// read that would only return EAGAIN is saved (half of the
    /// generator's `recv` calls otherwise).
    fn read_all(&mut self, ci: usize, to_eof: bool) -> bool {
        loop {
            let Some(stream) = self.conns[ci].stream.as_mut() else {
                return false;
            };
            let n = match stream.read(&mut self.scratch) {
                Ok(0) => {
                    let pending = self.conns[ci].outstanding.len();
                    self.kill(ci, Some(ConnErrorKind::Closed), || {
                        format!("closed by the server with {pending} request(s) unanswered")
                    });
                    return false;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.fail_io(ci, "recv", e);
                    return false;
                }
            };
            let now = sys::now_ns();
            let conn = &mut self.conns[ci];
            let before = conn.outstanding.len();
            let ok = if conn.partial.is_empty() {
                match self.meter.frames(conn, &self.scratch[..n], now) {
                    Some(used) => {
                        conn.partial.extend_from_slice(&self.scratch[used..n]);
                        true
                    }
                    None => false,
                }
            } else {
                let mut buf = std::mem::take(&mut conn.partial);
                buf.extend_from_slice(&self.scratch[..n]);
                let r = self.meter.frames(conn, &buf, now);
                if let Some(used) = r {
                    buf.drain(..used);
                    conn.partial = buf;
                }
                r.is_some()
            };
            self.in_flight -= (before - conn.outstanding.len()) as u64;
            if !ok {
                self.kill(ci, None, String::new);
                return false;
            }
            if !to_eof && n < self.scratch.len() {
                return true;
            }
        }
    }

    fn top_up(&mut self, ci: usize, now: u64) {
        let c = &mut self.conns[ci];
        let k = self.cfg.per_connection;
        while c.outstanding.len() < self.depth && (k == 0 || c.sent_here < k) {
            c.sent_here += 1;
            c.push(self.cfg.command, self.cfg.payload, now);
            self.meter.st.sent += 1;
            self.in_flight += 1;
        }
    }

    /// Open loop: issues every request due by `now` and before `limit`;
    /// true once the next one is due at `limit` or later.
    fn pump(&mut self, now: u64, limit: u64) -> bool {
        let Some(sched) = self.sched else {
            return true;
        };
        if self.actives.is_empty() {
            return true;
        }
        let mut reached = false;
        while !self.blocked {
            let k = sched.request_number(self.a_first + self.cur_i as u64, self.cur_round);
            let due = self.t0 + sched.offset_ns(k);
            if due >= limit {
                reached = true;
                break;
            }
            if due > now {
                break;
            }
            let ci = self.actives[self.cur_i];
            let c = &mut self.conns[ci];
            if c.state == State::Ready {
                if c.pending_out() >= OUT_CAP {
                    self.blocked = true;
                    break;
                }
                c.push(self.cfg.command, self.cfg.payload, due);
                if due >= self.meter.warm_end && due < self.meter.end {
                    self.meter.st.send_lag.saturating_record((now - due) / 1000);
                }
                self.meter.st.sent += 1;
                self.in_flight += 1;
                if !c.dirty {
                    c.dirty = true;
                    self.dirty.push(ci);
                }
            }
            self.cur_i += 1;
            if self.cur_i == self.actives.len() {
                self.cur_i = 0;
                self.cur_round += 1;
            }
        }
        let dirty = std::mem::take(&mut self.dirty);
        for &ci in &dirty {
            self.conns[ci].dirty = false;
            if let Err(e) = self.conns[ci].flush() {
                self.send_failed(ci, e);
            }
        }
        self.dirty = dirty;
        self.dirty.clear();
        reached
    }

    /// Open loop, at the end: the requests due before `limit` that were
    /// never issued (the drain ran out while the generator was behind).
    fn unissued_before(&self, limit: u64) -> u64 {
        let Some(sched) = self.sched else { return 0 };
        if self.actives.is_empty() {
            return 0;
        }
        let (mut i, mut round, mut n) = (self.cur_i, self.cur_round, 0);
        loop {
            let k = sched.request_number(self.a_first + i as u64, round);
            if self.t0 + sched.offset_ns(k) >= limit {
                return n;
            }
            n += 1;
            i += 1;
            if i == self.actives.len() {
                i = 0;
                round += 1;
            }
        }
    }

    fn next_due(&self) -> Option<u64> {
        let sched = self.sched?;
        if self.actives.is_empty() || self.blocked {
            return None;
        }
        let k = sched.request_number(self.a_first + self.cur_i as u64, self.cur_round);
        Some(self.t0 + sched.offset_ns(k))
    }

    fn check_reply_timeouts(&mut self, now: u64) {
        let limit = self.cfg.timeout.as_nanos() as u64;
        if limit == 0 {
            return;
        }
        for i in 0..self.actives.len() {
            let ci = self.actives[i];
            if self.conns[ci].state == State::Connecting && now >= self.conns[ci].connect_deadline {
                let secs = self.cfg.connect_timeout.as_secs_f64();
                let addr = self.cfg.addr;
                self.kill(ci, Some(ConnErrorKind::Timeout), || {
                    format!("reconnect to {addr} not done within {secs}s")
                });
                continue;
            }
            if self.conns[ci].state != State::Ready {
                continue;
            }
            if let Some((id, t)) = self.conns[ci].oldest()
                && now.saturating_sub(t) > limit
            {
                let secs = self.cfg.timeout.as_secs_f64();
                self.kill(ci, Some(ConnErrorKind::Timeout), || {
                    format!("no reply to request {id:#x} within {secs}s; connection dropped")
                });
            }
        }
    }

    /// One poll; `wake` is when the caller next needs to run (coarse).
    fn turn(
        &mut self,
        events: &mut Events,
        now: u64,
        wake: u64,
        precise: Option<u64>,
    ) -> anyhow::Result<()> {
        let mut timeout = Duration::from_nanos(wake.saturating_sub(now).min(TICK_NS));
        if let Some(due) = precise {
            if due <= now + SPIN_NS {
                timeout = Duration::ZERO;
                if due > now {
                    // Nothing due yet: let anything else runnable on this
                    // CPU (on a shared machine, the server under test) go
                    // first, instead of spinning over it.
                    std::thread::yield_now();
                }
            } else if due != self.armed_for {
                self.timer.arm_at(due)?;
                self.armed_for = due;
            }
        }
        match self.poll.poll(events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e).context("epoll_wait"),
        }
        for ev in events.iter() {
            if ev.token() == TIMER {
                self.timer.clear();
                self.armed_for = 0;
            } else {
                self.on_event(ev);
            }
        }
        Ok(())
    }

    fn connect_all(&mut self, events: &mut Events) -> anyhow::Result<()> {
        let mut next = 0;
        let mut pending: std::collections::VecDeque<usize> = Default::default();
        let started = sys::now_ns();
        loop {
            let now = sys::now_ns();
            while pending.len() < MAX_PENDING_CONNECTS && next < self.conns.len() {
                self.start_connect(next, now);
                if self.conns[next].state == State::Connecting {
                    pending.push_back(next);
                }
                next += 1;
            }
            while let Some(&ci) = pending.front() {
                let c = &self.conns[ci];
                if c.state != State::Connecting {
                    pending.pop_front();
                } else if now >= c.connect_deadline {
                    pending.pop_front();
                    let secs = self.cfg.connect_timeout.as_secs_f64();
                    let addr = self.cfg.addr;
                    self.kill(ci, Some(ConnErrorKind::Timeout), || {
                        format!("connect to {addr} not done within {secs}s")
                    });
                } else {
                    break;
                }
            }
            if pending.is_empty() && next == self.conns.len() {
                self.meter.st.connect_seconds = (now - started) as f64 / 1e9;
                return Ok(());
            }
            if self.shared.interrupt.load(Relaxed) {
                for ci in pending.drain(..) {
                    self.kill(ci, None, String::new);
                }
                return Ok(());
            }
            let wake = pending
                .front()
                .map(|&ci| self.conns[ci].connect_deadline)
                .unwrap_or(now);
            self.turn(
                events,
                now,
                wake.max(now + 1_000_000).min(now + 10_000_000),
                None,
            )?;
            self.publish();
        }
    }

    /// Returns the thread's end of measurement (0 if it measured nothing).
    fn run(&mut self) -> anyhow::Result<u64> {
        let mut events = Events::with_capacity(1024);
        self.connect_all(&mut events)?;
        self.publish();
        self.shared.ready.fetch_add(1, Relaxed);

        // Wait for the start signal, keeping an eye on the connections.
        let t0 = loop {
            let now = sys::now_ns();
            let t0 = self.shared.start_ns.load(Relaxed);
            if t0 != 0 && now >= t0 {
                break t0;
            }
            if self.shared.interrupt.load(Relaxed) {
                return Ok(0);
            }
            let wake = if t0 != 0 { t0 } else { now + 10_000_000 };
            self.turn(&mut events, now, wake, (t0 != 0).then_some(t0))?;
        };
        self.publish();

        let cfg = self.cfg;
        self.t0 = t0;
        self.meter.warm_end = t0 + cfg.warmup.as_nanos() as u64;
        self.meter.end = match cfg.duration {
            Some(d) => self.meter.warm_end + d.as_nanos() as u64,
            None => u64::MAX,
        };
        let hold_end = t0 + cfg.hold.as_nanos() as u64;
        let drain = cfg.drain.as_nanos() as u64;
        self.sending = !self.actives.is_empty() && !self.shared.stop.load(Relaxed);
        let mut measure_end = 0;
        if self.sending && self.depth > 0 {
            let now = sys::now_ns();
            for i in 0..self.actives.len() {
                let ci = self.actives[i];
                if self.conns[ci].state == State::Ready {
                    self.top_up(ci, now);
                    if let Err(e) = self.conns[ci].flush() {
                        self.send_failed(ci, e);
                    }
                }
            }
        }
        let mut drain_deadline = 0;
        let mut backlog = false;
        let mut next_tick = sys::now_ns() + TICK_NS;
        loop {
            let now = sys::now_ns();
            if self.sending
                && (now >= self.meter.end || self.shared.stop.load(Relaxed) || self.open == 0)
            {
                self.sending = false;
                self.meter.end = self.meter.end.min(now);
                measure_end = self.meter.end;
                drain_deadline = now + drain;
                // Open loop: requests due in the window that the generator
                // has not sent yet (it was held up, or blocked by a server
                // that stopped reading) are still sent, late, and measured
                // from when they were due.
                backlog = self.sched.is_some() && self.open > 0;
            }
            if backlog {
                backlog = !self.pump(now, self.meter.end);
            }
            if !self.sending {
                let drained = (self.in_flight == 0 && !backlog) || now >= drain_deadline;
                let held = now >= hold_end || self.shared.interrupt.load(Relaxed);
                if (drained && held) || self.open == 0 {
                    break;
                }
            }
            if self.sending {
                self.pump(now, u64::MAX);
            }
            if now >= next_tick {
                self.check_reply_timeouts(now);
                self.publish();
                next_tick = now + TICK_NS;
            }
            let mut wake = next_tick;
            if self.sending {
                wake = wake.min(self.meter.end);
            } else {
                if self.in_flight > 0 && now < drain_deadline {
                    wake = wake.min(drain_deadline);
                }
                wake = wake.min(hold_end.max(now));
            }
            let precise = if self.sending || backlog {
                self.next_due()
            } else {
                None
            };
            self.turn(&mut events, now, wake, precise)?;
        }
        // What is still unanswered after the drain is lost, and so is what
        // was due in the window but never sent.
        for c in &self.conns {
            self.meter.st.unanswered += c.outstanding.len() as u64;
        }
        if backlog {
            self.meter.st.unanswered += self.unissued_before(self.meter.end);
        }
        self.publish();
        Ok(measure_end)
    }
}

fn open_socket(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let sock = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    sock.set_tcp_nodelay(true)?;
    if let Some(ip) = source {
        // Not fatal where unsupported: the bind then just picks a port.
        let _ = sys::set_bind_address_no_port(sock.as_raw_fd());
        sock.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(std::net::TcpStream::from(sock)))
}

/// What the process driving [`run_local`] does at its decision points.
pub(crate) trait Hooks {
    /// All threads have connected: returns the start time ([`sys::now_ns`]
    /// clock).
    fn ready(&mut self, snap: &Snapshot) -> anyhow::Result<u64>;
    /// Once a second: while connecting (`None`), then with the time since
    /// the start.
    fn tick(&mut self, snap: &Snapshot, elapsed: Option<Duration>);
    /// Whether to stop early (interrupted).
    fn should_stop(&mut self) -> bool;
    /// The measured window opened (`true`, at the end of the warmup) or
    /// closed (the duration passed, the request budget was spent, or the
    /// run was stopped); within the main loop's 10 ms poll.
    fn window(&mut self, _open: bool) {}
}

/// Runs connections `range` (global indices) of `cfg` in this process, on
/// `cfg.threads` threads; `quota` is this process's share of `--requests`.
pub(crate) fn run_local(
    cfg: &Config,
    range: Range<u64>,
    quota: Option<u64>,
    hooks: &mut dyn Hooks,
) -> anyhow::Result<Stats> {
    let n = range.end - range.start;
    let limit = sys::raise_nofile_limit().context("getrlimit")?;
    let threads = (cfg.threads as u64).clamp(1, n.max(1));
    let need = n + 16 + 4 * threads;
    if need > limit {
        let per = limit.saturating_sub(16 + 4 * threads).max(1);
        bail!(
            "{n} connections need about {need} file descriptors but this process may open {limit}; \
             use --processes {} (or more)",
            n.div_ceil(per).max(2)
        );
    }
    let shared = Arc::new(Shared {
        start_ns: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        interrupt: AtomicBool::new(false),
        stop_at_ns: AtomicU64::new(u64::MAX),
        quota: quota.map(|q| AtomicI64::new(q.min(i64::MAX as u64) as i64)),
        ready: AtomicUsize::new(0),
        progress: (0..threads).map(|_| Progress::default()).collect(),
    });
    let cfg_arc = Arc::new(cfg.clone());
    let mut handles = Vec::new();
    for tid in 0..threads {
        let sub = split(&range, threads, tid);
        let (cfg, shared) = (cfg_arc.clone(), shared.clone());
        let h = std::thread::Builder::new()
            .name(format!("bench-{tid}"))
            .spawn(move || -> anyhow::Result<(Stats, u64)> {
                let mut e = Engine::new(&cfg, &shared, tid as usize, sub)?;
                let r = e.run();
                // a thread that fails must not leave the others waiting
                if r.is_err() {
                    shared.ready.fetch_add(1, Relaxed);
                    shared.stop_now(true);
                }
                let end = r?;
                Ok((std::mem::take(&mut e.meter.st), end))
            })
            .context("spawning a thread")?;
        handles.push(h);
    }
    let all_done = |h: &[std::thread::JoinHandle<_>]| h.iter().all(|h| h.is_finished());

    // Wait until every thread has connected (each is bounded by the connect
    // timeout; the deadline here is a backstop).
    let waves = (n / threads).div_ceil(MAX_PENDING_CONNECTS as u64) + 1;
    let connect_start = sys::now_ns();
    let deadline = connect_start + cfg.connect_timeout.as_nanos() as u64 * waves + 30_000_000_000;
    let mut next_tick = connect_start + 1_000_000_000;
    while shared.ready.load(Relaxed) < threads as usize && !all_done(&handles) {
        let now = sys::now_ns();
        if hooks.should_stop() || now > deadline {
            shared.stop_now(true);
            break;
        }
        if now >= next_tick {
            hooks.tick(&shared.snapshot(), None);
            next_tick += 1_000_000_000;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let start = if shared.interrupt.load(Relaxed) {
        Ok(sys::now_ns())
    } else {
        hooks.ready(&shared.snapshot())
    };
    let t0 = match start {
        Ok(t) => t,
        Err(e) => {
            shared.stop_now(true);
            shared.start_ns.store(sys::now_ns(), Relaxed);
            for h in handles {
                let _ = h.join();
            }
            return Err(e);
        }
    };
    shared.start_ns.store(t0.max(1), Relaxed);

    // Backstop for runs of known length; the threads end by themselves.
    let planned = cfg.duration.map(|d| {
        t0 + (cfg.warmup + d).max(cfg.hold).as_nanos() as u64
            + cfg.drain.as_nanos() as u64
            + 10_000_000_000
    });
    let mut next_tick = t0 + 1_000_000_000;
    let warm_end = t0 + cfg.warmup.as_nanos() as u64;
    let window_end = cfg.duration.map(|d| warm_end + d.as_nanos() as u64);
    let (mut opened, mut closed) = (false, false);
    while !all_done(&handles) {
        std::thread::sleep(Duration::from_millis(10));
        let now = sys::now_ns();
        if hooks.should_stop() || planned.is_some_and(|p| now > p) {
            shared.stop_now(true);
        }
        if !opened && now >= warm_end {
            opened = true;
            hooks.window(true);
        }
        if opened && !closed && (window_end.is_some_and(|e| now >= e) || shared.stop.load(Relaxed))
        {
            closed = true;
            hooks.window(false);
        }
        if now >= next_tick {
            hooks.tick(
                &shared.snapshot(),
                Some(Duration::from_nanos(now.saturating_sub(t0))),
            );
            next_tick += 1_000_000_000 * (1 + (now - next_tick) / 1_000_000_000);
        }
    }
    let mut total = Stats::default();
    let mut measure_end = 0u64;
    for h in handles {
        let (st, end) = match h.join() {
            Ok(r) => r?,
            Err(_) => bail!("a benchmark thread panicked"),
        };
        total.merge(&st);
        measure_end = measure_end.max(end);
    }
    if opened && !closed {
        hooks.window(false);
    }
    let end = measure_end.min(shared.stop_at_ns.load(Relaxed));
    total.seconds = end.saturating_sub(warm_end) as f64 / 1e9;
    Ok(total)
}
