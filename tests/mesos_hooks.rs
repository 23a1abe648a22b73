//! The Mesos command-module contract against running daemons: prepare, cleanup and remove-executor with JSON fixtures in Mesos' protobuf-JSON shape (tests/fixtures/mesos), called through the symlinks as the modules call them.
//!
//! Real ZooKeeper, real daemons, `image` volumes. Needs root; fails loudly.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::lab::*;

const PREPARE: &str = "nbd-failover-mesos-prepare";
const CLEANUP: &str = "nbd-failover-mesos-cleanup";
const REMOVE_EXECUTOR: &str = "nbd-failover-mesos-remove-executor";

const C1: &str = "6f1e4c2a-5b7d-4e8f-9a0b-1c2d3e4f5a6b";
const C2: &str = "0a9b8c7d-6e5f-4a3b-8c1d-0e9f8a7b6c5d";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mesos")
        .join(name)
}

/// The hook symlinks, as the package installs them.
fn links(lab: &Lab) -> PathBuf {
    let dir = lab.dir.path().join("bin");
    if !dir.exists() {
        fs::create_dir_all(&dir).expect("bin dir");
        for l in [PREPARE, CLEANUP, REMOVE_EXECUTOR, "dvdcli"] {
            std::os::unix::fs::symlink(BIN, dir.join(l)).expect("symlink");
        }
    }
    dir
}

/// Runs a hook as the module does: `COMMAND INPUT OUTPUT`, nothing else.
fn hook(lab: &Lab, n: &Node, cmd: &str, input: &str) -> (Output, String) {
    let out = n.dir.join(format!("out-{cmd}-{input}"));
    let _ = fs::remove_file(&out);
    let o = Command::new(links(lab).join(cmd))
        .arg(fixture(input))
        .arg(&out)
        .env("NBD_FAILOVER_CONFIG", n.cfg())
        .output()
        .expect("hook");
    let written = fs::read_to_string(&out).unwrap_or_else(|_| "<no output file>".to_string());
    (o, written)
}

fn env_of(launch_info: &str) -> Vec<(String, String)> {
    let v: Value = serde_json::from_str(launch_info).expect("ContainerLaunchInfo JSON");
    v["environment"]["variables"]
        .as_array()
        .expect("variables")
        .iter()
        .map(|e| {
            (
                e["name"].as_str().expect("name").to_string(),
                e["value"].as_str().expect("value").to_string(),
            )
        })
        .collect()
}

fn get<'a>(env: &'a [(String, String)], k: &str) -> &'a str {
    env.iter()
        .find(|(n, _)| n == k)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {k} in {env:?}"))
}

fn refs(n: &Node) -> Value {
    n.volume("web")["references"].clone()
}

#[test]
fn prepare_cleanup_and_remove_executor_with_fixtures() {
    let lab = Lab::new("mh");
    let mut a = lab.node("a", "");
    a.start();
    a.wait_socket();

    // A labelled task: acquired, mounted, the mount and generation in the launch info.
    let (o, out) = hook(&lab, &a, PREPARE, "prepare-labelled.json");
    assert!(o.status.success(), "{}", text(&o));
    let env = env_of(&out);
    assert_eq!(
        get(&env, "NBD_FAILOVER_MOUNT"),
        a.mnt("web").display().to_string()
    );
    assert_eq!(
        get(&env, "NBD_FAILOVER_MOUNT_WEB"),
        a.mnt("web").display().to_string()
    );
    assert_eq!(get(&env, "NBD_FAILOVER_VOLUMES"), "web");
    let generation = a.volume("web")["generation"].as_u64().expect("generation");
    assert_eq!(get(&env, "NBD_FAILOVER_GENERATION"), generation.to_string());
    assert!(mounted(&a.mnt("web")));
    assert_eq!(
        refs(&a),
        serde_json::json!({ format!("container:{C1}"): 1 })
    );

    // Idempotent per container id.
    let (o, out2) = hook(&lab, &a, PREPARE, "prepare-labelled.json");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(env_of(&out2), env);
    assert_eq!(
        refs(&a),
        serde_json::json!({ format!("container:{C1}"): 1 })
    );

    // A second container naming the volume in its command environment shares it.
    let (o, out) = hook(&lab, &a, PREPARE, "prepare-second-container.json");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        get(&env_of(&out), "NBD_FAILOVER_GENERATION"),
        generation.to_string()
    );
    assert_eq!(
        refs(&a),
        serde_json::json!({ format!("container:{C1}"): 1, format!("container:{C2}"): 1 })
    );

    // No label: empty output, no action.
    let (o, out) = hook(&lab, &a, PREPARE, "prepare-unlabelled.json");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(out, "");
    assert!(String::from_utf8_lossy(&o.stderr).contains("nothing to do"));

    // Malformed input and an unknown volume: non-zero, the reason, an output the module rejects.
    for (input, status, why) in [
        ("prepare-malformed.json", 2, "not JSON"),
        ("prepare-unknown-volume.json", 3, "no-such-volume"),
    ] {
        let (o, out) = hook(&lab, &a, PREPARE, input);
        assert_eq!(o.status.code(), Some(status), "{input}: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(why),
            "{input}: {}",
            text(&o)
        );
        assert!(
            serde_json::from_str::<Value>(&out).is_err(),
            "{input}: output {out:?} must not parse"
        );
    }
    assert_eq!(
        refs(&a).as_object().map(|m| m.len()),
        Some(2),
        "failures took no reference"
    );

    // Daemon crash with containers using the volume: references are on disk,
    // the restarted daemon fences its leftovers and acquires the volume again.
    a.kill9();
    a.start();
    a.wait_socket();
    a.wait(
        "web re-acquired after the restart",
        Duration::from_secs(40),
        |a| a.phase("web") == "running",
    );
    assert_eq!(refs(&a).as_object().map(|m| m.len()), Some(2));
    assert!(mounted(&a.mnt("web")));

    // Cleanup of one container keeps the volume for the other.
    let (o, out) = hook(&lab, &a, CLEANUP, "cleanup-labelled.json");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(out, "");
    assert!(mounted(&a.mnt("web")));
    assert_eq!(
        refs(&a),
        serde_json::json!({ format!("container:{C2}"): 1 })
    );
    // The remove-executor hook of the second one's executor releases the volume.
    let (o, _) = hook(&lab, &a, REMOVE_EXECUTOR, "remove-executor-second.json");
    assert!(o.status.success(), "{}", text(&o));
    assert!(!mounted(&a.mnt("web")));
    assert!(!loop_attached(&lab.dir.path().join("web.img")));
    assert_eq!(a.phase("web"), "out");
    assert!(lab.holder(&a, "web").is_null(), "released");
    // An unknown container: a logged no-op.
    let (o, out) = hook(&lab, &a, CLEANUP, "cleanup-unknown.json");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(out, "");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("nothing to do"),
        "{}",
        text(&o)
    );
    // The same through the subcommand.
    let o = Command::new(BIN)
        .args(["mesos", "cleanup"])
        .arg(fixture("cleanup-unknown.json"))
        .arg(a.dir.join("out-sub"))
        .env("NBD_FAILOVER_CONFIG", a.cfg())
        .output()
        .expect("mesos cleanup");
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn prepare_fails_in_time_when_the_lease_is_held_elsewhere_and_a_killed_prepare_leaves_nothing() {
    let lab = Lab::new("mx");
    let mut b = lab.node("b", "");
    let mut c = lab.node("c", "\n[mesos]\nacquire_wait = \"3s\"\n");
    let mut a = lab.node("a", "");
    for n in [&mut b, &mut c, &mut a] {
        n.start();
    }
    for n in [&b, &c, &a] {
        n.wait_socket();
    }
    // b holds web for a dvdcli user.
    let o = Command::new(links(&lab).join("dvdcli"))
        .args(["mount", "--volumedriver=nbd-failover", "--volumename=web"])
        .env("NBD_FAILOVER_CONFIG", b.cfg())
        .output()
        .expect("dvdcli");
    assert!(o.status.success(), "{}", text(&o));

    // c waits at most its acquire_wait (3 s), then fails the launch naming the holder.
    let t0 = Instant::now();
    let (o, out) = hook(&lab, &c, PREPARE, "prepare-labelled.json");
    let took = t0.elapsed();
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("mx-b"),
        "{}",
        text(&o)
    );
    assert!(serde_json::from_str::<Value>(&out).is_err());
    assert!(took < Duration::from_secs(10), "took {took:?}");
    c.wait(
        "c out again with no reference",
        Duration::from_secs(10),
        |c| c.phase("web") == "out" && refs(c) == serde_json::json!({}),
    );

    // a's prepare (60 s wait) is killed by SIGTERM mid-wait, as the module does on its timeout.
    let out = a.dir.join("out-killed");
    let mut p = Command::new(links(&lab).join(PREPARE))
        .arg(fixture("prepare-labelled.json"))
        .arg(&out)
        .env("NBD_FAILOVER_CONFIG", a.cfg())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prepare");
    a.wait(
        "a queued for web with the container's reference",
        Duration::from_secs(20),
        |a| {
            a.phase("web") == "contending"
                && refs(a) == serde_json::json!({ format!("container:{C1}"): 1 })
        },
    );
    let contenders = |n: &Node| -> Vec<String> {
        let o = n.cli(&["status", "--cluster", "--json"]);
        let j: Value = serde_json::from_slice(&o.stdout).expect("json");
        j["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == "web")
            .expect("web")["contenders"]
            .as_array()
            .expect("contenders")
            .iter()
            .map(|c| c["node"].as_str().unwrap_or("?").to_string())
            .collect()
    };
    assert!(contenders(&a).contains(&"mx-a".to_string()));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(p.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let st = p.wait().expect("wait");
    assert!(!st.success());
    a.wait(
        "a's reference taken back and its queue entry gone",
        Duration::from_secs(10),
        |a| a.phase("web") == "out" && refs(a) == serde_json::json!({}),
    );
    assert!(!contenders(&a).contains(&"mx-a".to_string()));
    assert!(
        a.log().contains("the client went away while waiting"),
        "{}",
        a.log_tail()
    );
    // b still holds it, untouched.
    assert_eq!(b.phase("web"), "running");
    assert!(mounted(&b.mnt("web")));
}
