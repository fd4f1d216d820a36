//! `#[repr(C)]` mirrors of `include/halfsync_plugin.h`, field for field.
//!
//! This module is the contract between the host (the halfsync worker) and a
//! plugin; the C header is its other spelling and a test compiles a C
//! program against the header to check that sizes and offsets agree. Plugin
//! authors writing Rust should not need anything here: the SDK in the crate
//! root builds the table and wraps these pointers in safe types.
//!
//! Every pointer in these structs is owned by the side that filled it in;
//! the comments say for how long it stays valid.

use core::ffi::{c_char, c_void};

/// The ABI major version this crate speaks (`HALFSYNC_ABI_VERSION`).
pub const ABI_VERSION: u32 = 1;
/// `HALFSYNC_ABI_MINOR`: the revision of ABI 1 this crate describes (1:
/// `hs_host.group` and `hs_host.worker`). Fields are only appended.
pub const ABI_MINOR: u32 = 1;

/// Name of the entry symbol, NUL-terminated, for `dlsym`
/// (`HALFSYNC_PLUGIN_ENTRY`). The name carries [`ABI_VERSION`].
pub const ENTRY_SYMBOL: &[u8] = b"halfsync_plugin_v1\0";

/// [`ENTRY_SYMBOL`] without the NUL, for messages.
pub const ENTRY_NAME: &str = "halfsync_plugin_v1";

/// Reply status: success (`HS_STATUS_OK`).
pub const STATUS_OK: u16 = 0;
/// Reply status: the plugin reported a failure and the payload is the
/// message (`HS_STATUS_PLUGIN_ERROR`).
pub const STATUS_PLUGIN_ERROR: u16 = 1;
/// The first status a plugin may use for its own purposes
/// (`HS_STATUS_FIRST_PLUGIN_CODE`). Codes `2..100` belong to the server;
/// a plugin that returns one of them, a negative value or a value above
/// `u16::MAX` has its reply replaced by a [`STATUS_PLUGIN_ERROR`] reply.
pub const STATUS_FIRST_PLUGIN_CODE: u16 = 100;

/// Log level `HS_LOG_ERROR`.
pub const LOG_ERROR: i32 = 1;
/// Log level `HS_LOG_WARN`.
pub const LOG_WARN: i32 = 2;
/// Log level `HS_LOG_INFO`.
pub const LOG_INFO: i32 = 3;
/// Log level `HS_LOG_DEBUG`.
pub const LOG_DEBUG: i32 = 4;

/// One request (`hs_request`). The payload points into shared memory and is
/// valid only during the `handle` call that received it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct HsRequest {
    /// Chosen by the client, echoed in the reply by the host.
    pub id: u64,
    /// HSP/1 code field of the request: the command number.
    pub command: u16,
    /// HSP/1 flags field, as the client sent it (halfsync gives it no
    /// meaning).
    pub flags: u16,
    /// Zero.
    pub reserved: u32,
    /// First payload byte: 8-byte aligned and never NULL, even when
    /// `payload_len` is 0 (the header's promise; the SDK still reads a NULL
    /// with length 0 as an empty payload).
    pub payload: *const u8,
    /// Payload length in bytes.
    pub payload_len: usize,
}

/// `hs_reply.write`: append `len` bytes; 0, or -1 with nothing written if
/// the payload would exceed the capacity.
pub type ReplyWriteFn = unsafe extern "C" fn(ctx: *mut c_void, data: *const u8, len: usize) -> i32;
/// `hs_reply.reserve`: append `len` uninitialised bytes and return them, or
/// NULL if the payload would exceed the capacity.
pub type ReplyReserveFn = unsafe extern "C" fn(ctx: *mut c_void, len: usize) -> *mut u8;
/// `hs_reply.clear`: discard everything written so far.
pub type ReplyClearFn = unsafe extern "C" fn(ctx: *mut c_void);

/// The reply under construction (`hs_reply`). Valid only during the
/// `handle` call; bytes written go straight into the reply ring (the
/// first 64 KiB; the host copies a longer reply in after `handle`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct HsReply {
    /// `size_of::<HsReply>()` as the host knows it.
    pub struct_size: u32,
    /// Zero.
    pub reserved: u32,
    /// Host-owned; passed back to the functions below.
    pub ctx: *mut c_void,
    /// Most payload bytes this reply can hold.
    pub capacity: usize,
    /// See [`ReplyWriteFn`].
    pub write: Option<ReplyWriteFn>,
    /// See [`ReplyReserveFn`].
    pub reserve: Option<ReplyReserveFn>,
    /// See [`ReplyClearFn`].
    pub clear: Option<ReplyClearFn>,
}

/// `hs_host.log`: log one UTF-8 message (not NUL-terminated).
pub type HostLogFn =
    unsafe extern "C" fn(ctx: *mut c_void, level: i32, msg: *const c_char, len: usize);

/// Services the host offers the plugin (`hs_host`); valid from `init`
/// until `fini`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct HsHost {
    /// [`ABI_VERSION`] of the host.
    pub abi_version: u32,
    /// `size_of::<HsHost>()` as the host knows it.
    pub struct_size: u32,
    /// Host-owned; passed back to `log`.
    pub ctx: *mut c_void,
    /// See [`HostLogFn`].
    pub log: Option<HostLogFn>,
    /// Since 1.1 (check `struct_size`): the worker's group name,
    /// NUL-terminated, valid as long as the host.
    pub group: *const c_char,
    /// Since 1.1: the worker's number in its group, or [`NOT_A_WORKER`].
    pub worker: u32,
    /// Zero.
    pub reserved: u32,
}

/// `HS_NOT_A_WORKER`: [`HsHost::worker`] while a plugin is test-loaded.
pub const NOT_A_WORKER: u32 = u32::MAX;

/// `hs_plugin.init`: set `*state` (may stay NULL) and return 0, or write a
/// NUL-terminated reason of at most `err_cap` bytes into `err` and return
/// non-zero. `config` is the plugin's TOML section, NUL-terminated, with
/// `config_len` bytes before the NUL.
pub type InitFn = unsafe extern "C" fn(
    host: *const HsHost,
    config: *const c_char,
    config_len: usize,
    state: *mut *mut c_void,
    err: *mut c_char,
    err_cap: usize,
) -> i32;
/// `hs_plugin.handle`: handle one request and return the reply status.
pub type HandleFn =
    unsafe extern "C" fn(state: *mut c_void, req: *const HsRequest, reply: *mut HsReply) -> i32;
/// `hs_plugin.fini`: release the state.
pub type FiniFn = unsafe extern "C" fn(state: *mut c_void);

/// The table a plugin's entry function returns (`hs_plugin`). It must live
/// for the life of the process.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct HsPlugin {
    /// Must be [`ABI_VERSION`].
    pub abi_version: u32,
    /// `size_of::<HsPlugin>()` as the plugin knows it.
    pub struct_size: u32,
    /// NUL-terminated plugin name, for logs.
    pub name: *const c_char,
    /// NUL-terminated plugin version, for logs and status.
    pub version: *const c_char,
    /// Required; see [`InitFn`].
    pub init: Option<InitFn>,
    /// Required; see [`HandleFn`].
    pub handle: Option<HandleFn>,
    /// Optional; see [`FiniFn`].
    pub fini: Option<FiniFn>,
}

/// The entry function's type (`hs_plugin_entry_fn`), exported under
/// [`ENTRY_SYMBOL`].
pub type EntryFn = unsafe extern "C" fn() -> *const HsPlugin;
