//! The plugin loader against real shared objects: the Rust and C echo
//! plugins, and one broken C plugin per way a plugin can fail to load or
//! start. Each error must name the file, the reason and the fix.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use halfsync_testkit::{c_echo_plugin, c_plugin, echo_plugin};
use halfsync_worker::plugin::{InitError, Instance, LoadError, Plugin};

fn load(path: &Path) -> Plugin {
    Plugin::load(path).unwrap_or_else(|e| panic!("{e}"))
}

fn start(path: &Path) -> Instance {
    load(path).init("").unwrap_or_else(|e| panic!("{e}"))
}

fn load_err(path: &Path) -> LoadError {
    match Plugin::load(path) {
        Ok(p) => panic!("{} loaded as {:?}", path.display(), p.name()),
        Err(e) => {
            assert_eq!(e.path(), path);
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("plugin {}: ", path.display())),
                "{msg}"
            );
            assert!(!msg.contains('\n'), "{msg}");
            e
        }
    }
}

/// Runs one request with a reply buffer of `cap` bytes; returns the status
/// and the payload.
fn call(inst: &mut Instance, command: u16, payload: &[u8], cap: usize) -> (u16, Vec<u8>) {
    let mut out = vec![0xEE; cap];
    let (status, len) = inst.handle(42, command, 0, payload, &mut out);
    assert!(len <= cap);
    out.truncate(len);
    (status, out)
}

fn check_echo(path: &Path, too_big_msg: &str) {
    let mut inst = start(path);
    assert_eq!(call(&mut inst, 1, b"hello", 64), (0, b"hello".to_vec()));
    assert_eq!(call(&mut inst, 1, b"", 64), (0, Vec::new()));
    assert_eq!(call(&mut inst, 1, b"", 0), (0, Vec::new()));
    let big: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(call(&mut inst, 1, &big, 65536), (0, big.clone()));
    // One byte over the capacity: the write fails, the plugin reports it,
    // cut to the capacity.
    let (status, msg) = call(&mut inst, 1, &big, 65535);
    assert_eq!(status, 1);
    assert_eq!(String::from_utf8(msg).unwrap(), too_big_msg);
    let (status, msg) = call(&mut inst, 1, b"0123456789", 5);
    assert_eq!((status, msg.len()), (1, 5));
    // And it goes on serving.
    assert_eq!(call(&mut inst, 1, b"again", 5), (0, b"again".to_vec()));
    inst.fini();
}

#[test]
fn rust_echo_loads_and_echoes() {
    let path = echo_plugin();
    let plugin = load(&path);
    assert_eq!(plugin.name(), "echo");
    assert_eq!(plugin.version(), "0.1.0");
    assert_eq!(plugin.path(), path);
    check_echo(
        &path,
        "reply full: 65536 bytes do not fit in the 65535 bytes left",
    );
}

#[test]
fn c_echo_loads_and_echoes() {
    let path = c_echo_plugin();
    let plugin = load(&path);
    assert_eq!((plugin.name(), plugin.version()), ("c_echo", "1.0.0"));
    check_echo(&path, "c_echo: payload does not fit in the reply");
}

#[test]
fn a_plugin_loads_twice_and_instances_are_independent() {
    let path = echo_plugin();
    let mut a = start(&path);
    let mut b = load(&path).init("anything = 1").unwrap();
    assert_eq!(call(&mut a, 1, b"a", 8), (0, b"a".to_vec()));
    assert_eq!(call(&mut b, 1, b"b", 8), (0, b"b".to_vec()));
    a.fini();
    b.fini();
}

#[test]
fn host_writes_reserves_and_clears_within_capacity() {
    let mut inst = start(&c_plugin("plugins/c/test/reply_ops.c"));
    assert_eq!(call(&mut inst, 1, b"", 8), (0, b"xyz.....".to_vec()));
    assert_eq!(call(&mut inst, 1, b"", 3), (0, b"xyz".to_vec()));
    assert_eq!(call(&mut inst, 2, b"abc", 6), (0, b"abcabc".to_vec()));
    assert_eq!(call(&mut inst, 2, b"abc", 5), (101, b"abc".to_vec()));
}

#[test]
fn statuses_reserved_for_the_server_become_plugin_errors() {
    let mut inst = start(&c_plugin("plugins/c/test/reply_ops.c"));
    let status = |inst: &mut Instance, s: &str, cap| call(inst, 0, s.as_bytes(), cap);
    assert_eq!(status(&mut inst, "0", 64), (0, b"written".to_vec()));
    assert_eq!(status(&mut inst, "1", 64), (1, b"written".to_vec()));
    assert_eq!(status(&mut inst, "100", 64), (100, b"written".to_vec()));
    assert_eq!(status(&mut inst, "65535", 64), (65535, b"written".to_vec()));
    for s in ["2", "5", "99"] {
        let msg = format!("plugin returned reserved status {s}");
        assert_eq!(status(&mut inst, s, 64), (1, msg.into_bytes()));
    }
    for s in ["-1", "65536", "2147483647"] {
        let msg = format!("plugin returned invalid status {s}");
        assert_eq!(status(&mut inst, s, 64), (1, msg.into_bytes()));
    }
    // Cut to the capacity.
    assert_eq!(status(&mut inst, "7", 6), (1, b"plugin".to_vec()));
}

#[test]
fn missing_file() {
    let path = PathBuf::from("/nonexistent/halfsync/libnothing.so");
    let e = load_err(&path);
    assert!(matches!(e, LoadError::NotFound { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "plugin /nonexistent/halfsync/libnothing.so: file not found; build it or fix `plugin` \
         in the config (a bare name like \"farm\" means libfarm.so next to the halfsync binary; \
         other relative paths are relative to the config file's directory)"
    );
    // A bare name is a path relative to the current directory, never a
    // library-path lookup (libc.so.6 exists on the library path).
    assert!(matches!(
        load_err(Path::new("libc.so.6")),
        LoadError::NotFound { .. }
    ));
}

#[test]
fn not_a_shared_object() {
    let path = halfsync_testkit::workspace_root().join("plugins/c/echo.c");
    let e = load_err(&path);
    assert!(matches!(e, LoadError::Open { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains(": cannot load: "), "{msg}");
    // dlerror's own copy of the path is stripped.
    assert_eq!(
        msg.matches(&*path.display().to_string()).count(),
        1,
        "{msg}"
    );
}

#[test]
fn undefined_symbol_fails_at_load_time() {
    let path = c_plugin("plugins/c/test/undefined_symbol.c");
    let e = load_err(&path);
    assert!(matches!(e, LoadError::Open { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!(
            "plugin {}: cannot load: undefined symbol: halfsync_test_no_such_function; it uses \
             a symbol that neither it nor the libraries it links provide: link the missing \
             library or rebuild it",
            path.display()
        )
    );
}

#[test]
fn built_for_another_abi_version() {
    let path = c_plugin("plugins/c/test/v2_only.c");
    let e = load_err(&path);
    assert!(
        matches!(
            e,
            LoadError::NoEntry {
                other_version: Some(2),
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!(
            "plugin {}: no entry symbol `halfsync_plugin_v1`; it was built for ABI version 2 (it \
             exports `halfsync_plugin_v2`), this halfsync speaks ABI 1: rebuild it against this \
             halfsync's plugin-api",
            path.display()
        )
    );
}

#[test]
fn not_a_plugin() {
    let path = c_plugin("plugins/c/test/no_entry.c");
    let e = load_err(&path);
    assert!(
        matches!(
            e,
            LoadError::NoEntry {
                other_version: None,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!(
            "plugin {}: no entry symbol `halfsync_plugin_v1`: not a halfsync plugin (in C, \
             define `const hs_plugin *halfsync_plugin_v1(void)` from halfsync_plugin.h; in \
             Rust, use halfsync_plugin_api::export_plugin!)",
            path.display()
        )
    );
}

#[test]
fn table_with_another_abi_version() {
    let path = c_plugin("plugins/c/test/wrong_abi.c");
    let e = load_err(&path);
    assert!(
        matches!(e, LoadError::AbiMismatch { found: 2, .. }),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!(
            "plugin {}: ABI version 2 in its table, this halfsync speaks 1: rebuild against this \
             halfsync's plugin-api",
            path.display()
        )
    );
}

#[test]
fn entry_returning_null() {
    let path = c_plugin("plugins/c/test/bad_table.c");
    let e = load_err(&path);
    assert!(matches!(e, LoadError::NullTable { .. }), "{e:?}");
    assert!(
        e.to_string()
            .contains("entry `halfsync_plugin_v1` returned NULL"),
        "{e}"
    );
}

#[test]
fn table_too_small() {
    let path = c_plugin("plugins/c/test/short_table.c");
    let e = load_err(&path);
    assert!(
        matches!(
            e,
            LoadError::TableTooSmall {
                size: 24,
                need: 48,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!(
            "plugin {}: table too small (24 bytes, need 48); rebuild it against this halfsync's \
             plugin-api (halfsync_plugin.h)",
            path.display()
        )
    );
}

#[test]
fn table_without_handle() {
    let path = c_plugin("plugins/c/test/no_handle.c");
    let e = load_err(&path);
    assert!(
        matches!(
            e,
            LoadError::MissingFunction {
                function: "handle",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .ends_with("table has no `handle` function (NULL); the plugin must set it"),
        "{e}"
    );
}

#[test]
fn init_failure_carries_the_plugins_reason() {
    let path = c_plugin("plugins/c/test/init_fails.c");
    let plugin = load(&path);
    let e = plugin.init("db = \"\"").unwrap_err();
    assert!(matches!(e, InitError::Failed { code: 7, .. }), "{e:?}");
    assert_eq!(e.reason(), "missing required key `db`");
    assert_eq!(
        e.to_string(),
        format!(
            "plugin {} (init_fails): init failed: missing required key `db`",
            path.display()
        )
    );
}

#[test]
fn config_with_a_nul_byte_is_refused_before_init() {
    let path = echo_plugin();
    let e = load(&path).init("a = 1\0").unwrap_err();
    assert!(
        matches!(e, InitError::ConfigHasNul { offset: 5, .. }),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .starts_with(&format!("plugin {} (echo): ", path.display())),
        "{e}"
    );
}

// ---------------------------------------------------------------------------
// Plugin logs reach `tracing`

type Events = Arc<Mutex<Vec<(tracing::Level, String, String, String)>>>;

/// A minimal subscriber that records (level, target, plugin field, message).
struct Capture(Events);

#[derive(Default)]
struct Fields {
    plugin: String,
    message: String,
}

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "plugin" {
            self.plugin = value.to_owned();
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        }
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let meta = event.metadata();
        self.0.lock().unwrap().push((
            *meta.level(),
            meta.target().to_owned(),
            fields.plugin,
            fields.message,
        ));
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn plugin_logs_go_to_tracing_with_the_plugin_name() {
    let events: Events = Arc::default();
    let path = c_echo_plugin();
    tracing::subscriber::with_default(Capture(events.clone()), || {
        let mut inst = start(&path);
        call(&mut inst, 1, b"x", 8);
        inst.fini();
    });
    let events = events.lock().unwrap();
    let plugin_events: Vec<_> = events.iter().filter(|e| e.1 == "plugin").collect();
    assert_eq!(
        plugin_events,
        [
            &(
                tracing::Level::INFO,
                "plugin".to_owned(),
                "c_echo".to_owned(),
                "c_echo ready".to_owned()
            ),
            &(
                tracing::Level::INFO,
                "plugin".to_owned(),
                "c_echo".to_owned(),
                "c_echo served 1 requests".to_owned()
            ),
        ]
    );
}

/// Something other than a regular file at the plugin path is refused at
/// once, by kind: a FIFO would block dlopen until `init_timeout`.
#[test]
fn not_a_regular_file_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("libfifo.so");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let started = std::time::Instant::now();
    let e = load_err(&fifo);
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    assert_eq!(
        e.to_string(),
        format!(
            "plugin {}: not a regular file (a FIFO); point `plugin` at the .so file",
            fifo.display()
        )
    );
    let e = load_err(dir.path());
    assert!(
        e.to_string().contains("not a regular file (a directory)"),
        "{e}"
    );
}
