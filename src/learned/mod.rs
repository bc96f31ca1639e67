//! Learned destinations: per branch and rule, the exact names (and ports) a branch used under
//! the rule's wildcards, with when they were first and last used and how often. Under
//! `learn = "record"` a branch's first tunnel to a name is flagged (`new_destination`, a
//! metric); under `"enforce"` only learned names pass. One store per process, shared by every
//! snapshot: kept in `state_dir/learned.json` ([`state_file`]), saved by [`keep_saved`], and in
//! fleet mode shared through Redis (the fleet's `learned` module, with [`shared`] its local
//! side: stamps, tombstones, what is not in Redis yet). A tunnel costs one lock and three hash
//! probes when it opens (`enforce` asks once more before the dial), and only under a rule that
//! learns.

pub mod metrics;
pub mod ops;
pub mod shared;
pub mod state_file;

use crate::policy::Learn;
use metrics::LearnedMetrics;
use shared::{Place, Tomb};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// One destination of a branch under a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub port: u16,
    /// Unix seconds.
    pub first_seen: i64,
    pub last_seen: i64,
    /// Tunnels opened to it (on this replica, since it was learned).
    pub count: u64,
    /// Added by an operator (`learned approve`) rather than by a tunnel.
    pub approved: bool,
    /// Fleet mode: Redis's time (ms) of the change this state comes from; 0 when Redis never
    /// stamped it (learned without the fleet), which any stamped change outranks.
    pub stamp: i64,
    /// Fleet mode: learned or approved here and not stamped by Redis yet; the change's number,
    /// so Redis's answer to an older change never clears a newer one.
    pub pending: Option<u64>,
}

/// A destination with its place, as listed and saved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub branch: String,
    pub rule: String,
    pub host: String,
    pub seen: Seen,
}

/// What noting a tunnel found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Noted {
    /// Learned before: counted.
    Known,
    /// The branch's first tunnel to it: learned now (record).
    New,
    /// New, but the set is full: not learned (record lets it pass, logged).
    Full,
    /// Not learned and not learnable here (enforce; forgotten since the request was planned).
    Unknown,
}

/// One branch's destinations under one rule: host, then its ports.
#[derive(Default, Debug)]
struct Set {
    hosts: HashMap<Box<str>, Vec<Seen>>,
    /// A warning about the set being full was logged (once until it has room again).
    full_logged: bool,
}

impl Set {
    /// Destinations (host and port pairs) held; counted only when a destination is added or
    /// listed, never per tunnel.
    fn len(&self) -> usize {
        self.hosts.values().map(Vec::len).sum()
    }

    fn get_mut(&mut self, host: &str, port: u16) -> Option<&mut Seen> {
        self.hosts
            .get_mut(host)?
            .iter_mut()
            .find(|s| s.port == port)
    }

    fn insert(&mut self, host: &str, seen: Seen) {
        self.hosts.entry(host.into()).or_default().push(seen);
    }

    /// Keeps the destinations `keep` says yes to; how many went.
    fn retain(&mut self, mut keep: impl FnMut(&str, &Seen) -> bool) -> usize {
        let before = self.len();
        self.hosts.retain(|host, ports| {
            ports.retain(|seen| keep(host, seen));
            !ports.is_empty()
        });
        let removed = before - self.len();
        if removed > 0 {
            self.full_logged = false;
        }
        removed
    }
}

#[derive(Default)]
struct State {
    /// Branch, then rule.
    sets: HashMap<String, HashMap<String, Set>>,
    /// `state_dir/learned.json`, once a snapshot with a learning rule opened the store.
    file: Option<PathBuf>,
    /// Changed since the last save.
    dirty: bool,
    /// Fleet mode (`[fleet]` when the store was opened): changes are kept for Redis.
    fleet: bool,
    /// Fleet mode: forgotten destinations, kept (and saved) as long as Redis keeps their
    /// tombstones, so a replica can put them back into an emptied Redis.
    tombstones: HashMap<Place, Tomb>,
    /// Fleet mode: Redis's time (ms) of this replica's last full read of the fleet's sets.
    synced: Option<i64>,
    /// The last local change's number (see [`Seen::pending`]).
    changes: u64,
    /// A change may be pending: set by every change, cleared when a look finds none (so a
    /// refresh with nothing to send does not walk the sets under the data path's lock).
    maybe_pending: bool,
}

impl State {
    fn set_mut(&mut self, branch: &str, rule: &str) -> &mut Set {
        if !self.sets.contains_key(branch) {
            self.sets.insert(branch.to_owned(), HashMap::new());
        }
        let rules = self.sets.get_mut(branch).expect("inserted above");
        if !rules.contains_key(rule) {
            rules.insert(rule.to_owned(), Set::default());
        }
        rules.get_mut(rule).expect("inserted above")
    }

    fn set(&self, branch: &str, rule: &str) -> Option<&Set> {
        self.sets.get(branch)?.get(rule)
    }

    /// A number for a change made here, in fleet mode (none without: nothing to share).
    fn change(&mut self) -> Option<u64> {
        self.fleet.then(|| self.next_change())
    }

    fn next_change(&mut self) -> u64 {
        self.changes += 1;
        self.maybe_pending = true;
        self.changes
    }

    /// Adds `row` unless its destination is held already; whether it was added. A pending
    /// change (from a file) gets a number of this process.
    fn add(&mut self, mut row: Row) -> bool {
        if row.seen.pending.is_some() {
            row.seen.pending = Some(self.next_change());
        }
        let set = self.set_mut(&row.branch, &row.rule);
        let new = set.get_mut(&row.host, row.seen.port).is_none();
        if new {
            set.insert(&row.host, row.seen);
        }
        new
    }

    /// Every destination `pick` says yes to, as rows.
    fn rows(&self, pick: impl Fn(&str, &Seen) -> bool) -> Vec<Row> {
        let mut rows = Vec::new();
        for (branch, rules) in &self.sets {
            for (rule, set) in rules {
                for (host, ports) in &set.hosts {
                    for seen in ports.iter().filter(|s| pick(branch, s)) {
                        rows.push(Row {
                            branch: branch.clone(),
                            rule: rule.clone(),
                            host: host.to_string(),
                            seen: seen.clone(),
                        });
                    }
                }
            }
        }
        rows
    }
}

/// The process's learned destinations.
pub struct Learned {
    state: Mutex<State>,
    /// Membership changed: save soon.
    changed: tokio::sync::Notify,
    /// Held while this process owns `state_dir` (the gateway, not `explain` or the CLI).
    lock: Mutex<Option<std::fs::File>>,
    pub metrics: LearnedMetrics,
}

/// The state file's name under `state_dir`.
pub const FILE_NAME: &str = "learned.json";
/// Taken (`flock`) by the gateway that owns `state_dir`.
pub const LOCK_NAME: &str = "learned.lock";

/// Unix seconds now.
pub fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

impl Learned {
    pub fn new(metrics: LearnedMetrics) -> Self {
        Self {
            state: Mutex::default(),
            changed: tokio::sync::Notify::new(),
            lock: Mutex::new(None),
            metrics,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Loads `state_dir/learned.json` the first time a configuration with a learning rule is
    /// opened (at start, or at the reload that adds one). `state_dir` moves only at restart.
    pub fn open(&self, config: &crate::config::Config) -> Result<(), String> {
        if !config.policy.rules.iter().any(|r| r.learn != Learn::Off) {
            return Ok(());
        }
        let path = config.state_dir.join(FILE_NAME);
        let mut state = self.state();
        match &state.file {
            Some(file) if *file != path => {
                tracing::warn!(
                    state_dir = %config.state_dir.display(),
                    in_use = %file.display(),
                    "state_dir moves only at restart"
                );
                return Ok(());
            }
            Some(_) => return Ok(()),
            None => {}
        }
        let stored = state_file::load(&path)?;
        state.file = Some(path);
        state.fleet = config.fleet.is_some();
        drop(state);
        self.insert(stored);
        Ok(())
    }

    /// Fleet mode or not, for a store not opened from a configuration (the command line's
    /// edits of the file): in fleet mode a forget is kept for Redis.
    pub fn fleet_mode(&self, on: bool) {
        self.state().fleet = on;
    }

    /// Adds what a file holds to the sets; destinations held already stay as they are.
    pub fn insert(&self, stored: state_file::Stored) {
        let mut state = self.state();
        for row in stored.rows {
            state.add(row);
        }
        for (place, mut tomb) in stored.forgotten {
            if tomb.pending.is_some() {
                tomb.pending = Some(state.next_change());
            }
            state.tombstones.entry(place).or_insert(tomb);
        }
        state.synced = state.synced.max(stored.synced);
        self.metrics.count_all(&state.sets);
    }

    /// Takes `state_dir`'s lock for this process (the gateway's): a second gateway on the same
    /// directory, or the CLI editing the file, would lose the other's changes.
    pub fn claim(&self) -> Result<(), String> {
        let Some(file) = self.state().file.clone() else {
            return Ok(());
        };
        let mut lock = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if lock.is_some() {
            return Ok(());
        }
        let dir = file.parent().unwrap_or(Path::new("."));
        *lock = Some(state_file::lock(dir)?);
        Ok(())
    }

    /// Saves what changed and lets `state_dir`'s lock go (the old process of a binary upgrade,
    /// once it stopped accepting: nothing new is learned in it after that), so the new process
    /// can claim the directory ([`Learned::take_over`]).
    pub fn release(&self) -> std::io::Result<()> {
        let saved = self.save();
        *self.lock.lock().unwrap_or_else(|e| e.into_inner()) = None;
        saved
    }

    /// Claims `state_dir` after the old process of a binary upgrade released it, then adds
    /// what the file holds (what the old process learned up to its last save) to the sets;
    /// `Ok(false)` while the old process still holds the lock.
    pub fn take_over(&self) -> Result<bool, String> {
        let Some(file) = self.state().file.clone() else {
            return Ok(true);
        };
        if self.claim().is_err() {
            return Ok(false);
        }
        let stored = state_file::load(&file)?;
        self.insert(stored);
        self.state().dirty = true;
        self.changed.notify_one();
        Ok(true)
    }

    /// Whether a configuration with a rule that learns opened the store.
    pub fn in_use(&self) -> bool {
        self.state().file.is_some()
    }

    /// Whether `branch` learned `host:port` under `rule`.
    pub fn knows(&self, branch: &str, rule: &str, host: &str, port: u16) -> bool {
        let state = self.state();
        state.set(branch, rule).is_some_and(|set| {
            set.hosts
                .get(host)
                .is_some_and(|ports| ports.iter().any(|s| s.port == port))
        })
    }

    /// A tunnel of `branch` to `host:port` opened under `rule` (learning in `mode`): counted,
    /// and in `record` learned when new and the set has room (`limit`).
    pub fn note(
        &self,
        (branch, rule): (&str, &str),
        host: &str,
        port: u16,
        mode: Learn,
        limit: usize,
    ) -> Noted {
        let now = now();
        let mut state = self.state();
        state.dirty = true;
        let set = state.set_mut(branch, rule);
        if let Some(seen) = set.get_mut(host, port) {
            seen.last_seen = now;
            seen.count += 1;
            return Noted::Known;
        }
        if mode != Learn::Record {
            return Noted::Unknown;
        }
        let len = set.len();
        let change = if len < limit { state.change() } else { None };
        let set = state.set_mut(branch, rule);
        if len >= limit {
            if !std::mem::replace(&mut set.full_logged, true) {
                tracing::warn!(
                    branch,
                    rule,
                    limit,
                    "learned destinations full for this branch and rule: new names pass (record) but are not learned; forget some or raise policy.learn_limit"
                );
            }
            drop(state);
            self.metrics.new_destination(branch, rule);
            return Noted::Full;
        }
        set.insert(host, Seen::new(port, now, false, change));
        drop(state);
        self.metrics.new_destination(branch, rule);
        self.metrics.set_len(branch, rule, len + 1);
        self.changed.notify_one();
        Noted::New
    }

    /// An operator's approval: `host:port` is learned for `branch` under `rule` (true when it
    /// was not before). Refused when the set is full.
    pub fn approve(
        &self,
        branch: &str,
        rule: &str,
        host: &str,
        port: u16,
        limit: usize,
    ) -> Result<bool, String> {
        let mut state = self.state();
        let change = state.change();
        let set = state.set_mut(branch, rule);
        if let Some(seen) = set.get_mut(host, port) {
            // Approved again: a change of its own, which outranks whatever the fleet did before.
            seen.approved = true;
            seen.pending = change.or(seen.pending);
            state.dirty = true;
            return Ok(false);
        }
        let len = set.len();
        if len >= limit {
            return Err(format!(
                "branch {branch} holds {len} destinations under rule {rule}, the limit (policy.learn_limit): forget one first"
            ));
        }
        set.insert(host, Seen::new(port, now(), true, change));
        state.dirty = true;
        drop(state);
        self.metrics.set_len(branch, rule, len + 1);
        self.changed.notify_one();
        Ok(true)
    }

    /// Forgets `host` (one port, or all) for `branch` under every rule, or only `rule`; how
    /// many destinations went.
    pub fn forget(&self, branch: &str, rule: Option<&str>, host: &str, port: Option<u16>) -> usize {
        let mut state = self.state();
        let fleet = state.fleet;
        let Some(rules) = state.sets.get_mut(branch) else {
            return 0;
        };
        let mut removed = 0;
        let mut lens = Vec::new();
        let mut gone_places = Vec::new();
        for (name, set) in rules.iter_mut() {
            if rule.is_some_and(|r| r != name) {
                continue;
            }
            let n = set.retain(|h, seen| {
                let gone = h == host && port.is_none_or(|p| p == seen.port);
                // Fleet mode: a tombstone carries the forget to Redis, where it outranks every
                // older state of the destination, on whichever replica that state lives.
                if gone && fleet {
                    gone_places.push(Place::new(branch, name, host, seen.port));
                }
                !gone
            });
            if n > 0 {
                removed += n;
                lens.push((name.clone(), set.len()));
            }
        }
        if removed > 0 {
            state.dirty = true;
        }
        for place in gone_places {
            let pending = state.change();
            state.tombstones.insert(place, Tomb { stamp: 0, pending });
        }
        drop(state);
        for (name, len) in lens {
            self.metrics.set_len(branch, &name, len);
        }
        if removed > 0 {
            self.changed.notify_one();
        }
        removed
    }

    /// Every destination (of one branch), sorted by branch, rule, host and port.
    pub fn rows(&self, branch: Option<&str>) -> Vec<Row> {
        let mut rows = self
            .state()
            .rows(|b, _| branch.is_none_or(|want| want == b));
        sort_rows(&mut rows);
        rows
    }

    /// What the state file holds: every destination, and in fleet mode the tombstones and when
    /// the fleet was last read.
    pub fn stored(&self) -> state_file::Stored {
        // One lock for both: a forget between them would save the destination and its tombstone.
        let state = self.state();
        let mut rows = state.rows(|_, _| true);
        sort_rows(&mut rows);
        let mut forgotten: Vec<(Place, Tomb)> = state
            .tombstones
            .iter()
            .map(|(place, tomb)| (place.clone(), *tomb))
            .collect();
        forgotten.sort_by(|a, b| a.0.cmp(&b.0));
        state_file::Stored {
            rows,
            forgotten,
            synced: state.synced,
        }
    }

    /// Writes the file now when anything changed since the last save (write, fsync, rename);
    /// only while this process holds `state_dir`'s lock ([`Learned::claim`]).
    pub fn save(&self) -> std::io::Result<()> {
        if self
            .lock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
        {
            return Ok(());
        }
        let (file, stored) = {
            let mut state = self.state();
            let Some(file) = state.file.clone() else {
                return Ok(());
            };
            if !std::mem::take(&mut state.dirty) {
                return Ok(());
            }
            drop(state);
            (file, self.stored())
        };
        let saved = state_file::save(&file, &stored);
        if saved.is_err() {
            self.state().dirty = true;
        }
        saved
    }
}

/// By branch, rule, host and port (a diff of the file shows what a branch learned).
fn sort_rows(rows: &mut [Row]) {
    rows.sort_by(|a, b| {
        (&a.branch, &a.rule, &a.host, a.seen.port).cmp(&(&b.branch, &b.rule, &b.host, b.seen.port))
    });
}

impl Seen {
    fn new(port: u16, now: i64, approved: bool, pending: Option<u64>) -> Self {
        Self {
            port,
            first_seen: now,
            last_seen: now,
            count: u64::from(!approved),
            approved,
            stamp: 0,
            pending,
        }
    }
}

/// Longest a learned destination waits to be saved after it was learned (changes come in
/// bursts: a branch's first sync after a rollout).
const SAVE_DELAY: Duration = Duration::from_secs(1);
/// Counts and last-seen times are saved this often.
const SAVE_EVERY: Duration = Duration::from_secs(60);

/// Saves the store after membership changes (within [`SAVE_DELAY`]) and every
/// [`SAVE_EVERY`]; the server runs it, and saves once more after the drain.
pub async fn keep_saved(learned: std::sync::Arc<Learned>) {
    loop {
        tokio::select! {
            _ = learned.changed.notified() => tokio::time::sleep(SAVE_DELAY).await,
            _ = tokio::time::sleep(SAVE_EVERY) => {}
        }
        save_logged(&learned).await;
    }
}

/// Saves on a blocking thread; a failure is logged (and retried at the next save).
pub async fn save_logged(learned: &std::sync::Arc<Learned>) {
    let store = learned.clone();
    match tokio::task::spawn_blocking(move || store.save()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "cannot save learned destinations"),
        Err(error) => tracing::warn!(%error, "saving learned destinations failed"),
    }
}

#[cfg(test)]
mod tests;
