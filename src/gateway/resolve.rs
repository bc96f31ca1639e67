//! Name resolution owned by the gateway: static overrides first (a listed name never goes to
//! DNS), then hickory-resolver with its cache and a hard timeout. The caller gets every address
//! once and vets and dials exactly those; nothing here resolves twice. Encrypted servers (DNS
//! over TLS or HTTPS) are trusted through `resolver.ca` only, and a certificate the CA does not
//! vouch for is reported as the trust failure it is ([`trust`]).

mod trust;

use crate::config::{DnsServer, DnsTransport, Egress, ResolverSettings};
use crate::policy::host::DnsName;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

/// Why a name did not resolve.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error("no address for the name")]
    NotFound,
    #[error("DNS did not answer in time")]
    Timeout,
    #[error("DNS lookup failed: {0}")]
    Failed(String),
    /// An encrypted resolver's certificate was refused: `resolver.ca` does not vouch for it.
    #[error("TLS trust failure with the encrypted DNS resolver: {0}")]
    Untrusted(String),
    /// An encrypted resolver could not be asked (down, refusing, broken TLS); never retried in
    /// clear text.
    #[error("encrypted DNS resolver failed: {0}")]
    EncryptedFailed(String),
}

impl ResolveError {
    /// The status to answer with: an encrypted resolver that cannot be asked or trusted is a
    /// gateway without an answer (504), like one that does not answer in time.
    pub fn status(&self) -> u16 {
        match self {
            ResolveError::NotFound | ResolveError::Failed(_) => 502,
            ResolveError::Timeout
            | ResolveError::Untrusted(_)
            | ResolveError::EncryptedFailed(_) => 504,
        }
    }
}

/// Where an answer came from, for logs and `explain`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Override,
    Dns,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Override => "override",
            Source::Dns => "dns",
        }
    }
}

pub struct Resolver {
    overrides: BTreeMap<DnsName, Vec<IpAddr>>,
    /// Both families; `None` when DNS is switched off (`hosts_only`).
    dns: Option<TokioResolver>,
    /// IPv4 only and IPv6 only, built only when an egress allows just one family.
    single: [Option<TokioResolver>; 2],
    /// Per egress with a source address: queries leave from it too (its families' strategy).
    bound: Vec<(String, TokioResolver)>,
    timeout: Duration,
    /// With encrypted servers: the verdicts on their certificates, to name trust failures.
    trust: Option<std::sync::Arc<trust::Verdicts>>,
}

impl Resolver {
    /// Builds the resolver; reads the system's resolv.conf unless servers are configured. One
    /// hickory resolver (and cache) per lookup strategy the egresses need: both families, and
    /// IPv4 only or IPv6 only when an egress allows just that family.
    pub fn new(settings: &ResolverSettings, egresses: &[Egress]) -> Result<Self, String> {
        let mut trust = None;
        let tls = match &settings.ca {
            Some(ca) if settings.servers.iter().any(|s| s.encrypted()) => {
                let (config, verdicts) = trust::client_config(ca)?;
                trust = Some(verdicts);
                Some(config)
            }
            _ => None,
        };
        let build = |strategy| match settings.hosts_only {
            true => Ok(None),
            false => hickory(settings, tls.clone(), strategy, None).map(Some),
        };
        let mut bound = Vec::new();
        for e in egresses
            .iter()
            .filter(|e| e.source_ipv4.is_some() || e.source_ipv6.is_some())
        {
            if !settings.hosts_only {
                let resolver = hickory(settings, tls.clone(), strategy_of(e), Some(e))?;
                bound.push((e.name.clone(), resolver));
            }
        }
        let needs = |v4: bool| egresses.iter().any(|e| e.ipv4 == v4 && e.ipv6 != v4);
        let single = [
            if needs(true) {
                build(LookupIpStrategy::Ipv4Only)?
            } else {
                None
            },
            if needs(false) {
                build(LookupIpStrategy::Ipv6Only)?
            } else {
                None
            },
        ];
        Ok(Self {
            overrides: settings.hosts.clone(),
            // Both families, asked in parallel, IPv4 first (hickory's default puts AAAA first):
            // the dial races them from the first address's family, and a storage firewall that
            // admits the site's public IPv4 addresses sees those first.
            dns: build(LookupIpStrategy::Ipv4AndIpv6)?,
            single,
            bound,
            timeout: settings.timeout,
            trust,
        })
    }

    /// All addresses for `name`, overrides first; never asks DNS for an overridden name.
    /// For a request through `egress`: DNS is asked for its families only, from its source
    /// address when it has one.
    /// An override answers at once; a DNS lookup is one boxed future (hickory's lookup is over
    /// 1 KiB, and every connection's task would otherwise carry that space for its whole life,
    /// idle tunnels included).
    pub fn resolve<'a>(
        &'a self,
        name: &'a DnsName,
        egress: Option<&Egress>,
    ) -> impl std::future::Future<Output = Result<(Vec<IpAddr>, Source), ResolveError>> + 'a {
        use futures_util::future::{Either, ready};
        if let Some(addrs) = self.overrides.get(name) {
            return Either::Left(ready(Ok((addrs.clone(), Source::Override))));
        }
        let dns = match egress {
            None => None,
            Some(e) => match self.bound.iter().find(|(n, _)| *n == e.name) {
                Some((_, bound)) => Some(bound),
                None => match (e.ipv4, e.ipv6) {
                    (true, false) => self.single[0].as_ref(),
                    (false, true) => self.single[1].as_ref(),
                    _ => None,
                },
            },
        };
        Either::Right(Box::pin(self.lookup(name, dns.or(self.dns.as_ref()))))
    }

    async fn lookup(
        &self,
        name: &DnsName,
        dns: Option<&TokioResolver>,
    ) -> Result<(Vec<IpAddr>, Source), ResolveError> {
        let Some(dns) = dns else {
            return Err(ResolveError::NotFound);
        };
        // A trailing dot makes the name absolute: no search-domain suffixes, one query per type.
        let fqdn = format!("{name}.");
        let asked = std::time::Instant::now();
        let lookup = tokio::time::timeout(self.timeout, dns.lookup_ip(fqdn.as_str()));
        match lookup.await {
            Err(_) => Err(ResolveError::Timeout),
            Ok(Err(e)) => Err(match (classify(&e), &self.trust) {
                (ResolveError::Failed(why), Some(trust)) => match trust.refused_since(asked) {
                    Some(refused) => ResolveError::Untrusted(refused),
                    None => ResolveError::EncryptedFailed(why),
                },
                (other, _) => other,
            }),
            Ok(Ok(lookup)) => {
                let addrs: Vec<IpAddr> = lookup.iter().collect();
                if addrs.is_empty() {
                    Err(ResolveError::NotFound)
                } else {
                    Ok((addrs, Source::Dns))
                }
            }
        }
    }
}

/// The lookup strategy for an egress's families (IPv4 first when both).
fn strategy_of(egress: &Egress) -> LookupIpStrategy {
    match (egress.ipv4, egress.ipv6) {
        (true, false) => LookupIpStrategy::Ipv4Only,
        (false, true) => LookupIpStrategy::Ipv6Only,
        _ => LookupIpStrategy::Ipv4AndIpv6,
    }
}

/// A hickory resolver asking the configured servers (or the system's) with `strategy`, its
/// queries leaving from `bound`'s source address for each server's family when given.
fn hickory(
    settings: &ResolverSettings,
    tls: Option<rustls::ClientConfig>,
    strategy: LookupIpStrategy,
    bound: Option<&Egress>,
) -> Result<TokioResolver, String> {
    let config = match (settings.servers.is_empty(), bound) {
        (true, None) => None,
        (true, Some(_)) => Some(
            hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| format!("cannot read the system DNS configuration: {e}"))?
                .0,
        ),
        (false, _) => Some(ResolverConfig::from_name_servers(
            settings.servers.iter().map(name_server).collect(),
        )),
    };
    let mut builder = match config {
        None => TokioResolver::builder_tokio()
            .map_err(|e| format!("cannot read the system DNS configuration: {e}"))?,
        Some(config) => TokioResolver::builder_with_config(
            bind_sources(config, bound),
            TokioRuntimeProvider::default(),
        ),
    };
    if let Some(tls) = tls {
        builder = builder.with_tls_config(tls);
    }
    let opts = builder.options_mut();
    opts.timeout = settings.timeout;
    // Our overrides are the only static hosts; /etc/hosts does not describe the internet.
    opts.use_hosts_file = ResolveHosts::Never;
    opts.ip_strategy = strategy;
    builder
        .build()
        .map_err(|e| format!("cannot build the DNS resolver: {e}"))
}

/// `config` with every connection to a server bound to `egress`'s source address of the
/// server's family. An egress with a source address asks only servers of a family it has one
/// for: a query never leaves from an address nobody chose (none left: lookups fail, 504).
fn bind_sources(config: ResolverConfig, egress: Option<&Egress>) -> ResolverConfig {
    let Some(egress) = egress else {
        return config;
    };
    let (domain, search, mut servers) = config.into_parts();
    if egress.source_ipv4.is_some() || egress.source_ipv6.is_some() {
        servers.retain(|server| {
            let bound = egress.source_for(server.ip).is_some();
            if !bound {
                tracing::warn!(egress = %egress.name, server = %server.ip, "egress has no source address of this DNS server's family: its lookups skip the server");
            }
            bound
        });
    }
    for server in &mut servers {
        let bind = egress
            .source_for(server.ip)
            .map(|ip| std::net::SocketAddr::new(ip, 0));
        for conn in &mut server.connections {
            conn.bind_addr = bind;
        }
    }
    ResolverConfig::from_parts(domain, search, servers)
}

/// hickory's configuration for one of our servers.
fn name_server(server: &DnsServer) -> NameServerConfig {
    let ip = server.addr.ip();
    let mut config = match &server.transport {
        DnsTransport::Plain => NameServerConfig::udp_and_tcp(ip),
        DnsTransport::Tls { name } => NameServerConfig::tls(ip, name.as_str().into()),
        DnsTransport::Https { name, path } => {
            NameServerConfig::https(ip, name.as_str().into(), Some(path.as_str().into()))
        }
    };
    for conn in &mut config.connections {
        conn.port = server.addr.port();
    }
    config
}

fn classify(e: &NetError) -> ResolveError {
    if e.is_no_records_found() || e.is_nx_domain() {
        ResolveError::NotFound
    } else if matches!(e, NetError::Timeout) {
        ResolveError::Timeout
    } else {
        ResolveError::Failed(e.to_string())
    }
}
