//! `portcullis schedule import-afs`: Azure File Sync's own network limits, as printed by
//! `Get-StorageSyncNetworkLimit | Format-List`, turned into `[[schedule]]` TOML. The agent's
//! limits are per server and in the server's local time; the import makes each an
//! each-branch budget in both directions and leaves the time zone for the operator to set.

use crate::bandwidth::units::{MAX_RATE, MIN_RATE, day_index, format_days, format_rate};
use std::fmt::Write;

/// One limit as the cmdlet prints it.
#[derive(Debug, Default, PartialEq, Eq)]
struct AfsLimit {
    days: [bool; 7],
    start_hour: u8,
    end_hour: u8,
    limit_kbps: u64,
    /// Line where the record starts, for messages.
    line: usize,
}

/// The text of a file as PowerShell writes it: Windows PowerShell 5.1's `>` writes UTF-16LE with
/// a byte-order mark, PowerShell 7 UTF-8 without one; UTF-16BE and UTF-8 with a mark are read
/// too. Anything else is refused with the byte where it goes wrong.
pub fn decode(bytes: &[u8], file: &str) -> Result<String, String> {
    let utf16 = |body: &[u8], endian: &str, unit: fn([u8; 2]) -> u16| {
        if !body.len().is_multiple_of(2) {
            return Err(format!(
                "{file}: UTF-16{endian} (by its byte-order mark) with an odd number of bytes: the file is cut short"
            ));
        }
        let units = body.chunks_exact(2).map(|pair| unit([pair[0], pair[1]]));
        let mut text = String::with_capacity(body.len() / 2);
        // Code units read so far: the byte offset after the two-byte mark.
        let mut read = 0;
        for c in char::decode_utf16(units) {
            match c {
                Ok(c) => {
                    text.push(c);
                    read += c.len_utf16();
                }
                Err(e) => {
                    return Err(format!(
                        "{file}: byte {}: not valid UTF-16{endian} (unpaired surrogate {:#06x})",
                        2 + 2 * read,
                        e.unpaired_surrogate()
                    ));
                }
            }
        }
        Ok(text)
    };
    match bytes {
        [0xFF, 0xFE, body @ ..] => utf16(body, "LE", u16::from_le_bytes),
        [0xFE, 0xFF, body @ ..] => utf16(body, "BE", u16::from_be_bytes),
        [0xEF, 0xBB, 0xBF, body @ ..] => std::str::from_utf8(body)
            .map(str::to_owned)
            .map_err(|e| not_utf8(file, 3 + e.valid_up_to())),
        _ => std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|e| not_utf8(file, e.valid_up_to())),
    }
}

fn not_utf8(file: &str, at: usize) -> String {
    format!(
        "{file}: byte {at}: not UTF-8, and no UTF-16 byte-order mark: expected the output saved by PowerShell (`> file` or `Out-File`: UTF-16 with its mark, or UTF-8)"
    )
}

/// The TOML for every limit in `text`, or what is wrong (with line numbers).
pub fn import(text: &str, file: &str) -> Result<String, String> {
    let limits = parse(text, file)?;
    if limits.is_empty() {
        return Err(format!(
            "{file}: no network limit found: expected `Get-StorageSyncNetworkLimit | Format-List` output with Day, StartHour, EndHour and LimitKbps"
        ));
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Imported from Azure File Sync network limits ({file}).\n\
         # Azure File Sync applies these per server in the server's local time: set time_zone to the\n\
         # branch's zone (the gateway's own zone is used otherwise) and, if they are one branch's,\n\
         # add branches = [\"name\"]. LimitKbps x 1000 / 8 = bytes per second, both directions."
    );
    for (i, limit) in limits.iter().enumerate() {
        let bytes = limit.limit_kbps * 1000 / 8;
        let _ = writeln!(
            out,
            "\n# Day {}, StartHour {}, EndHour {}, LimitKbps {} (line {})\n\
             [[schedule]]\n\
             name = \"afs-{}\"\n\
             days = \"{}\"\n\
             hours = \"{:02}:00-{:02}:00\"\n\
             upload = \"{bytes} B/s\"  # {}\n\
             download = \"{bytes} B/s\"\n\
             applies_to = \"each-branch\"",
            format_days(&limit.days),
            limit.start_hour,
            limit.end_hour,
            limit.limit_kbps,
            limit.line,
            i + 1,
            format_days(&limit.days),
            limit.start_hour,
            limit.end_hour % 24,
            format_rate(bytes),
        );
    }
    Ok(out)
}

fn parse(text: &str, file: &str) -> Result<Vec<AfsLimit>, String> {
    let mut limits = Vec::new();
    let mut current: Option<(AfsLimit, [bool; 4])> = None;
    let finish = |record: Option<(AfsLimit, [bool; 4])>,
                  limits: &mut Vec<AfsLimit>|
     -> Result<(), String> {
        let Some((limit, seen)) = record else {
            return Ok(());
        };
        let missing: Vec<&str> = ["Day", "StartHour", "EndHour", "LimitKbps"]
            .iter()
            .zip(seen)
            .filter(|(_, s)| !s)
            .map(|(k, _)| *k)
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "{file}:{}: the limit starting here has no {}",
                limit.line,
                missing.join(", ")
            ));
        }
        if limit.start_hour == limit.end_hour && limit.start_hour != 0 {
            return Err(format!(
                "{file}:{}: StartHour equals EndHour ({}): expected a window, or 0 and 0 for all day",
                limit.line, limit.start_hour
            ));
        }
        limits.push(limit);
        Ok(())
    };
    for (i, line) in text.lines().enumerate() {
        let number = i + 1;
        let line = line.trim();
        if line.is_empty() {
            finish(current.take(), &mut limits)?;
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        let field = match key {
            "Day" => 0,
            "StartHour" => 1,
            "EndHour" => 2,
            "LimitKbps" => 3,
            _ => continue,
        };
        // A key seen again starts the next record (output without blank lines between).
        if current.as_ref().is_some_and(|(_, seen)| seen[field]) {
            finish(current.take(), &mut limits)?;
        }
        let (limit, seen) = current.get_or_insert_with(|| {
            (
                AfsLimit {
                    line: number,
                    ..AfsLimit::default()
                },
                [false; 4],
            )
        });
        seen[field] = true;
        let bad =
            |expected: &str| format!("{file}:{number}: {key}: {value:?}: expected {expected}");
        match field {
            0 => {
                limit.days =
                    parse_afs_days(value).map_err(|e| format!("{file}:{number}: Day: {e}"))?
            }
            1 | 2 => {
                // EndHour 24 is the end of the day; a start is 0 to 23.
                let last = if field == 1 { 23 } else { 24 };
                let hour: u8 = value
                    .parse()
                    .ok()
                    .filter(|h| *h <= last)
                    .ok_or_else(|| bad(&format!("an hour from 0 to {last}")))?;
                if field == 1 {
                    limit.start_hour = hour;
                } else {
                    limit.end_hour = hour;
                }
            }
            _ => {
                limit.limit_kbps = value
                    .parse::<u64>()
                    .ok()
                    .filter(|k| {
                        k.checked_mul(1000)
                            .is_some_and(|b| (MIN_RATE..=MAX_RATE).contains(&(b / 8)))
                    })
                    .ok_or_else(|| {
                        bad("a whole number of kilobits per second from 8 to 100000000")
                    })?;
            }
        }
    }
    finish(current.take(), &mut limits)?;
    Ok(limits)
}

/// `{Monday, Tuesday}`, `Monday, Tuesday` or `Monday`.
fn parse_afs_days(value: &str) -> Result<[bool; 7], String> {
    let inner = value.trim().trim_start_matches('{').trim_end_matches('}');
    if inner.contains("...") || inner.contains('…') {
        return Err(format!(
            "{value:?} is cut short by PowerShell: run `$FormatEnumerationLimit = -1` before `Get-StorageSyncNetworkLimit | Format-List`"
        ));
    }
    let mut days = [false; 7];
    for name in inner.split(',') {
        let i = day_index(name).ok_or_else(|| {
            format!(
                "{:?}: expected day names such as Monday, Tuesday",
                name.trim().to_ascii_lowercase()
            )
        })?;
        days[i] = true;
    }
    Ok(days)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const CMDLET_OUTPUT: &str = "\r
Id             : 4b8a9c3e-0000-4000-8000-000000000001\r
Day            : {Monday, Tuesday, Wednesday, Thursday, Friday}\r
StartHour      : 9\r
EndHour        : 17\r
LimitKbps      : 10000\r
\r
Id             : 4b8a9c3e-0000-4000-8000-000000000002\r
Day            : {Saturday, Sunday}\r
StartHour      : 0\r
EndHour        : 0\r
LimitKbps      : 50000\r
";

    #[test]
    fn cmdlet_output_becomes_schedules_the_gateway_loads() {
        let toml = import(CMDLET_OUTPUT, "limits.txt").unwrap();
        assert!(toml.contains("days = \"mon-fri\""), "{toml}");
        assert!(toml.contains("hours = \"09:00-17:00\""), "{toml}");
        assert!(toml.contains("upload = \"1250000 B/s\""), "{toml}");
        assert!(toml.contains("days = \"sat,sun\""), "{toml}");
        assert!(toml.contains("hours = \"00:00-00:00\""), "{toml}");
        assert!(toml.contains("download = \"6250000 B/s\""), "{toml}");
        let config = Config::parse(&toml, "imported.toml", crate::config::TEST_NOW).unwrap();
        assert_eq!(config.schedules.len(), 2);
        assert_eq!(config.schedules[0].upload, Some(1_250_000));
        assert_eq!(config.schedules[1].download, Some(6_250_000));
        assert_eq!(config.schedules[0].categories, ["storage", "sync"]);
    }

    #[test]
    fn records_without_blank_lines_and_bare_day_lists_are_read() {
        let text = "Day : Monday\nStartHour : 22\nEndHour : 6\nLimitKbps : 800\nDay : Wednesday, Friday\nStartHour : 1\nEndHour : 2\nLimitKbps : 64\n";
        let toml = import(text, "t").unwrap();
        assert!(toml.contains("hours = \"22:00-06:00\""));
        assert!(toml.contains("days = \"wed,fri\""));
        assert!(toml.contains("upload = \"8000 B/s\""));
        Config::parse(&toml, "t.toml", crate::config::TEST_NOW).unwrap();
    }

    /// `text` as Windows PowerShell 5.1's `>` writes it: UTF-16LE after a byte-order mark.
    fn utf16le(text: &str) -> Vec<u8> {
        let mut bytes = vec![0xFF, 0xFE];
        bytes.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
        bytes
    }

    #[test]
    fn utf16_and_utf8_with_or_without_a_mark_read_alike() {
        let expected = import(CMDLET_OUTPUT, "limits.txt").unwrap();
        let le = utf16le(CMDLET_OUTPUT);
        assert_eq!(&le[..6], b"\xFF\xFE\r\0\n\0", "the bytes PowerShell writes");
        let mut be = vec![0xFE, 0xFF];
        be.extend(CMDLET_OUTPUT.encode_utf16().flat_map(u16::to_be_bytes));
        let mut utf8_bom = b"\xEF\xBB\xBF".to_vec();
        utf8_bom.extend_from_slice(CMDLET_OUTPUT.as_bytes());
        for bytes in [le, be, utf8_bom, CMDLET_OUTPUT.as_bytes().to_vec()] {
            let text = decode(&bytes, "limits.txt").unwrap();
            assert!(!text.starts_with('\u{feff}'));
            assert_eq!(import(&text, "limits.txt").unwrap(), expected);
        }
    }

    #[test]
    fn undecodable_bytes_are_named_with_their_offset() {
        // A lone high surrogate (0xD800) as the second character.
        let e = decode(b"\xFF\xFED\0\x00\xD8a\0", "t").unwrap_err();
        assert_eq!(
            e,
            "t: byte 4: not valid UTF-16LE (unpaired surrogate 0xd800)"
        );
        let e = decode(b"\xFE\xFF\0D\0", "t").unwrap_err();
        assert!(
            e.starts_with("t: UTF-16BE (by its byte-order mark) with an odd number"),
            "{e}"
        );
        // Latin-1 "Montag: é" without a mark.
        let e = decode(b"Day : Montag\xE9\n", "t").unwrap_err();
        assert!(
            e.starts_with("t: byte 12: not UTF-8, and no UTF-16 byte-order mark"),
            "{e}"
        );
        let e = decode(b"\xEF\xBB\xBFDay\xFF", "t").unwrap_err();
        assert!(e.starts_with("t: byte 6: not UTF-8"), "{e}");
    }

    #[test]
    fn bad_input_is_named_with_its_line() {
        let truncated = "Day : {Monday, Tuesday, Wednesday, Thursday...}\nStartHour : 9\nEndHour : 17\nLimitKbps : 100\n";
        let e = import(truncated, "t").unwrap_err();
        assert!(
            e.starts_with("t:1: Day:") && e.contains("$FormatEnumerationLimit"),
            "{e}"
        );
        let e = import("Day : Monday\nStartHour : 9\nLimitKbps : 100\n", "t").unwrap_err();
        assert_eq!(e, "t:1: the limit starting here has no EndHour");
        let e = import("Day : Monday\nStartHour : nine\n", "t").unwrap_err();
        assert!(e.starts_with("t:2: StartHour: \"nine\""), "{e}");
        let e = import("Day : Monday\nStartHour : 24\n", "t").unwrap_err();
        assert!(e.contains("an hour from 0 to 23"), "{e}");
        let e = import("Day : Monday\nLimitKbps : 99999999999999999\n", "t").unwrap_err();
        assert!(e.contains("from 8 to 100000000"), "{e}");
        let e = import("Day : Funday\n", "t").unwrap_err();
        assert!(e.contains("\"funday\""), "{e}");
        assert!(
            import("nothing here", "t")
                .unwrap_err()
                .contains("no network limit")
        );
    }
}
