//! The halfsync worker process: loads one plugin and serves one slot's
//! request ring with it, synchronously.
//!
//! A worker is started by the master as `halfsync` with
//! `HALFSYNC_ROLE=worker` and a [`WorkerSpec`] in the environment. It maps
//! its slot (and only its slot), loads the plugin with `RTLD_NOW`, calls
//! its `init` with the group's `[group.config]` table, then loops: take a
//! request from the request ring, run the plugin's `handle` with the reply
//! written straight into the reply ring, publish, repeat. Its death costs
//! at most the request it was running; the proxy and master handle the
//! rest.
//!
//! [`Plugin`] is also what `halfsync check` uses to test-load plugins.
//!
//! ```no_run
//! let spec = halfsync_worker::WorkerSpec::from_env().unwrap();
//! std::process::exit(halfsync_worker::run(spec));
//! ```

#![deny(missing_docs)]

pub mod plugin;
mod serve;
mod sys;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use halfsync_plugin_api::abi::NOT_A_WORKER;
pub use plugin::{InitError, Instance, LoadError, Plugin, Written};
pub use serve::run;

/// Environment variable carrying the [`WorkerSpec`] as TOML.
pub const SPEC_ENV: &str = "HALFSYNC_WORKER_SPEC";

/// Exit code of a worker whose plugin failed to load or initialise
/// (sysexits' EX_CONFIG): the master backs off before restarting it.
pub const EXIT_PLUGIN_FAILED: i32 = 78;

/// Exit code of a worker that found its slot unusable (sysexits' EX_SOFTWARE).
pub const EXIT_SLOT_FAILED: i32 = 70;

/// What the master hands a worker process.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WorkerSpec {
    /// Group name (for logs).
    pub group: String,
    /// Number of the worker within its group (for logs).
    pub index: u32,
    /// The plugin file, already resolved.
    pub plugin: PathBuf,
    /// A descriptor open on that file, inherited from the master, to load
    /// it from (the path is then only for messages); `None`: by path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_fd: Option<i32>,
    /// The group's `[group.config]` table as TOML text.
    pub plugin_config: String,
    /// The slot's memfd.
    pub memfd: i32,
    /// The eventfd that wakes the proxy.
    pub eventfd: i32,
    /// Ring capacity in bytes.
    pub ring_size: u64,
    /// Largest reply payload (max_frame - 12).
    pub max_reply: u32,
    /// Requests that waited longer than this (ns) in the ring get TIMEOUT
    /// without running; 0 is off.
    pub queue_timeout_ns: u64,
    /// Ask to be replaced after this many requests (jitter included); 0 is off.
    pub max_requests: u64,
    /// Ask to be replaced once peak RSS passes this many bytes; 0 is off.
    pub max_rss: u64,
}

impl WorkerSpec {
    /// Reads the spec from [`SPEC_ENV`].
    pub fn from_env() -> Result<WorkerSpec, String> {
        let text = halfsync_shm::sys::env_text(SPEC_ENV)?;
        toml::from_str(&text).map_err(|e| format!("{SPEC_ENV}: {}", e.message()))
    }

    /// Serializes the spec for [`SPEC_ENV`].
    pub fn to_env(&self) -> String {
        // Strings, integers and a path: always serializable (paths must be UTF-8,
        // which the master checks when it resolves them).
        toml::to_string(self).unwrap_or_default()
    }
}
