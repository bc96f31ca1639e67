//! SNI verification inside tunnels: the ClientHello's server name must fit the CONNECT target;
//! a different name, no name, or bytes that are not TLS close the tunnel.

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The usual config, with the test-origin rule checking SNI in `mode`, plus `extra`.
fn with_sni(origin_port: u16, mode: &str, extra: &str) -> String {
    config_for(origin_port, &format!("{extra}\n{}", resolver_hosts(""))).replacen(
        "private_addresses = [\"127.0.0.1/32\"]",
        &format!("private_addresses = [\"127.0.0.1/32\"]\nsni = \"{mode}\""),
        1,
    )
}

/// A TLS handshake with `sni` through an open tunnel; true when it completes.
async fn handshake_through(pki: &Pki, tunnel: tokio::net::TcpStream, sni: &str) -> bool {
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(pki.client_config()));
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    connector.connect(name, tunnel).await.is_ok()
}

#[tokio::test]
async fn a_matching_sni_passes_and_any_other_name_is_cut() {
    let pki = Pki::new();
    let origin = Origin::start(&pki).await;
    let port = origin.port();
    let mut gw = Gateway::start(&with_sni(port, "match", "")).await;

    assert_serves(&pki, gw.addr, &origin).await;
    let line = gw
        .access_line(|l| l["port"] == port && l["status"] == 200)
        .await;
    assert_eq!(
        (line["sni"].as_str(), line["end"].as_str()),
        (Some(ORIGIN_HOST), Some("closed"))
    );

    // Domain fronting: CONNECT to an allowed host, ClientHello for another.
    let (tunnel, status) = open_tunnel(gw.addr, &format!("{ORIGIN_HOST}:{port}"), b"").await;
    assert_eq!(status, 200);
    assert!(
        !handshake_through(&pki, tunnel, "evil.example").await,
        "the tunnel is cut"
    );
    let line = gw.access_line(|l| l["end"] == "sni_mismatch").await;
    assert_eq!(line["sni"], "evil.example");
    assert_eq!(
        line["reason"],
        format!("SNI evil.example does not match CONNECT host {ORIGIN_HOST}")
    );
    assert_eq!(
        line["bytes_up"], 0,
        "nothing of the ClientHello reached the origin"
    );

    // A ClientHello without a server name (rustls sends none for an IP address).
    let (tunnel, _) = open_tunnel(gw.addr, &format!("{ORIGIN_HOST}:{port}"), b"").await;
    assert!(!handshake_through(&pki, tunnel, "127.0.0.1").await);
    let line = gw.access_line(|l| l["end"] == "sni_missing").await;
    assert_eq!(line["reason"], "ClientHello carries no server name");

    // Not TLS at all.
    let (mut tunnel, _) = open_tunnel(gw.addr, &format!("{ORIGIN_HOST}:{port}"), b"").await;
    tunnel
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tunnel.read_to_end(&mut rest).await;
    assert!(rest.is_empty());
    assert_eq!(
        gw.access_line(|l| l["end"] == "not_tls").await["status"],
        200
    );
    assert_serves(&pki, gw.addr, &origin).await;
}

#[tokio::test]
async fn sni_off_lets_any_bytes_through() {
    let mut origin = TcpOrigin::start(b"plain reply").await;
    let port = origin.addr.port();
    let gw = Gateway::start(&with_sni(port, "off", "")).await;
    let (mut tunnel, status) = open_tunnel(gw.addr, &format!("{ORIGIN_HOST}:{port}"), b"").await;
    assert_eq!(status, 200);
    let reply = send_and_finish(&mut tunnel, b"not tls").await;
    assert_eq!(reply, b"plain reply");
    assert_eq!(origin.received.recv().await.unwrap(), b"not tls");
}

#[tokio::test]
async fn an_ip_literal_target_needs_an_sni_the_policy_allows() {
    let pki = Pki::new();
    let origin = Origin::start(&pki).await;
    let port = origin.port();
    let literal = format!(
        "[[policy.allow]]\nname = \"literal\"\naddresses = [\"127.0.0.1/32\"]\nports = [{port}]\nsni = \"match\"\n"
    );
    let mut gw = Gateway::start(&with_sni(port, "match", &literal)).await;

    let (tunnel, status) = open_tunnel(gw.addr, &format!("127.0.0.1:{port}"), b"").await;
    assert_eq!(status, 200);
    assert!(
        handshake_through(&pki, tunnel, ORIGIN_HOST).await,
        "an allowed name passes"
    );
    let (tunnel, _) = open_tunnel(gw.addr, &format!("127.0.0.1:{port}"), b"").await;
    assert!(!handshake_through(&pki, tunnel, "evil.example").await);
    let line = gw.access_line(|l| l["end"] == "sni_mismatch").await;
    assert_eq!(
        line["reason"],
        "SNI evil.example is not allowed on this port"
    );
}

#[tokio::test]
async fn curl_through_the_proxy_passes_the_sni_check() {
    let pki = Pki::new();
    let origin = Origin::start(&pki).await;
    let port = origin.port();
    let mut gw = Gateway::start(&with_sni(port, "match", "")).await;
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), &pki.ca_pem).unwrap();
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-x",
            &format!("http://{}", gw.addr),
            "--cacert",
        ])
        .arg(ca.path())
        .arg(format!("https://{ORIGIN_HOST}:{port}/download?bytes=5000"))
        .output()
        .await
        .expect("curl is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), 5000);
    let line = gw.access_line(|l| l["sni"] == ORIGIN_HOST).await;
    assert_eq!(line["status"], 200);
    // curl may reset rather than close once it has its answer (unread close_notify): either
    // way the tunnel was not cut by the SNI check.
    let end = line["end"].as_str().unwrap();
    assert!(end == "closed" || end == "client_error", "{line}");
}
