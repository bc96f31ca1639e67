//! `portcullis learned list|approve|forget`: the learned destinations, on a running gateway
//! (its admin listener: the change is in force and saved before the answer) or on the state
//! file when no gateway holds it. Which one: `--admin` says; else the state file when its lock
//! is free, else the config's admin listener.

use crate::config::Config;
use crate::learned::ops::{self, Edit};
use crate::learned::{FILE_NAME, Learned, metrics::LearnedMetrics, state_file};
use std::net::SocketAddr;

/// What the operator asked for.
pub enum Change<'a> {
    List {
        branch: Option<&'a str>,
        json: bool,
    },
    /// Approve or forget `host` (`HOST[:PORT]`) for `branch`, under `rule` when given.
    Edit {
        edit: Edit,
        branch: &'a str,
        host: &'a str,
        rule: Option<&'a str>,
    },
}

/// Runs `change`: the text to print, or the error to report.
pub fn run(
    config: &Config,
    admin: Option<SocketAddr>,
    change: &Change<'_>,
) -> Result<String, String> {
    if let Some(addr) = admin {
        return on_gateway(addr, change);
    }
    match state_file::lock(&config.state_dir) {
        Ok(_held) => on_file(config, change),
        Err(held) => match config.listen.admin {
            Some(addr) => on_gateway(addr, change),
            None => Err(format!("{held}, and the config has no admin listener")),
        },
    }
}

/// On the state file, whose lock the caller holds.
fn on_file(config: &Config, change: &Change<'_>) -> Result<String, String> {
    let path = config.state_dir.join(FILE_NAME);
    let learned = Learned::new(LearnedMetrics::default());
    // In fleet mode a forget here is kept in the file for Redis, where the next start takes it.
    learned.fleet_mode(config.fleet.is_some());
    learned.insert(state_file::load(&path)?);
    let text = match *change {
        Change::List { branch, json } => return Ok(listing(&learned.rows(branch), json)),
        Change::Edit {
            edit,
            branch,
            host,
            rule,
        } => ops::apply(config, &learned, edit, branch, host, rule).map_err(|(_, why)| why)?,
    };
    state_file::save(&path, &learned.stored())
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
fn on_gateway(addr: SocketAddr, change: &Change<'_>) -> Result<String, String> {
    use crate::admin_http::percent_encode as enc;
    let (method, target) = match *change {
        Change::List { branch, .. } => (
            "GET",
            match branch {
                Some(b) => format!("/learned?branch={}", enc(b)),
                None => "/learned".to_owned(),
            },
        ),
        Change::Edit {
            edit,
            branch,
            host,
            rule,
        } => {
            let mut target = format!(
                "/learned/{}?branch={}&host={}",
                edit.as_str(),
                enc(branch),
                enc(host)
            );
            if let Some(r) = rule {
                target.push_str(&format!("&rule={}", enc(r)));
            }
            ("POST", target)
        }
    };
    let (status, body) = crate::process::http_request(addr, method, &target)
        .map_err(|e| format!("the gateway's admin listener {addr}: {e}"))?;
    if status != 200 {
        return Err(format!(
            "the gateway at {addr} answered {status}: {}",
            body.trim_end()
        ));
    }
    match *change {
        Change::List { json, .. } => {
            let rows = state_file::parse(&body)
                .map_err(|e| format!("the gateway at {addr} sent an unreadable listing: {e}"))?;
            Ok(listing(&rows, json))
        }
        Change::Edit { .. } => Ok(format!("{body}(on the running gateway at {addr})\n")),
    }
}
