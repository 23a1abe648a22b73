//! The fsck executor against real checkers: e2fsck on clean, repaired, journal-recovery and damaged ext4; xfs_repair on clean, damaged and dirty-log XFS; timeouts.

mod exec_support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use exec_support::*;
use nbd_failover::config::Filesystem;
use nbd_failover::core::{Event, FsckOutcome, Generation};
use nbd_failover::exec::{
    events, Fsck, FsckMode, FsckRequest, FsckRunner, KernelLoop, LoopAttachRequest, LoopDevices,
    MountRequest, Mounter, SysMounter, UnmountRequest,
};

fn request(device: &Path, fs: Filesystem, mode: FsckMode) -> FsckRequest {
    let mut r = FsckRequest::new(device, fs, mode);
    r.timeout = Duration::from_secs(60);
    r
}

async fn check(req: &FsckRequest) -> nbd_failover::exec::FsckReport {
    FsckRunner::new().check(req).await.expect("checker runs")
}

#[tokio::test]
async fn ext4_clean_proceeds_and_force_adds_dash_f() {
    let dir = temp_dir("fsck-clean");
    let img = dir.path().join("clean.img");
    ext4_image(&img, 16);

    let r = check(&request(&img, Filesystem::Ext4, FsckMode::Auto)).await;
    assert_eq!(r.outcome, FsckOutcome::Clean, "{}", r.summary());
    assert_eq!(r.runs.len(), 1);
    assert_eq!(r.runs[0].code, Some(0));
    assert!(r.runs[0].command.contains("-p"), "{}", r.runs[0].command);
    assert!(!r.runs[0].command.contains(" -f "), "{}", r.runs[0].command);
    assert!(r.runs[0].output.contains("clean"), "{}", r.runs[0].output);

    let r = check(&request(&img, Filesystem::Ext4, FsckMode::Force)).await;
    assert_eq!(r.outcome, FsckOutcome::Clean);
    assert!(r.runs[0].command.contains(" -f "), "{}", r.runs[0].command);
    assert_eq!(
        events::fsck_done(&Ok(r)),
        Event::FsckDone(FsckOutcome::Clean)
    );
}

#[tokio::test]
async fn ext4_corrected_errors_proceed() {
    let dir = temp_dir("fsck-repaired");
    let img = dir.path().join("repaired.img");
    ext4_image(&img, 16);
    // Wrong summary counters and "not cleanly unmounted": preen fixes them (exit 1).
    sh(&format!(
        "debugfs -w -R 'ssv free_inodes_count 17' {0} && debugfs -w -R 'ssv state 0' {0}",
        img.display()
    ));
    let r = check(&request(&img, Filesystem::Ext4, FsckMode::Auto)).await;
    assert_eq!(r.runs[0].code, Some(1), "{}", r.summary());
    assert_eq!(r.outcome, FsckOutcome::Clean, "{}", r.summary());
    // Fixed for good.
    let r = check(&request(&img, Filesystem::Ext4, FsckMode::Force)).await;
    assert_eq!(r.runs[0].code, Some(0), "{}", r.summary());
}

#[tokio::test]
async fn ext4_journal_needing_recovery_is_replayed_and_proceeds() {
    let dir = temp_dir("fsck-journal");
    let img = dir.path().join("journal.img");
    ext4_image(&img, 16);
    // A real journal transaction left behind, as after a crash of the holder.
    let cmds = dir.path().join("cmds");
    std::fs::write(&cmds, "jo\njw -b 300 /dev/null\njc\n").unwrap();
    sh(&format!(
        "debugfs -w -f {} {}",
        cmds.display(),
        img.display()
    ));
    assert!(sh(&format!("dumpe2fs -h {} 2>/dev/null", img.display())).contains("needs_recovery"));

    let r = check(&request(&img, Filesystem::Ext4, FsckMode::Auto)).await;
    assert_eq!(r.outcome, FsckOutcome::Clean, "{}", r.summary());
    assert!(
        r.runs[0].output.contains("recovering journal"),
        "{}",
        r.runs[0].output
    );
    assert!(!sh(&format!("dumpe2fs -h {} 2>/dev/null", img.display())).contains("needs_recovery"));
}

#[tokio::test]
async fn ext4_uncorrectable_damage_is_refused() {
    let dir = temp_dir("fsck-damaged");
    let img = dir.path().join("damaged.img");
    ext4_image(&img, 16);
    // Clear the root inode: preen mode may not fix that (exit 4).
    sh(&format!(
        "debugfs -w -R 'clri <2>' {0} && debugfs -w -R 'ssv state 0' {0}",
        img.display()
    ));
    let r = check(&request(&img, Filesystem::Ext4, FsckMode::Auto)).await;
    assert_eq!(r.runs[0].code, Some(4), "{}", r.summary());
    match &r.outcome {
        FsckOutcome::Refused(why) => {
            assert!(why.contains("exit code 4"), "{why}");
            assert!(why.contains("errors left uncorrected"), "{why}");
            assert!(why.contains("UNEXPECTED INCONSISTENCY"), "{why}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn ext4_without_any_superblock_is_refused() {
    let dir = temp_dir("fsck-nosb");
    let img = dir.path().join("nosb.img");
    ext4_image(&img, 16);
    // Zero the primary superblock and every backup dumpe2fs lists.
    let backups = sh(&format!(
        "dumpe2fs {} 2>/dev/null | sed -n 's/.*[Bb]ackup superblock at \\([0-9]*\\).*/\\1/p'",
        img.display()
    ));
    sh(&format!(
        "dd if=/dev/zero of={} bs=1024 seek=1 count=1 conv=notrunc status=none",
        img.display()
    ));
    for b in backups.split_whitespace() {
        sh(&format!(
            "dd if=/dev/zero of={} bs=1024 seek={b} count=1 conv=notrunc status=none",
            img.display()
        ));
    }
    let r = check(&request(&img, Filesystem::Ext4, FsckMode::Auto)).await;
    let code = r.runs[0].code.expect("exit code");
    assert!(code >= 4, "{}", r.summary());
    assert!(
        matches!(r.outcome, FsckOutcome::Refused(_)),
        "{}",
        r.summary()
    );
}

/// A stand-in checker script in `dir`.
fn script(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[tokio::test]
async fn exit_code_2_proceeds_with_a_warning() {
    let dir = temp_dir("fsck-two");
    let e2 = script(dir.path(), "e2fsck", "echo 'fixed, reboot'; exit 2");
    let runner = FsckRunner::with_programs(e2, "/bin/false");
    let r = runner
        .check(&request(
            Path::new("/dev/null"),
            Filesystem::Ext3,
            FsckMode::Auto,
        ))
        .await
        .unwrap();
    assert!(
        matches!(&r.outcome, FsckOutcome::Warned(w) if w.contains("reboot advised")),
        "{r:?}"
    );
}

#[tokio::test]
async fn a_checker_past_its_timeout_is_killed_with_its_children_and_refused() {
    let dir = temp_dir("fsck-timeout");
    let pidfile = dir.path().join("child.pid");
    let e2 = script(
        dir.path(),
        "e2fsck",
        &format!("sleep 30 & echo $! > {}; wait", pidfile.display()),
    );
    let runner = FsckRunner::with_programs(e2, "/bin/false");
    let mut req = request(Path::new("/dev/null"), Filesystem::Ext4, FsckMode::Auto);
    req.timeout = Duration::from_millis(400);
    let started = std::time::Instant::now();
    let r = runner.check(&req).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(r.runs[0].timed_out);
    assert!(
        matches!(&r.outcome, FsckOutcome::Refused(w) if w.contains("timed out")),
        "{r:?}"
    );
    let child: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        wait_gone(child, Duration::from_secs(2)),
        "the checker's child {child} survived"
    );
}

#[tokio::test]
async fn a_missing_checker_becomes_a_refusal_event() {
    let runner = FsckRunner::with_programs("/nonexistent/e2fsck", "/nonexistent/xfs_repair");
    let r = runner
        .check(&request(
            Path::new("/dev/null"),
            Filesystem::Ext4,
            FsckMode::Auto,
        ))
        .await;
    assert!(r.is_err());
    match events::fsck_done(&r) {
        Event::FsckDone(FsckOutcome::Refused(why)) => assert!(why.contains("e2fsck"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn policy_never_skips_the_check() {
    let runner = FsckRunner::with_programs("/nonexistent/e2fsck", "/nonexistent/xfs_repair");
    let r = runner
        .check(&request(
            Path::new("/dev/null"),
            Filesystem::Ext4,
            FsckMode::Skip,
        ))
        .await
        .unwrap();
    assert!(r.skipped);
    assert!(r.runs.is_empty());
    assert_eq!(r.outcome, FsckOutcome::Clean);
}

#[tokio::test]
async fn xfs_clean_proceeds_and_damage_is_refused() {
    let dir = temp_dir("fsck-xfs");
    let img = dir.path().join("xfs.img");
    xfs_image(&img);
    let r = check(&request(&img, Filesystem::Xfs, FsckMode::Auto)).await;
    assert_eq!(r.outcome, FsckOutcome::Clean, "{}", r.summary());
    assert!(
        r.runs[0].command.contains("xfs_repair -n"),
        "{}",
        r.runs[0].command
    );

    // Zero the root inode's mode: xfs_repair -n reports damage (exit 1).
    let root = sh(&format!(
        "xfs_db -c 'sb 0' -c 'p rootino' {}",
        img.display()
    ));
    let ino = root.trim().trim_start_matches("rootino = ").to_string();
    sh(&format!(
        "xfs_db -x -c 'inode {ino}' -c 'write -d core.mode 0' {} >/dev/null",
        img.display()
    ));
    let r = check(&request(&img, Filesystem::Xfs, FsckMode::Auto)).await;
    assert_eq!(
        r.runs.len(),
        1,
        "no repair without the option: {}",
        r.summary()
    );
    match &r.outcome {
        FsckOutcome::Refused(why) => assert!(why.contains("found damage"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A dirty XFS log (holder crashed after committing to the log) makes
/// `xfs_repair -n` report spurious damage; the executor replays the log with a
/// scratch mount and checks again.
#[tokio::test]
async fn xfs_dirty_log_is_replayed_then_checked() {
    require_root();
    let dir = temp_dir("fsck-xfslog");
    let img = dir.path().join("xfslog.img");
    xfs_image(&img);
    let vol = volume("xfslog");
    let loops = KernelLoop::new();
    let att = loops
        .attach(&LoopAttachRequest::new(&img, &vol, Generation(1)))
        .expect("attach");
    let _loop_guard = LoopGuard {
        index: att.index,
        volume: vol.clone(),
    };
    let mnt = dir.path().join("mnt");
    let _mount_guard = MountGuard(mnt.clone());
    let m = SysMounter::new();
    let req = MountRequest::new(&att.device, &mnt, "xfs", &[] as &[&str]).unwrap();
    let mounted = m.mount(&req).expect("mount");
    let mp = mounted.mount_point.clone();
    // Commit changes to the log, then shut the filesystem down without checkpointing.
    sh(&format!(
        "mkdir {0}/d && touch {0}/d/a {0}/d/b {0}/d/c && xfs_io -x -c fsync -c shutdown {0}/d/a",
        mp.display()
    ));
    m.unmount(&UnmountRequest::new(&mp, false))
        .expect("unmount");
    let mut req = request(&att.device, Filesystem::Xfs, FsckMode::Auto);
    req.xfs.scratch_dir = dir.path().join("scratch");
    let r = check(&req).await;
    assert_eq!(r.outcome, FsckOutcome::Clean, "{}", r.summary());
    assert_eq!(r.runs.len(), 2, "{}", r.summary());
    assert_eq!(r.runs[0].code, Some(1));
    assert!(r.runs[0].output.contains("valuable metadata changes"));
    assert!(
        r.notes.iter().any(|n| n.contains("replayed")),
        "{:?}",
        r.notes
    );
    // The replayed files are there.
    let mounted = m
        .mount(&MountRequest::new(&att.device, &mnt, "xfs", &[] as &[&str]).unwrap())
        .unwrap();
    assert!(mounted.mount_point.join("d/c").exists());
    m.unmount(&UnmountRequest::new(&mnt, false)).unwrap();
    loops
        .detach(att.index, &vol, Duration::from_secs(5))
        .unwrap();
}
