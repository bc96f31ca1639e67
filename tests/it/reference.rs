//! The reference docs hold to the code, both ways: every config key, metric, `end` value,
//! access-line field and command that exists in the code is in docs/reference/, and nothing
//! documented there is missing from the code. Each list is read from the code itself (the
//! config parser's own answer to an unknown key, the metric registries, `End::ALL`, the access
//! line a full record writes, the binaries' `--help`), never from a second copy.

use crate::support::*;
use portcullis::end::End;
use std::collections::BTreeSet;
use std::path::Path;

/// A file of the repository, as text.
fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// The lines of `text` from the heading line `heading` to the next heading of its level or
/// higher.
fn section<'t>(text: &'t str, heading: &str) -> Vec<&'t str> {
    let level = heading.chars().take_while(|&c| c == '#').count();
    let mut lines = text.lines().skip_while(|l| l.trim_end() != heading);
    assert!(lines.next().is_some(), "no heading {heading:?}");
    lines
        .take_while(|l| {
            let hashes = l.chars().take_while(|&c| c == '#').count();
            !(hashes > 0 && hashes <= level && l[hashes..].starts_with(' '))
        })
        .collect()
}

/// The backticked words in cell `column` of every table row among `lines` (header and
/// separator rows skipped).
fn column(lines: &[&str], column: usize) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut in_table = false;
    let mut row = 0;
    for line in lines {
        let line = line.trim_start();
        if !line.starts_with('|') {
            in_table = false;
            continue;
        }
        if !in_table {
            in_table = true;
            row = 0;
        }
        row += 1;
        if row <= 2 {
            continue;
        }
        // `\|` inside a cell is not a column break.
        let cells: Vec<String> = line
            .replace("\\|", "\u{0}")
            .split('|')
            .map(str::to_owned)
            .collect();
        if let Some(cell) = cells.get(column + 1) {
            names.extend(backticked(cell));
        }
    }
    names
}

fn backticked(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(|w| w.replace('\u{0}', "|"))
        .collect()
}

fn assert_same(documented: &BTreeSet<String>, in_code: &BTreeSet<String>, what: &str) {
    let undocumented: Vec<_> = in_code.difference(documented).collect();
    let stale: Vec<_> = documented.difference(in_code).collect();
    assert!(
        undocumented.is_empty() && stale.is_empty(),
        "{what}: in the code but not documented: {undocumented:?}; documented but not in the code: {stale:?}"
    );
}

#[test]
fn observability_reference_lists_every_end_and_no_other() {
    let doc = repo_file("docs/reference/observability.md");
    let replies = section(&doc, "## Replies and end");
    let mut documented = column(&replies, 2);
    let lane: Vec<&str> = doc
        .lines()
        .skip_while(|l| !l.contains("How a forwarded request ends"))
        .skip(1)
        .skip_while(|l| !l.trim_start().starts_with('|'))
        .take_while(|l| l.trim_start().starts_with('|'))
        .collect();
    assert!(
        !lane.is_empty(),
        "no table after \"How a forwarded request ends\""
    );
    documented.extend(column(&lane, 0));
    // Statuses and other words in the column are not end names.
    documented.retain(|name| name.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
    let ends = End::ALL.iter().map(|e| e.as_str().to_owned()).collect();
    assert_same(&documented, &ends, "`end` values");
}

/// The Grafana dashboard's "Denied" panel selects `end=~"a|b|..."`: exactly the denials.
#[test]
fn the_dashboard_counts_every_denial_and_nothing_else() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&repo_file("docker/grafana-dashboard.json")).unwrap();
    let panel = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["title"].as_str().is_some_and(|t| t.starts_with("Denied")))
        .expect("a Denied panel");
    let expr = panel["targets"][0]["expr"].as_str().unwrap();
    let selected: BTreeSet<String> = expr
        .split("end=~\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("an end=~ selector")
        .split('|')
        .map(str::to_owned)
        .collect();
    let denials = End::ALL
        .iter()
        .filter(|e| e.is_denial())
        .map(|e| e.as_str().to_owned())
        .collect();
    assert_same(&selected, &denials, "the dashboard's Denied panel");
}

#[test]
fn observability_reference_lists_every_access_line_field() {
    let doc = repo_file("docs/reference/observability.md");
    let documented = column(&section(&doc, "## Access line fields"), 0);
    let written = portcullis::access_log::line_fields()
        .into_iter()
        .collect::<BTreeSet<_>>();
    assert_same(&documented, &written, "access line fields");
}

/// Family names as scraped: the classic text's `# TYPE` lines, which name a family by its
/// samples (`requests_total`).
fn family_names(classic: &str, prefix: &str) -> BTreeSet<String> {
    classic
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(|name| name.strip_prefix(prefix).unwrap_or(name).to_owned())
        .collect()
}

/// A gateway with every metric-bearing part switched on (fleet mode on a redis-server of the
/// test's own, a schedule in force, a learning rule, a branch) after one tunnel and a reload:
/// every family it exposes is documented, and every documented family is exposed.
#[tokio::test]
async fn observability_reference_lists_every_metric() {
    let redis = Redis::start(&[]);
    let state = tempfile::tempdir().unwrap();
    let mut origin = TcpOrigin::start(b"5byte").await;
    let port = origin.addr.port();
    // The origin's address as one the rule lists (not a private endpoint), so the tunnel
    // tries the egress's parent (nothing listens there) and falls back to direct.
    let config = GatewayConfig::for_origin(port)
        .origin_rule(|r| {
            r.set("private_addresses", Vec::<&str>::new())
                .addresses(&["127.0.0.1/32"])
        })
        .state_dir(state.path())
        .branch(Branch::new("london").sources(&["127.0.0.0/8"]))
        .fleet("redis", redis.url())
        .fleet("name", "reference")
        .policy("egress", "out")
        .extra(
            "[[parent]]\nname = \"gone\"\naddress = \"127.0.0.1:1\"\n\
             [egress.out]\nvia = [\"gone\"]\nfallback = \"direct\"\n\
             [policy.learn]\n\"test-origin\" = \"record\"\n\
             [[schedule]]\nname = \"always\"\ndays = \"daily\"\nhours = \"00:00-00:00\"\n\
             time_zone = \"UTC\"\nupload = \"100 Mbit/s\"\ndownload = \"100 Mbit/s\"\n\
             categories = [\"storage\"]\n",
        );
    let mut gw = Gateway::start(config).await;
    let (mut tunnel, status) = open_tunnel(gw.addr, &format!("{ORIGIN_HOST}:{port}"), b"").await;
    assert_eq!(status, 200);
    assert_eq!(send_and_finish(&mut tunnel, b"ten bytes!").await, b"5byte");
    assert_eq!(origin.received.recv().await.unwrap(), b"ten bytes!");
    let _ = gw.access_line(|l| l["end"] == "closed").await;
    let _ = gw.reload("reload applied").await;
    let admin = gw.admin_addr.unwrap();
    let scraped = admin_get(admin, "/metrics").await;
    let gateway = family_names(&scraped.body, "portcullis_");
    assert!(
        gateway.contains("fleet_share_bytes_per_second"),
        "{gateway:?}"
    );
    let doc = repo_file("docs/reference/observability.md");
    assert_same(
        &column(&section(&doc, "## Metrics"), 0),
        &gateway,
        "gateway metrics",
    );
}

/// The branch agent's families, for a forwarder with one gateway: each has its series at zero
/// from the start.
#[test]
fn observability_reference_lists_every_agent_metric() {
    use portcullis::agent::proxy_client::{Proxy, Timeouts};
    let url = "http://127.0.0.1:1".parse().unwrap();
    let tls = std::sync::Arc::new(Pki::new().client_config());
    let gateway = Proxy::new(url, tls, Timeouts::default()).unwrap();
    let pool = portcullis::agent::pool::Pool::new(vec![gateway]);
    let agent = portcullis::agent::metrics::AgentMetrics::new(&pool);
    let classic = portcullis::metrics::classic_text(&portcullis::metrics::encode(agent.registry()));
    let doc = repo_file("docs/reference/observability.md");
    assert_same(
        &column(&section(&doc, "## Agent metrics"), 0),
        &family_names(&classic, "portcullis_"),
        "agent metrics",
    );
}

/// Every command of `binary`, as `binary sub sub`, from `--help`'s "Commands:" lists.
fn commands(binary: &str, path: &[String]) -> Vec<String> {
    let exe = match binary {
        "portcullis" => env!("CARGO_BIN_EXE_portcullis"),
        _ => env!("CARGO_BIN_EXE_portcullis-agent"),
    };
    let out = std::process::Command::new(exe)
        .args(path)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{binary} {path:?} --help");
    let help = String::from_utf8(out.stdout).unwrap();
    let subcommands: Vec<String> = help
        .lines()
        .skip_while(|l| l.trim_end() != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|&name| name != "help")
        .map(str::to_owned)
        .collect();
    let mut found = Vec::new();
    for sub in subcommands {
        let mut deeper = path.to_vec();
        deeper.push(sub);
        found.push(format!("{binary} {}", deeper.join(" ")));
        found.extend(commands(binary, &deeper));
    }
    found
}

#[test]
fn cli_reference_lists_every_command() {
    let doc = repo_file("docs/reference/cli.md");
    let documented: BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("### "))
        .filter(|l| l.starts_with("portcullis"))
        .map(|l| l.trim().to_owned())
        .collect();
    let mut in_code: BTreeSet<String> = commands("portcullis", &[]).into_iter().collect();
    in_code.extend(commands("portcullis-agent", &[]));
    assert!(
        in_code.contains("portcullis schedule import-afs"),
        "{in_code:?}"
    );
    assert_same(&documented, &in_code, "commands");
}

/// Where a key path sits in a config file: a dotted table path whose parts may be arrays of
/// tables (`branch[].credentials[]`).
#[derive(Clone, Debug)]
struct TablePath(Vec<(String, bool)>);

impl TablePath {
    /// The TOML that opens this table, then `body`.
    fn toml(&self, body: &str) -> String {
        let mut text = String::new();
        for i in 0..self.0.len() {
            let path: Vec<&str> = self.0[..=i].iter().map(|(n, _)| n.as_str()).collect();
            let (_, array) = &self.0[i];
            if *array {
                text.push_str(&format!("[[{}]]\n", path.join(".")));
            } else if i + 1 == self.0.len() {
                text.push_str(&format!("[{}]\n", path.join(".")));
            }
        }
        text + body
    }

    fn child(&self, name: &str, array: bool) -> Self {
        let mut parts = self.0.clone();
        parts.push((name.to_owned(), array));
        Self(parts)
    }

    fn key(&self, name: &str) -> String {
        let mut parts: Vec<String> = self
            .0
            .iter()
            .map(|(n, array)| if *array { format!("{n}[]") } else { n.clone() })
            .collect();
        parts.push(name.to_owned());
        parts.join(".")
    }
}

/// The parser's answer to `text`: the error message, or `None` when it parsed.
fn parse_error(text: &str) -> Option<String> {
    portcullis::config::Config::parse(text, "probe.toml", jiff::Timestamp::now())
        .err()
        .map(|e| e.to_string())
}

/// The keys the table at `path` takes, as the parser lists them for an unknown one; `None`
/// when `path` is not a table with fixed keys.
fn keys_of(path: &TablePath) -> Option<Vec<String>> {
    let message = parse_error(&path.toml("zz_probe = 1\n"))?;
    let rest = message.split("unknown field `zz_probe`").nth(1)?;
    let expected = rest.split(';').next()?;
    Some(backticked(expected))
}

/// Every leaf key under `path`, as documented: `listen.tls_proxy[].address`.
fn leaf_keys(path: &TablePath, into: &mut BTreeSet<String>) {
    let keys = keys_of(path).unwrap_or_else(|| panic!("no keys found for {path:?}"));
    assert!(!keys.is_empty(), "{path:?} takes no keys");
    for key in keys {
        let table = path.child(&key, false);
        let array = path.child(&key, true);
        // A table of named tables (`[egress.NAME]`), documented as `egress.NAME.key`.
        let named = table.child("NAME", false);
        if keys_of(&table).is_some() {
            leaf_keys(&table, into);
        } else if keys_of(&array).is_some() {
            leaf_keys(&array, into);
        } else if keys_of(&named).is_some() {
            leaf_keys(&named, into);
        } else {
            into.insert(path.key(&key));
        }
    }
}

#[test]
fn config_reference_lists_every_key() {
    let mut in_code = BTreeSet::new();
    leaf_keys(&TablePath(Vec::new()), &mut in_code);
    assert!(
        in_code.contains("branch[].credentials[].password_hash") && in_code.contains("state_dir"),
        "{in_code:?}"
    );
    let doc = repo_file("docs/reference/config.md");
    let lines: Vec<&str> = doc.lines().collect();
    assert_same(&column(&lines, 0), &in_code, "config keys");
}

/// No function in src/ runs longer than 150 lines (rustfmt's layout: a function ends at the
/// first closing brace at its own indentation).
#[test]
fn no_function_is_longer_than_150_lines() {
    fn walk(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, files);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let mut long = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let code = line.trim_start();
            let indent = &line[..line.len() - code.len()];
            let signature = code
                .trim_start_matches("pub ")
                .trim_start_matches("pub(crate) ")
                .trim_start_matches("pub(super) ")
                .trim_start_matches("const ")
                .trim_start_matches("async ");
            if !signature.starts_with("fn ") || line.trim_end().ends_with(';') {
                continue;
            }
            let close = format!("{indent}}}");
            if let Some(end) = lines[i..].iter().position(|l| *l == close)
                && end + 1 > 150
            {
                long.push(format!("{}:{}: {} lines", file.display(), i + 1, end + 1));
            }
        }
    }
    assert!(long.is_empty(), "functions over 150 lines: {long:#?}");
}
