use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::*;

/// Runs `halfsync <sub> --config <file>` on this config text; returns
/// (exit code, stderr).
fn halfsync(sub: &str, text: &str) -> (Option<i32>, String) {
    let (code, _out, err) = halfsync_out(sub, text);
    (code, err)
}

/// The same; returns (exit code, stdout, stderr).
fn halfsync_out(sub: &str, text: &str) -> (Option<i32>, String, String) {
    let dir = temp_dir();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let (st, out, err) = run_cmd(
        Command::new(BIN).arg(sub).arg("--config").arg(&path),
        Duration::from_secs(20),
    );
    (st.code(), out, err)
}

/// Both `check` and `run` refuse the config with one line containing
/// every `needle`.
fn refused(text: &str, needles: &[&str]) {
    for sub in ["check", "run"] {
        let (code, err) = halfsync(sub, text);
        assert_eq!(code, Some(1), "{sub}: exit code; stderr: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{sub}: expected one line, got:\n{err}");
        for n in needles {
            assert!(
                lines[0].contains(n),
                "{sub}: {:?} does not mention {n:?}",
                lines[0]
            );
        }
    }
}

fn group(plugin: &Path) -> String {
    format!(
        "[[group]]\nname = \"g\"\nplugin = \"{}\"\n",
        plugin.display()
    )
}

#[test]
fn unknown_key() {
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{}\"]\nwokers = 3\n\n{}",
        free_port(),
        group(&echo_so())
    );
    refused(&text, &["bad.toml:3:1", "unknown field `wokers`"]);
}

#[test]
fn wrong_type() {
    let text = format!("{}workers = \"two\"\n", group(&echo_so()));
    refused(
        &text,
        &["bad.toml:4:11", "group[0].workers", "invalid type"],
    );
}

#[test]
fn missing_plugin_file() {
    refused(
        &group(Path::new("/nonexistent/libnope.so")),
        &["/nonexistent/libnope.so", "file not found"],
    );
}

#[test]
fn plugin_with_wrong_abi_version_in_table() {
    let so = halfsync_testkit::c_plugin("plugins/c/test/wrong_abi.c");
    refused(
        &group(&so),
        &[so.to_str().unwrap(), "ABI version 2", "rebuild"],
    );
}

#[test]
fn plugin_built_for_another_abi() {
    let so = halfsync_testkit::c_plugin("plugins/c/test/v2_only.c");
    refused(
        &group(&so),
        &[so.to_str().unwrap(), "halfsync_plugin_v2", "rebuild"],
    );
}

#[test]
fn not_a_plugin() {
    let so = halfsync_testkit::c_plugin("plugins/c/test/no_entry.c");
    refused(
        &group(&so),
        &[so.to_str().unwrap(), "not a halfsync plugin"],
    );
}

#[test]
fn garbage_config() {
    refused("this is not toml [[[", &["bad.toml:1"]);
}

#[test]
fn check_accepts_a_good_config() {
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{}\"]\n\n{}",
        free_port(),
        group(&echo_so())
    );
    let dir = temp_dir();
    let path = dir.path().join("good.toml");
    std::fs::write(&path, text).unwrap();
    let (st, out, err) = run_cmd(
        Command::new(BIN).arg("check").arg("--config").arg(&path),
        Duration::from_secs(20),
    );
    assert!(st.success(), "{err}");
    assert!(
        out.contains("plugin echo") && out.contains("loaded and initialised"),
        "{out}"
    );
    assert!(out.contains("is ok"), "{out}");
}

#[test]
fn plugin_whose_init_fails() {
    let so = halfsync_testkit::c_plugin("plugins/c/test/init_fails.c");
    // check initialises the plugin (like nginx -t) and says why it failed.
    let (code, err) = halfsync("check", &group(&so));
    assert_eq!(code, Some(1), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("group g") && lines[0].contains("missing required key `db`"),
        "{err}"
    );
    // run starts, sees every worker fail init, and gives up rather than
    // serving nothing: exit 1, the last line names the group.
    let (code, err) = halfsync(
        "run",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:{}\"]\n\n{}",
            free_port(),
            group(&so)
        ),
    );
    assert_eq!(code, Some(1), "{err}");
    let last = err
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or_default();
    assert!(last.contains("group g: no worker could start"), "{err}");
    assert!(
        last.contains("missing required key `db`"),
        "the reason is in the last line: {err}"
    );
    assert!(err.contains("missing required key `db`"), "{err}");
    // With a log file, its last line says why the server exits too.
    let dir = temp_dir();
    let log = dir.path().join("halfsync.log");
    let (code, err) = halfsync(
        "run",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:{}\"]\nlog_file = \"{}\"\n\n{}",
            free_port(),
            log.display(),
            group(&so)
        ),
    );
    assert_eq!(code, Some(1), "{err}");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let last = text
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or_default();
    assert!(
        last.contains("halfsync exits: group g: no worker could start"),
        "{text}"
    );
}

#[test]
fn check_reports_a_plugin_that_crashes_or_hangs_in_init() {
    let so = halfsync_testkit::fault_plugin();
    let (code, err) = halfsync(
        "check",
        &format!("{}[group.config]\ncrash_in_init = true\n", group(&so)),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("group g") && err.contains("(init)") && err.contains("killed by SIGSEGV"),
        "{err}"
    );
    // What the plugin logged before it crashed is quoted.
    assert!(
        err.contains("the plugin logged before that:\n    WARN fault: crashing in init"),
        "{err}"
    );
    let (code, err) = halfsync(
        "check",
        &format!(
            "{}init_timeout = \"1s\"\n[group.config]\nhang_in_init = true\n",
            group(&so)
        ),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("did not finish within"), "{err}");
}

/// `check` gives each group's init its own `init_timeout`, from when that
/// init starts: three slow but valid inits that take longer together
/// than any one timeout (and than the probe's 5 s for loading) pass, and
/// a hanging init is reported after its own group's timeout, not another
/// group's longer one.
#[test]
fn check_times_each_groups_init_on_its_own() {
    let so = halfsync_testkit::fault_plugin();
    let slow = |name: &str, command: u16| {
        format!(
            "[[group]]\nname = \"{name}\"\nplugin = \"{}\"\ncommands = [{command}]\ninit_timeout = \"6s\"\n[group.config]\ninit_delay_ms = 2500\n\n",
            so.display()
        )
    };
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{}\"]\n\n{}{}{}",
        free_port(),
        slow("a", 1),
        slow("b", 2),
        slow("c", 3)
    );
    let (code, err) = halfsync("check", &text);
    assert_eq!(code, Some(0), "{err}");

    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{}\"]\n\n[[group]]\nname = \"patient\"\nplugin = \"{}\"\ninit_timeout = \"30s\"\n\n\
         [[group]]\nname = \"stuck\"\nplugin = \"{}\"\ncommands = [2]\ninit_timeout = \"1s\"\n[group.config]\nhang_in_init = true\n",
        free_port(),
        so.display(),
        so.display()
    );
    let t = std::time::Instant::now();
    let (code, err) = halfsync("check", &text);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("group stuck: plugin")
            && err.contains("(init): did not finish within 1000 ms (the group's init_timeout)"),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

/// `metrics_listen` on a client listen address is refused by `check` and
/// `run` alike; on a port something else holds, `run` fails naming it and
/// leaves no admin socket file behind.
#[test]
fn metrics_listen_needs_a_port_of_its_own() {
    let port = free_port();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\nmetrics_listen = \"127.0.0.1:{port}\"\n\n{}",
        group(&echo_so())
    );
    refused(
        &text,
        &[
            "bad.toml:3",
            "metrics_listen",
            "give the metrics listener a port of its own",
        ],
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mport = taken.local_addr().unwrap().port();
    let port = free_port();
    // Removed even if the bug comes back and this test fails.
    let _cleanup = RemoveOnDrop(format!("/tmp/halfsync-{port}.sock").into());
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\nmetrics_listen = \"127.0.0.1:{mport}\"\n\n{}",
        group(&echo_so())
    );
    let (code, err) = halfsync("run", &text);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{mport}"))
            && err.contains("change `server.metrics_listen`"),
        "{err}"
    );
    let sock = &_cleanup.0;
    assert!(!sock.exists(), "{} was left behind", sock.display());
}

/// `check` shows what each plugin logged at warning level or above while
/// it was loaded and initialised (as `nginx -t` shows warnings), under
/// its group; info lines stay out.
#[test]
fn check_shows_what_plugins_warn_about_in_init() {
    let so = halfsync_testkit::fault_plugin();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{}\"]\n\n{}[group.config]\nwarn_in_init = \"key `db` is deprecated\"\n\n\
         [[group]]\nname = \"quiet\"\nplugin = \"{}\"\ncommands = [2]\n",
        free_port(),
        group(&so),
        so.display()
    );
    let (code, out, err) = halfsync_out("check", &text);
    assert_eq!(code, Some(0), "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    let g = lines
        .iter()
        .position(|l| l.starts_with("group g: plugin fault"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        lines[g].ends_with("loaded and initialised; it logged:"),
        "{out}"
    );
    assert_eq!(lines[g + 1], "    WARN key `db` is deprecated", "{out}");
    let quiet = lines
        .iter()
        .find(|l| l.starts_with("group quiet: plugin fault"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(quiet.ends_with("loaded and initialised"), "{out}");
    assert!(
        !out.contains("fault plugin ready"),
        "info lines shown: {out}"
    );
}

/// `check` refuses what `run` would: a listen (or metrics) address no
/// interface of this machine has, a log file that cannot be opened, an
/// admin socket in a missing directory; with run's message.
#[test]
fn check_refuses_an_address_or_log_file_run_cannot_use() {
    let port = free_port();
    let text = format!(
        "[server]\nlisten = [\"192.0.2.1:{port}\"]\n\n{}",
        group(&echo_so())
    );
    refused(
        &text,
        &[
            &format!("cannot listen on 192.0.2.1:{port}"),
            "no interface of this machine has that address",
        ],
    );
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\nmetrics_listen = \"192.0.2.1:{}\"\n\n{}",
        free_port(),
        group(&echo_so())
    );
    refused(&text, &["no interface of this machine has that address"]);
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\nlog_file = \"no-such-dir/halfsync.log\"\n\n{}",
        group(&echo_so())
    );
    refused(&text, &["log file", "no-such-dir/halfsync.log"]);
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\nadmin_socket = \"/nonexistent-halfsync-dir/a.sock\"\n\n{}",
        group(&echo_so())
    );
    refused(
        &text,
        &["cannot create admin socket /nonexistent-halfsync-dir/a.sock"],
    );
}

/// A plugin that writes to stdout while it loads (no newline, unbuffered)
/// and has a tab and a newline in its name and version: `check` and `run`
/// still see every group with its own plugin (the probe's report to its
/// parent used to be stdout, and such output made a group's result go
/// missing, so the next group was paired with the wrong plugin).
#[test]
fn a_plugin_printing_to_stdout_does_not_garble_the_probe() {
    let chatty = halfsync_testkit::c_plugin("plugins/c/test/chatty_load.c");
    let port = free_port();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\n\n[[group]]\nname = \"a\"\nplugin = \"{}\"\ncommands = [1]\n\n\
         [[group]]\nname = \"b\"\nplugin = \"{}\"\ncommands = [2]\n",
        chatty.display(),
        echo_so().display()
    );
    let (code, out, err) = halfsync_out("check", &text);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains(&format!(
            "group a: plugin chatty\\tname 1\\n2 ({})",
            chatty.display()
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "group b: plugin echo 0.1.0 ({})",
            echo_so().display()
        )),
        "{out}"
    );
    // What it printed is quoted, after the groups' results.
    assert!(
        out.contains("the plugins printed (stdout and stderr):\n    loading...init"),
        "{out}"
    );
    // A plugin that prints why, then exits in init: quoted in the error.
    let failing = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\n\n[[group]]\nname = \"a\"\nplugin = \"{}\"\n\
         [group.config]\nexit_in_init = true\n",
        chatty.display()
    );
    let (code, out, err) = halfsync_out("check", &failing);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains(&format!(
            "group a: plugin {} (init): the plugin exited (exit code 3); it printed before \
             that:\n    loading...init",
            chatty.display()
        )),
        "{err}"
    );
    assert!(
        err.contains("\n    chatty: cannot reach the database, giving up"),
        "{err}"
    );
    // Exiting 0 in init is named as such, not as a report cut short.
    let (code, out, err) = halfsync_out("check", &failing.replace("exit_in_init", "exit0_in_init"));
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains(&format!(
            "group a: plugin {} (init): the plugin exited (exit code 0) before the step was \
             done; it printed before that:\n    loading...init",
            chatty.display()
        )),
        "{err}"
    );
    assert!(err.contains("\n    chatty: nothing to do, bye"), "{err}");
    // After 200 KB of output, the last lines are quoted: the reason.
    let (code, out, err) = halfsync_out("check", &failing.replace("exit_in_init", "loud_in_init"));
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("chatty: init progress 1999 ....")
            && err.ends_with("\n    chatty: FATAL the real reason, printed last\n"),
        "{err}"
    );

    // A plugin that prints why, then fails its init: quoted too.
    let (code, out, err) = halfsync_out("check", &failing.replace("exit_in_init", "fail_in_init"));
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("see what I printed; it printed before that:")
            && err.contains("\n    chatty: the database said no"),
        "{err}"
    );
    // Two groups of one plugin: each is checked in a process of its own,
    // as each runs in workers of its own (a static set in init is not
    // seen by the other group's init).
    let twice = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\n\n[[group]]\nname = \"a\"\nplugin = \"{0}\"\n\
         commands = [1]\n[group.config]\nonce_per_process = true\n\n[[group]]\nname = \"b\"\n\
         plugin = \"{0}\"\ncommands = [2]\n[group.config]\nonce_per_process = true\n",
        chatty.display()
    );
    let (code, out, err) = halfsync_out("check", &twice);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("group a: plugin") && out.contains("group b: plugin"),
        "{out}"
    );

    let mut s = Server::start(&text, port);
    let st = s.status();
    let plugins: Vec<(String, String)> = st["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["name"].as_str().unwrap_or_default().to_owned(),
                g["plugin"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        plugins,
        vec![
            ("a".to_owned(), chatty.display().to_string()),
            ("b".to_owned(), echo_so().display().to_string())
        ],
        "{st}"
    );
    let mut c = s.client();
    assert_eq!(c.call(1, 2, b"to b").unwrap().payload, b"to b");
    s.stop(Duration::from_secs(30));
    s.assert_clean();
}

/// `run` with a plugin that crashes in init gives up, and says the
/// workers died while loading or initialising it (not just the signal).
#[test]
fn run_says_where_workers_died_when_none_could_start() {
    let so = halfsync_testkit::fault_plugin();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{}\"]\n\n{}[group.config]\ncrash_in_init = true\n",
        free_port(),
        group(&so)
    );
    let (code, err) = halfsync("run", &text);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(
            "group g: no worker could start: a worker died while loading or initialising its plugin (killed by SIGSEGV"
        ),
        "{err}"
    );
}

/// A configuration larger than the environment can carry (one variable
/// holds at most 128 KiB): a group serving all 65,536 commands and a
/// 300 KB `[group.config]`. Its children get their specs through an
/// inherited memory file, so check, run, serving and reload work (they
/// failed with "Argument list too long").
#[test]
fn a_configuration_larger_than_the_environment_holds_runs() {
    let port = free_port();
    let commands: Vec<String> = (0..=u16::MAX).map(|c| c.to_string()).collect();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\n\n[[group]]\nname = \"all\"\nplugin = \"{}\"\nworkers = 1\ncommands = [{}]\n[group.config]\ncatalog = \"{}\"\n",
        echo_so().display(),
        commands.join(","),
        "x".repeat(300_000)
    );
    assert!(text.len() > 600_000);
    let (code, out, err) = halfsync_out("check", &text);
    assert_eq!(code, Some(0), "{out}{err}");
    let mut s = Server::start(&text, port);
    let mut c = s.client();
    for (id, cmd) in [(1, 0), (2, 7), (3, u16::MAX)] {
        assert_eq!(c.call(id, cmd, b"big").unwrap().payload, b"big");
    }
    let (code, out, err) = s.ctl(&["reload"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(c.call(4, 9, b"again").unwrap().payload, b"again");
    assert_eq!(s.stop(Duration::from_secs(10)).code(), Some(0));
    s.assert_clean();
}

/// Operator commands read `server.admin_socket` and `server.listen`
/// leniently, but a value of the wrong type is an error naming the key,
/// not a silent fall back to the default socket (of another server,
/// maybe).
#[test]
fn operator_commands_refuse_an_unusable_admin_socket_setting() {
    let (code, _, err) = halfsync_out("status", "[server]\nadmin_socket = 5\n");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("server.admin_socket is integer 5, not a path string"),
        "{err}"
    );
    let (code, _, err) = halfsync_out("stop", "[server]\nlisten = [\"nowhere\"]\n");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("server.listen does not start with an \"ip:port\" string"),
        "{err}"
    );
}

/// An admin socket path longer than a Unix socket address holds is
/// refused by `check` and `run` alike, naming the key and the limit.
#[test]
fn an_admin_socket_path_too_long_is_refused() {
    let long = format!("/tmp/{}.sock", "s".repeat(100));
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{}\"]\nadmin_socket = \"{long}\"\n\n{}",
        free_port(),
        group(&echo_so())
    );
    refused(
        &text,
        &[
            "server.admin_socket",
            &format!("{long} is 110 bytes long"),
            "at most 107",
        ],
    );
}

/// An admin socket path naming a directory or a file that is not a socket
/// is refused by `check` and `run` alike, saying what is there.
#[test]
fn an_admin_socket_path_that_is_not_a_socket_is_refused() {
    let dir = temp_dir();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    for (path, what) in [
        (
            dir.path().to_path_buf(),
            "is a directory; name the socket file, such as",
        ),
        (
            file,
            "exists and is not a socket: remove it, or name another path",
        ),
    ] {
        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:{}\"]\nadmin_socket = \"{}\"\n\n{}",
            free_port(),
            path.display(),
            group(&echo_so())
        );
        refused(&text, &["server.admin_socket", what]);
    }
}

/// An operator command that finds no server, for a file with a mistake
/// (a mistyped `admin_socket` is an unknown key, so the default socket is
/// looked for), names the mistake beside its own error.
#[test]
fn an_operator_command_names_the_files_mistake_when_it_finds_no_server() {
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{}\"]\nadmin_sockett = \"/tmp/hs-typo.sock\"\n\n{}",
        free_port(),
        group(&echo_so())
    );
    let (code, out, err) = halfsync_out("status", &text);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("note:") && err.contains("admin_sockett") && err.contains("cannot reach"),
        "{err}"
    );
}

/// `max_workers` on a static pool has no effect: `check` and `run` say so
/// in a warning (it was ignored silently), and the config is still valid.
#[test]
fn max_workers_on_a_static_pool_is_warned_about() {
    let port = free_port();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\n\n[[group]]\nname = \"g\"\nplugin = \"{}\"\n\
         workers = 2\nmax_workers = 8\n",
        echo_so().display()
    );
    let warning = "group g: max_workers applies to pool = \"dynamic\" only; this static pool \
                   runs workers = 2 and ignores it";
    let (code, out, err) = halfsync_out("check", &text);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(err.contains(warning) || out.contains(warning), "{out}{err}");
    let mut s = Server::start(&text, port);
    assert!(s.log().contains(warning), "{}", s.log());
    assert_eq!(s.stop(Duration::from_secs(10)).code(), Some(0));
    s.assert_clean();
}

/// `check` does not create the log file (run as root it would leave it
/// root's, and the service's user could not open it), but says if it
/// could not be created; and, as a user that may not, it refuses a port
/// below 1024 as `run` would.
#[test]
fn check_creates_no_log_file_and_knows_privileged_ports() {
    let dir = temp_dir();
    let log = dir.path().join("hs.log");
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{}\"]\nlog_file = \"{}\"\n\n{}",
        free_port(),
        log.display(),
        group(&echo_so())
    );
    let (code, out, err) = halfsync_out("check", &text);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(!log.exists(), "check created {}", log.display());
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root; the privileged-port part skipped");
        return;
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("low.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:81\"]\n\n{}",
            group(&echo_so())
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (st, out, err) = run_cmd(
        as_user(
            Command::new(BIN).arg("check").arg("--config").arg(&path),
            65534,
        ),
        Duration::from_secs(20),
    );
    assert_eq!(st.code(), Some(1), "{out}{err}");
    assert!(
        err.contains("cannot listen on 127.0.0.1:81")
            && err.contains("ports below 1024 need root or CAP_NET_BIND_SERVICE"),
        "{err}"
    );
}

/// The plugin files the master holds open reach the probe and the workers
/// with close-on-exec set before any plugin code runs, so processes a
/// plugin starts do not inherit them: a plugin that fails its init on
/// seeing one passes `check` (two groups: the probe holds both files) and
/// starts in `run`.
#[test]
fn plugins_cannot_pass_on_the_plugin_files_descriptors() {
    let checker = halfsync_testkit::c_plugin("plugins/c/test/fd_check.c");
    let port = free_port();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\n\n[[group]]\nname = \"a\"\nplugin = \"{}\"\ncommands = [2]\n\n\
         [[group]]\nname = \"b\"\nplugin = \"{}\"\n",
        echo_so().display(),
        checker.display()
    );
    let (code, out, err) = halfsync_out("check", &text);
    assert_eq!(code, Some(0), "{out}{err}");
    let mut s = Server::start(&text, port);
    assert_eq!(s.client().call(1, 2, b"a").unwrap().payload, b"a");
    assert_eq!(s.stop(Duration::from_secs(10)).code(), Some(0));
    s.assert_clean();
}
