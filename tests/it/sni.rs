//! SNI verification inside tunnels: the ClientHello's server name must fit the CONNECT target;
//! a different name, no name, or bytes that are not TLS close the tunnel.

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The usual config, with the test-origin rule checking SNI in `mode`.
fn with_sni(origin_port: u16, mode: &str) -> GatewayConfig {
    GatewayConfig::for_origin(origin_port).origin_rule(|rule| rule.set("sni", mode))
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
    let mut gw = Gateway::start(with_sni(port, "match")).await;

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
    let gw = Gateway::start(with_sni(port, "off")).await;
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
    let literal = Rule::new("literal")
        .addresses(&["127.0.0.1/32"])
        .ports(&[port])
        .set("sni", "match");
    let mut gw = Gateway::start(with_sni(port, "match").rule(literal)).await;

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
    let mut gw = Gateway::start(with_sni(port, "match")).await;
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

/// The first flight of a rustls client for `sni` whose key exchange groups are `groups`, in
/// order (it sends a key share for the first one only).
fn first_flight(
    pki: &Pki,
    sni: &str,
    groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
) -> Vec<u8> {
    let provider = rustls::crypto::CryptoProvider {
        kx_groups: groups,
        ..rustls::crypto::ring::default_provider()
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// A first hello that makes the secp256r1-only origin ask for another key share.
fn hello_for_a_retry(pki: &Pki) -> Vec<u8> {
    use rustls::crypto::ring::kx_group::{SECP256R1, X25519};
    first_flight(pki, ORIGIN_HOST, vec![X25519, SECP256R1])
}

/// A second hello as an attacker would send it: another client's first flight, for `sni`,
/// with the key share the origin asked for.
fn second_hello(pki: &Pki, sni: &str) -> Vec<u8> {
    first_flight(pki, sni, vec![rustls::crypto::ring::kx_group::SECP256R1])
}

/// One whole TLS record from the tunnel, within 15 s.
async fn read_record(tunnel: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut record = vec![0u8; 5];
    let read = async {
        tunnel.read_exact(&mut record).await?;
        let len = usize::from(u16::from_be_bytes([record[3], record[4]]));
        record.resize(5 + len, 0);
        tunnel.read_exact(&mut record[5..]).await
    };
    tokio::time::timeout(std::time::Duration::from_secs(15), read)
        .await
        .expect("a record in time")
        .expect("a whole record");
    record
}

fn is_hello_retry(record: &[u8]) -> bool {
    let random = ring::digest::digest(&ring::digest::SHA256, b"HelloRetryRequest");
    record[0] == 22 && record.get(5) == Some(&2) && record.get(11..43) == Some(random.as_ref())
}

/// What else comes through the tunnel until it closes (within 15 s), as record types.
async fn record_types_until_closed(tunnel: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(15),
        tunnel.read_to_end(&mut rest),
    )
    .await
    .expect("the tunnel is closed")
    .ok();
    let mut types = Vec::new();
    let mut at = 0;
    while let Some(header) = rest.get(at..at + 5) {
        types.push(header[0]);
        at += 5 + usize::from(u16::from_be_bytes([header[3], header[4]]));
    }
    types
}

#[tokio::test]
async fn a_second_client_hello_after_a_hello_retry_must_name_the_same_server() {
    let pki = Pki::new();
    let mut origin = RetryOrigin::start(&pki).await;
    let port = origin.port();
    let mut gw = Gateway::start(with_sni(port, "match")).await;

    // The first hello names the CONNECT host; after the origin's HelloRetryRequest, a second
    // one names another server.
    let (mut tunnel, status) = open_tunnel(gw.addr, &format!("{ORIGIN_HOST}:{port}"), b"").await;
    assert_eq!(status, 200);
    let first = hello_for_a_retry(&pki);
    tunnel.write_all(&first).await.unwrap();
    let retry = read_record(&mut tunnel).await;
    assert!(
        is_hello_retry(&retry),
        "the origin asks for another key share"
    );
    tunnel
        .write_all(&second_hello(&pki, "evil.example"))
        .await
        .unwrap();
    let after = record_types_until_closed(&mut tunnel).await;
    assert!(
        after.iter().all(|&t| t == 20),
        "nothing but the origin's ChangeCipherSpec follows the retry: {after:?}"
    );
    let seen = origin.next_seen().await;
    assert_eq!(
        seen.hellos,
        [Some(ORIGIN_HOST.to_owned())],
        "no ClientHello for evil.example reached the origin"
    );
    assert_eq!(seen.completed, None);
    let line = gw.access_line(|l| l["port"] == port).await;
    assert_eq!(
        (line["end"].as_str(), line["status"].as_u64()),
        (Some("sni_mismatch"), Some(200))
    );
    assert_eq!(line["sni"], "evil.example");
    assert_eq!(
        line["reason"],
        format!("second ClientHello after HelloRetryRequest names evil.example, not {ORIGIN_HOST}")
    );
    assert_eq!(
        line["bytes_up"],
        first.len(),
        "only the first hello went up"
    );
    assert!(line["bytes_down"].as_u64().unwrap() >= retry.len() as u64);

    // A second hello without a server name (rustls sends none for an IP address).
    let (mut tunnel, _) = open_tunnel(gw.addr, &format!("{ORIGIN_HOST}:{port}"), b"").await;
    tunnel.write_all(&hello_for_a_retry(&pki)).await.unwrap();
    assert!(is_hello_retry(&read_record(&mut tunnel).await));
    tunnel
        .write_all(&second_hello(&pki, "127.0.0.1"))
        .await
        .unwrap();
    record_types_until_closed(&mut tunnel).await;
    let line = gw.access_line(|l| l["end"] == "sni_missing").await;
    assert_eq!(
        line["reason"],
        "after HelloRetryRequest: ClientHello carries no server name"
    );
    assert_eq!(
        origin.next_seen().await.hellos,
        [Some(ORIGIN_HOST.to_owned())]
    );
}

#[tokio::test]
async fn a_second_client_hello_sent_with_the_first_waits_for_the_answer_and_is_checked() {
    let pki = Pki::new();
    let mut origin = RetryOrigin::start(&pki).await;
    let port = origin.port();
    let mut gw = Gateway::start(with_sni(port, "match")).await;

    // Both hellos in one write: the second must not reach the origin before it is checked.
    let first = hello_for_a_retry(&pki);
    let both = [first.clone(), second_hello(&pki, "evil.example")].concat();
    let (mut tunnel, status) = open_tunnel(gw.addr, &format!("{ORIGIN_HOST}:{port}"), &both).await;
    assert_eq!(status, 200);
    assert!(is_hello_retry(&read_record(&mut tunnel).await));
    record_types_until_closed(&mut tunnel).await;
    assert_eq!(
        origin.next_seen().await.hellos,
        [Some(ORIGIN_HOST.to_owned())],
        "no ClientHello for evil.example reached the origin"
    );
    let line = gw.access_line(|l| l["port"] == port).await;
    assert_eq!(line["end"], "sni_mismatch");
    assert_eq!(line["sni"], "evil.example");
    assert_eq!(line["bytes_up"], first.len());
}

#[tokio::test]
async fn a_client_asked_to_retry_completes_its_handshake_through_the_check() {
    let pki = Pki::new();
    let mut origin = RetryOrigin::start(&pki).await;
    let port = origin.port();
    let mut gw = Gateway::start(with_sni(port, "match")).await;

    // rustls offers x25519 first: the origin asks for secp256r1, the client says hello again
    // (after a ChangeCipherSpec, in middlebox compatibility mode) with the same name.
    let resp = client(&pki, gw.addr)
        .get(format!("https://{ORIGIN_HOST}:{port}/download?bytes=5000"))
        .send()
        .await
        .expect("the handshake completes through the tunnel");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().len(), 5000);
    let seen = origin.next_seen().await;
    assert_eq!(
        seen.completed,
        Some(rustls::HandshakeKind::FullWithHelloRetryRequest)
    );
    assert_eq!(seen.hellos, vec![Some(ORIGIN_HOST.to_owned()); 2]);
    let line = gw.access_line(|l| l["port"] == port).await;
    assert_eq!(
        (line["sni"].as_str(), line["end"].as_str()),
        (Some(ORIGIN_HOST), Some("closed"))
    );
    assert!(line["bytes_down"].as_u64().unwrap() > 5000);
}
