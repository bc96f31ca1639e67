//! `[egress.NAME]`: the ways out. An egress says which source address outgoing connections
//! leave from (per family) and which address families may be dialled; `[policy] egress`, a
//! rule's `egress` and a branch's `egress` choose one (rule beats branch beats default). A
//! source address must be on this host when the file is loaded: never leave silently from
//! another one.

use super::problems::Problems;
use super::values::is_name;
use super::{Branch, Identity};
use crate::policy::Rule;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use toml::Spanned;

/// `[egress.NAME]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEgress {
    source_ipv4: Option<Spanned<String>>,
    source_ipv6: Option<Spanned<String>>,
    families: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    via: Vec<Spanned<String>>,
    fallback: Option<Spanned<String>>,
}

/// One way out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Egress {
    pub name: String,
    /// Outgoing IPv4 connections bind this address.
    pub source_ipv4: Option<Ipv4Addr>,
    /// Outgoing IPv6 connections bind this address.
    pub source_ipv6: Option<Ipv6Addr>,
    /// Whether IPv4 addresses may be dialled.
    pub ipv4: bool,
    /// Whether IPv6 addresses may be dialled.
    pub ipv6: bool,
    /// Parents to go through, by position in `Egresses::parents`, in order of preference;
    /// empty: direct.
    pub via: Vec<usize>,
    /// `fallback = "direct"`: go direct when every parent failed (default: never).
    pub fallback_direct: bool,
}

impl Egress {
    /// Whether `ip`'s family may be dialled through this egress (an IPv4-mapped address is
    /// IPv4).
    pub fn allows(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(_) => self.ipv4,
            IpAddr::V6(_) => self.ipv6,
        }
    }

    /// The source address for connections to `ip`, if this egress binds one.
    pub fn source_for(&self, ip: IpAddr) -> Option<IpAddr> {
        match ip.to_canonical() {
            IpAddr::V4(_) => self.source_ipv4.map(IpAddr::V4),
            IpAddr::V6(_) => self.source_ipv6.map(IpAddr::V6),
        }
    }

    /// "IPv4 only", "IPv6 only" or "IPv4 and IPv6".
    pub fn families(&self) -> &'static str {
        match (self.ipv4, self.ipv6) {
            (true, false) => "IPv4 only",
            (false, true) => "IPv6 only",
            _ => "IPv4 and IPv6",
        }
    }

    /// The source addresses, "from 203.0.113.10 and 2001:db8::10", or "" when none is bound.
    pub fn sources(&self) -> String {
        let list: Vec<String> = [
            self.source_ipv4.map(IpAddr::V4),
            self.source_ipv6.map(IpAddr::V6),
        ]
        .into_iter()
        .flatten()
        .map(|ip| ip.to_string())
        .collect();
        if list.is_empty() {
            String::new()
        } else {
            format!("from {}", list.join(" and "))
        }
    }
}

/// Who chose the egress a request takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChosenBy {
    Rule,
    Branch,
    Default,
}

impl fmt::Display for ChosenBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChosenBy::Rule => "the rule's egress",
            ChosenBy::Branch => "the branch's egress",
            ChosenBy::Default => "policy.egress",
        })
    }
}

/// Every egress and the default; empty when the file has none (the way out of old).
#[derive(Clone, Debug, Default)]
pub struct Egresses {
    pub list: Vec<Egress>,
    /// `[policy] egress`, by position in `list`.
    pub default: Option<usize>,
    /// `[[parent]]`, in file order.
    pub parents: Vec<super::Parent>,
}

impl Egresses {
    /// The egress for a request under `rule` from `branch`: rule beats branch beats default.
    pub fn choose(
        &self,
        rule: Option<&Rule>,
        branch: Option<&Branch>,
    ) -> Option<(&Egress, ChosenBy)> {
        if self.list.is_empty() {
            return None;
        }
        let (at, by) = match (rule.and_then(|r| r.egress), branch.and_then(|b| b.egress)) {
            (Some(at), _) => (at, ChosenBy::Rule),
            (None, Some(at)) => (at, ChosenBy::Branch),
            (None, None) => (self.default?, ChosenBy::Default),
        };
        self.list.get(at).map(|e| (e, by))
    }

    /// `choose` for an identified request.
    pub fn for_request(
        &self,
        rule: Option<&Rule>,
        branches: &[Branch],
        identity: Option<Identity>,
    ) -> Option<(&Egress, ChosenBy)> {
        let branch = identity
            .and_then(|i| i.branch())
            .and_then(|b| branches.get(b.index()));
        self.choose(rule, branch)
    }
}

/// Compiles `[egress.*]`; every source address must be on this host now.
pub(super) fn compile(
    p: &mut Problems<'_>,
    raw: &BTreeMap<Spanned<String>, Spanned<RawEgress>>,
    parents: &[super::Parent],
) -> Vec<Egress> {
    let mut list = Vec::new();
    for (name, e) in raw {
        let key = format!("egress.{}", name.get_ref());
        if !is_name(name.get_ref()) {
            p.add(
                name.span(),
                key.clone(),
                "expected a name of letters, digits, '-', '_', '.'",
            );
        }
        let e = e.get_ref();
        // `source` checks the family: only the right one comes back.
        let source_ipv4 = match source(p, e.source_ipv4.as_ref(), &key, "source_ipv4", true) {
            Some(IpAddr::V4(v4)) => Some(v4),
            _ => None,
        };
        let source_ipv6 = match source(p, e.source_ipv6.as_ref(), &key, "source_ipv6", false) {
            Some(IpAddr::V6(v6)) => Some(v6),
            _ => None,
        };
        let (ipv4, ipv6) = if let Some(families) = &e.families {
            let (mut ipv4, mut ipv6) = (false, false);
            for f in families.get_ref() {
                match f.get_ref().as_str() {
                    "ipv4" => ipv4 = true,
                    "ipv6" => ipv6 = true,
                    other => p.add(
                        f.span(),
                        format!("{key}.families"),
                        format!("{other:?}: expected \"ipv4\" or \"ipv6\""),
                    ),
                }
            }
            if families.get_ref().is_empty() {
                p.add(
                    families.span(),
                    format!("{key}.families"),
                    "expected at least one of \"ipv4\", \"ipv6\"",
                );
            }
            // A family listed with only the other's source address would leave from an
            // address nobody chose.
            let lonely = match (source_ipv4.is_some(), source_ipv6.is_some()) {
                (true, false) if ipv6 => Some("ipv6 is listed but only source_ipv4 is set"),
                (false, true) if ipv4 => Some("ipv4 is listed but only source_ipv6 is set"),
                _ => None,
            };
            if let Some(why) = lonely {
                p.add(families.span(), format!("{key}.families"), why);
            }
            (ipv4, ipv6)
        } else {
            // A family with no source address is not used when the other has one.
            (
                source_ipv4.is_some() || source_ipv6.is_none(),
                source_ipv6.is_some() || source_ipv4.is_none(),
            )
        };
        let via = super::parents::refer(p, parents, &e.via, &key);
        let fallback_direct = match e.fallback.as_ref().map(|f| (f, f.get_ref().as_str())) {
            None | Some((_, "none")) => false,
            Some((_, "direct")) => true,
            Some((f, other)) => {
                p.add(
                    f.span(),
                    format!("{key}.fallback"),
                    format!("{other:?}: expected \"none\" or \"direct\""),
                );
                false
            }
        };
        list.push(Egress {
            name: name.get_ref().clone(),
            source_ipv4,
            source_ipv6,
            ipv4,
            ipv6,
            via,
            fallback_direct,
        });
    }
    list
}

/// A source address of the right family, on this host.
fn source(
    p: &mut Problems<'_>,
    raw: Option<&Spanned<String>>,
    key: &str,
    field: &str,
    v4: bool,
) -> Option<IpAddr> {
    let raw = raw?;
    let key = format!("{key}.{field}");
    let family = if v4 { "IPv4" } else { "IPv6" };
    match raw.get_ref().parse::<IpAddr>() {
        Ok(ip) if ip.is_ipv4() == v4 && !ip.is_unspecified() && !ip.is_multicast() => {
            if let Err(why) = on_this_host(ip) {
                p.add(raw.span(), key, why);
            }
            Some(ip)
        }
        _ => {
            p.add(
                raw.span(),
                key,
                format!(
                    "{:?}: expected an {family} address of this host",
                    raw.get_ref()
                ),
            );
            None
        }
    }
}

/// Whether `ip` is an address of this host: binding it (port 0, no traffic) says so.
pub fn on_this_host(ip: IpAddr) -> Result<(), String> {
    match std::net::UdpSocket::bind((ip, 0)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => Err(format!(
            "{ip} is not an address of this host (outgoing connections could not leave from it)"
        )),
        Err(e) => Err(format!("{ip}: cannot bind it: {e}")),
    }
}

/// The position of the egress `name` refers to, or a problem at its place.
pub(super) fn refer(
    p: &mut Problems<'_>,
    list: &[Egress],
    name: Option<&Spanned<String>>,
    key: &str,
) -> Option<usize> {
    let name = name?;
    let at = list.iter().position(|e| e.name == *name.get_ref());
    if at.is_none() {
        let known: Vec<&str> = list.iter().map(|e| e.name.as_str()).collect();
        p.add(
            name.span(),
            key,
            format!(
                "{:?}: no [egress.{}] (known: {})",
                name.get_ref(),
                name.get_ref(),
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ),
        );
    }
    at
}
