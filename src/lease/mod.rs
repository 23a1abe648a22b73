//! The ZooKeeper lease: one session per daemon, a herd-free lock per volume, generations, clean-release records, own timing.
//!
//! [`LeaseService`] turns the core's lease effects (`Contend`, `Withdraw`,
//! `Release { generation, clean }`) into ZooKeeper operations and reports what
//! happens as [`LeaseNotice`]s, which [`LeaseNotice::to_core`] maps onto the
//! core's events (`LeaseWon`, `LeaseHeartbeat`, `LeaseDisconnected`,
//! `LeaseReconnected`, `LeaseLost`). docs/lease.md explains the design; in short:
//!
//! - **One session** for all volumes. The module pings on its own (`sync`, every
//!   `T/10` by default) and reports a heartbeat per answer with `last_contact` =
//!   the answered request's *send* time: the server's expiry clock for the session
//!   started no earlier. After `suspect_after` (`0.3 T`) without an answer it
//!   reports `Disconnected` itself; the client library's own `Disconnected` is
//!   reported at once too. Nothing waits for the library's `Expired` (which comes
//!   at about `7/5 T`): the core fences on its own clock.
//! - **Lock**: ephemeral-sequential `lease-N` nodes per volume, lowest wins, each
//!   contender watches only its immediate predecessor. Generation = the winning
//!   node's czxid. A winner reads the volume's `holder` record (the previous
//!   winner's generation), checks for that generation's clean-release record, and
//!   replaces `holder` in one multi-op with a check that its lock node still exists,
//!   *before* it reports the win. Lock node data never changes after creation (a
//!   change would wake the successor's watch for nothing).
//! - **Release**: clean = create `released/G` and delete the lock node in one
//!   multi-op; unclean = delete only. Retried until done or the session is gone.
//! - **A reported win is only given back on `Release`** (or lost with the session):
//!   a `Withdraw` or `Contend` that raced a `Won` still in the notice channel is
//!   ignored, so the core, which releases any win it did not want, never acts on a
//!   generation the module already gave away. Notices are delivered in order and
//!   none may be dropped.
//! - **Node id**: registered as an ephemeral `/nodes/<id>`; a live rival refuses the
//!   start ([`LeaseError::NodeIdInUse`]); a dead earlier incarnation on this host is
//!   replaced and its lock nodes are removed when contending.
//! - **ACLs**: digest identity from a credentials file; every node gets full rights for
//!   that identity and the admin identity, read for everyone else.

pub mod config;
pub mod error;
pub mod identity;
mod session;
pub mod store;
mod volume;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use zookeeper_client as zk;

pub use config::{Credentials, LeaseConfig, TlsFiles};
pub use error::LeaseError;
pub use identity::{Incarnation, Registration};
pub use store::{HolderRecord, OwnerRecord, QueueEntry, ReleasedRecord, VolumeStatus};

use crate::core::{self, Generation};

/// What the lease module reports. Session-wide notices (`Heartbeat`, `Disconnected`,
/// `Reconnected`) apply to every volume.
#[derive(Clone, Debug)]
pub enum LeaseNotice {
    /// This node now holds the volume's lease.
    Won {
        /// The volume.
        volume: String,
        /// The lock node's czxid.
        generation: Generation,
        /// Whether the previous holder's generation has a clean-release record (true for the
        /// first holder ever).
        predecessor_clean: bool,
        /// Send time of the request whose answer made the win certain.
        last_contact: Instant,
    },
    /// The volume's lease (or place in the queue) is gone for certain.
    Lost {
        /// The volume.
        volume: String,
        /// Why: session expired, lock node deleted by someone else, ….
        reason: String,
    },
    /// The server answered a request sent at `last_contact` (same session).
    Heartbeat {
        /// Send time of the answered request.
        last_contact: Instant,
    },
    /// No answer for `suspect_after`, or the client library lost its connection.
    Disconnected {
        /// Send time of the last answered request.
        last_contact: Instant,
    },
    /// An answer came back after `Disconnected`, within the same session.
    Reconnected {
        /// Send time of the answered request.
        last_contact: Instant,
    },
    /// Informational: a release finished (`clean`: the clean-release record exists).
    Released {
        /// The volume.
        volume: String,
        /// The released generation.
        generation: Generation,
        /// Whether a clean-release record exists for it.
        clean: bool,
    },
    /// Informational: a lock node of this node id from an earlier session was removed.
    StaleNodeRemoved {
        /// The volume.
        volume: String,
        /// The removed node (relative to the chroot).
        path: String,
        /// The session that owned it.
        session: i64,
    },
    /// Informational: a session was established (and the node id registered).
    SessionStarted {
        /// Session id.
        session: i64,
        /// The negotiated session timeout `T`.
        timeout: Duration,
    },
    /// Informational: the session ended (`Lost` follows for each queued or holding volume).
    SessionEnded {
        /// Session id.
        session: i64,
        /// The client library's final state (`Expired`, `Closed`, `AuthFailed`).
        state: String,
    },
    /// Something went wrong that the module works around (retries, treats as unclean, skips);
    /// for logs and alerts.
    Problem {
        /// The volume, if it concerns one.
        volume: Option<String>,
        /// What went wrong.
        error: LeaseError,
    },
}

impl LeaseNotice {
    /// The volume it concerns; `None` for session-wide and informational session notices.
    pub fn volume(&self) -> Option<&str> {
        match self {
            LeaseNotice::Won { volume, .. }
            | LeaseNotice::Lost { volume, .. }
            | LeaseNotice::Released { volume, .. }
            | LeaseNotice::StaleNodeRemoved { volume, .. } => Some(volume),
            LeaseNotice::Problem { volume, .. } => volume.as_deref(),
            LeaseNotice::Heartbeat { .. }
            | LeaseNotice::Disconnected { .. }
            | LeaseNotice::Reconnected { .. }
            | LeaseNotice::SessionStarted { .. }
            | LeaseNotice::SessionEnded { .. } => None,
        }
    }

    /// The core event this notice means, with `at` mapping the monotonic clock onto the
    /// core's [`core::Instant`]. `None` for informational notices. Session-wide events go to
    /// every volume's machine; `Won`/`Lost` only to theirs.
    pub fn to_core(&self, at: impl Fn(Instant) -> core::Instant) -> Option<core::Event> {
        Some(match self {
            LeaseNotice::Won {
                generation,
                predecessor_clean,
                last_contact,
                ..
            } => core::Event::LeaseWon {
                generation: *generation,
                predecessor_clean: *predecessor_clean,
                last_contact: at(*last_contact),
            },
            LeaseNotice::Lost { .. } => core::Event::LeaseLost,
            LeaseNotice::Heartbeat { last_contact } => core::Event::LeaseHeartbeat {
                last_contact: at(*last_contact),
            },
            LeaseNotice::Disconnected { last_contact } => core::Event::LeaseDisconnected {
                last_contact: at(*last_contact),
            },
            LeaseNotice::Reconnected { last_contact } => core::Event::LeaseReconnected {
                last_contact: at(*last_contact),
            },
            LeaseNotice::Released { .. }
            | LeaseNotice::StaleNodeRemoved { .. }
            | LeaseNotice::SessionStarted { .. }
            | LeaseNotice::SessionEnded { .. }
            | LeaseNotice::Problem { .. } => return None,
        })
    }
}

/// Counters, for tests, the benchmark and status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseStats {
    /// Predecessor watches that fired (node events only).
    pub predecessor_watch_fires: u64,
    /// Wins reported.
    pub wins: u64,
    /// Releases that left a clean-release record.
    pub clean_releases: u64,
    /// Releases without one.
    pub unclean_releases: u64,
    /// Stale lock nodes of this node id removed.
    pub stale_nodes_removed: u64,
    /// Pings answered.
    pub pings_answered: u64,
}

#[derive(Default)]
struct Counters {
    watch_fires: AtomicU64,
    wins: AtomicU64,
    clean: AtomicU64,
    unclean: AtomicU64,
    stale: AtomicU64,
    pings: AtomicU64,
}

/// A live session as the volume actors see it.
pub(crate) struct Session {
    /// Counts sessions of this service: 1, 2, … (a node belongs to the epoch it was made in).
    pub epoch: u64,
    /// The chrooted client.
    pub client: zk::Client,
    /// The session id.
    pub id: i64,
}

/// State shared by the service handle, the session task and the volume actors.
pub(crate) struct Inner {
    pub cfg: LeaseConfig,
    pub acl: Vec<zk::Acl>,
    pub instance: u64,
    notices: mpsc::UnboundedSender<LeaseNotice>,
    pub session_tx: watch::Sender<Option<Arc<Session>>>,
    contact: Mutex<Option<Instant>>,
    timeout: Mutex<Duration>,
    counters: Counters,
    /// Volumes whose `Won` was reported and not yet released or reported lost, with the
    /// epoch of the session they were won under. The end of a session reports `Lost` for
    /// its entries before anything of the next session is reported (see [`Inner::session_ended`]).
    held: Mutex<HashMap<String, u64>>,
}

impl Inner {
    pub fn emit(&self, n: LeaseNotice) {
        let _ = self.notices.send(n);
    }

    /// Reports `won` (a `Won` of `volume`) if session `epoch` is still the current one, and
    /// registers the volume as held under it; `false` (nothing sent) once that session is over.
    pub fn emit_won(&self, volume: &str, epoch: u64, won: LeaseNotice) -> bool {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if self.session().map(|s| s.epoch) != Some(epoch) {
            return false;
        }
        held.insert(volume.to_string(), epoch);
        self.emit(won);
        true
    }

    /// Reports `Lost` for `volume`, held under session `epoch`, unless the end of that
    /// session already did (or the core released it).
    pub fn emit_held_lost(&self, volume: &str, epoch: u64, reason: String) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.get(volume) == Some(&epoch) {
            held.remove(volume);
            self.emit(LeaseNotice::Lost {
                volume: volume.to_string(),
                reason,
            });
        }
    }

    /// Whether `volume` won under session `epoch` is still held: no `Lost` (and no release)
    /// has been reported for it.
    pub fn still_held(&self, volume: &str, epoch: u64) -> bool {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(volume)
            == Some(&epoch)
    }

    /// The core released `volume`: no `Lost` is due for it any more.
    pub fn forget_held(&self, volume: &str) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(volume);
    }

    /// Session `epoch` is over (it was unpublished first, so no new `Won` can register under
    /// it): reports `Lost` for every volume won under it, now, in the notice order — before
    /// the next session's `SessionStarted` and heartbeats. Otherwise a volume task slow to
    /// notice the end could report its loss after the new session's first heartbeat, which
    /// the core would take for contact back within the old session (found by the fault
    /// campaign: a holder cut off past T resumed bringing the volume up under the expired
    /// generation while another node held it).
    pub fn session_ended(&self, epoch: u64, state: &str) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let mut gone: Vec<String> = held
            .iter()
            .filter(|(_, e)| **e == epoch)
            .map(|(v, _)| v.clone())
            .collect();
        gone.sort();
        for volume in gone {
            held.remove(&volume);
            self.emit(LeaseNotice::Lost {
                volume,
                reason: format!("the ZooKeeper session ended ({state}) while holding the lease"),
            });
        }
    }

    pub fn problem(&self, volume: Option<&str>, error: LeaseError) {
        self.emit(LeaseNotice::Problem {
            volume: volume.map(str::to_string),
            error,
        });
    }

    /// Records an answered request sent at `sent`; returns whether it moved `last_contact`.
    pub fn note_contact(&self, sent: Instant) -> bool {
        let mut c = self.contact.lock().unwrap_or_else(|p| p.into_inner());
        match *c {
            Some(prev) if prev >= sent => false,
            _ => {
                *c = Some(sent);
                true
            }
        }
    }

    pub fn last_contact(&self) -> Option<Instant> {
        *self.contact.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_timeout(&self, t: Duration) {
        *self.timeout.lock().unwrap_or_else(|p| p.into_inner()) = t;
    }

    pub fn timeout(&self) -> Duration {
        *self.timeout.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pause between retries of a failed request.
    pub fn retry_pause(&self) -> Duration {
        self.cfg.ping_interval_for(self.timeout())
    }

    pub fn session(&self) -> Option<Arc<Session>> {
        self.session_tx.borrow().clone()
    }

    pub fn create_options(&self, mode: zk::CreateMode) -> zk::CreateOptions<'_> {
        mode.with_acls(zk::Acls::new(&self.acl))
    }
}

/// The lease service of one daemon: one ZooKeeper session, any number of volumes.
///
/// Dropping it aborts its tasks and closes the session (lock nodes vanish with it, without
/// clean-release records); [`LeaseService::shutdown`] first finishes queued releases.
pub struct LeaseService {
    inner: Arc<Inner>,
    volumes: Mutex<HashMap<String, mpsc::UnboundedSender<volume::Cmd>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    shutdown_tx: watch::Sender<bool>,
    runtime: tokio::runtime::Handle,
}

impl LeaseService {
    /// Connects, creates the chroot and directories, registers the node id (refusing if a
    /// live daemon holds it), and starts the session task. Must run inside a tokio runtime.
    pub async fn start(
        cfg: LeaseConfig,
    ) -> Result<(LeaseService, mpsc::UnboundedReceiver<LeaseNotice>), LeaseError> {
        cfg.validate()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (session_tx, _) = watch::channel(None);
        let instance = random_u64();
        let inner = Arc::new(Inner {
            acl: cfg.acl(),
            cfg,
            instance,
            notices: tx,
            session_tx,
            contact: Mutex::new(None),
            timeout: Mutex::new(Duration::ZERO),
            counters: Counters::default(),
            held: Mutex::new(HashMap::new()),
        });
        let (client, sent) = session::connect_and_register(&inner).await?;
        session::publish(&inner, &client, sent, 1);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(session::run(inner.clone(), client, shutdown_rx));
        Ok((
            LeaseService {
                inner,
                volumes: Mutex::new(HashMap::new()),
                tasks: Mutex::new(vec![task]),
                shutdown_tx,
                runtime: tokio::runtime::Handle::current(),
            },
            rx,
        ))
    }

    fn send(&self, volume: &str, cmd: volume::Cmd) -> Result<(), LeaseError> {
        config::check_name(volume).map_err(|reason| LeaseError::BadVolumeName {
            name: volume.to_string(),
            reason,
        })?;
        if *self.shutdown_tx.borrow() {
            return Err(LeaseError::Stopped);
        }
        let mut vols = self.volumes.lock().unwrap_or_else(|p| p.into_inner());
        let tx = vols.entry(volume.to_string()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let actor = volume::Actor::new(self.inner.clone(), volume, rx);
            let h = self.runtime.spawn(actor.run());
            self.tasks.lock().unwrap_or_else(|p| p.into_inner()).push(h);
            tx
        });
        tx.send(cmd).map_err(|_| LeaseError::Stopped)
    }

    /// The core's `Contend`: join the volume's lock queue (a no-op if queued or holding).
    pub fn contend(&self, volume: &str) -> Result<(), LeaseError> {
        self.send(volume, volume::Cmd::Contend)
    }

    /// The core's `Withdraw`: leave the queue. Ignored once a win was reported (the core
    /// releases a win it does not want).
    pub fn withdraw(&self, volume: &str) -> Result<(), LeaseError> {
        self.send(volume, volume::Cmd::Withdraw)
    }

    /// The core's `Release`: give up `generation`; `clean` also records "released cleanly" in
    /// the same multi-op. Retried by the module until done or the session is gone.
    pub fn release(
        &self,
        volume: &str,
        generation: Generation,
        clean: bool,
    ) -> Result<(), LeaseError> {
        self.send(
            volume,
            volume::Cmd::Release {
                generation: generation.0,
                clean,
            },
        )
    }

    /// The negotiated session timeout `T` of the current (or last) session.
    pub fn session_timeout(&self) -> Duration {
        self.inner.timeout()
    }

    /// The current session id, if connected to a live session.
    pub fn session_id(&self) -> Option<i64> {
        self.inner.session().map(|s| s.id)
    }

    /// Send time of the last answered request.
    pub fn last_contact(&self) -> Option<Instant> {
        self.inner.last_contact()
    }

    /// This service's node id.
    pub fn node_id(&self) -> &str {
        &self.inner.cfg.node_id
    }

    /// Counters.
    pub fn stats(&self) -> LeaseStats {
        let c = &self.inner.counters;
        LeaseStats {
            predecessor_watch_fires: c.watch_fires.load(Ordering::Relaxed),
            wins: c.wins.load(Ordering::Relaxed),
            clean_releases: c.clean.load(Ordering::Relaxed),
            unclean_releases: c.unclean.load(Ordering::Relaxed),
            stale_nodes_removed: c.stale.load(Ordering::Relaxed),
            pings_answered: c.pings.load(Ordering::Relaxed),
        }
    }

    /// What ZooKeeper says about a volume (queue with owner records, last winner, clean flag).
    pub async fn status(&self, volume: &str) -> Result<VolumeStatus, LeaseError> {
        let s = self.inner.session().ok_or(LeaseError::Connect {
            hosts: self.inner.cfg.hosts.clone(),
            reason: "no live session right now".into(),
        })?;
        store::read_status(&s.client, volume).await
    }

    /// Stops: lets every volume finish the commands already sent (releases), then closes the
    /// session (waits at most `wait`).
    pub async fn shutdown(self, wait: Duration) {
        {
            let vols = self.volumes.lock().unwrap_or_else(|p| p.into_inner());
            for tx in vols.values() {
                let _ = tx.send(volume::Cmd::Stop);
            }
        }
        let handles: Vec<JoinHandle<()>> = {
            let mut t = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
            t.drain(1..).collect()
        };
        let _ = tokio::time::timeout(wait, async {
            for h in handles {
                let _ = h.await;
            }
        })
        .await;
        let _ = self.shutdown_tx.send(true);
        let main = self.tasks.lock().unwrap_or_else(|p| p.into_inner()).pop();
        if let Some(h) = main {
            let _ = tokio::time::timeout(wait, h).await;
        }
    }
}

impl Drop for LeaseService {
    fn drop(&mut self) {
        let _ = self.shutdown_tx.send(true);
        for h in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            h.abort();
        }
        self.inner.session_tx.send_replace(None);
    }
}

/// Operator access with the admin identity: status and break-lock.
pub struct LeaseAdmin {
    client: zk::Client,
}

impl LeaseAdmin {
    /// Connects with `cfg.admin` (or `cfg.auth` when there is no admin identity).
    pub async fn connect(cfg: &LeaseConfig) -> Result<Self, LeaseError> {
        cfg.validate()?;
        let creds = cfg.admin.as_ref().or(cfg.auth.as_ref());
        let client = session::open(cfg, creds, &cfg.acl()).await?;
        Ok(LeaseAdmin { client })
    }

    /// What ZooKeeper says about a volume.
    pub async fn status(&self, volume: &str) -> Result<VolumeStatus, LeaseError> {
        store::read_status(&self.client, volume).await
    }

    /// Deletes the current holder's lock node (the holder reports `Lost` and fences at once;
    /// the next contender wins, unclean, so it waits out the lock-delay). Returns the entry
    /// removed, if there was a holder.
    pub async fn break_lock(&self, volume: &str) -> Result<Option<QueueEntry>, LeaseError> {
        let status = store::read_status(&self.client, volume).await?;
        let Some(first) = status.queue.into_iter().next() else {
            return Ok(None);
        };
        let path = store::VolumePaths::new(volume).lock_node(&first.name);
        match self.client.delete(&path, None).await {
            Ok(()) | Err(zk::Error::NoNode) => Ok(Some(first)),
            Err(e) => Err(LeaseError::zk("delete", &path, e)),
        }
    }

    /// Deletes every lock node of `volume` whose owner record names `node_id`
    /// (forced detach with the daemon dead: the next contender need not wait
    /// for the dead session to expire). Returns the entries deleted.
    pub async fn remove_node_entries(
        &self,
        volume: &str,
        node_id: &str,
    ) -> Result<Vec<QueueEntry>, LeaseError> {
        let status = store::read_status(&self.client, volume).await?;
        let mut deleted = Vec::new();
        for e in status.queue {
            if !e.owner.as_ref().is_ok_and(|o| o.node_id == node_id) {
                continue;
            }
            let path = store::VolumePaths::new(volume).lock_node(&e.name);
            match self.client.delete(&path, None).await {
                Ok(()) | Err(zk::Error::NoNode) => deleted.push(e),
                Err(err) => return Err(LeaseError::zk("delete", &path, err)),
            }
        }
        Ok(deleted)
    }

    /// The underlying chrooted client (for tools and tests).
    pub fn client(&self) -> &zk::Client {
        &self.client
    }
}

/// A random 64-bit value from the standard library's hasher seed (no extra dependency).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}
