//! The operating-system calls the shared-memory layer needs: memfd, eventfd,
//! futex. Every `unsafe` FFI call of this crate lives here or in `ring.rs`'s
//! raw memory accessors.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Calls a libc function and turns a `-1` return into `io::Error::last_os_error()`.
macro_rules! syscall {
    ($fn: ident ( $($arg: expr),* $(,)? ) ) => {{
        // SAFETY: every call site passes arguments that satisfy the libc
        // function's contract; each is checked where the macro is used.
        let res = unsafe { libc::$fn($($arg, )*) };
        if res == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(res)
        }
    }};
}

/// Creates an anonymous memory file of `len` bytes, sealed so that neither
/// side can shrink or grow it (a shrunk mapping would SIGBUS the reader).
/// It never appears in /dev/shm and vanishes with its last fd or mapping.
pub fn memfd_sealed(name: &str, len: u64) -> io::Result<File> {
    memfd_sealed_len(name, len, true)
}

/// Creates a memory file holding `text` (to pass a blob to another
/// process with its fd). Read it with positioned reads from offset 0.
pub fn memfd_with(text: &str) -> io::Result<File> {
    use std::io::Write;
    let mut file = memfd_sealed_len("halfsync-blob", 0, false)?;
    file.write_all(text.as_bytes())?;
    Ok(file)
}

/// What a child is told in its environment when its parent passes it a
/// text through [`memfd_with`]: the environment holds at most 128 KiB per
/// variable (`MAX_ARG_STRLEN`), less than a configuration may be.
pub fn blob_env(file: &File) -> String {
    format!("fd:{}", file.as_raw_fd())
}

/// The text a parent passed in environment variable `var`: the text itself,
/// or `fd:N` ([`blob_env`]), an inherited memory file holding it, which is
/// read from offset 0 and closed.
pub fn env_text(var: &str) -> Result<String, String> {
    use std::os::unix::fs::FileExt;
    let value = std::env::var(var).map_err(|_| format!("{var} is not set"))?;
    let Some(n) = value.strip_prefix("fd:") else {
        return Ok(value);
    };
    let fd: RawFd = n
        .parse()
        .map_err(|_| format!("{var}: bad descriptor {n:?}"))?;
    // SAFETY: F_GETFD only inspects the descriptor table.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return Err(format!("{var}: descriptor {fd} is not open"));
    }
    // SAFETY: the parent passed this descriptor for this text alone, and
    // it is taken here once (the variable is read once, at start).
    let file = unsafe { File::from_raw_fd(fd) };
    let len = fd_size(&file).map_err(|e| format!("{var}: {e}"))?;
    let mut buf = vec![0u8; usize::try_from(len).map_err(|_| format!("{var}: too large"))?];
    file.read_exact_at(&mut buf, 0)
        .map_err(|e| format!("{var}: {e}"))?;
    String::from_utf8(buf).map_err(|_| format!("{var}: not UTF-8"))
}

fn memfd_sealed_len(name: &str, len: u64, seal: bool) -> io::Result<File> {
    let cname = std::ffi::CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    let fd = syscall!(memfd_create(
        cname.as_ptr(),
        libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING
    ))?;
    // SAFETY: memfd_create just returned this fd and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)?;
    if seal {
        syscall!(fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL
        ))?;
    }
    Ok(file)
}

/// Creates a non-blocking, close-on-exec eventfd.
pub fn eventfd() -> io::Result<OwnedFd> {
    let fd = syscall!(eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK))?;
    // SAFETY: eventfd just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd counter, waking whoever polls it.
pub fn eventfd_signal(fd: RawFd) -> io::Result<()> {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live local; fd is an eventfd owned by the caller.
    let n = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    if n == 8 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    // EAGAIN means the counter is at its maximum: the reader is already due to wake.
    if err.kind() == io::ErrorKind::WouldBlock {
        Ok(())
    } else {
        Err(err)
    }
}

/// Resets an eventfd counter to zero; returns the count read (0 if none).
pub fn eventfd_drain(fd: RawFd) -> io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a live local; fd is an eventfd owned by the caller.
    let n = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
    if n == 8 {
        return Ok(v);
    }
    let err = io::Error::last_os_error();
    if err.kind() == io::ErrorKind::WouldBlock {
        Ok(0)
    } else {
        Err(err)
    }
}

/// Sleeps while `*word == expected`, at most `timeout`. Spurious returns are
/// allowed; callers re-check their condition. Shared (not private) futex,
/// because the word lives in memory mapped by several processes.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a live, aligned u32; the kernel only reads it. The
    // result is ignored on purpose: EAGAIN (value changed), EINTR and
    // ETIMEDOUT all mean "re-check and carry on".
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

/// Wakes up to `n` processes sleeping in [`futex_wait`] on `word`.
pub fn futex_wake(word: &AtomicU32, n: i32) {
    // SAFETY: `word` is a live, aligned u32; FUTEX_WAKE does not touch memory.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, n);
    }
}

/// Reads CLOCK_MONOTONIC in nanoseconds: the one clock every halfsync process
/// agrees on, so times stored in shared memory compare across processes.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a live local timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Clears FD_CLOEXEC so `fd` survives an `exec` into a child. Async-signal
/// safe: usable between fork and exec.
pub fn clear_cloexec(fd: RawFd) -> io::Result<()> {
    syscall!(fcntl(fd, libc::F_SETFD, 0)).map(|_| ())
}

/// Sets FD_CLOEXEC on an inherited `fd`, so processes this one starts do
/// not get it; fails if it is not open.
pub fn set_cloexec(fd: RawFd) -> io::Result<()> {
    syscall!(fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC)).map(|_| ())
}

/// Makes `len` bytes at `addr` (page-aligned) read-only in this process.
///
/// # Safety
/// `addr..addr + len` must be a mapping of this process that nothing in
/// this process writes to afterwards (a write would raise SIGSEGV).
pub unsafe fn mprotect_readonly(addr: *mut u8, len: usize) -> io::Result<()> {
    syscall!(mprotect(addr.cast(), len, libc::PROT_READ)).map(|_| ())
}

/// Returns the size of the file behind `fd`.
pub fn fd_size(fd: &impl AsRawFd) -> io::Result<u64> {
    // SAFETY: an all-zero stat is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    syscall!(fstat(fd.as_raw_fd(), &mut st))?;
    Ok(st.st_size as u64)
}
