//! `portcullis learned list|approve|forget`: the learned destinations, on a running gateway
//! (its admin listener: the change is in force and saved before the answer) or on the state
//! file when no gateway holds it. Which one: `--admin` says; else the state file when its lock
//! is free, else the config's admin listener.

use crate::config::Config;
use crate::learned::{FILE_NAME, Learned, metrics::LearnedMetrics, ops, state_file};
use std::net::SocketAddr;

/// What the operator asked for.
pub enum Change<'a> {
    List { json: bool },
    Approve { host: &'a str },
    Forget { host: &'a str },
}

/// Runs `change` for `branch` (required but for `list`) and `rule`: the text to print, or the
/// error to report.
pub fn run(
    config: &Config,
    admin: Option<SocketAddr>,
    change: &Change<'_>,
    branch: Option<&str>,
    rule: Option<&str>,
) -> Result<String, String> {
    if let Some(addr) = admin {
        return on_gateway(addr, change, branch, rule);
    }
    match state_file::lock(&config.state_dir) {
        Ok(_held) => on_file(config, change, branch, rule),
        Err(held) => match config.listen.admin {
            Some(addr) => on_gateway(addr, change, branch, rule),
            None => Err(format!("{held}, and the config has no admin listener")),
        },
    }
}

fn need(branch: Option<&str>) -> Result<&str, String> {
    branch.ok_or_else(|| "--branch is required to approve or forget".to_owned())
}

/// On the state file, whose lock the caller holds.
fn on_file(
    config: &Config,
    change: &Change<'_>,
    branch: Option<&str>,
    rule: Option<&str>,
) -> Result<String, String> {
    let path = config.state_dir.join(FILE_NAME);
    let learned = Learned::new(LearnedMetrics::default());
    let rows = state_file::load(&path)?;
    learned.insert(rows);
    let said = |(_, why): (u16, String)| why;
    let text = match change {
        Change::List { json } => return Ok(listing(&learned.rows(branch), *json)),
        Change::Approve { host } => {
            let (name, port) = ops::destination(host).map_err(said)?;
            ops::approve(config, &learned, need(branch)?, (&name, port), rule).map_err(said)?
        }
        Change::Forget { host } => {
            let (name, port) = ops::destination_any_port(host).map_err(said)?;
            ops::forget(config, &learned, need(branch)?, (&name, port), rule).map_err(said)?
        }
    };
    state_file::save(&path, &learned.rows(None))
        .map_err(|e| format!("{}: cannot save: {e}", path.display()))?;
    Ok(format!(
        "{text}(state file {}; no gateway was running on it)\n",
        path.display()
    ))
}

fn listing(rows: &[crate::learned::Row], json: bool) -> String {
    if json {
        String::from_utf8_lossy(&state_file::render(rows)).into_owned()
    } else {
        ops::table(rows)
    }
}

/// Through a running gateway's admin listener.
fn on_gateway(
    addr: SocketAddr,
    change: &Change<'_>,
    branch: Option<&str>,
    rule: Option<&str>,
) -> Result<String, String> {
    use crate::admin_http::percent_encode as enc;
    let mut query = Vec::new();
    if let Some(b) = branch {
        query.push(format!("branch={}", enc(b)));
    }
    let (method, path) = match change {
        Change::List { .. } => ("GET", "/learned"),
        Change::Approve { host } | Change::Forget { host } => {
            need(branch)?;
            query.push(format!("host={}", enc(host)));
            if let Some(r) = rule {
                query.push(format!("rule={}", enc(r)));
            }
            let path = match change {
                Change::Approve { .. } => "/learned/approve",
                _ => "/learned/forget",
            };
            ("POST", path)
        }
    };
    let target = format!("{path}?{}", query.join("&"));
    let (status, body) = crate::process::http_request(addr, method, &target)
        .map_err(|e| format!("the gateway's admin listener {addr}: {e}"))?;
    if status != 200 {
        return Err(format!(
            "the gateway at {addr} answered {status}: {}",
            body.trim_end()
        ));
    }
    match change {
        Change::List { json } => {
            let rows = state_file::parse(&body)
                .map_err(|e| format!("the gateway at {addr} sent an unreadable listing: {e}"))?;
            Ok(listing(&rows, *json))
        }
        _ => Ok(format!("{body}(on the running gateway at {addr})\n")),
    }
}
