//! The control socket's wire format: one JSON request line, one JSON response line, typed on both sides.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Protocol version; a daemon refuses requests of another major version.
pub const PROTOCOL: u32 = 1;

/// A request with its protocol version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// [`PROTOCOL`] of the sender.
    pub protocol: u32,
    /// The request.
    pub request: Request,
}

/// What a client may ask the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Every local volume, the session and the references.
    Status,
    /// Graceful hand-over: fence, release cleanly, contend again.
    Release {
        /// The volume.
        volume: String,
    },
    /// Fence, release cleanly and stay out (one volume, or all with `None`).
    Drain {
        /// The volume, or every volume.
        volume: Option<String>,
    },
    /// Let a drained or force-detached volume contend again (one, or all).
    Resume {
        /// The volume, or every volume.
        volume: Option<String>,
    },
    /// Kill the task at once, unmount (forcibly if needed), detach, stay out.
    ForceDetach {
        /// The volume.
        volume: String,
    },
    /// Take a reference on an on-demand volume and wait until it is mounted here.
    Acquire {
        /// The volume.
        volume: String,
        /// Who holds the reference (`dvdcli`, `container:<id>`, `cli`).
        holder: String,
        /// `true`: every request adds one (dvdcli); `false`: one per holder (containers).
        counted: bool,
        /// How long to wait for the lease and the mount, in milliseconds.
        wait_ms: u64,
        /// Another name for `holder` that a later `Unacquire` may use (a Mesos
        /// executor `executor:<framework>/<executor>` for the remove-executor hook).
        #[serde(default)]
        alias: Option<String>,
    },
    /// Drop a reference; the last one drains the volume (fence, clean release).
    Unacquire {
        /// The volume; `None`: every volume `holder` references.
        volume: Option<String>,
        /// The holder, or an alias given at acquire time.
        holder: String,
        /// How long to wait for the fence to finish, in milliseconds.
        wait_ms: u64,
    },
}

impl Request {
    /// The volume it names, if one.
    pub fn volume(&self) -> Option<&str> {
        match self {
            Request::Status => None,
            Request::Release { volume }
            | Request::ForceDetach { volume }
            | Request::Acquire { volume, .. } => Some(volume),
            Request::Drain { volume }
            | Request::Resume { volume }
            | Request::Unacquire { volume, .. } => volume.as_deref(),
        }
    }
}

/// The daemon's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    /// Done (or accepted: the fence runs on); `message` says which.
    Ok {
        /// What happened.
        message: String,
    },
    /// The status report.
    Status(StatusReport),
    /// The volume is mounted here under `generation`.
    Acquired {
        /// The volume.
        volume: String,
        /// Its mount path.
        mount_path: String,
        /// The lease generation it is mounted under.
        generation: u64,
        /// References now held on it.
        references: u32,
    },
    /// The request failed.
    Error {
        /// What kind of failure (see [`ErrorKind`]).
        kind: ErrorKind,
        /// For the operator.
        message: String,
    },
}

/// Failure classes (scripts branch on these; the CLI maps them to exit codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// No such volume in the daemon's config.
    UnknownVolume,
    /// The request does not fit the volume (e.g. acquire of an `always` volume).
    NotApplicable,
    /// The wait ran out (the lease is held elsewhere, or the volume did not come up).
    Timeout,
    /// The volume came up and failed (fsck refusal, mount failure): see the message.
    Failed,
    /// The request could not be parsed or has the wrong protocol version.
    BadRequest,
    /// The daemon is shutting down or could not record the change.
    Unavailable,
}

impl ErrorKind {
    /// The CLI's exit code for this failure.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::UnknownVolume => 3,
            ErrorKind::NotApplicable | ErrorKind::BadRequest => 2,
            ErrorKind::Timeout => 4,
            ErrorKind::Failed => 5,
            ErrorKind::Unavailable => 6,
        }
    }
}

/// `status`: the daemon, its session and its volumes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// This node's id.
    pub node: String,
    /// The daemon's pid.
    pub pid: u32,
    /// Version of the daemon binary.
    pub version: String,
    /// ZooKeeper session state: `connecting`, `connected`, `disconnected`, `expired`.
    pub session_state: String,
    /// Milliseconds since the last answered ZooKeeper request (`None`: never).
    pub last_contact_age_ms: Option<u64>,
    /// Negotiated session timeout, ms.
    pub session_timeout_ms: u64,
    /// The volumes, by name.
    pub volumes: Vec<VolumeReport>,
}

/// One volume in [`StatusReport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeReport {
    /// Name.
    pub name: String,
    /// Phase (`running`, `contending`, `out`, …).
    pub phase: String,
    /// Lease generation held, if any.
    pub generation: Option<u64>,
    /// When the phase began (ms since the Unix epoch).
    pub since_ms: u64,
    /// Device attached, filesystem mounted or task running here.
    pub exposed: bool,
    /// While suspended: milliseconds until the fence must be complete (negative: overdue).
    pub fence_deadline_in_ms: Option<i64>,
    /// The last decision's reason.
    pub last_reason: String,
    /// `always` or `on-demand`.
    pub activation: String,
    /// Mount path.
    pub mount_path: String,
    /// References held (on-demand volumes): holder → count.
    pub references: BTreeMap<String, u32>,
}
