//! Open tunnels a reload may close: under `on_reload = "close-denied"` each tunnel registers its
//! target and branch, and a reload asks the new policy about every one.

use super::Snapshot;
use crate::policy::Verdict;
use crate::policy::host::Target;
use std::sync::Arc;

/// Tunnels that a reload under `on_reload = "close-denied"` may close.
#[derive(Default)]
pub struct Revocable {
    open: std::sync::Mutex<std::collections::HashMap<u64, RevocableTunnel>>,
}

struct RevocableTunnel {
    target: Target,
    branch: Option<String>,
    stop: Arc<tokio::sync::Notify>,
}

impl Revocable {
    pub fn register(
        &self,
        conn_id: u64,
        target: Target,
        branch: Option<String>,
    ) -> Arc<tokio::sync::Notify> {
        let stop = Arc::new(tokio::sync::Notify::new());
        let entry = RevocableTunnel {
            target,
            branch,
            stop: stop.clone(),
        };
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(conn_id, entry);
        stop
    }

    pub fn remove(&self, conn_id: u64) {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&conn_id);
    }

    /// Closes the open tunnels `snapshot`'s policy denies; returns how many.
    pub fn close_denied(&self, snapshot: &Snapshot) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let mut closed = 0;
        for tunnel in open.values() {
            // A branch a reload removed is judged as unassigned.
            let identity = tunnel
                .branch
                .as_deref()
                .and_then(|name| snapshot.config.identity_named(name))
                .unwrap_or(crate::config::Identity::Unassigned);
            let decision = snapshot.config.policy.decide(
                &tunnel.target.host,
                tunnel.target.port,
                snapshot.config.scope(identity),
            );
            if decision.verdict == Verdict::Deny {
                tunnel.stop.notify_one();
                closed += 1;
            }
        }
        closed
    }
}
