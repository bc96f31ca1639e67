//! How a connection ends: one enum for the log line's `end` field, the `requests_total` metric
//! label and the status a refusal answers with, for the gateway and the branch agent alike.
//! The names are an API (dashboards and tests read them); docs/reference/observability.md
//! lists every one, and a test holds the two to the same set.
//!
//! One table below defines every end: its name, the status a refusal answers with while an
//! answer can still be sent (`None` for ends after the answer or with nobody left to answer),
//! and whether it is a denial. `ALL`, `as_str`, `status` and `is_denial` derive from it, so a
//! new end is one line.

/// Builds [`End`] and its derived lists from one table of
/// `Variant => "name", status, denial|outcome;` rows.
macro_rules! ends {
    ($( $(#[$attr:meta])* $variant:ident => $name:literal, $status:expr, $kind:ident; )*) => {
        /// The way one client connection ended.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
        pub enum End {
            $( $(#[$attr])* $variant, )*
        }

        impl End {
            /// Every way to end, for tests and documentation.
            pub const ALL: &[End] = &[$(End::$variant),*];

            /// The name in the log line and the metric label.
            pub fn as_str(self) -> &'static str {
                match self { $(End::$variant => $name,)* }
            }

            /// The status a refusal that ends this way answers with, while an answer can still
            /// be sent; `None` for ends that come after the answer or leave nobody to answer.
            pub fn status(self) -> Option<u16> {
                match self { $(End::$variant => $status,)* }
            }

            /// The gateway said no for a security or policy reason (who the client is, where it
            /// wants to go, what the tunnel carries, a limit): what the dashboard's "Denied"
            /// panel and a security team's alerts count, whatever the policy verdict was (the
            /// destination wall refuses what the allow-list allowed).
            pub fn is_denial(self) -> bool {
                match self { $(End::$variant => ends!(@denial $kind),)* }
            }
        }
    };
    (@denial denial) => { true };
    (@denial outcome) => { false };
}

ends! {
    // A tunnel that was up (after the 200).
    /// Both sides closed their sending half.
    #[default]
    Closed => "closed", None, outcome;
    /// No bytes either way for the idle timeout.
    IdleTimeout => "idle_timeout", None, outcome;
    /// Reading from or writing to the client failed (reset, broken pipe), or it left before
    /// its answer.
    ClientError => "client_error", None, outcome;
    /// Reading from or writing to the upstream failed (502 on the plain-HTTP lane).
    UpstreamError => "upstream_error", Some(502), outcome;
    /// A reload's new policy denies it (`on_reload = "close-denied"`).
    ClosedByReload => "closed_by_reload", None, outcome;
    /// Still open when the shutdown's drain timeout ran out.
    DrainTimeout => "drain_timeout", None, outcome;
    /// An operator closed it (`POST /tunnels/close`, `portcullis close`).
    ClosedByOperator => "closed_by_operator", None, outcome;
    /// Its branch is draining: a new request is refused (503 with `Retry-After`), an open
    /// tunnel is closed at the drain's deadline.
    BranchDrained => "branch_drained", Some(503), outcome;
    /// Its branch is quarantined: refused, and open tunnels closed at once.
    BranchQuarantined => "branch_quarantined", Some(403), denial;
    /// A reload removed or changed how its client was identified as its branch (a credential,
    /// a certificate name, a source network).
    IdentityRevoked => "identity_revoked", None, denial;
    // The SNI check inside the tunnel (after the 200, so no status).
    SniMismatch => "sni_mismatch", None, denial;
    SniMissing => "sni_missing", None, denial;
    NotTls => "not_tls", None, denial;
    // Before the request head, or instead of one.
    ProxyProtocolError => "proxy_protocol_error", None, outcome;
    TlsHandshakeFailed => "tls_handshake_failed", None, outcome;
    ClientClosed => "client_closed", None, outcome;
    ClientRead => "client_read", None, outcome;
    /// `log.on_write_failure = "fail-closed"` and the access file cannot be written.
    AccessLogUnavailable => "access_log_unavailable", Some(503), outcome;
    PendingHeadsLimit => "pending_heads_limit", Some(429), denial;
    HeadTimeout => "head_timeout", Some(408), outcome;
    HeadTooLarge => "head_too_large", Some(431), outcome;
    BadRequest => "bad_request", Some(400), outcome;
    MethodNotAllowed => "method_not_allowed", Some(405), outcome;
    // Who the client is.
    ClientDenied => "client_denied", Some(403), denial;
    NoBranch => "no_branch", Some(403), denial;
    AuthRequired => "auth_required", Some(407), denial;
    AuthFailed => "auth_failed", Some(407), denial;
    AuthRateLimited => "auth_rate_limited", Some(429), denial;
    RateLimited => "rate_limited", Some(429), denial;
    BranchTunnelLimit => "branch_tunnel_limit", Some(429), denial;
    // What the policy and the destination wall say.
    PolicyDenied => "policy_denied", Some(403), denial;
    DestinationForbidden => "destination_forbidden", Some(403), denial;
    /// A `learn = "enforce"` rule: the branch never used this name under the rule.
    NotLearned => "not_learned", Some(403), denial;
    // Resolving and dialling.
    DnsFailed => "dns_failed", Some(502), outcome;
    DnsTimeout => "dns_timeout", Some(504), outcome;
    ConnectFailed => "connect_failed", Some(502), outcome;
    ConnectTimeout => "connect_timeout", Some(504), outcome;
    /// The egress's source address is not on this host (any more): nothing left from another.
    EgressUnavailable => "egress_unavailable", Some(502), outcome;
    /// A parent proxy answered the CONNECT with an error status (passed back; never failed over).
    ParentRefused => "parent_refused", Some(502), outcome;
    /// Every parent proxy failed and the egress does not fall back to direct.
    ParentUnavailable => "parent_unavailable", Some(502), outcome;
    // The plain-HTTP lane.
    Forwarded => "forwarded", None, outcome;
    CacheHit => "cache_hit", None, outcome;
    UpstreamTimeout => "upstream_timeout", Some(504), outcome;
    // The branch agent's forwarder.
    NoGateway => "no_gateway", Some(502), outcome;
    GatewayTimeout => "gateway_timeout", Some(504), outcome;
    RefusedByGateway => "refused_by_gateway", None, outcome;
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn names_are_unique_and_statuses_are_errors() {
        let names: BTreeSet<&str> = End::ALL.iter().map(|e| e.as_str()).collect();
        assert_eq!(names.len(), End::ALL.len());
        for end in End::ALL {
            if let Some(status) = end.status() {
                assert!((400..600).contains(&status), "{end}: {status}");
            }
        }
    }
}
