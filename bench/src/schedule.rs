//! How connections, requests and the open-loop schedule are divided.
//!
//! Connections have global indices `0..connections`. The `active` ones (those
//! that carry traffic) are spread evenly: connection `g` is active when
//! `floor((g+1)·A/N) > floor(g·A/N)`, and its *active index* is
//! `floor(g·A/N)`. Threads and processes own contiguous ranges of global
//! indices, so each gets an even share of active and idle connections.
//!
//! The open-loop schedule is global: request `k` (counting over all
//! connections) is due at `start + k/rate`, on the connection with active
//! index `k mod A`. So connection `a` sends its `j`-th request at
//! `start + (a + j·A)/rate`: each connection sends every `A/rate` seconds,
//! connections staggered by `1/rate`. Any split into threads or processes
//! that all use the same `start` reproduces exactly the same schedule.

use std::ops::Range;

/// Number of active connections among global indices `0..g`.
pub fn active_before(g: u64, connections: u64, active: u64) -> u64 {
    if connections == 0 {
        return 0;
    }
    (g as u128 * active as u128 / connections as u128) as u64
}

/// Whether connection `g` carries traffic.
pub fn is_active(g: u64, connections: u64, active: u64) -> bool {
    active_before(g + 1, connections, active) > active_before(g, connections, active)
}

/// The `i`-th of `parts` contiguous, near-equal pieces of `range`.
pub fn split(range: &Range<u64>, parts: u64, i: u64) -> Range<u64> {
    let len = (range.end - range.start) as u128;
    let parts = parts.max(1) as u128;
    let at = |p: u128| range.start + (len * p / parts) as u64;
    at(i as u128)..at(i as u128 + 1)
}

/// The share of a `total` request budget owed to the active indices
/// `active_range` out of `active` (shares of adjacent ranges add up to
/// `total` exactly).
pub fn quota_share(total: u64, active_range: &Range<u64>, active: u64) -> u64 {
    if active == 0 {
        return 0;
    }
    let at = |a: u64| (total as u128 * a as u128 / active as u128) as u64;
    at(active_range.end) - at(active_range.start)
}

/// The open-loop schedule: `rate` requests per second in total over
/// `active` connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Requests per 1000 s (rate in milli-requests per second), so the
    /// offsets are exact integer arithmetic and never drift.
    rate_milli: u64,
    active: u64,
}

impl Schedule {
    /// A schedule of `rate` requests/s over `active` connections.
    pub fn new(rate: f64, active: u64) -> Schedule {
        Schedule {
            rate_milli: ((rate * 1000.0).round() as u64).max(1),
            active: active.max(1),
        }
    }

    /// Nanoseconds from the start at which global request `k` is due.
    pub fn offset_ns(&self, k: u64) -> u64 {
        let ns = k as u128 * 1_000_000_000_000u128 / self.rate_milli as u128;
        ns.min(u64::MAX as u128) as u64
    }

    /// The global request number of the `round`-th request of the
    /// connection with active index `a`.
    pub fn request_number(&self, a: u64, round: u64) -> u64 {
        a + round * self.active
    }

    /// Nanoseconds from the start at which the connection with active
    /// index `a` sends its `round`-th request.
    pub fn conn_offset_ns(&self, a: u64, round: u64) -> u64 {
        self.offset_ns(self.request_number(a, round))
    }

    /// How many requests are due strictly before `t_ns` after the start.
    pub fn due_before(&self, t_ns: u64) -> u64 {
        if t_ns == 0 {
            return 0;
        }
        // smallest k with offset(k) >= t: k = ceil(t * rate_milli / 1e12)
        let num = t_ns as u128 * self.rate_milli as u128;
        num.div_ceil(1_000_000_000_000u128) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actives_are_spread_evenly_and_counted_exactly() {
        for (n, a) in [
            (10u64, 3u64),
            (19000, 1000),
            (7, 7),
            (5, 0),
            (1, 1),
            (100, 1),
        ] {
            let act: Vec<u64> = (0..n).filter(|&g| is_active(g, n, a)).collect();
            assert_eq!(act.len() as u64, a, "n={n} a={a}");
            // active index of each active connection is its rank
            for (rank, &g) in act.iter().enumerate() {
                assert_eq!(active_before(g, n, a), rank as u64);
            }
            // gaps between active connections differ by at most one
            if a > 1 {
                let gaps: Vec<u64> = act.windows(2).map(|w| w[1] - w[0]).collect();
                let (lo, hi) = (gaps.iter().min().unwrap(), gaps.iter().max().unwrap());
                assert!(hi - lo <= 1, "n={n} a={a} gaps {lo}..{hi}");
            }
        }
    }

    #[test]
    fn splits_cover_the_range_exactly() {
        let r = 3..1003u64;
        for parts in [1u64, 2, 3, 7, 1000, 2000] {
            let mut next = r.start;
            for i in 0..parts {
                let s = split(&r, parts, i);
                assert_eq!(s.start, next);
                assert!(s.end - s.start <= 1000u64.div_ceil(parts));
                next = s.end;
            }
            assert_eq!(next, r.end);
        }
    }

    #[test]
    fn quota_shares_add_up() {
        for (total, active, parts) in [
            (1000u64, 50u64, 3u64),
            (7, 3, 2),
            (1, 10, 4),
            (12345, 1000, 7),
        ] {
            let sum: u64 = (0..parts)
                .map(|i| quota_share(total, &split(&(0..active), parts, i), active))
                .sum();
            assert_eq!(sum, total);
        }
        assert_eq!(quota_share(10, &(0..0), 0), 0);
    }

    #[test]
    fn schedule_is_even_and_exact() {
        let s = Schedule::new(1000.0, 4);
        assert_eq!(s.offset_ns(0), 0);
        assert_eq!(s.offset_ns(1), 1_000_000);
        assert_eq!(s.offset_ns(1000), 1_000_000_000);
        // each connection sends every active/rate = 4 ms, staggered by 1 ms
        assert_eq!(s.conn_offset_ns(0, 1), 4_000_000);
        assert_eq!(s.conn_offset_ns(3, 0), 3_000_000);
        assert_eq!(s.conn_offset_ns(3, 2), 11_000_000);
        // no drift over a long run
        let s = Schedule::new(3.0, 1);
        assert_eq!(s.offset_ns(3_000_000_000), 1_000_000_000_000_000_000);
        let s = Schedule::new(333_333.0, 7);
        assert_eq!(s.offset_ns(333_333 * 3600), 3600 * 1_000_000_000);
    }

    #[test]
    fn due_before_counts_the_window() {
        let s = Schedule::new(1000.0, 3);
        assert_eq!(s.due_before(0), 0);
        assert_eq!(s.due_before(1), 1); // request 0 at t=0
        assert_eq!(s.due_before(1_000_000), 1);
        assert_eq!(s.due_before(1_000_001), 2);
        assert_eq!(s.due_before(1_000_000_000), 1000);
        // brute force agreement
        let s = Schedule::new(777.5, 5);
        for t in (0..50_000_000u64).step_by(999_983) {
            let brute = (0..100_000u64).take_while(|&k| s.offset_ns(k) < t).count() as u64;
            assert_eq!(s.due_before(t), brute, "t={t}");
        }
    }

    #[test]
    fn fractional_and_tiny_rates() {
        let s = Schedule::new(0.5, 1);
        assert_eq!(s.offset_ns(1), 2_000_000_000);
        let s = Schedule::new(0.0001, 1); // clamped to 1 milli-request/s
        assert_eq!(s.offset_ns(1), 1_000_000_000_000);
    }
}
