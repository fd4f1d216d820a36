//! The halfsync executable that children (proxies, workers, the plugin
//! probe) are started from.
//!
//! Decision: children are exec'd from a descriptor of the very file the
//! master was started from (`/proc/self/fd/N`, opened once at start), not
//! from its path. A package upgrade that replaces the binary under a
//! running server (`mv` or `install` onto the path) then changes nothing
//! until a restart: a worker restarted after a crash, a recycle, a reload
//! or a restarted proxy runs the master's own build, as nginx's and
//! PHP-FPM's forked children do, and the control channel between master
//! and proxy never meets another version. (Started from the path, they ran
//! the new file beside an old master.)

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// This process's executable: where it was started from and an open
/// descriptor of the file itself.
pub struct Exe {
    path: PathBuf,
    file: File,
}

/// Opens `path` with `O_PATH` (and close-on-exec, as std always does): a
/// handle on the file itself that needs no read permission (a file
/// installed mode 0711 runs for users who cannot read it; exec and dlopen
/// through [`fd_path`] need only execute) and that a FIFO cannot block.
pub fn open_path(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)
}

/// The path that names `file` itself through this process's descriptor,
/// whatever its own path names by now: `/proc/self/fd/N`.
pub fn fd_path(file: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

impl Exe {
    /// The running executable.
    pub fn current() -> Result<Exe> {
        let path = std::env::current_exe().context("cannot find the halfsync executable")?;
        let file = open_path(Path::new("/proc/self/exe")).context("cannot open /proc/self/exe")?;
        Ok(Exe { path, file })
    }

    /// The directory it was started from (bundled plugins are found there).
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// What to exec a child from: this process's descriptor of its own
    /// file. The descriptor is close-on-exec, which is fine: the kernel
    /// opens the program before it closes those.
    pub fn program(&self) -> PathBuf {
        fd_path(&self.file)
    }
}
