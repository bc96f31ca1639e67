//! The `portcullis` command line (clap): every command and option, also the source of
//! `--help`, the man page and the shell completions.

use clap::{Parser, Subcommand};
use std::net::IpAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "Egress gateway for hybrid file sync: an allow-listing CONNECT proxy"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the gateway (built-in azure-file-sync policy when no --config is given).
    Serve {
        /// The config file (TOML); without it, the built-in gateway (see
        /// docs/reference/config.md). SIGHUP re-reads it.
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
    /// Ask a running gateway (its admin listener: from loopback, or with a control token) to hand its listeners to a new
    /// process of the binary now at its path, which then serves while the old one drains; exit
    /// 0 once the new process listens, 1 (the reason on stderr) when the old one serves on.
    Upgrade {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List the open tunnels of a running gateway (its admin listener): branch, target, bytes
    /// and rates each way, age, state; busiest first.
    Tunnels {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        filter: FilterArgs,
        /// Print the admin listener's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Close open tunnels of a running gateway, by id or filter (each ends with its access
    /// line, `end = "closed_by_operator"`).
    Close {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        filter: FilterArgs,
        /// List what would close, and close nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also on every other replica (fleet mode, through Redis).
        #[arg(long)]
        fleet: bool,
    },
    /// Per-branch view and holds: list, drain, quarantine or release a branch.
    Branch {
        #[command(subcommand)]
        action: BranchAction,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// A live terminal view of branches (tunnels, rates against their limits, holds) and the
    /// busiest tunnels, refreshed each second; keys: s sort, b branch filter, q quit. Prints one
    /// plain table when stdout is not a terminal.
    Top {
        #[command(flatten)]
        admin: AdminArgs,
        /// Branches over every replica (fleet mode).
        #[arg(long)]
        fleet: bool,
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
    Completions(crate::cli::manual::CompletionsArgs),
    /// Print the man page (roff) to stdout: `portcullis man > /usr/local/share/man/man1/portcullis.1`.
    Man,
}

#[derive(Subcommand)]
pub enum LearnedAction {
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
pub struct LearnedTarget {
    /// The branch (a configured name, or `unassigned`).
    #[arg(long, value_name = "NAME")]
    pub branch: String,
    /// Only under this rule (approve: default the rule the policy picks for the branch).
    #[arg(long, value_name = "RULE")]
    pub rule: Option<String>,
    /// The destination: a host name under a learning rule's wildcard, and its port (forget
    /// without a port: every port).
    #[arg(value_name = "HOST[:PORT]")]
    pub host: String,
}

#[derive(Subcommand)]
pub enum ScheduleAction {
    /// Convert `Get-StorageSyncNetworkLimit | Format-List` output to [[schedule]] TOML.
    ImportAfs {
        /// The cmdlet's output saved to a file: UTF-16 (Windows PowerShell's `>`) or UTF-8.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LogFormatArg {
    Json,
    Text,
}

/// Where the running gateway's admin listener is, and the token to show it.
#[derive(clap::Args, Clone, Debug)]
pub struct AdminArgs {
    /// The gateway's admin listener (`listen.admin`).
    #[arg(
        long,
        value_name = "IP:PORT",
        default_value = "127.0.0.1:9464",
        global = true
    )]
    pub admin: std::net::SocketAddr,
    /// A file whose first line is the admin token (else `PORTCULLIS_ADMIN_TOKEN`), for a
    /// gateway with [[admin.token]] entries.
    #[arg(long, value_name = "FILE", global = true)]
    pub token_file: Option<PathBuf>,
}

/// Which open tunnels (the admin API's filter).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct FilterArgs {
    /// Tunnel ids (the access line's `conn_id`); repeat for more.
    #[arg(long = "id", value_name = "ID")]
    pub ids: Vec<u64>,
    /// Only this branch's.
    #[arg(long, value_name = "NAME")]
    pub branch: Option<String>,
    /// Only targets whose host matches (`*` for any run of characters).
    #[arg(long, value_name = "PATTERN")]
    pub host: Option<String>,
    /// Only tunnels allowed by this rule.
    #[arg(long, value_name = "RULE")]
    pub rule: Option<String>,
    /// Only tunnels open at least this long ("30s", "5m").
    #[arg(long, value_name = "DURATION")]
    pub min_age: Option<String>,
    /// Only tunnels moving at least this rate, both ways together ("1 Mbit/s").
    #[arg(long, value_name = "RATE")]
    pub min_rate: Option<String>,
    /// Sort by rate, bytes or age (largest first).
    #[arg(long, value_name = "KEY", value_parser = ["rate", "bytes", "age"])]
    pub sort: Option<String>,
    /// List at most this many.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

#[derive(Subcommand)]
pub enum BranchAction {
    /// Per branch: open tunnels, rates each way against the limits in force, holds.
    List {
        /// Every configured branch, not only those with tunnels or a hold.
        #[arg(long)]
        all: bool,
        /// Also every replica's figures (fleet mode).
        #[arg(long)]
        fleet: bool,
        /// Print the admin listener's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Refuse the branch's new requests (503 with Retry-After); its open tunnels run until the
    /// deadline, then close.
    Drain {
        /// The branch.
        #[arg(value_name = "NAME")]
        branch: String,
        /// How long open tunnels may run ("10m"), or an RFC 3339 time; default 10 minutes.
        #[arg(long, value_name = "WHEN")]
        deadline: Option<String>,
        /// On every replica (fleet mode), and for replicas that start later.
        #[arg(long)]
        fleet: bool,
    },
    /// Refuse the branch (403) and close its open tunnels now.
    Quarantine {
        /// The branch.
        #[arg(value_name = "NAME")]
        branch: String,
        /// On every replica (fleet mode), and for replicas that start later.
        #[arg(long)]
        fleet: bool,
    },
    /// Take a drain or quarantine off the branch.
    Release {
        /// The branch.
        #[arg(value_name = "NAME")]
        branch: String,
        /// On every replica (fleet mode).
        #[arg(long)]
        fleet: bool,
    },
}
