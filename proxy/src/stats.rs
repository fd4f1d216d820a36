//! Counters the proxy keeps in a shared page the master reads for
//! `halfsync status` and the metrics endpoint, without asking the proxy.
//!
//! One writer (the proxy), any number of readers; every field is an
//! atomic updated with Relaxed loads and stores (one writer needs no locked
//! read-modify-write): readers see each counter
//! whole, and a snapshot is a moment's view, which is all status and
//! metrics need. Replies are counted where they are attributed: to the
//! worker slot whose worker answered (or died or timed out on) the
//! request, else to its group (BUSY, queue timeouts), else globally (no
//! group: NO_ROUTE, BAD_REQUEST). Totals are sums of those, so they always
//! add up. A proxy started in place of a dead one zeroes only the gauges:
//! the counters carry on (see [`Stats::reset_gauges`]).

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use halfsync_shm::{Region, sys};

/// Groups the page has room for (stable group ids below this).
pub const MAX_GROUPS: usize = halfsync_config::MAX_GROUPS;
/// Worker slots the page has room for (slot indexes below this).
pub const MAX_SLOTS: usize = 4096;
/// Reply statuses counted separately: 0..=7, then one for every plugin
/// status (1 is PLUGIN_ERROR; 100 and up are the plugin's own).
pub const STATUSES: usize = 9;
/// Upper bounds (microseconds) of the latency histogram buckets; a last,
/// implicit bucket holds everything slower.
pub const BUCKETS_US: [u64; 18] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000,
];
const HIST: usize = BUCKETS_US.len() + 1;
const MAGIC: u64 = 0x6873_7374_6174_0003;

/// Adds to a counter this process alone writes: a plain load and store,
/// not a locked read-modify-write (readers still see whole values).
fn bump(a: &AtomicU64, n: u64) {
    a.store(a.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// Index in a `replies` array for a reply status.
pub fn status_index(code: u16) -> usize {
    if code < 8 { code as usize } else { 8 }
}

#[repr(C)]
struct Histogram {
    buckets: [AtomicU64; HIST],
    sum_us: AtomicU64,
}

impl Histogram {
    fn record(&self, us: u64) {
        let i = BUCKETS_US.partition_point(|&b| b < us);
        bump(&self.buckets[i], 1);
        bump(&self.sum_us, us);
    }
    fn read(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

#[repr(C)]
struct GlobalStats {
    connections: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    replies: [AtomicU64; STATUSES],
    /// CLOCK_MONOTONIC ns of the proxy loop's latest once-a-second turn.
    heartbeat_ns: AtomicU64,
}

#[repr(C)]
struct GroupStats {
    queued: AtomicU64,
    inflight_cap: AtomicU64,
    run_ns: AtomicU64,
    replies: [AtomicU64; STATUSES],
    latency: Histogram,
    queue_wait: Histogram,
}

#[repr(C)]
struct SlotStats {
    dispatched: AtomicU64,
    pending: AtomicU64,
    /// 1 while the proxy holds its worker for unresponsive.
    unresponsive: AtomicU64,
    replies: [AtomicU64; STATUSES],
}

#[repr(C)]
struct Page {
    magic: AtomicU64,
    global: GlobalStats,
    groups: [GroupStats; MAX_GROUPS],
    slots: [SlotStats; MAX_SLOTS],
}

/// Where a reply is counted.
#[derive(Clone, Copy, Debug)]
pub enum Scope {
    /// Not tied to a group.
    Global,
    /// Tied to a group (stable group id) but to no worker.
    Group(usize),
    /// Answered by (or lost with) the worker in this slot, of this group.
    Slot(usize, usize),
}

/// The shared stats page.
pub struct Stats {
    region: Region,
}

/// A histogram read from the page.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Counts per bucket ([`BUCKETS_US`] bounds, then the overflow bucket).
    pub buckets: [u64; HIST],
    /// Sum of all observations, microseconds.
    pub sum_us: u64,
}

impl HistogramSnapshot {
    /// Observations counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Adds another histogram's counts (several proxy processes).
    pub fn add(&mut self, o: &HistogramSnapshot) {
        self.buckets
            .iter_mut()
            .zip(&o.buckets)
            .for_each(|(a, b)| *a += b);
        self.sum_us += o.sum_us;
    }
}

impl GlobalSnapshot {
    /// Adds another proxy process's counters.
    pub fn add(&mut self, o: &GlobalSnapshot) {
        self.connections += o.connections;
        self.accepted += o.accepted;
        self.refused += o.refused;
        self.replies
            .iter_mut()
            .zip(&o.replies)
            .for_each(|(a, b)| *a += b);
    }
}

impl GroupSnapshot {
    /// Adds another proxy process's counters for the same group.
    pub fn add(&mut self, o: &GroupSnapshot) {
        self.queued += o.queued;
        // Several proxies estimate the run time each: show the proxy with
        // the highest estimate, its cap with it (a proxy without samples
        // yet shows cap 16 and run time 0, and only wins if none has one).
        if o.run_ns > self.run_ns || (self.run_ns == 0 && o.inflight_cap > self.inflight_cap) {
            self.run_ns = o.run_ns;
            self.inflight_cap = o.inflight_cap;
        }
        self.replies
            .iter_mut()
            .zip(&o.replies)
            .for_each(|(a, b)| *a += b);
        self.latency.add(&o.latency);
        self.queue_wait.add(&o.queue_wait);
    }
}

/// Global counters read from the page.
#[derive(Clone, Debug, Default)]
pub struct GlobalSnapshot {
    /// Open client connections.
    pub connections: u64,
    /// Connections accepted since the server started (across proxy
    /// restarts).
    pub accepted: u64,
    /// Connections refused (max_connections, no fds).
    pub refused: u64,
    /// Replies not tied to a group, by [`status_index`].
    pub replies: [u64; STATUSES],
}

/// One group's counters.
#[derive(Clone, Debug, Default)]
pub struct GroupSnapshot {
    /// Requests waiting in the proxy for a worker.
    pub queued: u64,
    /// Requests a worker may hold now (`max_inflight`, or fewer by
    /// `max_inflight_time`).
    pub inflight_cap: u64,
    /// The plugin's mean run time as sampled, ns (0: no sample yet).
    pub run_ns: u64,
    /// Replies tied to the group but to no worker, by [`status_index`].
    pub replies: [u64; STATUSES],
    /// Time from a request's arrival to its reply.
    pub latency: HistogramSnapshot,
    /// Time from a request's arrival to a worker starting it.
    pub queue_wait: HistogramSnapshot,
}

/// One slot's counters.
#[derive(Clone, Debug, Default)]
pub struct SlotSnapshot {
    /// Requests written into this slot's ring since the server started
    /// (across proxy restarts).
    pub dispatched: u64,
    /// Requests in its ring now, unanswered.
    pub pending: u64,
    /// Its worker took none of its requests for `requeue_after` and gets
    /// no new ones until it reads its ring again.
    pub unresponsive: bool,
    /// Replies to requests dispatched here, by [`status_index`].
    pub replies: [u64; STATUSES],
}

impl Stats {
    /// Creates a zeroed page in a sealed memfd (master).
    pub fn create() -> io::Result<Stats> {
        let len = std::mem::size_of::<Page>();
        let file = sys::memfd_sealed("halfsync-stats", len as u64)?;
        let s = Stats {
            region: Region::map(file, len)?,
        };
        s.page().magic.store(MAGIC, Ordering::Release);
        Ok(s)
    }

    /// Maps a page created by [`Stats::create`] (proxy).
    pub fn open(file: File) -> io::Result<Stats> {
        let len = std::mem::size_of::<Page>();
        if sys::fd_size(&file)? != len as u64 {
            return Err(io::Error::other("stats page has the wrong size"));
        }
        let s = Stats {
            region: Region::map(file, len)?,
        };
        if s.page().magic.load(Ordering::Acquire) != MAGIC {
            return Err(io::Error::other("stats page has a bad magic number"));
        }
        Ok(s)
    }

    /// The memfd, to pass to the proxy.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.region.fd()
    }

    fn page(&self) -> &Page {
        // SAFETY: the region is exactly size_of::<Page>() bytes (checked at
        // create/open), page-aligned, and Page is all atomics, valid for
        // any bit pattern.
        unsafe { &*(self.region.as_ptr() as *const Page) }
    }

    /// Zeroes the gauges, what describes the proxy now (connections,
    /// queues, requests held, the in-flight cap and run-time estimate), for
    /// a proxy started in place of one that died. The counters (accepted,
    /// refused, replies, histograms, dispatched) carry on from the dead
    /// proxy's, so they only ever grow: a Prometheus `rate()` would read a
    /// drop as a counter reset.
    pub fn reset_gauges(&self) {
        let p = self.page();
        let zero = |a: &AtomicU64| a.store(0, Ordering::Relaxed);
        zero(&p.global.connections);
        for g in &p.groups {
            zero(&g.queued);
            zero(&g.inflight_cap);
            zero(&g.run_ns);
        }
        for s in &p.slots {
            zero(&s.pending);
            zero(&s.unresponsive);
        }
    }

    // ---- proxy side ----

    /// Counts one reply.
    pub fn reply(&self, scope: Scope, code: u16) {
        let p = self.page();
        let i = status_index(code);
        let counter = match scope {
            Scope::Global => &p.global.replies[i],
            Scope::Group(g) => match p.groups.get(g) {
                Some(g) => &g.replies[i],
                None => &p.global.replies[i],
            },
            Scope::Slot(s, g) => match p.slots.get(s) {
                Some(s) => &s.replies[i],
                None => match p.groups.get(g) {
                    Some(g) => &g.replies[i],
                    None => &p.global.replies[i],
                },
            },
        };
        bump(counter, 1);
    }

    /// Records a finished request's latency and queue wait for a group.
    pub fn timing(&self, group: usize, latency_us: u64, queue_wait_us: u64) {
        if let Some(g) = self.page().groups.get(group) {
            g.latency.record(latency_us);
            g.queue_wait.record(queue_wait_us);
        }
    }

    /// A request was written into a slot's ring.
    pub fn dispatched(&self, slot: usize, pending: usize) {
        if let Some(s) = self.page().slots.get(slot) {
            bump(&s.dispatched, 1);
            s.pending.store(pending as u64, Ordering::Relaxed);
        }
    }

    /// A slot's count of unanswered requests changed.
    pub fn pending(&self, slot: usize, pending: usize) {
        if let Some(s) = self.page().slots.get(slot) {
            s.pending.store(pending as u64, Ordering::Relaxed);
        }
    }

    /// A slot's worker was found unresponsive, or responsive again.
    pub fn unresponsive(&self, slot: usize, on: bool) {
        if let Some(s) = self.page().slots.get(slot) {
            s.unresponsive.store(u64::from(on), Ordering::Relaxed);
        }
    }

    /// A group's wait queue length changed.
    pub fn queued(&self, group: usize, len: usize) {
        if let Some(g) = self.page().groups.get(group) {
            g.queued.store(len as u64, Ordering::Relaxed);
        }
    }

    /// A group's in-flight cap or run-time estimate changed.
    pub fn inflight(&self, group: usize, cap: usize, run_ns: Option<u64>) {
        if let Some(g) = self.page().groups.get(group) {
            g.inflight_cap.store(cap as u64, Ordering::Relaxed);
            g.run_ns.store(run_ns.unwrap_or(0), Ordering::Relaxed);
        }
    }

    /// The number of open connections changed.
    pub fn connections(&self, open: usize) {
        self.page()
            .global
            .connections
            .store(open as u64, Ordering::Relaxed);
    }

    /// The proxy's loop is turning (called about once a second, at
    /// `now_ns` by CLOCK_MONOTONIC).
    pub fn heartbeat(&self, now_ns: u64) {
        self.page()
            .global
            .heartbeat_ns
            .store(now_ns, Ordering::Relaxed);
    }

    /// When the proxy's loop last said it turns ([`Stats::heartbeat`];
    /// 0 before the first time).
    pub fn last_heartbeat_ns(&self) -> u64 {
        self.page().global.heartbeat_ns.load(Ordering::Relaxed)
    }

    /// A connection was accepted.
    pub fn accepted(&self) {
        bump(&self.page().global.accepted, 1);
    }

    /// A connection was refused.
    pub fn refused(&self) {
        bump(&self.page().global.refused, 1);
    }

    // ---- reader side ----

    /// The global counters.
    pub fn global(&self) -> GlobalSnapshot {
        let g = &self.page().global;
        GlobalSnapshot {
            connections: g.connections.load(Ordering::Relaxed),
            accepted: g.accepted.load(Ordering::Relaxed),
            refused: g.refused.load(Ordering::Relaxed),
            replies: std::array::from_fn(|i| g.replies[i].load(Ordering::Relaxed)),
        }
    }

    /// One group's counters.
    pub fn group(&self, id: usize) -> GroupSnapshot {
        let Some(g) = self.page().groups.get(id) else {
            return GroupSnapshot::default();
        };
        GroupSnapshot {
            queued: g.queued.load(Ordering::Relaxed),
            inflight_cap: g.inflight_cap.load(Ordering::Relaxed),
            run_ns: g.run_ns.load(Ordering::Relaxed),
            replies: std::array::from_fn(|i| g.replies[i].load(Ordering::Relaxed)),
            latency: g.latency.read(),
            queue_wait: g.queue_wait.read(),
        }
    }

    /// One slot's counters.
    pub fn slot(&self, index: usize) -> SlotSnapshot {
        let Some(s) = self.page().slots.get(index) else {
            return SlotSnapshot::default();
        };
        SlotSnapshot {
            dispatched: s.dispatched.load(Ordering::Relaxed),
            pending: s.pending.load(Ordering::Relaxed),
            unresponsive: s.unresponsive.load(Ordering::Relaxed) != 0,
            replies: std::array::from_fn(|i| s.replies[i].load(Ordering::Relaxed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_scope_and_histograms() {
        let w = Stats::create().unwrap();
        let dup = w.fd().try_clone_to_owned().unwrap();
        let r = Stats::open(File::from(dup)).unwrap();
        w.reply(Scope::Slot(3, 1), 0);
        w.reply(Scope::Slot(3, 1), 150);
        w.reply(Scope::Group(1), 2);
        w.reply(Scope::Global, 6);
        w.reply(Scope::Slot(MAX_SLOTS, 1), 4); // out of range: falls back to the group
        w.timing(1, 50, 10);
        w.timing(1, 3_000, 2_000);
        w.timing(1, 99_000_000, 0);
        assert_eq!(r.slot(3).replies[0], 1);
        assert_eq!(r.slot(3).replies[8], 1);
        assert_eq!(r.group(1).replies[2], 1);
        assert_eq!(r.group(1).replies[4], 1);
        assert_eq!(r.global().replies[6], 1);
        let lat = r.group(1).latency;
        assert_eq!(lat.count(), 3);
        assert_eq!(lat.buckets[0], 1); // <= 100 us
        assert_eq!(lat.buckets[5], 1); // <= 5 ms
        assert_eq!(lat.buckets[HIST - 1], 1); // > 60 s
        assert_eq!(lat.sum_us, 99_003_050);
        w.inflight(1, 7, Some(9));
        w.pending(3, 5);
        w.reset_gauges();
        // Counters carry on; gauges start again.
        assert_eq!(r.group(1).latency.count(), 3);
        assert_eq!(r.slot(3).replies[0], 1);
        assert_eq!(r.group(1).inflight_cap, 0);
        assert_eq!(r.slot(3).pending, 0);
    }
}
