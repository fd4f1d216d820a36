//! The fault-injection plugins: both build, and the command numbers agree
//! between the Rust crate, the C file and [`halfsync_testkit::fault`].
//! (What each command does is tested through the loader in
//! `worker/tests/fault_plugins.rs`.)

use std::process::Command;

use halfsync_testkit::{c_fault_plugin, fault, fault_plugin, profile_dir, workspace_root};

fn exports_entry(lib: &std::path::Path) -> bool {
    match Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(lib)
        .output()
    {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.ends_with(" halfsync_plugin_v1")),
        // No binutils: trust the file's existence.
        Err(_) => true,
    }
}

#[test]
fn both_fault_plugins_build_and_export_the_entry() {
    let rust = fault_plugin();
    assert_eq!(rust, profile_dir().join("libfault.so"));
    let c = c_fault_plugin();
    assert_eq!(c, profile_dir().join("test-plugins/libfault.so"));
    for lib in [rust, c] {
        assert!(lib.exists(), "{}", lib.display());
        assert!(exports_entry(&lib), "{}", lib.display());
    }
}

/// (name in the Rust crate and here, name of the C `#define`, value).
const NUMBERS: &[(&str, &str, u32)] = &[
    ("ECHO", "FAULT_ECHO", fault::ECHO as u32),
    ("SEGV", "FAULT_SEGV", fault::SEGV as u32),
    ("ABORT", "FAULT_ABORT", fault::ABORT as u32),
    ("PANIC", "FAULT_ERROR", fault::PANIC as u32),
    (
        "ESCAPING_PANIC",
        "FAULT_ESCAPING_PANIC",
        fault::ESCAPING_PANIC as u32,
    ),
    ("EXIT", "FAULT_EXIT", fault::EXIT as u32),
    ("HANG", "FAULT_HANG", fault::HANG as u32),
    ("SLOW", "FAULT_SLOW", fault::SLOW as u32),
    ("LEAK", "FAULT_LEAK", fault::LEAK as u32),
    ("SCRIBBLE", "FAULT_SCRIBBLE", fault::SCRIBBLE as u32),
    ("SIGBUS", "FAULT_SIGBUS", fault::SIGBUS as u32),
    ("SIGKILL", "FAULT_SIGKILL", fault::SIGKILL as u32),
    (
        "REPLY_TOO_BIG",
        "FAULT_REPLY_TOO_BIG",
        fault::REPLY_TOO_BIG as u32,
    ),
    (
        "RESERVED_STATUS",
        "FAULT_RESERVED_STATUS",
        fault::RESERVED_STATUS as u32,
    ),
    ("CUSTOM", "FAULT_CUSTOM", fault::CUSTOM as u32),
    ("PREFIXED", "FAULT_PREFIXED", fault::PREFIXED as u32),
    ("LOG_CRATE", "FAULT_LOG_CRATE", fault::LOG_CRATE as u32),
    ("WHOAMI", "FAULT_WHOAMI", fault::WHOAMI as u32),
    (
        "CUSTOM_STATUS",
        "FAULT_CUSTOM_STATUS",
        fault::CUSTOM_STATUS as u32,
    ),
    (
        "RESERVED_STATUS_CODE",
        "FAULT_RESERVED_STATUS_CODE",
        fault::RESERVED_STATUS_CODE as u32,
    ),
    (
        "SLOW_DEFAULT_MS",
        "FAULT_SLOW_DEFAULT_MS",
        fault::SLOW_DEFAULT_MS,
    ),
    (
        "LEAK_DEFAULT_MIB",
        "FAULT_LEAK_DEFAULT_MIB",
        fault::LEAK_DEFAULT_MIB,
    ),
    (
        "SCRIBBLE_REPLY_HEADER_HANG",
        "SCRIBBLE_REPLY_HEADER_HANG",
        fault::SCRIBBLE_REPLY_HEADER_HANG as u32,
    ),
    (
        "SCRIBBLE_CONTROL_HANG",
        "SCRIBBLE_CONTROL_HANG",
        fault::SCRIBBLE_CONTROL_HANG as u32,
    ),
    (
        "SCRIBBLE_REPLY_HEADER_RETURN",
        "SCRIBBLE_REPLY_HEADER_RETURN",
        fault::SCRIBBLE_REPLY_HEADER_RETURN as u32,
    ),
    (
        "SCRIBBLE_REPLY_DATA_HANG",
        "SCRIBBLE_REPLY_DATA_HANG",
        fault::SCRIBBLE_REPLY_DATA_HANG as u32,
    ),
    (
        "SCRIBBLE_FUTURE_START_HANG",
        "SCRIBBLE_FUTURE_START_HANG",
        fault::SCRIBBLE_FUTURE_START_HANG as u32,
    ),
    (
        "CONTROL_BUSY_SINCE_OFFSET",
        "CONTROL_BUSY_SINCE_OFFSET",
        fault::CONTROL_BUSY_SINCE_OFFSET,
    ),
];

/// The value of `pub const <name>: <ty> = <value>;` in Rust source.
fn rust_const(src: &str, name: &str) -> Option<u32> {
    let prefix = format!("pub const {name}: ");
    let line = src
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(&prefix))?;
    let value = line.split_once('=')?.1.trim().trim_end_matches(';');
    value.trim().parse().ok()
}

/// The value of `#define <name> <value>` (an optional `u` suffix) in C.
fn c_define(src: &str, name: &str) -> Option<u32> {
    let prefix = format!("#define {name} ");
    let line = src.lines().find(|l| l.starts_with(&prefix))?;
    let value = line[prefix.len()..].trim().trim_end_matches('u');
    value.parse().ok()
}

#[test]
fn command_numbers_agree_between_rust_c_and_testkit() {
    let root = workspace_root();
    let rust = std::fs::read_to_string(root.join("plugins/fault/src/lib.rs")).unwrap();
    let c = std::fs::read_to_string(root.join("plugins/c/test/fault.c")).unwrap();
    let testkit = std::fs::read_to_string(root.join("testkit/src/lib.rs")).unwrap();
    for &(name, c_name, value) in NUMBERS {
        assert_eq!(
            rust_const(&rust, name),
            Some(value),
            "plugins/fault: {name}"
        );
        assert_eq!(c_define(&c, c_name), Some(value), "fault.c: {c_name}");
        assert_eq!(rust_const(&testkit, name), Some(value), "testkit: {name}");
    }
    // Every `pub const` of the Rust crate is mirrored here.
    let mirrored = |name: &str| NUMBERS.iter().any(|&(n, _, _)| n == name);
    for line in rust.lines() {
        if let Some(rest) = line.strip_prefix("pub const ") {
            let name = rest.split(':').next().unwrap();
            assert!(mirrored(name), "{name} is not mirrored in testkit::fault");
        }
    }
}
