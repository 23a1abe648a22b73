//! Per-volume policy the core decides with: timings, fencing budget, restart and fsck policy.
//!
//! These are plain values built from the validated config (see `crate::config`).
//! The fencing budget lives here, next to the state machine that relies on it,
//! so that `check-config` and the simulation compute it the same way.

use std::time::Duration;

use super::time::fmt_duration;

/// The timings one volume's state machine works with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timings {
    /// ZooKeeper session timeout `T` (as negotiated with the server).
    pub session_timeout: Duration,
    /// How long a disconnected holder waits for contact before fencing.
    pub suspend_grace: Duration,
    /// Time between SIGTERM and SIGKILL of the task's process group.
    pub stop_grace: Duration,
    /// Time budgeted for unmounting the filesystem.
    pub unmount_budget: Duration,
    /// Time budgeted for detaching the device.
    pub detach_budget: Duration,
    /// Safety margin kept between the fence deadline and `T`
    /// (clock drift, round-trip time, scheduling).
    pub margin: Duration,
    /// Wait before attaching when the predecessor did not release cleanly.
    pub lock_delay: Duration,
    /// Hardware or systemd watchdog timeout; `None` when the watchdog is off.
    pub watchdog_timeout: Option<Duration>,
    /// Pause between retries of a failed unmount or detach.
    pub retry_interval: Duration,
    /// Failed unmount attempts after which the fence asks for a forced (lazy) unmount.
    pub force_unmount_after: u32,
    /// First back-off after an attach, fsck or mount failure; doubles per failure.
    pub backoff_initial: Duration,
    /// Upper bound of that back-off.
    pub backoff_max: Duration,
    /// How long a node stays out of contention after handing over a crash-looping task.
    pub handover_backoff: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            session_timeout: Duration::from_secs(10),
            suspend_grace: Duration::from_secs(2),
            stop_grace: Duration::from_secs(3),
            unmount_budget: Duration::from_secs(2),
            detach_budget: Duration::from_secs(1),
            margin: Duration::from_secs(1),
            lock_delay: Duration::from_secs(5),
            watchdog_timeout: None,
            retry_interval: Duration::from_millis(200),
            force_unmount_after: 3,
            backoff_initial: Duration::from_secs(2),
            backoff_max: Duration::from_secs(120),
            handover_backoff: Duration::from_secs(30),
        }
    }
}

/// One line of the fencing budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BudgetItem {
    /// Config key the duration comes from.
    pub key: &'static str,
    /// Its value.
    pub value: Duration,
}

/// The fencing budget: the worst-case time from last contact to a completed fence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FenceBudget {
    /// The terms, in the order the fence spends them.
    pub items: Vec<BudgetItem>,
    /// Their sum.
    pub total: Duration,
    /// What the sum must not exceed: the session timeout.
    pub limit: Duration,
}

impl FenceBudget {
    /// Whether the fence completes before another node can win the lease.
    pub fn fits(&self) -> bool {
        self.total <= self.limit
    }

    /// `suspend_grace 3s + stop_grace 5s + … = 12s` as one line.
    pub fn sum_line(&self) -> String {
        let terms: Vec<String> = self
            .items
            .iter()
            .map(|i| format!("{} {}", i.key, fmt_duration(i.value)))
            .collect();
        format!("{} = {}", terms.join(" + "), fmt_duration(self.total))
    }

    /// A sentence saying whether the budget holds and what it means.
    pub fn verdict(&self) -> String {
        if self.fits() {
            format!(
                "{} fits within the ZooKeeper session timeout {} ({} to spare)",
                self.sum_line(),
                fmt_duration(self.limit),
                fmt_duration(self.limit - self.total)
            )
        } else {
            format!(
                "{} exceeds the ZooKeeper session timeout {}: a partitioned holder \
                 could still be fencing when another node wins the lease",
                self.sum_line(),
                fmt_duration(self.limit)
            )
        }
    }
}

impl Timings {
    /// The fencing budget: `suspend_grace + stop_grace + unmount + detach + margin ≤ T`.
    pub fn fence_budget(&self) -> FenceBudget {
        let items = vec![
            BudgetItem {
                key: "suspend_grace",
                value: self.suspend_grace,
            },
            BudgetItem {
                key: "stop_grace",
                value: self.stop_grace,
            },
            BudgetItem {
                key: "unmount",
                value: self.unmount_budget,
            },
            BudgetItem {
                key: "detach",
                value: self.detach_budget,
            },
            BudgetItem {
                key: "margin",
                value: self.margin,
            },
        ];
        let total = items.iter().map(|i| i.value).sum();
        FenceBudget {
            items,
            total,
            limit: self.session_timeout,
        }
    }

    /// The fence deadline relative to last contact: `T − margin`.
    pub fn deadline_after_contact(&self) -> Duration {
        self.session_timeout.saturating_sub(self.margin)
    }
}

/// When a task that exited is started again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartMode {
    /// Restart after every exit, clean or not.
    Always,
    /// Restart after a failure; a clean exit (status 0) releases the volume cleanly.
    OnFailure,
    /// Never restart: any exit hands the volume over.
    Never,
}

/// The task restart policy; after `max_restarts` restarts the volume is handed over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    /// When to restart.
    pub mode: RestartMode,
    /// Restarts allowed under one lease before handing the volume over.
    pub max_restarts: u32,
    /// Pause before each restart.
    pub backoff: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            mode: RestartMode::OnFailure,
            max_restarts: 3,
            backoff: Duration::from_secs(1),
        }
    }
}

/// Whether to check the filesystem before mounting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsckPolicy {
    /// Preen (`e2fsck -p`): checks when the filesystem asks for it.
    Auto,
    /// Always check fully (`e2fsck -f -p`).
    Force,
    /// Never check (only for filesystems that cannot be checked, such as `dir` volumes).
    Never,
}

/// Everything one volume's state machine needs to decide.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumePolicy {
    /// Timings and budget.
    pub timings: Timings,
    /// Task restart policy.
    pub restart: RestartPolicy,
    /// fsck policy.
    pub fsck: FsckPolicy,
    /// Whether the volume has a device to attach (false for `dir` volumes).
    pub has_device: bool,
    /// Whether the node runs a task (false when the mount is handed to a scheduler).
    pub has_task: bool,
    /// Start held out (not contending) until a `Resume`: on-demand volumes, which
    /// contend only while something (dvdcli, a Mesos container) references them.
    pub start_out: bool,
}

impl Default for VolumePolicy {
    fn default() -> Self {
        VolumePolicy {
            timings: Timings::default(),
            restart: RestartPolicy::default(),
            fsck: FsckPolicy::Auto,
            has_device: true,
            has_task: true,
            start_out: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_budget_fits() {
        let b = Timings::default().fence_budget();
        assert!(b.fits(), "{}", b.verdict());
        assert_eq!(b.total, Duration::from_secs(9));
    }

    #[test]
    fn budget_line_reads_like_the_spec() {
        let t = Timings {
            session_timeout: Duration::from_secs(9),
            suspend_grace: Duration::from_secs(3),
            stop_grace: Duration::from_secs(5),
            unmount_budget: Duration::from_secs(2),
            detach_budget: Duration::from_secs(1),
            margin: Duration::from_secs(1),
            ..Timings::default()
        };
        let b = t.fence_budget();
        assert!(!b.fits());
        assert!(b.verdict().starts_with(
            "suspend_grace 3s + stop_grace 5s + unmount 2s + detach 1s + margin 1s = 12s exceeds the ZooKeeper session timeout 9s"
        ));
    }
}
