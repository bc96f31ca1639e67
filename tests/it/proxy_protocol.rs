//! PROXY protocol from a trusted load balancer: the header's source address identifies the
//! branch; other peers cannot claim an address that way.

use crate::support::*;
use tokio::io::AsyncWriteExt;

fn v2_header(source: [u8; 4], source_port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&source);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&source_port.to_be_bytes());
    h.extend_from_slice(&3128u16.to_be_bytes());
    h
}

/// Connects from `from`, sends `prefix` then a CONNECT, returns the reply status (0 if the
/// gateway closed without one).
async fn via(gw: std::net::SocketAddr, from: &str, prefix: &[u8], target: &str) -> u16 {
    let mut tcp = connect_bound(gw, from).await;
    let mut request = prefix.to_vec();
    request.extend_from_slice(format!("CONNECT {target} HTTP/1.1\r\n\r\n").as_bytes());
    tcp.write_all(&request).await.unwrap();
    match read_head_bytes(&mut tcp).await {
        Ok(head) => status_of(&head),
        Err(_) => 0,
    }
}

#[tokio::test]
async fn a_trusted_balancer_names_the_client_with_v1_or_v2_and_others_cannot() {
    let origin = TcpOrigin::start(b"ok").await;
    let port = origin.addr.port();
    let config = GatewayConfig::for_origin(port)
        .listen("clients", ["127.0.0.0/8", "10.0.0.0/8"])
        .listen("proxy_protocol_from", ["127.0.0.7/32"])
        .branch(Branch::new("london").sources(&["10.1.0.0/16"]))
        .branch(Branch::new("paris").sources(&["10.2.0.0/16"]));
    let mut gw = Gateway::start(config).await;
    let target = format!("{ORIGIN_HOST}:{port}");

    // v1 from the balancer: the client is 10.1.2.3, branch london.
    let v1 = b"PROXY TCP4 10.1.2.3 127.0.0.1 40001 3128\r\n";
    assert_eq!(via(gw.addr, "127.0.0.7", v1, &target).await, 200);
    let line = gw.access_line(|l| l["client"] == "10.1.2.3:40001").await;
    assert_eq!(line["branch"], "london");

    // v2 from the balancer: 10.2.0.9, branch paris.
    assert_eq!(
        via(
            gw.addr,
            "127.0.0.7",
            &v2_header([10, 2, 0, 9], 40002),
            &target
        )
        .await,
        200
    );
    assert_eq!(
        gw.access_line(|l| l["client"] == "10.2.0.9:40002").await["branch"],
        "paris"
    );

    // The balancer without a header: refused, logged.
    assert_eq!(via(gw.addr, "127.0.0.7", b"", &target).await, 0);
    let line = gw.access_line(|l| l["end"] == "proxy_protocol_error").await;
    assert_eq!(line["reason"], "malformed PROXY protocol header");

    // Anyone else sending a header is not believed: it is just a bad request.
    let v2 = v2_header([10, 1, 0, 1], 40003);
    assert_eq!(
        via(gw.addr, "127.0.0.9", &v2, &target).await,
        400,
        "a v2 header from another peer"
    );
    assert_eq!(via(gw.addr, "127.0.0.8", v1, &target).await, 400);
    let line = gw
        .access_line(|l| {
            l["client"]
                .as_str()
                .unwrap_or_default()
                .starts_with("127.0.0.8:")
        })
        .await;
    assert_eq!(line["end"], "bad_request");
}
