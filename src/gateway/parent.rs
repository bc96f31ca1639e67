//! Through a parent proxy: after the plan allowed the request, the gateway connects to the
//! egress's parents in order (their addresses raced like any dial, from the egress's source
//! address), sends its own `CONNECT` (with its own `Proxy-Authorization`, never the client's)
//! and answers the client only once a parent said 200. Bytes the parent sent after its 200 head
//! go to the client after ours.
//!
//! With `tls`, the gateway does a TLS handshake with the parent (trusting only its `tls.ca`)
//! before its CONNECT, and the tunnel's bytes travel inside that TLS.
//!
//! Failover cannot fail open: the next parent is tried only when one failed as a proxy before
//! any tunnel byte (connect error or timeout, TLS failure, closed or malformed answer, no
//! answer within `timeouts.connect`). A parent's own answer other than 2xx is its decision,
//! passed back as `parent_refused` and never tried elsewhere. A parent that failed
//! [`FAILURES_BEFORE_BACKOFF`] times in a row is skipped for a backoff (passive health). When
//! every parent failed, `fallback = "direct"` dials directly; otherwise `parent_unavailable`.
//! A private endpoint (an address in the rule's `private_addresses`) never goes to a parent.

use super::Snapshot;
use super::plan::Plan;
use super::refusal::{End, Refusal};
use crate::access_log::{AccessRecord, WayOut};
use crate::config::{ConnectTarget, Egress, Parent, ParentTls};
use crate::metrics::{ParentLabels, ParentOutcomeLabels, WayOutMetrics};
use crate::policy::host::{DnsName, Target};
use crate::stream::Upstream;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Failures in a row after which a parent is skipped for a while.
pub const FAILURES_BEFORE_BACKOFF: u32 = 3;
/// The first backoff; it doubles with each further failure, up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(5);
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The longest answer head a parent may send.
const MAX_ANSWER_HEAD: usize = 8 * 1024;

/// The upstream through a parent, with what the parent sent after its 200 head.
struct Tunnel {
    stream: Upstream,
    early: Option<Box<[u8]>>,
}

/// The egress whose parents carry this request: it has `via`, and the target is not a private
/// endpoint (an address the rule lets through as one of its `private_addresses`).
pub fn parents_for<'g>(plan: &Plan<'g>) -> Option<&'g Egress> {
    let (egress, _) = plan.egress?;
    if egress.via.is_empty() {
        return None;
    }
    // (Its other addresses are refused in the plan: only the private ones are dialled.)
    let private = plan
        .decision
        .rule
        .is_some_and(|rule| plan.dialable().any(|ip| rule.is_private_endpoint(ip)));
    (!private).then_some(egress)
}

/// The configured parents' and egresses' series, at zero (and each parent up unless in its
/// backoff), so alerts and `increase()` see the first event; nothing without them.
pub fn series_from_the_start(config: &crate::config::Config, metrics: &WayOutMetrics) {
    let egresses = &config.egresses;
    for parent in &egresses.parents {
        let up = !health(&parent.name).skipped();
        metrics
            .parent_up
            .get_or_create(&ParentLabels {
                parent: parent.name.clone(),
            })
            .set(i64::from(up));
        for outcome in ["tunnel", "refused", "failed", "skipped"] {
            drop(metrics.parent_requests.get_or_create(&ParentOutcomeLabels {
                parent: parent.name.clone(),
                outcome,
            }));
        }
    }
    for egress in &egresses.list {
        for path in ["direct", "parent", "fallback", "failed"] {
            drop(
                metrics
                    .egress_requests
                    .get_or_create(&crate::metrics::EgressLabels {
                        egress: egress.name.clone(),
                        path,
                    }),
            );
        }
    }
}

/// A parent's run of failures and when it may be tried again; process-wide by name, so a
/// reload keeps what was learned.
#[derive(Default)]
struct Health {
    failures: AtomicU32,
    /// Milliseconds since [`EPOCH`] before which the parent is skipped.
    down_until: AtomicU64,
}

static EPOCH: LazyLock<std::time::Instant> = LazyLock::new(std::time::Instant::now);
static HEALTH: LazyLock<Mutex<HashMap<String, Arc<Health>>>> = LazyLock::new(Default::default);

fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64
}

fn health(name: &str) -> Arc<Health> {
    let mut all = HEALTH.lock().unwrap_or_else(|e| e.into_inner());
    all.entry(name.to_owned()).or_default().clone()
}

impl Health {
    fn skipped(&self) -> bool {
        now_ms() < self.down_until.load(Ordering::Relaxed)
    }

    /// A usable answer (a tunnel or a refusal): the run of failures ends.
    fn answered(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.down_until.store(0, Ordering::Relaxed);
    }

    /// One more failure; true when it starts (or extends) a backoff.
    fn failed(&self) -> bool {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < FAILURES_BEFORE_BACKOFF {
            return false;
        }
        let doublings = (failures - FAILURES_BEFORE_BACKOFF).min(8);
        let backoff = (FIRST_BACKOFF * 2u32.pow(doublings)).min(MAX_BACKOFF);
        self.down_until
            .store(now_ms() + backoff.as_millis() as u64, Ordering::Relaxed);
        true
    }
}

/// How one parent ended.
enum Failure {
    /// It failed as a proxy: the next one may be tried.
    Down(String),
    /// Nothing to fail over for (its answer, or our own egress's address gone).
    Final(Refusal),
}

/// Opens the tunnel to `target` through `egress`'s parents, in order; `Ok(None)` when every
/// parent failed and the egress falls back to the direct dial.
pub async fn open(
    snapshot: &Snapshot,
    plan: &Plan<'_>,
    port: u16,
    record: &mut AccessRecord,
) -> Result<Option<Upstream>, Refusal> {
    let Some(egress) = parents_for(plan) else {
        return Ok(None);
    };
    // The target as the record holds it (normalised; kept out of the connection's future).
    let host = record.host.as_deref().unwrap_or_default();
    let Ok(target) = Target::parse_authority(&match host.contains(':') {
        true => format!("[{host}]:{port}"),
        false => format!("{host}:{port}"),
    }) else {
        return Err(Refusal::new(End::BadRequest, "request target has no host"));
    };
    let target = &target;
    let started = Instant::now();
    let opened = through_parents(snapshot, plan, egress, target, record).await;
    record.connect_time = Some(started.elapsed());
    opened
}

async fn through_parents(
    snapshot: &Snapshot,
    plan: &Plan<'_>,
    egress: &Egress,
    target: &Target,
    record: &mut AccessRecord,
) -> Result<Option<Upstream>, Refusal> {
    let metrics = &snapshot.metrics.way_out;
    let path = |path| {
        metrics
            .egress_requests
            .get_or_create(&crate::metrics::EgressLabels {
                egress: egress.name.clone(),
                path,
            })
            .inc()
    };
    let mut failures = Vec::new();
    for &at in &egress.via {
        let Some(parent) = snapshot.config.egresses.parents.get(at) else {
            continue;
        };
        let outcome = |outcome| ParentOutcomeLabels {
            parent: parent.name.clone(),
            outcome,
        };
        let up = metrics
            .parent_up
            .get_or_create(&ParentLabels {
                parent: parent.name.clone(),
            })
            .clone();
        let health = health(&parent.name);
        if !health.skipped() {
            up.set(1);
        }
        if health.skipped() {
            metrics
                .parent_requests
                .get_or_create(&outcome("skipped"))
                .inc();
            failures.push(format!("{}: down, in its backoff", parent.name));
            continue;
        }
        let request = connect_request(parent, plan, target);
        let started = Instant::now();
        let answer = through(snapshot, parent, egress, &request, record).await;
        metrics
            .parent_connect
            .get_or_create(&ParentLabels {
                parent: parent.name.clone(),
            })
            .observe(started.elapsed().as_secs_f64());
        match answer {
            Ok(tunnel) => {
                note(record, egress, parent, Some(&tunnel.stream));
                if let Some(way_out) = record.way_out.as_mut() {
                    way_out.early = tunnel.early;
                }
                health.answered();
                up.set(1);
                metrics
                    .parent_requests
                    .get_or_create(&outcome("tunnel"))
                    .inc();
                path("parent");
                return Ok(Some(tunnel.stream));
            }
            Err(Failure::Final(refusal)) => {
                note(record, egress, parent, None);
                if refusal.end == End::ParentRefused {
                    health.answered();
                    up.set(1);
                    metrics
                        .parent_requests
                        .get_or_create(&outcome("refused"))
                        .inc();
                }
                path("failed");
                return Err(refusal);
            }
            Err(Failure::Down(why)) => {
                note(record, egress, parent, None);
                if health.failed() {
                    up.set(0);
                }
                metrics
                    .parent_requests
                    .get_or_create(&outcome("failed"))
                    .inc();
                tracing::warn!(parent = %parent.name, reason = %why, "parent proxy failed");
                failures.push(format!("{}: {why}", parent.name));
            }
        }
    }
    if egress.fallback_direct {
        // Counted again as `direct` (or `failed`) by the direct dial.
        path("fallback");
        return Ok(None);
    }
    path("failed");
    Err(Refusal::new(
        End::ParentUnavailable,
        format!("no parent proxy reachable ({})", failures.join("; ")),
    ))
}

/// Sends the bytes a parent sent after its 200 head (kept in the record's way out) on to the
/// client, after our 200.
pub async fn send_down<W: tokio::io::AsyncWrite + Unpin>(
    client: &mut W,
    record: &mut AccessRecord,
) -> Result<(), Refusal> {
    let Some(bytes) = record.way_out.as_mut().and_then(|w| w.early.take()) else {
        return Ok(());
    };
    client
        .write_all(&bytes)
        .await
        .map_err(|_| Refusal::after_reply(End::ClientError, "client write failed"))?;
    record.bytes_down += bytes.len() as u64;
    Ok(())
}

/// The access line's way out through `parent`.
fn note(record: &mut AccessRecord, egress: &Egress, parent: &Parent, stream: Option<&Upstream>) {
    record.way_out = Some(Box::new(WayOut {
        egress: egress.name.clone(),
        parent: Some(parent.name.clone()),
        local_address: stream.and_then(|s| s.tcp().local_addr().ok()),
        early: None,
    }));
}

/// Our CONNECT to `parent`: by name, or by the first vetted address in dial order; our own
/// credentials, never the client's.
fn connect_request(parent: &Parent, plan: &Plan<'_>, target: &Target) -> String {
    let host = match parent.connect_target {
        ConnectTarget::Address => super::dial::interleave(plan.dialable())
            .first()
            .map(|ip| Target {
                host: crate::policy::host::Host::Ip(*ip),
                port: target.port,
            })
            .unwrap_or_else(|| target.clone())
            .to_string(),
        ConnectTarget::Name => target.to_string(),
    };
    let auth = parent
        .authorization
        .as_deref()
        .map(|a| format!("Proxy-Authorization: {a}\r\n"))
        .unwrap_or_default();
    format!("CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n{auth}\r\n")
}

/// One parent: connect (its addresses raced, from the egress's source address), the TLS
/// handshake when it has `tls`, send the CONNECT, read its answer head, all within
/// `timeouts.connect`.
async fn through(
    snapshot: &Snapshot,
    parent: &Parent,
    egress: &Egress,
    request: &str,
    record: &mut AccessRecord,
) -> Result<Tunnel, Failure> {
    let timeouts = snapshot.config.timeouts;
    let deadline = Instant::now() + timeouts.connect;
    let addrs = addresses(snapshot, parent, egress).await?;
    let mut tried: Option<SocketAddr> = None;
    let dialled = super::dial::dial(
        addrs.into_iter(),
        parent.port,
        timeouts.connect,
        timeouts.attempt_delay,
        Some(egress),
        &mut tried,
    )
    .await;
    let tcp = match dialled {
        Ok(stream) => stream,
        Err(refusal) if refusal.end == End::EgressUnavailable => {
            return Err(Failure::Final(refusal));
        }
        Err(refusal) => return Err(Failure::Down(refusal.reason.into_owned())),
    };
    record.resolved = tried;
    let mut stream = match &parent.tls {
        None => Upstream::Plain(tcp),
        Some(tls) => Upstream::Tls(Box::new(handshake(tls, tcp, deadline).await?)),
    };
    let exchange = async {
        stream.write_all(request.as_bytes()).await?;
        stream.flush().await?;
        read_answer(&mut stream).await
    };
    let answer = match tokio::time::timeout_at(deadline, exchange).await {
        Err(_) => return Err(Failure::Down("no answer to CONNECT in time".into())),
        Ok(Err(e)) => return Err(Failure::Down(format!("answer failed: {e}"))),
        Ok(Ok(answer)) => answer,
    };
    match answer {
        Answer::Malformed(why) => Err(Failure::Down(why.into())),
        Answer::Status(status, early) if (200..300).contains(&status) => Ok(Tunnel {
            stream,
            early: (!early.is_empty()).then(|| early.into_boxed_slice()),
        }),
        Answer::Status(status, _) => {
            // Its decision, passed back with its status (only error statuses: a 1xx or 3xx
            // answer to CONNECT is a broken proxy, 502). A 407 refuses the gateway's own
            // credentials, which the branch client cannot fix: 502, so the client is not
            // asked for credentials of its own (the reason keeps the 407).
            let shown = match status {
                407 => 502,
                400..600 => status,
                _ => 502,
            };
            Err(Failure::Final(Refusal {
                end: End::ParentRefused,
                status: Some(shown),
                reason: format!("parent {} refused: {status}", parent.name).into(),
            }))
        }
    }
}

/// The TLS handshake with a parent, by `deadline`; a failure says what went wrong in words an
/// operator can act on.
async fn handshake(
    tls: &ParentTls,
    tcp: TcpStream,
    deadline: Instant,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, Failure> {
    let connect = tls.connector.connect(tls.server_name.clone(), tcp);
    match tokio::time::timeout_at(deadline, connect).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(Failure::Down(format!(
            "TLS: {}",
            tls_failure(&e, &tls.server_name)
        ))),
        Err(_) => Err(Failure::Down(
            "TLS: no handshake within timeouts.connect".into(),
        )),
    }
}

/// Why a handshake with a parent failed.
fn tls_failure(e: &std::io::Error, server_name: &rustls::pki_types::ServerName<'_>) -> String {
    use rustls::CertificateError as C;
    let name = server_name.to_str();
    let Some(tls) = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                "the parent closed the connection during the handshake".into()
            }
            _ => format!("handshake failed: {e}"),
        };
    };
    match tls {
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => {
            "certificate not signed by parent tls.ca (unknown issuer)".into()
        }
        // A CA of the same name as one in tls.ca, but another key.
        rustls::Error::InvalidCertificate(C::BadSignature) => {
            "certificate not signed by parent tls.ca (bad signature)".into()
        }
        rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        ) => {
            format!("certificate not valid for {name} (tls.server_name)")
        }
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "certificate expired".into()
        }
        rustls::Error::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            "certificate not valid yet".into()
        }
        other => format!("handshake failed: {other}"),
    }
}

/// The parent's addresses: its IP, or its name resolved (overrides first) in the egress's
/// families.
async fn addresses(
    snapshot: &Snapshot,
    parent: &Parent,
    egress: &Egress,
) -> Result<Vec<IpAddr>, Failure> {
    let mut addrs = match parent.host.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => {
            let name = DnsName::parse(&parent.host)
                .map_err(|why| Failure::Down(format!("bad parent name: {why}")))?;
            match snapshot.resolver.resolve(&name, Some(egress)).await {
                Ok((addrs, _)) => addrs,
                Err(e) => return Err(Failure::Down(format!("cannot resolve the parent: {e}"))),
            }
        }
    };
    // A mapped address is IPv4 on the wire (see the plan's addresses).
    addrs = addrs.into_iter().map(|ip| ip.to_canonical()).collect();
    addrs.retain(|ip| egress.allows(*ip));
    if addrs.is_empty() {
        return Err(Failure::Down(format!(
            "no parent address the egress may dial ({})",
            egress.families()
        )));
    }
    Ok(addrs)
}

/// A parent's answer to CONNECT.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// Its status, and the bytes that followed the head.
    Status(u16, Vec<u8>),
    Malformed(&'static str),
}

/// Reads one answer head (at most 8 KiB); the bytes after it are kept.
async fn read_answer<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<Answer> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Answer::Malformed("closed before an answer"));
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse_answer(&buf) {
            Some(answer) => return Ok(answer),
            None if buf.len() >= MAX_ANSWER_HEAD => {
                return Ok(Answer::Malformed("answer head larger than 8 KiB"));
            }
            None => {}
        }
    }
}

/// The answer in `buf`, or `None` while the head is incomplete.
fn parse_answer(buf: &[u8]) -> Option<Answer> {
    match parse_with(buf, &mut [httparse::EMPTY_HEADER; 64]) {
        // A head of many short header lines is still an answer (a refusal is not a broken
        // proxy): parsed again with room for as many as 8 KiB can hold.
        Err(httparse::Error::TooManyHeaders) => {
            parse_with(buf, &mut vec![httparse::EMPTY_HEADER; MAX_ANSWER_HEAD / 4])
                .unwrap_or(Some(Answer::Malformed("malformed answer")))
        }
        Ok(answer) => answer,
        Err(_) => Some(Answer::Malformed("malformed answer")),
    }
}

fn parse_with<'b>(
    buf: &'b [u8],
    headers: &mut [httparse::Header<'b>],
) -> Result<Option<Answer>, httparse::Error> {
    let mut response = httparse::Response::new(headers);
    Ok(match response.parse(buf)? {
        httparse::Status::Complete(len) => Some(match response.code {
            Some(code) => Answer::Status(code, buf[len..].to_vec()),
            None => Answer::Malformed("malformed answer"),
        }),
        httparse::Status::Partial => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_parsed_with_what_follows_and_garbage_is_malformed() {
        assert_eq!(
            parse_answer(b"HTTP/1.1 200 Connection established\r\n\r\nhello"),
            Some(Answer::Status(200, b"hello".to_vec()))
        );
        assert_eq!(
            parse_answer(b"HTTP/1.1 407 Proxy Authentication Required\r\nX: y\r\n\r\n"),
            Some(Answer::Status(407, Vec::new()))
        );
        assert_eq!(parse_answer(b"HTTP/1.1 200 OK\r\n"), None);
        let many = format!("HTTP/1.1 403 Forbidden\r\n{}\r\n", "X: y\r\n".repeat(100));
        assert_eq!(
            parse_answer(many.as_bytes()),
            Some(Answer::Status(403, Vec::new()))
        );
        assert_eq!(
            parse_answer(b"SSH-2.0-OpenSSH\r\n\r\n"),
            Some(Answer::Malformed("malformed answer"))
        );
    }

    #[test]
    fn a_parent_is_skipped_after_failures_in_a_row_and_an_answer_clears_them() {
        let h = Health::default();
        for _ in 1..FAILURES_BEFORE_BACKOFF {
            assert!(!h.failed());
            assert!(!h.skipped());
        }
        assert!(h.failed());
        assert!(h.skipped());
        h.answered();
        assert!(!h.skipped());
        assert_eq!(h.failures.load(Ordering::Relaxed), 0);
    }
}
