//! The IO side of a gate: [`Pacer`] reads the clock, feeds the arithmetic in [`Gate`] and
//! sleeps until the turn comes; the tunnel copies hold one per throttled direction.
//! [`Paced`] wraps a stream for bytes that do not go through the tunnel copy (the plain-HTTP
//! lane: CRL and OCSP answers, OCSP requests).

use super::bucket::Timeline;
use super::gate::{Admission, Gate};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// One throttled direction of one tunnel.
pub struct Pacer {
    gate: Gate,
    timeline: Timeline,
    /// Made on the first wait, then reset: no allocation per chunk.
    sleep: Option<Pin<Box<Sleep>>>,
    /// What the tunnel last did to this direction's socket queues.
    pub queue: QueueBound,
    /// Nanoseconds this direction has waited for its turns (the live-tunnel listing reads it).
    waits: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// When the wait in progress began (timeline nanoseconds).
    waiting_since: Option<u64>,
}

/// `limits.throttle_queue` by default: a throttled direction's receive buffer holds 100 ms of
/// its limit, which covers branches up to about 100 ms away (docs/guide.md: short queues).
pub const DEFAULT_THROTTLE_QUEUE: std::time::Duration = std::time::Duration::from_millis(100);

/// The socket settings a throttled direction applied to keep its queues short (the tunnel's
/// queue bound reads and writes it; kept here so only throttled directions carry it).
#[derive(Debug)]
pub struct QueueBound {
    /// `limits.throttle_queue`: the receive buffer holds this much of the limit; 0 is off.
    pub millis: u32,
    /// The read limit the sockets were last set for; 0 when they are at their defaults.
    pub burst: usize,
    /// Whether the source's receive buffer was set (and so taken out of autotuning).
    pub receive_set: bool,
}

impl Default for QueueBound {
    fn default() -> Self {
        Self {
            millis: DEFAULT_THROTTLE_QUEUE.as_millis() as u32,
            burst: 0,
            receive_set: false,
        }
    }
}

impl Pacer {
    pub fn new(gate: Gate, timeline: Timeline) -> Self {
        Self {
            gate,
            timeline,
            sleep: None,
            queue: QueueBound::default(),
            waits: Default::default(),
            waiting_since: None,
        }
    }

    /// The nanoseconds this direction has waited for its turns, as they add up.
    pub fn waits(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        self.waits.clone()
    }

    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// The largest read allowed now; `None` when no budget is in force.
    #[inline]
    pub fn read_limit(&self) -> Option<usize> {
        self.gate.read_limit()
    }

    /// `bytes` were read under a limit: they take their turns now.
    pub fn admit(&mut self, bytes: usize) {
        self.gate.admit(self.timeline.now(), bytes);
    }

    #[inline]
    pub fn is_waiting(&self) -> bool {
        self.gate.is_waiting()
    }

    /// Ready once every budget in force lets the admitted bytes go.
    pub fn poll_admit(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let now = self.timeline.now();
            let at = match self.gate.check(now) {
                Admission::Go => {
                    if let Some(since) = self.waiting_since.take() {
                        let waited = now.saturating_sub(since);
                        self.waits
                            .fetch_add(waited, std::sync::atomic::Ordering::Relaxed);
                    }
                    return Poll::Ready(());
                }
                Admission::WaitUntil(at) => {
                    self.waiting_since.get_or_insert(now);
                    self.timeline.instant(at)
                }
            };
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            sleep.as_mut().reset(at);
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

impl Drop for Pacer {
    /// A tunnel that ends gives what it paid for and did not send back to its budgets.
    fn drop(&mut self) {
        self.gate.end(self.timeline.now());
    }
}

/// Ready when the bytes read may be written: at once without a pacer or a wait.
#[inline]
pub fn poll_turn(pacer: &mut Option<Box<Pacer>>, cx: &mut Context<'_>) -> Poll<()> {
    match pacer {
        Some(pacer) if pacer.is_waiting() => pacer.poll_admit(cx),
        _ => Poll::Ready(()),
    }
}

/// A tunnel's pacers, one per direction; `None` where nothing can throttle it.
#[derive(Default)]
pub struct Pacers {
    pub upload: Option<Box<Pacer>>,
    pub download: Option<Box<Pacer>>,
}

/// A stream whose reads wait for one pacer and whose writes wait for another. Each read or
/// write moves at most one chunk and pays for it; the next one waits its turn.
pub struct Paced<S> {
    inner: S,
    reads: Option<Box<Pacer>>,
    writes: Option<Box<Pacer>>,
}

impl<S> Paced<S> {
    pub fn new(inner: S, reads: Option<Box<Pacer>>, writes: Option<Box<Pacer>>) -> Self {
        Self {
            inner,
            reads,
            writes,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Paced<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let Some(pacer) = &mut this.reads else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        if pacer.is_waiting() {
            ready!(pacer.poll_admit(cx));
        }
        let Some(limit) = pacer.read_limit() else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        let want = buf.remaining().min(limit);
        let mut part = ReadBuf::new(buf.initialize_unfilled_to(want));
        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut part))?;
        let n = part.filled().len();
        buf.advance(n);
        if n > 0 {
            pacer.admit(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Paced<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let Some(pacer) = &mut this.writes else {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        };
        if pacer.is_waiting() {
            ready!(pacer.poll_admit(cx));
        }
        let limit = pacer.read_limit().unwrap_or(data.len());
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &data[..data.len().min(limit)]))?;
        if n > 0 && pacer.read_limit().is_some() {
            pacer.admit(n);
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bandwidth::bucket::Bucket;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::Instant;

    /// The clock side: a paced stream really waits for its turns (paused tokio time).
    #[tokio::test(start_paused = true)]
    async fn a_paced_stream_writes_at_the_rate() {
        let timeline = Timeline::starting_now();
        let bucket = Arc::new(Bucket::default());
        bucket.set(Some((100_000, 1)), timeline.now());
        let pacer = Pacer::new(Gate::new(vec![bucket], 1), timeline);
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let start = Instant::now();
        let writer = tokio::spawn(async move {
            let mut paced = Paced::new(near, None, Some(Box::new(pacer)));
            paced.write_all(&[7u8; 200_000]).await.unwrap();
            Instant::now()
        });
        let mut got = vec![0u8; 200_000];
        far.read_exact(&mut got).await.unwrap();
        let took = writer.await.unwrap() - start;
        // 200 kB at 100 kB/s: 2 s, less the burst and the last chunk (written before its
        // turn is paid for, like every chunk).
        assert!(
            took >= Duration::from_millis(1_890) && took <= Duration::from_millis(2_010),
            "{took:?}"
        );
    }
}
