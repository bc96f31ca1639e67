//! `portcullis-agent service`: the forwarder as a Windows service. `install` registers the
//! executable with the service control manager (automatic start, as LocalSystem, restarted
//! after a failure), `start` and `stop` ask the manager, `uninstall` stops and removes it. The
//! manager starts the process as `service run --config FILE`, which hands the dispatcher the
//! forwarder: the manager's stop and shutdown events end it through the same drain as Ctrl-C
//! (SIGTERM on Linux), and `process::notify` reports "running" once it listens and "stopping"
//! while it drains.

use crate::process::{self, ServiceState as Notified};
use std::ffi::OsString;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use windows_service::service::{
    ServiceAccess, ServiceAction, ServiceActionType, ServiceControl, ServiceControlAccept,
    ServiceErrorControl, ServiceExitCode, ServiceFailureActions, ServiceFailureResetPeriod,
    ServiceInfo, ServiceStartType, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};

/// The service's name (`sc query PortcullisAgent`, `Get-Service PortcullisAgent`).
pub const NAME: &str = "PortcullisAgent";
const DISPLAY_NAME: &str = "Portcullis branch agent";
const DESCRIPTION: &str = "Local HTTP CONNECT proxy (127.0.0.1:3128) carrying Azure File Sync \
                           to the Portcullis gateways with the branch's client certificate.";

/// The stop request handed to the forwarder: resolves on the manager's stop or shutdown.
pub type Stop = Pin<Box<dyn Future<Output = ()> + Send>>;
/// The forwarder, run on the service's thread; returns the process exit code.
type Body = Box<dyn FnOnce(Stop) -> u8 + Send>;

static BODY: Mutex<Option<Body>> = Mutex::new(None);

fn error(what: &str, e: windows_service::Error) -> String {
    match &e {
        windows_service::Error::Winapi(io) => format!("{what}: {io}"),
        other => format!("{what}: {other}"),
    }
}

fn manager(access: ServiceManagerAccess) -> Result<ServiceManager, String> {
    ServiceManager::local_computer(None::<&str>, access).map_err(|e| {
        error(
            "cannot open the service control manager (run as Administrator)",
            e,
        )
    })
}

/// Registers this executable as the service, started as `service run --config config`
/// (`config` made absolute) at boot.
pub fn install(config: &Path) -> Result<(), String> {
    let config = std::path::absolute(config)
        .map_err(|e| format!("{}: cannot resolve the path: {e}", config.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let info = ServiceInfo {
        name: NAME.into(),
        display_name: DISPLAY_NAME.into(),
        service_type: ServiceType::OWN_PROCESS,
        start_type: ServiceStartType::AutoStart,
        error_control: ServiceErrorControl::Normal,
        executable_path: exe,
        launch_arguments: vec![
            "service".into(),
            "run".into(),
            "--config".into(),
            config.into(),
        ],
        dependencies: vec![],
        account_name: None,
        account_password: None,
    };
    let manager = manager(ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE)?;
    let service = manager
        .create_service(&info, ServiceAccess::CHANGE_CONFIG | ServiceAccess::START)
        .map_err(|e| error(&format!("cannot install the service {NAME}"), e))?;
    service
        .set_description(DESCRIPTION)
        .map_err(|e| error("cannot set the description", e))?;
    // Restarted 5 s after a failure (a crash, or an exit other than 0), at most three times a
    // day; a configuration error is exit 2 and fails again, so the count stops it.
    let restart = ServiceAction {
        action_type: ServiceActionType::Restart,
        delay: Duration::from_secs(5),
    };
    let actions = ServiceFailureActions {
        reset_period: ServiceFailureResetPeriod::After(Duration::from_secs(24 * 3600)),
        reboot_msg: None,
        command: None,
        actions: Some(vec![restart.clone(), restart.clone(), restart]),
    };
    // Wine's manager has no failure actions; the service works without them.
    let _ = service.update_failure_actions(actions);
    let _ = service.set_failure_actions_on_non_crash_failures(true);
    Ok(())
}

fn open(access: ServiceAccess) -> Result<windows_service::service::Service, String> {
    manager(ServiceManagerAccess::CONNECT)?
        .open_service(NAME, access)
        .map_err(|e| error(&format!("service {NAME}"), e))
}

/// Waits up to `within` for the service to reach `state`.
fn wait_for(
    service: &windows_service::service::Service,
    state: ServiceState,
    within: Duration,
) -> Result<(), String> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let now = service
            .query_status()
            .map_err(|e| error("cannot query the service", e))?
            .current_state;
        if now == state {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "service {NAME} is {now:?} after {}s, not {state:?}",
                within.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts the service and waits until it runs (it listens by then).
pub fn start() -> Result<(), String> {
    let service = open(ServiceAccess::START | ServiceAccess::QUERY_STATUS)?;
    match service.start::<&str>(&[]) {
        Ok(()) => {}
        // Already running (or reported so by a service manager that raced our own start, as
        // wine's can under load): starting is done, like `systemctl start`.
        Err(windows_service::Error::Winapi(e))
            if e.raw_os_error() == Some(ERROR_ALREADY_RUNNING) => {}
        Err(e) => return Err(error(&format!("cannot start {NAME}"), e)),
    }
    wait_for(&service, ServiceState::Running, Duration::from_secs(30))
}

/// `ERROR_SERVICE_ALREADY_RUNNING`.
const ERROR_ALREADY_RUNNING: i32 = 1056;

/// Stops the service and waits until it has drained (up to `drain` and a margin).
pub fn stop(drain: Duration) -> Result<(), String> {
    let service = open(ServiceAccess::STOP | ServiceAccess::QUERY_STATUS)?;
    let status = service
        .query_status()
        .map_err(|e| error("cannot query the service", e))?;
    if status.current_state == ServiceState::Stopped {
        return Ok(());
    }
    service
        .stop()
        .map_err(|e| error(&format!("cannot stop {NAME}"), e))?;
    wait_for(
        &service,
        ServiceState::Stopped,
        drain + Duration::from_secs(10),
    )
}

/// Stops the service if it runs, then removes it.
pub fn uninstall() -> Result<(), String> {
    let service = open(ServiceAccess::STOP | ServiceAccess::QUERY_STATUS | ServiceAccess::DELETE)?;
    if let Ok(status) = service.query_status()
        && status.current_state != ServiceState::Stopped
    {
        let _ = service.stop();
        let _ = wait_for(&service, ServiceState::Stopped, Duration::from_secs(60));
    }
    service
        .delete()
        .map_err(|e| error(&format!("cannot remove {NAME}"), e))
}

/// Runs `body` as the service: connects to the service control manager (which must have
/// started this process) and returns when the service has stopped.
pub fn dispatch(body: impl FnOnce(Stop) -> u8 + Send + 'static) -> Result<(), String> {
    *BODY.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(body));
    windows_service::service_dispatcher::start(NAME, ffi_service_main).map_err(|e| {
        error(
            "not started by the service control manager (use `service start`)",
            e,
        )
    })
}

windows_service::define_windows_service!(ffi_service_main, service_main);

fn service_main(_arguments: Vec<OsString>) {
    let Some(body) = BODY.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return;
    };
    let stop = Arc::new(tokio::sync::Notify::new());
    let on_event = {
        let stop = stop.clone();
        move |event| match event {
            ServiceControl::Stop | ServiceControl::Shutdown | ServiceControl::Preshutdown => {
                // A permit is stored when nobody waits yet: the request is never lost.
                stop.notify_one();
                ServiceControlHandlerResult::NoError
            }
            ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
            _ => ServiceControlHandlerResult::NotImplemented,
        }
    };
    let Ok(handle) = service_control_handler::register(NAME, on_event) else {
        return;
    };
    let status = move |state, accept, exit: u32, wait_hint| ServiceStatus {
        service_type: ServiceType::OWN_PROCESS,
        current_state: state,
        controls_accepted: accept,
        exit_code: match exit {
            0 => ServiceExitCode::Win32(0),
            code => ServiceExitCode::ServiceSpecific(code),
        },
        checkpoint: 0,
        wait_hint,
        process_id: None,
    };
    let running = ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN;
    let _ = handle.set_service_status(status(
        ServiceState::StartPending,
        ServiceControlAccept::empty(),
        0,
        Duration::from_secs(30),
    ));
    process::set_service_hook(Box::new(move |state| {
        let next = match state {
            Notified::Ready => status(ServiceState::Running, running, 0, Duration::ZERO),
            // The drain may take `timeouts.drain`; the manager waits while the hint lasts.
            Notified::Stopping => status(
                ServiceState::StopPending,
                ServiceControlAccept::empty(),
                0,
                Duration::from_secs(120),
            ),
            Notified::Reloading => return,
        };
        let _ = handle.set_service_status(next);
    }));
    let code = body(Box::pin(async move { stop.notified().await }));
    let _ = handle.set_service_status(status(
        ServiceState::Stopped,
        ServiceControlAccept::empty(),
        u32::from(code),
        Duration::ZERO,
    ));
}
