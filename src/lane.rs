//! The plain-HTTP lane: certificate revocation lists and OCSP are fetched over plain HTTP, so
//! absolute-form `GET`/`HEAD` (and OCSP `POST`) requests to hosts of a `plain_http` rule are
//! forwarded with hyper over the same vetted connection a tunnel would use. Hop-by-hop headers
//! are dropped, `Via` is added, and the response is bounded in size and time.

use crate::request::{Forward, HOP_BY_HOP, MAX_LANE_BODY};
use crate::stream::ClientStream;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response passed back (CRLs of public CAs are a few MiB at most).
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// Time for the whole upstream exchange.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);
const VIA: &str = "1.1 portcullis";

/// What the lane did, for the access line.
pub struct Exchanged {
    pub status: u16,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// A failure as (status to send, kind, reason).
pub type LaneError = (u16, &'static str, &'static str);

/// Forwards one request; the caller writes nothing more and closes.
pub async fn forward(
    client: &mut ClientStream,
    upstream: TcpStream,
    request: &Forward,
    host_header: &str,
    mut body: Vec<u8>,
    body_timeout: Duration,
) -> Result<Exchanged, LaneError> {
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
        return Err((400, "bad_request", "incomplete request body"));
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
        .map_err(|_| (400u16, "bad_request", "malformed header"))?;

    let exchange = async {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(upstream))
                .await
                .map_err(|_| (502u16, "upstream_error", "upstream HTTP exchange failed"))?;
        let driver = tokio::spawn(connection);
        let response = sender
            .send_request(upstream_request)
            .await
            .map_err(|_| (502u16, "upstream_error", "upstream HTTP exchange failed"))?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|_| {
                (
                    502u16,
                    "upstream_error",
                    "upstream response failed or larger than 16 MiB",
                )
            })?
            .to_bytes();
        driver.abort();
        Ok::<_, LaneError>((parts, body))
    };
    let (parts, response_body) = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            (
                504u16,
                "upstream_timeout",
                "upstream HTTP exchange timed out",
            )
        })??;

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
    head.push_str(&format!(
        "Via: {VIA}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response_body.len()
    ));
    let send_body = request.method != "HEAD";
    let write = async {
        client.write_all(head.as_bytes()).await?;
        if send_body {
            client.write_all(&response_body).await?;
        }
        client.flush().await
    };
    write
        .await
        .map_err(|_| (0u16, "client_error", "client went away during the response"))?;
    Ok(Exchanged {
        status: parts.status.as_u16(),
        bytes_up,
        bytes_down: if send_body {
            response_body.len() as u64
        } else {
            0
        },
    })
}
