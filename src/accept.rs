//! The accept side both binaries share: a connection permit is taken *before* accept, so at the
//! limit a flood waits in the kernel backlog and not in our memory; accept errors (out of
//! descriptors) back off instead of spinning; every client gets its own task and a connection
//! number; at shutdown, [`Connections::drain`] waits a bounded time for them to finish.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The connections of one process, across all its listeners.
#[derive(Clone)]
pub struct Connections {
    permits: Arc<Semaphore>,
    max: usize,
    next_id: Arc<AtomicU64>,
}

/// One connection's place among the `max` at once; dropping it frees the place.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

/// How a drain ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Drained {
    /// Every connection finished.
    All,
    /// The time ran out with this many still open (closed when the process exits).
    Left(usize),
}

impl Connections {
    /// At most `max` connections at once (at least one).
    pub fn new(max: usize) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Connections being served now.
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    /// Accepts on `listener` for as long as the returned future is polled (drop it, or abort
    /// its task, to stop accepting), serving each client with `serve(stream, peer, conn_id,
    /// slot)` on a task of its own; the future must hold `slot` until the client is done.
    ///
    /// The slot goes into `serve` rather than into a wrapper around its future: an async block
    /// that awaits a future it captured stores that future twice (the capture and the await),
    /// and every idle tunnel would pay for the copy.
    pub async fn accept_loop<F, Fut>(&self, listener: TcpListener, serve: F)
    where
        F: Fn(TcpStream, SocketAddr, u64, Slot) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut backoff = Duration::from_millis(10);
        loop {
            let Ok(permit) = self.permits.clone().acquire_owned().await else {
                return;
            };
            match listener.accept().await {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(10);
                    let _ = stream.set_nodelay(true);
                    let conn_id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(serve(stream, peer, conn_id, Slot { _permit: permit }));
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Waits up to `timeout` for every connection to finish.
    pub async fn drain(&self, timeout: Duration) -> Drained {
        let all = u32::try_from(self.max).unwrap_or(u32::MAX);
        match tokio::time::timeout(timeout, self.permits.acquire_many(all)).await {
            Ok(_) => Drained::All,
            Err(_) => Drained::Left(self.open()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn at_the_limit_clients_wait_and_drain_waits_for_the_open_ones() {
        let connections = Connections::new(1);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (release, released) = tokio::sync::watch::channel(false);
        let accepting = {
            let connections = connections.clone();
            tokio::spawn(async move {
                connections
                    .accept_loop(listener, move |mut tcp, _, id, slot| {
                        let mut released = released.clone();
                        async move {
                            let _ = tcp.write_all(&id.to_be_bytes()).await;
                            let _ = released.wait_for(|&r| r).await;
                            drop(slot);
                        }
                    })
                    .await
            })
        };
        let mut first = TcpStream::connect(addr).await.unwrap();
        let mut id = [0u8; 8];
        first.read_exact(&mut id).await.unwrap();
        assert_eq!(u64::from_be_bytes(id), 1);
        // The second client is in the backlog: no task serves it while the first holds the
        // only permit.
        let mut second = TcpStream::connect(addr).await.unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(200), second.read_exact(&mut id));
        assert!(waited.await.is_err(), "served beyond the limit");
        assert_eq!(connections.open(), 1);
        assert_eq!(
            connections.drain(Duration::from_millis(50)).await,
            Drained::Left(1)
        );
        accepting.abort();
        release.send(true).unwrap();
        assert_eq!(
            connections.drain(Duration::from_secs(5)).await,
            Drained::All
        );
    }
}
