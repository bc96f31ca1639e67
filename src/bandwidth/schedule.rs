//! Bandwidth schedules: which limits are in force at an instant. A schedule is a set of week
//! days, a local time window on each of them (end exclusive, may cross midnight, `00:00-00:00`
//! is the whole day) in an IANA time zone, and a limit per direction. Windows are turned into
//! absolute instants day by day in their own zone, so DST change days get the local hours the
//! operator wrote (a 09:00-17:00 window is 09:00-17:00 on the clock on those days too, and an
//! all-day window is 23 or 25 hours long).
//!
//! Pure functions of a given instant: the budgets (`bandwidth::budgets`) and `portcullis schedule` ask
//! the same questions with the real clock or a chosen moment.

use super::units::format_days;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bandwidth::units::{parse_days, parse_window};

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
}
