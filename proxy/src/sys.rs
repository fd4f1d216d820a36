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
    /// Data to read (EPOLLIN), not only a hang-up or an error.
    pub fn has_input(&self) -> bool {
        self.bits & libc::EPOLLIN as u32 != 0
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

/// Raises the soft open-file limit to the hard one; returns (old, new).
pub fn raise_nofile() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    syscall!(getrlimit(libc::RLIMIT_NOFILE, &mut lim))?;
    let old = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        syscall!(setrlimit(libc::RLIMIT_NOFILE, &lim))?;
    }
    Ok((old, lim.rlim_cur))
}

/// accept() then fcntl() twice (non-blocking, close-on-exec): what accept4
/// saves, for the `plain_accept` benchmark switch.
pub fn accept_plain(listener: RawFd) -> io::Result<Option<TcpStream>> {
    match syscall!(accept(listener, std::ptr::null_mut(), std::ptr::null_mut())) {
        Ok(fd) => {
            // SAFETY: accept returned a new connected socket nothing else owns.
            let s = unsafe { TcpStream::from_raw_fd(fd) };
            let fl = syscall!(fcntl(fd, libc::F_GETFL))?;
            syscall!(fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK))?;
            syscall!(fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC))?;
            Ok(Some(s))
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// Sends on a socket without raising SIGPIPE.
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    syscall!(send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL)).map(|n| n as usize)
}

/// Bytes sent on a TCP socket and not yet acknowledged by the peer
/// (`SIOCOUTQ`); `None` if the kernel does not say.
pub fn unacked_bytes(fd: RawFd) -> Option<u32> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int through the pointer, which
    // points to a live local.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    (rc == 0 && n >= 0).then_some(n as u32)
}

/// Bytes waiting to be read on a socket (`FIONREAD`); 0 if the kernel
/// does not say.
pub fn readable_bytes(fd: RawFd) -> u64 {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which points to
    // a live local.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if rc == 0 { n.max(0) as u64 } else { 0 }
}

/// Reads from a socket.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    syscall!(recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0)).map(|n| n as usize)
}

/// Takes ownership of an fd the master passed this process (named in the
/// spec), or `None` if it is not open.
pub fn inherited(fd: RawFd) -> Option<OwnedFd> {
    if !fd_is_open(fd) {
        return None;
    }
    // SAFETY: the master passed this fd to the proxy alone (everything else
    // it holds is close-on-exec) and the spec names each fd once, so this
    // is its only owner.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
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

/// Sends one datagram carrying `fds` as SCM_RIGHTS (non-blocking, no SIGPIPE).
pub fn send_packet_fds(fd: RawFd, buf: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.is_empty() {
        return send_packet(fd, buf);
    }
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure computation on its argument.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut cmsg_buf = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points to `space` bytes, enough for one header
    // and `fds`, so CMSG_FIRSTHDR is non-null and CMSG_DATA has room for
    // fd_bytes; the buffers outlive the sendmsg call.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), fd_bytes);
    }
    syscall!(sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)).map(|_| ())
}

/// Receives one datagram and the fds it carries (close-on-exec). `Ok(None)`
/// if none is waiting; a length of 0 means end of stream.
pub fn recv_packet_fds(
    fd: RawFd,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
    let fd_bytes = max_fds * std::mem::size_of::<RawFd>();
    // SAFETY: CMSG_SPACE is a pure computation on its argument.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut cmsg_buf = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = match syscall!(recvmsg(
        fd,
        &mut msg,
        libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC
    )) {
        Ok(n) => n as usize,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control with well-formed cmsg headers
    // of total length msg_controllen; the CMSG_* walkers stay inside it and
    // each SCM_RIGHTS payload is an array of fds now owned by this process.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Some((n, fds)))
}

/// Gives memory the allocator holds free back to the system
/// (`malloc_trim`; glibc only, elsewhere nothing). Costs a walk over the
/// allocator's free lists, so the proxy calls it at most once a second,
/// after freeing large buffers.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only inspects and releases the allocator's free
    // memory; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}
