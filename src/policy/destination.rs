//! The SSRF wall: which resolved addresses the gateway may connect to. Every address is classified
//! against the ranges a public cloud service never lives in; an address in one of them passes only
//! when the rule that allowed the request lists a CIDR containing it.

use ipnet::IpNet;
use std::net::IpAddr;
use std::sync::LazyLock;

/// Ranges refused by default, each with the name that appears in logs and error replies.
/// Order matters only for naming: the first match names the reason.
const FORBIDDEN: &[(&str, &str)] = &[
    // IPv4
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "cgnat"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "ietf-protocol"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4-relay"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("240.0.0.0/4", "reserved"),
    // IPv6
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::ffff:0:0/96", "ipv4-mapped"),
    ("::/96", "ipv4-compatible"),
    ("64:ff9b::/96", "nat64"),
    ("64:ff9b:1::/48", "nat64"),
    ("100::/64", "discard"),
    ("2001::/32", "teredo"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("2002::/16", "6to4"),
    ("fc00::/7", "private"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
];

/// `FORBIDDEN`, parsed once.
static FORBIDDEN_NETS: LazyLock<Vec<(IpNet, &'static str)>> = LazyLock::new(|| {
    FORBIDDEN
        .iter()
        .map(|(cidr, name)| (cidr.parse().expect("FORBIDDEN holds valid CIDRs"), *name))
        .collect()
});

/// The name of the forbidden range holding `ip`, or `None` for an ordinary public address.
pub fn forbidden_range(ip: IpAddr) -> Option<&'static str> {
    FORBIDDEN_NETS
        .iter()
        .find_map(|(net, name)| net.contains(&ip).then_some(*name))
}

/// Whether the gateway may connect to `ip`: public, or inside one of `allowed` (the CIDRs the
/// matching rule lists). `Err` names the forbidden range.
pub fn vet(ip: IpAddr, allowed: &[IpNet]) -> Result<(), &'static str> {
    match forbidden_range(ip) {
        None => Ok(()),
        Some(_) if allowed.iter().any(|net| super::net_contains(net, ip)) => Ok(()),
        Some(range) => Err(range),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_table_parses() {
        for (cidr, _) in FORBIDDEN {
            cidr.parse::<IpNet>()
                .unwrap_or_else(|e| panic!("{cidr}: {e}"));
        }
    }

    #[test]
    fn classification_table() {
        let table: &[(&str, Option<&str>)] = &[
            ("0.0.0.0", Some("unspecified")),
            ("10.1.2.3", Some("private")),
            ("172.16.0.1", Some("private")),
            ("172.31.255.255", Some("private")),
            ("172.32.0.1", None),
            ("192.168.1.1", Some("private")),
            ("127.0.0.1", Some("loopback")),
            ("127.255.0.9", Some("loopback")),
            ("169.254.169.254", Some("link-local")),
            ("100.64.0.1", Some("cgnat")),
            ("100.127.255.254", Some("cgnat")),
            ("100.128.0.1", None),
            ("224.0.0.1", Some("multicast")),
            ("255.255.255.255", Some("broadcast")),
            ("192.0.2.10", Some("documentation")),
            ("198.51.100.7", Some("documentation")),
            ("203.0.113.9", Some("documentation")),
            ("20.60.1.2", None),
            ("52.239.0.1", None),
            ("::", Some("unspecified")),
            ("::1", Some("loopback")),
            ("::ffff:127.0.0.1", Some("ipv4-mapped")),
            ("::ffff:20.60.1.2", Some("ipv4-mapped")),
            ("64:ff9b::a00:1", Some("nat64")),
            ("2002:a00:1::", Some("6to4")),
            ("2001:0:4136:e378::1", Some("teredo")),
            ("2001:db8::1", Some("documentation")),
            ("fd00::1", Some("private")),
            ("fc00::1", Some("private")),
            ("fe80::1", Some("link-local")),
            ("ff02::1", Some("multicast")),
            ("2603:1030::1", None),
        ];
        for (ip, want) in table {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(forbidden_range(ip), *want, "{ip}");
        }
    }

    #[test]
    fn rule_cidrs_open_the_wall_only_where_they_reach() {
        let allowed: Vec<IpNet> = vec!["10.20.0.0/16".parse().unwrap()];
        assert_eq!(vet("10.20.1.5".parse().unwrap(), &allowed), Ok(()));
        assert_eq!(vet("10.21.0.1".parse().unwrap(), &allowed), Err("private"));
        assert_eq!(
            vet("169.254.169.254".parse().unwrap(), &allowed),
            Err("link-local")
        );
        assert_eq!(vet("20.60.1.2".parse().unwrap(), &[]), Ok(()));
    }
}
