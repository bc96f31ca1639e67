//! `state_dir/learned.json`: the learned destinations as JSON, one object per destination,
//! sorted (a diff shows what a branch learned). Written whole and atomically: a temporary file
//! in the same directory, fsync, rename over the old one, fsync of the directory; a crash at
//! any point leaves the old file or the new one, never a mix. A leftover temporary file is
//! ignored (and replaced by the next save).

use super::{Row, Seen};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The `format` field: files of another format are refused, never guessed at.
pub const FORMAT: &str = "portcullis-learned-1";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    format: String,
    destinations: Vec<Destination>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Destination {
    branch: String,
    rule: String,
    host: String,
    port: u16,
    first_seen: String,
    last_seen: String,
    count: u64,
    #[serde(default)]
    approved: bool,
}

fn timestamp(seconds: i64) -> String {
    jiff::Timestamp::from_second(seconds)
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .to_string()
}

fn seconds(text: &str) -> Result<i64, String> {
    text.parse::<jiff::Timestamp>()
        .map(|t| t.as_second())
        .map_err(|e| format!("{text:?} is not an RFC 3339 time: {e}"))
}

/// The file's contents; a missing file is an empty set.
pub fn load(path: &Path) -> Result<Vec<Row>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: cannot read: {e}", path.display())),
    };
    parse(&text).map_err(|e| {
        format!(
            "{}: {e} (learned destinations; move the file away to start with none)",
            path.display()
        )
    })
}

/// Parses the file's text; errors name the line and column.
pub fn parse(text: &str) -> Result<Vec<Row>, String> {
    let file: File = serde_json::from_str(text)
        .map_err(|e| format!("line {} column {}: {e}", e.line(), e.column()))?;
    if file.format != FORMAT {
        return Err(format!("format {:?}, expected {FORMAT:?}", file.format));
    }
    file.destinations
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            let at = |e: String| format!("destinations[{i}]: {e}");
            let host = crate::policy::host::DnsName::parse(&d.host)
                .map_err(|e| at(format!("host {:?}: {e}", d.host)))?;
            if d.port == 0 {
                return Err(at("port 0".into()));
            }
            Ok(Row {
                branch: d.branch,
                rule: d.rule,
                host: host.as_str().to_owned(),
                seen: Seen {
                    port: d.port,
                    first_seen: seconds(&d.first_seen).map_err(at)?,
                    last_seen: seconds(&d.last_seen).map_err(at)?,
                    count: d.count,
                    approved: d.approved,
                    shared: false,
                },
            })
        })
        .collect()
}

/// The file's text for `rows`.
pub fn render(rows: &[Row]) -> Vec<u8> {
    let file = File {
        format: FORMAT.to_owned(),
        destinations: rows
            .iter()
            .map(|r| Destination {
                branch: r.branch.clone(),
                rule: r.rule.clone(),
                host: r.host.clone(),
                port: r.seen.port,
                first_seen: timestamp(r.seen.first_seen),
                last_seen: timestamp(r.seen.last_seen),
                count: r.seen.count,
                approved: r.seen.approved,
            })
            .collect(),
    };
    let mut text = serde_json::to_vec_pretty(&file).expect("plain data serializes");
    text.push(b'\n');
    text
}

/// The temporary file a save writes before renaming it over `path`.
pub fn temporary(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Replaces `path` with `rows`, atomically and durably; the directory is made (owner and
/// group only) when missing.
pub fn save(path: &Path, rows: &[Row]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    make_dir(dir)?;
    let tmp = temporary(path);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o640);
    let mut file = options.open(&tmp)?;
    file.write_all(&render(rows))?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    // The rename itself is durable once the directory is.
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

fn make_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o750);
    builder.create(dir)
}

/// Takes `dir`'s lock file (an exclusive `flock`, held until the file is dropped); an error
/// says another process holds it.
pub fn lock(dir: &Path) -> Result<std::fs::File, String> {
    make_dir(dir).map_err(|e| format!("{}: cannot create state_dir: {e}", dir.display()))?;
    let path = dir.join(super::LOCK_NAME);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("{}: cannot open: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "{}: another process holds it (a gateway running on this state_dir)",
            path.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(format!("{}: cannot lock: {e}", path.display()))
        }
    }
}
