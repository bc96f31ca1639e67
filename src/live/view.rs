//! The registry as JSON for `GET /tunnels` and `GET /branches` (the command line and `top` read
//! the same): one object per tunnel, one per branch with its tunnels, rates, limits in force and
//! hold.

use super::{Hold, IdentifiedBy, Registry, Tunnel};
use crate::bandwidth::Throttles;
use crate::bandwidth::schedule::Direction;
use crate::config::{Config, UNASSIGNED};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

/// One tunnel as `GET /tunnels` lists it.
pub fn tunnel(t: &Tunnel, (rate_up, rate_down): (u64, u64), now: Instant) -> Value {
    let (bytes_up, bytes_down) = t.live.bytes();
    let done = t.live.done();
    let state = if t.live.stopped() {
        "closing"
    } else if done != 0 {
        "half-closed"
    } else {
        "open"
    };
    let mut row = json!({
        "id": t.id,
        "started": t.started(now).to_string(),
        "age_s": t.age(now).as_secs_f64().round() as u64,
        "branch": &*t.branch,
        "identified_by": t.identified.as_str(),
        "client": t.client.to_string(),
        "target": &*t.target,
        "dialled": t.dialled.map(|a| a.to_string()),
        "egress": t.egress.as_deref(),
        "parent": t.parent.as_deref(),
        "rule": t.rule.as_deref(),
        "category": &*t.category,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "rate_up": rate_up,
        "rate_down": rate_down,
        "throttle_wait_s": (t.live.waited().as_secs_f64() * 1000.0).round() / 1000.0,
        "state": state,
    });
    match &t.identified {
        IdentifiedBy::User(user) => row["user"] = json!(user),
        IdentifiedBy::Certificate(name) => row["certificate"] = json!(name),
        _ => {}
    }
    row
}

/// `GET /tunnels`: the selected tunnels, as the filter sorts them.
pub fn tunnels(selected: &[(Arc<Tunnel>, (u64, u64))], open: usize) -> Value {
    let now = Instant::now();
    let rows: Vec<Value> = selected.iter().map(|(t, r)| tunnel(t, *r, now)).collect();
    json!({ "open": open, "listed": rows.len(), "tunnels": rows })
}

/// One branch's figures for `GET /branches` (and the fleet summary).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BranchFigures {
    pub tunnels: u64,
    pub rate_up: u64,
    pub rate_down: u64,
}

/// Open tunnels and rates per branch, from the registry.
pub fn figures(registry: &Registry) -> BTreeMap<String, BranchFigures> {
    let now = Instant::now();
    let mut by_branch: BTreeMap<String, BranchFigures> = BTreeMap::new();
    for t in registry.all() {
        let (up, down) = t.rates(now);
        let figures = by_branch.entry(t.branch.to_string()).or_default();
        figures.tunnels += 1;
        figures.rate_up += up;
        figures.rate_down += down;
    }
    by_branch
}

/// `GET /branches`: every branch with open tunnels or a hold (every configured one with
/// `all`, or just `only`), busiest first, with its limits in force now and its tunnel cap.
pub fn branches(
    config: &Config,
    throttles: &Throttles,
    registry: &Registry,
    all: bool,
    only: Option<&str>,
) -> Value {
    let mut figures = figures(registry);
    let holds: BTreeMap<String, Hold> = registry.holds.all().into_iter().collect();
    for name in holds.keys() {
        figures.entry(name.clone()).or_default();
    }
    if all {
        for b in &config.branches {
            figures.entry(b.name.clone()).or_default();
        }
    }
    if let Some(only) = only {
        figures.retain(|name, _| name == only);
        if figures.is_empty() && config.identity_named(only).is_some() {
            figures.insert(only.to_owned(), BranchFigures::default());
        }
    }
    let mut rows: Vec<(String, BranchFigures)> = figures.into_iter().collect();
    rows.sort_by_key(|(_, f)| std::cmp::Reverse((f.rate_up + f.rate_down, f.tunnels)));
    let now = jiff::Timestamp::now();
    let by_name: std::collections::HashMap<&str, &crate::config::Branch> = config
        .branches
        .iter()
        .map(|b| (b.name.as_str(), b))
        .collect();
    let rows: Vec<Value> = rows
        .into_iter()
        .map(|(name, f)| {
            let in_force = throttles.in_force_at(now, Some(&name), None);
            let limit = |direction| {
                in_force
                    .iter()
                    .filter(|l| l.direction == direction)
                    .map(|l| l.rate)
                    .min()
            };
            let configured = by_name.get(name.as_str()).copied();
            let hold = holds.get(&name);
            json!({
                "branch": name,
                "configured": configured.is_some() || name == UNASSIGNED,
                "tunnels": f.tunnels,
                "max_tunnels": configured.and_then(|b| b.max_tunnels),
                "rate_up": f.rate_up,
                "rate_down": f.rate_down,
                "limit_up": limit(Direction::Upload),
                "limit_down": limit(Direction::Download),
                "hold": hold.map(|h| h.as_str()),
                "drain_until": match hold {
                    Some(Hold::Drain { until, .. }) => Some(until.to_string()),
                    _ => None,
                },
            })
        })
        .collect();
    json!({ "branches": rows })
}
