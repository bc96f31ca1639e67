//! The `portcullis` binary's commands, behind the thin `main`: the command line ([`args`]),
//! [`run`] to dispatch it, and [`serve`]. The top floor: nothing in the library imports it. Exit codes: 0 ok, 1 refused (explain, learned) or a runtime failure (a port
//! that cannot be bound), 2 usage (clap), 64 a bad config: in the file, or found only when
//! starting (a TLS certificate or key that cannot be used), so `RestartPreventExitStatus=64`
//! ends a restart loop; 64 too for a log file `learn` cannot read.

pub mod args;
pub mod serve;

use crate::config::Config;
use crate::gateway::Snapshot;
use crate::policy::host::Target;
use args::{
    AdminArgs, BranchAction, Cli, Command, FilterArgs, LearnedAction, LearnedTarget, ScheduleAction,
};
use clap::CommandFactory;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// sysexits EX_USAGE / EX_CONFIG-style code for a bad config or argument.
pub const EXIT_CONFIG: u8 = 64;

/// Runs one parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve { config, log_format } => serve::serve(config, log_format),
        Command::CheckConfig { file } => check_config(&file),
        Command::HashPassword => hash_password(),
        Command::Health { admin, path } => health(admin, &path),
        Command::Upgrade { admin } => with_token(&admin, || upgrade(admin.admin)),
        Command::Tunnels {
            admin,
            filter,
            json,
        } => with_token(&admin, || tunnels(admin.admin, &filter, json)),
        Command::Close {
            admin,
            filter,
            dry_run,
            fleet,
        } => with_token(&admin, || close(admin.admin, &filter, dry_run, fleet)),
        Command::Branch { action, admin } => with_token(&admin, || branch(admin.admin, &action)),
        Command::Top { admin, fleet } => with_token(&admin, || {
            crate::cli::top::run(admin.admin, fleet).map(|()| String::new())
        }),
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
        Command::Explain {
            config,
            from,
            target,
        } => explain(config.as_deref(), from, &target),
        Command::Learned {
            action,
            config,
            admin,
        } => {
            if let Ok(token) = std::env::var("PORTCULLIS_ADMIN_TOKEN") {
                crate::process::use_admin_token(token);
            }
            learned(config.as_deref(), admin, &action)
        }
        Command::Learn { from_log, config } => learn(&from_log, config.as_deref()),
        Command::Completions(args) => crate::process::print_stdout(
            "portcullis",
            &crate::cli::manual::completions(Cli::command(), args.shell),
        ),
        Command::Man => crate::process::print_stdout(
            "portcullis",
            &crate::cli::manual::man_page(Cli::command()),
        ),
    }
}

fn check_config(file: &Path) -> ExitCode {
    use crate::cli::check_config;
    match check_config::check(file, jiff::Timestamp::now()) {
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

fn explain(config_path: Option<&Path>, from: IpAddr, target: &str) -> ExitCode {
    let config = match load(config_path) {
        Ok(c) => c,
        Err(e) => return config_failure(&e),
    };
    let (authority, lane) = explain_target(target);
    let target = match Target::parse_authority(&authority) {
        Ok(t) => t,
        Err(why) => {
            eprintln!("portcullis: {target:?}: {why}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let source = config_name(config_path);
    crate::process::run("portcullis", || async move {
        let snapshot = match Snapshot::new(config) {
            Ok(snapshot) => snapshot,
            Err(e) => return Ok(start_failure(&source, &e)),
        };
        let (report, allowed) = crate::cli::explain::explain(&snapshot, from, &target, lane).await;
        print!("{report}");
        Ok(if allowed {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        })
    })
}

fn import_afs(file: &Path) -> ExitCode {
    use crate::cli::afs_import;
    let name = file.display().to_string();
    let toml = std::fs::read(file)
        .map_err(|e| format!("{name}: cannot read: {e}"))
        .and_then(|bytes| afs_import::decode(&bytes, &name))
        .and_then(|text| afs_import::import(&text, &name));
    match toml {
        Ok(toml) => crate::process::print_stdout("portcullis", toml.as_bytes()),
        Err(e) => {
            eprintln!("portcullis: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn learn(files: &[PathBuf], config: Option<&std::path::Path>) -> ExitCode {
    use crate::cli::learn_from_log::{Learned, report};
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
    crate::process::print_stdout("portcullis", report(&learned, &config).as_bytes())
}

fn schedule(config: Option<&std::path::Path>, at: Option<&str>, branch: Option<&str>) -> ExitCode {
    use jiff::tz::TimeZone;
    let config = match load(config) {
        Ok(c) => c,
        Err(e) => return config_failure(&e),
    };
    if let Some(b) = branch
        && b != crate::config::UNASSIGNED
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
                crate::cli::schedule_table::report(&config, at, &zone, branch)
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
            match crate::config::password::hash_password(&password) {
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
    match crate::process::http_get(admin, path) {
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

/// Runs `command` with the admin token (`--token-file`, else `PORTCULLIS_ADMIN_TOKEN`) on every
/// request; prints what it returns, or the reason it failed (exit 1).
fn with_token(admin: &AdminArgs, command: impl FnOnce() -> Result<String, String>) -> ExitCode {
    let token = match &admin.token_file {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => text.lines().next().map(|l| l.trim().to_owned()),
            Err(e) => {
                eprintln!("portcullis: {}: {e}", path.display());
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => std::env::var("PORTCULLIS_ADMIN_TOKEN").ok(),
    };
    if let Some(token) = token.filter(|t| !t.is_empty()) {
        crate::process::use_admin_token(token);
    }
    match command() {
        Ok(text) => crate::process::print_stdout("portcullis", text.as_bytes()),
        Err(why) => {
            eprintln!("portcullis: {why}");
            ExitCode::from(1)
        }
    }
}

/// The admin API's filter parameters from the command line.
fn filter_query(filter: &FilterArgs) -> Vec<(&'static str, Option<String>)> {
    let ids: Vec<String> = filter.ids.iter().map(u64::to_string).collect();
    vec![
        ("id", (!ids.is_empty()).then(|| ids.join(","))),
        ("branch", filter.branch.clone()),
        ("host", filter.host.clone()),
        ("rule", filter.rule.clone()),
        ("min_age", filter.min_age.clone()),
        ("min_rate", filter.min_rate.clone()),
        ("sort", filter.sort.clone()),
        ("limit", filter.limit.map(|n| n.to_string())),
    ]
}

/// `portcullis tunnels`.
fn tunnels(admin: std::net::SocketAddr, filter: &FilterArgs, json: bool) -> Result<String, String> {
    use crate::cli::live;
    let listing = live::ask(
        admin,
        "GET",
        &format!("/tunnels?{}", live::query(&filter_query(filter))),
    )?;
    if json {
        return Ok(serde_json::to_string_pretty(&listing).unwrap_or_default() + "\n");
    }
    let mut out = live::table(live::TUNNEL_HEADER, &live::tunnel_rows(&listing));
    out.push_str(&format!(
        "{} listed of {} open\n",
        listing["listed"], listing["open"]
    ));
    Ok(out)
}

/// `portcullis close`.
fn close(
    admin: std::net::SocketAddr,
    filter: &FilterArgs,
    dry_run: bool,
    fleet: bool,
) -> Result<String, String> {
    use crate::cli::live;
    let mut pairs = filter_query(filter);
    pairs.push(("dry_run", dry_run.then(|| "true".to_owned())));
    pairs.push(("fleet", fleet.then(|| "true".to_owned())));
    let done = live::ask(
        admin,
        "POST",
        &format!("/tunnels/close?{}", live::query(&pairs)),
    )?;
    if dry_run {
        let listing = serde_json::json!({ "tunnels": done["would_close"] });
        let mut out = live::table(live::TUNNEL_HEADER, &live::tunnel_rows(&listing));
        out.push_str(&format!(
            "would close {} (dry run: nothing closed)\n",
            done["closed"]
        ));
        return Ok(out);
    }
    let mut out = format!("closed {}\n", done["closed"]);
    if let Some(fleet) = done["fleet"].as_str() {
        out.push_str(&format!("fleet: {fleet}\n"));
    }
    Ok(out)
}

/// `portcullis branch list|drain|quarantine|release`.
fn branch(admin: std::net::SocketAddr, action: &BranchAction) -> Result<String, String> {
    use crate::cli::live;
    let yes = |on: bool| on.then(|| "true".to_owned());
    let (path, pairs) = match action {
        BranchAction::List { all, fleet, json } => {
            let query = live::query(&[("all", yes(*all)), ("fleet", yes(*fleet))]);
            let listing = live::ask(admin, "GET", &format!("/branches?{query}"))?;
            if *json {
                return Ok(serde_json::to_string_pretty(&listing).unwrap_or_default() + "\n");
            }
            let mut out = live::table(live::BRANCH_HEADER, &live::branch_rows(&listing));
            if listing["fleet"].is_object() {
                out.push_str("\nfleet:\n");
                out.push_str(&live::table(
                    live::BRANCH_HEADER,
                    &live::branch_rows(&listing["fleet"]),
                ));
            }
            return Ok(out);
        }
        BranchAction::Drain {
            branch,
            deadline,
            fleet,
        } => (
            format!("{branch}/drain"),
            vec![("deadline", deadline.clone()), ("fleet", yes(*fleet))],
        ),
        BranchAction::Quarantine { branch, fleet } => {
            (format!("{branch}/quarantine"), vec![("fleet", yes(*fleet))])
        }
        BranchAction::Release { branch, fleet } => {
            (format!("{branch}/release"), vec![("fleet", yes(*fleet))])
        }
    };
    let branch = path.split('/').next().unwrap_or_default();
    let done = live::ask(
        admin,
        "POST",
        &format!("/branches/{path}?{}", live::query(&pairs)),
    )?;
    let mut out = format!(
        "{branch}: {} ({} tunnels closed now)\n",
        done["hold"].as_str().unwrap_or("released"),
        done["closed"]
    );
    if let Some(until) = done["drain_until"].as_str() {
        out.push_str(&format!("open tunnels close at {until}\n"));
    }
    if let Some(fleet) = done["fleet"].as_str() {
        out.push_str(&format!("fleet: {fleet}\n"));
    }
    Ok(out)
}

/// `portcullis upgrade`: `POST /upgrade`, waiting as long as the gateway waits for the new
/// process (its ready report, then some).
fn upgrade(admin: std::net::SocketAddr) -> Result<String, String> {
    let wait = crate::upgrade::READY_WITHIN + std::time::Duration::from_secs(15);
    match crate::process::http_request_waiting(admin, "POST", "/upgrade", wait) {
        Ok((200, body)) => Ok(body),
        Ok((status, body)) => Err(format!("{admin}: {status}: {}", body.trim_end())),
        Err(e) => Err(format!("{admin}: {e}")),
    }
}

fn learned(
    config_path: Option<&std::path::Path>,
    admin: Option<std::net::SocketAddr>,
    action: &LearnedAction,
) -> ExitCode {
    use crate::cli::learned::{Change, run};
    use crate::learned::ops::Edit;
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

fn load(path: Option<&std::path::Path>) -> Result<Config, crate::config::ConfigError> {
    match path {
        Some(path) => Config::load(path, jiff::Timestamp::now()),
        None => Ok(Config::builtin()),
    }
}

fn config_failure(e: &crate::config::ConfigError) -> ExitCode {
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
