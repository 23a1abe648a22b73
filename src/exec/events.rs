//! Executor results → the core's completion events: a failure becomes `Err(message)` in the event, never a panic.
//!
//! | effect | executor call | event |
//! |---|---|---|
//! | `Attach` | [`super::LoopDevices::attach`] (or the NBD module) | [`attached`] → `Event::Attached` |
//! | `Fsck` | [`super::Fsck::check`] | [`fsck_done`] → `Event::FsckDone` (an error is a refusal) |
//! | `Mount` | [`super::Mounter::mount`] | [`mounted`] → `Event::Mounted` |
//! | `StartTask` | [`super::TaskRunner::start`] | [`task_started`] → `Event::TaskStarted`, later [`task_exited`] |
//! | `SignalTask` | [`super::TaskRunner::signal`] | [`task_signalled`] → `Event::TaskSignalled` |
//! | `Unmount` | [`super::Mounter::unmount`] | [`unmounted`] → `Event::Unmounted` |
//! | `Detach` | [`super::LoopDevices::detach`] (or the NBD module) | [`detached`] → `Event::Detached` |
//!
//! A panic inside a `spawn_blocking` executor call (a bug) should be mapped
//! with [`join_failure`], so even that reaches the core as a failed effect.

use crate::core::{Event, ExitStatus, FsckOutcome, Outcome};

use super::error_chain;
use super::fsck::{FsckError, FsckReport};

/// `Ok(())`, or the error with its causes on one line.
pub fn outcome<T, E: std::error::Error + 'static>(r: &Result<T, E>) -> Outcome {
    match r {
        Ok(_) => Ok(()),
        Err(e) => Err(error_chain(e)),
    }
}

/// `Event::Attached`.
pub fn attached<T, E: std::error::Error + 'static>(r: &Result<T, E>) -> Event {
    Event::Attached(outcome(r))
}

/// `Event::FsckDone`: the report's outcome; an error running the checker refuses the filesystem.
pub fn fsck_done(r: &Result<FsckReport, FsckError>) -> Event {
    Event::FsckDone(match r {
        Ok(report) => report.outcome.clone(),
        Err(e) => FsckOutcome::Refused(format!("the filesystem check failed: {}", error_chain(e))),
    })
}

/// `Event::Mounted`.
pub fn mounted<T, E: std::error::Error + 'static>(r: &Result<T, E>) -> Event {
    Event::Mounted(outcome(r))
}

/// `Event::TaskStarted`.
pub fn task_started<T, E: std::error::Error + 'static>(r: &Result<T, E>) -> Event {
    Event::TaskStarted(outcome(r))
}

/// `Event::TaskExited`.
pub fn task_exited(status: ExitStatus) -> Event {
    Event::TaskExited(status)
}

/// `Event::TaskSignalled`.
pub fn task_signalled<T, E: std::error::Error + 'static>(r: &Result<T, E>) -> Event {
    Event::TaskSignalled(outcome(r))
}

/// `Event::Unmounted`.
pub fn unmounted<T, E: std::error::Error + 'static>(r: &Result<T, E>) -> Event {
    Event::Unmounted(outcome(r))
}

/// `Event::Detached`.
pub fn detached<T, E: std::error::Error + 'static>(r: &Result<T, E>) -> Event {
    Event::Detached(outcome(r))
}

/// A failed `spawn_blocking` join (the executor panicked or was cancelled) as a failure message.
pub fn join_failure(what: &str, e: &tokio::task::JoinError) -> String {
    if e.is_panic() {
        format!("{what}: the executor panicked (a bug): {e}")
    } else {
        format!("{what}: the executor was cancelled")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::mount::MountError;
    use std::path::PathBuf;

    #[test]
    fn failures_become_err_events_with_their_causes() {
        let r: Result<(), MountError> = Err(MountError::Syscall {
            op: "mount",
            path: PathBuf::from("/srv/v"),
            source: nix::errno::Errno::EBUSY,
        });
        match mounted(&r) {
            Event::Mounted(Err(msg)) => {
                assert!(msg.contains("mount"), "{msg}");
                assert!(msg.contains("/srv/v"), "{msg}");
                assert!(msg.contains("busy"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        let ok: Result<u8, MountError> = Ok(1);
        assert_eq!(unmounted(&ok), Event::Unmounted(Ok(())));
        let e: Result<FsckReport, FsckError> = Err(FsckError::Spawn {
            program: PathBuf::from("/nope/e2fsck"),
            source: std::io::Error::from_raw_os_error(2),
        });
        match fsck_done(&e) {
            Event::FsckDone(FsckOutcome::Refused(msg)) => assert!(msg.contains("e2fsck")),
            other => panic!("{other:?}"),
        }
    }
}
