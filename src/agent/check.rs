//! `portcullis-agent check`: the branch's client certificate's validity, then for each endpoint
//! one fresh connection through the gateway with every stage reported on its own (proxy
//! reachable, proxy auth, CONNECT verdict with the gateway's reason, TLS with the endpoint's
//! name verified), and optionally a direct attempt that must fail: an open direct path means
//! the edge firewall leaks.

use super::endpoints::Endpoint;
use super::proxy_client::{self, Proxy, ProxyError};
use super::trust::{self, ClientCertificate};
use rustls::pki_types::ServerName;
use serde::Serialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

/// Everything a check run needs.
pub struct Check {
    pub proxy: Proxy,
    /// `Proxy-Authorization` value, when credentials are configured.
    pub authorization: Option<String>,
    /// Trust for the endpoints' own certificates (inside the tunnel).
    pub origin_tls: Arc<rustls::ClientConfig>,
    /// Try each endpoint without the proxy too.
    pub direct: bool,
    /// `--resolve HOST:PORT:ADDR` overrides for the direct attempts.
    pub resolve: HashMap<(String, u16), SocketAddr>,
    /// The client certificate presented to the gateway, when one is configured.
    pub certificate: Option<ClientCertificate>,
}

/// The client certificate's check: valid now, or why not.
#[derive(Clone, Debug, Serialize)]
pub struct CertificateCheck {
    pub path: String,
    pub subject: String,
    /// RFC 3339, UTC.
    pub not_before: String,
    pub not_after: String,
    pub outcome: Outcome,
    /// `expired on DATE`, `not valid before DATE (...)` or `valid until DATE (N days left)`.
    pub detail: String,
}

impl CertificateCheck {
    fn of(certificate: &ClientCertificate, now: i64) -> Self {
        let outcome = match certificate.validity(now) {
            trust::Validity::Valid { .. } => Outcome::Pass,
            _ => Outcome::Fail,
        };
        Self {
            path: certificate.path.display().to_string(),
            subject: certificate.subject.clone(),
            not_before: trust::date(certificate.not_before),
            not_after: trust::date(certificate.not_after),
            outcome,
            detail: certificate.describe(now),
        }
    }
}

/// How one stage went.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Pass,
    Fail,
    /// An earlier stage failed, or the stage does not apply.
    NotRun,
}

/// One stage of one endpoint.
#[derive(Clone, Debug, Serialize)]
pub struct Stage {
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ms: Option<u64>,
    /// Why it failed, or what it found (the proxy's status line for CONNECT).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Stage {
    fn pass(ms: u64, detail: Option<String>) -> Self {
        Self {
            outcome: Outcome::Pass,
            ms: Some(ms),
            detail,
        }
    }
    fn fail(ms: Option<u64>, detail: String) -> Self {
        Self {
            outcome: Outcome::Fail,
            ms,
            detail: Some(detail),
        }
    }
    fn not_run(detail: Option<&str>) -> Self {
        Self {
            outcome: Outcome::NotRun,
            ms: None,
            detail: detail.map(str::to_owned),
        }
    }
}

/// The gateway's answer to the CONNECT (or to the plain-HTTP request for port 80).
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    pub status: u16,
    /// The gateway's `Portcullis-Error` reason, when it refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The direct attempt (`--direct`): open means the firewall let it through.
#[derive(Clone, Debug, Serialize)]
pub struct Direct {
    pub open: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ms: Option<u64>,
    /// The connect error when closed (the expected result), the address when open.
    pub detail: String,
}

/// Result of one endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RowResult {
    Pass,
    Fail,
    Skip,
}

/// One endpoint's row: each stage and the overall result.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub host: String,
    pub port: u16,
    pub category: String,
    pub result: RowResult,
    /// Why the row failed or was skipped, in one line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub proxy: Stage,
    pub auth: Stage,
    pub connect: Stage,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    pub tls: Stage,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct: Option<Direct>,
}

/// The whole run.
#[derive(Debug, Serialize)]
pub struct Report {
    pub proxy: String,
    /// The client certificate, when one is configured: an invalid one fails the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateCheck>,
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    pub endpoints: Vec<Row>,
}

impl Report {
    /// Exit 0 only when nothing failed (skipped rows do not fail the run).
    pub fn all_passed(&self) -> bool {
        self.failed == 0
            && self
                .certificate
                .as_ref()
                .is_none_or(|c| c.outcome == Outcome::Pass)
    }
}

fn ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

impl Check {
    /// Checks every endpoint (concurrently: each on its own connection) and reports in order.
    pub async fn run(self, endpoints: Vec<Endpoint>) -> Report {
        let check = Arc::new(self);
        let tasks: Vec<_> = endpoints
            .into_iter()
            .map(|endpoint| {
                let check = check.clone();
                tokio::spawn(async move { check.endpoint(endpoint).await })
            })
            .collect();
        let mut rows = Vec::with_capacity(tasks.len());
        let mut lost = 0;
        for task in tasks {
            match task.await {
                Ok(row) => rows.push(row),
                // A panic in one row's check is a bug; it counts as a failure, the rest stands.
                Err(e) => {
                    lost += 1;
                    eprintln!("portcullis-agent: a check task failed: {e}");
                }
            }
        }
        let count = |r: RowResult| rows.iter().filter(|row| row.result == r).count();
        Report {
            proxy: check.proxy.url.to_string(),
            certificate: check
                .certificate
                .as_ref()
                .map(|c| CertificateCheck::of(c, trust::now())),
            passed: count(RowResult::Pass),
            failed: count(RowResult::Fail) + lost,
            skipped: count(RowResult::Skip),
            endpoints: rows,
        }
    }

    async fn endpoint(&self, endpoint: Endpoint) -> Row {
        let mut row = Row {
            host: endpoint.host.clone(),
            port: endpoint.port,
            category: endpoint.category.clone(),
            result: RowResult::Pass,
            note: None,
            proxy: Stage::not_run(None),
            auth: Stage::not_run(None),
            connect: Stage::not_run(None),
            verdict: None,
            tls: Stage::not_run(None),
            direct: None,
        };
        if let Some(why) = endpoint.skip {
            row.result = RowResult::Skip;
            row.note = Some(why);
            return row;
        }
        self.through_proxy(&endpoint, &mut row).await;
        if self.direct {
            let direct = self.direct_attempt(&endpoint).await;
            if direct.open && row.result == RowResult::Pass {
                row.result = RowResult::Fail;
                row.note =
                    Some("DIRECT OPEN: reachable without the gateway (the firewall leaks)".into());
            } else if direct.open {
                let note = row.note.take().unwrap_or_default();
                row.note = Some(format!(
                    "{note}; DIRECT OPEN: reachable without the gateway"
                ));
            }
            row.direct = Some(direct);
        }
        row
    }

    async fn through_proxy(&self, endpoint: &Endpoint, row: &mut Row) {
        let fail = |row: &mut Row, note: String| {
            row.result = RowResult::Fail;
            row.note = Some(note);
        };
        // 1. Reach the proxy (TCP, and TLS for https://).
        let started = Instant::now();
        let mut stream = match self.proxy.dial().await {
            Ok(stream) => {
                row.proxy = Stage::pass(ms(started), None);
                stream
            }
            Err(e @ ProxyError::Tls(..)) => {
                row.proxy = Stage::fail(Some(ms(started)), e.to_string());
                return fail(row, format!("TLS with the proxy failed: {e}"));
            }
            Err(e) => {
                row.proxy = Stage::fail(Some(ms(started)), e.to_string());
                return fail(row, format!("proxy unreachable: {e}"));
            }
        };
        // 2 and 3. One request: CONNECT for TLS ports, a plain-HTTP HEAD for port 80 (the
        // gateway serves revocation lists on its plain-HTTP lane, not through CONNECT).
        let plain_http = endpoint.port == 80;
        let target = format!("{}:{}", endpoint.host, endpoint.port);
        let head = if plain_http {
            let mut head = format!(
                "HEAD http://{}/ HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
                endpoint.host, endpoint.host
            );
            if let Some(value) = &self.authorization {
                head.push_str(&format!("Proxy-Authorization: {value}\r\n"));
            }
            head.push_str("\r\n");
            head.into_bytes()
        } else {
            proxy_client::connect_head(&target, self.authorization.as_deref())
        };
        let started = Instant::now();
        let reply =
            match proxy_client::exchange(&mut stream, &head, self.proxy.timeouts.reply).await {
                Ok(reply) => reply,
                // TLS 1.3: a gateway refuses the client's certificate after the client's side
                // of the handshake is done, so the refusal arrives here, but it is the proxy
                // stage's.
                Err(e) if e.alert().is_some() => {
                    row.proxy = Stage::fail(Some(ms(started)), e.to_string());
                    return fail(row, format!("the gateway refused the TLS session: {e}"));
                }
                Err(e) => {
                    row.connect = Stage::fail(Some(ms(started)), e.to_string());
                    return fail(row, format!("no answer to the request: {e}"));
                }
            };
        let elapsed = ms(started);
        row.verdict = Some(Verdict {
            status: reply.status,
            reason: reply.reason.clone(),
        });
        let reason = reply.reason.clone().unwrap_or_default();
        if reply.status == 407 {
            row.auth = Stage::fail(Some(elapsed), format!("407 {reason}"));
            return fail(row, format!("proxy authentication failed: 407 {reason}"));
        }
        row.auth = Stage::pass(elapsed, None);
        let gateway_refused = if plain_http {
            // Any answer from the origin is a pass; the gateway's own refusals carry its header.
            reply.reason.is_some()
        } else {
            !reply.is_success()
        };
        if gateway_refused {
            row.connect = Stage::fail(Some(elapsed), format!("{} {reason}", reply.status));
            return fail(row, format!("gateway refused: {} {reason}", reply.status));
        }
        row.connect = Stage::pass(elapsed, Some(reply.status.to_string()));
        if plain_http {
            row.tls = Stage::not_run(Some("plain HTTP (revocation)"));
            return;
        }
        // 4. TLS with the endpoint inside the tunnel: its name as SNI, its certificate verified.
        let Ok(name) = ServerName::try_from(endpoint.host.clone()) else {
            row.tls = Stage::fail(None, "not a valid TLS server name".into());
            return fail(row, "not a valid TLS server name".into());
        };
        let connector = TlsConnector::from(self.origin_tls.clone());
        let tunnel = Prefixed::new(stream, reply.leftover);
        let started = Instant::now();
        match proxy_client::tls_handshake(&connector, name, tunnel, self.proxy.timeouts.tls).await {
            Ok(mut tls) => {
                row.tls = Stage::pass(ms(started), None);
                let _ = tls.shutdown().await;
            }
            Err(e) => {
                row.tls = Stage::fail(Some(ms(started)), tls_reason(&e));
                fail(row, tls_reason(&e));
            }
        }
    }

    async fn direct_attempt(&self, endpoint: &Endpoint) -> Direct {
        let started = Instant::now();
        let key = (endpoint.host.clone(), endpoint.port);
        let connect_timeout = self.proxy.timeouts.connect;
        let result = match self.resolve.get(&key) {
            Some(addr) => {
                match tokio::time::timeout(connect_timeout, tokio::net::TcpStream::connect(addr))
                    .await
                {
                    Ok(Ok(tcp)) => Ok(tcp),
                    Ok(Err(e)) => Err(format!("{addr}: {e}")),
                    Err(_) => Err(format!("{addr}: connect timed out")),
                }
            }
            None => proxy_client::connect_tcp(&endpoint.host, endpoint.port, connect_timeout)
                .await
                .map_err(|e| e.to_string()),
        };
        match result {
            Ok(tcp) => Direct {
                open: true,
                ms: Some(ms(started)),
                detail: tcp
                    .peer_addr()
                    .map_or_else(|_| "connected".into(), |a| format!("connected to {a}")),
            },
            Err(why) => Direct {
                open: false,
                ms: Some(ms(started)),
                detail: why,
            },
        }
    }
}

fn tls_reason(e: &ProxyError) -> String {
    format!("TLS with the endpoint: {e}")
}

/// The tunnel with the bytes that arrived after the proxy's reply head put back in front.
struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    fn new(inner: S, prefix: Vec<u8>) -> Self {
        Self {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Prefixed<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.prefix.len() {
            let n = buf.remaining().min(this.prefix.len() - this.at);
            buf.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
