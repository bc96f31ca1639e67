//! Which open tunnels an operator means: by id, branch, host pattern, rule, age and rate,
//! sorted and limited. The admin API and the command line read it from the same query
//! parameters (`id`, `branch`, `host`, `rule`, `min_age`, `min_rate`, `sort`, `limit`).

use super::Tunnel;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Listed at most, unless `limit` says otherwise (a close without `limit` takes every tunnel
/// the filter selects).
pub const DEFAULT_LIMIT: usize = 1000;
/// The largest `limit` taken: an answer stays a few megabytes.
pub const MAX_LIMIT: usize = 10_000;
/// The most tunnel ids one filter names.
pub const MAX_IDS: usize = 1000;
/// The longest host pattern (a DNS name is at most 253 characters).
pub const MAX_HOST_PATTERN: usize = 253;

/// What a listing sorts by (largest first; `age`: oldest first).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Sort {
    #[default]
    Rate,
    Bytes,
    Age,
}

/// A selection of open tunnels; empty selects every tunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    /// Sorted, without repeats.
    pub ids: Vec<u64>,
    pub branch: Option<String>,
    /// A host pattern: exact, or with `*` for any run of characters (`*.file.core.windows.net`).
    pub host: Option<String>,
    pub rule: Option<String>,
    pub min_age: Option<Duration>,
    /// Bytes per second, both ways together.
    pub min_rate: Option<u64>,
    pub sort: Sort,
    /// At most this many, the first by `sort`; `None`: a listing shows [`DEFAULT_LIMIT`], a
    /// close takes all.
    pub limit: Option<usize>,
}

impl Default for Filter {
    fn default() -> Self {
        Self {
            ids: Vec::new(),
            branch: None,
            host: None,
            rule: None,
            min_age: None,
            min_rate: None,
            sort: Sort::Rate,
            limit: None,
        }
    }
}

/// The query parameters a filter reads, for error messages and the docs.
pub const PARAMETERS: &str = "id, branch, host, rule, min_age, min_rate, sort, limit";

impl Filter {
    /// A filter from query parameters (`param(name)` gives a value, percent-decoded). Unknown
    /// parameters are the caller's business; a bad value is an error naming it.
    pub fn from_params(param: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let mut filter = Filter::default();
        if let Some(ids) = param("id") {
            for id in ids.split(',').filter(|s| !s.is_empty()) {
                let id = id
                    .trim()
                    .parse()
                    .map_err(|_| format!("id={id:?}: expected tunnel ids such as 12 or 12,15"))?;
                filter.ids.push(id);
                if filter.ids.len() > MAX_IDS {
                    return Err(format!("id: expected at most {MAX_IDS} tunnel ids"));
                }
            }
            filter.ids.sort_unstable();
            filter.ids.dedup();
        }
        filter.branch = param("branch").filter(|b| !b.is_empty());
        filter.host = param("host")
            .filter(|h| !h.is_empty())
            .map(|h| h.to_ascii_lowercase());
        if filter
            .host
            .as_ref()
            .is_some_and(|h| h.len() > MAX_HOST_PATTERN)
        {
            return Err(format!(
                "host: expected a pattern of at most {MAX_HOST_PATTERN} characters"
            ));
        }
        filter.rule = param("rule").filter(|r| !r.is_empty());
        if let Some(age) = param("min_age") {
            filter.min_age = Some(
                crate::config::values::parse_duration(&age).map_err(|e| format!("min_age={e}"))?,
            );
        }
        if let Some(rate) = param("min_rate") {
            filter.min_rate = Some(parse_rate(&rate).map_err(|e| format!("min_rate={e}"))?);
        }
        if let Some(sort) = param("sort") {
            filter.sort = match sort.as_str() {
                "rate" => Sort::Rate,
                "bytes" => Sort::Bytes,
                "age" => Sort::Age,
                _ => return Err(format!("sort={sort:?}: expected rate, bytes or age")),
            };
        }
        if let Some(limit) = param("limit") {
            filter.limit = Some(limit.parse().ok().filter(|&n| n <= MAX_LIMIT).ok_or_else(
                || format!("limit={limit:?}: expected a number of tunnels up to {MAX_LIMIT}"),
            )?);
        }
        Ok(filter)
    }

    /// Whether the filter names anything beyond sort and limit (a close needs it to).
    pub fn selects(&self) -> bool {
        !self.ids.is_empty()
            || self.branch.is_some()
            || self.host.is_some()
            || self.rule.is_some()
            || self.min_age.is_some()
            || self.min_rate.is_some()
    }

    /// Why this filter cannot be sent to every replica, if it cannot: tunnel ids are each
    /// replica's own (42 here is another tunnel there), and a limit would apply on each.
    pub fn not_fleet_wide(&self) -> Option<&'static str> {
        if !self.ids.is_empty() {
            Some(
                "tunnel ids are each replica's own: close by id without fleet=true, on the replica that lists it",
            )
        } else if self.limit.is_some() {
            Some("a limit would apply on each replica: close fleet-wide without limit")
        } else {
            None
        }
    }

    /// The filter as query parameters (the command line sends it; audit lines show it).
    pub fn to_query(&self) -> String {
        use crate::admin_http::percent_encode;
        let mut parts = Vec::new();
        if !self.ids.is_empty() {
            let ids: Vec<String> = self.ids.iter().map(u64::to_string).collect();
            parts.push(format!("id={}", ids.join(",")));
        }
        for (key, value) in [
            ("branch", &self.branch),
            ("host", &self.host),
            ("rule", &self.rule),
        ] {
            if let Some(value) = value {
                parts.push(format!("{key}={}", percent_encode(value)));
            }
        }
        if let Some(age) = self.min_age {
            parts.push(format!("min_age={}ms", age.as_millis()));
        }
        if let Some(rate) = self.min_rate {
            parts.push(format!("min_rate={rate}"));
        }
        parts.join("&")
    }

    /// The tests that do not need a rate (the cheap ones, first).
    pub(super) fn holds_fixed(&self, t: &Tunnel, now: Instant) -> bool {
        (self.ids.is_empty() || self.ids.binary_search(&t.id).is_ok())
            && self.branch.as_ref().is_none_or(|b| **b == *t.branch)
            && self
                .rule
                .as_ref()
                .is_none_or(|r| t.rule.as_deref() == Some(r.as_str()))
            && self.min_age.is_none_or(|min| t.age(now) >= min)
            && self.host.as_ref().is_none_or(|p| glob(p, t.host()))
    }

    pub(super) fn sort(&self, chosen: &mut [(Arc<Tunnel>, (u64, u64))], now: Instant) {
        match self.sort {
            Sort::Rate => chosen.sort_by_key(|(_, (up, down))| std::cmp::Reverse(up + down)),
            Sort::Bytes => chosen.sort_by_key(|(t, _)| {
                let (up, down) = t.live.bytes();
                std::cmp::Reverse(up + down)
            }),
            Sort::Age => chosen.sort_by_key(|(t, _)| std::cmp::Reverse(t.age(now))),
        }
    }
}

/// Bytes per second: a plain number, or a rate with its unit (`1 Mbit/s`, `500 kB/s`).
fn parse_rate(text: &str) -> Result<u64, String> {
    match text.trim().parse::<u64>() {
        Ok(bytes) => Ok(bytes),
        Err(_) => crate::bandwidth::units::parse_rate(text),
    }
}

/// `pattern` (lowercase; `*` matches any run of characters) against `host`, case-insensitively.
fn glob(pattern: &str, host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == host;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !host.starts_with(first) || host.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &host[first.len()..host.len() - last.len()];
    if !host.ends_with(last) {
        return false;
    }
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns() {
        assert!(glob(
            "*.file.core.windows.net",
            "acct.file.core.windows.net"
        ));
        assert!(!glob("*.file.core.windows.net", "file.core.windows.net"));
        assert!(glob("a.example", "A.example"));
        assert!(glob("*", "anything"));
        assert!(glob("acct*.blob.*", "acct7.blob.core.windows.net"));
        assert!(!glob("acct*.blob.*", "other.blob.core.windows.net"));
        assert!(!glob("ab*ba", "aba"));
    }

    #[test]
    fn parameters_parse_and_bad_ones_are_named() {
        let params = |q: &'static str| {
            move |name: &str| {
                q.split('&').find_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    (k == name).then(|| v.to_owned())
                })
            }
        };
        let f = Filter::from_params(params(
            "branch=london&host=*.example&min_age=30s&min_rate=1000&sort=age&limit=5&id=3,4",
        ))
        .unwrap();
        assert_eq!(f.branch.as_deref(), Some("london"));
        assert_eq!(f.min_age, Some(Duration::from_secs(30)));
        assert_eq!(f.min_rate, Some(1000));
        assert_eq!(
            (f.sort, f.limit, f.ids.clone()),
            (Sort::Age, Some(5), vec![3, 4])
        );
        assert!(f.selects());
        assert!(!Filter::default().selects());
        let back = Filter::from_params(params(Box::leak(f.to_query().into_boxed_str()))).unwrap();
        assert_eq!((back.branch, back.ids), (f.branch, f.ids));
        for bad in [
            "sort=size",
            "min_age=soon",
            "limit=-1",
            "id=x",
            "min_rate=fast",
            "limit=10001",
        ] {
            let name = bad.split('=').next().unwrap();
            let err = Filter::from_params(params(bad)).unwrap_err();
            assert!(err.starts_with(name), "{bad}: {err}");
        }
        let many = (0..=MAX_IDS)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let err = Filter::from_params(|name| (name == "id").then(|| many.clone())).unwrap_err();
        assert!(err.starts_with("id: expected at most"), "{err}");
        let long = "a".repeat(MAX_HOST_PATTERN + 1);
        let err = Filter::from_params(|name| (name == "host").then(|| long.clone())).unwrap_err();
        assert!(err.starts_with("host:"), "{err}");
        let ids = Filter::from_params(params("id=9,3,9")).unwrap();
        assert_eq!(ids.ids, vec![3, 9]);
        assert!(ids.not_fleet_wide().is_some());
        assert!(
            Filter::from_params(params("branch=x&limit=2"))
                .unwrap()
                .not_fleet_wide()
                .is_some()
        );
        assert!(
            Filter::from_params(params("branch=x"))
                .unwrap()
                .not_fleet_wide()
                .is_none()
        );
        assert_eq!(
            Filter::from_params(params("min_rate=8 Mbit/s"))
                .unwrap()
                .min_rate,
            Some(1_000_000)
        );
    }
}
