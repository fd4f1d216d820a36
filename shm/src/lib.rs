//! Shared memory for halfsync: worker slots made of a control block and a
//! pair of lock-free single-producer single-consumer rings.
//!
//! The master creates one [`Slot`] per worker in its own sealed memfd
//! ([`Slot::create`]) and hands the fd to the proxy and to that worker, who
//! map it with [`Slot::open`]. The proxy attaches a [`Producer`] to the
//! slot's request ring and a [`Consumer`] to its reply ring; the worker the
//! other way round. See `ring.rs` for the protocol and its invariants.
//!
//! ```
//! use halfsync_shm::{Consumer, Meta, Notify, Producer, Slot};
//!
//! let slot = Slot::create("doc", 64 * 1024).unwrap();
//! let mut tx = Producer::attach(slot.requests(), Notify::Futex).unwrap();
//! let mut rx = Consumer::attach(slot.requests()).unwrap();
//! let meta = Meta { code: 1, id: 42, ..Meta::default() };
//! assert!(tx.push(&meta, b"hello").unwrap().is_some());
//! tx.publish();
//! let rec = rx.peek().unwrap().unwrap();
//! assert_eq!((rec.meta.id, rec.payload), (42, &b"hello"[..]));
//! rx.advance();
//! rx.release();
//! ```

#![deny(missing_docs)]

mod region;
mod ring;
mod slot;
pub mod sys;

pub use region::Region;
pub use ring::{
    Consumer, Meta, Notify, Producer, RECORD_HEADER_LEN, REWIND_AT, Record, Reservation, RingError,
    RingRef, run_time_flags, run_time_ns,
};
pub use slot::{BusyInfo, Control, Slot, SlotError, WorkerState};
