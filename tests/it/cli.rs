//! The command line: check-config, explain, and every example in config/ loading cleanly.

use crate::support::{portcullis, temp_file};
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
        // config/agent.toml is the branch agent's, not a gateway config (tests/it/agent.rs).
        if path.extension().is_some_and(|e| e == "toml")
            && path.file_name().is_none_or(|n| n != "agent.toml")
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
