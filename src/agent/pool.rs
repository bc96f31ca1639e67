//! The gateways a forwarder may use, in the operator's order of preference. A gateway that fails
//! to connect or handshake is marked down and skipped; a background task probes the down ones
//! (TCP and TLS) and marks them up again, so traffic returns to the first healthy gateway.

use super::proxy_client::{Proxy, ProxyError, ProxyStream};
use serde::Serialize;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// `in_use` when no tunnel has been opened yet.
const NONE: usize = usize::MAX;

struct Member {
    proxy: Proxy,
    up: AtomicBool,
    last_error: Mutex<Option<String>>,
}

/// The configured gateways and their health.
pub struct Pool {
    members: Vec<Member>,
    /// Index of the gateway that carried the latest tunnel.
    in_use: AtomicUsize,
}

/// One gateway's state, as `/status` shows it.
#[derive(Debug, Serialize)]
pub struct GatewayStatus {
    pub url: String,
    /// "up" or "down".
    pub state: &'static str,
    pub in_use: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl Pool {
    /// All gateways start up: the first request finds out otherwise.
    pub fn new(proxies: Vec<Proxy>) -> Self {
        Self {
            members: proxies
                .into_iter()
                .map(|proxy| Member {
                    proxy,
                    up: AtomicBool::new(true),
                    last_error: Mutex::new(None),
                })
                .collect(),
            in_use: AtomicUsize::new(NONE),
        }
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn proxy(&self, i: usize) -> &Proxy {
        &self.members[i].proxy
    }

    /// Gateways to try, in order: the healthy ones by preference; when none is healthy, all of
    /// them as a last resort (one may be back before its probe says so).
    pub fn candidates(&self) -> Vec<usize> {
        let up: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].up.load(Ordering::Relaxed))
            .collect();
        if up.is_empty() {
            (0..self.members.len()).collect()
        } else {
            up
        }
    }

    /// Connects to gateway `i`; a failure marks it down.
    pub async fn dial(&self, i: usize) -> Result<ProxyStream, ProxyError> {
        let result = self.members[i].proxy.dial().await;
        match &result {
            Ok(_) => self.mark_up(i),
            Err(e) => self.mark_down(i, e),
        }
        result
    }

    /// Gateway `i` failed (connect, TLS, or closed before answering).
    pub fn mark_down(&self, i: usize, why: &ProxyError) {
        let member = &self.members[i];
        if let Ok(mut last) = member.last_error.lock() {
            *last = Some(why.to_string());
        }
        if member.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(gateway = %member.proxy.url, error = %why, kind = why.kind(), "gateway down");
        }
    }

    fn mark_up(&self, i: usize) {
        let member = &self.members[i];
        if !member.up.swap(true, Ordering::Relaxed) {
            tracing::info!(gateway = %member.proxy.url, "gateway up");
        }
    }

    /// Gateway `i` carries a tunnel: logs a line when that changes which gateway is in use.
    pub fn carried(&self, i: usize) {
        let previous = self.in_use.swap(i, Ordering::Relaxed);
        if previous != i {
            let from = self.members.get(previous).map(|m| m.proxy.url.to_string());
            tracing::info!(
                gateway = %self.members[i].proxy.url,
                previous = from.as_deref(),
                "gateway in use"
            );
        }
    }

    /// Every gateway's state, for `/status`.
    pub fn status(&self) -> Vec<GatewayStatus> {
        let in_use = self.in_use.load(Ordering::Relaxed);
        self.members
            .iter()
            .enumerate()
            .map(|(i, m)| GatewayStatus {
                url: m.proxy.url.to_string(),
                state: if m.up.load(Ordering::Relaxed) {
                    "up"
                } else {
                    "down"
                },
                in_use: i == in_use,
                last_error: m.last_error.lock().ok().and_then(|e| e.clone()),
            })
            .collect()
    }

    /// At start, tries every gateway (TCP and TLS), so `/status` never reports a dead gateway
    /// as up just because no tunnel tried it yet; then every `interval`, each down one, marked
    /// up when it answers. Gateways that are up are not probed again (each probe is a
    /// connection in the gateway's access log); a failed tunnel marks one down.
    pub async fn probe_forever(self: Arc<Self>, interval: Duration) {
        for i in 0..self.members.len() {
            // `dial` marks the gateway up or down by the outcome.
            drop(self.dial(i).await);
        }
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            for i in 0..self.members.len() {
                if !self.members[i].up.load(Ordering::Relaxed)
                    && let Ok(stream) = self.members[i].proxy.dial().await
                {
                    drop(stream);
                    self.mark_up(i);
                }
            }
        }
    }
}
