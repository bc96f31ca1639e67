//! Learned destinations shared by the fleet, through one Redis hash of every branch's
//! destinations and a version key that moves whenever the hash does.
//!
//! Each field holds a destination's latest state with a stamp: Redis's clock (ms) when the
//! change reached it, strictly above the field's previous stamp. A forget is a tombstone, not
//! a deletion. Every replica keeps the same stamps (and the tombstones) in its sets and its
//! state file, and the newer state wins wherever two meet (a tombstone at a tie), so:
//!
//! - a forget or an approval outranks every older state of the destination, in Redis and on
//!   every replica: a replica that was down applies, when it comes back, what happened
//!   meanwhile, and never puts back from its file what was forgotten then;
//! - a destination missing from Redis is written back, never read as forgotten: a Redis that
//!   restarted empty or was flushed is refilled from the replicas' stamped states (tombstones
//!   included);
//! - tombstones live 90 days (`learned::shared::TOMBSTONE_TTL_MS`), far past any outage; a
//!   replica whose last read is older than that drops what Redis lacks instead of restoring it.
//!
//! Every `refresh`, one round trip sends this replica's pending changes (one script stamps
//! them) and reads the version key; when the version moved (or a minute passed) a second one
//! reads the hash with Redis's time and reconciles ([`Learned::reconcile`]); what Redis lacks
//! or holds older goes back in a third. Concurrent changes made while Redis was unreachable
//! are ordered by when they reach it. The data path never waits on Redis: it probes the local
//! sets; Redis down only delays the sharing. Fields or values this version cannot read are
//! skipped (and overwritten by a newer state).

use super::Fleet;
use super::link::Failure;
use super::scripts::{LEARNED_CHANGE, LEARNED_REFILL, LEARNED_SWEEP};
use crate::learned::Learned;
use crate::learned::shared::{Change, Held, Kind, Place, Stamped};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Field `branch \t rule \t host \t port`, value `stamp first_seen approved` (ms, unix
/// seconds, 0 or 1) or `stamp -` (forgotten).
pub const KEY: &str = "portcullis:{learned}";
/// Redis's time (ms) of the last write to [`KEY`]; gone with it when Redis is emptied.
pub const VERSION_KEY: &str = "portcullis:{learned}:version";
/// The hash is read this often even when the version did not move (a hash deleted alone).
const READ_AT_LEAST_EVERY: Duration = Duration::from_secs(60);
/// Destinations per script call, so no single call holds Redis long.
const BATCH: usize = 256;

fn field(place: &Place) -> String {
    format!(
        "{}\t{}\t{}\t{}",
        place.branch, place.rule, place.host, place.port
    )
}

fn value(stamped: &Stamped) -> String {
    match stamped.held {
        Held::Present {
            first_seen,
            approved,
        } => format!("{} {first_seen} {}", stamped.stamp, u8::from(approved)),
        Held::Forgotten => format!("{} -", stamped.stamp),
    }
}

/// A destination's state from Redis; `None` for a field or value this version cannot read.
fn parse(field: &str, value: &str) -> Option<Stamped> {
    let mut parts = field.split('\t');
    let (branch, rule, host, port) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || branch.is_empty() || rule.is_empty() {
        return None;
    }
    let host = crate::policy::host::DnsName::parse(host).ok()?;
    let port = port.parse().ok().filter(|p| *p != 0)?;
    let mut words = value.split(' ');
    let stamp = words.next()?.parse().ok().filter(|s| *s >= 0)?;
    let held = match (words.next()?, words.next(), words.next()) {
        ("-", None, None) => Held::Forgotten,
        (first_seen, Some(approved @ ("0" | "1")), None) => Held::Present {
            first_seen: first_seen.parse().ok()?,
            approved: approved == "1",
        },
        _ => return None,
    };
    Some(Stamped {
        place: Place::new(branch, rule, host.as_str(), port),
        stamp,
        held,
    })
}

/// Where this replica stands with the hash.
#[derive(Default)]
pub struct Sharing {
    /// The version key at the last read of the hash.
    version: Option<Option<Vec<u8>>>,
    read_at: Option<Instant>,
}

/// Runs until aborted: one sync per `refresh`, once a configuration has a rule that learns.
pub async fn run(fleet: Arc<Fleet>, learned: Arc<Learned>) {
    let mut every = tokio::time::interval(fleet.settings.refresh);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sharing = Sharing::default();
    loop {
        every.tick().await;
        if learned.in_use() {
            let _ = sync(&fleet, &learned, &mut sharing).await;
        }
    }
}

/// Sends this replica's pending changes, then reads and reconciles the hash if it changed
/// since the last read. Errs when Redis did not answer a step.
pub async fn sync(fleet: &Fleet, learned: &Learned, sharing: &mut Sharing) -> Result<(), Failure> {
    let changes = learned.changes();
    let mut pipe = super::link::Batch::new();
    for batch in changes.chunks(BATCH) {
        let mut cmd = super::link::evalsha_keys(&LEARNED_CHANGE, &[KEY, VERSION_KEY]);
        for change in batch {
            let kind = match change.kind {
                Kind::Learn => "learn",
                Kind::Approve => "approve",
                Kind::Forget => "forget",
            };
            let approved = u8::from(change.kind == Kind::Approve);
            cmd.arg(kind)
                .arg(field(&change.place))
                .arg(format!("{} {approved}", change.first_seen));
        }
        pipe.add_command(cmd);
    }
    pipe.cmd("GET").arg(VERSION_KEY);
    let result = fleet.link.query::<Vec<redis::Value>>(&pipe).await;
    fleet.mark(result.as_ref().map(|_| ()));
    let mut answers = result?;
    let version = match answers.pop() {
        Some(redis::Value::BulkString(bytes)) => Some(bytes),
        _ => None,
    };
    let stamps: Vec<i64> = answers
        .into_iter()
        .flat_map(|batch| match batch {
            redis::Value::Array(items) => items,
            _ => Vec::new(),
        })
        .map(|stamp| match stamp {
            redis::Value::Int(n) => n,
            _ => -1,
        })
        .collect();
    acknowledge(learned, &changes, &stamps);
    let due = !changes.is_empty()
        || sharing.version.as_ref() != Some(&version)
        || sharing
            .read_at
            .is_none_or(|at| at.elapsed() >= READ_AT_LEAST_EVERY);
    if !due {
        return Ok(());
    }
    read(fleet, learned).await?;
    sharing.version = Some(version);
    sharing.read_at = Some(Instant::now());
    Ok(())
}

/// Marks the changes Redis stamped (a change whose stamp did not come back stays pending).
fn acknowledge(learned: &Learned, changes: &[Change], stamps: &[i64]) {
    let stamped = stamps.iter().take_while(|s| **s >= 0).count();
    learned.stamped(&changes[..stamped.min(changes.len())], &stamps[..stamped]);
}

/// Reads the whole hash with Redis's time, reconciles, and writes back what Redis lacks.
async fn read(fleet: &Fleet, learned: &Learned) -> Result<(), Failure> {
    let mut pipe = super::link::Batch::new();
    pipe.cmd("TIME").cmd("HGETALL").arg(KEY);
    type Read = ((i64, i64), HashMap<Vec<u8>, Vec<u8>>);
    let result = fleet.link.query::<Read>(&pipe).await;
    fleet.mark(result.as_ref().map(|_| ()));
    let ((seconds, micros), all) = result?;
    let now = seconds.saturating_mul(1000).saturating_add(micros / 1000);
    let held: Vec<Stamped> = all
        .iter()
        .filter_map(|(f, v)| parse(std::str::from_utf8(f).ok()?, std::str::from_utf8(v).ok()?))
        .collect();
    let outcome = learned.reconcile(held, now);
    if outcome.added + outcome.removed > 0 {
        tracing::info!(
            added = outcome.added,
            removed = outcome.removed,
            "fleet: learned destinations taken from the fleet"
        );
    }
    if outcome.stale {
        tracing::warn!(
            ttl_days = crate::learned::shared::TOMBSTONE_TTL_MS / 86_400_000,
            "fleet: this replica last read the fleet's learned destinations longer ago than forgets are remembered; its destinations Redis lacks were dropped, not restored"
        );
    }
    if outcome.refill.is_empty() && outcome.sweep.is_empty() {
        return Ok(());
    }
    let mut pipe = super::link::Batch::new();
    for batch in outcome.refill.chunks(BATCH) {
        let mut cmd = super::link::evalsha_keys(&LEARNED_REFILL, &[KEY, VERSION_KEY]);
        for stamped in batch {
            cmd.arg(field(&stamped.place)).arg(value(stamped));
        }
        pipe.add_command(cmd);
    }
    for batch in outcome.sweep.chunks(BATCH) {
        let mut cmd = super::link::evalsha_keys(&LEARNED_SWEEP, &[KEY]);
        for stamped in batch {
            cmd.arg(field(&stamped.place)).arg(value(stamped));
        }
        pipe.add_command(cmd);
    }
    let result = fleet.link.query::<Vec<i64>>(&pipe).await;
    fleet.mark(result.as_ref().map(|_| ()));
    let written: i64 = result?
        .iter()
        .take(outcome.refill.len().div_ceil(BATCH))
        .sum();
    if written > 0 {
        tracing::info!(
            written,
            "fleet: learned destinations Redis lacked written back from this replica"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_and_its_version_key_share_a_slot() {
        // One script writes both: on a Redis Cluster they must live on one node.
        use redis::cluster_routing::Slot;
        assert_eq!(Slot::for_key(KEY), Slot::for_key(VERSION_KEY));
        assert_eq!(Slot::for_key(KEY), Slot::for_key("learned"));
    }

    #[test]
    fn fields_and_values_round_trip_and_strange_ones_are_skipped() {
        let place = Place::new(
            "london",
            "azure-file-sync/storage",
            "acct1.file.core.windows.net",
            443,
        );
        for held in [
            Held::Present {
                first_seen: 1_795_392_000,
                approved: true,
            },
            Held::Forgotten,
        ] {
            let stamped = Stamped {
                place: place.clone(),
                stamp: 1_795_392_000_123,
                held,
            };
            assert_eq!(parse(&field(&place), &value(&stamped)), Some(stamped));
        }
        for (f, v) in [
            ("london\trule\thost", "1 1 0"),
            ("london\trule\tbad host\t443", "1 1 0"),
            ("london\trule\thost.example\t0", "1 1 0"),
            ("london\trule\thost.example\t443\textra", "1 1 0"),
            ("\trule\thost.example\t443", "1 1 0"),
            ("london\trule\thost.example\t443", "soon"),
            ("london\trule\thost.example\t443", "1 0"),
            ("london\trule\thost.example\t443", "1 1 2"),
            ("london\trule\thost.example\t443", "1 - x"),
            ("london\trule\thost.example\t443", "-5 -"),
            ("london\trule\thost.example\t443", ""),
        ] {
            assert_eq!(parse(f, v), None, "{f:?} {v:?}");
        }
    }
}
