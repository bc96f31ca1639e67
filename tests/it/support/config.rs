//! Gateway config text for tests, built by what differs: `GatewayConfig::for_origin(port)` is
//! the usual config, and each test adds its rules (`Rule`), branches (`Branch`), table keys
//! (`limit`, `timeout`, `policy`, ...) and resolver entries; `extra` appends TOML verbatim
//! (schedules, deny rules). `temp_file` puts a config where the binary can read it.

use super::ORIGIN_HOST;
use std::fmt::{self, Display};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A Rust value as a TOML value: strings quoted, numbers and booleans as they are, slices,
/// arrays and vectors as TOML arrays.
pub trait ToToml {
    fn to_toml(&self) -> String;
}

impl ToToml for str {
    fn to_toml(&self) -> String {
        format!("\"{}\"", self.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

impl ToToml for String {
    fn to_toml(&self) -> String {
        self.as_str().to_toml()
    }
}

impl ToToml for Path {
    fn to_toml(&self) -> String {
        self.to_str().expect("a UTF-8 path").to_toml()
    }
}

impl ToToml for PathBuf {
    fn to_toml(&self) -> String {
        self.as_path().to_toml()
    }
}

macro_rules! plain_toml {
    ($($t:ty),*) => {
        $(impl ToToml for $t {
            fn to_toml(&self) -> String {
                self.to_string()
            }
        })*
    };
}
plain_toml!(bool, i32, u16, u32, u64, usize, f64);

/// A value written as it is (an inline table: `{ master = "m", nodes = [...] }`).
pub struct TomlRaw(pub String);

impl ToToml for TomlRaw {
    fn to_toml(&self) -> String {
        self.0.clone()
    }
}

impl<T: ToToml> ToToml for [T] {
    fn to_toml(&self) -> String {
        let items: Vec<String> = self.iter().map(ToToml::to_toml).collect();
        format!("[{}]", items.join(", "))
    }
}

impl<T: ToToml, const N: usize> ToToml for [T; N] {
    fn to_toml(&self) -> String {
        self.as_slice().to_toml()
    }
}

impl<T: ToToml> ToToml for Vec<T> {
    fn to_toml(&self) -> String {
        self.as_slice().to_toml()
    }
}

impl<T: ToToml + ?Sized> ToToml for &T {
    fn to_toml(&self) -> String {
        (**self).to_toml()
    }
}

/// A list of strings as `&str`s, for `ToToml`.
fn strs(items: &[impl AsRef<str>]) -> Vec<&str> {
    items.iter().map(AsRef::as_ref).collect()
}

/// `key = value` lines in the order they were set; setting a key again replaces its value.
#[derive(Clone, Debug, Default)]
struct Keys(Vec<(String, String)>);

impl Keys {
    fn set(&mut self, key: &str, value: impl ToToml) {
        let value = value.to_toml();
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key.to_owned(), value)),
        }
    }
}

impl Display for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (key, value) in &self.0 {
            writeln!(f, "{key} = {value}")?;
        }
        Ok(())
    }
}

/// One `[[policy.allow]]` rule.
#[derive(Clone, Debug)]
pub struct Rule {
    name: String,
    keys: Keys,
}

impl Rule {
    pub fn new(name: &str) -> Self {
        let mut keys = Keys::default();
        keys.set("name", name);
        Self {
            name: name.to_owned(),
            keys,
        }
    }

    /// The test origin's rule: `ORIGIN_HOST` (category storage) on `ports`, allowed to reach
    /// 127.0.0.1.
    pub fn origin(name: &str, ports: &[u16]) -> Self {
        Self::new(name)
            .category("storage")
            .hosts(&[ORIGIN_HOST])
            .ports(ports)
            .private_addresses(&["127.0.0.1/32"])
    }

    pub fn category(self, category: &str) -> Self {
        self.set("category", category)
    }

    pub fn hosts(self, hosts: &[impl AsRef<str>]) -> Self {
        self.set("hosts", strs(hosts))
    }

    pub fn addresses(self, addresses: &[impl AsRef<str>]) -> Self {
        self.set("addresses", strs(addresses))
    }

    pub fn ports(self, ports: &[u16]) -> Self {
        self.set("ports", ports)
    }

    pub fn private_addresses(self, ranges: &[impl AsRef<str>]) -> Self {
        self.set("private_addresses", strs(ranges))
    }

    /// Any other key (`sni`, `plain_http`, `learn`, `service_tags`).
    pub fn set(mut self, key: &str, value: impl ToToml) -> Self {
        self.keys.set(key, value);
        self
    }
}

/// One `[[branch]]`.
#[derive(Clone, Debug)]
pub struct Branch(Keys);

impl Branch {
    pub fn new(name: &str) -> Self {
        let mut keys = Keys::default();
        keys.set("name", name);
        Self(keys)
    }

    pub fn sources(self, networks: &[impl AsRef<str>]) -> Self {
        self.set("sources", strs(networks))
    }

    /// One proxy user of the branch with its argon2 hash.
    pub fn credentials(mut self, user: &str, password_hash: &str) -> Self {
        self.0.0.push((
            "credentials".into(),
            format!(
                "[{{ user = {}, password_hash = {} }}]",
                user.to_toml(),
                password_hash.to_toml()
            ),
        ));
        self
    }

    pub fn client_certificates(self, names: &[impl AsRef<str>]) -> Self {
        self.set("client_certificates", strs(names))
    }

    /// Any other key (`allow`, `max_tunnels`).
    pub fn set(mut self, key: &str, value: impl ToToml) -> Self {
        self.0.set(key, value);
        self
    }
}

/// A gateway config: listeners on 127.0.0.1:0 (proxy and admin), then what the test sets.
/// Rendered (`Display`) in a fixed order, a blank line between sections: top-level keys,
/// `[listen]` and its TLS listeners, the other tables in the order first set, the rules, the
/// branches, `[resolver]`, then `extra` as given.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    top: Keys,
    tables: Vec<(String, Keys)>,
    tls_listeners: Vec<Keys>,
    rules: Vec<Rule>,
    branches: Vec<Branch>,
    resolver: Option<Resolver>,
    extra: String,
}

/// `[resolver]`: DNS servers, or only the static overrides (`hosts_only`) when there are none.
#[derive(Clone, Debug, Default)]
struct Resolver {
    servers: Vec<SocketAddr>,
    timeout: Option<String>,
    hosts: Keys,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl GatewayConfig {
    /// Listeners only: `proxy = ["127.0.0.1:0"]` and `admin = "127.0.0.1:0"`; no rule, no
    /// resolver section.
    pub fn new() -> Self {
        let config = Self {
            top: Keys::default(),
            tables: Vec::new(),
            tls_listeners: Vec::new(),
            rules: Vec::new(),
            branches: Vec::new(),
            resolver: None,
            extra: String::new(),
        };
        config
            .listen("proxy", ["127.0.0.1:0"])
            .listen("admin", "127.0.0.1:0")
    }

    /// The usual config: the rule `test-origin` lets `ORIGIN_HOST` on `origin_port` reach
    /// 127.0.0.1, and a hosts-only resolver maps `ORIGIN_HOST` to 127.0.0.1.
    pub fn for_origin(origin_port: u16) -> Self {
        Self::new()
            .rule(Rule::origin("test-origin", &[origin_port]))
            .resolve(ORIGIN_HOST, "127.0.0.1")
    }

    /// For tests that reach no origin by name: the `test-origin` rule on port 1 (nothing
    /// listens there) and no resolver section.
    pub fn no_origin() -> Self {
        Self::new().rule(Rule::origin("test-origin", &[1]))
    }

    /// `key = value` in `[table]`.
    pub fn set(mut self, table: &str, key: &str, value: impl ToToml) -> Self {
        match self.tables.iter_mut().find(|(name, _)| name == table) {
            Some((_, keys)) => keys.set(key, value),
            None => {
                let mut keys = Keys::default();
                keys.set(key, value);
                self.tables.push((table.to_owned(), keys));
            }
        }
        self
    }

    /// `[listen]`: `clients`, `proxy_protocol_from`, `admin` ("off", or an address).
    pub fn listen(self, key: &str, value: impl ToToml) -> Self {
        self.set("listen", key, value)
    }

    /// `[policy]`: `mode`, `allow_unassigned`, `on_reload`, `learn_limit`, `service_tags_file`.
    pub fn policy(self, key: &str, value: impl ToToml) -> Self {
        self.set("policy", key, value)
    }

    /// `[limits]`.
    pub fn limit(self, key: &str, value: impl ToToml) -> Self {
        self.set("limits", key, value)
    }

    /// `[timeouts]`.
    pub fn timeout(self, key: &str, value: impl ToToml) -> Self {
        self.set("timeouts", key, value)
    }

    /// `[tls]`: the certificate, key and client CA files.
    pub fn tls(self, key: &str, value: impl ToToml) -> Self {
        self.set("tls", key, value)
    }

    /// `[fleet]`.
    pub fn fleet(self, key: &str, value: impl ToToml) -> Self {
        self.set("fleet", key, value)
    }

    /// `state_dir`, a top-level key.
    pub fn state_dir(mut self, dir: &Path) -> Self {
        self.top.set("state_dir", dir);
        self
    }

    /// Plain proxy listeners on 127.0.0.1:0 and on `address`.
    pub fn also_listen(self, address: &str) -> Self {
        self.listen("proxy", ["127.0.0.1:0", address])
    }

    /// A `[[listen.tls_proxy]]` on `address`, with `client_certificates` when given.
    pub fn tls_listener(mut self, address: &str, client_certificates: Option<&str>) -> Self {
        let mut keys = Keys::default();
        keys.set("address", address);
        if let Some(mode) = client_certificates {
            keys.set("client_certificates", mode);
        }
        self.tls_listeners.push(keys);
        self
    }

    /// Another `[[policy.allow]]`, after those already there.
    pub fn rule(mut self, rule: Rule) -> Self {
        self.rules.push(rule);
        self
    }

    /// Changes the rule named `name` where it stands (its ports, hosts, `sni`...).
    pub fn change_rule(mut self, name: &str, change: impl FnOnce(Rule) -> Rule) -> Self {
        let at = self
            .rules
            .iter()
            .position(|r| r.name == name)
            .unwrap_or_else(|| panic!("no rule {name}"));
        self.rules[at] = change(self.rules[at].clone());
        self
    }

    /// Changes the `test-origin` rule.
    pub fn origin_rule(self, change: impl FnOnce(Rule) -> Rule) -> Self {
        self.change_rule("test-origin", change)
    }

    pub fn branch(mut self, branch: Branch) -> Self {
        self.branches.push(branch);
        self
    }

    /// A static override: `name` resolves to `address` (or a list of addresses, in order).
    /// Without DNS servers the resolver is `hosts_only`.
    pub fn resolve(mut self, name: &str, address: impl ToToml) -> Self {
        self.resolver
            .get_or_insert_with(Resolver::default)
            .hosts
            .set(&format!("\"{name}\""), address);
        self
    }

    /// The gateway asks `servers` (within `timeout`): the resolver section is replaced, the
    /// static overrides so far (the origin's name among them) are gone.
    pub fn dns(mut self, servers: &[SocketAddr], timeout: &str) -> Self {
        self.resolver = Some(Resolver {
            servers: servers.to_vec(),
            timeout: Some(timeout.to_owned()),
            hosts: Keys::default(),
        });
        self
    }

    /// No `[resolver]` section (the system's resolver); `resolve` starts a new one.
    pub fn no_resolver(mut self) -> Self {
        self.resolver = None;
        self
    }

    /// TOML appended as it is (schedules, deny rules, `[policy.learn]`), after a blank line.
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push('\n');
        self.extra.push_str(toml);
        if !toml.ends_with('\n') {
            self.extra.push('\n');
        }
        self
    }
}

impl Display for GatewayConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Each section ends its last line; a blank line between sections.
        let mut sections = Vec::new();
        if !self.top.0.is_empty() {
            sections.push(self.top.to_string());
        }
        let (listen, others): (Vec<_>, Vec<_>) =
            self.tables.iter().partition(|(name, _)| name == "listen");
        for (name, keys) in listen {
            sections.push(format!("[{name}]\n{keys}"));
        }
        for keys in &self.tls_listeners {
            sections.push(format!("[[listen.tls_proxy]]\n{keys}"));
        }
        for (name, keys) in others {
            sections.push(format!("[{name}]\n{keys}"));
        }
        for rule in &self.rules {
            sections.push(format!("[[policy.allow]]\n{}", rule.keys));
        }
        for branch in &self.branches {
            sections.push(format!("[[branch]]\n{}", branch.0));
        }
        if let Some(resolver) = &self.resolver {
            let mut section = String::from("[resolver]\n");
            if resolver.servers.is_empty() {
                section.push_str("hosts_only = true\n");
            } else {
                let servers: Vec<String> = resolver.servers.iter().map(|s| s.to_string()).collect();
                section.push_str(&format!("servers = {}\n", servers.to_toml()));
            }
            if let Some(timeout) = &resolver.timeout {
                section.push_str(&format!("timeout = {}\n", timeout.to_toml()));
            }
            if !resolver.hosts.0.is_empty() {
                section.push_str(&format!("[resolver.hosts]\n{}", resolver.hosts));
            }
            sections.push(section);
        }
        write!(f, "{}{}", sections.join("\n"), self.extra)
    }
}

/// A schedule window of one hour that starts two hours from now (UTC): not in force while a
/// test runs.
pub fn later_today() -> String {
    let hour = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .hour();
    let start = (hour + 2) % 24;
    format!("{start:02}:00-{:02}:00", (start + 1) % 24)
}

/// `text` in a file `name` of a fresh temporary directory (gone when the guard drops).
pub fn temp_file(name: &str, text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

#[test]
fn the_usual_config_and_what_a_test_adds_read_as_toml() {
    let config = GatewayConfig::for_origin(8443)
        .limit("max_connections", 2)
        .origin_rule(|rule| rule.set("sni", "match"))
        .branch(Branch::new("london").sources(&["127.0.0.2/32"]))
        .resolve("other.example", "127.0.0.2")
        .extra("[[schedule]]\nname = \"night\"");
    assert_eq!(
        config.to_string(),
        r#"[listen]
proxy = ["127.0.0.1:0"]
admin = "127.0.0.1:0"

[limits]
max_connections = 2

[[policy.allow]]
name = "test-origin"
category = "storage"
hosts = ["share1.file.core.windows.net"]
ports = [8443]
private_addresses = ["127.0.0.1/32"]
sni = "match"

[[branch]]
name = "london"
sources = ["127.0.0.2/32"]

[resolver]
hosts_only = true
[resolver.hosts]
"share1.file.core.windows.net" = "127.0.0.1"
"other.example" = "127.0.0.2"

[[schedule]]
name = "night"
"#
    );
}
