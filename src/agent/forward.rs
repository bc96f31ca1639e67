//! `portcullis-agent forward`: a plain HTTP CONNECT proxy for local apps that carries each
//! CONNECT to the first healthy gateway (TLS with the branch's certificate, or credentials) and
//! passes the gateway's answer back unchanged. A gateway that fails before answering (down,
//! refusing, or hung: see `pool`) costs the app nothing: the same request goes to the next one,
//! or to the same one again after a pause when it only refused the connection.
//!
//! Routes on the listener: `CONNECT host:port` (the proxy) and `GET /status` (JSON of the
//! gateways and their state, loopback clients only). Anything else gets 405. Built on the
//! gateway's parts: its accept loop and drain, request-head reader, replies, relay and log line.

use super::pool::Pool;
use super::proxy_client::{self, Blame, ProxyError, ProxyStream, ReplyHead};
use super::trust::{self, ClientCertificate};
use crate::accept::{Connections, Drained};
use crate::access_log::AccessRecord;
use crate::end::End;
use crate::gateway::Refusal;
use crate::gateway::request::{self, Head};
use crate::tunnel::relay;
use ipnet::IpNet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// tracing target of the one line per forwarded request.
pub const TARGET: &str = crate::access_log::AGENT_TARGET;

/// When only refusing gateways are left, how many more rounds a request gets, and the pause
/// before the first (doubling each round: 50, 100, 200 and 400 ms, give or take half).
const REFUSED_ROUNDS: u32 = 4;
const REFUSED_PAUSE: Duration = Duration::from_millis(50);

/// Longest a refused request's body from the gateway is passed on.
const ERROR_BODY_TIME: Duration = Duration::from_secs(10);
const ERROR_BODY_BYTES: u64 = 64 * 1024;

/// A validated forwarder configuration.
pub struct Settings {
    pub listen: SocketAddr,
    /// Client networks allowed besides loopback (loopback is always allowed).
    pub clients: Vec<IpNet>,
    pub pool: Arc<Pool>,
    /// `Proxy-Authorization` value replacing whatever the app sends; `None` passes the app's on.
    pub authorization: Option<String>,
    pub head_timeout: Duration,
    pub idle_timeout: Duration,
    pub drain: Duration,
    pub probe_interval: Duration,
    pub max_connections: usize,
    /// The admin listener for `/metrics` (off when `None`).
    pub admin: Option<SocketAddr>,
    pub metrics: super::metrics::AgentMetrics,
    /// The client certificate presented to `https://` gateways, when one is configured.
    pub certificate: Option<ClientCertificate>,
    /// Notified at the drain timeout: open tunnels end (`drain_timeout`) and log their line.
    pub closing: crate::tunnel::Closing,
}

/// Binds the listener, then serves until `shutdown` resolves, then drains.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    let listener = crate::accept::listen(settings.listen)?;
    let local = listener.local_addr()?;
    tracing::info!(address = %local, gateways = settings.pool.len(), "listening");
    crate::process::notify(crate::process::ServiceState::Ready);
    let admin = match settings.admin {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await?),
        None => None,
    };
    let probe = tokio::spawn(settings.pool.clone().probe_forever(settings.probe_interval));
    let certificate = settings
        .certificate
        .clone()
        .map(|c| tokio::spawn(watch_certificate(c)));
    let settings = Arc::new(settings);
    let admin = admin.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(address = %addr, "admin listening");
        }
        let settings = settings.clone();
        tokio::spawn(crate::admin_http::serve(listener, move |ask| {
            settings.metrics.route(ask, &settings.pool)
        }))
    });
    let connections = Connections::new(settings.max_connections);
    let accepting = connections.accept_loop(listener, |tcp, peer, id, slot| {
        let settings = settings.clone();
        async move {
            serve(&settings, tcp, peer, id).await;
            drop(slot);
        }
    });
    tokio::select! {
        _ = shutdown => {}
        _ = accepting => {}
    }
    probe.abort();
    if let Some(certificate) = certificate {
        certificate.abort();
    }
    if let Some(admin) = admin {
        admin.abort();
    }
    crate::process::notify(crate::process::ServiceState::Stopping);
    tracing::info!(
        open = connections.open(),
        drain_s = settings.drain.as_secs(),
        "draining"
    );
    match connections.drain(settings.drain).await {
        Drained::All => tracing::info!("drained"),
        Drained::Left(left) => {
            tracing::warn!(left, "drain time over; closing the remaining tunnels");
            // They end with their counts and write their lines before the process exits.
            settings.closing.fire();
            let _ = connections.drain(Duration::from_secs(2)).await;
        }
    }
    Ok(())
}

/// Logs the client certificate's validity at start (a warning within 30 days of its end, or
/// before its start), then an error at the moment it expires: from then on every `https://`
/// gateway refuses it, and the log says why before anyone wonders about the 502s.
async fn watch_certificate(certificate: ClientCertificate) {
    const SOON_DAYS: i64 = 30;
    let path = certificate.path.display().to_string();
    let subject = certificate.subject.as_str();
    let not_after = trust::date(certificate.not_after);
    let now = trust::now();
    match certificate.validity(now) {
        trust::Validity::Valid { days_left } if days_left < SOON_DAYS => {
            tracing::warn!(certificate = %path, subject, not_after, days_left, "client certificate expires soon");
        }
        trust::Validity::Valid { days_left } => {
            tracing::info!(certificate = %path, subject, not_after, days_left, "client certificate");
        }
        // Expired ones never get here: the forwarder does not start with one.
        _ => {
            let not_before = trust::date(certificate.not_before);
            let clock = trust::date(now);
            tracing::warn!(certificate = %path, subject, not_before, clock, "client certificate not valid yet");
        }
    }
    // In steps of at most a day: a timer years ahead is beyond tokio's timer wheel.
    loop {
        let left = certificate.not_after - trust::now();
        if left < 0 {
            break;
        }
        let step = u64::try_from(left).unwrap_or(0).clamp(1, 86_400);
        tokio::time::sleep(Duration::from_secs(step)).await;
    }
    tracing::error!(certificate = %path, subject, not_after, "client certificate expired");
}

/// Loopback always; other addresses only from `clients` (IPv4-mapped IPv6 counts as IPv4).
fn client_allowed(clients: &[IpNet], ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback() || crate::policy::in_networks(clients, ip)
}

async fn serve(settings: &Settings, mut app: TcpStream, peer: SocketAddr, id: u64) {
    let started = Instant::now();
    let mut line = AccessRecord {
        conn_id: id,
        client: Some(peer),
        ..AccessRecord::default()
    };
    if let Err(refusal) = forward(settings, &mut app, peer, &mut line).await {
        if let Some(status) = refusal.status {
            let _ = crate::gateway::replies::write_error(&mut app, status, &refusal.reason).await;
            let _ = app.shutdown().await;
            line.status = status;
        }
        line.end = refusal.end;
        line.reason = refusal.reason.into_owned();
    }
    line.duration = started.elapsed();
    settings.metrics.ended(line.end);
    line.emit_agent();
}

/// A gateway's answer to the app's CONNECT.
struct Opened {
    gateway: usize,
    stream: ProxyStream,
    reply: ReplyHead,
    /// Another gateway failed the request first.
    failed_over: bool,
}

/// Carries the CONNECT `head` to the first gateway that answers, in the pool's order. A gateway
/// that fails before answering costs the app nothing: the request goes to the next one (no
/// payload byte has been sent; the app's early bytes wait for a 200). When the only gateways
/// left refused the connection (alive but busy: they closed it before answering), the round is
/// tried again after a short, growing pause, [`REFUSED_ROUNDS`] times at most. A gateway that
/// stays silent past the reply timeout while answering its probe is dialling a slow
/// destination: the app gets 504, as another gateway would wait as long.
async fn open(
    settings: &Settings,
    head: &[u8],
    line: &mut AccessRecord,
) -> Result<Opened, Refusal> {
    let pool = &settings.pool;
    let mut first_tried = None;
    let mut last_error: Option<ProxyError> = None;
    for round in 0..=REFUSED_ROUNDS {
        if round > 0 {
            tokio::time::sleep(jitter(REFUSED_PAUSE * (1 << (round - 1)))).await;
        }
        let mut refused = false;
        for i in pool.candidates() {
            first_tried.get_or_insert(i);
            let error = match attempt(pool, i, head).await {
                Ok((stream, reply)) => {
                    pool.answered(i);
                    return Ok(Opened {
                        gateway: i,
                        stream,
                        reply,
                        failed_over: first_tried != Some(i),
                    });
                }
                Err(e) => e,
            };
            match pool.failed(i, &error) {
                Blame::Down => {}
                Blame::Refused => refused = true,
                Blame::Silent => {
                    line.gateway = Some(pool.proxy(i).url.to_string());
                    return Err(Refusal::new(
                        End::GatewayTimeout,
                        format!("gateway: {error}"),
                    ));
                }
            }
            last_error = Some(error);
        }
        if !refused {
            break;
        }
    }
    let mut why = last_error.map_or_else(|| "no gateway configured".to_owned(), |e| e.to_string());
    // The likeliest cause, said by the agent itself: a gateway only names it with an alert.
    if let Some(problem) = settings
        .certificate
        .as_ref()
        .and_then(|c| c.problem(trust::now()))
    {
        why = format!("{why}; {problem}");
    }
    Err(Refusal::new(
        End::NoGateway,
        format!("no gateway reachable: {why}"),
    ))
}

/// One try at gateway `i`: connect (and TLS), send the head, await the reply head (probing a
/// gateway that is slow to answer).
async fn attempt(
    pool: &Pool,
    i: usize,
    head: &[u8],
) -> Result<(ProxyStream, ReplyHead), ProxyError> {
    let proxy = pool.proxy(i);
    let mut stream = proxy.dial().await?;
    let exchange = proxy_client::exchange(&mut stream, head, proxy.timeouts.reply);
    let reply = pool.await_reply(i, exchange).await?;
    Ok((stream, reply))
}

/// `pause` give or take half, so that requests refused together do not come back together.
fn jitter(pause: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    // A fresh RandomState is seeded differently each time: randomness without a dependency.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    pause / 2 + pause.mul_f64((random % 1000) as f64 / 1000.0)
}

/// One app request: checked, read, carried to a gateway and relayed; `line` is filled in.
async fn forward(
    settings: &Settings,
    app: &mut TcpStream,
    peer: SocketAddr,
    line: &mut AccessRecord,
) -> Result<(), Refusal> {
    if !client_allowed(&settings.clients, peer.ip()) {
        return Err(Refusal::new(End::ClientDenied, "client not allowed"));
    }
    let connect = match request::read_request(app, settings.head_timeout).await? {
        Head::Origin { method, path } if method == "GET" && path == "/status" => {
            if !peer.ip().is_loopback() {
                return Err(Refusal::new(
                    End::ClientDenied,
                    "status is for local clients only",
                ));
            }
            let body = serde_json::json!({ "gateways": settings.pool.status() }).to_string();
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = app.write_all(reply.as_bytes()).await;
            let _ = app.shutdown().await;
            line.status = 200;
            line.host = Some(path);
            return Ok(());
        }
        Head::Proxy(connect) if connect.lane.is_none() => connect,
        Head::Origin { .. } | Head::Proxy(_) => {
            return Err(Refusal::new(
                End::MethodNotAllowed,
                "only CONNECT (and GET /status)",
            ));
        }
    };
    // Normalised by the gateway's own parser: what the gateway receives is well-formed.
    let target = connect.target.to_string();
    line.host = Some(target.clone());
    // Configured credentials replace the app's; without them the app's pass through.
    let authorization = settings
        .authorization
        .as_deref()
        .or(connect.proxy_authorization.as_deref());
    let head = proxy_client::connect_head(&target, authorization);
    let early = connect.early_data;

    let Opened {
        gateway: i,
        stream: mut gateway,
        reply,
        failed_over,
    } = open(settings, &head, line).await?;
    drop(head);
    settings.pool.carried(i);
    if failed_over {
        settings.metrics.failovers.inc();
    }
    line.gateway = Some(settings.pool.proxy(i).url.to_string());
    line.status = reply.status;
    // The gateway's answer, unchanged.
    if app.write_all(&reply.raw).await.is_err() || app.write_all(&reply.leftover).await.is_err() {
        return Err(Refusal::after_reply(End::ClientError, "app went away"));
    }
    if !reply.is_success() {
        // The gateway closes after an error reply: pass its body on, bounded.
        let mut body = (&mut gateway).take(ERROR_BODY_BYTES);
        let _ = tokio::time::timeout(ERROR_BODY_TIME, tokio::io::copy(&mut body, app)).await;
        let _ = app.shutdown().await;
        line.end = End::RefusedByGateway;
        return Ok(());
    }
    line.bytes_down = reply.leftover.len() as u64;
    // Held for the whole tunnel otherwise: only the relay's on-demand buffers stay.
    drop(reply);
    if !early.is_empty() {
        if gateway.write_all(&early).await.is_err() {
            return Err(Refusal::after_reply(
                End::UpstreamError,
                "gateway write failed",
            ));
        }
        line.bytes_up = early.len() as u64;
    }
    drop(early);
    let meter = &settings.metrics.bytes;
    meter.up.inc_by(line.bytes_up);
    meter.down.inc_by(line.bytes_down);
    settings.metrics.tunnels_active.inc();
    let outcome = relay(
        app,
        &mut gateway,
        settings.idle_timeout,
        crate::tunnel::Stop {
            live: None,
            drained: Some(&settings.closing),
        },
        Default::default(),
        meter.clone(),
    )
    .await;
    settings.metrics.tunnels_active.dec();
    line.bytes_up += outcome.bytes_up;
    line.bytes_down += outcome.bytes_down;
    line.end = outcome.end;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_apps_are_served_unless_networks_are_listed() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for local in ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"] {
            assert!(client_allowed(&[], ip(local)), "{local}");
        }
        for remote in ["10.1.2.3", "192.168.1.5", "::ffff:10.1.2.3", "fd00::1"] {
            assert!(!client_allowed(&[], ip(remote)), "{remote}");
        }
        let office: Vec<IpNet> = vec!["10.1.0.0/16".parse().unwrap()];
        assert!(client_allowed(&office, ip("10.1.2.3")));
        assert!(client_allowed(&office, ip("::ffff:10.1.2.3")));
        assert!(!client_allowed(&office, ip("10.2.0.1")));
    }
}
