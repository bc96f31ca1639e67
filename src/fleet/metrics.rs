//! The fleet's own metrics, registered only with `[fleet]`.

use crate::metrics::ThrottleLabels;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

pub struct FleetMetrics {
    /// 1 while Redis answers, 0 when the last call did not.
    pub connected: Gauge,
    /// This replica's share of each budget in force (bytes per second).
    pub share: Family<ThrottleLabels, Gauge>,
    /// Redis round trips (a refresh's pipeline, a tunnel count, an auth attempt).
    pub redis_duration: Histogram,
    /// Refreshes Redis did not answer in time.
    pub refresh_failures: Counter,
    /// 1 while another live process holds this replica's `fleet.name`.
    pub name_conflict: Gauge,
}

impl FleetMetrics {
    /// Registers every family under `portcullis_fleet_`.
    pub fn register(registry: &mut Registry) -> Self {
        let fleet = registry.sub_registry_with_prefix("fleet");
        let connected = Gauge::default();
        fleet.register(
            "connected",
            "Whether this replica's last call to Redis answered (1) or not (0)",
            connected.clone(),
        );
        let share = Family::<ThrottleLabels, Gauge>::default();
        fleet.register(
            "share_bytes_per_second",
            "This replica's share of each fleet-wide budget in force",
            share.clone(),
        );
        // 0.1 ms to about 1.6 s, doubling.
        let redis_duration = Histogram::new(exponential_buckets(0.000_1, 2.0, 15));
        fleet.register_with_unit(
            "redis_duration",
            "Redis round trips (refresh pipelines, tunnel counts, auth attempts)",
            Unit::Seconds,
            redis_duration.clone(),
        );
        let refresh_failures = Counter::default();
        fleet.register(
            "refresh_failures",
            "Refreshes Redis did not answer within the refresh interval",
            refresh_failures.clone(),
        );
        let name_conflict = Gauge::default();
        fleet.register(
            "name_conflict",
            "Whether another live replica runs under this replica's fleet.name (1), doubling every fleet-wide limit, or not (0)",
            name_conflict.clone(),
        );
        Self {
            connected,
            share,
            redis_duration,
            refresh_failures,
            name_conflict,
        }
    }
}
