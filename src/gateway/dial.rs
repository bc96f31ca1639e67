//! The dial: connect to exactly the addresses that were vetted, in the order resolved, all within
//! one connect timeout. Nothing here resolves: there is no second lookup to race.

use super::refusal::{End, Refusal};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Connects to the vetted addresses in order, all within `timeout`.
pub async fn dial(
    addrs: impl Iterator<Item = IpAddr>,
    port: u16,
    timeout: Duration,
    tried: &mut Option<SocketAddr>,
) -> Result<TcpStream, Refusal> {
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    for ip in addrs {
        let addr = SocketAddr::new(ip, port);
        *tried = Some(addr);
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => last_error = Some(e),
            Err(_) => {
                return Err(Refusal::new(
                    End::ConnectTimeout,
                    "upstream connect timed out",
                ));
            }
        }
    }
    let reason = match last_error {
        Some(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            "upstream refused the connection".into()
        }
        Some(e) => format!("upstream connect failed: {}", e.kind()),
        None => "no address to connect to".to_owned(),
    };
    Err(Refusal::new(End::ConnectFailed, reason))
}
