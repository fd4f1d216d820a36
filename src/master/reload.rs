//! Live reload: re-read the configuration, test-load its plugins, then
//! replace every worker group by group as a chain — start a worker of the
//! new generation, wait until its plugin init succeeded, let the old one
//! drain and retire, next — so no request fails and no group is ever
//! short of workers. Listener changes and group additions and removals are
//! applied on the way.
//!
//! If the new configuration is invalid or a plugin does not load, nothing
//! changes. If a new worker fails to start, that group goes back to its
//! previous configuration: workers already replaced are replaced again by
//! the old generation (rollback), and the reload reports the failure.

use std::collections::VecDeque;
use std::rc::Rc;

use halfsync_config::Config;
use tracing::{error, info, warn};

use super::{Cause, GroupRec, Life, Master, admin};
use crate::plugin_file::PluginFile;

/// A reload in progress.
pub(crate) struct Job {
    /// The admin client waiting for the outcome.
    pub(crate) reply_to: Option<u64>,
    generation: u64,
    groups: Vec<GroupJob>,
    pub(crate) errors: Vec<String>,
    /// Which group served each command before the reload (explicit
    /// claims only), for a group it adds that fails to start: its
    /// commands go back there (`addition_failed`).
    routes_before: Vec<(u16, String)>,
}

struct GroupJob {
    group: usize,
    /// The group's previous settings, for a rollback.
    old: Option<Previous>,
    /// Slots whose workers still run the wrong generation.
    todo: VecDeque<usize>,
    /// The replacement being started: (new slot, old slot).
    current: Option<(usize, usize)>,
    rolling_back: bool,
    /// Slots this job already tried to replace (a second pass over the
    /// group's workers skips them, so a failing `replace` cannot loop).
    tried: Vec<usize>,
    /// The previous version failed to start again: leave the group be.
    gave_up: bool,
    /// A group this reload adds: the slots of its first workers not ready
    /// yet. The reload ends when they all are, or when one fails to start,
    /// and then the group is not added after all.
    adding: Vec<usize>,
    /// The slots of workers this reload started for a group it keeps (it
    /// raised `workers`, or restarted workers waiting out a restart
    /// delay) that are not ready yet: the reload waits for them, and one
    /// that fails to start makes it fail (the slot goes on as any
    /// failing worker's does).
    starting: Vec<usize>,
}

/// What a reload changed in a group, for a rollback.
struct Previous {
    config: halfsync_config::Group,
    plugin: Rc<PluginFile>,
    plugin_version: String,
    generation: u64,
}

impl GroupJob {
    fn new(group: usize, old: Option<Previous>) -> Self {
        GroupJob {
            group,
            old,
            todo: VecDeque::new(),
            current: None,
            rolling_back: false,
            tried: Vec::new(),
            gave_up: false,
            adding: Vec::new(),
            starting: Vec::new(),
        }
    }
}

impl Job {
    /// Whether `slot` runs one of the first workers of a group this reload
    /// adds, not ready yet.
    pub(crate) fn adding(&self, slot: usize) -> bool {
        self.groups.iter().any(|gj| gj.adding.contains(&slot))
    }

    /// Whether group `g` is one this reload adds whose first workers are
    /// not all ready yet.
    pub(crate) fn adds_group(&self, g: usize) -> bool {
        self.groups
            .iter()
            .any(|gj| gj.group == g && !gj.adding.is_empty())
    }

    /// Whether `slot` runs a worker this reload started for a group it
    /// keeps, not ready yet.
    pub(crate) fn starting(&self, slot: usize) -> bool {
        self.groups.iter().any(|gj| gj.starting.contains(&slot))
    }
}

/// A reload whose new configuration's plugins are being test-loaded:
/// nothing has changed yet, and the master goes on supervising meanwhile.
pub(crate) struct Probing {
    pub(crate) probe: crate::probe::Probe,
    config: Config,
    /// Its groups' plugin files, which the probe loads and the new
    /// workers will.
    files: Vec<PluginFile>,
    /// The admin client waiting for the outcome.
    pub(crate) reply_to: Option<u64>,
}

/// How reloads ended, for status and metrics (as Prometheus's own
/// `config_last_reload_successful`).
#[derive(Default)]
pub(crate) struct Outcomes {
    /// Every group runs the new configuration.
    pub(crate) ok: u64,
    /// Applied, but some group went back to its previous version.
    pub(crate) failed: u64,
    /// Nothing changed: the configuration or a plugin was refused.
    pub(crate) refused: u64,
    /// How the last one ended: "ok", "failed", "refused"; `None` before
    /// the first.
    pub(crate) last: Option<&'static str>,
}

impl Outcomes {
    fn count(&mut self, last: &'static str) {
        match last {
            "ok" => self.ok += 1,
            "failed" => self.failed += 1,
            _ => self.refused += 1,
        }
        self.last = Some(last);
    }
}

impl Master {
    /// Starts a reload: reads the configuration and starts test-loading
    /// its plugins in a child process ([`Master::poll_reload_probe`] goes
    /// on when that is done). Errors (bad config, a reload already
    /// running) change nothing.
    pub(crate) fn start_reload(&mut self, reply_to: Option<u64>) -> Result<(), String> {
        if self.reload.is_some() || self.probing.is_some() {
            return Err("a reload is already in progress".into());
        }
        if self.inline {
            return Err("not available in --inline benchmark mode".into());
        }
        if self.stopping.is_some() {
            return Err("halfsync is stopping".into());
        }
        // systemd's Type=notify-reload: RELOADING=1 (with the time) now,
        // READY=1 once the reload has ended, however it ends.
        self.notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading",
            halfsync_shm::sys::monotonic_ns() / 1000
        ));
        let started = self.start_reload_checked(reply_to);
        if let Err(e) = &started {
            self.notify_serving(&format!("; reload refused: {e}"));
        }
        started
    }

    fn start_reload_checked(&mut self, reply_to: Option<u64>) -> Result<(), String> {
        // This one covers a SIGHUP that was waiting for the last one.
        self.reload_pending = false;
        if self.inline {
            return Err("not available in --inline benchmark mode".into());
        }
        if self.stopping.is_some() {
            return Err("halfsync is stopping".into());
        }
        // A reload needs every proxy to take the new configuration; one
        // that does not run would hold it for ever.
        if let Some(p) = self.stalled_proxy() {
            return Err(format!(
                "proxy {p} has not run its loop for over 5 s (stopped or stuck); reload once it \
                 runs again (proxy_stall_timeout restarts it)"
            ));
        }
        if let Some(p) = self.proxy_waiting() {
            return Err(format!(
                "proxy {p} could not be restarted yet (it is tried again every second); reload \
                 once it is back (halfsync status shows it)"
            ));
        }
        let (probe, config, files) = self
            .read_and_probe()
            .inspect_err(|_| self.reloads.count("refused"))?;
        info!(pid = probe.pid(), "reload: test-loading the plugins");
        self.probing = Some(Probing {
            probe,
            config,
            files,
            reply_to,
        });
        Ok(())
    }

    /// The configuration file, its plugin files opened, and their probe
    /// started.
    fn read_and_probe(&self) -> Result<(crate::probe::Probe, Config, Vec<PluginFile>), String> {
        let config = match &self.config_path {
            Some(p) => Config::from_file(p).map_err(|e| e.to_string())?,
            None => Config::embedded_default(),
        };
        if config.server.proxy_processes != self.config.server.proxy_processes {
            return Err(format!(
                "server.proxy_processes changed ({} -> {}): that takes a restart, not a reload",
                self.config.server.proxy_processes, config.server.proxy_processes
            ));
        }
        let files = crate::probe::open_plugins(&self.exe, &config);
        let probe = crate::probe::Probe::start(&self.exe, &config, &files, false)
            .map_err(|e| format!("{e:#}"))?;
        Ok((probe, config, files))
    }

    /// Once the reload's probe has ended: applies the configuration if
    /// every plugin loaded, or refuses the reload (changing nothing).
    pub(crate) fn poll_reload_probe(&mut self) {
        if self.stopping.is_some() {
            // (A stop that did not go through `begin_stop`.)
            self.abandon_reload();
            return;
        }
        let Some(p) = &mut self.probing else { return };
        let Some(outcome) = p.probe.poll() else {
            return;
        };
        let Some(Probing {
            config,
            files,
            reply_to,
            ..
        }) = self.probing.take()
        else {
            return;
        };
        let applied = outcome
            .map_err(|e| format!("{e:#}"))
            .and_then(|probed| self.apply_reload(config, files, probed, reply_to));
        if let Err(e) = applied {
            self.reloads.count("refused");
            error!("reload refused: {e}");
            self.notify_serving(&format!("; reload refused: {e}"));
            if let Some(conn) = reply_to {
                self.admin.respond(conn, admin::err(&e));
            }
        }
    }

    /// Applies a configuration whose plugins loaded in the probe. Errors
    /// (a port that cannot be bound) change nothing; after that the
    /// reload is committed and answers `reply_to` when it ends.
    fn apply_reload(
        &mut self,
        config: Config,
        files: Vec<PluginFile>,
        probed: Vec<crate::probe::Probed>,
        reply_to: Option<u64>,
    ) -> Result<(), String> {
        // Group ids are never reused (a removed group keeps its place in
        // the proxies' statistics pages until the server restarts).
        let added: Vec<&str> = config
            .groups
            .iter()
            .filter(|g| {
                !self
                    .groups
                    .iter()
                    .any(|r| !r.retired && r.config.name == g.name)
            })
            .map(|g| g.name.as_str())
            .collect();
        if self.groups.len() + added.len() > halfsync_config::MAX_GROUPS {
            return Err(format!(
                "this server has created {} groups since it started (removed ones included) and \
                 can create at most {}: adding {} needs a restart (halfsync stop, then halfsync \
                 run); a reload that keeps the group names works meanwhile",
                self.groups.len(),
                halfsync_config::MAX_GROUPS,
                added.join(", ")
            ));
        }
        let new_listeners = self.bind_new_listeners(&config)?;
        if config.server.admin_socket != self.config.server.admin_socket
            || config.server.metrics_listen != self.config.server.metrics_listen
        {
            warn!("admin_socket and metrics_listen changes take effect at the next restart");
        }
        if (config.log_file(), config.server.log_format) != self.log_setup {
            warn!(
                "log_file and log_format changes take effect at the next restart (every process \
                 keeps the log it started with)"
            );
        }

        // Committed from here on.
        for note in config.ignored_settings() {
            warn!("{note}");
        }
        self.generation += 1;
        let generation = self.generation;
        info!(generation, "reloading");
        let mut jobs = Vec::new();
        let mut fresh = Vec::new();
        for (g, (file, p)) in config.groups.iter().zip(files.into_iter().zip(probed)) {
            match self
                .groups
                .iter()
                .position(|r| !r.retired && r.config.name == g.name)
            {
                Some(id) => {
                    let r = &mut self.groups[id];
                    let old = Previous {
                        config: std::mem::replace(&mut r.config, g.clone()),
                        plugin: std::mem::replace(&mut r.plugin, Rc::new(file)),
                        plugin_version: std::mem::replace(
                            &mut r.plugin_version,
                            super::plugin_version(&p),
                        ),
                        generation: std::mem::replace(&mut r.generation, generation),
                    };
                    jobs.push(GroupJob::new(id, Some(old)));
                }
                None => {
                    self.groups
                        .push(GroupRec::new(g.clone(), file, &p, generation));
                    fresh.push(self.groups.len() - 1);
                }
            }
        }
        let gone: Vec<usize> = (0..self.groups.len())
            .filter(|&id| {
                !self.groups[id].retired
                    && !config
                        .groups
                        .iter()
                        .any(|g| g.name == self.groups[id].config.name)
            })
            .collect();
        let routes_before: Vec<(u16, String)> = self
            .config
            .groups
            .iter()
            .flat_map(|g| g.commands.iter().map(|&c| (c, g.name.clone())))
            .collect();
        self.config = config.clone();
        // Room for the new sizes' descriptors before their workers start.
        self.raise_nofile();
        for &id in &gone {
            info!(group = %self.groups[id].config.name, "group removed; draining its workers");
            self.groups[id].retired = true;
        }
        self.swap_listeners(&config, new_listeners);
        // Until a group's workers all run its new generation, commands
        // the new routes move to it wait for that (see `wanted_hold`).
        let hold = self.stale_groups();
        if let Err(e) = self.send_config(hold, false) {
            error!("{e}");
        }
        for id in gone {
            for i in 0..self.slots.len() {
                if self.slots[i].group == id {
                    self.drain(i, Cause::Scale);
                    // Counted as ended by the reload that removed their
                    // group, not as a scale-down.
                    if self.slots[i].draining {
                        self.slots[i].end_cause = Some(Cause::Reload);
                    }
                }
            }
        }
        // New groups: their first workers start now, and the reload waits
        // for them (`adding`) as for the other groups' replacements.
        let mut errors = Vec::new();
        let mut added = Vec::new();
        for id in fresh {
            let mut gj = GroupJob::new(id, None);
            for _ in 0..self.groups[id].config.workers {
                match self.add_worker(id) {
                    Ok(i) => gj.adding.push(i),
                    Err(e) => {
                        let msg = format!("group {}: {e:#}", self.groups[id].config.name);
                        error!("{msg}");
                        errors.push(msg);
                    }
                }
            }
            added.push(gj);
        }
        // Existing groups: replace the workers they keep, chain-wise; add
        // or drain the difference in size.
        for job in &mut jobs {
            let g = job.group;
            let target = self.groups[g].config.workers as usize;
            let mut active: Vec<usize> = (0..self.slots.len())
                .filter(|&i| self.slots[i].group == g && self.slots[i].active())
                .collect();
            active.sort_by_key(|&i| self.slots[i].label);
            for &i in active.iter().skip(target) {
                self.drain(i, Cause::Scale);
            }
            for _ in active.len()..target {
                match self.add_worker(g) {
                    Ok(i) => job.starting.push(i),
                    Err(e) => error!("{e:#}"),
                }
            }
            // Workers waiting out a restart delay (their plugin kept
            // failing) start again now, with the new configuration, which
            // may be the fix: the reload's outcome says whether it was.
            // Failures before the reload do not count against it: one
            // dying at this moment is restarted at once too.
            let now = std::time::Instant::now();
            for &i in active.iter().take(target) {
                let s = &mut self.slots[i];
                s.failures = 0;
                match &mut s.life {
                    Life::Backoff { at } => {
                        *at = now;
                        job.starting.push(i);
                    }
                    Life::Resetting { next } if *next == super::Restart::Later => {
                        *next = super::Restart::Now;
                    }
                    _ => {}
                }
            }
            job.todo = active.into_iter().take(target).collect();
        }
        jobs.extend(added);
        self.reload = Some(Job {
            reply_to,
            generation,
            groups: jobs,
            errors,
            routes_before,
        });
        self.reload_advance();
        Ok(())
    }

    /// After a proxy died during a reload (which dropped the job): replaces
    /// the serving workers still on another generation than their group's,
    /// chain-wise as a reload does, without re-reading the config file (the
    /// operator may be editing it). With nothing to replace, nothing
    /// happens, so this cannot loop.
    pub(crate) fn resume_reload(&mut self) {
        if self.reload.is_some() {
            return;
        }
        // Every group with a worker on another generation; `reload_advance`
        // finds them (and waits for those still starting).
        let groups: Vec<GroupJob> = self
            .stale_groups()
            .into_iter()
            .map(|g| GroupJob::new(g as usize, None))
            .collect();
        let errors = std::mem::take(&mut self.resume_errors);
        if groups.is_empty() {
            // Nothing left to replace (the dead proxy's workers came back
            // on the new generation): the reload has ended, and is counted.
            self.reloads
                .count(if errors.is_empty() { "ok" } else { "failed" });
            if errors.is_empty() {
                info!(
                    generation = self.generation,
                    "reload complete (after a proxy's death)"
                );
                self.notify_serving("");
            } else {
                warn!(
                    generation = self.generation,
                    errors = errors.len(),
                    "reload finished with errors (after a proxy's death)"
                );
                self.notify_serving("; the last reload failed (see the log)");
            }
            return;
        }
        info!(
            groups = groups.len(),
            "resuming the reload a proxy's death interrupted"
        );
        self.reload = Some(Job {
            reply_to: None,
            generation: self.generation,
            groups,
            errors,
            routes_before: Vec::new(),
        });
        self.reload_advance();
    }

    /// A worker became ready: if it was a reload's replacement, go on.
    pub(crate) fn reload_progress(&mut self, ready_slot: usize) {
        let Some(job) = &mut self.reload else { return };
        for gj in &mut job.groups {
            if gj.current.is_some_and(|(new, _)| new == ready_slot) {
                gj.current = None;
            }
            gj.adding.retain(|&i| i != ready_slot);
            gj.starting.retain(|&i| i != ready_slot);
        }
        self.reload_advance();
    }

    /// A worker this reload started for a group it keeps died before it
    /// was ready: the reload fails, naming it (the worker is restarted as
    /// any other that fails to start).
    pub(crate) fn start_failed(&mut self, slot: usize, how: i32) {
        let Some(job) = &mut self.reload else { return };
        let Some(gj) = job.groups.iter_mut().find(|gj| gj.starting.contains(&slot)) else {
            return;
        };
        gj.starting.retain(|&i| i != slot);
        let name = &self.groups[gj.group].config.name;
        let how = match &self.slots[slot].last_failure {
            Some(reason) => reason.clone(),
            None => halfsync_proxy::control::describe_exit(how),
        };
        let msg = format!("group {name}: a worker started by the reload failed to start ({how})");
        error!("{msg}");
        job.errors.push(msg);
        self.reload_advance();
    }

    /// One of the first workers of a group this reload adds died before it
    /// was ready: the group is not added after all (its previous version
    /// is no group), so that its commands go where they went before the
    /// reload, and the server is not left out of a load balancer for one
    /// group that cannot start. The reload reports the failure.
    pub(crate) fn addition_failed(&mut self, slot: usize, how: i32) {
        let Some(job) = &mut self.reload else { return };
        let Some(gj) = job.groups.iter_mut().find(|gj| gj.adding.contains(&slot)) else {
            return;
        };
        gj.adding.clear();
        gj.gave_up = true;
        let g = gj.group;
        let name = self.groups[g].config.name.clone();
        let how = match &self.slots[slot].last_failure {
            Some(reason) => reason.clone(),
            None => halfsync_proxy::control::describe_exit(how),
        };
        // (The last group of a configuration cannot go: a reload that
        // replaced every group by new ones keeps this one, failing.)
        let others = self.config.groups.iter().any(|c| c.name != name);
        let msg = if others {
            format!(
                "group {name}: its first worker failed to start ({how}); the group was not added"
            )
        } else {
            format!("group {name}: its first worker failed to start ({how})")
        };
        error!("{msg}");
        job.errors.push(msg);
        if !others {
            self.reload_advance();
            return;
        }
        // Its commands go back to the groups that served them before the
        // reload, where those are still here and not the default route
        // (which takes them anyway).
        let claimed: Vec<u16> = self
            .config
            .groups
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.commands.clone())
            .unwrap_or_default();
        let before = job.routes_before.clone();
        self.config.groups.retain(|c| c.name != name);
        for cmd in claimed {
            let Some((_, owner)) = before.iter().find(|(c, _)| *c == cmd) else {
                continue;
            };
            if let Some(c) =
                self.config.groups.iter_mut().find(|c| {
                    &c.name == owner && !c.is_default_route() && !c.commands.contains(&cmd)
                })
            {
                c.commands.push(cmd);
                let updated = c.clone();
                if let Some(r) = self
                    .groups
                    .iter_mut()
                    .find(|r| !r.retired && r.config.name == updated.name)
                {
                    r.config.commands = updated.commands;
                }
            }
        }
        self.groups[g].retired = true;
        for i in 0..self.slots.len() {
            if self.slots[i].group == g && i != slot {
                self.drain(i, Cause::Reload);
            }
        }
        if let Err(e) = self.reconfigure_proxy() {
            error!("{e}");
        }
        self.reload_advance();
    }

    /// A replacement worker died before it was ready. During a reload
    /// that means the new generation does not start: roll its group back.
    pub(crate) fn replacement_failed(&mut self, slot: usize, how: i32) {
        let Some(job) = &mut self.reload else { return };
        let Some(k) = job
            .groups
            .iter()
            .position(|gj| gj.current.is_some_and(|(new, _)| new == slot))
        else {
            return;
        };
        let gj = &mut job.groups[k];
        gj.current = None;
        let g = gj.group;
        let name = self.groups[g].config.name.clone();
        let how = match &self.slots[slot].last_failure {
            Some(reason) => reason.clone(),
            None => halfsync_proxy::control::describe_exit(how),
        };
        let mut rollback = None;
        if gj.rolling_back {
            let msg = format!(
                "group {name}: the previous version failed to start again ({how}); giving up on this group"
            );
            error!("{msg}");
            job.errors.push(msg);
            gj.todo.clear();
            gj.gave_up = true;
        } else {
            let msg = format!(
                "group {name}: a new worker failed to start ({how}); the group keeps running the previous version"
            );
            error!("{msg}");
            job.errors.push(msg);
            gj.rolling_back = true;
            if let Some(old) = gj.old.take() {
                let r = &mut self.groups[g];
                let new_generation = r.generation;
                let target = old.config.workers as usize;
                rollback = Some(old.config.clone());
                r.config = old.config;
                r.plugin = old.plugin;
                r.plugin_version = old.plugin_version;
                r.generation = old.generation;
                // Back to the previous size too: workers the reload added
                // (it raised `workers`) leave, the new generation's first;
                // those it drained (it lowered `workers`) come back. The
                // new generation's workers that stay go back, chain-wise.
                let mut active: Vec<usize> = (0..self.slots.len())
                    .filter(|&i| self.slots[i].group == g && self.slots[i].active())
                    .collect();
                active.sort_by_key(|&i| {
                    let s = &self.slots[i];
                    (s.generation == new_generation, s.label)
                });
                let extra = active.split_off(target.min(active.len()));
                let missing = target - active.len();
                gj.todo = active
                    .into_iter()
                    .filter(|&i| self.slots[i].generation == new_generation)
                    .collect();
                for i in extra {
                    self.drain(i, Cause::Scale);
                }
                for _ in 0..missing {
                    if let Err(e) = self.add_worker(g) {
                        error!("{e:#}");
                    }
                }
            }
        }
        if let Some(old) = rollback {
            self.restore_proxy_group(old);
        }
        self.reload_advance();
    }

    /// A group rolled back: its routes and settings in the proxy go back
    /// too, if they fit beside the other groups' new ones (a command the
    /// new config gave another group cannot go back; then the group keeps
    /// the new routes, and the log says so).
    fn restore_proxy_group(&mut self, old: halfsync_config::Group) {
        let mut candidate = self.config.clone();
        let Some(entry) = candidate.groups.iter_mut().find(|c| c.name == old.name) else {
            return;
        };
        let name = old.name.clone();
        *entry = old;
        let checked = toml::to_string(&candidate)
            .map_err(|e| e.to_string())
            .and_then(|t| {
                Config::from_toml(&t, halfsync_config::Origin::Text).map_err(|e| e.to_string())
            });
        if let Err(why) = checked {
            warn!(
                group = %name,
                "rolled back, but keeps the new routes: its previous ones conflict with the other groups' new ones ({why})"
            );
            return;
        }
        self.config = candidate;
        if let Err(e) = self.reconfigure_proxy() {
            error!("{e}");
        }
    }

    /// Starts the next replacement of every group that has none going;
    /// finishes the job when every group is done.
    pub(crate) fn reload_advance(&mut self) {
        if self.stopping.is_some() {
            // Nothing new starts during a stop.
            self.abandon_reload();
            return;
        }
        let Some(mut job) = self.reload.take() else {
            return;
        };
        // Workers it started that will not become ready by plan (drained
        // by a rollback, gone to spare) are no longer waited for.
        for gj in &mut job.groups {
            let pending = |i: &usize| {
                let s = &self.slots[*i];
                !(s.draining || s.retiring || matches!(s.life, Life::Spare | Life::Stopped))
            };
            gj.adding.retain(pending);
            gj.starting.retain(pending);
        }
        let mut waiting = false;
        for gj in &mut job.groups {
            // Until a replacement is going or none is left to do: the list
            // may run out on workers already being replaced (a recycle's),
            // and the rescan then finds their replacements, which no list
            // had. (Without the second pass a job whose list ended so was
            // done at once, and a recycle's replacement begun just before
            // the reload served the old version after "reload complete".)
            loop {
                // Workers on another generation that no list had (a replacement
                // begun before the reload, ready since): replace them too, so
                // none serves the old version once the job is done.
                if gj.current.is_none() && gj.todo.is_empty() && !gj.gave_up {
                    let (stale, starting) = self.stale_workers(gj.group, &gj.tried);
                    waiting |= starting;
                    if stale.is_empty() {
                        break;
                    }
                    gj.todo.extend(stale);
                }
                while gj.current.is_none() {
                    let Some(old) = gj.todo.pop_front() else {
                        break;
                    };
                    // Already being replaced (a recycle): one replacement at a
                    // time; the rescan comes back to it (or to its successor).
                    if self.being_replaced(old) {
                        continue;
                    }
                    gj.tried.push(old);
                    let s = &self.slots[old];
                    let wanted = self.groups[gj.group].generation;
                    // Dead or leaving meanwhile: its restart (if any) already
                    // uses the group's current settings.
                    if !matches!(s.life, Life::Running { .. })
                        || !s.active()
                        || s.generation == wanted
                    {
                        continue;
                    }
                    match self.replace(old, Cause::Reload) {
                        Ok(new) => gj.current = Some((new, old)),
                        Err(e) => {
                            let msg = format!("group {}: {e:#}", self.groups[gj.group].config.name);
                            error!("{msg}");
                            job.errors.push(msg);
                        }
                    }
                }
                if gj.current.is_some() || gj.gave_up {
                    break;
                }
            }
        }
        if waiting
            || job.groups.iter().any(|gj| {
                gj.current.is_some()
                    || !gj.todo.is_empty()
                    || !gj.adding.is_empty()
                    || !gj.starting.is_empty()
            })
        {
            self.reload = Some(job);
            self.sync_hold();
            return;
        }
        self.reloads.count(if job.errors.is_empty() {
            "ok"
        } else {
            "failed"
        });
        let answer = if job.errors.is_empty() {
            info!(generation = job.generation, "reload complete");
            admin::ok(&format!("reloaded: generation {}", job.generation))
        } else {
            warn!(
                generation = job.generation,
                errors = job.errors.len(),
                "reload finished with errors"
            );
            admin::err(&job.errors.join("; "))
        };
        if let Some(conn) = job.reply_to {
            self.admin.respond(conn, answer);
        }
        self.notify_serving(if job.errors.is_empty() {
            ""
        } else {
            "; the last reload failed (see the log)"
        });
        self.sync_hold();
    }

    /// Group `g`'s running workers that take requests on another
    /// generation than the group's: those ready and not being replaced,
    /// except slots in `skip`; and whether any is still starting.
    fn stale_workers(&self, g: usize, skip: &[usize]) -> (Vec<usize>, bool) {
        let wanted = self.groups[g].generation;
        let mut ready = Vec::new();
        let mut starting = false;
        for (i, s) in self.slots.iter().enumerate() {
            if s.group != g || !s.serves() || s.generation == wanted {
                continue;
            }
            if !s.ready || s.replaces.is_some() || self.being_replaced(i) {
                starting = true;
            } else if !skip.contains(&i) {
                ready.push(i);
            }
        }
        (ready, starting)
    }

    /// Groups with a worker that takes requests on another generation
    /// than the group's: mid-reload (or mid-rollback), the ones whose
    /// moved-in commands must wait (see [`halfsync_proxy::Reconfigure::hold`]).
    pub(crate) fn stale_groups(&self) -> Vec<u32> {
        (0..self.groups.len())
            .filter(|&g| {
                !self.groups[g].retired
                    && self.slots.iter().any(|s| {
                        s.group == g && s.serves() && s.generation != self.groups[g].generation
                    })
            })
            .map(|g| g as u32)
            .collect()
    }

    /// What the proxies should hold: the stale groups while a reload runs
    /// or waits to resume, nothing otherwise (a replacement that could not
    /// even be started leaves a stale worker, which must not hold its
    /// group's moved-in commands for ever).
    pub(crate) fn wanted_hold(&self) -> Vec<u32> {
        if (self.reload.is_some() || self.reload_resume) && self.stopping.is_none() {
            self.stale_groups()
        } else {
            Vec::new()
        }
    }

    /// Tells the proxies when what they hold changed (a group's workers
    /// all run its generation now, a reload ended), and resends the
    /// configuration to a proxy a send did not reach, at most once a second.
    /// Runs every loop turn.
    pub(crate) fn sync_hold(&mut self) {
        let hold = self.wanted_hold();
        let result = if hold != self.hold_sent {
            self.send_config(hold, false)
        } else if self.proxy_missed_config() && std::time::Instant::now() >= self.config_retry_at {
            self.send_config(hold, true)
        } else {
            Ok(())
        };
        match result {
            // Stopping, a proxy may have drained and gone already: nothing
            // is wrong, and nothing will be retried.
            Err(e) if self.stopping.is_some() => tracing::debug!("while stopping: {e}"),
            Err(e) => error!("{e}"),
            Ok(()) => {}
        }
    }
}
