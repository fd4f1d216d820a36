//! The control channel between the master and the proxy: a SOCK_SEQPACKET
//! socket pair carrying small fixed-size messages, one per packet.
//!
//! The master tells the proxy about worker processes (started, exited) and
//! asks it to shut down; the proxy tells the master when a dead worker's
//! slot is clean again (so a replacement may start), when a worker must be
//! killed, and when it has drained.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::sys;

/// Master to proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToProxy {
    /// A worker process was started on `slot`.
    WorkerStarted {
        /// Slot index.
        slot: u32,
        /// Its pid.
        pid: i32,
    },
    /// The worker on `slot` exited (reaped by the master). `status` is the
    /// exit code, or minus the signal number if a signal killed it.
    WorkerExited {
        /// Slot index.
        slot: u32,
        /// Its pid.
        pid: i32,
        /// Exit code, or -signal.
        status: i32,
    },
    /// Stop accepting, finish in-flight requests, then exit.
    Shutdown,
}

/// Proxy to master.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToMaster {
    /// The slot's rings and control block are reset; a new worker may start.
    SlotReset {
        /// Slot index.
        slot: u32,
    },
    /// Kill this worker (its shared memory is corrupt).
    KillWorker {
        /// Slot index.
        slot: u32,
        /// The pid the proxy believes runs there.
        pid: i32,
    },
    /// Every connection is closed and every request answered.
    Drained,
}

const LEN: usize = 13;

fn encode(tag: u8, a: u32, b: i32, c: i32) -> [u8; LEN] {
    let mut m = [0u8; LEN];
    m[0] = tag;
    m[1..5].copy_from_slice(&a.to_le_bytes());
    m[5..9].copy_from_slice(&b.to_le_bytes());
    m[9..13].copy_from_slice(&c.to_le_bytes());
    m
}

fn decode(m: &[u8]) -> Option<(u8, u32, i32, i32)> {
    if m.len() != LEN {
        return None;
    }
    let a = u32::from_le_bytes(m[1..5].try_into().ok()?);
    let b = i32::from_le_bytes(m[5..9].try_into().ok()?);
    let c = i32::from_le_bytes(m[9..13].try_into().ok()?);
    Some((m[0], a, b, c))
}

impl ToProxy {
    fn encode(&self) -> [u8; LEN] {
        match *self {
            ToProxy::WorkerStarted { slot, pid } => encode(1, slot, pid, 0),
            ToProxy::WorkerExited { slot, pid, status } => encode(2, slot, pid, status),
            ToProxy::Shutdown => encode(3, 0, 0, 0),
        }
    }
    fn decode(m: &[u8]) -> Option<ToProxy> {
        Some(match decode(m)? {
            (1, slot, pid, _) => ToProxy::WorkerStarted { slot, pid },
            (2, slot, pid, status) => ToProxy::WorkerExited { slot, pid, status },
            (3, ..) => ToProxy::Shutdown,
            _ => return None,
        })
    }
}

impl ToMaster {
    fn encode(&self) -> [u8; LEN] {
        match *self {
            ToMaster::SlotReset { slot } => encode(1, slot, 0, 0),
            ToMaster::KillWorker { slot, pid } => encode(2, slot, pid, 0),
            ToMaster::Drained => encode(3, 0, 0, 0),
        }
    }
    fn decode(m: &[u8]) -> Option<ToMaster> {
        Some(match decode(m)? {
            (1, slot, ..) => ToMaster::SlotReset { slot },
            (2, slot, pid, _) => ToMaster::KillWorker { slot, pid },
            (3, ..) => ToMaster::Drained,
            _ => return None,
        })
    }
}

/// What a receive found.
#[derive(Debug, PartialEq, Eq)]
pub enum Received<T> {
    /// A message.
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

    fn recv_raw(&self) -> io::Result<Received<[u8; LEN]>> {
        let mut buf = [0u8; LEN + 1];
        match sys::recv_packet(self.fd.as_raw_fd(), &mut buf)? {
            None => Ok(Received::Empty),
            Some(0) => Ok(Received::Closed),
            Some(LEN) => {
                let mut m = [0u8; LEN];
                m.copy_from_slice(&buf[..LEN]);
                Ok(Received::Msg(m))
            }
            Some(n) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("control message of {n} bytes"),
            )),
        }
    }

    /// Sends a message to the proxy (master side).
    pub fn send_to_proxy(&self, m: ToProxy) -> io::Result<()> {
        sys::send_packet(self.fd.as_raw_fd(), &m.encode())
    }

    /// Sends a message to the master (proxy side).
    pub fn send_to_master(&self, m: ToMaster) -> io::Result<()> {
        sys::send_packet(self.fd.as_raw_fd(), &m.encode())
    }

    /// Receives a message from the master (proxy side).
    pub fn recv_from_master(&self) -> io::Result<Received<ToProxy>> {
        Ok(match self.recv_raw()? {
            Received::Msg(m) => Received::Msg(ToProxy::decode(&m).ok_or_else(bad)?),
            Received::Empty => Received::Empty,
            Received::Closed => Received::Closed,
        })
    }

    /// Receives a message from the proxy (master side).
    pub fn recv_from_proxy(&self) -> io::Result<Received<ToMaster>> {
        Ok(match self.recv_raw()? {
            Received::Msg(m) => Received::Msg(ToMaster::decode(&m).ok_or_else(bad)?),
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
        assert_eq!(p.recv_from_master().unwrap(), Received::Empty);
        for msg in [
            ToProxy::WorkerStarted { slot: 3, pid: 77 },
            ToProxy::WorkerExited {
                slot: 1,
                pid: 5,
                status: -9,
            },
            ToProxy::Shutdown,
        ] {
            m.send_to_proxy(msg).unwrap();
            assert_eq!(p.recv_from_master().unwrap(), Received::Msg(msg));
        }
        for msg in [
            ToMaster::SlotReset { slot: 2 },
            ToMaster::KillWorker { slot: 4, pid: 9 },
            ToMaster::Drained,
        ] {
            p.send_to_master(msg).unwrap();
            assert_eq!(m.recv_from_proxy().unwrap(), Received::Msg(msg));
        }
        drop(m);
        assert_eq!(p.recv_from_master().unwrap(), Received::Closed);
    }
}
