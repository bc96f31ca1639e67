//! `portcullis explain`: the decision for one target, built from the same `plan` the data path
//! acts on.

use crate::gateway::{Snapshot, plan};
use crate::policy::host::Target;
use std::fmt::Write;
use std::net::IpAddr;

/// The limits in force now for a tunnel of `branch` and `category`, per direction; `None`
/// when no schedule is configured.
fn bandwidth(snapshot: &Snapshot, branch: &str, category: &str) -> Option<String> {
    if snapshot.config.schedules.is_empty() {
        return None;
    }
    let in_force =
        snapshot
            .throttles
            .in_force_at(jiff::Timestamp::now(), Some(branch), Some(category));
    let shares = running_shares(snapshot, !in_force.is_empty());
    let direction = |d: crate::bandwidth::schedule::Direction| {
        let limits: Vec<String> = in_force
            .iter()
            .filter(|l| l.direction == d)
            .map(|l| {
                let labels = format!(
                    "{{scope=\"{}\",budget=\"{}\",direction=\"{}\"}}",
                    l.scope.as_str(),
                    l.budget,
                    l.direction.as_str()
                );
                let share = shares
                    .lines()
                    .find_map(|line| line.strip_prefix(SHARE_METRIC)?.strip_prefix(&labels))
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .map_or(String::new(), |v| {
                        format!(
                            "; the running replica's share now {}",
                            crate::bandwidth::units::format_rate(v as u64)
                        )
                    });
                format!(
                    "{} ({}, {} {}{share})",
                    crate::bandwidth::units::format_rate(l.rate),
                    l.schedule,
                    l.scope.as_str(),
                    l.budget
                )
            })
            .collect();
        if limits.is_empty() {
            "not throttled now".to_owned()
        } else {
            limits.join(" and ")
        }
    };
    let fleet = match snapshot.config.fleet {
        Some(_) if !in_force.is_empty() => " (fleet-wide: shared by the replicas through Redis)",
        _ => "",
    };
    Some(format!(
        "upload {}; download {}{fleet}",
        direction(crate::bandwidth::schedule::Direction::Upload),
        direction(crate::bandwidth::schedule::Direction::Download)
    ))
}

const SHARE_METRIC: &str = "portcullis_fleet_share_bytes_per_second";

/// Fleet mode with limits in force: the shares a gateway running this config on this host
/// exports on its admin listener (empty when none answers there).
fn running_shares(snapshot: &Snapshot, wanted: bool) -> String {
    match (
        snapshot.config.fleet.is_some() && wanted,
        snapshot.config.listen.admin,
    ) {
        (true, Some(admin)) => crate::process::http_get(admin, "/metrics")
            .ok()
            .filter(|reply| reply.starts_with("HTTP/1.1 200"))
            .unwrap_or_default(),
        _ => String::new(),
    }
}

/// What the gateway would do with `CONNECT target` (or, with `lane`, a plain-HTTP request to
/// it) from `from`, on the same path the data path takes. Returns the report and whether the
/// request would be served (if the upstream accepts the connection).
pub async fn explain(
    snapshot: &Snapshot,
    from: IpAddr,
    target: &Target,
    lane: bool,
) -> (String, bool) {
    // explain knows only the source address: credentials and certificates are not simulated.
    let who = snapshot
        .identifier
        .identify(&snapshot.config, from, None, &[])
        .await;
    let plan = plan(snapshot, from, who, target, lane).await;
    let mut out = String::new();
    let request = if lane { "plain HTTP (lane)" } else { "CONNECT" };
    let _ = writeln!(out, "target:   {target} ({request})");
    let _ = writeln!(
        out,
        "client:   {from} {}",
        if plan.client_allowed {
            "allowed"
        } else {
            "NOT allowed (listen.clients)"
        }
    );
    if let Some(identity) = plan.identity {
        // By source network here (explain sends no credentials): name the network that won.
        let source = snapshot
            .config
            .branch_sources
            .longest_match(from)
            .filter(|(_, branch)| identity.branch() == Some(**branch))
            .map(|(net, _)| format!(" (source {net})"))
            .unwrap_or_default();
        let name = snapshot.config.branch_name(identity);
        let _ = writeln!(out, "branch:   {name}{source}");
        let d = &plan.decision;
        let _ = writeln!(out, "verdict:  {} ({})", d.verdict.as_str(), d.why());
        if let Some(deny) = d.deny_rule {
            let _ = writeln!(out, "deny rule: {} (from config)", deny.name);
        }
        match d.rule {
            Some(rule) => {
                let _ = writeln!(out, "rule:     {} (from {})", rule.name, rule.origin);
                let _ = writeln!(out, "category: {}", rule.category);
                let branch = snapshot.config.branch_name(identity);
                if let Some(line) = bandwidth(snapshot, branch, &rule.category) {
                    let _ = writeln!(out, "bandwidth: {line}");
                }
                if let Some(name) = rule.learns(&target.host) {
                    let known =
                        snapshot
                            .learned
                            .knows(branch, &rule.name, name.as_str(), target.port);
                    let _ = writeln!(out, "learned:  {}", learned(rule.learn, known));
                }
            }
            None => {
                let _ = writeln!(out, "rule:     none");
            }
        }
    }
    if let Some(source) = plan.source {
        let _ = writeln!(out, "addresses ({source}):");
        for c in &plan.candidates {
            let tags = plan
                .decision
                .rule
                .filter(|r| r.tag_ranges.is_some())
                .map(|r| r.service_tags.join(", "));
            let _ = match (c.vetted, &tags) {
                (Ok(()), Some(tags)) => writeln!(out, "  {}  ok (in service tag {tags})", c.ip),
                (Ok(()), None) => writeln!(out, "  {}  ok", c.ip),
                (Err(crate::policy::OUTSIDE_SERVICE_TAGS), Some(tags)) => {
                    writeln!(out, "  {}  refused: outside service tag {tags}", c.ip)
                }
                (Err(crate::policy::DENIED_ADDRESS), _) => {
                    let scope = plan.identity.map(|i| snapshot.config.scope(i));
                    let deny = snapshot.config.policy.denied_address(
                        c.ip,
                        target.port,
                        scope.unwrap_or_default(),
                    );
                    let name = deny.map_or("?", |d| d.name.as_str());
                    writeln!(
                        out,
                        "  {}  refused: denied by rule {name} (its addresses)",
                        c.ip
                    )
                }
                (Err(crate::policy::BESIDE_PRIVATE_ENDPOINT), _) => writeln!(
                    out,
                    "  {}  refused: beside a private endpoint (leaves only through the egress's parents)",
                    c.ip
                ),
                (Err(range), _) => writeln!(
                    out,
                    "  {}  refused: {range} (not in a CIDR the rule lists)",
                    c.ip
                ),
            };
        }
    }
    if let Some((egress, by)) = plan.egress {
        let _ = writeln!(out, "egress:   {} ({by})", egress.name);
        if plan.refusal.is_none() {
            let _ = writeln!(out, "path:     {}", path(snapshot, &plan, egress));
        }
    }
    let allowed = match &plan.refusal {
        Some(r) => {
            let _ = writeln!(out, "result:   {} {}", r.status.unwrap_or(0), r.reason);
            false
        }
        None => {
            let first = plan
                .dialable()
                .next()
                .map(|ip| ip.to_string())
                .unwrap_or_default();
            let _ = if lane {
                writeln!(
                    out,
                    "result:   forwarded to {first} port {} (the origin's answer, Via added)",
                    target.port
                )
            } else {
                writeln!(
                    out,
                    "result:   tunnel to {first} port {} (200 once connected)",
                    target.port
                )
            };
            true
        }
    };
    (out, allowed)
}

/// The way out as the dial would take it: "direct from 203.0.113.10, IPv4 only, tries
/// 20.60.1.5 then 20.60.1.6".
fn path(
    snapshot: &Snapshot,
    plan: &crate::gateway::Plan<'_>,
    egress: &crate::config::Egress,
) -> String {
    let order: Vec<String> = crate::gateway::dial::interleave(plan.dialable())
        .iter()
        .map(IpAddr::to_string)
        .collect();
    let sources = egress.sources();
    let from = if sources.is_empty() {
        String::new()
    } else {
        format!(" {sources}")
    };
    let direct = format!(
        "direct{from}, {}, tries {}",
        egress.families(),
        order.join(" then ")
    );
    if crate::gateway::parent::parents_for(plan).is_none() {
        return match egress.via.is_empty() {
            true => direct,
            false => format!("{direct} (a private endpoint: never through a parent)"),
        };
    }
    let parents = parents(snapshot, egress);
    let fallback = match egress.fallback_direct {
        true => format!("; if every parent fails, {direct}"),
        false => "; never direct".to_owned(),
    };
    format!("via {parents}{fallback}")
}

/// "corp-1 then corp-2, CONNECT by name" (how each parent is asked, when they differ).
fn parents(snapshot: &Snapshot, egress: &crate::config::Egress) -> String {
    let all = &snapshot.config.egresses.parents;
    let via: Vec<&crate::config::Parent> = egress.via.iter().filter_map(|&i| all.get(i)).collect();
    let same = via
        .windows(2)
        .all(|w| w[0].connect_target == w[1].connect_target);
    let names: Vec<String> = via
        .iter()
        .map(|p| match same {
            true => p.name.clone(),
            false => format!("{} (CONNECT by {})", p.name, p.connect_by()),
        })
        .collect();
    match (same, via.first()) {
        (true, Some(first)) => format!(
            "{}, CONNECT by {}",
            names.join(" then "),
            first.connect_by()
        ),
        _ => names.join(" then "),
    }
}

/// What a learning rule does with the name for this branch.
fn learned(mode: crate::policy::Learn, known: bool) -> &'static str {
    use crate::policy::Learn;
    match (mode, known) {
        (_, true) => "yes: the branch has used (or was approved for) this destination",
        (Learn::Enforce, false) => {
            "no: refused (learn = \"enforce\"; `portcullis learned approve` admits it)"
        }
        (_, false) => "no: its first tunnel is flagged new_destination (learn = \"record\")",
    }
}
