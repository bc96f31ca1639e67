//! The client's request head: read within a byte and time budget, parsed with httparse, reduced
//! to a CONNECT target (or a lane request, or an origin-form request for the listener itself).
//! The gateway and the branch agent both read heads here; `replies` writes the answers of our
//! own.
//!
//! Why httparse on the raw socket rather than hyper's server: every malformed, oversized or slow
//! request must get its exact status (400/405/408/431) *and* a canonical log line, and hyper
//! answers (or drops) those itself before our code sees them. A CONNECT proxy needs nothing else
//! from an HTTP stack: after the head, the connection is a byte tunnel.

use crate::end::End;
use crate::policy::host::Target;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest request head accepted; a larger one gets 431.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most header lines accepted; more gets 431.
const MAX_HEADERS: usize = 64;

/// A proxy request, parsed: a CONNECT, or an absolute-form request for the plain-HTTP lane.
#[derive(Debug)]
pub struct ProxyRequest {
    pub target: Target,
    /// Bytes the client sent after the head (an eager TLS ClientHello); forwarded upstream.
    pub early_data: Vec<u8>,
    /// The `Proxy-Authorization` value, if sent (used for identity, never forwarded).
    pub proxy_authorization: Option<String>,
    /// Set for an absolute-form plain-HTTP request (the revocation lane) instead of CONNECT;
    /// `early_data` then holds the start of its body.
    pub lane: Option<Box<LaneRequest>>,
}

/// An absolute-form `GET`/`HEAD` (or OCSP `POST`) to be forwarded by the plain-HTTP lane.
#[derive(Debug)]
pub struct LaneRequest {
    pub method: &'static str,
    /// Origin-form path and query, e.g. `/pki/crl/products/x.crl`.
    pub path: String,
    /// End-to-end headers to pass on (hop-by-hop ones and `Host` already removed).
    pub headers: Vec<(String, Vec<u8>)>,
    /// Request body length (`Content-Length`), 0 for GET/HEAD.
    pub body_len: usize,
}

/// Largest OCSP request body accepted on the lane.
pub const MAX_LANE_BODY: usize = 64 * 1024;

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1), plus the proxy's own.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Why no CONNECT request came out of the head.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("no complete request head in time")]
    Timeout,
    #[error("request head larger than 8 KiB")]
    TooLarge,
    #[error("too many header lines")]
    TooManyHeaders,
    #[error("{0}")]
    Malformed(&'static str),
    #[error("method {0} not allowed: only CONNECT")]
    Method(String),
    #[error("client closed before a complete request head")]
    Closed,
    #[error("client read failed: {0}")]
    Io(#[from] std::io::Error),
}

impl HeadError {
    /// How a connection whose head failed this way ends (and so its status).
    pub fn end(&self) -> End {
        match self {
            HeadError::Timeout => End::HeadTimeout,
            HeadError::TooLarge | HeadError::TooManyHeaders => End::HeadTooLarge,
            HeadError::Malformed(_) => End::BadRequest,
            HeadError::Method(_) => End::MethodNotAllowed,
            HeadError::Closed => End::ClientClosed,
            HeadError::Io(_) => End::ClientRead,
        }
    }
}

/// A request head: a proxy request (CONNECT, or absolute-form for the lane), or an
/// origin-form request to the listener itself (the agent's `GET /status`; 405 at the gateway).
#[derive(Debug)]
pub enum Head {
    Proxy(ProxyRequest),
    Origin {
        /// Printable, at most 32 characters.
        method: String,
        path: String,
    },
}

/// Reads one request head from `io` within `timeout`: what the gateway serves (a proxy
/// request); anything else is 405.
pub async fn read_proxy_request<R: AsyncRead + Unpin>(
    io: &mut R,
    timeout: Duration,
) -> Result<ProxyRequest, HeadError> {
    match tokio::time::timeout(timeout, read_proxy_head(io)).await {
        Ok(result) => result,
        Err(_) => Err(HeadError::Timeout),
    }
}

/// [`read_proxy_request`] without a timer of its own: the caller bounds it (the gateway's
/// data path, whose one timer also ends the unfinished-head grace).
pub async fn read_proxy_head<R: AsyncRead + Unpin>(io: &mut R) -> Result<ProxyRequest, HeadError> {
    match read_head(io).await? {
        Head::Proxy(request) => Ok(request),
        Head::Origin { method, .. } => Err(HeadError::Method(method)),
    }
}

/// Reads one request head from `io` within `timeout`, whatever its form.
pub async fn read_request<R: AsyncRead + Unpin>(
    io: &mut R,
    timeout: Duration,
) -> Result<Head, HeadError> {
    match tokio::time::timeout(timeout, read_head(io)).await {
        Ok(result) => result,
        Err(_) => Err(HeadError::Timeout),
    }
}

async fn read_head<R: AsyncRead + Unpin>(io: &mut R) -> Result<Head, HeadError> {
    let mut buf = vec![0u8; MAX_HEAD_BYTES];
    let mut filled = 0;
    loop {
        let n = io.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        filled += n;
        if let Some((parsed, head_len)) = parse_head(&buf[..filled])? {
            return Ok(match parsed {
                Parsed::Proxy(target, proxy_authorization, lane) => Head::Proxy(ProxyRequest {
                    target,
                    early_data: buf[head_len..filled].to_vec(),
                    proxy_authorization,
                    lane,
                }),
                Parsed::Origin(method, path) => Head::Origin { method, path },
            });
        }
    }
}

/// A complete head, before the bytes after it are taken.
enum Parsed {
    Proxy(Target, Option<String>, Option<Box<LaneRequest>>),
    Origin(String, String),
}

/// Parses what has arrived so far: `Ok(None)` means "need more bytes". A plain function, not
/// async, so the 2 KiB header table lives on the stack and never in the connection's future.
fn parse_head(bytes: &[u8]) -> Result<Option<(Parsed, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(head_len)) => {
            let method = req.method.unwrap_or_default();
            let path = req.path.unwrap_or_default();
            let (target, lane) = if method == "CONNECT" {
                let target = Target::parse_authority(path).map_err(HeadError::Malformed)?;
                (target, None)
            } else if path.starts_with('/') {
                let origin = Parsed::Origin(printable(method), path.to_owned());
                return Ok(Some((origin, head_len)));
            } else {
                parse_lane_request(method, path, req.headers)?
            };
            let authorization = proxy_authorization(req.headers)?;
            Ok(Some((Parsed::Proxy(target, authorization, lane), head_len)))
        }
        Ok(httparse::Status::Partial) if bytes.len() == MAX_HEAD_BYTES => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooManyHeaders),
        Err(e) => Err(HeadError::Malformed(malformed_reason(e))),
    }
}

/// The request body's length. RFC 9112 section 6.3: more than one `Content-Length`, or one that
/// is not plain digits (`+0`, `5, 5`, `0x10`), is ambiguous framing that an origin or a cache
/// behind us may read differently, so it is refused, never forwarded.
fn content_length(headers: &[httparse::Header<'_>]) -> Result<usize, HeadError> {
    let mut values = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"));
    let Some(first) = values.next() else {
        return Ok(0);
    };
    if values.next().is_some() {
        return Err(HeadError::Malformed("more than one Content-Length"));
    }
    let digits = first.value.trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(HeadError::Malformed("malformed Content-Length"));
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .ok_or(HeadError::Malformed("malformed Content-Length"))
}

/// The one `Proxy-Authorization` value, if sent; two are a malformed request.
fn proxy_authorization(headers: &[httparse::Header<'_>]) -> Result<Option<String>, HeadError> {
    let mut values = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("proxy-authorization"));
    match (values.next(), values.next()) {
        (None, _) => Ok(None),
        (Some(h), None) => std::str::from_utf8(h.value)
            .map(|v| Some(v.to_owned()))
            .map_err(|_| HeadError::Malformed("malformed Proxy-Authorization")),
        (Some(_), Some(_)) => Err(HeadError::Malformed("more than one Proxy-Authorization")),
    }
}

/// An absolute-form request for the plain-HTTP lane: `GET`/`HEAD http://host[:port]/path`, or
/// `POST` of an OCSP request. Anything else that is not CONNECT is 405.
fn parse_lane_request(
    method: &str,
    uri: &str,
    headers: &[httparse::Header<'_>],
) -> Result<(Target, Option<Box<LaneRequest>>), HeadError> {
    let method = match method {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        other => return Err(HeadError::Method(printable(other))),
    };
    let Some(rest) = uri
        .get(..7)
        .filter(|s| s.eq_ignore_ascii_case("http://"))
        .map(|_| &uri[7..])
    else {
        return Err(HeadError::Method(printable(method)));
    };
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    let authority = if authority.ends_with(']') || !authority.contains(':') {
        format!("{authority}:80")
    } else {
        authority.to_owned()
    };
    let target = Target::parse_authority(&authority).map_err(HeadError::Malformed)?;
    let path = match path {
        "" => "/".to_owned(),
        p if p.starts_with('?') => format!("/{p}"),
        p => p.to_owned(),
    };
    if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(HeadError::Malformed("malformed request target"));
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let content_length = content_length(headers)?;
    if header("transfer-encoding").is_some() {
        return Err(HeadError::Malformed(
            "chunked request bodies are not forwarded",
        ));
    }
    if method == "POST" {
        let ocsp = header("content-type")
            .is_some_and(|v| v.eq_ignore_ascii_case(b"application/ocsp-request"));
        if !ocsp {
            return Err(HeadError::Method("POST".into()));
        }
        if content_length > MAX_LANE_BODY {
            return Err(HeadError::Malformed("OCSP request body larger than 64 KiB"));
        }
    } else if content_length > 0 {
        return Err(HeadError::Malformed("GET and HEAD carry no body"));
    }
    // Headers named by Connection are hop-by-hop too.
    let named_by_connection: Vec<String> = header("connection")
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(|v| {
            v.split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect()
        })
        .unwrap_or_default();
    let forwarded = headers
        .iter()
        .filter(|h| {
            let name = h.name.to_ascii_lowercase();
            name != "host"
                && !HOP_BY_HOP.contains(&name.as_str())
                && !named_by_connection.contains(&name)
        })
        .map(|h| (h.name.to_owned(), h.value.to_vec()))
        .collect();
    Ok((
        target,
        Some(Box::new(LaneRequest {
            method,
            path,
            headers: forwarded,
            body_len: content_length,
        })),
    ))
}

fn malformed_reason(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::Token => "malformed request line",
        httparse::Error::Version => "unsupported HTTP version",
        httparse::Error::HeaderName | httparse::Error::HeaderValue => "malformed header",
        httparse::Error::NewLine | httparse::Error::Status => "malformed request line",
        httparse::Error::TooManyHeaders => "too many header lines",
    }
}

/// A method name safe to put in a log line: printable ASCII, bounded.
fn printable(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn parse(bytes: &[u8]) -> Result<ProxyRequest, HeadError> {
        let mut io = bytes;
        read_proxy_request(&mut io, Duration::from_secs(1)).await
    }

    #[tokio::test]
    async fn head_table() {
        let big = format!(
            "CONNECT a.example:443 HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        let many: String = (0..70).map(|i| format!("H{i}: v\r\n")).collect();
        let many = format!("CONNECT a.example:443 HTTP/1.1\r\n{many}\r\n");
        let table: Vec<(&[u8], Option<u16>, &str)> = vec![
            (
                b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n",
                None,
                "a.example:443",
            ),
            (
                b"CONNECT [2001:db8::1]:443 HTTP/1.0\r\n\r\n",
                None,
                "[2001:db8::1]:443",
            ),
            (
                b"GET http://a.example/ HTTP/1.1\r\n\r\n",
                None,
                "a.example:80",
            ),
            (
                b"PUT http://a.example/ HTTP/1.1\r\n\r\n",
                Some(405),
                "method",
            ),
            (b"GET / HTTP/1.1\r\n\r\n", Some(405), "method"),
            (b"CONNECT a.example HTTP/1.1\r\n\r\n", Some(400), "no port"),
            (b"CONNECT a.example:0 HTTP/1.1\r\n\r\n", Some(400), "port"),
            (
                b"CONNECT a.example:70000 HTTP/1.1\r\n\r\n",
                Some(400),
                "port",
            ),
            (b"CONNECT bad_host:443 HTTP/1.1\r\n\r\n", Some(400), "host"),
            (
                b"CONNECT a.example:443 HTTP/2.0\r\n\r\n",
                Some(400),
                "version",
            ),
            (b"\x16\x03\x01\x00\x05hello\r\n\r\n", Some(400), "malformed"),
            (
                b"CONNECT  a.example:443 HTTP/1.1\r\n\r\n",
                Some(400),
                "malformed",
            ),
            (big.as_bytes(), Some(431), "8 KiB"),
            (many.as_bytes(), Some(431), "header"),
            (b"CONNECT a.example:443 HTTP/1.1\r\n", None, "closed"),
        ];
        for (input, status, text) in table {
            let shown = String::from_utf8_lossy(&input[..input.len().min(40)]).into_owned();
            match parse(input).await {
                Ok(req) => {
                    assert_eq!(status, None, "{shown}");
                    assert_eq!(req.target.to_string(), text, "{shown}");
                }
                Err(e) => {
                    assert_eq!(e.end().status(), status, "{shown}: {e}");
                    assert!(
                        e.to_string().contains(text) || e.end().as_str().contains(text),
                        "{shown}: {e}"
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn bytes_after_the_head_are_kept() {
        let req = parse(b"CONNECT a.example:443 HTTP/1.1\r\n\r\n\x16\x03\x01early")
            .await
            .unwrap();
        assert_eq!(req.early_data, b"\x16\x03\x01early");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_head_times_out() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client
            .write_all(b"CONNECT a.example:443 HTTP/1.1\r\n")
            .await
            .unwrap();
        let err = read_proxy_request(&mut server, Duration::from_secs(10))
            .await
            .unwrap_err();
        assert_eq!(err.end().status(), Some(408));
        drop(client);
    }
}
