//! Load generator for `bench/run.sh`: a loopback origin (plain and TLS) and the clients that
//! measure a proxy against it. Every loop is bounded in count and time; all traffic is on
//! loopback. Results are one JSON object per line on stdout; `report` turns them into a table.
//!
//! Origin protocol (after the tunnel is up, inside TLS on the TLS port): the client sends a
//! 9-byte command, `op` then a little-endian u64 `n`:
//!   b'D' n: the origin sends n bytes, then closes;
//!   b'U' n: the origin reads n bytes, answers with the 8-byte count, then closes;
//!   b'E' _: the origin echoes until EOF;
//!   b'S' _: the origin reads until EOF, sending back its running byte count (u64 LE) after
//!           every read: upload rates measured where the bytes arrive, not in a sender's buffer.

mod proxy_tls;

use clap::{Parser, Subcommand};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CHUNK: usize = 256 * 1024;
const TLS_NAME: &str = "origin.bench.test";
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the origin: plain on PORT, TLS on TLS_PORT; writes the CA certificate (DER) to CA.
    Origin {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        tls_port: u16,
        #[arg(long)]
        ca: std::path::PathBuf,
    },
    /// Bulk transfer through a proxy (or direct): total BYTES split over STREAMS tunnels.
    Bulk {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 1)]
        streams: usize,
        #[arg(long)]
        bytes: u64,
        /// down (origin to client) or up.
        #[arg(long, default_value = "down")]
        direction: String,
        /// TLS end to end inside the tunnel (origin's TLS port).
        #[arg(long)]
        tls: bool,
        #[arg(long)]
        ca: Option<std::path::PathBuf>,
    },
    /// CONNECT -> 200 -> 1 KiB echo -> close, CLIENTS at once, for SECONDS (and at most 1M).
    Setup {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long)]
        clients: usize,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// Hold TUNNELS idle tunnels; report the proxy's RSS growth per tunnel; then pass a byte
    /// through every one.
    Scale {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long)]
        tunnels: usize,
        /// Send nothing until memory is measured (default: the echo command goes first, as a
        /// TLS handshake would, so the tunnel has carried bytes before it idles).
        #[arg(long)]
        silent: bool,
    },
    /// Stream for SECONDS (after a 1 s warm-up) through a throttled proxy: the aggregate rate
    /// against LIMIT (bytes/s), Jain's fairness index over the streams, and the rate per source.
    Throttle {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 1)]
        streams: usize,
        /// down (origin to client) or up.
        #[arg(long, default_value = "down")]
        direction: String,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Seconds streamed before the measured window (slow start; a limit that begins later).
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// The configured aggregate limit, bytes per second.
        #[arg(long)]
        limit: f64,
        /// Client source address of each stream, cycled (127.0.0.2,127.0.0.3): branches.
        #[arg(long, value_delimiter = ',')]
        sources: Vec<std::net::IpAddr>,
        /// Prefix of the variant name in the results.
        #[arg(long, default_value = "")]
        label: String,
    },
    /// Print the table for a results file (JSON lines) and write the summary JSON next to it.
    Report { results: std::path::PathBuf },
    /// Write a PKI for the gateway's HTTPS listener into DIR: `ca.pem`, `gateway.pem`,
    /// `gateway.key`, `client.pem`, `client.key`.
    Pki { dir: std::path::PathBuf },
}

#[derive(clap::Args, Clone)]
struct TargetArgs {
    /// Name of what is measured, for the results ("direct", "portcullis", "squid", ...).
    #[arg(long)]
    name: String,
    /// Proxy address; absent means direct to the origin.
    #[arg(long)]
    proxy: Option<SocketAddr>,
    /// Proxy process id, to read its CPU time and memory from /proc.
    #[arg(long)]
    proxy_pid: Option<u32>,
    /// Origin process id: with it, bulk and setup also report the origin's and this client's
    /// CPU, so a result says what the shared cores allow (see `CpuUse`).
    #[arg(long)]
    origin_pid: Option<u32>,
    /// Origin port (plain; TLS uses --tls-port).
    #[arg(long)]
    origin_port: u16,
    #[arg(long, default_value_t = 0)]
    tls_port: u16,
    /// Run number, recorded with the result.
    #[arg(long, default_value_t = 0)]
    run: u32,
    /// The host the CONNECT names (a name the proxy resolves to 127.0.0.1, to measure rules
    /// on names); default the origin's address.
    #[arg(long, default_value = "127.0.0.1")]
    connect_host: String,
    /// The proxy is an HTTPS listener: TLS to it first, with the client certificate of this
    /// directory's PKI (`loadgen pki`).
    #[arg(long)]
    proxy_tls: Option<std::path::PathBuf>,
    /// Proxy credentials, `USER:PASSWORD`, sent as `Proxy-Authorization: Basic` with every
    /// CONNECT (a branch identified by credentials).
    #[arg(long)]
    proxy_auth: Option<String>,
}

fn main() {
    let cli = Cli::parse();
    if let Command::Report { results } = &cli.command {
        report(results);
        return;
    }
    if let Command::Pki { dir } = &cli.command {
        proxy_tls::write_pki(dir);
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        match cli.command {
            Command::Origin { port, tls_port, ca } => origin(port, tls_port, &ca).await,
            Command::Bulk {
                target,
                streams,
                bytes,
                direction,
                tls,
                ca,
            } => bulk(&target, streams, bytes, &direction, tls, ca.as_deref()).await,
            Command::Setup {
                target,
                clients,
                seconds,
            } => setup(&target, clients, seconds).await,
            Command::Scale {
                target,
                tunnels,
                silent,
            } => scale(&target, tunnels, silent).await,
            Command::Throttle {
                target,
                streams,
                direction,
                seconds,
                warmup,
                limit,
                sources,
                label,
            } => {
                let window = Window { warmup, seconds };
                throttle(
                    &target, streams, &direction, window, limit, &sources, &label,
                )
                .await
            }
            Command::Report { .. } | Command::Pki { .. } => unreachable!(),
        }
    });
}

// ---- origin ---------------------------------------------------------------------------------

async fn origin(port: u16, tls_port: u16, ca_path: &std::path::Path) {
    let (server_config, ca_der) = test_pki();
    std::fs::write(ca_path, ca_der.as_ref()).unwrap();
    let plain = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let tls = TcpListener::bind(("127.0.0.1", tls_port)).await.unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = tls.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                if let Ok(stream) = acceptor.accept(tcp).await {
                    serve_origin(stream).await;
                }
            });
        }
    });
    eprintln!("origin listening on 127.0.0.1:{port} (tls {tls_port})");
    loop {
        let Ok((tcp, _)) = plain.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            serve_origin(tcp).await;
        });
    }
}

async fn serve_origin<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let mut cmd = [0u8; 9];
    if s.read_exact(&mut cmd).await.is_err() {
        return;
    }
    let n = u64::from_le_bytes(cmd[1..9].try_into().unwrap());
    match cmd[0] {
        b'D' => {
            let chunk = vec![0x5au8; CHUNK];
            let mut left = n;
            while left > 0 {
                let take = left.min(CHUNK as u64) as usize;
                if s.write_all(&chunk[..take]).await.is_err() {
                    return;
                }
                left -= take as u64;
            }
            let _ = s.shutdown().await;
        }
        b'U' => {
            let mut buf = vec![0u8; CHUNK];
            let mut got = 0u64;
            while got < n {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => got += k as u64,
                }
            }
            let _ = s.write_all(&got.to_le_bytes()).await;
            let _ = s.shutdown().await;
        }
        b'S' => {
            let mut buf = vec![0u8; CHUNK];
            let mut got = 0u64;
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => got += k as u64,
                }
                if s.write_all(&got.to_le_bytes()).await.is_err() {
                    break;
                }
            }
        }
        b'E' => {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => {
                        if s.write_all(&buf[..k]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = s.shutdown().await;
        }
        _ => {}
    }
}

fn test_pki() -> (Arc<rustls::ServerConfig>, CertificateDer<'static>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![TLS_NAME.to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap();
    (Arc::new(config), ca.der().clone())
}

// ---- clients --------------------------------------------------------------------------------

/// A connection to the origin port, through the proxy's CONNECT when there is one. Returns the
/// stream and the time from sending CONNECT to reading the 200.
async fn open(t: &TargetArgs, port: u16) -> std::io::Result<(Box<dyn Conn>, Duration)> {
    let (Some(proxy), Some(dir)) = (t.proxy, &t.proxy_tls) else {
        let (s, took) = open_from(t, port, None).await?;
        return Ok((Box::new(s), took));
    };
    let started = Instant::now();
    let tcp = TcpStream::connect(proxy).await?;
    tcp.set_nodelay(true)?;
    let mut tls = proxy_tls::connector(dir)
        .connect(proxy_tls::gateway_name(), tcp)
        .await?;
    connect_through(&mut tls, t, port).await?;
    Ok((Box::new(tls), started.elapsed()))
}

/// A stream a measurement runs on: plain TCP, or TLS to an HTTPS listener.
trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// `open` from a chosen loopback source address (a branch, to the gateway).
async fn open_from(
    t: &TargetArgs,
    port: u16,
    from: Option<std::net::IpAddr>,
) -> std::io::Result<(TcpStream, Duration)> {
    let started = Instant::now();
    let Some(proxy) = t.proxy else {
        let s = TcpStream::connect(("127.0.0.1", port)).await?;
        s.set_nodelay(true)?;
        return Ok((s, started.elapsed()));
    };
    let mut s = match from {
        None => TcpStream::connect(proxy).await?,
        Some(ip) => {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(proxy).await?
        }
    };
    s.set_nodelay(true)?;
    connect_through(&mut s, t, port).await?;
    Ok((s, started.elapsed()))
}

/// Sends CONNECT for the origin's `port` on `s` and reads the 200.
async fn connect_through<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    t: &TargetArgs,
    port: u16,
) -> std::io::Result<()> {
    use base64::Engine;
    let host = &t.connect_host;
    let authorization = t.proxy_auth.as_ref().map_or(String::new(), |credentials| {
        let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
        format!("Proxy-Authorization: Basic {encoded}\r\n")
    });
    let req =
        format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n{authorization}\r\n");
    s.write_all(req.as_bytes()).await?;
    // Read the reply head byte by byte: nothing after it may be consumed.
    let mut head = Vec::with_capacity(128);
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        if s.read(&mut b).await? == 0 || head.len() > 4096 {
            return Err(std::io::Error::other("proxy closed before a reply"));
        }
        head.push(b[0]);
    }
    if !head.starts_with(b"HTTP/1.1 200") && !head.starts_with(b"HTTP/1.0 200") {
        return Err(std::io::Error::other(format!(
            "proxy refused: {}",
            String::from_utf8_lossy(&head)
        )));
    }
    Ok(())
}

fn command(op: u8, n: u64) -> [u8; 9] {
    let mut c = [0u8; 9];
    c[0] = op;
    c[1..].copy_from_slice(&n.to_le_bytes());
    c
}

async fn transfer<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    direction: &str,
    n: u64,
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    if direction == "up" {
        s.write_all(&command(b'U', n)).await?;
        let mut left = n;
        while left > 0 {
            let take = left.min(CHUNK as u64) as usize;
            s.write_all(&buf[..take]).await?;
            left -= take as u64;
        }
        // A TLS stream (to an HTTPS listener) may hold the last record until flushed.
        s.flush().await?;
        let mut count = [0u8; 8];
        s.read_exact(&mut count).await?;
        Ok(u64::from_le_bytes(count))
    } else {
        s.write_all(&command(b'D', n)).await?;
        s.flush().await?;
        let mut got = 0u64;
        loop {
            match s.read(&mut buf).await? {
                0 => return Ok(got),
                k => got += k as u64,
            }
        }
    }
}

/// CPU seconds (user, system) the process has used, from /proc/PID/stat (`self`: this one).
fn cpu_parts(pid: &str) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    Some((ticks(11)? / 100.0, ticks(12)? / 100.0))
}

/// CPU seconds (user, system) of the client (this process), the origin and the proxy, read at
/// one moment; two readings give what each spent during one measurement.
struct CpuUse {
    client: (f64, f64),
    origin: Option<(f64, f64)>,
    proxy: Option<(f64, f64)>,
}

impl CpuUse {
    fn now(t: &TargetArgs) -> Self {
        Self {
            client: cpu_parts("self").unwrap_or_default(),
            origin: t.origin_pid.and_then(|p| cpu_parts(&p.to_string())),
            proxy: t.proxy_pid.and_then(|p| cpu_parts(&p.to_string())),
        }
    }

    /// What each spent since `before`.
    fn since(&self, before: &Self) -> Self {
        let diff = |a: (f64, f64), b: (f64, f64)| (a.0 - b.0, a.1 - b.1);
        Self {
            client: diff(self.client, before.client),
            origin: self.origin.zip(before.origin).map(|(a, b)| diff(a, b)),
            proxy: self.proxy.zip(before.proxy).map(|(a, b)| diff(a, b)),
        }
    }

    /// The proxy's CPU seconds, user and system together.
    fn proxy_seconds(&self) -> Option<f64> {
        self.proxy.map(|(user, system)| user + system)
    }

    /// For what was spent over `units` of work (GiB, or transactions; scaled by `scale`):
    /// the client's and the origin's CPU per unit, the total of all three, the proxy's
    /// user-space share, and `ceiling_per_s`. Client, origin and proxy share this machine's
    /// cores, so a measurement is bounded by the cores divided by their total CPU per unit:
    /// the ceiling says whether a target is reachable at all with the CPU the three spend.
    /// Empty without the origin's process id.
    fn fields(&self, units: f64, per: &str, scale: f64) -> Value {
        let Some(origin) = self.origin else {
            return json!({});
        };
        let sum = |p: (f64, f64)| p.0 + p.1;
        let total = sum(self.client) + sum(origin) + self.proxy_seconds().unwrap_or(0.0);
        let per_unit = |cpu: f64| cpu / units * scale;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let mut fields = serde_json::Map::new();
        fields.insert(
            format!("client_cpu_{per}"),
            json!(per_unit(sum(self.client))),
        );
        fields.insert(format!("origin_cpu_{per}"), json!(per_unit(sum(origin))));
        fields.insert(format!("total_cpu_{per}"), json!(per_unit(total)));
        // What the proxy's own code could still save.
        let user_share = self.proxy.filter(|&p| sum(p) > 0.0).map(|p| p.0 / sum(p));
        fields.insert("proxy_user_share".into(), json!(user_share));
        let ceiling = (total > 0.0).then(|| cores * units / total);
        fields.insert("ceiling_per_s".into(), json!(ceiling));
        Value::Object(fields)
    }
}

/// Resident memory of the process in KiB, from /proc/PID/status.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Adds `extra`'s fields to `fields` (both JSON objects).
fn merge(fields: &mut Value, extra: Value) {
    if let (Some(fields), Value::Object(extra)) = (fields.as_object_mut(), extra) {
        fields.extend(extra);
    }
}

fn emit(t: &TargetArgs, scenario: &str, variant: &str, mut fields: Value) {
    let obj = fields.as_object_mut().unwrap();
    obj.insert("scenario".into(), json!(scenario));
    obj.insert("variant".into(), json!(variant));
    obj.insert("target".into(), json!(t.name));
    obj.insert("run".into(), json!(t.run));
    println!("{fields}");
}

async fn bulk(
    t: &TargetArgs,
    streams: usize,
    bytes: u64,
    direction: &str,
    tls: bool,
    ca: Option<&std::path::Path>,
) {
    let per_stream = bytes / streams as u64;
    let connector = tls.then(|| {
        let der = std::fs::read(ca.expect("--ca with --tls")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(der)).unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        ))
    });
    let port = if tls { t.tls_port } else { t.origin_port };
    let cpu_before = CpuUse::now(t);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let t = t.clone();
        let direction = direction.to_owned();
        let connector = connector.clone();
        tasks.spawn(async move {
            let (s, _) = open(&t, port).await?;
            match connector {
                Some(c) => {
                    let tls = c
                        .connect(ServerName::try_from(TLS_NAME).unwrap(), s)
                        .await?;
                    transfer(tls, &direction, per_stream).await
                }
                None => transfer(s, &direction, per_stream).await,
            }
        });
    }
    let mut moved = 0u64;
    let mut failed = 0usize;
    while let Some(result) = tasks.join_next().await {
        match result {
            Ok(Ok(n)) if n == per_stream => moved += n,
            Ok(Ok(n)) => {
                moved += n;
                failed += 1;
            }
            _ => failed += 1,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let spent = CpuUse::now(t).since(&cpu_before);
    let cpu = spent.proxy_seconds();
    let variant = format!("{}{}-{streams}", if tls { "tls-" } else { "" }, direction);
    let gib = moved as f64 / GIB;
    let mut fields = json!({
        "bytes": moved,
        "secs": secs,
        "gbit_s": moved as f64 * 8.0 / secs / 1e9,
        "failed": failed,
        "proxy_cpu_s": cpu,
        "cpu_s_per_gib": cpu.map(|c| c / gib),
    });
    merge(&mut fields, spent.fields(gib, "s_per_gib", 1.0));
    if let Some(ceiling) = fields["ceiling_per_s"].as_f64() {
        fields["ceiling_gbit_s"] = json!(ceiling * GIB * 8.0 / 1e9);
    }
    emit(t, "bulk", &variant, fields);
}

async fn setup(t: &TargetArgs, clients: usize, seconds: f64) {
    const MAX_TRANSACTIONS: usize = 1_000_000;
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let cpu_before = CpuUse::now(t);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let t = t.clone();
        let done = done.clone();
        tasks.spawn(async move {
            let mut connect_latencies = Vec::new();
            let mut failures = 0usize;
            let payload = [0x42u8; 1024];
            let mut echo = [0u8; 1024];
            while Instant::now() < deadline
                && done.load(std::sync::atomic::Ordering::Relaxed) < MAX_TRANSACTIONS
            {
                let one = async {
                    let (mut s, latency) = open(&t, t.origin_port).await?;
                    s.write_all(&command(b'E', 0)).await?;
                    s.write_all(&payload).await?;
                    s.flush().await?;
                    s.read_exact(&mut echo).await?;
                    s.shutdown().await?;
                    let mut rest = [0u8; 16];
                    let _ = s.read(&mut rest).await;
                    Ok::<_, std::io::Error>(latency)
                };
                match tokio::time::timeout(Duration::from_secs(10), one).await {
                    Ok(Ok(latency)) => {
                        connect_latencies.push(latency);
                        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    _ => failures += 1,
                }
            }
            (connect_latencies, failures)
        });
    }
    let mut latencies = Vec::new();
    let mut failures = 0;
    while let Some(Ok((l, f))) = tasks.join_next().await {
        latencies.extend(l);
        failures += f;
    }
    let secs = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1000.0
    };
    let spent = CpuUse::now(t).since(&cpu_before);
    let units = latencies.len().max(1) as f64;
    let mut fields = json!({
        "transactions": latencies.len(),
        "failed": failures,
        "per_s": latencies.len() as f64 / secs,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "p999_ms": pct(0.999),
        "proxy_cpu_us_per_tx": spent.proxy_seconds().map(|c| c / units * 1e6),
    });
    merge(&mut fields, spent.fields(units, "us_per_tx", 1e6));
    emit(t, "setup", &format!("clients-{clients}"), fields);
}

async fn scale(t: &TargetArgs, tunnels: usize, silent: bool) {
    let pid = t.proxy_pid.expect("--proxy-pid for scale");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(pid).unwrap_or(0);
    let mut streams = Vec::with_capacity(tunnels);
    let started = Instant::now();
    let mut failed_open = 0;
    for _ in 0..tunnels {
        if started.elapsed() > Duration::from_secs(120) {
            break;
        }
        match tokio::time::timeout(Duration::from_secs(10), open(t, t.origin_port)).await {
            Ok(Ok((mut s, _))) => {
                let echo = async {
                    s.write_all(&command(b'E', 0)).await?;
                    s.flush().await
                };
                if silent || echo.await.is_ok() {
                    streams.push(s);
                } else {
                    failed_open += 1;
                }
            }
            _ => failed_open += 1,
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid).unwrap_or(0);
    let held = streams.len();
    // Every held tunnel must still carry a byte both ways.
    let mut passed = 0;
    for s in &mut streams {
        let ok = async {
            if silent {
                s.write_all(&command(b'E', 0)).await?;
            }
            s.write_all(b"x").await?;
            s.flush().await?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await?;
            Ok::<_, std::io::Error>(())
        };
        if matches!(
            tokio::time::timeout(Duration::from_secs(5), ok).await,
            Ok(Ok(()))
        ) {
            passed += 1;
        }
    }
    let after_bytes = rss_kib(pid).unwrap_or(0);
    emit(
        t,
        "scale",
        &format!("tunnels-{tunnels}{}", if silent { "-silent" } else { "" }),
        json!({
            "held": held,
            "failed_open": failed_open,
            "passed_byte": passed,
            "rss_before_kib": before,
            "rss_idle_kib": after,
            "rss_after_byte_kib": after_bytes,
            "kib_per_idle_tunnel": (after as f64 - before as f64) / held.max(1) as f64,
            "kib_per_tunnel_after_byte": (after_bytes as f64 - before as f64) / held.max(1) as f64,
        }),
    );
}

/// A throttle measurement's timing: streams run `warmup` seconds, then `seconds` are measured.
struct Window {
    warmup: f64,
    seconds: f64,
}

async fn throttle(
    t: &TargetArgs,
    streams: usize,
    direction: &str,
    Window { warmup, seconds }: Window,
    limit: f64,
    sources: &[std::net::IpAddr],
    label: &str,
) {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    let counters: Vec<Arc<AtomicU64>> = (0..streams).map(|_| Arc::default()).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, counter) in counters.iter().enumerate() {
        let (t, counter, up) = (t.clone(), counter.clone(), direction == "up");
        let from = (!sources.is_empty()).then(|| sources[i % sources.len()]);
        tasks.spawn(async move {
            let (mut s, _) = open_from(&t, t.origin_port, from).await?;
            let mut buf = vec![0x33u8; 64 * 1024];
            // Endless for the test's length: the origin sends (or takes) until we stop.
            if up {
                // Counted by the origin (its reports), not by what the socket buffer took.
                s.write_all(&command(b'S', 0)).await?;
                let (mut rx, mut tx) = s.into_split();
                let send = async move {
                    loop {
                        tx.write_all(&buf).await?;
                    }
                    #[allow(unreachable_code)]
                    Ok::<(), std::io::Error>(())
                };
                let reports = async move {
                    let mut count = [0u8; 8];
                    loop {
                        rx.read_exact(&mut count).await?;
                        counter.store(u64::from_le_bytes(count), Relaxed);
                    }
                    #[allow(unreachable_code)]
                    Ok::<(), std::io::Error>(())
                };
                tokio::try_join!(send, reports).map(|((), ())| ())
            } else {
                s.write_all(&command(b'D', u64::MAX / 2)).await?;
                loop {
                    let n = s.read(&mut buf).await?;
                    if n == 0 {
                        return Ok::<_, std::io::Error>(());
                    }
                    counter.fetch_add(n as u64, Relaxed);
                }
            }
        });
    }
    // Warm-up: tunnels open, socket buffers fill; then the measured window.
    tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
    let before: Vec<u64> = counters.iter().map(|c| c.load(Relaxed)).collect();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let after: Vec<u64> = counters.iter().map(|c| c.load(Relaxed)).collect();
    let secs = started.elapsed().as_secs_f64();
    tasks.shutdown().await;
    let moved: Vec<f64> = after
        .iter()
        .zip(&before)
        .map(|(a, b)| (a - b) as f64)
        .collect();
    let total: f64 = moved.iter().sum();
    let squares: f64 = moved.iter().map(|x| x * x).sum();
    let jain = if squares > 0.0 {
        total * total / (streams as f64 * squares)
    } else {
        0.0
    };
    let mut per_source: BTreeMap<String, f64> = BTreeMap::new();
    for (i, m) in moved.iter().enumerate() {
        let key = sources
            .get(i % sources.len().max(1))
            .map_or("all".to_owned(), |ip| ip.to_string());
        *per_source.entry(key).or_default() += m / secs / 1e6;
    }
    let rate = total / secs;
    emit(
        t,
        "throttle",
        &format!("{label}{direction}-{streams}"),
        json!({
            "limit_mb_s": limit / 1e6,
            "rate_mb_s": rate / 1e6,
            "vs_limit": rate / limit,
            "jain": jain,
            "secs": secs,
            "per_source_mb_s": per_source,
        }),
    );
}

// ---- report ---------------------------------------------------------------------------------

fn report(path: &std::path::Path) {
    let text = std::fs::read_to_string(path).unwrap();
    let rows: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    // (scenario, variant, metric) -> target -> values over runs
    let mut cells: BTreeMap<(String, String, &str), BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    let metrics: &[(&str, &[&str])] = &[
        (
            "bulk",
            &[
                "gbit_s",
                "cpu_s_per_gib",
                "client_cpu_s_per_gib",
                "total_cpu_s_per_gib",
                "ceiling_gbit_s",
                "proxy_user_share",
            ],
        ),
        (
            "setup",
            &[
                "per_s",
                "p50_ms",
                "p99_ms",
                "p999_ms",
                "proxy_cpu_us_per_tx",
                "total_cpu_us_per_tx",
                "ceiling_per_s",
                "proxy_user_share",
            ],
        ),
        ("scale", &["kib_per_idle_tunnel", "held", "passed_byte"]),
        ("throttle", &["rate_mb_s", "vs_limit", "jain"]),
        ("rtt", &["rate_mb_s", "vs_limit"]),
        ("sched", &["gbit_s", "cpu_s_per_gib"]),
        ("fleet", &["gbit_s", "cpu_s_per_gib"]),
        ("learn", &["per_s", "p50_ms", "p99_ms"]),
        ("sni", &["gbit_s", "cpu_s_per_gib"]),
        ("https-bulk", &["gbit_s", "cpu_s_per_gib"]),
        ("https-setup", &["per_s", "p50_ms", "p99_ms"]),
        ("way-out-setup", &["per_s", "p50_ms", "p99_ms"]),
        ("parent-setup", &["per_s", "p50_ms", "p99_ms"]),
        ("parent-bulk", &["gbit_s", "cpu_s_per_gib"]),
        (
            "scale-config",
            &[
                "per_s",
                "p99_ms",
                "proxy_cpu_us_per_tx",
                "rss_mib",
                "rss_after_reloads_mib",
                "start_ms",
                "check_config_ms",
                "reload_ms",
                "metrics_ms",
                "metrics_mib",
            ],
        ),
        (
            "https-scale",
            &["kib_per_idle_tunnel", "held", "passed_byte"],
        ),
    ];
    let mut targets: Vec<String> = Vec::new();
    for row in &rows {
        let scenario = row["scenario"].as_str().unwrap_or_default();
        let target = row["target"].as_str().unwrap_or_default().to_owned();
        if !targets.contains(&target) {
            targets.push(target.clone());
        }
        for (s, names) in metrics {
            if *s != scenario {
                continue;
            }
            for m in *names {
                if let Some(v) = row[*m].as_f64() {
                    let key = (
                        scenario.to_owned(),
                        row["variant"].as_str().unwrap_or_default().to_owned(),
                        *m,
                    );
                    cells
                        .entry(key)
                        .or_default()
                        .entry(target.clone())
                        .or_default()
                        .push(v);
                }
            }
        }
    }
    let median = |v: &[f64]| -> f64 {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if v.is_empty() {
            f64::NAN
        } else {
            v[v.len() / 2]
        }
    };
    print!("{:<8} {:<14} {:<20}", "scenario", "variant", "metric");
    for t in &targets {
        print!(" {t:>12}");
    }
    println!("   (medians; ratio to direct / to squid in brackets)");
    let mut summary = Vec::new();
    for ((scenario, variant, metric), by_target) in &cells {
        print!("{scenario:<8} {variant:<14} {metric:<20}");
        let direct = by_target.get("direct").map(|v| median(v));
        let squid = by_target.get("squid").map(|v| median(v));
        for t in &targets {
            match by_target.get(t) {
                Some(v) => {
                    let m = median(v);
                    print!(" {:>12}", format!("{m:.3}"));
                    summary.push(json!({
                        "scenario": scenario, "variant": variant, "metric": metric, "target": t,
                        "median": m, "runs": v.len(),
                        "vs_direct": direct.map(|d| m / d), "vs_squid": squid.map(|s| m / s),
                    }));
                }
                None => print!(" {:>12}", "-"),
            }
        }
        if let (true, Some(p)) = (
            *metric == "gbit_s" || *metric == "per_s",
            by_target.get("portcullis").map(|v| median(v)),
        ) {
            let d = direct.map_or(String::from("-"), |d| format!("{:.2}", p / d));
            let s = squid.map_or(String::from("-"), |s| format!("{:.2}", p / s));
            print!("   [portcullis/direct {d}, /squid {s}]");
        }
        if let (true, Some(p), Some(sched)) = (
            scenario == "sched" && *metric == "gbit_s",
            by_target.get("portcullis").map(|v| median(v)),
            by_target.get("portcullis-sched").map(|v| median(v)),
        ) {
            print!("   [with schedules / without {:.3}]", sched / p);
        }
        if let (true, Some(p), Some(fleet)) = (
            scenario == "fleet" && *metric == "gbit_s",
            by_target.get("portcullis").map(|v| median(v)),
            by_target.get("portcullis-fleet").map(|v| median(v)),
        ) {
            print!("   [fleet mode / without {:.3}]", fleet / p);
        }
        if let (true, Some(off), Some(on)) = (
            scenario == "sni" && *metric == "gbit_s",
            by_target.get("portcullis").map(|v| median(v)),
            by_target.get("portcullis-sni").map(|v| median(v)),
        ) {
            print!("   [SNI checked / not {:.3}]", on / off);
        }
        if let (true, Some(off), Some(on)) = (
            scenario == "learn" && *metric == "per_s",
            by_target.get("portcullis-names").map(|v| median(v)),
            by_target.get("portcullis-learn").map(|v| median(v)),
        ) {
            print!("   [learn on / off {:.3}]", on / off);
        }
        if let (true, Some(off), Some(on)) = (
            scenario == "way-out-setup" && *metric == "per_s",
            by_target.get("portcullis").map(|v| median(v)),
            by_target.get("portcullis-egress").map(|v| median(v)),
        ) {
            print!("   [egress / none {:.3}]", on / off);
        }
        if let (true, Some(alone), Some(behind)) = (
            scenario.starts_with("parent-") && (*metric == "per_s" || *metric == "gbit_s"),
            by_target.get("squid-parent").map(|v| median(v)),
            by_target.get("portcullis-parent").map(|v| median(v)),
        ) {
            print!("   [gateway + squid / squid alone {:.3}]", behind / alone);
        }
        println!();
    }
    let out = path.with_extension("summary.json");
    std::fs::write(&out, serde_json::to_string_pretty(&summary).unwrap()).unwrap();
    println!("summary: {}", out.display());
}
