//! Unit tests of the config module: parsing, defaults, policy mapping, error positions, the report.

use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::core::policy::{FsckPolicy, RestartMode, Timings};

const EXAMPLE: &str = include_str!("../../examples/nbd-failover.toml");

const MINIMAL: &str = r#"
[zookeeper]
hosts = ["zk1:2181"]

[volumes.data]
backend = "nbd"
mount_path = "/srv/data"
[volumes.data.nbd]
server = "nbd1:10809"
export = "data"
"#;

fn host() -> Result<String, String> {
    Ok("testhost".to_string())
}

fn ok(src: &str) -> Config {
    match parse_with_hostname(src, "t.toml", &host) {
        Ok(c) => c,
        Err(e) => panic!("expected a valid config, got:\n{e}"),
    }
}

/// The errors as `LINE:COL: message`.
fn errs(src: &str) -> Vec<String> {
    match parse_with_hostname(src, "t.toml", &host) {
        Ok(_) => panic!("expected errors"),
        Err(e) => e
            .iter()
            .map(|e| format!("{}:{}: {}", e.line(), e.column(), e.message()))
            .collect(),
    }
}

/// Asserts one error starts with `LINE:COL:` and contains `needle`.
#[track_caller]
fn has(errors: &[String], pos: &str, needle: &str) {
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with(&format!("{pos}: ")) && e.contains(needle)),
        "no error at {pos} containing {needle:?} in:\n{}",
        errors.join("\n")
    );
}

#[test]
fn example_is_valid_and_maps_onto_the_core_policy() {
    let cfg = ok(EXAMPLE);
    let names: Vec<&str> = cfg.volumes.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["mysql", "postgres", "uploads"]);
    assert_eq!(cfg.node.id, "testhost");
    assert!(cfg.node.id_from_hostname);
    assert_eq!(
        cfg.zookeeper.connect_string(),
        "127.0.0.1:2181/nbd-failover"
    );

    let mysql = cfg.volume("mysql").expect("mysql");
    let p = mysql.policy();
    assert!(p.has_device && p.has_task);
    assert_eq!(p.fsck, FsckPolicy::Auto);
    assert_eq!(p.timings.stop_grace, Duration::from_secs(4));
    assert_eq!(p.timings.session_timeout, Duration::from_secs(10));
    assert_eq!(p.timings.watchdog_timeout, None);
    assert_eq!(p.restart.mode, RestartMode::OnFailure);
    assert_eq!(mysql.fencing_overrides, ["stop_grace"]);
    assert_eq!(mysql.budget().total, Duration::from_secs(10));
    assert!(
        matches!(&mysql.task, Some(TaskConfig { run: TaskRun::Exec(a), .. }) if a[0] == "/usr/sbin/mysqld")
    );

    let uploads = cfg.volume("uploads").expect("uploads");
    assert!(!uploads.policy().has_device && !uploads.policy().has_task);
    assert_eq!(uploads.policy().fsck, FsckPolicy::Never);
    assert_eq!(uploads.filesystem, None);

    let pg = cfg.volume("postgres").expect("postgres");
    assert_eq!(pg.filesystem, Some(Filesystem::Xfs));
    assert!(
        matches!(&pg.task, Some(TaskConfig { run: TaskRun::SystemdUnit(u), .. }) if u == "postgresql.service")
    );
}

#[test]
fn defaults_are_the_core_defaults() {
    let cfg = ok(MINIMAL);
    assert_eq!(cfg.node.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
    assert_eq!(cfg.node.run_dir, PathBuf::from(DEFAULT_RUN_DIR));
    assert_eq!(cfg.zookeeper.chroot, DEFAULT_CHROOT);
    assert_eq!(cfg.zookeeper.session_timeout, DEFAULT_SESSION_TIMEOUT);
    assert_eq!(cfg.zookeeper.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    assert_eq!(cfg.zookeeper.auth, None);
    assert_eq!(cfg.zookeeper.tls, None);
    assert_eq!(cfg.watchdog, WatchdogConfig::Off);
    let v = &cfg.volumes[0];
    assert_eq!(v.policy().timings, Timings::default());
    assert_eq!(
        v.policy().restart,
        crate::core::policy::RestartPolicy::default()
    );
    assert!(v.policy().has_device);
    assert!(!v.policy().has_task);
    assert_eq!(v.filesystem, Some(Filesystem::Ext4));
    match &v.backend {
        Backend::Nbd(n) => {
            assert_eq!(n.timeout, DEFAULT_NBD_TIMEOUT);
            assert_eq!(n.dead_conn_timeout, DEFAULT_NBD_DEAD_CONN_TIMEOUT);
            assert_eq!(n.connections, 1);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn watchdog_and_fencing_keys_reach_the_timings() {
    let src = format!(
        "{MINIMAL}\n[watchdog]\nmode = \"device\"\ntimeout = \"7s\"\n[fencing]\nhandover_backoff = \"1m\"\n\
         backoff_initial = \"500ms\"\nbackoff_max = \"10s\"\nlock_delay = \"0s\"\n"
    );
    let cfg = ok(&src);
    let t = &cfg.volumes[0].policy().timings;
    assert_eq!(t.watchdog_timeout, Some(Duration::from_secs(7)));
    assert_eq!(t.handover_backoff, Duration::from_secs(60));
    assert_eq!(t.backoff_initial, Duration::from_millis(500));
    assert_eq!(t.backoff_max, Duration::from_secs(10));
    assert_eq!(t.lock_delay, Duration::ZERO);
    assert_eq!(
        cfg.watchdog,
        WatchdogConfig::Device {
            device: PathBuf::from("/dev/watchdog"),
            timeout: Duration::from_secs(7)
        }
    );
}

#[test]
fn effective_toml_parses_back_to_the_same_config() {
    for src in [EXAMPLE, MINIMAL] {
        let cfg = ok(src);
        let again = ok(&effective_toml(&cfg));
        let mut expected = cfg.clone();
        expected.node.id_from_hostname = false;
        assert_eq!(again, expected);
    }
    let mut src = EXAMPLE.replace("# [zookeeper.auth]", "[zookeeper.auth]");
    src = src
        .replace("# credentials_file", "credentials_file")
        .replace("# admin_credentials_file", "admin_credentials_file");
    let cfg = ok(&src);
    assert!(cfg.zookeeper.auth.is_some());
    assert_eq!(ok(&effective_toml(&cfg)).zookeeper, cfg.zookeeper);
}

#[test]
fn report_shows_each_budget() {
    let cfg = ok(EXAMPLE);
    let r = report(&cfg);
    assert!(
        r.contains("volume mysql: fencing budget (from last ZooKeeper contact)"),
        "{r}"
    );
    assert!(
        r.contains("  total           10s   <= session timeout 10s (0s to spare)"),
        "{r}"
    );
    assert!(r.contains("volume uploads: fencing budget"), "{r}");
    assert!(
        r.contains(
            "  stop_grace      4s    SIGTERM -> SIGKILL of the task group (set on this volume)"
        ),
        "{r}"
    );
}

#[test]
fn json_has_budgets() {
    let cfg = ok(EXAMPLE);
    let j = to_json(&cfg).expect("json");
    let v = &j["volumes"][0];
    assert_eq!(v["name"], "mysql");
    assert_eq!(v["backend"]["backend"], "nbd");
    assert_eq!(v["fencing_budget"]["total"], "10s");
    assert_eq!(v["fencing_budget"]["fits"], true);
    assert_eq!(v["fencing"]["stop_grace"], "4s");
    assert_eq!(j["zookeeper"]["session_timeout"], "10s");
    assert_eq!(j["watchdog"]["mode"], "off");
}

#[test]
fn syntax_error_points_at_the_problem() {
    let e = errs("[zookeeper]\nhosts = [\"a:1\"\n\n[volumes.a]\n");
    assert_eq!(e.len(), 1, "{e:?}");
    has(&e, "4:1", "TOML syntax");
    let e = errs("[zookeeper]\nhosts = [\"a:1\"]\nhosts = []\n");
    has(&e, "3:1", "duplicate key `hosts`");
}

#[test]
fn every_unknown_key_is_reported_at_the_key() {
    let src = MINIMAL.replace(
        "export = \"data\"",
        "export = \"data\"\nexprot = 1\n  colour = \"red\"",
    );
    let e = errs(&src);
    has(
        &e,
        "11:1",
        "unknown key `exprot` in [volumes.data.nbd] (did you mean `export`?)",
    );
    has(
        &e,
        "12:3",
        "unknown key `colour` in [volumes.data.nbd] (known keys: server, export,",
    );
}

#[test]
fn missing_keys_point_at_the_table() {
    let e = errs("# nothing\n[zookeeper]\nchroot = \"/x\"\n\n[volumes.a]\nbackend = \"nbd\"\n[volumes.a.nbd]\nserver = \"s:1\"\n");
    has(&e, "2:1", "[zookeeper] is missing the required key `hosts`");
    has(
        &e,
        "5:1",
        "[volumes.a] is missing the required key `mount_path`",
    );
    has(
        &e,
        "7:1",
        "[volumes.a.nbd] is missing the required key `export`",
    );
    let e = errs("[volumes.a]\n");
    has(&e, "1:1", "missing required table [zookeeper]");
}

#[test]
fn bad_values_point_at_the_value() {
    let src = r#"[zookeeper]
hosts = ["zk1:2181", "zk2"]
session_timeout = "10 s3"
connect_timeout = 5

[watchdog]
mode = "sometimes"

[volumes.data]
backend = "nbd"
mount_path = "srv/data"
fsck = "maybe"
[volumes.data.nbd]
server = "nbd1"
export = ""
connections = 17
"#;
    let e = errs(src);
    has(
        &e,
        "2:22",
        "`zookeeper.hosts[1]` = \"zk2\" is not HOST:PORT",
    );
    has(
        &e,
        "3:19",
        "`zookeeper.session_timeout` = \"10 s3\" is not a duration",
    );
    has(
        &e,
        "4:19",
        "`zookeeper.connect_timeout` must be a duration string",
    );
    has(
        &e,
        "7:8",
        "`watchdog.mode` = \"sometimes\" is not one of \"off\", \"systemd\", \"device\"",
    );
    has(
        &e,
        "11:14",
        "`volumes.data.mount_path` = \"srv/data\": it must be an absolute path",
    );
    has(&e, "12:8", "is not one of \"auto\", \"force\", \"never\"");
    has(&e, "14:10", "is not HOST:PORT or unix:/PATH");
    has(&e, "15:10", "`volumes.data.nbd.export` must not be empty");
    has(&e, "16:15", "out of range: it must be between 1 and 16");
}

#[test]
fn budget_violation_blames_the_override_then_fencing_then_the_session() {
    // The volume's own override.
    let src = MINIMAL.replace(
        "mount_path = \"/srv/data\"",
        "mount_path = \"/srv/data\"\nstop_grace = \"6s\"",
    );
    let e = errs(&src);
    has(
        &e,
        "8:14",
        "volume \"data\": fencing budget: suspend_grace 2s + stop_grace 6s + unmount 2s + detach 1s + margin 1s \
         = 12s exceeds the ZooKeeper session timeout 10s: a partitioned holder could still be fencing when another \
         node wins the lease",
    );
    // [fencing].
    let src = format!("{MINIMAL}[fencing]\nunmount_budget = \"5s\"\n");
    has(&errs(&src), "12:18", "volume \"data\": fencing budget:");
    // The session timeout.
    let src = MINIMAL.replace(
        "hosts = [\"zk1:2181\"]",
        "hosts = [\"zk1:2181\"]\nsession_timeout = \"8s\"",
    );
    has(
        &errs(&src),
        "4:19",
        "exceeds the ZooKeeper session timeout 8s",
    );
}

#[test]
fn watchdog_rules() {
    let e = errs(&format!(
        "{MINIMAL}[watchdog]\nmode = \"systemd\"\ntimeout = \"9500ms\"\n"
    ));
    has(
        &e,
        "13:11",
        "watchdog timeout 9.5s exceeds the ZooKeeper session timeout 10s minus margin 1s = 9s",
    );
    let e = errs(&format!("{MINIMAL}[watchdog]\nmode = \"systemd\"\n"));
    has(
        &e,
        "11:1",
        "[watchdog] with mode = \"systemd\" is missing the required key `timeout`",
    );
    let e = errs(&format!(
        "{MINIMAL}[watchdog]\ntimeout = \"5s\"\ndevice = \"/dev/watchdog1\"\n"
    ));
    has(&e, "12:11", "`watchdog.timeout` is set but mode is \"off\"");
    has(
        &e,
        "13:10",
        "`watchdog.device` is only used with mode = \"device\"",
    );
    // A volume's larger margin tightens the limit.
    let src = MINIMAL.replace(
        "mount_path = \"/srv/data\"",
        "mount_path = \"/srv/data\"\nmargin = \"2s\"",
    ) + "[watchdog]\nmode = \"systemd\"\ntimeout = \"9s\"\n";
    has(
        &errs(&src),
        "14:11",
        "minus volume \"data\"'s margin 2s = 8s",
    );
    ok(&format!(
        "{MINIMAL}[watchdog]\nmode = \"systemd\"\ntimeout = \"9s\"\n"
    ));
}

#[test]
fn backend_tables_must_match() {
    let src = MINIMAL.replace(
        "[volumes.data.nbd]",
        "[volumes.data.image]\npath = \"/i.img\"\n[volumes.data.nbd]",
    );
    let e = errs(&src);
    has(
        &e,
        "8:1",
        "[volumes.data.image] does not belong on a volume with backend = \"nbd\"",
    );
    let src = MINIMAL.replace("backend = \"nbd\"", "backend = \"dir\"");
    let e = errs(&src);
    has(
        &e,
        "5:1",
        "backend = \"dir\" needs a [volumes.data.dir] table (path)",
    );
    has(
        &e,
        "8:1",
        "[volumes.data.nbd] does not belong on a volume with backend = \"dir\"",
    );
}

#[test]
fn storage_and_mount_paths_are_unique() {
    let src = format!(
        "{MINIMAL}\n[volumes.other]\nbackend = \"nbd\"\nmount_path = \"/srv//data/\"\n\
         [volumes.other.nbd]\nserver = \"nbd1:10809\"\nexport = \"data\"\n"
    );
    let e = errs(&src);
    has(
        &e,
        "14:14",
        "volume \"other\": mount_path \"/srv/data\" is also the mount_path of volume \"data\"",
    );
    has(
        &e,
        "16:10",
        "volume \"other\" uses the same NBD export \"data\" on nbd1:10809 as volume \"data\"",
    );
}

#[test]
fn several_errors_are_all_reported_in_file_order() {
    let src = r#"bogus = 1
[zookeeper]
hosts = []
[fencing]
stop_grace = "3 parsecs"
[volumes.a]
backend = "tape"
mount_path = "/"
"#;
    let e = errs(src);
    assert_eq!(e.len(), 5, "{e:#?}");
    has(&e, "1:1", "unknown top-level key `bogus`");
    has(&e, "3:9", "`zookeeper.hosts` is empty");
    has(&e, "5:14", "is not a duration");
    has(&e, "7:11", "`volumes.a.backend` = \"tape\" is not one of");
    has(&e, "8:14", "`volumes.a.mount_path` must not be \"/\"");
}

#[test]
fn inline_and_dotted_tables_work_and_point_right() {
    let src = r#"zookeeper.hosts = ["zk:2181"]
volumes.a = { backend = "dir", mount_path = "/a", dir = { path = "/mnt/a" } }
[volumes.b]
backend = "image"
mount_path = "/b"
image.path = "/img/b"
task = { exec = ["/bin/true"], env = { A = "1" }, user = "root" }
"#;
    let cfg = ok(src);
    assert_eq!(cfg.volumes.len(), 2);
    assert_eq!(cfg.volumes[1].task.as_ref().map(|t| t.env.len()), Some(1));

    let bad = src
        .replace("path = \"/mnt/a\"", "path = \"mnt/a\"")
        .replace("image.path = \"/img/b\"", "image.pat = \"/img/b\"");
    let e = errs(&bad);
    has(&e, "2:66", "`volumes.a.dir.path` = \"mnt/a\"");
    has(
        &e,
        "6:7",
        "unknown key `pat` in [volumes.b.image] (did you mean `path`?)",
    );
    has(
        &e,
        "6:1",
        "[volumes.b.image] is missing the required key `path`",
    );
}

#[test]
fn task_rules() {
    let base = MINIMAL.to_string() + "[volumes.data.task]\n";
    has(
        &errs(&base),
        "11:1",
        "needs `exec` (a command) or `systemd_unit`",
    );
    let e = errs(&(base.clone() + "exec = [\"/bin/x\"]\nsystemd_unit = \"x.service\"\n"));
    has(&e, "11:1", "sets both `exec` and `systemd_unit`");
    let e = errs(
        &(base.clone()
            + "systemd_unit = \"x\"\nuser = \"mysql\"\nenv = { \"1X\" = \"a\", B = 2 }\n"),
    );
    has(
        &e,
        "12:16",
        "is not a unit name: it must end in \".service\"",
    );
    has(&e, "13:8", "only applies to exec tasks");
    has(
        &e,
        "14:9",
        "`volumes.data.task.env.1X` is not an environment variable name",
    );
    has(
        &e,
        "14:25",
        "`volumes.data.task.env.B` must be a string, not the integer 2",
    );
    let e = errs(&(MINIMAL.to_string() + "[volumes.data.restart]\npolicy = \"always\"\n"));
    has(&e, "11:1", "[volumes.data.restart] has no effect");
    let cfg = ok(&(base
        + "exec = [\"/bin/x\"]\n[volumes.data.restart]\npolicy = \"never\"\nmax_restarts = 0\n"));
    assert_eq!(cfg.volumes[0].policy().restart.mode, RestartMode::Never);
    assert_eq!(cfg.volumes[0].policy().restart.max_restarts, 0);
    assert!(cfg.volumes[0].policy().has_task);
}

#[test]
fn zookeeper_auth_and_tls() {
    let src = MINIMAL.replace(
        "hosts = [\"zk1:2181\"]",
        "hosts = [\"zk1:2181\", \"[::1]:2182\"]\nchroot = \"/zookeeper/x\"\n[zookeeper.auth]\nscheme = \"sasl\"\n\
         [zookeeper.tls]\nenabled = true\nca_file = \"ca.pem\"\n",
    );
    let e = errs(&src);
    has(&e, "4:10", "/zookeeper is reserved by ZooKeeper");
    has(
        &e,
        "5:1",
        "[zookeeper.auth] is missing the required key `credentials_file`",
    );
    has(&e, "6:10", "only \"digest\"");
    has(
        &e,
        "7:1",
        "[zookeeper.tls] is missing the required key `cert_file`",
    );
    has(
        &e,
        "7:1",
        "[zookeeper.tls] is missing the required key `key_file`",
    );
    has(
        &e,
        "9:11",
        "`zookeeper.tls.ca_file` = \"ca.pem\": it must be an absolute path",
    );

    let src = MINIMAL.replace(
        "hosts = [\"zk1:2181\"]",
        "hosts = [\"zk1:2181\", \"[::1]:2182\"]\n[zookeeper.tls]\nenabled = true\nca_file = \"/ca\"\ncert_file = \"/c\"\nkey_file = \"/k\"\n",
    );
    let cfg = ok(&src);
    assert_eq!(
        cfg.zookeeper.connect_string(),
        "zk1:2181,[::1]:2182/nbd-failover"
    );
    assert_eq!(
        cfg.zookeeper.tls.as_ref().map(|t| t.key_file.clone()),
        Some(PathBuf::from("/k"))
    );
}

#[test]
fn node_id_rules() {
    let e = errs(&format!("[node]\nid = \"..\"\n{MINIMAL}"));
    has(&e, "2:6", "reserved ZooKeeper path components");
    let no_host =
        |src: &str| match parse_with_hostname(src, "t.toml", &|| Err("no such file".to_string())) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        };
    assert!(no_host(MINIMAL).starts_with(
        "t.toml:1:1: error: `node.id` is not set and the host name could not be read"
    ));
    // An explicit id needs no host name.
    let cfg = parse_with_hostname(
        &format!("[node]\nid = \"n1\"\n{MINIMAL}"),
        "t.toml",
        &|| Err("x".to_string()),
    );
    assert_eq!(cfg.map(|c| c.node.id).ok().as_deref(), Some("n1"));
}

#[test]
fn volume_names_and_empty_volumes() {
    let e = errs(&MINIMAL.replace("volumes.data", "volumes.Data"));
    has(&e, "5:10", "volume name \"Data\" is not valid");
    let e = errs("[zookeeper]\nhosts = [\"a:1\"]\n[volumes]\n");
    has(&e, "3:1", "[volumes] is empty");
}

#[test]
fn load_reports_unreadable_files_without_position() {
    let e = load(std::path::Path::new("/nonexistent/nbd-failover.toml")).expect_err("missing file");
    assert_eq!(e.len(), 1);
    let first = &e.errors()[0];
    assert_eq!((first.line(), first.column()), (0, 0));
    assert!(e
        .to_string()
        .starts_with("/nonexistent/nbd-failover.toml: error: cannot read the config file:"));
}

#[test]
fn nbd_volumes_without_the_device_watchdog_are_named_in_the_report() {
    let cfg = ok(&format!(
        "{MINIMAL}\n[watchdog]\nmode = \"systemd\"\ntimeout = \"8s\"\n"
    ));
    let r = report(&cfg);
    assert!(
        r.contains("volume data is on NBD and watchdog.mode = \"systemd\"")
            && r.contains("nbd.timeout + dead_conn_timeout = 40s"),
        "{r}"
    );
    let cfg = ok(&format!(
        "{MINIMAL}\n[watchdog]\nmode = \"device\"\ntimeout = \"8s\"\n"
    ));
    assert!(nbd_backstop_note(&cfg, &cfg.volumes[0]).is_none());
    assert!(!report(&cfg).contains("is on NBD"));
}
