//! Gateway config text for tests: the usual config (`config_for`), the resolver section
//! (`resolver_hosts`), and `temp_file` to put a config where the binary can read it.

use super::ORIGIN_HOST;

/// The usual test config: listen on 127.0.0.1:0, built-in profile, plus a rule that lets
/// `ORIGIN_HOST` on the origin's port reach 127.0.0.1 (via a static override). `extra` is
/// appended verbatim (more rules, resolver or timeout settings).
pub fn config_for(origin_port: u16, extra: &str) -> String {
    format!(
        r#"
[listen]
proxy = ["127.0.0.1:0"]
admin = "127.0.0.1:0"

[[policy.allow]]
name = "test-origin"
category = "storage"
hosts = ["{ORIGIN_HOST}"]
ports = [{origin_port}]
private_addresses = ["127.0.0.1/32"]

{extra}
"#
    )
}

/// The `[resolver]` section mapping `ORIGIN_HOST` to 127.0.0.1, with more `name = "addr"` lines.
pub fn resolver_hosts(more: &str) -> String {
    format!(
        "[resolver]\nhosts_only = true\n[resolver.hosts]\n\"{ORIGIN_HOST}\" = \"127.0.0.1\"\n{more}\n"
    )
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
