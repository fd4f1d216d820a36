//! The worker's own system calls (the plugin FFI is in `plugin.rs`).

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Takes ownership of the slot memfd and the eventfd the master passed
/// this process, after checking both are open.
pub fn inherited(memfd: RawFd, eventfd: RawFd) -> io::Result<(File, OwnedFd)> {
    for fd in [memfd, eventfd] {
        // SAFETY: F_GETFD only inspects the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            return Err(io::Error::other(format!("inherited fd {fd} is not open")));
        }
    }
    // Not passed on to processes the plugin starts: with the memfd one
    // could map the request ring writable.
    for fd in [memfd, eventfd] {
        halfsync_shm::sys::set_cloexec(fd)?;
    }
    // SAFETY: the master passed these two fds to this process for the
    // worker alone (everything else it holds is close-on-exec), and each
    // is taken once, here.
    Ok(unsafe { (File::from_raw_fd(memfd), OwnedFd::from_raw_fd(eventfd)) })
}

/// Peak resident set size of this process, in bytes.
pub fn peak_rss_bytes() -> u64 {
    // SAFETY: an all-zero rusage is valid plain data for getrusage to fill.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF is always valid and `ru` is a live local.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    (ru.ru_maxrss.max(0) as u64) * 1024
}

unsafe extern "C" {
    /// C stdio's standard output stream (glibc and musl export it).
    static mut stdout: *mut libc::FILE;
}

/// Makes C stdio's stdout line-buffered. A worker's stdout is a pipe the
/// master logs line by line, and stdio buffers a pipe in blocks: a C
/// plugin's `printf` would reach the log only when 4 KiB had piled up or
/// the worker exited, and never if it crashed. Call before the plugin is
/// loaded (before anything is written to the stream).
pub fn line_buffer_stdout() {
    // SAFETY: `stdout` is initialised by the C runtime before main and
    // never reassigned by this program; no other thread uses C stdio (the
    // only other one, reopening the log file, writes through Rust's std,
    // not stdio; the plugin is not loaded yet), and setvbuf with a NULL
    // buffer lets stdio allocate its own.
    unsafe {
        let out = std::ptr::addr_of!(stdout).read();
        if !out.is_null() {
            libc::setvbuf(out, std::ptr::null_mut(), libc::_IOLBF, 0);
        }
    }
}
