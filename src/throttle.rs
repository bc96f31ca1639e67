//! Bandwidth budgets: the token buckets schedules put in force, and the per-tunnel gate that
//! holds a direction's bytes until its budgets allow them.
//!
//! A bucket is GCRA-style (a "theoretical arrival time" in one atomic): a tunnel that has read
//! a chunk reserves its cost and may write once the reservation is no more than the burst
//! (50 ms of the rate) ahead of now. Reservations queue in arrival order and a tunnel reserves
//! its next chunk only after writing the last, so tunnels sharing a bucket take turns: no
//! tunnel starves and equal tunnels get equal shares. A tunnel under two budgets (its branch's
//! and a shared one) reserves in both at once and goes when the later turn comes. The rate lives in an atomic too, so a
//! schedule change is a store: nothing is rebuilt, no burst is granted, and tunnels already
//! waiting rescale their turn to the new rate on their next check (at most 250 ms away).
//!
//! Cost model: a tunnel no schedule can ever throttle (its category or branch is not in any
//! schedule, or there are no schedules) has no gate at all. A tunnel with a gate but no budget
//! in force pays one relaxed atomic load per bucket per chunk and keeps the zero-copy path.

use crate::metrics::{Metrics, ThrottleLabels};
use crate::schedule::{Direction, Schedule, Scope};
use jiff::Timestamp;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{
    AtomicBool, AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// How far ahead of the rate a bucket lets bytes go: the burst is this much of the rate.
pub const BURST: Duration = Duration::from_millis(50);
/// Longest a waiting tunnel sleeps before looking at its bucket again (a retune reaches it
/// within this).
const RECHECK: Duration = Duration::from_millis(250);
/// Smallest chunk a throttled direction reads, so very low rates still move whole packets.
const MIN_CHUNK: usize = 1024;

/// One budget: a token bucket shared by every tunnel in its scope and direction.
pub struct Bucket {
    base: Instant,
    /// Bytes per second in force; 0 when no schedule is.
    rate: AtomicU64,
    /// Category bits (`Throttles::category_bit`) the schedule in force throttles.
    categories: AtomicU64,
    /// When the bytes reserved so far will have been sent at the rate (ns since `base`).
    tat: AtomicU64,
    /// Bumped on every change of rate or categories: waiters rescale their turn.
    epoch: AtomicU64,
    /// Dropped by a reload: never put in force again (a late retune of the old snapshot
    /// must not throttle the tunnels still holding it).
    retired: AtomicBool,
    limit: Gauge,
    waited_seconds: Counter<f64, AtomicU64>,
    throttled_bytes: Counter,
}

impl Default for Bucket {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            rate: AtomicU64::new(0),
            categories: AtomicU64::new(0),
            tat: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            limit: Gauge::default(),
            waited_seconds: Counter::default(),
            throttled_bytes: Counter::default(),
        }
    }
}

impl Bucket {
    fn now_ns(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.base)
            .as_nanos()
            .min(u64::MAX as u128) as u64
    }

    /// The rate in force for a tunnel of category bit `category`, if any.
    #[inline]
    pub fn in_force(&self, category: u64) -> Option<u64> {
        let rate = self.rate.load(Relaxed);
        (rate != 0 && self.categories.load(Relaxed) & category != 0).then_some(rate)
    }

    /// Puts `limit` (bytes per second, category bits) in force, or lifts the limit. Bytes
    /// already reserved are rescaled to the new rate, so the change takes effect at once.
    pub fn set(&self, limit: Option<(u64, u64)>) {
        let (rate, categories) = match limit {
            Some(limit) if !self.retired.load(Relaxed) => limit,
            _ => (0, 0),
        };
        let old = self.rate.load(Relaxed);
        if old == rate && self.categories.load(Relaxed) == categories {
            return;
        }
        let now = self.now_ns();
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
        self.limit.set(rate as i64);
    }

    /// A reload dropped this budget: its limit is lifted for good.
    fn retire(&self) {
        self.retired.store(true, Relaxed);
        self.set(None);
    }

    /// Reserves `bytes` at `rate`; returns when (ns since `base`) they may be sent.
    fn reserve(&self, bytes: u64, rate: u64, now: u64) -> u64 {
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
    fn give_back(&self, bytes: u64, rate: u64) {
        let cost = cost_ns(bytes, rate);
        let now = self.now_ns();
        let _ = self.tat.fetch_update(Relaxed, Relaxed, |tat| {
            (tat > now).then(|| tat.saturating_sub(cost).max(now))
        });
    }
}

/// Time `bytes` take at `rate` bytes per second, in ns.
fn cost_ns(bytes: u64, rate: u64) -> u64 {
    (bytes as u128 * 1_000_000_000 / rate.max(1) as u128).min(u64::MAX as u128) as u64
}

/// `ns` of waiting at `old` bytes per second, expressed at `new`.
fn rescale(ns: u64, old: u64, new: u64) -> u64 {
    (ns as u128 * old as u128 / new.max(1) as u128).min(u64::MAX as u128) as u64
}

/// Largest read for a direction throttled at `rate`: about one burst.
fn chunk_for(rate: u64) -> usize {
    let burst = rate as u128 * BURST.as_nanos() / 1_000_000_000;
    (burst as usize).max(MIN_CHUNK)
}

/// One direction of one tunnel: the budgets it obeys (its branch's, then shared ones).
pub struct Gate {
    buckets: Box<[Arc<Bucket>]>,
    category: u64,
    /// Bytes already paid for in each bucket and not yet sent (see `admit`).
    credit: Box<[u64]>,
    /// Bytes read under a limit and not yet allowed out.
    pending: Option<u64>,
    /// Their reservation in each bucket in force; reused, so no allocation per chunk.
    turns: Vec<Turn>,
    /// Made on the first wait, then reset: no allocation per chunk.
    sleep: Option<Pin<Box<Sleep>>>,
}

/// A reservation in one bucket.
struct Turn {
    bucket: usize,
    /// Bytes reserved (the chunk sent plus any credit bought with it).
    bytes: u64,
    /// When the bytes may go (ns since the bucket's base).
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
            buckets: buckets.into_boxed_slice(),
            category,
            pending: None,
            turns: Vec::new(),
            sleep: None,
        }
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

    /// `bytes` were read under a limit: they reserve their turn in every budget in force at
    /// once (so waiting for one budget does not waste a turn in another) and wait in
    /// `poll_admit` for the last of them.
    ///
    /// Turns are taken in order, one per tunnel, so for equal shares every tunnel must buy the
    /// same amount per turn: in a budget faster than the one that sizes its reads, a tunnel
    /// reserves that budget's own chunk and spends the rest as credit on its next reads. Paying
    /// ahead never lets a budget exceed its rate; it keeps a branch's tunnels from getting less
    /// than their share of a shared budget. In the budget that sizes the reads it pays exactly
    /// what it read (credit there would be bought and left unsent: lost rate).
    pub fn admit(&mut self, bytes: usize) {
        let bytes = bytes as u64;
        let read_chunk = self.read_limit().unwrap_or(0) as u64;
        self.turns.clear();
        for (i, bucket) in self.buckets.iter().enumerate() {
            // The epoch before the rate: a retune in between is seen as a change later.
            let epoch = bucket.epoch.load(Acquire);
            let Some(rate) = bucket.in_force(self.category) else {
                continue;
            };
            if self.credit[i] >= bytes {
                self.credit[i] -= bytes;
                bucket.throttled_bytes.inc_by(bytes);
                continue;
            }
            let own_chunk = chunk_for(rate) as u64;
            let turn = if own_chunk > read_chunk { own_chunk } else { 0 };
            let buy = turn.max(bytes - self.credit[i]);
            self.credit[i] = self.credit[i] + buy - bytes;
            let now = bucket.now_ns();
            self.turns.push(Turn {
                bucket: i,
                bytes: buy,
                at: bucket.reserve(buy, rate, now),
                rate,
                epoch,
                since: now,
                done: false,
            });
        }
        self.pending = Some(bytes);
    }

    /// Whether bytes read are waiting for their turn.
    pub fn is_waiting(&self) -> bool {
        self.pending.is_some()
    }

    /// Ready once every budget in force lets the admitted bytes go.
    pub fn poll_admit(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(bytes) = self.pending else {
            return Poll::Ready(());
        };
        loop {
            let mut wake: Option<Instant> = None;
            for turn in self.turns.iter_mut().filter(|t| !t.done) {
                let bucket = &self.buckets[turn.bucket];
                let now = bucket.now_ns();
                let epoch = bucket.epoch.load(Acquire);
                if epoch != turn.epoch {
                    // Retuned while waiting: the rest of the wait at the new rate, or none.
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
                let at = bucket.base
                    + Duration::from_nanos(turn.at.min(now + RECHECK.as_nanos() as u64));
                wake = Some(wake.map_or(at, |w| w.min(at)));
            }
            let Some(wake) = wake else {
                self.pending = None;
                return Poll::Ready(());
            };
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(wake)));
            sleep.as_mut().reset(wake);
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

impl Drop for Gate {
    /// A tunnel that ends gives what it paid for and did not send back to its budgets: turns
    /// it was waiting for, and credit.
    fn drop(&mut self) {
        if self.pending.is_some() {
            for turn in self.turns.iter().filter(|t| !t.done) {
                self.buckets[turn.bucket].give_back(turn.bytes, turn.rate);
                self.credit[turn.bucket] = self.credit[turn.bucket].saturating_sub(turn.bytes);
            }
        }
        for (bucket, &credit) in self.buckets.iter().zip(self.credit.iter()) {
            if let (true, Some(rate)) = (credit > 0, bucket.in_force(self.category)) {
                bucket.give_back(credit, rate);
            }
        }
    }
}

/// A tunnel's gates, one per direction; `None` where nothing can throttle it.
#[derive(Default)]
pub struct Gates {
    pub upload: Option<Box<Gate>>,
    pub download: Option<Box<Gate>>,
}

/// A stream whose reads wait for one gate and whose writes wait for another, for bytes that do
/// not go through the tunnel copy (the plain-HTTP lane: CRL and OCSP answers, OCSP requests).
/// Each read or write moves at most one chunk and pays for it; the next one waits its turn.
pub struct Paced<S> {
    inner: S,
    reads: Option<Box<Gate>>,
    writes: Option<Box<Gate>>,
}

impl<S> Paced<S> {
    pub fn new(inner: S, reads: Option<Box<Gate>>, writes: Option<Box<Gate>>) -> Self {
        Self {
            inner,
            reads,
            writes,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Paced<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let Some(gate) = &mut this.reads else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        if gate.is_waiting() {
            ready!(gate.poll_admit(cx));
        }
        let Some(limit) = gate.read_limit() else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        let want = buf.remaining().min(limit);
        let mut part = ReadBuf::new(buf.initialize_unfilled_to(want));
        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut part))?;
        let n = part.filled().len();
        buf.advance(n);
        if n > 0 {
            gate.admit(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Paced<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let Some(gate) = &mut this.writes else {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        };
        if gate.is_waiting() {
            ready!(gate.poll_admit(cx));
        }
        let limit = gate.read_limit().unwrap_or(data.len());
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &data[..data.len().min(limit)]))?;
        if n > 0 && gate.read_limit().is_some() {
            gate.admit(n);
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Which budget a bucket is: scope, whose (a branch, or a group of branches), direction.
#[derive(Clone, Debug, PartialEq, Eq)]
struct BudgetKey {
    scope: Scope,
    /// The branch (each-branch) or the group's label (all-branches: "*" or "a+b").
    name: String,
    /// all-branches: the branches sharing it; `None` is everyone.
    members: Option<Vec<String>>,
    direction: Direction,
}

impl BudgetKey {
    fn covers(&self, branch: &str) -> bool {
        match self.scope {
            Scope::EachBranch => self.name == branch,
            Scope::AllBranches => self
                .members
                .as_ref()
                .is_none_or(|m| m.iter().any(|b| b == branch)),
        }
    }

    fn labels(&self) -> ThrottleLabels {
        ThrottleLabels {
            scope: self.scope.as_str(),
            budget: self.name.clone(),
            direction: self.direction.as_str(),
        }
    }
}

struct Budget {
    key: BudgetKey,
    bucket: Arc<Bucket>,
    /// Schedules (indices) that set this budget's limit.
    drivers: Vec<usize>,
}

/// Every budget the configured schedules can put in force, and the schedules themselves.
#[derive(Default)]
pub struct Throttles {
    schedules: Vec<Schedule>,
    budgets: Vec<Budget>,
    /// Categories named by any schedule; a category's bit is its position.
    categories: Vec<String>,
    metrics: Option<Arc<Metrics>>,
}

/// What a budget is set to at one instant, for `portcullis schedule` and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InForce {
    pub scope: Scope,
    pub budget: String,
    pub direction: Direction,
    pub schedule: String,
    pub rate: u64,
}

/// What `retune` did: the limits now in force and when they next change.
pub struct Retuned {
    pub in_force: Vec<InForce>,
    pub next: Option<Timestamp>,
}

impl Throttles {
    /// Budgets for `schedules`; buckets of `previous` with the same key are taken over, so
    /// tunnels open across a reload keep sharing them.
    pub fn new(
        schedules: &[Schedule],
        branches: &[&str],
        previous: Option<&Throttles>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        // A category keeps its bit across reloads: open tunnels' gates hold the bit they were
        // made with, and carried-over buckets are retuned with the new snapshot's bits.
        let mut categories: Vec<String> =
            previous.map(|p| p.categories.clone()).unwrap_or_default();
        let wanted = || schedules.iter().flat_map(|s| s.categories.iter());
        if categories.len() + wanted().filter(|c| !categories.contains(c)).count() > 64 {
            categories.clear();
        }
        for c in wanted() {
            if !categories.contains(c) {
                categories.push(c.clone());
            }
        }
        categories.truncate(64);
        let mut budgets: Vec<Budget> = Vec::new();
        for (i, s) in schedules.iter().enumerate() {
            for direction in Direction::BOTH {
                if s.limit(direction).is_none() {
                    continue;
                }
                let keys: Vec<BudgetKey> = match s.scope {
                    Scope::EachBranch => branches
                        .iter()
                        .filter(|b| s.covers_branch(b))
                        .map(|b| BudgetKey {
                            scope: Scope::EachBranch,
                            name: (*b).to_owned(),
                            members: None,
                            direction,
                        })
                        .collect(),
                    Scope::AllBranches => {
                        let members = s.branches.as_ref().map(|list| {
                            let mut list = list.clone();
                            list.sort();
                            list.dedup();
                            list
                        });
                        // "*" cannot be a branch name: the everyone budget's label is unique.
                        let name = members.as_ref().map_or("*".into(), |m| m.join("+"));
                        vec![BudgetKey {
                            scope: Scope::AllBranches,
                            name,
                            members,
                            direction,
                        }]
                    }
                };
                for key in keys {
                    match budgets.iter_mut().find(|b| b.key == key) {
                        Some(budget) => budget.drivers.push(i),
                        None => {
                            let bucket = previous
                                .and_then(|p| p.budgets.iter().find(|b| b.key == key))
                                .map(|b| b.bucket.clone())
                                .unwrap_or_else(|| Arc::new(bucket_for(&key, metrics.as_deref())));
                            budgets.push(Budget {
                                key,
                                bucket,
                                drivers: vec![i],
                            });
                        }
                    }
                }
            }
        }
        Self {
            schedules: schedules.to_vec(),
            budgets,
            categories,
            metrics,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.budgets.is_empty()
    }

    /// The gate for one direction of a tunnel of `branch` and `category`; `None` when no
    /// schedule can ever throttle it.
    pub fn gate(&self, branch: &str, category: &str, direction: Direction) -> Option<Box<Gate>> {
        let bit = 1u64 << self.categories.iter().position(|c| c == category)?;
        let mut buckets: Vec<(Scope, Arc<Bucket>)> = self
            .budgets
            .iter()
            .filter(|b| {
                b.key.direction == direction
                    && b.key.covers(branch)
                    && b.drivers
                        .iter()
                        .any(|&s| self.schedules[s].covers_category(category))
            })
            .map(|b| (b.key.scope, b.bucket.clone()))
            .collect();
        if buckets.is_empty() {
            return None;
        }
        // The branch's own budget first, then shared ones.
        buckets.sort_by_key(|(scope, _)| *scope != Scope::EachBranch);
        Some(Box::new(Gate::new(
            buckets.into_iter().map(|(_, b)| b).collect(),
            bit,
        )))
    }

    /// Both gates of a tunnel.
    pub fn gates(&self, branch: &str, category: &str) -> Gates {
        if self.budgets.is_empty() {
            return Gates::default();
        }
        Gates {
            upload: self.gate(branch, category, Direction::Upload),
            download: self.gate(branch, category, Direction::Download),
        }
    }

    /// The limits in force at `at` for tunnels of `branch` and `category` (either `None`:
    /// every branch, every category).
    pub fn in_force_at(
        &self,
        at: Timestamp,
        branch: Option<&str>,
        category: Option<&str>,
    ) -> Vec<InForce> {
        self.budgets
            .iter()
            .filter(|b| branch.is_none_or(|name| b.key.covers(name)))
            .filter_map(|b| {
                let (s, rate) = self.driver_at(b, at)?;
                let schedule = &self.schedules[s];
                category
                    .is_none_or(|c| schedule.covers_category(c))
                    .then(|| InForce {
                        scope: b.key.scope,
                        budget: b.key.name.clone(),
                        direction: b.key.direction,
                        schedule: schedule.name.clone(),
                        rate,
                    })
            })
            .collect()
    }

    /// The schedule in force for a budget at `at` (config validation leaves at most one; the
    /// lowest limit wins should there be more) and its rate.
    fn driver_at(&self, budget: &Budget, at: Timestamp) -> Option<(usize, u64)> {
        budget
            .drivers
            .iter()
            .filter(|&&s| self.schedules[s].in_force_at(at))
            .filter_map(|&s| Some((s, self.schedules[s].limit(budget.key.direction)?)))
            .min_by_key(|&(_, rate)| rate)
    }

    /// Sets every bucket to the limits in force at `at`.
    pub fn retune(&self, at: Timestamp) -> Retuned {
        let mut in_force = Vec::new();
        for budget in &self.budgets {
            let driver = self.driver_at(budget, at);
            let limit = driver.map(|(s, rate)| {
                let schedule = &self.schedules[s];
                in_force.push(InForce {
                    scope: budget.key.scope,
                    budget: budget.key.name.clone(),
                    direction: budget.key.direction,
                    schedule: schedule.name.clone(),
                    rate,
                });
                let bits = schedule
                    .categories
                    .iter()
                    .filter_map(|c| self.categories.iter().position(|k| k == c))
                    .fold(0u64, |bits, i| bits | 1 << i);
                (rate, bits)
            });
            budget.bucket.set(limit);
        }
        Retuned {
            in_force,
            next: crate::schedule::next_boundary(&self.schedules, at),
        }
    }

    /// After a reload to `next`: budgets it dropped lift their limits (tunnels holding them run
    /// free) and leave the metrics.
    pub fn retire_missing(&self, next: &Throttles) {
        for budget in &self.budgets {
            if !next
                .budgets
                .iter()
                .any(|b| Arc::ptr_eq(&b.bucket, &budget.bucket))
            {
                budget.bucket.retire();
                if let Some(metrics) = &self.metrics {
                    let labels = budget.key.labels();
                    metrics.throttle_limit.remove(&labels);
                    metrics.throttle_wait_seconds.remove(&labels);
                    metrics.throttled_bytes.remove(&labels);
                }
            }
        }
    }
}

fn bucket_for(key: &BudgetKey, metrics: Option<&Metrics>) -> Bucket {
    let mut bucket = Bucket::default();
    if let Some(m) = metrics {
        let labels = key.labels();
        bucket.limit = m.throttle_limit.get_or_create(&labels).clone();
        bucket.waited_seconds = m.throttle_wait_seconds.get_or_create(&labels).clone();
        bucket.throttled_bytes = m.throttled_bytes.get_or_create(&labels).clone();
    }
    bucket
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    /// Sends `total` bytes in `chunk`-sized reads through `gate`; returns when done.
    async fn send(gate: &mut Gate, total: usize) -> Instant {
        let mut sent = 0;
        while sent < total {
            let n = gate.read_limit().unwrap_or(64 * 1024).min(total - sent);
            if gate.read_limit().is_some() {
                gate.admit(n);
                poll_fn(|cx| gate.poll_admit(cx)).await;
            }
            sent += n;
        }
        Instant::now()
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_holds_the_rate_and_grants_only_a_short_burst() {
        let bucket = Arc::new(Bucket::default());
        bucket.set(Some((100_000, 1)));
        let start = Instant::now();
        let mut gate = Gate::new(vec![bucket.clone()], 1);
        let done = send(&mut gate, 1_000_000).await;
        let took = done - start;
        // 1 MB at 100 kB/s: 10 s less at most one 50 ms burst.
        assert!(
            took >= Duration::from_millis(9_940) && took <= Duration::from_millis(10_010),
            "{took:?}"
        );
        assert_eq!(bucket.throttled_bytes.get(), 1_000_000);
        assert!(bucket.waited_seconds.get() > 9.0);
    }

    #[tokio::test(start_paused = true)]
    async fn equal_tunnels_get_equal_shares() {
        let bucket = Arc::new(Bucket::default());
        bucket.set(Some((400_000, 1)));
        let sent: Vec<Arc<AtomicU64>> = (0..4).map(|_| Arc::default()).collect();
        let start = Instant::now();
        let tasks: Vec<_> = sent
            .iter()
            .map(|counter| {
                let (bucket, counter) = (bucket.clone(), counter.clone());
                tokio::spawn(async move {
                    let mut gate = Gate::new(vec![bucket], 1);
                    while Instant::now() - start < Duration::from_secs(5) {
                        let n = gate.read_limit().unwrap();
                        gate.admit(n);
                        poll_fn(|cx| gate.poll_admit(cx)).await;
                        counter.fetch_add(n as u64, Relaxed);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let shares: Vec<f64> = sent.iter().map(|c| c.load(Relaxed) as f64).collect();
        let total: f64 = shares.iter().sum();
        let jain = total * total / (4.0 * shares.iter().map(|x| x * x).sum::<f64>());
        assert!(jain > 0.99, "Jain's index {jain} for {shares:?}");
        // 5 s at 400 kB/s, plus one burst and the chunks in flight.
        assert!((1_990_000.0..=2_150_000.0).contains(&total), "{total}");
    }

    #[tokio::test(start_paused = true)]
    async fn short_reads_get_the_full_rate() {
        let bucket = Arc::new(Bucket::default());
        bucket.set(Some((400_000, 1)));
        let start = Instant::now();
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let bucket = bucket.clone();
                tokio::spawn(async move {
                    let mut gate = Gate::new(vec![bucket], 1);
                    let mut sent = 0u64;
                    // Sockets often hold less than a chunk: 60% of it here.
                    while Instant::now() - start < Duration::from_secs(10) {
                        let n = gate.read_limit().unwrap() * 6 / 10;
                        gate.admit(n);
                        poll_fn(|cx| gate.poll_admit(cx)).await;
                        sent += n as u64;
                    }
                    sent
                })
            })
            .collect();
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        // At most one burst and each tunnel's last read (finishing after 10 s) over.
        assert!(
            (3_960_000..=4_130_000).contains(&total),
            "{total} of 4,000,000"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_retune_reaches_waiting_tunnels_within_a_second() {
        let bucket = Arc::new(Bucket::default());
        bucket.set(Some((10_000, 1)));
        // Eight tunnels queue 8 x 1 KiB at 10 kB/s: the last waits ~0.8 s.
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let bucket = bucket.clone();
            tasks.push(tokio::spawn(async move {
                let mut gate = Gate::new(vec![bucket], 1);
                send(&mut gate, 100_000).await
            }));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        // 800 kB at 10 kB/s would take 80 s; lifted, they finish within the recheck period.
        let lifted = Instant::now();
        bucket.set(Some((100_000_000, 1)));
        for t in tasks {
            let done = t.await.unwrap();
            assert!(
                done - lifted <= Duration::from_secs(1),
                "{:?}",
                done - lifted
            );
        }
        // Slowed down again: a new tunnel takes the low rate.
        bucket.set(Some((10_000, 1)));
        let start = Instant::now();
        let mut gate = Gate::new(vec![bucket.clone()], 1);
        let done = send(&mut gate, 20_000).await;
        assert!(
            done - start >= Duration::from_millis(1_900),
            "{:?}",
            done - start
        );
        // Lifted entirely: no wait, no limit read.
        bucket.set(None);
        assert_eq!(gate.read_limit(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_obeys_its_branch_budget_and_the_shared_one() {
        let branch = Arc::new(Bucket::default());
        let shared = Arc::new(Bucket::default());
        branch.set(Some((200_000, 1)));
        shared.set(Some((500_000, 1)));
        let start = Instant::now();
        // Two tunnels of one branch (its own 200 kB/s) and two of another branch, all under
        // the shared 500 kB/s: the branch gets its 200, the others the remaining 300.
        let mut tasks = Vec::new();
        for buckets in [
            vec![branch.clone(), shared.clone()],
            vec![branch.clone(), shared.clone()],
            vec![shared.clone()],
            vec![shared.clone()],
        ] {
            tasks.push(tokio::spawn(async move {
                let mut gate = Gate::new(buckets, 1);
                let mut sent = 0u64;
                while Instant::now() - start < Duration::from_secs(10) {
                    let n = gate.read_limit().unwrap();
                    gate.admit(n);
                    poll_fn(|cx| gate.poll_admit(cx)).await;
                    sent += n as u64;
                }
                sent
            }));
        }
        let mut sent = Vec::new();
        for t in tasks {
            sent.push(t.await.unwrap() as f64);
        }
        let (branch_total, total) = (sent[0] + sent[1], sent.iter().sum::<f64>());
        // The last chunk of each tunnel may finish just after the 10 s: a chunk over.
        assert!(
            (2_000_000.0 * 0.97..=2_000_000.0 * 1.04).contains(&branch_total),
            "{sent:?}"
        );
        assert!(
            (5_000_000.0 * 0.98..=5_000_000.0 * 1.02).contains(&total),
            "{sent:?}"
        );
    }

    fn schedule(name: &str, days: &str, hours: &str, scope: Scope, upload: u64) -> Schedule {
        let (start, end) = crate::schedule::parse_window(hours).unwrap();
        Schedule {
            name: name.into(),
            days: crate::schedule::parse_days(days).unwrap(),
            start,
            end,
            zone: jiff::tz::TimeZone::get("Europe/London").unwrap(),
            zone_name: "Europe/London".into(),
            upload: Some(upload),
            download: None,
            scope,
            branches: None,
            categories: vec!["storage".into()],
        }
    }

    #[tokio::test]
    async fn retune_follows_the_windows_and_gates_go_only_where_schedules_reach() {
        let schedules = [
            schedule(
                "office",
                "mon-fri",
                "09:00-17:00",
                Scope::EachBranch,
                1_000_000,
            ),
            schedule(
                "night",
                "daily",
                "22:00-06:00",
                Scope::AllBranches,
                5_000_000,
            ),
        ];
        let throttles = Throttles::new(&schedules, &["london", "unassigned"], None, None);
        let london = |at: &str| {
            let at: Timestamp = at.parse().unwrap();
            let next = throttles.retune(at).next;
            let gate = throttles
                .gate("london", "storage", Direction::Upload)
                .unwrap();
            let rates: Vec<Option<u64>> = gate
                .buckets
                .iter()
                .map(|b| b.in_force(gate.category))
                .collect();
            (rates, next.map(|n| n.to_string()))
        };
        // Monday 10:00 London (GMT): office hours; the next change is 17:00.
        assert_eq!(
            london("2026-11-23T10:00:00Z"),
            (
                vec![Some(1_000_000), None],
                Some("2026-11-23T17:00:00Z".into())
            )
        );
        assert_eq!(
            london("2026-11-23T17:00:00Z"),
            (vec![None, None], Some("2026-11-23T22:00:00Z".into()))
        );
        assert_eq!(
            london("2026-11-23T23:00:00Z"),
            (
                vec![None, Some(5_000_000)],
                Some("2026-11-24T06:00:00Z".into())
            )
        );
        // Summer time: office hours start at 08:00 UTC.
        assert_eq!(
            london("2026-06-01T08:00:00Z").0,
            vec![Some(1_000_000), None]
        );
        let at = "2026-11-23T10:00:00Z".parse().unwrap();
        let in_force = throttles.in_force_at(at, None, None);
        assert_eq!(in_force.len(), 2, "london and unassigned: {in_force:?}");
        assert!(in_force.iter().all(|l| l.schedule == "office"));
        let london_now = throttles.in_force_at(at, Some("london"), Some("storage"));
        assert_eq!(london_now.len(), 1);
        assert_eq!(
            (london_now[0].budget.as_str(), london_now[0].rate),
            ("london", 1_000_000)
        );
        assert!(
            throttles
                .in_force_at(at, Some("london"), Some("login"))
                .is_empty()
        );
        // Nothing reaches downloads, other categories or branches no budget covers.
        assert!(
            throttles
                .gate("london", "storage", Direction::Download)
                .is_none()
        );
        assert!(
            throttles
                .gate("london", "login", Direction::Upload)
                .is_none()
        );
        let paris = throttles
            .gate("paris", "storage", Direction::Upload)
            .unwrap();
        assert_eq!(paris.buckets.len(), 1, "only the shared budget");
        // A reload keeps buckets by budget; a budget it drops lifts its limit.
        throttles.retune("2026-11-23T10:00:00Z".parse().unwrap());
        let next = Throttles::new(
            &schedules[1..],
            &["london", "unassigned"],
            Some(&throttles),
            None,
        );
        throttles.retire_missing(&next);
        let old_gate = throttles
            .gate("london", "storage", Direction::Upload)
            .unwrap();
        assert_eq!(old_gate.buckets[0].in_force(old_gate.category), None);
        assert!(Arc::ptr_eq(
            &next.budgets[0].bucket,
            &throttles.budgets.last().unwrap().bucket
        ));
    }

    #[tokio::test]
    async fn a_reload_keeps_category_bits_and_retired_budgets_stay_lifted() {
        let mut storage = schedule("day", "daily", "00:00-00:00", Scope::EachBranch, 1_000);
        storage.categories = vec!["storage".into(), "sync".into()];
        let before = Throttles::new(std::slice::from_ref(&storage), &["london"], None, None);
        let at: Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        before.retune(at);
        let open = before.gate("london", "storage", Direction::Upload).unwrap();
        // The reload lists a new category first and drops sync: storage keeps its bit.
        storage.categories = vec!["backup".into(), "storage".into()];
        let after = Throttles::new(
            std::slice::from_ref(&storage),
            &["london"],
            Some(&before),
            None,
        );
        after.retune(at);
        assert_eq!(
            open.read_limit(),
            Some(MIN_CHUNK),
            "the open tunnel is still throttled"
        );
        let sync = after.gate("london", "sync", Direction::Upload);
        assert!(sync.is_none(), "sync is no longer throttled");
        // A budget the next reload drops is lifted, and a late retune of the old snapshot
        // cannot put it back in force.
        let none = Throttles::new(&[], &["london"], Some(&after), None);
        after.retire_missing(&none);
        after.retune(at);
        assert_eq!(open.read_limit(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_that_ends_while_waiting_gives_its_turn_back() {
        let bucket = Arc::new(Bucket::default());
        bucket.set(Some((10_000, 1)));
        let mut first = Gate::new(vec![bucket.clone()], 1);
        // Ten seconds' worth queued, then the tunnel goes away.
        first.admit(100_000);
        assert!(
            poll_fn(|cx| Poll::Ready(first.poll_admit(cx)))
                .await
                .is_pending()
        );
        drop(first);
        let start = Instant::now();
        let mut next = Gate::new(vec![bucket], 1);
        let done = send(&mut next, 1_000).await;
        assert!(
            done - start < Duration::from_millis(200),
            "{:?}",
            done - start
        );
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_of_other_categories_pass_untouched() {
        let bucket = Arc::new(Bucket::default());
        bucket.set(Some((1_000, 0b01)));
        let gate = Gate::new(vec![bucket], 0b10);
        assert_eq!(gate.read_limit(), None);
    }
}
