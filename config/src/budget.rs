//! A budget of log lines per second, for text the server logs on someone
//! else's behalf (a plugin's log calls, what a worker prints): a plugin
//! that logs or panics on every request must not fill the disk or spend
//! the machine writing log lines. journald limits services the same way.

use std::time::{Duration, Instant};

/// Log lines a plugin may have logged per second and per worker process,
/// each of its log calls and of the lines it prints counting one; the
/// rest are counted and reported in one line.
pub const PLUGIN_LINES_PER_SECOND: u32 = 300;

/// At most `per_second` lines in each one-second window; the lines past
/// that are dropped and counted, and the count is handed back once, at
/// the first line (or [`LineBudget::take_suppressed`]) of a later window.
#[derive(Debug)]
pub struct LineBudget {
    per_second: u32,
    /// When the current window began (none before the first line).
    window: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl LineBudget {
    /// A full budget of `per_second` lines.
    pub fn new(per_second: u32) -> LineBudget {
        LineBudget {
            per_second,
            window: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// A line wants writing at `now`: whether it may be, and how many
    /// lines were dropped before it (to be reported first), or 0.
    pub fn admit(&mut self, now: Instant) -> (bool, u64) {
        let reported = self.roll(now);
        if self.used < self.per_second {
            self.used += 1;
            (true, reported)
        } else {
            self.suppressed += 1;
            (false, reported)
        }
    }

    /// Whether any line was dropped and not yet reported (cheap: no clock
    /// read, for a caller on a hot path).
    pub fn has_suppressed(&self) -> bool {
        self.suppressed > 0
    }

    /// The count of lines dropped in windows that are over, once (for an
    /// idle moment, so that the last burst's count is not held until the
    /// next line).
    pub fn take_suppressed(&mut self, now: Instant) -> u64 {
        self.roll(now)
    }

    /// Starts a new window if the current one is over; returns what the
    /// finished one dropped.
    fn roll(&mut self, now: Instant) -> u64 {
        if self
            .window
            .is_some_and(|w| now.saturating_duration_since(w) < Duration::from_secs(1))
        {
            return 0;
        }
        self.window = Some(now);
        self.used = 0;
        std::mem::take(&mut self.suppressed)
    }
}

#[cfg(test)]
mod tests {
    use super::LineBudget;
    use std::time::{Duration, Instant};

    #[test]
    fn lines_past_the_budget_are_counted_and_reported_once() {
        let t0 = Instant::now();
        let mut b = LineBudget::new(3);
        let admitted: Vec<bool> = (0..5).map(|_| b.admit(t0).0).collect();
        assert_eq!(admitted, [true, true, true, false, false]);
        assert!(b.has_suppressed());
        // Still the same window: nothing to report yet.
        assert_eq!(b.take_suppressed(t0 + Duration::from_millis(999)), 0);
        // The next window's first line carries the count, once.
        assert_eq!(b.admit(t0 + Duration::from_secs(1)), (true, 2));
        assert_eq!(b.admit(t0 + Duration::from_secs(1)), (true, 0));
        // A burst, then quiet: the idle check reports it.
        let t2 = t0 + Duration::from_secs(2);
        for _ in 0..10 {
            b.admit(t2);
        }
        assert_eq!(b.take_suppressed(t2 + Duration::from_secs(5)), 7);
        assert_eq!(b.take_suppressed(t2 + Duration::from_secs(9)), 0);
    }
}
