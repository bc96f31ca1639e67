//! The agent's TLS client settings: which certificate authorities it trusts (the system's roots,
//! and/or CA files for a private PKI and tests) and which certificate it presents to the gateway
//! (the branch's identity), with that certificate's validity: a gateway refuses an expired one,
//! and the agent says so itself, with the date, rather than leave it to a failed handshake.

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Trust roots: the system's (when `system` is set) plus every certificate in `ca_files`.
pub fn roots(system: bool, ca_files: &[impl AsRef<Path>]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    if system {
        // Unreadable individual files are skipped: one broken bundle must not stop the check.
        let found = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(found.certs);
    }
    for path in ca_files {
        let path = path.as_ref();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect())
            .map_err(|e| format!("{}: cannot read the CA file: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no certificate in the file", path.display()));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
        }
    }
    if roots.is_empty() {
        return Err(
            "no trusted certificate authority: the system has none; give one with --ca".into(),
        );
    }
    Ok(roots)
}

/// A client config trusting `roots`, presenting the certificate chain and key in
/// `identity` (PEM files) when given.
pub fn client_config(
    roots: RootCertStore,
    identity: Option<(&Path, &Path)>,
    alpn_http1: bool,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert_path, key_path)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
                .and_then(|certs| certs.collect())
                .map_err(|e| {
                    format!(
                        "{}: cannot read the client certificate: {e}",
                        cert_path.display()
                    )
                })?;
            if chain.is_empty() {
                return Err(format!(
                    "{}: no certificate in the file",
                    cert_path.display()
                ));
            }
            let key = PrivateKeyDer::from_pem_file(key_path)
                .map_err(|e| format!("{}: cannot read the private key: {e}", key_path.display()))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                format!(
                    "{}: certificate and key do not fit: {e}",
                    cert_path.display()
                )
            })?
        }
    };
    if alpn_http1 {
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    Ok(Arc::new(config))
}

/// The branch's client certificate (the chain's first), as far as its validity goes.
#[derive(Clone, Debug)]
pub struct ClientCertificate {
    pub path: PathBuf,
    /// The subject, e.g. `CN=london-fs1.contoso.example`.
    pub subject: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

/// Where a certificate stands at a moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Validity {
    /// Valid, with this many whole days left.
    Valid {
        days_left: i64,
    },
    NotYetValid,
    Expired,
}

impl ClientCertificate {
    /// Reads the chain at `path` and takes its first certificate's subject and dates.
    pub fn load(path: &Path) -> Result<Self, String> {
        let first = CertificateDer::pem_file_iter(path)
            .and_then(|mut certs| certs.next().transpose())
            .map_err(|e| {
                format!(
                    "{}: cannot read the client certificate: {e}",
                    path.display()
                )
            })?
            .ok_or_else(|| format!("{}: no certificate in the file", path.display()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&first)
            .map_err(|e| format!("{}: not a readable X.509 certificate: {e}", path.display()))?;
        let validity = cert.validity();
        Ok(Self {
            path: path.to_owned(),
            subject: cert.subject().to_string(),
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
        })
    }

    /// Where the certificate stands at `now` (Unix seconds).
    pub fn validity(&self, now: i64) -> Validity {
        if now < self.not_before {
            Validity::NotYetValid
        } else if now > self.not_after {
            Validity::Expired
        } else {
            Validity::Valid {
                days_left: (self.not_after - now) / 86_400,
            }
        }
    }

    /// Where it stands at `now`, in words: `expired on 2020-01-01T00:00:00Z`, `not valid
    /// before ...`, `valid until ... (N days left)`.
    pub fn describe(&self, now: i64) -> String {
        match self.validity(now) {
            Validity::Valid { days_left } => format!(
                "valid until {} ({days_left} days left)",
                date(self.not_after)
            ),
            Validity::Expired => format!("expired on {}", date(self.not_after)),
            Validity::NotYetValid => format!(
                "not valid before {} (this machine's clock says {})",
                date(self.not_before),
                date(now)
            ),
        }
    }

    /// The sentence for a certificate that is not valid at `now`: the file, the subject, the
    /// date and what to do; `None` while it is valid.
    pub fn problem(&self, now: i64) -> Option<String> {
        let advice = match self.validity(now) {
            Validity::Valid { .. } => return None,
            Validity::Expired => "a gateway refuses it; renew it",
            Validity::NotYetValid => "check this machine's clock",
        };
        Some(format!(
            "the client certificate {} ({}) {}: {advice}",
            self.path.display(),
            self.subject,
            self.describe(now)
        ))
    }
}

/// Now, in Unix seconds.
pub fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// Unix seconds as an RFC 3339 time in UTC, e.g. `2020-01-01T00:00:00Z`.
pub fn date(seconds: i64) -> String {
    jiff::Timestamp::from_second(seconds)
        .map_or_else(|_| format!("{seconds} (Unix time)"), |t| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(not_before: (i32, u8, u8), not_after: (i32, u8, u8)) -> tempfile::NamedTempFile {
        let mut params =
            rcgen::CertificateParams::new(vec!["london-fs1.contoso.example".to_owned()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "london-fs1.contoso.example");
        params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), cert.pem()).unwrap();
        file
    }

    #[test]
    fn a_certificate_names_its_dates_when_it_is_not_valid() {
        let file = certificate((2019, 1, 1), (2020, 1, 1));
        let cert = ClientCertificate::load(file.path()).unwrap();
        assert_eq!(cert.subject, "CN=london-fs1.contoso.example");
        assert_eq!(date(cert.not_after), "2020-01-01T00:00:00Z");
        let before = cert.not_before - 1;
        let during = cert.not_before + 86_400 * 10;
        assert_eq!(cert.validity(before), Validity::NotYetValid);
        assert!(matches!(cert.validity(during), Validity::Valid { days_left } if days_left > 300));
        assert_eq!(cert.validity(cert.not_after + 1), Validity::Expired);
        assert_eq!(cert.problem(during), None);
        let expired = cert.problem(now()).unwrap();
        assert!(
            expired.contains("expired on 2020-01-01T00:00:00Z")
                && expired.contains("CN=london-fs1.contoso.example")
                && expired.contains(&file.path().display().to_string()),
            "{expired}"
        );
        let early = cert.problem(before).unwrap();
        assert!(
            early.contains("not valid before 2019-01-01T00:00:00Z"),
            "{early}"
        );

        let empty = tempfile::NamedTempFile::new().unwrap();
        let err = ClientCertificate::load(empty.path()).unwrap_err();
        assert!(err.contains("no certificate"), "{err}");
    }
}
