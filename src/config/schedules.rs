//! `[[schedule]]`: bandwidth windows, limits and whom they reach, checked against the branches
//! and rule categories, and against each other for overlaps on a budget (in absolute time,
//! from an instant the caller gives: compiling never reads the clock).

use super::Branch;
use super::problems::Problems;
use super::raw::RawSchedule;
use super::values::is_name;
use crate::bandwidth::schedule::Schedule;
use crate::policy::Policy;
use std::collections::HashSet;
use toml::Spanned;

/// `[[schedule]]` entries. Overlaps are looked for from `now` over a year, in absolute time,
/// so schedules in different zones are compared as the clocks will really run.
pub(super) fn compile(
    p: &mut Problems<'_>,
    raw: &[Spanned<RawSchedule>],
    branches: &[Branch],
    policy: &Policy,
    now: jiff::Timestamp,
) -> Vec<Schedule> {
    use crate::bandwidth::units;
    let mut schedules: Vec<Schedule> = Vec::new();
    let mut names = HashSet::new();
    let known_categories: HashSet<&str> =
        policy.rules.iter().map(|r| r.category.as_str()).collect();
    for (i, raw_schedule) in raw.iter().enumerate() {
        let key = format!("schedule[{i}]");
        let before = p.list.len();
        let s = raw_schedule.get_ref();
        let name = s.name.get_ref().clone();
        if !is_name(&name) {
            p.add(
                s.name.span(),
                format!("{key}.name"),
                "expected a name of letters, digits, '-', '_', '.'",
            );
        } else if !names.insert(name.clone()) {
            p.add(
                s.name.span(),
                format!("{key}.name"),
                format!("schedule name {name:?} is used twice"),
            );
        }
        let days = units::parse_days(s.days.get_ref())
            .map_err(|e| p.add(s.days.span(), format!("{key}.days"), e))
            .unwrap_or([false; 7]);
        let (start, end) = units::parse_window(s.hours.get_ref())
            .map_err(|e| p.add(s.hours.span(), format!("{key}.hours"), e))
            .unwrap_or_default();
        let (zone, zone_name) = time_zone(p, &key, s);
        let rate = |p: &mut Problems<'_>, value: &Option<Spanned<String>>, field: &str| {
            value.as_ref().and_then(|v| {
                units::parse_rate(v.get_ref())
                    .map_err(|e| p.add(v.span(), format!("{key}.{field}"), e))
                    .ok()
            })
        };
        let upload = rate(p, &s.upload, "upload");
        let download = rate(p, &s.download, "download");
        if s.upload.is_none() && s.download.is_none() {
            p.add(
                raw_schedule.span(),
                key.clone(),
                "expected a limit: `upload`, `download` or both (such as upload = \"10 Mbit/s\")",
            );
        }
        let scope = scope(p, &key, s);
        let branch_list = branch_list(p, &key, raw_schedule, branches);
        let categories = categories(p, &key, raw_schedule, &known_categories);
        if p.list.len() != before {
            continue;
        }
        let schedule = Schedule {
            name,
            days,
            start,
            end,
            zone,
            zone_name,
            upload,
            download,
            scope,
            branches: branch_list,
            categories,
        };
        overlap(p, &key, raw_schedule.span(), &schedule, &schedules, now);
        schedules.push(schedule);
    }
    let mut categories: Vec<&str> = schedules
        .iter()
        .flat_map(|s| s.categories.iter().map(String::as_str))
        .collect();
    categories.sort_unstable();
    categories.dedup();
    if categories.len() > 64 {
        p.add(
            0..0,
            "schedule",
            "schedules may throttle at most 64 categories in all",
        );
    }
    schedules
}

/// `time_zone`: an IANA zone, or the host's when unset.
fn time_zone(p: &mut Problems<'_>, key: &str, s: &RawSchedule) -> (jiff::tz::TimeZone, String) {
    match &s.time_zone {
        None => {
            let zone = jiff::tz::TimeZone::system();
            let name = zone.iana_name().unwrap_or("host time zone").to_owned();
            (zone, name)
        }
        Some(z) => match jiff::tz::TimeZone::get(z.get_ref()) {
            Ok(zone) => (zone, z.get_ref().clone()),
            Err(_) => {
                p.add(
                    z.span(),
                    format!("{key}.time_zone"),
                    format!(
                        "{:?}: expected an IANA time zone such as \"Europe/London\" or \"America/New_York\"",
                        z.get_ref()
                    ),
                );
                (jiff::tz::TimeZone::UTC, String::new())
            }
        },
    }
}

/// `applies_to`: a budget per branch (the default) or one shared.
fn scope(p: &mut Problems<'_>, key: &str, s: &RawSchedule) -> crate::bandwidth::schedule::Scope {
    use crate::bandwidth::schedule::Scope;
    match s.applies_to.as_ref().map(|a| a.get_ref().as_str()) {
        None | Some("each-branch") => Scope::EachBranch,
        Some("all-branches") => Scope::AllBranches,
        Some(other) => {
            let span = s.applies_to.as_ref().map_or(0..0, |a| a.span());
            p.add(
                span,
                format!("{key}.applies_to"),
                format!("{other:?}: expected \"each-branch\" (a budget per branch) or \"all-branches\" (one budget shared)"),
            );
            Scope::EachBranch
        }
    }
}

/// `branches`: configured names (or `unassigned`); `None` for every branch.
fn branch_list(
    p: &mut Problems<'_>,
    key: &str,
    raw_schedule: &Spanned<RawSchedule>,
    branches: &[Branch],
) -> Option<Vec<String>> {
    raw_schedule.get_ref().branches.as_ref().map(|list| {
        if list.is_empty() {
            p.add(
                raw_schedule.span(),
                format!("{key}.branches"),
                "expected at least one branch name (leave `branches` out for every branch)",
            );
        }
        list.iter()
            .enumerate()
            .map(|(j, b)| {
                let known = b.get_ref() == super::UNASSIGNED
                    || branches.iter().any(|br| &br.name == b.get_ref());
                if !known {
                    p.add(
                        b.span(),
                        format!("{key}.branches[{j}]"),
                        format!(
                            "{:?}: expected the name of a [[branch]] (or \"unassigned\")",
                            b.get_ref()
                        ),
                    );
                }
                b.get_ref().clone()
            })
            .collect::<Vec<_>>()
    })
}

/// `categories`: rule categories the policy has; storage and sync when unset.
fn categories(
    p: &mut Problems<'_>,
    key: &str,
    raw_schedule: &Spanned<RawSchedule>,
    known_categories: &HashSet<&str>,
) -> Vec<String> {
    use crate::bandwidth::schedule as sch;
    match &raw_schedule.get_ref().categories {
        None => sch::DEFAULT_CATEGORIES
            .iter()
            .map(|c| c.to_string())
            .collect(),
        Some(list) => {
            if list.is_empty() {
                p.add(
                    raw_schedule.span(),
                    format!("{key}.categories"),
                    "expected at least one rule category (leave `categories` out for storage and sync)",
                );
            }
            list.iter()
                .enumerate()
                .map(|(j, c)| {
                    if !known_categories.contains(c.get_ref().as_str()) {
                        let mut known: Vec<&str> = known_categories.iter().copied().collect();
                        known.sort_unstable();
                        p.add(
                            c.span(),
                            format!("{key}.categories[{j}]"),
                            format!(
                                "{:?}: expected a category of the policy's rules: {}",
                                c.get_ref(),
                                known.join(", ")
                            ),
                        );
                    }
                    c.get_ref().clone()
                })
                .collect()
        }
    }
}

/// A budget takes one schedule at a time: names the first overlap of `schedule` with one
/// compiled before it that drives the same budget.
fn overlap(
    p: &mut Problems<'_>,
    key: &str,
    span: std::ops::Range<usize>,
    schedule: &Schedule,
    schedules: &[Schedule],
    now: jiff::Timestamp,
) {
    use crate::bandwidth::schedule as sch;
    for other in schedules {
        let Some(direction) = schedule.shares_budget_with(other) else {
            continue;
        };
        if let Some(at) = sch::first_overlap(other, schedule, now, sch::OVERLAP_HORIZON_DAYS) {
            p.add(
                span.clone(),
                key.to_owned(),
                format!(
                    "schedule {:?} ({}) overlaps schedule {:?} ({}) for the same {} {} budget, first at {}: a budget takes one schedule at a time",
                    schedule.name,
                    schedule.when(),
                    other.name,
                    other.when(),
                    schedule.scope.as_str(),
                    direction.as_str(),
                    at.to_zoned(schedule.zone.clone()).strftime("%a %Y-%m-%d %H:%M %Z"),
                ),
            );
            break;
        }
    }
}
