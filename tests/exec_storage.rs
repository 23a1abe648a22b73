//! Loop devices, mount and unmount, the dir backend and start-up recovery on the real kernel (root): the `image` volume lifecycle, busy unmounts, a simulated daemon crash.

mod exec_support;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use exec_support::*;
use nbd_failover::config::TaskRun;
use nbd_failover::core::{Event, Generation, Leftovers, TaskSignal};
use nbd_failover::exec::loopdev::{loop_label, LO_FLAGS_AUTOCLEAR};
use nbd_failover::exec::task::tracing_sink;
use nbd_failover::exec::{
    events, DirCheck, DirMounter, ExecTask, HostRecovery, KernelLoop, KillHolders, LeftoverScan,
    LoopAttachRequest, LoopDetached, LoopDevices, LoopError, LoopScanner, MountError, MountRequest,
    Mounter, RecoverySpec, SysMounter, TaskLeftover, TaskRunner, TaskSpec, UnmountRequest,
};

fn holder(cwd: &Path, script: &str) -> std::process::Child {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn holder")
}

/// attach with label → mkfs → mount → write → busy unmount (holders TERMed,
/// one needing KILL) → detach → the recovery scan sees nothing.
#[test]
fn image_volume_lifecycle_with_a_busy_unmount() {
    require_root();
    let dir = temp_dir("lifecycle");
    let img = dir.path().join("vol.img");
    sparse_file(&img, 32);
    let vol = volume("life");
    let loops = Arc::new(KernelLoop::new());

    let att = loops
        .attach(&LoopAttachRequest::new(&img, &vol, Generation(7)))
        .expect("attach");
    let _loop_guard = LoopGuard {
        index: att.index,
        volume: vol.clone(),
    };
    assert_eq!(att.label, loop_label(&vol, Generation(7)));
    assert_eq!(att.label, format!("nbd-failover:{vol}:7"));
    let st = loops.status(att.index).unwrap().expect("bound");
    assert_eq!(st.label, att.label);
    assert!(
        st.autoclear,
        "LO_FLAGS_AUTOCLEAR ({LO_FLAGS_AUTOCLEAR}) must be set"
    );
    assert_eq!(
        st.backing_file.as_deref(),
        Some(std::fs::canonicalize(&img).unwrap().as_path())
    );
    assert_eq!(
        loops
            .list()
            .unwrap()
            .iter()
            .filter(|s| s.index == att.index)
            .count(),
        1
    );

    sh(&format!("mkfs.ext4 -q -F {}", att.device.display()));
    let mnt = dir.path().join("mnt/vol");
    let _mount_guard = MountGuard(mnt.clone());
    let m = SysMounter::new();
    let req = MountRequest::new(
        &att.device,
        &mnt,
        "ext4",
        &["noatime", "nodev", "errors=remount-ro"],
    )
    .unwrap();
    let mounted = m.mount(&req).expect("mount");
    assert!(mounted.created_mount_point);
    assert!(!mounted.already_mounted);
    assert_eq!(mounted.entry.fstype, "ext4");
    assert_eq!(mounted.entry.source, att.device.display().to_string());
    assert!(
        mounted.entry.mount_options.contains("noatime"),
        "{}",
        mounted.entry.mount_options
    );
    assert!(
        mounted.entry.mount_options.contains("nodev"),
        "{}",
        mounted.entry.mount_options
    );
    assert!(
        mounted.entry.super_options.contains("errors=remount-ro"),
        "{}",
        mounted.entry.super_options
    );
    // Idempotent.
    assert!(m.mount(&req).unwrap().already_mounted);

    let mp = mounted.mount_point.clone();
    let file = mp.join("data");
    std::fs::write(&file, b"hello").unwrap();
    std::fs::File::open(&file).unwrap().sync_all().unwrap();

    let mut kids = Children::default();
    kids.0.push(holder(&mp, "exec sleep 600")); // cwd
    kids.0.push(holder(
        Path::new("/"),
        &format!("exec 3<{}; exec sleep 600", file.display()),
    )); // open fd
    kids.0.push(holder(&mp, "trap '' TERM; exec sleep 600")); // cwd, ignores SIGTERM
    let pids: Vec<i32> = kids.0.iter().map(|c| c.id() as i32).collect();
    std::thread::sleep(Duration::from_millis(100));

    let mut ureq = UnmountRequest::new(&mp, false);
    ureq.term_grace = Duration::from_millis(300);
    ureq.kill_wait = Duration::from_millis(500);
    let started = std::time::Instant::now();
    let report = m.unmount(&ureq).expect("unmount after stopping holders");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(report.was_mounted && !report.lazy, "{}", report.summary());
    let signalled = report.signalled_pids();
    for p in &pids {
        assert!(
            signalled.contains(p),
            "holder {p} not signalled: {}",
            report.summary()
        );
    }
    let killed: Vec<i32> = report
        .signalled
        .iter()
        .filter(|s| s.signal == "SIGKILL")
        .map(|s| s.pid)
        .collect();
    assert_eq!(killed, vec![pids[2]], "{}", report.summary());
    assert!(report
        .signalled
        .iter()
        .any(|s| s.pid == pids[1] && s.holds.iter().any(|h| h.starts_with("fd"))));
    let statuses: Vec<Option<i32>> = kids
        .0
        .iter_mut()
        .map(|c| c.wait().unwrap().signal())
        .collect();
    assert_eq!(statuses, vec![Some(15), Some(15), Some(9)]);
    assert_eq!(
        events::unmounted(&Ok::<_, MountError>(report)),
        Event::Unmounted(Ok(()))
    );
    // Nothing mounted any more: a second unmount has nothing to do.
    assert!(!m.unmount(&ureq).unwrap().was_mounted);

    assert_eq!(
        loops
            .detach(att.index, &vol, Duration::from_secs(5))
            .unwrap(),
        LoopDetached::Free
    );
    assert!(loops.status(att.index).unwrap().is_none());

    let recovery = HostRecovery::new().with_scanner(Box::new(LoopScanner::new(loops.clone())));
    let spec = RecoverySpec {
        volume: vol.clone(),
        mount_point: mnt.clone(),
        owns_mount: true,
        image: Some(img.clone()),
    };
    let found = recovery.scan(&spec, None).unwrap();
    assert!(found.is_empty(), "{}", found.summary());
    assert_eq!(found.leftovers(), Leftovers::default());
}

/// Without killing holders a busy unmount fails and names the holder; forced,
/// it goes lazy (logged last resort) and the device clears once the holder is gone.
#[test]
fn busy_unmount_fails_unforced_and_goes_lazy_forced() {
    require_root();
    let dir = temp_dir("lazy");
    let img = dir.path().join("vol.img");
    ext4_image(&img, 16);
    let vol = volume("lazy");
    let loops = KernelLoop::new();
    let att = loops
        .attach(&LoopAttachRequest::new(&img, &vol, Generation(3)))
        .unwrap();
    let _loop_guard = LoopGuard {
        index: att.index,
        volume: vol.clone(),
    };
    let mnt = dir.path().join("mnt");
    let _mount_guard = MountGuard(mnt.clone());
    let m = SysMounter::new();
    let mp = m
        .mount(&MountRequest::new(&att.device, &mnt, "ext4", &[] as &[&str]).unwrap())
        .unwrap()
        .mount_point;
    let mut kids = Children::default();
    kids.0.push(holder(&mp, "exec sleep 600"));
    let pid = kids.0[0].id() as i32;
    std::thread::sleep(Duration::from_millis(50));

    let mut ureq = UnmountRequest::new(&mp, false);
    ureq.kill_holders = KillHolders::Never;
    ureq.attempts = 2;
    ureq.retry_interval = Duration::from_millis(20);
    let err = m.unmount(&ureq).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("stayed busy") && msg.contains(&pid.to_string()),
        "{msg}"
    );
    match events::unmounted(&Err::<(), _>(err)) {
        Event::Unmounted(Err(e)) => assert!(e.contains(&pid.to_string())),
        other => panic!("{other:?}"),
    }
    assert!(!gone(pid), "holder must not be signalled");

    ureq.force = true;
    let report = m.unmount(&ureq).unwrap();
    assert!(report.lazy, "{}", report.summary());
    assert!(
        report
            .left_holding
            .iter()
            .any(|h| h.starts_with(&pid.to_string())),
        "{:?}",
        report.left_holding
    );
    // The device stays in use while the holder lives: detach times out and says why.
    match loops.detach(att.index, &vol, Duration::from_millis(200)) {
        Err(LoopError::DetachTimeout { .. }) => {}
        other => panic!("expected a detach timeout, got {other:?}"),
    }
    kids.0[0].kill().unwrap();
    kids.0[0].wait().unwrap();
    // LOOP_CLR_FD above left autoclear armed: the device clears when the filesystem lets go.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while loops.status(att.index).unwrap().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "loop{} never cleared",
            att.index
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn mount_refuses_to_cover_another_mount_and_reports_bad_options() {
    require_root();
    let dir = temp_dir("occupied");
    let img = dir.path().join("vol.img");
    ext4_image(&img, 16);
    let vol = volume("occ");
    let loops = KernelLoop::new();
    let att = loops
        .attach(&LoopAttachRequest::new(&img, &vol, Generation(1)))
        .unwrap();
    let _loop_guard = LoopGuard {
        index: att.index,
        volume: vol.clone(),
    };
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _mount_guard = MountGuard(std::fs::canonicalize(&mnt).unwrap());
    let m = SysMounter::new();

    let bad = MountRequest::new(&att.device, &mnt, "ext4", &["no_such_option_xyz"]).unwrap();
    let err = m.mount(&bad).unwrap_err();
    assert!(
        matches!(err, MountError::Syscall { op: "mount", .. }),
        "{err}"
    );
    assert!(matches!(
        events::mounted(&Err::<(), _>(err)),
        Event::Mounted(Err(_))
    ));

    nix::mount::mount(
        Some("tmpfs"),
        &mnt,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let err = m
        .mount(&MountRequest::new(&att.device, &mnt, "ext4", &[] as &[&str]).unwrap())
        .unwrap_err();
    assert!(matches!(err, MountError::Occupied { .. }), "{err}");
    assert!(err.to_string().contains("tmpfs"), "{err}");
}

#[test]
fn loop_attach_is_race_safe_and_detach_checks_the_label() {
    require_root();
    let dir = temp_dir("race");
    let loops = Arc::new(KernelLoop::new());
    let vol = volume("race");
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let img = dir.path().join(format!("img{i}"));
            sparse_file(&img, 1);
            let loops = loops.clone();
            let vol = format!("{vol}-{i}");
            std::thread::spawn(move || {
                loops.attach(&LoopAttachRequest::new(&img, &vol, Generation(i as u64)))
            })
        })
        .collect();
    let atts: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().unwrap().expect("attach"))
        .collect();
    let _guards: Vec<LoopGuard> = atts
        .iter()
        .enumerate()
        .map(|(i, a)| LoopGuard {
            index: a.index,
            volume: format!("{vol}-{i}"),
        })
        .collect();
    let mut idx: Vec<u32> = atts.iter().map(|a| a.index).collect();
    idx.sort_unstable();
    idx.dedup();
    assert_eq!(idx.len(), 6, "two attaches got the same device: {atts:?}");

    // Another volume's device is not touched.
    let err = loops
        .detach(atts[0].index, &format!("{vol}-1"), Duration::from_secs(1))
        .unwrap_err();
    assert!(matches!(err, LoopError::NotOurs { .. }), "{err}");
    for (i, a) in atts.iter().enumerate() {
        assert_eq!(
            loops
                .detach(a.index, &format!("{vol}-{i}"), Duration::from_secs(5))
                .unwrap(),
            LoopDetached::Free
        );
    }
}

/// The kernel attachment is tied to the process: dropping the handle (as a
/// dying daemon does) clears an unmounted device by itself (autoclear).
#[test]
fn an_unmounted_loop_device_clears_when_its_holder_goes_away() {
    require_root();
    let dir = temp_dir("autoclear");
    let img = dir.path().join("img");
    sparse_file(&img, 1);
    let vol = volume("auto");
    let loops = KernelLoop::new();
    let att = loops
        .attach(&LoopAttachRequest::new(&img, &vol, Generation(2)))
        .unwrap();
    let _guard = LoopGuard {
        index: att.index,
        volume: vol.clone(),
    };
    assert!(KernelLoop::new().status(att.index).unwrap().is_some());
    drop(loops);
    let observer = KernelLoop::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while observer.status(att.index).unwrap().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "loop{} was not autocleared",
            att.index
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn dir_backend_refuses_a_non_mount_point_and_accepts_the_expected_mount() {
    require_root();
    let dir = temp_dir("dir");
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let req = MountRequest::new("/dev/null", &shared, "none", &[] as &[&str]).unwrap();

    // Not mounted: a plain directory on the root filesystem.
    let strict = DirMounter::new(DirCheck::new(&shared));
    let err = strict.mount(&req).unwrap_err();
    assert!(err.to_string().contains("not a mount point"), "{err}");
    match events::mounted(&Err::<(), _>(err)) {
        Event::Mounted(Err(msg)) => assert!(msg.contains("refusing to start the task"), "{msg}"),
        other => panic!("{other:?}"),
    }

    // Mounted (tmpfs standing in for NFS).
    nix::mount::mount(
        Some("tmpfs"),
        &shared,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let _g = MountGuard(std::fs::canonicalize(&shared).unwrap());
    let ok = strict.mount(&req).expect("a mount point passes");
    assert_eq!(ok.entry.fstype, "tmpfs");
    let typed = DirMounter::new(DirCheck {
        fstypes: vec!["nfs".to_string(), "nfs4".to_string()],
        ..DirCheck::new(&shared)
    });
    let err = typed.mount(&req).unwrap_err();
    assert!(err.to_string().contains("expected nfs or nfs4"), "{err}");
    let typed_ok = DirMounter::new(DirCheck {
        fstypes: vec!["tmpfs".to_string()],
        ..DirCheck::new(&shared)
    });
    typed_ok.mount(&req).unwrap();

    // A subdirectory: only with require_mount_point off.
    let sub = shared.join("pg");
    std::fs::create_dir(&sub).unwrap();
    assert!(DirMounter::new(DirCheck::new(&sub)).mount(&req).is_err());
    let loose = DirMounter::new(DirCheck {
        require_mount_point: false,
        ..DirCheck::new(&sub)
    });
    loose.mount(&req).unwrap();
    // Unmount leaves the shared mount alone.
    let r = loose.unmount(&UnmountRequest::new(&sub, true)).unwrap();
    assert!(!r.was_mounted);
    assert!(std::fs::canonicalize(&shared).unwrap().join("pg").exists());
}

const CRASH_ENV: &str = "NBD_FAILOVER_TEST_CRASH_DIR";

fn crash_spec(dir: &Path, vol: &str) -> TaskSpec {
    TaskSpec {
        volume: vol.to_string(),
        mount_point: dir.join("mnt"),
        // The leader dies with the daemon (parent-death signal); its background
        // child, with its cwd in the mount, survives — as a real task's children would.
        run: TaskRun::Exec(vec![
            "/bin/sh".to_string(),
            "-c".to_string(),
            "cd \"$NBD_FAILOVER_MOUNT\" && sleep 600 & echo child $!; wait".to_string(),
        ]),
        user: None,
        env: BTreeMap::new(),
        run_dir: dir.join("run"),
    }
}

/// The "daemon" of `recovery_finds_and_fences_what_a_crashed_daemon_left`:
/// attaches, formats, mounts, starts the task, then waits to be killed.
/// Does nothing (passes) when run as an ordinary test.
#[test]
fn crash_helper() {
    let Some(dir) = helper_env(CRASH_ENV) else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let vol = std::fs::read_to_string(dir.join("volume")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let loops = KernelLoop::new();
        let att = loops
            .attach(&LoopAttachRequest::new(
                dir.join("vol.img"),
                &vol,
                Generation(42),
            ))
            .unwrap();
        sh(&format!("mkfs.ext4 -q -F {}", att.device.display()));
        SysMounter::new()
            .mount(
                &MountRequest::new(&att.device, dir.join("mnt"), "ext4", &[] as &[&str]).unwrap(),
            )
            .unwrap();
        let lines = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let sink_lines = lines.clone();
        let sink: nbd_failover::exec::OutputSink =
            Arc::new(move |l: &nbd_failover::exec::OutputLine<'_>| {
                sink_lines.lock().unwrap().push(l.line.to_string());
            });
        let task = ExecTask::new(crash_spec(&dir, &vol), sink);
        let started = task.start(Generation(42)).await.unwrap();
        // Crash only once the task has forked the child that is to survive it.
        while !lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("child "))
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        println!("READY {}", att.index);
        // Keep everything (including the loop descriptor) until SIGKILL.
        std::mem::forget(loops);
        std::mem::forget(started);
        std::mem::forget(task);
        tokio::time::sleep(Duration::from_secs(600)).await;
    });
}

/// A daemon crash (SIGKILL) leaves a labelled loop device, a mount and a
/// task's surviving process-group member; recovery finds all three with the
/// generation, and the executors fence them (TERM, unmount, detach).
#[tokio::test]
async fn recovery_finds_and_fences_what_a_crashed_daemon_left() {
    require_root();
    let dir = temp_dir("crash");
    let vol = volume("crash");
    std::fs::write(dir.path().join("volume"), &vol).unwrap();
    sparse_file(&dir.path().join("vol.img"), 16);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _mount_guard = MountGuard(std::fs::canonicalize(&mnt).unwrap());

    let mut helper = reexec(
        "crash_helper",
        &[(CRASH_ENV, dir.path().display().to_string())],
    );
    let mut kill_guard = KillGuard(vec![helper.id() as i32]);
    let index: u32 = read_marker(&mut helper, "READY ", Duration::from_secs(30))
        .parse()
        .unwrap();
    let _loop_guard = LoopGuard {
        index,
        volume: vol.clone(),
    };
    let pf = std::fs::read_to_string(dir.path().join(format!("run/{vol}.task"))).unwrap();
    let leader: i32 = pf
        .lines()
        .find_map(|l| l.strip_prefix("pid="))
        .unwrap()
        .parse()
        .unwrap();
    kill_guard.0.push(leader);

    // The crash.
    helper.kill().unwrap();
    helper.wait().unwrap();
    assert!(
        wait_gone(leader, Duration::from_secs(2)),
        "the task leader outlived the daemon"
    );

    let loops = Arc::new(KernelLoop::new());
    let recovery = HostRecovery::new().with_scanner(Box::new(LoopScanner::new(loops.clone())));
    let spec = RecoverySpec {
        volume: vol.clone(),
        mount_point: mnt.clone(),
        owns_mount: true,
        image: Some(dir.path().join("vol.img")),
    };
    let task = ExecTask::new(crash_spec(dir.path(), &vol), tracing_sink());
    let report = recovery.scan(&spec, Some(&task)).unwrap();
    assert_eq!(
        report.leftovers(),
        Leftovers {
            attached: Some(Some(Generation(42))),
            mounted: true,
            task_running: true,
        },
        "{}",
        report.summary()
    );
    assert_eq!(report.devices.len(), 1);
    assert_eq!(report.devices[0].index, index);
    let Some(TaskLeftover::Group {
        pgid,
        leader_alive,
        members,
        generation,
        ..
    }) = report.task.clone()
    else {
        panic!("no task leftover: {}", report.summary());
    };
    assert_eq!(pgid, leader);
    assert!(!leader_alive);
    assert!(!members.is_empty());
    assert_eq!(generation, Some(Generation(42)));
    kill_guard.0.extend(members.iter().copied());

    // Fence, as the core would order it: TERM the task group, unmount, detach.
    let adopted = task.adopt(report.task.as_ref().unwrap()).unwrap();
    assert!(adopted.adopted);
    assert_eq!(
        events::task_signalled(&task.signal(TaskSignal::Term).await),
        Event::TaskSignalled(Ok(()))
    );
    let status = tokio::time::timeout(Duration::from_secs(3), adopted.exit)
        .await
        .expect("adopted task ends");
    assert_eq!(status, nbd_failover::core::ExitStatus::Signal(15));
    for m in &members {
        assert!(
            wait_gone(*m, Duration::from_secs(1)),
            "group member {m} survived"
        );
    }
    let unmounted = SysMounter::new()
        .unmount(&UnmountRequest::new(&mnt, false))
        .unwrap();
    assert!(
        unmounted.was_mounted && unmounted.signalled.is_empty(),
        "{}",
        unmounted.summary()
    );
    let detached = loops.detach(index, &vol, Duration::from_secs(5)).unwrap();
    // Autoclear may have beaten us to it once the filesystem let go.
    assert!(matches!(
        detached,
        LoopDetached::Free | LoopDetached::AlreadyFree
    ));

    let again = recovery.scan(&spec, Some(&task)).unwrap();
    assert!(again.is_empty(), "{}", again.summary());
    assert!(
        !dir.path().join(format!("run/{vol}.task")).exists(),
        "pid file left behind"
    );
}
