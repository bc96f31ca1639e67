//! SIGTERM: stop accepting, let open tunnels finish within the drain timeout, exit 0.

use crate::support::*;
use std::time::Duration;

#[tokio::test]
async fn sigterm_drains_open_tunnels_then_exits_0() {
    let mut origin = TcpOrigin::start(b"served during drain").await;
    let port = origin.addr.port();
    let mut gw = Gateway::start(GatewayConfig::for_origin(port).timeout("drain", "20s")).await;
    let (mut tunnel, status) = open_tunnel(gw.addr, &format!("{ORIGIN_HOST}:{port}"), b"").await;
    assert_eq!(status, 200);

    gw.signal("TERM");
    let line = gw
        .wait_log(|l| l["message"] == "stopped accepting; draining")
        .await;
    assert_eq!(line["open_connections"], 1);
    assert!(
        tokio::net::TcpStream::connect(gw.addr).await.is_err(),
        "no new connections while draining"
    );
    assert!(
        gw.wait_exit(Duration::from_millis(300)).await.is_none(),
        "waits for the open tunnel"
    );

    // The open tunnel still works, and its end lets the gateway exit at once.
    let reply = send_and_finish(&mut tunnel, b"last batch").await;
    assert_eq!(reply, b"served during drain");
    assert_eq!(origin.received.recv().await.unwrap(), b"last batch");
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits once drained");
    assert_eq!(status.code(), Some(0));
    assert!(gw.count_logs(|l| l["message"] == "drained: every connection finished") == 1);
}

#[tokio::test]
async fn the_drain_timeout_bounds_the_wait() {
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let mut gw = Gateway::start(GatewayConfig::for_origin(port).timeout("drain", "1s")).await;
    let (_tunnel, status) = open_tunnel(gw.addr, &format!("{ORIGIN_HOST}:{port}"), b"").await;
    assert_eq!(status, 200);
    let started = std::time::Instant::now();
    gw.signal("TERM");
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits after the drain timeout");
    assert_eq!(status.code(), Some(0));
    assert!(started.elapsed() >= Duration::from_millis(900));
    let line = gw
        .wait_log(|l| l["message"] == "drain timeout reached; closing the rest")
        .await;
    assert_eq!(line["closing_connections"], 1);
}

#[tokio::test]
async fn a_tunnel_cut_at_the_drain_timeout_still_gets_its_access_line_and_bytes() {
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let mut gw = Gateway::start(GatewayConfig::for_origin(port).timeout("drain", "1s")).await;
    let (mut tunnel, status) = open_tunnel(gw.addr, &format!("{ORIGIN_HOST}:{port}"), b"").await;
    assert_eq!(status, 200);
    tokio::io::AsyncWriteExt::write_all(&mut tunnel, b"half a sync batch")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    gw.signal("TERM");
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits after the drain timeout");
    assert_eq!(status.code(), Some(0));
    let line = gw.access_line(|l| l["port"] == port).await;
    assert_eq!(
        (line["end"].as_str(), line["bytes_up"].as_u64()),
        (Some("drain_timeout"), Some(17)),
        "{line}"
    );
    assert_eq!(gw.access_count(), 1, "exactly one line");
}
