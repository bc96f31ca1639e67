//! What both binaries (`portcullis`, `portcullis-agent`) do around their work: run it on a
//! multi-threaded runtime with errors turned into exit codes, wait for the stop signal, and
//! ask a local endpoint over HTTP, print generated output.

use std::future::Future;
use std::process::ExitCode;

/// Runs `body` on a new multi-threaded runtime; an error is printed as `program: error` and
/// exits 1, like a runtime that cannot start.
pub fn run<F, Fut>(program: &str, body: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = anyhow::Result<ExitCode>>,
{
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{program}: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(body()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{program}: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Descriptors kept back from client connections: listeners, the admin listener, DNS sockets,
/// log and config files, and the pipes of spliced tunnels moving bytes now (two descriptors
/// per busy direction, a few spare per worker thread).
pub const RESERVED_DESCRIPTORS: u64 = 512;

/// Used when the descriptor limit cannot be read (not Linux).
const FALLBACK_CONNECTIONS: usize = 4096;

/// The soft limit on open descriptors (`RLIMIT_NOFILE`); `None` where unknown or unlimited.
pub fn descriptor_limit() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{Resource, getrlimit};
        getrlimit(Resource::Nofile).current
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Raises the soft descriptor limit to the hard one (what systemd's `LimitNOFILE=` or
/// `--ulimit nofile=` granted): thousands of idle sync tunnels need two descriptors each, and
/// the soft default (1,024 on many systems) would cap them long before memory does. Returns
/// the soft limit before and after.
pub fn raise_descriptor_limit() -> Option<(u64, u64)> {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let limit = getrlimit(Resource::Nofile);
        let before = limit.current?;
        // "Unlimited" is not a value the kernel takes for descriptors: stop at fs.nr_open.
        let hard = limit.maximum.unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/fs/nr_open")
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(before)
        });
        if hard > before {
            let raised = Rlimit {
                current: Some(hard),
                maximum: limit.maximum,
            };
            if setrlimit(Resource::Nofile, raised).is_ok() {
                return Some((before, hard));
            }
        }
        Some((before, before))
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Client connections the descriptor limit holds: two per tunnel (client and upstream) after
/// [`RESERVED_DESCRIPTORS`], at least 16.
pub fn connections_for_descriptors() -> usize {
    descriptor_limit().map_or(FALLBACK_CONNECTIONS, connections_for)
}

/// Client connections `limit` descriptors hold.
pub fn connections_for(limit: u64) -> usize {
    (limit.saturating_sub(RESERVED_DESCRIPTORS) / 2).clamp(16, 1 << 24) as usize
}

/// The hard descriptor limit, which `serve` raises its soft limit to; `None` where unknown or
/// unlimited.
pub fn hard_descriptor_limit() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// One request with an empty body to a local admin or status endpoint, blocking, 5 s for each
/// step: the whole reply, at most `limit` bytes.
fn exchange(
    addr: std::net::SocketAddr,
    method: &str,
    target: &str,
    limit: u64,
) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(5);
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    tcp.set_read_timeout(Some(timeout))?;
    tcp.set_write_timeout(Some(timeout))?;
    write!(
        tcp,
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = Vec::new();
    tcp.take(limit).read_to_end(&mut reply)?;
    Ok(reply)
}

/// `GET path`: the whole reply (at most 64 KiB) as text. For the command-line probes
/// (`health`, `status`).
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    let reply = exchange(addr, "GET", path, 64 * 1024)?;
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

/// One request with an empty body (the `learned` commands): the status and the body (at most
/// 1 MiB).
pub fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    target: &str,
) -> std::io::Result<(u16, String)> {
    let reply = exchange(addr, method, target, 1 << 20)?;
    let reply = String::from_utf8_lossy(&reply);
    let malformed = || std::io::Error::other("malformed HTTP reply");
    let (head, body) = reply.split_once("\r\n\r\n").ok_or_else(malformed)?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(malformed)?;
    Ok((status, body.to_owned()))
}

/// The stop request: SIGTERM (systemd, container runtimes) or Ctrl-C. On Windows: Ctrl-C,
/// Ctrl-Break, the console closing or the system shutting down; a Windows service adds the
/// service control manager's stop and shutdown (`agent::service`) to the same drain.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(windows)]
    {
        use tokio::signal::windows;
        let events = (
            windows::ctrl_break(),
            windows::ctrl_close(),
            windows::ctrl_shutdown(),
        );
        match events {
            (Ok(mut brk), Ok(mut close), Ok(mut shutdown)) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = brk.recv() => {}
                    _ = close.recv() => {}
                    _ = shutdown.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// What the process tells its service manager.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceState {
    /// Listening: the service has started.
    Ready,
    /// Re-reading the configuration (the gateway's SIGHUP).
    Reloading,
    /// Draining before the exit.
    Stopping,
}

/// The Windows service's status reporter, set once by `agent::service` before it runs.
#[cfg(windows)]
static SERVICE_HOOK: std::sync::OnceLock<Box<dyn Fn(ServiceState) + Send + Sync>> =
    std::sync::OnceLock::new();

/// Makes `notify` report to `hook` (the Windows service control manager); a second call is
/// ignored.
#[cfg(windows)]
pub fn set_service_hook(hook: Box<dyn Fn(ServiceState) + Send + Sync>) {
    let _ = SERVICE_HOOK.set(hook);
}

/// Tells the service manager about `state`: systemd (`Type=notify` units) on Linux, the service
/// control manager when running as a Windows service; nothing otherwise.
pub fn notify(state: ServiceState) {
    #[cfg(target_os = "linux")]
    {
        use sd_notify::NotifyState;
        let _ = match state {
            ServiceState::Ready => sd_notify::notify(&[NotifyState::Ready]),
            ServiceState::Stopping => sd_notify::notify(&[NotifyState::Stopping]),
            ServiceState::Reloading => match NotifyState::monotonic_usec_now() {
                Ok(now) => sd_notify::notify(&[NotifyState::Reloading, now]),
                Err(e) => Err(e),
            },
        };
    }
    #[cfg(windows)]
    if let Some(hook) = SERVICE_HOOK.get() {
        hook(state);
    }
    #[cfg(not(any(target_os = "linux", windows)))]
    let _ = state;
}

/// Writes `bytes` (a completion script, a man page, generated TOML) to stdout; a closed pipe is
/// exit 1 with a message, not a panic.
pub fn print_stdout(program: &str, bytes: &[u8]) -> ExitCode {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: cannot write to stdout: {e}");
            ExitCode::from(1)
        }
    }
}
