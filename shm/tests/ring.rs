//! Ring tests: a model-based property test in one process, and
//! cross-process tests where the peer is a separate process (this test
//! binary re-executed in a child role, with the slot's memfd inherited).

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use halfsync_shm::{Consumer, Meta, Notify, Producer, REWIND_AT, RingError, Slot, sys};
use proptest::prelude::*;

const CHILD_ROLE: &str = "HS_SHM_TEST_ROLE";

/// Payload for record `id`: a length derived from the id and bytes that a
/// torn or misplaced record could not reproduce.
fn payload_for(id: u64, max: usize) -> Vec<u8> {
    let len = (id.wrapping_mul(2_654_435_761) % (max as u64 + 1)) as usize;
    (0..len)
        .map(|i| (id as u8).wrapping_mul(31).wrapping_add(i as u8))
        .collect()
}

// ---- in-process ----

#[test]
fn fifo_and_wraparound() {
    let slot = Slot::create("t", 4096).unwrap();
    let mut tx = Producer::attach(slot.requests(), Notify::Futex).unwrap();
    let mut rx = Consumer::attach(slot.requests()).unwrap();
    let max = slot.requests().max_payload();
    assert_eq!(max, 2048 - 40);
    // Many laps around a small ring with sizes that force padding records.
    for id in 0..10_000u64 {
        let p = payload_for(id, 700);
        let meta = Meta {
            code: id as u16,
            id,
            tag: !id,
            time_ns: id * 3,
            flags: 1,
        };
        assert!(tx.push(&meta, &p).unwrap().is_some(), "push {id}");
        tx.publish();
        let r = rx.peek().unwrap().expect("record");
        assert_eq!(r.meta, meta);
        assert_eq!(r.payload, &p[..]);
        rx.advance();
        rx.release();
        assert!(rx.peek().unwrap().is_none());
    }
}

/// Offsets (position within the data area) of `n` records of `len` bytes
/// pushed one batch at a time; with `lag`, the consumer keeps one record
/// unreleased, so the ring is never empty when a batch starts.
fn offsets(rewind: bool, lag: bool, n: u64, len: usize) -> Vec<usize> {
    let slot = Slot::create("rewind", 1 << 20).unwrap();
    let cap = slot.requests().capacity();
    let mut tx = Producer::attach(slot.requests(), Notify::Futex).unwrap();
    tx.set_rewind(rewind);
    let mut rx = Consumer::attach(slot.requests()).unwrap();
    let mut out = Vec::new();
    for id in 0..n {
        let p = payload_for(id, len);
        let meta = Meta {
            id,
            ..Meta::default()
        };
        let pos = tx.push(&meta, &p).unwrap().expect("room");
        out.push((pos as usize) & (cap - 1));
        tx.publish();
        let r = rx.peek().unwrap().expect("record");
        assert_eq!((r.meta.id, r.payload), (id, &p[..]));
        if lag {
            // Hand back everything before this record, keep this one.
            rx.release();
            rx.advance();
        } else {
            rx.advance();
            rx.release();
        }
    }
    out
}

#[test]
fn an_empty_ring_rewinds_to_its_first_pages() {
    let rec = 1024 + 40;
    // Drained between batches: records stay within the first REWIND_AT
    // bytes (plus one record), lap after lap of positions.
    let hot = offsets(true, false, 20_000, 1024);
    assert!(
        hot.iter().all(|&o| o < REWIND_AT + rec),
        "{:?}",
        hot.iter().max()
    );
    assert!(hot.iter().filter(|&&o| o == 0).count() > 100);
    // Without rewinding they walk the whole megabyte.
    let cold = offsets(false, false, 5_000, 1024);
    assert!(cold.iter().any(|&o| o > 1 << 19));
    // A ring that is not empty when a batch starts is not rewound (the
    // consumer may still be reading), yet every record arrives intact.
    let busy = offsets(true, true, 5_000, 1024);
    assert!(busy.iter().any(|&o| o > 1 << 19));
}

/// A 1 MiB ring whose producer has pushed one record of `first` payload
/// bytes that the consumer has read and released: empty, `first + 40`
/// bytes into its data area. Returns the slot (keep it alive), producer,
/// consumer and the data area's capacity.
fn drained_after(first: usize) -> (Slot, Producer, Consumer, usize) {
    let slot = Slot::create("rewind", 1 << 20).unwrap();
    let cap = slot.requests().capacity();
    let mut tx = Producer::attach(slot.requests(), Notify::Futex).unwrap();
    let mut rx = Consumer::attach(slot.requests()).unwrap();
    tx.push(&Meta::default(), &vec![1u8; first])
        .unwrap()
        .unwrap();
    tx.publish();
    rx.peek().unwrap().unwrap();
    rx.advance();
    rx.release();
    (slot, tx, rx, cap)
}

/// A rewind's pad is space the consumer can only free once it sees it: a
/// producer that waits for room publishes first, or a record that needs
/// the pad's space would wait forever (the worker's long-reply path).
#[test]
fn waiting_for_space_publishes_the_rewind_pad_first() {
    let (_slot, mut tx, mut rx, cap) = drained_after(130_000);
    let meta = Meta::default();
    // Empty and past REWIND_AT: this one starts the next lap at offset 0,
    // behind a pad that fills the rest of this one.
    let pos = tx.push(&meta, &[2u8; 60_000]).unwrap().unwrap();
    assert_eq!(pos as usize % cap, 0);
    assert!(!tx.fits(100_000).unwrap());
    assert!(
        !tx.wait_for_space(100_000, Duration::from_millis(1))
            .unwrap()
    );
    // The wait published the pad and the record.
    let r = rx.peek().unwrap().expect("published by the wait");
    assert_eq!(r.payload.len(), 60_000);
    rx.advance();
    rx.release();
    assert!(tx.fits(100_000).unwrap());
}

/// A worker releases a request only after running it; with
/// `set_release_pads` the pad of a rewind (most of the ring) goes back to
/// the producer as soon as the consumer skips it.
#[test]
fn a_skipped_pad_is_released_at_once_when_asked() {
    for release_pads in [false, true] {
        let (_slot, mut tx, mut rx, cap) = drained_after(130_000);
        rx.set_release_pads(release_pads);
        let meta = Meta::default();
        let pos = tx.push(&meta, &[2u8; 60_000]).unwrap().unwrap();
        assert_eq!(pos as usize % cap, 0, "rewound");
        tx.publish();
        // The consumer is working on the record behind the pad.
        assert_eq!(rx.peek().unwrap().unwrap().payload.len(), 60_000);
        assert_eq!(tx.fits(400_000).unwrap(), release_pads);
        rx.advance();
        rx.release();
        assert!(tx.fits(400_000).unwrap());
    }
}

/// A reservation given up with `abandon` leaves nothing behind, not even
/// the pad of the rewind it made: the next one decides afresh.
#[test]
fn an_abandoned_reservation_takes_its_rewind_back() {
    let (_slot, mut tx, mut rx, cap) = drained_after(140_000);
    let meta = Meta::default();
    let before = tx.published();
    let r = tx.try_reserve(65_536).unwrap().unwrap();
    assert_eq!(r.pos() as usize % cap, 0, "rewound");
    tx.abandon();
    // Too big to rewind for (less than twice its size in): it continues
    // where the last record ended.
    let pos = tx.push(&meta, &[3u8; 100_000]).unwrap().unwrap();
    assert_eq!(pos, before);
    tx.publish();
    let rec = rx.peek().unwrap().unwrap();
    assert_eq!((rec.pos, rec.payload.len()), (before, 100_000));
}

/// A worker's step: the request's space goes back and the reply is
/// published, with one fence; each side's sleeping peer is woken, and a
/// step with nothing to release or publish does nothing.
#[test]
fn release_and_publish_does_both_and_wakes_the_sleeper() {
    let slot = Slot::create("t", 4096).unwrap();
    // Proxy side: requests out, replies in. Worker side: the reverse.
    let mut req_tx = Producer::attach(slot.requests(), Notify::Futex).unwrap();
    let mut rep_rx = Consumer::attach(slot.replies()).unwrap();
    let mut req_rx = Consumer::attach(slot.requests()).unwrap();
    let mut rep_tx = Producer::attach(slot.replies(), Notify::Futex).unwrap();
    let meta = Meta::default();
    while req_tx.push(&meta, &[1u8; 100]).unwrap().is_some() {}
    req_tx.publish();
    // Nothing consumed, nothing pushed: a no-op.
    assert!(!req_rx.release_and_publish(&mut rep_tx));
    // The reply ring's consumer goes to sleep; the worker serves one.
    assert!(rep_rx.prepare_sleep().unwrap());
    req_rx.peek().unwrap().unwrap();
    req_rx.advance();
    rep_tx.push(&meta, b"reply").unwrap().unwrap();
    assert!(!req_tx.fits(100).unwrap());
    // Woke the sleeping consumer (its flag is cleared) ...
    assert!(req_rx.release_and_publish(&mut rep_tx));
    assert!(!rep_tx.consumer_sleeping());
    // ... which sees the reply, and the producer sees the room.
    assert_eq!(rep_rx.peek().unwrap().unwrap().payload, b"reply");
    assert!(req_tx.fits(100).unwrap());
    // A consumer that is awake is not woken again.
    req_rx.peek().unwrap().unwrap();
    req_rx.advance();
    rep_tx.push(&meta, b"second").unwrap().unwrap();
    assert!(!req_rx.release_and_publish(&mut rep_tx));
    // A producer asleep for want of room is woken by the release half.
    while req_tx.push(&meta, &[1u8; 100]).unwrap().is_some() {}
    req_tx.publish();
    let sleeper = std::thread::spawn(move || {
        let t = Instant::now();
        let fits = req_tx.wait_for_space(100, Duration::from_secs(10)).unwrap();
        (fits, t.elapsed())
    });
    // (Give it time to go to sleep; if it has not yet, it finds the room.)
    std::thread::sleep(Duration::from_millis(200));
    req_rx.peek().unwrap().unwrap();
    req_rx.advance();
    rep_tx.push(&meta, b"third").unwrap().unwrap();
    req_rx.release_and_publish(&mut rep_tx);
    let (fits, waited) = sleeper.join().unwrap();
    assert!(fits && waited < Duration::from_secs(5), "{fits} {waited:?}");
}

#[test]
fn full_ring_refuses_then_accepts_after_release() {
    let slot = Slot::create("t", 4096).unwrap();
    let mut tx = Producer::attach(slot.requests(), Notify::Futex).unwrap();
    let mut rx = Consumer::attach(slot.requests()).unwrap();
    let meta = Meta::default();
    let mut n = 0;
    while tx.push(&meta, &[7u8; 100]).unwrap().is_some() {
        n += 1;
        assert!(n < 100);
    }
    assert_eq!(n, 4096 / 144);
    // Unpublished records are invisible.
    assert!(rx.peek().unwrap().is_none());
    tx.publish();
    rx.peek().unwrap().unwrap();
    rx.advance();
    // Consumed but not released: still no room.
    assert!(tx.push(&meta, &[7u8; 100]).unwrap().is_none());
    rx.release();
    assert!(tx.push(&meta, &[7u8; 100]).unwrap().is_some());
    // Larger than half the ring never fits.
    assert!(!tx.fits(slot.requests().max_payload() + 1).unwrap());
}

#[test]
fn scribbled_positions_are_reported_not_trusted() {
    let slot = Slot::create("t", 4096).unwrap();
    let mut tx = Producer::attach(slot.requests(), Notify::Futex).unwrap();
    let mut rx = Consumer::attach(slot.requests()).unwrap();
    assert!(tx.push(&Meta::default(), b"abc").unwrap().is_some());
    tx.publish();
    // A peer that scribbles the record header: length and kind garbage.
    let data = request_data_ptr(&slot);
    // SAFETY: test-only write into the slot's request data area, offset 0,
    // which holds the record just published.
    unsafe { std::ptr::write(data as *mut u32, 12345) };
    assert!(matches!(rx.peek(), Err(RingError::Corrupt { .. })));
    // SAFETY: as above.
    unsafe {
        std::ptr::write(data as *mut u32, 48);
        std::ptr::write(data.add(4) as *mut u16, 9);
    }
    assert!(matches!(rx.peek(), Err(RingError::Corrupt { .. })));
    // SAFETY: as above; a correct length and kind but a payload length
    // that does not match the record length.
    unsafe {
        std::ptr::write(data.add(4) as *mut u16, 1);
        std::ptr::write(data.add(32) as *mut u32, 4000);
    }
    assert!(matches!(rx.peek(), Err(RingError::Corrupt { .. })));
}

/// The request ring's data area: after the control page and the ring
/// header page (see slot.rs).
fn request_data_ptr(slot: &Slot) -> *mut u8 {
    let base = slot.control() as *const _ as *mut u8;
    // SAFETY: the slot is 8192 + 2 * (4096 + capacity) bytes long.
    unsafe { base.add(8192) }
}

#[derive(Debug, Clone)]
enum Op {
    Push(usize),
    Publish,
    Pop,
    Release,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..2100).prop_map(Op::Push),
        2 => Just(Op::Publish),
        3 => Just(Op::Pop),
        2 => Just(Op::Release),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    /// The ring behaves like a FIFO queue of whole records: what is popped
    /// is exactly what was pushed and published, in order; nothing is ever
    /// reported corrupt; an empty ring always takes a record of up to
    /// max_payload bytes.
    #[test]
    fn ring_matches_fifo_model(ops in proptest::collection::vec(op(), 1..400)) {
        let slot = Slot::create("prop", 4096).unwrap();
        let max = slot.requests().max_payload();
        let mut tx = Producer::attach(slot.requests(), Notify::Futex).unwrap();
        let mut rx = Consumer::attach(slot.requests()).unwrap();
        let mut unpublished: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
        let mut published: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
        let mut consumed_unreleased = 0usize;
        let mut next_id = 0u64;
        for op in ops {
            match op {
                Op::Push(len) => {
                    let len = len.min(max + 10);
                    let p = vec![(next_id % 251) as u8; len];
                    let empty = unpublished.is_empty() && published.is_empty() && consumed_unreleased == 0;
                    let ok = tx.push(&Meta { id: next_id, ..Meta::default() }, &p).unwrap().is_some();
                    if len > max {
                        prop_assert!(!ok);
                    } else if empty {
                        prop_assert!(ok, "empty ring refused {} bytes", len);
                    }
                    if ok {
                        unpublished.push_back((next_id, p));
                        next_id += 1;
                    }
                }
                Op::Publish => {
                    tx.publish();
                    published.extend(unpublished.drain(..));
                }
                Op::Pop => {
                    let got = rx.peek().unwrap().map(|r| (r.meta.id, r.payload.to_vec()));
                    prop_assert_eq!(got.clone(), published.front().cloned());
                    if got.is_some() {
                        rx.advance();
                        published.pop_front();
                        consumed_unreleased += 1;
                    }
                }
                Op::Release => {
                    rx.release();
                    consumed_unreleased = 0;
                }
            }
            prop_assert!(slot.requests().occupancy() <= 4096);
        }
    }
}

// ---- cross-process ----

/// Starts this test binary as a child in `role`, with the slot's memfd
/// inherited, running only the `child_role_entry` test.
fn spawn_child(role: &str, slot: &Slot, extra: &[(&str, String)]) -> Child {
    let fd = slot.fd().as_raw_fd();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child_role_entry",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ROLE, role)
    .env("HS_SHM_FD", fd.to_string())
    .env("HS_SHM_CAP", slot.capacity().to_string());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    // SAFETY: the closure only calls fcntl (async-signal-safe) between fork
    // and exec.
    unsafe {
        cmd.pre_exec(move || sys::clear_cloexec(fd));
    }
    cmd.spawn().unwrap()
}

/// Kills and reaps a child even if the test fails.
struct ChildGuard(Child);
impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn env_u64(k: &str) -> u64 {
    std::env::var(k).unwrap().parse().unwrap()
}

/// Entry point of child processes. As a plain test (no role in the
/// environment) it returns at once.
#[test]
fn child_role_entry() {
    let Ok(role) = std::env::var(CHILD_ROLE) else {
        return;
    };
    let fd = env_u64("HS_SHM_FD") as i32;
    let cap = env_u64("HS_SHM_CAP") as usize;
    // SAFETY: the parent passed this fd to us for exactly this purpose.
    let slot = Slot::open(unsafe { File::from_raw_fd(fd) }, cap).unwrap();
    match role.as_str() {
        "producer" => {
            let n = env_u64("HS_N");
            let max = env_u64("HS_MAX") as usize;
            let mut tx = Producer::attach(slot.requests(), Notify::Futex).unwrap();
            for id in 0..n {
                let p = payload_for(id, max);
                while !tx.fits(p.len()).unwrap() {
                    tx.publish();
                    tx.wait_for_space(p.len(), Duration::from_secs(1)).unwrap();
                }
                assert!(
                    tx.push(
                        &Meta {
                            id,
                            ..Meta::default()
                        },
                        &p
                    )
                    .unwrap()
                    .is_some()
                );
                if id % 8 == 7 {
                    tx.publish();
                }
            }
            tx.publish();
        }
        "producer-forever" => {
            let mut tx = Producer::attach(slot.requests(), Notify::Futex).unwrap();
            let mut rng = fastrand::Rng::with_seed(env_u64("HS_SEED"));
            let mut id = 0u64;
            loop {
                let p = payload_for(id, 900);
                if tx
                    .push(
                        &Meta {
                            id,
                            tag: id ^ 0xabcd,
                            ..Meta::default()
                        },
                        &p,
                    )
                    .unwrap()
                    .is_some()
                {
                    id += 1;
                    if rng.u32(0..4) == 0 {
                        tx.publish();
                    }
                } else {
                    tx.publish();
                    tx.wait_for_space(p.len(), Duration::from_millis(100))
                        .unwrap();
                }
            }
        }
        "echo" => {
            // A worker-like loop: every request becomes a reply with the same
            // id and payload, until a request with code 0xffff.
            let mut rx = Consumer::attach(slot.requests()).unwrap();
            let mut tx = Producer::attach(slot.replies(), Notify::Futex).unwrap();
            loop {
                let Some(r) = rx.peek().unwrap() else {
                    tx.publish();
                    rx.wait(Duration::from_secs(1)).unwrap();
                    continue;
                };
                if r.meta.code == 0xffff {
                    return;
                }
                let meta = r.meta;
                let payload = r.payload.to_vec();
                while !tx.fits(payload.len()).unwrap() {
                    tx.publish();
                    tx.wait_for_space(payload.len(), Duration::from_secs(1))
                        .unwrap();
                }
                assert!(tx.push(&meta, &payload).unwrap().is_some());
                // As a worker does: the request's space back and the reply
                // out, behind one fence.
                rx.advance();
                rx.release_and_publish(&mut tx);
            }
        }
        "scribble-protected" => {
            // A worker that protected its request data, then writes there.
            slot.protect_request_data().unwrap();
            let data = request_data_ptr(&slot);
            // SAFETY: deliberately writes to a read-only page: the process
            // must die of SIGSEGV here.
            unsafe { std::ptr::write_volatile(data, 1) };
            println!("SURVIVED");
        }
        other => panic!("unknown role {other}"),
    }
}

/// Drains records from `rx`, checking ids are consecutive from `*next` and
/// payloads intact. Returns false if the ring was empty.
fn drain_checked(rx: &mut Consumer, next: &mut u64, max: usize) -> bool {
    let mut any = false;
    while let Some(r) = rx.peek().unwrap() {
        assert_eq!(r.meta.id, *next, "records out of order");
        assert_eq!(r.payload, &payload_for(*next, max)[..], "payload of {next}");
        *next += 1;
        any = true;
        rx.advance();
    }
    rx.release();
    any
}

#[test]
fn cross_process_stream_with_futex_wakeups() {
    let slot = Slot::create("t", 64 * 1024).unwrap();
    let n = 200_000u64;
    let max = 300;
    let mut child = ChildGuard(spawn_child(
        "producer",
        &slot,
        &[("HS_N", n.to_string()), ("HS_MAX", max.to_string())],
    ));
    let mut rx = Consumer::attach(slot.requests()).unwrap();
    let mut next = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lost_wakeups = 0;
    while next < n {
        assert!(Instant::now() < deadline, "stalled at {next}");
        if !drain_checked(&mut rx, &mut next, max) {
            let t = Instant::now();
            rx.wait(Duration::from_secs(5)).unwrap();
            // Only a lost wake-up makes us sleep the whole timeout while
            // the producer still has records to send.
            if t.elapsed() >= Duration::from_secs(5) && next < n {
                lost_wakeups += 1;
            }
        }
    }
    assert_eq!(lost_wakeups, 0);
    assert!(child.0.wait().unwrap().success());
}

#[test]
fn cross_process_round_trip() {
    let slot = Slot::create("t", 64 * 1024).unwrap();
    let mut child = ChildGuard(spawn_child("echo", &slot, &[]));
    let mut tx = Producer::attach(slot.requests(), Notify::Futex).unwrap();
    let mut rx = Consumer::attach(slot.replies()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut sent = 0u64;
    let mut got = 0u64;
    let mut lost_wakeups = 0;
    let total = 50_000u64;
    while got < total {
        assert!(Instant::now() < deadline, "stalled at {got}");
        // Keep up to 32 requests in flight, published as one batch.
        while sent < total && sent - got < 32 {
            let p = payload_for(sent, 2000);
            if tx
                .push(
                    &Meta {
                        id: sent,
                        code: 1,
                        ..Meta::default()
                    },
                    &p,
                )
                .unwrap()
                .is_none()
            {
                break;
            }
            sent += 1;
        }
        tx.publish();
        let mut any = false;
        while let Some(r) = rx.peek().unwrap() {
            assert_eq!(r.meta.id, got);
            assert_eq!(r.payload, &payload_for(got, 2000)[..]);
            got += 1;
            any = true;
            rx.advance();
        }
        rx.release();
        if !any {
            let t = Instant::now();
            rx.wait(Duration::from_secs(5)).unwrap();
            // Only a lost wake-up makes us sleep the whole timeout while
            // requests are out.
            if t.elapsed() >= Duration::from_secs(5) && got < sent {
                lost_wakeups += 1;
            }
        }
    }
    assert_eq!(lost_wakeups, 0);
    assert!(
        tx.push(
            &Meta {
                code: 0xffff,
                ..Meta::default()
            },
            &[]
        )
        .unwrap()
        .is_some()
    );
    tx.publish();
    assert!(child.0.wait().unwrap().success());
}

#[test]
fn protected_request_data_cannot_be_scribbled_by_the_worker() {
    use std::os::unix::process::ExitStatusExt;
    let slot = Slot::create("t", 16 * 1024).unwrap();
    let mut tx = Producer::attach(slot.requests(), Notify::Futex).unwrap();
    assert!(
        tx.push(
            &Meta {
                id: 5,
                ..Meta::default()
            },
            b"keep"
        )
        .unwrap()
        .is_some()
    );
    tx.publish();
    let mut child = ChildGuard(spawn_child("scribble-protected", &slot, &[]));
    let st = child.0.wait().unwrap();
    assert_eq!(st.signal(), Some(libc::SIGSEGV), "{st:?}");
    // The request is intact for the proxy to hand to another worker.
    let mut rx = Consumer::attach(slot.requests()).unwrap();
    assert_eq!(rx.peek().unwrap().unwrap().payload, b"keep");
}

#[test]
fn producer_killed_mid_write_leaves_ring_readable() {
    let mut rng = fastrand::Rng::with_seed(7);
    for round in 0..20u64 {
        let slot = Slot::create("t", 16 * 1024).unwrap();
        let child = spawn_child("producer-forever", &slot, &[("HS_SEED", round.to_string())]);
        let mut child = ChildGuard(child);
        let mut rx = Consumer::attach(slot.requests()).unwrap();
        let mut next = 0u64;
        // Wait until the producer runs, then consume concurrently for a
        // random time and kill it at a random instruction of its loop.
        let started = Instant::now();
        while next == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "producer never started"
            );
            drain_checked(&mut rx, &mut next, 900);
        }
        let until = Instant::now() + Duration::from_millis(rng.u64(1..30));
        while Instant::now() < until {
            drain_checked(&mut rx, &mut next, 900);
        }
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        // Everything published is intact; nothing half-written shows.
        drain_checked(&mut rx, &mut next, 900);
        assert!(rx.peek().unwrap().is_none());
        // The ring can be reset and reused by a new producer.
        slot.requests().reset();
        let mut tx = Producer::attach(slot.requests(), Notify::Futex).unwrap();
        let mut rx = Consumer::attach(slot.requests()).unwrap();
        assert!(
            tx.push(
                &Meta {
                    id: 1,
                    ..Meta::default()
                },
                b"again"
            )
            .unwrap()
            .is_some()
        );
        tx.publish();
        assert_eq!(rx.peek().unwrap().unwrap().payload, b"again");
    }
}

/// Claim and revoke share one cursor: a record is either run by the
/// worker or taken back by the proxy, never both.
#[test]
fn claim_and_revoke_never_both_win() {
    let slot = Slot::create("t", 4096).unwrap();
    let ctl = slot.control();
    assert!(ctl.claim(0, 48));
    assert_eq!(ctl.revoke(200), Some(48), "records from 48 on are revoked");
    assert!(!ctl.claim(48, 96), "a revoked record is skipped");
    assert!(!ctl.claim(96, 200));
    assert!(ctl.claim(200, 248), "records pushed after the revoke run");
    assert_eq!(ctl.revoke(248), None, "nothing left to revoke");
    // Racing: a worker thread claims a stream of records while the proxy
    // revokes; every record is claimed or revoked exactly once.
    let slot2 = Slot::create("t", 4096).unwrap();
    let s2 = slot2.clone();
    let claimed = std::thread::spawn(move || {
        let mut won = Vec::new();
        for i in 0..100_000u64 {
            if s2.control().claim(i * 8, i * 8 + 8) {
                won.push(i);
            }
        }
        won
    });
    let mut revoked = Vec::new();
    for end in (0..100_000u64).step_by(997).map(|i| i * 8) {
        if let Some(from) = slot2.control().revoke(end) {
            revoked.push((from, end));
        }
    }
    let won = claimed.join().unwrap();
    let in_revoked = |i: u64| revoked.iter().any(|&(a, b)| i * 8 >= a && i * 8 < b);
    for &i in &won {
        assert!(!in_revoked(i), "record {i} both claimed and revoked");
    }
    for i in 0..100_000u64 {
        assert!(
            won.binary_search(&i).is_ok() || in_revoked(i),
            "record {i} lost"
        );
    }
}

/// The run time a reply's flags carry: microseconds exactly up to 32.7 ms,
/// whole milliseconds (rounded up) beyond, saturating at ~32.8 s; 0 is
/// "not sampled".
#[test]
fn run_time_flags_round_trip() {
    use halfsync_shm::{run_time_flags, run_time_ns};
    assert_eq!(run_time_ns(0), None);
    for us in [0u64, 1, 999, 20_000, 32_767] {
        assert_eq!(run_time_ns(run_time_flags(us)), Some(us * 1000), "{us}");
    }
    for (us, ms) in [
        (32_768u64, 33u64),
        (65_000, 65),
        (300_499, 301),
        (10_000_000, 10_000),
    ] {
        assert_eq!(
            run_time_ns(run_time_flags(us)),
            Some(ms * 1_000_000),
            "{us}"
        );
    }
    assert_eq!(run_time_flags(u64::MAX), u16::MAX);
    assert_eq!(run_time_ns(u16::MAX), Some(32_799 * 1_000_000));
    // Encoding: never 0 (that reads as "not sampled"), never decreasing,
    // and never below the run time up to saturation (the µs/ms boundary
    // by single microseconds).
    for range in [(0..32_799_000u64).step_by(997), (32_700..33_100).step_by(1)] {
        let mut last = 1;
        for us in range {
            let f = run_time_flags(us);
            assert!(f >= last, "{us}");
            assert!(run_time_ns(f).unwrap() >= us * 1000, "{us}");
            last = f;
        }
    }
    // Decoding: strictly increasing over every flag value.
    let mut prev = None;
    for f in 1..=u16::MAX {
        let ns = run_time_ns(f).unwrap();
        assert!(prev.is_none_or(|p| ns > p), "{f}");
        prev = Some(ns);
    }
}
