//! One direction's copy: the [`Copier`] contract the relay loop drives (bytes counted, EOF
//! forwarded as a write shutdown, which side failed), and the user-space engine
//! ([`Buffered`]) for tunnels whose bytes must pass through a buffer (TLS clients). The
//! spliced engine is in `splice`.

use super::spare::{self, Spares};
use crate::bandwidth::{Pacer, poll_turn};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Per-direction buffer while data flows. Larger buffers mean fewer system calls per byte on
/// bulk transfers (see docs/benchmarks.md); only active directions hold one.
pub const BUFFER_BYTES: usize = 64 * 1024;

/// Drained buffers kept per worker thread for the next readable direction; beyond this they
/// are freed. Bounds the pool at 512 KiB per thread.
const SPARE_BUFFERS_PER_THREAD: usize = 8;

thread_local! {
    pub(super) static SPARE_BUFFERS: Spares<Box<[u8]>> = const { Spares::new() };
}

/// A buffer of [`BUFFER_BYTES`] from this thread's spare list, or a new one.
pub(crate) fn take_buffer() -> Box<[u8]> {
    spare::take(&SPARE_BUFFERS).unwrap_or_else(|| vec![0; BUFFER_BYTES].into_boxed_slice())
}

/// Returns a buffer to this thread's spare list (freed beyond its bound).
pub(crate) fn give_back(buf: Box<[u8]>) {
    spare::give_back(&SPARE_BUFFERS, buf, SPARE_BUFFERS_PER_THREAD);
}

/// A tunnel endpoint: a byte stream that can say "readable" before a buffer is committed.
pub trait Endpoint: AsyncRead + AsyncWrite + Unpin {
    /// Ready when a read would make progress (data, EOF or error).
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// The TCP socket underneath, for the throttle's queue bound; `None` for in-memory streams.
    #[cfg(target_os = "linux")]
    fn socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}

impl Endpoint for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }

    #[cfg(target_os = "linux")]
    fn socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(std::os::fd::AsFd::as_fd(self))
    }
}

impl Endpoint for tokio::io::DuplexStream {
    fn poll_read_ready(&self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // In-memory test streams cannot report readiness; take the buffer at once.
        Poll::Ready(Ok(()))
    }
}

/// The most a direction may read now (`None`: no budget in force). On Linux the direction's
/// socket queues are brought in line with the limit first (`queue::bound`).
pub(super) fn read_limit<R: Endpoint + ?Sized, W: Endpoint + ?Sized>(
    pacer: &mut Option<Box<Pacer>>,
    src: &R,
    dst: &W,
) -> Option<usize> {
    let pacer = pacer.as_mut()?;
    let limit = pacer.read_limit();
    #[cfg(target_os = "linux")]
    if let (Some(src), Some(dst)) = (src.socket(), dst.socket()) {
        super::queue::bound(&mut pacer.queue, limit, src, dst);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (src, dst);
    limit
}

/// Which side an I/O failure is on, relative to one direction's copy.
pub(crate) enum Failed {
    Reader,
    Writer,
}

/// What the relay loop reads of a direction, whatever copies its bytes.
#[derive(Default)]
pub(crate) struct Progress {
    pub done: bool,
    /// Bytes read are waiting for their turn in a bandwidth budget: not idle.
    pub throttled: bool,
    /// Bytes moved since the previous idle tick that are already counted (not idle).
    pub moved: bool,
    pub bytes: u64,
    /// Of `bytes`, those already added to the tunnel's byte counter.
    pub bytes_counted: u64,
}

impl Progress {
    /// Adds the bytes not yet counted to `counter`; returns how many that was.
    pub fn count(&mut self, counter: &prometheus_client::metrics::counter::Counter) -> u64 {
        let new = self.bytes - self.bytes_counted;
        if new != 0 {
            counter.inc_by(new);
            self.bytes_counted = self.bytes;
            self.moved = true;
        }
        new
    }
}

/// One direction's copy engine: user-space buffer ([`Buffered`]) or splice (`splice::Spliced`).
pub(crate) trait Copier<R: ?Sized, W: ?Sized> {
    /// Moves bytes from `src` to `dst`; `Ready(Ok)` once EOF has been forwarded.
    fn poll_copy(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut R,
        dst: &mut W,
    ) -> Poll<Result<(), Failed>>;
    fn progress(&mut self) -> &mut Progress;
}

/// One direction: read from one side into `buf`, write it all to the other, then forward EOF
/// as a write shutdown.
#[derive(Default)]
pub(crate) struct Buffered {
    /// Held only between "source readable" and "everything read has been written".
    buf: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    eof: bool,
    unflushed: bool,
    progress: Progress,
    /// The budgets this direction obeys, when a schedule can throttle it.
    pacer: Option<Box<Pacer>>,
}

impl Buffered {
    pub fn with_pacer(pacer: Option<Box<Pacer>>) -> Self {
        Self {
            pacer,
            ..Self::default()
        }
    }
}

impl<R: Endpoint + ?Sized, W: Endpoint + ?Sized> Copier<R, W> for Buffered {
    fn progress(&mut self) -> &mut Progress {
        &mut self.progress
    }

    fn poll_copy(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<Result<(), Failed>> {
        loop {
            if self.start == self.end && !self.eof {
                if self.buf.is_none() {
                    match reader.poll_read_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(_)) => return Poll::Ready(Err(Failed::Reader)),
                        Poll::Pending => return self.poll_flush_pending(cx, writer),
                    }
                }
                // Under a budget in force, read about one burst at a time, with short queues.
                let limit = read_limit(&mut self.pacer, &*reader, &*writer);
                let buf = self.buf.get_or_insert_with(take_buffer);
                let len = limit.map_or(buf.len(), |l| l.min(buf.len()));
                let mut read_buf = ReadBuf::new(&mut buf[..len]);
                match Pin::new(&mut *reader).poll_read(cx, &mut read_buf) {
                    Poll::Ready(Ok(())) => {
                        let n = read_buf.filled().len();
                        if n == 0 {
                            self.eof = true;
                        } else {
                            (self.start, self.end) = (0, n);
                            if let (Some(pacer), Some(_)) = (&mut self.pacer, limit) {
                                pacer.admit(n);
                            }
                        }
                    }
                    // A TLS client that closes without close_notify: the tunnel's end, not a fault.
                    Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        self.eof = true
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(Err(Failed::Reader)),
                    Poll::Pending => {
                        // Drained: the buffer goes back until the source is readable again.
                        if let Some(buf) = self.buf.take() {
                            give_back(buf);
                        }
                        return self.poll_flush_pending(cx, writer);
                    }
                }
            }
            self.progress.throttled = poll_turn(&mut self.pacer, cx).is_pending();
            if self.progress.throttled {
                return self.poll_flush_pending(cx, writer);
            }
            if let Some(buf) = &self.buf {
                while self.start < self.end {
                    match ready!(Pin::new(&mut *writer).poll_write(cx, &buf[self.start..self.end]))
                    {
                        Ok(0) | Err(_) => return Poll::Ready(Err(Failed::Writer)),
                        Ok(n) => {
                            self.start += n;
                            self.progress.bytes += n as u64;
                            self.unflushed = true;
                        }
                    }
                }
            }
            if self.eof {
                ready!(Pin::new(&mut *writer).poll_flush(cx)).map_err(|_| Failed::Writer)?;
                ready!(Pin::new(&mut *writer).poll_shutdown(cx)).map_err(|_| Failed::Writer)?;
                self.progress.done = true;
                if let Some(buf) = self.buf.take() {
                    give_back(buf);
                }
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl Buffered {
    /// Nothing more to read now: push out what a buffering writer (TLS) still holds.
    fn poll_flush_pending<W: Endpoint + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        writer: &mut W,
    ) -> Poll<Result<(), Failed>> {
        if self.unflushed {
            ready!(Pin::new(writer).poll_flush(cx)).map_err(|_| Failed::Writer)?;
            self.unflushed = false;
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn an_idle_tunnel_holds_no_buffer_and_a_busy_one_reuses_them() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut client_side, _) = listener.accept().await.unwrap();
        let mut upstream_side = TcpStream::connect(addr).await.unwrap();
        let (mut upstream, _) = listener.accept().await.unwrap();
        let mut up = Buffered::default();
        let mut down = Buffered::default();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        // Nothing to read: no buffer is taken.
        assert!(
            up.poll_copy(&mut cx, &mut client_side, &mut upstream_side)
                .is_pending()
        );
        assert!(
            down.poll_copy(&mut cx, &mut upstream_side, &mut client_side)
                .is_pending()
        );
        assert!(up.buf.is_none() && down.buf.is_none());
        // Bytes arrive, are copied, and the drained direction gives its buffer back.
        client.write_all(b"sync batch").await.unwrap();
        client_side.readable().await.unwrap();
        assert!(
            up.poll_copy(&mut cx, &mut client_side, &mut upstream_side)
                .is_pending()
        );
        assert_eq!(up.progress.bytes, 10);
        assert!(up.buf.is_none());
        let mut got = [0u8; 10];
        upstream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"sync batch");
        assert!(
            SPARE_BUFFERS.with(|s| !s.is_empty()),
            "the buffer waits on the spare list"
        );
    }
}
