//! The descriptor budget: every tunnel holds two descriptors, so the soft limit is raised to
//! the hard one at start and the connection limit is derived from it.

/// Descriptors kept back from client connections: listeners, the admin listener, DNS sockets,
/// log and config files, and the pipes of spliced tunnels moving bytes now (two descriptors
/// per busy direction, a few spare per worker thread).
pub const RESERVED_DESCRIPTORS: u64 = 512;

/// Used when the descriptor limit cannot be read (not Linux).
const FALLBACK_CONNECTIONS: usize = 4096;

/// The soft limit on open descriptors (`RLIMIT_NOFILE`); `None` where unknown or unlimited.
pub fn descriptor_limit() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{Resource, getrlimit};
        getrlimit(Resource::Nofile).current
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Raises the soft descriptor limit to the hard one (what systemd's `LimitNOFILE=` or
/// `--ulimit nofile=` granted): thousands of idle sync tunnels need two descriptors each, and
/// the soft default (1,024 on many systems) would cap them long before memory does. Returns
/// the soft limit before and after.
pub fn raise_descriptor_limit() -> Option<(u64, u64)> {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let limit = getrlimit(Resource::Nofile);
        let before = limit.current?;
        // "Unlimited" is not a value the kernel takes for descriptors: stop at fs.nr_open.
        let hard = limit.maximum.unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/fs/nr_open")
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(before)
        });
        if hard > before {
            let raised = Rlimit {
                current: Some(hard),
                maximum: limit.maximum,
            };
            if setrlimit(Resource::Nofile, raised).is_ok() {
                return Some((before, hard));
            }
        }
        Some((before, before))
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Client connections the descriptor limit holds: two per tunnel (client and upstream) after
/// [`RESERVED_DESCRIPTORS`], at least 16.
pub fn connections_for_descriptors() -> usize {
    descriptor_limit().map_or(FALLBACK_CONNECTIONS, connections_for)
}

/// Client connections `limit` descriptors hold.
pub fn connections_for(limit: u64) -> usize {
    (limit.saturating_sub(RESERVED_DESCRIPTORS) / 2).clamp(16, 1 << 24) as usize
}

/// The hard descriptor limit, which `serve` raises its soft limit to; `None` where unknown or
/// unlimited.
pub fn hard_descriptor_limit() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}
