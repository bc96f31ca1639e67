//! `state_dir/learned.json`: the learned destinations as JSON, one object per destination,
//! sorted (a diff shows what a branch learned). Written whole and atomically: a temporary file
//! in the same directory, fsync, rename over the old one, fsync of the directory; a crash at
//! any point leaves the old file or the new one, never a mix. A leftover temporary file is
//! ignored (and replaced by the next save). In fleet mode it also holds what sharing needs
//! across a restart (all optional, absent otherwise): each destination's stamp from Redis (or
//! that it is not in Redis yet), the forgotten destinations' tombstones, and when the fleet
//! was last read.

use super::shared::{Place, Tomb};
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
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    fleet_forgotten: Vec<Forgotten>,
    /// Redis's time of this replica's last full read of the fleet's sets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fleet_synced: Option<String>,
}

/// What the file holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stored {
    pub rows: Vec<Row>,
    /// Fleet mode: tombstones of forgotten destinations.
    pub forgotten: Vec<(Place, Tomb)>,
    /// Fleet mode: Redis's time (ms) of the last full read.
    pub synced: Option<i64>,
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
    /// Redis's time of the change this state comes from (fleet mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fleet_stamp: Option<String>,
    /// Changed here and not in Redis yet (fleet mode).
    #[serde(default, skip_serializing_if = "is_false")]
    fleet_pending: bool,
}

/// A forgotten destination (fleet mode), kept while Redis keeps its tombstone.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Forgotten {
    branch: String,
    rule: String,
    host: String,
    port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fleet_stamp: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    fleet_pending: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A stamp (Redis's time in ms) as an RFC 3339 time with milliseconds.
fn stamp_text(ms: i64) -> Option<String> {
    (ms > 0)
        .then(|| jiff::Timestamp::from_millisecond(ms).ok())
        .flatten()
        .map(|t| t.to_string())
}

fn stamp_ms(text: &str) -> Result<i64, String> {
    text.parse::<jiff::Timestamp>()
        .map(|t| t.as_millisecond())
        .map_err(|e| format!("{text:?} is not an RFC 3339 time: {e}"))
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
pub fn load(path: &Path) -> Result<Stored, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Stored::default()),
        Err(e) => return Err(format!("{}: cannot read: {e}", path.display())),
    };
    parse_stored(&text).map_err(|e| {
        format!(
            "{}: {e} (learned destinations; move the file away to start with none)",
            path.display()
        )
    })
}

/// Parses the file's text (or a listing) to its destinations; errors name the line and column.
pub fn parse(text: &str) -> Result<Vec<Row>, String> {
    parse_stored(text).map(|stored| stored.rows)
}

/// Parses the file's text; errors name the line and column.
pub fn parse_stored(text: &str) -> Result<Stored, String> {
    let file: File = serde_json::from_str(text)
        .map_err(|e| format!("line {} column {}: {e}", e.line(), e.column()))?;
    if file.format != FORMAT {
        return Err(format!("format {:?}, expected {FORMAT:?}", file.format));
    }
    let forgotten = file
        .fleet_forgotten
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            let at = |e: String| format!("fleet_forgotten[{i}]: {e}");
            let host = crate::policy::host::DnsName::parse(&f.host)
                .map_err(|e| at(format!("host {:?}: {e}", f.host)))?;
            let stamp = f
                .fleet_stamp
                .as_deref()
                .map_or(Ok(0), stamp_ms)
                .map_err(at)?;
            let place = Place::new(&f.branch, &f.rule, host.as_str(), f.port);
            // The number is this process's, given when the store takes the tombstone.
            let pending = f.fleet_pending.then_some(0);
            Ok((place, Tomb { stamp, pending }))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let synced = file.fleet_synced.as_deref().map(stamp_ms).transpose()?;
    let rows = file
        .destinations
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
                    stamp: d
                        .fleet_stamp
                        .as_deref()
                        .map_or(Ok(0), stamp_ms)
                        .map_err(at)?,
                    // The number is this process's, given when the store takes the row.
                    pending: d.fleet_pending.then_some(0),
                },
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Stored {
        rows,
        forgotten,
        synced,
    })
}

/// The text of a file holding `rows` only (a listing).
pub fn render(rows: &[Row]) -> Vec<u8> {
    render_stored(&Stored {
        rows: rows.to_vec(),
        ..Stored::default()
    })
}

/// The file's text for `stored`.
pub fn render_stored(stored: &Stored) -> Vec<u8> {
    let file = File {
        format: FORMAT.to_owned(),
        destinations: stored
            .rows
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
                fleet_stamp: stamp_text(r.seen.stamp),
                fleet_pending: r.seen.pending.is_some(),
            })
            .collect(),
        fleet_forgotten: stored
            .forgotten
            .iter()
            .map(|(place, tomb)| Forgotten {
                branch: place.branch.clone(),
                rule: place.rule.clone(),
                host: place.host.clone(),
                port: place.port,
                fleet_stamp: stamp_text(tomb.stamp),
                fleet_pending: tomb.pending.is_some(),
            })
            .collect(),
        fleet_synced: stored.synced.and_then(stamp_text),
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

/// Replaces `path` with `stored`, atomically and durably; the directory is made (owner and
/// group only) when missing.
pub fn save(path: &Path, stored: &Stored) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    make_dir(dir)?;
    let tmp = temporary(path);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o640);
    let mut file = options.open(&tmp)?;
    file.write_all(&render_stored(stored))?;
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
