//! The Windows build of the branch agent (issue 18), run under wine against the real Linux
//! gateway on loopback: `check` (table and `--json`), and `forward` carrying curl to the
//! gateway's TLS listener with the branch's client certificate, the bytes checked by SHA-256,
//! failing over to a second gateway.
//!
//! `PORTCULLIS_WINDOWS_AGENT` names the `.exe` (with the test-only `bcryptprimitives.dll` from
//! `tests/windows/processprng.c` beside it); `.ci/run` builds both and sets it, with
//! `WINEPREFIX`. Without it the tests print a note and pass, so `cargo test` works where there
//! is no wine; with `CI` set they fail instead, so CI cannot skip them silently.

use crate::support::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const VARIABLE: &str = "PORTCULLIS_WINDOWS_AGENT";

/// The Windows agent to run, or `None` (with a note) where none was built.
fn windows_agent() -> Option<PathBuf> {
    match std::env::var_os(VARIABLE) {
        Some(path) => {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "{VARIABLE}={}: no such file",
                path.display()
            );
            // The first start in a fresh prefix initialises it (10-30 s): once, up front.
            static READY: std::sync::Once = std::sync::Once::new();
            READY.call_once(|| {
                let out = wine(&path).arg("--version").output().expect("run wine");
                assert!(
                    out.status.success(),
                    "wine {} --version: {out:?}",
                    path.display()
                );
            });
            Some(path)
        }
        None if std::env::var_os("CI").is_some() => {
            panic!("CI is set but {VARIABLE} is not: .ci/run builds the Windows agent and names it")
        }
        None => {
            eprintln!(
                "note: Windows agent tests skipped: set {VARIABLE} to the .exe (see CONTRIBUTING.md)"
            );
            None
        }
    }
}

/// `wine EXE`, quiet.
fn wine(exe: &Path) -> Command {
    let mut command = Command::new("wine");
    command
        .arg(exe)
        .env("WINEDEBUG", "-all")
        .env_remove("PORTCULLIS_PROXY_PASSWORD");
    command
}

/// A Linux path as the Windows program sees it (wine maps `/` to drive Z:).
fn windows_path(path: &str) -> String {
    format!("Z:{}", path.replace('/', "\\"))
}

/// The CA, branch certificate and key as Windows paths.
fn windows_identity(files: &AgentFiles) -> Vec<String> {
    let (ca, cert, key) = files.identity();
    vec![
        "--ca".into(),
        windows_path(&ca),
        "--cert".into(),
        windows_path(&cert),
        "--key".into(),
        windows_path(&key),
    ]
}

/// Runs the Windows agent with `args` to completion (60 s at most): exit code, stdout, stderr.
async fn run(exe: &Path, args: &[String]) -> (Option<i32>, String, String) {
    let mut command = tokio::process::Command::from(wine(exe));
    command.args(args);
    let out = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the Windows agent finishes within 60 s")
        .expect("run wine");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn windows_check_prints_the_table_and_json_through_a_tls_gateway() {
    let Some(exe) = windows_agent() else { return };
    let pki = Pki::new();
    let origin = Origin::start_named(&pki, &[ORIGIN_HOST, SECOND_HOST, DENIED_HOST]).await;
    let port = origin.port();
    let files = AgentFiles::new(&pki);
    let gw = Gateway::start(&agent_gateway_config(&files, port, 0)).await;
    let mut args: Vec<String> = vec![
        "check".into(),
        "--proxy".into(),
        format!("https://{}", gw.tls_addr.unwrap()),
    ];
    args.extend(windows_identity(&files));

    let mut json = args.clone();
    for host in [ORIGIN_HOST, SECOND_HOST] {
        json.extend(["--host".into(), format!("{host}:{port}")]);
    }
    json.push("--json".into());
    let (code, stdout, stderr) = run(&exe, &json).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let report: Value = serde_json::from_str(&stdout).expect("--json prints JSON");
    assert_eq!(
        (report["passed"].as_u64(), report["failed"].as_u64()),
        (Some(2), Some(0)),
        "{report:#}"
    );
    for host in [ORIGIN_HOST, SECOND_HOST] {
        let r = report_row(&report, host);
        for stage in ["proxy", "auth", "connect", "tls"] {
            assert_eq!(r[stage]["outcome"], "pass", "{stage}: {r:#}");
        }
    }

    // The table, with one endpoint the gateway refuses: its row fails with 403, exit 1.
    let mut table = args;
    for host in [ORIGIN_HOST, DENIED_HOST] {
        table.extend(["--host".into(), format!("{host}:{port}")]);
    }
    table.extend(["--color".into(), "never".into()]);
    let (code, stdout, stderr) = run(&exe, &table).await;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("pass") && l.contains(ORIGIN_HOST)),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.contains(DENIED_HOST) && l.contains("FAIL 403")),
        "{stdout}"
    );
    assert!(stdout.contains("1 passed, 1 failed, 0 skipped"), "{stdout}");

    // A bad file is a usage error with its Windows path, not a panic.
    let (code, _, stderr) = run(
        &exe,
        &[
            "check".into(),
            "--proxy".into(),
            "https://127.0.0.1:9".into(),
            "--ca".into(),
            "C:\\nowhere\\ca.pem".into(),
        ],
    )
    .await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("C:\\nowhere\\ca.pem: cannot read the CA file"),
        "{stderr}"
    );
}

/// The first log line of `agent` matching `pred`, waiting up to 30 s (wine starts slower).
async fn wait_line(agent: &mut Logged, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(line) = agent.logs().into_iter().find(|l| pred(l)) {
            return line;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.wait_log(pred).await
}

#[tokio::test]
async fn windows_forward_carries_curl_with_every_byte_and_fails_over() {
    let Some(exe) = windows_agent() else { return };
    let pki = Pki::new();
    let origin = Origin::start(&pki).await;
    let port = origin.port();
    let files = AgentFiles::new(&pki);
    let first_port = free_port();
    let mut first = Gateway::start(&agent_gateway_config(&files, port, first_port)).await;
    let mut second = Gateway::start(&agent_gateway_config(&files, port, 0)).await;
    let first_url = format!("https://127.0.0.1:{first_port}");
    let second_url = format!("https://{}", second.tls_addr.unwrap());
    let mut command = wine(&exe);
    command
        .args(["forward", "--log-format", "json", "--listen", "127.0.0.1:0"])
        .args(["--gateway", &first_url, "--gateway", &second_url])
        .args(windows_identity(&files));
    let mut agent = Logged::spawn("windows agent", &mut command);
    let listening = wait_line(&mut agent, |l| l["message"] == "listening").await;
    let addr: SocketAddr = listening["address"].as_str().unwrap().parse().unwrap();
    let ca = files.path("ca.pem");

    // 4 MB through the Windows forwarder and the first gateway: curl_through compares the
    // body's SHA-256 with the origin's.
    let started = Instant::now();
    assert_eq!(curl_through(addr, &ca, port, 4_000_000).await, 4_000_000);
    eprintln!(
        "4 MB through the Windows forwarder in {:?}",
        started.elapsed()
    );
    let line = first
        .access_line(|l| l["port"] == port && l["status"] == 200)
        .await;
    assert_eq!(
        line["branch"], "london",
        "the gateway saw the branch certificate"
    );
    let line = wait_line(&mut agent, |l| {
        l["target"] == "portcullis::agent" && l["status"] == 200
    })
    .await;
    assert_eq!(line["gateway"], first_url.as_str(), "{line}");
    assert!(line["bytes_down"].as_u64().unwrap() > 4_000_000, "{line}");

    // The first gateway stops: the next request goes to the second, curl does not notice.
    drop(first);
    assert_eq!(curl_through(addr, &ca, port, 1_000_000).await, 1_000_000);
    second
        .access_line(|l| {
            l["port"] == port && l["status"] == 200 && l["bytes_down"].as_u64() > Some(1_000_000)
        })
        .await;
    wait_line(&mut agent, |l| {
        l["message"] == "gateway down" && l["gateway"] == first_url.as_str()
    })
    .await;
    wait_line(&mut agent, |l| {
        l["message"] == "gateway in use" && l["gateway"] == second_url.as_str()
    })
    .await;
}

#[test]
fn the_example_windows_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/agent-windows.toml");
    let file = portcullis::agent::config::AgentFile::load(&path).unwrap();
    let key = file.key.unwrap().display().to_string();
    assert!(
        key.ends_with("C:\\ProgramData\\Portcullis\\branch.key"),
        "{key}"
    );
    assert!(!file.gateways.is_empty());
    for url in &file.gateways {
        url.parse::<portcullis::agent::proxy_client::ProxyUrl>()
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Removes the test's service however the test ends.
struct Installed(PathBuf);

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = wine(&self.0).args(["service", "uninstall"]).output();
    }
}

/// Wine's service control manager runs the real service path: install, start (returns once it
/// listens), a tunnel through it, stop (the manager's stop event, the drain), uninstall; the
/// lines are in the daily file under %ProgramData%\Portcullis\logs.
#[tokio::test]
async fn windows_service_runs_the_forwarder_and_drains_on_stop() {
    let Some(exe) = windows_agent() else { return };
    let pki = Pki::new();
    let origin = Origin::start(&pki).await;
    let port = origin.port();
    let files = AgentFiles::new(&pki);
    let mut gw = Gateway::start(&agent_gateway_config(&files, port, 0)).await;
    let listen = free_port();
    let (ca, cert, key) = files.identity();
    let config = files.path("agent-windows.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{listen}\"\ngateways = [\"https://{}\"]\nca = '{}'\ncertificate = '{}'\nkey = '{}'\n",
            gw.tls_addr.unwrap(),
            windows_path(&ca),
            windows_path(&cert),
            windows_path(&key)
        ),
    )
    .unwrap();
    let service = |action: &'static str| {
        let exe = exe.clone();
        let config = windows_path(&config);
        async move {
            let mut args = vec!["service".to_owned(), action.to_owned()];
            if action == "install" {
                args.extend(["--config".into(), config]);
            }
            run(&exe, &args).await
        }
    };
    let _ = service("uninstall").await;
    // Not installed: a precise error, exit 1. A config that cannot be read: refused at install.
    let (code, _, stderr) = service("start").await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("service PortcullisAgent"), "{stderr}");
    let (code, _, stderr) = run(
        &exe,
        &[
            "service".into(),
            "install".into(),
            "--config".into(),
            "C:\\nowhere\\agent.toml".into(),
        ],
    )
    .await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("agent.toml: cannot read the file"),
        "{stderr}"
    );
    let (code, stdout, stderr) = service("install").await;
    assert_eq!(code, Some(0), "install: {stdout}{stderr}");
    let _installed = Installed(exe.clone());
    let (code, stdout, stderr) = service("start").await;
    assert_eq!(code, Some(0), "start: {stdout}{stderr}");

    let addr: SocketAddr = ([127, 0, 0, 1], listen).into();
    assert_eq!(
        curl_through(addr, &files.path("ca.pem"), port, 1_000_000).await,
        1_000_000
    );
    let line = gw
        .access_line(|l| l["port"] == port && l["status"] == 200)
        .await;
    assert_eq!(line["branch"], "london");

    let (code, stdout, stderr) = service("stop").await;
    assert_eq!(code, Some(0), "stop: {stdout}{stderr}");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "stopped: nothing listens on {addr}"
    );
    let (code, stdout, stderr) = service("uninstall").await;
    assert_eq!(code, Some(0), "uninstall: {stdout}{stderr}");

    // Wine's %ProgramData% is C:\users\Public.
    let prefix = std::env::var_os("WINEPREFIX").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap()).join(".wine"),
        PathBuf::from,
    );
    let logs = prefix.join("drive_c/users/Public/Portcullis/logs");
    let text: String = std::fs::read_dir(&logs)
        .unwrap_or_else(|e| panic!("{}: {e}", logs.display()))
        .map(|entry| std::fs::read_to_string(entry.unwrap().path()).unwrap())
        .collect();
    let ours = &text[text
        .rfind(&format!("\"address\":\"127.0.0.1:{listen}\""))
        .unwrap_or_else(|| panic!("no listening line for port {listen} in {text}"))..];
    let lines: Vec<Value> = ours
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        lines.iter().any(|l| l["target"] == "portcullis::agent"
            && l["status"] == 200
            && l["bytes_down"].as_u64() > Some(1_000_000)),
        "{ours}"
    );
    assert!(lines.iter().any(|l| l["message"] == "drained"), "{ours}");
}
