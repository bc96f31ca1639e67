//! Branches an operator holds: draining (new requests get 503 with `Retry-After`, open
//! tunnels run until the deadline, then close) or quarantined (refused, open tunnels closed at
//! once), until released. A request of a branch without a hold pays one atomic load.

use crate::end::End;
use std::collections::BTreeMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What an operator put on a branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// Open tunnels close at `until` (`deadline` on this process's clock).
    Drain {
        until: jiff::Timestamp,
        deadline: Instant,
    },
    Quarantine,
}

/// `Retry-After` once a drain's deadline has passed (the branch stays drained until released).
pub const RETRY_AFTER_DRAINED: u64 = 60;

impl Hold {
    /// A drain whose open tunnels close `after` from now.
    pub fn drain_for(after: Duration) -> Self {
        let until = jiff::Timestamp::now()
            .checked_add(jiff::SignedDuration::try_from(after).unwrap_or_default())
            .unwrap_or(jiff::Timestamp::MAX);
        Hold::Drain {
            until,
            deadline: Instant::now() + after,
        }
    }

    /// A drain until the wall-clock time `until` (a hold another replica set).
    pub fn drain_until(until: jiff::Timestamp) -> Self {
        let left = until.duration_since(jiff::Timestamp::now());
        let left = Duration::try_from(left).unwrap_or_default();
        Hold::Drain {
            until,
            deadline: Instant::now() + left,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Hold::Drain { .. } => "draining",
            Hold::Quarantine => "quarantined",
        }
    }

    /// The end and `Retry-After` seconds (drains) a new request of a held branch gets.
    pub fn refusal(self) -> (End, Option<u64>) {
        match self {
            Hold::Drain { deadline, .. } => {
                let left = deadline.saturating_duration_since(Instant::now()).as_secs();
                let retry = if left == 0 { RETRY_AFTER_DRAINED } else { left };
                (End::BranchDrained, Some(retry))
            }
            Hold::Quarantine => (End::BranchQuarantined, None),
        }
    }
}

/// The holds in force, by branch name.
#[derive(Default)]
pub struct Holds {
    any: AtomicBool,
    by_branch: RwLock<BTreeMap<String, Hold>>,
}

impl Holds {
    /// The hold on `branch`, if any (one atomic load while no branch is held).
    pub fn of(&self, branch: &str) -> Option<Hold> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        self.read().get(branch).copied()
    }

    /// The end an open tunnel of `branch` must close with now, if its hold says so.
    pub fn closes(&self, branch: &str) -> Option<End> {
        match self.of(branch)? {
            Hold::Quarantine => Some(End::BranchQuarantined),
            Hold::Drain { deadline, .. } if deadline <= Instant::now() => Some(End::BranchDrained),
            Hold::Drain { .. } => None,
        }
    }

    /// Puts `hold` on `branch` (replacing one there); returns the one it replaced.
    pub fn set(&self, branch: &str, hold: Hold) -> Option<Hold> {
        let mut holds = self.write();
        let before = holds.insert(branch.to_owned(), hold);
        self.any.store(true, Ordering::Release);
        before
    }

    /// Takes the hold off `branch`; returns it.
    pub fn release(&self, branch: &str) -> Option<Hold> {
        let mut holds = self.write();
        let before = holds.remove(branch);
        self.any.store(!holds.is_empty(), Ordering::Release);
        before
    }

    /// Every hold, by branch name.
    pub fn all(&self) -> Vec<(String, Hold)> {
        self.read()
            .iter()
            .map(|(name, hold)| (name.clone(), *hold))
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Hold>> {
        self.by_branch.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Hold>> {
        self.by_branch.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_refuse_and_close_as_they_say_until_released() {
        let holds = Holds::default();
        assert_eq!(holds.of("london"), None);
        holds.set("london", Hold::drain_for(Duration::from_secs(30)));
        let (end, retry) = holds.of("london").unwrap().refusal();
        assert_eq!(end, End::BranchDrained);
        assert!((29..=30).contains(&retry.unwrap()), "{retry:?}");
        assert_eq!(holds.closes("london"), None, "before the deadline");
        holds.set("london", Hold::drain_for(Duration::ZERO));
        assert_eq!(holds.closes("london"), Some(End::BranchDrained));
        assert_eq!(holds.of("london").unwrap().refusal().1, Some(60));
        holds.set("paris", Hold::Quarantine);
        assert_eq!(holds.closes("paris"), Some(End::BranchQuarantined));
        assert_eq!(holds.of("rome"), None);
        assert!(holds.release("london").is_some());
        assert!(holds.release("paris").is_some());
        assert!(holds.release("paris").is_none());
        assert!(!holds.any.load(Ordering::Acquire));
    }
}
