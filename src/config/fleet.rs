//! `[fleet]`: several replicas share one set of limits through Redis. The Redis URL is checked
//! here (scheme, host, port, database) so a bad one is a config problem with its place, and
//! its password is kept apart from what is ever printed.

use super::problems::Problems;
use super::values::{duration, is_name};
use serde::Deserialize;
use std::fmt;
use std::time::Duration;
use toml::Spanned;

pub const DEFAULT_REFRESH: Duration = Duration::from_millis(250);
pub const DEFAULT_LEASE: Duration = Duration::from_secs(2);
pub const DEFAULT_FALLBACK_SHARE: f64 = 0.34;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFleet {
    pub(super) redis: Spanned<String>,
    pub(super) redis_password_file: Option<Spanned<String>>,
    pub(super) name: Option<Spanned<String>>,
    pub(super) refresh: Option<Spanned<String>>,
    pub(super) lease: Option<Spanned<String>>,
    pub(super) fallback_share: Option<Spanned<f64>>,
}

/// A string never printed: `Debug` and `Display` show `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where Redis is: the URL as given (it may hold a password: use only to connect) and the same
/// URL with any password replaced by `***` (for logs and `check-config`).
#[derive(Clone, Debug)]
pub struct RedisTarget {
    pub url: Secret,
    pub shown: String,
    /// From `redis_password_file`; takes the place of a password in the URL.
    pub password: Option<Secret>,
    pub tls: bool,
}

#[derive(Clone, Debug)]
pub struct FleetSettings {
    pub redis: RedisTarget,
    /// This replica's id among the fleet (default: the host name).
    pub name: String,
    /// How often a replica reports its demand and takes its shares; also every Redis call's
    /// timeout.
    pub refresh: Duration,
    /// How long a share (and a replica's counts) stays valid without a refresh.
    pub lease: Duration,
    /// With Redis unreachable past the lease: this fraction of every limit.
    pub fallback_share: f64,
}

pub(super) fn compile(
    p: &mut Problems<'_>,
    raw: &Spanned<RawFleet>,
    paths: &super::paths::Paths<'_>,
) -> Option<FleetSettings> {
    let raw = raw.get_ref();
    let mut ok = true;
    let password = raw.redis_password_file.as_ref().and_then(|file| {
        let path = paths.resolve(p, file, "fleet.redis_password_file");
        if path.as_os_str().is_empty() {
            // Not expandable: the problem is already listed.
            ok = false;
            return None;
        }
        match std::fs::read_to_string(&path) {
            Ok(text) if !text.trim_end_matches(['\r', '\n']).is_empty() => {
                Some(Secret(text.trim_end_matches(['\r', '\n']).to_owned()))
            }
            Ok(_) => {
                p.add(
                    file.span(),
                    "fleet.redis_password_file",
                    format!("{}: the file is empty", path.display()),
                );
                ok = false;
                None
            }
            Err(e) => {
                p.add(
                    file.span(),
                    "fleet.redis_password_file",
                    format!("cannot read {}: {e}", path.display()),
                );
                ok = false;
                None
            }
        }
    });
    let redis = match check_url(raw.redis.get_ref()) {
        Ok((shown, tls)) => Some(RedisTarget {
            url: Secret(raw.redis.get_ref().clone()),
            shown,
            password,
            tls,
        }),
        Err((offset, message)) => {
            // Point at the bad part inside the string (past its opening quote).
            let span = raw.redis.span();
            let at = (span.start + 1 + offset).min(span.end);
            p.add(at..at, "fleet.redis", message);
            None
        }
    };
    let name = match &raw.name {
        Some(name) if !is_name(name.get_ref()) => {
            p.add(
                name.span(),
                "fleet.name",
                format!(
                    "{:?}: expected letters, digits, '-', '_' or '.'",
                    name.get_ref()
                ),
            );
            ok = false;
            String::new()
        }
        Some(name) => name.get_ref().clone(),
        None => host_name(),
    };
    let refresh = duration(p, raw.refresh.as_ref(), "fleet.refresh", DEFAULT_REFRESH);
    let lease = duration(p, raw.lease.as_ref(), "fleet.lease", DEFAULT_LEASE);
    if lease <= refresh {
        let span = raw
            .lease
            .as_ref()
            .or(raw.refresh.as_ref())
            .map_or(raw.redis.span(), |s| s.span());
        p.add(
            span,
            "fleet.lease",
            format!(
                "the lease ({lease:?}) must be longer than the refresh ({refresh:?}): a share must outlive the interval that renews it"
            ),
        );
        ok = false;
    }
    let fallback_share = match &raw.fallback_share {
        None => DEFAULT_FALLBACK_SHARE,
        Some(x) if *x.get_ref() > 0.0 && *x.get_ref() <= 1.0 => *x.get_ref(),
        Some(x) => {
            p.add(
                x.span(),
                "fleet.fallback_share",
                format!(
                    "{}: expected a fraction above 0 and at most 1 (0.34: a third of each limit)",
                    x.get_ref()
                ),
            );
            ok = false;
            DEFAULT_FALLBACK_SHARE
        }
    };
    let redis = redis?;
    ok.then_some(FleetSettings {
        redis,
        name,
        refresh,
        lease,
        fallback_share,
    })
}

/// `redis[s]://[[user]:password@]host[:port][/db]`: the URL with its password shown as `***`
/// and whether it is TLS; or where (byte offset in the URL) it goes wrong and why.
fn check_url(url: &str) -> Result<(String, bool), (usize, String)> {
    let expected = "expected redis://[:password@]host[:port][/db] or rediss://... (TLS)";
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| (0, format!("{url:?}: {expected}", url = redact(url))))?;
    let tls = match scheme {
        "redis" => false,
        "rediss" => true,
        other => {
            return Err((
                0,
                format!("unknown scheme {other:?}: {expected} (Valkey speaks the same protocol)"),
            ));
        }
    };
    let start = scheme.len() + 3;
    let (authority, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let (userinfo, host_port) = match authority.rfind('@') {
        Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
        None => (None, authority),
    };
    let host_at = start + userinfo.map_or(0, |u| u.len() + 1);
    let (host, port) = if let Some(v6) = host_port.strip_prefix('[') {
        let end = v6
            .find(']')
            .ok_or((host_at, "an IPv6 address needs its closing ']'".to_owned()))?;
        (&host_port[..end + 2], &v6[end + 1..])
    } else {
        match host_port.rfind(':') {
            Some(i) => (&host_port[..i], &host_port[i..]),
            None => (host_port, ""),
        }
    };
    if host.is_empty() {
        return Err((host_at, format!("no host: {expected}")));
    }
    if let Some(port) = port.strip_prefix(':')
        && port.parse::<u16>().ok().filter(|&p| p != 0).is_none()
    {
        return Err((
            host_at + host.len() + 1,
            format!("{port:?}: expected a port from 1 to 65535"),
        ));
    } else if !port.is_empty() && !port.starts_with(':') {
        return Err((
            host_at + host.len(),
            format!("unexpected {port:?} after the host"),
        ));
    }
    let path_at = start + authority.len();
    let db = path.split('?').next().unwrap_or("").trim_start_matches('/');
    if !db.is_empty() && db.parse::<u32>().is_err() {
        return Err((
            path_at + 1,
            format!("{db:?}: expected a database number such as /0"),
        ));
    }
    if path.contains('?') {
        return Err((
            path_at + path.find('?').unwrap_or(0),
            "query parameters are not supported: put the password in redis_password_file"
                .to_owned(),
        ));
    }
    redis::IntoConnectionInfo::into_connection_info(url)
        .map_err(|e| (0, format!("{}: {e}", redact(url))))?;
    Ok((redact(url), tls))
}

/// The URL with the password of its user part shown as `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        None => url.to_owned(),
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            let hidden = if rest[..at].contains(':') {
                format!("{user}:***")
            } else {
                "***".to_owned()
            };
            format!("{scheme}://{hidden}{}", &rest[at..])
        }
    }
}

/// This host's name (Linux: the kernel's; elsewhere the environment's), or "portcullis".
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|n| n.trim().to_owned())
        .filter(|n| is_name(n))
        .unwrap_or_else(|| "portcullis".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_urls_are_checked_and_passwords_never_shown() {
        assert_eq!(
            check_url("redis://127.0.0.1:6379/0"),
            Ok(("redis://127.0.0.1:6379/0".into(), false))
        );
        assert_eq!(
            check_url("rediss://:s3cret@redis.example:6380"),
            Ok(("rediss://:***@redis.example:6380".into(), true))
        );
        assert_eq!(redact("redis://gw:s3cret@host/1"), "redis://gw:***@host/1");
        assert_eq!(redact("redis://s3cret@host"), "redis://***@host");
        let bad = |url: &str| check_url(url).unwrap_err();
        assert_eq!(bad("http://host").0, 0);
        assert_eq!(bad("redis://host:99999").0, "redis://host:".len());
        assert_eq!(bad("redis://host/x").0, "redis://host/".len());
        assert_eq!(bad("redis://:pw@").0, "redis://:pw@".len());
        assert!(!bad("redis://:pw@:1").1.contains("pw"));
    }

    #[test]
    fn fleet_problems_name_their_place_and_without_fleet_there_is_none() {
        use crate::config::{Config, TEST_NOW};
        let source = "[fleet]\nredis = \"redis://h:0\"\nrefresh = \"1s\"\nlease = \"500ms\"\nfallback_share = 1.5\n";
        let problems = Config::parse(source, "f.toml", TEST_NOW)
            .unwrap_err()
            .to_string();
        let lines: Vec<&str> = problems.lines().collect();
        assert_eq!(lines.len(), 3, "{problems}");
        assert!(
            lines[0].starts_with("f.toml:2:20: fleet.redis: \"0\""),
            "{problems}"
        );
        assert!(
            lines[1].starts_with("f.toml:4:9: fleet.lease:"),
            "{problems}"
        );
        assert!(
            lines[2].starts_with("f.toml:5:18: fleet.fallback_share:"),
            "{problems}"
        );
        let config =
            Config::parse("[fleet]\nredis = \"redis://:pw@h\"\n", "f.toml", TEST_NOW).unwrap();
        let fleet = config.fleet.unwrap();
        assert_eq!(fleet.redis.shown, "redis://:***@h");
        assert!(!format!("{fleet:?}").contains("pw@"));
        assert_eq!(
            (fleet.refresh, fleet.lease),
            (DEFAULT_REFRESH, DEFAULT_LEASE)
        );
        assert!(
            Config::parse("", "f.toml", TEST_NOW)
                .unwrap()
                .fleet
                .is_none()
        );
        let unreadable = Config::parse(
            "[fleet]\nredis = \"redis://h\"\nredis_password_file = \"/nonexistent/pw\"\n",
            "f.toml",
            TEST_NOW,
        )
        .unwrap_err()
        .to_string();
        assert!(
            unreadable
                .starts_with("f.toml:3:23: fleet.redis_password_file: cannot read /nonexistent/pw"),
            "{unreadable}"
        );
        let missing = Config::parse("[fleet]\nname = \"a\"\n", "f.toml", TEST_NOW).unwrap_err();
        assert!(missing.to_string().contains("redis"), "{missing}");
    }
}
