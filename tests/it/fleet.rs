//! Fleet mode end to end: a real redis-server of the test's own and several real gateway
//! processes from one config (only `fleet.name` differs). Traffic is upload through raw TCP
//! tunnels at 8 Mbit/s (1 MB/s) budgets, counted where it arrives: one sink per replica, so
//! each replica's part is measured apart. Every test is bounded in time and bytes.

use crate::support::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// 8 Mbit/s in bytes per second.
pub const LIMIT: f64 = 1_000_000.0;

/// An origin that swallows whatever arrives and counts it.
pub struct Sink {
    pub port: u16,
    bytes: Arc<AtomicU64>,
}

impl Sink {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let bytes = Arc::new(AtomicU64::new(0));
        let count = bytes.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = tcp.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        count.fetch_add(n as u64, Ordering::Relaxed);
                    }
                });
            }
        });
        Self { port, bytes }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// A tunnel pushing bytes upstream as fast as the gateway takes them, until stopped; `failed`
/// is set if a write ever fails (a tunnel Redis must never break).
pub struct Pusher {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Pusher {
    pub async fn open(gateway: std::net::SocketAddr, from: &str, port: u16) -> Self {
        let target = format!("{ORIGIN_HOST}:{port}");
        let (mut tcp, reply) = connect_from(gateway, from, &target, "").await;
        assert_eq!(reply.status, 200, "{reply:?}");
        // Closed with a reset: bytes still queued in the sockets stop counting at once.
        tcp.set_zero_linger().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicBool::new(false));
        let (halt, broke) = (stop.clone(), failed.clone());
        let task = tokio::spawn(async move {
            let chunk = vec![7u8; 16 * 1024];
            while !halt.load(Ordering::Relaxed) {
                if tcp.write_all(&chunk).await.is_err() {
                    broke.store(true, Ordering::Relaxed);
                    return;
                }
            }
        });
        Self { stop, failed, task }
    }

    /// Stops pushing and resets the tunnel; true when no write failed.
    pub async fn close(self) -> bool {
        self.stop.store(true, Ordering::Relaxed);
        // A write waiting for its turn ends with the task: dropping the socket resets it.
        self.task.abort();
        let _ = self.task.await;
        !self.failed.load(Ordering::Relaxed)
    }
}

/// What every replica runs but `[fleet]`: a rule for the sinks' ports, the origin's name.
pub fn gateway_for(ports: &[u16]) -> GatewayConfig {
    GatewayConfig::new()
        .rule(Rule::origin("sinks", ports))
        .resolve(ORIGIN_HOST, "127.0.0.1")
}

/// `config` as the replica `name` of the fleet on `redis`: one config for every replica but
/// for the name.
pub fn replica(config: &GatewayConfig, redis: &str, name: &str) -> GatewayConfig {
    config.clone().fleet("redis", redis).fleet("name", name)
}

/// The branch office: every loopback address, at most `max_tunnels` tunnels.
pub fn office(max_tunnels: u32) -> Branch {
    Branch::new("office")
        .sources(&["127.0.0.0/8"])
        .set("max_tunnels", max_tunnels)
}

pub fn upload_all_day(scope: &str) -> String {
    format!(
        "[[schedule]]\nname = \"fleet\"\ndays = \"daily\"\nhours = \"00:00-00:00\"\ntime_zone = \"UTC\"\nupload = \"8 Mbit/s\"\napplies_to = \"{scope}\"\n"
    )
}

/// Starts a replica and waits until it has taken its first shares.
pub async fn start_replica(config: &GatewayConfig) -> Gateway {
    let mut gw = Gateway::start(config).await;
    let _ = gw
        .wait_log(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("fleet: Redis answers"))
        })
        .await;
    gw
}

/// Bytes each sink took over `over`.
pub async fn measure(sinks: &[&Sink], over: Duration) -> Vec<f64> {
    let before: Vec<u64> = sinks.iter().map(|s| s.bytes()).collect();
    tokio::time::sleep(over).await;
    sinks
        .iter()
        .zip(before)
        .map(|(s, b)| (s.bytes() - b) as f64 / over.as_secs_f64())
        .collect()
}

#[tokio::test]
async fn an_each_branch_budget_is_split_across_replicas_by_their_tunnels() {
    let redis = Redis::start(&[]);
    each_branch_budget_split(&redis.url()).await;
}

/// Three replicas on the Redis at `url`, one each-branch budget of 8 Mbit/s split by their
/// tunnels, measured at the sinks: the fleet moves the limit within 3 %, and the split follows
/// the tunnels within a second. The replicas, still running, and the sinks' ports (the rule's)
/// for more.
pub async fn each_branch_budget_split(url: &str) -> (Vec<Gateway>, Vec<u16>) {
    let started = std::time::Instant::now();
    let sinks = [
        Sink::start().await,
        Sink::start().await,
        Sink::start().await,
    ];
    let ports: Vec<u16> = sinks.iter().map(|s| s.port).collect();
    let config = gateway_for(&ports).extra(&upload_all_day("each-branch"));
    let mut gws = Vec::new();
    for name in ["gw-1", "gw-2", "gw-3"] {
        gws.push(start_replica(&replica(&config, url, name)).await);
    }
    eprintln!("replicas up after {:?}", started.elapsed());
    // Tunnels of the one branch (unassigned) spread 1 / 4 / 0.
    let mut first = vec![Pusher::open(gws[0].addr, "127.0.0.1", ports[0]).await];
    let mut second = Vec::new();
    for _ in 0..4 {
        second.push(Pusher::open(gws[1].addr, "127.0.0.1", ports[1]).await);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rates = measure(&[&sinks[0], &sinks[1], &sinks[2]], Duration::from_secs(10)).await;
    let total: f64 = rates.iter().sum();
    eprintln!("1/4/0: {rates:?}, total {total:.0} B/s");
    assert!(
        (total / LIMIT - 1.0).abs() <= 0.03,
        "the fleet moves {total:.0} B/s of a 1 MB/s budget: {rates:?}"
    );
    let part = rates[1] / total;
    assert!(
        (part - 0.8).abs() <= 0.05,
        "the replica with 4 of 5 tunnels moves {part:.3} of the budget"
    );
    let metrics = gws[1].metrics().await;
    let share = metrics.value(
        r#"portcullis_fleet_share_bytes_per_second{scope="each-branch",budget="unassigned",direction="upload"}"#,
    );
    assert!((share / LIMIT - 0.8).abs() < 0.06, "share {share}");
    assert_eq!(metrics.get("portcullis_fleet_connected"), Some(1.0));

    eprintln!("measured after {:?}", started.elapsed());
    // Move three tunnels from the second replica to the third: 1 / 1 / 3.
    for _ in 0..3 {
        assert!(second.pop().unwrap().close().await);
    }
    let mut third = Vec::new();
    for _ in 0..3 {
        third.push(Pusher::open(gws[2].addr, "127.0.0.1", ports[2]).await);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rates = measure(&[&sinks[0], &sinks[1], &sinks[2]], Duration::from_secs(2)).await;
    let total: f64 = rates.iter().sum();
    eprintln!("1/1/3 after 1 s: {rates:?}, total {total:.0} B/s");
    assert!((total / LIMIT - 1.0).abs() <= 0.05, "{rates:?}");
    assert!(
        (rates[2] / total - 0.6).abs() <= 0.07,
        "the split follows the tunnels within a second: {rates:?}"
    );
    for pusher in first.drain(..).chain(second).chain(third) {
        assert!(pusher.close().await, "no tunnel failed");
    }
    (gws, ports)
}

#[tokio::test]
async fn an_all_branches_budget_is_shared_by_two_branches_on_two_replicas() {
    let redis = Redis::start(&[]);
    let sinks = [Sink::start().await, Sink::start().await];
    let ports: Vec<u16> = sinks.iter().map(|s| s.port).collect();
    let config = gateway_for(&ports)
        .extra(&upload_all_day("all-branches"))
        .branch(Branch::new("london").sources(&["127.0.0.2"]))
        .branch(Branch::new("paris").sources(&["127.0.0.3"]));
    let a = start_replica(&replica(&config, &redis.url(), "gw-a")).await;
    // The second replica's admin listener on a port of its own, for `explain` to find.
    let admin = format!("127.0.0.1:{}", free_port());
    let b_config = replica(&config, &redis.url(), "gw-b").listen("admin", &admin);
    let b = start_replica(&b_config).await;
    // london: one tunnel on the first replica; paris: three on the second.
    let mut pushers = vec![Pusher::open(a.addr, "127.0.0.2", ports[0]).await];
    for _ in 0..3 {
        pushers.push(Pusher::open(b.addr, "127.0.0.3", ports[1]).await);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rates = measure(&[&sinks[0], &sinks[1]], Duration::from_secs(6)).await;
    let total: f64 = rates.iter().sum();
    eprintln!("all-branches 1/3: {rates:?}, total {total:.0} B/s");
    assert!(
        (total / LIMIT - 1.0).abs() <= 0.03,
        "both branches together move {total:.0} B/s: {rates:?}"
    );
    assert!(
        (rates[1] / total - 0.75).abs() <= 0.05,
        "three of four tunnels: {rates:?}"
    );
    // explain on the second replica's host reads its share from its admin listener.
    let (_dir, file) = temp_file("b.toml", &b_config.to_string());
    let target = format!("{ORIGIN_HOST}:{}", ports[1]);
    let out = portcullis(&[
        "explain",
        "--config",
        file.to_str().unwrap(),
        "--from",
        "127.0.0.3",
        &target,
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("all-branches *; the running replica's share now ")
            && text.contains("fleet-wide"),
        "{text}"
    );
    for pusher in pushers {
        assert!(pusher.close().await);
    }
}

#[tokio::test]
async fn max_tunnels_counts_across_the_fleet_and_a_killed_replica_stops_counting() {
    let redis = Redis::start(&[]);
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let config = gateway_for(&[port]).branch(office(5)).fleet("lease", "1s");
    let mut gws = Vec::new();
    for name in ["gw-1", "gw-2", "gw-3"] {
        gws.push(start_replica(&replica(&config, &redis.url(), name)).await);
    }
    let target = format!("{ORIGIN_HOST}:{port}");
    let mut open = Vec::new();
    for (i, n) in [(0, 2), (1, 2), (2, 1)] {
        for _ in 0..n {
            let (tcp, reply) = connect_from(gws[i].addr, "127.0.0.1", &target, "").await;
            assert_eq!(reply.status, 200);
            open.push((i, tcp));
        }
    }
    for gw in &gws {
        let (_tcp, reply) = connect_from(gw.addr, "127.0.0.1", &target, "").await;
        assert_eq!(
            (reply.status, reply.header("portcullis-error")),
            (429, Some("branch tunnel limit reached")),
            "the sixth tunnel is refused on whichever replica"
        );
    }
    // One closes on the third replica: its slot is free on the first.
    let at = open.iter().position(|(i, _)| *i == 2).unwrap();
    drop(open.remove(at));
    let mut admitted = false;
    for _ in 0..50 {
        let (tcp, reply) = connect_from(gws[0].addr, "127.0.0.1", &target, "").await;
        if reply.status == 200 {
            open.push((0, tcp));
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(admitted, "a closed tunnel's slot is free across the fleet");
    // Kill the first replica (3 tunnels): after the lease its tunnels no longer count.
    let killed = gws.remove(0);
    drop(killed);
    open.retain(|(i, _)| *i != 0);
    let (_tcp, reply) = connect_from(gws[0].addr, "127.0.0.1", &target, "").await;
    assert_eq!(
        reply.status, 429,
        "within the lease the dead replica's tunnels count"
    );
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    for _ in 0..3 {
        let (tcp, reply) = connect_from(gws[0].addr, "127.0.0.1", &target, "").await;
        assert_eq!(reply.status, 200, "the killed replica's tunnels lapsed");
        open.push((1, tcp));
    }
    let (_tcp, reply) = connect_from(gws[1].addr, "127.0.0.1", &target, "").await;
    assert_eq!(reply.status, 429);
}

#[tokio::test]
async fn with_redis_gone_tunnels_go_on_at_the_fallback_share_and_shares_resume() {
    let mut redis = Redis::start(&[]);
    let sinks = [
        Sink::start().await,
        Sink::start().await,
        Sink::start().await,
    ];
    let ports: Vec<u16> = sinks.iter().map(|s| s.port).collect();
    let config = gateway_for(&ports)
        .extra(&upload_all_day("each-branch"))
        .fleet("lease", "1s")
        .fleet("fallback_share", 0.5);
    let mut gws = Vec::new();
    for name in ["gw-1", "gw-2", "gw-3"] {
        gws.push(start_replica(&replica(&config, &redis.url(), name)).await);
    }
    let mut pushers = Vec::new();
    for (gw, port) in gws.iter().zip(&ports) {
        pushers.push(Pusher::open(gw.addr, "127.0.0.1", *port).await);
    }
    let all = [&sinks[0], &sinks[1], &sinks[2]];
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let total: f64 = measure(&all, Duration::from_secs(2)).await.iter().sum();
    eprintln!("with Redis: {total:.0} B/s");
    assert!((total / LIMIT - 1.0).abs() <= 0.05, "{total}");

    redis.stop();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let total: f64 = measure(&all, Duration::from_secs(2)).await.iter().sum();
    eprintln!("Redis stopped, after the lease: {total:.0} B/s");
    assert!(
        (total / (0.5 * 3.0 * LIMIT) - 1.0).abs() <= 0.06,
        "each replica takes its fallback share: {total:.0} B/s"
    );
    for gw in &gws {
        let metrics = gw.metrics().await;
        assert_eq!(metrics.get("portcullis_fleet_connected"), Some(0.0));
        assert!(metrics.value("portcullis_fleet_refresh_failures_total") >= 1.0);
    }

    redis.restart();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let total: f64 = measure(&all, Duration::from_secs(2)).await.iter().sum();
    eprintln!("Redis back, after 1 s: {total:.0} B/s");
    assert!(
        (total / LIMIT - 1.0).abs() <= 0.05,
        "back to the fleet limit: {total:.0} B/s"
    );
    for pusher in pushers {
        assert!(
            pusher.close().await,
            "no tunnel failed while Redis was away"
        );
    }
    for gw in &gws {
        assert_eq!(
            gw.count_logs(|l| l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("fleet: Redis does not answer"))),
            1,
            "the outage is logged once"
        );
    }
}

#[tokio::test]
async fn a_password_from_a_file_reaches_redis_and_never_the_logs() {
    let password = "fleet-s3cret-pw";
    let redis = Redis::start(&["--requirepass", password]);
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let (_dir, file) = temp_file("redis-password", &format!("{password}\n"));
    let config = gateway_for(&[port]).branch(office(2));
    let with_file = config.clone().fleet("redis_password_file", &file);
    let mut gw = start_replica(&replica(&with_file, &redis.url(), "gw-1")).await;
    let target = format!("{ORIGIN_HOST}:{port}");
    let (_tunnel, reply) = connect_from(gw.addr, "127.0.0.1", &target, "").await;
    assert_eq!(reply.status, 200);
    let stored = redis.command(&format!(
        "AUTH {password}\r\nHGET portcullis:{{tunnels:office}} gw-1"
    ));
    assert!(
        stored.contains("+OK") && stored.contains("\n1 "),
        "{stored:?}"
    );
    let metrics = gw.metrics().await;
    assert_eq!(metrics.get("portcullis_fleet_connected"), Some(1.0));
    // A reload keeps the fleet client; a changed [fleet] waits for a restart.
    let renamed = replica(&with_file, &redis.url(), "gw-9");
    std::fs::write(gw.config_path(), renamed.to_string()).unwrap();
    let _ = gw.reload("reload applied").await;
    let _ = gw
        .wait_log(|l| l["message"] == "reload: [fleet] changes take effect at the next restart")
        .await;
    let (_second, reply) = connect_from(gw.addr, "127.0.0.1", &target, "").await;
    assert_eq!(reply.status, 200);
    let stored = redis.command(&format!(
        "AUTH {password}\r\nHGET portcullis:{{tunnels:office}} gw-1"
    ));
    assert!(stored.contains("\n2 "), "still counted as gw-1: {stored:?}");

    // The same with the password in the URL: shown redacted, and a wrong one is refused.
    let url = format!("redis://:wrong-{password}@127.0.0.1:{}/0", redis.port);
    let mut wrong = Gateway::start(replica(&config, &url, "gw-2")).await;
    let line = wrong
        .wait_log(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("fleet: Redis does not answer"))
        })
        .await;
    assert!(line["redis"].as_str().unwrap().contains(":***@"), "{line}");
    // Redis refuses it: the replica decides alone (its fallback share of 2 is 1 tunnel).
    let (_t, reply) = connect_from(wrong.addr, "127.0.0.1", &target, "").await;
    assert_eq!(reply.status, 200);
    let output = portcullis(&["check-config", wrong.config_path().to_str().unwrap()]);
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains("fleet: replica gw-2 on redis://:***@127.0.0.1:"),
        "{text}"
    );
    for logs in [gw.logs(), wrong.logs()] {
        let all = serde_json::to_string(&logs).unwrap();
        assert!(!all.contains(password), "a password in the logs");
    }
    assert!(
        !text.contains(password),
        "a password in check-config: {text}"
    );
    drop(gw);
}

#[tokio::test]
async fn without_fleet_nothing_connects_and_a_silent_redis_holds_nothing_up() {
    // A listener standing in for Redis that never answers.
    let stand_in = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}/0", stand_in.local_addr().unwrap());
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let without = gateway_for(&[port])
        .extra(&upload_all_day("each-branch"))
        .branch(office(4));
    let target = format!("{ORIGIN_HOST}:{port}");
    // No [fleet]: the same limits, no client, no task, no metric.
    let with = replica(&without, &url, "gw-1");
    assert!(!without.to_string().contains("[fleet]"));
    let gw = Gateway::start(&without).await;
    let (_tunnel, reply) = connect_from(gw.addr, "127.0.0.1", &target, "").await;
    assert_eq!(reply.status, 200);
    let metrics = gw.metrics().await;
    assert!(
        !metrics
            .names()
            .iter()
            .any(|name| name.starts_with("portcullis_fleet")),
        "fleet metrics without [fleet]:\n{metrics}"
    );
    let accepted = tokio::time::timeout(Duration::from_millis(700), stand_in.accept()).await;
    assert!(
        accepted.is_err(),
        "a gateway without [fleet] connected to the stand-in"
    );
    drop(gw);

    // With [fleet] on the silent stand-in: it connects, and a tunnel of a limited branch is
    // decided alone within the timeout (one refresh), never held up.
    let (_dir, file) = temp_file("fleet.toml", &with.to_string());
    let table = portcullis(&["schedule", "--config", file.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&table.stdout).contains("Fleet-wide (fleet mode, replica gw-1"),
        "portcullis schedule says the limits are the fleet's"
    );
    let gw = Gateway::start(&with).await;
    let (_held, _) = tokio::time::timeout(Duration::from_secs(2), stand_in.accept())
        .await
        .expect("fleet mode connects")
        .unwrap();
    let started = std::time::Instant::now();
    let (_tunnel, reply) = connect_from(gw.addr, "127.0.0.1", &target, "").await;
    assert_eq!(reply.status, 200);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "a silent Redis held a tunnel up for {:?}",
        started.elapsed()
    );
    // Alone, the replica allows its fallback share of the cap: ceil(0.34 x 4) = 2 tunnels.
    let (_second, reply) = connect_from(gw.addr, "127.0.0.1", &target, "").await;
    assert_eq!(reply.status, 200);
    let (_third, reply) = connect_from(gw.addr, "127.0.0.1", &target, "").await;
    assert_eq!(reply.status, 429, "the fallback share of max_tunnels");
    let metrics = gw.metrics().await;
    assert_eq!(metrics.get("portcullis_fleet_connected"), Some(0.0));
}

#[tokio::test]
async fn a_replica_stopping_gives_its_share_back_at_once() {
    let redis = Redis::start(&[]);
    let sinks = [Sink::start().await, Sink::start().await];
    let ports: Vec<u16> = sinks.iter().map(|s| s.port).collect();
    let config = gateway_for(&ports).extra(&upload_all_day("each-branch"));
    let stopping = start_replica(&replica(&config, &redis.url(), "gw-1")).await;
    let staying = start_replica(&replica(&config, &redis.url(), "gw-2")).await;
    let pushers = [
        Pusher::open(stopping.addr, "127.0.0.1", ports[0]).await,
        Pusher::open(staying.addr, "127.0.0.1", ports[1]).await,
    ];
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rates = measure(&[&sinks[0], &sinks[1]], Duration::from_secs(1)).await;
    assert!(
        (rates[1] / LIMIT - 0.5).abs() < 0.06,
        "half each: {rates:?}"
    );
    let key = "portcullis:{each-branch:unassigned:upload}:shares";
    assert!(
        redis
            .command(&format!("HEXISTS {key} gw-1"))
            .starts_with(":1")
    );
    // SIGTERM: the replica drains its open tunnel (at the floor) and its field goes at once.
    stopping.signal("TERM");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        redis
            .command(&format!("HEXISTS {key} gw-1"))
            .starts_with(":0")
    );
    let rates = measure(&[&sinks[0], &sinks[1]], Duration::from_secs(1)).await;
    eprintln!("after SIGTERM: {rates:?}");
    assert!(
        rates[1] / LIMIT > 0.95 && rates[0] / LIMIT < 0.02,
        "the staying replica takes the whole budget: {rates:?}"
    );
    for pusher in pushers {
        pusher.close().await;
    }
}

#[tokio::test]
async fn authentication_attempts_count_across_the_fleet() {
    let redis = Redis::start(&[]);
    authentication_attempts_count_across(|config, name| replica(config, &redis.url(), name)).await;
}

/// Two replicas, each `on` its Redis under its name: three credential guesses a minute from
/// one address, whichever replica takes them.
pub async fn authentication_attempts_count_across(
    on: impl Fn(&GatewayConfig, &str) -> GatewayConfig,
) {
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let hash = portcullis::config::password::hash_password("s3cret").unwrap();
    let config = gateway_for(&[port])
        .limit("auth_attempts_per_minute", 3)
        .branch(Branch::new("office").credentials("fs1", &hash));
    let a = start_replica(&on(&config, "gw-1")).await;
    let b = start_replica(&on(&config, "gw-2")).await;
    let target = format!("{ORIGIN_HOST}:{port}");
    let mut statuses = Vec::new();
    for gw in [&a, &b, &a, &b] {
        let (_tcp, reply) =
            connect_from(gw.addr, "127.0.0.5", &target, &basic("fs1", "guess")).await;
        statuses.push(reply.status);
    }
    assert_eq!(
        statuses,
        [407, 407, 407, 429],
        "three guesses a minute from one address, whichever replica takes them"
    );
    // Another address has its own count.
    let (_tcp, reply) = connect_from(b.addr, "127.0.0.6", &target, &basic("fs1", "s3cret")).await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn rediss_verifies_the_server_against_the_system_trust_store() {
    let pki = Pki::new();
    let (cert, key) = pki.issue_pem(&["127.0.0.1"], 2040);
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let redis = Redis::start_tls(&path("redis.pem", &cert), &path("redis.key", &key));
    // The replica trusts the test CA as the system's (rustls-native-certs reads SSL_CERT_FILE).
    let ca = path("ca.pem", &pki.ca_pem);
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let url = format!("rediss://127.0.0.1:{}/0", redis.port);
    let config = gateway_for(&[port]).branch(office(2));
    let mut gw = Gateway::start_with_env(
        replica(&config, &url, "gw-1"),
        &[("SSL_CERT_FILE", ca.to_str().unwrap())],
    )
    .await;
    let _ = gw
        .wait_log(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("fleet: Redis answers"))
        })
        .await;
    let target = format!("{ORIGIN_HOST}:{port}");
    let (_tunnel, reply) = connect_from(gw.addr, "127.0.0.1", &target, "").await;
    assert_eq!(reply.status, 200);
    let metrics = gw.metrics().await;
    assert_eq!(metrics.get("portcullis_fleet_connected"), Some(1.0));
    // Without the CA the server is not believed: Redis does not answer, tunnels go on.
    let mut untrusted = Gateway::start_with_env(
        replica(&config, &url, "gw-2"),
        &[("SSL_CERT_FILE", "/dev/null")],
    )
    .await;
    let _ = untrusted
        .wait_log(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("fleet: Redis does not answer"))
        })
        .await;
    let (_tunnel, reply) = connect_from(untrusted.addr, "127.0.0.1", &target, "").await;
    assert_eq!(reply.status, 200);
}

/// `portcullis serve --config FILE` run to its end, killed if it still runs after `within`:
/// the exit code (`None` when killed or ended by a signal) and what it wrote to stderr.
fn serve_until_exit(file: &std::path::Path, within: Duration) -> (Option<i32>, String) {
    use std::io::Read;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["serve", "--log-format", "json", "--config"])
        .arg(file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + within;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    (code, stderr)
}

const WAITING: &str = "fleet: another process holds this fleet.name; waiting for it to lapse (a replica stopped without giving it back) or to be renewed (a live one)";
const CLASH: &str = "fleet: another live replica runs under this fleet.name: both count as one in every fleet-wide limit, which doubles them; give each its own fleet.name and restart one";

#[tokio::test]
async fn a_replica_under_a_live_replicas_name_refuses_to_start_and_a_stopped_ones_name_is_free() {
    let redis = Redis::start(&[]);
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let config = replica(&gateway_for(&[port]), &redis.url(), "gw-1").fleet("lease", "2s");
    let mut first = start_replica(&config).await;
    // The same name while the first runs: refused once the first renewed it past a lease.
    let (_dir, file) = temp_file("duplicate.toml", &config.to_string());
    let started = std::time::Instant::now();
    let (code, stderr) = serve_until_exit(&file, Duration::from_secs(15));
    assert_eq!(
        code,
        Some(64),
        "a second live gw-1 was not refused: {stderr}"
    );
    assert!(
        stderr.contains("fleet.name \"gw-1\" is in use by another live replica (instance ")
            && stderr.contains("Give each replica its own fleet.name"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    first
        .metrics()
        .await
        .assert_value("portcullis_fleet_name_conflict", 0.0);
    assert_eq!(first.count_logs(|l| l["message"] == CLASH), 0);

    // Stopped: the name is given back, and the next replica under it starts without waiting.
    first.signal("TERM");
    assert!(first.wait_exit(Duration::from_secs(20)).await.is_some());
    let mut second = start_replica(&config).await;
    assert_eq!(second.count_logs(|l| l["message"] == WAITING), 0);
    // Killed: the next one waits for the dead replica's hold to lapse, then starts.
    second.signal("KILL");
    assert!(second.wait_exit(Duration::from_secs(5)).await.is_some());
    let mut third = start_replica(&config).await;
    let _ = third.wait_log(|l| l["message"] == WAITING).await;
    let target = format!("{ORIGIN_HOST}:{port}");
    let (_tunnel, reply) = connect_from(third.addr, "127.0.0.1", &target, "").await;
    assert_eq!(reply.status, 200);
    assert_eq!(third.count_logs(|l| l["message"] == CLASH), 0);
}

#[tokio::test]
async fn a_name_clash_found_while_running_is_logged_as_an_error_and_shown_by_a_metric() {
    let mut redis = Redis::start(&[]);
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    // A long lease: the winner's hold must not lapse under a loaded machine mid-test.
    let config = replica(&gateway_for(&[port]), &redis.url(), "gw-1").fleet("lease", "3s");
    let first = start_replica(&config).await;
    // With Redis away the second cannot check the name: it starts, never held up.
    redis.stop();
    let started = std::time::Instant::now();
    let second = Gateway::start(&config).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let target = format!("{ORIGIN_HOST}:{port}");
    let (_tunnel, reply) = connect_from(second.addr, "127.0.0.1", &target, "").await;
    assert_eq!(reply.status, 200);
    // Redis back: one of the two holds the name, the other says so, once and loudly.
    redis.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let clashes = |gw: &Gateway| gw.count_logs(|l| l["message"] == CLASH && l["level"] == "ERROR");
    while clashes(&first) + clashes(&second) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no clash was reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (a, b) = (clashes(&first), clashes(&second));
    assert_eq!(a + b, 1, "reported once, by one of the two: {a} {b}");
    let loser = if a == 1 { &first } else { &second };
    let winner = if a == 1 { &second } else { &first };
    for (gw, want) in [(loser, 1.0), (winner, 0.0)] {
        gw.metrics()
            .await
            .assert_value("portcullis_fleet_name_conflict", want);
    }
}
