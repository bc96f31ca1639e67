//! The admin listener: exact metric values after known traffic, health and readiness (503 while
//! draining), reload counters.

use crate::support::*;
use std::time::Duration;

#[tokio::test]
async fn metrics_count_known_traffic_exactly_and_never_name_a_destination() {
    let mut origin = TcpOrigin::start(b"5byte").await;
    let port = origin.addr.port();
    let mut gw = Gateway::start(GatewayConfig::for_origin(port)).await;
    let admin = gw.admin_addr.unwrap();

    let (mut tunnel, status) = open_tunnel(gw.addr, &format!("{ORIGIN_HOST}:{port}"), b"").await;
    assert_eq!(status, 200);
    gw.metrics().await.assert_value(
        r#"portcullis_tunnels_active{category="storage",branch="unassigned"}"#,
        1.0,
    );
    assert_eq!(send_and_finish(&mut tunnel, b"ten bytes!").await, b"5byte");
    assert_eq!(origin.received.recv().await.unwrap(), b"ten bytes!");
    let _ = gw.access_line(|l| l["end"] == "closed").await;
    let denied = raw_request(gw.addr, b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n").await;
    assert_eq!(denied.status, 403);
    let _ = gw.access_line(|l| l["end"] == "policy_denied").await;

    let reply = admin_get(admin, "/metrics").await;
    assert_eq!(reply.status, 200);
    let metrics = Metrics::parse(&reply.body);
    for (series, want) in [
        (
            r#"portcullis_requests_total{verdict="allow",end="closed",category="storage",branch="unassigned"}"#,
            1.0,
        ),
        (
            r#"portcullis_requests_total{verdict="deny",end="policy_denied",category="none",branch="unassigned"}"#,
            1.0,
        ),
        (
            r#"portcullis_bytes_total{direction="up",category="storage",branch="unassigned"}"#,
            10.0,
        ),
        (
            r#"portcullis_bytes_total{direction="down",category="storage",branch="unassigned"}"#,
            5.0,
        ),
        (
            r#"portcullis_tunnels_active{category="storage",branch="unassigned"}"#,
            0.0,
        ),
        (
            &format!(
                r#"portcullis_build_info{{version="{}",profiles="{}"}}"#,
                env!("CARGO_PKG_VERSION"),
                portcullis::policy::profiles::VERSION
            ),
            1.0,
        ),
        (
            r#"portcullis_dial_duration_seconds_count{outcome="ok"}"#,
            1.0,
        ),
        (
            r#"portcullis_dial_duration_seconds_count{outcome="failed"}"#,
            0.0,
        ),
        (
            r#"portcullis_dns_duration_seconds_count{outcome="ok"}"#,
            1.0,
        ),
        (
            r#"portcullis_dns_duration_seconds_count{outcome="timeout"}"#,
            0.0,
        ),
    ] {
        metrics.assert_value(series, want);
    }
    assert!(
        !metrics.text().contains("share1") && !metrics.text().contains("evil"),
        "no destination host in metrics"
    );
    assert_eq!(admin_get(admin, "/healthz").await.status, 200);
    assert_eq!(admin_get(admin, "/nothing").await.status, 404);
    // The container HEALTHCHECK command.
    let health = |path: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["health", "--admin", &admin.to_string(), "--path", path])
            .output()
            .unwrap()
            .status
            .code()
    };
    assert_eq!(health("/healthz"), Some(0));
    assert_eq!(health("/nothing"), Some(1));
}

/// Sync tunnels stay open for hours: their bytes must reach `bytes_total` while they flow, not
/// in one spike when they close.
#[tokio::test]
async fn bytes_are_counted_while_a_tunnel_is_open() {
    use tokio::io::AsyncWriteExt;
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let gw = Gateway::start(GatewayConfig::for_origin(port)).await;
    let (mut tunnel, status) = open_tunnel(gw.addr, &format!("{ORIGIN_HOST}:{port}"), b"").await;
    assert_eq!(status, 200);
    tunnel.write_all(&vec![7u8; 1 << 20]).await.unwrap();
    let counted = |metrics: &Metrics| {
        metrics.sum(r#"portcullis_bytes_total{direction="up",category="storage"}"#)
    };
    // All but less than one 256 KiB step of the MiB, with the tunnel still open.
    let enough = f64::from((1 << 20) - 256 * 1024);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let metrics = gw.metrics().await;
        if counted(&metrics) > enough || tokio::time::Instant::now() > deadline {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        counted(&metrics) > enough,
        "bytes not counted while open:\n{metrics}"
    );
    metrics.assert_value(
        r#"portcullis_tunnels_active{category="storage",branch="unassigned"}"#,
        1.0,
    );
    drop(tunnel);
}

#[tokio::test]
async fn readiness_goes_503_while_draining_and_reloads_are_counted() {
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let mut gw = Gateway::start(GatewayConfig::for_origin(port).timeout("drain", "20s")).await;
    let admin = gw.admin_addr.unwrap();
    assert_eq!(admin_get(admin, "/readyz").await.status, 200);

    // One good reload, one bad.
    let good = std::fs::read_to_string(gw.config_path()).unwrap();
    gw.reload("reload applied").await;
    std::fs::write(gw.config_path(), "nonsense = [").unwrap();
    gw.reload("reload rejected; the running configuration stays")
        .await;
    // POST /reload from loopback: the bad file is refused with its problems, the good one applied.
    let post =
        b"POST /reload HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let refused = raw_request(admin, post).await;
    assert_eq!(refused.status, 422);
    assert!(
        refused.body.contains("portcullis.toml:1:"),
        "{}",
        refused.body
    );
    std::fs::write(gw.config_path(), good).unwrap();
    let applied = raw_request(admin, post).await;
    assert_eq!((applied.status, applied.body.as_str()), (200, "reloaded\n"));
    let metrics = gw.metrics().await;
    metrics.assert_value(r#"portcullis_config_reloads_total{result="success"}"#, 2.0);
    metrics.assert_value(r#"portcullis_config_reloads_total{result="failure"}"#, 2.0);

    let (tunnel, status) = open_tunnel(gw.addr, &format!("{ORIGIN_HOST}:{port}"), b"").await;
    assert_eq!(status, 200);
    gw.signal("TERM");
    let _ = gw
        .wait_log(|l| l["message"] == "stopped accepting; draining")
        .await;
    let ready = admin_get(admin, "/readyz").await;
    assert_eq!((ready.status, ready.body.as_str()), (503, "draining\n"));
    assert_eq!(
        admin_get(admin, "/healthz").await.status,
        200,
        "alive while draining"
    );
    drop(tunnel);
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits once drained");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn metrics_pass_promtool_and_follow_the_accept_header() {
    let mut origin = TcpOrigin::start(b"5byte").await;
    let port = origin.addr.port();
    let gw = Gateway::start(GatewayConfig::for_origin(port)).await;
    let admin = gw.admin_addr.unwrap();
    // Samples in every kind of family: a tunnel with bytes, a denial, a reload failure.
    let (mut tunnel, status) = open_tunnel(gw.addr, &format!("{ORIGIN_HOST}:{port}"), b"").await;
    assert_eq!(status, 200);
    send_and_finish(&mut tunnel, b"hello").await;
    origin.received.recv().await.unwrap();
    raw_request(gw.addr, b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n").await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;

    // No Accept: the classic text format, which promtool reads and lints.
    let classic = admin_get(admin, "/metrics").await;
    assert_eq!(
        classic.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert!(
        !Metrics::parse(&classic.body)
            .matching("portcullis_requests_total")
            .is_empty(),
        "{}",
        classic.body
    );
    assert_promtool_passes(&classic.body);

    // Prometheus asks for OpenMetrics first, and gets it.
    let open = raw_request(
        admin,
        b"GET /metrics HTTP/1.1\r\nHost: admin\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        open.header("content-type")
            .is_some_and(|t| t.starts_with("application/openmetrics-text")),
        "{:?}",
        open.headers
    );
    assert!(open.body.ends_with("# EOF\n"));

    // HEAD: the head alone.
    let head = raw_request(
        admin,
        b"HEAD /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!((head.status, head.body.as_str()), (200, ""));
}
