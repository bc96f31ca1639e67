//! File paths in config files (the gateway's TLS files and access log, the agent's TLS files and
//! password file): `${CREDENTIALS_DIRECTORY}` is replaced by the folder systemd's
//! `LoadCredential=` fills (the service user may read it even when the originals are root's
//! only), then a relative path is taken from the config file's folder. No other variable is
//! expanded, and a reference to it when it is not set is an error, never an empty string.

use super::problems::Problems;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// The environment variable systemd sets for a unit with `LoadCredential=`.
pub const CREDENTIALS_VARIABLE: &str = "CREDENTIALS_DIRECTORY";
const REFERENCE: &str = "${CREDENTIALS_DIRECTORY}";

/// The credentials folder from the environment; unset or empty is `None`.
pub fn credentials_from_env() -> Option<PathBuf> {
    std::env::var_os(CREDENTIALS_VARIABLE)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `text` with every `${CREDENTIALS_DIRECTORY}` replaced by `credentials`, then joined to `base`
/// when relative. Errors: the reference with no credentials folder, or another `${...}` (or
/// `$CREDENTIALS_DIRECTORY` without braces), which would otherwise be taken literally.
pub fn expand(text: &str, base: &Path, credentials: Option<&Path>) -> Result<PathBuf, String> {
    let parts: Vec<&str> = text.split(REFERENCE).collect();
    for part in &parts {
        if let Some(at) = part.find("${") {
            let name = &part[at..part[at..].find('}').map_or(part.len(), |end| at + end + 1)];
            return Err(format!(
                "{text:?}: {name} is not expanded; only {REFERENCE} is (systemd's LoadCredential=)"
            ));
        }
        if part.contains("$CREDENTIALS_DIRECTORY") {
            return Err(format!("{text:?}: expected {REFERENCE}, with braces"));
        }
    }
    let path = if parts.len() == 1 {
        PathBuf::from(text)
    } else {
        let Some(dir) = credentials else {
            return Err(format!(
                "{text:?}: {REFERENCE} is not set (systemd sets it for a unit with \
                 LoadCredential=; to check the file outside the unit, set {CREDENTIALS_VARIABLE} \
                 to the folder holding the files)"
            ));
        };
        let mut joined = OsString::from(parts[0]);
        for part in &parts[1..] {
            joined.push(dir.as_os_str());
            joined.push(part);
        }
        PathBuf::from(joined)
    };
    Ok(base.join(path))
}

/// Where the config file is and the credentials folder: what its file paths are relative to.
pub(super) struct Paths<'a> {
    pub(super) base: &'a Path,
    pub(super) credentials: Option<&'a Path>,
}

impl Paths<'_> {
    /// The path `value` names, or a problem at its place (and an empty path) when it cannot be
    /// expanded.
    pub(super) fn resolve(
        &self,
        p: &mut Problems<'_>,
        value: &Spanned<String>,
        key: &str,
    ) -> PathBuf {
        expand(value.get_ref(), self.base, self.credentials).unwrap_or_else(|e| {
            p.add(value.span(), key, e);
            PathBuf::new()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_credentials_folder_is_expanded_and_nothing_else() {
        let base = Path::new("/etc/portcullis");
        let creds = Some(Path::new("/run/credentials/portcullis.service"));
        let ok = |text: &str, creds| expand(text, base, creds).unwrap();
        assert_eq!(
            ok("${CREDENTIALS_DIRECTORY}/gateway.key", creds),
            Path::new("/run/credentials/portcullis.service/gateway.key")
        );
        assert_eq!(ok("gateway.pem", None), base.join("gateway.pem"));
        assert_eq!(ok("/srv/tls/a.pem", creds), Path::new("/srv/tls/a.pem"));
        // A lone `$` is an ordinary character.
        assert_eq!(ok("/srv/a$b.pem", None), Path::new("/srv/a$b.pem"));

        for (text, creds, want) in [
            (
                "${CREDENTIALS_DIRECTORY}/k",
                None,
                "${CREDENTIALS_DIRECTORY} is not set",
            ),
            (
                "${STATE_DIRECTORY}/k",
                creds,
                "${STATE_DIRECTORY} is not expanded",
            ),
            (
                "${CREDENTIALS_DIRECTORY}/${HOME",
                creds,
                "${HOME is not expanded",
            ),
            ("$CREDENTIALS_DIRECTORY/k", creds, "with braces"),
        ] {
            let err = expand(text, base, creds).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    const TLS_FROM_CREDENTIALS: &str = r#"[[listen.tls_proxy]]
address = "127.0.0.1:0"

[tls]
certificate = "${CREDENTIALS_DIRECTORY}/gateway.pem"
key = "${CREDENTIALS_DIRECTORY}/gateway.key"
client_ca = "branch-ca.pem"

[log]
access_file = "${CREDENTIALS_DIRECTORY}/../access.log"
"#;

    #[test]
    fn the_gateways_file_paths_take_the_credentials_folder() {
        use crate::config::{Config, TEST_NOW};
        let creds = Path::new("/run/credentials/portcullis.service");
        let c = Config::parse_with_credentials(
            TLS_FROM_CREDENTIALS,
            "/etc/portcullis/p.toml",
            TEST_NOW,
            Some(creds),
        )
        .unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(tls.certificate, creds.join("gateway.pem"));
        assert_eq!(tls.key, creds.join("gateway.key"));
        assert_eq!(
            tls.client_ca.unwrap(),
            Path::new("/etc/portcullis/branch-ca.pem")
        );
        assert_eq!(c.log.access_file.unwrap(), creds.join("../access.log"));
    }

    #[test]
    fn a_credentials_reference_without_the_variable_names_each_key_and_place() {
        use crate::config::{Config, TEST_NOW};
        let err = Config::parse_with_credentials(TLS_FROM_CREDENTIALS, "p.toml", TEST_NOW, None)
            .unwrap_err();
        let lines: Vec<String> = err.problems.iter().map(|p| p.to_string()).collect();
        let want = [
            "p.toml:5:15: tls.certificate: ",
            "p.toml:6:7: tls.key: ",
            "p.toml:10:15: log.access_file: ",
        ];
        assert_eq!(lines.len(), want.len(), "{lines:#?}");
        for (line, prefix) in lines.iter().zip(want) {
            assert!(
                line.starts_with(prefix)
                    && line.contains("${CREDENTIALS_DIRECTORY} is not set")
                    && line.contains("LoadCredential="),
                "{line:?} vs {prefix}"
            );
        }
    }
}
