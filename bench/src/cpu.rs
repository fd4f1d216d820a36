//! `--cpu PID`: the CPU time each process of a server spends per request,
//! over the measured window, read from `/proc` (Linux).
//!
//! The processes are the given pids and all their descendants (give the
//! halfsync master's pid and the proxy and every worker are included),
//! plus this generator itself. Each is sampled when the measured window
//! opens and when it closes; a process that started in between counts from
//! its start, one that exited in between is left out and counted in
//! [`CpuReport::exited`] (its time after the first sample is unknown).
//! Times come in clock ticks (usually 10 ms), so windows of a few seconds
//! are needed for two significant digits.

use std::collections::BTreeMap;
use std::fs;

use serde::{Deserialize, Serialize};

use crate::sys;

/// One process's CPU over the measured window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CpuUse {
    /// Process id.
    pub pid: u32,
    /// Its command line (a halfsync process names its role there:
    /// `halfsync: proxy`, `halfsync: worker echo 0`), or `halfsync-bench`
    /// for the generator.
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
    /// Every process sampled, the given ones and their descendants first
    /// (by pid), the generator last.
    pub processes: Vec<CpuUse>,
    /// Processes that exited during the window, so are not in the list.
    pub exited: u64,
    /// Length of the sampled window, seconds (within ~10 ms of the
    /// measured one).
    pub seconds: f64,
}

/// What `/proc/<pid>/stat` says about a process.
#[derive(Clone, Debug, PartialEq)]
struct ProcStat {
    ppid: u32,
    /// User and system time, clock ticks.
    utime: u64,
    stime: u64,
    /// Start time since boot, clock ticks (tells a reused pid apart).
    start: u64,
}

/// Parses the text of `/proc/<pid>/stat`. The command name (field 2) is in
/// parentheses and may itself hold spaces and parentheses, so the fields
/// are counted from the last `)`.
fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    // After the name: state(3) ppid(4) ... utime(14) stime(15) ... starttime(22).
    Some(ProcStat {
        ppid: f.get(1)?.parse().ok()?,
        utime: f.get(11)?.parse().ok()?,
        stime: f.get(12)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
    })
}

fn read_stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The command line, arguments joined by spaces, at most 60 characters.
fn name_of(pid: u32) -> String {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let joined = String::from_utf8_lossy(&raw)
        .split('\0')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let name = if joined.is_empty() {
        fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default()
    } else {
        joined
    };
    name.trim().chars().take(60).collect()
}

/// `roots` and all their descendants now, with their stats.
fn tree(roots: &[u32]) -> BTreeMap<u32, ProcStat> {
    let mut all: BTreeMap<u32, ProcStat> = BTreeMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok())
                && let Some(st) = read_stat(pid)
            {
                all.insert(pid, st);
            }
        }
    }
    let mut keep: BTreeMap<u32, ProcStat> = BTreeMap::new();
    let mut todo: Vec<u32> = roots.to_vec();
    while let Some(pid) = todo.pop() {
        if keep.contains_key(&pid) {
            continue;
        }
        if let Some(st) = all.get(&pid) {
            keep.insert(pid, st.clone());
            todo.extend(all.iter().filter(|(_, s)| s.ppid == pid).map(|(&c, _)| c));
        }
    }
    keep
}

struct Sample {
    at_ns: u64,
    procs: BTreeMap<u32, ProcStat>,
    generator: Option<ProcStat>,
}

fn sample(roots: &[u32]) -> Sample {
    Sample {
        at_ns: sys::now_ns(),
        procs: tree(roots),
        generator: read_stat(std::process::id()),
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
            self.start = Some(sample(&self.roots));
        } else if !open && self.start.is_some() && self.end.is_none() {
            self.end = Some(sample(&self.roots));
        }
    }

    /// The split per request at `rps` measured requests per second; `None`
    /// if the window never opened.
    pub(crate) fn report(&mut self, rps: f64) -> Option<CpuReport> {
        self.window(false);
        let (a, b) = (self.start.as_ref()?, self.end.as_ref()?);
        let seconds = b.at_ns.saturating_sub(a.at_ns) as f64 / 1e9;
        let tick = 1.0 / sys::clock_ticks_per_second() as f64;
        let row = |pid: u32, name: String, before: Option<&ProcStat>, after: &ProcStat| {
            // A process that started during the window counts from zero.
            let (u0, s0) = match before {
                Some(p) if p.start == after.start => (p.utime, p.stime),
                _ => (0, 0),
            };
            let user = after.utime.saturating_sub(u0) as f64 * tick;
            let sys = after.stime.saturating_sub(s0) as f64 * tick;
            let per_request = |t: f64| {
                if seconds > 0.0 && rps > 0.0 {
                    t / seconds / rps * 1e6
                } else {
                    0.0
                }
            };
            CpuUse {
                pid,
                name,
                user_us: per_request(user),
                sys_us: per_request(sys),
                cpu_share: if seconds > 0.0 {
                    (user + sys) / seconds
                } else {
                    0.0
                },
            }
        };
        let mut processes: Vec<CpuUse> = b
            .procs
            .iter()
            .map(|(&pid, st)| row(pid, name_of(pid), a.procs.get(&pid), st))
            .collect();
        let exited = a
            .procs
            .iter()
            .filter(|(pid, st)| b.procs.get(pid).is_none_or(|s| s.start != st.start))
            .count() as u64;
        if let Some(g) = &b.generator {
            processes.push(row(
                std::process::id(),
                "halfsync-bench".to_string(),
                a.generator.as_ref(),
                g,
            ));
        }
        Some(CpuReport {
            processes,
            exited,
            seconds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let line = "4242 (halfsync: worker (echo) 0) S 4240 4240 4240 0 -1 4194560 \
                    1000 0 0 0 1234 567 0 0 20 0 1 0 98765 123456789 1000 \
                    18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_stat(line),
            Some(ProcStat {
                ppid: 4240,
                utime: 1234,
                stime: 567,
                start: 98765,
            })
        );
        assert_eq!(parse_stat("4242 (cut short) S 1"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
    }

    #[test]
    fn this_process_is_found_with_its_name() {
        let me = std::process::id();
        let t = tree(&[me]);
        assert!(t.contains_key(&me));
        assert!(!name_of(me).is_empty());
        // A pid that does not exist is simply absent.
        assert!(tree(&[u32::MAX]).is_empty());
    }
}
