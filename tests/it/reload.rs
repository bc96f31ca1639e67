//! Reload on SIGHUP: a good file applies to new requests while open tunnels go on untouched; a
//! bad file is refused and the running policy stays; TLS certificate files are read again.

use crate::support::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn reload(gw: &mut Gateway, message: &str) -> serde_json::Value {
    let before = gw.count_logs(|l| l["message"] == message);
    gw.signal("HUP");
    for _ in 0..500 {
        if gw.count_logs(|l| l["message"] == message) > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.wait_log(|l| l["message"] == message).await
}

#[tokio::test]
async fn a_good_file_applies_to_new_requests_and_open_tunnels_go_on() {
    let mut origin = TcpOrigin::start(b"still here").await;
    let port = origin.addr.port();
    let mut gw = Gateway::start(&config_for(port, &resolver_hosts(""))).await;
    let target = format!("{ORIGIN_HOST}:{port}");

    let (mut open, status) = open_tunnel(gw.addr, &target, b"").await;
    assert_eq!(status, 200);

    // The new file no longer lists the origin's port.
    let narrowed = config_for(port, &resolver_hosts(""))
        .replace(&format!("ports = [{port}]"), "ports = [443]");
    std::fs::write(gw.config_path(), narrowed).unwrap();
    reload(&mut gw, "reload applied").await;
    let (_denied, status) = open_tunnel(gw.addr, &target, b"").await;
    assert_eq!(status, 403, "new requests get the new policy");

    // The tunnel opened before the reload still carries bytes both ways.
    open.write_all(b"after reload").await.unwrap();
    open.shutdown().await.unwrap();
    let mut reply = Vec::new();
    open.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"still here");
    assert_eq!(origin.received.recv().await.unwrap(), b"after reload");

    // A bad file is refused with its problems; the running policy stays.
    std::fs::write(gw.config_path(), "[policy]\nmode = \"sometimes\"\n").unwrap();
    let line = reload(&mut gw, "reload rejected; the running configuration stays").await;
    assert!(
        line["problems"]
            .as_str()
            .unwrap()
            .contains("portcullis.toml:2:8"),
        "{line}"
    );
    let (_denied, status) = open_tunnel(gw.addr, &target, b"").await;
    assert_eq!(status, 403, "still the narrowed policy");
    let (_denied, status) = open_tunnel(gw.addr, "evil.example:443", b"").await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn a_reload_reads_the_tls_certificate_again() {
    let old_ca = Pki::new();
    let new_ca = Pki::new();
    let origin = TcpOrigin::start(b"ok").await;
    let port = origin.addr.port();
    let files = tempfile::tempdir().unwrap();
    let write_cert = |pki: &Pki| {
        let (cert, key) = pki.issue_pem(&["gateway.test"], 2099);
        std::fs::write(files.path().join("gateway.pem"), cert).unwrap();
        std::fs::write(files.path().join("gateway.key"), key).unwrap();
    };
    write_cert(&old_ca);
    let dir = files.path().display();
    let config = config_for(
        port,
        &format!(
            "[tls]\ncertificate = \"{dir}/gateway.pem\"\nkey = \"{dir}/gateway.key\"\n\n{}",
            resolver_hosts("")
        ),
    )
    .replace(
        "admin = \"127.0.0.1:0\"",
        "admin = \"127.0.0.1:0\"\n\n[[listen.tls_proxy]]\naddress = \"127.0.0.1:0\"",
    );
    let mut gw = Gateway::start(&config).await;
    let tls_addr = gw.tls_addr.unwrap();

    let handshake = |pki: &Pki| {
        let connector =
            tokio_rustls::TlsConnector::from(std::sync::Arc::new(pki.client_config_with(None)));
        async move {
            let tcp = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("gateway.test").unwrap();
            connector.connect(name, tcp).await.is_ok()
        }
    };
    assert!(handshake(&old_ca).await, "the first certificate is served");
    write_cert(&new_ca);
    reload(&mut gw, "reload applied").await;
    assert!(
        handshake(&new_ca).await,
        "the new certificate is served after the reload"
    );
    assert!(!handshake(&old_ca).await, "the old one is gone");
}
