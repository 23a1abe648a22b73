//! The filesystem check before mounting: `e2fsck -p` for ext2/3/4, `xfs_repair -n` for XFS, exit codes mapped to the core's `FsckOutcome`.
//!
//! **ext2/3/4** — `e2fsck -p [-f] DEVICE` (preen: fixes what is safe to fix
//! without a human; `-f` for the `force` policy). Its exit code is a bit set:
//! 0 clean, 1 errors corrected, 2 corrected but a reboot is advised, 4 errors
//! left uncorrected, 8 operational error, 16 usage error, 32 cancelled, 128
//! shared-library error. 0 and 1 proceed, 2 (and 3) proceed with a warning,
//! anything with a bit ≥ 4 set refuses: the filesystem is not mounted. A
//! journal that needs recovery (the previous holder crashed) is replayed by
//! e2fsck itself and proceeds.
//!
//! **XFS** — `xfs_repair -n DEVICE` checks without modifying (exit 0 clean,
//! 1 damage found). A log that still holds metadata changes (the previous
//! holder crashed) makes `-n` report *spurious* damage; the checker says so
//! ("valuable metadata changes in a log"). Then, by default, the log is
//! replayed the way XFS wants it — by mounting the device on a private scratch
//! directory and unmounting it — and the check is run again. Damage refuses
//! the mount, unless [`XfsOptions::repair`] allows `xfs_repair` (never `-L`,
//! which throws the log away) to repair it, which then proceeds with a warning.
//!
//! Every run is supervised (own process group, parent-death signal: a checker
//! must not keep writing after the daemon died) and bounded by the request's
//! timeout; on timeout the checker's whole group is killed and the filesystem
//! refused. Output is captured (bounded) in the [`FsckReport`] and logged.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::Filesystem;
use crate::core::{FsckOutcome, FsckPolicy};

use super::spawn::{run_captured, CommandRun};
use super::BoxFuture;

/// What kind of check to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsckMode {
    /// Check when the filesystem asks for it (`e2fsck -p`).
    Auto,
    /// Check fully even when it looks clean (`e2fsck -p -f`).
    Force,
    /// Do not check (policy `never`): the outcome is `Clean`, marked skipped.
    Skip,
}

impl FsckMode {
    /// The mode for the core's `Effect::Fsck { force }`.
    pub fn for_effect(force: bool) -> Self {
        if force {
            FsckMode::Force
        } else {
            FsckMode::Auto
        }
    }

    /// The mode for a volume's configured policy.
    pub fn from_policy(p: FsckPolicy) -> Self {
        match p {
            FsckPolicy::Auto => FsckMode::Auto,
            FsckPolicy::Force => FsckMode::Force,
            FsckPolicy::Never => FsckMode::Skip,
        }
    }
}

/// XFS-specific choices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XfsOptions {
    /// Run `xfs_repair` (modifying, never `-L`) when `-n` finds damage. Off by
    /// default: damage refuses the mount and an operator decides. (No config
    /// key sets this yet.)
    pub repair: bool,
    /// Replay a dirty log by mounting on a scratch directory and unmounting,
    /// then check again. When off, a dirty log cannot be checked: the outcome
    /// is `Warned` and the real mount replays it.
    pub replay_log: bool,
    /// Where scratch mount points for log replay are made (the node's `run_dir`).
    pub scratch_dir: PathBuf,
}

impl Default for XfsOptions {
    fn default() -> Self {
        XfsOptions {
            repair: false,
            replay_log: true,
            scratch_dir: PathBuf::from(crate::config::DEFAULT_RUN_DIR),
        }
    }
}

/// One check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsckRequest {
    /// The block device (attached under the current generation).
    pub device: PathBuf,
    /// Its filesystem.
    pub filesystem: Filesystem,
    /// Auto, force or skip.
    pub mode: FsckMode,
    /// Bound on the whole check (all runs together).
    pub timeout: Duration,
    /// XFS choices.
    pub xfs: XfsOptions,
}

/// Default bound on a check: generous, since a full check of a large
/// filesystem takes minutes and nothing is exposed while it runs.
pub const DEFAULT_FSCK_TIMEOUT: Duration = Duration::from_secs(600);

impl FsckRequest {
    /// The check the core asked for (`Effect::Fsck { force }`) on a configured
    /// volume's device; log-replay scratch mounts go under the node's `run_dir`.
    /// `None` for a volume without a filesystem (`dir`).
    pub fn for_volume(
        volume: &crate::config::VolumeConfig,
        node: &crate::config::NodeConfig,
        device: impl Into<PathBuf>,
        force: bool,
    ) -> Option<Self> {
        let mut r = FsckRequest::new(device, volume.filesystem?, FsckMode::for_effect(force));
        r.xfs.scratch_dir = node.run_dir.clone();
        Some(r)
    }

    /// A request with the default timeout and XFS options.
    pub fn new(device: impl Into<PathBuf>, filesystem: Filesystem, mode: FsckMode) -> Self {
        FsckRequest {
            device: device.into(),
            filesystem,
            mode,
            timeout: DEFAULT_FSCK_TIMEOUT,
            xfs: XfsOptions::default(),
        }
    }
}

/// What a check did and decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsckReport {
    /// The device checked.
    pub device: PathBuf,
    /// The decision for the core.
    pub outcome: FsckOutcome,
    /// Each checker run, with its exit status and output.
    pub runs: Vec<CommandRun>,
    /// What happened between runs (log replay, repair), in order.
    pub notes: Vec<String>,
    /// The check was skipped (mode `Skip`).
    pub skipped: bool,
    /// Wall time of the whole check.
    pub elapsed: Duration,
}

impl FsckReport {
    /// One line for logs: the decision and each run's status.
    pub fn summary(&self) -> String {
        let runs: Vec<String> = self
            .runs
            .iter()
            .map(|r| format!("`{}`: {}", r.command, r.describe()))
            .collect();
        let decision = match &self.outcome {
            FsckOutcome::Clean if self.skipped => "skipped (policy never)".to_string(),
            FsckOutcome::Clean => "clean".to_string(),
            FsckOutcome::Warned(w) => format!("proceed with warning: {w}"),
            FsckOutcome::Refused(r) => format!("refused: {r}"),
        };
        let mut s = format!("fsck of {}: {decision}", self.device.display());
        if !runs.is_empty() {
            s.push_str(&format!(" ({})", runs.join("; ")));
        }
        for n in &self.notes {
            s.push_str(&format!("; {n}"));
        }
        s
    }
}

/// The check could not be carried out at all (the core treats this as a refusal).
#[derive(Debug, thiserror::Error)]
pub enum FsckError {
    /// The checker could not be started.
    #[error("cannot run {program}: {source}", program = program.display())]
    Spawn {
        /// The checker.
        program: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A failure injected by a fake.
    #[error("injected failure: {0}")]
    Injected(String),
}

/// Checks a filesystem before it is mounted.
pub trait Fsck: Send + Sync {
    /// Runs the check the request asks for and maps the result to an outcome.
    fn check<'a>(
        &'a self,
        request: &'a FsckRequest,
    ) -> BoxFuture<'a, Result<FsckReport, FsckError>>;
}

/// The real checker: runs `e2fsck` and `xfs_repair`.
#[derive(Clone, Debug)]
pub struct FsckRunner {
    /// The `e2fsck` program.
    pub e2fsck: PathBuf,
    /// The `xfs_repair` program.
    pub xfs_repair: PathBuf,
}

impl Default for FsckRunner {
    fn default() -> Self {
        FsckRunner {
            e2fsck: find_program("e2fsck"),
            xfs_repair: find_program("xfs_repair"),
        }
    }
}

/// `name` in `$PATH`, `/usr/sbin` or `/sbin` (a daemon's PATH may lack the
/// sbin directories), else the bare name.
pub fn find_program(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    PathBuf::from(name)
}

impl FsckRunner {
    /// Finds the checkers in `$PATH` and the sbin directories.
    pub fn new() -> Self {
        FsckRunner::default()
    }

    /// Uses these programs (tests substitute slow or failing ones).
    pub fn with_programs(e2fsck: impl Into<PathBuf>, xfs_repair: impl Into<PathBuf>) -> Self {
        FsckRunner {
            e2fsck: e2fsck.into(),
            xfs_repair: xfs_repair.into(),
        }
    }

    async fn run(
        &self,
        program: &Path,
        args: Vec<OsString>,
        deadline: Instant,
        report: &mut FsckReport,
    ) -> Result<CommandRun, FsckError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let run = run_captured(program, &args, left)
            .await
            .map_err(|source| FsckError::Spawn {
                program: program.to_path_buf(),
                source,
            })?;
        tracing::info!(
            device = %report.device.display(),
            command = %run.command,
            status = %run.describe(),
            elapsed_ms = run.elapsed.as_millis() as u64,
            output = %run.output,
            "fsck run"
        );
        report.runs.push(run.clone());
        Ok(run)
    }

    async fn check_ext(
        &self,
        request: &FsckRequest,
        deadline: Instant,
        report: &mut FsckReport,
    ) -> Result<FsckOutcome, FsckError> {
        let mut args: Vec<OsString> = vec!["-p".into()];
        if request.mode == FsckMode::Force {
            args.push("-f".into());
        }
        args.push(request.device.clone().into());
        let run = self.run(&self.e2fsck, args, deadline, report).await?;
        Ok(e2fsck_outcome(&run))
    }

    async fn check_xfs(
        &self,
        request: &FsckRequest,
        deadline: Instant,
        report: &mut FsckReport,
    ) -> Result<FsckOutcome, FsckError> {
        let dev: OsString = request.device.clone().into();
        let mut run = self
            .run(
                &self.xfs_repair,
                vec!["-n".into(), dev.clone()],
                deadline,
                report,
            )
            .await?;
        if let Some(refused) = not_completed("xfs_repair -n", &run) {
            return Ok(refused);
        }
        if run.code == Some(1) && xfs_log_dirty(&run.output) {
            if !request.xfs.replay_log {
                return Ok(FsckOutcome::Warned(
                    "the XFS log holds changes not yet replayed, so the check was inconclusive; \
                     the mount will replay the log (log replay before checking is off)"
                        .to_string(),
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match replay_xfs_log(&request.device, &request.xfs.scratch_dir, left).await {
                Ok(note) => report.notes.push(note),
                Err(why) => {
                    return Ok(FsckOutcome::Refused(format!(
                    "the XFS log needs replaying before the check, and replaying it failed: {why}"
                )))
                }
            }
            run = self
                .run(
                    &self.xfs_repair,
                    vec!["-n".into(), dev.clone()],
                    deadline,
                    report,
                )
                .await?;
            if let Some(refused) = not_completed("xfs_repair -n", &run) {
                return Ok(refused);
            }
        }
        match run.code {
            Some(0) => Ok(FsckOutcome::Clean),
            Some(1) if request.xfs.repair => {
                let repair = self
                    .run(&self.xfs_repair, vec![dev], deadline, report)
                    .await?;
                if let Some(refused) = not_completed("xfs_repair", &repair) {
                    return Ok(refused);
                }
                if repair.code == Some(0) {
                    report
                        .notes
                        .push("xfs_repair repaired the filesystem".to_string());
                    Ok(FsckOutcome::Warned(format!(
                        "xfs_repair -n found damage ({}) and xfs_repair repaired it; check the data",
                        run.last_lines(2)
                    )))
                } else {
                    Ok(FsckOutcome::Refused(format!(
                        "xfs_repair -n found damage and xfs_repair could not repair it ({}): {}",
                        repair.describe(),
                        repair.last_lines(3)
                    )))
                }
            }
            Some(1) => Ok(FsckOutcome::Refused(format!(
                "xfs_repair -n found damage (exit code 1): {}; not mounting (repair is off: \
                 run xfs_repair by hand)",
                run.last_lines(3)
            ))),
            _ => Ok(FsckOutcome::Refused(format!(
                "xfs_repair -n failed ({}): {}",
                run.describe(),
                run.last_lines(3)
            ))),
        }
    }
}

impl Fsck for FsckRunner {
    fn check<'a>(
        &'a self,
        request: &'a FsckRequest,
    ) -> BoxFuture<'a, Result<FsckReport, FsckError>> {
        Box::pin(async move {
            let started = Instant::now();
            let deadline = started + request.timeout;
            let mut report = FsckReport {
                device: request.device.clone(),
                outcome: FsckOutcome::Clean,
                runs: Vec::new(),
                notes: Vec::new(),
                skipped: false,
                elapsed: Duration::ZERO,
            };
            let outcome = match (request.mode, request.filesystem) {
                (FsckMode::Skip, _) => {
                    report.skipped = true;
                    FsckOutcome::Clean
                }
                (_, Filesystem::Ext2 | Filesystem::Ext3 | Filesystem::Ext4) => {
                    self.check_ext(request, deadline, &mut report).await?
                }
                (_, Filesystem::Xfs) => self.check_xfs(request, deadline, &mut report).await?,
            };
            report.outcome = outcome;
            report.elapsed = started.elapsed();
            match &report.outcome {
                FsckOutcome::Clean => tracing::info!("{}", report.summary()),
                FsckOutcome::Warned(_) => tracing::warn!("{}", report.summary()),
                FsckOutcome::Refused(_) => tracing::error!("{}", report.summary()),
            }
            Ok(report)
        })
    }
}

/// A refusal when a run did not complete (timeout, signal).
fn not_completed(what: &str, run: &CommandRun) -> Option<FsckOutcome> {
    if run.timed_out {
        return Some(FsckOutcome::Refused(format!(
            "{what} {}; the filesystem was not checked",
            run.describe()
        )));
    }
    if run.code.is_none() {
        return Some(FsckOutcome::Refused(format!(
            "{what} was {}; the filesystem was not checked",
            run.describe()
        )));
    }
    None
}

/// The meaning of an e2fsck exit code, bit by bit.
pub fn describe_e2fsck_code(code: i32) -> String {
    if code == 0 {
        return "no errors".to_string();
    }
    let bits = [
        (1, "errors corrected"),
        (2, "errors corrected, reboot advised"),
        (4, "errors left uncorrected"),
        (8, "operational error"),
        (16, "usage or syntax error"),
        (32, "cancelled by request"),
        (128, "shared-library error"),
    ];
    let parts: Vec<&str> = bits
        .iter()
        .filter(|(b, _)| code & b != 0)
        .map(|(_, d)| *d)
        .collect();
    if parts.is_empty() {
        format!("unknown exit code {code}")
    } else {
        parts.join(", ")
    }
}

/// Maps an e2fsck run to an outcome: 0/1 proceed, 2/3 proceed with a warning, ≥4 refuse.
pub fn e2fsck_outcome(run: &CommandRun) -> FsckOutcome {
    if let Some(refused) = not_completed("e2fsck", run) {
        return refused;
    }
    let code = run.code.unwrap_or(-1);
    if code < 0 || code & !3 != 0 {
        FsckOutcome::Refused(format!(
            "e2fsck exit code {code} ({}): {}; not mounting",
            describe_e2fsck_code(code),
            run.last_lines(3)
        ))
    } else if code & 2 != 0 {
        FsckOutcome::Warned(format!(
            "e2fsck exit code {code} ({})",
            describe_e2fsck_code(code)
        ))
    } else {
        FsckOutcome::Clean
    }
}

/// Whether `xfs_repair -n` said its findings may be spurious because the log was not replayed.
pub fn xfs_log_dirty(output: &str) -> bool {
    output.contains("valuable metadata changes in a log")
}

/// Replays an XFS log: mount on a fresh scratch directory, unmount, remove it.
async fn replay_xfs_log(device: &Path, scratch: &Path, left: Duration) -> Result<String, String> {
    let device = device.to_path_buf();
    let scratch = scratch.to_path_buf();
    let started = Instant::now();
    let job = tokio::task::spawn_blocking(move || -> Result<String, String> {
        use nix::mount::{mount, umount2, MntFlags, MsFlags};
        std::fs::create_dir_all(&scratch)
            .map_err(|e| format!("cannot create {}: {e}", scratch.display()))?;
        let name = device
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "dev".to_string());
        let dir = scratch.join(format!("xfs-replay-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let flags =
            MsFlags::MS_NOATIME | MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
        let mounted = mount(Some(&device), &dir, Some("xfs"), flags, None::<&str>);
        let result = match mounted {
            Ok(()) => {
                let mut last = Ok(());
                for _ in 0..10 {
                    last = umount2(&dir, MntFlags::empty());
                    if last.is_ok() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                last.map_err(|e| {
                    format!(
                        "mounted {} on {} to replay the log, but cannot unmount it: {e}",
                        device.display(),
                        dir.display()
                    )
                })
            }
            Err(e) => Err(format!(
                "mount of {} on {} failed: {e}",
                device.display(),
                dir.display()
            )),
        };
        let _ = std::fs::remove_dir(&dir);
        result.map(|()| {
            format!(
                "the XFS log was dirty: replayed it by mounting {} on {} and unmounting",
                device.display(),
                dir.display()
            )
        })
    });
    match tokio::time::timeout(left, job).await {
        Ok(Ok(r)) => r.map(|s| format!("{s} ({:?})", started.elapsed())),
        Ok(Err(e)) => Err(format!("log replay failed: {e}")),
        Err(_) => Err(format!(
            "log replay did not finish within the check's timeout ({left:?})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(code: Option<i32>, signal: Option<i32>, timed_out: bool, out: &str) -> CommandRun {
        CommandRun {
            command: "e2fsck -p /dev/loop0".to_string(),
            code,
            signal,
            output: out.to_string(),
            timed_out,
            elapsed: Duration::from_millis(5),
        }
    }

    #[test]
    fn e2fsck_codes_map_to_outcomes() {
        assert_eq!(
            e2fsck_outcome(&run(Some(0), None, false, "")),
            FsckOutcome::Clean
        );
        assert_eq!(
            e2fsck_outcome(&run(Some(1), None, false, "")),
            FsckOutcome::Clean
        );
        assert!(matches!(
            e2fsck_outcome(&run(Some(2), None, false, "")),
            FsckOutcome::Warned(w) if w.contains("reboot")
        ));
        assert!(matches!(
            e2fsck_outcome(&run(Some(3), None, false, "")),
            FsckOutcome::Warned(_)
        ));
        for code in [4, 5, 8, 12, 16, 32, 128] {
            assert!(
                matches!(e2fsck_outcome(&run(Some(code), None, false, "x\nUNEXPECTED\n")), FsckOutcome::Refused(r) if r.contains("UNEXPECTED")),
                "code {code}"
            );
        }
        assert!(matches!(
            e2fsck_outcome(&run(None, Some(9), false, "")),
            FsckOutcome::Refused(r) if r.contains("signal 9")
        ));
        assert!(matches!(
            e2fsck_outcome(&run(None, None, true, "")),
            FsckOutcome::Refused(r) if r.contains("timed out")
        ));
    }

    #[test]
    fn e2fsck_bits_are_described() {
        assert_eq!(describe_e2fsck_code(0), "no errors");
        assert_eq!(
            describe_e2fsck_code(12),
            "errors left uncorrected, operational error"
        );
    }

    #[test]
    fn xfs_dirty_log_alert_is_recognised() {
        let out = "Phase 2 - using internal log\n        - zero log...\n\
                   ALERT: The filesystem has valuable metadata changes in a log which is being\n\
                   ignored because the -n option was used.";
        assert!(xfs_log_dirty(out));
        assert!(!xfs_log_dirty("Phase 7 - verify link counts..."));
    }

    #[test]
    fn modes_follow_policy_and_effect() {
        assert_eq!(FsckMode::for_effect(true), FsckMode::Force);
        assert_eq!(FsckMode::for_effect(false), FsckMode::Auto);
        assert_eq!(FsckMode::from_policy(FsckPolicy::Never), FsckMode::Skip);
    }
}
