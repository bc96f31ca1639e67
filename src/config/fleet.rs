//! `[fleet]`: several replicas share one set of limits through Redis: one endpoint, a Redis
//! Cluster or a Sentinel set. Where Redis is gets checked here ([`super::redis`]: scheme,
//! hosts, ports, database, which keys go together) so a bad one is a config problem with its
//! place, and every password is kept apart from what is ever printed.

use super::problems::Problems;
use super::values::{duration, is_name};
use serde::Deserialize;
use std::time::Duration;
use toml::Spanned;

pub const DEFAULT_REFRESH: Duration = Duration::from_millis(250);
pub const DEFAULT_LEASE: Duration = Duration::from_secs(2);
pub const DEFAULT_FALLBACK_SHARE: f64 = 0.34;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFleet {
    pub(super) redis: Option<Spanned<String>>,
    pub(super) sentinel: Option<Spanned<RawSentinel>>,
    pub(super) user: Option<Spanned<String>>,
    pub(super) redis_password_file: Option<Spanned<String>>,
    pub(super) name: Option<Spanned<String>>,
    pub(super) refresh: Option<Spanned<String>>,
    pub(super) lease: Option<Spanned<String>>,
    pub(super) fallback_share: Option<Spanned<f64>>,
}

/// `sentinel = { master = "portcullis", nodes = ["redis://s1:26379", ...] }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSentinel {
    pub(super) master: Spanned<String>,
    pub(super) nodes: Spanned<Vec<Spanned<String>>>,
    pub(super) password_file: Option<Spanned<String>>,
}

pub use super::redis::{Secret, Topology, redact};

/// Where Redis is: the URL as given (it may hold a password: use only to connect; empty with
/// Sentinel) and what is shown of it (passwords as `***`, for logs and `check-config`).
#[derive(Clone, Debug, PartialEq)]
pub struct RedisTarget {
    pub url: Secret,
    pub shown: String,
    /// The ACL user name on the Redis nodes (`fleet.user`); otherwise the URL's, if any.
    pub user: Option<String>,
    /// From `redis_password_file`; takes the place of a password in the URL.
    pub password: Option<Secret>,
    pub tls: bool,
    pub topology: Topology,
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
    let at = raw.span();
    let raw = raw.get_ref();
    let mut ok = true;
    let password = secret_file(
        p,
        paths,
        raw.redis_password_file.as_ref(),
        "fleet.redis_password_file",
        &mut ok,
    );
    let redis = target(p, raw, at.clone(), paths, password, &mut ok);
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
            .map_or(at.clone(), |s| s.span());
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

/// A secret's file (its first line), read at load; `None` without one. A problem marks `ok`
/// false.
fn secret_file(
    p: &mut Problems<'_>,
    paths: &super::paths::Paths<'_>,
    file: Option<&Spanned<String>>,
    key: &str,
    ok: &mut bool,
) -> Option<Secret> {
    let file = file?;
    let path = paths.resolve(p, file, key);
    if path.as_os_str().is_empty() {
        // Not expandable: the problem is already listed.
        *ok = false;
        return None;
    }
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim_end_matches(['\r', '\n']).is_empty() => {
            Some(Secret(text.trim_end_matches(['\r', '\n']).to_owned()))
        }
        Ok(_) => {
            p.add(
                file.span(),
                key,
                format!("{}: the file is empty", path.display()),
            );
            *ok = false;
            None
        }
        Err(e) => {
            p.add(
                file.span(),
                key,
                format!("cannot read {}: {e}", path.display()),
            );
            *ok = false;
            None
        }
    }
}

/// A problem at `offset` bytes into a string value (past its opening quote).
fn inside(
    p: &mut Problems<'_>,
    value: &Spanned<String>,
    key: &str,
    (offset, message): (usize, String),
) {
    let span = value.span();
    let at = (span.start + 1 + offset).min(span.end);
    p.add(at..at, key, message);
}

/// The ACL user name of `fleet.user`, checked.
fn user(p: &mut Problems<'_>, raw: &RawFleet, ok: &mut bool) -> Option<String> {
    let user = raw.user.as_ref()?;
    let name = user.get_ref();
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        p.add(
            user.span(),
            "fleet.user",
            format!("{name:?}: expected an ACL user name (no spaces)"),
        );
        *ok = false;
        return None;
    }
    Some(name.clone())
}

/// Where Redis is: `redis` (one endpoint or a cluster) or `sentinel`, exactly one of them,
/// with `user` and the password file for the Redis nodes in every mode.
fn target(
    p: &mut Problems<'_>,
    raw: &RawFleet,
    at: std::ops::Range<usize>,
    paths: &super::paths::Paths<'_>,
    password: Option<Secret>,
    ok: &mut bool,
) -> Option<RedisTarget> {
    let user = user(p, raw, ok);
    match (&raw.redis, &raw.sentinel) {
        (Some(_), Some(sentinel)) => {
            p.add(
                sentinel.span(),
                "fleet.sentinel",
                "fleet.redis and fleet.sentinel both say where Redis is: keep redis for one endpoint or a cluster (redis+cluster://), sentinel for a Sentinel set",
            );
            None
        }
        (None, None) => {
            p.add(
                at,
                "fleet.redis",
                "missing: fleet.redis (redis://host:6379, or redis+cluster://h1:6379,h2:6379 for a Redis Cluster) or fleet.sentinel = { master = \"...\", nodes = [...] }",
            );
            None
        }
        (Some(url), None) => {
            let text = url.get_ref();
            let (shown, tls, topology) = match super::redis::check_cluster_url(text) {
                Err(problem) => {
                    inside(p, url, "fleet.redis", problem);
                    return None;
                }
                Ok((shown, tls, seeds)) if text.contains("+cluster://") => (
                    shown,
                    tls,
                    Topology::Cluster {
                        seeds: seeds.into_iter().map(Secret).collect(),
                    },
                ),
                Ok((shown, tls, _)) => (shown, tls, Topology::Single),
            };
            if let (Some(named), Some(given)) = (super::redis::url_user(text), &raw.user) {
                p.add(
                    given.span(),
                    "fleet.user",
                    format!(
                        "the URL in fleet.redis names user {named:?} already: keep one of the two"
                    ),
                );
                *ok = false;
            }
            Some(RedisTarget {
                url: Secret(text.clone()),
                shown,
                user,
                password,
                tls,
                topology,
            })
        }
        (None, Some(sentinel)) => sentinel_target(p, sentinel.get_ref(), paths, user, password, ok),
    }
}

/// `fleet.sentinel`: the master's name, the sentinels (all `redis://` or all `rediss://`, which
/// also says whether the primary speaks TLS) and their password file.
fn sentinel_target(
    p: &mut Problems<'_>,
    sentinel: &RawSentinel,
    paths: &super::paths::Paths<'_>,
    user: Option<String>,
    password: Option<Secret>,
    ok: &mut bool,
) -> Option<RedisTarget> {
    let master = sentinel.master.get_ref();
    if !is_name(master) {
        p.add(
            sentinel.master.span(),
            "fleet.sentinel.master",
            format!(
                "{master:?}: expected the name the sentinels monitor the primary under (letters, digits, '-', '_' or '.')"
            ),
        );
        *ok = false;
    }
    let nodes = sentinel.nodes.get_ref();
    if nodes.is_empty() {
        p.add(
            sentinel.nodes.span(),
            "fleet.sentinel.nodes",
            "no sentinel: list them, [\"redis://s1:26379\", \"redis://s2:26379\", \"redis://s3:26379\"]",
        );
        return None;
    }
    let mut shown = Vec::new();
    let mut tls = None;
    for node in nodes {
        match super::redis::check_sentinel_url(node.get_ref()) {
            Err(problem) => {
                inside(p, node, "fleet.sentinel.nodes", problem);
                *ok = false;
            }
            Ok((_, this)) if tls.is_some_and(|t| t != this) => {
                p.add(
                    node.span(),
                    "fleet.sentinel.nodes",
                    "every sentinel takes redis://, or every one rediss:// (TLS to the sentinels and to the primary): not a mix",
                );
                *ok = false;
            }
            Ok((url, this)) => {
                tls = Some(this);
                shown.push(url);
            }
        }
    }
    let sentinels_password = secret_file(
        p,
        paths,
        sentinel.password_file.as_ref(),
        "fleet.sentinel.password_file",
        ok,
    );
    Some(RedisTarget {
        url: Secret(String::new()),
        shown: format!("sentinel master {master} via {}", shown.join(",")),
        user,
        password,
        tls: tls.unwrap_or(false),
        topology: Topology::Sentinel {
            master: master.clone(),
            sentinels: nodes.iter().map(|n| Secret(n.get_ref().clone())).collect(),
            password: sentinels_password,
        },
    })
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

    #[test]
    fn a_cluster_or_a_sentinel_set_and_their_bad_combinations() {
        use crate::config::{Config, TEST_NOW};
        let parse = |body: &str| Config::parse(&format!("[fleet]\n{body}"), "f.toml", TEST_NOW);
        let fleet = parse("redis = \"redis+cluster://gw:pw@h1:7000,h2:7001\"\n")
            .unwrap()
            .fleet
            .unwrap();
        assert_eq!(fleet.redis.shown, "redis+cluster://gw:***@h1:7000,h2:7001");
        assert!(matches!(&fleet.redis.topology, Topology::Cluster { seeds } if seeds.len() == 2));
        let fleet = parse(
            "user = \"gateway\"\nsentinel = { master = \"portcullis\", nodes = [\"rediss://:pw@s1:26379\", \"rediss://s2:26379\"] }\n",
        )
        .unwrap()
        .fleet
        .unwrap();
        assert_eq!(
            fleet.redis.shown,
            "sentinel master portcullis via rediss://:***@s1:26379,rediss://s2:26379"
        );
        assert!(fleet.redis.tls);
        assert_eq!(fleet.redis.user.as_deref(), Some("gateway"));
        assert!(!format!("{fleet:?}").contains("pw@"));
        let problem = |body: &str| parse(body).unwrap_err().to_string();
        let both = problem(
            "redis = \"redis://h\"\nsentinel = { master = \"m\", nodes = [\"redis://s:26379\"] }\n",
        );
        assert!(both.starts_with("f.toml:3:12: fleet.sentinel: "), "{both}");
        let neither = problem("name = \"a\"\n");
        assert!(
            neither.starts_with("f.toml:1:1: fleet.redis: missing"),
            "{neither}"
        );
        let mixed = problem(
            "sentinel = { master = \"m\", nodes = [\"redis://s1:1\", \"rediss://s2:1\"] }\n",
        );
        assert!(
            mixed.starts_with("f.toml:2:53: fleet.sentinel.nodes: every sentinel"),
            "{mixed}"
        );
        let empty = problem("sentinel = { master = \"m\", nodes = [] }\n");
        assert!(
            empty.starts_with("f.toml:2:36: fleet.sentinel.nodes: no sentinel"),
            "{empty}"
        );
        let bad_master = problem("sentinel = { master = \"a b\", nodes = [\"redis://s:1\"] }\n");
        assert!(
            bad_master.starts_with("f.toml:2:23: fleet.sentinel.master:"),
            "{bad_master}"
        );
        let node = problem("sentinel = { master = \"m\", nodes = [\"redis://s:1/3\"] }\n");
        assert!(
            node.starts_with("f.toml:2:50: fleet.sentinel.nodes: a sentinel has no database"),
            "{node}"
        );
        let db = problem("redis = \"redis+cluster://a:1,b:2/4\"\n");
        assert!(
            db.starts_with("f.toml:2:34: fleet.redis: a Redis Cluster has database 0 only"),
            "{db}"
        );
        let twice = problem("redis = \"redis://gw:pw@h\"\nuser = \"other\"\n");
        assert!(
            twice.starts_with("f.toml:3:8: fleet.user: the URL in fleet.redis names user \"gw\""),
            "{twice}"
        );
        assert!(!twice.contains("pw"), "{twice}");
        let spaced = problem("redis = \"redis://h\"\nuser = \"a b\"\n");
        assert!(spaced.starts_with("f.toml:3:8: fleet.user:"), "{spaced}");
    }
}
