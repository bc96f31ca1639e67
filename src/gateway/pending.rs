//! Connections that have not finished their request head yet, per client address (IPv6 by
//! prefix). A host that opens connections and sends nothing holds a connection slot each until
//! the head timeout; capped per address, it cannot fill the gateway's connection limit and keep
//! other branches waiting. Established tunnels do not count: a branch behind one NAT address
//! may hold hundreds.
//!
//! Only heads that are late count, so a burst of prompt clients from one address (a branch
//! behind NAT, a load balancer without PROXY protocol, a busy gateway that has not read their
//! heads yet) is never refused while the gateway has room: a connection counts once
//! [`HEAD_GRACE`] passes without its head (TLS handshake included), or at once when fewer than
//! a quarter of the gateway's connection places are free. A flood then holds at most those
//! places for the grace, and `limits.max_pending_heads_per_client` after it.

use super::Snapshot;
use super::refusal::{Refusal, log_unread, refuse_unread};
use crate::end::End;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The reason a connection over the limit gets.
pub(super) const REASON: &str = "too many unfinished requests from this address";

/// How long a connection may take to send its head (and finish its TLS handshake) before it
/// counts against its address's unfinished heads, while the gateway has room.
pub const HEAD_GRACE: Duration = Duration::from_secs(1);

/// Where a connection stands with its address's count of unfinished heads.
pub enum Unfinished<'a> {
    /// Not counted: counts once `until` passes without a complete head.
    Graced { until: Instant },
    /// Counted until the head is in (boxed: the connection's future keeps 8 bytes of it).
    Counted(Box<Pending<'a>>),
    /// The head is in.
    Finished,
}

impl Unfinished<'_> {
    /// The head is in: the connection no longer counts.
    pub fn finish(&mut self) {
        *self = Unfinished::Finished;
    }
}

/// Why [`counted`] gave up on its work.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Late {
    /// Its grace ended with its address holding its limit of unfinished heads.
    Refused,
    /// The deadline passed.
    TimedOut,
}

/// Awaits `work` (a TLS handshake, a request head) until `deadline`, for a connection in
/// `unfinished`: past its grace, the connection counts, or is refused when its address holds
/// its limit already (`work` is dropped). One timer serves the grace and the deadline.
pub(super) async fn counted<'s: 'u, 'u, T>(
    snapshot: &'s Snapshot,
    peer: SocketAddr,
    unfinished: &mut Unfinished<'u>,
    deadline: Instant,
    // Pinned by the caller: an async fn's argument moved into a local would take its space
    // twice in the connection's future.
    mut work: std::pin::Pin<&mut impl std::future::Future<Output = T>>,
) -> Result<T, Late> {
    let first = match *unfinished {
        Unfinished::Graced { until } => until.min(deadline),
        _ => deadline,
    };
    let mut timer = std::pin::pin!(tokio::time::sleep_until(first));
    loop {
        tokio::select! {
            biased;
            done = &mut work => return Ok(done),
            () = &mut timer => {
                if !matches!(unfinished, Unfinished::Graced { .. }) || Instant::now() >= deadline {
                    return Err(Late::TimedOut);
                }
                let pending = enter(snapshot, peer).ok_or(Late::Refused)?;
                *unfinished = Unfinished::Counted(Box::new(pending));
                timer.as_mut().reset(deadline);
            }
        }
    }
}

#[derive(Default)]
pub struct PendingHeads {
    counts: Mutex<HashMap<IpAddr, u32>>,
}

/// One unfinished head, counted until dropped.
pub struct Pending<'a> {
    heads: &'a PendingHeads,
    key: IpAddr,
}

impl PendingHeads {
    /// Counts a connection from `key` (see `policy::client_key`); `None` when `key` already
    /// has `max` unfinished heads.
    pub fn enter(&self, key: IpAddr, max: u32) -> Option<Pending<'_>> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(key).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Pending { heads: self, key })
    }

    /// Unfinished heads from `key` now.
    pub fn of(&self, key: IpAddr) -> u32 {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.get(&key).copied().unwrap_or(0)
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let mut counts = self.heads.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// Answers 429 to a client over its unfinished-heads limit (nothing read yet) and closes
/// without waiting for anything more.
pub(super) async fn refuse(
    snapshot: &Snapshot,
    client: TcpStream,
    peer: SocketAddr,
    conn_id: u64,
    started: Instant,
) {
    let refusal = Refusal::new(End::PendingHeadsLimit, REASON);
    refuse_unread(snapshot, client, peer, conn_id, started, refusal).await;
}

/// A new connection from `peer`: counted at once when the gateway is `pressed` for places
/// (`None` when its address holds its limit already), else graced.
pub(super) fn start(
    snapshot: &Snapshot,
    peer: SocketAddr,
    pressed: bool,
    started: Instant,
) -> Option<Unfinished<'_>> {
    if pressed {
        Some(Unfinished::Counted(Box::new(enter(snapshot, peer)?)))
    } else {
        Some(Unfinished::Graced {
            until: started + HEAD_GRACE,
        })
    }
}

/// Counts an unfinished head for `peer`; `None` when it holds its limit already.
fn enter(snapshot: &Snapshot, peer: SocketAddr) -> Option<Pending<'_>> {
    let limits = &snapshot.config.limits;
    let key = crate::policy::client_key(peer.ip(), limits.ipv6_client_prefix);
    snapshot
        .pending_heads
        .enter(key, limits.max_pending_heads_per_client)
}

/// The access line of a connection refused over the limit without a reply (a TLS listener's,
/// before its handshake).
pub(super) fn log_refused(snapshot: &Snapshot, conn_id: u64, peer: SocketAddr, started: Instant) {
    let refusal = Refusal::new(End::PendingHeadsLimit, REASON);
    log_unread(snapshot, conn_id, peer, refusal, 0, started);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_holds_at_most_max_and_finished_heads_give_their_place_back() {
        let heads = PendingHeads::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = heads.enter(a, 2).unwrap();
        let _second = heads.enter(a, 2).unwrap();
        assert!(
            heads.enter(a, 2).is_none(),
            "a third unfinished head from a"
        );
        assert!(heads.enter(b, 2).is_some(), "b is not held up by a");
        drop(first);
        assert_eq!(heads.of(a), 1);
        assert!(heads.enter(a, 2).is_some());
        drop(_second);
        assert!(
            heads.counts.lock().unwrap().len() <= 1,
            "empty entries are removed"
        );
    }
}
