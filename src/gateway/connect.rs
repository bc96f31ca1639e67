//! The data path for one client connection, top to bottom: read the head, decide, resolve and
//! vet, dial, answer 200, check the SNI, tunnel, log. Every failure becomes one [`Refusal`]
//! carrying how the connection ends and the status to send (if a reply can still be sent).

use super::lane;
use super::pending::{self, Late, Unfinished};
use super::plan::{Plan, plan};
use super::refusal::{self, End, Refusal};
use super::replies;
use super::request::{self, LaneRequest, ProxyRequest};
use super::sni;
use super::sni_check::{check_sni, checked_tls_start, send_up};
use super::{Snapshot, TunnelSlot};
use crate::access_log::{AccessRecord, OnWriteFailure};
use crate::bandwidth::{Paced, Pacers};
use crate::config::Identity;
use crate::live::{IdentifiedBy, Tunnel};
use crate::policy::host::Host;
use crate::policy::{SniMode, Verdict};
use crate::stream::{ClientStream, Upstream};
use crate::tunnel::{self, Live};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

/// Serves one client connection and emits its canonical log line. `pressed`: the gateway had
/// fewer than a quarter of its connection places free at accept, so an unfinished head counts
/// against its address at once (see [`pending`]).
pub async fn serve(
    snapshot: &Snapshot,
    mut client: TcpStream,
    peer: SocketAddr,
    conn_id: u64,
    pressed: bool,
) {
    let started = Instant::now();
    let Some(peer) = real_client(snapshot, &mut client, peer, conn_id, started).await else {
        return;
    };
    if let Some(refusal) = audit_closed(snapshot) {
        // Boxed: only refused connections pay for the reply's future.
        let refuse = refusal::refuse_unread(snapshot, client, peer, conn_id, started, refusal);
        return Box::pin(refuse).await;
    }
    // Held here and lent down (an argument of each async fn on the way would cost its space
    // in every idle tunnel's future).
    let Some(mut pending) = pending::start(snapshot, peer, pressed, started) else {
        // Boxed: only refused connections pay for the reply's future.
        return Box::pin(pending::refuse(snapshot, client, peer, conn_id, started)).await;
    };
    serve_stream(
        snapshot,
        ClientStream::Plain(client),
        peer,
        conn_id,
        Vec::new(),
        started,
        &mut pending,
    )
    .await;
}

/// With `log.on_write_failure = "fail-closed"`, a new connection is refused while the access
/// file cannot be written: no connection goes unaudited.
fn audit_closed(snapshot: &Snapshot) -> Option<Refusal> {
    let fail_closed = snapshot.config.log.on_write_failure == OnWriteFailure::FailClosed;
    (fail_closed && crate::access_log::failing()).then(|| {
        Refusal::new(
            End::AccessLogUnavailable,
            "the access log cannot be written: refusing until it can",
        )
    })
}

/// The client's address: the peer's own, or, for a trusted load balancer, the one its PROXY
/// protocol header names. `None` (logged) when a balancer's header is missing or malformed.
async fn real_client(
    snapshot: &Snapshot,
    client: &mut TcpStream,
    peer: SocketAddr,
    conn_id: u64,
    started: Instant,
) -> Option<SocketAddr> {
    if !crate::policy::in_networks(&snapshot.config.listen.proxy_protocol_from, peer.ip()) {
        return Some(peer);
    }
    match super::proxy_protocol::read_header(client, snapshot.config.timeouts.head).await {
        Ok(source) => Some(source.unwrap_or(peer)),
        Err(why) => {
            let end = End::ProxyProtocolError;
            AccessRecord::before_request(conn_id, peer, end, why.into(), 0, started.elapsed())
                .finish(&snapshot.metrics);
            None
        }
    }
}

/// Serves one client on a TLS listener: handshake (bounded by `tls.handshake_timeout`), then
/// the same data path inside TLS, with the verified certificate's names for identity.
pub async fn serve_tls(
    snapshot: &Snapshot,
    acceptor: &TlsAcceptor,
    mut client: TcpStream,
    peer: SocketAddr,
    conn_id: u64,
    pressed: bool,
) {
    let started = Instant::now();
    let Some(peer) = real_client(snapshot, &mut client, peer, conn_id, started).await else {
        return;
    };
    if let Some(refusal) = audit_closed(snapshot) {
        return refusal::log_unread(snapshot, conn_id, peer, refusal, 0, started);
    }
    // The handshake counts as unfinished head; no reply can be sent before it.
    let Some(mut pending) = pending::start(snapshot, peer, pressed, started) else {
        pending::log_refused(snapshot, conn_id, peer, started);
        return;
    };
    let timeout = snapshot
        .config
        .tls
        .as_ref()
        .map_or(Duration::from_secs(10), |t| t.handshake_timeout);
    // The handshake runs in a boxed future of its own: its state (rustls's connection by
    // value, the timer) is freed once done, instead of staying in the task of every tunnel
    // this listener holds (2.5 KiB each when it was inline).
    let mut handshake = Box::pin(handshake(acceptor, client, timeout));
    // The handshake's own timer ends it first; this deadline only bounds the count's timer.
    let deadline = Instant::now() + timeout + Duration::from_secs(1);
    let handshake =
        match pending::counted(snapshot, peer, &mut pending, deadline, handshake.as_mut()).await {
            Ok(handshake) => handshake,
            Err(Late::TimedOut) => Err("TLS handshake timed out".to_owned()),
            Err(Late::Refused) => {
                pending::log_refused(snapshot, conn_id, peer, started);
                return;
            }
        };
    match handshake {
        Ok((client, names)) => {
            serve_stream(
                snapshot,
                client,
                peer,
                conn_id,
                names,
                started,
                &mut pending,
            )
            .await;
        }
        Err(failure) => {
            let end = End::TlsHandshakeFailed;
            AccessRecord::before_request(conn_id, peer, end, failure, 0, started.elapsed())
                .finish(&snapshot.metrics);
        }
    }
}

/// The TLS handshake under its timeout: the client's stream and its certificate's names, or
/// why it failed.
async fn handshake(
    acceptor: &TlsAcceptor,
    client: TcpStream,
    timeout: Duration,
) -> Result<(ClientStream, Vec<String>), String> {
    let accept = crate::stream::ServerTls::accept(client, acceptor.config().clone());
    match tokio::time::timeout(timeout, accept).await {
        Ok(Ok(tls)) => {
            let names = tls
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| super::tls::certificate_names(leaf))
                .unwrap_or_default();
            Ok((ClientStream::Tls(Box::new(tls)), names))
        }
        Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
        Err(_) => Err("TLS handshake timed out".to_owned()),
    }
}

async fn serve_stream<'s: 'p, 'p>(
    snapshot: &'s Snapshot,
    mut client: ClientStream,
    peer: SocketAddr,
    conn_id: u64,
    certificate_names: Vec<String>,
    started: Instant,
    pending: &mut Unfinished<'p>,
) {
    let mut record = AccessRecord {
        conn_id,
        client: Some(peer),
        ..AccessRecord::default()
    };
    let mut replied = false;
    let handled = handle(
        snapshot,
        &mut client,
        peer,
        &certificate_names,
        pending,
        &mut record,
    );
    if let Err(refusal) = handled.await {
        if let Some(status) = refusal.status {
            // A draining branch is told when to come back (a retry goes to another replica).
            let retry_after = (refusal.end == End::BranchDrained)
                .then_some(record.branch.as_deref())
                .flatten()
                .and_then(|branch| snapshot.live.holds.of(branch))
                .and_then(|hold| hold.refusal().1);
            let reply =
                replies::write_error_retry(&mut client, status, &refusal.reason, retry_after);
            if let Ok(Ok(())) = tokio::time::timeout(REPLY_TIMEOUT, reply).await {
                record.status = status;
                replied = true;
            }
        }
        record.reason = refusal.reason.into_owned();
        record.end = refusal.end;
    }
    record.duration = started.elapsed();
    record.finish(&snapshot.metrics);
    if replied {
        linger_close(client).await;
    }
}

/// Longest we wait for a client to take a ~200-byte error reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Closes after an error reply without losing it: send FIN, then read and discard what the
/// client still sends (bounded in bytes and time). Closing a socket with unread input makes the
/// kernel send RST, which can destroy the reply before the client reads it.
async fn linger_close(mut client: ClientStream) {
    use tokio::io::AsyncReadExt;
    const LINGER_BYTES: usize = 64 * 1024;
    const LINGER_TIME: Duration = Duration::from_secs(2);
    let _ = client.shutdown().await;
    let mut sink = vec![0u8; 4096];
    let mut drained = 0;
    let drain = async {
        while drained < LINGER_BYTES {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}

/// Serves one request: admission, then the plain-HTTP lane or a tunnel.
async fn handle<'s: 'p, 'p>(
    snapshot: &'s Snapshot,
    client: &mut ClientStream,
    peer: SocketAddr,
    certificate_names: &[String],
    pending: &mut Unfinished<'p>,
    record: &mut AccessRecord,
) -> Result<(), Refusal> {
    let mut admitted = admit(snapshot, client, peer, certificate_names, pending, record).await?;
    match admitted.request.lane.take() {
        // Boxed: only lane requests pay for the HTTP exchange's future.
        Some(lane) => Box::pin(serve_lane(snapshot, client, admitted, *lane, record)).await,
        None => serve_tunnel(snapshot, client, admitted, record).await,
    }
}

/// A request the gateway will carry: from an allowed and identified client, allowed by the
/// policy, its addresses vetted, counted against its branch's tunnel cap.
struct Admitted<'g> {
    request: ProxyRequest,
    plan: Plan<'g>,
    identity: Identity,
    /// How the client was identified as its branch (what a reload must still admit); boxed,
    /// as it is held across the dial in every connection's future.
    identified: Box<IdentifiedBy>,
    /// Counted against the branch's `max_tunnels` until dropped.
    slot: TunnelSlot<'g>,
    /// None where no schedule can throttle the branch and category: those pay nothing.
    pacers: Pacers,
}

/// Admission: the head (within its timeout; the connection then stops counting as
/// unfinished), the per-client rate, who the client is, and the plan (policy, resolve, the
/// destination wall). Fills in the access record as it learns.
async fn admit<'g: 'p, 'p>(
    snapshot: &'g Snapshot,
    client: &mut ClientStream,
    peer: SocketAddr,
    certificate_names: &[String],
    pending: &mut Unfinished<'p>,
    record: &mut AccessRecord,
) -> Result<Box<Admitted<'g>>, Refusal> {
    let deadline = Instant::now() + snapshot.config.timeouts.head;
    let read = std::pin::pin!(request::read_proxy_head(client));
    let read = match pending::counted(snapshot, peer, pending, deadline, read).await {
        Ok(read) => read,
        Err(Late::Refused) => return Err(Refusal::new(End::PendingHeadsLimit, pending::REASON)),
        Err(Late::TimedOut) => Err(request::HeadError::Timeout),
    };
    // The head is in (or failed): this connection no longer counts as unfinished.
    pending.finish();
    let request = read?;
    record.host = Some(request.target.host.to_string());
    record.port = Some(request.target.port);
    if let Some(limiter) = &snapshot.connect_rate
        && limiter
            .check_key(&crate::policy::client_key(
                peer.ip(),
                snapshot.config.limits.ipv6_client_prefix,
            ))
            .is_err()
    {
        return Err(Refusal::new(
            End::RateLimited,
            "too many requests from this client",
        ));
    }

    let who = if snapshot.client_allowed(peer.ip()) {
        let authorization = request.proxy_authorization.as_deref();
        // The audit trail names the proxy user (never the password), also when it failed.
        record.user =
            snapshot
                .identifier
                .credential_user(&snapshot.config, authorization, certificate_names);
        snapshot
            .identifier
            .identify(
                &snapshot.config,
                peer.ip(),
                authorization,
                certificate_names,
            )
            .await
    } else {
        // Refused in the plan (`client_denied`), before any branch is looked for.
        Ok(Identity::Unassigned)
    };
    let plan = plan(
        snapshot,
        peer.ip(),
        who,
        &request.target,
        request.lane.is_some(),
    )
    .await;
    record.resolve_time = plan.resolve_time;
    if let Some(identity) = plan.identity {
        record.branch = Some(snapshot.config.branch_name(identity).to_owned());
        record.verdict = Some(plan.decision.verdict.as_str());
        record.rule = plan.decision.rule_name().map(str::to_owned);
        record.category = plan.decision.rule.map(|r| r.category.clone());
    }
    let (Some(identity), None) = (plan.identity, &plan.refusal) else {
        record.resolved = plan
            .candidates
            .first()
            .map(|c| SocketAddr::new(c.ip, request.target.port));
        // A plan without an identity always carries its refusal; fail closed regardless.
        let refusal = plan
            .refusal
            .unwrap_or_else(|| Refusal::new(End::ClientDenied, "client address not allowed"));
        return Err(refusal);
    };
    // An operator's hold on the branch (one atomic load while there is none).
    if let Some(hold) = snapshot
        .live
        .holds
        .of(snapshot.config.branch_name(identity))
    {
        let (end, _) = hold.refusal();
        let reason = match end {
            End::BranchDrained => "branch draining: retry later",
            _ => "branch quarantined by an operator",
        };
        return Err(Refusal::new(end, reason));
    }
    let Some(slot) = snapshot.admit_tunnel(identity).await else {
        return Err(Refusal::new(
            End::BranchTunnelLimit,
            "branch tunnel limit reached",
        ));
    };
    let pacers = match plan.decision.rule {
        Some(rule) => snapshot
            .throttles
            .pacers(snapshot.config.branch_name(identity), &rule.category),
        None => Pacers::default(),
    };
    // Boxed for the hand-over: a local or an async fn's argument would keep its space in the
    // connection's future for the tunnel's whole life; the fields moved out of the box are
    // freed before the relay.
    let identified = identified_by(
        snapshot,
        identity,
        certificate_names,
        record.user.as_deref(),
    );
    Ok(Box::new(Admitted {
        request,
        plan,
        identity,
        identified: Box::new(identified),
        slot,
        pacers,
    }))
}

/// How `identity` was found: the certificate name that matched, the proxy user, or the source
/// network (see `Identifier::identify`, whose order this follows).
fn identified_by(
    snapshot: &Snapshot,
    identity: Identity,
    certificate_names: &[String],
    user: Option<&str>,
) -> IdentifiedBy {
    let Identity::Branch(branch) = identity else {
        return IdentifiedBy::Unassigned;
    };
    let by_certificate = certificate_names
        .iter()
        .find(|name| snapshot.config.certificate_branches.get(*name) == Some(&branch));
    match (by_certificate, user) {
        (Some(name), _) => IdentifiedBy::Certificate(name.as_str().into()),
        (None, Some(user)) => IdentifiedBy::User(user.into()),
        (None, None) => IdentifiedBy::Network,
    }
}

/// Connects to the plan's vetted addresses within `timeouts.connect`, noting the address and
/// the time taken.
async fn dial(
    snapshot: &Snapshot,
    plan: &Plan<'_>,
    port: u16,
    record: &mut AccessRecord,
) -> Result<Upstream, Refusal> {
    // Through the egress's parent proxies, when it has some (boxed: only those tunnels pay).
    if super::parent::parents_for(plan).is_some()
        && let Some(stream) = Box::pin(super::parent::open(snapshot, plan, port, record)).await?
    {
        return Ok(stream);
    }
    // Direct (or, with `fallback = "direct"`, after every parent failed).
    let started = Instant::now();
    let timeouts = snapshot.config.timeouts;
    let egress = plan.egress.map(|(e, _)| e);
    let dialled = super::dial::dial(
        plan.dialable(),
        port,
        timeouts.connect,
        timeouts.attempt_delay,
        egress,
        &mut record.resolved,
    )
    .await;
    record.connect_time = Some(started.elapsed());
    if let Some(egress) = egress {
        let metrics = &snapshot.metrics.way_out;
        super::egress::note(metrics, egress, dialled.as_ref().ok(), record);
    }
    dialled.map(Upstream::Plain)
}

/// The plain-HTTP lane (revocation lists, OCSP): a fresh cached answer, or one fetched over
/// the vetted connection, sent on paced by the schedules that list its category.
async fn serve_lane(
    snapshot: &Snapshot,
    client: &mut ClientStream,
    admitted: Box<Admitted<'_>>,
    lane: LaneRequest,
    record: &mut AccessRecord,
) -> Result<(), Refusal> {
    let Admitted {
        request: mut req,
        plan,
        slot: _slot,
        pacers,
        ..
    } = unbox(admitted);
    let timeouts = snapshot.config.timeouts;
    let host_header = match (&req.target.host, req.target.port) {
        (host, 80) => host.to_string(),
        _ => req.target.to_string(),
    };
    let cache_request = lane::cache_request(&lane, &host_header);
    let cache_key = format!("{}{}", req.target, lane.path);
    // A fresh cached answer goes out without touching the upstream at all.
    if let Some(hit) = snapshot.lane_cache.lookup(&cache_key, &cache_request) {
        let mut paced = Paced::new(client, None, pacers.download);
        record.status = hit.parts.status.as_u16();
        record.reason = "allowed".into();
        let sent = lane::send_stored(&mut paced, hit, timeouts.idle).await;
        return lane_outcome(sent, End::CacheHit, record);
    }
    let upstream = dial(snapshot, &plan, req.target.port, record).await?;
    drop(plan);
    let body = std::mem::take(&mut req.early_data);
    let mut paced_request = Paced::new(&mut *client, pacers.upload, None);
    let answer = lane::fetch(
        &mut paced_request,
        upstream,
        &lane,
        &host_header,
        body,
        timeouts.head,
    )
    .await?;
    record.bytes_up = answer.bytes_up;
    record.status = answer.status;
    record.reason = "allowed".into();
    let mut paced = Paced::new(client, None, pacers.download);
    let store = Some((&snapshot.lane_cache, cache_key.as_str(), &cache_request));
    let with_body = lane.method != "HEAD";
    let sent = lane::send(&mut paced, answer, with_body, timeouts.idle, store).await;
    lane_outcome(sent, End::Forwarded, record)
}

/// A CONNECT tunnel: dial, answer 200, note a learned destination, check the SNI, then relay
/// until either side ends it (or a reload or the drain closes it).
async fn serve_tunnel(
    snapshot: &Snapshot,
    client: &mut ClientStream,
    admitted: Box<Admitted<'_>>,
    record: &mut AccessRecord,
) -> Result<(), Refusal> {
    let Admitted {
        request: mut req,
        plan,
        identity,
        identified,
        slot: _slot,
        pacers,
    } = unbox(admitted);
    let mut upstream = dial(snapshot, &plan, req.target.port, record).await?;
    replies::write_established(client)
        .await
        .map_err(|_| Refusal::after_reply(End::ClientError, "client went away before 200"))?;
    // What a parent proxy sent after its own 200 head (kept in the record's way out).
    if record.way_out.as_ref().is_some_and(|w| w.early.is_some()) {
        Box::pin(super::parent::send_down(client, record)).await?;
    }
    record.status = 200;
    record.reason = plan.decision.why().into_owned();
    if let Some(rule) = plan.decision.rule
        && let Some(name) = rule.learns(&req.target.host)
    {
        record.new_destination =
            snapshot.note_destination(identity, rule, name.as_str(), req.target.port);
    }
    // Listed for operators from here to its end (and closed by them, a hold or a revocation).
    let rule = plan.decision.rule;
    let registered = register(
        snapshot,
        record,
        identity,
        *identified,
        &req.target,
        rule,
        &pacers,
    );
    let category = record.category.as_deref().unwrap_or("none");
    let active = snapshot.tunnel_series(identity, category).active;
    active.inc();
    // Counted down however the tunnel ends, early returns included.
    let _active = scopeguard(move || {
        active.dec();
    });
    let first_bytes = std::mem::take(&mut req.early_data);
    let policy = &snapshot.config.policy;
    let sni_mode = policy.sni_mode(plan.decision.rule, req.target.port);
    if sni_mode != SniMode::Off {
        let scope = snapshot.config.scope(identity);
        let check = |hello: &sni::Hello| {
            check_sni(hello, sni_mode, &req.target, |name| {
                policy
                    .decide(&Host::Name(name.clone()), req.target.port, scope)
                    .verdict
                    == Verdict::Allow
            })
        };
        // Boxed: tunnels without an SNI check do not carry the peeks' space.
        Box::pin(checked_tls_start(
            client,
            &mut upstream,
            first_bytes,
            check,
            record,
        ))
        .await?;
    } else {
        send_up(&mut upstream, &first_bytes, &mut record.bytes_up).await?;
    }
    // Nothing of the request is needed any more: an idle tunnel holds only its sockets.
    drop((req, plan));

    let stops = tunnel::Stop {
        live: Some(&registered.tunnel.live),
        drained: Some(&snapshot.closing),
    };
    // The relay counts its bytes as they flow, an atomic add each 256 KiB (found only now:
    // kept across the awaits above, it would enlarge every idle tunnel's future).
    let category = record.category.as_deref().unwrap_or("none");
    let meter = snapshot.tunnel_series(identity, category).bytes;
    // What moved before the relay (early data, a checked ClientHello and the origin's first
    // record) is counted here too, so the access record has nothing left to count at the end
    // (which would look the series up again, with label strings, for every checked tunnel).
    meter.up.inc_by(record.bytes_up);
    meter.down.inc_by(record.bytes_down);
    // Plain on both sides splices; TLS on either (a TLS client, a parent spoken to over TLS)
    // goes through the buffered copy (bytes must be decrypted). A plain upstream is relayed as
    // the bare socket: no TLS check per chunk.
    let idle = snapshot.config.timeouts.idle;
    let outcome = match (client, &mut upstream) {
        (ClientStream::Plain(tcp), Upstream::Plain(up)) => {
            tunnel::relay_tcp(tcp, up, idle, stops, pacers, meter).await
        }
        (client, Upstream::Plain(up)) => {
            tunnel::relay(client, up, idle, stops, pacers, meter).await
        }
        (client, up) => tunnel::relay(client, up, idle, stops, pacers, meter).await,
    };
    record.bytes_up += outcome.bytes_up;
    record.bytes_down += outcome.bytes_down;
    record.metered_up = record.bytes_up;
    record.metered_down = record.bytes_down;
    record.end = outcome.end;
    Ok(())
}

/// Puts an open tunnel in the live registry. A plain function: the tunnel's description is
/// built on its stack, not in the connection's future (every idle tunnel pays for that).
fn register<'s>(
    snapshot: &'s Snapshot,
    record: &AccessRecord,
    identity: Identity,
    identified: IdentifiedBy,
    target: &crate::policy::host::Target,
    rule: Option<&crate::policy::Rule>,
    pacers: &Pacers,
) -> crate::live::Registered<'s> {
    let names = &snapshot.names;
    let (rule, category) = match rule.map(|r| names.rule(&snapshot.config, r)) {
        Some((name, category)) => (Some(name), category),
        None => (None, names.no_category.clone()),
    };
    let opened = crate::live::Opened {
        id: record.conn_id,
        branch: names.branch(identity),
        identified,
        client: record.client.unwrap_or(([0, 0, 0, 0], 0).into()),
        target: target.to_string().into_boxed_str(),
        dialled: record.resolved,
        rule,
        category,
    };
    let live = Live::new([
        pacers.upload.as_ref().map(|p| p.waits()),
        pacers.download.as_ref().map(|p| p.waits()),
    ]);
    let mut tunnel = Tunnel::new(opened, live);
    if let Some(way_out) = &record.way_out {
        tunnel.egress = Some(way_out.egress.as_str().into());
        tunnel.parent = way_out.parent.as_deref().map(Into::into);
    }
    let registered = snapshot.live.register(tunnel);
    // A reload since admission swept the registry before this tunnel was in it.
    snapshot
        .live
        .check_late(&registered.tunnel, &snapshot.config, snapshot.generation);
    registered
}

/// The admitted request out of its box, the box freed now: moving out of `*boxed` in place
/// would keep the allocation until the function returns, through every idle tunnel's life.
fn unbox(boxed: Box<Admitted<'_>>) -> Admitted<'_> {
    *boxed
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// The access line's end for a lane answer: how sending it went.
fn lane_outcome(sent: lane::Sent, done: End, record: &mut AccessRecord) -> Result<(), Refusal> {
    record.bytes_down = sent.bytes;
    match sent.failure {
        None => {
            record.end = done;
            Ok(())
        }
        Some((end, reason)) => Err(Refusal::after_reply(end, reason)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// Every client connection is one task whose future holds the whole data path; its size
    /// is paid by every idle tunnel (docs/benchmarks.md: memory per idle tunnel). Large
    /// futures (hickory's lookup, scratch buffers) must be boxed or kept out of it.
    #[tokio::test]
    async fn the_connection_future_stays_small() {
        let config = Config::parse(
            "[resolver]\nhosts_only = true\n",
            "t",
            crate::config::TEST_NOW,
        )
        .unwrap();
        let snapshot = Snapshot::new(config).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = TcpStream::connect(addr).await.unwrap();
        let size = std::mem::size_of_val(&serve(&snapshot, stream, addr, 1, false));
        // Release builds, 2026-11-23: 1.2 KiB for the core; 1.6 KiB with branches and the TLS
        // listener; 1.76 KiB with SNI checks and the plain-HTTP lane (debug builds run a little
        // larger). Their own large futures (DNS lookup, SNI peek, HTTP exchange) are boxed.
        assert!(size <= 2048, "serve() future is {size} bytes");
        // The TLS listener's task: the same data path plus the client's stream handle; the
        // handshake's state is boxed and freed once done (4,488 bytes when it was inline).
        let resolver = rustls::server::ResolvesServerCertUsingSni::new();
        let tls_config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(std::sync::Arc::new(resolver));
        let acceptor = TlsAcceptor::from(std::sync::Arc::new(tls_config));
        let stream = TcpStream::connect(addr).await.unwrap();
        let size = std::mem::size_of_val(&serve_tls(&snapshot, &acceptor, stream, addr, 1, false));
        assert!(size <= 2304, "serve_tls() future is {size} bytes");
    }
}
