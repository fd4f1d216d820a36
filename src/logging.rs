//! Logging for every halfsync process: `tracing` events to stderr, or
//! appended to `server.log_file`, as text or JSON lines. SIGUSR1 reopens
//! the file (for logrotate): the master reopens its own and forwards the
//! signal to its children, which reopen theirs on a small thread.
//!
//! Children learn the file and format from the environment the master
//! gives them ([`child_env`]), not from the config file.

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use halfsync_config::LogFormat;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

const FILE_ENV: &str = "HALFSYNC_LOG_FILE";
const FORMAT_ENV: &str = "HALFSYNC_LOG_FORMAT";
/// A worker's copy of the master's stderr, for its own log lines: its fd
/// 2 is a pipe the master reads (see `master::Captured`).
pub const FD_ENV: &str = "HALFSYNC_LOG_FD";

/// Where log lines go: the file (and its path, to reopen it), or stderr.
/// A path without a file is a log file that could not be opened (lines go
/// to stderr meanwhile, and SIGUSR1 tries again).
static TARGET: Mutex<Option<(PathBuf, Option<File>)>> = Mutex::new(None);

/// Instead of stderr, when the master passed its own ([`FD_ENV`]).
static STDERR: std::sync::OnceLock<File> = std::sync::OnceLock::new();

/// Opens (creating 0644, as nginx does, whatever the umask lets through
/// beyond that) the log file for appending.
fn open(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .open(path)
}

/// Writes each formatted event to the current target, whole.
struct Target;

struct Line;

impl Write for Line {
    /// Never fails: a line that cannot be written (stderr a pipe whose
    /// reader is gone, a full disk) is dropped. Reporting the error would
    /// make tracing print a complaint to that same stderr with
    /// `eprintln!`, which panics when it fails, so a closed stderr
    /// (`halfsync run | head`) killed the server.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut target = TARGET.lock().unwrap_or_else(|p| p.into_inner());
        let _ = match (target.as_mut(), STDERR.get()) {
            (Some((_, Some(file))), _) => file.write_all(buf),
            (_, Some(mut stderr)) => stderr.write_all(buf),
            (_, None) => io::stderr().write_all(buf),
        };
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Target {
    type Writer = Line;
    fn make_writer(&'a self) -> Line {
        Line
    }
}

/// Installs the process's logger. `HALFSYNC_LOG` sets the level filter
/// (default `info`).
pub fn init(file: Option<&Path>, format: LogFormat) -> io::Result<()> {
    init_with(file, format, false)
}

/// [`init`]; `plain`: no colours even on a terminal (a child logging to
/// stderr only until its log file can be opened, whose lines would then
/// carry escape codes into the file).
fn init_with(file: Option<&Path>, format: LogFormat, plain: bool) -> io::Result<()> {
    let to_terminal = match file {
        Some(path) => {
            let f = open(path)?;
            *TARGET.lock().unwrap_or_else(|p| p.into_inner()) = Some((path.to_path_buf(), Some(f)));
            false
        }
        None => match STDERR.get() {
            Some(f) => f.is_terminal(),
            None => io::stderr().is_terminal(),
        },
    } && !plain;
    let (filter, _) = level_filter(std::env::var("HALFSYNC_LOG").ok().as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Target)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(to_terminal).try_init(),
        // One flat object per line: `timestamp`, `level`, `message` and
        // the event's fields at the top; `span` is the process's role with
        // its own fields (`worker`: group, worker, pid; `proxy`: proxy).
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    Ok(())
}

/// Warns if `HALFSYNC_LOG` was not understood (and [`init`] fell back to
/// `info`). The master (and `check`) calls it once; its children, which
/// inherit the same value, do not.
pub fn warn_if_level_ignored() {
    if let (_, Some(bad)) = level_filter(std::env::var("HALFSYNC_LOG").ok().as_deref()) {
        tracing::warn!("{bad}");
    }
}

/// The level names `HALFSYNC_LOG` takes, alone or after `target=`.
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// The filter `HALFSYNC_LOG` asks for: a level (`debug`), or
/// comma-separated `target=level` directives after an optional level
/// (`info,plugin=debug`). Anything else (`inf`, which tracing would take
/// for a target and so log nothing at all) gives `info` and the message
/// to warn with.
fn level_filter(value: Option<&str>) -> (EnvFilter, Option<String>) {
    let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return (EnvFilter::new("info"), None);
    };
    let bare_word_not_a_level = value.split(',').map(str::trim).find(|d| {
        !d.is_empty() && !d.contains('=') && !LEVELS.contains(&d.to_ascii_lowercase().as_str())
    });
    let problem = match bare_word_not_a_level {
        Some(word) => Some(format!("`{word}` is not a level")),
        None => EnvFilter::try_new(value).err().map(|e| e.to_string()),
    };
    match problem {
        None => (EnvFilter::new(value), None),
        Some(why) => (
            EnvFilter::new("info"),
            Some(format!(
                "HALFSYNC_LOG={value:?} ignored ({why}); logging at info. Give one of \
                 {} (or directives like `info,plugin=debug`)",
                LEVELS.join(", ")
            )),
        ),
    }
}

/// Installs a child's logger from the environment its master set.
pub fn init_from_env() {
    if let Some(f) = std::env::var(FD_ENV)
        .ok()
        .and_then(|n| n.parse().ok())
        .and_then(crate::master::sys::inherited_fd)
    {
        let _ = STDERR.set(f);
    }
    let file = std::env::var_os(FILE_ENV).map(PathBuf::from);
    let format = match std::env::var(FORMAT_ENV).as_deref() {
        Ok("json") => LogFormat::Json,
        _ => LogFormat::Text,
    };
    if let Err(e) = init(file.as_deref(), format) {
        // Fall back to stderr rather than losing the process's logs, and
        // keep the path: the next SIGUSR1 (the operator fixed the file)
        // tries again, as it does in the other processes.
        let _ = init_with(None, format, true);
        *TARGET.lock().unwrap_or_else(|p| p.into_inner()) = file.map(|f| (f, None));
        tracing::error!("cannot open log file: {e}; logging to stderr until it can be (SIGUSR1)");
    }
}

/// The environment a child needs to log like the master.
pub fn child_env(file: Option<&Path>, format: LogFormat) -> Vec<(&'static str, String)> {
    let mut env = Vec::new();
    if let Some(f) = file {
        env.push((FILE_ENV, f.display().to_string()));
    }
    if format == LogFormat::Json {
        env.push((FORMAT_ENV, "json".to_owned()));
    }
    env
}

/// Reopens the log file (after logrotate moved it away). Logging to stderr:
/// nothing to do.
pub fn reopen() -> io::Result<()> {
    let mut target = TARGET.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((path, file)) = target.as_mut() {
        *file = Some(open(path)?);
    }
    Ok(())
}

/// In a child: reopen the log file whenever SIGUSR1 arrives, on a thread
/// of its own (the child's main loop never blocks on it). SIGUSR2, which
/// the master ignores, is caught and ignored too: a stray `kill -USR2` to
/// the process tree must not kill a proxy or a worker (by their default
/// disposition). Caught, not `SIG_IGN`, which would pass to processes a
/// plugin starts.
pub fn reopen_on_sigusr1() {
    let _ = signal_hook::flag::register(signal_hook::consts::SIGUSR2, Default::default());
    if TARGET.lock().map(|t| t.is_none()).unwrap_or(true) {
        // Not logging to a file; SIGUSR1 is still caught so it cannot kill us.
        let _ = signal_hook::flag::register(signal_hook::consts::SIGUSR1, Default::default());
        return;
    }
    let Ok(mut signals) = signal_hook::iterator::Signals::new([signal_hook::consts::SIGUSR1])
    else {
        return;
    };
    let _ = std::thread::Builder::new()
        .name("log-reopen".into())
        .spawn(move || {
            for _ in signals.forever() {
                if let Err(e) = reopen() {
                    tracing::error!("cannot reopen the log file: {e}");
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::level_filter;

    #[test]
    fn a_mistyped_level_falls_back_to_info_and_says_so() {
        for good in [
            None,
            Some(""),
            Some("debug"),
            Some("WARN"),
            Some("info,plugin=debug"),
            Some("off"),
        ] {
            let (_, bad) = level_filter(good);
            assert_eq!(bad, None, "{good:?}");
        }
        for typo in ["inf", "debgu", "info,verbose", "plugin=inf"] {
            let (filter, bad) = level_filter(Some(typo));
            let bad = bad.unwrap_or_else(|| panic!("{typo} accepted"));
            assert!(
                bad.starts_with(&format!("HALFSYNC_LOG={typo:?} ignored (")),
                "{bad}"
            );
            assert!(bad.contains("logging at info"), "{bad}");
            assert_eq!(filter.to_string(), "info");
        }
    }
}
