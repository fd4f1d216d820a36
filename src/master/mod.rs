//! The master process: owns the listeners and the shared memory, starts
//! the proxy and the workers as separate processes (fork + exec of this
//! same binary), reaps and restarts them, and runs the shutdown.
//!
//! The master never runs plugin code and never touches client traffic. Its
//! loop waits on two fds: a signalfd (SIGCHLD, TERM, INT, QUIT, HUP, ...)
//! and the control channel to the proxy. Every child gets
//! `PR_SET_PDEATHSIG(SIGKILL)`, so none outlives the master.
//!
//! Worker slots: each worker runs in a slot (its own memfd with a ring
//! pair). A group has one slot per configured worker, plus spare slots
//! created on demand for replacements: a recycled worker's replacement
//! starts in a spare slot while the old one keeps serving, and the old
//! slot becomes the spare once its worker retires.

mod sys;

use std::collections::HashMap;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use halfsync_config::Config;
use halfsync_proxy::ProxySpec;
use halfsync_proxy::control::{
    Channel, KillReason, Received, Restart, ToMaster, ToProxy, describe_exit,
};
use halfsync_shm::{Slot, sys as shm_sys};
use halfsync_worker::{EXIT_PLUGIN_FAILED, WorkerSpec};
use tracing::{error, info, warn};

pub use sys::set_thread_name;

/// The environment variable that tells a re-executed `halfsync` which role
/// to play.
pub const ROLE_ENV: &str = "HALFSYNC_ROLE";

/// A worker that dies sooner than this after starting counts as a failed
/// start for the restart backoff.
const MIN_HEALTHY_LIFE: Duration = Duration::from_secs(1);

/// Failed starts in a row (see `on_child_exit`) after which restarts are
/// delayed. A few are tolerated: under a barrage of poisonous requests a
/// fresh worker's very first request may be one, and that alone must not
/// take the group down.
const FAILED_STARTS_BEFORE_BACKOFF: u32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    /// No worker and none wanted: a spare slot.
    Spare,
    /// Running as `pid` since `since`. `kill_at`: SIGKILL it then (the
    /// grace after a SIGABRT for a hung request).
    Running {
        pid: i32,
        since: Instant,
        kill_at: Option<Instant>,
    },
    /// Dead; waiting for the proxy to reset the slot, then `next`.
    Resetting { next: Restart },
    /// Reset; a new worker starts at `at`.
    Backoff { at: Instant },
    /// Not restarted: shutting down.
    Stopped,
}

struct SlotRec {
    group: usize,
    /// Worker number within the group, for titles and logs.
    label: u32,
    slot: Slot,
    eventfd: OwnedFd,
    life: Life,
    /// This slot's worker takes over from that slot's once ready.
    replaces: Option<usize>,
    /// The proxy asked for this worker to be stopped (replaced or drained).
    retiring: bool,
    /// Starts in a row that died young or failed init.
    failures: u32,
    restarts: u64,
    /// The current worker was seen serving (startup bookkeeping).
    ever_ready: bool,
    /// How the last worker in this slot ended.
    last_exit: Option<i32>,
}

struct ProxyProc {
    pid: i32,
    channel: Channel,
}

struct Master {
    exe: PathBuf,
    config: Config,
    config_toml: String,
    plugins: Vec<PathBuf>,
    pid: i32,
    listeners: Vec<TcpListener>,
    slots: Vec<SlotRec>,
    proxy: Option<ProxyProc>,
    signals: OwnedFd,
    /// Set once a stop began: when the grace period ends.
    stopping: Option<Instant>,
    /// Until every group has a worker serving. If every worker of a group
    /// fails to start meanwhile, halfsync gives up instead of serving
    /// nothing but BUSY (like nginx refusing to start).
    starting: bool,
    rng: fastrand::Rng,
}

/// Runs the server until it is stopped. Errors before the first child
/// starts (bad plugin, port in use) are returned; the caller prints them.
pub fn run(config: Config, exe: PathBuf) -> Result<()> {
    let plugins: Vec<PathBuf> = crate::probe::probe(&exe, &config, false)?
        .into_iter()
        .map(|p| p.path)
        .collect();

    let mut listeners = Vec::new();
    for addr in &config.server.listen {
        listeners.push(
            listen(*addr, config.server.backlog)
                .with_context(|| format!("cannot listen on {addr}"))?,
        );
    }
    let signals = sys::signalfd().context("signalfd")?;
    let config_toml = toml::to_string(&config).context("serializing config")?;
    let mut m = Master {
        exe,
        config,
        config_toml,
        plugins,
        pid: std::process::id() as i32,
        listeners,
        slots: Vec::new(),
        proxy: None,
        signals,
        stopping: None,
        starting: true,
        rng: fastrand::Rng::new(),
    };
    for gi in 0..m.config.groups.len() {
        for label in 0..m.config.groups[gi].workers {
            m.new_slot(gi, label)?;
        }
    }
    let addrs: Vec<String> = m
        .listeners
        .iter()
        .filter_map(|l| l.local_addr().ok().map(|a| a.to_string()))
        .collect();
    info!(
        listen = %addrs.join(","),
        workers = m.slots.len(),
        pid = m.pid,
        "halfsync starting"
    );
    m.start_proxy()?;
    for i in 0..m.slots.len() {
        m.start_worker(i, None)?;
    }
    m.run_loop()
}

fn listen(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(s.into())
}

impl Master {
    /// Creates a slot for group `gi` and hands it to the proxy.
    fn new_slot(&mut self, gi: usize, label: u32) -> Result<usize> {
        let name = &self.config.groups[gi].name;
        let slot = Slot::create(
            &format!("halfsync-{name}-{label}"),
            self.config.server.ring_size as usize,
        )
        .with_context(|| format!("creating shared memory for worker {name} {label}"))?;
        let eventfd = shm_sys::eventfd().context("eventfd")?;
        self.slots.push(SlotRec {
            group: gi,
            label,
            slot,
            eventfd,
            life: Life::Spare,
            replaces: None,
            retiring: false,
            failures: 0,
            restarts: 0,
            ever_ready: false,
            last_exit: None,
        });
        let i = self.slots.len() - 1;
        self.send_slot(i);
        Ok(i)
    }

    fn send_slot(&self, i: usize) {
        let Some(p) = &self.proxy else { return };
        let s = &self.slots[i];
        let msg = ToProxy::AddSlot {
            slot: i as u32,
            group: s.group as u32,
            label: s.label,
        };
        let fds = [s.slot.fd().as_raw_fd(), s.eventfd.as_raw_fd()];
        if let Err(e) = p.channel.send_to_proxy(msg, &fds) {
            error!("cannot hand slot {i} to the proxy: {e}");
        }
    }

    fn tell_proxy(&self, msg: ToProxy) {
        if let Some(p) = &self.proxy
            && let Err(e) = p.channel.send_to_proxy(msg, &[])
        {
            warn!("control channel: {e}");
        }
    }

    fn start_proxy(&mut self) -> Result<()> {
        let (master_end, proxy_end) = Channel::pair().context("control socketpair")?;
        let spec = ProxySpec {
            config: self.config_toml.clone(),
            control_fd: proxy_end.fd().as_raw_fd(),
            listener_fds: self.listeners.iter().map(|l| l.as_raw_fd()).collect(),
        };
        let mut keep = vec![spec.control_fd];
        keep.extend(&spec.listener_fds);
        let pid = sys::spawn(
            &self.exe,
            "halfsync: proxy",
            "proxy",
            &[(halfsync_proxy::SPEC_ENV, spec.to_env())],
            &keep,
            self.pid,
        )
        .context("starting the proxy")?;
        drop(proxy_end);
        info!(pid, "proxy started");
        self.proxy = Some(ProxyProc {
            pid,
            channel: master_end,
        });
        for i in 0..self.slots.len() {
            self.send_slot(i);
        }
        Ok(())
    }

    fn start_worker(&mut self, i: usize, replaces: Option<usize>) -> Result<()> {
        let s = &mut self.slots[i];
        let g = &self.config.groups[s.group];
        let jitter = match g.max_requests_jitter {
            0 => 0,
            j => self.rng.u64(0..=j),
        };
        let spec = WorkerSpec {
            group: g.name.clone(),
            index: s.label,
            plugin: self.plugins[s.group].clone(),
            plugin_config: g.plugin_config_toml(),
            memfd: s.slot.fd().as_raw_fd(),
            eventfd: s.eventfd.as_raw_fd(),
            ring_size: self.config.server.ring_size,
            max_reply: self.config.server.max_frame - halfsync_protocol::MIN_LENGTH,
            queue_timeout_ns: g.queue_timeout.as_nanos().min(u64::MAX as u128) as u64,
            max_requests: if g.max_requests == 0 {
                0
            } else {
                g.max_requests.saturating_add(jitter)
            },
            max_rss: g.max_rss,
        };
        let ctl = s.slot.control();
        ctl.set_generation(ctl.generation().wrapping_add(1));
        let title = format!("halfsync: worker {} {}", g.name, s.label);
        let pid = sys::spawn(
            &self.exe,
            &title,
            "worker",
            &[(halfsync_worker::SPEC_ENV, spec.to_env())],
            &[spec.memfd, spec.eventfd],
            self.pid,
        )
        .with_context(|| format!("starting worker {} {}", g.name, s.label))?;
        s.life = Life::Running {
            pid,
            since: Instant::now(),
            kill_at: None,
        };
        s.replaces = replaces;
        s.retiring = false;
        self.tell_proxy(ToProxy::WorkerStarted {
            slot: i as u32,
            pid,
            replaces: replaces.map(|r| r as u32),
        });
        Ok(())
    }

    fn run_loop(&mut self) -> Result<()> {
        loop {
            let timeout = self.next_timeout();
            let control_fd = self
                .proxy
                .as_ref()
                .map_or(-1, |p| p.channel.fd().as_raw_fd());
            let [sig_ready, ctl_ready] =
                sys::poll_readable([self.signals.as_raw_fd(), control_fd], timeout)
                    .context("poll")?;
            if sig_ready {
                while let Some(sig) = sys::read_signal(&self.signals).context("signalfd")? {
                    self.on_signal(sig);
                }
            }
            if ctl_ready {
                self.read_control();
            }
            self.run_timers();
            if self.starting {
                self.check_startup()?;
            }
            if self.stopping.is_some()
                && self.proxy.is_none()
                && self
                    .slots
                    .iter()
                    .all(|s| !matches!(s.life, Life::Running { .. }))
            {
                info!("halfsync stopped");
                return Ok(());
            }
        }
    }

    /// While starting: notes workers that came up; fails if a group has
    /// none and all its workers failed to start twice.
    fn check_startup(&mut self) -> Result<()> {
        for s in &mut self.slots {
            if let Life::Running { pid, .. } = s.life {
                let ctl = s.slot.control();
                if ctl.pid() == pid as u32
                    && matches!(
                        ctl.state(),
                        Ok(halfsync_shm::WorkerState::Idle | halfsync_shm::WorkerState::Busy)
                    )
                {
                    s.ever_ready = true;
                }
            }
        }
        let groups = self.config.groups.len();
        let ready = (0..groups)
            .filter(|&g| self.slots.iter().any(|s| s.group == g && s.ever_ready))
            .count();
        if ready == groups {
            self.starting = false;
            info!(workers = self.slots.len(), "halfsync ready");
            return Ok(());
        }
        for (g, group) in self.config.groups.iter().enumerate() {
            let mine: Vec<&SlotRec> = self.slots.iter().filter(|s| s.group == g).collect();
            let failed = mine.iter().all(|s| !s.ever_ready && s.failures >= 2);
            if failed {
                let how = mine
                    .iter()
                    .filter_map(|s| {
                        s.last_exit
                            .map(|e| format!("worker {}: {}", s.label, describe_exit(e)))
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                let msg = format!(
                    "group {}: no worker could start ({how}); the plugin's error is in the log above",
                    group.name
                );
                self.kill_everything();
                self.reap_all(Duration::from_secs(5));
                return Err(anyhow!(msg));
            }
        }
        Ok(())
    }

    /// Reaps every child, waiting up to `limit` (after SIGKILLs).
    fn reap_all(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            match sys::reap() {
                Ok(Some((pid, _))) => {
                    if self.proxy.as_ref().is_some_and(|p| p.pid == pid) {
                        self.proxy = None;
                    }
                    for s in &mut self.slots {
                        if matches!(s.life, Life::Running { pid: p, .. } if p == pid) {
                            s.life = Life::Stopped;
                        }
                    }
                }
                Ok(None) => {
                    let alive = self.proxy.is_some()
                        || self
                            .slots
                            .iter()
                            .any(|s| matches!(s.life, Life::Running { .. }));
                    if !alive {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(_) => return,
            }
        }
    }

    fn next_timeout(&self) -> Duration {
        let now = Instant::now();
        let mut next = now + Duration::from_secs(if self.starting { 0 } else { 1 });
        if self.starting {
            next += Duration::from_millis(10);
        }
        for s in &self.slots {
            match s.life {
                Life::Backoff { at } => next = next.min(at),
                Life::Running {
                    kill_at: Some(at), ..
                } => next = next.min(at),
                _ => {}
            }
        }
        if let Some(deadline) = self.stopping {
            next = next.min(deadline);
        }
        next.saturating_duration_since(now)
    }

    fn on_signal(&mut self, sig: i32) {
        match sig {
            libc::SIGCHLD => self.reap_children(),
            libc::SIGTERM | libc::SIGINT | libc::SIGQUIT => {
                if self.stopping.is_some() {
                    warn!("second stop signal: stopping now");
                    self.kill_everything();
                } else {
                    self.begin_stop();
                }
            }
            libc::SIGHUP => {
                warn!("SIGHUP: live reload is not implemented yet; configuration unchanged")
            }
            _ => {}
        }
    }

    fn begin_stop(&mut self) {
        let grace = self.config.server.shutdown_grace;
        info!(
            grace_ms = grace.as_millis() as u64,
            "stopping: draining in-flight requests"
        );
        self.stopping = Some(Instant::now() + grace);
        // The proxy holds its own copies; once it closes them the port is free.
        self.listeners.clear();
        match &self.proxy {
            Some(_) => self.tell_proxy(ToProxy::Shutdown),
            None => self.stop_workers(),
        }
    }

    /// Asks a worker to finish its current request and exit.
    fn stop_worker(&mut self, i: usize) {
        let s = &mut self.slots[i];
        if let Life::Running { pid, .. } = s.life {
            s.retiring = true;
            s.slot.control().request_stop();
            s.slot.requests().wake_consumer();
            sys::kill(pid, libc::SIGTERM);
        }
    }

    /// Asks every worker to stop; nothing will be restarted.
    fn stop_workers(&mut self) {
        for i in 0..self.slots.len() {
            match self.slots[i].life {
                Life::Running { .. } => self.stop_worker(i),
                Life::Resetting { .. } | Life::Backoff { .. } | Life::Spare => {
                    self.slots[i].life = Life::Stopped
                }
                Life::Stopped => {}
            }
        }
    }

    fn kill_everything(&mut self) {
        if let Some(p) = &self.proxy {
            sys::kill(p.pid, libc::SIGKILL);
        }
        for s in &mut self.slots {
            match s.life {
                Life::Running { pid, .. } => sys::kill(pid, libc::SIGKILL),
                _ => s.life = Life::Stopped,
            }
        }
    }

    fn reap_children(&mut self) {
        loop {
            match sys::reap() {
                Ok(Some((pid, how))) => self.on_child_exit(pid, how),
                Ok(None) => return,
                Err(e) => {
                    error!("waitpid: {e}");
                    return;
                }
            }
        }
    }

    fn on_child_exit(&mut self, pid: i32, how: i32) {
        if self.proxy.as_ref().is_some_and(|p| p.pid == pid) {
            self.proxy = None;
            if self.stopping.is_some() {
                info!(pid, "proxy exited");
                self.stop_workers();
            } else {
                error!(
                    pid,
                    "proxy died ({}); restarting it and every worker",
                    describe_exit(how)
                );
                self.restart_all();
            }
            return;
        }
        let Some(i) = self
            .slots
            .iter()
            .position(|s| matches!(s.life, Life::Running { pid: p, .. } if p == pid))
        else {
            return; // the plugin probe
        };
        let stopping = self.stopping.is_some();
        let s = &mut self.slots[i];
        let Life::Running { since, .. } = s.life else {
            return;
        };
        let name = &self.config.groups[s.group].name;
        // A replacement that dies before taking over is not restarted: its
        // predecessor still serves and the proxy asks again later.
        let failed_replacement = s.replaces.is_some();
        let next = if stopping || s.retiring || failed_replacement {
            Restart::Never
        } else {
            // A failed start: init failed, or it died young without
            // serving a single request (a plugin that crashes on every
            // request). A worker that served before crashing is replaced
            // at once, however young.
            let served = s.slot.control().served();
            s.ever_ready |= served > 0;
            if how == EXIT_PLUGIN_FAILED || (since.elapsed() < MIN_HEALTHY_LIFE && served == 0) {
                s.failures += 1;
            } else {
                s.failures = 0;
            }
            if s.failures >= FAILED_STARTS_BEFORE_BACKOFF {
                Restart::Later
            } else {
                Restart::Now
            }
        };
        if stopping || s.retiring {
            info!(group = %name, worker = s.label, pid, "worker exited ({})", describe_exit(how));
        } else {
            warn!(group = %name, worker = s.label, pid, "worker died ({})", describe_exit(how));
        }
        s.life = Life::Resetting { next };
        s.last_exit = Some(how);
        match &self.proxy {
            Some(_) => self.tell_proxy(ToProxy::WorkerExited {
                slot: i as u32,
                pid,
                status: how,
                restart: next,
            }),
            None => {
                self.slots[i].slot.reset();
                self.slot_reset(i);
            }
        }
    }

    /// The proxy has cleaned up a dead worker's slot: start the next
    /// worker there now, later, or never.
    fn slot_reset(&mut self, i: usize) {
        let Life::Resetting { next } = self.slots[i].life else {
            return;
        };
        let s = &mut self.slots[i];
        s.replaces = None;
        s.retiring = false;
        s.life = match next {
            _ if self.stopping.is_some() => Life::Stopped,
            Restart::Never => Life::Spare,
            Restart::Now => Life::Backoff { at: Instant::now() },
            Restart::Later => {
                let g = &self.config.groups[s.group];
                // restart_delay, then doubling, capped.
                let doublings = s
                    .failures
                    .saturating_sub(FAILED_STARTS_BEFORE_BACKOFF)
                    .min(20);
                let delay = g
                    .restart_delay
                    .saturating_mul(1 << doublings)
                    .min(g.restart_delay_max);
                warn!(
                    group = %g.name,
                    worker = s.label,
                    failures = s.failures,
                    "worker keeps failing; restarting in {} ms",
                    delay.as_millis()
                );
                Life::Backoff {
                    at: Instant::now() + delay,
                }
            }
        };
        self.run_timers();
    }

    fn read_control(&mut self) {
        loop {
            let Some(p) = &self.proxy else { return };
            let msg = match p.channel.recv_from_proxy() {
                Ok(Received::Msg(m)) => m,
                Ok(Received::Empty) => return,
                // The proxy is gone; SIGCHLD tells the rest.
                Ok(Received::Closed) => return,
                Err(e) => {
                    warn!("control channel: {e}");
                    return;
                }
            };
            match msg {
                ToMaster::SlotReset { slot } => {
                    if (slot as usize) < self.slots.len() {
                        self.slot_reset(slot as usize);
                    }
                }
                ToMaster::KillWorker { slot, pid, reason } => {
                    self.kill_worker(slot as usize, pid, reason)
                }
                ToMaster::Recycle { slot, pid } => self.recycle(slot as usize, pid),
                ToMaster::Retire { slot, pid } => {
                    let i = slot as usize;
                    if self.running_pid(i) == Some(pid) {
                        // Its replacement is a regular worker from now on.
                        for s in &mut self.slots {
                            if s.replaces == Some(i) {
                                s.replaces = None;
                            }
                        }
                        self.stop_worker(i);
                    }
                }
                ToMaster::Drained => {
                    info!("proxy drained");
                    self.stop_workers();
                }
            }
        }
    }

    fn running_pid(&self, i: usize) -> Option<i32> {
        match self.slots.get(i)?.life {
            Life::Running { pid, .. } => Some(pid),
            _ => None,
        }
    }

    fn kill_worker(&mut self, i: usize, pid: i32, reason: KillReason) {
        if self.running_pid(i) != Some(pid) {
            return;
        }
        let s = &mut self.slots[i];
        let grace = self.config.groups[s.group].timeout_kill_grace;
        if reason == KillReason::RequestTimeout && !grace.is_zero() {
            // A chance for a crash handler to record where it hung.
            sys::kill(pid, libc::SIGABRT);
            if let Life::Running { kill_at, .. } = &mut s.life {
                *kill_at = Some(Instant::now() + grace);
            }
        } else {
            sys::kill(pid, libc::SIGKILL);
        }
    }

    /// Starts a replacement for the worker of slot `old` in a spare slot of
    /// its group (made if there is none). The old one keeps serving until
    /// the proxy retires it.
    fn recycle(&mut self, old: usize, pid: i32) {
        if self.stopping.is_some() || self.running_pid(old) != Some(pid) {
            return;
        }
        let (group, label) = (self.slots[old].group, self.slots[old].label);
        let spare = self
            .slots
            .iter()
            .position(|s| s.group == group && s.life == Life::Spare);
        let i = match spare {
            Some(i) => {
                self.slots[i].label = label;
                i
            }
            None => match self.new_slot(group, label) {
                Ok(i) => i,
                Err(e) => {
                    error!("{e:#}");
                    return;
                }
            },
        };
        if let Err(e) = self.start_worker(i, Some(old)) {
            error!("{e:#}");
            self.slots[i].life = Life::Spare;
        }
    }

    fn run_timers(&mut self) {
        let now = Instant::now();
        if let Some(deadline) = self.stopping
            && now >= deadline
        {
            let left = self.proxy.is_some() as usize
                + self
                    .slots
                    .iter()
                    .filter(|s| matches!(s.life, Life::Running { .. }))
                    .count();
            if left > 0 {
                warn!(
                    processes = left,
                    "shutdown grace period over; killing what is left"
                );
                self.kill_everything();
            }
            // Reaped on SIGCHLD; do not kill again.
            self.stopping = Some(now + Duration::from_secs(3600));
        }
        for i in 0..self.slots.len() {
            match self.slots[i].life {
                Life::Running {
                    pid,
                    kill_at: Some(at),
                    ..
                } if now >= at => {
                    sys::kill(pid, libc::SIGKILL);
                }
                Life::Backoff { at } if now >= at => {
                    self.slots[i].restarts += 1;
                    if let Err(e) = self.start_worker(i, None) {
                        error!("{e:#}");
                        let s = &mut self.slots[i];
                        s.failures += 1;
                        s.life = Life::Resetting {
                            next: Restart::Later,
                        };
                        self.slot_reset(i);
                    }
                }
                _ => {}
            }
        }
    }

    /// The proxy died: its bookkeeping of which worker holds which request
    /// is gone, so every worker is replaced along with it.
    fn restart_all(&mut self) {
        let mut pids = HashMap::new();
        for (i, s) in self.slots.iter().enumerate() {
            if let Life::Running { pid, .. } = s.life {
                sys::kill(pid, libc::SIGKILL);
                pids.insert(pid, i);
            }
        }
        // SIGKILLed children die promptly; reap them before touching their slots.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pids.is_empty() && Instant::now() < deadline {
            match sys::reap() {
                Ok(Some((pid, _))) => {
                    pids.remove(&pid);
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                Err(_) => break,
            }
        }
        // Back to the configured workers; spares stay spare.
        let mut wanted = Vec::new();
        for (i, s) in self.slots.iter_mut().enumerate() {
            s.slot.reset();
            let was_worker = !matches!(s.life, Life::Spare) && s.replaces.is_none() && !s.retiring;
            s.life = Life::Spare;
            s.replaces = None;
            s.retiring = false;
            if was_worker {
                wanted.push(i);
            }
        }
        if let Err(e) = self.start_proxy() {
            error!("{e:#}; stopping");
            self.stopping = Some(Instant::now());
            return;
        }
        for i in wanted {
            if let Err(e) = self.start_worker(i, None) {
                error!("{e:#}");
            }
        }
    }
}
