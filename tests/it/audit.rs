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

/// A gateway whose access file lives on a 16 KiB tmpfs of its own (a mount namespace made by
/// `unshare`, seen from here through `/proc/PID/root`), its stderr in a file.
struct FullDisk {
    gw: Gateway,
    /// The access file and the tmpfs, as this process sees them.
    log: std::path::PathBuf,
    filler: std::path::PathBuf,
    stderr: std::path::PathBuf,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl FullDisk {
    async fn start(on_write_failure: &str) -> Self {
        let mount = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let stderr = elsewhere.path().join("stderr.log");
        let config = GatewayConfig::no_origin()
            .set("log", "format", "json")
            .set("log", "access_file", mount.path().join("access.log"))
            .set("log", "on_write_failure", on_write_failure);
        let script = format!(
            "mount -t tmpfs -o size=16k portcullis-test {} && exec \"$@\" 2>>{}",
            mount.path().display(),
            stderr.display()
        );
        let wrapper = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
        ];
        let gw = Gateway::start_under(&config, &[], &wrapper).await;
        let root = format!("/proc/{}/root{}", gw.pid(), mount.path().display());
        let log = std::path::PathBuf::from(&root).join("access.log");
        let filler = std::path::PathBuf::from(&root).join("filler");
        // Three of the four pages: the access file gets one page (about ten lines), then the
        // disk is full.
        std::fs::write(&filler, vec![0u8; 12 * 1024]).unwrap();
        Self {
            gw,
            log,
            filler,
            stderr,
            _dirs: (mount, elsewhere),
        }
    }

    /// One refused CONNECT: its status (an access line each).
    async fn request(&self) -> u16 {
        raw_request(self.gw.addr, b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n")
            .await
            .status
    }

    fn lines(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.log).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("torn line {l:?}: {e}")))
            .collect()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

/// Access lines the disk cannot take are counted, reported on stderr (once, not per line),
/// and never written in part; serving goes on; when space returns, whole lines follow.
#[tokio::test]
async fn a_full_disk_loses_whole_lines_counted_and_reported_and_serving_goes_on() {
    let disk = FullDisk::start("keep-serving").await;
    for _ in 0..30 {
        assert_eq!(disk.request().await, 403, "serving goes on");
    }
    let written = disk.lines().len();
    assert!((1..30).contains(&written), "{written} of 30 lines fit");
    let metrics = disk.gw.metrics().await;
    let dropped = metrics.value("portcullis_access_log_lines_dropped_total");
    assert_eq!(
        dropped as usize + written,
        30,
        "every line is written or counted"
    );
    let stderr = disk.stderr();
    assert_eq!(
        stderr.matches("cannot write").count(),
        1,
        "reported once, not per line:\n{stderr}"
    );
    std::fs::remove_file(&disk.filler).unwrap();
    for _ in 0..3 {
        assert_eq!(disk.request().await, 403);
    }
    let lines = disk.lines();
    assert_eq!(
        lines.len(),
        written + 3,
        "whole lines only, the torn one taken back"
    );
    assert!(
        disk.stderr()
            .contains(&format!("writable again; {dropped} lines were lost")),
        "{}",
        disk.stderr()
    );
}

/// `fail-closed`: while the access file cannot be written, new connections get 503; once it
/// can, the gateway serves again.
#[tokio::test]
async fn fail_closed_refuses_while_the_audit_trail_cannot_be_written() {
    let disk = FullDisk::start("fail-closed").await;
    let mut statuses = Vec::new();
    for _ in 0..30 {
        statuses.push(disk.request().await);
    }
    let first_503 = statuses.iter().position(|&s| s == 503).expect("a 503");
    assert!(
        statuses[..first_503].iter().all(|&s| s == 403)
            && statuses[first_503..].iter().all(|&s| s == 503),
        "{statuses:?}"
    );
    std::fs::remove_file(&disk.filler).unwrap();
    // The first connection after may still be refused: its line, written, reopens the gateway.
    let mut after = Vec::new();
    for _ in 0..3 {
        after.push(disk.request().await);
    }
    assert_eq!(after.last(), Some(&403), "{after:?}");
    let lines = disk.lines();
    assert!(
        lines.iter().any(|l| l["end"] == "access_log_unavailable"),
        "{lines:?}"
    );
}
