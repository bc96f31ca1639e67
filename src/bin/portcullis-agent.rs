//! `portcullis-agent`: the branch agent binary. Thin: parses the command line and the config
//! file, hands over to `portcullis::agent`. Exit codes: 0 ok (check: every endpoint passed),
//! 1 a check failed or a runtime failure, 2 usage or configuration errors.

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;
use portcullis::agent::check::Check;
use portcullis::agent::config::{self, AgentFile};
use portcullis::agent::endpoints::{self, Endpoint, Representatives};
use portcullis::agent::forward::{self, Settings};
use portcullis::agent::pool::Pool;
use portcullis::agent::proxy_client::{Proxy, ProxyUrl, Timeouts, basic_authorization};
use portcullis::agent::{report, trust};
use portcullis::config::LogFormat;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
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
}

/// Options shared by check and forward: trust, identity and credentials.
#[derive(Args)]
struct Identity {
    /// Agent config file (the forwarder's); its gateways, TLS files and credentials are used
    /// where no option is given.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// A CA certificate file (PEM) to trust (repeatable). check: in addition to the system
    /// roots, for the gateway and the endpoints; forward: instead of them, for the gateways.
    #[arg(long, value_name = "FILE")]
    ca: Vec<PathBuf>,
    /// The branch's client certificate chain (PEM), presented to an https:// gateway.
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// Proxy user for Basic credentials; the password comes from --password-file or the
    /// PORTCULLIS_PROXY_PASSWORD environment variable, never the command line.
    #[arg(long, value_name = "NAME")]
    user: Option<String>,
    /// File whose first line is the proxy password.
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
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
    identity: Identity,
    /// Listener for local apps (default 127.0.0.1:3128).
    #[arg(long, value_name = "IP:PORT")]
    listen: Option<SocketAddr>,
    /// A gateway URL, in order of preference (repeatable; replaces the config's list).
    #[arg(long = "gateway", value_name = "URL", value_parser = parse_url)]
    gateways: Vec<ProxyUrl>,
    /// A client network allowed besides loopback (repeatable; adds to the config's).
    #[arg(long = "client", value_name = "CIDR")]
    clients: Vec<IpNet>,
    /// How often down gateways are probed (default 10s).
    #[arg(long, value_name = "DURATION", value_parser = config::parse_duration)]
    probe_interval: Option<Duration>,
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
    }
}

fn usage(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("portcullis-agent: {message}");
    ExitCode::from(EXIT_USAGE)
}

/// The config file named by --config, or an empty one.
fn load_file(identity: &Identity) -> Result<AgentFile, String> {
    match &identity.config {
        Some(path) => AgentFile::load(path),
        None => Ok(AgentFile::default()),
    }
}

/// The `Proxy-Authorization` value from the options and the file, if a user is configured.
fn authorization(identity: &Identity, file: &AgentFile) -> Result<Option<String>, String> {
    let Some(user) = identity.user.as_ref().or(file.user.as_ref()) else {
        return Ok(None);
    };
    let password_file = identity
        .password_file
        .as_deref()
        .or(file.password_file.as_deref());
    match config::password(password_file)? {
        Some(password) => Ok(Some(basic_authorization(user, &password))),
        None => Err(format!(
            "user {user:?} has no password: give --password-file or set {}",
            config::PASSWORD_ENV
        )),
    }
}

fn client_identity<'a>(
    identity: &'a Identity,
    file: &'a AgentFile,
) -> Option<(&'a Path, &'a Path)> {
    match (&identity.cert, &identity.key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        _ => match (&file.certificate, &file.key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            _ => None,
        },
    }
}

fn check(args: CheckArgs) -> ExitCode {
    let file = match load_file(&args.identity) {
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
            trust::client_config(roots.clone(), client_identity(&args.identity, &file), true)?;
        let origin_tls = trust::client_config(roots, None, false)?;
        Ok((proxy_tls, origin_tls))
    })();
    let (proxy_tls, origin_tls) = match tls {
        Ok(pair) => pair,
        Err(e) => return usage(e),
    };
    let authorization = match authorization(&args.identity, &file) {
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
        let Some(profile) = portcullis::profiles::find(&args.profile) else {
            return usage(format!(
                "unknown profile {:?}; built in: {}",
                args.profile,
                portcullis::profiles::names().join(", ")
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
    let file = match load_file(&args.identity) {
        Ok(f) => f,
        Err(e) => return usage(e),
    };
    let settings = match forward_settings(&args, file) {
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

fn forward_settings(args: &ForwardArgs, file: AgentFile) -> Result<Settings, String> {
    let duration = |value: &Option<String>, key: &str, default: u64| -> Result<Duration, String> {
        match value {
            Some(text) => config::parse_duration(text).map_err(|e| format!("{key}: {e}")),
            None => Ok(Duration::from_secs(default)),
        }
    };
    let timeouts = Timeouts {
        connect: duration(&file.timeouts.connect, "timeouts.connect", 5)?,
        tls: duration(&file.timeouts.tls, "timeouts.tls", 10)?,
        reply: duration(&file.timeouts.reply, "timeouts.reply", 30)?,
    };
    let gateways: Vec<ProxyUrl> = if args.gateways.is_empty() {
        file.gateways
            .iter()
            .enumerate()
            .map(|(i, text)| text.parse().map_err(|e| format!("gateways[{i}]: {e}")))
            .collect::<Result<_, _>>()?
    } else {
        args.gateways.clone()
    };
    if gateways.is_empty() {
        return Err("no gateway: give --gateway URL (repeatable) or gateways in --config".into());
    }
    let ca_files: Vec<PathBuf> = if args.identity.ca.is_empty() {
        file.ca.iter().cloned().collect()
    } else {
        args.identity.ca.clone()
    };
    let roots = trust::roots(ca_files.is_empty(), &ca_files)?;
    let tls = trust::client_config(roots, client_identity(&args.identity, &file), true)?;
    let proxies = gateways
        .into_iter()
        .map(|url| Proxy::new(url, tls.clone(), timeouts))
        .collect::<Result<Vec<_>, _>>()?;
    let listen = match (args.listen, &file.listen) {
        (Some(addr), _) => addr,
        (None, Some(text)) => text
            .parse()
            .map_err(|_| format!("listen: {text:?}: expected IP:PORT"))?,
        (None, None) => SocketAddr::from(([127, 0, 0, 1], 3128)),
    };
    let mut clients = file.clients.clone();
    clients.extend(args.clients.iter().copied());
    let probe_interval = match args.probe_interval {
        Some(d) => d,
        None => duration(&file.probe_interval, "probe_interval", 10)?,
    };
    let max_connections = file.max_connections.unwrap_or(4096);
    if max_connections == 0 {
        return Err("max_connections: expected at least 1".into());
    }
    Ok(Settings {
        listen,
        clients,
        pool: Arc::new(Pool::new(proxies)),
        authorization: authorization(&args.identity, &file)?,
        head_timeout: duration(&file.timeouts.head, "timeouts.head", 10)?,
        idle_timeout: duration(&file.timeouts.idle, "timeouts.idle", 600)?,
        drain: duration(&file.timeouts.drain, "timeouts.drain", 30)?,
        probe_interval,
        max_connections,
    })
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
