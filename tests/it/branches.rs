//! Branches: clients told apart by source address and by proxy credentials, per-branch rule
//! narrowing and tunnel limits, per-client rate limits.

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A config with three branches: london and paris by source address (127.0.0.2, 127.0.0.3),
/// berlin by credentials.
fn three_branches(origin_port: u16, password_hash: &str) -> GatewayConfig {
    GatewayConfig::for_origin(origin_port)
        .branch(Branch::new("london").sources(&["127.0.0.2/32"]))
        .branch(
            Branch::new("paris")
                .sources(&["127.0.0.3/32"])
                .set("allow", ["azure-file-sync/login"]),
        )
        .branch(
            Branch::new("berlin")
                .credentials("berlin-fs1", password_hash)
                .set("max_tunnels", 1),
        )
}

#[tokio::test]
async fn branches_are_told_apart_by_source_and_credentials() {
    let hash = portcullis::config::password::hash_password("s3cret").unwrap();
    let mut origin = TcpOrigin::start(b"ok").await;
    let port = origin.addr.port();
    let mut gw = Gateway::start(three_branches(port, &hash)).await;
    let target = format!("{ORIGIN_HOST}:{port}");

    let (london, reply) = connect_from(gw.addr, "127.0.0.2", &target, "").await;
    assert_eq!(reply.status, 200);
    drop(london); // the access line is written when the tunnel ends
    let client = reply.client.unwrap().to_string();
    assert_eq!(
        gw.access_line(|l| l["client"] == client.as_str()).await["branch"],
        "london"
    );

    // paris may use only the login rule: the storage origin is out of its reach.
    let (_paris, reply) = connect_from(gw.addr, "127.0.0.3", &target, "").await;
    assert_eq!(reply.status, 403);
    assert_eq!(
        reply.header("portcullis-error"),
        Some("not allowed for this branch")
    );
    let client = reply.client.unwrap().to_string();
    let line = gw.access_line(|l| l["client"] == client.as_str()).await;
    assert_eq!(
        (line["branch"].as_str(), line["verdict"].as_str()),
        (Some("paris"), Some("deny"))
    );

    // berlin by credentials, from an address no branch lists; the header is not forwarded.
    let (mut berlin, reply) = connect_from(
        gw.addr,
        "127.0.0.1",
        &target,
        &basic("berlin-fs1", "s3cret"),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(send_and_finish(&mut berlin, b"payload").await, b"ok");
    // (london's tunnel reached the origin first and carried nothing)
    let mut received = origin.received.recv().await.unwrap();
    while received.is_empty() {
        received = origin.received.recv().await.unwrap();
    }
    assert_eq!(received, b"payload", "only tunnel bytes reach the origin");
    let client = reply.client.unwrap().to_string();
    assert_eq!(
        gw.access_line(|l| l["client"] == client.as_str()).await["branch"],
        "berlin"
    );

    // A real client with proxy credentials (reqwest) gets through as berlin too.
    let pki = Pki::new();
    let tls_origin = Origin::start(&pki).await;
    let config = three_branches(port, &hash).rule(
        Rule::new("tls-origin")
            .hosts(&[ORIGIN_HOST])
            .ports(&[tls_origin.port()])
            .private_addresses(&["127.0.0.1/32"]),
    );
    let mut gw = Gateway::start(config).await;
    let proxy = reqwest::Proxy::all(format!("http://{}", gw.addr))
        .unwrap()
        .basic_auth("berlin-fs1", "s3cret");
    let client = reqwest::Client::builder()
        .proxy(proxy)
        .tls_backend_preconfigured(pki.client_config())
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let url = format!(
        "https://{ORIGIN_HOST}:{}/download?bytes=1000",
        tls_origin.port()
    );
    assert_eq!(
        client
            .get(url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .len(),
        1000
    );
    let line = gw.access_line(|l| l["port"] == tls_origin.port()).await;
    assert_eq!(
        (line["branch"].as_str(), line["rule"].as_str()),
        (Some("berlin"), Some("tls-origin"))
    );
}

#[tokio::test]
async fn credentials_wrong_absent_or_malformed_get_407_and_are_never_downgraded() {
    let hash = portcullis::config::password::hash_password("s3cret").unwrap();
    let origin = TcpOrigin::start(b"ok").await;
    let port = origin.addr.port();
    let mut gw = Gateway::start(three_branches(port, &hash)).await;
    let target = format!("{ORIGIN_HOST}:{port}");
    let table = [
        // (from, header, status, reason)
        (
            "127.0.0.1",
            basic("berlin-fs1", "wrong"),
            407,
            "invalid proxy credentials",
        ),
        (
            "127.0.0.1",
            basic("nobody", "s3cret"),
            407,
            "invalid proxy credentials",
        ),
        (
            "127.0.0.1",
            String::new(),
            407,
            "proxy authentication required",
        ),
        (
            "127.0.0.1",
            "Proxy-Authorization: Basic %%%not-base64\r\n".into(),
            407,
            "malformed proxy credentials",
        ),
        (
            "127.0.0.1",
            "Proxy-Authorization: Bearer abc\r\n".into(),
            407,
            "malformed proxy credentials",
        ),
        // 127.0.0.2 is london by source, but wrong credentials are not downgraded to that.
        (
            "127.0.0.2",
            basic("berlin-fs1", "wrong"),
            407,
            "invalid proxy credentials",
        ),
    ];
    for (from, header, status, reason) in table {
        let (mut tcp, reply) = connect_from(gw.addr, from, &target, &header).await;
        assert_eq!(
            (reply.status, reply.header("portcullis-error")),
            (status, Some(reason)),
            "{from} {header:?}"
        );
        assert_eq!(
            reply.header("proxy-authenticate"),
            Some("Basic realm=\"portcullis\"")
        );
        let mut rest = Vec::new();
        tcp.read_to_end(&mut rest).await.unwrap();
        let client = reply.client.unwrap().to_string();
        let line = gw.access_line(|l| l["client"] == client.as_str()).await;
        assert!(
            line["branch"].is_null(),
            "no branch for a refused client: {line}"
        );
        let logged = line.to_string();
        assert!(
            !logged.contains("wrong") && !logged.contains("s3cret"),
            "no secret in logs: {logged}"
        );
    }
    let (_ok, reply) = connect_from(gw.addr, "127.0.0.2", &target, "").await;
    assert_eq!(reply.status, 200, "the gateway still serves");
}

#[tokio::test]
async fn without_credential_branches_an_unknown_client_gets_403_unless_unassigned_are_allowed() {
    let origin = TcpOrigin::start(b"ok").await;
    let port = origin.addr.port();
    let config =
        GatewayConfig::for_origin(port).branch(Branch::new("london").sources(&["127.0.0.2/32"]));
    let mut gw = Gateway::start(&config).await;
    let target = format!("{ORIGIN_HOST}:{port}");
    let (_tcp, reply) = connect_from(gw.addr, "127.0.0.1", &target, "").await;
    assert_eq!(
        (reply.status, reply.header("portcullis-error")),
        (403, Some("client matches no branch"))
    );
    assert_eq!(reply.header("proxy-authenticate"), None);

    let mut gw2 = Gateway::start(config.policy("allow_unassigned", true)).await;
    let (tcp, reply) = connect_from(gw2.addr, "127.0.0.1", &target, "").await;
    assert_eq!(reply.status, 200);
    drop(tcp);
    let client = reply.client.unwrap().to_string();
    assert_eq!(
        gw2.access_line(|l| l["client"] == client.as_str()).await["branch"],
        "unassigned"
    );
    let _ = gw.access_line(|l| l["end"] == "no_branch").await;
}

#[tokio::test]
async fn max_tunnels_per_branch_and_rate_limits_answer_429() {
    let hash = portcullis::config::password::hash_password("s3cret").unwrap();
    let origin = TcpOrigin::start(b"ok").await;
    let port = origin.addr.port();
    let config = three_branches(port, &hash).limit("auth_attempts_per_minute", 3);
    let mut gw = Gateway::start(config).await;
    let target = format!("{ORIGIN_HOST}:{port}");
    let berlin = basic("berlin-fs1", "s3cret");

    // berlin: max_tunnels = 1.
    let (mut first, reply) = connect_from(gw.addr, "127.0.0.1", &target, &berlin).await;
    assert_eq!(reply.status, 200);
    let (_second, reply) = connect_from(gw.addr, "127.0.0.1", &target, &berlin).await;
    assert_eq!(
        (reply.status, reply.header("portcullis-error")),
        (429, Some("branch tunnel limit reached"))
    );
    first.shutdown().await.unwrap();
    let mut rest = Vec::new();
    first.read_to_end(&mut rest).await.unwrap();
    let _ = gw
        .access_line(|l| l["branch"] == "berlin" && l["end"] == "closed")
        .await;
    let (_third, reply) = connect_from(gw.addr, "127.0.0.1", &target, &berlin).await;
    assert_eq!(
        reply.status, 200,
        "the slot is free again once the first tunnel closed"
    );

    // Credential checks per address: 3 per minute, then 429 without checking.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let (_tcp, reply) =
            connect_from(gw.addr, "127.0.0.4", &target, &basic("berlin-fs1", "guess")).await;
        statuses.push(reply.status);
    }
    assert_eq!(statuses, [407, 407, 407, 429]);
    let (_tcp, reply) =
        connect_from(gw.addr, "127.0.0.5", &target, &basic("berlin-fs1", "guess")).await;
    assert_eq!(reply.status, 407, "other addresses are not affected");

    // CONNECT requests per second per client address.
    let gw =
        Gateway::start(GatewayConfig::for_origin(port).limit("connect_rate_per_client", 2)).await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let (_tcp, reply) = connect_from(gw.addr, "127.0.0.6", &target, "").await;
        statuses.push(reply.status);
    }
    assert_eq!(statuses, [200, 200, 429]);
}

#[test]
fn hash_password_round_trips_through_the_binary() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"correct horse battery\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap();
    let hash = hash.trim();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    let stored = portcullis::config::password::StoredPassword::parse(hash).unwrap();
    assert!(stored.verify("correct horse battery"));
    assert!(!stored.verify("correct horse battery\n"));
}

#[tokio::test]
async fn max_connections_makes_further_clients_wait_until_a_slot_frees() {
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let mut gw = Gateway::start(GatewayConfig::for_origin(port).limit("max_connections", 1)).await;
    let target = format!("{ORIGIN_HOST}:{port}");
    let (first, status) = open_tunnel(gw.addr, &target, b"").await;
    assert_eq!(status, 200);
    // The second client waits in the listen backlog: no answer while the first is open.
    let mut second = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    second
        .write_all(format!("CONNECT {target} HTTP/1.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let waiting = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        read_head_bytes(&mut second),
    )
    .await;
    assert!(waiting.is_err(), "served while the only slot was taken");
    // The operator sees it: one open against a limit of one, one waiting.
    let metrics = gw.metrics().await;
    for series in [
        "portcullis_connections_open",
        "portcullis_connections_limit",
        "portcullis_connections_waiting",
        "portcullis_connections_limit_reached_total",
    ] {
        metrics.assert_value(series, 1.0);
    }
    let said = gw
        .wait_log(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("connection limit reached"))
        })
        .await;
    assert_eq!(
        (said["open"].as_u64(), said["limit"].as_u64()),
        (Some(1), Some(1)),
        "{said}"
    );
    drop(first);
    let head = read_head_bytes(&mut second).await.unwrap();
    assert_eq!(status_of(&head), 200, "served once the slot is free");
}

/// Source networks work like routes: the most specific network holding the client's address
/// names its branch, whatever the file order (a wide network listed first no longer hides a
/// narrow one after it), and `explain` names the network that won.
#[tokio::test]
async fn the_most_specific_source_network_names_the_branch() {
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let config = GatewayConfig::for_origin(port)
        .branch(Branch::new("region").sources(&["127.0.0.0/8"]))
        .branch(Branch::new("office").sources(&["127.0.0.2/32"]));
    let mut gw = Gateway::start(&config).await;
    let target = format!("{ORIGIN_HOST}:{port}");
    for (from, branch) in [("127.0.0.2", "office"), ("127.0.0.3", "region")] {
        let (tunnel, reply) = connect_from(gw.addr, from, &target, "").await;
        assert_eq!(reply.status, 200);
        drop(tunnel);
        let client = reply.client.unwrap().to_string();
        let line = gw.access_line(|l| l["client"] == client.as_str()).await;
        assert_eq!(line["branch"], branch, "from {from}");
    }
    let (_dir, path) = temp_file("portcullis.toml", &config.to_string());
    let out = portcullis(&[
        "explain",
        "--config",
        path.to_str().unwrap(),
        "--from",
        "127.0.0.2",
        &target,
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("branch:   office (source 127.0.0.2/32)"),
        "{text}"
    );
}
