//! Which process a daemon is (host, boot, pid, start time), and how a registration record is judged: ours, a dead incarnation, or a live rival.

use serde::{Deserialize, Serialize};

use super::error::LeaseError;

/// One run of one process: host name, kernel boot id, pid and the process start time.
///
/// A pid alone is reused; pid + start time (clock ticks since boot, `/proc/PID/stat` field 22)
/// within one boot id names exactly one process, so "is that process still alive" has an exact
/// answer on the same host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incarnation {
    /// Host name (`/proc/sys/kernel/hostname`).
    pub host: String,
    /// Kernel boot id (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
    /// Process id.
    pub pid: u32,
    /// Process start time in clock ticks since boot.
    pub start_ticks: u64,
}

impl Incarnation {
    /// This process.
    pub fn current() -> Result<Self, LeaseError> {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .map_err(|e| LeaseError::Config(format!("cannot read {p}: {e}")))
        };
        let pid = std::process::id();
        let start_ticks = process_start_ticks(pid).ok_or_else(|| {
            LeaseError::Config(format!("cannot read the start time of pid {pid} in /proc"))
        })?;
        Ok(Incarnation {
            host: read("/proc/sys/kernel/hostname")?,
            boot_id: read("/proc/sys/kernel/random/boot_id")?,
            pid,
            start_ticks,
        })
    }

    /// Whether this incarnation is running on this host right now. Only meaningful when `host`
    /// and `boot_id` are this machine's (the caller checks that).
    pub fn is_alive_here(&self) -> bool {
        process_start_ticks(self.pid) == Some(self.start_ticks)
    }

    /// `host pid N`, for messages.
    pub fn describe(&self) -> String {
        format!("host {} pid {}", self.host, self.pid)
    }
}

/// Field 22 (`starttime`) of `/proc/PID/stat`, if the process exists.
fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces or ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts with field 3 (state); starttime is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// What a registration node found at start says about the daemon that wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Claim {
    /// Written by this very session (a retried create).
    Mine,
    /// Written by this service in an earlier, expired session: safe to replace.
    MyEarlierSession,
    /// Written by an earlier run on this host that is dead now (crashed, killed): its
    /// session just has not expired yet. Safe to replace, and its lock nodes are stale.
    DeadIncarnation,
    /// Written by a daemon that is (or may be) alive: refuse.
    Live(String),
}

/// Judges a registration record against this service.
pub(crate) fn judge(
    found: &Registration,
    found_session: i64,
    me: &Incarnation,
    my_instance: u64,
    my_session: i64,
    alive: impl Fn(&Incarnation) -> bool,
) -> Claim {
    if found_session == my_session {
        return Claim::Mine;
    }
    if found.instance == my_instance && found.incarnation == *me {
        return Claim::MyEarlierSession;
    }
    let who = format!(
        "{}, ZooKeeper session {:#x}, registered at {} ms since the epoch",
        found.incarnation.describe(),
        found_session,
        found.started_at_ms
    );
    if found.incarnation.host != me.host {
        return Claim::Live(format!(
            "{who}; it runs on another host, whose liveness this host cannot check \
             (if that daemon is dead, its session expires within the session timeout)"
        ));
    }
    if found.incarnation.boot_id != me.boot_id {
        // Same host name, other boot: the writer died with that boot.
        return Claim::DeadIncarnation;
    }
    if alive(&found.incarnation) {
        return Claim::Live(format!("{who}; that process is alive on this host"));
    }
    Claim::DeadIncarnation
}

/// The registration node's data: which process holds this node id (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// Record format version (1).
    pub version: u32,
    /// The node id.
    pub node_id: String,
    /// The process.
    pub incarnation: Incarnation,
    /// Random id of the `LeaseService` instance (two services in one process differ).
    pub instance: u64,
    /// When it registered (ms since the Unix epoch).
    pub started_at_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inc(host: &str, boot: &str, pid: u32) -> Incarnation {
        Incarnation {
            host: host.into(),
            boot_id: boot.into(),
            pid,
            start_ticks: 7,
        }
    }

    fn reg(i: Incarnation, instance: u64) -> Registration {
        Registration {
            version: 1,
            node_id: "n1".into(),
            incarnation: i,
            instance,
            started_at_ms: 0,
        }
    }

    #[test]
    fn judges_registration_records() {
        let me = inc("h", "b", 10);
        let yes = |_: &Incarnation| true;
        let no = |_: &Incarnation| false;
        assert_eq!(judge(&reg(me.clone(), 1), 5, &me, 1, 5, yes), Claim::Mine);
        assert_eq!(
            judge(&reg(me.clone(), 1), 4, &me, 1, 5, yes),
            Claim::MyEarlierSession
        );
        // Another service in this same live process: refused.
        assert!(matches!(
            judge(&reg(me.clone(), 2), 4, &me, 1, 5, |i| i == &me),
            Claim::Live(_)
        ));
        // Same host and boot, the process is gone: a crashed incarnation.
        assert_eq!(
            judge(&reg(inc("h", "b", 9), 3), 4, &me, 1, 5, no),
            Claim::DeadIncarnation
        );
        // Same host, earlier boot.
        assert_eq!(
            judge(&reg(inc("h", "old", 10), 3), 4, &me, 1, 5, yes),
            Claim::DeadIncarnation
        );
        // Another host: never taken over.
        let other = judge(&reg(inc("h2", "b", 9), 3), 4, &me, 1, 5, no);
        assert!(
            matches!(&other, Claim::Live(w) if w.contains("host h2")),
            "{other:?}"
        );
    }

    #[test]
    fn reads_this_process() {
        let me = Incarnation::current().unwrap();
        assert!(me.is_alive_here());
        let mut other = me.clone();
        other.start_ticks += 1;
        assert!(!other.is_alive_here());
    }
}
