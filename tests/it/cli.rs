//! The command line: check-config, explain, and every example in config/ loading cleanly.

use crate::support::{Pki, portcullis, temp_file};
use std::path::Path;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn every_example_config_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut seen = 0;
    let entries = std::fs::read_dir(root.join("config"))
        .unwrap()
        .chain(std::fs::read_dir(root.join("docker")).unwrap());
    for entry in entries {
        let path = entry.unwrap().path();
        // config/agent*.toml are the branch agent's, not gateway configs (tests/it/agent.rs,
        // tests/it/windows.rs).
        if path.extension().is_some_and(|e| e == "toml")
            && path
                .file_name()
                .and_then(|n| n.to_str())
                .is_none_or(|n| !n.starts_with("agent"))
        {
            let out = portcullis(&["check-config", path.to_str().unwrap()]);
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                text(&out.stderr)
            );
            assert!(
                text(&out.stdout).contains("rules ("),
                "{}",
                text(&out.stdout)
            );
            seen += 1;
        }
    }
    assert!(seen >= 3, "config/ holds the examples ({seen} found)");
}

#[test]
fn check_config_prints_the_effective_policy() {
    let (_dir, path) = temp_file(
        "ok.toml",
        "[[policy.allow]]\nname = \"pe\"\ncategory = \"storage\"\nhosts = [\"contoso.file.core.windows.net\"]\nprivate_addresses = [\"10.20.0.0/16\"]\n",
    );
    let out = portcullis(&["check-config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out.stdout);
    for want in [
        "mode: enforce",
        "profiles: azure-file-sync",
        "categories: graph, login, management, revocation, storage, sync",
        "azure-file-sync/storage  [storage]  ports 443",
        "hosts: *.core.windows.net",
        "azure-file-sync/revocation  [revocation]  ports 80",
        "pe  [storage]  ports 443  from config",
        "private_addresses: 10.20.0.0/16",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
}

#[test]
fn check_config_shows_each_rules_sni_check_on_every_port() {
    let (_dir, path) = temp_file(
        "sni.toml",
        "[policy]\nprofiles = []\n\n[[policy.allow]]\nname = \"custom-port\"\nhosts = [\"a.example.com\"]\nports = [8443]\nsni = \"match\"\n\n[[policy.allow]]\nname = \"mixed\"\nhosts = [\"b.example.com\"]\nports = [443, 8443]\n\n[[policy.allow]]\nname = \"crl\"\nhosts = [\"crl.example.com\"]\nports = [80]\nplain_http = true\n",
    );
    let out = portcullis(&["check-config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let rule = |name: &str| {
        let start = stdout
            .find(&format!("  {name}  ["))
            .unwrap_or_else(|| panic!("no rule {name} in:\n{stdout}"));
        stdout[start..]
            .lines()
            .nth(2)
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    // A rule's own `sni` holds on any port; the policy default only on 443.
    assert_eq!(rule("custom-port"), "sni: match", "{stdout}");
    assert_eq!(rule("mixed"), "sni: match on 443, off on 8443", "{stdout}");
    assert_eq!(rule("crl"), "sni: - (plain-HTTP lane)", "{stdout}");
}

#[test]
fn check_config_prints_the_whole_effective_config() {
    let pki = Pki::new();
    let (cert, key) = pki.issue_pem(&["gateway.example"], 2099);
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [("gw.pem", &cert), ("gw.key", &key), ("ca.pem", &pki.ca_pem)] {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let path = dir.path().join("full.toml");
    // Two users, one hash each: the user names are shown, the hashes never.
    let hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$0hJrkBA6mR2fSRqj3DTDwvR4Yz2GXhyPGSIDfTT/0Pc";
    std::fs::write(
        &path,
        format!(
            r#"[listen]
proxy = ["127.0.0.1:3128"]
admin = "off"
clients = ["10.1.0.0/16", "192.0.2.10/32"]
proxy_protocol_from = ["192.0.2.10"]

[[listen.tls_proxy]]
address = "127.0.0.1:3129"

[[listen.tls_proxy]]
address = "127.0.0.1:3130"
client_certificates = "optional"

[tls]
certificate = "gw.pem"
key = "gw.key"
client_ca = "ca.pem"
handshake_timeout = "5s"

[log]
format = "json"
access_file = "access.log"

[limits]
max_connections = 100
connect_rate_per_client = 20

[timeouts]
idle = "1h"
drain = "500ms"

[resolver]
servers = ["10.1.0.53"]
timeout = "2s"
hosts = {{ "contoso.file.core.windows.net" = ["10.20.1.5", "10.20.1.6"] }}

[policy]
on_reload = "close-denied"

[[branch]]
name = "paris"
sources = ["10.1.4.0/24"]
credentials = [{{ user = "alice", password_hash = "{hash}" }}, {{ user = "bob", password_hash = "{hash}" }}]
client_certificates = ["paris.branch.example"]
max_tunnels = 50

[[schedule]]
name = "office"
days = "mon-fri"
hours = "08:00-18:00"
time_zone = "Europe/Paris"
upload = "10 Mbit/s"
"#
        ),
    )
    .unwrap();
    let out = portcullis(&["check-config", path.to_str().unwrap()]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(stderr, "", "a clean file gives no warning");
    let folder = dir.path().display();
    for want in [
        "listen:\n  proxy: 127.0.0.1:3128\n".to_owned(),
        "  tls_proxy: 127.0.0.1:3129 (client certificates: required), 127.0.0.1:3130 (client certificates: optional)\n".into(),
        "  admin: off\n".into(),
        "  clients: 10.1.0.0/16, 192.0.2.10/32\n".into(),
        "  proxy_protocol_from: 192.0.2.10/32\n".into(),
        format!("tls:\n  certificate: {folder}/gw.pem\n  key: {folder}/gw.key\n  client_ca: {folder}/ca.pem\n  handshake_timeout: 5s\n"),
        format!("log:\n  format: json\n  access_file: {folder}/access.log (SIGUSR1 reopens it)\n  on_write_failure: keep-serving (lost lines are counted; serving goes on)\n"),
        "limits:\n  max_connections: 100\n  connect_rate_per_client: 20 per second\n  auth_attempts_per_minute: 30\n  max_pending_heads_per_client: 64 (late heads: not in 1s, or at once with under a quarter of the places free)\n  ipv6_client_prefix: 64\n".into(),
        "timeouts:\n  head: 10s\n  connect: 10s (over all of a name's addresses, raced: the next starts after attempt_delay 250ms, or at once when one fails)\n  idle: 1h\n  drain: 500ms\n".into(),
        "resolver:\n  servers: 10.1.0.53:53\n  timeout: 2s\n  hosts_only: false\n  hosts (1):\n    contoso.file.core.windows.net = 10.20.1.5, 10.20.1.6\n".into(),
        "mode: enforce\n".into(),
        "sni: match".into(),
        "on_reload: close-denied".into(),
        "  paris  sources 10.1.4.0/24  users alice, bob  certificates paris.branch.example  rules all  max_tunnels 50\n".into(),
        "unassigned clients: refused\n".into(),
        "schedules (1,".into(),
        "  office  mon-fri 08:00-18:00 Europe/Paris".into(),
        "    sni: match\n".into(),
    ] {
        assert!(stdout.contains(&want), "missing {want:?} in:\n{stdout}");
    }
    assert!(!stdout.contains("argon2"), "no hash is printed:\n{stdout}");
}

#[test]
fn check_config_warns_about_branch_sources_outside_listen_clients() {
    let (_dir, path) = temp_file(
        "w.toml",
        "[listen]\nclients = [\"10.1.0.0/16\"]\n\n[[branch]]\nname = \"paris\"\nsources = [\"10.1.4.0/24\", \"192.0.2.0/24\"]\n\n[[branch]]\nname = \"lyon\"\nsources = [\"10.0.0.0/8\"]\n",
    );
    let out = portcullis(&["check-config", path.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "a warning, not a problem: {stderr}"
    );
    let file = path.display();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines[0].starts_with(&format!(
            "portcullis: warning: {file}:6:27: branch[0].sources[1]: \"192.0.2.0/24\" lies outside listen.clients: clients from it are refused before branch identification"
        )),
        "{stderr}"
    );
    assert!(
        lines[1].starts_with(&format!(
            "portcullis: warning: {file}:10:12: branch[1].sources[0]: \"10.0.0.0/8\" lies partly outside listen.clients"
        )),
        "{stderr}"
    );
    assert!(text(&out.stdout).contains("  paris  sources 10.1.4.0/24, 192.0.2.0/24"));
}

#[test]
fn check_config_names_the_key_of_a_type_error() {
    let (_dir, path) = temp_file(
        "t.toml",
        "[[policy.allow]]\nname = \"x\"\nhosts = [\"a.example.com\"]\nports = [70000]\n",
    );
    let out = portcullis(&["check-config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        text(&out.stderr),
        format!(
            "portcullis: invalid configuration:\n{}:4:10: policy.allow[0].ports[0]: 70000: expected a port from 1 to 65535\n",
            path.display()
        )
    );
}

#[test]
fn check_config_lists_every_problem_and_exits_64() {
    let (_dir, path) = temp_file(
        "bad.toml",
        "[listen]\nclients = [\"10.0.0.0/33\"]\n\n[[policy.allow]]\nname = \"x\"\nhosts = [\"*.bad_suffix.com\"]\nports = [0]\n\n[timeouts]\nhead = \"-3s\"\n",
    );
    let out = portcullis(&["check-config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = text(&out.stderr);
    let file = path.display().to_string();
    for want in [
        format!("{file}:2:12: listen.clients[0]"),
        format!("{file}:6:10: policy.allow[0].hosts[0]"),
        format!("{file}:7:10: policy.allow[0].ports[0]: expected a port from 1 to 65535"),
        format!("{file}:10:8: timeouts.head"),
    ] {
        assert!(stderr.contains(&want), "missing {want:?} in:\n{stderr}");
    }
    // serve refuses the same file with the same code, before binding anything.
    let out = portcullis(&["serve", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let out = portcullis(&["check-config", "/nonexistent/portcullis.toml"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out.stderr).contains("cannot read the file"));
}

#[test]
fn explain_shows_decision_rule_addresses_and_wall() {
    let (_dir, path) = temp_file(
        "e.toml",
        "[[policy.allow]]\nname = \"pe\"\ncategory = \"storage\"\nhosts = [\"contoso.file.core.windows.net\"]\nprivate_addresses = [\"10.20.0.0/16\"]\n\n[resolver]\nhosts_only = true\n[resolver.hosts]\n\"contoso.file.core.windows.net\" = [\"10.20.1.5\", \"10.99.0.1\"]\n\"sneaky.file.core.windows.net\" = \"169.254.169.254\"\n",
    );
    let config = path.to_str().unwrap();

    let out = portcullis(&[
        "explain",
        "--config",
        config,
        "--from",
        "10.1.2.3",
        "contoso.file.core.windows.net:443",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    for want in [
        "client:   10.1.2.3 allowed",
        "verdict:  allow (allowed)",
        "rule:     pe (from config)",
        "category: storage",
        "addresses (override):",
        "10.20.1.5  ok",
        "10.99.0.1  refused: private",
        "result:   tunnel to 10.20.1.5 port 443",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }

    let out = portcullis(&[
        "explain",
        "--config",
        config,
        "sneaky.file.core.windows.net:443",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("rule:     azure-file-sync/storage"),
        "{stdout}"
    );
    assert!(
        stdout.contains("169.254.169.254  refused: link-local"),
        "{stdout}"
    );
    assert!(
        stdout.contains("result:   403 destination address forbidden (link-local)"),
        "{stdout}"
    );

    let out = portcullis(&[
        "explain",
        "--config",
        config,
        "--from",
        "203.0.113.9",
        "management.azure.com:443",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("NOT allowed"));

    let out = portcullis(&["explain", "--config", config, "evil.example:443"]);
    assert!(text(&out.stdout).contains("verdict:  deny (host not allowed)"));
    assert!(text(&out.stdout).contains("result:   403 host not allowed"));

    let out = portcullis(&["explain", "management.azure.com"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out.stderr).contains("request target has no port"));
}

#[test]
fn explain_takes_the_gateways_path_for_plain_http_hosts() {
    let (_dir, path) = temp_file(
        "lane.toml",
        "[resolver]\nhosts_only = true\n[resolver.hosts]\n\"crl.microsoft.com\" = \"52.0.0.1\"\n",
    );
    let config = path.to_str().unwrap();
    // CONNECT to a revocation host is refused, as the gateway refuses it (issue 14).
    let out = portcullis(&["explain", "--config", config, "crl.microsoft.com:80"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(
            "verdict:  deny (plain-HTTP host: only GET, HEAD or OCSP POST through the proxy)"
        ),
        "{stdout}"
    );
    assert!(
        !stdout.contains("addresses"),
        "decided before any lookup: {stdout}"
    );
    // The same host as the lane serves it.
    let out = portcullis(&[
        "explain",
        "--config",
        config,
        "http://crl.microsoft.com/pki/crl/products/x.crl",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("target:   crl.microsoft.com:80 (plain HTTP (lane))"),
        "{stdout}"
    );
    assert!(
        stdout.contains("rule:     azure-file-sync/revocation"),
        "{stdout}"
    );
    assert!(
        stdout.contains("result:   forwarded to 52.0.0.1 port 80"),
        "{stdout}"
    );
}
