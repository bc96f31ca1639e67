//! Why a request got no tunnel, or why a tunnel closed early: how it ends ([`End`]: the log
//! line's `end`, the metric label, the status), and a short reason of our own wording (never
//! client text) for the `Portcullis-Error` header, the body and the log line.

use super::identity::Refused;
use super::request::HeadError;
pub use crate::end::End;
use std::borrow::Cow;

/// Refuses a connection nothing was read from yet: its status (if its end has one) within a
/// second, then close; one access line.
pub(super) async fn refuse_unread(
    snapshot: &super::Snapshot,
    mut client: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    conn_id: u64,
    started: tokio::time::Instant,
    refusal: Refusal,
) {
    use tokio::io::AsyncWriteExt;
    let mut sent = 0;
    if let Some(status) = refusal.status {
        let reply = super::replies::write_error(&mut client, status, &refusal.reason);
        let wait = std::time::Duration::from_secs(1);
        if let Ok(Ok(())) = tokio::time::timeout(wait, reply).await {
            sent = status;
        }
    }
    let _ = client.shutdown().await;
    log_unread(snapshot, conn_id, peer, refusal, sent, started);
}

/// The access line of a connection refused before its request was read (`status`: what was
/// sent, 0 for nothing).
pub(super) fn log_unread(
    snapshot: &super::Snapshot,
    conn_id: u64,
    peer: std::net::SocketAddr,
    refusal: Refusal,
    status: u16,
    started: tokio::time::Instant,
) {
    let reason = refusal.reason.into_owned();
    crate::access_log::AccessRecord::before_request(
        conn_id,
        peer,
        refusal.end,
        reason,
        status,
        started.elapsed(),
    )
    .finish(&snapshot.metrics);
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub end: End,
    /// Status to answer with; `None` when the answer went out already or the client is gone.
    pub status: Option<u16>,
    /// Sent in `Portcullis-Error` and the body; never client-supplied text.
    pub reason: Cow<'static, str>,
}

impl Refusal {
    /// A refusal answered with the status its end calls for.
    pub fn new(end: End, reason: impl Into<Cow<'static, str>>) -> Self {
        Self {
            end,
            status: end.status(),
            reason: reason.into(),
        }
    }

    /// A failure after which no answer can be sent (the 200 went out, or the client left).
    pub fn after_reply(end: End, reason: impl Into<Cow<'static, str>>) -> Self {
        Self {
            end,
            status: None,
            reason: reason.into(),
        }
    }

    /// An unknown or unproven client: 407 where credentials could identify it, else 403.
    pub fn unidentified(refused: Refused, accepts_credentials: bool) -> Self {
        match refused {
            Refused::MalformedCredentials => {
                Self::new(End::AuthFailed, "malformed proxy credentials")
            }
            Refused::WrongCredentials => Self::new(End::AuthFailed, "invalid proxy credentials"),
            Refused::TooManyAttempts => {
                Self::new(End::AuthRateLimited, "too many authentication attempts")
            }
            Refused::ChecksBusy => Self::new(
                End::AuthRateLimited,
                "too many authentication attempts in progress",
            ),
            Refused::NoBranch if accepts_credentials => {
                Self::new(End::AuthRequired, "proxy authentication required")
            }
            Refused::NoBranch => Self::new(End::NoBranch, "client matches no branch"),
        }
    }
}

impl From<HeadError> for Refusal {
    fn from(e: HeadError) -> Self {
        let reason = match &e {
            // Keep our wording: the method text came from the client.
            HeadError::Method(_) => Cow::Borrowed("method not allowed: only CONNECT"),
            HeadError::Malformed(why) => Cow::Borrowed(*why),
            other => Cow::Owned(other.to_string()),
        };
        Self::new(e.end(), reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_answer_with_their_ends_status_unless_the_answer_went_out() {
        let denied = Refusal::new(End::PolicyDenied, "host not allowed");
        assert_eq!(
            (denied.status, denied.end.as_str()),
            (Some(403), "policy_denied")
        );
        let late = Refusal::after_reply(End::UpstreamError, "upstream write failed");
        assert_eq!(late.status, None);
        let slow: Refusal = HeadError::Timeout.into();
        assert_eq!((slow.status, slow.end), (Some(408), End::HeadTimeout));
        let method: Refusal = HeadError::Method("PUT".into()).into();
        assert_eq!(method.reason, "method not allowed: only CONNECT");
        let anonymous = Refusal::unidentified(Refused::NoBranch, true);
        assert_eq!(
            (anonymous.status, anonymous.end),
            (Some(407), End::AuthRequired)
        );
        let stranger = Refusal::unidentified(Refused::NoBranch, false);
        assert_eq!((stranger.status, stranger.end), (Some(403), End::NoBranch));
    }
}
