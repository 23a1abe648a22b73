//! Inputs of the per-volume state machine: lease events, effect completions, timers and requests.

use super::time::Instant;

/// A lease generation: the czxid of the winning lock node, monotonic across the ensemble.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Generation(pub u64);

impl std::fmt::Display for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What an earlier run of the daemon left on this node, found at start-up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// A device attached for this volume, with the generation in its backend identifier if readable.
    pub attached: Option<Option<Generation>>,
    /// The volume path is still mounted.
    pub mounted: bool,
    /// A task process group of this volume is still alive.
    pub task_running: bool,
}

impl Leftovers {
    /// Nothing was left behind.
    pub fn is_empty(&self) -> bool {
        self.attached.is_none() && !self.mounted && !self.task_running
    }
}

/// Result of a filesystem check, mapped from the checker's exit code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FsckOutcome {
    /// Clean, or errors corrected (e2fsck exit 0 or 1).
    Clean,
    /// Corrected, but the checker asks for attention (e2fsck exit 2): mount, and warn.
    Warned(String),
    /// Damage left uncorrected or the check itself failed (exit ≥ 4, timeout): never mount.
    Refused(String),
}

/// How a task ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// Exit code 0.
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

/// Whether an effect succeeded; failures carry the executor's message.
pub type Outcome = Result<(), String>;

/// Everything the state machine reacts to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The daemon started this volume; `leftovers` is what start-up recovery found.
    Start {
        /// What an earlier run left behind.
        leftovers: Leftovers,
    },
    /// This node now holds the lease.
    LeaseWon {
        /// The lock node's czxid.
        generation: Generation,
        /// Whether the previous holder recorded a clean release.
        predecessor_clean: bool,
        /// Send time of the request whose answer told us we won.
        last_contact: Instant,
    },
    /// The server answered a request sent at `last_contact` (heartbeat), same session.
    /// The core fences on its own clock when these stop for `suspend_grace`,
    /// even if no disconnect is ever reported.
    LeaseHeartbeat {
        /// Send time of the answered request.
        last_contact: Instant,
    },
    /// The ZooKeeper connection is down; `last_contact` is when the server was last heard from.
    LeaseDisconnected {
        /// When a request last got an answer (its send time).
        last_contact: Instant,
    },
    /// The connection came back within the same session.
    LeaseReconnected {
        /// Send time of the first answered request after the reconnect.
        last_contact: Instant,
    },
    /// The lease is gone for certain: session expired, or the lock node was deleted.
    LeaseLost,
    /// Attach completed.
    Attached(Outcome),
    /// Filesystem check completed.
    FsckDone(FsckOutcome),
    /// Mount completed.
    Mounted(Outcome),
    /// Task start completed.
    TaskStarted(Outcome),
    /// The task (its process group leader) exited.
    TaskExited(ExitStatus),
    /// A signal was delivered to the task group (or failed to be).
    TaskSignalled(Outcome),
    /// Unmount completed.
    Unmounted(Outcome),
    /// Detach completed.
    Detached(Outcome),
    /// A deadline returned by `poll_timeout()` has passed.
    Timer,
    /// The daemon is stopping: fence, release cleanly, stop.
    Shutdown,
    /// Operator hand-over: fence, release cleanly; `rejoin` contends again afterwards.
    Release {
        /// Contend again after releasing (hand-over) instead of staying out (drain).
        rejoin: bool,
    },
    /// Operator forced detach: kill at once, unmount (forcibly if needed), detach, stay out.
    ForceDetach,
    /// Operator lets a drained or force-detached volume contend again.
    Resume,
}
