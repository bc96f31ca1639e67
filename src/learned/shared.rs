//! The local side of sharing learned destinations in fleet mode (Redis itself is the fleet's
//! `learned` module). Every change made here (a tunnel learned a name, an operator approved or
//! forgot one) is pending until Redis stamps it with its clock; a forget leaves a tombstone.
//! Every state, here and in Redis, is ordered by its stamp (a tombstone after a live entry of
//! the same stamp), and the newer one wins wherever they meet: Redis's newer state replaces
//! this replica's, and this replica's newer state (or one Redis lacks: it was emptied) is
//! written back. So a replica that was away applies what happened meanwhile instead of
//! re-adding it, and an emptied Redis is refilled instead of read as "everything forgotten".
//! Tombstones live [`TOMBSTONE_TTL_MS`]; a replica away longer than that cannot tell a swept
//! tombstone from an emptied Redis, so it drops (never restores) what Redis lacks.

use super::{Learned, Row, Seen, State};
use std::collections::HashMap;

/// How long a forget is remembered (in Redis and in every replica's state file): 90 days, far
/// longer than any outage a replica comes back from.
pub const TOMBSTONE_TTL_MS: i64 = 90 * 24 * 60 * 60 * 1000;

/// The last full read is saved again when it moved this much (not at every refresh).
const SYNCED_SAVE_STEP_MS: i64 = 60 * 60 * 1000;

/// One destination of one branch under one rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Place {
    pub branch: String,
    pub rule: String,
    pub host: String,
    pub port: u16,
}

impl Place {
    pub fn new(branch: &str, rule: &str, host: &str, port: u16) -> Self {
        Self {
            branch: branch.to_owned(),
            rule: rule.to_owned(),
            host: host.to_owned(),
            port,
        }
    }

    fn of(row: &Row) -> Self {
        Self::new(&row.branch, &row.rule, &row.host, row.seen.port)
    }
}

/// A forgotten destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tomb {
    /// Redis's time (ms) of the forget; meaningless while pending.
    pub stamp: i64,
    /// Forgotten here and not stamped by Redis yet: the change's number.
    pub pending: Option<u64>,
}

/// A destination's state as Redis holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Held {
    Present { first_seen: i64, approved: bool },
    Forgotten,
}

/// A destination's state with its stamp (Redis's time in ms of the change it comes from).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stamped {
    pub place: Place,
    pub stamp: i64,
    pub held: Held,
}

/// Which of two states of one destination is newer: the later stamp, and at the same stamp the
/// tombstone (a tie never revives what was forgotten).
fn order(stamp: i64, held: &Held) -> (i64, bool) {
    (stamp, *held == Held::Forgotten)
}

/// What a change made here asks of Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A tunnel learned it: added unless Redis holds it already.
    Learn,
    /// An operator approved it: added (or marked approved) over any state before.
    Approve,
    /// An operator forgot it: a tombstone over any state before.
    Forget,
}

/// A change made here that Redis has not stamped yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub place: Place,
    pub kind: Kind,
    pub first_seen: i64,
    id: u64,
}

/// What a reconciliation with Redis did, and what Redis should be told.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Destinations taken from the fleet, and dropped because the fleet forgot them.
    pub added: usize,
    pub removed: usize,
    /// States Redis lacks or holds older: to be written back.
    pub refill: Vec<Stamped>,
    /// Tombstones in Redis past [`TOMBSTONE_TTL_MS`]: to be deleted there.
    pub sweep: Vec<Stamped>,
    /// This replica's last read was longer ago than tombstones live: what Redis lacks was
    /// dropped here rather than written back.
    pub stale: bool,
}

impl Learned {
    /// Fleet mode: the changes made here that Redis has not stamped yet, forgets first (a
    /// destination forgotten and then approved again here is approved in the end).
    pub fn changes(&self) -> Vec<Change> {
        let mut state = self.state();
        if !state.maybe_pending {
            return Vec::new();
        }
        let mut out: Vec<Change> = state
            .tombstones
            .iter()
            .filter_map(|(place, tomb)| {
                Some(Change {
                    place: place.clone(),
                    kind: Kind::Forget,
                    first_seen: 0,
                    id: tomb.pending?,
                })
            })
            .collect();
        out.sort_by_key(|c| c.id);
        let mut rows: Vec<(Row, u64)> = state
            .rows(|_, seen| seen.pending.is_some())
            .into_iter()
            .filter_map(|row| {
                let id = row.seen.pending?;
                Some((row, id))
            })
            .collect();
        rows.sort_by_key(|(_, id)| *id);
        out.extend(rows.into_iter().map(|(row, id)| Change {
            place: Place::of(&row),
            kind: if row.seen.approved {
                Kind::Approve
            } else {
                Kind::Learn
            },
            first_seen: row.seen.first_seen,
            id,
        }));
        state.maybe_pending = !out.is_empty();
        out
    }

    /// Fleet mode: Redis stamped `changes` with `stamps` (in order). A destination changed
    /// again since stays pending.
    pub fn stamped(&self, changes: &[Change], stamps: &[i64]) {
        let mut state = self.state();
        for (change, &stamp) in changes.iter().zip(stamps) {
            let place = &change.place;
            if change.kind == Kind::Forget {
                if let Some(tomb) = state.tombstones.get_mut(place)
                    && tomb.pending == Some(change.id)
                {
                    *tomb = Tomb {
                        stamp,
                        pending: None,
                    };
                }
            } else if let Some(seen) = state
                .sets
                .get_mut(&place.branch)
                .and_then(|rules| rules.get_mut(&place.rule))
                .and_then(|set| set.get_mut(&place.host, place.port))
                && seen.pending == Some(change.id)
            {
                seen.pending = None;
                seen.stamp = stamp;
            }
        }
        state.dirty = true;
    }

    /// Fleet mode: makes this replica's sets and Redis's (`redis`, read at Redis's time `now`
    /// in ms) agree, the newer state winning on each destination. Pending changes here stay
    /// (they go to Redis next).
    pub fn reconcile(&self, redis: Vec<Stamped>, now: i64) -> Reconciled {
        let mut state = self.state();
        let mut out = Reconciled {
            stale: state.synced.is_some_and(|at| now - at > TOMBSTONE_TTL_MS),
            ..Reconciled::default()
        };
        let mut held = ByPlace::with_capacity(redis.len());
        for entry in redis {
            if entry.held == Held::Forgotten && now - entry.stamp > TOMBSTONE_TTL_MS {
                // Still compared with below (an older entry here goes), then deleted.
                out.sweep.push(entry.clone());
            }
            held.insert(entry.place, (entry.stamp, entry.held));
        }
        let updated = state.meet_entries(&held, &mut out);
        state.meet_tombstones(&held, now, &mut out);
        state.take_missing(held, now, &mut out);
        if state
            .synced
            .is_none_or(|at| now - at >= SYNCED_SAVE_STEP_MS)
        {
            state.dirty = true;
        }
        state.synced = Some(now).max(state.synced);
        let moved = out.added + out.removed > 0;
        if moved || updated {
            state.dirty = true;
        }
        if moved {
            self.metrics.count_all(&state.sets);
        }
        drop(state);
        if moved {
            self.changed.notify_one();
        }
        out
    }
}

/// Redis's states by destination.
type ByPlace = HashMap<Place, (i64, Held)>;

impl State {
    /// This replica's destinations against Redis's states: a newer one replaces it (a tombstone
    /// removes it), an older one or none is to be written back (none, after a stale replica's
    /// long absence: removed). Whether a destination's state changed.
    fn meet_entries(&mut self, held: &ByPlace, out: &mut Reconciled) -> bool {
        let mut updated = false;
        for (branch, rules) in self.sets.iter_mut() {
            for (rule, set) in rules.iter_mut() {
                let before = set.len();
                set.hosts.retain(|host, ports| {
                    ports.retain_mut(|seen| {
                        if seen.pending.is_some() {
                            return true;
                        }
                        let place = Place::new(branch, rule, host, seen.port);
                        match held.get(&place) {
                            Some((stamp, theirs))
                                if order(*stamp, theirs) >= (seen.stamp, false) =>
                            {
                                let Held::Present {
                                    first_seen,
                                    approved,
                                } = theirs
                                else {
                                    return false;
                                };
                                updated |= seen.stamp != *stamp || seen.approved != *approved;
                                seen.stamp = *stamp;
                                seen.approved = *approved;
                                seen.first_seen = seen.first_seen.min(*first_seen);
                                true
                            }
                            None if out.stale => false,
                            // Redis is older (restored from an old copy) or lacks it (emptied).
                            Some(_) | None => {
                                out.refill.push(Stamped {
                                    place,
                                    stamp: seen.stamp,
                                    held: Held::Present {
                                        first_seen: seen.first_seen,
                                        approved: seen.approved,
                                    },
                                });
                                true
                            }
                        }
                    });
                    !ports.is_empty()
                });
                let after = set.len();
                if after != before {
                    out.removed += before - after;
                    set.full_logged = false;
                }
            }
        }
        updated
    }

    /// This replica's tombstones against Redis's states, the same way; past their time they go.
    fn meet_tombstones(&mut self, held: &ByPlace, now: i64, out: &mut Reconciled) {
        self.tombstones.retain(|place, tomb| {
            if tomb.pending.is_some() {
                return true;
            }
            if now - tomb.stamp > TOMBSTONE_TTL_MS {
                return false;
            }
            let mine = (tomb.stamp, true);
            match held.get(place) {
                Some((stamp, theirs)) if order(*stamp, theirs) > mine => match theirs {
                    Held::Forgotten => {
                        tomb.stamp = *stamp;
                        true
                    }
                    // Approved or learned again since: taken by `take_missing`.
                    Held::Present { .. } => false,
                },
                Some((stamp, theirs)) if order(*stamp, theirs) == mine => true,
                None if out.stale => false,
                Some(_) | None => {
                    out.refill.push(Stamped {
                        place: place.clone(),
                        stamp: tomb.stamp,
                        held: Held::Forgotten,
                    });
                    true
                }
            }
        });
    }

    /// What Redis holds and this replica does not: destinations (unless forgotten here since)
    /// and tombstones (kept, to refill an emptied Redis).
    fn take_missing(&mut self, held: ByPlace, now: i64, out: &mut Reconciled) {
        for (place, (stamp, theirs)) in held {
            match theirs {
                Held::Present {
                    first_seen,
                    approved,
                } => {
                    let outranked = self.tombstones.get(&place).is_some_and(|tomb| {
                        tomb.pending.is_some() || (tomb.stamp, true) > (stamp, false)
                    });
                    if outranked {
                        continue;
                    }
                    let set = self.set_mut(&place.branch, &place.rule);
                    if set.get_mut(&place.host, place.port).is_some() {
                        continue;
                    }
                    set.insert(
                        &place.host,
                        Seen {
                            port: place.port,
                            first_seen,
                            last_seen: first_seen,
                            count: 0,
                            approved,
                            stamp,
                            pending: None,
                        },
                    );
                    out.added += 1;
                }
                Held::Forgotten if now - stamp <= TOMBSTONE_TTL_MS => {
                    self.tombstones.entry(place).or_insert(Tomb {
                        stamp,
                        pending: None,
                    });
                }
                Held::Forgotten => {}
            }
        }
    }
}
