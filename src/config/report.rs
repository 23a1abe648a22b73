//! The `check-config` report: the effective config as TOML, each volume's fencing budget, and JSON.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::json;

use crate::core::policy::FenceBudget;
use crate::core::time::fmt_duration;

use super::model::{
    fmt_config_duration, fsck_name, restart_name, Backend, Config, TaskRun, VolumeConfig,
    WatchdogConfig, FENCING_KEYS,
};

/// The effective config (every value, defaults included) followed by each
/// volume's fencing budget, line by line.
pub fn report(cfg: &Config) -> String {
    let mut out = effective_toml(cfg);
    for v in &cfg.volumes {
        out.push('\n');
        out.push_str(&budget_report(cfg, v));
    }
    out.push_str(&format!(
        "\nThe budgets use the requested session timeout {}; ZooKeeper may negotiate a shorter one\n\
         (it clamps to 2..20 ticks), so the daemon checks them again once connected.\n",
        fmt_duration(cfg.zookeeper.session_timeout)
    ));
    out
}

/// The effective config as a TOML document: every key with its value, defaults filled in.
///
/// It parses back into the same [`Config`] (on a host whose name matches `node.id`
/// when the id came from the host name).
pub fn effective_toml(cfg: &Config) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# effective configuration of {} (defaults filled in)",
        cfg.file
    );

    let _ = writeln!(o, "\n[node]");
    let from_host = if cfg.node.id_from_hostname {
        "  # from the host name"
    } else {
        ""
    };
    let _ = writeln!(o, "id = {}{from_host}", q(&cfg.node.id));
    let _ = writeln!(
        o,
        "state_dir = {}",
        q(&cfg.node.state_dir.display().to_string())
    );
    let _ = writeln!(
        o,
        "run_dir = {}",
        q(&cfg.node.run_dir.display().to_string())
    );
    let _ = writeln!(o, "shared_kernel = {}", cfg.node.shared_kernel);

    let zk = &cfg.zookeeper;
    let _ = writeln!(o, "\n[zookeeper]");
    let hosts: Vec<String> = zk.hosts.iter().map(|h| q(&h.to_string())).collect();
    let _ = writeln!(o, "hosts = [{}]", hosts.join(", "));
    let _ = writeln!(o, "chroot = {}", q(&zk.chroot));
    let _ = writeln!(o, "session_timeout = {}", qd(zk.session_timeout));
    let _ = writeln!(o, "connect_timeout = {}", qd(zk.connect_timeout));
    if let Some(a) = &zk.auth {
        let _ = writeln!(o, "\n[zookeeper.auth]");
        let _ = writeln!(o, "scheme = {}", q(&a.scheme));
        let _ = writeln!(
            o,
            "credentials_file = {}",
            q(&a.credentials_file.display().to_string())
        );
        if let Some(p) = &a.admin_credentials_file {
            let _ = writeln!(
                o,
                "admin_credentials_file = {}",
                q(&p.display().to_string())
            );
        }
    }
    if let Some(t) = &zk.tls {
        let _ = writeln!(o, "\n[zookeeper.tls]");
        let _ = writeln!(o, "enabled = true");
        let _ = writeln!(o, "ca_file = {}", q(&t.ca_file.display().to_string()));
        let _ = writeln!(o, "cert_file = {}", q(&t.cert_file.display().to_string()));
        let _ = writeln!(o, "key_file = {}", q(&t.key_file.display().to_string()));
    }

    let _ = writeln!(o, "\n[watchdog]");
    let _ = writeln!(o, "mode = {}", q(cfg.watchdog.mode()));
    if let WatchdogConfig::Device { device, .. } = &cfg.watchdog {
        let _ = writeln!(o, "device = {}", q(&device.display().to_string()));
    }
    if let Some(t) = cfg.watchdog.timeout() {
        let _ = writeln!(o, "timeout = {}", qd(t));
    }

    let _ = writeln!(o, "\n[fencing]");
    for key in FENCING_KEYS {
        if let Some(d) = cfg.fencing.get(key) {
            let _ = writeln!(o, "{key} = {}", qd(d));
        }
    }

    let _ = writeln!(o, "\n[control]");
    let _ = writeln!(
        o,
        "socket = {}",
        q(&cfg.control.socket.display().to_string())
    );
    let _ = writeln!(o, "\n[metrics]");
    match cfg.metrics.listen {
        Some(a) if !cfg.metrics.explicit => {
            let _ = writeln!(o, "# listen = {}  (the default)", q(&a.to_string()));
        }
        Some(a) => {
            let _ = writeln!(o, "listen = {}", q(&a.to_string()));
        }
        None => {
            let _ = writeln!(o, "listen = \"off\"");
        }
    }
    let _ = writeln!(o, "\n[mesos]");
    let _ = writeln!(o, "acquire_wait = {}", qd(cfg.mesos.acquire_wait));
    let _ = writeln!(o, "label_key = {}", q(&cfg.mesos.label_key));
    let _ = writeln!(
        o,
        "dvdcli_references = {}",
        q(if cfg.mesos.dvdcli_counted {
            "per-mount"
        } else {
            "per-volume"
        })
    );

    for v in &cfg.volumes {
        volume_toml(&mut o, v);
    }
    o
}

fn volume_toml(o: &mut String, v: &VolumeConfig) {
    let table = format!("volumes.{}", key(&v.name));
    let _ = writeln!(o, "\n[{table}]");
    let _ = writeln!(o, "backend = {}", q(v.backend.kind()));
    let _ = writeln!(o, "mount_path = {}", q(&v.mount_path.display().to_string()));
    if let Some(fs) = v.filesystem {
        let _ = writeln!(o, "filesystem = {}", q(fs.as_str()));
    }
    let opts: Vec<String> = v.mount_options.iter().map(|s| q(s)).collect();
    let _ = writeln!(o, "mount_options = [{}]", opts.join(", "));
    let _ = writeln!(o, "fsck = {}", q(fsck_name(v.fsck)));
    if v.activation == crate::config::Activation::OnDemand {
        let _ = writeln!(o, "activation = \"on-demand\"");
    }
    for key in FENCING_KEYS {
        if v.fencing_overrides.iter().any(|k| k == key) {
            if let Some(d) = v.fencing.get(key) {
                let _ = writeln!(o, "{key} = {}  # overrides [fencing]", qd(d));
            }
        }
    }
    match &v.backend {
        Backend::Nbd(n) => {
            let _ = writeln!(o, "\n[{table}.nbd]");
            let _ = writeln!(o, "server = {}", q(&n.server.to_string()));
            let _ = writeln!(o, "export = {}", q(&n.export));
            let _ = writeln!(o, "timeout = {}", qd(n.timeout));
            let _ = writeln!(o, "dead_conn_timeout = {}", qd(n.dead_conn_timeout));
            let _ = writeln!(o, "connections = {}", n.connections);
        }
        Backend::Image { path } => {
            let _ = writeln!(o, "\n[{table}.image]");
            let _ = writeln!(o, "path = {}", q(&path.display().to_string()));
        }
        Backend::Dir { path } => {
            let _ = writeln!(o, "\n[{table}.dir]");
            let _ = writeln!(o, "path = {}", q(&path.display().to_string()));
        }
    }
    match &v.task {
        Some(task) => {
            let _ = writeln!(o, "\n[{table}.task]");
            match &task.run {
                TaskRun::Exec(args) => {
                    let args: Vec<String> = args.iter().map(|s| q(s)).collect();
                    let _ = writeln!(o, "exec = [{}]", args.join(", "));
                }
                TaskRun::SystemdUnit(u) => {
                    let _ = writeln!(o, "systemd_unit = {}", q(u));
                }
            }
            if let Some(u) = &task.user {
                let _ = writeln!(o, "user = {}", q(u));
            }
            let env: Vec<String> = task
                .env
                .iter()
                .map(|(k, val)| format!("{} = {}", key(k), q(val)))
                .collect();
            if env.is_empty() {
                let _ = writeln!(o, "env = {{}}");
            } else {
                let _ = writeln!(o, "env = {{ {} }}", env.join(", "));
            }

            let _ = writeln!(o, "\n[{table}.restart]");
            let _ = writeln!(o, "policy = {}", q(restart_name(v.restart.mode)));
            let _ = writeln!(o, "max_restarts = {}", v.restart.max_restarts);
            let _ = writeln!(o, "backoff = {}", qd(v.restart.backoff));
        }
        None => {
            let _ = writeln!(o, "# no [{table}.task]: the mount is handed to a scheduler");
        }
    }
}

/// One volume's fencing budget, one term per line, with the verdict.
pub fn budget_report(cfg: &Config, v: &VolumeConfig) -> String {
    let budget = v.budget();
    let mut o = String::new();
    let _ = writeln!(
        o,
        "volume {}: fencing budget (from last ZooKeeper contact)",
        v.name
    );
    let width = budget
        .items
        .iter()
        .map(|i| fmt_duration(i.value).len())
        .max()
        .unwrap_or(2)
        .max(5);
    for item in &budget.items {
        let what = budget_term(v, item.key);
        let overridden =
            config_key(item.key).is_some_and(|k| v.fencing_overrides.iter().any(|o| o == k));
        let mark = if overridden {
            " (set on this volume)"
        } else {
            ""
        };
        let _ = writeln!(
            o,
            "  {:<15} {:<width$} {what}{mark}",
            item.key,
            fmt_duration(item.value)
        );
    }
    let _ = writeln!(
        o,
        "  {:<15} {:<width$} {}",
        "total",
        fmt_duration(budget.total),
        total_verdict(&budget)
    );
    if let Some(t) = cfg.watchdog.timeout() {
        let limit = budget.limit.saturating_sub(v.fencing.margin);
        let cmp = if t <= limit { "<=" } else { ">" };
        let _ = writeln!(
            o,
            "  {:<15} {:<width$} {cmp} session timeout {} - margin {} = {} ({} watchdog)",
            "watchdog",
            fmt_duration(t),
            fmt_duration(budget.limit),
            fmt_duration(v.fencing.margin),
            fmt_duration(limit),
            cfg.watchdog.mode()
        );
    }
    let _ = writeln!(
        o,
        "  {:<15} {:<width$} wait before attaching when the previous holder did not release cleanly",
        "lock_delay",
        fmt_duration(v.fencing.lock_delay)
    );
    if let Some(note) = nbd_backstop_note(cfg, v) {
        let _ = writeln!(o, "  note: {note}");
    }
    o
}

/// For an NBD volume without the device watchdog: what a dead storage link
/// does to the fence, and what cuts it short (`None` otherwise).
pub fn nbd_backstop_note(cfg: &Config, v: &VolumeConfig) -> Option<String> {
    let Backend::Nbd(n) = &v.backend else {
        return None;
    };
    if matches!(cfg.watchdog, WatchdogConfig::Device { .. }) {
        return None;
    }
    let stall = n.timeout + n.dead_conn_timeout;
    Some(format!(
        "volume {} is on NBD and watchdog.mode = \"{}\": a fence whose unmount waits on a dead \
         NBD link can stall for nbd.timeout + dead_conn_timeout = {} (more than unmount_budget {}), \
         and only a machine reset cuts that short: set watchdog.mode = \"device\" for NBD \
         volumes (docs/operations.md, \"The watchdog device\")",
        v.name,
        cfg.watchdog.mode(),
        fmt_duration(stall),
        fmt_duration(v.fencing.unmount_budget),
    ))
}

fn total_verdict(b: &FenceBudget) -> String {
    if b.fits() {
        format!(
            "<= session timeout {} ({} to spare)",
            fmt_duration(b.limit),
            fmt_duration(b.limit.saturating_sub(b.total))
        )
    } else {
        format!(
            "> session timeout {} ({} over: a partitioned holder could still be fencing when another node wins)",
            fmt_duration(b.limit),
            fmt_duration(b.total.saturating_sub(b.limit))
        )
    }
}

/// The config key a budget term comes from.
fn config_key(term: &str) -> Option<&'static str> {
    match term {
        "suspend_grace" => Some("suspend_grace"),
        "stop_grace" => Some("stop_grace"),
        "unmount" => Some("unmount_budget"),
        "detach" => Some("detach_budget"),
        "margin" => Some("margin"),
        _ => None,
    }
}

fn budget_term(v: &VolumeConfig, term: &str) -> &'static str {
    match term {
        "suspend_grace" => "wait for the connection to come back",
        "stop_grace" if v.task.is_some() => "SIGTERM -> SIGKILL of the task group",
        "stop_grace" => "no task here (the scheduler's task must stop on its own)",
        "unmount" => "unmount the filesystem",
        "detach" if v.policy.has_device => "detach the device",
        "detach" => "nothing to detach (dir volume)",
        "margin" => "clock drift, round trips, scheduling",
        _ => "",
    }
}

/// The effective config as JSON, each volume with its fencing budget.
pub fn to_json(cfg: &Config) -> Result<serde_json::Value, serde_json::Error> {
    let mut value = serde_json::to_value(cfg)?;
    if let Some(vols) = value.get_mut("volumes").and_then(|v| v.as_array_mut()) {
        for (jv, v) in vols.iter_mut().zip(&cfg.volumes) {
            if let Some(obj) = jv.as_object_mut() {
                obj.insert("fencing_budget".to_string(), budget_json(&v.budget()));
                obj.insert(
                    "has_device".to_string(),
                    serde_json::Value::Bool(v.policy.has_device),
                );
                obj.insert(
                    "has_task".to_string(),
                    serde_json::Value::Bool(v.policy.has_task),
                );
            }
        }
    }
    Ok(value)
}

fn budget_json(b: &FenceBudget) -> serde_json::Value {
    let items: Vec<serde_json::Value> = b
        .items
        .iter()
        .map(|i| json!({ "key": i.key, "value": fmt_config_duration(i.value) }))
        .collect();
    json!({
        "items": items,
        "total": fmt_config_duration(b.total),
        "limit": fmt_config_duration(b.limit),
        "fits": b.fits(),
        "spare": fmt_config_duration(b.limit.saturating_sub(b.total)),
        "verdict": b.verdict(),
    })
}

/// A TOML basic string (JSON's escapes are all valid TOML escapes).
fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
}

fn qd(d: Duration) -> String {
    q(&fmt_config_duration(d))
}

/// A TOML key: bare when it can be, quoted otherwise.
fn key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_string()
    } else {
        q(k)
    }
}
