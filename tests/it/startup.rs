//! `portcullis serve` at start: TLS files from systemd's credentials folder
//! (`${CREDENTIALS_DIRECTORY}`), and the exit code of each way a start fails: 64 for a config
//! problem found only when starting (so `RestartPreventExitStatus=64` ends a restart loop), 1
//! for a port that cannot be bound, 2 for a usage error.

use crate::support::*;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

const GATEWAY_NAME: &str = "gateway.test";

/// A gateway config with a plain and a TLS listener on 127.0.0.1:0 and the `[tls]` files given.
fn tls_config(certificate: &str, key: &str) -> String {
    GatewayConfig::new()
        .listen("admin", "off")
        .tls_listener("127.0.0.1:0", None)
        .tls("certificate", certificate)
        .tls("key", key)
        .to_string()
}

/// The line of `config` that starts with `start`, counted from 1 as the gateway names it.
fn line_of(config: &str, start: &str) -> usize {
    config
        .lines()
        .position(|l| l.starts_with(start))
        .unwrap_or_else(|| panic!("no {start:?} in {config}"))
        + 1
}

/// Runs `portcullis serve --config FILE` (FILE holding `config`) with `env`, expecting it to
/// exit within 10 s.
fn serve_until_exit(config: &str, env: &[(&str, &Path)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["serve", "--log-format", "json", "--config"])
        .arg(&path)
        .env_remove("CREDENTIALS_DIRECTORY")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("portcullis serve is still running: {config}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn an_unusable_tls_file_found_at_start_exits_64_naming_it() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = pki.issue_pem(&[GATEWAY_NAME], 2099);
    let d = dir.path();
    std::fs::write(d.join("gateway.pem"), cert).unwrap();
    std::fs::write(d.join("gateway.key"), key).unwrap();
    std::fs::write(d.join("garbage.pem"), "not a PEM file\n").unwrap();
    let file = |name: &str| d.join(name).display().to_string();
    for (certificate, key, named, why) in [
        (
            file("gateway.pem"),
            file("missing.key"),
            file("missing.key"),
            "cannot read the private key",
        ),
        // A folder where the key should be: it exists but cannot be read as a file.
        (
            file("gateway.pem"),
            d.display().to_string(),
            d.display().to_string(),
            "cannot read the private key",
        ),
        (
            file("gateway.pem"),
            file("garbage.pem"),
            file("garbage.pem"),
            "cannot read the private key",
        ),
        (
            file("garbage.pem"),
            file("gateway.key"),
            file("garbage.pem"),
            "no certificate in the file",
        ),
    ] {
        let out = serve_until_exit(&tls_config(&certificate, &key), &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(64), "{certificate} {key}: {err}");
        assert!(
            err.starts_with("portcullis: invalid configuration:\n")
                && err.contains(&format!("{named}: {why}")),
            "{err}"
        );
    }
}

#[test]
fn a_port_that_cannot_be_bound_exits_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let config = GatewayConfig::new()
        .listen("proxy", [addr.to_string()])
        .listen("admin", "off")
        .to_string();
    let out = serve_until_exit(&config, &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["serve", "--no-such-option"][..],
        &[][..],
        &["explain"][..],
        &["health", "--admin", "not-an-address"][..],
    ] {
        let out = portcullis(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("For more information, try '--help'")
                || stderr(&out).contains("Usage: portcullis <COMMAND>"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

#[tokio::test]
async fn tls_files_come_from_the_credentials_folder() {
    let pki = Pki::new();
    let credentials = tempfile::tempdir().unwrap();
    let (cert, key) = pki.issue_pem(&[GATEWAY_NAME], 2099);
    std::fs::write(credentials.path().join("gateway.pem"), cert).unwrap();
    std::fs::write(credentials.path().join("gateway.key"), key).unwrap();
    let config = tls_config(
        "${CREDENTIALS_DIRECTORY}/gateway.pem",
        "${CREDENTIALS_DIRECTORY}/gateway.key",
    );

    // Not set: a config error at the key's place (line, and the column of its value), exit
    // 64, before anything listens.
    let out = serve_until_exit(&config, &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(64), "{err}");
    let (certificate, key) = (
        line_of(&config, "certificate = "),
        line_of(&config, "key = "),
    );
    assert!(
        err.contains(&format!(
            "portcullis.toml:{certificate}:15: tls.certificate: "
        )) && err.contains(&format!("portcullis.toml:{key}:7: tls.key: "))
            && err.contains("${CREDENTIALS_DIRECTORY} is not set"),
        "{err}"
    );

    // Set (as systemd does for LoadCredential=): the TLS listener serves that certificate.
    let gw = Gateway::start_with_env(
        &config,
        &[(
            "CREDENTIALS_DIRECTORY",
            credentials.path().to_str().unwrap(),
        )],
    )
    .await;
    let connector =
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(pki.client_config_with(None)));
    let tcp = tokio::net::TcpStream::connect(gw.tls_addr.unwrap())
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from(GATEWAY_NAME).unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
    tls.write_all(b"CONNECT denied.example:443 HTTP/1.1\r\nHost: denied.example:443\r\n\r\n")
        .await
        .unwrap();
    let head = read_head_bytes(&mut tls).await.unwrap();
    assert_eq!(status_of(&head), 403, "{}", String::from_utf8_lossy(&head));
}
