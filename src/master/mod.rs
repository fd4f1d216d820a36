//! The master process: owns the listeners, the shared memory and the
//! configuration; starts the proxy and the workers as separate processes
//! (fork + exec of this same binary), reaps and restarts them, and runs
//! reloads, scaling and the shutdown.
//!
//! The master never runs plugin code and never touches client traffic. Its
//! loop polls a signalfd (SIGCHLD, TERM, INT, QUIT, HUP, USR1), the control
//! channel to the proxy, and the admin socket (plus the metrics listener
//! if configured). Every child gets `PR_SET_PDEATHSIG(SIGKILL)`, so none
//! outlives the master.
//!
//! Worker slots: each worker runs in a slot (its own memfd with a ring
//! pair). A group has one slot per worker, plus spare slots made on demand:
//! a replacement (recycling, reload) starts in a spare slot while the old
//! worker keeps serving, and the old slot becomes the spare once its worker
//! retires. Groups have stable ids (their index in `groups`, never reused),
//! so the proxy can tell a changed group from a new one across reloads.

mod admin;
mod notify;
mod reload;
mod report;
pub(crate) mod sys;

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use halfsync_config::{Config, Pool};
use halfsync_proxy::ProxySpec;
use halfsync_proxy::control::{
    Channel, KillReason, Received, Restart, ToMaster, ToProxy, describe_exit,
};
use halfsync_proxy::stats::{STATUSES, Stats};
use halfsync_shm::{Slot, WorkerState, sys as shm_sys};

use crate::plugin_file::PluginFile;
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

/// The least time between attempts to start a worker when starting one
/// fails in the master itself (fork, a pipe or memfd: out of descriptors
/// or processes), whatever the group's `restart_delay`.
const SPAWN_RETRY_MIN: Duration = Duration::from_secs(1);

/// How often dynamic pools are resized, and how many checks in a row a
/// pool must have too many idle workers before one is retired.
const POOL_CHECK: Duration = Duration::from_secs(1);
/// A proxy whose loop has not turned for this long fails the health
/// check (it turns at least once a second).
const PROXY_SILENT_NS: u64 = 5_000_000_000;
const POOL_SHRINK_AFTER: u32 = 3;

/// A growing dynamic pool starts one worker at its first check, then
/// twice as many at each check in a row that still finds it short, up to
/// this many at once (PHP-FPM's `pm.max_spawn_rate` default): a burst is
/// met within seconds, not one worker a second.
const POOL_MAX_SPAWN_RATE: u32 = 32;

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

/// Why a worker process ended, for `halfsync_worker_restarts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// Died on its own (signal or exit) while it should have been serving.
    Crash,
    /// Its plugin's init failed.
    InitFailed,
    /// Killed: a request ran past `request_timeout`.
    Timeout,
    /// Killed: it corrupted its shared memory.
    Corrupt,
    /// Killed: its init ran past `init_timeout`.
    InitTimeout,
    /// Killed: it took none of its requests past `request_timeout`.
    Unresponsive,
    /// Replaced after `max_requests` or `max_rss`.
    Recycle,
    /// Replaced by a reload.
    Reload,
    /// Retired because its group shrank or went away.
    Scale,
    /// Killed because the proxy process it served died.
    ProxyDied,
}

// `cause as usize` indexes `Cause::ALL` and the `ended` counters.
const _: () = {
    let mut i = 0;
    while i < Cause::ALL.len() {
        assert!(Cause::ALL[i] as usize == i);
        i += 1;
    }
};

impl Cause {
    /// Every cause, in declaration order (`cause as usize` indexes it).
    pub(crate) const ALL: [Cause; 10] = [
        Cause::Crash,
        Cause::InitFailed,
        Cause::Timeout,
        Cause::Corrupt,
        Cause::InitTimeout,
        Cause::Unresponsive,
        Cause::Recycle,
        Cause::Reload,
        Cause::Scale,
        Cause::ProxyDied,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Cause::Crash => "crash",
            Cause::InitFailed => "init_failed",
            Cause::Timeout => "timeout",
            Cause::Corrupt => "corrupt",
            Cause::InitTimeout => "init_timeout",
            Cause::Unresponsive => "unresponsive",
            Cause::Recycle => "recycle",
            Cause::Reload => "reload",
            Cause::Scale => "scale",
            Cause::ProxyDied => "proxy_died",
        }
    }
}

/// One `[[group]]`, by stable id (its index in `Master::groups`).
pub(crate) struct GroupRec {
    pub(crate) config: halfsync_config::Group,
    /// The plugin file its workers load (held open, see
    /// [`crate::plugin_file`]).
    pub(crate) plugin: Rc<PluginFile>,
    /// The plugin's name and version, as the probe read them from its table.
    pub(crate) plugin_version: String,
    /// The configuration generation its workers should run.
    pub(crate) generation: u64,
    /// Gone from the configuration; its workers drain and are not replaced.
    pub(crate) retired: bool,
    /// Worker processes ended, by [`Cause`] (index in `Cause::ALL`).
    pub(crate) ended: [u64; Cause::ALL.len()],
    /// CPU of its worker processes that ended (reaped).
    pub(crate) ended_cpu: sys::CpuTime,
    /// Plugin log lines its ended workers dropped over their budget.
    pub(crate) ended_log_dropped: u64,
    /// Lines of its workers' output the master dropped over budget (the
    /// workers' [`Captured`] pipes add to it).
    pub(crate) output_dropped: Rc<std::cell::Cell<u64>>,
    /// Dynamic pools: checks in a row with too many idle workers.
    idle_checks: u32,
    /// Dynamic pools: workers to start at the next check that finds the
    /// pool short (doubles while it stays short, see
    /// [`POOL_MAX_SPAWN_RATE`]).
    spawn_rate: u32,
    /// Dynamic pools: when the log last said that requests wait with the
    /// pool at `max_workers`.
    max_warned: Option<Instant>,
    /// Replies counted in slots that went to another group since (see
    /// `Master::rehome`): still this group's.
    moved_replies: [u64; STATUSES],
}

impl GroupRec {
    /// A group of configuration generation `generation`, nothing ended yet.
    pub(crate) fn new(
        config: halfsync_config::Group,
        plugin: PluginFile,
        probed: &crate::probe::Probed,
        generation: u64,
    ) -> GroupRec {
        GroupRec {
            config,
            plugin: Rc::new(plugin),
            plugin_version: plugin_version(probed),
            generation,
            retired: false,
            ended: [0; Cause::ALL.len()],
            ended_cpu: sys::CpuTime::default(),
            ended_log_dropped: 0,
            output_dropped: Rc::default(),
            idle_checks: 0,
            spawn_rate: 1,
            max_warned: None,
            moved_replies: [0; STATUSES],
        }
    }
}

/// "name version" of a probed plugin, for status.
pub(crate) fn plugin_version(p: &crate::probe::Probed) -> String {
    if p.version.is_empty() {
        p.name.clone()
    } else {
        format!("{} {}", p.name, p.version)
    }
}

pub(crate) struct SlotRec {
    pub(crate) group: usize,
    /// The proxy process that serves this slot.
    pub(crate) proxy: usize,
    /// Worker number within the group, for titles and logs.
    pub(crate) label: u32,
    pub(crate) slot: Slot,
    eventfd: OwnedFd,
    life: Life,
    /// This slot's worker takes over from that slot's once ready.
    pub(crate) replaces: Option<usize>,
    /// Asked to stop (replaced, drained or shutting down): not restarted.
    pub(crate) retiring: bool,
    /// The proxy was told to stop giving it requests.
    pub(crate) draining: bool,
    /// Drained because its group is smaller now (`scale`, a dynamic pool,
    /// a reload or rollback): a replacement started for it (a recycle, a
    /// reload) is not wanted either. Until the slot is used again.
    scaled_away: bool,
    /// Why the current worker will end, when the master decided it.
    pub(crate) end_cause: Option<Cause>,
    /// The proxy had it killed for a request past `drain_timeout` (a
    /// `Cause::Timeout` too, named apart in the log).
    past_drain_timeout: bool,
    /// Starts in a row that failed (see `on_child_exit`).
    pub(crate) failures: u32,
    /// Restarts of this worker (its label) after it died: counted in the
    /// slot and handed on to a replacement (reload, recycle, scale) when it
    /// takes over, so `status` does not reset or jump when a reload moves
    /// the worker to the spare slot.
    pub(crate) restarts: u64,
    /// The current worker finished init.
    pub(crate) ready: bool,
    /// Some worker of this slot was ever ready (startup bookkeeping).
    ever_ready: bool,
    /// How the last worker in this slot ended.
    last_exit: Option<i32>,
    /// Why it failed to start, in its own words (plugin load or init error).
    pub(crate) last_failure: Option<String>,
    /// Configuration generation of the running worker.
    pub(crate) generation: u64,
    /// The plugin file the running worker was started with.
    plugin_file: Option<Rc<PluginFile>>,
    /// The slot's counters (in the proxy's stats page) when it went to its
    /// group: what its earlier groups' workers did (see `Master::rehome`).
    base_replies: [u64; STATUSES],
    base_dispatched: u64,
}

/// A worker's stdout and stderr (one pipe), read by the master and logged
/// line by line, as PHP-FPM's `catch_workers_output`: what a plugin prints
/// and what a dying Rust plugin's panic hook writes land in the log with
/// the worker's group, number and pid, in the log's own format (one JSON
/// object per line with `log_format = "json"`), instead of raw on the
/// master's stderr beside it. Read before the master handles a worker's
/// death, so its last words come before the line saying it died.
struct Captured {
    /// The pipe's read end (non-blocking).
    fd: OwnedFd,
    group: String,
    label: u32,
    pid: i32,
    /// The start of a line not yet ended.
    partial: Vec<u8>,
    /// Lines per second (`PLUGIN_LINES_PER_SECOND`): a plugin printing on
    /// every request must not have the master write the log flat out.
    budget: halfsync_config::LineBudget,
    /// The last [`LAST_WORDS`] lines the budget dropped since a line was
    /// logged: logged if the worker dies before it logs another.
    held: std::collections::VecDeque<Vec<u8>>,
    /// Its group's count of dropped output lines.
    dropped: Rc<std::cell::Cell<u64>>,
    /// The line under way was cut at [`CAPTURED_LINE_MAX`]: the rest of
    /// it, up to its newline, is dropped.
    cutting: bool,
}

/// A line of a worker's output is logged up to this many bytes, and the
/// rest of it dropped (said on the line): a plugin printing megabytes
/// without a newline must not fill the log, however few lines it prints.
const CAPTURED_LINE_MAX: usize = 4096;

/// Of the lines the budget dropped at the end of a dead worker's output,
/// the last this many are logged after all (they hold why it died).
const LAST_WORDS: usize = 16;

impl Captured {
    /// Logs every whole line there is now (and, at end of file, the rest);
    /// returns false once the pipe is closed (every writer gone).
    fn drain(&mut self) -> bool {
        let mut open = true;
        loop {
            match sys::read_some(&self.fd, &mut self.partial, 16 << 10) {
                Ok(0) => {
                    open = false;
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
            if self.partial.len() > 256 << 10 {
                break; // the rest next turn
            }
        }
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            if std::mem::take(&mut self.cutting) {
                continue; // the end of a line already cut
            }
            self.log(&line[..end]);
        }
        if self.cutting {
            self.partial.clear();
        } else if self.partial.len() > CAPTURED_LINE_MAX {
            let mut piece: Vec<u8> = self.partial.drain(..CAPTURED_LINE_MAX).collect();
            self.partial.clear();
            self.cutting = true;
            piece.extend_from_slice(
                format!(" [line cut at {CAPTURED_LINE_MAX} bytes; the rest dropped]").as_bytes(),
            );
            self.log(&piece);
        }
        if !open {
            if !self.partial.is_empty() {
                let rest = std::mem::take(&mut self.partial);
                self.log(&rest);
            }
            // The worker is gone: the last lines the budget dropped after
            // its last logged one are its last words (an abort's or a
            // panic's message), logged now; the rest is counted.
            let last: Vec<Vec<u8>> = self.held.drain(..).collect();
            let dropped = self
                .budget
                .take_suppressed(Instant::now() + Duration::from_secs(1));
            self.report(dropped.saturating_sub(last.len() as u64));
            for line in last {
                self.emit(&String::from_utf8_lossy(&line));
            }
        }
        open
    }

    fn report(&self, dropped: u64) {
        if dropped > 0 {
            self.dropped.set(self.dropped.get() + dropped);
            warn!(
                group = %self.group,
                worker = self.label,
                pid = self.pid,
                "{dropped} more lines of worker output dropped (more than {} a second from one worker)",
                halfsync_config::PLUGIN_LINES_PER_SECOND
            );
        }
    }

    fn log(&mut self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches('\r');
        if text.is_empty() {
            return;
        }
        let (admitted, dropped) = self.budget.admit(Instant::now());
        self.report(dropped);
        if !admitted {
            if self.held.len() == LAST_WORDS {
                self.held.pop_front();
            }
            self.held.push_back(text.as_bytes().to_vec());
            return;
        }
        self.held.clear();
        self.emit(text);
    }

    fn emit(&self, text: &str) {
        warn!(
            group = %self.group,
            worker = self.label,
            pid = self.pid,
            "worker output: {}",
            halfsync_config::one_line(text)
        );
    }
}

impl SlotRec {
    pub(crate) fn pid(&self) -> Option<i32> {
        match self.life {
            Life::Running { pid, .. } => Some(pid),
            _ => None,
        }
    }

    /// The plugin log lines the worker of this slot says it dropped over
    /// its budget. A worker writes the count, so it is believed only from
    /// a control block that still names the worker and was not found
    /// corrupt, and only up to what a worker could drop in its life (a
    /// million lines a second): a scribbled block must not poison the
    /// group's counter for good. 0 otherwise.
    pub(crate) fn log_dropped(&self) -> u64 {
        let Life::Running { pid, since, .. } = self.life else {
            return 0;
        };
        let ctl = self.slot.control();
        let n = ctl.log_dropped();
        let plausible = since
            .elapsed()
            .as_secs()
            .saturating_add(1)
            .saturating_mul(1_000_000);
        if ctl.pid() == pid as u32 && self.end_cause != Some(Cause::Corrupt) && n <= plausible {
            n
        } else {
            0
        }
    }

    /// The request the running worker of this slot is on, as its control
    /// block says (a block still naming a dead predecessor does not count).
    pub(crate) fn current_request(&self) -> Option<halfsync_shm::BusyInfo> {
        let ctl = self.slot.control();
        let pid = self.pid()?;
        (ctl.pid() == pid as u32).then(|| ctl.busy()).flatten()
    }

    /// A running worker the proxy gives requests to (or will, once ready):
    /// not draining, not asked to stop.
    pub(crate) fn serves(&self) -> bool {
        matches!(self.life, Life::Running { .. }) && !self.retiring && !self.draining
    }

    /// A worker that counts towards its group's size: running or about to
    /// be restarted, not on its way out, not a replacement in progress.
    fn active(&self) -> bool {
        matches!(
            self.life,
            Life::Running { .. }
                | Life::Resetting {
                    next: Restart::Now | Restart::Later
                }
                | Life::Backoff { .. }
        ) && !self.retiring
            && !self.draining
            && self.replaces.is_none()
    }

    /// What `halfsync status` calls its state.
    pub(crate) fn state(&self) -> &'static str {
        match self.life {
            Life::Spare => "spare",
            Life::Stopped => "stopped",
            // Replaced, retired or scaled away: gone, and not coming back
            // (not "restarting", which alerting takes for a crash).
            Life::Resetting {
                next: Restart::Never,
            } => "exited",
            Life::Resetting { .. } => "restarting",
            Life::Backoff { .. } => "backoff",
            Life::Running { pid, .. } => {
                if self.retiring {
                    return "exiting";
                }
                if self.draining {
                    return "draining";
                }
                let ctl = self.slot.control();
                if ctl.pid() != pid as u32 {
                    return "starting";
                }
                match ctl.state() {
                    Ok(WorkerState::Busy) => "busy",
                    Ok(WorkerState::Idle) => "idle",
                    Ok(WorkerState::Exiting) => "exiting",
                    _ => "starting",
                }
            }
        }
    }
}

struct ProxyProc {
    pid: i32,
    channel: Channel,
    /// The last configuration sent did not reach it (its channel was full
    /// or broken): `sync_hold` sends it again, at most once a second.
    config_stale: bool,
    /// Its loop's last heartbeat as the master saw it, and since when (in
    /// the master's running time: see `watch_proxies`) it has not changed.
    last_beat: u64,
    silent_since: Instant,
    /// Its silence was logged (and is logged again when it ends).
    stall_logged: bool,
}

struct ListenerRec {
    id: u32,
    addr: SocketAddr,
    /// One socket per proxy process (SO_REUSEPORT when there are several).
    sockets: Vec<TcpListener>,
}

impl ListenerRec {
    /// The address it listens on: `addr` with the port the kernel chose
    /// for port 0.
    fn bound(&self) -> SocketAddr {
        self.sockets
            .first()
            .and_then(|s| s.local_addr().ok())
            .unwrap_or(self.addr)
    }
}

pub(crate) struct Master {
    exe: crate::exe::Exe,
    /// The file the configuration came from (reload re-reads it).
    config_path: Option<PathBuf>,
    pub(crate) config: Config,
    /// The log file and format the server started with: every process
    /// keeps writing there, in that format, until a restart (a reload
    /// that changes them says so), so that one file never mixes formats
    /// and no process's lines go elsewhere.
    pub(crate) log_setup: (Option<PathBuf>, halfsync_config::LogFormat),
    pub(crate) generation: u64,
    pub(crate) groups: Vec<GroupRec>,
    listeners: Vec<ListenerRec>,
    next_listener_id: u32,
    pub(crate) slots: Vec<SlotRec>,
    /// Proxy processes by number; `None` while one is down.
    proxies: Vec<Option<ProxyProc>>,
    /// A proxy that could not be restarted: when to try again, and the
    /// slots whose workers start with it.
    proxy_retry: Vec<Option<(Instant, Vec<usize>)>>,
    /// CPU of the proxy processes that ended (reaped).
    proxies_ended_cpu: sys::CpuTime,
    /// One stats page per proxy process.
    pub(crate) stats: Vec<Stats>,
    signals: OwnedFd,
    admin: admin::Admin,
    /// Set once a stop began: when the grace period ends.
    stopping: Option<Instant>,
    /// Until every group has a worker serving. If every worker of a group
    /// fails to start meanwhile, halfsync gives up instead of serving
    /// nothing but BUSY (like nginx refusing to start).
    starting: bool,
    reload: Option<reload::Job>,
    /// A reload whose plugins are being test-loaded (before `reload`).
    probing: Option<reload::Probing>,
    /// How reloads ended.
    pub(crate) reloads: reload::Outcomes,
    /// Proxy processes that died while serving and were restarted.
    pub(crate) proxy_restarts: u64,
    /// systemd's readiness notifications, under `Type=notify`.
    notifier: Option<notify::Notifier>,
    /// The workers' output pipes still open.
    captured: Vec<Captured>,
    /// A copy of the master's stderr, where workers write their own log
    /// lines when there is no log file.
    stderr_copy: OwnedFd,
    /// A SIGHUP came during a reload: reload again, with the config file
    /// as it is then, once it is over, as nginx applies the latest
    /// configuration.
    pub(crate) reload_pending: bool,
    /// A proxy died during a reload, which dropped the job: once it is
    /// back, replace the workers left on an older generation
    /// (`resume_reload`).
    reload_resume: bool,
    /// What went wrong in the reload a proxy's death interrupted, for the
    /// outcome of the resumed one.
    pub(crate) resume_errors: Vec<String>,
    /// The groups the proxies were last told to hold moved commands for
    /// (see `reload::sync_hold`).
    hold_sent: Vec<u32>,
    /// When `sync_hold` may next resend the configuration to a proxy it
    /// did not reach.
    config_retry_at: Instant,
    pub(crate) started_at: Instant,
    /// The same moment by the wall clock (`halfsync_start_time_seconds`).
    pub(crate) started_wall: std::time::SystemTime,
    next_pool_check: Instant,
    /// When the loop last ran its timers (see `watch_proxies`).
    last_turn: Instant,
    rng: fastrand::Rng,
    /// Benchmark baseline: plugins run inside the proxy; no workers.
    inline: bool,
    /// Admin clients waiting for the stop to finish.
    stop_waiters: Vec<u64>,
}

/// Runs the server until it is stopped. Errors before the first child
/// starts (bad plugin, port in use) are returned; the caller prints them.
pub fn run(
    config: Config,
    config_path: Option<PathBuf>,
    exe: crate::exe::Exe,
    inline: bool,
) -> Result<()> {
    sys::cloexec_inherited();
    let files = crate::probe::open_plugins(&exe, &config);
    let probed = crate::probe::probe(&exe, &config, &files, false)?;
    let n = config.server.proxy_processes as usize;
    raise_nofile_for(&config, config.groups.iter().map(|g| g.worker_limit()));
    let mut listeners = Vec::new();
    for (i, addr) in config.server.listen.iter().enumerate() {
        listeners.push(ListenerRec {
            id: i as u32,
            addr: *addr,
            sockets: listen_all(*addr, &config, n)
                .map_err(|e| anyhow::anyhow!(listen_error(*addr, &e, "server.listen")))?,
        });
    }
    let admin = admin::Admin::bind(&config.admin_socket(), config.server.metrics_listen)?;
    let signals = sys::signalfd().context("signalfd")?;
    let stats = (0..n)
        .map(|_| Stats::create())
        .collect::<std::io::Result<Vec<_>>>()
        .context("stats page")?;
    let groups = config
        .groups
        .iter()
        .zip(files.into_iter().zip(probed))
        .map(|(g, (file, p))| GroupRec::new(g.clone(), file, &p, 1))
        .collect();
    let mut m = Master {
        exe,
        config_path,
        log_setup: (config.log_file(), config.server.log_format),
        config,
        generation: 1,
        groups,
        next_listener_id: listeners.len() as u32,
        listeners,
        slots: Vec::new(),
        proxies: (0..n).map(|_| None).collect(),
        proxy_retry: (0..n).map(|_| None).collect(),
        proxies_ended_cpu: sys::CpuTime::default(),
        stats,
        signals,
        admin,
        stopping: None,
        starting: true,
        reload: None,
        probing: None,
        reloads: reload::Outcomes::default(),
        proxy_restarts: 0,
        notifier: notify::Notifier::from_env(),
        captured: Vec::new(),
        stderr_copy: std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating stderr")?,
        reload_pending: false,
        reload_resume: false,
        resume_errors: Vec::new(),
        hold_sent: Vec::new(),
        config_retry_at: Instant::now(),
        started_at: Instant::now(),
        started_wall: std::time::SystemTime::now(),
        next_pool_check: Instant::now() + POOL_CHECK,
        last_turn: Instant::now(),
        rng: fastrand::Rng::new(),
        inline,
        stop_waiters: Vec::new(),
    };
    let addrs: Vec<String> = m.listeners.iter().map(|l| l.bound().to_string()).collect();
    let workers: u32 = m.groups.iter().map(|g| g.config.workers).sum();
    info!(
        listen = %addrs.join(","),
        workers,
        admin = %m.admin.path().display(),
        pid = std::process::id(),
        "halfsync starting"
    );
    for p in 0..n {
        m.start_proxy(p)?;
    }
    if inline {
        warn!(
            "--inline: a benchmark baseline; plugins run inside the proxy, no workers, no isolation"
        );
        m.starting = false;
        m.notify("READY=1\nSTATUS=serving (--inline benchmark baseline)");
    } else {
        for g in 0..m.groups.len() {
            for _ in 0..m.groups[g].config.workers {
                m.add_worker(g)?;
            }
        }
    }
    let result = m.run_loop();
    let waiters = std::mem::take(&mut m.stop_waiters);
    // With the pid, `halfsync stop` can wait until the process is gone.
    let stopped = serde_json::json!({"ok": true, "message": "stopped", "pid": std::process::id()});
    m.admin.answer_now(&waiters, &stopped.to_string());
    m.admin.close();
    result
}

/// Whether `path` can be the admin socket: it fits a Unix socket's
/// address (`sun_path`: 108 bytes with the terminating NUL), and what is
/// there already, if anything, is a socket (a stale one is replaced, one
/// in use refused, at `run`). The error names the key and the fix.
pub fn check_socket_path(path: &std::path::Path) -> Result<(), String> {
    const MAX: usize = 107;
    let shown = halfsync_config::one_line(&path.display().to_string());
    let len = path.as_os_str().len();
    if len > MAX {
        return Err(format!(
            "server.admin_socket: {shown} is {len} bytes long; a Unix socket's path can have at \
             most {MAX}: choose a shorter one (a relative path is relative to the config file)"
        ));
    }
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Err(format!(
            "server.admin_socket: {shown} is a directory; name the socket file, such as \
             {shown}/halfsync.sock"
        )),
        Ok(m) if !m.file_type().is_socket() => Err(format!(
            "server.admin_socket: {shown} exists and is not a socket: remove it, or name \
             another path"
        )),
        _ => Ok(()),
    }
}

/// For `check`: whether this machine has `addr`'s IP address to listen
/// on (bound on port 0, so a server already listening on the port does
/// not make a valid config fail). The error is `run`'s, with its fix.
pub fn check_address(addr: SocketAddr, key: &str) -> Result<(), String> {
    match TcpListener::bind(SocketAddr::new(addr.ip(), 0)) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
            return Err(listen_error(addr, &e, key));
        }
        _ => {}
    }
    // The port itself: one below 1024 needs root or CAP_NET_BIND_SERVICE
    // (in use is fine: it may be this config's own server).
    if addr.port() != 0 {
        match TcpListener::bind(addr) {
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(listen_error(addr, &e, key));
            }
            _ => {}
        }
    }
    Ok(())
}

/// "cannot listen on ADDR: ERROR", with the fix for the usual causes
/// (`key`: the config key that named `addr`).
pub(crate) fn listen_error(addr: SocketAddr, e: &std::io::Error, key: &str) -> String {
    let fix = match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            format!(
                "; another process (another halfsync?) listens there: stop it, or change `{key}`"
            )
        }
        std::io::ErrorKind::AddrNotAvailable => {
            format!("; no interface of this machine has that address: fix `{key}`")
        }
        std::io::ErrorKind::PermissionDenied => "; ports below 1024 need root or \
            CAP_NET_BIND_SERVICE: use a higher port or grant the capability"
            .to_owned(),
        _ => String::new(),
    };
    format!("cannot listen on {addr}: {e}{fix}")
}

/// The listening sockets for one address: one per proxy process, with
/// SO_REUSEPORT when there are several (the kernel spreads connections).
/// Raises the master's soft open-file limit for `config` with pools of
/// `workers` at most (at start, and when a reload or a scale grows them).
///
/// The master holds 3 descriptors per worker (slot memfd, eventfd, output
/// pipe), and a replacement runs beside each worker it replaces: room for
/// twice the largest pools, plus the proxies', its admin and metrics
/// clients' and its own. Only as much as that (children inherit the
/// limit, and a plugin using select() must not see descriptors past 1024
/// it did not ask for); the proxies raise their own.
fn raise_nofile_for(config: &Config, workers: impl Iterator<Item = u32>) {
    let workers: u64 = workers.map(u64::from).sum();
    // Per proxy: its listening sockets, control channel and stats page.
    let proxies =
        u64::from(config.server.proxy_processes) * (config.server.listen.len() as u64 + 3);
    let admin_clients = admin::MAX_ADMIN_CLIENTS as u64
        + if config.server.metrics_listen.is_some() {
            admin::MAX_HTTP_CLIENTS as u64
        } else {
            0
        };
    // Each group's plugin file is held open, twice during a reload (the
    // old generation's and the new one's).
    let plugins = 2 * config.groups.len() as u64;
    match sys::raise_nofile_to(2 * 3 * workers + proxies + admin_clients + plugins + 32) {
        Ok(Some((old, new))) => info!(old, new, "raised the open-file limit for the worker pool"),
        Ok(None) => {}
        Err(e) => warn!("cannot raise the open-file limit: {e}"),
    }
}

fn listen_all(addr: SocketAddr, config: &Config, n: usize) -> std::io::Result<Vec<TcpListener>> {
    let (backlog, defer) = (config.server.backlog, config.server.tcp_defer_accept);
    if n == 1 {
        return Ok(vec![listen(addr, backlog, defer, false)?]);
    }
    // SO_REUSEPORT would also let a second server (same user) bind this
    // port and take a share of its connections. Refuse, as a plain bind
    // would: a socket without SO_REUSEPORT cannot bind where anything
    // listens.
    {
        use socket2::{Domain, Socket, Type};
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)?;
        probe.set_reuse_address(true)?;
        if addr.is_ipv6() {
            probe.set_only_v6(true)?;
        }
        probe.bind(&addr.into())?;
    }
    let first = listen(addr, backlog, defer, true)?;
    // Port 0: the others join the port the first one got.
    let addr = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..n {
        all.push(listen(addr, backlog, defer, true)?);
    }
    Ok(all)
}

fn listen(
    addr: SocketAddr,
    backlog: u32,
    defer_accept: bool,
    reuse_port: bool,
) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)?;
    s.set_reuse_address(true)?;
    // An IPv6 address means IPv6 only, whatever net.ipv6.bindv6only says
    // (as nginx's `ipv6only=on`): `[::]:P` beside `0.0.0.0:P` is the usual
    // dual-stack pair, and the first must not take IPv4 too.
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    if defer_accept {
        sys::set_defer_accept(&s, 1)?;
    }
    s.bind(&addr.into())?;
    s.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(s.into())
}

/// Times the phases of one turn of the master's loop. While a turn runs,
/// nothing else does: a dead worker is not restarted, a proxy's message
/// waits, `status` does not answer. A slow turn is logged with its slowest
/// phase, so an operator (or a flaky test's log) can tell where it went.
struct Laps {
    start: Instant,
    last: Instant,
    slowest: (&'static str, Duration),
}

/// A master loop turn longer than this is logged.
const SLOW_TURN: Duration = Duration::from_millis(500);

impl Laps {
    fn start() -> Laps {
        let now = Instant::now();
        Laps {
            start: now,
            last: now,
            slowest: ("", Duration::ZERO),
        }
    }

    fn lap(&mut self, phase: &'static str) {
        let now = Instant::now();
        let took = now - self.last;
        if took > self.slowest.1 {
            self.slowest = (phase, took);
        }
        self.last = now;
    }

    /// The turn's length and its slowest phase, if it took over `limit`.
    fn slow(&self, limit: Duration) -> Option<(Duration, &'static str, Duration)> {
        let total = self.last - self.start;
        (total > limit).then_some((total, self.slowest.0, self.slowest.1))
    }

    fn warn_if_slow(&self) {
        if let Some((total, phase, took)) = self.slow(SLOW_TURN) {
            warn!(
                ms = total.as_millis() as u64,
                slowest = phase,
                slowest_ms = took.as_millis() as u64,
                "the master's loop was busy for a long turn; worker restarts and admin commands waited"
            );
        }
    }
}

impl Master {
    // ---- counters (summed over the proxy processes' pages) ----

    pub(crate) fn global_stats(&self) -> halfsync_proxy::stats::GlobalSnapshot {
        let mut g = halfsync_proxy::stats::GlobalSnapshot::default();
        for s in &self.stats {
            g.add(&s.global());
        }
        g
    }

    pub(crate) fn group_stats(&self, id: usize) -> halfsync_proxy::stats::GroupSnapshot {
        let mut g = halfsync_proxy::stats::GroupSnapshot::default();
        for s in &self.stats {
            g.add(&s.group(id));
        }
        if let Some(r) = self.groups.get(id) {
            g.replies
                .iter_mut()
                .zip(&r.moved_replies)
                .for_each(|(a, b)| *a += b);
        }
        g
    }

    /// A slot's counters since it went to its group, from the page of the
    /// proxy that serves it.
    pub(crate) fn slot_stats(&self, i: usize) -> halfsync_proxy::stats::SlotSnapshot {
        let s = &self.slots[i];
        let mut snap = self.stats[s.proxy].slot(i);
        snap.dispatched = snap.dispatched.saturating_sub(s.base_dispatched);
        snap.replies
            .iter_mut()
            .zip(&s.base_replies)
            .for_each(|(a, b)| *a = a.saturating_sub(*b));
        snap
    }

    /// A slot's state as `status` shows it: its own
    /// ([`SlotRec::state`]), or "unresponsive" while its proxy holds a
    /// running worker for taking none of its requests.
    pub(crate) fn worker_state(&self, i: usize) -> &'static str {
        let state = self.slots[i].state();
        if matches!(state, "idle" | "busy") && self.stats[self.slots[i].proxy].slot(i).unresponsive
        {
            return "unresponsive";
        }
        state
    }

    // ---- slots and workers ----

    /// New rings of the configured size, and an eventfd, for worker
    /// `label` of group `g`.
    fn make_slot(&self, g: usize, label: u32) -> Result<(Slot, OwnedFd)> {
        let name = &self.groups[g].config.name;
        let slot = Slot::create(
            &format!("halfsync-{name}-{label}"),
            self.config.server.ring_size as usize,
        )
        .with_context(|| format!("creating shared memory for worker {name} {label}"))?;
        let eventfd = shm_sys::eventfd().context("eventfd")?;
        Ok((slot, eventfd))
    }

    /// Creates a slot for group `g` and hands it to the proxy.
    fn new_slot(&mut self, g: usize, label: u32, proxy: usize) -> Result<usize> {
        let name = &self.groups[g].config.name;
        if self.slots.len() >= halfsync_proxy::stats::MAX_SLOTS {
            anyhow::bail!(
                "cannot start worker {name} {label}: all {} worker slots are in use (workers, \
                 their replacements and spares of every group); use fewer workers",
                halfsync_proxy::stats::MAX_SLOTS
            );
        }
        let (slot, eventfd) = self.make_slot(g, label)?;
        self.slots.push(SlotRec {
            group: g,
            proxy,
            label,
            slot,
            eventfd,
            life: Life::Spare,
            replaces: None,
            retiring: false,
            scaled_away: false,
            draining: false,
            end_cause: None,
            past_drain_timeout: false,
            failures: 0,
            restarts: 0,
            ready: false,
            ever_ready: false,
            last_exit: None,
            last_failure: None,
            plugin_file: None,
            generation: 0,
            base_replies: [0; STATUSES],
            base_dispatched: 0,
        });
        let i = self.slots.len() - 1;
        self.send_slot(i);
        Ok(i)
    }

    /// A spare slot of group `g` (made if there is none) for a new worker
    /// labelled `label`.
    fn spare_slot(&mut self, g: usize, label: u32, proxy: usize) -> Result<usize> {
        // A spare is reused only if its rings are the configured size.
        let capacity = self.config.server.ring_size as usize;
        match self.slots.iter().position(|s| {
            s.group == g
                && s.proxy == proxy
                && s.life == Life::Spare
                && s.slot.capacity() == capacity
        }) {
            Some(i) => {
                // A new worker of that label: nothing of the slot's last
                // one carries over (a replacement takes its predecessor's
                // restarts when it takes over).
                let s = &mut self.slots[i];
                s.label = label;
                s.restarts = 0;
                s.failures = 0;
                Ok(i)
            }
            None => match self.reclaimable_slot(proxy) {
                Some(i) => self.rehome(i, g, label),
                None => self.new_slot(g, label, proxy),
            },
        }
    }

    /// A spare slot of proxy `proxy` that no group will use again: its
    /// group was removed by a reload.
    fn reclaimable_slot(&self, proxy: usize) -> Option<usize> {
        (0..self.slots.len()).find(|&i| {
            let s = &self.slots[i];
            s.proxy == proxy
                && s.life == Life::Spare
                && self.groups[s.group].retired
                && !self.slots.iter().any(|r| r.replaces == Some(i))
        })
    }

    /// Gives spare slot `i` (of a removed group) to group `g`: new rings
    /// of the configured size, a new eventfd, handed to the proxy again
    /// under the same index. Its counters so far stay its old group's.
    /// (Without this, every reload that removed a group left its slots
    /// behind for good.)
    fn rehome(&mut self, i: usize, g: usize, label: u32) -> Result<usize> {
        let (slot, eventfd) = self.make_slot(g, label)?;
        let net = self.slot_stats(i);
        let raw = self.stats[self.slots[i].proxy].slot(i);
        let old = self.slots[i].group;
        let moved = &mut self.groups[old].moved_replies;
        moved
            .iter_mut()
            .zip(&net.replies)
            .for_each(|(a, b)| *a += b);
        let s = &mut self.slots[i];
        s.group = g;
        s.label = label;
        s.slot = slot;
        s.eventfd = eventfd;
        s.base_replies = raw.replies;
        s.base_dispatched = raw.dispatched;
        s.restarts = 0;
        s.failures = 0;
        s.ever_ready = false;
        s.last_exit = None;
        s.last_failure = None;
        s.end_cause = None;
        s.past_drain_timeout = false;
        s.generation = 0;
        self.send_slot(i);
        Ok(i)
    }

    /// Starts one more worker in group `g`, with the lowest free label.
    /// Starts one more worker of group `g`; returns its slot.
    pub(crate) fn add_worker(&mut self, g: usize) -> Result<usize> {
        let used: Vec<u32> = self
            .slots
            .iter()
            .filter(|s| s.group == g && s.active())
            .map(|s| s.label)
            .collect();
        let label = (0..).find(|l| !used.contains(l)).unwrap_or(0);
        // The running proxy with the fewest workers of this group gets it.
        let proxy = (0..self.proxies.len())
            .filter(|&p| self.proxies[p].is_some())
            .min_by_key(|&p| {
                self.slots
                    .iter()
                    .filter(|s| s.group == g && s.proxy == p && s.active())
                    .count()
            })
            .context("no proxy process is running to serve a new worker")?;
        let i = self.spare_slot(g, label, proxy)?;
        self.start_worker(i, None)?;
        Ok(i)
    }

    fn send_slot(&self, i: usize) {
        let s = &self.slots[i];
        let Some(Some(p)) = self.proxies.get(s.proxy) else {
            return;
        };
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

    /// Tells every proxy process.
    fn tell_proxy(&self, msg: ToProxy) {
        for p in 0..self.proxies.len() {
            self.tell(p, msg);
        }
    }

    /// Tells the proxy process that serves slot `i`.
    fn tell_slot(&self, i: usize, msg: ToProxy) {
        self.tell(self.slots[i].proxy, msg);
    }

    fn tell(&self, p: usize, msg: ToProxy) {
        if let Some(Some(p)) = self.proxies.get(p)
            && let Err(e) = p.channel.send_to_proxy(msg, &[])
        {
            // A proxy that exited (it drained, or died and SIGCHLD is on
            // its way) cannot be told anything: not worth a warning.
            if e.kind() == std::io::ErrorKind::BrokenPipe || self.stopping.is_some() {
                tracing::debug!("control channel: {e}");
            } else {
                warn!("control channel: {e}");
            }
        }
    }

    /// Ids of the configured (not retired) groups, in config order.
    /// The client addresses it listens on (ports chosen for port 0 filled
    /// in), for status.
    pub(crate) fn listening(&self) -> Vec<String> {
        self.listeners
            .iter()
            .map(|l| l.bound().to_string())
            .collect()
    }

    fn group_ids(&self) -> Vec<u32> {
        self.config
            .groups
            .iter()
            .map(|g| {
                self.groups
                    .iter()
                    .position(|r| !r.retired && r.config.name == g.name)
                    .unwrap_or(0) as u32
            })
            .collect()
    }

    fn start_proxy(&mut self, n: usize) -> Result<()> {
        let (master_end, proxy_end) = Channel::pair().context("control socketpair")?;
        let spec = ProxySpec {
            config: toml::to_string(&self.config).context("serializing config")?,
            group_ids: self.group_ids(),
            control_fd: proxy_end.fd().as_raw_fd(),
            stats_fd: self.stats[n].fd().as_raw_fd(),
            index: n as u32,
            numbered: self.proxies.len() > 1,
            listeners: self
                .listeners
                .iter()
                .filter_map(|l| Some((l.id, l.sockets.get(n)?.as_raw_fd())))
                .collect(),
            inline: if self.inline {
                self.groups
                    .iter()
                    .enumerate()
                    .filter(|(_, g)| !g.retired)
                    .map(|(id, g)| {
                        (
                            id as u32,
                            g.plugin.path.clone(),
                            g.config.plugin_config_toml(),
                        )
                    })
                    .collect()
            } else {
                Vec::new()
            },
        };
        let blob = shm_sys::memfd_with(&spec.to_env()).context("the proxy's spec")?;
        let mut keep = vec![spec.control_fd, spec.stats_fd, blob.as_raw_fd()];
        keep.extend(spec.listeners.iter().map(|l| l.1));
        let title = if self.proxies.len() > 1 {
            format!("halfsync: proxy {n}")
        } else {
            "halfsync: proxy".to_owned()
        };
        let pid = sys::spawn(
            &self.exe.program(),
            &title,
            "proxy",
            &self.child_env(halfsync_proxy::SPEC_ENV, shm_sys::blob_env(&blob)),
            &keep,
            None,
            false,
        )
        .context("starting the proxy")?;
        drop(proxy_end);
        info!(pid, proxy = n, "proxy started");
        self.proxies[n] = Some(ProxyProc {
            pid,
            channel: master_end,
            config_stale: false,
            last_beat: 0,
            silent_since: Instant::now(),
            stall_logged: false,
        });
        for i in 0..self.slots.len() {
            if self.slots[i].proxy == n {
                self.send_slot(i);
            }
        }
        Ok(())
    }

    /// Environment for a child: its spec plus the logging settings.
    /// A child's environment: `key` (its spec, passed as [`shm_sys::blob_env`])
    /// and the logging settings.
    fn child_env(&self, key: &'static str, value: String) -> Vec<(&'static str, String)> {
        let mut env = vec![(key, value)];
        env.extend(crate::logging::child_env(
            self.log_setup.0.as_deref(),
            self.log_setup.1,
        ));
        env
    }

    fn start_worker(&mut self, i: usize, replaces: Option<usize>) -> Result<()> {
        let g = &self.groups[self.slots[i].group];
        let jitter = match g.config.max_requests_jitter {
            0 => 0,
            j => self.rng.u64(0..=j),
        };
        let s = &self.slots[i];
        let spec = WorkerSpec {
            group: g.config.name.clone(),
            index: s.label,
            plugin: g.plugin.path.clone(),
            plugin_fd: g.plugin.fd(),
            plugin_config: g.config.plugin_config_toml(),
            memfd: s.slot.fd().as_raw_fd(),
            eventfd: s.eventfd.as_raw_fd(),
            ring_size: s.slot.capacity() as u64,
            max_reply: self.config.server.max_frame - halfsync_protocol::MIN_LENGTH,
            queue_timeout_ns: g.config.queue_timeout.as_nanos().min(u64::MAX as u128) as u64,
            max_requests: match g.config.max_requests {
                0 => 0,
                n => n.saturating_add(jitter),
            },
            max_rss: g.config.max_rss,
        };
        let generation = g.generation;
        let ctl = s.slot.control();
        ctl.set_generation(ctl.generation().wrapping_add(1));
        let title = format!("halfsync: worker {} {}", g.config.name, s.label);
        let (memfd, eventfd) = (spec.memfd, spec.eventfd);
        let plugin = Rc::clone(&g.plugin);
        let blob = shm_sys::memfd_with(&spec.to_env()).context("a worker's spec")?;
        let mut env = self.child_env(halfsync_worker::SPEC_ENV, shm_sys::blob_env(&blob));
        // Its stdout and stderr are a pipe the master logs line by line
        // (`Captured`); its own log lines go to a copy of the master's
        // stderr.
        let (capture, output) = sys::pipe().context("a pipe for a worker's output")?;
        let log_fd = self.stderr_copy.as_raw_fd();
        env.push((crate::logging::FD_ENV, log_fd.to_string()));
        let pid = sys::spawn(
            &self.exe.program(),
            &title,
            "worker",
            &env,
            &[memfd, eventfd, log_fd, blob.as_raw_fd()]
                .into_iter()
                .chain(plugin.fd())
                .collect::<Vec<_>>(),
            Some(output),
            true,
        )
        .with_context(|| format!("starting worker {title}"))?;
        self.captured.push(Captured {
            fd: capture,
            group: g.config.name.clone(),
            label: s.label,
            pid,
            partial: Vec::new(),
            budget: halfsync_config::LineBudget::new(halfsync_config::PLUGIN_LINES_PER_SECOND),
            held: std::collections::VecDeque::new(),
            dropped: g.output_dropped.clone(),
            cutting: false,
        });
        let s = &mut self.slots[i];
        s.life = Life::Running {
            pid,
            since: Instant::now(),
            kill_at: None,
        };
        s.plugin_file = Some(plugin);
        s.replaces = replaces;
        s.retiring = false;
        s.draining = false;
        s.scaled_away = false;
        s.end_cause = None;
        s.past_drain_timeout = false;
        s.ready = false;
        s.generation = generation;
        let probation = self.slots[i].failures >= FAILED_STARTS_BEFORE_BACKOFF;
        self.tell_slot(
            i,
            ToProxy::WorkerStarted {
                slot: i as u32,
                pid,
                replaces: replaces.map(|r| r as u32),
                probation,
                label: self.slots[i].label,
            },
        );
        Ok(())
    }

    /// Starts a worker of `old`'s group, with its label, to take over from
    /// it once ready. `cause` is why the old one goes.
    fn replace(&mut self, old: usize, cause: Cause) -> Result<usize> {
        let (g, label, proxy) = (
            self.slots[old].group,
            self.slots[old].label,
            self.slots[old].proxy,
        );
        let i = self.spare_slot(g, label, proxy)?;
        self.slots[old].end_cause = Some(cause);
        if let Err(e) = self.start_worker(i, Some(old)) {
            self.slots[i].life = Life::Spare;
            return Err(e);
        }
        Ok(i)
    }

    /// Asks the proxy to stop giving a worker requests; it is retired when
    /// it holds none.
    fn drain(&mut self, i: usize, cause: Cause) {
        let s = &mut self.slots[i];
        s.scaled_away |= cause == Cause::Scale;
        match s.life {
            Life::Running { .. } => {
                s.draining = true;
                s.end_cause = Some(cause);
                self.tell_slot(i, ToProxy::Drain { slot: i as u32 });
            }
            // Not running: just do not restart it.
            Life::Resetting { .. } => {
                s.life = Life::Resetting {
                    next: Restart::Never,
                }
            }
            Life::Backoff { .. } => s.life = Life::Spare,
            Life::Spare | Life::Stopped => {}
        }
    }

    /// Asks a worker to finish its current request and exit; one that has
    /// not exited `drain_timeout` later (stopped, or stuck in its plugin's
    /// `fini`) is killed. (The stop of the whole server has its own bound,
    /// `shutdown_grace`.)
    fn stop_worker(&mut self, i: usize) {
        let grace = match self.stopping {
            None => self.groups[self.slots[i].group].config.drain_timeout,
            Some(_) => Duration::ZERO,
        };
        let s = &mut self.slots[i];
        if let Life::Running { pid, kill_at, .. } = &mut s.life {
            s.retiring = true;
            s.slot.control().request_stop();
            s.slot.requests().wake_consumer();
            sys::kill(*pid, libc::SIGTERM);
            if !grace.is_zero() {
                let at = Instant::now() + grace;
                *kill_at = Some(kill_at.map_or(at, |k| k.min(at)));
            }
        }
    }

    /// Asks the workers of one proxy process (or all) to stop.
    fn stop_workers_of(&mut self, proxy: Option<usize>) {
        for i in 0..self.slots.len() {
            if proxy.is_some_and(|p| self.slots[i].proxy != p) {
                continue;
            }
            match self.slots[i].life {
                Life::Running { .. } => self.stop_worker(i),
                Life::Resetting { .. } | Life::Backoff { .. } | Life::Spare => {
                    self.slots[i].life = Life::Stopped
                }
                Life::Stopped => {}
            }
        }
    }

    /// A stop ends a reload where it stands; its caller hears so.
    pub(crate) fn abandon_reload(&mut self) {
        // A probe under way is killed as it is dropped.
        let reply_to = match (self.reload.take(), self.probing.take()) {
            (Some(job), _) => job.reply_to,
            (None, Some(probing)) => probing.reply_to,
            (None, None) => None,
        };
        if let Some(conn) = reply_to {
            self.admin
                .respond(conn, admin::err("halfsync is stopping; reload abandoned"));
        }
    }

    fn kill_everything(&mut self) {
        // (A graceful stop that ran out of time said so already.)
        if self.stopping.is_none() {
            self.notify("STOPPING=1");
        }
        // Name the requests abandoned (their clients see the connection
        // close without a reply): a fast stop's, a second SIGINT's, or
        // those still running when the grace period ends.
        let now_ns = halfsync_shm::sys::monotonic_ns();
        for s in &self.slots {
            if let Some(b) = s.current_request() {
                warn!(
                    group = %self.groups[s.group].config.name,
                    worker = s.label,
                    pid = s.pid(),
                    "abandoning request id {} (command {}), running for {} ms",
                    b.id,
                    b.code,
                    now_ns.saturating_sub(b.since_ns) / 1_000_000
                );
            }
        }
        // (No replacement may start after this: see `abandon_reload`.)
        self.abandon_reload();
        for p in self.proxies.iter().flatten() {
            sys::kill(p.pid, libc::SIGKILL);
        }
        for s in &mut self.slots {
            match s.life {
                Life::Running { pid, .. } => sys::kill(pid, libc::SIGKILL),
                _ => s.life = Life::Stopped,
            }
        }
    }

    /// Whether a running worker is starting to take over from slot `i`.
    pub(crate) fn being_replaced(&self, i: usize) -> bool {
        self.slots
            .iter()
            .any(|r| r.replaces == Some(i) && matches!(r.life, Life::Running { .. }))
    }

    fn running_pid(&self, i: usize) -> Option<i32> {
        self.slots.get(i)?.pid()
    }

    fn kill_worker(&mut self, i: usize, pid: i32, reason: KillReason) {
        if self.running_pid(i) != Some(pid) {
            return;
        }
        let s = &mut self.slots[i];
        s.end_cause = Some(match reason {
            KillReason::Corrupt => Cause::Corrupt,
            KillReason::RequestTimeout | KillReason::DrainTimeout => Cause::Timeout,
            KillReason::InitTimeout => Cause::InitTimeout,
            KillReason::Unresponsive => Cause::Unresponsive,
        });
        s.past_drain_timeout = reason == KillReason::DrainTimeout;
        let grace = self.groups[s.group].config.timeout_kill_grace;
        let timeout = matches!(
            reason,
            KillReason::RequestTimeout | KillReason::DrainTimeout
        );
        if timeout && !grace.is_zero() {
            // A chance for a crash handler to record where it hung.
            sys::kill(pid, libc::SIGABRT);
            if let Life::Running { kill_at, .. } = &mut s.life {
                *kill_at = Some(Instant::now() + grace);
            }
        } else {
            sys::kill(pid, libc::SIGKILL);
        }
    }

    /// Starts a replacement for a worker that reached its recycling limit.
    fn recycle(&mut self, old: usize, pid: i32) {
        // (A reload may be replacing it already: one replacement at a time.)
        if self.stopping.is_some()
            || self.running_pid(old) != Some(pid)
            || self.slots[old].draining
            || self.being_replaced(old)
        {
            return;
        }
        if let Err(e) = self.replace(old, Cause::Recycle) {
            error!("{e:#}");
        }
    }

    /// Grows or shrinks group `g` to `n` workers: new ones start at once;
    /// surplus ones drain (finish what they hold) and retire.
    fn resize(&mut self, g: usize, n: u32) -> Result<()> {
        let mut active: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].group == g && self.slots[i].active())
            .collect();
        let have = active.len() as u32;
        for _ in have..n {
            self.add_worker(g)?;
        }
        for _ in n..have {
            let Some(i) = self.surplus_worker(&active) else {
                break;
            };
            active.retain(|&a| a != i);
            self.drain(i, Cause::Scale);
        }
        Ok(())
    }

    /// Which of `active` (one group's workers) to retire when shrinking:
    /// the highest-numbered worker of the proxy process that has the most,
    /// so every proxy keeps its share.
    fn surplus_worker(&self, active: &[usize]) -> Option<usize> {
        let per_proxy = |p: usize| active.iter().filter(|&&i| self.slots[i].proxy == p).count();
        active
            .iter()
            .copied()
            .max_by_key(|&i| (per_proxy(self.slots[i].proxy), self.slots[i].label))
    }

    /// `halfsync scale`: sets a group's size.
    pub(crate) fn scale(&mut self, name: &str, n: u32) -> Result<String, String> {
        let Some(g) = self
            .groups
            .iter()
            .position(|r| !r.retired && r.config.name == name)
        else {
            let names: Vec<String> = self
                .groups
                .iter()
                .filter(|r| !r.retired)
                .map(|r| format!("{:?}", r.config.name))
                .collect();
            return Err(format!(
                "no group named {name:?}; the groups are {}",
                names.join(", ")
            ));
        };
        if !(1..=256).contains(&n) {
            return Err(format!("workers must be between 1 and 256, got {n}"));
        }
        let proxies = self.proxies.len() as u32;
        if n < proxies {
            return Err(format!(
                "{n} workers for {proxies} proxy processes: every proxy needs a worker of each group; scale to at least {proxies}"
            ));
        }
        if self.stopping.is_some() {
            return Err("halfsync is stopping".into());
        }
        if let Some(p) = self.proxy_waiting() {
            return Err(format!(
                "proxy {p} could not be restarted yet (it is tried again every second); scale \
                 once it is back (halfsync status shows it)"
            ));
        }
        // A rollback would undo it (it restores the group's previous
        // settings), and the reload's own sizes apply anyway.
        if self.reload.is_some() || self.probing.is_some() {
            return Err(
                "a reload is in progress; scale once it has ended (halfsync status shows it)"
                    .into(),
            );
        }
        let group = &mut self.groups[g].config;
        let before = group.workers;
        group.workers = n;
        // A dynamic pool's `workers` is its minimum: the maximum follows
        // it up if need be, and says so.
        let mut raised = String::new();
        if let Some(max) = group.max_workers
            && max < n
        {
            group.max_workers = Some(n);
            raised = format!(" (its max_workers too, from {max})");
        }
        let dynamic = group.pool == Pool::Dynamic;
        info!(group = %name, from = before, to = n, "scaling");
        self.raise_nofile();
        if let Err(e) = self.resize(g, n) {
            // Settle at the size reached (not a target no one retries),
            // and say so on both ends.
            let reached = (0..self.slots.len())
                .filter(|&i| self.slots[i].group == g && self.slots[i].active())
                .count() as u32;
            self.groups[g].config.workers = reached.max(1);
            let msg = format!(
                "group {name}: could grow only to {reached} of {n} workers: {e:#}; it stays at {reached}"
            );
            error!("scale failed: {msg}");
            self.notify_serving("");
            return Err(msg);
        }
        self.notify_serving("");
        Ok(format!(
            "group {name}: {before} -> {n} worker{}{}",
            if n == 1 { "" } else { "s" },
            if dynamic {
                format!(" at least{raised}; until the next reload")
            } else {
                "; until the next reload".to_owned()
            }
        ))
    }

    /// Closes the plugin files of removed groups once none of their
    /// workers runs (each reload that removed a group kept one open).
    fn release_removed_plugins(&mut self) {
        for g in 0..self.groups.len() {
            let r = &self.groups[g];
            if r.retired
                && r.plugin.fd().is_some()
                && !self.slots.iter().any(|s| s.group == g && s.pid().is_some())
            {
                let closed = r.plugin.closed();
                self.groups[g].plugin = Rc::new(closed);
            }
        }
    }

    /// Dynamic pools: more workers when too few are idle or requests wait
    /// (as many as are missing from `min_spare`, those starting counted as
    /// idle; while requests wait 1, 2, 4, ... at checks in a row, less
    /// those still starting, see [`POOL_MAX_SPAWN_RATE`]); one fewer when
    /// too many stayed idle for a few checks.
    /// A proxy that could not be restarted yet (`retry_proxy`), if any.
    pub(crate) fn proxy_waiting(&self) -> Option<usize> {
        self.proxy_retry.iter().position(Option::is_some)
    }

    /// [`raise_nofile_for`] the groups as configured now (retired ones'
    /// workers drain, but still hold their descriptors meanwhile).
    pub(crate) fn raise_nofile(&self) {
        raise_nofile_for(
            &self.config,
            self.groups.iter().map(|g| g.config.worker_limit()),
        );
    }

    fn check_pools(&mut self) {
        // While a proxy waits to be restarted its workers' slots are spare,
        // not gone: sizing a group now would double them.
        if self.proxy_waiting().is_some() {
            return;
        }
        for g in 0..self.groups.len() {
            if self.groups[g].retired {
                continue;
            }
            // Short of its size (a static pool's `workers`, a dynamic one's
            // least): a start that failed in the master itself (out of
            // descriptors or processes, in a reload, a scale or a proxy's
            // restart) left a slot unused, and nothing else would start
            // it again. Not while a reload sizes the group itself.
            let target = self.groups[g].config.workers;
            let n = (0..self.slots.len())
                .filter(|&i| self.slots[i].group == g && self.slots[i].active())
                .count() as u32;
            if n < target && self.reload.is_none() {
                warn!(
                    group = %self.groups[g].config.name,
                    workers = n,
                    wanted = target,
                    "group short of workers (a start failed); starting the rest"
                );
                if let Err(e) = self.resize(g, target) {
                    error!("{e:#}");
                }
            }
            let c = &self.groups[g].config;
            if c.pool != Pool::Dynamic {
                continue;
            }
            let (min, max, min_spare, max_spare) =
                (c.workers, c.worker_limit(), c.min_spare, c.max_spare);
            let active: Vec<usize> = (0..self.slots.len())
                .filter(|&i| self.slots[i].group == g && self.slots[i].active())
                .collect();
            let idle = active
                .iter()
                .filter(|&&i| self.worker_state(i) == "idle" && self.slot_stats(i).pending == 0)
                .count() as u32;
            // Workers still starting will be idle soon: not missing.
            let starting = active
                .iter()
                .filter(|&&i| self.slots[i].state() == "starting")
                .count() as u32;
            let queued = self.group_stats(g).queued;
            let n = active.len() as u32;
            if queued > 0
                && n >= max
                && self.groups[g]
                    .max_warned
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
            {
                // As PHP-FPM's "server reached pm.max_children setting".
                self.groups[g].max_warned = Some(Instant::now());
                warn!(
                    group = %self.groups[g].config.name,
                    workers = n,
                    queued,
                    "requests wait with the pool at max_workers; consider raising max_workers"
                );
            }
            if (idle + starting < min_spare || queued > 0) && n < max {
                let rate = self.groups[g].spawn_rate;
                let missing = min_spare.saturating_sub(idle + starting);
                // While requests wait: `rate` new workers, less those still
                // starting (a slow init must not make every check start
                // more); the rate doubles only once those are up.
                let add = if queued > 0 {
                    missing.max(rate.saturating_sub(starting))
                } else {
                    missing
                }
                .min(max - n);
                self.groups[g].idle_checks = 0;
                if queued > 0 && starting == 0 {
                    self.groups[g].spawn_rate = (rate * 2).min(POOL_MAX_SPAWN_RATE);
                }
                if add == 0 {
                    continue;
                }
                info!(group = %self.groups[g].config.name, workers = n + add, idle, starting, queued, "pool growing");
                for _ in 0..add {
                    if let Err(e) = self.add_worker(g) {
                        error!("{e:#}");
                        break;
                    }
                }
            } else if idle > max_spare && n > min {
                self.groups[g].spawn_rate = 1;
                self.groups[g].idle_checks += 1;
                if self.groups[g].idle_checks >= POOL_SHRINK_AFTER {
                    self.groups[g].idle_checks = 0;
                    info!(group = %self.groups[g].config.name, workers = n - 1, idle, "pool shrinking");
                    if let Some(i) = self.surplus_worker(&active) {
                        self.drain(i, Cause::Scale);
                    }
                }
            } else {
                self.groups[g].idle_checks = 0;
                self.groups[g].spawn_rate = 1;
            }
        }
    }

    // ---- the loop ----

    fn run_loop(&mut self) -> Result<()> {
        loop {
            let timeout = self.next_timeout();
            let n = self.proxies.len();
            let mut fds = vec![sys::pollfd(self.signals.as_raw_fd(), false)];
            for p in &self.proxies {
                fds.push(sys::pollfd(
                    p.as_ref().map_or(-1, |p| p.channel.fd().as_raw_fd()),
                    false,
                ));
            }
            let c = self.captured.len();
            for cap in &self.captured {
                fds.push(sys::pollfd(cap.fd.as_raw_fd(), false));
            }
            self.admin.fill_pollfds(&mut fds);
            sys::poll(&mut fds, timeout).context("poll")?;
            let mut turn = Laps::start();
            // Workers' output first: a dying worker's last words come
            // before the line saying it died.
            let ready: Vec<bool> = fds[1 + n..1 + n + c]
                .iter()
                .map(|p| p.revents != 0)
                .collect();
            self.drain_captured(|k| ready[k]);
            if fds[0].revents != 0 {
                while let Some(sig) = sys::read_signal(&self.signals).context("signalfd")? {
                    self.on_signal(sig);
                }
            }
            turn.lap("signals (reaping and restarting workers)");
            for p in 0..n {
                if fds[1 + p].revents != 0 {
                    self.read_control(p);
                }
            }
            turn.lap("proxy messages");
            for request in self.admin.on_ready(&fds[1 + n + c..]) {
                self.on_admin(request);
            }
            self.admin.sweep();
            turn.lap("admin commands");
            self.run_timers();
            if self.probing.is_some() {
                self.poll_reload_probe();
            }
            if self.reload.is_some() {
                // A stale worker still starting may have become ready or died.
                self.reload_advance();
            }
            self.sync_hold();
            turn.lap("timers and reload");
            turn.warn_if_slow();
            // Not while any replacement is still starting (it would be
            // replaced a second time, beside it).
            if (self.reload_pending || self.reload_resume)
                && self.reload.is_none()
                && self.probing.is_none()
                && self.stopping.is_none()
                && !self.starting
                && self.proxies.iter().all(Option::is_some)
                && !self.slots.iter().any(|s| s.replaces.is_some())
            {
                if std::mem::take(&mut self.reload_resume) {
                    self.resume_reload();
                }
                if self.reload.is_none() && std::mem::take(&mut self.reload_pending) {
                    info!("reloading again (a SIGHUP came during the last reload)");
                    if let Err(e) = self.start_reload(None) {
                        error!("reload refused: {e}");
                    }
                }
            }
            if self.starting {
                self.check_startup()?;
            }
            if self.stopping.is_some()
                && self.proxies.iter().all(Option::is_none)
                && self
                    .slots
                    .iter()
                    .all(|s| !matches!(s.life, Life::Running { .. }))
            {
                // Everything the workers wrote (each pass reads up to 256
                // KiB of each pipe).
                for _ in 0..16 {
                    if self.captured.is_empty() {
                        break;
                    }
                    self.drain_captured(|_| true);
                }
                info!("halfsync stopped");
                return Ok(());
            }
        }
    }

    fn on_admin(&mut self, request: admin::Request) {
        use admin::{Command, Request};
        match request {
            Request::Http { conn, what, head } => {
                let (status, body) = match what {
                    admin::Http::Metrics => ("200 OK", report::metrics(self)),
                    admin::Http::Ping(group) => match group {
                        Some(name)
                            if !self
                                .groups
                                .iter()
                                .any(|g| !g.retired && g.config.name == name) =>
                        {
                            // (Names are short: a long one is not echoed whole.)
                            let shown: String = name.chars().take(64).collect();
                            let more = if shown.len() < name.len() { "..." } else { "" };
                            ("404 Not Found", format!("no group named {shown:?}{more}\n"))
                        }
                        _ => match self.not_serving_for(group.as_deref()) {
                            None => ("200 OK", "pong\n".to_owned()),
                            Some(why) => {
                                ("503 Service Unavailable", format!("not serving: {why}\n"))
                            }
                        },
                    },
                };
                self.admin.respond_http(conn, status, &body, head);
            }
            Request::Admin { conn, command } => {
                let answer = match command {
                    Command::Status {} => Ok(report::status(self)),
                    Command::Reload {} | Command::Scale { .. } if self.inline => {
                        Err("not available in --inline benchmark mode".to_owned())
                    }
                    Command::Reload {} => match self.start_reload(Some(conn)) {
                        // Answered when the reload finishes.
                        Ok(()) => return,
                        Err(e) => {
                            // In the log too, as a SIGHUP's refusal is.
                            error!("reload refused: {e}");
                            Err(e)
                        }
                    },
                    Command::Stop { fast } => {
                        // Answered when the master is about to exit, so the
                        // command returns once the server has stopped.
                        self.stop_waiters.push(conn);
                        if fast {
                            warn!("fast stop requested");
                            if self.stopping.is_none() {
                                self.notify("STOPPING=1");
                            }
                            self.stopping = Some(Instant::now());
                            self.kill_everything();
                        } else if self.stopping.is_none() {
                            self.begin_stop();
                        }
                        return;
                    }
                    Command::Scale { group, workers } => {
                        self.scale(&group, workers).map(|m| admin::ok(&m))
                    }
                };
                let body = answer.unwrap_or_else(|e| admin::err(&e));
                self.admin.respond(conn, body);
            }
        }
    }

    /// Why the server cannot answer every command now, for the health
    /// check (`GET /ping`): starting, stopping, a proxy down, or a group
    /// with no ready worker for some proxy (all crashed and backing off,
    /// say). `None` when it serves.
    pub(crate) fn not_serving(&self) -> Option<String> {
        self.not_serving_for(None)
    }

    /// [`Master::not_serving`], for one group's commands only (its
    /// workers, and everything all groups need) when `group` names one.
    pub(crate) fn not_serving_for(&self, group: Option<&str>) -> Option<String> {
        if self.stopping.is_some() {
            return Some("stopping".to_owned());
        }
        if self.starting {
            return Some("starting".to_owned());
        }
        if let Some(p) = self.proxies.iter().position(Option::is_none) {
            return Some(format!("proxy {p} is restarting"));
        }
        // A proxy's loop turns at least once a second; one that has not
        // for this long is stopped (SIGSTOP, a debugger) or stuck.
        let now = shm_sys::monotonic_ns();
        for (p, stats) in self.stats.iter().enumerate() {
            let beat = stats.last_heartbeat_ns();
            if beat != 0 && now.saturating_sub(beat) > PROXY_SILENT_NS {
                return Some(format!(
                    "proxy {p} has not run its loop for {} s (stopped or stuck)",
                    now.saturating_sub(beat) / 1_000_000_000
                ));
            }
        }
        // A full proxy refuses every new client (a balancer should send
        // them elsewhere until it has room).
        let max = u64::from(self.config.server.max_connections);
        for (p, stats) in self.stats.iter().enumerate() {
            if stats.global().connections >= max {
                return Some(format!(
                    "proxy {p} holds max_connections ({max}) connections and refuses new ones"
                ));
            }
        }
        if self.inline {
            return None;
        }
        let wanted = |r: &GroupRec| !r.retired && group.is_none_or(|name| r.config.name == name);
        // A group a reload is still adding serves nothing yet, and the
        // server serves what it served before: only `/ping?group=` of it
        // says so (if it fails to start, the reload drops it again).
        let being_added =
            |g: usize| group.is_none() && self.reload.as_ref().is_some_and(|j| j.adds_group(g));
        for (g, group) in self
            .groups
            .iter()
            .enumerate()
            .filter(|&(g, r)| wanted(r) && !being_added(g))
        {
            // A request running past half its request_timeout, and past 10
            // times the group's usual run time (a group whose requests take
            // seconds by design is busy, not hung), is likely to be killed
            // as hung: its worker is no use to the next one. Usual: the
            // workers' moving estimate of the plugin's run time, which
            // follows a reload and leaves queueing out; before it has
            // samples, the mean latency of what was answered.
            let half =
                u64::try_from(group.config.request_timeout.as_nanos() / 2).unwrap_or(u64::MAX);
            let stats = self.group_stats(g);
            let usual_ns = if stats.run_ns > 0 {
                stats.run_ns
            } else {
                stats
                    .latency
                    .sum_us
                    .checked_div(stats.latency.count())
                    .unwrap_or(0)
                    .saturating_mul(1000)
            };
            let hung_after = half.max(usual_ns.saturating_mul(10));
            let stuck = |i: usize| {
                half > 0
                    && self.slots[i]
                        .current_request()
                        .is_some_and(|b| now.saturating_sub(b.since_ns) > hung_after)
            };
            for p in 0..self.proxies.len() {
                let mine = || {
                    (0..self.slots.len()).filter(|&i| {
                        let s = &self.slots[i];
                        s.group == g && s.proxy == p && s.ready && s.serves()
                    })
                };
                // (An unresponsive worker serves nobody.)
                let serving = mine().any(|i| self.worker_state(i) != "unresponsive" && !stuck(i));
                if !serving {
                    let of_proxy = if self.proxies.len() > 1 {
                        format!(" of proxy {p}")
                    } else {
                        String::new()
                    };
                    let hung = mine().filter(|&i| stuck(i)).count();
                    let why = if hung > 0 {
                        format!(
                            " ({hung} running a request for more than half of request_timeout and 10 \
                             times the usual run time)"
                        )
                    } else {
                        String::new()
                    };
                    return Some(format!(
                        "group {:?} has no worker{of_proxy} ready{why}",
                        group.config.name
                    ));
                }
            }
        }
        None
    }

    /// While starting: fails if a group has no worker ready and all its
    /// workers failed to start twice.
    fn check_startup(&mut self) -> Result<()> {
        let live: Vec<usize> = (0..self.groups.len())
            .filter(|&g| !self.groups[g].retired)
            .collect();
        // Ready once every proxy process has a worker of every group.
        let proxies = self.proxies.len();
        let ready = live
            .iter()
            .filter(|&&g| {
                (0..proxies).all(|p| {
                    self.slots
                        .iter()
                        .any(|s| s.group == g && s.proxy == p && s.ever_ready)
                })
            })
            .count();
        if ready == live.len() {
            self.starting = false;
            let ready = self.slots.iter().filter(|s| s.ready).count();
            let workers = self.slots.iter().filter(|s| s.active()).count();
            if ready < workers {
                info!(
                    workers_ready = ready,
                    workers,
                    "halfsync ready: every group has a worker serving; the others are still starting"
                );
            } else {
                info!(workers_ready = ready, workers, "halfsync ready");
            }
            self.notify(&format!(
                "READY=1\nSTATUS=serving: {workers} workers, generation {}",
                self.generation
            ));
            return Ok(());
        }
        for &g in &live {
            let mine: Vec<&SlotRec> = self.slots.iter().filter(|s| s.group == g).collect();
            if mine.is_empty() || !mine.iter().all(|s| !s.ever_ready && s.failures >= 2) {
                continue;
            }
            // Workers of one plugin usually fail alike: say it once.
            let mut reasons: Vec<String> = mine
                .iter()
                .filter_map(|s| {
                    s.last_failure.clone().or_else(|| {
                        // None was ever ready: it died loading or in init.
                        s.last_exit.map(|how| {
                            format!(
                                "a worker died while loading or initialising its plugin ({})",
                                describe_exit(how)
                            )
                        })
                    })
                })
                .collect();
            reasons.dedup();
            let msg = format!(
                "group {}: no worker could start: {}",
                self.groups[g].config.name,
                reasons.join("; ")
            );
            self.kill_everything();
            self.reap_all(Duration::from_secs(5));
            self.drain_captured(|_| true);
            return Err(anyhow!(msg));
        }
        Ok(())
    }

    /// Reaps every child, waiting up to `limit` (after SIGKILLs).
    fn reap_all(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            match sys::reap() {
                Ok(Some((pid, _, _))) => {
                    for p in &mut self.proxies {
                        if p.as_ref().is_some_and(|p| p.pid == pid) {
                            *p = None;
                        }
                    }
                    for s in &mut self.slots {
                        if s.pid() == Some(pid) {
                            s.life = Life::Stopped;
                        }
                    }
                }
                Ok(None) => {
                    let alive = self.proxies.iter().any(Option::is_some)
                        || self.slots.iter().any(|s| s.pid().is_some());
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
        let mut next = now + Duration::from_secs(1);
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
        for (at, _) in self.proxy_retry.iter().flatten() {
            next = next.min(*at);
        }
        if self.probing.is_some() {
            next = next.min(now + crate::probe::Probe::POLL_EVERY);
        }
        next = next
            .min(self.next_pool_check)
            .min(self.admin.next_deadline());
        next.saturating_duration_since(now)
    }

    fn on_signal(&mut self, sig: i32) {
        match sig {
            libc::SIGCHLD => self.reap_children(),
            libc::SIGTERM | libc::SIGINT | libc::SIGQUIT => {
                if self.stopping.is_none() {
                    self.begin_stop();
                } else if sig == libc::SIGINT {
                    // Ctrl-C twice: the operator does not want to wait.
                    warn!("second SIGINT: stopping now");
                    self.kill_everything();
                } else {
                    // systemd sends SIGTERM after ExecStop; a supervisor may
                    // repeat it. Neither should cut the drain short.
                    info!("already stopping; SIGINT again or `halfsync stop --fast` stops at once");
                }
            }
            libc::SIGHUP
                if self.stopping.is_none()
                    && (self.reload.is_some()
                        || self.probing.is_some()
                        || self.slots.iter().any(|s| s.replaces.is_some())) =>
            {
                self.reload_pending = true;
                info!(
                    "SIGHUP during a reload: another reload follows it, with the config file as it is then"
                );
            }
            libc::SIGHUP => {
                if let Err(e) = self.start_reload(None) {
                    error!("reload refused: {e}");
                }
            }
            libc::SIGUSR1 => {
                match crate::logging::reopen() {
                    Ok(()) => info!("log file reopened"),
                    Err(e) => error!("cannot reopen the log file: {e}"),
                }
                for p in self.proxies.iter().flatten() {
                    sys::kill(p.pid, libc::SIGUSR1);
                }
                for s in &self.slots {
                    if let Some(pid) = s.pid() {
                        sys::kill(pid, libc::SIGUSR1);
                    }
                }
            }
            libc::SIGUSR2 => {
                // PHP-FPM reloads on SIGUSR2; an operator used to it should
                // not think it did something.
                warn!("SIGUSR2 ignored: to reload, send SIGHUP or run `halfsync reload`");
            }
            _ => {}
        }
    }

    /// Logs what the workers' output pipes hold (those `which` picks),
    /// and forgets the ones closed.
    fn drain_captured(&mut self, which: impl Fn(usize) -> bool) {
        let mut k = 0;
        self.captured.retain_mut(|cap| {
            let keep = !which(k) || cap.drain();
            k += 1;
            keep
        });
    }

    pub(crate) fn notify(&self, state: &str) {
        if let Some(n) = &self.notifier {
            n.send(state);
        }
    }

    /// systemd: READY=1 and the current `STATUS=` (after a reload or a
    /// scale, which change what it said), with `note` appended.
    pub(crate) fn notify_serving(&self, note: &str) {
        // (Not mid-reload: its end says READY=1.)
        if self.stopping.is_some()
            || self.starting
            || self.reload.is_some()
            || self.probing.is_some()
        {
            return;
        }
        let workers: u32 = self
            .groups
            .iter()
            .filter(|g| !g.retired)
            .map(|g| g.config.workers)
            .sum();
        self.notify(&format!(
            "READY=1\nSTATUS=serving: {workers} workers, generation {}{note}",
            self.generation
        ));
    }

    fn begin_stop(&mut self) {
        self.notify("STOPPING=1\nSTATUS=stopping: draining in-flight requests");
        let grace = self.config.server.shutdown_grace;
        info!(
            grace_ms = grace.as_millis() as u64,
            "stopping: draining in-flight requests"
        );
        self.stopping = Some(Instant::now() + grace);
        self.abandon_reload();
        // A replacement still in its plugin's init (as its slot says, not
        // just as far as the master has heard) holds no request, and the
        // worker it would replace serves its group meanwhile: nothing to
        // drain, and an init that hangs would hold the stop for the whole
        // grace period. (Other starting workers may have requests queued
        // for them, so they get the grace.)
        for s in &mut self.slots {
            if let Life::Running { pid, .. } = s.life
                && !s.ready
                && s.replaces.is_some()
                && matches!(s.slot.control().state(), Ok(WorkerState::Starting))
            {
                s.end_cause = Some(Cause::Scale);
                s.retiring = true;
                sys::kill(pid, libc::SIGKILL);
            }
        }
        // The proxy holds its own copies; once it closes them the port is free.
        self.listeners.clear();
        self.tell_proxy(ToProxy::Shutdown);
        // Workers whose proxy is down have nothing to drain for.
        for p in 0..self.proxies.len() {
            if self.proxies[p].is_none() {
                self.stop_workers_of(Some(p));
            }
        }
    }

    fn reap_children(&mut self) {
        loop {
            match sys::reap() {
                // (`reap` killed what was left of a worker's process group.)
                Ok(Some((pid, how, cpu))) => self.on_child_exit(pid, how, cpu),
                Ok(None) => {
                    self.release_removed_plugins();
                    return;
                }
                Err(e) => {
                    error!("waitpid: {e}");
                    return;
                }
            }
        }
    }

    fn on_child_exit(&mut self, pid: i32, how: i32, cpu: sys::CpuTime) {
        if let Some(p) = self
            .proxies
            .iter()
            .position(|p| p.as_ref().is_some_and(|p| p.pid == pid))
        {
            self.proxies[p] = None;
            self.proxies_ended_cpu += cpu;
            if self.stopping.is_some() {
                info!(pid, proxy = p, "proxy exited");
                self.stop_workers_of(Some(p));
            } else {
                error!(
                    pid,
                    proxy = p,
                    "proxy died ({}); restarting it and its workers",
                    describe_exit(how)
                );
                self.restart_proxy(p);
            }
            return;
        }
        let Some(i) = self.slots.iter().position(|s| s.pid() == Some(pid)) else {
            // A reload's plugin probe (one given up on is gone already).
            if let Some(p) = &mut self.probing
                && p.probe.pid() == pid
            {
                p.probe.reaped(how);
            }
            return;
        };
        // Its last words first (a panic message, a plugin's last print);
        // its pipe is closed now, unless a process it started holds it.
        self.captured.retain_mut(|c| c.pid != pid || c.drain());
        let stopping = self.stopping.is_some();
        let s = &mut self.slots[i];
        let Life::Running { since, .. } = s.life else {
            return;
        };
        let name = self.groups[s.group].config.name.clone();
        self.groups[s.group].ended_cpu += cpu;
        // What it dropped of its plugin's log lines is its group's now (if
        // believable, see `log_dropped`); the slot's count starts again for
        // the next worker.
        let dropped = s.log_dropped();
        let g = &mut self.groups[s.group];
        g.ended_log_dropped = g.ended_log_dropped.saturating_add(dropped);
        s.slot.control().set_log_dropped(0);
        let served = s.slot.control().served();
        s.ever_ready |= served > 0;
        // Died while its plugin loaded or ran init (a crash there is a
        // broken deploy, not a request that kills workers): init_failed.
        let ctl = s.slot.control();
        let in_init = ctl.pid() == pid as u32 && matches!(ctl.state(), Ok(WorkerState::Starting));
        // It had left its loop to exit (and so was in, or past, its
        // plugin's fini) when it died of a signal not the master's, or
        // exited with a code the worker itself never uses.
        let killed = matches!(
            s.end_cause,
            Some(Cause::Timeout | Cause::Unresponsive | Cause::InitTimeout | Cause::Corrupt)
        );
        let failed_exiting = !killed
            && ctl.pid() == pid as u32
            && matches!(ctl.state(), Ok(WorkerState::Exiting))
            && if how < 0 {
                how != -libc::SIGKILL
            } else {
                how != 0 && how != EXIT_PLUGIN_FAILED && how != halfsync_worker::EXIT_SLOT_FAILED
            };
        let cause = s
            .end_cause
            .take()
            .unwrap_or(if how == EXIT_PLUGIN_FAILED || in_init {
                Cause::InitFailed
            } else {
                Cause::Crash
            });
        self.groups[s.group].ended[cause as usize] += 1;
        // A replacement that dies before taking over is not restarted: its
        // predecessor still serves.
        let failed_replacement = s.replaces.is_some() && !s.ready;
        // The first workers of a group a reload is adding: one that fails
        // to start means the group is not added (`addition_failed`).
        // (One drained or retired before it was ready left by plan: no
        // failure, and `reload_advance` stops waiting for it.)
        let planned = s.draining || s.retiring;
        let failed_addition =
            !s.ready && !planned && self.reload.as_ref().is_some_and(|j| j.adding(i));
        let failed_start =
            !s.ready && !planned && self.reload.as_ref().is_some_and(|j| j.starting(i));
        let next = if stopping
            || s.retiring
            || s.draining
            || failed_replacement
            || failed_addition
            || self.groups[s.group].retired
        {
            Restart::Never
        } else {
            // A failed start: init failed, it died before it was ready
            // (killed past `init_timeout`, or crashed in init), or it
            // died young without serving a single request (a plugin that
            // crashes on every request). A worker that served before
            // crashing is replaced at once, however young.
            if how == EXIT_PLUGIN_FAILED
                || (!s.ready && served == 0)
                || (since.elapsed() < MIN_HEALTHY_LIFE && served == 0)
            {
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
        // Told to exit, it should have exited 0 (a SIGKILL is the master's
        // own, past a grace period, and logged where it is sent): anything
        // else failed on its way out, most likely in the plugin's fini.
        if failed_exiting {
            warn!(
                group = %name,
                worker = s.label,
                pid,
                cause = cause.name(),
                "worker failed while exiting ({}): its plugin's fini, or code that runs at \
                 exit, crashed or exited non-zero",
                describe_exit(how)
            );
        } else if stopping {
            info!(group = %name, worker = s.label, pid, "worker exited ({})", describe_exit(how));
        } else if s.retiring {
            // Planned: recycled, replaced by a reload, scaled down.
            info!(group = %name, worker = s.label, pid, cause = cause.name(), "worker exited ({})", describe_exit(how));
        } else {
            // When the master killed it, why (a SIGKILL alone reads like
            // the OOM killer's).
            let why = match cause {
                Cause::Timeout if s.past_drain_timeout => {
                    " after its request ran past drain_timeout while it was being replaced"
                }
                Cause::Timeout => " after its request ran past request_timeout",
                Cause::Unresponsive => {
                    " after it took none of its requests past request_timeout (stopped, or \
                     starved of CPU)"
                }
                Cause::InitTimeout => " after its plugin's init ran past init_timeout",
                Cause::Corrupt => " after it broke the shared-memory protocol",
                _ => "",
            };
            warn!(group = %name, worker = s.label, pid, "worker died ({}){why}", describe_exit(how));
            // Killed by a signal (not a clean exit) after its plugin file
            // was rewritten in place: most likely what killed it.
            if matches!(cause, Cause::Crash | Cause::InitFailed)
                && how < 0
                && let Some(plugin) = s.plugin_file.as_ref().filter(|p| p.changed_in_place())
            {
                error!(
                    group = %name,
                    "the plugin file {} was rewritten in place after this worker loaded it \
                     (cp onto a loaded .so changes the code the workers run), which most likely \
                     crashed it: install a new version with mv or install(1) (a new file), then \
                     halfsync reload",
                    plugin.path.display()
                );
            }
        }
        s.life = Life::Resetting { next };
        // Its plugin file is no longer held for it.
        s.plugin_file = None;
        s.last_exit = Some(how);
        s.last_failure = s.slot.failure().or_else(|| {
            (cause == Cause::InitTimeout).then(|| {
                format!(
                    "plugin init ran past init_timeout ({} ms) and was killed",
                    self.groups[s.group].config.init_timeout.as_millis()
                )
            })
        });
        s.ready = false;
        if failed_replacement {
            self.replacement_failed(i, how);
        }
        if failed_addition {
            self.addition_failed(i, how);
        }
        if failed_start {
            self.start_failed(i, how);
        }
        match &self.proxies[self.slots[i].proxy] {
            Some(_) => self.tell_slot(
                i,
                ToProxy::WorkerExited {
                    slot: i as u32,
                    pid,
                    status: how,
                    restart: next,
                },
            ),
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
        if next == Restart::Never {
            // Gone for good: a replacement still starting for it takes
            // over as a worker of its own, unless its group no longer
            // wants this one; either way it no longer points here (the
            // slot may be used again).
            let scaled_away = self.slots[i].scaled_away;
            let heirs: Vec<usize> = (0..self.slots.len())
                .filter(|&r| self.slots[r].replaces == Some(i))
                .collect();
            for r in heirs {
                self.slots[r].replaces = None;
                if scaled_away {
                    self.drain(r, Cause::Scale);
                }
            }
        }
        let s = &mut self.slots[i];
        s.replaces = None;
        s.retiring = false;
        s.draining = false;
        s.life = match next {
            _ if self.stopping.is_some() => Life::Stopped,
            Restart::Never => Life::Spare,
            Restart::Now => Life::Backoff { at: Instant::now() },
            Restart::Later => {
                let g = &self.groups[s.group].config;
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
        // (A restart due now starts at this loop turn's timers. Not
        // called from here: a start that fails comes back here, and with
        // no restart delay that recursed until the stack overflowed.)
    }

    fn read_control(&mut self, n: usize) {
        loop {
            let Some(Some(p)) = self.proxies.get(n) else {
                return;
            };
            let msg = match p.channel.recv_from_proxy() {
                Ok(Received::Msg(m)) => m,
                Ok(Received::Empty) => return,
                // The proxy is gone; SIGCHLD tells the rest.
                Ok(Received::Closed) => return,
                // So is one killed while stopping (stop --fast).
                Err(e) if self.stopping.is_some() => {
                    tracing::debug!("control channel: {e}");
                    return;
                }
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
                        self.stop_worker(i);
                    }
                }
                ToMaster::WorkerReady { slot, pid } => self.worker_ready(slot as usize, pid),
                ToMaster::Drained => {
                    info!(proxy = n, "proxy drained");
                    self.stop_workers_of(Some(n));
                }
            }
        }
    }

    /// A worker finished init. If it replaces another, that one leaves
    /// (the proxy drained it already if it was serving; a restart of it
    /// still in init, or waiting out a restart delay, ends too) and this
    /// one is a regular worker.
    fn worker_ready(&mut self, i: usize, pid: i32) {
        if self.running_pid(i) != Some(pid) {
            return;
        }
        let s = &mut self.slots[i];
        s.ready = true;
        s.ever_ready = true;
        if let Some(old) = s.replaces.take() {
            let restarts = self.slots.get(old).map_or(0, |o| o.restarts);
            self.slots[i].restarts = restarts;
            if self.slots.get(old).is_some_and(|o| o.scaled_away) {
                // It replaces a worker its group no longer wants: it goes
                // too (the proxy drains the old one itself).
                self.drain(i, Cause::Scale);
            } else if old < self.slots.len() {
                // Died and restarted since `replace` named the cause: the
                // replacements that are not a recycle are a reload's.
                let cause = self.slots[old].end_cause.unwrap_or(Cause::Reload);
                self.drain(old, cause);
            }
        }
        self.reload_progress(i);
    }

    /// The proxy watchdog, once per master loop turn: logs a proxy whose
    /// loop has not turned (heartbeat unchanged) for [`PROXY_SILENT_NS`]
    /// and kills it past `proxy_stall_timeout` (it is then restarted as
    /// after any death). Only time the master ran counts: after a gap in
    /// its own loop (the whole VM paused, the master stopped) every proxy
    /// gets a fresh start, since none could turn while nothing ran.
    fn watch_proxies(&mut self) {
        let now = Instant::now();
        let gap = now.saturating_duration_since(self.last_turn);
        self.last_turn = now;
        if self.stopping.is_some() || self.inline {
            return;
        }
        let limit = self.config.server.proxy_stall_timeout;
        for (p, slot) in self.proxies.iter_mut().enumerate() {
            let Some(proxy) = slot.as_mut() else { continue };
            let beat = self.stats[p].last_heartbeat_ns();
            if beat != proxy.last_beat || gap > Duration::from_secs(2) {
                if proxy.stall_logged && beat != proxy.last_beat {
                    info!(
                        proxy = p,
                        pid = proxy.pid,
                        silent_ms = now
                            .saturating_duration_since(proxy.silent_since)
                            .as_millis() as u64,
                        "proxy runs its loop again"
                    );
                    proxy.stall_logged = false;
                }
                proxy.last_beat = beat;
                proxy.silent_since = now;
                continue;
            }
            let silent = now.saturating_duration_since(proxy.silent_since);
            if !proxy.stall_logged && silent.as_nanos() as u64 > PROXY_SILENT_NS {
                proxy.stall_logged = true;
                warn!(
                    proxy = p,
                    pid = proxy.pid,
                    "proxy has not run its loop for {} s (stopped with SIGSTOP or a debugger, or \
                     stuck); it serves no one meanwhile{}",
                    silent.as_secs(),
                    if limit.is_zero() {
                        String::new()
                    } else {
                        format!(
                            ", and is killed and restarted at proxy_stall_timeout ({} s)",
                            limit.as_secs()
                        )
                    }
                );
            }
            if !limit.is_zero() && silent >= limit {
                error!(
                    proxy = p,
                    pid = proxy.pid,
                    "proxy has not run its loop for {} s, past proxy_stall_timeout: killing it \
                     (its clients' connections close) to restart it",
                    silent.as_secs()
                );
                sys::kill(proxy.pid, libc::SIGKILL);
                // Reaped on SIGCHLD and restarted there; not killed again.
                proxy.silent_since = now + Duration::from_secs(3600);
            }
        }
    }

    /// A proxy the watchdog found silent (see `watch_proxies`), if any.
    pub(crate) fn stalled_proxy(&self) -> Option<usize> {
        self.proxies
            .iter()
            .position(|p| p.as_ref().is_some_and(|p| p.stall_logged))
    }

    fn run_timers(&mut self) {
        self.watch_proxies();
        // A burst of worker output over budget is counted in the log once
        // its second is over, even if the worker prints nothing more.
        let now = Instant::now();
        for c in &mut self.captured {
            let dropped = c.budget.take_suppressed(now);
            c.report(dropped);
        }
        let now = Instant::now();
        if let Some(deadline) = self.stopping
            && now >= deadline
        {
            let left = self.proxies.iter().flatten().count()
                + self.slots.iter().filter(|s| s.pid().is_some()).count();
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
                    let s = &self.slots[i];
                    if s.retiring {
                        warn!(
                            group = %self.groups[s.group].config.name,
                            worker = s.label,
                            pid,
                            "worker still running drain_timeout after it was asked to exit; killing it"
                        );
                    }
                    sys::kill(pid, libc::SIGKILL);
                    if let Life::Running { kill_at, .. } = &mut self.slots[i].life {
                        *kill_at = None;
                    }
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
                        // The master's own failure (out of descriptors or
                        // processes): retried, but not in a tight loop
                        // whatever restart_delay says.
                        if let Life::Backoff { at } = &mut self.slots[i].life {
                            *at = (*at).max(now + SPAWN_RETRY_MIN);
                        }
                    }
                }
                _ => {}
            }
        }
        for p in 0..self.proxy_retry.len() {
            if self.proxy_retry[p]
                .as_ref()
                .is_some_and(|(at, _)| now >= *at)
            {
                self.retry_proxy(p);
            }
        }
        if now >= self.next_pool_check {
            self.next_pool_check = now + POOL_CHECK;
            if self.stopping.is_none() && !self.starting {
                self.check_pools();
            }
        }
    }

    /// Proxy `p` died: its bookkeeping of which worker holds which request
    /// is gone, so its workers are replaced along with it. The other proxy
    /// processes and their workers carry on.
    fn restart_proxy(&mut self, p: usize) {
        self.proxy_restarts += 1;
        let mine: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].proxy == p)
            .collect();
        let pids: Vec<(i32, usize)> = mine
            .iter()
            .filter_map(|&i| Some((self.slots[i].pid()?, self.slots[i].group)))
            .collect();
        for &i in &mine {
            let Some(pid) = self.slots[i].pid() else {
                continue;
            };
            // The worker and what its plugin started (not reaped yet, so
            // its group id is still its own).
            sys::kill_group(pid);
            let s = &mut self.slots[i];
            s.restarts += 1;
            // Its dropped log lines are its group's now, as for any
            // worker that ended (`on_child_exit`, which this one skips).
            let dropped = s.log_dropped();
            s.slot.control().set_log_dropped(0);
            let g = &mut self.groups[s.group];
            g.ended_log_dropped = g.ended_log_dropped.saturating_add(dropped);
            g.ended[Cause::ProxyDied as usize] += 1;
            info!(group = %g.config.name, worker = s.label, pid, "worker killed with its proxy");
        }
        let wanted: Vec<usize> = mine
            .iter()
            .copied()
            .filter(|&i| self.slots[i].active())
            .collect();
        // SIGKILLed children die promptly; reap them before touching their slots.
        for (pid, g) in pids {
            match sys::reap_pid(pid, Duration::from_secs(5)) {
                Ok(cpu) => self.groups[g].ended_cpu += cpu,
                Err(e) => warn!(pid, "cannot reap a worker of the dead proxy: {e}"),
            }
        }
        if let Some(job) = self.reload.take() {
            // The other proxies' workers may be half replaced: the reload
            // resumes once the proxy is back (without re-reading the file).
            self.reload_resume = true;
            self.resume_errors = job.errors;
            // The surviving proxies keep what they hold until the resumed
            // reload (or the lack of one) releases it (`sync_hold`).
            warn!("a proxy died during the reload; it resumes once the proxy is back");
            if let Some(conn) = job.reply_to {
                self.admin.respond(
                    conn,
                    admin::err(
                        "a proxy died during the reload; its workers restarted, and the reload \
                         resumes once it is back (see halfsync status)",
                    ),
                );
            }
        }
        for &i in &mine {
            let s = &mut self.slots[i];
            s.slot.reset();
            s.life = Life::Spare;
            s.replaces = None;
            s.retiring = false;
            s.draining = false;
            s.ready = false;
        }
        self.proxy_retry[p] = Some((Instant::now(), wanted));
        self.retry_proxy(p);
    }

    /// Starts proxy `p` again, and the workers of `wanted` slots with it;
    /// if it cannot start (out of descriptors or processes), tries again in
    /// [`SPAWN_RETRY_MIN`] rather than stopping the server (the other
    /// proxies go on serving; `/ping` says a proxy is being restarted).
    fn retry_proxy(&mut self, p: usize) {
        let Some((_, wanted)) = self.proxy_retry[p].take() else {
            return;
        };
        if self.stopping.is_some() {
            return;
        }
        if let Err(e) = self.start_proxy(p) {
            error!(
                proxy = p,
                "{e:#}; trying again in {} s",
                SPAWN_RETRY_MIN.as_secs()
            );
            self.proxy_retry[p] = Some((Instant::now() + SPAWN_RETRY_MIN, wanted));
            return;
        }
        for i in wanted {
            if !matches!(self.slots[i].life, Life::Spare)
                || self.groups[self.slots[i].group].retired
            {
                continue;
            }
            if let Err(e) = self.start_worker(i, None) {
                error!("{e:#}");
            }
        }
    }

    // ---- listeners (reload) ----

    /// Binds the listen addresses that are new in `config`; returns them
    /// without changing anything yet.
    fn bind_new_listeners(
        &self,
        config: &Config,
    ) -> Result<Vec<(SocketAddr, Vec<TcpListener>)>, String> {
        let mut out = Vec::new();
        for addr in &config.server.listen {
            if self.listeners.iter().any(|l| l.addr == *addr) {
                continue;
            }
            let sockets = listen_all(*addr, config, self.proxies.len())
                .map_err(|e| listen_error(*addr, &e, "server.listen"))?;
            out.push((*addr, sockets));
        }
        Ok(out)
    }

    /// Hands new listeners to the proxy and closes the ones `config` drops.
    fn swap_listeners(&mut self, config: &Config, new: Vec<(SocketAddr, Vec<TcpListener>)>) {
        for (addr, sockets) in new {
            let id = self.next_listener_id;
            self.next_listener_id += 1;
            for (proxy, socket) in self.proxies.iter().zip(&sockets) {
                if let Some(p) = proxy
                    && let Err(e) = p
                        .channel
                        .send_to_proxy(ToProxy::AddListener { id }, &[socket.as_raw_fd()])
                {
                    warn!("control channel: {e}");
                }
            }
            info!(listen = %addr, "listening");
            self.listeners.push(ListenerRec { id, addr, sockets });
        }
        let gone: Vec<u32> = self
            .listeners
            .iter()
            .filter(|l| !config.server.listen.contains(&l.addr))
            .map(|l| l.id)
            .collect();
        for id in gone {
            self.tell_proxy(ToProxy::RemoveListener { id });
            if let Some(pos) = self.listeners.iter().position(|l| l.id == id) {
                let l = self.listeners.remove(pos);
                info!(listen = %l.addr, "stopped listening");
            }
        }
    }

    /// Sends the proxy the current configuration (after a reload).
    fn reconfigure_proxy(&mut self) -> Result<(), String> {
        self.send_config(self.wanted_hold(), false)
    }

    /// Whether a configuration send missed some proxy.
    pub(crate) fn proxy_missed_config(&self) -> bool {
        self.proxies.iter().flatten().any(|p| p.config_stale)
    }

    /// Sends the configuration with `hold` to every proxy, or only to those
    /// the last one did not reach (`config_stale`, kept for a retry).
    pub(crate) fn send_config(&mut self, hold: Vec<u32>, only_stale: bool) -> Result<(), String> {
        let text = halfsync_proxy::Reconfigure {
            config: toml::to_string(&self.config).map_err(|e| e.to_string())?,
            group_ids: self.group_ids(),
            hold: hold.clone(),
        }
        .to_toml();
        self.hold_sent = hold;
        let fd = shm_sys::memfd_with(&text).map_err(|e| format!("reconfigure: {e}"))?;
        let mut failed = None;
        for p in self.proxies.iter_mut().flatten() {
            if only_stale && !p.config_stale {
                continue;
            }
            // Every proxy gets its copy even if one channel fails.
            let sent = p.channel.send_to_proxy(
                ToProxy::Reconfigure {
                    len: text.len() as u32,
                },
                &[fd.as_raw_fd()],
            );
            p.config_stale = sent.is_err();
            if let Err(e) = sent {
                failed = Some(format!(
                    "configuration not sent to proxy {}: {e}; retrying every second",
                    p.pid
                ));
            }
        }
        match failed {
            Some(e) => {
                self.config_retry_at = Instant::now() + Duration::from_secs(1);
                Err(e)
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_turn_names_its_slowest_phase() {
        let mut t = Laps::start();
        std::thread::sleep(Duration::from_millis(5));
        t.lap("quick");
        std::thread::sleep(Duration::from_millis(40));
        t.lap("slow");
        t.lap("nothing");
        assert_eq!(t.slow(Duration::from_secs(10)), None);
        let (total, phase, took) = t.slow(Duration::from_millis(20)).expect("slow turn");
        assert_eq!(phase, "slow");
        assert!(took >= Duration::from_millis(40) && total >= took + Duration::from_millis(5));
    }
}
