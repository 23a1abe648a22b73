//! Prometheus metrics and the health endpoint: counters and histograms fed by the driver, rendered in the text format 0.0.4.
//!
//! # What is measured
//!
//! [`Metrics`] keeps what cannot be read off the status board: per-volume
//! counters and duration histograms, fed by [`Metrics::phase_changed`] on every
//! phase change, and the ZooKeeper session state, fed by
//! [`Metrics::session_state`]. [`Metrics::render`] adds what the board and the
//! lease module's contact clock show at scrape time. Every family is prefixed
//! `nbd_failover_`:
//!
//! | family | type | labels | meaning |
//! |---|---|---|---|
//! | `volume_state` | gauge | `volume`, `state` | 1 for the volume's current phase ([`Phase::name`]), 0 for every other phase |
//! | `volume_generation` | gauge | `volume` | generation (czxid) of the lease held; no sample while none is held |
//! | `volume_lease_held` | gauge | `volume` | 1 while this node holds the volume's lease |
//! | `volume_exposed` | gauge | `volume` | 1 while something is attached, mounted or running (or in flight) |
//! | `volume_fence_pending` | gauge | `volume` | 1 while suspended with a fence deadline armed |
//! | `volume_fence_deadline_seconds` | gauge | `volume` | seconds left until the fence deadline (negative once passed); only with a driver clock ([`Metrics::set_driver_clock`]) and while a deadline is armed |
//! | `volume_phase_age_seconds` | gauge | `volume` | seconds in the current phase; only with a driver clock |
//! | `fences_total` | counter | `volume` | fences completed (the volume left `fencing`) |
//! | `failovers_total` | counter | `volume` | take-overs: see below |
//! | `phase_duration_seconds` | histogram | `volume`, `phase` | time spent in `attaching`, `checking`, `mounting`, `starting`, `fencing` |
//! | `zookeeper_last_contact_age_seconds` | gauge | | seconds since the send time of the last answered ZooKeeper request; no sample before the first |
//! | `zookeeper_session_state` | gauge | `state` | 1 for the current session state (`connecting`, `connected`, `disconnected`, `expired`), 0 for the others |
//! | `build_info` | gauge | `version` | always 1 |
//! | `node_info` | gauge | `node` | always 1 |
//!
//! # Failovers
//!
//! A *failover* is counted when a volume reaches `running` for the first time
//! after this node won its lease. Leaving `contending` (the lease was won: the
//! volume goes on to `lock-delay`, `attaching`, `mounting` …) arms the count;
//! the first later entry into `running` fires it and disarms it; entering
//! `fencing`, `recovering`, `contending`, `out` or `stopped` disarms it
//! (the lease is being given up, so that acquisition never served). Hence:
//! - task restarts (`running → restart-wait → starting → running`) and
//!   reconnects (`running → suspended → running`) are not failovers: the
//!   lease was never lost;
//! - an acquisition whose attach, fsck or mount failed is not a failover;
//! - the first acquisition after the daemon starts *is* counted: from this
//!   node's point of view it took the volume over (from a previous holder or
//!   from nobody). Summed over the cluster, a volume's failovers are the
//!   number of times it was brought into service anywhere.
//!
//! # Durations
//!
//! `phase_duration_seconds` gets one observation each time a volume leaves
//! one of the five measured phases, with the time it spent there in one
//! stretch (the driver's `spent`). A stretch interrupted by `suspended` counts
//! as two observations. `recovering` (the fence of a previous incarnation's
//! leftovers) is neither a fence in `fences_total` nor a fence duration.
//!
//! # Layout
//!
//! - `text`: the exposition format writer (escaping, number format).
//! - `http`: [`serve`], the `/metrics` and `/healthz` endpoint.

mod http;
pub mod text;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::core::Phase;
use crate::daemon::VolumeStatus;

pub use http::serve;
use text::{Kind, Writer};

/// Prefix of every metric name.
pub const PREFIX: &str = "nbd_failover_";

/// Upper bounds (seconds) of the duration histogram buckets, ascending; `+Inf` is implicit.
/// Spans 1 ms (a fake or a no-op step) to 120 s (a long fsck, a slow task start).
pub const DURATION_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Session states shown in `zookeeper_session_state`, in order.
pub const SESSION_STATES: [&str; 4] = ["connecting", "connected", "disconnected", "expired"];

/// Every phase, in declaration order: the `state` label values of `volume_state`.
pub const ALL_PHASES: [Phase; 14] = [
    Phase::Init,
    Phase::Recovering,
    Phase::Contending,
    Phase::LockDelay,
    Phase::Attaching,
    Phase::Checking,
    Phase::Mounting,
    Phase::Starting,
    Phase::Running,
    Phase::RestartWait,
    Phase::Suspended,
    Phase::Fencing,
    Phase::Out,
    Phase::Stopped,
];

/// The phases whose durations are measured, in the order they are rendered.
pub const TIMED_PHASES: [Phase; 5] = [
    Phase::Attaching,
    Phase::Checking,
    Phase::Mounting,
    Phase::Starting,
    Phase::Fencing,
];

/// Index of `phase` in [`TIMED_PHASES`], if it is measured. Exhaustive on purpose:
/// a new phase must be classified here.
fn timed_index(phase: Phase) -> Option<usize> {
    match phase {
        Phase::Attaching => Some(0),
        Phase::Checking => Some(1),
        Phase::Mounting => Some(2),
        Phase::Starting => Some(3),
        Phase::Fencing => Some(4),
        Phase::Init
        | Phase::Recovering
        | Phase::Contending
        | Phase::LockDelay
        | Phase::Running
        | Phase::RestartWait
        | Phase::Suspended
        | Phase::Out
        | Phase::Stopped => None,
    }
}

/// What entering `to` from `from` does to the failover count (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FailoverStep {
    /// The lease was just won: arm.
    Arm,
    /// The volume serves: count if armed, then disarm.
    Fire,
    /// The lease is being given up: disarm.
    Disarm,
    /// No change.
    Keep,
}

fn failover_step(from: Phase, to: Phase) -> FailoverStep {
    match to {
        Phase::Running => FailoverStep::Fire,
        Phase::Fencing | Phase::Recovering | Phase::Contending | Phase::Out | Phase::Stopped => {
            FailoverStep::Disarm
        }
        Phase::Init
        | Phase::LockDelay
        | Phase::Attaching
        | Phase::Checking
        | Phase::Mounting
        | Phase::Starting
        | Phase::RestartWait
        | Phase::Suspended => {
            if from == Phase::Contending {
                FailoverStep::Arm
            } else {
                FailoverStep::Keep
            }
        }
    }
}

/// A cumulative histogram over [`DURATION_BUCKETS`].
#[derive(Clone, Debug, Default, PartialEq)]
struct Histogram {
    /// Observations `<=` each bound (not yet cumulative: one slot per bucket).
    buckets: [u64; DURATION_BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        if let Some(i) = DURATION_BUCKETS.iter().position(|&b| seconds <= b) {
            self.buckets[i] += 1;
        }
        self.sum += seconds;
        self.count += 1;
    }
}

#[derive(Clone, Debug, Default)]
struct VolumeCounters {
    fences: u64,
    failovers: u64,
    armed: bool,
    durations: [Histogram; TIMED_PHASES.len()],
}

#[derive(Default)]
struct Inner {
    session: Option<String>,
    volumes: BTreeMap<String, VolumeCounters>,
    clock: Option<Arc<dyn Fn() -> Duration + Send + Sync>>,
}

/// The daemon's metrics. Cheap to update from the driver; shared with the
/// HTTP endpoint through an `Arc`.
pub struct Metrics {
    node: String,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// Metrics for the daemon of node `node` (shown in `node_info`).
    pub fn new(node: &str) -> Self {
        Metrics {
            node: node.to_string(),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called by the driver on every phase change of a volume; `spent` is the
    /// time spent in `from`. Observes `spent` in the duration histogram when
    /// `from` is measured, counts a fence when `from` is `fencing`, and counts
    /// failovers as the module docs define them. `from == to` is ignored.
    pub fn phase_changed(&self, volume: &str, from: Phase, to: Phase, spent: Duration) {
        if from == to {
            return;
        }
        let mut inner = self.lock();
        let v = inner.volumes.entry(volume.to_string()).or_default();
        if let Some(i) = timed_index(from) {
            v.durations[i].observe(spent.as_secs_f64());
        }
        if from == Phase::Fencing {
            v.fences += 1;
        }
        match failover_step(from, to) {
            FailoverStep::Arm => v.armed = true,
            FailoverStep::Fire => {
                if v.armed || from == Phase::Contending {
                    v.failovers += 1;
                }
                v.armed = false;
            }
            FailoverStep::Disarm => v.armed = false,
            FailoverStep::Keep => {}
        }
    }

    /// ZooKeeper session state: `"connecting"`, `"connected"`, `"disconnected"` or
    /// `"expired"`. Another string is shown as given (with value 1, the four at 0).
    pub fn session_state(&self, state: &str) {
        self.lock().session = Some(state.to_string());
    }

    /// Gives the metrics the driver's clock (time since the driver started: the
    /// origin of [`VolumeStatus::since`] and [`VolumeStatus::fence_deadline`]), so
    /// that [`Metrics::render`] can show the phase age and the time left to the
    /// fence deadline. Without it those two families are left out.
    pub fn set_driver_clock(&self, now: Arc<dyn Fn() -> Duration + Send + Sync>) {
        self.lock().clock = Some(now);
    }

    /// Fences counted for `volume` so far.
    pub fn fences(&self, volume: &str) -> u64 {
        self.lock().volumes.get(volume).map_or(0, |v| v.fences)
    }

    /// Failovers counted for `volume` so far.
    pub fn failovers(&self, volume: &str) -> u64 {
        self.lock().volumes.get(volume).map_or(0, |v| v.failovers)
    }

    /// Renders everything in the text format 0.0.4. `board` gives per-volume
    /// phase, generation and fence deadline; `last_contact_age` is the seconds
    /// since the last answered ZooKeeper request (`None` if never).
    pub fn render(&self, board: &[VolumeStatus], last_contact_age: Option<f64>) -> String {
        let (session, counters, clock) = {
            let inner = self.lock();
            (
                inner.session.clone(),
                inner.volumes.clone(),
                inner.clock.clone(),
            )
        };
        let now = clock.map(|c| c());
        let mut board: Vec<&VolumeStatus> = board.iter().collect();
        board.sort_by(|a, b| a.name.cmp(&b.name));
        board.dedup_by(|a, b| a.name == b.name);
        // Counters cover volumes on the board and any the driver reported that are not (yet) on it.
        let mut names: Vec<&str> = board.iter().map(|s| s.name.as_str()).collect();
        names.extend(counters.keys().map(String::as_str));
        names.sort_unstable();
        names.dedup();
        let zero = VolumeCounters::default();
        let counters_of = |name: &str| counters.get(name).unwrap_or(&zero);

        let mut w = Writer::new();
        let n = |s: &str| format!("{PREFIX}{s}");

        let name = n("volume_state");
        w.family(
            &name,
            Kind::Gauge,
            "1 for the volume's current phase, 0 for every other phase.",
        );
        for s in &board {
            for p in ALL_PHASES {
                let v = if p == s.phase { 1.0 } else { 0.0 };
                w.sample(&name, &[("volume", &s.name), ("state", p.name())], v);
            }
        }

        let name = n("volume_generation");
        w.family(
            &name,
            Kind::Gauge,
            "Generation (lock node czxid) of the lease this node holds for the volume.",
        );
        for s in &board {
            if let Some(g) = s.generation {
                w.sample(&name, &[("volume", &s.name)], g.0 as f64);
            }
        }

        let name = n("volume_lease_held");
        w.family(
            &name,
            Kind::Gauge,
            "1 while this node holds the volume's lease.",
        );
        for s in &board {
            w.sample(
                &name,
                &[("volume", &s.name)],
                bool01(s.generation.is_some()),
            );
        }

        let name = n("volume_exposed");
        w.family(
            &name,
            Kind::Gauge,
            "1 while the volume is attached, mounted or its task runs on this node (or one of those is in flight).",
        );
        for s in &board {
            w.sample(&name, &[("volume", &s.name)], bool01(s.exposed));
        }

        let name = n("volume_fence_pending");
        w.family(
            &name,
            Kind::Gauge,
            "1 while the volume is suspended with a fence deadline armed.",
        );
        for s in &board {
            w.sample(
                &name,
                &[("volume", &s.name)],
                bool01(s.fence_deadline.is_some()),
            );
        }

        if let Some(now) = now {
            let name = n("volume_fence_deadline_seconds");
            w.family(
                &name,
                Kind::Gauge,
                "Seconds left until the fence deadline (negative once passed), while one is armed.",
            );
            for s in &board {
                if let Some(d) = s.fence_deadline {
                    let left = d.as_secs_f64() - now.as_secs_f64();
                    w.sample(&name, &[("volume", &s.name)], left);
                }
            }
            let name = n("volume_phase_age_seconds");
            w.family(
                &name,
                Kind::Gauge,
                "Seconds the volume has been in its current phase.",
            );
            for s in &board {
                let age = now.saturating_sub(s.since).as_secs_f64();
                w.sample(&name, &[("volume", &s.name)], age);
            }
        }

        let name = n("fences_total");
        w.family(
            &name,
            Kind::Counter,
            "Fences completed: the volume left the fencing phase (stop task, unmount, detach).",
        );
        for v in &names {
            w.sample(&name, &[("volume", v)], counters_of(v).fences as f64);
        }

        let name = n("failovers_total");
        w.family(
            &name,
            Kind::Counter,
            "Times the volume entered running for the first time after this node won its lease.",
        );
        for v in &names {
            w.sample(&name, &[("volume", v)], counters_of(v).failovers as f64);
        }

        let name = n("phase_duration_seconds");
        w.family(
            &name,
            Kind::Histogram,
            "Time spent in the attaching, checking (fsck), mounting, starting and fencing phases.",
        );
        let bucket = format!("{name}_bucket");
        let sum = format!("{name}_sum");
        let count = format!("{name}_count");
        for v in &names {
            let c = counters_of(v);
            for (p, h) in TIMED_PHASES.iter().zip(&c.durations) {
                let phase = p.name();
                let mut cumulative = 0;
                for (bound, n) in DURATION_BUCKETS.iter().zip(&h.buckets) {
                    cumulative += n;
                    let le = text::format_value(*bound);
                    w.sample(
                        &bucket,
                        &[("volume", v), ("phase", phase), ("le", &le)],
                        cumulative as f64,
                    );
                }
                w.sample(
                    &bucket,
                    &[("volume", v), ("phase", phase), ("le", "+Inf")],
                    h.count as f64,
                );
                w.sample(&sum, &[("volume", v), ("phase", phase)], h.sum);
                w.sample(&count, &[("volume", v), ("phase", phase)], h.count as f64);
            }
        }

        let name = n("zookeeper_last_contact_age_seconds");
        w.family(
            &name,
            Kind::Gauge,
            "Seconds since the send time of the last answered ZooKeeper request.",
        );
        if let Some(age) = last_contact_age {
            w.sample(&name, &[], age);
        }

        let name = n("zookeeper_session_state");
        w.family(
            &name,
            Kind::Gauge,
            "1 for the current ZooKeeper session state, 0 for the others.",
        );
        for st in SESSION_STATES {
            w.sample(
                &name,
                &[("state", st)],
                bool01(session.as_deref() == Some(st)),
            );
        }
        if let Some(other) = session.as_deref().filter(|s| !SESSION_STATES.contains(s)) {
            w.sample(&name, &[("state", other)], 1.0);
        }

        let name = n("build_info");
        w.family(&name, Kind::Gauge, "Build information; always 1.");
        w.sample(&name, &[("version", env!("CARGO_PKG_VERSION"))], 1.0);

        let name = n("node_info");
        w.family(&name, Kind::Gauge, "This daemon's node id; always 1.");
        w.sample(&name, &[("node", &self.node)], 1.0);

        w.finish()
    }
}

fn bool01(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}
