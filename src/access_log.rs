//! The canonical log line: exactly one event per client connection, whatever the outcome, with
//! fixed field names (an API: dashboards and tests read them; README.md documents them).

use crate::config::LogFormat;
use std::net::SocketAddr;
use std::time::Duration;

/// tracing target of the canonical line, so it can be filtered (`RUST_LOG=portcullis::access=info`).
pub const TARGET: &str = "portcullis::access";

/// Everything known about one request; filled in step by step, emitted once.
#[derive(Debug, Default)]
pub struct AccessRecord {
    pub conn_id: u64,
    pub client: Option<SocketAddr>,
    /// The branch the client was identified as ("unassigned" when admitted without one).
    pub branch: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    /// The upstream address connected to (or last tried).
    pub resolved: Option<SocketAddr>,
    pub verdict: Option<&'static str>,
    pub rule: Option<String>,
    /// The server name in the tunnel's TLS ClientHello, when it was checked.
    pub sni: Option<String>,
    pub category: Option<String>,
    pub reason: String,
    /// The status sent to the client; 0 when none was (the client went away first).
    pub status: u16,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub connect_time: Option<Duration>,
    /// Name resolution time (not logged; a metric).
    pub resolve_time: Option<Duration>,
    pub duration: Duration,
    /// How the connection ended: "closed", "idle_timeout", "client_error", "upstream_error",
    /// or the refusal kind ("policy_denied", "bad_request", ...).
    pub end: &'static str,
}

impl AccessRecord {
    /// Writes the canonical line and counts the request in the metrics.
    pub fn finish(&self, metrics: &crate::metrics::Metrics) {
        self.emit();
        let category = self.category.clone().unwrap_or_else(|| "none".into());
        let branch = self.branch.clone().unwrap_or_else(|| "none".into());
        let verdict = self.verdict.unwrap_or("none");
        let labels = crate::metrics::RequestLabels {
            verdict,
            end: self.end,
            category,
            branch,
        };
        metrics.requests.get_or_create(&labels).inc();
        if let Some(t) = self.connect_time {
            metrics.dial_seconds.observe(t.as_secs_f64());
        }
        if let Some(t) = self.resolve_time {
            metrics.dns_seconds.observe(t.as_secs_f64());
        }
        if self.bytes_up + self.bytes_down > 0 {
            for (direction, bytes) in [("up", self.bytes_up), ("down", self.bytes_down)] {
                let labels = crate::metrics::BytesLabels {
                    direction,
                    category: labels.category.clone(),
                    branch: labels.branch.clone(),
                };
                metrics.bytes.get_or_create(&labels).inc_by(bytes);
            }
        }
    }

    pub fn emit(&self) {
        tracing::info!(
            target: TARGET,
            conn_id = self.conn_id,
            client = self.client.map(tracing::field::display),
            branch = self.branch.as_deref(),
            host = self.host.as_deref(),
            port = self.port,
            resolved = self.resolved.map(tracing::field::display),
            verdict = self.verdict,
            rule = self.rule.as_deref(),
            category = self.category.as_deref(),
            sni = self.sni.as_deref(),
            reason = self.reason.as_str(),
            status = self.status,
            bytes_up = self.bytes_up,
            bytes_down = self.bytes_down,
            connect_ms = self.connect_time.map(|d| d.as_millis() as u64),
            duration_ms = self.duration.as_millis() as u64,
            end = self.end,
            "request"
        );
    }
}

/// Installs the process-wide subscriber: stdout, text or one JSON object per line, level from
/// `RUST_LOG` (default info).
pub fn init(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    let result = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.with_ansi(false).try_init(),
    };
    // Already installed (a second call in the same process) is fine.
    drop(result);
}
