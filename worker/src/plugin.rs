//! Loading a plugin shared object and calling it: the host side of
//! `halfsync_plugin.h`.
//!
//! [`Plugin::load`] opens the file with `dlopen(RTLD_NOW | RTLD_LOCAL)`, so
//! a missing symbol fails here and not at the first request, finds the
//! entry symbol `halfsync_plugin_v1` and checks the table it returns
//! (version, size, functions). Every failure is a [`LoadError`] whose
//! message names the file, says what is wrong and how to fix it. The
//! library is **never unloaded** (unloading a Rust `cdylib` is unsound, and
//! a new plugin version means new worker processes), so the table and every
//! pointer in it live for the rest of the process.
//!
//! [`Plugin::init`] hands the plugin its config section and a host whose
//! `log` forwards to `tracing` (target `plugin`, field `plugin` = the
//! plugin's name), giving an [`Instance`]. [`Instance::handle`] runs one
//! request with the reply payload written straight into a caller-provided
//! buffer; [`Instance::handle_split`], which the worker uses, lets that
//! buffer (a 64 KiB region reserved in the reply ring in shared memory) be
//! smaller than the reply may grow, and continues a longer reply in a heap
//! buffer, so only replies past 64 KiB are copied.
//!
//! All of this module's unsafe code is the calls across the C boundary and
//! the three reply callbacks the plugin calls back into.

use std::ffi::{CStr, CString, c_char, c_void};
use std::mem::{ManuallyDrop, size_of};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::{fmt, io, ptr};

use halfsync_plugin_api::abi::{
    self, ABI_VERSION, ENTRY_NAME, ENTRY_SYMBOL, EntryFn, HsHost, HsPlugin, HsReply, HsRequest,
};
use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};

/// The largest init error message a plugin can report, NUL included.
const INIT_ERR_CAP: usize = 4096;

/// Other ABI versions probed when the v1 entry is missing, to say which one
/// the plugin was built for.
const PROBED_VERSIONS: std::ops::RangeInclusive<u32> = 0..=9;

/// Why a plugin file could not be loaded. Every message names the file, the
/// reason and the fix, on one line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// No file at the path.
    #[error(
        "plugin {}: file not found; build it or fix `plugin` in the config (a bare name \
         like \"farm\" means libfarm.so next to the halfsync binary; other relative paths \
         are relative to the config file's directory)",
        path.display()
    )]
    NotFound {
        /// The plugin path as configured.
        path: PathBuf,
    },
    /// Something that is not a regular file is at the path (a FIFO, which
    /// dlopen would block on, a directory, a device).
    #[error(
        "plugin {}: not a regular file ({kind}); point `plugin` at the .so file",
        path.display()
    )]
    NotAFile {
        /// The plugin path as configured.
        path: PathBuf,
        /// What is there instead.
        kind: &'static str,
    },
    /// The file exists but cannot be examined.
    #[error("plugin {}: cannot read: {source}; check the path and its permissions", path.display())]
    Unreadable {
        /// The plugin path as configured.
        path: PathBuf,
        /// What `stat` said.
        source: io::Error,
    },
    /// `dlopen` failed: not a shared object, wrong machine, a missing
    /// library, an undefined symbol (`RTLD_NOW`), ...
    #[error("plugin {}: cannot load: {reason}; {}", path.display(), open_hint(reason))]
    Open {
        /// The plugin path as configured.
        path: PathBuf,
        /// `dlerror()`'s text, without the file name it usually starts with.
        reason: String,
    },
    /// No `halfsync_plugin_v1` symbol.
    #[error("plugin {}: {}", path.display(), NoEntryReason(*other_version))]
    NoEntry {
        /// The plugin path as configured.
        path: PathBuf,
        /// The highest other `halfsync_plugin_vN` (N in 0..=9) the file
        /// exports, if any: it was built for that ABI.
        other_version: Option<u32>,
    },
    /// The entry returned NULL.
    #[error(
        "plugin {}: entry `{ENTRY_NAME}` returned NULL; the plugin is broken: its entry must \
         return a pointer to its static table",
        path.display()
    )]
    NullTable {
        /// The plugin path as configured.
        path: PathBuf,
    },
    /// The entry returned a pointer not aligned for `hs_plugin`.
    #[error(
        "plugin {}: entry `{ENTRY_NAME}` returned a misaligned table pointer; the plugin is \
         broken: its entry must return a pointer to its static table",
        path.display()
    )]
    MisalignedTable {
        /// The plugin path as configured.
        path: PathBuf,
    },
    /// The table's `abi_version` is not ours.
    #[error(
        "plugin {}: ABI version {found} in its table, this halfsync speaks {ABI_VERSION}: \
         rebuild against this halfsync's plugin-api",
        path.display()
    )]
    AbiMismatch {
        /// The plugin path as configured.
        path: PathBuf,
        /// The table's `abi_version`.
        found: u32,
    },
    /// The table's `struct_size` is smaller than a v1 table.
    #[error(
        "plugin {}: table too small ({size} bytes, need {need}); rebuild it against this \
         halfsync's plugin-api (halfsync_plugin.h)",
        path.display()
    )]
    TableTooSmall {
        /// The plugin path as configured.
        path: PathBuf,
        /// The table's `struct_size`.
        size: u32,
        /// `sizeof(hs_plugin)` of ABI v1.
        need: usize,
    },
    /// A required function (`init`, `handle`) is NULL in the table.
    #[error(
        "plugin {}: table has no `{function}` function (NULL); the plugin must set it",
        path.display()
    )]
    MissingFunction {
        /// The plugin path as configured.
        path: PathBuf,
        /// The table field.
        function: &'static str,
    },
}

impl LoadError {
    /// The plugin file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            LoadError::NotFound { path }
            | LoadError::NotAFile { path, .. }
            | LoadError::Unreadable { path, .. }
            | LoadError::Open { path, .. }
            | LoadError::NoEntry { path, .. }
            | LoadError::NullTable { path }
            | LoadError::MisalignedTable { path }
            | LoadError::AbiMismatch { path, .. }
            | LoadError::TableTooSmall { path, .. }
            | LoadError::MissingFunction { path, .. } => path,
        }
    }
}

/// The "how to fix it" part of a `dlopen` failure.
fn open_hint(reason: &str) -> &'static str {
    if reason.contains("undefined symbol") {
        "it uses a symbol that neither it nor the libraries it links provide: link the \
         missing library or rebuild it"
    } else if reason.contains("cannot open shared object file") {
        "a library it needs is not installed or not on the library path"
    } else if reason.contains("ELF") || reason.contains("file too short") {
        "it is not a shared library for this machine: rebuild it"
    } else {
        "check that it is a shared library built for this machine and that the libraries it \
         needs are installed"
    }
}

/// The message of [`LoadError::NoEntry`].
struct NoEntryReason(Option<u32>);

impl fmt::Display for NoEntryReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => write!(
                f,
                "no entry symbol `{ENTRY_NAME}`; it was built for ABI version {v} (it exports \
                 `halfsync_plugin_v{v}`), this halfsync speaks ABI {ABI_VERSION}: rebuild it \
                 against this halfsync's plugin-api"
            ),
            None => write!(
                f,
                "no entry symbol `{ENTRY_NAME}`: not a halfsync plugin (in C, define \
                 `const hs_plugin *{ENTRY_NAME}(void)` from halfsync_plugin.h; in Rust, use \
                 halfsync_plugin_api::export_plugin!)"
            ),
        }
    }
}

/// A plugin's `init` refused to start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InitError {
    /// `init` returned non-zero; `reason` is the text it wrote.
    #[error("plugin {} ({name}): init failed: {}", path.display(), InitReason { code: *code, reason })]
    Failed {
        /// The plugin file.
        path: PathBuf,
        /// The plugin's name from its table.
        name: String,
        /// What `init` returned.
        code: i32,
        /// The plugin's reason (empty if it gave none).
        reason: String,
    },
    /// The config text has a NUL byte, which the C ABI cannot pass.
    #[error(
        "plugin {} ({name}): its config section has a NUL byte at offset {offset}; remove it",
        path.display()
    )]
    ConfigHasNul {
        /// The plugin file.
        path: PathBuf,
        /// The plugin's name from its table.
        name: String,
        /// Byte offset of the NUL in the config text.
        offset: usize,
    },
}

impl InitError {
    /// The plugin's own reason (for [`InitError::Failed`]), else the whole
    /// message.
    pub fn reason(&self) -> String {
        match self {
            InitError::Failed { reason, .. } => reason.clone(),
            other => other.to_string(),
        }
    }
}

/// The reason part of [`InitError::Failed`].
struct InitReason<'a> {
    code: i32,
    reason: &'a str,
}

impl fmt::Display for InitReason<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.reason.is_empty() {
            write!(f, "it returned {} without a reason", self.code)
        } else {
            f.write_str(self.reason)
        }
    }
}

/// A loaded, checked plugin. The shared object stays loaded for the rest of
/// the process, whatever happens to this value.
#[derive(Debug)]
pub struct Plugin {
    table: &'static HsPlugin,
    path: PathBuf,
    name: String,
    version: String,
}

impl Plugin {
    /// Loads the plugin at `path` and checks its table. A bare file name is
    /// taken relative to the current directory, never looked up on the
    /// library path.
    ///
    /// Running the library's initialisers is the one thing this cannot
    /// check: a plugin whose constructors crash takes the process with it,
    /// which is why only workers (and `check` in a child) load plugins.
    pub fn load(path: &Path) -> Result<Plugin, LoadError> {
        match std::fs::metadata(path) {
            Ok(m) if !m.is_file() => {
                use std::os::unix::fs::FileTypeExt;
                let t = m.file_type();
                let kind = if t.is_dir() {
                    "a directory"
                } else if t.is_fifo() {
                    "a FIFO"
                } else if t.is_socket() {
                    "a socket"
                } else {
                    "a device"
                };
                return Err(LoadError::NotAFile {
                    path: path.to_path_buf(),
                    kind,
                });
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(LoadError::NotFound {
                    path: path.to_path_buf(),
                });
            }
            Err(source) => {
                return Err(LoadError::Unreadable {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
        // dlopen searches the library path for a name without a slash.
        let open_path = if path.is_relative() && path.parent() == Some(Path::new("")) {
            Path::new(".").join(path)
        } else {
            path.to_path_buf()
        };
        Self::open(path, &open_path)
    }

    /// Loads the plugin file open on descriptor `fd`, which the master
    /// opened at `path` when the configuration was loaded: every worker of
    /// a configuration runs the same file, whatever was installed at the
    /// path since (until the next reload). Messages name `path`.
    ///
    /// While `path` still names that very file (same device and inode) it
    /// is loaded by `path`, so that `$ORIGIN` in its RUNPATH is its
    /// directory and libraries it ships beside it are found; once another
    /// file was installed there, through the descriptor
    /// (`/proc/self/fd/N`), where `$ORIGIN` is `/proc/self/fd`.
    pub fn load_open(path: &Path, fd: std::os::fd::RawFd) -> Result<Plugin, LoadError> {
        use std::os::unix::fs::MetadataExt;
        let by_fd = PathBuf::from(format!("/proc/self/fd/{fd}"));
        let same = match (std::fs::metadata(path), std::fs::metadata(&by_fd)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if same {
            Self::load(path)
        } else {
            Self::open(path, &by_fd)
        }
    }

    /// dlopens `open_path` (the file, or a name for it) and checks its
    /// table; errors name `path`.
    fn open(path: &Path, open_path: &Path) -> Result<Plugin, LoadError> {
        let owned = || path.to_path_buf();
        // SAFETY: loading runs the library's initialisers, which is the
        // point of a plugin: we trust the file the operator configured. The
        // library is never closed (`ManuallyDrop`), so its code and data,
        // and the table, stay valid for the rest of the process.
        let opened = unsafe { Library::open(Some(open_path.as_os_str()), RTLD_NOW | RTLD_LOCAL) };
        let lib = match opened {
            Ok(lib) => ManuallyDrop::new(lib),
            Err(e) => {
                return Err(LoadError::Open {
                    path: owned(),
                    reason: dlerror_text(&e, open_path),
                });
            }
        };
        // SAFETY: the symbol, if present, is the C entry of the header,
        // `const hs_plugin *(*)(void)`; a plugin that exports it with
        // another type breaks the ABI contract we load it under.
        let entry: Option<EntryFn> = unsafe { lib.get::<EntryFn>(ENTRY_SYMBOL) }.ok().map(|s| *s);
        let Some(entry) = entry else {
            return Err(LoadError::NoEntry {
                path: owned(),
                other_version: other_abi_version(&lib),
            });
        };
        // SAFETY: calling the entry is the ABI; it takes nothing and returns
        // a pointer we check before use.
        let raw = unsafe { entry() };
        if raw.is_null() {
            return Err(LoadError::NullTable { path: owned() });
        }
        if !raw.is_aligned() {
            return Err(LoadError::MisalignedTable { path: owned() });
        }
        // Read the two leading u32s before anything else: a table of
        // another version, or a short one, may not have the rest.
        // SAFETY: non-NULL and aligned; every version of the table starts
        // with `abi_version` and `struct_size`, and it is static data of a
        // library that is never unloaded.
        let (found, size) = unsafe {
            (
                ptr::addr_of!((*raw).abi_version).read(),
                ptr::addr_of!((*raw).struct_size).read(),
            )
        };
        if found != ABI_VERSION {
            return Err(LoadError::AbiMismatch {
                path: owned(),
                found,
            });
        }
        if (size as usize) < size_of::<HsPlugin>() {
            return Err(LoadError::TableTooSmall {
                path: owned(),
                size,
                need: size_of::<HsPlugin>(),
            });
        }
        // SAFETY: a v1 table at least as large as ours, aligned, in a
        // library that is never unloaded and that the ABI says never
        // changes it: a `'static` shared reference is right.
        let table: &'static HsPlugin = unsafe { &*raw };
        for (function, present) in [
            ("init", table.init.is_some()),
            ("handle", table.handle.is_some()),
        ] {
            if !present {
                return Err(LoadError::MissingFunction {
                    path: owned(),
                    function,
                });
            }
        }
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        // SAFETY: the header says NUL-terminated strings that live as long
        // as the table; NULL is handled.
        let name = unsafe { c_str(table.name) }.or(stem).unwrap_or_default();
        // SAFETY: as for `name`.
        let version = unsafe { c_str(table.version) }.unwrap_or_default();
        tracing::debug!(plugin = %name, %version, path = %path.display(), "plugin loaded");
        Ok(Plugin {
            table,
            path: owned(),
            name,
            version,
        })
    }

    /// The plugin's name, from its table (the file stem if it gave none).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugin's version, from its table (empty if it gave none).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The file it was loaded from, as given to [`Plugin::load`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Calls the plugin's `init` with its config section (TOML text) and
    /// returns the initialised instance. In production a worker calls this
    /// once; calling it again gives another instance, which a plugin with
    /// global state may not expect.
    ///
    /// The `hs_host` the plugin receives (and may keep) is never freed.
    /// It names no group and no worker ([`Plugin::init_as`] does).
    pub fn init(&self, config_toml: &str) -> Result<Instance, InitError> {
        self.init_as(config_toml, "", abi::NOT_A_WORKER)
    }

    /// [`Plugin::init`], telling the plugin (`hs_host.group`, `.worker`)
    /// which group it serves and which worker of it this is
    /// ([`abi::NOT_A_WORKER`] for a test load); an empty `group` is none.
    pub fn init_as(
        &self,
        config_toml: &str,
        group: &str,
        worker: u32,
    ) -> Result<Instance, InitError> {
        let config = CString::new(config_toml).map_err(|e| InitError::ConfigHasNul {
            path: self.path.clone(),
            name: self.name.clone(),
            offset: e.nul_position(),
        })?;
        let (host, host_ctx) = leak_host(&self.name, group, worker);
        let init = self.table.init.expect("checked at load");
        let mut state: *mut c_void = ptr::null_mut();
        let mut err = vec![0u8; INIT_ERR_CAP];
        // SAFETY: per the header: `host` is leaked, so valid "until fini"
        // and beyond; `config` is NUL-terminated after `config_toml.len()`
        // bytes and lives across the call; `state` and `err` are writable
        // for the sizes given.
        let code = unsafe {
            init(
                host,
                config.as_ptr(),
                config_toml.len(),
                &mut state,
                err.as_mut_ptr().cast::<c_char>(),
                err.len(),
            )
        };
        if code != 0 {
            // Never trust the plugin to have NUL-terminated it.
            let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
            return Err(InitError::Failed {
                path: self.path.clone(),
                name: self.name.clone(),
                code,
                reason: String::from_utf8_lossy(&err[..end]).trim_end().to_owned(),
            });
        }
        Ok(Instance {
            table: self.table,
            state,
            host: host_ctx,
            cells: Box::leak(
                (0..REPLY_CELLS)
                    .map(|_| {
                        let mut ctx = ReplyCtx::new(&mut [], ptr::null_mut(), 0);
                        *ctx.live.get_mut() = false;
                        ReplyCell {
                            raw: HsReply {
                                struct_size: size_of::<HsReply>() as u32,
                                reserved: 0,
                                ctx: ptr::null_mut(),
                                capacity: 0,
                                write: Some(reply_write),
                                reserve: Some(reply_reserve),
                                clear: Some(reply_clear),
                            },
                            ctx,
                        }
                    })
                    .collect::<Box<[ReplyCell]>>(),
            )
            .as_mut_ptr(),
            next_cell: 0,
        })
    }
}

/// Reads a NUL-terminated string from a plugin table, lossily.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string.
unsafe fn c_str(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-NULL and NUL-terminated (fn contract).
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// `dlerror()`'s text, minus the `<path>: ` it starts with (the message
/// names the file already).
fn dlerror_text(e: &libloading::Error, opened: &Path) -> String {
    let text = std::error::Error::source(e).map_or_else(|| e.to_string(), ToString::to_string);
    let prefix = format!("{}: ", opened.display());
    text.strip_prefix(&prefix)
        .map_or_else(|| text.clone(), str::to_owned)
}

/// The highest `halfsync_plugin_vN` other than ours that `lib` exports.
fn other_abi_version(lib: &Library) -> Option<u32> {
    PROBED_VERSIONS
        .rev()
        .filter(|&v| v != ABI_VERSION)
        .find(|v| {
            let symbol = format!("halfsync_plugin_v{v}\0");
            // SAFETY: we only test whether the symbol exists, as an opaque
            // address; nothing is called or read through it.
            unsafe { lib.get::<*const c_void>(symbol.as_bytes()) }.is_ok()
        })
}

// ---------------------------------------------------------------------------
// Host services

/// What `hs_host.ctx` points to.
#[derive(Debug)]
struct HostCtx {
    plugin: String,
    /// The span `init` ran in (the worker's: group, number, pid), entered
    /// around every line the plugin logs, so that a line logged from a
    /// thread the plugin started names its worker too.
    span: tracing::Span,
    /// [`halfsync_config::PLUGIN_LINES_PER_SECOND`] (a Mutex: a C
    /// plugin's own threads may log too).
    budget: std::sync::Mutex<halfsync_config::LineBudget>,
    /// Lines the budget dropped, reported so far.
    dropped: std::sync::atomic::AtomicU64,
}

impl HostCtx {
    /// Logs how many lines the budget dropped, if any, and counts them.
    fn report(&self, dropped: u64) {
        if dropped > 0 {
            self.dropped
                .fetch_add(dropped, std::sync::atomic::Ordering::Relaxed);
            let plugin = self.plugin.as_str();
            tracing::warn!(
                target: "plugin",
                plugin,
                "{dropped} more plugin log lines dropped (more than {} a second from one worker)",
                halfsync_config::PLUGIN_LINES_PER_SECOND
            );
        }
    }
}

/// A fresh `hs_host` for one plugin instance, leaked: the plugin may keep
/// it "until fini", and a plugin that misbehaves after fini must still not
/// reach freed memory. One per `init`, i.e. one per worker process.
fn leak_host(plugin: &str, group: &str, worker: u32) -> (&'static HsHost, &'static HostCtx) {
    // (Group names are `[A-Za-z0-9_-]`: no NUL; one would make it none.)
    let group: *const c_char = match CString::new(group) {
        Ok(name) if !group.is_empty() => Box::leak(name.into_boxed_c_str()).as_ptr(),
        _ => ptr::null(),
    };
    let ctx: &'static HostCtx = Box::leak(Box::new(HostCtx {
        plugin: plugin.to_owned(),
        span: tracing::Span::current(),
        budget: std::sync::Mutex::new(halfsync_config::LineBudget::new(
            halfsync_config::PLUGIN_LINES_PER_SECOND,
        )),
        dropped: std::sync::atomic::AtomicU64::new(0),
    }));
    let host = Box::leak(Box::new(HsHost {
        abi_version: ABI_VERSION,
        struct_size: size_of::<HsHost>() as u32,
        ctx: ptr::from_ref(ctx).cast_mut().cast::<c_void>(),
        log: Some(host_log),
        group,
        worker,
        reserved: 0,
    }));
    (host, ctx)
}

/// The most of one plugin log message that is logged; the rest is cut
/// (said on the line). With the line budget, it bounds what a plugin can
/// write to the log a second (journald cuts at 48 KiB).
pub const LOG_MESSAGE_MAX: usize = 16 << 10;

/// `hs_host.log`: forwards to `tracing`, target `plugin`.
///
/// # Safety
/// `ctx` is the `HostCtx` of `leak_host`; `msg` is NULL or readable for
/// `len` bytes.
unsafe extern "C" fn host_log(ctx: *mut c_void, level: i32, msg: *const c_char, len: usize) {
    let bytes: &[u8] = if msg.is_null() || len == 0 {
        &[]
    } else {
        // SAFETY: readable for `len` bytes for the call (fn contract).
        unsafe { std::slice::from_raw_parts(msg.cast::<u8>(), len) }
    };
    // SAFETY: `ctx` is the leaked, immutable `HostCtx` (fn contract).
    let host = unsafe { &*ctx.cast::<HostCtx>() };
    let plugin = host.plugin.as_str();
    // A panicking subscriber must not unwind into C (that would abort).
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let _worker = host.span.enter();
        // Lines the level filter drops anyway do not use up the budget.
        let enabled = match level {
            i32::MIN..=abi::LOG_ERROR => tracing::enabled!(target: "plugin", tracing::Level::ERROR),
            abi::LOG_WARN => tracing::enabled!(target: "plugin", tracing::Level::WARN),
            abi::LOG_INFO => tracing::enabled!(target: "plugin", tracing::Level::INFO),
            abi::LOG_DEBUG => tracing::enabled!(target: "plugin", tracing::Level::DEBUG),
            _ => tracing::enabled!(target: "plugin", tracing::Level::TRACE),
        };
        if !enabled {
            return;
        }
        let (admitted, dropped) = host
            .budget
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(std::time::Instant::now());
        host.report(dropped);
        if !admitted {
            return;
        }
        let kept = &bytes[..bytes.len().min(LOG_MESSAGE_MAX)];
        let raw = String::from_utf8_lossy(kept);
        // One line: a plugin's message cannot forge other log lines.
        let mut text = halfsync_config::one_line(&raw);
        if kept.len() < bytes.len() {
            text.push_str(&format!(
                " [message cut at {LOG_MESSAGE_MAX} bytes; {} more dropped]",
                bytes.len() - kept.len()
            ));
        }
        match level {
            i32::MIN..=abi::LOG_ERROR => tracing::error!(target: "plugin", plugin, "{text}"),
            abi::LOG_WARN => tracing::warn!(target: "plugin", plugin, "{text}"),
            abi::LOG_INFO => tracing::info!(target: "plugin", plugin, "{text}"),
            abi::LOG_DEBUG => tracing::debug!(target: "plugin", plugin, "{text}"),
            _ => tracing::trace!(target: "plugin", plugin, "{text}"),
        }
    }));
}

/// What `hs_reply.ctx` points to during one `Instance::handle_split`.
///
/// The reply's bytes `[0, split)` are in `buf` (the reservation in the
/// reply ring) and `[split, len)` in `spill` at the same offsets. `split`
/// is `NO_SPLIT` until a write does not fit in `buf`; from then on every
/// byte goes to `spill`, so pointers handed out earlier stay valid.
struct ReplyCtx {
    /// Set while the `handle` call it was made for runs: the reply
    /// functions refuse a context that is not (a plugin writing through a
    /// reply it kept after `handle` returned).
    live: std::sync::atomic::AtomicBool,
    buf: *mut u8,
    cap: usize,
    len: usize,
    /// Most payload bytes the reply may have (what the plugin is told).
    capacity: usize,
    spill: *mut Vec<u8>,
    split: usize,
}

const NO_SPLIT: usize = usize::MAX;

impl ReplyCtx {
    /// An empty reply into `out`, told it may grow to `capacity` (at least
    /// `out.len()`), continuing in `spill` past `out`.
    fn new(out: &mut [u8], spill: *mut Vec<u8>, capacity: usize) -> ReplyCtx {
        ReplyCtx {
            live: std::sync::atomic::AtomicBool::new(true),
            buf: out.as_mut_ptr(),
            cap: out.len(),
            len: 0,
            capacity,
            spill,
            split: NO_SPLIT,
        }
    }

    /// Where the next `n` bytes of the reply go (the caller checked they
    /// are within `capacity`).
    fn next(&mut self, n: usize) -> *mut u8 {
        if self.split == NO_SPLIT && n <= self.cap - self.len {
            // SAFETY: `len + n <= cap`: inside (or one past) `buf`.
            return unsafe { self.buf.add(self.len) };
        }
        self.next_spilled()
    }

    /// [`ReplyCtx::next`] once the reply has outgrown `buf`.
    #[cold]
    #[inline(never)]
    fn next_spilled(&mut self) -> *mut u8 {
        // SAFETY: `spill` points to the `Vec` lent to `handle_split`, which
        // no one else touches while the plugin runs. (`handle` leaves it
        // null, but there `capacity == cap`, so no call gets this far.)
        let spill = unsafe { &mut *self.spill };
        if self.split == NO_SPLIT {
            self.split = self.len;
            if spill.len() < self.capacity {
                // Only here: no pointer into `spill` has been handed out
                // yet in this call, so reallocating it is harmless.
                spill.resize(self.capacity, 0);
            }
        }
        // SAFETY: `len + n <= capacity <= spill.len()` (the caller checked
        // `n` against `capacity`).
        unsafe { spill.as_mut_ptr().add(self.len) }
    }
}

/// The reply context `ctx` names, if its `handle` call is still running.
///
/// # Safety
/// `ctx` is null or points to the `ctx` of one of an `Instance`'s reply
/// cells (leaked, so always valid). The host reaches the cells through
/// raw pointers only, so while a cell is live (its `handle` call runs)
/// nothing else refers to it; a dead one is only read, its `live` flag.
unsafe fn live_reply<'a>(ctx: *mut c_void) -> Option<&'a mut ReplyCtx> {
    let r = ctx.cast::<ReplyCtx>();
    if r.is_null() {
        return None;
    }
    // SAFETY: `r` points to a valid `ReplyCtx` (fn contract); only its
    // atomic flag is read, through a shared reference.
    let live = unsafe { &(*r).live };
    if !live.load(std::sync::atomic::Ordering::Acquire) {
        return None;
    }
    // SAFETY: live: its call runs, and the host holds no reference to it
    // meanwhile (fn contract).
    Some(unsafe { &mut *r })
}

/// `hs_reply.write`.
///
/// # Safety
/// `ctx` is the `ReplyCtx` of the running `Instance::handle_split`; `data`
/// is readable for `len` bytes (it may point into the reply itself).
unsafe extern "C" fn reply_write(ctx: *mut c_void, data: *const u8, len: usize) -> i32 {
    // SAFETY: fn contract; `Instance::handle_split` holds no reference to
    // the context while the plugin runs.
    let Some(r) = (unsafe { live_reply(ctx) }) else {
        return -1;
    };
    if len > r.capacity - r.len {
        return -1;
    }
    if len > 0 {
        if data.is_null() {
            return -1;
        }
        let dst = r.next(len);
        // SAFETY: `dst` has room for `len` bytes (`ReplyCtx::next`); `data`
        // is readable for `len` (fn contract); `copy` allows the overlap
        // of a plugin writing bytes from its own reply.
        unsafe { ptr::copy(data, dst, len) };
        r.len += len;
    }
    0
}

/// `hs_reply.reserve`.
///
/// # Safety
/// As [`reply_write`].
unsafe extern "C" fn reply_reserve(ctx: *mut c_void, len: usize) -> *mut u8 {
    // SAFETY: as in `reply_write`.
    let Some(r) = (unsafe { live_reply(ctx) }) else {
        return ptr::null_mut();
    };
    if len > r.capacity - r.len {
        return ptr::null_mut();
    }
    let p = r.next(len);
    r.len += len;
    p
}

/// `hs_reply.clear`.
///
/// # Safety
/// As [`reply_write`].
unsafe extern "C" fn reply_clear(ctx: *mut c_void) {
    // SAFETY: as in `reply_write`.
    let Some(r) = (unsafe { live_reply(ctx) }) else {
        return;
    };
    r.len = 0;
    r.split = NO_SPLIT;
}

/// The reply for a status the plugin may not return: PLUGIN_ERROR with
/// `plugin returned reserved status N` (2..100, the server's codes) or
/// `plugin returned invalid status N`, cut to `out`.
#[cold]
fn bad_status(status: i32, out: &mut [u8]) -> (u16, usize) {
    let kind = if (2..100).contains(&status) {
        "reserved"
    } else {
        "invalid"
    };
    let msg = format!("plugin returned {kind} status {status}");
    let n = msg.len().min(out.len());
    out[..n].copy_from_slice(&msg.as_bytes()[..n]);
    (abi::STATUS_PLUGIN_ERROR, n)
}

/// Where [`Instance::handle_split`] left the reply's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// In the first `n` bytes of `out`.
    InPlace(usize),
    /// In the first `n` bytes of the spill buffer (it outgrew `out`).
    Spilled(usize),
}

/// One initialised plugin state. Not `Send`: the plugin runs on the thread
/// that initialised it.
///
/// Dropping an `Instance` does **not** call the plugin's `fini`: call
/// [`Instance::fini`] at a clean exit. A worker that crashes or is killed
/// runs no `fini` either, so plugins cannot rely on it, and an implicit one
/// on unwinding would run plugin code in a state nobody planned for.
#[derive(Debug)]
pub struct Instance {
    table: &'static HsPlugin,
    state: *mut c_void,
    host: &'static HostCtx,
    /// The replies handed to `handle`, used in turn and dead once their
    /// call returned: a plugin that keeps an `hs_reply` (or its `ctx`)
    /// and writes through it later gets -1, instead of writing into
    /// whichever reply then lives at the same address (another client's).
    /// Only a write landing on the one cell in [`REPLY_CELLS`] whose call
    /// runs at that moment gets through. Leaked (a plugin may use a kept
    /// pointer at any time) and reached only through this raw pointer,
    /// never a reference, so that the plugin's pointers into it stay
    /// valid.
    cells: *mut ReplyCell,
    next_cell: usize,
}

/// How many [`ReplyCell`]s an instance turns through.
const REPLY_CELLS: usize = 64;

/// What one `handle` call's reply is made of: the `hs_reply` the plugin
/// gets and the context its `ctx` points to.
struct ReplyCell {
    raw: HsReply,
    ctx: ReplyCtx,
}

impl std::fmt::Debug for ReplyCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyCell").finish_non_exhaustive()
    }
}

impl Instance {
    /// Logs how many of the plugin's log lines were dropped for being over
    /// its budget, once that second is over (the worker calls it when its
    /// ring runs empty, so a burst's count is not held until the plugin
    /// logs again).
    pub fn report_dropped_logs(&self) {
        self.report_suppressed(std::time::Duration::ZERO);
    }

    /// [`Instance::report_dropped_logs`] at exit: the lines dropped in the
    /// second under way too.
    pub fn report_dropped_logs_at_exit(&self) {
        self.report_suppressed(std::time::Duration::from_secs(1));
    }

    /// Reports the lines dropped in budget windows over by `ahead` from
    /// now.
    fn report_suppressed(&self, ahead: std::time::Duration) {
        let mut budget = self.host.budget.lock().unwrap_or_else(|p| p.into_inner());
        // (Called whenever the ring runs empty, per request at low load:
        // the clock is read only when there is something to report.)
        if !budget.has_suppressed() {
            return;
        }
        let dropped = budget.take_suppressed(std::time::Instant::now() + ahead);
        drop(budget);
        if dropped > 0 {
            let _ = catch_unwind(AssertUnwindSafe(|| self.host.report(dropped)));
        }
    }

    /// The plugin's log lines dropped over budget so far (those reported).
    pub fn log_lines_dropped(&self) -> u64 {
        self.host.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs the plugin's `handle` for one request and returns the reply
    /// `(status, payload_len)`; the payload is `out[..payload_len]`.
    ///
    /// `out` is the reply payload buffer: in production a region reserved
    /// in the reply ring in shared memory, so the plugin writes straight
    /// into it. The plugin sees `out.len()` as the reply capacity; a write
    /// or reserve that would exceed it fails (-1 / NULL) without writing,
    /// and the plugin decides what to do (the Rust SDK's `?` turns it into
    /// a PLUGIN_ERROR reply saying "reply full").
    ///
    /// A status other than 0, 1 or 100..=65535 becomes status 1
    /// (PLUGIN_ERROR) with the payload replaced by `plugin returned
    /// reserved status N` (2..100, the server's codes) or `plugin returned
    /// invalid status N` (negative or above 65535), cut to `out.len()`.
    pub fn handle(
        &mut self,
        id: u64,
        command: u16,
        flags: u16,
        payload: &[u8],
        out: &mut [u8],
    ) -> (u16, usize) {
        // `capacity == cap`: every write that passes the capacity check
        // fits in `out`, so the null `spill` is never reached.
        let capacity = out.len();
        match self.call(id, command, flags, payload, out, ptr::null_mut(), capacity) {
            (status @ (0 | 1 | 100..=0xffff), len, _) => (status as u16, len.min(out.len())),
            (status, _, _) => bad_status(status, out),
        }
    }

    /// As [`Instance::handle`], but the plugin is told the reply holds
    /// `capacity` bytes while `out` may be smaller: writes that do not fit
    /// in `out` go on in `spill` (grown to `capacity` the first time, and
    /// kept by the caller for the next request), and the whole reply is
    /// then in `spill`. So the worker reserves a small region of its reply
    /// ring for the common reply, keeping the ring's hot pages few, and a
    /// large reply costs one extra copy instead of a refusal.
    #[allow(clippy::too_many_arguments)]
    pub fn handle_split(
        &mut self,
        id: u64,
        command: u16,
        flags: u16,
        payload: &[u8],
        out: &mut [u8],
        spill: &mut Vec<u8>,
        capacity: usize,
    ) -> (u16, Written) {
        let capacity = capacity.max(out.len());
        let (status, len, split) = self.call(
            id,
            command,
            flags,
            payload,
            out,
            ptr::from_mut(spill),
            capacity,
        );
        let len = len.min(capacity);
        match status {
            0 | 1 | 100..=0xffff if split == NO_SPLIT => {
                (status as u16, Written::InPlace(len.min(out.len())))
            }
            0 | 1 | 100..=0xffff => {
                // The head of the reply is in `out`, the rest in `spill`.
                let head = split.min(out.len());
                spill[..head].copy_from_slice(&out[..head]);
                (status as u16, Written::Spilled(len.min(spill.len())))
            }
            _ => {
                let (code, n) = bad_status(status, out);
                (code, Written::InPlace(n))
            }
        }
    }

    /// Calls the plugin's `handle` with the reply going to `out` (and past
    /// it to `spill`, up to `capacity`), through the next reply cell;
    /// returns its status, the reply's length and where it split (see
    /// [`ReplyCtx`]). The cell is dead once the call returns.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn call(
        &mut self,
        id: u64,
        command: u16,
        flags: u16,
        payload: &[u8],
        out: &mut [u8],
        spill: *mut Vec<u8>,
        capacity: usize,
    ) -> (i32, usize, usize) {
        let handle = self.table.handle.expect("checked at load");
        let state = self.state;
        let k = self.next_cell;
        self.next_cell = (k + 1) % REPLY_CELLS;
        // SAFETY: `k < REPLY_CELLS`, the length of the leaked array.
        let cell = unsafe { self.cells.add(k) };
        // SAFETY: `cell` is valid (leaked); the cell is dead (no call runs),
        // so nothing writes it; fields are set one by one through raw
        // pointers, and `live` last, with Release: a plugin thread that
        // sees it set sees the rest.
        let ctx = unsafe {
            let ctx = &raw mut (*cell).ctx;
            (&raw mut (*ctx).buf).write(out.as_mut_ptr());
            (&raw mut (*ctx).cap).write(out.len());
            (&raw mut (*ctx).len).write(0);
            (&raw mut (*ctx).capacity).write(capacity);
            (&raw mut (*ctx).spill).write(spill);
            (&raw mut (*ctx).split).write(NO_SPLIT);
            (&raw mut (*cell).raw.ctx).write(ctx.cast::<c_void>());
            (&raw mut (*cell).raw.capacity).write(capacity);
            (*ctx)
                .live
                .store(true, std::sync::atomic::Ordering::Release);
            ctx
        };
        let req = HsRequest {
            id,
            command,
            flags,
            reserved: 0,
            payload: payload.as_ptr(),
            payload_len: payload.len(),
        };
        // SAFETY: `state` is what this table's `init` produced; `req` points
        // to `payload`, alive and unchanged for the call; the cell's
        // `raw.ctx` points to its `ctx`, whose buffers (`out`, `spill`) the
        // caller borrowed mutably and does not touch until the call returns.
        let status = unsafe { handle(state, &req, &raw mut (*cell).raw) };
        // SAFETY: as above; the call is over, the cell is the host's again.
        let (len, split) = unsafe {
            (*ctx)
                .live
                .store(false, std::sync::atomic::Ordering::Release);
            (
                (&raw const (*ctx).len).read(),
                (&raw const (*ctx).split).read(),
            )
        };
        (status, len, split)
    }

    /// Calls the plugin's `fini` (if it has one), once: it consumes the
    /// instance.
    pub fn fini(self) {
        if let Some(fini) = self.table.fini {
            // SAFETY: `state` came from this table's `init` and, since
            // `self` is consumed, is handed back exactly once.
            unsafe { fini(self.state) };
        }
    }
}

#[cfg(test)]
mod tests {
    use halfsync_config::one_line;

    #[test]
    fn plugin_messages_stay_on_one_line() {
        assert_eq!(one_line("plain text, é"), "plain text, é");
        assert_eq!(
            one_line("x = 1\nINFO forged line\r\t\u{1b}[31m"),
            "x = 1\\nINFO forged line\\r\\t\\u{1b}[31m"
        );
    }
}
