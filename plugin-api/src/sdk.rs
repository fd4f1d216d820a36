//! The safe half of the Rust SDK: the [`Plugin`] trait and the plain types
//! it speaks. The types that wrap host pointers ([`Host`], [`Reply`]) live
//! in `ffi.rs` with the rest of the unsafe code.

use core::fmt;

use crate::abi;
use crate::ffi::{Host, Reply};

/// The error a plugin returns from [`Plugin::init`] or [`Plugin::handle`].
///
/// Anything that converts into a boxed error works with `?`: `String`,
/// `&str`, `std::io::Error`, [`ReplyFull`], your own error types.
pub type Error = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A halfsync plugin written in Rust.
///
/// The worker process that loads the plugin calls, from one thread:
/// [`init`](Plugin::init) once, [`handle`](Plugin::handle) once per
/// request, and [`fini`](Plugin::fini) once at a clean exit (never after a
/// crash). Export the type with [`export_plugin!`](crate::export_plugin).
///
/// A panic in any of the three is caught at the C boundary: in `init` it
/// becomes an init failure with the message `plugin panicked: <message>
/// at <file>:<line>:<column>`; in `handle` the reply is cleared and becomes
/// a [`Status::PLUGIN_ERROR`] reply `plugin panicked; the server log has
/// its message` (the message and place go to the host's log line, not to
/// the client, who may not be trusted with them; the state is **not**
/// reset: a panic half-way through an update leaves it half-updated, and
/// the next request sees it); in `fini` it is logged through the host and
/// swallowed. Such panics are not printed to stderr (no backtrace is
/// taken); a panic that cannot be caught (one escaping an `extern "C"`
/// function of the plugin's) is printed on one line, without a backtrace,
/// and the worker aborts at once; panics on threads the plugin starts
/// itself are left to the previous panic hook. A plugin built with `panic = "abort"` aborts its worker
/// instead, which the server survives but the client sees as
/// `WORKER_DIED`. A panic hook the plugin installs itself takes the
/// panic's message and place out of the log line (the hook's own output,
/// if any, is logged as the worker's output).
///
/// One process per worker: its statics (a `OnceLock`, a `static` counter,
/// a global logger) belong to that worker alone and start afresh in every
/// new worker, after a crash, a recycle or a reload (a reload starts new
/// workers; nothing carries over but what the plugin stores outside).
/// Threads the plugin starts end with the worker, after `fini`. The host
/// logs at most 300 of the plugin's log lines a second per worker, each
/// cut at 16 KiB, and counts the rest.
pub trait Plugin: Sized + 'static {
    /// Builds the plugin state from the plugin's own config section, as
    /// TOML text (empty when the config has none). Keep a clone of `host`
    /// to log later. An `Err` stops the worker, and the server reports its
    /// message naming the plugin file.
    fn init(host: &Host, config: &str) -> Result<Self, Error>;

    /// Handles one request, writing the reply payload into `reply`. The
    /// host copies the request id into the reply; the plugin writes only
    /// the payload and chooses the status.
    ///
    /// `Err(e)` clears the reply, writes `e`'s message (cut to the reply's
    /// capacity) and sends [`Status::PLUGIN_ERROR`].
    fn handle(&mut self, req: &Request<'_>, reply: &mut Reply<'_>) -> Result<Status, Error>;

    /// Called once at a clean worker exit, before the state is dropped.
    fn fini(&mut self) {}
}

/// A reply status a plugin may send: [`OK`](Status::OK),
/// [`PLUGIN_ERROR`](Status::PLUGIN_ERROR) or a code of 100 and above.
///
/// Codes 2..100 belong to the server (BUSY, TIMEOUT, ...), so this type
/// cannot hold them. Plugins written in C can return anything; the host
/// turns a reserved or out-of-range status into a `PLUGIN_ERROR` reply
/// whose payload says so.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Status(u16);

impl Status {
    /// Success.
    pub const OK: Status = Status(abi::STATUS_OK);
    /// Failure; the payload is a message for the client.
    pub const PLUGIN_ERROR: Status = Status(abi::STATUS_PLUGIN_ERROR);

    /// A plugin-defined status. `code` must be 100 or above; used in a
    /// `const`, a smaller code is a compile error:
    ///
    /// ```
    /// use halfsync_plugin_api::Status;
    /// const NOT_FOUND: Status = Status::custom(404);
    /// assert_eq!(NOT_FOUND.code(), 404);
    /// ```
    ///
    /// # Panics
    /// If `code < 100` (the panic names the caller's line).
    #[track_caller]
    pub const fn custom(code: u16) -> Status {
        assert!(
            code >= abi::STATUS_FIRST_PLUGIN_CODE,
            "plugin status codes start at 100; 0..100 belong to the server"
        );
        Status(code)
    }

    /// `Some` for 0, 1 and codes of 100 and above, `None` for the codes the
    /// server reserves.
    pub const fn new(code: u16) -> Option<Status> {
        if code <= abi::STATUS_PLUGIN_ERROR || code >= abi::STATUS_FIRST_PLUGIN_CODE {
            Some(Status(code))
        } else {
            None
        }
    }

    /// The code on the wire.
    pub const fn code(self) -> u16 {
        self.0
    }

    /// `true` for [`Status::OK`].
    pub const fn is_ok(self) -> bool {
        self.0 == abi::STATUS_OK
    }
}

impl From<Status> for u16 {
    fn from(status: Status) -> u16 {
        status.0
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Status::OK => f.write_str("Status::OK"),
            Status::PLUGIN_ERROR => f.write_str("Status::PLUGIN_ERROR"),
            Status(code) => write!(f, "Status({code})"),
        }
    }
}

/// One request, borrowed from shared memory for the length of one
/// [`Plugin::handle`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    id: u64,
    command: u16,
    flags: u16,
    payload: &'a [u8],
}

impl<'a> Request<'a> {
    /// A request with these fields; the SDK builds them from the host's,
    /// and tests can build their own.
    pub const fn new(id: u64, command: u16, flags: u16, payload: &'a [u8]) -> Request<'a> {
        Request {
            id,
            command,
            flags,
            payload,
        }
    }

    /// Chosen by the client; the host copies it into the reply.
    pub const fn id(&self) -> u64 {
        self.id
    }

    /// The command number (the HSP/1 `code` field).
    pub const fn command(&self) -> u16 {
        self.command
    }

    /// The HSP/1 `flags` field as the client sent it. halfsync gives it no
    /// meaning and passes it through; clients should send 0 unless a
    /// plugin defines a use for it.
    pub const fn flags(&self) -> u16 {
        self.flags
    }

    /// The request payload.
    pub const fn payload(&self) -> &'a [u8] {
        self.payload
    }
}

/// A log level for [`Host::log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(i32)]
pub enum LogLevel {
    /// Something failed.
    Error = abi::LOG_ERROR,
    /// Something looks wrong.
    Warn = abi::LOG_WARN,
    /// Normal operation worth a line.
    Info = abi::LOG_INFO,
    /// Detail for debugging.
    Debug = abi::LOG_DEBUG,
}

impl LogLevel {
    /// The level for an `HS_LOG_*` value, `None` for anything else.
    pub const fn from_raw(level: i32) -> Option<LogLevel> {
        match level {
            abi::LOG_ERROR => Some(LogLevel::Error),
            abi::LOG_WARN => Some(LogLevel::Warn),
            abi::LOG_INFO => Some(LogLevel::Info),
            abi::LOG_DEBUG => Some(LogLevel::Debug),
            _ => None,
        }
    }
}

/// A reply write or reserve that did not fit; nothing was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyFull {
    /// Bytes the plugin asked to append.
    pub requested: usize,
    /// Bytes that were still free.
    pub remaining: usize,
}

impl fmt::Display for ReplyFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "reply full: {} bytes do not fit in the {} bytes left",
            self.requested, self.remaining
        )
    }
}

impl std::error::Error for ReplyFull {}

/// The longest prefix of `s` that is at most `max` bytes and ends on a
/// character boundary.
pub(crate) fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_accepts_only_plugin_codes() {
        assert_eq!(Status::new(0), Some(Status::OK));
        assert_eq!(Status::new(1), Some(Status::PLUGIN_ERROR));
        for code in 2..100 {
            assert_eq!(Status::new(code), None, "{code}");
        }
        assert_eq!(Status::new(100).map(Status::code), Some(100));
        assert_eq!(Status::new(u16::MAX).map(Status::code), Some(u16::MAX));
        assert_eq!(Status::custom(100).code(), 100);
        assert!(Status::OK.is_ok() && !Status::PLUGIN_ERROR.is_ok());
        assert_eq!(format!("{:?}", Status::custom(404)), "Status(404)");
    }

    #[test]
    #[should_panic(expected = "plugin status codes start at 100")]
    fn custom_status_rejects_server_codes() {
        let _ = Status::custom(std::hint::black_box(7));
    }

    #[test]
    fn log_levels_match_the_header() {
        for raw in [1, 2, 3, 4] {
            assert_eq!(LogLevel::from_raw(raw).map(|l| l as i32), Some(raw));
        }
        assert_eq!(LogLevel::from_raw(0), None);
        assert_eq!(LogLevel::from_raw(5), None);
    }

    #[test]
    fn truncate_str_keeps_characters_whole() {
        assert_eq!(truncate_str("héllo", 10), "héllo");
        assert_eq!(truncate_str("héllo", 2), "h");
        assert_eq!(truncate_str("héllo", 3), "hé");
        assert_eq!(truncate_str("héllo", 0), "");
    }
}
