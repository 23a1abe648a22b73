//! Operator subcommands: status (local and --cluster), release, drain, resume, force-detach and break-lock.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::config::Config;
use crate::control::{self, ClientError, Request, Response, StatusReport, VolumeReport};
use crate::lease::{LeaseAdmin, LeaseConfig};

use super::{code, load_config, runtime, Target};

pub(crate) const STATUS_HELP: &str = "\
Show this node's volumes as its daemon sees them: the phase (running,
contending, suspended, fencing, out, …), the lease generation held, since when,
references (on-demand volumes), the fence deadline while suspended, and the
last decision's reason; above them the ZooKeeper session state and the age of
the last answered request.

With --cluster, read every configured volume's lock queue from ZooKeeper
instead (no daemon needed): the holder (node, host, pid, generation, since)
and the contenders waiting behind it, and whether the last holder released
cleanly.

  nbd-failover status
  nbd-failover status --cluster --json | jq '.volumes[] | {name, holder}'

Exit status: 0; 6 when the daemon does not answer (local status); 1 when
ZooKeeper cannot be read (--cluster).";

pub(crate) const RELEASE_HELP: &str = "\
Hand a volume over gracefully: the daemon stops the task (SIGTERM, SIGKILL
after stop_grace), unmounts, detaches and releases the lease with a
clean-release record, so the next holder starts without waiting out the
lock-delay. This node then contends again (it queues behind the others).
Waits until the fence has finished (--wait) and prints the outcome.

Use `drain` to keep this node out afterwards.";

pub(crate) const DRAIN_HELP: &str = "\
Like `release`, but this node stays out of the volume's lock queue until
`nbd-failover resume`. `drain --all` before node maintenance hands every
volume over cleanly; the drained state lasts until resume or a daemon
restart.";

pub(crate) const FORCE_DETACH_HELP: &str = "\
Take a volume off this node NOW: SIGKILL the task's process group, unmount
(the holders of a busy mount are killed; a lazy unmount only as the last
resort), disconnect the NBD or loop device, and stay out until `resume`.
The lease is released unclean, so the next holder waits out the lock-delay.

It works in both situations an operator meets:
  - the daemon is alive: it is asked to do it (its fence, its bookkeeping);
  - the daemon is dead or wedged (no answer within --daemon-timeout): the CLI
    finds what is attached, mounted and running for the volume on this node
    and runs the same fence itself, then deletes this node's lock node in
    ZooKeeper so the next holder need not wait for the session to expire.

Every step taken is printed. Without --yes it refuses while the task still
runs (exit 7): killing a database is a decision.";

pub(crate) const BREAK_LOCK_HELP: &str = "\
Delete the current holder's lock node of a volume in ZooKeeper, with the
admin identity ([zookeeper.auth] admin_credentials_file).

RISK: the lease is the only thing that keeps two nodes from writing the same
volume. If the holder is alive it sees its lease vanish and fences at once,
but a holder that is partitioned, frozen or whose daemon is wedged may still
have the device attached and the task writing while the next contender (after
the lock-delay) attaches it too. Break a lock only when you KNOW the holder
is dead: powered off, or its node fenced by other means (the device
disconnected at the NBD server, the machine reset). Prefer `force-detach` on
the holder itself, or simply waiting: a dead holder's session expires after
the session timeout and the lock goes with it.

--yes is required. The holder removed is printed.";

fn socket_of(target: &Target) -> Result<(PathBuf, Option<Config>), i32> {
    match (&target.socket, load_config(&target.config, "nbd-failover")) {
        (Some(s), Ok(cfg)) => Ok((s.clone(), Some(cfg))),
        (Some(s), Err(_)) => Ok((s.clone(), None)),
        (None, Ok(cfg)) => Ok((cfg.control.socket.clone(), Some(cfg))),
        (None, Err(c)) => Err(c),
    }
}

fn client_code(e: &ClientError) -> i32 {
    match e {
        ClientError::NotRunning(_) | ClientError::Timeout(..) => code::UNAVAILABLE,
        _ => code::ERROR,
    }
}

/// Sends a request; prints errors; returns the response or the exit code.
fn ask(socket: &std::path::Path, req: Request, timeout: Duration) -> Result<Response, i32> {
    match control::call(socket, req, timeout) {
        Ok(Response::Error { kind, message }) => {
            eprintln!("error: {message}");
            Err(kind.exit_code())
        }
        Ok(r) => Ok(r),
        Err(e) => {
            eprintln!("error: {e}");
            Err(client_code(&e))
        }
    }
}

fn fetch_status(socket: &std::path::Path) -> Result<StatusReport, i32> {
    match ask(socket, Request::Status, Duration::from_secs(10))? {
        Response::Status(s) => Ok(s),
        other => {
            eprintln!("error: unexpected answer to status: {other:?}");
            Err(code::ERROR)
        }
    }
}

fn fmt_time(ms: u64) -> String {
    if ms == 0 {
        return "-".to_string();
    }
    let t = UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn fmt_age(ms: u64) -> String {
    if ms < 10_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
    }
}

/// `status`.
pub(crate) fn status(target: &Target, cluster: bool, json: bool) -> i32 {
    if cluster {
        return cluster_status(target, json);
    }
    let (socket, _) = match socket_of(target) {
        Ok(s) => s,
        Err(c) => return c,
    };
    let s = match fetch_status(&socket) {
        Ok(s) => s,
        Err(c) => return c,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
        return code::OK;
    }
    print!("{}", render_status(&s));
    code::OK
}

/// The human table for `status`.
pub(crate) fn render_status(s: &StatusReport) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let contact = s
        .last_contact_age_ms
        .map_or("never".to_string(), |a| format!("{} ago", fmt_age(a)));
    let _ = writeln!(
        o,
        "node {} (daemon pid {}, v{}): ZooKeeper {}, last contact {contact}, session timeout {}",
        s.node,
        s.pid,
        s.version,
        s.session_state,
        fmt_age(s.session_timeout_ms)
    );
    let rows: Vec<[String; 7]> = s
        .volumes
        .iter()
        .map(|v: &VolumeReport| {
            let refs: u32 = v.references.values().sum();
            [
                v.name.clone(),
                v.phase.clone(),
                v.generation.map_or("-".to_string(), |g| format!("{g:#x}")),
                fmt_time(v.since_ms),
                if v.activation == "on-demand" {
                    refs.to_string()
                } else {
                    "-".to_string()
                },
                v.fence_deadline_in_ms.map_or("-".to_string(), |d| {
                    if d >= 0 {
                        format!("in {}", fmt_age(d as u64))
                    } else {
                        format!("{} OVERDUE", fmt_age((-d) as u64))
                    }
                }),
                v.last_reason.clone(),
            ]
        })
        .collect();
    let header = [
        "VOLUME",
        "STATE",
        "GENERATION",
        "SINCE",
        "REFS",
        "FENCE-DEADLINE",
        "LAST DECISION",
    ];
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate().take(6) {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i < 6 {
                let _ = write!(l, "{c:<w$}  ", w = widths[i]);
            } else {
                l.push_str(c);
            }
        }
        l.trim_end().to_string()
    };
    let _ = writeln!(o, "{}", line(header.to_vec()));
    for r in &rows {
        let _ = writeln!(o, "{}", line(r.iter().map(String::as_str).collect()));
    }
    if rows.is_empty() {
        let _ = writeln!(o, "(no volumes configured)");
    }
    o
}

fn cluster_status(target: &Target, json: bool) -> i32 {
    let cfg = match load_config(&target.config, "status --cluster") {
        Ok(c) => c,
        Err(c) => return c,
    };
    let rt = match runtime() {
        Ok(r) => r,
        Err(c) => return c,
    };
    let result = rt.block_on(async {
        let lease_cfg = LeaseConfig::from_config(&cfg)?;
        let admin = tokio::time::timeout(
            cfg.zookeeper.connect_timeout + Duration::from_secs(1),
            LeaseAdmin::connect(&lease_cfg),
        )
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "ZooKeeper ({}) did not answer within {}s",
                cfg.zookeeper.connect_string(),
                cfg.zookeeper.connect_timeout.as_secs()
            )
        })??;
        let mut out = Vec::new();
        for v in &cfg.volumes {
            out.push(admin.status(&v.name).await?);
        }
        anyhow::Ok(out)
    });
    let statuses = match result {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: reading the leases from ZooKeeper: {e:#}");
            return code::ERROR;
        }
    };
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let vols: Vec<serde_json::Value> = statuses
        .iter()
        .map(|st| {
            let mut q = st.queue.iter();
            let holder = q.next().map(|e| match &e.owner {
                Ok(o) => json!({"node": o.node_id, "host": o.host, "pid": o.pid, "generation": e.czxid, "lock_node": e.name,
                    "since_ms": st.last_winner.as_ref().and_then(|w| w.as_ref().ok()).filter(|w| w.generation == e.czxid).map(|w| w.acquired_at_ms)}),
                Err(err) => json!({"lock_node": e.name, "generation": e.czxid, "error": err.to_string()}),
            });
            let contenders: Vec<serde_json::Value> = q
                .map(|e| match &e.owner {
                    Ok(o) => json!({"node": o.node_id, "host": o.host, "pid": o.pid, "lock_node": e.name}),
                    Err(err) => json!({"lock_node": e.name, "error": err.to_string()}),
                })
                .collect();
            let last = st.last_winner.as_ref().and_then(|w| w.as_ref().ok());
            json!({
                "name": st.volume,
                "holder": holder,
                "contenders": contenders,
                "last_winner": last.map(|w| json!({"node": w.node_id, "generation": w.generation, "acquired_at_ms": w.acquired_at_ms})),
                "last_winner_released_cleanly": st.last_winner_released_cleanly,
            })
        })
        .collect();
    if json {
        let v = json!({"zookeeper": cfg.zookeeper.connect_string(), "read_at_ms": now_ms, "volumes": vols});
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return code::OK;
    }
    println!("ZooKeeper {}:", cfg.zookeeper.connect_string());
    println!(
        "{:<16} {:<24} {:<20} {:<22} CONTENDERS",
        "VOLUME", "HOLDER", "GENERATION", "SINCE"
    );
    for v in &vols {
        let holder = &v["holder"];
        let (h, g, since) = if holder.is_null() {
            let last = match (&v["last_winner"], &v["last_winner_released_cleanly"]) {
                (w, clean) if !w.is_null() => format!(
                    "(none; last {} {})",
                    w["node"].as_str().unwrap_or("?"),
                    if clean.as_bool() == Some(true) {
                        "released cleanly"
                    } else {
                        "ended unclean"
                    }
                ),
                _ => "(none)".to_string(),
            };
            (last, "-".to_string(), "-".to_string())
        } else {
            (
                format!(
                    "{}@{}",
                    holder["node"].as_str().unwrap_or("?"),
                    holder["host"].as_str().unwrap_or("?")
                ),
                holder["generation"]
                    .as_u64()
                    .map_or("-".to_string(), |g| format!("{g:#x}")),
                holder["since_ms"]
                    .as_u64()
                    .map_or("-".to_string(), fmt_time),
            )
        };
        let cs: Vec<String> = v["contenders"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| c["node"].as_str().unwrap_or("?").to_string())
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{:<16} {:<24} {:<20} {:<22} {}",
            v["name"].as_str().unwrap_or("?"),
            h,
            g,
            since,
            if cs.is_empty() {
                "-".to_string()
            } else {
                cs.join(", ")
            }
        );
    }
    code::OK
}

/// Waits until none of `volumes` is exposed or fencing; prints progress lines.
/// Waits until each of `volumes` has finished its fence: not fencing, and
/// either nothing exposed here or exposed under another generation than
/// `before` (a hand-over that came straight back to this node).
fn wait_fenced(
    socket: &std::path::Path,
    volumes: &[String],
    before: &StatusReport,
    wait: Duration,
    json: bool,
) -> Result<StatusReport, i32> {
    let deadline = Instant::now() + wait;
    let mut last = Vec::new();
    let old_gen = |name: &str| {
        before
            .volumes
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.generation)
    };
    loop {
        let s = fetch_status(socket)?;
        let pending: Vec<&VolumeReport> = s
            .volumes
            .iter()
            .filter(|v| volumes.contains(&v.name))
            .filter(|v| {
                let busy = matches!(
                    v.phase.as_str(),
                    "fencing" | "suspended" | "recovering" | "init"
                );
                let moved_on = v.generation.is_some() && v.generation != old_gen(&v.name);
                busy || (v.exposed && !moved_on)
            })
            .collect();
        let now: Vec<String> = pending
            .iter()
            .map(|v| format!("{}: {} ({})", v.name, v.phase, v.last_reason))
            .collect();
        if !json && now != last {
            for l in &now {
                eprintln!("  {l}");
            }
            last = now;
        }
        if pending.is_empty() {
            return Ok(s);
        }
        if Instant::now() >= deadline {
            eprintln!(
                "error: still fencing after {}s (see `journalctl -u nbd-failover`; `force-detach` escalates)",
                wait.as_secs()
            );
            return Err(4);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn operator(
    target: &Target,
    req: Request,
    volumes: Option<Vec<String>>,
    wait: Option<Duration>,
    json: bool,
) -> i32 {
    let (socket, cfg) = match socket_of(target) {
        Ok(s) => s,
        Err(c) => return c,
    };
    let before = match fetch_status(&socket) {
        Ok(s) => s,
        Err(c) => return c,
    };
    let message = match ask(&socket, req, Duration::from_secs(10)) {
        Ok(Response::Ok { message }) => message,
        Ok(other) => {
            eprintln!("error: unexpected answer: {other:?}");
            return code::ERROR;
        }
        Err(c) => return c,
    };
    if !json {
        println!("{message}");
    }
    let names = volumes.unwrap_or_else(|| {
        cfg.map(|c| c.volumes.iter().map(|v| v.name.clone()).collect())
            .unwrap_or_default()
    });
    let report = match wait {
        Some(w) => match wait_fenced(&socket, &names, &before, w, json) {
            Ok(s) => Some(s),
            Err(c) => return c,
        },
        None => None,
    };
    let report = match report {
        Some(r) => r,
        None => match fetch_status(&socket) {
            Ok(s) => s,
            Err(c) => return c,
        },
    };
    let vols: Vec<&VolumeReport> = report
        .volumes
        .iter()
        .filter(|v| names.contains(&v.name))
        .collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"message": message, "volumes": vols}))
                .unwrap_or_default()
        );
    } else {
        for v in vols {
            println!("{}: now {} ({})", v.name, v.phase, v.last_reason);
        }
    }
    code::OK
}

/// `release`.
pub(crate) fn release(target: &Target, volume: &str, wait: Duration, json: bool) -> i32 {
    operator(
        target,
        Request::Release {
            volume: volume.to_string(),
        },
        Some(vec![volume.to_string()]),
        Some(wait),
        json,
    )
}

/// `drain`.
pub(crate) fn drain(target: &Target, volume: Option<String>, wait: Duration, json: bool) -> i32 {
    let names = volume.clone().map(|v| vec![v]);
    operator(target, Request::Drain { volume }, names, Some(wait), json)
}

/// `resume`.
pub(crate) fn resume(target: &Target, volume: Option<String>, json: bool) -> i32 {
    let names = volume.clone().map(|v| vec![v]);
    operator(target, Request::Resume { volume }, names, None, json)
}

/// `force-detach`.
pub(crate) fn force_detach(
    target: &Target,
    volume: &str,
    yes: bool,
    daemon_timeout: Duration,
    json: bool,
) -> i32 {
    let cfg = match load_config(&target.config, "force-detach") {
        Ok(c) => c,
        Err(c) => return c,
    };
    let Some(vcfg) = cfg.volume(volume) else {
        eprintln!("error: no volume {volume:?} in {}", cfg.file);
        return 3;
    };
    let socket = target
        .socket
        .clone()
        .unwrap_or_else(|| cfg.control.socket.clone());
    let steps: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let say: Arc<dyn Fn(String) + Send + Sync> = {
        let steps = steps.clone();
        Arc::new(move |l: String| {
            if !json {
                println!("{l}");
            }
            steps.lock().unwrap_or_else(|p| p.into_inner()).push(l);
        })
    };
    // 1. Ask a live daemon.
    match control::call(&socket, Request::Status, daemon_timeout) {
        Ok(Response::Status(s)) => {
            let v = s.volumes.iter().find(|v| v.name == volume);
            let task_runs = vcfg.task.is_some()
                && v.is_some_and(|v| {
                    matches!(v.phase.as_str(), "running" | "starting" | "restart-wait")
                });
            if task_runs && !yes {
                eprintln!(
                    "refused: the task of volume {volume} is running on this node (daemon pid {}): force-detach would SIGKILL it; re-run with --yes (or use `release` for a graceful hand-over)",
                    s.pid
                );
                return code::NEEDS_YES;
            }
            say(format!(
                "asking the daemon (pid {}) to force-detach {volume}",
                s.pid
            ));
            let r = match ask(
                &socket,
                Request::ForceDetach {
                    volume: volume.to_string(),
                },
                daemon_timeout,
            ) {
                Ok(Response::Ok { message }) => message,
                Ok(other) => {
                    eprintln!("error: unexpected answer: {other:?}");
                    return code::ERROR;
                }
                Err(c) => return c,
            };
            say(format!("  {r}"));
            let limit = vcfg.policy.timings.fence_budget().total + Duration::from_secs(30);
            let report = match wait_fenced(&socket, &[volume.to_string()], &s, limit, json) {
                Ok(s) => s,
                Err(c) => return c,
            };
            let v = report.volumes.iter().find(|v| v.name == volume);
            say(format!(
                "done: {volume} is {} on this node ({}); `nbd-failover resume {volume}` lets it contend again",
                v.map_or("?", |v| v.phase.as_str()),
                v.map_or("", |v| v.last_reason.as_str())
            ));
            if json {
                let st = steps.lock().unwrap_or_else(|p| p.into_inner()).clone();
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({"volume": volume, "via": "daemon", "steps": st})
                    )
                    .unwrap_or_default()
                );
            }
            return code::OK;
        }
        Ok(other) => {
            eprintln!("error: unexpected answer from the daemon: {other:?}");
            return code::ERROR;
        }
        Err(ClientError::PermissionDenied(p)) => {
            eprintln!("error: permission denied on {}: run as root", p.display());
            return code::ERROR;
        }
        Err(e) => {
            say(format!(
                "the daemon does not answer ({e}); acting without it"
            ));
        }
    }
    // 2. Without the daemon.
    let rt = match runtime() {
        Ok(r) => r,
        Err(c) => return c,
    };
    match rt.block_on(crate::daemon::offline::force_detach(
        &cfg,
        volume,
        yes,
        say.clone(),
    )) {
        Ok(out) => {
            say(format!(
                "done: {volume} is fenced on this node{}",
                if out.found_anything {
                    ""
                } else {
                    " (nothing was attached, mounted or running)"
                }
            ));
            if json {
                let st = steps.lock().unwrap_or_else(|p| p.into_inner()).clone();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "volume": volume, "via": "direct", "steps": st,
                        "task_was_running": out.task_was_running,
                        "lock_nodes_deleted": out.lock_nodes_deleted,
                        "zookeeper_problem": out.zookeeper_problem,
                    }))
                    .unwrap_or_default()
                );
            }
            code::OK
        }
        Err(e) if e.is::<crate::daemon::offline::NeedsYes>() => {
            eprintln!("refused: {e}");
            code::NEEDS_YES
        }
        Err(e) => {
            if json {
                for l in steps.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                    eprintln!("{l}");
                }
            }
            eprintln!("error: {e:#}");
            code::ERROR
        }
    }
}

/// `break-lock`.
pub(crate) fn break_lock(target: &Target, volume: &str, yes: bool, json: bool) -> i32 {
    let cfg = match load_config(&target.config, "break-lock") {
        Ok(c) => c,
        Err(c) => return c,
    };
    if cfg.volume(volume).is_none() {
        eprintln!("error: no volume {volume:?} in {}", cfg.file);
        return 3;
    }
    if !yes {
        eprintln!("{BREAK_LOCK_HELP}\n\nrefused: add --yes once you know the holder is dead");
        return code::NEEDS_YES;
    }
    let rt = match runtime() {
        Ok(r) => r,
        Err(c) => return c,
    };
    let r = rt.block_on(async {
        let lease_cfg = LeaseConfig::from_config(&cfg)?;
        let admin = tokio::time::timeout(
            cfg.zookeeper.connect_timeout + Duration::from_secs(1),
            LeaseAdmin::connect(&lease_cfg),
        )
        .await
        .map_err(|_| anyhow::anyhow!("ZooKeeper did not answer"))??;
        anyhow::Ok(admin.break_lock(volume).await?)
    });
    match r {
        Ok(None) => {
            if json {
                println!("{}", json!({"volume": volume, "removed": null}));
            } else {
                println!("{volume}: no holder: nothing to break");
            }
            code::OK
        }
        Ok(Some(e)) => {
            let who = match &e.owner {
                Ok(o) => format!("node {} (host {}, pid {})", o.node_id, o.host, o.pid),
                Err(err) => format!("an unreadable owner ({err})"),
            };
            if json {
                println!(
                    "{}",
                    json!({"volume": volume, "removed": {"lock_node": e.name, "generation": e.czxid, "owner": who}})
                );
            } else {
                println!(
                    "{volume}: removed lock node {} (generation {:#x}) of {who}; the next contender wins unclean and waits out the lock-delay",
                    e.name, e.czxid
                );
            }
            code::OK
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            code::ERROR
        }
    }
}
