//! Portcullis: an egress gateway for hybrid file sync. An HTTP CONNECT proxy that lets branch
//! file servers reach only the sync service's domains, resolves names itself, refuses internal
//! destinations, and logs one canonical line per request.
//!
//! The floors, lowest first (a module imports only from its own floor or below; see
//! docs/architecture.md for the map and `tests/it/layout.rs` for the check):
//! - [`process`], [`accept`], [`activation`], [`listen_queue`], [`end`], [`metrics`],
//!   [`access_log`], [`admin_http`]: the parts both binaries stand on (runtime, the accept loop,
//!   sockets systemd passed, the accept queue, how a connection ends, metrics, the log line, the
//!   admin listener's HTTP server).
//! - [`policy`]: host names and patterns, the allow-list and its [`policy::Decision`], the
//!   destination wall, the built-in profiles. Pure: no I/O, no clock.
//! - [`bandwidth`]: schedules, bucket arithmetic, per-tunnel gates and paced IO, budgets.
//! - [`config`]: the operator's TOML compiled once into a validated [`config::Config`].
//! - [`learned`]: the destinations each branch used under rules that learn, and their state
//!   file.
//! - [`fleet`]: fleet mode, limits shared with the other replicas through Redis (only with
//!   `[fleet]`).
//! - [`tunnel`], [`stream`]: the byte copy (buffered and spliced) with half-close, idle check
//!   and counts; plain or TLS streams as the copy sees them.
//! - [`gateway`]: one client connection, top to bottom in [`gateway::connect`]: head ->
//!   identity -> plan (policy, resolve, wall) -> dial -> reply -> SNI -> tunnel -> log line.
//! - [`server`], [`control`], [`admin`]: listeners, the running gateway as operators steer it
//!   (current snapshot, reload, metrics scrape), the admin endpoints.
//! - [`cli`]: operator tools off the hot path (explain, schedule table, AFS importer).
//! - [`agent`]: the branch agent (`portcullis-agent`), built on the gateway's parts.
//! - [`commands`]: the `portcullis` binary's command line and what each command does.
// One exception, `process::memory` (a call into glibc that takes no pointers).
#![deny(unsafe_code)]

pub mod accept;
pub mod access_log;
pub mod activation;
pub mod admin;
pub mod admin_http;
pub mod agent;
pub mod bandwidth;
pub mod cli;
pub mod commands;
pub mod config;
pub mod control;
pub mod end;
pub mod fleet;
pub mod gateway;
pub mod learned;
pub mod listen_queue;
pub mod live;
pub mod metrics;
pub mod policy;
pub mod process;
pub mod server;
pub mod stream;
pub mod tunnel;
pub mod upgrade;
