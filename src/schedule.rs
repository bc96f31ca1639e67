//! Bandwidth schedules: which limits are in force at an instant. A schedule is a set of week
//! days, a local time window on each of them (end exclusive, may cross midnight, `00:00-00:00`
//! is the whole day) in an IANA time zone, and a limit per direction. Windows are turned into
//! absolute instants day by day in their own zone, so DST change days get the local hours the
//! operator wrote (a 09:00-17:00 window is 09:00-17:00 on the clock on those days too, and an
//! all-day window is 23 or 25 hours long).
//!
//! Pure functions of a given instant: the throttle (`throttle`) and `portcullis schedule` ask
//! the same questions with the real clock or a chosen moment.

use jiff::Timestamp;
use jiff::civil::{Date, Time};
use jiff::tz::TimeZone;

/// The two directions of a tunnel, named as the sync service sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client (branch server) to the service.
    Upload,
    /// Service to the client.
    Download,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Upload, Direction::Download];

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Upload => "upload",
            Direction::Download => "download",
        }
    }
}

/// Whom one schedule's budget covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// One budget per branch: every branch may use the full limit.
    EachBranch,
    /// One budget shared by all (listed) branches together.
    AllBranches,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::EachBranch => "each-branch",
            Scope::AllBranches => "all-branches",
        }
    }
}

/// One `[[schedule]]` entry, validated.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub name: String,
    /// Monday first.
    pub days: [bool; 7],
    pub start: Time,
    /// Exclusive; at or before `start` means the window ends the next day.
    pub end: Time,
    pub zone: TimeZone,
    /// As written, or the host's zone name.
    pub zone_name: String,
    /// Bytes per second, client to service.
    pub upload: Option<u64>,
    /// Bytes per second, service to client.
    pub download: Option<u64>,
    pub scope: Scope,
    /// The branches it covers; `None` is every branch (and unassigned clients).
    pub branches: Option<Vec<String>>,
    /// Rule categories whose tunnels it throttles.
    pub categories: Vec<String>,
}

/// Categories throttled when a schedule does not list its own: the bulk sync traffic.
pub const DEFAULT_CATEGORIES: &[&str] = &["storage", "sync"];

/// Days a window is turned into instants for when looking for overlaps: a year covers every
/// DST rule, plus a week.
pub const OVERLAP_HORIZON_DAYS: i64 = 372;

pub const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl Schedule {
    pub fn limit(&self, direction: Direction) -> Option<u64> {
        match direction {
            Direction::Upload => self.upload,
            Direction::Download => self.download,
        }
    }

    pub fn covers_branch(&self, branch: &str) -> bool {
        self.branches
            .as_ref()
            .is_none_or(|list| list.iter().any(|b| b == branch))
    }

    pub fn covers_category(&self, category: &str) -> bool {
        self.categories.iter().any(|c| c == category)
    }

    /// The window that starts on local `date`, as instants; `None` when `date` is not one of
    /// the schedule's days or the window vanishes in a DST gap.
    pub fn window_on(&self, date: Date) -> Option<(Timestamp, Timestamp)> {
        if !self.days[date.weekday().to_monday_zero_offset() as usize] {
            return None;
        }
        let end_date = if self.end <= self.start {
            date.tomorrow().ok()?
        } else {
            date
        };
        // "compatible" disambiguation: a time in a spring-forward gap moves forward, a time in
        // the autumn fold takes its first occurrence.
        let start = date
            .to_datetime(self.start)
            .to_zoned(self.zone.clone())
            .ok()?;
        let end = end_date
            .to_datetime(self.end)
            .to_zoned(self.zone.clone())
            .ok()?;
        let (start, end) = (start.timestamp(), end.timestamp());
        (start < end).then_some((start, end))
    }

    fn local_date(&self, at: Timestamp) -> Date {
        at.to_zoned(self.zone.clone()).date()
    }

    /// Whether a window holds `at` (start inclusive, end exclusive).
    pub fn in_force_at(&self, at: Timestamp) -> bool {
        self.windows(at, 1)
            .any(|(start, end)| start <= at && at < end)
    }

    /// The first window start or end strictly after `at` (a week and a day ahead is always
    /// enough: every schedule has a day in each week).
    pub fn next_boundary_after(&self, at: Timestamp) -> Option<Timestamp> {
        self.windows(at, 9)
            .flat_map(|(start, end)| [start, end])
            .filter(|&edge| edge > at)
            .min()
    }

    /// The windows starting on `days` + 1 local dates from the day before `from`'s (a window
    /// that began yesterday may still be open).
    pub fn windows(
        &self,
        from: Timestamp,
        days: i64,
    ) -> impl Iterator<Item = (Timestamp, Timestamp)> + '_ {
        std::iter::successors(self.local_date(from).yesterday().ok(), |d| {
            d.tomorrow().ok()
        })
        .take(usize::try_from(days).unwrap_or(0) + 1)
        .filter_map(|date| self.window_on(date))
    }

    /// The days, window and zone as written, for tables and messages.
    pub fn when(&self) -> String {
        format!(
            "{} {}-{} {}",
            format_days(&self.days),
            self.start.strftime("%H:%M"),
            self.end.strftime("%H:%M"),
            self.zone_name
        )
    }

    /// Whether both would drive the same budget (same scope; for each-branch a branch in
    /// common, for all-branches the same branch list) in a direction both limit.
    pub fn shares_budget_with(&self, other: &Schedule) -> Option<Direction> {
        if self.scope != other.scope {
            return None;
        }
        let same_budget = match self.scope {
            Scope::EachBranch => match (&self.branches, &other.branches) {
                (None, _) | (_, None) => true,
                (Some(a), Some(b)) => a.iter().any(|x| b.contains(x)),
            },
            Scope::AllBranches => sorted(&self.branches) == sorted(&other.branches),
        };
        if !same_budget {
            return None;
        }
        Direction::BOTH
            .into_iter()
            .find(|&d| self.limit(d).is_some() && other.limit(d).is_some())
    }
}

fn sorted(list: &Option<Vec<String>>) -> Option<Vec<&str>> {
    list.as_ref().map(|l| {
        let mut v: Vec<&str> = l.iter().map(String::as_str).collect();
        v.sort_unstable();
        v.dedup();
        v
    })
}

/// The first instant at which windows of `a` and `b` both hold, looking `days` ahead of `from`.
pub fn first_overlap(a: &Schedule, b: &Schedule, from: Timestamp, days: i64) -> Option<Timestamp> {
    let wa: Vec<_> = a.windows(from, days).collect();
    let wb: Vec<_> = b.windows(from, days).collect();
    let (mut i, mut j) = (0, 0);
    while i < wa.len() && j < wb.len() {
        let ((s1, e1), (s2, e2)) = (wa[i], wb[j]);
        if s1 < e2 && s2 < e1 {
            return Some(s1.max(s2));
        }
        if e1 <= e2 {
            i += 1;
        } else {
            j += 1;
        }
    }
    None
}

/// The next window boundary of any schedule after `at`.
pub fn next_boundary(schedules: &[Schedule], at: Timestamp) -> Option<Timestamp> {
    schedules
        .iter()
        .filter_map(|s| s.next_boundary_after(at))
        .min()
}

// ---- text forms -----------------------------------------------------------------------------

/// Parses `mon-fri`, `sat,sun`, `mon-wed,fri`, `fri-mon` (wraps), `daily`; full names too.
pub fn parse_days(text: &str) -> Result<[bool; 7], String> {
    const EXPECTED: &str =
        "expected days such as \"mon-fri\", \"sat,sun\" or \"daily\" (mon tue wed thu fri sat sun)";
    let day = |name: &str| -> Result<usize, String> {
        day_index(name).ok_or_else(|| {
            format!(
                "{text:?}: unknown day {:?}; {EXPECTED}",
                name.trim().to_ascii_lowercase()
            )
        })
    };
    let trimmed = text.trim();
    if trimmed.eq_ignore_ascii_case("daily") || trimmed.eq_ignore_ascii_case("all") {
        return Ok([true; 7]);
    }
    let mut days = [false; 7];
    for part in trimmed.split(',') {
        if part.trim().is_empty() {
            return Err(format!("{text:?}: {EXPECTED}"));
        }
        match part.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (day(from)?, day(to)?);
                let mut d = from;
                loop {
                    days[d] = true;
                    if d == to {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => days[day(part)?] = true,
        }
    }
    Ok(days)
}

const FULL_DAY_NAMES: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

/// Monday = 0 for `mon` or `Monday` (any case, surrounding spaces ignored).
pub fn day_index(name: &str) -> Option<usize> {
    let name = name.trim().to_ascii_lowercase();
    DAY_NAMES
        .iter()
        .position(|d| *d == name)
        .or_else(|| FULL_DAY_NAMES.iter().position(|d| *d == name))
}

/// `mon-fri`, `sat,sun`, `daily`: the shortest form with ranges of three or more days.
pub fn format_days(days: &[bool; 7]) -> String {
    if days.iter().all(|&d| d) {
        return "daily".into();
    }
    let mut parts = Vec::new();
    let mut i = 0;
    while i < 7 {
        if !days[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i + 1 < 7 && days[i + 1] {
            i += 1;
        }
        match i - start {
            0 => parts.push(DAY_NAMES[start].to_owned()),
            1 => parts.push(format!("{},{}", DAY_NAMES[start], DAY_NAMES[i])),
            _ => parts.push(format!("{}-{}", DAY_NAMES[start], DAY_NAMES[i])),
        }
        i += 1;
    }
    parts.join(",")
}

/// Parses `HH:MM-HH:MM` (24-hour; `00:00-00:00` is all day, an end at or before the start
/// crosses midnight).
pub fn parse_window(text: &str) -> Result<(Time, Time), String> {
    const EXPECTED: &str = "expected a window HH:MM-HH:MM such as \"09:00-17:00\", \"22:00-06:00\" (crosses midnight) or \"00:00-00:00\" (all day)";
    let (start, end) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?}: {EXPECTED}"))?;
    let time = |t: &str| -> Result<Time, String> {
        let t = t.trim();
        let (h, m) = t
            .split_once(':')
            .filter(|(h, m)| h.len() == 2 && m.len() == 2)
            .ok_or_else(|| format!("{text:?}: {EXPECTED}"))?;
        let (h, m): (i8, i8) = (
            h.parse().map_err(|_| format!("{text:?}: {EXPECTED}"))?,
            m.parse().map_err(|_| format!("{text:?}: {EXPECTED}"))?,
        );
        Time::new(h, m, 0, 0).map_err(|_| format!("{text:?}: {EXPECTED}"))
    };
    let (start, end) = (time(start)?, time(end)?);
    if start == end && start != Time::midnight() {
        return Err(format!(
            "{text:?}: an empty window; use \"00:00-00:00\" for the whole day"
        ));
    }
    Ok((start, end))
}

/// Lowest and highest limits accepted, in bytes per second (8 kbit/s, 100 Gbit/s).
pub const MIN_RATE: u64 = 1_000;
pub const MAX_RATE: u64 = 12_500_000_000;

/// Parses `10 Mbit/s`, `1.5 MB/s`, `800 kbit/s`, `512 KiB/s`, `10Mbps` into bytes per second.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    const EXPECTED: &str = "expected a rate such as \"10 Mbit/s\", \"1.5 MB/s\", \"800 kbit/s\" or \"512 KiB/s\" (units B/s kB/s MB/s GB/s KiB/s MiB/s GiB/s bit/s kbit/s Mbit/s Gbit/s, or bps kbps Mbps Gbps)";
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = (&t[..split], t[split..].trim());
    let number: f64 = number
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite())
        .ok_or_else(|| format!("{text:?}: {EXPECTED}"))?;
    let per_second: f64 = match unit {
        "B/s" => 1.0,
        "kB/s" | "KB/s" => 1e3,
        "MB/s" => 1e6,
        "GB/s" => 1e9,
        "KiB/s" => 1024.0,
        "MiB/s" => 1024.0 * 1024.0,
        "GiB/s" => 1024.0 * 1024.0 * 1024.0,
        "bit/s" | "bps" => 1.0 / 8.0,
        "kbit/s" | "Kbit/s" | "kbps" | "Kbps" => 1e3 / 8.0,
        "Mbit/s" | "Mbps" => 1e6 / 8.0,
        "Gbit/s" | "Gbps" => 1e9 / 8.0,
        _ => return Err(format!("{text:?}: {EXPECTED}")),
    };
    let bytes = (number * per_second).round();
    if !(MIN_RATE as f64..=MAX_RATE as f64).contains(&bytes) {
        return Err(format!(
            "{text:?}: a limit must be between 8 kbit/s (1 kB/s) and 100 Gbit/s"
        ));
    }
    Ok(bytes as u64)
}

/// A rate for people: `10 Mbit/s (1.25 MB/s)`.
pub fn format_rate(bytes_per_second: u64) -> String {
    let bits = bytes_per_second as f64 * 8.0;
    let (value, unit) = if bits >= 1e9 {
        (bits / 1e9, "Gbit/s")
    } else if bits >= 1e6 {
        (bits / 1e6, "Mbit/s")
    } else {
        (bits / 1e3, "kbit/s")
    };
    let bytes = bytes_per_second as f64;
    let (b_value, b_unit) = if bytes >= 1e9 {
        (bytes / 1e9, "GB/s")
    } else if bytes >= 1e6 {
        (bytes / 1e6, "MB/s")
    } else {
        (bytes / 1e3, "kB/s")
    };
    format!(
        "{} {unit} ({} {b_unit})",
        trim_number(value),
        trim_number(b_value)
    )
}

fn trim_number(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(days: &str, window: &str, zone: &str) -> Schedule {
        let (start, end) = parse_window(window).unwrap();
        Schedule {
            name: "s".into(),
            days: parse_days(days).unwrap(),
            start,
            end,
            zone: TimeZone::get(zone).unwrap(),
            zone_name: zone.into(),
            upload: Some(1_250_000),
            download: None,
            scope: Scope::EachBranch,
            branches: None,
            categories: vec!["storage".into()],
        }
    }

    fn at(local: &str, zone: &str) -> Timestamp {
        local
            .parse::<jiff::civil::DateTime>()
            .unwrap()
            .to_zoned(TimeZone::get(zone).unwrap())
            .unwrap()
            .timestamp()
    }

    #[test]
    fn weekday_window_boundaries_are_start_inclusive_end_exclusive() {
        let s = schedule("mon-fri", "09:00-17:00", "Europe/London");
        let z = "Europe/London";
        // 2026-11-23 is a Monday.
        assert!(!s.in_force_at(at("2026-11-23T08:59:59", z)));
        assert!(s.in_force_at(at("2026-11-23T09:00", z)));
        assert!(s.in_force_at(at("2026-11-23T16:59:59", z)));
        assert!(!s.in_force_at(at("2026-11-23T17:00", z)));
        assert!(!s.in_force_at(at("2026-11-28T10:00", z)), "Saturday");
        assert_eq!(
            s.next_boundary_after(at("2026-11-23T09:00", z)),
            Some(at("2026-11-23T17:00", z))
        );
        // Friday evening: the next boundary is Monday morning.
        assert_eq!(
            s.next_boundary_after(at("2026-11-27T18:00", z)),
            Some(at("2026-11-30T09:00", z))
        );
    }

    #[test]
    fn a_window_crossing_midnight_belongs_to_the_day_it_starts() {
        let s = schedule("fri", "22:00-06:00", "UTC");
        assert!(s.in_force_at(at("2026-11-27T23:00", "UTC")), "Friday night");
        assert!(
            s.in_force_at(at("2026-11-28T05:59", "UTC")),
            "Saturday early"
        );
        assert!(!s.in_force_at(at("2026-11-28T06:00", "UTC")));
        assert!(
            !s.in_force_at(at("2026-11-27T05:00", "UTC")),
            "Friday early is Thursday's window"
        );
        assert!(
            !s.in_force_at(at("2026-11-28T23:00", "UTC")),
            "Saturday night"
        );
    }

    #[test]
    fn all_day_windows_follow_the_local_day_through_dst_changes() {
        let s = schedule("sun", "00:00-00:00", "Europe/London");
        let z = "Europe/London";
        // 2026-03-29: clocks go forward at 01:00 -> a 23-hour Sunday.
        let (start, end) = s.window_on(Date::constant(2026, 3, 29)).unwrap();
        assert_eq!(start.duration_until(end).as_hours(), 23);
        // 2026-10-25: clocks go back at 02:00 -> a 25-hour Sunday.
        let (start, end) = s.window_on(Date::constant(2026, 10, 25)).unwrap();
        assert_eq!(start.duration_until(end).as_hours(), 25);
        assert!(s.in_force_at(at("2026-10-25T23:59:59", z)));
        assert!(!s.in_force_at(at("2026-10-26T00:00", z)));
    }

    #[test]
    fn office_hours_stay_on_the_local_clock_across_dst() {
        let s = schedule("mon-sun", "09:00-17:00", "America/New_York");
        let z = "America/New_York";
        // 2026-03-08: New York springs forward at 02:00; 2026-11-01 falls back.
        for day in [
            "2026-03-07",
            "2026-03-08",
            "2026-03-09",
            "2026-10-31",
            "2026-11-01",
        ] {
            assert!(!s.in_force_at(at(&format!("{day}T08:59"), z)), "{day}");
            assert!(s.in_force_at(at(&format!("{day}T09:00"), z)), "{day}");
            assert!(!s.in_force_at(at(&format!("{day}T17:00"), z)), "{day}");
        }
        // In UTC the window moves by an hour across the change.
        let before = s.window_on(Date::constant(2026, 3, 7)).unwrap().0;
        let after = s.window_on(Date::constant(2026, 3, 9)).unwrap().0;
        assert_eq!(before.duration_until(after).as_hours(), 47);
        // A start in the spring-forward gap (02:00-03:00) moves forward by the gap: 03:30.
        let gap = schedule("sun", "02:30-04:00", z);
        let (start, end) = gap.window_on(Date::constant(2026, 3, 8)).unwrap();
        assert_eq!(start, at("2026-03-08T03:30", z));
        assert_eq!(end, at("2026-03-08T04:00", z));
    }

    #[test]
    fn a_window_in_the_autumn_fold_takes_the_first_occurrence() {
        let s = schedule("sun", "01:30-02:30", "Europe/London");
        // 2026-10-25 01:00-02:00 happens twice in London; 01:30 BST is 00:30 UTC.
        let (start, end) = s.window_on(Date::constant(2026, 10, 25)).unwrap();
        assert_eq!(start, "2026-10-25T00:30:00Z".parse().unwrap());
        assert_eq!(end, "2026-10-25T02:30:00Z".parse().unwrap());
    }

    #[test]
    fn overlaps_are_found_across_zones_and_adjacent_windows_are_not_overlaps() {
        let from: Timestamp = "2026-11-23T00:00:00Z".parse().unwrap();
        let day = schedule("mon-fri", "09:00-17:00", "Europe/London");
        let evening = schedule("mon-fri", "17:00-09:00", "Europe/London");
        assert_eq!(
            first_overlap(&day, &evening, from, OVERLAP_HORIZON_DAYS),
            None
        );
        let weekend = schedule("sat,sun", "00:00-00:00", "Europe/London");
        // Friday's evening window runs into Saturday.
        assert_eq!(
            first_overlap(&evening, &weekend, from, OVERLAP_HORIZON_DAYS),
            Some(at("2026-11-28T00:00", "Europe/London"))
        );
        // 08:00-10:00 in New York is 13:00-15:00 in London in November.
        let ny = schedule("mon", "08:00-10:00", "America/New_York");
        assert_eq!(
            first_overlap(&day, &ny, from, OVERLAP_HORIZON_DAYS),
            Some(at("2026-11-23T08:00", "America/New_York"))
        );
    }

    #[test]
    fn days_windows_and_rates_parse_and_bad_ones_say_what_was_expected() {
        assert_eq!(
            parse_days("mon-fri").unwrap(),
            [true, true, true, true, true, false, false]
        );
        assert_eq!(
            parse_days("sat,sun").unwrap(),
            [false, false, false, false, false, true, true]
        );
        assert_eq!(
            parse_days("fri-mon").unwrap(),
            [true, false, false, false, true, true, true]
        );
        assert_eq!(
            parse_days("Monday, wed").unwrap(),
            [true, false, true, false, false, false, false]
        );
        assert_eq!(parse_days("daily").unwrap(), [true; 7]);
        for bad in ["", "mon-", "funday", "mon,,tue", "mo"] {
            assert!(
                parse_days(bad).unwrap_err().contains("expected days"),
                "{bad:?}"
            );
        }
        assert_eq!(
            format_days(&parse_days("mon-fri,sun").unwrap()),
            "mon-fri,sun"
        );
        assert_eq!(format_days(&parse_days("sat,sun").unwrap()), "sat,sun");

        assert!(parse_window("00:00-00:00").is_ok());
        assert!(parse_window("22:00-06:00").is_ok());
        for bad in [
            "9:00-17:00",
            "09:00",
            "25:00-26:00",
            "09:00-09:00",
            "09:60-10:00",
        ] {
            assert!(parse_window(bad).is_err(), "{bad:?}");
        }

        assert_eq!(parse_rate("10 Mbit/s").unwrap(), 1_250_000);
        assert_eq!(parse_rate("1.5 MB/s").unwrap(), 1_500_000);
        assert_eq!(parse_rate("800 kbit/s").unwrap(), 100_000);
        assert_eq!(parse_rate("512 KiB/s").unwrap(), 524_288);
        assert_eq!(parse_rate("10Mbps").unwrap(), 1_250_000);
        assert!(parse_rate("10 Mb").unwrap_err().contains("expected a rate"));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("1 bit/s").unwrap_err().contains("between"));
        assert_eq!(format_rate(1_250_000), "10 Mbit/s (1.25 MB/s)");
    }
}
