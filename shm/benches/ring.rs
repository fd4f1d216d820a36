//! Criterion micro-benchmarks of the shared-memory SPSC ring.
//!
//! - `xproc_throughput`: the bench process produces 64 B or 4 KiB records
//!   into a slot's request ring, publishing every `batchN` records; a child
//!   process (this binary re-executed with `HS_SHM_BENCH_ROLE=sink`,
//!   inheriting the slot's memfd) consumes them, reading every payload
//!   byte. One criterion iteration is one record, so the report is in
//!   records/s; a timed run of `iters` records ends when the consumer has
//!   released the last one (the ring's `head` caught up with `tail`), so the
//!   time covers every record actually crossing to the other process and
//!   being read there. The ring is the server's default 4 MiB unless the
//!   name says `ring64KiB`.
//! - `xproc_round_trip`: one record on the request ring, echoed by the child
//!   (`HS_SHM_BENCH_ROLE=echo`) on the reply ring, waited for by the
//!   parent; the time is per round trip.
//! - `inproc`: the same ring driven by one thread (push, publish, peek,
//!   advance, release), the floor without cross-core traffic; and each
//!   side's own cost (`producer_only`, `consumer_only`: the other side's
//!   work runs untimed, in chunks of half a ring).
//!
//! Waiting variants: `spin` spins up to `SPIN_BUDGET` (20 µs) when there
//! is nothing to do (empty ring, or full ring for the producer) and then
//! sleeps on the ring's futex; `futex` sleeps at once, as the worker does.
//! Children get `PR_SET_PDEATHSIG` and are killed and reaped by a guard,
//! also when a benchmark panics; slots are memfds, nothing is left in
//! /dev/shm.
//!
//! Run: `cargo bench -p halfsync-shm --bench ring` (about 1.5 minutes once
//! built), `cargo bench -p halfsync-shm --bench ring -- --quick` for a fast
//! look, `cargo bench -p halfsync-shm --bench ring -- xproc_round_trip` for
//! one group. `cargo test -p halfsync-shm --benches` runs each benchmark
//! once as a smoke test.
//!
//! Environment overrides for experiments: `HS_BENCH_SPIN_US` (spin budget,
//! microseconds), `HS_BENCH_RING` (default ring capacity in bytes, a power
//! of two), `HS_BENCH_RELEASE_EVERY` (the sink releases at least every this
//! many records; default 32).

use std::fs::File;
use std::hint::black_box;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use halfsync_shm::{Consumer, Meta, Notify, Producer, RECORD_HEADER_LEN, RingRef, Slot, sys};

/// Selects the child role; read first thing in `main`, before criterion
/// looks at the command line.
const ROLE_ENV: &str = "HS_SHM_BENCH_ROLE";
const FD_ENV: &str = "HS_SHM_BENCH_FD";
const CAP_ENV: &str = "HS_SHM_BENCH_CAP";
const SPIN_ENV: &str = "HS_SHM_BENCH_SPIN_NS";
const RELEASE_ENV: &str = "HS_SHM_BENCH_RELEASE_EVERY";
const PPID_ENV: &str = "HS_SHM_BENCH_PPID";

/// The default ring size of the server (`server.ring_size = "4MiB"`).
const DEFAULT_RING: usize = 4 << 20;
/// How long a side spins on an empty (or full) ring before it sleeps.
const SPIN_BUDGET: Duration = Duration::from_micros(20);
/// Futex sleeps are bounded so a side notices a dead peer.
const SLEEP: Duration = Duration::from_millis(100);
/// The consumer hands space back at least every this many records.
const RELEASE_EVERY: u64 = 32;

fn env_parse<T: std::str::FromStr>(k: &str) -> Option<T> {
    std::env::var(k).ok().and_then(|v| v.parse().ok())
}

fn ring_capacity() -> usize {
    env_parse("HS_BENCH_RING").unwrap_or(DEFAULT_RING)
}

fn release_every() -> u64 {
    env_parse("HS_BENCH_RELEASE_EVERY").unwrap_or(RELEASE_EVERY)
}

fn spin_budget() -> Duration {
    env_parse("HS_BENCH_SPIN_US").map_or(SPIN_BUDGET, Duration::from_micros)
}

/// What a side does when the ring has nothing for it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Spin for the spin budget, then sleep on the futex.
    Spin,
    /// Sleep on the futex at once.
    Futex,
}

impl Wait {
    fn budget(self) -> Duration {
        match self {
            Wait::Spin => spin_budget(),
            Wait::Futex => Duration::ZERO,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Wait::Spin => "spin",
            Wait::Futex => "futex",
        }
    }
}

/// Polls `ready` for up to `budget`; returns whether it became true.
fn spin_until(budget: Duration, mut ready: impl FnMut() -> bool) -> bool {
    if ready() {
        return true;
    }
    if budget.is_zero() {
        return false;
    }
    let start = Instant::now();
    loop {
        for _ in 0..32 {
            std::hint::spin_loop();
            if ready() {
                return true;
            }
        }
        if start.elapsed() >= budget {
            return false;
        }
    }
}

/// Reads every byte of a payload, as a consumer that uses it would.
fn touch(p: &[u8]) -> u64 {
    let mut words = p.chunks_exact(8);
    let sum = words
        .by_ref()
        .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()))
        .fold(0u64, u64::wrapping_add);
    words
        .remainder()
        .iter()
        .fold(sum, |a, &b| a.wrapping_add(b as u64))
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31)).collect()
}

// ---------------------------------------------------------------- child --

/// The child process's side: runs its role until killed (or until its
/// parent is gone), never returns.
fn child_main(role: &str) -> ! {
    let fd: i32 = env_parse(FD_ENV).expect("slot fd");
    let cap: usize = env_parse(CAP_ENV).expect("ring capacity");
    let spin = Duration::from_nanos(env_parse(SPIN_ENV).unwrap_or(0));
    let release_every: u64 = env_parse(RELEASE_ENV).unwrap_or(RELEASE_EVERY).max(1);
    let ppid: u32 = env_parse(PPID_ENV).expect("parent pid");
    // The parent may have died before PR_SET_PDEATHSIG took effect.
    if std::os::unix::process::parent_id() != ppid {
        std::process::exit(0);
    }
    // SAFETY: the parent cleared FD_CLOEXEC on its slot memfd and passed its
    // number for us to own; nothing else in this process uses it.
    let file = unsafe { File::from_raw_fd(fd) };
    let slot = Slot::open(file, cap).expect("open slot");
    match role {
        "sink" => sink(&slot, spin, release_every, ppid),
        "echo" => echo(&slot, spin, ppid),
        other => panic!("unknown bench child role {other:?}"),
    }
}

/// Sleeps on the consumer's futex after spinning; exits if the parent is
/// gone (a sleep that times out is the only time we look).
fn idle(rx: &mut Consumer, spin: Duration, ppid: u32) {
    if spin_until(spin, || !rx.is_empty().expect("ring")) {
        return;
    }
    let t = Instant::now();
    rx.wait(SLEEP).expect("ring");
    if t.elapsed() >= SLEEP && std::os::unix::process::parent_id() != ppid {
        std::process::exit(0);
    }
}

/// Consumes the request ring as fast as it can, checking record order and
/// reading every payload byte.
fn sink(slot: &Slot, spin: Duration, release_every: u64, ppid: u32) -> ! {
    let mut rx = Consumer::attach(slot.requests()).expect("attach");
    let mut expected = 0u64;
    let mut acc = 0u64;
    loop {
        let mut any = false;
        let mut to_release = release_every;
        while let Some(r) = rx.peek().expect("ring") {
            assert_eq!(r.meta.id, expected, "records out of order");
            acc = acc.wrapping_add(touch(r.payload));
            expected += 1;
            rx.advance();
            any = true;
            to_release -= 1;
            if to_release == 0 {
                rx.release();
                to_release = release_every;
            }
        }
        rx.release();
        black_box(acc);
        if !any {
            idle(&mut rx, spin, ppid);
        }
    }
}

/// Echoes every request as a reply with the same meta and payload.
fn echo(slot: &Slot, spin: Duration, ppid: u32) -> ! {
    let mut rx = Consumer::attach(slot.requests()).expect("attach");
    let mut tx = Producer::attach(slot.replies(), Notify::Futex).expect("attach");
    loop {
        let Some(r) = rx.peek().expect("ring") else {
            idle(&mut rx, spin, ppid);
            continue;
        };
        let len = r.payload.len();
        while !tx.fits(len).expect("ring") {
            // The parent drains every reply before its next request; this
            // only happens if it died.
            tx.wait_for_space(len, SLEEP).expect("ring");
            if std::os::unix::process::parent_id() != ppid {
                std::process::exit(0);
            }
        }
        let mut res = tx.try_reserve(len).expect("ring").expect("fits");
        res.buf()[..len].copy_from_slice(r.payload);
        res.commit(&r.meta, len);
        tx.publish();
        rx.advance();
        rx.release();
    }
}

// --------------------------------------------------------------- parent --

/// A child process of this bench, killed and reaped when dropped (also
/// when a benchmark panics). Children also get `PR_SET_PDEATHSIG`, so a
/// bench killed outright does not leave them behind.
struct Peer {
    child: Child,
}

impl Peer {
    fn spawn(role: &str, slot: &Slot, wait: Wait, release_every: u64) -> Peer {
        let fd = slot.fd().as_raw_fd();
        let exe = std::env::current_exe().expect("current exe");
        let mut cmd = Command::new(exe);
        cmd.env(ROLE_ENV, role)
            .env(FD_ENV, fd.to_string())
            .env(CAP_ENV, slot.capacity().to_string())
            .env(SPIN_ENV, wait.budget().as_nanos().to_string())
            .env(RELEASE_ENV, release_every.to_string())
            .env(PPID_ENV, std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: between fork and exec the closure only makes two
        // async-signal-safe system calls (prctl, fcntl) on values it owns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                sys::clear_cloexec(fd)
            });
        }
        Peer {
            child: cmd.spawn().expect("spawn bench child"),
        }
    }

    /// Panics if the child exited (it asserts on what it reads).
    fn assert_alive(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("bench child exited: {st}");
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pushes one record, publishing and waiting while the ring is full.
fn push_blocking(tx: &mut Producer, meta: &Meta, p: &[u8], wait: Wait, peer: &mut Peer) {
    loop {
        if tx.push(meta, p).expect("ring").is_some() {
            return;
        }
        tx.publish();
        if spin_until(wait.budget(), || tx.fits(p.len()).expect("ring")) {
            continue;
        }
        let t = Instant::now();
        if !tx.wait_for_space(p.len(), SLEEP).expect("ring") && t.elapsed() >= SLEEP {
            peer.assert_alive();
        }
    }
}

/// Spins until the consumer has released everything published.
fn wait_drained(ring: &RingRef, peer: &mut Peer) {
    let start = Instant::now();
    let mut polls = 0u32;
    while ring.occupancy() != 0 {
        std::hint::spin_loop();
        polls = polls.wrapping_add(1);
        if polls.is_multiple_of(4096) && start.elapsed() > Duration::from_secs(1) {
            peer.assert_alive();
            std::thread::yield_now();
        }
    }
}

/// Records of `len` payload bytes that fill a ring of `capacity` bytes
/// once, plus one: sending that many touches every page of the ring.
fn lap(capacity: usize, len: usize) -> u64 {
    (capacity / (RECORD_HEADER_LEN + len).next_multiple_of(8)) as u64 + 1
}

/// The throughput set-up: this process produces, a `sink` child consumes.
struct Stream {
    tx: Producer,
    peer: Peer,
    payload: Vec<u8>,
    next_id: u64,
    batch: u64,
    wait: Wait,
    _slot: Slot,
}

impl Stream {
    fn new(len: usize, batch: u64, wait: Wait, ring: usize, release_every: u64) -> Stream {
        let slot = Slot::create("bench", ring).expect("slot");
        let peer = Peer::spawn("sink", &slot, wait, release_every);
        let tx = Producer::attach(slot.requests(), Notify::Futex).expect("attach");
        let mut s = Stream {
            tx,
            peer,
            payload: payload(len),
            next_id: 0,
            batch,
            wait,
            _slot: slot,
        };
        // Waits for the child to start, and faults in every page of the
        // ring on both sides so that no timed run pays for it.
        s.run(lap(ring, len));
        s
    }

    /// Sends `n` records and returns the time until the consumer released
    /// the last one.
    fn run(&mut self, n: u64) -> Duration {
        let start = Instant::now();
        // A countdown, not `i % batch`: a division per record shows in
        // the producer's profile.
        let mut to_publish = self.batch;
        for _ in 0..n {
            let meta = Meta {
                id: self.next_id,
                code: 1,
                ..Meta::default()
            };
            push_blocking(
                &mut self.tx,
                &meta,
                &self.payload,
                self.wait,
                &mut self.peer,
            );
            self.next_id += 1;
            to_publish -= 1;
            if to_publish == 0 {
                self.tx.publish();
                to_publish = self.batch;
            }
        }
        self.tx.publish();
        wait_drained(self.tx.ring(), &mut self.peer);
        start.elapsed()
    }
}

/// The round-trip set-up: requests from this process, echoed back by an
/// `echo` child.
struct Echo {
    tx: Producer,
    rx: Consumer,
    peer: Peer,
    payload: Vec<u8>,
    next_id: u64,
    next_reply: u64,
    wait: Wait,
    _slot: Slot,
}

impl Echo {
    fn new(len: usize, wait: Wait, ring: usize) -> Echo {
        let slot = Slot::create("bench", ring).expect("slot");
        let peer = Peer::spawn("echo", &slot, wait, 1);
        let tx = Producer::attach(slot.requests(), Notify::Futex).expect("attach");
        let rx = Consumer::attach(slot.replies()).expect("attach");
        let mut e = Echo {
            tx,
            rx,
            peer,
            payload: payload(len),
            next_id: 0,
            next_reply: 0,
            wait,
            _slot: slot,
        };
        // One lap of both rings, pipelined (a lap of 64 B round trips one
        // at a time would take seconds in the futex variant): waits for the
        // child and faults in every page on both sides.
        let lap = lap(ring, len);
        while e.next_reply < lap {
            while e.next_id < lap && e.next_id - e.next_reply < 256 && e.send() {}
            e.tx.publish();
            e.receive();
        }
        e
    }

    /// Pushes the next request; false if the ring has no room.
    fn send(&mut self) -> bool {
        let meta = Meta {
            id: self.next_id,
            code: 1,
            ..Meta::default()
        };
        let pushed = self.tx.push(&meta, &self.payload).expect("ring");
        self.next_id += u64::from(pushed.is_some());
        pushed.is_some()
    }

    /// Waits for the next reply (spinning first in the spin variant) and
    /// consumes it.
    fn receive(&mut self) {
        let budget = self.wait.budget();
        loop {
            if let Some(r) = self.rx.peek().expect("ring") {
                assert_eq!(r.meta.id, self.next_reply, "reply out of order");
                black_box(touch(r.payload));
                break;
            }
            if spin_until(budget, || !self.rx.is_empty().expect("ring")) {
                continue;
            }
            let t = Instant::now();
            self.rx.wait(SLEEP).expect("ring");
            if t.elapsed() >= SLEEP {
                self.peer.assert_alive();
            }
        }
        self.rx.advance();
        self.rx.release();
        self.next_reply += 1;
    }

    /// `n` round trips, one at a time.
    fn run(&mut self, n: u64) -> Duration {
        let start = Instant::now();
        for _ in 0..n {
            assert!(self.send(), "request ring full");
            self.tx.publish();
            self.receive();
        }
        start.elapsed()
    }
}

/// Both ends of one ring in this process.
struct Local {
    tx: Producer,
    rx: Consumer,
    payload: Vec<u8>,
    next_id: u64,
    expected: u64,
    _slot: Slot,
}

impl Local {
    fn new(len: usize, ring: usize) -> Local {
        let slot = Slot::create("bench", ring).expect("slot");
        let mut l = Local {
            tx: Producer::attach(slot.requests(), Notify::Futex).expect("attach"),
            rx: Consumer::attach(slot.requests()).expect("attach"),
            payload: payload(len),
            next_id: 0,
            expected: 0,
            _slot: slot,
        };
        // Fault in every page of the ring.
        let mut left = lap(ring, len);
        while left > 0 {
            let n = l.push(left.min(l.chunk()), 32);
            l.drain();
            left -= n;
        }
        l
    }

    /// Records that fit in the ring with room to spare.
    fn chunk(&self) -> u64 {
        lap(self.tx.ring().capacity(), self.payload.len()) / 2
    }

    /// Pushes up to `n` records, publishing every `batch`; returns how
    /// many, fewer only if the ring filled up. (After a drain the producer
    /// may rewind: its pad then holds the rest of the data area until the
    /// consumer skips it, so only the space before the pad is free.)
    fn push(&mut self, n: u64, batch: u64) -> u64 {
        let mut to_publish = batch;
        for i in 0..n {
            let meta = Meta {
                id: self.next_id,
                code: 1,
                ..Meta::default()
            };
            if self.tx.push(&meta, &self.payload).expect("ring").is_none() {
                assert!(i > 0, "ring full with nothing pushed");
                self.tx.publish();
                return i;
            }
            self.next_id += 1;
            to_publish -= 1;
            if to_publish == 0 {
                self.tx.publish();
                to_publish = batch;
            }
        }
        self.tx.publish();
        n
    }

    /// Reads everything published, like the sink child does.
    fn drain(&mut self) {
        let mut acc = 0u64;
        while let Some(r) = self.rx.peek().expect("ring") {
            assert_eq!(r.meta.id, self.expected, "records out of order");
            acc = acc.wrapping_add(touch(r.payload));
            self.expected += 1;
            self.rx.advance();
        }
        self.rx.release();
        black_box(acc);
    }
}

// ------------------------------------------------------------ benchmarks --
//
// Criterion calls a benchmark's closure once per sample (and repeatedly
// while warming up), so each set-up (slot, child process, warm lap) lives
// outside it: made on the first call, reused by the others, dropped (child
// killed and reaped) when the benchmark is done. A filtered-out benchmark
// never makes its set-up.

fn inproc(c: &mut Criterion) {
    let ring = ring_capacity();
    let mut g = c.benchmark_group("inproc");
    g.throughput(Throughput::Elements(1));
    // One thread alternates: push `batch` records, publish, drain them.
    for batch in [1u64, 32] {
        let mut setup: Option<Local> = None;
        g.bench_function(BenchmarkId::new("64B", format!("batch{batch}")), |b| {
            let l = setup.get_or_insert_with(|| Local::new(64, ring));
            b.iter_custom(|iters| {
                let start = Instant::now();
                let mut left = iters;
                while left > 0 {
                    let n = l.push(left.min(batch), batch);
                    l.drain();
                    left -= n;
                }
                start.elapsed()
            });
        });
    }
    // Each side's own cost, the other side's work untimed: a chunk of
    // records (half the ring) is pushed then drained.
    for (name, time_producer) in [("producer_only", true), ("consumer_only", false)] {
        let mut setup: Option<Local> = None;
        g.bench_function(BenchmarkId::new("64B", name), |b| {
            let l = setup.get_or_insert_with(|| Local::new(64, ring));
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let t = Instant::now();
                    let n = l.push(left.min(l.chunk()), 32);
                    if time_producer {
                        timed += t.elapsed();
                    }
                    let t = Instant::now();
                    l.drain();
                    if !time_producer {
                        timed += t.elapsed();
                    }
                    left -= n;
                }
                timed
            });
        });
    }
    g.finish();
}

fn xproc_throughput(c: &mut Criterion) {
    let ring = ring_capacity();
    let mut g = c.benchmark_group("xproc_throughput");
    g.throughput(Throughput::Elements(1));
    // (payload bytes, records per publish, waiting, ring bytes)
    let small = 64 << 10;
    let cases: &[(usize, u64, Wait, usize)] = &[
        (64, 1, Wait::Spin, ring),
        (64, 32, Wait::Spin, ring),
        (64, 256, Wait::Spin, ring),
        (64, 32, Wait::Futex, ring),
        (64, 32, Wait::Spin, small),
        (64, 32, Wait::Futex, small),
        (4096, 32, Wait::Spin, ring),
        (4096, 32, Wait::Futex, ring),
    ];
    for &(len, batch, wait, ring_len) in cases {
        let mut param = format!("batch{batch}/{}", wait.name());
        if ring_len != ring {
            param += &format!("/ring{}KiB", ring_len >> 10);
        }
        let mut setup: Option<Stream> = None;
        g.bench_function(BenchmarkId::new(format!("{len}B"), param), |b| {
            let s = setup
                .get_or_insert_with(|| Stream::new(len, batch, wait, ring_len, release_every()));
            b.iter_custom(|iters| s.run(iters));
        });
    }
    g.finish();
}

fn xproc_round_trip(c: &mut Criterion) {
    let ring = ring_capacity();
    let mut g = c.benchmark_group("xproc_round_trip");
    for len in [64usize, 4096] {
        for wait in [Wait::Spin, Wait::Futex] {
            let mut setup: Option<Echo> = None;
            g.bench_function(BenchmarkId::new(format!("{len}B"), wait.name()), |b| {
                let e = setup.get_or_insert_with(|| Echo::new(len, wait, ring));
                b.iter_custom(|iters| e.run(iters));
            });
        }
    }
    g.finish();
}

fn main() {
    if let Ok(role) = std::env::var(ROLE_ENV) {
        child_main(&role);
    }
    // Defaults that keep the whole run near a minute and a half; command
    // line options (--measurement-time, --quick, filters...) override them.
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .nresamples(20_000)
        .configure_from_args();
    inproc(&mut c);
    xproc_throughput(&mut c);
    xproc_round_trip(&mut c);
    c.final_summary();
}
