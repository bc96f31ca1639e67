//! A connection as the data path sees it: plain TCP or TLS over TCP. Plain tunnels can splice;
//! TLS ones copy through the buffered path. One enum for both ends of TLS: the gateway's
//! clients (server side), and the client side: the agent's connections to gateways and the
//! gateway's tunnels through a parent proxy spoken to over TLS.

pub mod server_tls;

pub use server_tls::ServerTls;

use crate::tunnel::Endpoint;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Plain TCP, or `T` (a TLS stream over TCP), boxed: the TLS state is large and a plain
/// connection must not carry its space.
pub enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

/// A client of the gateway.
pub type ClientStream = MaybeTls<ServerTls>;

/// A tunnel's upstream: plain TCP (a direct dial, or a plain parent proxy), or TLS to a
/// parent proxy (`[[parent]]` `tls`), the tunnel's bytes inside it.
pub type Upstream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

impl<T: OverTcp> MaybeTls<T> {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            MaybeTls::Plain(s) => s,
            MaybeTls::Tls(s) => s.tcp(),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A TLS stream over TCP: its socket, for socket options.
pub trait OverTcp {
    fn tcp(&self) -> &TcpStream;
}

impl OverTcp for ServerTls {
    fn tcp(&self) -> &TcpStream {
        ServerTls::tcp(self)
    }
}

impl OverTcp for tokio_rustls::client::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

impl<T: AsyncRead + AsyncWrite + OverTcp + Unpin> Endpoint for MaybeTls<T> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            MaybeTls::Plain(s) => s.poll_read_ready(cx),
            // rustls may hold decrypted bytes the socket no longer signals: always try the read
            // (a Pending read gives the buffer straight back).
            MaybeTls::Tls(_) => Poll::Ready(Ok(())),
        }
    }

    #[cfg(target_os = "linux")]
    fn socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(std::os::fd::AsFd::as_fd(self.tcp()))
    }
}
