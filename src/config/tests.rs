//! The config compiler as a whole: files in, `Config` or every problem with its place out.

use super::*;
use crate::policy::Mode;

#[test]
fn empty_file_is_the_builtin_gateway() {
    let c = Config::builtin();
    assert_eq!(
        c.listen.proxy,
        vec!["0.0.0.0:3128".parse::<SocketAddr>().unwrap()]
    );
    assert_eq!(c.listen.clients.len(), DEFAULT_CLIENTS.len());
    assert_eq!(c.profiles, vec!["azure-file-sync"]);
    assert_eq!(c.policy.mode, Mode::Enforce);
    assert!(
        c.policy
            .rules
            .iter()
            .any(|r| r.name == "azure-file-sync/storage")
    );
    assert_eq!(c.timeouts.head, Duration::from_secs(10));
    assert_eq!(c.timeouts.idle, Duration::from_secs(900));
    assert_eq!(c.log.format, LogFormat::Text);
}

#[test]
fn a_full_file_compiles() {
    let c = Config::parse(
        r#"
[listen]
proxy = ["127.0.0.1:0", "[::1]:0"]
clients = ["10.1.0.0/16", "192.0.2.7"]

[policy]
mode = "report"
profiles = ["azure-file-sync-usgov", "azure-file-sync-china"]

[[policy.allow]]
name = "contoso-pe"
category = "storage"
hosts = ["contoso.file.core.windows.net"]
private_addresses = ["10.20.0.0/16"]

[[policy.allow]]
name = "literal"
addresses = ["203.0.113.0/24"]
ports = [443, 8443]

[resolver]
servers = ["10.0.0.53", "10.0.0.54:5353"]
timeout = "2s"
hosts = { "contoso.file.core.windows.net" = "10.20.1.5", "Dual.Example" = ["10.0.0.1", "fd00::1"] }

[timeouts]
head = "500ms"
idle = "1h"

[limits]
max_connections = 10

[log]
format = "json"
"#,
        "t.toml",
        crate::config::TEST_NOW,
    )
    .unwrap();
    assert_eq!(c.policy.mode, Mode::Report);
    let pe = c
        .policy
        .rules
        .iter()
        .find(|r| r.name == "contoso-pe")
        .unwrap();
    assert_eq!(
        (pe.category.as_str(), pe.ports.as_slice()),
        ("storage", &[443][..])
    );
    let literal = c.policy.rules.iter().find(|r| r.name == "literal").unwrap();
    assert_eq!(literal.category, "other");
    assert_eq!(
        c.resolver.servers[1].addr,
        "10.0.0.54:5353".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        c.resolver.hosts[&DnsName::parse("dual.example").unwrap()].len(),
        2
    );
    assert_eq!(c.timeouts.head, Duration::from_millis(500));
    assert_eq!(c.timeouts.connect, DEFAULT_CONNECT_TIMEOUT);
    assert_eq!(c.limits.max_connections, Some(10));
    assert_eq!(c.log.format, LogFormat::Json);
}

#[test]
fn every_semantic_problem_is_listed_with_line_and_key() {
    let text = "[listen]\nproxy = [\"nonsense\"]\n\n[policy]\nprofiles = [\"azure\"]\n\n[[policy.allow]]\nname = \"x\"\nhosts = [\"bad_host.com\", \"*.ok.com\"]\nports = [0]\n\n[timeouts]\nidle = \"soon\"\n";
    let err = Config::parse(text, "bad.toml", crate::config::TEST_NOW).unwrap_err();
    let lines: Vec<String> = err.problems.iter().map(|p| p.to_string()).collect();
    let want = [
        ("bad.toml:2:10: listen.proxy[0]", "expected IP:PORT"),
        (
            "bad.toml:5:13: policy.profiles[0]",
            "unknown profile \"azure\"",
        ),
        (
            "bad.toml:9:10: policy.allow[0].hosts[0]",
            "expected a DNS name",
        ),
        (
            "bad.toml:10:10: policy.allow[0].ports[0]",
            "expected a port from 1 to 65535",
        ),
        (
            "bad.toml:13:8: timeouts.idle",
            "expected a positive duration",
        ),
    ];
    assert_eq!(lines.len(), want.len(), "{lines:#?}");
    for (line, (prefix, text)) in lines.iter().zip(want) {
        assert!(
            line.starts_with(prefix) && line.contains(text),
            "{line:?} vs {prefix} … {text}"
        );
    }
}

#[test]
fn syntax_and_unknown_keys_name_their_line() {
    let err =
        Config::parse("[listen]\nproxi = []\n", "f.toml", crate::config::TEST_NOW).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("f.toml:2:1: ") && msg.contains("unknown field `proxi`"),
        "{msg}"
    );
    let err = Config::parse(
        "[policy]\nmode = \"enforced\"\n",
        "f.toml",
        crate::config::TEST_NOW,
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("f.toml:2:8: ") && msg.contains("enforce"),
        "{msg}"
    );
    let err = Config::parse("[policy\n", "f.toml", crate::config::TEST_NOW).unwrap_err();
    assert!(err.to_string().starts_with("f.toml:1:"), "{err}");
}

#[test]
fn rules_need_a_target_and_unique_names() {
    let text = "[[policy.allow]]\nname = \"a\"\n\n[[policy.allow]]\nname = \"a\"\nhosts = [\"x.example\"]\n\n[[policy.allow]]\nname = \"azure-file-sync/storage\"\nhosts = [\"y.example\"]\n";
    let err = Config::parse(text, "f.toml", crate::config::TEST_NOW).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("f.toml:1:1: policy.allow[0]: a rule needs `hosts`"),
        "{msg}"
    );
    assert!(
        msg.contains("f.toml:5:8: policy.allow[1].name: rule name \"a\" is used twice"),
        "{msg}"
    );
    assert!(msg.contains("f.toml:9:8: policy.allow[2].name"), "{msg}");
}

#[test]
fn branch_problems_are_listed_with_their_keys() {
    let text = "[[branch]]\nname = \"a\"\ncredentials = [{ user = \"u\", password_hash = \"plain\" }]\nallow = [\"nope\"]\nmax_tunnels = 0\n\n[[branch]]\nname = \"a\"\nsources = [\"10.0.0.0/8\"]\ncredentials = [{ user = \"u\", password_hash = \"plain\" }]\n\n[[branch]]\nname = \"unassigned\"\n";
    let msg = Config::parse(text, "b.toml", crate::config::TEST_NOW)
        .unwrap_err()
        .to_string();
    for want in [
        "b.toml:3:46: branch[0].credentials[0].password_hash: expected an argon2id hash",
        "b.toml:4:10: branch[0].allow[0]: no rule named \"nope\"",
        "b.toml:5:15: branch[0].max_tunnels: expected a number above 0",
        "b.toml:8:8: branch[1].name: branch name \"a\" is used twice",
        "b.toml:10:25: branch[1].credentials[0].user: user \"u\" is defined twice",
        "b.toml:13:8: branch[2].name",
        "b.toml:12:1: branch[2]: a branch needs `sources`, `credentials` or `client_certificates`",
    ] {
        assert!(msg.contains(want), "missing {want:?} in:\n{msg}");
    }
}

#[test]
fn static_host_values_must_be_addresses() {
    let err = Config::parse(
        "[resolver]\nhosts = { \"a.example\" = \"not-an-ip\", \"b_.x\" = \"10.0.0.1\" }\n",
        "f.toml",
        crate::config::TEST_NOW,
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("resolver.hosts.\"a.example\""), "{msg}");
    assert!(msg.contains("resolver.hosts.\"b_.x\""), "{msg}");
}

#[test]
fn an_unknown_key_suggests_the_nearest_known_one() {
    let text = "[[policy.allow]]\nname = \"x\"\nhosts = [\"a.example\"]\nport = [443]\n";
    let err = Config::parse(text, "k.toml", crate::config::TEST_NOW).unwrap_err();
    let shown = err.to_string();
    assert!(
        shown.starts_with("k.toml:4:1: policy.allow[0].port: unknown field `port`"),
        "{shown}"
    );
    assert!(shown.ends_with("did you mean `ports`?"), "{shown}");
    // Nothing near: no guess.
    let err = Config::parse(
        "[listen]\nzzzzzzzz = 1\n",
        "k.toml",
        crate::config::TEST_NOW,
    )
    .unwrap_err();
    assert!(!err.to_string().contains("did you mean"), "{err}");
}

#[test]
fn cidrs_with_host_bits_are_refused_with_what_they_would_mean() {
    let err = Config::parse(
        "[listen]\nclients = [\"10.20.0.1/8\", \"10.0.0.0/8\", \"192.0.2.7\"]\n",
        "c.toml",
        crate::config::TEST_NOW,
    )
    .unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    assert_eq!(
        err.to_string(),
        "c.toml:2:12: listen.clients[0]: \"10.20.0.1/8\" has host bits set: write \"10.0.0.0/8\" for the network or \"10.20.0.1/32\" for the one address"
    );
}

#[test]
fn an_unreadable_file_is_named_without_a_position() {
    let err = Config::load(Path::new("/nonexistent/p.toml"), crate::config::TEST_NOW).unwrap_err();
    let shown = err.to_string();
    assert!(
        shown.starts_with("/nonexistent/p.toml: cannot read the file"),
        "{shown}"
    );
}

/// The one problem a file with a type error gives, as printed.
fn type_error(text: &str) -> String {
    let err = Config::parse(text, "t.toml", crate::config::TEST_NOW).unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    err.to_string()
}

#[test]
fn type_errors_name_line_column_and_key_in_our_words() {
    let rule = "[[policy.allow]]\nname = \"x\"\nhosts = [\"a.example\"]\n";
    for (text, want) in [
        // An integer out of range.
        (
            format!("{rule}ports = [443, 70000]\n"),
            "t.toml:4:15: policy.allow[0].ports[1]: 70000: expected a port from 1 to 65535",
        ),
        (
            "[limits]\nmax_connections = -1\n".to_owned(),
            "t.toml:2:19: limits.max_connections: -1: expected a whole number from 0 to 4294967295",
        ),
        (
            "[limits]\nipv6_client_prefix = 300\n".to_owned(),
            "t.toml:2:22: limits.ipv6_client_prefix: 300: expected a prefix length from 1 to 128",
        ),
        (
            "[limits]\nthrottle_queue = \"5ms\"\n".to_owned(),
            "t.toml:2:18: limits.throttle_queue: expected a duration from 20ms to 10s, or \"off\"",
        ),
        // A string for an integer.
        (
            format!("{rule}ports = [\"https\"]\n"),
            "t.toml:4:10: policy.allow[0].ports[0]: \"https\": expected a port from 1 to 65535",
        ),
        // An integer for a string: a name, a duration.
        (
            "[[branch]]\nname = 7\n".to_owned(),
            "t.toml:2:8: branch[0].name: 7: expected a string",
        ),
        (
            "[timeouts]\nidle = 900\n".to_owned(),
            "t.toml:2:8: timeouts.idle: 900: expected a duration such as \"10s\", \"15m\" or \"1h\"",
        ),
        // A boolean.
        (
            "[resolver]\nhosts_only = \"yes\"\n".to_owned(),
            "t.toml:2:14: resolver.hosts_only: \"yes\": expected true or false",
        ),
        (
            format!("{rule}plain_http = 1\n"),
            "t.toml:4:14: policy.allow[0].plain_http: 1: expected true or false",
        ),
        // A list.
        (
            "[listen]\nclients = \"10.0.0.0/8\"\n".to_owned(),
            "t.toml:2:11: listen.clients: \"10.0.0.0/8\": expected a list of strings",
        ),
        (
            "[listen]\nproxy = [3128]\n".to_owned(),
            "t.toml:2:10: listen.proxy[0]: 3128: expected a string",
        ),
        (
            format!("{rule}ports = 443\n"),
            "t.toml:4:9: policy.allow[0].ports: 443: expected a list of ports such as [443]",
        ),
        // A table, a list of tables, a name from a set.
        (
            "tls = \"cert.pem\"\n".to_owned(),
            "t.toml:1:7: tls: \"cert.pem\": expected a table",
        ),
        (
            "branch = 1\n".to_owned(),
            "t.toml:1:10: branch: 1: expected [[branch]] tables",
        ),
        (
            format!("{rule}sni = \"strict\"\n"),
            "t.toml:4:7: policy.allow[0].sni: \"strict\": expected \"match\", \"allowed\" or \"off\"",
        ),
        (
            "[log]\nformat = 1\n".to_owned(),
            "t.toml:2:10: log.format: expected \"text\" or \"json\"",
        ),
        // The second of two array tables; a missing key.
        (
            format!("{rule}\n[[policy.allow]]\nname = \"y\"\nports = [1.5]\n"),
            "t.toml:7:10: policy.allow[1].ports[0]: 1.5: expected a port from 1 to 65535",
        ),
        (
            "[[branch]]\nsources = [\"10.0.0.0/8\"]\n".to_owned(),
            "t.toml:1:1: branch[0]: `name` is required",
        ),
    ] {
        assert_eq!(type_error(&text), want, "for:\n{text}");
    }
}

#[test]
fn a_branch_source_outside_listen_clients_is_a_warning() {
    let text = "[listen]\nclients = [\"10.1.0.0/16\", \"10.2.0.0/16\"]\n\n[[branch]]\nname = \"paris\"\nsources = [\"10.1.0.0/16\", \"192.0.2.0/24\", \"10.2.0.0/15\"]\n";
    let config = Config::parse(text, "w.toml", crate::config::TEST_NOW).unwrap();
    let shown: Vec<String> = config.warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(shown.len(), 2, "{shown:#?}");
    assert!(
        shown[0].starts_with(
            "w.toml:6:27: branch[0].sources[1]: \"192.0.2.0/24\" lies outside listen.clients"
        ),
        "{shown:#?}"
    );
    assert!(
        shown[1].starts_with(
            "w.toml:6:43: branch[0].sources[2]: \"10.2.0.0/15\" lies partly outside listen.clients"
        ),
        "{shown:#?}"
    );
    assert!(Config::builtin().warnings.is_empty());
    let inside = "[[branch]]\nname = \"a\"\nsources = [\"10.1.0.0/16\", \"192.168.0.0/16\"]\n";
    let config = Config::parse(inside, "w.toml", crate::config::TEST_NOW).unwrap();
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
}

#[test]
fn a_network_identifies_one_branch() {
    let text = "[[branch]]\nname = \"paris\"\nsources = [\"10.1.0.0/16\"]\n\n[[branch]]\nname = \"lyon\"\nsources = [\"10.2.0.0/16\", \"10.1.0.0/16\"]\n";
    let problems = Config::parse(text, "b.toml", crate::config::TEST_NOW)
        .err()
        .unwrap()
        .to_string();
    assert!(
        problems.contains(
            "b.toml:7:27: branch[1].sources[1]: 10.1.0.0/16 is a source of branch \"paris\" (branch[0].sources[0]) already: a network identifies one branch"
        ),
        "{problems}"
    );
    // Nested networks are fine: the most specific one wins.
    let nested = "[[branch]]\nname = \"wide\"\nsources = [\"10.0.0.0/8\"]\n\n[[branch]]\nname = \"narrow\"\nsources = [\"10.1.4.0/24\"]\n";
    let config = Config::parse(nested, "b.toml", crate::config::TEST_NOW).unwrap();
    let branch = |ip: &str| {
        let (_, id) = config
            .branch_sources
            .longest_match(ip.parse().unwrap())
            .unwrap();
        config.branches[id.index()].name.clone()
    };
    assert_eq!(branch("10.1.4.9"), "narrow");
    assert_eq!(branch("10.1.5.9"), "wide");
}

#[test]
fn encrypted_dns_servers_parse_in_their_three_shapes() {
    use crate::config::{DnsServer, DnsTransport};
    let ok = |text: &str| DnsServer::parse(text).unwrap();
    assert_eq!(ok("10.0.0.53").addr, "10.0.0.53:53".parse().unwrap());
    let tls = ok("tls://10.0.0.53#dns.corp.example");
    assert_eq!(tls.addr, "10.0.0.53:853".parse().unwrap());
    assert_eq!(
        tls.transport,
        DnsTransport::Tls {
            name: "dns.corp.example".into()
        }
    );
    let https = ok("https://[2001:db8::53]:8443#dns.corp.example");
    assert_eq!(https.addr, "[2001:db8::53]:8443".parse().unwrap());
    assert_eq!(
        https.transport,
        DnsTransport::Https {
            name: "dns.corp.example".into(),
            path: "/dns-query".into()
        }
    );
    assert_eq!(
        ok("https://10.0.0.53/resolve#d.example").to_string(),
        "https://10.0.0.53:443/resolve#d.example"
    );
    for (bad, why) in [
        ("tls://10.0.0.53", "needs the name its certificate carries"),
        ("tls://dns.example#dns.example", "not an IP address"),
        ("quic://10.0.0.53#d.example", "unknown scheme"),
        ("https://10.0.0.53/q?x=1#d.example", "no query"),
        ("tls://10.0.0.53#bad_name!", "the name after `#`"),
    ] {
        let err = DnsServer::parse(bad).unwrap_err();
        assert!(err.contains(why), "{bad}: {err}");
    }
}

#[test]
fn encrypted_dns_needs_its_ca_and_never_mixes_with_clear_text() {
    let problems = |text: &str| {
        Config::parse(text, "r.toml", crate::config::TEST_NOW)
            .unwrap_err()
            .to_string()
    };
    let msg = problems("[resolver]\nservers = [\"tls://10.0.0.53#dns.example\"]\n");
    assert!(msg.contains("r.toml:2:12: resolver.ca"), "{msg}");
    assert!(msg.contains("no built-in roots"), "{msg}");
    let msg = problems(
        "[resolver]\nservers = [\"tls://10.0.0.53#d.example\", \"10.0.0.54\"]\nca = \"ca.pem\"\n",
    );
    assert!(msg.contains("r.toml:2:41: resolver.servers"), "{msg}");
    assert!(msg.contains("no fallback to clear-text DNS"), "{msg}");
    let msg = problems("[resolver]\nservers = [\"10.0.0.53\"]\nca = \"ca.pem\"\n");
    assert!(msg.contains("r.toml:3:6: resolver.ca"), "{msg}");
    let c = Config::parse(
        "[resolver]\nservers = [\"https://10.0.0.53#d.example\"]\nca = \"ca.pem\"\n",
        "/etc/portcullis/r.toml",
        crate::config::TEST_NOW,
    )
    .unwrap();
    assert_eq!(
        c.resolver.ca.as_deref(),
        Some(std::path::Path::new("/etc/portcullis/ca.pem"))
    );
}

#[test]
fn tls_to_a_parent_needs_a_readable_ca_and_a_name_to_check() {
    let problems = |text: &str| {
        Config::parse(text, "/nonexistent/p.toml", crate::config::TEST_NOW)
            .unwrap_err()
            .to_string()
    };
    let head = "[[parent]]\nname = \"corp-1\"\n";
    let msg = problems(&format!(
        "{head}address = \"proxy1.corp.example:8080\"\ntls = {{ ca = \"corp-ca.pem\" }}\n"
    ));
    assert!(msg.contains("p.toml:4:14: parent[0].tls.ca"), "{msg}");
    assert!(
        msg.contains("/nonexistent/corp-ca.pem: cannot read the CA file"),
        "{msg}"
    );
    let msg = problems(&format!(
        "{head}address = \"10.0.0.8:8080\"\ntls = {{ ca = \"corp-ca.pem\" }}\n"
    ));
    assert!(
        msg.contains("p.toml:4:14: parent[0].tls.server_name"),
        "{msg}"
    );
    assert!(msg.contains("IP address"), "{msg}");
    let msg = problems(&format!(
        "{head}address = \"10.0.0.8:8080\"\ntls = {{ ca = \"c.pem\", server_name = \"bad name\" }}\n"
    ));
    assert!(
        msg.contains("p.toml:4:37: parent[0].tls.server_name"),
        "{msg}"
    );
    // A CA file that holds no certificate.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty.pem"), "not a certificate\n").unwrap();
    let path = dir.path().join("p.toml");
    let msg = Config::parse(
        &format!("{head}address = \"proxy1.corp.example:8080\"\ntls = {{ ca = \"empty.pem\" }}\n"),
        path.to_str().unwrap(),
        crate::config::TEST_NOW,
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("no certificate in the CA file"), "{msg}");
    // A CA read: the name checked is the address's host unless one is written.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params.self_signed(&key).unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    let parse = |address: &str, extra: &str| {
        Config::parse(
            &format!("{head}address = \"{address}\"\ntls = {{ ca = \"ca.pem\"{extra} }}\n"),
            path.to_str().unwrap(),
            crate::config::TEST_NOW,
        )
        .unwrap()
    };
    let c = parse("Proxy1.corp.example:8080", "");
    let tls = c.egresses.parents[0].tls.as_ref().unwrap();
    assert_eq!(tls.server_name.to_str(), "proxy1.corp.example");
    assert_eq!(tls.ca, dir.path().join("ca.pem"));
    let c = parse("10.0.0.8:8080", ", server_name = \"proxy1.corp.example\"");
    let tls = c.egresses.parents[0].tls.as_ref().unwrap();
    assert_eq!(tls.server_name.to_str(), "proxy1.corp.example");
}
