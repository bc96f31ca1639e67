//! `portcullis learn --from-log`: real tunnels of two branches through the real gateway write
//! its JSON access file; the command lists what each branch used and proposes pinned rules,
//! which `check-config` accepts and a gateway then enforces.

use crate::support::*;
use std::path::Path;
use std::time::Duration;

/// Names the test resolves to the origin on 127.0.0.1.
const NAMES: [&str; 6] = [
    "acct1.file.core.windows.net",
    "acct2.file.core.windows.net",
    "acct3.file.core.windows.net",
    "weu.afs.azure.net",
    "neu.afs.azure.net",
    "management.azure.com",
];

/// Wildcard storage and sync rules and an exact management rule, all on the origin's port;
/// access lines in JSON to `access`. No branches: `branches` adds them.
fn gateway_config(port: u16, access: &Path) -> GatewayConfig {
    let on_port = |rule: Rule| rule.ports(&[port]).private_addresses(&["127.0.0.1/32"]);
    let config = GatewayConfig::new()
        .listen("admin", "off")
        .set("log", "format", "json")
        .set("log", "access_file", access)
        .rule(on_port(
            Rule::new("storage")
                .category("storage")
                .hosts(&["*.file.core.windows.net"]),
        ))
        .rule(on_port(
            Rule::new("sync")
                .category("sync")
                .hosts(&["*.afs.azure.net"]),
        ))
        .rule(on_port(
            Rule::new("management")
                .category("management")
                .hosts(&["management.azure.com"]),
        ));
    NAMES
        .iter()
        .fold(config, |config, name| config.resolve(name, "127.0.0.1"))
}

/// london from 127.0.0.2, paris from 127.0.0.3, each with its `allow` line when given.
fn branches(london_allow: &str, paris_allow: &str) -> String {
    format!(
        "\n[[branch]]\nname = \"london\"\nsources = [\"127.0.0.2/32\"]\n{london_allow}\n\
         \n[[branch]]\nname = \"paris\"\nsources = [\"127.0.0.3/32\"]\n{paris_allow}\n"
    )
}

/// A CONNECT from `from` to `host` on the origin's port: its status, and for a tunnel, what
/// the origin answered to "hello".
async fn tunnel(gw: &Gateway, from: &str, host: &str, port: u16) -> (u16, Vec<u8>) {
    let (mut tcp, reply) = connect_from(gw.addr, from, &format!("{host}:{port}"), "").await;
    if reply.status != 200 {
        return (reply.status, Vec::new());
    }
    (200, send_and_finish(&mut tcp, b"hello").await)
}

/// The access file's lines, once it holds `count` of them (the gateway writes each when its
/// tunnel ends).
async fn wait_lines(path: &Path, count: usize) -> String {
    for _ in 0..500 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= count {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("fewer than {count} access lines in {}", path.display());
}

/// The line after `# In [[branch]] name = "BRANCH":`, uncommented: `allow = [...]`.
fn allow_line(proposal: &str, branch: &str) -> String {
    let heading = format!("# In [[branch]] name = \"{branch}\":");
    let mut lines = proposal.lines().skip_while(|l| *l != heading).skip(1);
    let line = lines
        .next()
        .unwrap_or_else(|| panic!("no {heading}:\n{proposal}"));
    line.trim_start_matches('#').trim().to_owned()
}

#[tokio::test]
async fn learn_lists_each_branch_s_destinations_and_proposes_pinned_rules_that_hold() {
    let origin = TcpOrigin::start(b"ok").await;
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let access = dir.path().join("access.log");
    let gw = Gateway::start(gateway_config(port, &access).extra(&branches("", ""))).await;
    let used = [
        ("127.0.0.2", "acct1.file.core.windows.net"),
        ("127.0.0.2", "acct1.file.core.windows.net"),
        ("127.0.0.2", "acct2.file.core.windows.net"),
        ("127.0.0.2", "weu.afs.azure.net"),
        ("127.0.0.2", "management.azure.com"),
        ("127.0.0.3", "acct3.file.core.windows.net"),
        ("127.0.0.3", "neu.afs.azure.net"),
    ];
    for (from, host) in used {
        assert_eq!(tunnel(&gw, from, host, port).await, (200, b"ok".to_vec()));
    }
    assert_eq!(
        tunnel(&gw, "127.0.0.2", "evil.example.com", port).await.0,
        403
    );
    wait_lines(&access, used.len() + 1).await;
    drop(gw);

    let junk = dir.path().join("junk.log");
    std::fs::write(
        &junk,
        "a text line\n\n{\"target\":\"portcullis::access\",\"port\":\"x\"}\n",
    )
    .unwrap();
    let config_path = dir.path().join("ran.toml");
    std::fs::write(
        &config_path,
        gateway_config(port, &access)
            .extra(&branches("", ""))
            .to_string(),
    )
    .unwrap();
    let (access_arg, junk_arg, config_arg) = (
        access.to_str().unwrap(),
        junk.to_str().unwrap(),
        config_path.to_str().unwrap(),
    );
    let out = portcullis(&[
        "learn",
        "--from-log",
        access_arg,
        junk_arg,
        "--config",
        config_arg,
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(
        stderr.trim(),
        format!(
            "portcullis: {junk_arg}: skipped 1 lines that are not access lines\nportcullis: {junk_arg}: no JSON access lines (is the gateway's log.format \"json\"?)"
        )
    );

    // The listing: per branch, per rule, each host:port with tunnels and bytes (5 up, 2 down).
    let listed = |host: &str| -> String {
        let target = format!("{host}:{port} ");
        let line = stdout.lines().find(|l| l.contains(&target));
        line.unwrap_or_else(|| panic!("{host} not listed:\n{stdout}"))
            .to_owned()
    };
    let acct1 = listed("acct1.file.core.windows.net");
    assert!(
        acct1.contains(" 2 tunnels ") && acct1.contains(" 14 B "),
        "{acct1}"
    );
    for host in &NAMES[1..] {
        let line = listed(host);
        assert!(
            line.contains(" 1 tunnel ") && line.contains(" 7 B "),
            "{line}"
        );
    }
    assert!(
        !stdout.contains("evil.example.com"),
        "a denied request is not listed:\n{stdout}"
    );
    let london = stdout.find("# branch london\n").expect("london listed");
    let paris = stdout.find("# branch paris\n").expect("paris listed");
    assert!(london < paris, "{stdout}");
    assert!(
        stdout[london..paris].contains(
            "#   rule storage (storage)\n\
             #     acct1.file.core.windows.net:"
        ),
        "{stdout}"
    );

    // The proposal: storage pinned per branch, sync and management kept.
    assert!(
        stdout.contains(&format!(
            "[[policy.allow]]\nname = \"london-storage\"  # pinned from storage\n\
             category = \"storage\"\n\
             hosts = [\"acct1.file.core.windows.net\", \"acct2.file.core.windows.net\"]\n\
             ports = [{port}]\nprivate_addresses = [\"127.0.0.1/32\"]\n"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("name = \"paris-storage\"  # pinned from storage\ncategory = \"storage\"\nhosts = [\"acct3.file.core.windows.net\"]\n"),
        "{stdout}"
    );
    assert_eq!(stdout.matches("\n[[policy.allow]]").count(), 2, "{stdout}");
    let london_allow = allow_line(&stdout, "london");
    let paris_allow = allow_line(&stdout, "paris");
    assert_eq!(
        london_allow,
        r#"allow = ["management", "london-storage", "sync"]"#
    );
    assert_eq!(paris_allow, r#"allow = ["paris-storage", "sync"]"#);
    assert!(
        stdout.contains("# sync keeps its wildcards (*.afs.azure.net): the sync service moves a server to another region's host on failover; set learn = \"record\" on it"),
        "{stdout}"
    );

    // The whole output appended to the config, the allow lines in the branch tables: valid.
    let pinned_access = dir.path().join("pinned-access.log");
    let pinned = gateway_config(port, &pinned_access)
        .extra(&stdout)
        .extra(&branches(&london_allow, &paris_allow))
        .to_string();
    let (_keep, pinned_path) = temp_file("pinned.toml", &pinned);
    let check = portcullis(&["check-config", pinned_path.to_str().unwrap()]);
    assert_eq!(
        check.status.code(),
        Some(0),
        "{}\n{pinned}",
        String::from_utf8_lossy(&check.stderr)
    );

    // And a gateway on it holds each branch to its own storage accounts, sync still wide.
    let gw = Gateway::start(&pinned).await;
    let acct = |n: u8| format!("acct{n}.file.core.windows.net");
    assert_eq!(tunnel(&gw, "127.0.0.2", &acct(1), port).await.0, 200);
    assert_eq!(tunnel(&gw, "127.0.0.2", &acct(3), port).await.0, 403);
    assert_eq!(tunnel(&gw, "127.0.0.3", &acct(3), port).await.0, 200);
    assert_eq!(tunnel(&gw, "127.0.0.3", &acct(1), port).await.0, 403);
    assert_eq!(
        tunnel(&gw, "127.0.0.2", "neu.afs.azure.net", port).await.0,
        200
    );
}

#[test]
fn an_unreadable_log_file_is_named_with_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-access.log");
    let out = portcullis(&["learn", "--from-log", missing.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.starts_with(&format!("portcullis: {}: cannot read: ", missing.display())),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}
