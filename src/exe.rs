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

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// This process's executable: where it was started from and an open
/// descriptor of the file itself.
pub struct Exe {
    path: PathBuf,
    file: std::fs::File,
}

impl Exe {
    /// The running executable.
    pub fn current() -> Result<Exe> {
        let path = std::env::current_exe().context("cannot find the halfsync executable")?;
        // O_PATH: no read permission needed (a binary installed mode 0711
        // runs for users who cannot read it); exec needs only execute.
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH)
                .open("/proc/self/exe")
                .context("cannot open /proc/self/exe")?
        };
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
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}
