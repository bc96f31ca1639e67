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

/// `GET path` to a local admin or status endpoint, blocking, 5 s for each step: the whole
/// reply (at most 64 KiB) as text. For the command-line probes (`health`, `status`).
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(5);
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    tcp.set_read_timeout(Some(timeout))?;
    tcp.set_write_timeout(Some(timeout))?;
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    tcp.take(64 * 1024).read_to_string(&mut reply)?;
    Ok(reply)
}

/// SIGTERM (systemd, container runtimes) or Ctrl-C.
pub async fn shutdown_signal() {
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
