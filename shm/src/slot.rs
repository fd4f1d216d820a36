//! A worker slot: one memory file holding the slot's control block, its
//! request ring (proxy to worker) and its reply ring (worker to proxy).
//!
//! Layout, all sections page-aligned:
//!
//! ```text
//! 0                       Control (one page)
//! 4096                    request ring: RingHeader page, then `capacity` bytes
//! 4096 + 4096 + capacity  reply ring:   RingHeader page, then `capacity` bytes
//! ```
//!
//! Each slot is its own memfd, so a worker maps only its own slot and
//! cannot scribble on another's.

use std::fs::File;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::region::Region;
use crate::ring::{RING_HEADER_LEN, RingRef};
use crate::sys;

const MAGIC: u64 = 0x6873_736c_6f74_0001; // "hsslot" + layout version 1
const CONTROL_LEN: usize = 4096;

/// What a worker is doing, as it reports in its control block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum WorkerState {
    /// No worker attached.
    Empty = 0,
    /// Loading and initialising its plugin.
    Starting = 1,
    /// Waiting for requests.
    Idle = 2,
    /// Inside a plugin's handle.
    Busy = 3,
    /// Finishing up after being asked to stop.
    Exiting = 4,
    /// The plugin's init failed; the worker is about to exit.
    InitFailed = 5,
}

impl WorkerState {
    fn from_u32(v: u32) -> Option<WorkerState> {
        Some(match v {
            0 => WorkerState::Empty,
            1 => WorkerState::Starting,
            2 => WorkerState::Idle,
            3 => WorkerState::Busy,
            4 => WorkerState::Exiting,
            5 => WorkerState::InitFailed,
            _ => return None,
        })
    }

    /// Lower-case name for logs and status output.
    pub fn name(self) -> &'static str {
        match self {
            WorkerState::Empty => "empty",
            WorkerState::Starting => "starting",
            WorkerState::Idle => "idle",
            WorkerState::Busy => "busy",
            WorkerState::Exiting => "exiting",
            WorkerState::InitFailed => "init-failed",
        }
    }
}

/// The request a worker is running, as its control block says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusyInfo {
    /// Ring position of the request record.
    pub pos: u64,
    /// Request id.
    pub id: u64,
    /// Command number.
    pub code: u16,
    /// CLOCK_MONOTONIC ns when the worker started it.
    pub since_ns: u64,
}

/// The control block at the start of a slot. The master writes `magic` and
/// `generation` before starting a worker; the worker writes everything
/// else; the proxy and master only read (and set `stop`). Values written by
/// the worker are untrusted: readers validate them.
#[repr(C)]
pub struct Control {
    magic: AtomicU64,
    generation: AtomicU32,
    pid: AtomicU32,
    state: AtomicU32,
    stop: AtomicU32,
    busy_pos: AtomicU64,
    busy_id: AtomicU64,
    busy_code: AtomicU32,
    recycle: AtomicU32,
    busy_since_ns: AtomicU64,
    served: AtomicU64,
    /// Request records at positions below this are claimed by the worker
    /// (run or running) or revoked by the proxy; see [`Control::claim`].
    cursor: AtomicU64,
    /// Plugin log lines the current worker dropped over its budget.
    log_dropped: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<Control>() <= FAILURE_OFFSET);

/// Where in the control page a worker leaves the reason it failed to start
/// (a u32 length, then UTF-8 text), for the master to report.
const FAILURE_OFFSET: usize = 2048;
const FAILURE_MAX: usize = CONTROL_LEN - FAILURE_OFFSET - 4;

impl Control {
    /// The slot generation the master assigned to the current worker.
    pub fn generation(&self) -> u32 {
        self.generation.load(Ordering::Acquire)
    }

    /// Sets the generation for the next worker (master, before spawning).
    pub fn set_generation(&self, g: u32) {
        self.generation.store(g, Ordering::Release);
    }

    /// The worker's pid as it reported it.
    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::Acquire)
    }

    /// Records the worker's pid.
    pub fn set_pid(&self, pid: u32) {
        self.pid.store(pid, Ordering::Release);
    }

    /// The worker's state, or `Err(raw)` if the value is not a state.
    pub fn state(&self) -> Result<WorkerState, u32> {
        let v = self.state.load(Ordering::Acquire);
        WorkerState::from_u32(v).ok_or(v)
    }

    /// Records the worker's state.
    pub fn set_state(&self, s: WorkerState) {
        self.state.store(s as u32, Ordering::Release);
    }

    /// Worker: about to run the request at ring position `pos`.
    pub fn begin(&self, pos: u64, id: u64, code: u16, now_ns: u64) {
        self.busy_pos.store(pos, Ordering::Relaxed);
        self.busy_id.store(id, Ordering::Relaxed);
        self.busy_code.store(code as u32, Ordering::Relaxed);
        self.busy_since_ns.store(now_ns, Ordering::Relaxed);
        self.state
            .store(WorkerState::Busy as u32, Ordering::Release);
    }

    /// Worker: finished the current request (its reply is written).
    pub fn end(&self) {
        // One writer: a plain load and store, not a locked add.
        self.served.store(
            self.served.load(Ordering::Relaxed).wrapping_add(1),
            Ordering::Relaxed,
        );
        self.state
            .store(WorkerState::Idle as u32, Ordering::Release);
    }

    /// The request being run, if the worker says it is busy.
    pub fn busy(&self) -> Option<BusyInfo> {
        if self.state.load(Ordering::Acquire) != WorkerState::Busy as u32 {
            return None;
        }
        Some(BusyInfo {
            pos: self.busy_pos.load(Ordering::Relaxed),
            id: self.busy_id.load(Ordering::Relaxed),
            code: self.busy_code.load(Ordering::Relaxed) as u16,
            since_ns: self.busy_since_ns.load(Ordering::Relaxed),
        })
    }

    /// Requests served by the current worker, as it counts them.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Plugin log lines the current worker dropped over its log budget,
    /// as it last reported them.
    pub fn log_dropped(&self) -> u64 {
        self.log_dropped.load(Ordering::Relaxed)
    }

    /// Worker: the plugin log lines it dropped so far (a running total);
    /// master: 0 once it has counted a dead worker's.
    pub fn set_log_dropped(&self, n: u64) {
        self.log_dropped.store(n, Ordering::Relaxed);
    }

    /// Worker: claims the request record at `pos` (ending at `next`) before
    /// running it. False if the proxy revoked it (it was handed to another
    /// worker): skip it without a reply. The proxy's [`Control::revoke`]
    /// and this compete on one compare-and-swap, so exactly one wins.
    pub fn claim(&self, pos: u64, next: u64) -> bool {
        let mut c = self.cursor.load(Ordering::Acquire);
        loop {
            if c > pos {
                return false;
            }
            match self
                .cursor
                .compare_exchange_weak(c, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(now) => c = now,
            }
        }
    }

    /// Proxy: revokes every request record the worker has not claimed, up
    /// to position `end` (the ring's tail). Returns the first revoked
    /// position: records from there on will be skipped by the worker and
    /// are the proxy's to hand elsewhere. `None` if nothing was left to
    /// revoke.
    pub fn revoke(&self, end: u64) -> Option<u64> {
        let mut c = self.cursor.load(Ordering::Acquire);
        loop {
            if c >= end {
                return None;
            }
            match self
                .cursor
                .compare_exchange_weak(c, end, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(c),
                Err(now) => c = now,
            }
        }
    }

    /// Worker: asks to be replaced (it reached `max_requests` or
    /// `max_rss`). It keeps serving until told to stop.
    pub fn want_recycle(&self) {
        self.recycle.store(1, Ordering::Release);
    }

    /// Whether the worker asked to be replaced.
    pub fn recycle_wanted(&self) -> bool {
        self.recycle.load(Ordering::Acquire) != 0
    }

    /// Asks the worker to finish its current request and exit.
    pub fn request_stop(&self) {
        self.stop.store(1, Ordering::Release);
    }

    /// Whether the worker was asked to stop.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Acquire) != 0
    }

    /// Clears everything a worker wrote or could have scribbled, for the
    /// next worker (the previous one must be dead).
    fn reset_worker_fields(&self) {
        // A worker that scribbled over its control block may have hit the
        // magic too.
        self.magic.store(MAGIC, Ordering::Relaxed);
        self.pid.store(0, Ordering::Relaxed);
        self.state
            .store(WorkerState::Empty as u32, Ordering::Relaxed);
        self.stop.store(0, Ordering::Relaxed);
        self.busy_pos.store(0, Ordering::Relaxed);
        self.busy_id.store(0, Ordering::Relaxed);
        self.busy_code.store(0, Ordering::Relaxed);
        self.recycle.store(0, Ordering::Relaxed);
        self.busy_since_ns.store(0, Ordering::Relaxed);
        self.served.store(0, Ordering::Relaxed);
        self.cursor.store(0, Ordering::Release);
    }
}

/// Errors opening a slot passed in by another process.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SlotError {
    /// A system call failed. (The cause is in the message, not also
    /// a `source`: a chain printed whole said it twice.)
    #[error("shared memory slot: {0}")]
    Io(io::Error),
    /// The memory file is not the size this ring capacity needs.
    #[error("shared memory slot has {found} bytes, expected {expected}")]
    Size {
        /// Bytes found.
        found: u64,
        /// Bytes expected.
        expected: u64,
    },
    /// The memory file does not start with a slot header.
    #[error("shared memory slot has a bad magic number {0:#x}")]
    Magic(u64),
}

impl From<io::Error> for SlotError {
    fn from(e: io::Error) -> SlotError {
        SlotError::Io(e)
    }
}

/// One worker slot's shared memory.
#[derive(Clone)]
pub struct Slot {
    region: Arc<Region>,
    capacity: usize,
}

impl Slot {
    /// Bytes a slot with rings of `capacity` bytes occupies.
    pub fn len_for(capacity: usize) -> usize {
        CONTROL_LEN + 2 * (RING_HEADER_LEN + capacity)
    }

    /// Creates a slot in a new sealed memfd (master).
    ///
    /// `capacity` must be a power of two of at least 4096.
    pub fn create(name: &str, capacity: usize) -> Result<Slot, SlotError> {
        if !capacity.is_power_of_two() || capacity < 4096 {
            return Err(SlotError::Size {
                found: capacity as u64,
                expected: capacity.next_power_of_two().max(4096) as u64,
            });
        }
        let len = Self::len_for(capacity);
        let file = sys::memfd_sealed(name, len as u64)?;
        let region = Arc::new(Region::map(file, len)?);
        let slot = Slot { region, capacity };
        slot.control().magic.store(MAGIC, Ordering::Release);
        Ok(slot)
    }

    /// Maps a slot from a memory file created by [`Slot::create`] in
    /// another process.
    pub fn open(file: File, capacity: usize) -> Result<Slot, SlotError> {
        let expected = Self::len_for(capacity) as u64;
        let found = sys::fd_size(&file)?;
        if found != expected || !capacity.is_power_of_two() || capacity < 4096 {
            return Err(SlotError::Size { found, expected });
        }
        let region = Arc::new(Region::map(file, expected as usize)?);
        let slot = Slot { region, capacity };
        let magic = slot.control().magic.load(Ordering::Acquire);
        if magic != MAGIC {
            return Err(SlotError::Magic(magic));
        }
        Ok(slot)
    }

    /// Maps a slot whose ring capacity is not known in advance: it is
    /// derived from the memory file's size.
    pub fn open_any(file: File) -> Result<Slot, SlotError> {
        let len = sys::fd_size(&file)?;
        let capacity =
            (len.saturating_sub(CONTROL_LEN as u64) / 2).saturating_sub(RING_HEADER_LEN as u64);
        Slot::open(file, capacity as usize)
    }

    /// The slot's control block.
    pub fn control(&self) -> &Control {
        // SAFETY: the region is at least CONTROL_LEN bytes and page-aligned;
        // Control is all atomics, valid for any bit pattern.
        unsafe { &*(self.region.as_ptr() as *const Control) }
    }

    /// The request ring (proxy produces, worker consumes).
    pub fn requests(&self) -> RingRef {
        RingRef::new(self.region.clone(), CONTROL_LEN, self.capacity)
    }

    /// The reply ring (worker produces, proxy consumes).
    pub fn replies(&self) -> RingRef {
        RingRef::new(
            self.region.clone(),
            CONTROL_LEN + RING_HEADER_LEN + self.capacity,
            self.capacity,
        )
    }

    /// Ring capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The memory file, to pass to a worker.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.region.fd()
    }

    /// Worker: maps the request ring's data pages read-only in this
    /// process, so no stray write of the worker (or its plugin) can alter
    /// a request the proxy may later hand to another worker. The worker
    /// still writes the ring header (its `head`) and the reply ring.
    pub fn protect_request_data(&self) -> io::Result<()> {
        // SAFETY: the request data area starts at CONTROL_LEN +
        // RING_HEADER_LEN (page-aligned) and spans `capacity` bytes (a
        // multiple of the page size) inside this slot's mapping; the
        // consumer side only reads it.
        unsafe {
            sys::mprotect_readonly(
                self.region.as_ptr().add(CONTROL_LEN + RING_HEADER_LEN),
                self.capacity,
            )
        }
    }

    /// Worker: leaves the reason it could not start (plugin load or init
    /// error) for the master, cut to 2 KiB.
    pub fn set_failure(&self, reason: &str) {
        let bytes = &reason.as_bytes()[..reason.len().min(FAILURE_MAX)];
        // SAFETY: FAILURE_OFFSET + 4 + FAILURE_MAX == CONTROL_LEN, inside the
        // mapping; the control page's tail is not used by anything else,
        // and only the slot's worker writes it while it lives.
        unsafe {
            let p = self.region.as_ptr().add(FAILURE_OFFSET);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), p.add(4), bytes.len());
            std::ptr::write_volatile(p as *mut u32, bytes.len() as u32);
        }
    }

    /// The reason the last worker left with [`Slot::set_failure`], if any:
    /// untrusted text, length-checked, made one line.
    pub fn failure(&self) -> Option<String> {
        // SAFETY: reads inside the control page; the length is checked
        // before the bytes are read, and any bytes are valid u8s.
        let text = unsafe {
            let p = self.region.as_ptr().add(FAILURE_OFFSET);
            let len = std::ptr::read_volatile(p as *const u32) as usize;
            if len == 0 || len > FAILURE_MAX {
                return None;
            }
            String::from_utf8_lossy(std::slice::from_raw_parts(p.add(4), len)).into_owned()
        };
        Some(text.replace(['\n', '\r'], " "))
    }

    /// Empties both rings and clears the worker's fields of the control
    /// block, keeping the generation. Only while no worker is attached.
    pub fn reset(&self) {
        self.requests().reset();
        self.replies().reset();
        self.control().reset_worker_fields();
        // SAFETY: the failure length word is inside the control page.
        unsafe {
            std::ptr::write_volatile(self.region.as_ptr().add(FAILURE_OFFSET) as *mut u32, 0)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::SlotError;

    /// The cause is said once: in the message, not also as a `source`
    /// that a whole chain (`{:#}` of anyhow) would print again.
    #[test]
    fn an_io_error_is_said_once() {
        let e = SlotError::from(std::io::Error::from_raw_os_error(libc::ENOMEM));
        assert!(std::error::Error::source(&e).is_none());
        assert_eq!(e.to_string().matches("Cannot allocate memory").count(), 1);
    }

    /// The fault plugins' SCRIBBLE_FUTURE_START_HANG writes the running
    /// request's start time at this offset of the control block (their
    /// CONTROL_BUSY_SINCE_OFFSET): it must stay where they write.
    #[test]
    fn the_start_time_is_where_the_fault_plugins_scribble() {
        assert_eq!(core::mem::offset_of!(super::Control, busy_since_ns), 48);
    }
}
