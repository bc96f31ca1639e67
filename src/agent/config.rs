//! The agent's configuration: the forwarder's config file (`/etc/portcullis/agent.toml`:
//! gateways, the branch's TLS identity, credentials (the password from a file or the
//! environment, never from the command line), the listener and timeouts), the command-line
//! options that override it, and the validated forwarder [`Settings`] with their defaults.

use super::forward::Settings;
use super::pool::Pool;
use super::proxy_client::{Proxy, ProxyUrl, Timeouts, basic_authorization};
use super::trust;
pub use crate::config::parse_duration;
use ipnet::IpNet;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
    /// The forwarder's admin listener (`/metrics`), e.g. "127.0.0.1:9465"; none by default.
    pub admin: Option<String>,
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
    /// Reads and parses `path`; `${CREDENTIALS_DIRECTORY}` in its file names is the
    /// environment's (systemd's `LoadCredential=`), and relative names are relative to its
    /// directory.
    pub fn load(path: &Path) -> Result<Self, String> {
        let credentials = crate::config::paths::credentials_from_env();
        Self::load_with_credentials(path, credentials.as_deref())
    }

    /// `load` with `${CREDENTIALS_DIRECTORY}` standing for `credentials` (`None`: not set).
    pub fn load_with_credentials(path: &Path, credentials: Option<&Path>) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read the file: {e}", path.display()))?;
        let mut file: AgentFile =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for (key, value) in [
            ("ca", &mut file.ca),
            ("certificate", &mut file.certificate),
            ("key", &mut file.key),
            ("password_file", &mut file.password_file),
        ] {
            if let Some(p) = value {
                // Deserialized from TOML text, so always UTF-8.
                let text = p.to_string_lossy().into_owned();
                *p = crate::config::paths::expand(&text, base, credentials)
                    .map_err(|e| format!("{}: {key}: {e}", path.display()))?;
            }
        }
        Ok(file)
    }
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

/// Options shared by check and forward: trust, identity and credentials.
#[derive(clap::Args, Debug, Default)]
pub struct Identity {
    /// Agent config file (the forwarder's); its gateways, TLS files and credentials are used
    /// where no option is given.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A CA certificate file (PEM) to trust (repeatable). check: in addition to the system
    /// roots, for the gateway and the endpoints; forward: instead of them, for the gateways.
    #[arg(long, value_name = "FILE")]
    pub ca: Vec<PathBuf>,
    /// The branch's client certificate chain (PEM), presented to an https:// gateway.
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Proxy user for Basic credentials; the password comes from --password-file or the
    /// PORTCULLIS_PROXY_PASSWORD environment variable, never the command line.
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
    /// File whose first line is the proxy password.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
}

impl Identity {
    /// The config file named by --config, or an empty one.
    pub fn load_file(&self) -> Result<AgentFile, String> {
        match &self.config {
            Some(path) => AgentFile::load(path),
            None => Ok(AgentFile::default()),
        }
    }

    /// The `Proxy-Authorization` value from the options and the file, if a user is configured.
    pub fn authorization(&self, file: &AgentFile) -> Result<Option<String>, String> {
        let Some(user) = self.user.as_ref().or(file.user.as_ref()) else {
            return Ok(None);
        };
        let password_file = self
            .password_file
            .as_deref()
            .or(file.password_file.as_deref());
        match password(password_file)? {
            Some(password) => Ok(Some(basic_authorization(user, &password))),
            None => Err(format!(
                "user {user:?} has no password: give --password-file or set {}",
                PASSWORD_ENV
            )),
        }
    }

    /// The client certificate and key: the options', else the file's.
    pub fn client_identity<'a>(&'a self, file: &'a AgentFile) -> Option<(&'a Path, &'a Path)> {
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            _ => match (&file.certificate, &file.key) {
                (Some(cert), Some(key)) => Some((cert, key)),
                _ => None,
            },
        }
    }
}

/// `forward`'s options; they override the file.
#[derive(clap::Args, Debug, Default)]
pub struct ForwardOptions {
    #[command(flatten)]
    pub identity: Identity,
    /// Listener for local apps (default 127.0.0.1:3128).
    #[arg(long, value_name = "IP:PORT")]
    pub listen: Option<SocketAddr>,
    /// A gateway URL, in order of preference (repeatable; replaces the config's list).
    #[arg(long = "gateway", value_name = "URL", value_parser = parse_proxy_url)]
    pub gateways: Vec<ProxyUrl>,
    /// A client network allowed besides loopback (repeatable; adds to the config's).
    #[arg(long = "client", value_name = "CIDR")]
    pub clients: Vec<IpNet>,
    /// How often down gateways are probed (default 10s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub probe_interval: Option<Duration>,
    /// Admin listener serving the forwarder's /metrics (default: none).
    #[arg(long, value_name = "IP:PORT")]
    pub admin: Option<SocketAddr>,
}

fn parse_proxy_url(s: &str) -> Result<ProxyUrl, String> {
    s.parse()
}

/// The forwarder's settings: the options over the file over the defaults, validated.
pub fn forward_settings(args: &ForwardOptions, file: AgentFile) -> Result<Settings, String> {
    let duration = |value: &Option<String>, key: &str, default: u64| -> Result<Duration, String> {
        match value {
            Some(text) => parse_duration(text).map_err(|e| format!("{key}: {e}")),
            None => Ok(Duration::from_secs(default)),
        }
    };
    let timeouts = Timeouts {
        connect: duration(&file.timeouts.connect, "timeouts.connect", 5)?,
        tls: duration(&file.timeouts.tls, "timeouts.tls", 10)?,
        reply: duration(&file.timeouts.reply, "timeouts.reply", 30)?,
    };
    let gateways: Vec<ProxyUrl> = if args.gateways.is_empty() {
        file.gateways
            .iter()
            .enumerate()
            .map(|(i, text)| text.parse().map_err(|e| format!("gateways[{i}]: {e}")))
            .collect::<Result<_, _>>()?
    } else {
        args.gateways.clone()
    };
    if gateways.is_empty() {
        return Err("no gateway: give --gateway URL (repeatable) or gateways in --config".into());
    }
    let ca_files: Vec<PathBuf> = if args.identity.ca.is_empty() {
        file.ca.iter().cloned().collect()
    } else {
        args.identity.ca.clone()
    };
    let roots = trust::roots(ca_files.is_empty(), &ca_files)?;
    let identity = args.identity.client_identity(&file);
    let tls = trust::client_config(roots, identity, true)?;
    let certificate = identity
        .map(|(cert, _)| trust::ClientCertificate::load(cert))
        .transpose()?;
    // An expired certificate cannot work anywhere: refuse to start with its date rather than
    // serve 502s. One not valid yet may be this machine's clock, not the certificate: the
    // forwarder warns when it starts.
    if let Some(certificate) = &certificate {
        let now = trust::now();
        if certificate.validity(now) == trust::Validity::Expired {
            return Err(certificate.problem(now).unwrap_or_default());
        }
    }
    let proxies = gateways
        .into_iter()
        .map(|url| Proxy::new(url, tls.clone(), timeouts))
        .collect::<Result<Vec<_>, _>>()?;
    let listen = match (args.listen, &file.listen) {
        (Some(addr), _) => addr,
        (None, Some(text)) => text
            .parse()
            .map_err(|_| format!("listen: {text:?}: expected IP:PORT"))?,
        (None, None) => SocketAddr::from(([127, 0, 0, 1], 3128)),
    };
    let mut clients = file.clients.clone();
    clients.extend(args.clients.iter().copied());
    let probe_interval = match args.probe_interval {
        Some(d) => d,
        None => duration(&file.probe_interval, "probe_interval", 10)?,
    };
    let max_connections = file.max_connections.unwrap_or(4096);
    if max_connections == 0 {
        return Err("max_connections: expected at least 1".into());
    }
    let admin = match (args.admin, &file.admin) {
        (Some(addr), _) => Some(addr),
        (None, Some(text)) => Some(
            text.parse()
                .map_err(|_| format!("admin: {text:?}: expected IP:PORT"))?,
        ),
        (None, None) => None,
    };
    let pool = Arc::new(Pool::new(proxies));
    Ok(Settings {
        listen,
        clients,
        metrics: super::metrics::AgentMetrics::new(&pool),
        pool,
        admin,
        authorization: args.identity.authorization(&file)?,
        head_timeout: duration(&file.timeouts.head, "timeouts.head", 10)?,
        idle_timeout: duration(&file.timeouts.idle, "timeouts.idle", 600)?,
        drain: duration(&file.timeouts.drain, "timeouts.drain", 30)?,
        probe_interval,
        max_connections,
        certificate,
        closing: Default::default(),
    })
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
        std::fs::write(
            &path,
            "key = \"${CREDENTIALS_DIRECTORY}/branch.key\"\npassword_file = \"pw\"\n",
        )
        .unwrap();
        let creds = Path::new("/run/credentials/portcullis-agent.service");
        let file = AgentFile::load_with_credentials(&path, Some(creds)).unwrap();
        assert_eq!(file.key.unwrap(), creds.join("branch.key"));
        assert_eq!(file.password_file.unwrap(), dir.path().join("pw"));
        let err = AgentFile::load_with_credentials(&path, None).unwrap_err();
        assert!(
            err.contains("agent.toml: key: ")
                && err.contains("${CREDENTIALS_DIRECTORY} is not set"),
            "{err}"
        );
        std::fs::write(&path, "gateway = \"https://gw:3129\"\n").unwrap();
        let err = AgentFile::load(&path).unwrap_err();
        assert!(err.contains("unknown field `gateway`"), "{err}");
    }

    /// A CA file and an agent file beside it; `extra` is appended to the file.
    fn agent_file(extra: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, format!("ca = \"ca.pem\"\n{extra}")).unwrap();
        (dir, path)
    }

    #[test]
    fn forward_settings_take_options_over_the_file_over_the_defaults() {
        let (_dir, path) = agent_file(
            "gateways = [\"http://gw1:3128\", \"http://gw2:3128\"]\nprobe_interval = \"30s\"\n[timeouts]\nidle = \"5m\"\n",
        );
        let defaults = ForwardOptions::default();
        let settings = forward_settings(&defaults, AgentFile::load(&path).unwrap()).unwrap();
        assert_eq!(settings.listen, SocketAddr::from(([127, 0, 0, 1], 3128)));
        assert_eq!(settings.pool.len(), 2);
        assert_eq!(settings.idle_timeout, Duration::from_secs(300));
        assert_eq!(settings.head_timeout, Duration::from_secs(10));
        assert_eq!(settings.drain, Duration::from_secs(30));
        assert_eq!(settings.probe_interval, Duration::from_secs(30));
        assert_eq!(settings.max_connections, 4096);
        assert!(settings.authorization.is_none());

        let options = ForwardOptions {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 4000))),
            gateways: vec!["http://gw3:3128".parse().unwrap()],
            probe_interval: Some(Duration::from_secs(1)),
            ..ForwardOptions::default()
        };
        let settings = forward_settings(&options, AgentFile::load(&path).unwrap()).unwrap();
        assert_eq!(settings.listen.port(), 4000);
        assert_eq!(settings.pool.len(), 1, "--gateway replaces the file's list");
        assert_eq!(settings.probe_interval, Duration::from_secs(1));
    }

    #[test]
    fn bad_forward_settings_name_their_key() {
        for (extra, want) in [
            ("", "no gateway"),
            (
                "gateways = [\"http://gw:3128\"]\nmax_connections = 0\n",
                "max_connections",
            ),
            (
                "gateways = [\"http://gw:3128\"]\n[timeouts]\nhead = \"soon\"\n",
                "timeouts.head",
            ),
            ("gateways = [\"ftp://gw\"]\n", "gateways[0]"),
            (
                "gateways = [\"http://gw:3128\"]\nlisten = \"here\"\n",
                "listen",
            ),
            (
                "gateways = [\"http://gw:3128\"]\nuser = \"london\"\npassword_file = \"missing\"\n",
                "password file",
            ),
        ] {
            let (_dir, path) = agent_file(extra);
            let file = AgentFile::load(&path).unwrap();
            let err = forward_settings(&ForwardOptions::default(), file)
                .err()
                .unwrap_or_else(|| panic!("{extra:?} was accepted"));
            assert!(err.contains(want), "{extra:?}: {err}");
        }
    }
}
