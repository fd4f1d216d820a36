//! Shared helpers: start the real `halfsync` binary on a free port with a
//! test config, talk to it, stop it, and make sure nothing it started
//! survives the test (every process is killed by pid on drop, even when
//! the test fails).

#![allow(dead_code)]

use std::collections::HashSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use halfsync_protocol::{Client, Frame, status};

pub const BIN: &str = env!("CARGO_BIN_EXE_halfsync");

/// The bundled echo plugin (built once per test process).
pub fn echo_so() -> PathBuf {
    halfsync_testkit::echo_plugin()
}

/// The C echo plugin, compiled from plugins/c/echo.c against the shipped header.
pub fn c_echo_so() -> PathBuf {
    halfsync_testkit::c_echo_plugin()
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// A config with one group running `plugin`, on `port`.
pub fn config(port: u16, plugin: &Path, workers: u32, extra_server: &str) -> String {
    format!(
        r#"[server]
listen = ["127.0.0.1:{port}"]
shutdown_grace = "10s"
{extra_server}

[[group]]
name = "echo"
plugin = "{}"
workers = {workers}
"#,
        plugin.display()
    )
}

/// A directory for a test's files, removed when dropped (also when the
/// test fails), named so a leftover would be recognised.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("halfsync-test-")
        .tempdir()
        .expect("a temporary directory")
}

/// Puts the admin socket in the test's own directory (removed with it),
/// unless the config chooses one.
pub fn with_admin_socket(text: &str, dir: &Path) -> String {
    if text.contains("admin_socket") {
        return text.to_owned();
    }
    let line = format!("admin_socket = \"{}\"\n", dir.join("admin.sock").display());
    match text.find("[server]\n") {
        Some(i) => format!("{}{line}{}", &text[..i + 9], &text[i + 9..]),
        None => format!("[server]\n{line}\n{text}"),
    }
}

/// Names of /dev/shm entries now.
pub fn dev_shm() -> HashSet<String> {
    fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Parent pid of `pid`, from /proc.
fn ppid(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

/// When `pid` started (clock ticks since boot), to tell a process from a
/// later one that reuses its pid.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..]
        .split(' ')
        .nth(19)?
        .parse()
        .ok()
}

/// User and system time of a process, in clock ticks (`/proc` reports
/// them in USER_HZ, 100 per second); zeros if it is gone.
pub fn cpu_ticks_split(pid: i32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 2..]);
    let f: Vec<&str> = rest.split(' ').collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (num(11), num(12))
}

/// User plus system time of a process, in clock ticks.
pub fn cpu_ticks(pid: i32) -> u64 {
    let (u, s) = cpu_ticks_split(pid);
    u + s
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rfind(')').and_then(|i| stat.get(i + 2..i + 3)) != Some("Z"),
        Err(_) => false,
    }
}

/// Every live descendant of `root`.
pub fn descendants(root: i32) -> Vec<i32> {
    let all: Vec<(i32, i32)> = fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .filter_map(|p| Some((p, ppid(p)?)))
                .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(c, pp) in &all {
            if pp == p && alive(c) {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out
}

/// The command line of `pid` as `ps` shows it (argv joined by spaces).
pub fn cmdline(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Sends `sig` to `pid` (a process the test started).
pub fn kill(pid: i32, sig: i32) {
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(pid, sig) };
}

/// Polls `f` every 10 ms until it returns Some or `limit` passes.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A running `halfsync run`, stopped and cleaned up on drop.
pub struct Server {
    pub child: Option<Child>,
    pub pid: i32,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    /// Every process of the tree seen so far, with its start time (killed
    /// by pid on drop, only if that pid still is that process).
    seen: std::collections::HashMap<i32, u64>,
    shm_before: HashSet<String>,
}

impl Server {
    /// Starts `halfsync run` with this config text (which must listen on
    /// `port`) and waits until it answers an echo request.
    pub fn start(config_text: &str, port: u16) -> Server {
        let mut s = Server::spawn(config_text, port);
        s.wait_ready();
        s
    }

    /// Starts `halfsync run` without waiting.
    pub fn spawn(config_text: &str, port: u16) -> Server {
        Server::spawn_with(Some(config_text), port)
    }

    /// Starts `halfsync run` with this config, or with none (the embedded
    /// default), without waiting.
    pub fn spawn_with(config_text: Option<&str>, port: u16) -> Server {
        Server::spawn_full(Path::new(BIN), config_text, port, None, &[])
    }

    /// Starts `halfsync run` with extra environment variables and waits
    /// until it answers.
    pub fn start_env(config_text: &str, port: u16, env: &[(&str, &str)]) -> Server {
        let mut s = Server::spawn_full(Path::new(BIN), Some(config_text), port, None, env);
        s.wait_ready();
        s
    }

    /// Starts `halfsync run` with the open-file limit set to `soft` (and
    /// the hard one to `hard`), without waiting.
    pub fn spawn_nofile(config_text: &str, port: u16, soft: u32, hard: u32) -> Server {
        Server::spawn_full(
            Path::new(BIN),
            Some(config_text),
            port,
            Some((soft, hard)),
            &[],
        )
    }

    /// Starts `halfsync run` from another copy of the binary, `bin`, and
    /// waits until it answers.
    pub fn start_bin(bin: &Path, config_text: &str, port: u16) -> Server {
        let mut s = Server::spawn_full(bin, Some(config_text), port, None, &[]);
        s.wait_ready();
        s
    }

    /// Starts `halfsync run` with its stderr a pipe whose reader goes away
    /// after the first line, and waits until it answers.
    pub fn start_stderr_closing(config_text: &str, port: u16) -> Server {
        let (mut reader, writer) = std::io::pipe().unwrap();
        let mut s = Server::spawn_inner(
            Path::new(BIN),
            Some(config_text),
            port,
            None,
            &[],
            Some(writer),
        );
        let mut first = [0u8; 1];
        let _ = std::io::Read::read(&mut reader, &mut first);
        drop(reader);
        s.wait_ready();
        s
    }

    fn spawn_full(
        bin: &Path,
        config_text: Option<&str>,
        port: u16,
        nofile: Option<(u32, u32)>,
        env: &[(&str, &str)],
    ) -> Server {
        Server::spawn_inner(bin, config_text, port, nofile, env, None)
    }

    fn spawn_inner(
        bin: &Path,
        config_text: Option<&str>,
        port: u16,
        nofile: Option<(u32, u32)>,
        env: &[(&str, &str)],
        stderr: Option<std::io::PipeWriter>,
    ) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("halfsync-test-")
            .tempdir()
            .unwrap();
        let mut cmd = match nofile {
            // The shell execs halfsync: same pid, lowered limits.
            Some((soft, hard)) => {
                let mut c = Command::new("sh");
                let limits = format!("ulimit -Sn {soft} && ulimit -Hn {hard}");
                c.args(["-c", &format!("{limits} && exec \"$0\" \"$@\"")]);
                c.arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("run");
        cmd.envs(env.iter().copied());
        if let Some(text) = config_text {
            let path = dir.path().join("halfsync.toml");
            fs::write(&path, with_admin_socket(text, dir.path())).unwrap();
            cmd.arg("--config").arg(path);
        }
        let shm_before = dev_shm();
        let log = fs::File::create(dir.path().join("server.log")).unwrap();
        // No core files: the fault tests crash workers on purpose, and a
        // machine with `ulimit -c unlimited` would spend seconds writing
        // each core (shared rings included) into the checkout.
        // SAFETY: runs between fork and exec; setrlimit is async-signal-safe
        // and reads only the struct on this stack.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                let mut lim = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(libc::RLIMIT_CORE, &mut lim) == 0 {
                    lim.rlim_cur = 0;
                    libc::setrlimit(libc::RLIMIT_CORE, &lim);
                }
                Ok(())
            });
        }
        if !env.iter().any(|(k, _)| *k == "HALFSYNC_LOG") {
            cmd.env("HALFSYNC_LOG", "info");
        }
        let child = cmd
            // Deterministic timing: a panicking Rust plugin would otherwise
            // spend hundreds of ms symbolising a backtrace before it dies.
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(match stderr {
                Some(pipe) => Stdio::from(pipe),
                None => Stdio::from(log),
            })
            .spawn()
            .expect("start halfsync");
        let pid = child.id() as i32;
        Server {
            child: Some(child),
            pid,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
            seen: std::collections::HashMap::new(),
            shm_before,
        }
    }

    /// The config file the server runs with (tests rewrite it to reload).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("halfsync.toml")
    }

    /// Rewrites the config file (with the same admin socket).
    pub fn write_config(&self, text: &str) {
        fs::write(self.config_path(), with_admin_socket(text, self.dir.path())).unwrap();
    }

    /// Runs `halfsync <args> --config <its config>`; returns (exit code,
    /// stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let (st, out, err) = run_cmd(
            Command::new(BIN)
                .args(args)
                .arg("--config")
                .arg(self.config_path()),
            Duration::from_secs(120),
        );
        (st.code(), out, err)
    }

    /// `halfsync status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let (code, out, err) = self.ctl(&["status", "--json"]);
        assert_eq!(code, Some(0), "status failed: {err}");
        serde_json::from_str(out.trim()).expect("status is JSON")
    }

    /// Waits (bounded) until some worker runs a request (status `busy`):
    /// a request sent before is in flight, not still on its way.
    pub fn wait_busy(&self) {
        self.wait_worker_state("busy");
    }

    /// Waits (at most 10 s) until some worker of any group is in `state`
    /// (as status reports it: `starting`, `busy`, ...).
    pub fn wait_worker_state(&self, state: &str) {
        let seen = wait_for(Duration::from_secs(10), || {
            let st = self.status();
            st["groups"]
                .as_array()?
                .iter()
                .flat_map(|g| g["workers"].as_array().into_iter().flatten())
                .any(|w| w["state"] == state)
                .then_some(())
        });
        assert!(
            seen.is_some(),
            "no worker became {state}: {}",
            self.status()
        );
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn wait_ready(&mut self) {
        let ok = wait_for(Duration::from_secs(20), || {
            let mut c = Client::connect(self.addr).ok()?;
            c.stream()
                .set_read_timeout(Some(Duration::from_secs(5)))
                .ok()?;
            let r = c.call(1, 1, b"ping").ok()?;
            // Test plugins may prefix their echo (reply_prefix).
            (r.code == status::OK && r.payload.ends_with(b"ping")).then_some(())
        });
        assert!(
            ok.is_some(),
            "server did not become ready; log:\n{}",
            self.log()
        );
        self.refresh_tree();
    }

    /// Records every current process of the tree; returns them.
    pub fn refresh_tree(&mut self) -> Vec<i32> {
        let d = descendants(self.pid);
        for &p in &d {
            if let Some(t) = start_time(p) {
                self.seen.entry(p).or_insert(t);
            }
        }
        d
    }

    /// Waits (bounded) until the tree has exactly `n` processes, each past
    /// its exec (titled), and returns them. Readiness means one worker per group answers, so the others
    /// may still be on their way; a bare count right after `start` races
    /// with them (and a /proc scan taken mid-exec can miss one).
    pub fn wait_tree(&mut self, n: usize) -> Vec<i32> {
        let got = wait_for(Duration::from_secs(10), || {
            let t = self.refresh_tree();
            // A child between fork and exec still shows the master's title.
            let execd = t.iter().all(|&p| !cmdline(p).contains("halfsync: master"));
            (t.len() == n && execd).then_some(t)
        });
        got.unwrap_or_else(|| {
            let now: Vec<String> = self
                .refresh_tree()
                .into_iter()
                .map(|p| format!("{p} {}", cmdline(p)))
                .collect();
            panic!(
                "expected {n} processes under the master, have {now:?}; log:\n{}",
                self.log()
            )
        })
    }

    /// Pids of processes whose command line contains `title`.
    pub fn pids_titled(&mut self, title: &str) -> Vec<i32> {
        self.refresh_tree()
            .into_iter()
            .filter(|&p| cmdline(p).contains(title))
            .collect()
    }

    /// SIGKILLs the first of the 2 workers of group 0 titled `title` and
    /// waits (at most 10 s) until 2 are running again, the killed one not
    /// among them and none still starting; whether that happened.
    pub fn kill_one_of_two_workers(&mut self, title: &str) -> bool {
        // (Right after start the second may still be between fork and
        // exec, under the master's title.)
        let before = wait_for(Duration::from_secs(10), || {
            let p = self.pids_titled(title);
            (p.len() == 2).then_some(p)
        })
        .unwrap_or_else(|| panic!("not 2 workers titled {title}: {}", self.log()));
        kill(before[0], libc::SIGKILL);
        wait_for(Duration::from_secs(10), || {
            let now = self.pids_titled(title);
            let st = self.status();
            let ready = st["groups"][0]["workers"]
                .as_array()?
                .iter()
                .filter(|w| w["state"] != "starting" && w["pid"].is_number())
                .count();
            (now.len() == 2 && !now.contains(&before[0]) && ready == 2).then_some(())
        })
        .is_some()
    }

    pub fn worker_pids(&mut self) -> Vec<i32> {
        self.pids_titled("halfsync: worker")
    }

    pub fn client(&self) -> Client {
        Client::connect(self.addr).expect("connect")
    }

    /// Sends SIGTERM and waits (bounded) for the master to exit.
    pub fn stop(&mut self, limit: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(limit)
    }

    /// Sends a signal to the master.
    pub fn signal(&mut self, sig: i32) {
        self.refresh_tree();
        kill(self.pid, sig);
    }

    /// Waits (bounded) for the master to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let st = wait_for(limit, || child.try_wait().ok().flatten());
        match st {
            Some(st) => st,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "halfsync did not exit within {limit:?} of SIGTERM; log:\n{}",
                    self.log()
                );
            }
        }
    }

    /// Processes of the tree still alive: same pid and same start time (a
    /// recycled pid belongs to someone else and is never touched).
    fn still_ours(&self) -> Vec<i32> {
        self.seen
            .iter()
            .filter(|&(&p, &t)| alive(p) && start_time(p) == Some(t))
            .map(|(&p, _)| p)
            .collect()
    }

    /// Asserts that no process of the tree survives and /dev/shm holds
    /// nothing new.
    pub fn assert_clean(&self) {
        let left = wait_for(Duration::from_secs(5), || {
            let left: Vec<i32> = self.still_ours();
            left.is_empty().then_some(())
        });
        let survivors: Vec<(i32, String)> = self
            .still_ours()
            .into_iter()
            .map(|p| (p, cmdline(p)))
            .collect();
        assert!(left.is_some(), "processes survived: {survivors:?}");
        let new: Vec<String> = dev_shm().difference(&self.shm_before).cloned().collect();
        let ours: Vec<&String> = new.iter().filter(|n| n.contains("halfsync")).collect();
        assert!(ours.is_empty(), "left in /dev/shm: {ours:?}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.refresh_tree();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for p in self.still_ours() {
            kill(p, libc::SIGKILL);
        }
        if thread::panicking() {
            eprintln!("---- halfsync log ----\n{}", self.log());
        }
    }
}

/// Deterministic payload for request `id` of connection `conn`, 0..=max bytes.
pub fn payload(seed: u64, conn: u64, id: u64, max: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed ^ (conn << 32) ^ id);
    let len = rng.usize(0..=max);
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

/// Pipelines `n` echo requests with payloads of 0..=max bytes on one
/// connection (a writer thread and this reader) and checks every reply:
/// right id, status OK, identical payload. Returns the replies' count.
pub fn pipeline_echo(
    addr: SocketAddr,
    seed: u64,
    conn: u64,
    n: u64,
    max: usize,
) -> Result<u64, String> {
    let stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream.set_nodelay(true).ok();
    stream.set_read_timeout(Some(Duration::from_secs(60))).ok();
    let mut w = stream.try_clone().map_err(|e| e.to_string())?;
    let writer = thread::spawn(move || -> Result<(), String> {
        let mut buf = Vec::new();
        for id in 0..n {
            buf.clear();
            halfsync_protocol::write_frame(&mut buf, id, 1, &payload(seed, conn, id, max));
            w.write_all(&buf).map_err(|e| format!("write {id}: {e}"))?;
        }
        Ok(())
    });
    let mut r = Reader(stream);
    let mut seen = vec![false; n as usize];
    for _ in 0..n {
        let f = r.frame().map_err(|e| format!("conn {conn}: read: {e}"))?;
        let Some(slot) = seen.get_mut(f.id as usize) else {
            return Err(format!("conn {conn}: reply with unknown id {}", f.id));
        };
        if *slot {
            return Err(format!("conn {conn}: duplicate reply for id {}", f.id));
        }
        *slot = true;
        if f.code != status::OK {
            return Err(format!(
                "conn {conn}: id {} status {} ({})",
                f.id,
                f.code,
                String::from_utf8_lossy(&f.payload)
            ));
        }
        if f.payload != payload(seed, conn, f.id, max) {
            return Err(format!("conn {conn}: id {} payload differs", f.id));
        }
    }
    writer.join().map_err(|_| "writer panicked".to_string())??;
    Ok(n)
}

/// Reads whole frames from a stream.
pub struct Reader(pub TcpStream);

impl Reader {
    pub fn frame(&mut self) -> std::io::Result<Frame> {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h)?;
        let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        if len < 12 {
            return Err(std::io::Error::other(format!("reply length {len}")));
        }
        let mut payload = vec![0u8; (len - 12) as usize];
        self.0.read_exact(&mut payload)?;
        Ok(Frame {
            id: u64::from_be_bytes(h[4..12].try_into().unwrap()),
            code: u16::from_be_bytes([h[12], h[13]]),
            flags: u16::from_be_bytes([h[14], h[15]]),
            payload,
        })
    }
}

/// Runs the full pipelining check: `conns` connections x `n` requests.
pub fn many_pipelines(addr: SocketAddr, conns: u64, n: u64, max: usize) {
    let seed = fastrand::u64(..);
    let handles: Vec<_> = (0..conns)
        .map(|c| thread::spawn(move || pipeline_echo(addr, seed, c, n, max)))
        .collect();
    let mut total = 0;
    for h in handles {
        total += h
            .join()
            .expect("client thread panicked")
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
    assert_eq!(total, conns * n);
}

/// Runs a command to completion with a time limit; returns (status, stdout, stderr).
pub fn run_cmd(cmd: &mut Command, limit: Duration) -> (ExitStatus, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let st = wait_for(limit, || child.try_wait().ok().flatten());
    let st = match st {
        Some(st) => st,
        None => {
            let pid = child.id() as i32;
            for p in descendants(pid) {
                kill(p, libc::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!("command did not finish within {limit:?}");
        }
    };
    (st, t_out.join().unwrap(), t_err.join().unwrap())
}

/// Background echo load: `conns` connections, each keeping `depth`
/// requests in flight (sent as a batch, then all replies read), checking
/// every reply (id, status OK, payload). Any other outcome is an error
/// that `finish` reports.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicU64>,
    handles: Vec<thread::JoinHandle<Result<(), String>>>,
}

/// The reply prefixes a versioned load accepts (see the fault plugin's
/// `reply_prefix`): a request sent after version `k` settled must be
/// answered by version `k` or a later one.
#[derive(Default)]
pub struct Versions {
    inner: std::sync::Mutex<(usize, Vec<Vec<u8>>)>,
}

impl Versions {
    pub fn new(first: &[u8]) -> std::sync::Arc<Versions> {
        std::sync::Arc::new(Versions {
            inner: std::sync::Mutex::new((0, vec![first.to_vec()])),
        })
    }
    /// A new version may answer from now on.
    pub fn announce(&self, prefix: &[u8]) {
        self.inner.lock().unwrap().1.push(prefix.to_vec());
    }
    /// The newest version is the only one left (a reload finished).
    pub fn settle(&self) {
        let mut g = self.inner.lock().unwrap();
        g.0 = g.1.len() - 1;
    }
    fn accepted_from_now(&self) -> Vec<Vec<u8>> {
        let g = self.inner.lock().unwrap();
        g.1[g.0..].to_vec()
    }
}

impl Load {
    pub fn start(addr: SocketAddr, conns: u64, depth: u64, max_payload: usize) -> Load {
        Load::start_versioned(addr, conns, depth, max_payload, Versions::new(b""))
    }

    /// Like `start`, but replies are `prefix + payload` for an accepted
    /// version's prefix.
    pub fn start_versioned(
        addr: SocketAddr,
        conns: u64,
        depth: u64,
        max_payload: usize,
        versions: std::sync::Arc<Versions>,
    ) -> Load {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let seed = fastrand::u64(..);
        let handles = (0..conns)
            .map(|conn| {
                let (stop, ok, versions) = (stop.clone(), ok.clone(), versions.clone());
                thread::spawn(move || -> Result<(), String> {
                    let mut s = TcpStream::connect(addr)
                        .map_err(|e| format!("conn {conn}: connect: {e}"))?;
                    s.set_nodelay(true).ok();
                    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
                    let mut r = Reader(s.try_clone().map_err(|e| e.to_string())?);
                    let mut next = 0u64;
                    let mut buf = Vec::new();
                    // Bounded: at most 10 minutes' worth even if never stopped.
                    let deadline = Instant::now() + Duration::from_secs(600);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        buf.clear();
                        for id in next..next + depth {
                            halfsync_protocol::write_frame(
                                &mut buf,
                                id,
                                1,
                                &payload(seed, conn, id, max_payload),
                            );
                        }
                        let accepted = versions.accepted_from_now();
                        s.write_all(&buf)
                            .map_err(|e| format!("conn {conn}: write: {e}"))?;
                        let mut seen = vec![false; depth as usize];
                        for _ in 0..depth {
                            let f = r.frame().map_err(|e| format!("conn {conn}: read: {e}"))?;
                            let i = f.id.wrapping_sub(next);
                            if i >= depth || seen[i as usize] {
                                return Err(format!("conn {conn}: unexpected reply id {}", f.id));
                            }
                            seen[i as usize] = true;
                            if f.code != status::OK {
                                return Err(format!(
                                    "conn {conn}: id {} got status {} ({})",
                                    f.id,
                                    f.code,
                                    String::from_utf8_lossy(&f.payload)
                                ));
                            }
                            let want = payload(seed, conn, f.id, max_payload);
                            let good = accepted.iter().any(|p| {
                                f.payload.len() == p.len() + want.len()
                                    && f.payload.starts_with(p)
                                    && f.payload[p.len()..] == want[..]
                            });
                            if !good {
                                let head = String::from_utf8_lossy(&f.payload[..f.payload.len().min(8)]).into_owned();
                                return Err(format!(
                                    "conn {conn}: id {} payload differs (starts {head:?}; accepted prefixes {:?})",
                                    f.id,
                                    accepted.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect::<Vec<_>>()
                                ));
                            }
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        next += depth;
                    }
                    Ok(())
                })
            })
            .collect();
        Load { stop, ok, handles }
    }

    /// Requests answered correctly so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits (bounded) until `n` more requests were answered.
    pub fn progress(&self, n: u64) {
        let start = self.ok();
        let done = wait_for(Duration::from_secs(30), || {
            (self.ok() >= start + n).then_some(())
        });
        assert!(done.is_some(), "load stalled at {}", self.ok());
    }

    /// Stops the load; panics with every connection's error, if any.
    /// Returns the requests answered correctly.
    pub fn finish(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let errors: Vec<String> = self
            .handles
            .into_iter()
            .filter_map(|h| match h.join() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some("load thread panicked".into()),
            })
            .collect();
        assert!(
            errors.is_empty(),
            "{} load connections failed: {errors:#?}",
            errors.len()
        );
        self.ok.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Removes a file when dropped (a test's default admin socket in /tmp),
/// even if the test fails.
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// `GET /metrics` from the metrics listener on `port`: the whole answer.
pub fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut t = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics listener");
    t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    t.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut s = String::new();
    t.read_to_string(&mut s).unwrap();
    assert!(s.starts_with("HTTP/1.1 200 OK"), "{s}");
    s
}

/// The value of the series `name_and_labels` in a scrape, as an integer
/// (0 when absent).
pub fn metric(text: &str, name_and_labels: &str) -> u64 {
    text.lines()
        .find(|l| {
            l.starts_with(name_and_labels) && l.as_bytes().get(name_and_labels.len()) == Some(&b' ')
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// The value of the series `name_and_labels` in a scrape.
pub fn metric_f64(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| {
            l.starts_with(name_and_labels) && l.as_bytes().get(name_and_labels.len()) == Some(&b' ')
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
}

/// Runs `cmd` as user `uid` (the test runs as root).
pub fn as_user(cmd: &mut std::process::Command, uid: u32) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: setgid/setuid are async-signal-safe and allocate nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgid(uid) != 0 || libc::setuid(uid) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Kills a process when dropped (a test that fails leaves none behind).
pub struct KillOnDrop(pub i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        kill(self.0, libc::SIGKILL);
    }
}
