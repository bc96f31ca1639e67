//! The proposal of `learn --from-log`: for each branch, the names its tunnels reached under a
//! `*.` pattern become a pinned `[[policy.allow]]` rule (never wider than the rule it narrows),
//! and an `allow` line for its `[[branch]]` table lists those plus the rules used unchanged.
//! Sync-service rules keep their wildcards: the service moves a server to another region's
//! host on failover, so a pinned list would cut sync off at the worst moment.

use super::{Learned, RuleUse};
use crate::config::{Config, UNASSIGNED};
use crate::policy::Rule;
use crate::policy::host::{DnsName, HostPattern};
use std::collections::{BTreeSet, HashSet};
use std::fmt::Write;
use std::net::IpAddr;

/// The category whose wildcards stay: Azure File Sync's service endpoints.
const SYNC_CATEGORY: &str = "sync";

/// What becomes of one rule a branch used.
enum Outcome {
    /// A narrower rule, as TOML, under the given name.
    Pinned(String, String),
    /// The rule as it is, in the branch's allow list (with a note, for sync wildcards).
    Kept(Option<String>),
    /// The log names a rule the configuration does not have.
    Unknown,
}

/// The proposal, as TOML: pinned rules bare (append them as they are), each branch's allow
/// line as a comment (it goes into that branch's table); the unassigned clients' all comments.
pub(super) fn proposal(learned: &Learned, config: &Config) -> String {
    let mut out = String::from(
        "# Proposed rules: append this to the config file, then put each branch's allow line in\n\
         # its [[branch]] table (it replaces an allow there).\n",
    );
    let mut taken: HashSet<String> = config
        .policy
        .rules
        .iter()
        .map(|r| r.name.clone())
        .chain(config.policy.denies.iter().map(|d| d.name.clone()))
        .collect();
    for (branch, rules) in &learned.branches {
        let unassigned = branch == UNASSIGNED;
        let mut tables = String::new();
        let mut allow = Vec::new();
        let mut notes = Vec::new();
        for (name, rule_use) in rules {
            let rule = config.policy.rules.iter().find(|r| &r.name == name);
            match outcome(branch, rule, rule_use, &mut taken) {
                Outcome::Pinned(pinned, toml) => {
                    tables.push_str(&toml);
                    allow.push(pinned);
                }
                Outcome::Kept(note) => {
                    allow.push(name.clone());
                    notes.extend(note);
                }
                Outcome::Unknown => notes.push(format!(
                    "rule {name} (in the logs) is not in the configuration, so it is left out (give the gateway's config with --config)"
                )),
            }
        }
        let _ = writeln!(out, "\n# branch {branch}");
        if unassigned {
            out.push_str(
                "# Clients of no branch: there is no [[branch]] table to narrow, so this is for reference.\n",
            );
            tables = comment(&tables);
        } else if !config.branches.is_empty() && !config.branches.iter().any(|b| &b.name == branch)
        {
            notes.push(format!(
                "there is no [[branch]] named {branch:?} in the configuration"
            ));
        }
        out.push_str(&tables);
        if !tables.is_empty() {
            out.push('\n');
        }
        let unused = if unassigned {
            Vec::new()
        } else {
            let _ = writeln!(
                out,
                "# In [[branch]] name = \"{branch}\":\n#   allow = {}",
                toml_list(allow.iter())
            );
            unused_rules(config, branch, rules)
        };
        if !unused.is_empty() {
            notes.push(format!(
                "not used in these logs, so left out (add any the branch needs): {}",
                unused.join(", ")
            ));
        }
        for note in notes {
            let _ = writeln!(out, "# {note}");
        }
    }
    out
}

/// Pin `rule`'s wildcard-matched names for `branch`, keep it, or say it is unknown.
fn outcome(
    branch: &str,
    rule: Option<&Rule>,
    used: &RuleUse,
    taken: &mut HashSet<String>,
) -> Outcome {
    let Some(rule) = rule else {
        return Outcome::Unknown;
    };
    let wildcards = rule
        .hosts
        .iter()
        .filter(|p| matches!(p, HostPattern::Under(_)))
        .map(|p| p.to_string())
        .collect::<Vec<_>>();
    if rule.category == SYNC_CATEGORY {
        let note = (!wildcards.is_empty()).then(|| {
            format!(
                "{} keeps its wildcards ({}): the sync service moves a server to another region's host on failover; set learn = \"record\" on it to see new names without refusing them",
                rule.name,
                wildcards.join(", ")
            )
        });
        return Outcome::Kept(note);
    }
    let mut hosts = BTreeSet::new();
    let mut addresses = BTreeSet::new();
    let mut wildcard_hit = false;
    let mut ports = BTreeSet::new();
    for (host, port) in used.destinations.keys() {
        if !rule.ports.contains(port) {
            continue; // logged under another version of the rule: never widen it
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            if rule.addresses.iter().any(|net| net.contains(&ip)) {
                addresses.insert(ipnet::IpNet::from(ip).to_string());
                ports.insert(*port);
            }
            continue;
        }
        let Ok(name) = DnsName::parse(host) else {
            continue;
        };
        let exact = rule
            .hosts
            .iter()
            .any(|p| matches!(p, HostPattern::Exact(_)) && p.matches(&name));
        let under = rule
            .hosts
            .iter()
            .any(|p| matches!(p, HostPattern::Under(_)) && p.matches(&name));
        if exact || under {
            wildcard_hit |= !exact;
            hosts.insert(name.to_string());
            ports.insert(*port);
        }
    }
    if !wildcard_hit {
        return Outcome::Kept(None);
    }
    let name = unique_name(&format!("{branch}-{}", rule.category), taken);
    let mut toml = String::new();
    let _ = writeln!(toml, "[[policy.allow]]");
    let _ = writeln!(toml, "name = \"{name}\"  # pinned from {}", rule.name);
    let _ = writeln!(toml, "category = \"{}\"", rule.category);
    let _ = writeln!(toml, "hosts = {}", toml_list(hosts.iter()));
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let _ = writeln!(toml, "ports = [{}]", ports.join(", "));
    // The rest of the rule stays as it was: pinning narrows the names, nothing else.
    if !addresses.is_empty() {
        let _ = writeln!(toml, "addresses = {}", toml_list(addresses.iter()));
    }
    if !rule.private_addresses.is_empty() {
        let nets = rule.private_addresses.iter().map(|n| n.to_string());
        let _ = writeln!(
            toml,
            "private_addresses = {}",
            toml_list(nets.collect::<Vec<_>>().iter())
        );
    }
    if let Some(sni) = rule.sni {
        let _ = writeln!(toml, "sni = \"{}\"", sni.as_str());
    }
    if !rule.service_tags.is_empty() {
        let _ = writeln!(
            toml,
            "service_tags = {}",
            toml_list(rule.service_tags.iter())
        );
    }
    if rule.plain_http {
        let _ = writeln!(toml, "plain_http = true");
    }
    Outcome::Pinned(name, toml)
}

/// `base`, or `base-2`, `base-3`, ... : a rule name no other rule has (names are one
/// namespace, allow and deny; branch and category names are valid rule-name characters).
fn unique_name(base: &str, taken: &mut HashSet<String>) -> String {
    let mut name = base.to_owned();
    let mut n = 2;
    while taken.contains(&name) {
        name = format!("{base}-{n}");
        n += 1;
    }
    taken.insert(name.clone());
    name
}

/// The rules `branch` may use under `config` but did not in these logs (CONNECT rules and
/// the plain-HTTP lane's alike).
fn unused_rules(
    config: &Config,
    branch: &str,
    used: &std::collections::BTreeMap<String, RuleUse>,
) -> Vec<String> {
    let allowed = config
        .branches
        .iter()
        .find(|b| b.name == branch)
        .and_then(|b| b.allowed_rules.as_ref());
    config
        .policy
        .rules
        .iter()
        .enumerate()
        .filter(|(i, r)| allowed.is_none_or(|a| a.holds(*i)) && !used.contains_key(&r.name))
        .map(|(_, r)| r.name.clone())
        .collect()
}

/// `["a", "b"]`: the strings are rule names, host names or CIDRs, none needing escapes.
fn toml_list<'a>(items: impl Iterator<Item = &'a String>) -> String {
    let quoted: Vec<String> = items.map(|s| format!("\"{s}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// Every line of `text` made a comment.
fn comment(text: &str) -> String {
    text.lines().map(|l| format!("# {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::super::Learned;

    fn line(branch: &str, host: &str, rule: &str, category: &str) -> String {
        format!(
            r#"{{"timestamp":"2026-11-23T09:00:00Z","target":"portcullis::access","branch":"{branch}","host":"{host}","port":443,"verdict":"allow","rule":"{rule}","category":"{category}","status":200,"bytes_up":10,"bytes_down":20}}"#
        )
    }

    fn propose(lines: &[String], config: &str) -> String {
        let mut learned = Learned::default();
        learned.read(lines.join("\n").as_bytes()).unwrap();
        let config =
            crate::config::Config::parse(config, "test.toml", crate::config::TEST_NOW).unwrap();
        super::proposal(&learned, &config)
    }

    #[test]
    fn storage_names_are_pinned_sync_wildcards_kept_and_exact_rules_unchanged() {
        let config = "[[branch]]\nname = \"london\"\nsources = [\"10.1.0.0/16\"]\n\
                      [[policy.allow]]\nname = \"london-storage\"\nhosts = [\"other.example\"]\n";
        let out = propose(
            &[
                line(
                    "london",
                    "b.file.core.windows.net",
                    "azure-file-sync/storage",
                    "storage",
                ),
                line(
                    "london",
                    "a.file.core.windows.net",
                    "azure-file-sync/storage",
                    "storage",
                ),
                line(
                    "london",
                    "weu.afs.azure.net",
                    "azure-file-sync/sync",
                    "sync",
                ),
                line(
                    "london",
                    "login.windows.net",
                    "azure-file-sync/login",
                    "login",
                ),
            ],
            config,
        );
        assert!(
            out.contains(
                "[[policy.allow]]\nname = \"london-storage-2\"  # pinned from azure-file-sync/storage\n\
                 category = \"storage\"\n\
                 hosts = [\"a.file.core.windows.net\", \"b.file.core.windows.net\"]\n\
                 ports = [443]\n"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "#   allow = [\"azure-file-sync/login\", \"london-storage-2\", \"azure-file-sync/sync\"]\n"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "# azure-file-sync/sync keeps its wildcards (*.afs.azure.net, *.one.microsoft.com)"
            ),
            "{out}"
        );
        assert!(
            out.contains("not used in these logs, so left out (add any the branch needs): london-storage, azure-file-sync/management"),
            "{out}"
        );
        assert_eq!(out.matches("[[policy.allow]]").count(), 1, "{out}");
    }

    #[test]
    fn unassigned_clients_get_their_proposal_as_comments_and_unknown_rules_are_left_out() {
        let out = propose(
            &[
                line(
                    "unassigned",
                    "a.blob.core.windows.net",
                    "azure-file-sync/storage",
                    "storage",
                ),
                line("unassigned", "x.example", "gone-rule", "other"),
            ],
            "",
        );
        assert!(
            out.contains("# [[policy.allow]]\n# name = \"unassigned-storage\""),
            "{out}"
        );
        assert!(!out.contains("\n[[policy.allow]]"), "{out}");
        assert!(
            out.contains("rule gone-rule (in the logs) is not in the configuration"),
            "{out}"
        );
        // The whole proposal is TOML (all of it comments here).
        assert!(out.parse::<toml::Table>().unwrap().is_empty());
    }
}
