//! The branch agent (issue 8): `check` against the real gateway and TLS origins, stage by stage;
//! `forward` carrying curl through the real gateway with a client certificate, failing over to a
//! second gateway and returning to the first after its probe.

use crate::support::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_portcullis-agent");
/// Runs `portcullis-agent args` to completion (30 s at most): exit code, stdout, stderr.
async fn agent(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut command = tokio::process::Command::new(AGENT);
    command.args(args).env_remove("PORTCULLIS_PROXY_PASSWORD");
    for (k, v) in env {
        command.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("the agent finishes within 30 s")
        .expect("run portcullis-agent");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn check_passes_every_stage_through_a_tls_gateway_and_reports_denials() {
    let pki = Pki::new();
    let origin = Origin::start_named(&pki, &[ORIGIN_HOST, SECOND_HOST, DENIED_HOST]).await;
    let port = origin.port();
    let files = AgentFiles::new(&pki);
    let gw = Gateway::start(&agent_gateway_config(&files, port, 0)).await;
    let proxy = format!("https://{}", gw.tls_addr.unwrap());
    let (ca, cert, key) = files.identity();
    let first = format!("{ORIGIN_HOST}:{port}");
    let second = format!("{SECOND_HOST}:{port}");
    let tls_args = [
        "check", "--proxy", &proxy, "--ca", &ca, "--cert", &cert, "--key", &key,
    ];

    let mut args = tls_args.to_vec();
    args.extend(["--host", &first, "--host", &second, "--json"]);
    let (code, stdout, stderr) = agent(&args, &[]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let report: Value = serde_json::from_str(&stdout).expect("--json prints JSON");
    assert_eq!(
        (report["passed"].as_u64(), report["failed"].as_u64()),
        (Some(2), Some(0))
    );
    for host in [ORIGIN_HOST, SECOND_HOST] {
        let r = report_row(&report, host);
        assert_eq!(r["result"], "pass", "{r:#}");
        for stage in ["proxy", "auth", "connect", "tls"] {
            assert_eq!(r[stage]["outcome"], "pass", "{stage}: {r:#}");
            assert!(r[stage]["ms"].is_u64(), "{stage} is timed: {r:#}");
        }
        assert_eq!(r["verdict"]["status"], 200);
    }

    // One endpoint denied: its row fails with the gateway's reason, the run exits 1.
    let denied = format!("{DENIED_HOST}:{port}");
    let mut args = tls_args.to_vec();
    args.extend(["--host", &first, "--host", &denied, "--color", "never"]);
    let (code, table, stderr) = agent(&args, &[]).await;
    assert_eq!(code, Some(1), "{table}{stderr}");
    let denied_line = table
        .lines()
        .find(|l| l.contains(DENIED_HOST))
        .expect("a row for the denied host");
    assert!(denied_line.starts_with("FAIL"), "{table}");
    assert!(denied_line.contains("FAIL 403"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("pass") && l.contains(ORIGIN_HOST)),
        "{table}"
    );
    assert!(table.contains("1 passed, 1 failed, 0 skipped"), "{table}");
    args.push("--json");
    let (_, stdout, _) = agent(&args, &[]).await;
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let r = report_row(&report, DENIED_HOST);
    let reason = r["verdict"]["reason"]
        .as_str()
        .expect("the gateway's reason");
    assert!(!reason.is_empty());
    assert!(
        denied_line.contains(reason),
        "the table shows {reason:?}: {table}"
    );
    assert_eq!(
        (
            r["result"].as_str(),
            r["connect"]["outcome"].as_str(),
            r["tls"]["outcome"].as_str()
        ),
        (Some("fail"), Some("fail"), Some("not_run"))
    );
    assert_eq!(r["verdict"]["status"], 403);

    // The forwarder's config file serves the check too: its first gateway, TLS files relative
    // to the file.
    let config = files.dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "gateways = [\"{proxy}\"]\nca = \"ca.pem\"\ncertificate = \"branch.pem\"\nkey = \"branch.key\"\n"
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let (code, stdout, stderr) =
        agent(&["check", "--config", &config, "--host", &first], &[]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");

    // Credentials on the plain listener: right password from the environment passes, a wrong
    // one fails the auth stage with 407.
    let plain = format!("http://{}", gw.addr);
    let args = [
        "check",
        "--proxy",
        &plain,
        "--ca",
        &ca,
        "--user",
        "berlin-fs1",
        "--host",
        &first,
        "--json",
    ];
    let (code, stdout, stderr) = agent(&args, &[("PORTCULLIS_PROXY_PASSWORD", "s3cret")]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let (code, stdout, _) = agent(&args, &[("PORTCULLIS_PROXY_PASSWORD", "wrong")]).await;
    assert_eq!(code, Some(1));
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let r = report_row(&report, ORIGIN_HOST);
    assert_eq!(r["auth"]["outcome"], "fail", "{r:#}");
    assert_eq!(r["verdict"]["status"], 407);
    assert!(!stdout.contains("wrong"), "the password is never printed");
}

#[tokio::test]
async fn check_direct_flags_an_endpoint_reachable_without_the_gateway() {
    let pki = Pki::new();
    let origin = Origin::start_named(&pki, &[ORIGIN_HOST, SECOND_HOST]).await;
    let port = origin.port();
    let files = AgentFiles::new(&pki);
    let gw = Gateway::start(&agent_gateway_config(&files, port, 0)).await;
    let proxy = format!("https://{}", gw.tls_addr.unwrap());
    let (ca, cert, key) = files.identity();
    let (first, second) = (
        format!("{ORIGIN_HOST}:{port}"),
        format!("{SECOND_HOST}:{port}"),
    );
    // The origin listens on 127.0.0.1 only: 127.0.0.2 is the "firewalled" path.
    let open = format!("{ORIGIN_HOST}:{port}:127.0.0.1");
    let closed = format!("{SECOND_HOST}:{port}:127.0.0.2");
    let args = [
        "check",
        "--proxy",
        &proxy,
        "--ca",
        &ca,
        "--cert",
        &cert,
        "--key",
        &key,
        "--host",
        &first,
        "--host",
        &second,
        "--direct",
        "--resolve",
        &open,
        "--resolve",
        &closed,
        "--json",
    ];
    let (code, stdout, stderr) = agent(&args, &[]).await;
    assert_eq!(
        code,
        Some(1),
        "a direct path is a finding: {stdout}{stderr}"
    );
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let leaky = report_row(&report, ORIGIN_HOST);
    assert_eq!(
        (leaky["result"].as_str(), leaky["direct"]["open"].as_bool()),
        (Some("fail"), Some(true)),
        "{leaky:#}"
    );
    assert_eq!(
        leaky["tls"]["outcome"], "pass",
        "the gateway path itself works"
    );
    assert!(leaky["note"].as_str().unwrap().contains("DIRECT OPEN"));
    let closed = report_row(&report, SECOND_HOST);
    assert_eq!(
        (
            closed["result"].as_str(),
            closed["direct"]["open"].as_bool()
        ),
        (Some("pass"), Some(false)),
        "{closed:#}"
    );
}

#[tokio::test]
async fn check_usage_errors_exit_2_with_a_precise_message() {
    let cases: [(&[&str], &str); 5] = [
        (&["check", "--host", "a.example"], "--proxy"),
        (
            &["check", "--proxy", "gw:3128"],
            "expected http://HOST:PORT",
        ),
        (
            &[
                "check",
                "--proxy",
                "http://gw:3128",
                "--host",
                "*.example.com",
            ],
            "wildcard",
        ),
        (
            &["check", "--proxy", "http://gw:3128", "--profile", "nope"],
            "unknown profile",
        ),
        (
            &[
                "check",
                "--proxy",
                "http://gw:3128",
                "--storage-account",
                "Bad.Name",
            ],
            "lowercase",
        ),
    ];
    for (args, want) in cases {
        let (code, _, stderr) = agent(args, &[]).await;
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(want),
            "{args:?}: missing {want:?} in {stderr}"
        );
    }
    let (code, _, stderr) = agent(
        &[
            "check",
            "--proxy",
            "http://127.0.0.1:9",
            "--user",
            "u",
            "--host",
            "a.example",
        ],
        &[],
    )
    .await;
    assert_eq!(code, Some(2));
    assert!(stderr.contains("PORTCULLIS_PROXY_PASSWORD"), "{stderr}");
}

#[tokio::test]
async fn check_skips_wildcards_without_a_representative() {
    // The gateway is unreachable (port 9 on loopback): listed endpoints fail at the first
    // stage, wildcards without --storage-account / --region are skipped with a note.
    let (code, stdout, stderr) = agent(
        &[
            "check",
            "--proxy",
            "http://127.0.0.1:9",
            "--timeout",
            "2s",
            "--json",
        ],
        &[],
    )
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let storage = report_row(&report, "*.core.windows.net");
    assert_eq!(storage["result"], "skip");
    assert!(
        storage["note"]
            .as_str()
            .unwrap()
            .contains("--storage-account")
    );
    let management = report_row(&report, "management.azure.com");
    assert_eq!(
        (
            management["result"].as_str(),
            management["proxy"]["outcome"].as_str()
        ),
        (Some("fail"), Some("fail"))
    );
    assert!(report["skipped"].as_u64().unwrap() >= 2);
}

/// The real `portcullis-agent forward`, JSON logs captured.
struct Agent {
    addr: SocketAddr,
    process: Logged,
}

impl Agent {
    async fn start(args: &[String]) -> Self {
        Self::start_with_env(args, &[]).await
    }

    async fn start_with_env(args: &[String], env: &[(&str, &str)]) -> Self {
        let process = Logged::spawn(
            "agent",
            std::process::Command::new(AGENT)
                .args(["forward", "--log-format", "json", "--listen", "127.0.0.1:0"])
                .args(args)
                .env_remove("PORTCULLIS_PROXY_PASSWORD")
                .envs(env.iter().copied()),
        );
        let mut agent = Self {
            addr: "127.0.0.1:0".parse().unwrap(),
            process,
        };
        let listening = agent.wait_log(|l| l["message"] == "listening").await;
        agent.addr = listening["address"].as_str().unwrap().parse().unwrap();
        agent
    }
}

impl std::ops::Deref for Agent {
    type Target = Logged;
    fn deref(&self) -> &Logged {
        &self.process
    }
}

impl std::ops::DerefMut for Agent {
    fn deref_mut(&mut self) -> &mut Logged {
        &mut self.process
    }
}

fn identity_args(files: &AgentFiles) -> Vec<String> {
    let (ca, cert, key) = files.identity();
    vec![
        "--ca".into(),
        ca,
        "--cert".into(),
        cert,
        "--key".into(),
        key,
    ]
}

#[tokio::test]
async fn forward_carries_curl_through_a_tls_gateway_with_the_branch_certificate() {
    let pki = Pki::new();
    let origin = Origin::start(&pki).await;
    let port = origin.port();
    let files = AgentFiles::new(&pki);
    let mut gw = Gateway::start(&agent_gateway_config(&files, port, 0)).await;
    let mut args = identity_args(&files);
    args.extend([
        "--gateway".into(),
        format!("https://{}", gw.tls_addr.unwrap()),
    ]);
    let mut agent = Agent::start(&args).await;

    let got = curl_through(agent.addr, &files.path("ca.pem"), port, 300_000).await;
    assert_eq!(got, 300_000);
    let line = gw
        .access_line(|l| l["port"] == port && l["status"] == 200)
        .await;
    assert_eq!(
        line["branch"], "london",
        "the gateway saw the branch certificate"
    );
    let line = agent
        .wait_log(|l| l["target"] == "portcullis::agent" && l["status"] == 200)
        .await;
    // curl may reset rather than close once it has its response: either is the app's end.
    assert!(
        line["end"] == "closed" || line["end"] == "client_error",
        "{line}"
    );
    assert!(line["bytes_down"].as_u64().unwrap() > 300_000);

    // The gateway's refusal reaches the app unchanged.
    let reply = raw_request(
        agent.addr,
        format!("CONNECT {DENIED_HOST}:{port} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(reply.status, 403);
    let gw_line = gw.access_line(|l| l["host"] == DENIED_HOST).await;
    assert_eq!(reply.header("portcullis-error"), gw_line["reason"].as_str());
    // Only CONNECT and GET /status; malformed targets are refused by the agent itself.
    let reply = raw_request(
        agent.addr,
        b"GET http://example.com/ HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status, 405);
    let reply = raw_request(agent.addr, b"CONNECT nohost HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(reply.status, 400);

    let (code, stdout, stderr) = agent_status(agent.addr).await;
    assert_eq!(code, Some(0), "{stderr}");
    let status: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(status["gateways"][0]["state"], "up");
    assert_eq!(status["gateways"][0]["in_use"], true);
}

async fn agent_status(addr: SocketAddr) -> (Option<i32>, String, String) {
    agent(&["status", "--listen", &addr.to_string(), "--json"], &[]).await
}

#[tokio::test]
async fn status_never_reports_a_dead_gateway_as_up() {
    // The only gateway: a port where nothing listens. No tunnel ever tries it.
    let dead = free_port();
    let mut agent = Agent::start(&[
        "--gateway".into(),
        format!("http://127.0.0.1:{dead}"),
        "--probe-interval".into(),
        "200ms".into(),
    ])
    .await;
    agent.wait_log(|l| l["message"] == "gateway down").await;
    let (code, stdout, stderr) = agent_status(agent.addr).await;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    let status: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(status["gateways"][0]["state"], "down", "{stdout}");
    assert!(status["gateways"][0]["last_error"].is_string(), "{stdout}");
}

#[tokio::test]
async fn forward_fails_over_to_the_second_gateway_and_returns_to_the_first() {
    let pki = Pki::new();
    let origin = Origin::start(&pki).await;
    let port = origin.port();
    let files = AgentFiles::new(&pki);
    let first_port = free_port();
    let first_config = agent_gateway_config(&files, port, first_port);
    let mut first = Gateway::start(&first_config).await;
    let mut second = Gateway::start(&agent_gateway_config(&files, port, 0)).await;
    let first_url = format!("https://127.0.0.1:{first_port}");
    let second_url = format!("https://{}", second.tls_addr.unwrap());
    let mut args = identity_args(&files);
    args.extend([
        "--gateway".into(),
        first_url.clone(),
        "--gateway".into(),
        second_url.clone(),
        "--probe-interval".into(),
        "1s".into(),
        "--admin".into(),
        "127.0.0.1:0".into(),
    ]);
    let mut agent = Agent::start(&args).await;
    let admin: SocketAddr = agent.wait_log(|l| l["message"] == "admin listening").await["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let ca = files.path("ca.pem");
    let in_use = |url: &str| {
        let url = url.to_owned();
        move |l: &Value| l["message"] == "gateway in use" && l["gateway"] == url.as_str()
    };

    curl_through(agent.addr, &ca, port, 1000).await;
    agent.wait_log(in_use(&first_url)).await;
    first
        .access_line(|l| l["port"] == port && l["status"] == 200)
        .await;

    // The first gateway dies: the next request goes to the second, and curl does not notice.
    drop(first);
    curl_through(agent.addr, &ca, port, 1000).await;
    agent
        .wait_log(|l| l["message"] == "gateway down" && l["gateway"] == first_url.as_str())
        .await;
    agent.wait_log(in_use(&second_url)).await;
    second
        .access_line(|l| l["port"] == port && l["status"] == 200)
        .await;
    let (_, stdout, _) = agent_status(agent.addr).await;
    let status: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        (
            status["gateways"][0]["state"].as_str(),
            status["gateways"][1]["in_use"].as_bool()
        ),
        (Some("down"), Some(true)),
        "{status:#}"
    );

    // It comes back on the same port: after the probe, new tunnels use it again.
    let mut first = Gateway::start(&first_config).await;
    agent
        .wait_log(|l| l["message"] == "gateway up" && l["gateway"] == first_url.as_str())
        .await;
    curl_through(agent.addr, &ca, port, 1000).await;
    first
        .access_line(|l| l["port"] == port && l["status"] == 200)
        .await;
    assert_eq!(
        agent.count_logs(in_use(&first_url)),
        2,
        "back on the first gateway"
    );
    // One tunnel went through the second gateway (its other line is the agent's start probe).
    assert_eq!(
        second.count_logs(|l| l["target"] == "portcullis::access" && l["status"] == 200),
        1
    );

    // The forwarder's own metrics tell the same story.
    let metrics = Metrics::fetch(admin).await;
    for (series, want) in [
        ("portcullis_agent_failovers_total".to_owned(), 1.0),
        ("portcullis_agent_tunnels_active".to_owned(), 0.0),
        (
            format!(r#"portcullis_agent_gateway_up{{gateway="{first_url}"}}"#),
            1.0,
        ),
        (
            format!(r#"portcullis_agent_gateway_in_use{{gateway="{first_url}"}}"#),
            1.0,
        ),
        (
            format!(r#"portcullis_agent_gateway_in_use{{gateway="{second_url}"}}"#),
            0.0,
        ),
    ] {
        metrics.assert_value(&series, want);
    }
    // Three tunnels and one status request, however each ended (a tunnel's last write may
    // race curl's close).
    let requests = metrics.sum("portcullis_agent_requests_total");
    assert_eq!(requests, 4.0, "{metrics}");
    let down = metrics.value(r#"portcullis_agent_bytes_total{direction="down"}"#);
    assert!(
        down > 3000.0,
        "three 1000-byte downloads and their TLS: {down}\n{metrics}"
    );
    assert_promtool_passes(metrics.text());
}

#[tokio::test]
async fn forward_replaces_the_apps_credentials_with_the_configured_ones() {
    let pki = Pki::new();
    let origin = TcpOrigin::start(b"ok").await;
    let port = origin.addr.port();
    let files = AgentFiles::new(&pki);
    let mut gw = Gateway::start(&agent_gateway_config(&files, port, 0)).await;
    // A config file names the gateway (plain listener) and the user; the password comes from
    // the environment.
    let config = files.dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "gateways = [\"http://{}\"]\nuser = \"berlin-fs1\"\n",
            gw.addr
        ),
    )
    .unwrap();
    let args = vec!["--config".to_owned(), config.display().to_string()];
    let mut agent = Agent::start_with_env(&args, &[("PORTCULLIS_PROXY_PASSWORD", "s3cret")]).await;
    let target = format!("{ORIGIN_HOST}:{port}");
    for app_headers in ["", &basic("mallory", "guess")] {
        let (mut tunnel, reply) = connect_from(agent.addr, "127.0.0.1", &target, app_headers).await;
        assert_eq!(reply.status, 200, "with app headers {app_headers:?}");
        assert_eq!(send_and_finish(&mut tunnel, b"x").await, b"ok");
    }
    let line = gw.access_line(|l| l["status"] == 200).await;
    assert_eq!(line["branch"], "berlin");
    let berlin = |l: &Value| l["branch"] == "berlin" && l["status"] == 200;
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.count_logs(berlin) < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(gw.count_logs(berlin), 2, "both tunnels as berlin");
    let logged = agent
        .logs()
        .iter()
        .map(|l| l.to_string())
        .collect::<String>();
    assert!(
        !logged.contains("s3cret") && !logged.contains("Basic"),
        "no credentials in logs"
    );
    agent.wait_log(|l| l["message"] == "gateway in use").await;
}

#[tokio::test]
async fn forward_answers_bad_app_requests_itself_and_keeps_serving() {
    // Nothing listens on the gateway: none of these requests may reach it.
    let agent = Agent::start(&["--gateway".into(), "http://127.0.0.1:9".into()]).await;
    let too_long = format!(
        "CONNECT {ORIGIN_HOST}:443 HTTP/1.1\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(9 * 1024)
    );
    for (request, status) in [
        (too_long.as_str(), 431),
        ("POST /upload HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        ("CONNECT no-port-here HTTP/1.1\r\n\r\n", 400),
        ("\x16\x03\x01 not http at all\r\n\r\n", 400),
    ] {
        let reply = raw_request(agent.addr, request.as_bytes()).await;
        assert_eq!(reply.status, status, "{request:.40}: {reply:?}");
    }
    // A good request still gets its answer: 502, every gateway down, with the reason.
    let reply = raw_request(
        agent.addr,
        format!("CONNECT {ORIGIN_HOST}:443 HTTP/1.1\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(reply.status, 502, "{reply:?}");
    assert!(
        reply
            .header("portcullis-error")
            .is_some_and(|r| r.contains("no gateway")),
        "{reply:?}"
    );
}

#[tokio::test]
async fn forward_drains_open_tunnels_on_sigterm_and_exits_0() {
    let pki = Pki::new();
    let origin = TcpOrigin::start(b"after drain").await;
    let port = origin.addr.port();
    let files = AgentFiles::new(&pki);
    let gw = Gateway::start(&agent_gateway_config(&files, port, 0)).await;
    let mut args = identity_args(&files);
    args.extend([
        "--gateway".into(),
        format!("https://{}", gw.tls_addr.unwrap()),
    ]);
    let mut agent = Agent::start(&args).await;
    let (mut tunnel, status) = open_tunnel(agent.addr, &format!("{ORIGIN_HOST}:{port}"), b"").await;
    assert_eq!(status, 200);

    agent.signal("TERM");
    let draining = agent.wait_log(|l| l["message"] == "draining").await;
    assert_eq!(draining["open"], 1);
    assert!(
        tokio::net::TcpStream::connect(agent.addr).await.is_err(),
        "no new clients while draining"
    );
    // The open tunnel still works to its end.
    assert_eq!(
        send_and_finish(&mut tunnel, b"last batch").await,
        b"after drain"
    );
    let status = agent.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    assert_eq!(agent.count_logs(|l| l["message"] == "drained"), 1);
}

#[test]
fn the_example_agent_config_is_valid() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("config/agent.toml");
    // Credentials are named after their files, so outside the unit the folder is /etc/portcullis.
    let etc = std::path::Path::new("/etc/portcullis");
    let file =
        portcullis::agent::config::AgentFile::load_with_credentials(&path, Some(etc)).unwrap();
    assert_eq!(file.key.as_deref(), Some(etc.join("branch.key").as_path()));
    assert!(!file.gateways.is_empty());
    for url in &file.gateways {
        url.parse::<portcullis::agent::proxy_client::ProxyUrl>()
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// An agent config file in `files`' folder: `gateways`, berlin's credentials (the password
/// from the environment) and `extra` lines (timeouts).
fn agent_config(files: &AgentFiles, name: &str, gateways: &[&str], extra: &str) -> String {
    let list = gateways
        .iter()
        .map(|g| format!("\"{g}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let path = files.dir.path().join(name);
    std::fs::write(
        &path,
        format!("gateways = [{list}]\nuser = \"berlin-fs1\"\n{extra}"),
    )
    .unwrap();
    path.display().to_string()
}

/// One tunnel through the agent to the TCP origin: the status, and the time it took.
async fn tunnel_through(agent: SocketAddr, target: &str) -> (u16, Duration) {
    let started = Instant::now();
    let (mut tunnel, reply) = connect_from(agent, "127.0.0.1", target, "").await;
    let took = started.elapsed();
    if reply.status == 200 {
        assert_eq!(send_and_finish(&mut tunnel, b"x").await, b"ok");
    }
    (reply.status, took)
}

#[tokio::test]
async fn forward_leaves_a_hung_gateway_for_the_next_one_and_returns_when_it_answers() {
    let pki = Pki::new();
    let origin = TcpOrigin::start(b"ok").await;
    let port = origin.addr.port();
    let target = format!("{ORIGIN_HOST}:{port}");
    let files = AgentFiles::new(&pki);
    let mut first = Gateway::start(&agent_gateway_config(&files, port, 0)).await;
    let mut second = Gateway::start(&agent_gateway_config(&files, port, 0)).await;
    // Plain listeners: a stopped gateway's kernel still completes the TCP handshake.
    let (first_url, second_url) = (
        format!("http://{}", first.addr),
        format!("http://{}", second.addr),
    );
    let config = agent_config(
        &files,
        "agent.toml",
        &[&first_url, &second_url],
        "probe_interval = \"500ms\"\n[timeouts]\nconnect = \"1s\"\nreply = \"10s\"\n",
    );
    let password = [("PORTCULLIS_PROXY_PASSWORD", "s3cret")];
    let args = vec!["--config".to_owned(), config.clone()];
    let mut agent = Agent::start_with_env(&args, &password).await;
    let ok = |l: &Value| l["target"] == "portcullis::access" && l["status"] == 200;

    assert_eq!(tunnel_through(agent.addr, &target).await.0, 200);
    first.access_line(|l| l["status"] == 200).await;

    // The first gateway hangs (SIGSTOP: it accepts TCP, answers nothing). The request waiting
    // on it is probed out of the wait and carried by the second, well before the reply timeout
    // (10 s), which used to end in 504.
    first.signal("STOP");
    let (status, took) = tunnel_through(agent.addr, &target).await;
    assert_eq!(status, 200, "carried by the second gateway");
    assert!(
        took < Duration::from_secs(8),
        "left the hung gateway: {took:?}"
    );
    second.access_line(|l| l["status"] == 200).await;
    let down = agent
        .wait_log(|l| l["message"] == "gateway down" && l["gateway"] == first_url.as_str())
        .await;
    assert!(
        down["kind"] == "unresponsive" || down["kind"] == "probe_timeout",
        "{down}"
    );
    // Later requests go straight to the second.
    let (status, took) = tunnel_through(agent.addr, &target).await;
    assert_eq!(status, 200);
    assert!(
        took < Duration::from_secs(1),
        "no wait on the hung gateway: {took:?}"
    );
    assert_eq!(count_within(&second, ok, 2).await, 2);

    // An agent started while the gateway hangs finds out by its start probe, before any
    // request (a TCP connection alone would have said "up").
    let mut late = Agent::start_with_env(&args, &password).await;
    late.wait_log(|l| l["message"] == "gateway down" && l["gateway"] == first_url.as_str())
        .await;
    let (status, took) = tunnel_through(late.addr, &target).await;
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(1), "{took:?}");

    // It wakes up: the probe of down gateways marks it up, and new tunnels return to it.
    first.signal("CONT");
    agent
        .wait_log(|l| l["message"] == "gateway up" && l["gateway"] == first_url.as_str())
        .await;
    let before = first.count_logs(ok);
    assert_eq!(tunnel_through(agent.addr, &target).await.0, 200);
    assert_eq!(
        count_within(&first, ok, before + 1).await,
        before + 1,
        "back on the first gateway"
    );
}

/// `process`'s lines that `pred` picks, once there are `want` of them or after 10 s.
async fn count_within(process: &Logged, pred: impl Fn(&Value) -> bool, want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    while process.count_logs(&pred) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    process.count_logs(&pred)
}

/// A TCP front for a gateway's listener, as an L4 load balancer would be: connections are
/// spliced through, except every `nth` (counted from 0; 0: none, 1: all), which is closed at
/// once, as a gateway turning connections away (its limit on unfinished requests) does.
struct Front {
    addr: SocketAddr,
    nth: std::sync::Arc<std::sync::atomic::AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl Front {
    async fn start(to: SocketAddr, nth: u32) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let nth = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(nth));
        let every = nth.clone();
        let task = tokio::spawn(async move {
            let mut count = 0u32;
            while let Ok((mut tcp, _)) = listener.accept().await {
                let (n, this) = (every.load(Ordering::Relaxed), count);
                count += 1;
                if n != 0 && this.is_multiple_of(n) {
                    drop(tcp);
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut gateway) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut tcp, &mut gateway).await;
                    }
                });
            }
        });
        Self { addr, nth, task }
    }

    fn refuse_every(&self, nth: u32) {
        self.nth.store(nth, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn forward_keeps_a_gateway_that_refuses_some_connections_and_gives_up_on_one_that_refuses_all()
 {
    let pki = Pki::new();
    let origin = TcpOrigin::start(b"ok").await;
    let port = origin.addr.port();
    let target = format!("{ORIGIN_HOST}:{port}");
    let files = AgentFiles::new(&pki);
    let gw = Gateway::start(&agent_gateway_config(&files, port, 0)).await;
    // Every third connection closed during the TLS handshake, the agent's start probe first.
    let front = Front::start(gw.tls_addr.unwrap(), 3).await;
    let front_url = format!("https://{}", front.addr);
    let mut args = identity_args(&files);
    args.extend(["--gateway".into(), front_url.clone()]);
    let agent = Agent::start(&args).await;
    for i in 0..30 {
        let (mut tunnel, status) = open_tunnel(agent.addr, &target, b"").await;
        assert_eq!(
            status, 200,
            "request {i}: a refused connection is tried again"
        );
        assert_eq!(send_and_finish(&mut tunnel, b"x").await, b"ok");
    }
    let through = |l: &Value| l["target"] == "portcullis::access" && l["status"] == 200;
    assert_eq!(count_within(&gw, through, 30).await, 30);
    assert_eq!(
        agent.count_logs(|l| l["message"] == "gateway down"),
        0,
        "a gateway that serves other connections is not down: {:#?}",
        agent.logs()
    );
    let (_, stdout, _) = agent_status(agent.addr).await;
    let status: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(status["gateways"][0]["state"], "up", "{status:#}");

    // A gateway that refuses every connection serves nobody: with a second gateway, requests
    // go there at once, and the first is marked down once it has refused everything for a
    // while (2 s).
    let second = Gateway::start(&agent_gateway_config(&files, port, 0)).await;
    let second_url = format!("https://{}", second.tls_addr.unwrap());
    let mut args = identity_args(&files);
    args.extend([
        "--gateway".into(),
        front_url.clone(),
        "--gateway".into(),
        second_url.clone(),
    ]);
    let mut agent = Agent::start(&args).await;
    front.refuse_every(1);
    let started = Instant::now();
    let down = |l: &Value| l["message"] == "gateway down" && l["gateway"] == front_url.as_str();
    while agent.count_logs(down) == 0 && started.elapsed() < Duration::from_secs(10) {
        let (status, took) = {
            let started = Instant::now();
            let (mut tunnel, status) = open_tunnel(agent.addr, &target, b"").await;
            assert_eq!(send_and_finish(&mut tunnel, b"x").await, b"ok");
            (status, started.elapsed())
        };
        assert_eq!(status, 200);
        assert!(
            took < Duration::from_secs(1),
            "failed over at once: {took:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let line = agent.wait_log(down).await;
    assert_eq!(line["kind"], "tls_closed", "{line}");
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "not before 2 s of refusals: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_expired_client_certificate_is_named_by_check_and_stops_forward() {
    let pki = Pki::new();
    let origin = Origin::start(&pki).await;
    let port = origin.port();
    let files = AgentFiles::new(&pki);
    let (cert, key) = pki.issue_pem(&[BRANCH_CERT_NAME], 2020);
    std::fs::write(files.dir.path().join("expired.pem"), cert).unwrap();
    std::fs::write(files.dir.path().join("expired.key"), key).unwrap();
    let (expired, expired_key) = (files.path("expired.pem"), files.path("expired.key"));
    let gw = Gateway::start(&agent_gateway_config(&files, port, 0)).await;
    let proxy = format!("https://{}", gw.tls_addr.unwrap());
    let (ca, cert, key) = files.identity();
    let host = format!("{ORIGIN_HOST}:{port}");

    // check: the certificate's own line fails with its date; the row quotes the gateway's
    // alert instead of an end of file.
    let args = [
        "check",
        "--proxy",
        &proxy,
        "--ca",
        &ca,
        "--cert",
        &expired,
        "--key",
        &expired_key,
        "--host",
        &host,
        "--color",
        "never",
    ];
    let (code, table, stderr) = agent(&args, &[]).await;
    assert_eq!(code, Some(1), "{table}{stderr}");
    let line = table
        .lines()
        .find(|l| l.starts_with("certificate:"))
        .unwrap_or_else(|| panic!("a certificate line: {table}"));
    assert!(
        line.starts_with("certificate: FAIL")
            && line.contains("expired.pem")
            && line.contains(BRANCH_CERT_NAME)
            && line.contains("expired on 2020-01-01T00:00:00Z"),
        "{table}"
    );
    let endpoint = table.lines().find(|l| l.contains(ORIGIN_HOST)).unwrap();
    assert!(endpoint.contains("certificate_expired"), "{table}");
    let mut json = args.to_vec();
    json.push("--json");
    let (_, stdout, _) = agent(&json, &[]).await;
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["certificate"]["outcome"], "fail", "{report:#}");
    assert_eq!(report["certificate"]["not_after"], "2020-01-01T00:00:00Z");
    let r = report_row(&report, ORIGIN_HOST);
    assert_eq!(r["proxy"]["outcome"], "fail", "{r:#}");

    // A valid certificate passes its line, with its end date.
    let args = [
        "check", "--proxy", &proxy, "--ca", &ca, "--cert", &cert, "--key", &key, "--host", &host,
        "--color", "never",
    ];
    let (code, table, stderr) = agent(&args, &[]).await;
    assert_eq!(code, Some(0), "{table}{stderr}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("certificate: ok")
                && l.contains("valid until 2099-01-01T00:00:00Z")),
        "{table}"
    );

    // forward refuses to start with it, saying why (exit 2: a configuration error).
    let started = tokio::process::Command::new(AGENT)
        .args(["forward", "--listen", "127.0.0.1:0", "--gateway", &proxy])
        .args(["--ca", &ca, "--cert", &expired, "--key", &expired_key])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(10), started)
        .await
        .expect("forward exits at once")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("expired.pem") && stderr.contains("expired on 2020-01-01T00:00:00Z"),
        "{stderr}"
    );
}
