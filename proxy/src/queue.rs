//! A group's wait queue: requests that found every worker of the group
//! full wait here, and are served connection by connection in turn.
//!
//! Each connection has its own FIFO; the queue hands out one request of
//! the connection at the head of the rotation, then moves that connection
//! to the back. Under overload a client that floods waits behind its own
//! requests, while a client with one request waits for at most one request
//! of every other queued connection (deficit-free round robin, as every
//! request is one unit of work here). Order within a connection is kept.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use crate::conn::Tag;
use crate::slots::{Queued, ReqMeta};

/// Tags are unique integers; hashing them again would be wasted work.
#[derive(Default)]
struct TagHasher(u64);

impl Hasher for TagHasher {
    fn finish(&self) -> u64 {
        // Spread index and generation over the bits a hash table uses.
        self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Connection key -> index of its FIFO in `WaitQueue::subs`.
type Index = HashMap<u64, u32, BuildHasherDefault<TagHasher>>;

/// Payload buffers kept for reuse: at most this many...
const POOL_MAX: usize = 1024;
/// ...of at least this capacity (new ones are allocated at a power of two
/// from here, so one fits the next payload of about the same size)...
const POOL_MIN_CAPACITY: usize = 64;
/// ...and at most this (so at most 2 MiB per group), which covers the
/// small requests a queue holds thousands of.
const POOL_MAX_CAPACITY: usize = 2048;
/// An emptied FIFO keeps its allocation up to this many requests, while
/// fewer than `FREE_KEEP` emptied ones keep theirs.
const SUB_KEEP_CAPACITY: usize = 64;
const FREE_KEEP: usize = 64;

/// One connection's queued requests.
#[derive(Default)]
struct Sub {
    key: u64,
    live: bool,
    /// Scratch for `push_front_all`: already moved to the front.
    marked: bool,
    q: VecDeque<Queued>,
}

/// A group's wait queue (see the module doc).
///
/// The connections' FIFOs live in a slab (`subs`) and the rotation holds
/// slab indices, so serving a request takes no hash lookup; a push looks
/// its connection up once per run of requests from the same connection
/// (a read delivers them together). Payload buffers are recycled
/// ([`WaitQueue::recycle`]): under overload every request passes through
/// here, and a malloc and free each cost more than the copy.
#[derive(Default)]
pub(crate) struct WaitQueue {
    index: Index,
    subs: Vec<Sub>,
    /// Indices of `subs` not in use.
    free: Vec<u32>,
    /// Connections with queued requests (slab indices), in service order;
    /// each once.
    order: VecDeque<u32>,
    /// The last connection pushed to: (key, slab index), valid while that
    /// sub is live with that key.
    last: Option<(u64, u32)>,
    len: usize,
    /// No queued request was enqueued before this (a lower bound: the
    /// next expiry scan is due at `oldest_ns + queue_timeout`).
    oldest_ns: u64,
    /// Recycled payload buffers (see `POOL_MAX`).
    pool: Vec<Vec<u8>>,
    /// Benchmark baseline (`HALFSYNC_TUNING=fifo_queue`): one queue for
    /// all connections, plain arrival order.
    pub(crate) fifo: bool,
}

impl WaitQueue {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A lower bound on the enqueue time of every queued request.
    pub(crate) fn oldest_ns(&self) -> Option<u64> {
        (self.len > 0).then_some(self.oldest_ns)
    }

    fn key(&self, tag: Tag) -> u64 {
        if self.fifo { 0 } else { tag.0 }
    }

    fn note_time(&mut self, t: u64) {
        self.oldest_ns = if self.len == 0 {
            t
        } else {
            self.oldest_ns.min(t)
        };
    }

    /// The live sub of key `k`, if any.
    fn find(&mut self, k: u64) -> Option<u32> {
        if let Some((lk, li)) = self.last
            && lk == k
            && self
                .subs
                .get(li as usize)
                .is_some_and(|s| s.live && s.key == k)
        {
            return Some(li);
        }
        let i = *self.index.get(&k)?;
        self.last = Some((k, i));
        Some(i)
    }

    /// A new, empty, live sub for key `k` (not yet in the rotation).
    fn open(&mut self, k: u64) -> u32 {
        let i = match self.free.pop() {
            Some(i) => i,
            None => {
                self.subs.push(Sub::default());
                (self.subs.len() - 1) as u32
            }
        };
        let sub = &mut self.subs[i as usize];
        sub.key = k;
        sub.live = true;
        self.index.insert(k, i);
        self.last = Some((k, i));
        i
    }

    /// Takes sub `i` out of use (it is empty, or its requests are dropped);
    /// the caller removes it from the rotation.
    fn retire(&mut self, i: u32) {
        let Some(sub) = self.subs.get_mut(i as usize) else {
            return;
        };
        if !sub.live {
            return;
        }
        sub.live = false;
        sub.q.clear();
        if sub.q.capacity() > SUB_KEEP_CAPACITY || self.free.len() >= FREE_KEEP {
            sub.q = VecDeque::new();
        }
        self.index.remove(&sub.key);
        self.free.push(i);
    }

    /// Queues a copy of a new request behind its connection's others, in a
    /// recycled buffer when one is free.
    pub(crate) fn push_copy(&mut self, req: ReqMeta, payload: &[u8]) {
        let fresh = |n: usize| {
            if n <= POOL_MAX_CAPACITY {
                Vec::with_capacity(n.next_power_of_two().max(POOL_MIN_CAPACITY))
            } else {
                Vec::with_capacity(n)
            }
        };
        let mut buf = match self.pool.pop() {
            Some(b) if payload.len() <= b.capacity() => b,
            Some(b) => {
                self.pool.push(b);
                fresh(payload.len())
            }
            None => fresh(payload.len()),
        };
        buf.extend_from_slice(payload);
        self.push_back(Queued { req, payload: buf });
    }

    /// Takes back a payload buffer of a request that has left the queue.
    pub(crate) fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.pool.len() < POOL_MAX
            && (POOL_MIN_CAPACITY..=POOL_MAX_CAPACITY).contains(&buf.capacity())
        {
            buf.clear();
            self.pool.push(buf);
        }
    }

    /// Queues a new request behind its connection's others.
    pub(crate) fn push_back(&mut self, q: Queued) {
        self.note_time(q.req.enqueued_ns);
        let k = self.key(q.req.tag);
        let i = match self.find(k) {
            Some(i) => i,
            None => {
                let i = self.open(k);
                self.order.push_back(i);
                i
            }
        };
        self.subs[i as usize].q.push_back(q);
        self.len += 1;
    }

    /// Puts a request back at the very front: one taken off a worker that
    /// never started it, or one that could not be written after all. Its
    /// connection is served next.
    pub(crate) fn push_front(&mut self, q: Queued) {
        self.push_front_all(vec![q]);
    }

    /// Puts requests taken back from a worker (`reqs`, in ring order) at the
    /// very front, each connection's in their order; their connections are
    /// served next, in the order of their first request. Does what calling
    /// `push_front` on each in reverse does, with one pass over the
    /// rotation instead of one per request (a worker can hold thousands).
    pub(crate) fn push_front_all(&mut self, reqs: Vec<Queued>) {
        if reqs.is_empty() {
            return;
        }
        let mut lead = Vec::new();
        for q in &reqs {
            let k = self.key(q.req.tag);
            let i = match self.find(k) {
                Some(i) => i,
                None => self.open(k),
            };
            let sub = &mut self.subs[i as usize];
            if !sub.marked {
                sub.marked = true;
                lead.push(i);
            }
        }
        for q in reqs.into_iter().rev() {
            self.note_time(q.req.enqueued_ns);
            let k = self.key(q.req.tag);
            if let Some(i) = self.find(k) {
                self.subs[i as usize].q.push_front(q);
                self.len += 1;
            }
        }
        let subs = &mut self.subs;
        let rest = std::mem::take(&mut self.order)
            .into_iter()
            .filter(|&i| !subs[i as usize].marked);
        let mut order: VecDeque<u32> = lead.iter().copied().collect();
        order.extend(rest);
        for &i in &lead {
            subs[i as usize].marked = false;
        }
        self.order = order;
    }

    /// The request that would be served next.
    pub(crate) fn front(&self) -> Option<&Queued> {
        let &i = self.order.front()?;
        self.subs.get(i as usize)?.q.front()
    }

    /// Takes the request served next; its connection goes to the back of
    /// the rotation if it has more.
    pub(crate) fn pop_front(&mut self) -> Option<Queued> {
        let i = self.order.pop_front()?;
        let sub = self.subs.get_mut(i as usize)?;
        let q = sub.q.pop_front();
        if sub.q.is_empty() {
            self.retire(i);
        } else {
            self.order.push_back(i);
        }
        if q.is_some() {
            self.len -= 1;
        }
        q
    }

    /// Drops every request of connection `tag` (its client is gone);
    /// returns how many.
    pub(crate) fn drop_conn(&mut self, tag: Tag) -> usize {
        if self.fifo {
            let Some(i) = self.find(0) else {
                return 0;
            };
            let sub = &mut self.subs[i as usize];
            let before = sub.q.len();
            sub.q.retain(|q| q.req.tag != tag);
            let n = before - sub.q.len();
            let empty = sub.q.is_empty();
            self.len -= n;
            if empty {
                self.retire(i);
                self.order.clear();
            }
            return n;
        }
        let Some(i) = self.find(tag.0) else {
            return 0;
        };
        let n = self.subs[i as usize].q.len();
        self.len -= n;
        self.retire(i);
        if let Some(pos) = self.order.iter().position(|&o| o == i) {
            self.order.remove(pos);
        }
        n
    }

    /// Takes every request enqueued at or before `deadline_ns` (they
    /// waited too long), oldest of each connection first.
    pub(crate) fn take_expired(&mut self, deadline_ns: u64) -> Vec<Queued> {
        let mut out = Vec::new();
        if self.oldest_ns().is_none_or(|t| t > deadline_ns) {
            return out;
        }
        let mut oldest = u64::MAX;
        let mut emptied = Vec::new();
        // The rotation holds exactly the live FIFOs.
        for &i in &self.order {
            let Some(sub) = self.subs.get_mut(i as usize) else {
                continue;
            };
            // Within a connection requests were queued in time order
            // (requeued ones, put in front, are older still).
            while sub
                .q
                .front()
                .is_some_and(|q| q.req.enqueued_ns <= deadline_ns)
            {
                if let Some(q) = sub.q.pop_front() {
                    out.push(q);
                }
            }
            match sub.q.front() {
                Some(q) => oldest = oldest.min(q.req.enqueued_ns),
                None => emptied.push(i),
            }
        }
        self.len -= out.len();
        self.oldest_ns = oldest;
        if !emptied.is_empty() {
            for &i in &emptied {
                self.retire(i);
            }
            let subs = &self.subs;
            self.order.retain(|&i| subs[i as usize].live);
        }
        out
    }

    /// Empties the queue.
    pub(crate) fn take_all(&mut self) -> Vec<Queued> {
        let mut out = Vec::with_capacity(self.len);
        for i in std::mem::take(&mut self.order) {
            if let Some(sub) = self.subs.get_mut(i as usize) {
                out.extend(sub.q.drain(..));
            }
            self.retire(i);
        }
        self.len = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(conn: u64, id: u64, t: u64) -> Queued {
        Queued {
            req: ReqMeta {
                tag: Tag(conn),
                id,
                code: 1,
                flags: 0,
                enqueued_ns: t,
                len: 0,
            },
            payload: Vec::new(),
        }
    }

    fn drain(w: &mut WaitQueue) -> Vec<(u64, u64)> {
        std::iter::from_fn(|| w.pop_front())
            .map(|q| (q.req.tag.0, q.req.id))
            .collect()
    }

    #[test]
    fn connections_take_turns_and_keep_their_order() {
        let mut w = WaitQueue::default();
        for id in 0..4 {
            w.push_back(q(1, id, id));
        }
        w.push_back(q(2, 100, 10));
        w.push_back(q(3, 200, 11));
        w.push_back(q(2, 101, 12));
        assert_eq!(w.len(), 7);
        assert_eq!(
            drain(&mut w),
            vec![(1, 0), (2, 100), (3, 200), (1, 1), (2, 101), (1, 2), (1, 3)]
        );
        assert!(w.is_empty() && w.front().is_none() && w.oldest_ns().is_none());
    }

    #[test]
    fn a_light_client_waits_for_one_request_per_flooder() {
        let mut w = WaitQueue::default();
        for flooder in 1..=4 {
            for id in 0..1000 {
                w.push_back(q(flooder, id, id));
            }
        }
        w.push_back(q(9, 7, 5000));
        let served = drain(&mut w);
        let pos = served.iter().position(|&(c, _)| c == 9).unwrap();
        assert!(pos <= 4, "light request served {pos}th");
    }

    #[test]
    fn push_front_serves_that_connection_next_in_order() {
        let mut w = WaitQueue::default();
        w.push_back(q(1, 1, 10));
        w.push_back(q(2, 2, 11));
        w.push_back(q(2, 3, 12));
        // Requeued from a worker, in reverse so they keep their order.
        w.push_front(q(2, 1, 5));
        w.push_front(q(2, 0, 4));
        w.push_front(q(3, 9, 3));
        assert_eq!(w.front().map(|q| q.req.id), Some(9));
        assert_eq!(w.oldest_ns(), Some(3));
        assert_eq!(
            drain(&mut w),
            vec![(3, 9), (2, 0), (1, 1), (2, 1), (2, 2), (2, 3)]
        );
    }

    #[test]
    fn expiry_takes_the_stale_of_every_connection() {
        let mut w = WaitQueue::default();
        w.push_back(q(1, 0, 10));
        w.push_back(q(1, 1, 50));
        w.push_back(q(2, 2, 20));
        w.push_back(q(3, 3, 60));
        assert!(w.take_expired(5).is_empty());
        let mut gone: Vec<u64> = w.take_expired(30).iter().map(|q| q.req.id).collect();
        gone.sort();
        assert_eq!(gone, vec![0, 2]);
        assert_eq!(w.len(), 2);
        assert_eq!(w.oldest_ns(), Some(50));
        assert_eq!(drain(&mut w), vec![(1, 1), (3, 3)]);
    }

    #[test]
    fn fifo_mode_is_plain_arrival_order() {
        let mut w = WaitQueue {
            fifo: true,
            ..WaitQueue::default()
        };
        w.push_back(q(1, 0, 0));
        w.push_back(q(1, 1, 1));
        w.push_back(q(2, 2, 2));
        w.push_back(q(1, 3, 3));
        w.push_front(q(3, 9, 0));
        assert_eq!(w.drop_conn(Tag(2)), 1);
        assert_eq!(drain(&mut w), vec![(3, 9), (1, 0), (1, 1), (1, 3)]);
    }

    #[test]
    fn dropping_a_connection_and_taking_all() {
        let mut w = WaitQueue::default();
        for id in 0..3 {
            w.push_back(q(1, id, id));
            w.push_back(q(2, 10 + id, id));
        }
        assert_eq!(w.drop_conn(Tag(1)), 3);
        assert_eq!(w.drop_conn(Tag(7)), 0);
        assert_eq!(w.len(), 3);
        w.push_back(q(4, 40, 9));
        let all: Vec<u64> = w.take_all().iter().map(|q| q.req.id).collect();
        assert_eq!(all, vec![10, 11, 12, 40]);
        assert!(w.is_empty());
        w.push_back(q(5, 50, 1));
        assert_eq!(drain(&mut w), vec![(5, 50)]);
    }

    #[test]
    fn a_connection_gone_and_back_gets_its_own_fifo_again() {
        let mut w = WaitQueue::default();
        w.push_back(q(1, 10, 0));
        w.push_back(q(2, 20, 0));
        // Both FIFOs empty and are retired; their places are reused.
        assert_eq!(drain(&mut w).len(), 2);
        w.push_back(q(3, 30, 1));
        w.push_back(q(1, 11, 1));
        w.push_back(q(3, 31, 1));
        w.push_back(q(1, 12, 1));
        assert_eq!(drain(&mut w), vec![(3, 30), (1, 11), (3, 31), (1, 12)]);
        // A dropped connection's place is reused by the next one, and a
        // push for the dropped one does not land in it.
        w.push_back(q(4, 40, 2));
        w.push_back(q(5, 50, 2));
        assert_eq!(w.drop_conn(Tag(4)), 1);
        w.push_back(q(6, 60, 2));
        w.push_back(q(4, 41, 2));
        assert_eq!(drain(&mut w), vec![(5, 50), (6, 60), (4, 41)]);
        assert!(
            w.subs.len() <= 3,
            "{} places for at most 3 connections",
            w.subs.len()
        );
    }

    #[test]
    fn recycled_buffers_carry_only_their_new_payload() {
        let mut w = WaitQueue::default();
        let req = q(1, 0, 0).req;
        w.push_copy(req, b"a longer first payload");
        let first = w.pop_front().unwrap();
        assert_eq!(first.payload, b"a longer first payload");
        let ptr = first.payload.as_ptr();
        w.recycle(first.payload);
        w.push_copy(req, b"short");
        let again = w.pop_front().unwrap();
        assert_eq!(again.payload, b"short");
        assert_eq!(again.payload.as_ptr(), ptr, "the buffer was not reused");
        w.recycle(again.payload);
        // Too small a pooled buffer is kept for later, not grown.
        let big = vec![7u8; 100];
        w.push_copy(req, &big);
        let got = w.pop_front().unwrap().payload;
        assert_eq!(got, big);
        assert_eq!(got.capacity(), 128, "a power of two, to fit the next one");
        assert_eq!(w.pool.len(), 1);
        // Big and tiny buffers (empty payloads) are not kept, and the pool
        // is bounded.
        w.recycle(Vec::with_capacity(POOL_MAX_CAPACITY + 1));
        w.recycle(Vec::new());
        assert_eq!(w.pool.len(), 1);
        for _ in 0..POOL_MAX + 10 {
            w.recycle(Vec::with_capacity(POOL_MIN_CAPACITY));
        }
        assert_eq!(w.pool.len(), POOL_MAX);
    }

    #[test]
    fn push_front_all_is_push_front_in_reverse() {
        let waiting = |w: &mut WaitQueue| {
            w.push_back(q(1, 1, 10));
            w.push_back(q(2, 2, 11));
            w.push_back(q(2, 3, 12));
            w.push_back(q(4, 4, 13));
        };
        // Taken back from a ring: connections interleaved, one new (3).
        let back = || {
            vec![
                q(2, 20, 1),
                q(3, 30, 2),
                q(1, 10, 3),
                q(2, 21, 4),
                q(3, 31, 5),
            ]
        };
        for fifo in [false, true] {
            let mut one = WaitQueue {
                fifo,
                ..WaitQueue::default()
            };
            waiting(&mut one);
            for r in back().into_iter().rev() {
                one.push_front(r);
            }
            let mut all = WaitQueue {
                fifo,
                ..WaitQueue::default()
            };
            waiting(&mut all);
            all.push_front_all(back());
            assert_eq!(all.len(), one.len());
            assert_eq!(all.oldest_ns(), Some(1));
            assert_eq!(drain(&mut all), drain(&mut one), "fifo {fifo}");
        }
    }
}
