//! The lease's ZooKeeper layout and records: paths, JSON records with strict parsing, status reads and break-lock.
//!
//! Under the chroot:
//!
//! ```text
//! /nodes/<node-id>                         ephemeral: Registration (which process runs this node id)
//! /volumes/<volume>/lock/lease-<seq>       ephemeral-sequential: OwnerRecord, lowest = holder
//! /volumes/<volume>/holder                 persistent: HolderRecord, the last generation that won
//! /volumes/<volume>/released/<generation>  persistent: ReleasedRecord, "released cleanly"
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use zookeeper_client as zk;

use super::error::LeaseError;

/// Version of every record this module writes.
pub const RECORD_VERSION: u32 = 1;

/// Prefix of lock node names (`lease-0000000042`).
pub const LOCK_PREFIX: &str = "lease-";

/// Path of the registration node of `node_id`.
pub(crate) fn node_path(node_id: &str) -> String {
    format!("/nodes/{node_id}")
}

/// The paths of one volume.
#[derive(Clone, Debug)]
pub(crate) struct VolumePaths {
    pub lock_dir: String,
    pub holder: String,
    pub released_dir: String,
}

impl VolumePaths {
    pub fn new(volume: &str) -> Self {
        let dir = format!("/volumes/{volume}");
        VolumePaths {
            lock_dir: format!("{dir}/lock"),
            holder: format!("{dir}/holder"),
            released_dir: format!("{dir}/released"),
        }
    }

    pub fn lock_node(&self, name: &str) -> String {
        format!("{}/{name}", self.lock_dir)
    }

    pub fn released(&self, generation: u64) -> String {
        format!("{}/{generation}", self.released_dir)
    }
}

/// The sequence number of a lock node name, or `None` if it is not one of ours.
pub(crate) fn lock_seq(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(LOCK_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Lock node names sorted by sequence number (foreign names left out).
pub(crate) fn sorted_queue(children: &[String]) -> Vec<(u64, String)> {
    let mut q: Vec<(u64, String)> = children
        .iter()
        .filter_map(|c| lock_seq(c).map(|s| (s, c.clone())))
        .collect();
    q.sort();
    q
}

/// Milliseconds since the Unix epoch (for records meant for humans; never for timing).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A lock node's data: who contends with it. Written once at creation and never changed: a
/// data change would fire the successor's predecessor watch a second time. The node's
/// generation is its czxid ([`QueueEntry::czxid`]); when it won is in the [`HolderRecord`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    /// Record format version.
    pub version: u32,
    /// The contending node's id.
    pub node_id: String,
    /// Its host name.
    pub host: String,
    /// Its daemon's pid.
    pub pid: u32,
    /// Its ZooKeeper session, hex.
    pub session: String,
    /// When it joined the queue (ms since the Unix epoch).
    pub created_at_ms: u64,
}

/// The per-volume record of the generation that won last (read and replaced by every winner).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderRecord {
    /// Record format version.
    pub version: u32,
    /// The generation.
    pub generation: u64,
    /// Its node id.
    pub node_id: String,
    /// Its host.
    pub host: String,
    /// When it won (ms since the Unix epoch).
    pub acquired_at_ms: u64,
}

/// "Generation G was released cleanly": written with the lock node's deletion in one multi-op.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleasedRecord {
    /// Record format version.
    pub version: u32,
    /// The generation.
    pub generation: u64,
    /// Who released it.
    pub node_id: String,
    /// When (ms since the Unix epoch).
    pub released_at_ms: u64,
}

/// Records this module reads back, with the name used in errors.
pub(crate) trait Record: Serialize + DeserializeOwned {
    const WHAT: &'static str;
    fn version(&self) -> u32;
}

impl Record for OwnerRecord {
    const WHAT: &'static str = "owner record";
    fn version(&self) -> u32 {
        self.version
    }
}
impl Record for HolderRecord {
    const WHAT: &'static str = "holder record";
    fn version(&self) -> u32 {
        self.version
    }
}
impl Record for ReleasedRecord {
    const WHAT: &'static str = "released record";
    fn version(&self) -> u32 {
        self.version
    }
}
impl Record for super::identity::Registration {
    const WHAT: &'static str = "registration record";
    fn version(&self) -> u32 {
        self.version
    }
}

/// Serialises a record (cannot fail for these plain structs; an empty object if it did).
pub(crate) fn encode<T: Record>(r: &T) -> Vec<u8> {
    serde_json::to_vec(r).unwrap_or_else(|_| b"{}".to_vec())
}

/// Parses a record, or says precisely why the data is not one.
pub(crate) fn decode<T: Record>(path: &str, data: &[u8]) -> Result<T, LeaseError> {
    let bad = |reason: String| LeaseError::BadRecord {
        path: path.to_string(),
        what: T::WHAT,
        reason,
        preview: preview(data),
    };
    let text = std::str::from_utf8(data).map_err(|e| bad(format!("not UTF-8 ({e})")))?;
    let r: T =
        serde_json::from_str(text).map_err(|e| bad(format!("not a JSON {}: {e}", T::WHAT)))?;
    if r.version() != RECORD_VERSION {
        return Err(bad(format!(
            "record version {} (this build reads version {RECORD_VERSION})",
            r.version()
        )));
    }
    Ok(r)
}

/// The first 64 bytes of `data`, escaped, for error messages.
fn preview(data: &[u8]) -> String {
    let head = &data[..data.len().min(64)];
    let mut s: String = head.escape_ascii().to_string();
    if data.len() > 64 {
        s.push_str(&format!("… ({} bytes)", data.len()));
    }
    format!("\"{s}\"")
}

/// One node in a volume's lock queue.
#[derive(Clone, Debug)]
pub struct QueueEntry {
    /// Node name (`lease-0000000042`).
    pub name: String,
    /// Its sequence number.
    pub seq: u64,
    /// Its czxid: the generation it holds or would hold.
    pub czxid: u64,
    /// The ZooKeeper session that owns it.
    pub session: i64,
    /// Its data, parsed.
    pub owner: Result<OwnerRecord, LeaseError>,
}

/// What ZooKeeper says about one volume.
#[derive(Clone, Debug)]
pub struct VolumeStatus {
    /// The volume.
    pub volume: String,
    /// The lock queue, lowest (holder) first.
    pub queue: Vec<QueueEntry>,
    /// The holder record: `None` if no node ever won.
    pub last_winner: Option<Result<HolderRecord, LeaseError>>,
    /// Whether the last winner's generation has a clean-release record.
    pub last_winner_released_cleanly: Option<bool>,
}

impl VolumeStatus {
    /// The current holder's owner record, or the error that makes it unreadable.
    pub fn holder(&self) -> Result<Option<&OwnerRecord>, LeaseError> {
        match self.queue.first() {
            None => Ok(None),
            Some(e) => e.owner.as_ref().map(Some).map_err(Clone::clone),
        }
    }
}

/// Reads a volume's queue and records (one consistent-enough snapshot; racing changes may show).
pub(crate) async fn read_status(
    client: &zk::Client,
    volume: &str,
) -> Result<VolumeStatus, LeaseError> {
    let p = VolumePaths::new(volume);
    let children = match client.list_children(&p.lock_dir).await {
        Ok(c) => c,
        Err(zk::Error::NoNode) => Vec::new(),
        Err(e) => return Err(LeaseError::zk("list_children", &p.lock_dir, e)),
    };
    let mut queue = Vec::new();
    for (seq, name) in sorted_queue(&children) {
        let path = p.lock_node(&name);
        match client.get_data(&path).await {
            Ok((data, stat)) => queue.push(QueueEntry {
                owner: decode::<OwnerRecord>(&path, &data),
                name,
                seq,
                czxid: stat.czxid as u64,
                session: stat.ephemeral_owner,
            }),
            Err(zk::Error::NoNode) => {}
            Err(e) => return Err(LeaseError::zk("get_data", &path, e)),
        }
    }
    let (last_winner, last_winner_released_cleanly) = match client.get_data(&p.holder).await {
        Ok((data, _)) => {
            let rec = decode::<HolderRecord>(&p.holder, &data);
            let clean = match &rec {
                Ok(h) => {
                    let path = p.released(h.generation);
                    Some(
                        client
                            .check_stat(&path)
                            .await
                            .map_err(|e| LeaseError::zk("exists", &path, e))?
                            .is_some(),
                    )
                }
                Err(_) => None,
            };
            (Some(rec), clean)
        }
        Err(zk::Error::NoNode) => (None, None),
        Err(e) => return Err(LeaseError::zk("get_data", &p.holder, e)),
    };
    Ok(VolumeStatus {
        volume: volume.to_string(),
        queue,
        last_winner,
        last_winner_released_cleanly,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_names_parse_strictly() {
        assert_eq!(lock_seq("lease-0000000042"), Some(42));
        assert_eq!(lock_seq("lease-"), None);
        assert_eq!(lock_seq("lease-12x"), None);
        assert_eq!(lock_seq("other-0000000001"), None);
        let q = sorted_queue(&[
            "lease-0000000010".into(),
            "junk".into(),
            "lease-0000000002".into(),
        ]);
        assert_eq!(
            q,
            vec![
                (2, "lease-0000000002".to_string()),
                (10, "lease-0000000010".to_string())
            ]
        );
    }

    #[test]
    fn garbage_records_give_clear_errors() {
        let p = "/volumes/v/lock/lease-0000000001";
        for (data, needle) in [
            (&b"\xff\xfe"[..], "not UTF-8"),
            (b"hello", "not a JSON owner record"),
            (b"{\"version\":1}", "missing field"),
            (
                b"{\"version\":9,\"node_id\":\"a\",\"host\":\"h\",\"pid\":1,\"session\":\"0x1\",\
                  \"created_at_ms\":0}",
                "record version 9",
            ),
        ] {
            let e = decode::<OwnerRecord>(p, data).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(p) && msg.contains(needle), "{msg}");
        }
        let long = vec![b'x'; 500];
        let msg = decode::<HolderRecord>(p, &long).unwrap_err().to_string();
        assert!(msg.contains("(500 bytes)"), "{msg}");
    }

    #[test]
    fn records_round_trip() {
        let r = OwnerRecord {
            version: RECORD_VERSION,
            node_id: "n".into(),
            host: "h".into(),
            pid: 1,
            session: "0x1".into(),
            created_at_ms: 7,
        };
        assert_eq!(decode::<OwnerRecord>("/x", &encode(&r)).unwrap(), r);
    }
}
