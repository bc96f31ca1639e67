//! Denials: unlisted hosts and ports, IP literals, names that resolve into forbidden ranges,
//! DNS and connect failures. Each gets its status and a `Portcullis-Error` reason, and the
//! gateway keeps serving good requests afterwards.

use crate::support::*;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket, UdpSocket};

async fn connect_reply(gw: SocketAddr, target: &str) -> Reply {
    raw_request(
        gw,
        format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes(),
    )
    .await
}

fn assert_refused(reply: &Reply, status: u16, reason: &str) {
    assert_eq!(reply.status, status, "{reply:?}");
    assert_eq!(reply.header("portcullis-error"), Some(reason), "{reply:?}");
    assert_eq!(reply.body.trim_end(), reason);
}

#[tokio::test]
async fn unlisted_hosts_ports_and_ip_literals_get_403() {
    let pki = Pki::new();
    let origin = Origin::start(&pki).await;
    let mut gw = Gateway::start(GatewayConfig::for_origin(origin.port())).await;
    let table = [
        ("evil.example:443", "host not allowed"),
        ("core.windows.net:443", "host not allowed"),
        ("xcore.windows.net:443", "host not allowed"),
        (
            "share1.file.core.windows.net.evil.example:443",
            "host not allowed",
        ),
        ("management.azure.com:8443", "port not allowed"),
        ("share1.file.core.windows.net:22", "port not allowed"),
        ("127.0.0.1:443", "ip literal not allowed"),
        ("20.60.1.2:443", "ip literal not allowed"),
        ("[::1]:443", "ip literal not allowed"),
    ];
    for (target, reason) in table {
        let reply = connect_reply(gw.addr, target).await;
        assert_refused(&reply, 403, reason);
        let host = target
            .rsplit_once(':')
            .unwrap()
            .0
            .trim_matches(['[', ']'])
            .to_owned();
        let line = gw
            .access_line(|l| l["host"] == host.as_str() && l["reason"] == reason)
            .await;
        assert_eq!(
            (line["verdict"].as_str(), line["status"].as_u64()),
            (Some("deny"), Some(403))
        );
        assert_eq!(line["end"], "policy_denied");
        assert_serves(&pki, gw.addr, &origin).await;
    }
}

#[tokio::test]
async fn names_resolving_into_forbidden_ranges_are_refused() {
    let pki = Pki::new();
    let origin = Origin::start(&pki).await;
    let port = origin.port();
    let table = [
        ("loopback", "127.0.0.1", "loopback"),
        ("loopback-other", "127.0.0.2", "loopback"),
        ("rfc1918-10", "10.0.0.1", "private"),
        ("rfc1918-172", "172.16.5.4", "private"),
        ("rfc1918-192", "192.168.1.1", "private"),
        ("metadata", "169.254.169.254", "link-local"),
        ("cgnat", "100.64.0.1", "cgnat"),
        ("unspecified", "0.0.0.0", "unspecified"),
        ("multicast", "224.0.0.1", "multicast"),
        ("broadcast", "255.255.255.255", "broadcast"),
        ("documentation", "192.0.2.1", "documentation"),
        ("v6-loopback", "::1", "loopback"),
        ("v6-ula", "fd00::1", "private"),
        ("v6-link-local", "fe80::1", "link-local"),
        ("v4-mapped", "::ffff:127.0.0.1", "ipv4-mapped"),
        ("nat64", "64:ff9b::7f00:1", "nat64"),
        ("sixtofour", "2002:7f00:1::1", "6to4"),
        ("teredo", "2001:0:4136:e378::1", "teredo"),
    ];
    let config = GatewayConfig::for_origin(port).rule(
        Rule::new("wall")
            .hosts(&["*.wall.example"])
            .ports(&[443, port]),
    );
    let config = table.iter().fold(config, |config, (name, ip, _)| {
        config.resolve(&format!("{name}.wall.example"), ip)
    });
    let mut gw = Gateway::start(config).await;
    for (name, _, range) in table {
        // The origin listens on 127.0.0.1:port: were the wall missing, loopback names would get 200.
        let reply = connect_reply(gw.addr, &format!("{name}.wall.example:{port}")).await;
        let reason = format!("destination address forbidden ({range})");
        assert_refused(&reply, 403, &reason);
        let line = gw
            .access_line(|l| l["host"] == format!("{name}.wall.example"))
            .await;
        assert_eq!(
            (line["verdict"].as_str(), line["rule"].as_str()),
            (Some("allow"), Some("wall"))
        );
        assert_eq!(line["end"], "destination_forbidden");
        assert_serves(&pki, gw.addr, &origin).await;
    }
}

#[tokio::test]
async fn report_mode_lets_denials_through_but_keeps_the_wall() {
    let pki = Pki::new();
    let origin = Origin::start(&pki).await;
    let port = origin.port();
    // The test rule lists only 443: the origin's port is a policy miss, reported, not enforced.
    let config = GatewayConfig::for_origin(port)
        .origin_rule(|rule| rule.ports(&[443]))
        .resolve("unlisted.example", "127.0.0.1")
        .policy("mode", "report");
    let mut gw = Gateway::start(config).await;
    assert_serves(&pki, gw.addr, &origin).await;
    let line = gw.access_line(|l| l["host"] == ORIGIN_HOST).await;
    assert_eq!(line["verdict"], "would_deny");
    assert_eq!(line["reason"], "port not allowed");
    assert_eq!(line["status"], 200);
    // An unlisted name has no rule to open the wall: loopback stays out of reach.
    let reply = connect_reply(gw.addr, &format!("unlisted.example:{port}")).await;
    assert_refused(&reply, 403, "destination address forbidden (loopback)");
    let line = gw.access_line(|l| l["host"] == "unlisted.example").await;
    assert_eq!(
        (line["verdict"].as_str(), line["reason"].as_str()),
        (
            Some("would_deny"),
            Some("destination address forbidden (loopback)")
        )
    );
}

/// A minimal DNS server on 127.0.0.1 (UDP): A queries get `answer`, names starting with "nx"
/// get NXDOMAIN, other types an empty NOERROR.
async fn fake_dns(answer: Ipv4Addr) -> SocketAddr {
    fake_dns_with(answer, None).await
}

/// `fake_dns`, AAAA queries answered with `v6` when given.
async fn fake_dns_with(answer: Ipv4Addr, v6: Option<std::net::Ipv6Addr>) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let query = &buf[..n];
            let mut end = 12;
            while end < n && query[end] != 0 {
                end += query[end] as usize + 1;
            }
            let question_end = end + 5;
            if question_end > n {
                continue;
            }
            let qtype = u16::from_be_bytes([query[end + 1], query[end + 2]]);
            let nx = query[13..15] == *b"nx";
            let aaaa = v6.filter(|_| qtype == 28 && !nx);
            let answers = u16::from((qtype == 1 || aaaa.is_some()) && !nx);
            let mut reply = query[..2].to_vec();
            reply.extend_from_slice(&[0x81, if nx { 0x83 } else { 0x80 }, 0, 1]);
            reply.extend_from_slice(&answers.to_be_bytes());
            reply.extend_from_slice(&[0, 0, 0, 0]);
            reply.extend_from_slice(&query[12..question_end]);
            if let Some(v6) = aaaa {
                reply.extend_from_slice(&[0xc0, 0x0c, 0, 28, 0, 1, 0, 0, 0, 60, 0, 16]);
                reply.extend_from_slice(&v6.octets());
            } else if answers == 1 {
                reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
                reply.extend_from_slice(&answer.octets());
            }
            let _ = socket.send_to(&reply, from).await;
        }
    });
    addr
}

#[tokio::test]
async fn names_go_through_the_gateways_own_dns_and_answers_are_vetted() {
    let pki = Pki::new();
    let origin = Origin::start(&pki).await;
    let port = origin.port();
    let loopback_dns = fake_dns(Ipv4Addr::LOCALHOST).await;
    let metadata_dns = fake_dns(Ipv4Addr::new(169, 254, 169, 254)).await;
    let config = |dns: SocketAddr| {
        GatewayConfig::for_origin(port)
            .origin_rule(|rule| rule.hosts(&["*.file.core.windows.net"]))
            .dns(&[dns], "2s")
            .resolve("pinned.file.core.windows.net", "127.0.0.1")
    };

    // DNS says 127.0.0.1 and the rule allows 127.0.0.1/32: the tunnel opens via a real lookup.
    let mut gw = Gateway::start(config(loopback_dns)).await;
    assert_serves(&pki, gw.addr, &origin).await;
    let reply = connect_reply(gw.addr, &format!("nx.file.core.windows.net:{port}")).await;
    assert_refused(&reply, 502, "cannot resolve host: no address for the name");
    assert_eq!(
        gw.access_line(|l| l["host"] == "nx.file.core.windows.net")
            .await["end"],
        "dns_failed"
    );
    drop(gw);

    // DNS says 169.254.169.254: the wall refuses it; a name with an override never asks DNS.
    let mut gw = Gateway::start(config(metadata_dns)).await;
    let reply = connect_reply(gw.addr, &format!("{ORIGIN_HOST}:{port}")).await;
    assert_refused(&reply, 403, "destination address forbidden (link-local)");
    let line = gw.access_line(|l| l["host"] == ORIGIN_HOST).await;
    assert_eq!(line["resolved"], format!("169.254.169.254:{port}"));
    let (_tcp, status) = open_tunnel(
        gw.addr,
        &format!("pinned.file.core.windows.net:{port}"),
        b"",
    )
    .await;
    assert_eq!(status, 200, "the override wins over DNS");
}

#[tokio::test]
async fn dns_failure_is_502_and_dns_timeout_is_504() {
    let pki = Pki::new();
    let origin = Origin::start(&pki).await;
    // hosts_only with no entry for the name: nothing to connect to.
    let config = GatewayConfig::for_origin(origin.port())
        .no_resolver()
        .resolve("other.example", "127.0.0.1");
    let mut gw = Gateway::start(config).await;
    let reply = connect_reply(gw.addr, &format!("{ORIGIN_HOST}:{}", origin.port())).await;
    assert_refused(&reply, 502, "cannot resolve host: no address for the name");
    assert_eq!(
        gw.access_line(|l| l["host"] == ORIGIN_HOST).await["end"],
        "dns_failed"
    );
    drop(gw);

    // A DNS server that takes queries (UDP and TCP) and never answers.
    // The UDP port is random; retry until the same TCP port is free too.
    let mut silent = None;
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
            silent = Some((udp, tcp));
            break;
        }
    }
    let (silent_udp, silent_tcp) = silent.expect("a port free for both UDP and TCP");
    let dns = silent_udp.local_addr().unwrap();
    let mut gw =
        Gateway::start(GatewayConfig::for_origin(origin.port()).dns(&[dns], "300ms")).await;
    let reply = connect_reply(gw.addr, &format!("{ORIGIN_HOST}:{}", origin.port())).await;
    assert_refused(
        &reply,
        504,
        "cannot resolve host: DNS did not answer in time",
    );
    assert_eq!(
        gw.access_line(|l| l["host"] == ORIGIN_HOST).await["end"],
        "dns_timeout"
    );
    drop((silent_udp, silent_tcp));
}

#[tokio::test]
async fn connect_refused_is_502_and_connect_timeout_is_504() {
    let pki = Pki::new();
    let origin = Origin::start(&pki).await;

    // A port nothing listens on.
    let closed_port = free_port();
    // A listener whose accept queue is full: further SYNs are dropped, so connects hang.
    let full = TcpSocket::new_v4().unwrap();
    full.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let full = full.listen(0).unwrap();
    let full_port = full.local_addr().unwrap().port();
    let mut fillers = Vec::new();
    for _ in 0..2 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(("127.0.0.1", full_port)),
        )
        .await
        {
            fillers.push(s);
        }
    }

    let config = GatewayConfig::for_origin(origin.port())
        .rule(
            Rule::new("dead-ends")
                .hosts(&["*.dead.example"])
                .ports(&[closed_port, full_port])
                .private_addresses(&["127.0.0.1/32"]),
        )
        .resolve("refused.dead.example", "127.0.0.1")
        .resolve("slow.dead.example", "127.0.0.1")
        .timeout("connect", "500ms");
    let mut gw = Gateway::start(config).await;

    let reply = connect_reply(gw.addr, &format!("refused.dead.example:{closed_port}")).await;
    assert_refused(&reply, 502, "upstream refused the connection");
    let line = gw
        .access_line(|l| l["host"] == "refused.dead.example")
        .await;
    assert_eq!(
        (line["end"].as_str(), line["resolved"].as_str()),
        (
            Some("connect_failed"),
            Some(&*format!("127.0.0.1:{closed_port}"))
        )
    );

    let reply = connect_reply(gw.addr, &format!("slow.dead.example:{full_port}")).await;
    assert_refused(&reply, 504, "upstream connect timed out");
    assert_eq!(
        gw.access_line(|l| l["host"] == "slow.dead.example").await["end"],
        "connect_timeout"
    );
    assert_serves(&pki, gw.addr, &origin).await;
    drop((full, fillers));
}

#[tokio::test]
async fn clients_outside_the_allowed_networks_get_403() {
    let pki = Pki::new();
    let origin = Origin::start(&pki).await;
    let config = GatewayConfig::for_origin(origin.port()).listen("clients", ["10.0.0.0/8"]);
    let mut gw = Gateway::start(config).await;
    let reply = connect_reply(gw.addr, &format!("{ORIGIN_HOST}:{}", origin.port())).await;
    assert_refused(&reply, 403, "client address not allowed");
    let line = gw.access_line(|l| l["host"] == ORIGIN_HOST).await;
    assert_eq!(line["end"], "client_denied");
    assert!(
        line["verdict"].is_null(),
        "no policy verdict for an unknown client: {line}"
    );
}

/// `[[policy.deny]]` comes before every allow rule (the profile's `*.core.windows.net`, the
/// file's own rule), may be limited to branches, and is logged with its name; `explain` and
/// `check-config` show it.
#[tokio::test]
async fn deny_rules_refuse_before_any_allow_and_name_themselves() {
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let config = GatewayConfig::for_origin(port)
        .policy("allow_unassigned", true)
        .extra(&format!(
            r#"[[policy.deny]]
name = "no-blob"
hosts = ["*.blob.core.windows.net"]

[[policy.deny]]
name = "paris-not-share1"
hosts = ["{ORIGIN_HOST}"]
branches = ["paris"]
"#
        ))
        .branch(Branch::new("paris").sources(&["127.0.0.2/32"]));
    let mut gw = Gateway::start(&config).await;
    let target = format!("{ORIGIN_HOST}:{port}");

    let blob = connect_reply(gw.addr, "acct.blob.core.windows.net:443").await;
    assert_refused(&blob, 403, "denied by rule no-blob");
    // The reason is in the status line too (what urllib3 shows).
    let mut raw = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut raw,
        b"CONNECT x.blob.core.windows.net:443 HTTP/1.1\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head_bytes(&mut raw).await.unwrap();
    assert!(
        head.starts_with(b"HTTP/1.1 403 denied by rule no-blob\r\n"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let line = gw
        .access_line(|l| l["host"] == "acct.blob.core.windows.net")
        .await;
    assert_eq!(
        (&line["verdict"], &line["end"], &line["rule"]),
        (&"deny".into(), &"policy_denied".into(), &"no-blob".into()),
        "{line}"
    );

    // The branch-scoped deny: paris is refused, an unassigned client is not.
    let (_, paris) = connect_from(gw.addr, "127.0.0.2", &target, "").await;
    assert_eq!(
        (paris.status, paris.header("portcullis-error")),
        (403, Some("denied by rule paris-not-share1")),
        "{paris:?}"
    );
    let (_tunnel, other) = connect_from(gw.addr, "127.0.0.1", &target, "").await;
    assert_eq!(other.status, 200, "{other:?}");

    let (_dir, path) = temp_file("portcullis.toml", &config.to_string());
    let path = path.to_str().unwrap();
    let explained = portcullis(&["explain", "--config", path, "--from", "127.0.0.2", &target]);
    let text = String::from_utf8_lossy(&explained.stdout);
    assert_eq!(explained.status.code(), Some(1), "{text}");
    assert!(
        text.contains("verdict:  deny (denied by rule paris-not-share1)")
            && text.contains("deny rule: paris-not-share1"),
        "{text}"
    );
    let checked = portcullis(&["check-config", path]);
    let text = String::from_utf8_lossy(&checked.stdout);
    assert!(
        text.contains("deny rules (2, checked before every allow rule):")
            && text.contains("  paris-not-share1  ports all  branches paris\n")
            && text.contains("    hosts: *.blob.core.windows.net\n"),
        "{text}"
    );
}

/// A deny rule's `addresses` hold for every address the gateway would dial: a name resolving
/// into them is refused (or dialled only at its other addresses), and an IP literal in an
/// IPv4-embedding IPv6 form meets the rules written for its IPv4 address.
#[tokio::test]
async fn deny_addresses_hold_for_resolved_names_and_every_ipv4_form() {
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let config = format!(
        r#"[listen]
proxy = ["127.0.0.1:0"]
admin = "off"

[[policy.deny]]
name = "forbidden-range"
addresses = ["127.0.0.3/32"]

[[policy.allow]]
name = "loopback-names"
hosts = ["*.loop.example"]
ports = [{port}]
private_addresses = ["127.0.0.0/8"]

[[policy.allow]]
name = "mapped-literals"
addresses = ["::ffff:127.0.0.0/104", "64:ff9b::/96"]
ports = [{port}]

[resolver]
hosts_only = true
hosts = {{ "denied.loop.example" = "127.0.0.3", "mixed.loop.example" = ["127.0.0.3", "127.0.0.1"] }}
"#
    );
    let mut gw = Gateway::start(config.as_str()).await;

    let denied = connect_reply(gw.addr, &format!("denied.loop.example:{port}")).await;
    assert_refused(&denied, 403, "denied by rule forbidden-range");
    let line = gw.access_line(|l| l["host"] == "denied.loop.example").await;
    assert_eq!(
        (&line["verdict"], &line["end"], &line["rule"]),
        (
            &"deny".into(),
            &"policy_denied".into(),
            &"forbidden-range".into()
        ),
        "{line}"
    );

    // Only the address the rule does not deny is dialled.
    let (mut tunnel, status) =
        open_tunnel(gw.addr, &format!("mixed.loop.example:{port}"), b"").await;
    assert_eq!(status, 200);
    send_and_finish(&mut tunnel, b"x").await;
    let line = gw.access_line(|l| l["host"] == "mixed.loop.example").await;
    assert_eq!(line["resolved"], format!("127.0.0.1:{port}"));

    // Mapped and NAT64 literals of the denied address are denied; the mapped CIDR still
    // allows the rest of 127/8 as the IPv4 addresses those literals reach.
    for literal in ["[::ffff:127.0.0.3]", "[64:ff9b::7f00:3]"] {
        let reply = connect_reply(gw.addr, &format!("{literal}:{port}")).await;
        assert_refused(&reply, 403, "denied by rule forbidden-range");
    }
    let (_tunnel, status) = open_tunnel(gw.addr, &format!("[::ffff:127.0.0.1]:{port}"), b"").await;
    assert_eq!(status, 200);

    let (_dir, path) = temp_file("portcullis.toml", &config);
    let path = path.to_str().unwrap();
    let explained = portcullis(&[
        "explain",
        "--config",
        path,
        &format!("mixed.loop.example:{port}"),
    ]);
    let text = String::from_utf8_lossy(&explained.stdout);
    assert!(
        text.contains("127.0.0.3  refused: denied by rule forbidden-range (its addresses)")
            && text.contains("127.0.0.1  ok"),
        "{text}"
    );
}

/// The gateway asks DNS for both families and lists IPv4 first (hickory's own default puts
/// AAAA first), so the dial's race starts with IPv4 and the tunnel leaves over IPv4.
#[tokio::test]
async fn names_resolve_to_both_families_ipv4_first() {
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let dns = fake_dns_with(Ipv4Addr::LOCALHOST, Some(std::net::Ipv6Addr::LOCALHOST)).await;
    let config = GatewayConfig::new()
        .rule(
            Rule::new("both")
                .hosts(&["*.both.example"])
                .ports(&[port])
                .private_addresses(&["127.0.0.1/32", "::1/128"]),
        )
        .dns(&[dns], "2s");
    let (_dir, path) = temp_file("portcullis.toml", &config.to_string());
    let target = format!("share.both.example:{port}");
    // Off the runtime's thread: the DNS server answers from this runtime meanwhile.
    let args = ["explain", "--config", path.to_str().unwrap(), &target].map(str::to_owned);
    let out = tokio::task::spawn_blocking(move || portcullis(&args.each_ref().map(String::as_str)))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("addresses (dns):\n  127.0.0.1  ok\n  ::1  ok\n"),
        "{text}"
    );
    let mut gw = Gateway::start(config).await;
    let (mut tunnel, status) = open_tunnel(gw.addr, &target, b"").await;
    assert_eq!(status, 200);
    send_and_finish(&mut tunnel, b"x").await;
    let line = gw.access_line(|l| l["host"] == "share.both.example").await;
    assert_eq!(line["resolved"], format!("127.0.0.1:{port}"));
}
