//! The control channel between the master and the proxy: a SOCK_SEQPACKET
//! socket pair carrying small fixed-size messages, one per packet, with
//! file descriptors attached as SCM_RIGHTS where a message needs them.
//!
//! The master owns processes and shared memory: it hands the proxy each
//! worker slot ([`ToProxy::AddSlot`]), and says when workers start and
//! exit. The proxy owns requests: it says when a dead worker's slot is
//! clean ([`ToMaster::SlotReset`]), when a worker must be killed (corrupt
//! memory, hung request), replaced (recycling) or retired (its replacement
//! is serving and it has drained).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::sys;

/// What the master will do about a slot whose worker exited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restart {
    /// A new worker starts in this slot at once.
    Now,
    /// A new worker starts after a backoff delay (the worker keeps failing).
    Later,
    /// No worker will run here (retired, replaced, or shutting down).
    Never,
}

/// Why the proxy wants a worker killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillReason {
    /// It corrupted its shared memory.
    Corrupt,
    /// A request ran past `request_timeout`.
    RequestTimeout,
    /// A request of a worker being replaced ran past `drain_timeout`
    /// (counted as a `timeout` too).
    DrainTimeout,
    /// Its plugin init ran past `init_timeout`.
    InitTimeout,
    /// It took none of its requests, not running one, past
    /// `request_timeout` (stopped, starved of CPU).
    Unresponsive,
}

/// Master to proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToProxy {
    /// A new worker slot; the memfd and the eventfd travel with the message.
    AddSlot {
        /// Slot index (stable for the master's lifetime).
        slot: u32,
        /// Index of the group in the config.
        group: u32,
        /// Worker number within the group, for logs.
        label: u32,
    },
    /// A worker process was started on `slot`; if `replaces` is set, it
    /// takes over from the worker of that slot once ready.
    WorkerStarted {
        /// Slot index.
        slot: u32,
        /// Its pid.
        pid: i32,
        /// The slot whose worker it replaces.
        replaces: Option<u32>,
        /// The slot's previous workers kept failing to start: until this
        /// one is ready, do not hold requests for it (answer BUSY if the
        /// group has nothing else).
        probation: bool,
        /// Worker number within its group (slots are reused, so it can
        /// change), for logs.
        label: u32,
    },
    /// The worker on `slot` exited (reaped by the master).
    WorkerExited {
        /// Slot index.
        slot: u32,
        /// Its pid.
        pid: i32,
        /// Exit code, or minus the signal number that killed it.
        status: i32,
        /// What happens to the slot next.
        restart: Restart,
    },
    /// Stop accepting, finish in-flight requests, then exit.
    Shutdown,
    /// Stop giving this slot's worker requests; retire it once it holds
    /// none (a group shrinking or going away).
    Drain {
        /// Slot index.
        slot: u32,
    },
    /// A new configuration: a memfd holding a [`crate::Reconfigure`] as
    /// TOML travels with the message.
    Reconfigure {
        /// Bytes of TOML in the memfd.
        len: u32,
    },
    /// Start accepting on this listener (its fd travels with the message).
    AddListener {
        /// Listener id (stable for the master's lifetime).
        id: u32,
    },
    /// Stop accepting on this listener and close it.
    RemoveListener {
        /// Listener id.
        id: u32,
    },
}

/// Proxy to master.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToMaster {
    /// The slot's rings and control block are reset; a new worker may start.
    SlotReset {
        /// Slot index.
        slot: u32,
    },
    /// Kill this worker.
    KillWorker {
        /// Slot index.
        slot: u32,
        /// The pid the proxy believes runs there.
        pid: i32,
        /// Why.
        reason: KillReason,
    },
    /// Start a replacement for this worker (it reached `max_requests` or
    /// `max_rss`); it keeps serving until the replacement is ready.
    Recycle {
        /// Slot index.
        slot: u32,
        /// Its pid.
        pid: i32,
    },
    /// This worker's replacement is serving and it holds no request: stop it.
    Retire {
        /// Slot index.
        slot: u32,
        /// Its pid.
        pid: i32,
    },
    /// Every connection is closed and every request answered.
    Drained,
    /// A started worker finished its plugin init and serves.
    WorkerReady {
        /// Slot index.
        slot: u32,
        /// Its pid.
        pid: i32,
    },
}

/// Describes how a process ended, from the status the master passes in
/// [`ToProxy::WorkerExited`]: `"exit code 3"` or `"killed by SIGSEGV (11)"`.
pub fn describe_exit(status: i32) -> String {
    if status >= 0 {
        return format!("exit code {status}");
    }
    let sig = -status;
    let name = match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGTERM => "SIGTERM",
        libc::SIGFPE => "SIGFPE",
        libc::SIGILL => "SIGILL",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGHUP => "SIGHUP",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGSYS => "SIGSYS",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGVTALRM => "SIGVTALRM",
        libc::SIGPROF => "SIGPROF",
        libc::SIGSTKFLT => "SIGSTKFLT",
        libc::SIGIO => "SIGIO",
        libc::SIGPWR => "SIGPWR",
        _ => "signal",
    };
    format!("killed by {name} ({sig})")
}

const LEN: usize = 24;
const NONE: u32 = u32::MAX;

fn encode(tag: u8, a: u32, b: u32, c: u32, d: u32) -> [u8; LEN] {
    encode5(tag, a, b, c, d, 0)
}

fn encode5(tag: u8, a: u32, b: u32, c: u32, d: u32, e: u32) -> [u8; LEN] {
    let mut m = [0u8; LEN];
    m[0] = tag;
    for (i, v) in [a, b, c, d, e].into_iter().enumerate() {
        m[4 + 4 * i..8 + 4 * i].copy_from_slice(&v.to_le_bytes());
    }
    m
}

fn decode(m: &[u8; LEN]) -> (u8, u32, u32, u32, u32) {
    let (t, a, b, c, d, _) = decode5(m);
    (t, a, b, c, d)
}

fn decode5(m: &[u8; LEN]) -> (u8, u32, u32, u32, u32, u32) {
    let w = |i: usize| u32::from_le_bytes([m[i], m[i + 1], m[i + 2], m[i + 3]]);
    (m[0], w(4), w(8), w(12), w(16), w(20))
}

impl Restart {
    fn code(self) -> u32 {
        match self {
            Restart::Now => 0,
            Restart::Later => 1,
            Restart::Never => 2,
        }
    }
    fn from_code(c: u32) -> Option<Restart> {
        Some(match c {
            0 => Restart::Now,
            1 => Restart::Later,
            2 => Restart::Never,
            _ => return None,
        })
    }
}

impl KillReason {
    fn code(self) -> u32 {
        match self {
            KillReason::Corrupt => 0,
            KillReason::RequestTimeout => 1,
            KillReason::InitTimeout => 2,
            KillReason::Unresponsive => 3,
            KillReason::DrainTimeout => 4,
        }
    }
    fn from_code(c: u32) -> Option<KillReason> {
        Some(match c {
            0 => KillReason::Corrupt,
            1 => KillReason::RequestTimeout,
            2 => KillReason::InitTimeout,
            3 => KillReason::Unresponsive,
            4 => KillReason::DrainTimeout,
            _ => return None,
        })
    }
}

impl ToProxy {
    fn encode(&self) -> [u8; LEN] {
        match *self {
            ToProxy::AddSlot { slot, group, label } => encode(1, slot, group, label, 0),
            ToProxy::WorkerStarted {
                slot,
                pid,
                replaces,
                probation,
                label,
            } => encode5(
                2,
                slot,
                pid as u32,
                replaces.unwrap_or(NONE),
                probation as u32,
                label,
            ),
            ToProxy::WorkerExited {
                slot,
                pid,
                status,
                restart,
            } => encode(3, slot, pid as u32, status as u32, restart.code()),
            ToProxy::Shutdown => encode(4, 0, 0, 0, 0),
            ToProxy::Drain { slot } => encode(5, slot, 0, 0, 0),
            ToProxy::Reconfigure { len } => encode(6, len, 0, 0, 0),
            ToProxy::AddListener { id } => encode(7, id, 0, 0, 0),
            ToProxy::RemoveListener { id } => encode(8, id, 0, 0, 0),
        }
    }
    fn decode(m: &[u8; LEN]) -> Option<ToProxy> {
        Some(match decode(m) {
            (1, slot, group, label, _) => ToProxy::AddSlot { slot, group, label },
            (2, slot, pid, r, p) => ToProxy::WorkerStarted {
                slot,
                pid: pid as i32,
                replaces: (r != NONE).then_some(r),
                probation: p != 0,
                label: decode5(m).5,
            },
            (3, slot, pid, status, r) => ToProxy::WorkerExited {
                slot,
                pid: pid as i32,
                status: status as i32,
                restart: Restart::from_code(r)?,
            },
            (4, ..) => ToProxy::Shutdown,
            (5, slot, ..) => ToProxy::Drain { slot },
            (6, len, ..) => ToProxy::Reconfigure { len },
            (7, id, ..) => ToProxy::AddListener { id },
            (8, id, ..) => ToProxy::RemoveListener { id },
            _ => return None,
        })
    }
}

impl ToMaster {
    fn encode(&self) -> [u8; LEN] {
        match *self {
            ToMaster::SlotReset { slot } => encode(1, slot, 0, 0, 0),
            ToMaster::KillWorker { slot, pid, reason } => {
                encode(2, slot, pid as u32, reason.code(), 0)
            }
            ToMaster::Recycle { slot, pid } => encode(3, slot, pid as u32, 0, 0),
            ToMaster::Retire { slot, pid } => encode(4, slot, pid as u32, 0, 0),
            ToMaster::Drained => encode(5, 0, 0, 0, 0),
            ToMaster::WorkerReady { slot, pid } => encode(6, slot, pid as u32, 0, 0),
        }
    }
    fn decode(m: &[u8; LEN]) -> Option<ToMaster> {
        Some(match decode(m) {
            (1, slot, ..) => ToMaster::SlotReset { slot },
            (2, slot, pid, r, _) => ToMaster::KillWorker {
                slot,
                pid: pid as i32,
                reason: KillReason::from_code(r)?,
            },
            (3, slot, pid, ..) => ToMaster::Recycle {
                slot,
                pid: pid as i32,
            },
            (4, slot, pid, ..) => ToMaster::Retire {
                slot,
                pid: pid as i32,
            },
            (5, ..) => ToMaster::Drained,
            (6, slot, pid, ..) => ToMaster::WorkerReady {
                slot,
                pid: pid as i32,
            },
            _ => return None,
        })
    }
}

/// What a receive found.
#[derive(Debug, PartialEq, Eq)]
pub enum Received<T> {
    /// A message, with the fds that came with it.
    Msg(T),
    /// Nothing waiting.
    Empty,
    /// The other end closed (its process is gone).
    Closed,
}

/// One end of the control channel.
pub struct Channel {
    fd: OwnedFd,
}

impl Channel {
    /// Creates a connected (master end, proxy end) pair.
    pub fn pair() -> io::Result<(Channel, Channel)> {
        let (a, b) = sys::seqpacket_pair()?;
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    /// Wraps an inherited fd.
    pub fn from_fd(fd: OwnedFd) -> Channel {
        Channel { fd }
    }

    /// The socket, to poll it or to pass it to a child.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    fn recv_raw(&self) -> io::Result<Received<([u8; LEN], Vec<OwnedFd>)>> {
        let mut buf = [0u8; LEN + 1];
        match sys::recv_packet_fds(self.fd.as_raw_fd(), &mut buf, 4)? {
            None => Ok(Received::Empty),
            Some((0, _)) => Ok(Received::Closed),
            Some((LEN, fds)) => {
                let mut m = [0u8; LEN];
                m.copy_from_slice(&buf[..LEN]);
                Ok(Received::Msg((m, fds)))
            }
            Some((n, _)) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("control message of {n} bytes"),
            )),
        }
    }

    /// Sends a message to the proxy (master side), with fds if it carries any.
    pub fn send_to_proxy(&self, m: ToProxy, fds: &[RawFd]) -> io::Result<()> {
        sys::send_packet_fds(self.fd.as_raw_fd(), &m.encode(), fds)
    }

    /// Sends a message to the master (proxy side).
    pub fn send_to_master(&self, m: ToMaster) -> io::Result<()> {
        sys::send_packet(self.fd.as_raw_fd(), &m.encode())
    }

    /// Receives a message from the master, with the fds it carried.
    pub fn recv_from_master(&self) -> io::Result<Received<(ToProxy, Vec<OwnedFd>)>> {
        Ok(match self.recv_raw()? {
            Received::Msg((m, fds)) => Received::Msg((ToProxy::decode(&m).ok_or_else(bad)?, fds)),
            Received::Empty => Received::Empty,
            Received::Closed => Received::Closed,
        })
    }

    /// Receives a message from the proxy (master side).
    pub fn recv_from_proxy(&self) -> io::Result<Received<ToMaster>> {
        Ok(match self.recv_raw()? {
            Received::Msg((m, _)) => Received::Msg(ToMaster::decode(&m).ok_or_else(bad)?),
            Received::Empty => Received::Empty,
            Received::Closed => Received::Closed,
        })
    }
}

fn bad() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "unknown control message")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_cross_the_pair() {
        let (m, p) = Channel::pair().unwrap();
        assert!(matches!(p.recv_from_master().unwrap(), Received::Empty));
        for msg in [
            ToProxy::AddSlot {
                slot: 3,
                group: 1,
                label: 7,
            },
            ToProxy::WorkerStarted {
                slot: 3,
                pid: 77,
                replaces: None,
                probation: true,
                label: 5,
            },
            ToProxy::WorkerStarted {
                slot: 4,
                pid: 78,
                replaces: Some(3),
                probation: false,
                label: 0,
            },
            ToProxy::WorkerExited {
                slot: 1,
                pid: 5,
                status: -9,
                restart: Restart::Later,
            },
            ToProxy::Shutdown,
            ToProxy::Drain { slot: 9 },
            ToProxy::Reconfigure { len: 1234 },
            ToProxy::AddListener { id: 2 },
            ToProxy::RemoveListener { id: 2 },
        ] {
            m.send_to_proxy(msg, &[]).unwrap();
            match p.recv_from_master().unwrap() {
                Received::Msg((got, fds)) => {
                    assert_eq!(got, msg);
                    assert!(fds.is_empty());
                }
                other => panic!("{other:?}"),
            }
        }
        for msg in [
            ToMaster::SlotReset { slot: 2 },
            ToMaster::KillWorker {
                slot: 4,
                pid: 9,
                reason: KillReason::RequestTimeout,
            },
            ToMaster::KillWorker {
                slot: 5,
                pid: 11,
                reason: KillReason::Unresponsive,
            },
            ToMaster::KillWorker {
                slot: 6,
                pid: 12,
                reason: KillReason::DrainTimeout,
            },
            ToMaster::Recycle { slot: 1, pid: 10 },
            ToMaster::Retire { slot: 1, pid: 10 },
            ToMaster::Drained,
            ToMaster::WorkerReady { slot: 3, pid: 44 },
        ] {
            p.send_to_master(msg).unwrap();
            assert_eq!(m.recv_from_proxy().unwrap(), Received::Msg(msg));
        }
        drop(m);
        assert!(matches!(p.recv_from_master().unwrap(), Received::Closed));
    }

    #[test]
    fn fds_travel_with_add_slot() {
        let (m, p) = Channel::pair().unwrap();
        let (a, b) = sys::seqpacket_pair().unwrap();
        m.send_to_proxy(
            ToProxy::AddSlot {
                slot: 0,
                group: 0,
                label: 0,
            },
            &[a.as_raw_fd(), b.as_raw_fd()],
        )
        .unwrap();
        let Received::Msg((_, fds)) = p.recv_from_master().unwrap() else {
            panic!("no message")
        };
        assert_eq!(fds.len(), 2);
        // The received fds are live duplicates: a packet sent on one end
        // arrives on the other.
        sys::send_packet(fds[0].as_raw_fd(), b"hi").unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(
            sys::recv_packet(fds[1].as_raw_fd(), &mut buf).unwrap(),
            Some(2)
        );
    }
}
