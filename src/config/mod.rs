//! Configuration: the TOML file an operator writes ([`raw`], serde with
//! `deny_unknown_fields`), compiled once into the validated [`Config`] the gateway runs on, one
//! module per section (mirroring the runtime modules they configure). Every problem found is
//! reported with file, line, column, key and what was expected ([`problems`]); all semantic
//! problems are listed at once. Compiling reads no clock: the caller says when it is.

pub mod admin;
mod branches;
pub mod egress;
pub mod fleet;
pub mod learning;
mod listen;
pub mod parents;
mod parse_errors;
pub mod password;
pub mod paths;
pub mod problems;
mod raw;
pub mod redis;
mod resolver;
mod rules;
mod schedules;
#[cfg(test)]
mod tests;
pub mod values;

pub use crate::access_log::LogFormat;
pub use branches::{BranchId, Identity, UNASSIGNED};
pub use egress::{ChosenBy, Egress, Egresses};
pub use fleet::FleetSettings;
pub use parents::{ConnectTarget, Parent, ParentTls};
pub use problems::{ConfigError, Problem};
pub use resolver::{DnsServer, DnsTransport};
pub use values::parse_duration;

use crate::bandwidth::schedule::Schedule;
use crate::policy::Policy;
use crate::policy::host::DnsName;
use ipnet::IpNet;
use jiff::Timestamp;
use password::StoredPassword;
use problems::Problems;
use raw::RawConfig;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;
use toml::Spanned;
use values::duration;

/// A fixed "now" for tests that compile configs: Monday 2026-11-23 00:00 UTC.
#[cfg(test)]
pub(crate) const TEST_NOW: Timestamp = Timestamp::constant(1_795_392_000, 0);

/// Where clients may connect from when the file does not say: loopback and private networks.
pub const DEFAULT_CLIENTS: &[&str] = &[
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
];
pub const DEFAULT_PROXY_LISTEN: &str = "0.0.0.0:3128";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";
pub const DEFAULT_PROFILE: &str = "azure-file-sync";
pub const DEFAULT_RULE_PORTS: &[u16] = &[443];
pub const DEFAULT_CATEGORY: &str = "other";
pub const DEFAULT_DNS_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_HEAD_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection attempt runs alone before the next address is tried beside it
/// (RFC 8305's "Connection Attempt Delay"; g3proxy and Squid use 250 ms too).
pub const DEFAULT_ATTEMPT_DELAY: Duration = Duration::from_millis(250);
/// The range `timeouts.attempt_delay` takes (RFC 8305 recommends at least 100 ms and at most
/// 2 s).
pub const ATTEMPT_DELAY_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(2);
pub use crate::bandwidth::paced::DEFAULT_THROTTLE_QUEUE;
const MIN_THROTTLE_QUEUE: Duration = Duration::from_millis(20);
const MAX_THROTTLE_QUEUE: Duration = Duration::from_secs(10);
/// Sync sessions sit idle for long stretches between change batches.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest `timeouts.pre_stop`: it only has to outlast a load balancer's readiness checks.
pub const MAX_PRE_STOP: Duration = Duration::from_secs(300);
/// After a binary upgrade, how long the old process lets its open tunnels run: sync sessions
/// last long, and cutting one costs a re-sync, so an hour by default.
pub const DEFAULT_UPGRADE_DRAIN: Duration = Duration::from_secs(3600);
/// The longest `timeouts.upgrade_drain`: an upgrade is usually a security fix, and the old
/// (vulnerable) binary must not serve on for days.
pub const MAX_UPGRADE_DRAIN: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Unfinished request heads one address may hold: far above what busy branch servers behind
/// one NAT address have in flight at once, far below the connection limit.
pub const DEFAULT_MAX_PENDING_HEADS_PER_CLIENT: u32 = 64;
/// A host on an IPv6 network usually holds a whole /64 (SLAAC, privacy addresses).
pub const DEFAULT_IPV6_CLIENT_PREFIX: u8 = 64;
pub const DEFAULT_AUTH_ATTEMPTS_PER_MINUTE: std::num::NonZeroU32 =
    std::num::NonZeroU32::new(30).expect("non-zero");

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: Listen,
    pub policy: Policy,
    /// Built-in profiles in use, in the order given.
    pub profiles: Vec<&'static str>,
    pub resolver: ResolverSettings,
    /// `[egress.*]` and `[policy] egress`: the ways out; empty without them.
    pub egresses: Egresses,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub log: LogSettings,
    /// Present when `[tls]` is configured.
    pub tls: Option<TlsSettings>,
    /// Branches in file order; the first whose sources hold a client's address is its branch.
    pub branches: Vec<Branch>,
    /// The branches' source networks: the most specific one holding a client's address names
    /// its branch (one probe per prefix length in use, whatever the number of branches).
    pub branch_sources: crate::policy::prefix_map::PrefixMap<BranchId>,
    /// Client-certificate names to the first branch that lists each.
    pub certificate_branches: std::collections::HashMap<String, BranchId>,
    /// Bandwidth schedules in file order; no two drive the same budget at the same time.
    pub schedules: Vec<Schedule>,
    /// Valid but surely not meant (a branch source that `listen.clients` refuses): printed by
    /// `check-config`, logged at start.
    pub warnings: Vec<Problem>,
    /// Present with `[fleet]`: limits are shared with the other replicas through Redis.
    pub fleet: Option<FleetSettings>,
    /// Where learned destinations are kept (`state_dir/learned.json`); used only when a rule
    /// learns.
    pub state_dir: std::path::PathBuf,
    /// `[[admin.token]]`: who may read and steer through the admin listener.
    pub admin_tokens: Vec<admin::AdminToken>,
}

/// A branch office: who it is (networks, credentials, certificate names) and what it may do.
#[derive(Clone, Debug)]
pub struct Branch {
    pub name: String,
    pub sources: Vec<IpNet>,
    pub credentials: Vec<Credential>,
    /// Client-certificate names (DNS SAN or CN) that identify this branch on TLS listeners.
    pub client_certificates: Vec<DnsName>,
    /// Rules this branch may use, by position in `policy.rules`; `None` means all of them.
    pub allowed_rules: Option<crate::policy::RuleSet>,
    /// Open tunnels at once; `None` is unlimited.
    pub max_tunnels: Option<u32>,
    /// The way out for this branch's tunnels (`egress`), by position in `Config::egresses`.
    pub egress: Option<usize>,
}

/// A proxy user; the password exists only as an argon2id hash, parsed at load.
#[derive(Clone, Debug)]
pub struct Credential {
    pub user: String,
    pub password: StoredPassword,
}

#[derive(Clone, Debug)]
pub struct Listen {
    pub proxy: Vec<SocketAddr>,
    /// Admin listener (/metrics, /healthz, /readyz); `None` when switched off.
    pub admin: Option<SocketAddr>,
    /// HTTPS proxy listeners: the same protocol inside TLS.
    pub tls_proxy: Vec<TlsListen>,
    /// Source networks allowed to use the proxy at all.
    pub clients: Vec<IpNet>,
    /// L4 load balancers whose connections start with a PROXY protocol header (v1 or v2)
    /// naming the real client.
    pub proxy_protocol_from: Vec<IpNet>,
}

#[derive(Clone, Debug)]
pub struct TlsListen {
    pub address: SocketAddr,
    pub client_certificates: ClientCertificates,
}

/// Whether a TLS listener asks clients for a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientCertificates {
    Off,
    /// Asked for and verified when sent; clients without one continue (credentials, source).
    Optional,
    /// No verified certificate, no connection.
    Required,
}

/// The gateway's certificate for TLS listeners and the CA that signs branch certificates.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    pub certificate: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub client_ca: Option<std::path::PathBuf>,
    pub handshake_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct ResolverSettings {
    /// DNS servers to ask; empty means the system's resolv.conf. All clear-text or all
    /// encrypted (TLS or HTTPS), never a mix: an encrypted resolver has no clear-text fallback.
    pub servers: Vec<DnsServer>,
    /// The CA file that signs the encrypted resolvers' certificates (no built-in roots); set
    /// exactly when the servers are encrypted.
    pub ca: Option<std::path::PathBuf>,
    pub timeout: Duration,
    /// Static overrides: a name listed here never goes to DNS.
    pub hosts: BTreeMap<DnsName, Vec<IpAddr>>,
    /// Resolve only through `hosts`; DNS is never asked.
    pub hosts_only: bool,
}

#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Time a client has to send its complete request head.
    pub head: Duration,
    /// Time to establish the upstream TCP connection, over all candidate addresses.
    pub connect: Duration,
    /// How long an attempt runs alone before the next address races it (Happy Eyeballs).
    pub attempt_delay: Duration,
    /// A tunnel with no bytes in either direction for this long is closed.
    pub idle: Duration,
    /// On SIGTERM/SIGINT, how long open connections may take to finish before they are closed.
    pub drain: Duration,
    /// On SIGTERM/SIGINT, how long the listeners keep accepting while `/readyz` already answers
    /// 503 (a load balancer stops sending first); zero by default.
    pub pre_stop: Duration,
    /// After a binary upgrade handed the listeners over (SIGUSR2, `POST /upgrade`), how long
    /// the old process lets open tunnels run before it cuts them and exits.
    pub upgrade_drain: Duration,
}

impl Config {
    /// Whose request a policy decision is for: the branch's name and its `allow` narrowing.
    pub fn scope(&self, identity: Identity) -> crate::policy::Scope<'_> {
        match identity {
            Identity::Branch(id) => crate::policy::Scope {
                branch: Some(self.branches[id.0].name.as_str()),
                allowed: self.branches[id.0].allowed_rules.as_ref(),
            },
            Identity::Unassigned => crate::policy::Scope {
                branch: Some(UNASSIGNED),
                allowed: None,
            },
        }
    }

    /// The name logs, metrics and budgets know `identity` by.
    pub fn branch_name(&self, identity: Identity) -> &str {
        match identity {
            Identity::Branch(id) => &self.branches[id.0].name,
            Identity::Unassigned => UNASSIGNED,
        }
    }

    /// The identity a branch name (or `unassigned`) stands for; `None` for an unknown name.
    pub fn identity_named(&self, name: &str) -> Option<Identity> {
        if name == UNASSIGNED {
            return Some(Identity::Unassigned);
        }
        let i = self.branches.iter().position(|b| b.name == name)?;
        Some(Identity::Branch(BranchId(i)))
    }
}

impl Limits {
    /// `max_connections`, or what the process's descriptor limit holds now: two descriptors
    /// per tunnel after a reserve (see [`crate::process::connections_for_descriptors`]).
    pub fn connection_limit(&self) -> usize {
        self.max_connections
            .unwrap_or_else(crate::process::connections_for_descriptors)
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Client connections served at once; further clients wait in the listen backlog. `None`:
    /// as many as the descriptor limit holds ([`Limits::connection_limit`]).
    pub max_connections: Option<usize>,
    /// CONNECT requests per second from one client address; `None` is unlimited.
    pub connect_rate_per_client: Option<std::num::NonZeroU32>,
    /// Credential checks (argon2 verifications) per minute from one client address.
    pub auth_attempts_per_minute: std::num::NonZeroU32,
    /// Connections from one client address that have not finished their request head yet
    /// (TLS handshake, PROXY header and head included); more are refused at once.
    pub max_pending_heads_per_client: u32,
    /// IPv6 clients are counted per prefix of this length for the per-client limits (one host
    /// holds a whole /64).
    pub ipv6_client_prefix: u8,
    /// How much of its limit a throttled direction may hold in the source's receive buffer
    /// (doubled by the kernel for its overhead); `None` ("off"): buffers are left as they are.
    pub throttle_queue: Option<Duration>,
}

#[derive(Clone, Debug)]
pub struct LogSettings {
    pub format: LogFormat,
    /// Access lines go to this file instead of stdout; SIGUSR1 reopens it (logrotate).
    pub access_file: Option<std::path::PathBuf>,
    /// What the gateway does while the access file cannot be written.
    pub on_write_failure: crate::access_log::OnWriteFailure,
}

impl Config {
    /// The gateway with no config file: the public-cloud Azure File Sync allow-list.
    pub fn builtin() -> Self {
        // No schedules, so the instant is never looked at.
        Self::parse("", "<built-in>", Timestamp::UNIX_EPOCH).expect("the empty config compiles")
    }

    /// Reads and compiles the file at `path`; schedule overlaps are looked for from `now`.
    pub fn load(path: &Path, now: Timestamp) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, &file, now),
            Err(e) => Err(ConfigError {
                problems: vec![Problem {
                    file,
                    line: 0,
                    column: 0,
                    key: String::new(),
                    message: format!("cannot read the file: {e}"),
                }],
            }),
        }
    }

    /// Compiles config `source`; `file` names it in problems; schedule overlaps are looked
    /// for from `now`; `${CREDENTIALS_DIRECTORY}` in file paths is the environment's.
    pub fn parse(source: &str, file: &str, now: Timestamp) -> Result<Self, ConfigError> {
        let credentials = paths::credentials_from_env();
        Self::parse_with_credentials(source, file, now, credentials.as_deref())
    }

    /// `parse` with `${CREDENTIALS_DIRECTORY}` standing for `credentials` (`None`: not set).
    pub fn parse_with_credentials(
        source: &str,
        file: &str,
        now: Timestamp,
        credentials: Option<&Path>,
    ) -> Result<Self, ConfigError> {
        let mut problems = Problems {
            file,
            source,
            list: Vec::new(),
            warnings: Vec::new(),
        };
        let raw: RawConfig = match toml::from_str(source) {
            Ok(raw) => raw,
            Err(e) => {
                // One problem: the parser stops here. The key comes from the document's spans
                // (none for a syntax error), the wording is ours.
                let span = e.span().unwrap_or(0..0);
                let key = parse_errors::key_at(source, span.start);
                let (key, message) = parse_errors::reword(e.message(), &key);
                problems.add(span, key, message);
                return Err(ConfigError {
                    problems: problems.list,
                });
            }
        };
        let paths = paths::Paths {
            base: Path::new(file).parent().unwrap_or(Path::new("")),
            credentials,
        };
        let mut config = compile(raw, &paths, now, &mut problems);
        if problems.list.is_empty() {
            config.warnings = problems.warnings;
            Ok(config)
        } else {
            Err(ConfigError {
                problems: problems.list,
            })
        }
    }
}

/// `[egress.*]` compiled, and the egress each rule, each branch and the policy names.
fn assign_egresses(
    p: &mut Problems<'_>,
    raw: &RawConfig,
    paths: &paths::Paths<'_>,
    policy: &mut Policy,
    branches: &mut [Branch],
) -> Egresses {
    let parents = parents::compile(p, &raw.parent, paths);
    let list = egress::compile(p, &raw.egress, &parents);
    for (i, r) in raw.policy.allow.iter().enumerate() {
        let r = r.get_ref();
        let key = format!("policy.allow[{i}].egress");
        let at = egress::refer(p, &list, r.egress.as_ref(), &key);
        if let Some(rule) = policy
            .rules
            .iter_mut()
            .find(|x| x.name == *r.name.get_ref())
        {
            rule.egress = at;
        }
    }
    for (i, b) in raw.branch.iter().enumerate() {
        let b = b.get_ref();
        let at = egress::refer(p, &list, b.egress.as_ref(), &format!("branch[{i}].egress"));
        if let Some(branch) = branches.iter_mut().find(|x| x.name == *b.name.get_ref()) {
            branch.egress = at;
        }
    }
    let default = egress::refer(p, &list, raw.policy.egress.as_ref(), "policy.egress");
    Egresses {
        list,
        default,
        parents,
    }
}

fn compile(
    raw: RawConfig,
    paths: &paths::Paths<'_>,
    now: Timestamp,
    p: &mut Problems<'_>,
) -> Config {
    let tls = raw.tls.as_ref().map(|t| listen::compile_tls(p, t, paths));
    let listen = listen::compile(p, &raw.listen, tls.as_ref());
    let branch_names: Vec<&str> = raw
        .branch
        .iter()
        .map(|b| b.get_ref().name.get_ref().as_str())
        .collect();
    let (mut policy, profiles_used) = rules::compile_policy(p, &raw.policy, &branch_names, paths);
    let (mut branches, branch_sources) =
        branches::compile(p, &raw.branch, &policy, &listen.clients);
    let egresses = assign_egresses(p, &raw, paths, &mut policy, &mut branches);

    let resolver = resolver::compile(p, &raw.resolver, paths);

    let timeouts = Timeouts {
        head: duration(
            p,
            raw.timeouts.head.as_ref(),
            "timeouts.head",
            DEFAULT_HEAD_TIMEOUT,
        ),
        connect: duration(
            p,
            raw.timeouts.connect.as_ref(),
            "timeouts.connect",
            DEFAULT_CONNECT_TIMEOUT,
        ),
        attempt_delay: attempt_delay(p, raw.timeouts.attempt_delay.as_ref()),
        idle: duration(
            p,
            raw.timeouts.idle.as_ref(),
            "timeouts.idle",
            DEFAULT_IDLE_TIMEOUT,
        ),
        drain: duration(
            p,
            raw.timeouts.drain.as_ref(),
            "timeouts.drain",
            DEFAULT_DRAIN_TIMEOUT,
        ),
        pre_stop: pre_stop(p, raw.timeouts.pre_stop.as_ref()),
        upgrade_drain: upgrade_drain(p, raw.timeouts.upgrade_drain.as_ref()),
    };

    let limits = Limits {
        max_connections: match raw.limits.max_connections {
            None => None,
            Some(n) if *n.get_ref() == 0 => {
                p.add(
                    n.span(),
                    "limits.max_connections",
                    "expected a number of connections above 0",
                );
                None
            }
            Some(n) => Some(*n.get_ref() as usize),
        },
        connect_rate_per_client: raw
            .limits
            .connect_rate_per_client
            .as_ref()
            .and_then(|n| std::num::NonZeroU32::new(*n.get_ref())),
        auth_attempts_per_minute: match &raw.limits.auth_attempts_per_minute {
            None => DEFAULT_AUTH_ATTEMPTS_PER_MINUTE,
            Some(n) => std::num::NonZeroU32::new(*n.get_ref()).unwrap_or_else(|| {
                p.add(
                    n.span(),
                    "limits.auth_attempts_per_minute",
                    "expected a number above 0",
                );
                DEFAULT_AUTH_ATTEMPTS_PER_MINUTE
            }),
        },
        max_pending_heads_per_client: match &raw.limits.max_pending_heads_per_client {
            None => DEFAULT_MAX_PENDING_HEADS_PER_CLIENT,
            Some(n) if *n.get_ref() == 0 => {
                p.add(
                    n.span(),
                    "limits.max_pending_heads_per_client",
                    "expected a number of connections above 0",
                );
                DEFAULT_MAX_PENDING_HEADS_PER_CLIENT
            }
            Some(n) => *n.get_ref(),
        },
        ipv6_client_prefix: match &raw.limits.ipv6_client_prefix {
            None => DEFAULT_IPV6_CLIENT_PREFIX,
            Some(n) if !(1..=128).contains(n.get_ref()) => {
                p.add(
                    n.span(),
                    "limits.ipv6_client_prefix",
                    "expected a prefix length from 1 to 128 (64: one host per /64)",
                );
                DEFAULT_IPV6_CLIENT_PREFIX
            }
            Some(n) => *n.get_ref(),
        },
        throttle_queue: throttle_queue(p, raw.limits.throttle_queue.as_ref()),
    };

    let schedules = schedules::compile(p, &raw.schedule, &branches, &policy, now);
    let fleet = raw.fleet.as_ref().and_then(|f| fleet::compile(p, f, paths));
    Config {
        listen,
        policy,
        profiles: profiles_used,
        resolver,
        egresses,
        timeouts,
        limits,
        log: log_settings(p, &raw.log, paths),
        schedules,
        certificate_branches: branches::by_certificate(&branches),
        branches,
        branch_sources,
        tls,
        warnings: Vec::new(),
        fleet,
        state_dir: learning::state_dir(p, raw.state_dir.as_ref(), paths),
        admin_tokens: admin::compile(p, &raw.admin),
    }
}

/// `[log]`.
fn log_settings(p: &mut Problems<'_>, raw: &raw::RawLog, paths: &paths::Paths<'_>) -> LogSettings {
    LogSettings {
        format: raw.format.unwrap_or(LogFormat::Text),
        access_file: raw
            .access_file
            .as_ref()
            .map(|f| paths.resolve(p, f, "log.access_file")),
        on_write_failure: on_write_failure(p, raw),
    }
}

/// `limits.throttle_queue`: "off", or a duration from 20 ms to 10 s.
fn throttle_queue(p: &mut Problems<'_>, value: Option<&Spanned<String>>) -> Option<Duration> {
    match value {
        Some(v) if v.get_ref() == "off" => None,
        value => {
            let queue = duration(p, value, "limits.throttle_queue", DEFAULT_THROTTLE_QUEUE);
            if !(MIN_THROTTLE_QUEUE..=MAX_THROTTLE_QUEUE).contains(&queue) {
                p.add(
                    value.expect("the default is in range").span(),
                    "limits.throttle_queue",
                    "expected a duration from 20ms to 10s, or \"off\"",
                );
            }
            Some(queue.clamp(MIN_THROTTLE_QUEUE, MAX_THROTTLE_QUEUE))
        }
    }
}

/// `timeouts.attempt_delay`, within [`ATTEMPT_DELAY_RANGE`].
fn attempt_delay(p: &mut Problems<'_>, value: Option<&toml::Spanned<String>>) -> Duration {
    let delay = duration(p, value, "timeouts.attempt_delay", DEFAULT_ATTEMPT_DELAY);
    match value {
        Some(v) if !ATTEMPT_DELAY_RANGE.contains(&delay) => {
            p.add(
                v.span(),
                "timeouts.attempt_delay",
                "expected a duration from 100ms to 2s",
            );
            DEFAULT_ATTEMPT_DELAY
        }
        _ => delay,
    }
}

/// `timeouts.pre_stop`: zero (the default, also `"0s"`) up to [`MAX_PRE_STOP`].
fn pre_stop(p: &mut Problems<'_>, value: Option<&toml::Spanned<String>>) -> Duration {
    let Some(v) = value else {
        return Duration::ZERO;
    };
    if matches!(v.get_ref().trim(), "0" | "0s") {
        return Duration::ZERO;
    }
    let wait = duration(p, value, "timeouts.pre_stop", Duration::ZERO);
    if wait > MAX_PRE_STOP {
        p.add(
            v.span(),
            "timeouts.pre_stop",
            "expected at most 5m (a load balancer stops sending within seconds of a failed readiness check)",
        );
        return Duration::ZERO;
    }
    wait
}

/// `timeouts.upgrade_drain`: up to [`MAX_UPGRADE_DRAIN`], an hour by default.
fn upgrade_drain(p: &mut Problems<'_>, value: Option<&toml::Spanned<String>>) -> Duration {
    let wait = duration(p, value, "timeouts.upgrade_drain", DEFAULT_UPGRADE_DRAIN);
    if let Some(v) = value
        && wait > MAX_UPGRADE_DRAIN
    {
        p.add(
            v.span(),
            "timeouts.upgrade_drain",
            "expected at most 24h (an upgrade is usually a security fix: the old binary must not serve on for days)",
        );
        return DEFAULT_UPGRADE_DRAIN;
    }
    wait
}

/// `log.on_write_failure`: `fail-closed` guards the access file, so it needs one.
fn on_write_failure(p: &mut Problems<'_>, raw: &raw::RawLog) -> crate::access_log::OnWriteFailure {
    use crate::access_log::OnWriteFailure;
    let Some(value) = &raw.on_write_failure else {
        return OnWriteFailure::default();
    };
    if *value.get_ref() == OnWriteFailure::FailClosed && raw.access_file.is_none() {
        p.add(
            value.span(),
            "log.on_write_failure",
            "\"fail-closed\" needs log.access_file (the gateway cannot tell when stdout loses lines)",
        );
    }
    *value.get_ref()
}
