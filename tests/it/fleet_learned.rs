//! Learned destinations in fleet mode when something goes away: a replica that was down while a
//! destination was forgotten (or approved), a forget made on a stopped replica's file, and a
//! Redis emptied by FLUSHALL or a restart without persistence. Real gateways, a real
//! redis-server of the test's own, TLS origins on loopback; every wait is bounded.

use crate::support::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Replica `name` on `redis` (refreshing every 200 ms) of the learning gateway whose state is
/// in `state`, its rule in `learn` mode, `accounts` names resolving to the origin.
fn replica(
    state: &tempfile::TempDir,
    port: u16,
    learn: &str,
    accounts: u32,
    redis: &Redis,
    name: &str,
) -> GatewayConfig {
    learning_config(state.path(), port, learn, accounts)
        .fleet("redis", redis.url())
        .fleet("name", name)
        .fleet("refresh", "200ms")
        .fleet("lease", "1s")
}

/// `learned EDIT --admin ADMIN --branch london HOST`, which must succeed.
fn edit_on(admin: SocketAddr, edit: &str, host: &str) {
    let admin = admin.to_string();
    let (ok, said, err) = cli(&[
        "learned", edit, "--admin", &admin, "--branch", "london", host,
    ]);
    assert!(ok, "learned {edit} {host}: {said}{err}");
}

/// Whether Redis's learned hash holds `host` as a live destination (false when it holds a
/// tombstone or nothing), from the raw reply of HGETALL.
fn live_in_redis(redis: &Redis, host: &str) -> bool {
    let reply = learned_hash(redis);
    let lines: Vec<&str> = reply.lines().collect();
    lines
        .iter()
        .position(|l| l.contains(host))
        .and_then(|at| lines.get(at + 2))
        .is_some_and(|value| !value.ends_with(" -"))
}

/// Waits up to 10 s for a change made on one replica to reach Redis (within a refresh or two),
/// as an operator's next step would come after it.
async fn reaches_redis(redis: &Redis, host: &str, live: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while live_in_redis(redis, host) != live {
        assert!(
            Instant::now() < deadline,
            "{host} live={live} never reached Redis"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts every replica in `gws` answers `want` for `host` from London, again and again for
/// `over` (a destination must not come back, nor go, a few refreshes later).
async fn holds(pki: &Pki, gws: &[&Gateway], host: &str, port: u16, want: u16, over: Duration) {
    let until = Instant::now() + over;
    loop {
        for gw in gws {
            let got = fetch(pki, gw.addr, LONDON, host, port).await;
            assert_eq!(got, want, "{host} through {}: {got}, not {want}", gw.addr);
        }
        if Instant::now() >= until {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_forget_made_while_a_replica_was_down_sticks_when_it_comes_back() {
    let pki = Pki::new();
    let origin = origin_for(&pki, 2).await;
    let port = origin.port();
    let redis = Redis::start(&[]);
    let (state_a, state_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Gateway::start(&replica(&state_a, port, "enforce", 2, &redis, "a")).await;
    let b_config = replica(&state_b, port, "enforce", 2, &redis, "b");
    let mut b = Gateway::start(&b_config).await;
    let target = format!("{}:{port}", account(0));
    edit_on(a.admin_addr.unwrap(), "approve", &target);
    eventually(&pki, b.addr, LONDON, &account(0), port, 200).await;

    // B stops with the approval in its file; the destination is revoked on A meanwhile.
    stop(&mut b).await;
    assert_eq!(state_file_hosts(state_b.path()), [account(0)]);
    drop(b);
    edit_on(a.admin_addr.unwrap(), "forget", &account(0));
    assert_eq!(fetch(&pki, a.addr, LONDON, &account(0), port).await, 403);
    reaches_redis(&redis, &account(0), false).await;

    // B comes back: it applies the forget before it serves, and the fleet never takes the
    // destination back from B's file.
    let mut b = Gateway::start(&b_config).await;
    assert_eq!(
        fetch(&pki, b.addr, LONDON, &account(0), port).await,
        403,
        "the replica that was down served a destination revoked meanwhile"
    );
    holds(
        &pki,
        &[&a, &b],
        &account(0),
        port,
        403,
        Duration::from_secs(3),
    )
    .await;
    let listing = admin_text(b.admin_addr.unwrap(), "/learned?branch=london").await;
    assert!(!listing.contains(&account(0)), "{listing}");
    assert_eq!(
        b.count_logs(
            |l| l["message"] == "fleet: learned destinations taken from the fleet"
                && l["removed"] == 1
        ),
        1,
        "B says it dropped the revoked destination"
    );

    // The other way round: approved again while B was away, B serves it as soon as it is back
    // (the approval is newer than the forget B kept).
    stop(&mut b).await;
    drop(b);
    edit_on(a.admin_addr.unwrap(), "approve", &target);
    reaches_redis(&redis, &account(0), true).await;
    let b = Gateway::start(&b_config).await;
    assert_eq!(fetch(&pki, b.addr, LONDON, &account(0), port).await, 200);
    holds(
        &pki,
        &[&a, &b],
        &account(0),
        port,
        200,
        Duration::from_secs(1),
    )
    .await;
}

#[tokio::test]
async fn a_forget_made_on_a_stopped_replicas_file_reaches_the_fleet() {
    let pki = Pki::new();
    let origin = origin_for(&pki, 1).await;
    let port = origin.port();
    let redis = Redis::start(&[]);
    let (state_a, state_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Gateway::start(&replica(&state_a, port, "enforce", 1, &redis, "a")).await;
    let mut b = Gateway::start(&replica(&state_b, port, "enforce", 1, &redis, "b")).await;
    edit_on(
        b.admin_addr.unwrap(),
        "approve",
        &format!("{}:{port}", account(0)),
    );
    eventually(&pki, a.addr, LONDON, &account(0), port, 200).await;
    stop(&mut b).await;
    // On B's state file, with B stopped: kept there for Redis, which B tells when it starts.
    let b_config = b.config_path();
    let (ok, said, err) = cli(&[
        "learned",
        "forget",
        "--config",
        b_config.to_str().unwrap(),
        "--branch",
        "london",
        &account(0),
    ]);
    assert!(ok && said.contains("no gateway was running"), "{said}{err}");
    assert_eq!(fetch(&pki, a.addr, LONDON, &account(0), port).await, 200);
    let b = Gateway::start(&std::fs::read_to_string(&b_config).unwrap()).await;
    assert_eq!(fetch(&pki, b.addr, LONDON, &account(0), port).await, 403);
    eventually(&pki, a.addr, LONDON, &account(0), port, 403).await;
    holds(
        &pki,
        &[&a, &b],
        &account(0),
        port,
        403,
        Duration::from_secs(1),
    )
    .await;
}

/// The learned hash as Redis holds it (raw protocol text, fields and values).
fn learned_hash(redis: &Redis) -> String {
    redis.command("HGETALL portcullis:{learned}")
}

#[tokio::test]
async fn an_emptied_redis_is_refilled_from_the_replicas_and_forgets_nothing() {
    let pki = Pki::new();
    let origin = origin_for(&pki, 3).await;
    let port = origin.port();
    let mut redis = Redis::start(&[]);
    let (state_a, state_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // A records, B enforces: acct0 learned by a tunnel through A, acct1 approved on B, acct2
    // approved then forgotten on B.
    let a = Gateway::start(&replica(&state_a, port, "record", 3, &redis, "a")).await;
    let b = Gateway::start(&replica(&state_b, port, "enforce", 3, &redis, "b")).await;
    assert_eq!(fetch(&pki, a.addr, LONDON, &account(0), port).await, 200);
    let b_admin = b.admin_addr.unwrap();
    edit_on(b_admin, "approve", &format!("{}:{port}", account(1)));
    edit_on(b_admin, "approve", &format!("{}:{port}", account(2)));
    edit_on(b_admin, "forget", &account(2));
    eventually(&pki, b.addr, LONDON, &account(0), port, 200).await;
    let a_admin = a.admin_addr.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !admin_text(a_admin, "/learned?branch=london")
        .await
        .contains(&account(1))
    {
        assert!(Instant::now() < deadline, "acct1 never reached A");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let new_metric = "portcullis_new_destinations_total{branch=\"london\",rule=\"accounts\"} 1";
    assert!(admin_text(a_admin, "/metrics").await.contains(new_metric));

    for (round, empty) in ["FLUSHALL", "restart"].into_iter().enumerate() {
        if empty == "restart" {
            // No persistence: it comes back with nothing.
            redis.restart();
        } else {
            assert!(redis.command("FLUSHALL").starts_with("+OK"));
        }
        // Every replica keeps serving what the fleet learned and approved, and only that.
        holds(&pki, &[&b], &account(0), port, 200, Duration::from_secs(2)).await;
        holds(&pki, &[&b], &account(1), port, 200, Duration::ZERO).await;
        holds(&pki, &[&b], &account(2), port, 403, Duration::ZERO).await;
        // Redis is refilled from the replicas, the forget included.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let hash = learned_hash(&redis);
            let refilled = (0..3).all(|n| hash.contains(&account(n)))
                && hash.lines().filter(|l| l.ends_with(" -")).count() == 1;
            if refilled {
                break;
            }
            assert!(Instant::now() < deadline, "{empty}: not refilled: {hash:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Record is not fooled either: acct0 is not new again on A.
        assert_eq!(fetch(&pki, a.addr, LONDON, &account(0), port).await, 200);
        let deadline = Instant::now() + Duration::from_secs(10);
        let lines = loop {
            let lines: Vec<_> = a
                .logs()
                .into_iter()
                .filter(|l| l["target"] == "portcullis::access" && l["host"] == account(0).as_str())
                .collect();
            if lines.len() >= 2 + round || Instant::now() >= deadline {
                break lines;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(lines.len(), 2 + round, "{lines:#?}");
        assert!(
            lines
                .iter()
                .skip(1)
                .all(|l| l.get("new_destination").is_none())
        );
        assert!(admin_text(a_admin, "/metrics").await.contains(new_metric));
    }
    for gw in [&a, &b] {
        assert_eq!(
            gw.count_logs(
                |l| l["message"] == "fleet: learned destinations taken from the fleet"
                    && l["removed"].as_u64().unwrap_or(0) > 0
            ),
            0,
            "an emptied Redis was read as destinations forgotten"
        );
    }
    // A replica that joins now gets the refilled sets.
    let state_c = tempfile::tempdir().unwrap();
    let c = Gateway::start(&replica(&state_c, port, "enforce", 3, &redis, "c")).await;
    assert_eq!(fetch(&pki, c.addr, LONDON, &account(1), port).await, 200);
    assert_eq!(fetch(&pki, c.addr, LONDON, &account(0), port).await, 200);
    assert_eq!(fetch(&pki, c.addr, LONDON, &account(2), port).await, 403);
    drop(a);
}
