//! A group's plugin file, held open from the moment a configuration adopts
//! it (at start, or when a reload applies).
//!
//! Decision: workers load their plugin from the master's descriptor of the
//! file (`/proc/self/fd/N`), not from its path, as children are exec'd
//! from the master's own executable (`exe.rs`). A new build installed at
//! the path (`mv`, `install`) then changes nothing until `halfsync
//! reload`, which test-loads it first and can roll it back: a worker
//! restarted after a crash, recycled, or added by `scale` or a dynamic
//! pool runs the file its configuration was loaded with, so a group never
//! mixes two builds and an untested file never starts serving on its own.
//! The probe loads through the same descriptor, so what was tested is what
//! runs. A file that cannot be opened is loaded by path, and the loader's
//! error says what is wrong with it.
//!
//! While the path still names the held file, workers load it by the path
//! (so `$ORIGIN` in its RUNPATH is its directory); after another file was
//! installed there, through the descriptor, where `$ORIGIN` is
//! `/proc/self/fd`: a plugin that loads libraries shipped beside it
//! should get a directory per build (README, deploying).
//!
//! What a descriptor cannot pin is the file's content: `cp` onto the path
//! rewrites the same file in place, under the workers that run it.
//! [`PluginFile::changed_in_place`] tells the master that this happened,
//! so that a crash after it can say so.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;

/// A plugin file: its path (for messages and `status`) and, when it could
/// be opened, a descriptor of it.
pub struct PluginFile {
    /// The path as resolved from the configuration.
    pub path: PathBuf,
    file: Option<(File, Stamp)>,
}

/// Size and modification time: what `cp` onto a file changes.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp(u64, i64, i64);

impl Stamp {
    fn of(file: &File) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata().ok()?;
        Some(Stamp(m.size(), m.mtime(), m.mtime_nsec()))
    }
}

impl PluginFile {
    /// Opens the file at `path` (`O_PATH`: never blocks, needs no
    /// permission beyond the path's; close-on-exec, so only children
    /// told to keep it get it). Anything but a regular file is left to be
    /// loaded, and refused, by path.
    pub fn open(path: PathBuf) -> PluginFile {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(&path)
            .ok()
            .filter(|f| f.metadata().is_ok_and(|m| m.is_file()))
            .and_then(|f| Stamp::of(&f).map(|s| (f, s)));
        PluginFile { path, file }
    }

    /// The same path, no longer held open.
    pub fn closed(&self) -> PluginFile {
        PluginFile {
            path: self.path.clone(),
            file: None,
        }
    }

    /// The descriptor to load the plugin from, if the file was opened.
    pub fn fd(&self) -> Option<RawFd> {
        self.file.as_ref().map(|(f, _)| f.as_raw_fd())
    }

    /// Whether the file was rewritten in place since it was opened.
    pub fn changed_in_place(&self) -> bool {
        self.file
            .as_ref()
            .is_some_and(|(f, stamp)| Stamp::of(f) != Some(*stamp))
    }
}
