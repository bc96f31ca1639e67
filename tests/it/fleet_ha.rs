//! Fleet mode on a Redis that survives losing a node: a Redis Cluster (three primaries with a
//! replica each) and a Sentinel set (a primary, a replica, three sentinels), real
//! `redis-server` processes of the test's own (support's `RedisCluster`, `RedisSentinel`),
//! real gateway replicas. Every fleet feature works as on one Redis; a primary killed by its
//! PID fails no tunnel, and the limits are whole again within 2 s of the new primary.

use crate::fleet::{
    LIMIT, Pusher, Sink, authentication_attempts_count_across, each_branch_budget_split,
    gateway_for, measure, office, replica, start_replica, upload_all_day,
};
use crate::support::*;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const DOWN: &str = "fleet: Redis does not answer";
const UP: &str = "fleet: Redis answers";

fn logged(gw: &Gateway, start: &str) -> usize {
    gw.count_logs(|l| l["message"].as_str().is_some_and(|m| m.starts_with(start)))
}

/// The share hash of the each-branch upload budget of `branch`.
fn share_key(branch: &str) -> String {
    format!("portcullis:{{each-branch:{branch}:upload}}:shares")
}

/// `config` as the replica `name` of a fleet on the sentinel set `value` (`fleet.sentinel`).
fn sentinel_replica(config: &GatewayConfig, value: &str, name: &str) -> GatewayConfig {
    config
        .clone()
        .fleet("sentinel", TomlRaw(value.to_owned()))
        .fleet("name", name)
}

#[tokio::test]
async fn a_cluster_splits_a_budget_as_one_redis_does_and_spreads_budgets_over_its_primaries() {
    let cluster = RedisCluster::start();
    let branches = [
        ("london", "127.0.0.2"),
        ("paris", "127.0.0.3"),
        ("rome", "127.0.0.4"),
    ];
    let (gws, ports) = each_branch_budget_split(&cluster.url()).await;
    // Another replica with three branches, a tunnel of each: each budget takes its share in
    // its own hash, on the primary serving that hash's slot.
    let mut config = gateway_for(&ports).extra(&upload_all_day("each-branch"));
    for (name, from) in branches {
        config = config.branch(Branch::new(name).sources(&[from]));
    }
    let branched = start_replica(&replica(&config, &cluster.url(), "gw-4")).await;
    let mut pushers = Vec::new();
    for (_, from) in branches {
        pushers.push(Pusher::open(branched.addr, from, ports[0]).await);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut holders = BTreeSet::new();
    for (branch, _) in branches {
        let key = share_key(branch);
        let primary = cluster.primary_of(&key);
        let held = cluster.command(primary, &format!("HEXISTS {key} gw-4"));
        assert!(held.starts_with(":1"), "{key} on {primary}: {held:?}");
        holders.insert(primary);
    }
    eprintln!("budgets on primaries {holders:?}");
    assert!(holders.len() >= 2, "every budget on one primary");
    for pusher in pushers {
        assert!(pusher.close().await, "no tunnel failed");
    }
    for gw in gws.iter().chain([&branched]) {
        assert_eq!(logged(gw, DOWN), 0, "Redis always answered");
    }
}

/// Three replicas pushing through one each-branch budget on the Redis `config_for` names;
/// `kill` takes the primary holding the budget away and answers when its successor was
/// elected. No tunnel fails, the fleet is within 3 % of the limit again within 2 s, every
/// replica says once that Redis went and once that it answers again, and `check` sees the
/// budget on the new primary (and what the replicas logged).
async fn a_failover_keeps_the_limit<T: Send + 'static>(
    config_for: impl Fn(&GatewayConfig, &str) -> GatewayConfig,
    kill: impl FnOnce() -> (T, Instant) + Send + 'static,
    check: impl FnOnce(&T, &[Gateway]),
) {
    let sinks = [
        Sink::start().await,
        Sink::start().await,
        Sink::start().await,
    ];
    let ports: Vec<u16> = sinks.iter().map(|s| s.port).collect();
    let config = gateway_for(&ports).extra(&upload_all_day("each-branch"));
    let mut gws = Vec::new();
    for name in ["gw-1", "gw-2", "gw-3"] {
        gws.push(start_replica(&config_for(&config, name)).await);
    }
    let mut pushers = Vec::new();
    for (gw, port) in gws.iter().zip(&ports) {
        pushers.push(Pusher::open(gw.addr, "127.0.0.1", *port).await);
    }
    let all = [&sinks[0], &sinks[1], &sinks[2]];
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let total: f64 = measure(&all, Duration::from_secs(2)).await.iter().sum();
    eprintln!("before the failover: {total:.0} B/s");
    assert!((total / LIMIT - 1.0).abs() <= 0.03, "{total}");
    let said: Vec<(usize, usize)> = gws
        .iter()
        .map(|gw| (logged(gw, DOWN), logged(gw, UP)))
        .collect();
    // Killed and replaced off the runtime's thread: the sinks go on counting meanwhile.
    let (set, elected) = tokio::task::spawn_blocking(kill).await.unwrap();
    // Every replica finds the new primary (its next refresh takes its shares again)...
    for (gw, (_, up)) in gws.iter().zip(&said) {
        while logged(gw, UP) <= *up {
            assert!(
                elected.elapsed() < Duration::from_secs(2),
                "a replica did not find the new primary within 2 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let found = elected.elapsed();
    // ...and the fleet moves the limit again, measured until 2 s after the election.
    let from = found.max(Duration::from_millis(500));
    tokio::time::sleep(from - found).await;
    let over = Duration::from_secs(2)
        .saturating_sub(from)
        .max(Duration::from_millis(500));
    let rates = measure(&all, over).await;
    let total: f64 = rates.iter().sum();
    eprintln!(
        "every replica answered {found:?} after the election; from {from:?} for {over:?}: {total:.0} B/s {rates:?}"
    );
    assert!(
        (total / LIMIT - 1.0).abs() <= 0.03,
        "the fleet moves {total:.0} B/s of 1 MB/s within 2 s of the new primary"
    );
    let error = gws[0]
        .logs()
        .into_iter()
        .rev()
        .find(|l| l["message"].as_str().is_some_and(|m| m.starts_with(DOWN)))
        .map(|l| l["error"].clone());
    eprintln!("the outage logged with the error {error:?}");
    for (gw, (down, up)) in gws.iter().zip(said) {
        let metrics = gw.metrics().await;
        assert_eq!(metrics.get("portcullis_fleet_connected"), Some(1.0));
        assert_eq!(logged(gw, DOWN), down + 1, "the outage is logged once");
        assert_eq!(logged(gw, UP), up + 1, "and the way back once");
    }
    check(&set, &gws);
    for pusher in pushers {
        assert!(
            pusher.close().await,
            "no tunnel failed through the failover"
        );
    }
}

#[tokio::test]
async fn a_cluster_primary_killed_fails_no_tunnel_and_the_limit_is_whole_again_within_2s() {
    let mut cluster = RedisCluster::start();
    let url = cluster.url();
    let key = share_key("unassigned");
    a_failover_keeps_the_limit(
        |config, name| replica(config, &url, name),
        move || {
            let primary = cluster.primary_of(&share_key("unassigned"));
            let elected = cluster.kill_primary(primary);
            (cluster, elected)
        },
        |cluster, _| {
            // The budget lives on on the promoted replica.
            let primary = cluster.primary_of(&key);
            let held = cluster.command(primary, &format!("HLEN {key}"));
            assert!(held.starts_with(":3"), "{key} on {primary}: {held:?}");
        },
    )
    .await;
}

#[tokio::test]
async fn a_sentinel_failover_fails_no_tunnel_and_the_limit_is_whole_again_within_2s() {
    let mut sentinel = RedisSentinel::start();
    let value = sentinel.fleet_value();
    a_failover_keeps_the_limit(
        |config, name| sentinel_replica(config, &value, name),
        move || {
            let elected = sentinel.kill_primary();
            (sentinel, elected)
        },
        |sentinel, gws| {
            for gw in gws {
                let named = gw.count_logs(|l| {
                    l["message"] == "fleet: the sentinels name a new Redis primary; calls go to it"
                });
                assert_eq!(named, 1, "the new primary is named once");
            }
            let held = sentinel.command(
                sentinel.replica_port(),
                &format!("HLEN {}", share_key("unassigned")),
            );
            assert!(held.starts_with(":3"), "{held:?}");
        },
    )
    .await;
}

#[tokio::test]
async fn max_tunnels_never_exceeds_the_cap_through_a_cluster_failover() {
    let mut cluster = RedisCluster::start();
    let url = cluster.url();
    max_tunnels_through_a_failover(
        |config, name| replica(config, &url, name),
        move || {
            let primary = cluster.primary_of("portcullis:{tunnels:office}");
            let elected = cluster.kill_primary(primary);
            (cluster, elected)
        },
    )
    .await;
}

#[tokio::test]
async fn max_tunnels_never_exceeds_the_cap_through_a_sentinel_failover() {
    let mut sentinel = RedisSentinel::start();
    let value = sentinel.fleet_value();
    max_tunnels_through_a_failover(
        |config, name| sentinel_replica(config, &value, name),
        move || {
            let elected = sentinel.kill_primary();
            (sentinel, elected)
        },
    )
    .await;
}

/// Three replicas `on` a Redis that `kill` fails over, a branch of six tunnels: through the
/// failover and 3 s past the election, a tunnel closes on one replica and one is asked for on
/// the next, and at no point are more than six open; none waits; afterwards exactly six again.
async fn max_tunnels_through_a_failover<T: Send + 'static>(
    on: impl Fn(&GatewayConfig, &str) -> GatewayConfig,
    kill: impl FnOnce() -> (T, Instant) + Send + 'static,
) {
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    // Six tunnels fleet-wide; alone, a replica takes ceil(0.33 x 6) = 2, so three replicas
    // deciding alone cannot pass six either.
    let config = gateway_for(&[port])
        .branch(office(6))
        .fleet("fallback_share", 0.33);
    let mut gws = Vec::new();
    for name in ["gw-1", "gw-2", "gw-3"] {
        gws.push(start_replica(&on(&config, name)).await);
    }
    let target = format!("{ORIGIN_HOST}:{port}");
    let mut open: Vec<Vec<tokio::net::TcpStream>> = vec![Vec::new(), Vec::new(), Vec::new()];
    for (i, gw) in gws.iter().enumerate() {
        for _ in 0..2 {
            let (tcp, reply) = connect_from(gw.addr, "127.0.0.1", &target, "").await;
            assert_eq!(reply.status, 200);
            open[i].push(tcp);
        }
    }
    let (_tcp, reply) = connect_from(gws[0].addr, "127.0.0.1", &target, "").await;
    assert_eq!(reply.status, 429, "the seventh");
    let killer = tokio::task::spawn_blocking(kill);
    let (mut admitted, mut refused) = (0, 0);
    let mut slowest = Duration::ZERO;
    let mut elected: Option<(T, Instant)> = None;
    let mut killer = Some(killer);
    for round in 0..400 {
        if let Some(k) = killer.as_ref()
            && k.is_finished()
        {
            elected = Some(killer.take().unwrap().await.unwrap());
        }
        if elected
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() > Duration::from_secs(3))
        {
            break;
        }
        let (from, to) = (round % 3, (round + 1) % 3);
        if round % 2 == 0 && !open[from].is_empty() {
            drop(open[from].remove(0));
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let asked = Instant::now();
        let (tcp, reply) = connect_from(gws[to].addr, "127.0.0.1", &target, "").await;
        slowest = slowest.max(asked.elapsed());
        if reply.status == 200 {
            open[to].push(tcp);
            admitted += 1;
        } else {
            assert_eq!(reply.status, 429, "{reply:?}");
            refused += 1;
        }
        let now: usize = open.iter().map(Vec::len).sum();
        assert!(now <= 6, "{now} tunnels open of at most 6 (round {round})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_set, _) = elected.expect("the failover ended within the rounds");
    eprintln!(
        "through the failover: {admitted} admitted, {refused} refused, the slowest answer in {slowest:?}"
    );
    assert!(admitted >= 5, "tunnels were admitted through the failover");
    // Decided within a refresh (250 ms) and the proxy's own work: never held for the failover.
    assert!(
        slowest < Duration::from_secs(1),
        "a tunnel waited {slowest:?}"
    );
    // Healed: the fleet takes exactly six again.
    for list in &mut open {
        list.clear();
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut again = Vec::new();
    for i in 0..6 {
        let (tcp, reply) = connect_from(gws[i % 3].addr, "127.0.0.1", &target, "").await;
        assert_eq!(reply.status, 200, "tunnel {i} after the failover");
        again.push(tcp);
    }
    let (_tcp, reply) = connect_from(gws[1].addr, "127.0.0.1", &target, "").await;
    assert_eq!(reply.status, 429, "the seventh after the failover");
}

#[tokio::test]
async fn learned_destinations_spread_through_a_cluster() {
    let cluster = RedisCluster::start();
    crate::learned::replicas_share_learned_destinations(|config| {
        config.fleet("redis", cluster.url())
    })
    .await;
    // The hash and its version key share a slot, so one script changes both.
    let primary = cluster.primary_of("portcullis:{learned}");
    let both = cluster.command(
        primary,
        "EXISTS portcullis:{learned} portcullis:{learned}:version",
    );
    assert!(both.starts_with(":2"), "{both:?}");
}

#[tokio::test]
async fn a_replica_started_while_the_whole_cluster_is_down_finds_it_when_it_is_back() {
    let mut cluster = RedisCluster::start();
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let config = replica(
        &gateway_for(&[port]).branch(office(2)),
        &cluster.url(),
        "gw-1",
    );
    cluster = tokio::task::spawn_blocking(move || {
        cluster.kill_all();
        cluster
    })
    .await
    .unwrap();
    // Nothing answers: the replica starts, decides alone, and says Redis does not answer.
    let mut gw = Gateway::start(&config).await;
    let _ = gw
        .wait_log(|l| l["message"].as_str().is_some_and(|m| m.starts_with(DOWN)))
        .await;
    let target = format!("{ORIGIN_HOST}:{port}");
    let (_alone, reply) = connect_from(gw.addr, "127.0.0.1", &target, "").await;
    assert_eq!(reply.status, 200);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.start_again();
        cluster
    })
    .await
    .unwrap();
    let back = Instant::now();
    let _ = gw
        .wait_log(|l| l["message"].as_str().is_some_and(|m| m.starts_with(UP)))
        .await;
    eprintln!("Redis answers {:?} after the cluster is ok", back.elapsed());
    assert_eq!(
        gw.metrics().await.get("portcullis_fleet_connected"),
        Some(1.0)
    );
    // Counted in Redis again: the replica's true count was written back by its refresh.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let key = "portcullis:{tunnels:office}";
    let stored = cluster.command(cluster.primary_of(key), &format!("HGET {key} gw-1"));
    assert!(stored.contains("\n1 "), "{stored:?}");
}

#[tokio::test]
async fn an_acl_user_and_passwords_reach_a_cluster_and_a_sentinel_set_and_never_the_logs() {
    let auth = RedisAuth {
        password: Some("admin-s3cret".into()),
        user: Some(("gateway".into(), "gateway-s3cret".into())),
        sentinel_password: Some("sentinel-s3cret".into()),
    };
    let (cluster, sentinel) = tokio::task::spawn_blocking(move || {
        (
            RedisCluster::start_with(&auth),
            RedisSentinel::start_with(&auth),
        )
    })
    .await
    .unwrap();
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let (_dir, file) = temp_file("redis-password", "gateway-s3cret\n");
    let (_sentinel_dir, sentinels_file) = temp_file("sentinel-password", "sentinel-s3cret\n");
    // The gateway's own ACL user (on portcullis:* keys only) on every node.
    let config = gateway_for(&[port])
        .branch(office(2))
        .fleet("user", "gateway")
        .fleet("redis_password_file", &file);
    let on_cluster = start_replica(&replica(&config, &cluster.url(), "gw-c")).await;
    let nodes: Vec<String> = sentinel.nodes().iter().map(|n| format!("{n:?}")).collect();
    let value = format!(
        "{{ master = \"{SENTINEL_MASTER}\", nodes = [{}], password_file = {:?} }}",
        nodes.join(", "),
        sentinels_file.to_str().unwrap()
    );
    let on_sentinel = start_replica(&sentinel_replica(&config, &value, "gw-s")).await;
    let target = format!("{ORIGIN_HOST}:{port}");
    let key = "portcullis:{tunnels:office}";
    let (_one, reply) = connect_from(on_cluster.addr, "127.0.0.1", &target, "").await;
    assert_eq!(reply.status, 200);
    let stored = cluster.command(cluster.primary_of(key), &format!("HGET {key} gw-c"));
    assert!(
        stored.contains("\n1 "),
        "counted on the cluster: {stored:?}"
    );
    let (_two, reply) = connect_from(on_sentinel.addr, "127.0.0.1", &target, "").await;
    assert_eq!(reply.status, 200);
    let stored = sentinel.command(sentinel.primary_port(), &format!("HGET {key} gw-s"));
    assert!(
        stored.contains("\n1 "),
        "counted on the primary: {stored:?}"
    );
    for gw in [&on_cluster, &on_sentinel] {
        let metrics = gw.metrics().await;
        assert_eq!(metrics.get("portcullis_fleet_connected"), Some(1.0));
        let all = serde_json::to_string(&gw.logs()).unwrap();
        for secret in ["admin-s3cret", "gateway-s3cret", "sentinel-s3cret"] {
            assert!(!all.contains(secret), "a password in the logs");
        }
    }
    let shown = on_sentinel.logs().iter().find_map(|l| {
        l["redis"]
            .as_str()
            .filter(|r| r.starts_with("sentinel master"))
            .map(str::to_owned)
    });
    assert_eq!(
        shown.as_deref(),
        Some(
            format!(
                "sentinel master {SENTINEL_MASTER} via {}",
                sentinel.nodes().join(",")
            )
            .as_str()
        )
    );
}

/// A replica trusting the CA `ca_pem` as the system's (rustls-native-certs reads `SSL_CERT_FILE`)
/// counts a tunnel to `target` where `stored` reads it (over TLS); one trusting nothing
/// believes no node: Redis does not answer for it, and its tunnels go on. The trusting
/// replica, its CA's directory and its tunnel stay with the caller.
async fn verified_against_the_system_trust_store(
    ca_pem: &str,
    target: &str,
    replica: impl Fn(&str) -> GatewayConfig,
    stored: impl Fn() -> String,
) -> (Gateway, tempfile::TempDir, tokio::net::TcpStream) {
    let ca = tempfile::tempdir().unwrap();
    let ca_file = ca.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let mut gw = Gateway::start_with_env(
        replica("gw-1"),
        &[("SSL_CERT_FILE", ca_file.to_str().unwrap())],
    )
    .await;
    let _ = gw
        .wait_log(|l| l["message"].as_str().is_some_and(|m| m.starts_with(UP)))
        .await;
    let (tunnel, reply) = connect_from(gw.addr, "127.0.0.1", target, "").await;
    assert_eq!(reply.status, 200);
    let counted = stored();
    assert!(counted.contains("\n1 "), "counted over TLS: {counted:?}");
    let mut untrusted =
        Gateway::start_with_env(replica("gw-2"), &[("SSL_CERT_FILE", "/dev/null")]).await;
    let _ = untrusted
        .wait_log(|l| l["message"].as_str().is_some_and(|m| m.starts_with(DOWN)))
        .await;
    let (_tunnel, reply) = connect_from(untrusted.addr, "127.0.0.1", target, "").await;
    assert_eq!(reply.status, 200);
    (gw, ca, tunnel)
}

#[tokio::test]
async fn rediss_cluster_verifies_every_node_against_the_system_trust_store() {
    let pki = Pki::new();
    let ca_pem = pki.ca_pem.clone();
    let cluster = tokio::task::spawn_blocking(move || RedisCluster::start_tls(&pki))
        .await
        .unwrap();
    assert!(cluster.url().starts_with("rediss+cluster://"));
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let config = gateway_for(&[port]).branch(office(2));
    let key = "portcullis:{tunnels:office}";
    verified_against_the_system_trust_store(
        &ca_pem,
        &format!("{ORIGIN_HOST}:{port}"),
        |name| replica(&config, &cluster.url(), name),
        || cluster.command(cluster.primary_of(key), &format!("HGET {key} gw-1")),
    )
    .await;
}

#[tokio::test]
async fn a_sentinel_set_over_tls_is_verified_and_followed_through_a_failover() {
    let pki = Pki::new();
    let ca_pem = pki.ca_pem.clone();
    let sentinel = tokio::task::spawn_blocking(move || RedisSentinel::start_tls(&pki))
        .await
        .unwrap();
    let value = sentinel.fleet_value();
    assert!(value.contains("rediss://"), "{value}");
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    // Room beyond the fallback share: the second tunnel opens right after the failover.
    let config = gateway_for(&[port]).branch(office(10));
    let key = "portcullis:{tunnels:office}";
    let (mut gw, _ca, _tunnel) = verified_against_the_system_trust_store(
        &ca_pem,
        &format!("{ORIGIN_HOST}:{port}"),
        |name| sentinel_replica(&config, &value, name),
        || sentinel.command(sentinel.primary_port(), &format!("HGET {key} gw-1")),
    )
    .await;
    // The primary killed: the sentinels, asked over TLS, name the replica, and the gateway
    // counts there over TLS (a second tunnel: the first's count came by replication).
    let sentinel = tokio::task::spawn_blocking(move || {
        let mut sentinel = sentinel;
        sentinel.kill_primary();
        sentinel
    })
    .await
    .unwrap();
    gw.wait_log(|l| {
        l["message"] == "fleet: the sentinels name a new Redis primary; calls go to it"
    })
    .await;
    let (_second, reply) =
        connect_from(gw.addr, "127.0.0.1", &format!("{ORIGIN_HOST}:{port}"), "").await;
    assert_eq!(reply.status, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stored = sentinel.command(sentinel.replica_port(), &format!("HGET {key} gw-1"));
        if stored.contains("\n2 ") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "both tunnels counted on the new primary: {stored:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn authentication_attempts_count_across_a_cluster() {
    let cluster = RedisCluster::start();
    authentication_attempts_count_across(|config, name| replica(config, &cluster.url(), name))
        .await;
}

#[tokio::test]
async fn authentication_attempts_and_learned_destinations_go_through_a_sentinel_set() {
    let sentinel = RedisSentinel::start();
    let value = sentinel.fleet_value();
    authentication_attempts_count_across(|config, name| sentinel_replica(config, &value, name))
        .await;
    crate::learned::replicas_share_learned_destinations(|config| {
        config.fleet("sentinel", TomlRaw(value.clone()))
    })
    .await;
    let both = sentinel.command(
        sentinel.primary_port(),
        "EXISTS portcullis:{learned} portcullis:{learned}:version",
    );
    assert!(both.starts_with(":2"), "{both:?}");
}

#[tokio::test]
async fn a_cluster_primary_away_holds_only_the_budgets_of_its_own_slots() {
    // A 3 s node timeout: the primary stays away about 4 s, past the 1 s lease.
    let mut cluster = tokio::task::spawn_blocking(|| RedisCluster::start_with_node_timeout(3000))
        .await
        .unwrap();
    let (london, paris) = (Sink::start().await, Sink::start().await);
    let config = gateway_for(&[london.port, paris.port])
        .extra(&upload_all_day("each-branch"))
        .branch(Branch::new("london").sources(&["127.0.0.2"]))
        .branch(Branch::new("paris").sources(&["127.0.0.3"]))
        .fleet("lease", "1s")
        .fleet("fallback_share", 0.5);
    let mut gws = Vec::new();
    for name in ["gw-1", "gw-2", "gw-3"] {
        gws.push(start_replica(&replica(&config, &cluster.url(), name)).await);
    }
    // The two budgets live on two primaries.
    let (on_london, on_paris) = (
        cluster.primary_of(&share_key("london")),
        cluster.primary_of(&share_key("paris")),
    );
    assert_ne!(on_london, on_paris);
    let mut pushers = Vec::new();
    for gw in &gws {
        pushers.push(Pusher::open(gw.addr, "127.0.0.2", london.port).await);
        pushers.push(Pusher::open(gw.addr, "127.0.0.3", paris.port).await);
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let rates = measure(&[&london, &paris], Duration::from_millis(1_500)).await;
    eprintln!("before: london {:.0}, paris {:.0} B/s", rates[0], rates[1]);
    let killed = Instant::now();
    let killer = tokio::task::spawn_blocking(move || {
        let elected = cluster.kill_primary(on_paris);
        (cluster, elected)
    });
    // Past the lease: paris's replicas run on their fallback shares (3 x 0.5 of its limit),
    // london's budget, on a primary that answers, keeps its real shares.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let rates = measure(&[&london, &paris], Duration::from_millis(1_500)).await;
    let during = killed.elapsed();
    eprintln!(
        "1.5 s to {during:?} after the kill: london {:.0}, paris {:.0} B/s",
        rates[0], rates[1]
    );
    let (_cluster, elected) = killer.await.unwrap();
    assert!(
        elected > killed + during,
        "the primary came back within the measurement"
    );
    assert!(
        (rates[0] / LIMIT - 1.0).abs() <= 0.05,
        "london's budget keeps its shares: {:.0} B/s",
        rates[0]
    );
    assert!(
        rates[1] / LIMIT > 1.3,
        "paris's budget is on the fallback share: {:.0} B/s",
        rates[1]
    );
    for pusher in pushers {
        assert!(pusher.close().await, "no tunnel failed");
    }
}
