//! The accept side both binaries share: a connection permit is taken *before* accept, so at the
//! limit a flood waits in the kernel backlog and not in our memory; accept errors (out of
//! descriptors) back off instead of spinning; every client gets its own task and a connection
//! number; at shutdown, [`Connections::drain`] waits a bounded time for them to finish.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A listening socket for clients, with the longest accept queue the system allows
/// (`net.core.somaxconn`): at the connection limit, clients wait there, not refused.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog())
}

/// `net.core.somaxconn`, or 4096 where it cannot be read.
fn backlog() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(4096)
}

/// Highest limit taken (a semaphore's permits are bounded, and far beyond any descriptor limit).
const MAX_LIMIT: usize = 1 << 24;

/// The connections of one process, across all its listeners. The limit can change while
/// they run (a reload): raising it adds places at once; lowering it takes places away as
/// connections end, so no open one is cut.
#[derive(Clone)]
pub struct Connections {
    permits: Arc<Semaphore>,
    /// The limit in force.
    max: Arc<std::sync::Mutex<usize>>,
    /// Connections being served, counted apart from the permits (a lowered limit leaves
    /// permits owed), so `open` and the drain are exact.
    open: Arc<AtomicUsize>,
    /// Permits a lowered limit still has to take back: the accept loops forget this many of
    /// the permits they acquire before accepting again.
    owed: Arc<AtomicUsize>,
    /// Signalled when the last open connection ends.
    idle: Arc<tokio::sync::Notify>,
    next_id: Arc<AtomicU64>,
    /// The listening sockets accepting now (their inodes), to find their accept queues.
    listening: Arc<std::sync::Mutex<Vec<u64>>>,
    /// Times an accept loop found every place taken, and when that was last logged.
    limit_reached: Arc<AtomicU64>,
    limit_logged: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

/// At most one "connection limit reached" line per this long (a flood must not flood the log).
const LIMIT_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// One connection's place among the `max` at once; dropping it frees the place.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    open: Arc<AtomicUsize>,
    idle: Arc<tokio::sync::Notify>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }
}

/// How a drain ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Drained {
    /// Every connection finished.
    All,
    /// The time ran out with this many still open (the server then cuts them, each writing
    /// its access line with `end = "drain_timeout"`).
    Left(usize),
}

impl Connections {
    /// At most `max` connections at once (at least one).
    pub fn new(max: usize) -> Self {
        let max = max.clamp(1, MAX_LIMIT);
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max: Arc::new(std::sync::Mutex::new(max)),
            open: Arc::default(),
            owed: Arc::default(),
            idle: Arc::default(),
            next_id: Arc::new(AtomicU64::new(1)),
            listening: Arc::default(),
            limit_reached: Arc::default(),
            limit_logged: Arc::default(),
        }
    }

    /// Times an accept loop found the limit reached (clients then wait in the accept queue).
    pub fn limit_reached(&self) -> u64 {
        self.limit_reached.load(Ordering::Relaxed)
    }

    /// Counts that the limit was reached and says so, at most once a minute.
    fn note_limit_reached(&self) {
        let times = self.limit_reached.fetch_add(1, Ordering::Relaxed) + 1;
        let mut logged = self.limit_logged.lock().unwrap_or_else(|e| e.into_inner());
        if logged.is_none_or(|at| at.elapsed() >= LIMIT_LOG_INTERVAL) {
            *logged = Some(std::time::Instant::now());
            tracing::warn!(
                open = self.open(),
                limit = self.limit(),
                times,
                "connection limit reached: new clients wait in the accept queue (raise limits.max_connections or the descriptor limit)"
            );
        }
    }

    /// Clients accepted by the kernel that wait in the listeners' accept queues for a place
    /// (at the limit, or between two accepts), as the kernel counts them (Linux; else 0).
    pub fn waiting(&self) -> usize {
        let listening = self
            .listening
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if listening.is_empty() {
            return 0;
        }
        crate::listen_queue::waiting(&listening)
    }

    /// Connections being served now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Fewer than a quarter of the places are free (two atomic loads): the gateway is short
    /// of places, and unfinished heads count against their address at once.
    pub fn pressed(&self) -> bool {
        3 * self.permits.available_permits() < self.open()
    }

    /// The limit in force.
    pub fn limit(&self) -> usize {
        *self.max.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts a new limit in force. Raised: the new places are free at once. Lowered: free
    /// places go now, the rest as open connections end (new clients wait meanwhile).
    pub fn resize(&self, max: usize) {
        let max = max.clamp(1, MAX_LIMIT);
        let mut current = self.max.lock().unwrap_or_else(|e| e.into_inner());
        if max > *current {
            // Places still owed from an earlier lowering are forgiven first.
            let mut add = max - *current;
            let _ = self
                .owed
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |owed| {
                    let forgiven = owed.min(max - *current);
                    add = max - *current - forgiven;
                    Some(owed - forgiven)
                });
            self.permits.add_permits(add);
        } else if max < *current {
            let remove = *current - max;
            let forgotten = self.permits.forget_permits(remove);
            self.owed.fetch_add(remove - forgotten, Ordering::AcqRel);
        }
        *current = max;
    }

    /// Whether a permit just acquired pays a lowered limit's debt (and is forgotten).
    fn pays_debt(&self) -> bool {
        self.owed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |owed| {
                owed.checked_sub(1)
            })
            .is_ok()
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
        let _listed = socket_inode(&listener).map(|inode| Listed::new(&self.listening, inode));
        let mut backoff = Duration::from_millis(10);
        loop {
            let permit = match self.permits.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(tokio::sync::TryAcquireError::Closed) => return,
                Err(tokio::sync::TryAcquireError::NoPermits) => {
                    self.note_limit_reached();
                    let Ok(permit) = self.permits.clone().acquire_owned().await else {
                        return;
                    };
                    permit
                }
            };
            if self.pays_debt() {
                permit.forget();
                continue;
            }
            match listener.accept().await {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(10);
                    let _ = stream.set_nodelay(true);
                    let conn_id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    self.open.fetch_add(1, Ordering::AcqRel);
                    let slot = Slot {
                        _permit: permit,
                        open: self.open.clone(),
                        idle: self.idle.clone(),
                    };
                    tokio::spawn(serve(stream, peer, conn_id, slot));
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
        let all_ended = async {
            loop {
                let idle = self.idle.notified();
                if self.open() == 0 {
                    return;
                }
                idle.await;
            }
        };
        match tokio::time::timeout(timeout, all_ended).await {
            Ok(()) => Drained::All,
            Err(_) => Drained::Left(self.open()),
        }
    }
}

/// A listening socket's entry in [`Connections::listening`], removed when its loop ends.
struct Listed {
    listening: Arc<std::sync::Mutex<Vec<u64>>>,
    inode: u64,
}

impl Listed {
    fn new(listening: &Arc<std::sync::Mutex<Vec<u64>>>, inode: u64) -> Self {
        listening
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(inode);
        Self {
            listening: listening.clone(),
            inode,
        }
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        let mut listening = self.listening.lock().unwrap_or_else(|e| e.into_inner());
        listening.retain(|&inode| inode != self.inode);
    }
}

/// The inode that names `listener`'s socket in `/proc/net/tcp*`.
#[cfg(target_os = "linux")]
fn socket_inode(listener: &TcpListener) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::io::AsRawFd;
    let fd = listener.as_raw_fd();
    std::fs::metadata(format!("/proc/self/fd/{fd}"))
        .ok()
        .map(|m| m.ino())
}

#[cfg(not(target_os = "linux"))]
fn socket_inode(_: &TcpListener) -> Option<u64> {
    None
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
        #[cfg(target_os = "linux")]
        assert_eq!(
            connections.waiting(),
            1,
            "the second waits in the accept queue"
        );
        assert_eq!(
            connections.drain(Duration::from_millis(50)).await,
            Drained::Left(1)
        );
        accepting.abort();
        let _ = accepting.await;
        assert_eq!(
            connections.waiting(),
            0,
            "no listener accepting, none counted"
        );
        release.send(true).unwrap();
        assert_eq!(
            connections.drain(Duration::from_secs(5)).await,
            Drained::All
        );
    }
}
