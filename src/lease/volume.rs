//! One volume's lock actor: join the queue, watch only the predecessor, win (holder record first), release, report loss.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use zookeeper_client as zk;

use super::error::{session_over, transient, LeaseError};
use super::store::{
    decode, encode, now_ms, sorted_queue, HolderRecord, OwnerRecord, ReleasedRecord, VolumePaths,
    LOCK_PREFIX, RECORD_VERSION,
};
use super::{Inner, LeaseNotice, Session};
use crate::core::Generation;

/// A request from the service handle.
#[derive(Debug)]
pub(crate) enum Cmd {
    Contend,
    Withdraw,
    Release { generation: u64, clean: bool },
    Stop,
}

/// Our lock node.
#[derive(Clone, Debug)]
struct MyNode {
    path: String,
    seq: u64,
    czxid: u64,
    /// The session epoch it was created in.
    epoch: u64,
}

enum State {
    Idle,
    Queued {
        node: Option<MyNode>,
    },
    Held {
        node: MyNode,
        predecessor_clean: bool,
    },
    Stopped,
}

pub(crate) struct Actor {
    inner: Arc<Inner>,
    volume: String,
    paths: VolumePaths,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    sessions: watch::Receiver<Option<Arc<Session>>>,
    /// The session epoch whose directories exist.
    dirs_ready: Option<u64>,
    /// The last generation reported won (never reported twice).
    last_won: Option<u64>,
    /// Predecessor cleanliness computed for a win whose multi-op answer may have been lost.
    pending_clean: Option<(u64, bool)>,
    /// Held nodes whose session ended; a later `Release` still tries to remove them.
    orphans: BTreeMap<u64, String>,
}

impl Actor {
    pub fn new(inner: Arc<Inner>, volume: &str, cmds: mpsc::UnboundedReceiver<Cmd>) -> Self {
        let sessions = inner.session_tx.subscribe();
        Actor {
            inner,
            volume: volume.to_string(),
            paths: VolumePaths::new(volume),
            cmds,
            sessions,
            dirs_ready: None,
            last_won: None,
            pending_clean: None,
            orphans: BTreeMap::new(),
        }
    }

    pub async fn run(mut self) {
        let mut state = State::Idle;
        loop {
            state = match state {
                State::Idle => match self.cmds.recv().await {
                    None | Some(Cmd::Stop) => State::Stopped,
                    Some(Cmd::Contend) => State::Queued { node: None },
                    Some(Cmd::Withdraw) => State::Idle,
                    Some(Cmd::Release { generation, clean }) => {
                        self.release_orphan(generation, clean).await;
                        State::Idle
                    }
                },
                State::Queued { node } => self.queued(node).await,
                State::Held {
                    node,
                    predecessor_clean,
                } => self.held(node, predecessor_clean).await,
                State::Stopped => return,
            }
        }
    }

    fn session(&self) -> Option<Arc<Session>> {
        self.sessions.borrow().clone()
    }

    fn lost(&self, reason: impl Into<String>) {
        self.inner.emit(LeaseNotice::Lost {
            volume: self.volume.clone(),
            reason: reason.into(),
        });
    }

    fn problem(&self, e: LeaseError) {
        self.inner.problem(Some(&self.volume), e);
    }

    async fn pause(&self) {
        tokio::time::sleep(self.inner.retry_pause()).await;
    }

    /// A command while queued (not holding).
    async fn on_cmd_queued(&mut self, cmd: Option<Cmd>, node: Option<MyNode>) -> State {
        match cmd {
            None | Some(Cmd::Stop) => State::Stopped,
            // Already queued: keep the place.
            Some(Cmd::Contend) => State::Queued { node },
            Some(Cmd::Withdraw) => {
                if let Some(n) = node {
                    self.delete_node(&n).await;
                }
                State::Idle
            }
            Some(Cmd::Release { generation, clean }) => {
                self.release_orphan(generation, clean).await;
                State::Queued { node }
            }
        }
    }

    async fn queued(&mut self, node: Option<MyNode>) -> State {
        let Some(sess) = self.session() else {
            if node.is_some() {
                self.lost("the ZooKeeper session ended while queued");
                return State::Idle;
            }
            // Wait for a session (or a command).
            return tokio::select! {
                cmd = self.cmds.recv() => self.on_cmd_queued(cmd, None).await,
                r = self.sessions.changed() => match r {
                    Ok(()) => State::Queued { node: None },
                    Err(_) => State::Stopped,
                },
            };
        };
        if let Some(n) = &node {
            if n.epoch != sess.epoch {
                self.lost("the ZooKeeper session ended while queued");
                return State::Idle;
            }
        }
        let node = match node {
            Some(n) => n,
            None => match self.join_queue(&sess).await {
                Ok(n) => n,
                Err(e) => {
                    if !e.zk_error().is_some_and(session_over) {
                        self.problem(e);
                    }
                    self.pause().await;
                    return State::Queued { node: None };
                }
            },
        };
        // Where am I?
        let sent = Instant::now();
        let children = match sess.client.list_children(&self.paths.lock_dir).await {
            Ok(c) => c,
            Err(e) => {
                if !transient(&e) && !session_over(&e) {
                    self.problem(LeaseError::zk("list_children", &self.paths.lock_dir, e));
                }
                self.pause().await;
                return State::Queued { node: Some(node) };
            }
        };
        self.inner.note_contact(sent);
        let q = sorted_queue(&children);
        let Some(pos) = q.iter().position(|(s, _)| *s == node.seq) else {
            self.lost(format!(
                "lock node {} was deleted by another client",
                node.path
            ));
            return State::Idle;
        };
        if pos == 0 {
            return self.try_win(&sess, node).await;
        }
        let pred = self.paths.lock_node(&q[pos - 1].1);
        match sess.client.check_and_watch_stat(&pred).await {
            Ok((None, _)) => State::Queued { node: Some(node) },
            Ok((Some(_), watcher)) => tokio::select! {
                ev = watcher.changed() => {
                    if ev.event_type != zk::EventType::Session {
                        self.inner.counters.watch_fires.fetch_add(1, Ordering::Relaxed);
                    }
                    State::Queued { node: Some(node) }
                }
                cmd = self.cmds.recv() => self.on_cmd_queued(cmd, Some(node)).await,
                r = self.sessions.changed() => match r {
                    Ok(()) => State::Queued { node: Some(node) },
                    Err(_) => State::Stopped,
                },
            },
            Err(e) => {
                if !transient(&e) && !session_over(&e) {
                    self.problem(LeaseError::zk("exists", &pred, e));
                }
                self.pause().await;
                State::Queued { node: Some(node) }
            }
        }
    }

    /// Creates the volume's directories once per session.
    async fn ensure_dirs(&mut self, sess: &Session) -> Result<(), LeaseError> {
        if self.dirs_ready == Some(sess.epoch) {
            return Ok(());
        }
        let opts = self.inner.create_options(zk::CreateMode::Persistent);
        for d in [&self.paths.lock_dir, &self.paths.released_dir] {
            sess.client
                .mkdir(d, &opts)
                .await
                .map_err(|e| LeaseError::zk("create", d, e))?;
        }
        self.dirs_ready = Some(sess.epoch);
        Ok(())
    }

    /// Removes stale nodes of this node id (earlier sessions), adopts a node of this session
    /// left by an interrupted create, or creates a new one.
    async fn join_queue(&mut self, sess: &Session) -> Result<MyNode, LeaseError> {
        self.ensure_dirs(sess).await?;
        let lock_dir = self.paths.lock_dir.clone();
        let children = sess
            .client
            .list_children(&lock_dir)
            .await
            .map_err(|e| LeaseError::zk("list_children", &lock_dir, e))?;
        let mut adopt: Option<MyNode> = None;
        for (seq, name) in sorted_queue(&children) {
            let path = self.paths.lock_node(&name);
            let (data, stat) = match sess.client.get_data(&path).await {
                Ok(x) => x,
                Err(zk::Error::NoNode) => continue,
                Err(e) => return Err(LeaseError::zk("get_data", &path, e)),
            };
            if stat.ephemeral_owner == sess.id {
                let czxid = stat.czxid as u64;
                if adopt.is_none() && self.last_won != Some(czxid) {
                    adopt = Some(MyNode {
                        path,
                        seq,
                        czxid,
                        epoch: sess.epoch,
                    });
                } else {
                    self.delete_path(sess, &path).await?;
                }
                continue;
            }
            match decode::<OwnerRecord>(&path, &data) {
                Ok(o) if o.node_id == self.inner.cfg.node_id => {
                    // Ours, from an earlier session (a crashed incarnation or an expired
                    // session whose node outlived it): the daemon contends only after fencing
                    // what that incarnation left, so the node is stale. No clean record.
                    self.delete_path(sess, &path).await?;
                    self.inner.counters.stale.fetch_add(1, Ordering::Relaxed);
                    self.inner.emit(LeaseNotice::StaleNodeRemoved {
                        volume: self.volume.clone(),
                        path,
                        session: stat.ephemeral_owner,
                    });
                }
                Ok(_) => {}
                // Not ours to judge or delete: it stays in the queue like any contender.
                Err(e) => self.problem(e),
            }
        }
        if let Some(n) = adopt {
            return Ok(n);
        }
        let owner = OwnerRecord {
            version: RECORD_VERSION,
            node_id: self.inner.cfg.node_id.clone(),
            host: self.inner.cfg.incarnation.host.clone(),
            pid: self.inner.cfg.incarnation.pid,
            session: format!("{:#x}", sess.id),
            created_at_ms: now_ms(),
        };
        let prefix = format!("{lock_dir}/{LOCK_PREFIX}");
        let sent = Instant::now();
        let (stat, seq) = sess
            .client
            .create(
                &prefix,
                &encode(&owner),
                &self
                    .inner
                    .create_options(zk::CreateMode::EphemeralSequential),
            )
            .await
            .map_err(|e| LeaseError::zk("create", &prefix, e))?;
        self.inner.note_contact(sent);
        let seq = seq.into_i64() as u64;
        Ok(MyNode {
            path: format!("{prefix}{seq:010}"),
            seq,
            czxid: stat.czxid as u64,
            epoch: sess.epoch,
        })
    }

    async fn delete_path(&self, sess: &Session, path: &str) -> Result<(), LeaseError> {
        match sess.client.delete(path, None).await {
            Ok(()) | Err(zk::Error::NoNode) => Ok(()),
            Err(e) => Err(LeaseError::zk("delete", path, e)),
        }
    }

    /// We are the lowest: record the win (holder record, in one multi-op with a check that
    /// our node still exists), then report it.
    async fn try_win(&mut self, sess: &Session, node: MyNode) -> State {
        let queued = |node: MyNode| State::Queued { node: Some(node) };
        let read_sent = Instant::now();
        let (prev, holder_version) = match sess.client.get_data(&self.paths.holder).await {
            Ok((data, stat)) => (
                Some(decode::<HolderRecord>(&self.paths.holder, &data)),
                Some(stat.version),
            ),
            Err(zk::Error::NoNode) => (None, None),
            Err(e) => {
                if !transient(&e) && !session_over(&e) {
                    self.problem(LeaseError::zk("get_data", &self.paths.holder, e));
                }
                self.pause().await;
                return queued(node);
            }
        };
        self.inner.note_contact(read_sent);
        let already = matches!(&prev, Some(Ok(h)) if h.generation == node.czxid);
        let (predecessor_clean, prev_gen) = match &prev {
            None => (true, None),
            Some(Ok(h)) if h.generation == node.czxid => (
                // Our own earlier attempt went through; its answer was lost.
                match self.pending_clean {
                    Some((g, c)) if g == node.czxid => c,
                    _ => false,
                },
                None,
            ),
            Some(Ok(h)) => {
                let path = self.paths.released(h.generation);
                match sess.client.check_stat(&path).await {
                    Ok(s) => (s.is_some(), Some(h.generation)),
                    Err(e) => {
                        if !transient(&e) && !session_over(&e) {
                            self.problem(LeaseError::zk("exists", &path, e));
                        }
                        self.pause().await;
                        return queued(node);
                    }
                }
            }
            Some(Err(e)) => {
                // Garbage in the holder record: we cannot know how the predecessor ended, so
                // it counts as unclean (lock-delay); our write repairs the record.
                self.problem(e.clone());
                (false, None)
            }
        };
        let mut last_contact = read_sent;
        if !already {
            self.pending_clean = Some((node.czxid, predecessor_clean));
            let now = now_ms();
            let holder = HolderRecord {
                version: RECORD_VERSION,
                generation: node.czxid,
                node_id: self.inner.cfg.node_id.clone(),
                host: self.inner.cfg.incarnation.host.clone(),
                acquired_at_ms: now,
            };
            let mut w = sess.client.new_multi_writer();
            let built = w
                // Our node must still exist (version -1: any); a check changes nothing, so no
                // watch fires (a data change would wake the successor for nothing).
                .add_check_version(&node.path, -1)
                .and_then(|()| match holder_version {
                    Some(v) => w.add_set_data(&self.paths.holder, &encode(&holder), Some(v)),
                    None => w.add_create(
                        &self.paths.holder,
                        &encode(&holder),
                        &self.inner.create_options(zk::CreateMode::Persistent),
                    ),
                });
            if let Err(e) = built {
                self.problem(LeaseError::zk("multi", &node.path, e));
                self.pause().await;
                return queued(node);
            }
            let sent = Instant::now();
            match w.commit().await {
                Ok(_) => {}
                Err(zk::MultiWriteError::OperationFailed {
                    index: 0,
                    source: zk::Error::NoNode,
                }) => {
                    self.lost(format!(
                        "lock node {} vanished before the win was recorded",
                        node.path
                    ));
                    return State::Idle;
                }
                Err(zk::MultiWriteError::OperationFailed { index: 1, .. }) => {
                    // The holder record changed under us (a racing repair): read it again.
                    return queued(node);
                }
                Err(e) => {
                    let e: zk::Error = e.into();
                    if !transient(&e) && !session_over(&e) {
                        self.problem(LeaseError::zk("multi", &node.path, e));
                    }
                    self.pause().await;
                    return queued(node);
                }
            }
            self.inner.note_contact(sent);
            last_contact = sent;
        }
        if self.last_won != Some(node.czxid) {
            let won = LeaseNotice::Won {
                volume: self.volume.clone(),
                generation: Generation(node.czxid),
                predecessor_clean,
                last_contact,
            };
            if !self.inner.emit_won(&self.volume, node.epoch, won) {
                // The session ended between the win and now: the node went with it.
                self.lost("the ZooKeeper session ended while queued");
                return State::Idle;
            }
            self.last_won = Some(node.czxid);
            self.inner.counters.wins.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(g) = prev_gen {
            self.collect_released(sess, g).await;
        }
        State::Held {
            node,
            predecessor_clean,
        }
    }

    /// Deletes clean-release records older than `keep` (best effort).
    async fn collect_released(&self, sess: &Session, keep: u64) {
        let Ok(children) = sess.client.list_children(&self.paths.released_dir).await else {
            return;
        };
        for c in children {
            if let Ok(g) = c.parse::<u64>() {
                if g < keep {
                    let _ = sess.client.delete(&self.paths.released(g), None).await;
                }
            }
        }
    }

    async fn held(&mut self, node: MyNode, predecessor_clean: bool) -> State {
        let same = |node: MyNode| State::Held {
            node,
            predecessor_clean,
        };
        let sess = match self.session() {
            Some(s) if s.epoch == node.epoch => s,
            Some(_) | None => {
                self.orphans.insert(node.czxid, node.path.clone());
                self.inner.emit_held_lost(
                    &self.volume,
                    node.epoch,
                    "the ZooKeeper session ended while holding the lease".to_string(),
                );
                return State::Idle;
            }
        };
        // Watch our own node: a break-lock (admin deletes it) must end the lease at once.
        let watcher = match sess.client.check_and_watch_stat(&node.path).await {
            Ok((None, _)) => {
                self.inner.emit_held_lost(
                    &self.volume,
                    node.epoch,
                    format!(
                        "lock node {} was deleted by another client (lock broken by an administrator?)",
                        node.path
                    ),
                );
                return State::Idle;
            }
            Ok((Some(_), w)) => Some(w),
            Err(_) => None,
        };
        let Some(watcher) = watcher else {
            // Connection trouble: commands still count; the session watch decides the rest.
            let pause = self.inner.retry_pause();
            return tokio::select! {
                cmd = self.cmds.recv() => self.on_cmd_held(cmd, node, predecessor_clean).await,
                _ = tokio::time::sleep(pause) => same(node),
            };
        };
        let mut watch = Box::pin(watcher.changed());
        let cmd = tokio::select! {
            ev = &mut watch => {
                return match ev.event_type {
                    zk::EventType::NodeDeleted => {
                        self.inner.emit_held_lost(
                            &self.volume,
                            node.epoch,
                            format!(
                                "lock node {} was deleted by another client (lock broken by an administrator?)",
                                node.path
                            ),
                        );
                        State::Idle
                    }
                    _ => same(node),
                }
            }
            cmd = self.cmds.recv() => cmd,
            r = self.sessions.changed() => {
                return match r {
                    Ok(()) => same(node),
                    Err(_) => State::Stopped,
                }
            }
        };
        // Remove our own watch (the client sends RemoveWatches now, ahead of any release on
        // the same connection), so a release wakes only the successor.
        drop(watch);
        self.on_cmd_held(cmd, node, predecessor_clean).await
    }

    async fn on_cmd_held(
        &mut self,
        cmd: Option<Cmd>,
        node: MyNode,
        predecessor_clean: bool,
    ) -> State {
        let same = |node: MyNode| State::Held {
            node,
            predecessor_clean,
        };
        match cmd {
            None | Some(Cmd::Stop) => State::Stopped,
            Some(Cmd::Release { generation, clean }) if generation == node.czxid => {
                self.inner.forget_held(&self.volume);
                self.release(&node.path, node.czxid, clean).await;
                State::Idle
            }
            Some(Cmd::Release { generation, clean }) => {
                self.release_orphan(generation, clean).await;
                same(node)
            }
            // The loss of this lease was reported already (its session ended and
            // `session_ended` said so before this actor noticed): the core's contend or
            // withdraw is about what comes next, not about this dead lease. Ignoring it here
            // left the volume uncontended for good (found by the fault campaign).
            Some(cmd @ (Cmd::Withdraw | Cmd::Contend))
                if !self.inner.still_held(&self.volume, node.epoch) =>
            {
                self.orphans.insert(node.czxid, node.path.clone());
                match cmd {
                    Cmd::Contend => State::Queued { node: None },
                    _ => State::Idle,
                }
            }
            // Once `Won` is sent, only the core's `Release` (or a loss) gives the generation
            // back. A `Withdraw` or `Contend` now was decided before the core saw the win
            // (it is still in the channel): when it arrives, the core either takes it (it
            // contends again) or answers with `Release` (it does not want it). Giving it back
            // here instead could let the core act on a win that is already gone.
            Some(Cmd::Withdraw) | Some(Cmd::Contend) => same(node),
        }
    }

    /// Removes a queued (never won) node, retrying until done or the session is gone.
    async fn delete_node(&self, node: &MyNode) {
        loop {
            let Some(sess) = self.session() else { return };
            if sess.epoch != node.epoch {
                return;
            }
            match sess.client.delete(&node.path, None).await {
                Ok(()) | Err(zk::Error::NoNode) => return,
                Err(e) if transient(&e) => self.pause().await,
                Err(e) if session_over(&e) => return,
                Err(e) => {
                    self.problem(LeaseError::zk("delete", &node.path, e));
                    return;
                }
            }
        }
    }

    async fn release_orphan(&mut self, generation: u64, clean: bool) {
        if let Some(path) = self.orphans.remove(&generation) {
            self.release(&path, generation, clean).await;
        }
    }

    /// Gives up `generation` (lock node `path`): clean = record + delete in one multi-op.
    /// Retries until done or no session can do it.
    async fn release(&self, path: &str, generation: u64, clean: bool) {
        let record_path = self.paths.released(generation);
        let record = ReleasedRecord {
            version: RECORD_VERSION,
            generation,
            node_id: self.inner.cfg.node_id.clone(),
            released_at_ms: now_ms(),
        };
        let mut with_record = clean;
        loop {
            let Some(sess) = self.session() else {
                self.problem(LeaseError::Connect {
                    hosts: self.inner.cfg.hosts.clone(),
                    reason: format!(
                        "no session to release generation {generation} ({path}); it goes with the \
                         expired session, without a clean-release record"
                    ),
                });
                return;
            };
            let mut w = sess.client.new_multi_writer();
            let built = if with_record {
                w.add_create(
                    &record_path,
                    &encode(&record),
                    &self.inner.create_options(zk::CreateMode::Persistent),
                )
                .and_then(|()| w.add_delete(path, None))
            } else {
                w.add_delete(path, None)
            };
            if let Err(e) = built {
                self.problem(LeaseError::zk("multi", path, e));
                return;
            }
            let delete_index = usize::from(with_record);
            match w.commit().await {
                Ok(_) => {
                    self.released(generation, with_record);
                    return;
                }
                Err(zk::MultiWriteError::OperationFailed {
                    index,
                    source: zk::Error::NoNode,
                }) if index == delete_index => {
                    // Already gone: our earlier attempt (whose answer was lost) or the session.
                    let recorded =
                        matches!(sess.client.check_stat(&record_path).await, Ok(Some(_)));
                    self.released(generation, recorded);
                    return;
                }
                Err(zk::MultiWriteError::OperationFailed {
                    index: 0,
                    source: zk::Error::NodeExists,
                }) if with_record => {
                    // The record exists already; just delete the node.
                    with_record = false;
                }
                Err(zk::MultiWriteError::OperationFailed {
                    index: 0,
                    source: zk::Error::NoNode,
                }) if with_record => {
                    let opts = self.inner.create_options(zk::CreateMode::Persistent);
                    let _ = sess.client.mkdir(&self.paths.released_dir, &opts).await;
                }
                Err(e) => {
                    let e: zk::Error = e.into();
                    if transient(&e) || session_over(&e) {
                        // Retry; an over session is replaced (or reported gone) meanwhile.
                        self.pause().await;
                    } else {
                        self.problem(LeaseError::zk("multi", path, e));
                        return;
                    }
                }
            }
        }
    }

    fn released(&self, generation: u64, clean: bool) {
        let c = &self.inner.counters;
        if clean {
            c.clean.fetch_add(1, Ordering::Relaxed);
        } else {
            c.unclean.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.emit(LeaseNotice::Released {
            volume: self.volume.clone(),
            generation: Generation(generation),
            clean,
        });
    }
}
