//! The tunnel: a two-way byte copy with half-close, an idle timeout and byte counts per
//! direction. One future polls both directions, so there is no task or lock per chunk. A
//! direction takes a buffer from a small per-thread spare list only when its source turns
//! readable and gives it back as soon as it has drained, so the thousands of idle sync sessions
//! a gateway holds cost no buffer memory, and a busy tunnel reuses warm buffers without
//! allocating. The idle check reads the byte counters on a coarse tick instead of touching the
//! clock per chunk.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep, sleep_until};

use crate::throttle::{Gate, Gates};

/// Per-direction buffer while data flows. Larger buffers mean fewer system calls per byte on
/// bulk transfers (see docs/benchmarks.md); only active directions hold one.
pub const BUFFER_BYTES: usize = 64 * 1024;

/// Longest interval between idle checks.
const MAX_TICK: Duration = Duration::from_secs(30);

/// Drained buffers kept per worker thread for the next readable direction; beyond this they
/// are freed. Bounds the pool at 512 KiB per thread.
const SPARE_BUFFERS_PER_THREAD: usize = 8;

thread_local! {
    static SPARE_BUFFERS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take_buffer() -> Box<[u8]> {
    SPARE_BUFFERS
        .try_with(|spare| spare.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_else(|| vec![0; BUFFER_BYTES].into_boxed_slice())
}

fn give_back(buf: Box<[u8]>) {
    let _ = SPARE_BUFFERS.try_with(|spare| {
        let mut spare = spare.borrow_mut();
        if spare.len() < SPARE_BUFFERS_PER_THREAD {
            spare.push(buf);
        }
    });
}

/// A tunnel endpoint: a byte stream that can say "readable" before a buffer is committed.
pub trait Endpoint: AsyncRead + AsyncWrite + Unpin {
    /// Ready when a read would make progress (data, EOF or error).
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Endpoint for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
}

impl Endpoint for tokio::io::DuplexStream {
    fn poll_read_ready(&self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // In-memory test streams cannot report readiness; take the buffer at once.
        Poll::Ready(Ok(()))
    }
}

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
    /// A reload's new policy denies it (`on_reload = "close-denied"`).
    Revoked,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Idle => "idle_timeout",
            End::ClientError => "client_error",
            End::UpstreamError => "upstream_error",
            End::Revoked => "closed_by_reload",
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
    pub bytes: u64,
    /// `bytes` at the previous idle tick.
    pub bytes_at_tick: u64,
}

/// One direction's copy engine: user-space buffer (`Pipe`) or splice (`splice::SplicePipe`).
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
struct Pipe {
    /// Held only between "source readable" and "everything read has been written".
    buf: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    eof: bool,
    unflushed: bool,
    progress: Progress,
    /// The budgets this direction obeys, when a schedule can throttle it.
    gate: Option<Box<Gate>>,
}

impl<R: Endpoint + ?Sized, W: Endpoint + ?Sized> Copier<R, W> for Pipe {
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
                // Under a budget in force, read about one burst at a time.
                let limit = self.gate.as_ref().and_then(|g| g.read_limit());
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
                            if let (Some(gate), Some(_)) = (&mut self.gate, limit) {
                                gate.admit(n);
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
            self.progress.throttled = poll_gate(&mut self.gate, cx).is_pending();
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

/// Ready when the bytes read may be written: at once without a gate or a wait.
#[inline]
pub(crate) fn poll_gate(gate: &mut Option<Box<Gate>>, cx: &mut Context<'_>) -> Poll<()> {
    match gate {
        Some(gate) if gate.is_waiting() => gate.poll_admit(cx),
        _ => Poll::Ready(()),
    }
}

impl Pipe {
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

/// Copies both ways between `client` and `upstream` until both sides have closed, one fails, or
/// no byte moves for `idle`, through user-space buffers.
///
/// Not an `async fn`: the gates go straight into the copiers instead of also being kept in
/// this future's state for the tunnel's whole life (every idle tunnel pays for its future).
pub fn relay<'a, C, U>(
    client: &'a mut C,
    upstream: &'a mut U,
    idle: Duration,
    stop: Option<&'a Notify>,
    gates: Gates,
) -> impl Future<Output = Outcome> + 'a
where
    C: Endpoint + ?Sized,
    U: Endpoint + ?Sized,
{
    drive(
        client,
        upstream,
        idle,
        stop,
        Pipe {
            gate: gates.upload,
            ..Pipe::default()
        },
        Pipe {
            gate: gates.download,
            ..Pipe::default()
        },
    )
}

/// `relay` for plain TCP on both sides: on Linux the bytes never enter user space (splice).
pub fn relay_tcp<'a>(
    client: &'a mut TcpStream,
    upstream: &'a mut TcpStream,
    idle: Duration,
    stop: Option<&'a Notify>,
    gates: Gates,
) -> impl Future<Output = Outcome> + 'a {
    #[cfg(target_os = "linux")]
    {
        use crate::splice::SplicePipe;
        drive(
            client,
            upstream,
            idle,
            stop,
            SplicePipe::with_gate(gates.upload),
            SplicePipe::with_gate(gates.download),
        )
    }
    #[cfg(not(target_os = "linux"))]
    {
        relay(client, upstream, idle, stop, gates)
    }
}

/// The relay loop, whatever copies the bytes: both directions and the idle check in one future.
async fn drive<C, U, P>(
    client: &mut C,
    upstream: &mut U,
    idle: Duration,
    stop: Option<&Notify>,
    mut up: P,
    mut down: P,
) -> Outcome
where
    C: ?Sized,
    U: ?Sized,
    P: Copier<C, U> + Copier<U, C>,
{
    // At least four checks per idle period: a tunnel is closed between `idle` and
    // `idle` + one tick after its last byte.
    let tick = (idle / 4).clamp(Duration::from_millis(1), MAX_TICK);
    let mut idle_check: Pin<Box<Sleep>> = Box::pin(sleep_until(Instant::now() + tick));
    let mut quiet = Duration::ZERO;

    // A reload that revokes this tunnel (`on_reload = "close-denied"`) wakes this.
    let mut revoked = stop.map(|n| Box::pin(n.notified()));
    let end = poll_fn(|cx| {
        if let Some(revoked) = &mut revoked
            && revoked.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(End::Revoked);
        }
        if !Copier::<C, U>::progress(&mut up).done {
            match Copier::<C, U>::poll_copy(&mut up, cx, client, upstream) {
                Poll::Ready(Err(Failed::Reader)) => return Poll::Ready(End::ClientError),
                // The upstream already closed its side and then stopped reading: it is done.
                Poll::Ready(Err(Failed::Writer)) if Copier::<U, C>::progress(&mut down).done => {
                    return Poll::Ready(End::Closed);
                }
                Poll::Ready(Err(Failed::Writer)) => return Poll::Ready(End::UpstreamError),
                Poll::Ready(Ok(())) | Poll::Pending => {}
            }
        }
        if !Copier::<U, C>::progress(&mut down).done {
            match Copier::<U, C>::poll_copy(&mut down, cx, upstream, client) {
                Poll::Ready(Err(Failed::Reader)) => return Poll::Ready(End::UpstreamError),
                // The client already closed its side and left: what it did not take was its choice.
                Poll::Ready(Err(Failed::Writer)) if Copier::<C, U>::progress(&mut up).done => {
                    return Poll::Ready(End::Closed);
                }
                Poll::Ready(Err(Failed::Writer)) => return Poll::Ready(End::ClientError),
                Poll::Ready(Ok(())) | Poll::Pending => {}
            }
        }
        let (up_p, down_p) = (
            Copier::<C, U>::progress(&mut up),
            Copier::<U, C>::progress(&mut down),
        );
        if up_p.done && down_p.done {
            return Poll::Ready(End::Closed);
        }
        while idle_check.as_mut().poll(cx).is_ready() {
            let moved = up_p.bytes != up_p.bytes_at_tick
                || down_p.bytes != down_p.bytes_at_tick
                || up_p.throttled
                || down_p.throttled;
            quiet = if moved { Duration::ZERO } else { quiet + tick };
            if quiet >= idle {
                return Poll::Ready(End::Idle);
            }
            up_p.bytes_at_tick = up_p.bytes;
            down_p.bytes_at_tick = down_p.bytes;
            let next = idle_check.deadline() + tick;
            idle_check.as_mut().reset(next);
        }
        Poll::Pending
    })
    .await;
    let bytes_up = Copier::<C, U>::progress(&mut up).bytes;
    let bytes_down = Copier::<U, C>::progress(&mut down).bytes;
    Outcome {
        bytes_up,
        bytes_down,
        end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    /// A relay between two in-memory streams; returns the client's and the upstream's far ends.
    fn spawn_relay(
        idle: Duration,
    ) -> (DuplexStream, DuplexStream, tokio::task::JoinHandle<Outcome>) {
        let (client, mut client_side) = duplex(1024);
        let (mut upstream_side, upstream) = duplex(1024);
        let relay = tokio::spawn(async move {
            relay(
                &mut client_side,
                &mut upstream_side,
                idle,
                None,
                Gates::default(),
            )
            .await
        });
        (client, upstream, relay)
    }

    #[tokio::test]
    async fn copies_both_ways_and_forwards_half_close() {
        let (mut client, mut upstream, relay) = spawn_relay(Duration::from_secs(60));
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
        let started = Instant::now();
        let (mut client, mut upstream, relay) = spawn_relay(Duration::from_secs(100));
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
    async fn an_idle_tunnel_holds_no_buffer_and_a_busy_one_reuses_them() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut client_side, _) = listener.accept().await.unwrap();
        let mut upstream_side = TcpStream::connect(addr).await.unwrap();
        let (mut upstream, _) = listener.accept().await.unwrap();
        let mut up = Pipe::default();
        let mut down = Pipe::default();
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
            SPARE_BUFFERS.with(|s| !s.borrow().is_empty()),
            "the buffer waits on the spare list"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_waiting_for_its_bandwidth_turn_is_not_idle() {
        use crate::throttle::{Bucket, Gate};
        use std::sync::Arc;
        let bucket = Arc::new(Bucket::default());
        // 1 kB/s: each 1 KiB chunk waits about a second, longer than the idle timeout.
        bucket.set(Some((1_000, 1)));
        let (mut client, mut client_side) = duplex(64 * 1024);
        let (mut upstream_side, mut upstream) = duplex(64 * 1024);
        let gates = Gates {
            upload: Some(Box::new(Gate::new(vec![bucket], 1))),
            download: None,
        };
        let relay = tokio::spawn(async move {
            relay(
                &mut client_side,
                &mut upstream_side,
                Duration::from_millis(400),
                None,
                gates,
            )
            .await
        });
        client.write_all(&[1u8; 4096]).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 4096);
        drop((client, upstream));
        let outcome = relay.await.unwrap();
        assert_eq!(outcome.bytes_up, 4096);
        assert_ne!(outcome.end, End::Idle);
    }

    #[tokio::test]
    async fn an_upstream_failure_ends_the_tunnel_with_counts() {
        let (mut client, upstream, relay) = spawn_relay(Duration::from_secs(60));
        client.write_all(b"hello").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(upstream);
        client.write_all(b"more").await.unwrap();
        let outcome = relay.await.unwrap();
        assert_eq!(outcome.end, End::UpstreamError);
        assert!(outcome.bytes_up >= 5);
    }
}
