//! `[[branch]]`: who each branch office is (source networks, proxy users, client-certificate
//! names) and what it may do (rules, open tunnels). Passwords are parsed once, here.

use super::password::StoredPassword;
use super::problems::Problems;
use super::raw::RawBranch;
use super::values::{cidrs, is_name};
use super::{Branch, Credential};
use crate::policy::Policy;
use crate::policy::host::DnsName;
use std::collections::HashSet;
use toml::Spanned;

/// The name logged (and labelled) for clients that belong to no branch; no branch may take it.
pub const UNASSIGNED: &str = "unassigned";

pub(super) fn compile(
    p: &mut Problems<'_>,
    raw: &[Spanned<RawBranch>],
    policy: &Policy,
) -> Vec<Branch> {
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
        let allowed_rules = b.allow.as_ref().map(|names| {
            let mut allowed = vec![false; policy.rules.len()];
            for (j, rule) in names.iter().enumerate() {
                match policy.rules.iter().position(|r| &r.name == rule.get_ref()) {
                    Some(k) => allowed[k] = true,
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
            allowed
        });
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
            });
        }
    }
    branches
}
