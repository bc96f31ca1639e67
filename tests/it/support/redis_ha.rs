//! Redis that survives losing a node, made of real `redis-server` processes of the test's own
//! on `free_port()`s of loopback (no persistence, files in a temporary directory): a Redis
//! Cluster of three primaries with a replica each, and a Sentinel set (a primary, a replica,
//! three sentinels). Failure detection is shortened (1 s) so a failover takes a few seconds.
//! Only the PIDs started here are ever killed, each on drop at the latest.

use super::Pki;
use super::redis::{command_on, command_on_tls};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How the tests talk to a set's nodes: the default user's password (sent first with `AUTH`,
/// its `+OK` left out of the replies) and TLS (trusting the test CA).
#[derive(Clone, Default)]
struct Talk {
    password: Option<String>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Talk {
    /// `lines` sent to the node on `port`.
    fn ask(&self, port: u16, lines: &str) -> String {
        let lines = match &self.password {
            None => lines.to_owned(),
            Some(password) => format!("AUTH {password}\r\n{lines}"),
        };
        let all = match &self.tls {
            None => command_on(port, &lines),
            Some(config) => command_on_tls(config, port, &lines),
        };
        match &self.password {
            Some(_) => all.strip_prefix("+OK\r\n").unwrap_or(&all).to_owned(),
            None => all,
        }
    }
}

/// ACL users and passwords on a set's Redis nodes (and its sentinels).
#[derive(Clone, Default)]
pub struct RedisAuth {
    /// The default user's password (`requirepass`, `masterauth`): what the tests use.
    pub password: Option<String>,
    /// An ACL user for the gateways: name and password, on `portcullis:*` keys only.
    pub user: Option<(String, String)>,
    /// The sentinels' own password (`requirepass` on them).
    pub sentinel_password: Option<String>,
}

impl RedisAuth {
    /// Arguments for a data node.
    fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(password) = &self.password {
            args.extend(strings(&[
                "--requirepass",
                password,
                "--masterauth",
                password,
            ]));
        }
        if let Some((name, password)) = &self.user {
            args.extend(strings(&[
                "--user",
                name,
                "on",
                &format!(">{password}"),
                "~portcullis:*",
                "+@all",
            ]));
        }
        args
    }
}

/// A `redis-server` of the set: its port, arguments and process (gone once killed).
struct Node {
    port: u16,
    args: Vec<String>,
    child: Option<Child>,
    /// TLS for the readiness PING, on a node that speaks only TLS.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Node {
    /// Starts `redis-server` with `args` on a free port and waits until it answers PING (over
    /// TLS when `tls` is given).
    fn start_tls(
        tls: Option<Arc<rustls::ClientConfig>>,
        args: impl Fn(u16) -> Vec<String>,
    ) -> Self {
        for _ in 0..20 {
            let port = super::free_port();
            let mut node = Self {
                port,
                args: args(port),
                child: None,
                tls: tls.clone(),
            };
            if node.run() {
                return node;
            }
        }
        panic!("no free port for redis-server");
    }

    /// Runs the server; false when it did not answer PING within 5 s.
    fn run(&mut self) -> bool {
        let mut child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            let pong = Talk {
                password: None,
                tls: self.tls.clone(),
            }
            .ask(self.port, "PING");
            if pong.starts_with("+PONG") || pong.starts_with("-NOAUTH") {
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Kills this node's process (its PID only).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// A data node's arguments: loopback only, no persistence, warnings only.
fn data_node() -> Vec<String> {
    strings(&[
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--loglevel",
        "warning",
    ])
}

/// A certificate for 127.0.0.1 from `pki`, its key and the CA, as files in `dir`.
fn tls_files(pki: &Pki, dir: &std::path::Path) -> [String; 3] {
    let (cert, key) = pki.issue_pem(&["127.0.0.1"], 2040);
    [
        ("node.pem", cert),
        ("node.key", key),
        ("ca.pem", pki.ca_pem.clone()),
    ]
    .map(|(name, text)| {
        let file = dir.join(name);
        std::fs::write(&file, text).unwrap();
        file.display().to_string()
    })
}

/// The listening arguments of a node on `port`: plain, or TLS only (to clients and replicas,
/// no client certificates asked for) with `tls`'s files.
fn ports(port: u16, tls: Option<&[String; 3]>) -> Vec<String> {
    match tls {
        None => strings(&["--port", &port.to_string()]),
        Some([cert, key, ca]) => strings(&[
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-replication",
            "yes",
            "--tls-cert-file",
            cert,
            "--tls-key-file",
            key,
            "--tls-ca-cert-file",
            ca,
            "--tls-auth-clients",
            "no",
        ]),
    }
}

/// Polls `check` every 50 ms for up to `within`.
fn wait_for(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Three primaries (the slots in thirds: 0-5460, 5461-10922, 10923-16383) and one replica of
/// each, `cluster-node-timeout` 1 s (unless said otherwise).
pub struct RedisCluster {
    /// Primaries first (index 0..3), then their replicas.
    nodes: Vec<Node>,
    talk: Talk,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    pub fn start() -> Self {
        Self::start_with(&RedisAuth::default())
    }

    /// With passwords and an ACL user on every node.
    pub fn start_with(auth: &RedisAuth) -> Self {
        Self::start_inner(auth, None, 1000)
    }

    /// With a `cluster-node-timeout` of `ms`: a primary killed is replaced that much later.
    pub fn start_with_node_timeout(ms: u32) -> Self {
        Self::start_inner(&RedisAuth::default(), None, ms)
    }

    /// Speaking only TLS, to clients and between the nodes, with a certificate for 127.0.0.1
    /// from `pki`.
    pub fn start_tls(pki: &Pki) -> Self {
        Self::start_inner(&RedisAuth::default(), Some(pki), 1000)
    }

    fn start_inner(auth: &RedisAuth, pki: Option<&Pki>, node_timeout_ms: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        let tls = pki.map(|pki| tls_files(pki, &path));
        let client = pki.map(|pki| Arc::new(pki.client_config()));
        let nodes: Vec<Node> = (0..6)
            .map(|_| {
                Node::start_tls(client.clone(), |port| {
                    let mut args = data_node();
                    args.extend(strings(&[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-node-timeout",
                        &node_timeout_ms.to_string(),
                    ]));
                    args.extend(ports(port, tls.as_ref()));
                    if tls.is_some() {
                        args.extend(strings(&["--tls-cluster", "yes"]));
                    }
                    args.extend([
                        // The bus port named too: port + 10000 may be taken.
                        "--cluster-port".into(),
                        super::free_port().to_string(),
                        "--cluster-config-file".into(),
                        path.join(format!("nodes-{port}.conf"))
                            .display()
                            .to_string(),
                        "--dir".into(),
                        path.display().to_string(),
                    ]);
                    args.extend(auth.args());
                    args
                })
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        if let Some(password) = &auth.password {
            create.args(["-a", password, "--no-auth-warning"]);
        }
        if let Some([_, _, ca]) = &tls {
            create.args(["--tls", "--cacert", ca]);
        }
        let out = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli (apt-get install redis-server)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = Self {
            nodes,
            talk: Talk {
                password: auth.password.clone(),
                tls: client,
            },
            _dir: dir,
        };
        wait_for(
            "the cluster is ok on every node",
            Duration::from_secs(20),
            || {
                cluster.nodes.iter().all(|n| {
                    cluster
                        .talk
                        .ask(n.port, "CLUSTER INFO")
                        .contains("cluster_state:ok")
                })
            },
        );
        wait_for("every replica is in sync", Duration::from_secs(20), || {
            cluster.nodes[3..].iter().all(|n| {
                cluster
                    .talk
                    .ask(n.port, "INFO replication")
                    .contains("master_link_status:up")
            })
        });
        // redis-cli makes the first three the primaries.
        for (i, node) in cluster.nodes.iter().enumerate() {
            let role = cluster.talk.ask(node.port, "ROLE");
            assert_eq!(role.contains("master"), i < 3, "node {i}: {role}");
        }
        cluster
    }

    /// Seed nodes: the three primaries.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.nodes[..3]
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let scheme = if self.talk.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}+cluster://{}", seeds.join(","))
    }

    /// The ports of the nodes that are primaries now (alive).
    pub fn primaries(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .filter(|&port| self.talk.ask(port, "ROLE").contains("master"))
            .collect()
    }

    /// The port of the primary serving `key` now.
    pub fn primary_of(&self, key: &str) -> u16 {
        self.primaries()
            .into_iter()
            .find(|&port| {
                !self
                    .talk
                    .ask(port, &format!("TYPE {key}"))
                    .starts_with("-MOVED")
            })
            .expect("a primary serving the key")
    }

    /// Kills the primary on `port` (its PID) and waits for its replica to take over (with a
    /// 1 s node timeout, a few seconds): when the replica was elected.
    pub fn kill_primary(&mut self, port: u16) -> Instant {
        let replica = self
            .nodes
            .iter()
            .find(|n| {
                n.child.is_some() && {
                    let role = self.talk.ask(n.port, "ROLE");
                    role.contains("slave") && role.contains(&format!("\r\n:{port}\r\n"))
                }
            })
            .map(|n| n.port)
            .expect("the primary's replica");
        let killed = Instant::now();
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap()
            .kill();
        wait_for("the replica takes over", Duration::from_secs(20), || {
            self.talk.ask(replica, "ROLE").contains("master")
        });
        eprintln!(
            "cluster: replica {replica} took over from {port} after {:?}",
            killed.elapsed()
        );
        Instant::now()
    }

    /// `lines` sent to the node on `port`.
    pub fn command(&self, port: u16, lines: &str) -> String {
        self.talk.ask(port, lines)
    }

    /// Kills every node (their PIDs): the whole cluster is down.
    pub fn kill_all(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }

    /// Starts every node again on its ports (the cluster's layout is in their files; the data
    /// is gone) and waits until the cluster is ok.
    pub fn start_again(&mut self) {
        for node in &mut self.nodes {
            assert!(
                node.run(),
                "redis-server did not start again on {}",
                node.port
            );
        }
        wait_for("the cluster is ok again", Duration::from_secs(30), || {
            self.nodes.iter().all(|n| {
                self.talk
                    .ask(n.port, "CLUSTER INFO")
                    .contains("cluster_state:ok")
            })
        });
    }
}

/// A primary and its replica, monitored as `portcullis` by three sentinels (quorum 2,
/// `down-after-milliseconds` 1 s).
pub struct RedisSentinel {
    primary: Node,
    replica: Node,
    sentinels: Vec<Node>,
    /// How the tests talk to the primary and the replica.
    data: Talk,
    /// How the tests talk to the sentinels.
    own: Talk,
    _dir: tempfile::TempDir,
}

pub const SENTINEL_MASTER: &str = "portcullis";

impl RedisSentinel {
    pub fn start() -> Self {
        Self::start_inner(&RedisAuth::default(), None)
    }

    /// With passwords and an ACL user on the primary and the replica, and a password of the
    /// sentinels' own.
    pub fn start_with(auth: &RedisAuth) -> Self {
        Self::start_inner(auth, None)
    }

    /// Every node and sentinel speaking only TLS (to clients, between the data nodes and from
    /// the sentinels to them), with a certificate for 127.0.0.1 from `pki`.
    pub fn start_tls(pki: &Pki) -> Self {
        Self::start_inner(&RedisAuth::default(), Some(pki))
    }

    fn start_inner(auth: &RedisAuth, pki: Option<&Pki>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tls = pki.map(|pki| tls_files(pki, dir.path()));
        let client = pki.map(|pki| Arc::new(pki.client_config()));
        let data = Talk {
            password: auth.password.clone(),
            tls: client.clone(),
        };
        let own = Talk {
            password: auth.sentinel_password.clone(),
            tls: client.clone(),
        };
        let mut base = data_node();
        base.extend(auth.args());
        let primary = Node::start_tls(client.clone(), |port| {
            let mut args = base.clone();
            args.extend(ports(port, tls.as_ref()));
            args
        });
        let replica = Node::start_tls(client.clone(), |port| {
            let mut args = base.clone();
            args.extend(ports(port, tls.as_ref()));
            args.extend(strings(&[
                "--replicaof",
                "127.0.0.1",
                &primary.port.to_string(),
            ]));
            args
        });
        wait_for("the replica is in sync", Duration::from_secs(10), || {
            data.ask(replica.port, "INFO replication")
                .contains("master_link_status:up")
        });
        let sentinels = (0..3)
            .map(|i| {
                Node::start_tls(client.clone(), |port| {
                    // A sentinel rewrites its file: one of its own, in the directory. Over TLS
                    // it listens on its TLS port only and reaches the data nodes and the
                    // other sentinels over TLS (`tls-replication`).
                    let file = dir.path().join(format!("sentinel-{i}-{port}.conf"));
                    let listen = match &tls {
                        None => format!("port {port}\n"),
                        Some([cert, key, ca]) => format!(
                            "port 0\ntls-port {port}\ntls-replication yes\n\
                             tls-cert-file {cert}\ntls-key-file {key}\n\
                             tls-ca-cert-file {ca}\ntls-auth-clients no\n"
                        ),
                    };
                    std::fs::write(
                        &file,
                        format!(
                            "{listen}bind 127.0.0.1\ndir {dir}\n\
                             sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {primary} 2\n\
                             sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                             sentinel failover-timeout {SENTINEL_MASTER} 10000\n\
                             sentinel parallel-syncs {SENTINEL_MASTER} 1\n{auth_pass}{requirepass}",
                            dir = dir.path().display(),
                            primary = primary.port,
                            auth_pass = auth.password.as_ref().map_or(String::new(), |p| {
                                format!("sentinel auth-pass {SENTINEL_MASTER} {p}\n")
                            }),
                            requirepass = auth
                                .sentinel_password
                                .as_ref()
                                .map_or(String::new(), |p| format!("requirepass {p}\n")),
                        ),
                    )
                    .unwrap();
                    vec![file.display().to_string(), "--sentinel".into()]
                })
            })
            .collect();
        let set = Self {
            primary,
            replica,
            sentinels,
            data,
            own,
            _dir: dir,
        };
        wait_for(
            "every sentinel knows the others and the replica",
            Duration::from_secs(20),
            || {
                set.sentinels.iter().all(|s| {
                    let master = set
                        .own
                        .ask(s.port, &format!("SENTINEL MASTER {SENTINEL_MASTER}"));
                    master.contains("num-other-sentinels\r\n$1\r\n2")
                        && master.contains("num-slaves\r\n$1\r\n1")
                })
            },
        );
        set
    }

    /// The sentinels' URLs, as `fleet.sentinel.nodes` takes them (TOML array items):
    /// `rediss://` when the set speaks TLS.
    pub fn nodes(&self) -> Vec<String> {
        let scheme = if self.own.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        self.sentinels
            .iter()
            .map(|s| format!("{scheme}://127.0.0.1:{}", s.port))
            .collect()
    }

    /// The `sentinel = { ... }` value for `[fleet]`.
    pub fn fleet_value(&self) -> String {
        let nodes: Vec<String> = self.nodes().iter().map(|n| format!("{n:?}")).collect();
        format!(
            "{{ master = \"{SENTINEL_MASTER}\", nodes = [{}] }}",
            nodes.join(", ")
        )
    }

    pub fn primary_port(&self) -> u16 {
        self.primary.port
    }

    pub fn replica_port(&self) -> u16 {
        self.replica.port
    }

    /// Kills the primary (its PID) and waits until every sentinel names the replica as the
    /// primary: when that was.
    pub fn kill_primary(&mut self) -> Instant {
        let killed = Instant::now();
        self.primary.kill();
        let replica = format!("{}", self.replica.port);
        wait_for(
            "the sentinels promote the replica",
            Duration::from_secs(30),
            || {
                self.data.ask(self.replica.port, "ROLE").contains("master")
                    && self.sentinels.iter().all(|s| {
                        self.own
                            .ask(
                                s.port,
                                &format!("SENTINEL GET-MASTER-ADDR-BY-NAME {SENTINEL_MASTER}"),
                            )
                            .contains(&replica)
                    })
            },
        );
        eprintln!(
            "sentinel: replica {replica} promoted after {:?}",
            killed.elapsed()
        );
        Instant::now()
    }

    /// `lines` sent to the data node on `port`.
    pub fn command(&self, port: u16, lines: &str) -> String {
        self.data.ask(port, lines)
    }
}
