//! The canonical log line: exactly one event per client connection, whatever the outcome, with
//! fixed field names (an API: dashboards and tests read them; docs/reference/observability.md
//! documents them, and a test holds the two to the same set). The
//! gateway and the branch agent write the same record, each at its own target.

use crate::end::End;
use std::net::SocketAddr;
use std::time::Duration;

/// tracing target of the canonical line, so it can be filtered (`RUST_LOG=portcullis::access=info`).
pub const TARGET: &str = "portcullis::access";
/// tracing target of the audit line per operator action (admin listener changes).
pub const AUDIT_TARGET: &str = "portcullis::audit";
/// tracing target of the branch agent's line per forwarded request.
pub const AGENT_TARGET: &str = "portcullis::agent";

/// One line, at a target given as a constant (tracing needs it at compile time).
macro_rules! access_line {
    ($target:expr, $r:expr) => {
        tracing::info!(
            target: $target,
            conn_id = $r.conn_id,
            client = $r.client.map(tracing::field::display),
            branch = $r.branch.as_deref(),
            user = $r.user.as_deref(),
            host = $r.host.as_deref(),
            port = $r.port,
            gateway = $r.gateway.as_deref(),
            resolved = $r.resolved.map(tracing::field::display),
            egress = $r.way_out.as_ref().map(|w| w.egress.as_str()),
            parent = $r.way_out.as_ref().and_then(|w| w.parent.as_deref()),
            local_address = $r
                .way_out
                .as_ref()
                .and_then(|w| w.local_address)
                .map(tracing::field::display),
            verdict = $r.verdict,
            rule = $r.rule.as_deref(),
            category = $r.category.as_deref(),
            sni = $r.sni.as_deref(),
            new_destination = $r.new_destination.then_some(true),
            reason = $r.reason.as_str(),
            status = $r.status,
            bytes_up = $r.bytes_up,
            bytes_down = $r.bytes_down,
            connect_ms = $r.connect_time.map(|d| d.as_millis() as u64),
            duration_ms = $r.duration.as_millis() as u64,
            end = $r.end.as_str(),
            "request"
        )
    };
}

/// The way out of a request through an egress.
#[derive(Debug, Default)]
pub struct WayOut {
    /// The `[egress.NAME]`.
    pub egress: String,
    /// The parent proxy that carried it (or was last tried).
    pub parent: Option<String>,
    /// The gateway's own address of the upstream connection.
    pub local_address: Option<SocketAddr>,
    /// Bytes a parent proxy sent after its 200 head, until they go to the client.
    pub early: Option<Box<[u8]>>,
}

/// Everything known about one request; filled in step by step, emitted once.
#[derive(Debug, Default)]
pub struct AccessRecord {
    pub conn_id: u64,
    pub client: Option<SocketAddr>,
    /// The branch the client was identified as ("unassigned" when admitted without one).
    pub branch: Option<String>,
    /// The proxy user the client presented (identified by it, or refused for it).
    pub user: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    /// The gateway that carried the request (branch agent only).
    pub gateway: Option<String>,
    /// The upstream address connected to (or last tried).
    pub resolved: Option<SocketAddr>,
    /// Which way the request left (only with egresses configured; boxed, so a record without
    /// one stays as small as before).
    pub way_out: Option<Box<WayOut>>,
    pub verdict: Option<&'static str>,
    pub rule: Option<String>,
    /// The server name in the tunnel's TLS ClientHello, when it was checked (the second
    /// ClientHello's, after a HelloRetryRequest, when it names another server).
    pub sni: Option<String>,
    pub category: Option<String>,
    /// The branch's first tunnel to this name under a rule that learns.
    pub new_destination: bool,
    pub reason: String,
    /// The status sent to the client; 0 when none was (the client went away first).
    pub status: u16,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Of `bytes_up` and `bytes_down`, what the tunnel already counted in the metrics.
    pub metered_up: u64,
    pub metered_down: u64,
    pub connect_time: Option<Duration>,
    /// Name resolution time (not logged; a metric).
    pub resolve_time: Option<Duration>,
    pub duration: Duration,
    /// How the connection ended.
    pub end: End,
}

impl AccessRecord {
    /// The whole line of a connection that ended before any request was read (PROXY header,
    /// TLS handshake, a limit): who, how, why, when, and the status sent (0 if none).
    pub fn before_request(
        conn_id: u64,
        client: SocketAddr,
        end: End,
        reason: String,
        status: u16,
        duration: Duration,
    ) -> Self {
        Self {
            conn_id,
            client: Some(client),
            reason,
            end,
            status,
            duration,
            ..Self::default()
        }
    }

    /// Writes the canonical line and counts the request in the metrics.
    pub fn finish(&self, metrics: &crate::metrics::Metrics) {
        self.emit();
        let category = self.category.clone().unwrap_or_else(|| "none".into());
        let branch = self.branch.clone().unwrap_or_else(|| "none".into());
        let verdict = self.verdict.unwrap_or("none");
        let labels = crate::metrics::RequestLabels {
            verdict,
            end: self.end.as_str(),
            category,
            branch,
        };
        metrics.requests.get_or_create(&labels).inc();
        if let Some(t) = self.connect_time {
            let outcome = match self.end {
                End::ConnectFailed => "failed",
                End::ConnectTimeout => "timeout",
                _ => "ok",
            };
            let histogram = metrics
                .dial_duration
                .get_or_create(&crate::metrics::OutcomeLabels { outcome });
            histogram.observe(t.as_secs_f64());
        }
        if let Some(t) = self.resolve_time {
            let outcome = match self.end {
                End::DnsFailed => "failed",
                End::DnsTimeout => "timeout",
                _ => "ok",
            };
            let histogram = metrics
                .dns_duration
                .get_or_create(&crate::metrics::OutcomeLabels { outcome });
            histogram.observe(t.as_secs_f64());
        }
        // A tunnel counted its relayed bytes as they flowed; what is left (a request's, the
        // bytes sent before the relay) is counted now.
        let (up, down) = (
            self.bytes_up.saturating_sub(self.metered_up),
            self.bytes_down.saturating_sub(self.metered_down),
        );
        if up + down > 0 {
            let bytes = metrics.tunnel_bytes(&labels.category, &labels.branch);
            bytes.up.inc_by(up);
            bytes.down.inc_by(down);
        }
    }

    /// Writes the gateway's canonical line.
    pub fn emit(&self) {
        access_line!(TARGET, self);
    }

    /// Writes the branch agent's line for one forwarded request (same fields; `gateway` says
    /// which gateway carried it).
    pub fn emit_agent(&self) {
        access_line!(AGENT_TARGET, self);
    }
}

/// The fields of a JSON access line with every field known (`gateway` is the agent's), besides
/// `level`, `target` and `message`: what the reference documents, read from a line this
/// module writes.
pub fn line_fields() -> Vec<String> {
    use std::sync::{Arc, Mutex};
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let shared = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_writer(move || SharedBuffer(shared.clone()))
        .finish();
    let full = AccessRecord {
        client: Some(SocketAddr::from(([127, 0, 0, 1], 1))),
        branch: Some("b".into()),
        user: Some("u".into()),
        host: Some("h".into()),
        port: Some(443),
        gateway: Some("g".into()),
        resolved: Some(SocketAddr::from(([127, 0, 0, 1], 443))),
        way_out: Some(Box::new(WayOut {
            egress: "e".into(),
            parent: Some("p".into()),
            local_address: Some(SocketAddr::from(([127, 0, 0, 1], 2))),
            early: None,
        })),
        verdict: Some("allow"),
        rule: Some("r".into()),
        sni: Some("h".into()),
        category: Some("c".into()),
        new_destination: true,
        connect_time: Some(Duration::ZERO),
        ..AccessRecord::default()
    };
    tracing::subscriber::with_default(subscriber, || full.emit());
    let line = buffer.lock().map(|b| b.clone()).unwrap_or_default();
    let fields: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&line).unwrap_or_default();
    fields
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| !matches!(k.as_str(), "level" | "target" | "message"))
        .collect()
}

/// A writer into a buffer shared with its reader.
struct SharedBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for SharedBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut buffer) = self.0.lock() {
            buffer.extend_from_slice(bytes);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the gateway does while its access file cannot be written (a full or failing disk):
/// the audit trail's promise, like auditd's `disk_full_action`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnWriteFailure {
    /// Serve on; lost lines are counted and reported.
    #[default]
    KeepServing,
    /// Refuse new connections (`503`) until a line can be written again.
    FailClosed,
}

impl OnWriteFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OnWriteFailure::KeepServing => "keep-serving",
            OnWriteFailure::FailClosed => "fail-closed",
        }
    }
}

/// Set while the last access line could not be written; cleared by the next that is.
static FAILING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the access file is failing now (its last line was lost).
pub fn failing() -> bool {
    FAILING.load(std::sync::atomic::Ordering::Relaxed)
}

/// How often, at most, a failing access file is reported on stderr (the journal).
const FAILURE_REPORT_INTERVAL: Duration = Duration::from_secs(60);

/// How log lines are written: human-readable text, or one JSON object per line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The access log's own file (`log.access_file`): access lines go there instead of stdout,
/// and `reopen` (SIGUSR1, after logrotate moved the file) starts a new one at the same path.
#[derive(Clone)]
pub struct AccessFile {
    path: std::path::PathBuf,
    file: std::sync::Arc<std::sync::Mutex<Sink>>,
}

/// The open file, and what its failures so far were.
struct Sink {
    file: std::fs::File,
    path: std::path::PathBuf,
    /// Lines lost since the last one written, and when that was last reported.
    lost: u64,
    reported: Option<std::time::Instant>,
}

impl Sink {
    fn new(file: std::fs::File, path: &std::path::Path) -> Self {
        Self {
            file,
            path: path.to_owned(),
            lost: 0,
            reported: None,
        }
    }

    /// Writes `line` whole or not at all: a write the disk cut short is taken back, so the
    /// next line never glues onto half a record. Failures are counted and reported.
    fn write_line(&mut self, line: &[u8]) {
        use std::sync::atomic::Ordering::Relaxed;
        let path = &self.path;
        match write_whole(&mut self.file, line) {
            Ok(()) => {
                if self.lost > 0 {
                    eprintln!(
                        "portcullis: access log {}: writable again; {} lines were lost",
                        path.display(),
                        self.lost
                    );
                    self.lost = 0;
                    self.reported = None;
                    // Set only while lines are lost (`lost > 0`): cleared here, not per line.
                    FAILING.store(false, Relaxed);
                }
            }
            Err(e) => {
                FAILING.store(true, Relaxed);
                crate::metrics::ACCESS_LOG_LINES_DROPPED.inc();
                self.lost += 1;
                let due = self
                    .reported
                    .is_none_or(|at| at.elapsed() >= FAILURE_REPORT_INTERVAL);
                if due {
                    eprintln!(
                        "portcullis: access log {}: cannot write ({e}); {} lines lost so far",
                        path.display(),
                        self.lost
                    );
                    self.reported = Some(std::time::Instant::now());
                }
            }
        }
    }
}

/// `line` appended whole, or an error with the file as it was: what a short write left is cut
/// off again (the file is opened for appending, so it is the file's tail).
fn write_whole(file: &mut std::fs::File, line: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut done = 0;
    while done < line.len() {
        match file.write(&line[done..]) {
            Ok(0) => return Err(take_back(file, done, std::io::ErrorKind::WriteZero.into())),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(take_back(file, done, e)),
        }
    }
    Ok(())
}

/// Cuts the `written` bytes of a torn line off the file's end; returns `error`.
fn take_back(file: &mut std::fs::File, written: usize, error: std::io::Error) -> std::io::Error {
    if written > 0
        && let Ok(meta) = file.metadata()
    {
        let _ = file.set_len(meta.len().saturating_sub(written as u64));
    }
    error
}

impl AccessFile {
    /// Opens `path` for appending (created 0640 if missing, on Unix).
    pub fn open(path: &std::path::Path) -> std::io::Result<Self> {
        Ok(Self {
            path: path.to_owned(),
            file: std::sync::Arc::new(std::sync::Mutex::new(Sink::new(Self::append(path)?, path))),
        })
    }

    fn append(path: &std::path::Path) -> std::io::Result<std::fs::File> {
        let mut options = std::fs::OpenOptions::new();
        options.create(true).append(true);
        // Elsewhere the folder's access control list decides who reads it.
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o640);
        options.open(path)
    }

    /// Starts writing to a file at the path again (the old one was moved away); on failure the
    /// current file stays in use.
    pub fn reopen(&self) -> std::io::Result<()> {
        let fresh = Self::append(&self.path)?;
        self.file.lock().unwrap_or_else(|e| e.into_inner()).file = fresh;
        Ok(())
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

/// One formatted line at a time into the access file: the formatter hands each line over
/// whole, and it is written whole or counted as lost (never an error back to the formatter).
struct AccessFileWriter(std::sync::Arc<std::sync::Mutex<Sink>>);

impl std::io::Write for AccessFileWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.write_all(bytes)?;
        Ok(bytes.len())
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_line(bytes);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the process-wide subscriber: stdout, text or one JSON object per line, level from
/// `RUST_LOG` (default info). Access lines are written whatever the level says; with
/// `access_file` they go to that file (same format) instead of stdout.
pub fn init(format: LogFormat) {
    init_with(format, None);
}

/// `RUST_LOG` (default info), with the access lines always in.
fn level_filter() -> tracing_subscriber::filter::EnvFilter {
    use tracing_subscriber::filter::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // The access lines are the audit trail, not diagnostics: no level setting removes them.
    [TARGET, AGENT_TARGET, AUDIT_TARGET]
        .into_iter()
        .filter_map(|target| format!("{target}=info").parse().ok())
        .fold(filter, |filter, directive| filter.add_directive(directive))
}

/// `init`, every line to `writer` instead of stdout (the Windows service's log file).
pub fn init_to<W>(format: LogFormat, writer: W)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::prelude::*;
    let _ = tracing_subscriber::registry()
        .with(layer(format, writer).with_filter(level_filter()))
        .try_init();
}

/// `init`, with the access lines in `access_file` when given.
pub fn init_with(format: LogFormat, access_file: Option<&AccessFile>) {
    use tracing_subscriber::filter::{Targets, filter_fn};
    use tracing_subscriber::prelude::*;
    let filter = level_filter();
    let to_file = access_file.is_some();
    let not_moved = filter_fn(move |meta| {
        !(to_file && (meta.target() == TARGET || meta.target() == AUDIT_TARGET))
    });
    let stdout = layer(format, std::io::stdout)
        .with_filter(filter)
        .with_filter(not_moved);
    let file = access_file.map(|file| {
        let shared = file.file.clone();
        layer(format, move || AccessFileWriter(shared.clone())).with_filter(
            Targets::new()
                .with_target(TARGET, tracing::Level::INFO)
                .with_target(AUDIT_TARGET, tracing::Level::INFO),
        )
    });
    // Already installed (a second call in the same process) is fine.
    let _ = tracing_subscriber::registry()
        .with(stdout)
        .with(file)
        .try_init();
}

/// A formatting layer writing to `writer`, as `format` says.
fn layer<S, W>(format: LogFormat, writer: W) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::Layer;
    match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(writer)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(writer)
            .boxed(),
    }
}
