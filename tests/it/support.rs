//! Test fixtures: a PKI made in-process with rcgen, a real TLS origin (hyper over tokio-rustls),
//! the real `portcullis` binary on 127.0.0.1:0 with JSON logs captured, and real clients.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The name test origins answer to; the gateway maps it to 127.0.0.1 with a static override.
pub const ORIGIN_HOST: &str = "share1.file.core.windows.net";

/// A test certificate authority.
pub struct Pki {
    pub ca_der: CertificateDer<'static>,
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    pub fn new() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // A subject of its own: OpenSSL (curl) takes a leaf whose issuer equals its subject for
        // self-signed.
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Portcullis test CA");
        let ca = params.self_signed(&key).unwrap();
        Self {
            ca_der: ca.der().clone(),
            ca_pem: ca.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `names` signed by this CA, valid until `not_after` (year), as PEM
    /// (certificate, private key).
    pub fn issue_pem(&self, names: &[&str], not_after_year: i32) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0].as_str());
        params.not_before = rcgen::date_time_ymd(2019, 1, 1);
        params.not_after = rcgen::date_time_ymd(not_after_year, 1, 1);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A client config trusting this CA and presenting `identity` (PEM certificate and key).
    pub fn client_config_with(&self, identity: Option<&(String, String)>) -> rustls::ClientConfig {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let mut config = match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config
    }

    pub fn server_config(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        use rustls::pki_types::pem::PemObject;
        let (cert, key) = self.issue_pem(names, 2099);
        let cert = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    pub fn client_config(&self) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config
    }
}

/// Deterministic incompressible bytes, so a transfer cannot be faked by a pattern.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A TLS origin server: `GET /download?bytes=N` sends N payload bytes with their SHA-256 in
/// `x-sha256`; `POST /upload` answers with the SHA-256 of what it received.
pub struct Origin {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Origin {
    pub async fn start(pki: &Pki) -> Self {
        Self::start_named(pki, &[ORIGIN_HOST]).await
    }

    /// An origin whose certificate carries `names` (DNS names the clients will verify).
    pub async fn start_named(pki: &Pki, names: &[&str]) -> Self {
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config(names));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service_fn(origin_route))
                        .await;
                });
            }
        });
        Self { addr, task }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn origin_route(
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    if path == "/upload" {
        let body = req.into_body().collect().await?.to_bytes();
        let answer = format!("{} {}", body.len(), sha256_hex(&body));
        return Ok(Response::new(Full::new(Bytes::from(answer))));
    }
    let len: usize = query
        .strip_prefix("bytes=")
        .and_then(|n| n.parse().ok())
        .unwrap_or(16);
    let body = payload(len, len as u64);
    let hash = sha256_hex(&body);
    Ok(Response::builder()
        .header("x-sha256", hash)
        .body(Full::new(Bytes::from(body)))
        .unwrap())
}

/// A plain TCP origin that records what it receives and answers with a fixed reply once the
/// client half-closes.
pub struct TcpOrigin {
    pub addr: SocketAddr,
    pub received: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
}

impl TcpOrigin {
    pub async fn start(reply: &'static [u8]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, received) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let _ = tcp.read_to_end(&mut got).await;
                    let _ = tx.send(got);
                    let _ = tcp.write_all(reply).await;
                    let _ = tcp.shutdown().await;
                });
            }
        });
        Self { addr, received }
    }
}

/// The real gateway binary, serving `config` on 127.0.0.1 with JSON logs captured.
pub struct Gateway {
    pub addr: SocketAddr,
    /// The first TLS listener's address, when the config has one.
    pub tls_addr: Option<SocketAddr>,
    /// The admin listener's address, when the config has one.
    pub admin_addr: Option<SocketAddr>,
    process: Logged,
    _dir: tempfile::TempDir,
}

/// A process of ours whose standard output is JSON log lines, collected as they come; killed
/// when dropped.
pub struct Logged {
    name: &'static str,
    child: Child,
    logs: Arc<Mutex<Vec<Value>>>,
}

impl Logged {
    /// Starts `command` (logging at info) and collects its lines.
    pub fn spawn(name: &'static str, command: &mut Command) -> Self {
        let mut child = command
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Value>(&line) {
                    Ok(value) => sink.lock().unwrap().push(value),
                    Err(_) => panic!("{name} log line is not JSON: {line}"),
                }
            }
        });
        Self { name, child, logs }
    }

    /// The first log line matching `pred`, waiting up to 10 s for it. Async, so the test's own
    /// runtime keeps running client tasks (closing pooled connections) while it waits.
    pub async fn wait_log(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(line) = self.logs.lock().unwrap().iter().find(|l| pred(l)) {
                return line.clone();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited with {status}; logs: {:#?}",
                    self.name,
                    self.logs.lock().unwrap()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no matching {} log line; logs: {:#?}",
                self.name,
                self.logs.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Number of log lines matching `pred` so far.
    pub fn count_logs(&self, pred: impl Fn(&Value) -> bool) -> usize {
        self.logs.lock().unwrap().iter().filter(|l| pred(l)).count()
    }

    /// A copy of every line so far.
    pub fn logs(&self) -> Vec<Value> {
        self.logs.lock().unwrap().clone()
    }

    /// Sends a signal (`"HUP"`, `"TERM"`) to the process.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// The exit status, waiting up to `within` for the process to end.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl std::ops::Deref for Gateway {
    type Target = Logged;
    fn deref(&self) -> &Logged {
        &self.process
    }
}

impl std::ops::DerefMut for Gateway {
    fn deref_mut(&mut self) -> &mut Logged {
        &mut self.process
    }
}

impl Gateway {
    /// Starts `portcullis serve` with `config` (TOML) and waits until it listens.
    pub async fn start(config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("portcullis.toml");
        std::fs::write(&path, config).unwrap();
        let process = Logged::spawn(
            "gateway",
            Command::new(env!("CARGO_BIN_EXE_portcullis"))
                .args(["serve", "--log-format", "json", "--config"])
                .arg(&path),
        );
        let mut gateway = Self {
            addr: "127.0.0.1:0".parse().unwrap(),
            process,
            tls_addr: None,
            admin_addr: None,
            _dir: dir,
        };
        let listening = gateway
            .wait_log(|l| l["message"] == "listening" && l["kind"] == "plain")
            .await;
        gateway.addr = listening["address"].as_str().unwrap().parse().unwrap();
        if config.contains("admin = \"127.0.0.1:0\"") {
            let admin = gateway
                .wait_log(|l| l["message"] == "listening" && l["kind"] == "admin")
                .await;
            gateway.admin_addr = Some(admin["address"].as_str().unwrap().parse().unwrap());
        }
        if config.contains("tls_proxy") {
            let tls = gateway
                .wait_log(|l| l["message"] == "listening" && l["kind"] == "tls")
                .await;
            gateway.tls_addr = Some(tls["address"].as_str().unwrap().parse().unwrap());
        }
        gateway
    }

    /// The canonical access line for the request whose `host` (and port) match.
    pub async fn access_line(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_log(|l| l["target"] == "portcullis::access" && pred(l))
            .await
    }

    /// The config file the gateway was started with (rewrite it, then `signal("HUP")`).
    pub fn config_path(&self) -> std::path::PathBuf {
        self._dir.path().join("portcullis.toml")
    }

    /// Number of canonical access lines so far.
    pub fn access_count(&self) -> usize {
        self.count_logs(|l| l["target"] == "portcullis::access")
    }
}

/// The usual test config: listen on 127.0.0.1:0, built-in profile, plus a rule that lets
/// `ORIGIN_HOST` on the origin's port reach 127.0.0.1 (via a static override). `extra` is
/// appended verbatim (more rules, resolver or timeout settings).
pub fn config_for(origin_port: u16, extra: &str) -> String {
    format!(
        r#"
[listen]
proxy = ["127.0.0.1:0"]
admin = "127.0.0.1:0"

[[policy.allow]]
name = "test-origin"
category = "storage"
hosts = ["{ORIGIN_HOST}"]
ports = [{origin_port}]
private_addresses = ["127.0.0.1/32"]

{extra}
"#
    )
}

/// The `[resolver]` section mapping `ORIGIN_HOST` to 127.0.0.1, with more `name = "addr"` lines.
pub fn resolver_hosts(more: &str) -> String {
    format!(
        "[resolver]\nhosts_only = true\n[resolver.hosts]\n\"{ORIGIN_HOST}\" = \"127.0.0.1\"\n{more}\n"
    )
}

/// A reqwest client using `gateway` as its proxy and trusting the test CA; no pooled
/// connections, so each request gets its own tunnel and access line.
pub fn client(pki: &Pki, gateway: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(format!("http://{gateway}")).unwrap())
        .tls_backend_preconfigured(pki.client_config())
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// Downloads 16 bytes from the origin through the gateway: proof the gateway still serves.
pub async fn assert_serves(pki: &Pki, gateway: SocketAddr, origin: &Origin) {
    let url = format!("https://{ORIGIN_HOST}:{}/download?bytes=16", origin.port());
    let resp = client(pki, gateway)
        .get(url)
        .send()
        .await
        .expect("gateway still serves a good request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().len(), 16);
}

/// A reply the gateway sent on its own: status, headers (lowercase names), body.
#[derive(Debug)]
pub struct Reply {
    /// The client side address of the connection, as the gateway logs it.
    pub client: Option<SocketAddr>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends raw `request` bytes and reads the reply until the gateway closes the connection
/// (it must, after any error reply); panics if it does not within 15 s.
pub async fn raw_request(gateway: SocketAddr, request: &[u8]) -> Reply {
    let mut tcp = TcpStream::connect(gateway).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut reply = read_reply_to_close(&mut tcp).await;
    reply.client = tcp.local_addr().ok();
    reply
}

pub async fn read_reply_to_close(tcp: &mut TcpStream) -> Reply {
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), tcp.read_to_end(&mut raw))
        .await
        .expect("gateway closes the connection after an error reply")
        .unwrap();
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no reply head in {text:?}"));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Reply {
        client: None,
        status,
        headers,
        body: body.to_owned(),
    }
}

/// Reads a reply head byte by byte (nothing after it is consumed), within 15 s.
pub async fn read_head_bytes<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Vec<u8>, String> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(15), stream.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            Ok(Ok(_)) => {
                return Err(format!(
                    "closed before a reply head: {:?}",
                    String::from_utf8_lossy(&head)
                ));
            }
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("no reply head in 15 s".into()),
        }
    }
    Ok(head)
}

/// The status code of a reply head.
pub fn status_of(head: &[u8]) -> u16 {
    parse_reply(head).status
}

/// Sends CONNECT for `target` (plus `early` bytes in the same write) and reads only the reply
/// head; returns the open stream and the status.
pub async fn open_tunnel(gateway: SocketAddr, target: &str, early: &[u8]) -> (TcpStream, u16) {
    let mut tcp = TcpStream::connect(gateway).await.unwrap();
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").into_bytes();
    request.extend_from_slice(early);
    tcp.write_all(&request).await.unwrap();
    let head = read_head_bytes(&mut tcp).await.expect("a reply head");
    let status = parse_reply(&head).status;
    (tcp, status)
}

/// Sends `CONNECT target` with extra header lines from a client bound to `from` (any loopback
/// address) and reads the reply head; the stream stays open (a tunnel, or closing after an
/// error reply).
pub async fn connect_from(
    gateway: SocketAddr,
    from: &str,
    target: &str,
    headers: &str,
) -> (TcpStream, Reply) {
    let mut tcp = connect_bound(gateway, from).await;
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{headers}\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let head = read_head_bytes(&mut tcp).await.expect("a reply head");
    let mut reply = parse_reply(&head);
    reply.client = tcp.local_addr().ok();
    (tcp, reply)
}

/// Sends `bytes` through an open tunnel, half-closes it, and returns all that comes back.
pub async fn send_and_finish<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
) -> Vec<u8> {
    stream.write_all(bytes).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await.unwrap();
    reply
}

/// A TCP connection to `gateway` from the loopback address `from` (127.0.0.x).
pub async fn connect_bound(gateway: SocketAddr, from: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(gateway).await.unwrap()
}

/// `Proxy-Authorization: Basic ...` header line for `user:password`.
pub fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Proxy-Authorization: Basic {token}\r\n")
}

/// Runs the `portcullis` binary with `args` to completion.
pub fn portcullis(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .output()
        .expect("run portcullis")
}

/// `text` in a file `name` of a fresh temporary directory (gone when the guard drops).
pub fn temp_file(name: &str, text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    (dir, path)
}
