//! Where fleet mode finds Redis: one endpoint (`redis://`), a Redis Cluster by its seed nodes
//! (`redis+cluster://h1:6379,h2:6379`) or a Sentinel set (`sentinel = { master, nodes }`).
//! Every URL is checked here, so a bad one is a config problem with its place (a byte offset
//! inside the string), and every password is kept apart from what is ever printed.

use std::fmt;

/// A string never printed: `Debug` and `Display` show `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// How the Redis behind the fleet is laid out.
#[derive(Clone, Debug, PartialEq)]
pub enum Topology {
    /// One endpoint (a primary, or a proxy in front of several).
    Single,
    /// A Redis Cluster: the seed nodes' URLs (`redis[s]://[user[:password]@]host:port`); the
    /// client learns the others and the slots from them.
    Cluster { seeds: Vec<Secret> },
    /// A Sentinel set: the name the sentinels monitor the primary under, the sentinels' URLs
    /// (their own user and password, if any) and the sentinels' password from a file.
    Sentinel {
        master: String,
        sentinels: Vec<Secret>,
        password: Option<Secret>,
    },
}

/// Checks a single-endpoint URL: `redis[s]://[[user]:password@]host[:port][/db]`. The URL with
/// its password shown as `***` and whether it is TLS; or where (byte offset in the URL) it
/// goes wrong and why.
pub fn check_url(url: &str) -> Result<(String, bool), (usize, String)> {
    let expected = "expected redis://[:password@]host[:port][/db], rediss://... (TLS) or redis+cluster://host:port,host:port (a Redis Cluster)";
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
    let (userinfo, host_port) = split_userinfo(authority);
    let host_at = start + userinfo.map_or(0, |u| u.len() + 1);
    check_host_port(host_port, host_at)?;
    let path_at = start + authority.len();
    check_path(path, path_at)?;
    redis::IntoConnectionInfo::into_connection_info(url)
        .map_err(|e| (0, format!("{}: {e}", redact(url))))?;
    Ok((redact(url), tls))
}

/// Checks a cluster URL, `redis[s]+cluster://[[user]:password@]host:port,host:port[/0]`: the
/// URL as shown, whether it is TLS and one seed URL per node (with the URL's user and
/// password).
pub fn check_cluster_url(url: &str) -> Result<(String, bool, Vec<String>), (usize, String)> {
    let (scheme, rest) = url.split_once("://").unwrap_or((url, ""));
    let base = match scheme {
        "redis+cluster" => "redis",
        "rediss+cluster" => "rediss",
        _ => return check_url(url).map(|(shown, tls)| (shown, tls, vec![url.to_owned()])),
    };
    let start = scheme.len() + 3;
    let (authority, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let (userinfo, hosts) = split_userinfo(authority);
    let mut at = start + userinfo.map_or(0, |u| u.len() + 1);
    let mut seeds = Vec::new();
    for node in hosts.split(',') {
        check_host_port(node, at)?;
        if !node.starts_with('[') && !node.contains(':') {
            return Err((
                at + node.len(),
                format!("{node:?}: a cluster node needs its port (host:6379)"),
            ));
        }
        let auth = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
        seeds.push(format!("{base}://{auth}{node}"));
        at += node.len() + 1;
    }
    let path_at = start + authority.len();
    let db = check_path(path, path_at)?;
    if db.is_some_and(|db| db != 0) {
        return Err((
            path_at + 1,
            "a Redis Cluster has database 0 only: leave the database out or write /0".to_owned(),
        ));
    }
    for seed in &seeds {
        redis::IntoConnectionInfo::into_connection_info(seed.as_str())
            .map_err(|e| (0, format!("{}: {e}", redact(seed))))?;
    }
    Ok((redact(url), base == "rediss", seeds))
}

/// Checks a sentinel's URL, `redis[s]://[[user]:password@]host:port` (no database: the
/// sentinels answer for the primary, whose database 0 holds the fleet's keys).
pub fn check_sentinel_url(url: &str) -> Result<(String, bool), (usize, String)> {
    let (shown, tls) = check_url(url)?;
    let rest = url.split_once("://").map_or("", |(_, r)| r);
    if let Some(i) = rest.find('/')
        && rest[i..].trim_start_matches('/').chars().any(|c| c != '0')
    {
        let at = url.len() - rest.len() + i + 1;
        return Err((
            at,
            "a sentinel has no database: leave it out (the fleet uses database 0 of the primary)"
                .to_owned(),
        ));
    }
    Ok((shown, tls))
}

fn split_userinfo(authority: &str) -> (Option<&str>, &str) {
    match authority.rfind('@') {
        Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
        None => (None, authority),
    }
}

/// The user name in a URL's user part (`user:password@` or `user@`), if any.
pub fn url_user(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let userinfo = split_userinfo(authority).0?;
    let user = userinfo.split(':').next().unwrap_or("");
    (!user.is_empty()).then_some(user)
}

fn check_host_port(host_port: &str, host_at: usize) -> Result<(), (usize, String)> {
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
        return Err((host_at, "no host: expected host[:port]".to_owned()));
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
    Ok(())
}

/// The database number of a URL's path (`None`: none given).
fn check_path(path: &str, path_at: usize) -> Result<Option<u32>, (usize, String)> {
    if path.contains('?') {
        return Err((
            path_at + path.find('?').unwrap_or(0),
            "query parameters are not supported: put the password in redis_password_file"
                .to_owned(),
        ));
    }
    let db = path.trim_start_matches('/');
    if db.is_empty() {
        return Ok(None);
    }
    db.parse::<u32>().map(Some).map_err(|_| {
        (
            path_at + 1,
            format!("{db:?}: expected a database number such as /0"),
        )
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_urls_are_checked_and_passwords_never_shown() {
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
        assert_eq!(url_user("redis://gw:pw@h"), Some("gw"));
        assert_eq!(url_user("redis://gw@h"), Some("gw"));
        assert_eq!(url_user("redis://:pw@h"), None);
        assert_eq!(url_user("redis://h"), None);
    }

    #[test]
    fn cluster_urls_become_seeds_with_their_credentials() {
        let (shown, tls, seeds) =
            check_cluster_url("rediss+cluster://gw:s3cret@10.0.0.1:6379,[::1]:7000,h:7001/0")
                .unwrap();
        assert_eq!(
            shown,
            "rediss+cluster://gw:***@10.0.0.1:6379,[::1]:7000,h:7001/0"
        );
        assert!(tls);
        assert_eq!(
            seeds,
            [
                "rediss://gw:s3cret@10.0.0.1:6379",
                "rediss://gw:s3cret@[::1]:7000",
                "rediss://gw:s3cret@h:7001"
            ]
        );
        let bad = |url: &str| check_cluster_url(url).unwrap_err();
        let url = "redis+cluster://a:1,b:0";
        assert_eq!(bad(url).0, url.len() - 1);
        assert_eq!(
            bad("redis+cluster://a:1,,b:2").0,
            "redis+cluster://a:1,".len()
        );
        assert_eq!(
            bad("redis+cluster://a:1,b").0,
            "redis+cluster://a:1,b".len()
        );
        assert_eq!(bad("redis+cluster://a:1/3").0, "redis+cluster://a:1/".len());
        assert!(bad("redis+cluster://a:1/3").1.contains("database 0 only"));
        // A plain URL is one seed.
        assert_eq!(check_cluster_url("redis://h:1").unwrap().2, ["redis://h:1"]);
    }

    #[test]
    fn sentinel_urls_take_no_database() {
        assert_eq!(
            check_sentinel_url("redis://s1:26379"),
            Ok(("redis://s1:26379".into(), false))
        );
        assert!(check_sentinel_url("redis://s1:26379/0").is_ok());
        assert_eq!(
            check_sentinel_url("redis://s1:26379/2").unwrap_err().0,
            "redis://s1:26379/".len()
        );
    }
}
