//! The operator's changes to the learned sets (`portcullis learned approve|forget`), checked
//! against the configuration: the same code runs in the gateway (the admin listener's
//! `/learned/...`) and in the CLI on the state file, so both answer alike.

use super::Learned;
use crate::config::{Config, Identity, UNASSIGNED};
use crate::policy::Learn;
use crate::policy::host::{DnsName, Host, Target};

/// An answer for the operator: the status the admin listener sends, and the text.
pub type Answer = Result<String, (u16, String)>;

/// `branch` (a configured name, or `unassigned`) as the identity its tunnels run as.
fn identity(config: &Config, branch: &str) -> Result<Identity, (u16, String)> {
    config.identity_named(branch).ok_or_else(|| {
        let mut names: Vec<&str> = config.branches.iter().map(|b| b.name.as_str()).collect();
        names.push(UNASSIGNED);
        let names = names.join(", ");
        (
            404,
            format!("no branch is named {branch:?}; expected one of: {names}"),
        )
    })
}

/// What an operator does to a learned set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edit {
    /// Learn `HOST[:PORT]` (443 by default).
    Approve,
    /// Forget `HOST` (every port) or `HOST:PORT`.
    Forget,
}

impl Edit {
    pub fn as_str(self) -> &'static str {
        match self {
            Edit::Approve => "approve",
            Edit::Forget => "forget",
        }
    }
}

/// `edit` for `branch` on `destination` as the operator wrote it (`HOST` or `HOST:PORT`),
/// under `rule` (or the one the policy picks, or every rule for a forget).
pub fn apply(
    config: &Config,
    learned: &Learned,
    edit: Edit,
    branch: &str,
    destination: &str,
    rule: Option<&str>,
) -> Answer {
    let (host, port) = parse_destination(destination)?;
    match edit {
        Edit::Approve => approve(config, learned, branch, (&host, port.unwrap_or(443)), rule),
        Edit::Forget => forget(config, learned, branch, (&host, port), rule),
    }
}

/// `HOST` or `HOST:PORT` (parsed as a CONNECT target is), the port `None` when not given. Only
/// names are learned.
fn parse_destination(text: &str) -> Result<(DnsName, Option<u16>), (u16, String)> {
    let bad = |why: &str| (400, format!("{text:?}: {why}; expected HOST or HOST:PORT"));
    let (host, port) = if text.contains(':') {
        let target = Target::parse_authority(text).map_err(bad)?;
        (target.host, Some(target.port))
    } else {
        (Host::Name(DnsName::parse(text).map_err(bad)?), None)
    };
    match host {
        Host::Name(name) => Ok((name, port)),
        Host::Ip(_) => Err(bad("an IP literal is never learned (rules list addresses)")),
    }
}

/// The rule `branch`'s tunnels to `host:port` go by, when it learns: the one named (which must
/// learn), else the one the policy picks for the branch.
fn learning_rule<'c>(
    config: &'c Config,
    branch: Identity,
    host: &DnsName,
    port: u16,
    rule: Option<&str>,
) -> Result<&'c crate::policy::Rule, (u16, String)> {
    let target = Host::Name(host.clone());
    if let Some(name) = rule {
        let found = config
            .policy
            .rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.name == name);
        let may = |i: usize| config.scope(branch).allowed.is_none_or(|a| a.holds(i));
        return match found {
            Some((i, _)) if !may(i) => Err((
                422,
                format!("the branch's `allow` list does not hold rule {name:?}"),
            )),
            Some((_, r)) if r.learn != Learn::Off => Ok(r),
            Some(_) => Err((
                422,
                format!("rule {name:?} does not learn (learn = \"off\")"),
            )),
            None => Err((404, format!("no allow rule is named {name:?}"))),
        };
    }
    let decision = config.policy.decide(&target, port, config.scope(branch));
    match decision.rule {
        Some(r) if r.learns(&target).is_some() => Ok(r),
        Some(r) => Err((
            422,
            format!(
                "{host}:{port} goes by rule {:?}, which does not learn it (learn = \"{}\", or a name it lists exactly)",
                r.name,
                r.learn.as_str()
            ),
        )),
        None => Err((
            422,
            format!(
                "no allow rule lets this branch reach {host}:{port} ({})",
                decision.why()
            ),
        )),
    }
}

/// Learns `host:port` for `branch` (under `rule`, or the rule the policy picks).
fn approve(
    config: &Config,
    learned: &Learned,
    branch: &str,
    destination: (&DnsName, u16),
    rule: Option<&str>,
) -> Answer {
    let (host, port) = destination;
    let who = identity(config, branch)?;
    let rule = learning_rule(config, who, host, port, rule)?;
    let limit = config.policy.learn_limit;
    match learned.approve(branch, &rule.name, host.as_str(), port, limit) {
        Ok(true) => Ok(format!(
            "approved {host}:{port} for branch {branch} under rule {}\n",
            rule.name
        )),
        Ok(false) => Ok(format!(
            "{host}:{port} was learned already for branch {branch} under rule {}; marked approved\n",
            rule.name
        )),
        Err(full) => Err((409, full)),
    }
}

/// Forgets `host` (one port, or every port) for `branch` (under `rule`, or every rule).
fn forget(
    config: &Config,
    learned: &Learned,
    branch: &str,
    destination: (&DnsName, Option<u16>),
    rule: Option<&str>,
) -> Answer {
    let (host, port) = destination;
    identity(config, branch)?;
    match learned.forget(branch, rule, host.as_str(), port) {
        0 => Err((
            404,
            format!(
                "branch {branch} has not learned {host}{}",
                port.map(|p| format!(":{p}")).unwrap_or_default()
            ),
        )),
        n => Ok(format!(
            "forgot {n} destination{} of {host} for branch {branch}\n",
            if n == 1 { "" } else { "s" }
        )),
    }
}

/// The listing as a table, one destination per line.
pub fn table(rows: &[super::Row]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12} {:<28} {:<44} {:>7} {:<20} {:<20} how",
        "branch", "rule", "destination", "tunnels", "first seen", "last seen"
    );
    let time = |s: i64| {
        jiff::Timestamp::from_second(s)
            .map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_default()
    };
    for r in rows {
        let _ = writeln!(
            out,
            "{:<12} {:<28} {:<44} {:>7} {:<20} {:<20} {}",
            r.branch,
            r.rule,
            format!("{}:{}", r.host, r.seen.port),
            r.seen.count,
            time(r.seen.first_seen),
            time(r.seen.last_seen),
            if r.seen.approved {
                "approved"
            } else {
                "learned"
            }
        );
    }
    out
}
