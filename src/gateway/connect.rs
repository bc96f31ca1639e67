//! The data path for one client connection, top to bottom: read the head, decide, resolve and
//! vet, dial, answer 200, check the SNI, tunnel, log. Every failure becomes one [`Refusal`]
//! carrying how the connection ends and the status to send (if a reply can still be sent).

use super::hello_retry::{self, Flight, ServerHello};
use super::lane;
use super::pending::Pending;
use super::plan::plan;
use super::refusal::{End, Refusal};
use super::request;
use super::sni::{self, check_sni};
use super::{Gateway, identity};
use crate::access_log::AccessRecord;
use crate::bandwidth::{Paced, Pacers};
use crate::policy::host::Host;
use crate::policy::{Decision, SniMode, Verdict};
use crate::stream::ClientStream;
use crate::tunnel;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

/// Serves one client connection and emits its canonical log line.
pub async fn serve(gw: &Gateway, mut client: TcpStream, peer: SocketAddr, conn_id: u64) {
    let started = Instant::now();
    let Some(peer) = real_client(gw, &mut client, peer, conn_id, started).await else {
        return;
    };
    // Held here and lent down (an argument of each async fn on the way would cost its space
    // in every idle tunnel's future).
    let mut pending = enter_pending(gw, peer);
    if pending.is_none() {
        // Boxed: only refused connections pay for the reply's future.
        return Box::pin(refuse_before_head(gw, client, peer, conn_id, started)).await;
    }
    serve_stream(
        gw,
        ClientStream::Plain(client),
        peer,
        conn_id,
        Vec::new(),
        started,
        &mut pending,
    )
    .await;
}

/// Answers 429 to a client over its unfinished-heads limit (nothing read yet) and closes
/// without waiting for anything more.
async fn refuse_before_head(
    gw: &Gateway,
    mut client: TcpStream,
    peer: SocketAddr,
    conn_id: u64,
    started: Instant,
) {
    let refusal = too_many_pending();
    let reply = request::write_error(&mut client, 429, &refusal.reason);
    let replied = matches!(tokio::time::timeout(REPLY_TIMEOUT, reply).await, Ok(Ok(())));
    let _ = client.shutdown().await;
    log_refused(gw, conn_id, peer, refusal, replied, started);
}

/// Counts an unfinished head for `peer`; `None` when it holds its limit already.
fn enter_pending(gw: &Gateway, peer: SocketAddr) -> Option<Pending<'_>> {
    let limits = &gw.config.limits;
    let key = crate::policy::client_key(peer.ip(), limits.ipv6_client_prefix);
    gw.pending_heads
        .enter(key, limits.max_pending_heads_per_client)
}

fn too_many_pending() -> Refusal {
    Refusal::new(
        End::PendingHeadsLimit,
        "too many unfinished requests from this address",
    )
}

/// The access line of a connection refused before its head.
fn log_refused(
    gw: &Gateway,
    conn_id: u64,
    peer: SocketAddr,
    refusal: Refusal,
    replied: bool,
    started: Instant,
) {
    AccessRecord {
        conn_id,
        client: Some(peer),
        status: refusal.status.filter(|_| replied).unwrap_or(0),
        reason: refusal.reason.into_owned(),
        end: refusal.end,
        duration: started.elapsed(),
        ..AccessRecord::default()
    }
    .finish(&gw.metrics);
}

/// The client's address: the peer's own, or, for a trusted load balancer, the one its PROXY
/// protocol header names. `None` (logged) when a balancer's header is missing or malformed.
async fn real_client(
    gw: &Gateway,
    client: &mut TcpStream,
    peer: SocketAddr,
    conn_id: u64,
    started: Instant,
) -> Option<SocketAddr> {
    if !crate::policy::in_networks(&gw.config.listen.proxy_protocol_from, peer.ip()) {
        return Some(peer);
    }
    match super::proxy_protocol::read_header(client, gw.config.timeouts.head).await {
        Ok(source) => Some(source.unwrap_or(peer)),
        Err(why) => {
            AccessRecord {
                conn_id,
                client: Some(peer),
                reason: why.to_owned(),
                end: End::ProxyProtocolError,
                duration: started.elapsed(),
                ..AccessRecord::default()
            }
            .finish(&gw.metrics);
            None
        }
    }
}

/// Serves one client on a TLS listener: handshake (bounded by `tls.handshake_timeout`), then
/// the same data path inside TLS, with the verified certificate's names for identity.
pub async fn serve_tls(
    gw: &Gateway,
    acceptor: &TlsAcceptor,
    mut client: TcpStream,
    peer: SocketAddr,
    conn_id: u64,
) {
    let started = Instant::now();
    let Some(peer) = real_client(gw, &mut client, peer, conn_id, started).await else {
        return;
    };
    // The handshake counts as unfinished head; no reply can be sent before it.
    let mut pending = enter_pending(gw, peer);
    if pending.is_none() {
        let refusal = Refusal::after_reply(too_many_pending().end, too_many_pending().reason);
        log_refused(gw, conn_id, peer, refusal, false, started);
        return;
    }
    let timeout = gw
        .config
        .tls
        .as_ref()
        .map_or(Duration::from_secs(10), |t| t.handshake_timeout);
    let failure = match tokio::time::timeout(timeout, Box::pin(acceptor.accept(client))).await {
        Ok(Ok(tls)) => {
            let names = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| super::tls::certificate_names(leaf))
                .unwrap_or_default();
            return serve_stream(
                gw,
                ClientStream::Tls(Box::new(tls)),
                peer,
                conn_id,
                names,
                started,
                &mut pending,
            )
            .await;
        }
        Ok(Err(e)) => format!("TLS handshake failed: {e}"),
        Err(_) => "TLS handshake timed out".to_owned(),
    };
    AccessRecord {
        conn_id,
        client: Some(peer),
        reason: failure,
        end: End::TlsHandshakeFailed,
        duration: started.elapsed(),
        ..AccessRecord::default()
    }
    .finish(&gw.metrics);
}

async fn serve_stream(
    gw: &Gateway,
    mut client: ClientStream,
    peer: SocketAddr,
    conn_id: u64,
    certificate_names: Vec<String>,
    started: Instant,
    pending: &mut Option<Pending<'_>>,
) {
    let mut record = AccessRecord {
        conn_id,
        client: Some(peer),
        ..AccessRecord::default()
    };
    let mut replied = false;
    let handled = handle(
        gw,
        &mut client,
        peer,
        &certificate_names,
        pending,
        &mut record,
    );
    if let Err(refusal) = handled.await {
        if let Some(status) = refusal.status {
            let reply = request::write_error(&mut client, status, &refusal.reason);
            if let Ok(Ok(())) = tokio::time::timeout(REPLY_TIMEOUT, reply).await {
                record.status = status;
                replied = true;
            }
        }
        record.reason = refusal.reason.into_owned();
        record.end = refusal.end;
    }
    record.duration = started.elapsed();
    record.finish(&gw.metrics);
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

async fn handle(
    gw: &Gateway,
    client: &mut ClientStream,
    peer: SocketAddr,
    certificate_names: &[String],
    pending: &mut Option<Pending<'_>>,
    record: &mut AccessRecord,
) -> Result<(), Refusal> {
    let timeouts = gw.config.timeouts;
    let read = request::read_connect(client, timeouts.head).await;
    // The head is in (or failed): this connection no longer counts as unfinished.
    drop(pending.take());
    let mut req = read?;
    record.host = Some(req.target.host.to_string());
    record.port = Some(req.target.port);
    if let Some(limiter) = &gw.connect_rate
        && limiter
            .check_key(&crate::policy::client_key(
                peer.ip(),
                gw.config.limits.ipv6_client_prefix,
            ))
            .is_err()
    {
        return Err(Refusal::new(
            End::RateLimited,
            "too many requests from this client",
        ));
    }

    let who = if gw.client_allowed(peer.ip()) {
        let authorization = req.proxy_authorization.as_deref();
        gw.identifier
            .identify(&gw.config, peer.ip(), authorization, certificate_names)
            .await
    } else {
        Ok(None)
    };
    let plan = plan(gw, peer.ip(), who, &req.target).await;
    record.resolve_time = plan.resolve_time;
    if let Some(identity) = plan.identity {
        record.branch = Some(identity::name(&gw.config.branches, identity).to_owned());
        record.verdict = Some(plan.decision.verdict.as_str());
        record.rule = plan.decision.rule.map(|r| r.name.clone());
        record.category = plan.decision.rule.map(|r| r.category.clone());
    }
    if let Some(refusal) = plan.refusal {
        record.resolved = plan
            .candidates
            .first()
            .map(|c| SocketAddr::new(c.ip, req.target.port));
        return Err(refusal);
    }

    // Plain-HTTP rules (revocation lists, OCSP) are served by the lane only, and the lane only
    // serves them.
    let lane_rule = plan.decision.rule.is_some_and(|r| r.plain_http);
    if plan.decision.verdict == Verdict::Allow && lane_rule != req.forward.is_some() {
        let reason = if lane_rule {
            "plain-HTTP host: only GET, HEAD or OCSP POST through the proxy"
        } else {
            "not allowed as plain HTTP"
        };
        return Err(Refusal::new(End::PolicyDenied, reason));
    }
    let identity = plan.identity.flatten();
    let Some(_slot) = gw.admit_tunnel(identity) else {
        return Err(Refusal::new(
            End::BranchTunnelLimit,
            "branch tunnel limit reached",
        ));
    };

    // A fresh cached CRL answers without touching the upstream at all.
    let lane = req.forward.as_ref().map(|forward| {
        let host_header = match (&req.target.host, req.target.port) {
            (host, 80) => host.to_string(),
            _ => req.target.to_string(),
        };
        let cache_request = lane::cache_request(forward, &host_header);
        // Boxed: the request parts are large and only lane requests carry them.
        Box::new((
            host_header,
            cache_request,
            format!("{}{}", req.target, forward.path),
        ))
    });
    if let Some(lane) = &lane
        && let Some(hit) = gw.crl_cache.lookup(&lane.2, &lane.1)
    {
        let pacers = pacers_for(gw, identity, &plan.decision);
        let mut paced = Paced::new(client, None, pacers.download);
        record.status = hit.parts.status.as_u16();
        record.reason = "allowed".into();
        let sent = Box::pin(lane::send_stored(&mut paced, hit, timeouts.idle)).await;
        return lane_outcome(sent, End::CacheHit, record);
    }

    let dial_started = Instant::now();
    let dialled = super::dial::dial(
        plan.dialable(),
        req.target.port,
        timeouts.connect,
        &mut record.resolved,
    )
    .await;
    record.connect_time = Some(dial_started.elapsed());
    let mut upstream = dialled?;

    if let (Some(forward), Some(lane)) = (req.forward.take(), lane) {
        let body = std::mem::take(&mut req.early_data);
        // Revocation traffic obeys the schedules that list its category, like tunnels do.
        let pacers = pacers_for(gw, identity, &plan.decision);
        drop(plan);
        let mut paced_request = Paced::new(&mut *client, pacers.upload, None);
        // Boxed: only lane requests pay for the HTTP client's future.
        let exchange = lane::fetch(
            &mut paced_request,
            upstream,
            &forward,
            &lane.0,
            body,
            timeouts.head,
        );
        let answer = Box::pin(exchange).await?;
        record.bytes_up = answer.bytes_up;
        record.status = answer.status;
        record.reason = "allowed".into();
        let mut paced = Paced::new(client, None, pacers.download);
        let store = Some((&gw.crl_cache, lane.2.as_str(), &lane.1));
        let with_body = forward.method != "HEAD";
        let sent = Box::pin(lane::send(
            &mut paced,
            answer,
            with_body,
            timeouts.idle,
            store,
        ))
        .await;
        return lane_outcome(sent, End::Forwarded, record);
    }

    request::write_established(client)
        .await
        .map_err(|_| Refusal::after_reply(End::ClientError, "client went away before 200"))?;
    record.status = 200;
    record.reason = plan.decision.reason.to_owned();
    let active = gw
        .metrics
        .tunnels_active
        .get_or_create(&crate::metrics::TunnelLabels {
            category: record.category.clone().unwrap_or_else(|| "none".into()),
            branch: record.branch.clone().unwrap_or_else(|| "none".into()),
        })
        .clone();
    active.inc();
    // Counted down however the tunnel ends, early returns included.
    let _active = scopeguard(move || {
        active.dec();
    });
    let first_bytes = std::mem::take(&mut req.early_data);
    let policy = &gw.config.policy;
    let sni_mode = policy.sni_mode(plan.decision.rule, req.target.port);
    if sni_mode != SniMode::Off {
        let allowed_rules = identity.and_then(|i| gw.config.branches[i].allowed_rules.as_deref());
        let check = |hello: &sni::Hello| {
            check_sni(hello, sni_mode, &req.target, |name| {
                policy
                    .decide(&Host::Name(name.clone()), req.target.port, allowed_rules)
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
    // Under `on_reload = "close-denied"` a reload may close this tunnel.
    let stop = (gw.config.policy.on_reload == crate::policy::OnReload::CloseDenied).then(|| {
        gw.revocable
            .register(record.conn_id, req.target.clone(), record.branch.clone())
    });
    let conn_id = record.conn_id;
    let _unregister = stop
        .is_some()
        .then(|| scopeguard(move || gw.revocable.remove(conn_id)));
    // Only tunnels a schedule can throttle carry pacers; the rest pay nothing.
    let pacers = pacers_for(gw, identity, &plan.decision);
    // Nothing of the request is needed any more: an idle tunnel holds only its sockets.
    drop((req, plan));

    // Plain clients splice; TLS clients go through the buffered copy (bytes must be decrypted).
    let outcome = if let ClientStream::Plain(tcp) = client {
        tunnel::relay_tcp(tcp, &mut upstream, timeouts.idle, stop.as_deref(), pacers).await
    } else {
        tunnel::relay(
            client,
            &mut upstream,
            timeouts.idle,
            stop.as_deref(),
            pacers,
        )
        .await
    };
    record.bytes_up += outcome.bytes_up;
    record.bytes_down += outcome.bytes_down;
    record.end = outcome.end;
    Ok(())
}

/// The start of a tunnel with an SNI check: peek the ClientHello and check it, forward it
/// alone, read the upstream's answer far enough to see a HelloRetryRequest and pass it on, and
/// after one check the client's second ClientHello the same way (it must name the same server).
/// Every byte read goes on unchanged and is counted; a refusal closes the tunnel.
async fn checked_tls_start(
    client: &mut ClientStream,
    upstream: &mut TcpStream,
    early: Vec<u8>,
    check: impl Fn(&sni::Hello) -> Result<(), Refusal>,
    record: &mut AccessRecord,
) -> Result<(), Refusal> {
    let (hello, mut bytes) = sni::peek_client_hello(client, early).await;
    if let sni::Hello::Name(name) = &hello {
        record.sni = Some(name.to_string());
    }
    check(&hello)?;
    let sni::Hello::Name(first) = hello else {
        // Only a named ClientHello passes the check.
        return Err(Refusal::after_reply(
            End::SniMissing,
            "ClientHello carries no server name",
        ));
    };
    // What the client sent after its hello waits until the upstream's answer is known: a second
    // hello sent early must not reach the upstream unchecked.
    let Some(hello_len) = sni::hello_records_len(&bytes) else {
        return Err(Refusal::after_reply(
            End::NotTls,
            "ClientHello record carries more than the ClientHello",
        ));
    };
    let held = bytes.split_off(hello_len);
    send_up(upstream, &bytes, &mut record.bytes_up).await?;

    let (answer, bytes) = hello_retry::peek_server_hello(upstream).await;
    if !bytes.is_empty() {
        let write = async {
            client.write_all(&bytes).await?;
            client.flush().await
        };
        write
            .await
            .map_err(|_| Refusal::after_reply(End::ClientError, "client write failed"))?;
        record.bytes_down += bytes.len() as u64;
    }
    let rest = match answer {
        ServerHello::Seen(Flight::HelloRetry) => {
            let (second, bytes) = sni::peek_second_client_hello(client, held).await;
            if let sni::Hello::Name(name) = &second
                && *name != first
            {
                record.sni = Some(name.to_string());
            }
            sni::check_second_sni(&first, &second, &check)?;
            bytes
        }
        // No second hello can follow; the relay carries the rest.
        ServerHello::Seen(Flight::NoRetry) | ServerHello::Closed => held,
        ServerHello::TooLarge => {
            let max = hello_retry::MAX_SERVER_HELLO_BYTES / 1024;
            return Err(Refusal::after_reply(
                End::UpstreamError,
                format!("upstream's first TLS handshake message is over {max} KiB"),
            ));
        }
        ServerHello::Silent => {
            return Err(Refusal::after_reply(
                End::UpstreamTimeout,
                "upstream sent no ServerHello in time",
            ));
        }
    };
    send_up(upstream, &rest, &mut record.bytes_up).await
}

/// Writes bytes read before the relay to the upstream, counting them.
async fn send_up(upstream: &mut TcpStream, bytes: &[u8], sent: &mut u64) -> Result<(), Refusal> {
    if bytes.is_empty() {
        return Ok(());
    }
    upstream
        .write_all(bytes)
        .await
        .map_err(|_| Refusal::after_reply(End::UpstreamError, "upstream write failed"))?;
    *sent += bytes.len() as u64;
    Ok(())
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

/// The bandwidth pacers for a request of `identity` allowed by `decision` (none when no
/// schedule can throttle its branch and category).
fn pacers_for(gw: &Gateway, identity: identity::Identity, decision: &Decision<'_>) -> Pacers {
    match decision.rule {
        Some(rule) => gw.throttles.pacers(
            identity::name(&gw.config.branches, identity),
            &rule.category,
        ),
        None => Pacers::default(),
    }
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
        let gw = Gateway::new(config).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = TcpStream::connect(addr).await.unwrap();
        let size = std::mem::size_of_val(&serve(&gw, stream, addr, 1));
        // Release builds, 2026-11-23: 1.2 KiB for the core; 1.6 KiB with branches and the TLS
        // listener; 1.76 KiB with SNI checks and the plain-HTTP lane (debug builds run a little
        // larger). Their own large futures (DNS lookup, SNI peek, HTTP exchange) are boxed.
        assert!(size <= 2048, "serve() future is {size} bytes");
    }
}
