//! All of the SDK's unsafe code: the safe wrappers over host pointers
//! ([`Host`], [`Reply`]), the `extern "C"` trampolines that
//! [`export_plugin!`](crate::export_plugin) puts in the plugin table, and
//! the in-process host of [`Harness`].
//!
//! The trampolines are the only place where C calls into plugin Rust code,
//! so each one wraps the call in `catch_unwind`: a panic must never unwind
//! into the host (that aborts the worker at best).

use core::ffi::{CStr, c_char, c_void};
use core::mem::size_of;
use core::ptr::{self, NonNull};
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::rc::Rc;
use std::{fmt, io};

use crate::abi::{
    self, ABI_VERSION, FiniFn, HandleFn, HostLogFn, HsHost, HsPlugin, HsReply, HsRequest, InitFn,
};
use crate::sdk::{LogLevel, Plugin, ReplyFull, Request, truncate_str};

// ---------------------------------------------------------------------------
// Host

/// `Some(field)` of the `hs_host` at `$p` (a `*const HsHost`) if the
/// host's struct has it (its `struct_size` covers the field), read through
/// the raw pointer; `None` for a field an older host does not know.
///
/// # Safety
/// `$p` points to a valid `hs_host` of at least its own `struct_size`
/// bytes (which every host's is).
macro_rules! host_field {
    ($p:expr, $field:ident: $ty:ty) => {{
        let p: *const HsHost = $p;
        // Every `hs_host` starts with `abi_version` and `struct_size`.
        let known = (&raw const (*p).struct_size).read() as usize;
        // The field's address is taken only once it is known to exist.
        (known >= core::mem::offset_of!(HsHost, $field) + core::mem::size_of::<$ty>())
            .then(|| (&raw const (*p).$field).read())
    }};
}

/// `error`, `warn`, `info` and `debug`: `log` at that level (for [`Host`]
/// and [`Logger`] alike).
macro_rules! log_levels {
    () => {
        /// Logs at [`LogLevel::Error`].
        pub fn error(&self, msg: &str) {
            self.log(LogLevel::Error, msg);
        }

        /// Logs at [`LogLevel::Warn`].
        pub fn warn(&self, msg: &str) {
            self.log(LogLevel::Warn, msg);
        }

        /// Logs at [`LogLevel::Info`].
        pub fn info(&self, msg: &str) {
            self.log(LogLevel::Info, msg);
        }

        /// Logs at [`LogLevel::Debug`].
        pub fn debug(&self, msg: &str) {
            self.log(LogLevel::Debug, msg);
        }
    };
}

/// The host's services, handed to [`Plugin::init`]: logging, for now.
///
/// Keep a clone in the plugin state to log from `handle` and `fini`.
/// Every clone stops working (logging becomes a no-op) once the plugin's
/// `fini` has run and its state was dropped (logging from the state's
/// `Drop` still works), so a `Host` stashed somewhere that outlives the
/// plugin cannot reach a host that has moved on. Not `Send`: a worker runs
/// its plugin on one thread. To log from threads the plugin starts, take a
/// [`Logger`] ([`Host::logger`]); with the SDK's `log` feature,
/// `Host::forward_log` sends the `log` crate's records too.
#[derive(Clone)]
pub struct Host {
    raw: NonNull<HsHost>,
    /// Cleared by the `fini` trampoline before the state is dropped.
    alive: Rc<Cell<bool>>,
}

impl Host {
    /// # Safety
    /// `raw` must point to an `hs_host` that stays valid, unchanged, until
    /// `alive` is cleared (the header promises "from init until fini").
    pub(crate) unsafe fn from_raw(raw: NonNull<HsHost>, alive: Rc<Cell<bool>>) -> Host {
        Host { raw, alive }
    }

    /// The host's struct, between init and fini. Only a raw pointer: an
    /// older host's struct is shorter than this SDK's `HsHost`, so a
    /// reference to the whole would claim bytes that are not there; fields
    /// are read one by one with [`host_field!`] after a size check.
    fn ptr(&self) -> Option<*const HsHost> {
        self.alive.get().then(|| self.raw.as_ptr().cast_const())
    }

    /// The ABI version the host speaks ([`abi::ABI_VERSION`] for this
    /// SDK's hosts); 0 after `fini`.
    pub fn abi_version(&self) -> u32 {
        // SAFETY: a live host (`ptr`), and every `hs_host` starts with it.
        self.ptr()
            .map_or(0, |p| unsafe { (&raw const (*p).abi_version).read() })
    }

    /// The group of the worker running the plugin (its `[[group]]` name);
    /// `None` on a host older than ABI 1.1, or after `fini`.
    pub fn group(&self) -> Option<String> {
        // SAFETY: a live host (`ptr`).
        let group = unsafe { host_field!(self.ptr()?, group: *const c_char) }?;
        if group.is_null() {
            return None;
        }
        // SAFETY: a host that knows the field sets it to NULL or to a
        // NUL-terminated string valid as long as the host (the header).
        Some(
            unsafe { CStr::from_ptr(group) }
                .to_string_lossy()
                .into_owned(),
        )
    }

    /// The worker's number in its group (0, 1, ...: N in the process title
    /// `halfsync: worker GROUP N`, kept across its restarts); `None` while
    /// the plugin is only test-loaded (`halfsync check`, a reload's
    /// probe), on a host older than ABI 1.1, or after `fini`.
    pub fn worker(&self) -> Option<u32> {
        // SAFETY: a live host (`ptr`).
        let worker = unsafe { host_field!(self.ptr()?, worker: u32) }?;
        (worker != abi::NOT_A_WORKER).then_some(worker)
    }

    /// Logs `msg` through the host's log (in halfsync: `tracing`, target
    /// `plugin`, with the plugin name). A no-op after `fini`.
    pub fn log(&self, level: LogLevel, msg: &str) {
        let Some(p) = self.ptr() else { return };
        // SAFETY: a live host (`ptr`).
        let (Some(Some(log)), Some(ctx)) =
            (unsafe { host_field!(p, log: Option<HostLogFn>) }, unsafe {
                host_field!(p, ctx: *mut c_void)
            })
        else {
            return;
        };
        // SAFETY: the host filled in `log` and `ctx` for exactly this call;
        // `msg` is valid UTF-8 for `msg.len()` bytes and the host does not
        // keep the pointer past the call.
        unsafe { log(ctx, level as i32, msg.as_ptr().cast::<c_char>(), msg.len()) };
    }

    log_levels!();

    /// A handle that logs as [`Host::log`] does, from any thread (it is
    /// `Send`, `Sync` and `Clone`): for threads the plugin starts. Unlike
    /// a `Host`, it keeps working after `fini` (the host's logging lives as
    /// long as the process: a thread still running while the worker exits
    /// can still log). `None` after `fini`.
    ///
    /// ```
    /// # use halfsync_plugin_api::Host;
    /// fn start_flusher(host: &Host) {
    ///     let Some(log) = host.logger() else { return };
    ///     std::thread::spawn(move || log.info("flusher running"));
    /// }
    /// ```
    pub fn logger(&self) -> Option<Logger> {
        let p = self.ptr()?;
        // SAFETY: a live host (`ptr`); fields read after a size check.
        let (Some(Some(log)), Some(ctx)) =
            (unsafe { host_field!(p, log: Option<HostLogFn>) }, unsafe {
                host_field!(p, ctx: *mut c_void)
            })
        else {
            return None;
        };
        Some(Logger { log, ctx })
    }

    /// Sends the records of the [`log`](https://docs.rs/log) crate at
    /// `level` and above to the host's log, as [`Host::log`] does, from
    /// any thread, until `fini` (records after it are dropped). Without
    /// it, `log::info!` in the plugin or in a library it uses goes
    /// nowhere: the plugin's copy of `log` has no logger. For `tracing`,
    /// enable its `log` feature so that its events become `log` records.
    /// Call it in `init`; returns false if another logger was installed
    /// first (the records then go there). Needs the SDK's `log` feature.
    #[cfg(feature = "log")]
    #[cfg_attr(docsrs, doc(cfg(feature = "log")))]
    pub fn forward_log(&self, level: log::LevelFilter) -> bool {
        if self.ptr().is_none() {
            return false;
        }
        log_bridge::install(self.raw, level)
    }
}

/// The host's logging, from any thread ([`Host::logger`]).
#[derive(Clone, Copy)]
pub struct Logger {
    log: HostLogFn,
    ctx: *mut c_void,
}

// SAFETY: the header promises that `hs_host.log` may be called from any
// thread with its `ctx`, and that both stay valid for the life of the
// process; a `Logger` holds nothing else.
unsafe impl Send for Logger {}
// SAFETY: as above: calls through a shared `Logger` are `hs_host.log`
// calls from several threads, which the header allows.
unsafe impl Sync for Logger {}

impl Logger {
    /// Logs `msg` through the host's log.
    pub fn log(&self, level: LogLevel, msg: &str) {
        // SAFETY: the host's own function and context (valid for the life
        // of the process, any thread); `msg` is valid UTF-8 for the call.
        unsafe {
            (self.log)(
                self.ctx,
                level as i32,
                msg.as_ptr().cast::<c_char>(),
                msg.len(),
            )
        };
    }

    log_levels!();
}

impl fmt::Debug for Logger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Logger")
    }
}

/// The `log` crate's records, to the host ([`Host::forward_log`]).
#[cfg(feature = "log")]
mod log_bridge {
    use core::ptr::{self, NonNull};
    use std::sync::atomic::{AtomicPtr, Ordering};

    use crate::abi::{self, HsHost};

    /// The host records go to; null before `forward_log` and after
    /// `fini`. With several plugin instances in one process (unit tests
    /// under `Harness`, each on its own thread), the last to install.
    static HOST: AtomicPtr<HsHost> = AtomicPtr::new(ptr::null_mut());

    std::thread_local! {
        /// The host installed on this thread, which takes this thread's
        /// records first (so each `Harness` test gets its own plugin's).
        static LOCAL: std::cell::Cell<*mut HsHost> = const { std::cell::Cell::new(ptr::null_mut()) };
    }

    struct Bridge;

    impl log::Log for Bridge {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            !HOST.load(Ordering::Acquire).is_null()
        }

        fn log(&self, record: &log::Record<'_>) {
            let local = LOCAL
                .try_with(std::cell::Cell::get)
                .unwrap_or(ptr::null_mut());
            let p = if local.is_null() {
                HOST.load(Ordering::Acquire)
            } else {
                local
            };
            if p.is_null() {
                return;
            }
            // SAFETY: `p` came from a live `Host` in `install`, and an
            // `hs_host` stays valid for the rest of the process (the
            // header's promise; `fini` clearing the pointer only stops
            // records from going there) with a `log` any thread may call.
            let p = p.cast_const();
            // SAFETY: as above; fields read one by one after a size check
            // (an older host's struct is shorter than this SDK's).
            let (Some(Some(log)), Some(ctx)) = (
                unsafe { host_field!(p, log: Option<abi::HostLogFn>) },
                unsafe { host_field!(p, ctx: *mut core::ffi::c_void) },
            ) else {
                return;
            };
            let level = match record.level() {
                log::Level::Error => abi::LOG_ERROR,
                log::Level::Warn => abi::LOG_WARN,
                log::Level::Info => abi::LOG_INFO,
                log::Level::Debug | log::Level::Trace => abi::LOG_DEBUG,
            };
            let msg = format!("{}: {}", record.target(), record.args());
            // SAFETY: as in `Host::log`: the host's own function and
            // context, a valid UTF-8 message for the call's duration.
            unsafe { log(ctx, level, msg.as_ptr().cast(), msg.len()) };
        }

        fn flush(&self) {}
    }

    static BRIDGE: Bridge = Bridge;

    pub(super) fn install(host: NonNull<HsHost>, level: log::LevelFilter) -> bool {
        let _ = LOCAL.try_with(|l| l.set(host.as_ptr()));
        HOST.store(host.as_ptr(), Ordering::Release);
        let ours = log::set_logger(&BRIDGE).is_ok()
            || ptr::addr_eq(log::logger(), &BRIDGE as &dyn log::Log);
        if ours {
            log::set_max_level(level);
        }
        ours
    }

    /// At `fini` of the plugin whose host it is.
    pub(super) fn uninstall(host: NonNull<HsHost>) {
        let _ = LOCAL.try_with(|l| {
            if l.get() == host.as_ptr() {
                l.set(ptr::null_mut());
            }
        });
        let _ = HOST.compare_exchange(
            host.as_ptr(),
            ptr::null_mut(),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field("abi_version", &self.abi_version())
            .field("alive", &self.alive.get())
            .finish()
    }
}

// ---------------------------------------------------------------------------
// Reply

/// The reply payload under construction, for one [`Plugin::handle`] call.
///
/// In halfsync the first 64 KiB go straight into the reply ring in shared
/// memory, with no copy after `handle` returns; a longer reply goes on in
/// the worker's memory and is copied into the ring once, after. The
/// payload can hold at most
/// [`capacity`](Reply::capacity) bytes; a write or reserve that does not fit
/// writes nothing and returns [`ReplyFull`], and the plugin decides what to
/// do (with `?`, the request fails with a `PLUGIN_ERROR` reply saying so).
///
/// `Reply` also implements [`std::fmt::Write`] and [`std::io::Write`]
/// (both all or nothing per piece: a piece that does not fit writes
/// nothing and fails with the [`ReplyFull`]), so `write!`, serializers and
/// `io::copy` work. With both traits in scope, `write!(reply, ..)` is
/// ambiguous (E0034): import the one you mean, or call
/// `std::fmt::Write::write_fmt(reply, format_args!(..))`.
pub struct Reply<'a> {
    raw: &'a HsReply,
    len: usize,
    capacity: usize,
}

impl<'a> Reply<'a> {
    /// # Safety
    /// `raw` must follow the `hs_reply` contract of the header: `ctx` and
    /// the three functions work together for the whole of `'a`, and the
    /// reply is empty.
    unsafe fn from_raw(raw: &'a HsReply) -> Reply<'a> {
        // A host that knows a shorter hs_reply than ours cannot be written
        // to safely; treat it as a reply with no room.
        let capacity = if raw.struct_size as usize >= size_of::<HsReply>() {
            raw.capacity
        } else {
            0
        };
        Reply {
            raw,
            len: 0,
            capacity,
        }
    }

    /// Most payload bytes this reply can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Payload bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` when nothing has been written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes that can still be written.
    pub fn remaining(&self) -> usize {
        self.capacity - self.len
    }

    fn full(&self, requested: usize) -> ReplyFull {
        ReplyFull {
            requested,
            remaining: self.remaining(),
        }
    }

    /// Appends `data`, all of it or (when it does not fit) none of it.
    pub fn write(&mut self, data: &[u8]) -> Result<(), ReplyFull> {
        if data.is_empty() {
            return Ok(());
        }
        if data.len() > self.remaining() {
            return Err(self.full(data.len()));
        }
        let Some(write) = self.raw.write else {
            return Err(self.full(data.len()));
        };
        // SAFETY: `write` and `ctx` come from the host for this call
        // (contract of `from_raw`); `data` is valid for `data.len()` bytes
        // and the host copies it before returning.
        let rc = unsafe { write(self.raw.ctx, data.as_ptr(), data.len()) };
        if rc != 0 {
            return Err(self.full(data.len()));
        }
        self.len += data.len();
        Ok(())
    }

    /// Appends `len` bytes and returns them, zeroed, for the plugin to
    /// fill in place (e.g. to serialize straight into the reply). Fails
    /// without appending anything when they do not fit.
    pub fn reserve(&mut self, len: usize) -> Result<&mut [u8], ReplyFull> {
        if len == 0 {
            return Ok(&mut []);
        }
        if len > self.remaining() {
            return Err(self.full(len));
        }
        let Some(reserve) = self.raw.reserve else {
            return Err(self.full(len));
        };
        // SAFETY: as in `write`: host function and context for this call.
        let p = unsafe { reserve(self.raw.ctx, len) };
        if p.is_null() {
            return Err(self.full(len));
        }
        self.len += len;
        // The host hands out uninitialised bytes; a `&mut [u8]` over them
        // would be undefined behaviour, so zero them first.
        // SAFETY: the host returned `len` writable bytes that stay valid
        // and unaliased for the rest of the handle call; `&mut self` keeps
        // the plugin from clearing or writing the reply while the slice
        // lives.
        unsafe {
            ptr::write_bytes(p, 0, len);
            Ok(core::slice::from_raw_parts_mut(p, len))
        }
    }

    /// Discards everything written so far.
    pub fn clear(&mut self) {
        if let Some(clear) = self.raw.clear {
            // SAFETY: host function and context for this call, as in
            // `write`.
            unsafe { clear(self.raw.ctx) };
            self.len = 0;
        }
    }

    /// Replaces the payload by as much of `msg` as fits, cut on a
    /// character boundary: the error path of the trampolines.
    fn replace_with_message(&mut self, msg: &str) {
        self.clear();
        let msg = truncate_str(msg, self.remaining());
        // Cannot fail: it fits by construction.
        let _ = self.write(msg.as_bytes());
    }
}

impl fmt::Debug for Reply<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reply")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl fmt::Write for Reply<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        Reply::write(self, s.as_bytes()).map_err(|_| fmt::Error)
    }
}

impl io::Write for Reply<'_> {
    /// Writes all of `buf`, or nothing and an error of kind `WriteZero`
    /// that carries the [`ReplyFull`] (so `serde_json::to_writer(reply, ..)?`
    /// tells the client "reply full: N bytes do not fit in the M bytes
    /// left", not "failed to write whole buffer").
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Reply::write(self, buf) {
            Ok(()) => Ok(buf.len()),
            Err(full) => Err(io::Error::new(io::ErrorKind::WriteZero, full)),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The table and its trampolines

/// A plugin table that may sit in a `static`.
#[doc(hidden)]
#[repr(transparent)]
pub struct StaticTable(pub HsPlugin);

// SAFETY: the table is never mutated after construction; its pointers are
// to `'static` NUL-terminated strings (checked by `table`) and to functions.
// Sharing raw pointers between threads is harmless: every use of them is
// already an unsafe call with its own contract.
unsafe impl Sync for StaticTable {}

/// Panics (at compile time, in the `static` of `export_plugin!`) unless `s`
/// is NUL-terminated with no other NUL.
const fn assert_c_string(s: &str, what: &str) {
    let b = s.as_bytes();
    if b.is_empty() || b[b.len() - 1] != 0 {
        panic!("{}", what);
    }
    let mut i = 0;
    while i + 1 < b.len() {
        if b[i] == 0 {
            panic!("{}", what);
        }
        i += 1;
    }
}

/// The v1 table for `T`. `name` and `version` must end in one NUL and
/// contain no other (the macro appends it).
#[doc(hidden)]
pub const fn table<T: Plugin>(name: &'static str, version: &'static str) -> StaticTable {
    assert_c_string(name, "plugin name must not contain a NUL byte");
    assert_c_string(version, "plugin version must not contain a NUL byte");
    StaticTable(HsPlugin {
        abi_version: ABI_VERSION,
        struct_size: size_of::<HsPlugin>() as u32,
        name: name.as_ptr().cast::<c_char>(),
        version: version.as_ptr().cast::<c_char>(),
        init: Some(init::<T> as InitFn),
        handle: Some(handle::<T> as HandleFn),
        fini: Some(fini::<T> as FiniFn),
    })
}

/// What the `void *state` of a Rust plugin points to.
struct State<T> {
    host: Host,
    plugin: T,
}

thread_local! {
    /// Set while a trampoline runs plugin code: the panic hook then only
    /// records the panic (for the log line) instead of printing it and a
    /// backtrace to the worker's stderr.
    static IN_PLUGIN_CALL: Cell<bool> = const { Cell::new(false) };
    /// The panic being caught: its message and `file:line:column`.
    static CAUGHT: RefCell<Option<(String, Option<String>)>> = const { RefCell::new(None) };
}

/// A caught panic: its message and, when the hook saw it, where it was.
struct Panicked {
    message: String,
    location: Option<String>,
}

impl Panicked {
    /// `" at src/lib.rs:12:5"`, or nothing: for operator-facing lines.
    fn at(&self) -> String {
        at(self.location.as_deref())
    }
}

/// `" at <location>"`, or nothing without one.
fn at(location: Option<&str>) -> String {
    location.map(|l| format!(" at {l}")).unwrap_or_default()
}

/// The hook that [`guarded`] installs, once, in the plugin's copy of std.
/// Inside a trampoline it records a panic silently (the trampoline reports
/// it). A second one before the first is caught means the process is
/// about to abort (a panic that cannot unwind, e.g. out of an `extern "C"`
/// function of the plugin's): both are printed, on one line and without a
/// backtrace, because symbolizing one can take seconds in a dying worker,
/// which the proxy would then see as a hung request instead of a death.
/// Panics outside trampolines (the plugin's own threads) go to the
/// previous hook.
fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !IN_PLUGIN_CALL.with(Cell::get) {
            previous(info);
            return;
        }
        let message = payload_text(info.payload());
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
        let earlier = CAUGHT.with(|c| c.borrow_mut().replace((message.clone(), location.clone())));
        if let Some((first, first_at)) = earlier {
            eprintln!(
                "plugin panicked{}: {first}; then{}: {message}",
                at(first_at.as_deref()),
                at(location.as_deref())
            );
        }
    }));
}

/// Runs plugin code, catching a panic (see [`install_panic_hook`]; a
/// plugin built with `panic = "abort"` keeps the default hook, whose
/// message is then all there is before the abort).
fn guarded<R>(f: impl FnOnce() -> R) -> Result<R, Panicked> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    if cfg!(panic = "unwind") {
        HOOK.call_once(install_panic_hook);
    }
    let outer = IN_PLUGIN_CALL.with(|c| c.replace(true));
    if !outer {
        // A panic the plugin caught itself leaves a record behind.
        CAUGHT.with(|c| c.borrow_mut().take());
    }
    let result = catch_unwind(AssertUnwindSafe(f));
    IN_PLUGIN_CALL.with(|c| c.set(outer));
    result.map_err(|payload| {
        let location = CAUGHT
            .with(|c| c.borrow_mut().take())
            .and_then(|(_, at)| at);
        Panicked {
            message: panic_message(payload),
            location,
        }
    })
}

/// The text a panic payload carries (`panic!` makes a `&str` or a
/// `String`).
fn payload_text(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(panic payload is not a string)".to_owned()
    }
}

/// The text of a panic payload, dropping the payload without letting a
/// panicking `Drop` escape.
fn panic_message(payload: Box<dyn Any + Send>) -> String {
    let msg = payload_text(&*payload);
    if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(payload))) {
        std::mem::forget(again);
    }
    msg
}

/// Writes `msg` into the host's `err` buffer as a NUL-terminated string,
/// cut to fit.
///
/// # Safety
/// `err` is NULL or valid for writes of `err_cap` bytes.
unsafe fn write_err(err: *mut c_char, err_cap: usize, msg: &str) {
    if err.is_null() || err_cap == 0 {
        return;
    }
    let msg = truncate_str(msg, err_cap - 1);
    // SAFETY: `msg.len() + 1 <= err_cap` bytes, in the buffer the caller
    // vouches for; a fresh Rust string cannot overlap the host's buffer.
    unsafe {
        ptr::copy_nonoverlapping(msg.as_ptr(), err.cast::<u8>(), msg.len());
        *err.add(msg.len()) = 0;
    }
}

/// `hs_plugin.init` for `T`.
///
/// # Safety
/// Called by the host per `halfsync_plugin.h`: `host` valid until `fini`,
/// `config` valid for `config_len` bytes, `state` and `err` writable.
unsafe extern "C" fn init<T: Plugin>(
    host: *const HsHost,
    config: *const c_char,
    config_len: usize,
    state: *mut *mut c_void,
    err: *mut c_char,
    err_cap: usize,
) -> i32 {
    let fail = |msg: &str| {
        // SAFETY: `err`/`err_cap` as the host passed them (fn contract).
        unsafe { write_err(err, err_cap, msg) };
        1
    };
    let (Some(raw_host), false) = (NonNull::new(host.cast_mut()), state.is_null()) else {
        return fail("host passed a NULL host or state pointer to init");
    };
    let config: &[u8] = if config.is_null() || config_len == 0 {
        &[]
    } else {
        // SAFETY: the host passes `config_len` readable bytes (fn contract)
        // that stay valid for the call.
        unsafe { core::slice::from_raw_parts(config.cast::<u8>(), config_len) }
    };
    let config = match core::str::from_utf8(config) {
        Ok(config) => config,
        Err(e) => return fail(&format!("config is not valid UTF-8: {e}")),
    };
    let alive = Rc::new(Cell::new(true));
    // SAFETY: the host keeps `*host` valid until fini (fn contract), and the
    // `fini` trampoline clears `alive` first thing.
    let host = unsafe { Host::from_raw(raw_host, alive) };
    let result = guarded(|| T::init(&host, config).map_err(|e| e.to_string()));
    match result {
        Ok(Ok(plugin)) => {
            let boxed = Box::new(State { host, plugin });
            // SAFETY: `state` is non-NULL (checked above) and writable (fn
            // contract).
            unsafe { *state = Box::into_raw(boxed).cast::<c_void>() };
            0
        }
        Ok(Err(msg)) => {
            host.alive.set(false);
            fail(&msg)
        }
        Err(p) => {
            host.alive.set(false);
            fail(&format!("plugin panicked: {}{}", p.message, p.at()))
        }
    }
}

/// `hs_plugin.handle` for `T`.
///
/// # Safety
/// Called by the host per `halfsync_plugin.h`: `state` from a successful
/// `init::<T>`, `req` and `reply` valid for the call.
unsafe extern "C" fn handle<T: Plugin>(
    state: *mut c_void,
    req: *const HsRequest,
    reply: *mut HsReply,
) -> i32 {
    let plugin_error = i32::from(abi::STATUS_PLUGIN_ERROR);
    if reply.is_null() {
        return plugin_error;
    }
    // SAFETY: non-NULL, and the host keeps the reply valid and follows its
    // contract for the whole call (fn contract).
    let mut reply = unsafe { Reply::from_raw(&*reply) };
    if state.is_null() || req.is_null() {
        reply.replace_with_message("host passed a NULL state or request to handle");
        return plugin_error;
    }
    // SAFETY: `state` came from `Box::into_raw` in `init::<T>` and nothing
    // else uses it during this call (the host is single-threaded and does
    // not re-enter).
    let state = unsafe { &mut *state.cast::<State<T>>() };
    // SAFETY: non-NULL and valid for the call (fn contract).
    let req = unsafe { &*req };
    let payload: &[u8] = if req.payload.is_null() || req.payload_len == 0 {
        &[]
    } else {
        // SAFETY: the host passes `payload_len` readable bytes that stay
        // valid and unchanged for the call.
        unsafe { core::slice::from_raw_parts(req.payload, req.payload_len) }
    };
    let request = Request::new(req.id, req.command, req.flags, payload);
    let plugin = &mut state.plugin;
    let result = guarded(|| {
        plugin
            .handle(&request, &mut reply)
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(Ok(status)) => i32::from(status.code()),
        Ok(Err(msg)) => {
            reply.replace_with_message(&msg);
            plugin_error
        }
        Err(p) => {
            // Decision: the log gets the message and the place; the
            // client only learns that the plugin panicked. A panic's text
            // is the plugin's internals (an `unwrap` on a database error
            // may quote a connection string), not an answer meant for it,
            // as a PHP error stays in the log with display_errors off. An
            // error the plugin returns is its own answer and does go out.
            state.host.error(&format!(
                "plugin panicked: {} (request id {}, command {}){}",
                p.message,
                request.id(),
                request.command(),
                p.at()
            ));
            reply.replace_with_message(PANIC_REPLY);
            plugin_error
        }
    }
}

/// What a client is told when the plugin panicked on its request.
pub(crate) const PANIC_REPLY: &str = "plugin panicked; the server log has its message";

/// `hs_plugin.fini` for `T`.
///
/// # Safety
/// Called once by the host per `halfsync_plugin.h`, with `state` from a
/// successful `init::<T>`, and never again with it.
unsafe extern "C" fn fini<T: Plugin>(state: *mut c_void) {
    if state.is_null() {
        return;
    }
    // SAFETY: `state` came from `Box::into_raw` in `init::<T>` and the host
    // gives it back exactly once.
    let mut state = unsafe { Box::from_raw(state.cast::<State<T>>()) };
    let host = state.host.clone();
    let result = guarded(move || {
        state.plugin.fini();
        drop(state);
    });
    if let Err(p) = result {
        host.error(&format!("plugin panicked in fini: {}{}", p.message, p.at()));
    }
    #[cfg(feature = "log")]
    log_bridge::uninstall(host.raw);
    host.alive.set(false);
}

// ---------------------------------------------------------------------------
// Harness

/// A host in a test's own process, for unit-testing a plugin through its
/// C table exactly as the worker calls it: the trampolines, `catch_unwind`,
/// the reply capacity and the log callback are the real ones.
///
/// ```
/// use halfsync_plugin_api::testing::Harness;
/// use halfsync_plugin_api::{Error, Host, Plugin, Reply, Request, Status};
///
/// struct Hello;
/// impl Plugin for Hello {
///     fn init(host: &Host, _config: &str) -> Result<Self, Error> {
///         host.info("hello");
///         Ok(Hello)
///     }
///     fn handle(&mut self, _req: &Request<'_>, reply: &mut Reply<'_>) -> Result<Status, Error> {
///         reply.write(b"hi")?;
///         Ok(Status::OK)
///     }
/// }
///
/// let mut h = Harness::of::<Hello>();
/// h.init("").unwrap();
/// assert_eq!(h.handle(7, 1, 0, b"", 64), (0, b"hi".to_vec()));
/// assert_eq!(h.handle(7, 1, 0, b"", 1).0, 1); // does not fit: PLUGIN_ERROR
/// h.fini();
/// ```
///
/// Like the worker, it never frees the `hs_host` it hands out (a few dozen
/// bytes per harness).
pub struct Harness {
    table: &'static HsPlugin,
    host: &'static HsHost,
    logs: &'static std::sync::Mutex<Vec<(LogLevel, String)>>,
    /// `Some` between a successful `init` and `fini`; the inner pointer
    /// may be NULL (a C plugin with no state).
    state: Option<*mut c_void>,
}

/// `hs_host.log` of the harness: appends to its log list.
///
/// # Safety
/// `ctx` is the harness's `Mutex<Vec<..>>`; `msg` valid for `len` bytes.
unsafe extern "C" fn harness_log(ctx: *mut c_void, level: i32, msg: *const c_char, len: usize) {
    let text = if msg.is_null() || len == 0 {
        String::new()
    } else {
        // SAFETY: the plugin passes `len` readable bytes (hs_host.log
        // contract).
        let bytes = unsafe { core::slice::from_raw_parts(msg.cast::<u8>(), len) };
        String::from_utf8_lossy(bytes).into_owned()
    };
    // SAFETY: `ctx` is the leaked `Mutex` of `Harness::from_table`, which
    // lives forever (any thread may log: see `hs_host`).
    let logs = unsafe { &*ctx.cast::<std::sync::Mutex<Vec<(LogLevel, String)>>>() };
    let level = LogLevel::from_raw(level).unwrap_or(LogLevel::Error);
    logs.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((level, text));
}

/// The reply context of the harness: a vector that never grows past its
/// preallocated capacity, so pointers from `reserve` stay valid.
struct VecReply {
    buf: Vec<u8>,
    cap: usize,
}

/// # Safety
/// `ctx` is the `VecReply` of the running `Harness::handle`; `data` valid
/// for `len` bytes.
unsafe extern "C" fn vec_write(ctx: *mut c_void, data: *const u8, len: usize) -> i32 {
    // SAFETY: fn contract; the harness does not touch the VecReply while
    // the plugin runs.
    let out = unsafe { &mut *ctx.cast::<VecReply>() };
    if len > out.cap - out.buf.len() {
        return -1;
    }
    if len > 0 {
        // SAFETY: `data` is readable for `len` bytes (fn contract).
        out.buf
            .extend_from_slice(unsafe { core::slice::from_raw_parts(data, len) });
    }
    0
}

/// # Safety
/// As [`vec_write`].
unsafe extern "C" fn vec_reserve(ctx: *mut c_void, len: usize) -> *mut u8 {
    // SAFETY: as in `vec_write`.
    let out = unsafe { &mut *ctx.cast::<VecReply>() };
    if len > out.cap - out.buf.len() {
        return ptr::null_mut();
    }
    let start = out.buf.len();
    // Within the preallocated capacity: no reallocation, so earlier
    // reserved pointers stay valid.
    out.buf.resize(start + len, 0);
    out.buf[start..].as_mut_ptr()
}

/// # Safety
/// As [`vec_write`].
unsafe extern "C" fn vec_clear(ctx: *mut c_void) {
    // SAFETY: as in `vec_write`.
    unsafe { &mut *ctx.cast::<VecReply>() }.buf.clear();
}

impl Harness {
    /// A harness for the table [`export_plugin!`](crate::export_plugin)
    /// would generate for `T` (named `harness`).
    pub fn of<T: Plugin>() -> Harness {
        let table: &'static StaticTable = Box::leak(Box::new(table::<T>("harness\0", "0\0")));
        // SAFETY: the SDK's own table for `T` follows the header.
        unsafe { Harness::from_table(&table.0) }
    }

    /// The same harness, telling the plugin it runs as worker `worker` of
    /// group `group` ([`Host::group`], [`Host::worker`]); `None` plays a
    /// host that does not say (no group; no worker, as while `halfsync
    /// check` test-loads the plugin). The default is group `harness`,
    /// worker 0. Call it before [`Harness::init`].
    ///
    /// ```
    /// # use halfsync_plugin_api::{testing::Harness, *};
    /// # struct P;
    /// # impl Plugin for P {
    /// #     fn init(host: &Host, _: &str) -> Result<Self, Error> {
    /// #         assert_eq!(host.worker(), None);
    /// #         Ok(P)
    /// #     }
    /// #     fn handle(&mut self, _: &Request<'_>, _: &mut Reply<'_>) -> Result<Status, Error> {
    /// #         Ok(Status::OK)
    /// #     }
    /// # }
    /// let mut h = Harness::of::<P>().as_worker(Some("game"), None);
    /// h.init("").unwrap();
    /// ```
    pub fn as_worker(mut self, group: Option<&str>, worker: Option<u32>) -> Harness {
        let group = group.map_or(ptr::null(), |g| {
            let text = std::ffi::CString::new(g.replace('\0', "")).unwrap_or_default();
            Box::leak(text.into_boxed_c_str()).as_ptr()
        });
        self.host = Box::leak(Box::new(HsHost {
            group,
            worker: worker.unwrap_or(abi::NOT_A_WORKER),
            ..*self.host
        }));
        self
    }

    /// A harness for any table, e.g. the one an exported
    /// `halfsync_plugin_v1()` returns.
    ///
    /// # Safety
    /// The table must follow `halfsync_plugin.h`: valid name and version
    /// strings, and functions that keep the contracts written there.
    pub unsafe fn from_table(table: &'static HsPlugin) -> Harness {
        let logs: &'static std::sync::Mutex<Vec<(LogLevel, String)>> = Box::leak(Box::default());
        let host: &'static HsHost = Box::leak(Box::new(HsHost {
            abi_version: ABI_VERSION,
            struct_size: size_of::<HsHost>() as u32,
            ctx: ptr::from_ref(logs).cast_mut().cast::<c_void>(),
            log: Some(harness_log),
            group: c"harness".as_ptr(),
            worker: 0,
            reserved: 0,
        }));
        Harness {
            table,
            host,
            logs,
            state: None,
        }
    }

    /// The name in the table.
    pub fn name(&self) -> String {
        // SAFETY: `from_table`'s contract: a valid NUL-terminated string.
        unsafe { CStr::from_ptr(self.table.name) }
            .to_string_lossy()
            .into_owned()
    }

    /// The version in the table.
    pub fn version(&self) -> String {
        // SAFETY: as in `name`.
        unsafe { CStr::from_ptr(self.table.version) }
            .to_string_lossy()
            .into_owned()
    }

    /// Calls `init` with `config`; `Err` carries the plugin's reason.
    ///
    /// # Panics
    /// If the plugin is already initialised, or the table has no `init`.
    pub fn init(&mut self, config: &str) -> Result<(), String> {
        assert!(self.state.is_none(), "Harness::init called twice");
        let init = self.table.init.expect("plugin table has no init");
        let Ok(config_c) = std::ffi::CString::new(config) else {
            return Err("config contains a NUL byte".to_owned());
        };
        let mut state: *mut c_void = ptr::null_mut();
        let mut err = [0u8; 1024];
        // SAFETY: every pointer is valid for the call: the host struct is
        // leaked (valid forever), the config is NUL-terminated after
        // `config.len()` bytes, `state` and `err` are writable locals.
        let rc = unsafe {
            init(
                self.host,
                config_c.as_ptr(),
                config.len(),
                &mut state,
                err.as_mut_ptr().cast::<c_char>(),
                err.len(),
            )
        };
        if rc == 0 {
            self.state = Some(state);
            Ok(())
        } else {
            let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
            Err(String::from_utf8_lossy(&err[..end]).into_owned())
        }
    }

    /// Calls `handle` with a reply of `capacity` bytes; returns the raw
    /// status the plugin returned and the payload it wrote.
    ///
    /// # Panics
    /// If the plugin is not initialised, or the table has no `handle`.
    pub fn handle(
        &mut self,
        id: u64,
        command: u16,
        flags: u16,
        payload: &[u8],
        capacity: usize,
    ) -> (i32, Vec<u8>) {
        let state = self
            .state
            .expect("Harness::handle needs a successful init, before fini");
        let handle = self.table.handle.expect("plugin table has no handle");
        let mut out = VecReply {
            buf: Vec::with_capacity(capacity),
            cap: capacity,
        };
        let mut reply = HsReply {
            struct_size: size_of::<HsReply>() as u32,
            reserved: 0,
            ctx: ptr::from_mut(&mut out).cast::<c_void>(),
            capacity,
            write: Some(vec_write),
            reserve: Some(vec_reserve),
            clear: Some(vec_clear),
        };
        let req = HsRequest {
            id,
            command,
            flags,
            reserved: 0,
            payload: payload.as_ptr(),
            payload_len: payload.len(),
        };
        // SAFETY: `state` came from this table's `init`; `req` points to
        // `payload`, and `reply` to `out`, both alive and untouched by us
        // until the call returns (`from_table`'s contract covers the
        // plugin's side).
        let status = unsafe { handle(state, &req, &mut reply) };
        (status, out.buf)
    }

    /// Everything the plugin logged so far, oldest first.
    pub fn logs(&self) -> Vec<(LogLevel, String)> {
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Calls `fini` if the plugin is initialised (dropping the harness does
    /// the same).
    pub fn fini(&mut self) {
        let (Some(state), Some(fini)) = (self.state.take(), self.table.fini) else {
            return;
        };
        // SAFETY: `state` came from this table's `init` and is handed back
        // once (`take`).
        unsafe { fini(state) };
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.fini();
    }
}

impl fmt::Debug for Harness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Harness")
            .field("name", &self.name())
            .field("initialised", &self.state.is_some())
            .finish()
    }
}
