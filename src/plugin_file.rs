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
//! so that a crash after it can say so. Size and mtime say the file may
//! have changed; a digest of its bytes, taken when it is opened, says
//! whether it did (a `touch` changes the mtime and nothing the workers
//! run).

use std::cell::Cell;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;

/// A plugin file: its path (for messages and `status`) and, when it could
/// be opened, a descriptor of it.
pub struct PluginFile {
    /// The path as resolved from the configuration.
    pub path: PathBuf,
    file: Option<(File, Stamp, Option<u64>)>,
    /// The stamp last looked at by `changed_in_place` and its answer, so
    /// that a touched file is read once, not at every `status`.
    checked: Cell<Option<(Stamp, bool)>>,
}

/// Size, modification and change times: what a rewrite changes (ctime
/// too, which a tool that restores the mtime, `rsync -t --inplace`, cannot
/// set back; a `touch` changes both, and the digest then decides).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp(u64, i64, i64, i64, i64);

impl Stamp {
    fn of(file: &File) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata().ok()?;
        Some(Stamp(
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
        ))
    }
}

/// Files larger than this are not digested (the master reads them whole,
/// at start and at each reload): the stamp alone decides for them.
const DIGEST_MAX: u64 = 64 << 20;

/// A digest of the bytes of the file `file` (an `O_PATH` descriptor)
/// names, read through `/proc/self/fd`; `None` if it cannot be read (a
/// plugin installed mode 0711 for a master that may not read it: then
/// size and mtime alone decide).
fn digest(file: &File) -> Option<u64> {
    use std::hash::Hasher;
    use std::io::Read;
    let mut f = File::open(crate::exe::fd_path(file)).ok()?;
    let mut h = std::hash::DefaultHasher::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Some(h.finish()),
            Ok(n) => h.write(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

impl PluginFile {
    /// Opens the file at `path` (`O_PATH`: a FIFO cannot block it, and it
    /// needs no permission beyond the path's; close-on-exec, so only
    /// children told to keep it get it), and reads a regular file of up to
    /// [`DIGEST_MAX`] once for its digest (in the master, a few ms for a
    /// plugin of some MiB; the probe that follows loads it anyway).
    /// Anything but a regular file is left to be loaded, and refused, by
    /// path.
    pub fn open(path: PathBuf) -> PluginFile {
        let file = crate::exe::open_path(&path)
            .ok()
            .filter(|f| f.metadata().is_ok_and(|m| m.is_file()))
            .and_then(|f| {
                let stamp = Stamp::of(&f)?;
                let sum = (stamp.0 <= DIGEST_MAX).then(|| digest(&f)).flatten();
                Some((f, stamp, sum))
            });
        PluginFile {
            path,
            file,
            checked: Cell::new(None),
        }
    }

    /// The same path, no longer held open.
    pub fn closed(&self) -> PluginFile {
        PluginFile {
            path: self.path.clone(),
            file: None,
            checked: Cell::new(None),
        }
    }

    /// The descriptor to load the plugin from, if the file was opened.
    pub fn fd(&self) -> Option<RawFd> {
        self.file.as_ref().map(|(f, _, _)| f.as_raw_fd())
    }

    /// Whether the file was rewritten in place since it was opened: its
    /// size or mtime changed and, where its bytes could be read, they
    /// differ from what they were.
    pub fn changed_in_place(&self) -> bool {
        let Some((f, stamp, sum)) = self.file.as_ref() else {
            return false;
        };
        let Some(now) = Stamp::of(f) else {
            return true;
        };
        if now == *stamp {
            return false;
        }
        if let Some((at, answer)) = self.checked.get()
            && at == now
        {
            return answer;
        }
        let answer = match sum {
            Some(sum) => digest(f) != Some(*sum),
            // No digest: size and mtime decide. (Not the ctime, which an
            // `mv` onto the path changes too, unlinking the held file.)
            None => (now.0, now.1, now.2) != (stamp.0, stamp.1, stamp.2),
        };
        self.checked.set(Some((now, answer)));
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::PluginFile;
    use std::time::{Duration, SystemTime};

    #[test]
    fn only_new_bytes_count_as_rewritten_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("libx.so");
        std::fs::write(&path, b"version one").unwrap();
        let p = PluginFile::open(path.clone());
        assert!(p.fd().is_some());
        assert!(!p.changed_in_place());
        // `touch`: a new mtime, the same bytes.
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(SystemTime::now() + Duration::from_secs(60))
            .unwrap();
        assert!(!p.changed_in_place());
        // The same bytes written again over it (a `cp` of the same build).
        std::fs::write(&path, b"version one").unwrap();
        assert!(!p.changed_in_place());
        // New bytes of the same size, in place.
        std::fs::write(&path, b"version two").unwrap();
        assert!(p.changed_in_place());
        // A new file renamed onto the path leaves the held one alone.
        let q = PluginFile::open(path.clone());
        let staged = dir.path().join("libx.so.new");
        std::fs::write(&staged, b"version three").unwrap();
        std::fs::rename(&staged, &path).unwrap();
        assert!(!q.changed_in_place());
    }

    /// A file too large to digest: size and mtime decide, not the ctime
    /// that an `mv` onto its path changes (it unlinks the held file).
    #[test]
    fn without_a_digest_an_mv_is_not_a_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("libbig.so");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(super::DIGEST_MAX + 1).unwrap();
        drop(f);
        let p = PluginFile::open(path.clone());
        let staged = dir.path().join("libbig.so.new");
        std::fs::write(&staged, b"new build").unwrap();
        std::fs::rename(&staged, &path).unwrap();
        assert!(!p.changed_in_place());
        // Rewritten in place (its mtime moves): said so.
        let q = PluginFile::open(path.clone());
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_len(super::DIGEST_MAX + 2).unwrap();
        f.set_modified(SystemTime::now() + Duration::from_secs(60))
            .unwrap();
        assert!(q.changed_in_place() || q.fd().is_none());
    }
}
