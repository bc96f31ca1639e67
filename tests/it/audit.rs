//! The access log as the security team's record (issue 14): written whatever the diagnostic
//! level, naming the proxy user (never the password), refusals explained in the status line.

use crate::support::*;

#[tokio::test]
async fn access_lines_are_written_whatever_the_log_level() {
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let config = GatewayConfig::for_origin(port);
    // Warnings only, but for the listener lines the test needs to find the gateway.
    let mut gw =
        Gateway::start_with_env(&config, &[("RUST_LOG", "warn,portcullis::server=info")]).await;
    let (_denied, reply) = connect_from(gw.addr, "127.0.0.1", "evil.example:443", "").await;
    assert_eq!(reply.status, 403);
    let line = gw.access_line(|l| l["host"] == "evil.example").await;
    assert_eq!(line["end"], "policy_denied");
}

#[tokio::test]
async fn the_access_line_names_the_proxy_user_and_never_the_password() {
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let hash = portcullis::config::password::hash_password("s3cret").unwrap();
    let config = GatewayConfig::for_origin(port)
        .branch(Branch::new("london").credentials("london-fs1", &hash));
    let mut gw = Gateway::start(config).await;
    let target = format!("{ORIGIN_HOST}:{port}");
    let (mut tunnel, reply) = connect_from(
        gw.addr,
        "127.0.0.2",
        &target,
        &basic("london-fs1", "s3cret"),
    )
    .await;
    assert_eq!(reply.status, 200);
    send_and_finish(&mut tunnel, b"sync").await;
    let line = gw
        .access_line(|l| l["client"] == reply.client.unwrap().to_string().as_str())
        .await;
    assert_eq!(
        (line["user"].as_str(), line["branch"].as_str()),
        (Some("london-fs1"), Some("london"))
    );
    let (_refused, reply) =
        connect_from(gw.addr, "127.0.0.3", &target, &basic("paris-fs9", "guess")).await;
    assert_eq!(reply.status, 407);
    let line = gw.access_line(|l| l["end"] == "auth_failed").await;
    assert_eq!(line["user"], "paris-fs9", "the user name tried");
    for l in gw.logs() {
        let text = l.to_string();
        assert!(
            !text.contains("s3cret") && !text.contains("guess"),
            "{text}"
        );
    }
}

/// The access lines in `path` so far.
fn lines_in(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn the_access_file_is_reopened_on_sigusr1_and_the_gateway_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let access = dir.path().join("access.log");
    let config = GatewayConfig::no_origin().set("log", "access_file", &access);
    let mut gw = Gateway::start(config).await;
    let addr = gw.addr;
    let deny = |host: &'static str| async move {
        let request = format!("CONNECT {host}:443 HTTP/1.1\r\n\r\n");
        raw_request(addr, request.as_bytes()).await
    };
    assert_eq!(deny("first.example").await.status, 403);
    // logrotate moves the file away, then signals.
    let rotated = dir.path().join("access.log.1");
    for _ in 0..100 {
        if !lines_in(&access).is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    std::fs::rename(&access, &rotated).unwrap();
    gw.signal("USR1");
    gw.wait_log(|l| l["message"] == "access log reopened").await;
    assert_eq!(deny("second.example").await.status, 403, "still serving");
    let mut fresh = Vec::new();
    for _ in 0..100 {
        fresh = lines_in(&access);
        if !fresh.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let old = lines_in(&rotated);
    assert_eq!(old.len(), 1, "{old:?}");
    assert_eq!(old[0]["host"], "first.example");
    assert_eq!(fresh.len(), 1, "{fresh:?}");
    assert_eq!(fresh[0]["host"], "second.example");
    assert_eq!(fresh[0]["target"], "portcullis::access");
    assert_eq!(
        gw.access_count(),
        0,
        "access lines left stdout for the file"
    );
    assert!(
        gw.wait_exit(std::time::Duration::from_millis(200))
            .await
            .is_none(),
        "SIGUSR1 never stops it"
    );
}
