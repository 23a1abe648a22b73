//! Deterministic cluster simulation: nodes, a ZooKeeper-timed lease service, virtual clock, faults.
//!
//! Several nodes contend for one volume. Each node runs the real
//! [`VolumeMachine`](crate::core::VolumeMachine) behind a simulated lease client;
//! a simulated ZooKeeper server runs the lock recipe (ephemeral-sequential
//! nodes, lowest wins, clean-release records) and expires a session `T` after
//! the last packet it received from it. The client library's own timing is
//! ZooKeeper's: it reports Disconnected about 2/3 T and Expired about 7/5 T
//! after it last heard from the server — too late to fence on, which is why the
//! core fences on its own clock from heartbeats.
//!
//! Everything runs on a virtual clock from one seed: message delays, effect
//! durations, effect failures and hangs, and faults (node↔ZooKeeper partitions,
//! daemon crashes, node power loss, daemon pauses, task crash loops). After
//! every step the invariants are checked:
//! - (a) no two nodes have the volume attached at overlapping times (an
//!   attachment counts from the moment attach is requested until detach has
//!   completed or the node lost power);
//! - (b) a node attaches only under the generation the server currently grants
//!   to its live session, and mounts and starts the task only under the
//!   generation of its attachment; fencing keeps its order (no unmount while
//!   the task runs, no detach while mounted);
//! - (c) once faults stop, some node runs the task within a stated bound.
//!
//! The simulation is pure too: no clock, no IO. The test driver (tests/sim.rs)
//! and `nbd-failover simulate` run it.

pub mod demo;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::time::Duration;

use crate::core::machine::TestKnobs;
use crate::core::rng::Rng;
use crate::core::time::fmt_duration;
use crate::core::{
    Effect, Event, ExitStatus, FsckOutcome, Generation, Instant, Leftovers, RestartMode,
    RestartPolicy, TaskSignal, Timings, VolumeMachine, VolumePolicy,
};

/// Probabilities and ranges of the faults injected during the fault window.
#[derive(Clone, Debug)]
pub struct Faults {
    /// Mean time between node-level faults.
    pub mean_gap: Duration,
    /// Weights of partition, daemon crash, power loss, pause, crash loop.
    pub weights: [u32; 5],
    /// Probability that an attach fails.
    pub attach_fail: f64,
    /// Probability that fsck refuses the filesystem (exit ≥ 4).
    pub fsck_refuse: f64,
    /// Probability that a mount fails.
    pub mount_fail: f64,
    /// Probability that a task fails to start.
    pub start_fail: f64,
    /// Probability that an unmount is refused as busy.
    pub unmount_busy: f64,
    /// Probability that an unmount hangs for seconds.
    pub unmount_hang: f64,
    /// Probability that a detach fails.
    pub detach_fail: f64,
    /// Probability that a task ignores SIGTERM.
    pub ignore_term: f64,
    /// Probability that a task takes seconds to die after SIGKILL (D state).
    pub slow_kill: f64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            mean_gap: Duration::from_secs(6),
            weights: [30, 15, 10, 25, 20],
            attach_fail: 0.05,
            fsck_refuse: 0.05,
            mount_fail: 0.05,
            start_fail: 0.03,
            unmount_busy: 0.2,
            unmount_hang: 0.02,
            detach_fail: 0.05,
            ignore_term: 0.2,
            slow_kill: 0.05,
        }
    }
}

/// One simulation's settings.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Number of contending nodes.
    pub nodes: usize,
    /// The volume's policy on every node.
    pub policy: VolumePolicy,
    /// Faults are injected in `[0, fault_window)`.
    pub fault_window: Duration,
    /// Once faults stop, some node must run the task within this bound.
    pub liveness_bound: Duration,
    /// What to inject.
    pub faults: Faults,
    /// Deliberate breakage of the core, for testing the tests.
    pub knobs: TestKnobs,
    /// Keep a narrated trace of every decision.
    pub trace: bool,
    /// Faults at fixed times (on top of the random ones), for demos and scenarios.
    pub script: Vec<Scripted>,
}

/// Which node a scripted fault hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The node running the task at that moment (else the one with the device attached).
    Holder,
    /// A fixed node.
    Node(usize),
}

/// A fault injected at a fixed time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScriptedKind {
    /// Cut the node from ZooKeeper for this long.
    Partition(Duration),
    /// kill -9 the daemon (systemd restarts it after the given delay).
    KillDaemon(Duration),
    /// SIGSTOP the daemon for this long.
    Pause(Duration),
    /// Power loss.
    PowerLoss,
    /// Tasks started on the node crash soon after, for this long.
    CrashLoop(Duration),
    /// Operator hand-over (`release`).
    Release,
}

/// One scripted fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scripted {
    /// When.
    pub at: Duration,
    /// Whom.
    pub target: Target,
    /// What.
    pub kind: ScriptedKind,
}

impl SimConfig {
    /// The default scenario: three nodes, ZooKeeper T = 10 s, watchdog on, 60 s of faults.
    pub fn standard() -> Self {
        let timings = Timings {
            session_timeout: Duration::from_secs(10),
            suspend_grace: Duration::from_secs(2),
            stop_grace: Duration::from_secs(3),
            unmount_budget: Duration::from_secs(2),
            detach_budget: Duration::from_secs(1),
            margin: Duration::from_secs(1),
            lock_delay: Duration::from_secs(5),
            watchdog_timeout: Some(Duration::from_secs(4)),
            retry_interval: Duration::from_millis(200),
            force_unmount_after: 3,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(20),
            handover_backoff: Duration::from_secs(15),
        };
        let policy = VolumePolicy {
            timings,
            restart: RestartPolicy {
                mode: RestartMode::Always,
                max_restarts: 3,
                backoff: Duration::from_millis(500),
            },
            ..VolumePolicy::default()
        };
        SimConfig {
            nodes: 3,
            policy,
            fault_window: Duration::from_secs(60),
            liveness_bound: Self::bound_for(&Timings::default()),
            faults: Faults::default(),
            knobs: TestKnobs::default(),
            trace: false,
            script: Vec::new(),
        }
        .with_bound()
    }

    /// Recomputes the liveness bound from the policy.
    pub fn with_bound(mut self) -> Self {
        self.liveness_bound = Self::bound_for(&self.policy.timings);
        self
    }

    /// The liveness bound: the slowest path back to a running task once faults
    /// stop — a node still rebooting (≤ 10 s), the client's expiry (7/5 T),
    /// the lock-delay, the longest back-off or hand-over pause, plus 10 s for
    /// the effects themselves and retries.
    pub fn bound_for(t: &Timings) -> Duration {
        MAX_REBOOT
            + t.session_timeout * 7 / 5
            + t.lock_delay
            + t.backoff_max.max(t.handover_backoff)
            + Duration::from_secs(10)
    }
}

const MAX_REBOOT: Duration = Duration::from_secs(10);

/// An invariant broken.
#[derive(Clone, Debug)]
pub struct Violation {
    /// Virtual time of the breach.
    pub at: Instant,
    /// What was broken.
    pub what: String,
}

/// What one simulation run produced.
#[derive(Clone, Debug, Default)]
pub struct SimOutcome {
    /// The seed.
    pub seed: u64,
    /// Events processed.
    pub steps: u64,
    /// Node-level faults injected.
    pub faults: u32,
    /// Times a node other than the previous one started the task.
    pub failovers: u32,
    /// Node resets by the watchdog.
    pub watchdog_resets: u32,
    /// The first invariant broken, if any.
    pub violation: Option<Violation>,
    /// Narrated trace (only when `SimConfig::trace`).
    pub trace: Vec<String>,
    /// Each interval with no task running anywhere, after the first start.
    pub downtimes: Vec<Duration>,
}

// ------------------------------------------------------------------ model

type NodeId = usize;
type SessionId = u64;

#[derive(Clone, Debug)]
enum ToServer {
    Connect {
        node: NodeId,
    },
    Ping {
        session: SessionId,
        sent: Instant,
    },
    Create {
        session: SessionId,
        node: NodeId,
        sent: Instant,
    },
    Confirm {
        session: SessionId,
        sent: Instant,
    },
    Delete {
        session: SessionId,
    },
    Release {
        session: SessionId,
        generation: Generation,
        clean: bool,
    },
}

#[derive(Clone, Debug)]
enum ToClient {
    Connected {
        session: SessionId,
        sent: Instant,
    },
    Pong {
        session: SessionId,
        sent: Instant,
    },
    Expired {
        session: SessionId,
    },
    /// Watch fired: you may be the lowest now.
    Notify {
        session: SessionId,
    },
    /// Answer to Confirm: whether the session's node is the lowest.
    Lowest {
        session: SessionId,
        sent: Instant,
        won: Option<(Generation, bool)>,
    },
}

#[derive(Clone, Debug)]
enum Ev {
    /// An event for the daemon (and its core) of `node`, incarnation `inc`.
    Daemon {
        node: NodeId,
        inc: u32,
        what: DaemonEv,
    },
    /// A message arriving at the server.
    Server { from: NodeId, msg: ToServer },
    /// Server-side expiry check of a session.
    Expiry { session: SessionId },
    /// World: an effect's physical result, on boot `boot` of `node`.
    World {
        node: NodeId,
        boot: u32,
        what: WorldEv,
    },
    /// Watchdog check on `node`.
    Watchdog { node: NodeId, boot: u32 },
    /// Inject the next fault.
    Fault,
    /// End of a partition.
    Heal { node: NodeId, id: u64 },
    /// Resume a paused daemon.
    Resume { node: NodeId, inc: u32 },
    /// Start the daemon (after a crash or a boot).
    DaemonStart { node: NodeId, boot: u32 },
    /// Liveness check once faults have stopped.
    LivenessCheck,
    /// A scripted fault.
    Scripted(usize),
}

#[derive(Clone, Debug)]
enum DaemonEv {
    Core(Event),
    Timer,
    Tick,
    Msg(ToClient),
}

#[derive(Clone, Debug)]
enum WorldEv {
    AttachDone { ok: bool },
    MountDone { ok: bool },
    UnmountDone { ok: bool },
    DetachDone { ok: bool },
    TaskUp { ok: bool, task: u64 },
    TaskExit { task: u64, status: ExitStatus },
}

struct Server {
    next_zxid: u64,
    next_session: SessionId,
    /// session → (node, last packet received, alive)
    sessions: BTreeMap<SessionId, (NodeId, Instant, bool)>,
    /// lock nodes: czxid → session
    queue: BTreeMap<u64, SessionId>,
    clean: BTreeSet<u64>,
    holder: Option<u64>,
    last_holder: Option<u64>,
}

impl Server {
    fn lowest(&self) -> Option<(u64, SessionId)> {
        self.queue.iter().next().map(|(z, s)| (*z, *s))
    }
    fn node_of(&self, session: SessionId) -> Option<u64> {
        self.queue
            .iter()
            .find(|(_, s)| **s == session)
            .map(|(z, _)| *z)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Run {
    Alive,
    Paused,
    Dead,
    Down,
}

struct Client {
    session: Option<SessionId>,
    last_ok: Instant,
    disconnected: bool,
    pending: VecDeque<ToServer>,
    want_lock: bool,
    won: Option<Generation>,
}

struct Task {
    id: u64,
    ignore_term: bool,
    generation: Generation,
}

struct Node {
    run: Run,
    inc: u32,
    boot: u32,
    machine: VolumeMachine,
    client: Client,
    deferred: Vec<DaemonEv>,
    timer_at: Option<Instant>,
    // the world on this node (kernel, mounts, processes)
    attached: Option<(Generation, Instant)>,
    mounted: Option<Generation>,
    task: Option<Task>,
    link_up: bool,
    partition_id: u64,
    held_up: Vec<ToServer>,
    held_down: Vec<ToClient>,
    last_up: Instant,
    last_down: Instant,
    crash_loop_until: Instant,
    last_pet: Instant,
    wd_check_at: Option<Instant>,
}

/// The simulated cluster.
struct Sim<'c> {
    cfg: &'c SimConfig,
    now: Instant,
    seq: u64,
    queue: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    slab: Vec<Option<Ev>>,
    free: Vec<usize>,
    rng: Rng,
    server: Server,
    nodes: Vec<Node>,
    out: SimOutcome,
    next_task: u64,
    last_runner: Option<NodeId>,
    faults_on: bool,
    t: Timings,
    down_since: Option<Instant>,
}

const NET: (u64, u64) = (1, 5);
const TICK: Duration = Duration::from_millis(500);

/// Runs one seeded simulation.
pub fn run(seed: u64, cfg: &SimConfig) -> SimOutcome {
    let mut rng = Rng::new(seed);
    let nodes = (0..cfg.nodes)
        .map(|i| {
            let mut m = VolumeMachine::new("vol", cfg.policy.clone(), rng.next_u64() ^ i as u64);
            m.set_test_knobs(cfg.knobs);
            Node {
                run: Run::Down,
                inc: 0,
                boot: 0,
                machine: m,
                client: Client {
                    session: None,
                    last_ok: Instant::ZERO,
                    disconnected: false,
                    pending: VecDeque::new(),
                    want_lock: false,
                    won: None,
                },
                deferred: Vec::new(),
                timer_at: None,
                attached: None,
                mounted: None,
                task: None,
                link_up: true,
                partition_id: 0,
                held_up: Vec::new(),
                held_down: Vec::new(),
                last_up: Instant::ZERO,
                last_down: Instant::ZERO,
                crash_loop_until: Instant::ZERO,
                last_pet: Instant::ZERO,
                wd_check_at: None,
            }
        })
        .collect();
    let mut sim = Sim {
        cfg,
        now: Instant::ZERO,
        seq: 0,
        queue: BinaryHeap::new(),
        slab: Vec::new(),
        free: Vec::new(),
        rng,
        server: Server {
            next_zxid: 100,
            next_session: 1,
            sessions: BTreeMap::new(),
            queue: BTreeMap::new(),
            clean: BTreeSet::new(),
            holder: None,
            last_holder: None,
        },
        nodes,
        out: SimOutcome {
            seed,
            ..SimOutcome::default()
        },
        next_task: 1,
        last_runner: None,
        faults_on: true,
        t: cfg.policy.timings.clone(),
        down_since: None,
    };
    for (i, sc) in cfg.script.iter().enumerate() {
        sim.at(sc.at, Ev::Scripted(i));
    }
    for n in 0..cfg.nodes {
        let d = Duration::from_millis(sim.rng.range(0, 300));
        sim.at(d, Ev::DaemonStart { node: n, boot: 0 });
    }
    let first = sim.gap();
    sim.at(first, Ev::Fault);
    sim.at(cfg.fault_window + cfg.liveness_bound, Ev::LivenessCheck);
    let end = Instant::ZERO + cfg.fault_window + cfg.liveness_bound;
    while let Some(Reverse((t, _, slot))) = sim.queue.pop() {
        if t > end || sim.out.violation.is_some() {
            break;
        }
        let ev = sim.slab[slot].take().expect("scheduled event present");
        sim.free.push(slot);
        sim.now = t;
        if sim.now >= Instant::ZERO + cfg.fault_window && sim.faults_on {
            sim.faults_on = false;
            sim.note(None, "faults stop".to_string());
        }
        sim.out.steps += 1;
        sim.dispatch(ev);
    }
    sim.out
}

impl<'c> Sim<'c> {
    fn at(&mut self, after: Duration, ev: Ev) {
        let slot = match self.free.pop() {
            Some(s) => {
                self.slab[s] = Some(ev);
                s
            }
            None => {
                self.slab.push(Some(ev));
                self.slab.len() - 1
            }
        };
        self.seq += 1;
        self.queue.push(Reverse((self.now + after, self.seq, slot)));
    }

    /// A network delay that keeps one connection's messages in order (TCP).
    fn fifo(&mut self, node: NodeId, up: bool) -> Duration {
        let d = self.ms(NET.0, NET.1);
        let n = &mut self.nodes[node];
        let last = if up { &mut n.last_up } else { &mut n.last_down };
        let arrive = (self.now + d).max(*last);
        *last = arrive;
        arrive.saturating_since(self.now)
    }

    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.rng.range(lo, hi))
    }

    fn gap(&mut self) -> Duration {
        let mean = self.cfg.faults.mean_gap.as_millis() as u64;
        self.ms(mean / 3, mean * 5 / 3)
    }

    fn chance(&mut self, p: f64) -> bool {
        self.faults_on && self.rng.chance(p)
    }

    fn note(&mut self, node: Option<NodeId>, s: String) {
        if self.cfg.trace {
            let who = match node {
                Some(n) => format!("node{n}"),
                None => "world".to_string(),
            };
            self.out
                .trace
                .push(format!("{:>10} {who:>5}: {s}", self.now.to_string()));
        }
    }

    fn violate(&mut self, what: String) {
        if self.out.violation.is_none() {
            self.note(None, format!("VIOLATION: {what}"));
            self.out.violation = Some(Violation { at: self.now, what });
        }
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::Daemon { node, inc, what } => {
                let n = &mut self.nodes[node];
                if n.inc != inc {
                    return;
                }
                match n.run {
                    Run::Alive => self.daemon(node, what),
                    Run::Paused => n.deferred.push(what),
                    Run::Dead | Run::Down => {}
                }
            }
            Ev::Server { from, msg } => {
                if self.nodes[from].link_up {
                    self.server_recv(from, msg);
                } else if !matches!(msg, ToServer::Ping { .. }) {
                    self.nodes[from].held_up.push(msg);
                }
            }
            Ev::Expiry { session } => self.expiry(session),
            Ev::World { node, boot, what } => {
                if self.nodes[node].boot == boot {
                    self.world(node, what);
                }
            }
            Ev::Watchdog { node, boot } => self.watchdog(node, boot),
            Ev::Fault => self.fault(),
            Ev::Heal { node, id } => {
                if self.nodes[node].partition_id == id {
                    self.nodes[node].link_up = true;
                    self.note(Some(node), "link to ZooKeeper restored".to_string());
                    // TCP delivers what was held back, in order.
                    let up = std::mem::take(&mut self.nodes[node].held_up);
                    for msg in up {
                        let d = self.fifo(node, true);
                        self.at(d, Ev::Server { from: node, msg });
                    }
                    let down = std::mem::take(&mut self.nodes[node].held_down);
                    for msg in down {
                        self.reply(node, msg);
                    }
                }
            }
            Ev::Resume { node, inc } => {
                let n = &mut self.nodes[node];
                if n.inc == inc && n.run == Run::Paused {
                    n.run = Run::Alive;
                    let deferred = std::mem::take(&mut n.deferred);
                    n.timer_at = None;
                    self.note(
                        Some(node),
                        format!("daemon resumed ({} events waiting)", deferred.len()),
                    );
                    for d in deferred {
                        if self.nodes[node].run != Run::Alive {
                            break;
                        }
                        if !matches!(d, DaemonEv::Tick | DaemonEv::Timer) {
                            self.daemon(node, d);
                        }
                    }
                    if self.nodes[node].run == Run::Alive {
                        self.core(node, Event::Timer);
                        self.daemon(node, DaemonEv::Tick);
                    }
                }
            }
            Ev::DaemonStart { node, boot } => self.daemon_start(node, boot),
            Ev::Scripted(i) => self.scripted(i),
            Ev::LivenessCheck => {
                if !self.nodes.iter().any(|n| n.task.is_some()) {
                    let states: Vec<String> = self
                        .nodes
                        .iter()
                        .enumerate()
                        .map(|(i, n)| format!("node{i} {:?}/{}", n.run, n.machine.phase().name()))
                        .collect();
                    self.violate(format!(
                        "liveness: no node runs the task {} after faults stopped ({})",
                        fmt_duration(self.cfg.liveness_bound),
                        states.join(", ")
                    ));
                }
            }
        }
    }

    // ------------------------------------------------------------ daemon

    fn daemon_start(&mut self, node: NodeId, boot: u32) {
        let n = &mut self.nodes[node];
        if n.boot != boot || !matches!(n.run, Run::Dead | Run::Down) {
            return;
        }
        n.inc += 1;
        n.run = Run::Alive;
        let mut m = VolumeMachine::new("vol", self.cfg.policy.clone(), self.rng.next_u64());
        m.set_test_knobs(self.cfg.knobs);
        n.machine = m;
        n.client = Client {
            session: None,
            last_ok: Instant::ZERO,
            disconnected: false,
            pending: VecDeque::new(),
            want_lock: false,
            won: None,
        };
        n.deferred.clear();
        n.timer_at = None;
        let leftovers = Leftovers {
            attached: n.attached.map(|(g, _)| Some(g)),
            mounted: n.mounted.is_some(),
            task_running: n.task.is_some(),
        };
        // The watchdog device is opened at start.
        n.last_pet = self.now;
        self.arm_watchdog(node);
        self.note(Some(node), "daemon started".to_string());
        self.client_connect(node);
        self.core(node, Event::Start { leftovers });
        let inc = self.nodes[node].inc;
        self.at(
            TICK,
            Ev::Daemon {
                node,
                inc,
                what: DaemonEv::Tick,
            },
        );
    }

    fn daemon(&mut self, node: NodeId, what: DaemonEv) {
        match what {
            DaemonEv::Core(e) => self.core(node, e),
            DaemonEv::Timer => {
                let due = self.nodes[node].timer_at.is_some_and(|t| t <= self.now);
                if due {
                    self.nodes[node].timer_at = None;
                    self.core(node, Event::Timer);
                }
            }
            DaemonEv::Tick => {
                self.client_tick(node);
                self.pet(node);
                let inc = self.nodes[node].inc;
                if self.nodes[node].run == Run::Alive {
                    self.at(
                        TICK,
                        Ev::Daemon {
                            node,
                            inc,
                            what: DaemonEv::Tick,
                        },
                    );
                }
            }
            DaemonEv::Msg(m) => self.client_recv(node, m),
        }
    }

    /// Feeds the node's core, runs its effects, re-arms its timer, pets the watchdog.
    fn core(&mut self, node: NodeId, e: Event) {
        let quiet = matches!(e, Event::LeaseHeartbeat { .. } | Event::Timer);
        let d = self.nodes[node].machine.handle(self.now, e);
        if self.cfg.trace && (!quiet || !d.effects.is_empty() || !d.reason.starts_with("nothing")) {
            let fx: Vec<String> = d.effects.iter().map(|f| format!("{f:?}")).collect();
            let line = if fx.is_empty() {
                d.reason.clone()
            } else {
                format!("{} -> [{}]", d.reason, fx.join(", "))
            };
            self.note(Some(node), line);
        }
        for f in d.effects {
            self.effect(node, f);
            if self.nodes[node].run != Run::Alive {
                return;
            }
        }
        let n = &mut self.nodes[node];
        if let Some(t) = n.machine.poll_timeout() {
            if n.timer_at != Some(t) {
                n.timer_at = Some(t);
                let inc = n.inc;
                let after = t.saturating_since(self.now);
                self.at(
                    after,
                    Ev::Daemon {
                        node,
                        inc,
                        what: DaemonEv::Timer,
                    },
                );
            }
        } else {
            n.timer_at = None;
        }
        self.pet(node);
    }

    fn pet(&mut self, node: NodeId) {
        let n = &mut self.nodes[node];
        if n.run == Run::Alive && n.machine.watchdog_ok(self.now) {
            n.last_pet = self.now;
        }
    }

    fn arm_watchdog(&mut self, node: NodeId) {
        let Some(wd) = self.t.watchdog_timeout else {
            return;
        };
        let n = &mut self.nodes[node];
        if n.wd_check_at.is_none() {
            let at = n.last_pet + wd;
            n.wd_check_at = Some(at);
            let boot = n.boot;
            let after = at.saturating_since(self.now);
            self.at(after, Ev::Watchdog { node, boot });
        }
    }

    fn watchdog(&mut self, node: NodeId, boot: u32) {
        let Some(wd) = self.t.watchdog_timeout else {
            return;
        };
        let n = &mut self.nodes[node];
        if n.boot != boot {
            return;
        }
        n.wd_check_at = None;
        if matches!(n.run, Run::Down) {
            return;
        }
        let fire_at = n.last_pet + wd;
        if self.now >= fire_at {
            self.out.watchdog_resets += 1;
            self.note(Some(node), "WATCHDOG fired: node reset".to_string());
            self.power_off(node);
        } else {
            self.arm_watchdog(node);
        }
    }

    // ------------------------------------------------------------ effects

    fn effect(&mut self, node: NodeId, f: Effect) {
        let boot = self.nodes[node].boot;
        match f {
            Effect::Contend => {
                self.nodes[node].client.want_lock = true;
                let Some(session) = self.nodes[node].client.session else {
                    return;
                };
                let sent = self.now;
                self.client_send(
                    node,
                    ToServer::Create {
                        session,
                        node,
                        sent,
                    },
                );
            }
            Effect::Withdraw => {
                self.nodes[node].client.want_lock = false;
                if let Some(session) = self.nodes[node].client.session {
                    self.client_send(node, ToServer::Delete { session });
                }
            }
            Effect::Release { generation, clean } => {
                self.nodes[node].client.want_lock = false;
                if let Some(session) = self.nodes[node].client.session {
                    self.client_send(
                        node,
                        ToServer::Release {
                            session,
                            generation,
                            clean,
                        },
                    );
                }
            }
            Effect::Attach { generation } => {
                // (b): only under the generation the server grants this node's live session.
                let session = self.nodes[node].client.session;
                let granted = self.server.lowest().and_then(|(z, s)| {
                    let alive = self.server.sessions.get(&s).is_some_and(|x| x.2);
                    (alive && Some(s) == session).then_some(z)
                });
                if granted != Some(generation.0) {
                    self.violate(format!(
                        "node{node} attaches under generation {generation}, but the server grants {granted:?} to its session"
                    ));
                }
                // (a): nobody else may have it attached.
                for (i, other) in self.nodes.iter().enumerate() {
                    if i != node {
                        if let Some((g, since)) = other.attached {
                            let what = format!(
                                "OVERLAP: node{node} attaches generation {generation} while node{i} still has generation {g} attached (since {since})"
                            );
                            self.violate(what);
                            break;
                        }
                    }
                }
                if self.nodes[node].attached.is_some() {
                    self.violate(format!("node{node} attaches twice"));
                }
                self.nodes[node].attached = Some((generation, self.now));
                let ok = !self.chance(self.cfg.faults.attach_fail);
                let d = self.ms(20, 300);
                self.at(
                    d,
                    Ev::World {
                        node,
                        boot,
                        what: WorldEv::AttachDone { ok },
                    },
                );
            }
            Effect::Fsck {
                generation,
                force: _,
            } => {
                if self.nodes[node].attached.map(|a| a.0) != Some(generation) {
                    self.violate(format!(
                        "node{node} checks generation {generation} without that attachment"
                    ));
                }
                let refuse = self.chance(self.cfg.faults.fsck_refuse);
                let d = self.ms(50, 800);
                let outcome = if refuse {
                    FsckOutcome::Refused("e2fsck exit 4: errors left uncorrected".to_string())
                } else {
                    FsckOutcome::Clean
                };
                self.send_daemon(node, d, Event::FsckDone(outcome));
            }
            Effect::Mount { generation } => {
                if self.nodes[node].attached.map(|a| a.0) != Some(generation) {
                    self.violate(format!(
                        "node{node} mounts generation {generation} without that attachment"
                    ));
                }
                let ok = !self.chance(self.cfg.faults.mount_fail);
                let d = self.ms(10, 200);
                self.at(
                    d,
                    Ev::World {
                        node,
                        boot,
                        what: WorldEv::MountDone { ok },
                    },
                );
                if ok {
                    self.nodes[node].mounted = Some(generation);
                }
            }
            Effect::StartTask { generation } => {
                let n = &self.nodes[node];
                let unmounted =
                    n.mounted != Some(generation) || n.attached.map(|a| a.0) != Some(generation);
                let twice = n.task.is_some();
                if unmounted {
                    self.violate(format!("node{node} starts the task under generation {generation} without its mount"));
                }
                if twice {
                    self.violate(format!("node{node} starts a second task"));
                }
                let ok = !self.chance(self.cfg.faults.start_fail);
                let id = self.next_task;
                self.next_task += 1;
                let d = self.ms(5, 100);
                self.at(
                    d,
                    Ev::World {
                        node,
                        boot,
                        what: WorldEv::TaskUp { ok, task: id },
                    },
                );
                if ok {
                    let ignore_term = self.chance(self.cfg.faults.ignore_term);
                    self.nodes[node].task = Some(Task {
                        id,
                        ignore_term,
                        generation,
                    });
                }
            }
            Effect::SignalTask(sig) => {
                let task = self.nodes[node]
                    .task
                    .as_ref()
                    .map(|t| (t.id, t.ignore_term));
                match task {
                    None => self.send_daemon(
                        node,
                        Duration::ZERO,
                        Event::TaskSignalled(Err("no such process".into())),
                    ),
                    Some((id, ignore_term)) => {
                        self.send_daemon(node, Duration::ZERO, Event::TaskSignalled(Ok(())));
                        match sig {
                            TaskSignal::Term => {
                                if !ignore_term {
                                    let d = self.ms(10, 800);
                                    let status = ExitStatus::Signal(15);
                                    self.at(
                                        d,
                                        Ev::World {
                                            node,
                                            boot,
                                            what: WorldEv::TaskExit { task: id, status },
                                        },
                                    );
                                }
                            }
                            TaskSignal::Kill => {
                                let d = if self.chance(self.cfg.faults.slow_kill) {
                                    self.ms(500, 3000)
                                } else {
                                    self.ms(1, 50)
                                };
                                let status = ExitStatus::Signal(9);
                                self.at(
                                    d,
                                    Ev::World {
                                        node,
                                        boot,
                                        what: WorldEv::TaskExit { task: id, status },
                                    },
                                );
                            }
                        }
                    }
                }
            }
            Effect::Unmount { force } => {
                if self.nodes[node].task.is_some() {
                    self.violate(format!("node{node} unmounts while its task still runs"));
                }
                let (ok, d) = if self.chance(self.cfg.faults.unmount_hang) {
                    (true, self.ms(2000, 8000))
                } else if !force && self.chance(self.cfg.faults.unmount_busy) {
                    (false, self.ms(10, 100))
                } else {
                    (true, self.ms(10, 300))
                };
                self.at(
                    d,
                    Ev::World {
                        node,
                        boot,
                        what: WorldEv::UnmountDone { ok },
                    },
                );
            }
            Effect::Detach => {
                if self.nodes[node].mounted.is_some() {
                    self.violate(format!("node{node} detaches while mounted"));
                }
                let ok = !self.chance(self.cfg.faults.detach_fail);
                let d = self.ms(10, 300);
                self.at(
                    d,
                    Ev::World {
                        node,
                        boot,
                        what: WorldEv::DetachDone { ok },
                    },
                );
            }
        }
    }

    fn send_daemon(&mut self, node: NodeId, after: Duration, e: Event) {
        let inc = self.nodes[node].inc;
        self.at(
            after,
            Ev::Daemon {
                node,
                inc,
                what: DaemonEv::Core(e),
            },
        );
    }

    fn world(&mut self, node: NodeId, what: WorldEv) {
        match what {
            WorldEv::AttachDone { ok } => {
                if !ok {
                    self.nodes[node].attached = None;
                }
                let e = if ok {
                    Ok(())
                } else {
                    Err("NBD connect failed: connection refused".into())
                };
                self.send_daemon(node, Duration::ZERO, Event::Attached(e));
            }
            WorldEv::MountDone { ok } => {
                let e = if ok {
                    Ok(())
                } else {
                    Err("mount: wrong fs type or bad superblock".into())
                };
                self.send_daemon(node, Duration::ZERO, Event::Mounted(e));
            }
            WorldEv::UnmountDone { ok } => {
                if ok {
                    self.nodes[node].mounted = None;
                }
                let e = if ok {
                    Ok(())
                } else {
                    Err("target is busy".into())
                };
                self.send_daemon(node, Duration::ZERO, Event::Unmounted(e));
            }
            WorldEv::DetachDone { ok } => {
                if ok {
                    self.nodes[node].attached = None;
                }
                let e = if ok {
                    Ok(())
                } else {
                    Err("device busy".into())
                };
                self.send_daemon(node, Duration::ZERO, Event::Detached(e));
            }
            WorldEv::TaskUp { ok, task } => {
                if !ok {
                    self.send_daemon(
                        node,
                        Duration::ZERO,
                        Event::TaskStarted(Err("exec failed: permission denied".into())),
                    );
                    return;
                }
                if self.nodes[node].task.as_ref().map(|t| t.id) != Some(task) {
                    return;
                }
                let gen = self.nodes[node].task.as_ref().map(|t| t.generation);
                if self.last_runner != Some(node) {
                    if self.last_runner.is_some() {
                        self.out.failovers += 1;
                    }
                    self.last_runner = Some(node);
                }
                self.note(
                    Some(node),
                    format!("task {task} running under generation {gen:?}"),
                );
                self.task_changed();
                self.send_daemon(node, Duration::ZERO, Event::TaskStarted(Ok(())));
                if self.faults_on && self.now < self.nodes[node].crash_loop_until {
                    let d = self.ms(100, 2000);
                    let boot = self.nodes[node].boot;
                    let status = ExitStatus::Code(1);
                    self.at(
                        d,
                        Ev::World {
                            node,
                            boot,
                            what: WorldEv::TaskExit { task, status },
                        },
                    );
                }
            }
            WorldEv::TaskExit { task, status } => {
                if self.nodes[node].task.as_ref().map(|t| t.id) == Some(task) {
                    self.nodes[node].task = None;
                    self.task_changed();
                    self.send_daemon(node, Duration::ZERO, Event::TaskExited(status));
                }
            }
        }
    }

    // ------------------------------------------------------------ faults

    fn scripted(&mut self, i: usize) {
        let sc = self.cfg.script[i].clone();
        let node = match sc.target {
            Target::Node(n) => n,
            Target::Holder => {
                let by_task = self.nodes.iter().position(|n| n.task.is_some());
                match by_task.or_else(|| self.nodes.iter().position(|n| n.attached.is_some())) {
                    Some(n) => n,
                    None => {
                        self.note(
                            None,
                            format!("scripted {:?}: nobody holds the volume, skipped", sc.kind),
                        );
                        return;
                    }
                }
            }
        };
        self.inject(node, sc.kind);
    }

    /// Applies one fault to `node` (random or scripted).
    fn inject(&mut self, node: NodeId, kind: ScriptedKind) {
        let run = self.nodes[node].run;
        match kind {
            ScriptedKind::Partition(d) => {
                let n = &mut self.nodes[node];
                n.link_up = false;
                n.partition_id += 1;
                let id = n.partition_id;
                self.note(
                    Some(node),
                    format!("FAULT: partitioned from ZooKeeper for {}", fmt_duration(d)),
                );
                self.at(d, Ev::Heal { node, id });
            }
            ScriptedKind::KillDaemon(d) => {
                if !matches!(run, Run::Alive | Run::Paused) {
                    return;
                }
                self.note(
                    Some(node),
                    "FAULT: daemon killed (kill -9); its task dies with it".to_string(),
                );
                self.kill_daemon(node);
                let boot = self.nodes[node].boot;
                self.at(d, Ev::DaemonStart { node, boot });
            }
            ScriptedKind::Pause(d) => {
                if run != Run::Alive {
                    return;
                }
                self.note(
                    Some(node),
                    format!("FAULT: daemon paused (SIGSTOP) for {}", fmt_duration(d)),
                );
                self.nodes[node].run = Run::Paused;
                let inc = self.nodes[node].inc;
                self.at(d, Ev::Resume { node, inc });
            }
            ScriptedKind::PowerLoss => {
                if run == Run::Down {
                    return;
                }
                self.note(Some(node), "FAULT: node lost power".to_string());
                self.power_off(node);
            }
            ScriptedKind::CrashLoop(d) => {
                self.note(
                    Some(node),
                    format!("FAULT: tasks crash on start for {}", fmt_duration(d)),
                );
                self.nodes[node].crash_loop_until = self.now + d;
                if let Some(id) = self.nodes[node].task.as_ref().map(|t| t.id) {
                    let boot = self.nodes[node].boot;
                    let status = ExitStatus::Code(2);
                    let d = self.ms(10, 500);
                    self.at(
                        d,
                        Ev::World {
                            node,
                            boot,
                            what: WorldEv::TaskExit { task: id, status },
                        },
                    );
                }
            }
            ScriptedKind::Release => {
                self.note(Some(node), "operator: nbd-failover release".to_string());
                if run == Run::Alive {
                    self.core(node, Event::Release { rejoin: true });
                }
            }
        }
        self.out.faults += 1;
    }

    /// Tracks intervals with no task running anywhere.
    fn task_changed(&mut self) {
        let running = self.nodes.iter().any(|n| n.task.is_some());
        match (running, self.down_since) {
            (true, Some(since)) => {
                let gap = self.now.saturating_since(since);
                self.out.downtimes.push(gap);
                self.down_since = None;
                self.note(
                    None,
                    format!("task back after {} without one", fmt_duration(gap)),
                );
            }
            (false, None) if self.last_runner.is_some() => self.down_since = Some(self.now),
            (true, None) | (false, Some(_)) | (false, None) => {}
        }
    }

    fn fault(&mut self) {
        if !self.faults_on {
            return;
        }
        let node = self.rng.below(self.cfg.nodes as u64) as usize;
        let w = self.cfg.faults.weights;
        let total: u32 = w.iter().sum();
        let mut pick = self.rng.below(total.max(1) as u64) as u32;
        let mut kind = 0;
        for (i, wi) in w.iter().enumerate() {
            if pick < *wi {
                kind = i;
                break;
            }
            pick -= wi;
        }
        let t = self.t.session_timeout;
        let kind = match kind {
            0 => ScriptedKind::Partition(self.ms(500, (t * 5 / 2).as_millis() as u64)),
            1 => ScriptedKind::KillDaemon(self.ms(500, 2000)),
            2 => ScriptedKind::PowerLoss,
            3 => ScriptedKind::Pause(self.ms(200, (t * 2).as_millis() as u64)),
            _ => ScriptedKind::CrashLoop(self.ms(5000, 30000)),
        };
        self.inject(node, kind);
        let g = self.gap();
        self.at(g, Ev::Fault);
    }

    /// The daemon process dies: its task dies too (parent-death signal); the
    /// kernel attachment and the mount stay; its ZooKeeper session lingers on the
    /// server until it expires.
    fn kill_daemon(&mut self, node: NodeId) {
        let n = &mut self.nodes[node];
        n.run = Run::Dead;
        n.inc += 1;
        n.task = None;
        n.client.session = None;
        n.deferred.clear();
        self.task_changed();
    }

    /// The node loses power (or the watchdog resets it): everything on it is gone.
    fn power_off(&mut self, node: NodeId) {
        let n = &mut self.nodes[node];
        n.run = Run::Down;
        n.inc += 1;
        n.boot += 1;
        n.task = None;
        n.mounted = None;
        n.attached = None;
        n.client.session = None;
        n.deferred.clear();
        n.wd_check_at = None;
        let boot = n.boot;
        self.task_changed();
        let d = self.ms(3000, MAX_REBOOT.as_millis() as u64);
        self.at(d, Ev::DaemonStart { node, boot });
    }

    // ------------------------------------------------------------ lease client

    fn client_send(&mut self, node: NodeId, msg: ToServer) {
        let c = &mut self.nodes[node].client;
        if c.disconnected {
            c.pending.push_back(msg);
            return;
        }
        if self.nodes[node].link_up {
            let d = self.fifo(node, true);
            self.at(d, Ev::Server { from: node, msg });
        } else {
            self.nodes[node].held_up.push(msg);
        }
    }

    fn client_connect(&mut self, node: NodeId) {
        if self.nodes[node].link_up {
            let d = self.fifo(node, true);
            self.at(
                d,
                Ev::Server {
                    from: node,
                    msg: ToServer::Connect { node },
                },
            );
        }
    }

    /// Every tick: ping, and the client library's own timers (Disconnected at
    /// 2/3 T, Expired at 7/5 T after it last heard from the server).
    fn client_tick(&mut self, node: NodeId) {
        let t = self.t.session_timeout;
        let c = &self.nodes[node].client;
        match c.session {
            None => {
                self.client_connect(node);
            }
            Some(session) => {
                let last = c.last_ok;
                let disconnected = c.disconnected;
                if !disconnected && self.now >= last + t * 2 / 3 {
                    self.nodes[node].client.disconnected = true;
                    self.core(node, Event::LeaseDisconnected { last_contact: last });
                }
                if self.now >= last + t * 7 / 5 {
                    self.client_expired(node);
                    return;
                }
                let sent = self.now;
                if self.nodes[node].link_up {
                    let d = self.fifo(node, true);
                    self.at(
                        d,
                        Ev::Server {
                            from: node,
                            msg: ToServer::Ping { session, sent },
                        },
                    );
                }
            }
        }
    }

    fn client_expired(&mut self, node: NodeId) {
        let c = &mut self.nodes[node].client;
        c.session = None;
        c.disconnected = false;
        c.pending.clear();
        self.core(node, Event::LeaseLost);
        if self.nodes[node].run == Run::Alive {
            self.client_connect(node);
        }
    }

    fn client_recv(&mut self, node: NodeId, m: ToClient) {
        let current = self.nodes[node].client.session;
        match m {
            ToClient::Connected { session, sent } => {
                if current.is_some() {
                    return;
                }
                let c = &mut self.nodes[node].client;
                c.session = Some(session);
                c.last_ok = sent;
                c.disconnected = false;
                if c.want_lock {
                    self.client_send(
                        node,
                        ToServer::Create {
                            session,
                            node,
                            sent: self.now,
                        },
                    );
                }
            }
            ToClient::Pong { session, sent } => {
                if current != Some(session) {
                    return;
                }
                let c = &mut self.nodes[node].client;
                if sent < c.last_ok {
                    return;
                }
                c.last_ok = sent;
                if !c.pending.is_empty() && !c.disconnected {
                    let pending: Vec<ToServer> = c.pending.drain(..).collect();
                    for p in pending {
                        self.client_send(node, p);
                    }
                }
                let c = &mut self.nodes[node].client;
                if c.disconnected {
                    c.disconnected = false;
                    let pending: Vec<ToServer> = c.pending.drain(..).collect();
                    self.core(node, Event::LeaseReconnected { last_contact: sent });
                    for p in pending {
                        self.client_send(node, p);
                    }
                } else {
                    self.core(node, Event::LeaseHeartbeat { last_contact: sent });
                }
            }
            ToClient::Expired { session } => {
                if current == Some(session) {
                    self.client_expired(node);
                }
            }
            ToClient::Notify { session } => {
                if current == Some(session) {
                    let sent = self.now;
                    self.client_send(node, ToServer::Confirm { session, sent });
                }
            }
            ToClient::Lowest { session, sent, won } => {
                if current != Some(session) {
                    return;
                }
                let c = &mut self.nodes[node].client;
                c.last_ok = c.last_ok.max(sent);
                if let Some((generation, predecessor_clean)) = won {
                    if c.won == Some(generation) {
                        return;
                    }
                    c.won = Some(generation);
                    if c.want_lock {
                        self.core(
                            node,
                            Event::LeaseWon {
                                generation,
                                predecessor_clean,
                                last_contact: sent,
                            },
                        );
                    } else {
                        // Won after withdrawing: give it back; do not launder an unclean predecessor.
                        self.client_send(
                            node,
                            ToServer::Release {
                                session,
                                generation,
                                clean: predecessor_clean,
                            },
                        );
                    }
                }
            }
        }
    }

    // ------------------------------------------------------------ server

    fn reply(&mut self, to: NodeId, msg: ToClient) {
        if !self.nodes[to].link_up {
            if !matches!(msg, ToClient::Pong { .. }) {
                self.nodes[to].held_down.push(msg);
            }
            return;
        }
        let d = self.fifo(to, false);
        let inc = self.nodes[to].inc;
        self.at(
            d,
            Ev::Daemon {
                node: to,
                inc,
                what: DaemonEv::Msg(msg),
            },
        );
    }

    fn touch(&mut self, session: SessionId) -> bool {
        let now = self.now;
        match self.server.sessions.get_mut(&session) {
            Some(s) if s.2 => {
                s.1 = now;
                true
            }
            Some(_) | None => false,
        }
    }

    fn server_recv(&mut self, from: NodeId, msg: ToServer) {
        match msg {
            ToServer::Connect { node } => {
                let session = self.server.next_session;
                self.server.next_session += 1;
                self.server.sessions.insert(session, (node, self.now, true));
                self.at(self.t.session_timeout, Ev::Expiry { session });
                // The restarted daemon's own stale nodes (same node id, older session)
                // are removed once it contends (after fencing its leftovers): see Create.
                let sent = self.now;
                self.reply(from, ToClient::Connected { session, sent });
            }
            ToServer::Ping { session, sent } => {
                if self.touch(session) {
                    self.reply(from, ToClient::Pong { session, sent });
                } else {
                    self.reply(from, ToClient::Expired { session });
                }
            }
            ToServer::Create {
                session,
                node,
                sent,
            } => {
                if !self.touch(session) {
                    self.reply(from, ToClient::Expired { session });
                    return;
                }
                // Remove stale nodes of this node id from earlier sessions (no clean record).
                let stale: Vec<u64> = self
                    .server
                    .queue
                    .iter()
                    .filter(|(_, s)| {
                        **s != session && self.server.sessions.get(s).is_some_and(|x| x.0 == node)
                    })
                    .map(|(z, _)| *z)
                    .collect();
                for z in stale {
                    self.server.queue.remove(&z);
                }
                if self.server.node_of(session).is_none() {
                    let z = self.server.next_zxid;
                    self.server.next_zxid += 1;
                    self.server.queue.insert(z, session);
                    self.note(
                        None,
                        format!(
                            "lock node {z} created for node{from} (session {session}); queue {:?}",
                            self.server.queue
                        ),
                    );
                }
                self.reply(from, ToClient::Pong { session, sent });
                self.recompute_holder();
                if self.server.lowest().map(|l| l.1) == Some(session) {
                    let sent = self.now;
                    self.confirm(from, session, sent);
                }
            }
            ToServer::Confirm { session, sent } => {
                if !self.touch(session) {
                    self.reply(from, ToClient::Expired { session });
                    return;
                }
                self.confirm(from, session, sent);
            }
            ToServer::Delete { session } => {
                if !self.touch(session) {
                    return;
                }
                if let Some(z) = self.server.node_of(session) {
                    self.server.queue.remove(&z);
                    self.recompute_holder();
                }
            }
            ToServer::Release {
                session,
                generation,
                clean,
            } => {
                if !self.touch(session) {
                    return;
                }
                if self.server.queue.get(&generation.0) == Some(&session) {
                    if clean {
                        self.server.clean.insert(generation.0);
                    }
                    self.server.queue.remove(&generation.0);
                    self.recompute_holder();
                }
            }
        }
    }

    fn confirm(&mut self, from: NodeId, session: SessionId, sent: Instant) {
        let won = match self.server.lowest() {
            Some((z, s)) if s == session => {
                let clean = match self.server.last_holder {
                    Some(prev) if prev != z => self.server.clean.contains(&prev),
                    Some(_) | None => true,
                };
                Some((Generation(z), clean))
            }
            Some(_) | None => None,
        };
        self.reply(from, ToClient::Lowest { session, sent, won });
    }

    /// The lowest node changed: the new holder's watch fires (herd-free: only it).
    fn recompute_holder(&mut self) {
        let lowest = self.server.lowest();
        let now_holder = lowest.map(|l| l.0);
        if now_holder != self.server.holder {
            if let Some(h) = self.server.holder {
                self.server.last_holder = Some(h);
            }
            self.server.holder = now_holder;
            if let Some((_, s)) = lowest {
                if let Some(&(node, _, true)) = self.server.sessions.get(&s) {
                    self.reply(node, ToClient::Notify { session: s });
                }
            }
        }
    }

    fn expiry(&mut self, session: SessionId) {
        let t = self.t.session_timeout;
        let Some(&(node, last, alive)) = self.server.sessions.get(&session) else {
            return;
        };
        if !alive {
            return;
        }
        if self.now < last + t {
            let after = (last + t).saturating_since(self.now);
            self.at(after, Ev::Expiry { session });
            return;
        }
        self.server.sessions.insert(session, (node, last, false));
        let mine: Vec<u64> = self
            .server
            .queue
            .iter()
            .filter(|(_, s)| **s == session)
            .map(|(z, _)| *z)
            .collect();
        for z in &mine {
            self.server.queue.remove(z);
        }
        self.note(
            None,
            format!("ZooKeeper expired session {session} of node{node} (lock nodes {mine:?})"),
        );
        self.recompute_holder();
    }
}

/// Runs seeds `first..first+count` and returns the first failing outcome, if any.
pub fn sweep(first: u64, count: u64, cfg: &SimConfig) -> (u64, Option<SimOutcome>, SweepStats) {
    let mut stats = SweepStats::default();
    for seed in first..first + count {
        let o = run(seed, cfg);
        stats.add(&o);
        if o.violation.is_some() {
            return (seed - first + 1, Some(o), stats);
        }
    }
    (count, None, stats)
}

/// Totals over many runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct SweepStats {
    /// Runs.
    pub runs: u64,
    /// Events processed.
    pub steps: u64,
    /// Faults injected.
    pub faults: u64,
    /// Failovers observed.
    pub failovers: u64,
    /// Watchdog resets.
    pub watchdog_resets: u64,
}

impl SweepStats {
    /// Adds one run.
    pub fn add(&mut self, o: &SimOutcome) {
        self.runs += 1;
        self.steps += o.steps;
        self.faults += o.faults as u64;
        self.failovers += o.failovers as u64;
        self.watchdog_resets += o.watchdog_resets as u64;
    }

    /// Adds another total.
    pub fn merge(&mut self, o: &SweepStats) {
        self.runs += o.runs;
        self.steps += o.steps;
        self.faults += o.faults;
        self.failovers += o.failovers;
        self.watchdog_resets += o.watchdog_resets;
    }
}
