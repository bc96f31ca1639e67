//! `[resolver]`: DNS servers (clear text, or DNS over TLS or HTTPS with the resolver's own CA),
//! the lookup timeout, and static host overrides (a listed name never goes to DNS; tests and
//! private endpoints use them).

use super::paths::Paths;
use super::problems::Problems;
use super::raw::RawResolver;
use super::values::duration;
use super::{DEFAULT_DNS_TIMEOUT, ResolverSettings};
use crate::policy::host::DnsName;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use toml::Spanned;

/// One DNS server: where it is and how to talk to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsServer {
    pub addr: SocketAddr,
    pub transport: DnsTransport,
}

/// How queries travel to a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsTransport {
    /// UDP, and TCP for long answers (port 53 unless given).
    Plain,
    /// DNS over TLS (RFC 7858), port 853 unless given; `name` is checked in the certificate.
    Tls { name: String },
    /// DNS over HTTPS (RFC 8484, HTTP/2), port 443 unless given.
    Https { name: String, path: String },
}

impl DnsServer {
    /// TLS or HTTPS.
    pub fn encrypted(&self) -> bool {
        self.transport != DnsTransport::Plain
    }

    /// Parses `IP`, `IP:PORT`, `tls://IP[:PORT]#NAME` or `https://IP[:PORT][/PATH]#NAME`
    /// (an IPv6 address with a port in brackets).
    pub fn parse(text: &str) -> Result<Self, String> {
        const SHAPES: &str = "expected IP, IP:PORT, tls://IP[:PORT]#NAME or \
                              https://IP[:PORT][/PATH]#NAME";
        let (scheme, rest) = match text.split_once("://") {
            Some((scheme, rest)) => (Some(scheme), rest),
            None => (None, text),
        };
        let Some(scheme) = scheme else {
            return socket_addr(text, 53).map(|addr| DnsServer {
                addr,
                transport: DnsTransport::Plain,
            });
        };
        let (rest, name) = match rest.rsplit_once('#') {
            Some((rest, name)) => (rest, name),
            None => {
                return Err(format!(
                    "{text:?}: an encrypted server needs the name its certificate carries \
                     after `#` ({SHAPES})"
                ));
            }
        };
        let name = DnsName::parse(name)
            .map_err(|why| format!("{text:?}: the name after `#`: {why}"))?
            .to_string();
        match scheme {
            "tls" => Ok(DnsServer {
                addr: socket_addr(rest, 853).map_err(|e| format!("{text:?}: {e}"))?,
                transport: DnsTransport::Tls { name },
            }),
            "https" => {
                let (host, path) = match rest.find('/') {
                    Some(at) => (&rest[..at], &rest[at..]),
                    None => (rest, "/dns-query"),
                };
                if path.contains(['?', ' ']) {
                    return Err(format!("{text:?}: the path takes no query or space"));
                }
                Ok(DnsServer {
                    addr: socket_addr(host, 443).map_err(|e| format!("{text:?}: {e}"))?,
                    transport: DnsTransport::Https {
                        name,
                        path: path.to_owned(),
                    },
                })
            }
            other => Err(format!("{text:?}: unknown scheme {other:?}; {SHAPES}")),
        }
    }
}

/// `IP` (with `port`) or `IP:PORT`; the server is an address, never a name (no DNS to find DNS).
fn socket_addr(text: &str, port: u16) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>()
        .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, port)))
        .map_err(|_| format!("{text:?} is not an IP address or IP:PORT"))
}

impl fmt::Display for DnsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.transport {
            DnsTransport::Plain => write!(f, "{}", self.addr),
            DnsTransport::Tls { name } => write!(f, "tls://{}#{name}", self.addr),
            DnsTransport::Https { name, path } => write!(f, "https://{}{path}#{name}", self.addr),
        }
    }
}

pub(super) fn compile(
    p: &mut Problems<'_>,
    raw: &RawResolver,
    paths: &Paths<'_>,
) -> ResolverSettings {
    let servers: Vec<DnsServer> = raw
        .servers
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            DnsServer::parse(s.get_ref())
                .map_err(|e| p.add(s.span(), format!("resolver.servers[{i}]"), e))
                .ok()
        })
        .collect();
    let encrypted = servers.iter().filter(|s| s.encrypted()).count();
    if encrypted > 0 && encrypted < servers.len() {
        let at = raw
            .servers
            .iter()
            .find(|s| DnsServer::parse(s.get_ref()).is_ok_and(|s| !s.encrypted()));
        p.add(
            at.map_or(0..0, |s| s.span()),
            "resolver.servers",
            "clear-text and encrypted servers mixed: there is no fallback to clear-text DNS, \
             so list only tls:// and https:// servers (or only clear-text ones)",
        );
    }
    let ca = raw.ca.as_ref().map(|v| paths.resolve(p, v, "resolver.ca"));
    match (&raw.ca, encrypted > 0) {
        (None, true) if !raw.hosts_only => {
            let at = raw.servers.iter().find(|s| s.get_ref().contains("://"));
            p.add(
                at.map_or(0..0, |s| s.span()),
                "resolver.ca",
                "encrypted DNS servers need `resolver.ca`, the CA file that signs their \
                 certificates (there are no built-in roots)",
            );
        }
        (Some(v), false) => p.add(
            v.span(),
            "resolver.ca",
            "`resolver.ca` is only for tls:// and https:// servers, and none is listed",
        ),
        _ => {}
    }
    ResolverSettings {
        servers,
        ca,
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
