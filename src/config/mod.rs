//! Config file: TOML schema, defaults, validation with file:line:column errors, check-config report.
//!
//! [`load`] / [`parse`] read a TOML file into a validated [`Config`], or return
//! *every* problem found as [`ConfigErrors`], each one `FILE:LINE:COL: error:
//! <rule broken>`. Each volume carries the
//! [`VolumePolicy`](crate::core::policy::VolumePolicy) the core decides
//! with ([`VolumeConfig::policy`]), built from `[zookeeper]`, `[watchdog]`,
//! `[fencing]` and the volume's own overrides.
//!
//! Checked, besides TOML syntax: unknown keys (every table has a fixed key
//! set), required keys and tables, value types, durations (humantime strings:
//! `"500ms"`, `"3s"`, `"1m"`), enums, `host:port`, absolute paths, names,
//! unique and non-nested mount paths, no two volumes on the same backing
//! storage, backend/table consistency, and the safety rules:
//! - each volume's fencing budget: `suspend_grace + stop_grace +
//!   unmount_budget + detach_budget + margin ≤ zookeeper.session_timeout`;
//! - `watchdog.timeout ≤ session_timeout − margin`.
//!
//! See `examples/nbd-failover.toml` for every key with its default.
//!
//! # Layout
//! - `error`: [`ConfigError`], [`ConfigErrors`] and offset → line/column;
//! - `reader`: error-collecting typed access to the `toml_edit` document;
//! - `schema`: the tables, defaults and rules;
//! - `model`: the validated [`Config`] types;
//! - `report`: [`report`], [`effective_toml`] and [`to_json`].

mod error;
mod model;
mod reader;
mod report;
mod schema;

use std::io::Write;
use std::path::Path;

pub use error::{ConfigError, ConfigErrors};
pub use model::{
    fmt_config_duration, Activation, Backend, Config, ControlConfig, FencingConfig, Filesystem,
    HostPort, MesosConfig, MetricsConfig, NbdConfig, NbdServer, NodeConfig, TaskConfig, TaskRun,
    VolumeConfig, WatchdogConfig, ZooKeeperAuth, ZooKeeperConfig, ZooKeeperTls, FENCING_KEYS,
};
pub use report::{budget_report, effective_toml, nbd_backstop_note, report, to_json};
pub use schema::{
    DEFAULT_ACQUIRE_WAIT, DEFAULT_CHROOT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_LABEL_KEY,
    DEFAULT_METRICS_LISTEN, DEFAULT_NBD_DEAD_CONN_TIMEOUT, DEFAULT_NBD_TIMEOUT, DEFAULT_RUN_DIR,
    DEFAULT_SESSION_TIMEOUT, DEFAULT_STATE_DIR, DEFAULT_WATCHDOG_DEVICE, MAX_NBD_CONNECTIONS,
    MESOS_KILL_AFTER, SESSION_TIMEOUT_RANGE,
};

/// Reads and validates the config file at `path`.
///
/// A file that cannot be read (missing, unreadable, not UTF-8) is one
/// [`ConfigError`] without position naming the path.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| {
        let why = if path.is_dir() {
            "it is a directory".to_string()
        } else {
            e.to_string()
        };
        ConfigErrors::new(
            &name,
            vec![ConfigError::whole_file(
                &name,
                format!("cannot read the config file: {why}"),
            )],
        )
    })?;
    let src = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let valid = String::from_utf8_lossy(&e.as_bytes()[..at]).into_owned();
        let (line, column) = error::line_col(&valid, at);
        ConfigErrors::new(
            &name,
            vec![ConfigError::new(
                &name,
                line,
                column,
                "the file is not valid UTF-8",
            )],
        )
    })?;
    parse(&src, &name)
}

/// Validates config text; `file_name` is used in error messages and [`Config::file`].
///
/// When `node.id` is not set, the host name (`/proc/sys/kernel/hostname`) is used.
pub fn parse(src: &str, file_name: &str) -> Result<Config, ConfigErrors> {
    parse_with_hostname(src, file_name, &read_hostname)
}

/// [`parse`] with the host-name lookup supplied (for tests and tools).
pub fn parse_with_hostname(
    src: &str,
    file_name: &str,
    hostname: &dyn Fn() -> Result<String, String>,
) -> Result<Config, ConfigErrors> {
    let mut sink = error::Sink::new(src, file_name);
    let doc = match toml_edit::ImDocument::parse(src) {
        Ok(doc) => doc,
        Err(e) => {
            let msg = e.message().trim().replace('\n', "; ");
            sink.span(e.span(), format!("TOML syntax: {msg}"));
            return Err(sink.into_errors());
        }
    };
    let root = reader::Table::root(doc.as_table());
    match schema::read(&root, &mut sink, file_name, hostname) {
        Some(cfg) if sink.is_empty() => Ok(cfg),
        _ => Err(sink.into_errors()),
    }
}

/// The host name, the default `node.id`.
fn read_hostname() -> Result<String, String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("/proc/sys/kernel/hostname: {e}"))
}

/// `nbd-failover check-config FILE [--json]`: prints the report (or JSON) and
/// returns 0, or prints every error and a summary line to `err` and returns 1.
pub fn check_config(path: &Path, json: bool, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    match load(path) {
        Ok(cfg) => {
            let text = if json {
                match to_json(&cfg).and_then(|v| serde_json::to_string_pretty(&v)) {
                    Ok(s) => s + "\n",
                    Err(e) => {
                        let _ = writeln!(err, "check-config: cannot render JSON: {e}");
                        return 1;
                    }
                }
            } else {
                report(&cfg)
            };
            match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                Ok(()) => 0,
                Err(e) => {
                    let _ = writeln!(err, "check-config: cannot write the report: {e}");
                    1
                }
            }
        }
        Err(errors) => {
            for e in &errors {
                let _ = writeln!(err, "{e}");
            }
            let _ = writeln!(
                err,
                "check-config: {} error(s) in {}",
                errors.len(),
                errors.file()
            );
            1
        }
    }
}

#[cfg(test)]
mod tests;
