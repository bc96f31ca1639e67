//! `[[parent]]`: corporate proxies the gateway may send its CONNECTs through, named by an
//! egress's `via`. The gateway still decides everything itself first; a parent only carries
//! what was allowed. Its own credentials (`basic`) are read here, once, and kept only as the
//! header value they make.

use super::paths::Paths;
use super::problems::Problems;
use super::values::is_name;
use serde::Deserialize;
use std::fmt;
use toml::Spanned;

/// `[[parent]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawParent {
    name: Spanned<String>,
    address: Spanned<String>,
    tls: Option<Spanned<RawParentTls>>,
    basic: Option<Spanned<RawBasic>>,
    connect_target: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawParentTls {
    #[allow(dead_code)]
    ca: Spanned<String>,
    #[allow(dead_code)]
    server_name: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBasic {
    user: Spanned<String>,
    password_file: Spanned<String>,
}

/// What the gateway asks a parent to connect to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectTarget {
    /// `CONNECT host:port`: the parent resolves (the gateway's own check is advisory).
    Name,
    /// `CONNECT ip:port` with the address the gateway vetted.
    Address,
}

/// One parent proxy.
#[derive(Clone, PartialEq, Eq)]
pub struct Parent {
    pub name: String,
    /// Host (a name or an IP address) and port, as written.
    pub host: String,
    pub port: u16,
    pub connect_target: ConnectTarget,
    /// `Basic ...`, the gateway's own `Proxy-Authorization` value; never logged.
    pub authorization: Option<String>,
    /// The user of `basic`, for `check-config`.
    pub user: Option<String>,
}

impl fmt::Debug for Parent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Parent")
            .field("name", &self.name)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("connect_target", &self.connect_target)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Parent {
    /// "name" or "address".
    pub fn connect_by(&self) -> &'static str {
        match self.connect_target {
            ConnectTarget::Name => "name",
            ConnectTarget::Address => "address",
        }
    }
}

/// Compiles every `[[parent]]`: unique names, `host:port` addresses, the password file read.
pub(super) fn compile(
    p: &mut Problems<'_>,
    raw: &[Spanned<RawParent>],
    paths: &Paths<'_>,
) -> Vec<Parent> {
    let mut parents: Vec<Parent> = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let key = format!("parent[{i}]");
        let r = r.get_ref();
        let name = r.name.get_ref().clone();
        if !is_name(&name) {
            p.add(
                r.name.span(),
                format!("{key}.name"),
                "expected a name of letters, digits, '-', '_', '.'",
            );
        } else if parents.iter().any(|x| x.name == name) {
            p.add(
                r.name.span(),
                format!("{key}.name"),
                "a parent of this name is listed already",
            );
        }
        let Some((host, port)) = host_port(r.address.get_ref()) else {
            p.add(
                r.address.span(),
                format!("{key}.address"),
                "expected HOST:PORT (a DNS name or an IP address, IPv6 in brackets)",
            );
            continue;
        };
        if let Some(tls) = &r.tls {
            p.add(
                tls.span(),
                format!("{key}.tls"),
                "TLS to a parent is not supported by this version: put a TLS client (stunnel) \
                 beside the gateway and name its plain port as the address",
            );
        }
        let connect_target = match r.connect_target.as_ref().map(|v| (v, v.get_ref().as_str())) {
            None | Some((_, "name")) => ConnectTarget::Name,
            Some((_, "address")) => ConnectTarget::Address,
            Some((v, other)) => {
                p.add(
                    v.span(),
                    format!("{key}.connect_target"),
                    format!("{other:?}: expected \"name\" or \"address\""),
                );
                ConnectTarget::Name
            }
        };
        let (authorization, user) = match &r.basic {
            None => (None, None),
            Some(basic) => match basic_header(p, basic.get_ref(), paths, &key) {
                Some(header) => (Some(header), Some(basic.get_ref().user.get_ref().clone())),
                None => (None, None),
            },
        };
        parents.push(Parent {
            name,
            host,
            port,
            connect_target,
            authorization,
            user,
        });
    }
    parents
}

/// `host:port`, `[v6]:port`; the host is a DNS name or an IP address.
fn host_port(text: &str) -> Option<(String, u16)> {
    if let Ok(addr) = text.parse::<std::net::SocketAddr>() {
        return Some((addr.ip().to_string(), addr.port()));
    }
    let (host, port) = text.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    crate::policy::host::DnsName::parse(host).ok()?;
    Some((host.to_ascii_lowercase(), port))
}

/// `Basic base64(user:password)` from the user and the first line of the password file.
fn basic_header(
    p: &mut Problems<'_>,
    basic: &RawBasic,
    paths: &Paths<'_>,
    key: &str,
) -> Option<String> {
    use base64::Engine;
    let user = basic.user.get_ref();
    if user.is_empty() || user.contains(':') || user.chars().any(char::is_control) {
        p.add(
            basic.user.span(),
            format!("{key}.basic.user"),
            "expected a user name without ':' or control characters",
        );
        return None;
    }
    let path = paths.resolve(
        p,
        &basic.password_file,
        &format!("{key}.basic.password_file"),
    );
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => {
            p.add(
                basic.password_file.span(),
                format!("{key}.basic.password_file"),
                format!("{}: cannot read the password file: {e}", path.display()),
            );
            return None;
        }
    };
    let password = text.lines().next().unwrap_or_default();
    if password.is_empty() {
        p.add(
            basic.password_file.span(),
            format!("{key}.basic.password_file"),
            format!("{}: the password file is empty", path.display()),
        );
        return None;
    }
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    Some(format!("Basic {token}"))
}

/// The positions of the parents `via` names, in order; problems for unknown ones.
pub(super) fn refer(
    p: &mut Problems<'_>,
    parents: &[Parent],
    via: &[Spanned<String>],
    key: &str,
) -> Vec<usize> {
    via.iter()
        .filter_map(|name| {
            let at = parents.iter().position(|x| x.name == *name.get_ref());
            if at.is_none() {
                p.add(
                    name.span(),
                    format!("{key}.via"),
                    format!("{:?}: no [[parent]] of this name", name.get_ref()),
                );
            }
            at
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_addresses_are_host_and_port() {
        assert_eq!(
            host_port("Proxy1.corp.example:8080"),
            Some(("proxy1.corp.example".into(), 8080))
        );
        assert_eq!(
            host_port("[2001:db8::1]:3128"),
            Some(("2001:db8::1".into(), 3128))
        );
        assert_eq!(host_port("10.0.0.1:3128"), Some(("10.0.0.1".into(), 3128)));
        for bad in ["proxy", "proxy:0", "proxy:x", "pro xy:80", ":80"] {
            assert_eq!(host_port(bad), None, "{bad}");
        }
    }
}
