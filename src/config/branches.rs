//! `[[branch]]`: who each branch office is (source networks, proxy users, client-certificate
//! names) and what it may do (rules, open tunnels). Passwords are parsed once, here.

use super::password::StoredPassword;
use super::problems::Problems;
use super::raw::RawBranch;
use super::values::{cidrs, is_name};
use super::{Branch, Credential};
use crate::policy::Policy;
use crate::policy::host::DnsName;
use crate::policy::prefix_map::PrefixMap;
use ipnet::IpNet;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use toml::Spanned;

/// The name logged (and labelled) for clients that belong to no branch; no branch may take it.
pub const UNASSIGNED: &str = "unassigned";

/// A configured branch: its position in `Config::branches` (valid for that snapshot only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BranchId(pub(crate) usize);

impl BranchId {
    /// The position in `Config::branches`.
    pub fn index(self) -> usize {
        self.0
    }
}

/// Whom an admitted request runs as: a configured branch, or no branch at all (admitted as
/// `unassigned`, when there are no branches or `policy.allow_unassigned` is set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    Branch(BranchId),
    Unassigned,
}

impl Identity {
    /// The branch, if any.
    pub fn branch(self) -> Option<BranchId> {
        match self {
            Identity::Branch(id) => Some(id),
            Identity::Unassigned => None,
        }
    }
}

pub(super) fn compile(
    p: &mut Problems<'_>,
    raw: &[Spanned<RawBranch>],
    policy: &Policy,
    clients: &[IpNet],
) -> (Vec<Branch>, PrefixMap<BranchId>) {
    // Where each source network was listed: a network identifies one branch.
    let mut placed: HashMap<IpNet, String> = HashMap::new();
    // Rule names to positions, once: allow lists are resolved without a scan per name.
    let mut rule_positions: HashMap<&str, usize> = HashMap::new();
    for (i, rule) in policy.rules.iter().enumerate() {
        rule_positions.entry(rule.name.as_str()).or_insert(i);
    }
    let mut names = HashSet::new();
    let mut users = HashSet::new();
    let mut branches = Vec::new();
    for (i, raw_branch) in raw.iter().enumerate() {
        let key = format!("branch[{i}]");
        let before = p.list.len();
        let b = raw_branch.get_ref();
        let name = b.name.get_ref().clone();
        if !is_name(&name) || name == UNASSIGNED {
            p.add(
                b.name.span(),
                format!("{key}.name"),
                "expected a name of letters, digits, '-', '_', '.' (not \"unassigned\")",
            );
        } else if !names.insert(name.clone()) {
            p.add(
                b.name.span(),
                format!("{key}.name"),
                format!("branch name {name:?} is used twice"),
            );
        }
        let sources = cidrs(p, &b.sources, &format!("{key}.sources"));
        if sources.len() == b.sources.len() {
            warn_unreachable_sources(p, &key, &name, &b.sources, &sources, clients);
            for (j, (net, text)) in sources.iter().zip(&b.sources).enumerate() {
                let here = format!("{key}.sources[{j}]");
                match placed.entry(net.trunc()) {
                    Entry::Occupied(first) => p.add(
                        text.span(),
                        here,
                        format!(
                            "{net} is a source of {} already: a network identifies one branch (the most specific network wins, so list a narrower one to carve part of it out)",
                            first.get()
                        ),
                    ),
                    Entry::Vacant(slot) => {
                        slot.insert(format!("branch {name:?} ({here})"));
                    }
                }
            }
        }
        let mut credentials = Vec::new();
        for (j, c) in b.credentials.iter().enumerate() {
            let user = c.user.get_ref();
            if user.is_empty() || user.contains(':') || user.chars().any(char::is_control) {
                p.add(
                    c.user.span(),
                    format!("{key}.credentials[{j}].user"),
                    "expected a user name without ':' or control characters",
                );
            } else if !users.insert(user.clone()) {
                p.add(
                    c.user.span(),
                    format!("{key}.credentials[{j}].user"),
                    format!("user {user:?} is defined twice"),
                );
            }
            match StoredPassword::parse(c.password_hash.get_ref()) {
                Ok(password) => credentials.push(Credential {
                    user: user.clone(),
                    password,
                }),
                Err(_) => p.add(
                    c.password_hash.span(),
                    format!("{key}.credentials[{j}].password_hash"),
                    "expected an argon2id hash (\"$argon2id$...\", from `portcullis hash-password`); plain passwords are not accepted",
                ),
            }
        }
        let client_certificates = b
            .client_certificates
            .iter()
            .enumerate()
            .filter_map(|(j, n)| match DnsName::parse(n.get_ref()) {
                Ok(name) => Some(name),
                Err(why) => {
                    p.add(
                        n.span(),
                        format!("{key}.client_certificates[{j}]"),
                        format!("{why}; expected a certificate's DNS name"),
                    );
                    None
                }
            })
            .collect();
        let allowed_rules = allowed_rules(p, &key, b.allow.as_deref(), &rule_positions);
        let max_tunnels = b.max_tunnels.as_ref().and_then(|n| {
            if *n.get_ref() == 0 {
                p.add(
                    n.span(),
                    format!("{key}.max_tunnels"),
                    "expected a number above 0 (leave it out for no limit)",
                );
            }
            Some(*n.get_ref()).filter(|&n| n > 0)
        });
        if b.sources.is_empty() && b.credentials.is_empty() && b.client_certificates.is_empty() {
            p.add(
                raw_branch.span(),
                key,
                "a branch needs `sources`, `credentials` or `client_certificates`",
            );
        }
        if p.list.len() == before {
            branches.push(Branch {
                name,
                sources,
                credentials,
                client_certificates,
                allowed_rules,
                max_tunnels,
                // Set once the egresses are known (`egress::assign`).
                egress: None,
            });
        }
    }
    let mut by_source = PrefixMap::default();
    for (i, branch) in branches.iter().enumerate() {
        for net in &branch.sources {
            // A network listed twice was a problem above.
            let _ = by_source.insert(*net, BranchId(i));
        }
    }
    (branches, by_source)
}

/// `allow`: the rules a branch may use, by name, as positions in the policy's rule list.
fn allowed_rules(
    p: &mut Problems<'_>,
    key: &str,
    names: Option<&[Spanned<String>]>,
    rule_positions: &HashMap<&str, usize>,
) -> Option<crate::policy::RuleSet> {
    names.map(|names| {
        let mut allowed = Vec::new();
        for (j, rule) in names.iter().enumerate() {
            match rule_positions.get(rule.get_ref().as_str()) {
                Some(&k) => allowed.push(k),
                None => p.add(
                    rule.span(),
                    format!("{key}.allow[{j}]"),
                    format!(
                        "no rule named {:?} (rules are listed by check-config)",
                        rule.get_ref()
                    ),
                ),
            }
        }
        crate::policy::RuleSet::new(allowed)
    })
}

/// Each client-certificate name to the first branch (in file order) that lists it.
pub(super) fn by_certificate(branches: &[Branch]) -> HashMap<String, BranchId> {
    let mut names = HashMap::new();
    for (i, branch) in branches.iter().enumerate() {
        for name in &branch.client_certificates {
            names.entry(name.as_str().to_owned()).or_insert(BranchId(i));
        }
    }
    names
}

/// A source network `listen.clients` does not hold (wholly or in part) can never identify the
/// branch: those clients are refused before identification. Valid, so a warning.
fn warn_unreachable_sources(
    p: &mut Problems<'_>,
    key: &str,
    branch: &str,
    written: &[Spanned<String>],
    sources: &[IpNet],
    clients: &[IpNet],
) {
    for (j, (text, net)) in written.iter().zip(sources).enumerate() {
        let why = match coverage(*net, clients) {
            Coverage::Inside => continue,
            Coverage::Outside => format!(
                "{:?} lies outside listen.clients: clients from it are refused before branch identification, so it never identifies branch {branch:?}; add it to listen.clients or remove it",
                text.get_ref()
            ),
            Coverage::Partly => format!(
                "{:?} lies partly outside listen.clients: clients from the part outside are refused before branch identification and never identified as branch {branch:?}; add it to listen.clients or narrow it",
                text.get_ref()
            ),
        };
        p.warn(text.span(), format!("{key}.sources[{j}]"), why);
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Coverage {
    Inside,
    Partly,
    Outside,
}

/// How much of `net` the union of `clients` holds (several client networks together may hold
/// it where none alone does).
fn coverage(net: IpNet, clients: &[IpNet]) -> Coverage {
    let range = |n: &IpNet| -> (bool, u128, u128) {
        let bounds = |a: IpAddr| match a {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            IpAddr::V6(v6) => u128::from(v6),
        };
        (
            n.addr().is_ipv4(),
            bounds(n.network()),
            bounds(n.broadcast()),
        )
    };
    let (v4, start, end) = range(&net);
    let mut held: Vec<(u128, u128)> = clients
        .iter()
        .map(range)
        .filter(|(family, _, _)| *family == v4)
        .map(|(_, s, e)| (s, e))
        .collect();
    held.sort_unstable();
    let mut merged: Vec<(u128, u128)> = Vec::new();
    for (s, e) in held {
        match merged.last_mut() {
            Some((_, last_end)) if s <= last_end.saturating_add(1) => {
                *last_end = (*last_end).max(e)
            }
            _ => merged.push((s, e)),
        }
    }
    if merged.iter().any(|&(s, e)| s <= start && end <= e) {
        Coverage::Inside
    } else if merged.iter().any(|&(s, e)| s <= end && start <= e) {
        Coverage::Partly
    } else {
        Coverage::Outside
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn coverage_is_of_the_union_of_client_networks() {
        let clients = nets(&["10.0.0.0/9", "10.128.0.0/9", "192.168.1.0/24", "fd00::/8"]);
        let of = |n: &str| coverage(n.parse().unwrap(), &clients);
        assert_eq!(
            of("10.0.0.0/8"),
            Coverage::Inside,
            "two halves hold the whole"
        );
        assert_eq!(of("10.200.0.0/16"), Coverage::Inside);
        assert_eq!(of("192.168.0.0/23"), Coverage::Partly);
        assert_eq!(of("192.168.2.0/24"), Coverage::Outside);
        assert_eq!(of("fd00:1::/32"), Coverage::Inside);
        assert_eq!(of("fe80::/10"), Coverage::Outside);
        assert_eq!(of("0.0.0.0/0"), Coverage::Partly);
        assert_eq!(
            coverage("10.0.0.0/8".parse().unwrap(), &[]),
            Coverage::Outside
        );
        let everything = nets(&["0.0.0.0/0"]);
        assert_eq!(
            coverage("0.0.0.0/0".parse().unwrap(), &everything),
            Coverage::Inside
        );
    }
}
