//! What a replica asks of each budget (Doorman's "wants" and a weight) from what its tunnels
//! did in the last window, and how the share Redis hands back becomes the local bucket's rate.
//! Pure arithmetic, tested without Redis.

use crate::bandwidth::Demand;
use crate::bandwidth::bucket::{MIN_CHUNK, PPM};
use std::time::Duration;

/// The weight of a replica with no tunnel moving in a budget: small, but never nothing, so a
/// tunnel that starts there moves at once (and its replica asks for more at the next refresh).
pub const IDLE_WEIGHT: f64 = 0.1;
/// What a replica wants beyond what it measured, while no tunnel of it waits: 25 %.
const HEADROOM: (u64, u64) = (5, 4);

/// The least a replica wants of a budget of `limit`: 0.5 % of it (at least one small chunk a
/// second), what a new tunnel gets before the next refresh.
pub fn floor(limit: u64) -> u64 {
    (limit / 200).max(MIN_CHUNK as u64).min(limit)
}

/// What to ask for: (wants in bytes per second, weight). `previous` is the tunnel count of the
/// window before: a tunnel waiting its turn may not touch its bucket within one window, so a
/// replica's weight is the larger of the last two windows.
pub fn ask(limit: u64, demand: Demand, previous: u64, window: Duration) -> (u64, f64) {
    let tunnels = demand.tunnels.max(previous);
    let weight = if tunnels == 0 {
        IDLE_WEIGHT
    } else {
        tunnels as f64
    };
    let wants = if demand.waited {
        // Tunnels waited for their turn: they would move more than they got.
        limit
    } else {
        let window = window.as_nanos().max(1);
        let measured = (demand.bytes as u128 * 1_000_000_000 / window) as u64;
        (measured.saturating_mul(HEADROOM.0) / HEADROOM.1)
            .saturating_add(floor(limit))
            .min(limit)
    };
    (wants, weight)
}

/// A share of `limit` in bytes per second as millionths of the limit (at least 1).
pub fn ppm(share: u64, limit: u64) -> u64 {
    ((share.min(limit) as u128 * PPM as u128) / limit.max(1) as u128).max(1) as u64
}

/// `fraction` of a limit as millionths.
pub fn fraction_ppm(fraction: f64) -> u64 {
    ((fraction * PPM as f64) as u64).clamp(1, PPM)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_millis(250);

    #[test]
    fn waiting_tunnels_want_the_limit_and_idle_replicas_a_floor() {
        let busy = Demand {
            tunnels: 4,
            bytes: 200_000,
            waited: true,
        };
        assert_eq!(ask(1_000_000, busy, 3, WINDOW), (1_000_000, 4.0));
        // A tunnel seen only in the window before still counts.
        let between = Demand { tunnels: 0, ..busy };
        assert_eq!(ask(1_000_000, between, 1, WINDOW).1, 1.0);
        // Nothing moved: the floor, at the idle weight.
        let idle = ask(1_000_000, Demand::default(), 0, WINDOW);
        assert_eq!(idle, (5_000, IDLE_WEIGHT));
        // Moving 100 kB/s without waiting: 125 kB/s and the floor.
        let light = Demand {
            tunnels: 1,
            bytes: 25_000,
            waited: false,
        };
        assert_eq!(ask(1_000_000, light, 0, WINDOW), (130_000, 1.0));
        assert_eq!(ppm(200_000, 1_000_000), 200_000);
        assert_eq!(ppm(0, 1_000_000), 1);
        assert_eq!(ppm(5_000_000, 1_000_000), PPM);
        assert_eq!(fraction_ppm(0.34), 340_000);
    }
}
