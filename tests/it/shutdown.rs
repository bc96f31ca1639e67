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

#[tokio::test]
async fn pre_stop_keeps_serving_while_readiness_fails_then_closes_the_listeners() {
    let origin = TcpOrigin::start(b"still served").await;
    let port = origin.addr.port();
    let mut gw = Gateway::start(
        GatewayConfig::for_origin(port)
            .timeout("pre_stop", "2s")
            .timeout("drain", "5s"),
    )
    .await;
    let admin = gw.admin_addr.unwrap();
    assert_eq!(admin_get(admin, "/readyz").await.status, 200);
    gw.signal("TERM");
    gw.wait_log(|l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("stopping: /readyz answers 503"))
    })
    .await;
    let stopping = std::time::Instant::now();
    assert_eq!(admin_get(admin, "/readyz").await.status, 503);
    // A client the load balancer still sends is served.
    let (mut tunnel, status) = open_tunnel(gw.addr, &format!("{ORIGIN_HOST}:{port}"), b"").await;
    assert_eq!(status, 200, "served during pre_stop");
    assert_eq!(send_and_finish(&mut tunnel, b"late").await, b"still served");
    assert!(
        stopping.elapsed() < Duration::from_secs(2),
        "the test checked within pre_stop"
    );
    // Then the listeners close: new clients are refused, and the gateway exits.
    gw.wait_log(|l| l["message"] == "stopped accepting; draining")
        .await;
    assert!(
        stopping.elapsed() >= Duration::from_millis(1800),
        "not before pre_stop"
    );
    assert!(tokio::net::TcpStream::connect(gw.addr).await.is_err());
    let status = gw.wait_exit(Duration::from_secs(10)).await.expect("exits");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn pre_stop_is_bounded() {
    let (_dir, path) = temp_file(
        "portcullis.toml",
        "[listen]\nproxy = [\"127.0.0.1:0\"]\n[timeouts]\npre_stop = \"10m\"\n",
    );
    let out = portcullis(&["check-config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("timeouts.pre_stop") && said.contains("expected at most 5m"),
        "{said}"
    );
}
