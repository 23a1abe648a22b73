//! Errors of the ZooKeeper lease: typed, naming the path and the reason; bad data is an error, never a panic.

use std::path::PathBuf;

use zookeeper_client as zk;

/// Everything that can go wrong in the lease module.
#[derive(Clone, Debug, thiserror::Error)]
pub enum LeaseError {
    /// A credentials file could not be read.
    #[error("cannot read ZooKeeper credentials file {path}: {reason}")]
    CredentialsUnreadable {
        /// The file.
        path: PathBuf,
        /// The IO error.
        reason: String,
    },
    /// A credentials file is not one `user:password` line.
    #[error("ZooKeeper credentials file {path} is malformed: {reason} (expected one line \"user:password\")")]
    CredentialsMalformed {
        /// The file.
        path: PathBuf,
        /// What is wrong (the password is never shown).
        reason: String,
    },
    /// A TLS certificate or key file could not be read or used.
    #[error("TLS to ZooKeeper: {what} {path}: {reason}")]
    Tls {
        /// Which file (`CA file`, `certificate file`, `key file`).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The reason.
        reason: String,
    },
    /// A lease setting is unusable.
    #[error("invalid lease setting: {0}")]
    Config(String),
    /// A volume name cannot be a ZooKeeper path component.
    #[error("invalid volume name {name:?} for the lease: {reason}")]
    BadVolumeName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// No session could be established.
    #[error("cannot connect to ZooKeeper at {hosts}: {reason}")]
    Connect {
        /// The connect string.
        hosts: String,
        /// The client library's error, or a timeout.
        reason: String,
    },
    /// A ZooKeeper request failed.
    #[error("ZooKeeper {op} of {path} failed: {source}")]
    ZooKeeper {
        /// The operation (`create`, `delete`, `get_data`, `multi`, …).
        op: &'static str,
        /// The node path (relative to the chroot).
        path: String,
        /// The client library's error.
        source: zk::Error,
    },
    /// A node holds data that is not the record it should hold (garbage, another tool's data, a
    /// newer record version).
    #[error("{path} holds data that is not a valid {what}: {reason}; data: {preview}")]
    BadRecord {
        /// The node path (relative to the chroot).
        path: String,
        /// What it should hold (`owner record`, `holder record`, …).
        what: &'static str,
        /// The parse error.
        reason: String,
        /// The first bytes of the data, escaped.
        preview: String,
    },
    /// The server refused our identity on our own tree.
    #[error(
        "ZooKeeper refused {identity} on {path}: its ACL grants another identity (wrong \
         password in the credentials file, or the tree was created with other credentials)"
    )]
    NotAuthorized {
        /// The absolute path refused.
        path: String,
        /// Who we were.
        identity: String,
    },
    /// Another live daemon already runs with this node id.
    #[error(
        "node id {node_id:?} is already in use by a live daemon ({holder}); two daemons with one \
         node id would delete each other's lock nodes, so this one refuses to start. Give each \
         node its own [node] id, or stop the other daemon first"
    )]
    NodeIdInUse {
        /// The node id.
        node_id: String,
        /// Who holds it: host, pid, ZooKeeper session and since when.
        holder: String,
    },
    /// The service was stopped (or its tasks ended).
    #[error("the lease service has stopped")]
    Stopped,
}

impl LeaseError {
    /// A [`LeaseError::ZooKeeper`].
    pub(crate) fn zk(op: &'static str, path: &str, source: zk::Error) -> Self {
        LeaseError::ZooKeeper {
            op,
            path: path.to_string(),
            source,
        }
    }

    /// The client library's error inside, if this is a ZooKeeper request failure.
    pub fn zk_error(&self) -> Option<&zk::Error> {
        match self {
            LeaseError::ZooKeeper { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Whether a failed request may succeed if retried within the same session.
pub(crate) fn transient(e: &zk::Error) -> bool {
    matches!(
        e,
        zk::Error::ConnectionLoss
            | zk::Error::Timeout
            | zk::Error::Throttled
            | zk::Error::Custom(_)
    )
}

/// Whether the session is gone for good (no request will ever succeed on it).
pub(crate) fn session_over(e: &zk::Error) -> bool {
    matches!(
        e,
        zk::Error::SessionExpired
            | zk::Error::ClientClosed
            | zk::Error::AuthFailed
            | zk::Error::SessionMoved
            | zk::Error::NoHosts
    )
}
