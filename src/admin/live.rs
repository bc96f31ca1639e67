//! The admin routes over the live tunnels: list them and the branches, close tunnels, drain,
//! quarantine and release a branch. Every change writes one audit line (who, what, the
//! filter, how many tunnels it touched) at `portcullis::audit`.

use super::auth::Caller;
use crate::access_log::AUDIT_TARGET;
use crate::admin_http::{Answer, Ask};
use crate::control::Control;
use crate::end::End;
use crate::live::{Filter, Hold, view};
use serde_json::json;
use std::time::Duration;

/// A drain without `deadline` lets open tunnels run this long.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(600);
/// The longest drain deadline taken.
pub const MAX_DRAIN: Duration = Duration::from_secs(24 * 3600);

/// Query parameters outside `allowed`, as a 400 answer.
fn unknown_parameter(ask: &Ask<'_>, allowed: &[&str]) -> Option<Answer> {
    let query = ask.query?;
    let unknown = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').map_or(pair, |(key, _)| key))
        .find(|key| !allowed.contains(key))?;
    Some(Answer::text(
        400,
        format!(
            "unknown parameter {unknown:?}; expected one of {}\n",
            allowed.join(", ")
        ),
    ))
}

const FILTER: &[&str] = &[
    "id", "branch", "host", "rule", "min_age", "min_rate", "sort", "limit",
];

/// `GET /tunnels`.
pub fn tunnels(ask: &Ask<'_>, control: &Control) -> Answer {
    if let Some(bad) = unknown_parameter(ask, FILTER) {
        return bad;
    }
    let filter = match Filter::from_params(|name| ask.param(name)) {
        Ok(filter) => filter,
        Err(why) => return Answer::text(400, format!("{why}\n")),
    };
    let snapshot = control.current();
    let selected = snapshot.live.select(&filter);
    Answer::json(200, &view::tunnels(&selected, snapshot.live.len()))
}

/// `GET /branches`.
pub fn branches(ask: &Ask<'_>, control: &Control) -> Answer {
    if let Some(bad) = unknown_parameter(ask, &["all", "branch", "fleet"]) {
        return bad;
    }
    let snapshot = control.current();
    let all = ask.param("all").as_deref() == Some("true");
    let only = ask.param("branch");
    let mut body = view::branches(
        &snapshot.config,
        &snapshot.throttles,
        &snapshot.live,
        all,
        only.as_deref(),
    );
    if ask.param("fleet").as_deref() == Some("true") {
        match control.fleet_branches() {
            Ok(fleet) => body["fleet"] = fleet,
            Err(why) => return Answer::text(503, format!("{why}\n")),
        }
    }
    Answer::json(200, &body)
}

/// `POST /tunnels/close`: by id or filter; `dry_run=true` lists what would close.
pub fn close(ask: &Ask<'_>, control: &Control, caller: &Caller) -> Answer {
    let mut allowed = FILTER.to_vec();
    allowed.extend(["dry_run", "fleet"]);
    if let Some(bad) = unknown_parameter(ask, &allowed) {
        return bad;
    }
    let filter = match Filter::from_params(|name| ask.param(name)) {
        Ok(filter) => filter,
        Err(why) => return Answer::text(400, format!("{why}\n")),
    };
    if !filter.selects() {
        return Answer::text(
            400,
            format!(
                "name the tunnels to close: id, or a filter ({})\n",
                crate::live::filter::PARAMETERS
            ),
        );
    }
    let dry_run = ask.param("dry_run").as_deref() == Some("true");
    let fleet = ask.param("fleet").as_deref() == Some("true") && !dry_run;
    if fleet && let Some(why) = filter.not_fleet_wide() {
        return Answer::text(400, format!("fleet=true: {why}\n"));
    }
    let snapshot = control.current();
    let (ids, listed) = if dry_run {
        // Every id that would close; the rows of the first (a listing's default) only.
        let mut selected = snapshot.live.select_all(&filter);
        let ids: Vec<u64> = selected.iter().map(|(t, _)| t.id).collect();
        selected.truncate(crate::live::filter::DEFAULT_LIMIT);
        (ids, Some(view::tunnels(&selected, snapshot.live.len())))
    } else {
        (snapshot.live.close(&filter, End::ClosedByOperator), None)
    };
    let mut body = json!({ "dry_run": dry_run, "closed": ids.len(), "ids": ids });
    if let Some(listed) = listed {
        body["would_close"] = listed["tunnels"].clone();
    }
    if fleet {
        match control.fleet_action(crate::live::fleet::Action::Close(filter.clone())) {
            Ok(()) => body["fleet"] = json!("sent to every replica"),
            Err(why) => {
                audit(ask, caller, "close", None, &filter, ids.len(), dry_run);
                body["fleet"] = json!(format!("not sent: {why}"));
                return Answer::json(503, &body);
            }
        }
    }
    audit(ask, caller, "close", None, &filter, ids.len(), dry_run);
    Answer::json(200, &body)
}

/// `POST /branches/NAME/{drain,quarantine,release}`.
pub fn branch_action(ask: &Ask<'_>, control: &Control, caller: &Caller, rest: &str) -> Answer {
    let Some((branch, action)) = rest.rsplit_once('/') else {
        return Answer::not_found();
    };
    let allowed: &[&str] = match action {
        "drain" => &["deadline", "fleet"],
        "quarantine" | "release" => &["fleet"],
        _ => return Answer::not_found(),
    };
    if let Some(bad) = unknown_parameter(ask, allowed) {
        return bad;
    }
    let snapshot = control.current();
    if snapshot.config.identity_named(branch).is_none() {
        return Answer::text(404, format!("no branch named {branch:?}\n"));
    }
    let hold = match action {
        "drain" => match drain_deadline(ask) {
            Ok(after) => Some(Hold::drain_for(after)),
            Err(why) => return Answer::text(400, why),
        },
        "quarantine" => Some(Hold::Quarantine),
        _ => None,
    };
    let (mut status, mut body, touched) = control.hold(branch, hold);
    if ask.param("fleet").as_deref() == Some("true") {
        let sent = control.fleet_action(crate::live::fleet::Action::Hold(
            branch.to_owned(),
            hold.map(|h| h.wire()),
        ));
        body["fleet"] = json!(match &sent {
            Ok(()) => "sent to every replica".to_owned(),
            Err(why) => format!("not sent: {why}"),
        });
        if sent.is_err() {
            // Held here, but not everywhere: the caller must hear it.
            status = 503;
        }
    }
    let filter = Filter::default();
    audit(ask, caller, action, Some(branch), &filter, touched, false);
    Answer::json(status, &body)
}

/// `deadline=10m` (a duration from now) or an RFC 3339 time; [`DEFAULT_DRAIN`] without one.
fn drain_deadline(ask: &Ask<'_>) -> Result<Duration, String> {
    let Some(text) = ask.param("deadline") else {
        return Ok(DEFAULT_DRAIN);
    };
    let after = match text.parse::<jiff::Timestamp>() {
        Ok(at) => Duration::try_from(at.duration_since(jiff::Timestamp::now()))
            .map_err(|_| format!("deadline={text:?} is in the past\n"))?,
        Err(_) => crate::config::values::parse_duration(&text)
            .map_err(|e| format!("deadline={e}, or an RFC 3339 time\n"))?,
    };
    if after > MAX_DRAIN {
        return Err(format!("deadline={text:?}: at most 24h from now\n"));
    }
    Ok(after)
}

/// The audit line of one operator action.
fn audit(
    ask: &Ask<'_>,
    caller: &Caller,
    action: &str,
    branch: Option<&str>,
    filter: &Filter,
    tunnels: usize,
    dry_run: bool,
) {
    let filter = filter.to_query();
    tracing::info!(
        target: AUDIT_TARGET,
        who = caller.who(),
        client = %ask.peer,
        action,
        branch,
        filter = (!filter.is_empty()).then_some(filter.as_str()),
        dry_run = dry_run.then_some(true),
        tunnels,
        "operator action"
    );
}

/// The audit line of an action without tunnels (reload, upgrade, learned-set changes).
pub fn audit_plain(ask: &Ask<'_>, caller: &Caller, action: &str, outcome: u16) {
    tracing::info!(
        target: AUDIT_TARGET,
        who = caller.who(),
        client = %ask.peer,
        action,
        status = outcome,
        "operator action"
    );
}
