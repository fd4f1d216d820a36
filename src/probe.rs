//! Test-loading plugins in a throwaway child process, so neither the
//! master nor the CLI ever runs plugin code (not even a library
//! constructor), and a plugin that crashes or hangs while being checked
//! costs only that child.
//!
//! `halfsync run` probes with `init: false` (load and check the ABI);
//! `halfsync check` with `init: true` (also call `init` with the group's
//! config, then `fini`), like `nginx -t`.

use std::io::Read;
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
    let limit = config
        .groups
        .iter()
        .map(|g| g.init_timeout)
        .max()
        .unwrap_or_default()
        .max(Duration::from_secs(5));
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
    let mut out = child.stdout.take().context("probe stdout")?;
    let mut err = child.stderr.take().context("probe stderr")?;
    let reader = std::thread::spawn(move || {
        let (mut o, mut e) = (String::new(), String::new());
        let _ = out.read_to_string(&mut o);
        let _ = err.read_to_string(&mut e);
        (o, e)
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().context("waiting for the plugin probe")? {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let (stdout, stderr) = reader.join().unwrap_or_default();
    // The child announces each step on stdout before taking it.
    let mut probed = Vec::new();
    let mut current = None;
    for line in stdout.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        match f.as_slice() {
            ["step", step, group] => current = Some((step.to_string(), group.to_string())),
            ["ok", group, name, version, path] => probed.push(Probed {
                group: group.to_string(),
                path: PathBuf::from(path),
                name: name.to_string(),
                version: version.to_string(),
            }),
            _ => {}
        }
    }
    let culprit = |current: &Option<(String, String)>| {
        current.as_ref().map_or_else(
            || "plugin probe".to_owned(),
            |(step, group)| {
                let path = spec
                    .plugins
                    .iter()
                    .find(|t| &t.group == group)
                    .map(|t| t.path.display().to_string());
                format!(
                    "group {group}: plugin {} ({step})",
                    path.unwrap_or_default()
                )
            },
        )
    };
    match status {
        None => bail!(
            "{}: did not finish within {} s (init_timeout)",
            culprit(&current),
            limit.as_secs()
        ),
        Some(st) if st.success() => Ok(probed),
        Some(st) => {
            let first = stderr.lines().map(str::trim).find(|l| !l.is_empty());
            match (st.signal(), first) {
                (None, Some(msg)) => bail!("{msg}"),
                (sig, _) => bail!(
                    "{}: the plugin crashed ({})",
                    culprit(&current),
                    describe_exit(sig.map_or(st.code().unwrap_or(1), |s| -s))
                ),
            }
        }
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
