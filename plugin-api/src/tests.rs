//! The SDK driven through the table `export_plugin!` generates, as the
//! worker drives it: the trampolines, their `catch_unwind`, the reply
//! accounting and the host log.

use std::cell::RefCell;

use crate::abi::{self, HsPlugin};
use crate::testing::Harness;
use crate::{Error, Host, LogLevel, Plugin, Reply, Request, Status};

/// Behaviour chosen by config at init and by command per request.
struct Probe {
    host: Host,
    panic_in_fini: bool,
}

thread_local! {
    /// A `Host` smuggled out of the plugin, to check it goes dead at fini.
    static STASHED_HOST: RefCell<Option<Host>> = const { RefCell::new(None) };
    /// A `Logger` smuggled out the same way, to check it does not.
    static STASHED_LOGGER: RefCell<Option<crate::Logger>> = const { RefCell::new(None) };
}

const ECHO: u16 = 1;
const PANIC: u16 = 2;
const WRITE_THEN_PANIC: u16 = 3;
const FAIL: u16 = 4;
const CUSTOM: u16 = 5;
const RESERVE: u16 = 6;
const IO_WRITE: u16 = 7;
const FMT_WRITE: u16 = 8;
const PANIC_ANY: u16 = 9;
const WHOAMI: u16 = 27;
const OVERFILL: u16 = 10;
const BAD_CUSTOM: u16 = 11;
const THREAD_LOG: u16 = 12;

impl Plugin for Probe {
    fn init(host: &Host, config: &str) -> Result<Self, Error> {
        match config {
            "fail" => return Err("missing required key `db`".into()),
            "panic" => panic!("init exploded"),
            _ => {}
        }
        host.info(&format!("probe init, config {config:?}"));
        STASHED_HOST.with(|h| *h.borrow_mut() = Some(host.clone()));
        STASHED_LOGGER.with(|l| *l.borrow_mut() = host.logger());
        Ok(Probe {
            host: host.clone(),
            panic_in_fini: config == "panic-in-fini",
        })
    }

    fn handle(&mut self, req: &Request<'_>, reply: &mut Reply<'_>) -> Result<Status, Error> {
        match req.command() {
            ECHO => {
                reply.write(req.payload())?;
                Ok(Status::OK)
            }
            PANIC => panic!("boom {}", req.id()),
            WRITE_THEN_PANIC => {
                reply.write(b"half a reply")?;
                panic!("after writing");
            }
            FAIL => {
                reply.write(b"partial")?;
                Err(format!("no such user {}", req.id()).into())
            }
            CUSTOM => Ok(Status::custom(404)),
            RESERVE => {
                let out = reply.reserve(4)?;
                assert_eq!(out, &[0, 0, 0, 0], "reserve hands out zeroed bytes");
                out.copy_from_slice(b"abcd");
                let more = reply.reserve(2)?;
                more.copy_from_slice(b"ef");
                Ok(Status::OK)
            }
            IO_WRITE => {
                use std::io::Write;
                reply.write(&[b'x'; 10])?;
                let e = reply
                    .write_all(&[b'y'; 100])
                    .expect_err("100 bytes do not fit");
                self.host.debug(&format!("{:?}: {e}", e.kind()));
                reply.write_all(&[b'y'; 40])?;
                Ok(Status::OK)
            }
            FMT_WRITE => {
                use std::fmt::Write;
                write!(
                    reply,
                    "id={} cmd={} flags={}",
                    req.id(),
                    req.command(),
                    req.flags()
                )?;
                Ok(Status::OK)
            }
            PANIC_ANY => std::panic::panic_any(42_u32),
            WHOAMI => {
                let group = self.host.group().unwrap_or_default();
                let worker = self.host.worker().map_or(-1, i64::from);
                use std::fmt::Write;
                write!(reply, "{group} {worker}")?;
                Ok(Status::OK)
            }
            OVERFILL => {
                reply.write(b"0123")?;
                let err = reply.write(b"456789").unwrap_err();
                assert_eq!((err.requested, err.remaining), (6, 4));
                assert_eq!(reply.len(), 4, "a failed write writes nothing");
                reply.write(b"4567")?;
                assert_eq!(reply.remaining(), 0);
                assert!(reply.reserve(1).is_err());
                reply.clear();
                assert!(reply.is_empty());
                reply.write(b"cleared")?;
                Ok(Status::OK)
            }
            // A code computed at run time, below 100: the panic names
            // this line, not the SDK's.
            BAD_CUSTOM => Ok(Status::custom(u16::from(
                req.payload().first().copied().unwrap_or(0),
            ))),
            THREAD_LOG => {
                let log = self.host.logger().ok_or("no logger")?;
                std::thread::spawn(move || log.warn("from a thread of the plugin's"))
                    .join()
                    .map_err(|_| "the thread panicked")?;
                Ok(Status::OK)
            }
            _ => Ok(Status::PLUGIN_ERROR),
        }
    }

    fn fini(&mut self) {
        self.host.info("probe fini");
        if self.panic_in_fini {
            panic!("fini exploded");
        }
    }
}

crate::export_plugin!(Probe, name = "probe", version = "1.2.3");

fn harness() -> Harness {
    let table: &'static HsPlugin = {
        // SAFETY: `halfsync_plugin_v1` returns a pointer to its static table.
        unsafe { &*halfsync_plugin_v1() }
    };
    // SAFETY: the table was generated by `export_plugin!`.
    unsafe { Harness::from_table(table) }
}

fn started() -> Harness {
    let mut h = harness();
    h.init("").expect("init");
    h
}

#[test]
fn table_is_v1_with_name_version_and_all_functions() {
    // SAFETY: as in `harness`.
    let table = unsafe { &*halfsync_plugin_v1() };
    assert_eq!(table.abi_version, abi::ABI_VERSION);
    assert_eq!(table.struct_size as usize, size_of::<HsPlugin>());
    assert!(table.init.is_some() && table.handle.is_some() && table.fini.is_some());
    let h = harness();
    assert_eq!(
        (h.name().as_str(), h.version().as_str()),
        ("probe", "1.2.3")
    );
}

#[test]
fn init_gets_config_and_a_working_host() {
    let mut h = harness();
    h.init("answer = 42").unwrap();
    assert_eq!(
        h.logs(),
        vec![(
            LogLevel::Info,
            "probe init, config \"answer = 42\"".to_owned()
        )]
    );
}

#[test]
fn echo_writes_the_payload_and_status_ok() {
    let mut h = started();
    assert_eq!(h.handle(1, ECHO, 0, b"hello", 64), (0, b"hello".to_vec()));
    assert_eq!(h.handle(2, ECHO, 0, b"", 64), (0, Vec::new()));
    assert_eq!(h.handle(3, ECHO, 0, b"", 0), (0, Vec::new()));
    let big = vec![0xa5; 65536];
    assert_eq!(h.handle(4, ECHO, 0, &big, 65536), (0, big.clone()));
}

#[test]
fn reply_over_capacity_fails_the_request_with_a_message() {
    let mut h = started();
    let (status, payload) = h.handle(1, ECHO, 0, b"0123456789", 1000);
    assert_eq!(status, 0);
    assert_eq!(payload, b"0123456789");
    let (status, payload) = h.handle(1, ECHO, 0, &[b'x'; 2000], 1000);
    assert_eq!(status, 1);
    assert_eq!(
        String::from_utf8(payload).unwrap(),
        "reply full: 2000 bytes do not fit in the 1000 bytes left"
    );
    // The message is cut to the capacity.
    let (status, payload) = h.handle(1, ECHO, 0, b"0123456789", 5);
    assert_eq!((status, payload.as_slice()), (1, &b"reply"[..]));
}

#[test]
fn reply_accounting_write_reserve_clear() {
    let mut h = started();
    assert_eq!(h.handle(1, OVERFILL, 0, b"", 8), (0, b"cleared".to_vec()));
    assert_eq!(h.handle(1, RESERVE, 0, b"", 6), (0, b"abcdef".to_vec()));
    assert_eq!(h.handle(1, RESERVE, 0, b"", 5).0, 1);
    assert_eq!(
        h.handle(9, FMT_WRITE, 3, b"", 64),
        (0, b"id=9 cmd=8 flags=3".to_vec())
    );
    assert_eq!(h.handle(9, FMT_WRITE, 3, b"", 4).0, 1);
}

#[test]
fn io_write_that_does_not_fit_writes_nothing_and_says_why() {
    let mut h = started();
    let (status, payload) = h.handle(1, IO_WRITE, 0, b"", 50);
    assert_eq!(status, 0);
    assert_eq!(payload, [[b'x'; 10].as_slice(), &[b'y'; 40]].concat());
    // (Not "failed to write whole buffer", which is all a serializer's
    // error said when the write was short.)
    assert!(
        h.logs().contains(&(
            LogLevel::Debug,
            "WriteZero: reply full: 100 bytes do not fit in the 40 bytes left".to_owned()
        )),
        "{:?}",
        h.logs()
    );
}

#[test]
fn handle_error_clears_the_reply_and_sends_the_message() {
    let mut h = started();
    let (status, payload) = h.handle(77, FAIL, 0, b"", 100);
    assert_eq!(status, i32::from(abi::STATUS_PLUGIN_ERROR));
    assert_eq!(payload, b"no such user 77");
}

#[test]
fn custom_status_passes_through() {
    let mut h = started();
    assert_eq!(h.handle(1, CUSTOM, 0, b"", 10), (404, Vec::new()));
    assert_eq!(h.handle(1, 999, 0, b"", 10), (1, Vec::new()));
}

#[test]
fn panic_in_handle_is_a_plugin_error_reply_and_the_plugin_goes_on() {
    let mut h = started();
    let (status, payload) = h.handle(5, PANIC, 0, b"", 100);
    assert_eq!(status, 1);
    // The client learns only that it panicked; the log line gets the
    // message and the place.
    assert_eq!(payload, crate::ffi::PANIC_REPLY.as_bytes());
    let logged = error_lines(&h);
    assert_eq!(
        logged.iter().map(|l| at_this_file(l)).collect::<Vec<_>>(),
        ["plugin panicked: boom 5 (request id 5, command 2)"],
        "{logged:?}"
    );
    // The reply is cleared before the message is written.
    let (status, payload) = h.handle(6, WRITE_THEN_PANIC, 0, b"", 100);
    assert_eq!(
        (status, payload.as_slice()),
        (1, crate::ffi::PANIC_REPLY.as_bytes())
    );
    // Cut to the capacity.
    let (status, payload) = h.handle(7, PANIC, 0, b"", 6);
    assert_eq!((status, payload.as_slice()), (1, &b"plugin"[..]));
    // Not a string.
    let (status, payload) = h.handle(8, PANIC_ANY, 0, b"", 100);
    assert_eq!(status, 1);
    assert_eq!(payload, crate::ffi::PANIC_REPLY.as_bytes());
    assert!(
        h.logs()
            .iter()
            .any(|(_, l)| l.starts_with("plugin panicked: (panic payload is not a string)")),
        "{:?}",
        h.logs()
    );
    // And the next request is served.
    assert_eq!(
        h.handle(9, ECHO, 0, b"still here", 100),
        (0, b"still here".to_vec())
    );
}

#[test]
fn init_error_and_init_panic_become_init_failures() {
    let mut h = harness();
    assert_eq!(h.init("fail"), Err("missing required key `db`".to_owned()));
    let mut h = harness();
    let e = h.init("panic").unwrap_err();
    assert_eq!(at_this_file(&e), "plugin panicked: init exploded");
}

/// Strips the panic location the SDK appends to operator-facing lines
/// (` at plugin-api/src/tests.rs:LINE:COL`), checking it names this file.
/// What the plugin logged at error level, in order.
fn error_lines(h: &Harness) -> Vec<String> {
    h.logs()
        .into_iter()
        .filter(|(level, _)| *level == LogLevel::Error)
        .map(|(_, line)| line)
        .collect()
}

fn at_this_file(line: &str) -> &str {
    let (text, at) = line
        .rsplit_once(" at ")
        .unwrap_or_else(|| panic!("no location in {line:?}"));
    let mut parts = at.rsplitn(3, ':');
    let (col, row, file) = (parts.next(), parts.next(), parts.next());
    assert_eq!(file, Some(file!()), "{line:?}");
    assert!(row.is_some_and(|r| r.parse::<u32>().is_ok()), "{line:?}");
    assert!(col.is_some_and(|c| c.parse::<u32>().is_ok()), "{line:?}");
    text
}

#[test]
fn init_rejects_a_config_that_is_not_utf8() {
    // SAFETY: as in `harness`.
    let table = unsafe { &*halfsync_plugin_v1() };
    let init = table.init.unwrap();
    let host = abi::HsHost {
        abi_version: abi::ABI_VERSION,
        struct_size: size_of::<abi::HsHost>() as u32,
        ctx: std::ptr::null_mut(),
        log: None,
        group: std::ptr::null(),
        worker: abi::NOT_A_WORKER,
        reserved: 0,
    };
    let config = b"k = \"\xff\"\0";
    let mut state = std::ptr::null_mut();
    let mut err = [0u8; 16];
    // SAFETY: all pointers are valid locals; `host` outlives the state,
    // which is never created (init must fail).
    let rc = unsafe {
        init(
            &host,
            config.as_ptr().cast(),
            config.len() - 1,
            &mut state,
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    assert_ne!(rc, 0);
    assert!(state.is_null());
    // Cut to 15 bytes plus the NUL.
    assert_eq!(&err, b"config is not v\0");
}

#[test]
fn panic_in_fini_is_logged_and_swallowed() {
    let mut h = harness();
    h.init("panic-in-fini").unwrap();
    h.fini();
    let logs = h.logs();
    assert!(logs.contains(&(LogLevel::Info, "probe fini".to_owned())));
    assert!(
        logs.iter().any(|(level, line)| *level == LogLevel::Error
            && at_this_file(line) == "plugin panicked in fini: fini exploded"),
        "{logs:?}"
    );
}

#[test]
fn a_host_kept_past_fini_goes_quiet() {
    let mut h = started();
    let stashed = STASHED_HOST.with(|s| s.borrow_mut().take()).unwrap();
    assert_eq!(stashed.abi_version(), abi::ABI_VERSION);
    h.fini();
    let before = h.logs().len();
    stashed.error("after fini");
    assert_eq!(stashed.abi_version(), 0);
    assert_eq!(h.logs().len(), before);
}

#[test]
fn harness_of_builds_the_same_table() {
    let mut h = Harness::of::<Probe>();
    assert_eq!(h.name(), "harness");
    h.init("").unwrap();
    assert_eq!(h.handle(1, ECHO, 0, b"x", 1), (0, b"x".to_vec()));
}

/// `Host::group` and `Host::worker` read the fields appended in ABI 1.1
/// only when the host's struct has them, and `worker` is `None` for a
/// test load (`NOT_A_WORKER`).
#[test]
fn group_and_worker_come_from_a_host_that_has_them() {
    use std::cell::Cell;
    use std::mem::{offset_of, size_of};
    use std::ptr::NonNull;
    use std::rc::Rc;

    let host = |struct_size: usize, worker: u32| {
        let raw = Box::leak(Box::new(abi::HsHost {
            abi_version: abi::ABI_VERSION,
            struct_size: struct_size as u32,
            ctx: std::ptr::null_mut(),
            log: None,
            group: c"game".as_ptr(),
            worker,
            reserved: 0,
        }));
        // SAFETY: leaked, so valid for ever, and never changed.
        unsafe { Host::from_raw(NonNull::from(raw), Rc::new(Cell::new(true))) }
    };
    let now = host(size_of::<abi::HsHost>(), 3);
    assert_eq!(
        (now.group().as_deref(), now.worker()),
        (Some("game"), Some(3))
    );
    let probe = host(size_of::<abi::HsHost>(), abi::NOT_A_WORKER);
    assert_eq!(
        (probe.group().as_deref(), probe.worker()),
        (Some("game"), None)
    );
    // A 1.0 host's struct ends after `log`: a genuinely shorter
    // allocation, of which no byte past its end is read (nor referenced).
    #[repr(C)]
    struct HostV10 {
        abi_version: u32,
        struct_size: u32,
        ctx: *mut std::ffi::c_void,
        log: Option<abi::HostLogFn>,
    }
    assert_eq!(size_of::<HostV10>(), offset_of!(abi::HsHost, group));
    let short = Box::leak(Box::new(HostV10 {
        abi_version: abi::ABI_VERSION,
        struct_size: size_of::<HostV10>() as u32,
        ctx: std::ptr::null_mut(),
        log: None,
    }));
    // SAFETY: leaked, valid for ever; a 1.0 `hs_host` of its own size.
    let old = unsafe {
        Host::from_raw(
            NonNull::from(short).cast::<abi::HsHost>(),
            Rc::new(Cell::new(true)),
        )
    };
    assert_eq!(
        (old.group(), old.worker(), old.abi_version()),
        (None, None, abi::ABI_VERSION)
    );
    old.info("no log function: nothing happens");
    // The harness names itself.
    let mut h = harness();
    h.init("").unwrap();
    assert_eq!(h.handle(1, WHOAMI, 0, b"", 64), (0, b"harness 0".to_vec()));
}

#[test]
fn a_custom_status_below_100_at_run_time_names_the_callers_line() {
    let mut h = started();
    let (status, _) = h.handle(3, BAD_CUSTOM, 0, &[50], 100);
    assert_eq!(status, 1);
    let logged = error_lines(&h);
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert!(
        at_this_file(&logged[0]).starts_with("plugin panicked: plugin status codes start at 100"),
        "{logged:?}"
    );
}

/// A `Logger` logs from threads the plugin starts, and after `fini` (a
/// `Host` does not).
#[test]
fn a_logger_logs_from_other_threads_and_after_fini() {
    let mut h = started();
    assert_eq!(h.handle(1, THREAD_LOG, 0, b"", 10).0, 0);
    h.fini();
    STASHED_LOGGER.with(|l| l.borrow().expect("a logger from init").info("after fini"));
    let logs = h.logs();
    assert!(
        logs.contains(&(LogLevel::Warn, "from a thread of the plugin's".to_owned())),
        "{logs:?}"
    );
    assert!(
        logs.contains(&(LogLevel::Info, "after fini".to_owned())),
        "{logs:?}"
    );
    fn send_sync<T: Send + Sync>() {}
    send_sync::<crate::Logger>();
}

/// The harness plays any worker, or none.
#[test]
fn the_harness_plays_the_worker_it_is_told() {
    let mut h = harness().as_worker(Some("game"), Some(3));
    h.init("").unwrap();
    assert_eq!(h.handle(1, WHOAMI, 0, b"", 64), (0, b"game 3".to_vec()));
    let mut h = harness().as_worker(None, None);
    h.init("").unwrap();
    assert_eq!(h.handle(1, WHOAMI, 0, b"", 64), (0, b" -1".to_vec()));
}
