//! `portcullis tunnels`, `close` and `branch`: the admin listener's live view and control from
//! the command line, as tables (or its JSON). `top` draws the same rows ([`super::top`]).

use crate::admin_http::percent_encode;
use serde_json::Value;
use std::net::SocketAddr;

/// `GET` or `POST` `path` on the admin listener: the answer's JSON, or why there is none.
pub fn ask(admin: SocketAddr, method: &str, path: &str) -> Result<Value, String> {
    let (status, body) =
        crate::process::http_request(admin, method, path).map_err(|e| format!("{admin}: {e}"))?;
    if !(200..300).contains(&status) {
        return Err(format!("{admin}: {status}: {}", body.trim_end()));
    }
    serde_json::from_str(&body).map_err(|e| format!("{admin}: not JSON: {e}"))
}

/// Query parameters `key=value` joined with `&` (values percent-encoded), for the pairs given.
pub fn query(pairs: &[(&str, Option<String>)]) -> String {
    pairs
        .iter()
        .filter_map(|(key, value)| {
            value
                .as_ref()
                .map(|v| format!("{key}={}", percent_encode(v)))
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// `1.2 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Bytes per second as bits: `8.0 Mbit/s`.
pub fn rate(bytes_per_second: u64) -> String {
    let bits = bytes_per_second as f64 * 8.0;
    match bits {
        b if b >= 1e9 => format!("{:.1} Gbit/s", b / 1e9),
        b if b >= 1e6 => format!("{:.1} Mbit/s", b / 1e6),
        b if b >= 1e3 => format!("{:.1} kbit/s", b / 1e3),
        b => format!("{b:.0} bit/s"),
    }
}

/// `3h02m`, `4m10s`, `12s`.
pub fn age(seconds: u64) -> String {
    match seconds {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// A rate against its limit: `2.0 Mbit/s / 8.0 Mbit/s`, or the rate alone.
pub fn against(rate_now: &Value, limit: &Value) -> String {
    let now = rate(rate_now.as_u64().unwrap_or(0));
    match limit.as_u64() {
        Some(limit) => format!("{now} / {}", rate(limit)),
        None => now,
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The columns of the tunnels table, one row per tunnel.
pub fn tunnel_rows(listing: &Value) -> Vec<[String; 8]> {
    let empty = Vec::new();
    let tunnels = listing["tunnels"].as_array().unwrap_or(&empty);
    tunnels
        .iter()
        .map(|t| {
            [
                text(&t["id"]),
                text(&t["branch"]),
                text(&t["target"]),
                rate(t["rate_up"].as_u64().unwrap_or(0)),
                rate(t["rate_down"].as_u64().unwrap_or(0)),
                format!(
                    "{}/{}",
                    bytes(t["bytes_up"].as_u64().unwrap_or(0)),
                    bytes(t["bytes_down"].as_u64().unwrap_or(0))
                ),
                age(t["age_s"].as_u64().unwrap_or(0)),
                text(&t["state"]),
            ]
        })
        .collect()
}

pub const TUNNEL_HEADER: [&str; 8] = [
    "ID",
    "BRANCH",
    "TARGET",
    "UP",
    "DOWN",
    "BYTES UP/DOWN",
    "AGE",
    "STATE",
];

/// The columns of the branches table.
pub fn branch_rows(listing: &Value) -> Vec<[String; 5]> {
    let empty = Vec::new();
    let branches = listing["branches"].as_array().unwrap_or(&empty);
    branches
        .iter()
        .map(|b| {
            let tunnels = match b["max_tunnels"].as_u64() {
                Some(max) => format!("{}/{max}", text(&b["tunnels"])),
                None => text(&b["tunnels"]),
            };
            [
                text(&b["branch"]),
                tunnels,
                against(&b["rate_up"], &b["limit_up"]),
                against(&b["rate_down"], &b["limit_down"]),
                text(&b["hold"]),
            ]
        })
        .collect()
}

pub const BRANCH_HEADER: [&str; 5] = ["BRANCH", "TUNNELS", "UP / LIMIT", "DOWN / LIMIT", "HOLD"];

/// Rows under a header, columns padded to their widest cell.
pub fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        padded.join("  ").trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_read_as_an_operator_reads_them() {
        assert_eq!(bytes(1000), "1000 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(rate(1_000_000), "8.0 Mbit/s");
        assert_eq!(rate(10), "80 bit/s");
        assert_eq!(age(3725), "1h02m");
        assert_eq!(age(61), "1m01s");
        assert_eq!(
            table(["A", "BB"], &[["long".into(), "x".into()]]),
            "A     BB\nlong  x\n"
        );
        assert_eq!(
            query(&[("branch", Some("a b".into())), ("host", None)]),
            "branch=a%20b"
        );
    }
}
