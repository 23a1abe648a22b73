//! Spawning supervised children: own session, parent-death signal, user switch, from one long-lived thread.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits,
//! not the process. Tokio's blocking-pool threads come and go, so a child
//! forked from one of them would be killed when that thread idles out. Every
//! supervised child is therefore forked from a dedicated spawner thread that
//! lives as long as the process: the signal fires exactly when the daemon dies.
//!
//! The child, between fork and exec: starts a new session (so its pid is its
//! process-group id and `killpg` reaches everything it forks), drops to the
//! configured user (supplementary groups, gid, uid — in that order), then sets
//! the parent-death signal (a credential change clears it, so it comes last)
//! and exits if the parent already died in between.

use std::io;
use std::sync::mpsc;
use std::sync::OnceLock;

use nix::sys::signal::Signal;
use nix::unistd::{Gid, Pid, Uid};

type Job = Box<dyn FnOnce() + Send>;

/// Credentials an `exec` task drops to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    /// The user's name (for the environment).
    pub user: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (including the primary group).
    pub groups: Vec<u32>,
    /// Home directory.
    pub home: std::path::PathBuf,
}

impl Credentials {
    /// Looks `user` up in the user database (NSS; blocking).
    pub fn lookup(user: &str) -> io::Result<Credentials> {
        let u = nix::unistd::User::from_name(user)
            .map_err(io::Error::from)?
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("no such user {user:?}"))
            })?;
        let cname = std::ffi::CString::new(user)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in user name"))?;
        let groups = nix::unistd::getgrouplist(&cname, u.gid)
            .map_err(io::Error::from)?
            .into_iter()
            .map(Gid::as_raw)
            .collect();
        Ok(Credentials {
            user: user.to_string(),
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
            groups,
            home: u.dir,
        })
    }
}

/// How a supervised child is set up between fork and exec.
#[derive(Clone, Debug, Default)]
pub struct ChildSetup {
    /// Drop to these credentials.
    pub credentials: Option<Credentials>,
}

/// Installs the fork-to-exec setup on `cmd`: new session, credentials, `PR_SET_PDEATHSIG=SIGKILL`.
pub fn prepare(cmd: &mut tokio::process::Command, setup: ChildSetup) {
    let parent = nix::unistd::getpid();
    let creds = setup.credentials.map(|c| {
        let groups: Vec<Gid> = c.groups.iter().map(|g| Gid::from_raw(*g)).collect();
        (groups, Gid::from_raw(c.gid), Uid::from_raw(c.uid))
    });
    let hook = move || -> io::Result<()> {
        nix::unistd::setsid()?;
        if let Some((groups, gid, uid)) = &creds {
            nix::unistd::setgroups(groups)?;
            nix::unistd::setgid(*gid)?;
            nix::unistd::setuid(*uid)?;
        }
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
        if nix::unistd::getppid() != parent {
            // The parent died before the death signal was armed.
            return Err(io::Error::from_raw_os_error(nix::libc::ESRCH));
        }
        Ok(())
    };
    // SAFETY: the hook runs in the forked child before exec, where only
    // async-signal-safe operations are allowed. It only makes raw syscalls
    // (setsid, setgroups, setgid, setuid, prctl, getppid) through nix, which
    // wraps them without allocating; the group list was allocated before the
    // fork and is only read. Errors are returned as `io::Error` built from a
    // raw errno, which does not allocate either.
    unsafe {
        cmd.pre_exec(hook);
    }
}

fn spawner() -> Option<&'static mpsc::Sender<Job>> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<Job>>> = OnceLock::new();
    SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name("nbd-failover-spawner".to_string())
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                })
                .ok()
                .map(|_| tx)
        })
        .as_ref()
}

/// Spawns `cmd` from the process-lifetime spawner thread (see the module doc),
/// registered with the current tokio runtime. Must be called inside a runtime.
pub async fn spawn(mut cmd: tokio::process::Command) -> io::Result<tokio::process::Child> {
    let handle = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _guard = handle.enter();
        let _ = tx.send(cmd.spawn());
    });
    spawner()
        .ok_or_else(|| io::Error::other("cannot start the spawner thread"))?
        .send(job)
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    rx.await
        .map_err(|_| io::Error::other("the spawner thread dropped the job"))?
}

/// Sends `signal` to process group `pgid`; a group that no longer exists is not an error.
/// Returns whether the group existed.
pub fn signal_group(pgid: i32, signal: Signal) -> io::Result<bool> {
    if pgid <= 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing to signal process group {pgid}"),
        ));
    }
    match nix::sys::signal::killpg(Pid::from_raw(pgid), signal) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::ESRCH) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Sends `signal` to one process; a process that no longer exists is not an error.
pub fn signal_pid(pid: i32, signal: Signal) -> io::Result<bool> {
    if pid <= 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing to signal pid {pid}"),
        ));
    }
    match nix::sys::signal::kill(Pid::from_raw(pid), signal) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::ESRCH) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Longest line passed on whole; longer lines are cut into pieces of this size.
pub const MAX_LINE: usize = 16 * 1024;

/// Reads `reader` line by line (lossy UTF-8, without the newline, long lines
/// cut at [`MAX_LINE`]) and calls `f` for each, until end of file or an error.
pub async fn for_each_line<R, F>(reader: R, mut f: F)
where
    R: tokio::io::AsyncRead + Unpin,
    F: FnMut(&str),
{
    use tokio::io::AsyncBufReadExt;
    let mut r = tokio::io::BufReader::new(reader);
    let mut line: Vec<u8> = Vec::new();
    while let Ok(buf) = r.fill_buf().await {
        if buf.is_empty() {
            break;
        }
        let (take, complete) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        let room = MAX_LINE - line.len();
        let used = take.min(room);
        line.extend_from_slice(&buf[..used]);
        r.consume(used);
        if (complete && used == take) || line.len() >= MAX_LINE {
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            f(&String::from_utf8_lossy(&line));
            line.clear();
        }
    }
    if !line.is_empty() {
        f(&String::from_utf8_lossy(&line));
    }
}

/// A bounded transcript: the first `limit / 2` bytes and the last `limit / 2`
/// bytes of lines, with a note of what was dropped in between.
#[derive(Debug)]
pub struct Transcript {
    limit: usize,
    head: Vec<String>,
    head_bytes: usize,
    tail: std::collections::VecDeque<String>,
    tail_bytes: usize,
    dropped: usize,
}

impl Transcript {
    /// An empty transcript keeping about `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Transcript {
            limit,
            head: Vec::new(),
            head_bytes: 0,
            tail: std::collections::VecDeque::new(),
            tail_bytes: 0,
            dropped: 0,
        }
    }

    /// Adds one line.
    pub fn push(&mut self, line: &str) {
        let n = line.len() + 1;
        if self.head_bytes + n <= self.limit / 2 && self.tail.is_empty() {
            self.head.push(line.to_string());
            self.head_bytes += n;
            return;
        }
        self.tail.push_back(line.to_string());
        self.tail_bytes += n;
        while self.tail_bytes > self.limit / 2 {
            match self.tail.pop_front() {
                Some(l) => {
                    self.tail_bytes -= l.len() + 1;
                    self.dropped += 1;
                }
                None => break,
            }
        }
    }

    /// The kept text, one line per line.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for l in &self.head {
            out.push_str(l);
            out.push('\n');
        }
        if self.dropped > 0 {
            out.push_str(&format!("[… {} line(s) not kept …]\n", self.dropped));
        }
        for l in &self.tail {
            out.push_str(l);
            out.push('\n');
        }
        out
    }
}

/// How a captured command ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandRun {
    /// The command line, for logs.
    pub command: String,
    /// Its exit code, `None` when killed by a signal (or on timeout).
    pub code: Option<i32>,
    /// The signal that ended it, if any.
    pub signal: Option<i32>,
    /// stdout and stderr, interleaved by line, bounded.
    pub output: String,
    /// It ran past its timeout and was killed with its process group.
    pub timed_out: bool,
    /// Wall time.
    pub elapsed: std::time::Duration,
}

impl CommandRun {
    /// `exit code N`, `signal N` or `timed out after …`.
    pub fn describe(&self) -> String {
        if self.timed_out {
            format!("timed out after {:?} and was killed", self.elapsed)
        } else if let Some(c) = self.code {
            format!("exit code {c}")
        } else if let Some(s) = self.signal {
            format!("killed by signal {s}")
        } else {
            "ended without status".to_string()
        }
    }

    /// The last `n` non-empty lines of the output, joined with " / ", for one-line messages.
    pub fn last_lines(&self, n: usize) -> String {
        let lines: Vec<&str> = self
            .output
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let start = lines.len().saturating_sub(n);
        lines[start..].join(" / ")
    }
}

/// Bytes of output kept per captured command.
pub const TRANSCRIPT_LIMIT: usize = 64 * 1024;

/// Runs `program args` supervised (own session, parent-death signal, stdin
/// `/dev/null`), captures its output, and kills its whole process group with
/// SIGKILL when it outlives `timeout`. An error means it could not be started.
pub async fn run_captured(
    program: &std::path::Path,
    args: &[std::ffi::OsString],
    timeout: std::time::Duration,
) -> io::Result<CommandRun> {
    use std::os::unix::process::ExitStatusExt;
    use std::sync::{Arc, Mutex};
    let mut command = program.display().to_string();
    for a in args {
        command.push(' ');
        command.push_str(&a.to_string_lossy());
    }
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    prepare(&mut cmd, ChildSetup::default());
    let started = std::time::Instant::now();
    let mut child = spawn(cmd)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {}: {e}", program.display())))?;
    let pgid = child.id().map(|p| p as i32);
    let transcript = Arc::new(Mutex::new(Transcript::new(TRANSCRIPT_LIMIT)));
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        let t = transcript.clone();
        readers.push(tokio::spawn(for_each_line(out, move |l| {
            if let Ok(mut t) = t.lock() {
                t.push(l);
            }
        })));
    }
    if let Some(err) = child.stderr.take() {
        let t = transcript.clone();
        readers.push(tokio::spawn(for_each_line(err, move |l| {
            if let Ok(mut t) = t.lock() {
                t.push(l);
            }
        })));
    }
    let (status, timed_out) = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => (Some(status?), false),
        Err(_) => {
            if let Some(pgid) = pgid {
                let _ = signal_group(pgid, Signal::SIGKILL);
            }
            let _ = child.start_kill();
            let _ = child.wait().await;
            (None, true)
        }
    };
    // Readers end at EOF; a grandchild that kept the pipe open must not hold us up.
    for mut r in readers {
        if tokio::time::timeout(std::time::Duration::from_millis(500), &mut r)
            .await
            .is_err()
        {
            r.abort();
        }
    }
    let output = transcript.lock().map(|t| t.text()).unwrap_or_default();
    Ok(CommandRun {
        command,
        code: status.and_then(|s| s.code()),
        signal: status.and_then(|s| s.signal()),
        output,
        timed_out,
        elapsed: started.elapsed(),
    })
}

/// Runs a short command synchronously (for blocking contexts such as the
/// start-up scan): output captured, killed after `timeout`. Returns the exit
/// code (`None` if killed) and stdout followed by stderr.
pub fn run_sync(
    program: &std::path::Path,
    args: &[&str],
    timeout: std::time::Duration,
) -> io::Result<(Option<i32>, String)> {
    use std::io::Read;
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut out);
    }
    Ok((status.and_then(|s| s.code()), out))
}
