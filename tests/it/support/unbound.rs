//! A real `unbound` of the test's own (Debian's package, installed by `.ci/run`), answering DNS
//! over TLS and over HTTPS on two `free_port()`s of 127.0.0.1 with a certificate from the test
//! CA, from `local-data` records only (no recursion: a static root zone answers everything
//! else with NXDOMAIN). No clear-text port. Stopped (only the PID it started) when dropped.

use super::Pki;
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Unbound {
    /// DNS over TLS.
    pub tls: SocketAddr,
    /// DNS over HTTPS (`/dns-query`).
    pub https: SocketAddr,
    /// The name in the server's certificate.
    pub name: &'static str,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Unbound {
    /// Starts a server whose certificate `pki` signs, answering `records` ("name. A ip").
    pub fn start(pki: &Pki, records: &[&str]) -> Self {
        let name = "dns.test.example";
        let (cert, key) = pki.issue_pem(&[name], 2099);
        let mut last_log = String::new();
        // unbound cannot take port 0: pick free ones, retry on a clash.
        for _ in 0..10 {
            let (tls, https) = (super::free_port(), super::free_port());
            if tls == https {
                continue;
            }
            let mut server = Self {
                tls: SocketAddr::from(([127, 0, 0, 1], tls)),
                https: SocketAddr::from(([127, 0, 0, 1], https)),
                name,
                dir: tempfile::tempdir().unwrap(),
                child: None,
            };
            std::fs::write(server.dir.path().join("cert.pem"), &cert).unwrap();
            std::fs::write(server.dir.path().join("key.pem"), &key).unwrap();
            server.write_config(records);
            if server.run() {
                return server;
            }
            last_log =
                std::fs::read_to_string(server.dir.path().join("unbound.log")).unwrap_or_default();
        }
        panic!("unbound did not start: {last_log}");
    }

    fn write_config(&self, records: &[&str]) {
        let d = self.dir.path().display();
        let local_data: String = records
            .iter()
            .map(|r| format!("  local-data: \"{r}\"\n"))
            .collect();
        let config = format!(
            "server:
  interface: 127.0.0.1@{tls}
  interface: 127.0.0.1@{https}
  tls-port: {tls}
  https-port: {https}
  tls-service-pem: \"{d}/cert.pem\"
  tls-service-key: \"{d}/key.pem\"
  http-endpoint: \"/dns-query\"
  do-ip6: no
  do-daemonize: no
  username: \"\"
  chroot: \"\"
  directory: \"{d}\"
  pidfile: \"\"
  logfile: \"{d}/unbound.log\"
  use-syslog: no
  log-queries: yes
  verbosity: 1
  access-control: 127.0.0.0/8 allow
  module-config: \"iterator\"
  local-zone: \".\" static
{local_data}
remote-control:
  control-enable: no
",
            tls = self.tls.port(),
            https = self.https.port(),
        );
        std::fs::write(self.dir.path().join("unbound.conf"), config).unwrap();
    }

    /// Starts the server; false when it exited (a port taken) or did not listen within 10 s.
    fn run(&mut self) -> bool {
        let conf = self.dir.path().join("unbound.conf");
        let child = Command::new("unbound")
            .args(["-d", "-c"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("unbound (apt-get install unbound)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return false;
            }
            let up = |addr| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok();
            if up(self.tls) && up(self.https) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.stop();
        false
    }

    /// `tls://IP:PORT#NAME`, as `resolver.servers` takes it.
    pub fn tls_server(&self) -> String {
        format!("tls://{}#{}", self.tls, self.name)
    }

    /// `https://IP:PORT/dns-query#NAME`.
    pub fn https_server(&self) -> String {
        format!("https://{}/dns-query#{}", self.https, self.name)
    }

    /// The queries unbound logged (`log-queries`), one line each.
    pub fn queries(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("unbound.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" IN"))
            .map(str::to_owned)
            .collect()
    }

    /// Stops the server this fixture started (that PID only).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Unbound {
    fn drop(&mut self) {
        self.stop();
    }
}
