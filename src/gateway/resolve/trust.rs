//! Trust in encrypted DNS servers: a rustls client config whose only roots are the certificates
//! of `resolver.ca` (no built-in roots, so trust is explicit), and a note of the last refused
//! certificate. hickory reports a failed handshake as a plain connection failure; the note lets
//! the lookup's error say "not signed by resolver.ca" instead.

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The last certificate refused, and when; cleared by the next one accepted. Touched only
/// during handshakes (new connections to the resolver), never per query.
#[derive(Debug, Default)]
pub(crate) struct Verdicts {
    refused: Mutex<Option<(Instant, String)>>,
}

impl Verdicts {
    /// Why a certificate was refused at or after `since`, if one was.
    pub(crate) fn refused_since(&self, since: Instant) -> Option<String> {
        let refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        refused
            .as_ref()
            .filter(|(at, _)| *at >= since)
            .map(|(_, why)| why.clone())
    }

    fn note(&self, verdict: Option<String>) {
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        *refused = verdict.map(|why| (Instant::now(), why));
    }
}

/// The client config for encrypted DNS, trusting only the CA certificates in `ca` (PEM).
pub(crate) fn client_config(ca: &Path) -> Result<(rustls::ClientConfig, Arc<Verdicts>), String> {
    let shown = ca.display();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)
        .map_err(|e| format!("{shown}: cannot read the resolver CA (resolver.ca): {e}"))?
    {
        let cert = cert.map_err(|e| format!("{shown}: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("{shown}: not a usable CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "{shown}: no certificate in the resolver CA file (resolver.ca)"
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("{shown}: {e}"))?;
    let verdicts = Arc::new(Verdicts::default());
    let verifier = Noting {
        inner,
        verdicts: verdicts.clone(),
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok((config, verdicts))
}

/// WebPKI verification against `resolver.ca`, unchanged, noting each verdict.
#[derive(Debug)]
struct Noting {
    inner: Arc<WebPkiServerVerifier>,
    verdicts: Arc<Verdicts>,
}

impl ServerCertVerifier for Noting {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        self.verdicts.note(
            verdict
                .as_ref()
                .err()
                .map(|e| describe(e, &server_name.to_str())),
        );
        verdict
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// An operator's reading of a refused certificate.
fn describe(e: &rustls::Error, name: &str) -> String {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            format!("the certificate of {name} is not signed by resolver.ca (unknown issuer)")
        }
        // The issuer's name is in resolver.ca, but its key did not sign this certificate.
        rustls::Error::InvalidCertificate(CertificateError::BadSignature) => format!(
            "the certificate of {name} is not signed by resolver.ca (a CA of the same name but \
             another key)"
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!("the certificate is not valid for {name} (the name after `#`)"),
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => format!("the certificate of {name} has expired"),
        other => format!("the certificate of {name} was refused: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_counts_only_after_the_lookup_started_and_an_acceptance_clears_it() {
        let verdicts = Verdicts::default();
        let before = Instant::now();
        verdicts.note(Some("unknown issuer".into()));
        assert_eq!(
            verdicts.refused_since(before).as_deref(),
            Some("unknown issuer")
        );
        let later = Instant::now() + std::time::Duration::from_secs(1);
        assert_eq!(verdicts.refused_since(later), None);
        verdicts.note(None);
        assert_eq!(verdicts.refused_since(before), None);
    }

    #[test]
    fn unknown_issuer_is_named_as_a_trust_failure() {
        let e = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        assert_eq!(
            describe(&e, "dns.example"),
            "the certificate of dns.example is not signed by resolver.ca (unknown issuer)"
        );
    }

    #[test]
    fn a_missing_or_empty_ca_file_is_an_error_not_an_empty_trust_store() {
        let dir = std::env::temp_dir().join(format!("portcullis-trust-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let err = client_config(&empty).unwrap_err();
        assert!(err.contains("no certificate"), "{err}");
        let err = client_config(&dir.join("missing.pem")).unwrap_err();
        assert!(err.contains("cannot read the resolver CA"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
