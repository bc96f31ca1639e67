//! A real `redis-server` of the test's own (Debian's package, installed by `.ci/run`): on a
//! `free_port()` of loopback, no persistence, stopped (only the PID it started) when dropped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Redis {
    pub port: u16,
    extra: Vec<String>,
    /// Listening with TLS only (`--tls-port`): readiness is a TCP connect.
    tls: bool,
    child: Option<Child>,
}

impl Redis {
    /// Starts a server; `extra` are more arguments (`["--requirepass", "x"]`).
    pub fn start(extra: &[&str]) -> Self {
        Self::start_with(extra, false)
    }

    /// A server speaking only TLS on its port, with this certificate and key (PEM files).
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> Self {
        let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
        let args = [
            "--tls-cert-file",
            cert,
            "--tls-key-file",
            key,
            "--tls-auth-clients",
            "no",
        ];
        Self::start_with(&args, true)
    }

    fn start_with(extra: &[&str], tls: bool) -> Self {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        // redis-server cannot take port 0: pick a free one, retry on a clash.
        for _ in 0..20 {
            let port = super::free_port();
            let mut redis = Self {
                port,
                extra: extra.clone(),
                tls,
                child: None,
            };
            if redis.run() {
                return redis;
            }
        }
        panic!("no free port for redis-server");
    }

    /// Starts the server on `self.port`; false when it could not listen there.
    fn run(&mut self) -> bool {
        let port = self.port.to_string();
        let ports = match self.tls {
            false => ["--port", &port, "--tls-port", "0"],
            true => ["--port", "0", "--tls-port", &port],
        };
        let child = Command::new("redis-server")
            .args(ports)
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return false;
            }
            if self.answers() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        false
    }

    /// Whether the server answers (PONG, or NOAUTH when it wants a password).
    fn answers(&self) -> bool {
        let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        if self.tls {
            return true;
        }
        let _ = tcp.set_read_timeout(Some(Duration::from_millis(500)));
        if tcp.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        matches!(tcp.read(&mut buf), Ok(n) if n > 0 && (buf.starts_with(b"+PONG") || buf.starts_with(b"-NOAUTH")))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Stops the server this fixture started (that PID only).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (its data is gone: no persistence).
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            self.run(),
            "redis-server did not start again on {}",
            self.port
        );
    }

    /// Commands (inline protocol, `\r\n` between them) over a fresh connection: every reply
    /// that came until the server fell quiet for 200 ms.
    pub fn command(&self, lines: &str) -> String {
        let mut tcp = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        tcp.write_all(format!("{lines}\r\n").as_bytes()).unwrap();
        let (mut all, mut buf) = (Vec::new(), [0u8; 4096]);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            match tcp.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&all).into_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `lines` (inline commands, one a line) sent to the server on `port` over a fresh connection:
/// the raw replies, read until there is one per line (or 2 s passed, or the connection
/// failed: whatever came, "" when nothing).
pub fn command_on(port: u16, lines: &str) -> String {
    let Ok(tcp) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_millis(500)));
    exchange(tcp, lines)
}

/// `command_on` over TLS (a server with `--tls-port`), trusting what `config` trusts.
pub fn command_on_tls(
    config: &std::sync::Arc<rustls::ClientConfig>,
    port: u16,
    lines: &str,
) -> String {
    let Ok(tcp) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_millis(500)));
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let Ok(tls) = rustls::ClientConnection::new(config.clone(), name) else {
        return String::new();
    };
    exchange(rustls::StreamOwned::new(tls, tcp), lines)
}

fn exchange(mut stream: impl Read + Write, lines: &str) -> String {
    let wanted = lines.split("\r\n").count();
    if stream.write_all(format!("{lines}\r\n").as_bytes()).is_err() {
        return String::new();
    }
    let (mut all, mut buf) = (Vec::new(), [0u8; 4096]);
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && replies(&all) < wanted {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&all).into_owned()
}

/// How many whole RESP2 replies `buf` holds.
fn replies(buf: &[u8]) -> usize {
    /// The end of the reply starting at `at`, if it is whole.
    fn reply(buf: &[u8], at: usize) -> Option<usize> {
        let line_end = at + buf.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(&buf[at + 1..line_end]).ok()?;
        let next = line_end + 2;
        match buf[at] {
            b'+' | b'-' | b':' => Some(next),
            b'$' => {
                let n: i64 = line.parse().ok()?;
                if n < 0 {
                    return Some(next);
                }
                let end = next + n as usize + 2;
                (buf.len() >= end).then_some(end)
            }
            b'*' => {
                let n: i64 = line.parse().ok()?;
                (0..n.max(0)).try_fold(next, |at, _| reply(buf, at))
            }
            _ => None,
        }
    }
    let (mut at, mut count) = (0, 0);
    while let Some(end) = reply(buf, at) {
        at = end;
        count += 1;
    }
    count
}
