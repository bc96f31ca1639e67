//! Listeners and the accept loop: binds every configured proxy address, takes a connection
//! permit before each accept (so a flood waits in the kernel backlog, not in our memory), and
//! serves each client on its own task.

use crate::config::Config;
use crate::connect::{self, Gateway};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// A listener's configured address, and its position among `listen.tls_proxy` for HTTPS.
type ListenerKey = (SocketAddr, Option<usize>);

pub struct Server {
    /// The current snapshot; each connection takes the one current at its accept and keeps
    /// it for its whole life, so a reload never changes an open tunnel.
    current: Arc<ArcSwap<Gateway>>,
    /// Each listener by its configured address, with its position among `listen.tls_proxy`
    /// when it is an HTTPS listener.
    listeners: Vec<(ListenerKey, TcpListener)>,
    listen_changed: Arc<tokio::sync::Notify>,
    /// Wakes the schedule task after a reload.
    schedules_changed: Arc<tokio::sync::Notify>,
    applying: Arc<std::sync::Mutex<()>>,
    admin: Option<TcpListener>,
    /// Set once shutdown begins: /readyz answers 503.
    draining: Arc<AtomicBool>,
    config_path: Option<PathBuf>,
}

/// Applies a new configuration to a running server.
#[derive(Clone)]
pub struct Reloader {
    current: Arc<ArcSwap<Gateway>>,
    /// The file the gateway runs on; `None` for the built-in configuration.
    path: Option<PathBuf>,
    /// Wakes the accept side to rebind listeners whose addresses changed.
    listen_changed: Arc<tokio::sync::Notify>,
    /// Wakes the schedule task to find the new schedules' next boundary.
    schedules_changed: Arc<tokio::sync::Notify>,
    /// One reload at a time (SIGHUP and `POST /reload` may race): each builds on the last.
    applying: Arc<std::sync::Mutex<()>>,
}

impl Reloader {
    /// Reads the config file again and applies it (SIGHUP, `POST /reload`): counted in the
    /// metrics, logged, and announced to systemd. A bad file leaves the running config.
    pub fn reload(&self) -> Result<(), String> {
        let Some(path) = &self.path else {
            tracing::warn!("reload requested, but the gateway runs on the built-in config");
            return Err("the gateway runs on the built-in config: nothing to reload".into());
        };
        if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading, now]);
        }
        let result = Config::load(path)
            .map_err(|e| e.to_string())
            .and_then(|c| self.apply(c));
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        match &result {
            Ok(()) => tracing::info!(file = %path.display(), "reload applied"),
            Err(problems) => {
                self.failed();
                tracing::warn!(file = %path.display(), %problems, "reload rejected; the running configuration stays");
            }
        }
        result
    }

    /// The metrics of the running configuration (shared by all snapshots).
    pub fn metrics(&self) -> Arc<crate::metrics::Metrics> {
        self.current.load().metrics.clone()
    }

    /// Builds a snapshot from `config` (reading TLS files again) and makes it current; listeners
    /// whose addresses changed are rebound (the admin listener moves only at restart).
    pub fn apply(&self, config: Config) -> Result<(), String> {
        let _one_at_a_time = self.applying.lock().unwrap_or_else(|e| e.into_inner());
        let previous = self.current.load_full();
        let old = &previous.config.listen;
        let addresses = |l: &crate::config::Listen| {
            let tls: Vec<_> = l.tls_proxy.iter().map(|t| t.address).collect();
            (l.proxy.clone(), tls)
        };
        let listen_changed = addresses(old) != addresses(&config.listen);
        if old.admin != config.listen.admin {
            tracing::warn!("the admin listener moves only at restart");
        }
        let next = Arc::new(Gateway::replacing(config, Some(&previous))?);
        next.metrics.reloaded(true);
        self.current.store(next.clone());
        // The new snapshot has put its limits in force; budgets it dropped let go.
        previous.throttles.retire_missing(&next.throttles);
        self.schedules_changed.notify_one();
        if listen_changed {
            self.listen_changed.notify_one();
        }
        if next.config.policy.on_reload == crate::policy::OnReload::CloseDenied {
            let closed = next.revocable.close_denied(&next);
            tracing::info!(
                closed_tunnels = closed,
                "closed open tunnels the new policy denies"
            );
        }
        Ok(())
    }

    /// Counts a reload that failed before a configuration could be built (a bad file).
    pub fn failed(&self) {
        self.current.load().metrics.reloaded(false);
    }
}

impl Server {
    /// Binds every `listen.proxy` and `listen.tls_proxy` address; fails on the first that
    /// cannot be bound.
    pub async fn bind(gateway: Gateway, config_path: Option<PathBuf>) -> std::io::Result<Self> {
        let mut listeners = Vec::new();
        let config = &gateway.config;
        let plain = config.listen.proxy.iter().map(|addr| (*addr, None));
        let tls = config
            .listen
            .tls_proxy
            .iter()
            .enumerate()
            .map(|(i, l)| (l.address, Some(i)));
        for (addr, tls_index) in plain.chain(tls) {
            let listener = TcpListener::bind(addr).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
            })?;
            listeners.push(((addr, tls_index), listener));
        }
        let admin = match config.listen.admin {
            None => None,
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot listen on {addr} (admin): {e}"))
            })?),
        };
        Ok(Self {
            current: Arc::new(ArcSwap::from_pointee(gateway)),
            listeners,
            admin,
            draining: Arc::new(AtomicBool::new(false)),
            config_path,
            listen_changed: Arc::new(tokio::sync::Notify::new()),
            schedules_changed: Arc::new(tokio::sync::Notify::new()),
            applying: Arc::default(),
        })
    }

    /// A handle that applies new configurations (SIGHUP, `POST /reload`).
    pub fn reloader(&self) -> Reloader {
        Reloader {
            current: self.current.clone(),
            path: self.config_path.clone(),
            listen_changed: self.listen_changed.clone(),
            schedules_changed: self.schedules_changed.clone(),
            applying: self.applying.clone(),
        }
    }

    /// Accepts until `shutdown` completes, then drains: open connections get up to
    /// `timeouts.drain` to finish; whatever is left is closed when the process exits.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let reloader = self.reloader();
        let permits = Arc::new(Semaphore::new(
            self.current.load().config.limits.max_connections,
        ));
        let next_id = Arc::new(AtomicU64::new(1));
        let mut accept_loops = tokio::task::JoinSet::new();
        let spawn = |(key, listener): (ListenerKey, TcpListener)| {
            if let Ok(addr) = listener.local_addr() {
                let kind = if key.1.is_some() { "tls" } else { "plain" };
                tracing::info!(address = %addr, kind, "listening");
            }
            let accepting = accept_loop(
                listener,
                key.1,
                self.current.clone(),
                permits.clone(),
                next_id.clone(),
            );
            (key, tokio::spawn(accepting))
        };
        let mut listening: HashMap<ListenerKey, JoinHandle<()>> =
            self.listeners.into_iter().map(spawn).collect();
        let mut admin_task = None;
        if let Some(admin) = self.admin {
            if let Ok(addr) = admin.local_addr() {
                tracing::info!(address = %addr, kind = "admin", "listening");
            }
            admin_task = Some(tokio::spawn(crate::admin::serve(
                admin,
                reloader,
                self.draining.clone(),
            )));
        }
        let current = self.current.clone();
        accept_loops.spawn(async move {
            let mut every_minute = tokio::time::interval(Duration::from_secs(60));
            loop {
                every_minute.tick().await;
                current.load().forget_idle_counters();
            }
        });
        accept_loops.spawn(retune_on_schedule(
            self.current.clone(),
            self.schedules_changed.clone(),
            jiff::Timestamp::now,
        ));
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = self.listen_changed.notified() => {
                    // A reload changed listener addresses: close the ones gone, bind the new.
                    let config = &self.current.load().config;
                    let plain = config.listen.proxy.iter().map(|a| (*a, None));
                    let tls = config.listen.tls_proxy.iter().enumerate().map(|(i, l)| (l.address, Some(i)));
                    let wanted: Vec<ListenerKey> = plain.chain(tls).collect();
                    let gone: Vec<ListenerKey> = listening.keys().filter(|k| !wanted.contains(k)).copied().collect();
                    for key in gone {
                        if let Some(handle) = listening.remove(&key) {
                            handle.abort();
                            let _ = handle.await;
                            tracing::info!(address = %key.0, "stopped listening");
                        }
                    }
                    for key in wanted {
                        if listening.contains_key(&key) {
                            continue;
                        }
                        match TcpListener::bind(key.0).await {
                            Ok(listener) => {
                                let (key, handle) = spawn((key, listener));
                                listening.insert(key, handle);
                            }
                            Err(e) => tracing::warn!(address = %key.0, error = %e, "cannot listen"),
                        }
                    }
                }
            }
        }
        self.draining.store(true, Ordering::Relaxed);
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        // Drain: stop accepting (the listeners close with their loops), let open connections
        // finish within the drain timeout, then leave the rest to be closed at exit.
        for (_, handle) in listening.drain() {
            handle.abort();
            let _ = handle.await;
        }
        accept_loops.shutdown().await;
        let max = self.current.load().config.limits.max_connections;
        let drain = self.current.load().config.timeouts.drain;
        let open = max - permits.available_permits();
        tracing::info!(
            open_connections = open,
            drain_timeout_s = drain.as_secs(),
            "stopped accepting; draining"
        );
        let all_back = permits.acquire_many(max as u32);
        match tokio::time::timeout(drain, all_back).await {
            Ok(_) => tracing::info!("drained: every connection finished"),
            Err(_) => {
                let left = max - permits.available_permits();
                tracing::warn!(
                    closing_connections = left,
                    "drain timeout reached; closing the rest"
                );
            }
        }
        if let Some(task) = admin_task {
            task.abort();
        }
    }
}

/// Longest the schedule task sleeps: a wall-clock step (NTP, suspend) is noticed within this.
const SCHEDULE_RECHECK: Duration = Duration::from_secs(60);

/// Puts each schedule window's limits in force at its boundary: sleeps until the next one (or
/// a reload) and retunes the buckets. Without schedules it only waits for reloads. `clock` is
/// the wall clock (tests run it on tokio's paused time).
async fn retune_on_schedule(
    current: Arc<ArcSwap<Gateway>>,
    changed: Arc<tokio::sync::Notify>,
    clock: impl Fn() -> jiff::Timestamp,
) {
    let mut announced = Vec::new();
    loop {
        let now = clock();
        let gateway = current.load_full();
        let crate::throttle::Retuned { in_force, next } = gateway.throttles.retune(now);
        if in_force != announced {
            for limit in &in_force {
                tracing::info!(
                    scope = limit.scope.as_str(),
                    budget = %limit.budget,
                    direction = limit.direction.as_str(),
                    schedule = %limit.schedule,
                    bytes_per_second = limit.rate,
                    "bandwidth limit in force"
                );
            }
            if in_force.is_empty() {
                tracing::info!("no bandwidth limit in force");
            }
            announced = in_force;
        }
        // A reload stored a new snapshot meanwhile: retune that one before sleeping (buckets it
        // took over may have just been set by the old schedules).
        if !Arc::ptr_eq(&gateway, &current.load()) {
            continue;
        }
        drop(gateway);
        match next {
            None => changed.notified().await,
            Some(next) => {
                // Just past the boundary, so the window has begun (or ended) when we look.
                let wait = now
                    .duration_until(next)
                    .unsigned_abs()
                    .saturating_add(Duration::from_millis(1))
                    .min(SCHEDULE_RECHECK);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = changed.notified() => {}
                }
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls_index: Option<usize>,
    current: Arc<ArcSwap<Gateway>>,
    permits: Arc<Semaphore>,
    next_id: Arc<AtomicU64>,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                let _ = stream.set_nodelay(true);
                let gateway = current.load_full();
                let conn_id = next_id.fetch_add(1, Ordering::Relaxed);
                // Separate tasks per listener kind: a plain connection's task must not carry
                // the TLS handshake's space (rustls state) for its whole life.
                match tls_index {
                    None => tokio::spawn(async move {
                        connect::serve(&gateway, stream, peer, conn_id).await;
                        drop(permit);
                    }),
                    // Reload keeps listeners and acceptors in step; the index always resolves.
                    Some(i) => tokio::spawn(async move {
                        if let Some(tls) = gateway.tls_acceptors.get(i).cloned() {
                            connect::serve_tls(&gateway, &tls, stream, peer, conn_id).await;
                        }
                        drop(permit);
                    }),
                };
            }
            Err(e) => {
                // Out of file descriptors or similar: wait and retry instead of spinning.
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::Direction;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn the_schedule_task_puts_limits_in_force_at_window_boundaries() {
        let config = Config::parse(
            "[[schedule]]\nname = \"morning\"\ndays = \"daily\"\nhours = \"10:00-11:00\"\ntime_zone = \"UTC\"\nupload = \"1 MB/s\"\n",
            "t",
        )
        .unwrap();
        let gateway = Gateway::new(config).unwrap();
        let gate = gateway
            .throttles
            .gate("unassigned", "storage", Direction::Upload)
            .unwrap();
        let current = Arc::new(ArcSwap::from_pointee(gateway));
        // Wall time runs on tokio's paused clock from 09:59:30.
        let (base, started) = (
            "2026-11-23T09:59:30Z".parse::<jiff::Timestamp>().unwrap(),
            Instant::now(),
        );
        let clock = move || base + jiff::SignedDuration::try_from(started.elapsed()).unwrap();
        let task = tokio::spawn(retune_on_schedule(current, Arc::default(), clock));
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(gate.read_limit(), None, "09:59:50: not yet");
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(gate.read_limit(), Some(50_000), "10:00:01: 1 MB/s in force");
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(gate.read_limit(), None, "11:00:01: lifted");
        task.abort();
    }
}
