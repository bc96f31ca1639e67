//! Fleet mode: replicas behind one load balancer enforce one set of limits, shared through
//! Redis (or Valkey): one endpoint, a Redis Cluster or a Sentinel set, all behind [`link`]
//! (every key carries a hash tag, every script touches one slot). Bandwidth: every `refresh`,
//! one pipelined round trip reports each budget's demand and takes this replica's share
//! ([`refresh`], [`shares`], [`scripts`]); local buckets only change rate. Branch `max_tunnels` and `auth_attempts_per_minute` are
//! counted in Redis per call ([`Fleet::open_tunnel`], [`Fleet::auth_attempt`]). Redis down or
//! slow never fails or holds up a tunnel: every call has a timeout ([`link`]), shares outlive
//! a failed refresh for the lease, then `fallback_share` of each limit applies. Learned
//! destinations are shared too, through one hash ([`learned`]). Only exists with `[fleet]`:
//! without it there is no client, no task, no metric.
//!
//! A replica's `fleet.name` is its identity in every shared count, so two live replicas with
//! one name would each take the whole of every limit. Each process holds its name in Redis
//! with a random instance id for the lease, renewed at every refresh ([`Fleet::join`]): a
//! replica starting under a name another live process holds refuses to start (exit 64, the
//! name and the fix in the message) once the holder renewed it past a lease (a replica killed
//! without giving it back lapses by then). A clash found later (Redis was unreachable at
//! start, or lost its keys) is logged as an error and shown by `fleet_name_conflict`; the
//! running replica keeps its name rather than flap.

pub mod learned;
pub mod link;
pub mod live;
pub mod metrics;
pub mod refresh;
pub mod scripts;
pub mod shares;

use crate::bandwidth::schedule::{Direction, Scope};
use crate::config::FleetSettings;
use crate::learned::Learned;
use link::{Failure, Link, evalsha};
use metrics::FleetMetrics;
use prometheus_client::registry::Registry;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering::AcqRel, Ordering::Relaxed};
use std::time::Instant;

/// This replica's part in the fleet; one per process, shared by every snapshot.
pub struct Fleet {
    pub settings: FleetSettings,
    link: Link,
    pub metrics: FleetMetrics,
    /// What the last call found (for logging a change once): 0 not yet asked, 1 up, 2 down.
    state: AtomicU8,
    /// Keys holding this replica's fields (shares, tunnel counts), for giving them back.
    pub(crate) written: std::sync::Mutex<Vec<String>>,
    /// This process, held in Redis beside its name: host, process id and a random part.
    pub(crate) instance: String,
    /// Whether another live process held this replica's name at the last refresh.
    conflict: AtomicBool,
    /// When a call last went unanswered: for a lease after it, Redis's tunnel counts may lack
    /// what replicas admitted alone meanwhile (or what a failover lost), so a tunnel needs the
    /// fallback share's room here as well as Redis's yes.
    failed_at: std::sync::Mutex<Option<Instant>>,
    /// The field this process's tunnel counts go under: `fleet.name`, until a binary upgrade
    /// hands the name to the new process; the old one then counts its draining tunnels under
    /// a field of its own ([`refresh::drain_counts`]), so neither overwrites the other.
    count_field: arc_swap::ArcSwap<String>,
}

const UP: u8 = 1;
const DOWN: u8 = 2;

impl Fleet {
    /// The client is made here but connects only at the first call (the refresh task's).
    pub fn new(settings: FleetSettings, registry: &mut Registry) -> Result<Self, String> {
        let name = settings.name.clone();
        let metrics = FleetMetrics::register(registry);
        let link = Link::new(&settings, metrics.redis_duration.clone())?;
        Ok(Self {
            settings,
            link,
            metrics,
            state: AtomicU8::new(0),
            written: Default::default(),
            // A process a binary upgrade started takes over its parent's hold on the name.
            instance: crate::upgrade::inherited_instance().unwrap_or_else(instance_id),
            conflict: AtomicBool::new(false),
            failed_at: Default::default(),
            count_field: arc_swap::ArcSwap::from_pointee(name),
        })
    }

    /// Before the listeners open: takes this replica's name (refusing one a live replica
    /// holds), then the fleet's learned destinations, so a replica coming back never serves,
    /// even for a refresh, what was forgotten while it was away. Redis not answering delays
    /// the start by at most a few refreshes and stops nothing: the name is checked again at
    /// every refresh, and the state file serves until Redis answers.
    pub async fn join(&self, learned: &Learned) -> Result<(), String> {
        self.take_name().await?;
        if learned.in_use()
            && let Err(error) = learned::sync(self, learned, &mut learned::Sharing::default()).await
        {
            tracing::warn!(
                %error,
                "fleet: learned destinations not read from Redis at start; the state file serves until it answers"
            );
        }
        Ok(())
    }

    /// Takes the name, waiting up to a lease for a holder that stopped without giving it
    /// back; an error names a holder that renewed it meanwhile (it lives).
    async fn take_name(&self) -> Result<(), String> {
        let settings = &self.settings;
        let lapse = settings.lease + 2 * settings.refresh;
        let started = Instant::now();
        let mut said = false;
        loop {
            match self.claim().await {
                Ok(true) => return Ok(()),
                Err(error) => {
                    tracing::warn!(
                        %error,
                        replica = %settings.name,
                        "fleet: cannot check that no other live replica runs under this fleet.name; checked again at every refresh"
                    );
                    return Ok(());
                }
                Ok(false) if started.elapsed() >= lapse => {
                    let holder = self.holder().await.unwrap_or_else(|| "unknown".into());
                    return Err(format!(
                        "fleet.name {:?} is in use by another live replica (instance {holder}) on {}: two replicas with one name would each take the whole of every fleet-wide limit. Give each replica its own fleet.name (the default is the host name: set it when two replicas share a host or a hostname), then start this one again",
                        settings.name, settings.redis.shown
                    ));
                }
                Ok(false) => {
                    if !std::mem::replace(&mut said, true) {
                        tracing::info!(
                            replica = %settings.name,
                            lease_ms = self.lease_ms(),
                            "fleet: another process holds this fleet.name; waiting for it to lapse (a replica stopped without giving it back) or to be renewed (a live one)"
                        );
                    }
                    tokio::time::sleep(settings.refresh).await;
                }
            }
        }
    }

    /// Claims the name for the lease: true when this process holds it now.
    async fn claim(&self) -> Result<bool, Failure> {
        let mut pipe = link::Batch::new();
        pipe.add_command(self.claim_command());
        let result = self.link.query::<Vec<i64>>(&pipe).await;
        self.mark(result.as_ref().map(|_| ()));
        // Not noted as a clash here: at start a holder may be a replica that was killed.
        Ok(result?.first() == Some(&1))
    }

    /// The script call that takes or renews this process's hold on its name (1: held).
    pub(crate) fn claim_command(&self) -> redis::Cmd {
        let mut cmd = evalsha(&scripts::CLAIM_NAME, &name_key(&self.settings.name));
        cmd.arg(&self.instance).arg(self.lease_ms());
        cmd
    }

    /// The script call that gives the name back (only this process's hold).
    pub(crate) fn release_command(&self) -> redis::Cmd {
        let mut cmd = evalsha(&scripts::RELEASE_NAME, &name_key(&self.settings.name));
        cmd.arg(&self.instance);
        cmd
    }

    /// Who holds the name, as Redis says.
    async fn holder(&self) -> Option<String> {
        let mut pipe = link::Batch::new();
        pipe.cmd("GET").arg(name_key(&self.settings.name));
        let (holder,) = self.link.query::<(Option<String>,)>(&pipe).await.ok()?;
        holder
    }

    /// Notes whether this process holds its name; a change is logged once, a clash as an
    /// error (it doubles every fleet-wide limit until one replica is renamed).
    pub(crate) fn claimed(&self, ours: bool) {
        let clash = !ours;
        self.metrics.name_conflict.set(i64::from(clash));
        if self.conflict.swap(clash, Relaxed) == clash {
            return;
        }
        if ours {
            tracing::info!(
                replica = %self.settings.name,
                "fleet: this replica holds its fleet.name again"
            );
        } else {
            tracing::error!(
                replica = %self.settings.name,
                instance = %self.instance,
                "fleet: another live replica runs under this fleet.name: both count as one in every fleet-wide limit, which doubles them; give each its own fleet.name and restart one"
            );
        }
    }

    fn lease_ms(&self) -> u64 {
        self.settings.lease.as_millis() as u64
    }

    /// Notes whether Redis answered; a change is logged once.
    fn mark(&self, result: Result<(), &Failure>) {
        let now = if result.is_ok() { UP } else { DOWN };
        self.metrics.connected.set(i64::from(now == UP));
        if now == DOWN {
            *self.failed_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
        if self.state.swap(now, Relaxed) == now {
            return;
        }
        match result {
            Ok(()) => tracing::info!(
                redis = %self.settings.redis.shown,
                replica = %self.settings.name,
                "fleet: Redis answers; limits are shared across the fleet"
            ),
            Err(error) => tracing::warn!(
                redis = %self.settings.redis.shown,
                replica = %self.settings.name,
                %error,
                lease_ms = self.lease_ms(),
                fallback_share = self.settings.fallback_share,
                "fleet: Redis does not answer; shares held for the lease, then the fallback share of each limit"
            ),
        }
    }

    /// Whether the last call to Redis answered.
    pub fn connected(&self) -> bool {
        self.state.load(Relaxed) == UP
    }

    /// How long a call on a tunnel's path (its count, an auth attempt) may wait: the refresh
    /// interval, or a fifth of it (at least 20 ms) while Redis does not answer (an outage, a
    /// failover), so tunnels do not wait on a Redis that is away; the refresh task, with the
    /// whole interval, finds it back.
    fn tunnel_timeout(&self) -> std::time::Duration {
        let refresh = self.settings.refresh;
        if self.state.load(Relaxed) == DOWN {
            (refresh / 5)
                .max(std::time::Duration::from_millis(20))
                .min(refresh)
        } else {
            refresh
        }
    }

    /// The field this process's tunnel counts go under now.
    pub fn count_field(&self) -> Arc<String> {
        self.count_field.load_full()
    }

    /// A branch's tunnel limit when Redis cannot say: this replica's fallback share of it.
    pub fn fallback_max(&self, max: u32) -> u32 {
        (f64::from(max) * self.settings.fallback_share).ceil() as u32
    }

    /// Opening a tunnel of `branch` (limit `max` fleet-wide; `before` open here already):
    /// `Some(admitted)` as Redis counts, `None` when Redis did not answer in time (decide
    /// locally). Within a lease of a call Redis did not answer (an outage, a failover), Redis's
    /// counts may lack tunnels other replicas admitted alone meanwhile: its yes needs this
    /// replica's fallback share to have room too, so the fleet never goes past `max` while the
    /// counts heal (every replica writes its true counts at its next refresh).
    pub async fn open_tunnel(&self, branch: &str, max: u32, before: u32) -> Option<bool> {
        let mut pipe = link::Batch::new();
        let mut cmd = evalsha(&scripts::OPEN_TUNNEL, &tunnels_key(branch));
        cmd.arg(&**self.count_field.load())
            .arg(max)
            .arg(self.lease_ms());
        pipe.add_command(cmd);
        let result = self
            .link
            .query_within::<Vec<i64>>(&pipe, self.tunnel_timeout())
            .await;
        self.mark(result.as_ref().map(|_| ()));
        let admitted = result.ok()?.first() == Some(&1);
        let settling = self
            .failed_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| at.elapsed() < self.settings.lease);
        // Refused here after Redis counted it: the next refresh writes the true count.
        Some(admitted && (!settling || before < self.fallback_max(max)))
    }

    /// A tunnel counted in Redis closed: one less for this replica there, then in `local`
    /// (in the background; a lost decrement is healed by the next refresh, which writes the
    /// true count).
    pub fn closed_tunnel(self: &Arc<Self>, branch: &str, local: Arc<AtomicU32>) {
        let fleet = self.clone();
        let key = tunnels_key(branch);
        tokio::spawn(async move {
            let mut pipe = link::Batch::new();
            let mut cmd = evalsha(&scripts::SET_TUNNELS, &key);
            cmd.arg(&**fleet.count_field.load())
                .arg(-1)
                .arg(fleet.lease_ms());
            pipe.add_command(cmd);
            let result = fleet.link.query::<Vec<i64>>(&pipe).await;
            fleet.mark(result.as_ref().map(|_| ()));
            local.fetch_sub(1, AcqRel);
        });
    }

    /// One authentication attempt from `client` (its counted address): `Some(allowed)` by
    /// the fleet-wide count in this minute, `None` when Redis did not answer (decide locally).
    pub async fn auth_attempt(&self, client: IpAddr, per_minute: u32) -> Option<bool> {
        let mut pipe = link::Batch::new();
        pipe.add_command(evalsha(&scripts::AUTH_ATTEMPT, &auth_key(client)));
        let result = self
            .link
            .query_within::<Vec<i64>>(&pipe, self.tunnel_timeout())
            .await;
        self.mark(result.as_ref().map(|_| ()));
        result
            .ok()
            .map(|answer| answer.first().is_some_and(|&n| n <= i64::from(per_minute)))
    }
}

/// A budget's shares hash; the braces are a Redis Cluster hash tag (one slot per budget).
pub fn share_key(scope: Scope, budget: &str, direction: Direction) -> String {
    format!(
        "portcullis:{{{}:{budget}:{}}}:shares",
        scope.as_str(),
        direction.as_str()
    )
}

/// The holder of a replica name: the instance id of the process running under it.
pub fn name_key(name: &str) -> String {
    format!("portcullis:{{replica:{name}}}")
}

/// `host/pid/random`: unique per process, and telling an operator where the other one runs.
fn instance_id() -> String {
    let mut random = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random).is_err() {
        // No system randomness: the clock's nanoseconds still differ between processes.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        random = nanos.to_le_bytes();
    }
    let random: String = random.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}/{}/{random}",
        crate::config::fleet::host_name(),
        std::process::id()
    )
}

/// A branch's tunnel counts, one field per replica.
pub fn tunnels_key(branch: &str) -> String {
    format!("portcullis:{{tunnels:{branch}}}")
}

/// A client address's authentication attempts in the current minute.
pub fn auth_key(client: IpAddr) -> String {
    format!("portcullis:{{auth:{client}}}")
}
