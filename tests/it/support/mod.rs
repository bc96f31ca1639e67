//! Test fixtures, one module per responsibility: the rcgen PKI, TLS and TCP origins, the real
//! binaries with JSON logs captured, clients and raw requests, config builders, a
//! redis-server of the test's own. Everything is
//! re-exported here, so tests keep `use crate::support::*`.

mod clients;
mod config;
mod origins;
mod pki;
mod processes;
mod redis;

pub use clients::*;
pub use config::*;
pub use origins::*;
pub use pki::*;
pub use processes::*;
pub use redis::*;

/// The name test origins answer to; the gateway maps it to 127.0.0.1 with a static override.
pub const ORIGIN_HOST: &str = "share1.file.core.windows.net";
