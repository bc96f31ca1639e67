//! Egresses: each branch (or rule) leaves from its own source address on loopback (the origin
//! records the peer address), rule beats branch beats default, a source address that is not on
//! the host is refused at load, and an IPv4-only egress never dials an IPv6 address.

use crate::support::*;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc::UnboundedReceiver;

/// A TCP origin on `addr` that records each connection's peer address and closes it.
async fn peer_recorder(addr: &str) -> (SocketAddr, UnboundedReceiver<IpAddr>) {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((_tcp, peer)) = listener.accept().await {
            let _ = tx.send(peer.ip());
        }
    });
    (addr, rx)
}

async fn next_peer(peers: &mut UnboundedReceiver<IpAddr>) -> IpAddr {
    tokio::time::timeout(Duration::from_secs(5), peers.recv())
        .await
        .expect("the origin saw a connection")
        .unwrap()
}

const EGRESSES: &str = r#"
[egress.london-out]
source_ipv4 = "127.0.0.2"

[egress.paris-out]
source_ipv4 = "127.0.0.3"

[egress.storage-out]
source_ipv4 = "127.0.0.4"

[egress.default-out]
source_ipv4 = "127.0.0.5"
families = ["ipv4"]
"#;

fn branches_config(port: u16) -> GatewayConfig {
    GatewayConfig::for_origin(port)
        .policy("egress", "default-out")
        .branch(
            Branch::new("london")
                .sources(&["127.0.0.10/32"])
                .set("egress", "london-out"),
        )
        .branch(
            Branch::new("paris")
                .sources(&["127.0.0.11/32"])
                .set("egress", "paris-out"),
        )
        .branch(Branch::new("berlin").sources(&["127.0.0.12/32"]))
        .extra(EGRESSES)
}

#[tokio::test]
async fn each_branch_leaves_from_its_egress_address_and_a_rule_beats_the_branch() {
    let (origin, mut peers) = peer_recorder("127.0.0.1:0").await;
    let target = format!("{ORIGIN_HOST}:{}", origin.port());
    let mut gw = Gateway::start(branches_config(origin.port())).await;
    for (client, want, egress) in [
        ("127.0.0.10", "127.0.0.2", "london-out"),
        ("127.0.0.11", "127.0.0.3", "paris-out"),
        ("127.0.0.12", "127.0.0.5", "default-out"),
    ] {
        let (tcp, reply) = connect_from(gw.addr, client, &target, "").await;
        assert_eq!(reply.status, 200, "{client}: {reply:?}");
        assert_eq!(next_peer(&mut peers).await.to_string(), want, "{client}");
        drop(tcp);
        let line = gw
            .access_line(|l| l["host"] == ORIGIN_HOST && l["egress"] == egress)
            .await;
        let local: SocketAddr = line["local_address"].as_str().unwrap().parse().unwrap();
        assert_eq!(local.ip().to_string(), want, "{line}");
    }
    drop(gw);

    // The rule's egress beats the branch's.
    let config =
        branches_config(origin.port()).origin_rule(|rule| rule.set("egress", "storage-out"));
    let mut gw = Gateway::start(config).await;
    let (tcp, reply) = connect_from(gw.addr, "127.0.0.10", &target, "").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(next_peer(&mut peers).await.to_string(), "127.0.0.4");
    drop(tcp);
    let line = gw.access_line(|l| l["host"] == ORIGIN_HOST).await;
    assert_eq!(line["egress"], "storage-out");
}

#[test]
fn explain_and_check_config_say_which_egress_and_the_path() {
    let text = branches_config(443)
        .origin_rule(|rule| rule.set("egress", "storage-out"))
        .to_string();
    let (_dir, path) = temp_file("egress.toml", &text);
    let config = path.to_str().unwrap();
    let target = format!("{ORIGIN_HOST}:443");
    let explain = |from: &str| {
        let out = portcullis(&["explain", "--config", config, "--from", from, &target]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = explain("127.0.0.10");
    assert!(
        out.contains("egress:   storage-out (the rule's egress)"),
        "{out}"
    );
    assert!(
        out.contains("path:     direct from 127.0.0.4, IPv4 only, tries 127.0.0.1"),
        "{out}"
    );
    let text = branches_config(443).to_string();
    let (_dir, path) = temp_file("egress.toml", &text);
    let config = path.to_str().unwrap();
    let out = portcullis(&[
        "explain",
        "--config",
        config,
        "--from",
        "127.0.0.11",
        &target,
    ]);
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.contains("egress:   paris-out (the branch's egress)"),
        "{out}"
    );
    let out = portcullis(&[
        "explain",
        "--config",
        config,
        "--from",
        "127.0.0.12",
        &target,
    ]);
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.contains("egress:   default-out (policy.egress)"),
        "{out}"
    );

    let out = portcullis(&["check-config", config]);
    let out = String::from_utf8_lossy(&out.stdout);
    for want in [
        "egresses (4):",
        "  london-out: direct, from 127.0.0.2, IPv4 only",
        "    used by rules: none; branches: london",
        "  default-out: direct, from 127.0.0.5, IPv4 only",
        "    used by rules: none; branches: none; the default (policy.egress)",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
}

#[test]
fn a_source_address_not_on_this_host_is_refused_at_load() {
    let text = "[egress.corp]\nsource_ipv4 = \"192.0.2.10\"\n\n[policy]\negress = \"corp\"\n";
    let (_dir, path) = temp_file("missing.toml", text);
    let out = portcullis(&["check-config", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("missing.toml:2:15: egress.corp.source_ipv4")
            && stderr.contains("192.0.2.10 is not an address of this host"),
        "{stderr}"
    );
    let text = "[policy]\negress = \"nowhere\"\n";
    let (_dir, path) = temp_file("unknown.toml", text);
    let out = portcullis(&["check-config", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown.toml:2:10: policy.egress")
            && stderr.contains("no [egress.nowhere]"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_reload_with_a_source_address_not_on_this_host_is_rejected() {
    let (origin, mut peers) = peer_recorder("127.0.0.1:0").await;
    let mut gw = Gateway::start(branches_config(origin.port())).await;
    let text = std::fs::read_to_string(gw.config_path()).unwrap();
    let moved = text.replace(
        "source_ipv4 = \"127.0.0.5\"",
        "source_ipv4 = \"192.0.2.10\"",
    );
    std::fs::write(gw.config_path(), moved).unwrap();
    let line = gw
        .reload("reload rejected; the running configuration stays")
        .await;
    let problems = line["problems"].as_str().unwrap();
    assert!(
        problems.contains("egress.default-out.source_ipv4")
            && problems.contains("192.0.2.10 is not an address of this host"),
        "{line}"
    );
    // Still leaving from the address in force.
    let target = format!("{ORIGIN_HOST}:{}", origin.port());
    let (_tcp, reply) = connect_from(gw.addr, "127.0.0.12", &target, "").await;
    assert_eq!(reply.status, 200);
    assert_eq!(next_peer(&mut peers).await.to_string(), "127.0.0.5");
}

#[tokio::test]
async fn an_ipv4_only_egress_never_dials_an_ipv6_address() {
    let (v4, mut v4_peers) = peer_recorder("127.0.0.1:0").await;
    // The same port on ::1: an IPv6 dial would land here.
    let v6_listener = TcpListener::bind(("::1", v4.port())).await.ok();
    let Some(v6_listener) = v6_listener else {
        eprintln!("skipped: no ::1 with port {} free on this host", v4.port());
        return;
    };
    let (tx, mut v6_peers) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((_tcp, peer)) = v6_listener.accept().await {
            let _ = tx.send(peer.ip());
        }
    });
    // Both families in the answer, IPv6 first: only the IPv4 one is dialled.
    let config = GatewayConfig::for_origin(v4.port())
        .origin_rule(|rule| {
            rule.hosts(&[
                ORIGIN_HOST,
                "v6.file.core.windows.net",
                "mapped.file.core.windows.net",
            ])
            .private_addresses(&["127.0.0.1/32", "::1/128"])
        })
        .no_resolver()
        .policy("egress", "v4")
        .extra(&format!(
            "[egress.v4]\nfamilies = [\"ipv4\"]\n\n[resolver]\nhosts_only = true\n\
             [resolver.hosts]\n\"{ORIGIN_HOST}\" = [\"::1\", \"127.0.0.1\"]\n\
             \"v6.file.core.windows.net\" = \"::1\"\n\
             \"mapped.file.core.windows.net\" = \"::ffff:127.0.0.1\"\n"
        ));
    let mut gw = Gateway::start(config).await;
    let target = format!("{ORIGIN_HOST}:{}", v4.port());
    let (_tcp, status) = open_tunnel(gw.addr, &target, b"").await;
    assert_eq!(status, 200);
    assert_eq!(next_peer(&mut v4_peers).await.to_string(), "127.0.0.1");
    // Only an IPv6 address: refused before any dial.
    let v6_target = format!("v6.file.core.windows.net:{}", v4.port());
    let (_tcp, status) = open_tunnel(gw.addr, &v6_target, b"").await;
    assert_eq!(status, 502);
    let line = gw
        .access_line(|l| l["host"] == "v6.file.core.windows.net")
        .await;
    assert_eq!(line["end"], "dns_failed");
    assert_eq!(
        line["reason"],
        "no address the egress may dial (v4 is IPv4 only)"
    );
    // An IPv4-mapped address is IPv4 on the wire: dialled as the IPv4 address it is.
    let mapped = format!("mapped.file.core.windows.net:{}", v4.port());
    let (tcp, status) = open_tunnel(gw.addr, &mapped, b"").await;
    assert_eq!(status, 200);
    assert_eq!(next_peer(&mut v4_peers).await.to_string(), "127.0.0.1");
    drop(tcp);
    let line = gw
        .access_line(|l| l["host"] == "mapped.file.core.windows.net")
        .await;
    assert_eq!(line["resolved"], format!("127.0.0.1:{}", v4.port()));
    // An IPv6 literal too.
    let (_tcp, _status) = open_tunnel(gw.addr, &format!("[::1]:{}", v4.port()), b"").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(v6_peers.try_recv().is_err(), "an IPv6 address was dialled");
}

/// `CONNECT target` to the gateway inside `ns`: the reply's status.
fn ns_connect(ns: &NetNs, gw: SocketAddr, target: &str) -> u16 {
    let reply = ns.exchange(
        gw,
        &format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"),
    );
    status_of(reply.as_bytes())
}

/// Inside a network namespace of the test's own: an IPv6-only egress leaves from its IPv6
/// source address, and when the IPv4 source address is removed from the host, tunnels are
/// refused as `egress_unavailable` and `/readyz` names the egress.
#[tokio::test]
async fn in_a_namespace_ipv6_leaves_from_its_source_and_a_vanished_address_is_unavailable() {
    let Some(ns) = NetNs::create() else {
        return;
    };
    ns.ip(&["addr", "add", "192.0.2.10/32", "dev", "lo"]);
    ns.ip(&["addr", "add", "2001:db8::10/128", "dev", "lo", "nodad"]);
    let port = 8443;
    let origin = ns.peer_origin(port);
    let v6_host = "v6.file.core.windows.net";
    let config = GatewayConfig::for_origin(port)
        .no_resolver()
        .policy("egress", "doc4")
        .extra(&format!(
            "[egress.doc4]\nsource_ipv4 = \"192.0.2.10\"\n\n\
             [egress.doc6]\nsource_ipv6 = \"2001:db8::10\"\nfamilies = [\"ipv6\"]\n\n\
             [[policy.allow]]\nname = \"v6\"\nhosts = [\"{v6_host}\"]\nports = [{port}]\n\
             private_addresses = [\"::1/128\"]\negress = \"doc6\"\n\n\
             [resolver]\nhosts_only = true\n[resolver.hosts]\n\
             \"{ORIGIN_HOST}\" = \"127.0.0.1\"\n\"{v6_host}\" = [\"127.0.0.1\", \"::1\"]\n"
        ));
    let mut gw = Gateway::start_under(config, &[], &ns.wrapper()).await;
    let admin = gw.admin_addr.unwrap();

    assert_eq!(
        ns_connect(&ns, gw.addr, &format!("{ORIGIN_HOST}:{port}")),
        200
    );
    assert_eq!(origin.next().as_deref(), Some("192.0.2.10"));
    // IPv6 only, from its IPv6 source, though the name's first address is IPv4.
    assert_eq!(ns_connect(&ns, gw.addr, &format!("{v6_host}:{port}")), 200);
    assert_eq!(origin.next().as_deref(), Some("2001:db8::10"));
    let ready = ns.exchange(admin, "GET /readyz HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(status_of(ready.as_bytes()), 200, "{ready}");

    // The IPv4 source address leaves the host.
    ns.ip(&["addr", "del", "192.0.2.10/32", "dev", "lo"]);
    assert_eq!(
        ns_connect(&ns, gw.addr, &format!("{ORIGIN_HOST}:{port}")),
        502
    );
    let line = gw
        .access_line(|l| l["host"] == ORIGIN_HOST && l["status"] == 502)
        .await;
    assert_eq!(line["end"], "egress_unavailable");
    assert_eq!(
        line["reason"],
        "egress source address 192.0.2.10 is not on this host"
    );
    assert_eq!(origin.seen_within(Duration::from_millis(300)), None);
    let ready = ns.exchange(admin, "GET /readyz HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(status_of(ready.as_bytes()), 503, "{ready}");
    assert!(
        ready.contains("egress doc4: 192.0.2.10 is not an address of this host"),
        "{ready}"
    );
}

/// A DNS server on 127.0.0.1 (UDP) that answers every A query with 127.0.0.1 and reports the
/// address each query came from.
async fn recording_dns() -> (SocketAddr, UnboundedReceiver<IpAddr>) {
    recording_dns_at("127.0.0.1:0").await
}

/// [`recording_dns`] on `bind`.
async fn recording_dns_at(bind: &str) -> (SocketAddr, UnboundedReceiver<IpAddr>) {
    let socket = tokio::net::UdpSocket::bind(bind).await.unwrap();
    let addr = socket.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let query = &buf[..n];
            let mut end = 12;
            while end < n && query[end] != 0 {
                end += query[end] as usize + 1;
            }
            if end + 5 > n {
                continue;
            }
            let _ = tx.send(from.ip());
            let a = u16::from_be_bytes([query[end + 1], query[end + 2]]) == 1;
            let mut reply = query[..2].to_vec();
            reply.extend_from_slice(&[0x81, 0x80, 0, 1, 0, u8::from(a), 0, 0, 0, 0]);
            reply.extend_from_slice(&query[12..end + 5]);
            if a {
                reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 1]);
            }
            let _ = socket.send_to(&reply, from).await;
        }
    });
    (addr, rx)
}

/// A gateway whose egress `out` leaves from 127.0.0.2 and asks `servers`: one tunnel to
/// `origin` leaves from 127.0.0.2 (`peers`), and its first query, which `queries` records,
/// leaves from there too. The gateway, its tunnel ended, stays with the caller.
async fn through_egress_out(
    servers: &[SocketAddr],
    origin: SocketAddr,
    peers: &mut UnboundedReceiver<IpAddr>,
    queries: &mut UnboundedReceiver<IpAddr>,
) -> Gateway {
    let config = GatewayConfig::for_origin(origin.port())
        .dns(servers, "2s")
        .policy("egress", "out")
        .extra("[egress.out]\nsource_ipv4 = \"127.0.0.2\"\n");
    let gw = Gateway::start(config).await;
    let target = format!("{ORIGIN_HOST}:{}", origin.port());
    let (tcp, reply) = connect_from(gw.addr, "127.0.0.1", &target, "").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(next_peer(peers).await.to_string(), "127.0.0.2");
    drop(tcp);
    let from = tokio::time::timeout(Duration::from_secs(1), queries.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(from.to_string(), "127.0.0.2");
    gw
}

#[tokio::test]
async fn dns_for_an_egress_leaves_from_its_source_address_and_asks_for_its_families_only() {
    let (origin, mut peers) = peer_recorder("127.0.0.1:0").await;
    let (dns, mut queries) = recording_dns().await;
    let mut gw = through_egress_out(&[dns], origin, &mut peers, &mut queries).await;
    let line = gw.access_line(|l| l["host"] == ORIGIN_HOST).await;
    assert_eq!(line["egress"], "out");
    // One query (A only: the egress has no IPv6 source), from the egress's address.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(queries.try_recv().is_err(), "an AAAA query was sent too");
}

/// An egress with only an IPv4 source never asks an IPv6 DNS server (the query would leave from
/// an address nobody chose); its IPv4 server answers.
#[tokio::test]
async fn dns_for_an_egress_skips_a_server_of_a_family_it_has_no_source_for() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipped: no ::1 on this host");
        return;
    }
    let (origin, mut peers) = peer_recorder("127.0.0.1:0").await;
    let (dns6, mut queries6) = recording_dns_at("[::1]:0").await;
    let (dns4, mut queries4) = recording_dns().await;
    let _gw = through_egress_out(&[dns6, dns4], origin, &mut peers, &mut queries4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        queries6.try_recv().is_err(),
        "a query went to the IPv6 server"
    );
}
