//! The running gateway as operators steer it ([`Control`]): its current snapshot, its metrics
//! at a scrape, and live reconfiguration (SIGHUP, `POST /reload`). A reload builds a new
//! snapshot from the file and makes it current; open connections keep the one they started
//! with. A bad file never replaces a good one. Listener addresses that changed are rebound by
//! the server, the schedule task retunes, and under `on_reload = "close-denied"` open tunnels
//! the new policy denies are closed.

use crate::config::Config;
use crate::gateway::Snapshot;
use arc_swap::ArcSwap;
use std::path::PathBuf;
use std::sync::Arc;

/// A handle on the running gateway, for the admin listener and the signal tasks.
#[derive(Clone)]
pub struct Control {
    pub(crate) current: Arc<ArcSwap<Snapshot>>,
    /// The file the gateway runs on; `None` for the built-in configuration.
    pub(crate) path: Option<PathBuf>,
    /// Wakes the accept side to rebind listeners whose addresses changed.
    pub(crate) listen_changed: Arc<tokio::sync::Notify>,
    /// Wakes the schedule task to find the new schedules' next boundary.
    pub(crate) schedules_changed: Arc<tokio::sync::Notify>,
    /// One reload at a time (SIGHUP and `POST /reload` may race): each builds on the last.
    pub(crate) applying: Arc<std::sync::Mutex<()>>,
    /// The server's connections: a new `limits.max_connections` applies to them at once.
    pub(crate) connections: crate::accept::Connections,
    /// Reload requests, for the server's main thread to carry out; each gets its answer back.
    pub(crate) reloads: tokio::sync::mpsc::Sender<ReloadReply>,
    /// Binary upgrade requests, for the server's main loop.
    pub(crate) upgrades: tokio::sync::mpsc::Sender<crate::upgrade::UpgradeReply>,
}

/// Where the answer to a request the server's main loop carries out goes (a reload, an
/// upgrade).
pub type Reply<T> = tokio::sync::oneshot::Sender<Result<T, String>>;

/// Where a reload's result goes.
pub type ReloadReply = Reply<()>;

/// Asks the server's main loop through `requests` and waits for its answer, from a blocking
/// thread; `stopping` when the loop is gone.
fn ask_blocking<T>(
    requests: &tokio::sync::mpsc::Sender<Reply<T>>,
    stopping: &str,
) -> Result<T, String> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    requests
        .blocking_send(reply)
        .map_err(|_| stopping.to_owned())?;
    answer
        .blocking_recv()
        .unwrap_or_else(|_| Err(stopping.into()))
}

/// [`ask_blocking`] from an async task.
async fn ask<T>(
    requests: &tokio::sync::mpsc::Sender<Reply<T>>,
    stopping: &str,
) -> Result<T, String> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    requests
        .send(reply)
        .await
        .map_err(|_| stopping.to_owned())?;
    answer.await.unwrap_or_else(|_| Err(stopping.into()))
}

const STOPPING: &str = "the gateway is stopping; nothing was reloaded";
const UPGRADE_STOPPING: &str = "the gateway is stopping or upgrading already; no upgrade started";

impl Control {
    /// Reloads (SIGHUP, `POST /reload`) from a blocking thread: the server's main thread does
    /// the work ([`Control::reload_here`]) and this waits for its answer.
    pub fn reload(&self) -> Result<(), String> {
        ask_blocking(&self.reloads, STOPPING)
    }

    /// [`Control::reload`] from an async task.
    pub async fn reload_async(&self) -> Result<(), String> {
        ask(&self.reloads, STOPPING).await
    }

    /// Starts a binary upgrade (`POST /upgrade`) from a blocking thread and waits until the new
    /// process listens: its process id, or why this process serves on.
    pub fn upgrade(&self) -> Result<u32, String> {
        ask_blocking(&self.upgrades, UPGRADE_STOPPING)
    }

    /// [`Control::upgrade`] from an async task (SIGUSR2).
    pub async fn upgrade_async(&self) -> Result<u32, String> {
        ask(&self.upgrades, UPGRADE_STOPPING).await
    }

    /// Reads the config file again and applies it: counted in the metrics, logged, and
    /// announced to systemd. A bad file leaves the running config. It blocks while it parses
    /// and compiles (a third of a second for 10,000 branches), so the server runs it on its
    /// main thread, which serves no client, at lower priority: tunnels and setups never wait
    /// for it, and every configuration is built in the same allocator arena (reloads on
    /// whichever thread was free left a 10,000-branch gateway at twice its start-up memory).
    pub(crate) fn reload_here(&self) -> Result<(), String> {
        let Some(path) = &self.path else {
            tracing::warn!("reload requested, but the gateway runs on the built-in config");
            return Err("the gateway runs on the built-in config: nothing to reload".into());
        };
        crate::process::notify(crate::process::ServiceState::Reloading);
        let result = Config::load(path, jiff::Timestamp::now())
            .map_err(|e| e.to_string())
            .and_then(|c| {
                for warning in &c.warnings {
                    tracing::warn!("{warning}");
                }
                self.apply(c)
            });
        crate::process::notify(crate::process::ServiceState::Ready);
        match &result {
            Ok(()) => tracing::info!(file = %path.display(), "reload applied"),
            Err(problems) => {
                self.failed();
                tracing::warn!(file = %path.display(), %problems, "reload rejected; the running configuration stays");
            }
        }
        result
    }

    /// The snapshot new connections take now.
    pub fn current(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The metrics (shared by all snapshots) with what is sampled at a scrape brought up to
    /// date.
    pub fn scrape(&self) -> Arc<crate::metrics::Metrics> {
        let metrics = self.current.load().metrics.clone();
        metrics.observe(&self.connections);
        metrics
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
        let next = Arc::new(Snapshot::replacing(config, Some(&previous))?);
        next.metrics.reloaded(true);
        if let Err(error) = next.learned.claim() {
            tracing::warn!(%error, "learned destinations are not saved");
        }
        self.current.store(next.clone());
        self.connections
            .resize(next.config.limits.connection_limit());
        // The new snapshot has put its limits in force; budgets it dropped let go.
        previous.throttles.retire_missing(&next.throttles);
        self.schedules_changed.notify_one();
        if listen_changed {
            self.listen_changed.notify_one();
        }
        // From here a tunnel admitted under an older snapshot is checked as it registers: the
        // sweeps below cover the tunnels registered before.
        next.live.now_current(next.generation);
        // Revocation takes effect: a client the new file no longer admits as its branch loses
        // its open tunnels, whatever `on_reload` says.
        let revoked = next.live.revoke(&previous.config, &next.config);
        if revoked > 0 {
            tracing::info!(
                closed_tunnels = revoked,
                "closed open tunnels whose client is no longer admitted as their branch"
            );
        }
        if next.config.policy.on_reload == crate::policy::OnReload::CloseDenied {
            let closed = next.live.close_denied(&next.config);
            tracing::info!(
                closed_tunnels = closed,
                "closed open tunnels the new policy denies"
            );
        }
        Ok(())
    }

    /// Puts `hold` on `branch` on this replica (`None`: releases it): the status, the JSON
    /// answer and the tunnels it closed now.
    pub fn hold(
        &self,
        branch: &str,
        hold: Option<crate::live::Hold>,
    ) -> (u16, serde_json::Value, usize) {
        let live = self.current().live.clone();
        let (before, closed) = live.hold(branch, hold);
        let status = if hold.is_none() && before.is_none() {
            404
        } else {
            200
        };
        let body = serde_json::json!({
            "branch": branch,
            "hold": hold.map(|h| h.as_str()),
            "was": before.map(|h| h.as_str()),
            "drain_until": match hold {
                Some(crate::live::Hold::Drain { until, .. }) => Some(until.to_string()),
                _ => None,
            },
            "closed": closed,
        });
        (status, body, closed)
    }

    /// Sends `action` to every replica (fleet mode's control stream; holds are kept in Redis
    /// too, for replicas that start later).
    pub fn fleet_action(&self, action: crate::live::fleet::Action) -> Result<(), String> {
        let fleet = self.fleet()?;
        tokio::runtime::Handle::current().block_on(fleet.send_action(&action))
    }

    /// Every replica's open tunnels and rates per branch, from their summaries in Redis.
    pub fn fleet_branches(&self) -> Result<serde_json::Value, String> {
        let fleet = self.fleet()?;
        tokio::runtime::Handle::current().block_on(fleet.branch_summaries())
    }

    fn fleet(&self) -> Result<std::sync::Arc<crate::fleet::Fleet>, String> {
        self.current()
            .fleet
            .clone()
            .ok_or_else(|| "fleet mode is off: [fleet] is not configured".to_owned())
    }

    /// Counts a reload that failed before a configuration could be built (a bad file).
    pub fn failed(&self) {
        self.current.load().metrics.reloaded(false);
    }
}
