//! The schema: reads every table of the document, fills in defaults and checks each rule.
//!
//! Reading never stops at the first problem: a bad value is reported where it
//! is written and left out, and the checks that do not depend on it still run.
//! The cross-table rules (unique mount paths and backing storage, the fencing
//! budget, the watchdog timeout) run on whatever could be read.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use crate::core::policy::{FsckPolicy, RestartMode, RestartPolicy, Timings, VolumePolicy};
use crate::core::time::fmt_duration;

use super::error::Sink;
use super::model::{
    Activation, Backend, Config, ControlConfig, FencingConfig, Filesystem, HostPort, MesosConfig,
    MetricsConfig, NbdConfig, NbdServer, NodeConfig, TaskConfig, TaskRun, VolumeConfig,
    WatchdogConfig, ZooKeeperAuth, ZooKeeperConfig, ZooKeeperTls, FENCING_KEYS,
};
use super::reader::{At, Table};

/// Default `[node]` directories.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/nbd-failover";
/// Default run-time directory.
pub const DEFAULT_RUN_DIR: &str = "/run/nbd-failover";
/// Default ZooKeeper chroot.
pub const DEFAULT_CHROOT: &str = "/nbd-failover";
/// Default ZooKeeper session timeout.
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(10);
/// Default ZooKeeper connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Accepted session timeouts (ZooKeeper clamps the request to `[2*tick, 20*tick]`).
pub const SESSION_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(60));
/// Default watchdog device.
pub const DEFAULT_WATCHDOG_DEVICE: &str = "/dev/watchdog";
/// Default NBD kernel request timeout.
pub const DEFAULT_NBD_TIMEOUT: Duration = Duration::from_secs(30);
/// Default NBD dead-connection timeout.
pub const DEFAULT_NBD_DEAD_CONN_TIMEOUT: Duration = Duration::from_secs(10);
/// Maximum NBD connections per device.
pub const MAX_NBD_CONNECTIONS: i64 = 16;

const TOP_KEYS: &[&str] = &[
    "node",
    "zookeeper",
    "watchdog",
    "fencing",
    "control",
    "metrics",
    "mesos",
    "volumes",
];
const CONTROL_KEYS: &[&str] = &["socket"];
const METRICS_KEYS: &[&str] = &["listen"];
const MESOS_KEYS: &[&str] = &["acquire_wait", "label_key", "dvdcli_references"];
/// Default metrics endpoint (loopback only).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9713";
/// Default time `dvdcli mount` and the Mesos prepare hook wait for the lease.
pub const DEFAULT_ACQUIRE_WAIT: Duration = Duration::from_secs(60);
/// Mesos kills a `dvdcli mount` (and the default isolator prepare) after this long.
pub const MESOS_KILL_AFTER: Duration = Duration::from_secs(120);
/// Default task label naming the volumes a Mesos container needs.
pub const DEFAULT_LABEL_KEY: &str = "nbd-failover.volume";
const NODE_KEYS: &[&str] = &["id", "state_dir", "run_dir", "shared_kernel"];
const ZK_KEYS: &[&str] = &[
    "hosts",
    "chroot",
    "session_timeout",
    "connect_timeout",
    "auth",
    "tls",
];
const AUTH_KEYS: &[&str] = &["scheme", "credentials_file", "admin_credentials_file"];
const TLS_KEYS: &[&str] = &["enabled", "ca_file", "cert_file", "key_file"];
const WATCHDOG_KEYS: &[&str] = &["mode", "device", "timeout"];
const VOLUME_OWN_KEYS: &[&str] = &[
    "backend",
    "mount_path",
    "filesystem",
    "mount_options",
    "fsck",
    "nbd",
    "image",
    "dir",
    "task",
    "restart",
    "activation",
];
const NBD_KEYS: &[&str] = &[
    "server",
    "export",
    "timeout",
    "dead_conn_timeout",
    "connections",
];
const PATH_KEYS: &[&str] = &["path"];
const TASK_KEYS: &[&str] = &["exec", "systemd_unit", "user", "env"];
const RESTART_KEYS: &[&str] = &["policy", "max_restarts", "backoff"];
const BACKENDS: &[&str] = &["nbd", "image", "dir"];

/// Fencing budget terms (as `Timings::fence_budget` names them) and the config keys they come from.
const BUDGET_KEYS: [(&str, &str); 5] = [
    ("suspend_grace", "suspend_grace"),
    ("stop_grace", "stop_grace"),
    ("unmount", "unmount_budget"),
    ("detach", "detach_budget"),
    ("margin", "margin"),
];

/// Reads and checks the whole document. `None` when any error was recorded.
pub(crate) fn read(
    root: &Table<'_>,
    sink: &mut Sink<'_>,
    file: &str,
    hostname: &dyn Fn() -> Result<String, String>,
) -> Option<Config> {
    root.deny_unknown(sink, TOP_KEYS);

    let node = read_node(root, sink, hostname);
    let zk = read_zookeeper(root, sink);
    let fencing = read_fencing_table(root, sink);
    let watchdog = read_watchdog(root, sink);
    let control = read_control(root, sink, node.as_ref());
    let metrics = read_metrics(root, sink);
    let mesos = read_mesos(root, sink);
    let mut volumes = read_volumes(root, sink, &fencing);

    check_unique_storage(&volumes, sink);
    // The budget and watchdog rules need a valid session timeout and [fencing];
    // when those are broken, their own errors say so.
    if let Some(session) = zk.session_timeout {
        for v in &mut volumes {
            v.cfg.policy.timings.session_timeout = session.value;
            v.cfg.policy.timings.watchdog_timeout =
                watchdog.as_ref().and_then(|wd| wd.cfg.timeout());
        }
        if fencing.all_ok {
            check_budgets(&volumes, &fencing, session, sink);
            if let Some(wd) = &watchdog {
                check_watchdog(wd, &volumes, &fencing, session, sink);
            }
        }
    }

    let (node, zookeeper, watchdog) = (node?, zk.cfg?, watchdog?);
    let (control, metrics, mesos) = (control?, metrics?, mesos?);
    if !sink.is_empty() {
        return None;
    }
    let mut volumes: Vec<VolumeConfig> = volumes.into_iter().map(|v| v.cfg).collect();
    volumes.sort_by(|a, b| a.name.cmp(&b.name));
    Some(Config {
        file: file.to_string(),
        node,
        zookeeper,
        watchdog: watchdog.cfg,
        fencing: fencing.values,
        control,
        metrics,
        mesos,
        volumes,
    })
}

// ---------------------------------------------------------------------------
// [control], [metrics], [mesos]

fn read_control(
    root: &Table<'_>,
    sink: &mut Sink<'_>,
    node: Option<&NodeConfig>,
) -> Option<ControlConfig> {
    let default = node.map(|n| n.run_dir.join("control.sock"));
    let Some(t) = root.table(sink, "control") else {
        return if root.has("control") {
            None
        } else {
            default.map(|socket| ControlConfig { socket })
        };
    };
    t.deny_unknown(sink, CONTROL_KEYS);
    match optional_path(sink, &t, "socket")? {
        Some(socket) => Some(ControlConfig { socket }),
        None => default.map(|socket| ControlConfig { socket }),
    }
}

fn read_metrics(root: &Table<'_>, sink: &mut Sink<'_>) -> Option<MetricsConfig> {
    let default = || MetricsConfig {
        listen: Some(DEFAULT_METRICS_LISTEN.parse().expect("valid default")),
        explicit: false,
    };
    let Some(t) = root.table(sink, "metrics") else {
        return (!root.has("metrics")).then(default);
    };
    t.deny_unknown(sink, METRICS_KEYS);
    let Some(s) = t.string(sink, "listen") else {
        return (!t.has("listen")).then(default);
    };
    if s.value == "off" {
        return Some(MetricsConfig {
            listen: None,
            explicit: true,
        });
    }
    match s.value.parse::<std::net::SocketAddr>() {
        Ok(addr) if addr.ip().is_loopback() => Some(MetricsConfig {
            listen: Some(addr),
            explicit: true,
        }),
        Ok(_) => {
            sink.at(
                s.at,
                format!(
                    "`metrics.listen` = \"{}\" is not a loopback address: the endpoint is unauthenticated, so it only listens on 127.0.0.1 or [::1] (scrape it through a local agent or a reverse proxy)",
                    s.value
                ),
            );
            None
        }
        Err(_) => {
            sink.at(
                s.at,
                format!(
                    "`metrics.listen` = \"{}\" is not IP:PORT (e.g. \"127.0.0.1:9713\") or \"off\"",
                    s.value
                ),
            );
            None
        }
    }
}

fn read_mesos(root: &Table<'_>, sink: &mut Sink<'_>) -> Option<MesosConfig> {
    let default = || MesosConfig {
        acquire_wait: DEFAULT_ACQUIRE_WAIT,
        label_key: DEFAULT_LABEL_KEY.to_string(),
        dvdcli_counted: true,
    };
    let Some(t) = root.table(sink, "mesos") else {
        return (!root.has("mesos")).then(default);
    };
    t.deny_unknown(sink, MESOS_KEYS);
    let mut ok = true;
    let acquire_wait = positive(sink, &t, "acquire_wait", DEFAULT_ACQUIRE_WAIT);
    if let Some(w) = acquire_wait {
        if w >= MESOS_KILL_AFTER {
            let at = t.key_at("acquire_wait");
            sink.at(
                at,
                format!(
                    "`mesos.acquire_wait` = {} must be below {}s: Mesos kills `dvdcli mount` after {}s, and the reason would be lost",
                    humantime::format_duration(w),
                    MESOS_KILL_AFTER.as_secs(),
                    MESOS_KILL_AFTER.as_secs()
                ),
            );
            ok = false;
        }
    }
    let label_key = match t.string(sink, "label_key") {
        Some(s) if s.value.trim().is_empty() => {
            sink.at(s.at, "`mesos.label_key` is empty");
            None
        }
        Some(s) => Some(s.value),
        None if t.has("label_key") => None,
        None => Some(DEFAULT_LABEL_KEY.to_string()),
    };
    let dvdcli_counted = match keyword(
        sink,
        &t,
        "dvdcli_references",
        &[("per-mount", true), ("per-volume", false)],
    ) {
        Some(k) => Some(k.value),
        None if t.has("dvdcli_references") => None,
        None => Some(true),
    };
    if !ok {
        return None;
    }
    Some(MesosConfig {
        acquire_wait: acquire_wait?,
        label_key: label_key?,
        dvdcli_counted: dvdcli_counted?,
    })
}

// ---------------------------------------------------------------------------
// [node]

fn read_node(
    root: &Table<'_>,
    sink: &mut Sink<'_>,
    hostname: &dyn Fn() -> Result<String, String>,
) -> Option<NodeConfig> {
    let table = root.table(sink, "node");
    if root.has("node") && table.is_none() {
        return None;
    }
    let at = table.as_ref().map_or(0, |t| t.at);
    if let Some(t) = &table {
        t.deny_unknown(sink, NODE_KEYS);
    }
    let mut ok = true;

    let (id, id_from_hostname) = match table
        .as_ref()
        .and_then(|t| t.string(sink, "id").map(|s| (t, s)))
    {
        Some((t, id)) => match check_node_id(&id.value) {
            Ok(()) => (Some(id.value), false),
            Err(why) => {
                sink.at(
                    id.at,
                    format!(
                        "`{}` = \"{}\" is not a valid node id: {why}",
                        t.key_path("id"),
                        id.value
                    ),
                );
                (None, false)
            }
        },
        None if table.as_ref().is_some_and(|t| t.has("id")) => (None, false),
        None => match hostname() {
            Ok(h) => match check_node_id(&h) {
                Ok(()) => (Some(h), true),
                Err(why) => {
                    sink.at(
                        at,
                        format!(
                            "`node.id` is not set and the host name \"{h}\" is not a valid node id ({why}): set node.id"
                        ),
                    );
                    (None, true)
                }
            },
            Err(e) => {
                sink.at(at, format!("`node.id` is not set and the host name could not be read ({e}): set node.id"));
                (None, true)
            }
        },
    };

    let mut dir = |key: &str, default: &str| -> Option<PathBuf> {
        match table.as_ref().map(|t| (t, t.string(sink, key))) {
            Some((t, Some(s))) => abs_path(sink, &t.key_path(key), &s),
            Some((t, None)) if t.has(key) => None,
            _ => Some(PathBuf::from(default)),
        }
    };
    let state_dir = dir("state_dir", DEFAULT_STATE_DIR);
    let run_dir = dir("run_dir", DEFAULT_RUN_DIR);
    let shared_kernel = match table
        .as_ref()
        .map(|t| (t, t.boolean(sink, "shared_kernel")))
    {
        Some((_, Some(b))) => Some(b.value),
        Some((t, None)) if t.has("shared_kernel") => None,
        _ => Some(false),
    };
    ok &= id.is_some() && state_dir.is_some() && run_dir.is_some() && shared_kernel.is_some();
    if !ok {
        return None;
    }
    Some(NodeConfig {
        id: id?,
        id_from_hostname,
        state_dir: state_dir?,
        run_dir: run_dir?,
        shared_kernel: shared_kernel?,
    })
}

/// `[A-Za-z0-9._-]+`, not `.` or `..` (ZooKeeper rejects those as node names), at most 255 bytes.
pub(crate) fn check_node_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("it is empty".to_string());
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{c:?} is not allowed (use letters, digits, '.', '_' and '-')"
        ));
    }
    if id == "." || id == ".." {
        return Err("\".\" and \"..\" are reserved ZooKeeper path components".to_string());
    }
    if id.len() > 255 {
        return Err("it is longer than 255 characters".to_string());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// [zookeeper]

/// A session timeout together with where it was written (offset), if it was.
#[derive(Clone, Copy)]
struct Session {
    value: Duration,
    at: Option<usize>,
}

struct ZkRead {
    cfg: Option<ZooKeeperConfig>,
    /// `None` when invalid (then the budget and watchdog checks are skipped).
    session_timeout: Option<Session>,
}

impl ZkRead {
    fn failed() -> Self {
        ZkRead {
            cfg: None,
            session_timeout: None,
        }
    }
}

fn read_zookeeper(root: &Table<'_>, sink: &mut Sink<'_>) -> ZkRead {
    let Some(t) = root.table(sink, "zookeeper") else {
        if !root.has("zookeeper") {
            sink.at(
                0,
                "missing required table [zookeeper] (with hosts = [\"HOST:PORT\", …])",
            );
        }
        return ZkRead::failed();
    };
    t.deny_unknown(sink, ZK_KEYS);
    let mut ok = true;

    let hosts = match t.string_array(sink, "hosts") {
        Some(list) if list.items.is_empty() && list.complete => {
            sink.at(
                list.at,
                "`zookeeper.hosts` is empty: list at least one ZooKeeper server as \"HOST:PORT\"",
            );
            None
        }
        Some(list) => {
            let mut hosts: Vec<HostPort> = Vec::new();
            let mut hosts_ok = true;
            for (i, h) in list.items.iter().enumerate() {
                match parse_host_port(&h.value) {
                    Ok(hp) if hosts.contains(&hp) => {
                        sink.at(
                            h.at,
                            format!("`zookeeper.hosts[{i}]` = \"{}\" is listed twice", h.value),
                        );
                        hosts_ok = false;
                    }
                    Ok(hp) => hosts.push(hp),
                    Err(why) => {
                        let hint = if h.value.contains('/') {
                            " (put the chroot in zookeeper.chroot, not in a host)"
                        } else {
                            ""
                        };
                        sink.at(
                            h.at,
                            format!(
                                "`zookeeper.hosts[{i}]` = \"{}\" is not HOST:PORT: {why}{hint}",
                                h.value
                            ),
                        );
                        hosts_ok = false;
                    }
                }
            }
            (hosts_ok && list.complete).then_some(hosts)
        }
        None => {
            if !t.has("hosts") {
                sink.at(t.at, "[zookeeper] is missing the required key `hosts` (e.g. hosts = [\"127.0.0.1:2181\"])");
            }
            None
        }
    };
    ok &= hosts.is_some();

    let chroot = match t.string(sink, "chroot") {
        Some(c) => match check_zk_path(&c.value) {
            Ok(()) => Some(c.value),
            Err(why) => {
                sink.at(
                    c.at,
                    format!(
                        "`zookeeper.chroot` = \"{}\" is not an absolute ZooKeeper path: {why}",
                        c.value
                    ),
                );
                None
            }
        },
        None if t.has("chroot") => None,
        None => Some(DEFAULT_CHROOT.to_string()),
    };
    ok &= chroot.is_some();

    let (lo, hi) = SESSION_TIMEOUT_RANGE;
    let session_timeout = match t.duration(sink, "session_timeout") {
        Some(d) if d.value < lo || d.value > hi => {
            sink.at(
                d.at,
                format!(
                    "`zookeeper.session_timeout` = {} is out of range: it must be between {} and {} \
                     (ZooKeeper clamps it to 2 to 20 ticks)",
                    fmt_duration(d.value),
                    fmt_duration(lo),
                    fmt_duration(hi)
                ),
            );
            None
        }
        Some(d) => Some(Session {
            value: d.value,
            at: Some(d.at),
        }),
        None if t.has("session_timeout") => None,
        None => Some(Session {
            value: DEFAULT_SESSION_TIMEOUT,
            at: None,
        }),
    };
    ok &= session_timeout.is_some();

    let connect_timeout = positive(sink, &t, "connect_timeout", DEFAULT_CONNECT_TIMEOUT);
    ok &= connect_timeout.is_some();

    let auth = match t.table(sink, "auth") {
        Some(a) => read_auth(&a, sink).map(Some),
        None if t.has("auth") => None,
        None => Some(None),
    };
    ok &= auth.is_some();

    let tls = match t.table(sink, "tls") {
        Some(a) => read_tls(&a, sink),
        None if t.has("tls") => None,
        None => Some(None),
    };
    ok &= tls.is_some();

    let cfg = if ok {
        match (hosts, chroot, session_timeout, connect_timeout, auth, tls) {
            (Some(hosts), Some(chroot), Some(s), Some(connect_timeout), Some(auth), Some(tls)) => {
                Some(ZooKeeperConfig {
                    hosts,
                    chroot,
                    session_timeout: s.value,
                    connect_timeout,
                    auth,
                    tls,
                })
            }
            _ => None,
        }
    } else {
        None
    };
    ZkRead {
        cfg,
        session_timeout,
    }
}

fn read_auth(t: &Table<'_>, sink: &mut Sink<'_>) -> Option<ZooKeeperAuth> {
    t.deny_unknown(sink, AUTH_KEYS);
    let mut ok = true;
    let scheme = match t.string(sink, "scheme") {
        Some(s) if s.value == "digest" => Some(s.value),
        Some(s) => {
            sink.at(
                s.at,
                format!(
                    "`zookeeper.auth.scheme` = \"{}\" is not supported: only \"digest\"",
                    s.value
                ),
            );
            None
        }
        None if t.has("scheme") => None,
        None => Some("digest".to_string()),
    };
    ok &= scheme.is_some();
    let creds = required_path(
        sink,
        t,
        "credentials_file",
        "the file holding user:password",
    );
    ok &= creds.is_some();
    let admin = optional_path(sink, t, "admin_credentials_file");
    ok &= admin.is_some();
    if !ok {
        return None;
    }
    Some(ZooKeeperAuth {
        scheme: scheme?,
        credentials_file: creds?,
        admin_credentials_file: admin?,
    })
}

/// `Some(None)`: TLS off; `Some(Some(_))`: on; `None`: errors.
fn read_tls(t: &Table<'_>, sink: &mut Sink<'_>) -> Option<Option<ZooKeeperTls>> {
    t.deny_unknown(sink, TLS_KEYS);
    let enabled = match t.boolean(sink, "enabled") {
        Some(b) => Some(b.value),
        None if t.has("enabled") => None,
        None => Some(false),
    };
    let mut ok = enabled.is_some();
    let mut files = Vec::new();
    for key in ["ca_file", "cert_file", "key_file"] {
        let p = if enabled == Some(true) {
            required_path(sink, t, key, "required when enabled = true")
        } else {
            optional_path(sink, t, key).map(|p| p.unwrap_or_default())
        };
        ok &= p.is_some();
        files.push(p.unwrap_or_default());
    }
    if !ok {
        return None;
    }
    if enabled != Some(true) {
        return Some(None);
    }
    let mut files = files.into_iter();
    Some(Some(ZooKeeperTls {
        ca_file: files.next().unwrap_or_default(),
        cert_file: files.next().unwrap_or_default(),
        key_file: files.next().unwrap_or_default(),
    }))
}

/// `HOST:PORT` or `[IPV6]:PORT`, port 1..=65535.
pub(crate) fn parse_host_port(s: &str) -> Result<HostPort, String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, rest) = rest
            .split_once(']')
            .ok_or("missing ']' after the IPv6 address")?;
        let port = rest
            .strip_prefix(':')
            .ok_or("missing \":PORT\" after the IPv6 address")?;
        if host.is_empty()
            || !host
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        {
            return Err(format!("\"{host}\" is not an IPv6 address"));
        }
        (host, port)
    } else {
        let (host, port) = s.rsplit_once(':').ok_or("missing \":PORT\"")?;
        if host.contains(':') {
            return Err("write IPv6 addresses in brackets: \"[::1]:2181\"".to_string());
        }
        if host.is_empty() {
            return Err("the host is empty".to_string());
        }
        if let Some(c) = host
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(format!("{c:?} is not allowed in a host name"));
        }
        (host, port)
    };
    let port: u32 = port
        .parse()
        .ok()
        .filter(|p: &u32| port.chars().all(|c| c.is_ascii_digit()) && *p <= 65535)
        .ok_or_else(|| format!("the port \"{port}\" is not a number from 1 to 65535"))?;
    if port == 0 {
        return Err("the port must be from 1 to 65535, not 0".to_string());
    }
    Ok(HostPort {
        host: host.to_string(),
        port: port as u16,
    })
}

/// An absolute ZooKeeper path: starts with '/', no empty, "." or ".." components,
/// no trailing '/', not under the reserved `/zookeeper`.
pub(crate) fn check_zk_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err("it must start with '/'".to_string());
    }
    if p == "/" {
        return Ok(());
    }
    if p.ends_with('/') {
        return Err("it must not end with '/'".to_string());
    }
    for comp in p[1..].split('/') {
        match comp {
            "" => return Err("it has an empty component (\"//\")".to_string()),
            "." | ".." => return Err(format!("\"{comp}\" is not allowed as a component")),
            _ => {}
        }
        if comp.chars().any(|c| c.is_control()) {
            return Err("it contains a control character".to_string());
        }
    }
    if p == "/zookeeper" || p.starts_with("/zookeeper/") {
        return Err("/zookeeper is reserved by ZooKeeper".to_string());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// [fencing] and per-volume overrides

/// Fencing values and where each was set.
struct FencingRead {
    values: FencingConfig,
    /// Config key → offset of its value, for the keys this table sets.
    set_at: BTreeMap<&'static str, usize>,
    /// Where to point when blaming the table as a whole.
    at: Option<usize>,
    /// False when some value was invalid (the budget is not checked then).
    all_ok: bool,
}

fn read_fencing_table(root: &Table<'_>, sink: &mut Sink<'_>) -> FencingRead {
    let base = FencingConfig::default();
    match root.table(sink, "fencing") {
        Some(t) => {
            t.deny_unknown(sink, &FENCING_KEYS);
            let mut f = read_fencing_keys(&t, sink, &base);
            f.at = Some(t.at);
            f
        }
        None => FencingRead {
            values: base,
            set_at: BTreeMap::new(),
            at: None,
            all_ok: !root.has("fencing"),
        },
    }
}

/// Reads the [`FENCING_KEYS`] a table sets, on top of `base`.
fn read_fencing_keys(t: &Table<'_>, sink: &mut Sink<'_>, base: &FencingConfig) -> FencingRead {
    let mut values = base.clone();
    let mut set_at = BTreeMap::new();
    let mut all_ok = true;
    for key in FENCING_KEYS {
        if !t.has(key) {
            continue;
        }
        match t.duration(sink, key) {
            Some(d) if key == "margin" && d.value.is_zero() => {
                sink.at(
                    d.at,
                    format!(
                        "`{}` must be greater than 0: it absorbs clock drift and round trips between \
                         the fence deadline and the session timeout",
                        t.key_path(key)
                    ),
                );
                all_ok = false;
            }
            Some(d) => {
                values.set(key, d.value);
                set_at.insert(key, d.at);
            }
            None => all_ok = false,
        }
    }
    if values.backoff_initial > values.backoff_max {
        let key = if set_at.contains_key("backoff_initial") {
            "backoff_initial"
        } else {
            "backoff_max"
        };
        let at = set_at.get(key).copied().unwrap_or(t.at);
        sink.at(
            at,
            format!(
                "{}: backoff_initial {} is longer than backoff_max {}",
                t.describe(),
                fmt_duration(values.backoff_initial),
                fmt_duration(values.backoff_max)
            ),
        );
    }
    FencingRead {
        values,
        set_at,
        at: Some(t.at),
        all_ok,
    }
}

// ---------------------------------------------------------------------------
// [watchdog]

struct WatchdogRead {
    cfg: WatchdogConfig,
    timeout_at: usize,
}

fn read_watchdog(root: &Table<'_>, sink: &mut Sink<'_>) -> Option<WatchdogRead> {
    let Some(t) = root.table(sink, "watchdog") else {
        return (!root.has("watchdog")).then_some(WatchdogRead {
            cfg: WatchdogConfig::Off,
            timeout_at: 0,
        });
    };
    t.deny_unknown(sink, WATCHDOG_KEYS);
    let mode = match keyword(
        sink,
        &t,
        "mode",
        &[("off", "off"), ("systemd", "systemd"), ("device", "device")],
    ) {
        Some(m) => m.value,
        None if t.has("mode") => return None,
        None => "off",
    };
    let mut ok = true;

    let device = match t.string(sink, "device") {
        Some(d) if mode != "device" => {
            sink.at(
                d.at,
                format!(
                    "`watchdog.device` is only used with mode = \"device\", but mode is \"{mode}\" \
                     (set mode = \"device\" or remove device)"
                ),
            );
            None
        }
        Some(d) => abs_path(sink, "watchdog.device", &d),
        None if t.has("device") => None,
        None => Some(PathBuf::from(DEFAULT_WATCHDOG_DEVICE)),
    };
    ok &= device.is_some();

    let timeout = match t.duration(sink, "timeout") {
        Some(d) if mode == "off" => {
            sink.at(
                d.at,
                "`watchdog.timeout` is set but mode is \"off\", so no watchdog runs: \
                 set mode = \"systemd\" or \"device\", or remove timeout",
            );
            None
        }
        Some(d) if d.value < Duration::from_secs(1) => {
            sink.at(
                d.at,
                format!(
                    "`watchdog.timeout` = {} is too short: at least 1s, or an ordinary scheduling \
                     hiccup reboots the machine",
                    fmt_duration(d.value)
                ),
            );
            None
        }
        Some(d) if mode == "device" && d.value.subsec_nanos() != 0 => {
            sink.at(
                d.at,
                format!(
                    "`watchdog.timeout` = {} must be a whole number of seconds with mode = \"device\" \
                     (the device takes its timeout in seconds)",
                    fmt_duration(d.value)
                ),
            );
            None
        }
        Some(d) => Some(d),
        None if t.has("timeout") => None,
        None if mode == "off" => Some(At::new(Duration::ZERO, t.at)),
        None => {
            sink.at(
                t.at,
                format!(
                    "[watchdog] with mode = \"{mode}\" is missing the required key `timeout` \
                     (it must be below the session timeout minus the margin)"
                ),
            );
            None
        }
    };
    ok &= timeout.is_some();
    if !ok {
        return None;
    }
    let timeout = timeout?;
    let cfg = match mode {
        "systemd" => WatchdogConfig::Systemd {
            timeout: timeout.value,
        },
        "device" => WatchdogConfig::Device {
            device: device?,
            timeout: timeout.value,
        },
        _ => WatchdogConfig::Off,
    };
    Some(WatchdogRead {
        cfg,
        timeout_at: timeout.at,
    })
}

// ---------------------------------------------------------------------------
// [volumes.NAME]

/// One volume as read, with the positions the cross-table checks point at.
struct VolumeRead {
    cfg: VolumeConfig,
    /// Offset of the volume's table (header or key).
    at: usize,
    mount_at: usize,
    /// What backs the volume (for the uniqueness check) and where it is written.
    storage: Option<At<String>>,
    fencing: FencingRead,
}

fn read_volumes(root: &Table<'_>, sink: &mut Sink<'_>, fencing: &FencingRead) -> Vec<VolumeRead> {
    let Some(vols) = root.table(sink, "volumes") else {
        if !root.has("volumes") {
            sink.at(
                0,
                "no volumes configured: add at least one [volumes.NAME] table",
            );
        }
        return Vec::new();
    };
    let names = vols.keys();
    if names.is_empty() {
        sink.at(
            vols.at,
            "[volumes] is empty: add at least one [volumes.NAME] table",
        );
    }
    let mut out = Vec::new();
    for name in names {
        let name_at = vols.key_at(name);
        if let Err(why) = check_volume_name(name) {
            sink.at(
                name_at,
                format!("volume name \"{name}\" is not valid: {why}"),
            );
        }
        let Some(t) = vols.table(sink, name) else {
            continue;
        };
        if let Some(v) = read_volume(name, &t, sink, fencing) {
            out.push(v);
        }
    }
    out
}

/// `[a-z0-9][a-z0-9._-]{0,62}`.
pub(crate) fn check_volume_name(name: &str) -> Result<(), String> {
    let Some(first) = name.chars().next() else {
        return Err("it is empty".to_string());
    };
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err("it must start with a lowercase letter or a digit".to_string());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{c:?} is not allowed (use lowercase letters, digits, '.', '_' and '-')"
        ));
    }
    if name.len() > 63 {
        return Err("it is longer than 63 characters".to_string());
    }
    Ok(())
}

fn read_volume(
    name: &str,
    t: &Table<'_>,
    sink: &mut Sink<'_>,
    global: &FencingRead,
) -> Option<VolumeRead> {
    let known: Vec<&str> = VOLUME_OWN_KEYS
        .iter()
        .chain(FENCING_KEYS.iter())
        .copied()
        .collect();
    t.deny_unknown(sink, &known);

    // backend and its table
    let backend_kind = match keyword(
        sink,
        t,
        "backend",
        &[("nbd", "nbd"), ("image", "image"), ("dir", "dir")],
    ) {
        Some(b) => Some(b.value),
        None => {
            if !t.has("backend") {
                sink.at(
                    t.at,
                    format!(
                        "{} is missing the required key `backend` (\"nbd\", \"image\" or \"dir\")",
                        t.describe()
                    ),
                );
            }
            None
        }
    };
    for other in BACKENDS {
        if t.has(other) && backend_kind.is_some_and(|b| b != *other) {
            let at = t.table_at(other);
            sink.at(
                at,
                format!(
                    "[{}] does not belong on a volume with backend = \"{}\": only backend = \"{other}\" uses it",
                    t.key_path(other),
                    backend_kind.unwrap_or_default()
                ),
            );
        }
    }
    let (backend, storage) = match backend_kind {
        None => (None, None),
        Some(kind) => match t.table(sink, kind) {
            None => {
                if !t.has(kind) {
                    let what = match kind {
                        "nbd" => "server, export",
                        _ => "path",
                    };
                    sink.at(
                        t.at,
                        format!(
                            "backend = \"{kind}\" needs a [{}] table ({what})",
                            t.key_path(kind)
                        ),
                    );
                }
                (None, None)
            }
            Some(bt) => match kind {
                "nbd" => match read_nbd(&bt, sink) {
                    Some((nbd, at)) => {
                        let key = format!("NBD export \"{}\" on {}", nbd.export, nbd.server);
                        (Some(Backend::Nbd(nbd)), Some(At::new(key, at)))
                    }
                    None => (None, None),
                },
                _ => {
                    bt.deny_unknown(sink, PATH_KEYS);
                    match required_path_at(
                        sink,
                        &bt,
                        "path",
                        if kind == "dir" {
                            "the shared directory"
                        } else {
                            "the image file"
                        },
                    ) {
                        Some(p) => {
                            let key = format!(
                                "{} {}",
                                if kind == "dir" { "directory" } else { "image" },
                                p.value.display()
                            );
                            let storage = At::new(key, p.at);
                            if kind == "dir" {
                                (Some(Backend::Dir { path: p.value }), Some(storage))
                            } else {
                                (Some(Backend::Image { path: p.value }), Some(storage))
                            }
                        }
                        None => (None, None),
                    }
                }
            },
        },
    };
    let is_dir = backend_kind == Some("dir");

    // mount
    let mount = match t.string(sink, "mount_path") {
        Some(s) => match abs_path(sink, &t.key_path("mount_path"), &s) {
            Some(p) if p == Path::new("/") => {
                sink.at(
                    s.at,
                    format!("`{}` must not be \"/\"", t.key_path("mount_path")),
                );
                None
            }
            Some(p) => Some(At::new(p, s.at)),
            None => None,
        },
        None => {
            if !t.has("mount_path") {
                sink.at(
                    t.at,
                    format!(
                        "{} is missing the required key `mount_path` (an absolute path)",
                        t.describe()
                    ),
                );
            }
            None
        }
    };

    let filesystem = match keyword(
        sink,
        t,
        "filesystem",
        &[
            ("ext2", Filesystem::Ext2),
            ("ext3", Filesystem::Ext3),
            ("ext4", Filesystem::Ext4),
            ("xfs", Filesystem::Xfs),
        ],
    ) {
        Some(f) if is_dir => {
            sink.at(
                f.at,
                format!(
                    "`{}` does not apply to a dir volume (there is no device to format)",
                    t.key_path("filesystem")
                ),
            );
            None
        }
        Some(f) => Some(f.value),
        None if t.has("filesystem") => None,
        None if is_dir => None,
        None => Some(Filesystem::Ext4),
    };

    let mount_options = match t.string_array(sink, "mount_options") {
        Some(opts) => {
            let mut good = Vec::new();
            for (i, o) in opts.items.into_iter().enumerate() {
                if o.value.is_empty()
                    || o.value.contains(',')
                    || o.value.chars().any(char::is_whitespace)
                {
                    sink.at(
                        o.at,
                        format!(
                            "`{}[{i}]` = \"{}\" is not a single mount option (no commas, spaces or empty strings)",
                            t.key_path("mount_options"),
                            o.value
                        ),
                    );
                } else {
                    good.push(o.value);
                }
            }
            good
        }
        None => Vec::new(),
    };

    let fsck = match keyword(
        sink,
        t,
        "fsck",
        &[
            ("auto", FsckPolicy::Auto),
            ("force", FsckPolicy::Force),
            ("never", FsckPolicy::Never),
        ],
    ) {
        Some(f) if is_dir && f.value != FsckPolicy::Never => {
            sink.at(
                f.at,
                format!(
                    "`{}` must be \"never\" for a dir volume (a shared directory cannot be checked)",
                    t.key_path("fsck")
                ),
            );
            FsckPolicy::Never
        }
        Some(f) => f.value,
        None => {
            if is_dir {
                FsckPolicy::Never
            } else {
                FsckPolicy::Auto
            }
        }
    };

    let fencing = read_fencing_keys(t, sink, &global.values);

    let task = t.table(sink, "task").and_then(|tt| read_task(&tt, sink));

    let restart = match t.table(sink, "restart") {
        Some(rt) => {
            if !t.has("task") {
                sink.at(
                    rt.at,
                    format!(
                        "[{}] has no effect: the volume has no [{}] (the mount is handed to a scheduler)",
                        rt.path,
                        t.key_path("task")
                    ),
                );
            }
            read_restart(&rt, sink).unwrap_or_default()
        }
        None => RestartPolicy::default(),
    };

    // Even with errors elsewhere in the volume, the cross-table checks (mount paths,
    // storage, budget) run when the parts they use could be read; the config itself
    // is not built when anything failed.
    let activation = match keyword(
        sink,
        t,
        "activation",
        &[
            ("always", Activation::Always),
            ("on-demand", Activation::OnDemand),
        ],
    ) {
        Some(a) => Some(a.value),
        None if t.has("activation") => None,
        None => Some(Activation::Always),
    };

    let (Some(backend), Some(mount), Some(activation)) = (backend, mount, activation) else {
        return None;
    };
    let mut read = volume_read(
        name,
        t,
        backend,
        mount,
        storage,
        filesystem,
        mount_options,
        fsck,
        fencing,
        task,
        restart,
    );
    read.cfg.activation = activation;
    read.cfg.policy.start_out = activation == Activation::OnDemand;
    Some(read)
}

#[allow(clippy::too_many_arguments)]
fn volume_read(
    name: &str,
    t: &Table<'_>,
    backend: Backend,
    mount: At<PathBuf>,
    storage: Option<At<String>>,
    filesystem: Option<Filesystem>,
    mount_options: Vec<String>,
    fsck: FsckPolicy,
    fencing: FencingRead,
    task: Option<TaskConfig>,
    restart: RestartPolicy,
) -> VolumeRead {
    let f = &fencing.values;
    let timings = Timings {
        session_timeout: DEFAULT_SESSION_TIMEOUT,
        suspend_grace: f.suspend_grace,
        stop_grace: f.stop_grace,
        unmount_budget: f.unmount_budget,
        detach_budget: f.detach_budget,
        margin: f.margin,
        lock_delay: f.lock_delay,
        watchdog_timeout: None,
        backoff_initial: f.backoff_initial,
        backoff_max: f.backoff_max,
        handover_backoff: f.handover_backoff,
        ..Timings::default()
    };
    let policy = VolumePolicy {
        timings,
        restart,
        fsck,
        has_device: !matches!(backend, Backend::Dir { .. }),
        has_task: task.is_some() || t.has("task"),
        start_out: false,
    };
    let cfg = VolumeConfig {
        name: name.to_string(),
        backend,
        mount_path: mount.value,
        filesystem,
        mount_options,
        fsck,
        fencing: fencing.values.clone(),
        fencing_overrides: fencing.set_at.keys().map(|k| k.to_string()).collect(),
        task,
        restart,
        activation: Activation::Always,
        policy,
    };
    VolumeRead {
        cfg,
        at: t.at,
        mount_at: mount.at,
        storage,
        fencing,
    }
}

fn read_nbd(t: &Table<'_>, sink: &mut Sink<'_>) -> Option<(NbdConfig, usize)> {
    t.deny_unknown(sink, NBD_KEYS);
    let mut ok = true;
    let server = match t.string(sink, "server") {
        Some(s) => {
            let parsed = match s.value.strip_prefix("unix:") {
                Some(p) => abs_path(
                    sink,
                    &format!("{} (unix socket)", t.key_path("server")),
                    &At::new(p.to_string(), s.at),
                )
                .map(NbdServer::Unix),
                None => match parse_host_port(&s.value) {
                    Ok(hp) => Some(NbdServer::Tcp(hp)),
                    Err(why) => {
                        sink.at(
                            s.at,
                            format!(
                                "`{}` = \"{}\" is not HOST:PORT or unix:/PATH: {why}",
                                t.key_path("server"),
                                s.value
                            ),
                        );
                        None
                    }
                },
            };
            parsed.map(|p| At::new(p, s.at))
        }
        None => {
            if !t.has("server") {
                sink.at(
                    t.at,
                    format!(
                        "{} is missing the required key `server` (HOST:PORT or unix:/PATH)",
                        t.describe()
                    ),
                );
            }
            None
        }
    };
    ok &= server.is_some();
    let export = match t.string(sink, "export") {
        Some(e) if e.value.is_empty() => {
            sink.at(
                e.at,
                format!("`{}` must not be empty", t.key_path("export")),
            );
            None
        }
        Some(e) => Some(e.value),
        None => {
            if !t.has("export") {
                sink.at(
                    t.at,
                    format!(
                        "{} is missing the required key `export` (the export name)",
                        t.describe()
                    ),
                );
            }
            None
        }
    };
    ok &= export.is_some();
    let timeout = positive(sink, t, "timeout", DEFAULT_NBD_TIMEOUT);
    ok &= timeout.is_some();
    let dead_conn_timeout = match t.duration(sink, "dead_conn_timeout") {
        Some(d) => Some(d.value),
        None if t.has("dead_conn_timeout") => None,
        None => Some(DEFAULT_NBD_DEAD_CONN_TIMEOUT),
    };
    ok &= dead_conn_timeout.is_some();
    let connections = match t.integer(sink, "connections", 1, MAX_NBD_CONNECTIONS) {
        Some(n) => u32::try_from(n.value).ok(),
        None if t.has("connections") => None,
        None => Some(1),
    };
    ok &= connections.is_some();
    if !ok {
        return None;
    }
    let server = server?;
    Some((
        NbdConfig {
            server: server.value,
            export: export?,
            timeout: timeout?,
            dead_conn_timeout: dead_conn_timeout?,
            connections: connections?,
        },
        server.at,
    ))
}

fn read_task(t: &Table<'_>, sink: &mut Sink<'_>) -> Option<TaskConfig> {
    t.deny_unknown(sink, TASK_KEYS);
    let mut ok = true;
    let exec = match t.string_array(sink, "exec") {
        Some(a) => match a.items.first() {
            None => {
                if a.complete {
                    sink.at(
                        a.at,
                        format!(
                            "`{}` is empty: give the command and its arguments",
                            t.key_path("exec")
                        ),
                    );
                }
                None
            }
            // Some element is not a string (already reported).
            Some(_) if !a.complete => None,
            Some(first) if !first.value.starts_with('/') => {
                sink.at(
                    first.at,
                    format!(
                        "`{}[0]` = \"{}\" must be an absolute path (the task is not looked up in PATH)",
                        t.key_path("exec"),
                        first.value
                    ),
                );
                None
            }
            Some(_) => Some(a.items.into_iter().map(|s| s.value).collect::<Vec<_>>()),
        },
        None => {
            ok &= !t.has("exec");
            None
        }
    };
    let unit = match t.string(sink, "systemd_unit") {
        Some(u) => match check_unit_name(&u.value) {
            Ok(()) => Some(u.value),
            Err(why) => {
                sink.at(
                    u.at,
                    format!(
                        "`{}` = \"{}\" is not a unit name: {why}",
                        t.key_path("systemd_unit"),
                        u.value
                    ),
                );
                None
            }
        },
        None => {
            ok &= !t.has("systemd_unit");
            None
        }
    };
    let run = match (t.has("exec"), t.has("systemd_unit")) {
        (true, true) => {
            sink.at(
                t.at,
                format!(
                    "{} sets both `exec` and `systemd_unit`: set exactly one",
                    t.describe()
                ),
            );
            None
        }
        (false, false) => {
            sink.at(
                t.at,
                format!(
                    "{} needs `exec` (a command) or `systemd_unit` (a unit name)",
                    t.describe()
                ),
            );
            None
        }
        (true, false) => exec.map(TaskRun::Exec),
        (false, true) => unit.map(TaskRun::SystemdUnit),
    };
    ok &= run.is_some();

    let user = match t.string(sink, "user") {
        Some(u) if t.has("systemd_unit") => {
            sink.at(
                u.at,
                format!(
                    "`{}` only applies to exec tasks: a systemd unit sets User= in its unit file",
                    t.key_path("user")
                ),
            );
            ok = false;
            None
        }
        Some(u) => match check_user(&u.value) {
            Ok(()) => Some(u.value),
            Err(why) => {
                sink.at(
                    u.at,
                    format!(
                        "`{}` = \"{}\" is not a user name: {why}",
                        t.key_path("user"),
                        u.value
                    ),
                );
                ok = false;
                None
            }
        },
        None => {
            ok &= !t.has("user");
            None
        }
    };

    let env = match t.string_map(sink, "env") {
        Some(m) => {
            let mut env = BTreeMap::new();
            for (k, v) in m {
                if !is_env_name(&k) {
                    sink.at(
                        v.at,
                        format!(
                            "`{}.{k}` is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)",
                            t.key_path("env")
                        ),
                    );
                    ok = false;
                } else if v.value.contains('\0') {
                    sink.at(
                        v.at,
                        format!("`{}.{k}` contains a NUL character", t.key_path("env")),
                    );
                    ok = false;
                } else {
                    env.insert(k, v.value);
                }
            }
            env
        }
        None => {
            ok &= !t.has("env");
            BTreeMap::new()
        }
    };
    if !ok {
        return None;
    }
    Some(TaskConfig {
        run: run?,
        user,
        env,
    })
}

fn read_restart(t: &Table<'_>, sink: &mut Sink<'_>) -> Option<RestartPolicy> {
    t.deny_unknown(sink, RESTART_KEYS);
    let d = RestartPolicy::default();
    let mode = match keyword(
        sink,
        t,
        "policy",
        &[
            ("always", RestartMode::Always),
            ("on-failure", RestartMode::OnFailure),
            ("never", RestartMode::Never),
        ],
    ) {
        Some(m) => Some(m.value),
        None if t.has("policy") => None,
        None => Some(d.mode),
    };
    let max = match t.integer(sink, "max_restarts", 0, i64::from(u32::MAX)) {
        Some(n) => u32::try_from(n.value).ok(),
        None if t.has("max_restarts") => None,
        None => Some(d.max_restarts),
    };
    let backoff = match t.duration(sink, "backoff") {
        Some(b) => Some(b.value),
        None if t.has("backoff") => None,
        None => Some(d.backoff),
    };
    Some(RestartPolicy {
        mode: mode?,
        max_restarts: max?,
        backoff: backoff?,
    })
}

/// A systemd unit name for a service: `[A-Za-z0-9:_.\\@-]+` ending in `.service`.
fn check_unit_name(u: &str) -> Result<(), String> {
    if let Some(c) = u
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '.' | '\\' | '@' | '-')))
    {
        return Err(format!("{c:?} is not allowed in a unit name"));
    }
    if u.strip_suffix(".service").map_or(true, str::is_empty) {
        return Err("it must end in \".service\", e.g. \"mysql.service\"".to_string());
    }
    if u.len() > 255 {
        return Err("it is longer than 255 characters".to_string());
    }
    Ok(())
}

/// A user name (`[A-Za-z_][A-Za-z0-9_.-]*`, at most 32 characters) or a numeric uid.
fn check_user(u: &str) -> Result<(), String> {
    if !u.is_empty() && u.chars().all(|c| c.is_ascii_digit()) {
        return u
            .parse::<u32>()
            .map(|_| ())
            .map_err(|_| "the uid is too large".to_string());
    }
    let mut chars = u.chars();
    match chars.next() {
        None => return Err("it is empty".to_string()),
        Some(c) if !(c.is_ascii_alphabetic() || c == '_') => {
            return Err("it must start with a letter or '_'".to_string());
        }
        _ => {}
    }
    if let Some(c) = chars.find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))) {
        return Err(format!("{c:?} is not allowed"));
    }
    if u.len() > 32 {
        return Err("it is longer than 32 characters".to_string());
    }
    Ok(())
}

fn is_env_name(k: &str) -> bool {
    let mut chars = k.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

// ---------------------------------------------------------------------------
// Cross-table checks

/// Mount paths must be distinct and not nested; no two volumes may share backing storage.
fn check_unique_storage(volumes: &[VolumeRead], sink: &mut Sink<'_>) {
    for (i, v) in volumes.iter().enumerate() {
        for earlier in &volumes[..i] {
            let (a, b) = (&earlier.cfg.mount_path, &v.cfg.mount_path);
            if a == b {
                sink.at(
                    v.mount_at,
                    format!(
                        "volume \"{}\": mount_path \"{}\" is also the mount_path of volume \"{}\": \
                         each volume needs its own mount point",
                        v.cfg.name,
                        b.display(),
                        earlier.cfg.name
                    ),
                );
            } else if b.starts_with(a) || a.starts_with(b) {
                let (inner, outer) = if b.starts_with(a) {
                    (v, earlier)
                } else {
                    (earlier, v)
                };
                sink.at(
                    v.mount_at,
                    format!(
                        "volume \"{}\": mount_path \"{}\" is inside the mount_path \"{}\" of volume \"{}\": \
                         mount points must not be nested (one mount would hide or pin the other)",
                        inner.cfg.name,
                        inner.cfg.mount_path.display(),
                        outer.cfg.mount_path.display(),
                        outer.cfg.name
                    ),
                );
            }
            if let (Some(sa), Some(sb)) = (&earlier.storage, &v.storage) {
                if sa.value == sb.value {
                    sink.at(
                        sb.at,
                        format!(
                            "volume \"{}\" uses the same {} as volume \"{}\": each has its own lease, \
                             so both could be attached and written at once",
                            v.cfg.name, sb.value, earlier.cfg.name
                        ),
                    );
                }
            }
        }
    }
}

/// Each volume's fencing budget must fit within the session timeout.
fn check_budgets(
    volumes: &[VolumeRead],
    global: &FencingRead,
    session: Session,
    sink: &mut Sink<'_>,
) {
    // Volumes blamed at the same place with the same sum are reported once.
    let mut failures: Vec<(usize, String, Vec<String>)> = Vec::new();
    for v in volumes {
        if !v.fencing.all_ok {
            continue;
        }
        let budget = v.cfg.policy.timings.fence_budget();
        if budget.fits() {
            continue;
        }
        let at = blame(&v.fencing.set_at, &v.cfg.fencing)
            .or_else(|| blame(&global.set_at, &global.values))
            .or(session.at)
            .or(global.at)
            .unwrap_or(v.at);
        let verdict = budget.verdict();
        match failures
            .iter_mut()
            .find(|(a, vd, _)| *a == at && *vd == verdict)
        {
            Some((_, _, names)) => names.push(v.cfg.name.clone()),
            None => failures.push((at, verdict, vec![v.cfg.name.clone()])),
        }
    }
    for (at, verdict, names) in failures {
        let who = if names.len() == 1 {
            format!("volume \"{}\"", names.join(""))
        } else {
            let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
            format!("volumes {}", quoted.join(", "))
        };
        sink.at(at, format!("{who}: fencing budget: {verdict}"));
    }
}

/// The budget key a table sets with the largest value (the likeliest culprit), in budget order on ties.
fn blame(set_at: &BTreeMap<&'static str, usize>, values: &FencingConfig) -> Option<usize> {
    let mut best: Option<(Duration, usize)> = None;
    for (_, key) in BUDGET_KEYS {
        if let (Some(at), Some(d)) = (set_at.get(key), values.get(key)) {
            if best.map_or(true, |(bd, _)| d > bd) {
                best = Some((d, *at));
            }
        }
    }
    best.map(|(_, at)| at)
}

/// The watchdog must fire before another node can win: `timeout ≤ session_timeout − margin`
/// for every volume's margin.
fn check_watchdog(
    wd: &WatchdogRead,
    volumes: &[VolumeRead],
    global: &FencingRead,
    session: Session,
    sink: &mut Sink<'_>,
) {
    let Some(timeout) = wd.cfg.timeout() else {
        return;
    };
    // The largest margin decides; name the volume it comes from when it is an override.
    let mut margin = global.values.margin;
    let mut from: Option<&str> = None;
    for v in volumes {
        if v.fencing.all_ok && v.cfg.fencing.margin > margin {
            margin = v.cfg.fencing.margin;
            from = Some(&v.cfg.name);
        }
    }
    let limit = session.value.saturating_sub(margin);
    if timeout > limit {
        let whose = match from {
            Some(name) => format!("volume \"{name}\"'s margin"),
            None => "margin".to_string(),
        };
        sink.at(
            wd.timeout_at,
            format!(
                "watchdog timeout {} exceeds the ZooKeeper session timeout {} minus {whose} {} = {}: \
                 a stuck holder would be reset only after another node could win the lease",
                fmt_duration(timeout),
                fmt_duration(session.value),
                fmt_duration(margin),
                fmt_duration(limit)
            ),
        );
    }
}

// ---------------------------------------------------------------------------
// Shared value helpers

/// One of a fixed set of words.
fn keyword<T: Copy>(
    sink: &mut Sink<'_>,
    t: &Table<'_>,
    key: &str,
    options: &[(&str, T)],
) -> Option<At<T>> {
    let s = t.string(sink, key)?;
    match options.iter().find(|(name, _)| *name == s.value) {
        Some((_, v)) => Some(At::new(*v, s.at)),
        None => {
            let names: Vec<String> = options.iter().map(|(n, _)| format!("\"{n}\"")).collect();
            sink.at(
                s.at,
                format!(
                    "`{}` = \"{}\" is not one of {}",
                    t.key_path(key),
                    s.value,
                    names.join(", ")
                ),
            );
            None
        }
    }
}

/// A duration > 0, or `default` when absent; `None` on errors.
fn positive(sink: &mut Sink<'_>, t: &Table<'_>, key: &str, default: Duration) -> Option<Duration> {
    match t.duration(sink, key) {
        Some(d) if d.value.is_zero() => {
            sink.at(
                d.at,
                format!("`{}` must be greater than 0", t.key_path(key)),
            );
            None
        }
        Some(d) => Some(d.value),
        None if t.has(key) => None,
        None => Some(default),
    }
}

/// An absolute path, normalized (no `.`, no duplicate or trailing `/`); `..` and NUL are refused.
fn abs_path(sink: &mut Sink<'_>, what: &str, s: &At<String>) -> Option<PathBuf> {
    let p = Path::new(&s.value);
    let why = if s.value.is_empty() {
        Some("it is empty")
    } else if !p.is_absolute() {
        Some("it must be an absolute path (starting with '/')")
    } else if p.components().any(|c| c == Component::ParentDir) {
        Some("it must not contain \"..\"")
    } else if s.value.contains('\0') {
        Some("it contains a NUL character")
    } else {
        None
    };
    match why {
        Some(why) => {
            sink.at(s.at, format!("`{what}` = \"{}\": {why}", s.value));
            None
        }
        None => Some(p.components().collect()),
    }
}

/// A required absolute path; a missing key is reported at the table.
fn required_path_at(
    sink: &mut Sink<'_>,
    t: &Table<'_>,
    key: &str,
    what: &str,
) -> Option<At<PathBuf>> {
    match t.string(sink, key) {
        Some(s) => abs_path(sink, &t.key_path(key), &s).map(|p| At::new(p, s.at)),
        None => {
            if !t.has(key) {
                sink.at(
                    t.at,
                    format!(
                        "{} is missing the required key `{key}` ({what})",
                        t.describe()
                    ),
                );
            }
            None
        }
    }
}

fn required_path(sink: &mut Sink<'_>, t: &Table<'_>, key: &str, what: &str) -> Option<PathBuf> {
    required_path_at(sink, t, key, what).map(|p| p.value)
}

/// `Some(None)` when absent, `Some(Some(path))` when valid, `None` on errors.
fn optional_path(sink: &mut Sink<'_>, t: &Table<'_>, key: &str) -> Option<Option<PathBuf>> {
    match t.string(sink, key) {
        Some(s) => abs_path(sink, &t.key_path(key), &s).map(Some),
        None if t.has(key) => None,
        None => Some(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port() {
        assert_eq!(
            parse_host_port("zk1:2181"),
            Ok(HostPort {
                host: "zk1".into(),
                port: 2181
            })
        );
        assert_eq!(
            parse_host_port("[::1]:2181"),
            Ok(HostPort {
                host: "::1".into(),
                port: 2181
            })
        );
        assert_eq!(
            parse_host_port("[::1]:2181").map(|h| h.to_string()),
            Ok("[::1]:2181".to_string())
        );
        for bad in [
            "zk1",
            "zk1:",
            ":2181",
            "zk1:0",
            "zk1:65536",
            "zk1:+1",
            "::1:2181",
            "[::1]",
            "a b:1",
            "zk:21/x",
        ] {
            assert!(parse_host_port(bad).is_err(), "{bad}");
        }
        assert!(parse_host_port("zk1:65535").is_ok());
    }

    #[test]
    fn zk_paths() {
        for good in ["/", "/nbd-failover", "/a/b", "/zookeeper2"] {
            assert!(check_zk_path(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "nbd",
            "/a/",
            "/a//b",
            "/a/./b",
            "/..",
            "/zookeeper",
            "/zookeeper/x",
        ] {
            assert!(check_zk_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names() {
        assert!(check_volume_name("mysql").is_ok());
        assert!(check_volume_name("0db.a_b-c").is_ok());
        assert!(check_volume_name(&"a".repeat(63)).is_ok());
        for bad in ["", "MySQL", "-a", ".a", "a/b", "a b", &"a".repeat(64)] {
            assert!(check_volume_name(bad).is_err(), "{bad}");
        }
        assert!(check_node_id("agent-1.example_X").is_ok());
        for bad in ["", ".", "..", "a/b", "a:b", "é"] {
            assert!(check_node_id(bad).is_err(), "{bad}");
        }
        assert!(check_unit_name("mysql.service").is_ok());
        assert!(check_unit_name("getty@tty1.service").is_ok());
        for bad in ["mysql", ".service", "my sql.service", "mysql.socket"] {
            assert!(check_unit_name(bad).is_err(), "{bad}");
        }
        assert!(check_user("mysql").is_ok());
        assert!(check_user("1000").is_ok());
        assert!(check_user("1a").is_err());
        assert!(is_env_name("_A1") && !is_env_name("1A") && !is_env_name("A-B"));
    }
}
