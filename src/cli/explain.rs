//! Human-readable views of a config for operators: the effective policy (`check-config`) and the
//! decision for one target (`explain`), built from the same `plan` the data path acts on.

use crate::config::Config;
use crate::gateway::{Gateway, plan};
use crate::policy::host::Target;
use crate::policy::{Mode, Rule};
use std::fmt::Write;
use std::net::IpAddr;

/// How a rule's tunnels are checked: one SNI mode, or the mode per port where they differ
/// (a rule's own `sni` applies on every port; the policy's default only on 443).
fn sni_modes(config: &Config, rule: &Rule) -> String {
    if rule.plain_http {
        return "- (plain-HTTP lane)".into();
    }
    let modes: Vec<(u16, &str)> = rule
        .ports
        .iter()
        .map(|&port| (port, config.policy.sni_mode(Some(rule), port).as_str()))
        .collect();
    match modes.first() {
        Some((_, first)) if modes.iter().all(|(_, m)| m == first) => (*first).to_owned(),
        Some(_) => modes
            .iter()
            .map(|(port, mode)| format!("{mode} on {port}"))
            .collect::<Vec<_>>()
            .join(", "),
        None => "-".into(),
    }
}

/// The effective policy: mode, profiles, every rule with its category, hosts, ports and SNI
/// check.
pub fn effective_policy(config: &Config) -> String {
    let mut out = String::new();
    let mode = match config.policy.mode {
        Mode::Enforce => "enforce",
        Mode::Report => "report (allow, log what enforce would deny)",
    };
    let _ = writeln!(out, "mode: {mode}");
    let _ = writeln!(
        out,
        "profiles: {}",
        if config.profiles.is_empty() {
            "none".into()
        } else {
            config.profiles.join(", ")
        }
    );
    let _ = writeln!(out, "listen: {}", join(&config.listen.proxy));
    let _ = writeln!(out, "clients: {}", join(&config.listen.clients));
    let _ = writeln!(out, "categories: {}", config.policy.categories().join(", "));
    let _ = writeln!(
        out,
        "rules ({}, first match wins):",
        config.policy.rules.len()
    );
    for rule in &config.policy.rules {
        let _ = writeln!(
            out,
            "  {}  [{}]  ports {}  from {}",
            rule.name,
            rule.category,
            join(&rule.ports),
            rule.origin
        );
        if !rule.hosts.is_empty() {
            let _ = writeln!(out, "    hosts: {}", join(&rule.hosts));
        }
        if !rule.addresses.is_empty() {
            let _ = writeln!(out, "    addresses: {}", join(&rule.addresses));
        }
        if !rule.private_addresses.is_empty() {
            let _ = writeln!(
                out,
                "    private_addresses: {}",
                join(&rule.private_addresses)
            );
        }
        let _ = writeln!(out, "    sni: {}", sni_modes(config, rule));
    }
    let _ = writeln!(
        out,
        "branches ({}, first source match wins):",
        config.branches.len()
    );
    for b in &config.branches {
        let _ = writeln!(
            out,
            "  {}  sources {}  users {}  certificates {}  rules {}  max_tunnels {}",
            b.name,
            if b.sources.is_empty() {
                "-".into()
            } else {
                join(&b.sources)
            },
            b.credentials.len(),
            if b.client_certificates.is_empty() {
                "-".into()
            } else {
                join(&b.client_certificates)
            },
            b.allowed_rules.as_ref().map_or("all".into(), |allowed| {
                let names: Vec<&str> = config
                    .policy
                    .rules
                    .iter()
                    .zip(allowed)
                    .filter(|(_, a)| **a)
                    .map(|(r, _)| r.name.as_str())
                    .collect();
                names.join(", ")
            }),
            b.max_tunnels.map_or("unlimited".into(), |n| n.to_string()),
        );
    }
    if !config.branches.is_empty() {
        let unassigned = if config.policy.allow_unassigned {
            "admitted"
        } else {
            "refused"
        };
        let _ = writeln!(out, "unassigned clients: {unassigned}");
    }
    if !config.schedules.is_empty() {
        let _ = writeln!(
            out,
            "schedules ({}, `portcullis schedule` shows the week):",
            config.schedules.len()
        );
        for s in &config.schedules {
            let rate =
                |r: Option<u64>| r.map_or("-".to_owned(), crate::bandwidth::units::format_rate);
            let _ = writeln!(
                out,
                "  {}  {}  {}{}  upload {}  download {}  [{}]",
                s.name,
                s.when(),
                s.scope.as_str(),
                s.branches
                    .as_ref()
                    .map_or(String::new(), |b| format!(" ({})", b.join(", "))),
                rate(s.upload),
                rate(s.download),
                s.categories.join(", ")
            );
        }
    }
    if let Some(fleet) = &config.fleet {
        let _ = writeln!(
            out,
            "fleet: replica {} on {}, refresh {:?}, lease {:?}, fallback share {}: bandwidth budgets, branch max_tunnels and auth attempts are fleet-wide",
            fleet.name, fleet.redis.shown, fleet.refresh, fleet.lease, fleet.fallback_share
        );
    }
    let r = &config.resolver;
    let servers = if r.hosts_only {
        "none (hosts_only)".to_owned()
    } else if r.servers.is_empty() {
        "system resolv.conf".to_owned()
    } else {
        join(&r.servers)
    };
    let _ = writeln!(
        out,
        "resolver: {servers}, timeout {:?}, {} static host(s)",
        r.timeout,
        r.hosts.len()
    );
    let t = &config.timeouts;
    let _ = writeln!(
        out,
        "timeouts: head {:?}, connect {:?}, idle {:?}, drain {:?}",
        t.head, t.connect, t.idle, t.drain
    );
    out
}

/// The limits in force now for a tunnel of `branch` and `category`, per direction; `None`
/// when no schedule is configured.
fn bandwidth(gw: &Gateway, branch: &str, category: &str) -> Option<String> {
    if gw.config.schedules.is_empty() {
        return None;
    }
    let in_force = gw
        .throttles
        .in_force_at(jiff::Timestamp::now(), Some(branch), Some(category));
    let shares = running_shares(gw, !in_force.is_empty());
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
    let fleet = match gw.config.fleet {
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
fn running_shares(gw: &Gateway, wanted: bool) -> String {
    match (gw.config.fleet.is_some() && wanted, gw.config.listen.admin) {
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
pub async fn explain(gw: &Gateway, from: IpAddr, target: &Target, lane: bool) -> (String, bool) {
    // explain knows only the source address: credentials and certificates are not simulated.
    let who = gw.identifier.identify(&gw.config, from, None, &[]).await;
    let plan = plan(gw, from, who, target, lane).await;
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
        let _ = writeln!(
            out,
            "branch:   {}",
            crate::gateway::identity::name(&gw.config.branches, identity)
        );
        let d = &plan.decision;
        let _ = writeln!(out, "verdict:  {} ({})", d.verdict.as_str(), d.reason);
        match d.rule {
            Some(rule) => {
                let _ = writeln!(out, "rule:     {} (from {})", rule.name, rule.origin);
                let _ = writeln!(out, "category: {}", rule.category);
                let branch = crate::gateway::identity::name(&gw.config.branches, identity);
                if let Some(line) = bandwidth(gw, branch, &rule.category) {
                    let _ = writeln!(out, "bandwidth: {line}");
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
            let _ = match c.vetted {
                Ok(()) => writeln!(out, "  {}  ok", c.ip),
                Err(range) => writeln!(
                    out,
                    "  {}  refused: {range} (not in a CIDR the rule lists)",
                    c.ip
                ),
            };
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

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
