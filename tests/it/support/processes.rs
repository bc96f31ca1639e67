//! Our binaries as processes: `Logged` (JSON log lines captured, killed on drop), the `Gateway`
//! (`portcullis serve` on 127.0.0.1:0) and `portcullis` run to completion.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
        if !command.get_envs().any(|(name, _)| name == "RUST_LOG") {
            command.env("RUST_LOG", "info");
        }
        let mut child = command
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

    /// The process's id (for `/proc/PID/...`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's resident memory now, in KiB (Linux `/proc`); fails the test when it cannot
    /// be read.
    pub fn rss_kib(&self) -> u64 {
        let path = format!("/proc/{}/status", self.child.id());
        let status = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}'s resident memory: cannot read {path}: {e}", self.name));
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "{}'s resident memory: no VmRSS in {path} (has it exited?):\n{status}",
                    self.name
                )
            })
    }

    /// The first log line matching `pred`, waiting up to 10 s for it. Async, so the test's own
    /// runtime keeps running client tasks (closing pooled connections) while it waits.
    pub async fn wait_log(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_log_after(0, pred).await
    }

    /// `wait_log` among the lines after the first `skip` (a `log_count()` taken earlier): a
    /// line logged since then, not one from before.
    pub async fn wait_log_after(&mut self, skip: usize, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(line) = self
                .logs
                .lock()
                .unwrap()
                .iter()
                .skip(skip)
                .find(|l| pred(l))
            {
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
                "no matching {} log line after the first {skip}; logs: {:#?}",
                self.name,
                self.logs.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Number of log lines so far.
    pub fn log_count(&self) -> usize {
        self.logs.lock().unwrap().len()
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
    /// Starts `portcullis serve` with `config` (TOML text or a `GatewayConfig`) and waits until
    /// it listens.
    pub async fn start(config: impl std::fmt::Display) -> Self {
        Self::start_with_env(config, &[]).await
    }

    /// `start` with environment variables set for the process (e.g. `RUST_LOG`).
    pub async fn start_with_env(config: impl std::fmt::Display, env: &[(&str, &str)]) -> Self {
        Self::start_under(config, env, &[]).await
    }

    /// `start_with_env`, run by `wrapper` (e.g. `["prlimit", "--nofile=1024:"]`) when given.
    pub async fn start_under(
        config: impl std::fmt::Display,
        env: &[(&str, &str)],
        wrapper: &[&str],
    ) -> Self {
        let config = config.to_string();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("portcullis.toml");
        std::fs::write(&path, &config).unwrap();
        let binary = env!("CARGO_BIN_EXE_portcullis");
        let mut command = match wrapper.split_first() {
            None => Command::new(binary),
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(binary);
                command
            }
        };
        command
            .args(["serve", "--log-format", "json", "--config"])
            .arg(&path)
            .envs(env.iter().copied());
        let process = Logged::spawn("gateway", &mut command);
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

    /// Sends SIGHUP and returns the first log line with `message` ("reload applied", "reload
    /// rejected; ...") logged after the signal, waiting up to 10 s: this reload's line, never
    /// an earlier one's.
    pub async fn reload(&mut self, message: &str) -> Value {
        let before = self.log_count();
        self.signal("HUP");
        self.wait_log_after(before, |l| l["message"] == message)
            .await
    }

    /// The admin listener's `/metrics`, parsed.
    pub async fn metrics(&self) -> super::Metrics {
        let admin = self
            .admin_addr
            .expect("an admin listener on 127.0.0.1:0 in the config");
        super::Metrics::fetch(admin).await
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

/// Runs the `portcullis` binary with `args` to completion.
pub fn portcullis(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .output()
        .expect("run portcullis")
}
