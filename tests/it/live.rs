//! The live tunnels as operators see and steer them through the admin listener: the listing
//! with exact byte counts and rates, close by id or filter (and a dry run), drain, quarantine
//! and release of a branch, revocation on reload, and admin tokens with their audit lines.

use crate::support::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Two branches by source address (london 127.0.0.2, paris 127.0.0.3) and an echo origin.
async fn two_branches() -> (GatewayConfig, SocketAddr) {
    let origin = echo_origin().await;
    let config = GatewayConfig::for_origin(origin.port())
        .branch(Branch::new("london").sources(&["127.0.0.2/32"]))
        .branch(Branch::new("paris").sources(&["127.0.0.3/32"]));
    (config, origin)
}

fn target(origin: SocketAddr) -> String {
    format!("{ORIGIN_HOST}:{}", origin.port())
}

/// Opens a tunnel from `from` and checks it echoes.
async fn echoing(gw: SocketAddr, from: &str, origin: SocketAddr) -> TcpStream {
    let (mut tunnel, reply) = connect_from(gw, from, &target(origin), "").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_echoes(&mut tunnel, b"hello").await;
    tunnel
}

async fn assert_echoes(tunnel: &mut TcpStream, bytes: &[u8]) {
    tunnel.write_all(bytes).await.unwrap();
    let mut back = vec![0u8; bytes.len()];
    tokio::time::timeout(Duration::from_secs(5), tunnel.read_exact(&mut back))
        .await
        .expect("the echo within 5 s")
        .unwrap();
    assert_eq!(back, bytes);
}

/// Waits (up to `within`) for the gateway to close `tunnel`; returns how long it took.
async fn closed_within(tunnel: &mut TcpStream, within: Duration) -> Duration {
    let started = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(within, tunnel.read_to_end(&mut rest))
        .await
        .expect("the gateway closes the tunnel")
        .ok();
    started.elapsed()
}

async fn json(admin: SocketAddr, method: &str, path: &str, token: Option<&str>) -> Value {
    let reply = admin_request(admin, method, path, token).await;
    assert_eq!(reply.status, 200, "{method} {path}: {reply:?}");
    serde_json::from_str(&reply.body).unwrap()
}

#[tokio::test]
async fn the_listing_shows_exact_bytes_sorts_by_rate_and_a_close_by_id_ends_both_sides_at_once() {
    let (config, origin) = two_branches().await;
    // Idle checks every second: small byte counts reach the listing within one.
    let mut gw = Gateway::start(config.timeout("idle", "4s")).await;
    let admin = gw.admin_addr.unwrap();
    let mut quiet = echoing(gw.addr, "127.0.0.2", origin).await;
    assert_echoes(&mut quiet, &[7u8; 995]).await;
    let mut busy = echoing(gw.addr, "127.0.0.3", origin).await;
    // The busy tunnel moves 8 MiB while the listing is taken.
    let pump = tokio::spawn(async move {
        for _ in 0..8 {
            assert_echoes(&mut busy, &vec![1u8; 1 << 20]).await;
        }
        busy
    });
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let listed = json(admin, "GET", "/tunnels?sort=rate", None).await;
    let busy = pump.await.unwrap();
    assert_eq!(listed["open"], 2);
    let rows = listed["tunnels"].as_array().unwrap();
    assert_eq!(
        rows[0]["branch"], "paris",
        "the busy tunnel first: {listed}"
    );
    let london = &rows[1];
    assert_eq!(london["branch"], "london");
    assert_eq!(london["bytes_up"], 1000, "{london}");
    assert_eq!(london["bytes_down"], 1000, "{london}");
    assert_eq!(london["identified_by"], "network");
    assert_eq!(london["rule"], "test-origin");
    assert_eq!(london["target"], target(origin));
    assert_eq!(london["state"], "open");
    assert!(london["client"].as_str().unwrap().starts_with("127.0.0.2:"));

    // A dry run closes nothing.
    let id = london["id"].as_u64().unwrap();
    let dry = json(
        admin,
        "POST",
        "/tunnels/close?branch=london&dry_run=true",
        None,
    )
    .await;
    assert_eq!(dry["closed"], 1);
    assert_eq!(dry["would_close"][0]["id"], id);
    assert_echoes(&mut quiet, b"still here").await;

    // A close by id ends the tunnel at once, with its access line.
    let closed = json(admin, "POST", &format!("/tunnels/close?id={id}"), None).await;
    assert_eq!(closed["ids"], serde_json::json!([id]));
    let took = closed_within(&mut quiet, Duration::from_secs(2)).await;
    assert!(took < Duration::from_millis(100), "closed after {took:?}");
    let line = gw.access_line(|l| l["conn_id"] == id).await;
    assert_eq!(line["end"], "closed_by_operator");
    assert_eq!(line["bytes_up"], 1010);
    let audit = gw
        .wait_log(|l| {
            l["target"] == "portcullis::audit" && l["action"] == "close" && l["dry_run"].is_null()
        })
        .await;
    assert_eq!(audit["who"], "anonymous");
    assert_eq!(audit["tunnels"], 1);
    assert_eq!(audit["filter"], format!("id={id}"));
    // The other branch's tunnel runs on.
    let mut busy = busy;
    assert_echoes(&mut busy, b"paris").await;
    let after = json(admin, "GET", "/tunnels", None).await;
    assert_eq!(after["open"], 1);
    // Bad filters get a clear 400.
    for bad in [
        "/tunnels?sort=size",
        "/tunnels?colour=red",
        "/tunnels?min_age=soon",
    ] {
        let reply = admin_request(admin, "GET", bad, None).await;
        assert_eq!(reply.status, 400, "{bad}: {reply:?}");
    }
    let everything = admin_request(admin, "POST", "/tunnels/close", None).await;
    assert_eq!(everything.status, 400, "a close must name what it closes");
}

#[tokio::test]
async fn drain_refuses_new_requests_while_old_tunnels_run_to_the_deadline_and_quarantine_closes_now()
 {
    let (config, origin) = two_branches().await;
    let mut gw = Gateway::start(config).await;
    let admin = gw.admin_addr.unwrap();
    let mut old = echoing(gw.addr, "127.0.0.2", origin).await;
    let mut other = echoing(gw.addr, "127.0.0.3", origin).await;
    let drained = json(admin, "POST", "/branches/london/drain?deadline=2s", None).await;
    assert_eq!(drained["hold"], "draining");
    let started = Instant::now();
    let (_refused, reply) = connect_from(gw.addr, "127.0.0.2", &target(origin), "").await;
    assert_eq!(reply.status, 503, "{reply:?}");
    let retry: u64 = reply
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "Retry-After: {retry}");
    let refused = gw
        .access_line(|l| l["branch"] == "london" && l["status"] == 503)
        .await;
    assert_eq!(refused["end"], "branch_drained");
    // The old tunnel echoes until the deadline, then closes with its access line.
    assert_echoes(&mut old, b"before the deadline").await;
    let branches = json(admin, "GET", "/branches", None).await;
    let london = branches["branches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["branch"] == "london")
        .unwrap()
        .clone();
    assert_eq!(london["hold"], "draining");
    assert_eq!(london["tunnels"], 1);
    closed_within(&mut old, Duration::from_secs(5)).await;
    assert!(
        started.elapsed() >= Duration::from_millis(1800),
        "closed before the deadline"
    );
    let line = gw
        .access_line(|l| l["branch"] == "london" && l["status"] == 200)
        .await;
    assert_eq!(line["end"], "branch_drained");

    // Quarantine closes the branch's tunnels now and refuses new ones; release admits again.
    let quarantined = json(admin, "POST", "/branches/paris/quarantine", None).await;
    assert_eq!(quarantined["closed"], 1);
    let took = closed_within(&mut other, Duration::from_secs(2)).await;
    assert!(took < Duration::from_millis(100), "closed after {took:?}");
    let line = gw
        .access_line(|l| l["branch"] == "paris" && l["status"] == 200)
        .await;
    assert_eq!(line["end"], "branch_quarantined");
    let (_refused, reply) = connect_from(gw.addr, "127.0.0.3", &target(origin), "").await;
    assert_eq!(reply.status, 403);
    json(admin, "POST", "/branches/paris/release", None).await;
    echoing(gw.addr, "127.0.0.3", origin).await;
    let unknown = admin_request(admin, "POST", "/branches/rome/quarantine", None).await;
    assert_eq!(unknown.status, 404);
    let never_held = admin_request(admin, "POST", "/branches/paris/release", None).await;
    assert_eq!(never_held.status, 404);
}

#[tokio::test]
async fn a_reload_that_revokes_a_credential_closes_that_branchs_tunnels_and_no_others() {
    let origin = echo_origin().await;
    let hash = portcullis::config::password::hash_password("s3cret").unwrap();
    let base = GatewayConfig::for_origin(origin.port())
        .branch(Branch::new("paris").sources(&["127.0.0.3/32"]));
    let with_london = base
        .clone()
        .branch(Branch::new("london").credentials("london-fs1", &hash));
    let mut gw = Gateway::start(with_london.clone()).await;
    let (mut london, reply) = connect_from(
        gw.addr,
        "127.0.0.2",
        &target(origin),
        &basic("london-fs1", "s3cret"),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_echoes(&mut london, b"hi").await;
    let mut paris = echoing(gw.addr, "127.0.0.3", origin).await;

    // A reload that changes nothing about identity closes nothing.
    std::fs::write(
        gw.config_path(),
        with_london.clone().timeout("head", "9s").to_string(),
    )
    .unwrap();
    gw.reload("reload applied").await;
    assert_echoes(&mut london, b"still").await;
    assert_echoes(&mut paris, b"still").await;

    // Without london's credential: its tunnel closes, paris's runs on.
    std::fs::write(gw.config_path(), base.to_string()).unwrap();
    gw.reload("reload applied").await;
    closed_within(&mut london, Duration::from_secs(2)).await;
    let line = gw
        .access_line(|l| l["user"] == "london-fs1" && l["status"] == 200)
        .await;
    assert_eq!(line["end"], "identity_revoked");
    assert_echoes(&mut paris, b"untouched").await;
}

/// A CONNECT still dialling when a reload revokes its credential joins the registry after the
/// reload's sweep: it is checked as it joins, and closed.
#[tokio::test]
async fn a_tunnel_dialling_through_a_reload_that_revokes_its_credential_is_closed_as_it_opens() {
    let origin = echo_origin().await;
    let port = origin.port();
    // The name's first address drops SYNs: the dial waits one attempt delay for the second.
    let _dead = crate::dial::BlackHole::at(SocketAddr::from(([127, 0, 0, 2], port))).await;
    let hash = portcullis::config::password::hash_password("s3cret").unwrap();
    let base = GatewayConfig::for_origin(port)
        .resolve(ORIGIN_HOST, ["127.0.0.2", "127.0.0.1"])
        .origin_rule(|r| r.private_addresses(&["127.0.0.0/8"]))
        .timeout("attempt_delay", "1500ms");
    let with_london = base
        .clone()
        .branch(Branch::new("london").credentials("london-fs1", &hash));
    let mut gw = Gateway::start(with_london).await;
    let (gateway, to) = (gw.addr, target(origin));
    let dialling = tokio::spawn(async move {
        connect_from(gateway, "127.0.0.3", &to, &basic("london-fs1", "s3cret")).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(gw.config_path(), base.to_string()).unwrap();
    gw.reload("reload applied").await;
    let (mut tunnel, reply) = dialling.await.unwrap();
    assert_eq!(reply.status, 200, "admitted before the reload: {reply:?}");
    closed_within(&mut tunnel, Duration::from_secs(2)).await;
    let line = gw
        .access_line(|l| l["user"] == "london-fs1" && l["status"] == 200)
        .await;
    assert_eq!(line["end"], "identity_revoked");
    assert!(
        line["connect_ms"].as_u64().unwrap() >= 1000,
        "the dial outlasted the reload: {line}"
    );
}

#[tokio::test]
async fn tokens_decide_who_reads_and_who_steers_and_the_audit_line_names_the_token() {
    let (config, origin) = two_branches().await;
    let reader = "read-token-4f1c2a";
    let operator = "control-token-9b7e3d";
    let read_hash = portcullis::config::password::hash_password(reader).unwrap();
    let control_hash = portcullis::config::password::hash_password(operator).unwrap();
    let config = config.extra(&format!(
        "[[admin.token]]\nname = \"noc\"\nrole = \"read\"\ntoken_hash = \"{read_hash}\"\n\n[[admin.token]]\nname = \"ops\"\nrole = \"control\"\ntoken_hash = \"{control_hash}\"\n"
    ));
    let mut gw = Gateway::start(config).await;
    let admin = gw.admin_addr.unwrap();
    let mut tunnel = echoing(gw.addr, "127.0.0.2", origin).await;
    let anonymous = admin_request(admin, "GET", "/tunnels", None).await;
    assert_eq!(anonymous.status, 401);
    assert!(anonymous.header("www-authenticate").is_some());
    let wrong = admin_request(admin, "GET", "/tunnels", Some("guess")).await;
    assert_eq!(wrong.status, 401);
    // A guesser on another address runs out of checks (429), and only its own: the reader's
    // first check, from here, is not refused.
    let mut limited = None;
    for guess in 0..20 {
        let mut tcp = connect_bound(admin, "127.0.0.2").await;
        let request = format!(
            "GET /tunnels HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer guess-{guess}\r\nConnection: close\r\n\r\n"
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let reply = read_reply_to_close(&mut tcp).await;
        if reply.status == 429 {
            limited = Some(reply);
            break;
        }
        assert_eq!(reply.status, 401, "{reply:?}");
    }
    let limited = limited.expect("a guesser is limited");
    assert_eq!(limited.header("retry-after"), Some("1"));
    let listed = json(admin, "GET", "/tunnels", Some(reader)).await;
    assert_eq!(listed["open"], 1);
    // Metrics and health stay open for scrapers and load balancers.
    assert_eq!(admin_get(admin, "/metrics").await.status, 200);
    let refused = admin_request(admin, "POST", "/tunnels/close?branch=london", Some(reader)).await;
    assert_eq!(refused.status, 403);
    assert_echoes(&mut tunnel, b"not closed").await;
    let no_token = admin_request(admin, "POST", "/tunnels/close?branch=london", None).await;
    assert_eq!(
        no_token.status, 401,
        "loopback alone is not enough once tokens exist"
    );
    let closed = json(
        admin,
        "POST",
        "/tunnels/close?branch=london",
        Some(operator),
    )
    .await;
    assert_eq!(closed["closed"], 1);
    closed_within(&mut tunnel, Duration::from_secs(2)).await;
    let audit = gw
        .wait_log(|l| l["target"] == "portcullis::audit" && l["action"] == "close")
        .await;
    assert_eq!(audit["who"], "token:ops");
    assert_eq!(audit["filter"], "branch=london");
    assert_eq!(audit["tunnels"], 1);
    // The command line sends the token it is given, and says why without one.
    let admin_text = admin.to_string();
    let (ok, listed, _) = run_cli(
        &["tunnels", "--admin", &admin_text],
        &[("PORTCULLIS_ADMIN_TOKEN", reader)],
    );
    assert!(ok && listed.contains("0 listed of 0 open"), "{listed}");
    let (ok, _, err) = run_cli(&["tunnels", "--admin", &admin_text], &[]);
    assert!(!ok && err.contains("401"), "{err}");
    let secrets = gw.count_logs(|l| {
        let text = l.to_string();
        text.contains(reader) || text.contains(operator)
    });
    assert_eq!(secrets, 0, "a token in the logs");
}

/// `portcullis ARGS` with `env`, to completion: (success, stdout, stderr).
fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A tmux server of this test's own (its socket name), killed when dropped.
struct Tmux(String);

impl Tmux {
    fn command(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new("tmux")
            .args(["-L", &self.0])
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.command(&["kill-server"]);
    }
}

#[tokio::test]
async fn the_command_line_lists_closes_and_holds_and_top_draws_in_an_80x24_terminal() {
    if std::process::Command::new("tmux")
        .arg("-V")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "tmux is missing (Debian's tmux)"
        );
        eprintln!("skipped: no tmux");
        return;
    }
    let (config, origin) = two_branches().await;
    let gw = Gateway::start(config).await;
    let admin = gw.admin_addr.unwrap().to_string();
    let mut london = echoing(gw.addr, "127.0.0.2", origin).await;
    let mut paris = echoing(gw.addr, "127.0.0.3", origin).await;
    let (ok, listed, _) = run_cli(&["tunnels", "--admin", &admin], &[]);
    assert!(ok);
    assert!(listed.starts_with("ID"), "{listed}");
    assert!(
        listed.contains("london") && listed.contains(&target(origin)),
        "{listed}"
    );
    assert!(listed.contains("2 listed of 2 open"), "{listed}");
    // Piped, `top` prints one plain table of branches and tunnels.
    let (ok, plain, err) = run_cli(&["top", "--admin", &admin], &[]);
    assert!(ok, "{err}");
    assert!(plain.starts_with("BRANCH"), "{plain}");
    assert!(
        plain.contains("paris") && plain.contains("TARGET"),
        "{plain}"
    );

    // In a real 80x24 terminal: the branches and the busiest tunnel, refreshed; `q` quits.
    let tmux = Tmux(format!("portcullis-top-{}", std::process::id()));
    let command = format!("{} top --admin {admin}", env!("CARGO_BIN_EXE_portcullis"));
    let started = tmux.command(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "80",
        "-y",
        "24",
        &command,
    ]);
    assert!(started.status.success(), "{started:?}");
    let pump = tokio::spawn(async move {
        for _ in 0..40 {
            assert_echoes(&mut paris, &vec![2u8; 256 * 1024]).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        paris
    });
    let mut screen = String::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let captured = tmux.command(&["capture-pane", "-p", "-t", "top"]);
        screen = String::from_utf8_lossy(&captured.stdout).into_owned();
        let busiest_first = screen
            .lines()
            .skip_while(|l| !l.contains("busiest tunnels"))
            .nth(2)
            .is_some_and(|first| first.contains("paris") && first.contains("bit/s"));
        if screen.contains("london") && busiest_first {
            break;
        }
    }
    assert!(screen.contains("portcullis top"), "{screen}");
    assert!(
        screen.contains("london") && screen.contains("paris"),
        "{screen}"
    );
    assert!(screen.lines().count() <= 24 && screen.lines().all(|l| l.chars().count() <= 80));
    let busiest = screen
        .lines()
        .skip_while(|l| !l.contains("busiest tunnels"))
        .nth(2)
        .unwrap_or_default()
        .to_owned();
    assert!(
        busiest.contains("paris"),
        "the busy tunnel first:\n{screen}"
    );
    tmux.command(&["send-keys", "-t", "top", "q"]);
    let mut quit = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !tmux.command(&["has-session", "-t", "top"]).status.success() {
            quit = true;
            break;
        }
    }
    assert!(quit, "top did not quit on q");
    let mut paris = pump.await.unwrap();

    // Holds and closes from the command line.
    let (ok, out, err) = run_cli(&["branch", "quarantine", "london", "--admin", &admin], &[]);
    assert!(ok, "{err}");
    assert!(
        out.contains("london: quarantined (1 tunnels closed now)"),
        "{out}"
    );
    closed_within(&mut london, Duration::from_secs(2)).await;
    let (ok, out, _) = run_cli(&["branch", "list", "--admin", &admin], &[]);
    assert!(ok && out.contains("quarantined"), "{out}");
    let (ok, _, _) = run_cli(&["branch", "release", "london", "--admin", &admin], &[]);
    assert!(ok);
    let (ok, out, _) = run_cli(
        &["close", "--branch", "paris", "--dry-run", "--admin", &admin],
        &[],
    );
    assert!(ok && out.contains("would close 1"), "{out}");
    assert_echoes(&mut paris, b"dry run").await;
    let (ok, out, _) = run_cli(&["close", "--branch", "paris", "--admin", &admin], &[]);
    assert!(ok && out.contains("closed 1"), "{out}");
    closed_within(&mut paris, Duration::from_secs(2)).await;
    let (ok, _, err) = run_cli(&["branch", "drain", "rome", "--admin", &admin], &[]);
    assert!(!ok && err.contains("no branch named"), "{err}");
}

/// A replica of `config` in the fleet on `redis`, started once it reached Redis.
async fn replica(config: &GatewayConfig, redis: &Redis, name: &str) -> Gateway {
    crate::fleet::start_replica(&crate::fleet::replica(config, &redis.url(), name)).await
}

#[tokio::test]
async fn fleet_actions_reach_every_replica_and_holds_apply_to_replicas_that_start_later() {
    let mut redis = Redis::start(&[]);
    let (config, origin) = two_branches().await;
    let a = replica(&config, &redis, "gw-a").await;
    let mut b = replica(&config, &redis, "gw-b").await;
    let admin_a = a.admin_addr.unwrap();
    let mut on_b = echoing(b.addr, "127.0.0.2", origin).await;
    let mut paris_on_b = echoing(b.addr, "127.0.0.3", origin).await;

    // Every replica's figures, from A.
    let mut seen = Value::Null;
    for _ in 0..40 {
        seen = json(admin_a, "GET", "/branches?fleet=true", None).await;
        if seen["fleet"]["branches"]
            .as_array()
            .is_some_and(|b| b.len() == 2)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fleet = &seen["fleet"]["branches"];
    assert!(
        fleet
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["branch"] == "london" && b["tunnels"] == 1),
        "{seen}"
    );
    assert_eq!(
        seen["branches"].as_array().unwrap().len(),
        0,
        "A itself holds no tunnel: {seen}"
    );

    // A close by filter sent on A ends the tunnel on B.
    let closed = json(
        admin_a,
        "POST",
        "/tunnels/close?branch=london&fleet=true",
        None,
    )
    .await;
    assert_eq!(closed["fleet"], "sent to every replica");
    closed_within(&mut on_b, Duration::from_secs(3)).await;
    let line = b
        .access_line(|l| l["branch"] == "london" && l["status"] == 200)
        .await;
    assert_eq!(line["end"], "closed_by_operator");
    let audit = b
        .wait_log(|l| l["target"] == "portcullis::audit" && l["who"] == "fleet")
        .await;
    assert_eq!(audit["tunnels"], 1);
    assert_echoes(&mut paris_on_b, b"paris runs on").await;

    // A drain set on A before C starts applies to C.
    json(
        admin_a,
        "POST",
        "/branches/london/drain?deadline=1h&fleet=true",
        None,
    )
    .await;
    let c = replica(&config, &redis, "gw-c").await;
    let (_refused, reply) = connect_from(c.addr, "127.0.0.2", &target(origin), "").await;
    assert_eq!(reply.status, 503, "{reply:?}");
    assert!(reply.header("retry-after").is_some());
    json(admin_a, "POST", "/branches/london/release?fleet=true", None).await;
    let mut released = false;
    for _ in 0..40 {
        let (_tunnel, reply) = connect_from(c.addr, "127.0.0.2", &target(origin), "").await;
        if reply.status == 200 {
            released = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(released, "C took the release");

    // Redis gone: a local close works; a fleet close says why it could not reach the others.
    redis.stop();
    let mut local = echoing(b.addr, "127.0.0.3", origin).await;
    let admin_b = b.admin_addr.unwrap();
    let reply = admin_request(
        admin_b,
        "POST",
        "/tunnels/close?branch=paris&fleet=true",
        None,
    )
    .await;
    assert_eq!(reply.status, 503, "{reply:?}");
    assert!(reply.body.contains("not sent"), "{}", reply.body);
    closed_within(&mut local, Duration::from_secs(2)).await;
    closed_within(&mut paris_on_b, Duration::from_secs(2)).await;
    let local_only = admin_request(admin_b, "POST", "/tunnels/close?branch=paris", None).await;
    assert_eq!(local_only.status, 200, "{local_only:?}");
}
