//! `nbd-failover exec`: one volume, its task the wrapped command; the wrapper's exit status is the command's, or 75 when the lease was lost.
//!
//! The wrapper is a one-volume daemon with its own ZooKeeper session (node id
//! `<node.id>.exec-<volume>`). It watches the driver through a
//! [`PhaseObserver`] and decides when to stop:
//! - the command exited on its own → fence (unmount, detach, clean release),
//!   exit with the command's status (128 + signal when killed);
//! - the lease was lost (or the volume was drained or force-detached) while
//!   the command ran → the fence stopped it; exit [`EXIT_LEASE_LOST`];
//! - `--wait` ran out before the volume came up → exit [`EXIT_NOT_ACQUIRED`];
//! - SIGTERM/SIGINT → the fence stops the command (SIGTERM, SIGKILL after
//!   stop_grace), the command's status is passed through; SIGHUP, SIGUSR1,
//!   SIGUSR2 and SIGQUIT are forwarded to the command's process group.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::core::{Event, ExitStatus, Phase};

use super::PhaseObserver;

/// Exit status when the lease was lost (or the volume taken away) while the command ran.
pub const EXIT_LEASE_LOST: i32 = 75;
/// Exit status when the volume did not come up within `--wait`.
pub const EXIT_NOT_ACQUIRED: i32 = 69;

#[derive(Debug, Default)]
struct State {
    phase: Option<Phase>,
    ran: bool,
    task_exit: Option<ExitStatus>,
    lease_lost: bool,
    timed_out: bool,
    stopping: bool,
}

/// The wrapper's view of its one volume.
pub struct Wrap {
    volume: String,
    wait: Option<Duration>,
    pid_file: PathBuf,
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
}

/// What [`Wrap::until_done`] waits on.
pub struct Done(Arc<Notify>);

struct Observer {
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
}

impl PhaseObserver for Observer {
    fn phase_changed(&self, _volume: &str, _from: Phase, to: Phase, _spent: Duration) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.phase = Some(to);
        if to == Phase::Running {
            s.ran = true;
        }
        if to == Phase::Fencing && s.ran && s.task_exit.is_none() && !s.stopping {
            s.lease_lost = true;
        }
        drop(s);
        self.notify.notify_one();
    }

    fn event(&self, _volume: &str, event: &Event) {
        if let Event::TaskExited(status) = event {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let own = matches!(
                s.phase,
                Some(Phase::Running | Phase::Starting | Phase::RestartWait)
            );
            if s.task_exit.is_none() && (own || s.stopping) {
                s.task_exit = Some(*status);
            }
        }
    }
}

impl Wrap {
    /// Wraps `volume`'s task; `wait` bounds the time until it first runs.
    pub fn new(volume: &str, wait: Option<Duration>, pid_file: PathBuf) -> Self {
        Wrap {
            volume: volume.to_string(),
            wait,
            pid_file,
            state: Arc::default(),
            notify: Arc::new(Notify::new()),
        }
    }

    /// The volume it wraps.
    pub fn volume(&self) -> &str {
        &self.volume
    }

    /// The observer to give the driver, and what [`Wrap::until_done`] waits on.
    pub fn observer(&self) -> (Arc<dyn PhaseObserver>, Done) {
        (
            Arc::new(Observer {
                state: self.state.clone(),
                notify: self.notify.clone(),
            }),
            Done(self.notify.clone()),
        )
    }

    /// Resolves when the wrapper should stop (the driver then fences and releases).
    pub async fn until_done(&self, done: Done, signal: impl Future<Output = ()>) {
        let deadline = self.wait.map(|w| tokio::time::Instant::now() + w);
        tokio::pin!(signal);
        let forward = forwarded_signals();
        tokio::pin!(forward);
        loop {
            {
                let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                let settled = matches!(
                    s.phase,
                    Some(Phase::Out | Phase::Contending | Phase::Stopped)
                );
                if (s.task_exit.is_some() || s.lease_lost) && settled {
                    return;
                }
                if !s.ran && deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    s.timed_out = true;
                    tracing::error!(volume = %self.volume, "the volume did not come up within --wait");
                    return;
                }
            }
            tokio::select! {
                _ = done.0.notified() => {}
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {}
                _ = &mut signal => {
                    self.state.lock().unwrap_or_else(|p| p.into_inner()).stopping = true;
                    return;
                }
                sig = &mut forward => {
                    self.forward(sig);
                    forward.set(forwarded_signals());
                }
            }
        }
    }

    fn forward(&self, sig: nix::sys::signal::Signal) {
        let pid = std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|t| crate::exec::task::PidFile::parse(&t))
            .map(|p| p.pid);
        match pid {
            Some(pid) => {
                let r = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), sig);
                tracing::info!(pid, signal = %sig, ok = r.is_ok(), "forwarded a signal to the command");
            }
            None => {
                tracing::warn!(signal = %sig, "signal not forwarded: the command is not running")
            }
        }
    }

    /// The exit status for the wrapper, once the driver has stopped.
    pub fn exit_code(&self) -> i32 {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.timed_out {
            return EXIT_NOT_ACQUIRED;
        }
        if s.lease_lost {
            return EXIT_LEASE_LOST;
        }
        match s.task_exit {
            Some(ExitStatus::Code(c)) => c,
            Some(ExitStatus::Signal(n)) => 128 + n,
            None if s.stopping => 128 + 15,
            None => EXIT_LEASE_LOST,
        }
    }

    /// A one-line account of how it ended.
    pub fn outcome(&self) -> String {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.timed_out {
            format!("volume {} not acquired within --wait", self.volume)
        } else if s.lease_lost {
            format!(
                "lease on {} lost while the command ran: command stopped, volume fenced",
                self.volume
            )
        } else {
            match s.task_exit {
                Some(st) => format!("command ended ({st}); volume released cleanly"),
                None => "stopped before the command ran".to_string(),
            }
        }
    }
}

/// A task output sink writing the command's lines to the wrapper's own stdout and stderr.
pub fn passthrough_sink() -> crate::exec::OutputSink {
    Arc::new(|l: &crate::exec::OutputLine<'_>| {
        use std::io::Write;
        match l.stream {
            crate::exec::Stream::Stdout => {
                let mut o = std::io::stdout().lock();
                let _ = writeln!(o, "{}", l.line);
                let _ = o.flush();
            }
            crate::exec::Stream::Stderr => {
                let _ = writeln!(std::io::stderr().lock(), "{}", l.line);
            }
        }
    })
}

/// Resolves with the next HUP, USR1, USR2 or QUIT.
async fn forwarded_signals() -> nix::sys::signal::Signal {
    use nix::sys::signal::Signal;
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut hup), Ok(mut usr1), Ok(mut usr2), Ok(mut quit)) = (
        signal(SignalKind::hangup()),
        signal(SignalKind::user_defined1()),
        signal(SignalKind::user_defined2()),
        signal(SignalKind::quit()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = hup.recv() => Signal::SIGHUP,
        _ = usr1.recv() => Signal::SIGUSR1,
        _ = usr2.recv() => Signal::SIGUSR2,
        _ = quit.recv() => Signal::SIGQUIT,
    }
}
