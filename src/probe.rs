//! Test-loading plugins in a throwaway child process, so neither the
//! master nor the CLI ever runs plugin code (not even a library
//! constructor), and a plugin that crashes or hangs while being checked
//! costs only that child.
//!
//! `halfsync run` probes with `init: false` (load and check the ABI);
//! `halfsync check` with `init: true` (also call `init` with the group's
//! config, then `fini`), like `nginx -t`.

use std::io::{BufRead, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use halfsync_config::Config;
use halfsync_proxy::control::describe_exit;
use serde::{Deserialize, Serialize};

use crate::master::ROLE_ENV;

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
    config: String,
}

/// What the probe found out about one group's plugin.
pub struct Probed {
    /// Group name.
    pub group: String,
    /// Plugin file.
    pub path: PathBuf,
    /// The plugin's name and version, from its table.
    pub name: String,
    /// Its version string.
    pub version: String,
}

/// Loads (and with `init`, initialises) every group's plugin in a child
/// process. The error is one line naming the group, the file and the cause.
pub fn probe(exe: &Path, config: &Config, init: bool) -> Result<Vec<Probed>> {
    let exe_dir = exe.parent().unwrap_or(Path::new("."));
    let spec = Spec {
        init,
        plugins: config
            .groups
            .iter()
            .map(|g| Target {
                group: g.name.clone(),
                path: config.plugin_path(g, exe_dir),
                config: g.plugin_config_toml(),
            })
            .collect(),
    };
    // Each step has its own deadline, from when the child announces it:
    // a group's `init` and `fini` its `init_timeout`, loading its file
    // that or LOAD_TIMEOUT if longer (a worker allows its whole load and
    // init `init_timeout`), exiting after the last plugin LOAD_TIMEOUT.
    // (One deadline for the whole probe would fail valid configs whose
    // inits together take longer than any one timeout.)
    let step_limit = |step: &str, group: &str| {
        let timeout = config
            .groups
            .iter()
            .find(|g| g.name == group)
            .map(|g| g.init_timeout);
        match (step, timeout) {
            ("init" | "fini", Some(t)) => t,
            ("load", Some(t)) => t.max(LOAD_TIMEOUT),
            _ => LOAD_TIMEOUT,
        }
    };
    let mut child = Command::new(exe)
        .arg0("halfsync: plugin probe")
        .env(ROLE_ENV, "probe")
        .env(SPEC_ENV, toml::to_string(&spec).context("probe spec")?)
        .env("HALFSYNC_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the plugin probe")?;
    // Read on threads that are never joined: a plugin may have started a
    // process that inherited the pipes and keeps them open after the
    // probe exits; the output up to then is collected with a deadline.
    let out = child.stdout.take().context("probe stdout")?;
    let mut err = child.stderr.take().context("probe stderr")?;
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let (etx, errors) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut e = Vec::new();
        let _ = (&mut err).take(64 << 10).read_to_end(&mut e);
        let _ = etx.send(String::from_utf8_lossy(&e).into_owned());
    });
    // The child announces each step on stdout before taking it.
    let mut progress = Progress {
        probed: Vec::new(),
        current: None,
        limit: LOAD_TIMEOUT,
        deadline: Instant::now() + LOAD_TIMEOUT,
    };
    let status = loop {
        while let Ok(line) = lines.try_recv() {
            progress.take(&line, &step_limit);
        }
        if let Some(st) = child.try_wait().context("waiting for the plugin probe")? {
            break Some(st);
        }
        if Instant::now() >= progress.deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let collect_until = Instant::now() + Duration::from_millis(500);
    let left = || collect_until.saturating_duration_since(Instant::now());
    while let Ok(line) = lines.recv_timeout(left()) {
        progress.take(&line, &step_limit);
    }
    let stderr = errors.recv_timeout(left()).unwrap_or_default();
    let Progress {
        probed,
        current,
        limit,
        ..
    } = progress;
    let culprit = match &current {
        Some((step, group)) => {
            let path = spec
                .plugins
                .iter()
                .find(|t| &t.group == group)
                .map(|t| t.path.display().to_string());
            format!(
                "group {group}: plugin {} ({step})",
                path.unwrap_or_default()
            )
        }
        None if probed.len() == spec.plugins.len() => "plugin probe, exiting after the last \
             plugin (a plugin's destructors or atexit handlers)"
            .to_owned(),
        None => "plugin probe".to_owned(),
    };
    match status {
        None => match current.as_ref().map(|(step, _)| step.as_str()) {
            Some("init" | "fini") => bail!(
                "{culprit}: did not finish within {} ms (the group's init_timeout)",
                limit.as_millis()
            ),
            _ => bail!(
                "{culprit}: did not finish loading within {} s",
                limit.as_secs()
            ),
        },
        Some(st) if st.success() => Ok(probed),
        Some(st) => {
            let first = stderr.lines().map(str::trim).find(|l| !l.is_empty());
            match (st.signal(), first) {
                (None, Some(msg)) => bail!("{msg}"),
                (sig, _) => bail!(
                    "{culprit}: the plugin crashed ({})",
                    describe_exit(sig.map_or(st.code().unwrap_or(1), |s| -s))
                ),
            }
        }
    }
}

/// What the probe child has announced so far, and the deadline of the
/// step it is in.
struct Progress {
    probed: Vec<Probed>,
    /// (step, group) under way; `None` between groups and at the end.
    current: Option<(String, String)>,
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
            ["ok", group, name, version, path] => {
                self.probed.push(Probed {
                    group: group.to_string(),
                    path: PathBuf::from(path),
                    name: name.to_string(),
                    version: version.to_string(),
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

/// The probe child: loads (and maybe initialises) each plugin in turn.
pub fn child_main() -> std::process::ExitCode {
    use std::process::ExitCode;
    let spec: Spec = match std::env::var(SPEC_ENV)
        .map_err(|e| e.to_string())
        .and_then(|t| toml::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("plugin probe: bad spec: {e}");
            return ExitCode::FAILURE;
        }
    };
    for t in &spec.plugins {
        println!("step\tload\t{}", t.group);
        let plugin = match halfsync_worker::Plugin::load(&t.path) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("group {}: {e}", t.group);
                return ExitCode::FAILURE;
            }
        };
        if spec.init {
            println!("step\tinit\t{}", t.group);
            match plugin.init(&t.config) {
                Ok(instance) => {
                    println!("step\tfini\t{}", t.group);
                    instance.fini();
                }
                Err(e) => {
                    eprintln!("group {}: {e}", t.group);
                    return ExitCode::FAILURE;
                }
            }
        }
        println!(
            "ok\t{}\t{}\t{}\t{}",
            t.group,
            plugin.name(),
            plugin.version(),
            t.path.display()
        );
    }
    ExitCode::SUCCESS
}
