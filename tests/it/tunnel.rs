//! Allowed tunnels: bytes arrive intact both ways, early data and half-close are carried, idle
//! tunnels are closed, and the canonical log line says what happened.

use crate::support::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_and_sixty_four_mib_cross_the_tunnel_intact_both_ways() {
    let pki = Pki::new();
    let origin = Origin::start(&pki).await;
    let mut gw = Gateway::start(GatewayConfig::for_origin(origin.port())).await;
    let base = format!("https://{ORIGIN_HOST}:{}", origin.port());

    for size in [MIB, 64 * MIB] {
        let before = gw.access_count();
        let resp = client(&pki, gw.addr)
            .get(format!("{base}/download?bytes={size}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let want = resp.headers()["x-sha256"].to_str().unwrap().to_owned();
        let body = resp.bytes().await.unwrap();
        assert_eq!(body.len(), size);
        assert_eq!(
            sha256_hex(&body),
            want,
            "download of {size} bytes arrived intact"
        );

        let upload = payload(size, 7 + size as u64);
        let resp = client(&pki, gw.addr)
            .post(format!("{base}/upload"))
            .body(upload.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.text().await.unwrap(),
            format!("{size} {}", sha256_hex(&upload)),
            "upload of {size} bytes arrived intact"
        );

        // One canonical line per tunnel, with the bytes each way.
        let down = gw
            .access_line(|l| {
                l["bytes_down"].as_u64().unwrap_or(0) >= size as u64
                    && l["bytes_up"].as_u64() < Some(size as u64)
            })
            .await;
        let up = gw
            .access_line(|l| l["bytes_up"].as_u64().unwrap_or(0) >= size as u64)
            .await;
        for line in [&down, &up] {
            assert_eq!(line["host"], ORIGIN_HOST);
            assert_eq!(line["port"], origin.port());
            assert_eq!(line["resolved"], format!("127.0.0.1:{}", origin.port()));
            assert_eq!(line["verdict"], "allow");
            assert_eq!(line["rule"], "test-origin");
            assert_eq!(line["category"], "storage");
            assert_eq!(line["reason"], "allowed");
            assert_eq!(line["status"], 200);
            assert_eq!(line["end"], "closed");
            assert!(line["client"].as_str().unwrap().starts_with("127.0.0.1:"));
            for field in ["conn_id", "connect_ms", "duration_ms", "timestamp"] {
                assert!(!line[field].is_null(), "access line has {field}: {line}");
            }
        }
        assert!(gw.access_count() >= before + 2);
    }
}

#[tokio::test]
async fn bytes_sent_after_the_head_are_forwarded_and_half_close_is_carried() {
    let mut origin = TcpOrigin::start(b"reply after your EOF").await;
    let port = origin.addr.port();
    let mut gw = Gateway::start(GatewayConfig::for_origin(port)).await;

    let target = format!("{ORIGIN_HOST}:{port}");
    let (mut tcp, status) = open_tunnel(gw.addr, &target, b"early bytes|").await;
    assert_eq!(status, 200);
    tcp.write_all(b"after the 200").await.unwrap();
    tcp.shutdown().await.unwrap();
    // The origin only answers once it has seen our EOF: the half-close crossed the tunnel, and
    // the other direction stayed open for the reply.
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, b"reply after your EOF");
    assert_eq!(
        origin.received.recv().await.unwrap(),
        b"early bytes|after the 200"
    );

    let line = gw.access_line(|l| l["port"] == port).await;
    assert_eq!(line["bytes_up"], 25);
    assert_eq!(line["bytes_down"], 20);
    assert_eq!(line["end"], "closed");
}

#[tokio::test]
async fn an_idle_tunnel_is_closed_after_the_idle_timeout() {
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let mut gw = Gateway::start(GatewayConfig::for_origin(port).timeout("idle", "1s")).await;

    let (mut tcp, status) = open_tunnel(gw.addr, &format!("{ORIGIN_HOST}:{port}"), b"").await;
    assert_eq!(status, 200);
    let opened = std::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut rest))
        .await
        .expect("idle tunnel closed")
        .ok();
    let after = opened.elapsed();
    assert!(
        after >= Duration::from_millis(900),
        "closed too early: {after:?}"
    );
    let line = gw.access_line(|l| l["port"] == port).await;
    assert_eq!(line["end"], "idle_timeout");
    assert_eq!(line["status"], 200);
}

#[tokio::test]
async fn an_ip_literal_listed_by_a_rule_is_tunnelled() {
    let mut origin = TcpOrigin::start(b"ok").await;
    let port = origin.addr.port();
    let config = GatewayConfig::no_origin().rule(
        Rule::new("literal")
            .addresses(&["127.0.0.1/32"])
            .ports(&[port]),
    );
    let mut gw = Gateway::start(config).await;
    let (mut tcp, status) = open_tunnel(gw.addr, &format!("127.0.0.1:{port}"), b"hi").await;
    assert_eq!(status, 200);
    assert_eq!(send_and_finish(&mut tcp, b"").await, b"ok");
    assert_eq!(origin.received.recv().await.unwrap(), b"hi");
    let line = gw.access_line(|l| l["port"] == port).await;
    assert_eq!(
        (line["rule"].as_str(), line["verdict"].as_str()),
        (Some("literal"), Some("allow"))
    );
}
