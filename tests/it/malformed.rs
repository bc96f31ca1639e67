//! Bad input: each malformed request gets its status, the connection is closed, and the gateway
//! keeps serving everyone else.

use crate::support::*;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test]
async fn each_malformed_request_gets_its_status_and_the_gateway_keeps_serving() {
    let pki = Pki::new();
    let origin = Origin::start(&pki).await;
    let mut gw = Gateway::start(GatewayConfig::for_origin(origin.port())).await;
    let huge = format!(
        "CONNECT {ORIGIN_HOST}:443 HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(9000)
    );
    let table: Vec<(Vec<u8>, u16, &str, &str)> = vec![
        (
            huge.into_bytes(),
            431,
            "request head larger than 8 KiB",
            "head_too_large",
        ),
        (
            b"NONSENSE\r\n\r\n".to_vec(),
            400,
            "malformed request line",
            "bad_request",
        ),
        (
            b"CONNECT\r\n\r\n".to_vec(),
            400,
            "malformed request line",
            "bad_request",
        ),
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n".to_vec(),
            400,
            "malformed request line",
            "bad_request",
        ),
        (
            b"CONNECT share1.file.core.windows.net HTTP/1.1\r\n\r\n".to_vec(),
            400,
            "request target has no port",
            "bad_request",
        ),
        (
            b"CONNECT share1.file.core.windows.net:0 HTTP/1.1\r\n\r\n".to_vec(),
            400,
            "port must be a number from 1 to 65535",
            "bad_request",
        ),
        (
            b"CONNECT share1.file.core.windows.net:65536 HTTP/1.1\r\n\r\n".to_vec(),
            400,
            "port must be a number from 1 to 65535",
            "bad_request",
        ),
        (
            b"CONNECT share1.file.core.windows.net:https HTTP/1.1\r\n\r\n".to_vec(),
            400,
            "port must be a number from 1 to 65535",
            "bad_request",
        ),
        (
            b"CONNECT user@share1.file.core.windows.net:443 HTTP/1.1\r\n\r\n".to_vec(),
            400,
            "request target must be host:port (no userinfo, path or query)",
            "bad_request",
        ),
        (
            b"CONNECT bad_name.example:443 HTTP/1.1\r\n\r\n".to_vec(),
            400,
            "host name may hold only letters, digits, hyphens and dots",
            "bad_request",
        ),
        (
            b"CONNECT :443 HTTP/1.1\r\n\r\n".to_vec(),
            400,
            "request target has no host",
            "bad_request",
        ),
        (
            b"PUT http://crl.microsoft.com/pki/crl.crl HTTP/1.1\r\nHost: crl.microsoft.com\r\n\r\n"
                .to_vec(),
            405,
            "method not allowed: only CONNECT",
            "method_not_allowed",
        ),
        (
            b"POST / HTTP/1.1\r\n\r\n".to_vec(),
            405,
            "method not allowed: only CONNECT",
            "method_not_allowed",
        ),
    ];
    for (request, status, reason, end) in table {
        let reply = raw_request(gw.addr, &request).await;
        assert_eq!(
            reply.status,
            status,
            "{:?} -> {reply:?}",
            String::from_utf8_lossy(&request)
        );
        assert_eq!(reply.header("portcullis-error"), Some(reason));
        assert_eq!(reply.header("connection"), Some("close"));
        if status == 405 {
            assert_eq!(reply.header("allow"), Some("CONNECT"));
        }
        let client = reply.client.unwrap().to_string();
        let line = gw.access_line(|l| l["client"] == client.as_str()).await;
        assert_eq!(
            (line["end"].as_str(), line["reason"].as_str()),
            (Some(end), Some(reason))
        );
        assert_eq!(line["status"], status);
        assert_serves(&pki, gw.addr, &origin).await;
    }
}

#[tokio::test]
async fn a_slow_head_gets_408_while_others_are_served() {
    let pki = Pki::new();
    let origin = Origin::start(&pki).await;
    let mut gw =
        Gateway::start(GatewayConfig::for_origin(origin.port()).timeout("head", "1s")).await;

    let mut slow = TcpStream::connect(gw.addr).await.unwrap();
    let started = Instant::now();
    slow.write_all(format!("CONNECT {ORIGIN_HOST}:443 HTTP/1.1\r\n").as_bytes())
        .await
        .unwrap();
    // Meanwhile another client is served at once.
    assert_serves(&pki, gw.addr, &origin).await;
    let reply = read_reply_to_close(&mut slow).await;
    assert_eq!(reply.status, 408);
    assert_eq!(
        reply.header("portcullis-error"),
        Some("no complete request head in time")
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(
        gw.access_line(|l| l["status"] == 408).await["end"],
        "head_timeout"
    );
}

#[tokio::test]
async fn a_client_that_leaves_mid_head_is_logged_and_costs_nothing_else() {
    let pki = Pki::new();
    let origin = Origin::start(&pki).await;
    let mut gw = Gateway::start(GatewayConfig::for_origin(origin.port())).await;
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(b"CONNECT share1.file.core.windows.net:4")
        .await
        .unwrap();
    drop(tcp);
    let line = gw.access_line(|l| l["end"] == "client_closed").await;
    assert_eq!(line["status"], 0);
    assert_serves(&pki, gw.addr, &origin).await;
}
