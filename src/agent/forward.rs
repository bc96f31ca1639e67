//! `portcullis-agent forward`: a plain HTTP CONNECT proxy for local apps that carries each
//! CONNECT to the first healthy gateway (TLS with the branch's certificate, or credentials) and
//! passes the gateway's answer back unchanged. A gateway that fails before answering is marked
//! down and the same request goes to the next one, so the app does not notice.
//!
//! Routes on the listener: `CONNECT host:port` (the proxy) and `GET /status` (JSON of the
//! gateways and their state, loopback clients only). Anything else gets 405.

use super::pool::Pool;
use super::proxy_client::{self, ProxyError};
use crate::hostname::Target;
use crate::request::write_error;
use crate::tunnel::relay;
use ipnet::IpNet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// tracing target of the one line per forwarded request.
pub const TARGET: &str = "portcullis::agent";

/// Largest request head accepted from a local app.
const MAX_HEAD_BYTES: usize = 8 * 1024;
const MAX_HEADERS: usize = 64;
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
}

/// Binds the listener, then serves until `shutdown` resolves, then drains.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    let listener = TcpListener::bind(settings.listen).await?;
    let local = listener.local_addr()?;
    tracing::info!(address = %local, gateways = settings.pool.len(), "listening");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let probe = tokio::spawn(settings.pool.clone().probe_forever(settings.probe_interval));
    let settings = Arc::new(settings);
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    let ids = AtomicU64::new(0);
    tokio::pin!(shutdown);
    loop {
        // The permit is taken before accept: at the limit, further apps wait in the backlog.
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let settings = settings.clone();
        tokio::spawn(async move {
            serve(&settings, tcp, peer, id).await;
            drop(permit);
        });
    }
    drop(listener);
    probe.abort();
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let open = settings.max_connections - permits.available_permits();
    tracing::info!(open, drain_s = settings.drain.as_secs(), "draining");
    let all = u32::try_from(settings.max_connections).unwrap_or(u32::MAX);
    match tokio::time::timeout(settings.drain, permits.acquire_many(all)).await {
        Ok(_) => tracing::info!("drained"),
        Err(_) => {
            let left = settings.max_connections - permits.available_permits();
            tracing::warn!(left, "drain time over; closing the remaining tunnels");
        }
    }
    Ok(())
}

/// Loopback always; other addresses only from `clients` (IPv4-mapped IPv6 counts as IPv4).
fn client_allowed(clients: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    ip.is_loopback() || clients.iter().any(|net| net.contains(&ip))
}

/// What the app asked for.
enum Ask {
    Connect {
        target: String,
        authorization: Option<String>,
        early: Vec<u8>,
    },
    Status,
}

/// One line per request, whatever the outcome.
struct Line {
    id: u64,
    client: SocketAddr,
    target: Option<String>,
    gateway: Option<String>,
    status: u16,
    bytes_up: u64,
    bytes_down: u64,
    end: &'static str,
    started: Instant,
}

impl Line {
    fn emit(&self) {
        tracing::info!(
            target: TARGET,
            conn_id = self.id,
            client = %self.client,
            host = self.target.as_deref(),
            gateway = self.gateway.as_deref(),
            status = self.status,
            bytes_up = self.bytes_up,
            bytes_down = self.bytes_down,
            duration_ms = self.started.elapsed().as_millis() as u64,
            end = self.end,
            "request"
        );
    }
}

async fn serve(settings: &Settings, mut app: TcpStream, peer: SocketAddr, id: u64) {
    let mut line = Line {
        id,
        client: peer,
        target: None,
        gateway: None,
        status: 0,
        bytes_up: 0,
        bytes_down: 0,
        end: "closed",
        started: Instant::now(),
    };
    let _ = app.set_nodelay(true);
    if !client_allowed(&settings.clients, peer.ip()) {
        refuse(
            &mut app,
            &mut line,
            403,
            "client_denied",
            "client not allowed",
        )
        .await;
        return;
    }
    let ask = match tokio::time::timeout(settings.head_timeout, read_head(&mut app)).await {
        Err(_) => {
            refuse(
                &mut app,
                &mut line,
                408,
                "head_timeout",
                "no complete request head in time",
            )
            .await;
            return;
        }
        Ok(Err(HeadError::Closed)) => {
            line.end = "client_closed";
            line.emit();
            return;
        }
        Ok(Err(HeadError::Refuse(status, kind, why))) => {
            refuse(&mut app, &mut line, status, kind, why).await;
            return;
        }
        Ok(Ok(ask)) => ask,
    };
    let (target, app_authorization, early) = match ask {
        Ask::Status => {
            if !peer.ip().is_loopback() {
                refuse(
                    &mut app,
                    &mut line,
                    403,
                    "client_denied",
                    "status is for local clients only",
                )
                .await;
                return;
            }
            let body = serde_json::json!({ "gateways": settings.pool.status() }).to_string();
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = app.write_all(reply.as_bytes()).await;
            let _ = app.shutdown().await;
            return;
        }
        Ask::Connect {
            target,
            authorization,
            early,
        } => (target, authorization, early),
    };
    line.target = Some(target.clone());
    // Configured credentials replace the app's; without them the app's pass through.
    let authorization = settings
        .authorization
        .as_deref()
        .or(app_authorization.as_deref());
    let head = proxy_client::connect_head(&target, authorization);

    let mut last_error: Option<ProxyError> = None;
    let mut opened = None;
    for i in settings.pool.candidates() {
        let mut stream = match settings.pool.dial(i).await {
            Ok(stream) => stream,
            Err(e) => {
                last_error = Some(e);
                continue;
            }
        };
        let reply_timeout = settings.pool.proxy(i).timeouts.reply;
        match proxy_client::exchange(&mut stream, &head, reply_timeout).await {
            Ok(reply) => {
                opened = Some((i, stream, reply));
                break;
            }
            Err(e) if e.safe_to_retry() => {
                // Closed before answering (stopped, overloaded): the request never happened.
                settings.pool.mark_down(i, &e);
                last_error = Some(e);
            }
            Err(e) => {
                line.gateway = Some(settings.pool.proxy(i).url.to_string());
                refuse(
                    &mut app,
                    &mut line,
                    504,
                    "gateway_timeout",
                    &format!("gateway: {e}"),
                )
                .await;
                return;
            }
        }
    }
    drop(head);
    let Some((i, mut gateway, reply)) = opened else {
        let why = last_error.map_or_else(|| "no gateway configured".to_owned(), |e| e.to_string());
        refuse(
            &mut app,
            &mut line,
            502,
            "no_gateway",
            &format!("no gateway reachable: {why}"),
        )
        .await;
        return;
    };
    settings.pool.carried(i);
    line.gateway = Some(settings.pool.proxy(i).url.to_string());
    line.status = reply.status;
    // The gateway's answer, unchanged.
    if app.write_all(&reply.raw).await.is_err() || app.write_all(&reply.leftover).await.is_err() {
        line.end = "client_error";
        line.emit();
        return;
    }
    if !reply.is_success() {
        // The gateway closes after an error reply: pass its body on, bounded.
        let mut body = (&mut gateway).take(ERROR_BODY_BYTES);
        let _ = tokio::time::timeout(ERROR_BODY_TIME, tokio::io::copy(&mut body, &mut app)).await;
        let _ = app.shutdown().await;
        line.end = "refused_by_gateway";
        line.emit();
        return;
    }
    line.bytes_down = reply.leftover.len() as u64;
    // Held for the whole tunnel otherwise: only the relay's on-demand buffers stay.
    drop(reply);
    if !early.is_empty() {
        if gateway.write_all(&early).await.is_err() {
            line.end = "upstream_error";
            line.emit();
            return;
        }
        line.bytes_up = early.len() as u64;
    }
    drop(early);
    let outcome = relay(
        &mut app,
        &mut gateway,
        settings.idle_timeout,
        None,
        Default::default(),
    )
    .await;
    line.bytes_up += outcome.bytes_up;
    line.bytes_down += outcome.bytes_down;
    line.end = outcome.end.as_str();
    line.emit();
}

async fn refuse(app: &mut TcpStream, line: &mut Line, status: u16, kind: &'static str, why: &str) {
    let _ = write_error(app, status, why).await;
    let _ = app.shutdown().await;
    line.status = status;
    line.end = kind;
    line.emit();
}

enum HeadError {
    Closed,
    Refuse(u16, &'static str, &'static str),
}

/// Reads the app's request head (bounded, like the gateway's).
async fn read_head(app: &mut TcpStream) -> Result<Ask, HeadError> {
    let mut buf = vec![0u8; MAX_HEAD_BYTES];
    let mut filled = 0;
    loop {
        let n = app
            .read(&mut buf[filled..])
            .await
            .map_err(|_| HeadError::Closed)?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        filled += n;
        if let Some((ask, len)) = parse_head(&buf[..filled])? {
            return Ok(match ask {
                Ask::Connect {
                    target,
                    authorization,
                    ..
                } => Ask::Connect {
                    target,
                    authorization,
                    early: buf[len..filled].to_vec(),
                },
                Ask::Status => Ask::Status,
            });
        }
        if filled == buf.len() {
            return Err(HeadError::Refuse(
                431,
                "head_too_large",
                "request head larger than 8 KiB",
            ));
        }
    }
}

fn parse_head(bytes: &[u8]) -> Result<Option<(Ask, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::Refuse(
                431,
                "head_too_large",
                "too many header lines",
            ));
        }
        Err(_) => {
            return Err(HeadError::Refuse(
                400,
                "bad_request",
                "malformed request head",
            ));
        }
    };
    let method = req.method.unwrap_or_default();
    let path = req.path.unwrap_or_default();
    if method == "GET" && path == "/status" {
        return Ok(Some((Ask::Status, len)));
    }
    if method != "CONNECT" {
        return Err(HeadError::Refuse(
            405,
            "method_not_allowed",
            "only CONNECT (and GET /status)",
        ));
    }
    // Normalised by the gateway's own parser: what the gateway receives is well-formed.
    let target = Target::parse_authority(path)
        .map_err(|why| HeadError::Refuse(400, "bad_request", why))?
        .to_string();
    let mut auth = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("proxy-authorization"));
    let authorization = match (auth.next(), auth.next()) {
        (None, _) => None,
        (Some(h), None) => Some(
            std::str::from_utf8(h.value)
                .map_err(|_| {
                    HeadError::Refuse(400, "bad_request", "malformed Proxy-Authorization")
                })?
                .to_owned(),
        ),
        (Some(_), Some(_)) => {
            return Err(HeadError::Refuse(
                400,
                "bad_request",
                "more than one Proxy-Authorization",
            ));
        }
    };
    Ok(Some((
        Ask::Connect {
            target,
            authorization,
            early: Vec::new(),
        },
        len,
    )))
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
