//! What the process tells its service manager: systemd (`Type=notify`) on Linux, the service
//! control manager for the Windows service.

/// What the process tells its service manager.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceState {
    /// Listening: the service has started.
    Ready,
    /// Re-reading the configuration (the gateway's SIGHUP).
    Reloading,
    /// Draining before the exit.
    Stopping,
}

/// The Windows service's status reporter, set once by `agent::service` before it runs.
#[cfg(windows)]
static SERVICE_HOOK: std::sync::OnceLock<Box<dyn Fn(ServiceState) + Send + Sync>> =
    std::sync::OnceLock::new();

/// Makes `notify` report to `hook` (the Windows service control manager); a second call is
/// ignored.
#[cfg(windows)]
pub fn set_service_hook(hook: Box<dyn Fn(ServiceState) + Send + Sync>) {
    let _ = SERVICE_HOOK.set(hook);
}

/// Tells the service manager about `state`: systemd (`Type=notify` units) on Linux, the service
/// control manager when running as a Windows service; nothing otherwise.
pub fn notify(state: ServiceState) {
    #[cfg(target_os = "linux")]
    {
        use sd_notify::NotifyState;
        let _ = match state {
            ServiceState::Ready => sd_notify::notify(&[NotifyState::Ready]),
            ServiceState::Stopping => sd_notify::notify(&[NotifyState::Stopping]),
            ServiceState::Reloading => match NotifyState::monotonic_usec_now() {
                Ok(now) => sd_notify::notify(&[NotifyState::Reloading, now]),
                Err(e) => Err(e),
            },
        };
    }
    #[cfg(windows)]
    if let Some(hook) = SERVICE_HOOK.get() {
        hook(state);
    }
    #[cfg(not(any(target_os = "linux", windows)))]
    let _ = state;
}
