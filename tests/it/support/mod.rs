//! Test fixtures, one module per responsibility: the rcgen PKI, TLS and TCP origins, the real
//! binaries with JSON logs captured, clients and raw requests, config builders, promtool, free
//! ports, a redis-server of the test's own (or a Redis Cluster, or a Sentinel set), an unbound and a squid of the test's own, a network namespace, the branch agent's files. Everything is
//! re-exported here, so tests keep `use crate::support::*`.

mod agent;
mod clients;
mod config;
mod learned;
mod metrics;
mod netns;
mod origins;
mod pki;
mod ports;
mod processes;
mod redis;
mod redis_ha;
mod squid;
mod unbound;

pub use agent::*;
pub use clients::*;
pub use config::*;
pub use learned::*;
pub use metrics::*;
pub use netns::*;
pub use origins::*;
pub use pki::*;
pub use ports::*;
pub use processes::*;
pub use redis::*;
pub use redis_ha::*;
pub use squid::*;
pub use unbound::*;

/// The name test origins answer to; the gateway maps it to 127.0.0.1 with a static override.
pub const ORIGIN_HOST: &str = "share1.file.core.windows.net";
