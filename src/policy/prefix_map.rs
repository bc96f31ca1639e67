//! A routing-style table from networks to values: the most specific network holding an address
//! wins (longest prefix). One hash map per prefix length in use, probed from the longest, so a
//! lookup costs one probe per distinct length in the table, not one per network: ten thousand
//! branches on /24s cost what one does. IPv4-mapped addresses are looked up as IPv4.

use ipnet::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;

/// Networks to values, looked up by longest prefix.
#[derive(Clone, Debug)]
pub struct PrefixMap<T> {
    /// By prefix length, longest first; keys are the networks' first addresses.
    v4: Vec<(u8, HashMap<u32, T>)>,
    v6: Vec<(u8, HashMap<u128, T>)>,
}

impl<T> Default for PrefixMap<T> {
    fn default() -> Self {
        Self {
            v4: Vec::new(),
            v6: Vec::new(),
        }
    }
}

impl<T> PrefixMap<T> {
    /// Adds `net` (its host bits ignored); `Err(value)` when the table holds `net` already.
    pub fn insert(&mut self, net: IpNet, value: T) -> Result<(), T> {
        match super::canonical_net(net).trunc() {
            IpNet::V4(n) => insert(&mut self.v4, n.prefix_len(), n.network().into(), value),
            IpNet::V6(n) => insert(&mut self.v6, n.prefix_len(), n.network().into(), value),
        }
    }

    /// The most specific network holding `ip`, and its value.
    pub fn longest_match(&self, ip: IpAddr) -> Option<(IpNet, &T)> {
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let bits = u32::from(v4);
                self.v4.iter().find_map(|(len, map)| {
                    let key = bits & mask32(*len);
                    let value = map.get(&key)?;
                    let net = ipnet::Ipv4Net::new(key.into(), *len).ok()?;
                    Some((IpNet::V4(net), value))
                })
            }
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                self.v6.iter().find_map(|(len, map)| {
                    let key = bits & mask128(*len);
                    let value = map.get(&key)?;
                    let net = ipnet::Ipv6Net::new(key.into(), *len).ok()?;
                    Some((IpNet::V6(net), value))
                })
            }
        }
    }

    /// Whether the table holds no network.
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
}

fn insert<K: std::hash::Hash + Eq, T>(
    by_length: &mut Vec<(u8, HashMap<K, T>)>,
    len: u8,
    key: K,
    value: T,
) -> Result<(), T> {
    let at = match by_length.iter().position(|(l, _)| *l <= len) {
        Some(i) if by_length[i].0 == len => i,
        Some(i) => {
            by_length.insert(i, (len, HashMap::new()));
            i
        }
        None => {
            by_length.push((len, HashMap::new()));
            by_length.len() - 1
        }
    };
    match by_length[at].1.entry(key) {
        std::collections::hash_map::Entry::Occupied(_) => Err(value),
        std::collections::hash_map::Entry::Vacant(slot) => {
            slot.insert(value);
            Ok(())
        }
    }
}

fn mask32(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn mask128(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_most_specific_network_wins_whatever_the_order() {
        let mut map = PrefixMap::default();
        map.insert(net("10.0.0.0/8"), "wide").unwrap();
        map.insert(net("10.1.4.0/24"), "narrow").unwrap();
        map.insert(net("0.0.0.0/0"), "all").unwrap();
        map.insert(net("2001:db8::/32"), "v6").unwrap();
        map.insert(net("2001:db8:1::/48"), "v6-narrow").unwrap();
        let table: &[(&str, Option<(&str, &str)>)] = &[
            ("10.1.4.20", Some(("10.1.4.0/24", "narrow"))),
            ("10.1.5.20", Some(("10.0.0.0/8", "wide"))),
            ("::ffff:10.1.4.1", Some(("10.1.4.0/24", "narrow"))),
            ("192.0.2.1", Some(("0.0.0.0/0", "all"))),
            ("2001:db8:1::5", Some(("2001:db8:1::/48", "v6-narrow"))),
            ("2001:db8:2::5", Some(("2001:db8::/32", "v6"))),
            ("fd00::1", None),
        ];
        for (addr, want) in table {
            let got = map
                .longest_match(ip(addr))
                .map(|(n, v)| (n.to_string(), *v));
            let want = want.map(|(n, v)| (n.to_owned(), v));
            assert_eq!(got, want, "{addr}");
        }
    }

    #[test]
    fn a_network_is_held_once_and_host_bits_do_not_matter() {
        let mut map = PrefixMap::default();
        assert!(map.is_empty());
        map.insert(net("10.1.4.0/24"), 1).unwrap();
        assert_eq!(map.insert(net("10.1.4.0/24"), 2), Err(2));
        assert_eq!(map.insert(net("::ffff:10.1.4.0/120"), 3), Err(3));
        map.insert(net("10.1.4.7/32"), 4).unwrap();
        assert_eq!(map.longest_match(ip("10.1.4.7")).map(|(_, v)| *v), Some(4));
        assert_eq!(map.longest_match(ip("10.1.4.8")).map(|(_, v)| *v), Some(1));
    }

    /// Against the plain scan for the longest holder, on random tables and addresses.
    #[test]
    fn lookups_match_a_scan_of_every_network() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let mut map = PrefixMap::default();
            let mut nets = Vec::new();
            for i in 0..20 {
                let len = (next() % 33) as u8;
                let addr = std::net::Ipv4Addr::from((next() as u32) & 0x0a0b_ffff);
                let n = IpNet::V4(ipnet::Ipv4Net::new(addr, len).unwrap().trunc());
                if map.insert(n, i).is_ok() {
                    nets.push((n, i));
                }
            }
            for _ in 0..50 {
                let a = IpAddr::V4(std::net::Ipv4Addr::from((next() as u32) & 0x0a0b_ffff));
                let scan = nets
                    .iter()
                    .filter(|(n, _)| n.contains(&a))
                    .max_by_key(|(n, _)| n.prefix_len())
                    .map(|(n, i)| (*n, *i));
                let got = map.longest_match(a).map(|(n, i)| (n, *i));
                assert_eq!(got, scan, "{a}");
            }
        }
    }
}
