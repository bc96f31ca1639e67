//! Learned-destination fixtures, shared by the learned and fleet tests: two branches by source
//! address, a rule learning `*.file.core.windows.net`, origins answering to account names, and
//! the CLI and admin calls an operator makes.

use super::*;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

pub const LONDON: &str = "127.0.0.2";

pub const PARIS: &str = "127.0.0.3";

pub fn account(n: u32) -> String {
    format!("acct{n}.file.core.windows.net")
}

/// Two branches by source address, one rule learning `*.file.core.windows.net` on the origin's
/// port, `accounts` names resolving to 127.0.0.1.
pub fn learning_config(state: &Path, port: u16, learn: &str, accounts: u32) -> GatewayConfig {
    let config = GatewayConfig::new()
        .state_dir(state)
        .rule(
            Rule::new("accounts")
                .category("storage")
                .hosts(&["*.file.core.windows.net"])
                .ports(&[port])
                .private_addresses(&["127.0.0.1/32"])
                .set("learn", learn),
        )
        .branch(Branch::new("london").sources(&[format!("{LONDON}/32")]))
        .branch(Branch::new("paris").sources(&[format!("{PARIS}/32")]));
    (0..accounts).fold(config, |config, n| config.resolve(&account(n), "127.0.0.1"))
}

/// A TLS origin answering to the first `accounts` account names.
pub async fn origin_for(pki: &Pki, accounts: u32) -> Origin {
    let names: Vec<String> = (0..accounts).map(account).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    Origin::start_named(pki, &name_refs).await
}

/// A GET through the gateway from `from` to `host` on the origin: the status it got, or the
/// status of the refused CONNECT.
pub async fn fetch(pki: &Pki, gw: SocketAddr, from: &str, host: &str, port: u16) -> u16 {
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(format!("http://{gw}")).unwrap())
        .tls_backend_preconfigured(pki.client_config())
        .pool_max_idle_per_host(0)
        .local_address(from.parse::<std::net::IpAddr>().unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let url = format!("https://{host}:{port}/download?bytes=16");
    match client.get(url).send().await {
        Ok(resp) => resp.status().as_u16(),
        Err(_) => {
            let (_, reply) = connect_from(gw, from, &format!("{host}:{port}"), "").await;
            reply.status
        }
    }
}

pub async fn admin_text(admin: SocketAddr, path: &str) -> String {
    admin_get(admin, path).await.body
}

pub async fn stop(gw: &mut Gateway) {
    gw.signal("TERM");
    let status = gw.wait_exit(Duration::from_secs(20)).await.expect("stops");
    assert!(status.success(), "{status}");
}

pub fn cli(args: &[&str]) -> (bool, String, String) {
    let out = portcullis(args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits up to 10 s for `from`'s fetch of `host` through `gw` to get `want`.
pub async fn eventually(pki: &Pki, gw: SocketAddr, from: &str, host: &str, port: u16, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = fetch(pki, gw, from, host, port).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{host} from {from}: {got}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The hosts in a state file (empty when there is none yet).
pub fn state_file_hosts(state: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(state.join("learned.json")) else {
        return Vec::new();
    };
    let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
    parsed["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["host"].as_str().unwrap().to_owned())
        .collect()
}
