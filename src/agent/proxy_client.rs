//! A client of an HTTP CONNECT proxy, shared by `check` and `forward`: reach the proxy (plain
//! TCP, or TLS presenting the branch's certificate), send one request head, read the reply head
//! within a time and size budget, and probe whether a gateway answers at all. Every network
//! wait has its own timeout, and every failure says what it means for the gateway ([`Blame`]).

use rustls::pki_types::ServerName;
use std::fmt;
use std::io;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Largest reply head accepted from a proxy, like the gateway's own request head limit.
pub const MAX_REPLY_HEAD: usize = 8 * 1024;
const MAX_HEADERS: usize = 64;

/// `http://host:port` (plain) or `https://host:port` (TLS to the proxy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl FromStr for ProxyUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(rest) = strip_prefix_ignore_case(s, "https://") {
            (true, rest)
        } else if let Some(rest) = strip_prefix_ignore_case(s, "http://") {
            (false, rest)
        } else {
            return Err(format!(
                "{s:?}: expected http://HOST:PORT or https://HOST:PORT"
            ));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '@', '?', '#']) {
            return Err(format!(
                "{s:?}: a proxy URL is scheme://HOST:PORT, without user, path or query"
            ));
        }
        // The gateway's conventional ports: 3128 plain, 3129 TLS.
        let default_port = if tls { 3129 } else { 3128 };
        let authority = if rest.ends_with(']') || !rest.contains(':') {
            format!("{rest}:{default_port}")
        } else {
            rest.to_owned()
        };
        let target = crate::policy::host::Target::parse_authority(&authority)
            .map_err(|why| format!("{s:?}: {why}"))?;
        let host = match target.host {
            crate::policy::host::Host::Name(name) => name.as_str().to_owned(),
            crate::policy::host::Host::Ip(ip) => ip.to_string(),
        };
        Ok(Self {
            tls,
            host,
            port: target.port,
        })
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    s.get(..prefix.len())
        .filter(|p| p.eq_ignore_ascii_case(prefix))
        .map(|_| &s[prefix.len()..])
}

impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// Time budgets for talking to a proxy.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// TCP connect to the proxy (all its addresses together).
    pub connect: Duration,
    /// TLS handshake with the proxy or, in `check`, with the origin inside the tunnel.
    pub tls: Duration,
    /// From the request head sent to the complete reply head (the proxy dials meanwhile).
    pub reply: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            tls: Duration::from_secs(10),
            reply: Duration::from_secs(30),
        }
    }
}

/// Why talking to a proxy failed; `kind()` names the stage for logs and reports.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, String),
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
    #[error("connecting to {0} timed out")]
    ConnectTimeout(String),
    #[error("TLS handshake with {0} failed: {1}")]
    Tls(String, String),
    #[error("{0} closed the connection during the TLS handshake: {1}")]
    TlsClosed(String, String),
    #[error("TLS handshake with {0} timed out")]
    TlsTimeout(String),
    #[error("sending the request failed: {}", tls_error_text(.0))]
    Write(io::Error),
    #[error("reading the reply failed: {}", tls_error_text(.0))]
    Read(io::Error),
    #[error("the proxy closed the connection before a complete reply head")]
    Closed,
    #[error("no complete reply head in time")]
    ReplyTimeout,
    #[error("reply head larger than 8 KiB")]
    ReplyTooLarge,
    #[error("malformed reply head: {0}")]
    Malformed(String),
    #[error("no answer to a probe within {0:?}")]
    ProbeTimeout(Duration),
    #[error("no answer to the request, nor to a probe: {0}")]
    Unresponsive(String),
}

/// What a failure says about the gateway, for failover and health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blame {
    /// Nothing answers there (no address, connect refused or timed out, a TLS handshake or a
    /// probe without an answer), or it turns us away for good (its certificate fails
    /// verification, or it refuses ours with a TLS alert): the gateway is down for us.
    Down,
    /// It accepted the connection, then closed or reset it before answering: a process is
    /// there, turning connections away for now (a limit on unfinished requests, overload, a
    /// restart under way). Not a sign of death while other connections to it get answers.
    Refused,
    /// It took the request and has not answered in time: hung, or dialling a slow destination;
    /// a probe tells which.
    Silent,
}

impl ProxyError {
    /// Stable name for logs and JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::Resolve(..) => "resolve",
            ProxyError::Connect(..) => "connect",
            ProxyError::ConnectTimeout(_) => "connect_timeout",
            ProxyError::Tls(..) => "tls",
            ProxyError::TlsClosed(..) => "tls_closed",
            ProxyError::TlsTimeout(_) => "tls_timeout",
            ProxyError::Write(_) => "write",
            ProxyError::Read(_) => "read",
            ProxyError::Closed => "closed",
            ProxyError::ReplyTimeout => "reply_timeout",
            ProxyError::ReplyTooLarge => "reply_too_large",
            ProxyError::Malformed(_) => "malformed_reply",
            ProxyError::ProbeTimeout(_) => "probe_timeout",
            ProxyError::Unresponsive(_) => "unresponsive",
        }
    }

    /// What this failure says about the gateway. A write or read that fails with a TLS error
    /// is the gateway refusing our session (TLS 1.3 sends a refusal of the client's certificate
    /// after the client's side of the handshake is done); any other write or read failure is a
    /// close or reset.
    pub fn blame(&self) -> Blame {
        match self {
            ProxyError::Resolve(..)
            | ProxyError::Connect(..)
            | ProxyError::ConnectTimeout(_)
            | ProxyError::Tls(..)
            | ProxyError::TlsTimeout(_)
            | ProxyError::ReplyTooLarge
            | ProxyError::Malformed(_)
            | ProxyError::ProbeTimeout(_)
            | ProxyError::Unresponsive(_) => Blame::Down,
            ProxyError::Write(e) | ProxyError::Read(e) if tls_failure(e).is_some() => Blame::Down,
            ProxyError::TlsClosed(..)
            | ProxyError::Write(_)
            | ProxyError::Read(_)
            | ProxyError::Closed => Blame::Refused,
            ProxyError::ReplyTimeout => Blame::Silent,
        }
    }

    /// The TLS alert the peer sent, when that is what ended the exchange.
    pub fn alert(&self) -> Option<rustls::AlertDescription> {
        match self {
            ProxyError::Write(e) | ProxyError::Read(e) => match tls_failure(e) {
                Some(rustls::Error::AlertReceived(alert)) => Some(*alert),
                _ => None,
            },
            _ => None,
        }
    }
}

/// The rustls error inside an I/O error from a TLS stream, if that is what it is.
fn tls_failure(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// A TLS alert by its name in the RFCs (`certificate_expired`, `unknown_ca`), as the gateway's
/// log and the TLS literature spell it, not rustls's type name.
pub fn alert_name(alert: rustls::AlertDescription) -> String {
    let Some(camel) = alert.as_str() else {
        return format!("alert {}", u8::from(alert));
    };
    let mut name = String::with_capacity(camel.len() + 4);
    let mut previous_lower = false;
    for c in camel.chars() {
        if c.is_ascii_uppercase() && previous_lower {
            name.push('_');
        }
        previous_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        name.push(c.to_ascii_lowercase());
    }
    name
}

/// An I/O error from a TLS stream, said so an operator can act on it: a received alert by
/// its RFC name, anything else as rustls or the socket says it.
pub fn tls_error_text(e: &io::Error) -> String {
    match tls_failure(e) {
        Some(rustls::Error::AlertReceived(alert)) => {
            format!("received the TLS alert {}", alert_name(*alert))
        }
        _ => e.to_string(),
    }
}

/// A closed or reset connection, as opposed to a TLS protocol failure.
fn is_close(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// What a probe sends: a request every gateway answers itself (`405`: it serves only proxy
/// requests) without dialling anything, so any reply head proves the gateway's process is
/// serving; no policy decision, no denial in its metrics.
const PROBE_HEAD: &[u8] =
    b"GET / HTTP/1.1\r\nHost: portcullis-agent-probe\r\nConnection: close\r\n\r\n";

/// A connection to a proxy: plain or TLS.
pub type ProxyStream = crate::stream::MaybeTls<TlsStream<TcpStream>>;

/// One proxy (a gateway) and how to reach it.
#[derive(Clone)]
pub struct Proxy {
    pub url: ProxyUrl,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    pub timeouts: Timeouts,
}

impl Proxy {
    /// `tls_config` is used for `https://` proxies (trust roots and the branch's certificate).
    pub fn new(
        url: ProxyUrl,
        tls_config: Arc<rustls::ClientConfig>,
        timeouts: Timeouts,
    ) -> Result<Self, String> {
        let tls = if url.tls {
            let name = ServerName::try_from(url.host.clone())
                .map_err(|e| format!("{url}: not a valid TLS server name: {e}"))?;
            Some((TlsConnector::from(tls_config), name))
        } else {
            None
        };
        Ok(Self { url, tls, timeouts })
    }

    /// Whether the gateway serves: a connection (and TLS handshake) and a request it answers
    /// itself, the answer within `timeouts.connect`. A TCP connection alone proves nothing: the
    /// kernel completes it for a stopped or hung process.
    pub async fn probe(&self) -> Result<(), ProxyError> {
        let mut stream = self.dial().await?;
        match exchange(&mut stream, PROBE_HEAD, self.timeouts.connect).await {
            Ok(_) => Ok(()),
            // Nothing to dial behind a probe: silence is a hung gateway, not a slow destination.
            Err(ProxyError::ReplyTimeout) => Err(ProxyError::ProbeTimeout(self.timeouts.connect)),
            Err(e) => Err(e),
        }
    }

    /// TCP connect (and the TLS handshake for `https://`), each within its timeout.
    pub async fn dial(&self) -> Result<ProxyStream, ProxyError> {
        let tcp = connect_tcp(&self.url.host, self.url.port, self.timeouts.connect).await?;
        let Some((connector, name)) = &self.tls else {
            return Ok(ProxyStream::Plain(tcp));
        };
        let tls = tls_handshake(connector, name.clone(), tcp, self.timeouts.tls)
            .await
            .map_err(|e| match e {
                ProxyError::Tls(_, why) => ProxyError::Tls(self.url.to_string(), why),
                ProxyError::TlsClosed(_, why) => ProxyError::TlsClosed(self.url.to_string(), why),
                ProxyError::TlsTimeout(_) => ProxyError::TlsTimeout(self.url.to_string()),
                other => other,
            })?;
        Ok(ProxyStream::Tls(Box::new(tls)))
    }
}

/// Connects to `host:port`, trying each resolved address in turn, within `timeout` overall.
pub async fn connect_tcp(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, ProxyError> {
    let label = format!("{host}:{port}");
    let attempt = async {
        let addrs: Vec<_> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| ProxyError::Resolve(host.to_owned(), e.to_string()))?
            .collect();
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    return Ok(tcp);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(ProxyError::Connect(
            label.clone(),
            last.map_or_else(|| "no address".to_owned(), |e| e.to_string()),
        ))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ProxyError::ConnectTimeout(label)),
    }
}

/// A TLS client handshake over `io` within `timeout`.
pub async fn tls_handshake<IO>(
    connector: &TlsConnector,
    name: ServerName<'static>,
    io: IO,
    timeout: Duration,
) -> Result<TlsStream<IO>, ProxyError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let label = name.to_str().into_owned();
    match tokio::time::timeout(timeout, connector.connect(name, io)).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(e)) if is_close(&e) => Err(ProxyError::TlsClosed(label, e.to_string())),
        Ok(Err(e)) => Err(ProxyError::Tls(label, tls_error_text(&e))),
        Err(_) => Err(ProxyError::TlsTimeout(label)),
    }
}

/// `CONNECT target` with `Host` and, when given, `Proxy-Authorization`.
pub fn connect_head(target: &str, authorization: Option<&str>) -> Vec<u8> {
    let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(value) = authorization {
        head.push_str("Proxy-Authorization: ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// A proxy's reply head, as received.
#[derive(Debug)]
pub struct ReplyHead {
    pub status: u16,
    /// The gateway's `Portcullis-Error` reason, when it refused.
    pub reason: Option<String>,
    /// The head's bytes exactly as received, so a forwarder can pass them on unchanged.
    pub raw: Vec<u8>,
    /// Bytes that arrived after the head (body or tunnel data).
    pub leftover: Vec<u8>,
}

impl ReplyHead {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Writes `head` and reads the reply head within the reply timeout.
pub async fn exchange<S>(io: &mut S, head: &[u8], reply: Duration) -> Result<ReplyHead, ProxyError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    io.write_all(head).await.map_err(ProxyError::Write)?;
    io.flush().await.map_err(ProxyError::Write)?;
    match tokio::time::timeout(reply, read_reply_head(io)).await {
        Ok(result) => result,
        Err(_) => Err(ProxyError::ReplyTimeout),
    }
}

async fn read_reply_head<R: AsyncRead + Unpin>(io: &mut R) -> Result<ReplyHead, ProxyError> {
    let mut buf = vec![0u8; MAX_REPLY_HEAD];
    let mut filled = 0;
    loop {
        let n = io
            .read(&mut buf[filled..])
            .await
            .map_err(ProxyError::Read)?;
        if n == 0 {
            return Err(ProxyError::Closed);
        }
        filled += n;
        if let Some((status, reason, len)) = parse_reply(&buf[..filled])? {
            let leftover = buf[len..filled].to_vec();
            buf.truncate(len);
            return Ok(ReplyHead {
                status,
                reason,
                raw: buf,
                leftover,
            });
        }
        if filled == buf.len() {
            return Err(ProxyError::ReplyTooLarge);
        }
    }
}

/// `Ok(None)`: need more bytes. A plain function so the header table stays off the future.
fn parse_reply(bytes: &[u8]) -> Result<Option<(u16, Option<String>, usize)>, ProxyError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut reply = httparse::Response::new(&mut headers);
    match reply.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => {
            let status = reply
                .code
                .ok_or_else(|| ProxyError::Malformed("no status".into()))?;
            let reason = reply
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("portcullis-error"))
                .map(|h| String::from_utf8_lossy(h.value).into_owned());
            Ok(Some((status, reason, len)))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(ProxyError::Malformed(e.to_string())),
    }
}

/// `Basic` credentials for `Proxy-Authorization`.
pub fn basic_authorization(user: &str, password: &str) -> String {
    use base64::Engine;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {token}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls() {
        let url: ProxyUrl = "https://gw.contoso.example".parse().unwrap();
        assert_eq!(
            (url.tls, url.host.as_str(), url.port),
            (true, "gw.contoso.example", 3129)
        );
        let url: ProxyUrl = "HTTP://10.0.0.1:8080/".parse().unwrap();
        assert_eq!(
            (url.tls, url.host.as_str(), url.port),
            (false, "10.0.0.1", 8080)
        );
        let url: ProxyUrl = "https://[::1]:3129".parse().unwrap();
        assert_eq!(url.to_string(), "https://[::1]:3129");
        for bad in [
            "gw:3128",
            "ftp://gw",
            "http://u:p@gw:1",
            "http://gw:0",
            "http://gw:3128/x",
        ] {
            assert!(bad.parse::<ProxyUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn alerts_go_by_their_rfc_names() {
        use rustls::AlertDescription as A;
        for (alert, name) in [
            (A::CertificateExpired, "certificate_expired"),
            (A::UnknownCA, "unknown_ca"),
            (A::BadCertificate, "bad_certificate"),
            (A::CertificateRequired, "certificate_required"),
            (A::Unknown(200), "alert 200"),
        ] {
            assert_eq!(alert_name(alert), name);
        }
    }

    #[test]
    fn failures_blame_the_gateway_by_what_they_prove() {
        let tls = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        let reset = || io::Error::from(io::ErrorKind::ConnectionReset);
        for (error, blame) in [
            (
                ProxyError::Connect("gw".into(), "refused".into()),
                Blame::Down,
            ),
            (ProxyError::ConnectTimeout("gw".into()), Blame::Down),
            (ProxyError::TlsTimeout("gw".into()), Blame::Down),
            (
                ProxyError::Tls("gw".into(), "unknown issuer".into()),
                Blame::Down,
            ),
            (
                ProxyError::TlsClosed("gw".into(), "eof".into()),
                Blame::Refused,
            ),
            (ProxyError::Closed, Blame::Refused),
            (ProxyError::Read(reset()), Blame::Refused),
            (ProxyError::Write(reset()), Blame::Refused),
            (
                ProxyError::Read(tls(rustls::Error::AlertReceived(
                    rustls::AlertDescription::CertificateExpired,
                ))),
                Blame::Down,
            ),
            (ProxyError::ReplyTimeout, Blame::Silent),
            (
                ProxyError::ProbeTimeout(Duration::from_secs(5)),
                Blame::Down,
            ),
            (ProxyError::Unresponsive("probe".into()), Blame::Down),
        ] {
            assert_eq!(error.blame(), blame, "{error}");
        }
        let expired = ProxyError::Read(tls(rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateExpired,
        )));
        assert_eq!(
            expired.to_string(),
            "reading the reply failed: received the TLS alert certificate_expired"
        );
        assert_eq!(
            expired.alert(),
            Some(rustls::AlertDescription::CertificateExpired)
        );
    }

    #[tokio::test]
    async fn reply_heads_are_bounded_and_keep_what_follows() {
        let mut io: &[u8] =
            b"HTTP/1.1 403 Forbidden\r\nPortcullis-Error: host not allowed\r\n\r\nbody";
        let head = read_reply_head(&mut io).await.unwrap();
        assert_eq!(head.status, 403);
        assert_eq!(head.reason.as_deref(), Some("host not allowed"));
        assert_eq!(head.leftover, b"body");
        assert!(head.raw.ends_with(b"\r\n\r\n"));

        let mut big = b"HTTP/1.1 200 OK\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_REPLY_HEAD));
        let mut io: &[u8] = &big;
        assert!(matches!(
            read_reply_head(&mut io).await,
            Err(ProxyError::ReplyTooLarge)
        ));
        let mut io: &[u8] = b"HTTP/1.1 200";
        assert!(matches!(
            read_reply_head(&mut io).await,
            Err(ProxyError::Closed)
        ));
        let mut io: &[u8] = b"garbage\r\n\r\n";
        assert!(matches!(
            read_reply_head(&mut io).await,
            Err(ProxyError::Malformed(_))
        ));
    }
}
