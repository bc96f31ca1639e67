//! Portcullis: an egress gateway for hybrid file sync. An HTTP CONNECT proxy that lets branch
//! file servers reach only the sync service's domains, resolves names itself, refuses internal
//! destinations, and logs one canonical line per request.
//!
//! The data path reads top to bottom in [`connect`]: head ([`request`]) -> client check and
//! policy ([`policy`]) -> resolve ([`resolve`]) -> destination wall ([`destination`]) -> dial ->
//! tunnel ([`tunnel`], paced by [`throttle`] under [`schedule`]s) -> log line ([`access_log`]). Config is compiled once ([`config`]) from
//! the operator's TOML and the built-in profiles ([`profiles`]). The branch agent's logic (the
//! `portcullis-agent` binary: endpoint check and local forwarder) is in [`agent`].
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod afs_import;
pub mod agent;
pub mod config;
pub mod connect;
pub mod destination;
pub mod explain;
pub mod hostname;
pub mod identity;
pub mod lane;
pub mod metrics;
pub mod policy;
pub mod process;
pub mod profiles;
pub mod proxy_protocol;
pub mod request;
pub mod resolve;
pub mod schedule;
pub mod schedule_table;
pub mod server;
pub mod sni;
#[cfg(target_os = "linux")]
mod splice;
pub mod stream;
pub mod throttle;
pub mod tls;
pub mod tunnel;
