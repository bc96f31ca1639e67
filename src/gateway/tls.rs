//! TLS listeners: the proxy protocol inside TLS (rustls, TLS 1.2 and 1.3), optionally asking
//! for and verifying client certificates against a branch CA, and the names a verified client
//! certificate carries (DNS SANs and the subject CN) for branch identity.

use crate::config::{ClientCertificates, TlsSettings};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the acceptor for one TLS listener; reads the certificate, key and client CA files.
pub fn acceptor(
    settings: &TlsSettings,
    client_certificates: ClientCertificates,
) -> Result<TlsAcceptor, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&settings.certificate)
        .and_then(|certs| certs.collect())
        .map_err(|e| {
            format!(
                "{}: cannot read the certificate chain: {e}",
                settings.certificate.display()
            )
        })?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no certificate in the file",
            settings.certificate.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&settings.key).map_err(|e| {
        format!(
            "{}: cannot read the private key: {e}",
            settings.key.display()
        )
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let builder = match (client_certificates, &settings.client_ca) {
        (ClientCertificates::Off, _) | (_, None) => builder.with_no_client_auth(),
        (mode, Some(ca_path)) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca_path)
                .map_err(|e| format!("{}: cannot read the client CA: {e}", ca_path.display()))?
            {
                let cert = cert.map_err(|e| format!("{}: {e}", ca_path.display()))?;
                roots.add(cert).map_err(|e| {
                    format!("{}: not a usable CA certificate: {e}", ca_path.display())
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let verifier = match mode {
                ClientCertificates::Optional => verifier.allow_unauthenticated(),
                _ => verifier,
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| format!("{}: {e}", ca_path.display()))?,
            )
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        format!(
            "{}: certificate and key do not fit: {e}",
            settings.certificate.display()
        )
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Lowercase DNS SAN entries and the subject CN of a (verified) certificate.
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push(dns.trim_end_matches('.').to_ascii_lowercase());
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Ok(text) = cn.as_str() {
            names.push(text.trim_end_matches('.').to_ascii_lowercase());
        }
    }
    names
}
