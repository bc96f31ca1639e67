//! Prometheus metrics (prometheus-client). Label values come only from config-bounded sets
//! (verdict, end kind, rule category, branch name, direction, budget): a destination host is never a
//! label. Updated when a tunnel opens, as its bytes flow (in steps of [`METER_STEP`] bytes or one
//! idle tick, never per chunk), and once when a connection ends.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub verdict: &'static str,
    pub end: &'static str,
    pub category: String,
    pub branch: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TunnelLabels {
    pub category: String,
    pub branch: String,
}

/// Tunnel bytes reach the counters after at most this many more have moved (or at the relay's
/// next idle tick, or at its end): `rate()` follows a tunnel held for hours, at one atomic add
/// per 256 KiB.
pub const METER_STEP: u64 = 256 * 1024;

/// One tunnel's byte counters (up, down), found once when it opens so that counting while it
/// runs is an atomic add. The default counts into counters nobody exports (tests, the agent).
#[derive(Clone, Default)]
pub struct TunnelBytes {
    pub up: Counter,
    pub down: Counter,
}

/// A tunnel's series: open tunnels and bytes of its category and branch.
#[derive(Clone)]
pub struct TunnelSeries {
    pub active: Gauge,
    pub bytes: TunnelBytes,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub direction: &'static str,
    pub category: String,
    pub branch: String,
}

/// One bandwidth budget: scope (`each-branch`, `all-branches`), whose (branch or group of
/// branches, from config) and direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ThrottleLabels {
    pub scope: &'static str,
    pub budget: String,
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    /// The built-in allow-lists' review date (`policy::profiles::VERSION`).
    profiles: &'static str,
}

/// How a timed step ended: `ok`, `failed` or `timeout`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// The outcomes a dial or a lookup has, created at zero.
/// Access lines the access file could not take, since start (`access_log_lines_dropped_total`):
/// process-wide, as the access file is, and counted before any snapshot's metrics exist.
pub static ACCESS_LOG_LINES_DROPPED: std::sync::LazyLock<Counter> =
    std::sync::LazyLock::new(Default::default);

const OUTCOMES: [&str; 3] = ["ok", "failed", "timeout"];

type Latency = Family<OutcomeLabels, Histogram, fn() -> Histogram>;

/// Every metric the gateway exports; shared by all configuration snapshots.
pub struct Metrics {
    registry: Registry,
    /// Client connections being served, and the limit (`limits.max_connections`); set when
    /// scraped, so nothing on the data path touches them.
    connections_open: Gauge,
    /// Clients in the listeners' accept queues, waiting for a place.
    connections_waiting: Gauge,
    /// Times the accept loops found every place taken, and how many of those are counted.
    connections_limit_reached: Counter,
    limit_reached_counted: std::sync::Mutex<u64>,
    connections_limit: Gauge,
    process: ProcessMetrics,
    pub requests: Family<RequestLabels, Counter>,
    pub tunnels_active: Family<TunnelLabels, Gauge>,
    pub bytes: Family<BytesLabels, Counter>,
    pub reloads: Family<ReloadLabels, Counter>,
    pub last_reload_seconds: Gauge<f64, AtomicU64>,
    /// Upstream connect time, all candidate addresses together, by outcome.
    pub dial_duration: Latency,
    /// Name resolution time (static overrides included), by outcome.
    pub dns_duration: Latency,
    /// Bytes per second a schedule puts in force on a budget; 0 when none is.
    pub throttle_limit: Family<ThrottleLabels, Gauge>,
    /// Time tunnels spent waiting for a budget, summed over tunnels.
    pub throttle_wait_seconds: Family<ThrottleLabels, Counter<f64, AtomicU64>>,
    /// Bytes that went through a budget in force.
    pub throttled_bytes: Family<ThrottleLabels, Counter>,
    /// The `changeNumber` of the service tags file in force (0 without one).
    pub service_tags_change_number: Gauge,
    /// Parents and egresses (series only for those configured and used).
    pub way_out: WayOutMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ParentOutcomeLabels {
    pub parent: String,
    /// `tunnel` (the parent said 200), `refused` (it answered with another status), `failed`
    /// (no usable answer: failover), `skipped` (down, in its backoff).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ParentLabels {
    pub parent: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EgressLabels {
    pub egress: String,
    /// `direct`, `parent`, `fallback` (direct after every parent failed), `failed`.
    pub path: &'static str,
}

/// Metrics of the ways out: per parent and per egress.
#[derive(Clone)]
pub struct WayOutMetrics {
    pub parent_requests: Family<ParentOutcomeLabels, Counter>,
    pub parent_up: Family<ParentLabels, Gauge>,
    pub parent_connect: Family<ParentLabels, Histogram, fn() -> Histogram>,
    pub egress_requests: Family<EgressLabels, Counter>,
}

impl WayOutMetrics {
    fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            parent_requests: Family::default(),
            parent_up: Family::default(),
            parent_connect: Family::new_with_constructor(latency_histogram),
            egress_requests: Family::default(),
        };
        registry.register(
            "parent_requests",
            "CONNECTs sent to each parent proxy by outcome (tunnel, refused, failed, skipped)",
            metrics.parent_requests.clone(),
        );
        registry.register(
            "parent_up",
            "1 while a parent proxy is used, 0 while it is skipped after failing (passive health)",
            metrics.parent_up.clone(),
        );
        registry.register_with_unit(
            "parent_connect_duration",
            "Time from connecting to a parent proxy to its answer to the CONNECT",
            Unit::Seconds,
            metrics.parent_connect.clone(),
        );
        registry.register(
            "egress_requests",
            "Upstream connections per egress by path (direct, parent, fallback, failed)",
            metrics.egress_requests.clone(),
        );
        metrics
    }
}

/// 0.25 ms to about 16 s, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 17))
}

fn latency_family() -> Latency {
    let family = Latency::new_with_constructor(latency_histogram);
    for outcome in OUTCOMES {
        drop(family.get_or_create(&OutcomeLabels { outcome }));
    }
    family
}

impl Metrics {
    /// Every family registered; `profiles` is the built-in allow-lists' version for
    /// `build_info`.
    pub fn new(profiles: &'static str) -> Self {
        let mut root = Registry::default();
        let process = ProcessMetrics::register(&mut root);
        let registry = root.sub_registry_with_prefix("portcullis");
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Client connections being served now, across all listeners",
            connections_open.clone(),
        );
        let connections_waiting = Gauge::default();
        registry.register(
            "connections_waiting",
            "Client connections the kernel accepted that wait in the listeners' accept queues (at the limit, clients wait here)",
            connections_waiting.clone(),
        );
        let connections_limit_reached = Counter::default();
        registry.register(
            "connections_limit_reached",
            "Times an accept loop found limits.max_connections reached (new clients then wait in the accept queue)",
            connections_limit_reached.clone(),
        );
        let connections_limit = Gauge::default();
        registry.register(
            "connections_limit",
            "The limit on client connections served at once (limits.max_connections)",
            connections_limit.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Client requests by verdict, how they ended, category and branch",
            requests.clone(),
        );
        let tunnels_active = Family::<TunnelLabels, Gauge>::default();
        registry.register(
            "tunnels_active",
            "Open tunnels by category and branch",
            tunnels_active.clone(),
        );
        let bytes = Family::<BytesLabels, Counter>::default();
        registry.register(
            "bytes",
            "Tunnel bytes by direction (up: client to upstream), category and branch",
            bytes.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        for result in ["success", "failure"] {
            drop(reloads.get_or_create(&ReloadLabels { result }));
        }
        registry.register(
            "config_reloads",
            "Configuration reloads by result",
            reloads.clone(),
        );
        registry.register(
            "access_log_lines_dropped",
            "Access lines the access file could not take (a full or failing disk)",
            ACCESS_LOG_LINES_DROPPED.clone(),
        );
        let last_reload_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "Unix time of the last configuration load that succeeded",
            last_reload_seconds.clone(),
        );
        let dial_duration = latency_family();
        registry.register_with_unit(
            "dial_duration",
            "Time to connect upstream (all candidate addresses) by outcome",
            Unit::Seconds,
            dial_duration.clone(),
        );
        let dns_duration = latency_family();
        registry.register_with_unit(
            "dns_duration",
            "Time to resolve the target name (static overrides included) by outcome",
            Unit::Seconds,
            dns_duration.clone(),
        );
        let throttle_limit = Family::<ThrottleLabels, Gauge>::default();
        registry.register(
            "throttle_limit_bytes_per_second",
            "Bandwidth limit in force per budget (scope, budget, direction); 0 when no schedule is in force",
            throttle_limit.clone(),
        );
        let throttle_wait_seconds = Family::<ThrottleLabels, Counter<f64, AtomicU64>>::default();
        registry.register(
            "throttle_wait_seconds",
            "Time tunnels spent waiting for a bandwidth budget, summed over tunnels",
            throttle_wait_seconds.clone(),
        );
        let throttled_bytes = Family::<ThrottleLabels, Counter>::default();
        registry.register(
            "throttled_bytes",
            "Bytes that went through a bandwidth budget while a limit was in force",
            throttled_bytes.clone(),
        );
        let service_tags_change_number = Gauge::default();
        registry.register(
            "service_tags_change_number",
            "changeNumber of the service tags file in force (policy.service_tags_file); 0 without one",
            service_tags_change_number.clone(),
        );
        let way_out = WayOutMetrics::register(registry);
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                profiles,
            })
            .set(1);
        registry.register("build_info", "Build information", build);
        last_reload_seconds.set(unix_now());
        Self {
            registry: root,
            connections_open,
            connections_waiting,
            connections_limit_reached,
            limit_reached_counted: std::sync::Mutex::new(0),
            connections_limit,
            process,
            requests,
            tunnels_active,
            bytes,
            reloads,
            last_reload_seconds,
            dial_duration,
            dns_duration,
            throttle_limit,
            throttle_wait_seconds,
            throttled_bytes,
            service_tags_change_number,
            way_out,
        }
    }

    /// The series of a tunnel of `category` for `branch` (created at zero if new).
    pub fn tunnel_series(&self, category: &str, branch: &str) -> TunnelSeries {
        let active = self
            .tunnels_active
            .get_or_create(&TunnelLabels {
                category: category.to_owned(),
                branch: branch.to_owned(),
            })
            .clone();
        TunnelSeries {
            active,
            bytes: self.tunnel_bytes(category, branch),
        }
    }

    /// The byte counters of a tunnel of `category` for `branch`.
    pub fn tunnel_bytes(&self, category: &str, branch: &str) -> TunnelBytes {
        let counter = |direction| {
            self.bytes
                .get_or_create(&BytesLabels {
                    direction,
                    category: category.to_owned(),
                    branch: branch.to_owned(),
                })
                .clone()
        };
        TunnelBytes {
            up: counter("up"),
            down: counter("down"),
        }
    }

    /// Creates, at zero, the series alerts and dashboards watch for `config`'s branches and
    /// categories, so `increase()` sees the first denial and `tunnels_active` reads 0 rather
    /// than nothing. Series only ever appear here (a reload keeps the old ones).
    pub fn expect_series(&self, branches: &[&str], categories: &[&str]) {
        for &branch in branches {
            for &category in categories {
                drop(self.tunnel_series(category, branch));
            }
            // A denial by the allow-list: no rule, so no category.
            drop(self.requests.get_or_create(&RequestLabels {
                verdict: "deny",
                end: "policy_denied",
                category: "none".into(),
                branch: branch.to_owned(),
            }));
        }
        // Refused before a branch is known.
        for end in [
            "client_denied",
            "no_branch",
            "auth_required",
            "auth_failed",
            "pending_heads_limit",
        ] {
            drop(self.requests.get_or_create(&RequestLabels {
                verdict: "none",
                end,
                category: "none".into(),
                branch: "none".into(),
            }));
        }
    }

    /// Reads what is sampled when scraped: the connections against their limit, and the
    /// process (descriptors against their limit, memory, CPU time).
    pub fn observe(&self, connections: &crate::accept::Connections) {
        self.connections_open.set(connections.open() as i64);
        self.connections_waiting.set(connections.waiting() as i64);
        let reached = connections.limit_reached();
        let mut counted = self
            .limit_reached_counted
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if reached > *counted {
            self.connections_limit_reached.inc_by(reached - *counted);
            *counted = reached;
        }
        drop(counted);
        let connection_limit = connections.limit();
        self.connections_limit.set(connection_limit as i64);
        self.process.observe();
    }

    /// Where parts switched on by config (fleet mode) register their families (`portcullis_`).
    pub fn registry_mut(&mut self) -> &mut Registry {
        self.registry.sub_registry_with_prefix("portcullis")
    }

    /// Every family, for the admin listener to encode.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The OpenMetrics text exposition (what Prometheus asks for first).
    pub fn render(&self) -> String {
        encode(&self.registry)
    }

    /// The classic Prometheus text format (0.0.4), for scrapers and tools that ask for it or
    /// ask for nothing in particular (`promtool check metrics`, older agents).
    pub fn render_classic(&self) -> String {
        classic_text(&self.render())
    }

    pub fn reloaded(&self, ok: bool) {
        self.reloads
            .get_or_create(&ReloadLabels {
                result: if ok { "success" } else { "failure" },
            })
            .inc();
        if ok {
            self.last_reload_seconds.set(unix_now());
        }
    }
}

/// The usual `process_*` metrics, read from `/proc/self` when scraped (Linux; elsewhere they
/// stay 0).
struct ProcessMetrics {
    open_fds: Gauge,
    max_fds: Gauge,
    resident_memory_bytes: Gauge,
    cpu_seconds: Counter<f64, AtomicU64>,
    /// CPU seconds already counted, so the counter only ever grows by the difference.
    cpu_counted: std::sync::Mutex<f64>,
}

impl ProcessMetrics {
    fn register(registry: &mut Registry) -> Self {
        let this = Self {
            open_fds: Gauge::default(),
            max_fds: Gauge::default(),
            resident_memory_bytes: Gauge::default(),
            cpu_seconds: Counter::default(),
            cpu_counted: std::sync::Mutex::new(0.0),
        };
        registry.register(
            "process_open_fds",
            "Open file descriptors",
            this.open_fds.clone(),
        );
        registry.register(
            "process_max_fds",
            "The file descriptor limit (soft)",
            this.max_fds.clone(),
        );
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory",
            this.resident_memory_bytes.clone(),
        );
        registry.register(
            "process_cpu_seconds",
            "User and system CPU time",
            this.cpu_seconds.clone(),
        );
        let start = Gauge::<f64, AtomicU64>::default();
        start.set(unix_now());
        registry.register(
            "process_start_time_seconds",
            "Unix time the process started",
            start,
        );
        this
    }

    fn observe(&self) {
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(fds.count() as i64);
        }
        if let Some(max) = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|limits| {
                let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
                line.split_whitespace().nth(3)?.parse::<i64>().ok()
            })
        {
            self.max_fds.set(max);
        }
        // Pages resident (statm's second field); Linux pages are 4 KiB here, and the kernel
        // says so in smaps, but statm is the cheap read.
        if let Some(pages) = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<i64>().ok())
        {
            self.resident_memory_bytes.set(pages * page_size());
        }
        // utime and stime (fields 14 and 15) in clock ticks, after the command's parentheses.
        if let Some(ticks) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|stat| {
                let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
                Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
            })
        {
            let seconds = ticks as f64 / CLOCK_TICKS_PER_SECOND;
            let mut counted = self.cpu_counted.lock().unwrap_or_else(|e| e.into_inner());
            if seconds > *counted {
                self.cpu_seconds.inc_by(seconds - *counted);
                *counted = seconds;
            }
        }
    }
}

/// `USER_HZ`, which Linux fixes at 100 for what `/proc` reports on every architecture.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

fn page_size() -> i64 {
    #[cfg(target_os = "linux")]
    {
        rustix::param::page_size() as i64
    }
    #[cfg(not(target_os = "linux"))]
    {
        4096
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `registry` as OpenMetrics text.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// OpenMetrics text as the classic text format: a counter family is named by its samples'
/// `_total` name, an info family becomes a gauge named `_info`, and `# UNIT` and `# EOF` go
/// (the classic format has neither).
pub fn classic_text(open_metrics: &str) -> String {
    let mut types: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
    for line in open_metrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            types.insert(name, kind);
        }
    }
    let renamed = |name: &str| match types.get(name) {
        Some(&"counter") => format!("{name}_total"),
        Some(&"info") => format!("{name}_info"),
        _ => name.to_owned(),
    };
    let mut out = String::with_capacity(open_metrics.len());
    for line in open_metrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str(&format!("# HELP {} {text}\n", renamed(name)));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let kind = if kind == "info" { "gauge" } else { kind };
            out.push_str(&format!("# TYPE {} {kind}\n", renamed(name)));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classic_text_names_families_by_their_samples() {
        let metrics = Metrics::new("test");
        metrics.reloaded(true);
        let classic = metrics.render_classic();
        assert!(
            classic.contains("# TYPE portcullis_config_reloads_total counter\n"),
            "{classic}"
        );
        assert!(
            classic.contains("# HELP portcullis_config_reloads_total "),
            "{classic}"
        );
        assert!(
            classic.contains("# TYPE portcullis_build_info gauge\n"),
            "{classic}"
        );
        assert!(
            !classic.contains("# EOF") && !classic.contains("# UNIT"),
            "{classic}"
        );
        assert!(metrics.render().ends_with("# EOF\n"));
    }
}
