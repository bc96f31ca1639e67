//! The HTTP server under both binaries' admin listeners: hyper on each connection, bounded in
//! connections and time, and `/metrics` in the format the scraper asks for. Each binary gives
//! its own routes (the gateway's admin module, the agent's metrics).

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Admin connections served at once; more wait in the listen backlog (a scraper or an operator
/// needs a few, a runaway script must not take the process's descriptors).
const MAX_CONNECTIONS: usize = 64;
/// Longest one admin connection is kept, whatever it does: longer than `POST /upgrade` may
/// wait for the new process (60 s), so its answer is not cut off.
const CONNECTION_TIME: Duration = Duration::from_secs(90);

/// One admin request, as the routes see it.
pub struct Ask<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// The query string (after `?`), if any.
    pub query: Option<&'a str>,
    /// The client is on loopback (without admin tokens, changes are taken only from there).
    pub from_loopback: bool,
    /// The client's address (for the audit lines).
    pub peer: std::net::SocketAddr,
    /// The `Authorization` header, if any (never logged).
    pub authorization: Option<&'a str>,
    /// The `Accept` header asks for OpenMetrics text (Prometheus does).
    pub open_metrics: bool,
}

/// An admin answer: status, content type and body (hyper leaves the body out for `HEAD`).
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    /// One more header (`WWW-Authenticate` on a 401).
    pub header: Option<(&'static str, &'static str)>,
}

impl Ask<'_> {
    /// The query parameter `name`, percent-decoded (`+` is a space).
    pub fn param(&self, name: &str) -> Option<String> {
        self.query?.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key == name).then(|| percent_decode(value))
        })
    }
}

pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 3)
            .filter(|_| bytes[i] == b'%')
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `text` with everything but unreserved characters percent-encoded (a query value).
pub fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Answer {
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain",
            body: body.into(),
            header: None,
        }
    }

    /// `value` as pretty JSON.
    pub fn json(status: u16, value: &serde_json::Value) -> Self {
        let mut body = serde_json::to_string_pretty(value).unwrap_or_default();
        body.push('\n');
        Self {
            status,
            content_type: "application/json",
            body,
            header: None,
        }
    }

    pub fn not_found() -> Self {
        Self::text(404, "not found\n")
    }

    /// `registry` as OpenMetrics text, or as the classic text format 0.0.4 for scrapers and
    /// tools that ask for nothing in particular (`promtool check metrics`).
    pub fn metrics(registry: &prometheus_client::registry::Registry, open_metrics: bool) -> Self {
        let text = crate::metrics::encode(registry);
        if open_metrics {
            Self {
                status: 200,
                content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body: text,
                header: None,
            }
        } else {
            Self {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: crate::metrics::classic_text(&text),
                header: None,
            }
        }
    }
}

/// Serves admin requests on `listener` with `routes` until the future is dropped.
pub async fn serve<R>(listener: TcpListener, routes: R)
where
    R: Fn(&Ask<'_>) -> Answer + Clone + Send + Sync + 'static,
{
    let places = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(place) = places.clone().acquire_owned().await else {
            return;
        };
        let Ok((tcp, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let routes = routes.clone();
        let from_loopback = peer.ip().to_canonical().is_loopback();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let open_metrics = req
                    .headers()
                    .get_all(hyper::header::ACCEPT)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .any(|v| v.contains("application/openmetrics-text"));
                let authorization = req
                    .headers()
                    .get(hyper::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let method = req.method().as_str().to_owned();
                let path = req.uri().path().to_owned();
                let query = req.uri().query().map(str::to_owned);
                let routes = routes.clone();
                async move {
                    // Off the async workers: encoding /metrics for 10,000 branches (5 MB, tens
                    // of ms), a reload's compile and a learned-set save would otherwise hold a
                    // worker that tunnels and setups need.
                    let answer = tokio::task::spawn_blocking(move || {
                        routes(&Ask {
                            method: &method,
                            path: &path,
                            query: query.as_deref(),
                            from_loopback,
                            peer,
                            authorization: authorization.as_deref(),
                            open_metrics,
                        })
                    })
                    .await
                    .unwrap_or_else(|_| Answer::text(500, "internal error\n"));
                    let mut response = hyper::Response::builder()
                        .status(answer.status)
                        .header("content-type", answer.content_type);
                    if let Some((name, value)) = answer.header {
                        response = response.header(name, value);
                    }
                    response.body(Full::new(Bytes::from(answer.body)))
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service);
            let _ = tokio::time::timeout(CONNECTION_TIME, connection).await;
            drop(place);
        });
    }
}
