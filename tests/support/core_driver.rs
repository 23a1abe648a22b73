//! A minimal daemon for lease tests: the real core machine fed by real lease notices, with instant fake device/fsck/mount/task effects.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use nbd_failover::core::{
    self, Effect, Event, ExitStatus, FsckOutcome, Leftovers, Phase, Timings, VolumeMachine,
    VolumePolicy,
};
use nbd_failover::lease::{LeaseNotice, LeaseService};

/// One volume's machine, on the real monotonic clock.
pub struct CoreDriver {
    /// The machine.
    pub m: VolumeMachine,
    origin: Instant,
    volume: String,
    queue: VecDeque<Event>,
    /// Every decision's reason, with the time it was taken.
    pub reasons: Vec<(Instant, String)>,
    /// When the task was first signalled (a fence started), if ever.
    pub fence_started: Option<Instant>,
    /// When a detach completed (the fence finished), if ever.
    pub detached: Option<Instant>,
    /// When it first entered `Suspended`.
    pub suspended: Option<Instant>,
    /// When it reached `Running`.
    pub running: Option<Instant>,
}

/// Timings scaled to a short test session timeout `t`: the fencing budget fits.
pub fn test_timings(t: Duration) -> Timings {
    Timings {
        session_timeout: t,
        suspend_grace: t / 2,
        stop_grace: t / 8,
        unmount_budget: t / 16,
        detach_budget: t / 16,
        margin: t / 8,
        lock_delay: t / 4,
        watchdog_timeout: None,
        retry_interval: Duration::from_millis(50),
        ..Timings::default()
    }
}

impl CoreDriver {
    /// A machine for `volume` with `timings`, started with no leftovers.
    pub fn new(volume: &str, timings: Timings) -> CoreDriver {
        let policy = VolumePolicy {
            timings,
            ..VolumePolicy::default()
        };
        let budget = policy.timings.fence_budget();
        assert!(budget.fits(), "{}", budget.verdict());
        let mut d = CoreDriver {
            m: VolumeMachine::new(volume, policy, 1),
            origin: Instant::now(),
            volume: volume.to_string(),
            queue: VecDeque::new(),
            reasons: Vec::new(),
            fence_started: None,
            detached: None,
            suspended: None,
            running: None,
        };
        d.queue.push_back(Event::Start {
            leftovers: Leftovers::default(),
        });
        d
    }

    /// The core's instant for a monotonic instant.
    pub fn at(&self, t: Instant) -> core::Instant {
        core::Instant::from_origin(t.saturating_duration_since(self.origin))
    }

    /// The monotonic instant of a core instant.
    pub fn real(&self, t: core::Instant) -> Instant {
        self.origin + t.since_origin()
    }

    /// Feeds a lease notice meant for this volume (session-wide ones included).
    pub fn notice(&mut self, n: &LeaseNotice, lease: &LeaseService) {
        if n.volume().is_some_and(|v| v != self.volume) {
            return;
        }
        if let Some(e) = n.to_core(|t| self.at(t)) {
            self.queue.push_back(e);
        }
        self.run(lease);
    }

    /// Fires the timer if due, and runs queued events.
    pub fn tick(&mut self, lease: &LeaseService) {
        if let Some(t) = self.m.poll_timeout() {
            if self.at(Instant::now()) >= t {
                self.queue.push_back(Event::Timer);
            }
        }
        self.run(lease);
    }

    fn run(&mut self, lease: &LeaseService) {
        while let Some(e) = self.queue.pop_front() {
            let now = Instant::now();
            let d = self.m.handle(self.at(now), e);
            if !d.reason.is_empty() {
                self.reasons.push((now, d.reason));
            }
            for f in d.effects {
                self.effect(f, lease, now);
            }
            match self.m.phase() {
                Phase::Suspended if self.suspended.is_none() => self.suspended = Some(now),
                Phase::Running if self.running.is_none() => self.running = Some(now),
                _ => {}
            }
        }
    }

    fn effect(&mut self, f: Effect, lease: &LeaseService, now: Instant) {
        let done = match f {
            Effect::Contend => {
                lease.contend(&self.volume).expect("contend");
                return;
            }
            Effect::Withdraw => {
                lease.withdraw(&self.volume).expect("withdraw");
                return;
            }
            Effect::Release { generation, clean } => {
                lease
                    .release(&self.volume, generation, clean)
                    .expect("release");
                return;
            }
            Effect::Attach { .. } => Event::Attached(Ok(())),
            Effect::Fsck { .. } => Event::FsckDone(FsckOutcome::Clean),
            Effect::Mount { .. } => Event::Mounted(Ok(())),
            Effect::StartTask { .. } => Event::TaskStarted(Ok(())),
            Effect::SignalTask(_) => {
                self.fence_started.get_or_insert(now);
                self.queue.push_back(Event::TaskSignalled(Ok(())));
                Event::TaskExited(ExitStatus::Signal(15))
            }
            Effect::Unmount { .. } => Event::Unmounted(Ok(())),
            Effect::Detach => {
                self.detached = Some(now);
                Event::Detached(Ok(()))
            }
        };
        self.queue.push_back(done);
    }

    /// The decisions, one per line, relative to the first.
    pub fn history(&self) -> String {
        let t0 = self.reasons.first().map(|r| r.0);
        self.reasons
            .iter()
            .map(|(t, r)| {
                let dt = t0.map(|t0| t.duration_since(t0)).unwrap_or_default();
                format!("  +{:>6}ms {r}", dt.as_millis())
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}
