//! `portcullis`: the gateway binary. Thin: parses the command line and hands it to the
//! library (`commands` says what each command does and its exit codes).

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    if cfg!(not(target_os = "linux")) {
        // It builds elsewhere (the library is the agent's too), but only Linux is tested.
        eprintln!("portcullis: the gateway runs on Linux; on Windows, run portcullis-agent");
        return ExitCode::from(portcullis::commands::EXIT_CONFIG);
    }
    portcullis::commands::run(portcullis::commands::args::Cli::parse())
}
