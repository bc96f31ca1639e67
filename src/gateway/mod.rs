//! One client connection, from accept to log line: the request head ([`request`]), who the
//! client is ([`identity`], [`tls`], [`proxy_protocol`]), the [`plan`] (policy, resolve, the
//! destination wall), [`dial`], the SNI check ([`sni`], [`hello_retry`]), the plain-HTTP
//! [`lane`], and how it ends ([`refusal`]). [`connect`] is the path top to bottom; [`Snapshot`]
//! is the snapshot every connection shares (replaced whole by a reload).

pub mod connect;
pub mod dial;
pub mod egress;
pub mod hello_retry;
pub mod identity;
pub mod lane;
pub mod lane_cache;
#[cfg(test)]
mod mutations;
pub mod parent;
pub mod pending;
pub mod plan;
pub mod proxy_protocol;
pub mod refusal;
pub mod replies;
pub mod request;
pub mod resolve;
pub mod sni;
pub mod sni_check;
pub mod tls;

pub use connect::{serve, serve_tls};
pub use plan::{Candidate, Plan, plan};
pub use refusal::Refusal;

use crate::bandwidth::Throttles;
use crate::config::{Config, Identity, UNASSIGNED};
use crate::fleet::Fleet;
use crate::learned::metrics::LearnedMetrics;
use crate::learned::{Learned, Noted};
use crate::metrics::{Metrics, TunnelSeries};
use crate::policy::{Learn, Rule};
use governor::{DefaultKeyedRateLimiter, Quota};
use identity::Identifier;
use resolve::Resolver;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use tokio_rustls::TlsAcceptor;

/// What every connection shares: the compiled config, the resolver, who-is-who, and the
/// counters behind per-branch and per-client limits.
pub struct Snapshot {
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
    /// Every open tunnel, and the branches' holds (drain, quarantine); shared by every
    /// snapshot.
    pub live: Arc<crate::live::Registry>,
    /// Notified at the drain timeout: every open tunnel ends (`drain_timeout`) and writes its
    /// access line before the process exits; shared by every snapshot.
    pub closing: Arc<crate::tunnel::Closing>,
    /// Unfinished request heads per client address; shared by every snapshot.
    pub pending_heads: Arc<pending::PendingHeads>,
    /// Fresh CRL answers of the plain-HTTP lane.
    pub lane_cache: lane_cache::LaneCache,
    /// Bandwidth budgets of the schedules; buckets carry over reloads by budget.
    pub throttles: Throttles,
    /// Each branch's (by position; `unassigned` last) tunnel series per rule category, found
    /// once here so opening a tunnel takes no lock and makes no label strings.
    tunnel_series: Vec<Vec<(String, TunnelSeries)>>,
    /// CONNECT requests per client address, when `limits.connect_rate_per_client` is set.
    connect_rate: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// With `[fleet]`: limits shared with the other replicas; one per process, made with the
    /// first snapshot (a reload keeps it: `[fleet]` changes apply at restart).
    pub fleet: Option<Arc<Fleet>>,
    /// Destinations each branch used under rules that learn; shared by every snapshot.
    pub learned: Arc<Learned>,
    /// Branch, rule and category names as open tunnels share them (no string per tunnel).
    pub names: TunnelNames,
    /// Counts reloads: one more than the snapshot this one replaced. A tunnel admitted under
    /// an older one than the registry's current is checked again as it registers.
    pub generation: u64,
    /// Last, so it is dropped after everything above: a replaced snapshot is freed when the
    /// last connection that started on it ends (at once on an idle gateway), and then its
    /// memory, and the garbage of the parse that replaced it, go back to the system.
    _release_memory: crate::process::memory::ReleaseOnDrop,
}

impl Snapshot {
    pub fn new(config: Config) -> Result<Self, String> {
        Self::replacing(config, None)
    }

    /// A snapshot that takes over from `previous` (a reload): branch tunnel counters carry over
    /// by branch name; everything else is built afresh from `config` and the files it names.
    pub fn replacing(config: Config, previous: Option<&Snapshot>) -> Result<Self, String> {
        let resolver = Resolver::new(&config.resolver, &config.egresses.list)?;
        let (metrics, fleet, learned) = match previous {
            Some(p) => {
                fleet_changed(p, &config);
                (p.metrics.clone(), p.fleet.clone(), p.learned.clone())
            }
            None => {
                let mut metrics = Metrics::new(crate::policy::profiles::VERSION);
                let learned = Learned::new(LearnedMetrics::register(metrics.registry_mut()));
                let fleet = match &config.fleet {
                    None => None,
                    Some(settings) => Some(Arc::new(Fleet::new(
                        settings.clone(),
                        metrics.registry_mut(),
                    )?)),
                };
                (Arc::new(metrics), fleet, Arc::new(learned))
            }
        };
        learned.open(&config)?;
        parent::series_from_the_start(&config, &metrics.way_out);
        let identifier = Identifier::new(&config, fleet.clone());
        // Tunnel counts carry over by branch name (one map, not a scan per branch: 10,000
        // branches made that 50 million name comparisons per reload).
        let previous_counts: HashMap<&str, &Arc<AtomicU32>> = previous
            .map(|p| {
                p.config
                    .branches
                    .iter()
                    .map(|b| b.name.as_str())
                    .zip(&p.open_tunnels)
                    .collect()
            })
            .unwrap_or_default();
        let open_tunnels = config
            .branches
            .iter()
            .map(|b| {
                previous_counts
                    .get(b.name.as_str())
                    .map(|&count| count.clone())
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
        // Built last (nothing after can fail): taking over a bucket retunes it for everyone.
        let branch_names: Vec<&str> = config
            .branches
            .iter()
            .map(|b| b.name.as_str())
            .chain([UNASSIGNED])
            .collect();
        metrics.service_tags_change_number.set(
            config
                .policy
                .service_tags_file
                .as_ref()
                .map_or(0, |t| t.change_number as i64),
        );
        let categories = config.policy.categories();
        metrics.expect_series(&branch_names, &categories);
        for (i, rule) in config.policy.rules.iter().enumerate() {
            if rule.learn == Learn::Off {
                continue;
            }
            for (b, branch) in branch_names.iter().enumerate() {
                let may = config
                    .branches
                    .get(b)
                    .and_then(|b| b.allowed_rules.as_ref());
                if may.is_none_or(|allowed| allowed.holds(i)) {
                    learned.metrics.expect(branch, &rule.name);
                }
            }
        }
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
        )
        .with_queue(config.limits.throttle_queue);
        if let Some(fleet) = &fleet {
            // New budgets start at the fallback share until the refresh task takes theirs.
            let share = crate::fleet::shares::fraction_ppm(fleet.settings.fallback_share);
            for budget in throttles.budgets().filter(|b| !b.bucket.measured()) {
                budget.bucket.set_share(share, throttles.now());
            }
        }
        throttles.retune(jiff::Timestamp::now());
        let names = TunnelNames::new(&config);
        Ok(Self {
            names,
            config,
            resolver,
            identifier,
            open_tunnels,
            tls_acceptors,
            lane_cache: lane_cache::LaneCache::default(),
            throttles,
            tunnel_series,
            metrics,
            live: previous.map_or_else(Default::default, |p| p.live.clone()),
            pending_heads: previous.map_or_else(Default::default, |p| p.pending_heads.clone()),
            closing: previous.map_or_else(Default::default, |p| p.closing.clone()),
            connect_rate,
            fleet,
            learned,
            generation: previous.map_or(0, |p| p.generation + 1),
            _release_memory: crate::process::memory::ReleaseOnDrop,
        })
    }

    /// A tunnel of `identity` to `host:port` under `rule`, which learns, has opened: counted,
    /// learned when new (record). True when it is the branch's first to it.
    pub fn note_destination(&self, identity: Identity, rule: &Rule, host: &str, port: u16) -> bool {
        let branch = self.config.branch_name(identity);
        let noted = self.learned.note(
            (branch, &rule.name),
            host,
            port,
            rule.learn,
            self.config.policy.learn_limit,
        );
        matches!(noted, Noted::New | Noted::Full)
    }

    /// Forgets idle per-address rate-limit state; the server calls this now and then.
    pub fn forget_idle_counters(&self) {
        self.identifier.forget_idle_counters();
        if let Some(limiter) = &self.connect_rate {
            limiter.retain_recent();
        }
    }

    /// Counts a tunnel against its branch's `max_tunnels`; `None` when the branch is full. In
    /// fleet mode Redis counts (one call, bounded by the refresh interval); when it does not
    /// answer, this replica decides alone against its fallback share of the limit.
    pub(crate) async fn admit_tunnel(&self, identity: Identity) -> Option<TunnelSlot<'_>> {
        let Identity::Branch(id) = identity else {
            return Some(TunnelSlot::default());
        };
        let i = id.index();
        let branch = &self.config.branches[i];
        let Some(max) = branch.max_tunnels else {
            return Some(TunnelSlot::default());
        };
        let counter = &self.open_tunnels[i];
        if let Some(fleet) = &self.fleet {
            // Counted here before Redis is asked, and (on close) taken off here only after
            // Redis: a refresh writing this count meanwhile may count a tunnel too many for
            // one refresh, never one too few.
            let before = counter.fetch_add(1, Ordering::AcqRel);
            // Dropped unless admitted (a refusal, or this future dropped while Redis answers),
            // the slot takes the count back.
            let mut slot = TunnelSlot {
                counter: Some(counter),
                fleet: None,
            };
            // Boxed: only tunnels of limited branches in fleet mode pay for this future.
            return match Box::pin(fleet.open_tunnel(&branch.name, max, before)).await {
                Some(true) => {
                    slot.fleet = Some((fleet, &branch.name));
                    Some(slot)
                }
                Some(false) => None,
                None => (before < fleet.fallback_max(max)).then_some(slot),
            };
        }
        let admitted = counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then(|| open + 1)
            })
            .is_ok();
        // Built only when counted (lazily: a slot decrements when dropped).
        admitted.then(|| TunnelSlot {
            counter: Some(counter),
            fleet: None,
        })
    }

    /// The series a tunnel of `identity` in `category` counts in: from the table built at load,
    /// created in the metrics only for a pair the table lacks.
    pub fn tunnel_series(&self, identity: Identity, category: &str) -> TunnelSeries {
        let branch = identity
            .branch()
            .map_or(self.config.branches.len(), |id| id.index());
        match self
            .tunnel_series
            .get(branch)
            .and_then(|by_category| by_category.iter().find(|(c, _)| c == category))
        {
            Some((_, series)) => series.clone(),
            None => self
                .metrics
                .tunnel_series(category, self.config.branch_name(identity)),
        }
    }

    pub fn client_allowed(&self, ip: IpAddr) -> bool {
        crate::policy::in_networks(&self.config.listen.clients, ip)
    }
}

/// The names an open tunnel is listed under, made once per snapshot and shared by its tunnels
/// (a clone is a reference count, not a string).
pub struct TunnelNames {
    /// By branch position; `unassigned` last.
    branches: Vec<Arc<str>>,
    /// Each rule's name and category, by position in `policy.rules`.
    rules: Vec<(Arc<str>, Arc<str>)>,
    /// The category of a tunnel without a rule.
    pub no_category: Arc<str>,
}

impl TunnelNames {
    fn new(config: &Config) -> Self {
        let branches = config
            .branches
            .iter()
            .map(|b| Arc::from(b.name.as_str()))
            .chain([Arc::from(UNASSIGNED)])
            .collect();
        let rules = config
            .policy
            .rules
            .iter()
            .map(|r| (Arc::from(r.name.as_str()), Arc::from(r.category.as_str())))
            .collect();
        Self {
            branches,
            rules,
            no_category: Arc::from("none"),
        }
    }

    pub fn branch(&self, identity: Identity) -> Arc<str> {
        let at = identity
            .branch()
            .map_or(self.branches.len() - 1, |id| id.index());
        self.branches[at].clone()
    }

    /// `rule`'s name and category: found by its place in `config.policy.rules` (one
    /// subtraction, whatever the number of rules), or made afresh for a rule from elsewhere.
    pub fn rule(&self, config: &Config, rule: &Rule) -> (Arc<str>, Arc<str>) {
        let rules = &config.policy.rules;
        let offset = (rule as *const Rule as usize).wrapping_sub(rules.as_ptr() as usize);
        let at = offset / std::mem::size_of::<Rule>().max(1);
        match (rules.get(at), self.rules.get(at)) {
            (Some(r), Some(names)) if std::ptr::eq(r, rule) => names.clone(),
            _ => (
                Arc::from(rule.name.as_str()),
                Arc::from(rule.category.as_str()),
            ),
        }
    }
}

/// A tunnel counted against its branch's limit until dropped (locally, and in Redis when it
/// was counted there).
#[derive(Default)]
pub(crate) struct TunnelSlot<'g> {
    counter: Option<&'g Arc<AtomicU32>>,
    fleet: Option<(&'g Arc<Fleet>, &'g String)>,
}

impl Drop for TunnelSlot<'_> {
    fn drop(&mut self) {
        match (self.counter, self.fleet) {
            // Counted in Redis: taken off there first, then here.
            (Some(counter), Some((fleet, branch))) => fleet.closed_tunnel(branch, counter.clone()),
            (Some(counter), None) => {
                counter.fetch_sub(1, Ordering::AcqRel);
            }
            _ => {}
        }
    }
}

impl crate::fleet::refresh::Shared for Snapshot {
    fn throttles(&self) -> &Throttles {
        &self.throttles
    }

    fn tunnel_counts(&self) -> Vec<(&str, u32)> {
        self.config
            .branches
            .iter()
            .zip(&self.open_tunnels)
            .filter(|(b, _)| b.max_tunnels.is_some())
            .map(|(b, n)| (b.name.as_str(), n.load(Ordering::Relaxed)))
            .collect()
    }
}

/// A reload cannot change `[fleet]` (one client and task per process): say so.
fn fleet_changed(previous: &Snapshot, config: &Config) {
    let was = previous.fleet.as_ref().map(|f| &f.settings);
    let same = match (was, &config.fleet) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.redis == b.redis
                && a.name == b.name
                && a.refresh == b.refresh
                && a.lease == b.lease
                && a.fallback_share == b.fallback_share
        }
        _ => false,
    };
    if !same {
        tracing::warn!("reload: [fleet] changes take effect at the next restart");
    }
}
