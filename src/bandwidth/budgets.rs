//! Every budget the configured schedules can put in force: which tunnels each one reaches
//! (scope, branch, direction, categories), the pacers a tunnel gets, and `retune`, which sets
//! every bucket to the limits in force at an instant. Buckets carry over reloads by budget.
//!
//! Cost model: a tunnel no schedule can ever throttle (its category or branch is not in any
//! schedule, or there are no schedules) gets no pacer at all. A tunnel with a pacer but no
//! budget in force pays one relaxed atomic load per bucket per chunk and keeps the zero-copy
//! path.

use super::bucket::{Bucket, Timeline};
use super::gate::Gate;
use super::paced::{Pacer, Pacers};
use super::schedule::{Direction, Schedule, Scope};
use crate::metrics::{Metrics, ThrottleLabels};
use jiff::Timestamp;
use std::sync::Arc;

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
pub struct Throttles {
    schedules: Vec<Schedule>,
    budgets: Vec<Budget>,
    /// Categories named by any schedule; a category's bit is its position.
    categories: Vec<String>,
    metrics: Option<Arc<Metrics>>,
    /// What bucket times count from; shared with the snapshots before and after a reload.
    timeline: Timeline,
    /// `limits.throttle_queue` in ms, given to every pacer (0: off).
    queue_millis: u32,
}

impl Default for Throttles {
    fn default() -> Self {
        Self {
            schedules: Vec::new(),
            budgets: Vec::new(),
            categories: Vec::new(),
            metrics: None,
            timeline: Timeline::starting_now(),
            queue_millis: super::QueueBound::default().millis,
        }
    }
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

/// One budget as fleet mode sees it.
pub struct BudgetRef<'a> {
    pub scope: Scope,
    pub name: &'a str,
    pub direction: Direction,
    pub bucket: &'a Arc<Bucket>,
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
            timeline: previous.map_or_else(Timeline::starting_now, |p| p.timeline),
            queue_millis: super::QueueBound::default().millis,
        }
    }

    /// Pacers made from here on bound their queues to `queue` of the limit (`None`: off).
    pub fn with_queue(mut self, queue: Option<std::time::Duration>) -> Self {
        self.queue_millis = queue.map_or(0, |q| q.as_millis().min(u32::MAX as u128) as u32);
        self
    }

    /// Now on the buckets' timeline.
    pub fn now(&self) -> u64 {
        self.timeline.now()
    }

    pub fn is_empty(&self) -> bool {
        self.budgets.is_empty()
    }

    /// Every budget with its bucket (fleet mode measures them and sets their shares).
    pub fn budgets(&self) -> impl Iterator<Item = BudgetRef<'_>> {
        self.budgets.iter().map(|b| BudgetRef {
            scope: b.key.scope,
            name: &b.key.name,
            direction: b.key.direction,
            bucket: &b.bucket,
        })
    }

    /// The pacer for one direction of a tunnel of `branch` and `category`; `None` when no
    /// schedule can ever throttle it.
    pub fn pacer(&self, branch: &str, category: &str, direction: Direction) -> Option<Box<Pacer>> {
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
        let gate = Gate::new(buckets.into_iter().map(|(_, b)| b).collect(), bit);
        let mut pacer = Pacer::new(gate, self.timeline);
        pacer.queue.millis = self.queue_millis;
        Some(Box::new(pacer))
    }

    /// Both pacers of a tunnel.
    pub fn pacers(&self, branch: &str, category: &str) -> Pacers {
        if self.budgets.is_empty() {
            return Pacers::default();
        }
        Pacers {
            upload: self.pacer(branch, category, Direction::Upload),
            download: self.pacer(branch, category, Direction::Download),
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
        let now = self.timeline.now();
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
            budget.bucket.set(limit, now);
        }
        Retuned {
            in_force,
            next: super::schedule::next_boundary(&self.schedules, at),
        }
    }

    /// After a reload to `next`: budgets it dropped lift their limits (tunnels holding them run
    /// free) and leave the metrics.
    pub fn retire_missing(&self, next: &Throttles) {
        let now = self.timeline.now();
        for budget in &self.budgets {
            if !next
                .budgets
                .iter()
                .any(|b| Arc::ptr_eq(&b.bucket, &budget.bucket))
            {
                budget.bucket.retire(now);
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
    use crate::bandwidth::bucket::MIN_CHUNK;

    fn schedule(name: &str, days: &str, hours: &str, scope: Scope, upload: u64) -> Schedule {
        let (start, end) = crate::bandwidth::units::parse_window(hours).unwrap();
        Schedule {
            name: name.into(),
            days: crate::bandwidth::units::parse_days(days).unwrap(),
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
                .pacer("london", "storage", Direction::Upload)
                .unwrap();
            let gate = gate.gate();
            let rates: Vec<Option<u64>> = gate
                .buckets()
                .iter()
                .map(|b| b.in_force(gate.category()))
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
                .pacer("london", "storage", Direction::Download)
                .is_none()
        );
        assert!(
            throttles
                .pacer("london", "login", Direction::Upload)
                .is_none()
        );
        let paris = throttles
            .pacer("paris", "storage", Direction::Upload)
            .unwrap();
        assert_eq!(paris.gate().buckets().len(), 1, "only the shared budget");
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
            .pacer("london", "storage", Direction::Upload)
            .unwrap();
        let old_gate = old_gate.gate();
        assert_eq!(old_gate.buckets()[0].in_force(old_gate.category()), None);
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
        let open = before
            .pacer("london", "storage", Direction::Upload)
            .unwrap();
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
        let sync = after.pacer("london", "sync", Direction::Upload);
        assert!(sync.is_none(), "sync is no longer throttled");
        // A budget the next reload drops is lifted, and a late retune of the old snapshot
        // cannot put it back in force.
        let none = Throttles::new(&[], &["london"], Some(&after), None);
        after.retire_missing(&none);
        after.retune(at);
        assert_eq!(open.read_limit(), None);
    }

    #[test]
    fn pacers_carry_the_configured_throttle_queue() {
        let storage = schedule("day", "daily", "00:00-00:00", Scope::EachBranch, 1_000);
        let schedules = std::slice::from_ref(&storage);
        let millis = |throttles: Throttles| {
            let pacer = throttles.pacer("london", "storage", Direction::Upload);
            pacer.unwrap().queue.millis
        };
        let made = || Throttles::new(schedules, &["london"], None, None);
        assert_eq!(millis(made()), 100, "the default");
        let queue = Some(std::time::Duration::from_millis(300));
        assert_eq!(millis(made().with_queue(queue)), 300);
        assert_eq!(millis(made().with_queue(None)), 0, "off");
    }
}
