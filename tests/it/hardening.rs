//! What one host on a branch network can do to the gateway (issue 13), each through the real
//! binary: hold unfinished heads, guess passwords in parallel, spread guesses over an IPv6
//! /64; and the connection limit following a reload.

use crate::support::*;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test]
async fn a_host_holding_unfinished_heads_cannot_keep_another_branch_waiting() {
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let config = GatewayConfig::for_origin(port)
        .limit("max_connections", 100)
        .limit("max_pending_heads_per_client", 10)
        .timeout("head", "20s");
    let mut gw = Gateway::start(config).await;
    // 150 connections from one address that never send a head: more than the whole limit.
    let mut flood = Vec::new();
    for _ in 0..150 {
        flood.push(connect_bound(gw.addr, "127.0.0.1").await);
    }
    // Another branch's client is served at once.
    let started = Instant::now();
    let target = format!("{ORIGIN_HOST}:{port}");
    let (_tunnel, reply) = connect_from(gw.addr, "127.0.0.2", &target, "").await;
    assert_eq!(reply.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "another client waited {:?} behind the flood",
        started.elapsed()
    );
    // The flood's connections beyond ten were answered 429 and logged.
    let refused = gw.access_line(|l| l["end"] == "pending_heads_limit").await;
    assert_eq!(refused["status"], 429);
    assert_eq!(
        refused["reason"],
        "too many unfinished requests from this address"
    );
    let mut refusals = 0;
    for _ in 0..100 {
        refusals = gw.count_logs(|l| l["end"] == "pending_heads_limit");
        if refusals >= 140 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(refusals, 140, "all but ten of the flood were refused");
    drop(flood);
}

/// A burst from one address (a branch behind NAT, a load balancer without PROXY protocol)
/// whose heads all come promptly is never refused while the gateway has room, however many
/// are unfinished at once: only late heads count against the address.
#[tokio::test]
async fn a_burst_of_prompt_heads_from_one_address_is_never_refused() {
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let config = GatewayConfig::for_origin(port).limit("max_pending_heads_per_client", 4);
    let mut gw = Gateway::start(config).await;
    // 200 connections from one address, all open before any sends its head.
    let mut burst = Vec::new();
    for _ in 0..200 {
        burst.push(connect_bound(gw.addr, "127.0.0.1").await);
    }
    let request = format!("CONNECT {ORIGIN_HOST}:{port} HTTP/1.1\r\n\r\n");
    let mut answers = tokio::task::JoinSet::new();
    for mut tcp in burst {
        let request = request.clone();
        answers.spawn(async move {
            tcp.write_all(request.as_bytes()).await.unwrap();
            let head = read_head_bytes(&mut tcp).await.expect("a reply head");
            (status_of(&head), tcp)
        });
    }
    let mut tunnels = Vec::new();
    while let Some(answer) = answers.join_next().await {
        let (status, tcp) = answer.unwrap();
        assert_eq!(status, 200);
        tunnels.push(tcp);
    }
    assert_eq!(tunnels.len(), 200);
    assert_eq!(gw.count_logs(|l| l["end"] == "pending_heads_limit"), 0);
    // A head that is late counts: with four late ones held, a fifth late one is refused.
    let mut late = Vec::new();
    for _ in 0..5 {
        late.push(connect_bound(gw.addr, "127.0.0.1").await);
    }
    let refused = gw.access_line(|l| l["end"] == "pending_heads_limit").await;
    assert_eq!(refused["status"], 429);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(gw.count_logs(|l| l["end"] == "pending_heads_limit"), 1);
    drop(late);
}

#[tokio::test]
async fn a_thousand_established_tunnels_from_one_address_still_open_more() {
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let config = GatewayConfig::for_origin(port).limit("max_pending_heads_per_client", 4);
    let gw = Gateway::start(config).await;
    let target = format!("{ORIGIN_HOST}:{port}");
    let mut tunnels = Vec::new();
    for i in 0..1_001 {
        let (tunnel, status) = open_tunnel(gw.addr, &target, b"").await;
        assert_eq!(status, 200, "tunnel {i}");
        tunnels.push(tunnel);
    }
}

#[tokio::test]
async fn parallel_password_guesses_are_bounded_in_memory_and_never_slow_other_branches() {
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let hash = portcullis::config::password::hash_password("s3cret").unwrap();
    let config = GatewayConfig::for_origin(port)
        .limit("auth_attempts_per_minute", 1000)
        .branch(Branch::new("london").credentials("london-fs1", &hash))
        .branch(Branch::new("paris").sources(&["127.0.0.3/32"]));
    let mut gw = Gateway::start(config).await;
    let target = format!("{ORIGIN_HOST}:{port}");
    // Warm up: one wrong guess, so the first check's memory is in the baseline.
    let (_, reply) = connect_from(gw.addr, "127.0.0.2", &target, &basic("london-fs1", "no")).await;
    assert_eq!(reply.status, 407);
    let before = gw.rss_kib();
    let guesses: Vec<_> = (0..100)
        .map(|i| {
            let target = target.clone();
            let addr = gw.addr;
            tokio::spawn(async move {
                let wrong = basic("london-fs1", &format!("guess-{i}"));
                connect_from(addr, "127.0.0.2", &target, &wrong)
                    .await
                    .1
                    .status
            })
        })
        .collect();
    // Meanwhile a source-network branch sets up its tunnel without waiting for argon2.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let started = Instant::now();
    let (_paris, reply) = connect_from(gw.addr, "127.0.0.3", &target, "").await;
    let setup = started.elapsed();
    assert_eq!(reply.status, 200);
    let mut peak = gw.rss_kib();
    let mut statuses = Vec::new();
    for guess in guesses {
        peak = peak.max(gw.rss_kib());
        statuses.push(guess.await.unwrap());
    }
    assert!(
        setup < Duration::from_millis(100),
        "paris waited {setup:?} behind the guesses"
    );
    assert!(
        statuses.iter().all(|s| *s == 407 || *s == 429),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&429),
        "guesses beyond the queue are refused unchecked"
    );
    let growth = peak.saturating_sub(before);
    assert!(
        growth < 64 * 1024,
        "RSS grew {growth} KiB during 100 parallel guesses"
    );
    let busy = gw
        .access_line(|l| l["reason"] == "too many authentication attempts in progress")
        .await;
    assert_eq!(
        (busy["status"].as_u64(), busy["end"].as_str()),
        (Some(429), Some("auth_rate_limited"))
    );
}

/// Sends a PROXY protocol v1 header naming `client`, then CONNECT with `headers`.
async fn via_balancer(
    gateway: std::net::SocketAddr,
    client: &str,
    target: &str,
    headers: &str,
) -> u16 {
    let mut tcp = TcpStream::connect(gateway).await.unwrap();
    let request = format!(
        "PROXY TCP6 {client} 2001:db8::ffff 40000 3128\r\nCONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{headers}\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let head = read_head_bytes(&mut tcp).await.expect("a reply head");
    status_of(&head)
}

#[tokio::test]
async fn auth_attempts_are_counted_per_ipv6_64_not_per_address() {
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let hash = portcullis::config::password::hash_password("s3cret").unwrap();
    let config = GatewayConfig::for_origin(port)
        .listen("proxy_protocol_from", ["127.0.0.1/32"])
        .listen("clients", ["2001:db8::/32"])
        .limit("auth_attempts_per_minute", 3)
        .branch(Branch::new("london").credentials("london-fs1", &hash));
    let mut gw = Gateway::start(config).await;
    let target = format!("{ORIGIN_HOST}:{port}");
    let mut statuses = Vec::new();
    for i in 1..=10 {
        let client = format!("2001:db8:1:2::{i:x}");
        statuses.push(via_balancer(gw.addr, &client, &target, &basic("london-fs1", "wrong")).await);
    }
    assert_eq!(&statuses[..3], &[407, 407, 407], "{statuses:?}");
    assert!(
        statuses[3..].iter().all(|s| *s == 429),
        "ten addresses of one /64 share three attempts: {statuses:?}"
    );
    // Another /64 has attempts of its own.
    let other = via_balancer(
        gw.addr,
        "2001:db8:1:3::1",
        &target,
        &basic("london-fs1", "wrong"),
    )
    .await;
    assert_eq!(other, 407);
    let line = gw.access_line(|l| l["end"] == "auth_rate_limited").await;
    assert!(
        line["client"]
            .as_str()
            .unwrap()
            .starts_with("[2001:db8:1:2::"),
        "{line}"
    );
}

/// Rewrites the gateway's config file and reloads.
async fn reload_with(gw: &mut Gateway, config: GatewayConfig) {
    std::fs::write(gw.config_path(), config.to_string()).unwrap();
    gw.reload("reload applied").await;
}

/// Sends CONNECT and waits up to `within` for the reply head: `Some(status)` if it came.
async fn connect_within(
    gateway: std::net::SocketAddr,
    target: &str,
    within: Duration,
) -> (TcpStream, Option<u16>) {
    let mut tcp = TcpStream::connect(gateway).await.unwrap();
    tcp.write_all(format!("CONNECT {target} HTTP/1.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = tokio::time::timeout(within, read_head_bytes(&mut tcp)).await;
    (tcp, head.ok().and_then(|r| r.ok()).map(|h| status_of(&h)))
}

#[tokio::test]
async fn max_connections_follows_reloads_up_and_down_and_the_drain_counts_right() {
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let config = |max_connections: usize| {
        GatewayConfig::for_origin(port)
            .limit("max_connections", max_connections)
            .timeout("drain", "20s")
    };
    let mut gw = Gateway::start(config(2)).await;
    let target = format!("{ORIGIN_HOST}:{port}");
    let short = Duration::from_millis(400);
    let (a, status) = connect_within(gw.addr, &target, short).await;
    assert_eq!(status, Some(200));
    let (b, status) = connect_within(gw.addr, &target, short).await;
    assert_eq!(status, Some(200));
    let (_c, status) = connect_within(gw.addr, &target, short).await;
    assert_eq!(status, None, "a third client waits at 2");

    // Raised: the waiting client and a new one are served at once.
    reload_with(&mut gw, config(4)).await;
    let (c, status) = connect_within(gw.addr, &target, Duration::from_secs(2)).await;
    assert_eq!(status, Some(200), "served after the raise");
    // (The client that waited is served too: 3 of 4 are open now, plus `c` makes 4.)
    let (_d, status) = connect_within(gw.addr, &target, short).await;
    assert_eq!(status, None, "the fifth waits at 4");

    // Lowered to 1 with 4 open: nobody is cut; new clients wait until only 0 are open.
    reload_with(&mut gw, config(1)).await;
    drop((a, b));
    let (_e, status) = connect_within(gw.addr, &target, short).await;
    assert_eq!(status, None, "still over the lowered limit");
    drop(c);
    drop(_c);
    drop(_d);
    drop(_e);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (f, status) = connect_within(gw.addr, &target, Duration::from_secs(2)).await;
    assert_eq!(status, Some(200), "served once under the lowered limit");
    drop(f);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Nothing open: SIGTERM drains at once and counts nothing open.
    let started = Instant::now();
    gw.signal("TERM");
    let exit = gw.wait_exit(Duration::from_secs(15)).await.expect("exits");
    assert!(exit.success());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "drain waited {:?}",
        started.elapsed()
    );
    let draining = gw
        .wait_log(|l| l["message"] == "stopped accepting; draining")
        .await;
    assert_eq!(draining["open_connections"], 0);
    assert_eq!(
        gw.count_logs(|l| l["message"] == "drained: every connection finished"),
        1
    );
}

#[tokio::test]
async fn listeners_queue_as_many_clients_as_the_system_allows() {
    let gw = Gateway::start(GatewayConfig::no_origin()).await;
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // For a listening socket, ss shows the accept queue's limit as Send-Q.
    let ss = std::process::Command::new("ss")
        .args(["-Hltn", &format!("sport = :{}", gw.addr.port())])
        .output()
        .expect("ss (iproute2)");
    let table = String::from_utf8_lossy(&ss.stdout).to_string();
    let backlog: u32 = table
        .split_whitespace()
        .nth(2)
        .and_then(|q| q.parse().ok())
        .unwrap_or_else(|| panic!("no listener in {table:?}"));
    assert_eq!(backlog, somaxconn, "{table}");
}

/// The hard descriptor limit this test process (and so the gateway) inherited.
fn hard_descriptor_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(4).unwrap().parse().unwrap()
}

/// Without `limits.max_connections`, the gateway raises its soft descriptor limit to the hard
/// one and serves as many connections as that holds (two descriptors each, 512 kept back):
/// 9,744 under the 20,000 a container's `--ulimit nofile=20000` gives, not a fixed 4,096.
#[tokio::test]
async fn the_connection_limit_follows_the_descriptor_limit_raised_to_the_hard_one() {
    let hard = hard_descriptor_limit();
    assert!(
        hard > 2048,
        "the test needs a hard limit above 2048, not {hard}"
    );
    let origin = TcpOrigin::start(b"").await;
    let config = GatewayConfig::for_origin(origin.addr.port());
    let mut gw = Gateway::start_under(config, &[], &["prlimit", "--nofile=1024:"]).await;
    let line = gw.wait_log(|l| l["message"] == "connection limit").await;
    let expected = (hard - 512) / 2;
    assert_eq!(line["descriptors_before"], 1024, "{line}");
    assert_eq!(line["descriptors"], hard, "{line}");
    assert_eq!(line["max_connections"], expected, "{line}");
    assert_eq!(line["from"], "descriptor limit", "{line}");
    let metrics = gw.metrics().await;
    metrics.assert_value("portcullis_connections_limit", expected as f64);
    metrics.assert_value("process_max_fds", hard as f64);
}
