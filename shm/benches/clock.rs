//! What reading the time costs: the worker reads CLOCK_MONOTONIC once per
//! request (`sys::monotonic_ns`: the hang detector's start time, the
//! queue-wait figure, the queue_timeout check), against the cheaper
//! clocks it could use instead: CLOCK_MONOTONIC_COARSE (a tick of a few
//! milliseconds, too coarse for the queue-wait histogram, whose first
//! bucket is 100 µs) and, on x86-64, the raw TSC (which would need its own
//! calibration against CLOCK_MONOTONIC, shared with other processes).
//!
//! Run: `taskset -c 0 cargo bench -p halfsync-shm --bench clock`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};

fn coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a live local timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

fn clocks(c: &mut Criterion) {
    let mut g = c.benchmark_group("clock");
    g.bench_function("monotonic_ns", |b| {
        b.iter(|| black_box(halfsync_shm::sys::monotonic_ns()))
    });
    g.bench_function("monotonic_coarse", |b| b.iter(|| black_box(coarse_ns())));
    #[cfg(target_arch = "x86_64")]
    g.bench_function("rdtsc", |b| {
        // SAFETY: RDTSC reads a counter; every x86-64 CPU has it.
        b.iter(|| black_box(unsafe { std::arch::x86_64::_rdtsc() }))
    });
    g.finish();
}

criterion_group!(benches, clocks);
criterion_main!(benches);
