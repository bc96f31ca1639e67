//! The gateways a forwarder may use, in the operator's order of preference, and what the agent
//! believes about each one's health.
//!
//! A gateway is down when nothing answers there or it turns us away for good ([`Blame::Down`]:
//! connect refused or timed out, a TLS handshake or a probe without an answer, a TLS failure).
//! A gateway that accepts a connection and then closes it before answering is alive but busy
//! ([`Blame::Refused`]): it is marked down only when it has refused every connection for
//! [`REFUSING_FOR`] with no answer between, so a burst of refusals (its limit on unfinished
//! requests) never takes a gateway that serves other tunnels out of use. A gateway that takes a
//! request and stays silent is probed meanwhile ([`Pool::await_reply`]): one that answers no
//! probe is hung, and the request moves on.
//!
//! The probe is a real request the gateway answers itself ([`Proxy::probe`]): a TCP connection
//! alone proves nothing, the kernel completes it for a stopped process. Every gateway is probed
//! at start, down ones every probe interval after that.

use super::proxy_client::{Blame, Proxy, ProxyError};
use serde::Serialize;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// `in_use` when no tunnel has been opened yet.
const NONE: usize = usize::MAX;

/// A gateway that has refused every connection for this long, without an answer between, is
/// down: it accepts but serves nobody. Refusals further apart than this are separate runs (a
/// quiet hour between two refusals is not an hour of refusing).
pub const REFUSING_FOR: Duration = Duration::from_secs(2);

/// A probe's outcome also serves whoever asks within this time, so a hundred requests waiting
/// on one hung gateway cost one probe.
const PROBE_REUSE: Duration = Duration::from_secs(1);

struct Member {
    proxy: Proxy,
    up: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// The current run of refusals with no answer between them: its first and latest.
    refusals: Mutex<Option<(Instant, Instant)>>,
    /// One probe at a time; the latest one's time and failure (`None`: it was answered, or the
    /// gateway only refused the connection, which proves a process there).
    probe: tokio::sync::Mutex<Option<(Instant, Option<String>)>>,
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
    /// All gateways start up: the start probe finds out otherwise.
    pub fn new(proxies: Vec<Proxy>) -> Self {
        Self {
            members: proxies
                .into_iter()
                .map(|proxy| Member {
                    proxy,
                    up: AtomicBool::new(true),
                    last_error: Mutex::new(None),
                    refusals: Mutex::new(None),
                    probe: tokio::sync::Mutex::new(None),
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

    /// Gateway `i` answered (a reply head to a request or a probe, whatever its status): it
    /// serves, whatever it refused before.
    pub fn answered(&self, i: usize) {
        let member = &self.members[i];
        if let Ok(mut refusals) = member.refusals.lock() {
            *refusals = None;
        }
        if !member.up.swap(true, Ordering::Relaxed) {
            tracing::info!(gateway = %member.proxy.url, "gateway up");
        }
    }

    /// Gateway `i` failed a request or probe with `why`: marks it down if that is what `why`
    /// says (for a refusal, once the gateway has refused everything for [`REFUSING_FOR`]).
    pub fn failed(&self, i: usize, why: &ProxyError) -> Blame {
        let blame = why.blame();
        match blame {
            Blame::Down => self.mark_down(i, why),
            Blame::Refused => self.refused(i, why),
            // A reply timeout is the destination's or the gateway's: `await_reply` probes.
            Blame::Silent => self.note(i, why),
        }
        blame
    }

    fn note(&self, i: usize, why: &ProxyError) {
        if let Ok(mut last) = self.members[i].last_error.lock() {
            *last = Some(why.to_string());
        }
    }

    fn refused(&self, i: usize, why: &ProxyError) {
        let member = &self.members[i];
        self.note(i, why);
        let now = Instant::now();
        let first = match member.refusals.lock() {
            Ok(mut refusals) => {
                let first = match *refusals {
                    Some((first, latest)) if now - latest < REFUSING_FOR => first,
                    _ => now,
                };
                *refusals = Some((first, now));
                first
            }
            Err(_) => now,
        };
        if now - first >= REFUSING_FOR {
            self.mark_down(i, why);
        } else {
            tracing::debug!(gateway = %member.proxy.url, error = %why, "gateway refused a connection");
        }
    }

    /// Gateway `i` is down (unreachable, silent, or refusing everything).
    pub fn mark_down(&self, i: usize, why: &ProxyError) {
        let member = &self.members[i];
        self.note(i, why);
        if member.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(gateway = %member.proxy.url, error = %why, kind = why.kind(), "gateway down");
        }
    }

    /// Whether gateway `i` serves, by a probe (or a probe of the last [`PROBE_REUSE`]): `Err`
    /// with the probe's failure when it does not. The probe's outcome marks the gateway: up
    /// when answered, down when nothing answered. A refused probe counts as alive: a process is
    /// there, turning connections away.
    pub async fn alive(&self, i: usize) -> Result<(), String> {
        let member = &self.members[i];
        // Held for the probe: whoever asks meanwhile waits for its outcome.
        let mut latest = member.probe.lock().await;
        if let Some((at, outcome)) = &*latest
            && at.elapsed() < PROBE_REUSE
        {
            return outcome.clone().map_or(Ok(()), Err);
        }
        let failure = match member.proxy.probe().await {
            Ok(()) => {
                self.answered(i);
                None
            }
            Err(e) => match self.failed(i, &e) {
                Blame::Refused => None,
                Blame::Down | Blame::Silent => Some(e.to_string()),
            },
        };
        *latest = Some((Instant::now(), failure.clone()));
        failure.map_or(Ok(()), Err)
    }

    /// Awaits gateway `i`'s answer to a request (`reply`, bounded by `timeouts.reply`). Past
    /// `timeouts.connect` (or half the reply timeout, if shorter) without one, the gateway is
    /// probed meanwhile: one that answers no probe is hung, and the request stops waiting
    /// (`Unresponsive`: it answered nothing, so another gateway may take the request); one that
    /// answers is dialling a slow destination, and the wait goes on.
    pub async fn await_reply<T>(
        &self,
        i: usize,
        reply: impl Future<Output = Result<T, ProxyError>>,
    ) -> Result<T, ProxyError> {
        let timeouts = self.members[i].proxy.timeouts;
        let probe_after = timeouts.connect.min(timeouts.reply / 2);
        tokio::pin!(reply);
        if let Ok(result) = tokio::time::timeout(probe_after, &mut reply).await {
            return result;
        }
        let alive = self.alive(i);
        tokio::pin!(alive);
        let hung = |why: String| {
            let e = ProxyError::Unresponsive(why);
            self.mark_down(i, &e);
            e
        };
        tokio::select! {
            result = &mut reply => match result {
                // The wait ran out before the probe's verdict: the verdict decides.
                Err(ProxyError::ReplyTimeout) => match alive.await {
                    Ok(()) => Err(ProxyError::ReplyTimeout),
                    Err(why) => Err(hung(why)),
                },
                other => other,
            },
            verdict = &mut alive => match verdict {
                Ok(()) => reply.await,
                Err(why) => Err(hung(why)),
            },
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

    /// At start, probes every gateway, so `/status` never reports a dead or hung gateway as up
    /// just because no tunnel tried it yet; then every `interval`, each down one, marked up
    /// when it answers. Gateways that are up are not probed again (each probe is a line in the
    /// gateway's access log): a failed or silent request finds out.
    pub async fn probe_forever(self: Arc<Self>, interval: Duration) {
        self.probe_all(|_| true).await;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            self.probe_all(|member| !member.up.load(Ordering::Relaxed))
                .await;
        }
    }

    /// Probes the gateways `which` picks, all at once: a hung one must not hold up the others.
    async fn probe_all(self: &Arc<Self>, which: impl Fn(&Member) -> bool) {
        let mut probes = tokio::task::JoinSet::new();
        for i in 0..self.members.len() {
            if which(&self.members[i]) {
                let pool = self.clone();
                // The outcome marks the gateway; nothing else to do with it here.
                probes.spawn(async move { drop(pool.alive(i).await) });
            }
        }
        while probes.join_next().await.is_some() {}
    }
}
