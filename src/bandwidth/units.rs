//! The operator's words for schedules: week days (`mon-fri`, `sat,sun`, `daily`), local
//! windows (`08:00-18:00`) and rates (`10 Mbit/s`, `1.5 MB/s`), parsed with messages that say
//! what was expected, and formatted back for `check-config`, `explain` and `schedule`.

use jiff::civil::Time;

/// Day names as schedules write them, Monday first.
pub const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

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
