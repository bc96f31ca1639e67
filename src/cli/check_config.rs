//! `portcullis check-config`: load a file as `serve` would (the TLS files too) and print the
//! whole effective configuration, defaults included, in the file's own terms: listeners,
//! PROXY protocol, TLS, log, limits, timeouts, resolver, then the policy (mode, profiles,
//! every rule with its SNI check), branches (users by name, never hashes) and schedules.

use super::join;
use crate::config::{ClientCertificates, Config, LogFormat};
use crate::policy::{Mode, OnReload, Rule};
use std::fmt::Write;
use std::path::Path;
use std::time::Duration;

/// The file at `path` compiled, with its TLS certificate, key and client CA read as the
/// listeners will read them; or every problem, one per line.
pub fn check(path: &Path, now: jiff::Timestamp) -> Result<Config, String> {
    let config = Config::load(path, now).map_err(|e| e.to_string())?;
    if let Some(settings) = &config.tls {
        for listener in &config.listen.tls_proxy {
            crate::gateway::tls::acceptor(settings, listener.client_certificates)
                .map_err(|e| format!("{}: tls: {e}", path.display()))?;
        }
    }
    Ok(config)
}

/// A duration as a config file writes it: "500ms", "10s", "15m", "1h".
fn duration(d: Duration) -> String {
    let (secs, millis) = (d.as_secs(), d.subsec_millis());
    match () {
        _ if millis != 0 || secs == 0 => format!("{}ms", d.as_millis()),
        _ if secs.is_multiple_of(3600) => format!("{}h", secs / 3600),
        _ if secs.is_multiple_of(60) => format!("{}m", secs / 60),
        _ => format!("{secs}s"),
    }
}

fn list_or<T: std::fmt::Display>(items: &[T], none: &str) -> String {
    if items.is_empty() {
        none.to_owned()
    } else {
        join(items)
    }
}

/// The whole effective configuration, one section after another.
pub fn report(config: &Config) -> String {
    let mut out = String::new();
    listeners(&mut out, config);
    settings(&mut out, config);
    policy(&mut out, config);
    branches(&mut out, config);
    schedules(&mut out, config);
    egresses(&mut out, config);
    out
}

/// The ways out, and which rules and branches use each (nothing without egresses).
fn egresses(out: &mut String, config: &Config) {
    let e = &config.egresses;
    if !e.parents.is_empty() {
        let _ = writeln!(out, "parents ({}):", e.parents.len());
    }
    for (i, parent) in e.parents.iter().enumerate() {
        let users: Vec<&str> = e
            .list
            .iter()
            .filter(|x| x.via.contains(&i))
            .map(|x| x.name.as_str())
            .collect();
        let _ = writeln!(
            out,
            "  {}: {}:{}{}, CONNECT by {}, credentials: {}; used by egresses: {}",
            parent.name,
            parent.host,
            parent.port,
            parent
                .tls
                .as_ref()
                .map(|t| format!(
                    ", TLS to {} (CA {})",
                    t.server_name.to_str(),
                    t.ca.display()
                ))
                .unwrap_or_default(),
            parent.connect_by(),
            parent.user.as_deref().unwrap_or("none"),
            list_or(&users, "none")
        );
    }
    if e.list.is_empty() {
        return;
    }
    let _ = writeln!(out, "egresses ({}):", e.list.len());
    for (i, egress) in e.list.iter().enumerate() {
        let sources = egress.sources();
        let sources = if sources.is_empty() {
            "the kernel's choice of source address".to_owned()
        } else {
            sources
        };
        let via: Vec<&str> = egress
            .via
            .iter()
            .filter_map(|&p| e.parents.get(p))
            .map(|p| p.name.as_str())
            .collect();
        let way = match (via.is_empty(), egress.fallback_direct) {
            (true, _) => "direct".to_owned(),
            (false, false) => format!("via {} (never direct)", via.join(" then ")),
            (false, true) => format!("via {} (direct when all fail)", via.join(" then ")),
        };
        let _ = writeln!(
            out,
            "  {}: {way}, {sources}, {}",
            egress.name,
            egress.families()
        );
        let rules: Vec<&str> = config
            .policy
            .rules
            .iter()
            .filter(|r| r.egress == Some(i))
            .map(|r| r.name.as_str())
            .collect();
        let branches: Vec<&str> = config
            .branches
            .iter()
            .filter(|b| b.egress == Some(i))
            .map(|b| b.name.as_str())
            .collect();
        let default = if e.default == Some(i) {
            "; the default (policy.egress)"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "    used by rules: {}; branches: {}{default}",
            list_or(&rules, "none"),
            list_or(&branches, "none")
        );
    }
}

fn listeners(out: &mut String, config: &Config) {
    let l = &config.listen;
    let _ = writeln!(out, "listen:");
    let _ = writeln!(out, "  proxy: {}", list_or(&l.proxy, "none"));
    let tls: Vec<String> = l
        .tls_proxy
        .iter()
        .map(|t| {
            let mode = match t.client_certificates {
                ClientCertificates::Required => "required",
                ClientCertificates::Optional => "optional",
                ClientCertificates::Off => "off",
            };
            format!("{} (client certificates: {mode})", t.address)
        })
        .collect();
    let _ = writeln!(out, "  tls_proxy: {}", list_or(&tls, "none"));
    let _ = writeln!(
        out,
        "  admin: {}",
        l.admin.map_or("off".to_owned(), |a| format!(
            "{a} (/metrics, /healthz, /readyz)"
        ))
    );
    let _ = writeln!(out, "  clients: {}", list_or(&l.clients, "none"));
    let _ = writeln!(
        out,
        "  proxy_protocol_from: {}",
        list_or(
            &l.proxy_protocol_from,
            "none (no PROXY protocol header is read)"
        )
    );
    match &config.tls {
        None => {
            let _ = writeln!(out, "tls: none");
        }
        Some(t) => {
            let _ = writeln!(out, "tls:");
            let _ = writeln!(out, "  certificate: {}", t.certificate.display());
            let _ = writeln!(out, "  key: {}", t.key.display());
            let _ = writeln!(
                out,
                "  client_ca: {}",
                t.client_ca
                    .as_ref()
                    .map_or("none".to_owned(), |c| c.display().to_string())
            );
            let _ = writeln!(
                out,
                "  handshake_timeout: {}",
                duration(t.handshake_timeout)
            );
        }
    }
}

fn settings(out: &mut String, config: &Config) {
    let format = match config.log.format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    };
    let _ = writeln!(out, "log:");
    let _ = writeln!(out, "  format: {format}");
    let _ = writeln!(
        out,
        "  access_file: {}",
        config.log.access_file.as_ref().map_or(
            "none (access lines on stdout)".to_owned(),
            |f| format!("{} (SIGUSR1 reopens it)", f.display())
        )
    );
    if config.log.access_file.is_some() {
        let failure = config.log.on_write_failure;
        let _ = writeln!(
            out,
            "  on_write_failure: {} ({})",
            failure.as_str(),
            match failure {
                crate::access_log::OnWriteFailure::KeepServing =>
                    "lost lines are counted; serving goes on",
                crate::access_log::OnWriteFailure::FailClosed =>
                    "new connections get 503 until a line can be written",
            }
        );
    }
    let l = &config.limits;
    let _ = writeln!(out, "limits:");
    match l.max_connections {
        Some(n) => {
            let _ = writeln!(out, "  max_connections: {n}");
        }
        None => match crate::process::hard_descriptor_limit() {
            Some(hard) => {
                let _ = writeln!(
                    out,
                    "  max_connections: from the descriptor limit ({} under this shell's hard limit of {hard})",
                    crate::process::connections_for(hard)
                );
            }
            None => {
                let _ = writeln!(out, "  max_connections: from the descriptor limit");
            }
        },
    }
    let _ = writeln!(
        out,
        "  connect_rate_per_client: {}",
        l.connect_rate_per_client
            .map_or("unlimited".to_owned(), |n| format!("{n} per second"))
    );
    let _ = writeln!(
        out,
        "  auth_attempts_per_minute: {}",
        l.auth_attempts_per_minute
    );
    let _ = writeln!(
        out,
        "  max_pending_heads_per_client: {} (late heads: not in {}s, or at once with under a quarter of the places free)",
        l.max_pending_heads_per_client,
        crate::gateway::pending::HEAD_GRACE.as_secs()
    );
    let _ = writeln!(out, "  ipv6_client_prefix: {}", l.ipv6_client_prefix);
    let queue = l.throttle_queue.map_or_else(|| "off".to_owned(), duration);
    let _ = writeln!(out, "  throttle_queue: {queue}");
    let t = &config.timeouts;
    let _ = writeln!(out, "timeouts:");
    let _ = writeln!(out, "  head: {}", duration(t.head));
    let _ = writeln!(
        out,
        "  connect: {} (over all of a name's addresses, raced: the next starts after attempt_delay {}, or at once when one fails)",
        duration(t.connect),
        duration(t.attempt_delay)
    );
    let _ = writeln!(out, "  idle: {}", duration(t.idle));
    let _ = writeln!(out, "  drain: {}", duration(t.drain));
    if t.pre_stop.is_zero() {
        let _ = writeln!(
            out,
            "  pre_stop: none (SIGTERM closes the listeners at once)"
        );
    } else {
        let _ = writeln!(
            out,
            "  pre_stop: {} (SIGTERM: /readyz answers 503 and the listeners accept this long before the drain)",
            duration(t.pre_stop)
        );
    }
    let _ = writeln!(
        out,
        "  upgrade_drain: {} (after a binary upgrade, SIGUSR2 or POST /upgrade, the old process lets open tunnels run this long)",
        duration(t.upgrade_drain)
    );
    if let Some(fleet) = &config.fleet {
        let _ = writeln!(
            out,
            "fleet: replica {} on {}, refresh {}, lease {}, fallback share {}: bandwidth budgets, branch max_tunnels and auth attempts are fleet-wide",
            fleet.name,
            fleet.redis.shown,
            duration(fleet.refresh),
            duration(fleet.lease),
            fleet.fallback_share
        );
    }
    let r = &config.resolver;
    let servers = if r.servers.is_empty() {
        "system resolv.conf".to_owned()
    } else {
        join(&r.servers)
    };
    let _ = writeln!(out, "resolver:");
    if r.hosts_only {
        let _ = writeln!(out, "  servers: none (hosts_only: DNS is never asked)");
    } else {
        let _ = writeln!(out, "  servers: {servers}");
    }
    if let Some(ca) = &r.ca {
        let _ = writeln!(
            out,
            "  encrypted: yes, trusting only {} (no clear-text fallback)",
            ca.display()
        );
    }
    let _ = writeln!(out, "  timeout: {}", duration(r.timeout));
    let _ = writeln!(out, "  hosts_only: {}", r.hosts_only);
    if r.hosts.is_empty() {
        let _ = writeln!(out, "  hosts: none");
    } else {
        let _ = writeln!(out, "  hosts ({}):", r.hosts.len());
    }
    for (name, addresses) in &r.hosts {
        let _ = writeln!(out, "    {name} = {}", join(addresses));
    }
}

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

fn policy(out: &mut String, config: &Config) {
    let mode = match config.policy.mode {
        Mode::Enforce => "enforce",
        Mode::Report => "report (allow, log what enforce would deny)",
    };
    let _ = writeln!(out, "mode: {mode}");
    let _ = writeln!(
        out,
        "sni: {} (port-443 rules that set none)",
        config.policy.sni.as_str()
    );
    let on_reload = match config.policy.on_reload {
        OnReload::Keep => "keep (open tunnels keep the policy they started with)",
        OnReload::CloseDenied => "close-denied (a reload closes tunnels the new policy denies)",
    };
    let _ = writeln!(out, "on_reload: {on_reload}");
    let _ = writeln!(out, "profiles: {}", list_or(&config.profiles, "none"));
    if let Some(tags) = &config.policy.service_tags_file {
        let _ = writeln!(
            out,
            "service_tags_file: {} (changeNumber {}, cloud {}, {} tags)",
            tags.path.display(),
            tags.change_number,
            tags.cloud,
            tags.tags
        );
    }
    let _ = writeln!(out, "categories: {}", config.policy.categories().join(", "));
    if config
        .policy
        .rules
        .iter()
        .any(|r| r.learn != crate::policy::Learn::Off)
    {
        let _ = writeln!(
            out,
            "learned destinations: {}",
            config.state_dir.join(crate::learned::FILE_NAME).display()
        );
    }
    if !config.policy.denies.is_empty() {
        let _ = writeln!(
            out,
            "deny rules ({}, checked before every allow rule):",
            config.policy.denies.len()
        );
    }
    for deny in &config.policy.denies {
        let ports = deny.ports.as_ref().map_or("all".to_owned(), |p| join(p));
        let branches = deny
            .branches
            .as_ref()
            .map_or("all".to_owned(), |b| b.join(", "));
        let _ = writeln!(out, "  {}  ports {ports}  branches {branches}", deny.name);
        if !deny.hosts.is_empty() {
            let _ = writeln!(out, "    hosts: {}", join(&deny.hosts));
        }
        if !deny.addresses.is_empty() {
            let _ = writeln!(out, "    addresses: {}", join(&deny.addresses));
        }
    }
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
        if !rule.service_tags.is_empty() {
            let _ = writeln!(out, "    service_tags: {}", rule.service_tags.join(", "));
        }
        if rule.learn != crate::policy::Learn::Off {
            let _ = writeln!(
                out,
                "    learn: {} (names under its wildcards, per branch, at most {})",
                rule.learn.as_str(),
                config.policy.learn_limit
            );
        }
    }
}

fn branches(out: &mut String, config: &Config) {
    let _ = writeln!(
        out,
        "branches ({}, the most specific source network wins):",
        config.branches.len()
    );
    for b in &config.branches {
        // User names only: the hashes stay in the file.
        let users: Vec<&str> = b.credentials.iter().map(|c| c.user.as_str()).collect();
        let rules = b.allowed_rules.as_ref().map_or("all".into(), |allowed| {
            let names: Vec<&str> = allowed
                .positions()
                .map(|i| config.policy.rules[i].name.as_str())
                .collect();
            names.join(", ")
        });
        let _ = writeln!(
            out,
            "  {}  sources {}  users {}  certificates {}  rules {}  max_tunnels {}",
            b.name,
            list_or(&b.sources, "-"),
            list_or(&users, "-"),
            list_or(&b.client_certificates, "-"),
            rules,
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
}

fn schedules(out: &mut String, config: &Config) {
    if config.schedules.is_empty() {
        let _ = writeln!(out, "schedules: none (no bandwidth limits)");
        return;
    }
    let _ = writeln!(
        out,
        "schedules ({}, `portcullis schedule` shows the week):",
        config.schedules.len()
    );
    let rate = |r: Option<u64>| r.map_or("-".to_owned(), crate::bandwidth::units::format_rate);
    for s in &config.schedules {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_written_as_in_the_file() {
        assert_eq!(duration(Duration::from_millis(500)), "500ms");
        assert_eq!(duration(Duration::from_secs(10)), "10s");
        assert_eq!(duration(Duration::from_secs(90)), "90s");
        assert_eq!(duration(Duration::from_secs(900)), "15m");
        assert_eq!(duration(Duration::from_secs(7200)), "2h");
        assert_eq!(duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn the_builtin_config_shows_every_default() {
        let shown = report(&Config::builtin());
        for want in [
            "  proxy: 0.0.0.0:3128\n",
            "  tls_proxy: none\n",
            "  admin: 127.0.0.1:9464",
            "  proxy_protocol_from: none",
            "tls: none\n",
            "  format: text\n",
            "  access_file: none",
            "  max_connections: from the descriptor limit",
            "  connect_rate_per_client: unlimited\n",
            "  auth_attempts_per_minute: 30\n",
            "  max_pending_heads_per_client: 64 (late heads: not in 1s, or at once with under a quarter of the places free)\n",
            "  ipv6_client_prefix: 64\n",
            "  throttle_queue: 100ms\n",
            "  head: 10s\n",
            "  idle: 15m\n",
            "  drain: 30s\n",
            "  pre_stop: none",
            "  servers: system resolv.conf\n",
            "  timeout: 5s\n",
            "mode: enforce\n",
            "sni: match",
            "on_reload: keep",
            "branches (0, the most specific source network wins):\n",
            "schedules: none",
        ] {
            assert!(shown.contains(want), "missing {want:?} in:\n{shown}");
        }
    }
}
