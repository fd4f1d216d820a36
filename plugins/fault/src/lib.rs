//! The fault-injection test plugin: echoes, or misbehaves on command.
//!
//! Crash and hang isolation tests start the real server with this plugin,
//! put it under normal load (command 1, or any command not listed below,
//! echoes) and send exactly one bad request, chosen by its HSP/1 command
//! number. `plugins/c/test/fault.c` is the same plugin in C, written
//! against the shipped header; the two behave the same except where the
//! table says otherwise. The numbers are exported below as `pub const`s and
//! mirrored in `halfsync_testkit::fault` (tests cannot link a `cdylib`).
//!
//! Built as `target/<profile>/libfault.so` (`cargo build -p
//! halfsync-plugin-fault`, or `halfsync_testkit::fault_plugin()` from a
//! test). Plugin name `fault` (the C one is `c_fault`).
//!
//! # Commands
//!
//! | command | name | behaviour |
//! |--------:|------|-----------|
//! | 1 (and any command not listed) | [`ECHO`] | status 0, payload unchanged (PLUGIN_ERROR "reply full ..." if it does not fit) |
//! | 10 | [`SEGV`] | a real invalid write (to a `PROT_NONE` page; C: through a NULL pointer): dies of SIGSEGV |
//! | 11 | [`ABORT`] | `abort()`: dies of SIGABRT |
//! | 12 | [`PANIC`] | Rust: `panic!("fault: requested panic")`, which the SDK turns into a PLUGIN_ERROR reply `plugin panicked; the server log has its message` (the log has the message); the worker lives. C: PLUGIN_ERROR `fault: requested error` |
//! | 13 | [`ESCAPING_PANIC`] | Rust: a panic inside an `extern "C"` function, which Rust cannot unwind out of: it prints "panic in a function that cannot unwind" and aborts (SIGABRT). C: `raise(SIGABRT)` |
//! | 14 | [`EXIT`] | `exit(0)` from plugin code: the worker vanishes with exit code 0 in the middle of a request |
//! | 15 | [`HANG`] | never returns (sleeps 1 s at a time: no CPU) |
//! | 16 | [`SLOW`] | sleeps for the big-endian `u32` in payload bytes 0..4 in milliseconds (default [`SLOW_DEFAULT_MS`] if the payload is shorter), then echoes the payload |
//! | 17 | [`LEAK`] | allocates the big-endian `u32` in payload bytes 0..4 in MiB (default [`LEAK_DEFAULT_MIB`]), writes one byte per 4 KiB page so it all counts in RSS, never frees it, then echoes. PLUGIN_ERROR `fault: cannot allocate N MiB` if the allocator refuses |
//! | 18 | [`SCRIBBLE`] | corrupts this worker's slot (below); PLUGIN_ERROR `fault: no halfsync mapping` if it has none |
//! | 19 | [`SIGBUS`] | a real bus error (touches a page of a shared mapping whose file was truncated under it): dies of SIGBUS |
//! | 20 | [`SIGKILL`] | `kill(getpid(), SIGKILL)`, as the OOM killer would |
//! | 21 | [`REPLY_TOO_BIG`] | writes `capacity + 1` bytes: Rust: the SDK's PLUGIN_ERROR `reply full: N bytes do not fit in the M bytes left`; C: PLUGIN_ERROR `fault: reply too big` (cut to the capacity) |
//! | 22 | [`RESERVED_STATUS`] | C: returns status 4, a code the server reserves, which the worker turns into PLUGIN_ERROR `plugin returned reserved status 4`. Rust: the SDK's [`Status`] cannot hold a reserved code, so the Rust plugin can only send PLUGIN_ERROR `fault: the Rust SDK cannot return reserved status 4`; test the host's mapping with the C plugin |
//! | 23 | [`CUSTOM`] | status [`CUSTOM_STATUS`] (150), payload `custom` |
//! | 24 | [`PREFIXED`] | status 0, the payload's length as a big-endian `u32`, then the payload, written in 4 KiB pieces. C reserves the 4 bytes first and fills them last, through the pointer `reserve` returned (the host must keep it valid however far the reply grows); Rust fills them at once (the SDK's `reserve` borrows the reply) |
//! | 26 | [`LOG_CRATE`] | Rust: `log::warn!` of the payload as text (through `Host::forward_log`), then again from a thread it starts and joins, with ` (from a thread)`; then echo. C: echo |
//! | 27 | [`WHOAMI`] | payload `group=NAME worker=N`, as the host told init (`-` for what it did not) |
//!
//! The fatal commands log a warning through the host first (`fault:
//! <name> (request id N)`), so the server log shows what the worker was
//! asked to do before it died.
//!
//! ## SCRIBBLE
//!
//! The plugin finds its slot by reading `/proc/self/maps` for a line whose
//! path contains `memfd:halfsync-` (a worker maps exactly one: its own
//! slot). The slot is `[0, 4096)` control block, then the request ring
//! (4096-byte header page, then `capacity` data bytes), then the reply ring
//! (4096-byte header page, then `capacity` data bytes), so `capacity =
//! (len - 4096) / 2 - 4096`. The first payload byte picks the variant (an
//! empty payload means 0; another value gets PLUGIN_ERROR `fault: unknown
//! scribble variant N`):
//!
//! - [`SCRIBBLE_REPLY_HEADER_HANG`] (0): the first 128 bytes of the reply
//!   ring header page (producer `tail` at 0, consumer `head` at 64) become
//!   `0xA5`, then HANG, so the corruption stays visible;
//! - [`SCRIBBLE_CONTROL_HANG`] (1): the first 128 bytes of the control
//!   block become `0xA5`, then HANG;
//! - [`SCRIBBLE_REPLY_HEADER_RETURN`] (2): as 0, then echo and return
//!   normally (the worker's next publish partly repairs the header, so
//!   tests can only assert that the server does not crash);
//! - [`SCRIBBLE_REPLY_DATA_HANG`] (3): the whole reply ring data area
//!   becomes random bytes, then HANG;
//! - [`SCRIBBLE_FUTURE_START_HANG`] (4): the start time of the running
//!   request in the control block (its `busy_since_ns`, the u64 at byte
//!   [`CONTROL_BUSY_SINCE_OFFSET`]) becomes a year from now, then HANG.
//!
//! Payload bytes 1..5, if present, are a big-endian u32 of milliseconds to
//! sleep before scribbling.
//!
//! # Init
//!
//! The plugin's config section (TOML text) is read line by line for these
//! `key = value` lines only; every other line is ignored (no TOML parser):
//!
//! - `warn_in_init = "message"`: log that message as a warning first;
//! - `init_delay_ms = N`: sleep N ms (slow start);
//! - `crash_in_init = true`: then die of SIGSEGV inside init;
//! - `crash_in_init_if_exists = "path"`: the same, but only while that file
//!   exists (a plugin that starts failing after the server started);
//! - `reply_prefix = "v2:"`: echo replies start with it (to tell one
//!   configuration's workers from another's);
//! - `hang_in_init = true`: then never return from init;
//! - `fail_init = "message"`: then fail init with that message;
//! - `crash_in_fini = true`: die of SIGSEGV in fini (Rust plugin only).
//!
//! They act in that order. A value of the wrong kind fails init with a
//! message naming the key. Otherwise init succeeds and logs `fault plugin
//! ready (group=NAME worker=N)` (info) through the host.

use std::time::Duration;

use halfsync_plugin_api::{Error, Host, Plugin, Reply, Request, Status, export_plugin};

/// Echo the payload (also what every command not listed does).
pub const ECHO: u16 = 1;
/// Die of SIGSEGV (a real invalid write).
pub const SEGV: u16 = 10;
/// `abort()`: die of SIGABRT.
pub const ABORT: u16 = 11;
/// Rust: a panic the SDK catches (PLUGIN_ERROR reply); C: PLUGIN_ERROR.
pub const PANIC: u16 = 12;
/// A panic that escapes the SDK: the process aborts (SIGABRT).
pub const ESCAPING_PANIC: u16 = 13;
/// `exit(0)` in the middle of the request.
pub const EXIT: u16 = 14;
/// Never return (without burning CPU).
pub const HANG: u16 = 15;
/// Sleep for payload `u32` BE milliseconds, then echo.
pub const SLOW: u16 = 16;
/// Leak payload `u32` BE MiB, touched, then echo.
pub const LEAK: u16 = 17;
/// Corrupt this worker's slot; the first payload byte picks how.
pub const SCRIBBLE: u16 = 18;
/// Die of SIGBUS (a real bus error).
pub const SIGBUS: u16 = 19;
/// `kill(getpid(), SIGKILL)`.
pub const SIGKILL: u16 = 20;
/// Write `capacity + 1` bytes into the reply.
pub const REPLY_TOO_BIG: u16 = 21;
/// C: return status 4 (reserved for the server). Rust: PLUGIN_ERROR.
pub const RESERVED_STATUS: u16 = 22;
/// Reply [`CUSTOM_STATUS`] with payload `custom`.
pub const CUSTOM: u16 = 23;

/// Reply the payload's length (`u32` BE), then the payload, in pieces.
pub const PREFIXED: u16 = 24;
/// Rust: log the payload (as text) with `log::warn!`, which
/// `Host::forward_log` (called in init) sends to halfsync's log; echo.
pub const LOG_CRATE: u16 = 26;
/// Reply `group=NAME worker=N` from what the host says (`-` for none).
pub const WHOAMI: u16 = 27;

/// The status of [`CUSTOM`]'s reply.
pub const CUSTOM_STATUS: u16 = 150;
/// The status the C plugin returns for [`RESERVED_STATUS`].
pub const RESERVED_STATUS_CODE: u16 = 4;
/// [`SLOW`]'s delay when the payload has fewer than 4 bytes.
pub const SLOW_DEFAULT_MS: u32 = 100;
/// [`LEAK`]'s size when the payload has fewer than 4 bytes.
pub const LEAK_DEFAULT_MIB: u32 = 16;

/// [`SCRIBBLE`] variant: fill the reply ring header with `0xA5`, then hang.
pub const SCRIBBLE_REPLY_HEADER_HANG: u8 = 0;
/// [`SCRIBBLE`] variant: fill the control block's first 128 bytes with
/// `0xA5`, then hang.
pub const SCRIBBLE_CONTROL_HANG: u8 = 1;
/// [`SCRIBBLE`] variant: fill the reply ring header with `0xA5`, then echo.
pub const SCRIBBLE_REPLY_HEADER_RETURN: u8 = 2;
/// [`SCRIBBLE`] variant: fill the reply ring data area with random bytes,
/// then hang.
pub const SCRIBBLE_REPLY_DATA_HANG: u8 = 3;
/// [`SCRIBBLE`] variant: set the running request's start time in the
/// control block a year ahead, then hang.
pub const SCRIBBLE_FUTURE_START_HANG: u8 = 4;
/// Where the control block keeps the running request's start time (a
/// test in `halfsync-shm` checks it against the real layout).
pub const CONTROL_BUSY_SINCE_OFFSET: u32 = 48;

/// The marker in `/proc/self/maps` of a halfsync slot (`memfd:` + the name
/// the master gives it, `halfsync-<group>-<n>`).
const SLOT_MARKER: &str = "memfd:halfsync-";
/// Control block, and each ring header: one page each.
const SLOT_PAGE: usize = 4096;
/// Bytes of a ring header / control block that SCRIBBLE overwrites.
const SCRIBBLE_LEN: usize = 128;
/// The byte SCRIBBLE writes.
const SCRIBBLE_BYTE: u8 = 0xA5;
/// LEAK touches one byte per page of this size.
const TOUCH_STRIDE: usize = 4096;

/// The fault plugin's state.
pub struct Fault {
    host: Host,
    /// `reply_prefix`: written before the payload of every echo reply (so
    /// tests can tell one configuration's workers from another's).
    prefix: Vec<u8>,
    /// MiB leaked by [`LEAK`] so far (for the log).
    leaked_mib: u64,
    /// `crash_in_fini`.
    crash_in_fini: bool,
}

/// What the config section asks of init.
#[derive(Debug, Default, PartialEq, Eq)]
struct InitConfig {
    delay_ms: u64,
    crash: bool,
    hang: bool,
    fail: Option<String>,
    crash_if_exists: Option<String>,
    prefix: Option<String>,
    warn: Option<String>,
    crash_in_fini: bool,
}

impl InitConfig {
    /// Reads the `key = value` lines this plugin knows; ignores the rest.
    fn parse(config: &str) -> Result<InitConfig, String> {
        let mut out = InitConfig::default();
        for line in config.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let (key, value) = (key.trim(), value.trim());
            match key {
                "init_delay_ms" => {
                    out.delay_ms = strip_comment(value).parse().map_err(|_| {
                        format!("fault: init_delay_ms: expected milliseconds, got `{value}`")
                    })?;
                }
                "crash_in_init" => out.crash = parse_bool(key, value)?,
                "hang_in_init" => out.hang = parse_bool(key, value)?,
                "fail_init" => out.fail = Some(parse_string(value)),
                "crash_in_init_if_exists" => out.crash_if_exists = Some(parse_string(value)),
                "reply_prefix" => out.prefix = Some(parse_string(value)),
                "warn_in_init" => out.warn = Some(parse_string(value)),
                "crash_in_fini" => out.crash_in_fini = parse_bool(key, value)?,
                _ => {}
            }
        }
        Ok(out)
    }
}

/// `value` without a trailing `# comment` (for unquoted values).
fn strip_comment(value: &str) -> &str {
    value.split('#').next().unwrap_or("").trim()
}

fn parse_bool(key: &str, value: &str) -> Result<bool, String> {
    match strip_comment(value) {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!(
            "fault: {key}: expected true or false, got `{value}`"
        )),
    }
}

/// A TOML basic (`"..."`, with `\"`, `\\`, `\n`, `\t` escapes) or literal
/// (`'...'`) string; anything else is taken as it is.
fn parse_string(value: &str) -> String {
    if let Some(rest) = value.strip_prefix('\'') {
        return rest.split('\'').next().unwrap_or("").to_owned();
    }
    let Some(rest) = value.strip_prefix('"') else {
        return strip_comment(value).to_owned();
    };
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => break,
            '\\' => match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(other) => out.push(other),
                None => break,
            },
            c => out.push(c),
        }
    }
    out
}

/// The big-endian `u32` in the first 4 payload bytes, if there are 4.
fn payload_u32(payload: &[u8]) -> Option<u32> {
    let bytes: [u8; 4] = payload.get(..4)?.try_into().ok()?;
    Some(u32::from_be_bytes(bytes))
}

/// `group=NAME worker=N`, as the host says (`-` for what it does not).
fn whoami(host: &Host) -> String {
    let group = host.group().unwrap_or_else(|| "-".to_owned());
    let worker = host
        .worker()
        .map_or_else(|| "-".to_owned(), |n| n.to_string());
    format!("group={group} worker={worker}")
}

/// Never returns; sleeps, so it costs no CPU.
fn hang() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Resets `sig` to its default action and raises it; the fallback of the
/// real faults below (a handler could otherwise catch a raised signal and
/// return: Rust's runtime handles SIGSEGV and SIGBUS for its stack-overflow
/// report). Aborts if the signal somehow did not kill the process.
fn raise_default(sig: libc::c_int) -> ! {
    // SAFETY: plain libc calls with valid arguments; `SIG_DFL` is a valid
    // disposition for every catchable signal.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
    std::process::abort()
}

/// Dies of SIGSEGV by writing to a `PROT_NONE` page. (A null pointer would
/// do in release builds, but debug builds check `write_volatile`'s pointer
/// for NULL and abort instead.)
fn segfault() -> ! {
    // SAFETY: a fresh anonymous mapping owned by nobody else; MAP_FAILED is
    // checked.
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SLOT_PAGE,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if page != libc::MAP_FAILED {
        // SAFETY: deliberately not sound: the page is mapped without access,
        // so the store faults before anything is written, and the kernel
        // kills the process with SIGSEGV (Rust's handler restores the
        // default action and the store faults again). Nothing runs after.
        unsafe { std::ptr::write_volatile(page.cast::<u8>(), 1) };
    }
    raise_default(libc::SIGSEGV)
}

/// Dies of SIGBUS: touches a shared mapping of a memfd truncated under it.
fn bus_error() -> ! {
    // SAFETY: plain syscalls on a file descriptor this function owns; every
    // result is checked before use.
    let page = unsafe {
        let fd = libc::memfd_create(c"fault-sigbus".as_ptr(), libc::MFD_CLOEXEC);
        if fd < 0 || libc::ftruncate(fd, SLOT_PAGE as libc::off_t) != 0 {
            raise_default(libc::SIGBUS);
        }
        let page = libc::mmap(
            std::ptr::null_mut(),
            SLOT_PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        if page == libc::MAP_FAILED || libc::ftruncate(fd, 0) != 0 {
            raise_default(libc::SIGBUS);
        }
        page
    };
    // SAFETY: deliberately not sound: the page is mapped but its file is now
    // empty, so the store raises SIGBUS and the process dies. Nothing runs
    // after.
    unsafe { std::ptr::write_volatile(page.cast::<u8>(), 1) };
    raise_default(libc::SIGBUS)
}

/// A panic Rust cannot unwind out of: an `extern "C"` function must not
/// unwind, so the runtime prints "panic in a function that cannot unwind"
/// and aborts the process, whatever `catch_unwind` waits outside.
#[inline(never)]
extern "C" fn panic_in_extern_c() {
    panic!("fault: escaping panic");
}

/// The halfsync slot this process maps: `(start address, length)`.
fn find_slot() -> Option<(usize, usize)> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    // The worker maps its request ring's data read-only, which splits the
    // slot into several lines: the slot is their union.
    let (lo, hi) = maps
        .lines()
        .filter(|line| line.contains(SLOT_MARKER))
        .filter_map(|line| {
            let (start, end) = line.split_ascii_whitespace().next()?.split_once('-')?;
            Some((
                usize::from_str_radix(start, 16).ok()?,
                usize::from_str_radix(end, 16).ok()?,
            ))
        })
        .reduce(|(a, b), (c, d)| (a.min(c), b.max(d)))?;
    Some((lo, hi.checked_sub(lo)?))
}

/// Writes `byte` over `len` bytes at `addr`, inside the slot mapping.
///
/// # Safety
/// `addr..addr + len` lies inside a writable mapping of this process. The
/// bytes may be in use by this process and others: overwriting them under
/// their feet is what SCRIBBLE is for.
unsafe fn scribble_bytes(addr: usize, len: usize, byte: u8) {
    let p = std::ptr::with_exposed_provenance_mut::<u8>(addr);
    for i in 0..len {
        // SAFETY: inside the mapping (fn contract); volatile so the stores
        // really happen, byte by byte.
        unsafe { std::ptr::write_volatile(p.add(i), byte) };
    }
}

/// Fills `len` bytes at `addr` (8-aligned, `len` a multiple of 8) with
/// pseudo-random words.
///
/// # Safety
/// As [`scribble_bytes`].
unsafe fn scribble_random(addr: usize, len: usize) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x = (nanos ^ (u64::from(std::process::id()) << 32)) | 1;
    let p = std::ptr::with_exposed_provenance_mut::<u64>(addr);
    for i in 0..len / 8 {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        // SAFETY: inside the mapping (fn contract), aligned (the data area
        // is page-aligned).
        unsafe { std::ptr::write_volatile(p.add(i), x.wrapping_mul(0x2545_f491_4f6c_dd1d)) };
    }
}

impl Fault {
    fn warn(&self, what: &str, req: &Request<'_>) {
        self.host
            .warn(&format!("fault: {what} (request id {})", req.id()));
    }

    fn leak(&mut self, req: &Request<'_>, reply: &mut Reply<'_>) -> Result<Status, Error> {
        let mib = payload_u32(req.payload()).unwrap_or(LEAK_DEFAULT_MIB);
        let bytes = (mib as usize)
            .checked_mul(1 << 20)
            .ok_or_else(|| format!("fault: cannot allocate {mib} MiB"))?;
        let mut block: Vec<u8> = Vec::new();
        block
            .try_reserve_exact(bytes)
            .map_err(|_| format!("fault: cannot allocate {mib} MiB"))?;
        let spare = block.spare_capacity_mut();
        for i in (0..bytes).step_by(TOUCH_STRIDE) {
            spare[i].write(SCRIBBLE_BYTE);
        }
        // Opaque to the optimiser, so the page writes stay; then never freed.
        std::mem::forget(std::hint::black_box(block));
        self.leaked_mib += u64::from(mib);
        self.host.debug(&format!(
            "fault: leaked {mib} MiB, {} MiB in all",
            self.leaked_mib
        ));
        reply.write(req.payload())?;
        Ok(Status::OK)
    }

    fn scribble(&mut self, req: &Request<'_>, reply: &mut Reply<'_>) -> Result<Status, Error> {
        let variant = req.payload().first().copied().unwrap_or(0);
        if variant > SCRIBBLE_FUTURE_START_HANG {
            return Err(format!("fault: unknown scribble variant {variant}").into());
        }
        let Some((start, len)) = find_slot() else {
            return Err("fault: no halfsync mapping".into());
        };
        let Some(capacity) = (len.checked_sub(SLOT_PAGE))
            .map(|rings| rings / 2)
            .and_then(|ring| ring.checked_sub(SLOT_PAGE))
            .filter(|&capacity| capacity > 0)
        else {
            return Err(format!("fault: halfsync mapping of {len} bytes is too small").into());
        };
        let control = start;
        let reply_header = start + SLOT_PAGE + SLOT_PAGE + capacity;
        let reply_data = reply_header + SLOT_PAGE;
        // Optional pause first (payload bytes 1..5, big-endian ms), so a
        // test can let the proxy collect the replies already published.
        if let Some(ms) = req.payload().get(1..).and_then(payload_u32) {
            std::thread::sleep(Duration::from_millis(ms.into()));
        }
        self.warn(&format!("scribble variant {variant}"), req);
        match variant {
            SCRIBBLE_REPLY_HEADER_HANG | SCRIBBLE_REPLY_HEADER_RETURN => {
                // SAFETY: the header page is inside the writable slot mapping
                // found above (layout in the module doc).
                unsafe { scribble_bytes(reply_header, SCRIBBLE_LEN, SCRIBBLE_BYTE) };
            }
            SCRIBBLE_CONTROL_HANG => {
                // SAFETY: the control block is the mapping's first page.
                unsafe { scribble_bytes(control, SCRIBBLE_LEN, SCRIBBLE_BYTE) };
            }
            SCRIBBLE_FUTURE_START_HANG => {
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: `ts` is valid storage for clock_gettime.
                unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
                let now = (ts.tv_sec as u64)
                    .saturating_mul(1_000_000_000)
                    .saturating_add(ts.tv_nsec as u64);
                let future = now.saturating_add(365 * 24 * 3600 * 1_000_000_000);
                let at = control + CONTROL_BUSY_SINCE_OFFSET as usize;
                // SAFETY: inside the control page (first page of the slot
                // mapping), 8-aligned (offset 48).
                unsafe {
                    std::ptr::write_volatile(
                        std::ptr::with_exposed_provenance_mut::<u64>(at),
                        future,
                    )
                };
            }
            _ => {
                // SAFETY: the reply ring's data area is the mapping's last
                // `capacity` bytes; page-aligned, `capacity` a multiple of 8.
                unsafe { scribble_random(reply_data, capacity & !7) };
            }
        }
        if variant != SCRIBBLE_REPLY_HEADER_RETURN {
            hang();
        }
        reply.write(req.payload())?;
        Ok(Status::OK)
    }
}

impl Plugin for Fault {
    fn init(host: &Host, config: &str) -> Result<Self, Error> {
        let config = InitConfig::parse(config)?;
        if let Some(msg) = &config.warn {
            host.warn(msg);
        }
        if config.delay_ms > 0 {
            host.info(&format!("fault: init sleeps {} ms", config.delay_ms));
            std::thread::sleep(Duration::from_millis(config.delay_ms));
        }
        let file_says_crash = config
            .crash_if_exists
            .as_deref()
            .is_some_and(|p| std::path::Path::new(p).exists());
        if config.crash || file_says_crash {
            host.warn("fault: crashing in init");
            segfault();
        }
        if config.hang {
            host.warn("fault: hanging in init");
            hang();
        }
        if let Some(msg) = config.fail {
            return Err(msg.into());
        }
        host.forward_log(log::LevelFilter::Info);
        host.info(&format!("fault plugin ready ({})", whoami(host)));
        Ok(Fault {
            host: host.clone(),
            prefix: config.prefix.unwrap_or_default().into_bytes(),
            leaked_mib: 0,
            crash_in_fini: config.crash_in_fini,
        })
    }

    fn fini(&mut self) {
        if self.crash_in_fini {
            self.host.warn("fault: crashing in fini");
            segfault();
        }
    }

    fn handle(&mut self, req: &Request<'_>, reply: &mut Reply<'_>) -> Result<Status, Error> {
        match req.command() {
            SEGV => {
                self.warn("SIGSEGV", req);
                segfault()
            }
            ABORT => {
                self.warn("abort", req);
                std::process::abort()
            }
            PANIC => panic!("fault: requested panic"),
            ESCAPING_PANIC => {
                self.warn("escaping panic", req);
                panic_in_extern_c();
                std::process::abort()
            }
            EXIT => {
                self.warn("exit(0)", req);
                std::process::exit(0)
            }
            HANG => {
                self.warn("hang", req);
                hang()
            }
            SLOW => {
                let ms = payload_u32(req.payload()).unwrap_or(SLOW_DEFAULT_MS);
                std::thread::sleep(Duration::from_millis(u64::from(ms)));
                reply.write(req.payload())?;
                Ok(Status::OK)
            }
            LEAK => self.leak(req, reply),
            SCRIBBLE => self.scribble(req, reply),
            SIGBUS => {
                self.warn("SIGBUS", req);
                bus_error()
            }
            SIGKILL => {
                self.warn("SIGKILL", req);
                // SAFETY: plain libc calls; killing ourselves is the point.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                hang()
            }
            REPLY_TOO_BIG => {
                let too_big = vec![0x5A; reply.capacity().saturating_add(1)];
                reply.write(&too_big)?;
                Ok(Status::OK)
            }
            RESERVED_STATUS => Err(format!(
                "fault: the Rust SDK cannot return reserved status {RESERVED_STATUS_CODE}"
            )
            .into()),
            CUSTOM => {
                reply.write(b"custom")?;
                Ok(Status::custom(CUSTOM_STATUS))
            }
            PREFIXED => {
                let len = u32::try_from(req.payload().len()).unwrap_or(u32::MAX);
                reply.reserve(4)?.copy_from_slice(&len.to_be_bytes());
                for piece in req.payload().chunks(4096) {
                    reply.write(piece)?;
                }
                Ok(Status::OK)
            }
            WHOAMI => {
                reply.write(whoami(&self.host).as_bytes())?;
                Ok(Status::OK)
            }
            LOG_CRATE => {
                let text = String::from_utf8_lossy(req.payload()).into_owned();
                log::warn!("{text}");
                // Again from a thread of the plugin's own, as libraries log.
                let _ = std::thread::spawn(move || log::warn!("{text} (from a thread)")).join();
                reply.write(req.payload())?;
                Ok(Status::OK)
            }
            _ => {
                reply.write(&self.prefix)?;
                reply.write(req.payload())?;
                Ok(Status::OK)
            }
        }
    }
}

export_plugin!(Fault, name = "fault", version = env!("CARGO_PKG_VERSION"));

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use halfsync_plugin_api::LogLevel;
    use halfsync_plugin_api::abi::HsPlugin;
    use halfsync_plugin_api::testing::Harness;

    use super::*;

    fn harness() -> Harness {
        // SAFETY: `halfsync_plugin_v1` returns a pointer to its static table.
        let table: &'static HsPlugin = unsafe { &*super::halfsync_plugin_v1() };
        // SAFETY: the table was generated by `export_plugin!`.
        unsafe { Harness::from_table(table) }
    }

    fn started() -> Harness {
        let mut h = harness();
        h.init("").unwrap();
        h
    }

    fn text(payload: Vec<u8>) -> String {
        String::from_utf8(payload).unwrap()
    }

    #[test]
    fn log_crate_records_reach_the_host() {
        let mut h = started();
        assert_eq!(
            h.handle(1, LOG_CRATE, 0, b"via log", 64),
            (0, b"via log".to_vec())
        );
        assert!(
            h.logs()
                .iter()
                .any(|(l, m)| *l == LogLevel::Warn && m == "fault: via log"),
            "{:?}",
            h.logs()
        );
    }

    #[test]
    fn init_logs_ready_and_echoes_every_unlisted_command() {
        let mut h = harness();
        assert_eq!(
            (h.name().as_str(), h.version().as_str()),
            ("fault", env!("CARGO_PKG_VERSION"))
        );
        h.init("[unrelated]\nother = 1\n").unwrap();
        assert_eq!(
            h.logs(),
            vec![(
                LogLevel::Info,
                "fault plugin ready (group=harness worker=0)".to_owned()
            )]
        );
        for command in [ECHO, 0, 2, 9, 25, 99, 100, u16::MAX] {
            assert_eq!(
                h.handle(1, command, 0, b"hello", 64),
                (0, b"hello".to_vec())
            );
        }
        assert_eq!(h.handle(2, ECHO, 0, b"", 0), (0, Vec::new()));
        assert_eq!(
            h.handle(3, PREFIXED, 0, &[7u8; 5000], 5004),
            (0, [&5000u32.to_be_bytes()[..], &[7u8; 5000]].concat())
        );
        let (status, msg) = h.handle(3, ECHO, 0, b"too long", 4);
        assert_eq!((status, msg.as_slice()), (1, &b"repl"[..]));
    }

    #[test]
    fn panic_is_caught_by_the_sdk_and_the_plugin_goes_on() {
        let mut h = started();
        let (status, msg) = h.handle(7, PANIC, 0, b"x", 256);
        assert_eq!(
            (status, text(msg).as_str()),
            (1, "plugin panicked; the server log has its message")
        );
        assert!(
            h.logs()
                .iter()
                .any(|(l, m)| *l == LogLevel::Error && m.contains("fault: requested panic")),
            "{:?}",
            h.logs()
        );
        assert_eq!(h.handle(8, ECHO, 0, b"alive", 64), (0, b"alive".to_vec()));
    }

    #[test]
    fn slow_sleeps_for_the_payload_milliseconds_then_echoes() {
        let mut h = started();
        let payload = [0, 0, 0, 20, b'z'];
        let t = Instant::now();
        assert_eq!(h.handle(1, SLOW, 0, &payload, 64), (0, payload.to_vec()));
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(20), "{took:?}");
        assert!(took < Duration::from_millis(2000), "{took:?}");
        // A short payload: the default 100 ms.
        let t = Instant::now();
        assert_eq!(h.handle(2, SLOW, 0, b"ab", 64), (0, b"ab".to_vec()));
        assert!(t.elapsed() >= Duration::from_millis(u64::from(SLOW_DEFAULT_MS)));
    }

    /// Resident set size of this process, in bytes, from /proc.
    fn rss() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }

    #[test]
    fn leak_grows_rss_and_echoes() {
        let mut h = started();
        let before = rss();
        let payload = 32u32.to_be_bytes();
        assert_eq!(h.handle(1, LEAK, 0, &payload, 64), (0, payload.to_vec()));
        let grown = rss().saturating_sub(before);
        // Other tests run in parallel threads and may free memory, so allow
        // some slack below 32 MiB.
        assert!(grown >= 24 << 20, "RSS grew by {grown} bytes only");
    }

    #[test]
    fn leak_reports_an_impossible_allocation() {
        let mut h = started();
        // u32::MAX MiB = 4 PiB: beyond any address space the allocator grants.
        let (status, msg) = h.handle(1, LEAK, 0, &u32::MAX.to_be_bytes(), 256);
        assert_eq!(
            (status, text(msg).as_str()),
            (1, "fault: cannot allocate 4294967295 MiB")
        );
    }

    #[test]
    fn reply_too_big_is_the_sdks_plugin_error() {
        let mut h = started();
        let (status, msg) = h.handle(1, REPLY_TOO_BIG, 0, b"", 100);
        assert_eq!(
            (status, text(msg).as_str()),
            (1, "reply full: 101 bytes do not fit in the 100 bytes left")
        );
    }

    /// The SDK's `Status` cannot carry a reserved code, so the Rust plugin
    /// sends PLUGIN_ERROR itself (the C plugin returns a raw 4, which the
    /// worker maps; the Harness would return it raw).
    #[test]
    fn reserved_status_is_a_plugin_error_in_rust() {
        let mut h = started();
        let (status, msg) = h.handle(1, RESERVED_STATUS, 0, b"", 256);
        assert_eq!(
            (status, text(msg).as_str()),
            (1, "fault: the Rust SDK cannot return reserved status 4")
        );
    }

    #[test]
    fn custom_replies_150() {
        let mut h = started();
        assert_eq!(
            h.handle(1, CUSTOM, 0, b"ignored", 64),
            (i32::from(CUSTOM_STATUS), b"custom".to_vec())
        );
    }

    #[test]
    fn scribble_without_a_slot_is_a_plugin_error() {
        let mut h = started();
        for variant in [0u8, 1, 2, 3] {
            let (status, msg) = h.handle(1, SCRIBBLE, 0, &[variant], 256);
            assert_eq!(
                (status, text(msg).as_str()),
                (1, "fault: no halfsync mapping")
            );
        }
        let (status, msg) = h.handle(1, SCRIBBLE, 0, &[9], 256);
        assert_eq!(
            (status, text(msg).as_str()),
            (1, "fault: unknown scribble variant 9")
        );
    }

    #[test]
    fn fail_init_fails_with_the_message() {
        let mut h = harness();
        assert_eq!(
            h.init("fail_init = \"no \\\"db\\\" configured\"\n"),
            Err("no \"db\" configured".to_owned())
        );
        let mut h = harness();
        assert_eq!(h.init("fail_init = 'literal'"), Err("literal".to_owned()));
    }

    #[test]
    fn init_delay_ms_delays_init() {
        let mut h = harness();
        let t = Instant::now();
        h.init("init_delay_ms = 50\ncrash_in_init = false\nhang_in_init = false")
            .unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(50),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(h.handle(1, ECHO, 0, b"up", 8), (0, b"up".to_vec()));
    }

    #[test]
    fn bad_config_values_fail_init_naming_the_key() {
        let mut h = harness();
        assert_eq!(
            h.init("init_delay_ms = \"soon\""),
            Err("fault: init_delay_ms: expected milliseconds, got `\"soon\"`".to_owned())
        );
        let mut h = harness();
        assert_eq!(
            h.init("crash_in_init = yes"),
            Err("fault: crash_in_init: expected true or false, got `yes`".to_owned())
        );
    }

    #[test]
    fn config_parsing() {
        let parsed = InitConfig::parse(
            "# comment\n  init_delay_ms = 250  # ms\ncrash_in_init = false\nhang_in_init=true\n\
             fail_init = \"a = b\"\nname = \"x\"\nwarn_in_init = \"careful\"\ncrash_in_fini = true\n",
        )
        .unwrap();
        assert_eq!(
            parsed,
            InitConfig {
                delay_ms: 250,
                crash: false,
                hang: true,
                fail: Some("a = b".to_owned()),
                crash_if_exists: None,
                prefix: None,
                warn: Some("careful".to_owned()),
                crash_in_fini: true,
            }
        );
        assert_eq!(InitConfig::parse("").unwrap(), InitConfig::default());
    }

    #[test]
    fn payload_u32_is_big_endian_and_needs_four_bytes() {
        assert_eq!(payload_u32(&[0, 0, 1, 0, 9]), Some(256));
        assert_eq!(payload_u32(&[1, 2, 3]), None);
    }
}
