//! The worker's loop: take a request, run the plugin, publish the reply.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use halfsync_shm::{Consumer, Meta, Notify, Producer, Slot, WorkerState, sys};
use tracing::{debug, error, info};

use crate::{EXIT_PLUGIN_FAILED, EXIT_SLOT_FAILED, Plugin, WorkerSpec, Written, sys as wsys};

/// HSP/1 status TIMEOUT (the worker answers stale requests itself).
const STATUS_TIMEOUT: u16 = 3;

/// One reply in about this many carries the plugin's run time to the
/// proxy: the gaps between samples are drawn from `RUN_TIME_GAPS`, so a
/// client pattern that repeats every 16 requests (15 cheap, one slow) is
/// not always sampled at the same place.
const RUN_TIME_GAPS: std::ops::RangeInclusive<u32> = 8..=24;

/// After a sampled request that ran this long, every request is sampled
/// until one runs shorter: the second clock read (~35 ns) is nothing
/// beside such a request, and the proxy's estimate of a slow plugin
/// (which sizes its in-flight cap and decides where requests go) then
/// follows within a request or two instead of one in sixteen.
const SAMPLE_EVERY_FROM_US: u64 = 100;

/// Decides which requests have their run time sampled: the second (the
/// first runs on cold caches; the only one of a worker recycled after one
/// request, `max_requests`), then one in [`RUN_TIME_GAPS`], or every one
/// while they are slow ([`SAMPLE_EVERY_FROM_US`]). (Without any sample the
/// group's in-flight cap stays at its starting 16, whatever its requests
/// cost.)
struct RunSampler {
    left: u32,
    every: bool,
    rng: fastrand::Rng,
}

impl RunSampler {
    /// `max_requests`: the worker's recycling limit, 0 for none.
    fn new(rng: fastrand::Rng, max_requests: u64) -> RunSampler {
        RunSampler {
            left: if max_requests == 1 { 1 } else { 2 },
            every: false,
            rng,
        }
    }

    fn gap(&mut self) -> u32 {
        self.rng.u32(RUN_TIME_GAPS)
    }

    /// True if the next request is to be sampled.
    fn next(&mut self) -> bool {
        if self.every {
            return true;
        }
        self.left -= 1;
        if self.left > 0 {
            return false;
        }
        self.left = self.gap();
        true
    }

    /// A sampled request ran `us` microseconds.
    fn sampled(&mut self, us: u64) {
        self.every = us >= SAMPLE_EVERY_FROM_US;
    }
}

/// `max_rss` is checked after this many requests (and whenever the ring
/// runs empty): reading the peak RSS is a system call, which every request
/// would pay for otherwise (half the throughput of a 1 µs plugin). A plugin
/// can overshoot by what this many requests allocate; `max_rss` is a
/// recycling trigger, not a hard limit (that is the cgroup's job).
const RSS_CHECK_EVERY: u64 = 64;

/// Room reserved in the reply ring before each request: replies up to this
/// size are written by the plugin straight into shared memory; longer ones
/// (up to `max_frame`) go on in a heap buffer and are copied in after. A
/// reservation of the whole `max_frame` (1 MiB by default) would make the
/// ring pad and wrap every few requests and keep it from rewinding to its
/// first pages (see halfsync-shm's ring doc), which at 4 KiB replies cost
/// ~40% of the throughput.
const REPLY_RESERVE: usize = 64 << 10;

/// How long the worker sleeps on an empty ring before re-checking for a
/// stop request (a publish or a stop wakes it at once).
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// Runs the worker until it is asked to stop; returns the process exit code.
pub fn run(spec: WorkerSpec) -> i32 {
    let stop = Arc::new(AtomicBool::new(false));
    // SIGTERM: finish the current request and exit. (The master sets
    // SIGINT, SIGQUIT and SIGHUP to be ignored: a terminal's Ctrl-C is the
    // master's to handle.)
    if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone()) {
        error!("cannot install signal handler: {e}");
        return EXIT_SLOT_FAILED;
    }

    let (memfd, eventfd) = match wsys::inherited(spec.memfd, spec.eventfd) {
        Ok(fds) => fds,
        Err(e) => {
            error!("{e}");
            return EXIT_SLOT_FAILED;
        }
    };
    let eventfd_raw: RawFd = std::os::fd::AsRawFd::as_raw_fd(&eventfd);
    let slot = match Slot::open(memfd, spec.ring_size as usize) {
        Ok(s) => s,
        Err(e) => {
            error!("cannot map slot: {e}");
            return EXIT_SLOT_FAILED;
        }
    };
    if let Err(e) = slot.protect_request_data() {
        error!("cannot protect the request ring: {e}");
        return EXIT_SLOT_FAILED;
    }
    let ctl = slot.control();
    ctl.set_pid(std::process::id());
    ctl.set_state(WorkerState::Starting);

    wsys::line_buffer_stdout();
    // The file the master holds open for this configuration (it may have
    // been replaced at its path since); kept open, so that a backtrace can
    // still read the plugin's symbols, but not handed to the plugin's own
    // children.
    let loaded = match spec.plugin_fd {
        Some(fd) if halfsync_shm::sys::set_cloexec(fd).is_ok() => {
            Plugin::load_open(&spec.plugin, fd)
        }
        _ => Plugin::load(&spec.plugin),
    };
    let plugin = match loaded {
        Ok(p) => p,
        Err(e) => {
            error!("{e}");
            slot.set_failure(&e.to_string());
            ctl.set_state(WorkerState::InitFailed);
            return EXIT_PLUGIN_FAILED;
        }
    };
    let mut instance = match plugin.init_as(&spec.plugin_config, &spec.group, spec.index) {
        Ok(i) => i,
        Err(e) => {
            error!("{e}");
            slot.set_failure(&e.to_string());
            ctl.set_state(WorkerState::InitFailed);
            return EXIT_PLUGIN_FAILED;
        }
    };

    let (mut rx, mut tx) = match (
        Consumer::attach(slot.requests()),
        Producer::attach(slot.replies(), Notify::EventFd(eventfd_raw)),
    ) {
        (Ok(rx), Ok(tx)) => (rx, tx),
        (Err(e), _) | (_, Err(e)) => {
            error!("cannot attach to rings: {e}");
            return EXIT_SLOT_FAILED;
        }
    };
    // A rewind's pad goes back to the proxy as soon as it is skipped, not
    // after the request behind it has run.
    rx.set_release_pads(true);
    let max_reply = (spec.max_reply as usize).min(slot.replies().max_payload());
    // Benchmark switches (see the proxy's tuning.rs): wake the proxy on
    // every reply, asleep or not; never rewind the reply ring; reserve room
    // for the largest reply before every request.
    let switch = |name: &str| {
        std::env::var("HALFSYNC_TUNING").is_ok_and(|t| t.split(',').any(|s| s.trim() == name))
    };
    tx.set_always_wake(switch("always_wake"));
    tx.set_rewind(!switch("no_ring_rewind"));
    let first = if switch("reserve_max_reply") {
        max_reply
    } else {
        max_reply.min(REPLY_RESERVE)
    };
    // Where a reply longer than `first` is assembled (grown on first use).
    let mut spill = Vec::new();

    ctl.set_state(WorkerState::Idle);
    // Tell the proxy we are ready (it also polls, this just makes it prompt).
    let _ = sys::eventfd_signal(eventfd_raw);
    info!(
        plugin = plugin.name(),
        version = plugin.version(),
        "worker ready"
    );

    let mut served: u64 = 0;
    let mut sampler = RunSampler::new(fastrand::Rng::new(), spec.max_requests);
    let mut recycle_asked = false;
    let mut rss_checked_at: u64 = 0;
    let mut dropped_published: u64 = 0;
    // Exiting after the plugin ran but before its reply was in the ring.
    let mut ran_unanswered = false;
    let code = loop {
        if stop.load(Ordering::Relaxed) || ctl.stop_requested() {
            break 0;
        }
        let rec = match rx.peek() {
            Ok(Some(r)) => r,
            Ok(None) => {
                // Idle: the cheapest moment for the RSS check, and for
                // saying how many plugin log lines were over budget.
                instance.report_dropped_logs();
                publish_dropped(&instance, ctl, &mut dropped_published);
                if !recycle_asked && spec.max_rss > 0 && served != rss_checked_at {
                    rss_checked_at = served;
                    recycle_asked = check_rss(&spec, ctl, served);
                }
                if let Err(e) = rx.wait(IDLE_WAIT) {
                    error!("request ring: {e}");
                    break EXIT_SLOT_FAILED;
                }
                continue;
            }
            Err(e) => {
                error!("request ring: {e}");
                break EXIT_SLOT_FAILED;
            }
        };
        let req = rec.meta;
        // Claim it first: the proxy may have handed it to another worker
        // while this one was stuck on an earlier request.
        if !ctl.claim(rec.pos, rec.end) {
            rx.advance();
            rx.release();
            continue;
        }
        let now = sys::monotonic_ns();
        ctl.begin(rec.pos, req.id, req.code, now);
        // A request that waited too long is answered TIMEOUT, never run.
        let stale =
            spec.queue_timeout_ns > 0 && now.saturating_sub(req.time_ns) > spec.queue_timeout_ns;

        // Room for the common reply, so the plugin writes straight into
        // the ring; a longer one spills to `spill` and is copied in after.
        // The proxy drains replies continuously; waiting here only happens
        // when it is far behind.
        if !matches!(tx.fits(first), Ok(true)) && !wait_for_room(&mut tx, first, Some(&stop)) {
            break EXIT_SLOT_FAILED;
        }
        let Ok(Some(mut res)) = tx.try_reserve(first) else {
            break EXIT_SLOT_FAILED;
        };
        // A stale request is not run, so it cannot be a sample (a worker
        // recycled after a few requests may have only one).
        let sample = !stale && sampler.next();
        // A sample times the plugin alone, not a wait for reply room.
        let run_start = if sample { sys::monotonic_ns() } else { now };
        let (status, written) = if stale {
            let msg = b"waited longer than queue_timeout for a worker";
            let buf = res.buf();
            let n = msg.len().min(buf.len());
            buf[..n].copy_from_slice(&msg[..n]);
            (STATUS_TIMEOUT, Written::InPlace(n))
        } else {
            let out = res.buf();
            instance.handle_split(
                req.id,
                req.code,
                req.flags,
                rec.payload,
                out,
                &mut spill,
                max_reply,
            )
        };
        // On sampled replies, flags carries the run time (see `Meta::flags`).
        let flags = if sample {
            let us = (sys::monotonic_ns().saturating_sub(run_start) + 500) / 1000;
            sampler.sampled(us);
            halfsync_shm::run_time_flags(us)
        } else {
            0
        };
        let meta = Meta {
            code: status,
            flags,
            id: req.id,
            tag: req.tag,
            // When the worker started it: the proxy derives queue wait.
            time_ns: now,
        };
        match written {
            Written::InPlace(len) => res.commit(&meta, len),
            Written::Spilled(len) => {
                // The small reservation `res` is given up (nothing of it
                // was published) and the whole reply copied in. The
                // plugin has run: a stop request does not cut this wait
                // short, and if the ring fails the worker exits still
                // marked busy with this request, so the proxy answers it
                // WORKER_DIED instead of running it again elsewhere.
                tx.abandon();
                if !wait_for_room(&mut tx, len, None) {
                    ran_unanswered = true;
                    break EXIT_SLOT_FAILED;
                }
                let Ok(Some(mut big)) = tx.try_reserve(len) else {
                    ran_unanswered = true;
                    break EXIT_SLOT_FAILED;
                };
                big.buf()[..len].copy_from_slice(&spill[..len]);
                big.commit(&meta, len);
            }
        }
        // Hand the request's space back before publishing the reply: a
        // proxy woken by the reply then also sees the room, and never sleeps
        // on a request queue it could have dispatched.
        rx.advance();
        rx.release_and_publish(&mut tx);
        ctl.end();
        served += 1;
        // (A worker whose ring never runs empty reports here.)
        publish_dropped(&instance, ctl, &mut dropped_published);
        if !recycle_asked && spec.max_requests > 0 && served >= spec.max_requests {
            // Keep serving; the proxy has a replacement started and retires
            // this worker once the replacement is ready.
            recycle_asked = true;
            info!(served, "recycling limit reached: max_requests");
            ctl.want_recycle();
        }
        if !recycle_asked && spec.max_rss > 0 && served - rss_checked_at >= RSS_CHECK_EVERY {
            rss_checked_at = served;
            recycle_asked = check_rss(&spec, ctl, served);
        }
    };
    if !ran_unanswered {
        ctl.set_state(WorkerState::Exiting);
    }
    // The last second's dropped lines too, before the master reads them.
    instance.report_dropped_logs_at_exit();
    publish_dropped(&instance, ctl, &mut dropped_published);
    if code == 0 {
        instance.fini();
        // The master logs the exit ("worker exited", with the cause).
        debug!("worker stopped");
    }
    code
}

/// Puts the plugin's count of dropped log lines in the control block when
/// it changed (for the master's metrics).
fn publish_dropped(instance: &crate::Instance, ctl: &halfsync_shm::Control, published: &mut u64) {
    let n = instance.log_lines_dropped();
    if n != *published {
        ctl.set_log_dropped(n);
        *published = n;
    }
}

/// Asks to be recycled if the peak RSS passed `max_rss`; true if it asked.
/// Like `max_requests`, the worker keeps serving until it is replaced.
fn check_rss(spec: &WorkerSpec, ctl: &halfsync_shm::Control, served: u64) -> bool {
    let rss = wsys::peak_rss_bytes();
    if rss < spec.max_rss {
        return false;
    }
    info!(served, rss, "recycling limit reached: max_rss");
    ctl.want_recycle();
    true
}

/// Waits until a reply of `n` payload bytes fits in the reply ring. False if
/// the ring is corrupt, or `stop` was set while it waited (the proxy drains
/// replies whatever it is doing, so without `stop` this ends unless the
/// proxy dies, and then the master kills this worker).
fn wait_for_room(tx: &mut Producer, n: usize, stop: Option<&AtomicBool>) -> bool {
    loop {
        match tx.fits(n) {
            Ok(true) => return true,
            Ok(false) if stop.is_some_and(|s| s.load(Ordering::Relaxed)) => return false,
            Ok(false) => {
                if let Err(e) = tx.wait_for_space(n, Duration::from_millis(100)) {
                    error!("reply ring: {e}");
                    return false;
                }
            }
            Err(e) => {
                error!("reply ring: {e}");
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{RUN_TIME_GAPS, RunSampler, SAMPLE_EVERY_FROM_US};

    /// Samples `n` requests that each ran `us(i)` µs; the indices sampled.
    fn run(s: &mut RunSampler, n: u32, us: impl Fn(u32) -> u64) -> Vec<u32> {
        let mut at = Vec::new();
        for i in 0..n {
            if s.next() {
                s.sampled(us(i));
                at.push(i);
            }
        }
        at
    }

    #[test]
    fn run_time_samples_are_one_in_about_16_and_not_periodic() {
        let mut s = RunSampler::new(fastrand::Rng::with_seed(7), 0);
        let at = run(&mut s, 16_000, |_| 1);
        // The second request (not the first, on cold caches), then gaps.
        assert_eq!(at[0], 1);
        // Gaps stay in range; about one in 16 overall.
        for w in at.windows(2) {
            assert!(RUN_TIME_GAPS.contains(&(w[1] - w[0])), "{w:?}");
        }
        assert!((900..=1100).contains(&at.len()), "{}", at.len());
        // Every position of a 16-request pattern gets sampled.
        let mut seen = [0u32; 16];
        for &i in &at {
            seen[(i % 16) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 20), "{seen:?}");
    }

    #[test]
    fn slow_requests_are_all_sampled_until_a_fast_one() {
        let mut s = RunSampler::new(fastrand::Rng::with_seed(7), 0);
        // Requests 0..100 take 200 ms, the rest 1 µs.
        let at = run(&mut s, 1_000, |i| if i < 100 { 200_000 } else { 1 });
        // From the second request on, every slow one, and the first fast
        // one (which ends it); then one in 8..24 again.
        assert_eq!(at[..100], (1..=100).collect::<Vec<_>>()[..]);
        for w in at[99..].windows(2) {
            assert!(RUN_TIME_GAPS.contains(&(w[1] - w[0])), "{w:?}");
        }
        // Just under the threshold: gaps as usual.
        let mut s = RunSampler::new(fastrand::Rng::with_seed(7), 0);
        let at = run(&mut s, 1_000, |_| SAMPLE_EVERY_FROM_US - 1);
        assert!(at.len() < 130, "{}", at.len());
    }

    #[test]
    fn a_worker_recycled_early_still_samples_once() {
        for max_requests in [1u64, 2, 3, 4, 7, 15, 16, 30] {
            for seed in 0..50 {
                let mut s = RunSampler::new(fastrand::Rng::with_seed(seed), max_requests);
                let first = (1..=max_requests).find(|_| s.next());
                // The second request, or the only one of one.
                assert_eq!(
                    first,
                    Some(max_requests.min(2)),
                    "max_requests {max_requests}"
                );
            }
        }
        // No limit, or a long one: never the first request.
        for max_requests in [0u64, 100] {
            for seed in 0..50 {
                let mut s = RunSampler::new(fastrand::Rng::with_seed(seed), max_requests);
                assert!(!s.next());
            }
        }
    }
}
