//! `nbd-failover check-config` end to end: the real binary on the example and on broken configs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

const BIN: &str = env!("CARGO_BIN_EXE_nbd-failover");

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/nbd-failover.toml")
}

/// A scratch directory for this test process, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "nbd-failover-config-{}-{}-{test}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write config");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run nbd-failover")
}

fn check(path: &Path) -> Output {
    run(&["check-config", path.to_str().expect("utf-8 path")])
}

/// Runs check-config on `text`, expects exit 1, returns (file path, stderr lines).
fn rejected(test: &str, text: &str) -> (String, Vec<String>) {
    let scratch = Scratch::new(test);
    let path = scratch.write("nbd-failover.toml", text);
    let out = check(&path);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1 for {test}; stderr:\n{stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing on stdout on errors");
    let file = path.display().to_string();
    let lines: Vec<String> = stderr.lines().map(str::to_string).collect();
    let last = lines.last().cloned().unwrap_or_default();
    let n = lines.len() - 1;
    assert_eq!(
        last,
        format!("check-config: {n} error(s) in {file}"),
        "summary line:\n{stderr}"
    );
    (file, lines)
}

/// Asserts a line `FILE:LINE:COL: error: …` with the given line (and column) contains `needle`.
#[track_caller]
fn assert_error(file: &str, lines: &[String], pos: &str, needle: &str) {
    let prefix = format!("{file}:{pos}: error: ");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&prefix) && l.contains(needle)),
        "expected `{prefix}…{needle}…` in:\n{}",
        lines.join("\n")
    );
}

const GOOD: &str = r#"[node]
id = "agent-1"

[zookeeper]
hosts = ["127.0.0.1:2181"]
session_timeout = "10s"

[volumes.mysql]
backend = "nbd"
mount_path = "/srv/volumes/mysql"

[volumes.mysql.nbd]
server = "127.0.0.1:10809"
export = "mysql"

[volumes.mysql.task]
exec = ["/usr/sbin/mysqld"]
"#;

#[test]
fn example_config_is_accepted_with_a_report() {
    let out = check(&example());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for vol in ["mysql", "postgres", "uploads"] {
        assert!(
            stdout.contains(&format!("[volumes.{vol}]")),
            "effective config of {vol}:\n{stdout}"
        );
        assert!(
            stdout.contains(&format!(
                "volume {vol}: fencing budget (from last ZooKeeper contact)"
            )),
            "budget of {vol}:\n{stdout}"
        );
    }
    assert!(stdout.contains("  stop_grace      4s"), "{stdout}");
    assert!(
        stdout.contains("  total           10s   <= session timeout 10s (0s to spare)"),
        "{stdout}"
    );
    // Defaults are filled in.
    assert!(stdout.contains("connect_timeout = \"5s\""), "{stdout}");
    assert!(stdout.contains("dead_conn_timeout = \"10s\""), "{stdout}");
}

#[test]
fn json_output_has_each_volume_and_its_budget() {
    let out = run(&["check-config", example().to_str().expect("utf-8"), "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let vols = v["volumes"].as_array().expect("volumes array");
    assert_eq!(vols.len(), 3);
    assert_eq!(vols[0]["name"], "mysql");
    assert_eq!(vols[0]["fencing_budget"]["total"], "10s");
    assert_eq!(vols[0]["fencing_budget"]["limit"], "10s");
    assert_eq!(vols[0]["fencing_budget"]["fits"], true);
    assert_eq!(vols[2]["has_device"], false);
    assert_eq!(v["zookeeper"]["hosts"][0], "127.0.0.1:2181");
}

#[test]
fn a_good_minimal_config_is_accepted() {
    let scratch = Scratch::new("good");
    let out = check(&scratch.write("good.toml", GOOD));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn toml_syntax_error() {
    let text = GOOD.replace("export = \"mysql\"", "export = \"mysql");
    let (file, lines) = rejected("syntax", &text);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_error(&file, &lines, "14:16", "TOML syntax: invalid basic string");
}

#[test]
fn unknown_key() {
    let text = GOOD.replace(
        "export = \"mysql\"",
        "export = \"mysql\"\nexprot = \"mysql\"",
    );
    let (file, lines) = rejected("unknown", &text);
    assert_error(
        &file,
        &lines,
        "15:1",
        "unknown key `exprot` in [volumes.mysql.nbd] (did you mean `export`?)",
    );
}

#[test]
fn missing_required_field() {
    let text = GOOD.replace("hosts = [\"127.0.0.1:2181\"]\n", "");
    let (file, lines) = rejected("missing", &text);
    assert_error(
        &file,
        &lines,
        "4:1",
        "[zookeeper] is missing the required key `hosts`",
    );
}

#[test]
fn bad_duration() {
    let text = GOOD.replace(
        "session_timeout = \"10s\"",
        "session_timeout = \"10 parsecs\"",
    );
    let (file, lines) = rejected("duration", &text);
    assert_error(
        &file,
        &lines,
        "6:19",
        "`zookeeper.session_timeout` = \"10 parsecs\" is not a duration",
    );
}

#[test]
fn fencing_budget_violation() {
    let text = GOOD
        .replace(
            "session_timeout = \"10s\"",
            "session_timeout = \"9s\"\n\n[fencing]\nsuspend_grace = \"3s\"",
        )
        .replace(
            "mount_path = \"/srv/volumes/mysql\"",
            "mount_path = \"/srv/volumes/mysql\"\nstop_grace = \"5s\"",
        );
    let (file, lines) = rejected("budget", &text);
    assert_error(
        &file,
        &lines,
        "14:14",
        "volume \"mysql\": fencing budget: suspend_grace 3s + stop_grace 5s + unmount 2s + detach 1s + margin 1s \
         = 12s exceeds the ZooKeeper session timeout 9s: a partitioned holder could still be fencing when \
         another node wins the lease",
    );
}

#[test]
fn relative_mount_path() {
    let text = GOOD.replace("\"/srv/volumes/mysql\"", "\"srv/volumes/mysql\"");
    let (file, lines) = rejected("relative", &text);
    assert_error(
        &file,
        &lines,
        "10:14",
        "`volumes.mysql.mount_path` = \"srv/volumes/mysql\": it must be an absolute path",
    );
}

#[test]
fn duplicate_mount_path() {
    let text = format!(
        "{GOOD}\n[volumes.pg]\nbackend = \"image\"\nmount_path = \"/srv/volumes/mysql/\"\n\
         [volumes.pg.image]\npath = \"/shared/pg.img\"\n"
    );
    let (file, lines) = rejected("dup-mount", &text);
    assert_error(
        &file,
        &lines,
        "21:14",
        "mount_path \"/srv/volumes/mysql\" is also the mount_path of volume \"mysql\"",
    );
}

#[test]
fn backend_table_mismatch() {
    let text = GOOD.replace(
        "[volumes.mysql.nbd]",
        "[volumes.mysql.image]\npath = \"/x.img\"\n\n[volumes.mysql.nbd]",
    );
    let (file, lines) = rejected("mismatch-extra", &text);
    assert_error(
        &file,
        &lines,
        "12:1",
        "[volumes.mysql.image] does not belong on a volume with backend = \"nbd\"",
    );

    let text = GOOD.replace(
        "[volumes.mysql.nbd]\nserver = \"127.0.0.1:10809\"\nexport = \"mysql\"\n",
        "",
    );
    let (file, lines) = rejected("mismatch-missing", &text);
    assert_error(
        &file,
        &lines,
        "8:1",
        "backend = \"nbd\" needs a [volumes.mysql.nbd] table",
    );
}

#[test]
fn watchdog_timeout_too_long() {
    let text = format!("{GOOD}\n[watchdog]\nmode = \"systemd\"\ntimeout = \"10s\"\n");
    let (file, lines) = rejected("watchdog", &text);
    assert_error(
        &file,
        &lines,
        "21:11",
        "watchdog timeout 10s exceeds the ZooKeeper session timeout 10s minus margin 1s = 9s",
    );
}

#[test]
fn several_errors_are_all_reported() {
    let text = GOOD
        .replace("id = \"agent-1\"", "id = \"agent 1\"")
        .replace(
            "hosts = [\"127.0.0.1:2181\"]",
            "hosts = [\"127.0.0.1\"]\ncolour = \"red\"",
        )
        .replace(
            "backend = \"nbd\"",
            "backend = \"nbd\"\nfsck = \"sometimes\"",
        )
        .replace(
            "exec = [\"/usr/sbin/mysqld\"]",
            "exec = [\"mysqld\"]\nstop_grace = \"3 s\"",
        );
    let (file, lines) = rejected("several", &text);
    assert_eq!(
        lines.len(),
        7,
        "six errors and the summary:\n{}",
        lines.join("\n")
    );
    assert_error(&file, &lines, "2:6", "is not a valid node id");
    assert_error(&file, &lines, "5:10", "is not HOST:PORT");
    assert_error(&file, &lines, "6:1", "unknown key `colour` in [zookeeper]");
    assert_error(
        &file,
        &lines,
        "11:8",
        "`volumes.mysql.fsck` = \"sometimes\"",
    );
    assert_error(
        &file,
        &lines,
        "19:9",
        "`volumes.mysql.task.exec[0]` = \"mysqld\" must be an absolute path",
    );
    // stop_grace is not a task key: reported as unknown, not as a bad duration.
    assert_error(
        &file,
        &lines,
        "20:1",
        "unknown key `stop_grace` in [volumes.mysql.task]",
    );
    assert!(!lines.iter().any(|l| l.contains("3 s")), "{lines:?}");
}

#[test]
fn missing_file_is_a_clear_error() {
    let scratch = Scratch::new("missing-file");
    let path = scratch.0.join("nope.toml");
    let out = check(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    let file = path.display().to_string();
    assert!(
        stderr.starts_with(&format!("{file}: error: cannot read the config file: ")),
        "{stderr}"
    );
    assert!(
        stderr.ends_with(&format!("check-config: 1 error(s) in {file}\n")),
        "{stderr}"
    );
}

#[test]
fn help_says_what_is_checked() {
    let out = run(&["check-config", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "fencing budget",
        "session_timeout",
        "watchdog.timeout",
        "FILE:LINE:COLUMN",
        "--json",
    ] {
        assert!(help.contains(needle), "help lacks {needle:?}:\n{help}");
    }
}
