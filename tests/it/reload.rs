//! Reload on SIGHUP: a good file applies to new requests while open tunnels go on untouched; a
//! bad file is refused and the running policy stays; TLS certificate files are read again.

use crate::support::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn a_good_file_applies_to_new_requests_and_open_tunnels_go_on() {
    let mut origin = TcpOrigin::start(b"still here").await;
    let port = origin.addr.port();
    let mut gw = Gateway::start(GatewayConfig::for_origin(port)).await;
    let target = format!("{ORIGIN_HOST}:{port}");

    let (mut open, status) = open_tunnel(gw.addr, &target, b"").await;
    assert_eq!(status, 200);

    // The new file no longer lists the origin's port.
    let narrowed = GatewayConfig::for_origin(port).origin_rule(|rule| rule.ports(&[443]));
    std::fs::write(gw.config_path(), narrowed.to_string()).unwrap();
    gw.reload("reload applied").await;
    let (_denied, status) = open_tunnel(gw.addr, &target, b"").await;
    assert_eq!(status, 403, "new requests get the new policy");

    // The tunnel opened before the reload still carries bytes both ways.
    let reply = send_and_finish(&mut open, b"after reload").await;
    assert_eq!(reply, b"still here");
    assert_eq!(origin.received.recv().await.unwrap(), b"after reload");

    // A bad file is refused with its problems; the running policy stays.
    std::fs::write(gw.config_path(), "[policy]\nmode = \"sometimes\"\n").unwrap();
    let line = gw
        .reload("reload rejected; the running configuration stays")
        .await;
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
    let config = GatewayConfig::for_origin(port)
        .tls_listener("127.0.0.1:0", None)
        .tls("certificate", files.path().join("gateway.pem"))
        .tls("key", files.path().join("gateway.key"));
    let mut gw = Gateway::start(config).await;
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
    gw.reload("reload applied").await;
    assert!(
        handshake(&new_ca).await,
        "the new certificate is served after the reload"
    );
    assert!(!handshake(&old_ca).await, "the old one is gone");
}

/// 200 tunnels move data while the gateway reloads 100 times: no tunnel is dropped and no byte
/// is corrupted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_reloads_under_two_hundred_busy_tunnels_drop_nothing() {
    const TUNNELS: usize = 200;
    const ROUNDS: usize = 100;
    const CHUNK: usize = 4096;
    // An echo origin.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let mut gw =
        Gateway::start(GatewayConfig::for_origin(port).limit("max_connections", 1000)).await;
    let target = format!("{ORIGIN_HOST}:{port}");
    let mut tunnels = Vec::new();
    for _ in 0..TUNNELS {
        let (tcp, status) = open_tunnel(gw.addr, &target, b"").await;
        assert_eq!(status, 200);
        tunnels.push(tcp);
    }
    let movers: Vec<_> = tunnels
        .into_iter()
        .enumerate()
        .map(|(i, mut tcp)| {
            tokio::spawn(async move {
                let data = payload(CHUNK * ROUNDS, i as u64 + 1);
                let mut echoed = vec![0u8; data.len()];
                for round in 0..ROUNDS {
                    let part = &data[round * CHUNK..(round + 1) * CHUNK];
                    tcp.write_all(part).await.unwrap();
                    tcp.read_exact(&mut echoed[round * CHUNK..(round + 1) * CHUNK])
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                sha256_hex(&echoed) == sha256_hex(&data)
            })
        })
        .collect();
    let config = std::fs::read_to_string(gw.config_path()).unwrap();
    for i in 0..100 {
        // Alternate two equivalent files so every reload really swaps the snapshot.
        std::fs::write(gw.config_path(), format!("{config}\n# reload {i}\n")).unwrap();
        gw.reload("reload applied").await;
    }
    for mover in movers {
        assert!(
            tokio::time::timeout(Duration::from_secs(60), mover)
                .await
                .unwrap()
                .unwrap(),
            "bytes intact"
        );
    }
    assert!(gw.count_logs(|l| l["message"] == "reload applied") >= 100);
    // Every tunnel ended only when its client closed it, after all its bytes came back.
    for _ in 0..500 {
        if gw.count_logs(|l| l["target"] == "portcullis::access") == TUNNELS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let closed = gw.count_logs(|l| l["target"] == "portcullis::access" && l["end"] == "closed");
    assert_eq!(closed, TUNNELS);
}

#[tokio::test]
async fn close_denied_closes_only_the_tunnels_the_new_policy_denies() {
    let mut kept_origin = TcpOrigin::start(b"kept").await;
    let revoked_origin = TcpOrigin::start(b"").await;
    let (kept_port, revoked_port) = (kept_origin.addr.port(), revoked_origin.addr.port());
    let config = |ports: &[u16]| {
        GatewayConfig::for_origin(kept_port)
            .origin_rule(|rule| rule.ports(ports))
            .policy("on_reload", "close-denied")
    };
    let mut gw = Gateway::start(config(&[kept_port, revoked_port])).await;
    let (mut kept, status) = open_tunnel(gw.addr, &format!("{ORIGIN_HOST}:{kept_port}"), b"").await;
    assert_eq!(status, 200);
    let (mut revoked, status) =
        open_tunnel(gw.addr, &format!("{ORIGIN_HOST}:{revoked_port}"), b"").await;
    assert_eq!(status, 200);

    std::fs::write(gw.config_path(), config(&[kept_port]).to_string()).unwrap();
    gw.reload("reload applied").await;
    let line = gw
        .wait_log(|l| l["message"] == "closed open tunnels the new policy denies")
        .await;
    assert_eq!(line["closed_tunnels"], 1);
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), revoked.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the denied tunnel is closed");
    let line = gw.access_line(|l| l["port"] == revoked_port).await;
    assert_eq!(line["end"], "closed_by_reload");

    // The tunnel the new policy still allows carries on.
    let reply = send_and_finish(&mut kept, b"still allowed").await;
    assert_eq!(reply, b"kept");
    assert_eq!(kept_origin.received.recv().await.unwrap(), b"still allowed");
}

#[tokio::test]
async fn a_reload_that_changes_listener_addresses_rebinds_only_those() {
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let base = GatewayConfig::for_origin(port);
    let mut gw = Gateway::start(&base).await;
    let extra = format!("127.0.0.1:{}", free_port());

    let with_extra = base.clone().also_listen(&extra);
    std::fs::write(gw.config_path(), with_extra.to_string()).unwrap();
    gw.reload("reload applied").await;
    let _ = gw
        .wait_log(|l| l["message"] == "listening" && l["address"] == extra.as_str())
        .await;
    let (_tunnel, status) = open_tunnel(
        extra.parse().unwrap(),
        &format!("{ORIGIN_HOST}:{port}"),
        b"",
    )
    .await;
    assert_eq!(status, 200, "the new listener serves");
    let (_tunnel, status) = open_tunnel(gw.addr, &format!("{ORIGIN_HOST}:{port}"), b"").await;
    assert_eq!(status, 200, "the unchanged listener kept serving");

    std::fs::write(gw.config_path(), base.to_string()).unwrap();
    gw.reload("reload applied").await;
    let _ = gw
        .wait_log(|l| l["message"] == "stopped listening" && l["address"] == extra.as_str())
        .await;
    assert!(
        tokio::net::TcpStream::connect(&extra).await.is_err(),
        "the removed listener is closed"
    );
    let (_tunnel, status) = open_tunnel(gw.addr, &format!("{ORIGIN_HOST}:{port}"), b"").await;
    assert_eq!(status, 200);
}
