//! A tiny blocking HTTP client for the command-line probes (`health`, `learned`, the agent's
//! `status`): one request with an empty body to a local admin or status endpoint.

/// The admin token every request of this process sends (`--token-file`,
/// `PORTCULLIS_ADMIN_TOKEN`), once set.
static ADMIN_TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sends `token` as a Bearer token with every later request of this process.
pub fn use_admin_token(token: String) {
    let _ = ADMIN_TOKEN.set(token);
}

/// Each step of a probe (connect, send, each read) gets this long.
const STEP: std::time::Duration = std::time::Duration::from_secs(5);

/// One request with an empty body to a local admin or status endpoint, blocking, `wait` for
/// each read and [`STEP`] for the rest: the whole reply, at most `limit` bytes.
fn exchange(
    addr: std::net::SocketAddr,
    method: &str,
    target: &str,
    limit: u64,
    wait: std::time::Duration,
) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Write};
    let timeout = STEP;
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    tcp.set_read_timeout(Some(wait))?;
    tcp.set_write_timeout(Some(timeout))?;
    let authorization = ADMIN_TOKEN
        .get()
        .map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        tcp,
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\n{authorization}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = Vec::new();
    tcp.take(limit + 1).read_to_end(&mut reply)?;
    if reply.len() as u64 > limit {
        return Err(std::io::Error::other(format!(
            "the answer is larger than {} KiB: narrow it (a filter, a smaller --limit)",
            limit / 1024
        )));
    }
    Ok(reply)
}

/// `GET path`: the whole reply (at most 64 KiB) as text. For the command-line probes
/// (`health`, `status`).
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    let reply = exchange(addr, "GET", path, 64 * 1024, STEP)?;
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

/// One request with an empty body (the `learned` and live-tunnel commands): the status and the
/// body (at most 64 MiB: 10,000 tunnels' rows take about 7 MiB).
pub fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    target: &str,
) -> std::io::Result<(u16, String)> {
    http_request_waiting(addr, method, target, STEP)
}

/// [`http_request`] to an endpoint that takes up to `wait` to answer (`POST /upgrade`).
pub fn http_request_waiting(
    addr: std::net::SocketAddr,
    method: &str,
    target: &str,
    wait: std::time::Duration,
) -> std::io::Result<(u16, String)> {
    let reply = exchange(addr, method, target, 64 << 20, wait)?;
    let reply = String::from_utf8_lossy(&reply);
    let malformed = || std::io::Error::other("malformed HTTP reply");
    let (head, body) = reply.split_once("\r\n\r\n").ok_or_else(malformed)?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(malformed)?;
    Ok((status, body.to_owned()))
}
