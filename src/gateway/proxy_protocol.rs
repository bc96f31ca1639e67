//! PROXY protocol (v1 text and v2 binary) from trusted L4 load balancers: the header carries the
//! real client address, so source-network identity keeps working when gateways scale out
//! behind a balancer. Only peers listed in `listen.proxy_protocol_from` are read this way; a
//! header from anyone else is just a malformed request.

use ppp::{HeaderResult, PartialResult};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::net::TcpStream;

/// v2: 16-byte preamble plus addresses and TLVs; nothing legitimate comes near this.
const MAX_HEADER_BYTES: usize = 1024;

/// Reads one PROXY header and consumes exactly its bytes. `Ok(None)`: a LOCAL/UNKNOWN header
/// (health checks), keep the peer's own address.
pub async fn read_header(
    tcp: &mut TcpStream,
    timeout: Duration,
) -> Result<Option<SocketAddr>, &'static str> {
    tokio::time::timeout(timeout, read(tcp))
        .await
        .unwrap_or(Err("no PROXY protocol header in time"))
}

async fn read(tcp: &mut TcpStream) -> Result<Option<SocketAddr>, &'static str> {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; MAX_HEADER_BYTES];
    loop {
        // Senders write the header in one go (the spec requires it), so peeking normally sees
        // all of it at once; a short wait covers a split segment.
        let n = tcp
            .peek(&mut buf)
            .await
            .map_err(|_| "client closed before the PROXY header")?;
        if n == 0 {
            return Err("client closed before the PROXY header");
        }
        let parsed = match HeaderResult::parse(&buf[..n]) {
            HeaderResult::V1(Ok(h)) => Some((h.header.len(), v1_source(&h.addresses))),
            HeaderResult::V2(Ok(h)) => Some((h.len(), v2_source(&h))),
            result if result.is_incomplete() && n < MAX_HEADER_BYTES => None,
            _ => return Err("malformed PROXY protocol header"),
        };
        if let Some((len, source)) = parsed {
            tcp.read_exact(&mut buf[..len])
                .await
                .map_err(|_| "client closed inside the PROXY header")?;
            return Ok(source);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn v1_source(addresses: &ppp::v1::Addresses) -> Option<SocketAddr> {
    match addresses {
        ppp::v1::Addresses::Tcp4(a) => {
            Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
        }
        ppp::v1::Addresses::Tcp6(a) => {
            Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
        }
        ppp::v1::Addresses::Unknown => None,
    }
}

fn v2_source(header: &ppp::v2::Header<'_>) -> Option<SocketAddr> {
    if header.command == ppp::v2::Command::Local {
        return None;
    }
    match &header.addresses {
        ppp::v2::Addresses::IPv4(a) => {
            Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
        }
        ppp::v2::Addresses::IPv6(a) => {
            Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
        }
        _ => None,
    }
}
