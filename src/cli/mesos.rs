//! The Mesos command-module contract: `COMMAND INPUT_FILE OUTPUT_FILE` for the isolator's prepare and cleanup and the remove-executor hook, as subcommands and as symlinks named after them.
//!
//! The command modules (criteo/mesos-command-modules) exec the configured
//! command with two file names and nothing else. Input is Mesos' protobuf
//! JSON mapping:
//! - prepare: `{"container_id": ContainerID, "container_config": ContainerConfig}`;
//!   the output file gets a `ContainerLaunchInfo` (empty: nothing to add);
//! - cleanup: `{"container_id": ContainerID}`;
//! - remove-executor: `{"framework_info": FrameworkInfo, "executor_info": ExecutorInfo}`.
//!
//! Prepare asks the local daemon to acquire the container's volumes (holder
//! `container:<id>`, idempotent per container, reference-counted with dvdcli
//! users); a failure exits non-zero and leaves a non-JSON output so the
//! module fails the launch for either reason. Cleanup and remove-executor
//! drop that container's references; an unknown container is a logged no-op.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::config::Config;
use crate::control::{self, Request, Response};

use super::{code, load_config, DEFAULT_CONFIG};

/// Symlink names dispatched to the hooks.
pub(crate) const PREPARE_NAME: &str = "nbd-failover-mesos-prepare";
/// See [`PREPARE_NAME`].
pub(crate) const CLEANUP_NAME: &str = "nbd-failover-mesos-cleanup";
/// See [`PREPARE_NAME`].
pub(crate) const REMOVE_EXECUTOR_NAME: &str = "nbd-failover-mesos-remove-executor";

/// Environment variable naming a task's volumes (when not in a label).
pub(crate) const VOLUME_ENV: &str = "NBD_FAILOVER_VOLUMES";

pub(crate) const MESOS_HELP: &str = "\
Entry points for the Mesos agent's command modules (criteo/mesos-command-modules):
each is run as COMMAND INPUT_FILE OUTPUT_FILE, with Mesos' protobuf JSON in
INPUT_FILE. Point the module parameters at the symlinks the package installs:

  isolator_prepare_command                 /usr/lib/nbd-failover/bin/nbd-failover-mesos-prepare
  isolator_cleanup_command                 /usr/lib/nbd-failover/bin/nbd-failover-mesos-cleanup
  hook_slave_remove_executor_hook_command  /usr/lib/nbd-failover/bin/nbd-failover-mesos-remove-executor

(docs/mesos.md has the complete modules JSON and the agent flags).

prepare: the container's volumes are named by the task label mesos.label_key
(default nbd-failover.volume; several comma-separated) or, failing that, by
the environment variable NBD_FAILOVER_VOLUMES of the task's command. Each must
be an on-demand volume of the local daemon. prepare acquires them for the
container (waiting at most mesos.acquire_wait for the lease; keep it below the
module's isolator_prepare_timeout) and writes a ContainerLaunchInfo giving the
task NBD_FAILOVER_VOLUMES and, per volume V (upper-cased, '-' and '.' as '_'),
NBD_FAILOVER_MOUNT_V and NBD_FAILOVER_GENERATION_V; with one volume also
NBD_FAILOVER_VOLUME, NBD_FAILOVER_MOUNT and NBD_FAILOVER_GENERATION. A
container without volumes gets an empty output. On failure the reason goes to
stderr, the exit status is non-zero and the output is not JSON, so the module
fails the launch; volumes acquired for it are released again.

cleanup / remove-executor: drop the container's (executor's) references; the
last reference on a volume unmounts, detaches and releases it cleanly. An
unknown container is a no-op.

The config file is $NBD_FAILOVER_CONFIG or /etc/nbd-failover/nbd-failover.toml.";

/// `mesos` arguments.
#[derive(Args, Debug)]
pub(crate) struct MesosArgs {
    #[command(subcommand)]
    hook: Hook,
    /// The daemon's config file.
    #[arg(long, env = "NBD_FAILOVER_CONFIG", default_value = DEFAULT_CONFIG, global = true)]
    config: PathBuf,
}

#[derive(Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Prepare,
    Cleanup,
    RemoveExecutor,
}

#[derive(Subcommand, Debug)]
enum Hook {
    /// Isolator prepare: acquire the container's volumes, write a ContainerLaunchInfo.
    Prepare {
        /// {"container_id": …, "container_config": …}
        input: PathBuf,
        /// Where the ContainerLaunchInfo goes.
        output: PathBuf,
    },
    /// Isolator cleanup: release the container's volumes.
    Cleanup {
        /// {"container_id": …}
        input: PathBuf,
        /// Left empty.
        output: PathBuf,
    },
    /// Remove-executor hook: release the executor's container's volumes.
    RemoveExecutor {
        /// {"framework_info": …, "executor_info": …}
        input: PathBuf,
        /// Left empty.
        output: PathBuf,
    },
}

/// Entry point for the symlinks (`argv[0]` names the hook); `None` if `name` is not one.
pub(crate) fn main_as(name: &str) -> Option<i32> {
    let which = match name {
        PREPARE_NAME => Which::Prepare,
        CLEANUP_NAME => Which::Cleanup,
        REMOVE_EXECUTOR_NAME => Which::RemoveExecutor,
        _ => return None,
    };
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if args.len() != 2 {
        eprintln!(
            "{name}: usage: {name} INPUT_FILE OUTPUT_FILE (as the Mesos command modules run it)"
        );
        return Some(code::USAGE);
    }
    let config = std::env::var_os("NBD_FAILOVER_CONFIG")
        .map_or_else(|| PathBuf::from(DEFAULT_CONFIG), PathBuf::from);
    Some(run_hook(which, &config, &args[0], &args[1]))
}

/// Runs `nbd-failover mesos …`.
pub(crate) fn run(a: MesosArgs) -> i32 {
    let (which, input, output) = match &a.hook {
        Hook::Prepare { input, output } => (Which::Prepare, input, output),
        Hook::Cleanup { input, output } => (Which::Cleanup, input, output),
        Hook::RemoveExecutor { input, output } => (Which::RemoveExecutor, input, output),
    };
    run_hook(which, &a.config, input, output)
}

fn name(which: Which) -> &'static str {
    match which {
        Which::Prepare => "prepare",
        Which::Cleanup => "cleanup",
        Which::RemoveExecutor => "remove-executor",
    }
}

/// A failure: the reason on stderr, a non-JSON output, the exit status.
fn fail(which: Which, output: &Path, status: i32, reason: &str) -> i32 {
    eprintln!("nbd-failover mesos {}: {reason}", name(which));
    if which == Which::Prepare {
        // Not a ContainerLaunchInfo: the module fails the launch on this too.
        let _ = std::fs::write(output, format!("nbd-failover: prepare failed: {reason}\n"));
    }
    status
}

fn run_hook(which: Which, config: &Path, input: &Path, output: &Path) -> i32 {
    let text = match std::fs::read_to_string(input) {
        Ok(t) => t,
        Err(e) => {
            return fail(
                which,
                output,
                code::USAGE,
                &format!("cannot read the input file {}: {e}", input.display()),
            )
        }
    };
    let v: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            return fail(
                which,
                output,
                code::USAGE,
                &format!("the input file {} is not JSON: {e}", input.display()),
            )
        }
    };
    let cfg = match load_config(config, "nbd-failover mesos") {
        Ok(c) => c,
        Err(c) => return fail(which, output, c, "the config is invalid (errors above)"),
    };
    match which {
        Which::Prepare => prepare(&cfg, &v, output),
        Which::Cleanup => {
            let Some(cid) = container_id(&v) else {
                return fail(
                    which,
                    output,
                    code::USAGE,
                    "the input has no container_id.value",
                );
            };
            release(&cfg, which, output, &format!("container:{cid}"))
        }
        Which::RemoveExecutor => {
            let Some(key) = executor_key(&v["executor_info"], &v["framework_info"]) else {
                return fail(
                    which,
                    output,
                    code::USAGE,
                    "the input has no executor_info.executor_id.value",
                );
            };
            release(&cfg, which, output, &key)
        }
    }
}

fn container_id(v: &Value) -> Option<String> {
    v["container_id"]["value"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// `executor:<framework>/<executor>` (the alias prepare records for the remove-executor hook).
fn executor_key(executor: &Value, framework: &Value) -> Option<String> {
    let ex = executor["executor_id"]["value"].as_str()?;
    let fw = executor["framework_id"]["value"]
        .as_str()
        .or_else(|| framework["id"]["value"].as_str())
        .unwrap_or("-");
    Some(format!("executor:{fw}/{ex}"))
}

/// The volumes a container asks for: the label, else the command environment.
pub(crate) fn volumes_of(config: &Value, label_key: &str) -> Vec<String> {
    let from_labels = |info: &Value| -> Option<String> {
        info["labels"]["labels"]
            .as_array()?
            .iter()
            .find(|l| l["key"] == label_key)
            .and_then(|l| l["value"].as_str().map(str::to_string))
    };
    let from_env = |cmd: &Value| -> Option<String> {
        cmd["environment"]["variables"]
            .as_array()?
            .iter()
            .find(|e| e["name"] == VOLUME_ENV)
            .and_then(|e| e["value"].as_str().map(str::to_string))
    };
    let spec = from_labels(&config["task_info"])
        .or_else(|| from_labels(&config["executor_info"]))
        .or_else(|| from_env(&config["task_info"]["command"]))
        .or_else(|| from_env(&config["command_info"]))
        .or_else(|| from_env(&config["executor_info"]["command"]))
        .unwrap_or_default();
    let mut out: Vec<String> = Vec::new();
    for v in spec.split(',').map(str::trim).filter(|v| !v.is_empty()) {
        if !out.iter().any(|x| x == v) {
            out.push(v.to_string());
        }
    }
    out
}

/// `NBD_FAILOVER_MOUNT_<V>`: upper-cased, anything but A-Z0-9 as `_`.
pub(crate) fn env_suffix(volume: &str) -> String {
    volume
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn prepare(cfg: &Config, v: &Value, output: &Path) -> i32 {
    let which = Which::Prepare;
    let Some(cid) = container_id(v) else {
        return fail(
            which,
            output,
            code::USAGE,
            "the input has no container_id.value",
        );
    };
    if !v["container_config"].is_object() {
        return fail(
            which,
            output,
            code::USAGE,
            "the input has no container_config object",
        );
    }
    let config = &v["container_config"];
    let volumes = volumes_of(config, &cfg.mesos.label_key);
    if volumes.is_empty() {
        eprintln!(
            "nbd-failover mesos prepare: container {cid} names no volume (label {} or {VOLUME_ENV}): nothing to do",
            cfg.mesos.label_key
        );
        return match std::fs::write(output, b"") {
            Ok(()) => code::OK,
            Err(e) => {
                eprintln!(
                    "nbd-failover mesos prepare: writing {}: {e}",
                    output.display()
                );
                code::ERROR
            }
        };
    }
    let holder = format!("container:{cid}");
    let alias = executor_key(&config["executor_info"], &Value::Null);
    let deadline = Instant::now() + cfg.mesos.acquire_wait;
    let mut got: Vec<(String, String, u64)> = Vec::new();
    for vol in &volumes {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = control::call(
            &cfg.control.socket,
            Request::Acquire {
                volume: vol.clone(),
                holder: holder.clone(),
                counted: false,
                wait_ms: left.as_millis() as u64,
                alias: alias.clone(),
            },
            left + Duration::from_secs(5),
        );
        let failure = match r {
            Ok(Response::Acquired {
                mount_path,
                generation,
                ..
            }) => {
                eprintln!(
                    "nbd-failover mesos prepare: {vol} mounted at {mount_path} (generation {generation}) for container {cid}"
                );
                got.push((vol.clone(), mount_path, generation));
                continue;
            }
            Ok(Response::Error { kind, message }) => (kind.exit_code(), message),
            Ok(other) => (code::ERROR, format!("unexpected answer: {other:?}")),
            Err(e) => (code::UNAVAILABLE, e.to_string()),
        };
        // Release what this container got so far: nothing stays half-acquired.
        for (done, _, _) in &got {
            let _ = control::call(
                &cfg.control.socket,
                Request::Unacquire {
                    volume: Some(done.clone()),
                    holder: holder.clone(),
                    wait_ms: 60_000,
                },
                Duration::from_secs(65),
            );
        }
        return fail(
            which,
            output,
            failure.0,
            &format!("volume {vol} for container {cid}: {}", failure.1),
        );
    }
    let mut vars = vec![json!({"name": VOLUME_ENV, "value": volumes.join(",")})];
    for (vol, mount, generation) in &got {
        let s = env_suffix(vol);
        vars.push(json!({"name": format!("NBD_FAILOVER_MOUNT_{s}"), "value": mount}));
        vars.push(json!({"name": format!("NBD_FAILOVER_GENERATION_{s}"), "value": generation.to_string()}));
    }
    if let [(vol, mount, generation)] = got.as_slice() {
        vars.push(json!({"name": "NBD_FAILOVER_VOLUME", "value": vol}));
        vars.push(json!({"name": "NBD_FAILOVER_MOUNT", "value": mount}));
        vars.push(json!({"name": "NBD_FAILOVER_GENERATION", "value": generation.to_string()}));
    }
    let info = json!({"environment": {"variables": vars}});
    match std::fs::write(output, format!("{info:#}\n")) {
        Ok(()) => code::OK,
        Err(e) => fail(
            which,
            output,
            code::ERROR,
            &format!("writing {}: {e}", output.display()),
        ),
    }
}

fn release(cfg: &Config, which: Which, output: &Path, holder: &str) -> i32 {
    let _ = std::fs::write(output, b"");
    let r = control::call(
        &cfg.control.socket,
        Request::Unacquire {
            volume: None,
            holder: holder.to_string(),
            wait_ms: 90_000,
        },
        Duration::from_secs(95),
    );
    match r {
        Ok(Response::Ok { message }) => {
            eprintln!("nbd-failover mesos {}: {message}", name(which));
            code::OK
        }
        Ok(Response::Error { kind, message }) => fail(which, output, kind.exit_code(), &message),
        Ok(other) => fail(
            which,
            output,
            code::ERROR,
            &format!("unexpected answer: {other:?}"),
        ),
        Err(e) => fail(which, output, code::UNAVAILABLE, &e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_come_from_the_label_then_the_environment() {
        let c = json!({"task_info": {"labels": {"labels": [
            {"key": "other", "value": "x"},
            {"key": "nbd-failover.volume", "value": " db , web,db "}]},
            "command": {"environment": {"variables": [{"name": VOLUME_ENV, "value": "ignored"}]}}}});
        assert_eq!(volumes_of(&c, "nbd-failover.volume"), vec!["db", "web"]);
        let c = json!({"task_info": {"command": {"environment": {"variables": [
            {"name": "PATH", "value": "/bin"}, {"name": VOLUME_ENV, "value": "logs"}]}}}});
        assert_eq!(volumes_of(&c, "nbd-failover.volume"), vec!["logs"]);
        assert!(volumes_of(&json!({}), "nbd-failover.volume").is_empty());
        assert_eq!(env_suffix("my-db.v2"), "MY_DB_V2");
    }
}
