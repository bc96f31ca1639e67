//! The open tunnels as operators see and steer them: a [`Registry`] every tunnel joins when
//! its relay starts and leaves when it ends (one short lock on one of [`SHARDS`] maps each
//! time, nothing per chunk: the bytes are the relay's own counts, see [`crate::tunnel::Live`]),
//! listed and closed by [`Filter`]; the branches' drain and quarantine ([`holds`]); and the
//! tunnels a reload no longer admits as their branch ([`revoke`]).

pub mod filter;
pub mod fleet;
pub mod holds;
pub mod revoke;
pub mod view;

pub use filter::{Filter, Sort};
pub use holds::{Hold, Holds};

use crate::config::Config;
use crate::end::End;
use crate::tunnel::Live;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Maps the registry is split over, so tunnels starting and ending on different cores rarely
/// meet on one lock.
pub const SHARDS: usize = 16;

/// How a tunnel's client was identified as its branch: what a reload must still admit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentifiedBy {
    /// A verified client certificate's name (the one that matched).
    Certificate(Box<str>),
    /// Proxy credentials of this user.
    User(Box<str>),
    /// Its source network.
    Network,
    /// No branch: admitted as `unassigned`.
    Unassigned,
}

impl IdentifiedBy {
    pub fn as_str(&self) -> &'static str {
        match self {
            IdentifiedBy::Certificate(_) => "certificate",
            IdentifiedBy::User(_) => "user",
            IdentifiedBy::Network => "network",
            IdentifiedBy::Unassigned => "unassigned",
        }
    }
}

/// One open tunnel: what it is (fixed at start) and its live state. Kept small (every open
/// tunnel has one): names are the snapshot's shared strings, the target one short string.
pub struct Tunnel {
    /// The connection id (the access line's `conn_id`).
    pub id: u64,
    pub opened: Instant,
    pub branch: Arc<str>,
    pub identified: IdentifiedBy,
    pub client: SocketAddr,
    /// The CONNECT target, `host:port`.
    pub target: Box<str>,
    /// The address dialled (a parent proxy's, through one).
    pub dialled: Option<SocketAddr>,
    /// The `[egress.NAME]` it left through, when egresses are configured.
    pub egress: Option<Box<str>>,
    /// The parent proxy that carries it.
    pub parent: Option<Box<str>>,
    pub rule: Option<Arc<str>>,
    pub category: Arc<str>,
    pub live: Live,
    rates: Mutex<Samples>,
}

/// The two latest byte samples a rate is taken between: (milliseconds since the tunnel
/// opened, bytes up, bytes down).
#[derive(Clone, Copy)]
struct Samples {
    older: (u64, u64, u64),
    newer: (u64, u64, u64),
}

/// A rate is measured over at least this long (between the two latest samples).
const RATE_WINDOW_MS: u64 = 1000;

/// What a tunnel is, fixed when it opens.
pub struct Opened {
    pub id: u64,
    pub branch: Arc<str>,
    pub identified: IdentifiedBy,
    pub client: SocketAddr,
    pub target: Box<str>,
    pub dialled: Option<SocketAddr>,
    pub rule: Option<Arc<str>>,
    pub category: Arc<str>,
}

impl Tunnel {
    pub fn new(opened: Opened, live: Live) -> Self {
        Self {
            id: opened.id,
            opened: Instant::now(),
            branch: opened.branch,
            identified: opened.identified,
            client: opened.client,
            target: opened.target,
            dialled: opened.dialled,
            egress: None,
            parent: None,
            rule: opened.rule,
            category: opened.category,
            live,
            rates: Mutex::new(Samples {
                older: (0, 0, 0),
                newer: (0, 0, 0),
            }),
        }
    }

    /// The CONNECT target's host (IPv6 literals in brackets).
    pub fn host(&self) -> &str {
        self.target
            .rsplit_once(':')
            .map_or(&*self.target, |(host, _)| host)
    }

    /// When it opened, on the wall clock.
    pub fn started(&self, now: Instant) -> jiff::Timestamp {
        let age = jiff::SignedDuration::try_from(self.age(now)).unwrap_or_default();
        jiff::Timestamp::now()
            .checked_sub(age)
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
    }

    /// Bytes per second each way (up, down), measured between the two latest samples (a new
    /// sample is taken when the latest is a second old; the first rate is the average since
    /// the tunnel opened).
    pub fn rates(&self, now: Instant) -> (u64, u64) {
        let (up, down) = self.live.bytes();
        let at = u64::try_from(self.age(now).as_millis()).unwrap_or(u64::MAX);
        let mut samples = self.rates.lock().unwrap_or_else(|e| e.into_inner());
        if at.saturating_sub(samples.newer.0) >= RATE_WINDOW_MS {
            samples.older = samples.newer;
            samples.newer = (at, up, down);
        }
        let (then, up_then, down_then) = samples.older;
        let seconds = at.saturating_sub(then) as f64 / 1000.0;
        if seconds < 0.001 {
            return (0, 0);
        }
        let per_second = |now: u64, then: u64| (now.saturating_sub(then) as f64 / seconds) as u64;
        (per_second(up, up_then), per_second(down, down_then))
    }

    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.opened)
    }
}

/// Every open tunnel of the process (shared by every snapshot), and the branches' holds.
#[derive(Default)]
pub struct Registry {
    shards: [Mutex<HashMap<u64, Arc<Tunnel>>>; SHARDS],
    open: AtomicUsize,
    pub holds: Holds,
    /// The generation of the snapshot in force (see [`Registry::check_late`]).
    current_generation: AtomicU64,
    /// Runs a function on the configuration in force (the server sets it at start).
    in_force: std::sync::OnceLock<InForce>,
}

/// Runs the function it is given on the configuration in force, if the gateway still runs.
pub type InForce = Box<dyn Fn(&mut dyn FnMut(&Config)) + Send + Sync>;

/// A tunnel in the registry, taken out when dropped.
pub struct Registered<'r> {
    registry: &'r Registry,
    pub tunnel: Arc<Tunnel>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let id = self.tunnel.id;
        self.registry
            .shard(id)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.registry.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Registry {
    fn shard(&self, id: u64) -> &Mutex<HashMap<u64, Arc<Tunnel>>> {
        &self.shards[(id % SHARDS as u64) as usize]
    }

    /// Adds `tunnel` until the returned guard drops. A tunnel of a branch quarantined (or past
    /// its drain deadline) meanwhile is stopped at once.
    pub fn register(&self, tunnel: Tunnel) -> Registered<'_> {
        let tunnel = Arc::new(tunnel);
        self.shard(tunnel.id)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tunnel.id, tunnel.clone());
        self.open.fetch_add(1, Ordering::Relaxed);
        // A hold set between this tunnel's admission and now missed it in its sweep.
        if let Some(end) = self.holds.closes(&tunnel.branch) {
            tunnel.live.stop(end);
        }
        Registered {
            registry: self,
            tunnel,
        }
    }

    /// How to reach the configuration in force, for [`Registry::check_late`].
    pub fn follow(&self, in_force: InForce) {
        let _ = self.in_force.set(in_force);
    }

    /// The snapshot of `generation` is in force now (a reload stored it).
    pub fn now_current(&self, generation: u64) {
        self.current_generation.store(generation, Ordering::SeqCst);
    }

    /// `tunnel`, just registered, was admitted under `admitted` (of `generation`): when a
    /// reload came meanwhile its sweeps ran before the tunnel was here, so it gets them now
    /// against the configuration in force (revocation, and `close-denied`).
    pub fn check_late(&self, tunnel: &Tunnel, admitted: &Config, generation: u64) {
        if self.current_generation.load(Ordering::SeqCst) == generation {
            return;
        }
        let Some(in_force) = self.in_force.get() else {
            return;
        };
        in_force(&mut |now: &Config| {
            if !revoke::still_admitted(tunnel, admitted, now) {
                tunnel.live.stop(End::IdentityRevoked);
            } else if now.policy.on_reload == crate::policy::OnReload::CloseDenied
                && denied(tunnel, now)
            {
                tunnel.live.stop(End::ClosedByReload);
            }
        });
    }

    /// Open tunnels now.
    pub fn len(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every open tunnel (each lock held only to copy its map's handles).
    pub fn all(&self) -> Vec<Arc<Tunnel>> {
        let mut all = Vec::with_capacity(self.len() + 16);
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            all.extend(shard.values().cloned());
        }
        all
    }

    /// The open tunnels `filter` selects, sorted and limited as it says (a listing without a
    /// limit: [`filter::DEFAULT_LIMIT`]), with their rates.
    pub fn select(&self, filter: &Filter) -> Vec<(Arc<Tunnel>, (u64, u64))> {
        let mut chosen = self.select_all(filter);
        chosen.truncate(filter.limit.unwrap_or(filter::DEFAULT_LIMIT));
        chosen
    }

    /// Every open tunnel `filter` selects, sorted, cut only at the filter's own limit.
    pub fn select_all(&self, filter: &Filter) -> Vec<(Arc<Tunnel>, (u64, u64))> {
        let now = Instant::now();
        let mut chosen: Vec<_> = self
            .all()
            .into_iter()
            .filter(|t| filter.holds_fixed(t, now))
            .map(|t| {
                let rates = t.rates(now);
                (t, rates)
            })
            .filter(|(_, (up, down))| filter.min_rate.is_none_or(|min| up + down >= min))
            .collect();
        filter.sort(&mut chosen, now);
        if let Some(limit) = filter.limit {
            chosen.truncate(limit);
        }
        chosen
    }

    /// Stops every open tunnel `filter` selects (all of them, or its `limit` first by its
    /// sort) with `end`; returns their ids.
    pub fn close(&self, filter: &Filter, end: End) -> Vec<u64> {
        self.select_all(filter)
            .into_iter()
            .filter(|(t, _)| t.live.stop(end))
            .map(|(t, _)| t.id)
            .collect()
    }

    /// Under `on_reload = "close-denied"`: stops the open tunnels `config`'s policy denies
    /// (`closed_by_reload`); returns how many. A branch the reload removed is judged as
    /// unassigned.
    pub fn close_denied(&self, config: &Config) -> usize {
        self.all()
            .iter()
            .filter(|t| denied(t, config) && t.live.stop(End::ClosedByReload))
            .count()
    }

    /// Puts `hold` on `branch` (`None`: takes its hold off) and does what it says now: a
    /// quarantine closes the branch's open tunnels, a drain arms its deadline (then they
    /// close, unless the hold changed meanwhile). Returns the hold replaced and the tunnels
    /// closed now.
    pub fn hold(self: &Arc<Self>, branch: &str, hold: Option<Hold>) -> (Option<Hold>, usize) {
        let Some(hold) = hold else {
            return (self.holds.release(branch), 0);
        };
        let before = self.holds.set(branch, hold);
        let closed = match hold {
            Hold::Quarantine => self.close_branch(branch, End::BranchQuarantined),
            Hold::Drain { deadline, .. } => {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let registry = self.clone();
                    let branch = branch.to_owned();
                    runtime.spawn(async move {
                        tokio::time::sleep_until(deadline.into()).await;
                        if registry.holds.of(&branch) == Some(hold) {
                            let closed = registry.close_branch(&branch, End::BranchDrained);
                            tracing::info!(%branch, closed_tunnels = closed, "drain deadline: closed the branch's open tunnels");
                        }
                    });
                }
                0
            }
        };
        (before, closed)
    }

    /// Stops every open tunnel of `branch` with `end`; returns how many.
    pub fn close_branch(&self, branch: &str, end: End) -> usize {
        self.all()
            .iter()
            .filter(|t| &*t.branch == branch && t.live.stop(end))
            .count()
    }
}

/// Whether `config`'s policy denies `tunnel`'s target to its branch (a branch it no longer
/// has is judged as unassigned).
fn denied(tunnel: &Tunnel, config: &Config) -> bool {
    let identity = config
        .identity_named(&tunnel.branch)
        .unwrap_or(crate::config::Identity::Unassigned);
    let Ok(target) = crate::policy::host::Target::parse_authority(&tunnel.target) else {
        return false;
    };
    let decision = config
        .policy
        .decide(&target.host, target.port, config.scope(identity));
    decision.verdict == crate::policy::Verdict::Deny
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tunnel(id: u64, branch: &str) -> Tunnel {
        Tunnel::new(
            Opened {
                id,
                branch: branch.into(),
                identified: IdentifiedBy::Network,
                client: "127.0.0.1:5000".parse().unwrap(),
                target: "a.example:443".into(),
                dialled: None,
                rule: None,
                category: "storage".into(),
            },
            Live::default(),
        )
    }

    #[test]
    fn tunnels_join_and_leave_and_a_branch_close_stops_only_its_own() {
        let registry = Registry::default();
        let a = registry.register(tunnel(1, "london"));
        let b = registry.register(tunnel(2, "paris"));
        assert_eq!(registry.len(), 2);
        assert_eq!(registry.close_branch("london", End::BranchQuarantined), 1);
        assert!(a.tunnel.live.stopped());
        assert!(!b.tunnel.live.stopped());
        drop(a);
        assert_eq!(registry.len(), 1);
        assert_eq!(registry.all().len(), 1);
    }

    #[test]
    fn a_rate_is_the_bytes_between_samples_a_second_apart() {
        let t = tunnel(1, "london");
        assert_eq!(t.host(), "a.example");
        let start = t.opened;
        t.live.add(1000, 0);
        // The first rate is the average since the tunnel opened.
        assert_eq!(t.rates(start + Duration::from_secs(2)), (500, 0));
        t.live.add(3000, 4000);
        assert_eq!(t.rates(start + Duration::from_secs(3)), (3000, 4000));
    }
}

#[cfg(test)]
mod size {
    /// Every open tunnel holds one (docs/benchmarks.md: memory per idle tunnel).
    #[test]
    fn a_tunnel_record_stays_small() {
        let size = std::mem::size_of::<super::Tunnel>();
        eprintln!("Tunnel: {size} bytes");
        // 2026-12-07: 336 bytes (names shared with the snapshot, the target one short string).
        assert!(size <= 336, "Tunnel is {size} bytes");
    }
}
