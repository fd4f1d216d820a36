//! A single-producer single-consumer ring of variable-length records in
//! shared memory.
//!
//! # Layout
//! A ring is a [`RingHeader`] followed by `capacity` data bytes (a power of
//! two). Positions (`head`, `tail`) are byte counts that only grow; the
//! offset in the data area is `position & (capacity - 1)`. Every record
//! starts at a multiple of 8 and is a [`RecordHeader`] (40 bytes) followed by
//! its payload, padded to 8. A record never wraps: when it does not fit
//! before the end of the data area, the producer writes a padding record
//! that fills the rest and starts the record at offset 0. So any record up
//! to half the capacity always fits in an empty ring.
//!
//! # Rewinding
//! Positions grow forever, but the bytes a ring touches need not: when the
//! producer starts a batch (nothing unpublished), finds the ring empty
//! (the consumer released everything) and is at least [`REWIND_AT`] bytes
//! (and at least twice the new record's size) past offset 0, it writes a padding
//! record to the end and starts again at offset 0. A ring that drains
//! between batches so keeps reusing its first few pages, which stay in
//! cache, instead of walking the whole capacity: with 4 KiB records at
//! 16 in flight, pinned, 0.46-0.63x of the inline baseline before and
//! 0.79-0.85x after, in the same runs (BENCHMARKS.md, "Payload size").
//! The pad is an ordinary one (it fills the data area to its end), so a
//! consumer needs nothing new to follow it; a consumer that releases only
//! after working on a record should release pads as it skips them
//! ([`Consumer::set_release_pads`]), or the producer has only the space
//! before the pad until then. A reservation given up before publishing
//! ([`Producer::abandon`]) takes its rewind back with it.
//!
//! # Ownership
//! - `tail` and `producer_sleeping` are written by the producer only
//!   (the consumer may clear `producer_sleeping` when it wakes it).
//! - `head` and `consumer_sleeping` are written by the consumer only (the
//!   producer clears `consumer_sleeping` when it wakes it).
//! - Record bytes in `[head, tail)` belong to the consumer, the rest to the
//!   producer.
//!
//! # Publication
//! The producer writes records past `tail`, then stores the new `tail` with
//! Release ([`Producer::publish`], once per batch); the consumer loads
//! `tail` with Acquire and then reads the records. The consumer hands space
//! back by storing `head` with Release ([`Consumer::release`]). There are
//! no locks: a process killed at any instruction leaves a ring whose
//! published records are intact and whose unpublished bytes are invisible.
//!
//! # Wake-ups
//! A side about to sleep sets its `*_sleeping` word, issues a SeqCst fence
//! and re-checks the ring; the other side, after publishing, issues a
//! SeqCst fence and swaps the word to 0: only if it was 1 does it pay for a
//! wake-up syscall (futex wake or eventfd write). One of the two always
//! sees the other's store, so no wake-up is lost.
//!
//! # Untrusted peers
//! Either side may be a process that scribbled over the ring. Every value
//! read from the peer's fields or from record headers is read once, into a
//! local, and bounds-checked before use; a bad value is a
//! [`RingError::Corrupt`], never an out-of-bounds access or a panic.

use std::os::fd::RawFd;
use std::ptr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use std::time::Duration;

use crate::region::Region;
use crate::sys;

/// Size of a `RecordHeader` (a record's fixed header) in bytes.
pub const RECORD_HEADER_LEN: usize = 40;

/// Size reserved for a [`RingHeader`] before the data area (one page keeps
/// the data area page-aligned).
pub const RING_HEADER_LEN: usize = 4096;

/// How far past offset 0 a producer must be before it rewinds an empty
/// ring (quarter of the capacity in rings smaller than 256 KiB). Below
/// it, records simply continue: a rewind costs a pad record and a load of
/// the consumer's `head`.
pub const REWIND_AT: usize = 64 << 10;

const KIND_DATA: u16 = 1;
const KIND_PAD: u16 = 2;

/// The shared part of a ring: producer and consumer fields on separate
/// cache lines so the two processes do not bounce one line between cores.
#[repr(C)]
pub struct RingHeader {
    tail: AtomicU64,
    producer_sleeping: AtomicU32,
    _pad0: [u8; 52],
    head: AtomicU64,
    consumer_sleeping: AtomicU32,
    _pad1: [u8; 52],
}

const _: () = assert!(std::mem::size_of::<RingHeader>() == 128);
const _: () = assert!(std::mem::size_of::<RingHeader>() <= RING_HEADER_LEN);

/// The fixed header of every record, as laid out in shared memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct RecordHeader {
    total_len: u32,
    kind: u16,
    code: u16,
    id: u64,
    tag: u64,
    time_ns: u64,
    payload_len: u32,
    flags: u16,
    reserved: u16,
}

const _: () = assert!(std::mem::size_of::<RecordHeader>() == RECORD_HEADER_LEN);

/// What a record carries besides its payload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// Request: command number. Reply: status.
    pub code: u16,
    /// Request: the HSP/1 flags field. Reply: 0, or, on the replies a
    /// worker samples, how long the plugin ran ([`run_time_flags`]); the
    /// proxy sizes its in-flight cap with it and decides whether batching
    /// a connection's requests on one worker pays (see its `pick_slot`).
    pub flags: u16,
    /// Request id chosen by the client.
    pub id: u64,
    /// Opaque routing tag: the proxy stores its connection token here and
    /// the worker copies it into the reply.
    pub tag: u64,
    /// CLOCK_MONOTONIC nanoseconds; for requests, when the proxy enqueued it.
    pub time_ns: u64,
}

/// Encodes a sampled run time of `us` microseconds for a reply's
/// [`Meta::flags`] (0 stays "not sampled"): 1 + µs below 32,768 µs, then
/// milliseconds (rounded up, so decoded values only grow) from 33 ms up
/// to ~32.8 s, where it saturates. (Proxy and workers are always one
/// build: children are exec'd from the master's own file, see the root
/// crate's `exe.rs`.)
pub fn run_time_flags(us: u64) -> u16 {
    if us < 0x8000 {
        1 + us as u16
    } else {
        (0x8001 + (us.div_ceil(1000) - 33).min(0x7ffe)) as u16
    }
}

/// Decodes [`run_time_flags`] into nanoseconds; `None` for 0.
pub fn run_time_ns(flags: u16) -> Option<u64> {
    match flags {
        0 => None,
        1..=0x8000 => Some(u64::from(flags - 1) * 1000),
        f => Some((u64::from(f - 0x8001) + 33) * 1_000_000),
    }
}

/// A ring found in a state no correct peer could have left it in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RingError {
    /// A position or record header is out of bounds or inconsistent.
    #[error("corrupt ring: {what} = {value}")]
    Corrupt {
        /// Which field was bad.
        what: &'static str,
        /// The value found.
        value: u64,
    },
}

fn corrupt<T>(what: &'static str, value: u64) -> Result<T, RingError> {
    Err(RingError::Corrupt { what, value })
}

/// How a producer wakes a sleeping consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notify {
    /// The consumer sleeps in [`Consumer::wait`] on the ring's futex word.
    Futex,
    /// The consumer sleeps in epoll on this eventfd.
    EventFd(RawFd),
}

/// One ring inside a mapped region: a handle both sides build their
/// [`Producer`] or [`Consumer`] from.
#[derive(Clone)]
pub struct RingRef {
    region: Arc<Region>,
    offset: usize,
    capacity: usize,
}

impl RingRef {
    /// The ring whose header starts `offset` bytes into `region`, with
    /// `capacity` data bytes after the header.
    ///
    /// # Panics
    /// If `capacity` is not a power of two of at least 64 or the ring does
    /// not fit in the region (a caller bug, not input).
    pub fn new(region: Arc<Region>, offset: usize, capacity: usize) -> RingRef {
        assert!(capacity.is_power_of_two() && capacity >= 64);
        assert!(offset.is_multiple_of(RING_HEADER_LEN));
        assert!(
            offset
                .checked_add(RING_HEADER_LEN + capacity)
                .is_some_and(|end| end <= region.len())
        );
        RingRef {
            region,
            offset,
            capacity,
        }
    }

    /// Data bytes in the ring.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The largest payload a record in this ring can carry.
    pub fn max_payload(&self) -> usize {
        self.capacity / 2 - RECORD_HEADER_LEN
    }

    fn header(&self) -> &RingHeader {
        // SAFETY: the constructor checked that offset + header fits in the
        // region, offset is page-aligned, and RingHeader is all atomics and
        // padding, valid for any bit pattern. The region outlives `self`.
        unsafe { &*(self.region.as_ptr().add(self.offset) as *const RingHeader) }
    }

    fn data(&self) -> *mut u8 {
        // SAFETY: offset + RING_HEADER_LEN is inside the region (constructor).
        unsafe { self.region.as_ptr().add(self.offset + RING_HEADER_LEN) }
    }

    /// Empties the ring. Only for when neither peer is attached (the
    /// worker is dead and the proxy is about to re-attach).
    pub fn reset(&self) {
        let h = self.header();
        h.head.store(0, Ordering::Relaxed);
        h.tail.store(0, Ordering::Relaxed);
        h.producer_sleeping.store(0, Ordering::Relaxed);
        h.consumer_sleeping.store(0, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// Wakes the consumer if it sleeps in [`Consumer::wait`], whatever its
    /// sleep flag says (used to make a worker notice a stop request).
    pub fn wake_consumer(&self) {
        sys::futex_wake(&self.header().consumer_sleeping, i32::MAX);
    }

    /// Bytes published and not yet released, as seen now (for status
    /// displays; either side may call it).
    pub fn occupancy(&self) -> u64 {
        let h = self.header();
        let tail = h.tail.load(Ordering::Acquire);
        let head = h.head.load(Ordering::Acquire);
        tail.wrapping_sub(head).min(self.capacity as u64)
    }

    fn read_record_header(&self, off: usize) -> RecordHeader {
        // SAFETY: callers pass an 8-aligned off with off + 40 <= capacity
        // (checked before the call), and any bit pattern is a valid
        // RecordHeader. A volatile copy reads each byte exactly once, so a
        // peer scribbling concurrently cannot make validated fields change.
        unsafe { ptr::read_volatile(self.data().add(off) as *const RecordHeader) }
    }

    fn write_record_header(&self, off: usize, h: RecordHeader) {
        // SAFETY: off is 8-aligned and off + 40 <= capacity (checked by the
        // producer before writing); the bytes are the producer's to write.
        unsafe { ptr::write(self.data().add(off) as *mut RecordHeader, h) }
    }
}

fn align8(n: usize) -> usize {
    (n + 7) & !7
}

/// The writing side of a ring.
pub struct Producer {
    ring: RingRef,
    notify: Notify,
    /// Next write position (private until published).
    tail: u64,
    /// Last published tail.
    published: u64,
    /// Last head seen; refreshed only when space seems short.
    head_cache: u64,
    /// Benchmarks only: wake the consumer on every publish, sleeping or not.
    always_wake: bool,
    /// Rewind to offset 0 when the ring is empty (see the module doc).
    rewind: bool,
}

/// Space reserved in a ring for one record; write the payload into
/// [`Reservation::buf`] and then [`Reservation::commit`] it.
pub struct Reservation<'a> {
    producer: &'a mut Producer,
    off: usize,
    max: usize,
}

impl Producer {
    /// Attaches to the ring as its producer, continuing from the positions
    /// found there.
    pub fn attach(ring: RingRef, notify: Notify) -> Result<Producer, RingError> {
        let h = ring.header();
        let tail = h.tail.load(Ordering::Acquire);
        let head = h.head.load(Ordering::Acquire);
        if !tail.is_multiple_of(8)
            || !head.is_multiple_of(8)
            || tail.wrapping_sub(head) > ring.capacity as u64
        {
            return corrupt("tail", tail);
        }
        Ok(Producer {
            ring,
            notify,
            tail,
            published: tail,
            head_cache: head,
            always_wake: false,
            rewind: true,
        })
    }

    /// Benchmarks only: pay for a wake-up syscall on every publish, as if
    /// the consumer's sleep flag did not exist (to measure what it saves).
    pub fn set_always_wake(&mut self, on: bool) {
        self.always_wake = on;
    }

    /// Benchmarks only: never rewind (see the module doc), to measure what
    /// rewinding saves.
    pub fn set_rewind(&mut self, on: bool) {
        self.rewind = on;
    }

    /// The ring this producer writes.
    pub fn ring(&self) -> &RingRef {
        &self.ring
    }

    /// Free bytes, refreshing the consumer's head.
    fn refresh_head(&mut self) -> Result<(), RingError> {
        let head = self.ring.header().head.load(Ordering::Acquire);
        // The consumer can only move head forward, and never past what we published.
        if !head.is_multiple_of(8) || head < self.head_cache || head > self.published {
            return corrupt("head", head);
        }
        self.head_cache = head;
        Ok(())
    }

    /// Bytes a record of `payload_max` payload bytes needs at the current
    /// tail, including padding to the end of the data area if it must wrap.
    fn needed(&self, payload_max: usize) -> (usize, usize) {
        let rec = align8(RECORD_HEADER_LEN + payload_max);
        let off = (self.tail as usize) & (self.ring.capacity - 1);
        let till_end = self.ring.capacity - off;
        if rec <= till_end {
            (0, rec)
        } else {
            (till_end, rec)
        }
    }

    /// Whether a record with up to `payload_max` bytes fits right now.
    pub fn fits(&mut self, payload_max: usize) -> Result<bool, RingError> {
        if payload_max > self.ring.max_payload() {
            return Ok(false);
        }
        let (pad, rec) = self.needed(payload_max);
        let need = (pad + rec) as u64;
        let used = self.tail - self.head_cache;
        if self.ring.capacity as u64 - used >= need {
            return Ok(true);
        }
        self.refresh_head()?;
        let used = self.tail - self.head_cache;
        Ok(self.ring.capacity as u64 - used >= need)
    }

    /// Discards everything pushed (or reserved and padded for) since the
    /// last [`Producer::publish`]: none of it was visible to the consumer,
    /// so the space is simply the producer's again. For a reservation
    /// given up (a reply that outgrew it), so that the next one decides
    /// afresh where to go, rewinding included.
    pub fn abandon(&mut self) {
        self.tail = self.published;
    }

    /// Reserves room for a record of up to `payload_max` payload bytes, or
    /// returns `None` if the ring has no room now (or ever, for payloads
    /// over [`RingRef::max_payload`]).
    pub fn try_reserve(
        &mut self,
        payload_max: usize,
    ) -> Result<Option<Reservation<'_>>, RingError> {
        if !self.fits(payload_max)? {
            return Ok(None);
        }
        if self.rewind && self.tail == self.published {
            self.rewind_if_empty(align8(RECORD_HEADER_LEN + payload_max))?;
        }
        let (pad, _) = self.needed(payload_max);
        if pad > 0 {
            let off = (self.tail as usize) & (self.ring.capacity - 1);
            // A pad needs only total_len and kind; 8 bytes always fit.
            self.ring
                .write_record_header_prefix(off, pad as u32, KIND_PAD);
            self.tail += pad as u64;
        }
        let off = (self.tail as usize) & (self.ring.capacity - 1);
        Ok(Some(Reservation {
            producer: self,
            off,
            max: payload_max,
        }))
    }

    /// At the start of a batch: if the ring is empty and the tail at least
    /// `max(REWIND_AT, 2 * rec)` bytes into the data area, pads to the end
    /// so the next record starts at offset 0. `off >= rec` is what makes
    /// it safe: the record then ends before the pad begins, so it cannot
    /// overwrite the pad before the consumer has read it. Twice `rec`
    /// leaves room for more than one such record until the consumer has
    /// seen the pad (a worker reserves 64 KiB per reply, so with `off`
    /// just one reservation it would wait for the proxy after every
    /// rewind).
    fn rewind_if_empty(&mut self, rec: usize) -> Result<(), RingError> {
        let off = (self.tail as usize) & (self.ring.capacity - 1);
        if off < (2 * rec).max(REWIND_AT.min(self.ring.capacity / 4)) {
            return Ok(());
        }
        if self.head_cache != self.tail {
            self.refresh_head()?;
            if self.head_cache != self.tail {
                return Ok(());
            }
        }
        let pad = self.ring.capacity - off;
        self.ring
            .write_record_header_prefix(off, pad as u32, KIND_PAD);
        self.tail += pad as u64;
        Ok(())
    }

    /// Copies one record into the ring and returns its position, or
    /// `None` if there is no room. Not visible to the consumer until
    /// [`Producer::publish`].
    pub fn push(&mut self, meta: &Meta, payload: &[u8]) -> Result<Option<u64>, RingError> {
        match self.try_reserve(payload.len())? {
            None => Ok(None),
            Some(mut r) => {
                let pos = r.pos();
                r.buf()[..payload.len()].copy_from_slice(payload);
                r.commit(meta, payload.len());
                Ok(Some(pos))
            }
        }
    }

    /// The published tail: every record the consumer can see ends before it.
    pub fn published(&self) -> u64 {
        self.published
    }

    /// Whether the consumer announced it sleeps (waking it costs a syscall
    /// and a context switch). A hint: it may be waking up right now.
    pub fn consumer_sleeping(&self) -> bool {
        self.ring.header().consumer_sleeping.load(Ordering::Relaxed) != 0
    }

    /// Whether records were pushed since the last publish.
    pub fn has_unpublished(&self) -> bool {
        self.tail != self.published
    }

    /// Makes every pushed record visible to the consumer and wakes it if it
    /// sleeps. Returns true if a wake-up syscall was made.
    pub fn publish(&mut self) -> bool {
        if !self.store_tail() {
            return false;
        }
        fence(Ordering::SeqCst);
        self.wake_after_fence()
    }

    /// The first half of [`Producer::publish`]: stores the tail. False if
    /// there was nothing to publish.
    fn store_tail(&mut self) -> bool {
        if self.tail == self.published {
            return false;
        }
        self.ring.header().tail.store(self.tail, Ordering::Release);
        self.published = self.tail;
        true
    }

    /// The second half of [`Producer::publish`], after a SeqCst fence
    /// that follows the tail's store: wakes the consumer if it sleeps.
    fn wake_after_fence(&mut self) -> bool {
        let h = self.ring.header();
        if !self.always_wake {
            if h.consumer_sleeping.load(Ordering::Relaxed) == 0 {
                return false;
            }
            if h.consumer_sleeping.swap(0, Ordering::SeqCst) == 0 {
                return false;
            }
        }
        match self.notify {
            Notify::Futex => sys::futex_wake(&h.consumer_sleeping, 1),
            Notify::EventFd(fd) => {
                // A failed write leaves the consumer to its poll timeout; it
                // cannot fail on a valid eventfd.
                let _ = sys::eventfd_signal(fd);
            }
        }
        true
    }

    /// Sleeps until a record of `payload_max` bytes fits or `timeout`
    /// passes. Returns whether it fits now. Publishes what was pushed
    /// first, since the consumer frees nothing it cannot see.
    pub fn wait_for_space(
        &mut self,
        payload_max: usize,
        timeout: Duration,
    ) -> Result<bool, RingError> {
        if self.fits(payload_max)? {
            return Ok(true);
        }
        // Records (or a rewind's pad) not yet published hold space the
        // consumer cannot free until it sees them: publish before waiting.
        self.publish();
        self.ring
            .header()
            .producer_sleeping
            .store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if !self.fits(payload_max)? {
            sys::futex_wait(&self.ring.header().producer_sleeping, 1, timeout);
        }
        self.ring
            .header()
            .producer_sleeping
            .store(0, Ordering::Relaxed);
        self.fits(payload_max)
    }
}

impl RingRef {
    fn write_record_header_prefix(&self, off: usize, total_len: u32, kind: u16) {
        // SAFETY: off is 8-aligned and inside the data area (off < capacity,
        // capacity a multiple of 8), so 8 bytes fit; they are the producer's.
        unsafe {
            let p = self.data().add(off);
            ptr::write(p as *mut u32, total_len);
            ptr::write(p.add(4) as *mut u16, kind);
        }
    }
}

impl Reservation<'_> {
    /// The payload area: `payload_max` writable bytes in shared memory.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: try_reserve checked that header + max bytes fit before the
        // end of the data area and beyond the consumer's head; those bytes
        // belong to the producer until publish, and `self` borrows the
        // producer mutably, so this is the only live reference to them.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.producer.ring.data().add(self.off + RECORD_HEADER_LEN),
                self.max,
            )
        }
    }

    /// The ring position the record will have.
    pub fn pos(&self) -> u64 {
        self.producer.tail
    }

    /// Most payload bytes this reservation holds.
    pub fn capacity(&self) -> usize {
        self.max
    }

    /// Finishes the record with `len` payload bytes (clamped to the
    /// reservation) and advances the private tail.
    pub fn commit(self, meta: &Meta, len: usize) {
        let len = len.min(self.max);
        let total = align8(RECORD_HEADER_LEN + len);
        self.producer.ring.write_record_header(
            self.off,
            RecordHeader {
                total_len: total as u32,
                kind: KIND_DATA,
                code: meta.code,
                id: meta.id,
                tag: meta.tag,
                time_ns: meta.time_ns,
                payload_len: len as u32,
                flags: meta.flags,
                reserved: 0,
            },
        );
        self.producer.tail += total as u64;
    }
}

/// One record read from a ring. The payload is a view of shared memory,
/// valid until the consumer advances.
#[derive(Debug)]
pub struct Record<'a> {
    /// Header fields.
    pub meta: Meta,
    /// The record's ring position (a stable id for "the request a worker
    /// was running").
    pub pos: u64,
    /// The position just past it.
    pub end: u64,
    /// Payload bytes.
    pub payload: &'a [u8],
}

/// The reading side of a ring.
pub struct Consumer {
    ring: RingRef,
    /// Next read position.
    head: u64,
    /// Last released head.
    released: u64,
    /// Last tail seen.
    tail_cache: u64,
    /// Position after the record returned by the last `peek`.
    next: Option<u64>,
    /// Hand a padding record's space back as soon as it is skipped.
    release_pads: bool,
}

impl Consumer {
    /// Attaches to the ring as its consumer, continuing from its positions.
    pub fn attach(ring: RingRef) -> Result<Consumer, RingError> {
        let h = ring.header();
        let head = h.head.load(Ordering::Acquire);
        let tail = h.tail.load(Ordering::Acquire);
        if !head.is_multiple_of(8)
            || !tail.is_multiple_of(8)
            || tail.wrapping_sub(head) > ring.capacity as u64
        {
            return corrupt("head", head);
        }
        Ok(Consumer {
            ring,
            head,
            released: head,
            tail_cache: head,
            next: None,
            release_pads: false,
        })
    }

    /// Attaches a second reader at `pos`, a record position the caller
    /// knows (the proxy re-reading requests a dead worker never ran). It
    /// never releases: only the owner of `head` may.
    pub fn attach_at(ring: RingRef, pos: u64) -> Result<Consumer, RingError> {
        if !pos.is_multiple_of(8) {
            return corrupt("position", pos);
        }
        let tail = ring.header().tail.load(Ordering::Acquire);
        if tail < pos || tail - pos > ring.capacity as u64 {
            return corrupt("tail", tail);
        }
        Ok(Consumer {
            ring,
            head: pos,
            released: pos,
            tail_cache: tail,
            next: None,
            release_pads: false,
        })
    }

    /// Hands back a padding record's space as soon as [`Consumer::peek`]
    /// skips it, rather than at the next [`Consumer::release`]. For a
    /// consumer that releases only after working on a record (a worker):
    /// a rewind's pad is most of the ring, and the producer would otherwise
    /// have only the space before it until the first record is done. Only
    /// the ring's own consumer may do this, never a reader attached with
    /// [`Consumer::attach_at`] to look back at records.
    pub fn set_release_pads(&mut self, on: bool) {
        self.release_pads = on;
    }

    /// The ring this consumer reads.
    pub fn ring(&self) -> &RingRef {
        &self.ring
    }

    fn refresh_tail(&mut self) -> Result<(), RingError> {
        let tail = self.ring.header().tail.load(Ordering::Acquire);
        // The producer only moves tail forward and never more than a
        // capacity past what we released.
        if !tail.is_multiple_of(8)
            || tail < self.tail_cache
            || tail > self.released + self.ring.capacity as u64
        {
            return corrupt("tail", tail);
        }
        self.tail_cache = tail;
        Ok(())
    }

    /// Returns the next record without consuming it, or `None` if the ring
    /// is empty. Padding records are skipped.
    pub fn peek(&mut self) -> Result<Option<Record<'_>>, RingError> {
        // Peeking twice without advancing returns the same record again.
        self.next = None;
        loop {
            if self.head == self.tail_cache {
                self.refresh_tail()?;
                if self.head == self.tail_cache {
                    return Ok(None);
                }
            }
            let avail = self.tail_cache - self.head;
            let off = (self.head as usize) & (self.ring.capacity - 1);
            let till_end = self.ring.capacity - off;
            if avail < 8 {
                return corrupt("record length", avail);
            }
            let hdr = if till_end >= RECORD_HEADER_LEN {
                self.ring.read_record_header(off)
            } else {
                // Only a pad can start this close to the end.
                let mut h = RecordHeader::default();
                // SAFETY: off is 8-aligned and < capacity, so 8 bytes are in
                // bounds; read once by volatile loads.
                unsafe {
                    let p = self.ring.data().add(off);
                    h.total_len = ptr::read_volatile(p as *const u32);
                    h.kind = ptr::read_volatile(p.add(4) as *const u16);
                }
                if h.kind != KIND_PAD {
                    return corrupt("record kind near end", h.kind as u64);
                }
                h
            };
            let total = hdr.total_len as u64;
            if total < 8 || !total.is_multiple_of(8) || total > avail || total > till_end as u64 {
                return corrupt("record length", total);
            }
            match hdr.kind {
                KIND_PAD => {
                    if total != till_end as u64 {
                        return corrupt("pad length", total);
                    }
                    self.head += total;
                    if self.release_pads {
                        self.release();
                    }
                    continue;
                }
                KIND_DATA => {}
                k => return corrupt("record kind", k as u64),
            }
            let plen = hdr.payload_len as usize;
            if total < RECORD_HEADER_LEN as u64 || align8(RECORD_HEADER_LEN + plen) as u64 != total
            {
                return corrupt("payload length", plen as u64);
            }
            self.next = Some(self.head + total);
            // SAFETY: off + 40 + plen <= off + total <= capacity (checked
            // above), and [head, tail) belongs to the consumer: the producer
            // does not write it until we release.
            let payload = unsafe {
                std::slice::from_raw_parts(self.ring.data().add(off + RECORD_HEADER_LEN), plen)
            };
            return Ok(Some(Record {
                meta: Meta {
                    code: hdr.code,
                    flags: hdr.flags,
                    id: hdr.id,
                    tag: hdr.tag,
                    time_ns: hdr.time_ns,
                },
                pos: self.head,
                end: self.head + total,
                payload,
            }));
        }
    }

    /// Consumes the record returned by the last [`Consumer::peek`]. Its
    /// space returns to the producer at the next [`Consumer::release`].
    pub fn advance(&mut self) {
        if let Some(next) = self.next.take() {
            self.head = next;
        }
    }

    /// Hands consumed space back to the producer, waking it if it waits.
    pub fn release(&mut self) {
        if self.store_head() {
            fence(Ordering::SeqCst);
            self.wake_after_fence();
        }
    }

    /// [`Consumer::release`] of this ring and then [`Producer::publish`]
    /// of `tx`, with one SeqCst fence for both instead of one each (the
    /// fence is most of what either costs): a worker hands back a
    /// request's space and publishes its reply. The head is stored before
    /// the tail, so a producer woken by the reply also sees the room.
    /// Returns whether `tx`'s consumer was woken.
    pub fn release_and_publish(&mut self, tx: &mut Producer) -> bool {
        let released = self.store_head();
        let published = tx.store_tail();
        if !released && !published {
            return false;
        }
        fence(Ordering::SeqCst);
        if released {
            self.wake_after_fence();
        }
        published && tx.wake_after_fence()
    }

    /// The first half of [`Consumer::release`]: stores the head. False if
    /// nothing was consumed since the last release.
    fn store_head(&mut self) -> bool {
        if self.head == self.released {
            return false;
        }
        self.ring.header().head.store(self.head, Ordering::Release);
        self.released = self.head;
        true
    }

    /// The second half of [`Consumer::release`], after a SeqCst fence that
    /// follows the head's store: wakes the producer if it waits for room.
    fn wake_after_fence(&self) {
        let h = self.ring.header();
        if h.producer_sleeping.load(Ordering::Relaxed) != 0
            && h.producer_sleeping.swap(0, Ordering::SeqCst) != 0
        {
            sys::futex_wake(&h.producer_sleeping, 1);
        }
    }

    /// Announces that the consumer is about to sleep. Returns false, and
    /// withdraws the announcement, if records arrived meanwhile.
    pub fn prepare_sleep(&mut self) -> Result<bool, RingError> {
        self.ring
            .header()
            .consumer_sleeping
            .store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        self.refresh_tail()?;
        if self.tail_cache != self.head {
            self.end_sleep();
            return Ok(false);
        }
        Ok(true)
    }

    /// Withdraws a sleep announcement after waking by other means.
    pub fn end_sleep(&self) {
        self.ring
            .header()
            .consumer_sleeping
            .store(0, Ordering::Relaxed);
    }

    /// Sleeps on the ring's futex until the producer publishes or `timeout`
    /// passes (only for [`Notify::Futex`] rings). Spurious returns happen.
    pub fn wait(&mut self, timeout: Duration) -> Result<(), RingError> {
        if self.prepare_sleep()? {
            sys::futex_wait(&self.ring.header().consumer_sleeping, 1, timeout);
            self.end_sleep();
        }
        Ok(())
    }

    /// Whether nothing is published beyond what was consumed.
    pub fn is_empty(&mut self) -> Result<bool, RingError> {
        if self.head != self.tail_cache {
            return Ok(false);
        }
        self.refresh_tail()?;
        Ok(self.head == self.tail_cache)
    }

    /// The consumer's current read position.
    pub fn position(&self) -> u64 {
        self.head
    }
}
