//! Name resolution owned by the gateway: static overrides first (a listed name never goes to
//! DNS), then hickory-resolver with its cache and a hard timeout. The caller gets every address
//! once and vets and dials exactly those; nothing here resolves twice. Encrypted servers (DNS
//! over TLS or HTTPS) are trusted through `resolver.ca` only, and a certificate the CA does not
//! vouch for is reported as the trust failure it is ([`trust`]).

mod trust;

use crate::config::{DnsServer, DnsTransport, ResolverSettings};
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
    /// `None` when DNS is switched off (`hosts_only`).
    dns: Option<TokioResolver>,
    timeout: Duration,
    /// With encrypted servers: the verdicts on their certificates, to name trust failures.
    trust: Option<std::sync::Arc<trust::Verdicts>>,
}

impl Resolver {
    /// Builds the resolver; reads the system's resolv.conf unless servers are configured.
    pub fn new(settings: &ResolverSettings) -> Result<Self, String> {
        let mut trust = None;
        let dns = if settings.hosts_only {
            None
        } else {
            let mut builder = if settings.servers.is_empty() {
                TokioResolver::builder_tokio()
                    .map_err(|e| format!("cannot read the system DNS configuration: {e}"))?
            } else {
                let servers = settings.servers.iter().map(name_server).collect();
                let builder = TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(servers),
                    TokioRuntimeProvider::default(),
                );
                match &settings.ca {
                    Some(ca) if settings.servers.iter().any(|s| s.encrypted()) => {
                        let (config, verdicts) = trust::client_config(ca)?;
                        trust = Some(verdicts);
                        builder.with_tls_config(config)
                    }
                    _ => builder,
                }
            };
            let opts = builder.options_mut();
            opts.timeout = settings.timeout;
            // Our overrides are the only static hosts; /etc/hosts does not describe the internet.
            opts.use_hosts_file = ResolveHosts::Never;
            // Both families, asked in parallel, IPv4 first (hickory's default puts AAAA first):
            // the dial races them from the first address's family, and a storage firewall that
            // admits the site's public IPv4 addresses sees those first.
            opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
            Some(
                builder
                    .build()
                    .map_err(|e| format!("cannot build the DNS resolver: {e}"))?,
            )
        };
        Ok(Self {
            overrides: settings.hosts.clone(),
            dns,
            timeout: settings.timeout,
            trust,
        })
    }

    /// All addresses for `name`, overrides first; never asks DNS for an overridden name.
    pub async fn resolve(&self, name: &DnsName) -> Result<(Vec<IpAddr>, Source), ResolveError> {
        if let Some(addrs) = self.overrides.get(name) {
            return Ok((addrs.clone(), Source::Override));
        }
        let Some(dns) = &self.dns else {
            return Err(ResolveError::NotFound);
        };
        // A trailing dot makes the name absolute: no search-domain suffixes, one query per type.
        let fqdn = format!("{name}.");
        let asked = std::time::Instant::now();
        // Boxed: hickory's lookup future is over 1 KiB, and every connection's task would
        // otherwise carry that space for its whole life, idle tunnels included.
        let lookup = Box::pin(tokio::time::timeout(
            self.timeout,
            dns.lookup_ip(fqdn.as_str()),
        ));
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
