//! The fault-injection plugins, Rust (`plugins/fault`) and C
//! (`plugins/c/test/fault.c`), through the real loader.
//!
//! The commands a worker survives run in this process. The fatal ones (and
//! the hangs) each run in a child process: this test binary, re-run on the
//! one test [`fault_child`], which loads the plugin, calls `init` and then
//! `handle` with the command named in its environment, printing a marker
//! after each step. The parent checks how the child died (signal or exit
//! code, and which markers it printed), or that it is still alive, and
//! kills it. Every wait is bounded.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use std::{env, thread};

use halfsync_shm::Slot;
use halfsync_testkit::{c_fault_plugin, fault, fault_plugin};
use halfsync_worker::plugin::{Instance, Plugin, Written};

// Linux signal numbers (x86, arm, riscv; the server is Linux-only).
const SIGABRT: i32 = 6;
const SIGBUS: i32 = 7;
const SIGKILL: i32 = 9;
const SIGSEGV: i32 = 11;

/// The longest any child may take to get anywhere.
const CHILD_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a hanging child must stay alive.
const HANG_CHECK: Duration = Duration::from_millis(300);

// The child's instructions, in its environment.
const ENV_PLUGIN: &str = "HALFSYNC_FAULT_TEST_PLUGIN";
const ENV_CONFIG: &str = "HALFSYNC_FAULT_TEST_CONFIG";
const ENV_COMMAND: &str = "HALFSYNC_FAULT_TEST_COMMAND";
const ENV_PAYLOAD: &str = "HALFSYNC_FAULT_TEST_PAYLOAD";
const ENV_SLOT: &str = "HALFSYNC_FAULT_TEST_SLOT";

// The child's markers, one line each on stdout.
const LOADED: &str = "FAULT-CHILD LOADED";
const INITIALISED: &str = "FAULT-CHILD INITIALISED";
const SLOT: &str = "FAULT-CHILD SLOT";
const SURVIVED: &str = "FAULT-CHILD SURVIVED";

/// Ring capacity of the slots the SCRIBBLE tests create.
const SLOT_CAPACITY: usize = 4096;

fn marker(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

/// The child half: does nothing unless [`ENV_PLUGIN`] is set, which only
/// [`Proc::spawn`] does.
#[test]
fn fault_child() {
    let Some(plugin) = env::var_os(ENV_PLUGIN) else {
        return;
    };
    let config = env::var(ENV_CONFIG).unwrap_or_default();
    let plugin = Plugin::load(Path::new(&plugin)).unwrap_or_else(|e| panic!("{e}"));
    marker(LOADED);
    let mut inst = plugin.init(&config).unwrap_or_else(|e| panic!("{e}"));
    marker(INITIALISED);
    let Ok(command) = env::var(ENV_COMMAND) else {
        marker(&format!("{SURVIVED} init"));
        return;
    };
    let command: u16 = command.parse().unwrap();
    let payload = decode_hex(&env::var(ENV_PAYLOAD).unwrap_or_default());
    let slot = env::var_os(ENV_SLOT).map(|name| {
        let slot = Slot::create(name.to_str().unwrap(), SLOT_CAPACITY).unwrap();
        marker(&format!(
            "{SLOT} fd={} capacity={}",
            slot.fd().as_raw_fd(),
            slot.capacity()
        ));
        slot
    });
    let mut out = vec![0; 4096];
    let (status, len) = inst.handle(1, command, 0, &payload, &mut out);
    marker(&format!(
        "{SURVIVED} status={status} payload={:?}",
        String::from_utf8_lossy(&out[..len])
    ));
    drop(slot);
}

fn decode_hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

fn encode_hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// A child running [`fault_child`], killed on drop if still alive.
struct Proc {
    what: String,
    child: Child,
    lines: Receiver<String>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

/// What the child should do.
#[derive(Default)]
struct Job<'a> {
    config: &'a str,
    command: Option<u16>,
    payload: &'a [u8],
    /// Create a slot (a memfd named `halfsync-...`) before `handle`.
    slot: bool,
}

impl Proc {
    fn spawn(plugin: &Path, job: &Job<'_>) -> Proc {
        let what = format!(
            "{} config={:?} command={:?} payload={:?}",
            plugin.display(),
            job.config,
            job.command,
            job.payload
        );
        let exe = env::current_exe().unwrap();
        // Through sh, to switch core dumps off: a dozen deliberate crashes
        // must not leave core files behind or keep a crash reporter busy.
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("ulimit -c 0 2>/dev/null; exec \"$0\" \"$@\"")
            .arg(exe)
            .args(["--exact", "fault_child", "--nocapture", "--test-threads=1"])
            .env(ENV_PLUGIN, plugin)
            .env(ENV_CONFIG, job.config)
            .env(ENV_PAYLOAD, encode_hex(job.payload))
            // As an operator may have it: a fatal plugin panic must still
            // end the process at once, without a backtrace.
            .env("RUST_BACKTRACE", "1")
            .env_remove(ENV_COMMAND)
            .env_remove(ENV_SLOT)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(command) = job.command {
            cmd.env(ENV_COMMAND, command.to_string());
        }
        if job.slot {
            let name = format!("halfsync-faulttest-{}", std::process::id());
            cmd.env(ENV_SLOT, name);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = mpsc::channel();
        let out_pipe = child.stdout.take().unwrap();
        let mut err_pipe = child.stderr.take().unwrap();
        let readers = vec![
            {
                let stdout = stdout.clone();
                thread::spawn(move || {
                    for line in BufReader::new(out_pipe).lines() {
                        let Ok(line) = line else { break };
                        stdout.lock().unwrap().push_str(&format!("{line}\n"));
                        let _ = tx.send(line);
                    }
                })
            },
            {
                let stderr = stderr.clone();
                thread::spawn(move || {
                    let mut buf = Vec::new();
                    let _ = err_pipe.read_to_end(&mut buf);
                    stderr
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf));
                })
            },
        ];
        Proc {
            what,
            child,
            lines,
            stdout,
            stderr,
            readers,
        }
    }

    fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn report(&self) -> String {
        format!(
            "{}\n--- stdout:\n{}--- stderr:\n{}",
            self.what,
            self.stdout(),
            self.stderr()
        )
    }

    /// Waits for the marker line starting with `prefix` and returns it.
    fn wait_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + CHILD_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(prefix) => return line,
                Ok(_) => {}
                Err(_) => {
                    self.kill();
                    panic!("no `{prefix}` line from the child\n{}", self.report());
                }
            }
        }
    }

    /// Waits for the child to end (killing it after [`CHILD_TIMEOUT`]) and
    /// for its output.
    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + CHILD_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                self.kill();
                panic!(
                    "child still running after {CHILD_TIMEOUT:?}: killed\n{}",
                    self.report()
                );
            }
            thread::sleep(Duration::from_millis(5));
        };
        // The pipes close with the child (it has no children of its own).
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        status
    }

    /// Asserts the child is alive [`HANG_CHECK`] from now, then kills it.
    fn assert_hangs(&mut self) {
        thread::sleep(HANG_CHECK);
        let status = self.child.try_wait().unwrap();
        assert!(
            status.is_none(),
            "child ended ({status:?}) instead of hanging\n{}",
            self.report()
        );
        self.kill();
    }

    fn kill(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How a fatal command must end the process.
#[derive(Clone, Copy, Debug)]
enum Death {
    Signal(i32),
    /// Exit code 0 from inside `handle`: no SURVIVED marker.
    ExitZero,
}

/// Runs `job` in a child and asserts it reached `init` (and `handle`, if
/// there is a command) and died as `death` says; returns its stderr.
fn assert_dies(plugin: &Path, job: &Job<'_>, death: Death) -> String {
    let mut p = Proc::spawn(plugin, job);
    let status = p.wait();
    let out = p.stdout();
    assert!(out.contains(LOADED), "{status:?}\n{}", p.report());
    if job.command.is_some() {
        assert!(out.contains(INITIALISED), "{status:?}\n{}", p.report());
    }
    assert!(
        !out.contains(SURVIVED),
        "survived ({status:?})\n{}",
        p.report()
    );
    match death {
        Death::Signal(sig) => assert_eq!(
            status.signal(),
            Some(sig),
            "expected death by signal {sig}, got {status:?}\n{}",
            p.report()
        ),
        Death::ExitZero => assert_eq!(
            status.code(),
            Some(0),
            "expected exit code 0, got {status:?}\n{}",
            p.report()
        ),
    }
    p.stderr()
}

const FATAL: [(u16, &str, Death); 6] = [
    (fault::SEGV, "SEGV", Death::Signal(SIGSEGV)),
    (fault::ABORT, "ABORT", Death::Signal(SIGABRT)),
    (
        fault::ESCAPING_PANIC,
        "ESCAPING_PANIC",
        Death::Signal(SIGABRT),
    ),
    (fault::EXIT, "EXIT", Death::ExitZero),
    (fault::SIGBUS, "SIGBUS", Death::Signal(SIGBUS)),
    (fault::SIGKILL, "SIGKILL", Death::Signal(SIGKILL)),
];

/// Every fatal command kills the process as documented; returns the
/// stderr of each child by command name.
fn check_fatal_commands(plugin: &Path) -> HashMap<&'static str, String> {
    let mut stderr = HashMap::new();
    for (command, name, death) in FATAL {
        let job = Job {
            command: Some(command),
            ..Job::default()
        };
        stderr.insert(name, assert_dies(plugin, &job, death));
    }
    let job = Job {
        config: "crash_in_init = true",
        ..Job::default()
    };
    stderr.insert(
        "crash_in_init",
        assert_dies(plugin, &job, Death::Signal(SIGSEGV)),
    );
    stderr
}

#[test]
fn rust_fatal_commands_kill_the_process() {
    let stderr = check_fatal_commands(&fault_plugin());
    // Rust refuses to unwind out of an `extern "C"` function and aborts;
    // the SDK's hook prints both panics with their places, and no
    // backtrace (even with RUST_BACKTRACE set: symbolizing one can take
    // seconds, during which the worker would look hung).
    let escaping = &stderr["ESCAPING_PANIC"];
    let line = escaping
        .lines()
        .find(|l| l.starts_with("plugin panicked at "))
        .unwrap_or_else(|| panic!("{escaping}"));
    assert!(
        line.contains(": fault: escaping panic; then at ")
            && line.ends_with(": panic in a function that cannot unwind"),
        "{line}"
    );
    assert!(!escaping.contains("stack backtrace"), "{escaping}");
}

#[test]
fn c_fatal_commands_kill_the_process() {
    check_fatal_commands(&c_fault_plugin());
}

fn check_hangs(plugin: &Path) {
    let job = Job {
        command: Some(fault::HANG),
        ..Job::default()
    };
    let mut p = Proc::spawn(plugin, &job);
    p.wait_line(INITIALISED);
    p.assert_hangs();

    let job = Job {
        config: "hang_in_init = true",
        ..Job::default()
    };
    let mut p = Proc::spawn(plugin, &job);
    p.wait_line(LOADED);
    p.assert_hangs();
}

#[test]
fn rust_hang_and_hang_in_init_never_return() {
    check_hangs(&fault_plugin());
}

#[test]
fn c_hang_and_hang_in_init_never_return() {
    check_hangs(&c_fault_plugin());
}

/// Reads `len` bytes at `offset` of the memory file `fd` of process `pid`.
fn read_memfd(pid: u32, fd: i32, offset: usize, len: usize) -> Vec<u8> {
    let file = File::open(format!("/proc/{pid}/fd/{fd}")).unwrap();
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, offset as u64).unwrap();
    buf
}

/// Polls until `check` accepts the bytes, for at most [`CHILD_TIMEOUT`].
fn wait_for_bytes(p: &Proc, fd: i32, offset: usize, len: usize, check: impl Fn(&[u8]) -> bool) {
    let deadline = Instant::now() + CHILD_TIMEOUT;
    loop {
        let bytes = read_memfd(p.child.id(), fd, offset, len);
        if check(&bytes) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "slot bytes at {offset}..{} never changed as expected: {:02x?}\n{}",
            offset + len,
            &bytes[..bytes.len().min(256)],
            p.report()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Accepts or rejects the bytes read from a slot.
type BytesCheck = dyn Fn(&[u8]) -> bool;

/// SCRIBBLE variants 0, 1 and 3 in a child that maps a slot: the bytes
/// change in the memory file as documented, and the child hangs after.
fn check_scribble_and_hang(plugin: &Path) {
    let reply_header = 4096 + 4096 + SLOT_CAPACITY;
    let reply_data = reply_header + 4096;
    let all_a5 = |b: &[u8]| b.iter().all(|&b| b == 0xA5);
    let cases: [(u8, usize, usize, &BytesCheck); 3] = [
        (
            fault::SCRIBBLE_REPLY_HEADER_HANG,
            reply_header,
            128,
            &all_a5,
        ),
        (fault::SCRIBBLE_CONTROL_HANG, 0, 128, &all_a5),
        // Random bytes: almost none of them zero (the ring starts zeroed).
        (
            fault::SCRIBBLE_REPLY_DATA_HANG,
            reply_data,
            SLOT_CAPACITY,
            &|b: &[u8]| b.iter().filter(|&&b| b != 0).count() > SLOT_CAPACITY * 9 / 10,
        ),
    ];
    for (variant, offset, len, check) in cases {
        let job = Job {
            command: Some(fault::SCRIBBLE),
            payload: &[variant],
            slot: true,
            ..Job::default()
        };
        let mut p = Proc::spawn(plugin, &job);
        let line = p.wait_line(SLOT);
        let fd: i32 = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("fd="))
            .and_then(|fd| fd.parse().ok())
            .unwrap_or_else(|| panic!("bad slot line {line:?}"));
        wait_for_bytes(&p, fd, offset, len, check);
        // Nothing past the 128 bytes of a header changed.
        if len == 128 {
            assert_eq!(read_memfd(p.child.id(), fd, offset + 128, 1), [0]);
        }
        p.assert_hangs();
    }
}

#[test]
fn rust_scribble_corrupts_the_slot_then_hangs() {
    check_scribble_and_hang(&fault_plugin());
}

#[test]
fn c_scribble_corrupts_the_slot_then_hangs() {
    check_scribble_and_hang(&c_fault_plugin());
}

// ---------------------------------------------------------------------------
// In this process: what a worker survives.

/// Held by the tests that run SCRIBBLE in this process: one maps a slot,
/// the others expect none.
fn slot_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

fn start(path: &Path, config: &str) -> Instance {
    Plugin::load(path)
        .unwrap_or_else(|e| panic!("{e}"))
        .init(config)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Runs one request with a reply buffer of `cap` bytes.
fn call(inst: &mut Instance, command: u16, payload: &[u8], cap: usize) -> (u16, String) {
    let mut out = vec![0xEE; cap];
    let (status, len) = inst.handle(42, command, 0, payload, &mut out);
    out.truncate(len);
    (status, String::from_utf8(out).unwrap())
}

/// `handle_split`: a reply that outgrows `out` goes on in the spill buffer
/// and comes back whole there, the length prefix included (the C plugin
/// fills it last, through the pointer into `out` that `reserve` gave it);
/// one that fits stays in `out`; the spill buffer is reused.
fn check_spill(inst: &mut Instance) {
    let body: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
    let whole = [&5000u32.to_be_bytes()[..], &body].concat();
    let mut spill = Vec::new();
    for _ in 0..2 {
        let mut out = vec![0xEE; 16];
        let (status, w) =
            inst.handle_split(1, fault::PREFIXED, 0, &body, &mut out, &mut spill, 10_000);
        assert_eq!((status, w), (0, Written::Spilled(5004)));
        assert!(spill[..5004] == whole[..]);
    }
    let mut out = vec![0xEE; 16];
    let (status, w) = inst.handle_split(
        2,
        fault::PREFIXED,
        0,
        b"short",
        &mut out,
        &mut spill,
        10_000,
    );
    assert_eq!((status, w), (0, Written::InPlace(9)));
    assert_eq!(&out[..9], b"\0\0\0\x05short");
    // Past the capacity the plugin is told about: refused as before.
    let mut out = vec![0xEE; 16];
    let (status, _) = inst.handle_split(3, fault::PREFIXED, 0, &body, &mut out, &mut spill, 4000);
    assert_eq!(status, 1);
}

/// What differs between the two plugins.
struct Expect {
    name: &'static str,
    panic: &'static str,
    too_big: &'static str,
    reserved: &'static str,
}

fn check_survivable(path: &Path, expect: &Expect) {
    let plugin = Plugin::load(path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(plugin.name(), expect.name);
    let mut inst = plugin.init("").unwrap_or_else(|e| panic!("{e}"));
    let ok = |s: &str| (0, s.to_owned());
    let err = |s: &str| (1, s.to_owned());
    for command in [fault::ECHO, 0, 2, 9, 25, 1000, u16::MAX] {
        assert_eq!(call(&mut inst, command, b"load", 64), ok("load"));
    }
    // Loaded with no identity (a test load), then as worker 3 of "game".
    assert_eq!(
        call(&mut inst, fault::WHOAMI, b"", 64),
        ok("group=- worker=-")
    );
    let mut named = plugin
        .init_as("", "game", 3)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        call(&mut named, fault::WHOAMI, b"", 64),
        ok("group=game worker=3")
    );
    named.fini();
    assert_eq!(
        call(&mut inst, fault::ECHO, b"too long", 4).0,
        1,
        "echo past the capacity"
    );
    assert_eq!(call(&mut inst, fault::PANIC, b"", 256), err(expect.panic));

    let t = Instant::now();
    assert_eq!(
        call(&mut inst, fault::SLOW, &[0, 0, 0, 20, b'!'], 64),
        ok("\0\0\0\x14!")
    );
    assert!(
        t.elapsed() >= Duration::from_millis(20),
        "{:?}",
        t.elapsed()
    );

    assert_eq!(
        call(&mut inst, fault::LEAK, &2u32.to_be_bytes(), 64),
        ok("\0\0\0\x02")
    );
    assert_eq!(
        call(&mut inst, fault::LEAK, &u32::MAX.to_be_bytes(), 256),
        err("fault: cannot allocate 4294967295 MiB")
    );
    assert_eq!(
        call(&mut inst, fault::REPLY_TOO_BIG, b"", 100),
        err(expect.too_big)
    );
    assert_eq!(
        call(&mut inst, fault::RESERVED_STATUS, b"", 256),
        err(expect.reserved)
    );
    assert_eq!(
        call(&mut inst, fault::CUSTOM, b"x", 64),
        (fault::CUSTOM_STATUS, "custom".to_owned())
    );
    check_spill(&mut inst);
    // This process maps no slot.
    let _no_slot = slot_lock();
    assert_eq!(
        call(&mut inst, fault::SCRIBBLE, &[0], 256),
        err("fault: no halfsync mapping")
    );
    assert_eq!(
        call(&mut inst, fault::SCRIBBLE, &[7], 256),
        err("fault: unknown scribble variant 7")
    );
    // Still serving.
    assert_eq!(call(&mut inst, fault::ECHO, b"after", 64), ok("after"));
    inst.fini();
}

#[test]
fn rust_survivable_commands_through_the_loader() {
    check_survivable(
        &fault_plugin(),
        &Expect {
            name: "fault",
            panic: "plugin panicked; the server log has its message",
            too_big: "reply full: 101 bytes do not fit in the 100 bytes left",
            reserved: "fault: the Rust SDK cannot return reserved status 4",
        },
    );
}

#[test]
fn c_survivable_commands_through_the_loader() {
    check_survivable(
        &c_fault_plugin(),
        &Expect {
            name: "c_fault",
            panic: "fault: requested error",
            too_big: "fault: reply too big",
            // The C plugin returns a raw 4; the loader maps it.
            reserved: "plugin returned reserved status 4",
        },
    );
}

fn check_init_config(path: &Path) {
    let plugin = Plugin::load(path).unwrap_or_else(|e| panic!("{e}"));
    let reason = |config: &str| match plugin.init(config) {
        Ok(_) => panic!("init with {config:?} succeeded"),
        Err(e) => e.reason(),
    };
    assert_eq!(
        reason("[x]\nfail_init = \"no \\\"db\\\" here\"  # why\n"),
        "no \"db\" here"
    );
    assert_eq!(reason("fail_init = 'literal'"), "literal");
    assert_eq!(
        reason("init_delay_ms = soon"),
        "fault: init_delay_ms: expected milliseconds, got `soon`"
    );
    assert_eq!(
        reason("crash_in_init = 1"),
        "fault: crash_in_init: expected true or false, got `1`"
    );

    let t = Instant::now();
    let mut inst = start(
        path,
        "other = 1\ninit_delay_ms = 50 # ms\ncrash_in_init = false\nhang_in_init = false\n",
    );
    assert!(
        t.elapsed() >= Duration::from_millis(50),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(call(&mut inst, fault::ECHO, b"up", 8), (0, "up".to_owned()));
    inst.fini();
}

#[test]
fn rust_init_config() {
    check_init_config(&fault_plugin());
}

#[test]
fn c_init_config() {
    check_init_config(&c_fault_plugin());
}

/// SCRIBBLE variant 2 returns normally: run it here, against a slot this
/// test maps, and look at the bytes.
#[test]
fn scribble_reply_header_and_return() {
    let _slot = slot_lock();
    for path in [fault_plugin(), c_fault_plugin()] {
        let mut inst = start(&path, "");
        let slot = Slot::create("halfsync-faulttest-inproc", SLOT_CAPACITY).unwrap();
        let file = File::open(format!("/proc/self/fd/{}", slot.fd().as_raw_fd())).unwrap();
        let header = 4096 + 4096 + slot.capacity();
        let mut before = vec![0; 129];
        file.read_exact_at(&mut before, header as u64).unwrap();
        assert!(before.iter().all(|&b| b == 0), "{before:02x?}");

        let payload = [fault::SCRIBBLE_REPLY_HEADER_RETURN, b'o', b'k'];
        let (status, reply) = call(&mut inst, fault::SCRIBBLE, &payload, 64);
        assert_eq!(
            (status, reply.as_bytes()),
            (0, &payload[..]),
            "{}",
            path.display()
        );
        let mut after = vec![0; 129];
        file.read_exact_at(&mut after, header as u64).unwrap();
        assert!(
            after[..128].iter().all(|&b| b == 0xA5),
            "{}: {after:02x?}",
            path.display()
        );
        assert_eq!(after[128], 0, "{}", path.display());
        // The control block is untouched.
        let mut control = vec![0; 128];
        file.read_exact_at(&mut control, 0).unwrap();
        assert!(control.iter().any(|&b| b != 0xA5), "{control:02x?}");
        drop(file);
        drop(slot);
        inst.fini();
    }
}
