//! Operator actions as they travel between replicas (fleet mode's control stream) and the
//! per-branch summary each replica publishes: plain text fields, parsed back strictly (a
//! message that does not parse is skipped and logged, never half applied).

use super::{Filter, Hold};

/// An action for every replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Close the tunnels the filter selects.
    Close(Filter),
    /// Put a hold on a branch (`drain RFC3339` or `quarantine`), or take it off (`None`).
    Hold(String, Option<String>),
}

impl Hold {
    /// The hold as the control stream and the holds hash carry it.
    pub fn wire(self) -> String {
        match self {
            Hold::Drain { until, .. } => format!("drain {until}"),
            Hold::Quarantine => "quarantine".into(),
        }
    }

    /// A hold from [`Hold::wire`]'s text.
    pub fn from_wire(text: &str) -> Option<Hold> {
        match text.split_once(' ') {
            Some(("drain", until)) => until.parse().ok().map(Hold::drain_until),
            None if text == "quarantine" => Some(Hold::Quarantine),
            _ => None,
        }
    }
}

/// Puts `holds` (branch, wire text) on `registry`, as a replica starting takes them over
/// (`from`: "fleet" from Redis, "upgrade" from the old process); one that does not parse is
/// skipped with a warning.
pub fn take_holds(
    registry: &std::sync::Arc<super::Registry>,
    holds: impl IntoIterator<Item = (String, String)>,
    from: &'static str,
) {
    for (branch, wire) in holds {
        match Hold::from_wire(&wire) {
            Some(hold) => {
                registry.hold(&branch, Some(hold));
                tracing::info!(%branch, hold = hold.as_str(), from, "took over a hold in force");
            }
            None => tracing::warn!(%branch, %wire, from, "skipped a hold that does not parse"),
        }
    }
}

impl Action {
    /// The stream entry's fields.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        match self {
            Action::Close(filter) => {
                vec![("action", "close".into()), ("filter", filter.to_query())]
            }
            Action::Hold(branch, hold) => vec![
                ("action", "hold".into()),
                ("branch", branch.clone()),
                ("hold", hold.clone().unwrap_or_else(|| "release".into())),
            ],
        }
    }

    /// An action from a stream entry's fields.
    pub fn from_fields(field: impl Fn(&str) -> Option<String>) -> Result<Action, String> {
        match field("action").as_deref() {
            Some("close") => {
                let query = field("filter").unwrap_or_default();
                let filter = Filter::from_params(|name| {
                    query.split('&').find_map(|pair| {
                        let (key, value) = pair.split_once('=')?;
                        (key == name).then(|| crate::admin_http::percent_decode(value))
                    })
                })?;
                if !filter.selects() {
                    return Err("a close without a filter".into());
                }
                if let Some(why) = filter.not_fleet_wide() {
                    return Err(why.into());
                }
                Ok(Action::Close(filter))
            }
            Some("hold") => {
                let branch = field("branch").ok_or("a hold without a branch")?;
                let hold = field("hold").ok_or("a hold without its state")?;
                if hold == "release" {
                    return Ok(Action::Hold(branch, None));
                }
                Hold::from_wire(&hold).ok_or(format!("hold {hold:?}"))?;
                Ok(Action::Hold(branch, Some(hold)))
            }
            other => Err(format!("unknown action {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn actions_survive_the_trip() {
        let filter = Filter {
            branch: Some("london".into()),
            host: Some("*.file.core.windows.net".into()),
            ..Filter::default()
        };
        let drain = Hold::drain_for(std::time::Duration::from_secs(60)).wire();
        for action in [
            Action::Close(filter),
            Action::Hold("paris".into(), Some("quarantine".into())),
            Action::Hold("paris".into(), Some(drain)),
            Action::Hold("paris".into(), None),
        ] {
            let fields: HashMap<&str, String> = action.fields().into_iter().collect();
            let back = Action::from_fields(|k| fields.get(k).cloned()).unwrap();
            assert_eq!(back, action);
        }
        assert!(Action::from_fields(|k| (k == "action").then(|| "close".into())).is_err());
        assert!(Hold::from_wire("drain soon").is_none());
    }
}
