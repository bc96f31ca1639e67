//! Test origins: a real TLS origin (hyper over tokio-rustls) serving checked downloads and
//! uploads, one that answers x25519 key shares with a HelloRetryRequest and reports the
//! ClientHellos that reached it, a plain TCP origin that records what it gets, and the payload
//! and hash helpers.

use super::{ORIGIN_HOST, Pki};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;

/// Deterministic incompressible bytes, so a transfer cannot be faked by a pattern.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A TLS origin server: `GET /download?bytes=N` sends N payload bytes with their SHA-256 in
/// `x-sha256`; `POST /upload` answers with the SHA-256 of what it received.
pub struct Origin {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Origin {
    pub async fn start(pki: &Pki) -> Self {
        Self::start_named(pki, &[ORIGIN_HOST]).await
    }

    /// An origin whose certificate carries `names` (DNS names the clients will verify).
    pub async fn start_named(pki: &Pki, names: &[&str]) -> Self {
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config(names));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service_fn(origin_route))
                        .await;
                });
            }
        });
        Self { addr, task }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TLS origin (serving like [`Origin`]) whose only key exchange group is secp256r1: a client
/// that sends an x25519 key share first (rustls does, offering secp256r1 second) gets a
/// HelloRetryRequest. For every connection it reports what reached it.
pub struct RetryOrigin {
    pub addr: SocketAddr,
    pub seen: tokio::sync::mpsc::UnboundedReceiver<Seen>,
    task: tokio::task::JoinHandle<()>,
}

/// One connection to a [`RetryOrigin`], reported when its handshake ends.
#[derive(Debug)]
pub struct Seen {
    /// The server name of every ClientHello that reached the origin (`None`: no name).
    pub hellos: Vec<Option<String>>,
    /// How the handshake completed; `None` when it failed.
    pub completed: Option<rustls::HandshakeKind>,
}

impl RetryOrigin {
    pub async fn start(pki: &Pki) -> Self {
        let provider = rustls::crypto::CryptoProvider {
            kx_groups: vec![rustls::crypto::ring::kx_group::SECP256R1],
            ..rustls::crypto::ring::default_provider()
        };
        let acceptor =
            tokio_rustls::TlsAcceptor::from(pki.server_config_with(&[ORIGIN_HOST], provider));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, seen) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let received = Arc::new(Mutex::new(Vec::new()));
                    let tcp = Recorded {
                        inner: tcp,
                        received: received.clone(),
                    };
                    let accepted = acceptor.accept(tcp).await;
                    let hellos = client_hello_names(&received.lock().unwrap());
                    let completed = accepted
                        .as_ref()
                        .ok()
                        .and_then(|tls| tls.get_ref().1.handshake_kind());
                    let _ = tx.send(Seen { hellos, completed });
                    if let Ok(tls) = accepted {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), service_fn(origin_route))
                            .await;
                    }
                });
            }
        });
        Self { addr, seen, task }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The report on the next connection that ended its handshake, within 10 s.
    pub async fn next_seen(&mut self) -> Seen {
        tokio::time::timeout(std::time::Duration::from_secs(10), self.seen.recv())
            .await
            .expect("the origin reports a connection")
            .unwrap()
    }
}

impl Drop for RetryOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A stream that keeps a copy of every byte read from it.
struct Recorded<S> {
    inner: S,
    received: Arc<Mutex<Vec<u8>>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Recorded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let new = buf.filled()[before..].to_vec();
        self.received.lock().unwrap().extend_from_slice(&new);
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recorded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The server names of the ClientHellos in a client's TLS bytes, each hello in one record (as
/// rustls sends them); other records are passed over.
pub fn client_hello_names(mut bytes: &[u8]) -> Vec<Option<String>> {
    let mut names = Vec::new();
    while bytes.len() >= 5 {
        let end = 5 + usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
        let Some(record) = bytes.get(..end) else {
            break;
        };
        if record[0] == 22 && record.get(5) == Some(&1) {
            let mut acceptor = rustls::server::Acceptor::default();
            let mut input = record;
            let name = match acceptor.read_tls(&mut input).map(|_| acceptor.accept()) {
                Ok(Ok(Some(accepted))) => accepted.client_hello().server_name().map(str::to_owned),
                _ => panic!("an unreadable ClientHello reached the origin"),
            };
            names.push(name);
        }
        bytes = &bytes[end..];
    }
    names
}

async fn origin_route(
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    if path == "/upload" {
        let body = req.into_body().collect().await?.to_bytes();
        let answer = format!("{} {}", body.len(), sha256_hex(&body));
        return Ok(Response::new(Full::new(Bytes::from(answer))));
    }
    let len: usize = query
        .strip_prefix("bytes=")
        .and_then(|n| n.parse().ok())
        .unwrap_or(16);
    let body = payload(len, len as u64);
    let hash = sha256_hex(&body);
    Ok(Response::builder()
        .header("x-sha256", hash)
        .body(Full::new(Bytes::from(body)))
        .unwrap())
}

/// A plain TCP origin that records what it receives and answers with a fixed reply once the
/// client half-closes.
pub struct TcpOrigin {
    pub addr: SocketAddr,
    pub received: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
}

impl TcpOrigin {
    pub async fn start(reply: &'static [u8]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, received) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let _ = tcp.read_to_end(&mut got).await;
                    let _ = tx.send(got);
                    let _ = tcp.write_all(reply).await;
                    let _ = tcp.shutdown().await;
                });
            }
        });
        Self { addr, received }
    }
}
