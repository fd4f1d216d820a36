//! Test support for halfsync: builds plugins, supervises test processes.
//!
//! A dev-dependency of the other crates' tests and of the root integration
//! tests. It finds the workspace and the target directory of the running
//! test binary, and builds the plugins a test needs, once per test process:
//!
//! - [`rust_plugin`] runs `cargo build -p <package>` for a Rust `cdylib`
//!   plugin (e.g. [`echo_plugin`], [`fault_plugin`]) into the same target
//!   directory and profile as the running test;
//! - [`c_plugin`] compiles one C file from the workspace with the system C
//!   compiler into `target/<profile>/test-plugins/lib<stem>.so`, only when
//!   it is missing or older than its sources (e.g. [`c_echo_plugin`],
//!   [`c_fault_plugin`]).
//!
//! The fault-injection plugins' command numbers are in [`fault`].
//!
//! ```no_run
//! let echo = halfsync_testkit::echo_plugin();
//! assert!(echo.ends_with("libecho.so"));
//! let broken = halfsync_testkit::c_plugin("plugins/c/test/wrong_abi.c");
//! assert!(broken.ends_with("test-plugins/libwrong_abi.so"));
//! ```
//!
//! Every function panics with the tool's output when a build fails: these
//! are test helpers, and the panic message is the test failure.

#![deny(missing_docs)]

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};
use std::{env, fs};

/// The workspace root (the directory of the root `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit lives one level below the workspace root")
        .to_path_buf()
}

/// `target/<profile>` of the running test binary (`target/debug` under a
/// plain `cargo test`, `target/release` under `--release`, and wherever
/// `CARGO_TARGET_DIR` or `--target` put it). Test binaries live in its
/// `deps/` directory; for a binary that does not (a doctest), falls back to
/// `$CARGO_TARGET_DIR/debug` or `<workspace>/target/debug`.
pub fn profile_dir() -> PathBuf {
    let exe = env::current_exe().ok();
    let exe_dir = exe.as_deref().and_then(Path::parent);
    if let Some(dir) = exe_dir {
        let name = dir.file_name().and_then(|n| n.to_str());
        if let (Some("deps" | "examples"), Some(profile)) = (name, dir.parent()) {
            return profile.to_path_buf();
        }
    }
    let target = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("debug")
}

/// The target directory itself (`target/`, or `CARGO_TARGET_DIR`): the
/// parent of [`profile_dir`], or its grandparent when the test was built
/// with `--target <triple>`.
pub fn target_dir() -> PathBuf {
    target_layout().0
}

/// (target dir, `--target` triple if the test was cross-built).
fn target_layout() -> (PathBuf, Option<OsString>) {
    let profile = profile_dir();
    let parent = profile.parent().map(Path::to_path_buf).unwrap_or_default();
    // Cargo marks the root of every target directory with CACHEDIR.TAG;
    // target/<triple>/ has none.
    let is_root = |dir: &Path| dir.join("CACHEDIR.TAG").exists();
    match parent.parent() {
        Some(root) if !is_root(&parent) && is_root(root) => {
            (root.to_path_buf(), parent.file_name().map(OsString::from))
        }
        _ => (parent, None),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A build that panicked in another test leaves nothing half-done in the
    // set (entries are added after success), so poisoning is harmless.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The path of the bundled Rust echo plugin, built if needed.
pub fn echo_plugin() -> PathBuf {
    rust_plugin("halfsync-plugin-echo", "echo")
}

/// The path of the C echo plugin (`plugins/c/echo.c`), built if needed.
pub fn c_echo_plugin() -> PathBuf {
    c_plugin("plugins/c/echo.c")
}

/// The path of the C++ echo plugin (`plugins/c/test/cxx_echo.cpp`, built
/// with `-fvisibility=hidden` against the C header), built if needed.
pub fn cxx_echo_plugin() -> PathBuf {
    c_plugin("plugins/c/test/cxx_echo.cpp")
}

/// The path of the Rust fault-injection plugin (`plugins/fault`,
/// `libfault.so`), built if needed. Its commands are in [`fault`].
pub fn fault_plugin() -> PathBuf {
    rust_plugin("halfsync-plugin-fault", "fault")
}

/// The path of the C fault-injection plugin (`plugins/c/test/fault.c`,
/// `test-plugins/libfault.so`), built if needed. Its commands are in
/// [`fault`].
pub fn c_fault_plugin() -> PathBuf {
    c_plugin("plugins/c/test/fault.c")
}

/// The command numbers and constants of the fault-injection plugins
/// ([`fault_plugin`], [`c_fault_plugin`]), mirrored from the
/// `halfsync-plugin-fault` crate (tests cannot link a `cdylib`); see its
/// crate documentation for what each does. Every command not listed echoes.
///
/// A test in `testkit/tests/fault_plugins.rs` checks that this module, the
/// Rust crate and the C file agree.
pub mod fault {
    /// Echo the payload (also what every command not listed does).
    pub const ECHO: u16 = 1;
    /// Die of SIGSEGV (a real invalid write).
    pub const SEGV: u16 = 10;
    /// `abort()`: die of SIGABRT.
    pub const ABORT: u16 = 11;
    /// Rust: a panic the SDK catches (PLUGIN_ERROR `plugin panicked; the
    /// server log has its message`, the log line `plugin panicked: fault:
    /// requested panic ...`); C: PLUGIN_ERROR `fault: requested error`.
    pub const PANIC: u16 = 12;
    /// A panic that escapes the SDK (C: `raise(SIGABRT)`): dies of SIGABRT.
    pub const ESCAPING_PANIC: u16 = 13;
    /// `exit(0)` in the middle of the request.
    pub const EXIT: u16 = 14;
    /// Never return (without burning CPU).
    pub const HANG: u16 = 15;
    /// Sleep for payload `u32` BE milliseconds (default
    /// [`SLOW_DEFAULT_MS`]), then echo.
    pub const SLOW: u16 = 16;
    /// Leak payload `u32` BE MiB (default [`LEAK_DEFAULT_MIB`]), touched,
    /// then echo.
    pub const LEAK: u16 = 17;
    /// Corrupt this worker's slot; the first payload byte is one of the
    /// `SCRIBBLE_*` variants.
    pub const SCRIBBLE: u16 = 18;
    /// Die of SIGBUS (a real bus error).
    pub const SIGBUS: u16 = 19;
    /// `kill(getpid(), SIGKILL)`.
    pub const SIGKILL: u16 = 20;
    /// Write `capacity + 1` bytes into the reply: PLUGIN_ERROR.
    pub const REPLY_TOO_BIG: u16 = 21;
    /// C: return status 4 (the worker sends PLUGIN_ERROR `plugin returned
    /// reserved status 4`). Rust: PLUGIN_ERROR `fault: the Rust SDK cannot
    /// return reserved status 4` (its `Status` cannot hold 4).
    pub const RESERVED_STATUS: u16 = 22;
    /// Reply [`CUSTOM_STATUS`] with payload `custom`.
    pub const CUSTOM: u16 = 23;
    /// Reply the payload's length (`u32` BE), then the payload, in 4 KiB
    /// pieces; C reserves the length first and fills it last.
    pub const PREFIXED: u16 = 24;
    /// Rust: log the payload with `log::warn!` (the log crate, forwarded
    /// to halfsync's log by the SDK), then echo. C: echo.
    pub const LOG_CRATE: u16 = 26;
    /// Reply `group=NAME worker=N` from what the host told init (`-` for
    /// none).
    pub const WHOAMI: u16 = 27;

    /// The status of [`CUSTOM`]'s reply.
    pub const CUSTOM_STATUS: u16 = 150;
    /// The status the C plugin returns for [`RESERVED_STATUS`].
    pub const RESERVED_STATUS_CODE: u16 = 4;
    /// [`SLOW`]'s delay when the payload has fewer than 4 bytes.
    pub const SLOW_DEFAULT_MS: u32 = 100;
    /// [`LEAK`]'s size when the payload has fewer than 4 bytes.
    pub const LEAK_DEFAULT_MIB: u32 = 16;

    /// [`SCRIBBLE`]: fill the reply ring header's first 128 bytes (`tail`,
    /// `head`) with `0xA5`, then hang.
    pub const SCRIBBLE_REPLY_HEADER_HANG: u8 = 0;
    /// [`SCRIBBLE`]: fill the control block's first 128 bytes with `0xA5`,
    /// then hang.
    pub const SCRIBBLE_CONTROL_HANG: u8 = 1;
    /// [`SCRIBBLE`]: fill the reply ring header with `0xA5`, then echo.
    pub const SCRIBBLE_REPLY_HEADER_RETURN: u8 = 2;
    /// [`SCRIBBLE`]: fill the reply ring data area with random bytes, then
    /// hang.
    pub const SCRIBBLE_REPLY_DATA_HANG: u8 = 3;
    /// [`SCRIBBLE`]: set the running request's start time in the control
    /// block a year ahead, then hang.
    pub const SCRIBBLE_FUTURE_START_HANG: u8 = 4;
    /// Where the control block keeps the running request's start time.
    pub const CONTROL_BUSY_SINCE_OFFSET: u32 = 48;
}

/// Builds the Rust `cdylib` plugin `package` (once per test process) with
/// `cargo build -p <package>` in the test's own target directory and
/// profile, and returns `profile_dir()/lib<lib_name>.so`.
///
/// Uses `$CARGO` (set by `cargo test`), else `cargo` from `PATH`. Cargo's
/// own lock serialises concurrent builds from parallel test processes.
///
/// # Panics
/// With cargo's output, if the build fails or does not produce the file.
pub fn rust_plugin(package: &str, lib_name: &str) -> PathBuf {
    static BUILT: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let out = profile_dir().join(format!("lib{lib_name}.so"));
    let mut built = lock(&BUILT);
    if built.get_or_insert_with(HashSet::new).contains(package) {
        return out;
    }
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let (target_dir, triple) = target_layout();
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "--lib", "-p", package, "--target-dir"])
        .arg(&target_dir);
    match profile_dir().file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(custom) => {
            cmd.args(["--profile", custom]);
        }
    }
    if let Some(triple) = &triple {
        cmd.arg("--target").arg(triple);
    }
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        output.status.success(),
        "building plugin {package} failed ({cmd:?}):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        out.exists(),
        "{cmd:?} succeeded but {} does not exist; is `lib.name = \"{lib_name}\"` and \
         `crate-type = [\"cdylib\"]` in {package}'s Cargo.toml?",
        out.display()
    );
    built
        .get_or_insert_with(HashSet::new)
        .insert(package.to_owned());
    out
}

/// Compiles the C plugin at `src_rel` (relative to the workspace root) into
/// `profile_dir()/test-plugins/lib<stem>.so` and returns that path.
///
/// Flags: `-shared -fPIC -O2 -Wall -Wextra -I <workspace>/plugin-api/include`
/// with `$CC` (else `cc`); a `.cpp` source is C++, built with `$CXX` (else
/// `c++`) and `-std=c++17 -fvisibility=hidden` added. Compiles only when the output is missing or older
/// than the source, a `.h` beside it, or the plugin header; writes to a
/// temporary name and renames, so parallel test processes never see a
/// half-written file. Undefined symbols are allowed (it is a shared
/// object), which `plugins/c/test/undefined_symbol.c` relies on.
///
/// # Panics
/// With the compiler's output, if compiling fails.
pub fn c_plugin(src_rel: &str) -> PathBuf {
    static BUILT: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);
    let root = workspace_root();
    let src = root.join(src_rel);
    let stem = src
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_else(|| panic!("C plugin source {src_rel} has no file name"));
    let out_dir = profile_dir().join("test-plugins");
    let out = out_dir.join(format!("lib{stem}.so"));
    let mut built = lock(&BUILT);
    if built.get_or_insert_with(HashSet::new).contains(&out) {
        return out;
    }
    let include = root.join("plugin-api/include");
    if !is_fresh(&out, &c_inputs(&src, &include)) {
        fs::create_dir_all(&out_dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", out_dir.display()));
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let tmp = out_dir.join(format!(".lib{stem}.so.{}.{nanos}.tmp", std::process::id()));
        let cxx = src.extension().is_some_and(|e| e == "cpp");
        let cc = if cxx {
            env::var_os("CXX").unwrap_or_else(|| "c++".into())
        } else {
            env::var_os("CC").unwrap_or_else(|| "cc".into())
        };
        let mut cmd = Command::new(&cc);
        if cxx {
            cmd.args(["-std=c++17", "-fvisibility=hidden"]);
        }
        cmd.args(["-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-I"])
            .arg(&include)
            .arg(&src)
            .arg("-o")
            .arg(&tmp);
        let output = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run the C compiler {cmd:?}: {e}"));
        if !output.status.success() {
            let _ = fs::remove_file(&tmp);
            panic!(
                "compiling C plugin {src_rel} failed ({cmd:?}):\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        fs::rename(&tmp, &out).unwrap_or_else(|e| {
            let _ = fs::remove_file(&tmp);
            panic!("cannot rename {} to {}: {e}", tmp.display(), out.display())
        });
    }
    built.get_or_insert_with(HashSet::new).insert(out.clone());
    out
}

/// The files a C plugin's build depends on: the source, every `.h` beside
/// it, every `.h` in the plugin-api include directory.
fn c_inputs(src: &Path, include: &Path) -> Vec<PathBuf> {
    let mut inputs = vec![src.to_path_buf()];
    for dir in [src.parent(), Some(include)].into_iter().flatten() {
        if let Ok(entries) = fs::read_dir(dir) {
            inputs.extend(
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "h")),
            );
        }
    }
    inputs
}

/// `true` when `out` exists and is at least as new as every input (a
/// missing input counts as changed, so the compiler reports it).
fn is_fresh(out: &Path, inputs: &[PathBuf]) -> bool {
    let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    let Some(built) = mtime(out) else {
        return false;
    };
    inputs.iter().all(|i| mtime(i).is_some_and(|t| t <= built))
}
