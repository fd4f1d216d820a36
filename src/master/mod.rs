//! The master process: owns the listeners and the shared memory, starts
//! the proxy and the workers as separate processes (fork + exec of this
//! same binary), reaps and restarts them, and runs the shutdown.
//!
//! The master never runs plugin code and never touches client traffic. Its
//! loop waits on two fds: a signalfd (SIGCHLD, TERM, INT, QUIT, HUP, ...)
//! and the control channel to the proxy. Every child gets
//! `PR_SET_PDEATHSIG(SIGKILL)`, so none outlives the master.

mod sys;

use std::collections::HashMap;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use halfsync_config::Config;
use halfsync_proxy::control::{Channel, Received, ToMaster, ToProxy};
use halfsync_proxy::{ProxySpec, SlotSpec};
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
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    /// Running as `pid` since `since`.
    Running { pid: i32, since: Instant },
    /// Dead; waiting for the proxy to reset the slot.
    Resetting,
    /// Slot reset; a new worker starts at `at`.
    Backoff { at: Instant },
    /// Not restarted (shutting down).
    Stopped,
}

struct WorkerProc {
    group: usize,
    index: u32,
    slot: Slot,
    eventfd: OwnedFd,
    life: Life,
    /// Starts in a row that died young or failed init.
    failures: u32,
    restarts: u64,
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
    workers: Vec<WorkerProc>,
    proxy: Option<ProxyProc>,
    signals: OwnedFd,
    /// Set once a stop began: when the grace period ends.
    stopping: Option<Instant>,
}

/// Runs the server until it is stopped. Errors before the first child
/// starts (bad plugin, port in use) are returned; the caller prints them.
pub fn run(config: Config, exe: PathBuf) -> Result<()> {
    let exe_dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let plugins: Vec<PathBuf> = config
        .groups
        .iter()
        .map(|g| config.plugin_path(g, &exe_dir))
        .collect();
    probe_plugins(&exe, &plugins)?;

    let mut listeners = Vec::new();
    for addr in &config.server.listen {
        listeners.push(
            listen(*addr, config.server.backlog)
                .with_context(|| format!("cannot listen on {addr}"))?,
        );
    }
    let capacity = config.server.ring_size as usize;
    let mut workers = Vec::new();
    for (gi, g) in config.groups.iter().enumerate() {
        for index in 0..g.workers {
            let slot = Slot::create(&format!("halfsync-{}-{index}", g.name), capacity)
                .with_context(|| format!("creating shared memory for worker {} {index}", g.name))?;
            let eventfd = shm_sys::eventfd().context("eventfd")?;
            workers.push(WorkerProc {
                group: gi,
                index,
                slot,
                eventfd,
                life: Life::Stopped,
                failures: 0,
                restarts: 0,
            });
        }
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
        workers,
        proxy: None,
        signals,
        stopping: None,
    };
    let addrs: Vec<String> = m
        .listeners
        .iter()
        .filter_map(|l| l.local_addr().ok().map(|a| a.to_string()))
        .collect();
    info!(
        listen = %addrs.join(","),
        workers = m.workers.len(),
        pid = m.pid,
        "halfsync starting"
    );
    m.start_proxy()?;
    for i in 0..m.workers.len() {
        m.start_worker(i)?;
    }
    m.run_loop()
}

/// Test-loads every plugin in a child process, so the master itself never
/// runs plugin code (not even a library constructor).
fn probe_plugins(exe: &Path, plugins: &[PathBuf]) -> Result<()> {
    let list: Vec<String> = plugins.iter().map(|p| p.display().to_string()).collect();
    let out = Command::new(exe)
        .arg0("halfsync: plugin probe")
        .env(ROLE_ENV, "probe")
        .env("HALFSYNC_PROBE_PLUGINS", list.join("\n"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("starting the plugin probe")?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr);
        let first = msg
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("plugin probe failed");
        bail!("{}", first.trim());
    }
    Ok(())
}

fn listen(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(s.into())
}

/// Starts `exe` in a role with the given fds inherited (everything else the
/// master holds is close-on-exec) and returns its pid.
fn spawn(
    exe: &Path,
    title: &str,
    role: &str,
    env: &[(&str, String)],
    keep: &[RawFd],
    master_pid: i32,
) -> std::io::Result<i32> {
    let mut cmd = Command::new(exe);
    cmd.arg0(title).env(ROLE_ENV, role).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let keep = keep.to_vec();
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe calls (fcntl, prctl, getppid); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &keep {
                shm_sys::clear_cloexec(fd)?;
            }
            sys::die_with_parent(master_pid)
        });
    }
    let child = cmd.spawn()?;
    // The master reaps children itself with waitpid(-1); std's Child is
    // dropped without waiting, which neither kills nor reaps.
    Ok(child.id() as i32)
}

impl Master {
    fn start_proxy(&mut self) -> Result<()> {
        let (master_end, proxy_end) = Channel::pair().context("control socketpair")?;
        let spec = ProxySpec {
            config: self.config_toml.clone(),
            control_fd: proxy_end.fd().as_raw_fd(),
            listener_fds: self.listeners.iter().map(|l| l.as_raw_fd()).collect(),
            slots: self
                .workers
                .iter()
                .map(|w| SlotSpec {
                    group: w.group as u32,
                    index: w.index,
                    memfd: w.slot.fd().as_raw_fd(),
                    eventfd: w.eventfd.as_raw_fd(),
                })
                .collect(),
        };
        let mut keep = vec![spec.control_fd];
        keep.extend(&spec.listener_fds);
        for s in &spec.slots {
            keep.extend([s.memfd, s.eventfd]);
        }
        let pid = spawn(
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
        Ok(())
    }

    fn start_worker(&mut self, i: usize) -> Result<()> {
        let w = &mut self.workers[i];
        let g = &self.config.groups[w.group];
        let spec = WorkerSpec {
            group: g.name.clone(),
            index: w.index,
            plugin: self.plugins[w.group].clone(),
            plugin_config: g.plugin_config_toml(),
            memfd: w.slot.fd().as_raw_fd(),
            eventfd: w.eventfd.as_raw_fd(),
            ring_size: self.config.server.ring_size,
            max_reply: self.config.server.max_frame - halfsync_protocol::MIN_LENGTH,
        };
        w.slot
            .control()
            .set_generation(w.slot.control().generation().wrapping_add(1));
        let title = format!("halfsync: worker {} {}", g.name, w.index);
        let pid = spawn(
            &self.exe,
            &title,
            "worker",
            &[(halfsync_worker::SPEC_ENV, spec.to_env())],
            &[spec.memfd, spec.eventfd],
            self.pid,
        )
        .with_context(|| format!("starting worker {} {}", g.name, w.index))?;
        w.life = Life::Running {
            pid,
            since: Instant::now(),
        };
        if let Some(p) = &self.proxy {
            let _ = p.channel.send_to_proxy(ToProxy::WorkerStarted {
                slot: i as u32,
                pid,
            });
        }
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
            if self.stopping.is_some()
                && self.proxy.is_none()
                && self.workers.iter().all(|w| w.life == Life::Stopped)
            {
                info!("halfsync stopped");
                return Ok(());
            }
        }
    }

    fn next_timeout(&self) -> Duration {
        let now = Instant::now();
        let mut next = now + Duration::from_secs(1);
        for w in &self.workers {
            if let Life::Backoff { at } = w.life {
                next = next.min(at);
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
            Some(p) => {
                let _ = p.channel.send_to_proxy(ToProxy::Shutdown);
            }
            None => self.stop_workers(),
        }
    }

    /// Asks every worker to finish its current request and exit.
    fn stop_workers(&mut self) {
        for w in &mut self.workers {
            match w.life {
                Life::Running { pid, .. } => {
                    w.slot.control().request_stop();
                    w.slot.requests().wake_consumer();
                    sys::kill(pid, libc::SIGTERM);
                }
                Life::Resetting | Life::Backoff { .. } => w.life = Life::Stopped,
                Life::Stopped => {}
            }
        }
    }

    fn kill_everything(&mut self) {
        if let Some(p) = &self.proxy {
            sys::kill(p.pid, libc::SIGKILL);
        }
        for w in &mut self.workers {
            match w.life {
                Life::Running { pid, .. } => sys::kill(pid, libc::SIGKILL),
                _ => w.life = Life::Stopped,
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
                    describe(how)
                );
                self.restart_all();
            }
            return;
        }
        let Some(i) = self
            .workers
            .iter()
            .position(|w| matches!(w.life, Life::Running { pid: p, .. } if p == pid))
        else {
            return; // the plugin probe, or a child of a previous proxy generation
        };
        let w = &mut self.workers[i];
        let Life::Running { since, .. } = w.life else {
            return;
        };
        let name = &self.config.groups[w.group].name;
        if self.stopping.is_some() {
            w.life = Life::Stopped;
            info!(group = %name, worker = w.index, pid, "worker exited ({})", describe(how));
            return;
        }
        if how == EXIT_PLUGIN_FAILED || since.elapsed() < MIN_HEALTHY_LIFE {
            w.failures += 1;
        } else {
            w.failures = 0;
        }
        w.life = Life::Resetting;
        if how != 0 {
            warn!(group = %name, worker = w.index, pid, "worker died ({})", describe(how));
        }
        match &self.proxy {
            Some(p) => {
                let _ = p.channel.send_to_proxy(ToProxy::WorkerExited {
                    slot: i as u32,
                    pid,
                    status: how,
                });
            }
            None => {
                w.slot.reset();
                self.schedule_restart(i);
            }
        }
    }

    fn schedule_restart(&mut self, i: usize) {
        let w = &mut self.workers[i];
        if self.stopping.is_some() {
            w.life = Life::Stopped;
            return;
        }
        // The first failure restarts at once; then 100 ms, 200 ms, ... 5 s.
        let delay = match w.failures {
            0 | 1 => Duration::ZERO,
            n => BACKOFF_FIRST
                .saturating_mul(1 << (n - 2).min(16))
                .min(BACKOFF_MAX),
        };
        if delay > Duration::ZERO {
            warn!(
                group = %self.config.groups[w.group].name,
                worker = w.index,
                failures = w.failures,
                "worker keeps failing; restarting in {} ms",
                delay.as_millis()
            );
        }
        w.life = Life::Backoff {
            at: Instant::now() + delay,
        };
        self.run_timers();
    }

    fn read_control(&mut self) {
        loop {
            let Some(p) = &self.proxy else { return };
            match p.channel.recv_from_proxy() {
                Ok(Received::Msg(ToMaster::SlotReset { slot })) => {
                    let i = slot as usize;
                    if self
                        .workers
                        .get(i)
                        .is_some_and(|w| w.life == Life::Resetting)
                    {
                        self.schedule_restart(i);
                    }
                }
                Ok(Received::Msg(ToMaster::KillWorker { slot, pid })) => {
                    if let Some(w) = self.workers.get(slot as usize)
                        && matches!(w.life, Life::Running { pid: p, .. } if p == pid)
                    {
                        sys::kill(pid, libc::SIGKILL);
                    }
                }
                Ok(Received::Msg(ToMaster::Drained)) => {
                    info!("proxy drained");
                    self.stop_workers();
                }
                Ok(Received::Empty) => return,
                // The proxy is gone; SIGCHLD tells the rest.
                Ok(Received::Closed) => return,
                Err(e) => {
                    warn!("control channel: {e}");
                    return;
                }
            }
        }
    }

    fn run_timers(&mut self) {
        let now = Instant::now();
        if let Some(deadline) = self.stopping
            && now >= deadline
        {
            let left = self.proxy.is_some() as usize
                + self
                    .workers
                    .iter()
                    .filter(|w| matches!(w.life, Life::Running { .. }))
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
        for i in 0..self.workers.len() {
            if let Life::Backoff { at } = self.workers[i].life
                && now >= at
            {
                self.workers[i].restarts += 1;
                if let Err(e) = self.start_worker(i) {
                    error!("{e:#}");
                    self.workers[i].failures += 1;
                    self.workers[i].life = Life::Resetting;
                    self.schedule_restart(i);
                }
            }
        }
    }

    /// The proxy died: its bookkeeping of which worker holds which request
    /// is gone, so every worker is replaced along with it.
    fn restart_all(&mut self) {
        let mut pids = HashMap::new();
        for (i, w) in self.workers.iter().enumerate() {
            if let Life::Running { pid, .. } = w.life {
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
        for w in &mut self.workers {
            w.slot.reset();
            w.life = Life::Stopped;
        }
        if let Err(e) = self.start_proxy() {
            error!("{e:#}; stopping");
            self.stopping = Some(Instant::now());
            return;
        }
        for i in 0..self.workers.len() {
            if let Err(e) = self.start_worker(i) {
                error!("{e:#}");
            }
        }
    }
}

fn describe(how: i32) -> String {
    if how < 0 {
        let sig = -how;
        let name = match sig {
            libc::SIGKILL => "SIGKILL",
            libc::SIGSEGV => "SIGSEGV",
            libc::SIGABRT => "SIGABRT",
            libc::SIGBUS => "SIGBUS",
            libc::SIGTERM => "SIGTERM",
            libc::SIGFPE => "SIGFPE",
            libc::SIGILL => "SIGILL",
            _ => "signal",
        };
        format!("killed by {name} ({sig})")
    } else {
        format!("exit code {how}")
    }
}
