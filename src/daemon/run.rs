//! `nbd-failover daemon`: wires config, start-up recovery, the ZooKeeper lease, the executors, systemd and the watchdog around the driver.
//!
//! Order of start-up:
//! 1. recovery scan per volume (our devices, mounts at our paths, task groups
//!    from pid files) and the core's fence of what it found, run at once with
//!    no lease ([`super::offline::fence_leftovers_first`]): a node that cannot
//!    reach ZooKeeper must not keep a device attached while another node may
//!    win the lease (found by the fault campaign);
//! 2. the lease service (one ZooKeeper session, node id registered);
//! 3. the fencing budget is checked again against the *negotiated* session
//!    timeout — a server that grants less than the config asked for could
//!    otherwise break the proof `check-config` made;
//! 4. the watchdog (systemd or device), `READY=1`, and the driver.
//!
//! SIGTERM or SIGINT is the shutdown event: every volume fences and releases
//! cleanly through the same path as a lease loss, then the lease service
//! finishes its releases and the process exits 0.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::config::{Activation, Config, WatchdogConfig};
use crate::control::{self, ControlContext, References};
use crate::core::Generation;
use crate::exec::{
    self, FsckRunner, HostRecovery, KernelLoop, LeftoverScan, LoopScanner, RecoverySpec,
    SysMounter, TaskRunner, TaskSpec,
};
use crate::lease::{self, LeaseConfig, LeaseService};
use crate::metrics::Metrics;
use crate::nbd::KernelNbd;

use super::devwatchdog::DeviceWatchdog;
use super::driver::{
    Driver, Input, LeaseNotice, LeasePort, NoWatchdog, SharedWatchdog, VolumeSetup, Watchdog,
};
use super::runner::{Executors, RealRunner, VolumeRuntime};
use super::systemd::{self, Notifier, SystemdWatchdog};

struct LeaseAdapter(Arc<LeaseService>);

impl LeasePort for LeaseAdapter {
    fn contend(&self, volume: &str) {
        if let Err(e) = self.0.contend(volume) {
            tracing::error!(volume, error = %e, "contend failed");
        }
    }
    fn withdraw(&self, volume: &str) {
        if let Err(e) = self.0.withdraw(volume) {
            tracing::error!(volume, error = %e, "withdraw failed");
        }
    }
    fn release(&self, volume: &str, generation: Generation, clean: bool) {
        if let Err(e) = self.0.release(volume, generation, clean) {
            tracing::error!(volume, generation = generation.0, error = %e, "release failed");
        }
    }
}

/// Maps the lease module's notice onto the driver's; informational ones are logged.
fn forward(n: lease::LeaseNotice) -> Option<LeaseNotice> {
    use lease::LeaseNotice as L;
    Some(match n {
        L::Won {
            volume,
            generation,
            predecessor_clean,
            last_contact,
        } => LeaseNotice::Won {
            volume,
            generation,
            predecessor_clean,
            last_contact,
        },
        L::Lost { volume, reason } => {
            tracing::warn!(volume, reason, "lease lost");
            LeaseNotice::Lost { volume }
        }
        L::Heartbeat { last_contact } => LeaseNotice::Heartbeat { last_contact },
        L::Disconnected { last_contact } => {
            tracing::warn!("ZooKeeper disconnected");
            LeaseNotice::Disconnected { last_contact }
        }
        L::Reconnected { last_contact } => {
            tracing::info!("ZooKeeper reconnected");
            LeaseNotice::Reconnected { last_contact }
        }
        L::Released {
            volume,
            generation,
            clean,
        } => {
            tracing::info!(volume, generation = generation.0, clean, "released");
            return None;
        }
        L::StaleNodeRemoved {
            volume,
            path,
            session,
        } => {
            tracing::info!(
                volume,
                path,
                session,
                "removed a stale lock node of an earlier run"
            );
            return None;
        }
        L::SessionStarted { session, timeout } => {
            tracing::info!(
                session,
                timeout_ms = timeout.as_millis() as u64,
                "ZooKeeper session started"
            );
            return None;
        }
        L::SessionEnded { session, state } => {
            tracing::warn!(session, state, "ZooKeeper session ended");
            return None;
        }
        L::Problem { volume, error } => {
            tracing::warn!(volume = volume.as_deref().unwrap_or("-"), error = %error, "lease problem");
            return None;
        }
    })
}

/// What the run is for.
pub enum Mode {
    /// The node daemon: every configured volume, control socket, metrics.
    Daemon,
    /// The `exec` wrapper: one volume whose task is the wrapped command; no
    /// control socket, no metrics; ends when the command ends or the lease is lost.
    Exec(super::wrapper::Wrap),
}

/// The real executors and the start-up recovery scanner.
pub(crate) fn executors() -> (Executors, HostRecovery) {
    let nbd = Arc::new(KernelNbd::new());
    let loops = Arc::new(KernelLoop::new());
    let ex = Executors {
        nbd: nbd.clone(),
        loops: loops.clone(),
        fsck: Arc::new(FsckRunner::new()),
    };
    let recovery = HostRecovery::new()
        .with_scanner(Box::new(LoopScanner::new(loops)))
        .with_scanner(Box::new(exec::recovery::NbdScanner::new(nbd)));
    (ex, recovery)
}

/// One volume's task runner and runtime, and what earlier runs left of it.
pub(crate) fn prepare_volume(
    v: &crate::config::VolumeConfig,
    cfg: &Config,
    recovery: &HostRecovery,
    sink: exec::OutputSink,
) -> anyhow::Result<(VolumeRuntime, exec::RecoveryReport)> {
    let task: Option<Arc<dyn TaskRunner>> = match TaskSpec::for_volume(v, &cfg.node) {
        None => None,
        Some(spec) => Some(match &spec.run {
            crate::config::TaskRun::Exec(_) => Arc::new(exec::ExecTask::new(spec, sink)),
            crate::config::TaskRun::SystemdUnit(_) => Arc::new(
                exec::SystemdTask::new(spec)
                    .with_context(|| format!("volume {}: systemd task", v.name))?,
            ),
        }),
    };
    let mut spec = RecoverySpec::for_volume(v);
    spec.volume = super::runner::label_name(v, &cfg.node);
    let report = recovery
        .scan(&spec, task.as_deref())
        .with_context(|| format!("volume {}: start-up recovery scan", v.name))?;
    for w in &report.warnings {
        tracing::warn!(volume = %v.name, "{w}");
    }
    if !report.leftovers().is_empty() {
        tracing::warn!(volume = %v.name, leftovers = ?report.leftovers(), "found leftovers of an earlier run: they will be fenced before contending");
    }
    let runtime = VolumeRuntime::new(
        v.clone(),
        cfg.node.clone(),
        task,
        Arc::new(SysMounter::new()),
    );
    Ok((runtime, report))
}

/// Runs the daemon until SIGTERM/SIGINT; returns after every volume is fenced and released.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    run_mode(cfg, Mode::Daemon).await.map(|_| ())
}

/// Runs in `mode`; returns the wrapped command's exit code in exec mode (0 for the daemon).
pub async fn run_mode(mut cfg: Config, mode: Mode) -> anyhow::Result<i32> {
    std::fs::create_dir_all(&cfg.node.run_dir)
        .with_context(|| format!("creating run_dir {}", cfg.node.run_dir.display()))?;
    let mut _exec_pid = None;
    match &mode {
        Mode::Daemon => {
            // A volume an `exec` wrapper runs on this host is the wrapper's:
            // the daemon must not fence or contend for it.
            cfg.volumes.retain(|v| match running_exec(&cfg.node.run_dir, &v.name) {
                Some(pid) => {
                    tracing::warn!(volume = %v.name, pid, "an exec wrapper runs this volume here: the daemon leaves it alone this run (restart the daemon after the wrapper ends)");
                    false
                }
                None => true,
            });
        }
        Mode::Exec(w) => {
            if let Some(pid) = running_exec(&cfg.node.run_dir, w.volume()) {
                bail!(
                    "an exec wrapper (pid {pid}) already runs volume {} on this host",
                    w.volume()
                );
            }
            _exec_pid = Some(PidFileGuard::write(exec_pid_path(
                &cfg.node.run_dir,
                w.volume(),
            ))?);
        }
    }
    // 0. One daemon per run_dir, checked before anything is touched: a second
    // daemon would take the first one's mounts for leftovers and fence them.
    let _run_lock = match &mode {
        Mode::Daemon => Some(lock_run_dir(&cfg.node.run_dir)?),
        Mode::Exec(_) => None,
    };
    let cfg = Arc::new(cfg);
    let (ex, _) = executors();

    // The watchdog, armed before the leftovers are fenced and not petted until
    // they are: a fence that hangs (an unmount over a dead NBD link) is then
    // cut short by the reset, as in the driver. A device already armed by a
    // killed predecessor keeps counting from that daemon's end.
    let notifier = Notifier::from_env().context("NOTIFY_SOCKET")?;
    let (mut watchdog, pet_every) = arm_watchdog(&cfg)?;
    for v in &cfg.volumes {
        if let Some(note) = crate::config::nbd_backstop_note(&cfg, v) {
            tracing::warn!(volume = %v.name, "{note}");
        }
    }
    let mut early = EarlyWatchdog {
        watchdog: watchdog.clone(),
        petter: None,
    };

    // 1. What earlier runs left, fenced at once.
    let mut runtimes = Vec::new();
    let mut reports = Vec::new();
    for v in &cfg.volumes {
        let sink = match &mode {
            Mode::Daemon => exec::task::tracing_sink(),
            Mode::Exec(_) => super::wrapper::passthrough_sink(),
        };
        // Fenced here, before the lease service: that must not wait for ZooKeeper.
        let (runtime, report) = super::offline::fence_leftovers_first(&cfg, v, sink).await?;
        runtimes.push(runtime);
        reports.push(report);
    }
    // Nothing is exposed now: pet until the driver takes over (it may take a
    // while to reach ZooKeeper), and disarm if start-up fails from here on.
    early.start(pet_every);

    // 2. The lease.
    let lease_cfg = LeaseConfig::from_config(&cfg).context("lease settings")?;
    let (service, mut notices) = LeaseService::start(lease_cfg)
        .await
        .context("starting the ZooKeeper lease")?;
    let service = Arc::new(service);

    if matches!(mode, Mode::Daemon) {
        write_daemon_pid(&cfg.node.run_dir)?;
    }

    // 3. The budget against the negotiated session timeout.
    let negotiated = service.session_timeout();
    let mut setups = Vec::new();
    for (v, report) in cfg.volumes.iter().zip(&reports) {
        let mut policy = v.policy.clone();
        if negotiated < policy.timings.session_timeout {
            tracing::warn!(volume = %v.name, requested_ms = policy.timings.session_timeout.as_millis() as u64,
                negotiated_ms = negotiated.as_millis() as u64, "ZooKeeper granted a shorter session timeout");
            policy.timings.session_timeout = negotiated;
        }
        let budget = policy.timings.fence_budget();
        if !budget.fits() {
            bail!(
                "volume {}: with the negotiated session timeout: {}",
                v.name,
                budget.verdict()
            );
        }
        if held_out(&cfg.node.state_dir, &v.name) {
            tracing::warn!(volume = %v.name, "force-detached earlier (held-out marker in state_dir): staying out until `nbd-failover resume`");
            policy.start_out = true;
        }
        setups.push(VolumeSetup {
            name: v.name.clone(),
            policy,
            leftovers: report.leftovers(),
        });
    }

    // 4. The driver.
    let lease_port: Arc<dyn LeasePort> = Arc::new(LeaseAdapter(service.clone()));
    let reports_for_runner: Vec<(String, exec::RecoveryReport)> = cfg
        .volumes
        .iter()
        .map(|v| v.name.clone())
        .zip(reports.iter().cloned())
        .collect();
    let (driver, leftovers) = Driver::with_runner(
        setups,
        lease_port,
        move |tx| {
            let runner = RealRunner::new(runtimes, ex, tx);
            for (name, r) in &reports_for_runner {
                runner.adopt_leftovers(name, r);
            }
            Arc::new(runner)
        },
        Box::new(watchdog.clone()),
        seed(),
    );
    let mut driver = driver;
    let tx = driver.sender();
    let daemon_mode = matches!(mode, Mode::Daemon);

    // The control socket, after the lease service proved no other daemon runs as this node.
    let mut background = Vec::new();
    if daemon_mode {
        let refs = References::load(cfg.node.state_dir.join("references.json"))?;
        for v in refs.referenced() {
            if held_out(&cfg.node.state_dir, &v) {
                tracing::warn!(volume = %v, references = ?refs.of(&v), "referenced, but force-detached earlier: staying out until `nbd-failover resume`");
            } else if cfg
                .volume(&v)
                .is_some_and(|c| c.activation == Activation::OnDemand)
            {
                tracing::info!(volume = %v, references = ?refs.of(&v), "referenced before the restart: acquiring it again");
                let _ = tx.send(Input::Operator {
                    volume: v.clone(),
                    event: crate::core::Event::Resume,
                });
            } else {
                tracing::warn!(volume = %v, "references.json names a volume that is not on demand here (any more): ignored");
            }
        }
        let listener = control::bind(&cfg.control.socket)?;
        let ctx = Arc::new(ControlContext {
            cfg: cfg.clone(),
            tx: tx.clone(),
            board: driver.board(),
            changes: driver.board_changes(),
            session: driver.session(),
            session_timeout: negotiated,
            origin: driver.origin(),
            refs: Arc::new(std::sync::Mutex::new(refs)),
            lease: Some(Arc::downgrade(&service)),
        });
        let path = cfg.control.socket.clone();
        background.push(tokio::spawn(control::serve(listener, path, ctx)));
        tracing::info!(socket = %cfg.control.socket.display(), "control socket ready");

        let metrics = Arc::new(Metrics::new(&cfg.node.id));
        let origin = driver.origin();
        metrics.set_driver_clock(Arc::new(move || origin.elapsed()));
        driver.observe(Arc::new(MetricsObserver(metrics.clone())));
        if let Some(addr) = cfg.metrics.listen {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => {
                    let session = driver.session();
                    let last_contact: Arc<dyn Fn() -> Option<f64> + Send + Sync> = Arc::new({
                        let session = session.clone();
                        move || {
                            session
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .last_contact
                                .map(|t| t.elapsed().as_secs_f64())
                        }
                    });
                    let board = driver.board();
                    let health_board = board.clone();
                    let health: Arc<dyn Fn() -> Result<(), String> + Send + Sync> =
                        Arc::new(move || health_of(&session, &health_board, origin));
                    tracing::info!(%addr, "metrics endpoint ready (/metrics, /healthz)");
                    background.push(tokio::spawn(crate::metrics::serve(
                        l,
                        metrics,
                        board,
                        last_contact,
                        health,
                    )));
                }
                Err(e) if cfg.metrics.explicit => {
                    bail!("metrics.listen = \"{addr}\": cannot listen there: {e} (set another address, or listen = \"off\")")
                }
                Err(e) => {
                    tracing::error!(%addr, error = %e, "cannot listen on the default metrics address: no metrics endpoint (set metrics.listen in the config)");
                }
            }
        }
    }
    let mut exec_watch = None;
    if let Mode::Exec(wrap) = &mode {
        let (observer, done) = wrap.observer();
        driver.observe(observer);
        exec_watch = Some(done);
    }

    tokio::spawn(async move {
        while let Some(n) = notices.recv().await {
            if let Some(n) = forward(n) {
                if tx.send(Input::Lease(n)).is_err() {
                    break;
                }
            }
        }
    });
    let board = driver.board();
    if let Some(n) = &notifier {
        n.ready(&format!(
            "{} volume(s), node {}",
            cfg.volumes.len(),
            cfg.node.id
        ))?;
    }
    tracing::info!(node = %cfg.node.id, volumes = cfg.volumes.len(), "daemon ready");
    let status_notifier = Notifier::from_env().ok().flatten();
    let status_board = board.clone();
    let status_task = tokio::spawn(async move {
        let Some(n) = status_notifier else { return };
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let line: Vec<String> = status_board
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|s| match s.generation {
                    Some(g) => format!("{} {} (gen {})", s.name, s.phase.name(), g.0),
                    None => format!("{} {}", s.name, s.phase.name()),
                })
                .collect();
            let _ = n.status(&line.join(", "));
        }
    });
    // From here the driver pets (only while every volume allows it); a
    // failure no longer disarms: something may be exposed.
    early.hand_over().await;
    let decisions = match exec_watch {
        None => driver.run(leftovers, shutdown_signal()).await,
        Some(done) => {
            let wrap = match &mode {
                Mode::Exec(w) => w,
                Mode::Daemon => unreachable!("exec_watch is set in exec mode only"),
            };
            let ended = wrap.until_done(done, shutdown_signal());
            driver.run(leftovers, ended).await
        }
    };
    // Every volume is fenced and released: a clean stop disarms the device now,
    // not after the lease service's shutdown (seconds without a pet).
    watchdog.disarm();
    status_task.abort();
    for b in background {
        b.abort();
        let _ = b.await;
    }
    if let Some(n) = &notifier {
        let _ = n.stopping("fenced and released every volume");
    }
    // A control request in flight may hold the service for a moment.
    let mut service = service;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let service = loop {
        match Arc::try_unwrap(service) {
            Ok(s) => break s,
            Err(shared) if tokio::time::Instant::now() < deadline => {
                service = shared;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(_) => anyhow::bail!("lease service still shared at shutdown"),
        }
    };
    service.shutdown(Duration::from_secs(5)).await;
    if matches!(mode, Mode::Daemon) {
        let _ = std::fs::remove_file(daemon_pid_path(&cfg.node.run_dir));
    }
    tracing::info!(decisions, "daemon stopped cleanly");
    Ok(match &mode {
        Mode::Daemon => 0,
        Mode::Exec(w) => {
            tracing::info!("exec: {}", w.outcome());
            w.exit_code()
        }
    })
}

/// `<run_dir>/exec-<volume>.pid`: the `exec` wrapper running `volume`.
pub fn exec_pid_path(run_dir: &std::path::Path, volume: &str) -> std::path::PathBuf {
    run_dir.join(format!("exec-{volume}.pid"))
}

/// The pid of a live `exec` wrapper running `volume` here.
pub fn running_exec(run_dir: &std::path::Path, volume: &str) -> Option<i32> {
    live_pid_file(&exec_pid_path(run_dir, volume))
}

/// Writes "PID START_TIME" and removes the file when dropped.
struct PidFileGuard(std::path::PathBuf);

impl PidFileGuard {
    fn write(path: std::path::PathBuf) -> anyhow::Result<Self> {
        let pid = std::process::id() as i32;
        let start = exec::procfs::read_stat(pid)
            .map(|s| s.start_time)
            .unwrap_or(0);
        std::fs::write(&path, format!("{pid} {start}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(PidFileGuard(path))
    }
}

impl Drop for PidFileGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Opens the configured watchdog (checking systemd's settings against it);
/// returns it and how often to pet it while nothing is exposed.
fn arm_watchdog(cfg: &Config) -> anyhow::Result<(SharedWatchdog, Option<Duration>)> {
    let (wd, timeout): (Box<dyn Watchdog>, Option<Duration>) = match &cfg.watchdog {
        WatchdogConfig::Off => {
            if let Some(wd) = systemd::watchdog_from_env() {
                bail!("systemd set WatchdogSec ({}ms) but watchdog.mode = \"off\": the daemon would never pet it and systemd would kill it every {}ms; set watchdog.mode = \"systemd\" with timeout = \"{}s\", or remove WatchdogSec from the unit", wd.as_millis(), wd.as_millis(), wd.as_secs());
            }
            (Box::new(NoWatchdog), None)
        }
        WatchdogConfig::Systemd { timeout } => {
            let Some(env_wd) = systemd::watchdog_from_env() else {
                bail!("watchdog.mode = \"systemd\" but systemd set no WatchdogSec (WATCHDOG_USEC): set WatchdogSec={}s in the unit", timeout.as_secs());
            };
            if env_wd > *timeout {
                bail!("systemd's WatchdogSec ({}ms) is longer than watchdog.timeout ({}ms): the node would be reset too late", env_wd.as_millis(), timeout.as_millis());
            }
            let Some(n) = Notifier::from_env()? else {
                bail!("watchdog.mode = \"systemd\" needs Type=notify (NOTIFY_SOCKET is not set)");
            };
            (Box::new(SystemdWatchdog(n)), Some(env_wd))
        }
        WatchdogConfig::Device { device, timeout } => {
            if let Some(wd) = systemd::watchdog_from_env() {
                bail!("systemd set WatchdogSec ({}ms) but watchdog.mode = \"device\": the daemon pets the device, not systemd, so systemd would kill it every {}ms; remove WatchdogSec from the unit", wd.as_millis(), wd.as_millis());
            }
            (
                Box::new(DeviceWatchdog::arm(device, *timeout)?),
                Some(*timeout),
            )
        }
    };
    Ok((
        SharedWatchdog::new(wd),
        timeout.map(|t| (t / 4).max(Duration::from_millis(50))),
    ))
}

/// The watchdog between the leftover fence and the driver: petted on a timer
/// (nothing is exposed then) and disarmed if start-up fails.
struct EarlyWatchdog {
    watchdog: SharedWatchdog,
    petter: Option<tokio::task::JoinHandle<()>>,
}

impl EarlyWatchdog {
    fn start(&mut self, every: Option<Duration>) {
        let Some(every) = every else { return };
        let mut wd = self.watchdog.clone();
        self.petter = Some(tokio::spawn(async move {
            loop {
                wd.pet();
                tokio::time::sleep(every).await;
            }
        }));
    }

    async fn hand_over(mut self) {
        if let Some(p) = self.petter.take() {
            p.abort();
            let _ = p.await;
        }
    }
}

impl Drop for EarlyWatchdog {
    fn drop(&mut self) {
        // Still here: start-up failed after the leftovers were fenced.
        if let Some(p) = self.petter.take() {
            p.abort();
            self.watchdog.disarm();
        }
    }
}

/// `<run_dir>/daemon.lock`, held (flock) for the daemon's lifetime.
fn lock_run_dir(run_dir: &std::path::Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = run_dir.join("daemon.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(l),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let who = live_pid_file(&daemon_pid_path(run_dir))
                .map_or_else(|| "another process".to_string(), |p| format!("pid {p}"));
            bail!(
                "another nbd-failover daemon ({who}) already runs with run_dir {} (it holds {}): \
                 stop it first (systemctl stop nbd-failover); this one touched nothing",
                run_dir.display(),
                path.display()
            )
        }
        Err((_, e)) => Err(anyhow::anyhow!("locking {}: {e}", path.display())),
    }
}

fn live_pid_file(path: &std::path::Path) -> Option<i32> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut it = text.split_whitespace();
    let pid: i32 = it.next()?.parse().ok()?;
    let start: u64 = it.next()?.parse().ok()?;
    exec::procfs::process_alive(pid, Some(start)).then_some(pid)
}

/// `<run_dir>/daemon.pid`: "PID START_TIME" of the running daemon (forced detach finds a wedged one by it).
pub fn daemon_pid_path(run_dir: &std::path::Path) -> std::path::PathBuf {
    run_dir.join("daemon.pid")
}

fn write_daemon_pid(run_dir: &std::path::Path) -> anyhow::Result<()> {
    let pid = std::process::id() as i32;
    let start = exec::procfs::read_stat(pid)
        .map(|s| s.start_time)
        .unwrap_or(0);
    let path = daemon_pid_path(run_dir);
    std::fs::write(&path, format!("{pid} {start}\n"))
        .with_context(|| format!("writing {}", path.display()))
}

/// The daemon's pid if one runs per `<run_dir>/daemon.pid` (same start time).
pub fn running_daemon(run_dir: &std::path::Path) -> Option<i32> {
    live_pid_file(&daemon_pid_path(run_dir))
}

/// `<state_dir>/held-out/<volume>`: written by a forced detach; a (re)started
/// daemon keeps the volume out until `resume` removes it.
pub fn held_out_path(state_dir: &std::path::Path, volume: &str) -> std::path::PathBuf {
    state_dir.join("held-out").join(volume)
}

/// Whether `volume` carries the held-out marker.
pub fn held_out(state_dir: &std::path::Path, volume: &str) -> bool {
    held_out_path(state_dir, volume).exists()
}

/// Sets or clears the held-out marker (durably).
pub fn set_held_out(state_dir: &std::path::Path, volume: &str, on: bool) -> std::io::Result<()> {
    let p = held_out_path(state_dir, volume);
    if on {
        let dir = p.parent().expect("held-out dir");
        std::fs::create_dir_all(dir)?;
        let f = std::fs::File::create(&p)?;
        f.sync_all()?;
        std::fs::File::open(dir)?.sync_all()
    } else {
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// `/healthz`: healthy while the ZooKeeper session is connected and no volume is past its fence deadline.
fn health_of(
    session: &std::sync::Mutex<super::SessionView>,
    board: &super::StatusBoard,
    origin: std::time::Instant,
) -> Result<(), String> {
    let s = *session.lock().unwrap_or_else(|p| p.into_inner());
    if s.state != "connected" {
        return Err(format!("ZooKeeper session {}", s.state));
    }
    let now = origin.elapsed();
    for v in board.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        if v.fence_deadline.is_some_and(|d| d < now) {
            return Err(format!("volume {} is past its fence deadline", v.name));
        }
    }
    Ok(())
}

struct MetricsObserver(Arc<Metrics>);

impl super::PhaseObserver for MetricsObserver {
    fn phase_changed(
        &self,
        volume: &str,
        from: crate::core::Phase,
        to: crate::core::Phase,
        spent: Duration,
    ) {
        self.0.phase_changed(volume, from, to, spent);
    }
    fn session_state(&self, state: &'static str) {
        self.0.session_state(state);
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers: shutdown only by SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

/// A seed for back-off jitter: differs per process, no OS randomness needed in the core.
fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ u64::from(std::process::id()).rotate_left(32)
}
