//! A real Squid of the test's own (Debian's `squid`, installed by `.ci/run`) as a parent proxy:
//! `squid -N` with its own squid.conf on a `free_port()` of 127.0.0.1, its own `hosts_file`
//! (names the gateway resolves elsewhere reach loopback origins here), access log (with the
//! `Proxy-Authorization` it received), PID file and cache log; no cache. Stopped (only the PID
//! it started) when dropped.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Squid {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// What a test adds to squid.conf: `http_access` lines before the final `allow all`, and Basic
/// authentication with one user.
#[derive(Default)]
pub struct SquidSetup<'a> {
    /// `name address` lines of its hosts file.
    pub hosts: &'a [(&'a str, &'a str)],
    /// Names it refuses (403; by the name asked for, no reverse lookup of addresses).
    pub deny: &'a [&'a str],
    /// `(user, password)`: Basic authentication required (basic_ncsa_auth, an apr1 htpasswd).
    pub basic: Option<(&'a str, &'a str)>,
}

impl Squid {
    pub fn start(setup: &SquidSetup<'_>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Squid started as root works as the `proxy` user: its files must be writable by it.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let hosts: String = setup
            .hosts
            .iter()
            .map(|(name, ip)| format!("{ip} {name}\n"))
            .collect();
        std::fs::write(dir.path().join("hosts"), hosts).unwrap();
        let mut access = String::new();
        if let Some((user, password)) = setup.basic {
            let out = Command::new("openssl")
                .args(["passwd", "-apr1", password])
                .output()
                .expect("openssl");
            let hash = String::from_utf8(out.stdout).unwrap();
            std::fs::write(
                dir.path().join("htpasswd"),
                format!("{user}:{}", hash.trim()),
            )
            .unwrap();
            access.push_str(&format!(
                "auth_param basic program /usr/lib/squid/basic_ncsa_auth {}/htpasswd\n\
                 auth_param basic realm parent\n\
                 acl authed proxy_auth REQUIRED\n\
                 http_access deny !authed\n",
                dir.path().display()
            ));
        }
        for (i, name) in setup.deny.iter().enumerate() {
            access.push_str(&format!(
                "acl denied{i} dstdomain -n {name}\nhttp_access deny denied{i}\n"
            ));
        }
        let mut squid = Self {
            port: 0,
            dir,
            child: None,
        };
        for _ in 0..10 {
            squid.port = super::free_port();
            squid.write_config(&access);
            if squid.run() {
                return squid;
            }
        }
        panic!("squid did not start: {}", squid.cache_log());
    }

    fn write_config(&self, access: &str) {
        let d = self.dir.path().display();
        let config = format!(
            "http_port 127.0.0.1:{port}
cache deny all
cache_mem 8 MB
hosts_file {d}/hosts
dns_nameservers 127.0.0.1
logformat portcullis %ts %>a %rm %ru %>Hs user=%un auth=[%{{Proxy-Authorization}}>h]
access_log stdio:{d}/access.log portcullis
cache_log {d}/cache.log
cache_store_log none
pid_filename {d}/squid.pid
coredump_dir {d}
netdb_filename none
logfile_rotate 0
shutdown_lifetime 0 seconds
{access}http_access allow all
",
            port = self.port
        );
        std::fs::write(self.dir.path().join("squid.conf"), config).unwrap();
    }

    /// Starts squid; false when it exited (a port taken) or did not listen within 15 s.
    fn run(&mut self) -> bool {
        let child = Command::new("squid")
            .args(["-N", "-f"])
            .arg(self.dir.path().join("squid.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("squid (apt-get install squid)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return false;
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.stop();
        false
    }

    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Its access log: one line per request, `... METHOD URL STATUS user=U auth=[HEADER]`.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// The access log once it holds a line containing `want` (within 5 s).
    pub fn wait_log(&self, want: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.access_log();
            if log.contains(want) || Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn cache_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("cache.log")).unwrap_or_default()
    }

    /// Stops the squid this fixture started (that PID only).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        self.stop();
    }
}
