//! `portcullis learn --from-log FILE...`: reads the gateway's own JSON access lines and sums,
//! per branch and rule, the destinations its tunnels reached; [`proposal`] turns that into
//! pinned `[[policy.allow]]` rules. The whole report is TOML (the listing as comments), so it
//! can be appended to the config file as it stands.

mod proposal;

use crate::config::Config;
use jiff::Timestamp;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;

/// The access line's tracing target, as the JSON's `target` field spells it.
const ACCESS_TARGET: &str = crate::access_log::TARGET;

/// One destination's use: tunnels, bytes both ways, and when the first and last were logged.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Usage {
    pub tunnels: u64,
    pub bytes: u64,
    pub first: Option<Timestamp>,
    pub last: Option<Timestamp>,
}

/// What one branch's tunnels used under one rule: `(host, port)` -> use.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RuleUse {
    pub category: String,
    pub destinations: BTreeMap<(String, u16), Usage>,
}

/// Everything the logs say: branch -> rule name -> use, both sorted.
#[derive(Debug, Default)]
pub struct Learned {
    pub branches: BTreeMap<String, BTreeMap<String, RuleUse>>,
}

/// What one file held: access lines read (counted or not) and JSON lines skipped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileSummary {
    pub access_lines: u64,
    pub counted: u64,
    pub skipped: u64,
}

/// The fields of an access line this command reads; the rest are ignored.
#[derive(Debug, serde::Deserialize)]
struct AccessLine {
    timestamp: Option<String>,
    branch: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    verdict: Option<String>,
    rule: Option<String>,
    category: Option<String>,
    #[serde(default)]
    status: u16,
    #[serde(default)]
    bytes_up: u64,
    #[serde(default)]
    bytes_down: u64,
}

/// One line of a log file, as this command sees it.
#[derive(Debug)]
enum Line {
    /// Not JSON (a text log line, a blank line), or another event of the gateway's (`listening`).
    Other,
    /// JSON, but not an access line this command can read (no target, fields of the wrong type).
    Malformed,
    Access(AccessLine, Option<Timestamp>),
}

fn classify(text: &str) -> Line {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
        return Line::Other;
    };
    match value.get("target").and_then(|t| t.as_str()) {
        Some(ACCESS_TARGET) => {}
        Some(_) => return Line::Other,
        None => return Line::Malformed,
    }
    let Ok(line) = serde_json::from_value::<AccessLine>(value) else {
        return Line::Malformed;
    };
    let at = match line.timestamp.as_deref().map(str::parse::<Timestamp>) {
        None => None,
        Some(Ok(at)) => Some(at),
        Some(Err(_)) => return Line::Malformed,
    };
    Line::Access(line, at)
}

impl Learned {
    /// Reads `path` line by line (logs can be large); an unreadable file names itself.
    pub fn read_file(&mut self, path: &Path) -> Result<FileSummary, String> {
        let name = path.display();
        let file = std::fs::File::open(path).map_err(|e| format!("{name}: cannot read: {e}"))?;
        self.read(std::io::BufReader::new(file))
            .map_err(|e| format!("{name}: cannot read: {e}"))
    }

    /// Reads access lines from `reader`; bytes that are not UTF-8 make a line `Other`.
    pub fn read(&mut self, mut reader: impl BufRead) -> std::io::Result<FileSummary> {
        let mut summary = FileSummary::default();
        let mut bytes = Vec::new();
        loop {
            bytes.clear();
            if reader.read_until(b'\n', &mut bytes)? == 0 {
                return Ok(summary);
            }
            match classify(String::from_utf8_lossy(&bytes).trim()) {
                Line::Other => {}
                Line::Malformed => summary.skipped += 1,
                Line::Access(line, at) => {
                    summary.access_lines += 1;
                    if self.add(line, at) {
                        summary.counted += 1;
                    }
                }
            }
        }
    }

    /// Counts a tunnel the policy allowed and the gateway served: verdict `allow` with a rule,
    /// and a 2xx or 3xx status (for CONNECT, 200: the tunnel was set up; a plain-HTTP lane
    /// reply otherwise). A denial, a `would_deny` (report mode: no rule allowed it) or a
    /// failed dial (a name that may not even exist) teaches nothing worth pinning.
    fn add(&mut self, line: AccessLine, at: Option<Timestamp>) -> bool {
        let (Some("allow"), Some(rule), Some(host), Some(port)) =
            (line.verdict.as_deref(), line.rule, line.host, line.port)
        else {
            return false;
        };
        if !(200..400).contains(&line.status) {
            return false;
        }
        let branch = line
            .branch
            .unwrap_or_else(|| crate::config::UNASSIGNED.to_owned());
        let rule_use = self
            .branches
            .entry(branch)
            .or_default()
            .entry(rule)
            .or_default();
        if rule_use.category.is_empty() {
            rule_use.category = line.category.unwrap_or_default();
        }
        let usage = rule_use.destinations.entry((host, port)).or_default();
        usage.tunnels += 1;
        usage.bytes = usage
            .bytes
            .saturating_add(line.bytes_up)
            .saturating_add(line.bytes_down);
        if let Some(at) = at {
            usage.first = Some(usage.first.map_or(at, |f| f.min(at)));
            usage.last = Some(usage.last.map_or(at, |l| l.max(at)));
        }
        true
    }
}

/// The listing (as TOML comments), then the proposal, judged against `config`'s rules.
pub fn report(learned: &Learned, config: &Config) -> String {
    let mut out = listing(learned);
    out.push('\n');
    out.push_str(&proposal::proposal(learned, config));
    out
}

/// Per branch, per rule: every host:port with its tunnels, bytes, first and last time.
fn listing(learned: &Learned) -> String {
    let mut out = String::from(
        "# Tunnels in the access logs, per branch and rule: host:port, tunnels, bytes (up and down), first and last\n",
    );
    if learned.branches.is_empty() {
        out.push_str("# (none: no allowed tunnel in these logs)\n");
        return out;
    }
    let width = learned
        .branches
        .values()
        .flat_map(|rules| rules.values())
        .flat_map(|r| r.destinations.keys())
        .map(|(host, port)| host.len() + 1 + port.to_string().len())
        .max()
        .unwrap_or(0);
    for (branch, rules) in &learned.branches {
        out.push_str(&format!("#\n# branch {branch}\n"));
        for (rule, rule_use) in rules {
            out.push_str(&format!("#   rule {rule} ({})\n", rule_use.category));
            for ((host, port), usage) in &rule_use.destinations {
                let target = format!("{host}:{port}");
                let plural = if usage.tunnels == 1 { "" } else { "s" };
                let mut line = format!(
                    "#     {target:<width$}  {:>6} tunnel{plural:<1}  {:>10}",
                    usage.tunnels,
                    format_bytes(usage.bytes)
                );
                if let (Some(first), Some(last)) = (usage.first, usage.last) {
                    line.push_str(&format!("  {} .. {}", seconds(first), seconds(last)));
                }
                out.push_str(line.trim_end());
                out.push('\n');
            }
        }
    }
    out
}

/// RFC 3339 to the second, UTC.
fn seconds(at: Timestamp) -> String {
    at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// `512 B`, `1.5 KiB`, `1.2 GiB`: binary units, one decimal above bytes.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1023.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONDON_ACCT1: &str = r#"{"timestamp":"2026-11-23T09:00:01.5Z","level":"INFO","message":"request","target":"portcullis::access","conn_id":1,"client":"127.0.0.2:50000","branch":"london","host":"acct1.file.core.windows.net","port":443,"verdict":"allow","rule":"azure-file-sync/storage","category":"storage","reason":"allowed","status":200,"bytes_up":1000,"bytes_down":24,"duration_ms":3,"end":"client_closed"}"#;

    fn read(text: &str) -> (Learned, FileSummary) {
        let mut learned = Learned::default();
        let summary = learned.read(text.as_bytes()).unwrap();
        (learned, summary)
    }

    #[test]
    fn bytes_are_shown_in_binary_units() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1024), "1.0 KiB");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(1_288_490_189), "1.2 GiB");
        assert_eq!(format_bytes(1024 * 1024 - 1), "1.0 MiB");
        assert_eq!(format_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn text_lines_blank_lines_and_other_events_are_skipped_silently() {
        let text = format!(
            "2026-11-23T09:00:00Z  INFO portcullis: listening address=127.0.0.1:3128\n\n\
             {{\"timestamp\":\"2026-11-23T09:00:00Z\",\"level\":\"INFO\",\"message\":\"listening\",\"target\":\"portcullis::server\",\"kind\":\"plain\"}}\n\
             \u{fffd}\x01 not json\n{LONDON_ACCT1}\n"
        );
        let (learned, summary) = read(&text);
        assert_eq!(
            summary,
            FileSummary {
                access_lines: 1,
                counted: 1,
                skipped: 0
            }
        );
        let storage = &learned.branches["london"]["azure-file-sync/storage"];
        assert_eq!(storage.category, "storage");
        let usage = &storage.destinations[&("acct1.file.core.windows.net".to_owned(), 443)];
        assert_eq!((usage.tunnels, usage.bytes), (1, 1024));
        assert_eq!(usage.first, "2026-11-23T09:00:01.5Z".parse().ok());
    }

    #[test]
    fn json_that_is_not_a_readable_access_line_is_counted_as_skipped() {
        let wrong_port = LONDON_ACCT1.replace("\"port\":443", "\"port\":\"443\"");
        let bad_time = LONDON_ACCT1.replace("2026-11-23T09:00:01.5Z", "yesterday");
        let text = format!("{{\"message\":\"request\"}}\n[1, 2]\n{wrong_port}\n{bad_time}\n");
        let (learned, summary) = read(&text);
        assert_eq!(summary.skipped, 4);
        assert_eq!(summary.access_lines, 0);
        assert!(learned.branches.is_empty());
    }

    #[test]
    fn only_allowed_and_served_tunnels_are_counted() {
        let denied = LONDON_ACCT1
            .replace("\"verdict\":\"allow\"", "\"verdict\":\"deny\"")
            .replace("\"status\":200", "\"status\":403")
            .replace("acct1", "evil");
        let would_deny = r#"{"target":"portcullis::access","branch":"london","host":"example.com","port":443,"verdict":"would_deny","reason":"host not allowed","status":200}"#;
        let dial_failed = LONDON_ACCT1
            .replace("\"status\":200", "\"status\":502")
            .replace("acct1", "typo");
        let refused_client = r#"{"target":"portcullis::access","client":"10.9.9.9:1","reason":"client matches no branch","status":403,"end":"client_refused"}"#;
        let text = [
            LONDON_ACCT1,
            &denied,
            would_deny,
            &dial_failed,
            refused_client,
            LONDON_ACCT1,
        ]
        .join("\n");
        let (learned, summary) = read(&text);
        assert_eq!(
            summary,
            FileSummary {
                access_lines: 6,
                counted: 2,
                skipped: 0
            }
        );
        let rules = &learned.branches["london"];
        assert_eq!(rules.len(), 1);
        let destinations = &rules["azure-file-sync/storage"].destinations;
        assert_eq!(destinations.len(), 1, "{destinations:?}");
        assert_eq!(destinations.values().next().unwrap().tunnels, 2);
    }

    #[test]
    fn the_listing_shows_each_destination_with_tunnels_bytes_and_times() {
        let later = LONDON_ACCT1.replace("09:00:01.5Z", "10:30:00Z");
        let (learned, _) = read(&format!("{LONDON_ACCT1}\n{later}\n"));
        assert_eq!(
            listing(&learned).lines().skip(2).collect::<Vec<_>>(),
            [
                "# branch london",
                "#   rule azure-file-sync/storage (storage)",
                "#     acct1.file.core.windows.net:443       2 tunnels     2.0 KiB  2026-11-23T09:00:01Z .. 2026-11-23T10:30:00Z",
            ]
        );
    }
}
