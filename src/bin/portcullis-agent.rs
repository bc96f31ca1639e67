//! `portcullis-agent`: the branch agent binary. Thin: parses the command line and the config
//! file, hands over to `portcullis::agent`. Exit codes: 0 ok (check: every endpoint passed),
//! 1 a check failed or a runtime failure, 2 usage or configuration errors.

use clap::{Args, CommandFactory, Parser, Subcommand};
use portcullis::access_log::LogFormat;
use portcullis::agent::check::Check;
use portcullis::agent::config::{self, ForwardOptions, Identity};
use portcullis::agent::endpoints::{self, Endpoint, Representatives};
use portcullis::agent::forward;
use portcullis::agent::proxy_client::{Proxy, ProxyUrl, Timeouts};
use portcullis::agent::{report, trust};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

const EXIT_FAILED: u8 = 1;
/// clap's own code for usage errors; configuration errors share it.
const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "portcullis-agent",
    version,
    about = "Branch agent for the Portcullis gateway: endpoint check and local forwarder"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check every endpoint of a profile (or --host) through the gateway, stage by stage.
    /// Exit 0 when all pass, 1 when any fails, 2 on usage errors.
    Check(CheckArgs),
    /// Run the local forwarder: a plain HTTP CONNECT proxy carrying tunnels to the gateways.
    Forward(ForwardArgs),
    /// Ask a running forwarder which gateway is in use (GET /status on its listener).
    Status {
        /// The forwarder's listener.
        #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:3128")]
        listen: SocketAddr,
        /// Print the JSON as received.
        #[arg(long)]
        json: bool,
    },
    /// The forwarder as a Windows service: install, uninstall, start, stop.
    #[cfg(windows)]
    Service {
        #[command(subcommand)]
        action: ServiceAction,
    },
    /// Print a shell completion script to stdout.
    Completions(portcullis::cli::manual::CompletionsArgs),
    /// Print the man page (roff) to stdout: `portcullis-agent man >
    /// /usr/local/share/man/man1/portcullis-agent.1`.
    Man,
}

#[cfg(windows)]
#[derive(Subcommand)]
enum ServiceAction {
    /// Register the service (automatic start, LocalSystem), running `forward --config FILE`.
    Install {
        /// The agent config file, e.g. C:\ProgramData\Portcullis\agent.toml; checked now.
        #[arg(long, value_name = "FILE")]
        config: std::path::PathBuf,
    },
    /// Stop the service if it runs and remove it.
    Uninstall,
    /// Start the service; returns once it listens.
    Start,
    /// Stop the service; returns once it has drained.
    Stop,
    /// What the service control manager runs (not for use by hand).
    #[command(hide = true)]
    Run {
        #[arg(long, value_name = "FILE")]
        config: std::path::PathBuf,
        /// Folder of the daily log files (default %ProgramData%\Portcullis\logs).
        #[arg(long, value_name = "DIR")]
        log_dir: Option<std::path::PathBuf>,
    },
}

#[derive(Args)]
struct CheckArgs {
    /// The gateway: http://HOST:PORT or https://HOST:PORT (default: the config's first gateway).
    #[arg(long, value_name = "URL", value_parser = parse_url)]
    proxy: Option<ProxyUrl>,
    #[command(flatten)]
    identity: Identity,
    /// Built-in profile whose endpoints are checked.
    #[arg(long, value_name = "NAME", default_value = "azure-file-sync")]
    profile: String,
    /// Check this host instead of the profile (repeatable); port 443 unless given.
    #[arg(long = "host", value_name = "NAME[:PORT]", value_parser = endpoints::parse_host)]
    hosts: Vec<(String, u16)>,
    /// Storage account standing in for the storage wildcard (NAME.file.core.windows.net).
    #[arg(long, value_name = "NAME", value_parser = endpoints::parse_label)]
    storage_account: Option<String>,
    /// Azure region standing in for the sync wildcard (NAME01.afs.azure.net).
    #[arg(long, value_name = "NAME", value_parser = endpoints::parse_label)]
    region: Option<String>,
    /// Also try each endpoint without the proxy; a reachable one fails the check (the edge
    /// firewall leaks).
    #[arg(long)]
    direct: bool,
    /// Diagnostic: for --direct, connect to ADDR for HOST:PORT instead of resolving HOST
    /// (like curl --resolve; repeatable).
    #[arg(long, value_name = "HOST:PORT:ADDR", value_parser = parse_resolve)]
    resolve: Vec<((String, u16), SocketAddr)>,
    /// Time allowed for each stage (connect, TLS, the proxy's reply).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = config::parse_duration)]
    timeout: Duration,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    /// Colour in the table.
    #[arg(long, value_enum, default_value = "auto")]
    color: Colour,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Colour {
    Auto,
    Always,
    Never,
}

#[derive(Args)]
struct ForwardArgs {
    #[command(flatten)]
    options: ForwardOptions,
    /// Format of the access and diagnostic lines on stdout.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormatArg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Json,
    Text,
}

fn parse_url(s: &str) -> Result<ProxyUrl, String> {
    s.parse()
}

fn parse_resolve(s: &str) -> Result<((String, u16), SocketAddr), String> {
    let mut parts = s.splitn(3, ':');
    let (Some(host), Some(port), Some(addr)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("{s:?}: expected HOST:PORT:ADDR"));
    };
    let (host, port) = endpoints::parse_host(&format!("{host}:{port}"))?;
    let ip: std::net::IpAddr = addr
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| format!("{addr:?}: expected an IP address"))?;
    Ok(((host, port), SocketAddr::new(ip, port)))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check(args) => check(args),
        Command::Forward(args) => forward(args),
        Command::Status { listen, json } => status(listen, json),
        #[cfg(windows)]
        Command::Service { action } => service(action),
        Command::Completions(args) => portcullis::process::print_stdout(
            "portcullis-agent",
            &portcullis::cli::manual::completions(Cli::command(), args.shell),
        ),
        Command::Man => portcullis::process::print_stdout(
            "portcullis-agent",
            &portcullis::cli::manual::man_page(Cli::command()),
        ),
    }
}

fn usage(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("portcullis-agent: {message}");
    ExitCode::from(EXIT_USAGE)
}

fn check(args: CheckArgs) -> ExitCode {
    let file = match args.identity.load_file() {
        Ok(f) => f,
        Err(e) => return usage(e),
    };
    let proxy_url = match (&args.proxy, file.gateways.first()) {
        (Some(url), _) => url.clone(),
        (None, Some(text)) => match text.parse() {
            Ok(url) => url,
            Err(e) => return usage(format!("gateways[0]: {e}")),
        },
        (None, None) => return usage("give the gateway with --proxy URL (or --config FILE)"),
    };
    let mut ca_files = args.identity.ca.clone();
    ca_files.extend(file.ca.clone());
    let tls = (|| -> Result<_, String> {
        let roots = trust::roots(true, &ca_files)?;
        let proxy_tls =
            trust::client_config(roots.clone(), args.identity.client_identity(&file), true)?;
        let origin_tls = trust::client_config(roots, None, false)?;
        Ok((proxy_tls, origin_tls))
    })();
    let (proxy_tls, origin_tls) = match tls {
        Ok(pair) => pair,
        Err(e) => return usage(e),
    };
    // Checked with the endpoints: an invalid certificate is a finding, not a usage error.
    let certificate = match args.identity.client_identity(&file) {
        Some((cert, _)) => match trust::ClientCertificate::load(cert) {
            Ok(certificate) => Some(certificate),
            Err(e) => return usage(e),
        },
        None => None,
    };
    let authorization = match args.identity.authorization(&file) {
        Ok(a) => a,
        Err(e) => return usage(e),
    };
    let timeouts = Timeouts {
        connect: args.timeout,
        tls: args.timeout,
        reply: args.timeout,
    };
    let proxy = match Proxy::new(proxy_url, proxy_tls, timeouts) {
        Ok(p) => p,
        Err(e) => return usage(e),
    };
    let endpoints: Vec<Endpoint> = if args.hosts.is_empty() {
        let Some(profile) = portcullis::policy::profiles::find(&args.profile) else {
            return usage(format!(
                "unknown profile {:?}; built in: {}",
                args.profile,
                portcullis::policy::profiles::names().join(", ")
            ));
        };
        let reps = Representatives {
            storage_account: args.storage_account.clone(),
            region: args.region.clone(),
        };
        endpoints::from_profile(profile, &reps)
    } else {
        args.hosts
            .iter()
            .map(|(host, port)| Endpoint {
                host: host.clone(),
                port: *port,
                category: "given".into(),
                skip: None,
            })
            .collect()
    };
    let check = Check {
        proxy,
        authorization,
        origin_tls,
        direct: args.direct,
        resolve: args.resolve.into_iter().collect::<HashMap<_, _>>(),
        certificate,
    };
    let json = args.json;
    let colour = match args.color {
        Colour::Always => true,
        Colour::Never => false,
        Colour::Auto => {
            use std::io::IsTerminal;
            std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
        }
    };
    portcullis::process::run("portcullis-agent", || async move {
        let report = check.run(endpoints).await;
        if json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", report::table(&report, colour));
        }
        Ok(if report.all_passed() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(EXIT_FAILED)
        })
    })
}

fn forward(args: ForwardArgs) -> ExitCode {
    let file = match args.options.identity.load_file() {
        Ok(f) => f,
        Err(e) => return usage(e),
    };
    let settings = match config::forward_settings(&args.options, file) {
        Ok(s) => s,
        Err(e) => return usage(e),
    };
    portcullis::access_log::init(match args.log_format {
        LogFormatArg::Json => LogFormat::Json,
        LogFormatArg::Text => LogFormat::Text,
    });
    portcullis::process::run("portcullis-agent", || async move {
        forward::run(settings, portcullis::process::shutdown_signal()).await?;
        tracing::info!("exiting");
        Ok(ExitCode::SUCCESS)
    })
}

/// The forwarder's settings from a config file alone (the service's only input).
#[cfg(windows)]
fn service_settings(config: &std::path::Path) -> Result<forward::Settings, String> {
    let options = ForwardOptions {
        identity: config::Identity {
            config: Some(config.to_owned()),
            ..Default::default()
        },
        ..Default::default()
    };
    config::forward_settings(&options, options.identity.load_file()?)
}

#[cfg(windows)]
fn service(action: ServiceAction) -> ExitCode {
    use portcullis::agent::service;
    let done = match action {
        ServiceAction::Install { config } => match service_settings(&config) {
            Ok(_) => service::install(&config).map(|()| {
                println!(
                    "installed service {}; start it with `portcullis-agent service start`",
                    service::NAME
                )
            }),
            Err(e) => return usage(e),
        },
        ServiceAction::Uninstall => service::uninstall(),
        ServiceAction::Start => service::start(),
        ServiceAction::Stop => service::stop(Duration::from_secs(30)),
        ServiceAction::Run { config, log_dir } => return service_run(&config, log_dir),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis-agent: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// The service process: JSON lines to a daily file, the forwarder until the manager stops it.
#[cfg(windows)]
fn service_run(config: &std::path::Path, log_dir: Option<std::path::PathBuf>) -> ExitCode {
    let dir = log_dir.unwrap_or_else(|| {
        std::env::var_os("ProgramData")
            .map_or_else(|| "C:\\ProgramData".into(), std::path::PathBuf::from)
            .join("Portcullis")
            .join("logs")
    });
    let appender = std::fs::create_dir_all(&dir)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            tracing_appender::rolling::Builder::new()
                .rotation(tracing_appender::rolling::Rotation::DAILY)
                .filename_prefix("agent")
                .filename_suffix("log")
                .max_log_files(14)
                .build(&dir)
                .map_err(|e| e.to_string())
        });
    match appender {
        Ok(appender) => portcullis::access_log::init_to(LogFormat::Json, appender),
        Err(e) => return usage(format!("{}: cannot write logs: {e}", dir.display())),
    }
    let settings = match service_settings(config) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("invalid configuration: {e}");
            return usage(e);
        }
    };
    let served = portcullis::agent::service::dispatch(move |stop| {
        let code = portcullis::process::run("portcullis-agent", || async move {
            let stop = async move {
                tokio::select! {
                    _ = stop => {}
                    _ = portcullis::process::shutdown_signal() => {}
                }
            };
            if let Err(e) = forward::run(settings, stop).await {
                tracing::error!(error = %e, "the forwarder failed");
                return Err(e.into());
            }
            tracing::info!("exiting");
            Ok(ExitCode::SUCCESS)
        });
        if code == ExitCode::SUCCESS {
            0
        } else {
            EXIT_FAILED
        }
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("portcullis-agent: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn status(listen: SocketAddr, json: bool) -> ExitCode {
    let reply = match portcullis::process::http_get(listen, "/status") {
        Ok(reply) => reply,
        Err(e) => {
            eprintln!("portcullis-agent: no forwarder at {listen}: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let body = match reply.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => body,
        _ => {
            eprintln!(
                "portcullis-agent: {listen}: {}",
                reply.lines().next().unwrap_or("no answer")
            );
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let Ok(value) = serde_json::from_str::<serde_json::Value>(body) else {
        eprintln!("portcullis-agent: {listen}: the status is not JSON");
        return ExitCode::from(EXIT_FAILED);
    };
    let gateways = value["gateways"].as_array().cloned().unwrap_or_default();
    if json {
        println!("{body}");
    } else {
        for g in &gateways {
            println!(
                "{}  {}{}{}",
                g["url"].as_str().unwrap_or("?"),
                g["state"].as_str().unwrap_or("?"),
                if g["in_use"] == true { "  in use" } else { "" },
                g["last_error"]
                    .as_str()
                    .map(|e| format!("  last error: {e}"))
                    .unwrap_or_default()
            );
        }
    }
    if gateways.iter().any(|g| g["state"] == "up") {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    }
}
