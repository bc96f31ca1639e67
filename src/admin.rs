//! The admin listener (127.0.0.1:9464 by default; `listen.admin = "off"` disables it):
//!
//! | route | answer |
//! |---|---|
//! | `GET /metrics` (and `HEAD`) | OpenMetrics text when the `Accept` header asks for it (Prometheus does), else the classic text format 0.0.4 |
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 when serving, 503 while draining |
//! | `POST /reload` | from loopback only: reload the config file (200, or 422 with its problems) |

use crate::admin_http::{Answer, Ask};
use crate::reload::Reloader;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::TcpListener;

/// Serves admin requests until the task is dropped.
pub async fn serve(listener: TcpListener, reloader: Reloader, draining: Arc<AtomicBool>) {
    crate::admin_http::serve(listener, move |ask: &Ask<'_>| {
        route(ask, &reloader, &draining)
    })
    .await
}

fn route(ask: &Ask<'_>, reloader: &Reloader, draining: &AtomicBool) -> Answer {
    match (ask.method, ask.path) {
        ("GET" | "HEAD", "/metrics") => {
            Answer::metrics(reloader.scrape().registry(), ask.open_metrics)
        }
        ("POST", "/reload") if !ask.from_loopback => {
            Answer::text(403, "reload only from loopback\n")
        }
        ("POST", "/reload") => match reloader.reload() {
            Ok(()) => Answer::text(200, "reloaded\n"),
            Err(problems) => Answer::text(422, format!("{problems}\n")),
        },
        ("GET", "/healthz") => Answer::text(200, "ok\n"),
        ("GET", "/readyz") if draining.load(Ordering::Relaxed) => Answer::text(503, "draining\n"),
        ("GET", "/readyz") => Answer::text(200, "ready\n"),
        _ => Answer::not_found(),
    }
}
