//! DNS over TLS and over HTTPS against a real resolver (Debian's `unbound`, started by each test
//! on loopback with a certificate from the test CA): answers are used, a resolver the CA does not
//! vouch for is a named trust failure, and a stopped resolver gives 504 without any clear-text
//! query.

use crate::support::*;
use std::time::Duration;

/// The gateway asks `server` (a `resolver.servers` entry), trusting the CA in `ca_pem`.
fn config(origin_port: u16, server: &str, ca: &std::path::Path) -> GatewayConfig {
    GatewayConfig::for_origin(origin_port)
        .no_resolver()
        .extra(&format!(
            "[resolver]\nservers = [{}]\nca = {}\ntimeout = \"3s\"\n",
            server.to_toml(),
            ca.to_toml()
        ))
}

async fn connect_reply(gw: std::net::SocketAddr, target: &str) -> Reply {
    raw_request(
        gw,
        format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes(),
    )
    .await
}

#[tokio::test]
async fn answers_over_tls_and_over_https_are_used() {
    let pki = Pki::new();
    let origin = Origin::start(&pki).await;
    let dns = Unbound::start(&pki, &[&format!("{ORIGIN_HOST}. A 127.0.0.1")]);
    let (_dir, ca) = temp_file("resolver-ca.pem", &pki.ca_pem);
    for server in [dns.tls_server(), dns.https_server()] {
        let mut gw = Gateway::start(config(origin.port(), &server, &ca)).await;
        assert_serves(&pki, gw.addr, &origin).await;
        let line = gw.access_line(|l| l["host"] == ORIGIN_HOST).await;
        assert_eq!(line["end"], "closed", "{server}: {line}");
        assert_eq!(
            line["resolved"],
            format!("127.0.0.1:{}", origin.port()),
            "{server}"
        );
    }
    let queries = dns.queries();
    assert!(
        queries.iter().any(|q| q.contains(ORIGIN_HOST)),
        "unbound logged no query for the name: {queries:?}"
    );
}

#[tokio::test]
async fn a_resolver_the_ca_does_not_vouch_for_is_a_trust_failure() {
    let pki = Pki::new();
    let origin = Origin::start(&pki).await;
    let dns = Unbound::start(&pki, &[&format!("{ORIGIN_HOST}. A 127.0.0.1")]);
    // Another CA of the same name: the resolver's certificate is not signed by it.
    let (_dir, other_ca) = temp_file("other-ca.pem", &Pki::new().ca_pem);
    for server in [dns.tls_server(), dns.https_server()] {
        let mut gw = Gateway::start(config(origin.port(), &server, &other_ca)).await;
        let reply = connect_reply(gw.addr, &format!("{ORIGIN_HOST}:{}", origin.port())).await;
        assert_eq!(reply.status, 504, "{server}: {reply:?}");
        let reason = reply.header("portcullis-error").unwrap_or_default();
        assert_eq!(
            reason,
            "cannot resolve host: TLS trust failure with the encrypted DNS resolver: the \
             certificate of dns.test.example is not signed by resolver.ca (a CA of the same name \
             but another key)",
            "{server}"
        );
        let line = gw.access_line(|l| l["host"] == ORIGIN_HOST).await;
        assert_eq!(line["end"], "dns_failed");
        assert_eq!(line["reason"], reason);
    }
}

#[tokio::test]
async fn a_stopped_encrypted_resolver_gives_504_and_no_clear_text_query() {
    let pki = Pki::new();
    let origin = Origin::start(&pki).await;
    let mut dns = Unbound::start(&pki, &[&format!("{ORIGIN_HOST}. A 127.0.0.1")]);
    let (_dir, ca) = temp_file("resolver-ca.pem", &pki.ca_pem);
    let fresh = "fresh.file.core.windows.net";
    let config = config(origin.port(), &dns.tls_server(), &ca)
        .origin_rule(|r| r.hosts(&[ORIGIN_HOST, fresh]));
    let mut gw = Gateway::start(config).await;
    assert_serves(&pki, gw.addr, &origin).await;
    dns.stop();
    // Clear-text DNS listeners where a fallback would go: the resolver's address on its own
    // port (UDP) and on port 53 when this host lets the test have it.
    let same_port = tokio::net::UdpSocket::bind(dns.tls).await.unwrap();
    let port_53 = tokio::net::UdpSocket::bind("127.0.0.1:53").await.ok();
    let reply = connect_reply(gw.addr, &format!("{fresh}:{}", origin.port())).await;
    assert_eq!(reply.status, 504, "{reply:?}");
    let reason = reply.header("portcullis-error").unwrap_or_default();
    assert!(
        reason.starts_with("cannot resolve host: encrypted DNS resolver failed"),
        "{reason}"
    );
    let line = gw.access_line(|l| l["host"] == fresh).await;
    assert_eq!(line["end"], "dns_failed");
    let mut buf = [0u8; 512];
    for socket in std::iter::once(&same_port).chain(port_53.as_ref()) {
        let got = tokio::time::timeout(Duration::from_millis(300), socket.recv_from(&mut buf));
        assert!(
            got.await.is_err(),
            "a clear-text query reached {:?}",
            socket.local_addr()
        );
    }
}
