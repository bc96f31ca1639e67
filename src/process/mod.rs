//! What both binaries (`portcullis`, `portcullis-agent`) do around their work, one job per
//! module: run it on a runtime with errors turned into exit codes ([`runtime`]), size the
//! descriptor budget ([`descriptors`]), wait for the stop signal ([`signals`]), tell the
//! service manager how it goes ([`service`]), ask a local endpoint over HTTP ([`local_http`]),
//! give back the memory a config load freed ([`memory`]), and keep slow work off the data
//! path's CPU ([`priority`]).

pub mod descriptors;
pub mod local_http;
pub mod memory;
pub mod priority;
pub mod runtime;
pub mod service;
pub mod signals;

pub use descriptors::{
    RESERVED_DESCRIPTORS, connections_for, connections_for_descriptors, descriptor_limit,
    hard_descriptor_limit, raise_descriptor_limit,
};
pub use local_http::{http_get, http_request, http_request_waiting, use_admin_token};
pub use runtime::{print_stdout, run};
#[cfg(windows)]
pub use service::set_service_hook;
pub use service::{ServiceState, notify};
pub use signals::shutdown_signal;
