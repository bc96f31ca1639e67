//! `[policy]`: the operator's allow rules, then the built-in profiles' rules (first match
//! wins, so a file's rule for a name under a built-in wildcard is the one that applies).

use super::problems::Problems;
use super::raw::{RawDeny, RawPolicy, RawRule};
use super::values::cidrs;
use super::{DEFAULT_CATEGORY, DEFAULT_PROFILE, DEFAULT_RULE_PORTS};
use crate::policy::host::HostPattern;
use crate::policy::service_tags::{AddressRanges, ServiceTags};
use crate::policy::{DenyRule, Learn, Mode, OnReload, Policy, Rule, SniMode, TagsFile, profiles};
use std::collections::HashSet;
use std::sync::Arc;
use toml::Spanned;

/// The policy and the built-in profiles it uses, in the order given; `branches` are the
/// names deny rules may list.
pub(super) fn compile_policy(
    p: &mut Problems<'_>,
    raw: &RawPolicy,
    branches: &[&str],
    paths: &super::paths::Paths<'_>,
) -> (Policy, Vec<&'static str>) {
    let tags = raw
        .service_tags_file
        .as_ref()
        .and_then(|file| load_service_tags(p, file, paths));
    let profile_names: Vec<Spanned<String>> = raw
        .profiles
        .clone()
        .unwrap_or_else(|| vec![Spanned::new(0..0, DEFAULT_PROFILE.to_owned())]);
    // The file's own rules come first (first match wins), so an operator's rule for a name
    // under a built-in wildcard (a private endpoint, say) is the one that applies.
    let mut profile_rules = Vec::new();
    let mut profiles_used = Vec::new();
    for (i, name) in profile_names.iter().enumerate() {
        match profiles::find(name.get_ref()) {
            Some(profile) => {
                profiles_used.push(profile.name);
                profile_rules.extend(
                    profile
                        .entries
                        .iter()
                        .map(|entry| profile_rule(profile.name, entry)),
                );
            }
            None => p.add(
                name.span(),
                format!("policy.profiles[{i}]"),
                format!(
                    "unknown profile {:?}; expected one of {}",
                    name.get_ref(),
                    profiles::names().join(", ")
                ),
            ),
        }
    }
    let mut names: HashSet<String> = profile_rules.iter().map(|r| r.name.clone()).collect();
    let mut rules = Vec::new();
    for (i, raw_rule) in raw.allow.iter().enumerate() {
        let key = format!("policy.allow[{i}]");
        if let Some(rule) = compile_rule(p, raw_rule, &key, &mut names, tags.as_ref().map(|t| &t.1))
        {
            rules.push(rule);
        }
    }
    rules.extend(profile_rules);
    let set_in_rule: HashSet<&str> = raw
        .allow
        .iter()
        .filter(|r| r.get_ref().learn.is_some())
        .map(|r| r.get_ref().name.get_ref().as_str())
        .collect();
    super::learning::apply_table(p, &raw.learn, &mut rules, &set_in_rule);
    let denies = raw
        .deny
        .iter()
        .enumerate()
        .filter_map(|(i, d)| compile_deny(p, d, &format!("policy.deny[{i}]"), &mut names, branches))
        .collect();
    let policy = Policy {
        mode: raw.mode.unwrap_or(Mode::Enforce),
        index: crate::policy::rule_index::RuleIndex::new(&rules),
        rules,
        denies,
        service_tags_file: tags.map(|t| t.0),
        allow_unassigned: raw.allow_unassigned,
        sni: raw.sni.unwrap_or(SniMode::Match),
        on_reload: raw.on_reload.unwrap_or(OnReload::Keep),
        learn_limit: super::learning::limit(p, raw.learn_limit.as_ref()),
    };
    (policy, profiles_used)
}

fn profile_rule(profile: &'static str, entry: &profiles::Entry) -> Rule {
    Rule {
        name: format!("{profile}/{}", entry.category),
        category: entry.category.to_owned(),
        hosts: entry
            .hosts
            .iter()
            .map(|h| HostPattern::parse(h).expect("built-in patterns are checked by a unit test"))
            .collect(),
        ports: entry.ports.to_vec(),
        addresses: Vec::new(),
        private_addresses: Vec::new(),
        origin: format!("profile {profile} ({})", profiles::VERSION),
        reachable: Vec::new(),
        sni: None,
        // Revocation lists and OCSP are plain HTTP: the lane serves them, CONNECT does not.
        plain_http: entry.category == "revocation",
        service_tags: Vec::new(),
        tag_ranges: None,
        learn: Learn::Off,
        egress: None,
    }
}

fn compile_rule(
    p: &mut Problems<'_>,
    raw: &Spanned<RawRule>,
    key: &str,
    names: &mut HashSet<String>,
    tags: Option<&ServiceTags>,
) -> Option<Rule> {
    let before = p.list.len();
    let span = raw.span();
    let raw = raw.get_ref();
    let name = rule_name(p, &raw.name, key, names);
    let category = match &raw.category {
        None => DEFAULT_CATEGORY.to_owned(),
        Some(c)
            if c.get_ref().is_empty()
                || !c
                    .get_ref()
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
        {
            p.add(
                c.span(),
                format!("{key}.category"),
                "expected a category name of letters, digits, '-' or '_'",
            );
            String::new()
        }
        Some(c) => c.get_ref().to_ascii_lowercase(),
    };
    let hosts = host_patterns(p, &raw.hosts, key);
    let ports: Vec<u16> = match &raw.ports {
        None => DEFAULT_RULE_PORTS.to_vec(),
        Some(list) => ports(p, list, &span, key),
    };
    let addresses = cidrs(p, &raw.addresses, &format!("{key}.addresses"));
    let private_addresses = cidrs(
        p,
        &raw.private_addresses,
        &format!("{key}.private_addresses"),
    );
    if raw.hosts.is_empty() && raw.addresses.is_empty() {
        p.add(
            span.clone(),
            key,
            "a rule needs `hosts` (names) or `addresses` (CIDRs for IP-literal targets)",
        );
    }
    let (service_tags, tag_ranges) = match &raw.service_tags {
        None => (Vec::new(), None),
        Some(list) => rule_tags(p, list, key, tags),
    };
    if raw.plain_http && raw.learn.is_some_and(|l| l != Learn::Off) {
        p.add(
            span.clone(),
            format!("{key}.learn"),
            "a plain-HTTP rule (revocation lists, OCSP) is not learned",
        );
    }
    if p.list.len() > before {
        return None;
    }
    let reachable = addresses
        .iter()
        .chain(&private_addresses)
        .copied()
        .collect();
    Some(Rule {
        name,
        category,
        hosts,
        ports,
        addresses,
        private_addresses,
        origin: "config".into(),
        reachable,
        sni: raw.sni,
        plain_http: raw.plain_http,
        service_tags,
        tag_ranges,
        learn: raw.learn.unwrap_or_default(),
        // Set once the egresses are known (`egress::assign`).
        egress: None,
    })
}

/// A rule's `ports`: at least one, each from 1 to 65535.
fn ports(
    p: &mut Problems<'_>,
    list: &[Spanned<u16>],
    span: &std::ops::Range<usize>,
    key: &str,
) -> Vec<u16> {
    if list.is_empty() {
        p.add(
            span.clone(),
            format!("{key}.ports"),
            "expected at least one port",
        );
    }
    list.iter()
        .enumerate()
        .filter_map(|(i, port)| {
            if *port.get_ref() == 0 {
                p.add(
                    port.span(),
                    format!("{key}.ports[{i}]"),
                    "expected a port from 1 to 65535",
                );
                None
            } else {
                Some(*port.get_ref())
            }
        })
        .collect()
}

/// The hosts of a rule: DNS names or `*.suffix` patterns.
fn host_patterns(p: &mut Problems<'_>, hosts: &[Spanned<String>], key: &str) -> Vec<HostPattern> {
    hosts
        .iter()
        .enumerate()
        .filter_map(|(i, h)| match HostPattern::parse(h.get_ref()) {
            Ok(pattern) => Some(pattern),
            Err(why) => {
                p.add(
                    h.span(),
                    format!("{key}.hosts[{i}]"),
                    format!("{why}; expected a DNS name or \"*.suffix\""),
                );
                None
            }
        })
        .collect()
}

/// One `[[policy.deny]]`: a name unique among all rules, hosts or addresses, optional ports
/// (default every port) and branches (configured names, or `unassigned`).
fn compile_deny(
    p: &mut Problems<'_>,
    raw: &Spanned<RawDeny>,
    key: &str,
    names: &mut HashSet<String>,
    branches: &[&str],
) -> Option<DenyRule> {
    let before = p.list.len();
    let span = raw.span();
    let raw = raw.get_ref();
    let name = rule_name(p, &raw.name, key, names);
    let hosts = host_patterns(p, &raw.hosts, key);
    let addresses = cidrs(p, &raw.addresses, &format!("{key}.addresses"));
    if raw.hosts.is_empty() && raw.addresses.is_empty() {
        p.add(
            span.clone(),
            key,
            "a deny rule needs `hosts` (names) or `addresses` (CIDRs for IP-literal targets)",
        );
    }
    let ports = raw.ports.as_ref().map(|list| ports(p, list, &span, key));
    let listed = raw.branches.as_ref().map(|list| {
        list.iter()
            .enumerate()
            .filter_map(|(i, b)| {
                let known =
                    branches.contains(&b.get_ref().as_str()) || b.get_ref() == super::UNASSIGNED;
                if !known {
                    p.add(
                        b.span(),
                        format!("{key}.branches[{i}]"),
                        format!(
                            "unknown branch {:?}; expected a [[branch]] name or {:?}",
                            b.get_ref(),
                            super::UNASSIGNED
                        ),
                    );
                }
                known.then(|| b.get_ref().clone())
            })
            .collect()
    });
    (p.list.len() == before).then_some(DenyRule {
        name,
        hosts,
        addresses,
        ports,
        branches: listed,
    })
}

/// `policy.service_tags_file`: read and parsed; a problem names the file and, inside it, the
/// line and column.
fn load_service_tags(
    p: &mut Problems<'_>,
    file: &Spanned<String>,
    paths: &super::paths::Paths<'_>,
) -> Option<(TagsFile, ServiceTags)> {
    let key = "policy.service_tags_file";
    let path = paths.resolve(p, file, key);
    if path.as_os_str().is_empty() {
        return None;
    }
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => {
            p.add(
                file.span(),
                key,
                format!("cannot read {}: {e}", path.display()),
            );
            return None;
        }
    };
    match ServiceTags::parse(&text) {
        Ok(tags) => Some((
            TagsFile {
                path,
                change_number: tags.change_number,
                cloud: tags.cloud.clone(),
                tags: tags.len(),
            },
            tags,
        )),
        Err(e) => {
            p.add(file.span(), key, format!("{}:{e}", path.display()));
            None
        }
    }
}

/// A rule's `service_tags`: names in the file, their prefixes merged.
fn rule_tags(
    p: &mut Problems<'_>,
    list: &[Spanned<String>],
    key: &str,
    tags: Option<&ServiceTags>,
) -> (Vec<String>, Option<Arc<AddressRanges>>) {
    let Some(tags) = tags else {
        if let Some(first) = list.first() {
            p.add(
                first.span(),
                format!("{key}.service_tags"),
                "needs policy.service_tags_file (Microsoft's ServiceTags_Public.json)",
            );
        }
        return (Vec::new(), None);
    };
    if list.is_empty() {
        return (Vec::new(), None);
    }
    let mut prefixes = Vec::new();
    let mut names = Vec::new();
    for (i, name) in list.iter().enumerate() {
        match tags.prefixes(name.get_ref()) {
            Some(found) => {
                prefixes.extend_from_slice(found);
                names.push(name.get_ref().clone());
            }
            None => {
                let all = tags.names();
                let near = super::parse_errors::nearest(name.get_ref(), &all)
                    .map_or(String::new(), |n| format!(" (did you mean {n:?}?)"));
                p.add(
                    name.span(),
                    format!("{key}.service_tags[{i}]"),
                    format!(
                        "unknown service tag {:?}{near}; expected a name from the service tags file",
                        name.get_ref()
                    ),
                );
            }
        }
    }
    (names, Some(Arc::new(AddressRanges::new(&prefixes))))
}

/// A rule's `name` (allow or deny: one namespace, the log line's `rule`): letters, digits and
/// `-_./`, used once; built-in profile rules are named profile/category.
fn rule_name(
    p: &mut Problems<'_>,
    raw: &Spanned<String>,
    key: &str,
    names: &mut HashSet<String>,
) -> String {
    let name = raw.get_ref().trim().to_owned();
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
    {
        p.add(
            raw.span(),
            format!("{key}.name"),
            "expected a non-empty name of letters, digits, '-', '_', '.', '/'",
        );
    } else if !names.insert(name.clone()) {
        p.add(
            raw.span(),
            format!("{key}.name"),
            format!(
                "rule name {name:?} is used twice (allow and deny rules share names; built-in profile rules are named profile/category)"
            ),
        );
    }
    name
}
