//! The HTTPS proxy listener: the proxy protocol inside TLS, client certificates verified against
//! the branch CA and mapped to branches; bad certificates refused at the handshake and logged.

use crate::support::*;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GATEWAY_NAME: &str = "gateway.test";

struct TlsGateway {
    gw: Gateway,
    tls_addr: SocketAddr,
    _files: tempfile::TempDir,
}

/// A gateway with a TLS listener (client certificates `mode`), the branch `london` known by the
/// certificate name `london-fs1.contoso.example`, and `berlin` by credentials.
async fn tls_gateway(pki: &Pki, origin_port: u16, mode: &str) -> TlsGateway {
    let files = tempfile::tempdir().unwrap();
    let (cert, key) = pki.issue_pem(&[GATEWAY_NAME, "127.0.0.1"], 2099);
    std::fs::write(files.path().join("gateway.pem"), cert).unwrap();
    std::fs::write(files.path().join("gateway.key"), key).unwrap();
    std::fs::write(files.path().join("branch-ca.pem"), &pki.ca_pem).unwrap();
    let hash = portcullis::config::password::hash_password("s3cret").unwrap();
    let dir = files.path();
    let config = GatewayConfig::for_origin(origin_port)
        .tls_listener("127.0.0.1:0", Some(mode))
        .tls("certificate", dir.join("gateway.pem"))
        .tls("key", dir.join("gateway.key"))
        .tls("client_ca", dir.join("branch-ca.pem"))
        .tls("handshake_timeout", "2s")
        .branch(Branch::new("london").client_certificates(&["london-fs1.contoso.example"]))
        .branch(Branch::new("berlin").credentials("berlin-fs1", &hash));
    let gw = Gateway::start(config).await;
    let tls_addr = gw.tls_addr.unwrap();
    TlsGateway {
        gw,
        tls_addr,
        _files: files,
    }
}

/// TLS to the gateway with `identity`, then CONNECT inside; returns the status (or the error).
async fn connect_over_tls(
    pki: &Pki,
    gateway: SocketAddr,
    identity: Option<&(String, String)>,
    target: &str,
    headers: &str,
) -> Result<(tokio_rustls::client::TlsStream<tokio::net::TcpStream>, u16), String> {
    let connector =
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(pki.client_config_with(identity)));
    let tcp = tokio::net::TcpStream::connect(gateway).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(GATEWAY_NAME).unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{headers}\r\n");
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let status = status_of(&read_head_bytes(&mut tls).await?);
    Ok((tls, status))
}

#[tokio::test]
async fn a_valid_client_certificate_names_the_branch_and_bad_ones_are_refused() {
    let pki = Pki::new();
    let origin = TcpOrigin::start(b"over tls").await;
    let port = origin.addr.port();
    let mut t = tls_gateway(&pki, port, "required").await;
    let target = format!("{ORIGIN_HOST}:{port}");

    let london = pki.issue_pem(&["london-fs1.contoso.example"], 2099);
    let (mut tls, status) = connect_over_tls(&pki, t.tls_addr, Some(&london), &target, "")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let reply = send_and_finish(&mut tls, b"hello").await;
    assert_eq!(reply, b"over tls");
    let line =
        t.gw.access_line(|l| l["port"] == port && l["status"] == 200)
            .await;
    assert_eq!(
        (line["branch"].as_str(), line["bytes_up"].as_u64()),
        (Some("london"), Some(5))
    );

    let expired = pki.issue_pem(&["london-fs1.contoso.example"], 2020);
    let stranger = Pki::new().issue_pem(&["london-fs1.contoso.example"], 2099);
    let cases: [(Option<&(String, String)>, &str); 3] = [
        (Some(&expired), "expired"),
        (Some(&stranger), "badsignature"),
        (None, "no certificate"),
    ];
    for (identity, why) in cases {
        let result = connect_over_tls(&pki, t.tls_addr, identity, &target, "").await;
        assert!(
            result.is_err(),
            "{why}: the handshake must fail, got {:?}",
            result.map(|r| r.1)
        );
        let line =
            t.gw.access_line(|l| {
                let reason = l["reason"].as_str().unwrap_or_default();
                l["end"] == "tls_handshake_failed" && reason.to_ascii_lowercase().contains(why)
            })
            .await;
        assert!(
            line["reason"]
                .as_str()
                .unwrap()
                .starts_with("TLS handshake failed"),
            "{line}"
        );
    }
    // The gateway still serves.
    let (_tls, status) = connect_over_tls(&pki, t.tls_addr, Some(&london), &target, "")
        .await
        .unwrap();
    assert_eq!(status, 200);
}

#[tokio::test]
async fn an_optional_listener_admits_clients_without_a_certificate_by_credentials() {
    let pki = Pki::new();
    let tls_origin = Origin::start(&pki).await;
    let port = tls_origin.port();
    let mut t = tls_gateway(&pki, port, "optional").await;
    let target = format!("{ORIGIN_HOST}:{port}");

    let (_tls, status) = connect_over_tls(&pki, t.tls_addr, None, &target, "")
        .await
        .unwrap();
    assert_eq!(
        status, 407,
        "no certificate, no credentials: authentication required"
    );
    let (_tls, status) = connect_over_tls(
        &pki,
        t.tls_addr,
        None,
        &target,
        &basic("berlin-fs1", "s3cret"),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);

    // A real client through the HTTPS proxy: reqwest, TLS to the gateway and TLS to the origin.
    let london = pki.issue_pem(&["london-fs1.contoso.example"], 2099);
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(format!("https://{}", t.tls_addr)).unwrap())
        .tls_backend_preconfigured(pki.client_config_with(Some(&london)))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let url = format!("https://{ORIGIN_HOST}:{port}/download?bytes=100000");
    let resp = client.get(url).send().await.unwrap();
    let want = resp.headers()["x-sha256"].to_str().unwrap().to_owned();
    assert_eq!(sha256_hex(&resp.bytes().await.unwrap()), want);
    drop(client);
    let line = t.gw.access_line(|l| l["branch"] == "london").await;
    assert_eq!(
        (line["status"].as_u64(), line["end"].as_str()),
        (Some(200), Some("closed"))
    );
}

#[tokio::test]
async fn a_client_that_never_finishes_the_handshake_is_cut_at_the_timeout() {
    let pki = Pki::new();
    let origin = TcpOrigin::start(b"ok").await;
    let mut t = tls_gateway(&pki, origin.addr.port(), "required").await;
    let mut silent = tokio::net::TcpStream::connect(t.tls_addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        silent.read_to_end(&mut rest),
    )
    .await;
    assert!(closed.is_ok(), "the gateway closes a silent TLS client");
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(1900),
        "not before handshake_timeout (2 s)"
    );
    let line =
        t.gw.access_line(|l| l["reason"] == "TLS handshake timed out")
            .await;
    assert_eq!(line["end"], "tls_handshake_failed");
}

/// A refused client certificate is named to the client by a TLS alert (here
/// `certificate_expired`, as rustls's verifier reports an expired certificate), in TLS 1.3 (the
/// alert follows the client's finished handshake, so it arrives at the first read) and TLS 1.2
/// (the handshake itself fails with it); not a bare end of file.
#[tokio::test]
async fn an_expired_client_certificate_gets_the_certificate_expired_alert() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pki = Pki::new();
    let origin = TcpOrigin::start(b"ok").await;
    let port = origin.addr.port();
    let mut t = tls_gateway(&pki, port, "required").await;
    let target = format!("{ORIGIN_HOST}:{port}");
    let (cert, key) = pki.issue_pem(&["london-fs1.contoso.example"], 2020);
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_der.clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_protocol_versions(&[version])
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(t.tls_addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(GATEWAY_NAME).unwrap();
        let failure = match connector.connect(name, tcp).await {
            Err(e) => e,
            Ok(mut tls) => {
                let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
                tls.write_all(request.as_bytes()).await.unwrap();
                let mut buf = [0u8; 512];
                let read =
                    tokio::time::timeout(std::time::Duration::from_secs(10), tls.read(&mut buf))
                        .await
                        .expect("the gateway answers or closes within 10 s");
                read.expect_err("the session is refused")
            }
        };
        let alert = failure
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        assert!(
            matches!(
                alert,
                Some(rustls::Error::AlertReceived(
                    rustls::AlertDescription::CertificateExpired
                ))
            ),
            "{version:?}: expected the certificate_expired alert, got {failure}"
        );
    }
    // The gateway's line still says why.
    t.gw.access_line(|l| {
        l["end"] == "tls_handshake_failed"
            && l["reason"]
                .as_str()
                .is_some_and(|r| r.to_ascii_lowercase().contains("expired"))
    })
    .await;
}
