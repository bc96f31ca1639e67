//! How a connection ends: one enum for the log line's `end` field, the `requests_total` metric
//! label and the status a refusal answers with, for the gateway and the branch agent alike.
//! The names are an API (dashboards and tests read them); README.md lists every one, and a
//! test holds the two to the same set.

/// The way one client connection ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum End {
    // A tunnel that was up (after the 200).
    /// Both sides closed their sending half.
    #[default]
    Closed,
    /// No bytes either way for the idle timeout.
    IdleTimeout,
    /// Reading from or writing to the client failed (reset, broken pipe), or it left before
    /// its answer.
    ClientError,
    /// Reading from or writing to the upstream failed (502 on the plain-HTTP lane).
    UpstreamError,
    /// A reload's new policy denies it (`on_reload = "close-denied"`).
    ClosedByReload,
    /// Still open when the shutdown's drain timeout ran out.
    DrainTimeout,
    // The SNI check inside the tunnel (after the 200, so no status).
    SniMismatch,
    SniMissing,
    NotTls,
    // Before the request head, or instead of one.
    ProxyProtocolError,
    TlsHandshakeFailed,
    ClientClosed,
    ClientRead,
    PendingHeadsLimit,
    HeadTimeout,
    HeadTooLarge,
    BadRequest,
    MethodNotAllowed,
    // Who the client is.
    ClientDenied,
    NoBranch,
    AuthRequired,
    AuthFailed,
    AuthRateLimited,
    RateLimited,
    BranchTunnelLimit,
    // What the policy and the destination wall say.
    PolicyDenied,
    DestinationForbidden,
    /// A `learn = "enforce"` rule: the branch never used this name under the rule.
    NotLearned,
    // Resolving and dialling.
    DnsFailed,
    DnsTimeout,
    ConnectFailed,
    ConnectTimeout,
    // The plain-HTTP lane.
    Forwarded,
    CacheHit,
    UpstreamTimeout,
    // The branch agent's forwarder.
    NoGateway,
    GatewayTimeout,
    RefusedByGateway,
}

impl End {
    /// Every way to end, for tests and documentation.
    pub const ALL: &[End] = &[
        End::Closed,
        End::IdleTimeout,
        End::ClientError,
        End::UpstreamError,
        End::ClosedByReload,
        End::DrainTimeout,
        End::SniMismatch,
        End::SniMissing,
        End::NotTls,
        End::ProxyProtocolError,
        End::TlsHandshakeFailed,
        End::ClientClosed,
        End::ClientRead,
        End::PendingHeadsLimit,
        End::HeadTimeout,
        End::HeadTooLarge,
        End::BadRequest,
        End::MethodNotAllowed,
        End::ClientDenied,
        End::NoBranch,
        End::AuthRequired,
        End::AuthFailed,
        End::AuthRateLimited,
        End::RateLimited,
        End::BranchTunnelLimit,
        End::PolicyDenied,
        End::DestinationForbidden,
        End::NotLearned,
        End::DnsFailed,
        End::DnsTimeout,
        End::ConnectFailed,
        End::ConnectTimeout,
        End::Forwarded,
        End::CacheHit,
        End::UpstreamTimeout,
        End::NoGateway,
        End::GatewayTimeout,
        End::RefusedByGateway,
    ];

    /// The name in the log line and the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::IdleTimeout => "idle_timeout",
            End::ClientError => "client_error",
            End::UpstreamError => "upstream_error",
            End::ClosedByReload => "closed_by_reload",
            End::DrainTimeout => "drain_timeout",
            End::SniMismatch => "sni_mismatch",
            End::SniMissing => "sni_missing",
            End::NotTls => "not_tls",
            End::ProxyProtocolError => "proxy_protocol_error",
            End::TlsHandshakeFailed => "tls_handshake_failed",
            End::ClientClosed => "client_closed",
            End::ClientRead => "client_read",
            End::PendingHeadsLimit => "pending_heads_limit",
            End::HeadTimeout => "head_timeout",
            End::HeadTooLarge => "head_too_large",
            End::BadRequest => "bad_request",
            End::MethodNotAllowed => "method_not_allowed",
            End::ClientDenied => "client_denied",
            End::NoBranch => "no_branch",
            End::AuthRequired => "auth_required",
            End::AuthFailed => "auth_failed",
            End::AuthRateLimited => "auth_rate_limited",
            End::RateLimited => "rate_limited",
            End::BranchTunnelLimit => "branch_tunnel_limit",
            End::PolicyDenied => "policy_denied",
            End::DestinationForbidden => "destination_forbidden",
            End::NotLearned => "not_learned",
            End::DnsFailed => "dns_failed",
            End::DnsTimeout => "dns_timeout",
            End::ConnectFailed => "connect_failed",
            End::ConnectTimeout => "connect_timeout",
            End::Forwarded => "forwarded",
            End::CacheHit => "cache_hit",
            End::UpstreamTimeout => "upstream_timeout",
            End::NoGateway => "no_gateway",
            End::GatewayTimeout => "gateway_timeout",
            End::RefusedByGateway => "refused_by_gateway",
        }
    }

    /// The status a refusal that ends this way answers with, while an answer can still be
    /// sent; `None` for ends that come after the answer or leave nobody to answer.
    pub fn status(self) -> Option<u16> {
        Some(match self {
            End::BadRequest => 400,
            End::ClientDenied
            | End::NoBranch
            | End::PolicyDenied
            | End::DestinationForbidden
            | End::NotLearned => 403,
            End::MethodNotAllowed => 405,
            End::AuthRequired | End::AuthFailed => 407,
            End::HeadTimeout => 408,
            End::AuthRateLimited
            | End::RateLimited
            | End::BranchTunnelLimit
            | End::PendingHeadsLimit => 429,
            End::HeadTooLarge => 431,
            End::DnsFailed | End::ConnectFailed | End::UpstreamError | End::NoGateway => 502,
            End::DnsTimeout | End::ConnectTimeout | End::UpstreamTimeout | End::GatewayTimeout => {
                504
            }
            End::Closed
            | End::IdleTimeout
            | End::ClientError
            | End::ClosedByReload
            | End::DrainTimeout
            | End::SniMismatch
            | End::SniMissing
            | End::NotTls
            | End::ProxyProtocolError
            | End::TlsHandshakeFailed
            | End::ClientClosed
            | End::ClientRead
            | End::Forwarded
            | End::CacheHit
            | End::RefusedByGateway => return None,
        })
    }
}

impl End {
    /// The gateway said no for a security or policy reason (who the client is, where it wants
    /// to go, what the tunnel carries, a limit): what the dashboard's "Denied" panel and a
    /// security team's alerts count, whatever the policy verdict was (the destination wall
    /// refuses what the allow-list allowed).
    pub fn is_denial(self) -> bool {
        matches!(
            self,
            End::ClientDenied
                | End::NoBranch
                | End::AuthRequired
                | End::AuthFailed
                | End::AuthRateLimited
                | End::RateLimited
                | End::BranchTunnelLimit
                | End::PendingHeadsLimit
                | End::PolicyDenied
                | End::DestinationForbidden
                | End::NotLearned
                | End::SniMismatch
                | End::SniMissing
                | End::NotTls
        )
    }
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

    /// The backticked names in one column of the Markdown table under `heading` in README.md.
    fn readme_column(heading: &str, column: usize) -> BTreeSet<String> {
        let readme = include_str!("../README.md");
        let section = readme
            .split(heading)
            .nth(1)
            .unwrap_or_else(|| panic!("README.md has no {heading:?}"));
        section
            .lines()
            .map(str::trim_start)
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .skip(2)
            .filter_map(|row| row.split('|').nth(column + 1).map(str::to_owned))
            .flat_map(|cell| {
                cell.split('`')
                    .skip(1)
                    .step_by(2)
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The Grafana dashboard's "Denied" panel selects `end=~"a|b|..."`: exactly the denials.
    #[test]
    fn the_dashboard_counts_every_denial_and_nothing_else() {
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../docker/grafana-dashboard.json")).unwrap();
        let panel = dashboard["panels"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["title"].as_str().is_some_and(|t| t.starts_with("Denied")))
            .expect("a Denied panel");
        let expr = panel["targets"][0]["expr"].as_str().unwrap();
        let selected: BTreeSet<&str> = expr
            .split("end=~\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("an end=~ selector")
            .split('|')
            .collect();
        let denials: BTreeSet<&str> = End::ALL
            .iter()
            .filter(|e| e.is_denial())
            .map(|e| e.as_str())
            .collect();
        assert_eq!(selected, denials, "{expr}");
    }

    #[test]
    fn the_readme_lists_every_end_and_no_other() {
        let mut documented = readme_column("## Replies and log line", 2);
        documented.extend(readme_column("How a forwarded request ends", 0));
        let ends: BTreeSet<String> = End::ALL.iter().map(|e| e.as_str().to_owned()).collect();
        assert_eq!(documented, ends, "README.md's `end` tables and End differ");
    }

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
