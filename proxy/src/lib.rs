//! The halfsync proxy: one process, one epoll loop, every client
//! connection.
//!
//! The proxy accepts connections on listeners it inherits from the master,
//! frames HSP/1 requests out of each byte stream, routes each request to a
//! worker group by command, and writes it into the request ring of that
//! group's least-loaded worker slot. Replies come back through each slot's
//! reply ring and are sent to the connection the tag in the reply names.
//! The proxy never runs plugin code and treats everything a worker wrote
//! to shared memory as untrusted input.
//!
//! The master starts the proxy as `halfsync` with `HALFSYNC_ROLE=proxy` and
//! a [`ProxySpec`] in the environment; [`run`] is the whole process.
//!
//! ```no_run
//! let spec = halfsync_proxy::ProxySpec::from_env().unwrap();
//! halfsync_proxy::run(spec).unwrap();
//! ```

#![deny(missing_docs)]

mod conn;
pub mod control;
mod event_loop;
mod queue;
mod slots;
pub mod stats;
pub mod sys;
mod tuning;

use serde::{Deserialize, Serialize};

pub use event_loop::run;

/// Environment variable carrying the [`ProxySpec`] as TOML.
pub const SPEC_ENV: &str = "HALFSYNC_PROXY_SPEC";

/// Everything the master hands the proxy process at start: the validated
/// config and the numbers of the file descriptors it inherited. Worker
/// slots arrive later over the control channel
/// ([`control::ToProxy::AddSlot`]).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ProxySpec {
    /// The validated configuration, as TOML text.
    pub config: String,
    /// Stable ids of the config's groups, in config order.
    pub group_ids: Vec<u32>,
    /// The proxy end of the control channel.
    pub control_fd: i32,
    /// The shared stats page ([`stats::Stats`]).
    pub stats_fd: i32,
    /// Listening sockets with their stable ids.
    pub listeners: Vec<(u32, i32)>,
    /// Which proxy process this is (`0..proxy_processes`), for logs.
    #[serde(default)]
    pub index: u32,
    /// There are several proxy processes (logs carry `index`).
    #[serde(default)]
    pub numbered: bool,
    /// Benchmark baseline only (`halfsync run --inline`): the plugin of each
    /// group (id, file, config text) is loaded into the proxy and called
    /// directly from the event loop. No workers, no shared memory, no
    /// isolation: the measure of what isolation costs.
    #[serde(default)]
    pub inline: Vec<(u32, std::path::PathBuf, String)>,
}

/// A new configuration for a running proxy (sent in a memfd with
/// [`control::ToProxy::Reconfigure`]).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Reconfigure {
    /// The validated configuration, as TOML text.
    pub config: String,
    /// Stable ids of its groups, in config order. Groups of the previous
    /// configuration whose id is absent are going away: no new requests
    /// are routed to them; their workers drain.
    pub group_ids: Vec<u32>,
    /// Groups a reload is replacing the workers of. A request for a
    /// command the new routes give one of them, and the old routes did
    /// not, waits (in the group's `held` queue) until the group leaves
    /// this list, so it reaches the new version of its new group and never
    /// the old one. Requests already queued in another group for such a
    /// command move with it.
    #[serde(default)]
    pub hold: Vec<u32>,
}

impl Reconfigure {
    /// Serializes for the memfd.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}

/// Errors that stop the proxy.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The spec in the environment is missing or unreadable.
    #[error("proxy spec: {0}")]
    Spec(String),
    /// The config in the spec does not validate.
    #[error("proxy config: {0}")]
    Config(#[from] halfsync_config::Error),
    /// A slot's shared memory could not be mapped.
    #[error("slot {slot}: {source}")]
    Slot {
        /// Slot index.
        slot: usize,
        /// The cause.
        source: halfsync_shm::SlotError,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
}

impl ProxySpec {
    /// Reads the spec from [`SPEC_ENV`].
    pub fn from_env() -> Result<ProxySpec, ProxyError> {
        let text = halfsync_shm::sys::env_text(SPEC_ENV).map_err(ProxyError::Spec)?;
        toml::from_str(&text).map_err(|e| ProxyError::Spec(e.message().to_string()))
    }

    /// Serializes the spec for [`SPEC_ENV`].
    pub fn to_env(&self) -> String {
        // A struct of strings, integers and vectors always serializes.
        toml::to_string(self).unwrap_or_default()
    }
}
