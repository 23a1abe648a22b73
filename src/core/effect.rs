//! Outputs of the per-volume state machine: requests for the executors, each with a completion event.

use super::event::Generation;

/// A signal the core asks to deliver to the task's whole process group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskSignal {
    /// SIGTERM: ask the task to stop.
    Term,
    /// SIGKILL: stop it now.
    Kill,
}

/// A request to the outside world. Each has a completion event (named in its doc).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Join the lock queue for this volume. Completes with `LeaseWon` (or `LeaseLost`).
    Contend,
    /// Leave the lock queue without holding the lease. No completion.
    Withdraw,
    /// Give up the lease; `clean` records "generation released cleanly" in the same
    /// multi-op. The lease module owns retrying it. No completion.
    Release {
        /// The generation being released.
        generation: Generation,
        /// Everything was fenced and no lock-delay obligation is pending.
        clean: bool,
    },
    /// Attach the device, labelled with the generation. Completes with `Attached`.
    Attach {
        /// Generation the attachment is made under.
        generation: Generation,
    },
    /// Check the filesystem. Completes with `FsckDone`.
    Fsck {
        /// Generation the check runs under.
        generation: Generation,
        /// Full check even when the filesystem looks clean.
        force: bool,
    },
    /// Mount the filesystem at the volume path. Completes with `Mounted`.
    Mount {
        /// Generation the mount is made under.
        generation: Generation,
    },
    /// Start the task. Completes with `TaskStarted`, later `TaskExited`.
    StartTask {
        /// Generation the task runs under (in its environment).
        generation: Generation,
    },
    /// Signal the task's process group. Completes with `TaskSignalled`.
    SignalTask(TaskSignal),
    /// Unmount; `force` allows killing holders and a lazy unmount as last resort.
    /// Completes with `Unmounted`.
    Unmount {
        /// Escalate: kill holders, lazy unmount as last resort.
        force: bool,
    },
    /// Detach the device and wait until it is free. Completes with `Detached`.
    Detach,
}
