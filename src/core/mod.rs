//! The pure failover core: one state machine per volume, deciding and explaining, never acting.
//!
//! Rules (checked by `scripts/check-core-purity.sh` in CI):
//! - no IO, no clock reads, no threads, no processes, no tokio, nix or ZooKeeper
//!   types: the caller passes `now` and carries out the returned effects;
//! - randomness only from the seeded [`rng::Rng`];
//! - every decision returns a one-line reason.

pub mod effect;
pub mod event;
pub mod machine;
pub mod policy;
pub mod rng;
pub mod time;

pub use effect::{Effect, TaskSignal};
pub use event::{Event, ExitStatus, FsckOutcome, Generation, Leftovers, Outcome};
pub use machine::{Decision, Phase, VolumeMachine};
pub use policy::{FenceBudget, FsckPolicy, RestartMode, RestartPolicy, Timings, VolumePolicy};
pub use time::Instant;
