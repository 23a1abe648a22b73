//! The narrated demo scenario: three simulated nodes through a partition, a daemon kill, a pause and a hand-over.

use std::time::Duration;

use super::{run, Faults, Scripted, ScriptedKind, SimConfig, SimOutcome, Target};
use crate::core::time::fmt_duration;

/// The demo's configuration: no random faults, four scripted ones against whoever holds the volume.
pub fn demo_config() -> SimConfig {
    let mut cfg = SimConfig::standard();
    cfg.faults = Faults {
        weights: [0; 5],
        mean_gap: Duration::from_secs(1_000_000),
        attach_fail: 0.0,
        fsck_refuse: 0.0,
        mount_fail: 0.0,
        start_fail: 0.0,
        unmount_busy: 0.0,
        unmount_hang: 0.0,
        detach_fail: 0.0,
        ignore_term: 0.0,
        slow_kill: 0.0,
    };
    cfg.fault_window = Duration::from_secs(70);
    cfg.liveness_bound = Duration::from_secs(60);
    cfg.trace = true;
    let s = Duration::from_secs;
    cfg.script = vec![
        Scripted {
            at: s(10),
            target: Target::Holder,
            kind: ScriptedKind::Partition(s(20)),
        },
        Scripted {
            at: s(45),
            target: Target::Holder,
            kind: ScriptedKind::KillDaemon(s(1)),
        },
        Scripted {
            at: s(75),
            target: Target::Holder,
            kind: ScriptedKind::Pause(s(15)),
        },
        Scripted {
            at: s(110),
            target: Target::Holder,
            kind: ScriptedKind::Release,
        },
    ];
    cfg
}

/// Runs the demo and returns its narrated lines and the outcome.
pub fn demo(seed: u64) -> (Vec<String>, SimOutcome) {
    let cfg = demo_config();
    let o = run(seed, &cfg);
    let t = &cfg.policy.timings;
    let mut lines = vec![
        format!(
            "simulated cluster: 3 nodes, one volume; ZooKeeper session timeout {}, suspend_grace {}, stop_grace {}, lock_delay {}, watchdog {}",
            fmt_duration(t.session_timeout),
            fmt_duration(t.suspend_grace),
            fmt_duration(t.stop_grace),
            fmt_duration(t.lock_delay),
            t.watchdog_timeout.map_or("off".to_string(), fmt_duration),
        ),
        "scripted faults: holder cut from ZooKeeper at 10s (20s), holder daemon kill -9 at 45s, holder SIGSTOP at 75s (15s), operator hand-over at 110s".to_string(),
        String::new(),
    ];
    lines.extend(
        o.trace
            .iter()
            .filter(|l| !l.contains("nothing to do"))
            .cloned(),
    );
    lines.push(String::new());
    let downs: Vec<String> = o.downtimes.iter().map(|d| fmt_duration(*d)).collect();
    lines.push(format!(
        "summary: {} faults, {} failovers, {} watchdog reset(s); task downtime per failover: {}",
        o.faults,
        o.failovers,
        o.watchdog_resets,
        if downs.is_empty() {
            "none".to_string()
        } else {
            downs.join(", ")
        }
    ));
    lines.push(match &o.violation {
        None => "invariants held at every step: never two nodes attached, nothing brought up without the current generation".to_string(),
        Some(v) => format!("INVARIANT BROKEN at {}: {}", v.at, v.what),
    });
    (lines, o)
}
