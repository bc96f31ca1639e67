//! The admin listener (127.0.0.1:9464 by default; `listen.admin = "off"` disables it):
//! `/metrics`, `/healthz` and `/readyz` for anyone it accepts; the rest as [`auth`] allows
//! (reads with a read token, changes with a control token; without tokens, reads for anyone
//! and changes from loopback):
//!
//! | route | answer |
//! |---|---|
//! | `GET /metrics` (and `HEAD`) | OpenMetrics text when the `Accept` header asks for it (Prometheus does), else the classic text format 0.0.4 |
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 when serving, 503 while draining or while an egress's source address is not on this host (named) |
//! | `POST /reload` | reload the config file (200, or 422 with its problems) |
//! | `POST /upgrade` | binary upgrade (200 once the new process listens, or 500 with why the old one serves on) |
//! | `GET /learned[?branch=B]` | the learned destinations, in the state file's JSON format |
//! | `POST /learned/approve?branch=B&host=H[:P][&rule=R]` | learn a destination (saved before the answer) |
//! | `POST /learned/forget?branch=B&host=H[:P][&rule=R]` | forget one (every port without `:P`) |
//! | `GET /tunnels`, `GET /branches`, `POST /tunnels/close`, `POST /branches/NAME/{drain,quarantine,release}` | the live tunnels ([`live`]) |

pub mod auth;
pub mod live;

use crate::admin_http::{Answer, Ask};
use crate::config::admin::Role;
use crate::control::Control;
use crate::learned::ops::{self, Edit};
use auth::Caller;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::TcpListener;

/// Serves admin requests until the task is dropped.
pub async fn serve(listener: TcpListener, control: Control, draining: Arc<AtomicBool>) {
    crate::admin_http::serve(listener, move |ask: &Ask<'_>| {
        route(ask, &control, &draining)
    })
    .await
}

fn route(ask: &Ask<'_>, control: &Control, draining: &AtomicBool) -> Answer {
    match (ask.method, ask.path) {
        ("GET" | "HEAD", "/metrics") => {
            return Answer::metrics(control.scrape().registry(), ask.open_metrics);
        }
        ("GET", "/healthz") => return Answer::text(200, "ok\n"),
        ("GET", "/readyz") if draining.load(Ordering::Relaxed) => {
            return Answer::text(503, "draining\n");
        }
        ("GET", "/readyz") => return ready(control),
        _ => {}
    }
    let needs = match ask.method {
        "GET" => Role::Read,
        "POST" => Role::Control,
        _ => return Answer::not_found(),
    };
    let config = &control.current().config;
    let caller = match auth::authorize(ask, config, needs) {
        Ok(caller) => caller,
        Err(refused) => return refused,
    };
    match (ask.method, ask.path) {
        ("GET", "/tunnels") => live::tunnels(ask, control),
        ("GET", "/branches") => live::branches(ask, control),
        ("GET", "/learned") => learned_rows(ask, control),
        ("POST", "/tunnels/close") => live::close(ask, control, &caller),
        ("POST", path) if path.starts_with("/branches/") => {
            live::branch_action(ask, control, &caller, &path["/branches/".len()..])
        }
        ("POST", "/upgrade") => {
            let answer = match control.upgrade() {
                Ok(pid) => Answer::text(
                    200,
                    format!("upgraded: process {pid} serves; this one drains\n"),
                ),
                Err(problem) => Answer::text(
                    500,
                    format!("upgrade failed; the running process serves on: {problem}\n"),
                ),
            };
            live::audit_plain(ask, &caller, "upgrade", answer.status);
            answer
        }
        ("POST", "/reload") => {
            let answer = match control.reload() {
                Ok(()) => Answer::text(200, "reloaded\n"),
                Err(problems) => Answer::text(422, format!("{problems}\n")),
            };
            live::audit_plain(ask, &caller, "reload", answer.status);
            answer
        }
        ("POST", "/learned/approve") => learned_change(ask, control, &caller, Edit::Approve),
        ("POST", "/learned/forget") => learned_change(ask, control, &caller, Edit::Forget),
        _ => Answer::not_found(),
    }
}

/// 200 when every egress can leave from its source addresses; 503 naming those that cannot
/// (an address that left the host). Without egresses, no check at all.
fn ready(control: &Control) -> Answer {
    let snapshot = control.current();
    let down = crate::gateway::egress::unavailable(&snapshot.config.egresses.list);
    if down.is_empty() {
        Answer::text(200, "ready\n")
    } else {
        Answer::text(503, format!("not ready: {}\n", down.join("; ")))
    }
}

/// `GET /learned`: the learned sets in the state file's format.
fn learned_rows(ask: &Ask<'_>, control: &Control) -> Answer {
    let snapshot = control.current();
    let rows = snapshot.learned.rows(ask.param("branch").as_deref());
    let mut answer = Answer::text(200, "");
    answer.content_type = "application/json";
    answer.body = String::from_utf8_lossy(&crate::learned::state_file::render(&rows)).into_owned();
    answer
}

/// An operator's `edit` of a learned set on the running gateway, saved before the answer.
fn learned_change(ask: &Ask<'_>, control: &Control, caller: &Caller, edit: Edit) -> Answer {
    let answer = learned_edit(ask, control, edit);
    live::audit_plain(ask, caller, edit.as_str(), answer.status);
    answer
}

fn learned_edit(ask: &Ask<'_>, control: &Control, edit: Edit) -> Answer {
    let snapshot = control.current();
    let (Some(branch), Some(host)) = (ask.param("branch"), ask.param("host")) else {
        return Answer::text(400, "expected ?branch=B&host=HOST[:PORT][&rule=R]\n");
    };
    let learned = &*snapshot.learned;
    let done = ops::apply(
        &snapshot.config,
        learned,
        edit,
        &branch,
        &host,
        ask.param("rule").as_deref(),
    );
    match done {
        Ok(text) => match learned.save() {
            Ok(()) => {
                tracing::info!(%branch, %host, change = edit.as_str(), "learned destinations changed by the operator");
                Answer::text(200, text)
            }
            Err(e) => Answer::text(
                500,
                format!("{text}but saving the state file failed: {e}\n"),
            ),
        },
        Err((status, why)) => Answer::text(status, format!("{why}\n")),
    }
}
