//! The proxy's system calls: epoll, accept4, and the control socket. All
//! of the proxy's `unsafe` is in this file.

use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

macro_rules! syscall {
    ($fn: ident ( $($arg: expr),* $(,)? ) ) => {{
        // SAFETY: each call site passes arguments that satisfy the libc
        // function's contract (live buffers of the stated length, owned fds).
        let res = unsafe { libc::$fn($($arg, )*) };
        if res == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(res)
        }
    }};
}

/// Interest in readability.
pub const READ: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
/// Interest in writability.
pub const WRITE: u32 = libc::EPOLLOUT as u32;

/// One readiness event.
#[derive(Clone, Copy, Debug)]
pub struct Event {
    /// The token given at registration.
    pub token: u64,
    bits: u32,
}

impl Event {
    /// Data (or a peer close) to read.
    pub fn readable(&self) -> bool {
        self.bits & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0
    }
    /// Room to write.
    pub fn writable(&self) -> bool {
        self.bits & (libc::EPOLLOUT | libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0
    }
}

/// A level-triggered epoll instance.
pub struct Epoll {
    fd: OwnedFd,
    events: Vec<libc::epoll_event>,
}

impl Epoll {
    /// Creates an epoll instance that returns up to `batch` events per wait.
    pub fn new(batch: usize) -> io::Result<Epoll> {
        let fd = syscall!(epoll_create1(libc::EPOLL_CLOEXEC))?;
        Ok(Epoll {
            // SAFETY: epoll_create1 returned a new fd that nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            events: vec![libc::epoll_event { events: 0, u64: 0 }; batch.max(1)],
        })
    }

    fn ctl(&self, op: i32, fd: RawFd, interest: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: interest,
            u64: token,
        };
        syscall!(epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev)).map(|_| ())
    }

    /// Starts watching `fd`.
    pub fn add(&self, fd: RawFd, interest: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, interest, token)
    }

    /// Changes what `fd` is watched for.
    pub fn modify(&self, fd: RawFd, interest: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, interest, token)
    }

    /// Stops watching `fd`.
    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Waits for events; `None` waits forever. EINTR returns no events.
    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<&[libc::epoll_event]> {
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        match syscall!(epoll_wait(
            self.fd.as_raw_fd(),
            self.events.as_mut_ptr(),
            self.events.len() as i32,
            ms
        )) {
            Ok(n) => Ok(&self.events[..n as usize]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(&[]),
            Err(e) => Err(e),
        }
    }
}

/// Converts a raw epoll event.
pub fn event(ev: &libc::epoll_event) -> Event {
    Event {
        token: ev.u64,
        bits: ev.events,
    }
}

/// Accepts one connection, already non-blocking and close-on-exec (no
/// extra fcntl). `Ok(None)` when the backlog is empty.
pub fn accept4(listener: RawFd) -> io::Result<Option<TcpStream>> {
    match syscall!(accept4(
        listener,
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC
    )) {
        // SAFETY: accept4 returned a new connected socket nothing else owns.
        Ok(fd) => Ok(Some(unsafe { TcpStream::from_raw_fd(fd) })),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// Sends on a socket without raising SIGPIPE.
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    syscall!(send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL)).map(|n| n as usize)
}

/// Reads from a socket.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    syscall!(recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0)).map(|n| n as usize)
}

/// Takes ownership of an fd inherited from the master.
///
/// # Safety
/// `fd` must be open and owned by nothing else in this process.
pub unsafe fn take_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: guaranteed by the caller.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Whether `fd` is open in this process.
pub fn fd_is_open(fd: RawFd) -> bool {
    syscall!(fcntl(fd, libc::F_GETFD)).is_ok()
}

/// Creates a connected pair of SOCK_SEQPACKET Unix sockets (close-on-exec)
/// for the master-proxy control channel: message boundaries for free.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    syscall!(socketpair(
        libc::AF_UNIX,
        libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
        0,
        fds.as_mut_ptr()
    ))?;
    // SAFETY: socketpair returned two new fds nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends one datagram on a SEQPACKET socket (non-blocking, no SIGPIPE).
pub fn send_packet(fd: RawFd, buf: &[u8]) -> io::Result<()> {
    syscall!(send(
        fd,
        buf.as_ptr().cast(),
        buf.len(),
        libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT
    ))
    .map(|_| ())
}

/// Receives one datagram; `Ok(None)` if none is waiting, `Ok(Some(0))` at
/// end of stream.
pub fn recv_packet(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    match syscall!(recv(
        fd,
        buf.as_mut_ptr().cast(),
        buf.len(),
        libc::MSG_DONTWAIT
    )) {
        Ok(n) => Ok(Some(n as usize)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}
