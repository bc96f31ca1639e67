//! The file as written: serde types with `deny_unknown_fields`, values kept `Spanned` so every
//! problem found later can name its line. Nothing here is validated; `compile` does that.

use super::{ClientCertificates, LogFormat};
use crate::policy::{Learn, Mode, OnReload, SniMode};
use serde::Deserialize;
use std::collections::BTreeMap;
use toml::Spanned;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawConfig {
    pub(super) listen: RawListen,
    pub(super) policy: RawPolicy,
    pub(super) resolver: RawResolver,
    pub(super) timeouts: RawTimeouts,
    pub(super) limits: RawLimits,
    pub(super) log: RawLog,
    pub(super) tls: Option<Spanned<RawTls>>,
    pub(super) branch: Vec<Spanned<RawBranch>>,
    pub(super) schedule: Vec<Spanned<RawSchedule>>,
    pub(super) fleet: Option<Spanned<super::fleet::RawFleet>>,
    pub(super) admin: super::admin::RawAdmin,
    /// `[egress.NAME]`: the ways out.
    pub(super) egress: BTreeMap<Spanned<String>, Spanned<super::egress::RawEgress>>,
    /// `[[parent]]`: proxies an egress may go through.
    pub(super) parent: Vec<Spanned<super::parents::RawParent>>,
    /// Where the gateway keeps what it learns (learned destinations).
    pub(super) state_dir: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSchedule {
    pub(super) name: Spanned<String>,
    pub(super) days: Spanned<String>,
    pub(super) hours: Spanned<String>,
    pub(super) time_zone: Option<Spanned<String>>,
    pub(super) upload: Option<Spanned<String>>,
    pub(super) download: Option<Spanned<String>>,
    pub(super) applies_to: Option<Spanned<String>>,
    pub(super) branches: Option<Vec<Spanned<String>>>,
    pub(super) categories: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBranch {
    pub(super) name: Spanned<String>,
    #[serde(default)]
    pub(super) sources: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) credentials: Vec<RawCredential>,
    #[serde(default)]
    pub(super) client_certificates: Vec<Spanned<String>>,
    pub(super) allow: Option<Vec<Spanned<String>>>,
    pub(super) max_tunnels: Option<Spanned<u32>>,
    pub(super) egress: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCredential {
    pub(super) user: Spanned<String>,
    pub(super) password_hash: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawListen {
    pub(super) proxy: Option<Vec<Spanned<String>>>,
    pub(super) clients: Option<Vec<Spanned<String>>>,
    pub(super) tls_proxy: Vec<Spanned<RawTlsListen>>,
    pub(super) proxy_protocol_from: Vec<Spanned<String>>,
    pub(super) admin: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTlsListen {
    pub(super) address: Spanned<String>,
    pub(super) client_certificates: Option<ClientCertificates>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawTls {
    pub(super) certificate: Option<Spanned<String>>,
    pub(super) key: Option<Spanned<String>>,
    pub(super) client_ca: Option<Spanned<String>>,
    pub(super) handshake_timeout: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawPolicy {
    pub(super) mode: Option<Mode>,
    pub(super) profiles: Option<Vec<Spanned<String>>>,
    pub(super) allow: Vec<Spanned<RawRule>>,
    pub(super) deny: Vec<Spanned<RawDeny>>,
    pub(super) service_tags_file: Option<Spanned<String>>,
    pub(super) allow_unassigned: bool,
    pub(super) sni: Option<SniMode>,
    pub(super) on_reload: Option<OnReload>,
    /// `"RULE" = "record" | "enforce" | "off"`: learning for rules by name (a profile's too).
    pub(super) learn: BTreeMap<Spanned<String>, Spanned<Learn>>,
    pub(super) learn_limit: Option<Spanned<u32>>,
    /// The egress of every rule and branch that names none.
    pub(super) egress: Option<Spanned<String>>,
}

/// `[[policy.deny]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDeny {
    pub(super) name: Spanned<String>,
    #[serde(default)]
    pub(super) hosts: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) addresses: Vec<Spanned<String>>,
    pub(super) ports: Option<Vec<Spanned<u16>>>,
    pub(super) branches: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    pub(super) name: Spanned<String>,
    pub(super) category: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) hosts: Vec<Spanned<String>>,
    pub(super) ports: Option<Vec<Spanned<u16>>>,
    #[serde(default)]
    pub(super) addresses: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) private_addresses: Vec<Spanned<String>>,
    pub(super) sni: Option<SniMode>,
    #[serde(default)]
    pub(super) plain_http: bool,
    pub(super) service_tags: Option<Vec<Spanned<String>>>,
    pub(super) learn: Option<Learn>,
    pub(super) egress: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawResolver {
    pub(super) servers: Vec<Spanned<String>>,
    pub(super) ca: Option<Spanned<String>>,
    pub(super) timeout: Option<Spanned<String>>,
    pub(super) hosts: BTreeMap<Spanned<String>, Spanned<toml::Value>>,
    pub(super) hosts_only: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawTimeouts {
    pub(super) head: Option<Spanned<String>>,
    pub(super) connect: Option<Spanned<String>>,
    pub(super) attempt_delay: Option<Spanned<String>>,
    pub(super) idle: Option<Spanned<String>>,
    pub(super) drain: Option<Spanned<String>>,
    pub(super) pre_stop: Option<Spanned<String>>,
    pub(super) upgrade_drain: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLimits {
    pub(super) max_connections: Option<Spanned<u32>>,
    pub(super) connect_rate_per_client: Option<Spanned<u32>>,
    pub(super) auth_attempts_per_minute: Option<Spanned<u32>>,
    pub(super) max_pending_heads_per_client: Option<Spanned<u32>>,
    pub(super) ipv6_client_prefix: Option<Spanned<u8>>,
    pub(super) throttle_queue: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLog {
    pub(super) format: Option<LogFormat>,
    pub(super) access_file: Option<Spanned<String>>,
    pub(super) on_write_failure: Option<Spanned<crate::access_log::OnWriteFailure>>,
}

// ---- compiling ---------------------------------------------------------------------------
