//! The dial races a name's addresses (Happy Eyeballs): an address that silently drops SYNs
//! costs one attempt delay, not the whole connect timeout, and the access line names the
//! address that carried the tunnel.

use crate::support::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::{TcpSocket, TcpStream};

/// A listener on `addr` whose accept queue is full and never drained: the kernel drops every
/// further SYN, as a dead front end or a broken path does. Holds its sockets while alive.
pub(crate) struct BlackHole {
    _listener: tokio::net::TcpListener,
    _queued: Vec<TcpStream>,
}

impl BlackHole {
    pub(crate) async fn at(addr: SocketAddr) -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(addr).unwrap();
        let listener = socket.listen(1).unwrap();
        // A backlog of 1 holds two connections; the third SYN is dropped.
        let mut queued = Vec::new();
        for _ in 0..2 {
            let connect = TcpStream::connect(addr);
            match tokio::time::timeout(Duration::from_millis(500), connect).await {
                Ok(Ok(stream)) => queued.push(stream),
                _ => break,
            }
        }
        let probe = tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr));
        assert!(probe.await.is_err(), "{addr} still completes handshakes");
        Self {
            _listener: listener,
            _queued: queued,
        }
    }
}

/// A gateway whose rule lets `ORIGIN_HOST`, resolving to `first` then `second`, reach `port`
/// on loopback, with `timeouts.connect = connect` and `timeouts_extra` in `[timeouts]`.
fn racing_config(
    port: u16,
    connect: &str,
    timeouts_extra: &str,
    first: &str,
    second: &str,
) -> String {
    format!(
        r#"
[listen]
proxy = ["127.0.0.1:0"]
admin = "off"

[timeouts]
connect = "{connect}"
{timeouts_extra}

[[policy.allow]]
name = "test-origin"
category = "storage"
hosts = ["{ORIGIN_HOST}"]
ports = [{port}]
private_addresses = ["127.0.0.0/8"]

[resolver]
hosts_only = true
hosts = {{ "{ORIGIN_HOST}" = ["{first}", "{second}"] }}
"#
    )
}

#[tokio::test]
async fn a_dead_first_address_costs_one_attempt_delay_not_the_connect_timeout() {
    let mut origin = TcpOrigin::start(b"ok").await;
    let port = origin.addr.port();
    let _dead = BlackHole::at(SocketAddr::from(([127, 0, 0, 2], port))).await;
    let config = racing_config(
        port,
        "8s",
        "attempt_delay = \"300ms\"",
        "127.0.0.2",
        "127.0.0.1",
    );
    let mut gw = Gateway::start(&config).await;
    let started = Instant::now();
    let (mut tunnel, status) = open_tunnel(gw.addr, &format!("{ORIGIN_HOST}:{port}"), b"").await;
    let took = started.elapsed();
    assert_eq!(status, 200);
    assert!(
        took < Duration::from_secs(3),
        "the second address should win after the attempt delay, took {took:?}"
    );
    assert_eq!(send_and_finish(&mut tunnel, b"hello").await, b"ok");
    assert_eq!(origin.received.recv().await.unwrap(), b"hello");
    let line = gw.access_line(|l| l["end"] == "closed").await;
    assert_eq!(line["resolved"], format!("127.0.0.1:{port}"));
    let connect_ms = line["connect_ms"].as_u64().unwrap();
    assert!(
        (300..3000).contains(&connect_ms),
        "raced after 300 ms: {line}"
    );
}

#[tokio::test]
async fn a_name_whose_every_address_is_dead_times_out_once_for_all() {
    let origin = TcpOrigin::start(b"ok").await;
    let port = origin.addr.port();
    let _dead2 = BlackHole::at(SocketAddr::from(([127, 0, 0, 2], port))).await;
    let _dead3 = BlackHole::at(SocketAddr::from(([127, 0, 0, 3], port))).await;
    let config = racing_config(port, "1s", "", "127.0.0.2", "127.0.0.3");
    let mut gw = Gateway::start(&config).await;
    let started = Instant::now();
    let reply = raw_request(
        gw.addr,
        format!("CONNECT {ORIGIN_HOST}:{port} HTTP/1.1\r\n\r\n").as_bytes(),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(reply.status, 504, "{reply:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "one shared deadline of 1 s, took {took:?}"
    );
    let line = gw.access_line(|l| l["end"] == "connect_timeout").await;
    assert_eq!(
        line["resolved"],
        format!("127.0.0.3:{port}"),
        "the last one started"
    );
}

#[test]
fn the_attempt_delay_is_checked_and_shown() {
    for (value, ok) in [
        ("50ms", false),
        ("3s", false),
        ("100ms", true),
        ("2s", true),
    ] {
        let (_dir, path) = temp_file(
            "t.toml",
            &format!("[timeouts]\nattempt_delay = \"{value}\"\n"),
        );
        let out = portcullis(&["check-config", path.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if ok {
            assert_eq!(out.status.code(), Some(0), "{value}: {stderr}");
            assert!(
                stdout.contains(&format!("next starts after attempt_delay {value}")),
                "{stdout}"
            );
        } else {
            assert_eq!(out.status.code(), Some(64), "{value}");
            assert!(
                stderr.contains("timeouts.attempt_delay: expected a duration from 100ms to 2s"),
                "{stderr}"
            );
        }
    }
}
