//! `[admin]`: who may use the admin listener. `[[admin.token]]` entries give a name, a role
//! (`read`: the live listings; `control`: every change too) and the token as an argon2id hash
//! (like branch passwords; the token itself is never stored). Without tokens, reads are open and
//! changes come from loopback only.

use super::password::StoredPassword;
use super::problems::Problems;
use super::values::is_name;
use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAdmin {
    pub(super) token: Vec<Spanned<RawToken>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawToken {
    pub(super) name: Spanned<String>,
    pub(super) role: Spanned<Role>,
    pub(super) token_hash: Spanned<String>,
}

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `GET /tunnels`, `/branches`, `/learned`.
    Read,
    /// Reads and every `POST` (close, drain, quarantine, release, reload, upgrade, learned).
    Control,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Control => "control",
        }
    }
}

/// One admin token.
#[derive(Clone, Debug)]
pub struct AdminToken {
    pub name: String,
    pub role: Role,
    pub hash: StoredPassword,
}

pub(super) fn compile(p: &mut Problems<'_>, raw: &RawAdmin) -> Vec<AdminToken> {
    let mut tokens: Vec<AdminToken> = Vec::new();
    for (i, t) in raw.token.iter().enumerate() {
        let key = format!("admin.token[{i}]");
        let t = t.get_ref();
        let name = t.name.get_ref();
        if !is_name(name) {
            p.add(
                t.name.span(),
                format!("{key}.name"),
                "expected a name of letters, digits, '-', '_', '.'",
            );
        } else if tokens.iter().any(|other| other.name == *name) {
            p.add(
                t.name.span(),
                format!("{key}.name"),
                format!("a second token named {name:?}; names say who acted in the audit lines"),
            );
        }
        match StoredPassword::parse(t.token_hash.get_ref()) {
            Ok(hash) => tokens.push(AdminToken {
                name: name.clone(),
                role: *t.role.get_ref(),
                hash,
            }),
            Err(why) => p.add(t.token_hash.span(), format!("{key}.token_hash"), why),
        }
    }
    tokens
}
