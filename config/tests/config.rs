//! Integration tests for `halfsync-config`: defaults, the reference file,
//! every error path and its one-line message, round trips, plugin paths.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use halfsync_config::{
    Config, DEFAULT_CONFIG, EXAMPLE_CONFIG, Error, Group, MAX_GROUPS, Origin, Server,
    resolve_plugin,
};

const MIB: u64 = 1 << 20;

fn file() -> Origin {
    Origin::File(PathBuf::from("halfsync.toml"))
}

/// Parses `text` as if read from `halfsync.toml`, expecting an error.
fn err(text: &str) -> Error {
    match Config::from_toml(text, file()) {
        Ok(cfg) => panic!("expected an error for {text:?}, got {cfg:?}"),
        Err(e) => {
            let shown = e.to_string();
            assert!(!shown.contains('\n') && !shown.contains('\r'), "{shown:?}");
            e
        }
    }
}

fn err_text(text: &str) -> String {
    err(text).to_string()
}

/// A minimal valid document with `server` lines prepended.
fn with_server(lines: &str) -> String {
    format!("[server]\n{lines}\n[[group]]\nname = \"a\"\nplugin = \"a\"\n")
}

fn ok(text: &str) -> Config {
    match Config::from_toml(text, file()) {
        Ok(cfg) => cfg,
        Err(e) => panic!("unexpected error for {text:?}: {e}"),
    }
}

fn assert_round_trip(cfg: &Config) {
    let text = toml::to_string(cfg).expect("serialize");
    let again = Config::from_toml(&text, cfg.origin.clone())
        .unwrap_or_else(|e| panic!("re-parse failed: {e}\n{text}"));
    assert_eq!(&again, cfg, "{text}");
}

#[test]
fn default_config_has_the_stated_values() {
    let parsed = Config::from_toml(DEFAULT_CONFIG, Origin::Embedded).expect("default parses");
    assert_eq!(parsed, Config::embedded_default());

    let s = &parsed.server;
    assert_eq!(
        s.listen,
        vec!["127.0.0.1:7878".parse::<SocketAddr>().unwrap()]
    );
    assert_eq!(s.max_connections, 10_000);
    assert_eq!(s.idle_timeout, Duration::from_secs(60));
    assert_eq!(s.max_frame, 1 << 20);
    assert_eq!(s.shutdown_grace, Duration::from_secs(10));
    assert_eq!(s.ring_size, 4 * MIB);
    assert_eq!(s.backlog, 1024);
    assert_eq!(s.read_budget, 64 << 10);
    assert_eq!(*s, Server::default());

    assert_eq!(parsed.groups.len(), 1);
    let g = &parsed.groups[0];
    assert_eq!(g.name, "echo");
    assert_eq!(g.plugin, "echo");
    assert_eq!(g.workers, 2);
    assert_eq!(g.max_inflight, 1024);
    assert_eq!(g.max_inflight_time, Duration::from_millis(1));
    assert_eq!(g.max_queue, 1024);
    assert!(g.commands.is_empty());
    assert!(g.is_default_route());
    assert!(g.config.is_empty());
    assert_eq!(g.plugin_config_toml(), "");
    assert_eq!(*g, Group::new("echo", "echo"));

    assert_eq!(parsed.origin, Origin::Embedded);
    assert_eq!(parsed.config_dir(), None);
}

#[test]
fn server_table_is_optional() {
    let cfg = ok("[[group]]\nname = \"echo\"\nplugin = \"echo\"\n");
    assert_eq!(cfg.server, Server::default());
}

#[test]
fn example_file_parses() {
    assert_eq!(
        EXAMPLE_CONFIG,
        include_str!("../halfsync.example.toml"),
        "EXAMPLE_CONFIG is the reference file"
    );
    let cfg = Config::from_toml(
        EXAMPLE_CONFIG,
        Origin::File("/etc/halfsync/halfsync.toml".into()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // Every [server] key in the example shows its default.
    assert_eq!(cfg.server, Server::default());
    assert_eq!(cfg.groups.len(), 2);
    let echo = &cfg.groups[0];
    let mut defaults = Group::new("echo", "echo");
    defaults.config.insert("greeting".into(), "hi".into());
    assert_eq!(*echo, defaults);
    assert_eq!(echo.plugin_config_toml(), "greeting = \"hi\"\n");
    let jobs = &cfg.groups[1];
    assert_eq!(jobs.name, "jobs");
    assert_eq!(jobs.workers, 1);
    assert_eq!(jobs.commands, vec![7, 8]);
    assert!(!jobs.is_default_route());
    assert_eq!(
        cfg.plugin_path(jobs, Path::new("/usr/bin")),
        Path::new("/usr/bin/libecho.so")
    );
    assert_eq!(
        cfg.plugin_path(echo, Path::new("/usr/bin")),
        Path::new("/usr/bin/libecho.so")
    );
    assert_round_trip(&cfg);
}

#[test]
fn unknown_key_at_top_level() {
    let text = "[[group]]\nname = \"a\"\nplugin = \"a\"\n\nfoo = 1\n";
    // `foo` after [[group]] belongs to the group; put it before instead.
    assert_eq!(
        err_text(&format!("foo = 1\n{text}")),
        "halfsync.toml:1:1: unknown key `foo` at the top level, where only [server] and \
         [[group]] go: move it under [server] if it is a server setting, or under its [[group]]"
    );
    assert_eq!(
        err_text("[[group]]\nname = \"a\"\nplugin = \"a\"\n[extra]\nx = 1\n"),
        "halfsync.toml:4:2: unknown key `extra` at the top level, where only [server] and \
         [[group]] go: move it under [server] if it is a server setting, or under its [[group]]"
    );
    // A server setting above [server]: same advice; a misspelled table
    // name gets the suggestion.
    assert!(
        err_text("metrics_listen = \"127.0.0.1:9100\"\n[server]\n")
            .starts_with("halfsync.toml:1:1: unknown key `metrics_listen` at the top level"),
    );
    assert_eq!(
        err_text("[servr]\nlisten = [\"127.0.0.1:1\"]\n"),
        "halfsync.toml:1:2: unknown field `servr`; did you mean `server`?"
    );
}

#[test]
fn unknown_key_in_server() {
    let e = err(&with_server(
        "listen = [\"127.0.0.1:1\"]\nmax_conections = 5",
    ));
    assert!(matches!(e, Error::Schema { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "halfsync.toml:3:1: server: unknown field `max_conections`; did you mean `max_connections`?"
    );
    let loc = e.location().expect("location");
    assert_eq!(loc.source, "halfsync.toml");
    assert_eq!(loc.line_col, Some((3, 1)));
    assert_eq!(loc.key.as_deref(), Some("server"));
}

#[test]
fn unknown_key_in_group() {
    let text = "[server]\n\n[[group]]\nname = \"echo\"\nplugin = \"echo\"\n\nwokers = 2\n";
    assert_eq!(
        err_text(text),
        "halfsync.toml:7:1: group[0]: unknown field `wokers`; did you mean `workers`?"
    );
    // Nothing close: the valid keys are listed.
    let text = "[[group]]\nname = \"echo\"\nplugin = \"echo\"\nzzz = 2\n";
    let e = err_text(text);
    assert!(
        e.starts_with("halfsync.toml:4:1: group[0]: unknown field `zzz`; valid keys here: name, plugin, workers,"),
        "{e}"
    );
    assert!(
        e.contains("request_timeout") && e.contains("queue_timeout"),
        "{e}"
    );
}

#[test]
fn keys_inside_group_config_are_free() {
    let cfg = ok(
        "[[group]]\nname = \"a\"\nplugin = \"a\"\n[group.config]\nanything = 1\n\
                  nested = { deep = [1, 2] }\n[group.config.sub]\nx = \"y\"\n",
    );
    let text = cfg.groups[0].plugin_config_toml();
    let back: toml::Table = toml::from_str(&text).unwrap();
    assert_eq!(back, cfg.groups[0].config);
    assert_eq!(back["sub"]["x"].as_str(), Some("y"));
}

#[test]
fn wrong_type_names_key_path_and_line() {
    let text =
        "[server]\n\n[[group]]\nname = \"echo\"\nplugin = \"echo\"\n\n\n\nworkers = \"two\"\n";
    assert_eq!(
        err_text(text),
        "halfsync.toml:9:11: group[0].workers: invalid type: string \"two\", expected u32"
    );
    assert_eq!(
        err_text(&with_server("backlog = 1.5")),
        "halfsync.toml:2:11: server.backlog: invalid type: floating point `1.5`, expected u32"
    );
    assert_eq!(
        err_text("server = 5\n"),
        "halfsync.toml:1:10: server: invalid type: integer `5`, expected struct Server"
    );
    assert_eq!(
        err_text("[[group]]\nname = \"a\"\nplugin = \"a\"\ncommands = [1, 70000]\n"),
        "halfsync.toml:4:16: group[0].commands[1]: invalid value: integer `70000`, expected u16"
    );
    assert_eq!(
        err_text("[[group]]\nname = \"a\"\nplugin = \"a\"\nconfig = 5\n"),
        "halfsync.toml:4:10: group[0].config: invalid type: integer `5`, expected a map"
    );
}

#[test]
fn missing_required_group_keys() {
    assert_eq!(
        err_text("[[group]]\nplugin = \"a\"\n"),
        "halfsync.toml:1:1: group[0]: missing field `name`"
    );
    assert_eq!(
        err_text("[[group]]\nname = \"a\"\nplugin = \"a\"\n[[group]]\nname = \"b\"\n"),
        "halfsync.toml:4:1: group[1]: missing field `plugin`"
    );
}

#[test]
fn syntax_errors_have_line_and_column() {
    let e = err("[server]\nlisten = [\"127.0.0.1:1\"\n[[group]]\n");
    assert!(matches!(e, Error::Syntax { .. }), "{e:?}");
    let loc = e.location().unwrap();
    assert!(loc.line_col.is_some(), "{e}");
    assert_eq!(loc.key, None);
    assert!(e.to_string().starts_with("halfsync.toml:"), "{e}");

    assert_eq!(
        err_text("[[group]\n"),
        "halfsync.toml:1:9: unclosed array table, expected `]`"
    );
}

#[test]
fn durations() {
    let cfg = ok(&with_server(
        "idle_timeout = \"0s\"\nshutdown_grace = \"1500ms\"",
    ));
    assert_eq!(cfg.server.idle_timeout, Duration::ZERO);
    assert_eq!(cfg.server.shutdown_grace, Duration::from_millis(1500));
    let cfg = ok(&with_server(
        "idle_timeout = \"2m\"\nshutdown_grace = \"1h\"",
    ));
    assert_eq!(cfg.server.idle_timeout, Duration::from_secs(120));
    assert_eq!(cfg.server.shutdown_grace, Duration::from_secs(3600));

    let form = r#"expected a duration like "10s" or "500ms" (units: ms, s, m, h)"#;
    assert_eq!(
        err_text(&with_server("idle_timeout = 10")),
        format!("halfsync.toml:2:16: server.idle_timeout: invalid type: integer `10`, {form}")
    );
    assert_eq!(
        err_text(&with_server("idle_timeout = \"10\"")),
        format!("halfsync.toml:2:16: server.idle_timeout: invalid duration \"10\": {form}")
    );
    for bad in [
        "\"10sec\"",
        "\"1.5s\"",
        "\"-1s\"",
        "\"\"",
        "\"s\"",
        "\"1d\"",
        "true",
    ] {
        let e = err_text(&with_server(&format!("shutdown_grace = {bad}")));
        assert!(
            e.starts_with("halfsync.toml:2:18: server.shutdown_grace: ") && e.contains(form),
            "{e}"
        );
    }
    let e = err_text(&with_server("shutdown_grace = \"99999999999999999999h\""));
    assert!(e.contains("too large"), "{e}");
}

#[test]
fn sizes() {
    let cfg = ok(&with_server(
        "max_frame = 4096\nread_budget = \"8k\"\nring_size = \"1M\"",
    ));
    assert_eq!(cfg.server.max_frame, 4096);
    assert_eq!(cfg.server.read_budget, 8192);
    assert_eq!(cfg.server.ring_size, MIB);
    let cfg = ok(&with_server("max_frame = \"12B\"\nring_size = \"1GiB\""));
    assert_eq!(cfg.server.max_frame, 12);
    assert_eq!(cfg.server.ring_size, 1 << 30);

    let form = r#"a size like "64KiB", "4MiB" or a plain integer of bytes"#;
    for bad in [
        "\"1MiBB\"",
        "\"1 mib\"",
        "\"1.5MiB\"",
        "\"MiB\"",
        "\"1024\"",
        "true",
        "1.0",
    ] {
        let e = err_text(&with_server(&format!("max_frame = {bad}")));
        assert!(
            e.starts_with("halfsync.toml:2:13: server.max_frame: ") && e.contains(form),
            "{e}"
        );
    }
    assert_eq!(
        err_text(&with_server("max_frame = -1")),
        "halfsync.toml:2:13: server.max_frame: invalid size -1: must not be negative"
    );
    assert_eq!(
        err_text(&with_server("max_frame = \"65MiB\"")),
        "halfsync.toml:2:13: server.max_frame: 65MiB is too large: must be at most 64MiB"
    );
    assert_eq!(
        err_text(&with_server("max_frame = 11")),
        "halfsync.toml:2:13: server.max_frame: 11B is too small: must be at least 12B"
    );
    assert_eq!(
        err_text(&with_server("read_budget = \"1KiB\"")),
        "halfsync.toml:2:15: server.read_budget: 1KiB is too small: must be at least 4KiB"
    );
    assert_eq!(
        err_text(&with_server("read_budget = \"4GiB\"")),
        "halfsync.toml:2:15: server.read_budget: 4GiB is too large: must be at most 4294967295B"
    );
    assert_eq!(
        err_text(&with_server("ring_size = \"2GiB\"")),
        "halfsync.toml:2:13: server.ring_size: 2GiB is too large: must be at most 1GiB"
    );
}

#[test]
fn ring_size_is_rounded_up_to_a_power_of_two() {
    let cfg = ok(&with_server("ring_size = \"3MiB\""));
    assert_eq!(cfg.server.ring_size, 4 * MIB);
    let cfg = ok(&with_server("max_frame = 1000\nring_size = 100000"));
    assert_eq!(cfg.server.ring_size, 131_072);
    let cfg = ok(&with_server("max_frame = \"1MiB\"\nring_size = 2097280"));
    assert_eq!(cfg.server.ring_size, 4 * MIB);
    // And up to a page at least: a shared-memory ring is whole pages.
    for small in ["0", "1", "152", "2048"] {
        let cfg = ok(&with_server(&format!(
            "max_frame = 12\nring_size = {small}"
        )));
        assert_eq!(cfg.server.ring_size, 4096, "{small}");
    }
}

#[test]
fn ring_size_too_small() {
    let e = err(&with_server("ring_size = \"64KiB\""));
    assert!(matches!(e, Error::Invalid { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "halfsync.toml:2:13: server.ring_size: 64KiB is too small for server.max_frame 1MiB: \
         must be at least 2 * (max_frame + 64) = 2097280 bytes; raise ring_size or lower max_frame"
    );
    // Only max_frame given: the default ring is too small; point at max_frame.
    assert_eq!(
        err_text(&with_server("\nmax_frame = \"4MiB\"")),
        "halfsync.toml:3:13: server.ring_size: 4MiB is too small for server.max_frame 4MiB: \
         must be at least 2 * (max_frame + 64) = 8388736 bytes; raise ring_size or lower max_frame"
    );
    assert!(err_text(&with_server("ring_size = 0")).contains("4KiB is too small"));
}

#[test]
fn listen_addresses() {
    let cfg = ok(&with_server(
        "listen = [\"0.0.0.0:80\", \"[::1]:7878\", \"127.0.0.1:0\"]",
    ));
    let want: Vec<SocketAddr> = ["0.0.0.0:80", "[::1]:7878", "127.0.0.1:0"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(cfg.server.listen, want);
    assert_round_trip(&cfg);

    assert_eq!(
        err_text(&with_server("listen = []")),
        "halfsync.toml:2:10: server.listen: must list at least one address, like [\"127.0.0.1:7878\"]"
    );
    assert_eq!(
        err_text(&with_server("listen = [\"127.0.0.1:1\", \"localhost:80\"]")),
        "halfsync.toml:2:10: server.listen[1]: invalid address \"localhost:80\": expected \
         \"ip:port\" like \"127.0.0.1:7878\" or \"[::1]:7878\""
    );
    assert_eq!(
        err_text(&with_server("listen = [\"127.0.0.1:1\", \"127.0.0.1:1\"]")),
        "halfsync.toml:2:10: server.listen: 127.0.0.1:1 is listed twice"
    );
    assert!(err_text(&with_server("listen = \"127.0.0.1:1\"")).contains("expected a sequence"));
    // metrics_listen says the form it wants, as listen does.
    assert_eq!(
        err_text(&with_server("metrics_listen = \"localhost:9100\"")),
        "halfsync.toml:2:18: server.metrics_listen: invalid address \"localhost:9100\": expected \
         \"ip:port\" like \"127.0.0.1:9100\" or \"[::1]:9100\" (a host name is not looked up)"
    );
    assert_eq!(
        ok(&with_server("metrics_listen = \"127.0.0.1:9100\""))
            .server
            .metrics_listen,
        Some("127.0.0.1:9100".parse().unwrap())
    );
    // A wildcard covers its family's other addresses on its port.
    assert_eq!(
        err_text(&with_server("listen = [\"127.0.0.1:8\", \"0.0.0.0:8\"]")),
        "halfsync.toml:2:10: server.listen: 0.0.0.0:8 already listens on 127.0.0.1:8: list \
         only one of them"
    );
    assert_eq!(
        err_text(&with_server("listen = [\"[::]:8\", \"[::1]:8\"]")),
        "halfsync.toml:2:10: server.listen: [::]:8 already listens on [::1]:8: list only one \
         of them"
    );
    // Not across families, nor ports.
    for ok_list in [
        "[\"0.0.0.0:8\", \"[::]:8\"]",
        "[\"0.0.0.0:8\", \"127.0.0.1:9\"]",
        "[\"127.0.0.1:8\", \"127.0.0.2:8\"]",
    ] {
        ok(&with_server(&format!("listen = {ok_list}")));
    }
}

#[test]
fn integer_ranges() {
    let cases = [
        (
            "max_connections = 0",
            "2:19: server.max_connections: must be at least 1, got 0",
        ),
        (
            "backlog = 0",
            "2:11: server.backlog: must be at least 1, got 0",
        ),
        (
            "backlog = -5",
            "2:11: server.backlog: invalid value: integer `-5`, expected u32",
        ),
    ];
    for (line, want) in cases {
        assert_eq!(
            err_text(&with_server(line)),
            format!("halfsync.toml:{want}")
        );
    }
    let group = |line: &str| format!("[[group]]\nname = \"a\"\nplugin = \"a\"\n{line}\n");
    let cases = [
        (
            "workers = 0",
            "4:11: group[0].workers: must be between 1 and 256, got 0",
        ),
        (
            "workers = 257",
            "4:11: group[0].workers: must be between 1 and 256, got 257",
        ),
        (
            "max_inflight = 0",
            "4:16: group[0].max_inflight: must be between 1 and 65536, got 0",
        ),
        (
            "max_queue = 1000001",
            "4:13: group[0].max_queue: must be between 0 and 1000000, got 1000001",
        ),
    ];
    for (line, want) in cases {
        assert_eq!(err_text(&group(line)), format!("halfsync.toml:{want}"));
    }
    let cfg = ok(&group("workers = 256\nmax_inflight = 65536\nmax_queue = 0"));
    assert_eq!(
        (
            cfg.groups[0].workers,
            cfg.groups[0].max_inflight,
            cfg.groups[0].max_queue
        ),
        (256, 65536, 0)
    );
}

#[test]
fn proxy_processes_range_and_workers_per_proxy() {
    assert_eq!(ok(&with_server("")).server.proxy_processes, 1);
    assert_eq!(
        err_text(&with_server("proxy_processes = 0")),
        "halfsync.toml:2:19: server.proxy_processes: must be between 1 and 64, got 0"
    );
    assert_eq!(
        err_text(&with_server("proxy_processes = 65")),
        "halfsync.toml:2:19: server.proxy_processes: must be between 1 and 64, got 65"
    );
    let text =
        "[server]\nproxy_processes = 2\n[[group]]\nname = \"a\"\nplugin = \"a\"\nworkers = 1\n";
    let e = err_text(text);
    assert!(
        e.contains("group[0].workers") && e.contains("1 workers for 2 proxy processes"),
        "{e}"
    );
    let cfg = ok(&text.replace("workers = 1", "workers = 2"));
    assert_eq!(cfg.server.proxy_processes, 2);
    assert_round_trip(&cfg);
}

#[test]
fn group_names_and_plugins() {
    for bad in ["", "a b", "a.b", "é", "123456789012345678901234567890123"] {
        let e = err_text(&format!("[[group]]\nname = {bad:?}\nplugin = \"a\"\n"));
        assert!(
            e.starts_with("halfsync.toml:2:8: group[0].name: invalid group name")
                && e.ends_with("use 1 to 32 characters from A-Z, a-z, 0-9, '_' and '-'"),
            "{e}"
        );
    }
    ok("[[group]]\nname = \"A-z_09-12345678901234567890123\"\nplugin = \"a\"\n");
    assert_eq!(
        err_text("[[group]]\nname = \"a\"\nplugin = \"\"\n"),
        "halfsync.toml:3:10: group[0].plugin: must not be empty: give a plugin name like \
         \"echo\" or a path to a .so file"
    );
    assert!(err_text("[[group]]\nname = \"a\"\nplugin = \"a\\u0000b\"\n").contains("NUL"));
}

#[test]
fn duplicate_group_names() {
    let e = err("[[group]]\nname = \"a\"\nplugin = \"a\"\ncommands = [1]\n\
                 [[group]]\nname = \"a\"\nplugin = \"b\"\n");
    assert!(matches!(e, Error::Invalid { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "halfsync.toml:6:8: group[1].name: group name \"a\" is already used by group[0]"
    );
}

#[test]
fn two_default_groups() {
    assert_eq!(
        err_text(
            "[[group]]\nname = \"a\"\nplugin = \"a\"\n[[group]]\nname = \"b\"\nplugin = \"b\"\ncommands = []\n"
        ),
        "halfsync.toml:4:1: group \"b\": group \"a\" is already the default group (no commands); \
         at most one group may leave commands empty"
    );
    // One default group plus specific ones is fine; no default group is fine.
    let cfg = ok(
        "[[group]]\nname = \"a\"\nplugin = \"a\"\n[[group]]\nname = \"b\"\nplugin = \"b\"\ncommands = [1]\n",
    );
    assert_eq!(
        cfg.groups.iter().filter(|g| g.is_default_route()).count(),
        1
    );
    let cfg = ok(
        "[[group]]\nname = \"a\"\nplugin = \"a\"\ncommands = [2]\n[[group]]\nname = \"b\"\nplugin = \"b\"\ncommands = [1]\n",
    );
    assert!(cfg.groups.iter().all(|g| !g.is_default_route()));
}

#[test]
fn command_conflicts() {
    let text = "[[group]]\nname = \"a\"\nplugin = \"a\"\ncommands = [1, 7]\n\
                [[group]]\nname = \"b\"\nplugin = \"b\"\ncommands = [3, 7]\n";
    let e = err(text);
    assert!(matches!(e, Error::Invalid { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "halfsync.toml:8:16: group \"b\": command 7 is already served by group \"a\""
    );
    assert_eq!(
        err_text("[[group]]\nname = \"a\"\nplugin = \"a\"\ncommands = [1, 1]\n"),
        "halfsync.toml:4:16: group \"a\": command 1 is listed twice"
    );
    // A default group does not conflict with explicit claims.
    let cfg = ok("[[group]]\nname = \"a\"\nplugin = \"a\"\n\
                  [[group]]\nname = \"b\"\nplugin = \"b\"\ncommands = [0, 65535]\n");
    assert_eq!(cfg.groups[1].commands, vec![0, 65535]);
}

#[test]
fn no_groups() {
    for text in ["", "[server]\n", "# only a comment\n", "group = []\n"] {
        let e = err(text);
        assert!(matches!(e, Error::Invalid { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "halfsync.toml: group: at least one [[group]] is required"
        );
    }
}

/// Every group has a fixed place in the proxies' statistics pages, and
/// there are `MAX_GROUPS` of them: a config with more is refused by name,
/// pointing at the first group too many.
#[test]
fn too_many_groups() {
    let groups = |n: usize| -> String {
        (0..n)
            .map(|i| format!("[[group]]\nname = \"g{i}\"\nplugin = \"p\"\ncommands = [{i}]\n"))
            .collect()
    };
    assert_eq!(ok(&groups(MAX_GROUPS)).groups.len(), MAX_GROUPS);
    let text = groups(MAX_GROUPS + 1);
    let e = err(&text);
    assert!(matches!(e, Error::Invalid { .. }), "{e:?}");
    let line = 4 * MAX_GROUPS + 1;
    assert_eq!(
        e.to_string(),
        format!(
            "halfsync.toml:{line}:1: group: 257 [[group]]s: at most 256; route more commands to \
             one group"
        )
    );
}

#[test]
fn missing_file_names_the_path() {
    let e = Config::from_file(Path::new("/etc/x.toml")).unwrap_err();
    assert!(matches!(e, Error::Read { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "/etc/x.toml: cannot read config file: No such file or directory (os error 2)"
    );
    assert!(e.location().is_none());
    // The OS error is in the message, not repeated as a source: `{:#}`
    // (how the CLI prints errors) shows it once.
    assert!(std::error::Error::source(&e).is_none());
    assert_eq!(format!("{e:#}"), e.to_string());
}

#[test]
fn from_file_reads_and_names_the_file() {
    // Removed when dropped, also when an assertion fails.
    let tmp = tempfile::Builder::new()
        .prefix("halfsync-config-test-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().to_path_buf();
    let path = dir.join("hs.toml");
    std::fs::write(&path, "[[group]]\nname = \"a\"\nplugin = \"./liba.so\"\n").unwrap();
    let cfg = Config::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.origin, Origin::File(path.clone()));
    assert_eq!(cfg.config_dir(), Some(dir.as_path()));
    assert_eq!(
        cfg.plugin_path(&cfg.groups[0], Path::new("/bin")),
        dir.join("./liba.so")
    );

    std::fs::write(
        &path,
        "[[group]]\nname = \"a\"\nplugin = \"a\"\nworkers = 0\n",
    )
    .unwrap();
    let e = Config::from_file(&path).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}:4:11: group[0].workers: must be between 1 and 256, got 0",
            path.display()
        )
    );
    // Not UTF-8 (a Latin-1 comment): where, not just "invalid data".
    std::fs::write(
        &path,
        b"[[group]]\nname = \"a\" # caf\xe9\nplugin = \"a\"\n",
    )
    .unwrap();
    let e = Config::from_file(&path).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}:2:17: not valid UTF-8 (TOML files are UTF-8: re-save the file as UTF-8)",
            path.display()
        )
    );
}

#[test]
fn origins_in_messages() {
    let e = Config::from_toml("x = 1", Origin::Embedded).unwrap_err();
    assert!(e.to_string().starts_with("<embedded config>:1:1: "), "{e}");
    let e = Config::from_toml("x = 1", Origin::Text).unwrap_err();
    assert!(e.to_string().starts_with("<config>:1:1: "), "{e}");
    let e = Config::from_toml("x = 1", Origin::File("a\nb.toml".into())).unwrap_err();
    assert!(e.to_string().starts_with("a\\nb.toml:1:1: "), "{e}");
}

#[test]
fn messages_are_one_line() {
    let inputs = [
        "\"a\nb\" = 1\n",
        "[[group]]\n\"na\\nme\" = 1\nname = \"a\"\nplugin = \"a\"\n",
        "[[group]]\nname = \"a\\nb\"\nplugin = \"a\"\n",
        "[server]\nlisten = [\"a\\nb\"]\n[[group]]\nname = \"a\"\nplugin = \"a\"\n",
        "[server]\nidle_timeout = \"1\\n\"\n",
        "[server\n",
        "a = \"\n\"\n",
        "\u{0}",
        "=\n=\n",
        "[[group]]\nname='a'\nplugin='a'\n[[group]]\nname='a'\nplugin='a'\n",
    ];
    for text in inputs {
        // `err` asserts the single line.
        let e = err(text);
        for origin in [Origin::Embedded, Origin::Text, Origin::File("x\ny".into())] {
            if let Err(e) = Config::from_toml(text, origin) {
                assert!(!e.to_string().contains('\n'), "{e}");
            }
        }
        assert!(!e.message().contains('\n'));
    }
}

#[test]
fn round_trip() {
    assert_round_trip(&Config::embedded_default());
    assert_round_trip(&ok(EXAMPLE_CONFIG));
    let text = r#"
[server]
listen = ["[::]:9000", "10.0.0.1:1"]
max_connections = 1
idle_timeout = "1500ms"
max_frame = 1000
shutdown_grace = "0s"
ring_size = 5000
backlog = 7
read_budget = 5000

[[group]]
name = "x"
plugin = "/abs/libx.so"
workers = 256
max_inflight = 65536
max_queue = 0
commands = [65535, 0, 5]
[group.config]
when = 1979-05-27T07:32:00Z
nan = nan
list = [1, "two", { three = 3 }]
[[group.config.servers]]
host = "a"
[[group.config.servers]]
host = "b"
[group.config.deep.deeper]
x = -1.5

[[group]]
name = "y"
plugin = "y"
"#;
    for origin in [file(), Origin::Text, Origin::Embedded] {
        let cfg = Config::from_toml(text, origin).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.server.ring_size, 8192);
        // NaN != NaN, so compare the plugin config through its text.
        let cfg_text = toml::to_string(&cfg).unwrap();
        let again = Config::from_toml(&cfg_text, cfg.origin.clone()).unwrap();
        assert_eq!(toml::to_string(&again).unwrap(), cfg_text);
        assert_eq!(again.server, cfg.server);
        assert_eq!(
            again.groups[0].plugin_config_toml(),
            cfg.groups[0].plugin_config_toml()
        );
        assert_eq!(again.groups[1], cfg.groups[1]);
    }
    let mut without_nan = Config::from_toml(text, file()).unwrap();
    without_nan.groups[0].config.remove("nan");
    assert_round_trip(&without_nan);
}

#[test]
fn hand_built_config_serializes() {
    let mut group = Group::new("g", "plugins/libg.so");
    group.commands = vec![1, 2];
    let cfg = Config {
        server: Server {
            idle_timeout: Duration::from_millis(250),
            ..Server::default()
        },
        groups: vec![group, Group::new("d", "d")],
        origin: Origin::Text,
    };
    assert_round_trip(&cfg);

    let bad = Config {
        server: Server {
            idle_timeout: Duration::from_micros(1),
            ..Server::default()
        },
        ..cfg
    };
    let e = toml::to_string(&bad).unwrap_err();
    assert!(e.to_string().contains("sub-millisecond"), "{e}");
}

#[test]
fn resolve_plugin_rules() {
    let exe = Path::new("/opt/hs/bin");
    let dir = Some(Path::new("/etc/hs"));
    // Bare name: lib<name>.so next to the executable, whatever the config dir.
    assert_eq!(
        resolve_plugin("echo", dir, exe),
        Path::new("/opt/hs/bin/libecho.so")
    );
    assert_eq!(
        resolve_plugin("echo", None, exe),
        Path::new("/opt/hs/bin/libecho.so")
    );
    assert_eq!(
        resolve_plugin("my-plugin", dir, exe),
        Path::new("/opt/hs/bin/libmy-plugin.so")
    );
    // Relative paths: against the config directory.
    assert_eq!(
        resolve_plugin("./x.so", dir, exe),
        Path::new("/etc/hs/./x.so")
    );
    assert_eq!(
        resolve_plugin("plugins/libx.so", dir, exe),
        Path::new("/etc/hs/plugins/libx.so")
    );
    assert_eq!(
        resolve_plugin("libx.so", dir, exe),
        Path::new("/etc/hs/libx.so")
    );
    assert_eq!(
        resolve_plugin("../lib/x", dir, exe),
        Path::new("/etc/hs/../lib/x")
    );
    // ... or the current directory, always with a '/' so dlopen won't search.
    assert_eq!(resolve_plugin("libx.so", None, exe), Path::new("./libx.so"));
    assert_eq!(
        resolve_plugin("plugins/libx.so", None, exe),
        Path::new("./plugins/libx.so")
    );
    assert_eq!(
        resolve_plugin("libx.so", Some(Path::new("")), exe),
        Path::new("./libx.so")
    );
    // Absolute paths are kept.
    assert_eq!(
        resolve_plugin("/usr/lib/liby.so", dir, exe),
        Path::new("/usr/lib/liby.so")
    );
    assert_eq!(
        resolve_plugin("/usr/lib/liby", None, exe),
        Path::new("/usr/lib/liby")
    );
}

#[test]
fn config_dir_and_plugin_path() {
    let text = "[[group]]\nname = \"a\"\nplugin = \"plugins/liba.so\"\n";
    let exe = Path::new("/bin");
    let cfg = Config::from_toml(text, Origin::File("conf/hs.toml".into())).unwrap();
    assert_eq!(cfg.config_dir(), Some(Path::new("conf")));
    assert_eq!(
        cfg.plugin_path(&cfg.groups[0], exe),
        Path::new("conf/plugins/liba.so")
    );

    let cfg = Config::from_toml(text, Origin::File("hs.toml".into())).unwrap();
    assert_eq!(cfg.config_dir(), Some(Path::new(".")));
    assert_eq!(
        cfg.plugin_path(&cfg.groups[0], exe),
        Path::new("./plugins/liba.so")
    );

    let cfg = Config::from_toml(text, Origin::Text).unwrap();
    assert_eq!(cfg.config_dir(), None);
    assert_eq!(
        cfg.plugin_path(&cfg.groups[0], exe),
        Path::new("./plugins/liba.so")
    );
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    let n = 100_000;
    let keys = vec!["a"; n].join(".");
    let inputs = [
        format!("a = {}{}\n", "[".repeat(n), "]".repeat(n)),
        format!("a = {}{}\n", "{a=".repeat(n), "}".repeat(n)),
        format!("[{keys}]\nb = 1\n"),
        format!("[[group]]\nname = 'a'\nplugin = 'a'\n[group.config]\n{keys} = 1\n"),
    ];
    for text in &inputs {
        let e = err(text);
        assert!(matches!(e, Error::Syntax { .. }), "{e:?}");
    }
    assert_eq!(
        err_text(&inputs[2]),
        "halfsync.toml: keys nested too deeply (recursion limit)"
    );
}

#[test]
fn cross_key_checks_for_backoff_and_metrics() {
    let group = |line: &str| format!("[[group]]\nname = \"a\"\nplugin = \"a\"\n{line}\n");
    // A restart_delay above restart_delay_max is allowed (the backoff is
    // capped at the max; configs that raised only restart_delay keep
    // working).
    let cfg = ok(&group("restart_delay = \"30s\""));
    assert!(cfg.groups[0].restart_delay > cfg.groups[0].restart_delay_max);
    // metrics_listen on a client listen address, also through a wildcard.
    for (listen, metrics) in [
        ("127.0.0.1:7000", "127.0.0.1:7000"),
        ("0.0.0.0:7000", "127.0.0.1:7000"),
        ("127.0.0.1:7000", "0.0.0.0:7000"),
        ("[::]:7000", "127.0.0.1:7000"),
        ("[::1]:7000", "[::1]:7000"),
    ] {
        let text = with_server(&format!(
            "listen = [\"{listen}\"]\nmetrics_listen = \"{metrics}\""
        ));
        let e = err_text(&text);
        assert!(
            e.contains("server.metrics_listen: ")
                && e.contains("give the metrics listener a port of its own"),
            "{listen} {metrics}: {e}"
        );
    }
    // Different addresses, families or port 0: no clash.
    for (listen, metrics) in [
        ("127.0.0.1:7000", "127.0.0.2:7000"),
        ("0.0.0.0:7000", "[::1]:7000"),
        ("127.0.0.1:0", "127.0.0.1:0"),
    ] {
        let text = with_server(&format!(
            "listen = [\"{listen}\"]\nmetrics_listen = \"{metrics}\""
        ));
        assert!(
            ok(&text).server.metrics_listen.is_some(),
            "{listen} {metrics}"
        );
    }
}

/// `pool = "dynamic"` needs `max_workers` (as PHP-FPM's pm = dynamic needs
/// pm.max_children): without it the pool could never grow.
#[test]
fn a_dynamic_pool_needs_max_workers() {
    let group =
        |extra: &str| format!("[[group]]\nname = \"a\"\nplugin = \"a\"\nworkers = 2\n{extra}");
    let e = err_text(&group("pool = \"dynamic\"\n"));
    assert!(
        e.starts_with("halfsync.toml:5:8: group[0].pool: a dynamic pool needs max_workers"),
        "{e}"
    );
    assert!(e.contains("above workers = 2"), "{e}");
    let cfg = ok(&group("pool = \"dynamic\"\nmax_workers = 4\n"));
    assert_eq!(cfg.groups[0].max_workers, Some(4));
    ok(&group("pool = \"static\"\n"));
}

#[test]
fn admin_socket_and_log_file_must_be_usable_paths() {
    // (A path too long for a Unix socket is refused where it is bound:
    // bad_config::an_admin_socket_path_too_long_is_refused.)
    let long = format!("/tmp/{}.sock", "s".repeat(200));
    assert_eq!(
        ok(&with_server(&format!("admin_socket = \"{long}\""))).admin_socket(),
        std::path::PathBuf::from(&long)
    );
    assert!(
        err_text(&with_server("admin_socket = \"a\\u0000b.sock\""))
            .contains("server.admin_socket: has a NUL byte"),
    );
    assert_eq!(
        err_text(&with_server("log_file = \"\"")),
        "halfsync.toml:2:12: server.log_file: must be a file path (not empty, no NUL byte); \
         leave the key out to log to stderr"
    );
}
