//! The data path for one client connection, top to bottom: read the head, decide, resolve and
//! vet, dial, answer 200, tunnel, log. Every failure becomes one `Refusal` carrying the status
//! to send (if a reply can still be sent) and a stable kind for logs.

use crate::access_log::AccessRecord;
use crate::config::Config;
use crate::destination;
use crate::hostname::{Host, Target};
use crate::identity::{self, Identifier, Identity};
use crate::lane;
use crate::policy::{Decision, Verdict};
use crate::request::{self, HeadError};
use crate::resolve::{ResolveError, Resolver};
use crate::sni::{self, Hello, SniMode};
use crate::stream::ClientStream;
use crate::throttle::Paced;
use crate::tunnel;
use governor::{DefaultKeyedRateLimiter, Quota};
use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

/// What every connection shares: the compiled config, the resolver, who-is-who, and the
/// counters behind per-branch and per-client limits.
pub struct Gateway {
    pub config: Config,
    pub resolver: Resolver,
    pub identifier: Identifier,
    /// Open tunnels per branch, by branch position (only counted where a limit is set). Shared
    /// by name with the snapshot a reload replaces, so limits hold across reloads.
    open_tunnels: Vec<Arc<AtomicU32>>,
    /// One acceptor per `listen.tls_proxy` entry, built from the files at load (and reload).
    pub tls_acceptors: Vec<Arc<TlsAcceptor>>,
    /// Shared by every snapshot: counters survive reloads.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Open tunnels a reload may close (tracked only under `on_reload = "close-denied"`);
    /// shared by every snapshot.
    pub revocable: Arc<Revocable>,
    /// Fresh CRL answers of the plain-HTTP lane.
    pub crl_cache: lane::CrlCache,
    /// Bandwidth budgets of the schedules; buckets carry over reloads by budget.
    pub throttles: crate::throttle::Throttles,
    /// CONNECT requests per client address, when `limits.connect_rate_per_client` is set.
    connect_rate: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

impl Gateway {
    pub fn new(config: Config) -> Result<Self, String> {
        Self::replacing(config, None)
    }

    /// A snapshot that takes over from `previous` (a reload): branch tunnel counters carry over
    /// by branch name; everything else is built afresh from `config` and the files it names.
    pub fn replacing(config: Config, previous: Option<&Gateway>) -> Result<Self, String> {
        let resolver = Resolver::new(&config.resolver)?;
        let identifier = Identifier::new(&config);
        let open_tunnels = config
            .branches
            .iter()
            .map(|b| {
                previous
                    .and_then(|p| {
                        let i = p
                            .config
                            .branches
                            .iter()
                            .position(|old| old.name == b.name)?;
                        Some(p.open_tunnels[i].clone())
                    })
                    .unwrap_or_default()
            })
            .collect();
        let tls_acceptors = match &config.tls {
            None => Vec::new(),
            Some(settings) => config
                .listen
                .tls_proxy
                .iter()
                .map(|l| crate::tls::acceptor(settings, l.client_certificates).map(Arc::new))
                .collect::<Result<_, _>>()?,
        };
        let connect_rate = config
            .limits
            .connect_rate_per_client
            .map(|rate| DefaultKeyedRateLimiter::keyed(Quota::per_second(rate)));
        let metrics: Arc<crate::metrics::Metrics> =
            previous.map_or_else(Default::default, |p| p.metrics.clone());
        // Built last (nothing after can fail): taking over a bucket retunes it for everyone.
        let branch_names: Vec<&str> = config
            .branches
            .iter()
            .map(|b| b.name.as_str())
            .chain([crate::identity::UNASSIGNED])
            .collect();
        let throttles = crate::throttle::Throttles::new(
            &config.schedules,
            &branch_names,
            previous.map(|p| &p.throttles),
            Some(metrics.clone()),
        );
        throttles.retune(jiff::Timestamp::now());
        Ok(Self {
            config,
            resolver,
            identifier,
            open_tunnels,
            tls_acceptors,
            crl_cache: lane::CrlCache::default(),
            throttles,
            metrics,
            revocable: previous.map_or_else(Default::default, |p| p.revocable.clone()),
            connect_rate,
        })
    }

    /// Forgets idle per-address rate-limit state; the server calls this now and then.
    pub fn forget_idle_counters(&self) {
        self.identifier.forget_idle_counters();
        if let Some(limiter) = &self.connect_rate {
            limiter.retain_recent();
        }
    }

    /// Counts a tunnel against its branch's `max_tunnels`; `None` when the branch is full.
    fn admit_tunnel(&self, identity: Identity) -> Option<TunnelSlot<'_>> {
        let Some(i) = identity else {
            return Some(TunnelSlot(None));
        };
        let Some(max) = self.config.branches[i].max_tunnels else {
            return Some(TunnelSlot(None));
        };
        let counter: &AtomicU32 = &self.open_tunnels[i];
        let admitted = counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then(|| open + 1)
            })
            .is_ok();
        // Built only when counted: a slot decrements when dropped.
        admitted.then(|| TunnelSlot(Some(counter)))
    }

    pub fn client_allowed(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.config
            .listen
            .clients
            .iter()
            .any(|net| net.contains(&ip))
    }
}

/// Tunnels that a reload under `on_reload = "close-denied"` may close.
#[derive(Default)]
pub struct Revocable {
    open: std::sync::Mutex<std::collections::HashMap<u64, RevocableTunnel>>,
}

struct RevocableTunnel {
    target: Target,
    branch: Option<String>,
    stop: Arc<tokio::sync::Notify>,
}

impl Revocable {
    fn register(
        &self,
        conn_id: u64,
        target: Target,
        branch: Option<String>,
    ) -> Arc<tokio::sync::Notify> {
        let stop = Arc::new(tokio::sync::Notify::new());
        let entry = RevocableTunnel {
            target,
            branch,
            stop: stop.clone(),
        };
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(conn_id, entry);
        stop
    }

    fn remove(&self, conn_id: u64) {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&conn_id);
    }

    /// Closes the open tunnels `gw`'s policy denies; returns how many.
    pub fn close_denied(&self, gw: &Gateway) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let mut closed = 0;
        for tunnel in open.values() {
            let branch = tunnel
                .branch
                .as_ref()
                .and_then(|name| gw.config.branches.iter().find(|b| &b.name == name));
            let allowed = branch.and_then(|b| b.allowed_rules.as_deref());
            let decision =
                gw.config
                    .policy
                    .decide(&tunnel.target.host, tunnel.target.port, allowed);
            if decision.verdict == Verdict::Deny {
                tunnel.stop.notify_one();
                closed += 1;
            }
        }
        closed
    }
}

/// A tunnel counted against its branch's limit until dropped.
struct TunnelSlot<'g>(Option<&'g AtomicU32>);

impl Drop for TunnelSlot<'_> {
    fn drop(&mut self) {
        if let Some(counter) = self.0 {
            counter.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Why a request got no tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Status to answer with; `None` when the client is already gone.
    pub status: Option<u16>,
    /// Stable name for logs and (later) metrics.
    pub kind: &'static str,
    /// Short human reason, sent in `Portcullis-Error` and the body; never client-supplied text.
    pub reason: Cow<'static, str>,
}

impl Refusal {
    /// A failure after which no reply can be sent (the 200 went out, or the client left).
    fn gone(kind: &'static str, reason: &'static str) -> Self {
        Self {
            status: None,
            kind,
            reason: Cow::Borrowed(reason),
        }
    }

    fn new(status: u16, kind: &'static str, reason: impl Into<Cow<'static, str>>) -> Self {
        Self {
            status: Some(status),
            kind,
            reason: reason.into(),
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
        Self {
            status: e.status(),
            kind: e.kind(),
            reason,
        }
    }
}

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
    /// The branch, once the client is known (`Some(None)`: admitted, no branch).
    pub identity: Option<Identity>,
    pub decision: Decision<'g>,
    /// Where the addresses came from: "literal", "override" or "dns".
    pub source: Option<&'static str>,
    pub candidates: Vec<Candidate>,
    /// How long name resolution took (names only; overrides included).
    pub resolve_time: Option<Duration>,
    /// Set when the request must be refused; otherwise dial the candidates that passed.
    pub refusal: Option<Refusal>,
}

impl Plan<'_> {
    pub fn dialable(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.candidates
            .iter()
            .filter(|c| c.vetted.is_ok())
            .map(|c| c.ip)
    }
}

/// Steps 3 to 5: is the client allowed, does the policy allow the target, and which of its
/// addresses may be dialled.
pub async fn plan<'g>(
    gw: &'g Gateway,
    client: IpAddr,
    who: Result<Identity, identity::Refused>,
    target: &Target,
) -> Plan<'g> {
    let allowed_rules = who
        .ok()
        .flatten()
        .and_then(|i| gw.config.branches[i].allowed_rules.as_deref());
    let decision = gw
        .config
        .policy
        .decide(&target.host, target.port, allowed_rules);
    let mut plan = Plan {
        client_allowed: gw.client_allowed(client),
        identity: None,
        resolve_time: None,
        decision,
        source: None,
        candidates: Vec::new(),
        refusal: None,
    };
    if !plan.client_allowed {
        plan.refusal = Some(Refusal::new(
            403,
            "client_denied",
            "client address not allowed",
        ));
        return plan;
    }
    match who {
        Ok(identity) => plan.identity = Some(identity),
        Err(refused) => {
            plan.refusal = Some(identity_refusal(
                refused,
                gw.identifier.accepts_credentials(),
            ));
            return plan;
        }
    }
    if decision.verdict == Verdict::Deny {
        plan.refusal = Some(Refusal::new(403, "policy_denied", decision.reason));
        return plan;
    }
    let addrs = match &target.host {
        Host::Ip(ip) => {
            plan.source = Some("literal");
            vec![*ip]
        }
        Host::Name(name) => match timed(&mut plan.resolve_time, gw.resolver.resolve(name)).await {
            Ok((addrs, source)) => {
                plan.source = Some(source.as_str());
                addrs
            }
            Err(e) => {
                let (status, kind) = match e {
                    ResolveError::Timeout => (504, "dns_timeout"),
                    ResolveError::NotFound | ResolveError::Failed(_) => (502, "dns_failed"),
                };
                plan.refusal = Some(Refusal::new(
                    status,
                    kind,
                    format!("cannot resolve host: {e}"),
                ));
                return plan;
            }
        },
    };
    plan.candidates = addrs
        .into_iter()
        .map(|ip| Candidate {
            ip,
            vetted: destination::vet(ip, decision.reachable),
        })
        .collect();
    if plan.dialable().next().is_none() {
        let range = plan
            .candidates
            .iter()
            .find_map(|c| c.vetted.err())
            .unwrap_or("none");
        plan.refusal = Some(Refusal::new(
            403,
            "destination_forbidden",
            format!("destination address forbidden ({range})"),
        ));
    }
    plan
}

fn identity_refusal(refused: identity::Refused, accepts_credentials: bool) -> Refusal {
    match refused {
        identity::Refused::MalformedCredentials => {
            Refusal::new(407, "auth_failed", "malformed proxy credentials")
        }
        identity::Refused::WrongCredentials => {
            Refusal::new(407, "auth_failed", "invalid proxy credentials")
        }
        identity::Refused::TooManyAttempts => {
            Refusal::new(429, "auth_rate_limited", "too many authentication attempts")
        }
        identity::Refused::NoBranch if accepts_credentials => {
            Refusal::new(407, "auth_required", "proxy authentication required")
        }
        identity::Refused::NoBranch => Refusal::new(403, "no_branch", "client matches no branch"),
    }
}

/// Serves one client connection and emits its canonical log line.
pub async fn serve(gw: &Gateway, mut client: TcpStream, peer: SocketAddr, conn_id: u64) {
    let started = Instant::now();
    let Some(peer) = real_client(gw, &mut client, peer, conn_id, started).await else {
        return;
    };
    serve_stream(
        gw,
        ClientStream::Plain(client),
        peer,
        conn_id,
        Vec::new(),
        started,
    )
    .await;
}

/// The client's address: the peer's own, or, for a trusted load balancer, the one its PROXY
/// protocol header names. `None` (logged) when a balancer's header is missing or malformed.
async fn real_client(
    gw: &Gateway,
    client: &mut TcpStream,
    peer: SocketAddr,
    conn_id: u64,
    started: Instant,
) -> Option<SocketAddr> {
    let balancers = &gw.config.listen.proxy_protocol_from;
    let peer_ip = peer.ip().to_canonical();
    if !balancers.iter().any(|net| net.contains(&peer_ip)) {
        return Some(peer);
    }
    match crate::proxy_protocol::read_header(client, gw.config.timeouts.head).await {
        Ok(source) => Some(source.unwrap_or(peer)),
        Err(why) => {
            AccessRecord {
                conn_id,
                client: Some(peer),
                reason: why.to_owned(),
                end: "proxy_protocol_error",
                duration: started.elapsed(),
                ..AccessRecord::default()
            }
            .finish(&gw.metrics);
            None
        }
    }
}

/// Serves one client on a TLS listener: handshake (bounded by `tls.handshake_timeout`), then
/// the same data path inside TLS, with the verified certificate's names for identity.
pub async fn serve_tls(
    gw: &Gateway,
    acceptor: &TlsAcceptor,
    mut client: TcpStream,
    peer: SocketAddr,
    conn_id: u64,
) {
    let started = Instant::now();
    let Some(peer) = real_client(gw, &mut client, peer, conn_id, started).await else {
        return;
    };
    let timeout = gw
        .config
        .tls
        .as_ref()
        .map_or(Duration::from_secs(10), |t| t.handshake_timeout);
    let failure = match tokio::time::timeout(timeout, Box::pin(acceptor.accept(client))).await {
        Ok(Ok(tls)) => {
            let names = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| crate::tls::certificate_names(leaf))
                .unwrap_or_default();
            return serve_stream(
                gw,
                ClientStream::Tls(Box::new(tls)),
                peer,
                conn_id,
                names,
                started,
            )
            .await;
        }
        Ok(Err(e)) => format!("TLS handshake failed: {e}"),
        Err(_) => "TLS handshake timed out".to_owned(),
    };
    AccessRecord {
        conn_id,
        client: Some(peer),
        reason: failure,
        end: "tls_handshake_failed",
        duration: started.elapsed(),
        ..AccessRecord::default()
    }
    .finish(&gw.metrics);
}

async fn serve_stream(
    gw: &Gateway,
    mut client: ClientStream,
    peer: SocketAddr,
    conn_id: u64,
    certificate_names: Vec<String>,
    started: Instant,
) {
    let mut record = AccessRecord {
        conn_id,
        client: Some(peer),
        ..AccessRecord::default()
    };
    let mut replied = false;
    if let Err(refusal) = handle(gw, &mut client, peer, &certificate_names, &mut record).await {
        if let Some(status) = refusal.status {
            let reply = request::write_error(&mut client, status, &refusal.reason);
            if let Ok(Ok(())) = tokio::time::timeout(REPLY_TIMEOUT, reply).await {
                record.status = status;
                replied = true;
            }
        }
        record.reason = refusal.reason.into_owned();
        record.end = refusal.kind;
    }
    record.duration = started.elapsed();
    record.finish(&gw.metrics);
    if replied {
        linger_close(client).await;
    }
}

/// Longest we wait for a client to take a ~200-byte error reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Closes after an error reply without losing it: send FIN, then read and discard what the
/// client still sends (bounded in bytes and time). Closing a socket with unread input makes the
/// kernel send RST, which can destroy the reply before the client reads it.
async fn linger_close(mut client: ClientStream) {
    use tokio::io::AsyncReadExt;
    const LINGER_BYTES: usize = 64 * 1024;
    const LINGER_TIME: Duration = Duration::from_secs(2);
    let _ = client.shutdown().await;
    let mut sink = vec![0u8; 4096];
    let mut drained = 0;
    let drain = async {
        while drained < LINGER_BYTES {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}

async fn handle(
    gw: &Gateway,
    client: &mut ClientStream,
    peer: SocketAddr,
    certificate_names: &[String],
    record: &mut AccessRecord,
) -> Result<(), Refusal> {
    let timeouts = gw.config.timeouts;
    let mut req = request::read_connect(client, timeouts.head).await?;
    record.host = Some(req.target.host.to_string());
    record.port = Some(req.target.port);
    if let Some(limiter) = &gw.connect_rate
        && limiter.check_key(&peer.ip().to_canonical()).is_err()
    {
        return Err(Refusal::new(
            429,
            "rate_limited",
            "too many requests from this client",
        ));
    }

    let who = if gw.client_allowed(peer.ip()) {
        let authorization = req.proxy_authorization.as_deref();
        gw.identifier
            .identify(&gw.config, peer.ip(), authorization, certificate_names)
            .await
    } else {
        Ok(None)
    };
    let plan = plan(gw, peer.ip(), who, &req.target).await;
    record.resolve_time = plan.resolve_time;
    if let Some(identity) = plan.identity {
        record.branch = Some(identity::name(&gw.config.branches, identity).to_owned());
        record.verdict = Some(plan.decision.verdict.as_str());
        record.rule = plan.decision.rule.map(|r| r.name.clone());
        record.category = plan.decision.rule.map(|r| r.category.clone());
    }
    if let Some(refusal) = plan.refusal {
        record.resolved = plan
            .candidates
            .first()
            .map(|c| SocketAddr::new(c.ip, req.target.port));
        return Err(refusal);
    }

    // Plain-HTTP rules (revocation lists, OCSP) are served by the lane only, and the lane only
    // serves them.
    let lane_rule = plan.decision.rule.is_some_and(|r| r.plain_http);
    if plan.decision.verdict == Verdict::Allow && lane_rule != req.forward.is_some() {
        let reason = if lane_rule {
            "plain-HTTP host: only GET, HEAD or OCSP POST through the proxy"
        } else {
            "not allowed as plain HTTP"
        };
        return Err(Refusal::new(403, "policy_denied", reason));
    }
    let identity = plan.identity.flatten();
    let Some(_slot) = gw.admit_tunnel(identity) else {
        return Err(Refusal::new(
            429,
            "branch_tunnel_limit",
            "branch tunnel limit reached",
        ));
    };

    // A fresh cached CRL answers without touching the upstream at all.
    if let Some(forward) = &req.forward
        && forward.method == "GET"
        && let Some(hit) = gw
            .crl_cache
            .get(&lane_cache_key(&req.target, &forward.path))
    {
        let mut paced = Paced::new(client, None, gates_for(gw, record).download);
        return Box::pin(send_lane_answer(
            &mut paced,
            &hit,
            true,
            "cache_hit",
            record,
        ))
        .await;
    }

    let dial_started = Instant::now();
    let dialled = dial(
        plan.dialable(),
        req.target.port,
        timeouts.connect,
        &mut record.resolved,
    )
    .await;
    record.connect_time = Some(dial_started.elapsed());
    let mut upstream = dialled?;

    if let Some(forward) = req.forward.take() {
        let host_header = match (&req.target.host, req.target.port) {
            (host, 80) => host.to_string(),
            _ => req.target.to_string(),
        };
        let body = std::mem::take(&mut req.early_data);
        drop(plan);
        // Revocation traffic obeys the schedules that list its category, like tunnels do.
        let gates = gates_for(gw, record);
        let mut paced_request = Paced::new(&mut *client, gates.upload, None);
        // Boxed: only lane requests pay for the HTTP client's future.
        let exchange = lane::fetch(
            &mut paced_request,
            upstream,
            &forward,
            &host_header,
            body,
            timeouts.head,
        );
        let fetched =
            Arc::new(
                Box::pin(exchange)
                    .await
                    .map_err(|(status, kind, reason)| Refusal {
                        status: Some(status),
                        kind,
                        reason: reason.into(),
                    })?,
            );
        if forward.method == "GET" {
            gw.crl_cache
                .put(lane_cache_key(&req.target, &forward.path), fetched.clone());
        }
        record.bytes_up = fetched.bytes_up;
        let mut paced = Paced::new(client, None, gates.download);
        return Box::pin(send_lane_answer(
            &mut paced,
            &fetched,
            forward.method != "HEAD",
            "forwarded",
            record,
        ))
        .await;
    }

    request::write_established(client)
        .await
        .map_err(|_| Refusal::gone("client_error", "client went away before 200"))?;
    record.status = 200;
    record.reason = plan.decision.reason.to_owned();
    let active = gw
        .metrics
        .tunnels_active
        .get_or_create(&crate::metrics::TunnelLabels {
            category: record.category.clone().unwrap_or_else(|| "none".into()),
            branch: record.branch.clone().unwrap_or_else(|| "none".into()),
        })
        .clone();
    active.inc();
    // Counted down however the tunnel ends, early returns included.
    let _active = scopeguard(move || {
        active.dec();
    });
    let mut first_bytes = std::mem::take(&mut req.early_data);
    let policy = &gw.config.policy;
    let sni_mode = policy.sni_mode(plan.decision.rule, req.target.port);
    if sni_mode != SniMode::Off {
        // Boxed: tunnels without an SNI check do not carry the peek's space.
        let (hello, bytes) = Box::pin(sni::peek_client_hello(client, first_bytes)).await;
        first_bytes = bytes;
        let allowed_rules = identity.and_then(|i| gw.config.branches[i].allowed_rules.as_deref());
        if let Hello::Name(name) = &hello {
            record.sni = Some(name.to_string());
        }
        check_sni(&hello, sni_mode, &req.target, |name| {
            policy
                .decide(&Host::Name(name.clone()), req.target.port, allowed_rules)
                .verdict
                == Verdict::Allow
        })
        .map_err(|(kind, reason)| Refusal {
            status: None,
            kind,
            reason,
        })?;
    }
    if !first_bytes.is_empty() {
        upstream
            .write_all(&first_bytes)
            .await
            .map_err(|_| Refusal::gone("upstream_error", "upstream write failed"))?;
        record.bytes_up = first_bytes.len() as u64;
    }
    // Under `on_reload = "close-denied"` a reload may close this tunnel.
    let stop = (gw.config.policy.on_reload == crate::policy::OnReload::CloseDenied).then(|| {
        gw.revocable
            .register(record.conn_id, req.target.clone(), record.branch.clone())
    });
    let conn_id = record.conn_id;
    let _unregister = stop
        .is_some()
        .then(|| scopeguard(move || gw.revocable.remove(conn_id)));
    // Nothing of the request is needed any more: an idle tunnel holds only its sockets.
    drop((req, plan, first_bytes));

    // Only tunnels a schedule can throttle carry gates; the rest pay nothing.
    let gates = gates_for(gw, record);
    // Plain clients splice; TLS clients go through the buffered copy (bytes must be decrypted).
    let outcome = if let ClientStream::Plain(tcp) = client {
        tunnel::relay_tcp(tcp, &mut upstream, timeouts.idle, stop.as_deref(), gates).await
    } else {
        tunnel::relay(client, &mut upstream, timeouts.idle, stop.as_deref(), gates).await
    };
    record.bytes_up += outcome.bytes_up;
    record.bytes_down = outcome.bytes_down;
    record.end = outcome.end.as_str();
    Ok(())
}

/// Awaits `work`, storing how long it took.
async fn timed<T>(took: &mut Option<Duration>, work: impl std::future::Future<Output = T>) -> T {
    let started = Instant::now();
    let out = work.await;
    *took = Some(started.elapsed());
    out
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// The bandwidth gates for this request's branch and category (none when no schedule can
/// throttle it).
fn gates_for(gw: &Gateway, record: &AccessRecord) -> crate::throttle::Gates {
    match (&record.branch, &record.category) {
        (Some(branch), Some(category)) => gw.throttles.gates(branch, category),
        _ => Default::default(),
    }
}

fn lane_cache_key(target: &Target, path: &str) -> String {
    format!("{target}{path}")
}

async fn send_lane_answer<C: tokio::io::AsyncWrite + Unpin>(
    client: &mut C,
    answer: &lane::Fetched,
    with_body: bool,
    end: &'static str,
    record: &mut AccessRecord,
) -> Result<(), Refusal> {
    record.status = answer.status;
    record.reason = "allowed".into();
    record.bytes_down = lane::respond(client, answer, with_body)
        .await
        .map_err(|_| Refusal::gone("client_error", "client went away during the response"))?;
    record.end = end;
    Ok(())
}

/// Whether the ClientHello fits the tunnel: `Err((kind, reason))` closes it.
fn check_sni(
    hello: &Hello,
    mode: SniMode,
    target: &Target,
    allowed_by_policy: impl Fn(&crate::hostname::DnsName) -> bool,
) -> Result<(), (&'static str, Cow<'static, str>)> {
    match hello {
        Hello::NotTls => Err(("not_tls", "tunnel bytes are not a TLS ClientHello".into())),
        Hello::NoName => Err(("sni_missing", "ClientHello carries no server name".into())),
        Hello::Closed => Err(("client_closed", "client sent no ClientHello".into())),
        Hello::Name(name) => match (&target.host, mode) {
            (Host::Name(host), SniMode::Match) if host == name => Ok(()),
            (Host::Name(host), SniMode::Match) => Err((
                "sni_mismatch",
                format!("SNI {name} does not match CONNECT host {host}").into(),
            )),
            // An IP-literal target, or mode "allowed": the name must be one the policy allows.
            _ if allowed_by_policy(name) => Ok(()),
            _ => Err((
                "sni_mismatch",
                format!("SNI {name} is not allowed on this port").into(),
            )),
        },
    }
}

/// Step 6: connect to the vetted addresses in order, all within `timeout`.
async fn dial(
    addrs: impl Iterator<Item = IpAddr>,
    port: u16,
    timeout: Duration,
    tried: &mut Option<SocketAddr>,
) -> Result<TcpStream, Refusal> {
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    for ip in addrs {
        let addr = SocketAddr::new(ip, port);
        *tried = Some(addr);
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => last_error = Some(e),
            Err(_) => {
                return Err(Refusal::new(
                    504,
                    "connect_timeout",
                    "upstream connect timed out",
                ));
            }
        }
    }
    let reason = match last_error {
        Some(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            "upstream refused the connection".into()
        }
        Some(e) => format!("upstream connect failed: {}", e.kind()),
        None => "no address to connect to".to_owned(),
    };
    Err(Refusal::new(502, "connect_failed", reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every client connection is one task whose future holds the whole data path; its size
    /// is paid by every idle tunnel (docs/benchmarks.md: memory per idle tunnel). Large
    /// futures (hickory's lookup, scratch buffers) must be boxed or kept out of it.
    #[tokio::test]
    async fn the_connection_future_stays_small() {
        let config = Config::parse("[resolver]\nhosts_only = true\n", "t").unwrap();
        let gw = Gateway::new(config).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = TcpStream::connect(addr).await.unwrap();
        let size = std::mem::size_of_val(&serve(&gw, stream, addr, 1));
        // Release builds, 2026-11-23: 1.2 KiB for the core; 1.6 KiB with branches and the TLS
        // listener; 1.76 KiB with SNI checks and the plain-HTTP lane (debug builds run a little
        // larger). Their own large futures (DNS lookup, SNI peek, HTTP exchange) are boxed.
        assert!(size <= 2048, "serve() future is {size} bytes");
    }
}
