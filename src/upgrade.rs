//! Binary upgrade (SIGUSR2, `POST /upgrade`): the running gateway starts the binary at its own
//! path with its own arguments, handing it the listening sockets at descriptors 3.. with
//! `LISTEN_FDS`/`LISTEN_FDNAMES` (the socket activation path, [`crate::activation`]), and waits
//! until the new process says it listens: a datagram `READY=1` on a socket the old process
//! binds in a directory of its own, named by [`READY_ENV`]. A new process that exits, or does
//! not report within [`READY_WITHIN`], is stopped and the old one serves on, with the reason
//! logged. Once it is ready the old process stops accepting and drains
//! (`timeouts.upgrade_drain`); the kernel queues clients on the shared sockets meanwhile, so
//! none is refused.

#[cfg(unix)]
use std::path::PathBuf;
use std::time::Duration;

/// The readiness socket's path, set for a process started by an upgrade.
pub const READY_ENV: &str = "PORTCULLIS_UPGRADE_READY";
/// Fleet mode: the old process's instance id, so the new one takes over its replica name.
pub const INSTANCE_ENV: &str = "PORTCULLIS_UPGRADE_INSTANCE";
/// The branches' holds (drain, quarantine) in force on the old process, as JSON (branch name
/// to the hold's wire text): an upgrade must not lift a quarantine.
pub const HOLDS_ENV: &str = "PORTCULLIS_UPGRADE_HOLDS";
/// How long the new process has to load its config and listen.
pub const READY_WITHIN: Duration = Duration::from_secs(60);

/// Where an upgrade's result goes: the new process's id, or why the old one serves on.
pub type UpgradeReply = tokio::sync::oneshot::Sender<Result<u32, String>>;

/// A listening socket's descriptor, kept for an upgrade to hand over.
#[cfg(unix)]
pub type Socket = std::os::fd::OwnedFd;
/// Off Unix there is nothing to hand over.
#[cfg(not(unix))]
pub struct Socket;

/// A copy of `socket`'s descriptor (`dup`); `None` when the system refuses one.
#[cfg(unix)]
pub fn copy(socket: &impl std::os::fd::AsFd) -> Option<Socket> {
    socket.as_fd().try_clone_to_owned().ok()
}

#[cfg(not(unix))]
pub fn copy<T>(_socket: &T) -> Option<Socket> {
    None
}

/// Whether this process was started by an upgrade (a parent waits for its [`report_ready`]).
pub fn started_by_upgrade() -> bool {
    std::env::var_os(READY_ENV).is_some()
}

/// The old process's fleet instance id, when this process was started by an upgrade.
pub fn inherited_instance() -> Option<String> {
    if !started_by_upgrade() {
        return None;
    }
    std::env::var(INSTANCE_ENV).ok().filter(|i| !i.is_empty())
}

/// The old process's holds (branch, wire text), when this process was started by an upgrade.
pub fn inherited_holds() -> Vec<(String, String)> {
    if !started_by_upgrade() {
        return Vec::new();
    }
    let Some(text) = std::env::var(HOLDS_ENV).ok().filter(|t| !t.is_empty()) else {
        return Vec::new();
    };
    match serde_json::from_str::<std::collections::BTreeMap<String, String>>(&text) {
        Ok(holds) => holds.into_iter().collect(),
        Err(error) => {
            tracing::error!(%error, "upgrade: the old process's holds do not parse");
            Vec::new()
        }
    }
}

/// Tells the parent of an upgrade that this process listens; nothing without one.
#[cfg(unix)]
pub fn report_ready() {
    let Some(path) = std::env::var_os(READY_ENV) else {
        return;
    };
    let sent = std::os::unix::net::UnixDatagram::unbound()
        .and_then(|socket| socket.send_to(b"READY=1", &path));
    if let Err(error) = sent {
        tracing::warn!(%error, "upgrade: cannot tell the old process that this one listens");
    }
}

#[cfg(not(unix))]
pub fn report_ready() {}

/// The readiness socket's directory, removed when dropped.
#[cfg(unix)]
struct ReadyDir(PathBuf);

#[cfg(unix)]
impl Drop for ReadyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts the new process with `sockets` (name as in `LISTEN_FDNAMES`, descriptor) and waits
/// for it to report ready: its process id, or why it did not (it is stopped then).
#[cfg(unix)]
pub async fn hand_over(
    sockets: Vec<(&'static str, Socket)>,
    fleet_instance: Option<&str>,
    holds: &[(String, String)],
    within: Duration,
) -> Result<u32, String> {
    use command_fds::{CommandFdExt, FdMapping};
    use std::os::unix::fs::DirBuilderExt;
    let binary =
        std::env::current_exe().map_err(|e| format!("cannot find this process's binary: {e}"))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir =
        std::env::temp_dir().join(format!("portcullis-upgrade-{}-{nanos}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
    let dir = ReadyDir(dir);
    let path = dir.0.join("ready");
    let ready = tokio::net::UnixDatagram::bind(&path)
        .map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
    let names: Vec<&str> = sockets.iter().map(|s| s.0).collect();
    let mappings: Vec<FdMapping> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, (_, fd))| FdMapping {
            parent_fd: fd,
            child_fd: 3 + i as i32,
        })
        .collect();
    let mut command = std::process::Command::new(&binary);
    command
        .args(std::env::args_os().skip(1))
        .env("LISTEN_FDS", names.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env_remove("LISTEN_PID")
        .env(READY_ENV, &path)
        .env(INSTANCE_ENV, fleet_instance.unwrap_or(""))
        .env(HOLDS_ENV, holds_json(holds))
        .stdin(std::process::Stdio::null());
    command
        .fd_mappings(mappings)
        .map_err(|e| format!("cannot hand the sockets over: {e}"))?;
    let child = command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let pid = child.id();
    tracing::info!(pid, binary = %binary.display(), "upgrade: new process started; waiting until it listens");
    // Stopped unless it reports ready: also when this wait is abandoned (a stop request).
    let mut child = StopUnlessReady(Some(child));
    let outcome = match child.0.as_mut() {
        Some(process) => wait_ready(&ready, process, within).await,
        None => Err("the new process is gone".to_owned()),
    };
    if outcome.is_ok() {
        child.0 = None;
    }
    outcome.map(|()| pid)
}

/// A new process that has not taken over yet: killed and reaped when dropped, so a failed or
/// abandoned upgrade leaves nothing behind.
#[cfg(unix)]
struct StopUnlessReady(Option<std::process::Child>);

#[cfg(unix)]
impl Drop for StopUnlessReady {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits for `READY=1` from `child`, its exit, or `within`.
#[cfg(unix)]
async fn wait_ready(
    ready: &tokio::net::UnixDatagram,
    child: &mut std::process::Child,
    within: Duration,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 64];
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the new process exited before it listened ({status})"
            ));
        }
        let got = tokio::time::timeout(Duration::from_millis(100), ready.recv(&mut buf)).await;
        match got {
            Ok(Ok(n)) if &buf[..n] == b"READY=1" => return Ok(()),
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => return Err(format!("readiness socket: {e}")),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "the new process did not report that it listens within {}s",
                within.as_secs()
            ));
        }
    }
}

#[cfg(not(unix))]
pub async fn hand_over(
    _sockets: Vec<(&'static str, Socket)>,
    _fleet_instance: Option<&str>,
    _holds: &[(String, String)],
    _within: Duration,
) -> Result<u32, String> {
    Err("binary upgrades hand sockets over on Unix only".into())
}

/// `holds` (branch, wire text) as [`HOLDS_ENV`] carries them.
#[cfg(unix)]
fn holds_json(holds: &[(String, String)]) -> String {
    let map: std::collections::BTreeMap<&str, &str> = holds
        .iter()
        .map(|(branch, hold)| (branch.as_str(), hold.as_str()))
        .collect();
    serde_json::to_string(&map).unwrap_or_default()
}

/// Tells systemd the new process is the service's main process (`MAINPID=`); nothing outside
/// systemd.
pub fn announce_main_pid(pid: u32) {
    #[cfg(target_os = "linux")]
    {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::MainPid(pid)]);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = pid;
}
