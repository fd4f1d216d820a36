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
