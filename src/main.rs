//! `halfsync`: the command-line interface and the entry point of every
//! halfsync process. The master re-executes this binary for its children;
//! `HALFSYNC_ROLE` in the environment says which role a process plays.

mod master;
mod probe;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use halfsync_config::Config;
use tracing::error;

#[derive(Parser)]
#[command(
    name = "halfsync",
    version,
    about = "Half-sync/half-async plugin application server"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server in the foreground (the embedded default config
    /// without --config: 127.0.0.1:7878, 2 workers of the echo plugin).
    Run {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration and test-load its plugins, then exit.
    Check {
        /// Configuration file (TOML); the embedded default without it.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let role = std::env::var(master::ROLE_ENV).unwrap_or_default();
    init_logging(&role);
    match role.as_str() {
        "proxy" => return run_proxy(),
        "worker" => return run_worker(),
        "probe" => return run_probe(),
        _ => {}
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run { config } => run(config.as_deref()),
        Cmd::Check { config } => check(config.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, joined.
            eprintln!("halfsync: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(role: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("HALFSYNC_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
    let _ = role;
}

fn load_config(path: Option<&Path>) -> Result<Config> {
    match path {
        Some(p) => Ok(Config::from_file(p)?),
        None => Ok(Config::embedded_default()),
    }
}

fn exe_path() -> Result<PathBuf> {
    std::env::current_exe().context("cannot find the halfsync executable")
}

fn run(path: Option<&Path>) -> Result<()> {
    let config = load_config(path)?;
    master::set_thread_name("halfsync-master");
    retitle_master();
    master::run(config, exe_path()?)
}

/// Re-executes the master once with `argv[0] = "halfsync: master"`, so `ps`
/// names its role like nginx's `nginx: master process`. The pid stays the
/// same. If the exec fails the master simply keeps its original title.
fn retitle_master() {
    use std::os::unix::process::CommandExt;
    const TITLE: &str = "halfsync: master";
    if std::env::args_os().next().is_some_and(|a| a == TITLE) {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let err = std::process::Command::new(exe)
        .arg0(TITLE)
        .args(std::env::args_os().skip(1))
        .exec();
    tracing::debug!("could not retitle the master: {err}");
}

fn check(path: Option<&Path>) -> Result<()> {
    let config = load_config(path)?;
    for p in probe::probe(&exe_path()?, &config, true)? {
        println!(
            "group {}: plugin {} {} ({}): loaded and initialised",
            p.group,
            p.name,
            p.version,
            p.path.display()
        );
    }
    println!("halfsync: configuration {} is ok", config.origin);
    Ok(())
}

fn run_proxy() -> ExitCode {
    master::set_thread_name("halfsync-proxy");
    let _span = tracing::info_span!("proxy").entered();
    let result = halfsync_proxy::ProxySpec::from_env().and_then(halfsync_proxy::run);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run_worker() -> ExitCode {
    let spec = match halfsync_worker::WorkerSpec::from_env() {
        Ok(s) => s,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    master::set_thread_name(&format!("hs-{}-{}", spec.group, spec.index));
    let _span = tracing::info_span!("worker", group = %spec.group, n = spec.index, pid = std::process::id()).entered();
    ExitCode::from(halfsync_worker::run(spec).clamp(0, 255) as u8)
}

fn run_probe() -> ExitCode {
    probe::child_main()
}
