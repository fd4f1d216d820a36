//! Benchmark-only switches that turn off one of the proxy's techniques at a
//! time, so BENCHMARKS.md can show what each one is worth. Read once from
//! `HALFSYNC_TUNING` (comma-separated names) at proxy start; unset, every
//! technique is on. Not a configuration key on purpose: nobody should run
//! with these in production.

/// Which techniques are switched off.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Tuning {
    /// `plain_accept`: accept() then two fcntl() calls, not accept4().
    pub(crate) plain_accept: bool,
    /// `no_direct_send`: replies wait for an EPOLLOUT event instead of being
    /// sent at once.
    pub(crate) no_direct_send: bool,
    /// `flush_per_reply`: one send per reply instead of one per connection
    /// per loop turn (no deferred "ready" pass).
    pub(crate) flush_per_reply: bool,
    /// `clock_per_event`: read the clock for every request and reply, not
    /// once per loop turn.
    pub(crate) clock_per_event: bool,
    /// `publish_per_request`: publish the ring (and maybe wake the worker)
    /// after every request, not once per loop turn.
    pub(crate) publish_per_request: bool,
    /// `always_wake`: a wake-up syscall on every publish, sleeping peer or
    /// not.
    pub(crate) always_wake: bool,
    /// `no_read_budget`: read a connection until EAGAIN, however much it
    /// sends.
    pub(crate) no_read_budget: bool,
    /// `fifo_queue`: the wait queue serves requests in arrival order, not
    /// connection by connection in turn.
    pub(crate) fifo_queue: bool,
    /// `no_batch_affinity`: every request goes to the least-loaded worker,
    /// even when the previous one of the same read went elsewhere.
    pub(crate) no_batch_affinity: bool,
    /// `no_midturn_dispatch`: queued requests go to workers only at the
    /// end of a loop turn.
    pub(crate) no_midturn_dispatch: bool,
    /// `no_ring_rewind`: rings walk their whole capacity instead of
    /// starting again at offset 0 whenever they are empty (the worker
    /// reads this switch too, for its reply ring).
    pub(crate) no_ring_rewind: bool,
}

impl Tuning {
    /// Sets up a request ring's producer as the switches say.
    pub(crate) fn apply(&self, tx: &mut halfsync_shm::Producer) {
        tx.set_always_wake(self.always_wake);
        tx.set_rewind(!self.no_ring_rewind);
    }

    pub(crate) fn from_env() -> Tuning {
        let mut t = Tuning::default();
        let Ok(v) = std::env::var("HALFSYNC_TUNING") else {
            return t;
        };
        for name in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match name {
                "plain_accept" => t.plain_accept = true,
                "no_direct_send" => t.no_direct_send = true,
                "flush_per_reply" => t.flush_per_reply = true,
                "clock_per_event" => t.clock_per_event = true,
                "publish_per_request" => t.publish_per_request = true,
                "always_wake" => t.always_wake = true,
                "no_read_budget" => t.no_read_budget = true,
                "fifo_queue" => t.fifo_queue = true,
                "no_batch_affinity" => t.no_batch_affinity = true,
                "no_midturn_dispatch" => t.no_midturn_dispatch = true,
                "no_ring_rewind" => t.no_ring_rewind = true,
                // Read by the workers (worker/src/serve.rs).
                "reserve_max_reply" => {}
                other => tracing::warn!("HALFSYNC_TUNING: unknown switch {other:?} ignored"),
            }
        }
        tracing::warn!(?t, "benchmark tuning switches in effect");
        t
    }
}
