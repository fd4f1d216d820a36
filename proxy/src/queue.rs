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
use crate::slots::Queued;

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

type ByConn = HashMap<u64, VecDeque<Queued>, BuildHasherDefault<TagHasher>>;

/// A group's wait queue (see the module doc).
#[derive(Default)]
pub(crate) struct WaitQueue {
    by_conn: ByConn,
    /// Connections with queued requests, in service order; each once.
    order: VecDeque<u64>,
    len: usize,
    /// No queued request was enqueued before this (a lower bound: the
    /// next expiry scan is due at `oldest_ns + queue_timeout`).
    oldest_ns: u64,
    /// Emptied per-connection queues, kept to spare allocations.
    spare: Vec<VecDeque<Queued>>,
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

    /// Queues a new request behind its connection's others.
    pub(crate) fn push_back(&mut self, q: Queued) {
        self.note_time(q.req.enqueued_ns);
        let k = self.key(q.req.tag);
        let spare = &mut self.spare;
        let order = &mut self.order;
        self.by_conn
            .entry(k)
            .or_insert_with(|| {
                order.push_back(k);
                spare.pop().unwrap_or_default()
            })
            .push_back(q);
        self.len += 1;
    }

    /// Puts a request back at the very front: one taken off a worker that
    /// never started it, or one that could not be written after all. Its
    /// connection is served next.
    pub(crate) fn push_front(&mut self, q: Queued) {
        self.note_time(q.req.enqueued_ns);
        let k = self.key(q.req.tag);
        match self.by_conn.get_mut(&k) {
            Some(sub) => {
                sub.push_front(q);
                if self.order.front() != Some(&k)
                    && let Some(pos) = self.order.iter().position(|&o| o == k)
                {
                    self.order.remove(pos);
                    self.order.push_front(k);
                }
            }
            None => {
                let mut sub = self.spare.pop().unwrap_or_default();
                sub.push_front(q);
                self.by_conn.insert(k, sub);
                self.order.push_front(k);
            }
        }
        self.len += 1;
    }

    /// The request that would be served next.
    pub(crate) fn front(&self) -> Option<&Queued> {
        let k = self.order.front()?;
        self.by_conn.get(k)?.front()
    }

    /// Takes the request served next; its connection goes to the back of
    /// the rotation if it has more.
    pub(crate) fn pop_front(&mut self) -> Option<Queued> {
        let k = self.order.pop_front()?;
        let sub = self.by_conn.get_mut(&k)?;
        let q = sub.pop_front();
        if sub.is_empty() {
            self.retire(k);
        } else {
            self.order.push_back(k);
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
            let Some(sub) = self.by_conn.get_mut(&0) else {
                return 0;
            };
            let before = sub.len();
            sub.retain(|q| q.req.tag != tag);
            let n = before - sub.len();
            self.len -= n;
            if sub.is_empty() {
                self.retire(0);
                self.order.clear();
            }
            return n;
        }
        let Some(sub) = self.by_conn.get(&tag.0) else {
            return 0;
        };
        let n = sub.len();
        self.len -= n;
        self.retire(tag.0);
        if let Some(pos) = self.order.iter().position(|&o| o == tag.0) {
            self.order.remove(pos);
        }
        n
    }

    fn retire(&mut self, k: u64) {
        if let Some(mut sub) = self.by_conn.remove(&k) {
            sub.clear();
            if self.spare.len() < 64 && sub.capacity() <= 64 {
                self.spare.push(sub);
            }
        }
    }

    /// Takes every request enqueued at or before `deadline_ns` (they
    /// waited too long), oldest of each connection first.
    pub(crate) fn take_expired(&mut self, deadline_ns: u64) -> Vec<Queued> {
        let mut out = Vec::new();
        if self.oldest_ns().is_none_or(|t| t > deadline_ns) {
            return out;
        }
        let mut oldest = u64::MAX;
        for sub in self.by_conn.values_mut() {
            // Within a connection requests were queued in time order
            // (requeued ones, put in front, are older still).
            while sub
                .front()
                .is_some_and(|q| q.req.enqueued_ns <= deadline_ns)
            {
                if let Some(q) = sub.pop_front() {
                    out.push(q);
                }
            }
            if let Some(q) = sub.front() {
                oldest = oldest.min(q.req.enqueued_ns);
            }
        }
        self.len -= out.len();
        self.oldest_ns = oldest;
        let empty: Vec<u64> = self
            .by_conn
            .iter()
            .filter(|(_, s)| s.is_empty())
            .map(|(&k, _)| k)
            .collect();
        if !empty.is_empty() {
            for k in &empty {
                self.retire(*k);
            }
            self.order.retain(|k| self.by_conn.contains_key(k));
        }
        out
    }

    /// Empties the queue.
    pub(crate) fn take_all(&mut self) -> Vec<Queued> {
        let mut out = Vec::with_capacity(self.len);
        for k in std::mem::take(&mut self.order) {
            if let Some(sub) = self.by_conn.remove(&k) {
                out.extend(sub);
            }
        }
        self.by_conn.clear();
        self.len = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slots::ReqMeta;

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
}
