//! The task: an `exec` command in its own process group (killed with the daemon), or a systemd unit; start, signal, wait, pid files.
//!
//! **`exec` tasks** ([`ExecTask`]) are spawned (see [`super::spawn`]) in a new
//! session, so the task's pid is its process-group id and `killpg` reaches
//! everything it forks that does not start a session of its own. They get
//! `PR_SET_PDEATHSIG=SIGKILL`: if the daemon dies, the task dies with it
//! (children of the task are not covered by that signal — start-up recovery
//! finds and kills what is left of the group). The environment is built from
//! scratch (the daemon's own, with systemd's `NOTIFY_SOCKET` and the like, is
//! not passed on): `PATH`, `LANG`/`TZ` if set, `HOME`/`USER`/`LOGNAME` for a
//! configured user, the config's `env`, and `NBD_FAILOVER_VOLUME`,
//! `NBD_FAILOVER_MOUNT`, `NBD_FAILOVER_GENERATION` (which the config cannot
//! override). The working directory is `/` (not the mount: a task should not
//! hold it by accident). stdout and stderr are forwarded line by line to an
//! [`OutputSink`]. A pid file per volume in `run_dir` records pid, start time
//! and generation for start-up recovery. When the leader exits, whatever is
//! left of its group is killed (as systemd does for a unit's cgroup), so a
//! restart never runs two generations of the task side by side; then the exit
//! status is reported.
//!
//! **`systemd_unit` tasks** ([`SystemdTask`]) are driven through `systemctl`:
//! `start` (waits for the start job), `stop --no-block` for SIGTERM (systemd
//! then applies the unit's own stop logic and timeouts), `kill
//! --kill-whom=all --signal=SIGKILL` for SIGKILL, and `show` polled every
//! second to learn when it has stopped. The volume's variables are written to
//! `<run_dir>/<volume>.env` before each start, for the unit to read with
//! `EnvironmentFile=`. Restarting is the core's business: the unit should not
//! restart itself (`Restart=no`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::config::{NodeConfig, TaskRun, VolumeConfig};
use crate::core::{ExitStatus, Generation, TaskSignal};

use super::spawn::{self, ChildSetup, Credentials};
use super::{procfs, BoxFuture};

/// What a volume's task is and where it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskSpec {
    /// The volume.
    pub volume: String,
    /// The volume's mount path (in the environment).
    pub mount_point: PathBuf,
    /// Command or unit.
    pub run: TaskRun,
    /// User an `exec` task runs as.
    pub user: Option<String>,
    /// Extra environment from the config.
    pub env: BTreeMap<String, String>,
    /// The node's run directory (pid and env files).
    pub run_dir: PathBuf,
}

impl TaskSpec {
    /// The task of a configured volume; `None` when it has none.
    pub fn for_volume(volume: &VolumeConfig, node: &NodeConfig) -> Option<TaskSpec> {
        let t = volume.task.as_ref()?;
        Some(TaskSpec {
            volume: volume.name.clone(),
            mount_point: volume.mount_path.clone(),
            run: t.run.clone(),
            user: t.user.clone(),
            env: t.env.clone(),
            run_dir: node.run_dir.clone(),
        })
    }

    /// `<run_dir>/<volume>.task`: pid, start time and generation of the running `exec` task.
    pub fn pid_file(&self) -> PathBuf {
        self.run_dir.join(format!("{}.task", self.volume))
    }

    /// `<run_dir>/<volume>.env`: the variables for a systemd unit's `EnvironmentFile=`.
    pub fn env_file(&self) -> PathBuf {
        self.run_dir.join(format!("{}.env", self.volume))
    }

    /// The variables this project sets for the task, after the config's own.
    pub fn volume_env(&self, generation: Generation) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .env
            .iter()
            .filter(|(k, _)| !k.starts_with("NBD_FAILOVER_"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.push(("NBD_FAILOVER_VOLUME".to_string(), self.volume.clone()));
        v.push((
            "NBD_FAILOVER_MOUNT".to_string(),
            self.mount_point.display().to_string(),
        ));
        v.push((
            "NBD_FAILOVER_GENERATION".to_string(),
            generation.0.to_string(),
        ));
        v
    }
}

/// Which output stream a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// stdout.
    Stdout,
    /// stderr.
    Stderr,
}

impl Stream {
    /// `stdout` or `stderr`.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// One line of task output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputLine<'a> {
    /// The volume.
    pub volume: &'a str,
    /// The generation the task runs under.
    pub generation: Generation,
    /// stdout or stderr.
    pub stream: Stream,
    /// The line, without its newline (lossy UTF-8, cut at 16 KiB).
    pub line: &'a str,
}

/// Where task output goes.
pub type OutputSink = Arc<dyn Fn(&OutputLine<'_>) + Send + Sync>;

/// A sink that logs each line with `tracing` (target `nbd_failover::task`).
pub fn tracing_sink() -> OutputSink {
    Arc::new(|l: &OutputLine<'_>| {
        tracing::info!(
            target: "nbd_failover::task",
            volume = l.volume,
            generation = l.generation.0,
            stream = l.stream.as_str(),
            "{}",
            l.line
        );
    })
}

/// Which task is running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskInfo {
    /// An `exec` task's process group.
    Group {
        /// Process-group id (= the leader's pid).
        pgid: i32,
        /// The leader's start time (identity).
        start_time: u64,
        /// The generation it runs under, if known.
        generation: Option<Generation>,
    },
    /// A systemd unit.
    Unit {
        /// The unit.
        unit: String,
    },
}

/// Resolves when the task has exited (for an `exec` task: its leader, and the
/// rest of its group has been killed).
pub type TaskExit = BoxFuture<'static, ExitStatus>;

/// A task that was started or adopted.
pub struct StartedTask {
    /// Which one.
    pub info: TaskInfo,
    /// Found at start-up rather than started by us: its exit status is not
    /// knowable (it is not our child) and is reported as the last signal sent.
    pub adopted: bool,
    /// Its end.
    pub exit: TaskExit,
}

impl std::fmt::Debug for StartedTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartedTask")
            .field("info", &self.info)
            .field("adopted", &self.adopted)
            .finish_non_exhaustive()
    }
}

/// A task an earlier run of the daemon left running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskLeftover {
    /// A process group from a pid file.
    Group {
        /// Process-group id.
        pgid: i32,
        /// The recorded leader start time.
        start_time: u64,
        /// The leader itself is still alive (else only members of its group are).
        leader_alive: bool,
        /// Live members (including the leader if alive).
        members: Vec<i32>,
        /// The generation recorded in the pid file.
        generation: Option<Generation>,
        /// The pid file.
        pid_file: PathBuf,
    },
    /// A systemd unit that is active.
    Unit {
        /// The unit.
        unit: String,
        /// Its `ActiveState`.
        state: String,
    },
}

/// Why a task operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The operation does not apply to this kind of task.
    #[error("{0}")]
    WrongKind(String),
    /// A task of this volume is still running.
    #[error("the task of volume {volume} is still running (process group {pgid})")]
    AlreadyRunning {
        /// The volume.
        volume: String,
        /// Its group.
        pgid: i32,
    },
    /// The user cannot be used.
    #[error("task user {user:?}: {source}")]
    User {
        /// The user.
        user: String,
        /// Why.
        source: std::io::Error,
    },
    /// The command could not be started.
    #[error("cannot start {program}: {source}", program = program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The pid or env file could not be written.
    #[error("{path}: {source}", path = path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Signalling failed.
    #[error("cannot signal process group {pgid}: {source}")]
    Signal {
        /// The group.
        pgid: i32,
        /// Why.
        source: std::io::Error,
    },
    /// `systemctl` failed.
    #[error("`{command}` failed ({status}){}", if output.trim().is_empty() { String::new() } else { format!(": {}", output.trim()) })]
    Systemctl {
        /// The command line.
        command: String,
        /// Its status.
        status: String,
        /// What it printed.
        output: String,
    },
    /// A failure injected by a fake.
    #[error("injected failure: {0}")]
    Injected(String),
}

/// Starts, signals and watches one volume's task.
pub trait TaskRunner: Send + Sync {
    /// Starts the task under `generation`. Must run inside a tokio runtime.
    fn start(&self, generation: Generation) -> BoxFuture<'_, Result<StartedTask, TaskError>>;
    /// Signals the task (the whole process group; for a unit: stop or kill).
    /// Nothing running is not an error: the task is already where the signal would put it.
    fn signal(&self, signal: TaskSignal) -> BoxFuture<'_, Result<(), TaskError>>;
    /// What an earlier run left running (pid file verified by start time; unit state). Blocking.
    fn find_leftover(&self) -> Result<Option<TaskLeftover>, TaskError>;
    /// Takes over a leftover so that `signal` reaches it and its end is reported.
    /// Must run inside a tokio runtime.
    fn adopt(&self, leftover: &TaskLeftover) -> Result<StartedTask, TaskError>;
}

fn nix_signal(s: TaskSignal) -> Signal {
    match s {
        TaskSignal::Term => Signal::SIGTERM,
        TaskSignal::Kill => Signal::SIGKILL,
    }
}

/// What a pid file says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PidFile {
    /// The leader's pid (= process-group id).
    pub pid: i32,
    /// The leader's start time.
    pub start_time: u64,
    /// The generation.
    pub generation: Option<Generation>,
    /// The volume.
    pub volume: String,
}

impl PidFile {
    /// `key=value` lines.
    pub fn render(&self) -> String {
        let mut s = format!(
            "pid={}\nstart_time={}\nvolume={}\n",
            self.pid, self.start_time, self.volume
        );
        if let Some(g) = self.generation {
            s.push_str(&format!("generation={}\n", g.0));
        }
        s
    }

    /// Parses [`PidFile::render`]'s format; `None` without a valid pid and start time.
    pub fn parse(text: &str) -> Option<PidFile> {
        let mut pid = None;
        let mut start_time = None;
        let mut generation = None;
        let mut volume = String::new();
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            match k.trim() {
                "pid" => pid = v.trim().parse().ok(),
                "start_time" => start_time = v.trim().parse().ok(),
                "generation" => generation = v.trim().parse().ok().map(Generation),
                "volume" => volume = v.trim().to_string(),
                _ => {}
            }
        }
        let pid: i32 = pid?;
        (pid > 1).then_some(())?;
        Some(PidFile {
            pid,
            start_time: start_time?,
            generation,
            volume,
        })
    }
}

/// Writes `contents` to `path` atomically (temp file + rename) with `mode`.
fn write_atomic(path: &Path, contents: &str, mode: u32) -> Result<(), TaskError> {
    let err = |source| TaskError::File {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(err)
}

/// Removes the pid file if it still names `pid`.
fn remove_pid_file(path: &Path, pid: i32) {
    if let Ok(text) = std::fs::read_to_string(path) {
        if PidFile::parse(&text).map(|p| p.pid) == Some(pid) {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[derive(Debug, Clone)]
struct Current {
    pgid: i32,
    start_time: u64,
    last_signal: Option<Signal>,
}

/// The real runner of `exec` tasks (see the module doc).
pub struct ExecTask {
    spec: TaskSpec,
    sink: OutputSink,
    current: Arc<Mutex<Option<Current>>>,
}

impl std::fmt::Debug for ExecTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecTask")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

/// Grace for a group's stragglers to die after their SIGKILL.
const STRAGGLER_WAIT: Duration = Duration::from_secs(1);
/// Poll interval for processes that are not our children.
const ADOPTED_POLL: Duration = Duration::from_millis(50);

impl ExecTask {
    /// A runner for `spec`'s command, forwarding output to `sink`.
    pub fn new(spec: TaskSpec, sink: OutputSink) -> Self {
        ExecTask {
            spec,
            sink,
            current: Arc::new(Mutex::new(None)),
        }
    }

    /// What it runs.
    pub fn spec(&self) -> &TaskSpec {
        &self.spec
    }

    /// The running task's process group, if any.
    pub fn pgid(&self) -> Option<i32> {
        self.lock().as_ref().map(|c| c.pgid)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Current>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn base_env(creds: Option<&Credentials>) -> Vec<(String, String)> {
        let mut env = vec![(
            "PATH".to_string(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        )];
        for k in ["LANG", "LC_ALL", "TZ"] {
            if let Ok(v) = std::env::var(k) {
                env.push((k.to_string(), v));
            }
        }
        match creds {
            Some(c) => {
                env.push(("HOME".to_string(), c.home.display().to_string()));
                env.push(("USER".to_string(), c.user.clone()));
                env.push(("LOGNAME".to_string(), c.user.clone()));
            }
            None => {
                if let Ok(v) = std::env::var("HOME") {
                    env.push(("HOME".to_string(), v));
                }
            }
        }
        env
    }

    async fn start_inner(&self, generation: Generation) -> Result<StartedTask, TaskError> {
        let argv = match &self.spec.run {
            TaskRun::Exec(argv) if !argv.is_empty() => argv.clone(),
            TaskRun::Exec(_) => return Err(TaskError::WrongKind("empty task command".to_string())),
            TaskRun::SystemdUnit(u) => {
                return Err(TaskError::WrongKind(format!(
                    "volume {} runs systemd unit {u}, not a command",
                    self.spec.volume
                )))
            }
        };
        let running = self.lock().clone();
        if let Some(c) = running {
            if !procfs::group_alive(c.pgid, c.start_time)
                .unwrap_or_default()
                .is_empty()
            {
                return Err(TaskError::AlreadyRunning {
                    volume: self.spec.volume.clone(),
                    pgid: c.pgid,
                });
            }
        }
        let creds = match &self.spec.user {
            Some(u) => Some(Credentials::lookup(u).map_err(|source| TaskError::User {
                user: u.clone(),
                source,
            })?),
            None => None,
        };
        let program = PathBuf::from(&argv[0]);
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(argv[1..].iter().map(OsString::from))
            .env_clear()
            .envs(Self::base_env(creds.as_ref()))
            .envs(self.spec.volume_env(generation))
            .current_dir("/")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(false);
        spawn::prepare(&mut cmd, ChildSetup { credentials: creds });
        let mut child = spawn::spawn(cmd).await.map_err(|source| TaskError::Spawn {
            program: program.clone(),
            source,
        })?;
        let Some(pid) = child.id().map(|p| p as i32) else {
            return Err(TaskError::Spawn {
                program,
                source: std::io::Error::other("exited at once"),
            });
        };
        let start_time = procfs::read_stat(pid).map(|s| s.start_time).unwrap_or(0);
        let pid_file = self.spec.pid_file();
        let record = PidFile {
            pid,
            start_time,
            generation: Some(generation),
            volume: self.spec.volume.clone(),
        };
        if let Err(e) = write_atomic(&pid_file, &record.render(), 0o644) {
            let _ = spawn::signal_group(pid, Signal::SIGKILL);
            let _ = child.wait().await;
            return Err(e);
        }
        *self.lock() = Some(Current {
            pgid: pid,
            start_time,
            last_signal: None,
        });
        tracing::info!(
            volume = %self.spec.volume,
            generation = generation.0,
            pid,
            command = ?argv,
            "task started"
        );
        for (stream, pipe) in [
            (Stream::Stdout, child.stdout.take().map(Pipe::Out)),
            (Stream::Stderr, child.stderr.take().map(Pipe::Err)),
        ] {
            let Some(pipe) = pipe else { continue };
            let sink = self.sink.clone();
            let volume = self.spec.volume.clone();
            tokio::spawn(async move {
                let f = |l: &str| {
                    sink(&OutputLine {
                        volume: &volume,
                        generation,
                        stream,
                        line: l,
                    })
                };
                match pipe {
                    Pipe::Out(p) => spawn::for_each_line(p, f).await,
                    Pipe::Err(p) => spawn::for_each_line(p, f).await,
                }
            });
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let current = self.current.clone();
        let volume = self.spec.volume.clone();
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(s) => match (s.code(), s.signal()) {
                    (Some(c), _) => ExitStatus::Code(c),
                    (None, Some(sig)) => ExitStatus::Signal(sig),
                    (None, None) => ExitStatus::Code(-1),
                },
                Err(e) => {
                    tracing::error!(volume = %volume, pid, "waiting for the task failed: {e}");
                    ExitStatus::Code(-1)
                }
            };
            kill_stragglers(&volume, pid).await;
            remove_pid_file(&pid_file, pid);
            {
                let mut cur = current.lock().unwrap_or_else(|e| e.into_inner());
                if cur.as_ref().map(|c| c.pgid) == Some(pid) {
                    *cur = None;
                }
            }
            tracing::info!(volume = %volume, pid, status = %status, "task exited");
            let _ = tx.send(status);
        });
        Ok(StartedTask {
            info: TaskInfo::Group {
                pgid: pid,
                start_time,
                generation: Some(generation),
            },
            adopted: false,
            exit: Box::pin(async move { rx.await.unwrap_or(ExitStatus::Code(-1)) }),
        })
    }
}

enum Pipe {
    Out(tokio::process::ChildStdout),
    Err(tokio::process::ChildStderr),
}

/// After the leader of group `pgid` exited: SIGKILL what is left of the group, wait a little.
async fn kill_stragglers(volume: &str, pgid: i32) {
    let members = procfs::group_members(pgid).unwrap_or_default();
    if members.is_empty() {
        return;
    }
    let names: Vec<String> = members
        .iter()
        .map(|m| format!("{} ({})", m.pid, m.comm))
        .collect();
    tracing::warn!(volume = %volume, pgid, stragglers = ?names, "task leader exited; killing the rest of its process group");
    let _ = spawn::signal_group(pgid, Signal::SIGKILL);
    let deadline = tokio::time::Instant::now() + STRAGGLER_WAIT;
    while tokio::time::Instant::now() < deadline {
        if procfs::group_members(pgid).unwrap_or_default().is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::warn!(volume = %volume, pgid, "members of the task's process group survived SIGKILL (stuck in the kernel?)");
}

/// Polls an adopted group until it is gone; reports the last signal sent.
fn watch_adopted(
    current: Arc<Mutex<Option<Current>>>,
    pgid: i32,
    start_time: u64,
    pid_file: Option<PathBuf>,
) -> TaskExit {
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        loop {
            if procfs::group_alive(pgid, start_time)
                .unwrap_or_default()
                .is_empty()
            {
                break;
            }
            tokio::time::sleep(ADOPTED_POLL).await;
        }
        if let Some(p) = &pid_file {
            remove_pid_file(p, pgid);
        }
        let last = {
            let mut cur = current.lock().unwrap_or_else(|e| e.into_inner());
            let last = cur.as_ref().and_then(|c| c.last_signal);
            if cur.as_ref().map(|c| c.pgid) == Some(pgid) {
                *cur = None;
            }
            last
        };
        let _ = tx.send(ExitStatus::Signal(last.unwrap_or(Signal::SIGKILL) as i32));
    });
    Box::pin(async move { rx.await.unwrap_or(ExitStatus::Code(-1)) })
}

impl TaskRunner for ExecTask {
    fn start(&self, generation: Generation) -> BoxFuture<'_, Result<StartedTask, TaskError>> {
        Box::pin(self.start_inner(generation))
    }

    fn signal(&self, signal: TaskSignal) -> BoxFuture<'_, Result<(), TaskError>> {
        Box::pin(async move {
            let sig = nix_signal(signal);
            let target = {
                let mut cur = self.lock();
                match cur.as_mut() {
                    Some(c) => {
                        c.last_signal = Some(sig);
                        Some((c.pgid, c.start_time))
                    }
                    None => None,
                }
            };
            let Some((pgid, start_time)) = target else {
                tracing::info!(volume = %self.spec.volume, signal = %sig, "no task running: nothing to signal");
                return Ok(());
            };
            if procfs::group_alive(pgid, start_time)
                .unwrap_or_default()
                .is_empty()
            {
                tracing::info!(volume = %self.spec.volume, pgid, signal = %sig, "task group already gone");
                return Ok(());
            }
            let existed = spawn::signal_group(pgid, sig)
                .map_err(|source| TaskError::Signal { pgid, source })?;
            tracing::info!(volume = %self.spec.volume, pgid, signal = %sig, existed, "signalled the task's process group");
            Ok(())
        })
    }

    fn find_leftover(&self) -> Result<Option<TaskLeftover>, TaskError> {
        let path = self.spec.pid_file();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(TaskError::File { path, source }),
        };
        let Some(pf) = PidFile::parse(&text) else {
            tracing::warn!(pid_file = %path.display(), "unreadable pid file ignored");
            return Ok(None);
        };
        let members = procfs::group_alive(pf.pid, pf.start_time).unwrap_or_default();
        if members.is_empty() {
            tracing::info!(pid_file = %path.display(), pid = pf.pid, "stale pid file: its process group is gone");
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        let leader_alive = procfs::process_alive(pf.pid, Some(pf.start_time));
        Ok(Some(TaskLeftover::Group {
            pgid: pf.pid,
            start_time: pf.start_time,
            leader_alive,
            members,
            generation: pf.generation,
            pid_file: path,
        }))
    }

    fn adopt(&self, leftover: &TaskLeftover) -> Result<StartedTask, TaskError> {
        let TaskLeftover::Group {
            pgid,
            start_time,
            generation,
            pid_file,
            ..
        } = leftover
        else {
            return Err(TaskError::WrongKind(
                "an exec task cannot adopt a systemd unit".to_string(),
            ));
        };
        *self.lock() = Some(Current {
            pgid: *pgid,
            start_time: *start_time,
            last_signal: None,
        });
        tracing::warn!(volume = %self.spec.volume, pgid, generation = ?generation, "adopted a task group left by an earlier run");
        Ok(StartedTask {
            info: TaskInfo::Group {
                pgid: *pgid,
                start_time: *start_time,
                generation: *generation,
            },
            adopted: true,
            exit: watch_adopted(
                self.current.clone(),
                *pgid,
                *start_time,
                Some(pid_file.clone()),
            ),
        })
    }
}

/// The real runner of `systemd_unit` tasks, through `systemctl` (see the module doc).
#[derive(Clone, Debug)]
pub struct SystemdTask {
    spec: TaskSpec,
    unit: String,
    systemctl: PathBuf,
    /// How often `systemctl show` is polled while the unit runs.
    pub poll: Duration,
    /// Bound on each `systemctl` call (`start` waits for the start job).
    pub timeout: Duration,
}

/// The unit's state as `systemctl show` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct UnitState {
    /// `ActiveState`: active, inactive, failed, activating, deactivating, reloading.
    pub active_state: String,
    /// `SubState`.
    pub sub_state: String,
    /// `Result`: success, exit-code, signal, timeout, …
    pub result: String,
    /// `ExecMainCode`: 1 exited, 2 killed, 3 dumped (the `si_code` of the main process).
    pub exec_main_code: i32,
    /// `ExecMainStatus`: exit code or signal number.
    pub exec_main_status: i32,
    /// `MainPID`.
    pub main_pid: i32,
}

impl UnitState {
    /// Parses `systemctl show -p …` output (`Key=value` lines).
    pub fn parse(text: &str) -> UnitState {
        let mut s = UnitState::default();
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            match k {
                "ActiveState" => s.active_state = v.to_string(),
                "SubState" => s.sub_state = v.to_string(),
                "Result" => s.result = v.to_string(),
                "ExecMainCode" => s.exec_main_code = v.parse().unwrap_or(0),
                "ExecMainStatus" => s.exec_main_status = v.parse().unwrap_or(0),
                "MainPID" => s.main_pid = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        s
    }

    /// Running in any sense (including starting, stopping or reloading).
    pub fn is_running(&self) -> bool {
        matches!(
            self.active_state.as_str(),
            "active" | "activating" | "deactivating" | "reloading" | "refreshing"
        )
    }

    /// How the main process ended (for a stopped unit).
    pub fn exit_status(&self) -> ExitStatus {
        match self.exec_main_code {
            1 => ExitStatus::Code(self.exec_main_status),
            2 | 3 => ExitStatus::Signal(self.exec_main_status),
            _ if self.result == "success" || self.result.is_empty() => ExitStatus::Code(0),
            _ => ExitStatus::Code(1),
        }
    }
}

const SHOW_PROPS: [&str; 6] = [
    "ActiveState",
    "SubState",
    "Result",
    "ExecMainCode",
    "ExecMainStatus",
    "MainPID",
];

impl SystemdTask {
    /// A runner for `spec`'s unit through `systemctl` from `$PATH`.
    pub fn new(spec: TaskSpec) -> Result<Self, TaskError> {
        Self::with_systemctl(spec, super::fsck::find_program("systemctl"))
    }

    /// The same with another `systemctl` (tests use a stand-in).
    pub fn with_systemctl(
        spec: TaskSpec,
        systemctl: impl Into<PathBuf>,
    ) -> Result<Self, TaskError> {
        let unit = match &spec.run {
            TaskRun::SystemdUnit(u) => u.clone(),
            TaskRun::Exec(_) => {
                return Err(TaskError::WrongKind(format!(
                    "volume {} runs a command, not a systemd unit",
                    spec.volume
                )))
            }
        };
        Ok(SystemdTask {
            spec,
            unit,
            systemctl: systemctl.into(),
            poll: Duration::from_secs(1),
            timeout: Duration::from_secs(90),
        })
    }

    async fn systemctl(&self, args: &[&str]) -> Result<String, TaskError> {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        let run = spawn::run_captured(&self.systemctl, &args, self.timeout)
            .await
            .map_err(|source| TaskError::Spawn {
                program: self.systemctl.clone(),
                source,
            })?;
        if run.code == Some(0) {
            Ok(run.output)
        } else {
            Err(TaskError::Systemctl {
                command: run.command.clone(),
                status: run.describe(),
                output: run.output,
            })
        }
    }

    /// The unit's state (blocking).
    pub fn state_blocking(&self) -> Result<UnitState, TaskError> {
        let mut args = vec!["show".to_string(), self.unit.clone()];
        for p in SHOW_PROPS {
            args.push("-p".to_string());
            args.push(p.to_string());
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out) = spawn::run_sync(
            &self.systemctl,
            &argv,
            self.timeout.min(Duration::from_secs(10)),
        )
        .map_err(|source| TaskError::Spawn {
            program: self.systemctl.clone(),
            source,
        })?;
        if code != Some(0) {
            return Err(TaskError::Systemctl {
                command: format!("{} {}", self.systemctl.display(), args.join(" ")),
                status: code.map_or("killed".to_string(), |c| format!("exit code {c}")),
                output: out,
            });
        }
        Ok(UnitState::parse(&out))
    }

    fn watch(&self) -> TaskExit {
        let me = self.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut failures = 0u32;
            let status = loop {
                let mut args = vec!["show", me.unit.as_str()];
                for p in SHOW_PROPS {
                    args.push("-p");
                    args.push(p);
                }
                match me.systemctl(&args).await {
                    Ok(out) => {
                        failures = 0;
                        let st = UnitState::parse(&out);
                        if !st.is_running() {
                            tracing::info!(unit = %me.unit, state = %st.active_state, result = %st.result, "unit stopped");
                            break st.exit_status();
                        }
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(unit = %me.unit, failures, "cannot read the unit's state: {e}");
                    }
                }
                tokio::time::sleep(me.poll).await;
            };
            let _ = tx.send(status);
        });
        Box::pin(async move { rx.await.unwrap_or(ExitStatus::Code(-1)) })
    }
}

impl TaskRunner for SystemdTask {
    fn start(&self, generation: Generation) -> BoxFuture<'_, Result<StartedTask, TaskError>> {
        Box::pin(async move {
            let mut env = String::new();
            for (k, v) in self.spec.volume_env(generation) {
                // systemd's EnvironmentFile= syntax: KEY="value" with \ and " escaped.
                let v = v.replace('\\', "\\\\").replace('"', "\\\"");
                env.push_str(&format!("{k}=\"{v}\"\n"));
            }
            write_atomic(&self.spec.env_file(), &env, 0o600)?;
            self.systemctl(&["start", self.unit.as_str()]).await?;
            tracing::info!(unit = %self.unit, volume = %self.spec.volume, generation = generation.0, "unit started");
            Ok(StartedTask {
                info: TaskInfo::Unit {
                    unit: self.unit.clone(),
                },
                adopted: false,
                exit: self.watch(),
            })
        })
    }

    fn signal(&self, signal: TaskSignal) -> BoxFuture<'_, Result<(), TaskError>> {
        Box::pin(async move {
            match signal {
                TaskSignal::Term => {
                    self.systemctl(&["stop", "--no-block", self.unit.as_str()])
                        .await?
                }
                TaskSignal::Kill => {
                    self.systemctl(&[
                        "kill",
                        "--kill-whom=all",
                        "--signal=SIGKILL",
                        self.unit.as_str(),
                    ])
                    .await?
                }
            };
            tracing::info!(unit = %self.unit, ?signal, "unit signalled");
            Ok(())
        })
    }

    fn find_leftover(&self) -> Result<Option<TaskLeftover>, TaskError> {
        let st = self.state_blocking()?;
        Ok(st.is_running().then(|| TaskLeftover::Unit {
            unit: self.unit.clone(),
            state: st.active_state,
        }))
    }

    fn adopt(&self, leftover: &TaskLeftover) -> Result<StartedTask, TaskError> {
        match leftover {
            TaskLeftover::Unit { unit, .. } if *unit == self.unit => Ok(StartedTask {
                info: TaskInfo::Unit { unit: unit.clone() },
                adopted: true,
                exit: self.watch(),
            }),
            other => Err(TaskError::WrongKind(format!(
                "unit runner of {} cannot adopt {other:?}",
                self.unit
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_files_round_trip() {
        let p = PidFile {
            pid: 1234,
            start_time: 99,
            generation: Some(Generation(7)),
            volume: "pg".to_string(),
        };
        assert_eq!(PidFile::parse(&p.render()), Some(p));
        assert_eq!(PidFile::parse("pid=1\nstart_time=3\n"), None);
        assert_eq!(PidFile::parse("garbage"), None);
    }

    #[test]
    fn unit_states_map_to_exit_statuses() {
        let st = UnitState::parse(
            "ActiveState=failed\nSubState=failed\nResult=exit-code\nExecMainCode=1\nExecMainStatus=3\nMainPID=0\n",
        );
        assert!(!st.is_running());
        assert_eq!(st.exit_status(), ExitStatus::Code(3));
        let st = UnitState::parse(
            "ActiveState=inactive\nResult=signal\nExecMainCode=2\nExecMainStatus=15\n",
        );
        assert_eq!(st.exit_status(), ExitStatus::Signal(15));
        let st = UnitState::parse("ActiveState=deactivating\n");
        assert!(st.is_running());
        let st = UnitState::parse("ActiveState=inactive\nResult=success\nExecMainCode=0\n");
        assert_eq!(st.exit_status(), ExitStatus::Code(0));
    }

    #[test]
    fn the_volume_variables_win_over_the_config() {
        let spec = TaskSpec {
            volume: "pg".to_string(),
            mount_point: PathBuf::from("/srv/pg"),
            run: TaskRun::Exec(vec!["/bin/true".to_string()]),
            user: None,
            env: [
                ("NBD_FAILOVER_VOLUME".to_string(), "evil".to_string()),
                ("PGDATA".to_string(), "/srv/pg/data".to_string()),
            ]
            .into_iter()
            .collect(),
            run_dir: PathBuf::from("/run/nbd-failover"),
        };
        let env = spec.volume_env(Generation(42));
        assert!(env.contains(&("PGDATA".to_string(), "/srv/pg/data".to_string())));
        assert!(env.contains(&("NBD_FAILOVER_VOLUME".to_string(), "pg".to_string())));
        assert!(!env.iter().any(|(_, v)| v == "evil"));
        assert!(env.contains(&("NBD_FAILOVER_GENERATION".to_string(), "42".to_string())));
        assert_eq!(spec.pid_file(), PathBuf::from("/run/nbd-failover/pg.task"));
    }
}
