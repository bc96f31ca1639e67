//! `[[parent]]`: corporate proxies the gateway may send its CONNECTs through, named by an
//! egress's `via`. The gateway still decides everything itself first; a parent only carries
//! what was allowed. Its own credentials (`basic`) are read here, once, and kept only as the
//! header value they make; its TLS trust (`tls.ca`) is read here too, into the client config
//! the gateway's handshakes with it use.

use super::paths::Paths;
use super::problems::Problems;
use super::values::is_name;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
    ca: Spanned<String>,
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
    /// `tls`: the gateway speaks TLS to the parent and sends its CONNECT inside.
    pub tls: Option<ParentTls>,
}

/// TLS to a parent: the only trust is `tls.ca` (no built-in roots), the name checked is
/// `tls.server_name` (or the address's host name).
#[derive(Clone)]
pub struct ParentTls {
    /// The CA file, as resolved.
    pub ca: PathBuf,
    /// The name sent (SNI, for a DNS name) and checked in the parent's certificate.
    pub server_name: ServerName<'static>,
    /// The client config trusting only `ca`'s certificates.
    pub connector: tokio_rustls::TlsConnector,
    /// `ca`'s certificates, so a reload that changed the file is seen as a change.
    certificates: Vec<CertificateDer<'static>>,
}

impl PartialEq for ParentTls {
    fn eq(&self, other: &Self) -> bool {
        self.ca == other.ca
            && self.server_name == other.server_name
            && self.certificates == other.certificates
    }
}

impl Eq for ParentTls {}

impl fmt::Debug for ParentTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParentTls")
            .field("ca", &self.ca)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Parent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Parent")
            .field("name", &self.name)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("connect_target", &self.connect_target)
            .field("user", &self.user)
            .field("tls", &self.tls)
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
        let tls = r
            .tls
            .as_ref()
            .and_then(|tls| compile_tls(p, tls.get_ref(), &host, paths, &key));
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
            tls,
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

/// `tls`: the CA file read (its certificates the only roots) and the name to check: the one
/// written, or the address's host when it is a name (an IP address needs one written).
fn compile_tls(
    p: &mut Problems<'_>,
    tls: &RawParentTls,
    host: &str,
    paths: &Paths<'_>,
    key: &str,
) -> Option<ParentTls> {
    let server_name = match &tls.server_name {
        Some(name) => match ServerName::try_from(name.get_ref().to_ascii_lowercase()) {
            Ok(server_name) => Some(server_name),
            Err(_) => {
                p.add(
                    name.span(),
                    format!("{key}.tls.server_name"),
                    format!(
                        "{:?}: expected the DNS name (or IP address) in the parent's certificate",
                        name.get_ref()
                    ),
                );
                None
            }
        },
        None if host.parse::<std::net::IpAddr>().is_ok() => {
            p.add(
                tls.ca.span(),
                format!("{key}.tls.server_name"),
                "the address is an IP address: say which name the parent's certificate holds \
                 with `tls.server_name`",
            );
            None
        }
        None => match ServerName::try_from(host.to_owned()) {
            Ok(server_name) => Some(server_name),
            Err(_) => {
                p.add(
                    tls.ca.span(),
                    format!("{key}.tls.server_name"),
                    format!(
                        "{host:?} cannot be checked in a certificate: name the parent's \
                         certificate with `tls.server_name`"
                    ),
                );
                None
            }
        },
    };
    let ca = paths.resolve(p, &tls.ca, &format!("{key}.tls.ca"));
    if ca.as_os_str().is_empty() {
        return None;
    }
    let certificates = match read_ca(&ca) {
        Ok(certificates) => certificates,
        Err(why) => {
            p.add(tls.ca.span(), format!("{key}.tls.ca"), why);
            return None;
        }
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in &certificates {
        if let Err(e) = roots.add(cert.clone()) {
            p.add(
                tls.ca.span(),
                format!("{key}.tls.ca"),
                format!("{}: not a usable CA certificate: {e}", ca.display()),
            );
            return None;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = match rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
    {
        Ok(builder) => builder.with_root_certificates(roots).with_no_client_auth(),
        Err(e) => {
            p.add(tls.ca.span(), format!("{key}.tls"), e.to_string());
            return None;
        }
    };
    Some(ParentTls {
        ca,
        server_name: server_name?,
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        certificates,
    })
}

/// The certificates of a PEM CA file; why not, for the problem's message.
fn read_ca(ca: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = ca.display();
    let certificates = CertificateDer::pem_file_iter(ca)
        .map_err(|e| format!("{shown}: cannot read the CA file: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{shown}: not a PEM certificate file: {e}"))?;
    if certificates.is_empty() {
        return Err(format!("{shown}: no certificate in the CA file"));
    }
    Ok(certificates)
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
