//! The daemon's driver: routes lease notices and effect completions to each volume's machine, runs its effects, keeps its timers and the watchdog.
//!
//! One driver serves every volume of a daemon on one ZooKeeper session. It is
//! the only place where the pure core meets time and IO:
//! - it maps the tokio clock onto the core's [`Instant`] (time since start);
//! - it fans session-level lease notices (heartbeat, disconnect, reconnect,
//!   expiry) out to every volume and per-volume ones (won, lost) to one;
//! - it hands each effect to a [`LeasePort`] or an [`EffectRunner`], which
//!   reports the effect's completion back through a [`Completion`];
//! - it fires each machine's `poll_timeout()`;
//! - it pets the watchdog only while every machine says it may;
//! - shutdown is an event: every volume fences and releases, then `run` returns.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant as TokioInstant;

use crate::core::{
    Decision, Effect, Event, Generation, Instant, Leftovers, Phase, VolumeMachine, VolumePolicy,
};

/// What the lease module tells the driver. Instants are the lease module's
/// (`std::time::Instant`); the driver maps them onto the core's clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseNotice {
    /// This node won `volume`'s lease.
    Won {
        /// Volume name.
        volume: String,
        /// czxid of the winning lock node.
        generation: Generation,
        /// Whether the previous holder recorded a clean release.
        predecessor_clean: bool,
        /// Send time of the request that confirmed the win.
        last_contact: std::time::Instant,
    },
    /// The server answered a request sent at `last_contact` (all volumes).
    Heartbeat {
        /// Send time of the answered request.
        last_contact: std::time::Instant,
    },
    /// The connection is down (all volumes).
    Disconnected {
        /// Send time of the last answered request.
        last_contact: std::time::Instant,
    },
    /// The connection is back within the same session (all volumes).
    Reconnected {
        /// Send time of the answered request.
        last_contact: std::time::Instant,
    },
    /// The session expired: every lease and queue entry is gone (all volumes).
    Expired,
    /// One volume's lock node is gone (deleted by an admin, or garbage found).
    Lost {
        /// Volume name.
        volume: String,
    },
}

/// Everything the driver reacts to, on one channel.
#[derive(Debug)]
pub enum Input {
    /// From the lease module.
    Lease(LeaseNotice),
    /// An effect completed.
    Done {
        /// Volume the effect was for.
        volume: Arc<str>,
        /// Its completion event.
        event: Event,
    },
    /// An operator request for one volume (release, drain, force-detach, resume).
    Operator {
        /// Volume name.
        volume: String,
        /// `Event::Release`, `Event::ForceDetach` or `Event::Resume`.
        event: Event,
    },
    /// Answered once every input sent before it has been processed.
    Sync(tokio::sync::oneshot::Sender<()>),
}

/// Reports one effect's completion back to the driver. Dropping it without
/// completing is a bug in the runner; the driver logs it as such.
#[derive(Debug)]
pub struct Completion {
    volume: Arc<str>,
    tx: mpsc::UnboundedSender<Input>,
    sent: bool,
}

impl Completion {
    /// Sends the completion event.
    pub fn complete(mut self, event: Event) {
        self.sent = true;
        // A closed channel means the driver is gone: nobody is left to tell.
        let _ = self.tx.send(Input::Done {
            volume: self.volume.clone(),
            event,
        });
    }

    /// The volume this completion belongs to.
    pub fn volume(&self) -> &str {
        &self.volume
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if !self.sent {
            tracing::error!(volume = %self.volume, "an effect runner dropped a completion without reporting it");
        }
    }
}

/// The lease module, as the driver drives it.
pub trait LeasePort: Send + Sync {
    /// Join the volume's lock queue.
    fn contend(&self, volume: &str);
    /// Leave the queue.
    fn withdraw(&self, volume: &str);
    /// Release the lease; `clean` records the clean release in the same multi-op.
    fn release(&self, volume: &str, generation: Generation, clean: bool);
}

/// Carries out device, fsck, mount and task effects.
pub trait EffectRunner: Send + Sync {
    /// Starts `effect` for `volume`; must eventually call `done.complete(..)`
    /// with the effect's completion event (never block the caller).
    fn run(&self, volume: &str, effect: Effect, done: Completion);
}

/// A watchdog to pet (systemd `WATCHDOG=1`, `/dev/watchdog`, or none).
pub trait Watchdog: Send {
    /// Pet it.
    fn pet(&mut self);
    /// Disarm it on a clean stop (the device's magic close); a no-op for the others.
    fn disarm(&mut self) {}
}

/// One watchdog shared by the start-up code (which pets it while nothing is
/// exposed, before the driver runs) and the driver. Once disarmed it stays
/// disarmed: a later pet would undo the device's magic close.
#[derive(Clone)]
pub struct SharedWatchdog(Arc<Mutex<(Box<dyn Watchdog>, bool)>>);

impl SharedWatchdog {
    /// Shares `watchdog`.
    pub fn new(watchdog: Box<dyn Watchdog>) -> Self {
        SharedWatchdog(Arc::new(Mutex::new((watchdog, false))))
    }
}

impl Watchdog for SharedWatchdog {
    fn pet(&mut self) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !g.1 {
            g.0.pet();
        }
    }
    fn disarm(&mut self) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !g.1 {
            g.1 = true;
            g.0.disarm();
        }
    }
}

/// No watchdog.
#[derive(Debug, Default)]
pub struct NoWatchdog;

impl Watchdog for NoWatchdog {
    fn pet(&mut self) {}
}

/// One volume as the driver shows it to status, metrics and systemd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeStatus {
    /// Volume name.
    pub name: String,
    /// Phase.
    pub phase: Phase,
    /// Generation of the lease held.
    pub generation: Option<Generation>,
    /// Time since the driver started when the phase began.
    pub since: Duration,
    /// Something is attached, mounted or running.
    pub exposed: bool,
    /// Fence deadline while suspended (time since start).
    pub fence_deadline: Option<Duration>,
    /// The last decision's reason.
    pub last_reason: String,
}

/// A shared, always-current view of every volume.
pub type StatusBoard = Arc<Mutex<Vec<VolumeStatus>>>;

/// The ZooKeeper session as the driver last heard of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionView {
    /// `connecting`, `connected`, `disconnected` or `expired`.
    pub state: &'static str,
    /// Send time of the last answered request.
    pub last_contact: Option<std::time::Instant>,
}

/// Told of every phase change (metrics).
pub trait PhaseObserver: Send + Sync {
    /// `volume` left `from` for `to` after `spent` in `from`.
    fn phase_changed(&self, volume: &str, from: Phase, to: Phase, spent: Duration);
    /// The ZooKeeper session changed state.
    fn session_state(&self, _state: &'static str) {}
    /// An event is about to be fed to `volume`'s machine.
    fn event(&self, _volume: &str, _event: &Event) {}
    /// `volume`'s machine decided (`reason`) and asked for `effects`.
    fn decision(&self, _volume: &str, _reason: &str, _effects: &[Effect]) {}
}

/// One volume's configuration as the driver needs it.
#[derive(Clone, Debug)]
pub struct VolumeSetup {
    /// Volume name.
    pub name: String,
    /// Its policy.
    pub policy: VolumePolicy,
    /// What start-up recovery found.
    pub leftovers: Leftovers,
}

struct Slot {
    name: Arc<str>,
    machine: VolumeMachine,
    timer: Option<Instant>,
    phase: Phase,
    phase_since: TokioInstant,
}

/// The driver. Build it with [`Driver::new`], feed it through [`Driver::sender`], run it with [`Driver::run`].
pub struct Driver {
    origin: TokioInstant,
    volumes: BTreeMap<String, Slot>,
    lease: Arc<dyn LeasePort>,
    runner: Arc<dyn EffectRunner>,
    watchdog: Box<dyn Watchdog>,
    pet_interval: Duration,
    tx: mpsc::UnboundedSender<Input>,
    rx: mpsc::UnboundedReceiver<Input>,
    board: StatusBoard,
    changed: tokio::sync::watch::Sender<u64>,
    session: Arc<Mutex<SessionView>>,
    observer: Option<Arc<dyn PhaseObserver>>,
    decisions: u64,
}

impl Driver {
    /// A driver for these volumes. `seed` seeds each machine's jitter.
    pub fn new(
        volumes: Vec<VolumeSetup>,
        lease: Arc<dyn LeasePort>,
        runner: Arc<dyn EffectRunner>,
        watchdog: Box<dyn Watchdog>,
        seed: u64,
    ) -> (Self, Vec<Leftovers>) {
        Driver::with_runner(volumes, lease, |_| runner, watchdog, seed)
    }

    /// Like [`Driver::new`], for a runner that needs the driver's input channel
    /// (to report events no effect asked for, such as a task's exit).
    pub fn with_runner(
        volumes: Vec<VolumeSetup>,
        lease: Arc<dyn LeasePort>,
        make_runner: impl FnOnce(mpsc::UnboundedSender<Input>) -> Arc<dyn EffectRunner>,
        watchdog: Box<dyn Watchdog>,
        seed: u64,
    ) -> (Self, Vec<Leftovers>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let runner = make_runner(tx.clone());
        let pet_interval = volumes
            .iter()
            .filter_map(|v| v.policy.timings.watchdog_timeout)
            .min()
            .map_or(Duration::from_secs(1), |wd| wd / 4);
        let mut leftovers = Vec::new();
        let mut map = BTreeMap::new();
        for (i, v) in volumes.into_iter().enumerate() {
            leftovers.push(v.leftovers.clone());
            let machine = VolumeMachine::new(
                v.name.clone(),
                v.policy,
                seed ^ (i as u64).wrapping_mul(0x9E37),
            );
            map.insert(
                v.name.clone(),
                Slot {
                    name: Arc::from(v.name.as_str()),
                    machine,
                    timer: None,
                    phase: Phase::Init,
                    phase_since: TokioInstant::now(),
                },
            );
        }
        let board = Arc::new(Mutex::new(Vec::new()));
        let d = Driver {
            origin: TokioInstant::now(),
            volumes: map,
            lease,
            runner,
            watchdog,
            pet_interval,
            tx,
            rx,
            board,
            changed: tokio::sync::watch::channel(0).0,
            session: Arc::new(Mutex::new(SessionView {
                state: "connecting",
                last_contact: None,
            })),
            observer: None,
            decisions: 0,
        };
        (d, leftovers)
    }

    /// Tells `observer` of every phase change and session state.
    pub fn observe(&mut self, observer: Arc<dyn PhaseObserver>) {
        self.observer = Some(observer);
    }

    /// Changes whenever the status board does (its value counts the changes).
    pub fn board_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The session as last heard of.
    pub fn session(&self) -> Arc<Mutex<SessionView>> {
        self.session.clone()
    }

    /// The instant the board's `since` and `fence_deadline` count from.
    pub fn origin(&self) -> std::time::Instant {
        self.origin.into_std()
    }

    fn set_session(&self, state: &'static str, last_contact: Option<std::time::Instant>) {
        let mut s = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let changed = s.state != state;
        s.state = state;
        if last_contact.is_some() {
            s.last_contact = last_contact;
        }
        drop(s);
        if changed {
            if let Some(o) = &self.observer {
                o.session_state(state);
            }
        }
    }

    /// Where to send lease notices, completions and operator requests.
    pub fn sender(&self) -> mpsc::UnboundedSender<Input> {
        self.tx.clone()
    }

    /// The live status board.
    pub fn board(&self) -> StatusBoard {
        self.board.clone()
    }

    fn now(&self) -> Instant {
        Instant::from_origin(TokioInstant::now().saturating_duration_since(self.origin))
    }

    fn map(&self, at: std::time::Instant) -> Instant {
        Instant::from_origin(TokioInstant::from_std(at).saturating_duration_since(self.origin))
    }

    /// Runs until every volume has stopped after `shutdown` resolved.
    /// `leftovers` is what start-up recovery found, per volume in config order.
    pub async fn run(
        mut self,
        leftovers: Vec<Leftovers>,
        shutdown: impl Future<Output = ()>,
    ) -> u64 {
        let names: Vec<String> = self.volumes.keys().cloned().collect();
        for (name, left) in names.iter().zip(leftovers) {
            self.feed(name, Event::Start { leftovers: left });
        }
        tokio::pin!(shutdown);
        let mut shutting_down = false;
        let mut ticker = tokio::time::interval(self.pet_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if shutting_down
                && self
                    .volumes
                    .values()
                    .all(|s| s.machine.phase() == Phase::Stopped)
            {
                break;
            }
            let next = self.volumes.values().filter_map(|s| s.timer).min();
            let sleep_until = next.map(|t| self.origin + t.since_origin());
            tokio::select! {
                input = self.rx.recv() => match input {
                    Some(i) => self.input(i),
                    None => break,
                },
                _ = async {
                    match sleep_until {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending::<()>().await,
                    }
                } => self.fire_timers(),
                _ = &mut shutdown, if !shutting_down => {
                    shutting_down = true;
                    tracing::info!("shutdown: fencing every volume");
                    for name in &names {
                        self.feed(name, Event::Shutdown);
                    }
                },
                _ = ticker.tick() => {},
            }
            self.maybe_pet();
        }
        self.decisions
    }

    fn input(&mut self, input: Input) {
        match input {
            Input::Done { volume, event } => self.feed(&volume, event),
            Input::Operator { volume, event } => self.feed(&volume, event),
            Input::Sync(done) => {
                let _ = done.send(());
            }
            Input::Lease(n) => match n {
                LeaseNotice::Won {
                    volume,
                    generation,
                    predecessor_clean,
                    last_contact,
                } => {
                    self.set_session("connected", Some(last_contact));
                    let last_contact = self.map(last_contact);
                    self.feed(
                        &volume,
                        Event::LeaseWon {
                            generation,
                            predecessor_clean,
                            last_contact,
                        },
                    );
                }
                LeaseNotice::Heartbeat { last_contact } => {
                    self.set_session("connected", Some(last_contact));
                    let last_contact = self.map(last_contact);
                    self.all(|| Event::LeaseHeartbeat { last_contact });
                }
                LeaseNotice::Disconnected { last_contact } => {
                    self.set_session("disconnected", Some(last_contact));
                    let last_contact = self.map(last_contact);
                    self.all(|| Event::LeaseDisconnected { last_contact });
                }
                LeaseNotice::Reconnected { last_contact } => {
                    self.set_session("connected", Some(last_contact));
                    let last_contact = self.map(last_contact);
                    self.all(|| Event::LeaseReconnected { last_contact });
                }
                LeaseNotice::Expired => {
                    self.set_session("expired", None);
                    self.all(|| Event::LeaseLost)
                }
                LeaseNotice::Lost { volume } => self.feed(&volume, Event::LeaseLost),
            },
        }
    }

    fn all(&mut self, event: impl Fn() -> Event) {
        let names: Vec<String> = self.volumes.keys().cloned().collect();
        for name in names {
            self.feed(&name, event());
        }
    }

    fn fire_timers(&mut self) {
        let now = self.now();
        let due: Vec<String> = self
            .volumes
            .iter()
            .filter(|(_, s)| s.timer.is_some_and(|t| t <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            if let Some(s) = self.volumes.get_mut(&name) {
                s.timer = None;
            }
            self.feed(&name, Event::Timer);
        }
    }

    /// Feeds one event to one volume's machine and carries out its decision.
    fn feed(&mut self, volume: &str, event: Event) {
        let now = self.now();
        let Some(slot) = self.volumes.get_mut(volume) else {
            tracing::warn!(volume, ?event, "event for an unknown volume ignored");
            return;
        };
        if let Some(o) = &self.observer {
            o.event(volume, &event);
        }
        let quiet = matches!(event, Event::LeaseHeartbeat { .. } | Event::Timer);
        let Decision { effects, reason } = slot.machine.handle(now, event);
        slot.timer = slot.machine.poll_timeout();
        self.decisions += 1;
        let name = slot.name.clone();
        if let Some(o) = &self.observer {
            o.decision(volume, &reason, &effects);
        }
        if !(quiet && effects.is_empty() && reason.starts_with("nothing to do")) {
            let phase = slot.machine.phase().name();
            let generation = slot.machine.held_generation().map(|g| g.0);
            tracing::info!(volume = %name, phase, generation, effects = ?effects, "{reason}");
        }
        for effect in effects {
            self.effect(&name, effect);
        }
        self.publish(volume, reason);
    }

    fn effect(&mut self, volume: &Arc<str>, effect: Effect) {
        match effect {
            Effect::Contend => self.lease.contend(volume),
            Effect::Withdraw => self.lease.withdraw(volume),
            Effect::Release { generation, clean } => self.lease.release(volume, generation, clean),
            Effect::Attach { .. }
            | Effect::Fsck { .. }
            | Effect::Mount { .. }
            | Effect::StartTask { .. }
            | Effect::SignalTask(_)
            | Effect::Unmount { .. }
            | Effect::Detach => {
                let done = Completion {
                    volume: volume.clone(),
                    tx: self.tx.clone(),
                    sent: false,
                };
                self.runner.run(volume, effect, done);
            }
        }
    }

    fn publish(&mut self, volume: &str, reason: String) {
        let Some(slot) = self.volumes.get_mut(volume) else {
            return;
        };
        let phase = slot.machine.phase();
        if phase != slot.phase {
            let t = TokioInstant::now();
            let spent = t.saturating_duration_since(slot.phase_since);
            if let Some(o) = &self.observer {
                o.phase_changed(volume, slot.phase, phase, spent);
            }
            slot.phase = phase;
            slot.phase_since = t;
        }
        let m = &slot.machine;
        let status = VolumeStatus {
            name: volume.to_string(),
            phase: m.phase(),
            generation: m.held_generation(),
            since: m.since().since_origin(),
            exposed: m.exposed(),
            fence_deadline: m.fence_deadline().map(|d| d.since_origin()),
            last_reason: reason,
        };
        let mut board = self.board.lock().unwrap_or_else(|p| p.into_inner());
        match board.iter_mut().find(|s| s.name == volume) {
            Some(s) => {
                if status.last_reason.starts_with("nothing to do") {
                    let keep = std::mem::take(&mut s.last_reason);
                    *s = VolumeStatus {
                        last_reason: keep,
                        ..status
                    };
                } else {
                    *s = status;
                }
            }
            None => board.push(status),
        }
        drop(board);
        self.changed.send_modify(|n| *n += 1);
    }

    fn maybe_pet(&mut self) {
        let now = self.now();
        if self.volumes.values().all(|s| s.machine.watchdog_ok(now)) {
            self.watchdog.pet();
        }
    }
}
