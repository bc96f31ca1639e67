//! Test origins: a real TLS origin (hyper over tokio-rustls) serving checked downloads and
//! uploads, a plain TCP origin that records what it gets, and the payload and hash helpers.

use super::{ORIGIN_HOST, Pki};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
