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

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, ErrorKind};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use halfsync_config::{Config, Origin};
use halfsync_protocol::{self as hsp, Parsed, status};
use halfsync_shm::{
    Consumer, Meta, Notify, Producer, RingError, Slot, WorkerState, sys as shm_sys,
};
use tracing::{debug, error, info, warn};

use crate::control::{Channel, Received, ToMaster, ToProxy};
use crate::sys::{self, Epoll, READ, WRITE};
use crate::{ProxyError, ProxySpec};

const KIND_SHIFT: u32 = 56;
const TOKEN_LISTENER: u64 = 1 << KIND_SHIFT;
const TOKEN_CONTROL: u64 = 2 << KIND_SHIFT;
const TOKEN_SLOT: u64 = 3 << KIND_SHIFT;
const TOKEN_CONN: u64 = 4 << KIND_SHIFT;
const INDEX_MASK: u64 = (1 << KIND_SHIFT) - 1;

/// Most requests one connection may have in flight before the proxy stops
/// reading from it (back-pressure instead of unbounded memory).
const MAX_CONN_INFLIGHT: u32 = 4096;
/// Most unsent reply bytes one connection may hold before the proxy stops
/// reading from it.
const MAX_CONN_OUTPUT: usize = 4 << 20;
/// Output buffers above this capacity are freed once empty.
const KEEP_BUF: usize = 64 << 10;
/// Connections accepted per listener per loop turn.
const ACCEPT_BATCH: usize = 128;
const NS_PER_MS: u64 = 1_000_000;

/// Runs the proxy until it has drained after a shutdown, or the master is
/// gone.
pub fn run(spec: ProxySpec) -> Result<(), ProxyError> {
    let mut proxy = Proxy::new(spec)?;
    proxy.run()
}

/// Identifies one incarnation of a connection: slab index and generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tag(u64);

impl Tag {
    fn new(index: usize, generation: u32) -> Tag {
        Tag(((generation as u64) << 32) | index as u64)
    }
    fn index(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }
    fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

/// A request's identity while it is away from its connection.
#[derive(Clone, Copy, Debug)]
struct ReqMeta {
    tag: Tag,
    id: u64,
    code: u16,
    flags: u16,
    enqueued_ns: u64,
}

/// A request written into a worker's ring and not yet answered.
#[derive(Clone, Copy, Debug)]
struct Pending {
    pos: u64,
    req: ReqMeta,
}

/// A request waiting in the proxy for a worker with room.
struct Queued {
    req: ReqMeta,
    payload: Vec<u8>,
}

struct Conn {
    stream: TcpStream,
    /// Bytes of an incomplete frame carried over between reads.
    inbuf: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    /// Requests accepted from this connection and not yet answered.
    inflight: u32,
    last_active_ns: u64,
    /// What epoll watches for this connection.
    interest: u32,
    /// The peer finished sending.
    eof: bool,
    /// No more requests are read: close once answered and flushed.
    closing: bool,
    /// Already in the dirty list.
    dirty: bool,
}

impl Conn {
    fn has_output(&self) -> bool {
        self.out_pos < self.out.len()
    }

    fn push_reply(&mut self, id: u64, code: u16, payload: &[u8]) {
        self.out
            .extend_from_slice(&hsp::encode_header(id, code, 0, payload.len()));
        self.out.extend_from_slice(payload);
    }

    fn wanted_interest(&self) -> u32 {
        let mut i = 0;
        if !self.eof
            && !self.closing
            && self.inflight < MAX_CONN_INFLIGHT
            && self.out.len() - self.out_pos < MAX_CONN_OUTPUT
        {
            i |= READ;
        }
        if self.has_output() && self.interest & WRITE != 0 {
            // Stay armed until the buffer drains.
            i |= WRITE;
        }
        i
    }
}

/// Connections in a slab indexed by epoll token. Generations survive a
/// slot's reuse so a late reply for a closed connection is recognised.
struct Conns {
    slab: Vec<Option<Conn>>,
    generations: Vec<u32>,
    free: Vec<usize>,
    live: usize,
    /// Connections with output to send this turn.
    dirty: Vec<usize>,
}

impl Conns {
    fn insert(&mut self, conn: Conn) -> usize {
        self.live += 1;
        if let Some(i) = self.free.pop() {
            self.slab[i] = Some(conn);
            i
        } else {
            self.slab.push(Some(conn));
            self.generations.push(0);
            self.slab.len() - 1
        }
    }

    fn get(&mut self, tag: Tag) -> Option<&mut Conn> {
        let i = tag.index();
        if self.generations.get(i) != Some(&tag.generation()) {
            return None;
        }
        self.slab.get_mut(i)?.as_mut()
    }

    fn tag(&self, i: usize) -> Tag {
        Tag::new(i, self.generations[i])
    }

    fn mark_dirty(&mut self, i: usize) {
        if let Some(Some(c)) = self.slab.get_mut(i)
            && !c.dirty
        {
            c.dirty = true;
            self.dirty.push(i);
        }
    }

    /// Delivers a reply to the connection `tag` names, if it still exists.
    fn deliver(&mut self, tag: Tag, id: u64, code: u16, payload: &[u8], now_ns: u64) {
        if let Some(c) = self.get(tag) {
            c.push_reply(id, code, payload);
            c.inflight = c.inflight.saturating_sub(1);
            c.last_active_ns = now_ns;
            self.mark_dirty(tag.index());
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// No worker; waiting for the master to start one.
    Down,
    /// A worker process exists and is initialising its plugin.
    Starting { pid: i32 },
    /// Serving.
    Ready { pid: i32 },
    /// Its shared memory is corrupt; the master was asked to kill it.
    Failed { pid: i32 },
}

struct WorkerSlot {
    group: usize,
    index: u32,
    slot: Slot,
    eventfd: OwnedFd,
    tx: Producer,
    rx: Consumer,
    pending: VecDeque<Pending>,
    phase: Phase,
}

impl WorkerSlot {
    fn attach(&mut self) -> Result<(), RingError> {
        self.tx = Producer::attach(self.slot.requests(), Notify::Futex)?;
        self.rx = Consumer::attach(self.slot.replies())?;
        Ok(())
    }
}

struct Group {
    name: String,
    slots: Vec<usize>,
    queue: VecDeque<Queued>,
    max_inflight: usize,
    max_queue: usize,
}

/// Replies by status, counted as they are sent.
#[derive(Default)]
struct Totals {
    by_status: [u64; 8],
    plugin_codes: u64,
}

impl Totals {
    fn count(&mut self, code: u16) {
        match self.by_status.get_mut(code as usize) {
            Some(n) => *n += 1,
            None => self.plugin_codes += 1,
        }
    }
}

struct Proxy {
    config: Config,
    epoll: Epoll,
    listeners: Vec<TcpListener>,
    listeners_paused_until: Option<u64>,
    control: Channel,
    conns: Conns,
    slots: Vec<WorkerSlot>,
    groups: Vec<Group>,
    /// Group index per command number.
    routes: Vec<Option<u16>>,
    scratch: Vec<u8>,
    events: Vec<sys::Event>,
    now_ns: u64,
    next_sweep_ns: u64,
    draining: bool,
    refused: u64,
    totals: Totals,
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> ProxyError {
    move |source| ProxyError::Io { what, source }
}

fn take_fd(fd: i32) -> Result<OwnedFd, ProxyError> {
    if !sys::fd_is_open(fd) {
        return Err(ProxyError::Spec(format!("inherited fd {fd} is not open")));
    }
    // SAFETY: the master passed this fd to this process for us alone, and
    // each spec fd is taken exactly once.
    Ok(unsafe { sys::take_fd(fd) })
}

impl Proxy {
    fn new(spec: ProxySpec) -> Result<Proxy, ProxyError> {
        let config = Config::from_toml(&spec.config, Origin::Text)?;
        let epoll = Epoll::new(1024).map_err(io_err("epoll_create1"))?;
        let control = Channel::from_fd(take_fd(spec.control_fd)?);
        epoll
            .add(control.fd().as_raw_fd(), READ, TOKEN_CONTROL)
            .map_err(io_err("epoll_ctl(control)"))?;

        let mut listeners = Vec::new();
        for (i, &fd) in spec.listener_fds.iter().enumerate() {
            let l = TcpListener::from(take_fd(fd)?);
            l.set_nonblocking(true).map_err(io_err("listener"))?;
            epoll
                .add(l.as_raw_fd(), READ, TOKEN_LISTENER | i as u64)
                .map_err(io_err("epoll_ctl(listener)"))?;
            listeners.push(l);
        }

        let mut groups: Vec<Group> = config
            .groups
            .iter()
            .map(|g| Group {
                name: g.name.clone(),
                slots: Vec::new(),
                queue: VecDeque::new(),
                max_inflight: g.max_inflight as usize,
                max_queue: g.max_queue as usize,
            })
            .collect();
        let capacity = config.server.ring_size as usize;
        let mut slots = Vec::new();
        for (i, s) in spec.slots.iter().enumerate() {
            let group = s.group as usize;
            let Some(g) = groups.get_mut(group) else {
                return Err(ProxyError::Spec(format!("slot {i} names group {group}")));
            };
            g.slots.push(i);
            let file = File::from(take_fd(s.memfd)?);
            let slot = Slot::open(file, capacity)
                .map_err(|source| ProxyError::Slot { slot: i, source })?;
            let eventfd = take_fd(s.eventfd)?;
            epoll
                .add(eventfd.as_raw_fd(), READ, TOKEN_SLOT | i as u64)
                .map_err(io_err("epoll_ctl(eventfd)"))?;
            let ring_err = |e: RingError| ProxyError::Spec(format!("slot {i}: {e}"));
            let tx = Producer::attach(slot.requests(), Notify::Futex).map_err(ring_err)?;
            let rx = Consumer::attach(slot.replies()).map_err(ring_err)?;
            slots.push(WorkerSlot {
                group,
                index: s.index,
                slot,
                eventfd,
                tx,
                rx,
                pending: VecDeque::new(),
                phase: Phase::Down,
            });
        }

        let mut routes = vec![None; 1 << 16];
        if let Some(d) = config.groups.iter().position(|g| g.is_default_route()) {
            routes.iter_mut().for_each(|r| *r = Some(d as u16));
        }
        for (gi, g) in config.groups.iter().enumerate() {
            for &c in &g.commands {
                routes[c as usize] = Some(gi as u16);
            }
        }

        let scratch = vec![0u8; config.server.read_budget.clamp(4096, 1 << 20) as usize];
        info!(
            listeners = listeners.len(),
            slots = slots.len(),
            "proxy started"
        );
        Ok(Proxy {
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
            slots,
            groups,
            routes,
            scratch,
            events: Vec::with_capacity(1024),
            now_ns: shm_sys::monotonic_ns(),
            next_sweep_ns: 0,
            draining: false,
            refused: 0,
            totals: Totals::default(),
        })
    }

    fn run(&mut self) -> Result<(), ProxyError> {
        loop {
            let timeout = self.prepare_sleep();
            self.events.clear();
            let raw = self.epoll.wait(timeout).map_err(io_err("epoll_wait"))?;
            self.events.extend(raw.iter().map(sys::event));
            self.end_sleep();
            self.now_ns = shm_sys::monotonic_ns();

            for i in 0..self.events.len() {
                let ev = self.events[i];
                let index = (ev.token & INDEX_MASK) as usize;
                match ev.token & !INDEX_MASK {
                    TOKEN_LISTENER => self.accept(index),
                    TOKEN_CONTROL if !self.read_control()? => {
                        info!("master is gone; proxy exiting");
                        return Ok(());
                    }
                    TOKEN_SLOT => {
                        // The worker published replies; they are collected below.
                        if let Some(s) = self.slots.get(index) {
                            let _ = shm_sys::eventfd_drain(s.eventfd.as_raw_fd());
                        }
                    }
                    TOKEN_CONN => {
                        if ev.writable() {
                            self.conns.mark_dirty(index);
                        }
                        if ev.readable() {
                            self.read_conn(index);
                        }
                    }
                    _ => {}
                }
            }

            self.check_starting();
            self.collect_replies();
            self.dispatch_queued();
            self.publish_requests();
            self.flush_dirty();
            self.run_timers();

            if self.draining && self.conns.live == 0 && self.queued_total() == 0 {
                info!(
                    ok = self.totals.by_status[0],
                    refused = self.refused,
                    "proxy drained"
                );
                let _ = self.control.send_to_master(ToMaster::Drained);
                return Ok(());
            }
        }
    }

    fn queued_total(&self) -> usize {
        self.groups.iter().map(|g| g.queue.len()).sum()
    }

    /// Tells every ready worker we are about to sleep, so it wakes us when
    /// it publishes; returns how long epoll may wait.
    fn prepare_sleep(&mut self) -> Option<Duration> {
        let mut busy = !self.conns.dirty.is_empty();
        for s in &mut self.slots {
            if !matches!(s.phase, Phase::Ready { .. }) {
                continue;
            }
            match s.rx.prepare_sleep() {
                Ok(true) => {}
                // Replies waiting, or a corrupt ring: handle it this turn.
                Ok(false) | Err(_) => busy = true,
            }
        }
        if busy {
            return Some(Duration::ZERO);
        }
        let mut wait = Duration::from_millis(1000);
        if self
            .slots
            .iter()
            .any(|s| matches!(s.phase, Phase::Starting { .. }))
        {
            // The worker signals its eventfd when ready; poll as a backstop.
            wait = wait.min(Duration::from_millis(50));
        }
        if let Some(until) = self.listeners_paused_until {
            wait = wait.min(Duration::from_nanos(until.saturating_sub(self.now_ns)));
        }
        Some(wait)
    }

    fn end_sleep(&mut self) {
        for s in &self.slots {
            if matches!(s.phase, Phase::Ready { .. }) {
                s.rx.end_sleep();
            }
        }
    }

    // ---- control ----

    /// Handles control messages; false if the master is gone.
    fn read_control(&mut self) -> Result<bool, ProxyError> {
        loop {
            match self.control.recv_from_master() {
                Ok(Received::Msg(m)) => self.on_control(m),
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

    fn on_control(&mut self, m: ToProxy) {
        match m {
            ToProxy::WorkerStarted { slot, pid } => {
                if let Some(s) = self.slots.get_mut(slot as usize) {
                    s.phase = Phase::Starting { pid };
                }
            }
            ToProxy::WorkerExited { slot, pid, status } => {
                self.on_worker_exit(slot as usize, pid, status)
            }
            ToProxy::Shutdown => self.start_drain(),
        }
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
        for l in self.listeners.drain(..) {
            let _ = self.epoll.delete(l.as_raw_fd());
        }
        for i in 0..self.conns.slab.len() {
            self.maybe_close(i);
        }
    }

    // ---- worker slots ----

    fn check_starting(&mut self) {
        for s in &mut self.slots {
            let Phase::Starting { pid } = s.phase else {
                continue;
            };
            let ctl = s.slot.control();
            if ctl.pid() != pid as u32 {
                continue;
            }
            if let Ok(WorkerState::Idle | WorkerState::Busy) = ctl.state() {
                s.phase = Phase::Ready { pid };
                debug!(group = %self.groups[s.group].name, worker = s.index, pid, "worker ready");
            }
        }
    }

    fn fail_slot(&mut self, si: usize, why: &str) {
        let s = &mut self.slots[si];
        let pid = match s.phase {
            Phase::Ready { pid } | Phase::Starting { pid } => pid,
            Phase::Failed { .. } | Phase::Down => return,
        };
        error!(
            group = %self.groups[s.group].name,
            worker = s.index,
            pid,
            "worker's shared memory is corrupt ({why}); killing it"
        );
        s.phase = Phase::Failed { pid };
        let _ = self.control.send_to_master(ToMaster::KillWorker {
            slot: si as u32,
            pid,
        });
    }

    fn collect_replies(&mut self) {
        for si in 0..self.slots.len() {
            if matches!(self.slots[si].phase, Phase::Ready { .. })
                && let Err(why) = self.collect_slot(si)
            {
                self.fail_slot(si, &why);
            }
        }
    }

    /// Moves every published reply of one slot into connection buffers.
    /// Each reply must answer the oldest request the slot holds.
    fn collect_slot(&mut self, si: usize) -> Result<(), String> {
        let s = &mut self.slots[si];
        let result = loop {
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
            self.totals.count(rec.meta.code);
            self.conns
                .deliver(p.req.tag, p.req.id, rec.meta.code, rec.payload, self.now_ns);
            s.pending.pop_front();
            s.rx.advance();
        };
        s.rx.release();
        result
    }

    /// The least-loaded ready slot of group `g` with room for a request of
    /// `len` payload bytes. A linear scan: groups have few workers.
    fn pick_slot(&mut self, g: usize, len: usize) -> Option<usize> {
        let max = self.groups[g].max_inflight;
        let mut best: Option<(usize, usize)> = None;
        let mut corrupt = None;
        for &si in &self.groups[g].slots {
            let s = &mut self.slots[si];
            if !matches!(s.phase, Phase::Ready { .. }) || s.pending.len() >= max {
                continue;
            }
            if best.is_some_and(|(_, load)| load <= s.pending.len()) {
                continue;
            }
            match s.tx.fits(len) {
                Ok(true) => best = Some((si, s.pending.len())),
                Ok(false) => {}
                Err(e) => corrupt = Some((si, e)),
            }
        }
        if let Some((si, e)) = corrupt {
            self.fail_slot(si, &e.to_string());
        }
        best.map(|(si, _)| si)
    }

    /// Writes a request into a slot's ring (published at the end of the
    /// turn). The caller checked that it fits.
    fn push_to_slot(&mut self, si: usize, req: ReqMeta, payload: &[u8]) -> bool {
        let s = &mut self.slots[si];
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
                true
            }
            Ok(None) => false,
            Err(e) => {
                self.fail_slot(si, &e.to_string());
                false
            }
        }
    }

    fn publish_requests(&mut self) {
        for s in &mut self.slots {
            if s.tx.has_unpublished() {
                s.tx.publish();
            }
        }
    }

    fn dispatch_queued(&mut self) {
        for g in 0..self.groups.len() {
            while let Some(q) = self.groups[g].queue.front() {
                if self.conns.get(q.req.tag).is_none() {
                    // Its client is gone: never run it.
                    self.groups[g].queue.pop_front();
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
            }
        }
    }

    /// A worker process is gone. Deliver what it answered, fail the request
    /// it was running, give the ones it never started to other workers,
    /// and reset the slot for a replacement.
    fn on_worker_exit(&mut self, si: usize, pid: i32, status: i32) {
        let Some(s) = self.slots.get(si) else { return };
        let phase = s.phase;
        let group = s.group;
        let name = self.groups[group].name.clone();
        let index = s.index;
        if phase != Phase::Down {
            // Replies it published before dying are good (unless it was
            // killed for corrupting its memory).
            if !matches!(phase, Phase::Failed { .. })
                && let Err(why) = self.collect_slot(si)
            {
                warn!(group = %name, worker = index, "replies of dead worker unreadable: {why}");
            }
        }
        let s = &mut self.slots[si];
        let busy = s.slot.control().busy();
        let pending: Vec<Pending> = s.pending.drain(..).collect();
        let mut reader = pending
            .first()
            .and_then(|p| Consumer::attach_at(s.slot.requests(), p.pos).ok());
        let mut requeue = Vec::new();
        let mut died = 0;
        for p in &pending {
            let started = busy.is_some_and(|b| p.pos <= b.pos);
            let payload = if started {
                None
            } else {
                reader.as_mut().and_then(|r| match r.peek() {
                    Ok(Some(rec))
                        if rec.pos == p.pos
                            && rec.meta.id == p.req.id
                            && rec.meta.tag == p.req.tag.0 =>
                    {
                        let v = rec.payload.to_vec();
                        r.advance();
                        Some(v)
                    }
                    _ => None,
                })
            };
            match payload {
                Some(payload) => requeue.push(Queued {
                    req: p.req,
                    payload,
                }),
                None => {
                    died += 1;
                    self.totals.count(status::WORKER_DIED);
                    self.conns.deliver(
                        p.req.tag,
                        p.req.id,
                        status::WORKER_DIED,
                        b"the worker running this request died",
                        self.now_ns,
                    );
                }
            }
        }
        let how = if status < 0 {
            format!("killed by signal {}", -status)
        } else {
            format!("exited with code {status}")
        };
        match busy {
            Some(b) => warn!(
                group = %name, worker = index, pid, request_id = b.id, command = b.code,
                requeued = requeue.len(), "worker {how} while running a request"
            ),
            None => {
                info!(group = %name, worker = index, pid, requeued = requeue.len(), "worker {how}")
            }
        }
        debug!(died, "requests failed with the worker");
        let q = &mut self.groups[group].queue;
        for r in requeue.into_iter().rev() {
            q.push_front(r);
        }
        let s = &mut self.slots[si];
        s.slot.reset();
        if let Err(e) = s.attach() {
            error!("slot {si}: cannot re-attach after reset: {e}");
        }
        s.phase = Phase::Down;
        let _ = self
            .control
            .send_to_master(ToMaster::SlotReset { slot: si as u32 });
    }

    // ---- connections ----

    fn accept(&mut self, li: usize) {
        for _ in 0..ACCEPT_BATCH {
            let Some(l) = self.listeners.get(li) else {
                return;
            };
            match sys::accept4(l.as_raw_fd()) {
                Ok(Some(stream)) => {
                    if self.conns.live >= self.config.server.max_connections as usize {
                        self.refused += 1;
                        if self.refused.is_power_of_two() {
                            warn!(
                                refused = self.refused,
                                "max_connections reached; refusing connections"
                            );
                        }
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let fd = stream.as_raw_fd();
                    let i = self.conns.insert(Conn {
                        stream,
                        inbuf: Vec::new(),
                        out: Vec::new(),
                        out_pos: 0,
                        inflight: 0,
                        last_active_ns: self.now_ns,
                        interest: READ,
                        eof: false,
                        closing: false,
                        dirty: false,
                    });
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
                    // Out of descriptors: stop accepting for a moment instead
                    // of spinning on a listener that stays readable.
                    warn!("accept: {e}; pausing accepts for 100 ms");
                    self.pause_listeners();
                    return;
                }
                Err(e) => {
                    // ECONNABORTED and friends: that client is gone.
                    debug!("accept: {e}");
                }
            }
        }
    }

    fn pause_listeners(&mut self) {
        for l in &self.listeners {
            let _ = self.epoll.delete(l.as_raw_fd());
        }
        self.listeners_paused_until = Some(self.now_ns + 100 * NS_PER_MS);
    }

    fn read_conn(&mut self, i: usize) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let budget = scratch.len();
        let mut total = 0;
        let mut failed = false;
        while total < budget {
            let Some(Some(c)) = self.conns.slab.get_mut(i) else {
                break;
            };
            if c.interest & READ == 0 {
                break;
            }
            match sys::recv(c.stream.as_raw_fd(), &mut scratch[..budget - total]) {
                Ok(0) => {
                    c.eof = true;
                    break;
                }
                Ok(n) => {
                    total += n;
                    c.last_active_ns = self.now_ns;
                    self.ingest(i, &scratch[..n]);
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
            let used = self.parse_frames(i, data);
            if let Some(Some(c)) = self.conns.slab.get_mut(i)
                && !c.closing
            {
                c.inbuf.extend_from_slice(&data[used..]);
            }
        } else {
            c.inbuf.extend_from_slice(data);
            let buf = std::mem::take(&mut c.inbuf);
            let used = self.parse_frames(i, &buf);
            if let Some(Some(c)) = self.conns.slab.get_mut(i) {
                let mut buf = buf;
                if c.closing {
                    buf = Vec::new();
                } else {
                    buf.drain(..used);
                }
                c.inbuf = buf;
            }
        }
    }

    /// Handles every whole frame at the start of `buf`; returns the bytes used.
    fn parse_frames(&mut self, i: usize, buf: &[u8]) -> usize {
        let max_frame = self.config.server.max_frame;
        let mut off = 0;
        loop {
            match hsp::parse(&buf[off..], max_frame) {
                Parsed::Frame(h, n) => {
                    self.on_request(i, h, &buf[off + hsp::HEADER_LEN..off + n]);
                    off += n;
                }
                Parsed::Incomplete(need) => {
                    if let Some(Some(c)) = self.conns.slab.get_mut(i) {
                        c.inbuf.reserve(need.min(max_frame as usize + 4));
                    }
                    return off;
                }
                Parsed::Bad(e, id) => {
                    debug!(conn = i, "bad frame: {e}");
                    self.totals.count(status::BAD_REQUEST);
                    if let Some(Some(c)) = self.conns.slab.get_mut(i) {
                        let msg = format!("{e}; closing the connection");
                        c.push_reply(id.unwrap_or(0), status::BAD_REQUEST, msg.as_bytes());
                        c.closing = true;
                        self.conns.mark_dirty(i);
                    }
                    return buf.len();
                }
            }
        }
    }

    fn reply_now(&mut self, i: usize, id: u64, code: u16, msg: &[u8]) {
        self.totals.count(code);
        if let Some(Some(c)) = self.conns.slab.get_mut(i) {
            c.push_reply(id, code, msg);
            self.conns.mark_dirty(i);
        }
    }

    fn on_request(&mut self, i: usize, h: hsp::Header, payload: &[u8]) {
        if self.draining {
            self.reply_now(i, h.id, status::SHUTTING_DOWN, b"server is shutting down");
            return;
        }
        let Some(g) = self.routes[h.code as usize].map(usize::from) else {
            let msg = format!("no worker group serves command {}", h.code);
            self.reply_now(i, h.id, status::NO_ROUTE, msg.as_bytes());
            return;
        };
        let req = ReqMeta {
            tag: self.conns.tag(i),
            id: h.id,
            code: h.code,
            flags: h.flags,
            enqueued_ns: self.now_ns,
        };
        let group = &self.groups[g];
        let queued = !group.queue.is_empty();
        if !queued
            && let Some(si) = self.pick_slot(g, payload.len())
            && self.push_to_slot(si, req, payload)
        {
            self.count_inflight(i);
            return;
        }
        let group = &mut self.groups[g];
        if group.queue.len() < group.max_queue {
            group.queue.push_back(Queued {
                req,
                payload: payload.to_vec(),
            });
            self.count_inflight(i);
            return;
        }
        self.reply_now(
            i,
            h.id,
            status::BUSY,
            b"all workers busy and the wait queue is full",
        );
    }

    fn count_inflight(&mut self, i: usize) {
        if let Some(Some(c)) = self.conns.slab.get_mut(i) {
            c.inflight += 1;
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

    fn flush_dirty(&mut self) {
        let dirty = std::mem::take(&mut self.conns.dirty);
        for &i in &dirty {
            if let Some(Some(c)) = self.conns.slab.get_mut(i) {
                c.dirty = false;
            }
            self.flush(i);
        }
        let mut dirty = dirty;
        dirty.clear();
        // Keep the allocation; anything marked during flushing is kept too.
        dirty.append(&mut self.conns.dirty);
        self.conns.dirty = dirty;
    }

    /// Sends what connection `i` has buffered, directly; arms EPOLLOUT only
    /// if the socket would block.
    fn flush(&mut self, i: usize) {
        let Some(Some(c)) = self.conns.slab.get_mut(i) else {
            return;
        };
        let mut failed = false;
        while c.has_output() {
            match sys::send(c.stream.as_raw_fd(), &c.out[c.out_pos..]) {
                Ok(n) => c.out_pos += n,
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
        if !c.has_output() {
            c.out.clear();
            c.out_pos = 0;
            if c.out.capacity() > KEEP_BUF {
                c.out = Vec::new();
            }
            c.interest &= !WRITE;
        }
        self.maybe_close(i);
        self.update_interest(i);
    }

    /// Closes connection `i` if nothing more will happen on it.
    fn maybe_close(&mut self, i: usize) {
        let Some(Some(c)) = self.conns.slab.get(i) else {
            return;
        };
        let finished = c.eof || c.closing || self.draining;
        if finished && c.inflight == 0 && !c.has_output() {
            self.close(i);
        }
    }

    fn close(&mut self, i: usize) {
        let Some(slot) = self.conns.slab.get_mut(i) else {
            return;
        };
        let Some(c) = slot.take() else { return };
        let _ = self.epoll.delete(c.stream.as_raw_fd());
        drop(c);
        self.conns.generations[i] = self.conns.generations[i].wrapping_add(1);
        self.conns.free.push(i);
        self.conns.live -= 1;
    }

    // ---- timers ----

    fn run_timers(&mut self) {
        if let Some(until) = self.listeners_paused_until
            && self.now_ns >= until
        {
            self.listeners_paused_until = None;
            for (li, l) in self.listeners.iter().enumerate() {
                let _ = self
                    .epoll
                    .add(l.as_raw_fd(), READ, TOKEN_LISTENER | li as u64);
            }
        }
        if self.now_ns < self.next_sweep_ns {
            return;
        }
        self.next_sweep_ns = self.now_ns + 1000 * NS_PER_MS;
        let idle = self.config.server.idle_timeout.as_nanos() as u64;
        if idle == 0 {
            return;
        }
        // A full scan once a second; a timer wheel is not needed so far.
        for i in 0..self.conns.slab.len() {
            let Some(Some(c)) = self.conns.slab.get(i) else {
                continue;
            };
            if c.inflight == 0
                && !c.has_output()
                && self.now_ns.saturating_sub(c.last_active_ns) > idle
            {
                debug!(conn = i, "closing idle connection");
                self.close(i);
            }
        }
    }
}
