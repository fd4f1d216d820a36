//! The proxy's event loop. One pass per turn, in this order:
//!
//! 1. announce sleep to every worker, `epoll_wait`, read the clock once;
//! 2. handle events: accept, read and frame, control messages, wake-ups;
//! 3. collect replies from every reply ring into connection buffers;
//! 4. dispatch queued requests to workers with room;
//! 5. publish each request ring once (one wake-up per batch at most);
//! 6. send every connection that has output (direct send; EPOLLOUT is
//!    armed only after EAGAIN);
//! 7. run timers (idle connections, paused listeners, shutdown).

use std::fs::File;
use std::io::{self, ErrorKind};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use halfsync_config::{Config, Origin};
use halfsync_protocol::{self as hsp, Parsed, status};
use halfsync_shm::sys as shm_sys;
use tracing::{debug, info, warn};

use crate::conn::{Conn, Conns, Tag};
use crate::control::{Channel, Received, ToMaster, ToProxy};
use crate::slots::{Group, Queued, ReqMeta, WorkerSlot};
use crate::stats::{Scope, Stats};
use crate::sys::{self, Epoll, READ, WRITE};
use crate::{ProxyError, ProxySpec, Reconfigure};

/// With requests queued, replies are collected and the queue dispatched
/// after every this many events of a loop turn, not only at its end.
const MIDTURN_DISPATCH_EVERY: usize = 4;

/// About how many request frames one loop turn reads, shared equally
/// among the connections with data (see [`read_share`]).
const TURN_FRAMES: usize = 8192;
/// The least a connection with data is given to read in a turn. With at
/// most 1,024 events a turn (`Epoll::wait`), a turn reads at most
/// max(8,192 frames, 1 MiB).
const MIN_READ_SHARE: usize = 1024;

/// Bytes each of `readable` connections may read this turn: an equal share
/// of [`TURN_FRAMES`] frames of the recent mean size (`mean_frame` bytes),
/// never more than `read_budget` and never under [`MIN_READ_SHARE`].
///
/// Why: a turn's replies go out only after all its reads. After a stall
/// with every connection's socket full (50 connections x 64 KiB is 40,000
/// requests of 80 bytes), reading everything first held the oldest
/// requests' replies back for the whole long turn, and filled the wait
/// queue faster than the workers could empty it: BUSY replies for a
/// backlog the sockets could have held (`bench/scripts/freeze_recovery.py`,
/// BENCHMARKS.md "A stall of the whole server"). An equal share keeps
/// every connection's oldest requests in the first turn. A connection
/// holding less than its share is not affected (50 connections x 16 in
/// flight of 80 bytes hold 1,280 bytes each, against a share of ~13 KiB),
/// and a few busy connections, or large frames, still get the whole
/// `read_budget`.
fn read_share(read_budget: usize, readable: usize, mean_frame: usize) -> usize {
    (TURN_FRAMES.saturating_mul(mean_frame) / readable.max(1))
        .clamp(MIN_READ_SHARE.min(read_budget), read_budget)
}

/// The mean frame size after a turn that parsed `frames` frames of `bytes`
/// bytes in all: 1/8 of the way to the turn's mean; unchanged by a turn
/// that parsed none. Never under a header.
fn next_mean_frame(mean: usize, bytes: usize, frames: usize) -> usize {
    match bytes.checked_div(frames) {
        Some(last) => ((mean * 7 + last) / 8).max(hsp::HEADER_LEN),
        None => mean,
    }
}

/// Descriptors the proxy keeps for itself beyond its slots': stdio,
/// epoll, listeners, the control channel, the stats page, the spare for
/// refusing connections (about 10), and room for what the master's
/// messages bring (a slot's two, a configuration's one).
const FD_HEADROOM: u64 = 24;

/// How long a connection closing gracefully waits for its peer to close
/// too, dropping what it still sends (see `Conn::linger_until_ns`): past
/// it, the connection is closed whatever is unread. Peers close on EOF at
/// once; this bounds what one that does not adds to a stop.
const LINGER_NS: u64 = 500 * NS_PER_MS;
/// Most reads of a lingering connection per readiness (what it sends is
/// dropped, but it gets no more of a turn than others).
const LINGER_READS: usize = 4;

/// How often the per-worker checks (deadlines, stalls, recycling) run while
/// any worker holds requests, and while none does.
pub(crate) const BUSY_CHECK_EVERY_NS: u64 = 10 * NS_PER_MS;
const IDLE_CHECK_EVERY_NS: u64 = 1000 * NS_PER_MS;

const KIND_SHIFT: u32 = 56;
const TOKEN_LISTENER: u64 = 1 << KIND_SHIFT;
const TOKEN_CONTROL: u64 = 2 << KIND_SHIFT;
pub(crate) const TOKEN_SLOT: u64 = 3 << KIND_SHIFT;
const TOKEN_CONN: u64 = 4 << KIND_SHIFT;
const INDEX_MASK: u64 = (1 << KIND_SHIFT) - 1;

/// Output buffers above this capacity are freed once empty.
const KEEP_BUF: usize = 64 << 10;

/// The slowest a client may send one frame, in bytes a second, beyond
/// `idle_timeout`: a frame may take `idle_timeout` plus a second for each
/// this many bytes of it that came (as Apache's mod_reqtimeout MinRate),
/// so a large frame on a slow link is not cut, and a trickle holding a
/// large buffer is.
const MIN_FRAME_RATE: u64 = 16 << 10;
const NS_PER_FRAME_BYTE: u64 = 1_000_000_000 / MIN_FRAME_RATE;
/// Connections accepted per listener per loop turn.
const ACCEPT_BATCH: usize = 128;
pub(crate) const NS_PER_MS: u64 = 1_000_000;

/// Runs the proxy until it has drained after a shutdown, or the master is
/// gone.
pub fn run(spec: ProxySpec) -> Result<(), ProxyError> {
    let mut proxy = Proxy::new(spec)?;
    proxy.run()
}

pub(crate) struct Proxy {
    pub(crate) config: Config,
    /// The text of the last configuration a reload sent (to log a new one
    /// once, not each time only what it holds changed).
    config_text: Option<String>,
    pub(crate) epoll: Epoll,
    /// Listening sockets with their stable ids.
    pub(crate) listeners: Vec<(u32, TcpListener)>,
    pub(crate) listeners_paused_until: Option<u64>,
    pub(crate) control: Channel,
    pub(crate) conns: Conns,
    pub(crate) slots: Vec<Option<WorkerSlot>>,
    /// Groups by stable id (ids never configured hold an empty, retired
    /// placeholder).
    pub(crate) groups: Vec<Group>,
    /// Group id per command number.
    pub(crate) routes: Vec<Option<u16>>,
    /// Per command number: a reload is moving it to a group whose workers
    /// it is replacing, so its requests wait in that group's `held` queue
    /// (see [`crate::Reconfigure::hold`]). `holding` says whether any is.
    pub(crate) held: Vec<bool>,
    pub(crate) holding: bool,
    pub(crate) scratch: Vec<u8>,
    /// Bytes each connection may read this turn ([`read_share`]).
    pub(crate) read_share: usize,
    /// Request frames parsed this turn, and their bytes.
    pub(crate) turn_frames: usize,
    pub(crate) turn_bytes: usize,
    /// Mean request frame size over recent turns (bytes, 1/8 per turn).
    pub(crate) mean_frame: usize,
    pub(crate) events: Vec<sys::Event>,
    pub(crate) now_ns: u64,
    /// Nearest time a worker check is due (request deadlines and such).
    pub(crate) next_check_ns: Option<u64>,
    /// Something happened that the worker checks must see this turn.
    pub(crate) check_due: bool,
    /// When the worker checks last ran (a long gap means this proxy did
    /// not run: see `slot_action`).
    pub(crate) last_check_ns: u64,
    /// The slot the previous request of the frames being parsed went to
    /// (see `pick_slot`): a connection's batch stays on one worker.
    pub(crate) batch_slot: Option<usize>,
    /// While the batch's worker holds fewer than this (pending plus
    /// sleeper penalty), it takes the batch's next request.
    pub(crate) batch_until: usize,
    pub(crate) next_sweep_ns: u64,
    /// Connections closing gracefully, by deadline (see
    /// `Conn::linger_until_ns`; deadlines come in order).
    lingering: std::collections::VecDeque<(u64, Tag)>,
    /// A buffer over `KEEP_BUF` was freed since the last sweep (which then
    /// hands free memory back to the system).
    freed_large: bool,
    pub(crate) draining: bool,
    pub(crate) refused: u64,
    pub(crate) stats: Stats,
    /// Benchmark-only switches (see `tuning.rs`).
    pub(crate) tuning: crate::tuning::Tuning,
    /// A spare descriptor, given up to accept-and-close when out of fds.
    reserve_fd: Option<std::fs::File>,
    /// This process's open-file limit, if known: client connections stop
    /// short of it (`fd_cap`), so that the master's messages can always
    /// bring their descriptors (a worker's slot, a configuration).
    nofile: Option<u64>,
    refuse_logged_ns: u64,
    /// Benchmark baseline: plugins called in the loop, by group id.
    inline: Vec<Option<halfsync_worker::Instance>>,
    /// Their reply buffer (max_frame - 12 bytes), allocated once.
    inline_out: Vec<u8>,
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> ProxyError {
    move |source| ProxyError::Io { what, source }
}

fn take_fd(fd: i32) -> Result<OwnedFd, ProxyError> {
    sys::inherited(fd).ok_or_else(|| ProxyError::Spec(format!("inherited fd {fd} is not open")))
}

impl Proxy {
    fn new(spec: ProxySpec) -> Result<Proxy, ProxyError> {
        let nofile = match sys::raise_nofile() {
            Ok((from, to)) if from != to => {
                info!(from, to, "raised the open-file limit to the hard limit");
                Some(to)
            }
            Ok((n, _)) => {
                info!(limit = n, "open-file limit");
                Some(n)
            }
            Err(e) => {
                warn!("cannot raise the open-file limit: {e}");
                None
            }
        };
        let config = Config::from_toml(&spec.config, Origin::Text)?;
        // As nginx warns when worker_connections exceeds the fd limit. The
        // proxy's own descriptors (listeners, epoll, control, two or three
        // per worker) come out of the same limit: a margin of 64.
        if let Some(limit) = nofile
            && u64::from(config.server.max_connections) + 64 > limit
        {
            warn!(
                max_connections = config.server.max_connections,
                open_file_limit = limit,
                "max_connections cannot be reached under this proxy's open-file limit (the \
                 proxy needs some descriptors for itself): past the limit connections are \
                 refused (out of file descriptors); raise the hard limit (ulimit -Hn, \
                 systemd LimitNOFILE=) or lower max_connections"
            );
        }
        if spec.group_ids.len() != config.groups.len() {
            return Err(ProxyError::Spec("group ids do not match the groups".into()));
        }
        let config_groups = config.clone();
        let epoll = Epoll::new(1024).map_err(io_err("epoll_create1"))?;
        let control = Channel::from_fd(take_fd(spec.control_fd)?);
        epoll
            .add(control.fd().as_raw_fd(), READ, TOKEN_CONTROL)
            .map_err(io_err("epoll_ctl(control)"))?;

        let stats =
            Stats::open(File::from(take_fd(spec.stats_fd)?)).map_err(io_err("stats page"))?;
        stats.reset_gauges();
        let mut listeners = Vec::new();
        for &(id, fd) in &spec.listeners {
            let l = TcpListener::from(take_fd(fd)?);
            l.set_nonblocking(true).map_err(io_err("listener"))?;
            epoll
                .add(l.as_raw_fd(), READ, TOKEN_LISTENER | id as u64)
                .map_err(io_err("epoll_ctl(listener)"))?;
            listeners.push((id, l));
        }

        let scratch = vec![0u8; config.server.read_budget.clamp(4096, 1 << 20) as usize];
        info!(listeners = listeners.len(), "proxy started");
        Ok(Proxy {
            config_text: None,
            config,
            epoll,
            listeners,
            listeners_paused_until: None,
            control,
            conns: Conns {
                slab: Vec::new(),
                generations: Vec::new(),
                free: Vec::new(),
                live: 0,
                dirty: Vec::new(),
            },
            slots: Vec::new(),
            groups: Vec::new(),
            routes: vec![None; 1 << 16],
            held: vec![false; 1 << 16],
            holding: false,
            read_share: scratch.len(),
            scratch,
            turn_frames: 0,
            turn_bytes: 0,
            mean_frame: hsp::HEADER_LEN,
            events: Vec::with_capacity(1024),
            now_ns: shm_sys::monotonic_ns(),
            next_check_ns: None,
            check_due: true,
            last_check_ns: 0,
            batch_slot: None,
            batch_until: 0,
            next_sweep_ns: 0,
            lingering: std::collections::VecDeque::new(),
            freed_large: false,
            draining: false,
            refused: 0,
            stats,
            tuning: crate::tuning::Tuning::from_env(),
            reserve_fd: std::fs::File::open("/dev/null").ok(),
            nofile,
            refuse_logged_ns: 0,
            inline: Vec::new(),
            inline_out: Vec::new(),
        })
        .map(|mut p| {
            p.apply_config(config_groups, &spec.group_ids, &[]);
            p
        })
        .and_then(|mut p| {
            p.load_inline(&spec.inline)?;
            Ok(p)
        })
    }

    /// Benchmark baseline: loads and initialises each group's plugin here.
    fn load_inline(
        &mut self,
        plugins: &[(u32, std::path::PathBuf, String)],
    ) -> Result<(), ProxyError> {
        for (id, path, config) in plugins {
            let plugin =
                halfsync_worker::Plugin::load(path).map_err(|e| ProxyError::Spec(e.to_string()))?;
            // The proxy plays the group's one worker, number 0.
            let group = self
                .groups
                .get(*id as usize)
                .map_or("", |g| g.name.as_str());
            let instance = plugin
                .init_as(config, group, 0)
                .map_err(|e| ProxyError::Spec(e.to_string()))?;
            let id = *id as usize;
            if self.inline.len() <= id {
                self.inline.resize_with(id + 1, || None);
            }
            self.inline[id] = Some(instance);
            warn!(plugin = %path.display(), "inline benchmark mode: plugin runs inside the proxy, without isolation");
        }
        if !plugins.is_empty() {
            self.inline_out = vec![0u8; (self.config.server.max_frame - hsp::MIN_LENGTH) as usize];
        }
        Ok(())
    }

    fn run(&mut self) -> Result<(), ProxyError> {
        loop {
            let timeout = self.prepare_sleep();
            self.events.clear();
            let raw = self.epoll.wait(timeout).map_err(io_err("epoll_wait"))?;
            self.events.extend(raw.iter().map(sys::event));
            self.end_sleep();
            self.now_ns = shm_sys::monotonic_ns();
            self.share_reads();

            for i in 0..self.events.len() {
                // A long turn with requests waiting in a queue: hand the
                // workers more mid-turn, instead of leaving them idle until
                // the turn ends once their `inflight_cap` are done.
                if i > 0
                    && i % MIDTURN_DISPATCH_EVERY == 0
                    && !self.tuning.no_midturn_dispatch
                    && self.groups.iter().any(|g| !g.queue.is_empty())
                {
                    self.collect_replies();
                    self.dispatch_queued();
                    self.publish_requests();
                }
                let ev = self.events[i];
                let index = (ev.token & INDEX_MASK) as usize;
                match ev.token & !INDEX_MASK {
                    TOKEN_LISTENER => self.accept(index as u32),
                    TOKEN_CONTROL if !self.read_control()? => {
                        info!("master is gone; proxy exiting");
                        return Ok(());
                    }
                    TOKEN_SLOT => {
                        // The worker published replies (collected below), or
                        // finished its init.
                        if let Some(Some(s)) = self.slots.get(index) {
                            let _ = shm_sys::eventfd_drain(s.eventfd.as_raw_fd());
                            self.check_due |=
                                matches!(s.phase, crate::slots::Phase::Starting { .. });
                        }
                    }
                    TOKEN_CONN => {
                        if ev.writable() {
                            if self.tuning.no_direct_send {
                                self.flush(index);
                            } else {
                                self.conns.mark_dirty(index);
                            }
                        }
                        if ev.readable() {
                            self.read_conn(index);
                        }
                    }
                    _ => {}
                }
            }

            // Worker checks (readiness, deadlines, stalls, recycling,
            // control-block sanity) read memory the workers write: not on
            // every turn, only when something happened or is due.
            if self.check_due || self.next_check_ns.is_none_or(|t| self.now_ns >= t) {
                self.check_due = false;
                let next = self.check_slots();
                // With requests in flight, look again within 10 ms
                // (`push_to_slot` brings the next check forward when an idle
                // worker gets a request).
                let busy = self.slots.iter().flatten().any(|s| !s.pending.is_empty());
                let cap = self.now_ns
                    + if busy {
                        BUSY_CHECK_EVERY_NS
                    } else {
                        IDLE_CHECK_EVERY_NS
                    };
                self.next_check_ns = Some(next.map_or(cap, |n| n.min(cap)));
            }
            self.collect_replies();
            self.dispatch_queued();
            self.publish_requests();
            self.flush_dirty();
            self.run_timers();

            if self.draining && self.conns.live == 0 && self.queued_total() == 0 {
                info!(refused_connections = self.refused, "proxy drained");
                let _ = self.control.send_to_master(ToMaster::Drained);
                return Ok(());
            }
        }
    }

    /// The most client connections the open-file limit allows, leaving
    /// [`FD_HEADROOM`] and two per worker slot (its eventfd and memfd) to
    /// the proxy itself.
    fn fd_cap(&self) -> usize {
        match self.nofile {
            Some(limit) => {
                let own = FD_HEADROOM + 2 * self.slots.len() as u64;
                limit.saturating_sub(own) as usize
            }
            None => usize::MAX,
        }
    }

    fn publish_requests(&mut self) {
        for s in self.slots.iter_mut().flatten() {
            if s.has_unpublished() {
                s.publish();
            }
        }
    }

    fn queued_total(&self) -> usize {
        self.groups.iter().map(Group::waiting).sum()
    }

    /// Tells every worker we are about to sleep, so it wakes us when it
    /// publishes; returns how long epoll may wait.
    fn prepare_sleep(&mut self) -> Option<Duration> {
        // Work already waiting: poll without announcing sleep (no fences,
        // no wake-ups the workers would have to pay for).
        if self.check_due
            || !self.conns.dirty.is_empty()
            || self.slots.iter_mut().flatten().any(|s| s.has_replies())
        {
            return Some(Duration::ZERO);
        }
        let mut busy = false;
        for s in self.slots.iter_mut().flatten() {
            // Replies arrived meanwhile (or a corrupt ring): handle them now.
            busy |= !s.prepare_sleep();
        }
        if busy {
            return Some(Duration::ZERO);
        }
        let mut until = self.now_ns + 1000 * NS_PER_MS;
        if let Some(t) = self.next_check_ns {
            until = until.min(t);
        }
        if self
            .slots
            .iter()
            .flatten()
            .any(|s| matches!(s.phase, crate::slots::Phase::Starting { .. }))
        {
            // The worker signals its eventfd when ready; poll as a backstop.
            until = until.min(self.now_ns + 50 * NS_PER_MS);
        }
        if let Some(t) = self.listeners_paused_until {
            until = until.min(t);
        }
        if let Some(&(t, _)) = self.lingering.front() {
            until = until.min(t);
        }
        for g in &self.groups {
            for t in [g.queue.oldest_ns(), g.held.oldest_ns()]
                .into_iter()
                .flatten()
            {
                if g.queue_timeout_ns > 0 {
                    until = until.min(t.saturating_add(g.queue_timeout_ns).saturating_add(1));
                }
            }
        }
        // Round up to whole milliseconds: epoll cannot wait for less.
        let wait = until.saturating_sub(self.now_ns);
        Some(Duration::from_millis(wait.div_ceil(NS_PER_MS)))
    }

    fn end_sleep(&mut self) {
        for s in self.slots.iter_mut().flatten() {
            s.end_sleep();
        }
    }

    // ---- control ----

    /// Handles control messages; false if the master is gone.
    fn read_control(&mut self) -> Result<bool, ProxyError> {
        loop {
            match self.control.recv_from_master() {
                Ok(Received::Msg((m, fds))) => self.on_control(m, fds),
                Ok(Received::Empty) => return Ok(true),
                Ok(Received::Closed) => return Ok(false),
                Err(e) if e.kind() == ErrorKind::InvalidData => {
                    warn!("control channel: {e}");
                }
                Err(e) => {
                    return Err(ProxyError::Io {
                        what: "control channel",
                        source: e,
                    });
                }
            }
        }
    }

    fn on_control(&mut self, m: ToProxy, fds: Vec<OwnedFd>) {
        self.check_due = true;
        match m {
            ToProxy::AddSlot { slot, group, label } => {
                self.add_slot(slot as usize, group as usize, label, fds)
            }
            ToProxy::WorkerStarted {
                slot,
                pid,
                replaces,
                probation,
                label,
            } => self.worker_started(
                slot as usize,
                pid,
                replaces.map(|r| r as usize),
                probation,
                label,
            ),
            ToProxy::WorkerExited {
                slot,
                pid,
                status,
                restart,
            } => self.worker_exited(slot as usize, pid, status, restart),
            ToProxy::Shutdown => self.start_drain(),
            ToProxy::Drain { slot } => self.drain_slot(slot as usize),
            ToProxy::Reconfigure { len } => self.reconfigure(len as usize, fds),
            ToProxy::AddListener { id } => self.add_listener(id, fds),
            ToProxy::RemoveListener { id } => {
                if let Some(i) = self.listeners.iter().position(|(l, _)| *l == id) {
                    let (_, l) = self.listeners.remove(i);
                    let _ = self.epoll.delete(l.as_raw_fd());
                    info!(listener = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "stopped listening");
                }
            }
        }
    }

    /// Applies a configuration: server settings at once; groups by stable
    /// id (new ones appear, changed ones take their new limits, missing
    /// ones stop getting requests while their workers drain); routes.
    pub(crate) fn apply_config(&mut self, config: Config, ids: &[u32], hold: &[u32]) {
        let mut keep = vec![false; self.groups.len()];
        for (g, &id) in config.groups.iter().zip(ids) {
            let id = id as usize;
            if id >= crate::stats::MAX_GROUPS {
                warn!(group = %g.name, id, "group id out of range; ignored");
                continue;
            }
            if self.groups.len() <= id {
                self.groups.resize_with(id + 1, Group::absent);
                keep.resize(id + 1, false);
            }
            keep[id] = true;
            // New to this proxy (a reload added it): see `fresh_until_ns`.
            let fresh = self.groups[id].name.is_empty();
            self.groups[id].update(g);
            if fresh && self.now_ns > 0 {
                let g = &mut self.groups[id];
                g.fresh_until_ns = self.now_ns.saturating_add(g.init_timeout_ns.max(1));
            }
            self.groups[id].queue.fifo = self.tuning.fifo_queue;
            self.groups[id].held.fifo = self.tuning.fifo_queue;
            let g = &self.groups[id];
            self.stats.inflight(id, g.inflight_cap, g.run_ns());
        }
        for (id, g) in self.groups.iter_mut().enumerate() {
            if !keep[id] && !g.retired {
                info!(group = %g.name, "group removed from the configuration; draining it");
                g.retired = true;
            }
        }
        let mut routes = vec![None; 1 << 16];
        if let Some(d) = config.groups.iter().position(|g| g.is_default_route())
            && (ids[d] as usize) < crate::stats::MAX_GROUPS
        {
            let id = ids[d] as u16;
            routes.iter_mut().for_each(|r| *r = Some(id));
        }
        // (A group ignored above gets no route: a request for it must not
        // index past the groups.)
        let known = |id: u32| (id as usize) < crate::stats::MAX_GROUPS;
        for (g, &id) in config.groups.iter().zip(ids) {
            if !known(id) {
                continue;
            }
            for &c in &g.commands {
                routes[c as usize] = Some(id as u16);
            }
        }
        self.set_routes(routes, hold);
        let budget = config.server.read_budget.clamp(4096, 1 << 20) as usize;
        if self.scratch.len() != budget {
            self.scratch = vec![0u8; budget];
        }
        self.config = config;
    }

    /// Takes new routes. A command that moves to a group in `hold` (or
    /// was moving there and still is) is held; requests already waiting
    /// follow their command's new route, and held ones are released to
    /// their group's queue once it leaves `hold`.
    fn set_routes(&mut self, routes: Vec<Option<u16>>, hold: &[u32]) {
        let old = std::mem::replace(&mut self.routes, routes);
        let mut changed = false;
        let mut holding = false;
        for ((held, new), old) in self.held.iter_mut().zip(&self.routes).zip(&old) {
            let now =
                new.is_some_and(|g| hold.contains(&u32::from(g)) && (*held || *old != Some(g)));
            changed |= now != *held || old != new;
            holding |= now;
            *held = now;
        }
        self.holding = holding;
        if changed {
            self.rehome_waiting();
        }
    }

    /// Moves every waiting request whose command's route or hold changed
    /// to where it now belongs (in arrival order per connection), or
    /// answers NO_ROUTE if no group serves it any more. Requests already
    /// admitted are not refused for space.
    pub(crate) fn rehome_waiting(&mut self) {
        let mut moving = Vec::new();
        for g in 0..self.groups.len() {
            for (held, q) in [
                (false, self.groups[g].queue.take_all()),
                (true, self.groups[g].held.take_all()),
            ] {
                for r in q {
                    if self.waits_in(g, r.req.code, held) {
                        let group = &mut self.groups[g];
                        if held {
                            group.held.push_back(r);
                        } else {
                            group.queue.push_back(r);
                        }
                    } else {
                        moving.push(r);
                    }
                }
            }
        }
        self.rehome(moving, false);
        for g in 0..self.groups.len() {
            self.stats.queued(g, self.groups[g].waiting());
        }
    }

    /// Whether a request for command `code` waits in group `g`'s queue
    /// (`held` false) or its held queue (`held` true) under the current
    /// routes.
    pub(crate) fn waits_in(&self, g: usize, code: u16, held: bool) -> bool {
        self.routes[code as usize] == Some(g as u16) && self.held[code as usize] == held
    }

    /// Queues waiting requests where their commands are served now (that
    /// group's queue or `held` one; at the front, in their order, for
    /// requests taken back from a worker, which are older than any queued
    /// request of their connection), or answers NO_ROUTE.
    pub(crate) fn rehome(&mut self, reqs: Vec<Queued>, front: bool) {
        // (group, held) -> requests, in order.
        let mut to: Vec<((usize, bool), Vec<Queued>)> = Vec::new();
        for r in reqs {
            let c = r.req.code as usize;
            let Some(g) = self.routes[c].map(usize::from) else {
                let msg = format!("no worker group serves command {c}");
                self.answer(&r.req, status::NO_ROUTE, msg.as_bytes(), Scope::Global);
                continue;
            };
            let key = (g, self.held[c]);
            match to.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push(r),
                None => to.push((key, vec![r])),
            }
        }
        for ((g, held), v) in to {
            let group = &mut self.groups[g];
            let q = if held {
                &mut group.held
            } else {
                &mut group.queue
            };
            if front {
                q.push_front_all(v);
            } else {
                v.into_iter().for_each(|r| q.push_back(r));
            }
            self.stats.queued(g, group.waiting());
        }
    }

    fn reconfigure(&mut self, len: usize, fds: Vec<OwnedFd>) {
        use std::os::unix::fs::FileExt;
        let Some(fd) = fds.into_iter().next() else {
            warn!("reconfigure without its memfd; ignored");
            return;
        };
        let mut buf = vec![0u8; len];
        if let Err(e) = File::from(fd).read_exact_at(&mut buf, 0) {
            warn!("reconfigure: cannot read the new configuration: {e}");
            return;
        }
        let parsed = String::from_utf8(buf)
            .map_err(|e| e.to_string())
            .and_then(|t| toml::from_str::<Reconfigure>(&t).map_err(|e| e.to_string()))
            .and_then(|r| {
                Config::from_toml(&r.config, Origin::Text)
                    .map(|c| (c, r.group_ids, r.hold, r.config))
                    .map_err(|e| e.to_string())
            });
        match parsed {
            Ok((config, ids, hold, text)) if ids.len() == config.groups.len() => {
                self.apply_config(config, &ids, &hold);
                // A reload sends the configuration again each time what
                // it holds changes: one line per new configuration.
                if self.config_text.as_deref() == Some(text.as_str()) {
                    debug!(?hold, "held commands updated");
                } else {
                    info!("configuration reloaded");
                    self.config_text = Some(text);
                }
            }
            Ok(_) => warn!("reconfigure: group ids do not match the groups; ignored"),
            Err(e) => warn!("reconfigure: {e}; ignored"),
        }
    }

    fn add_listener(&mut self, id: u32, fds: Vec<OwnedFd>) {
        let Some(fd) = fds.into_iter().next() else {
            warn!(id, "AddListener without its socket; ignored");
            return;
        };
        let l = TcpListener::from(fd);
        if let Err(e) = l.set_nonblocking(true) {
            warn!("listener: {e}");
            return;
        }
        if !self.draining
            && self.listeners_paused_until.is_none()
            && let Err(e) = self
                .epoll
                .add(l.as_raw_fd(), READ, TOKEN_LISTENER | id as u64)
        {
            warn!("epoll_ctl(listener): {e}");
            return;
        }
        info!(listener = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "listening");
        self.listeners.push((id, l));
    }

    fn start_drain(&mut self) {
        if self.draining {
            return;
        }
        info!(
            connections = self.conns.live,
            "shutting down: no new connections; finishing in-flight requests"
        );
        self.draining = true;
        // Held requests wait for a version that will not come now (a stop
        // ends the reload): they were never started, so they get
        // SHUTTING_DOWN like requests read from now on.
        if self.holding {
            self.holding = false;
            self.held.iter_mut().for_each(|h| *h = false);
            for g in 0..self.groups.len() {
                for r in self.groups[g].held.take_all() {
                    self.answer(
                        &r.req,
                        status::SHUTTING_DOWN,
                        b"server is shutting down",
                        Scope::Group(g),
                    );
                }
                self.stats.queued(g, self.groups[g].waiting());
            }
        }
        for (_, l) in self.listeners.drain(..) {
            let _ = self.epoll.delete(l.as_raw_fd());
        }
        // What the clients sent already is read and answered
        // SHUTTING_DOWN before their connections close (lingering), also
        // on a connection whose reading is paused behind its replies (read
        // once they have gone); a connection waiting for replies closes
        // once they are sent.
        for c in self.conns.slab.iter_mut().flatten() {
            c.drain_owed = sys::readable_bytes(c.stream.as_raw_fd());
        }
        for i in 0..self.conns.slab.len() {
            self.read_conn(i);
        }
        self.flush_dirty();
    }

    // ---- connections ----

    fn accept(&mut self, id: u32) {
        for _ in 0..ACCEPT_BATCH {
            let Some((_, l)) = self.listeners.iter().find(|(l, _)| *l == id) else {
                return;
            };
            let accepted = if self.tuning.plain_accept {
                sys::accept_plain(l.as_raw_fd())
            } else {
                sys::accept4(l.as_raw_fd())
            };
            match accepted {
                Ok(Some(stream)) => {
                    if self.conns.live >= self.config.server.max_connections as usize {
                        self.refuse("max_connections reached");
                        continue;
                    }
                    if self.conns.live >= self.fd_cap() {
                        // Not the last descriptors: the master's messages
                        // need theirs (a client filling them left a reload
                        // waiting for ever on a worker the proxy never got).
                        self.refuse("out of file descriptors");
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let fd = stream.as_raw_fd();
                    let i = self.conns.insert(Conn {
                        stream,
                        inbuf: Vec::new(),
                        frame_since_ns: 0,
                        out: Vec::new(),
                        out_pos: 0,
                        inflight: 0,
                        inflight_bytes: 0,
                        last_active_ns: self.now_ns,
                        stalled_since_ns: 0,
                        unacked: 0,
                        interest: READ,
                        eof: false,
                        closing: false,
                        dirty: false,
                        linger_until_ns: 0,
                        drain_owed: 0,
                    });
                    self.stats.accepted();
                    self.stats.connections(self.conns.live);
                    if let Err(e) = self.epoll.add(fd, READ, TOKEN_CONN | i as u64) {
                        warn!("epoll_ctl(add conn): {e}");
                        self.close(i);
                    }
                }
                Ok(None) => return,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) =>
                {
                    // Out of descriptors: give up the spare one, accept the
                    // connection and close it at once (the client sees a
                    // clean close, not a hang), take the spare back. If even
                    // that fails, stop accepting for a moment rather than
                    // spin on a listener that stays readable.
                    let _ = e;
                    self.reserve_fd = None;
                    // Closed (dropped) before the spare is taken back.
                    let refused = sys::accept4(l.as_raw_fd()).map(|s| s.is_some());
                    self.reserve_fd = std::fs::File::open("/dev/null").ok();
                    match refused {
                        Ok(true) => self.refuse("out of file descriptors"),
                        Ok(false) => return,
                        Err(_) => {
                            self.refuse("out of file descriptors");
                            self.pause_listeners();
                            return;
                        }
                    }
                }
                Err(e) => {
                    // ECONNABORTED and friends: that client is gone.
                    debug!("accept: {e}");
                }
            }
        }
    }

    /// The time for a request or reply: the loop turn's clock reading
    /// (benchmark switch `clock_per_event`: a fresh one).
    pub(crate) fn clock(&self) -> u64 {
        if self.tuning.clock_per_event {
            shm_sys::monotonic_ns()
        } else {
            self.now_ns
        }
    }

    /// Counts a refused connection; logs at most once a second.
    fn refuse(&mut self, why: &str) {
        self.refused += 1;
        self.stats.refused();
        if self.now_ns >= self.refuse_logged_ns + 1000 * NS_PER_MS {
            self.refuse_logged_ns = self.now_ns;
            warn!(refused_total = self.refused, "{why}: refusing connections");
        }
    }

    fn pause_listeners(&mut self) {
        for (_, l) in &self.listeners {
            let _ = self.epoll.delete(l.as_raw_fd());
        }
        self.listeners_paused_until = Some(self.now_ns + 100 * NS_PER_MS);
    }

    /// Updates the mean frame size from the last turn and sets this turn's
    /// [`read_share`] from its readable connections.
    fn share_reads(&mut self) {
        self.mean_frame = next_mean_frame(self.mean_frame, self.turn_bytes, self.turn_frames);
        self.turn_frames = 0;
        self.turn_bytes = 0;
        let readable = self
            .events
            .iter()
            .filter(|e| e.token & !INDEX_MASK == TOKEN_CONN && e.has_input())
            .count();
        self.read_share = read_share(self.scratch.len(), readable, self.mean_frame);
    }

    fn read_conn(&mut self, i: usize) {
        if self
            .conns
            .slab
            .get(i)
            .and_then(Option::as_ref)
            .is_some_and(|c| c.linger_until_ns != 0)
        {
            return self.read_and_drop(i);
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let cap = scratch.len();
        let budget = if self.tuning.no_read_budget {
            usize::MAX
        } else {
            self.read_share.min(cap)
        };
        let mut total = 0;
        let mut failed = false;
        while total < budget {
            let Some(Some(c)) = self.conns.slab.get_mut(i) else {
                break;
            };
            if c.interest & READ == 0 {
                break;
            }
            let want = cap.min(budget - total);
            match sys::recv(c.stream.as_raw_fd(), &mut scratch[..want]) {
                Ok(0) => {
                    c.eof = true;
                    break;
                }
                Ok(n) => {
                    total += n;
                    c.last_active_ns = self.now_ns;
                    c.drain_owed = c.drain_owed.saturating_sub(n as u64);
                    self.ingest(i, &scratch[..n]);
                    if n < want {
                        // Short read: the socket is drained. Level-triggered
                        // epoll says so again if more arrives; no EAGAIN
                        // round trip to find out.
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("recv: {e}");
                    failed = true;
                    break;
                }
            }
        }
        self.scratch = scratch;
        if failed {
            self.close(i);
        } else {
            self.maybe_close(i);
            self.update_interest(i);
        }
    }

    /// Frames bytes read from connection `i`.
    fn ingest(&mut self, i: usize, data: &[u8]) {
        let Some(Some(c)) = self.conns.slab.get_mut(i) else {
            return;
        };
        if c.inbuf.is_empty() {
            // Common case: whole frames straight from the read buffer.
            let (used, need) = self.parse_frames(i, data);
            if let Some(Some(c)) = self.conns.slab.get_mut(i)
                && !c.closing
                && used < data.len()
            {
                // Room for the whole frame at once (`need` is what is
                // still to come).
                c.inbuf.reserve_exact(data.len() - used + need);
                c.inbuf.extend_from_slice(&data[used..]);
                c.frame_since_ns = self.now_ns;
            }
        } else {
            c.inbuf.extend_from_slice(data);
            let buf = std::mem::take(&mut c.inbuf);
            let (used, need) = self.parse_frames(i, &buf);
            if let Some(Some(c)) = self.conns.slab.get_mut(i) {
                let mut buf = buf;
                if c.closing {
                    buf = Vec::new();
                } else if used > 0 {
                    buf.drain(..used);
                    // What is left, if anything, is a new frame.
                    c.frame_since_ns = self.now_ns;
                    // A large frame's buffer is not kept for the small ones
                    // after it (an idle connection would hold max_frame).
                    if buf.capacity() > KEEP_BUF && buf.len() + need <= KEEP_BUF / 4 {
                        if buf.is_empty() {
                            buf = Vec::new();
                        } else {
                            buf.shrink_to(KEEP_BUF);
                        }
                        self.freed_large = true;
                    }
                }
                if !buf.is_empty() {
                    // Room for the rest of the frame it holds.
                    buf.reserve_exact(need);
                }
                c.inbuf = buf;
            }
        }
    }

    /// Handles every whole frame at the start of `buf`; returns the bytes
    /// used and, if a frame is left incomplete, how many more it needs
    /// (else 0).
    fn parse_frames(&mut self, i: usize, buf: &[u8]) -> (usize, usize) {
        let max_frame = self.config.server.max_frame;
        self.batch_slot = None;
        let mut off = 0;
        loop {
            match hsp::parse(&buf[off..], max_frame) {
                Parsed::Frame(h, n) => {
                    self.turn_frames += 1;
                    self.turn_bytes += n;
                    self.on_request(i, h, &buf[off + hsp::HEADER_LEN..off + n]);
                    off += n;
                }
                Parsed::Incomplete(need) => {
                    self.batch_slot = None;
                    return (off, need.min(max_frame as usize + 4));
                }
                Parsed::Bad(e, id) => {
                    self.batch_slot = None;
                    debug!(conn = i, "bad frame: {e}");
                    self.stats.reply(Scope::Global, status::BAD_REQUEST);
                    if let Some(Some(c)) = self.conns.slab.get_mut(i) {
                        let msg = format!("{e}; closing the connection");
                        c.push_reply(id.unwrap_or(0), status::BAD_REQUEST, msg.as_bytes());
                        c.closing = true;
                        self.conns.mark_dirty(i);
                    }
                    return (buf.len(), 0);
                }
            }
        }
    }

    fn reply_now(&mut self, i: usize, id: u64, code: u16, msg: &[u8], scope: Scope) {
        self.stats.reply(scope, code);
        if let Some(Some(c)) = self.conns.slab.get_mut(i) {
            c.push_reply(id, code, msg);
            self.conns.mark_dirty(i);
        }
    }

    fn on_request(&mut self, i: usize, h: hsp::Header, payload: &[u8]) {
        if self.draining {
            let scope =
                self.routes[h.code as usize].map_or(Scope::Global, |g| Scope::Group(g.into()));
            self.reply_now(
                i,
                h.id,
                status::SHUTTING_DOWN,
                b"server is shutting down",
                scope,
            );
            return;
        }
        let Some(g) = self.routes[h.code as usize].map(usize::from) else {
            let msg = format!("no worker group serves command {}", h.code);
            self.reply_now(i, h.id, status::NO_ROUTE, msg.as_bytes(), Scope::Global);
            return;
        };
        let req = ReqMeta {
            tag: self.conns.tag(i),
            id: h.id,
            code: h.code,
            flags: h.flags,
            enqueued_ns: self.clock(),
            len: payload.len() as u32,
        };
        if let Some(Some(instance)) = self.inline.get_mut(g) {
            // Benchmark baseline: the plugin right here, no worker hop.
            let (code, len) = instance.handle(h.id, h.code, h.flags, payload, &mut self.inline_out);
            self.stats.reply(Scope::Group(g), code);
            if let Some(Some(c)) = self.conns.slab.get_mut(i) {
                c.push_reply(h.id, code, &self.inline_out[..len]);
                c.last_active_ns = self.now_ns;
                self.conns.mark_dirty(i);
            }
            return;
        }
        if !self.group_live(g) {
            self.reply_now(
                i,
                h.id,
                status::BUSY,
                b"no worker is running for this command",
                Scope::Group(g),
            );
            return;
        }
        // A command a reload is moving here waits for the new version.
        let held = self.holding && self.held[h.code as usize];
        let queued = held || !self.groups[g].queue.is_empty();
        if !queued
            && let Some(si) = self.pick_slot(g, payload.len())
            && self.push_to_slot(si, req, payload)
        {
            self.batch_slot = Some(si);
            self.count_inflight(i, payload.len());
            return;
        }
        let group = &mut self.groups[g];
        if group.waiting() < group.max_queue {
            if held {
                group.held.push_copy(req, payload);
            } else {
                group.queue.push_copy(req, payload);
            }
            self.stats.queued(g, group.waiting());
            self.count_inflight(i, payload.len());
            return;
        }
        self.reply_now(
            i,
            h.id,
            status::BUSY,
            b"all workers busy and the wait queue is full",
            Scope::Group(g),
        );
        self.overloaded(g, 1, 0);
    }

    fn count_inflight(&mut self, i: usize, len: usize) {
        if let Some(Some(c)) = self.conns.slab.get_mut(i) {
            c.inflight += 1;
            c.inflight_bytes += len as u64;
        }
    }

    fn update_interest(&mut self, i: usize) {
        let Some(Some(c)) = self.conns.slab.get_mut(i) else {
            return;
        };
        let want = c.wanted_interest();
        if want != c.interest {
            c.interest = want;
            let fd = c.stream.as_raw_fd();
            if let Err(e) = self.epoll.modify(fd, want, TOKEN_CONN | i as u64) {
                debug!("epoll_ctl(mod): {e}");
                self.close(i);
            }
        }
    }

    pub(crate) fn flush_dirty(&mut self) {
        let dirty = std::mem::take(&mut self.conns.dirty);
        for &i in &dirty {
            if let Some(Some(c)) = self.conns.slab.get_mut(i) {
                c.dirty = false;
            }
            if self.tuning.no_direct_send {
                // Benchmark switch: wait for EPOLLOUT instead of sending now.
                self.arm_write(i);
            } else {
                self.flush(i);
            }
        }
        let mut dirty = dirty;
        dirty.clear();
        // Keep the allocation; anything marked during flushing is kept too.
        dirty.append(&mut self.conns.dirty);
        self.conns.dirty = dirty;
    }

    /// Benchmark switch `no_direct_send`: asks epoll for writability.
    fn arm_write(&mut self, i: usize) {
        let Some(Some(c)) = self.conns.slab.get_mut(i) else {
            return;
        };
        if c.has_output() && c.interest & WRITE == 0 {
            c.interest |= WRITE;
            let (fd, want) = (c.stream.as_raw_fd(), c.interest);
            let _ = self.epoll.modify(fd, want, TOKEN_CONN | i as u64);
        }
    }

    /// Sends what connection `i` has buffered, directly; arms EPOLLOUT only
    /// if the socket would block.
    fn flush(&mut self, i: usize) {
        let Some(Some(c)) = self.conns.slab.get_mut(i) else {
            return;
        };
        let mut failed = false;
        let mut sent = false;
        while c.has_output() {
            match sys::send(c.stream.as_raw_fd(), &c.out[c.out_pos..]) {
                Ok(n) => {
                    c.out_pos += n;
                    sent |= n > 0;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    c.interest |= WRITE;
                    let fd = c.stream.as_raw_fd();
                    let want = c.wanted_interest() | WRITE;
                    c.interest = want;
                    if self.epoll.modify(fd, want, TOKEN_CONN | i as u64).is_err() {
                        failed = true;
                    }
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("send: {e}");
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            self.close(i);
            return;
        }
        if sent {
            // Replies flowing is activity: a client whose reading was
            // paused (its replies pending) must not be taken for idle in
            // the moment between its last reply leaving and reading again.
            c.last_active_ns = self.now_ns;
        }
        if !c.has_output() {
            c.out.clear();
            c.out_pos = 0;
            if c.out.capacity() > KEEP_BUF {
                c.out = Vec::new();
                self.freed_large = true;
            }
            c.interest &= !WRITE;
            c.stalled_since_ns = 0;
        } else if sent || c.stalled_since_ns == 0 {
            // Blocked: the peer's window is full. The clock runs from the
            // last send that made progress.
            c.stalled_since_ns = self.now_ns.max(1);
        }
        self.maybe_close(i);
        self.update_interest(i);
    }

    /// Closes connection `i` if nothing more will happen on it: at once
    /// if the peer has finished sending, else after a lingering close.
    fn maybe_close(&mut self, i: usize) {
        let Some(Some(c)) = self.conns.slab.get_mut(i) else {
            return;
        };
        if c.linger_until_ns != 0 {
            if c.eof {
                self.close(i);
            }
            return;
        }
        let finished = c.eof || c.closing || (self.draining && c.drain_owed == 0);
        if !(finished && c.inflight == 0 && !c.has_output()) {
            return;
        }
        if c.eof {
            self.close(i);
            return;
        }
        // Lingering: FIN after the last reply, and what comes meanwhile
        // is dropped (requests sent after our last read get no answer, and
        // the peer sees EOF, not a reset that loses replies).
        if c.stream.shutdown(std::net::Shutdown::Write).is_err() {
            self.close(i);
            return;
        }
        c.linger_until_ns = self.now_ns.saturating_add(LINGER_NS).max(1);
        // What the kernel still has to deliver of the replies: the linger
        // goes on while that shrinks (see `run_timers`).
        c.unacked = sys::unacked_bytes(c.stream.as_raw_fd()).unwrap_or(0);
        c.inbuf = Vec::new();
        c.closing = true;
        self.lingering
            .push_back((c.linger_until_ns, self.conns.tag(i)));
        self.update_interest(i);
    }

    /// Reads and drops what a lingering connection's peer still sends;
    /// closes it once the peer has closed (or the read fails).
    fn read_and_drop(&mut self, i: usize) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut done = false;
        for _ in 0..LINGER_READS {
            let Some(Some(c)) = self.conns.slab.get_mut(i) else {
                break;
            };
            match sys::recv(c.stream.as_raw_fd(), &mut scratch) {
                Ok(0) => {
                    c.eof = true;
                    done = true;
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    done = true;
                    break;
                }
            }
        }
        self.scratch = scratch;
        if done {
            self.close(i);
        }
    }

    fn close(&mut self, i: usize) {
        let Some(slot) = self.conns.slab.get_mut(i) else {
            return;
        };
        let Some(c) = slot.take() else { return };
        let _ = self.epoll.delete(c.stream.as_raw_fd());
        self.freed_large |= c.inbuf.capacity() > KEEP_BUF || c.out.capacity() > KEEP_BUF;
        drop(c);
        if self.holding {
            // Held requests may wait long (a reload's length): a client
            // gone takes its own out at once, so they do not fill
            // `max_queue` for everyone else. (Queued ones are dropped when
            // they reach the front.)
            let tag = self.conns.tag(i);
            for g in 0..self.groups.len() {
                if self.groups[g].held.drop_conn(tag) > 0 {
                    self.stats.queued(g, self.groups[g].waiting());
                }
            }
        }
        self.conns.generations[i] = self.conns.generations[i].wrapping_add(1);
        self.conns.free.push(i);
        self.conns.live -= 1;
        self.stats.connections(self.conns.live);
    }

    // ---- timers ----

    fn run_timers(&mut self) {
        // Lingering closes whose time is up (a connection closed meanwhile,
        // or its slot reused, is no longer the one tagged).
        while let Some(&(at, tag)) = self.lingering.front()
            && self.now_ns >= at
        {
            self.lingering.pop_front();
            let Some(c) = self.conns.get(tag).filter(|c| c.linger_until_ns != 0) else {
                continue;
            };
            // Replies still on their way to a peer that reads them (the
            // kernel's send queue shrank since the last look): a close now
            // would reset the connection and lose them, so linger on.
            let queued = sys::unacked_bytes(c.stream.as_raw_fd()).unwrap_or(0);
            if queued > 0 && queued < c.unacked {
                c.unacked = queued;
                c.linger_until_ns = self.now_ns.saturating_add(LINGER_NS);
                self.lingering.push_back((c.linger_until_ns, tag));
                continue;
            }
            self.close(tag.index());
        }
        if let Some(until) = self.listeners_paused_until
            && self.now_ns >= until
        {
            self.listeners_paused_until = None;
            for (id, l) in &self.listeners {
                let _ = self
                    .epoll
                    .add(l.as_raw_fd(), READ, TOKEN_LISTENER | *id as u64);
            }
        }
        if self.now_ns < self.next_sweep_ns {
            return;
        }
        self.next_sweep_ns = self.now_ns + 1000 * NS_PER_MS;
        // For the master's health check: this loop still turns.
        self.stats.heartbeat(self.now_ns);
        self.flush_overload();
        if std::mem::take(&mut self.freed_large) {
            // Large buffers freed this second go back to the system (the
            // allocator would keep them for the next ones, so a burst of
            // large frames left the proxy at its peak size for good).
            sys::release_free_memory();
        }
        let idle = u64::try_from(self.config.server.idle_timeout.as_nanos()).unwrap_or(u64::MAX);
        if idle == 0 {
            return;
        }
        // A full scan once a second; a timer wheel is not needed so far.
        let mut stalled = 0u64;
        let mut trickling = 0u64;
        for i in 0..self.conns.slab.len() {
            let Some(Some(c)) = self.conns.slab.get_mut(i) else {
                continue;
            };
            if c.stalled_since_ns != 0 && c.has_output() {
                // Progress our sends cannot see: the peer reads, slower
                // than a third of the send buffer per idle_timeout (what
                // EPOLLOUT waits for), and the kernel's queue shrinks.
                if let Some(q) = sys::unacked_bytes(c.stream.as_raw_fd())
                    && q != c.unacked
                {
                    if q < c.unacked {
                        c.stalled_since_ns = self.now_ns;
                    }
                    c.unacked = q;
                }
            }
            if (c.inflight > 0 || c.has_output()) && !c.inbuf.is_empty() {
                // While we owe it replies (and may have paused reading it),
                // the time its frame takes is not the client's doing.
                c.frame_since_ns = self.now_ns;
            }
            let c = &*c;
            if c.inflight == 0
                && !c.has_output()
                && self.now_ns.saturating_sub(c.last_active_ns) > idle
            {
                debug!(conn = i, "closing idle connection");
                self.close(i);
            } else if c.inflight == 0
                && !c.has_output()
                && !c.inbuf.is_empty()
                && self.now_ns.saturating_sub(c.frame_since_ns)
                    > idle.saturating_add(c.inbuf.len() as u64 * NS_PER_FRAME_BYTE)
            {
                // Waiting for nothing but the rest of a frame begun more
                // than idle_timeout ago (plus a second per MIN_FRAME_RATE
                // bytes it sent): a client trickling bytes to hold its
                // buffer (up to max_frame) open, as a slowloris does.
                trickling += 1;
                self.close(i);
            } else if c.has_output()
                && c.stalled_since_ns != 0
                && self.now_ns.saturating_sub(c.stalled_since_ns) > idle
            {
                // As nginx's send_timeout: what it holds is given up.
                stalled += 1;
                self.close(i);
            }
        }
        if stalled > 0 {
            info!(
                connections = stalled,
                "closed connections whose clients read none of their replies for idle_timeout"
            );
        }
        if trickling > 0 {
            info!(
                connections = trickling,
                "closed connections that took more than idle_timeout to send one frame"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{next_mean_frame, read_share};

    #[test]
    fn a_turns_reading_is_shared_among_the_readable_connections() {
        let budget = 64 << 10;
        // Few connections, or large frames: the whole budget each.
        for n in [0, 1, 8] {
            assert_eq!(read_share(budget, n, 80), budget, "{n}");
        }
        assert_eq!(read_share(budget, 50, 4096), budget);
        // Many with small frames: an equal share of 8,192 frames.
        assert_eq!(read_share(budget, 50, 80), 8192 * 80 / 50);
        // Never under 1 KiB, however many; never over the budget.
        assert_eq!(read_share(budget, 1024, 80), 1024);
        assert_eq!(read_share(budget, 1024, 16), 1024);
        assert_eq!(read_share(4096, 2, 1 << 20), 4096);
        assert_eq!(read_share(budget, 1, usize::MAX), budget);
    }

    #[test]
    fn the_mean_frame_follows_parsed_frames() {
        // 1/8 of the way to the turn's mean, which is bytes / frames.
        assert_eq!(next_mean_frame(80, 4096 * 10, 10), (80 * 7 + 4096) / 8);
        // Converges both ways.
        let mut m = 16;
        for _ in 0..100 {
            m = next_mean_frame(m, 4112 * 3, 3);
        }
        assert!((4100..=4112).contains(&m), "{m}");
        for _ in 0..100 {
            m = next_mean_frame(m, 80 * 800, 800);
        }
        assert!((80..=88).contains(&m), "{m}");
        // A turn that parsed nothing leaves it; it never drops under a header.
        assert_eq!(next_mean_frame(500, 12345, 0), 500);
        assert_eq!(next_mean_frame(16, 0, 0), 16);
        assert_eq!(next_mean_frame(17, 16, 1), 16);
    }
}
