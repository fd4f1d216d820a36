//! The Rust mirrors in `abi` against `include/halfsync_plugin.h`, as the
//! system C compiler lays it out: every struct's size and alignment, every
//! field's offset, and the constants.

use std::collections::BTreeMap;
use std::mem::{align_of, offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::Command;

use halfsync_plugin_api::abi::{self, HsHost, HsPlugin, HsReply, HsRequest};

/// (C name, field names) for every struct in the header.
const STRUCTS: &[(&str, &[&str])] = &[
    (
        "hs_request",
        &[
            "id",
            "command",
            "flags",
            "reserved",
            "payload",
            "payload_len",
        ],
    ),
    (
        "hs_reply",
        &[
            "struct_size",
            "reserved",
            "ctx",
            "capacity",
            "write",
            "reserve",
            "clear",
        ],
    ),
    (
        "hs_host",
        &[
            "abi_version",
            "struct_size",
            "ctx",
            "log",
            "group",
            "worker",
            "reserved",
        ],
    ),
    (
        "hs_plugin",
        &[
            "abi_version",
            "struct_size",
            "name",
            "version",
            "init",
            "handle",
            "fini",
        ],
    ),
];

const CONSTANTS: &[&str] = &[
    "HALFSYNC_ABI_VERSION",
    "HS_STATUS_OK",
    "HS_STATUS_PLUGIN_ERROR",
    "HS_STATUS_FIRST_PLUGIN_CODE",
    "HS_LOG_ERROR",
    "HS_LOG_WARN",
    "HS_LOG_INFO",
    "HS_LOG_DEBUG",
    "HS_NOT_A_WORKER",
    "HALFSYNC_ABI_MINOR",
];

/// The same facts, from the Rust side, keyed like the C program's output.
fn rust_layout() -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: usize| {
        m.insert(k.to_owned(), v as u64);
    };
    macro_rules! layout {
        ($c:literal, $ty:ty, [$($field:ident),*]) => {
            put(concat!($c, ".size"), size_of::<$ty>());
            put(concat!($c, ".align"), align_of::<$ty>());
            $(put(concat!($c, ".", stringify!($field)), offset_of!($ty, $field));)*
        };
    }
    layout!(
        "hs_request",
        HsRequest,
        [id, command, flags, reserved, payload, payload_len]
    );
    layout!(
        "hs_reply",
        HsReply,
        [struct_size, reserved, ctx, capacity, write, reserve, clear]
    );
    layout!(
        "hs_host",
        HsHost,
        [abi_version, struct_size, ctx, log, group, worker, reserved]
    );
    layout!(
        "hs_plugin",
        HsPlugin,
        [abi_version, struct_size, name, version, init, handle, fini]
    );
    put("HALFSYNC_ABI_VERSION", abi::ABI_VERSION as usize);
    put("HS_STATUS_OK", abi::STATUS_OK.into());
    put("HS_STATUS_PLUGIN_ERROR", abi::STATUS_PLUGIN_ERROR.into());
    put(
        "HS_STATUS_FIRST_PLUGIN_CODE",
        abi::STATUS_FIRST_PLUGIN_CODE.into(),
    );
    put("HS_LOG_ERROR", abi::LOG_ERROR as usize);
    put("HS_LOG_WARN", abi::LOG_WARN as usize);
    put("HS_LOG_INFO", abi::LOG_INFO as usize);
    put("HS_LOG_DEBUG", abi::LOG_DEBUG as usize);
    put("HS_NOT_A_WORKER", abi::NOT_A_WORKER as usize);
    put("HALFSYNC_ABI_MINOR", abi::ABI_MINOR as usize);
    m
}

fn c_program() -> String {
    let mut src = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include \"halfsync_plugin.h\"\n\
         #define P(k, v) printf(\"%s %zu\\n\", k, (size_t)(v))\nint main(void) {\n",
    );
    for (name, fields) in STRUCTS {
        src += &format!("P(\"{name}.size\", sizeof({name}));\n");
        src += &format!("P(\"{name}.align\", _Alignof({name}));\n");
        for f in *fields {
            src += &format!("P(\"{name}.{f}\", offsetof({name}, {f}));\n");
        }
    }
    for c in CONSTANTS {
        src += &format!("P(\"{c}\", {c});\n");
    }
    // The entry symbol's name, checked separately.
    src += "printf(\"entry %s\\n\", HALFSYNC_PLUGIN_ENTRY);\nreturn 0;\n}\n";
    src
}

fn include_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("include")
}

#[test]
fn rust_mirrors_match_the_c_header() {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    if Command::new(&cc).arg("--version").output().is_err() {
        eprintln!("SKIPPED: no C compiler `{cc}` on PATH; the ABI layout is unchecked");
        return;
    }
    let dir = std::env::temp_dir().join(format!("halfsync-abi-layout-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(dir.clone());
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("layout.c");
    let exe = dir.join("layout");
    std::fs::write(&src, c_program()).unwrap();
    let out = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(include_dir())
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "compiling the layout probe failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&exe).output().unwrap();
    assert!(out.status.success());
    let _ = std::fs::remove_dir_all(&dir);

    let text = String::from_utf8(out.stdout).unwrap();
    let mut c = BTreeMap::new();
    let mut entry = None;
    for line in text.lines() {
        let (k, v) = line.split_once(' ').unwrap();
        if k == "entry" {
            entry = Some(v.to_owned());
        } else {
            c.insert(k.to_owned(), v.parse::<u64>().unwrap());
        }
    }
    let rust = rust_layout();
    assert_eq!(
        c.len(),
        rust.len(),
        "the probe and the Rust side list different facts"
    );
    for (k, v) in &c {
        assert_eq!(
            rust.get(k),
            Some(v),
            "{k}: C says {v}, Rust says {:?}",
            rust.get(k)
        );
    }
    let entry = entry.expect("entry line");
    assert_eq!(entry, abi::ENTRY_NAME);
    assert_eq!(abi::ENTRY_SYMBOL, format!("{entry}\0").as_bytes());
}

/// Removes a test's directory when dropped, also when an assertion fails.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
