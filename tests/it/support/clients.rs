//! Clients of the gateway: a reqwest client through the proxy, raw requests and their `Reply`
//! (`admin_get` for the admin listener), CONNECT tunnels (optionally from a bound loopback address), and reply head parsing.

use super::{ORIGIN_HOST, Origin, Pki};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A reqwest client using `gateway` as its proxy and trusting the test CA; no pooled
/// connections, so each request gets its own tunnel and access line.
pub fn client(pki: &Pki, gateway: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(format!("http://{gateway}")).unwrap())
        .tls_backend_preconfigured(pki.client_config())
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// Downloads 16 bytes from the origin through the gateway: proof the gateway still serves.
pub async fn assert_serves(pki: &Pki, gateway: SocketAddr, origin: &Origin) {
    let url = format!("https://{ORIGIN_HOST}:{}/download?bytes=16", origin.port());
    let resp = client(pki, gateway)
        .get(url)
        .send()
        .await
        .expect("gateway still serves a good request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().len(), 16);
}

/// A reply the gateway sent on its own: status, headers (lowercase names), body.
#[derive(Debug)]
pub struct Reply {
    /// The client side address of the connection, as the gateway logs it.
    pub client: Option<SocketAddr>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` from the admin listener at `admin`.
pub async fn admin_get(admin: SocketAddr, path: &str) -> Reply {
    raw_request(
        admin,
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
}

/// `METHOD path` to the admin listener at `admin`, with `Authorization: Bearer token` when
/// given.
pub async fn admin_request(
    admin: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Reply {
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    raw_request(
        admin,
        format!("{method} {path} HTTP/1.1\r\nHost: admin\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
}

/// A TCP origin that echoes what it reads until the client half-closes; returns its address.
pub async fn echo_origin() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = tcp.into_split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    addr
}

/// Sends raw `request` bytes and reads the reply until the gateway closes the connection
/// (it must, after any error reply); panics if it does not within 15 s.
pub async fn raw_request(gateway: SocketAddr, request: &[u8]) -> Reply {
    let mut tcp = TcpStream::connect(gateway).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut reply = read_reply_to_close(&mut tcp).await;
    reply.client = tcp.local_addr().ok();
    reply
}

pub async fn read_reply_to_close(tcp: &mut TcpStream) -> Reply {
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), tcp.read_to_end(&mut raw))
        .await
        .expect("gateway closes the connection after an error reply")
        .unwrap();
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no reply head in {text:?}"));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Reply {
        client: None,
        status,
        headers,
        body: body.to_owned(),
    }
}

/// Reads a reply head byte by byte (nothing after it is consumed), within 15 s.
pub async fn read_head_bytes<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Vec<u8>, String> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(15), stream.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            Ok(Ok(_)) => {
                return Err(format!(
                    "closed before a reply head: {:?}",
                    String::from_utf8_lossy(&head)
                ));
            }
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("no reply head in 15 s".into()),
        }
    }
    Ok(head)
}

/// The status code of a reply head.
pub fn status_of(head: &[u8]) -> u16 {
    parse_reply(head).status
}

/// Sends CONNECT for `target` (plus `early` bytes in the same write) and reads only the reply
/// head; returns the open stream and the status.
pub async fn open_tunnel(gateway: SocketAddr, target: &str, early: &[u8]) -> (TcpStream, u16) {
    let mut tcp = TcpStream::connect(gateway).await.unwrap();
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").into_bytes();
    request.extend_from_slice(early);
    tcp.write_all(&request).await.unwrap();
    let head = read_head_bytes(&mut tcp).await.expect("a reply head");
    let status = parse_reply(&head).status;
    (tcp, status)
}

/// Sends `CONNECT target` with extra header lines from a client bound to `from` (any loopback
/// address) and reads the reply head; the stream stays open (a tunnel, or closing after an
/// error reply).
pub async fn connect_from(
    gateway: SocketAddr,
    from: &str,
    target: &str,
    headers: &str,
) -> (TcpStream, Reply) {
    let mut tcp = connect_bound(gateway, from).await;
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{headers}\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let head = read_head_bytes(&mut tcp).await.expect("a reply head");
    let mut reply = parse_reply(&head);
    reply.client = tcp.local_addr().ok();
    (tcp, reply)
}

/// Sends `bytes` through an open tunnel, half-closes it, and returns all that comes back.
pub async fn send_and_finish<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
) -> Vec<u8> {
    stream.write_all(bytes).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await.unwrap();
    reply
}

/// A TCP connection to `gateway` from the loopback address `from` (127.0.0.x).
pub async fn connect_bound(gateway: SocketAddr, from: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(gateway).await.unwrap()
}

/// `Proxy-Authorization: Basic ...` header line for `user:password`.
pub fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Proxy-Authorization: Basic {token}\r\n")
}
