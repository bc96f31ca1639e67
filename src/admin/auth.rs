//! Who is asking the admin listener, and whether they may. With `[[admin.token]]` entries,
//! reads of the live state need a `read` or `control` Bearer token and every change a `control`
//! one, from any address the listener accepts; without tokens, reads are open and changes come
//! from loopback only. A token is checked with argon2id once, then remembered by its SHA-256
//! (forgotten when a reload removes or changes it); checks run one at a time, and checks of
//! tokens not remembered are rate limited per client address (`429` beyond), so guessing costs
//! the gateway at most one core's slice and a guesser cannot lock other operators out. Tokens
//! never appear in a log or an answer.

use crate::admin_http::{Answer, Ask};
use crate::config::Config;
use crate::config::admin::Role;
use crate::config::password::StoredPassword;
use governor::{DefaultKeyedRateLimiter, Quota};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{LazyLock, Mutex};

/// Who made an allowed request, for the audit lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A configured token, by name.
    Token(String),
    /// No tokens are configured: a read from anywhere the listener accepts, or a change from
    /// loopback.
    Anonymous,
}

impl Caller {
    /// The audit line's `who`.
    pub fn who(&self) -> String {
        match self {
            Caller::Token(name) => format!("token:{name}"),
            Caller::Anonymous => "anonymous".into(),
        }
    }
}

/// Remembered verified tokens beyond this are forgotten all at once.
const REMEMBERED: usize = 256;

struct Checked {
    /// SHA-256 of a verified token -> its name and the hash it matched.
    remembered: Mutex<HashMap<[u8; 32], (String, StoredPassword)>>,
    /// One argon2 check at a time (each holds its `m_cost` of memory).
    one_at_a_time: Mutex<()>,
    /// Checks of tokens not remembered, per client address: beyond 5 a second (burst 10) a
    /// token is refused unchecked with `429` (a guesser cannot keep a core busy, and uses up
    /// only its own address's checks).
    checks: DefaultKeyedRateLimiter<IpAddr>,
}

/// Client addresses the check limiter keeps before it forgets the idle ones.
const CHECKERS: usize = 4096;

static CHECKED: LazyLock<Checked> = LazyLock::new(|| Checked {
    remembered: Mutex::new(HashMap::new()),
    one_at_a_time: Mutex::new(()),
    checks: DefaultKeyedRateLimiter::keyed(
        Quota::per_second(std::num::NonZeroU32::new(5).expect("non-zero"))
            .allow_burst(std::num::NonZeroU32::new(10).expect("non-zero")),
    ),
});

/// Whether `ask` may do what needs `role` under `config`; the answer to send when not.
pub fn authorize(ask: &Ask<'_>, config: &Config, role: Role) -> Result<Caller, Answer> {
    if config.admin_tokens.is_empty() {
        if role == Role::Control && !ask.from_loopback {
            return Err(Answer::text(
                403,
                "changes only from loopback, or with a control token ([[admin.token]])\n",
            ));
        }
        return Ok(Caller::Anonymous);
    }
    let bearer = ask
        .authorization
        .and_then(|value| value.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|token| !token.is_empty());
    let Some(token) = bearer else {
        return Err(unauthorized(
            "a Bearer token is required (Authorization: Bearer TOKEN)\n",
        ));
    };
    let (name, granted) = match verify(config, token, ask.peer.ip().to_canonical()) {
        Verified::Token(name, role) => (name, role),
        Verified::Invalid => return Err(unauthorized("the token is not valid\n")),
        Verified::TooMany => {
            let mut answer = Answer::text(
                429,
                "too many token checks from this address; try again in a second\n",
            );
            answer.header = Some(("retry-after", "1"));
            return Err(answer);
        }
    };
    if granted < role {
        return Err(Answer::text(403, format!("token {name:?} may only read\n")));
    }
    Ok(Caller::Token(name))
}

fn unauthorized(why: &str) -> Answer {
    let mut answer = Answer::text(401, why);
    answer.header = Some(("www-authenticate", "Bearer realm=\"portcullis\""));
    answer
}

/// What a token check found.
enum Verified {
    /// A configured token: its name and role.
    Token(String, Role),
    Invalid,
    /// Not checked: `from` asked too often.
    TooMany,
}

/// The name and role of the configured token `token` is, if any; `from` is the client's
/// address (the check limiter's key).
fn verify(config: &Config, token: &str, from: IpAddr) -> Verified {
    let Ok(key) = <[u8; 32]>::try_from(
        ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref(),
    ) else {
        return Verified::Invalid;
    };
    let checked = &*CHECKED;
    let remembered = checked
        .remembered
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .cloned();
    if let Some((name, matched)) = remembered {
        // Still configured with the same hash? (A reload may have removed or changed it.)
        let still = config
            .admin_tokens
            .iter()
            .find(|t| t.name == name && t.hash.same_as(&matched));
        if let Some(t) = still {
            return Verified::Token(name, t.role);
        }
    }
    if checked.checks.len() > CHECKERS {
        checked.checks.retain_recent();
    }
    if checked.checks.check_key(&from).is_err() {
        return Verified::TooMany;
    }
    let _one = checked
        .one_at_a_time
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let Some(found) = config.admin_tokens.iter().find(|t| t.hash.verify(token)) else {
        return Verified::Invalid;
    };
    let mut remembered = checked.remembered.lock().unwrap_or_else(|e| e.into_inner());
    if remembered.len() >= REMEMBERED {
        remembered.clear();
    }
    remembered.insert(key, (found.name.clone(), found.hash.clone()));
    Verified::Token(found.name.clone(), found.role)
}
