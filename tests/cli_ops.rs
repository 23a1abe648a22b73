//! Operator interfaces against real daemons: CLI status/release/drain/resume/force-detach/break-lock, the dvdcli contract, the metrics endpoint, the exec wrapper, the control socket's access rules.
//!
//! Real ZooKeeper (one server per test), real daemons (`nbd-failover daemon`)
//! with `image` volumes (loop device, ext4, e2fsck, mount). Needs root; fails
//! loudly, never skips.

mod support;

use std::fs;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::lab::*;

#[test]
fn status_release_drain_resume_and_break_lock() {
    let lab = Lab::new("ops");
    let mut n = lab.node("n1", "");
    n.start_running("db");
    let s = n.status();
    assert_eq!(s["session_state"], "connected", "{s:#}");
    let db = n.volume("db");
    let g1 = db["generation"].as_u64().expect("generation");
    assert!(db["since_ms"].as_u64().unwrap() > 0);
    assert_eq!(
        n.volume("web")["phase"],
        "out",
        "on-demand volume stays out"
    );
    // Human table.
    let o = n.cli(&["status"]);
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(
        t.contains("VOLUME") && t.contains("running") && t.contains("connected"),
        "{t}"
    );
    // Cluster view from ZooKeeper.
    let h = lab.holder(&n, "db");
    assert_eq!(h["node"], "ops-n1", "{h:#}");
    assert_eq!(h["generation"].as_u64(), Some(g1));
    assert!(lab.holder(&n, "web").is_null());

    // release: fence, clean release, win again at once (no lock-delay), new generation.
    let o = n.cli(&["release", "db"]);
    assert!(o.status.success(), "{}", text(&o));
    n.wait("db running again", Duration::from_secs(20), |n| {
        n.phase("db") == "running" && n.volume("db")["generation"].as_u64() != Some(g1)
    });
    assert!(
        n.log().contains("released") && n.log().contains("clean"),
        "{}",
        n.log_tail()
    );

    // drain: out, unmounted; resume: back.
    let o = n.cli(&["drain", "db", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let j: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(j["volumes"][0]["phase"], "out", "{j:#}");
    assert!(!mounted(&n.mnt("db")));
    assert!(lab.holder(&n, "db").is_null(), "drained: no holder");
    let o = n.cli(&["resume", "db"]);
    assert!(o.status.success(), "{}", text(&o));
    n.wait("db running after resume", Duration::from_secs(20), |n| {
        n.phase("db") == "running"
    });

    // An on-demand volume nobody references is not started by resume.
    let o = n.cli(&["resume", "web"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("stays out until acquired"),
        "{}",
        text(&o)
    );
    assert_eq!(n.phase("web"), "out");

    // Unknown volume: exit 3 and the names.
    let o = n.cli(&["release", "nope"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("db, web"),
        "{}",
        text(&o)
    );

    // break-lock: refused without --yes; with it the holder sees its lease vanish and fences.
    let o = n.cli(&["break-lock", "db"]);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("RISK"));
    let g = n.volume("db")["generation"].as_u64();
    let o = n.cli(&["break-lock", "db", "--yes"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("ops-n1"),
        "{}",
        text(&o)
    );
    n.wait(
        "db re-won after the broken lock",
        Duration::from_secs(30),
        |n| n.phase("db") == "running" && n.volume("db")["generation"].as_u64() != g,
    );
    assert!(n.log().contains("lease lost"), "{}", n.log_tail());

    // SIGTERM after control requests were served: exit 0 and a clean release
    // (a connection's hold on the lease service once made this fail).
    let st = n.sigterm();
    assert!(st.success(), "{st:?}\n{}", n.log_tail());
    let o = n.cli(&["status", "--cluster", "--json"]);
    let j: Value = serde_json::from_slice(&o.stdout).expect("json");
    let db = j["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == "db")
        .expect("db")
        .clone();
    assert!(db["holder"].is_null(), "{db:#}");
    assert_eq!(db["last_winner_released_cleanly"], true, "{db:#}");
}

#[test]
fn force_detach_with_the_daemon_alive_and_with_it_killed_or_wedged() {
    let lab = Lab::new("fd");
    let mut n = lab.node("n1", "");
    n.start_running("db");

    // Alive: refuses without --yes while the task runs.
    let o = n.cli(&["force-detach", "db"]);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert!(mounted(&n.mnt("db")));
    let o = n.cli(&["force-detach", "db", "--yes"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("asking the daemon"), "{out}");
    assert_eq!(n.phase("db"), "out");
    assert!(!mounted(&n.mnt("db")));
    assert!(!loop_attached(&lab.dir.path().join("db.img")));
    let o = n.cli(&["resume", "db"]);
    assert!(o.status.success(), "{}", text(&o));
    n.wait("db running after resume", Duration::from_secs(30), |n| {
        n.phase("db") == "running"
    });

    // Wedged (SIGSTOP): no answer, the CLI acts itself; refuses while the task runs.
    let pid = nix::unistd::Pid::from_raw(n.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let o = n.cli(&["force-detach", "db", "--daemon-timeout", "1s"]);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("still running"),
        "{}",
        text(&o)
    );
    assert!(mounted(&n.mnt("db")), "nothing done without --yes");
    let t0 = Instant::now();
    let o = n.cli(&["force-detach", "db", "--yes", "--daemon-timeout", "1s"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("does not answer"), "{out}");
    assert!(out.contains("task running"), "{out}");
    assert!(
        out.contains("unmounted") && out.contains("device detached"),
        "{out}"
    );
    assert!(out.contains("deleted this node's lock node"), "{out}");
    assert!(!mounted(&n.mnt("db")));
    assert!(!loop_attached(&lab.dir.path().join("db.img")));
    // Its lock node is gone at once, not after the session timeout.
    assert!(lab.holder(&n, "db").is_null());
    eprintln!(
        "force-detach of a wedged daemon's volume took {:?}",
        t0.elapsed()
    );
    n.kill9();

    // Held out across the restart until resume.
    n.start();
    n.wait_socket();
    n.wait("db out after restart", Duration::from_secs(30), |n| {
        n.phase("db") == "out"
    });
    assert!(n.log().contains("held-out marker"), "{}", n.log_tail());
    let o = n.cli(&["resume", "db"]);
    assert!(o.status.success(), "{}", text(&o));
    n.wait("db running", Duration::from_secs(30), |n| {
        n.phase("db") == "running"
    });

    // Killed -9 (the task dies with it): nothing running, so no --yes needed.
    let task_pid: i32 = fs::read_to_string(n.dir.join("run/db.task"))
        .expect("task pid file")
        .lines()
        .find_map(|l| l.strip_prefix("pid="))
        .and_then(|p| p.parse().ok())
        .expect("pid");
    n.kill9();
    n.wait(
        "the task group to die with its daemon",
        Duration::from_secs(10),
        |_| !group_alive(task_pid),
    );
    let o = n.cli(&["force-detach", "db", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let j: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(j["via"], "direct", "{j:#}");
    assert_eq!(j["task_was_running"], false, "{j:#}");
    let steps = j["steps"].to_string();
    assert!(
        steps.contains("unmounted") && steps.contains("detached"),
        "{j:#}"
    );
    assert_eq!(
        j["lock_nodes_deleted"].as_array().map(Vec::len),
        Some(1),
        "{j:#}"
    );
    assert!(!mounted(&n.mnt("db")));
    assert!(!loop_attached(&lab.dir.path().join("db.img")));
    assert!(lab.holder(&n, "db").is_null());
}

fn dvdcli(n: &Node, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("dvdcli")
        .args(args)
        .env("NBD_FAILOVER_CONFIG", n.cfg())
        .output()
        .expect("dvdcli")
}

#[test]
fn dvdcli_mounts_are_reference_counted_and_a_lease_held_elsewhere_fails_in_time() {
    let lab = Lab::new("dvd");
    let mut a = lab.node("a", "");
    let mut b = lab.node("b", "");
    a.start();
    b.start();
    a.wait_socket();
    b.wait_socket();
    let mount = ["mount", "--volumedriver=nbd-failover", "--volumename=web"];
    let unmount = ["unmount", "--volumedriver=nbd-failover", "--volumename=web"];
    // Through a symlink named dvdcli, as Mesos runs it.
    let link = lab.dir.path().join("dvdcli");
    std::os::unix::fs::symlink(BIN, &link).expect("symlink");
    let o = Command::new(&link)
        .args(mount)
        .env("NBD_FAILOVER_CONFIG", a.cfg())
        .output()
        .expect("dvdcli");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("{}\n", a.mnt("web").display()),
        "only the mount point on stdout"
    );
    assert!(mounted(&a.mnt("web")));
    let o = dvdcli(&a, &mount);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(a.volume("web")["references"]["dvdcli"], 2);

    // Held by a: b's mount fails within its wait, naming the holder; b keeps nothing.
    let t0 = Instant::now();
    let o = dvdcli(
        &b,
        &[
            "mount",
            "--volumedriver=nbd-failover",
            "--volumename=web",
            "--volumeopts=wait=3s",
        ],
    );
    let took = t0.elapsed();
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(o.stdout.is_empty(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("dvd-a"),
        "{}",
        text(&o)
    );
    assert!(took < Duration::from_secs(8), "took {took:?}");
    b.wait("b out again", Duration::from_secs(10), |b| {
        b.phase("web") == "out"
    });
    assert_eq!(b.volume("web")["references"], serde_json::json!({}));

    // First unmount keeps it mounted; the second releases it.
    let o = dvdcli(&a, &unmount);
    assert!(o.status.success(), "{}", text(&o));
    assert!(mounted(&a.mnt("web")));
    assert_eq!(a.phase("web"), "running");
    let o = dvdcli(&a, &unmount);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!mounted(&a.mnt("web")));
    assert!(!loop_attached(&lab.dir.path().join("web.img")));
    assert!(lab.holder(&a, "web").is_null());
    // Released cleanly: b mounts at once (no lock-delay).
    let o = dvdcli(&b, &mount);
    assert!(o.status.success(), "{}", text(&o));
    assert!(mounted(&b.mnt("web")));
    // An unmount nobody asked for is a no-op.
    let o = dvdcli(&a, &unmount);
    assert!(o.status.success(), "{}", text(&o));
    // Wrong driver, unknown volume, unknown option: non-zero with the reason.
    let o = dvdcli(&a, &["mount", "--volumedriver=rexray", "--volumename=web"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = dvdcli(
        &a,
        &["mount", "--volumedriver=nbd-failover", "--volumename=nope"],
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let o = dvdcli(
        &a,
        &[
            "mount",
            "--volumedriver=nbd-failover",
            "--volumename=web",
            "--volumeopts=size=10",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    // An `always` volume is not handed out.
    let o = dvdcli(
        &a,
        &["mount", "--volumedriver=nbd-failover", "--volumename=db"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));

    // per-volume references (what Mesos' docker/volume isolator expects:
    // mount per container, one unmount after the last): the first unmount releases.
    let mut c = lab.node("c", "\n[mesos]\ndvdcli_references = \"per-volume\"\n");
    c.start();
    c.wait_socket();
    let o = dvdcli(&b, &unmount);
    assert!(o.status.success(), "{}", text(&o));
    for _ in 0..2 {
        let o = dvdcli(&c, &mount);
        assert!(o.status.success(), "{}", text(&o));
    }
    assert_eq!(c.volume("web")["references"]["dvdcli"], 1);
    let o = dvdcli(&c, &unmount);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!mounted(&c.mnt("web")));
    assert_eq!(c.phase("web"), "out");
    let o = dvdcli(&b, &mount);
    assert!(o.status.success(), "{}", text(&o));

    // References survive a daemon crash: b restarted fences what it left, then re-acquires web.
    b.kill9();
    b.start();
    b.wait_socket();
    b.wait("b re-acquires web", Duration::from_secs(30), |b| {
        b.phase("web") == "running"
    });
    assert_eq!(b.volume("web")["references"]["dvdcli"], 1);
}

fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut r = String::new();
    s.read_to_string(&mut r).expect("read");
    let code = r
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let body = r
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (code, body)
}

#[test]
fn metrics_endpoint_is_scraped_by_metric_name() {
    let lab = Lab::new("met");
    let mut n = lab.node("n1", "");
    n.start_running("db");
    let o = n.cli(&["release", "db"]);
    assert!(o.status.success(), "{}", text(&o));
    n.wait("db running again", Duration::from_secs(20), |n| {
        n.phase("db") == "running"
    });
    let (code, body) = http_get(n.metrics_port, "/metrics");
    assert_eq!(code, 200, "{body}");
    let has = |needle: &str| body.lines().any(|l| l.starts_with(needle));
    for name in [
        "nbd_failover_volume_state{volume=\"db\",state=\"running\"} 1",
        "nbd_failover_volume_lease_held{volume=\"db\"} 1",
        "nbd_failover_volume_lease_held{volume=\"web\"} 0",
        "nbd_failover_volume_generation{volume=\"db\"}",
        "nbd_failover_zookeeper_session_state{state=\"connected\"} 1",
        "nbd_failover_zookeeper_last_contact_age_seconds",
        "nbd_failover_fences_total{volume=\"db\"} 1",
        "nbd_failover_failovers_total{volume=\"db\"} 2",
        "nbd_failover_phase_duration_seconds_bucket{volume=\"db\",phase=\"attaching\"",
        "nbd_failover_phase_duration_seconds_count{volume=\"db\",phase=\"checking\"} 2",
        "nbd_failover_phase_duration_seconds_count{volume=\"db\",phase=\"fencing\"} 1",
        "nbd_failover_phase_duration_seconds_sum{volume=\"db\",phase=\"mounting\"}",
        "nbd_failover_phase_duration_seconds_count{volume=\"db\",phase=\"starting\"} 2",
        "nbd_failover_build_info",
        "nbd_failover_node_info{node=\"met-n1\"} 1",
    ] {
        assert!(has(name), "no line starting with {name} in\n{body}");
    }
    let (code, body) = http_get(n.metrics_port, "/healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, _) = http_get(n.metrics_port, "/nope");
    assert_eq!(code, 404);
}

#[test]
fn exec_wrapper_passes_the_exit_status_and_exits_75_on_lease_loss() {
    let lab = Lab::new("exe");
    let n = lab.node("n1", "");
    // No daemon: the wrapper holds its own session.
    let o = Command::new(BIN)
        .args(["exec", "--volume", "web", "--config"])
        .arg(n.cfg())
        .args([
            "--",
            "/bin/sh",
            "-c",
            "test -d \"$NBD_FAILOVER_MOUNT/lost+found\" && echo on-volume && exit 7",
        ])
        .output()
        .expect("exec");
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("on-volume"),
        "{}",
        text(&o)
    );
    assert!(!mounted(&n.mnt("web")));
    assert!(!loop_attached(&lab.dir.path().join("web.img")));
    assert!(lab.holder(&n, "web").is_null());

    // Lease lost while the command runs: fenced, exit 75.
    let mut w = Command::new(BIN)
        .args(["exec", "--volume", "web", "--config"])
        .arg(n.cfg())
        .args(["--", "/bin/sh", "-c", "echo started; exec sleep 600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("exec");
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(w.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("read");
        assert_eq!(line, "started\n");
    }
    assert!(mounted(&n.mnt("web")));
    let h = lab.holder(&n, "web");
    assert_eq!(h["node"], "exe-n1.exec-web", "{h:#}");
    let o = n.cli(&["break-lock", "web", "--yes"]);
    assert!(o.status.success(), "{}", text(&o));
    let deadline = Instant::now() + Duration::from_secs(20);
    let st = loop {
        if let Some(st) = w.try_wait().expect("wait") {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the wrapper did not exit after its lease was broken"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(st.code(), Some(75));
    assert!(!mounted(&n.mnt("web")));
    assert!(!loop_attached(&lab.dir.path().join("web.img")));

    // SIGTERM to the wrapper: the command is stopped, its status passed through.
    let mut w = Command::new(BIN)
        .args(["exec", "--volume", "web", "--config"])
        .arg(n.cfg())
        .args([
            "--",
            "/bin/sh",
            "-c",
            "trap 'exit 3' TERM; echo started; while :; do sleep 0.1; done",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("exec");
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(w.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("read");
        assert_eq!(line, "started\n");
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(w.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let st = w.wait().expect("wait");
    assert_eq!(st.code(), Some(3));
    assert!(!mounted(&n.mnt("web")));
    assert!(lab.holder(&n, "web").is_null());
}

#[test]
fn the_control_socket_is_root_only_and_completions_generate() {
    let lab = Lab::new("sock");
    let mut n = lab.node("n1", "");
    n.start_running("db");
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(n.socket())
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    // Even with the file opened up, the peer-credential check refuses another user.
    fs::set_permissions(n.socket(), fs::Permissions::from_mode(0o666)).expect("chmod");
    let o = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            BIN,
            "status",
            "--socket",
        ])
        .arg(n.socket())
        .arg("--config")
        .arg(n.cfg())
        .output()
        .expect("setpriv");
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("without answering"),
        "{}",
        text(&o)
    );
    assert!(n
        .log()
        .contains("refused a connection from a non-root user"));
    // A second daemon on the same socket refuses to start.
    let o = Command::new(BIN)
        .args(["daemon", "--config"])
        .arg(n.cfg())
        .output()
        .expect("second daemon");
    assert!(!o.status.success());
    for shell in ["bash", "zsh", "fish"] {
        let o = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .expect("completions");
        assert!(o.status.success());
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("force-detach"),
            "{shell}"
        );
    }
    // The exec wrapper refuses a volume the daemon manages (they would fence each other's mounts).
    let o = Command::new(BIN)
        .args(["exec", "--volume", "web", "--config"])
        .arg(n.cfg())
        .args(["--", "true"])
        .output()
        .expect("exec");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("manages volume web"),
        "{}",
        text(&o)
    );
    // No daemon: exit 6 and a hint.
    n.kill9();
    let ss = Command::new("ss").args(["-xlp"]).output().expect("ss");
    let o = n.cli(&["status"]);
    assert_eq!(
        o.status.code(),
        Some(6),
        "{}\n{}",
        text(&o),
        String::from_utf8_lossy(&ss.stdout)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no daemon answers"),
        "{}",
        text(&o)
    );
}

#[test]
fn a_daemon_restarted_without_zookeeper_fences_its_leftovers_first() {
    let mut lab = Lab::new("nozk");
    // A watchdog "device" that is a plain file records every pet (NUL) and the
    // magic close (V).
    let wd = lab.dir.path().join("n1-watchdog");
    std::fs::write(&wd, b"").expect("watchdog file");
    let mut n = lab.node(
        "n1",
        &format!(
            "[watchdog]\nmode = \"device\"\ndevice = \"{}\"\ntimeout = \"2s\"\n",
            wd.display()
        ),
    );
    n.start_running("db");
    n.kill9();
    assert!(mounted(&n.mnt("db")), "kill -9 leaves the mount");
    let first_run = std::fs::read(&wd).expect("watchdog file");
    assert!(
        !first_run.is_empty() && !first_run.contains(&b'V'),
        "the first run petted and, killed, never disarmed: {first_run:?}"
    );
    // (A plain file is written from offset 0 by every run: start the second empty.)
    std::fs::write(&wd, b"").expect("watchdog file");
    lab.zk.kill();
    // Restarted with ZooKeeper down: it cannot start its lease service, but the
    // device and mount of the earlier run must not stay behind meanwhile.
    n.start();
    let mut child = n.child.take().expect("running");
    let deadline = Instant::now() + Duration::from_secs(60);
    let st = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon neither connected nor gave up:\n{}",
            n.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        !st.success(),
        "no ZooKeeper: start-up fails\n{}",
        n.log_tail()
    );
    assert!(!mounted(&n.mnt("db")), "{}", n.log_tail());
    assert!(
        !loop_attached(&lab.dir.path().join("db.img")),
        "{}",
        n.log_tail()
    );
    let log = n.log();
    let fenced = log.find("leftover fence").expect("the leftover fence ran");
    let zk_err = log.rfind("ZooKeeper").unwrap_or(usize::MAX);
    assert!(
        fenced < zk_err,
        "fenced before giving up on ZooKeeper\n{}",
        n.log_tail()
    );
    // The second run armed the watchdog before its leftover fence and, with
    // nothing exposed any more, petted it while it tried ZooKeeper (a daemon
    // that cannot reach ZooKeeper must not reset a clean machine); failing
    // start-up with nothing exposed, it disarmed it.
    let second_run = std::fs::read(&wd).expect("watchdog file");
    assert!(
        second_run.len() >= 2 && second_run[..second_run.len() - 1].iter().all(|b| *b == 0),
        "pets while waiting for ZooKeeper: {second_run:?}\n{}",
        n.log_tail()
    );
    assert_eq!(
        second_run.last(),
        Some(&b'V'),
        "disarmed on the failed start-up"
    );
}

#[test]
fn a_second_daemon_for_the_same_run_dir_touches_nothing() {
    let lab = Lab::new("twice");
    let mut n = lab.node("n1", "");
    n.start_running("db");
    let before = n.log();
    let generation = n.volume("db")["generation"].clone();
    // Started by hand while the service runs: it must refuse before its
    // start-up recovery, which would take the running volume for leftovers.
    let o = Command::new(BIN)
        .args(["daemon", "--config"])
        .arg(n.cfg())
        .env("RUST_LOG", "info")
        .output()
        .expect("second daemon");
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("already runs with run_dir") && err.contains("touched nothing"),
        "{}",
        text(&o)
    );
    assert!(!err.contains("leftover"), "{}", text(&o));
    assert!(mounted(&n.mnt("db")), "{}", n.log_tail());
    let db = n.volume("db");
    assert_eq!(db["phase"], "running", "{db}");
    assert_eq!(db["generation"], generation, "{db}");
    let log = n.log();
    assert!(
        !log[before.len()..].contains("task exited"),
        "the running task was not disturbed:\n{}",
        &log[before.len()..]
    );
    assert!(n.sigterm().success());
}
