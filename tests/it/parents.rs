//! Parent proxies, against a real Squid started by each test: the tunnel through it, the
//! client's credentials never reaching it, Basic to the parent, a parent's refusal passed back
//! without failover, failover when the first parent is gone, every parent down, a private
//! endpoint going direct, `address` mode, the bytes after a parent's 200 head, and TLS to a
//! parent (Squid behind stunnel's TLS port): the tunnel inside it, a certificate not trusted
//! or for another name failing over, a silent handshake timing out.

use crate::support::*;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The name the gateway resolves to a public-looking address (vetted, never dialled: the
/// parent resolves it), and Squid's hosts file to the loopback origin.
const VIA_PARENT: &str = "share1.file.core.windows.net";
/// A private endpoint: the gateway resolves it to 127.0.0.1 under a rule's
/// `private_addresses`, and dials it directly.
const PRIVATE: &str = "pe.file.core.windows.net";
const DENIED: &str = "denied.file.core.windows.net";

/// A gateway whose default egress goes through `parents` (`[[parent]]` TOML, in order).
fn config(origin_port: u16, parents: &str, egress_extra: &str) -> GatewayConfig {
    GatewayConfig::new()
        .rule(
            Rule::new("via-parent")
                .category("storage")
                .hosts(&[VIA_PARENT, DENIED])
                .ports(&[origin_port]),
        )
        .rule(Rule::origin("private-endpoint", &[origin_port]).hosts(&[PRIVATE]))
        .resolve(VIA_PARENT, "20.60.1.5")
        .resolve(DENIED, "20.60.1.6")
        .resolve(PRIVATE, "127.0.0.1")
        .policy("egress", "corp")
        .extra(&format!("{parents}\n[egress.corp]\n{egress_extra}"))
}

fn parent(name: &str, address: &str, extra: &str) -> String {
    format!("[[parent]]\nname = \"{name}\"\naddress = \"{address}\"\n{extra}\n")
}

fn squid_for_origin() -> Squid {
    Squid::start(&SquidSetup {
        hosts: &[(VIA_PARENT, "127.0.0.1"), (DENIED, "127.0.0.1")],
        deny: &[DENIED],
        ..SquidSetup::default()
    })
}

/// A TCP origin that answers `reply` to the first bytes of each connection and closes it
/// (Squid closes a tunnel on a half-close, so the client cannot wait for one); what each
/// connection sent first is reported.
struct Origin {
    addr: SocketAddr,
    received: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
}

impl Origin {
    async fn start(reply: &'static [u8]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, received) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    let n = tcp.read(&mut buf).await.unwrap_or(0);
                    let _ = tx.send(buf[..n].to_vec());
                    let _ = tcp.write_all(reply).await;
                });
            }
        });
        Self { addr, received }
    }
}

/// Through an open tunnel: sends `ping`, reads until the origin closes.
async fn exchange(mut tcp: tokio::net::TcpStream) -> Vec<u8> {
    tcp.write_all(b"ping").await.unwrap();
    let mut got = Vec::new();
    let read = tcp.read_to_end(&mut got);
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .unwrap()
        .unwrap();
    got
}

async fn connect(gw: SocketAddr, target: &str, headers: &str) -> (tokio::net::TcpStream, Reply) {
    connect_from(gw, "127.0.0.1", target, headers).await
}

/// A gateway sending through `parents` as `via` says, and a tunnel through it to the origin
/// (with `headers` on the CONNECT) that carries bytes both ways; the gateway and the target
/// stay with the caller.
async fn gateway_through(
    origin: &mut Origin,
    parents: &str,
    via: &str,
    headers: &str,
    answer: &[u8],
) -> (Gateway, String) {
    let gw = Gateway::start(config(origin.addr.port(), parents, via)).await;
    let target = format!("{VIA_PARENT}:{}", origin.addr.port());
    let (tcp, reply) = connect(gw.addr, &target, headers).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(exchange(tcp).await, answer);
    assert_eq!(origin.received.recv().await.unwrap(), b"ping");
    (gw, target)
}

/// A tunnel to the origin through `parents`' `name` carries bytes both ways, its access line
/// names the parent, and the client's own credentials never reach the parent (Squid's log).
/// The gateway and the target stay with the caller.
async fn carries_bytes_and_never_the_clients_credentials(
    origin: &mut Origin,
    squid: &Squid,
    parents: &str,
    name: &str,
    answer: &[u8],
) -> (Gateway, String) {
    let via = format!("via = [\"{name}\"]\n");
    let client_auth = basic("branch-user", "branch-secret");
    let (mut gw, target) = gateway_through(origin, parents, &via, &client_auth, answer).await;
    let log = squid.wait_log(&format!("CONNECT {target}"));
    assert!(log.contains(&format!("CONNECT {target} 200")), "{log}");
    assert!(log.contains("auth=[]") || log.contains("auth=[-]"), "{log}");
    assert!(
        !log.contains("YnJhbmNo"),
        "the client's credentials reached the parent: {log}"
    );
    let line = gw.access_line(|l| l["host"] == VIA_PARENT).await;
    assert_eq!(line["parent"], name, "{line}");
    assert_eq!(line["end"], "closed");
    assert_eq!(line["bytes_up"], 4, "{line}");
    assert_eq!(line["bytes_down"], answer.len(), "{line}");
    (gw, target)
}

#[tokio::test]
async fn a_tunnel_through_squid_carries_bytes_and_never_the_clients_credentials() {
    let mut origin = Origin::start(b"from the origin").await;
    let squid = squid_for_origin();
    let parents = parent("corp-1", &squid.address(), "");
    let (mut gw, _) = carries_bytes_and_never_the_clients_credentials(
        &mut origin,
        &squid,
        &parents,
        "corp-1",
        b"from the origin",
    )
    .await;
    let line = gw.access_line(|l| l["host"] == VIA_PARENT).await;
    assert_eq!(line["egress"], "corp");
}

#[tokio::test]
async fn basic_to_the_parent_and_a_refusal_passed_back_without_failover() {
    let mut origin = Origin::start(b"ok").await;
    let squid = Squid::start(&SquidSetup {
        hosts: &[(VIA_PARENT, "127.0.0.1"), (DENIED, "127.0.0.1")],
        deny: &[DENIED],
        basic: Some(("portcullis", "parent-secret")),
    });
    let second = squid_for_origin();
    let (_dir, good) = temp_file("parent.pass", "parent-secret\n");
    let (_dir2, bad) = temp_file("wrong.pass", "wrong\n");
    let basic_with = |file: &std::path::Path| {
        format!(
            "basic = {{ user = \"portcullis\", password_file = \"{}\" }}",
            file.display()
        )
    };
    let parents = parent("corp-1", &squid.address(), &basic_with(&good))
        + &parent("corp-2", &second.address(), "");
    let via = "via = [\"corp-1\", \"corp-2\"]\n";
    let (mut gw, target) = gateway_through(&mut origin, &parents, via, "", b"ok").await;
    let log = squid.wait_log("user=portcullis");
    assert!(log.contains("user=portcullis"), "{log}");

    // Squid refuses the name: its 403 comes back, and corp-2 is never asked.
    let denied = format!("{DENIED}:{}", origin.addr.port());
    let (_tcp, reply) = connect(gw.addr, &denied, "").await;
    assert_eq!(reply.status, 403, "{reply:?}");
    assert_eq!(
        reply.header("portcullis-error"),
        Some("parent corp-1 refused: 403")
    );
    let line = gw.access_line(|l| l["host"] == DENIED).await;
    assert_eq!(line["end"], "parent_refused");
    assert_eq!(line["parent"], "corp-1");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !second.access_log().contains("CONNECT"),
        "{}",
        second.access_log()
    );
    drop(gw);

    // The wrong password: Squid's 407 is passed back as its decision.
    let parents = parent("corp-1", &squid.address(), &basic_with(&bad));
    let mut gw = Gateway::start(config(origin.addr.port(), &parents, "via = [\"corp-1\"]\n")).await;
    let (_tcp, reply) = connect(gw.addr, &target, "").await;
    // The gateway's own credentials were refused: the branch client is not challenged.
    assert_eq!(reply.status, 502, "{reply:?}");
    assert_eq!(
        reply.header("portcullis-error"),
        Some("parent corp-1 refused: 407")
    );
    assert!(reply.header("proxy-authenticate").is_none(), "{reply:?}");
    let line = gw.access_line(|l| l["host"] == VIA_PARENT).await;
    assert_eq!(line["end"], "parent_refused");
}

#[tokio::test]
async fn failover_when_the_first_parent_is_gone_and_502_when_all_are() {
    let mut origin = Origin::start(b"ok").await;
    let mut squid = squid_for_origin();
    let gone = format!("127.0.0.1:{}", free_port());
    let parents = parent("corp-1", &gone, "") + &parent("corp-2", &squid.address(), "");
    let via = "via = [\"corp-1\", \"corp-2\"]\n";
    let (mut gw, target) = gateway_through(&mut origin, &parents, via, "", b"ok").await;
    let line = gw.access_line(|l| l["host"] == VIA_PARENT).await;
    assert_eq!(line["parent"], "corp-2");
    let metrics = gw.metrics().await;
    metrics.assert_value(
        "portcullis_parent_requests_total{parent=\"corp-1\",outcome=\"failed\"}",
        1.0,
    );
    metrics.assert_value(
        "portcullis_parent_requests_total{parent=\"corp-2\",outcome=\"tunnel\"}",
        1.0,
    );

    // Both gone: 502, and nothing reaches the origin.
    squid.stop();
    let (_tcp, reply) = connect(gw.addr, &target, "").await;
    assert_eq!(reply.status, 502, "{reply:?}");
    let reason = reply.header("portcullis-error").unwrap_or_default();
    assert!(
        reason.starts_with("no parent proxy reachable (corp-1: "),
        "{reason}"
    );
    let line = gw
        .access_line(|l| l["host"] == VIA_PARENT && l["status"] == 502)
        .await;
    assert_eq!(line["end"], "parent_unavailable");
    let nothing = tokio::time::timeout(Duration::from_millis(300), origin.received.recv());
    assert!(nothing.await.is_err(), "the origin saw a connection");

    // After three failures in a row corp-1 is skipped for its backoff, and says so.
    let (_tcp, _reply) = connect(gw.addr, &target, "").await;
    let (_tcp, reply) = connect(gw.addr, &target, "").await;
    let reason = reply.header("portcullis-error").unwrap_or_default();
    assert!(reason.contains("corp-1: down, in its backoff"), "{reason}");
    let metrics = gw.metrics().await;
    metrics.assert_value("portcullis_parent_up{parent=\"corp-1\"}", 0.0);
}

#[tokio::test]
async fn a_private_endpoint_goes_direct_and_address_mode_sends_the_vetted_ip() {
    let mut origin = Origin::start(b"ok").await;
    let squid = squid_for_origin();
    let parents = parent("corp-1", &squid.address(), "connect_target = \"address\"");
    let port = origin.addr.port();
    let config = config(port, &parents, "via = [\"corp-1\"]\n")
        // The gateway vets 127.0.0.1 for this rule as an address it lists (not a private
        // endpoint), and sends it to the parent as the target.
        .change_rule("via-parent", |r| r.addresses(&["127.0.0.1/32"]))
        .resolve(VIA_PARENT, "127.0.0.1");
    let mut gw = Gateway::start(config).await;

    let (tcp, reply) = connect(gw.addr, &format!("{PRIVATE}:{port}"), "").await;
    assert_eq!(reply.status, 200, "{reply:?} {}", squid.access_log());
    assert_eq!(exchange(tcp).await, b"ok");
    origin.received.recv().await.unwrap();
    let line = gw.access_line(|l| l["host"] == PRIVATE).await;
    assert!(line.get("parent").is_none(), "{line}");

    let (tcp, reply) = connect(gw.addr, &format!("{VIA_PARENT}:{port}"), "").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(exchange(tcp).await, b"ok");
    let log = squid.wait_log(&format!("CONNECT 127.0.0.1:{port}"));
    assert!(
        log.contains(&format!("CONNECT 127.0.0.1:{port} 200")),
        "{log}"
    );
    assert!(
        !log.contains(PRIVATE),
        "the private endpoint went to the parent: {log}"
    );
}

/// A name whose answer holds a private endpoint's address and another: only the private one
/// is dialled, directly; the other never leaves without the parent (not direct, not at all).
#[tokio::test]
async fn a_mixed_answer_dials_only_its_private_addresses_directly() {
    let mut origin = Origin::start(b"public").await;
    let port = origin.addr.port();
    let private = tokio::net::TcpListener::bind(("127.0.0.3", port))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = private.accept().await {
            let mut ping = [0u8; 4];
            let _ = tcp.read_exact(&mut ping).await;
            let _ = tcp.write_all(b"private").await;
        }
    });
    let squid = squid_for_origin();
    let parents = parent("corp-1", &squid.address(), "");
    let config = config(port, &parents, "via = [\"corp-1\"]\n")
        .change_rule("private-endpoint", |r| {
            r.private_addresses(&["127.0.0.3/32"])
                .addresses(&["127.0.0.1/32"])
        })
        .resolve(PRIVATE, ["127.0.0.1", "127.0.0.3"]);
    let mut gw = Gateway::start(config).await;
    let (tcp, reply) = connect(gw.addr, &format!("{PRIVATE}:{port}"), "").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(exchange(tcp).await, b"private");
    let line = gw.access_line(|l| l["host"] == PRIVATE).await;
    assert_eq!(line["resolved"], format!("127.0.0.3:{port}"), "{line}");
    assert!(line.get("parent").is_none(), "{line}");
    let nothing = tokio::time::timeout(Duration::from_millis(300), origin.received.recv());
    assert!(nothing.await.is_err(), "the public address was dialled");
    assert!(
        !squid.access_log().contains("CONNECT"),
        "{}",
        squid.access_log()
    );
}

/// A parent of the test's own that answers 200 and sends bytes right after its head, or
/// answers garbage: the bytes reach the client; garbage is a proxy failure (failover).
#[tokio::test]
async fn bytes_after_the_parents_200_reach_the_client_and_garbage_fails_over() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let eager = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut head = [0u8; 1024];
            let _ = tcp.read(&mut head).await;
            let _ = tcp
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\nearly bytes")
                .await;
        }
    });
    let garbage = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let broken = garbage.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = garbage.accept().await {
            let _ = tcp.write_all(b"SSH-2.0-not-a-proxy\r\n\r\n").await;
        }
    });
    let parents =
        parent("broken", &broken.to_string(), "") + &parent("eager", &eager.to_string(), "");
    let via = "via = [\"broken\", \"eager\"]\n";
    let mut gw = Gateway::start(config(443, &parents, via)).await;
    let mut tcp = connect_bound(gw.addr, "127.0.0.1").await;
    let request = format!("CONNECT {VIA_PARENT}:443 HTTP/1.1\r\nHost: {VIA_PARENT}:443\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let want = b"HTTP/1.1 200 Connection Established\r\n\r\nearly bytes";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 256];
    while got.len() < want.len() && tokio::time::Instant::now() < deadline {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));
    drop(tcp);
    let line = gw.access_line(|l| l["host"] == VIA_PARENT).await;
    assert_eq!(line["parent"], "eager");
    assert_eq!(line["bytes_down"], 11);
}

#[test]
fn explain_prints_the_path_through_parents_and_check_config_who_uses_them() {
    let (_dir, pass) = temp_file("p.pass", "secret\n");
    let parents = parent(
        "corp-1",
        "proxy1.corp.example:8080",
        &format!(
            "basic = {{ user = \"portcullis\", password_file = \"{}\" }}",
            pass.display()
        ),
    ) + &parent("corp-2", "10.0.0.9:8080", "");
    let text = config(443, &parents, "via = [\"corp-1\", \"corp-2\"]\n").to_string();
    let (_dir, path) = temp_file("parents.toml", &text);
    let file = path.to_str().unwrap();
    let explain = |target: &str| {
        let out = portcullis(&["explain", "--config", file, "--from", "127.0.0.1", target]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = explain(&format!("{VIA_PARENT}:443"));
    assert!(
        out.contains("path:     via corp-1 then corp-2, CONNECT by name; never direct"),
        "{out}"
    );
    let out = explain(&format!("{PRIVATE}:443"));
    assert!(
        out.contains("(a private endpoint: never through a parent)"),
        "{out}"
    );
    let out = portcullis(&["check-config", file]);
    let out = String::from_utf8_lossy(&out.stdout);
    for want in [
        "parents (2):",
        "  corp-1: proxy1.corp.example:8080, CONNECT by name, credentials: portcullis; used by egresses: corp",
        "  corp: via corp-1 then corp-2 (never direct)",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert!(!out.contains("secret"), "{out}");
}

/// The SNI check inside a tunnel through `parents`' `name`: a hello for the name asked for
/// passes (and the access line names the parent), one for another name is cut.
async fn the_sni_check_through(
    pki: &Pki,
    origin: &crate::support::Origin,
    parents: &str,
    name: &str,
) {
    let port = origin.port();
    let via = format!("via = [\"{name}\"]\n");
    let config = config(port, parents, &via).change_rule("via-parent", |r| r.set("sni", "match"));
    let mut gw = Gateway::start(config).await;
    assert_serves(pki, gw.addr, origin).await;
    let line = gw
        .access_line(|l| l["host"] == VIA_PARENT && l["status"] == 200)
        .await;
    assert_eq!(line["sni"], VIA_PARENT);
    assert_eq!(line["parent"], name);

    let (tunnel, reply) = connect(gw.addr, &format!("{VIA_PARENT}:{port}"), "").await;
    assert_eq!(reply.status, 200);
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(pki.client_config()));
    let evil = rustls::pki_types::ServerName::try_from("evil.example").unwrap();
    assert!(
        connector.connect(evil, tunnel).await.is_err(),
        "the tunnel is cut"
    );
    let line = gw.access_line(|l| l["end"] == "sni_mismatch").await;
    assert_eq!(line["parent"], name);
}

#[tokio::test]
async fn the_sni_check_works_the_same_through_a_parent() {
    let pki = Pki::new();
    let origin = crate::support::Origin::start(&pki).await;
    let squid = squid_for_origin();
    let parents = parent("corp-1", &squid.address(), "");
    the_sni_check_through(&pki, &origin, &parents, "corp-1").await;
}

/// A listener on `addr` whose accept queue is full: further SYNs are dropped.
async fn black_hole(addr: SocketAddr) -> (tokio::net::TcpListener, Vec<tokio::net::TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(addr).unwrap();
    let listener = socket.listen(1).unwrap();
    let mut queued = Vec::new();
    for _ in 0..2 {
        let connect = tokio::net::TcpStream::connect(addr);
        match tokio::time::timeout(Duration::from_millis(500), connect).await {
            Ok(Ok(stream)) => queued.push(stream),
            _ => break,
        }
    }
    (listener, queued)
}

#[tokio::test]
async fn a_parent_whose_first_address_drops_syns_is_reached_within_about_one_attempt_delay() {
    let mut origin = Origin::start(b"ok").await;
    let squid = squid_for_origin();
    let _hole = black_hole(SocketAddr::from(([127, 0, 0, 2], squid.port))).await;
    let parents = parent("corp-1", &format!("parent.corp.example:{}", squid.port), "");
    let config = config(origin.addr.port(), &parents, "via = [\"corp-1\"]\n")
        .no_resolver()
        .extra(&format!(
            "[resolver]\nhosts_only = true\n[resolver.hosts]\n\
             \"parent.corp.example\" = [\"127.0.0.2\", \"127.0.0.1\"]\n\"{VIA_PARENT}\" = \"20.60.1.5\"\n"
        ));
    let mut gw = Gateway::start(config).await;
    let started = std::time::Instant::now();
    let (tcp, reply) = connect(gw.addr, &format!("{VIA_PARENT}:{}", origin.addr.port()), "").await;
    let took = started.elapsed();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    assert_eq!(exchange(tcp).await, b"ok");
    origin.received.recv().await.unwrap();
    let line = gw.access_line(|l| l["host"] == VIA_PARENT).await;
    assert_eq!(line["parent"], "corp-1");
    assert_eq!(line["resolved"], format!("127.0.0.1:{}", squid.port));
}

/// A stunnel of the test's own as the parent's TLS port: a TLS server (a certificate for
/// `proxy.test.example` from the test CA) in front of Squid. The gateway speaks TLS to it
/// itself. Stopped (its PID only) when dropped.
struct Stunnel {
    port: u16,
    child: std::process::Child,
    dir: tempfile::TempDir,
}

const PARENT_NAME: &str = "proxy.test.example";

impl Stunnel {
    fn start(pki: &Pki, squid_port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pki.issue_pem(&[PARENT_NAME], 2099);
        let d = dir.path();
        std::fs::write(d.join("cert.pem"), cert).unwrap();
        std::fs::write(d.join("key.pem"), key).unwrap();
        std::fs::write(d.join("ca.pem"), &pki.ca_pem).unwrap();
        let port = free_port();
        let config = format!(
            "foreground = yes\npid =\n\
             [parent-tls]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{squid_port}\n\
             cert = {d}/cert.pem\nkey = {d}/key.pem\n",
            d = d.display()
        );
        std::fs::write(d.join("stunnel.conf"), config).unwrap();
        let child = std::process::Command::new("stunnel4")
            .arg(d.join("stunnel.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("stunnel4 (apt-get install stunnel4)");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "stunnel did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { port, child, dir }
    }

    /// `[[parent]]` `name` through this TLS port, trusting `ca_pem`, checking `server_name`.
    fn parent(&self, name: &str, ca_pem: &str, server_name: &str) -> String {
        let ca = self.dir.path().join(format!("{name}-ca.pem"));
        std::fs::write(&ca, ca_pem).unwrap();
        parent(
            name,
            &format!("127.0.0.1:{}", self.port),
            &format!(
                "tls = {{ ca = \"{}\", server_name = \"{server_name}\" }}",
                ca.display()
            ),
        )
    }
}

impl Drop for Stunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The gateway speaks TLS to the parent itself (Squid behind stunnel's TLS port): the tunnel
/// carries bytes both ways inside it, and the client's credentials never reach the parent.
#[tokio::test]
async fn a_tunnel_through_a_tls_parent_carries_bytes_and_never_the_clients_credentials() {
    let mut origin = Origin::start(b"over tls").await;
    let squid = squid_for_origin();
    let pki = Pki::new();
    let stunnel = Stunnel::start(&pki, squid.port);
    let parents = stunnel.parent("corp-tls", &pki.ca_pem, PARENT_NAME);
    let (mut gw, target) = carries_bytes_and_never_the_clients_credentials(
        &mut origin,
        &squid,
        &parents,
        "corp-tls",
        b"over tls",
    )
    .await;

    // The CA file gone: a reload is refused at its line, and the running config (its trust
    // already read) goes on.
    std::fs::remove_file(stunnel.dir.path().join("corp-tls-ca.pem")).unwrap();
    let line = gw
        .reload("reload rejected; the running configuration stays")
        .await;
    let problems = line["problems"].as_str().unwrap_or_default();
    assert!(
        problems.contains("portcullis.toml:")
            && problems.contains("parent[0].tls.ca")
            && problems.contains("corp-tls-ca.pem: cannot read the CA file"),
        "{line}"
    );
    let (tcp, reply) = connect(gw.addr, &target, "").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(exchange(tcp).await, b"over tls");
}

#[tokio::test]
async fn the_sni_check_works_the_same_through_a_tls_parent() {
    let pki = Pki::new();
    let origin = crate::support::Origin::start(&pki).await;
    let squid = squid_for_origin();
    let stunnel = Stunnel::start(&pki, squid.port);
    let parents = stunnel.parent("corp-tls", &pki.ca_pem, PARENT_NAME);
    the_sni_check_through(&pki, &origin, &parents, "corp-tls").await;
}

/// A parent whose certificate the gateway does not trust (another CA), or whose certificate is
/// for another name, fails as a proxy before any tunnel byte: the next (plain) parent carries
/// the tunnel, and with every parent down the 502 names each TLS problem.
#[tokio::test]
async fn a_tls_parent_not_trusted_fails_over_and_says_why() {
    let mut origin = Origin::start(b"ok").await;
    let mut squid = squid_for_origin();
    let pki = Pki::new();
    let stunnel = Stunnel::start(&pki, squid.port);
    let other_ca = Pki::named("Another test CA");
    let parents = stunnel.parent("bad-ca", &other_ca.ca_pem, PARENT_NAME)
        + &stunnel.parent("bad-name", &pki.ca_pem, "other.test.example")
        + &parent("plain", &squid.address(), "");
    let via = "via = [\"bad-ca\", \"bad-name\", \"plain\"]\n";
    let (mut gw, target) = gateway_through(&mut origin, &parents, via, "", b"ok").await;
    let line = gw.access_line(|l| l["host"] == VIA_PARENT).await;
    assert_eq!(line["parent"], "plain", "{line}");
    let metrics = gw.metrics().await;
    for name in ["bad-ca", "bad-name"] {
        metrics.assert_value(
            &format!("portcullis_parent_requests_total{{parent=\"{name}\",outcome=\"failed\"}}"),
            1.0,
        );
    }
    // Only the plain parent's CONNECT reached Squid: the TLS ones ended at the handshake.
    let log = squid.wait_log(&format!("CONNECT {target}"));
    assert_eq!(log.matches("CONNECT ").count(), 1, "{log}");

    // Squid gone too: 502, each parent's reason in it.
    squid.stop();
    let (_tcp, reply) = connect(gw.addr, &target, "").await;
    assert_eq!(reply.status, 502, "{reply:?}");
    let reason = reply.header("portcullis-error").unwrap_or_default();
    assert!(
        reason.contains("bad-ca: TLS: certificate not signed by parent tls.ca (unknown issuer)"),
        "{reason}"
    );
    assert!(
        reason.contains("bad-name: TLS: certificate not valid for other.test.example"),
        "{reason}"
    );
    let line = gw
        .access_line(|l| l["host"] == VIA_PARENT && l["status"] == 502)
        .await;
    assert_eq!(line["end"], "parent_unavailable");
    let logged = line["reason"].as_str().unwrap_or_default();
    assert!(
        logged.contains("bad-ca: TLS: certificate not signed"),
        "{line}"
    );
    let nothing = tokio::time::timeout(Duration::from_millis(300), origin.received.recv());
    assert!(nothing.await.is_err(), "the origin saw a connection");
}

/// A parent that accepts TCP but never answers the handshake fails within `timeouts.connect`.
#[tokio::test]
async fn a_tls_parent_silent_in_the_handshake_fails_in_time() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = silent.local_addr().unwrap();
    let _held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            held.push(tcp);
        }
    });
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let parents = parent(
        "silent",
        &address.to_string(),
        &format!(
            "tls = {{ ca = \"{}\", server_name = \"{PARENT_NAME}\" }}",
            ca.display()
        ),
    );
    let config = config(1443, &parents, "via = [\"silent\"]\n").timeout("connect", "1s");
    let mut gw = Gateway::start(config).await;
    let started = std::time::Instant::now();
    let (_tcp, reply) = connect(gw.addr, &format!("{VIA_PARENT}:1443"), "").await;
    assert_eq!(reply.status, 502, "{reply:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let reason = reply.header("portcullis-error").unwrap_or_default();
    assert!(
        reason.contains("silent: TLS: no handshake within timeouts.connect"),
        "{reason}"
    );
    let line = gw.access_line(|l| l["host"] == VIA_PARENT).await;
    assert_eq!(line["end"], "parent_unavailable");
}

/// `tls` problems are the operator's to fix at load: a CA file missing, an IP address without
/// the name to check.
#[test]
fn tls_to_a_parent_is_checked_at_load() {
    let missing = "[[parent]]\nname = \"p\"\naddress = \"proxy.corp.example:3128\"\n\
                   tls = { ca = \"no-such-ca.pem\" }\n";
    let (_dir, path) = temp_file("tls.toml", missing);
    let out = portcullis(&["check-config", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("tls.toml:4:14: parent[0].tls.ca")
            && stderr.contains("no-such-ca.pem: cannot read the CA file"),
        "{stderr}"
    );
    let by_ip = "[[parent]]\nname = \"p\"\naddress = \"127.0.0.1:1\"\ntls = { ca = \"ca.pem\" }\n";
    let (_dir, path) = temp_file("tls.toml", by_ip);
    let out = portcullis(&["check-config", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("parent[0].tls.server_name"), "{stderr}");
    assert!(!stderr.contains("stunnel"), "{stderr}");
    // A good one: check-config says how the parent is reached.
    let pki = Pki::new();
    let (_ca_dir, ca) = temp_file("corp-ca.pem", &pki.ca_pem);
    let good = format!(
        "[[parent]]\nname = \"p\"\naddress = \"Proxy.corp.example:3128\"\ntls = {{ ca = \"{}\" }}\n",
        ca.display()
    );
    let (_dir, path) = temp_file("tls.toml", &good);
    let out = portcullis(&["check-config", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let want = format!(
        "  p: proxy.corp.example:3128, TLS to proxy.corp.example (CA {}), CONNECT by name",
        ca.display()
    );
    assert!(
        stdout.contains(&want),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The plain-HTTP lane (revocation lists, OCSP) goes through the egress's parents like a
/// tunnel, so through a TLS parent too: its request travels inside the parent's TLS.
#[tokio::test]
async fn the_plain_http_lane_goes_through_a_tls_parent() {
    let mut origin =
        Origin::start(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nCRL-DATA")
            .await;
    let squid = squid_for_origin();
    let pki = Pki::new();
    let stunnel = Stunnel::start(&pki, squid.port);
    let parents = stunnel.parent("corp-tls", &pki.ca_pem, PARENT_NAME);
    let port = origin.addr.port();
    let config = config(port, &parents, "via = [\"corp-tls\"]\n")
        .change_rule("via-parent", |r| r.set("plain_http", true));
    let mut gw = Gateway::start(config).await;
    let request =
        format!("GET http://{VIA_PARENT}:{port}/crl HTTP/1.1\r\nHost: {VIA_PARENT}\r\n\r\n");
    let reply = raw_request(gw.addr, request.as_bytes()).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "CRL-DATA"));
    let sent = origin.received.recv().await.unwrap();
    assert!(sent.starts_with(b"GET /crl HTTP/1.1"), "{sent:?}");
    let line = gw.access_line(|l| l["host"] == VIA_PARENT).await;
    assert_eq!(line["parent"], "corp-tls", "{line}");
    let log = squid.wait_log(&format!("CONNECT {VIA_PARENT}:{port}"));
    assert!(
        log.contains(&format!("CONNECT {VIA_PARENT}:{port} 200")),
        "{log}"
    );
}
