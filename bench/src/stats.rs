//! Result types: counters, the latency histogram, merging, the report.

use std::collections::BTreeMap;
use std::fmt;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use halfsync_protocol::status;

/// Highest latency the histogram holds, in microseconds (one hour); larger
/// values are recorded as this.
pub const HIST_MAX_US: u64 = 3_600_000_000;
/// Significant digits of the histogram.
pub const HIST_SIGFIG: u8 = 3;
/// At most this many error messages are kept (the counters count them all).
pub const MAX_ERROR_MESSAGES: usize = 10;
/// At most this many of one kind.
pub const MAX_MESSAGES_PER_KIND: usize = 3;

/// A new, empty latency histogram (microseconds, 3 significant digits).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, HIST_SIGFIG).expect("valid histogram bounds")
}

/// Replies by status (measured window only).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusCounts {
    /// 0
    #[serde(rename = "OK")]
    pub ok: u64,
    /// 1
    #[serde(rename = "PLUGIN_ERROR")]
    pub plugin_error: u64,
    /// 2
    #[serde(rename = "BUSY")]
    pub busy: u64,
    /// 3
    #[serde(rename = "TIMEOUT")]
    pub timeout: u64,
    /// 4
    #[serde(rename = "WORKER_DIED")]
    pub worker_died: u64,
    /// 5
    #[serde(rename = "BAD_REQUEST")]
    pub bad_request: u64,
    /// 6
    #[serde(rename = "NO_ROUTE")]
    pub no_route: u64,
    /// 7
    #[serde(rename = "SHUTTING_DOWN")]
    pub shutting_down: u64,
    /// Any other code (plugin codes from 100, reserved ones).
    pub other: u64,
    /// The codes counted in `other`, each with its count (JSON keys are
    /// the codes as strings).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub other_codes: BTreeMap<u16, u64>,
}

impl StatusCounts {
    /// Counts one reply with status `code`.
    pub fn add(&mut self, code: u16) {
        let slot = match code {
            status::OK => &mut self.ok,
            status::PLUGIN_ERROR => &mut self.plugin_error,
            status::BUSY => &mut self.busy,
            status::TIMEOUT => &mut self.timeout,
            status::WORKER_DIED => &mut self.worker_died,
            status::BAD_REQUEST => &mut self.bad_request,
            status::NO_ROUTE => &mut self.no_route,
            status::SHUTTING_DOWN => &mut self.shutting_down,
            _ => {
                *self.other_codes.entry(code).or_default() += 1;
                &mut self.other
            }
        };
        *slot += 1;
    }

    fn pairs(&self) -> [(&'static str, u64); 9] {
        [
            ("OK", self.ok),
            ("PLUGIN_ERROR", self.plugin_error),
            ("BUSY", self.busy),
            ("TIMEOUT", self.timeout),
            ("WORKER_DIED", self.worker_died),
            ("BAD_REQUEST", self.bad_request),
            ("NO_ROUTE", self.no_route),
            ("SHUTTING_DOWN", self.shutting_down),
            ("other", self.other),
        ]
    }

    /// Adds `o` into `self`.
    pub fn merge(&mut self, o: &StatusCounts) {
        self.ok += o.ok;
        self.plugin_error += o.plugin_error;
        self.busy += o.busy;
        self.timeout += o.timeout;
        self.worker_died += o.worker_died;
        self.bad_request += o.bad_request;
        self.no_route += o.no_route;
        self.shutting_down += o.shutting_down;
        self.other += o.other;
        for (&code, &n) in &o.other_codes {
            *self.other_codes.entry(code).or_default() += n;
        }
    }

    /// One line for the report: `OK 90  BUSY 3  other 12 (100: 9, 404: 3)`
    /// (only codes that came; `-` for none).
    pub fn summary(&self) -> String {
        let parts: Vec<String> = self
            .pairs()
            .iter()
            .filter(|p| p.1 > 0)
            .map(|&(name, n)| match name {
                // Which codes `other` holds: a plugin's own statuses.
                "other" => {
                    let codes: Vec<String> = self
                        .other_codes
                        .iter()
                        .map(|(code, n)| format!("{code}: {n}"))
                        .collect();
                    format!("other {n} ({})", codes.join(", "))
                }
                _ => format!("{name} {n}"),
            })
            .collect();
        if parts.is_empty() {
            "-".into()
        } else {
            parts.join("  ")
        }
    }

    /// All replies counted.
    pub fn total(&self) -> u64 {
        self.pairs().iter().map(|p| p.1).sum()
    }
}

/// Connection errors by kind (whole run: connect, warmup, measurement,
/// drain, hold).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnErrors {
    /// Connect refused (nothing listening, or the backlog overflowed).
    pub refused: u64,
    /// Reset by the peer (ECONNRESET, EPIPE, ECONNABORTED).
    pub reset: u64,
    /// Closed by the server (orderly EOF) before the benchmark closed it.
    pub closed: u64,
    /// Connect not done within `--connect-timeout`, or a request not
    /// answered within `--timeout` (the connection is then dropped).
    pub timeout: u64,
    /// Anything else (e.g. EADDRNOTAVAIL: out of ephemeral ports; use
    /// `--source`).
    pub other: u64,
}

/// Kinds of connection error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnErrorKind {
    /// See [`ConnErrors::refused`].
    Refused,
    /// See [`ConnErrors::reset`].
    Reset,
    /// See [`ConnErrors::closed`].
    Closed,
    /// See [`ConnErrors::timeout`].
    Timeout,
    /// See [`ConnErrors::other`].
    Other,
}

impl ConnErrorKind {
    /// The kind's name, as in [`ConnErrors`].
    pub fn name(self) -> &'static str {
        match self {
            ConnErrorKind::Refused => "refused",
            ConnErrorKind::Reset => "reset",
            ConnErrorKind::Closed => "closed",
            ConnErrorKind::Timeout => "timeout",
            ConnErrorKind::Other => "other",
        }
    }

    /// Classifies an I/O error.
    pub fn of(e: &std::io::Error) -> ConnErrorKind {
        match e.raw_os_error() {
            Some(libc::ECONNREFUSED) => ConnErrorKind::Refused,
            Some(libc::ECONNRESET | libc::EPIPE | libc::ECONNABORTED) => ConnErrorKind::Reset,
            Some(libc::ETIMEDOUT) => ConnErrorKind::Timeout,
            _ => match e.kind() {
                std::io::ErrorKind::UnexpectedEof => ConnErrorKind::Closed,
                _ => ConnErrorKind::Other,
            },
        }
    }
}

impl ConnErrors {
    /// Counts one error.
    pub fn add(&mut self, kind: ConnErrorKind) {
        match kind {
            ConnErrorKind::Refused => self.refused += 1,
            ConnErrorKind::Reset => self.reset += 1,
            ConnErrorKind::Closed => self.closed += 1,
            ConnErrorKind::Timeout => self.timeout += 1,
            ConnErrorKind::Other => self.other += 1,
        }
    }

    /// Adds `o` into `self`.
    pub fn merge(&mut self, o: &ConnErrors) {
        self.refused += o.refused;
        self.reset += o.reset;
        self.closed += o.closed;
        self.timeout += o.timeout;
        self.other += o.other;
    }

    /// All errors.
    pub fn total(&self) -> u64 {
        self.refused + self.reset + self.closed + self.timeout + self.other
    }
}

/// Verification errors by kind (whole run).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyErrors {
    /// A reply whose id that connection never sent, or already got a
    /// reply for.
    pub unknown_id: u64,
    /// An echo (command 1) reply with status 0 whose payload differs from
    /// the request's.
    pub payload: u64,
    /// A status that is neither 0 nor listed in `--allow-status`.
    pub status: u64,
    /// An unparsable reply frame (the connection is dropped).
    pub frame: u64,
}

impl VerifyErrors {
    /// Adds `o` into `self`.
    pub fn merge(&mut self, o: &VerifyErrors) {
        self.unknown_id += o.unknown_id;
        self.payload += o.payload;
        self.status += o.status;
        self.frame += o.frame;
    }

    /// All errors.
    pub fn total(&self) -> u64 {
        self.unknown_id + self.payload + self.status + self.frame
    }
}

/// Raw, mergeable results of a run or of a part of one (a thread, a
/// process). As JSON (what a child process sends its parent), each
/// histogram is a list of `[value_us, count]` pairs, one per non-empty
/// bucket.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stats {
    /// Latency of measured replies, microseconds.
    #[serde(rename = "histogram", with = "hist_pairs")]
    pub hist: Histogram<u64>,
    /// Open loop: how late each request due in the measured window was
    /// handed to the socket, microseconds (the generator's own lag).
    #[serde(with = "hist_pairs", default = "new_histogram")]
    pub send_lag: Histogram<u64>,
    /// Connections this part was to open.
    pub connections: u64,
    /// Of which established.
    pub connected: u64,
    /// Requests sent (whole run).
    pub sent: u64,
    /// Replies received (whole run, including unknown ids).
    pub replies: u64,
    /// Requests never answered (outstanding at the end of the drain, or
    /// on a connection that failed).
    pub unanswered: u64,
    /// Replies by status, measured window only.
    pub status: StatusCounts,
    /// Connection errors.
    pub conn_errors: ConnErrors,
    /// Verification errors.
    pub verify: VerifyErrors,
    /// Length of the measured window, seconds.
    pub seconds: f64,
    /// Time to establish all connections, seconds.
    pub connect_seconds: f64,
    /// `--per-connection`: connections closed and opened again in the
    /// measured window.
    #[serde(default)]
    pub reconnects: u64,
    /// The first few error messages.
    pub errors: Vec<String>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            hist: new_histogram(),
            send_lag: new_histogram(),
            connections: 0,
            connected: 0,
            sent: 0,
            replies: 0,
            unanswered: 0,
            status: StatusCounts::default(),
            conn_errors: ConnErrors::default(),
            verify: VerifyErrors::default(),
            seconds: 0.0,
            connect_seconds: 0.0,
            reconnects: 0,
            errors: Vec::new(),
        }
    }
}

impl Stats {
    /// Measured replies (the histogram's count).
    pub fn requests(&self) -> u64 {
        self.hist.len()
    }

    fn keeps(&self, kind: &str) -> bool {
        self.errors.len() < MAX_ERROR_MESSAGES
            && self
                .errors
                .iter()
                .filter(|e| e.split(": ").next() == Some(kind))
                .count()
                < MAX_MESSAGES_PER_KIND
    }

    /// Keeps the message `kind: msg` unless [`MAX_ERROR_MESSAGES`] are
    /// kept, or [`MAX_MESSAGES_PER_KIND`] of this kind.
    pub fn note(&mut self, kind: &str, msg: impl FnOnce() -> String) {
        if self.keeps(kind) {
            self.errors.push(format!("{kind}: {}", msg()));
        }
    }

    /// Merges another part's results: counts add, histograms merge
    /// exactly, `seconds` and `connect_seconds` take the maximum (parts run
    /// side by side over the same window).
    pub fn merge(&mut self, o: &Stats) {
        self.hist.add(&o.hist).expect("histograms share bounds");
        self.send_lag
            .add(&o.send_lag)
            .expect("histograms share bounds");
        self.connections += o.connections;
        self.connected += o.connected;
        self.sent += o.sent;
        self.replies += o.replies;
        self.unanswered += o.unanswered;
        self.status.merge(&o.status);
        self.conn_errors.merge(&o.conn_errors);
        self.verify.merge(&o.verify);
        self.seconds = self.seconds.max(o.seconds);
        self.connect_seconds = self.connect_seconds.max(o.connect_seconds);
        self.reconnects += o.reconnects;
        for e in &o.errors {
            if self.keeps(e.split(": ").next().unwrap_or_default()) {
                self.errors.push(e.clone());
            }
        }
    }
}

/// A histogram's non-empty buckets as `[highest value, count]` pairs, in
/// value order: what `--json --histogram` prints, so that scripts can
/// pool the runs of several rounds and take percentiles of the whole.
pub fn histogram_pairs(h: &Histogram<u64>) -> impl Iterator<Item = [u64; 2]> + '_ {
    h.iter_recorded()
        .map(|v| [v.value_iterated_to(), v.count_at_value()])
}

/// Histograms as `[value, count]` pairs. Each pair is the highest value
/// of one bucket and its count; recording it into a histogram of the same
/// bounds lands in the same bucket, so the round trip is exact.
mod hist_pairs {
    use hdrhistogram::Histogram;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &Histogram<u64>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(super::histogram_pairs(h))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Histogram<u64>, D::Error> {
        let mut hist = super::new_histogram();
        for [v, n] in Vec::<[u64; 2]>::deserialize(d)? {
            hist.record_n(v, n).map_err(|e| {
                serde::de::Error::custom(format!("histogram value {v} out of range: {e:?}"))
            })?;
        }
        Ok(hist)
    }
}

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
    /// Mean.
    pub mean: f64,
}

impl Latency {
    /// Percentiles of `h` (all zero when it is empty).
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: (h.mean() * 10.0).round() / 10.0,
        }
    }
}

/// The final report: what `--json` prints, and what the text report shows.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// `"closed"`, `"open"`, or `"idle"` (no active connections).
    pub mode: &'static str,
    /// Server address.
    pub addr: String,
    /// Connections opened (attempted).
    pub connections: u64,
    /// Of which carrying traffic.
    pub active: u64,
    /// Established.
    pub connected: u64,
    /// Event-loop threads per process.
    pub threads: usize,
    /// Processes that ran connections.
    pub processes: usize,
    /// Closed loop: requests in flight per connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub depth: Option<u32>,
    /// Open loop: requests per second in total.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Request payload bytes.
    pub payload: usize,
    /// Request command.
    pub command: u16,
    /// Warmup, seconds.
    pub warmup_s: f64,
    /// Planned measurement, seconds (absent with `--requests` alone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
    /// Measured replies.
    pub requests: u64,
    /// Length of the measured window, seconds.
    pub seconds: f64,
    /// `requests / seconds`.
    pub rps: f64,
    /// Latency of measured replies, microseconds; open loop from each
    /// request's intended send time.
    pub latency_us: Latency,
    /// Open loop: how late the generator itself handed requests to the
    /// socket, against the schedule, microseconds. If this is large, the
    /// generator (not the server) could not keep up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_lag_us: Option<Latency>,
    /// Measured replies by status.
    pub status: StatusCounts,
    /// Connection errors by kind.
    pub conn_errors: ConnErrors,
    /// Verification errors, total.
    pub verify_errors: u64,
    /// Verification errors by kind.
    pub verify: VerifyErrors,
    /// Requests sent (whole run).
    pub sent: u64,
    /// Replies received (whole run).
    pub replies: u64,
    /// Requests never answered.
    pub unanswered: u64,
    /// `--per-connection`: connections closed and opened again in the
    /// measured window.
    #[serde(default)]
    pub reconnects: u64,
    /// Time to establish all connections, seconds.
    pub connect_seconds: f64,
    /// The first error messages.
    pub errors: Vec<String>,
    /// No connection error, no verification error, every connection
    /// established and every request answered.
    pub ok: bool,
    /// Stopped by SIGINT or SIGTERM before its duration or request count:
    /// the figures are of the shorter window (`seconds`).
    #[serde(default)]
    pub interrupted: bool,
    /// With `--cpu`: each process's CPU time per request over the
    /// measured window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<crate::cpu::CpuReport>,
    /// The merged histogram (not serialized).
    #[serde(skip)]
    pub histogram: Histogram<u64>,
}

impl Report {
    /// Whether the run is clean (see [`Report::ok`]).
    pub fn is_ok(&self) -> bool {
        self.ok
    }
}

fn fmt_us(us: u64) -> String {
    if us >= 10_000_000 {
        format!("{:.1}s", us as f64 / 1e6)
    } else if us >= 10_000 {
        format!("{:.1}ms", us as f64 / 1e3)
    } else {
        format!("{us}us")
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let load = match (self.depth, self.rate) {
            (Some(d), _) => format!("closed loop, depth {d}"),
            (_, Some(r)) => format!("open loop, {r} req/s"),
            _ => "idle (connect only)".to_string(),
        };
        writeln!(
            f,
            "halfsync-bench {} -> {}: {} connections ({} active), {}",
            env!("CARGO_PKG_VERSION"),
            self.addr,
            self.connections,
            self.active,
            load
        )?;
        writeln!(
            f,
            "  payload {} B, command {}, {} thread(s) x {} process(es), warmup {}s{}",
            self.payload,
            self.command,
            self.threads,
            self.processes,
            self.warmup_s,
            self.duration_s
                .map(|d| format!(", duration {d}s"))
                .unwrap_or_default()
        )?;
        writeln!(
            f,
            "connected    {}/{} in {:.3}s",
            self.connected, self.connections, self.connect_seconds
        )?;
        writeln!(
            f,
            "requests     {} in {:.3}s = {:.1} req/s",
            self.requests, self.seconds, self.rps
        )?;
        let l = &self.latency_us;
        if self.requests == 0 {
            writeln!(f, "latency      - (no measured replies)")?;
        } else {
            writeln!(
                f,
                "latency      p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {:.1}us",
                fmt_us(l.p50),
                fmt_us(l.p90),
                fmt_us(l.p99),
                fmt_us(l.p999),
                fmt_us(l.max),
                l.mean
            )?;
        }
        if let Some(l) = &self.send_lag_us {
            writeln!(
                f,
                "send lag     p50 {}  p99 {}  max {}  (generator behind its schedule)",
                fmt_us(l.p50),
                fmt_us(l.p99),
                fmt_us(l.max)
            )?;
        }
        writeln!(f, "status       {}", self.status.summary())?;
        let c = &self.conn_errors;
        writeln!(
            f,
            "conn errors  {} (refused {}, reset {}, closed {}, timeout {}, other {})",
            c.total(),
            c.refused,
            c.reset,
            c.closed,
            c.timeout,
            c.other
        )?;
        let v = &self.verify;
        writeln!(
            f,
            "verify       {} errors (unknown id {}, payload {}, status {}, frame {})",
            self.verify_errors, v.unknown_id, v.payload, v.status, v.frame
        )?;
        writeln!(
            f,
            "whole run    sent {}  replies {}  unanswered {}  (warm-up and drain included)",
            self.sent, self.replies, self.unanswered
        )?;
        if self.reconnects > 0 {
            writeln!(
                f,
                "reconnects   {} ({:.0}/s)",
                self.reconnects,
                self.reconnects as f64 / self.seconds.max(1e-9)
            )?;
        }
        if let Some(cpu) = &self.cpu {
            write!(f, "{cpu}")?;
        }
        for e in &self.errors {
            writeln!(f, "error        {e}")?;
        }
        write!(f, "result       {}", if self.ok { "OK" } else { "FAILED" })?;
        if self.interrupted {
            write!(
                f,
                " (interrupted after {:.2}s of the measured window)",
                self.seconds
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seed: u64, n: u64) -> Stats {
        let mut s = Stats::default();
        let mut x = seed;
        for _ in 0..n {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            s.hist.saturating_record((x >> 40) % 5_000_000);
            s.send_lag.saturating_record((x >> 50) % 1000);
            s.status.add((x >> 20) as u16 % 10);
        }
        s.sent = n + 3;
        s.replies = n;
        s.connections = 4;
        s.connected = 4;
        s.conn_errors.add(ConnErrorKind::Reset);
        s.verify.payload = seed;
        s.seconds = seed as f64;
        s.note("payload", || format!("err {seed}"));
        s
    }

    #[test]
    fn merge_adds_counts_and_histograms_exactly() {
        let (a, b) = (sample(1, 10_000), sample(2, 7_000));
        let mut m = a.clone();
        m.merge(&b);
        let mut direct = a.hist.clone();
        direct.add(&b.hist).unwrap();
        assert_eq!(m.hist, direct);
        assert_eq!(m.requests(), 17_000);
        assert_eq!(m.status.total(), 17_000);
        assert_eq!(m.sent, 17_006);
        assert_eq!(m.conn_errors.reset, 2);
        assert_eq!(m.verify.payload, 3);
        assert_eq!(m.seconds, 2.0);
        assert_eq!(m.errors, ["payload: err 1", "payload: err 2"]);
    }

    #[test]
    fn wire_round_trip_is_exact() {
        let a = sample(7, 20_000);
        let wire = |s: &Stats| -> Stats {
            serde_json::from_str(&serde_json::to_string(s).unwrap()).unwrap()
        };
        let back = wire(&a);
        assert_eq!(back.hist, a.hist);
        assert_eq!(back.send_lag, a.send_lag);
        for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(back.hist.value_at_quantile(q), a.hist.value_at_quantile(q));
        }
        assert_eq!(back.hist.mean(), a.hist.mean());
        assert_eq!(back.status, a.status);
        assert_eq!(back.errors, a.errors);
        // merging via the wire equals merging directly
        let b = sample(8, 5_000);
        let mut via_wire = wire(&a);
        via_wire.merge(&wire(&b));
        let mut direct = a.clone();
        direct.merge(&b);
        assert_eq!(via_wire.hist, direct.hist);
        assert_eq!(Latency::of(&via_wire.hist), Latency::of(&direct.hist));
    }

    #[test]
    fn error_messages_are_capped() {
        let mut a = Stats::default();
        for i in 0..50 {
            a.note("status", || format!("e{i}"));
        }
        assert_eq!(a.errors, ["status: e0", "status: e1", "status: e2"]);
        for kind in ["a", "b", "c", "d", "e"] {
            a.note(kind, || "x".into());
            a.note(kind, || "y".into());
        }
        assert_eq!(a.errors.len(), MAX_ERROR_MESSAGES);
        let b = a.clone();
        a.merge(&b);
        assert_eq!(a.errors.len(), MAX_ERROR_MESSAGES);
        let mut c = Stats::default();
        c.merge(&b);
        c.merge(&b);
        assert_eq!(c.errors, b.errors);
    }

    #[test]
    fn status_names_match_the_protocol() {
        let mut s = StatusCounts::default();
        for code in 0..=7u16 {
            s.add(code);
        }
        s.add(100);
        s.add(42);
        let v = serde_json::to_value(&s).unwrap();
        for code in 0..=7u16 {
            assert_eq!(v[status::name(code)], 1, "{}", status::name(code));
        }
        assert_eq!(v["other"], 2);
        assert_eq!(v["other_codes"], serde_json::json!({"42": 1, "100": 1}));
        assert_eq!(s.total(), 10);
        let mut t = s.clone();
        t.merge(&s);
        assert_eq!(t.other_codes, BTreeMap::from([(42, 2), (100, 2)]));
        let back: StatusCounts = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
        assert_eq!(
            s.summary(),
            "OK 1  PLUGIN_ERROR 1  BUSY 1  TIMEOUT 1  WORKER_DIED 1  BAD_REQUEST 1  \
             NO_ROUTE 1  SHUTTING_DOWN 1  other 2 (42: 1, 100: 1)"
        );
        assert_eq!(StatusCounts::default().summary(), "-");
        let plain = serde_json::to_value(StatusCounts::default()).unwrap();
        assert!(plain.get("other_codes").is_none());
    }

    #[test]
    fn latency_of_empty_is_zero() {
        assert_eq!(Latency::of(&new_histogram()), Latency::default());
        let mut h = new_histogram();
        h.record(1234).unwrap();
        let l = Latency::of(&h);
        assert_eq!((l.p50, l.max), (h.value_at_quantile(0.5), h.max()));
        assert!((l.p50 as i64 - 1234).abs() <= 1);
    }
}
