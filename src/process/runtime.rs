//! Running a command: a multi-threaded runtime whose errors become exit codes, and generated
//! output written to stdout without a panic on a closed pipe.

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
