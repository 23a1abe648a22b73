//! The daemon driver on tokio's paused clock with a fake lease and fake executors: wiring, timers, shutdown, watchdog.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nbd_failover::core::{
    Effect, Event, ExitStatus, FsckOutcome, Generation, Leftovers, Phase, TaskSignal, VolumePolicy,
};
use nbd_failover::daemon::{
    Completion, Driver, EffectRunner, Input, LeaseNotice, LeasePort, VolumeSetup, Watchdog,
};
use tokio::sync::mpsc::UnboundedSender;

#[derive(Default)]
struct FakeLease {
    calls: Mutex<Vec<String>>,
}

impl LeasePort for FakeLease {
    fn contend(&self, volume: &str) {
        self.calls.lock().unwrap().push(format!("contend {volume}"));
    }
    fn withdraw(&self, volume: &str) {
        self.calls
            .lock()
            .unwrap()
            .push(format!("withdraw {volume}"));
    }
    fn release(&self, volume: &str, generation: Generation, clean: bool) {
        self.calls
            .lock()
            .unwrap()
            .push(format!("release {volume} {} clean={clean}", generation.0));
    }
}

/// Completes every effect after 10 ms; the task exits 50 ms after SIGTERM.
/// `hang_unmount` keeps unmounts from ever completing.
struct FakeRunner {
    effects: Mutex<Vec<String>>,
    hang_unmount: bool,
    parked: Mutex<Vec<Completion>>,
    tx: Mutex<Option<UnboundedSender<Input>>>,
}

impl FakeRunner {
    fn new(hang_unmount: bool) -> Arc<Self> {
        Arc::new(FakeRunner {
            effects: Mutex::default(),
            hang_unmount,
            parked: Mutex::default(),
            tx: Mutex::default(),
        })
    }
    fn effects(&self) -> Vec<String> {
        self.effects.lock().unwrap().clone()
    }
}

impl EffectRunner for FakeRunner {
    fn run(&self, volume: &str, effect: Effect, done: Completion) {
        self.effects
            .lock()
            .unwrap()
            .push(format!("{volume}: {effect:?}"));
        if self.hang_unmount && matches!(effect, Effect::Unmount { .. }) {
            self.parked.lock().unwrap().push(done);
            return;
        }
        let exit_tx = self.tx.lock().unwrap().clone();
        let volume: Arc<str> = Arc::from(volume);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let event = match effect {
                Effect::Attach { .. } => Event::Attached(Ok(())),
                Effect::Fsck { .. } => Event::FsckDone(FsckOutcome::Clean),
                Effect::Mount { .. } => Event::Mounted(Ok(())),
                Effect::StartTask { .. } => Event::TaskStarted(Ok(())),
                Effect::SignalTask(sig) => {
                    let status = match sig {
                        TaskSignal::Term => ExitStatus::Signal(15),
                        TaskSignal::Kill => ExitStatus::Signal(9),
                    };
                    if let Some(tx) = exit_tx {
                        let volume = volume.to_string();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            let _ = tx.send(Input::Done {
                                volume: Arc::from(volume.as_str()),
                                event: Event::TaskExited(status),
                            });
                        });
                    }
                    Event::TaskSignalled(Ok(()))
                }
                Effect::Unmount { .. } => Event::Unmounted(Ok(())),
                Effect::Detach => Event::Detached(Ok(())),
                Effect::Contend | Effect::Withdraw | Effect::Release { .. } => {
                    unreachable!("lease effects go to the lease port")
                }
            };
            done.complete(event);
        });
    }
}

#[derive(Clone, Default)]
struct CountingWatchdog(Arc<AtomicU64>, Arc<Mutex<Option<tokio::time::Instant>>>);

impl Watchdog for CountingWatchdog {
    fn pet(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
        *self.1.lock().unwrap() = Some(tokio::time::Instant::now());
    }
}

fn setup(watchdog: Option<Duration>) -> Vec<VolumeSetup> {
    let mut policy = VolumePolicy::default();
    policy.timings.watchdog_timeout = watchdog;
    vec![VolumeSetup {
        name: "mysql".into(),
        policy,
        leftovers: Leftovers::default(),
    }]
}

async fn wait_for(board: &nbd_failover::daemon::StatusBoard, phase: Phase) {
    for _ in 0..10_000 {
        if board.lock().unwrap().first().map(|s| s.phase) == Some(phase) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!(
        "volume never reached {phase:?}: {:?}",
        board.lock().unwrap()
    );
}

fn heartbeat(tx: &UnboundedSender<Input>) {
    let last_contact = tokio::time::Instant::now().into_std();
    tx.send(Input::Lease(LeaseNotice::Heartbeat { last_contact }))
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn brings_a_volume_up_and_shuts_down_through_the_fence() {
    let lease = Arc::new(FakeLease::default());
    let runner = FakeRunner::new(false);
    let (driver, leftovers) = Driver::new(
        setup(None),
        lease.clone(),
        runner.clone(),
        Box::new(CountingWatchdog::default()),
        1,
    );
    let tx = driver.sender();
    *runner.tx.lock().unwrap() = Some(tx.clone());
    let board = driver.board();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(driver.run(leftovers, async move {
        let _ = stop_rx.await;
    }));
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(lease.calls.lock().unwrap().clone(), vec!["contend mysql"]);
    let last_contact = tokio::time::Instant::now().into_std();
    tx.send(Input::Lease(LeaseNotice::Won {
        volume: "mysql".into(),
        generation: Generation(42),
        predecessor_clean: true,
        last_contact,
    }))
    .unwrap();
    wait_for(&board, Phase::Running).await;
    // Healthy heartbeats for 30 s keep it running.
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        heartbeat(&tx);
    }
    assert_eq!(board.lock().unwrap()[0].phase, Phase::Running);
    assert_eq!(board.lock().unwrap()[0].generation, Some(Generation(42)));
    stop_tx.send(()).unwrap();
    // Heartbeats go on during the shutdown fence.
    let hb = tx.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let last_contact = tokio::time::Instant::now().into_std();
            if hb
                .send(Input::Lease(LeaseNotice::Heartbeat { last_contact }))
                .is_err()
            {
                break;
            }
        }
    });
    let decisions = tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("driver stops")
        .unwrap();
    assert!(decisions > 0);
    assert_eq!(
        runner.effects(),
        vec![
            "mysql: Attach { generation: Generation(42) }",
            "mysql: Fsck { generation: Generation(42), force: false }",
            "mysql: Mount { generation: Generation(42) }",
            "mysql: StartTask { generation: Generation(42) }",
            "mysql: SignalTask(Term)",
            "mysql: Unmount { force: false }",
            "mysql: Detach",
        ]
    );
    assert_eq!(
        lease.calls.lock().unwrap().clone(),
        vec!["contend mysql", "release mysql 42 clean=true"]
    );
    assert_eq!(board.lock().unwrap()[0].phase, Phase::Stopped);
}

#[tokio::test(start_paused = true)]
async fn fences_on_its_own_clock_when_heartbeats_stop() {
    let lease = Arc::new(FakeLease::default());
    let runner = FakeRunner::new(false);
    let (driver, leftovers) = Driver::new(
        setup(None),
        lease.clone(),
        runner.clone(),
        Box::new(CountingWatchdog::default()),
        1,
    );
    let tx = driver.sender();
    *runner.tx.lock().unwrap() = Some(tx.clone());
    let board = driver.board();
    tokio::spawn(driver.run(leftovers, std::future::pending()));
    tokio::time::sleep(Duration::from_millis(5)).await;
    let last_contact = tokio::time::Instant::now().into_std();
    tx.send(Input::Lease(LeaseNotice::Won {
        volume: "mysql".into(),
        generation: Generation(7),
        predecessor_clean: true,
        last_contact,
    }))
    .unwrap();
    wait_for(&board, Phase::Running).await;
    let last = tokio::time::Instant::now();
    heartbeat(&tx);
    // No more heartbeats and no disconnect notice: the timer alone must fence.
    wait_for(&board, Phase::Contending).await;
    let fenced_after = tokio::time::Instant::now() - last;
    assert!(
        fenced_after >= Duration::from_secs(2),
        "not before suspend_grace: {fenced_after:?}"
    );
    assert!(
        fenced_after < Duration::from_secs(9),
        "before the fence deadline: {fenced_after:?}"
    );
    let fx = runner.effects();
    assert_eq!(
        &fx[4..],
        [
            "mysql: SignalTask(Term)",
            "mysql: Unmount { force: false }",
            "mysql: Detach"
        ]
    );
    assert_eq!(
        lease.calls.lock().unwrap().clone(),
        vec![
            "contend mysql",
            "release mysql 7 clean=true",
            "contend mysql"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn stops_petting_the_watchdog_when_a_hung_fence_cannot_finish_in_time() {
    let lease = Arc::new(FakeLease::default());
    let runner = FakeRunner::new(true);
    let wd = CountingWatchdog::default();
    let (driver, leftovers) = Driver::new(
        setup(Some(Duration::from_secs(4))),
        lease.clone(),
        runner.clone(),
        Box::new(wd.clone()),
        1,
    );
    let tx = driver.sender();
    *runner.tx.lock().unwrap() = Some(tx.clone());
    let board = driver.board();
    tokio::spawn(driver.run(leftovers, std::future::pending()));
    tokio::time::sleep(Duration::from_millis(5)).await;
    let last_contact = tokio::time::Instant::now().into_std();
    tx.send(Input::Lease(LeaseNotice::Won {
        volume: "mysql".into(),
        generation: Generation(9),
        predecessor_clean: true,
        last_contact,
    }))
    .unwrap();
    wait_for(&board, Phase::Running).await;
    let last = tokio::time::Instant::now();
    heartbeat(&tx);
    // The fence starts at +2 s and hangs in unmount. Deadline = last + 9 s;
    // petting must stop at deadline − 4 s = last + 5 s and never resume.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let last_pet = wd.1.lock().unwrap().expect("petted while healthy");
    let stopped_at = last_pet - last;
    assert!(
        stopped_at <= Duration::from_secs(5),
        "petted until {stopped_at:?} after last contact"
    );
    assert!(
        stopped_at >= Duration::from_secs(4),
        "stopped petting too early: {stopped_at:?}"
    );
    assert_eq!(board.lock().unwrap()[0].phase, Phase::Fencing);
    assert!(
        board.lock().unwrap()[0]
            .last_reason
            .contains("ALERT: fence overdue"),
        "{:?}",
        board.lock().unwrap()[0]
    );
    // Let the parked completion go so its drop doesn't log a bug.
    for c in runner.parked.lock().unwrap().drain(..) {
        c.complete(Event::Unmounted(Err("still busy".into())));
    }
}
