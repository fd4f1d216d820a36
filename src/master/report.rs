//! `halfsync status` (JSON) and the Prometheus metrics, both built from
//! the same sources: the master's own records (processes, restarts), each
//! worker's control block (state, served, current request), the
//! proxy's stats page (replies by status, queues, latencies) and `/proc`
//! (each process's RSS and CPU time). Group and
//! total counts are sums of per-worker and per-group counters, never
//! counters of their own, so they always add up.

use std::fmt::Write as _;

use halfsync_proxy::stats::{BUCKETS_US, HistogramSnapshot, STATUSES};
use halfsync_shm::sys::monotonic_ns;
use serde_json::{Value, json};

use super::sys::CpuTime;
use super::{Cause, Master};

/// Status names in the order of the stats arrays.
const STATUS_NAMES: [&str; STATUSES] = [
    "OK",
    "PLUGIN_ERROR",
    "BUSY",
    "TIMEOUT",
    "WORKER_DIED",
    "BAD_REQUEST",
    "NO_ROUTE",
    "SHUTTING_DOWN",
    "PLUGIN_STATUS",
];

fn by_status(counts: &[u64; STATUSES]) -> Value {
    let mut m = serde_json::Map::new();
    for (name, n) in STATUS_NAMES.iter().zip(counts) {
        m.insert((*name).to_owned(), json!(n));
    }
    Value::Object(m)
}

fn add(into: &mut [u64; STATUSES], from: &[u64; STATUSES]) {
    into.iter_mut().zip(from).for_each(|(a, b)| *a += b);
}

/// Resident set size of a process in KiB (0 if it is gone).
fn rss_kib(pid: i32) -> u64 {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4
}

/// User and system CPU seconds a process has used since it started
/// (`None` if it is gone), from `/proc/<pid>/stat`: fields 14 and 15,
/// counted after the command name's closing parenthesis (the name may hold
/// spaces and parentheses).
fn cpu_seconds(pid: i32) -> Option<CpuTime> {
    let raw = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let rest = &text[text.rfind(')')? + 1..];
    let mut f = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    let tick = super::sys::clock_ticks_per_second() as f64;
    Some(CpuTime {
        user: utime as f64 / tick,
        system: stime as f64 / tick,
    })
}

fn cpu_value(c: CpuTime) -> Value {
    json!({"user": micros(c.user), "system": micros(c.system)})
}

/// Seconds rounded to the microsecond, the resolution of the kernel's
/// figures: sums of them print as 0.65, not 0.6499999999999999.
fn micros(seconds: f64) -> f64 {
    (seconds * 1e6).round() / 1e6
}

fn cpu_json(pid: Option<i32>) -> Value {
    pid.and_then(cpu_seconds).map_or(Value::Null, cpu_value)
}

/// CPU of group `id`'s workers: the ended ones (reaped) and the live ones
/// (from `/proc`), so it only grows as workers are replaced.
fn group_cpu(m: &Master, id: usize) -> CpuTime {
    let mut c = m.groups[id].ended_cpu;
    for s in m.slots.iter().filter(|s| s.group == id) {
        if let Some(live) = s.pid().and_then(cpu_seconds) {
            c += live;
        }
    }
    c
}

/// CPU of the proxy processes, ended ones included.
fn proxies_cpu(m: &Master) -> CpuTime {
    let mut c = m.proxies_ended_cpu;
    for p in m.proxies.iter().flatten() {
        if let Some(live) = cpu_seconds(p.pid) {
            c += live;
        }
    }
    c
}

/// The whole status, as a JSON object (one line).
pub(crate) fn status(m: &Master) -> String {
    let now = monotonic_ns();
    let global = m.global_stats();
    let inflight: u64 = (0..m.slots.len())
        .map(|i| m.slot_stats(i).pending)
        .sum::<u64>()
        + (0..m.groups.len())
            .map(|g| m.group_stats(g).queued)
            .sum::<u64>();
    let mut totals = global.replies;
    let mut groups = Vec::new();
    for (id, g) in m.groups.iter().enumerate() {
        let gs = m.group_stats(id);
        let mut replies = gs.replies;
        let mut workers = Vec::new();
        // Its workers' CPU: the ended ones', plus each live one's as read
        // for its own entry below (one /proc read per worker).
        let mut group_cpu = g.ended_cpu;
        let mut mine: Vec<usize> = (0..m.slots.len())
            .filter(|&i| m.slots[i].group == id)
            .collect();
        mine.sort_by_key(|&i| (m.slots[i].label, m.slots[i].pid().is_none()));
        for i in mine {
            let s = &m.slots[i];
            let ss = m.slot_stats(i);
            // Replies of slots without a worker now (spares after a reload
            // or scale) still count in the group's totals.
            add(&mut replies, &ss.replies);
            let cpu = s.pid().and_then(cpu_seconds);
            if let Some(c) = cpu {
                group_cpu += c;
            }
            let state = m.worker_state(i);
            // Not a worker (any more): a slot waiting to be used, or one
            // whose worker ended for good.
            if matches!(state, "spare" | "stopped" | "exited") {
                continue;
            }
            let ctl = s.slot.control();
            let pid = s.pid();
            let current = s.current_request().map(|b| {
                json!({"id": b.id, "command": b.code, "age_ms": now.saturating_sub(b.since_ns) / 1_000_000})
            });
            workers.push(json!({
                "slot": i,
                "worker": s.label,
                "proxy": s.proxy,
                "pid": pid,
                "generation": s.generation,
                "state": state,
                "served": if pid.is_some() { ctl.served() } else { 0 },
                "current": current,
                "rss_kib": pid.map_or(0, rss_kib),
                "cpu_s": cpu.map_or(Value::Null, cpu_value),
                "restarts": s.restarts,
                "pending": ss.pending,
                "dispatched": ss.dispatched,
                "replies": by_status(&ss.replies),
            }));
        }
        add(&mut totals, &replies);
        let ended: serde_json::Map<String, Value> = Cause::ALL
            .iter()
            .zip(g.ended)
            .map(|(c, n)| (c.name().to_owned(), json!(n)))
            .collect();
        groups.push(json!({
            "id": id,
            "name": g.config.name,
            "retired": g.retired,
            "plugin": g.plugin.path.display().to_string(),
            // Name and version from the plugin's table, as loaded at start
            // or by the last reload that applied to the group.
            // Noted when its file was rewritten in place since (`cp`): workers
            // started since run the rewritten file, untested.
            "plugin_version": if g.plugin.changed_in_place() {
                format!("{} (file rewritten in place since it was loaded)", g.plugin_version)
            } else {
                g.plugin_version.clone()
            },
            "generation": g.generation,
            "pool": if g.config.pool == halfsync_config::Pool::Dynamic { "dynamic" } else { "static" },
            "workers_target": g.config.workers,
            // The most a dynamic pool grows to (for a static one, workers).
            "workers_max": g.config.worker_limit(),
            "workers_running": m.slots.iter().filter(|s| s.group == id && s.pid().is_some()).count(),
            "queued": gs.queued,
            "inflight_cap": gs.inflight_cap,
            // null until the workers have sampled a run time.
            "mean_run_us": (gs.run_ns > 0).then(|| gs.run_ns as f64 / 1000.0),
            "replies": by_status(&replies),
            // All its worker processes, ended ones included.
            "cpu_s": cpu_value(group_cpu),
            "workers_ended": ended,
            "latency_us": {"count": gs.latency.count(), "sum": gs.latency.sum_us},
            "workers": workers,
        }));
    }
    json!({
        "ok": true,
        "pid": std::process::id(),
        "version": env!("CARGO_PKG_VERSION"),
        // The config file it runs (absolute), null on the embedded default.
        "config": m.config_path.as_ref().map(|p| p.display().to_string()),
        "generation": m.generation,
        // Client listen addresses, with the port chosen for a port 0.
        "listen": m.listening(),
        "uptime_s": m.started_at.elapsed().as_secs(),
        // What `GET /ping` says: null while every group can be served,
        // else why not (a proxy stopped or stuck, a group with no worker).
        "not_serving": m.not_serving(),
        "reloading": m.reload.is_some() || m.probing.is_some(),
        // How reloads ended; `last` is null before the first.
        "reloads": {
            "ok": m.reloads.ok,
            "failed": m.reloads.failed,
            "refused": m.reloads.refused,
            "last": m.reloads.last,
        },
        // "plugins": test-loading the new configuration's plugins (nothing
        // changed yet); "workers": replacing workers group by group.
        "reload_phase": if m.probing.is_some() {
            Some("plugins")
        } else if m.reload.is_some() {
            Some("workers")
        } else {
            None
        },
        "proxy": {
            "pid": m.proxies.first().and_then(|p| p.as_ref()).map(|p| p.pid),
            "pids": m.proxies.iter().map(|p| p.as_ref().map(|p| p.pid)).collect::<Vec<_>>(),
            // Per proxy, in the order of `pids`.
            "cpu_s": m.proxies.iter().map(|p| cpu_json(p.as_ref().map(|p| p.pid))).collect::<Vec<_>>(),
            "connections": global.connections,
            "inflight": inflight,
            "accepted": global.accepted,
            "refused": global.refused,
            // Proxies that died while serving and were restarted.
            "restarts": m.proxy_restarts,
            "replies_without_group": by_status(&global.replies),
        },
        "groups": groups,
        "totals": {"replies": by_status(&totals), "requests": totals.iter().sum::<u64>()},
    })
    .to_string()
}

fn esc(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A gauge with one sample per group, for the groups `value` has one for.
fn group_gauge(
    out: &mut String,
    name: &str,
    help: &str,
    groups: &[(usize, String)],
    value: impl Fn(usize) -> Option<String>,
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
    for (id, gname) in groups {
        if let Some(v) = value(*id) {
            let _ = writeln!(out, "{name}{{group=\"{gname}\"}} {v}");
        }
    }
}

fn histogram(out: &mut String, name: &str, group: &str, h: &HistogramSnapshot) {
    let mut cumulative = 0;
    for (i, n) in h.buckets.iter().enumerate() {
        cumulative += n;
        let le = match BUCKETS_US.get(i) {
            Some(us) => format!("{}", *us as f64 / 1e6),
            None => "+Inf".to_owned(),
        };
        let _ = writeln!(
            out,
            "{name}_bucket{{group=\"{group}\",le=\"{le}\"}} {cumulative}"
        );
    }
    let _ = writeln!(
        out,
        "{name}_sum{{group=\"{group}\"}} {}",
        h.sum_us as f64 / 1e6
    );
    let _ = writeln!(out, "{name}_count{{group=\"{group}\"}} {}", h.count());
}

/// Prometheus text exposition format (version 0.0.4).
pub(crate) fn metrics(m: &Master) -> String {
    let mut o = String::new();
    let global = m.global_stats();
    // One series per group name: a group removed by a reload and added
    // again later has a new id (and counts afresh); only the latest of a
    // name is shown, or its series would be listed twice.
    let groups: Vec<(usize, String)> = m
        .groups
        .iter()
        .enumerate()
        .filter(|(id, g)| {
            !m.groups[id + 1..]
                .iter()
                .any(|later| later.config.name == g.config.name)
        })
        .map(|(id, g)| (id, esc(&g.config.name)))
        .collect();

    o.push_str("# HELP halfsync_requests_total Replies sent, by group and status (group \"\" when no group was involved).\n");
    o.push_str("# TYPE halfsync_requests_total counter\n");
    // Every status, 0 included, as for the groups: a series that appears
    // only at its first increment hides that one from rate().
    for (name, n) in STATUS_NAMES.iter().zip(global.replies) {
        let _ = writeln!(
            o,
            "halfsync_requests_total{{group=\"\",status=\"{name}\"}} {n}"
        );
    }
    for (id, gname) in &groups {
        let mut replies = m.group_stats(*id).replies;
        for (i, s) in m.slots.iter().enumerate() {
            if s.group == *id {
                add(&mut replies, &m.slot_stats(i).replies);
            }
        }
        for (name, n) in STATUS_NAMES.iter().zip(replies) {
            let _ = writeln!(
                o,
                "halfsync_requests_total{{group=\"{gname}\",status=\"{name}\"}} {n}"
            );
        }
    }

    o.push_str("# HELP halfsync_request_duration_seconds Time from a request's arrival at the proxy to a worker's reply (answers the proxy gives itself, BUSY, TIMEOUT, WORKER_DIED, NO_ROUTE, ..., are counted in halfsync_requests_total only).\n");
    o.push_str("# TYPE halfsync_request_duration_seconds histogram\n");
    for (id, gname) in &groups {
        histogram(
            &mut o,
            "halfsync_request_duration_seconds",
            gname,
            &m.group_stats(*id).latency,
        );
    }
    o.push_str("# HELP halfsync_queue_wait_seconds Time from a request's arrival to a worker starting it (of the requests a worker answered).\n");
    o.push_str("# TYPE halfsync_queue_wait_seconds histogram\n");
    for (id, gname) in &groups {
        histogram(
            &mut o,
            "halfsync_queue_wait_seconds",
            gname,
            &m.group_stats(*id).queue_wait,
        );
    }

    o.push_str("# HELP halfsync_worker_restarts_total Worker processes ended, by cause.\n");
    o.push_str("# TYPE halfsync_worker_restarts_total counter\n");
    for (id, gname) in &groups {
        for (c, n) in Cause::ALL.iter().zip(m.groups[*id].ended) {
            let _ = writeln!(
                o,
                "halfsync_worker_restarts_total{{group=\"{gname}\",cause=\"{}\"}} {n}",
                c.name()
            );
        }
    }

    o.push_str("# HELP halfsync_workers Worker processes, by state.\n");
    o.push_str("# TYPE halfsync_workers gauge\n");
    for (id, gname) in &groups {
        for state in [
            "starting",
            "idle",
            "busy",
            "draining",
            "exiting",
            "restarting",
            "backoff",
            "unresponsive",
        ] {
            let n = m
                .slots
                .iter()
                .enumerate()
                .filter(|&(i, s)| s.group == *id && m.worker_state(i) == state)
                .count();
            let _ = writeln!(
                o,
                "halfsync_workers{{group=\"{gname}\",state=\"{state}\"}} {n}"
            );
        }
    }

    group_gauge(
        &mut o,
        "halfsync_queue_length",
        "Requests waiting in the proxy for a worker (or, during a reload that moved their command to this group, for its new version).",
        &groups,
        |id| Some(m.group_stats(id).queued.to_string()),
    );
    group_gauge(
        &mut o,
        "halfsync_inflight_cap",
        "Requests a worker of the group may hold now (max_inflight, or fewer by max_inflight_time).",
        &groups,
        |id| Some(m.group_stats(id).inflight_cap.to_string()),
    );
    group_gauge(
        &mut o,
        "halfsync_run_time_mean_seconds",
        "The plugin's mean run time, as sampled by the workers (absent until sampled).",
        &groups,
        |id| {
            let run_ns = m.group_stats(id).run_ns;
            (run_ns > 0).then(|| (run_ns as f64 / 1e9).to_string())
        },
    );

    group_gauge(
        &mut o,
        "halfsync_workers_target",
        "Workers the group is configured to keep (a dynamic pool's minimum; scale changes it until the next reload).",
        &groups,
        |id| (!m.groups[id].retired).then(|| m.groups[id].config.workers.to_string()),
    );
    group_gauge(
        &mut o,
        "halfsync_workers_max",
        "The most workers the group may have (max_workers of a dynamic pool; workers of a static one).",
        &groups,
        |id| (!m.groups[id].retired).then(|| m.groups[id].config.worker_limit().to_string()),
    );
    group_gauge(
        &mut o,
        "halfsync_group_serving",
        "1 while the group's commands are served (what /ping?group= answers 200 for), else 0.",
        &groups,
        |id| {
            let g = &m.groups[id];
            (!g.retired)
                .then(|| u8::from(m.not_serving_for(Some(&g.config.name)).is_none()).to_string())
        },
    );
    o.push_str("# HELP halfsync_serving 1 while every group is served (what /ping answers 200 for), else 0; halfsync status gives the reason.\n# TYPE halfsync_serving gauge\n");
    let _ = writeln!(
        o,
        "halfsync_serving {}",
        u8::from(m.not_serving().is_none())
    );
    o.push_str("# HELP halfsync_proxy_heartbeat_age_seconds Time since each proxy's event loop last turned (about once a second while it runs; the watchdog acts at proxy_stall_timeout).\n# TYPE halfsync_proxy_heartbeat_age_seconds gauge\n");
    let now = halfsync_shm::sys::monotonic_ns();
    for (p, stats) in m.stats.iter().enumerate() {
        let beat = stats.last_heartbeat_ns();
        if beat != 0 {
            let _ = writeln!(
                o,
                "halfsync_proxy_heartbeat_age_seconds{{proxy=\"{p}\"}} {}",
                now.saturating_sub(beat) as f64 / 1e9
            );
        }
    }

    o.push_str("# HELP halfsync_log_lines_dropped_total Log lines dropped over the budget of 300 a second per worker: source=\"plugin\" its log calls, source=\"output\" what it printed to stdout or stderr.\n# TYPE halfsync_log_lines_dropped_total counter\n");
    for (id, gname) in &groups {
        let g = &m.groups[*id];
        let live: u64 = m
            .slots
            .iter()
            .filter(|s| s.group == *id)
            .map(super::SlotRec::log_dropped)
            .fold(0, u64::saturating_add);
        let _ = writeln!(
            o,
            "halfsync_log_lines_dropped_total{{group=\"{gname}\",source=\"plugin\"}} {}",
            g.ended_log_dropped.saturating_add(live)
        );
        let _ = writeln!(
            o,
            "halfsync_log_lines_dropped_total{{group=\"{gname}\",source=\"output\"}} {}",
            g.output_dropped.get()
        );
    }

    // Per worker process (as PHP-FPM's full status lists each child).
    let now_ns = halfsync_shm::sys::monotonic_ns();
    let live: Vec<(usize, &super::SlotRec, String)> = m
        .slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            s.pid()?;
            let gname = m
                .groups
                .get(s.group)
                .map_or(String::new(), |g| esc(&g.config.name));
            Some((i, s, gname))
        })
        .collect();
    o.push_str("# HELP halfsync_worker_rss_bytes Resident memory of each worker process.\n# TYPE halfsync_worker_rss_bytes gauge\n");
    for (i, s, gname) in &live {
        let rss = s.pid().map_or(0, rss_kib) * 1024;
        let _ = writeln!(
            o,
            "halfsync_worker_rss_bytes{{group=\"{gname}\",worker=\"{}\",slot=\"{i}\"}} {rss}",
            s.label
        );
    }
    o.push_str("# HELP halfsync_worker_requests_held Requests handed to each worker and not yet answered.\n# TYPE halfsync_worker_requests_held gauge\n");
    for (i, s, gname) in &live {
        let _ = writeln!(
            o,
            "halfsync_worker_requests_held{{group=\"{gname}\",worker=\"{}\",slot=\"{i}\"}} {}",
            s.label,
            m.slot_stats(*i).pending
        );
    }
    o.push_str("# HELP halfsync_worker_request_age_seconds How long each worker has been running its current request (0 when idle): a hung or slow request shows here before any timeout.\n# TYPE halfsync_worker_request_age_seconds gauge\n");
    for (i, s, gname) in &live {
        let age = s
            .current_request()
            .map_or(0.0, |b| now_ns.saturating_sub(b.since_ns) as f64 / 1e9);
        let _ = writeln!(
            o,
            "halfsync_worker_request_age_seconds{{group=\"{gname}\",worker=\"{}\",slot=\"{i}\"}} {age:.3}",
            s.label
        );
    }

    o.push_str("# HELP halfsync_ring_occupancy_bytes Bytes published and not yet consumed in each worker's rings (`slot` tells a worker from its replacement while both run).\n");
    o.push_str("# TYPE halfsync_ring_occupancy_bytes gauge\n");
    for (i, s) in m
        .slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.pid().is_some())
    {
        // By id: `groups` lists one group per name, not every id.
        let gname = m
            .groups
            .get(s.group)
            .map_or(String::new(), |g| esc(&g.config.name));
        for (ring, r) in [("request", s.slot.requests()), ("reply", s.slot.replies())] {
            let _ = writeln!(
                o,
                "halfsync_ring_occupancy_bytes{{group=\"{gname}\",worker=\"{}\",slot=\"{i}\",ring=\"{ring}\"}} {}",
                s.label,
                r.occupancy()
            );
        }
    }

    o.push_str("# HELP halfsync_cpu_seconds_total CPU time of the proxy processes (group \"\") and of each group's worker processes, those that ended included.\n");
    o.push_str("# TYPE halfsync_cpu_seconds_total counter\n");
    let mut cpu_lines = |role: &str, group: &str, c: CpuTime| {
        for (mode, v) in [("user", micros(c.user)), ("system", micros(c.system))] {
            let _ = writeln!(
                o,
                "halfsync_cpu_seconds_total{{role=\"{role}\",group=\"{group}\",mode=\"{mode}\"}} {v}"
            );
        }
    };
    cpu_lines("proxy", "", proxies_cpu(m));
    for (id, gname) in &groups {
        cpu_lines("worker", gname, group_cpu(m, *id));
    }

    o.push_str(
        "# HELP halfsync_connections Open client connections.\n# TYPE halfsync_connections gauge\n",
    );
    let _ = writeln!(o, "halfsync_connections {}", global.connections);
    o.push_str("# HELP halfsync_connections_accepted_total Client connections accepted.\n# TYPE halfsync_connections_accepted_total counter\n");
    let _ = writeln!(o, "halfsync_connections_accepted_total {}", global.accepted);
    o.push_str("# HELP halfsync_connections_refused_total Client connections refused (limits).\n# TYPE halfsync_connections_refused_total counter\n");
    let _ = writeln!(o, "halfsync_connections_refused_total {}", global.refused);
    o.push_str("# HELP halfsync_proxy_restarts_total Proxy processes that died while serving and were restarted (their clients' connections were lost).\n# TYPE halfsync_proxy_restarts_total counter\n");
    let _ = writeln!(o, "halfsync_proxy_restarts_total {}", m.proxy_restarts);
    o.push_str("# HELP halfsync_build_info The halfsync version running (always 1).\n# TYPE halfsync_build_info gauge\n");
    let _ = writeln!(
        o,
        "halfsync_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    o.push_str("# HELP halfsync_start_time_seconds When the master started, in seconds since the Unix epoch.\n# TYPE halfsync_start_time_seconds gauge\n");
    let since_epoch = m
        .started_wall
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let _ = writeln!(
        o,
        "halfsync_start_time_seconds {}",
        since_epoch.as_secs_f64()
    );
    o.push_str("# HELP halfsync_config_generation Configuration generation (1 at start, +1 per reload).\n# TYPE halfsync_config_generation gauge\n");
    let _ = writeln!(o, "halfsync_config_generation {}", m.generation);
    o.push_str("# HELP halfsync_reloads_total Reloads by how they ended: ok (every group on the new configuration), failed (some group rolled back), refused (nothing changed).\n# TYPE halfsync_reloads_total counter\n");
    for (result, n) in [
        ("ok", m.reloads.ok),
        ("failed", m.reloads.failed),
        ("refused", m.reloads.refused),
    ] {
        let _ = writeln!(o, "halfsync_reloads_total{{result=\"{result}\"}} {n}");
    }
    o.push_str("# HELP halfsync_reload_last_success Whether the last reload ended ok (1 before the first).\n# TYPE halfsync_reload_last_success gauge\n");
    let _ = writeln!(
        o,
        "halfsync_reload_last_success {}",
        u8::from(m.reloads.last.is_none_or(|l| l == "ok"))
    );
    o
}
