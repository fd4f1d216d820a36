//! Test-loading plugins in a throwaway child process, so neither the
//! master nor the CLI ever runs plugin code (not even a library
//! constructor), and a plugin that crashes or hangs while being checked
//! costs only that child.
//!
//! `halfsync run` probes with `init: false` (load and check the ABI);
//! `halfsync check` with `init: true` (also call `init` with the group's
//! config, then `fini`), like `nginx -t`.

use std::io::{BufRead, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use halfsync_config::Config;
use halfsync_proxy::control::describe_exit;
use serde::{Deserialize, Serialize};

use crate::master::ROLE_ENV;
use crate::plugin_file::PluginFile;

const SPEC_ENV: &str = "HALFSYNC_PROBE_SPEC";

/// How long loading one plugin file (dlopen, its constructors, the ABI
/// check) may take in the probe.
const LOAD_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Serialize, Deserialize)]
struct Spec {
    init: bool,
    plugins: Vec<Target>,
}

#[derive(Serialize, Deserialize, Clone)]
struct Target {
    group: String,
    path: PathBuf,
    /// The master's descriptor of the file, inherited: what is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fd: Option<i32>,
    config: String,
}

/// What the probe found out about one group's plugin.
#[derive(Clone)]
pub struct Probed {
    /// Group name.
    pub group: String,
    /// Plugin file.
    pub path: PathBuf,
    /// The plugin's name and version, from its table.
    pub name: String,
    /// Its version string.
    pub version: String,
    /// What it logged at warning level or above while being loaded and
    /// initialised (`check` only), e.g. `WARN config key x is deprecated`.
    pub log: Vec<String>,
}

/// Each group's plugin file of `config`, opened (see [`PluginFile`]).
pub fn open_plugins(exe: &crate::exe::Exe, config: &Config) -> Vec<PluginFile> {
    config
        .groups
        .iter()
        .map(|g| PluginFile::open(config.plugin_path(g, exe.dir())))
        .collect()
}

/// Loads (and with `init`, initialises) every group's plugin in a child
/// process, waiting for the outcome; `files` are the groups' plugin files
/// ([`open_plugins`]). The error is one line naming the group, the file
/// and the cause.
pub fn probe(
    exe: &crate::exe::Exe,
    config: &Config,
    files: &[PluginFile],
    init: bool,
) -> Result<Vec<Probed>> {
    probe_with_output(exe, config, files, init).map(|(probed, _)| probed)
}

/// [`probe`], with what the probe and the plugins printed to stdout and
/// stderr (`check` shows it: a plugin's `printf` in `init`).
///
/// With `init`, each group is probed in a process of its own, as each
/// worker runs one group's plugin: two groups of one `.so` must not share
/// its statics (a `OnceLock` set in `init` failed the second group's here
/// while `run` was fine).
pub fn probe_with_output(
    exe: &crate::exe::Exe,
    config: &Config,
    files: &[PluginFile],
    init: bool,
) -> Result<(Vec<Probed>, String)> {
    if !init || config.groups.len() < 2 {
        return probe_once(exe, config, files, init);
    }
    let mut probed = Vec::new();
    let mut printed = String::new();
    for (k, g) in config.groups.iter().enumerate() {
        let mut one = config.clone();
        one.groups = vec![g.clone()];
        let (p, out) = probe_once(exe, &one, &files[k..=k], init)?;
        probed.extend(p);
        printed.push_str(&out);
    }
    Ok((probed, printed))
}

fn probe_once(
    exe: &crate::exe::Exe,
    config: &Config,
    files: &[PluginFile],
    init: bool,
) -> Result<(Vec<Probed>, String)> {
    let mut probe = Probe::start(exe, config, files, init)?;
    loop {
        if let Some(outcome) = probe.poll() {
            // A child killed for missing its deadline is reaped here (the
            // master polls without blocking and reaps it on SIGCHLD).
            if probe.ended.as_ref().is_some_and(|e| e.how.is_none()) {
                let _ = probe.child.wait();
            }
            return outcome.map(|probed| (probed, probe.output().to_owned()));
        }
        std::thread::sleep(Probe::POLL_EVERY);
    }
}

/// A plugin probe under way. [`probe`] waits for one; the master starts
/// one for a reload and polls it from its loop, so that it goes on
/// supervising (and answering `status`) while a plugin takes seconds to
/// load.
pub struct Probe {
    child: std::process::Child,
    spec: Spec,
    /// Each group's `init_timeout`, for its steps' deadlines.
    timeouts: Vec<(String, Duration)>,
    lines: Receiver<String>,
    errors: Receiver<String>,
    progress: Progress,
    /// Set once the child is gone.
    ended: Option<Ended>,
    /// How it exited, when the master's `waitpid(-1)` reaped it first.
    reaped: Option<i32>,
    stdout_done: bool,
    stderr: Option<String>,
}

/// How a probe child ended, and until when its output is still collected.
struct Ended {
    /// Its exit code, or minus the signal that killed it; `None` if it was
    /// killed for missing a deadline.
    how: Option<i32>,
    collect_until: Instant,
}

impl Probe {
    /// How often [`probe`] polls, and how soon a poller should come back.
    pub const POLL_EVERY: Duration = Duration::from_millis(5);

    /// Starts the probe child, which loads each group's plugin from its
    /// file in `files` (in the order of `config.groups`).
    pub fn start(
        exe: &crate::exe::Exe,
        config: &Config,
        files: &[PluginFile],
        init: bool,
    ) -> Result<Probe> {
        if files.len() != config.groups.len() {
            bail!(
                "plugin probe: {} files for {} groups",
                files.len(),
                config.groups.len()
            );
        }
        let spec = Spec {
            init,
            plugins: config
                .groups
                .iter()
                .zip(files)
                .map(|(g, f)| Target {
                    group: g.name.clone(),
                    path: f.path.clone(),
                    fd: f.fd(),
                    config: g.plugin_config_toml(),
                })
                .collect(),
        };
        let mut cmd = Command::new(exe.program());
        // A probe stuck in a plugin must not outlive a killed parent; it
        // inherits the plugin files' descriptors.
        let text = toml::to_string(&spec).context("probe spec")?;
        let blob = halfsync_shm::sys::memfd_with(&text).context("probe spec")?;
        let mut keep: Vec<i32> = files.iter().filter_map(PluginFile::fd).collect();
        keep.push(blob.as_raw_fd());
        crate::master::sys::dies_with_this_process(&mut cmd, keep);
        let mut child = cmd
            .arg0("halfsync: plugin probe")
            .env(ROLE_ENV, "probe")
            .env_remove("NOTIFY_SOCKET")
            .env(SPEC_ENV, halfsync_shm::sys::blob_env(&blob))
            .env("HALFSYNC_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the plugin probe")?;
        // Read on threads that are never joined: a plugin may have started
        // a process that inherited the pipes and keeps them open after the
        // probe exits; the output up to then is collected with a deadline.
        let out = child.stdout.take().context("probe stdout")?;
        let mut err = child.stderr.take().context("probe stderr")?;
        let (tx, lines) = std::sync::mpsc::channel();
        crate::master::sys::spawn_signal_free_thread(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        })
        .context("starting the plugin probe's output reader")?;
        let (etx, errors) = std::sync::mpsc::channel();
        crate::master::sys::spawn_signal_free_thread(move || {
            // To the end, keeping the last OUTPUT_KEPT bytes: a plugin that
            // prints a lot has its last lines (its reason) quoted, and its
            // writes never fail on a pipe closed after the first bytes.
            let mut kept = Vec::new();
            let mut chunk = vec![0u8; 16 << 10];
            // Bounded: a process a plugin started may hold the pipe and
            // write for ever; past this much, the pipe is let go.
            let mut total = 0usize;
            while total < OUTPUT_READ_MAX {
                match err.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => {
                        total += n;
                        kept.extend_from_slice(&chunk[..n]);
                        if kept.len() > 2 * OUTPUT_KEPT {
                            kept.drain(..kept.len() - OUTPUT_KEPT);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            if kept.len() > OUTPUT_KEPT {
                kept.drain(..kept.len() - OUTPUT_KEPT);
                // (The first line may be cut: drop it.)
                let start = kept.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
                kept.drain(..start);
            }
            let _ = etx.send(String::from_utf8_lossy(&kept).into_owned());
        })
        .context("starting the plugin probe's output reader")?;
        Ok(Probe {
            child,
            spec,
            timeouts: config
                .groups
                .iter()
                .map(|g| (g.name.clone(), g.init_timeout))
                .collect(),
            lines,
            errors,
            // The child announces each step on stdout before taking it.
            progress: Progress {
                probed: Vec::new(),
                current: None,
                log: Vec::new(),
                error: None,
                limit: LOAD_TIMEOUT,
                deadline: Instant::now() + LOAD_TIMEOUT,
            },
            ended: None,
            reaped: None,
            stdout_done: false,
            stderr: None,
        })
    }

    /// The child's process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// For a parent that reaps with `waitpid(-1)`: the child exited with
    /// `how` (exit code, or minus the signal).
    pub fn reaped(&mut self, how: i32) {
        self.reaped = Some(how);
    }

    /// Takes what the child said and whether it ended, without blocking;
    /// the outcome once it has ended and its output is in.
    pub fn poll(&mut self) -> Option<Result<Vec<Probed>>> {
        self.take_output();
        if self.ended.is_none() {
            // Once the parent's `waitpid(-1)` reaped the child, its pid may
            // belong to another process: never wait for or signal it again.
            let how = match self.reaped {
                Some(how) => Some(how),
                None => {
                    // Ended: what its plugins started in its process group
                    // goes with it (killed before the reaping frees the
                    // group's id), not left holding its output pipes.
                    if crate::master::sys::has_ended(self.pid()).unwrap_or(false) {
                        crate::master::sys::kill_group(self.pid());
                    }
                    match self.child.try_wait() {
                        Ok(Some(st)) => Some(st.signal().map_or(st.code().unwrap_or(1), |s| -s)),
                        Ok(None) => None,
                        // Reaped by someone who did not say how.
                        Err(_) => Some(1),
                    }
                }
            };
            let how = match how {
                Some(how) => Some(how),
                // Each step has its own deadline, from when the child
                // announces it (see `step_limit`).
                None if Instant::now() >= self.progress.deadline => {
                    crate::master::sys::kill_group(self.pid());
                    None
                }
                None => return None,
            };
            self.ended = Some(Ended {
                how,
                collect_until: Instant::now() + Duration::from_millis(500),
            });
            self.take_output();
        }
        let ended = self.ended.as_ref()?;
        if !(self.stdout_done && self.stderr.is_some()) && Instant::now() < ended.collect_until {
            return None;
        }
        Some(self.outcome(ended.how))
    }

    fn take_output(&mut self) {
        loop {
            match self.lines.try_recv() {
                Ok(line) => self.progress.take(&line, &|step, group| {
                    step_limit(&self.timeouts, step, group)
                }),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.stdout_done = true;
                    break;
                }
            }
        }
        if self.stderr.is_none()
            && let Ok(text) = self.errors.try_recv()
        {
            self.stderr = Some(text);
        }
    }

    /// The probe's result; a failure also quotes what the failing plugin
    /// logged (`check` only).
    fn outcome(&self, how: Option<i32>) -> Result<Vec<Probed>> {
        let log = &self.progress.log;
        self.verdict(how).map_err(|e| {
            if log.is_empty() {
                e
            } else {
                anyhow::anyhow!(
                    "{e}\n  the plugin logged before that:\n    {}",
                    log.join("\n    ")
                )
            }
        })
    }

    fn verdict(&self, how: Option<i32>) -> Result<Vec<Probed>> {
        let Progress {
            probed,
            current,
            limit,
            ..
        } = &self.progress;
        let culprit = match current {
            Some((step, group)) => {
                let path = self
                    .spec
                    .plugins
                    .iter()
                    .find(|t| &t.group == group)
                    .map(|t| t.path.display().to_string());
                format!(
                    "group {group}: plugin {} ({step})",
                    path.unwrap_or_default()
                )
            }
            None if probed.len() == self.spec.plugins.len() => "plugin probe, exiting after the \
                 last plugin (a plugin's destructors or atexit handlers)"
                .to_owned(),
            None => "plugin probe".to_owned(),
        };
        match how {
            None => match current.as_ref().map(|(step, _)| step.as_str()) {
                Some("init" | "fini") => bail!(
                    "{culprit}: did not finish within {} ms (the group's init_timeout){}",
                    limit.as_millis(),
                    self.printed_before()
                ),
                _ => bail!(
                    "{culprit}: did not finish loading within {} s{}",
                    limit.as_secs(),
                    self.printed_before()
                ),
            },
            Some(0) => {
                // One report per group, in the configuration's order (the
                // callers pair them up by position).
                let complete = probed.len() == self.spec.plugins.len()
                    && probed
                        .iter()
                        .zip(&self.spec.plugins)
                        .all(|(p, t)| p.group == halfsync_config::one_line(&t.group));
                if !complete && current.is_some() {
                    // The plugin called exit(0) (in its constructor, init
                    // or fini): the step under way names it.
                    bail!(
                        "{culprit}: the plugin exited (exit code 0) before the step was done{}",
                        self.printed_before()
                    );
                }
                if !complete {
                    bail!(
                        "plugin probe: it exited 0 but reported {} of {} groups; its report \
                         was cut short",
                        probed.len(),
                        self.spec.plugins.len()
                    );
                }
                Ok(probed
                    .iter()
                    .zip(&self.spec.plugins)
                    .map(|(p, t)| Probed {
                        group: t.group.clone(),
                        path: t.path.clone(),
                        ..p.clone()
                    })
                    .collect())
            }
            Some(how) => {
                // Its own account, if it gave one; else how it ended and
                // what it (or a plugin) printed before.
                if how > 0
                    && let Some(msg) = &self.progress.error
                {
                    bail!("{msg}{}", self.printed_before());
                }
                let ended = if how > 0 { "exited" } else { "crashed" };
                bail!(
                    "{culprit}: the plugin {ended} ({}){}",
                    describe_exit(how),
                    self.printed_before()
                )
            }
        }
    }

    /// `; it printed before that:` and the last lines of [`Probe::output`],
    /// for an error message; empty if it printed nothing.
    fn printed_before(&self) -> String {
        let printed = quote(self.output());
        if printed.is_empty() {
            return String::new();
        }
        format!("; it printed before that:\n    {}", printed.join("\n    "))
    }

    /// What the child and the plugins printed (stdout and stderr, up to
    /// 64 KiB), once it has ended; empty before.
    pub fn output(&self) -> &str {
        self.stderr.as_deref().unwrap_or_default()
    }
}

/// The end of a probe's output that is kept (stdout and stderr).
const OUTPUT_KEPT: usize = 64 << 10;
/// The most of a probe's output that is read at all.
const OUTPUT_READ_MAX: usize = 64 << 20;

/// Most lines of a plugin's output quoted in a message.
const QUOTED_LINES: usize = 20;

/// The last [`QUOTED_LINES`] non-blank lines of `output`, each one line of
/// at most 300 characters, after a note of how many came before.
pub fn quote(output: &str) -> Vec<String> {
    let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
    let skip = lines.len().saturating_sub(QUOTED_LINES);
    let mut out = Vec::new();
    if skip > 0 {
        out.push(format!("({skip} earlier lines not shown)"));
    }
    for line in &lines[skip..] {
        let line = halfsync_config::one_line(line.trim_end());
        out.push(match line.char_indices().nth(300) {
            Some((cut, _)) => format!("{}...", &line[..cut]),
            None => line,
        });
    }
    out
}

impl Drop for Probe {
    /// A probe given up on (a stop during a reload) is killed; its parent
    /// reaps it (the master with `waitpid(-1)`; [`probe`] already has).
    fn drop(&mut self) {
        if self.ended.is_none() && self.reaped.is_none() {
            crate::master::sys::kill_group(self.pid());
            let _ = self.child.try_wait();
        }
    }
}

/// How long a step of the probe may take. Each step has its own
/// deadline, from when the child announces it: a group's `init` and
/// `fini` its `init_timeout`, loading its file that or LOAD_TIMEOUT if
/// longer (a worker allows its whole load and init `init_timeout`),
/// exiting after the last plugin LOAD_TIMEOUT. (One deadline for the
/// whole probe would fail valid configs whose inits together take longer
/// than any one timeout.)
fn step_limit(timeouts: &[(String, Duration)], step: &str, group: &str) -> Duration {
    let timeout = timeouts.iter().find(|(g, _)| g == group).map(|(_, t)| *t);
    match (step, timeout) {
        ("init" | "fini", Some(t)) => t,
        ("load", Some(t)) => t.max(LOAD_TIMEOUT),
        _ => LOAD_TIMEOUT,
    }
}

/// What the probe child has announced so far, and the deadline of the
/// step it is in.
struct Progress {
    probed: Vec<Probed>,
    /// (step, group) under way; `None` between groups and at the end.
    current: Option<(String, String)>,
    /// Lines logged since the last group was done.
    log: Vec<String>,
    /// The child's own account of why it failed.
    error: Option<String>,
    limit: Duration,
    deadline: Instant,
}

impl Progress {
    /// Takes one line of the child's stdout; `step_limit(step, group)` is
    /// how long a step may take.
    fn take(&mut self, line: &str, step_limit: &dyn Fn(&str, &str) -> Duration) {
        let f: Vec<&str> = line.split('\t').collect();
        match f.as_slice() {
            ["step", step, group] => {
                self.start(step_limit(step, group));
                self.current = Some((step.to_string(), group.to_string()));
            }
            ["log", level, message] => self.log.push(format!("{level} {message}")),
            ["error", message] => self.error = Some(message.to_string()),
            ["ok", group, name, version] => {
                self.probed.push(Probed {
                    group: group.to_string(),
                    // The parent knows the path (`Probe::verdict`).
                    path: PathBuf::new(),
                    name: name.to_string(),
                    version: version.to_string(),
                    log: std::mem::take(&mut self.log),
                });
                // Done with that group; what follows is the next step, or
                // the probe exiting.
                self.start(LOAD_TIMEOUT);
                self.current = None;
            }
            _ => {}
        }
    }

    fn start(&mut self, limit: Duration) {
        self.limit = limit;
        self.deadline = Instant::now() + limit;
    }
}

/// In the probe child of `check`: every event at warning level or above
/// (a plugin's `host.warn` and `host.error` among them) goes to the parent
/// as a `log` line on stdout, attributed to the step under way.
struct ToParent;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for ToParent {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let level = *event.metadata().level();
        // More verbose levels compare greater.
        if level > tracing::Level::WARN {
            return;
        }
        let mut message = String::new();
        event.record(
            &mut |field: &tracing::field::Field, value: &dyn std::fmt::Debug| {
                if field.name() == "message" {
                    message = format!("{value:?}");
                }
            },
        );
        // One line, and no tab to split on.
        let message = halfsync_config::one_line(&message);
        say(&format!("log\t{level}\t{message}"));
    }
}

/// Where the probe child reports to its parent: its original stdout,
/// which plugins can no longer write to (see `sys::private_stdout`).
static REPORT: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();

/// One line to the parent (a single write, so lines never interleave).
fn say(line: &str) {
    use std::io::Write;
    if let Some(mut f) = REPORT.get() {
        let _ = f.write_all(format!("{line}\n").as_bytes());
    }
}

/// The probe child: loads (and maybe initialises) each plugin in turn,
/// reporting each step, its errors and (for `check`) what the plugins log
/// as tab-separated lines; every field from outside is one-lined.
pub fn child_main() -> std::process::ExitCode {
    use halfsync_config::one_line;
    use std::process::ExitCode;
    // It started with SIGUSR1 and SIGUSR2 blocked (see
    // `sys::die_with_parent`); the plugins it loads get the usual mask.
    crate::master::sys::unblock_user_signals();
    match crate::master::sys::private_stdout() {
        Ok(f) => {
            let _ = REPORT.set(f);
        }
        Err(e) => {
            eprintln!("plugin probe: cannot set up its report: {e}");
            return ExitCode::FAILURE;
        }
    }
    let fail = |msg: String| {
        say(&format!("error\t{}", one_line(&msg)));
        ExitCode::FAILURE
    };
    let spec: Spec = match halfsync_shm::sys::env_text(SPEC_ENV)
        .and_then(|t| toml::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => return fail(format!("plugin probe: bad spec: {e}")),
    };
    if spec.init {
        use tracing_subscriber::layer::SubscriberExt;
        let _ =
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(ToParent));
    } else {
        crate::logging::init_from_env();
    }
    // The plugin files' descriptors, inherited with FD_CLOEXEC cleared: not
    // passed on to processes a plugin starts (any group's, in its init).
    let fds: Vec<Option<i32>> = spec
        .plugins
        .iter()
        .map(|t| {
            t.fd.filter(|&fd| halfsync_shm::sys::set_cloexec(fd).is_ok())
        })
        .collect();
    for (t, &fd) in spec.plugins.iter().zip(&fds) {
        let group = one_line(&t.group);
        say(&format!("step\tload\t{group}"));
        let loaded = match fd {
            Some(fd) => halfsync_worker::Plugin::load_open(&t.path, fd),
            None => halfsync_worker::Plugin::load(&t.path),
        };
        let plugin = match loaded {
            Ok(p) => p,
            Err(e) => return fail(format!("group {}: {e}", t.group)),
        };
        if spec.init {
            say(&format!("step\tinit\t{group}"));
            match plugin.init_as(&t.config, &t.group, halfsync_worker::NOT_A_WORKER) {
                Ok(instance) => {
                    say(&format!("step\tfini\t{group}"));
                    instance.fini();
                }
                Err(e) => return fail(format!("group {}: {e}", t.group)),
            }
        }
        say(&format!(
            "ok\t{group}\t{}\t{}",
            one_line(plugin.name()),
            one_line(plugin.version())
        ));
    }
    ExitCode::SUCCESS
}
