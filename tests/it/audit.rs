//! The access log as the security team's record (issue 14): written whatever the diagnostic
//! level, naming the proxy user (never the password), refusals explained in the status line.

use crate::support::*;

#[tokio::test]
async fn access_lines_are_written_whatever_the_log_level() {
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let config = config_for(port, &resolver_hosts(""));
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
    let extra = format!(
        "[[branch]]\nname = \"london\"\ncredentials = [{{ user = \"london-fs1\", password_hash = \"{hash}\" }}]\n\n{}",
        resolver_hosts("")
    );
    let mut gw = Gateway::start(&config_for(port, &extra)).await;
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
