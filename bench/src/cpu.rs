//! `--cpu PID`: the CPU time each process of a server spends per request,
//! over the measured window, read from `/proc` (Linux; the server must run
//! on the generator's host).
//!
//! The processes are the given pids and all their descendants (give the
//! halfsync master's pid and the proxy and every worker are included),
//! plus this generator itself. Each is sampled when the measured window
//! opens and when it closes. A process that started in between counts from
//! its start. One that exited in between (a recycled worker) cannot be
//! read any more, but its parent's `cutime`/`cstime` grew by its whole
//! time when it was reaped: that growth, less what the exited ones had
//! used by the opening sample, is the [`CpuReport::exited`] row. Times
//! come in clock ticks (usually 10 ms), so windows of a few seconds are
//! needed for two significant digits.

use std::collections::BTreeMap;
use std::fs;

use serde::{Deserialize, Serialize};

use crate::sys;

/// One process's CPU over the measured window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuUse {
    /// Process id (0 for the row of processes that exited).
    pub pid: u32,
    /// Its command line as the window closed (a halfsync process names its
    /// role there: `halfsync: proxy`, `halfsync: worker echo 0`), or
    /// `halfsync-bench` for the generator (when the generator runs as a
    /// library, that is the whole host process).
    pub name: String,
    /// User time per measured request, microseconds.
    pub user_us: f64,
    /// System time per measured request, microseconds.
    pub sys_us: f64,
    /// User plus system time over the window's length: 1.0 is one CPU busy
    /// all the time.
    pub cpu_share: f64,
}

/// The CPU split of a run with `--cpu`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuReport {
    /// Every process alive as the window closed, by pid: the given ones
    /// and their descendants.
    pub processes: Vec<CpuUse>,
    /// The processes of the tree that exited during the window (reaped by
    /// a parent in the tree), together; `None` if none did.
    pub exited: Option<CpuUse>,
    /// The given processes and their descendants together, exited ones
    /// included.
    pub total: CpuUse,
    /// This generator.
    pub generator: Option<CpuUse>,
    /// Given pids that were not running when the window opened.
    pub missing: Vec<u32>,
    /// Length of the sampled window, seconds (within ~10 ms of the
    /// measured one).
    pub seconds: f64,
    /// Seconds per clock tick, the resolution of every time here.
    pub tick_seconds: f64,
    /// Measured requests per second the per-request figures divide by (0:
    /// no traffic, e.g. `--connect-only`, and no per-request figures).
    pub rps: f64,
}

/// What `/proc/<pid>/stat` says about a process, times in clock ticks.
#[derive(Clone, Debug, Default, PartialEq)]
struct ProcStat {
    ppid: u32,
    utime: u64,
    stime: u64,
    /// Time of its reaped children (and theirs).
    cutime: u64,
    cstime: u64,
    /// Start time since boot (tells a reused pid apart).
    start: u64,
}

/// Parses the text of `/proc/<pid>/stat`. The command name (field 2) is in
/// parentheses and may itself hold spaces and parentheses, so the fields
/// are counted from the last `)`.
fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    // After the name: state(3) ppid(4) ... utime(14) stime(15) cutime(16)
    // cstime(17) ... starttime(22).
    let num = |i: usize| f.get(i)?.parse::<u64>().ok();
    Some(ProcStat {
        ppid: u32::try_from(num(1)?).ok()?,
        utime: num(11)?,
        stime: num(12)?,
        cutime: num(13)?,
        cstime: num(14)?,
        start: num(19)?,
    })
}

fn read_stat(pid: u32) -> Option<ProcStat> {
    // Not `read_to_string`: a command name cut to 15 bytes may end in half
    // a UTF-8 character.
    let raw = fs::read(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&String::from_utf8_lossy(&raw))
}

/// Whether `pid` is a process (thread group leader), not another thread's
/// id: `/proc/<tid>` exists for threads too.
pub(crate) fn is_process(pid: u32) -> bool {
    let Ok(raw) = fs::read(format!("/proc/{pid}/status")) else {
        return false;
    };
    String::from_utf8_lossy(&raw)
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .is_some_and(|t| t.trim().parse() == Ok(pid))
}

/// The command line, arguments joined by spaces, at most 60 characters;
/// its `comm` when the command line is empty (a zombie); `(gone)` when the
/// process ended before it could be named.
fn name_of(pid: u32) -> String {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let joined = String::from_utf8_lossy(&raw)
        .split('\0')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let name = if joined.is_empty() {
        String::from_utf8_lossy(&fs::read(format!("/proc/{pid}/comm")).unwrap_or_default())
            .into_owned()
    } else {
        joined
    };
    let name: String = name.trim().chars().take(60).collect();
    if name.is_empty() {
        "(gone)".to_owned()
    } else {
        name
    }
}

/// `roots` and all their descendants now, with their stats, leaving out
/// `skip` (the generator: counted apart even when it is a descendant).
fn tree(roots: &[u32], skip: u32) -> BTreeMap<u32, ProcStat> {
    let mut all: BTreeMap<u32, ProcStat> = BTreeMap::new();
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok())
                && let Some(st) = read_stat(pid)
            {
                children.entry(st.ppid).or_default().push(pid);
                all.insert(pid, st);
            }
        }
    }
    let mut keep: BTreeMap<u32, ProcStat> = BTreeMap::new();
    let mut todo: Vec<u32> = roots.to_vec();
    while let Some(pid) = todo.pop() {
        if pid == skip || keep.contains_key(&pid) {
            continue;
        }
        if let Some(st) = all.get(&pid) {
            keep.insert(pid, st.clone());
            todo.extend(children.get(&pid).into_iter().flatten());
        }
    }
    keep
}

/// The processes at one moment.
#[derive(Clone, Debug, Default)]
struct Sample {
    /// When it was taken (the middle of the `/proc` scan).
    at_ns: u64,
    procs: BTreeMap<u32, ProcStat>,
    /// Command lines (taken at the closing sample only).
    names: BTreeMap<u32, String>,
    generator: Option<ProcStat>,
}

fn sample(roots: &[u32], with_names: bool) -> Sample {
    let me = std::process::id();
    let t0 = sys::now_ns();
    let procs = tree(roots, me);
    let generator = read_stat(me);
    let at_ns = t0 + (sys::now_ns() - t0) / 2;
    let names = if with_names {
        procs.keys().map(|&p| (p, name_of(p))).collect()
    } else {
        BTreeMap::new()
    };
    Sample {
        at_ns,
        procs,
        names,
        generator,
    }
}

/// The report from the two samples `a` (window opens) and `b` (closes),
/// at `rps` measured requests per second, with `tick` seconds per clock
/// tick.
fn compute(roots: &[u32], a: &Sample, b: &Sample, rps: f64, tick: f64) -> CpuReport {
    let seconds = b.at_ns.saturating_sub(a.at_ns) as f64 / 1e9;
    let row = |pid: u32, name: String, user_ticks: u64, sys_ticks: u64| {
        let (user, sys) = (user_ticks as f64 * tick, sys_ticks as f64 * tick);
        let (per_request, share) = if seconds > 0.0 {
            (
                if rps > 0.0 { 1e6 / seconds / rps } else { 0.0 },
                (user + sys) / seconds,
            )
        } else {
            (0.0, 0.0)
        };
        CpuUse {
            pid,
            name,
            user_us: user * per_request,
            sys_us: sys * per_request,
            cpu_share: share,
        }
    };
    // Ticks since the opening sample, or since its start for a process
    // that started in the window (a pid reused in between is another one).
    let same = |before: Option<&ProcStat>, after: &ProcStat| {
        before.filter(|p| p.start == after.start).cloned()
    };
    let delta = |before: Option<ProcStat>, after: &ProcStat| {
        let p = before.unwrap_or_default();
        (
            after.utime.saturating_sub(p.utime),
            after.stime.saturating_sub(p.stime),
        )
    };
    let (mut total_u, mut total_s) = (0u64, 0u64);
    let mut processes = Vec::new();
    for (&pid, st) in &b.procs {
        let (u, s) = delta(same(a.procs.get(&pid), st), st);
        total_u += u;
        total_s += s;
        let name = b.names.get(&pid).cloned().unwrap_or_default();
        processes.push(row(pid, name, u, s));
    }
    // What the tree's processes reaped during the window, less what the
    // ones that exited had used before it opened.
    let (mut reaped_u, mut reaped_s) = (0u64, 0u64);
    for (&pid, st) in &b.procs {
        let p = same(a.procs.get(&pid), st).unwrap_or_default();
        reaped_u += st.cutime.saturating_sub(p.cutime);
        reaped_s += st.cstime.saturating_sub(p.cstime);
    }
    let gone: Vec<&ProcStat> = a
        .procs
        .iter()
        .filter(|(pid, st)| b.procs.get(pid).is_none_or(|s| s.start != st.start))
        .map(|(_, st)| st)
        .collect();
    let exited = (!gone.is_empty() || reaped_u + reaped_s > 0).then(|| {
        let u = reaped_u.saturating_sub(gone.iter().map(|p| p.utime).sum());
        let s = reaped_s.saturating_sub(gone.iter().map(|p| p.stime).sum());
        total_u += u;
        total_s += s;
        row(0, "(exited during the window)".to_string(), u, s)
    });
    let generator = b.generator.as_ref().map(|g| {
        let (u, s) = delta(same(a.generator.as_ref(), g), g);
        row(std::process::id(), "halfsync-bench".to_string(), u, s)
    });
    CpuReport {
        processes,
        exited,
        total: row(0, "(all of --cpu)".to_string(), total_u, total_s),
        generator,
        missing: roots
            .iter()
            .filter(|p| !a.procs.contains_key(p))
            .copied()
            .collect(),
        seconds,
        tick_seconds: tick,
        rps,
    }
}

/// Samples the processes at the window's opening and closing.
pub(crate) struct CpuWatch {
    roots: Vec<u32>,
    start: Option<Sample>,
    end: Option<Sample>,
}

impl CpuWatch {
    /// Watches `roots` and their descendants.
    pub(crate) fn new(roots: Vec<u32>) -> CpuWatch {
        CpuWatch {
            roots,
            start: None,
            end: None,
        }
    }

    /// The measured window opened (`true`) or closed; only the first of
    /// each counts.
    pub(crate) fn window(&mut self, open: bool) {
        if open && self.start.is_none() {
            self.start = Some(sample(&self.roots, false));
        } else if !open && self.start.is_some() && self.end.is_none() {
            self.end = Some(sample(&self.roots, true));
        }
    }

    /// The split per request at `rps` measured requests per second; `None`
    /// if the window never opened (stopped during the warmup).
    pub(crate) fn report(&mut self, rps: f64) -> Option<CpuReport> {
        self.window(false);
        let (a, b) = (self.start.as_ref()?, self.end.as_ref()?);
        let tick = 1.0 / sys::clock_ticks_per_second() as f64;
        Some(compute(&self.roots, a, b, rps, tick))
    }
}

impl std::fmt::Display for CpuReport {
    /// The `cpu` lines of the text report: one per process, numbers first.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "cpu          user/req    sys/req    CPU  process (over {:.2}s of the measured window)",
            self.seconds
        )?;
        let per_request = self.rps > 0.0;
        let line = |f: &mut std::fmt::Formatter<'_>, p: &CpuUse, what: &str| {
            if per_request {
                writeln!(
                    f,
                    "           {:>8.2}us {:>8.2}us {:>5.0}%  {what}",
                    p.user_us,
                    p.sys_us,
                    p.cpu_share * 100.0
                )
            } else {
                writeln!(
                    f,
                    "           {:>10} {:>10} {:>5.0}%  {what}",
                    "-",
                    "-",
                    p.cpu_share * 100.0
                )
            }
        };
        for p in &self.processes {
            line(f, p, &format!("{} [{}]", p.name, p.pid))?;
        }
        if let Some(p) = &self.exited {
            line(f, p, &p.name)?;
        }
        line(f, &self.total, "all of the above")?;
        if let Some(p) = &self.generator {
            line(f, p, &format!("{} (this generator) [{}]", p.name, p.pid))?;
        }
        for pid in &self.missing {
            writeln!(f, "  (--cpu {pid} was not running when the window opened)")?;
        }
        // One tick on either sample: a relative error of 2 ticks over the
        // window for a process busy all of it.
        let err = 2.0 * self.tick_seconds / self.seconds.max(1e-9);
        if err > 0.01 {
            writeln!(
                f,
                "  (times count in {:.0} ms ticks: over {:.2}s a busy process's share is good to about {:.0} points)",
                self.tick_seconds * 1e3,
                self.seconds,
                err * 100.0
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let line = "4242 (halfsync: worker (echo) 0) S 4240 4240 4240 0 -1 4194560 \
                    1000 0 0 0 1234 567 89 10 20 0 1 0 98765 123456789 1000 \
                    18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_stat(line),
            Some(ProcStat {
                ppid: 4240,
                utime: 1234,
                stime: 567,
                cutime: 89,
                cstime: 10,
                start: 98765,
            })
        );
        assert_eq!(parse_stat("4242 (cut short) S 1"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
    }

    #[test]
    fn this_process_is_found_and_threads_are_not_processes() {
        let me = std::process::id();
        // The generator itself is left out of the tree (it has its own row).
        assert!(tree(&[me], me).is_empty());
        assert!(tree(&[me], 0).contains_key(&me));
        assert!(is_process(me));
        assert!(!name_of(me).is_empty());
        // A pid that does not exist is simply absent.
        assert!(tree(&[u32::MAX], 0).is_empty());
        assert!(!is_process(u32::MAX));
        // Another thread's id has a /proc entry but is not a process.
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // "<pid>/task/<tid>"
            let link = fs::read_link("/proc/thread-self").unwrap();
            let tid: u32 = link.file_name().unwrap().to_str().unwrap().parse().unwrap();
            tx.send(tid).unwrap();
            let _ = done_rx.recv();
        });
        let tid = rx.recv().unwrap();
        assert_ne!(tid, me);
        assert!(std::path::Path::new(&format!("/proc/{tid}")).exists());
        assert!(!is_process(tid));
        drop(done_tx);
        t.join().unwrap();
    }

    fn st(ppid: u32, utime: u64, stime: u64, cutime: u64, cstime: u64, start: u64) -> ProcStat {
        ProcStat {
            ppid,
            utime,
            stime,
            cutime,
            cstime,
            start,
        }
    }

    /// Made-up samples 2 s apart at 1,000 requests per second, 10 ms ticks:
    /// a master (1) that reaps, a proxy (2) running throughout, a worker
    /// (3) that exits during the window, its replacement (4) that starts
    /// in it, and a pid (5) reused by another process.
    #[test]
    fn the_window_is_what_each_process_did_in_it() {
        let mut a = Sample {
            at_ns: 1_000_000_000,
            generator: Some(st(0, 100, 50, 0, 0, 7)),
            ..Sample::default()
        };
        a.procs.insert(1, st(0, 10, 10, 500, 100, 1));
        a.procs.insert(2, st(1, 300, 600, 0, 0, 2));
        a.procs.insert(3, st(1, 40, 20, 0, 0, 3));
        a.procs.insert(5, st(1, 70, 70, 0, 0, 5));
        let mut b = Sample {
            at_ns: 3_000_000_000,
            generator: Some(st(0, 160, 90, 0, 0, 7)),
            ..Sample::default()
        };
        // The master reaped 3 (40 + 30 user, 20 + 10 sys since a) and the
        // old 5 (70 + 0, 70 + 20).
        b.procs
            .insert(1, st(0, 10, 12, 500 + 70 + 70, 100 + 30 + 90, 1));
        b.procs.insert(2, st(1, 380, 720, 0, 0, 2));
        b.procs.insert(4, st(1, 25, 5, 0, 0, 150));
        b.procs.insert(5, st(1, 8, 2, 0, 0, 180));
        for (pid, name) in [(1, "master"), (2, "proxy"), (4, "worker"), (5, "other")] {
            b.names.insert(pid, name.to_string());
        }
        let r = compute(&[1, 9], &a, &b, 1000.0, 0.01);
        assert_eq!(r.seconds, 2.0);
        assert_eq!(r.missing, vec![9]);
        let got: Vec<(u32, &str, f64, f64)> = r
            .processes
            .iter()
            .map(|p| (p.pid, p.name.as_str(), p.user_us, p.sys_us))
            .collect();
        // 1 tick over 2 s at 1,000 req/s is 5 µs per request.
        let us = |ticks: f64| ticks * 5.0;
        assert_eq!(
            got,
            vec![
                (1, "master", us(0.0), us(2.0)),
                (2, "proxy", us(80.0), us(120.0)),
                (4, "worker", us(25.0), us(5.0)),
                (5, "other", us(8.0), us(2.0)),
            ]
        );
        assert!((r.processes[1].cpu_share - 1.0).abs() < 1e-9);
        let exited = r.exited.as_ref().unwrap();
        assert_eq!((exited.user_us, exited.sys_us), (us(30.0), us(30.0)));
        assert_eq!(
            (r.total.user_us, r.total.sys_us),
            (
                us(0.0 + 80.0 + 25.0 + 8.0 + 30.0),
                us(2.0 + 120.0 + 5.0 + 2.0 + 30.0)
            )
        );
        let g = r.generator.as_ref().unwrap();
        assert_eq!((g.user_us, g.sys_us), (us(60.0), us(40.0)));
        // Nothing measured: times, but no per-request figures.
        let idle = compute(&[1], &a, &b, 0.0, 0.01);
        assert_eq!(idle.processes[1].user_us, 0.0);
        assert!(idle.processes[1].cpu_share > 0.9);
    }
}
