//! What the outside may see of and do to one running tunnel: its bytes each way (added at the
//! same points the metrics are: every `METER_STEP`, each idle tick and the end, never per
//! chunk), which halves have closed, the time its throttled directions waited for their turn,
//! and a stop with the end it gives (an operator's close, a drain, a quarantine, a revocation).

use crate::end::End;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use tokio::sync::Notify;

/// One tunnel's live state; the relay updates it, the registry reads it.
#[derive(Default)]
pub struct Live {
    up: AtomicU64,
    down: AtomicU64,
    /// [`UP_DONE`] and [`DOWN_DONE`]: which direction has forwarded its end.
    done: AtomicU8,
    /// Nanoseconds each throttled direction waited for its turn, shared with its pacer.
    waits: [Option<Arc<AtomicU64>>; 2],
    stop: Notify,
    /// 1 + the position in `End::ALL` of the end a stop gives; 0 while not stopped.
    stop_end: AtomicU8,
}

/// The client's half has ended (it sent FIN and the upstream got it).
pub const UP_DONE: u8 = 1;
/// The upstream's half has ended.
pub const DOWN_DONE: u8 = 2;

impl Live {
    /// A tunnel whose throttled directions (if any) count their waits in `waits` (upload,
    /// download; see `Pacer::waits`).
    pub fn new(waits: [Option<Arc<AtomicU64>>; 2]) -> Self {
        Self {
            waits,
            ..Self::default()
        }
    }

    /// Bytes client to upstream and upstream to client counted so far.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn add(&self, up: u64, down: u64) {
        if up > 0 {
            self.up.fetch_add(up, Ordering::Relaxed);
        }
        if down > 0 {
            self.down.fetch_add(down, Ordering::Relaxed);
        }
    }

    pub(crate) fn mark_done(&self, half: u8) {
        self.done.fetch_or(half, Ordering::Relaxed);
    }

    /// [`UP_DONE`] | [`DOWN_DONE`] for the halves that have ended.
    pub fn done(&self) -> u8 {
        self.done.load(Ordering::Relaxed)
    }

    /// Seconds the throttled directions waited for bandwidth so far (upload + download).
    pub fn waited(&self) -> std::time::Duration {
        let nanos = self
            .waits
            .iter()
            .flatten()
            .map(|w| w.load(Ordering::Relaxed))
            .sum();
        std::time::Duration::from_nanos(nanos)
    }

    /// Ends the tunnel with `end` (its access line says so); the first stop wins. False when
    /// it was stopped already.
    pub fn stop(&self, end: End) -> bool {
        let code = End::ALL.iter().position(|e| *e == end).map_or(0, |i| i + 1) as u8;
        let first = self
            .stop_end
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first {
            // A permit: the relay sees it even if it is not waiting yet.
            self.stop.notify_one();
        }
        first
    }

    /// Whether a stop was asked for.
    pub fn stopped(&self) -> bool {
        self.stop_end.load(Ordering::Acquire) != 0
    }

    pub(crate) fn notify(&self) -> &Notify {
        &self.stop
    }

    /// The end a stop gave; `Closed` when none did.
    pub(crate) fn stop_end(&self) -> End {
        let code = self.stop_end.load(Ordering::Acquire) as usize;
        code.checked_sub(1)
            .and_then(|i| End::ALL.get(i))
            .copied()
            .unwrap_or(End::Closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_stop_wins_and_gives_its_end() {
        let live = Live::default();
        assert!(!live.stopped());
        assert!(live.stop(End::ClosedByOperator));
        assert!(!live.stop(End::BranchDrained));
        assert_eq!(live.stop_end(), End::ClosedByOperator);
        live.add(5, 0);
        live.add(0, 7);
        assert_eq!(live.bytes(), (5, 7));
    }
}
