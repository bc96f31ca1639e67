//! The forwarder's own metrics, on its optional admin listener (`admin = "127.0.0.1:9465"`):
//! requests by how they ended, tunnels open, bytes, failovers, and each gateway's state. All
//! prefixed `portcullis_agent_`; labels only from config (a gateway's URL) and the end kinds.

use super::pool::Pool;
use crate::admin_http::{Answer, Ask};
use crate::metrics::TunnelBytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndLabels {
    end: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GatewayLabels {
    gateway: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

/// Every metric the forwarder exports.
pub struct AgentMetrics {
    registry: Registry,
    requests: Family<EndLabels, Counter>,
    pub tunnels_active: Gauge,
    /// Tunnel bytes (up: app to gateway), counted as they flow.
    pub bytes: TunnelBytes,
    /// Requests a gateway failed before answering that another gateway then carried.
    pub failovers: Counter,
    gateway_up: Family<GatewayLabels, Gauge>,
    gateway_in_use: Family<GatewayLabels, Gauge>,
}

impl AgentMetrics {
    /// The families, with every series a dashboard or alert watches at zero.
    pub fn new(pool: &Pool) -> Self {
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("portcullis_agent");
        let requests = Family::<EndLabels, Counter>::default();
        registry.register(
            "requests",
            "App requests by how they ended (the agent's log line's end)",
            requests.clone(),
        );
        for end in [
            "closed",
            "refused_by_gateway",
            "no_gateway",
            "gateway_timeout",
        ] {
            drop(requests.get_or_create(&EndLabels { end }));
        }
        let tunnels_active = Gauge::default();
        registry.register("tunnels_active", "Tunnels open now", tunnels_active.clone());
        let bytes_family = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "bytes",
            "Tunnel bytes by direction (up: app to gateway), counted as they flow",
            bytes_family.clone(),
        );
        // One statement each: a family's read guard lives to the end of its statement, and a
        // second insert in the same one would wait for it forever.
        let up = bytes_family
            .get_or_create(&DirectionLabels { direction: "up" })
            .clone();
        let down = bytes_family
            .get_or_create(&DirectionLabels { direction: "down" })
            .clone();
        let bytes = TunnelBytes { up, down };
        let failovers = Counter::default();
        registry.register(
            "failovers",
            "Requests a gateway failed before answering that the next gateway carried",
            failovers.clone(),
        );
        let gateway_up = Family::<GatewayLabels, Gauge>::default();
        registry.register(
            "gateway_up",
            "1 while a gateway is up (it answered its last request or probe), else 0",
            gateway_up.clone(),
        );
        let gateway_in_use = Family::<GatewayLabels, Gauge>::default();
        registry.register(
            "gateway_in_use",
            "1 for the gateway that carried the latest tunnel, else 0",
            gateway_in_use.clone(),
        );
        let this = Self {
            registry: root,
            requests,
            tunnels_active,
            bytes,
            failovers,
            gateway_up,
            gateway_in_use,
        };
        this.sample(pool);
        this
    }

    /// Every family, for the reference's check.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Counts one app request that ended with `end`.
    pub fn ended(&self, end: crate::end::End) {
        self.requests
            .get_or_create(&EndLabels { end: end.as_str() })
            .inc();
    }

    /// Brings the gateways' state up to date (at each scrape).
    fn sample(&self, pool: &Pool) {
        for gateway in pool.status() {
            let labels = GatewayLabels {
                gateway: gateway.url,
            };
            self.gateway_up
                .get_or_create(&labels)
                .set(i64::from(gateway.state == "up"));
            self.gateway_in_use
                .get_or_create(&labels)
                .set(i64::from(gateway.in_use));
        }
    }

    /// The admin listener's routes: `GET`/`HEAD /metrics` and `GET /healthz`.
    pub fn route(&self, ask: &Ask<'_>, pool: &Pool) -> Answer {
        match (ask.method, ask.path) {
            ("GET" | "HEAD", "/metrics") => {
                self.sample(pool);
                Answer::metrics(&self.registry, ask.open_metrics)
            }
            ("GET", "/healthz") => Answer::text(200, "ok\n"),
            _ => Answer::not_found(),
        }
    }
}
