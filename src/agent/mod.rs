//! The branch agent (`portcullis-agent`), run on each branch file server. `check` proves that
//! every endpoint the sync service needs works through the gateway, stage by stage, and that none
//! is reachable around it; `forward` is a local plain-HTTP CONNECT proxy for apps that cannot
//! speak TLS to a proxy, carrying their tunnels to the gateways with the branch's client
//! certificate and failing over between gateways.

pub mod check;
pub mod config;
pub mod endpoints;
pub mod forward;
pub mod metrics;
pub mod pool;
pub mod proxy_client;
pub mod report;
#[cfg(windows)]
pub mod service;
pub mod trust;
