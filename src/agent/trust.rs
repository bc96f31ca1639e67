//! The agent's TLS client settings: which certificate authorities it trusts (the system's roots,
//! and/or CA files for a private PKI and tests) and which certificate it presents to the gateway
//! (the branch's identity).

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
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
