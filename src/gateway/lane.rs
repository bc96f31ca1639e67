//! The plain-HTTP lane: certificate revocation lists and OCSP are fetched over plain HTTP, so
//! absolute-form `GET`/`HEAD` (and OCSP `POST`) requests to hosts of a `plain_http` rule are
//! forwarded with hyper over the same vetted connection a tunnel would use. Hop-by-hop headers
//! are dropped, `Via` is added, and the response is bounded in size and time.

use super::refusal::{End, Refusal};
use super::request::{Forward, HOP_BY_HOP, MAX_LANE_BODY};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Largest response passed back (CRLs of public CAs are a few MiB at most).
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// Time for the whole upstream exchange.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);
const VIA: &str = "1.1 portcullis";

/// An upstream answer, ready to send to any number of clients.
pub struct Fetched {
    pub status: u16,
    /// Status line and end-to-end headers, with `Via`, `Content-Length` and `Connection: close`.
    pub head: String,
    pub body: Bytes,
    /// How long a shared cache may serve it (Cache-Control / Expires), if at all.
    pub fresh_for: Option<Duration>,
    /// Request body bytes sent upstream.
    pub bytes_up: u64,
}

/// Reads the rest of the request body from `client` and performs the exchange upstream.
pub async fn fetch<C: tokio::io::AsyncRead + Unpin>(
    client: &mut C,
    upstream: TcpStream,
    request: &Forward,
    host_header: &str,
    mut body: Vec<u8>,
    body_timeout: Duration,
) -> Result<Fetched, Refusal> {
    // The rest of an OCSP request body (at most 64 KiB, within the head timeout).
    let want = request.body_len.min(MAX_LANE_BODY);
    body.truncate(want);
    let read_rest = async {
        while body.len() < want {
            let start = body.len();
            body.resize(want, 0);
            match client.read(&mut body[start..]).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => body.truncate(start + n),
            }
        }
        true
    };
    if !matches!(
        tokio::time::timeout(body_timeout, read_rest).await,
        Ok(true)
    ) {
        return Err(Refusal::new(End::BadRequest, "incomplete request body"));
    }
    let bytes_up = body.len() as u64;

    let mut builder = hyper::Request::builder()
        .method(request.method)
        .uri(request.path.as_str())
        .header(hyper::header::HOST, host_header)
        .header(hyper::header::VIA, VIA);
    for (name, value) in &request.headers {
        builder = builder.header(name.as_str(), value.as_slice());
    }
    let upstream_request = builder
        .body(Full::new(Bytes::from(body)))
        .map_err(|_| Refusal::new(End::BadRequest, "malformed header"))?;

    let exchange = async {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(upstream))
                .await
                .map_err(|_| failed())?;
        let driver = tokio::spawn(connection);
        let response = sender
            .send_request(upstream_request)
            .await
            .map_err(|_| failed())?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|_| {
                Refusal::new(
                    End::UpstreamError,
                    "upstream response failed or larger than 16 MiB",
                )
            })?
            .to_bytes();
        driver.abort();
        Ok::<_, Refusal>((parts, body))
    };
    let (parts, body) = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
        .await
        .map_err(|_| Refusal::new(End::UpstreamTimeout, "upstream HTTP exchange timed out"))??;

    let status = parts.status.as_u16();
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\n",
        parts.status.canonical_reason().unwrap_or("")
    );
    for (name, value) in &parts.headers {
        let lower = name.as_str();
        if HOP_BY_HOP.contains(&lower) || lower == "content-length" {
            continue;
        }
        if let Ok(value) = value.to_str() {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    head.push_str(&format!(
        "Via: {VIA}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    let fresh_for = if status == 200 && request.method == "GET" {
        freshness(&parts.headers)
    } else {
        None
    };
    Ok(Fetched {
        status,
        head,
        body,
        fresh_for,
        bytes_up,
    })
}

fn failed() -> Refusal {
    Refusal::new(End::UpstreamError, "upstream HTTP exchange failed")
}

/// Sends a fetched (or cached) answer; the body is left out for HEAD.
pub async fn respond<C: tokio::io::AsyncWrite + Unpin>(
    client: &mut C,
    answer: &Fetched,
    with_body: bool,
) -> std::io::Result<u64> {
    client.write_all(answer.head.as_bytes()).await?;
    if with_body {
        client.write_all(&answer.body).await?;
    }
    client.flush().await?;
    Ok(if with_body {
        answer.body.len() as u64
    } else {
        0
    })
}

/// How long a shared cache may keep a response: `s-maxage`/`max-age`, else `Expires`; nothing
/// for `no-store`, `no-cache`, `private`.
fn freshness(headers: &hyper::HeaderMap) -> Option<Duration> {
    let cache_control = headers
        .get_all(hyper::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.trim().to_ascii_lowercase())
        .collect::<Vec<_>>();
    if cache_control
        .iter()
        .any(|d| d == "no-store" || d == "no-cache" || d == "private")
    {
        return None;
    }
    let max_age = |name: &str| {
        cache_control.iter().find_map(|d| {
            d.strip_prefix(name)
                .and_then(|v| v.strip_prefix('='))
                .and_then(|v| v.parse::<u64>().ok())
        })
    };
    if let Some(seconds) = max_age("s-maxage").or_else(|| max_age("max-age")) {
        return (seconds > 0).then(|| Duration::from_secs(seconds));
    }
    let expires = headers.get(hyper::header::EXPIRES)?.to_str().ok()?;
    let expires = httpdate::parse_http_date(expires).ok()?;
    expires.duration_since(std::time::SystemTime::now()).ok()
}

/// A small shared cache of fresh CRL answers, so a branch's many servers fetch a list once.
/// Bounded in entries and bytes; stale entries are dropped when space is needed.
#[derive(Default)]
pub struct CrlCache {
    entries: Mutex<HashMap<String, (Instant, Arc<Fetched>)>>,
}

const CACHE_ENTRIES: usize = 256;
const CACHE_BYTES: usize = 64 * 1024 * 1024;

impl CrlCache {
    pub fn get(&self, key: &str) -> Option<Arc<Fetched>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(key)
            .filter(|(until, _)| Instant::now() < *until)
            .map(|(_, f)| f.clone())
    }

    pub fn put(&self, key: String, answer: Arc<Fetched>) {
        let Some(fresh_for) = answer.fresh_for else {
            return;
        };
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        entries.retain(|_, (until, _)| now < *until);
        let bytes: usize = entries.values().map(|(_, f)| f.body.len()).sum();
        if entries.len() < CACHE_ENTRIES && bytes + answer.body.len() <= CACHE_BYTES {
            entries.insert(key, (now + fresh_for, answer));
        }
    }
}
