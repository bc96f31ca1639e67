//! Operator tools, off the hot path: the whole effective configuration (`check-config`), one
//! request's explanation (`explain`), the schedule table (`schedule`), the Azure File Sync
//! importer (`import-afs`), pinned rules proposed from the access logs (`learn --from-log`),
//! shell completions and the man page of both binaries (`manual`), the live tunnels and
//! branches of a running gateway (`live`: `tunnels`, `close`, `branch`; `top`).
//! Nothing below this floor imports them.

pub mod afs_import;
pub mod check_config;
pub mod explain;
pub mod learn_from_log;
pub mod learned;
pub mod live;
pub mod manual;
pub mod schedule_table;
pub mod top;

/// `a, b, c`.
pub(crate) fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
