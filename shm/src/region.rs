//! A shared mapping of a memory file.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use memmap2::{MmapOptions, MmapRaw};

/// A memory file mapped shared and read-write. The mapping lives as long as
/// the `Region`; rings and control blocks inside it hold an `Arc<Region>`.
pub struct Region {
    map: MmapRaw,
    file: File,
}

impl Region {
    /// Maps all `len` bytes of `file` (which must be at least that long).
    pub fn map(file: File, len: usize) -> io::Result<Region> {
        let map = MmapOptions::new().len(len).map_raw(&file)?;
        Ok(Region { map, file })
    }

    /// Start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the mapping is empty (never, for regions this crate makes).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// The memory file, to pass to another process.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}
