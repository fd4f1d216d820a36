//! Strict TOML configuration for halfsync.
//!
//! This crate reads, validates and re-serializes the configuration of a
//! halfsync server: the `[server]` table (listeners, limits, timeouts,
//! shared-memory ring size) and one `[[group]]` table per worker group (the
//! plugin to load, how many worker processes run it, which commands it
//! serves, and the plugin's own `[group.config]` table).
//!
//! Parsing is strict: unknown keys are errors everywhere except inside
//! `[group.config]`, durations and sizes carry explicit units, and values
//! are range-checked and cross-checked before a [`Config`] is returned. Every
//! [`Error`] renders as one line naming the file, the line and column where
//! known, and the key path, e.g.
//! `halfsync.toml:9:11: group[0].workers: invalid type: string "two", expected u32`.
//! No input makes this crate panic.
//!
//! The reference for every key is the commented file
//! `config/halfsync.example.toml` (also available as [`EXAMPLE_CONFIG`]);
//! the same information is on the fields of [`Server`] and [`Group`].
//!
//! A validated [`Config`] serializes back to TOML (`toml::to_string`) and
//! [`Config::from_toml`] reads that text back to an equal value, which is how
//! the master hands its configuration to child processes.
//!
//! # Example
//!
//! ```
//! use halfsync_config::{Config, Origin};
//! use std::path::Path;
//! use std::time::Duration;
//!
//! let text = r#"
//! [server]
//! listen = ["127.0.0.1:9000"]
//! idle_timeout = "30s"
//!
//! [[group]]
//! name = "echo"
//! plugin = "echo"
//! workers = 4
//! [group.config]
//! greeting = "hi"
//! "#;
//! let cfg = Config::from_toml(text, Origin::Text)?;
//! assert_eq!(cfg.server.idle_timeout, Duration::from_secs(30));
//! assert_eq!(cfg.server.ring_size, 4 << 20); // default "4MiB"
//! let echo = &cfg.groups[0];
//! assert!(echo.is_default_route());
//! assert_eq!(echo.plugin_config_toml(), "greeting = \"hi\"\n");
//! assert_eq!(
//!     cfg.plugin_path(echo, Path::new("/opt/halfsync/bin")),
//!     Path::new("/opt/halfsync/bin/libecho.so"),
//! );
//!
//! // Round trip, as done between the master and its children.
//! let again = Config::from_toml(&toml::to_string(&cfg).unwrap(), Origin::Text)?;
//! assert_eq!(again, cfg);
//!
//! // Errors are one line and point at the key.
//! let err = Config::from_toml("[[group]]\nname = \"a\"\nplugin = \"a\"\nwokers = 2\n", Origin::Text)
//!     .unwrap_err();
//! assert_eq!(
//!     err.to_string(),
//!     "<config>:4:1: group[0]: unknown field `wokers`; did you mean `workers`?",
//! );
//! # Ok::<(), halfsync_config::Error>(())
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod budget;
mod error;
mod units;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

pub use budget::{LineBudget, PLUGIN_LINES_PER_SECOND};
pub use error::{Error, Location, one_line};
pub use units::{ByteSize, HumanDuration, UnitError};

use error::line_col;

/// The embedded default configuration, used when no file is given: one
/// listener on `127.0.0.1:7878` and one group `"echo"` running the `echo`
/// plugin in 2 workers; every other key has its default value.
/// [`Config::embedded_default`] returns it already parsed.
pub const DEFAULT_CONFIG: &str = r#"# halfsync embedded default configuration
[server]
listen = ["127.0.0.1:7878"]

[[group]]
name = "echo"
plugin = "echo"
workers = 2
"#;

/// The commented reference configuration (`config/halfsync.example.toml`),
/// documenting every key with its default.
pub const EXAMPLE_CONFIG: &str = include_str!("../halfsync.example.toml");

/// The most groups a server runs, and the most it creates over its life
/// (a group removed by a reload keeps its place until the server
/// restarts): each has a fixed place in every proxy's statistics page.
pub const MAX_GROUPS: usize = 256;

/// Largest accepted `server.max_frame`: 64 MiB.
pub const MAX_FRAME_LIMIT: u32 = 64 << 20;
/// Smallest accepted `server.max_frame`: an HSP/1 header without payload
/// (8-byte id, 2-byte code, 2-byte flags).
pub const MIN_FRAME: u32 = 12;
/// Largest accepted `server.ring_size` (after rounding): 1 GiB.
pub const MAX_RING_SIZE: u64 = 1 << 30;
/// Smallest `server.ring_size`: one page (smaller values are rounded up
/// to it, as every value is rounded up to a power of two).
pub const MIN_RING_SIZE: u64 = 4096;
/// Per-record overhead assumed when checking that two largest frames fit in
/// a ring: `ring_size >= 2 * (max_frame + RING_RECORD_OVERHEAD)`.
pub const RING_RECORD_OVERHEAD: u64 = 64;

/// Where a configuration came from; used in error messages and to resolve
/// relative plugin paths.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Origin {
    /// Read from this file (the path as given). Relative plugin paths are
    /// resolved against its directory.
    File(PathBuf),
    /// The built-in [`DEFAULT_CONFIG`]. Shown as `<embedded config>`.
    Embedded,
    /// Text from elsewhere (a pipe, an environment variable, a test).
    /// Shown as `<config>`; relative plugin paths are resolved against the
    /// current directory.
    #[default]
    Text,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => f.write_str(&one_line(&path.display().to_string())),
            Origin::Embedded => f.write_str("<embedded config>"),
            Origin::Text => f.write_str("<config>"),
        }
    }
}

/// A validated halfsync configuration.
///
/// Serializes to the TOML format it is read from (without `origin`), so
/// `Config::from_toml(&toml::to_string(&cfg)?, cfg.origin.clone())` gives
/// back an equal value. There is deliberately no `Deserialize` impl: use
/// [`Config::from_toml`] or [`Config::from_file`], which also validate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// The `[server]` table (optional in the file; every key has a default).
    pub server: Server,
    /// The `[[group]]` tables, in file order; at least one.
    #[serde(rename = "group")]
    pub groups: Vec<Group>,
    /// Where the configuration came from. Not serialized.
    #[serde(skip)]
    pub origin: Origin,
}

/// The `[server]` table: listeners and proxy-wide limits.
///
/// `Deserialize` checks each key on its own (types, ranges, units; rounds
/// `ring_size` up to a power of two); cross-key checks happen in
/// [`Config::from_toml`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Server {
    /// `listen`: addresses to listen on, `"ip:port"` strings (IPv6 as
    /// `"[::1]:7878"`). At least one, no duplicates. Default
    /// `["127.0.0.1:7878"]`.
    #[serde(deserialize_with = "de_listen")]
    pub listen: Vec<SocketAddr>,
    /// `max_connections`: most client connections open at once per proxy
    /// process, `>= 1`; more are accepted and closed at once (refused).
    /// The open-file limit bounds it too. Default `10000`.
    #[serde(deserialize_with = "de_max_connections")]
    pub max_connections: u32,
    /// `idle_timeout`: close connections that sent no bytes and have nothing
    /// in flight for this long, or whose client read none of its replies
    /// for this long; `"0s"` means never. Default `"60s"`.
    #[serde(with = "units::duration")]
    pub idle_timeout: Duration,
    /// `max_frame`: largest HSP/1 frame accepted, as the value of the
    /// length field (bytes after the 4-byte length). A size,
    /// `12..=64MiB`. Default `"1MiB"`.
    #[serde(
        serialize_with = "units::serialize_size",
        deserialize_with = "de_max_frame"
    )]
    pub max_frame: u32,
    /// `shutdown_grace`: bound on the graceful drain when stopping.
    /// Default `"10s"`.
    #[serde(with = "units::duration")]
    pub shutdown_grace: Duration,
    /// `proxy_stall_timeout`: a proxy whose event loop has not turned for
    /// this long (stuck in a bug, or stopped with SIGSTOP or a debugger)
    /// is killed and restarted with its workers; its clients' connections
    /// close. Time the master itself did not run (a paused VM) does not
    /// count. `"0s"` turns it off. Default `"30s"`.
    #[serde(with = "units::duration")]
    pub proxy_stall_timeout: Duration,
    /// `ring_size`: bytes of each shared-memory ring (every worker has one
    /// request ring and one reply ring). A size, rounded up to a power of two
    /// and to at least 4KiB, a page (the value here is already rounded), at
    /// most 1GiB, and at least `2 * (max_frame + 64)`. Default `"4MiB"`.
    #[serde(
        serialize_with = "units::serialize_size",
        deserialize_with = "de_ring_size"
    )]
    pub ring_size: u64,
    /// `backlog`: listen backlog, `>= 1` (the kernel caps it at
    /// `net.core.somaxconn`). Default `1024`.
    #[serde(deserialize_with = "de_backlog")]
    pub backlog: u32,
    /// `read_budget`: most bytes read from one connection per event-loop
    /// turn, so one busy client cannot starve the others. When many
    /// connections have data at once, each gets less: together they read
    /// about 8,192 requests' worth a turn (8,192 x the recent mean request
    /// size, split equally; at least 1 KiB each), so a turn stays short
    /// and replies go out between reads. A size, `>= 4KiB`; values above
    /// 1 MiB count as 1 MiB. Default `"64KiB"`.
    #[serde(
        serialize_with = "units::serialize_size",
        deserialize_with = "de_read_budget"
    )]
    pub read_budget: u32,
    /// `proxy_processes`: proxy processes, each with its own listening
    /// sockets on every address (SO_REUSEPORT: the kernel spreads new
    /// connections) and its own share of every group's workers, so the
    /// proxy scales past one core. `1..=64`; every group needs at least
    /// this many workers. Default `1`.
    #[serde(
        default = "default_proxy_processes",
        deserialize_with = "de_proxy_processes"
    )]
    pub proxy_processes: u32,
    /// `tcp_defer_accept`: set TCP_DEFER_ACCEPT on listeners, so the proxy
    /// wakes for a connection only once its first bytes arrived (1 s max
    /// wait). Default `false`.
    #[serde(default)]
    pub tcp_defer_accept: bool,
    /// `admin_socket`: the Unix socket `halfsync status`, `reload`, `stop`
    /// and `scale` talk to (mode 0600, owned by the server's user). Empty
    /// (the default) means `/tmp/halfsync-<port>.sock`, with the port of
    /// the first `listen` address.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub admin_socket: String,
    /// `metrics_listen`: `"ip:port"` of an HTTP listener serving Prometheus
    /// metrics at `/metrics` and a health check at `/ping`. Off unless set;
    /// bind it to 127.0.0.1.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_metrics_listen"
    )]
    pub metrics_listen: Option<SocketAddr>,
    /// `log_file`: append logs to this file instead of stderr; SIGUSR1 to
    /// the master reopens it (for logrotate). Relative to the config file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_file: Option<PathBuf>,
    /// `log_format`: `"text"` (default) or `"json"` (one object per line).
    #[serde(default)]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// How a group sizes its pool of workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// Always `workers` workers.
    #[default]
    Static,
    /// Between `workers` and `max_workers`, keeping `min_spare` to
    /// `max_spare` of them idle (like PHP-FPM's `pm = dynamic`).
    Dynamic,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 7878))],
            max_connections: 10_000,
            idle_timeout: Duration::from_secs(60),
            max_frame: 1 << 20,
            shutdown_grace: Duration::from_secs(10),
            proxy_stall_timeout: Duration::from_secs(30),
            ring_size: 4 << 20,
            backlog: 1024,
            read_budget: 64 << 10,
            proxy_processes: 1,
            tcp_defer_accept: false,
            admin_socket: String::new(),
            metrics_listen: None,
            log_file: None,
            log_format: LogFormat::Text,
        }
    }
}

/// A `[[group]]` table: a pool of worker processes running one plugin.
///
/// `Deserialize` checks each key on its own; cross-group checks (unique
/// names, one default group, no command served twice) happen in
/// [`Config::from_toml`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// `name` (required): unique, 1 to 32 characters from `A-Z a-z 0-9 _ -`.
    #[serde(deserialize_with = "de_group_name")]
    pub name: String,
    /// `plugin` (required): a bare name (no `/`, not ending in `.so`) means
    /// `lib<name>.so` next to the halfsync executable; anything else is a
    /// path, relative ones resolved against the config file's directory. See
    /// [`resolve_plugin`].
    #[serde(deserialize_with = "de_plugin")]
    pub plugin: String,
    /// `workers`: worker processes in this group, `1..=256`. Default `2`.
    #[serde(default = "default_workers", deserialize_with = "de_workers")]
    pub workers: u32,
    /// `max_inflight`: per worker, requests handed to its ring and not yet
    /// answered, `1..=65536`. Default `1024`; for requests slower than
    /// ~1 µs `max_inflight_time` binds first.
    #[serde(default = "default_max_inflight", deserialize_with = "de_max_inflight")]
    pub max_inflight: u32,
    /// `max_inflight_time`: per worker, the requests in its ring are also
    /// held to about this much work: `max(1, max_inflight_time / the
    /// group's mean run time)` of them (the run time is sampled by the
    /// workers; 16 until the first sample). A request already in a
    /// worker's ring waits for the ones ahead of it, which the wait queue's
    /// turn-taking cannot reorder: this holds that wait to about this long
    /// for the typical request, while cheap requests still go in large
    /// batches. A budget of work, not a timeout. A worker found holding
    /// more than 4× its cap + 16 (the plugin got slower, or a reload lowered
    /// `max_inflight`) has its unstarted requests taken back into the wait
    /// queue when it has room for them. `"0s"` turns it off (`max_inflight`
    /// alone). Default `"1ms"`.
    #[serde(default = "default_max_inflight_time", with = "units::duration")]
    pub max_inflight_time: Duration,
    /// `max_queue`: requests waiting in the proxy for a free worker of this
    /// group, `0..=1000000` (0: reply BUSY at once when all are saturated).
    /// Default `1024`.
    #[serde(default = "default_max_queue", deserialize_with = "de_max_queue")]
    pub max_queue: u32,
    /// `commands`: command numbers (`0..=65535`) this group serves, each at
    /// most once. Empty or absent makes this the default group, serving every
    /// command no other group claims; at most one group may be the default.
    #[serde(default)]
    pub commands: Vec<u16>,
    /// `request_timeout`: a worker still inside one request this long is
    /// killed and replaced; that request gets TIMEOUT. `"0s"` turns it off.
    /// Default `"60s"`.
    #[serde(default = "default_request_timeout", with = "units::duration")]
    pub request_timeout: Duration,
    /// `timeout_kill_grace`: when non-zero, a worker past `request_timeout`
    /// first gets SIGABRT (so a crash handler can record where it hung) and
    /// SIGKILL only this much later. Default `"0s"`: SIGKILL at once.
    #[serde(default, with = "units::duration")]
    pub timeout_kill_grace: Duration,
    /// `slow_request`: log a warning for every request still running after
    /// this long (it is not killed). `"0s"` turns it off. Default `"0s"`.
    #[serde(default, with = "units::duration")]
    pub slow_request: Duration,
    /// `queue_timeout`: a request that waited this long for a worker to
    /// start it gets TIMEOUT and is never run. `"0s"` turns it off.
    /// Default `"0s"`.
    #[serde(default, with = "units::duration")]
    pub queue_timeout: Duration,
    /// `max_requests`: a worker that served this many requests is replaced
    /// (its replacement starts first; no request fails). `0` turns it off.
    /// Default `0`.
    #[serde(default)]
    pub max_requests: u64,
    /// `max_requests_jitter`: each worker's `max_requests` is raised by a
    /// random amount up to this, so workers do not all recycle at once.
    /// Default `0`.
    #[serde(default)]
    pub max_requests_jitter: u64,
    /// `max_rss`: a worker whose resident memory grew past this size is
    /// replaced like one that reached `max_requests`. `0` turns it off.
    /// The worker reads its peak RSS every 64 requests and whenever its
    /// ring runs empty, so it may overshoot by what 64 requests allocate:
    /// a recycling trigger, not a hard limit. Default `0`.
    #[serde(
        default,
        serialize_with = "units::serialize_size",
        deserialize_with = "de_size_any"
    )]
    pub max_rss: u64,
    /// `restart_delay`: after a worker failed to start five times in a row
    /// (its plugin init failed, it died before it was ready, `init_timeout`
    /// included, or it died within a second without serving a request),
    /// restarts are delayed by this, doubling on each further failure up to
    /// `restart_delay_max` (which also caps this). A worker that served
    /// before dying is replaced at once.
    /// While every worker of the group waits, its requests get BUSY at once.
    /// Default `"100ms"`.
    #[serde(default = "default_restart_delay", with = "units::duration")]
    pub restart_delay: Duration,
    /// `restart_delay_max`: the cap of that backoff. Default `"10s"`.
    #[serde(default = "default_restart_delay_max", with = "units::duration")]
    pub restart_delay_max: Duration,
    /// `init_timeout`: a worker whose plugin init has not finished after
    /// this long is killed (and restarted with backoff). Default `"30s"`.
    #[serde(default = "default_init_timeout", with = "units::duration")]
    pub init_timeout: Duration,
    /// `requeue_after`: when a worker has been inside one request this long,
    /// the requests waiting behind it in its ring move to other workers and
    /// it gets no new ones until that request ends (no head-of-line
    /// blocking behind a slow request). A worker that, not running a
    /// request, takes none of its requests this long (stopped, starved of
    /// CPU) has them all moved and gets no new ones until it runs again
    /// (and is killed after `request_timeout`). `"0s"` turns both off.
    /// Default `"100ms"`.
    #[serde(default = "default_requeue_after", with = "units::duration")]
    pub requeue_after: Duration,
    /// `drain_timeout`: a worker being replaced (reload, recycling) or
    /// retired (scaling down) that still runs a request this long after it
    /// stopped getting new ones is killed; that request gets TIMEOUT. So is
    /// one that has not exited this long after it was asked to. Default
    /// `"30s"`; `"0s"`: never killed.
    #[serde(default = "default_drain_timeout", with = "units::duration")]
    pub drain_timeout: Duration,
    /// `pool`: `"static"` (default: always `workers`) or `"dynamic"`
    /// (from `workers` up to `max_workers`, driven by idle workers and the
    /// wait queue).
    #[serde(default)]
    pub pool: Pool,
    /// `max_workers`: the most workers a dynamic pool grows to, `1..=256`.
    /// Default: `workers` (no growth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_workers: Option<u32>,
    /// `min_spare`: a dynamic pool starts a worker when fewer than this
    /// many are idle (or requests are waiting). Default `1`.
    #[serde(default = "default_min_spare")]
    pub min_spare: u32,
    /// `max_spare`: a dynamic pool retires a worker when more than this
    /// many have been idle for a while. Default `3`.
    #[serde(default = "default_max_spare")]
    pub max_spare: u32,
    /// `[group.config]`: optional table handed to the plugin's init as TOML
    /// text (see [`Group::plugin_config_toml`]: the table serialized again,
    /// same keys and values, not the file's own lines); its keys are not
    /// checked here.
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub config: toml::Table,
}

fn default_workers() -> u32 {
    2
}
fn default_max_inflight() -> u32 {
    1024
}
fn default_max_inflight_time() -> Duration {
    Duration::from_millis(1)
}
fn default_max_queue() -> u32 {
    1024
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_restart_delay() -> Duration {
    Duration::from_millis(100)
}
fn default_restart_delay_max() -> Duration {
    Duration::from_secs(10)
}
fn default_init_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_requeue_after() -> Duration {
    Duration::from_millis(100)
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_min_spare() -> u32 {
    1
}
fn default_max_spare() -> u32 {
    3
}

impl Group {
    /// The most workers this group may run: `max_workers` for a dynamic
    /// pool, else `workers`.
    pub fn worker_limit(&self) -> u32 {
        match self.pool {
            Pool::Static => self.workers,
            Pool::Dynamic => self.max_workers.unwrap_or(self.workers).max(self.workers),
        }
    }

    /// A group with the given name and plugin and every other key at its
    /// default (2 workers, `max_inflight` 1024, `max_queue` 1024, default
    /// route, empty plugin config). Not validated.
    pub fn new(name: impl Into<String>, plugin: impl Into<String>) -> Group {
        Group {
            name: name.into(),
            plugin: plugin.into(),
            workers: default_workers(),
            max_inflight: default_max_inflight(),
            max_inflight_time: default_max_inflight_time(),
            max_queue: default_max_queue(),
            commands: Vec::new(),
            request_timeout: default_request_timeout(),
            timeout_kill_grace: Duration::ZERO,
            slow_request: Duration::ZERO,
            queue_timeout: Duration::ZERO,
            max_requests: 0,
            max_requests_jitter: 0,
            max_rss: 0,
            restart_delay: default_restart_delay(),
            restart_delay_max: default_restart_delay_max(),
            init_timeout: default_init_timeout(),
            requeue_after: default_requeue_after(),
            drain_timeout: default_drain_timeout(),
            pool: Pool::Static,
            max_workers: None,
            min_spare: default_min_spare(),
            max_spare: default_max_spare(),
            config: toml::Table::new(),
        }
    }

    /// The `[group.config]` table as TOML text, `""` when empty.
    ///
    /// Cannot fail for a configuration returned by this crate (this is
    /// checked while loading); returns `""` if a hand-built table cannot be
    /// serialized.
    pub fn plugin_config_toml(&self) -> String {
        if self.config.is_empty() {
            return String::new();
        }
        toml::to_string(&self.config).unwrap_or_default()
    }

    /// Whether this is the default group (no `commands` listed): it serves
    /// every command that no other group claims.
    pub fn is_default_route(&self) -> bool {
        self.commands.is_empty()
    }
}

/// Shortens serde's "unknown field `x`, expected one of `a`, `b`, ..." to
/// the closest valid key when one is close (a typo), since the full list
/// of a group's keys makes a very long line.
fn suggest_key(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_owned();
    };
    let Some((unknown, expected)) = rest.split_once("`, expected ") else {
        return message.to_owned();
    };
    let keys: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let best = keys.iter().map(|k| (edit_distance(unknown, k), *k)).min();
    match best {
        Some((d, k)) if d <= 2 || (d <= 3 && unknown.len() > 8) => {
            format!("unknown field `{unknown}`; did you mean `{k}`?")
        }
        // A setting written above the first table lands at the top level,
        // where only the two tables may be.
        _ if keys == ["server", "group"] => format!(
            "unknown key `{unknown}` at the top level, where only [server] and [[group]] \
             go: move it under [server] if it is a server setting, or under its [[group]]"
        ),
        _ if keys.len() > 8 => format!(
            "unknown field `{unknown}`; valid keys here: {}",
            keys.join(", ")
        ),
        _ => message.to_owned(),
    }
}

/// Levenshtein distance, for key suggestions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Where the plugin named by a group's `plugin` key lives.
///
/// - A bare name (no `/` and not ending in `.so`), like `"echo"`, means
///   `<exe_dir>/lib<name>.so`.
/// - An absolute path is used as is.
/// - Any other relative path (`"./x.so"`, `"plugins/libx.so"`, `"libx.so"`)
///   is resolved against `config_dir`, or the current directory (`./`) when
///   `config_dir` is `None` or empty. The result always contains a `/`, so
///   `dlopen` never searches the library path for it.
///
/// ```
/// use halfsync_config::resolve_plugin;
/// use std::path::Path;
/// let exe = Path::new("/opt/hs/bin");
/// let etc = Some(Path::new("/etc/hs"));
/// assert_eq!(resolve_plugin("echo", etc, exe), Path::new("/opt/hs/bin/libecho.so"));
/// assert_eq!(resolve_plugin("plugins/libx.so", etc, exe), Path::new("/etc/hs/plugins/libx.so"));
/// assert_eq!(resolve_plugin("/usr/lib/liby.so", etc, exe), Path::new("/usr/lib/liby.so"));
/// assert_eq!(resolve_plugin("libx.so", None, exe), Path::new("./libx.so"));
/// assert_eq!(resolve_plugin("./libx.so", Some(Path::new(".")), exe), Path::new("./libx.so"));
/// ```
pub fn resolve_plugin(spec: &str, config_dir: Option<&Path>, exe_dir: &Path) -> PathBuf {
    if !spec.contains('/') && !spec.ends_with(".so") {
        return exe_dir.join(format!("lib{spec}.so"));
    }
    let path = Path::new(spec);
    if path.is_absolute() {
        return path.to_path_buf();
    }
    // "./x.so" relative to "." is "./x.so", not "././x.so".
    let rel = path.strip_prefix(".").unwrap_or(path);
    match config_dir {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(rel),
        _ => Path::new(".").join(rel),
    }
}

impl Config {
    /// Settings the file gives that have no effect where they are, one
    /// line each, for a warning (a valid config still: a pool's type may
    /// be switched back and forth while keeping its limits).
    pub fn ignored_settings(&self) -> Vec<String> {
        self.groups
            .iter()
            .filter(|g| g.pool == Pool::Static && g.max_workers.is_some())
            .map(|g| {
                format!(
                    "group {}: max_workers applies to pool = \"dynamic\" only; this static \
                     pool runs workers = {} and ignores it",
                    g.name, g.workers
                )
            })
            .collect()
    }

    /// The admin socket path: `server.admin_socket` (relative to the config
    /// file), or `/tmp/halfsync-<port>.sock` for the first listen port.
    pub fn admin_socket(&self) -> PathBuf {
        if self.server.admin_socket.is_empty() {
            let port = self.server.listen.first().map_or(0, |a| a.port());
            return PathBuf::from(format!("/tmp/halfsync-{port}.sock"));
        }
        let p = Path::new(&self.server.admin_socket);
        match self.config_dir() {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p.to_path_buf(),
        }
    }

    /// The log file, if one is configured (relative to the config file).
    pub fn log_file(&self) -> Option<PathBuf> {
        let p = self.server.log_file.as_deref()?;
        Some(match self.config_dir() {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p.to_path_buf(),
        })
    }

    /// Reads and validates the configuration file at `path`.
    ///
    /// Errors name the path as given.
    pub fn from_file(path: &Path) -> Result<Config, Error> {
        let bytes = std::fs::read(path).map_err(|error| Error::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let text = String::from_utf8(bytes).map_err(|e| {
            // Where, as for any syntax error (the text up to there is UTF-8).
            let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let text = String::from_utf8_lossy(good);
            Error::Syntax {
                location: Location {
                    source: Origin::File(path.to_path_buf()).to_string(),
                    line_col: Some(line_col(&text, text.len())),
                    key: None,
                },
                message: "not valid UTF-8 (TOML files are UTF-8: re-save the file as UTF-8)"
                    .to_owned(),
            }
        })?;
        Config::from_toml(&text, Origin::File(path.to_path_buf()))
    }

    /// Parses and validates configuration text; `origin` names it in error
    /// messages and anchors relative plugin paths.
    pub fn from_toml(text: &str, origin: Origin) -> Result<Config, Error> {
        let source = origin.to_string();
        let de = toml::de::Deserializer::parse(text).map_err(|e| Error::Syntax {
            location: Location {
                source: source.clone(),
                line_col: e.span().map(|s| line_col(text, s.start)),
                key: None,
            },
            message: match e.message() {
                // The parser's own wording for dotted keys nested too deep.
                "recursion limit" => "keys nested too deeply (recursion limit)".to_owned(),
                other => one_line(other),
            },
        })?;
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let mut segments: Vec<_> = e.path().iter().cloned().collect();
            let inner = e.into_inner();
            // serde_path_to_error puts an unknown key into the path; the key
            // is already in the message, so name the table that holds it.
            if let Some(serde_path_to_error::Segment::Map { key }) = segments.last()
                && inner
                    .message()
                    .starts_with(&format!("unknown field `{key}`"))
            {
                segments.pop();
            }
            let key = key_path(&segments);
            Error::Schema {
                location: Location {
                    source: source.clone(),
                    line_col: inner.span().map(|s| line_col(text, s.start)),
                    key,
                },
                message: one_line(&suggest_key(inner.message())),
            }
        })?;
        let config = Config {
            server: raw.server,
            groups: raw.group,
            origin,
        };
        config.validate(text)?;
        Ok(config)
    }

    /// The built-in configuration: [`DEFAULT_CONFIG`], parsed (built
    /// directly, so it cannot fail; a test checks both agree).
    pub fn embedded_default() -> Config {
        Config {
            server: Server::default(),
            groups: vec![Group::new("echo", "echo")],
            origin: Origin::Embedded,
        }
    }

    /// The directory of the configuration file (`.` for a bare file name),
    /// or `None` when the configuration did not come from a file.
    pub fn config_dir(&self) -> Option<&Path> {
        match &self.origin {
            Origin::File(path) => match path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => Some(dir),
                _ => Some(Path::new(".")),
            },
            Origin::Embedded | Origin::Text => None,
        }
    }

    /// Where `group`'s plugin lives: [`resolve_plugin`] with this
    /// configuration's directory.
    pub fn plugin_path(&self, group: &Group, exe_dir: &Path) -> PathBuf {
        resolve_plugin(&group.plugin, self.config_dir(), exe_dir)
    }

    /// Cross-key checks; `text` is only used to find line numbers.
    fn validate(&self, text: &str) -> Result<(), Error> {
        let invalid = |path: &[Step<'_>], key: String, message: String| Error::Invalid {
            location: Location {
                source: self.origin.to_string(),
                line_col: locate(text, path),
                key: Some(one_line(&key)),
            },
            message: one_line(&message),
        };

        if self.groups.is_empty() {
            return Err(invalid(
                &[],
                "group".into(),
                "at least one [[group]] is required".into(),
            ));
        }
        if self.groups.len() > MAX_GROUPS {
            return Err(invalid(
                &[Step::Key("group"), Step::Index(MAX_GROUPS)],
                "group".into(),
                format!(
                    "{} [[group]]s: at most {MAX_GROUPS}; route more commands to one group",
                    self.groups.len()
                ),
            ));
        }

        let server = &self.server;
        let min_ring = 2 * (u64::from(server.max_frame) + RING_RECORD_OVERHEAD);
        if server.ring_size < min_ring {
            let at = if locate(text, &[Step::Key("server"), Step::Key("ring_size")]).is_some() {
                "ring_size"
            } else {
                "max_frame"
            };
            return Err(invalid(
                &[Step::Key("server"), Step::Key(at)],
                "server.ring_size".into(),
                format!(
                    "{} is too small for server.max_frame {}: must be at least \
                     2 * (max_frame + {RING_RECORD_OVERHEAD}) = {min_ring} bytes; \
                     raise ring_size or lower max_frame",
                    ByteSize(server.ring_size),
                    ByteSize(server.max_frame.into()),
                ),
            ));
        }

        // (Its length is checked where it is bound, `halfsync run` and
        // `check`: resolved against the config file's directory it depends
        // on how the file was named, and a reload never binds it again.)
        if server.admin_socket.contains('\0') {
            return Err(invalid(
                &[Step::Key("server"), Step::Key("admin_socket")],
                "server.admin_socket".into(),
                "has a NUL byte; a path cannot".into(),
            ));
        }
        if let Some(log) = &server.log_file
            && (log.as_os_str().is_empty() || log.to_string_lossy().contains('\0'))
        {
            return Err(invalid(
                &[Step::Key("server"), Step::Key("log_file")],
                "server.log_file".into(),
                "must be a file path (not empty, no NUL byte); leave the key out to log to \
                 stderr"
                    .into(),
            ));
        }

        // The same port on the same address, or on a wildcard of the same
        // family (an IPv6 wildcard may take IPv4 too); port 0 is a fresh
        // port each time.
        let clash = |l: &SocketAddr, m: &SocketAddr| {
            let v6_any = |a: &SocketAddr| a.is_ipv6() && a.ip().is_unspecified();
            l.port() == m.port()
                && m.port() != 0
                && (l.ip() == m.ip()
                    || v6_any(l)
                    || v6_any(m)
                    || (l.is_ipv4() == m.is_ipv4()
                        && (l.ip().is_unspecified() || m.ip().is_unspecified())))
        };
        if let Some(m) = server.metrics_listen
            && server.listen.iter().any(|l| clash(l, &m))
        {
            return Err(invalid(
                &[Step::Key("server"), Step::Key("metrics_listen")],
                "server.metrics_listen".into(),
                format!(
                    "{m} is also a client listen address (server.listen); \
                     give the metrics listener a port of its own"
                ),
            ));
        }

        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut default_group: Option<&str> = None;
        let mut routes: HashMap<u16, &str> = HashMap::new();
        for (i, group) in self.groups.iter().enumerate() {
            let here = |rest: &[Step<'static>]| {
                let mut path = vec![Step::Key("group"), Step::Index(i)];
                path.extend_from_slice(rest);
                path
            };
            if let Some(first) = names.insert(&group.name, i) {
                return Err(invalid(
                    &here(&[Step::Key("name")]),
                    format!("group[{i}].name"),
                    format!(
                        "group name {:?} is already used by group[{first}]",
                        group.name
                    ),
                ));
            }
            let label = format!("group {:?}", group.name);
            if group.is_default_route() {
                if let Some(other) = default_group {
                    return Err(invalid(
                        &here(&[]),
                        label,
                        format!(
                            "group {other:?} is already the default group (no commands); \
                             at most one group may leave commands empty"
                        ),
                    ));
                }
                default_group = Some(&group.name);
            }
            for (j, &cmd) in group.commands.iter().enumerate() {
                if let Some(other) = routes.insert(cmd, &group.name) {
                    let message = if other == group.name {
                        format!("command {cmd} is listed twice")
                    } else {
                        format!("command {cmd} is already served by group {other:?}")
                    };
                    return Err(invalid(
                        &here(&[Step::Key("commands"), Step::Index(j)]),
                        label,
                        message,
                    ));
                }
            }
            if group.workers < self.server.proxy_processes {
                return Err(invalid(
                    &here(&[Step::Key("workers")]),
                    format!("group[{i}].workers"),
                    format!(
                        "{} workers for {} proxy processes: every proxy needs a worker of each group; raise workers or lower server.proxy_processes",
                        group.workers, self.server.proxy_processes
                    ),
                ));
            }
            if let Some(max) = group.max_workers
                && !(group.workers..=256).contains(&max)
            {
                return Err(invalid(
                    &here(&[Step::Key("max_workers")]),
                    format!("group[{i}].max_workers"),
                    format!(
                        "must be between workers ({}) and 256, got {max}",
                        group.workers
                    ),
                ));
            }
            if group.pool == Pool::Dynamic && group.max_workers.is_none() {
                // As PHP-FPM refuses pm = dynamic without pm.max_children.
                return Err(invalid(
                    &here(&[Step::Key("pool")]),
                    format!("group[{i}].pool"),
                    format!(
                        "a dynamic pool needs max_workers, the most workers it grows to \
                         (above workers = {}); without it the pool never grows",
                        group.workers
                    ),
                ));
            }
            if group.min_spare > group.max_spare {
                return Err(invalid(
                    &here(&[Step::Key("min_spare")]),
                    format!("group[{i}].min_spare"),
                    format!(
                        "min_spare ({}) is above max_spare ({})",
                        group.min_spare, group.max_spare
                    ),
                ));
            }
            if let Err(e) = toml::to_string(&group.config) {
                return Err(invalid(
                    &here(&[Step::Key("config")]),
                    format!("group[{i}].config"),
                    format!("cannot be passed to the plugin as TOML: {e}"),
                ));
            }
        }
        Ok(())
    }
}

/// The document as deserialized, before cross-key validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: Server,
    #[serde(default)]
    group: Vec<Group>,
}

/// Renders a key path as `server.listen[1]`; `None` for the document root.
fn key_path(segments: &[serde_path_to_error::Segment]) -> Option<String> {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in segments {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    (!out.is_empty()).then(|| one_line(&out))
}

/// One step of a key path, for finding line numbers after parsing.
#[derive(Clone, Copy)]
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

/// Line and column of the value at `path` in `text`, if it is there.
fn locate(text: &str, path: &[Step<'_>]) -> Option<(usize, usize)> {
    if path.is_empty() {
        return None;
    }
    let root = toml::de::DeTable::parse(text).ok()?;
    let mut span = root.span();
    let root = toml::de::DeValue::Table(root.into_inner());
    let mut value = &root;
    for step in path {
        let next = match *step {
            Step::Key(key) => value.get(key),
            Step::Index(i) => value.get(i),
        }?;
        span = next.span();
        value = next.get_ref();
    }
    Some(line_col(text, span.start))
}

fn u32_in<'de, D: Deserializer<'de>>(d: D, min: u32, max: u32) -> Result<u32, D::Error> {
    let v = u32::deserialize(d)?;
    if v < min || v > max {
        let msg = if max == u32::MAX {
            format!("must be at least {min}, got {v}")
        } else {
            format!("must be between {min} and {max}, got {v}")
        };
        return Err(de::Error::custom(msg));
    }
    Ok(v)
}

fn default_proxy_processes() -> u32 {
    1
}
fn de_proxy_processes<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    u32_in(d, 1, 64)
}
fn de_max_connections<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    u32_in(d, 1, u32::MAX)
}
fn de_backlog<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    u32_in(d, 1, u32::MAX)
}
fn de_workers<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    u32_in(d, 1, 256)
}
fn de_max_inflight<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    u32_in(d, 1, 65_536)
}
fn de_max_queue<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    u32_in(d, 0, 1_000_000)
}

fn de_max_frame<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = units::size_in(d, MIN_FRAME.into(), MAX_FRAME_LIMIT.into())?;
    u32::try_from(v).map_err(de::Error::custom)
}

fn de_read_budget<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = units::size_in(d, 4 << 10, u32::MAX.into())?;
    u32::try_from(v).map_err(de::Error::custom)
}

fn de_size_any<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    units::size_in(d, 0, u64::MAX)
}

fn de_ring_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = units::size_in(d, 0, MAX_RING_SIZE)?;
    Ok(v.max(MIN_RING_SIZE).next_power_of_two())
}

/// `metrics_listen`: an `"ip:port"` string, said so for anything else (a
/// host name is not resolved).
fn de_metrics_listen<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(|_| {
        de::Error::custom(format!(
            r#"invalid address {s:?}: expected "ip:port" like "127.0.0.1:9100" or "[::1]:9100" (a host name is not looked up)"#
        ))
    })
}

fn de_listen<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    struct Addr(SocketAddr);
    impl<'de> Deserialize<'de> for Addr {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let s = String::deserialize(d)?;
            s.parse().map(Addr).map_err(|_| {
                de::Error::custom(format!(
                    r#"invalid address {s:?}: expected "ip:port" like "127.0.0.1:7878" or "[::1]:7878""#
                ))
            })
        }
    }
    let list = Vec::<Addr>::deserialize(d)?;
    if list.is_empty() {
        return Err(de::Error::custom(
            r#"must list at least one address, like ["127.0.0.1:7878"]"#,
        ));
    }
    let mut out: Vec<SocketAddr> = Vec::with_capacity(list.len());
    for Addr(addr) in list {
        if out.contains(&addr) {
            return Err(de::Error::custom(format!("{addr} is listed twice")));
        }
        // A wildcard address takes its port on every address of its family
        // (IPv6 listeners are IPv6 only): another address of that family
        // on that port could not be bound beside it.
        if addr.port() != 0
            && let Some(other) = out.iter().find(|o| {
                o.port() == addr.port()
                    && o.is_ipv4() == addr.is_ipv4()
                    && (o.ip().is_unspecified() || addr.ip().is_unspecified())
            })
        {
            let (wide, narrow) = if other.ip().is_unspecified() {
                (other, &addr)
            } else {
                (&addr, other)
            };
            return Err(de::Error::custom(format!(
                "{wide} already listens on {narrow}: list only one of them"
            )));
        }
        out.push(addr);
    }
    Ok(out)
}

fn de_group_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    let ok = (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !ok {
        return Err(de::Error::custom(format!(
            "invalid group name {name:?}: use 1 to 32 characters from A-Z, a-z, 0-9, '_' and '-'"
        )));
    }
    Ok(name)
}

fn de_plugin<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let plugin = String::deserialize(d)?;
    if plugin.is_empty() {
        return Err(de::Error::custom(
            r#"must not be empty: give a plugin name like "echo" or a path to a .so file"#,
        ));
    }
    if plugin.contains('\0') {
        return Err(de::Error::custom("must not contain a NUL character"));
    }
    Ok(plugin)
}
