//! Logging set-up: tracing to the systemd journal (structured fields as journal fields) when stderr is the journal, else to stderr.
//!
//! Under systemd with `StandardError=journal` (the default), the service
//! manager sets `JOURNAL_STREAM=<dev>:<ino>` to the device and inode of the
//! stream it connected to stdout/stderr (systemd.exec(5), "Environment
//! variables set or propagated by the service manager"). Checking that the
//! variable is *set* is not enough: a child may inherit it with stderr
//! redirected elsewhere. So [`init`] compares it with stderr's own
//! `st_dev:st_ino` ([`journal_stream_matches`]); only on a match does it log
//! through the journal's native protocol ([`tracing_journald`]), where each
//! event's fields (`volume`, `phase`, `generation`, …) become journal fields
//! (`VOLUME=`, `PHASE=`, `GENERATION=`, so `journalctl VOLUME=db` works), the
//! level becomes `PRIORITY=`, and `SYSLOG_IDENTIFIER=nbd-failover`
//! (`journalctl -t nbd-failover`). Field names must therefore not collide
//! with the journal's own (`message`, `priority`, `code_file` …).
//!
//! Otherwise — a terminal, a pipe, a file, or a journal socket that cannot be
//! opened (then with a warning) — events go to stderr in `tracing`'s usual
//! human format, coloured only on a terminal.

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// The journal's `SYSLOG_IDENTIFIER` for our entries.
pub const SYSLOG_IDENTIFIER: &str = "nbd-failover";

/// Where [`init`] sent the logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The systemd journal, native protocol.
    Journal,
    /// Standard error, human format.
    Stderr,
}

/// Whether a `JOURNAL_STREAM` value (`"<dev>:<ino>"`, both decimal) names
/// the stream whose device and inode are `dev` and `ino`. A malformed value
/// never matches.
pub fn journal_stream_matches(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.split_once(':') else {
        return false;
    };
    let parse = |s: &str| {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            None
        } else {
            s.parse::<u64>().ok()
        }
    };
    matches!((parse(d), parse(i)), (Some(d), Some(i)) if d == dev && i == ino)
}

/// Whether this process's stderr is the stream systemd connected to the journal.
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some(value) = value.to_str() else {
        return false;
    };
    use std::os::fd::AsRawFd;
    match nix::sys::stat::fstat(std::io::stderr().as_raw_fd()) {
        // st_dev and st_ino are u64 on Linux; `as` keeps other targets building.
        #[allow(clippy::unnecessary_cast)]
        Ok(st) => journal_stream_matches(value, st.st_dev as u64, st.st_ino as u64),
        Err(_) => false,
    }
}

/// The level filter: `RUST_LOG` when set and valid, else `default_level`
/// (else `info`). Returns a warning to log once logging is up, if any.
fn filter(default_level: &str) -> (EnvFilter, Option<String>) {
    let mut warning = None;
    if let Ok(spec) = std::env::var("RUST_LOG") {
        if !spec.trim().is_empty() {
            match EnvFilter::try_new(&spec) {
                Ok(f) => return (f, None),
                Err(e) => {
                    warning = Some(format!(
                        "RUST_LOG={spec:?} is not a valid filter ({e}); using {default_level:?}"
                    ))
                }
            }
        }
    }
    match EnvFilter::try_new(default_level) {
        Ok(f) => (f, warning),
        Err(e) => (
            EnvFilter::new("info"),
            Some(format!(
                "log level {default_level:?} is not a valid filter ({e}); using \"info\""
            )),
        ),
    }
}

/// Sets up the global `tracing` subscriber: to the journal when stderr is
/// the journal (see the module docs), else to stderr. `RUST_LOG` overrides
/// `default_level` (e.g. `"info"`, `"nbd_failover=debug,warn"`). Calling it
/// again, or after another subscriber was set, changes nothing.
pub fn init(default_level: &str) {
    let _ = init_target(default_level);
}

/// Like [`init`]; returns where the logs go, or `None` if a global subscriber
/// was already set (then nothing changed).
pub fn init_target(default_level: &str) -> Option<Target> {
    let (filter, filter_warning) = filter(default_level);
    let mut journal_error = None;
    let target = if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer
                    .with_syslog_identifier(SYSLOG_IDENTIFIER.to_string())
                    .with_field_prefix(None);
                tracing_subscriber::registry()
                    .with(filter)
                    .with(layer)
                    .try_init()
                    .ok()?;
                Target::Journal
            }
            Err(e) => {
                journal_error = Some(e);
                init_stderr(filter)?
            }
        }
    } else {
        init_stderr(filter)?
    };
    if let Some(e) = journal_error {
        tracing::warn!(error = %e, "stderr is the journal but its socket cannot be opened; logging to stderr");
    }
    if let Some(w) = filter_warning {
        tracing::warn!("{w}");
    }
    Some(target)
}

fn init_stderr(filter: EnvFilter) -> Option<Target> {
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init()
        .ok()?;
    Some(Target::Stderr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_must_match_device_and_inode() {
        assert!(journal_stream_matches("8:12345", 8, 12345));
        assert!(journal_stream_matches("0:1", 0, 1));
        assert!(journal_stream_matches(
            "18446744073709551615:18446744073709551615",
            u64::MAX,
            u64::MAX
        ));
        assert!(!journal_stream_matches("8:12345", 8, 12346), "other inode");
        assert!(!journal_stream_matches("8:12345", 9, 12345), "other device");
        assert!(!journal_stream_matches("12345:8", 8, 12345), "swapped");
        for bad in [
            "",
            ":",
            "8",
            "8:",
            ":12345",
            "8:12345:1",
            "8 :12345",
            " 8:12345",
            "8:12345\n",
            "+8:12345",
            "-8:12345",
            "0x8:12345",
            "8:1e3",
            "99999999999999999999:1",
        ] {
            assert!(!journal_stream_matches(bad, 8, 12345), "{bad:?} matched");
        }
    }

    #[test]
    fn a_bad_default_level_falls_back_to_info() {
        // Only the default path: RUST_LOG is whatever the test runner has.
        if std::env::var_os("RUST_LOG").is_none() {
            let (_, warning) = filter("not a [valid filter");
            assert!(warning.is_some());
            let (_, warning) = filter("debug");
            assert!(warning.is_none());
        }
    }
}
