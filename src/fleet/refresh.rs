//! The refresh task, one per process: every `refresh`, one pipelined round trip reports this
//! replica's demand in every budget in force and takes its shares, and writes its true tunnel
//! count of every branch with `max_tunnels` (renewing their expiry, healing lost decrements),
//! and renews this process's hold on its `fleet.name` (finding a live replica under the same
//! name). Redis silent: the last shares hold until the lease runs out, then `fallback_share`
//! of each limit. On shutdown, [`leave`] deletes this replica's fields so the others take its
//! shares, and gives its name back.

use super::link::evalsha;
use super::shares::{self, ask, fraction_ppm, ppm};
use super::{Fleet, scripts, share_key, tunnels_key};
use crate::bandwidth::bucket::Bucket;
use crate::bandwidth::{Demand, Throttles};
use crate::metrics::ThrottleLabels;
use arc_swap::ArcSwap;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// What the refresh task reads from the current snapshot.
pub trait Shared: Send + Sync + 'static {
    fn throttles(&self) -> &Throttles;
    /// Open tunnels of every branch with `max_tunnels`, by name.
    fn tunnel_counts(&self) -> Vec<(&str, u32)>;
}

/// A budget this replica takes part in.
struct Taking {
    labels: ThrottleLabels,
    /// Tunnels counted in the window before the last.
    previous: u64,
    /// Whether Redis gave it a share yet (until then: the fallback share).
    shared: bool,
    /// Whether this replica has a field in the budget's hash (it is not idle there).
    asking: bool,
    /// When Redis last answered for it (on a cluster, its slot's primary).
    last_ok: Option<Instant>,
}

/// Runs until aborted, on the snapshot current at each refresh.
pub async fn run<G: Shared>(fleet: Arc<Fleet>, current: Arc<ArcSwap<G>>) {
    let mut every = tokio::time::interval(fleet.settings.refresh);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut taking: HashMap<String, Taking> = HashMap::new();
    let mut counted: HashMap<String, u32> = HashMap::new();
    let mut last = Instant::now();
    loop {
        every.tick().await;
        let snapshot = current.load_full();
        let window = last.elapsed();
        last = Instant::now();
        refresh(&fleet, &*snapshot, window, &mut taking, &mut counted).await;
    }
}

async fn refresh<G: Shared>(
    fleet: &Fleet,
    shared: &G,
    window: Duration,
    taking: &mut HashMap<String, Taking>,
    counted: &mut HashMap<String, u32>,
) {
    let throttles = shared.throttles();
    let settings = &fleet.settings;
    let lease_ms = settings.lease.as_millis() as u64;
    let fallback = fraction_ppm(settings.fallback_share);
    let now = throttles.now();
    let mut pipe = super::link::Batch::new();
    let mut asked: Vec<(&Arc<Bucket>, u64, String)> = Vec::new();
    let mut kept: HashSet<String> = HashSet::new();
    for budget in throttles.budgets() {
        let key = share_key(budget.scope, budget.name, budget.direction);
        let Some(limit) = budget.bucket.configured() else {
            // Not in force: when it comes into force it starts at the fallback share, until
            // the next refresh takes its real one.
            budget.bucket.set_share(fallback, now);
            if let Some(gone) = taking.remove(&key) {
                fleet.metrics.share.remove(&gone.labels);
            }
            continue;
        };
        let demand = budget.bucket.take_demand();
        let entry = taking.entry(key.clone()).or_insert_with(|| Taking {
            labels: ThrottleLabels {
                scope: budget.scope.as_str(),
                budget: budget.name.to_owned(),
                direction: budget.direction.as_str(),
            },
            previous: 0,
            shared: false,
            asking: false,
            last_ok: None,
        });
        let previous = std::mem::replace(&mut entry.previous, demand.tunnels);
        let idle = demand == Demand::default() && previous == 0;
        if idle {
            // Nothing moved here for two windows: no call; the floor lets a new tunnel start
            // at once, and its demand is reported at the next refresh. A field left from
            // before goes now, so the others take the whole budget.
            if std::mem::take(&mut entry.asking) {
                pipe.cmd("HDEL").arg(&key).arg(&settings.name).ignore();
            }
            entry.shared = false;
            let rate = budget
                .bucket
                .set_share(ppm(shares::floor(limit), limit), now);
            fleet
                .metrics
                .share
                .get_or_create(&entry.labels)
                .set(rate as i64);
            kept.insert(key);
            continue;
        }
        entry.asking = true;
        let (wants, weight) = ask(limit, demand, previous, window);
        let mut cmd = evalsha(&scripts::SHARE, &key);
        cmd.arg(&settings.name)
            .arg(wants)
            .arg(format!("{weight}"))
            .arg(limit)
            .arg(lease_ms);
        pipe.add_command(cmd);
        kept.insert(key.clone());
        asked.push((budget.bucket, limit, key));
    }
    // Budgets no longer in force, or dropped by a reload.
    taking.retain(|key, t| {
        let keep = kept.contains(key);
        if !keep {
            fleet.metrics.share.remove(&t.labels);
        }
        keep
    });
    let counts = shared.tunnel_counts();
    let field = fleet.count_field();
    let mut writing = Vec::new();
    for (branch, count) in counts {
        // Counts of 0 are written once (the field goes), then no more.
        if count == 0 && counted.get(branch).is_none_or(|&c| c == 0) {
            continue;
        }
        let mut cmd = evalsha(&scripts::SET_TUNNELS, &tunnels_key(branch));
        cmd.arg(&*field).arg(count).arg(lease_ms);
        pipe.add_command(cmd);
        writing.push((branch.to_owned(), count));
    }
    // Last, so the answers before it line up with `asked`; it also tells whether Redis
    // answers when there is nothing to share.
    pipe.add_command(fleet.claim_command());
    // On a cluster a primary away fails only the calls of its slots: the others count.
    let (answers, failure) = fleet.link.query_each(&pipe).await;
    fleet.mark(failure.as_ref().map_or(Ok(()), Err));
    if failure.is_some() {
        fleet.metrics.refresh_failures.inc();
    }
    let int = |answer: &Option<redis::Value>| match answer {
        Some(redis::Value::Int(n)) => Some(*n),
        _ => None,
    };
    if let Some(held) = answers.last().and_then(int) {
        fleet.claimed(held == 1);
    }
    let shares: Vec<Option<i64>> = answers.iter().take(asked.len()).map(int).collect();
    take_shares(fleet, taking, &asked, &shares, fallback, throttles.now());
    if answers.iter().all(Option::is_none) {
        return;
    }
    for ((branch, count), answer) in writing.into_iter().zip(answers.iter().skip(asked.len())) {
        if answer.is_some() {
            counted.insert(branch, count);
        }
    }
    let mut written = fleet.written.lock().unwrap_or_else(|e| e.into_inner());
    written.clear();
    written.extend(asked.iter().map(|(_, _, key)| key.clone()));
    written.extend(
        counted
            .iter()
            .filter(|(_, c)| **c > 0)
            .map(|(branch, _)| tunnels_key(branch)),
    );
}

/// After a binary upgrade, in the old process until it exits: its draining tunnels count
/// under a field of their own (`NAME@upgrading-PID`, renewed every refresh, lapsing a lease
/// after the process is gone), while the new process writes its counts under the name. Both
/// count towards each branch's `max_tunnels`; neither overwrites the other. Shares are left
/// to the new process: the old one's throttled tunnels keep theirs for a lease, then take the
/// fallback share.
pub async fn drain_counts<G: Shared>(fleet: Arc<Fleet>, current: Arc<ArcSwap<G>>) {
    let field = Arc::new(format!(
        "{}@upgrading-{}",
        fleet.settings.name,
        std::process::id()
    ));
    fleet.count_field.store(field.clone());
    let lease_ms = fleet.settings.lease.as_millis() as u64;
    let mut every = tokio::time::interval(fleet.settings.refresh);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let snapshot = current.load_full();
        let mut pipe = super::link::Batch::new();
        for (branch, count) in snapshot.tunnel_counts() {
            let mut cmd = evalsha(&scripts::SET_TUNNELS, &tunnels_key(branch));
            cmd.arg(&*field).arg(count).arg(lease_ms);
            pipe.add_command(cmd);
        }
        let _ = fleet.link.query_each(&pipe).await;
    }
}

/// Sets each asked budget's bucket to the share Redis answered, or, where it did not answer,
/// keeps the share taken before for its lease, then (and for a budget never shared) the
/// fallback share.
fn take_shares(
    fleet: &Fleet,
    taking: &mut HashMap<String, Taking>,
    asked: &[(&Arc<Bucket>, u64, String)],
    shares: &[Option<i64>],
    fallback: u64,
    now: u64,
) {
    let lease = fleet.settings.lease;
    for ((bucket, limit, key), share) in asked.iter().zip(shares) {
        let Some(t) = taking.get_mut(key) else {
            continue;
        };
        let lapsed = t.last_ok.is_none_or(|at| at.elapsed() >= lease);
        let rate = match share {
            Some(share) => {
                // Back after longer than a lease (an outage, a failover): every entry had
                // lapsed, so the first replicas to report would take the others' parts until
                // those report too. For this one refresh no share goes above the fallback.
                let back = t.shared && lapsed;
                t.shared = true;
                t.last_ok = Some(Instant::now());
                let share = ppm((*share).max(0) as u64, *limit);
                bucket.set_share(if back { share.min(fallback) } else { share }, now)
            }
            None if lapsed || !t.shared => bucket.set_share(fallback, now),
            None => continue,
        };
        fleet
            .metrics
            .share
            .get_or_create(&t.labels)
            .set(rate as i64);
    }
}

/// Shutdown: this replica's fields and its hold on its name go at once (the others take its
/// shares at their next refresh; a replacement may start under the name), and its remaining
/// tunnels drain at the floor of each budget. Bounded by the refresh interval.
pub async fn leave<G: Shared>(fleet: &Fleet, shared: &G) {
    let throttles = shared.throttles();
    let now = throttles.now();
    for budget in throttles.budgets() {
        if let Some(limit) = budget.bucket.configured() {
            budget
                .bucket
                .set_share(ppm(shares::floor(limit), limit), now);
        }
    }
    let keys = std::mem::take(&mut *fleet.written.lock().unwrap_or_else(|e| e.into_inner()));
    let mut pipe = super::link::Batch::new();
    for key in &keys {
        pipe.cmd("HDEL").arg(key).arg(&fleet.settings.name).ignore();
    }
    pipe.add_command(fleet.release_command()).ignore();
    let result = fleet.link.query::<()>(&pipe).await;
    match &result {
        Ok(()) => tracing::info!(
            keys = keys.len(),
            "fleet: this replica's shares and counts given back"
        ),
        Err(error) => tracing::warn!(
            %error,
            "fleet: could not give shares back; they lapse with the lease"
        ),
    }
}
