//! Binary upgrade (SIGUSR2, `POST /upgrade`): the listeners go to a new process of the same
//! binary, no client is refused, open tunnels finish on the old process, which then exits.

use crate::fleet::{replica, start_replica, upload_all_day};
use crate::support::*;
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// The process an upgrade started (the test's, through the gateway): killed when dropped.
struct NewProcess(u32);

impl Drop for NewProcess {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-s", "KILL", &self.0.to_string()])
            .status();
    }
}

/// Waits for the old process's word that the new one listens; the new process's id.
async fn handed_over(gw: &mut Gateway) -> NewProcess {
    let line = gw
        .wait_log(|l| {
            l["message"] == "upgrade: the new process listens; this one stops accepting and drains"
        })
        .await;
    NewProcess(line["pid"].as_u64().expect("the new process's id") as u32)
}

fn draining(l: &Value) -> bool {
    l["message"] == "stopped accepting; draining" && l["upgraded"] == true
}

/// One CONNECT through the gateway with a byte each way: whether it worked.
async fn one_tunnel(gateway: std::net::SocketAddr, target: &str) -> Result<(), String> {
    let mut tcp = tokio::net::TcpStream::connect(gateway)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    tcp.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let head = read_head_bytes(&mut tcp)
        .await
        .map_err(|e| format!("no reply head: {e:?}"))?;
    if status_of(&head) != 200 {
        return Err(format!("status {}", status_of(&head)));
    }
    tcp.write_all(b"x")
        .await
        .map_err(|e| format!("send: {e}"))?;
    tcp.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    let mut reply = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut reply)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if reply != b"ok" {
        return Err(format!("reply {reply:?}"));
    }
    Ok(())
}

#[tokio::test]
async fn sigusr2_hands_over_without_refusing_a_client_and_the_old_process_finishes_its_tunnel() {
    let mut origin = TcpOrigin::start(b"ok").await;
    let port = origin.addr.port();
    let target = format!("{ORIGIN_HOST}:{port}");
    let mut gw = Gateway::start(GatewayConfig::for_origin(port)).await;
    let (mut before, status) = open_tunnel(gw.addr, &target, b"").await;
    assert_eq!(status, 200);

    // A client opening a tunnel every 10 ms through the whole upgrade.
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(Mutex::<Vec<String>>::default()),
    );
    let client = {
        let (stop, served, failed, target, addr) = (
            stop.clone(),
            served.clone(),
            failed.clone(),
            target.clone(),
            gw.addr,
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            for _ in 0..3000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                tick.tick().await;
                let (served, failed, target) = (served.clone(), failed.clone(), target.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(10), one_tunnel(addr, &target))
                        .await
                    {
                        Ok(Ok(())) => served.fetch_add(1, Ordering::Relaxed),
                        Ok(Err(e)) => {
                            failed.lock().unwrap().push(e);
                            0
                        }
                        Err(_) => {
                            failed.lock().unwrap().push("timed out".into());
                            0
                        }
                    };
                });
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.signal("USR2");
    let new = handed_over(&mut gw).await;
    gw.wait_log(draining).await;
    // The new process serves (the old one accepts no more) while the old tunnel is open.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        gw.wait_exit(Duration::from_millis(100)).await.is_none(),
        "the old process waits for its open tunnel"
    );
    stop.store(true, Ordering::Relaxed);
    client.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The tunnel opened before still works, on the old process, and its end lets it exit.
    let reply = send_and_finish(&mut before, b"after the upgrade").await;
    assert_eq!(reply, b"ok");
    let mut got = Vec::new();
    while let Ok(Some(data)) =
        tokio::time::timeout(Duration::from_secs(1), origin.received.recv()).await
    {
        got.push(data);
    }
    assert!(got.iter().any(|d| d == b"after the upgrade"));
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("the old process exits once its last tunnel ended");
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        gw.count_logs(|l| l["message"] == "drained: every connection finished"),
        1
    );
    let failed = failed.lock().unwrap().clone();
    assert!(failed.is_empty(), "failed connections: {failed:?}");
    assert!(served.load(Ordering::Relaxed) > 50, "the client loop ran");
    // The new process serves on alone.
    one_tunnel(gw.addr, &target)
        .await
        .expect("the new process serves");
    drop(new);
}

use std::sync::Mutex;

async fn post(admin: std::net::SocketAddr, path: &str) -> Reply {
    raw_request(
        admin,
        format!(
            "POST {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
}

#[tokio::test]
async fn post_upgrade_then_upgrade_drain_cuts_what_is_left_with_an_access_line_each() {
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let target = format!("{ORIGIN_HOST}:{port}");
    let mut gw =
        Gateway::start(GatewayConfig::for_origin(port).timeout("upgrade_drain", "1s")).await;
    let mut tunnels = Vec::new();
    for _ in 0..2 {
        let (mut tunnel, status) = open_tunnel(gw.addr, &target, b"").await;
        assert_eq!(status, 200);
        tunnel.write_all(b"half a batch").await.unwrap();
        tunnels.push(tunnel);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let reply = post(gw.admin_addr.unwrap(), "/upgrade").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let _new = handed_over(&mut gw).await;
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits at upgrade_drain");
    assert_eq!(status.code(), Some(0));
    gw.wait_log(|l| l["message"] == "drain timeout reached; closing the rest")
        .await;
    let cut = gw.count_logs(|l| {
        l["target"] == "portcullis::access" && l["port"] == port && l["end"] == "drain_timeout"
    });
    assert_eq!(cut, 2, "an access line per cut tunnel");
}

#[tokio::test]
async fn a_config_that_is_bad_at_upgrade_time_leaves_the_old_process_serving() {
    let origin = TcpOrigin::start(b"ok").await;
    let port = origin.addr.port();
    let target = format!("{ORIGIN_HOST}:{port}");
    let mut gw = Gateway::start(GatewayConfig::for_origin(port)).await;
    std::fs::write(gw.config_path(), "[listen]\nproxy = 5\n").unwrap();
    gw.signal("USR2");
    let line = gw
        .wait_log(|l| l["message"] == "upgrade failed; this process serves on")
        .await;
    assert!(
        line["error"]
            .as_str()
            .is_some_and(|e| e.contains("exited before it listened")),
        "{line}"
    );
    assert!(gw.wait_exit(Duration::from_millis(300)).await.is_none());
    one_tunnel(gw.addr, &target)
        .await
        .expect("the old process serves on");
    let reply = post(gw.admin_addr.unwrap(), "/upgrade").await;
    assert_eq!(reply.status, 500);
    // The command says so too, and fails.
    let out = upgrade_command(gw.admin_addr.unwrap(), &[]).await;
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("500: upgrade failed; the running process serves on"),
        "{said}"
    );
}

/// `portcullis upgrade --admin ADMIN` (with `env`), run to completion.
async fn upgrade_command(
    admin: std::net::SocketAddr,
    env: &[(&str, &str)],
) -> std::process::Output {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["upgrade", "--admin", &admin.to_string()])
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("the command answers within its wait")
        .unwrap()
}

/// Tunnels the access lines count as `closed` in the metrics the admin listener serves.
async fn closed_tunnels(admin: std::net::SocketAddr) -> f64 {
    Metrics::fetch(admin)
        .await
        .sum("portcullis_requests_total{end=\"closed\"}")
}

#[tokio::test]
async fn the_upgrade_command_with_a_control_token_hands_over_and_counters_start_again() {
    let origin = TcpOrigin::start(b"ok").await;
    let port = origin.addr.port();
    let target = format!("{ORIGIN_HOST}:{port}");
    let token = "upgrade-token-51c9";
    let hash = portcullis::config::password::hash_password(token).unwrap();
    let config = GatewayConfig::for_origin(port).extra(&format!(
        "[[admin.token]]\nname = \"deploy\"\nrole = \"control\"\ntoken_hash = \"{hash}\"\n"
    ));
    let mut gw = Gateway::start(config).await;
    let admin = gw.admin_addr.unwrap();
    one_tunnel(gw.addr, &target).await.unwrap();
    let _ = gw.access_line(|l| l["end"] == "closed").await;
    assert_eq!(closed_tunnels(admin).await, 1.0);
    // With tokens configured, loopback alone may not upgrade.
    let refused = upgrade_command(admin, &[]).await;
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"));
    let out = upgrade_command(admin, &[("PORTCULLIS_ADMIN_TOKEN", token)]).await;
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let why = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{said}{why}");
    let new = handed_over(&mut gw).await;
    assert_eq!(
        said,
        format!("upgraded: process {} serves; this one drains\n", new.0)
    );
    let audit = gw
        .wait_log(|l| l["target"] == "portcullis::audit" && l["action"] == "upgrade")
        .await;
    assert_eq!(audit["who"], "token:deploy");
    gw.wait_exit(Duration::from_secs(10))
        .await
        .expect("the old process, with nothing open, exits");
    one_tunnel(gw.addr, &target)
        .await
        .expect("the new process serves");
    // The new process's counters started again: only its own tunnel.
    let mut counted = 0.0;
    for _ in 0..20 {
        counted = closed_tunnels(admin).await;
        if counted >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(counted, 1.0, "the new process counts from zero");
}

#[tokio::test]
async fn holds_in_force_move_to_the_new_process() {
    let origin = TcpOrigin::start(b"ok").await;
    let port = origin.addr.port();
    let target = format!("{ORIGIN_HOST}:{port}");
    let config = GatewayConfig::for_origin(port)
        .branch(Branch::new("london").sources(&["127.0.0.2/32"]))
        .branch(Branch::new("paris").sources(&["127.0.0.3/32"]))
        .branch(Branch::new("rome").sources(&["127.0.0.4/32"]));
    let mut gw = Gateway::start(config).await;
    let admin = gw.admin_addr.unwrap();
    for (path, status) in [
        ("/branches/london/quarantine", 200),
        ("/branches/paris/drain?deadline=1h", 200),
    ] {
        let reply = admin_request(admin, "POST", path, None).await;
        assert_eq!(reply.status, status, "{path}: {reply:?}");
    }
    gw.signal("USR2");
    let _new = handed_over(&mut gw).await;
    gw.wait_exit(Duration::from_secs(10))
        .await
        .expect("the old process, with nothing open, exits");
    // Only the new process serves now: the quarantine and the drain hold there.
    let (_, quarantined) = connect_from(gw.addr, "127.0.0.2", &target, "").await;
    assert_eq!(quarantined.status, 403, "{quarantined:?}");
    let (_, drained) = connect_from(gw.addr, "127.0.0.3", &target, "").await;
    assert_eq!(drained.status, 503, "{drained:?}");
    let retry: u64 = drained.header("retry-after").unwrap().parse().unwrap();
    assert!((3000..=3600).contains(&retry), "the deadline kept: {retry}");
    let (_, free) = connect_from(gw.addr, "127.0.0.4", &target, "").await;
    assert_eq!(free.status, 200, "{free:?}");
    let branches = admin_request(admin, "GET", "/branches", None).await;
    let listed: Value = serde_json::from_str(&branches.body).unwrap();
    let hold = |name: &str| {
        listed["branches"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["branch"] == name)
            .map(|b| b["hold"].clone())
    };
    assert_eq!(hold("london"), Some(Value::from("quarantined")));
    assert_eq!(hold("paris"), Some(Value::from("draining")));
}

#[tokio::test]
async fn the_notify_socket_hears_ready_then_mainpid_then_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let origin = TcpOrigin::start(b"ok").await;
    let mut gw = Gateway::start_with_env(
        GatewayConfig::for_origin(origin.addr.port()),
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    )
    .await;
    gw.signal("USR2");
    let new = handed_over(&mut gw).await;
    let heard = tokio::task::spawn_blocking(move || {
        let mut heard = Vec::new();
        let mut buf = [0u8; 512];
        while let Ok(n) = socket.recv(&mut buf) {
            let message = String::from_utf8_lossy(&buf[..n]).trim_end().to_owned();
            let stopping = message.contains("STOPPING=1");
            heard.push(message);
            if stopping {
                break;
            }
        }
        heard
    })
    .await
    .unwrap();
    let at = |what: &str| heard.iter().position(|m| m.starts_with(what));
    assert_eq!(
        heard.first().map(String::as_str),
        Some("READY=1"),
        "{heard:?}"
    );
    let mainpid = at("MAINPID=").expect("MAINPID=");
    assert_eq!(heard[mainpid], format!("MAINPID={}", new.0));
    assert!(at("STOPPING=1").is_some_and(|s| s > mainpid), "{heard:?}");
    assert_eq!(
        gw.wait_exit(Duration::from_secs(10))
            .await
            .and_then(|s| s.code()),
        Some(0)
    );
}

#[tokio::test]
async fn destinations_learned_before_during_and_after_an_upgrade_are_in_the_state_file() {
    let pki = Pki::new();
    let origin = origin_for(&pki, 3).await;
    let port = origin.port();
    let state = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(learning_config(state.path(), port, "record", 3)).await;
    assert_eq!(fetch(&pki, gw.addr, LONDON, &account(0), port).await, 200);
    gw.signal("USR2");
    let new = handed_over(&mut gw).await;
    // Served by whichever process accepts it: the new one, or the old one before it stopped.
    assert_eq!(fetch(&pki, gw.addr, PARIS, &account(1), port).await, 200);
    let status = gw.wait_exit(Duration::from_secs(10)).await.expect("exits");
    assert_eq!(status.code(), Some(0));
    assert_eq!(fetch(&pki, gw.addr, LONDON, &account(2), port).await, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let hosts = state_file_hosts(state.path());
        if (0..3).all(|n| hosts.contains(&account(n))) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the state file holds {hosts:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        gw.count_logs(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.contains("learned destinations are not saved"))),
        0
    );
    drop(new);
}

#[tokio::test]
async fn a_fleet_replica_upgraded_in_place_keeps_one_share_under_its_name() {
    let redis = Redis::start(&[]);
    let origin = TcpOrigin::start(b"ok").await;
    let port = origin.addr.port();
    let config = GatewayConfig::for_origin(port).extra(&upload_all_day("each-branch"));
    let mut gw = start_replica(&replica(&config, &redis.url(), "gw-1")).await;
    let target = format!("{ORIGIN_HOST}:{port}");
    // A tunnel on the old process makes the budget's share; one on the new process keeps it.
    let (on_old, status) = open_tunnel(gw.addr, &target, b"").await;
    assert_eq!(status, 200);
    // Uploading (a budget takes a share while it has demand), until told to finish.
    let (finish, finished) = tokio::sync::oneshot::channel::<()>();
    let uploader = tokio::spawn(async move {
        let mut tunnel = on_old;
        let chunk = [7u8; 16 * 1024];
        let mut finished = finished;
        for _ in 0..2_000 {
            tokio::select! {
                _ = &mut finished => break,
                written = tunnel.write_all(&chunk) => if written.is_err() { break },
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        send_and_finish(&mut tunnel, b"done").await
    });
    let shares = "portcullis:{each-branch:unassigned:upload}:shares";
    let fields = || redis.command(&format!("HKEYS {shares}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !fields().contains("gw-1") && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(fields().contains("gw-1"), "{}", fields());
    gw.signal("USR2");
    let _new = handed_over(&mut gw).await;
    let (_on_new, status) = open_tunnel(gw.addr, &target, b"").await;
    assert_eq!(status, 200);
    let _ = finish.send(());
    assert_eq!(uploader.await.unwrap(), b"ok");
    gw.wait_exit(Duration::from_secs(10))
        .await
        .expect("the old process exits once its tunnel ended");
    // The new process refreshes under the same name: one field, never two, and no clash.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        redis.command(&format!("HLEN {shares}")).trim(),
        ":1",
        "one share: {}",
        fields()
    );
    assert!(fields().contains("gw-1"), "{}", fields());
    assert_eq!(
        gw.count_logs(|l| l["level"] == "ERROR"),
        0,
        "no name clash or other error"
    );
    one_tunnel(gw.addr, &target)
        .await
        .expect("the new process serves");
}

#[tokio::test]
async fn a_stop_while_the_new_process_starts_stops_both() {
    let origin = TcpOrigin::start(b"ok").await;
    let mut gw = Gateway::start(GatewayConfig::for_origin(origin.addr.port())).await;
    // The new process reads the config from a pipe nobody writes: it never gets ready.
    let path = gw.config_path();
    std::fs::remove_file(&path).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .unwrap();
    assert!(made.success());
    gw.signal("USR2");
    let started = gw
        .wait_log(|l| l["message"] == "upgrade: new process started; waiting until it listens")
        .await;
    let new = started["pid"].as_u64().unwrap() as u32;
    let _guard = NewProcess(new);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = std::time::Instant::now();
    gw.signal("TERM");
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("the stop is not held up by the upgrade's wait");
    assert_eq!(status.code(), Some(0));
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    let gone = !std::path::Path::new(&format!("/proc/{new}")).exists()
        || std::fs::read_to_string(format!("/proc/{new}/stat"))
            .is_ok_and(|stat| stat.contains(") Z "));
    assert!(gone, "the new process was stopped with the upgrade");
}

#[tokio::test]
async fn tunnels_draining_on_the_old_process_still_count_against_the_fleet_cap() {
    let redis = Redis::start(&[]);
    let origin = TcpOrigin::start(b"ok").await;
    let port = origin.addr.port();
    let config = GatewayConfig::for_origin(port).branch(
        Branch::new("london")
            .sources(&["127.0.0.0/8"])
            .set("max_tunnels", 2),
    );
    let mut gw = start_replica(&replica(&config, &redis.url(), "gw-1")).await;
    let target = format!("{ORIGIN_HOST}:{port}");
    let (first, status) = open_tunnel(gw.addr, &target, b"").await;
    assert_eq!(status, 200);
    let (second, status) = open_tunnel(gw.addr, &target, b"").await;
    assert_eq!(status, 200);
    gw.signal("USR2");
    let _new = handed_over(&mut gw).await;
    // Past the lease of what the old process counted under the name (2 s): its two draining
    // tunnels still fill the cap.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let (_third, status) = open_tunnel(gw.addr, &target, b"").await;
    assert_eq!(status, 429, "the cap holds across the handover");
    let counts = redis.command("HKEYS portcullis:{tunnels:london}");
    assert!(counts.contains("gw-1@upgrading-"), "{counts}");
    // Once they end, the new process admits again.
    drop((first, second));
    let mut admitted = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_t, status) = open_tunnel(gw.addr, &target, b"").await;
        if status == 200 {
            admitted = true;
            break;
        }
    }
    assert!(
        admitted,
        "the old process's tunnels stopped counting once closed"
    );
}
