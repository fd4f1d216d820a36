//! Worker slots as the proxy sees them: which requests each worker holds,
//! what state its process is in, and everything that happens when one
//! dies, hangs, corrupts its memory or is replaced.

use std::cell::Cell;
use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};

use halfsync_protocol::status;
use halfsync_shm::{Consumer, Meta, Notify, Producer, RingError, Slot, WorkerState};
use tracing::{debug, error, info, warn};

use crate::conn::Tag;
use crate::control::{KillReason, Restart, ToMaster, describe_exit};
use crate::event_loop::{BUSY_CHECK_EVERY_NS, NS_PER_MS, Proxy, TOKEN_SLOT};
use crate::queue::WaitQueue;
use crate::stats::Scope;
use crate::sys::READ;
use crate::tuning::Tuning;

/// How many queued requests a sleeping worker is worth, when choosing where
/// a request goes (see `pick_slot`).
const SLEEPER_PENALTY: usize = 4;

/// How many requests fewer the worker that took the previous request of
/// the same read counts as holding (see `pick_slot`).
const BATCH_AFFINITY: usize = 16;

/// Batch affinity applies only to groups whose requests run at most this
/// long on average. Then a batch kept on one idle worker finishes at most
/// BATCH_AFFINITY × 5 µs / 2 = 40 µs later than one split over two, the
/// order of what the split costs in extra sends and receives on both
/// ends; under load every worker is busy and keeping batches whole costs
/// nothing. Slower requests gain more from running in parallel.
const AFFINITY_MAX_RUN_NS: u64 = 5_000;

/// Requests per worker before the group has a run-time estimate (see
/// `Group::inflight_cap`).
const START_INFLIGHT: usize = 16;

/// The run-time estimate never goes below this: samples have microsecond
/// resolution, and one of 0 means under half a microsecond.
const MIN_RUN_NS: u64 = 500;

/// A sample counts for at most this many times the estimate, plus
/// [`OUTLIER_SLACK_NS`], unless the sample before it was as high: one
/// request preempted mid-run (or a page fault storm) moves the estimate a
/// little, two slow ones in a row are a slowdown and count in full. So the
/// estimate follows what most requests cost, and under-counts a rare slow
/// kind mixed among fast ones (5% at 20 ms among 50 µs ones: cap 16, where
/// 1 would keep to the budget).
const OUTLIER_FACTOR: u64 = 4;
const OUTLIER_SLACK_NS: u64 = 20_000;

/// A worker holding more than this many times its group's in-flight cap
/// (plus `REBALANCE_SLACK`) has its unstarted requests taken back into the
/// wait queue: the plugin got slower since they were handed out, and they
/// would wait for each other (see `Group::update_cap`). Only while the
/// group has a run-time estimate, and only if the queue has room for them
/// all within `max_queue`.
const REBALANCE_FACTOR: usize = 4;
const REBALANCE_SLACK: usize = 16;

/// After a replacement worker failed to start, wait this long before asking
/// the master for another one.
const RECYCLE_RETRY_NS: u64 = 1000 * NS_PER_MS;

/// A request's identity while it is away from its connection.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ReqMeta {
    pub(crate) tag: Tag,
    pub(crate) id: u64,
    pub(crate) code: u16,
    pub(crate) flags: u16,
    pub(crate) enqueued_ns: u64,
    /// Payload bytes.
    pub(crate) len: u32,
}

/// A request written into a worker's ring and not yet answered.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pending {
    pub(crate) pos: u64,
    pub(crate) req: ReqMeta,
}

/// A request waiting in the proxy for a worker with room.
pub(crate) struct Queued {
    pub(crate) req: ReqMeta,
    pub(crate) payload: Vec<u8>,
}

/// Where a slot's worker process is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// No worker. `Restart` says whether one is on its way.
    Down(Restart),
    /// A worker process exists and is initialising its plugin.
    Starting { pid: i32 },
    /// Serving.
    Ready { pid: i32 },
    /// Its replacement is serving: no new requests; retired once it holds none.
    Draining { pid: i32 },
    /// Asked to exit (drained); waiting for the master to reap it.
    Retiring { pid: i32 },
    /// Asked the master to kill it (corrupt memory or a hung request).
    Killing { pid: i32 },
}

impl Phase {
    fn pid(self) -> Option<i32> {
        match self {
            Phase::Down(_) => None,
            Phase::Starting { pid }
            | Phase::Ready { pid }
            | Phase::Draining { pid }
            | Phase::Retiring { pid }
            | Phase::Killing { pid } => Some(pid),
        }
    }
}

pub(crate) struct WorkerSlot {
    pub(crate) group: usize,
    pub(crate) label: u32,
    slot: Slot,
    pub(crate) eventfd: OwnedFd,
    tx: Producer,
    rx: Consumer,
    pub(crate) pending: VecDeque<Pending>,
    pub(crate) phase: Phase,
    /// When the current phase began (CLOCK_MONOTONIC ns).
    since_ns: u64,
    /// When the slot last lost its worker, to measure the replacement time.
    down_since_ns: Option<u64>,
    /// The slot whose worker this one replaces once ready.
    replaces: Option<usize>,
    /// Started after failed starts: not counted on until ready.
    probation: bool,
    /// Benchmark switches for the request ring (`always_wake`,
    /// `no_ring_rewind`).
    tuning: Tuning,
    /// We told the worker we sleep (and must take it back on waking).
    announced: bool,
    /// Whether the worker sleeps, as read at `sleep_hint_at` (a loop
    /// turn's clock): read once per turn, not per request, because the
    /// flag shares a cache line the worker writes on every request.
    sleep_hint: bool,
    sleep_hint_at: u64,
    /// Stuck on the request at this ring position: its queue was moved to
    /// other workers and it gets no new requests until that one ends.
    stalled_on: Option<u64>,
    /// The ring position of the request it was last seen running, and when
    /// this proxy first saw it so: a request's age is counted from the
    /// earlier of that and the start time the worker wrote, so a worker
    /// that wrote a start time in the future (a scribble) cannot put its
    /// request beyond `request_timeout`.
    busy_seen: Cell<(u64, u64)>,
    /// Not busy, with requests in its ring, and finishing none: its served
    /// count and when that was first seen (see `slot_action`). A `Cell`:
    /// the checks that update it only look at the slot.
    idle_watch: Cell<Option<(u64, u64)>>,
    /// Since when it has taken none of its requests (stopped, or starved
    /// of CPU), once that lasted `requeue_after`: its requests moved to
    /// other workers, and it gets no new ones until it has read its ring
    /// to the end (skipping what was moved).
    unresponsive_since: Option<u64>,
    /// Its request ring's occupancy at the last check while unresponsive:
    /// one that shrinks is a worker reading its ring again, not killed.
    unresponsive_occupancy: Cell<u64>,
    /// This worker's last run-time sample as it came (see
    /// `OUTLIER_FACTOR`): two slow ones in a row from the same worker are
    /// a slowdown, where a stall of the whole host can inflate one sample
    /// of each of several workers.
    prev_sample_ns: u64,
    /// A replacement was requested for this worker.
    recycle_requested: bool,
    /// Do not request a replacement before this time.
    recycle_not_before_ns: u64,
    /// A ring is corrupt: read nothing more from it.
    corrupt: bool,
    /// The control block is corrupt: its account of the running request
    /// cannot be trusted.
    control_corrupt: bool,
    /// The request (ring position) killed for running too long, and what
    /// its client is told.
    timed_out: Option<(u64, &'static [u8])>,
    /// The request (ring position) already logged as slow.
    slow_logged: Option<u64>,
}

impl WorkerSlot {
    fn attach(&mut self) -> Result<(), RingError> {
        self.tx = Producer::attach(self.slot.requests(), Notify::Futex)?;
        self.tuning.apply(&mut self.tx);
        self.rx = Consumer::attach(self.slot.replies())?;
        Ok(())
    }

    pub(crate) fn is_ready(&self) -> bool {
        matches!(self.phase, Phase::Ready { .. })
    }

    /// Whether new requests may go to this worker (ring room aside).
    fn takes_requests(&self, max_inflight: usize) -> bool {
        self.is_ready()
            && self.stalled_on.is_none()
            && self.unresponsive_since.is_none()
            && self.pending.len() < max_inflight
    }

    /// What `pick_slot` compares: requests held, plus [`SLEEPER_PENALTY`]
    /// if the worker sleeps (as last read into `sleep_hint`) and the
    /// group's requests are `cheap`.
    fn load(&self, cheap: bool) -> usize {
        self.pending.len()
            + if cheap && self.sleep_hint {
                SLEEPER_PENALTY
            } else {
                0
            }
    }

    /// Whether replies may be read from this slot.
    fn readable(&self) -> bool {
        !self.corrupt
            && matches!(
                self.phase,
                Phase::Ready { .. }
                    | Phase::Draining { .. }
                    | Phase::Retiring { .. }
                    | Phase::Killing { .. }
            )
    }

    /// Whether replies are waiting (or the ring is corrupt: handle it), a
    /// cheap look without announcing anything.
    pub(crate) fn has_replies(&mut self) -> bool {
        self.readable() && !matches!(self.rx.is_empty(), Ok(true))
    }

    /// Announces sleep to the worker; false if replies are already waiting.
    pub(crate) fn prepare_sleep(&mut self) -> bool {
        if !self.readable() {
            return true;
        }
        self.announced = true;
        matches!(self.rx.prepare_sleep(), Ok(true))
    }

    pub(crate) fn end_sleep(&mut self) {
        if std::mem::take(&mut self.announced) && self.readable() {
            self.rx.end_sleep();
        }
    }

    pub(crate) fn has_unpublished(&self) -> bool {
        self.tx.has_unpublished()
    }

    pub(crate) fn publish(&mut self) {
        self.tx.publish();
    }
}

/// One `[[group]]` as the proxy runs it.
pub(crate) struct Group {
    pub(crate) name: String,
    /// No longer in the configuration (or never was): no requests are
    /// routed here; its workers drain.
    pub(crate) retired: bool,
    pub(crate) slots: Vec<usize>,
    /// Requests waiting for a worker with room, served connection by
    /// connection in turn.
    pub(crate) queue: WaitQueue,
    /// Requests for commands a reload is moving to this group, waiting for
    /// its new version (see [`crate::Reconfigure::hold`]). They count
    /// against `max_queue` with `queue`.
    pub(crate) held: WaitQueue,
    pub(crate) max_inflight: usize,
    /// `max_inflight_time` in ns (0: off).
    pub(crate) max_inflight_time_ns: u64,
    /// Requests a worker of this group may hold now: `max_inflight`, or
    /// fewer by `max_inflight_time` (see `update_cap`).
    pub(crate) inflight_cap: usize,
    pub(crate) max_queue: usize,
    pub(crate) request_timeout_ns: u64,
    pub(crate) slow_request_ns: u64,
    pub(crate) queue_timeout_ns: u64,
    pub(crate) init_timeout_ns: u64,
    pub(crate) drain_timeout_ns: u64,
    pub(crate) requeue_after_ns: u64,
    /// Moving average of the plugin's run time, from the replies workers
    /// sample (outliers clipped, see `OUTLIER_FACTOR`); `None` until the
    /// first sample.
    run_ns: Option<u64>,
    /// The estimate rests on more than a (clamped) first sample: one
    /// sample within the outlier limit came, or two slow ones in a row
    /// from one worker set it. Until then the in-flight cap stays at
    /// `START_INFLIGHT` (a slow plugin's clamped first sample would
    /// otherwise raise it).
    trusted: bool,
    /// A group a reload just added: until its first worker is ready (or
    /// this deadline, its `init_timeout`, passes), its requests wait in
    /// the queue instead of getting BUSY, although no worker of it is
    /// registered yet (the master sends the new routes first, then starts
    /// the workers, and under load the fork takes a while).
    pub(crate) fresh_until_ns: u64,
    /// Overload answers since the last warning about them.
    overload: Overload,
}

/// A group's BUSY (wait queue full) and TIMEOUT (waited past
/// `queue_timeout`) answers since its last overload warning, and when
/// that was (see `Proxy::overloaded`).
#[derive(Default)]
struct Overload {
    busy: u64,
    timed_out: u64,
    warned_ns: Option<u64>,
}

/// What a request killed with its worker for running too long is told.
const PAST_REQUEST_TIMEOUT: &[u8] = b"the request ran past request_timeout; its worker was killed";
/// The same, for a worker being replaced or retired (drain_timeout).
const PAST_DRAIN_TIMEOUT: &[u8] =
    b"the request ran past drain_timeout while its worker was being replaced; the worker was killed";

/// At most one overload warning per group this often.
const OVERLOAD_WARN_EVERY_NS: u64 = 10_000 * NS_PER_MS;

impl Group {
    /// Requests waiting in this group: queued for a worker, or held for
    /// its new version.
    pub(crate) fn waiting(&self) -> usize {
        self.queue.len() + self.held.len()
    }

    /// A placeholder for a group id not (or no longer) configured.
    pub(crate) fn absent() -> Group {
        Group {
            name: String::new(),
            retired: true,
            slots: Vec::new(),
            queue: WaitQueue::default(),
            held: WaitQueue::default(),
            max_inflight: 1,
            max_inflight_time_ns: 0,
            inflight_cap: 1,
            max_queue: 0,
            request_timeout_ns: 0,
            slow_request_ns: 0,
            queue_timeout_ns: 0,
            init_timeout_ns: 0,
            drain_timeout_ns: 0,
            requeue_after_ns: 0,
            run_ns: None,
            trusted: false,
            fresh_until_ns: 0,
            overload: Overload::default(),
        }
    }

    /// Takes a sampled run time (a reply's `flags`, see `Meta::flags`)
    /// from a worker whose previous sample is `prev` (updated here).
    pub(crate) fn note_run_time(&mut self, flags: u16, prev: &mut u64) {
        let Some(sample) = halfsync_shm::run_time_ns(flags) else {
            return;
        };
        self.run_ns = Some(match self.run_ns {
            // The first sample may be a cold start's: it counts for at most
            // OUTLIER_SLACK_NS; a slow plugin's second sample counts in full.
            None => sample.clamp(MIN_RUN_NS, OUTLIER_SLACK_NS),
            Some(avg) => {
                let limit = avg * OUTLIER_FACTOR + OUTLIER_SLACK_NS;
                if !self.trusted && sample > limit && *prev > limit {
                    // Before any ordinary sample, two in a row far above
                    // the clamped first one: a slow plugin, whose estimate
                    // goes there at once instead of by eighths. (Not
                    // later: in a mix of fast and rare slow requests, two
                    // slow ones in a row would swing it.)
                    self.trusted = true;
                    sample.min(*prev)
                } else {
                    if sample <= limit {
                        self.trusted = true;
                    }
                    (avg - avg / 8 + sample.min(limit.max(*prev)) / 8).max(MIN_RUN_NS)
                }
            }
        });
        *prev = sample;
        self.update_cap();
    }

    /// Recomputes `inflight_cap`: `max_inflight`, held to about
    /// `max_inflight_time` of work at the current run-time estimate, and
    /// to `START_INFLIGHT` before there is one.
    fn update_cap(&mut self) {
        self.inflight_cap = match (self.max_inflight_time_ns, self.run_ns) {
            (0, _) => self.max_inflight,
            (_, None) => self.max_inflight.min(START_INFLIGHT),
            (_, Some(_)) if !self.trusted => self.max_inflight.min(START_INFLIGHT),
            (t, Some(run)) => {
                let n = usize::try_from(t / run.max(MIN_RUN_NS)).unwrap_or(usize::MAX);
                n.clamp(1, self.max_inflight.max(1))
            }
        };
    }

    /// The run-time estimate, in ns (for the stats page).
    pub(crate) fn run_ns(&self) -> Option<u64> {
        self.run_ns
    }

    /// Whether the group's requests are known to be cheap (at most
    /// [`AFFINITY_MAX_RUN_NS`] on average): then a connection's batch
    /// stays on one worker, and a request waits behind a few on an awake
    /// worker rather than wake a sleeping one. Not before there is a
    /// run-time estimate: a plugin of unknown cost is spread.
    fn cheap(&self) -> bool {
        self.run_ns.is_some_and(|r| r <= AFFINITY_MAX_RUN_NS)
    }

    /// Takes the settings of a (new or changed) group from the config,
    /// keeping its slots and queue.
    pub(crate) fn update(&mut self, g: &halfsync_config::Group) {
        let ns = |d: std::time::Duration| d.as_nanos().min(u64::MAX as u128) as u64;
        self.name = g.name.clone();
        self.retired = false;
        self.max_inflight = g.max_inflight as usize;
        self.max_inflight_time_ns = ns(g.max_inflight_time);
        self.max_queue = g.max_queue as usize;
        self.request_timeout_ns = ns(g.request_timeout);
        self.slow_request_ns = ns(g.slow_request);
        self.queue_timeout_ns = ns(g.queue_timeout);
        self.init_timeout_ns = ns(g.init_timeout);
        self.drain_timeout_ns = ns(g.drain_timeout);
        self.requeue_after_ns = ns(g.requeue_after);
        // A reload keeps the run-time estimate: the old workers serve
        // until the new ones are ready, and a slower new plugin counts in
        // full from its second sample anyway.
        self.update_cap();
    }
}

/// What a slot needs this turn (decided by `slot_action`, done by `apply`).
enum Action {
    None,
    Ready(i32),
    /// Kill the worker; the request it runs (ring position), if any, gets
    /// TIMEOUT with this message.
    Kill(KillReason, String, Option<(u64, &'static [u8])>),
    ControlCorrupt(String),
    Slow(u64, u64, u16, u64),
    Retire(i32),
    Recycle(i32),
    /// Stuck on the request at this position: move the queue behind it.
    Requeue(u64, u64, u16, u64),
    /// Holds far more than its group's in-flight cap now allows: take the
    /// unstarted requests back (`REBALANCE_FACTOR`).
    Rebalance,
    /// The request it was stuck on is over.
    Unstall,
    /// Took none of its requests since this time, for `requeue_after`:
    /// move them all to other workers.
    Unresponsive(u64),
    /// Unresponsive, and has read its ring to the end since: it takes
    /// requests again.
    Responsive,
}

impl Proxy {
    /// Takes back the requests a worker has not started (it skips them
    /// when it gets there) and queues them for the group's other workers,
    /// in their order, at the front. Returns how many moved.
    pub(crate) fn revoke_unstarted(&mut self, si: usize) -> usize {
        let Some(s) = self.slots.get_mut(si).and_then(Option::as_mut) else {
            return 0;
        };
        // Only published records can be revoked: publish first.
        s.tx.publish();
        let Some(first) = s.slot.control().revoke(s.tx.published()) else {
            return 0;
        };
        let Some(k) = s.pending.iter().position(|p| p.pos >= first) else {
            return 0;
        };
        let revoked: Vec<Pending> = s.pending.drain(k..).collect();
        // The worker maps request data read-only: these bytes are the proxy's.
        let mut reader = Consumer::attach_at(s.slot.requests(), revoked[0].pos).ok();
        let mut moved = Vec::new();
        let mut lost = Vec::new();
        for p in revoked {
            let payload = reader.as_mut().and_then(|r| take_back(r, &p));
            match payload {
                Some(payload) => moved.push(Queued {
                    req: p.req,
                    payload,
                }),
                None => lost.push(p),
            }
        }
        let group = s.group;
        self.stats.pending(si, s.pending.len());
        for p in &lost {
            // Cannot happen with an intact ring; never run it twice.
            self.answer(
                &p.req,
                status::WORKER_DIED,
                b"request lost while moving it off a stuck worker",
                Scope::Slot(si, group),
            );
        }
        let n = moved.len();
        self.requeue_front(group, moved);
        n
    }

    /// Puts requests taken back from a worker of group `g` at the front
    /// of its queue, except those whose command a reload has moved
    /// elsewhere (or holds) since they were routed: they go where their
    /// command is served now, never to this group's new version.
    fn requeue_front(&mut self, g: usize, reqs: Vec<Queued>) {
        let (stay, moving): (Vec<Queued>, Vec<Queued>) = reqs
            .into_iter()
            .partition(|q| self.waits_in(g, q.req.code, false));
        self.groups[g].queue.push_front_all(stay);
        self.rehome(moving, true);
        self.stats.queued(g, self.groups[g].waiting());
    }

    /// Stops giving a slot's worker requests; it is retired once it holds
    /// none. A worker not yet serving is retired at once.
    pub(crate) fn drain_slot(&mut self, si: usize) {
        let now = self.now_ns;
        let Some(s) = self.slot_mut(si) else { return };
        match s.phase {
            Phase::Ready { pid } => {
                s.phase = Phase::Draining { pid };
                s.since_ns = now;
                // It finishes the request it runs; the rest go elsewhere.
                self.revoke_unstarted(si);
            }
            Phase::Starting { pid } => {
                s.phase = Phase::Retiring { pid };
                let _ = self.control.send_to_master(ToMaster::Retire {
                    slot: si as u32,
                    pid,
                });
            }
            _ => {}
        }
    }

    /// Maps a slot the master created.
    pub(crate) fn add_slot(&mut self, si: usize, group: usize, label: u32, fds: Vec<OwnedFd>) {
        let [memfd, eventfd]: [OwnedFd; 2] = match fds.try_into() {
            Ok(f) => f,
            Err(_) => {
                error!(slot = si, "AddSlot without its two fds; ignored");
                return;
            }
        };
        if group >= self.groups.len() || si >= crate::stats::MAX_SLOTS {
            error!(
                slot = si,
                group, "AddSlot for an unknown group or past the slot limit; ignored"
            );
            return;
        }
        let slot = match Slot::open_any(File::from(memfd)) {
            Ok(s) => s,
            Err(e) => {
                error!(slot = si, "cannot map slot: {e}");
                return;
            }
        };
        let (mut tx, rx) = match (
            Producer::attach(slot.requests(), Notify::Futex),
            Consumer::attach(slot.replies()),
        ) {
            (Ok(tx), Ok(rx)) => (tx, rx),
            (Err(e), _) | (_, Err(e)) => {
                error!(slot = si, "new slot is corrupt: {e}");
                return;
            }
        };
        self.tuning.apply(&mut tx);
        if let Err(e) = self
            .epoll
            .add(eventfd.as_raw_fd(), READ, TOKEN_SLOT | si as u64)
        {
            error!(slot = si, "epoll_ctl(eventfd): {e}");
            return;
        }
        if self.slots.len() <= si {
            self.slots.resize_with(si + 1, || None);
        }
        if let Some(old) = self.slots[si].take() {
            let _ = self.epoll.delete(old.eventfd.as_raw_fd());
        }
        self.slots[si] = Some(WorkerSlot {
            group,
            label,
            slot,
            eventfd,
            tx,
            rx,
            pending: VecDeque::new(),
            phase: Phase::Down(Restart::Now),
            since_ns: self.now_ns,
            down_since_ns: None,
            replaces: None,
            probation: false,
            tuning: self.tuning,
            announced: false,
            sleep_hint: false,
            sleep_hint_at: 0,
            stalled_on: None,
            busy_seen: Cell::new((u64::MAX, 0)),
            idle_watch: Cell::new(None),
            unresponsive_since: None,
            unresponsive_occupancy: Cell::new(u64::MAX),
            prev_sample_ns: 0,
            recycle_requested: false,
            recycle_not_before_ns: 0,
            corrupt: false,
            control_corrupt: false,
            timed_out: None,
            slow_logged: None,
        });
        // A slot the master gave to another group (one of a removed group,
        // reused) leaves its old group's list.
        for (g, other) in self.groups.iter_mut().enumerate() {
            if g != group {
                other.slots.retain(|&x| x != si);
            }
        }
        if !self.groups[group].slots.contains(&si) {
            self.groups[group].slots.push(si);
        }
    }

    pub(crate) fn worker_started(
        &mut self,
        si: usize,
        pid: i32,
        replaces: Option<usize>,
        probation: bool,
        label: u32,
    ) {
        let now = self.now_ns;
        let Some(s) = self.slot_mut(si) else { return };
        s.phase = Phase::Starting { pid };
        s.since_ns = now;
        s.replaces = replaces;
        s.probation = probation;
        s.label = label;
        s.corrupt = false;
        s.control_corrupt = false;
        s.timed_out = None;
        s.slow_logged = None;
        s.recycle_requested = false;
        // The request its predecessor was stuck on died with it: a stuck
        // mark left here kept the new worker from taking requests until
        // the next idle-rate check of the slot, up to a second away.
        s.stalled_on = None;
        s.busy_seen.set((u64::MAX, 0));
        s.idle_watch.set(None);
        s.unresponsive_since = None;
        // (The page is per slot: a new worker starts responsive.)
        self.stats.unresponsive(si, false);
    }

    fn slot_mut(&mut self, si: usize) -> Option<&mut WorkerSlot> {
        self.slots.get_mut(si).and_then(Option::as_mut)
    }

    fn group_name(&self, si: usize) -> (&str, u32) {
        match self.slots.get(si).and_then(Option::as_ref) {
            Some(s) => (&self.groups[s.group].name, s.label),
            None => ("?", 0),
        }
    }

    /// Whether group `g` has a worker serving or about to: if not, its
    /// requests get BUSY at once instead of waiting.
    pub(crate) fn group_live(&self, g: usize) -> bool {
        self.now_ns < self.groups[g].fresh_until_ns
            || self.groups[g].slots.iter().any(|&si| {
                self.slots[si].as_ref().is_some_and(|s| match s.phase {
                    Phase::Starting { .. } => !s.probation,
                    Phase::Ready { .. } | Phase::Killing { .. } | Phase::Down(Restart::Now) => true,
                    _ => false,
                })
            })
    }

    fn kill(&mut self, si: usize, reason: KillReason, why: &str) {
        let Some(s) = self.slot_mut(si) else { return };
        let Some(pid) = s.phase.pid() else { return };
        if matches!(s.phase, Phase::Killing { .. }) {
            return;
        }
        s.phase = Phase::Killing { pid };
        let (name, label) = self.group_name(si);
        error!(group = %name, worker = label, pid, "{why}; killing the worker");
        let _ = self.control.send_to_master(ToMaster::KillWorker {
            slot: si as u32,
            pid,
            reason,
        });
    }

    pub(crate) fn fail_slot(&mut self, si: usize, why: &str) {
        if let Some(s) = self.slot_mut(si) {
            s.corrupt = true;
        }
        self.kill(
            si,
            KillReason::Corrupt,
            &format!("shared memory is corrupt ({why})"),
        );
    }

    /// Moves every published reply of every readable slot into connection
    /// buffers.
    pub(crate) fn collect_replies(&mut self) {
        if self.tuning.flush_per_reply {
            return self.collect_replies_one_by_one();
        }
        for si in 0..self.slots.len() {
            if self.slots[si].as_ref().is_some_and(WorkerSlot::readable)
                && let Err(why) = self.collect_slot(si, usize::MAX)
            {
                self.fail_slot(si, &why);
            }
        }
    }

    /// Moves one slot's published replies into connection buffers. Each
    /// reply must answer the oldest request the slot holds.
    /// Benchmark switch `flush_per_reply`: one send per reply.
    fn collect_replies_one_by_one(&mut self) {
        loop {
            let mut any = false;
            for si in 0..self.slots.len() {
                if !self.slots[si].as_ref().is_some_and(WorkerSlot::readable) {
                    continue;
                }
                match self.collect_slot(si, 1) {
                    Ok(n) => any |= n > 0,
                    Err(why) => self.fail_slot(si, &why),
                }
                self.flush_dirty();
            }
            if !any {
                return;
            }
        }
    }

    /// Moves up to `max` published replies of one slot into connection
    /// buffers; returns how many. Each reply must answer the oldest request
    /// the slot holds.
    fn collect_slot(&mut self, si: usize, max: usize) -> Result<usize, String> {
        let Some(s) = self.slots.get_mut(si).and_then(Option::as_mut) else {
            return Ok(0);
        };
        let mut n = 0;
        let mut stale = 0u64;
        let result = loop {
            if n == max {
                break Ok(());
            }
            let rec = match s.rx.peek() {
                Ok(Some(r)) => r,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e.to_string()),
            };
            let Some(p) = s.pending.front() else {
                break Err(format!(
                    "reply id {} with no request outstanding",
                    rec.meta.id
                ));
            };
            if p.req.tag.0 != rec.meta.tag || p.req.id != rec.meta.id {
                break Err(format!(
                    "reply id {} tag {:#x} does not answer request id {} tag {:#x}",
                    rec.meta.id, rec.meta.tag, p.req.id, p.req.tag.0
                ));
            }
            self.stats.reply(Scope::Slot(si, s.group), rec.meta.code);
            // (Workers answer TIMEOUT themselves only to requests that
            // waited past queue_timeout in their ring.)
            stale += u64::from(rec.meta.code == status::TIMEOUT);
            if rec.meta.flags != 0
                && let Some(g) = self.groups.get_mut(s.group)
            {
                g.note_run_time(rec.meta.flags, &mut s.prev_sample_ns);
                self.stats.inflight(s.group, g.inflight_cap, g.run_ns());
            }
            // The worker puts the time it started the request in the reply.
            let now = if self.tuning.clock_per_event {
                halfsync_shm::sys::monotonic_ns()
            } else {
                self.now_ns
            };
            let latency = now.saturating_sub(p.req.enqueued_ns) / 1000;
            let waited = rec
                .meta
                .time_ns
                .saturating_sub(p.req.enqueued_ns)
                .min(latency * 1000)
                / 1000;
            self.stats.timing(s.group, latency, waited);
            self.conns.deliver(
                p.req.tag,
                p.req.id,
                rec.meta.code,
                rec.payload,
                p.req.len,
                now,
            );
            s.pending.pop_front();
            s.rx.advance();
            n += 1;
        };
        s.rx.release();
        self.stats.pending(si, s.pending.len());
        // A draining worker that now holds nothing can retire this turn.
        self.check_due |= s.pending.is_empty() && matches!(s.phase, Phase::Draining { .. });
        if stale > 0 {
            let g = s.group;
            self.overloaded(g, 0, stale);
        }
        result.map(|()| n)
    }

    /// The least-loaded ready slot of group `g` with room for a request of
    /// `len` payload bytes. A linear scan: groups have few workers.
    ///
    /// For a group of cheap requests, a sleeping worker counts as if it
    /// held [`SLEEPER_PENALTY`] more requests: while an awake worker has
    /// little queued, it takes the request and the sleeper is not woken (a
    /// wake-up is a syscall and a context switch, and on a VM often a
    /// halted vCPU to restart). Not for slower or not yet measured ones:
    /// there the awake worker is usually busy running one, and a request
    /// behind it would wait that long while another worker idles.
    ///
    /// Batch affinity: the worker that took the previous request of the
    /// same read counts as holding [`BATCH_AFFINITY`] fewer, so a
    /// pipelining client's batch goes to one worker and its replies come
    /// back together, in one send and one receive, instead of in pieces
    /// from each worker (measured: +7 to +17% at 16 in flight). Only for
    /// groups whose requests are cheap ([`AFFINITY_MAX_RUN_NS`]); slow
    /// ones are spread, to run in parallel.
    pub(crate) fn pick_slot(&mut self, g: usize, len: usize) -> Option<usize> {
        let max = self.groups[g].inflight_cap;
        let cheap = self.groups[g].cheap();
        let affinity = !self.tuning.no_batch_affinity && cheap;
        // The rest of a batch: the other workers' loads have not changed
        // since its first request was placed (no replies are collected
        // while a read is parsed), so the batch's worker keeps winning
        // until it holds `batch_until`; no need to look at the others.
        if affinity
            && let Some(si) = self.batch_slot
            && let Some(s) = self.slots[si].as_mut()
            && s.group == g
            && s.takes_requests(max)
            && s.load(cheap) < self.batch_until
            && matches!(s.tx.fits(len), Ok(true))
        {
            return Some(si);
        }
        let mut best: Option<(usize, usize)> = None;
        // The least load among the others, for `batch_until`.
        let mut second = usize::MAX;
        let mut corrupt = None;
        for &si in &self.groups[g].slots {
            let Some(s) = self.slots[si].as_mut() else {
                continue;
            };
            if !s.takes_requests(max) {
                continue;
            }
            if s.sleep_hint_at != self.now_ns {
                s.sleep_hint = s.tx.consumer_sleeping();
                s.sleep_hint_at = self.now_ns;
            }
            let mut load = s.load(cheap);
            if affinity && self.batch_slot == Some(si) {
                load = load.saturating_sub(BATCH_AFFINITY);
            }
            if let Some((_, b)) = best
                && b <= load
            {
                second = second.min(load);
                continue;
            }
            match s.tx.fits(len) {
                Ok(true) => {
                    if let Some((_, b)) = best {
                        second = second.min(b);
                    }
                    best = Some((si, load));
                }
                Ok(false) => {}
                Err(e) => corrupt = Some((si, e)),
            }
        }
        if let Some((si, e)) = corrupt {
            self.fail_slot(si, &e.to_string());
        }
        self.batch_until = second.saturating_add(BATCH_AFFINITY);
        best.map(|(si, _)| si)
    }

    /// Writes a request into a slot's ring (published at the end of the
    /// turn). The caller checked that it fits.
    pub(crate) fn push_to_slot(&mut self, si: usize, req: ReqMeta, payload: &[u8]) -> bool {
        let Some(s) = self.slots.get_mut(si).and_then(Option::as_mut) else {
            return false;
        };
        let meta = Meta {
            code: req.code,
            flags: req.flags,
            id: req.id,
            tag: req.tag.0,
            time_ns: req.enqueued_ns,
        };
        match s.tx.push(&meta, payload) {
            Ok(Some(pos)) => {
                s.pending.push_back(Pending { pos, req });
                if s.pending.len() == 1 {
                    // An idle worker's first request: its deadlines
                    // (requeue_after, slow_request, request_timeout) are
                    // looked at from now on at the busy rate, not at the
                    // next idle-rate check up to a second away.
                    let soon = self.now_ns + BUSY_CHECK_EVERY_NS;
                    if self.next_check_ns.is_none_or(|t| t > soon) {
                        self.next_check_ns = Some(soon);
                    }
                }
                self.stats.dispatched(si, s.pending.len());
                if self.tuning.publish_per_request {
                    s.tx.publish();
                }
                true
            }
            Ok(None) => false,
            Err(e) => {
                self.fail_slot(si, &e.to_string());
                false
            }
        }
    }

    /// Answers a request that will not run, if its connection still exists.
    pub(crate) fn answer(&mut self, req: &ReqMeta, code: u16, msg: &[u8], scope: Scope) {
        self.stats.reply(scope, code);
        self.conns
            .deliver(req.tag, req.id, code, msg, req.len, self.now_ns);
    }

    /// Hands queued requests to workers with room; expires stale ones and
    /// refuses them all while the group has no worker.
    pub(crate) fn dispatch_queued(&mut self) {
        for g in 0..self.groups.len() {
            if !self.groups[g].held.is_empty() {
                self.expire_waiting(g, true);
            }
            if self.groups[g].queue.is_empty() {
                continue;
            }
            if !self.group_live(g) {
                let mut dead = self.groups[g].queue.take_all();
                dead.extend(self.groups[g].held.take_all());
                for r in dead {
                    self.answer(
                        &r.req,
                        status::BUSY,
                        b"no worker is running for this command",
                        Scope::Group(g),
                    );
                }
                self.stats.queued(g, 0);
                continue;
            }
            self.expire_waiting(g, false);
            while let Some(q) = self.groups[g].queue.front() {
                let tag = q.req.tag;
                if self.conns.get(tag).is_none() {
                    // Its client is gone: never run its requests.
                    self.groups[g].queue.drop_conn(tag);
                    continue;
                }
                let len = q.payload.len();
                let Some(si) = self.pick_slot(g, len) else {
                    break;
                };
                let Some(q) = self.groups[g].queue.pop_front() else {
                    break;
                };
                if !self.push_to_slot(si, q.req, &q.payload) {
                    self.groups[g].queue.push_front(q);
                    break;
                }
                self.groups[g].queue.recycle(q.payload);
            }
            self.stats.queued(g, self.groups[g].waiting());
        }
    }

    /// Answers TIMEOUT to group `g`'s requests that waited past its
    /// `queue_timeout`: in its queue, or (`held`) in its held queue, where
    /// requests wait no longer than queued ones (see [`Group::held`]).
    fn expire_waiting(&mut self, g: usize, held: bool) {
        let qt = self.groups[g].queue_timeout_ns;
        if qt > 0
            && let Some(deadline) = self.now_ns.checked_sub(qt + 1)
        {
            let group = &mut self.groups[g];
            let q = if held {
                &mut group.held
            } else {
                &mut group.queue
            };
            let expired = q.take_expired(deadline);
            let n = expired.len() as u64;
            for q in expired {
                self.answer(
                    &q.req,
                    status::TIMEOUT,
                    b"waited longer than queue_timeout for a worker",
                    Scope::Group(g),
                );
            }
            // (Held requests waited for a reload, not for lack of workers.)
            if n > 0 && !held {
                self.overloaded(g, 0, n);
            }
            self.stats.queued(g, self.groups[g].waiting());
        }
    }

    /// Group `g` answered `busy` requests BUSY because its wait queue was
    /// full and `timed_out` TIMEOUT because they waited past
    /// `queue_timeout`: a warning, at most every
    /// [`OVERLOAD_WARN_EVERY_NS`] per group, with the counts since the
    /// last one (as PHP-FPM warns when a pool reaches pm.max_children; the
    /// metrics have every answer).
    pub(crate) fn overloaded(&mut self, g: usize, busy: u64, timed_out: u64) {
        let Some(group) = self.groups.get_mut(g) else {
            return;
        };
        group.overload.busy += busy;
        group.overload.timed_out += timed_out;
        self.warn_overload(g);
    }

    /// Once a second: the counts held back since a group's last overload
    /// warning are logged once its interval is over, even if the overload
    /// has ended (they used to wait for the next overload, and then read
    /// as a new one).
    pub(crate) fn flush_overload(&mut self) {
        for g in 0..self.groups.len() {
            self.warn_overload(g);
        }
    }

    /// Logs group `g`'s overload counts, unless there are none or it was
    /// warned about less than [`OVERLOAD_WARN_EVERY_NS`] ago.
    fn warn_overload(&mut self, g: usize) {
        let now = self.now_ns;
        let Some(group) = self.groups.get_mut(g) else {
            return;
        };
        let o = &mut group.overload;
        if o.busy + o.timed_out == 0
            || o.warned_ns
                .is_some_and(|t| now < t + OVERLOAD_WARN_EVERY_NS)
        {
            return;
        }
        let since = match o.warned_ns {
            Some(t) => format!(
                "since the last such warning, {} s ago",
                (now - t) / (1000 * NS_PER_MS)
            ),
            None => "so far".to_owned(),
        };
        warn!(
            group = %group.name,
            busy = o.busy,
            timed_out = o.timed_out,
            "overloaded: {} answered BUSY (wait queue full, max_queue = {}), {} TIMEOUT (waited \
             past queue_timeout) {since}; more workers (halfsync scale, or a dynamic pool) or a \
             larger max_queue",
            o.busy,
            group.max_queue,
            o.timed_out
        );
        o.busy = 0;
        o.timed_out = 0;
        o.warned_ns = Some(now);
    }

    /// Per-turn checks of every worker: started ones becoming ready,
    /// replacements taking over, drained ones retiring, hung and slow
    /// requests, recycling requests. Returns the nearest time a check is
    /// due (for the epoll timeout).
    pub(crate) fn check_slots(&mut self) -> Option<u64> {
        let mut next: Option<u64> = None;
        let gap = self.now_ns.saturating_sub(self.last_check_ns);
        self.last_check_ns = self.now_ns;
        for si in 0..self.slots.len() {
            let (action, due) = self.slot_action(si, gap);
            if let Some(t) = due {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
            self.apply(si, action);
        }
        next
    }

    /// Decides what one slot needs now, and when it next needs looking at.
    ///
    /// `gap`: time since the checks last ran (every 10 ms while workers
    /// hold requests); a longer one means this proxy did not run.
    fn slot_action(&self, si: usize, gap: u64) -> (Action, Option<u64>) {
        let now = self.now_ns;
        let Some(s) = self.slots[si].as_ref() else {
            return (Action::None, None);
        };
        let g = &self.groups[s.group];
        let ctl = s.slot.control();
        match s.phase {
            Phase::Starting { pid } => {
                if ctl.pid() == pid as u32
                    && matches!(ctl.state(), Ok(WorkerState::Idle | WorkerState::Busy))
                {
                    return (Action::Ready(pid), None);
                }
                if g.init_timeout_ns == 0 {
                    return (Action::None, None);
                }
                let deadline = s.since_ns.saturating_add(g.init_timeout_ns);
                if now >= deadline {
                    return (
                        Action::Kill(
                            KillReason::InitTimeout,
                            "plugin init ran past init_timeout".into(),
                            None,
                        ),
                        None,
                    );
                }
                (Action::None, Some(deadline))
            }
            Phase::Ready { pid } | Phase::Draining { pid } => {
                // A control block that no longer names this worker or a
                // known state was scribbled on.
                if ctl.pid() != pid as u32 {
                    return (
                        Action::ControlCorrupt(format!("control block pid {}", ctl.pid())),
                        None,
                    );
                }
                if let Err(raw) = ctl.state() {
                    return (
                        Action::ControlCorrupt(format!("control block state {raw:#x}")),
                        None,
                    );
                }
                let mut due = None;
                let busy = ctl.busy();
                if s.stalled_on.is_some() && busy.map(|b| b.pos) != s.stalled_on {
                    return (Action::Unstall, Some(now));
                }
                if let Some(mut b) = busy {
                    let (pos, seen) = s.busy_seen.get();
                    let seen = if pos == b.pos {
                        seen
                    } else {
                        s.busy_seen.set((b.pos, now));
                        now
                    };
                    b.since_ns = b.since_ns.min(seen);
                    let ran = now.saturating_sub(b.since_ns);
                    // Requests queued behind a long one move elsewhere.
                    if g.requeue_after_ns > 0 && s.stalled_on.is_none() {
                        if ran >= g.requeue_after_ns {
                            return (Action::Requeue(b.pos, b.id, b.code, ran), Some(now));
                        }
                        due = Some(b.since_ns.saturating_add(g.requeue_after_ns));
                    }
                    if g.request_timeout_ns > 0 {
                        if ran >= g.request_timeout_ns {
                            let why = format!(
                                "request id {} command {} ran {} ms, past request_timeout",
                                b.id,
                                b.code,
                                ran / NS_PER_MS
                            );
                            return (
                                Action::Kill(
                                    KillReason::RequestTimeout,
                                    why,
                                    Some((b.pos, PAST_REQUEST_TIMEOUT)),
                                ),
                                None,
                            );
                        }
                        let t = b.since_ns.saturating_add(g.request_timeout_ns);
                        due = Some(due.map_or(t, |d: u64| d.min(t)));
                    }
                    if g.slow_request_ns > 0 && s.slow_logged != Some(b.pos) {
                        if ran >= g.slow_request_ns {
                            return (Action::Slow(b.pos, b.id, b.code, ran), due);
                        }
                        let t = b.since_ns.saturating_add(g.slow_request_ns);
                        due = Some(due.map_or(t, |d: u64| d.min(t)));
                    }
                }
                // A worker that is not busy, with requests in its ring, and
                // finishes none of them for requeue_after (stopped, or
                // starved of CPU) gets them moved elsewhere; one that stays
                // so past request_timeout is killed.
                if let Some(since) = s.unresponsive_since {
                    let occupancy = s.tx.ring().occupancy();
                    if occupancy == 0 {
                        return (Action::Responsive, Some(now));
                    }
                    // Reading its ring (skipping what was moved) or running
                    // a request again: it is not frozen, and that request's
                    // own deadlines above apply.
                    let reading = occupancy < s.unresponsive_occupancy.replace(occupancy);
                    if g.request_timeout_ns > 0 && busy.is_none() && !reading {
                        let deadline = since.saturating_add(g.request_timeout_ns);
                        if now >= deadline {
                            let why = format!(
                                "took none of its requests for {} ms, past request_timeout \
                                 (stopped, or starved of CPU)",
                                (now - since) / NS_PER_MS
                            );
                            return (Action::Kill(KillReason::Unresponsive, why, None), None);
                        }
                        due = Some(due.map_or(deadline, |d: u64| d.min(deadline)));
                    }
                    // (Polled at the busy rate until it reads its ring.)
                    let soon = now + BUSY_CHECK_EVERY_NS;
                    due = Some(due.map_or(soon, |d: u64| d.min(soon)));
                } else if busy.is_none() && !s.pending.is_empty() && g.requeue_after_ns > 0 {
                    let served = ctl.served();
                    // Only time this proxy ran counts: after a stall of its
                    // own (a paused VM, CPU throttling of the whole service)
                    // its workers have not had their turn yet either.
                    let stalled = gap > (g.requeue_after_ns / 2).max(3 * BUSY_CHECK_EVERY_NS);
                    match s.idle_watch.get() {
                        Some((n, since)) if n == served && !stalled => {
                            let at = since.saturating_add(g.requeue_after_ns);
                            if now >= at {
                                return (Action::Unresponsive(since), Some(now));
                            }
                            due = Some(due.map_or(at, |d: u64| d.min(at)));
                        }
                        _ => {
                            s.idle_watch.set(Some((served, now)));
                            let at = now.saturating_add(g.requeue_after_ns);
                            due = Some(due.map_or(at, |d: u64| d.min(at)));
                        }
                    }
                } else {
                    s.idle_watch.set(None);
                }
                if matches!(s.phase, Phase::Draining { .. }) {
                    if s.pending.is_empty() {
                        return (Action::Retire(pid), due);
                    }
                    if g.drain_timeout_ns > 0 {
                        let deadline = s.since_ns.saturating_add(g.drain_timeout_ns);
                        if now >= deadline {
                            let why = "still running a request drain_timeout after it was replaced"
                                .to_owned();
                            return (
                                Action::Kill(
                                    KillReason::DrainTimeout,
                                    why,
                                    ctl.busy().map(|b| (b.pos, PAST_DRAIN_TIMEOUT)),
                                ),
                                None,
                            );
                        }
                        due = Some(due.map_or(deadline, |d: u64| d.min(deadline)));
                    }
                    return (Action::None, due);
                }
                // Far more than the cap now allows (the plugin got slower,
                // or a reload lowered max_inflight): take the unstarted ones
                // back, if the queue has room for them all (taken-back
                // requests must not turn other clients away with BUSY).
                if s.stalled_on.is_none()
                    && g.run_ns.is_some()
                    && s.pending.len() > g.inflight_cap * REBALANCE_FACTOR + REBALANCE_SLACK
                    && g.waiting() + s.pending.len() <= g.max_queue
                {
                    return (Action::Rebalance, due);
                }
                if !ctl.recycle_wanted() || s.recycle_requested {
                    return (Action::None, due);
                }
                if now < s.recycle_not_before_ns {
                    return (Action::None, Some(s.recycle_not_before_ns));
                }
                // One replacement at a time per group, so a group never has
                // all its workers changing at once.
                let recycling = g
                    .slots
                    .iter()
                    .any(|&o| self.slots[o].as_ref().is_some_and(|w| w.recycle_requested));
                if recycling {
                    return (Action::None, due);
                }
                (Action::Recycle(pid), due)
            }
            Phase::Down(_) | Phase::Retiring { .. } | Phase::Killing { .. } => (Action::None, None),
        }
    }

    fn apply(&mut self, si: usize, action: Action) {
        let now = self.now_ns;
        match action {
            Action::None => {}
            Action::Ready(pid) => {
                let Some(s) = self.slot_mut(si) else { return };
                s.phase = Phase::Ready { pid };
                s.since_ns = now;
                let group = s.group;
                if let Some(g) = self.groups.get_mut(group) {
                    g.fresh_until_ns = 0;
                }
                let Some(s) = self.slot_mut(si) else { return };
                let replaced_after_us =
                    s.down_since_ns.take().map(|d| now.saturating_sub(d) / 1000);
                let replaces = s.replaces.take();
                let (name, label) = self.group_name(si);
                // The worker logs its own "worker ready" (with its plugin's
                // version); the proxy adds a line only after a death, with
                // how long the group was a worker short.
                match replaced_after_us {
                    Some(replaced_after_us) => {
                        info!(group = %name, worker = label, pid, replaced_after_us, "worker back after a death")
                    }
                    None => debug!(group = %name, worker = label, pid, "worker ready"),
                }
                let _ = self.control.send_to_master(ToMaster::WorkerReady {
                    slot: si as u32,
                    pid,
                });
                if let Some(old) = replaces
                    && let Some(phase) = self.slot_mut(old).map(|o| o.phase)
                {
                    let (name, label) = self.group_name(old);
                    match phase {
                        Phase::Ready { pid } => {
                            debug!(group = %name, worker = label, pid, "worker replaced; draining it")
                        }
                        // (A restart of the old version still in its init:
                        // it must not start serving after its replacement.)
                        Phase::Starting { pid } => {
                            info!(group = %name, worker = label, pid, "worker replaced before its init finished; stopping it")
                        }
                        _ => {}
                    }
                    self.drain_slot(old);
                }
            }
            Action::Kill(reason, why, pos) => {
                if let Some(s) = self.slot_mut(si) {
                    s.timed_out = pos;
                }
                self.kill(si, reason, &why);
            }
            Action::ControlCorrupt(what) => {
                if let Some(s) = self.slot_mut(si) {
                    s.control_corrupt = true;
                }
                self.kill(
                    si,
                    KillReason::Corrupt,
                    &format!("shared memory is corrupt ({what})"),
                );
            }
            Action::Slow(pos, id, code, ran) => {
                if let Some(s) = self.slot_mut(si) {
                    s.slow_logged = Some(pos);
                }
                let (name, label) = self.group_name(si);
                warn!(group = %name, worker = label, request_id = id, command = code, ms = ran / NS_PER_MS, "slow request");
            }
            Action::Retire(pid) => {
                if let Some(s) = self.slot_mut(si) {
                    s.phase = Phase::Retiring { pid };
                }
                let _ = self.control.send_to_master(ToMaster::Retire {
                    slot: si as u32,
                    pid,
                });
            }
            Action::Requeue(pos, id, code, ran) => {
                if let Some(s) = self.slot_mut(si) {
                    s.stalled_on = Some(pos);
                }
                let moved = self.revoke_unstarted(si);
                if moved > 0 {
                    let (name, label) = self.group_name(si);
                    info!(group = %name, worker = label, request_id = id, command = code, ms = ran / NS_PER_MS, moved,
                        "worker stuck on a request; requests queued behind it moved to other workers");
                }
            }
            Action::Rebalance => {
                let moved = self.revoke_unstarted(si);
                if moved > 0 {
                    let cap = (self.slots.get(si).and_then(Option::as_ref))
                        .and_then(|s| self.groups.get(s.group))
                        .map_or(0, |g| g.inflight_cap);
                    let (name, label) = self.group_name(si);
                    info!(group = %name, worker = label, moved, inflight_cap = cap,
                        "worker held more than its in-flight cap allows (the plugin got slower); its unstarted requests moved back to the queue");
                }
            }
            Action::Unstall => {
                if let Some(s) = self.slot_mut(si) {
                    s.stalled_on = None;
                }
            }
            Action::Unresponsive(since) => {
                let Some(s) = self.slot_mut(si) else { return };
                s.unresponsive_since = Some(since);
                s.unresponsive_occupancy.set(u64::MAX);
                s.idle_watch.set(None);
                let held = s.pending.len();
                self.stats.unresponsive(si, true);
                let moved = self.revoke_unstarted(si);
                let (name, label) = self.group_name(si);
                warn!(group = %name, worker = label, held, moved, ms = (now - since) / NS_PER_MS,
                    "worker unresponsive: it took none of its requests for requeue_after (stopped, or \
                     starved of CPU); they moved to other workers, and it gets no new ones until it \
                     reads its ring again");
            }
            Action::Responsive => {
                let Some(s) = self.slot_mut(si) else { return };
                let was = s
                    .unresponsive_since
                    .take()
                    .map_or(0, |t| now.saturating_sub(t));
                self.stats.unresponsive(si, false);
                let (name, label) = self.group_name(si);
                info!(group = %name, worker = label, ms = was / NS_PER_MS,
                    "worker responsive again; it takes requests");
            }
            Action::Recycle(pid) => {
                if let Some(s) = self.slot_mut(si) {
                    s.recycle_requested = true;
                }
                let (name, label) = self.group_name(si);
                // The worker logged why (max_requests or max_rss).
                debug!(group = %name, worker = label, pid, "worker reached its recycling limit; starting a replacement");
                let _ = self.control.send_to_master(ToMaster::Recycle {
                    slot: si as u32,
                    pid,
                });
            }
        }
    }

    /// A worker process is gone. Deliver what it answered, fail the request
    /// it was running, give the ones it never started to other workers,
    /// and reset the slot for the next worker.
    pub(crate) fn worker_exited(&mut self, si: usize, pid: i32, status: i32, restart: Restart) {
        let Some(s) = self.slots.get(si).and_then(Option::as_ref) else {
            return;
        };
        if s.phase.pid() != Some(pid) {
            debug!(slot = si, pid, "exit of a worker this slot no longer runs");
        }
        // Replies it published before dying are good, unless its memory is
        // corrupt.
        if s.readable()
            && let Err(why) = self.collect_slot(si, usize::MAX)
        {
            let (name, label) = self.group_name(si);
            warn!(group = %name, worker = label, "replies of the dead worker are unreadable: {why}");
        }
        let Some(s) = self.slots.get_mut(si).and_then(Option::as_mut) else {
            return;
        };
        // Requests pushed this turn are not published yet; publish them so
        // the read-back below sees them (the worker is dead, so nobody else
        // will).
        s.tx.publish();
        let timed_out = s.timed_out.take();
        let pending: Vec<Pending> = s.pending.drain(..).collect();
        // How far the worker got: the control block says which request it
        // was running. If it scribbled over that, assume the oldest request
        // it held was running: never hand a possibly poisonous request to
        // another worker.
        let busy = if s.control_corrupt {
            None
        } else {
            s.slot.control().busy()
        };
        let started_upto = match (s.control_corrupt, busy) {
            (true, _) => pending.first().map(|p| p.pos),
            (false, Some(b)) => Some(b.pos),
            (false, None) => None,
        };
        // Requests it never started are read back from the request ring:
        // the worker maps its data read-only, so the bytes are the proxy's.
        // They are consecutive records, read with one reader from the
        // first of them.
        let requests = s.slot.requests();
        let mut reader: Option<Consumer> = None;
        let mut requeue = Vec::new();
        let mut failed = Vec::new();
        for p in &pending {
            let started = started_upto.is_some_and(|b| p.pos <= b)
                || timed_out.is_some_and(|(t, _)| p.pos <= t);
            if !started && reader.is_none() {
                reader = Consumer::attach_at(requests.clone(), p.pos).ok();
            }
            let payload = if started {
                None
            } else {
                reader.as_mut().and_then(|r| take_back(r, p))
            };
            match payload {
                Some(payload) => requeue.push(Queued {
                    req: p.req,
                    payload,
                }),
                None => failed.push(*p),
            }
        }
        let replaces = s.replaces.take();
        let group = s.group;
        let label = s.label;
        s.slot.reset();
        if let Err(e) = s.attach() {
            error!(slot = si, "cannot re-attach after reset: {e}");
        }
        s.phase = Phase::Down(restart);
        s.since_ns = self.now_ns;
        s.corrupt = false;
        s.control_corrupt = false;
        s.recycle_requested = false;
        // The request its predecessor was stuck on died with it: a stuck
        // mark left here kept the new worker from taking requests until
        // the next idle-rate check of the slot, up to a second away.
        s.stalled_on = None;
        s.idle_watch.set(None);
        s.unresponsive_since = None;
        s.down_since_ns = (restart == Restart::Now).then_some(self.now_ns);
        self.stats.unresponsive(si, false);
        let name = self.groups[group].name.clone();

        for p in &failed {
            if let Some((_, msg)) = timed_out.filter(|&(t, _)| t == p.pos) {
                self.answer(&p.req, status::TIMEOUT, msg, Scope::Slot(si, group));
            } else {
                self.answer(
                    &p.req,
                    status::WORKER_DIED,
                    b"the worker running this request died",
                    Scope::Slot(si, group),
                );
            }
        }
        let how = describe_exit(status);
        match busy {
            Some(b) => warn!(
                group = %name, worker = label, pid, request_id = b.id, command = b.code,
                requeued = requeue.len(), failed = failed.len(), "worker died ({how}) while running a request"
            ),
            None if status != 0 || !failed.is_empty() => warn!(
                group = %name, worker = label, pid, requeued = requeue.len(), failed = failed.len(), "worker died ({how})"
            ),
            None => {
                debug!(group = %name, worker = label, pid, requeued = requeue.len(), "worker exited ({how})")
            }
        }
        // A replacement that died before taking over: its predecessor keeps
        // serving and asks again later.
        let retry_at = self.now_ns + RECYCLE_RETRY_NS;
        if let Some(old) = replaces
            && let Some(o) = self.slot_mut(old)
        {
            o.recycle_requested = false;
            o.recycle_not_before_ns = retry_at;
        }
        self.requeue_front(group, requeue);
        self.stats.pending(si, 0);
        let _ = self
            .control
            .send_to_master(ToMaster::SlotReset { slot: si as u32 });
    }
}

/// Copies out the payload of request `p`, which the worker never started,
/// from the request ring (the proxy's own bytes: the worker maps them
/// read-only), if the record at the reader is that request.
fn take_back(r: &mut Consumer, p: &Pending) -> Option<Vec<u8>> {
    match r.peek() {
        Ok(Some(rec))
            if rec.pos == p.pos && rec.meta.id == p.req.id && rec.meta.tag == p.req.tag.0 =>
        {
            let v = rec.payload.to_vec();
            r.advance();
            Some(v)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cheap_follows_the_sampled_run_time() {
        let mut g = Group::absent();
        let mut prev = 0;
        assert!(!g.cheap(), "unknown run time: spread");
        g.note_run_time(0, &mut prev);
        assert!(!g.cheap(), "0 means not sampled");
        g.note_run_time(1, &mut prev); // under 1 µs
        assert!(g.cheap());
        g.note_run_time(1 + 1000, &mut prev); // one 1 ms request (preempted?)
        assert!(g.cheap(), "one outlier does not swing it");
        g.note_run_time(1 + 1000, &mut prev);
        g.note_run_time(1 + 1000, &mut prev);
        assert!(!g.cheap(), "slow requests turn it off");
        for _ in 0..100 {
            g.note_run_time(2, &mut prev);
        }
        assert!(g.cheap(), "the average comes back down");
        for _ in 0..3 {
            g.note_run_time(u16::MAX, &mut prev); // 32.8 s and more: no overflow
        }
        assert!(!g.cheap());
    }

    #[test]
    fn a_slow_plugin_is_measured_from_its_second_sample() {
        let cfg = halfsync_config::Group::new("g", "echo");
        let mut g = Group::absent();
        g.update(&cfg);
        let (mut w1, mut w2) = (0, 0);
        // The first sample ever might be a cold start: it counts for
        // little, and does not raise the cap (1 ms / 20 µs would be 50).
        let flags = halfsync_shm::run_time_flags(300_000); // 300 ms
        g.note_run_time(flags, &mut w1);
        assert!(g.run_ns().is_some_and(|r| r <= OUTLIER_SLACK_NS));
        assert_eq!(g.inflight_cap, START_INFLIGHT);
        // Another worker's first: still an outlier against the estimate.
        g.note_run_time(flags, &mut w2);
        assert_eq!(g.inflight_cap, START_INFLIGHT);
        // A worker's second as slow: that is what the plugin costs.
        g.note_run_time(flags, &mut w1);
        assert_eq!(g.run_ns(), Some(300_000_000));
        assert!(!g.cheap());
        assert_eq!(g.inflight_cap, 1);
    }

    #[test]
    fn two_slow_in_a_row_do_not_swing_an_established_estimate() {
        let cfg = halfsync_config::Group::new("g", "echo");
        let mut g = Group::absent();
        g.update(&cfg);
        let mut prev = 0;
        for _ in 0..50 {
            g.note_run_time(1 + 50, &mut prev); // 50 µs
        }
        let before = g.run_ns().unwrap();
        // A pair of 20 ms requests in a mix of 50 µs ones: the second
        // counts in full but by an eighth (a slowdown shows), not taken as
        // the new estimate, which a slow plugin's first pair would be.
        g.note_run_time(halfsync_shm::run_time_flags(20_000), &mut prev);
        g.note_run_time(halfsync_shm::run_time_flags(20_000), &mut prev);
        let after = g.run_ns().unwrap();
        assert!(after > before && after < 4_000_000, "{before} -> {after}");
    }

    #[test]
    fn inflight_cap_follows_max_inflight_time() {
        let mut cfg = halfsync_config::Group::new("g", "echo");
        let mut g = Group::absent();
        let mut prev = 0;
        g.update(&cfg);
        assert_eq!(g.inflight_cap, START_INFLIGHT, "no estimate yet");
        g.note_run_time(1, &mut prev);
        assert_eq!(g.inflight_cap, START_INFLIGHT, "one sample: not yet");
        g.note_run_time(1, &mut prev); // under 1 µs: 1 ms / 0.5 µs, capped
        assert_eq!(g.inflight_cap, 1024);
        g.note_run_time(halfsync_shm::run_time_flags(65_000), &mut prev); // one preempted sample
        assert!(g.inflight_cap >= 200, "one outlier: {}", g.inflight_cap);
        for _ in 0..200 {
            g.note_run_time(1 + 100, &mut prev); // 100 µs
        }
        assert_eq!(g.inflight_cap, 10);
        for _ in 0..200 {
            g.note_run_time(1 + 5_000, &mut prev); // 5 ms: one at a time
        }
        assert_eq!(g.inflight_cap, 1);
        cfg.max_inflight_time = std::time::Duration::ZERO;
        g.update(&cfg);
        assert_eq!(g.inflight_cap, 1024, "off: max_inflight alone");
        cfg.max_inflight_time = std::time::Duration::from_millis(1);
        cfg.max_inflight = 8;
        g.update(&cfg);
        for _ in 0..200 {
            g.note_run_time(2, &mut prev);
        }
        assert_eq!(g.inflight_cap, 8, "max_inflight still bounds it");
    }

    #[test]
    fn a_slowdown_counts_from_its_second_sample() {
        let cfg = halfsync_config::Group::new("g", "echo");
        let mut g = Group::absent();
        let mut prev = 0;
        g.update(&cfg);
        for _ in 0..50 {
            g.note_run_time(1, &mut prev);
        }
        assert_eq!(g.inflight_cap, 1024);
        // Isolated outliers (one sample in 20) barely move it.
        let mut lowest = usize::MAX;
        for _ in 0..10 {
            g.note_run_time(1 + 20_000, &mut prev);
            lowest = lowest.min(g.inflight_cap);
            for _ in 0..19 {
                g.note_run_time(1, &mut prev);
            }
        }
        assert!(lowest >= 200, "isolated outliers: down to {lowest}");
        for _ in 0..50 {
            g.note_run_time(1, &mut prev);
        }
        // Two 20 ms samples in a row: one at a time at once.
        g.note_run_time(1 + 20_000, &mut prev);
        g.note_run_time(1 + 20_000, &mut prev);
        assert_eq!(g.inflight_cap, 1);
        // A reload keeps the estimate (and so the cap).
        g.update(&cfg);
        assert_eq!(g.inflight_cap, 1);
        assert!(g.run_ns().is_some());
    }
}
