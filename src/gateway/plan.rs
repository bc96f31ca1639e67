//! Admission's decision, as a value: is the client allowed, who is it, what does the
//! policy say, and which of the target's addresses may be dialled. Shared by the data path and
//! `portcullis explain`, so an explanation cannot drift from what the gateway does.

use super::Snapshot;
use super::identity;
use super::refusal::{End, Refusal};
use super::resolve::ResolveError;
use crate::config::{ChosenBy, Egress, Identity};
use crate::policy::destination;
use crate::policy::host::{Host, Target};
use crate::policy::{
    BESIDE_PRIVATE_ENDPOINT, DENIED_ADDRESS, Decision, Learn, Mode, OUTSIDE_SERVICE_TAGS, Verdict,
};
use std::net::IpAddr;
use std::time::Duration;
use tokio::time::Instant;

/// One address a name resolved to, and whether the destination wall lets it through.
#[derive(Debug)]
pub struct Candidate {
    pub ip: IpAddr,
    /// `Err(range)` when refused.
    pub vetted: Result<(), &'static str>,
}

/// Everything decided about a request before any upstream connection: what `explain` prints and
/// what the data path acts on.
#[derive(Debug)]
pub struct Plan<'g> {
    pub client_allowed: bool,
    /// Whom the request runs as, once the client is known and admitted.
    pub identity: Option<Identity>,
    pub decision: Decision<'g>,
    /// Where the addresses came from: "literal", "override" or "dns".
    pub source: Option<&'static str>,
    pub candidates: Vec<Candidate>,
    /// How long name resolution took (names only; overrides included).
    pub resolve_time: Option<Duration>,
    /// Set when the request must be refused; otherwise dial the candidates that passed.
    pub refusal: Option<Refusal>,
    /// The way out, and who chose it; `None` without egresses (the direct way of old).
    pub egress: Option<(&'g Egress, ChosenBy)>,
}

impl Plan<'_> {
    pub fn dialable(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.candidates
            .iter()
            .filter(|c| c.vetted.is_ok())
            .map(|c| c.ip)
    }
}

/// The plan for a CONNECT (`lane` false) or a plain-HTTP lane request (`lane` true): is
/// the client allowed, does the policy allow the target, and which of its
/// addresses may be dialled.
pub async fn plan<'g>(
    snapshot: &'g Snapshot,
    client: IpAddr,
    who: Result<Identity, identity::Refused>,
    target: &Target,
    lane: bool,
) -> Plan<'g> {
    // An unidentified client is refused below; its decision sees only branch-less denies.
    let scope = match &who {
        Ok(identity) => snapshot.config.scope(*identity),
        Err(_) => crate::policy::Scope::default(),
    };
    let mut decision = snapshot
        .config
        .policy
        .decide(&target.host, target.port, scope);
    // Plain-HTTP rules (revocation lists, OCSP) are served by the lane only, and the lane only
    // serves them: decided here, before any lookup or dial, and logged as the denial it is.
    let lane_rule = decision.rule.is_some_and(|r| r.plain_http);
    if decision.verdict == Verdict::Allow && lane_rule != lane {
        decision.verdict = Verdict::Deny;
        decision.reason = if lane_rule {
            "plain-HTTP host: only GET, HEAD or OCSP POST through the proxy"
        } else {
            "not allowed as plain HTTP"
        };
    }
    let mut plan = Plan {
        client_allowed: snapshot.client_allowed(client),
        identity: None,
        resolve_time: None,
        decision,
        source: None,
        candidates: Vec::new(),
        refusal: None,
        egress: None,
    };
    if !plan.client_allowed {
        plan.refusal = Some(Refusal::new(
            End::ClientDenied,
            "client address not allowed",
        ));
        return plan;
    }
    match who {
        Ok(identity) => {
            plan.identity = Some(identity);
            // Only `enforce` asks before the dial; `record` notes the tunnel once it is open.
            if let Some(rule) = decision.rule
                && rule.learn == Learn::Enforce
                && let Some(name) = rule.learns(&target.host)
            {
                let branch = snapshot.config.branch_name(identity);
                if !snapshot
                    .learned
                    .knows(branch, &rule.name, name.as_str(), target.port)
                {
                    decision = not_learned(decision, snapshot.config.policy.mode);
                    plan.decision = decision;
                }
            }
        }
        Err(refused) => {
            plan.refusal = Some(Refusal::unidentified(
                refused,
                snapshot.identifier.accepts_credentials(),
            ));
            return plan;
        }
    }
    if decision.verdict == Verdict::Deny {
        let end = match decision.reason {
            NOT_LEARNED => End::NotLearned,
            _ => End::PolicyDenied,
        };
        plan.refusal = Some(Refusal::new(end, decision.why()));
        return plan;
    }
    plan.egress = snapshot.config.egresses.for_request(
        decision.rule,
        &snapshot.config.branches,
        plan.identity,
    );
    let addrs = match &target.host {
        Host::Ip(ip) => {
            plan.source = Some("literal");
            vec![*ip]
        }
        Host::Name(name) => {
            let resolving = snapshot.resolver.resolve(name, plan.egress.map(|(e, _)| e));
            match timed(&mut plan.resolve_time, resolving).await {
                Ok((addrs, source)) => {
                    plan.source = Some(source.as_str());
                    addrs
                }
                Err(e) => {
                    let end = match e {
                        ResolveError::Timeout => End::DnsTimeout,
                        _ => End::DnsFailed,
                    };
                    let mut refusal = Refusal::new(end, format!("cannot resolve host: {e}"));
                    // An encrypted resolver that fails or is not trusted: 504, never clear text.
                    refusal.status = Some(e.status());
                    plan.refusal = Some(refusal);
                    return plan;
                }
            }
        }
    };
    let addrs = match plan.egress {
        Some((egress, _)) => match of_families(addrs, egress) {
            Ok(addrs) => addrs,
            Err(refusal) => {
                plan.refusal = Some(refusal);
                return plan;
            }
        },
        None => addrs,
    };
    vet(snapshot, &mut plan, addrs, target.port, scope);
    plan
}

/// The addresses `egress` may dial (its families); refused when none is left. Overrides and
/// IP literals pass here too, so an IPv4-only egress never dials an IPv6 address.
fn of_families(mut addrs: Vec<IpAddr>, egress: &Egress) -> Result<Vec<IpAddr>, Refusal> {
    addrs.retain(|ip| egress.allows(*ip));
    if addrs.is_empty() {
        return Err(Refusal::new(
            End::DnsFailed,
            format!(
                "no address the egress may dial ({} is {})",
                egress.name,
                egress.families()
            ),
        ));
    }
    Ok(addrs)
}

/// A private endpoint (an address the rule lists in `private_addresses`) is dialled directly,
/// never through parents: when its egress has parents, its other addresses are refused, so
/// none of them leaves without the parents.
fn keep_private_endpoint(plan: &mut Plan<'_>) {
    let (Some((egress, _)), Some(rule)) = (plan.egress, plan.decision.rule) else {
        return;
    };
    if egress.via.is_empty() {
        return;
    }
    if !plan.dialable().any(|ip| rule.is_private_endpoint(ip)) {
        return;
    }
    for candidate in &mut plan.candidates {
        if candidate.vetted.is_ok() && !rule.is_private_endpoint(candidate.ip) {
            candidate.vetted = Err(BESIDE_PRIVATE_ENDPOINT);
        }
    }
}

/// Vets each of `addrs`: the destination wall (the rule's CIDRs open it), the rule's service
/// tags, and deny rules' addresses; sets the refusal when none may be dialled.
fn vet<'g>(
    snapshot: &'g Snapshot,
    plan: &mut Plan<'g>,
    addrs: Vec<IpAddr>,
    port: u16,
    scope: crate::policy::Scope<'_>,
) {
    let decision = plan.decision;
    // Deny rules' addresses hold for every address the gateway would dial, beside the wall.
    let policy = &snapshot.config.policy;
    let mut denied_by = None;
    plan.candidates = addrs
        .into_iter()
        .map(|ip| {
            let vetted =
                destination::vet(ip, decision.reachable).and_then(|()| match decision.rule {
                    Some(rule) if !rule.in_service_tags(ip) => Err(OUTSIDE_SERVICE_TAGS),
                    _ => Ok(()),
                });
            let denied = policy.denied_address(ip, port, scope);
            denied_by = denied_by.or(denied);
            let vetted = match denied {
                Some(_) if policy.mode == Mode::Enforce => vetted.and(Err(DENIED_ADDRESS)),
                _ => vetted,
            };
            // Vetted as given (the wall names IPv4-embedding forms as such); an IPv4-mapped
            // address is IPv4 on the wire, so it is bound and dialled as the IPv4 it is (the
            // egress's families take it as IPv4 too).
            Candidate {
                ip: ip.to_canonical(),
                vetted,
            }
        })
        .collect();
    keep_private_endpoint(plan);
    if let Some(deny) = denied_by {
        // Report mode lets it through as `would_deny`, as it does a deny rule's host.
        if policy.mode == Mode::Report {
            plan.decision.verdict = Verdict::WouldDeny;
            plan.decision.deny_rule = Some(deny);
        } else if plan.dialable().next().is_none()
            && plan
                .candidates
                .iter()
                .any(|c| c.vetted == Err(DENIED_ADDRESS))
        {
            plan.decision.verdict = Verdict::Deny;
            plan.decision.rule = None;
            plan.decision.deny_rule = Some(deny);
            plan.refusal = Some(Refusal::new(End::PolicyDenied, plan.decision.why()));
            return;
        }
    }
    if plan.dialable().next().is_none() {
        let range = plan
            .candidates
            .iter()
            .find_map(|c| c.vetted.err())
            .unwrap_or("none");
        let reason = match decision.rule {
            Some(rule) if range == OUTSIDE_SERVICE_TAGS => format!(
                "destination address outside service tag {}",
                rule.service_tags.join(", ")
            ),
            _ => format!("destination address forbidden ({range})"),
        };
        plan.refusal = Some(Refusal::new(End::DestinationForbidden, reason));
    }
}

/// Why a `learn = "enforce"` rule refuses a name the branch did not learn.
pub const NOT_LEARNED: &str = "destination not learned for this branch";

/// `decision` for a name its rule does not know for the branch: denied (the rule still
/// named), or in report mode let through as `would_deny`.
fn not_learned(mut decision: Decision<'_>, mode: Mode) -> Decision<'_> {
    decision.verdict = match mode {
        Mode::Enforce => Verdict::Deny,
        Mode::Report => Verdict::WouldDeny,
    };
    decision.reason = NOT_LEARNED;
    decision
}

/// Awaits `work`, storing how long it took.
async fn timed<T>(took: &mut Option<Duration>, work: impl std::future::Future<Output = T>) -> T {
    let started = Instant::now();
    let out = work.await;
    *took = Some(started.elapsed());
    out
}
