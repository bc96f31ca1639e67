//! The schedule task: puts each window's limits in force at its boundary. It sleeps until the
//! next boundary (or a reload), retunes the current snapshot's buckets, and announces what is
//! in force; nothing per chunk or per tunnel ever looks at a schedule.

use super::budgets::{Retuned, Throttles};
use arc_swap::ArcSwap;
use std::sync::Arc;
use std::time::Duration;

/// Longest the task sleeps: a wall-clock step (NTP, suspend) is noticed within this.
pub const RECHECK: Duration = Duration::from_secs(60);

/// Runs forever on the snapshot current in `current` (`throttles` picks its budgets); a
/// reload wakes it through `changed`. Without schedules it only waits for reloads. `clock` is
/// the wall clock (tests run it on tokio's paused time).
pub async fn retune_on_schedule<G>(
    current: Arc<ArcSwap<G>>,
    throttles: impl Fn(&G) -> &Throttles,
    changed: Arc<tokio::sync::Notify>,
    clock: impl Fn() -> jiff::Timestamp,
) {
    let mut announced = Vec::new();
    loop {
        let now = clock();
        let snapshot = current.load_full();
        let Retuned { in_force, next } = throttles(&snapshot).retune(now);
        if in_force != announced {
            for limit in &in_force {
                tracing::info!(
                    scope = limit.scope.as_str(),
                    budget = %limit.budget,
                    direction = limit.direction.as_str(),
                    schedule = %limit.schedule,
                    bytes_per_second = limit.rate,
                    "bandwidth limit in force"
                );
            }
            if in_force.is_empty() {
                tracing::info!("no bandwidth limit in force");
            }
            announced = in_force;
        }
        // A reload stored a new snapshot meanwhile: retune that one before sleeping (buckets it
        // took over may have just been set by the old schedules).
        if !Arc::ptr_eq(&snapshot, &current.load()) {
            continue;
        }
        drop(snapshot);
        match next {
            None => changed.notified().await,
            Some(next) => {
                // Just past the boundary, so the window has begun (or ended) when we look.
                let wait = now
                    .duration_until(next)
                    .unsigned_abs()
                    .saturating_add(Duration::from_millis(1))
                    .min(RECHECK);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = changed.notified() => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bandwidth::schedule::{Direction, Schedule, Scope};
    use crate::bandwidth::units::{parse_days, parse_window};
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn the_schedule_task_puts_limits_in_force_at_window_boundaries() {
        let (start, end) = parse_window("10:00-11:00").unwrap();
        let morning = Schedule {
            name: "morning".into(),
            days: parse_days("daily").unwrap(),
            start,
            end,
            zone: jiff::tz::TimeZone::UTC,
            zone_name: "UTC".into(),
            upload: Some(1_000_000),
            download: None,
            scope: Scope::EachBranch,
            branches: None,
            categories: vec!["storage".into()],
        };
        let throttles = Throttles::new(&[morning], &["unassigned"], None, None);
        let pacer = throttles
            .pacer("unassigned", "storage", Direction::Upload)
            .unwrap();
        let current = Arc::new(ArcSwap::from_pointee(throttles));
        // Wall time runs on tokio's paused clock from 09:59:30.
        let (base, started) = (
            "2026-11-23T09:59:30Z".parse::<jiff::Timestamp>().unwrap(),
            Instant::now(),
        );
        let clock = move || base + jiff::SignedDuration::try_from(started.elapsed()).unwrap();
        let task = tokio::spawn(retune_on_schedule(current, |t| t, Arc::default(), clock));
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(pacer.read_limit(), None, "09:59:50: not yet");
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(
            pacer.read_limit(),
            Some(50_000),
            "10:00:01: 1 MB/s in force"
        );
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(pacer.read_limit(), None, "11:00:01: lifted");
        task.abort();
    }
}
