//! `portcullis schedule`: the limits in force at a moment and a week table of windows, so an
//! operator can check a schedule before deploying it.

use crate::bandwidth::Throttles;
use crate::bandwidth::schedule::{Schedule, Scope, next_boundary};
use crate::bandwidth::units::format_rate;
use crate::config::Config;
use crate::config::UNASSIGNED;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use std::fmt::Write;

/// Slots per day in the week table.
const SLOTS: i64 = 48;

/// The report for `at`, with times shown in `zone`; only what applies to `branch` if given.
pub fn report(config: &Config, at: Timestamp, zone: &TimeZone, branch: Option<&str>) -> String {
    let mut out = String::new();
    let show = |t: Timestamp| {
        t.to_zoned(zone.clone())
            .strftime("%a %Y-%m-%d %H:%M %Z")
            .to_string()
    };
    let schedules: Vec<(char, &Schedule)> = config
        .schedules
        .iter()
        .filter(|s| branch.is_none_or(|b| s.covers_branch(b)))
        .enumerate()
        .map(|(i, s)| (letter(i), s))
        .collect();
    let whom = branch.map_or(String::new(), |b| format!(" for branch {b}"));
    if schedules.is_empty() {
        let _ = writeln!(
            out,
            "No bandwidth schedule applies{whom}: traffic is never throttled."
        );
        return out;
    }

    let names: Vec<&str> = config
        .branches
        .iter()
        .map(|b| b.name.as_str())
        .chain([UNASSIGNED])
        .collect();
    let throttles = Throttles::new(&config.schedules, &names, None, None);
    let in_force = throttles.in_force_at(at, branch, None);
    let _ = writeln!(out, "Limits in force at {}{whom}:", show(at));
    if in_force.is_empty() {
        let _ = writeln!(out, "  none: traffic runs unthrottled");
    } else {
        let _ = writeln!(
            out,
            "  {:<32} {:<9} {:<26} SCHEDULE",
            "BUDGET", "DIRECTION", "LIMIT"
        );
        for l in &in_force {
            let _ = writeln!(
                out,
                "  {:<32} {:<9} {:<26} {}",
                format!("{} {}", l.scope.as_str(), l.budget),
                l.direction.as_str(),
                format_rate(l.rate),
                l.schedule
            );
        }
    }
    if let Some(fleet) = &config.fleet {
        let _ = writeln!(out, "{}", fleet_note(fleet));
    }
    let own: Vec<Schedule> = schedules.iter().map(|(_, s)| (*s).clone()).collect();
    match next_boundary(&own, at) {
        Some(next) => {
            let _ = writeln!(out, "Next change: {}", show(next));
        }
        None => {
            let _ = writeln!(out, "Next change: none");
        }
    }

    let _ = writeln!(out, "\nSchedules:");
    for (mark, s) in &schedules {
        let scope = match (&s.scope, &s.branches) {
            (Scope::EachBranch, None) => "each branch".to_owned(),
            (Scope::EachBranch, Some(list)) => format!("each of {}", list.join(", ")),
            (Scope::AllBranches, None) => "all branches together".to_owned(),
            (Scope::AllBranches, Some(list)) => format!("{} together", list.join(", ")),
        };
        let rate = |r: Option<u64>| r.map_or("-".to_owned(), format_rate);
        let _ = writeln!(
            out,
            "  {mark} {}: {}; {scope}; upload {}, download {}; categories {}",
            s.name,
            s.when(),
            rate(s.upload),
            rate(s.download),
            s.categories.join(", ")
        );
    }

    // The week (Monday to Sunday) holding `at`, in half hours of `zone`.
    let date = at.to_zoned(zone.clone()).date();
    let monday = date
        .checked_sub((date.weekday().to_monday_zero_offset() as i64).days())
        .unwrap_or(date);
    let _ = writeln!(
        out,
        "\nWeek of {monday} in {} (each column 30 min; letter = schedule in force, + = several, . = none):",
        zone.iana_name().unwrap_or("the local zone")
    );
    let _ = write!(out, "      ");
    for hour in (0..24).step_by(2) {
        let _ = write!(out, "{hour:02}  ");
    }
    let _ = writeln!(out);
    for day in 0..7 {
        let Ok(d) = monday.checked_add(day.days()) else {
            continue;
        };
        let _ = write!(
            out,
            "  {} ",
            crate::bandwidth::units::DAY_NAMES[day as usize]
        );
        for slot in 0..SLOTS {
            let time = jiff::civil::Time::new((slot / 2) as i8, ((slot % 2) * 30) as i8, 0, 0);
            let mark = time
                .ok()
                .and_then(|t| d.to_datetime(t).to_zoned(zone.clone()).ok())
                .map_or('?', |z| {
                    let t = z.timestamp();
                    let active: Vec<char> = schedules
                        .iter()
                        .filter(|(_, s)| s.in_force_at(t))
                        .map(|(m, _)| *m)
                        .collect();
                    match active.as_slice() {
                        [] => '.',
                        [one] => *one,
                        _ => '+',
                    }
                });
            out.push(mark);
        }
        out.push('\n');
    }
    out
}

/// Fleet mode: the limits above are the fleet's, divided among its replicas.
pub fn fleet_note(fleet: &crate::config::FleetSettings) -> String {
    format!(
        "Fleet-wide (fleet mode, replica {}, Redis {}): every limit is the fleet's total, divided among the replicas by demand every {:?} (lease {:?}; without Redis each replica takes {}% of each limit)",
        fleet.name,
        fleet.redis.shown,
        fleet.refresh,
        fleet.lease,
        (fleet.fallback_share * 100.0).round()
    )
}

fn letter(i: usize) -> char {
    (b'A' + (i % 26) as u8) as char
}
