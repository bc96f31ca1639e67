//! One direction of one tunnel under its budgets (its branch's, then shared ones), as
//! arithmetic: how much it may read, the turns it reserves for what it read, and when they
//! come. Pure like the buckets: the caller passes the time ([`super::Pacer`] reads the clock
//! and sleeps), so every fairness and retune property is tested without one.

use super::bucket::{Bucket, chunk_for, rescale};
use std::sync::Arc;
use std::time::Duration;

/// Longest a waiting tunnel goes without looking at its buckets again: a retune reaches it
/// within this.
pub const RECHECK: Duration = Duration::from_millis(250);

/// What the bytes admitted last may do at the time asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Every budget in force lets them go.
    Go,
    /// Ask again at this time (ns on the budgets' timeline).
    WaitUntil(u64),
}

pub struct Gate {
    buckets: Box<[Arc<Bucket>]>,
    category: u64,
    /// Bytes already paid for in each bucket and not yet sent (see `admit`).
    credit: Box<[u64]>,
    /// Bytes read under a limit and not yet allowed out.
    pending: Option<u64>,
    /// Their reservation in each bucket in force; reused, so no allocation per chunk.
    turns: Vec<Turn>,
    /// The fleet window this tunnel last counted in, per bucket (see `Bucket::note`).
    seen: Box<[u64]>,
}

/// A reservation in one bucket.
struct Turn {
    bucket: usize,
    /// Bytes reserved (the chunk sent plus any credit bought with it).
    bytes: u64,
    /// When the bytes may go.
    at: u64,
    rate: u64,
    epoch: u64,
    since: u64,
    done: bool,
}

impl Gate {
    pub fn new(buckets: Vec<Arc<Bucket>>, category: u64) -> Self {
        Self {
            credit: vec![0; buckets.len()].into_boxed_slice(),
            seen: vec![0; buckets.len()].into_boxed_slice(),
            buckets: buckets.into_boxed_slice(),
            category,
            pending: None,
            turns: Vec::new(),
        }
    }

    /// The budgets this gate obeys, the branch's first.
    pub fn buckets(&self) -> &[Arc<Bucket>] {
        &self.buckets
    }

    /// The category bit this tunnel carries.
    pub fn category(&self) -> u64 {
        self.category
    }

    /// The largest read allowed now: about one burst of the slowest budget in force, so no
    /// budget sees more than its burst at once. `None` when no budget is in force.
    #[inline]
    pub fn read_limit(&self) -> Option<usize> {
        let mut limit: Option<usize> = None;
        for bucket in &*self.buckets {
            if let Some(rate) = bucket.in_force(self.category) {
                let chunk = chunk_for(rate);
                limit = Some(limit.map_or(chunk, |l| l.min(chunk)));
            }
        }
        limit
    }

    /// `bytes` were read under a limit at `now`: they reserve their turn in every budget in
    /// force at once (so waiting for one budget does not waste a turn in another) and wait,
    /// through `check`, for the last of them.
    ///
    /// Turns are taken in order, one per tunnel, so for equal shares every tunnel must buy the
    /// same amount per turn: in a budget faster than the one that sizes its reads, a tunnel
    /// reserves that budget's own chunk and spends the rest as credit on its next reads. Paying
    /// ahead never lets a budget exceed its rate; it keeps a branch's tunnels from getting less
    /// than their share of a shared budget. In the budget that sizes the reads it pays exactly
    /// what it read (credit there would be bought and left unsent: lost rate).
    pub fn admit(&mut self, now: u64, bytes: usize) {
        let bytes = bytes as u64;
        let read_chunk = self.read_limit().unwrap_or(0) as u64;
        self.turns.clear();
        for (i, bucket) in self.buckets.iter().enumerate() {
            let epoch = bucket.epoch();
            let Some(rate) = bucket.in_force(self.category) else {
                continue;
            };
            if self.credit[i] >= bytes {
                self.credit[i] -= bytes;
                bucket.throttled_bytes.inc_by(bytes);
                bucket.note(&mut self.seen[i], bytes, false);
                continue;
            }
            let own_chunk = chunk_for(rate) as u64;
            let turn = if own_chunk > read_chunk { own_chunk } else { 0 };
            let buy = turn.max(bytes - self.credit[i]);
            self.credit[i] = self.credit[i] + buy - bytes;
            let at = bucket.reserve(buy, rate, now);
            bucket.note(&mut self.seen[i], bytes, at > now);
            self.turns.push(Turn {
                bucket: i,
                bytes: buy,
                at,
                rate,
                epoch,
                since: now,
                done: false,
            });
        }
        self.pending = Some(bytes);
    }

    /// Whether bytes read are waiting for their turn.
    #[inline]
    pub fn is_waiting(&self) -> bool {
        self.pending.is_some()
    }

    /// Whether the admitted bytes may go at `now`; if not, when to ask again (their turn, or
    /// sooner to notice a retune). A budget retuned meanwhile rescales the rest of the wait to
    /// its new rate, or ends it when lifted.
    pub fn check(&mut self, now: u64) -> Admission {
        let Some(bytes) = self.pending else {
            return Admission::Go;
        };
        let mut wake: Option<u64> = None;
        for turn in self.turns.iter_mut().filter(|t| !t.done) {
            let bucket = &self.buckets[turn.bucket];
            let epoch = bucket.epoch();
            if epoch != turn.epoch {
                match bucket.in_force(self.category) {
                    None => turn.at = now,
                    Some(rate) => {
                        turn.at = now.saturating_add(rescale(
                            turn.at.saturating_sub(now),
                            turn.rate,
                            rate,
                        ));
                        turn.rate = rate;
                    }
                }
                turn.epoch = epoch;
            }
            if turn.at <= now {
                turn.done = true;
                let waited = now.saturating_sub(turn.since);
                if waited > 0 {
                    bucket.waited_seconds.inc_by(waited as f64 / 1e9);
                }
                bucket.throttled_bytes.inc_by(bytes);
                continue;
            }
            // Still waiting: it counts as demand in this fleet window too.
            bucket.note(&mut self.seen[turn.bucket], 0, true);
            let at = turn.at.min(now.saturating_add(RECHECK.as_nanos() as u64));
            wake = Some(wake.map_or(at, |w| w.min(at)));
        }
        match wake {
            Some(at) => Admission::WaitUntil(at),
            None => {
                self.pending = None;
                Admission::Go
            }
        }
    }

    /// The tunnel ended at `now`: what it paid for and did not send (turns it was waiting
    /// for, and credit) goes back to its budgets.
    pub fn end(&mut self, now: u64) {
        if self.pending.take().is_some() {
            for turn in self.turns.iter().filter(|t| !t.done) {
                self.buckets[turn.bucket].give_back(turn.bytes, turn.rate, now);
                self.credit[turn.bucket] = self.credit[turn.bucket].saturating_sub(turn.bytes);
            }
        }
        for (bucket, credit) in self.buckets.iter().zip(self.credit.iter_mut()) {
            if let (true, Some(rate)) = (*credit > 0, bucket.in_force(self.category)) {
                bucket.give_back(*credit, rate, now);
            }
            *credit = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bandwidth::bucket::MIN_CHUNK;

    const SECOND: u64 = 1_000_000_000;
    const MS: u64 = 1_000_000;

    fn bucket(rate: u64) -> Arc<Bucket> {
        let bucket = Arc::new(Bucket::default());
        bucket.set(Some((rate, 1)), 0);
        bucket
    }

    /// Tunnels pushing as fast as their gates let them, in simulated time: each reads
    /// `read(limit)` bytes whenever its last bytes went, until `until`.
    struct Run {
        wake: Vec<u64>,
        pending: Vec<u64>,
        sent: Vec<u64>,
        /// When each tunnel's last bytes went.
        done_at: Vec<u64>,
    }

    impl Run {
        fn new(tunnels: usize, start: u64) -> Self {
            Self {
                wake: vec![start; tunnels],
                pending: vec![0; tunnels],
                sent: vec![0; tunnels],
                done_at: vec![start; tunnels],
            }
        }

        /// Runs every event before `to`; tunnels stop reading at `stop_reading` or when they
        /// have sent `total` bytes.
        fn until(
            &mut self,
            gates: &mut [Gate],
            to: u64,
            stop_reading: u64,
            total: u64,
            read: impl Fn(usize) -> usize,
        ) {
            loop {
                let Some(i) = (0..gates.len())
                    .filter(|&i| self.wake[i] < to)
                    .min_by_key(|&i| (self.wake[i], i))
                else {
                    return;
                };
                let now = self.wake[i];
                let gate = &mut gates[i];
                if gate.is_waiting() {
                    match gate.check(now) {
                        Admission::WaitUntil(at) => {
                            assert!(at > now, "a wait moves time on");
                            self.wake[i] = at;
                            continue;
                        }
                        Admission::Go => {
                            self.sent[i] += self.pending[i];
                            self.done_at[i] = now;
                        }
                    }
                }
                if now >= stop_reading || self.sent[i] >= total {
                    self.wake[i] = u64::MAX;
                    continue;
                }
                let n = match gate.read_limit() {
                    Some(limit) => read(limit).min((total - self.sent[i]) as usize),
                    None => {
                        // Unthrottled: the rest goes at once.
                        self.sent[i] = total;
                        self.done_at[i] = now;
                        continue;
                    }
                };
                gate.admit(now, n);
                self.pending[i] = n as u64;
            }
        }
    }

    fn jain(shares: &[u64]) -> f64 {
        let total: f64 = shares.iter().map(|&s| s as f64).sum();
        total * total
            / (shares.len() as f64 * shares.iter().map(|&s| (s as f64).powi(2)).sum::<f64>())
    }

    #[test]
    fn a_gate_holds_the_rate_and_grants_only_a_short_burst() {
        let b = bucket(100_000);
        let mut gates = [Gate::new(vec![b.clone()], 1)];
        let mut run = Run::new(1, 0);
        run.until(&mut gates, u64::MAX, u64::MAX, 1_000_000, |l| l);
        // 1 MB at 100 kB/s: 10 s less at most one 50 ms burst.
        let took = run.done_at[0];
        assert!((9_940 * MS..=10_010 * MS).contains(&took), "{took}");
        assert_eq!(b.throttled_bytes.get(), 1_000_000);
        assert!(b.waited_seconds.get() > 9.0);
    }

    #[test]
    fn equal_tunnels_get_equal_shares() {
        let b = bucket(400_000);
        let mut gates: Vec<Gate> = (0..4).map(|_| Gate::new(vec![b.clone()], 1)).collect();
        let mut run = Run::new(4, 0);
        run.until(&mut gates, u64::MAX, 5 * SECOND, u64::MAX, |l| l);
        assert!(jain(&run.sent) > 0.99, "{:?}", run.sent);
        // 5 s at 400 kB/s, plus one burst and the chunks in flight.
        let total: u64 = run.sent.iter().sum();
        assert!((1_990_000..=2_150_000).contains(&total), "{total}");
    }

    #[test]
    fn short_reads_get_the_full_rate() {
        let b = bucket(400_000);
        let mut gates: Vec<Gate> = (0..8).map(|_| Gate::new(vec![b.clone()], 1)).collect();
        let mut run = Run::new(8, 0);
        // Sockets often hold less than a chunk: 60% of it here.
        run.until(&mut gates, u64::MAX, 10 * SECOND, u64::MAX, |l| l * 6 / 10);
        let total: u64 = run.sent.iter().sum();
        assert!(
            (3_960_000..=4_130_000).contains(&total),
            "{total} of 4,000,000"
        );
    }

    #[test]
    fn a_retune_reaches_waiting_tunnels_within_a_second() {
        let b = bucket(10_000);
        // Eight tunnels of 100 kB at 10 kB/s would take 80 s.
        let mut gates: Vec<Gate> = (0..8).map(|_| Gate::new(vec![b.clone()], 1)).collect();
        let mut run = Run::new(8, 0);
        run.until(&mut gates, 2 * SECOND, u64::MAX, 100_000, |l| l);
        assert!(run.sent.iter().all(|&s| s < 100_000));
        // Lifted to 100 MB/s at 2 s: everyone is done within the recheck period.
        b.set(Some((100_000_000, 1)), 2 * SECOND);
        run.until(&mut gates, u64::MAX, u64::MAX, 100_000, |l| l);
        for &done in &run.done_at {
            assert!(done - 2 * SECOND <= SECOND, "{done}");
        }
        // Slowed down again: a new tunnel takes the low rate.
        let start = 100 * SECOND;
        b.set(Some((10_000, 1)), start);
        let mut late = [Gate::new(vec![b.clone()], 1)];
        let mut run = Run::new(1, start);
        run.until(&mut late, u64::MAX, u64::MAX, 20_000, |l| l);
        assert!(
            run.done_at[0] - start >= 1_900 * MS,
            "{}",
            run.done_at[0] - start
        );
        // Lifted entirely: no limit to read.
        b.set(None, start);
        assert_eq!(late[0].read_limit(), None);
    }

    #[test]
    fn a_tunnel_obeys_its_branch_budget_and_the_shared_one() {
        let branch = bucket(200_000);
        let shared = bucket(500_000);
        // Two tunnels of one branch (its own 200 kB/s) and two of another branch, all under
        // the shared 500 kB/s: the branch gets its 200, the others the remaining 300.
        let mut gates = vec![
            Gate::new(vec![branch.clone(), shared.clone()], 1),
            Gate::new(vec![branch.clone(), shared.clone()], 1),
            Gate::new(vec![shared.clone()], 1),
            Gate::new(vec![shared.clone()], 1),
        ];
        let mut run = Run::new(4, 0);
        run.until(&mut gates, u64::MAX, 10 * SECOND, u64::MAX, |l| l);
        let branch_total = (run.sent[0] + run.sent[1]) as f64;
        let total = run.sent.iter().sum::<u64>() as f64;
        assert!(
            (2_000_000.0 * 0.97..=2_000_000.0 * 1.04).contains(&branch_total),
            "{:?}",
            run.sent
        );
        assert!(
            (5_000_000.0 * 0.98..=5_000_000.0 * 1.02).contains(&total),
            "{:?}",
            run.sent
        );
    }

    #[test]
    fn a_tunnel_that_ends_while_waiting_gives_its_turn_back() {
        let b = bucket(10_000);
        let mut first = Gate::new(vec![b.clone()], 1);
        // Ten seconds' worth queued, then the tunnel goes away.
        first.admit(0, 100_000);
        assert!(matches!(first.check(0), Admission::WaitUntil(_)));
        first.end(0);
        let mut next = [Gate::new(vec![b], 1)];
        let mut run = Run::new(1, 0);
        run.until(&mut next, u64::MAX, u64::MAX, 1_000, |l| l);
        assert!(run.done_at[0] < 200 * MS, "{}", run.done_at[0]);
    }

    #[test]
    fn bytes_of_other_categories_pass_untouched() {
        let b = Arc::new(Bucket::default());
        b.set(Some((1_000, 0b01)), 0);
        let gate = Gate::new(vec![b.clone()], 0b10);
        assert_eq!(gate.read_limit(), None);
        let gate = Gate::new(vec![b], 0b01);
        assert_eq!(gate.read_limit(), Some(MIN_CHUNK));
    }
}
