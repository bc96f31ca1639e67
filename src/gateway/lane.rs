//! The plain-HTTP lane: certificate revocation lists and OCSP are fetched over plain HTTP, so
//! absolute-form `GET`/`HEAD` (and OCSP `POST`) requests to hosts of a `plain_http` rule are
//! forwarded with hyper over the same vetted connection a tunnel would use. Hop-by-hop headers
//! are dropped and `Via` is added. Answers stream to the client through hyper's bounded
//! buffers (a slow reader slows the upstream down instead of filling our memory), every write
//! and read must make progress within the idle timeout, and the whole answer must be sent
//! within a deadline. The shared cache ([`super::lane_cache`]) keeps what it may.

use super::lane_cache::{Collecting, Hit, LaneCache, MAX_ENTRY_BYTES};
use super::refusal::{End, Refusal};
use super::request::{HOP_BY_HOP, LaneRequest, MAX_LANE_BODY};
use crate::stream::Upstream;
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest answer passed on (CRLs of public CAs are a few MiB at most).
pub const MAX_RESPONSE_BYTES: u64 = 16 * 1024 * 1024;
/// Time for the upstream to answer with its response head.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time for a whole answer to reach the client (12 MiB at 1 Mbit/s is 100 s).
pub const ANSWER_DEADLINE: Duration = Duration::from_secs(300);
const VIA: &str = "1.1 portcullis";

/// The request as the cache rules see it: method, absolute URL, end-to-end headers.
pub fn cache_request(request: &LaneRequest, host_header: &str) -> http::Request<()> {
    let mut builder = http::Request::builder()
        .method(request.method)
        .uri(format!("http://{host_header}{}", request.path));
    for (name, value) in &request.headers {
        builder = builder.header(name.as_str(), value.as_slice());
    }
    builder.body(()).unwrap_or_else(|_| http::Request::new(()))
}

/// An upstream answer whose head has arrived; its body streams on.
pub struct Answer {
    pub status: u16,
    parts: http::response::Parts,
    body: hyper::body::Incoming,
    /// The body's length when the upstream said it.
    length: Option<u64>,
    /// Request body bytes sent upstream.
    pub bytes_up: u64,
    /// Drives the upstream connection until the answer is through.
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Answer {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Reads the rest of the request body from `client` and sends the request upstream; returns
/// once the upstream's response head is in.
pub async fn fetch<C: AsyncRead + Unpin>(
    client: &mut C,
    upstream: Upstream,
    request: &LaneRequest,
    host_header: &str,
    mut body: Vec<u8>,
    body_timeout: Duration,
) -> Result<Answer, Refusal> {
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
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        let response = sender.send_request(upstream_request).await;
        let response = match response {
            Ok(response) => response,
            Err(_) => {
                driver.abort();
                return Err(failed());
            }
        };
        Ok::<_, Refusal>((response, driver))
    };
    let (response, driver) = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
        .await
        .map_err(|_| Refusal::new(End::UpstreamTimeout, "upstream HTTP exchange timed out"))??;
    let (parts, body) = response.into_parts();
    let length = hyper::body::Body::size_hint(&body).exact();
    let answer = Answer {
        status: parts.status.as_u16(),
        parts,
        body,
        length,
        bytes_up,
        driver,
    };
    if answer.length.is_some_and(|l| l > MAX_RESPONSE_BYTES) {
        return Err(too_large());
    }
    Ok(answer)
}

fn failed() -> Refusal {
    Refusal::new(End::UpstreamError, "upstream HTTP exchange failed")
}

fn too_large() -> Refusal {
    Refusal::new(
        End::UpstreamError,
        "upstream response failed or larger than 16 MiB",
    )
}

/// How sending an answer went: bytes of body sent, and how it ended when it did not end well.
pub struct Sent {
    pub bytes: u64,
    pub failure: Option<(End, &'static str)>,
}

/// The status line and end-to-end headers, with `Via` and `Connection: close`; the length
/// when it is known (otherwise the body ends when the connection does).
fn head_of(parts: &http::response::Parts, length: Option<u64>) -> String {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_u16(),
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
    head.push_str(&format!("Via: {VIA}\r\n"));
    if let Some(length) = length {
        head.push_str(&format!("Content-Length: {length}\r\n"));
    }
    head.push_str("Connection: close\r\n\r\n");
    head
}

/// Writes `bytes`, failing when the client takes none of them for `idle`.
async fn write_within<C: AsyncWrite + Unpin>(
    client: &mut C,
    bytes: &[u8],
    idle: Duration,
) -> Result<(), (End, &'static str)> {
    let mut rest = bytes;
    while !rest.is_empty() {
        match tokio::time::timeout(idle, client.write(rest)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Err((End::ClientError, "client went away during the response"));
            }
            Ok(Ok(n)) => rest = &rest[n..],
            Err(_) => return Err((End::IdleTimeout, "client stopped reading the response")),
        }
    }
    Ok(())
}

/// Runs the sending of one answer within `ANSWER_DEADLINE`; how it failed, if it did.
async fn within_deadline(
    sending: impl Future<Output = Result<(), (End, &'static str)>>,
) -> Option<(End, &'static str)> {
    match tokio::time::timeout(ANSWER_DEADLINE, sending).await {
        Ok(Ok(())) => None,
        Ok(Err(failure)) => Some(failure),
        Err(_) => Some((End::ClientError, "response not sent within 5 minutes")),
    }
}

/// Streams an upstream answer to `client` (the body left out for HEAD), storing it in `cache`
/// under `key` when the rules and the cache's bounds allow.
pub async fn send<C: AsyncWrite + Unpin>(
    client: &mut C,
    mut answer: Answer,
    with_body: bool,
    idle: Duration,
    store: Option<(&LaneCache, &str, &http::Request<()>)>,
) -> Sent {
    let mut sent = Sent {
        bytes: 0,
        failure: None,
    };
    let length = if with_body {
        answer.length
    } else {
        // HEAD: the upstream's own Content-Length describes what a GET would get.
        answer
            .parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    };
    let head = head_of(&answer.parts, length);
    let mut collecting: Option<(Collecting<'_>, _, BytesMut)> =
        store.and_then(|(cache, key, req)| {
            let (collecting, policy) = cache.start_collecting(
                key,
                req,
                &answer.parts,
                answer.length.filter(|_| with_body),
            )?;
            let capacity = answer.length.unwrap_or(0).min(MAX_ENTRY_BYTES as u64) as usize;
            Some((collecting, policy, BytesMut::with_capacity(capacity)))
        });
    let streaming = async {
        write_within(client, head.as_bytes(), idle).await?;
        if with_body {
            while let Some(frame) = tokio::time::timeout(idle, answer.body.frame())
                .await
                .map_err(|_| {
                    (
                        End::UpstreamTimeout,
                        "upstream stopped sending the response",
                    )
                })?
            {
                let frame = frame.map_err(|_| (End::UpstreamError, "upstream response failed"))?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if sent.bytes + data.len() as u64 > MAX_RESPONSE_BYTES {
                    return Err((End::UpstreamError, "upstream response larger than 16 MiB"));
                }
                if let Some((_, _, buffer)) = &mut collecting {
                    buffer.extend_from_slice(&data);
                }
                write_within(client, &data, idle).await?;
                sent.bytes += data.len() as u64;
            }
        }
        client
            .flush()
            .await
            .map_err(|_| (End::ClientError, "client went away during the response"))
    };
    sent.failure = within_deadline(streaming).await;
    if sent.failure.is_none()
        && let Some((collecting, policy, buffer)) = collecting
    {
        collecting.store(policy, buffer.freeze());
    }
    sent
}

/// Sends a stored answer (shared, never copied) within the same bounds.
pub async fn send_stored<C: AsyncWrite + Unpin>(client: &mut C, hit: Hit, idle: Duration) -> Sent {
    let head = head_of(&hit.parts, Some(hit.body.len() as u64));
    let sending = async {
        write_within(client, head.as_bytes(), idle).await?;
        for chunk in hit.body.chunks(64 * 1024) {
            write_within(client, chunk, idle).await?;
        }
        client
            .flush()
            .await
            .map_err(|_| (End::ClientError, "client went away during the response"))
    };
    let failure = within_deadline(sending).await;
    Sent {
        bytes: if failure.is_none() {
            hit.body.len() as u64
        } else {
            0
        },
        failure,
    }
}
