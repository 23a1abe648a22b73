//! `nbd-failover daemon`: wires config, start-up recovery, the ZooKeeper lease, the executors, systemd and the watchdog around the driver.
//!
//! Order of start-up:
//! 1. recovery scan per volume (our devices, mounts at our paths, task groups
//!    from pid files) — the runner adopts what it finds so the core's fence
//!    of the leftovers reaches it;
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

use crate::config::{Config, WatchdogConfig};
use crate::core::Generation;
use crate::exec::{
    self, FsckRunner, HostRecovery, KernelLoop, LeftoverScan, LoopScanner, RecoverySpec,
    SysMounter, TaskRunner, TaskSpec,
};
use crate::lease::{self, LeaseConfig, LeaseService};
use crate::nbd::KernelNbd;

use super::devwatchdog::DeviceWatchdog;
use super::driver::{Driver, Input, LeaseNotice, LeasePort, NoWatchdog, VolumeSetup, Watchdog};
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

/// Runs the daemon until SIGTERM/SIGINT; returns after every volume is fenced and released.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.node.run_dir)
        .with_context(|| format!("creating run_dir {}", cfg.node.run_dir.display()))?;
    let nbd = Arc::new(KernelNbd::new());
    let loops = Arc::new(KernelLoop::new());
    let ex = Executors {
        nbd: nbd.clone(),
        loops: loops.clone(),
        fsck: Arc::new(FsckRunner::new()),
    };
    let recovery = HostRecovery::new()
        .with_scanner(Box::new(LoopScanner::new(loops.clone())))
        .with_scanner(Box::new(exec::recovery::NbdScanner::new(nbd.clone())));

    // 1. What earlier runs left.
    let mut runtimes = Vec::new();
    let mut reports = Vec::new();
    for v in &cfg.volumes {
        let task: Option<Arc<dyn TaskRunner>> = match TaskSpec::for_volume(v, &cfg.node) {
            None => None,
            Some(spec) => Some(match &spec.run {
                crate::config::TaskRun::Exec(_) => {
                    Arc::new(exec::ExecTask::new(spec, exec::task::tracing_sink()))
                }
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
        reports.push(report);
        runtimes.push(VolumeRuntime::new(
            v.clone(),
            cfg.node.clone(),
            task,
            Arc::new(SysMounter::new()),
        ));
    }

    // 2. The lease.
    let lease_cfg = LeaseConfig::from_config(&cfg).context("lease settings")?;
    let (service, mut notices) = LeaseService::start(lease_cfg)
        .await
        .context("starting the ZooKeeper lease")?;
    let service = Arc::new(service);

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
        setups.push(VolumeSetup {
            name: v.name.clone(),
            policy,
            leftovers: report.leftovers(),
        });
    }

    // 4. systemd, watchdog, driver.
    let notifier = Notifier::from_env().context("NOTIFY_SOCKET")?;
    let mut device_watchdog = None;
    let watchdog: Box<dyn Watchdog> = match &cfg.watchdog {
        WatchdogConfig::Off => Box::new(NoWatchdog),
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
            Box::new(SystemdWatchdog(n))
        }
        WatchdogConfig::Device { device, .. } => {
            let wd = DeviceWatchdog::open(device)?;
            device_watchdog = Some(device.clone());
            Box::new(wd)
        }
    };
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
        watchdog,
        seed(),
    );
    let tx = driver.sender();
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
    let decisions = driver.run(leftovers, shutdown_signal()).await;
    status_task.abort();
    if let Some(n) = &notifier {
        let _ = n.stopping("fenced and released every volume");
    }
    let service = Arc::try_unwrap(service)
        .map_err(|_| anyhow::anyhow!("lease service still shared at shutdown"))?;
    service.shutdown(Duration::from_secs(5)).await;
    if let Some(path) = device_watchdog {
        // The driver owned the open device; reopen to write the magic close.
        if let Ok(wd) = DeviceWatchdog::open(&path) {
            let _ = wd.disarm();
        }
    }
    tracing::info!(decisions, "daemon stopped cleanly");
    Ok(())
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
