//! One client connection, from accept to log line: the request head ([`request`]), who the
//! client is ([`identity`], [`tls`], [`proxy_protocol`]), the [`plan`] (policy, resolve, the
//! destination wall), [`dial`], the SNI check ([`sni`], [`hello_retry`]), the plain-HTTP
//! [`lane`], and how it ends ([`refusal`]). [`connect`] is the path top to bottom; [`Gateway`]
//! is the snapshot every connection shares (replaced whole by a reload).

pub mod connect;
pub mod crl_cache;
pub mod dial;
pub mod hello_retry;
pub mod identity;
pub mod lane;
#[cfg(test)]
mod mutations;
pub mod pending;
pub mod plan;
pub mod proxy_protocol;
pub mod refusal;
pub mod replies;
pub mod request;
pub mod resolve;
pub mod revocable;
pub mod sni;
pub mod sni_check;
pub mod tls;

pub use connect::{serve, serve_tls};
pub use plan::{Candidate, Plan, plan};
pub use refusal::Refusal;
pub use revocable::Revocable;

use crate::bandwidth::Throttles;
use crate::config::{Config, UNASSIGNED};
use crate::metrics::{Metrics, TunnelSeries};
use governor::{DefaultKeyedRateLimiter, Quota};
use identity::{Identifier, Identity};
use resolve::Resolver;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use tokio_rustls::TlsAcceptor;

/// What every connection shares: the compiled config, the resolver, who-is-who, and the
/// counters behind per-branch and per-client limits.
pub struct Gateway {
    pub config: Config,
    pub resolver: Resolver,
    pub identifier: Identifier,
    /// Open tunnels per branch, by branch position (only counted where a limit is set). Shared
    /// by name with the snapshot a reload replaces, so limits hold across reloads.
    open_tunnels: Vec<Arc<AtomicU32>>,
    /// One acceptor per `listen.tls_proxy` entry, built from the files at load (and reload).
    pub tls_acceptors: Vec<Arc<TlsAcceptor>>,
    /// Shared by every snapshot: counters survive reloads.
    pub metrics: Arc<Metrics>,
    /// Open tunnels a reload may close (tracked only under `on_reload = "close-denied"`);
    /// shared by every snapshot.
    pub revocable: Arc<Revocable>,
    /// Notified at the drain timeout: every open tunnel ends (`drain_timeout`) and writes its
    /// access line before the process exits; shared by every snapshot.
    pub closing: Arc<tokio::sync::Notify>,
    /// Unfinished request heads per client address; shared by every snapshot.
    pub pending_heads: Arc<pending::PendingHeads>,
    /// Fresh CRL answers of the plain-HTTP lane.
    pub crl_cache: crl_cache::CrlCache,
    /// Bandwidth budgets of the schedules; buckets carry over reloads by budget.
    pub throttles: Throttles,
    /// Each branch's (by position; `unassigned` last) tunnel series per rule category, found
    /// once here so opening a tunnel takes no lock and makes no label strings.
    tunnel_series: Vec<Vec<(String, TunnelSeries)>>,
    /// CONNECT requests per client address, when `limits.connect_rate_per_client` is set.
    connect_rate: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

impl Gateway {
    pub fn new(config: Config) -> Result<Self, String> {
        Self::replacing(config, None)
    }

    /// A snapshot that takes over from `previous` (a reload): branch tunnel counters carry over
    /// by branch name; everything else is built afresh from `config` and the files it names.
    pub fn replacing(config: Config, previous: Option<&Gateway>) -> Result<Self, String> {
        let resolver = Resolver::new(&config.resolver)?;
        let identifier = Identifier::new(&config);
        let open_tunnels = config
            .branches
            .iter()
            .map(|b| {
                previous
                    .and_then(|p| {
                        let i = p
                            .config
                            .branches
                            .iter()
                            .position(|old| old.name == b.name)?;
                        Some(p.open_tunnels[i].clone())
                    })
                    .unwrap_or_default()
            })
            .collect();
        let tls_acceptors = match &config.tls {
            None => Vec::new(),
            Some(settings) => config
                .listen
                .tls_proxy
                .iter()
                .map(|l| tls::acceptor(settings, l.client_certificates).map(Arc::new))
                .collect::<Result<_, _>>()?,
        };
        let connect_rate = config
            .limits
            .connect_rate_per_client
            .map(|rate| DefaultKeyedRateLimiter::keyed(Quota::per_second(rate)));
        let metrics: Arc<Metrics> = previous.map_or_else(
            || Arc::new(Metrics::new(crate::policy::profiles::VERSION)),
            |p| p.metrics.clone(),
        );
        // Built last (nothing after can fail): taking over a bucket retunes it for everyone.
        let branch_names: Vec<&str> = config
            .branches
            .iter()
            .map(|b| b.name.as_str())
            .chain([UNASSIGNED])
            .collect();
        let categories = config.policy.categories();
        metrics.expect_series(&branch_names, &categories);
        let tunnel_series = branch_names
            .iter()
            .map(|branch| {
                categories
                    .iter()
                    .map(|&c| (c.to_owned(), metrics.tunnel_series(c, branch)))
                    .collect()
            })
            .collect();
        let throttles = Throttles::new(
            &config.schedules,
            &branch_names,
            previous.map(|p| &p.throttles),
            Some(metrics.clone()),
        );
        throttles.retune(jiff::Timestamp::now());
        Ok(Self {
            config,
            resolver,
            identifier,
            open_tunnels,
            tls_acceptors,
            crl_cache: crl_cache::CrlCache::default(),
            throttles,
            tunnel_series,
            metrics,
            revocable: previous.map_or_else(Default::default, |p| p.revocable.clone()),
            pending_heads: previous.map_or_else(Default::default, |p| p.pending_heads.clone()),
            closing: previous.map_or_else(Default::default, |p| p.closing.clone()),
            connect_rate,
        })
    }

    /// Forgets idle per-address rate-limit state; the server calls this now and then.
    pub fn forget_idle_counters(&self) {
        self.identifier.forget_idle_counters();
        if let Some(limiter) = &self.connect_rate {
            limiter.retain_recent();
        }
    }

    /// Counts a tunnel against its branch's `max_tunnels`; `None` when the branch is full.
    pub(crate) fn admit_tunnel(&self, identity: Identity) -> Option<TunnelSlot<'_>> {
        let Some(i) = identity else {
            return Some(TunnelSlot(None));
        };
        let Some(max) = self.config.branches[i].max_tunnels else {
            return Some(TunnelSlot(None));
        };
        let counter: &AtomicU32 = &self.open_tunnels[i];
        let admitted = counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then(|| open + 1)
            })
            .is_ok();
        // Built only when counted: a slot decrements when dropped.
        admitted.then(|| TunnelSlot(Some(counter)))
    }

    /// The series a tunnel of `identity` in `category` counts in: from the table built at load,
    /// created in the metrics only for a pair the table lacks.
    pub fn tunnel_series(&self, identity: identity::Identity, category: &str) -> TunnelSeries {
        let branch = identity.unwrap_or(self.config.branches.len());
        match self
            .tunnel_series
            .get(branch)
            .and_then(|by_category| by_category.iter().find(|(c, _)| c == category))
        {
            Some((_, series)) => series.clone(),
            None => self
                .metrics
                .tunnel_series(category, identity::name(&self.config.branches, identity)),
        }
    }

    pub fn client_allowed(&self, ip: IpAddr) -> bool {
        crate::policy::in_networks(&self.config.listen.clients, ip)
    }
}

/// A tunnel counted against its branch's limit until dropped.
pub(crate) struct TunnelSlot<'g>(Option<&'g AtomicU32>);

impl Drop for TunnelSlot<'_> {
    fn drop(&mut self) {
        if let Some(counter) = self.0 {
            counter.fetch_sub(1, Ordering::AcqRel);
        }
    }
}
