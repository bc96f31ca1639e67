//! The tunnel: a two-way byte copy with half-close, an idle timeout and byte counts per
//! direction. One future polls both directions, so there is no task or lock per chunk. A
//! direction takes a buffer from a small per-thread spare list only when its source turns
//! readable and gives it back as soon as it has drained, so the thousands of idle sync sessions
//! a gateway holds cost no buffer memory, and a busy tunnel reuses warm buffers without
//! allocating. The idle check reads the byte counters on a coarse tick instead of touching the
//! clock per chunk. Bytes reach the metrics while the tunnel runs: after every
//! [`METER_STEP`] bytes, at each idle tick and at the end, one atomic add per direction.

pub mod copy;
pub mod live;
#[cfg(target_os = "linux")]
pub mod queue;
pub mod spare;
#[cfg(target_os = "linux")]
pub mod splice;

pub use crate::end::End;
pub use copy::{BUFFER_BYTES, Endpoint};
pub use live::Live;

use crate::bandwidth::Pacers;
use crate::metrics::{METER_STEP, TunnelBytes};
use copy::{Buffered, Copier, Failed};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;
use tokio::time::{Instant, Sleep, sleep_until};

/// Longest interval between idle checks.
const MAX_TICK: Duration = Duration::from_secs(30);

/// What may end a tunnel from outside: a stop of this tunnel through its live state (an
/// operator, a drain or quarantine of its branch, a reload), and the drain timeout at shutdown
/// (every tunnel). Either ends it with its counts, so its access line is written.
#[derive(Clone, Copy, Default)]
pub struct Stop<'a> {
    /// This tunnel's live state: its bytes are added there too, and its stop ends the relay.
    pub live: Option<&'a Live>,
    pub drained: Option<&'a Closing>,
}

/// The drain timeout's signal to every open tunnel: a flag the relays read on each step (no
/// lock shared by every tunnel), and a wake-up for the idle ones.
#[derive(Default)]
pub struct Closing {
    fired: AtomicBool,
    notify: Notify,
}

impl Closing {
    /// Ends every relay waiting on this (and every later one) with `drain_timeout`.
    pub fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    fn fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }
}

/// A wake-up a relay waits for without taking its lock on every step: the notification is
/// polled once, to leave the task's waker, and after that only its flag is read.
struct Signal<'a> {
    notified: Pin<Box<Notified<'a>>>,
    armed: bool,
}

impl<'a> Signal<'a> {
    fn new(notified: Notified<'a>) -> Self {
        Self {
            notified: Box::pin(notified),
            armed: false,
        }
    }

    /// Whether it fired: `fired` says so, or (the first time) the notification did.
    fn fired(&mut self, cx: &mut Context<'_>, fired: impl Fn() -> bool) -> bool {
        if fired() {
            return true;
        }
        if self.armed {
            return false;
        }
        self.armed = true;
        // A fire between the check above and the waker's registration left the flag set.
        self.notified.as_mut().poll(cx).is_ready() || fired()
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

/// Copies both ways between `client` and `upstream` until both sides have closed, one fails, or
/// no byte moves for `idle`, through user-space buffers.
///
/// Not an `async fn`: the pacers go straight into the copiers instead of also being kept in
/// this future's state for the tunnel's whole life (every idle tunnel pays for its future).
pub fn relay<'a, C, U>(
    client: &'a mut C,
    upstream: &'a mut U,
    idle: Duration,
    stop: Stop<'a>,
    pacers: Pacers,
    meter: TunnelBytes,
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
        meter,
        Buffered::with_pacer(pacers.upload),
        Buffered::with_pacer(pacers.download),
    )
}

/// `relay` for plain TCP on both sides: on Linux the bytes never enter user space (splice).
pub fn relay_tcp<'a>(
    client: &'a mut TcpStream,
    upstream: &'a mut TcpStream,
    idle: Duration,
    stop: Stop<'a>,
    pacers: Pacers,
    meter: TunnelBytes,
) -> impl Future<Output = Outcome> + 'a {
    #[cfg(target_os = "linux")]
    {
        use splice::Spliced;
        drive(
            client,
            upstream,
            idle,
            stop,
            meter,
            Spliced::with_pacer(pacers.upload),
            Spliced::with_pacer(pacers.download),
        )
    }
    #[cfg(not(target_os = "linux"))]
    {
        relay(client, upstream, idle, stop, pacers, meter)
    }
}

/// The relay loop, whatever copies the bytes: both directions and the idle check in one future.
/// Written by hand rather than as an `async fn` around `poll_fn`, whose closure would hold a
/// pointer to every local besides the locals themselves: every idle tunnel pays for this state.
fn drive<'a, C, U, P>(
    client: &'a mut C,
    upstream: &'a mut U,
    idle: Duration,
    stop: Stop<'a>,
    meter: TunnelBytes,
    up: P,
    down: P,
) -> Relay<'a, C, U, P>
where
    C: ?Sized,
    U: ?Sized,
    P: Copier<C, U> + Copier<U, C> + Unpin,
{
    // At least four checks per idle period: a tunnel is closed between `idle` and
    // `idle` + one tick after its last byte.
    let tick = (idle / 4).clamp(Duration::from_millis(1), MAX_TICK);
    Relay {
        client,
        upstream,
        idle,
        tick,
        quiet: Duration::ZERO,
        idle_check: Box::pin(sleep_until(Instant::now() + tick)),
        // A stop of this tunnel wakes this; the waits live on the heap, only for tunnels that
        // have them.
        stopped: stop.live.map(|l| Signal::new(l.notify().notified())),
        live: stop.live,
        drained: stop.drained.map(|c| (Signal::new(c.notify.notified()), c)),
        meter,
        up,
        down,
    }
}

/// The state of one relay (see [`drive`]).
pub(crate) struct Relay<'a, C: ?Sized, U: ?Sized, P> {
    client: &'a mut C,
    upstream: &'a mut U,
    idle: Duration,
    tick: Duration,
    /// How long no byte has moved, in ticks.
    quiet: Duration,
    idle_check: Pin<Box<Sleep>>,
    stopped: Option<Signal<'a>>,
    live: Option<&'a Live>,
    drained: Option<(Signal<'a>, &'a Closing)>,
    meter: TunnelBytes,
    up: P,
    down: P,
}

impl<C, U, P> Future for Relay<'_, C, U, P>
where
    C: ?Sized,
    U: ?Sized,
    P: Copier<C, U> + Copier<U, C> + Unpin,
{
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let this = self.get_mut();
        let Poll::Ready(end) = this.step(cx) else {
            return Poll::Pending;
        };
        this.count();
        let up = Copier::<C, U>::progress(&mut this.up);
        let down = Copier::<U, C>::progress(&mut this.down);
        Poll::Ready(Outcome {
            bytes_up: up.bytes,
            bytes_down: down.bytes,
            end,
        })
    }
}

impl<C, U, P> Relay<'_, C, U, P>
where
    C: ?Sized,
    U: ?Sized,
    P: Copier<C, U> + Copier<U, C> + Unpin,
{
    /// Adds the bytes not yet counted to the metrics and the live state.
    fn count(&mut self) {
        let up = Copier::<C, U>::progress(&mut self.up).count(&self.meter.up);
        let down = Copier::<U, C>::progress(&mut self.down).count(&self.meter.down);
        if let Some(live) = self.live {
            live.add(up, down);
        }
    }

    /// Moves what can be moved now; `Ready` with how the tunnel ended.
    fn step(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        if let (Some(stopped), Some(live)) = (&mut self.stopped, self.live)
            && stopped.fired(cx, || live.stopped())
        {
            return Poll::Ready(live.stop_end());
        }
        if let Some((drained, closing)) = &mut self.drained
            && drained.fired(cx, || closing.fired())
        {
            return Poll::Ready(End::DrainTimeout);
        }
        let (client, upstream) = (&mut *self.client, &mut *self.upstream);
        let (up, down) = (&mut self.up, &mut self.down);
        let mark_done = |half| self.live.inspect(|l| l.mark_done(half));
        if !Copier::<C, U>::progress(up).done {
            match Copier::<C, U>::poll_copy(up, cx, client, upstream) {
                Poll::Ready(Err(Failed::Reader)) => return Poll::Ready(End::ClientError),
                // The upstream already closed its side and then stopped reading: it is done.
                Poll::Ready(Err(Failed::Writer)) if Copier::<U, C>::progress(down).done => {
                    return Poll::Ready(End::Closed);
                }
                Poll::Ready(Err(Failed::Writer)) => return Poll::Ready(End::UpstreamError),
                Poll::Ready(Ok(())) => _ = mark_done(live::UP_DONE),
                Poll::Pending => {}
            }
        }
        if !Copier::<U, C>::progress(down).done {
            match Copier::<U, C>::poll_copy(down, cx, upstream, client) {
                Poll::Ready(Err(Failed::Reader)) => return Poll::Ready(End::UpstreamError),
                // The client already closed its side and left: what it did not take was its choice.
                Poll::Ready(Err(Failed::Writer)) if Copier::<C, U>::progress(up).done => {
                    return Poll::Ready(End::Closed);
                }
                Poll::Ready(Err(Failed::Writer)) => return Poll::Ready(End::ClientError),
                Poll::Ready(Ok(())) => _ = mark_done(live::DOWN_DONE),
                Poll::Pending => {}
            }
        }
        let (up_p, down_p) = (Copier::<C, U>::progress(up), Copier::<U, C>::progress(down));
        if up_p.done && down_p.done {
            return Poll::Ready(End::Closed);
        }
        if up_p.bytes - up_p.bytes_counted + down_p.bytes - down_p.bytes_counted >= METER_STEP {
            self.count();
        }
        while self.idle_check.as_mut().poll(cx).is_ready() {
            let (up_p, down_p) = (
                Copier::<C, U>::progress(&mut self.up),
                Copier::<U, C>::progress(&mut self.down),
            );
            let moved = up_p.moved
                || down_p.moved
                || up_p.bytes != up_p.bytes_counted
                || down_p.bytes != down_p.bytes_counted
                || up_p.throttled
                || down_p.throttled;
            self.quiet = if moved {
                Duration::ZERO
            } else {
                self.quiet + self.tick
            };
            if self.quiet >= self.idle {
                return Poll::Ready(End::IdleTimeout);
            }
            self.count();
            Copier::<C, U>::progress(&mut self.up).moved = false;
            Copier::<U, C>::progress(&mut self.down).moved = false;
            let next = self.idle_check.deadline() + self.tick;
            self.idle_check.as_mut().reset(next);
        }
        Poll::Pending
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
        spawn_metered_relay(idle, TunnelBytes::default())
    }

    /// `spawn_relay` counting into `meter`.
    fn spawn_metered_relay(
        idle: Duration,
        meter: TunnelBytes,
    ) -> (DuplexStream, DuplexStream, tokio::task::JoinHandle<Outcome>) {
        let (client, mut client_side) = duplex(1024);
        let (mut upstream_side, upstream) = duplex(1024);
        let relay = tokio::spawn(async move {
            relay(
                &mut client_side,
                &mut upstream_side,
                idle,
                Stop::default(),
                Pacers::default(),
                meter,
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
        assert_eq!(outcome.end, End::IdleTimeout);
        assert_eq!(outcome.bytes_up, 3);
        assert!(
            quiet >= Duration::from_secs(100) && quiet <= Duration::from_secs(125),
            "closed after {quiet:?} of quiet"
        );
        assert!(Instant::now() - started >= Duration::from_secs(280));
    }

    /// Sends `n` bytes from `from` and reads them at `to`.
    async fn pass(from: &mut DuplexStream, to: &mut DuplexStream, n: usize) {
        let sending = async {
            from.write_all(&vec![3u8; n]).await.unwrap();
        };
        let mut got = vec![0u8; n];
        tokio::join!(sending, async { to.read_exact(&mut got).await.unwrap() });
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_reach_the_metrics_while_the_tunnel_is_open() {
        let meter = TunnelBytes::default();
        let (mut client, mut upstream, relay) =
            spawn_metered_relay(Duration::from_secs(100), meter.clone());
        // A bulk download is counted in steps of METER_STEP, without waiting for any timer.
        pass(&mut upstream, &mut client, 3 * METER_STEP as usize).await;
        tokio::task::yield_now().await;
        assert!(
            meter.down.get() >= 2 * METER_STEP,
            "after 3 steps, {} counted",
            meter.down.get()
        );
        // A trickle below one step is counted at the next idle tick (a quarter of `idle`).
        pass(&mut client, &mut upstream, 1000).await;
        assert_eq!(meter.up.get(), 0, "not yet: below one step, before a tick");
        tokio::time::sleep(Duration::from_secs(26)).await;
        assert_eq!(meter.up.get(), 1000, "counted at the idle tick");
        // The rest is counted when it ends, and nothing twice.
        drop((client, upstream));
        let outcome = relay.await.unwrap();
        assert_eq!(meter.up.get(), outcome.bytes_up);
        assert_eq!(meter.down.get(), outcome.bytes_down);
        assert_eq!(outcome.bytes_down, 3 * METER_STEP);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_waiting_for_its_bandwidth_turn_is_not_idle() {
        use crate::bandwidth::Pacer;
        use crate::bandwidth::bucket::{Bucket, Timeline};
        use crate::bandwidth::gate::Gate;
        use std::sync::Arc;
        let timeline = Timeline::starting_now();
        let bucket = Arc::new(Bucket::default());
        // 1 kB/s: each 1 KiB chunk waits about a second, longer than the idle timeout.
        bucket.set(Some((1_000, 1)), timeline.now());
        let (mut client, mut client_side) = duplex(64 * 1024);
        let (mut upstream_side, mut upstream) = duplex(64 * 1024);
        let pacers = Pacers {
            upload: Some(Box::new(Pacer::new(Gate::new(vec![bucket], 1), timeline))),
            download: None,
        };
        let relay = tokio::spawn(async move {
            relay(
                &mut client_side,
                &mut upstream_side,
                Duration::from_millis(400),
                Stop::default(),
                pacers,
                TunnelBytes::default(),
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
        assert_ne!(outcome.end, End::IdleTimeout);
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
