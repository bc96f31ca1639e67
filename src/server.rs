//! The running gateway: binds every configured proxy address, accepts on each (plain and TLS
//! listeners, [`crate::accept`]), runs the admin listener, the schedule task and (fleet mode)
//! the fleet's refresh task, rebinds listeners a reload moved, and drains on shutdown.

use crate::accept::{Connections, Drained};
use crate::bandwidth::retune::retune_on_schedule;
use crate::control::Control;
use crate::gateway::{self, Snapshot};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A listener's configured address, and its position among `listen.tls_proxy` for HTTPS.
type ListenerKey = (SocketAddr, Option<usize>);

/// A listener the service manager passed, for tokio.
fn from_std(listener: std::net::TcpListener) -> std::io::Result<TcpListener> {
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

pub struct Server {
    /// The current snapshot; each connection takes the one current at its accept and keeps
    /// it for its whole life, so a reload never changes an open tunnel.
    current: Arc<ArcSwap<Snapshot>>,
    /// Each listener by its configured address, with its position among `listen.tls_proxy`
    /// when it is an HTTPS listener.
    listeners: Vec<(ListenerKey, TcpListener)>,
    listen_changed: Arc<tokio::sync::Notify>,
    /// Wakes the schedule task after a reload.
    schedules_changed: Arc<tokio::sync::Notify>,
    applying: Arc<std::sync::Mutex<()>>,
    /// Client connections across all listeners, against `limits.max_connections`.
    connections: Connections,
    admin: Option<TcpListener>,
    /// Set once shutdown begins: /readyz answers 503.
    draining: Arc<AtomicBool>,
    config_path: Option<PathBuf>,
    /// Reload requests from [`Control`]s, carried out by [`Server::run`] on its own thread.
    reloads: tokio::sync::mpsc::Sender<crate::control::ReloadReply>,
    reload_requests: tokio::sync::mpsc::Receiver<crate::control::ReloadReply>,
    /// Binary upgrade requests (SIGUSR2, `POST /upgrade`), carried out by [`Server::run`].
    upgrades: tokio::sync::mpsc::Sender<crate::upgrade::UpgradeReply>,
    upgrade_requests: tokio::sync::mpsc::Receiver<crate::upgrade::UpgradeReply>,
}

impl Server {
    /// Binds every `listen.proxy` and `listen.tls_proxy` address; fails on the first that
    /// cannot be bound.
    pub async fn bind(snapshot: Snapshot, config_path: Option<PathBuf>) -> std::io::Result<Self> {
        // This process owns the learned destinations' state file while it runs (one an upgrade
        // started takes it over once the old process released it: [`Server::run`]).
        if !crate::upgrade::started_by_upgrade() {
            snapshot.learned.claim().map_err(std::io::Error::other)?;
        }
        let config = &snapshot.config;
        let mut inherited = crate::activation::Inherited::from_env()
            .map_err(std::io::Error::other)?
            .unwrap_or_default();
        let mut listeners = Vec::new();
        let keys = listener_keys(&config.listen);
        for (name, key, tls) in [
            ("proxy", "listen.proxy", false),
            ("tls-proxy", "listen.tls_proxy[].address", true),
        ] {
            let keys: Vec<ListenerKey> = keys
                .iter()
                .filter(|k| k.1.is_some() == tls)
                .copied()
                .collect();
            let addresses: Vec<SocketAddr> = keys.iter().map(|k| k.0).collect();
            match inherited
                .take(name, key, &addresses)
                .map_err(std::io::Error::other)?
            {
                Some(passed) => {
                    for (key, listener) in keys.into_iter().zip(passed) {
                        listeners.push((key, from_std(listener)?));
                    }
                }
                None => {
                    for (addr, tls_index) in keys {
                        let listener = crate::accept::listen(addr).map_err(|e| {
                            std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
                        })?;
                        listeners.push(((addr, tls_index), listener));
                    }
                }
            }
        }
        let admin_addresses: Vec<SocketAddr> = config.listen.admin.into_iter().collect();
        let admin = match inherited
            .take("admin", "listen.admin", &admin_addresses)
            .map_err(std::io::Error::other)?
        {
            Some(mut passed) => passed.pop().map(from_std).transpose()?,
            None => match config.listen.admin {
                None => None,
                Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                    std::io::Error::new(e.kind(), format!("cannot listen on {addr} (admin): {e}"))
                })?),
            },
        };
        // Before the limit is derived from it: every tunnel holds two descriptors.
        let descriptors = crate::process::raise_descriptor_limit();
        let connections = Connections::new(config.limits.connection_limit());
        tracing::info!(
            max_connections = connections.limit(),
            from = if config.limits.max_connections.is_some() {
                "config"
            } else {
                "descriptor limit"
            },
            descriptors_before = descriptors.map(|d| d.0),
            descriptors = descriptors.map(|d| d.1),
            "connection limit"
        );
        let (reloads, reload_requests) = tokio::sync::mpsc::channel(16);
        let (upgrades, upgrade_requests) = tokio::sync::mpsc::channel(4);
        let live = snapshot.live.clone();
        let current = Arc::new(ArcSwap::from_pointee(snapshot));
        // Weak: each snapshot holds the registry.
        let in_force = Arc::downgrade(&current);
        live.follow(Box::new(move |check| {
            if let Some(current) = in_force.upgrade() {
                check(&current.load().config);
            }
        }));
        Ok(Self {
            upgrades,
            upgrade_requests,
            reloads,
            reload_requests,
            current,
            listeners,
            admin,
            draining: Arc::new(AtomicBool::new(false)),
            config_path,
            listen_changed: Arc::new(tokio::sync::Notify::new()),
            schedules_changed: Arc::new(tokio::sync::Notify::new()),
            applying: Arc::default(),
            connections,
        })
    }

    /// A handle that applies new configurations (SIGHUP, `POST /reload`).
    pub fn control(&self) -> Control {
        Control {
            current: self.current.clone(),
            path: self.config_path.clone(),
            listen_changed: self.listen_changed.clone(),
            schedules_changed: self.schedules_changed.clone(),
            applying: self.applying.clone(),
            connections: self.connections.clone(),
            reloads: self.reloads.clone(),
            upgrades: self.upgrades.clone(),
        }
    }

    /// Accepts until `shutdown` completes or a binary upgrade handed the listeners over, then
    /// drains: open connections get up to `timeouts.drain` (`timeouts.upgrade_drain` after an
    /// upgrade) to finish; tunnels still open then are cut, each writing its access line
    /// (`end = "drain_timeout"`) with its byte counts, before this returns.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let control = self.control();
        // Started by an upgrade: the old process's holds apply before the first request.
        let holds = crate::upgrade::inherited_holds();
        crate::live::fleet::take_holds(&self.current.load().live, holds, "upgrade");
        let mut lowered = false;
        let connections = self.connections.clone();
        let mut background = tokio::task::JoinSet::new();
        // A copy of each listening socket, for a binary upgrade to hand over.
        let mut sockets: HashMap<ListenerKey, crate::upgrade::Socket> = HashMap::new();
        let spawn = |(key, listener): (ListenerKey, TcpListener)| {
            if let Ok(addr) = listener.local_addr() {
                let kind = if key.1.is_some() { "tls" } else { "plain" };
                tracing::info!(address = %addr, kind, "listening");
            }
            let socket = crate::upgrade::copy(&listener);
            let handle = tokio::spawn(accept(
                listener,
                key.1,
                self.current.clone(),
                connections.clone(),
            ));
            (key, handle, socket)
        };
        let mut listening: HashMap<ListenerKey, JoinHandle<()>> = HashMap::new();
        for (key, handle, socket) in self.listeners.drain(..).map(spawn) {
            listening.insert(key, handle);
            sockets.extend(socket.map(|s| (key, s)));
        }
        let mut admin_task = None;
        let mut admin_socket = None;
        if let Some(admin) = self.admin.take() {
            if let Ok(addr) = admin.local_addr() {
                tracing::info!(address = %addr, kind = "admin", "listening");
            }
            admin_socket = crate::upgrade::copy(&admin);
            admin_task = Some(tokio::spawn(crate::admin::serve(
                admin,
                control.clone(),
                self.draining.clone(),
            )));
        }
        let learned = self.current.load().learned.clone();
        // Fleet mode only: the refresh task (shares, tunnel counts); nothing runs without it.
        let fleet = self.current.load().fleet.clone();
        let fleet_task = self.start_background(&learned, &fleet, &mut background);
        crate::process::notify(crate::process::ServiceState::Ready);
        if crate::upgrade::started_by_upgrade() {
            crate::upgrade::report_ready();
            background.spawn(take_over_learned(learned.clone()));
        }
        let mut shutdown = std::pin::pin!(shutdown);
        let mut handed_over = None;
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(reply) = self.reload_requests.recv() => {
                    // Here, on the thread that runs this loop (no client is served on it), at
                    // lower priority from the first reload on.
                    if !lowered {
                        crate::process::priority::lower_this_threads_priority();
                        lowered = true;
                    }
                    let _ = reply.send(control.reload_here());
                }
                Some(reply) = self.upgrade_requests.recv() => {
                    let instance = fleet.as_ref().map(|f| f.instance.as_str());
                    let holds: Vec<(String, String)> = self.current.load().live.holds.all()
                        .into_iter()
                        .map(|(branch, hold)| (branch, hold.wire()))
                        .collect();
                    // A stop request while the new process starts abandons the upgrade (the
                    // new process is stopped) and stops this one.
                    let outcome = tokio::select! {
                        outcome = upgrade(&sockets, admin_socket.as_ref(), instance, &holds) => outcome,
                        _ = &mut shutdown => {
                            let _ = reply.send(Err("the gateway is stopping".into()));
                            break;
                        }
                    };
                    match outcome {
                        Ok(pid) => {
                            let _ = reply.send(Ok(pid));
                            handed_over = Some(pid);
                            break;
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                _ = self.listen_changed.notified() => {
                    // A reload changed listener addresses: close the ones gone, bind the new.
                    let config = &self.current.load().config;
                    let wanted = listener_keys(&config.listen);
                    let gone: Vec<ListenerKey> = listening.keys().filter(|k| !wanted.contains(k)).copied().collect();
                    for key in gone {
                        if let Some(handle) = listening.remove(&key) {
                            handle.abort();
                            let _ = handle.await;
                            sockets.remove(&key);
                            tracing::info!(address = %key.0, "stopped listening");
                        }
                    }
                    for key in wanted {
                        if listening.contains_key(&key) {
                            continue;
                        }
                        match crate::accept::listen(key.0) {
                            Ok(listener) => {
                                let (key, handle, socket) = spawn((key, listener));
                                listening.insert(key, handle);
                                sockets.extend(socket.map(|s| (key, s)));
                            }
                            Err(e) => tracing::warn!(address = %key.0, error = %e, "cannot listen"),
                        }
                    }
                }
            }
        }
        // The copies go: a listener closes once its accept loop and (after an upgrade) the
        // new process let it go.
        drop(sockets);
        let _ = admin_socket.take();
        let running = Running {
            listening,
            admin_task,
            background,
            fleet: fleet.zip(fleet_task),
            learned,
            handed_over,
        };
        self.stop(running).await;
    }

    /// The background tasks: idle counters forgotten, learned destinations saved, schedules
    /// retuned, and in fleet mode the fleet's tasks (the refresh task is returned).
    fn start_background(
        &self,
        learned: &Arc<crate::learned::Learned>,
        fleet: &Option<Arc<crate::fleet::Fleet>>,
        background: &mut tokio::task::JoinSet<()>,
    ) -> Option<JoinHandle<()>> {
        let current = self.current.clone();
        background.spawn(async move {
            let mut every_minute = tokio::time::interval(Duration::from_secs(60));
            loop {
                every_minute.tick().await;
                current.load().forget_idle_counters();
            }
        });
        background.spawn(crate::learned::keep_saved(learned.clone()));
        background.spawn(retune_on_schedule(
            self.current.clone(),
            |snapshot: &Snapshot| &snapshot.throttles,
            self.schedules_changed.clone(),
            jiff::Timestamp::now,
        ));
        fleet
            .as_ref()
            .map(|fleet| start_fleet(fleet, learned, &self.current, background))
    }

    /// Stops accepting and drains (see [`Server::run`]).
    async fn stop(self, mut running: Running) {
        let connections = self.connections.clone();
        self.draining.store(true, Ordering::Relaxed);
        if let Some(pid) = running.handed_over {
            // The new process is the service now (systemd: `MAINPID=`); this one only drains.
            crate::upgrade::announce_main_pid(pid);
        }
        crate::process::notify(crate::process::ServiceState::Stopping);
        let upgraded = running.handed_over.is_some();
        // `/readyz` answers 503 from now; a load balancer takes a few checks to stop sending,
        // and what it still sends meanwhile is served. After an upgrade the new process
        // serves them: no pause.
        let pre_stop = self.current.load().config.timeouts.pre_stop;
        if !pre_stop.is_zero() && !upgraded {
            tracing::info!(
                pre_stop_ms = pre_stop.as_millis() as u64,
                "stopping: /readyz answers 503; accepting for timeouts.pre_stop before draining"
            );
            tokio::time::sleep(pre_stop).await;
        }
        let mut draining_counts = None;
        if let Some((fleet, task)) = running.fleet.take() {
            task.abort();
            let _ = task.await;
            // Give this replica's shares and counts back before draining; after an upgrade the
            // new process holds the name and writes them (once, under the same name), and
            // this one counts its draining tunnels under a field of its own until it exits.
            if upgraded {
                let counting = crate::fleet::refresh::drain_counts(fleet, self.current.clone());
                draining_counts = Some(tokio::spawn(counting));
            } else {
                crate::fleet::refresh::leave(&fleet, &**self.current.load()).await;
            }
        }
        // Drain: stop accepting (the listeners close with their loops), let open connections
        // finish within the drain timeout, then leave the rest to be closed at exit.
        for (_, handle) in running.listening.drain() {
            handle.abort();
            let _ = handle.await;
        }
        if upgraded && let Some(task) = running.admin_task.take() {
            // The new process answers on the admin listener (its /readyz is the service's).
            task.abort();
        }
        running.background.shutdown().await;
        let learned = running.learned;
        if upgraded {
            // Nothing is learned here any more: saved, and the state directory released for
            // the new process, which adds the file to what it learned meanwhile.
            let store = learned.clone();
            match tokio::task::spawn_blocking(move || store.release()).await {
                Ok(Ok(())) => tracing::info!("upgrade: learned destinations saved and released"),
                Ok(Err(error)) => {
                    tracing::warn!(%error, "upgrade: cannot save learned destinations")
                }
                Err(error) => tracing::warn!(%error, "upgrade: saving learned destinations failed"),
            }
        }
        let current = self.current.load_full();
        let timeouts = &current.config.timeouts;
        let drain = if upgraded {
            timeouts.upgrade_drain
        } else {
            timeouts.drain
        };
        tracing::info!(
            open_connections = connections.open(),
            drain_timeout_s = drain.as_secs(),
            upgraded,
            "stopped accepting; draining"
        );
        match connections.drain(drain).await {
            Drained::All => tracing::info!("drained: every connection finished"),
            Drained::Left(left) => {
                tracing::warn!(
                    closing_connections = left,
                    "drain timeout reached; closing the rest"
                );
                // Open tunnels end now with their counts and write their access lines
                // (`end = "drain_timeout"`) before the process exits.
                self.current.load().closing.fire();
                if let Drained::Left(left) = connections.drain(LINES_AFTER_DRAIN).await {
                    tracing::warn!(connections = left, "exiting with connections still open");
                }
            }
        }
        if let Some(task) = draining_counts {
            task.abort();
        }
        // What the drained tunnels learned is kept (not after an upgrade: the state file is
        // the new process's).
        crate::learned::save_logged(&learned).await;
        if let Some(task) = running.admin_task {
            task.abort();
        }
    }
}

/// What [`Server::run`] hands to [`Server::stop`].
struct Running {
    listening: HashMap<ListenerKey, JoinHandle<()>>,
    admin_task: Option<JoinHandle<()>>,
    background: tokio::task::JoinSet<()>,
    fleet: Option<(Arc<crate::fleet::Fleet>, JoinHandle<()>)>,
    learned: Arc<crate::learned::Learned>,
    /// The new process's id, after a binary upgrade.
    handed_over: Option<u32>,
}

/// A binary upgrade: the listening sockets (and the admin one) go to a new process, which
/// must report that it listens; its id, or why this process serves on (logged).
async fn upgrade(
    sockets: &HashMap<ListenerKey, crate::upgrade::Socket>,
    admin: Option<&crate::upgrade::Socket>,
    fleet_instance: Option<&str>,
    holds: &[(String, String)],
) -> Result<u32, String> {
    let mut passed = Vec::new();
    let named = sockets
        .iter()
        .map(|(key, s)| {
            (
                if key.1.is_some() {
                    "tls-proxy"
                } else {
                    "proxy"
                },
                s,
            )
        })
        .chain(admin.map(|s| ("admin", s)));
    for (name, socket) in named {
        let copy = crate::upgrade::copy(socket)
            .ok_or_else(|| "upgrade: cannot copy a listening socket".to_owned());
        match copy {
            Ok(copy) => passed.push((name, copy)),
            Err(e) => {
                tracing::error!(error = %e, "upgrade failed; this process serves on");
                return Err(e);
            }
        }
    }
    tracing::info!(sockets = passed.len(), "upgrade: starting the new binary");
    let result =
        crate::upgrade::hand_over(passed, fleet_instance, holds, crate::upgrade::READY_WITHIN)
            .await;
    match &result {
        Ok(pid) => tracing::info!(
            pid,
            "upgrade: the new process listens; this one stops accepting and drains"
        ),
        Err(e) => tracing::error!(error = %e, "upgrade failed; this process serves on"),
    }
    result
}

/// In a process an upgrade started: claims the learned destinations' state directory once the
/// old process released it (after it stopped accepting), and adds what it saved.
async fn take_over_learned(learned: Arc<crate::learned::Learned>) {
    let started = tokio::time::Instant::now();
    let mut warned = false;
    loop {
        match learned.take_over() {
            Ok(true) => {
                if warned {
                    tracing::info!("upgrade: learned destinations taken over; saved from now on");
                }
                return;
            }
            Ok(false) if started.elapsed() < crate::upgrade::READY_WITHIN => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(false) => {
                // The old process lets go at the latest when it exits (after upgrade_drain):
                // keep asking, so nothing learned here is lost.
                if !warned {
                    warned = true;
                    tracing::warn!(
                        "upgrade: the old process still holds the learned destinations' state directory; this process saves them once it lets go"
                    );
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Err(error) => {
                tracing::warn!(%error, "upgrade: cannot read the learned destinations' state file");
                return;
            }
        }
    }
}

/// How long tunnels cut at the drain timeout get to write their access lines.
const LINES_AFTER_DRAIN: Duration = Duration::from_secs(2);

/// Every listener `listen` configures: plain proxies, then TLS ones by position.
fn listener_keys(listen: &crate::config::Listen) -> Vec<ListenerKey> {
    let plain = listen.proxy.iter().map(|a| (*a, None));
    let tls = listen
        .tls_proxy
        .iter()
        .enumerate()
        .map(|(i, l)| (l.address, Some(i)));
    plain.chain(tls).collect()
}

/// Fleet mode's tasks: learned destinations and the live view shared (in `background`) and the
/// refresh task
/// (shares, tunnel counts), returned so that shutdown can stop it before giving shares back.
fn start_fleet(
    fleet: &Arc<crate::fleet::Fleet>,
    learned: &Arc<crate::learned::Learned>,
    current: &Arc<ArcSwap<Snapshot>>,
    background: &mut tokio::task::JoinSet<()>,
) -> JoinHandle<()> {
    tracing::info!(
        redis = %fleet.settings.redis.shown,
        replica = %fleet.settings.name,
        refresh_ms = fleet.settings.refresh.as_millis() as u64,
        lease_ms = fleet.settings.lease.as_millis() as u64,
        "fleet mode: limits are shared through Redis"
    );
    background.spawn(crate::fleet::learned::run(fleet.clone(), learned.clone()));
    let live = current.load().live.clone();
    background.spawn(crate::fleet::live::run(fleet.clone(), live));
    tokio::spawn(crate::fleet::refresh::run(fleet.clone(), current.clone()))
}

/// Accepts on one listener; each client is served on the snapshot current at its accept.
async fn accept(
    listener: TcpListener,
    tls_index: Option<usize>,
    current: Arc<ArcSwap<Snapshot>>,
    connections: Connections,
) {
    // Separate loops (and task types) per listener kind: a plain connection's task must not
    // carry the TLS handshake's space (rustls state) for its whole life.
    match tls_index {
        None => {
            connections
                .accept_loop(listener, |stream, peer, conn_id, slot| {
                    let pressed = connections.pressed();
                    plain_task(current.load_full(), stream, peer, conn_id, (slot, pressed))
                })
                .await
        }
        Some(i) => {
            connections
                .accept_loop(listener, |stream, peer, conn_id, slot| {
                    let snapshot = current.load_full();
                    let pressed = connections.pressed();
                    async move {
                        // Reload keeps listeners and acceptors in step; the index resolves.
                        if let Some(tls) = snapshot.tls_acceptors.get(i).cloned() {
                            gateway::serve_tls(&snapshot, &tls, stream, peer, conn_id, pressed)
                                .await;
                        }
                        drop(slot);
                    }
                })
                .await
        }
    }
}

/// One plain client's task: the data path on the snapshot current at its accept, holding the
/// connection's `slot` until it ends. Its size is paid by every idle tunnel, so it must hold
/// the data path's future once (a test checks).
async fn plain_task<S: Send + 'static>(
    snapshot: Arc<Snapshot>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    conn_id: u64,
    (slot, pressed): (S, bool),
) {
    gateway::serve(&snapshot, stream, peer, conn_id, pressed).await;
    drop(slot);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, TEST_NOW};

    #[tokio::test]
    async fn a_clients_task_holds_the_data_path_future_once() {
        let config = Config::parse("[resolver]\nhosts_only = true\n", "t", TEST_NOW).unwrap();
        let snapshot = Arc::new(Snapshot::new(config).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let data_path = std::mem::size_of_val(&gateway::serve(&snapshot, stream, addr, 1, false));
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let task =
            std::mem::size_of_val(&plain_task(snapshot.clone(), stream, addr, 1, ((), false)));
        // The snapshot, socket, address and number it starts from, and the data path once (a
        // wrapper awaiting a captured future would be twice the data path).
        assert!(
            task <= data_path + 128,
            "a client's task is {task} bytes for a {data_path}-byte data path"
        );
    }
}
