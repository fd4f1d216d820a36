//! The halfsync plugin C ABI and the Rust SDK for writing plugins.
//!
//! A halfsync plugin is a shared object that a worker process loads with
//! `dlopen` and calls synchronously, one request at a time. The contract is
//! a small C ABI, shipped as `include/halfsync_plugin.h` and mirrored in
//! [`abi`]: one exported entry symbol, `halfsync_plugin_v1`, returns a
//! table with the ABI version, the plugin's name and version, and three
//! functions, `init`, `handle` and `fini`. Plugins can be written in C
//! against the header, or in Rust with this SDK:
//!
//! - implement [`Plugin`] for your state type;
//! - export it with [`export_plugin!`], in a crate built as a `cdylib`;
//! - read the request from [`Request`], write the reply payload into
//!   [`Reply`] (up to 64 KiB of it goes straight into shared memory) and return a
//!   [`Status`];
//! - log through the [`Host`] handed to `init`.
//!
//! The SDK catches every panic at the C boundary and turns it into an error
//! reply (or an init failure), so a Rust panic is never undefined
//! behaviour, and fails nothing but its own request. What cannot be caught
//! ends the worker, which the server replaces (its request gets
//! `WORKER_DIED`): a build with `panic = "abort"`, a panic while panicking,
//! a stack overflow, running out of memory. [`testing::Harness`]
//! drives a plugin through its C table inside a unit test.
//!
//! ```
//! use halfsync_plugin_api::{Error, Host, Plugin, Reply, Request, Status, export_plugin};
//!
//! /// Replies with the request payload in upper case; command 2 counts.
//! struct Upper {
//!     host: Host,
//!     served: u64,
//! }
//!
//! const UNKNOWN_COMMAND: Status = Status::custom(404);
//!
//! impl Plugin for Upper {
//!     fn init(host: &Host, config: &str) -> Result<Self, Error> {
//!         if !config.trim().is_empty() {
//!             return Err("upper takes no configuration".into());
//!         }
//!         host.info("upper ready");
//!         Ok(Upper { host: host.clone(), served: 0 })
//!     }
//!
//!     fn handle(&mut self, req: &Request<'_>, reply: &mut Reply<'_>) -> Result<Status, Error> {
//!         self.served += 1;
//!         match req.command() {
//!             1 => {
//!                 let out = reply.reserve(req.payload().len())?; // ReplyFull -> PLUGIN_ERROR
//!                 out.copy_from_slice(req.payload());
//!                 out.make_ascii_uppercase();
//!                 Ok(Status::OK)
//!             }
//!             2 => {
//!                 use std::fmt::Write;
//!                 write!(reply, "{}", self.served)?;
//!                 Ok(Status::OK)
//!             }
//!             _ => Ok(UNKNOWN_COMMAND),
//!         }
//!     }
//!
//!     fn fini(&mut self) {
//!         self.host.info(&format!("upper served {} requests", self.served));
//!     }
//! }
//!
//! // Defines `halfsync_plugin_v1`, the symbol the worker looks up.
//! export_plugin!(Upper, name = "upper", version = env!("CARGO_PKG_VERSION"));
//!
//! // In a unit test: drive it through its C table, as the worker does.
//! let mut plugin = halfsync_plugin_api::testing::Harness::of::<Upper>();
//! plugin.init("").unwrap();
//! assert_eq!(plugin.handle(1, 1, 0, b"abc", 1024), (0, b"ABC".to_vec()));
//! assert_eq!(plugin.handle(2, 2, 0, b"", 1024), (0, b"2".to_vec()));
//! assert_eq!(plugin.handle(3, 9, 0, b"", 1024).0, 404);
//! plugin.fini();
//! ```
//!
//! The crate's `Cargo.toml` then needs:
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! halfsync-plugin-api = { path = "..." }
//! ```
//!
//! # Statuses
//!
//! `handle` returns 0 (OK), 1 (PLUGIN_ERROR, payload = message) or a code of
//! 100 and above. [`Status`] cannot hold anything else; a C plugin that
//! returns another value (2..100 belong to the server, and negative or
//! above 65535 do not fit the wire) has its reply replaced by the host with
//! a PLUGIN_ERROR reply naming the bad status.

#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod abi;
mod ffi;
mod sdk;

pub use ffi::{Host, Logger, Reply};
pub use sdk::{Error, LogLevel, Plugin, ReplyFull, Request, Status};

/// Unit-test support: drive a plugin through its C table in-process.
pub mod testing {
    pub use crate::ffi::Harness;
}

/// Used by [`export_plugin!`]; not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::ffi::{StaticTable, table};
}

/// Exports a [`Plugin`] type as this shared object's halfsync plugin.
///
/// ```
/// # use halfsync_plugin_api::{Error, Host, Plugin, Reply, Request, Status};
/// # struct MyPlugin;
/// # impl Plugin for MyPlugin {
/// #     fn init(_: &Host, _: &str) -> Result<Self, Error> { Ok(MyPlugin) }
/// #     fn handle(&mut self, _: &Request<'_>, _: &mut Reply<'_>) -> Result<Status, Error> {
/// #         Ok(Status::OK)
/// #     }
/// # }
/// halfsync_plugin_api::export_plugin!(MyPlugin, name = "my-plugin", version = "1.4.2");
/// ```
///
/// Without `version = ...`, the version is the exporting crate's
/// `CARGO_PKG_VERSION`:
///
/// ```
/// # use halfsync_plugin_api::{Error, Host, Plugin, Reply, Request, Status};
/// # struct MyPlugin;
/// # impl Plugin for MyPlugin {
/// #     fn init(_: &Host, _: &str) -> Result<Self, Error> { Ok(MyPlugin) }
/// #     fn handle(&mut self, _: &Request<'_>, _: &mut Reply<'_>) -> Result<Status, Error> {
/// #         Ok(Status::OK)
/// #     }
/// # }
/// halfsync_plugin_api::export_plugin!(MyPlugin, name = "my-plugin");
/// # // SAFETY: the entry returns its static table.
/// # let version = unsafe { std::ffi::CStr::from_ptr((*halfsync_plugin_v1()).version) };
/// # assert_eq!(version.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
/// ```
///
/// Defines `#[unsafe(no_mangle)] pub extern "C" fn halfsync_plugin_v1()`,
/// returning a static table whose `init`, `handle` and `fini` call the
/// trait methods inside `catch_unwind`. `name` and `version` must be string
/// literals (or macros that expand to one, like `env!`) without NUL bytes.
/// Use it once per shared object.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty, name = $name:expr, version = $version:expr $(,)?) => {
        /// The halfsync plugin entry point (ABI version 1), generated by
        /// `halfsync_plugin_api::export_plugin!`.
        #[unsafe(no_mangle)]
        pub extern "C" fn halfsync_plugin_v1() -> *const $crate::abi::HsPlugin {
            static TABLE: $crate::__private::StaticTable = $crate::__private::table::<$plugin>(
                ::core::concat!($name, "\0"),
                ::core::concat!($version, "\0"),
            );
            &TABLE.0
        }
    };
    ($plugin:ty, name = $name:expr $(,)?) => {
        $crate::export_plugin!(
            $plugin,
            name = $name,
            version = ::core::env!("CARGO_PKG_VERSION")
        );
    };
}

#[cfg(test)]
mod tests;
