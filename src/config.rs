//! Configuration: the TOML file an operator writes (`Raw*`, serde with `deny_unknown_fields`),
//! compiled once into the validated `Config` the gateway runs on. Every problem found is reported
//! with file, line, column, key and what was expected; all semantic problems are listed at once.

use crate::hostname::{DnsName, HostPattern};
use crate::policy::{Mode, Policy, Rule};
use crate::profiles;
use crate::schedule::Schedule;
use ipnet::IpNet;
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::Path;
use std::time::Duration;
use toml::Spanned;

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
/// Sync sessions sit idle for long stretches between change batches.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
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
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub log: LogSettings,
    /// Present when `[tls]` is configured.
    pub tls: Option<TlsSettings>,
    /// Branches in file order; the first whose sources hold a client's address is its branch.
    pub branches: Vec<Branch>,
    /// Bandwidth schedules in file order; no two drive the same budget at the same time.
    pub schedules: Vec<Schedule>,
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
    pub allowed_rules: Option<Vec<bool>>,
    /// Open tunnels at once; `None` is unlimited.
    pub max_tunnels: Option<u32>,
}

/// A proxy user; the password exists only as an argon2id PHC string.
#[derive(Clone, Debug)]
pub struct Credential {
    pub user: String,
    pub password_hash: String,
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
    /// DNS servers to ask; empty means the system's resolv.conf.
    pub servers: Vec<SocketAddr>,
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
    /// A tunnel with no bytes in either direction for this long is closed.
    pub idle: Duration,
    /// On SIGTERM/SIGINT, how long open connections may take to finish before they are closed.
    pub drain: Duration,
}

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Client connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// CONNECT requests per second from one client address; `None` is unlimited.
    pub connect_rate_per_client: Option<std::num::NonZeroU32>,
    /// Credential checks (argon2 verifications) per minute from one client address.
    pub auth_attempts_per_minute: std::num::NonZeroU32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug)]
pub struct LogSettings {
    pub format: LogFormat,
}

/// Everything wrong with one config file.
#[derive(Debug)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

/// One problem: where it is and what was expected.
#[derive(Debug)]
pub struct Problem {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Dotted key path, as in `policy.allow[1].hosts[0]`; empty when the parser could not tell.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            problem.fmt(f)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

// ---- the file as written -------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    listen: RawListen,
    policy: RawPolicy,
    resolver: RawResolver,
    timeouts: RawTimeouts,
    limits: RawLimits,
    log: RawLog,
    tls: Option<Spanned<RawTls>>,
    branch: Vec<Spanned<RawBranch>>,
    schedule: Vec<Spanned<RawSchedule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    name: Spanned<String>,
    days: Spanned<String>,
    hours: Spanned<String>,
    time_zone: Option<Spanned<String>>,
    upload: Option<Spanned<String>>,
    download: Option<Spanned<String>>,
    applies_to: Option<Spanned<String>>,
    branches: Option<Vec<Spanned<String>>>,
    categories: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBranch {
    name: Spanned<String>,
    #[serde(default)]
    sources: Vec<Spanned<String>>,
    #[serde(default)]
    credentials: Vec<RawCredential>,
    #[serde(default)]
    client_certificates: Vec<Spanned<String>>,
    allow: Option<Vec<Spanned<String>>>,
    max_tunnels: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    user: Spanned<String>,
    password_hash: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawListen {
    proxy: Option<Vec<Spanned<String>>>,
    clients: Option<Vec<Spanned<String>>>,
    tls_proxy: Vec<Spanned<RawTlsListen>>,
    proxy_protocol_from: Vec<Spanned<String>>,
    admin: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTlsListen {
    address: Spanned<String>,
    client_certificates: Option<ClientCertificates>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawTls {
    certificate: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    client_ca: Option<Spanned<String>>,
    handshake_timeout: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawPolicy {
    mode: Option<Mode>,
    profiles: Option<Vec<Spanned<String>>>,
    allow: Vec<Spanned<RawRule>>,
    allow_unassigned: bool,
    sni: Option<crate::sni::SniMode>,
    on_reload: Option<crate::policy::OnReload>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    category: Option<Spanned<String>>,
    #[serde(default)]
    hosts: Vec<Spanned<String>>,
    ports: Option<Vec<Spanned<u16>>>,
    #[serde(default)]
    addresses: Vec<Spanned<String>>,
    #[serde(default)]
    private_addresses: Vec<Spanned<String>>,
    sni: Option<crate::sni::SniMode>,
    #[serde(default)]
    plain_http: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawResolver {
    servers: Vec<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    hosts: BTreeMap<Spanned<String>, Spanned<toml::Value>>,
    hosts_only: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawTimeouts {
    head: Option<Spanned<String>>,
    connect: Option<Spanned<String>>,
    idle: Option<Spanned<String>>,
    drain: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    max_connections: Option<Spanned<u32>>,
    connect_rate_per_client: Option<Spanned<u32>>,
    auth_attempts_per_minute: Option<Spanned<u32>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    format: Option<LogFormat>,
}

// ---- compiling ---------------------------------------------------------------------------

/// Collects problems with their positions in one file.
struct Problems<'a> {
    file: &'a str,
    source: &'a str,
    list: Vec<Problem>,
}

impl Problems<'_> {
    fn add(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        let (line, column) = line_column(self.source, span.start);
        self.list.push(Problem {
            file: self.file.to_owned(),
            line,
            column,
            key: key.into(),
            message: message.into(),
        });
    }
}

/// 1-based line and column of byte `offset` in `source`.
fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let before = &source.as_bytes()[..offset.min(source.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    (line, offset.min(source.len()) - line_start + 1)
}

impl Config {
    /// The gateway with no config file: the public-cloud Azure File Sync allow-list.
    pub fn builtin() -> Self {
        Self::parse("", "<built-in>").expect("the empty config compiles")
    }

    /// Reads and compiles the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, &file),
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

    /// Compiles config `source`; `file` names it in problems.
    pub fn parse(source: &str, file: &str) -> Result<Self, ConfigError> {
        let mut problems = Problems {
            file,
            source,
            list: Vec::new(),
        };
        let raw: RawConfig = match toml::from_str(source) {
            Ok(raw) => raw,
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                problems.add(span, "", e.message().trim_end().to_owned());
                return Err(ConfigError {
                    problems: problems.list,
                });
            }
        };
        let base = Path::new(file).parent().unwrap_or(Path::new(""));
        let config = compile(raw, base, &mut problems);
        if problems.list.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                problems: problems.list,
            })
        }
    }
}

fn compile(raw: RawConfig, base: &Path, p: &mut Problems<'_>) -> Config {
    let tls = raw.tls.as_ref().map(|t| compile_tls(p, t, base));
    let listen = Listen {
        proxy: match raw.listen.proxy {
            None => vec![DEFAULT_PROXY_LISTEN.parse().expect("valid default")],
            Some(list) => {
                if list.is_empty() {
                    p.add(
                        0..0,
                        "listen.proxy",
                        "expected at least one address such as \"0.0.0.0:3128\"",
                    );
                }
                list.iter()
                    .enumerate()
                    .filter_map(|(i, a)| {
                        parse_or(
                            p,
                            a,
                            &format!("listen.proxy[{i}]"),
                            "expected IP:PORT such as \"0.0.0.0:3128\" or \"[::]:3128\"",
                        )
                    })
                    .collect()
            }
        },
        admin: match &raw.listen.admin {
            None => Some(DEFAULT_ADMIN_LISTEN.parse().expect("valid default")),
            Some(v) if v.get_ref() == "off" => None,
            Some(v) => parse_or(
                p,
                v,
                "listen.admin",
                "expected IP:PORT such as \"127.0.0.1:9464\", or \"off\"",
            ),
        },
        tls_proxy: raw
            .listen
            .tls_proxy
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                let key = format!("listen.tls_proxy[{i}]");
                let listen = l.get_ref();
                let address = parse_or(
                    p,
                    &listen.address,
                    &format!("{key}.address"),
                    "expected IP:PORT such as \"0.0.0.0:3129\"",
                )?;
                let has_ca = tls.as_ref().is_some_and(|t| t.client_ca.is_some());
                let mode = listen.client_certificates.unwrap_or(if has_ca {
                    ClientCertificates::Required
                } else {
                    ClientCertificates::Off
                });
                if tls.is_none() {
                    p.add(
                        l.span(),
                        key.clone(),
                        "a TLS listener needs a [tls] section with `certificate` and `key`",
                    );
                } else if mode != ClientCertificates::Off && !has_ca {
                    p.add(
                        l.span(),
                        format!("{key}.client_certificates"),
                        "asking for client certificates needs `tls.client_ca`",
                    );
                }
                Some(TlsListen {
                    address,
                    client_certificates: mode,
                })
            })
            .collect(),
        proxy_protocol_from: cidrs(
            p,
            &raw.listen.proxy_protocol_from,
            "listen.proxy_protocol_from",
        ),
        clients: match raw.listen.clients {
            None => DEFAULT_CLIENTS
                .iter()
                .map(|c| c.parse().expect("valid default"))
                .collect(),
            Some(list) => cidrs(p, &list, "listen.clients"),
        },
    };

    let profile_names: Vec<Spanned<String>> = raw
        .policy
        .profiles
        .unwrap_or_else(|| vec![Spanned::new(0..0, DEFAULT_PROFILE.to_owned())]);
    // The file's own rules come first (first match wins), so an operator's rule for a name
    // under a built-in wildcard (a private endpoint, say) is the one that applies.
    let mut profile_rules = Vec::new();
    let mut profiles_used = Vec::new();
    for (i, name) in profile_names.iter().enumerate() {
        match profiles::find(name.get_ref()) {
            Some(profile) => {
                profiles_used.push(profile.name);
                profile_rules.extend(
                    profile
                        .entries
                        .iter()
                        .map(|entry| profile_rule(profile.name, entry)),
                );
            }
            None => p.add(
                name.span(),
                format!("policy.profiles[{i}]"),
                format!(
                    "unknown profile {:?}; expected one of {}",
                    name.get_ref(),
                    profiles::names().join(", ")
                ),
            ),
        }
    }
    let mut names: HashSet<String> = profile_rules.iter().map(|r| r.name.clone()).collect();
    let mut rules = Vec::new();
    for (i, raw_rule) in raw.policy.allow.iter().enumerate() {
        if let Some(rule) = compile_rule(p, raw_rule, &format!("policy.allow[{i}]"), &mut names) {
            rules.push(rule);
        }
    }
    rules.extend(profile_rules);
    let policy = Policy {
        mode: raw.policy.mode.unwrap_or(Mode::Enforce),
        rules,
        allow_unassigned: raw.policy.allow_unassigned,
        sni: raw.policy.sni.unwrap_or(crate::sni::SniMode::Match),
        on_reload: raw
            .policy
            .on_reload
            .unwrap_or(crate::policy::OnReload::Keep),
    };
    let branches = compile_branches(p, &raw.branch, &policy);

    let resolver = ResolverSettings {
        servers: raw
            .resolver
            .servers
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let key = format!("resolver.servers[{i}]");
                let text = s.get_ref();
                match text.parse::<SocketAddr>() {
                    Ok(addr) => Some(addr),
                    Err(_) => match text.parse::<IpAddr>() {
                        Ok(ip) => Some(SocketAddr::new(ip, 53)),
                        Err(_) => {
                            p.add(
                                s.span(),
                                key,
                                "expected an IP address or IP:PORT of a DNS server",
                            );
                            None
                        }
                    },
                }
            })
            .collect(),
        timeout: duration(
            p,
            raw.resolver.timeout.as_ref(),
            "resolver.timeout",
            DEFAULT_DNS_TIMEOUT,
        ),
        hosts: static_hosts(p, &raw.resolver.hosts),
        hosts_only: raw.resolver.hosts_only,
    };

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
    };

    let limits = Limits {
        max_connections: match raw.limits.max_connections {
            None => DEFAULT_MAX_CONNECTIONS,
            Some(n) if *n.get_ref() == 0 => {
                p.add(
                    n.span(),
                    "limits.max_connections",
                    "expected a number of connections above 0",
                );
                DEFAULT_MAX_CONNECTIONS
            }
            Some(n) => *n.get_ref() as usize,
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
    };

    let schedules = compile_schedules(p, &raw.schedule, &branches, &policy, jiff::Timestamp::now());
    Config {
        listen,
        policy,
        profiles: profiles_used,
        resolver,
        timeouts,
        limits,
        log: LogSettings {
            format: raw.log.format.unwrap_or(LogFormat::Text),
        },
        schedules,
        branches,
        tls,
    }
}

/// `[[schedule]]` entries. Overlaps are looked for from `now` over a year, in absolute time,
/// so schedules in different zones are compared as the clocks will really run.
fn compile_schedules(
    p: &mut Problems<'_>,
    raw: &[Spanned<RawSchedule>],
    branches: &[Branch],
    policy: &Policy,
    now: jiff::Timestamp,
) -> Vec<Schedule> {
    use crate::schedule::{self as sch, Scope};
    let mut schedules: Vec<Schedule> = Vec::new();
    let mut names = HashSet::new();
    let known_categories: HashSet<&str> =
        policy.rules.iter().map(|r| r.category.as_str()).collect();
    for (i, raw_schedule) in raw.iter().enumerate() {
        let key = format!("schedule[{i}]");
        let before = p.list.len();
        let s = raw_schedule.get_ref();
        let name = s.name.get_ref().clone();
        if !is_name(&name) {
            p.add(
                s.name.span(),
                format!("{key}.name"),
                "expected a name of letters, digits, '-', '_', '.'",
            );
        } else if !names.insert(name.clone()) {
            p.add(
                s.name.span(),
                format!("{key}.name"),
                format!("schedule name {name:?} is used twice"),
            );
        }
        let days = sch::parse_days(s.days.get_ref())
            .map_err(|e| p.add(s.days.span(), format!("{key}.days"), e))
            .unwrap_or([false; 7]);
        let (start, end) = sch::parse_window(s.hours.get_ref())
            .map_err(|e| p.add(s.hours.span(), format!("{key}.hours"), e))
            .unwrap_or_default();
        let (zone, zone_name) = match &s.time_zone {
            None => {
                let zone = jiff::tz::TimeZone::system();
                let name = zone.iana_name().unwrap_or("host time zone").to_owned();
                (zone, name)
            }
            Some(z) => match jiff::tz::TimeZone::get(z.get_ref()) {
                Ok(zone) => (zone, z.get_ref().clone()),
                Err(_) => {
                    p.add(
                        z.span(),
                        format!("{key}.time_zone"),
                        format!(
                            "{:?}: expected an IANA time zone such as \"Europe/London\" or \"America/New_York\"",
                            z.get_ref()
                        ),
                    );
                    (jiff::tz::TimeZone::UTC, String::new())
                }
            },
        };
        let rate = |p: &mut Problems<'_>, value: &Option<Spanned<String>>, field: &str| {
            value.as_ref().and_then(|v| {
                sch::parse_rate(v.get_ref())
                    .map_err(|e| p.add(v.span(), format!("{key}.{field}"), e))
                    .ok()
            })
        };
        let upload = rate(p, &s.upload, "upload");
        let download = rate(p, &s.download, "download");
        if s.upload.is_none() && s.download.is_none() {
            p.add(
                raw_schedule.span(),
                key.clone(),
                "expected a limit: `upload`, `download` or both (such as upload = \"10 Mbit/s\")",
            );
        }
        let scope = match s.applies_to.as_ref().map(|a| a.get_ref().as_str()) {
            None | Some("each-branch") => Scope::EachBranch,
            Some("all-branches") => Scope::AllBranches,
            Some(other) => {
                let span = s.applies_to.as_ref().map_or(0..0, |a| a.span());
                p.add(
                    span,
                    format!("{key}.applies_to"),
                    format!("{other:?}: expected \"each-branch\" (a budget per branch) or \"all-branches\" (one budget shared)"),
                );
                Scope::EachBranch
            }
        };
        let branch_list = s.branches.as_ref().map(|list| {
            if list.is_empty() {
                p.add(
                    raw_schedule.span(),
                    format!("{key}.branches"),
                    "expected at least one branch name (leave `branches` out for every branch)",
                );
            }
            list.iter()
                .enumerate()
                .map(|(j, b)| {
                    let known = b.get_ref() == crate::identity::UNASSIGNED
                        || branches.iter().any(|br| &br.name == b.get_ref());
                    if !known {
                        p.add(
                            b.span(),
                            format!("{key}.branches[{j}]"),
                            format!(
                                "{:?}: expected the name of a [[branch]] (or \"unassigned\")",
                                b.get_ref()
                            ),
                        );
                    }
                    b.get_ref().clone()
                })
                .collect::<Vec<_>>()
        });
        let categories = match &s.categories {
            None => sch::DEFAULT_CATEGORIES
                .iter()
                .map(|c| c.to_string())
                .collect(),
            Some(list) => {
                if list.is_empty() {
                    p.add(
                        raw_schedule.span(),
                        format!("{key}.categories"),
                        "expected at least one rule category (leave `categories` out for storage and sync)",
                    );
                }
                list.iter()
                    .enumerate()
                    .map(|(j, c)| {
                        if !known_categories.contains(c.get_ref().as_str()) {
                            let mut known: Vec<&str> = known_categories.iter().copied().collect();
                            known.sort_unstable();
                            p.add(
                                c.span(),
                                format!("{key}.categories[{j}]"),
                                format!(
                                    "{:?}: expected a category of the policy's rules: {}",
                                    c.get_ref(),
                                    known.join(", ")
                                ),
                            );
                        }
                        c.get_ref().clone()
                    })
                    .collect()
            }
        };
        if p.list.len() != before {
            continue;
        }
        let schedule = Schedule {
            name,
            days,
            start,
            end,
            zone,
            zone_name,
            upload,
            download,
            scope,
            branches: branch_list,
            categories,
        };
        for other in &schedules {
            let Some(direction) = schedule.shares_budget_with(other) else {
                continue;
            };
            if let Some(at) = sch::first_overlap(other, &schedule, now, sch::OVERLAP_HORIZON_DAYS) {
                p.add(
                    raw_schedule.span(),
                    key.clone(),
                    format!(
                        "schedule {:?} ({}) overlaps schedule {:?} ({}) for the same {} {} budget, first at {}: a budget takes one schedule at a time",
                        schedule.name,
                        schedule.when(),
                        other.name,
                        other.when(),
                        schedule.scope.as_str(),
                        direction.as_str(),
                        at.to_zoned(schedule.zone.clone()).strftime("%a %Y-%m-%d %H:%M %Z"),
                    ),
                );
                break;
            }
        }
        schedules.push(schedule);
    }
    let mut categories: Vec<&str> = schedules
        .iter()
        .flat_map(|s| s.categories.iter().map(String::as_str))
        .collect();
    categories.sort_unstable();
    categories.dedup();
    if categories.len() > 64 {
        p.add(
            0..0,
            "schedule",
            "schedules may throttle at most 64 categories in all",
        );
    }
    schedules
}

fn compile_tls(p: &mut Problems<'_>, raw: &Spanned<RawTls>, base: &Path) -> TlsSettings {
    let t = raw.get_ref();
    let path = |value: &Spanned<String>| base.join(value.get_ref());
    let mut required = |value: &Option<Spanned<String>>, key: &str| match value {
        Some(v) => path(v),
        None => {
            p.add(
                raw.span(),
                format!("tls.{key}"),
                format!("expected `{key}` = path of a PEM file"),
            );
            std::path::PathBuf::new()
        }
    };
    let certificate = required(&t.certificate, "certificate");
    let key = required(&t.key, "key");
    TlsSettings {
        certificate,
        key,
        client_ca: t.client_ca.as_ref().map(path),
        handshake_timeout: duration(
            p,
            t.handshake_timeout.as_ref(),
            "tls.handshake_timeout",
            DEFAULT_HANDSHAKE_TIMEOUT,
        ),
    }
}

fn is_name(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn compile_branches(
    p: &mut Problems<'_>,
    raw: &[Spanned<RawBranch>],
    policy: &Policy,
) -> Vec<Branch> {
    let mut names = HashSet::new();
    let mut users = HashSet::new();
    let mut branches = Vec::new();
    for (i, raw_branch) in raw.iter().enumerate() {
        let key = format!("branch[{i}]");
        let before = p.list.len();
        let b = raw_branch.get_ref();
        let name = b.name.get_ref().clone();
        if !is_name(&name) || name == crate::identity::UNASSIGNED {
            p.add(
                b.name.span(),
                format!("{key}.name"),
                "expected a name of letters, digits, '-', '_', '.' (not \"unassigned\")",
            );
        } else if !names.insert(name.clone()) {
            p.add(
                b.name.span(),
                format!("{key}.name"),
                format!("branch name {name:?} is used twice"),
            );
        }
        let sources = cidrs(p, &b.sources, &format!("{key}.sources"));
        let mut credentials = Vec::new();
        for (j, c) in b.credentials.iter().enumerate() {
            let user = c.user.get_ref();
            if user.is_empty() || user.contains(':') || user.chars().any(char::is_control) {
                p.add(
                    c.user.span(),
                    format!("{key}.credentials[{j}].user"),
                    "expected a user name without ':' or control characters",
                );
            } else if !users.insert(user.clone()) {
                p.add(
                    c.user.span(),
                    format!("{key}.credentials[{j}].user"),
                    format!("user {user:?} is defined twice"),
                );
            }
            if !crate::identity::is_argon2id_phc(c.password_hash.get_ref()) {
                p.add(
                    c.password_hash.span(),
                    format!("{key}.credentials[{j}].password_hash"),
                    "expected an argon2id hash (\"$argon2id$...\", from `portcullis hash-password`); plain passwords are not accepted",
                );
            }
            credentials.push(Credential {
                user: user.clone(),
                password_hash: c.password_hash.get_ref().clone(),
            });
        }
        let client_certificates = b
            .client_certificates
            .iter()
            .enumerate()
            .filter_map(|(j, n)| match DnsName::parse(n.get_ref()) {
                Ok(name) => Some(name),
                Err(why) => {
                    p.add(
                        n.span(),
                        format!("{key}.client_certificates[{j}]"),
                        format!("{why}; expected a certificate's DNS name"),
                    );
                    None
                }
            })
            .collect();
        let allowed_rules = b.allow.as_ref().map(|names| {
            let mut allowed = vec![false; policy.rules.len()];
            for (j, rule) in names.iter().enumerate() {
                match policy.rules.iter().position(|r| &r.name == rule.get_ref()) {
                    Some(k) => allowed[k] = true,
                    None => p.add(
                        rule.span(),
                        format!("{key}.allow[{j}]"),
                        format!(
                            "no rule named {:?} (rules are listed by check-config)",
                            rule.get_ref()
                        ),
                    ),
                }
            }
            allowed
        });
        let max_tunnels = b.max_tunnels.as_ref().and_then(|n| {
            if *n.get_ref() == 0 {
                p.add(
                    n.span(),
                    format!("{key}.max_tunnels"),
                    "expected a number above 0 (leave it out for no limit)",
                );
            }
            Some(*n.get_ref()).filter(|&n| n > 0)
        });
        if b.sources.is_empty() && b.credentials.is_empty() && b.client_certificates.is_empty() {
            p.add(
                raw_branch.span(),
                key,
                "a branch needs `sources`, `credentials` or `client_certificates`",
            );
        }
        if p.list.len() == before {
            branches.push(Branch {
                name,
                sources,
                credentials,
                client_certificates,
                allowed_rules,
                max_tunnels,
            });
        }
    }
    branches
}

fn profile_rule(profile: &'static str, entry: &profiles::Entry) -> Rule {
    Rule {
        name: format!("{profile}/{}", entry.category),
        category: entry.category.to_owned(),
        hosts: entry
            .hosts
            .iter()
            .map(|h| HostPattern::parse(h).expect("built-in patterns are checked by a unit test"))
            .collect(),
        ports: entry.ports.to_vec(),
        addresses: Vec::new(),
        private_addresses: Vec::new(),
        origin: format!("profile {profile} ({})", profiles::VERSION),
        reachable: Vec::new(),
        sni: None,
        // Revocation lists and OCSP are plain HTTP: the lane serves them, CONNECT does not.
        plain_http: entry.category == "revocation",
    }
}

fn compile_rule(
    p: &mut Problems<'_>,
    raw: &Spanned<RawRule>,
    key: &str,
    names: &mut HashSet<String>,
) -> Option<Rule> {
    let before = p.list.len();
    let span = raw.span();
    let raw = raw.get_ref();
    let name = raw.name.get_ref().trim().to_owned();
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
    {
        p.add(
            raw.name.span(),
            format!("{key}.name"),
            "expected a non-empty name of letters, digits, '-', '_', '.', '/'",
        );
    } else if !names.insert(name.clone()) {
        p.add(raw.name.span(), format!("{key}.name"), format!("rule name {name:?} is used twice (built-in profile rules are named profile/category)"));
    }
    let category = match &raw.category {
        None => DEFAULT_CATEGORY.to_owned(),
        Some(c)
            if c.get_ref().is_empty()
                || !c
                    .get_ref()
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
        {
            p.add(
                c.span(),
                format!("{key}.category"),
                "expected a category name of letters, digits, '-' or '_'",
            );
            String::new()
        }
        Some(c) => c.get_ref().to_ascii_lowercase(),
    };
    let hosts: Vec<HostPattern> = raw
        .hosts
        .iter()
        .enumerate()
        .filter_map(|(i, h)| match HostPattern::parse(h.get_ref()) {
            Ok(pattern) => Some(pattern),
            Err(why) => {
                p.add(
                    h.span(),
                    format!("{key}.hosts[{i}]"),
                    format!("{why}; expected a DNS name or \"*.suffix\""),
                );
                None
            }
        })
        .collect();
    let ports: Vec<u16> = match &raw.ports {
        None => DEFAULT_RULE_PORTS.to_vec(),
        Some(list) => {
            if list.is_empty() {
                p.add(
                    span.clone(),
                    format!("{key}.ports"),
                    "expected at least one port",
                );
            }
            list.iter()
                .enumerate()
                .filter_map(|(i, port)| {
                    if *port.get_ref() == 0 {
                        p.add(
                            port.span(),
                            format!("{key}.ports[{i}]"),
                            "expected a port from 1 to 65535",
                        );
                        None
                    } else {
                        Some(*port.get_ref())
                    }
                })
                .collect()
        }
    };
    let addresses = cidrs(p, &raw.addresses, &format!("{key}.addresses"));
    let private_addresses = cidrs(
        p,
        &raw.private_addresses,
        &format!("{key}.private_addresses"),
    );
    if raw.hosts.is_empty() && raw.addresses.is_empty() {
        p.add(
            span,
            key,
            "a rule needs `hosts` (names) or `addresses` (CIDRs for IP-literal targets)",
        );
    }
    if p.list.len() > before {
        return None;
    }
    let reachable = addresses
        .iter()
        .chain(&private_addresses)
        .copied()
        .collect();
    Some(Rule {
        name,
        category,
        hosts,
        ports,
        addresses,
        private_addresses,
        origin: "config".into(),
        reachable,
        sni: raw.sni,
        plain_http: raw.plain_http,
    })
}

fn parse_or<T: std::str::FromStr>(
    p: &mut Problems<'_>,
    value: &Spanned<String>,
    key: &str,
    expected: &str,
) -> Option<T> {
    match value.get_ref().parse() {
        Ok(v) => Some(v),
        Err(_) => {
            p.add(
                value.span(),
                key,
                format!("{:?}: {expected}", value.get_ref()),
            );
            None
        }
    }
}

/// CIDRs; a bare address means just that address (/32 or /128).
fn cidrs(p: &mut Problems<'_>, list: &[Spanned<String>], key: &str) -> Vec<IpNet> {
    list.iter()
        .enumerate()
        .filter_map(|(i, text)| {
            let t = text.get_ref();
            t.parse::<IpNet>()
                .ok()
                .or_else(|| t.parse::<IpAddr>().ok().map(IpNet::from))
                .or_else(|| {
                    p.add(
                        text.span(),
                        format!("{key}[{i}]"),
                        format!("{t:?}: expected a CIDR such as \"10.20.0.0/16\" or an IP address"),
                    );
                    None
                })
        })
        .collect()
}

fn duration(
    p: &mut Problems<'_>,
    value: Option<&Spanned<String>>,
    key: &str,
    default: Duration,
) -> Duration {
    let Some(value) = value else { return default };
    let parsed = value
        .get_ref()
        .parse::<jiff::SignedDuration>()
        .ok()
        .filter(|d| d.is_positive())
        .and_then(|d| Duration::try_from(d).ok());
    parsed.unwrap_or_else(|| {
        p.add(
            value.span(),
            key,
            format!(
                "{:?}: expected a positive duration such as \"500ms\", \"10s\", \"15m\" or \"1h\"",
                value.get_ref()
            ),
        );
        default
    })
}

fn static_hosts(
    p: &mut Problems<'_>,
    raw: &BTreeMap<Spanned<String>, Spanned<toml::Value>>,
) -> BTreeMap<DnsName, Vec<IpAddr>> {
    let mut hosts = BTreeMap::new();
    for (name, value) in raw {
        let key = format!("resolver.hosts.{:?}", name.get_ref());
        let dns_name = match DnsName::parse(name.get_ref()) {
            Ok(n) => Some(n),
            Err(why) => {
                p.add(
                    name.span(),
                    key.clone(),
                    format!("{why}; expected a DNS name"),
                );
                None
            }
        };
        let texts: Vec<&toml::Value> = match value.get_ref() {
            toml::Value::Array(items) => items.iter().collect(),
            single => vec![single],
        };
        let mut addrs = Vec::new();
        for item in &texts {
            match item.as_str().and_then(|s| s.parse::<IpAddr>().ok()) {
                Some(ip) => addrs.push(ip),
                None => {
                    let shown = item
                        .as_str()
                        .map_or_else(|| format!("a {}", item.type_str()), |s| format!("{s:?}"));
                    p.add(
                        value.span(),
                        key.clone(),
                        format!("{shown}: expected an IP address or a list of them"),
                    )
                }
            }
        }
        if texts.is_empty() {
            p.add(
                value.span(),
                key.clone(),
                "expected at least one IP address",
            );
        }
        if let Some(n) = dns_name {
            hosts.insert(n, addrs);
        }
    }
    hosts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_builtin_gateway() {
        let c = Config::builtin();
        assert_eq!(
            c.listen.proxy,
            vec!["0.0.0.0:3128".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(c.listen.clients.len(), DEFAULT_CLIENTS.len());
        assert_eq!(c.profiles, vec!["azure-file-sync"]);
        assert_eq!(c.policy.mode, Mode::Enforce);
        assert!(
            c.policy
                .rules
                .iter()
                .any(|r| r.name == "azure-file-sync/storage")
        );
        assert_eq!(c.timeouts.head, Duration::from_secs(10));
        assert_eq!(c.timeouts.idle, Duration::from_secs(900));
        assert_eq!(c.log.format, LogFormat::Text);
    }

    #[test]
    fn a_full_file_compiles() {
        let c = Config::parse(
            r#"
[listen]
proxy = ["127.0.0.1:0", "[::1]:0"]
clients = ["10.1.0.0/16", "192.0.2.7"]

[policy]
mode = "report"
profiles = ["azure-file-sync-usgov", "azure-file-sync-china"]

[[policy.allow]]
name = "contoso-pe"
category = "storage"
hosts = ["contoso.file.core.windows.net"]
private_addresses = ["10.20.0.0/16"]

[[policy.allow]]
name = "literal"
addresses = ["203.0.113.0/24"]
ports = [443, 8443]

[resolver]
servers = ["10.0.0.53", "10.0.0.54:5353"]
timeout = "2s"
hosts = { "contoso.file.core.windows.net" = "10.20.1.5", "Dual.Example" = ["10.0.0.1", "fd00::1"] }

[timeouts]
head = "500ms"
idle = "1h"

[limits]
max_connections = 10

[log]
format = "json"
"#,
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.policy.mode, Mode::Report);
        let pe = c
            .policy
            .rules
            .iter()
            .find(|r| r.name == "contoso-pe")
            .unwrap();
        assert_eq!(
            (pe.category.as_str(), pe.ports.as_slice()),
            ("storage", &[443][..])
        );
        let literal = c.policy.rules.iter().find(|r| r.name == "literal").unwrap();
        assert_eq!(literal.category, "other");
        assert_eq!(
            c.resolver.servers[1],
            "10.0.0.54:5353".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            c.resolver.hosts[&DnsName::parse("dual.example").unwrap()].len(),
            2
        );
        assert_eq!(c.timeouts.head, Duration::from_millis(500));
        assert_eq!(c.timeouts.connect, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(c.limits.max_connections, 10);
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn every_semantic_problem_is_listed_with_line_and_key() {
        let text = "[listen]\nproxy = [\"nonsense\"]\n\n[policy]\nprofiles = [\"azure\"]\n\n[[policy.allow]]\nname = \"x\"\nhosts = [\"bad_host.com\", \"*.ok.com\"]\nports = [0]\n\n[timeouts]\nidle = \"soon\"\n";
        let err = Config::parse(text, "bad.toml").unwrap_err();
        let lines: Vec<String> = err.problems.iter().map(|p| p.to_string()).collect();
        let want = [
            ("bad.toml:2:10: listen.proxy[0]", "expected IP:PORT"),
            (
                "bad.toml:5:13: policy.profiles[0]",
                "unknown profile \"azure\"",
            ),
            (
                "bad.toml:9:10: policy.allow[0].hosts[0]",
                "expected a DNS name",
            ),
            (
                "bad.toml:10:10: policy.allow[0].ports[0]",
                "expected a port from 1 to 65535",
            ),
            (
                "bad.toml:13:8: timeouts.idle",
                "expected a positive duration",
            ),
        ];
        assert_eq!(lines.len(), want.len(), "{lines:#?}");
        for (line, (prefix, text)) in lines.iter().zip(want) {
            assert!(
                line.starts_with(prefix) && line.contains(text),
                "{line:?} vs {prefix} … {text}"
            );
        }
    }

    #[test]
    fn syntax_and_unknown_keys_name_their_line() {
        let err = Config::parse("[listen]\nproxi = []\n", "f.toml").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("f.toml:2:1: ") && msg.contains("unknown field `proxi`"),
            "{msg}"
        );
        let err = Config::parse("[policy]\nmode = \"enforced\"\n", "f.toml").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("f.toml:2:8: ") && msg.contains("enforce"),
            "{msg}"
        );
        let err = Config::parse("[policy\n", "f.toml").unwrap_err();
        assert!(err.to_string().starts_with("f.toml:1:"), "{err}");
    }

    #[test]
    fn rules_need_a_target_and_unique_names() {
        let text = "[[policy.allow]]\nname = \"a\"\n\n[[policy.allow]]\nname = \"a\"\nhosts = [\"x.example\"]\n\n[[policy.allow]]\nname = \"azure-file-sync/storage\"\nhosts = [\"y.example\"]\n";
        let err = Config::parse(text, "f.toml").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("f.toml:1:1: policy.allow[0]: a rule needs `hosts`"),
            "{msg}"
        );
        assert!(
            msg.contains("f.toml:5:8: policy.allow[1].name: rule name \"a\" is used twice"),
            "{msg}"
        );
        assert!(msg.contains("f.toml:9:8: policy.allow[2].name"), "{msg}");
    }

    #[test]
    fn branch_problems_are_listed_with_their_keys() {
        let text = "[[branch]]\nname = \"a\"\ncredentials = [{ user = \"u\", password_hash = \"plain\" }]\nallow = [\"nope\"]\nmax_tunnels = 0\n\n[[branch]]\nname = \"a\"\nsources = [\"10.0.0.0/8\"]\ncredentials = [{ user = \"u\", password_hash = \"plain\" }]\n\n[[branch]]\nname = \"unassigned\"\n";
        let msg = Config::parse(text, "b.toml").unwrap_err().to_string();
        for want in [
            "b.toml:3:46: branch[0].credentials[0].password_hash: expected an argon2id hash",
            "b.toml:4:10: branch[0].allow[0]: no rule named \"nope\"",
            "b.toml:5:15: branch[0].max_tunnels: expected a number above 0",
            "b.toml:8:8: branch[1].name: branch name \"a\" is used twice",
            "b.toml:10:25: branch[1].credentials[0].user: user \"u\" is defined twice",
            "b.toml:13:8: branch[2].name",
            "b.toml:12:1: branch[2]: a branch needs `sources`, `credentials` or `client_certificates`",
        ] {
            assert!(msg.contains(want), "missing {want:?} in:\n{msg}");
        }
    }

    #[test]
    fn static_host_values_must_be_addresses() {
        let err = Config::parse(
            "[resolver]\nhosts = { \"a.example\" = \"not-an-ip\", \"b_.x\" = \"10.0.0.1\" }\n",
            "f.toml",
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("resolver.hosts.\"a.example\""), "{msg}");
        assert!(msg.contains("resolver.hosts.\"b_.x\""), "{msg}");
    }
}
