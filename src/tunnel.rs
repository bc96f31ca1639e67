//! The tunnel: a two-way byte copy with half-close, an idle timeout and byte counts per
//! direction. One future polls both directions, so there is no task, lock or allocation per
//! chunk; each direction owns one buffer for the tunnel's life. The idle check reads the byte
//! counters on a coarse tick instead of touching the clock per chunk.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep, sleep_until};

/// Per-direction buffer. 32 KiB moves loopback bulk transfers at memory speed while keeping an
/// idle tunnel at 64 KiB of buffers.
pub const BUFFER_BYTES: usize = 32 * 1024;

/// How a tunnel ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Both sides closed their sending half.
    Closed,
    /// No bytes either way for the idle timeout.
    Idle,
    /// Reading from or writing to the client failed (reset, broken pipe).
    ClientError,
    /// Reading from or writing to the upstream failed.
    UpstreamError,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Idle => "idle_timeout",
            End::ClientError => "client_error",
            End::UpstreamError => "upstream_error",
        }
    }
}

/// Bytes carried and how it ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Client to upstream.
    pub bytes_up: u64,
    /// Upstream to client.
    pub bytes_down: u64,
    pub end: End,
}

/// Which side an I/O failure is on, relative to one direction's copy.
enum Failed {
    Reader,
    Writer,
}

/// One direction: read from one side into `buf`, write it all to the other, then forward EOF
/// as a write shutdown.
struct Pipe {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    eof: bool,
    unflushed: bool,
    done: bool,
    bytes: u64,
}

impl Pipe {
    fn new() -> Self {
        Self {
            buf: vec![0; BUFFER_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
            unflushed: false,
            done: false,
            bytes: 0,
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<Result<(), Failed>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.start == self.end && !self.eof {
                let mut read_buf = ReadBuf::new(&mut self.buf);
                match reader.as_mut().poll_read(cx, &mut read_buf) {
                    Poll::Ready(Ok(())) => {
                        let n = read_buf.filled().len();
                        if n == 0 {
                            self.eof = true;
                        } else {
                            (self.start, self.end) = (0, n);
                        }
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(Err(Failed::Reader)),
                    Poll::Pending => {
                        // Nothing more to read now: push out what a buffering writer (TLS) holds.
                        if self.unflushed {
                            ready!(writer.as_mut().poll_flush(cx)).map_err(|_| Failed::Writer)?;
                            self.unflushed = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.start < self.end {
                match ready!(
                    writer
                        .as_mut()
                        .poll_write(cx, &self.buf[self.start..self.end])
                ) {
                    Ok(0) | Err(_) => return Poll::Ready(Err(Failed::Writer)),
                    Ok(n) => {
                        self.start += n;
                        self.bytes += n as u64;
                        self.unflushed = true;
                    }
                }
            }
            if self.eof {
                ready!(writer.as_mut().poll_flush(cx)).map_err(|_| Failed::Writer)?;
                ready!(writer.as_mut().poll_shutdown(cx)).map_err(|_| Failed::Writer)?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Copies both ways between `client` and `upstream` until both sides have closed, one fails, or
/// no byte moves for `idle`.
pub async fn relay<C, U>(client: &mut C, upstream: &mut U, idle: Duration) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut up = Pipe::new();
    let mut down = Pipe::new();
    // Checked four times per idle period: a tunnel is closed between `idle` and 1.25 x `idle`
    // after its last byte.
    let tick = (idle / 4).max(Duration::from_millis(1));
    let mut idle_check: Pin<Box<Sleep>> = Box::pin(sleep_until(Instant::now() + tick));
    let mut seen = 0u64;
    let mut quiet_ticks = 0u32;

    let end = poll_fn(|cx| {
        if !up.done {
            match up.poll_copy(cx, Pin::new(&mut *client), Pin::new(&mut *upstream)) {
                Poll::Ready(Err(Failed::Reader)) => return Poll::Ready(End::ClientError),
                Poll::Ready(Err(Failed::Writer)) => return Poll::Ready(End::UpstreamError),
                Poll::Ready(Ok(())) | Poll::Pending => {}
            }
        }
        if !down.done {
            match down.poll_copy(cx, Pin::new(&mut *upstream), Pin::new(&mut *client)) {
                Poll::Ready(Err(Failed::Reader)) => return Poll::Ready(End::UpstreamError),
                Poll::Ready(Err(Failed::Writer)) => return Poll::Ready(End::ClientError),
                Poll::Ready(Ok(())) | Poll::Pending => {}
            }
        }
        if up.done && down.done {
            return Poll::Ready(End::Closed);
        }
        while idle_check.as_mut().poll(cx).is_ready() {
            let total = up.bytes + down.bytes;
            if total == seen {
                quiet_ticks += 1;
                if quiet_ticks >= 4 {
                    return Poll::Ready(End::Idle);
                }
            } else {
                (seen, quiet_ticks) = (total, 0);
            }
            let next = idle_check.deadline() + tick;
            idle_check.as_mut().reset(next);
        }
        Poll::Pending
    })
    .await;
    Outcome {
        bytes_up: up.bytes,
        bytes_down: down.bytes,
        end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    #[tokio::test]
    async fn copies_both_ways_and_forwards_half_close() {
        let (mut client, mut client_side) = duplex(1024);
        let (mut upstream_side, mut upstream) = duplex(1024);
        let relay = tokio::spawn(async move {
            relay(
                &mut client_side,
                &mut upstream_side,
                Duration::from_secs(60),
            )
            .await
        });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            upstream.read_to_end(&mut got).await.unwrap();
            (upstream, got)
        });
        client.write_all(&[7u8; 100_000]).await.unwrap();
        client.shutdown().await.unwrap();
        let (mut upstream, got) = reader.await.unwrap();
        assert_eq!(
            got.len(),
            100_000,
            "client EOF reaches upstream after all bytes"
        );
        upstream.write_all(b"reply after half-close").await.unwrap();
        upstream.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply after half-close");
        let outcome = relay.await.unwrap();
        assert_eq!(
            outcome,
            Outcome {
                bytes_up: 100_000,
                bytes_down: 22,
                end: End::Closed
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn closes_an_idle_tunnel_after_the_timeout_and_not_before() {
        let (mut client, mut client_side) = duplex(1024);
        let (mut upstream_side, mut upstream) = duplex(1024);
        let started = Instant::now();
        let relay = tokio::spawn(async move {
            relay(
                &mut client_side,
                &mut upstream_side,
                Duration::from_secs(100),
            )
            .await
        });
        // Activity every 60 s keeps it open past the 100 s timeout.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(60)).await;
            client.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            upstream.read_exact(&mut one).await.unwrap();
        }
        let last_byte = Instant::now();
        let outcome = relay.await.unwrap();
        let quiet = Instant::now() - last_byte;
        assert_eq!(outcome.end, End::Idle);
        assert_eq!(outcome.bytes_up, 3);
        assert!(
            quiet >= Duration::from_secs(100) && quiet <= Duration::from_secs(125),
            "closed after {quiet:?} of quiet"
        );
        assert!(Instant::now() - started >= Duration::from_secs(280));
    }

    #[tokio::test]
    async fn an_upstream_failure_ends_the_tunnel_with_counts() {
        let (mut client, mut client_side) = duplex(1024);
        let (mut upstream_side, upstream) = duplex(1024);
        let relay = tokio::spawn(async move {
            relay(
                &mut client_side,
                &mut upstream_side,
                Duration::from_secs(60),
            )
            .await
        });
        client.write_all(b"hello").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(upstream);
        client.write_all(b"more").await.unwrap();
        let outcome = relay.await.unwrap();
        assert_eq!(outcome.end, End::UpstreamError);
        assert!(outcome.bytes_up >= 5);
    }
}
