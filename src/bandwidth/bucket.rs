//! One bandwidth budget as arithmetic: a GCRA token bucket ("theoretical arrival time") in
//! four atomics. Pure: every operation takes the time as nanoseconds on the budgets' shared
//! [`Timeline`], so the arithmetic is tested without a clock and a retune is a store.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::atomic::{
    AtomicBool, AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};
use std::time::Duration;
use tokio::time::Instant;

/// How far ahead of the rate a bucket lets bytes go: the burst is this much of the rate.
pub const BURST: Duration = Duration::from_millis(50);
/// Shares are millionths of a limit.
pub const PPM: u64 = 1_000_000;
/// Smallest chunk a throttled direction reads, so very low rates still move whole packets.
pub const MIN_CHUNK: usize = 1024;

/// The instant budget times count from. One per set of budgets, carried over reloads with
/// them, so every bucket a tunnel holds reads the same clock.
#[derive(Clone, Copy, Debug)]
pub struct Timeline {
    base: Instant,
}

impl Timeline {
    pub fn starting_now() -> Self {
        Self {
            base: Instant::now(),
        }
    }

    /// `at` in ns on this timeline (0 before its start).
    pub fn ns(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base)
            .as_nanos()
            .min(u64::MAX as u128) as u64
    }

    /// The instant `ns` stands for.
    pub fn instant(&self, ns: u64) -> Instant {
        self.base + Duration::from_nanos(ns)
    }

    /// Now, in ns: the one place the bandwidth machinery reads the clock.
    pub fn now(&self) -> u64 {
        self.ns(Instant::now())
    }
}

/// What a budget's tunnels did in one fleet window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Demand {
    /// Tunnels that moved bytes or waited for their turn.
    pub tunnels: u64,
    pub bytes: u64,
    /// Whether any tunnel had to wait: the budget is saturated.
    pub waited: bool,
}

/// One budget: a token bucket shared by every tunnel in its scope and direction.
#[derive(Default)]
pub struct Bucket {
    /// Bytes per second in force; 0 when no schedule is.
    rate: AtomicU64,
    /// Category bits (see `Throttles`) the schedule in force throttles.
    categories: AtomicU64,
    /// When the bytes reserved so far will have been sent at the rate (ns on the timeline).
    tat: AtomicU64,
    /// Bumped on every change of rate or categories: waiters rescale their turn.
    epoch: AtomicU64,
    /// Dropped by a reload: never put in force again (a late retune of the old snapshot
    /// must not throttle the tunnels still holding it).
    retired: AtomicBool,
    /// The limit the schedule in force sets (bytes per second; 0: none). `rate` is this, or
    /// this replica's share of it in fleet mode.
    configured: AtomicU64,
    /// Fleet mode: this replica's share of `configured`, in millionths; 0 is all of it.
    share_ppm: AtomicU64,
    /// Demand, measured only in fleet mode (0: never measured): the window tunnels count in.
    generation: AtomicU64,
    /// Tunnels that moved or waited, in the current and the previous window (by parity).
    active: [AtomicU64; 2],
    /// Bytes admitted in the current window.
    moved: AtomicU64,
    /// Whether a tunnel had to wait for its turn in the current window.
    waited: AtomicBool,
    /// One writer at a time (the schedule task and the fleet task both set rates).
    writer: std::sync::Mutex<()>,
    pub(super) limit: Gauge,
    pub(super) waited_seconds: Counter<f64, AtomicU64>,
    pub(super) throttled_bytes: Counter,
}

impl Bucket {
    /// The rate in force for a tunnel of category bit `category`, if any.
    #[inline]
    pub fn in_force(&self, category: u64) -> Option<u64> {
        let rate = self.rate.load(Relaxed);
        (rate != 0 && self.categories.load(Relaxed) & category != 0).then_some(rate)
    }

    /// The change counter; read before the rate, so a retune in between is seen later.
    #[inline]
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Acquire)
    }

    /// Puts `limit` (bytes per second, category bits) in force at `now`, or lifts the limit.
    /// Bytes already reserved are rescaled to the new rate, so the change takes effect at once.
    pub fn set(&self, limit: Option<(u64, u64)>, now: u64) {
        let _one = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let (configured, categories) = match limit {
            Some(limit) if !self.retired.load(Relaxed) => limit,
            _ => (0, 0),
        };
        self.configured.store(configured, Relaxed);
        self.apply(categories, now);
        self.limit.set(configured as i64);
    }

    /// The limit the schedule in force sets, whatever this replica's share of it.
    pub fn configured(&self) -> Option<u64> {
        Some(self.configured.load(Relaxed)).filter(|&r| r != 0)
    }

    /// Fleet mode: this replica may use `ppm` millionths of the limit (at least 1), from `now`.
    /// Returns the rate that puts in force (0: no limit is).
    pub fn set_share(&self, ppm: u64, now: u64) -> u64 {
        let _one = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.share_ppm.store(ppm.clamp(1, PPM), Relaxed);
        self.apply(self.categories.load(Relaxed), now);
        self.rate.load(Relaxed)
    }

    /// Sets the rate from the configured limit and the share (caller holds `writer`).
    fn apply(&self, categories: u64, now: u64) {
        let configured = self.configured.load(Relaxed);
        let rate = match self.share_ppm.load(Relaxed) {
            _ if configured == 0 => 0,
            0 => configured,
            ppm => (configured as u128 * ppm as u128 / PPM as u128).max(1) as u64,
        };
        let old = self.rate.load(Relaxed);
        if old == rate && self.categories.load(Relaxed) == categories {
            return;
        }
        let _ = self.tat.fetch_update(Relaxed, Relaxed, |tat| {
            Some(match (old, rate) {
                // Lifted: what was queued went out freely; a later window starts afresh.
                (_, 0) => tat.min(now),
                (0, _) => tat,
                _ if tat > now => now.saturating_add(rescale(tat - now, old, rate)),
                _ => tat,
            })
        });
        self.categories.store(categories, Relaxed);
        self.rate.store(rate, Relaxed);
        // Release after the stores: a tunnel that sees the new epoch sees the new rate.
        self.epoch.fetch_add(1, Release);
    }

    /// Per chunk, from a tunnel's gate: it moved `bytes` (maybe 0: it is waiting) and whether
    /// it must wait for its turn. `seen` is the tunnel's own mark of the window it last
    /// counted in. Without fleet mode this is one relaxed load.
    #[inline]
    pub fn note(&self, seen: &mut u64, bytes: u64, waits: bool) {
        let generation = self.generation.load(Relaxed);
        if generation == 0 {
            return;
        }
        if *seen != generation {
            *seen = generation;
            self.active[(generation & 1) as usize].fetch_add(1, Relaxed);
        }
        if bytes > 0 {
            self.moved.fetch_add(bytes, Relaxed);
        }
        if waits && !self.waited.load(Relaxed) {
            self.waited.store(true, Relaxed);
        }
    }

    /// Fleet mode, once per refresh: the demand of the window that ends now (a new one
    /// begins). The first call starts measuring.
    pub fn take_demand(&self) -> Demand {
        let generation = self.generation.load(Relaxed);
        let next = generation + 1;
        self.active[(next & 1) as usize].store(0, Relaxed);
        self.generation.store(next, Release);
        Demand {
            tunnels: match generation {
                0 => 0,
                g => self.active[(g & 1) as usize].load(Relaxed),
            },
            bytes: self.moved.swap(0, Relaxed),
            waited: self.waited.swap(false, Relaxed),
        }
    }

    /// Whether demand was ever measured (fleet mode has begun on this bucket).
    pub fn measured(&self) -> bool {
        self.generation.load(Relaxed) != 0
    }

    /// A reload dropped this budget: its limit is lifted for good.
    pub fn retire(&self, now: u64) {
        self.retired.store(true, Relaxed);
        self.set(None, now);
    }

    /// Reserves `bytes` at `rate` at `now`; returns when they may be sent.
    pub fn reserve(&self, bytes: u64, rate: u64, now: u64) -> u64 {
        let cost = cost_ns(bytes, rate);
        let mut tat = self.tat.load(Relaxed);
        loop {
            let next = tat.max(now).saturating_add(cost);
            match self.tat.compare_exchange_weak(tat, next, Relaxed, Relaxed) {
                Ok(_) => return next.saturating_sub(BURST.as_nanos() as u64),
                Err(current) => tat = current,
            }
        }
    }

    /// Gives back a reservation of `bytes` at `rate` that will not be used (its tunnel ended
    /// while waiting), so the budget's later turns are not held up by bytes never sent.
    pub fn give_back(&self, bytes: u64, rate: u64, now: u64) {
        let cost = cost_ns(bytes, rate);
        let _ = self.tat.fetch_update(Relaxed, Relaxed, |tat| {
            (tat > now).then(|| tat.saturating_sub(cost).max(now))
        });
    }
}

/// Time `bytes` take at `rate` bytes per second, in ns.
pub fn cost_ns(bytes: u64, rate: u64) -> u64 {
    (bytes as u128 * 1_000_000_000 / rate.max(1) as u128).min(u64::MAX as u128) as u64
}

/// `ns` of waiting at `old` bytes per second, expressed at `new`.
pub fn rescale(ns: u64, old: u64, new: u64) -> u64 {
    (ns as u128 * old as u128 / new.max(1) as u128).min(u64::MAX as u128) as u64
}

/// Largest read for a direction throttled at `rate`: about one burst.
pub fn chunk_for(rate: u64) -> usize {
    let burst = rate as u128 * BURST.as_nanos() / 1_000_000_000;
    (burst as usize).max(MIN_CHUNK)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn reservations_queue_at_the_rate_and_only_a_burst_goes_at_once() {
        let bucket = Bucket::default();
        bucket.set(Some((100_000, 1)), 0);
        // 5 kB at 100 kB/s is 50 ms: exactly the burst, so it may go now.
        assert_eq!(bucket.reserve(5_000, 100_000, 0), 0);
        // The next 5 kB waits for the first to have been sent.
        assert_eq!(bucket.reserve(5_000, 100_000, 0), 50 * MS);
        // Later, an idle bucket does not hand out more than its burst.
        assert_eq!(bucket.reserve(10_000, 100_000, 1_000 * MS), 1_050 * MS);
    }

    #[test]
    fn a_retune_rescales_the_queue_and_lifting_empties_it() {
        let bucket = Bucket::default();
        bucket.set(Some((1_000, 1)), 0);
        let epoch = bucket.epoch();
        // Ten seconds queued at 1 kB/s.
        bucket.reserve(10_000, 1_000, 0);
        // Ten times faster: one second of the queue left.
        bucket.set(Some((10_000, 1)), 0);
        assert_ne!(bucket.epoch(), epoch);
        assert_eq!(bucket.reserve(0, 10_000, 0), 1_000 * MS - 50 * MS);
        bucket.set(None, 0);
        assert_eq!(bucket.in_force(1), None);
        bucket.set(Some((10_000, 1)), 0);
        assert_eq!(
            bucket.reserve(500, 10_000, 0),
            0,
            "a new window starts afresh"
        );
    }

    #[test]
    fn categories_select_what_a_limit_reaches_and_a_retired_bucket_stays_lifted() {
        let bucket = Bucket::default();
        bucket.set(Some((1_000, 0b01)), 0);
        assert_eq!(bucket.in_force(0b01), Some(1_000));
        assert_eq!(bucket.in_force(0b10), None);
        bucket.retire(0);
        bucket.set(Some((1_000, 0b01)), 0);
        assert_eq!(bucket.in_force(0b01), None);
    }

    #[test]
    fn a_reservation_given_back_frees_its_time() {
        let bucket = Bucket::default();
        bucket.set(Some((10_000, 1)), 0);
        bucket.reserve(100_000, 10_000, 0);
        bucket.give_back(100_000, 10_000, 0);
        assert_eq!(bucket.reserve(500, 10_000, 0), 0);
    }

    #[test]
    fn chunks_are_a_burst_of_the_rate_and_never_tiny() {
        assert_eq!(chunk_for(1_000_000), 50_000);
        assert_eq!(chunk_for(1_000), MIN_CHUNK);
        assert_eq!(cost_ns(1_000, 1_000), 1_000 * MS);
        assert_eq!(rescale(1_000, 10, 20), 500);
    }

    #[test]
    fn demand_is_counted_per_window_only_once_measured_and_shares_scale_the_rate() {
        let bucket = Bucket::default();
        bucket.set(Some((1_000_000, 1)), 0);
        let (mut a, mut b) = (0, 0);
        bucket.note(&mut a, 1_000, true);
        assert!(!bucket.measured(), "nothing is counted without fleet mode");
        assert_eq!(bucket.take_demand(), Demand::default());
        bucket.note(&mut a, 1_000, false);
        bucket.note(&mut a, 1_000, false);
        bucket.note(&mut b, 0, true);
        let demand = bucket.take_demand();
        assert_eq!(
            demand,
            Demand {
                tunnels: 2,
                bytes: 2_000,
                waited: true
            }
        );
        bucket.note(&mut a, 500, false);
        assert_eq!(
            bucket.take_demand().tunnels,
            1,
            "a new window counts afresh"
        );
        assert_eq!(bucket.set_share(250_000, 0), 250_000);
        assert_eq!(bucket.in_force(1), Some(250_000));
        assert_eq!(bucket.configured(), Some(1_000_000));
        bucket.set(Some((2_000_000, 1)), 0);
        assert_eq!(
            bucket.in_force(1),
            Some(500_000),
            "the share follows the limit"
        );
    }
}
