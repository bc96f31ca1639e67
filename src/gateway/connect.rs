//! The data path for one client connection, top to bottom: read the head, decide, resolve and
//! vet, dial, answer 200, check the SNI, tunnel, log. Every failure becomes one [`Refusal`]
//! carrying how the connection ends and the status to send (if a reply can still be sent).

use super::lane;
use super::pending::{self, Pending};
use super::plan::plan;
use super::refusal::{End, Refusal};
use super::replies;
use super::request;
use super::sni;
use super::sni_check::{check_sni, checked_tls_start, send_up};
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
    // in every idle tunnel's future); boxed, so the future keeps 8 bytes of it.
    let mut pending = pending::enter(gw, peer).map(Box::new);
    if pending.is_none() {
        // Boxed: only refused connections pay for the reply's future.
        return Box::pin(pending::refuse(gw, client, peer, conn_id, started)).await;
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
            let end = End::ProxyProtocolError;
            AccessRecord::before_request(conn_id, peer, end, why.into(), 0, started.elapsed())
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
    let mut pending = pending::enter(gw, peer).map(Box::new);
    if pending.is_none() {
        pending::log_refused(gw, conn_id, peer, false, started);
        return;
    }
    let timeout = gw
        .config
        .tls
        .as_ref()
        .map_or(Duration::from_secs(10), |t| t.handshake_timeout);
    // The handshake runs in a boxed future of its own: its state (rustls's connection by
    // value, the timer) is freed once done, instead of staying in the task of every tunnel
    // this listener holds (2.5 KiB each when it was inline).
    match Box::pin(handshake(acceptor, client, timeout)).await {
        Ok((client, names)) => {
            serve_stream(gw, client, peer, conn_id, names, started, &mut pending).await;
        }
        Err(failure) => {
            let end = End::TlsHandshakeFailed;
            AccessRecord::before_request(conn_id, peer, end, failure, 0, started.elapsed())
                .finish(&gw.metrics);
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

async fn serve_stream(
    gw: &Gateway,
    mut client: ClientStream,
    peer: SocketAddr,
    conn_id: u64,
    certificate_names: Vec<String>,
    started: Instant,
    pending: &mut Option<Box<Pending<'_>>>,
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
            let reply = replies::write_error(&mut client, status, &refusal.reason);
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
    pending: &mut Option<Box<Pending<'_>>>,
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
        // The audit trail names the proxy user (never the password), also when it failed.
        record.user = gw
            .identifier
            .credential_user(&gw.config, authorization, certificate_names);
        gw.identifier
            .identify(&gw.config, peer.ip(), authorization, certificate_names)
            .await
    } else {
        Ok(None)
    };
    let plan = plan(gw, peer.ip(), who, &req.target, req.forward.is_some()).await;
    record.resolve_time = plan.resolve_time;
    if let Some(identity) = plan.identity {
        record.branch = Some(identity::name(&gw.config.branches, identity).to_owned());
        record.verdict = Some(plan.decision.verdict.as_str());
        record.rule = plan.decision.rule_name().map(str::to_owned);
        record.category = plan.decision.rule.map(|r| r.category.clone());
    }
    if let Some(refusal) = plan.refusal {
        record.resolved = plan
            .candidates
            .first()
            .map(|c| SocketAddr::new(c.ip, req.target.port));
        return Err(refusal);
    }

    let identity = plan.identity.flatten();
    let Some(_slot) = gw.admit_tunnel(identity).await else {
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

    replies::write_established(client)
        .await
        .map_err(|_| Refusal::after_reply(End::ClientError, "client went away before 200"))?;
    record.status = 200;
    record.reason = plan.decision.why().into_owned();
    if let Some(rule) = plan.decision.rule
        && let Some(name) = rule.learns(&req.target.host)
    {
        record.new_destination =
            gw.note_destination(identity, rule, name.as_str(), req.target.port);
    }
    let category = record.category.as_deref().unwrap_or("none");
    let active = gw.tunnel_series(identity, category).active;
    active.inc();
    // Counted down however the tunnel ends, early returns included.
    let _active = scopeguard(move || {
        active.dec();
    });
    let first_bytes = std::mem::take(&mut req.early_data);
    let policy = &gw.config.policy;
    let sni_mode = policy.sni_mode(plan.decision.rule, req.target.port);
    if sni_mode != SniMode::Off {
        let scope = gw.config.scope(identity);
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

    let stops = tunnel::Stop {
        revoked: stop.as_deref(),
        drained: Some(&gw.closing),
    };
    // The relay counts its bytes as they flow, an atomic add each 256 KiB (found only now:
    // kept across the awaits above, it would enlarge every idle tunnel's future).
    let category = record.category.as_deref().unwrap_or("none");
    let meter = gw.tunnel_series(identity, category).bytes;
    // What moved before the relay (early data, a checked ClientHello and the origin's first
    // record) is counted here too, so the access record has nothing left to count at the end
    // (which would look the series up again, with label strings, for every checked tunnel).
    meter.up.inc_by(record.bytes_up);
    meter.down.inc_by(record.bytes_down);
    // Plain clients splice; TLS clients go through the buffered copy (bytes must be decrypted).
    let outcome = if let ClientStream::Plain(tcp) = client {
        tunnel::relay_tcp(tcp, &mut upstream, timeouts.idle, stops, pacers, meter).await
    } else {
        tunnel::relay(client, &mut upstream, timeouts.idle, stops, pacers, meter).await
    };
    record.bytes_up += outcome.bytes_up;
    record.bytes_down += outcome.bytes_down;
    record.metered_up = record.bytes_up;
    record.metered_down = record.bytes_down;
    record.end = outcome.end;
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
        // The TLS listener's task: the same data path plus the client's stream handle; the
        // handshake's state is boxed and freed once done (4,488 bytes when it was inline).
        let resolver = rustls::server::ResolvesServerCertUsingSni::new();
        let tls_config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(std::sync::Arc::new(resolver));
        let acceptor = TlsAcceptor::from(std::sync::Arc::new(tls_config));
        let stream = TcpStream::connect(addr).await.unwrap();
        let size = std::mem::size_of_val(&serve_tls(&gw, &acceptor, stream, addr, 1));
        assert!(size <= 2304, "serve_tls() future is {size} bytes");
    }
}
