//! The compiled allow-list and the decision it takes for a CONNECT target, with what it stands
//! on: host names and patterns ([`host`]), the destination wall ([`destination`]) and the
//! built-in profiles ([`profiles`]). Pure: no I/O, no clock; the data path asks
//! `Policy::decide` once per request and keeps the answer as a value.

pub mod destination;
pub mod host;
pub mod prefix_map;
pub mod profiles;
pub mod rule_index;
pub mod service_tags;

use host::{Host, HostPattern};
use ipnet::IpNet;
use std::net::IpAddr;

/// Per-rule SNI policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SniMode {
    /// The SNI must equal the CONNECT host (for an IP-literal target: be allowed by policy).
    Match,
    /// The SNI must be a host the policy allows on the tunnel's port.
    Allowed,
    /// No check: the bytes are not inspected.
    Off,
}

impl SniMode {
    /// The name as the config writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            SniMode::Match => "match",
            SniMode::Allowed => "allowed",
            SniMode::Off => "off",
        }
    }
}

/// Whether `ip` is in one of `nets`; an IPv4-mapped IPv6 address counts as its IPv4 form (a
/// dual-stack listener sees IPv4 clients that way).
pub fn in_networks(nets: &[IpNet], ip: IpAddr) -> bool {
    nets.iter().any(|net| net_contains(net, ip))
}

/// Whether `net` holds `ip`. Every CIDR comparison goes through here: an IPv4-mapped address
/// (`::ffff:a.b.c.d`, which a dual-stack socket connects to as `a.b.c.d`) is compared as the
/// IPv4 address it reaches, and CIDRs written in mapped form are compiled to IPv4
/// ([`canonical_net`]), so `[::ffff:127.0.0.3]` meets the rules written for `127.0.0.3`.
pub fn net_contains(net: &IpNet, ip: IpAddr) -> bool {
    net.contains(&ip.to_canonical())
}

/// `net` as the comparisons see it: a CIDR inside `::ffff:0:0/96` becomes the IPv4 CIDR it
/// maps (`::ffff:127.0.0.0/104` is `127.0.0.0/8`); any other stays as written.
pub fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        _ => net,
    }
}

/// The IPv4 address an IPv6 address carries inside it, by the standard embeddings the
/// destination wall also knows: IPv4-mapped and IPv4-compatible (`::a.b.c.d`), NAT64's
/// well-known prefix (`64:ff9b::/96`), 6to4 (`2002:AABB:CCDD::/48`) and Teredo's client
/// (`2001::/32`, the last 32 bits inverted). Deny rules compare it too: an address denied as
/// IPv4 stays denied in any of these forms.
pub fn embedded_ipv4(ip: std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    use std::net::Ipv4Addr;
    let s = ip.segments();
    let last = |a: u16, b: u16| Ipv4Addr::from((u32::from(a) << 16) | u32::from(b));
    match s {
        [0, 0, 0, 0, 0, 0xffff, a, b] => Some(last(a, b)),
        [0, 0, 0, 0, 0, 0, a, b] if u32::from(a) << 16 | u32::from(b) > 1 => Some(last(a, b)),
        [0x64, 0xff9b, 0, 0, 0, 0, a, b] => Some(last(a, b)),
        [0x2002, a, b, ..] => Some(last(a, b)),
        [0x2001, 0, _, _, _, _, a, b] => Some(last(!a, !b)),
        _ => None,
    }
}

/// The address a client is counted by for per-client limits: its IPv4 address, or its IPv6
/// address cut to `ipv6_prefix` bits (a host holds a whole /64 and can pick any address in it).
pub fn client_key(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => ipnet::Ipv6Net::new(v6, ipv6_prefix.min(128))
            .map_or(IpAddr::V6(v6), |net| IpAddr::V6(net.network())),
        v4 => v4,
    }
}

/// Whether denials are enforced or only reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    /// Allow everything the allow-list would deny, and log it as `would_deny`. The destination
    /// address wall stays in force: report mode never opens the internal network.
    Report,
}

/// One named allow rule, from a built-in profile or the config file.
#[derive(Clone, Debug)]
pub struct Rule {
    pub name: String,
    pub category: String,
    pub hosts: Vec<HostPattern>,
    pub ports: Vec<u16>,
    /// IP literal targets this rule allows (CONNECT 10.20.1.5:443).
    pub addresses: Vec<IpNet>,
    /// Forbidden-range addresses (private, loopback, ...) that names under this rule may
    /// resolve to; `addresses` count too, since listing an address is explicit consent.
    pub private_addresses: Vec<IpNet>,
    /// Where the rule came from: "profile azure-file-sync" or "config".
    pub origin: String,
    /// `addresses` and `private_addresses` together: what the destination wall lets through.
    pub reachable: Vec<IpNet>,
    /// SNI check for tunnels this rule allows; `None` takes `Policy::sni` on port 443 and
    /// no check elsewhere.
    pub sni: Option<SniMode>,
    /// Served only by the plain-HTTP lane (absolute-form GET/HEAD, OCSP POST), never CONNECT:
    /// certificate revocation lists and OCSP.
    pub plain_http: bool,
    /// Service tags (`Storage.WestEurope`, ...) whose prefixes every address its names resolve
    /// to must lie in, and those prefixes merged; empty and `None` without `service_tags`.
    pub service_tags: Vec<String>,
    pub tag_ranges: Option<std::sync::Arc<service_tags::AddressRanges>>,
    /// Whether the exact names a branch uses under this rule's wildcards are learned, and
    /// whether only learned names pass.
    pub learn: Learn,
    /// The way out for this rule's tunnels (`egress`), by position in `Config::egresses`;
    /// beats the branch's and the default.
    pub egress: Option<usize>,
}

/// A rule's learning of destinations per branch (`learn` on an allow rule, or
/// `policy.learn."RULE"` for a profile's rule).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Learn {
    /// Nothing is kept; the rule pays nothing.
    #[default]
    Off,
    /// Everything the rule allows passes; a branch's first tunnel to a name is flagged.
    Record,
    /// Only names learned (recorded or approved) for the branch pass.
    Enforce,
}

impl Learn {
    pub fn as_str(self) -> &'static str {
        match self {
            Learn::Off => "off",
            Learn::Record => "record",
            Learn::Enforce => "enforce",
        }
    }
}

/// Why a resolved address is refused when it lies outside its rule's service tags.
pub const OUTSIDE_SERVICE_TAGS: &str = "outside service tags";
/// A candidate address's refusal when a deny rule's `addresses` hold it.
pub const DENIED_ADDRESS: &str = "denied by rule";
/// A candidate address's refusal when its answer also holds a private endpoint's address and
/// its egress sends through parents: the endpoint is dialled directly, at its private
/// addresses only; this one would leave without the parents.
pub const BESIDE_PRIVATE_ENDPOINT: &str = "beside a private endpoint";

impl Rule {
    /// Whether `ip` is one of this rule's `private_addresses` (a private endpoint's).
    pub fn is_private_endpoint(&self, ip: IpAddr) -> bool {
        self.private_addresses
            .iter()
            .any(|net| net_contains(net, ip))
    }

    /// Whether `ip` passes this rule's service-tag check (always, without tags).
    pub fn in_service_tags(&self, ip: IpAddr) -> bool {
        self.tag_ranges.as_ref().is_none_or(|r| r.contains(ip))
    }
}

/// The service tags file in force: where, and which edition.
#[derive(Clone, Debug)]
pub struct TagsFile {
    pub path: std::path::PathBuf,
    pub change_number: u64,
    pub cloud: String,
    pub tags: usize,
}

impl Rule {
    /// Whether a tunnel to `host` under this rule is learned: only names that one of its
    /// wildcards admits (a name the rule lists exactly is pinned already; IP literals are
    /// listed by CIDR).
    pub fn learns<'h>(&self, host: &'h Host) -> Option<&'h host::DnsName> {
        match host {
            Host::Name(name)
                if self.learn != Learn::Off
                    && !self
                        .hosts
                        .iter()
                        .any(|p| matches!(p, HostPattern::Exact(_)) && p.matches(name)) =>
            {
                Some(name)
            }
            _ => None,
        }
    }

    fn matches_host(&self, host: &Host) -> bool {
        match host {
            Host::Name(name) => self.hosts.iter().any(|p| p.matches(name)),
            Host::Ip(ip) => self.addresses.iter().any(|net| net_contains(net, *ip)),
        }
    }
}

/// One `[[policy.deny]]` rule: checked before every allow rule, so an operator can carve a
/// host (one storage account, all of `*.blob.core.windows.net`) out of a wider allow.
#[derive(Clone, Debug)]
pub struct DenyRule {
    pub name: String,
    pub hosts: Vec<HostPattern>,
    /// Addresses it denies: IP literal targets, and every address a name resolves to (checked
    /// with the destination wall, before any dial), in any IPv4-embedding form too.
    pub addresses: Vec<IpNet>,
    /// `None`: every port.
    pub ports: Option<Vec<u16>>,
    /// `None`: every client; else only these branches (`unassigned` included by that name).
    pub branches: Option<Vec<String>>,
}

impl DenyRule {
    fn applies(&self, host: &Host, port: u16, branch: Option<&str>) -> bool {
        let host = match host {
            Host::Name(name) => self.hosts.iter().any(|p| p.matches(name)),
            Host::Ip(ip) => self.holds(*ip),
        };
        host && self.reaches(port, branch)
    }

    /// Whether `ip`, or the IPv4 address it embeds, is among `addresses`.
    fn holds(&self, ip: IpAddr) -> bool {
        let embedded = match ip {
            IpAddr::V6(v6) => embedded_ipv4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        self.addresses
            .iter()
            .any(|net| net_contains(net, ip) || embedded.is_some_and(|v4| net.contains(&v4)))
    }

    /// Whether it covers `port` for a client of `branch`.
    fn reaches(&self, port: u16, branch: Option<&str>) -> bool {
        self.ports
            .as_ref()
            .is_none_or(|ports| ports.contains(&port))
            && self
                .branches
                .as_ref()
                .is_none_or(|names| branch.is_some_and(|b| names.iter().any(|n| n == b)))
    }
}

/// Rule positions a branch may use (its `allow` list): sorted, so a branch costs what it lists,
/// not what the whole policy holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleSet(Box<[u32]>);

impl RuleSet {
    pub fn new(positions: impl IntoIterator<Item = usize>) -> Self {
        let mut list: Vec<u32> = positions.into_iter().map(|i| i as u32).collect();
        list.sort_unstable();
        list.dedup();
        Self(list.into_boxed_slice())
    }

    /// Whether rule position `i` is in the set.
    pub fn holds(&self, i: usize) -> bool {
        self.0.binary_search(&(i as u32)).is_ok()
    }

    /// The positions, ascending.
    pub fn positions(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().map(|&i| i as usize)
    }
}

/// Whose request a decision is for: the branch (deny rules may list branches) and the allow
/// rules it may use (a branch's `allow` list, by rule position; `None` is all of them). The
/// default is a client not identified yet: only deny rules without branches apply to it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Scope<'a> {
    pub branch: Option<&'a str>,
    pub allowed: Option<&'a RuleSet>,
}

/// What the allow-list says about a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
    /// Report mode let through what enforce would deny.
    WouldDeny,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::WouldDeny => "would_deny",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Decision<'a> {
    pub verdict: Verdict,
    /// The rule that allowed the request, if one did.
    pub rule: Option<&'a Rule>,
    /// The deny rule that refused it, if one did (`reason` is then "denied by rule").
    pub deny_rule: Option<&'a DenyRule>,
    /// Why a request is denied (or would be); "allowed" otherwise.
    pub reason: &'static str,
    /// CIDRs the destination wall opens for this request: the allowing rule's, or in report
    /// mode those of the first rule that lists the host (so a port-only miss still reaches a
    /// private endpoint). Empty for a denial.
    pub reachable: &'a [IpNet],
}

#[derive(Clone, Debug)]
pub struct Policy {
    pub mode: Mode,
    pub rules: Vec<Rule>,
    /// Checked before `rules`, in order.
    pub denies: Vec<DenyRule>,
    /// `policy.service_tags_file`, when set.
    pub service_tags_file: Option<TagsFile>,
    /// Admit clients that match no branch (only matters once branches are configured).
    pub allow_unassigned: bool,
    /// Default SNI check for port-443 tunnels whose rule does not say.
    pub sni: SniMode,
    /// What a reload does to open tunnels.
    pub on_reload: OnReload,
    /// Destinations learned per branch and rule, at most.
    pub learn_limit: usize,
    /// Which of `rules` can match a target (built from them; see [`rule_index`]).
    pub index: rule_index::RuleIndex,
}

/// What a reload does to tunnels that are already open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnReload {
    /// Open tunnels keep the policy they started with.
    Keep,
    /// Tunnels the new policy denies are closed (`end = "closed_by_reload"`).
    CloseDenied,
}

impl Policy {
    /// Every rule category, sorted, once each.
    pub fn categories(&self) -> Vec<&str> {
        let mut categories: Vec<&str> = self.rules.iter().map(|r| r.category.as_str()).collect();
        categories.sort_unstable();
        categories.dedup();
        categories
    }

    /// The SNI check that applies to a tunnel to `port` allowed by `rule`.
    pub fn sni_mode(&self, rule: Option<&Rule>, port: u16) -> SniMode {
        match rule.and_then(|r| r.sni) {
            Some(mode) => mode,
            None if port == 443 => self.sni,
            None => SniMode::Off,
        }
    }
}

impl Policy {
    /// The deny rule whose `addresses` refuse dialling `ip` on `port` for `scope`, if one does:
    /// the check every resolved address meets beside the destination wall.
    pub fn denied_address(&self, ip: IpAddr, port: u16, scope: Scope<'_>) -> Option<&DenyRule> {
        self.denies
            .iter()
            .find(|d| !d.addresses.is_empty() && d.holds(ip) && d.reaches(port, scope.branch))
    }

    /// A deny rule that applies refuses; else the first rule listing both host and port
    /// allows; everything else is denied. `scope.allowed` (a branch's narrowing, by rule
    /// position) skips the rules it does not hold.
    pub fn decide(&self, host: &Host, port: u16, scope: Scope<'_>) -> Decision<'_> {
        if let Some(deny) = self
            .denies
            .iter()
            .find(|d| d.applies(host, port, scope.branch))
        {
            return Decision {
                verdict: match self.mode {
                    Mode::Enforce => Verdict::Deny,
                    Mode::Report => Verdict::WouldDeny,
                },
                rule: None,
                deny_rule: Some(deny),
                reason: "denied by rule",
                reachable: &[],
            };
        }
        let allowed = scope.allowed;
        let mut host_rule: Option<&Rule> = None;
        let mut narrowed_out = false;
        for i in self.index.candidates(host) {
            let rule = &self.rules[i];
            if allowed.is_some_and(|a| !a.holds(i)) {
                narrowed_out |= rule.matches_host(host) && rule.ports.contains(&port);
                continue;
            }
            if rule.matches_host(host) {
                if rule.ports.contains(&port) {
                    return Decision {
                        verdict: Verdict::Allow,
                        rule: Some(rule),
                        deny_rule: None,
                        reason: "allowed",
                        reachable: &rule.reachable,
                    };
                }
                host_rule = host_rule.or(Some(rule));
            }
        }
        let reason = match host {
            _ if narrowed_out => "not allowed for this branch",
            _ if host_rule.is_some() => "port not allowed",
            Host::Ip(_) => "ip literal not allowed",
            Host::Name(_) => "host not allowed",
        };
        let (verdict, reachable) = match self.mode {
            Mode::Enforce => (Verdict::Deny, &[][..]),
            Mode::Report => (
                Verdict::WouldDeny,
                host_rule.map_or(&[][..], |r| &r.reachable[..]),
            ),
        };
        Decision {
            verdict,
            rule: None,
            deny_rule: None,
            reason,
            reachable,
        }
    }
}

impl Decision<'_> {
    /// The reason as the client and the log get it: a deny rule's names it.
    pub fn why(&self) -> std::borrow::Cow<'static, str> {
        match self.deny_rule {
            Some(rule) => format!("denied by rule {}", rule.name).into(),
            None => self.reason.into(),
        }
    }

    /// The rule the log names: the one that allowed, or the deny rule that refused.
    pub fn rule_name(&self) -> Option<&str> {
        self.rule
            .map(|r| r.name.as_str())
            .or(self.deny_rule.map(|d| d.name.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_counted_by_ipv4_address_or_ipv6_prefix() {
        let key = |ip: &str, prefix| client_key(ip.parse().unwrap(), prefix).to_string();
        assert_eq!(key("10.1.2.3", 64), "10.1.2.3");
        assert_eq!(key("::ffff:10.1.2.3", 64), "10.1.2.3");
        assert_eq!(key("2001:db8:1:2:aaaa::1", 64), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2:bbbb::9", 64), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:3::1", 64), "2001:db8:1:3::");
        assert_eq!(key("2001:db8:1:2:aaaa::1", 128), "2001:db8:1:2:aaaa::1");
        assert_eq!(key("2001:db8:1:2:aaaa::1", 48), "2001:db8:1::");
    }
    use crate::policy::host::Target;

    fn rule(name: &str, hosts: &[&str], ports: &[u16], addresses: &[&str]) -> Rule {
        let addresses: Vec<IpNet> = addresses.iter().map(|a| a.parse().unwrap()).collect();
        Rule {
            name: name.into(),
            category: "test".into(),
            hosts: hosts
                .iter()
                .map(|h| HostPattern::parse(h).unwrap())
                .collect(),
            ports: ports.to_vec(),
            reachable: addresses.clone(),
            addresses,
            private_addresses: vec![],
            origin: "test".into(),
            sni: None,
            plain_http: false,
            service_tags: Vec::new(),
            tag_ranges: None,
            learn: Learn::Off,
            egress: None,
        }
    }

    fn policy(mode: Mode, rules: Vec<Rule>) -> Policy {
        Policy {
            index: rule_index::RuleIndex::new(&rules),
            allow_unassigned: false,
            sni: SniMode::Match,
            on_reload: OnReload::Keep,
            mode,
            rules,
            denies: Vec::new(),
            service_tags_file: None,
            learn_limit: 256,
        }
    }

    #[test]
    fn decision_table() {
        let policy = policy(
            Mode::Enforce,
            vec![
                rule("storage", &["*.core.windows.net"], &[443], &[]),
                rule("crl", &["crl.microsoft.com"], &[80], &[]),
                rule("pe", &[], &[443], &["10.20.0.0/16"]),
            ],
        );
        let table: &[(&str, Verdict, Option<&str>, &str)] = &[
            (
                "a.file.core.windows.net:443",
                Verdict::Allow,
                Some("storage"),
                "allowed",
            ),
            (
                "A.FILE.core.windows.net.:443",
                Verdict::Allow,
                Some("storage"),
                "allowed",
            ),
            (
                "a.file.core.windows.net:8443",
                Verdict::Deny,
                None,
                "port not allowed",
            ),
            (
                "core.windows.net:443",
                Verdict::Deny,
                None,
                "host not allowed",
            ),
            ("evil.com:443", Verdict::Deny, None, "host not allowed"),
            (
                "crl.microsoft.com:80",
                Verdict::Allow,
                Some("crl"),
                "allowed",
            ),
            (
                "crl.microsoft.com:443",
                Verdict::Deny,
                None,
                "port not allowed",
            ),
            ("10.20.1.5:443", Verdict::Allow, Some("pe"), "allowed"),
            (
                "10.21.1.5:443",
                Verdict::Deny,
                None,
                "ip literal not allowed",
            ),
            ("[::1]:443", Verdict::Deny, None, "ip literal not allowed"),
            (
                "20.60.1.2:443",
                Verdict::Deny,
                None,
                "ip literal not allowed",
            ),
        ];
        for (target, verdict, rule, reason) in table {
            let t = Target::parse_authority(target).unwrap();
            let d = policy.decide(&t.host, t.port, Scope::default());
            assert_eq!(d.verdict, *verdict, "{target}");
            assert_eq!(d.rule.map(|r| r.name.as_str()), *rule, "{target}");
            assert_eq!(d.reason, *reason, "{target}");
        }
    }

    #[test]
    fn a_branch_narrowing_skips_rules_it_does_not_hold() {
        let policy = policy(
            Mode::Enforce,
            vec![
                rule("contoso", &["contoso.file.core.windows.net"], &[443], &[]),
                rule("storage", &["*.core.windows.net"], &[443], &[]),
            ],
        );
        let only_contoso = RuleSet::new([0]);
        let table: &[(&str, Option<&str>, &str)] = &[
            (
                "contoso.file.core.windows.net:443",
                Some("contoso"),
                "allowed",
            ),
            (
                "fabrikam.file.core.windows.net:443",
                None,
                "not allowed for this branch",
            ),
            ("evil.example:443", None, "host not allowed"),
        ];
        for (target, rule, reason) in table {
            let t = Target::parse_authority(target).unwrap();
            let d = policy.decide(
                &t.host,
                t.port,
                Scope {
                    branch: None,
                    allowed: Some(&only_contoso),
                },
            );
            assert_eq!(
                (d.rule.map(|r| r.name.as_str()), d.reason),
                (*rule, *reason),
                "{target}"
            );
        }
        let t = Target::parse_authority("fabrikam.file.core.windows.net:443").unwrap();
        assert_eq!(
            policy.decide(&t.host, t.port, Scope::default()).verdict,
            Verdict::Allow
        );
    }

    #[test]
    fn report_mode_turns_denials_into_would_deny() {
        let policy = policy(Mode::Report, vec![rule("s", &["a.example"], &[443], &[])]);
        let t = Target::parse_authority("b.example:443").unwrap();
        let d = policy.decide(&t.host, t.port, Scope::default());
        assert_eq!(
            (d.verdict, d.reason),
            (Verdict::WouldDeny, "host not allowed")
        );
        let t = Target::parse_authority("a.example:443").unwrap();
        assert_eq!(
            policy.decide(&t.host, t.port, Scope::default()).verdict,
            Verdict::Allow
        );
    }

    /// The index gives the decisions a scan of every rule gives, on random rule lists (long
    /// enough to be indexed), names, ports and branch narrowings.
    #[test]
    fn the_rule_index_decides_as_a_scan_of_every_rule() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let labels = ["a", "b", "core", "file", "windows", "net"];
        let name = |next: &mut dyn FnMut(u64) -> u64, parts: u64| {
            (0..parts)
                .map(|_| labels[next(labels.len() as u64) as usize])
                .collect::<Vec<_>>()
                .join(".")
        };
        let ports = [443, 80, 8443];
        for round in 0..40 {
            let count = 32 + next(40) as usize;
            let rules: Vec<Rule> = (0..count)
                .map(|i| {
                    let host = match next(3) {
                        0 => {
                            let parts = 1 + next(3);
                            name(&mut next, parts)
                        }
                        _ => {
                            let parts = 1 + next(2);
                            format!("*.{}", name(&mut next, parts))
                        }
                    };
                    let port = ports[next(3) as usize];
                    let addresses: &[&str] = if next(8) == 0 { &["10.0.0.0/8"] } else { &[] };
                    rule(&format!("r{i}"), &[&host], &[port], addresses)
                })
                .collect();
            let indexed = policy(Mode::Enforce, rules.clone());
            let mut scanned = indexed.clone();
            scanned.index = rule_index::RuleIndex::scan_all(rules.len());
            let narrowed = RuleSet::new((0..count).filter(|_| next(4) != 0));
            for _ in 0..200 {
                let host = if next(10) == 0 {
                    Host::Ip("10.1.2.3".parse().unwrap())
                } else {
                    let parts = 1 + next(4);
                    Host::Name(host::DnsName::parse(&name(&mut next, parts)).unwrap())
                };
                let port = ports[next(3) as usize];
                for scope in [
                    Scope::default(),
                    Scope {
                        branch: Some("b"),
                        allowed: Some(&narrowed),
                    },
                ] {
                    let (a, b) = (
                        indexed.decide(&host, port, scope),
                        scanned.decide(&host, port, scope),
                    );
                    assert_eq!(
                        (a.verdict, a.rule_name(), a.reason),
                        (b.verdict, b.rule_name(), b.reason),
                        "round {round}: {host:?}:{port}"
                    );
                }
            }
        }
    }

    #[test]
    fn ipv4_forms_compare_as_their_ipv4_address() {
        let net = |s: &str| canonical_net(s.parse().unwrap());
        assert_eq!(net("::ffff:127.0.0.0/104"), net("127.0.0.0/8"));
        assert_eq!(net("::ffff:0:0/96"), net("0.0.0.0/0"));
        assert_eq!(net("2001:db8::/32").to_string(), "2001:db8::/32");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(net_contains(&net("127.0.0.3/32"), ip("::ffff:127.0.0.3")));
        assert!(!net_contains(&net("127.0.0.3/32"), ip("64:ff9b::7f00:3")));
        let v6 = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap();
        let table: &[(&str, Option<&str>)] = &[
            ("::ffff:127.0.0.3", Some("127.0.0.3")),
            ("::127.0.0.3", Some("127.0.0.3")),
            ("::1", None),
            ("::", None),
            ("64:ff9b::7f00:3", Some("127.0.0.3")),
            ("2002:7f00:3::1", Some("127.0.0.3")),
            ("2001:0:4136:e378:8000:63bf:80ff:fffc", Some("127.0.0.3")),
            ("2001:db8::1", None),
            ("fd00::1", None),
        ];
        for (addr, want) in table {
            let got = embedded_ipv4(v6(addr)).map(|v4| v4.to_string());
            assert_eq!(got.as_deref(), *want, "{addr}");
        }
    }

    #[test]
    fn deny_rules_come_before_every_allow_and_may_name_branches() {
        let mut policy = policy(
            Mode::Enforce,
            vec![rule("storage", &["*.core.windows.net"], &[443], &[])],
        );
        let deny = |name: &str,
                    hosts: &[&str],
                    ports: Option<Vec<u16>>,
                    branches: Option<&[&str]>| DenyRule {
            name: name.into(),
            hosts: hosts
                .iter()
                .map(|h| HostPattern::parse(h).unwrap())
                .collect(),
            addresses: Vec::new(),
            ports,
            branches: branches.map(|b| b.iter().map(|s| s.to_string()).collect()),
        };
        policy.denies = vec![
            deny("no-blob", &["*.blob.core.windows.net"], None, None),
            deny(
                "not-8443",
                &["x.file.core.windows.net"],
                Some(vec![8443]),
                None,
            ),
            deny(
                "paris-not-contoso",
                &["contoso.file.core.windows.net"],
                None,
                Some(&["paris"]),
            ),
        ];
        let paris = Scope {
            branch: Some("paris"),
            allowed: None,
        };
        let london = Scope {
            branch: Some("london"),
            allowed: None,
        };
        let table: &[(&str, Scope<'_>, Verdict, Option<&str>, &str)] = &[
            (
                "acct.blob.core.windows.net:443",
                london,
                Verdict::Deny,
                Some("no-blob"),
                "denied by rule no-blob",
            ),
            (
                "acct.file.core.windows.net:443",
                london,
                Verdict::Allow,
                Some("storage"),
                "allowed",
            ),
            // A deny rule's ports: other ports fall through to the allow rules.
            (
                "x.file.core.windows.net:443",
                london,
                Verdict::Allow,
                Some("storage"),
                "allowed",
            ),
            (
                "contoso.file.core.windows.net:443",
                paris,
                Verdict::Deny,
                Some("paris-not-contoso"),
                "denied by rule paris-not-contoso",
            ),
            (
                "contoso.file.core.windows.net:443",
                london,
                Verdict::Allow,
                Some("storage"),
                "allowed",
            ),
            // A client not identified yet: only deny rules without branches apply.
            (
                "contoso.file.core.windows.net:443",
                Scope::default(),
                Verdict::Allow,
                Some("storage"),
                "allowed",
            ),
        ];
        for (target, scope, verdict, rule, why) in table {
            let t = Target::parse_authority(target).unwrap();
            let d = policy.decide(&t.host, t.port, *scope);
            assert_eq!(
                (d.verdict, d.rule_name(), d.why().as_ref()),
                (*verdict, *rule, *why),
                "{target}"
            );
        }
        policy.mode = Mode::Report;
        let t = Target::parse_authority("acct.blob.core.windows.net:443").unwrap();
        assert_eq!(
            policy.decide(&t.host, t.port, london).verdict,
            Verdict::WouldDeny
        );
    }
}
