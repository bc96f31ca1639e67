//! Learned destinations end to end, on the real binary: `record` flags a branch's first tunnel
//! to a name (log field, metric), the state file carries what was learned over a restart into
//! `enforce`, which refuses the rest; approve and forget work on a running gateway (through its
//! admin listener, in force at once) and on the file; a kill in the middle of a save never
//! leaves a file the gateway cannot start from.

use crate::support::*;
use std::time::{Duration, Instant};

/// The access lines for `host` from `branch`, in the log's order.
fn lines_for(gw: &Gateway, branch: &str, host: &str) -> Vec<serde_json::Value> {
    gw.logs()
        .into_iter()
        .filter(|l| {
            l["target"] == "portcullis::access" && l["branch"] == branch && l["host"] == host
        })
        .collect()
}

#[tokio::test]
async fn record_then_enforce_across_a_restart_with_approve_and_forget_live_and_on_file() {
    let pki = Pki::new();
    let origin = origin_for(&pki, 4).await;
    let port = origin.port();
    let state = tempfile::tempdir().unwrap();

    // Record: everything passes; each branch's first tunnel to a name is flagged.
    let mut gw = Gateway::start(learning_config(state.path(), port, "record", 4)).await;
    let admin = gw.admin_addr.unwrap();
    gw.metrics().await.assert_value(
        r#"portcullis_new_destinations_total{branch="london",rule="accounts"}"#,
        0.0,
    );
    for (from, host) in [(LONDON, 0), (LONDON, 0), (PARIS, 0), (LONDON, 1)] {
        assert_eq!(fetch(&pki, gw.addr, from, &account(host), port).await, 200);
    }
    gw.access_line(|l| l["host"] == account(1).as_str()).await;
    let london0 = lines_for(&gw, "london", &account(0));
    assert_eq!(london0.len(), 2, "{london0:#?}");
    assert_eq!(london0[0]["new_destination"], true);
    assert_eq!(london0[0]["rule"], "accounts");
    assert!(
        london0[1].get("new_destination").is_none(),
        "{:?}",
        london0[1]
    );
    assert_eq!(
        lines_for(&gw, "paris", &account(0))[0]["new_destination"],
        true
    );
    assert_eq!(
        lines_for(&gw, "london", &account(1))[0]["new_destination"],
        true
    );
    let metrics = gw.metrics().await;
    for (series, want) in [
        (
            r#"portcullis_new_destinations_total{branch="london",rule="accounts"}"#,
            2.0,
        ),
        (
            r#"portcullis_new_destinations_total{branch="paris",rule="accounts"}"#,
            1.0,
        ),
        (
            r#"portcullis_learned_destinations{branch="london",rule="accounts"}"#,
            2.0,
        ),
    ] {
        metrics.assert_value(series, want);
    }
    let admin_text = admin.to_string();
    let (ok, listing, err) = cli(&[
        "learned",
        "list",
        "--admin",
        &admin_text,
        "--branch",
        "london",
    ]);
    assert!(ok, "{err}");
    assert!(
        listing.contains(&format!("{}:{port}", account(0))),
        "{listing}"
    );
    assert!(
        listing.contains(&format!("{}:{port}", account(1))),
        "{listing}"
    );
    assert!(!listing.contains("paris"), "{listing}");
    stop(&mut gw).await;
    let file = std::fs::read_to_string(state.path().join("learned.json")).unwrap();
    assert_eq!(file.matches("\"host\"").count(), 3, "{file}");

    // Restart in enforce: only what each branch learned passes.
    let mut gw = Gateway::start(learning_config(state.path(), port, "enforce", 4)).await;
    let admin = gw.admin_addr.unwrap();
    let admin_text = admin.to_string();
    assert_eq!(fetch(&pki, gw.addr, LONDON, &account(1), port).await, 200);
    let target = format!("{}:{port}", account(2));
    let (_, reply) = connect_from(gw.addr, LONDON, &target, "").await;
    assert_eq!(reply.status, 403, "{reply:?}");
    let reason = "destination not learned for this branch";
    assert_eq!(reply.header("portcullis-error"), Some(reason));
    let line = gw.access_line(|l| l["host"] == account(2).as_str()).await;
    assert_eq!(
        (
            &line["end"],
            &line["verdict"],
            &line["rule"],
            &line["branch"]
        ),
        (
            &"not_learned".into(),
            &"deny".into(),
            &"accounts".into(),
            &"london".into()
        )
    );
    assert_eq!(fetch(&pki, gw.addr, PARIS, &account(1), port).await, 403);
    let config_path = gw.config_path();
    let config_text = config_path.to_str().unwrap();
    let (_, explained, _) = cli(&[
        "explain",
        "--config",
        config_text,
        "--from",
        LONDON,
        &target,
    ]);
    assert!(explained.contains("learned:  no: refused"), "{explained}");

    // Approve and forget on the running gateway: in force at once, saved at once.
    let (ok, said, err) = cli(&[
        "learned",
        "approve",
        "--admin",
        &admin_text,
        "--branch",
        "london",
        &target,
    ]);
    assert!(ok && said.contains("approved"), "{said}{err}");
    assert_eq!(fetch(&pki, gw.addr, LONDON, &account(2), port).await, 200);
    let (ok, said, err) = cli(&[
        "learned",
        "forget",
        "--admin",
        &admin_text,
        "--branch",
        "london",
        &account(0),
    ]);
    assert!(ok && said.contains("forgot 1 destination"), "{said}{err}");
    assert_eq!(fetch(&pki, gw.addr, LONDON, &account(0), port).await, 403);
    let saved = std::fs::read_to_string(state.path().join("learned.json")).unwrap();
    assert!(
        saved.contains(&account(2)) && saved.contains("\"approved\": true"),
        "{saved}"
    );
    // Bad requests get precise answers, and the gateway's lock keeps the CLI off its file.
    let (ok, _, err) = cli(&[
        "learned",
        "approve",
        "--admin",
        &admin_text,
        "--branch",
        "oslo",
        &target,
    ]);
    assert!(!ok && err.contains("no branch is named \"oslo\""), "{err}");
    let (ok, _, err) = cli(&[
        "learned",
        "approve",
        "--admin",
        &admin_text,
        "--branch",
        "london",
        "evil.example:443",
    ]);
    assert!(
        !ok && err.contains("no allow rule lets this branch reach"),
        "{err}"
    );
    stop(&mut gw).await;

    // On the file, with no gateway running: the next start goes by it.
    let (ok, listing, err) = cli(&["learned", "list", "--config", config_text]);
    assert!(ok, "{err}");
    let london: Vec<&str> = listing
        .lines()
        .filter(|l| l.starts_with("london"))
        .collect();
    assert_eq!(london.len(), 2, "{listing}");
    assert!(
        london
            .iter()
            .any(|l| l.contains(&account(2)) && l.ends_with("approved")),
        "{listing}"
    );
    let (ok, said, err) = cli(&[
        "learned",
        "approve",
        "--config",
        config_text,
        "--branch",
        "paris",
        &format!("{}:{port}", account(3)),
    ]);
    assert!(ok && said.contains("no gateway was running"), "{said}{err}");
    let (ok, _, err) = cli(&[
        "learned",
        "forget",
        "--config",
        config_text,
        "--branch",
        "london",
        &account(1),
    ]);
    assert!(ok, "{err}");
    let gw = Gateway::start(learning_config(state.path(), port, "enforce", 4)).await;
    assert_eq!(fetch(&pki, gw.addr, PARIS, &account(3), port).await, 200);
    assert_eq!(fetch(&pki, gw.addr, LONDON, &account(1), port).await, 403);
    assert_eq!(fetch(&pki, gw.addr, LONDON, &account(2), port).await, 200);
}

/// The state file as the gateway writes it, with `n` destinations of branch london.
fn big_state_file(n: u32, port: u16) -> String {
    let rows: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"branch": "london", "rule": "accounts", "host": "old{i}.file.core.windows.net", "port": {port}, "first_seen": "2026-11-30T08:00:00Z", "last_seen": "2026-11-30T09:00:00Z", "count": 3, "approved": false}}"#
            )
        })
        .collect();
    format!(
        "{{\"format\": \"portcullis-learned-1\", \"destinations\": [\n{}\n]}}\n",
        rows.join(",\n")
    )
}

#[tokio::test]
async fn a_kill_in_the_middle_of_a_save_leaves_a_whole_file() {
    const OLD: u32 = 40_000;
    let origin = TcpOrigin::start(b"ok").await;
    let port = origin.addr.port();
    let state = tempfile::tempdir().unwrap();
    let file = state.path().join("learned.json");
    let temporary = state.path().join("learned.json.tmp");
    std::fs::write(&file, big_state_file(OLD, port)).unwrap();
    let conf = learning_config(state.path(), port, "record", 200)
        .policy("learn_limit", 100000)
        .change_rule("accounts", |rule| rule.set("sni", "off"));
    let mut next = 0;
    let mut killed_mid_write = 0;
    for round in 0..3 {
        let mut gw = Gateway::start(&conf).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut caught = false;
        // New destinations, one after another (each makes a save within a second), until a
        // save is caught with its temporary file written but not yet renamed.
        while Instant::now() < deadline && !caught {
            let host = account(next % 200);
            next += 1;
            let target = format!("{host}:{port}");
            let (mut tunnel, reply) = connect_from(gw.addr, LONDON, &target, "").await;
            assert_eq!(reply.status, 200, "round {round}: {reply:?}");
            drop(send_and_finish(&mut tunnel, b"x").await);
            let watch_until = Instant::now() + Duration::from_millis(1500);
            while Instant::now() < watch_until {
                if temporary.exists() {
                    gw.signal("KILL");
                    caught = true;
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        assert!(gw.wait_exit(Duration::from_secs(10)).await.is_some() || !caught);
        if caught {
            killed_mid_write += 1;
        }
        drop(gw);
        // What is on disk is whole: the old destinations are all there.
        let text = std::fs::read_to_string(&file).unwrap();
        let parsed: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("round {round}: the state file is damaged: {e}"));
        let held = parsed["destinations"].as_array().unwrap().len();
        assert!(held >= OLD as usize, "round {round}: {held} destinations");
    }
    assert!(killed_mid_write >= 1, "no save was caught in the middle");
    // And the gateway starts from it (the leftover temporary file is ignored).
    let gw = Gateway::start(&conf).await;
    let (_, reply) = connect_from(gw.addr, LONDON, &format!("{}:{port}", account(0)), "").await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn replicas_share_what_they_learn_approve_and_forget_through_redis() {
    let redis = Redis::start(&[]);
    replicas_share_learned_destinations(|config| config.fleet("redis", redis.url())).await;
}

/// Two replicas, each `on` the same Redis: what one learns, approves or forgets reaches the
/// other, per branch, and each keeps the fleet's destinations in its own file.
pub async fn replicas_share_learned_destinations(on: impl Fn(GatewayConfig) -> GatewayConfig) {
    let pki = Pki::new();
    let origin = origin_for(&pki, 3).await;
    let port = origin.port();
    let replica = |config: GatewayConfig, name: &str| {
        on(config).fleet("name", name).fleet("refresh", "200ms")
    };
    let (state_a, state_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // A records, B enforces: what a branch learns through A passes through B.
    let a = Gateway::start(replica(
        learning_config(state_a.path(), port, "record", 3),
        "a",
    ))
    .await;
    let b = Gateway::start(replica(
        learning_config(state_b.path(), port, "enforce", 3),
        "b",
    ))
    .await;
    assert_eq!(fetch(&pki, b.addr, LONDON, &account(0), port).await, 403);
    assert_eq!(fetch(&pki, a.addr, LONDON, &account(0), port).await, 200);
    eventually(&pki, b.addr, LONDON, &account(0), port, 200).await;
    // Per branch there too.
    assert_eq!(fetch(&pki, b.addr, PARIS, &account(0), port).await, 403);
    // Approved on B: in force on B at once, and shared.
    let b_admin = b.admin_addr.unwrap().to_string();
    let target = format!("{}:{port}", account(1));
    let (ok, _, err) = cli(&[
        "learned", "approve", "--admin", &b_admin, "--branch", "paris", &target,
    ]);
    assert!(ok, "{err}");
    assert_eq!(fetch(&pki, b.addr, PARIS, &account(1), port).await, 200);
    let a_admin = a.admin_addr.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !admin_text(a_admin, "/learned?branch=paris")
        .await
        .contains(&account(1))
    {
        assert!(
            Instant::now() < deadline,
            "paris's approval never reached replica a"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Forgotten on A: B refuses it again.
    let (ok, _, err) = cli(&[
        "learned",
        "forget",
        "--admin",
        &a_admin.to_string(),
        "--branch",
        "london",
        &account(0),
    ]);
    assert!(ok, "{err}");
    eventually(&pki, b.addr, LONDON, &account(0), port, 403).await;
    // Each replica keeps its own file of what the fleet learned.
    let (mut a, mut b) = (a, b);
    stop(&mut b).await;
    stop(&mut a).await;
    assert_eq!(state_file_hosts(state_b.path()), [account(1)]);
    assert_eq!(state_file_hosts(state_a.path()), [account(1)]);
}

#[tokio::test]
async fn a_reload_switches_learning_on_and_keeps_what_was_learned() {
    let pki = Pki::new();
    let origin = Origin::start_named(&pki, &[&account(0), &account(1)]).await;
    let port = origin.port();
    let state = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(learning_config(state.path(), port, "off", 2)).await;
    // Off: nothing is kept, nothing is flagged, no file is made.
    assert_eq!(fetch(&pki, gw.addr, LONDON, &account(0), port).await, 200);
    let line = gw.access_line(|l| l["host"] == account(0).as_str()).await;
    assert!(line.get("new_destination").is_none(), "{line}");
    assert!(!state.path().join("learned.lock").exists());
    std::fs::write(
        gw.config_path(),
        learning_config(state.path(), port, "record", 2).to_string(),
    )
    .unwrap();
    gw.reload("reload applied").await;
    assert_eq!(fetch(&pki, gw.addr, LONDON, &account(1), port).await, 200);
    let line = gw.access_line(|l| l["host"] == account(1).as_str()).await;
    assert_eq!(line["new_destination"], true);
    // Saved within a second of being learned, and kept by the next reload (to enforce).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !state_file_hosts(state.path()).contains(&account(1)) {
        assert!(Instant::now() < deadline, "never saved");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::write(
        gw.config_path(),
        learning_config(state.path(), port, "enforce", 2).to_string(),
    )
    .unwrap();
    gw.reload("reload applied").await;
    assert_eq!(fetch(&pki, gw.addr, LONDON, &account(1), port).await, 200);
    assert_eq!(fetch(&pki, gw.addr, LONDON, &account(0), port).await, 403);
}
