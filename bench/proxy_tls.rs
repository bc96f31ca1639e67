//! The gateway's HTTPS listener as the load generator meets it: a PKI of its own (`loadgen pki`
//! writes the gateway's certificate and key, the CA that signs it and the branch's client
//! certificate) and a TLS connection to the proxy that presents the client certificate, inside
//! which the CONNECT goes as on the plain listener.

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// The name on the gateway's certificate (the client verifies it).
pub const GATEWAY_NAME: &str = "gateway.bench.test";
/// The name on the branch's client certificate (a `[[branch]]` may list it).
pub const CLIENT_NAME: &str = "branch.bench.test";

/// Writes `ca.pem` (signs both), `gateway.pem` + `gateway.key`, `client.pem` + `client.key`.
pub fn write_pki(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    std::fs::create_dir_all(dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    for (file, name) in [("gateway", GATEWAY_NAME), ("client", CLIENT_NAME)] {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
    }
}

fn pem_der(text: &str) -> Vec<u8> {
    use base64::Engine;
    let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}

/// A connector trusting `dir`'s CA and presenting its client certificate; made once.
pub fn connector(dir: &Path) -> tokio_rustls::TlsConnector {
    static CONNECTOR: OnceLock<tokio_rustls::TlsConnector> = OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from(pem_der(&read("ca.pem"))))
                .unwrap();
            let chain = vec![CertificateDer::from(pem_der(&read("client.pem")))];
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pem_der(&read("client.key"))));
            let config = rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_client_auth_cert(chain, key)
                .unwrap();
            tokio_rustls::TlsConnector::from(Arc::new(config))
        })
        .clone()
}

/// The gateway's name as the client verifies it.
pub fn gateway_name() -> ServerName<'static> {
    ServerName::try_from(GATEWAY_NAME).unwrap()
}
