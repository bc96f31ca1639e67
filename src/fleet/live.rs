//! The live view and control across the fleet. Every second, each replica writes its
//! per-branch summary (open tunnels, rates) to a hash that expires after three periods and
//! notes itself in an index, and reads the control stream for actions other replicas sent
//! (close by filter, hold, release), applying each once. Holds are also kept in a hash, so a
//! replica that starts later applies the holds in force. All keys share one hash tag
//! (`{live}`): every call touches one slot. Redis down: local actions work, fleet actions fail
//! with the reason, and nothing is closed by a guess.

use super::Fleet;
use crate::end::End;
use crate::live::fleet::Action;
use crate::live::{Hold, Registry, view};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

const STREAM: &str = "portcullis:{live}:control";
const HOLDS: &str = "portcullis:{live}:holds";
const REPLICAS: &str = "portcullis:{live}:replicas";
/// Entries the control stream keeps (about; older ones are trimmed).
const STREAM_LENGTH: usize = 1000;
/// How often a replica publishes its summary and reads the control stream (or every
/// `fleet.refresh`, when longer).
const PERIOD: std::time::Duration = std::time::Duration::from_secs(1);
/// Actions applied per period at most (the rest at the next).
const READ_COUNT: usize = 100;

fn summary_key(replica: &str) -> String {
    format!("portcullis:{{live}}:summary:{replica}")
}

impl Fleet {
    /// Sends `action` to every replica; a hold is also written to the holds hash, before the
    /// stream entry (a replica starting reads the stream's end before the hash: it finds the
    /// hold in one or the other, see [`start`]).
    pub async fn send_action(&self, action: &Action) -> Result<(), String> {
        let mut pipe = super::link::Batch::new();
        if let Action::Hold(branch, hold) = action {
            match hold {
                Some(hold) => pipe.cmd("HSET").arg(HOLDS).arg(branch).arg(hold),
                None => pipe.cmd("HDEL").arg(HOLDS).arg(branch),
            };
        }
        let add = pipe
            .cmd("XADD")
            .arg(STREAM)
            .arg("MAXLEN")
            .arg("~")
            .arg(STREAM_LENGTH)
            .arg("*")
            .arg("from")
            .arg(&self.instance);
        for (field, value) in action.fields() {
            add.arg(field).arg(value);
        }
        self.link
            .query::<redis::Value>(&pipe)
            .await
            .map(drop)
            .map_err(|e| format!("Redis ({}): {e}", self.settings.redis.shown))
    }

    /// Open tunnels and rates per branch over every replica that published in the last three
    /// periods.
    pub async fn branch_summaries(&self) -> Result<serde_json::Value, String> {
        let failed =
            |e: super::link::Failure| format!("Redis ({}): {e}", self.settings.redis.shown);
        let now = now_ms();
        let mut pipe = super::link::Batch::new();
        pipe.cmd("ZRANGEBYSCORE").arg(REPLICAS).arg(now).arg("+inf");
        let (replicas,): (Vec<String>,) = self.link.query(&pipe).await.map_err(failed)?;
        let mut pipe = super::link::Batch::new();
        for replica in &replicas {
            pipe.cmd("HGETALL").arg(summary_key(replica));
        }
        let summaries: Vec<HashMap<String, String>> = if replicas.is_empty() {
            Vec::new()
        } else {
            self.link.query(&pipe).await.map_err(failed)?
        };
        let mut by_branch: BTreeMap<String, (u64, u64, u64, u64)> = BTreeMap::new();
        for summary in &summaries {
            for (branch, figures) in summary {
                let mut parts = figures.split(' ').map(|n| n.parse::<u64>().unwrap_or(0));
                let entry = by_branch.entry(branch.clone()).or_default();
                entry.0 += parts.next().unwrap_or(0);
                entry.1 += parts.next().unwrap_or(0);
                entry.2 += parts.next().unwrap_or(0);
                entry.3 += 1;
            }
        }
        let mut rows: Vec<_> = by_branch.into_iter().collect();
        rows.sort_by_key(|(_, (tunnels, up, down, _))| std::cmp::Reverse((up + down, *tunnels)));
        let rows: Vec<serde_json::Value> = rows
            .into_iter()
            .map(|(branch, (tunnels, up, down, replicas))| {
                json!({"branch": branch, "tunnels": tunnels, "rate_up": up, "rate_down": down, "replicas": replicas})
            })
            .collect();
        Ok(json!({ "replicas": replicas, "branches": rows }))
    }
}

/// This replica's side of the fleet's live view, until aborted.
pub async fn run(fleet: Arc<Fleet>, registry: Arc<Registry>) {
    // Rates are measured over a second: a summary more often would say nothing new.
    let mut every = tokio::time::interval(PERIOD.max(fleet.settings.refresh));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Actions are read from after the last entry when this replica first reached Redis (and
    // the holds in force taken from their hash then).
    let mut read_from: Option<String> = None;
    loop {
        every.tick().await;
        if read_from.is_none() {
            read_from = start(&fleet, &registry).await;
        }
        publish(&fleet, &registry).await;
        if let Some(from) = &mut read_from {
            apply_new_actions(&fleet, &registry, from).await;
        }
    }
}

/// The holds in force from Redis, and the stream's last id; `None` while Redis is silent.
/// The stream's end is read before the hash (another replica writes the hash before the
/// stream): a hold sent meanwhile is in the hash or after that end, never in neither.
async fn start(fleet: &Fleet, registry: &Arc<Registry>) -> Option<String> {
    let mut pipe = super::link::Batch::new();
    pipe.cmd("XREVRANGE")
        .arg(STREAM)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1);
    pipe.cmd("HGETALL").arg(HOLDS);
    type Entries = Vec<(String, HashMap<String, String>)>;
    let (last, holds): (Entries, HashMap<String, String>) = fleet.link.query(&pipe).await.ok()?;
    crate::live::fleet::take_holds(registry, holds, "fleet");
    Some(
        last.first()
            .map_or_else(|| "0-0".to_owned(), |(id, _)| id.clone()),
    )
}

/// Writes this replica's per-branch summary (replacing the last) and notes it in the index.
async fn publish(fleet: &Fleet, registry: &Registry) {
    let refresh_ms = PERIOD.max(fleet.settings.refresh).as_millis() as u64;
    let key = summary_key(&fleet.settings.name);
    let mut pipe = super::link::Batch::new();
    pipe.cmd("DEL").arg(&key).ignore();
    let figures = view::figures(registry);
    if !figures.is_empty() {
        let set = pipe.cmd("HSET").arg(&key);
        for (branch, f) in &figures {
            set.arg(branch)
                .arg(format!("{} {} {}", f.tunnels, f.rate_up, f.rate_down));
        }
        set.ignore();
        pipe.cmd("PEXPIRE").arg(&key).arg(3 * refresh_ms).ignore();
    }
    let now = now_ms();
    pipe.cmd("ZADD")
        .arg(REPLICAS)
        .arg(now + 3 * refresh_ms)
        .arg(&fleet.settings.name)
        .ignore();
    pipe.cmd("ZREMRANGEBYSCORE")
        .arg(REPLICAS)
        .arg("-inf")
        .arg(now)
        .ignore();
    let _ = fleet.link.query::<()>(&pipe).await;
}

/// Applies the actions other replicas sent since `from` (moved past each one read).
async fn apply_new_actions(fleet: &Fleet, registry: &Arc<Registry>, from: &mut String) {
    let mut pipe = super::link::Batch::new();
    pipe.cmd("XRANGE")
        .arg(STREAM)
        .arg(format!("({from}"))
        .arg("+")
        .arg("COUNT")
        .arg(READ_COUNT);
    type Entries = Vec<(String, HashMap<String, String>)>;
    let Ok((entries,)) = fleet.link.query::<(Entries,)>(&pipe).await else {
        return;
    };
    for (id, fields) in entries {
        *from = id;
        if fields.get("from") == Some(&fleet.instance) {
            continue;
        }
        match Action::from_fields(|name| fields.get(name).cloned()) {
            Ok(action) => apply(registry, action),
            Err(why) => {
                tracing::warn!(%why, "fleet: skipped a control message that does not parse")
            }
        }
    }
}

fn apply(registry: &Arc<Registry>, action: Action) {
    match action {
        Action::Close(filter) => {
            let closed = registry.close(&filter, End::ClosedByOperator).len();
            tracing::info!(
                target: crate::access_log::AUDIT_TARGET,
                who = "fleet",
                action = "close",
                filter = filter.to_query(),
                tunnels = closed,
                "operator action"
            );
        }
        Action::Hold(branch, wire) => {
            let hold = wire.as_deref().and_then(Hold::from_wire);
            let (_, closed) = registry.hold(&branch, hold);
            tracing::info!(
                target: crate::access_log::AUDIT_TARGET,
                who = "fleet",
                action = hold.map_or("release", |h| h.as_str()),
                branch,
                tunnels = closed,
                "operator action"
            );
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
