//! Who is connecting: the branch a client belongs to, from a verified client certificate (TLS
//! listeners), proxy credentials, or its source network, in that order. Passwords exist only as
//! argon2id hashes in the config (parsed once at load); a verified credential is remembered by
//! its SHA-256 so a branch server opening many tunnels pays for argon2 once, and verifications
//! that miss that cache are rate limited per client address.

use crate::config::password::StoredPassword;
use crate::config::{BranchId, Config, Identity};
use base64::Engine;
use governor::{DefaultKeyedRateLimiter, Quota};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// Remembered credentials beyond this are forgotten all at once (then re-verified).
const VERIFIED_CACHE_ENTRIES: usize = 4096;

/// Why a client has no identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `Proxy-Authorization` present but not `Basic base64(user:password)`.
    MalformedCredentials,
    /// Unknown user or wrong password: never downgraded to the source-network match.
    WrongCredentials,
    /// Too many credential checks from this address.
    TooManyAttempts,
    /// Too many credential checks in progress, gateway-wide.
    ChecksBusy,
    /// No branch matches and unassigned clients are not admitted.
    NoBranch,
}

pub struct Identifier {
    /// user -> (branch, stored password)
    users: HashMap<String, (BranchId, StoredPassword)>,
    /// SHA-256 of a verified `Proxy-Authorization` value -> branch.
    verified: Mutex<HashMap<[u8; 32], BranchId>>,
    attempts: DefaultKeyedRateLimiter<IpAddr>,
    /// `limits.auth_attempts_per_minute`; in fleet mode counted in Redis (the local limiter
    /// decides when Redis does not answer).
    per_minute: u32,
    fleet: Option<std::sync::Arc<crate::fleet::Fleet>>,
    ipv6_prefix: u8,
}

/// Credential checks in progress, gateway-wide: each argon2 check holds its `m_cost` of memory
/// (19 MiB by default) for tens of milliseconds, so unbounded parallel guesses would take
/// hundreds of MiB. At most one check per two cores runs (the other half stays with the data
/// path, so other branches' tunnels never queue behind guesses), each in a memory block kept
/// for the next; a bounded number wait; beyond that a guess is refused (429) unchecked.
struct Checks {
    running: tokio::sync::Semaphore,
    /// Checks waiting or running now.
    admitted: std::sync::atomic::AtomicUsize,
    limit: usize,
    /// Memory blocks of finished checks, one per running check at most.
    memory: Mutex<Vec<Vec<argon2::Block>>>,
}

/// Checks that may wait for a core, per core.
const WAITING_CHECKS_PER_CORE: usize = 16;

static CHECKS: std::sync::LazyLock<Checks> = std::sync::LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let running = (cores / 2).max(1);
    Checks {
        running: tokio::sync::Semaphore::new(running),
        admitted: std::sync::atomic::AtomicUsize::new(0),
        limit: running + cores * WAITING_CHECKS_PER_CORE,
        memory: Mutex::new(Vec::new()),
    }
});

impl Checks {
    /// Runs `stored.verify_in(password)` when a core is free; `None` when too many wait.
    async fn verify(&self, stored: StoredPassword, password: String) -> Option<bool> {
        use std::sync::atomic::Ordering::AcqRel;
        if self.admitted.fetch_add(1, AcqRel) >= self.limit {
            self.admitted.fetch_sub(1, AcqRel);
            return None;
        }
        let result = async {
            let _running = self.running.acquire().await.ok()?;
            let mut memory = self
                .memory
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop()
                .unwrap_or_default();
            // argon2 is deliberately slow: keep it off the async workers.
            let (ok, memory) = tokio::task::spawn_blocking(move || {
                let ok = stored.verify_in(&password, &mut memory);
                (ok, memory)
            })
            .await
            .ok()?;
            self.memory
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(memory);
            Some(ok)
        }
        .await;
        self.admitted.fetch_sub(1, AcqRel);
        Some(result.unwrap_or(false))
    }
}

impl Identifier {
    pub fn new(config: &Config, fleet: Option<std::sync::Arc<crate::fleet::Fleet>>) -> Self {
        let users = config
            .branches
            .iter()
            .enumerate()
            .flat_map(|(i, b)| {
                b.credentials
                    .iter()
                    .map(move |c| (c.user.clone(), (BranchId(i), c.password.clone())))
            })
            .collect();
        Self {
            users,
            verified: Mutex::new(HashMap::new()),
            attempts: DefaultKeyedRateLimiter::keyed(
                Quota::per_minute(config.limits.auth_attempts_per_minute)
                    .allow_burst(config.limits.auth_attempts_per_minute),
            ),
            per_minute: config.limits.auth_attempts_per_minute.get(),
            fleet,
            ipv6_prefix: config.limits.ipv6_client_prefix,
        }
    }

    /// Whether any branch accepts credentials (so a refused client is told to send some).
    pub fn accepts_credentials(&self) -> bool {
        !self.users.is_empty()
    }

    /// The user name of the credentials `identify` would check (a certificate did not already
    /// identify the client, some branch accepts credentials, the header is Basic), for the log:
    /// printable, at most 64 characters. Never the password.
    pub fn credential_user(
        &self,
        config: &Config,
        authorization: Option<&str>,
        certificate_names: &[String],
    ) -> Option<String> {
        let value = authorization.filter(|_| self.accepts_credentials())?;
        if certificate_branch(config, certificate_names).is_some() {
            return None;
        }
        let (user, _) = parse_basic(value)?;
        Some(user.chars().filter(|c| !c.is_control()).take(64).collect())
    }

    /// A verified client certificate first, then credentials, then source network.
    /// `authorization` is the raw header value; `certificate_names` the DNS SANs and CN of a
    /// certificate the TLS listener verified (empty otherwise).
    pub async fn identify(
        &self,
        config: &Config,
        client: IpAddr,
        authorization: Option<&str>,
        certificate_names: &[String],
    ) -> Result<Identity, Refused> {
        if let Some(branch) = certificate_branch(config, certificate_names) {
            return Ok(Identity::Branch(branch));
        }
        // Credentials count only where some branch accepts them; otherwise the header is
        // ignored (and still never forwarded).
        if let Some(value) = authorization.filter(|_| self.accepts_credentials()) {
            // Boxed: only clients that send credentials pay for this future's space.
            return Box::pin(self.check_credentials(client, value))
                .await
                .map(Identity::Branch);
        }
        if let Some((_, &branch)) = config.branch_sources.longest_match(client) {
            return Ok(Identity::Branch(branch));
        }
        if config.branches.is_empty() || config.policy.allow_unassigned {
            Ok(Identity::Unassigned)
        } else {
            Err(Refused::NoBranch)
        }
    }

    async fn check_credentials(&self, client: IpAddr, value: &str) -> Result<BranchId, Refused> {
        let key: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, value.as_bytes())
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes");
        if let Some(&branch) = self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(branch);
        }
        let (user, password) = parse_basic(value).ok_or(Refused::MalformedCredentials)?;
        let counted_as = crate::policy::client_key(client, self.ipv6_prefix);
        let fleet_says = match &self.fleet {
            // Boxed: only credential checks in fleet mode pay for this future.
            Some(fleet) => Box::pin(fleet.auth_attempt(counted_as, self.per_minute)).await,
            None => None,
        };
        if !fleet_says.unwrap_or_else(|| self.attempts.check_key(&counted_as).is_ok()) {
            return Err(Refused::TooManyAttempts);
        }
        let Some((branch, stored)) = self.users.get(&user).cloned() else {
            return Err(Refused::WrongCredentials);
        };
        match CHECKS.verify(stored, password).await {
            None => return Err(Refused::ChecksBusy),
            Some(false) => return Err(Refused::WrongCredentials),
            Some(true) => {}
        }
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() >= VERIFIED_CACHE_ENTRIES {
            verified.clear();
        }
        verified.insert(key, branch);
        Ok(branch)
    }

    /// Forgets idle per-address attempt counters (call now and then).
    pub fn forget_idle_counters(&self) {
        self.attempts.retain_recent();
    }
}

/// The first branch one of a verified certificate's names (DNS SANs, CN) identifies.
/// (The first in file order when the names point to several.)
fn certificate_branch(config: &Config, certificate_names: &[String]) -> Option<BranchId> {
    certificate_names
        .iter()
        .filter_map(|name| config.certificate_branches.get(name).copied())
        .min_by_key(|branch| branch.index())
}

/// `Basic base64(user:password)` -> (user, password).
pub fn parse_basic(value: &str) -> Option<(String, String)> {
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    if user.is_empty() {
        return None;
    }
    Some((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_table() {
        let table: &[(&str, Option<(&str, &str)>)] = &[
            ("Basic bG9uZG9uOnNlY3JldA==", Some(("london", "secret"))),
            ("basic bG9uZG9uOnNlY3JldA==", Some(("london", "secret"))),
            ("Basic bG9uZG9uOmE6Yg==", Some(("london", "a:b"))),
            ("Basic bG9uZG9uOg==", Some(("london", ""))),
            ("Basic OnNlY3JldA==", None),
            ("Basic bm9jb2xvbg==", None),
            ("Basic !!!notbase64", None),
            ("Bearer abc", None),
            ("Basic", None),
            ("", None),
        ];
        for (value, want) in table {
            let got = parse_basic(value);
            assert_eq!(
                got.as_ref().map(|(u, p)| (u.as_str(), p.as_str())),
                *want,
                "{value:?}"
            );
        }
    }
}
