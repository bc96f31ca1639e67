//! The forwarder's config file (`/etc/portcullis/agent.toml`): gateways, the branch's TLS
//! identity, credentials (the password from a file or the environment, never from the command
//! line), the listener and timeouts. Command-line options override the file.

use ipnet::IpNet;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Environment variable holding the proxy password (for `check` and `forward`).
pub const PASSWORD_ENV: &str = "PORTCULLIS_PROXY_PASSWORD";

/// The file as written; every field optional so the command line can fill gaps.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    /// Listener address, default 127.0.0.1:3128.
    pub listen: Option<String>,
    /// Client networks allowed besides loopback.
    #[serde(default)]
    pub clients: Vec<IpNet>,
    /// Gateway URLs in order of preference.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// CA file(s) the gateways' certificates are verified against (default: system roots).
    pub ca: Option<PathBuf>,
    /// The branch's client certificate chain and key (PEM).
    pub certificate: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Proxy credentials: user, and the password in a file (first line).
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    pub probe_interval: Option<String>,
    pub max_connections: Option<usize>,
    #[serde(default)]
    pub timeouts: FileTimeouts,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTimeouts {
    pub connect: Option<String>,
    pub tls: Option<String>,
    pub reply: Option<String>,
    pub head: Option<String>,
    pub idle: Option<String>,
    pub drain: Option<String>,
}

impl AgentFile {
    /// Reads and parses `path`; relative file names in it are made relative to its directory.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read the file: {e}", path.display()))?;
        let mut file: AgentFile =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut file.ca,
            &mut file.certificate,
            &mut file.key,
            &mut file.password_file,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(file)
    }
}

/// A positive duration such as "500ms", "10s", "15m".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    text.parse::<jiff::SignedDuration>()
        .ok()
        .filter(|d| d.is_positive())
        .and_then(|d| Duration::try_from(d).ok())
        .ok_or_else(|| {
            format!("{text:?}: expected a positive duration such as \"500ms\", \"10s\" or \"15m\"")
        })
}

/// The proxy password: from `file` (first line) if given, else the environment variable.
/// Never from the command line, where `ps` would show it.
pub fn password(file: Option<&Path>) -> Result<Option<String>, String> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read the password file: {e}", path.display()))?;
        let first = text.lines().next().unwrap_or_default();
        if first.is_empty() {
            return Err(format!("{}: the password file is empty", path.display()));
        }
        return Ok(Some(first.to_owned()));
    }
    Ok(std::env::var(PASSWORD_ENV).ok().filter(|p| !p.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn the_file_rejects_unknown_keys_and_resolves_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "gateways = [\"https://gw:3129\"]\ncertificate = \"branch.pem\"\n",
        )
        .unwrap();
        let file = AgentFile::load(&path).unwrap();
        assert_eq!(file.certificate.unwrap(), dir.path().join("branch.pem"));
        std::fs::write(&path, "gateway = \"https://gw:3129\"\n").unwrap();
        let err = AgentFile::load(&path).unwrap_err();
        assert!(err.contains("unknown field `gateway`"), "{err}");
    }
}
