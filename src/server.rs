//! Listeners and the accept loop: binds every configured proxy address, takes a connection
//! permit before each accept (so a flood waits in the kernel backlog, not in our memory), and
//! serves each client on its own task.

use crate::connect::{self, Gateway};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

pub struct Server {
    gateway: Arc<Gateway>,
    /// Each listener, with its TLS acceptor when it is an HTTPS proxy listener.
    listeners: Vec<(TcpListener, Option<Arc<TlsAcceptor>>)>,
}

impl Server {
    /// Binds every `listen.proxy` and `listen.tls_proxy` address (reading the TLS files);
    /// fails on the first that cannot be bound or loaded.
    pub async fn bind(gateway: Gateway) -> std::io::Result<Self> {
        let mut listeners = Vec::new();
        let config = &gateway.config;
        let plain = config.listen.proxy.iter().map(|addr| (*addr, None));
        let tls = config
            .listen
            .tls_proxy
            .iter()
            .map(|l| (l.address, Some(l.client_certificates)));
        for (addr, tls_mode) in plain.chain(tls) {
            let acceptor = match (tls_mode, &config.tls) {
                (Some(mode), Some(settings)) => Some(Arc::new(
                    crate::tls::acceptor(settings, mode).map_err(std::io::Error::other)?,
                )),
                _ => None,
            };
            let listener = TcpListener::bind(addr).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
            })?;
            listeners.push((listener, acceptor));
        }
        Ok(Self {
            gateway: Arc::new(gateway),
            listeners,
        })
    }

    /// The bound addresses (port 0 resolved to the real port).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|(l, _)| l.local_addr().ok())
            .collect()
    }

    /// Accepts until `shutdown` completes; open tunnels are left to finish on their own tasks.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let permits = Arc::new(Semaphore::new(self.gateway.config.limits.max_connections));
        let next_id = Arc::new(AtomicU64::new(1));
        let mut accept_loops = tokio::task::JoinSet::new();
        for (listener, acceptor) in self.listeners {
            if let Ok(addr) = listener.local_addr() {
                let kind = if acceptor.is_some() { "tls" } else { "plain" };
                tracing::info!(address = %addr, kind, "listening");
            }
            accept_loops.spawn(accept_loop(
                listener,
                acceptor,
                self.gateway.clone(),
                permits.clone(),
                next_id.clone(),
            ));
        }
        let gateway = self.gateway.clone();
        accept_loops.spawn(async move {
            let mut every_minute = tokio::time::interval(Duration::from_secs(60));
            loop {
                every_minute.tick().await;
                gateway.forget_idle_counters();
            }
        });
        shutdown.await;
        accept_loops.shutdown().await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<Arc<TlsAcceptor>>,
    gateway: Arc<Gateway>,
    permits: Arc<Semaphore>,
    next_id: Arc<AtomicU64>,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                let _ = stream.set_nodelay(true);
                let gateway = gateway.clone();
                let acceptor = acceptor.clone();
                let conn_id = next_id.fetch_add(1, Ordering::Relaxed);
                // Separate tasks per listener kind: a plain connection's task must not carry
                // the TLS handshake's space (rustls state) for its whole life.
                match acceptor {
                    None => tokio::spawn(async move {
                        connect::serve(&gateway, stream, peer, conn_id).await;
                        drop(permit);
                    }),
                    Some(tls) => tokio::spawn(async move {
                        connect::serve_tls(&gateway, &tls, stream, peer, conn_id).await;
                        drop(permit);
                    }),
                };
            }
            Err(e) => {
                // Out of file descriptors or similar: wait and retry instead of spinning.
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}
