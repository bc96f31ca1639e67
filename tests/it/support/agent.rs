//! The branch agent's fixtures, shared by the Linux (`agent.rs`) and Windows (`windows.rs`)
//! tests: the PKI files it and its gateway use, that gateway's config, curl through the agent,
//! and the rows of a `check --json` report.

use super::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;

/// A second name the test origin answers to (and the gateway allows).
pub const SECOND_HOST: &str = "eastus01.afs.azure.net";
/// A name the gateway maps to the origin but no rule allows on the origin's port.
pub const DENIED_HOST: &str = "denied.file.core.windows.net";
/// The certificate name of the branch london.
pub const BRANCH_CERT_NAME: &str = "london-fs1.contoso.example";

/// Test PKI files: CA, the gateway's certificate (for 127.0.0.1), the branch's client certificate.
pub struct AgentFiles {
    pub dir: tempfile::TempDir,
}

impl AgentFiles {
    pub fn new(pki: &Pki) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pki.issue_pem(&["gateway.test", "127.0.0.1"], 2099);
        std::fs::write(dir.path().join("gateway.pem"), cert).unwrap();
        std::fs::write(dir.path().join("gateway.key"), key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).unwrap();
        let (cert, key) = pki.issue_pem(&[BRANCH_CERT_NAME], 2099);
        std::fs::write(dir.path().join("branch.pem"), cert).unwrap();
        std::fs::write(dir.path().join("branch.key"), key).unwrap();
        Self { dir }
    }

    /// The CA, branch certificate and key paths, as `check` and `forward` take them.
    pub fn identity(&self) -> (String, String, String) {
        (
            self.path("ca.pem"),
            self.path("branch.pem"),
            self.path("branch.key"),
        )
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

/// A gateway config: TLS listener on `tls_port` (0: any) requiring client certificates from the
/// test CA, branch london by certificate and berlin by credentials, the origin's two names
/// allowed on its port, and all three names mapped to 127.0.0.1.
pub fn agent_gateway_config(files: &AgentFiles, origin_port: u16, tls_port: u16) -> GatewayConfig {
    let hash = portcullis::config::password::hash_password("s3cret").unwrap();
    let dir = files.dir.path();
    GatewayConfig::for_origin(origin_port)
        .tls_listener(&format!("127.0.0.1:{tls_port}"), Some("required"))
        .rule(
            Rule::new("second")
                .category("sync")
                .hosts(&[SECOND_HOST])
                .ports(&[origin_port])
                .private_addresses(&["127.0.0.1/32"]),
        )
        .tls("certificate", dir.join("gateway.pem"))
        .tls("key", dir.join("gateway.key"))
        .tls("client_ca", dir.join("ca.pem"))
        .branch(Branch::new("london").client_certificates(&[BRANCH_CERT_NAME]))
        .branch(Branch::new("berlin").credentials("berlin-fs1", &hash))
        .resolve(SECOND_HOST, "127.0.0.1")
        .resolve(DENIED_HOST, "127.0.0.1")
}

/// The row for `host` in a `check --json` report.
pub fn report_row<'a>(report: &'a Value, host: &str) -> &'a Value {
    report["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["host"] == host)
        .unwrap_or_else(|| panic!("no row for {host} in {report:#}"))
}

/// curl through the agent to the origin: downloads `bytes` and checks them against the
/// origin's hash. Returns the verified length.
pub async fn curl_through(agent: SocketAddr, ca: &str, origin_port: u16, bytes: usize) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body");
    let headers = dir.path().join("headers");
    let url = format!("https://{ORIGIN_HOST}:{origin_port}/download?bytes={bytes}");
    let status = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "20", "-x", &format!("http://{agent}")])
            .args(["--cacert", ca, "-o"])
            .arg(&body)
            .arg("-D")
            .arg(&headers)
            .arg(&url)
            .status(),
    )
    .await
    .expect("curl finishes")
    .expect("run curl");
    assert!(status.success(), "curl through the agent: {status}");
    let got = std::fs::read(&body).unwrap();
    let head = std::fs::read_to_string(&headers)
        .unwrap()
        .to_ascii_lowercase();
    let want = head
        .lines()
        .find_map(|l| l.strip_prefix("x-sha256: "))
        .expect("the origin's hash header")
        .trim()
        .to_owned();
    assert_eq!(sha256_hex(&got), want);
    got.len()
}
