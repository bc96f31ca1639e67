//! Leaving through an egress: an outgoing socket binds the egress's source address for its
//! family with `IP_BIND_ADDRESS_NO_PORT` (the port is chosen at connect, by the whole 4-tuple,
//! so a busy gateway does not run out of ports on one address), never `IP_FREEBIND`: an
//! address that left the host fails the bind, and the connection is refused as
//! `egress_unavailable` instead of leaving from another address. Without a source address
//! (no egress, or none for the family) the connect is the plain one of old.

use crate::access_log::AccessRecord;
use crate::config::Egress;
use std::io;
use std::net::{IpAddr, SocketAddr};
use tokio::net::{TcpSocket, TcpStream};

/// The bind of an egress's source address failed: the address is not on this host (any more).
#[derive(Debug, thiserror::Error)]
#[error("egress source address {0} is not on this host")]
pub struct SourceGone(pub IpAddr);

/// Connects to `addr`, from `source` when given. Without one this is the plain connect, and
/// the bound one is boxed: the connection's future does not grow for it.
pub async fn connect(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    match source {
        None => TcpStream::connect(addr).await,
        Some(source) => Box::pin(connect_from(addr, source)).await,
    }
}

async fn connect_from(addr: SocketAddr, source: IpAddr) -> io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    #[cfg(target_os = "linux")]
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    )
    .map_err(io::Error::from)?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| match e.kind() {
            io::ErrorKind::AddrNotAvailable => {
                io::Error::new(io::ErrorKind::AddrNotAvailable, SourceGone(source))
            }
            _ => e,
        })?;
    socket.connect(addr).await
}

/// The source address `egress` binds for connections to `ip`.
pub fn source(egress: Option<&Egress>, ip: IpAddr) -> Option<IpAddr> {
    egress.and_then(|e| e.source_for(ip))
}

/// The access line's `egress` and `local_address` (only with egresses configured).
pub fn note(
    metrics: &crate::metrics::WayOutMetrics,
    egress: &Egress,
    stream: Option<&TcpStream>,
    record: &mut AccessRecord,
) {
    let path = if stream.is_some() { "direct" } else { "failed" };
    metrics
        .egress_requests
        .get_or_create(&crate::metrics::EgressLabels {
            egress: egress.name.clone(),
            path,
        })
        .inc();
    record.way_out = Some(Box::new(crate::access_log::WayOut {
        egress: egress.name.clone(),
        parent: None,
        local_address: stream.and_then(|s| s.local_addr().ok()),
        early: None,
    }));
}

/// The source address an io error says is gone, if that is what it says.
pub fn source_gone(e: &io::Error) -> Option<IpAddr> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<SourceGone>())
        .map(|gone| gone.0)
}

/// Egresses whose source addresses are not on this host now, with why: what `/readyz` names.
pub fn unavailable(egresses: &[Egress]) -> Vec<String> {
    let mut down = Vec::new();
    for e in egresses {
        let sources = [e.source_ipv4.map(IpAddr::V4), e.source_ipv6.map(IpAddr::V6)];
        for ip in sources.into_iter().flatten() {
            if let Err(why) = crate::config::egress::on_this_host(ip) {
                down.push(format!("egress {}: {why}", e.name));
            }
        }
    }
    down
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_source_address_is_bound_and_one_not_on_the_host_is_named() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let from: IpAddr = "127.0.0.3".parse().unwrap();
        let stream = connect(addr, Some(from)).await.unwrap();
        let (_, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.ip(), from);
        assert_eq!(stream.local_addr().unwrap().ip(), from);
        // 192.0.2.1 (documentation) is on no host.
        let gone: IpAddr = "192.0.2.1".parse().unwrap();
        let e = connect(addr, Some(gone)).await.unwrap_err();
        assert_eq!(source_gone(&e), Some(gone));
    }
}
