//! Name resolution owned by the gateway: static overrides first (a listed name never goes to
//! DNS), then hickory-resolver with its cache and a hard timeout. The caller gets every address
//! once and vets and dials exactly those; nothing here resolves twice.

use crate::config::ResolverSettings;
use crate::policy::host::DnsName;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{LookupIpStrategy, ResolveHosts, ResolverConfig};
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
}

impl Resolver {
    /// Builds the resolver; reads the system's resolv.conf unless servers are configured.
    pub fn new(settings: &ResolverSettings) -> Result<Self, String> {
        let dns = if settings.hosts_only {
            None
        } else {
            let mut builder = if settings.servers.is_empty() {
                TokioResolver::builder_tokio()
                    .map_err(|e| format!("cannot read the system DNS configuration: {e}"))?
            } else {
                let servers = settings
                    .servers
                    .iter()
                    .map(|addr| {
                        let mut server =
                            hickory_resolver::config::NameServerConfig::udp_and_tcp(addr.ip());
                        for conn in &mut server.connections {
                            conn.port = addr.port();
                        }
                        server
                    })
                    .collect();
                TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(servers),
                    TokioRuntimeProvider::default(),
                )
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
        // Boxed: hickory's lookup future is over 1 KiB, and every connection's task would
        // otherwise carry that space for its whole life, idle tunnels included.
        let lookup = Box::pin(tokio::time::timeout(
            self.timeout,
            dns.lookup_ip(fqdn.as_str()),
        ));
        match lookup.await {
            Err(_) => Err(ResolveError::Timeout),
            Ok(Err(e)) => Err(classify(&e)),
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

fn classify(e: &NetError) -> ResolveError {
    if e.is_no_records_found() || e.is_nx_domain() {
        ResolveError::NotFound
    } else if matches!(e, NetError::Timeout) {
        ResolveError::Timeout
    } else {
        ResolveError::Failed(e.to_string())
    }
}
