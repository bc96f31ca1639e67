//! Operator tools, off the hot path: the effective policy and one request's explanation
//! (`check-config`, `explain`), the schedule table (`schedule`), the Azure File Sync importer
//! (`import-afs`). Nothing below this floor imports them.

pub mod afs_import;
pub mod explain;
pub mod schedule_table;
