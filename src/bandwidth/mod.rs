//! Bandwidth: schedules say which limits are in force when ([`schedule`], [`units`]); each
//! budget is a token bucket of pure arithmetic ([`bucket`]); a tunnel's direction takes turns
//! in its budgets through a [`gate::Gate`] (also pure) and a [`paced::Pacer`] that reads the
//! clock and sleeps; [`budgets`] maps schedules to buckets and tunnels to pacers; [`retune`]
//! puts limits in force at window boundaries.

pub mod bucket;
pub mod budgets;
pub mod gate;
pub mod paced;
pub mod retune;
pub mod schedule;
pub mod units;

pub use bucket::Demand;
pub use budgets::{BudgetRef, InForce, Retuned, Throttles};
pub use paced::{Paced, Pacer, Pacers, QueueBound, poll_turn};
