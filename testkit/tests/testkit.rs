//! The helpers against the real workspace: paths, building the Rust and C
//! plugins, and every shipped C file compiling warning-free.

use std::path::Path;
use std::process::Command;

use halfsync_testkit::{c_plugin, echo_plugin, profile_dir, target_dir, workspace_root};

#[test]
fn paths_point_into_this_workspace_and_target() {
    assert!(workspace_root().join("Cargo.toml").exists());
    assert!(
        workspace_root()
            .join("plugin-api/include/halfsync_plugin.h")
            .exists()
    );
    assert!(
        profile_dir().join("deps").is_dir(),
        "{}",
        profile_dir().display()
    );
    assert!(
        target_dir().join("CACHEDIR.TAG").exists(),
        "{}",
        target_dir().display()
    );
    assert!(profile_dir().starts_with(target_dir()));
}

fn exports(lib: &Path, symbol: &str) -> bool {
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(lib)
        .output();
    match out {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.ends_with(symbol)),
        // No binutils: trust the file's existence.
        Err(_) => true,
    }
}

#[test]
fn builds_the_rust_echo_plugin_once() {
    let lib = echo_plugin();
    assert_eq!(lib, profile_dir().join("libecho.so"));
    assert!(lib.exists());
    assert!(exports(&lib, " halfsync_plugin_v1"));
    let mtime = std::fs::metadata(&lib).unwrap().modified().unwrap();
    assert_eq!(echo_plugin(), lib);
    assert_eq!(std::fs::metadata(&lib).unwrap().modified().unwrap(), mtime);
}

#[test]
fn builds_c_plugins_into_test_plugins() {
    let lib = c_plugin("plugins/c/echo.c");
    assert_eq!(lib, profile_dir().join("test-plugins/libecho.so"));
    assert!(exports(&lib, " halfsync_plugin_v1"));
    let mtime = std::fs::metadata(&lib).unwrap().modified().unwrap();
    assert_eq!(c_plugin("plugins/c/echo.c"), lib);
    assert_eq!(std::fs::metadata(&lib).unwrap().modified().unwrap(), mtime);
}

#[test]
#[should_panic(expected = "compiling C plugin plugins/c/test/does_not_exist.c failed")]
fn a_c_plugin_that_does_not_compile_panics_with_the_compiler_output() {
    c_plugin("plugins/c/test/does_not_exist.c");
}

/// Every C file we ship builds with the strict flags of the docs
/// (`-Werror`), so plugin authors copying them start warning-free.
#[test]
fn every_shipped_c_file_compiles_with_werror() {
    let root = workspace_root();
    // Removed when dropped, also when an assertion below fails.
    let tmp = tempfile::Builder::new()
        .prefix("halfsync-werror-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let mut checked = 0;
    for sub in ["plugins/c", "plugins/c/test"] {
        for entry in std::fs::read_dir(root.join(sub)).unwrap() {
            let src = entry.unwrap().path();
            if src.extension().is_none_or(|e| e != "c") {
                continue;
            }
            let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
            let out = Command::new(cc)
                .args([
                    "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-std=c11", "-I",
                ])
                .arg(root.join("plugin-api/include"))
                .arg(&src)
                .arg("-o")
                .arg(dir.join("out.so"))
                .output()
                .expect("cc");
            assert!(
                out.status.success(),
                "{}:\n{}",
                src.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 9, "only {checked} C files found");
}
