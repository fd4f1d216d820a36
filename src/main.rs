//! `halfsync`: the command-line interface and the entry point of every
//! halfsync process. The master re-executes this binary for its children;
//! `HALFSYNC_ROLE` in the environment says which role a process plays.

mod ctl;
mod exe;
mod logging;
mod master;
mod plugin_file;
mod probe;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use halfsync_config::{Config, LogFormat};
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

/// How an operator command finds the running server.
#[derive(Args)]
struct Target {
    /// The server's configuration file (its admin socket is read from it);
    /// the embedded default without it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The admin socket, instead of reading it from the configuration.
    #[arg(long)]
    socket: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server in the foreground (the embedded default config
    /// without --config: 127.0.0.1:7878, 2 workers of the echo plugin).
    Run {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Benchmark baseline: run each group's plugin inside the proxy's
        /// event loop, with no workers and no isolation (a crash takes the
        /// proxy down). Measures what isolation costs; never for production.
        #[arg(long)]
        inline: bool,
    },
    /// Validate a configuration, load each plugin and run its init and
    /// fini in a throwaway process, then exit (like `nginx -t`).
    Check {
        /// Configuration file (TOML); the embedded default without it.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Show every group and worker of a running server.
    Status {
        #[command(flatten)]
        target: Target,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-read the configuration and replace every worker, one at a time,
    /// without failing a request (also: SIGHUP to the master). Waits for
    /// the outcome; exits 1 if the reload was refused or rolled back.
    Reload {
        #[command(flatten)]
        target: Target,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Stop the server: finish in-flight requests, then exit (also:
    /// SIGTERM, SIGINT or SIGQUIT to the master). Returns once it exited.
    Stop {
        #[command(flatten)]
        target: Target,
        /// Kill everything at once instead of draining.
        #[arg(long)]
        fast: bool,
        /// Give up waiting for the server to exit after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Set the number of workers of a group.
    Scale {
        #[command(flatten)]
        target: Target,
        /// The group's name.
        group: String,
        /// The new number of workers (1 to 256, and at least
        /// `server.proxy_processes`). Until the next reload, which goes
        /// back to the configuration file's `workers`.
        workers: u32,
    },
}

fn main() -> ExitCode {
    let role = std::env::var(master::ROLE_ENV).unwrap_or_default();
    if !role.is_empty() {
        // Not passed on: a process a plugin starts that runs `halfsync
        // status` must get the command line, not a worker's role.
        // SAFETY: the first thing main does; no other thread exists yet
        // to read the environment meanwhile.
        unsafe { std::env::remove_var(master::ROLE_ENV) };
    }
    match role.as_str() {
        "proxy" => return run_proxy(),
        "worker" => return run_worker(),
        "probe" => return run_probe(),
        _ => {}
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run { config, inline } => run(config.as_deref(), inline),
        Cmd::Check { config } => check(config.as_deref()),
        Cmd::Status { target, json } => {
            server_of(&target, false, false).and_then(|s| ctl::status(&s, json))
        }
        Cmd::Reload { target, timeout } => server_of(&target, true, true)
            .and_then(|s| ctl::simple(&s, r#"{"cmd":"reload"}"#, Duration::from_secs(timeout))),
        Cmd::Stop {
            target,
            fast,
            timeout,
        } => server_of(&target, true, false).and_then(|s| {
            let line = serde_json::json!({"cmd": "stop", "fast": fast}).to_string();
            ctl::stop(&s, &line, Duration::from_secs(timeout))
        }),
        Cmd::Scale {
            target,
            group,
            workers,
        } => server_of(&target, true, false).and_then(|s| {
            let line =
                serde_json::json!({"cmd": "scale", "group": group, "workers": workers}).to_string();
            ctl::simple(&s, &line, Duration::from_secs(10))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, joined. (Not eprintln!,
            // which panics if stderr is gone.)
            let _ = writeln!(std::io::stderr(), "halfsync: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The admin socket of the server a command is for, checked against the
/// configuration the operator named: two configs can name one socket (the
/// default is named after the first listen port only, so `127.0.0.1:8000`
/// and `127.0.0.2:8000` share it), and a command must not stop, reload or
/// scale a server that runs another file. A command that `acts` refuses
/// then (saying how to address that server anyway); `status` only notes
/// it. With `--socket` the operator chose the server: a note at most
/// (none without `--config`). `reloads`: the note says which file a
/// reload re-reads.
fn server_of(t: &Target, acts: bool, reloads: bool) -> Result<PathBuf> {
    let sock = socket(t)?;
    if t.socket.is_some() && t.config.is_none() {
        return Ok(sock);
    }
    let wanted = match &t.config {
        Some(p) => Some(std::path::absolute(p).with_context(|| format!("{}", p.display()))?),
        None => None,
    };
    let Some(runs) = ctl::config_of(&sock)? else {
        // Nothing listens: the command itself says so.
        return Ok(sock);
    };
    let same = match (&runs, &wanted) {
        (Some(a), Some(b)) => ctl::same_config(a, b),
        (None, None) => true,
        _ => false,
    };
    if same {
        return Ok(sock);
    }
    let name = |c: &Option<PathBuf>| match c {
        Some(p) => p.display().to_string(),
        None => "the embedded default config".to_owned(),
    };
    let what = format!(
        "the server on {} runs {}, not {}",
        sock.display(),
        name(&runs),
        name(&wanted)
    );
    if t.socket.is_some() || !acts {
        let reload = if reloads {
            match &runs {
                Some(p) => format!("; a reload re-reads {}", p.display()),
                None => "; a reload keeps the default".to_owned(),
            }
        } else {
            String::new()
        };
        eprintln!("halfsync: note: {what}{reload}");
        return Ok(sock);
    }
    let config = match &runs {
        Some(p) => format!("--config {}", p.display()),
        None => "no --config".to_owned(),
    };
    bail!(
        "{what}, so nothing was done (two configurations name the same admin socket: give each \
         its own admin_socket, or its own first listen port); to address that server anyway: \
         {config}, or --socket {}",
        sock.display()
    )
}

/// The admin socket of the server an operator command targets. Only
/// `server.admin_socket` and `server.listen` are read from the file, and
/// leniently: an operator must be able to stop or inspect a server while
/// its config file has a mistake in some other key.
///
/// The default socket is named after the first listen port, but a running
/// server keeps the socket it started with until it restarts, so after the
/// file's first port was changed (a reload applies the new listeners) the
/// name no longer finds it. Then the server running this very file is
/// looked for among the default sockets (`/tmp/halfsync-*.sock`, by the
/// config path each one's status reports).
fn socket(t: &Target) -> Result<PathBuf> {
    let (sock, derived) = socket_named(t)?;
    if derived && std::os::unix::net::UnixStream::connect(&sock).is_err() {
        let config = t
            .config
            .as_deref()
            .and_then(|p| std::path::absolute(p).ok());
        if let Some(found) = config.and_then(|c| ctl::find_server_running(&c)) {
            eprintln!(
                "halfsync: the server running this file is on {} (its first listen address \
                 changed since it started; the socket follows at its next restart)",
                found.display()
            );
            return Ok(found);
        }
    }
    // Nothing there, and the file has a mistake (a mistyped
    // `admin_socket` is an unknown key, and the default socket is looked
    // for instead): say so beside the command's own error.
    if let Some(path) = t.config.as_deref()
        && let Err(e) = load_config(Some(path))
        && std::os::unix::net::UnixStream::connect(&sock).is_err()
    {
        let _ = writeln!(
            std::io::stderr(),
            "halfsync: note: {e:#} (the admin socket was looked for at {}, from what of the \
             file could be read)",
            sock.display()
        );
    }
    Ok(sock)
}

/// The socket `t` names, and whether the name came from the first listen
/// port (the default), not from `--socket` or `admin_socket`.
fn socket_named(t: &Target) -> Result<(PathBuf, bool)> {
    if let Some(s) = &t.socket {
        return Ok((s.clone(), false));
    }
    let Some(path) = &t.config else {
        return Ok((Config::embedded_default().admin_socket(), false));
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let server = match text.parse::<toml::Table>() {
        Ok(mut table) => table.remove("server").and_then(|s| s.try_into().ok()),
        // A syntax error: the `[server]` section alone may still parse.
        Err(e) => match server_section(&text) {
            Some(server) => Some(server),
            None => {
                let err = load_config(Some(path))
                    .err()
                    .map_or_else(|| e.to_string(), |e| format!("{e:#}"));
                bail!(
                    "{err} (its [server] section cannot be read either; --socket names the \
                     server's admin socket without the file)"
                )
            }
        },
    };
    let server = server.as_ref();
    let explicit = match server.and_then(|s| s.get("admin_socket")) {
        None => None,
        Some(toml::Value::String(s)) => Some(s.as_str()).filter(|s| !s.is_empty()),
        Some(other) => bail!(
            "{}: server.admin_socket is {} {other}, not a path string; fix it, or name the \
             socket with --socket",
            path.display(),
            other.type_str()
        ),
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let Some(sock) = explicit {
        return Ok((dir.join(sock), false));
    }
    let port = match server.and_then(|s| s.get("listen")) {
        None => 7878,
        Some(listen) => listen
            .as_array()
            .and_then(|l| l.first())
            .and_then(|a| a.as_str())
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.port())
            .with_context(|| {
                format!(
                    "{}: server.listen does not start with an \"ip:port\" string, which names \
                     the default admin socket; fix it, or name the socket with --socket",
                    path.display()
                )
            })?,
    };
    Ok((PathBuf::from(format!("/tmp/halfsync-{port}.sock")), true))
}

/// The `[server]` table of a file that does not parse as a whole (a
/// mistake in another section): the lines from its header to the next
/// header, parsed alone.
fn server_section(text: &str) -> Option<toml::Table> {
    let mut lines = text
        .lines()
        .skip_while(|l| !l.trim().starts_with("[server]"))
        .skip(1);
    let body: Vec<&str> = lines
        .by_ref()
        .take_while(|l| !l.trim_start().starts_with('['))
        .collect();
    body.join("\n").parse::<toml::Table>().ok()
}

fn load_config(path: Option<&Path>) -> Result<Config> {
    match path {
        Some(p) => Ok(Config::from_file(p)?),
        None => Ok(Config::embedded_default()),
    }
}

fn run(path: Option<&Path>, inline: bool) -> Result<()> {
    let config = load_config(path)?;
    let log_file = config.log_file();
    logging::init(log_file.as_deref(), config.server.log_format).with_context(|| {
        format!(
            "cannot open log file {}",
            log_file.as_deref().unwrap_or(Path::new("")).display()
        )
    })?;
    master::set_thread_name("halfsync-master");
    retitle_master();
    logging::warn_if_level_ignored();
    for note in config.ignored_settings() {
        tracing::warn!("{note}");
    }
    // Reloads re-read this file even if the working directory changes.
    // Absolute, but through its symlinks: a deploy that flips a symlink
    // to a new file has the next reload read the new one.
    let path = path.map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()));
    let result = exe::Exe::current().and_then(|exe| master::run(config, path, exe, inline));
    // A log file gets the reason the server exits too (stderr gets it
    // from main either way), so its last line is not a worker's death.
    if let (Err(e), Some(_)) = (&result, &log_file) {
        tracing::error!("halfsync exits: {e:#}");
    }
    result
}

/// Re-executes the master once with `argv[0] = "halfsync: master"`, so `ps`
/// names its role like nginx's `nginx: master process`. The pid stays the
/// same. If the exec fails the master simply keeps its original title.
/// `HALFSYNC_RETITLED` marks the re-executed image, so a wrapper that does
/// not pass `argv[0]` through (valgrind, some tracers) cannot make it loop.
fn retitle_master() {
    use std::os::unix::process::CommandExt;
    const TITLE: &str = "halfsync: master";
    const MARK: &str = "HALFSYNC_RETITLED";
    if std::env::args_os().next().is_some_and(|a| a == TITLE) || std::env::var_os(MARK).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let err = std::process::Command::new(exe)
        .arg0(TITLE)
        .env(MARK, "1")
        .args(std::env::args_os().skip(1))
        .exec();
    tracing::debug!("could not retitle the master: {err}");
}

fn check(path: Option<&Path>) -> Result<()> {
    let config = load_config(path)?;
    logging::init(None, LogFormat::Text)?;
    logging::warn_if_level_ignored();
    for note in config.ignored_settings() {
        tracing::warn!("{note}");
    }
    // What `run` would refuse beyond the file itself: a log file it cannot
    // open, an admin socket in a directory that does not exist, an address
    // this machine does not have or a port this user may not use. (The log
    // file is not created here: `check` run as root would leave it root's,
    // and the server's user could not open it.)
    if let Some(log) = config.log_file() {
        if log.exists() {
            std::fs::OpenOptions::new()
                .append(true)
                .open(&log)
                .with_context(|| format!("cannot open log file {}", log.display()))?;
        } else {
            let dir = log
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            master::sys::check_writable_dir(dir).with_context(|| {
                format!(
                    "cannot create log file {}: its directory {}",
                    log.display(),
                    dir.display()
                )
            })?;
        }
    }
    let socket = config.admin_socket();
    master::check_socket_path(&socket).map_err(|e| anyhow::anyhow!(e))?;
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        anyhow::bail!(
            "cannot create admin socket {}: its directory {} does not exist (fix \
             `server.admin_socket`, or create the directory)",
            socket.display(),
            dir.display()
        );
    }
    for addr in &config.server.listen {
        master::check_address(*addr, "server.listen").map_err(|e| anyhow::anyhow!(e))?;
    }
    if let Some(addr) = config.server.metrics_listen {
        master::check_address(addr, "server.metrics_listen").map_err(|e| anyhow::anyhow!(e))?;
    }
    let exe = exe::Exe::current()?;
    let files = probe::open_plugins(&exe, &config);
    // A closed stdout (`halfsync check | head -1`) ends the report quietly;
    // the verdict is the exit code.
    let mut out = std::io::stdout().lock();
    let (probed, printed) = probe::probe_with_output(&exe, &config, &files, true)?;
    for p in probed {
        let _ = writeln!(
            out,
            "group {}: plugin {}{} ({}): loaded and initialised{}",
            p.group,
            p.name,
            if p.version.is_empty() {
                String::new()
            } else {
                format!(" {}", p.version)
            },
            p.path.display(),
            if p.log.is_empty() { "" } else { "; it logged:" }
        );
        for line in &p.log {
            let _ = writeln!(out, "    {line}");
        }
    }
    let printed = probe::quote(&printed);
    if !printed.is_empty() {
        let _ = writeln!(out, "the plugins printed (stdout and stderr):");
        for line in &printed {
            let _ = writeln!(out, "    {line}");
        }
    }
    let _ = writeln!(out, "halfsync: configuration {} is ok", config.origin);
    Ok(())
}

fn run_proxy() -> ExitCode {
    logging::init_from_env();
    logging::reopen_on_sigusr1();
    // The master stops the proxy over its channel (drain, then exit); a
    // SIGTERM sent to the whole process group (`kill -TERM -PGID`,
    // `timeout`, a container's init) reaches the proxy too, and must not
    // cut the master's graceful drain short: caught, and nothing done.
    let _ = signal_hook::flag::register(signal_hook::consts::SIGTERM, Default::default());
    master::sys::unblock_user_signals();
    master::set_thread_name("halfsync-proxy");
    let result = halfsync_proxy::ProxySpec::from_env().and_then(|spec| {
        // One proxy keeps the plain `proxy:` prefix; several are numbered.
        let _span = if spec.index == 0 && !spec.numbered {
            tracing::info_span!("proxy").entered()
        } else {
            tracing::info_span!("proxy", proxy = spec.index).entered()
        };
        halfsync_proxy::run(spec)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run_worker() -> ExitCode {
    logging::init_from_env();
    logging::reopen_on_sigusr1();
    master::sys::unblock_user_signals();
    let spec = match halfsync_worker::WorkerSpec::from_env() {
        Ok(s) => s,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    master::set_thread_name(&format!("hs-{}-{}", spec.group, spec.index));
    let _span = tracing::info_span!("worker", group = %spec.group, worker = spec.index, pid = std::process::id()).entered();
    ExitCode::from(halfsync_worker::run(spec).clamp(0, 255) as u8)
}

fn run_probe() -> ExitCode {
    // Exec'd from /proc/self/fd/N, its name would be "N" (in ps -C, the
    // kernel's segfault lines, core names).
    master::set_thread_name("halfsync-probe");
    // It sets up its own logging (see `probe::child_main`).
    probe::child_main()
}
