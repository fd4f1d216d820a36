//! The operator commands (`status`, `reload`, `stop`, `scale`): one JSON
//! line to the master's admin socket, one JSON line back.

use std::io::{BufRead, BufReader, Read, Write};

/// Prints a line to stdout; a closed pipe (`halfsync status | head`) ends
/// the output quietly instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        let mut o = std::io::stdout().lock();
        if writeln!(o, $($arg)*).is_err() {
            return Ok(());
        }
    }};
}
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Sends one command and returns the answer; fails if the server says no.
fn request(socket: &Path, line: &str, timeout: Duration) -> Result<Value> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the server's admin socket {}; is halfsync running with this configuration? (--config or --socket)",
            socket.display()
        )
    })?;
    // Anyone can create a socket in /tmp (the default's directory): a
    // command of this user only talks to a server of this user. (root
    // administers servers of service users.)
    let me = crate::master::sys::euid();
    let peer = crate::master::sys::peer_uid(&s).ok();
    if me == 0
        && let Some(peer) = peer.filter(|&p| p != 0)
        && world_writable_dir(socket)
        && !line.contains(r#""cmd":"status""#)
    {
        // root acts on servers of service users, so a socket another user
        // squatted where anyone can create one could pass for theirs.
        let _ = writeln!(
            std::io::stderr(),
            "halfsync: note: {} is served by uid {peer}, in a directory anyone can write: make \
             sure that is your server's user (set server.admin_socket in a directory only it \
             can write, such as /run/halfsync/, to be sure)",
            socket.display()
        );
    }
    if me != 0
        && let Some(peer) = peer
        && peer != me
    {
        bail!(
            "the admin socket {} is served by a process of uid {peer}, not of this user (uid \
             {me}): not a server of yours; if it is another user's, address your server by its \
             own socket (set server.admin_socket to a path in a directory only its user can \
             write, such as /run/halfsync/)",
            socket.display()
        );
    }
    s.set_read_timeout(Some(timeout))?;
    s.write_all(format!("{line}\n").as_bytes())
        .with_context(|| {
            format!(
                "cannot send the command to {} (a master serves 16 admin clients at once and \
                 closes the rest: try again)",
                socket.display()
            )
        })?;
    let mut answer = String::new();
    // Bounded: a status of thousands of workers is well under this.
    if let Err(e) = BufReader::new((&s).take(64 << 20)).read_line(&mut answer) {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            // A reload that takes longer than the wait goes on in the
            // server: say so, rather than blame the master.
            if line.contains(r#""cmd":"reload""#)
                && request(socket, r#"{"cmd":"status"}"#, Duration::from_secs(2))
                    .is_ok_and(|v| v["reloading"] == Value::Bool(true))
            {
                bail!(
                    "no answer within {} s, but the reload goes on in the server (a reload \
                     replaces workers one at a time): see `halfsync status`, or wait longer \
                     with --timeout",
                    timeout.as_secs()
                );
            }
            bail!(
                "no answer from {} within {} s: is the master stopped (SIGSTOP, a debugger) or \
                 stuck?",
                socket.display(),
                timeout.as_secs()
            );
        }
        bail!(
            "cannot read the answer from {}: {e} (is a halfsync master listening there?)",
            socket.display()
        );
    }
    if answer.is_empty() {
        bail!(
            "{} closed the connection without answering (a master serves 16 admin clients at \
             once and closes the rest: try again)",
            socket.display()
        );
    }
    let v: Value = serde_json::from_str(answer.trim()).with_context(|| {
        let head: String = answer.chars().take(200).collect();
        format!("bad answer ({} bytes): {head:?}", answer.len())
    })?;
    if v["ok"] != Value::Bool(true) {
        bail!("{}", v["error"].as_str().unwrap_or("the server refused"));
    }
    Ok(v)
}

/// Whether `socket`'s directory may be written by anyone (as /tmp).
fn world_writable_dir(socket: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    socket
        .parent()
        .and_then(|d| {
            std::fs::metadata(if d.as_os_str().is_empty() {
                Path::new(".")
            } else {
                d
            })
            .ok()
        })
        .is_some_and(|m| m.permissions().mode() & 0o002 != 0)
}

/// The default admin socket (`/tmp/halfsync-*.sock`) of the server whose
/// status says it runs `config` (an absolute path), if one answers. Only
/// sockets of this user are asked (the server creates its socket 0600 as
/// its user; anyone can create a file in /tmp).
pub fn find_server_running(config: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let me = crate::master::sys::euid();
    let mut socks: Vec<PathBuf> = std::fs::read_dir("/tmp")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("halfsync-") && n.ends_with(".sock"))
                && std::fs::symlink_metadata(p)
                    .is_ok_and(|m| m.file_type().is_socket() && m.uid() == me)
        })
        .collect();
    socks.sort();
    socks.into_iter().find(|sock| {
        request(sock, r#"{"cmd":"status"}"#, Duration::from_secs(2)).is_ok_and(|v| {
            v["config"]
                .as_str()
                .is_some_and(|runs| same_config(Path::new(runs), config))
        })
    })
}

/// Whether two absolute config paths name the server's file: the same
/// path (a symlink flipped to a new file since is still the same config),
/// or the same file however spelt (`a/../b.toml`, another link to it).
pub fn same_config(a: &Path, b: &Path) -> bool {
    a == b
        || matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(x), Ok(y)) if x == y
        )
}

/// The config the server on `socket` runs (from its status): `Ok(None)`
/// when nothing listens there (the command itself then says so),
/// `Ok(Some(None))` for the embedded default; an error when something
/// accepted the connection but gave no proper answer.
pub fn config_of(socket: &Path) -> Result<Option<Option<PathBuf>>> {
    if UnixStream::connect(socket).is_err() {
        return Ok(None);
    }
    let v = request(socket, r#"{"cmd":"status"}"#, Duration::from_secs(5))?;
    if !v["generation"].is_u64() {
        bail!(
            "{} answered, but not as a halfsync master: {}",
            socket.display(),
            halfsync_config::one_line(&v.to_string().chars().take(200).collect::<String>())
        );
    }
    Ok(Some(v["config"].as_str().map(PathBuf::from)))
}

/// A command whose answer is a message.
pub fn simple(socket: &Path, line: &str, timeout: Duration) -> Result<()> {
    let v = request(socket, line, timeout)?;
    if let Some(m) = v["message"].as_str() {
        out!("halfsync: {m}");
    }
    Ok(())
}

/// `halfsync stop`: the master answers just before it exits; this then
/// waits (within `timeout`) until its process is really gone.
pub fn stop(socket: &Path, line: &str, timeout: Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    let v = request(socket, line, timeout)?;
    if let Some(pid) = v["pid"].as_u64() {
        while process_alive(pid) {
            if std::time::Instant::now() >= deadline {
                bail!("the server (pid {pid}) said it stopped but is still running");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    out!("halfsync: {}", v["message"].as_str().unwrap_or("stopped"));
    Ok(())
}

/// Whether process `pid` exists and is not a zombie (an exited child its
/// parent has not reaped yet counts as gone).
fn process_alive(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// `halfsync status`: the JSON, or a table.
pub fn status(socket: &Path, json: bool) -> Result<()> {
    let v = request(socket, r#"{"cmd":"status"}"#, Duration::from_secs(10))?;
    if json {
        out!("{v}");
        return Ok(());
    }
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    out!(
        "halfsync pid {}{}, configuration generation {}, up {} s{}",
        v["pid"],
        match v["listen"].as_array() {
            Some(a) if !a.is_empty() => format!(
                ", listening on {}",
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => String::new(),
        },
        v["generation"],
        v["uptime_s"],
        match v["reload_phase"].as_str() {
            Some("plugins") => ", reloading (test-loading plugins)",
            Some(_) => ", reloading",
            None => "",
        }
    );
    if let Some(why) = v["not_serving"].as_str() {
        out!("NOT SERVING: {why}");
    }
    let p = &v["proxy"];
    let pids: Vec<String> = match p["pids"].as_array() {
        Some(a) => a
            .iter()
            .map(|x| x.as_i64().map_or("down".to_owned(), |p| p.to_string()))
            .collect(),
        None => vec![p["pid"].to_string()],
    };
    // Per proxy, in the order of the pids ("-" for one that is down).
    let proxy_cpu: Vec<String> = p["cpu_s"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| if c.is_null() { "-".to_owned() } else { cpu(c) })
        .collect();
    out!(
        "{} {}: {} connections ({} accepted, {} refused), {} requests in flight{}",
        if pids.len() > 1 {
            "proxies, pids"
        } else {
            "proxy pid"
        },
        pids.join(", "),
        p["connections"],
        p["accepted"],
        p["refused"],
        p["inflight"],
        if proxy_cpu.is_empty() {
            String::new()
        } else {
            format!("; cpu {}", proxy_cpu.join(", "))
        }
    );
    // Groups a reload removed whose workers are all gone: one line, so
    // that the total below adds up.
    let gone: Vec<String> = v["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|g| {
            g["retired"] == Value::Bool(true)
                && g["workers"].as_array().is_none_or(|w| w.is_empty())
        })
        .map(|g| {
            let replies: u64 = g["replies"]
                .as_object()
                .map_or(0, |r| r.values().map(n).sum());
            format!("{} ({replies} replies)", g["name"].as_str().unwrap_or("?"))
        })
        .collect();
    for g in v["groups"].as_array().into_iter().flatten() {
        if g["retired"] == Value::Bool(true) && g["workers"].as_array().is_none_or(|w| w.is_empty())
        {
            continue;
        }
        out!(
            "group {} ({} pool, {} worker{}, {} wanted, generation {}{}{}): {} queued; up to {} in flight per worker ({}); replies {}; workers' cpu {}",
            g["name"].as_str().unwrap_or("?"),
            g["pool"].as_str().unwrap_or("?"),
            g["workers_running"],
            if g["workers_running"] == 1 { "" } else { "s" },
            if g["pool"] == "dynamic" {
                format!("{} to {}", g["workers_target"], g["workers_max"])
            } else {
                g["workers_target"].to_string()
            },
            g["generation"],
            match g["plugin_version"].as_str() {
                Some(v) if !v.is_empty() => format!(", plugin {v}"),
                _ => String::new(),
            },
            if g["retired"] == Value::Bool(true) {
                ", removed"
            } else {
                ""
            },
            g["queued"],
            g["inflight_cap"],
            match g["mean_run_us"].as_f64() {
                Some(us) => format!("mean run {us:.1} us"),
                None => "no run time sampled yet".to_owned(),
            },
            replies(&g["replies"]),
            if g["cpu_s"].is_null() {
                "-".to_owned()
            } else {
                cpu(&g["cpu_s"])
            }
        );
        for w in g["workers"].as_array().into_iter().flatten() {
            let current = match &w["current"] {
                Value::Object(c) => format!(
                    "  request {} (command {}, {} ms)",
                    c.get("id").map(n).unwrap_or(0),
                    c.get("command").map(n).unwrap_or(0),
                    c.get("age_ms").map(n).unwrap_or(0)
                ),
                _ => String::new(),
            };
            out!(
                "  worker {:<3} pid {:<8} {:<12} served {:<8} holds {:<5} rss {:>6} KiB  cpu {:>27}  restarts {}{current}",
                w["worker"],
                w["pid"].as_i64().map_or("-".to_owned(), |p| p.to_string()),
                w["state"].as_str().unwrap_or("?"),
                n(&w["served"]),
                n(&w["pending"]),
                n(&w["rss_kib"]),
                if w["cpu_s"].is_null() {
                    "-".to_owned()
                } else {
                    cpu_column(&w["cpu_s"])
                },
                n(&w["restarts"])
            );
        }
    }
    if !gone.is_empty() {
        out!("removed by reloads: {}", gone.join(", "));
    }
    out!(
        "total replies{}: {}",
        if gone.is_empty() {
            ""
        } else {
            " (removed groups' included)"
        },
        replies(&v["totals"]["replies"])
    );
    Ok(())
}

/// `{"user": u, "system": s}` as `1.23s user 4.56s sys`.
fn cpu(v: &Value) -> String {
    cpu_in(v, 0, 0)
}

/// The same in fixed widths (up to 99,999 s), for the worker column.
fn cpu_column(v: &Value) -> String {
    cpu_in(v, 9, 8)
}

/// `cpu` with the user and system seconds padded to these widths.
fn cpu_in(v: &Value, user_width: usize, sys_width: usize) -> String {
    format!(
        "{:>user_width$.2}s user {:>sys_width$.2}s sys",
        v["user"].as_f64().unwrap_or(0.0),
        v["system"].as_f64().unwrap_or(0.0)
    )
}

fn replies(v: &Value) -> String {
    let parts: Vec<String> = v
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}
