//! The task executor with real processes: environment, output lines, whole-group signals, TERM-ignoring tasks, the parent-death signal, the user switch; systemd units through a stand-in `systemctl`.

mod exec_support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use exec_support::*;
use nbd_failover::config::TaskRun;
use nbd_failover::core::{Event, ExitStatus, Generation, TaskSignal};
use nbd_failover::exec::task::{tracing_sink, PidFile};
use nbd_failover::exec::{
    events, ExecTask, OutputLine, OutputSink, Stream, SystemdTask, TaskError, TaskInfo,
    TaskLeftover, TaskRunner, TaskSpec,
};

fn spec(dir: &Path, vol: &str, script: &str) -> TaskSpec {
    TaskSpec {
        volume: vol.to_string(),
        mount_point: PathBuf::from("/srv/volumes").join(vol),
        run: TaskRun::Exec(vec![
            "/bin/sh".to_string(),
            "-c".to_string(),
            script.to_string(),
        ]),
        user: None,
        env: BTreeMap::new(),
        run_dir: dir.join("run"),
    }
}

type Lines = Arc<Mutex<Vec<(Stream, String)>>>;

fn collecting_sink() -> (OutputSink, Lines) {
    let lines: Lines = Arc::new(Mutex::new(Vec::new()));
    let l = lines.clone();
    let sink: OutputSink = Arc::new(move |o: &OutputLine<'_>| {
        l.lock().unwrap().push((o.stream, o.line.to_string()));
    });
    (sink, lines)
}

/// Waits until a stdout line starts with `prefix`; returns the rest.
async fn line_with(lines: &Lines, prefix: &str) -> String {
    for _ in 0..300 {
        if let Some(l) = lines
            .lock()
            .unwrap()
            .iter()
            .find_map(|(_, l)| l.strip_prefix(prefix).map(str::to_string))
        {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "no output line starting with {prefix:?}: {:?}",
        lines.lock().unwrap()
    );
}

fn group_of(pid: i32) -> i32 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    s.rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn exec_task_gets_its_environment_and_output_lines_and_exit_code() {
    let dir = temp_dir("task-env");
    let vol = volume("env");
    let mut s = spec(
        dir.path(),
        &vol,
        "echo \"vars $NBD_FAILOVER_VOLUME $NBD_FAILOVER_MOUNT $NBD_FAILOVER_GENERATION $EXTRA\"; \
         echo \"leak ${CARGO_MANIFEST_DIR:-none}\"; echo \"cwd $(pwd)\"; echo oops >&2; exit 3",
    );
    s.env.insert("EXTRA".to_string(), "from-config".to_string());
    let (sink, lines) = collecting_sink();
    let task = ExecTask::new(s.clone(), sink);
    let started = task.start(Generation(77)).await.expect("start");
    assert_eq!(
        events::task_started(&Ok::<_, TaskError>(())),
        Event::TaskStarted(Ok(()))
    );
    let TaskInfo::Group {
        pgid, generation, ..
    } = started.info.clone()
    else {
        panic!("{:?}", started.info)
    };
    assert_eq!(generation, Some(Generation(77)));
    assert!(!started.adopted);
    let status = tokio::time::timeout(Duration::from_secs(5), started.exit)
        .await
        .unwrap();
    assert_eq!(status, ExitStatus::Code(3));
    assert_eq!(
        events::task_exited(status),
        Event::TaskExited(ExitStatus::Code(3))
    );
    // Output is forwarded by separate readers: give them a moment after the exit.
    let vars = line_with(&lines, "vars ").await;
    assert_eq!(vars, format!("{vol} /srv/volumes/{vol} 77 from-config"));
    assert_eq!(
        line_with(&lines, "leak ").await,
        "none",
        "the daemon's environment leaked"
    );
    assert_eq!(line_with(&lines, "cwd ").await, "/");
    assert!(lines
        .lock()
        .unwrap()
        .contains(&(Stream::Stderr, "oops".to_string())));
    assert!(pgid > 1);
    assert!(!s.pid_file().exists(), "pid file not removed after exit");
}

#[tokio::test]
async fn the_whole_process_group_is_signalled_including_grandchildren() {
    let dir = temp_dir("task-group");
    let vol = volume("group");
    let (sink, lines) = collecting_sink();
    let task = ExecTask::new(
        spec(
            dir.path(),
            &vol,
            "sleep 600 & echo child $!; sh -c 'sleep 600 & echo grandchild $!; wait' & wait",
        ),
        sink,
    );
    let s = task.spec().pid_file();
    let started = task.start(Generation(5)).await.unwrap();
    let TaskInfo::Group {
        pgid, start_time, ..
    } = started.info.clone()
    else {
        panic!()
    };
    let mut guard = KillGuard(vec![pgid]);
    let child: i32 = line_with(&lines, "child ").await.parse().unwrap();
    let grandchild: i32 = line_with(&lines, "grandchild ").await.parse().unwrap();
    guard.0.extend([child, grandchild]);
    assert_eq!(group_of(child), pgid);
    assert_eq!(group_of(grandchild), pgid);
    assert_eq!(group_of(pgid), pgid, "the task leads its own process group");
    assert_ne!(group_of(pgid), group_of(std::process::id() as i32));
    // The pid file names the leader with its start time.
    let pf = PidFile::parse(&std::fs::read_to_string(&s).unwrap()).unwrap();
    assert_eq!(
        (pf.pid, pf.start_time, pf.generation),
        (pgid, start_time, Some(Generation(5)))
    );

    task.signal(TaskSignal::Term).await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), started.exit)
        .await
        .unwrap();
    assert_eq!(status, ExitStatus::Signal(15));
    for p in [child, grandchild] {
        assert!(
            wait_gone(p, Duration::from_secs(2)),
            "{p} survived the group's SIGTERM"
        );
    }
    // Nothing left to signal is not an error.
    assert_eq!(
        events::task_signalled(&task.signal(TaskSignal::Kill).await),
        Event::TaskSignalled(Ok(()))
    );
}

#[tokio::test]
async fn a_task_ignoring_sigterm_needs_sigkill() {
    let dir = temp_dir("task-term");
    let vol = volume("term");
    let (sink, lines) = collecting_sink();
    let task = ExecTask::new(
        spec(
            dir.path(),
            &vol,
            "trap '' TERM; echo ready; while :; do sleep 0.05; done",
        ),
        sink,
    );
    let started = task.start(Generation(1)).await.unwrap();
    let TaskInfo::Group { pgid, .. } = started.info.clone() else {
        panic!()
    };
    let _guard = KillGuard(vec![pgid]);
    line_with(&lines, "ready").await;
    task.signal(TaskSignal::Term).await.unwrap();
    let mut exit = started.exit;
    assert!(
        tokio::time::timeout(Duration::from_millis(400), &mut exit)
            .await
            .is_err(),
        "the task should have ignored SIGTERM"
    );
    task.signal(TaskSignal::Kill).await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), exit)
        .await
        .unwrap();
    assert_eq!(status, ExitStatus::Signal(9));
}

#[tokio::test]
async fn stragglers_are_killed_when_the_leader_exits() {
    let dir = temp_dir("task-straggler");
    let vol = volume("strag");
    let (sink, lines) = collecting_sink();
    let task = ExecTask::new(
        spec(dir.path(), &vol, "sleep 600 & echo child $!; exit 0"),
        sink,
    );
    let started = task.start(Generation(1)).await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), started.exit)
        .await
        .unwrap();
    assert_eq!(status, ExitStatus::Code(0));
    let child: i32 = line_with(&lines, "child ").await.parse().unwrap();
    let _guard = KillGuard(vec![child]);
    assert!(
        wait_gone(child, Duration::from_millis(500)),
        "straggler {child} still alive"
    );
    // A new start is allowed now.
    let again = task.start(Generation(2)).await.unwrap();
    assert_eq!(again.exit.await, ExitStatus::Code(0));
}

#[tokio::test]
async fn a_second_start_while_running_is_refused_and_bad_commands_fail_to_start() {
    let dir = temp_dir("task-twice");
    let vol = volume("twice");
    let task = ExecTask::new(spec(dir.path(), &vol, "exec sleep 600"), tracing_sink());
    let started = task.start(Generation(1)).await.unwrap();
    let TaskInfo::Group { pgid, .. } = started.info.clone() else {
        panic!()
    };
    let _guard = KillGuard(vec![pgid]);
    let err = task.start(Generation(1)).await.unwrap_err();
    assert!(matches!(err, TaskError::AlreadyRunning { .. }), "{err}");
    task.signal(TaskSignal::Kill).await.unwrap();
    started.exit.await;

    let mut bad = spec(dir.path(), &volume("bad"), "");
    bad.run = TaskRun::Exec(vec!["/nonexistent/program".to_string()]);
    let r = ExecTask::new(bad, tracing_sink())
        .start(Generation(1))
        .await;
    match events::task_started(&r) {
        Event::TaskStarted(Err(msg)) => assert!(msg.contains("/nonexistent/program"), "{msg}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn the_task_runs_as_the_configured_user() {
    require_root();
    let dir = temp_dir("task-user");
    let vol = volume("user");
    let mut s = spec(
        dir.path(),
        &vol,
        "echo \"ids $(id -u) $(id -g) $USER $HOME\"",
    );
    s.user = Some("nobody".to_string());
    let (sink, lines) = collecting_sink();
    let task = ExecTask::new(s.clone(), sink);
    let started = task.start(Generation(1)).await.unwrap();
    assert_eq!(started.exit.await, ExitStatus::Code(0));
    let ids = line_with(&lines, "ids ").await;
    let mut it = ids.split_whitespace();
    assert_eq!(it.next(), Some("65534"), "{ids}");
    assert_eq!(it.next(), Some("65534"), "{ids}");
    assert_eq!(it.next(), Some("nobody"), "{ids}");

    s.user = Some("no-such-user-nbd-failover".to_string());
    let err = ExecTask::new(s, tracing_sink())
        .start(Generation(1))
        .await
        .unwrap_err();
    assert!(matches!(err, TaskError::User { .. }), "{err}");
}

const PDEATH_ENV: &str = "NBD_FAILOVER_TEST_PDEATH_DIR";

/// The "daemon" of `the_task_dies_with_the_daemon`: starts a task, prints its
/// pid, waits to be killed. Does nothing (passes) when run as an ordinary test.
#[test]
fn pdeathsig_helper() {
    let Some(dir) = helper_env(PDEATH_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let task = ExecTask::new(
            spec(Path::new(&dir), "pdeath", "exec sleep 600"),
            tracing_sink(),
        );
        let started = task.start(Generation(9)).await.unwrap();
        let TaskInfo::Group { pgid, .. } = started.info else {
            panic!()
        };
        // Let the blocking pool's threads come and go: the task must survive that.
        for _ in 0..4 {
            tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(5)))
                .await
                .unwrap();
        }
        println!("TASKPID {pgid}");
        tokio::time::sleep(Duration::from_secs(600)).await;
    });
}

#[test]
fn the_task_dies_with_the_daemon() {
    let dir = temp_dir("task-pdeath");
    let mut helper = reexec(
        "pdeathsig_helper",
        &[(PDEATH_ENV, dir.path().display().to_string())],
    );
    let mut guard = KillGuard(vec![helper.id() as i32]);
    let pid: i32 = read_marker(&mut helper, "TASKPID ", Duration::from_secs(30))
        .parse()
        .unwrap();
    guard.0.push(pid);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !gone(pid),
        "the task should be running before the daemon dies"
    );
    helper.kill().unwrap(); // SIGKILL: no cleanup code runs in the "daemon"
    helper.wait().unwrap();
    assert!(
        wait_gone(pid, Duration::from_secs(2)),
        "task {pid} outlived its daemon (parent-death signal not delivered)"
    );
}

/// A stand-in for `systemctl` keeping one unit's state in files next to it.
const FAKE_SYSTEMCTL: &str = r#"#!/bin/sh
# State: one file "unit" holding "ACTIVE_STATE EXEC_MAIN_CODE EXEC_MAIN_STATUS",
# replaced atomically (the runner polls `show` concurrently).
d=$(dirname "$0")
echo "$*" >> "$d/calls"
put() { echo "$1 $2 $3" > "$d/unit.tmp"; mv "$d/unit.tmp" "$d/unit"; }
case "$1" in
  start)
    [ "$2" = "broken.service" ] && { echo "Job for broken.service failed." >&2; exit 1; }
    put active 0 0 ;;
  stop) put inactive 2 15 ;;
  kill) put inactive 2 9 ;;
  show)
    set -- $(cat "$d/unit" 2>/dev/null || echo "inactive 0 0")
    printf 'ActiveState=%s\nSubState=x\nResult=success\nExecMainCode=%s\nExecMainStatus=%s\nMainPID=0\n' "$1" "$2" "$3" ;;
  *) exit 2 ;;
esac
"#;

fn systemd_runner(dir: &Path, unit: &str) -> SystemdTask {
    let ctl = dir.join("systemctl");
    std::fs::write(&ctl, FAKE_SYSTEMCTL).unwrap();
    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut s = spec(dir, "unitvol", "");
    s.run = TaskRun::SystemdUnit(unit.to_string());
    s.env
        .insert("PGDATA".to_string(), "/srv/pg \"main\"".to_string());
    let mut r = SystemdTask::with_systemctl(s, ctl).unwrap();
    r.poll = Duration::from_millis(50);
    r
}

/// What can be tested without systemd as PID 1: the commands we send, the
/// environment file, and how `systemctl show` output becomes an exit status.
#[tokio::test]
async fn systemd_units_are_driven_through_systemctl() {
    let dir = temp_dir("task-systemd");
    let r = systemd_runner(dir.path(), "pg.service");
    assert_eq!(r.find_leftover().unwrap(), None);
    let started = r.start(Generation(11)).await.unwrap();
    assert_eq!(
        started.info,
        TaskInfo::Unit {
            unit: "pg.service".to_string()
        }
    );
    let env = std::fs::read_to_string(dir.path().join("run/unitvol.env")).unwrap();
    assert!(env.contains("NBD_FAILOVER_GENERATION=\"11\""), "{env}");
    assert!(env.contains("NBD_FAILOVER_VOLUME=\"unitvol\""), "{env}");
    assert!(env.contains("PGDATA=\"/srv/pg \\\"main\\\"\""), "{env}");
    assert_eq!(
        r.find_leftover().unwrap(),
        Some(TaskLeftover::Unit {
            unit: "pg.service".to_string(),
            state: "active".to_string()
        })
    );
    let mut exit = started.exit;
    assert!(tokio::time::timeout(Duration::from_millis(150), &mut exit)
        .await
        .is_err());
    r.signal(TaskSignal::Term).await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(3), exit)
        .await
        .unwrap();
    assert_eq!(status, ExitStatus::Signal(15));

    let again = r.start(Generation(12)).await.unwrap();
    r.signal(TaskSignal::Kill).await.unwrap();
    assert_eq!(again.exit.await, ExitStatus::Signal(9));
    let calls = std::fs::read_to_string(dir.path().join("calls")).unwrap();
    assert!(calls.contains("start pg.service"), "{calls}");
    assert!(calls.contains("stop --no-block pg.service"), "{calls}");
    assert!(
        calls.contains("kill --kill-whom=all --signal=SIGKILL pg.service"),
        "{calls}"
    );

    let broken = systemd_runner(dir.path(), "broken.service");
    match events::task_started(&broken.start(Generation(13)).await) {
        Event::TaskStarted(Err(msg)) => {
            assert!(msg.contains("Job for broken.service failed"), "{msg}")
        }
        other => panic!("{other:?}"),
    }
}
