//! The admin listener (127.0.0.1:9464 by default; `listen.admin = "off"` disables it):
//!
//! | route | answer |
//! |---|---|
//! | `GET /metrics` (and `HEAD`) | OpenMetrics text when the `Accept` header asks for it (Prometheus does), else the classic text format 0.0.4 |
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 when serving, 503 while draining |
//! | `POST /reload` | from loopback only: reload the config file (200, or 422 with its problems) |

use crate::reload::Reloader;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;

/// Serves admin requests until the task is dropped.
pub async fn serve(listener: TcpListener, reloader: Reloader, draining: Arc<AtomicBool>) {
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let reloader = reloader.clone();
        let draining = draining.clone();
        let from_loopback = peer.ip().to_canonical().is_loopback();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let open_metrics = req
                    .headers()
                    .get_all(hyper::header::ACCEPT)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .any(|v| v.contains("application/openmetrics-text"));
                let answer = route(
                    req.method(),
                    req.uri().path(),
                    &reloader,
                    &draining,
                    from_loopback,
                    open_metrics,
                );
                async move { Ok::<_, std::convert::Infallible>(answer) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service);
            let _ = tokio::time::timeout(Duration::from_secs(30), connection).await;
        });
    }
}

fn route(
    method: &hyper::Method,
    path: &str,
    reloader: &Reloader,
    draining: &AtomicBool,
    from_loopback: bool,
    open_metrics: bool,
) -> hyper::Response<Full<Bytes>> {
    let (status, content_type, body) = match (method.as_str(), path) {
        // hyper leaves the body out of a HEAD answer.
        ("GET" | "HEAD", "/metrics") if open_metrics => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            reloader.scrape().render(),
        ),
        ("GET" | "HEAD", "/metrics") => (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            reloader.scrape().render_classic(),
        ),
        ("POST", "/reload") if !from_loopback => {
            (403, "text/plain", "reload only from loopback\n".to_owned())
        }
        ("POST", "/reload") => match reloader.reload() {
            Ok(()) => (200, "text/plain", "reloaded\n".to_owned()),
            Err(problems) => (422, "text/plain", format!("{problems}\n")),
        },
        ("GET", "/healthz") => (200, "text/plain", "ok\n".to_owned()),
        ("GET", "/readyz") if draining.load(Ordering::Relaxed) => {
            (503, "text/plain", "draining\n".to_owned())
        }
        ("GET", "/readyz") => (200, "text/plain", "ready\n".to_owned()),
        _ => (404, "text/plain", "not found\n".to_owned()),
    };
    hyper::Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}
