//! Learned destinations shared by the fleet: one Redis hash holds every replica's, a version
//! key says when it changed. Every refresh a replica adds what it learned (`HSETNX`) and drops
//! what an operator forgot on it (`HDEL`), then reads the hash when the version moved and
//! makes its sets match (keeping what it learned since). The data path never waits on Redis:
//! it probes the local sets; Redis down only delays the sharing.

use super::Fleet;
use crate::learned::{Learned, Row, Seen};
use std::collections::HashMap;
use std::sync::Arc;

/// Field `branch \t rule \t host \t port`, value `first_seen approved` (unix seconds, 0 or 1).
pub const KEY: &str = "portcullis:{learned}";
/// Bumped by every replica that changed [`KEY`].
pub const VERSION_KEY: &str = "portcullis:{learned}:version";

fn field(row: &Row) -> String {
    format!(
        "{}\t{}\t{}\t{}",
        row.branch, row.rule, row.host, row.seen.port
    )
}

fn value(row: &Row) -> String {
    format!("{} {}", row.seen.first_seen, u8::from(row.seen.approved))
}

/// A destination from Redis; `None` for a field this version cannot read (skipped).
fn parse(field: &str, value: &str) -> Option<Row> {
    let mut parts = field.split('\t');
    let (branch, rule, host, port) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let (first_seen, approved) = value.split_once(' ')?;
    let first_seen = first_seen.parse().ok()?;
    let host = crate::policy::host::DnsName::parse(host).ok()?;
    Some(Row {
        branch: branch.to_owned(),
        rule: rule.to_owned(),
        host: host.as_str().to_owned(),
        seen: Seen {
            port: port.parse().ok().filter(|p| *p != 0)?,
            first_seen,
            last_seen: first_seen,
            count: 0,
            approved: approved == "1",
            shared: true,
        },
    })
}

/// Runs until aborted: one sync per `refresh`, once a configuration has a rule that learns.
pub async fn run(fleet: Arc<Fleet>, learned: Arc<Learned>) {
    let mut every = tokio::time::interval(fleet.settings.refresh);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut version = None;
    loop {
        every.tick().await;
        if learned.in_use() {
            sync(&fleet, &learned, &mut version).await;
        }
    }
}

/// Writes this replica's changes, then reads the whole hash if anyone changed it since
/// `version` (the last one read).
async fn sync(fleet: &Fleet, learned: &Learned, version: &mut Option<i64>) {
    let (unshared, forgotten) = learned.unshared();
    let mut pipe = redis::pipe();
    for row in &forgotten {
        pipe.cmd("HDEL").arg(KEY).arg(field(row)).ignore();
    }
    for row in &unshared {
        pipe.cmd("HSETNX")
            .arg(KEY)
            .arg(field(row))
            .arg(value(row))
            .ignore();
    }
    if !unshared.is_empty() || !forgotten.is_empty() {
        pipe.cmd("INCR").arg(VERSION_KEY).ignore();
    }
    pipe.cmd("GET").arg(VERSION_KEY);
    let result = fleet.link.query::<(Option<i64>,)>(&pipe).await;
    fleet.mark(result.as_ref().map(|_| ()));
    let Ok((now,)) = result else {
        return;
    };
    learned.shared(&unshared, forgotten.len());
    if now == *version {
        return;
    }
    let mut read = redis::pipe();
    read.cmd("HGETALL").arg(KEY);
    let result = fleet.link.query::<(HashMap<String, String>,)>(&read).await;
    fleet.mark(result.as_ref().map(|_| ()));
    let Ok((all,)) = result else {
        return;
    };
    let rows: Vec<Row> = all.iter().filter_map(|(f, v)| parse(f, v)).collect();
    let (added, removed) = learned.merge_shared(rows);
    if added + removed > 0 {
        tracing::info!(
            added,
            removed,
            "fleet: learned destinations taken from the fleet"
        );
    }
    *version = now;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_values_round_trip_and_strange_ones_are_skipped() {
        let row = Row {
            branch: "london".into(),
            rule: "azure-file-sync/storage".into(),
            host: "acct1.file.core.windows.net".into(),
            seen: Seen {
                port: 443,
                first_seen: 1_795_392_000,
                last_seen: 1_795_392_000,
                count: 0,
                approved: true,
                shared: true,
            },
        };
        assert_eq!(parse(&field(&row), &value(&row)), Some(row));
        for (f, v) in [
            ("london\trule\thost", "1 0"),
            ("london\trule\tbad host\t443", "1 0"),
            ("london\trule\thost.example\t0", "1 0"),
            ("london\trule\thost.example\t443", "soon"),
        ] {
            assert_eq!(parse(f, v), None, "{f:?} {v:?}");
        }
    }
}
