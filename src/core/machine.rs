//! The per-volume state machine (stub, being written).

use super::effect::Effect;

/// What the machine decided: effects to carry out and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Requests for the executors, in order.
    pub effects: Vec<Effect>,
    /// One line saying what was decided and why.
    pub reason: String,
}

/// Coarse phase for status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Not started.
    Init,
}

/// The per-volume state machine.
#[derive(Debug)]
pub struct VolumeMachine;
