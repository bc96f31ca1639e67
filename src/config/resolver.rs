//! `[resolver]`: DNS servers, the lookup timeout, and static host overrides (a listed name never
//! goes to DNS; tests and private endpoints use them).

use super::problems::Problems;
use super::raw::RawResolver;
use super::values::duration;
use super::{DEFAULT_DNS_TIMEOUT, ResolverSettings};
use crate::policy::host::DnsName;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use toml::Spanned;

pub(super) fn compile(p: &mut Problems<'_>, raw: &RawResolver) -> ResolverSettings {
    ResolverSettings {
        servers: raw
            .servers
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let key = format!("resolver.servers[{i}]");
                let text = s.get_ref();
                match text.parse::<SocketAddr>() {
                    Ok(addr) => Some(addr),
                    Err(_) => match text.parse::<IpAddr>() {
                        Ok(ip) => Some(SocketAddr::new(ip, 53)),
                        Err(_) => {
                            p.add(
                                s.span(),
                                key,
                                "expected an IP address or IP:PORT of a DNS server",
                            );
                            None
                        }
                    },
                }
            })
            .collect(),
        timeout: duration(
            p,
            raw.timeout.as_ref(),
            "resolver.timeout",
            DEFAULT_DNS_TIMEOUT,
        ),
        hosts: static_hosts(p, &raw.hosts),
        hosts_only: raw.hosts_only,
    }
}

fn static_hosts(
    p: &mut Problems<'_>,
    raw: &BTreeMap<Spanned<String>, Spanned<toml::Value>>,
) -> BTreeMap<DnsName, Vec<IpAddr>> {
    let mut hosts = BTreeMap::new();
    for (name, value) in raw {
        let key = format!("resolver.hosts.{:?}", name.get_ref());
        let dns_name = match DnsName::parse(name.get_ref()) {
            Ok(n) => Some(n),
            Err(why) => {
                p.add(
                    name.span(),
                    key.clone(),
                    format!("{why}; expected a DNS name"),
                );
                None
            }
        };
        let texts: Vec<&toml::Value> = match value.get_ref() {
            toml::Value::Array(items) => items.iter().collect(),
            single => vec![single],
        };
        let mut addrs = Vec::new();
        for item in &texts {
            match item.as_str().and_then(|s| s.parse::<IpAddr>().ok()) {
                Some(ip) => addrs.push(ip),
                None => {
                    let shown = item
                        .as_str()
                        .map_or_else(|| format!("a {}", item.type_str()), |s| format!("{s:?}"));
                    p.add(
                        value.span(),
                        key.clone(),
                        format!("{shown}: expected an IP address or a list of them"),
                    )
                }
            }
        }
        if texts.is_empty() {
            p.add(
                value.span(),
                key.clone(),
                "expected at least one IP address",
            );
        }
        if let Some(n) = dns_name {
            hosts.insert(n, addrs);
        }
    }
    hosts
}
