//! `portcullis`: the gateway binary. Thin: parses the command line, loads config, hands over to
//! the library. Exit codes: 0 ok, 1 refused (explain) or runtime failure (a port that cannot be
//! bound), 2 usage (clap), 64 bad config: in the file, or found only when starting (a TLS
//! certificate or key that cannot be used), so `RestartPreventExitStatus=64` ends a restart loop;
//! 64 too for a log file `learn` cannot read.

use clap::{CommandFactory, Parser, Subcommand};
use portcullis::access_log::AccessFile;
use portcullis::config::{Config, LogFormat};
use portcullis::gateway::Gateway;
use portcullis::policy::host::Target;
use portcullis::server::Server;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// sysexits EX_USAGE / EX_CONFIG-style code for a bad config or argument.
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "Egress gateway for hybrid file sync: an allow-listing CONNECT proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (built-in azure-file-sync policy when no --config is given).
    Serve {
        /// The config file (TOML); without it, the built-in gateway (README: Configuration
        /// reference). SIGHUP re-reads it.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Overrides `log.format` from the config.
        #[arg(long, value_name = "json|text")]
        log_format: Option<LogFormatArg>,
    },
    /// Validate a config file and print the whole effective configuration (defaults included);
    /// warn about parts that can never take effect; exit 64 listing every problem.
    CheckConfig {
        /// The config file to check (TOML), with the TLS files it names.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Print an argon2id hash for a branch credential's `password_hash`. Reads the password
    /// from a prompt (no echo) on a terminal, else the first line of standard input.
    HashPassword,
    /// Ask a running gateway's admin listener for /healthz (container HEALTHCHECK); exit 0 if
    /// it answers 200 within 5 s.
    Health {
        /// The gateway's admin listener (`listen.admin`).
        #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:9464")]
        admin: std::net::SocketAddr,
        /// The path to ask for (`/readyz` answers 200 only while the gateway accepts clients).
        #[arg(long, value_name = "PATH", default_value = "/healthz")]
        path: String,
    },
    /// Print the bandwidth limits in force at a moment and a week table of schedule windows;
    /// `schedule import-afs FILE` turns Azure File Sync network limits into [[schedule]] TOML.
    #[command(args_conflicts_with_subcommands = true)]
    Schedule {
        #[command(subcommand)]
        action: Option<ScheduleAction>,
        /// The config file whose [[schedule]] tables are shown; without it, the built-in
        /// gateway (no schedules).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The moment to check: local time ("2026-11-23T09:30"), RFC 3339 with an offset, or
        /// with a zone ("2026-11-23T09:30[Europe/London]"). Default: now.
        #[arg(long, value_name = "TIME")]
        at: Option<String>,
        /// Show only what applies to this branch.
        #[arg(long, value_name = "NAME")]
        branch: Option<String>,
    },
    /// Print the decision the gateway would take for CONNECT HOST:PORT, or for a plain-HTTP
    /// request to http://HOST[:PORT]/PATH (the lane for revocation lists and OCSP).
    Explain {
        /// The config file to decide by; without it, the built-in gateway.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The client's address: checked against `listen.clients` and the branches' sources.
        #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
        from: IpAddr,
        /// What the client asks for: a CONNECT target, or a plain-HTTP URL (port 80 unless
        /// given).
        #[arg(value_name = "HOST:PORT|http://HOST[:PORT]/PATH")]
        target: String,
    },
    /// The destinations each branch used under rules with `learn`: list them, approve one,
    /// forget one. On a running gateway through its admin listener (in force at once), else
    /// on the state file in `state_dir`.
    Learned {
        #[command(subcommand)]
        action: LearnedAction,
        /// The gateway's config file: its `state_dir`, rules and admin listener. Without it,
        /// the built-in gateway's.
        #[arg(long, value_name = "FILE", global = true)]
        config: Option<PathBuf>,
        /// Ask this admin listener, whether or not the state file's lock is free.
        #[arg(long, value_name = "IP:PORT", global = true)]
        admin: Option<std::net::SocketAddr>,
    },
    /// Read the gateway's JSON access logs and print, per branch and rule, the destinations its
    /// tunnels reached, then a TOML proposal: the names wildcards matched as pinned
    /// [[policy.allow]] rules and an allow line per branch (sync-service wildcards stay).
    Learn {
        /// Access log files written with `log.format = "json"` (`log.access_file`, or saved
        /// stdout); lines that are not access lines are skipped.
        #[arg(long = "from-log", value_name = "FILE", required = true, num_args = 1..)]
        from_log: Vec<PathBuf>,
        /// The config the gateway ran with, whose rules the proposal narrows; without it, the
        /// built-in gateway.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Print a shell completion script to stdout.
    Completions(portcullis::cli::manual::CompletionsArgs),
    /// Print the man page (roff) to stdout: `portcullis man > /usr/local/share/man/man1/portcullis.1`.
    Man,
}

#[derive(Subcommand)]
enum LearnedAction {
    /// Print the learned destinations: branch, rule, host:port, tunnels, first and last seen.
    List {
        /// Only this branch's.
        #[arg(long, value_name = "NAME")]
        branch: Option<String>,
        /// Print the state file's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Learn HOST[:PORT] (443 by default) for a branch, as if it had used it.
    Approve(LearnedTarget),
    /// Forget HOST (every port) or HOST:PORT for a branch (under every rule, or --rule).
    Forget(LearnedTarget),
}

/// What `learned approve` and `learned forget` act on.
#[derive(clap::Args)]
struct LearnedTarget {
    /// The branch (a configured name, or `unassigned`).
    #[arg(long, value_name = "NAME")]
    branch: String,
    /// Only under this rule (approve: default the rule the policy picks for the branch).
    #[arg(long, value_name = "RULE")]
    rule: Option<String>,
    /// The destination: a host name under a learning rule's wildcard, and its port (forget
    /// without a port: every port).
    #[arg(value_name = "HOST[:PORT]")]
    host: String,
}

#[derive(Subcommand)]
enum ScheduleAction {
    /// Convert `Get-StorageSyncNetworkLimit | Format-List` output to [[schedule]] TOML.
    ImportAfs {
        /// The cmdlet's output saved to a file: UTF-16 (Windows PowerShell's `>`) or UTF-8.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Json,
    Text,
}

fn main() -> ExitCode {
    if cfg!(not(target_os = "linux")) {
        // It builds elsewhere (the library is the agent's too), but only Linux is tested.
        eprintln!("portcullis: the gateway runs on Linux; on Windows, run portcullis-agent");
        return ExitCode::from(EXIT_CONFIG);
    }
    let cli = Cli::parse();
    match cli.command {
        Command::HashPassword => hash_password(),
        Command::Schedule {
            action: Some(ScheduleAction::ImportAfs { file }),
            ..
        } => import_afs(&file),
        Command::Schedule {
            action: None,
            config,
            at,
            branch,
        } => schedule(config.as_deref(), at.as_deref(), branch.as_deref()),
        Command::Health { admin, path } => health(admin, &path),
        Command::Learned {
            action,
            config,
            admin,
        } => learned(config.as_deref(), admin, &action),
        Command::Learn { from_log, config } => learn(&from_log, config.as_deref()),
        Command::CheckConfig { file } => {
            use portcullis::cli::check_config;
            match check_config::check(&file, jiff::Timestamp::now()) {
                Ok(config) => {
                    println!("{}: ok", file.display());
                    print!("{}", check_config::report(&config));
                    for warning in &config.warnings {
                        eprintln!("portcullis: warning: {warning}");
                    }
                    ExitCode::SUCCESS
                }
                Err(problems) => {
                    eprintln!("portcullis: invalid configuration:\n{problems}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
        Command::Completions(args) => portcullis::process::print_stdout(
            "portcullis",
            &portcullis::cli::manual::completions(Cli::command(), args.shell),
        ),
        Command::Man => portcullis::process::print_stdout(
            "portcullis",
            &portcullis::cli::manual::man_page(Cli::command()),
        ),
        Command::Explain {
            config: config_path,
            from,
            target,
        } => {
            let config = match load(config_path.as_deref()) {
                Ok(c) => c,
                Err(e) => return config_failure(&e),
            };
            let (authority, lane) = explain_target(&target);
            let target = match Target::parse_authority(&authority) {
                Ok(t) => t,
                Err(why) => {
                    eprintln!("portcullis: {target:?}: {why}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let source = config_name(config_path.as_deref());
            portcullis::process::run("portcullis", || async move {
                let gateway = match Gateway::new(config) {
                    Ok(gateway) => gateway,
                    Err(e) => return Ok(start_failure(&source, &e)),
                };
                let (report, allowed) =
                    portcullis::cli::explain::explain(&gateway, from, &target, lane).await;
                print!("{report}");
                Ok(if allowed {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                })
            })
        }
        Command::Serve { config, log_format } => {
            let config_path_for_reload = config.clone();
            let config = match load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => return config_failure(&e),
            };
            let format = match log_format {
                Some(LogFormatArg::Json) => LogFormat::Json,
                Some(LogFormatArg::Text) => LogFormat::Text,
                None => config.log.format,
            };
            let access_file = match config.log.access_file.as_deref().map(AccessFile::open) {
                None => None,
                Some(Ok(file)) => Some(file),
                Some(Err(e)) => {
                    let path = config.log.access_file.clone().unwrap_or_default();
                    eprintln!(
                        "portcullis: log.access_file {}: cannot open: {e}",
                        path.display()
                    );
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            portcullis::access_log::init_with(format, access_file.as_ref());
            for warning in &config.warnings {
                tracing::warn!("{warning}");
            }
            let config_path = config_path_for_reload;
            let source = config_name(config_path.as_deref());
            portcullis::process::run("portcullis", || async move {
                let gateway = match Gateway::new(config) {
                    Ok(gateway) => gateway,
                    Err(e) => return Ok(start_failure(&source, &e)),
                };
                let server = Server::bind(gateway, config_path).await?;
                tokio::spawn(reload_on_sighup(server.reloader()));
                tokio::spawn(reopen_on_sigusr1(access_file));
                server.run(portcullis::process::shutdown_signal()).await;
                tracing::info!("exiting");
                Ok(ExitCode::SUCCESS)
            })
        }
    }
}

fn import_afs(file: &std::path::Path) -> ExitCode {
    use portcullis::cli::afs_import;
    let name = file.display().to_string();
    let toml = std::fs::read(file)
        .map_err(|e| format!("{name}: cannot read: {e}"))
        .and_then(|bytes| afs_import::decode(&bytes, &name))
        .and_then(|text| afs_import::import(&text, &name));
    match toml {
        Ok(toml) => portcullis::process::print_stdout("portcullis", toml.as_bytes()),
        Err(e) => {
            eprintln!("portcullis: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn learn(files: &[PathBuf], config: Option<&std::path::Path>) -> ExitCode {
    use portcullis::cli::learn_from_log::{Learned, report};
    let config = match load(config) {
        Ok(c) => c,
        Err(e) => return config_failure(&e),
    };
    let mut learned = Learned::default();
    for file in files {
        match learned.read_file(file) {
            Ok(summary) => {
                let name = file.display();
                if summary.skipped > 0 {
                    eprintln!(
                        "portcullis: {name}: skipped {} lines that are not access lines",
                        summary.skipped
                    );
                }
                if summary.access_lines == 0 {
                    eprintln!(
                        "portcullis: {name}: no JSON access lines (is the gateway's log.format \"json\"?)"
                    );
                }
            }
            Err(e) => {
                eprintln!("portcullis: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    portcullis::process::print_stdout("portcullis", report(&learned, &config).as_bytes())
}

fn schedule(config: Option<&std::path::Path>, at: Option<&str>, branch: Option<&str>) -> ExitCode {
    use jiff::tz::TimeZone;
    let config = match load(config) {
        Ok(c) => c,
        Err(e) => return config_failure(&e),
    };
    if let Some(b) = branch
        && b != portcullis::config::UNASSIGNED
        && !config.branches.iter().any(|known| known.name == b)
    {
        eprintln!("portcullis: --branch {b:?}: no such [[branch]] in the configuration");
        return ExitCode::from(EXIT_CONFIG);
    }
    let host = TimeZone::system();
    let moment = match at {
        None => Ok((jiff::Timestamp::now(), host)),
        Some(text) => parse_moment(text, host),
    };
    match moment {
        Ok((at, zone)) => {
            print!(
                "{}",
                portcullis::cli::schedule_table::report(&config, at, &zone, branch)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("portcullis: --at {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// A moment and the zone to show it in: zoned, RFC 3339, or civil time in `host`'s zone.
fn parse_moment(
    text: &str,
    host: jiff::tz::TimeZone,
) -> Result<(jiff::Timestamp, jiff::tz::TimeZone), String> {
    if let Ok(zoned) = text.parse::<jiff::Zoned>() {
        return Ok((zoned.timestamp(), zoned.time_zone().clone()));
    }
    if let Ok(ts) = text.parse::<jiff::Timestamp>() {
        return Ok((ts, host));
    }
    text.parse::<jiff::civil::DateTime>()
        .ok()
        .and_then(|dt| dt.to_zoned(host.clone()).ok())
        .map(|z| (z.timestamp(), host))
        .ok_or_else(|| {
            format!(
                "{text:?}: expected a time such as \"2026-11-23T09:30\" (local), \"2026-11-23T09:30Z\" or \"2026-11-23T09:30[Europe/London]\""
            )
        })
}

fn hash_password() -> ExitCode {
    use std::io::IsTerminal;
    let password = if std::io::stdin().is_terminal() {
        rpassword::prompt_password("password: ")
    } else {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map(|_| line.trim_end_matches(['\r', '\n']).to_owned())
    };
    match password {
        Ok(password) if !password.is_empty() => {
            match portcullis::config::password::hash_password(&password) {
                Ok(hash) => {
                    println!("{hash}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("portcullis: cannot hash: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Ok(_) => {
            eprintln!("portcullis: empty password");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("portcullis: cannot read the password: {e}");
            ExitCode::from(1)
        }
    }
}

fn health(admin: std::net::SocketAddr, path: &str) -> ExitCode {
    match portcullis::process::http_get(admin, path) {
        Ok(reply) if reply.starts_with("HTTP/1.1 200") => ExitCode::SUCCESS,
        Ok(reply) => {
            eprintln!(
                "portcullis: {}",
                reply.lines().next().unwrap_or("no answer")
            );
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("portcullis: {admin}: {e}");
            ExitCode::from(1)
        }
    }
}

fn learned(
    config_path: Option<&std::path::Path>,
    admin: Option<std::net::SocketAddr>,
    action: &LearnedAction,
) -> ExitCode {
    use portcullis::cli::learned::{Change, run};
    use portcullis::learned::ops::Edit;
    let config = match load(config_path) {
        Ok(config) => config,
        Err(e) => return config_failure(&e),
    };
    fn edit(edit: Edit, t: &LearnedTarget) -> Change<'_> {
        Change::Edit {
            edit,
            branch: &t.branch,
            host: &t.host,
            rule: t.rule.as_deref(),
        }
    }
    let change = match action {
        LearnedAction::List { branch, json } => Change::List {
            branch: branch.as_deref(),
            json: *json,
        },
        LearnedAction::Approve(t) => edit(Edit::Approve, t),
        LearnedAction::Forget(t) => edit(Edit::Forget, t),
    };
    match run(&config, admin, &change) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("portcullis: {e}");
            ExitCode::from(1)
        }
    }
}

fn load(path: Option<&std::path::Path>) -> Result<Config, portcullis::config::ConfigError> {
    match path {
        Some(path) => Config::load(path, jiff::Timestamp::now()),
        None => Ok(Config::builtin()),
    }
}

fn config_failure(e: &portcullis::config::ConfigError) -> ExitCode {
    eprintln!("portcullis: invalid configuration:\n{e}");
    ExitCode::from(EXIT_CONFIG)
}

/// A problem found only when the gateway is built from a valid file: a TLS certificate, key or
/// client CA that cannot be read or used, or an unreadable system DNS configuration. Exit 64 as
/// for a bad file: restarting will not fix it.
fn start_failure(source: &str, e: &str) -> ExitCode {
    eprintln!("portcullis: invalid configuration:\n{source}: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn config_name(path: Option<&std::path::Path>) -> String {
    path.map_or_else(|| "<built-in>".to_owned(), |p| p.display().to_string())
}

/// The gateway runs on Linux; elsewhere there is no SIGHUP (reload over `POST /reload`).
#[cfg(not(unix))]
async fn reload_on_sighup(_reloader: portcullis::reload::Reloader) {}

/// SIGHUP (`systemctl reload`): re-read the config file and the files it names; a bad file is
/// refused with its problems logged and the running configuration stays.
#[cfg(unix)]
async fn reload_on_sighup(reloader: portcullis::reload::Reloader) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        return;
    };
    while hangups.recv().await.is_some() {
        let _ = reloader.reload();
    }
}

/// No SIGUSR1 off Unix.
#[cfg(not(unix))]
async fn reopen_on_sigusr1(_access_file: Option<AccessFile>) {}

/// SIGUSR1 (logrotate's `postrotate`): start a new access log file at the configured path.
/// Never stops the gateway, with or without a file.
#[cfg(unix)]
async fn reopen_on_sigusr1(access_file: Option<AccessFile>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut signals) = signal(SignalKind::user_defined1()) else {
        return;
    };
    while signals.recv().await.is_some() {
        match &access_file {
            None => tracing::info!("SIGUSR1: no log.access_file to reopen"),
            Some(file) => match file.reopen() {
                Ok(()) => tracing::info!(file = %file.path().display(), "access log reopened"),
                Err(e) => {
                    tracing::warn!(file = %file.path().display(), error = %e, "cannot reopen the access log; writing on to the old file")
                }
            },
        }
    }
}

/// `host:port` as a CONNECT target; `http://host[:port]/path` as a lane request (port 80 when
/// none is given). Returns the authority and whether it is a lane request.
fn explain_target(text: &str) -> (String, bool) {
    let Some(rest) = text
        .get(..7)
        .filter(|s| s.eq_ignore_ascii_case("http://"))
        .map(|_| &text[7..])
    else {
        return (text.to_owned(), false);
    };
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    if authority.ends_with(']') || !authority.contains(':') {
        (format!("{authority}:80"), true)
    } else {
        (authority.to_owned(), true)
    }
}
