//! Forced detach without the daemon: the CLI runs one volume's fence itself (kill the task group, unmount, detach) and deletes this node's lock nodes.
//!
//! Used when the daemon is dead or wedged. The fence is the daemon's own: the
//! start-up recovery scan finds what is attached, mounted and running for the
//! volume, a driver with no lease runs the core's fence of those leftovers,
//! escalated by a forced detach (SIGKILL at once; a busy unmount kills the
//! holders and goes lazy only as the last resort). Every decision and
//! completion is reported through `say`, so the operator sees each step.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::config::Config;
use crate::core::{Effect, Event, Generation, Phase};
use crate::lease::{LeaseAdmin, LeaseConfig};

use super::driver::{Driver, Input, LeasePort, NoWatchdog, PhaseObserver, VolumeSetup};
use super::runner::RealRunner;

/// A lease port for a driver that holds no lease.
struct NoLease;

impl LeasePort for NoLease {
    fn contend(&self, _volume: &str) {}
    fn withdraw(&self, _volume: &str) {}
    fn release(&self, _volume: &str, _generation: Generation, _clean: bool) {}
}

/// Prints each step.
struct Steps(Arc<dyn Fn(String) + Send + Sync>);

impl PhaseObserver for Steps {
    fn phase_changed(&self, _volume: &str, _from: Phase, _to: Phase, _spent: Duration) {}
    fn event(&self, _volume: &str, event: &Event) {
        let line = match event {
            Event::TaskSignalled(Ok(())) => "task group signalled".to_string(),
            Event::TaskSignalled(Err(e)) => format!("signalling the task failed: {e}"),
            Event::TaskExited(st) => format!("task ended ({st})"),
            Event::Unmounted(Ok(())) => "unmounted".to_string(),
            Event::Unmounted(Err(e)) => format!("unmount failed: {e}"),
            Event::Detached(Ok(())) => "device detached".to_string(),
            Event::Detached(Err(e)) => format!("detach failed: {e}"),
            _ => return,
        };
        (self.0)(format!("  done: {line}"));
    }
    fn decision(&self, _volume: &str, reason: &str, effects: &[Effect]) {
        if reason.is_empty() || reason.starts_with("nothing to do") {
            return;
        }
        let fx: Vec<String> = effects
            .iter()
            .filter(|e| !matches!(e, Effect::Contend | Effect::Withdraw))
            .map(describe)
            .collect();
        if fx.is_empty() {
            (self.0)(format!("  {reason}"));
        } else {
            (self.0)(format!("  {reason} -> {}", fx.join(", ")));
        }
    }
}

fn describe(e: &Effect) -> String {
    match e {
        Effect::SignalTask(s) => format!("send {s:?} to the task group"),
        Effect::Unmount { force: false } => "unmount".to_string(),
        Effect::Unmount { force: true } => {
            "unmount (kill holders; lazy only if still busy)".to_string()
        }
        Effect::Detach => "detach the device".to_string(),
        other => format!("{other:?}"),
    }
}

/// What the offline fence found and did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// A task was running.
    pub task_was_running: bool,
    /// Anything was found at all.
    pub found_anything: bool,
    /// Lock nodes of this node deleted from ZooKeeper.
    pub lock_nodes_deleted: Vec<String>,
    /// Why ZooKeeper could not be cleaned (the nodes then expire with the session).
    pub zookeeper_problem: Option<String>,
}

/// Why the offline fence refused to act.
#[derive(Debug, thiserror::Error)]
#[error("the task of volume {volume} is still running here ({detail}): force-detach would SIGKILL it; re-run with --yes")]
pub struct NeedsYes {
    /// The volume.
    pub volume: String,
    /// What runs.
    pub detail: String,
}

/// Runs the forced fence of `volume` without the daemon. `yes` allows killing a running task.
pub async fn force_detach(
    cfg: &Config,
    volume: &str,
    yes: bool,
    say: Arc<dyn Fn(String) + Send + Sync>,
) -> anyhow::Result<Outcome> {
    let v = cfg
        .volume(volume)
        .with_context(|| format!("no volume {volume:?} in {}", cfg.file))?;
    let (ex, recovery) = super::run::executors();
    let (runtime, report) =
        super::run::prepare_volume(v, cfg, &recovery, crate::exec::task::tracing_sink())?;
    let left = report.leftovers();
    let mut out = Outcome {
        task_was_running: left.task_running,
        found_anything: !left.is_empty(),
        ..Outcome::default()
    };
    say(format!(
        "found on this node for {volume}: {}",
        describe_leftovers(&left)
    ));
    if left.task_running && !yes {
        return Err(NeedsYes {
            volume: volume.to_string(),
            detail: "task process group alive".to_string(),
        }
        .into());
    }
    let wedged = super::run::running_daemon(&cfg.node.run_dir);
    if let Some(pid) = wedged {
        if !yes {
            return Err(NeedsYes {
                volume: volume.to_string(),
                detail: format!(
                    "the daemon, pid {pid}, is alive but does not answer; it would be killed"
                ),
            }
            .into());
        }
    }
    // On disk first: a restarted daemon keeps the volume out until `resume`.
    super::run::set_held_out(&cfg.node.state_dir, volume, true)
        .with_context(|| "recording the held-out marker")?;
    say(format!("  marked {volume} held out: the daemon will not take it again until `nbd-failover resume {volume}`"));
    if let Some(pid) = wedged {
        // A wedged daemon must not wake up and act on a volume it no longer
        // holds, and it keeps the device open (a loop device cannot clear).
        let p = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while crate::exec::procfs::process_alive(pid, None) && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        say(format!("  killed the wedged daemon (pid {pid}, SIGKILL) so it cannot wake up and act on the volume"));
    }
    if !left.is_empty() {
        run_fence(v, runtime, report, ex, true, say.clone()).await?;
    }

    // This node's own lock nodes, so the next holder need not wait for the session to expire.
    let cleanup = async {
        let lease_cfg = LeaseConfig::from_config(cfg)?;
        let admin = LeaseAdmin::connect(&lease_cfg).await?;
        admin.remove_node_entries(volume, &cfg.node.id).await
    };
    match tokio::time::timeout(Duration::from_secs(15), cleanup).await {
        Ok(Ok(deleted)) => {
            for e in &deleted {
                say(format!(
                    "  deleted this node's lock node {} (generation {}) in ZooKeeper",
                    e.name, e.czxid
                ));
            }
            if deleted.is_empty() {
                say("  no lock node of this node in ZooKeeper".to_string());
            }
            out.lock_nodes_deleted = deleted.into_iter().map(|e| e.name).collect();
        }
        Ok(Err(e)) => out.zookeeper_problem = Some(e.to_string()),
        Err(_) => out.zookeeper_problem = Some("ZooKeeper did not answer within 15s".to_string()),
    }
    if let Some(p) = &out.zookeeper_problem {
        say(format!("  could not clean up ZooKeeper ({p}): this node's lock node goes away when the dead daemon's session expires"));
    }
    Ok(out)
}

/// Runs the core's fence of what `report` found for `v`, with no lease:
/// `force` escalates it as a forced detach (SIGKILL at once, forced unmount)
/// and leaves the volume out; otherwise it is the start-up fence of leftovers.
async fn run_fence(
    v: &crate::config::VolumeConfig,
    runtime: super::runner::VolumeRuntime,
    report: crate::exec::RecoveryReport,
    ex: super::runner::Executors,
    force: bool,
    say: Arc<dyn Fn(String) + Send + Sync>,
) -> anyhow::Result<()> {
    let setup = VolumeSetup {
        name: v.name.clone(),
        policy: v.policy.clone(),
        leftovers: report.leftovers(),
    };
    let name = v.name.clone();
    let (mut driver, leftovers) = Driver::with_runner(
        vec![setup],
        Arc::new(NoLease),
        move |tx| {
            let runner = RealRunner::new(vec![runtime], ex, tx);
            runner.adopt_leftovers(&name, &report);
            Arc::new(runner)
        },
        Box::new(NoWatchdog),
        1,
    );
    driver.observe(Arc::new(Steps(say)));
    if force {
        let _ = driver.sender().send(Input::Operator {
            volume: v.name.clone(),
            event: Event::ForceDetach,
        });
    }
    let mut changes = driver.board_changes();
    let board = driver.board();
    let vol = v.name.clone();
    let fenced = async move {
        loop {
            let done = board
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|s| {
                    s.name == vol
                        && !s.exposed
                        && !matches!(s.phase, Phase::Init | Phase::Recovering | Phase::Fencing)
                        && (!force || s.phase == Phase::Out)
                });
            if done || changes.changed().await.is_err() {
                return;
            }
        }
    };
    let limit = v.policy.timings.fence_budget().total + Duration::from_secs(30);
    tokio::time::timeout(limit, driver.run(leftovers, fenced))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the fence did not finish within {}s: check `dmesg`, `findmnt {}` and `ps` for stuck processes (D state)",
                limit.as_secs(),
                v.mount_path.display()
            )
        })?;
    Ok(())
}

/// Start-up: fences what an earlier run left of `v` (device, mount, task)
/// before anything else, so that it never waits on ZooKeeper: a node that
/// cannot reach ZooKeeper must not keep a device attached while another node
/// may win the lease. Returns the rescanned (now empty) runtime and report.
pub async fn fence_leftovers_first(
    cfg: &Config,
    v: &crate::config::VolumeConfig,
    sink: crate::exec::OutputSink,
) -> anyhow::Result<(super::runner::VolumeRuntime, crate::exec::RecoveryReport)> {
    let (ex, recovery) = super::run::executors();
    let (runtime, report) = super::run::prepare_volume(v, cfg, &recovery, sink.clone())?;
    if report.leftovers().is_empty() {
        return Ok((runtime, report));
    }
    let volume = v.name.clone();
    let say: Arc<dyn Fn(String) + Send + Sync> = Arc::new(move |l: String| {
        tracing::info!(volume = %volume, "leftover fence: {}", l.trim());
    });
    run_fence(v, runtime, report, ex, false, say).await?;
    let (_, recovery) = super::run::executors();
    let again = super::run::prepare_volume(v, cfg, &recovery, sink)?;
    if !again.1.leftovers().is_empty() {
        anyhow::bail!(
            "volume {}: leftovers still there after their fence: {:?}",
            v.name,
            again.1.leftovers()
        );
    }
    Ok(again)
}

fn describe_leftovers(l: &crate::core::Leftovers) -> String {
    let mut v = Vec::new();
    if let Some(g) = l.attached {
        v.push(match g {
            Some(g) => format!("device attached (generation {g})"),
            None => "device attached".to_string(),
        });
    }
    if l.mounted {
        v.push("mounted".to_string());
    }
    if l.task_running {
        v.push("task running".to_string());
    }
    if v.is_empty() {
        "nothing attached, mounted or running".to_string()
    } else {
        v.join(", ")
    }
}
