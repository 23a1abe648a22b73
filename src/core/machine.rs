//! The per-volume state machine: lease → attach → fsck → mount → task, and one-way ordered fencing.
//!
//! The machine keeps three things apart:
//! - the **lease** as this node knows it (idle, queued, held — connected or suspended);
//! - the **resources** in place on this node (device, fsck result, mount, task), each
//!   with its effect in flight or completed — facts learnt only from completions;
//! - the **mode**: what the node wants (serve the volume, stay out, fence, stop).
//!
//! After every event, [`VolumeMachine::handle`] updates what it learnt and then
//! *steps*: it compares what the mode wants with what is in place and emits the
//! next effect(s). Bringing a volume up goes forward one resource at a time and
//! only while the lease is held and connected; fencing goes backward — task
//! (TERM, `stop_grace`, KILL of the group) → unmount → detach — each step only
//! after the previous one completed, and nothing but a completed fence ends it.

use std::fmt::Write as _;
use std::time::Duration;

use super::effect::{Effect, TaskSignal};
use super::event::{Event, ExitStatus, FsckOutcome, Generation, Leftovers, Outcome};
use super::policy::{FsckPolicy, RestartMode, VolumePolicy};
use super::rng::Rng;
use super::time::{fmt_duration, Instant};

/// What the machine decided: effects to carry out and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Requests for the executors, in order.
    pub effects: Vec<Effect>,
    /// One line saying what was decided and why.
    pub reason: String,
}

/// Coarse phase, for status output and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Not started yet.
    Init,
    /// Fencing what an earlier run left behind.
    Recovering,
    /// Waiting in the lock queue.
    Contending,
    /// Lease held; waiting out the lock-delay after an unclean predecessor.
    LockDelay,
    /// Attaching the device.
    Attaching,
    /// Checking the filesystem.
    Checking,
    /// Mounting.
    Mounting,
    /// Starting the task.
    Starting,
    /// Serving: mounted, task running (or no task configured).
    Running,
    /// Waiting to restart the task.
    RestartWait,
    /// Lease held but ZooKeeper unreachable; fence pending.
    Suspended,
    /// Stopping the task, unmounting, detaching.
    Fencing,
    /// Not contending: backing off, drained or force-detached.
    Out,
    /// Stopped for shutdown.
    Stopped,
}

impl Phase {
    /// Lower-case name, as shown by `status`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Init => "init",
            Phase::Recovering => "recovering",
            Phase::Contending => "contending",
            Phase::LockDelay => "lock-delay",
            Phase::Attaching => "attaching",
            Phase::Checking => "checking",
            Phase::Mounting => "mounting",
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::RestartWait => "restart-wait",
            Phase::Suspended => "suspended",
            Phase::Fencing => "fencing",
            Phase::Out => "out",
            Phase::Stopped => "stopped",
        }
    }
}

/// Knobs that deliberately break the machine, for testing the tests. Never set from config.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestKnobs {
    /// Pretend ZooKeeper was last heard from this much later than it was: the
    /// fence (and the watchdog's deadline) come this much too late.
    pub late_fence: Duration,
}

/// Why a fence runs; decides urgency and whether the release is clean.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cause {
    Leftovers,
    Suspended,
    LeaseLost,
    AttachFailed,
    FsckRefused,
    MountFailed,
    CrashLoop,
    TaskDone,
    Shutdown,
    Release,
    ForceDetach,
    Inconsistent,
}

impl Cause {
    fn describe(self) -> &'static str {
        match self {
            Cause::Leftovers => "leftovers of an earlier run",
            Cause::Suspended => "suspended past suspend_grace",
            Cause::LeaseLost => "lease lost",
            Cause::AttachFailed => "attach failed",
            Cause::FsckRefused => "fsck refused the filesystem",
            Cause::MountFailed => "mount failed",
            Cause::CrashLoop => "task crash loop",
            Cause::TaskDone => "task finished",
            Cause::Shutdown => "shutdown",
            Cause::Release => "operator release",
            Cause::ForceDetach => "forced detach",
            Cause::Inconsistent => "resources of another generation",
        }
    }
}

/// What follows a completed fence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum After {
    /// Contend again at once.
    Contend,
    /// Stay out for a while, then contend.
    Backoff(Duration),
    /// Stay out until an operator resumes the volume.
    Hold,
    /// Stop for shutdown.
    Stop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fence {
    cause: Cause,
    /// Skip stop_grace: SIGKILL at once.
    urgent: bool,
    /// Ask for a forced unmount from the first attempt.
    force_unmount: bool,
    then: After,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Init,
    Serving,
    Out { until: Option<Instant> },
    Fencing(Fence),
    Stopped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Contact {
    Connected {
        last_contact: Instant,
    },
    Suspended {
        last_contact: Instant,
        fence_at: Instant,
        deadline: Instant,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    generation: Generation,
    /// Until then, a release must not be recorded clean (lock-delay obligation
    /// inherited from an unclean predecessor), and the device must not be attached.
    delay_until: Option<Instant>,
    contact: Contact,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lease {
    Idle,
    Queued,
    Held(Held),
}

/// A resource's state on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Down,
    /// Effect to bring it up in flight.
    Going,
    Up,
    /// Effect to take it down in flight.
    Leaving,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Task {
    Down,
    Starting,
    Up,
    Stopping {
        kill_at: Instant,
        killed: bool,
    },
    /// Down, restart scheduled.
    Waiting {
        until: Instant,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Resources {
    /// Generation the resources were brought up under (`None` for unlabelled leftovers).
    generation: Option<Generation>,
    attach: Slot,
    fsck: Slot,
    mount: Slot,
    task: Task,
}

impl Resources {
    const NONE: Resources = Resources {
        generation: None,
        attach: Slot::Down,
        fsck: Slot::Down,
        mount: Slot::Down,
        task: Task::Down,
    };

    /// Anything on this node that could write to the volume, or an effect in flight.
    fn exposed(&self) -> bool {
        self.attach != Slot::Down
            || self.fsck == Slot::Going
            || self.mount != Slot::Down
            || !matches!(self.task, Task::Down | Task::Waiting { .. })
    }
}

/// The per-volume state machine. Feed it events with [`handle`](Self::handle),
/// carry out the effects it returns, and call it with [`Event::Timer`] once
/// [`poll_timeout`](Self::poll_timeout) has passed.
#[derive(Clone, Debug)]
pub struct VolumeMachine {
    name: String,
    policy: VolumePolicy,
    mode: Mode,
    lease: Lease,
    res: Resources,
    /// Task restarts under the current lease.
    restarts: u32,
    /// Consecutive bring-up failures, for the back-off.
    failures: u32,
    /// Failed unmount attempts in the current fence.
    unmount_failures: u32,
    /// Earliest time to retry a failed unmount or detach.
    retry_at: Option<Instant>,
    /// Deadline for exposure without a lease (leftovers, lost lease), for the watchdog.
    leaseless_deadline: Option<Instant>,
    /// The "fence overdue" alarm was raised for the current fence.
    overdue_reported: bool,
    since: Instant,
    rng: Rng,
    knobs: TestKnobs,
}

impl VolumeMachine {
    /// A machine for volume `name`; `seed` drives the back-off jitter.
    pub fn new(name: impl Into<String>, policy: VolumePolicy, seed: u64) -> Self {
        VolumeMachine {
            name: name.into(),
            policy,
            mode: Mode::Init,
            lease: Lease::Idle,
            res: Resources::NONE,
            restarts: 0,
            failures: 0,
            unmount_failures: 0,
            retry_at: None,
            leaseless_deadline: None,
            overdue_reported: false,
            since: Instant::ZERO,
            rng: Rng::new(seed),
            knobs: TestKnobs::default(),
        }
    }

    /// Deliberately break the machine (tests of the tests only).
    pub fn set_test_knobs(&mut self, knobs: TestKnobs) {
        self.knobs = knobs;
    }

    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The policy the machine decides with.
    pub fn policy(&self) -> &VolumePolicy {
        &self.policy
    }

    /// The generation of the lease held, if any.
    pub fn held_generation(&self) -> Option<Generation> {
        match self.lease {
            Lease::Held(h) => Some(h.generation),
            Lease::Idle | Lease::Queued => None,
        }
    }

    /// The generation the resources in place were brought up under.
    pub fn resource_generation(&self) -> Option<Generation> {
        self.res.generation
    }

    /// Whether anything that can write to the volume is in place (or in flight).
    pub fn exposed(&self) -> bool {
        self.res.exposed()
    }

    /// When the current phase began.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// The fence deadline while suspended: last contact + T − margin.
    pub fn fence_deadline(&self) -> Option<Instant> {
        match self.lease {
            Lease::Held(Held {
                contact: Contact::Suspended { deadline, .. },
                ..
            }) => Some(deadline),
            Lease::Held(Held {
                contact: Contact::Connected { .. },
                ..
            })
            | Lease::Idle
            | Lease::Queued => None,
        }
    }

    /// The coarse phase, for status.
    pub fn phase(&self) -> Phase {
        match self.mode {
            Mode::Init => Phase::Init,
            Mode::Stopped => Phase::Stopped,
            Mode::Out { .. } => Phase::Out,
            Mode::Fencing(f) if f.cause == Cause::Leftovers => Phase::Recovering,
            Mode::Fencing(_) => Phase::Fencing,
            Mode::Serving => match self.lease {
                Lease::Idle | Lease::Queued => Phase::Contending,
                Lease::Held(Held {
                    contact: Contact::Suspended { .. },
                    ..
                }) => Phase::Suspended,
                Lease::Held(h) => {
                    if self.res.attach == Slot::Down
                        && h.delay_until.is_some()
                        && self.policy.has_device
                    {
                        return Phase::LockDelay;
                    }
                    if self.res.attach == Slot::Going
                        || (self.res.attach == Slot::Down && self.policy.has_device)
                    {
                        Phase::Attaching
                    } else if self.res.fsck == Slot::Going {
                        Phase::Checking
                    } else if self.res.mount != Slot::Up {
                        Phase::Mounting
                    } else {
                        match self.res.task {
                            Task::Starting => Phase::Starting,
                            Task::Waiting { .. } => Phase::RestartWait,
                            Task::Down if self.policy.has_task => Phase::Starting,
                            Task::Down | Task::Up | Task::Stopping { .. } => Phase::Running,
                        }
                    }
                }
            },
        }
    }

    /// Whether the watchdog may be petted now. False while something is exposed and
    /// the lease is not known fresh and the watchdog would otherwise fire after the
    /// fence deadline: a holder that cannot finish its fence in time gets reset.
    pub fn watchdog_ok(&self, now: Instant) -> bool {
        if !self.res.exposed() {
            return true;
        }
        let Some(wd) = self.policy.timings.watchdog_timeout else {
            return true;
        };
        let deadline = match self.lease {
            Lease::Held(Held {
                contact: Contact::Connected { last_contact },
                ..
            }) => {
                last_contact + self.knobs.late_fence + self.policy.timings.deadline_after_contact()
            }
            Lease::Held(Held {
                contact: Contact::Suspended { deadline, .. },
                ..
            }) => deadline,
            Lease::Idle | Lease::Queued => match self.leaseless_deadline {
                Some(d) => d,
                None => return false,
            },
        };
        now + wd <= deadline
    }

    /// The next instant at which the machine wants an [`Event::Timer`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut at = |i: Instant| t = Some(t.map_or(i, |c: Instant| c.min(i)));
        match self.mode {
            Mode::Init | Mode::Stopped => {}
            Mode::Out { until } => {
                if let Some(u) = until {
                    at(u);
                }
            }
            Mode::Serving => {
                if let Lease::Held(h) = self.lease {
                    match h.contact {
                        Contact::Suspended { fence_at, .. } => {
                            if self.res.exposed() {
                                at(fence_at);
                            }
                        }
                        Contact::Connected { last_contact } => {
                            let bringing_up = self.res.exposed()
                                || h.delay_until.is_some()
                                || matches!(self.res.task, Task::Waiting { .. });
                            if bringing_up {
                                at(last_contact
                                    + self.knobs.late_fence
                                    + self.policy.timings.suspend_grace);
                            }
                            if let Some(d) = h.delay_until {
                                if self.res.attach == Slot::Down && self.policy.has_device {
                                    at(d);
                                }
                            }
                            if let Task::Waiting { until } = self.res.task {
                                at(until);
                            }
                        }
                    }
                }
            }
            Mode::Fencing(_) => {
                if let Task::Stopping {
                    kill_at,
                    killed: false,
                } = self.res.task
                {
                    at(kill_at);
                }
                if let Some(r) = self.retry_at {
                    at(r);
                }
                if !self.overdue_reported {
                    if let Some(d) = self.fence_deadline().or(self.leaseless_deadline) {
                        at(d);
                    }
                }
            }
        }
        t
    }

    /// Feeds one event; returns the effects to carry out and the reason.
    pub fn handle(&mut self, now: Instant, event: Event) -> Decision {
        let mut effects = Vec::new();
        let before = self.phase();
        let mut reason = self.absorb(now, event, &mut effects);
        let action = self.step(now, &mut effects);
        if !action.is_empty() {
            if !reason.is_empty() {
                reason.push_str(": ");
            }
            reason.push_str(&action);
        }
        if self.phase() != before {
            self.since = now;
        }
        if reason.is_empty() {
            reason = format!("nothing to do ({})", self.phase().name());
        }
        Decision { effects, reason }
    }

    // ---------------------------------------------------------------- events

    /// Records what an event tells; may change the mode. Returns the event's half of the reason.
    fn absorb(&mut self, now: Instant, event: Event, fx: &mut Vec<Effect>) -> String {
        match event {
            Event::Start { leftovers } => self.on_start(now, leftovers),
            Event::LeaseWon {
                generation,
                predecessor_clean,
                last_contact,
            } => self.on_won(now, generation, predecessor_clean, last_contact, fx),
            Event::LeaseHeartbeat { last_contact } => self.on_contact(last_contact, false),
            Event::LeaseDisconnected { last_contact } => self.on_disconnected(last_contact),
            Event::LeaseReconnected { last_contact } => self.on_contact(last_contact, true),
            Event::LeaseLost => self.on_lost(now),
            Event::Attached(outcome) => self.on_attached(now, outcome),
            Event::FsckDone(outcome) => self.on_fsck(now, outcome),
            Event::Mounted(outcome) => self.on_mounted(now, outcome),
            Event::TaskStarted(outcome) => self.on_task_started(now, outcome),
            Event::TaskExited(status) => self.on_task_exited(now, status),
            Event::TaskSignalled(outcome) => match outcome {
                Ok(()) => String::new(),
                Err(e) => format!("signalling the task failed ({e})"),
            },
            Event::Unmounted(outcome) => self.on_unmounted(now, outcome),
            Event::Detached(outcome) => self.on_detached(now, outcome),
            Event::Timer => String::new(),
            Event::Shutdown => self.on_shutdown(now, fx),
            Event::Release { rejoin } => self.on_release(rejoin, fx),
            Event::ForceDetach => self.on_force_detach(now, fx),
            Event::Resume => match &mut self.mode {
                Mode::Out { .. } => {
                    self.mode = Mode::Serving;
                    self.failures = 0;
                    "resumed by operator".to_string()
                }
                Mode::Fencing(f) if f.then == After::Hold => {
                    f.then = After::Contend;
                    "resume requested during the fence: will contend after it".to_string()
                }
                Mode::Init | Mode::Serving | Mode::Fencing(_) | Mode::Stopped => {
                    "resume ignored: the volume is not held out".to_string()
                }
            },
        }
    }

    fn on_start(&mut self, now: Instant, leftovers: Leftovers) -> String {
        match self.mode {
            Mode::Init => {}
            Mode::Serving | Mode::Out { .. } | Mode::Fencing(_) | Mode::Stopped => {
                return "start ignored: already started".to_string();
            }
        }
        if leftovers.is_empty() {
            if self.policy.start_out {
                self.mode = Mode::Out { until: None };
                return "started with nothing left over; on demand: staying out until resumed"
                    .to_string();
            }
            self.mode = Mode::Serving;
            return "started with nothing left over".to_string();
        }
        let mut found = Vec::new();
        if let Some(g) = leftovers.attached {
            self.res.attach = Slot::Up;
            self.res.generation = g;
            found.push(match g {
                Some(g) => format!("device attached under generation {g}"),
                None => "device attached".to_string(),
            });
        }
        if leftovers.mounted {
            self.res.mount = Slot::Up;
            found.push("mounted".to_string());
        }
        if leftovers.task_running {
            self.res.task = Task::Up;
            found.push("task running".to_string());
        }
        // Whoever held the lease before us may have lost it at any moment up to
        // now; a new holder waits lock_delay (we did not release cleanly).
        let t = &self.policy.timings;
        self.leaseless_deadline = Some(now + t.lock_delay.saturating_sub(t.margin));
        let then = if self.policy.start_out {
            After::Hold
        } else {
            After::Contend
        };
        self.begin_fence(Cause::Leftovers, false, then);
        format!(
            "found leftovers ({}): fencing them before contending",
            found.join(", ")
        )
    }

    fn on_won(
        &mut self,
        now: Instant,
        generation: Generation,
        predecessor_clean: bool,
        last_contact: Instant,
        fx: &mut Vec<Effect>,
    ) -> String {
        if let Lease::Held(h) = self.lease {
            if h.generation == generation {
                return format!(
                    "lease win for generation {generation} reported again: already held"
                );
            }
        }
        let wanted = matches!(self.lease, Lease::Queued) && self.mode == Mode::Serving;
        if !wanted {
            // Never keep a lease we did not ask for; do not launder an unclean predecessor.
            fx.push(Effect::Release {
                generation,
                clean: predecessor_clean,
            });
            return format!(
                "lease won (generation {generation}) while not contending: releasing it{}",
                if predecessor_clean {
                    " cleanly"
                } else {
                    " as unclean (predecessor was unclean)"
                }
            );
        }
        self.restarts = 0;
        self.retry_at = None;
        self.leaseless_deadline = None;
        let delay_until = if predecessor_clean || self.policy.timings.lock_delay.is_zero() {
            None
        } else {
            Some(now + self.policy.timings.lock_delay)
        };
        self.lease = Lease::Held(Held {
            generation,
            delay_until,
            contact: Contact::Connected { last_contact },
        });
        match delay_until {
            None => format!("lease won (generation {generation}, predecessor released cleanly)"),
            Some(u) => format!(
                "lease won (generation {generation}) after an unclean predecessor: lock-delay {} until {u}",
                fmt_duration(self.policy.timings.lock_delay)
            ),
        }
    }

    fn on_disconnected(&mut self, last_contact: Instant) -> String {
        let t = self.policy.timings.clone();
        let skew = self.knobs.late_fence;
        match &mut self.lease {
            Lease::Held(h) => {
                let last = match h.contact {
                    Contact::Suspended {
                        last_contact: prev, ..
                    } => prev.min(last_contact),
                    Contact::Connected { last_contact: prev } => prev.min(last_contact),
                };
                let fence_at = last + skew + t.suspend_grace;
                let deadline = last + skew + t.deadline_after_contact();
                h.contact = Contact::Suspended {
                    last_contact: last,
                    fence_at,
                    deadline,
                };
                format!(
                    "ZooKeeper disconnected (last contact {last}): suspended, fence at {fence_at} unless contact returns, deadline {deadline}"
                )
            }
            Lease::Idle | Lease::Queued => {
                "ZooKeeper disconnected while not holding the lease: nothing to fence".to_string()
            }
        }
    }

    fn on_contact(&mut self, last_contact: Instant, reconnect: bool) -> String {
        let fencing = matches!(self.mode, Mode::Fencing(_));
        match &mut self.lease {
            Lease::Held(h) => match h.contact {
                Contact::Suspended { .. } => {
                    h.contact = Contact::Connected { last_contact };
                    if fencing {
                        "ZooKeeper contact back within the session, but fencing is one-way: finishing it".to_string()
                    } else {
                        "ZooKeeper contact back within the session: suspension cancelled"
                            .to_string()
                    }
                }
                Contact::Connected { last_contact: prev } => {
                    h.contact = Contact::Connected {
                        last_contact: prev.max(last_contact),
                    };
                    if reconnect {
                        "ZooKeeper reconnected".to_string()
                    } else {
                        String::new()
                    }
                }
            },
            Lease::Idle | Lease::Queued => {
                if reconnect {
                    "ZooKeeper reconnected".to_string()
                } else {
                    String::new()
                }
            }
        }
    }

    fn on_lost(&mut self, now: Instant) -> String {
        match self.lease {
            Lease::Held(h) => {
                self.lease = Lease::Idle;
                // Another node may win from now on; it waits lock_delay (we never
                // released cleanly), so that is what is left to finish the fence.
                let t = &self.policy.timings;
                let after_delay = now + t.lock_delay.saturating_sub(t.margin);
                self.leaseless_deadline = Some(match h.contact {
                    Contact::Suspended { deadline, .. } => deadline.max(after_delay),
                    Contact::Connected { .. } => after_delay,
                });
                if !self.res.exposed() {
                    return format!("lease lost (generation {})", h.generation);
                }
                match &mut self.mode {
                    Mode::Fencing(f) => {
                        f.urgent = true;
                        format!(
                            "lease lost (generation {}) during the fence: escalating to SIGKILL",
                            h.generation
                        )
                    }
                    Mode::Init | Mode::Serving | Mode::Out { .. } | Mode::Stopped => {
                        self.begin_fence(Cause::LeaseLost, true, After::Contend);
                        format!("lease lost (generation {}): fencing at once", h.generation)
                    }
                }
            }
            Lease::Queued => {
                self.lease = Lease::Idle;
                "session lost while queued".to_string()
            }
            Lease::Idle => "lease lost while not holding it: nothing to do".to_string(),
        }
    }

    fn on_attached(&mut self, now: Instant, outcome: Outcome) -> String {
        match (self.res.attach, outcome) {
            (Slot::Going, Ok(())) => {
                self.res.attach = Slot::Up;
                "device attached".to_string()
            }
            (Slot::Going, Err(e)) => {
                self.res.attach = Slot::Down;
                self.fail_bring_up(now, Cause::AttachFailed, &e)
            }
            (Slot::Down | Slot::Up | Slot::Leaving, Ok(())) => {
                // Unexpected: count it as attached so that it gets fenced if unwanted.
                self.res.attach = Slot::Up;
                "unexpected attach completion: treating the device as attached".to_string()
            }
            (Slot::Down | Slot::Up | Slot::Leaving, Err(e)) => {
                format!("unexpected attach failure ignored ({e})")
            }
        }
    }

    fn on_fsck(&mut self, now: Instant, outcome: FsckOutcome) -> String {
        if self.res.fsck != Slot::Going {
            return "unexpected fsck result ignored".to_string();
        }
        match outcome {
            FsckOutcome::Clean => {
                self.res.fsck = Slot::Up;
                "filesystem clean".to_string()
            }
            FsckOutcome::Warned(w) => {
                self.res.fsck = Slot::Up;
                format!("filesystem repaired, with a warning ({w})")
            }
            FsckOutcome::Refused(why) => {
                self.res.fsck = Slot::Down;
                self.fail_bring_up(now, Cause::FsckRefused, &why)
            }
        }
    }

    fn on_mounted(&mut self, now: Instant, outcome: Outcome) -> String {
        match (self.res.mount, outcome) {
            (Slot::Going, Ok(())) => {
                self.res.mount = Slot::Up;
                if !self.policy.has_task {
                    self.failures = 0;
                }
                "mounted".to_string()
            }
            (Slot::Going, Err(e)) => {
                self.res.mount = Slot::Down;
                self.fail_bring_up(now, Cause::MountFailed, &e)
            }
            (Slot::Down | Slot::Up | Slot::Leaving, Ok(())) => {
                self.res.mount = Slot::Up;
                "unexpected mount completion: treating the volume as mounted".to_string()
            }
            (Slot::Down | Slot::Up | Slot::Leaving, Err(e)) => {
                format!("unexpected mount failure ignored ({e})")
            }
        }
    }

    fn on_task_started(&mut self, now: Instant, outcome: Outcome) -> String {
        match (self.res.task, outcome) {
            (Task::Starting, Ok(())) => {
                self.res.task = Task::Up;
                self.failures = 0;
                "task started".to_string()
            }
            (Task::Starting, Err(e)) => {
                self.res.task = Task::Down;
                let what = format!("task failed to start ({e})");
                self.after_task_end(now, what, false)
            }
            (Task::Down | Task::Waiting { .. }, Ok(())) => {
                self.res.task = Task::Up;
                "unexpected task start: treating the task as running".to_string()
            }
            (Task::Up | Task::Stopping { .. }, Ok(())) => "task start reported twice".to_string(),
            (Task::Down | Task::Up | Task::Stopping { .. } | Task::Waiting { .. }, Err(e)) => {
                format!("unexpected task start failure ignored ({e})")
            }
        }
    }

    fn on_task_exited(&mut self, now: Instant, status: ExitStatus) -> String {
        match self.res.task {
            Task::Stopping { .. } => {
                self.res.task = Task::Down;
                format!("task stopped ({status})")
            }
            Task::Up | Task::Starting => {
                self.res.task = Task::Down;
                match self.mode {
                    Mode::Serving => {
                        let what = format!("task exited ({status})");
                        self.after_task_end(now, what, status.success())
                    }
                    Mode::Init | Mode::Out { .. } | Mode::Fencing(_) | Mode::Stopped => {
                        format!("task exited ({status})")
                    }
                }
            }
            Task::Down | Task::Waiting { .. } => {
                format!("exit of a task not running ignored ({status})")
            }
        }
    }

    /// The task ended on its own (or failed to start) while serving: restart policy.
    fn after_task_end(&mut self, now: Instant, what: String, success: bool) -> String {
        if self.mode != Mode::Serving {
            return what;
        }
        let r = self.policy.restart;
        let restart = match r.mode {
            RestartMode::Always => true,
            RestartMode::OnFailure => !success,
            RestartMode::Never => false,
        };
        if restart && self.restarts < r.max_restarts {
            self.restarts += 1;
            let until = now + r.backoff;
            self.res.task = Task::Waiting { until };
            return format!(
                "{what}: restart {}/{} at {until}",
                self.restarts, r.max_restarts
            );
        }
        if success && r.mode == RestartMode::OnFailure {
            self.begin_fence(Cause::TaskDone, false, After::Hold);
            return format!(
                "{what}: finished cleanly, releasing the volume and staying out until resumed"
            );
        }
        let backoff = self.policy.timings.handover_backoff;
        self.begin_fence(Cause::CrashLoop, false, After::Backoff(backoff));
        format!(
            "{what} after {} restart(s): handing the volume over, staying out {}",
            self.restarts,
            fmt_duration(backoff)
        )
    }

    fn on_unmounted(&mut self, now: Instant, outcome: Outcome) -> String {
        match (self.res.mount, outcome) {
            (Slot::Leaving, Ok(())) => {
                self.res.mount = Slot::Down;
                self.unmount_failures = 0;
                self.retry_at = None;
                "unmounted".to_string()
            }
            (Slot::Leaving, Err(e)) => {
                self.res.mount = Slot::Up;
                self.unmount_failures += 1;
                let at = now + self.policy.timings.retry_interval;
                self.retry_at = Some(at);
                format!(
                    "unmount failed ({e}), attempt {}: retrying at {at}",
                    self.unmount_failures
                )
            }
            (Slot::Down | Slot::Going | Slot::Up, Ok(())) => {
                self.res.mount = Slot::Down;
                "unexpected unmount completion: treating the volume as unmounted".to_string()
            }
            (Slot::Down | Slot::Going | Slot::Up, Err(e)) => {
                format!("unexpected unmount failure ignored ({e})")
            }
        }
    }

    fn on_detached(&mut self, now: Instant, outcome: Outcome) -> String {
        match (self.res.attach, outcome) {
            (Slot::Leaving, Ok(())) => {
                self.res.attach = Slot::Down;
                self.res.fsck = Slot::Down;
                self.retry_at = None;
                "device detached".to_string()
            }
            (Slot::Leaving, Err(e)) => {
                self.res.attach = Slot::Up;
                let at = now + self.policy.timings.retry_interval;
                self.retry_at = Some(at);
                format!("detach failed ({e}): retrying at {at}")
            }
            (Slot::Down | Slot::Going | Slot::Up, Ok(())) => {
                self.res.attach = Slot::Down;
                "unexpected detach completion: treating the device as detached".to_string()
            }
            (Slot::Down | Slot::Going | Slot::Up, Err(e)) => {
                format!("unexpected detach failure ignored ({e})")
            }
        }
    }

    fn on_shutdown(&mut self, _now: Instant, fx: &mut Vec<Effect>) -> String {
        match &mut self.mode {
            Mode::Stopped => "shutdown: already stopped".to_string(),
            Mode::Fencing(f) => {
                f.then = After::Stop;
                "shutdown requested during the fence: stopping once it completes".to_string()
            }
            Mode::Init | Mode::Serving | Mode::Out { .. } => {
                if self.res.exposed() || matches!(self.lease, Lease::Held(_)) {
                    self.begin_fence(Cause::Shutdown, false, After::Stop);
                    "shutdown: fencing, then releasing cleanly".to_string()
                } else {
                    if self.lease == Lease::Queued {
                        fx.push(Effect::Withdraw);
                        self.lease = Lease::Idle;
                    }
                    self.mode = Mode::Stopped;
                    "shutdown: nothing held, stopped".to_string()
                }
            }
        }
    }

    fn on_release(&mut self, rejoin: bool, fx: &mut Vec<Effect>) -> String {
        let then = if rejoin { After::Contend } else { After::Hold };
        let verb = if rejoin {
            "release (hand-over)"
        } else {
            "drain"
        };
        match &mut self.mode {
            Mode::Stopped | Mode::Init => format!("{verb} ignored: not running"),
            Mode::Fencing(f) => {
                if f.then != After::Stop {
                    f.then = then;
                }
                format!("{verb} requested during the fence: will follow it")
            }
            Mode::Serving | Mode::Out { .. } => {
                if self.res.exposed() || matches!(self.lease, Lease::Held(_)) {
                    self.begin_fence(Cause::Release, false, then);
                    format!("{verb} requested: fencing, then releasing cleanly")
                } else if rejoin {
                    format!("{verb} requested: nothing held")
                } else {
                    if self.lease == Lease::Queued {
                        fx.push(Effect::Withdraw);
                        self.lease = Lease::Idle;
                    }
                    self.mode = Mode::Out { until: None };
                    format!("{verb}: nothing held, staying out until resumed")
                }
            }
        }
    }

    fn on_force_detach(&mut self, _now: Instant, fx: &mut Vec<Effect>) -> String {
        match &mut self.mode {
            Mode::Fencing(f) => {
                f.urgent = true;
                f.force_unmount = true;
                if f.then != After::Stop {
                    f.then = After::Hold;
                }
                "forced detach during the fence: escalating to SIGKILL and forced unmount"
                    .to_string()
            }
            Mode::Init | Mode::Serving | Mode::Out { .. } | Mode::Stopped => {
                if self.res.exposed() || matches!(self.lease, Lease::Held(_)) {
                    let then = if self.mode == Mode::Stopped {
                        After::Stop
                    } else {
                        After::Hold
                    };
                    self.begin_fence(Cause::ForceDetach, true, then);
                    self.current_fence_force();
                    "forced detach: SIGKILL, forced unmount, detach, then staying out".to_string()
                } else {
                    if self.mode != Mode::Stopped {
                        self.mode = Mode::Out { until: None };
                    }
                    if self.lease == Lease::Queued {
                        self.lease = Lease::Idle;
                        fx.push(Effect::Withdraw);
                        return "forced detach: nothing attached; left the lock queue, staying out until resumed"
                            .to_string();
                    }
                    "forced detach: nothing attached".to_string()
                }
            }
        }
    }

    fn current_fence_force(&mut self) {
        if let Mode::Fencing(f) = &mut self.mode {
            f.force_unmount = true;
        }
    }

    /// A bring-up step failed: fence what is up, release cleanly, back off.
    fn fail_bring_up(&mut self, _now: Instant, cause: Cause, err: &str) -> String {
        if self.mode != Mode::Serving {
            return format!("{} ({err})", cause.describe());
        }
        self.failures += 1;
        let backoff = self.backoff();
        self.begin_fence(cause, false, After::Backoff(backoff));
        let alert = if cause == Cause::FsckRefused {
            "ALERT: "
        } else {
            ""
        };
        format!(
            "{alert}{} ({err}): not mounting; releasing and backing off {}",
            cause.describe(),
            fmt_duration(backoff)
        )
    }

    fn backoff(&mut self) -> Duration {
        let t = &self.policy.timings;
        let exp = self.failures.saturating_sub(1).min(20);
        let base = t
            .backoff_initial
            .saturating_mul(1u32 << exp.min(16))
            .min(t.backoff_max);
        // ±10 % jitter so that nodes failing together do not retry in lockstep.
        let ms = base.as_millis() as u64;
        let jitter = ms / 10;
        let j = if jitter == 0 {
            0
        } else {
            self.rng.range(0, 2 * jitter)
        };
        Duration::from_millis(ms - jitter + j)
    }

    fn begin_fence(&mut self, cause: Cause, urgent: bool, then: After) {
        self.unmount_failures = 0;
        self.retry_at = None;
        self.overdue_reported = false;
        self.mode = Mode::Fencing(Fence {
            cause,
            urgent,
            force_unmount: false,
            then,
        });
    }

    // ------------------------------------------------------------------ step

    /// Emits the next effects for the current mode; returns the action half of the reason.
    fn step(&mut self, now: Instant, fx: &mut Vec<Effect>) -> String {
        match self.mode {
            Mode::Init | Mode::Stopped => String::new(),
            Mode::Out { until } => match until {
                Some(u) if now >= u => {
                    self.mode = Mode::Serving;
                    self.step_serving(now, fx)
                }
                Some(_) | None => String::new(),
            },
            Mode::Serving => self.step_serving(now, fx),
            Mode::Fencing(f) => self.step_fence(now, f, fx),
        }
    }

    fn step_serving(&mut self, now: Instant, fx: &mut Vec<Effect>) -> String {
        let held = match self.lease {
            Lease::Idle => {
                fx.push(Effect::Contend);
                self.lease = Lease::Queued;
                return "contending for the lease".to_string();
            }
            Lease::Queued => return String::new(),
            Lease::Held(h) => h,
        };
        let g = held.generation;
        if self.res.exposed() && self.res.generation.is_some_and(|rg| rg != g) {
            self.begin_fence(Cause::Inconsistent, true, After::Contend);
            return self.step(now, fx);
        }
        if let Contact::Connected { last_contact } = held.contact {
            let t = &self.policy.timings;
            let base = last_contact + self.knobs.late_fence;
            if now >= base + t.suspend_grace {
                let fence_at = base + t.suspend_grace;
                let deadline = base + t.deadline_after_contact();
                if let Lease::Held(h) = &mut self.lease {
                    h.contact = Contact::Suspended {
                        last_contact,
                        fence_at,
                        deadline,
                    };
                }
                let said = format!(
                    "no answer from ZooKeeper since {last_contact} (suspend_grace {}): suspended, deadline {deadline}",
                    fmt_duration(t.suspend_grace)
                );
                let more = self.step_serving(now, fx);
                return join(said, more);
            }
        }
        if let Contact::Suspended { fence_at, .. } = held.contact {
            if !self.res.exposed() {
                return "holding still while disconnected (nothing attached)".to_string();
            }
            if now >= fence_at {
                self.begin_fence(Cause::Suspended, false, After::Contend);
                let what = "no ZooKeeper contact within suspend_grace: fencing".to_string();
                let more = self.step(now, fx);
                return join(what, more);
            }
            return String::new();
        }
        // Connected: bring the volume up, one resource at a time.
        if self.policy.has_device {
            match self.res.attach {
                Slot::Down => {
                    if let Some(u) = held.delay_until {
                        if now < u {
                            return String::new();
                        }
                    }
                    self.res.attach = Slot::Going;
                    self.res.generation = Some(g);
                    fx.push(Effect::Attach { generation: g });
                    return format!("attaching under generation {g}");
                }
                Slot::Going | Slot::Leaving => return String::new(),
                Slot::Up => {}
            }
            let fsck = match self.policy.fsck {
                FsckPolicy::Auto => Some(false),
                FsckPolicy::Force => Some(true),
                FsckPolicy::Never => None,
            };
            if let Some(force) = fsck {
                match self.res.fsck {
                    Slot::Down => {
                        self.res.fsck = Slot::Going;
                        fx.push(Effect::Fsck {
                            generation: g,
                            force,
                        });
                        return "checking the filesystem".to_string();
                    }
                    Slot::Going | Slot::Leaving => return String::new(),
                    Slot::Up => {}
                }
            }
        } else if let Some(u) = held.delay_until {
            if now < u && self.res.mount == Slot::Down {
                return String::new();
            }
        }
        match self.res.mount {
            Slot::Down => {
                self.res.mount = Slot::Going;
                self.res.generation = Some(g);
                fx.push(Effect::Mount { generation: g });
                return "mounting".to_string();
            }
            Slot::Going | Slot::Leaving => return String::new(),
            Slot::Up => {}
        }
        if !self.policy.has_task {
            return String::new();
        }
        match self.res.task {
            Task::Down => {
                self.res.task = Task::Starting;
                fx.push(Effect::StartTask { generation: g });
                "starting the task".to_string()
            }
            Task::Waiting { until } => {
                if now >= until {
                    self.res.task = Task::Starting;
                    fx.push(Effect::StartTask { generation: g });
                    "restarting the task".to_string()
                } else {
                    String::new()
                }
            }
            Task::Starting | Task::Up | Task::Stopping { .. } => String::new(),
        }
    }

    fn step_fence(&mut self, now: Instant, f: Fence, fx: &mut Vec<Effect>) -> String {
        let mut said = Vec::new();
        if !self.overdue_reported {
            if let Some(d) = self.fence_deadline().or(self.leaseless_deadline) {
                if now >= d && self.res.exposed() {
                    self.overdue_reported = true;
                    said.push(format!("ALERT: fence overdue (deadline {d} passed); the watchdog is no longer petted"));
                }
            }
        }
        // 1. The task's whole process group: TERM, stop_grace, KILL.
        match self.res.task {
            Task::Up => {
                if f.urgent {
                    fx.push(Effect::SignalTask(TaskSignal::Kill));
                    self.res.task = Task::Stopping {
                        kill_at: now,
                        killed: true,
                    };
                    said.push("sending SIGKILL to the task group".to_string());
                } else {
                    let kill_at = now + self.policy.timings.stop_grace;
                    fx.push(Effect::SignalTask(TaskSignal::Term));
                    self.res.task = Task::Stopping {
                        kill_at,
                        killed: false,
                    };
                    said.push(format!(
                        "sending SIGTERM to the task group (SIGKILL at {kill_at})"
                    ));
                }
                return said.join("; ");
            }
            Task::Stopping {
                kill_at,
                killed: false,
            } => {
                if f.urgent || now >= kill_at {
                    fx.push(Effect::SignalTask(TaskSignal::Kill));
                    self.res.task = Task::Stopping {
                        kill_at,
                        killed: true,
                    };
                    said.push("stop_grace over: sending SIGKILL to the task group".to_string());
                }
                return said.join("; ");
            }
            Task::Starting | Task::Stopping { killed: true, .. } => return said.join("; "),
            Task::Waiting { .. } => {
                self.res.task = Task::Down;
                said.push("restart cancelled".to_string());
            }
            Task::Down => {}
        }
        // 2. Unmount, after the task is gone and no fsck/mount is in flight.
        if self.res.fsck == Slot::Going {
            return said.join("; ");
        }
        match self.res.mount {
            Slot::Up => {
                if self.retry_at.is_some_and(|r| now < r) {
                    return said.join("; ");
                }
                let force = f.force_unmount
                    || self.unmount_failures >= self.policy.timings.force_unmount_after;
                self.res.mount = Slot::Leaving;
                self.retry_at = None;
                fx.push(Effect::Unmount { force });
                said.push(if force {
                    "unmounting (forced)".to_string()
                } else {
                    "unmounting".to_string()
                });
                return said.join("; ");
            }
            Slot::Going | Slot::Leaving => return said.join("; "),
            Slot::Down => {}
        }
        // 3. Detach, after the unmount.
        match self.res.attach {
            Slot::Up => {
                if self.retry_at.is_some_and(|r| now < r) {
                    return said.join("; ");
                }
                self.res.attach = Slot::Leaving;
                self.retry_at = None;
                fx.push(Effect::Detach);
                said.push("detaching".to_string());
                return said.join("; ");
            }
            Slot::Going | Slot::Leaving => return said.join("; "),
            Slot::Down => {}
        }
        // 4. Fence complete.
        self.res = Resources::NONE;
        self.leaseless_deadline = None;
        self.retry_at = None;
        let mut done = format!("fence complete ({})", f.cause.describe());
        if let Lease::Held(h) = self.lease {
            let inherited_unclean = h.delay_until.is_some_and(|u| now < u);
            let clean = f.cause != Cause::ForceDetach && !inherited_unclean;
            fx.push(Effect::Release {
                generation: h.generation,
                clean,
            });
            self.lease = Lease::Idle;
            let _ = write!(
                done,
                "; releasing generation {} {}",
                h.generation,
                if clean { "cleanly" } else { "as unclean" }
            );
        }
        let next = match f.then {
            After::Contend => {
                self.mode = Mode::Serving;
                let more = self.step_serving(now, fx);
                if more.is_empty() {
                    String::new()
                } else {
                    format!("; {more}")
                }
            }
            After::Backoff(d) => {
                let until = now + d;
                self.mode = Mode::Out { until: Some(until) };
                self.withdraw(fx);
                format!("; staying out until {until}")
            }
            After::Hold => {
                self.mode = Mode::Out { until: None };
                self.withdraw(fx);
                "; staying out until resumed".to_string()
            }
            After::Stop => {
                self.mode = Mode::Stopped;
                self.withdraw(fx);
                "; stopped".to_string()
            }
        };
        done.push_str(&next);
        said.push(done);
        said.join("; ")
    }

    fn withdraw(&mut self, fx: &mut Vec<Effect>) {
        if self.lease == Lease::Queued {
            fx.push(Effect::Withdraw);
            self.lease = Lease::Idle;
        }
    }
}

fn join(a: String, b: String) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b,
        (_, true) => a,
        (false, false) => format!("{a}; {b}"),
    }
}
