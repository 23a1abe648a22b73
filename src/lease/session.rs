//! The daemon's one ZooKeeper session: connect, register the node id, ping on its own clock, report contact, rebuild after expiry.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;
use zookeeper_client as zk;

use super::config::{Credentials, LeaseConfig};
use super::error::{session_over, LeaseError};
use super::identity::{judge, Claim, Incarnation, Registration};
use super::store::{decode, encode, node_path, now_ms, RECORD_VERSION};
use super::{Inner, LeaseNotice, Session};

/// At most this many pings in flight (they pile up only while the connection hangs).
const MAX_PINGS_IN_FLIGHT: usize = 8;

/// Opens a session as `creds`, creates the chroot (and `/nodes`, `/volumes`) with `acl`, and
/// returns the chrooted client.
pub(crate) async fn open(
    cfg: &LeaseConfig,
    creds: Option<&Credentials>,
    acl: &[zk::Acl],
) -> Result<zk::Client, LeaseError> {
    let mut c = zk::Client::connector().with_session_timeout(cfg.session_timeout);
    if let Some(cr) = creds {
        c = c.with_auth("digest", &cr.auth_bytes());
    }
    let connect_err = |reason: String| LeaseError::Connect {
        hosts: cfg.hosts.clone(),
        reason,
    };
    let fut = async {
        match &cfg.tls {
            Some(t) => c.with_tls(t.options()?).secure_connect(&cfg.hosts).await,
            None => c.connect(&cfg.hosts).await,
        }
        .map_err(|e| connect_err(e.to_string()))
    };
    let root = match tokio::time::timeout(cfg.connect_timeout, fut).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(connect_err(format!(
                "no session within the connect timeout {:?}{}",
                cfg.connect_timeout,
                if cfg.tls.is_some() {
                    " (with TLS, also check that the CA file signed the servers' certificates \
                     and that the server accepts the client certificate: the client library \
                     retries failed handshakes without saying why)"
                } else {
                    ""
                }
            )))
        }
    };
    let dir = zk::CreateMode::Persistent.with_acls(zk::Acls::new(acl));
    let refused = |path: &str, e: zk::Error| match e {
        zk::Error::NoAuth => LeaseError::NotAuthorized {
            path: format!("{}{path}", cfg.chroot.trim_end_matches('/')),
            identity: match creds {
                Some(c) => format!("digest user {:?}", c.user()),
                None => "no identity (no credentials configured)".to_string(),
            },
        },
        e => LeaseError::zk("create", path, e),
    };
    if cfg.chroot != "/" {
        root.mkdir(&cfg.chroot, &dir)
            .await
            .map_err(|e| refused("", e))?;
    }
    let client = if cfg.chroot == "/" {
        root
    } else {
        root.chroot(cfg.chroot.as_str()).map_err(|_| {
            LeaseError::Config(format!("chroot {:?} is not a valid path", cfg.chroot))
        })?
    };
    for d in ["/nodes", "/volumes"] {
        client.mkdir(d, &dir).await.map_err(|e| refused(d, e))?;
    }
    Ok(client)
}

/// Opens the service's session and registers its node id. Returns the client and the instant
/// just before connecting (a lower bound of the session's first contact).
pub(crate) async fn connect_and_register(
    inner: &Inner,
) -> Result<(zk::Client, Instant), LeaseError> {
    let sent = Instant::now();
    let client = open(&inner.cfg, inner.cfg.auth.as_ref(), &inner.acl).await?;
    register(inner, &client).await?;
    inner.set_timeout(client.session_timeout());
    Ok((client, sent))
}

/// Creates `/nodes/<id>`, replacing a record of a dead incarnation or an earlier session of
/// this service, refusing one of a live daemon.
async fn register(inner: &Inner, client: &zk::Client) -> Result<(), LeaseError> {
    let cfg = &inner.cfg;
    let path = node_path(&cfg.node_id);
    let me = Registration {
        version: RECORD_VERSION,
        node_id: cfg.node_id.clone(),
        incarnation: cfg.incarnation.clone(),
        instance: inner.instance,
        started_at_ms: now_ms(),
    };
    let my_session = client.session_id().0;
    let opts = inner.create_options(zk::CreateMode::Ephemeral);
    let mut last = None;
    for _ in 0..20 {
        match client.create(&path, &encode(&me), &opts).await {
            Ok(_) => return Ok(()),
            Err(zk::Error::NodeExists) => {}
            Err(e) if session_over(&e) => return Err(LeaseError::zk("create", &path, e)),
            Err(e) => {
                last = Some(LeaseError::zk("create", &path, e));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        }
        let (data, stat) = match client.get_data(&path).await {
            Ok(x) => x,
            Err(zk::Error::NoNode) => continue,
            Err(e) => {
                last = Some(LeaseError::zk("get_data", &path, e));
                continue;
            }
        };
        let found: Registration = decode(&path, &data)?;
        match judge(
            &found,
            stat.ephemeral_owner,
            &cfg.incarnation,
            inner.instance,
            my_session,
            Incarnation::is_alive_here,
        ) {
            Claim::Mine => return Ok(()),
            Claim::MyEarlierSession | Claim::DeadIncarnation => {
                match client.delete(&path, Some(stat.version)).await {
                    Ok(()) | Err(zk::Error::NoNode) | Err(zk::Error::BadVersion) => {}
                    Err(e) => return Err(LeaseError::zk("delete", &path, e)),
                }
            }
            Claim::Live(holder) => {
                return Err(LeaseError::NodeIdInUse {
                    node_id: cfg.node_id.clone(),
                    holder,
                })
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        LeaseError::Config(format!("could not register {path}: it kept changing"))
    }))
}

/// How one session ended.
enum End {
    Shutdown,
    Over(zk::SessionState),
}

/// Makes a new session the current one (epoch `epoch`).
pub(crate) fn publish(inner: &Inner, client: &zk::Client, sent: Instant, epoch: u64) {
    let id = client.session_id().0;
    inner.note_contact(sent);
    inner.session_tx.send_replace(Some(Arc::new(Session {
        epoch,
        client: client.clone(),
        id,
    })));
    inner.emit(LeaseNotice::SessionStarted {
        session: id,
        timeout: client.session_timeout(),
    });
}

/// The session task: serves the published session (epoch 1), and after it ends (expired,
/// closed) reports it, tells the volumes (they report `Lost`) and builds a new one.
pub(crate) async fn run(
    inner: Arc<Inner>,
    mut client: zk::Client,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut epoch = 1;
    loop {
        let id = client.session_id().0;
        let end = serve(&inner, &client, &mut shutdown).await;
        inner.session_tx.send_replace(None);
        match end {
            End::Shutdown => {
                // Close the session (the client sends CloseSession once its last handle is
                // gone) and wait for it, so the registration and lock nodes are gone when
                // `shutdown` returns.
                let mut states = client.state_watcher();
                drop(client);
                let closed = async {
                    while !state_over(states.peek_state()) {
                        states.changed().await;
                    }
                };
                let _ = tokio::time::timeout(inner.cfg.session_timeout, closed).await;
                return;
            }
            End::Over(state) => {
                // Every lease won under this session is lost: said before anything of
                // the next session (the session is unpublished above, so no volume can
                // report a win under it any more).
                inner.session_ended(epoch, &format!("{state:?}"));
                inner.emit(LeaseNotice::SessionEnded {
                    session: id,
                    state: format!("{state:?}"),
                })
            }
        }
        drop(client);
        let mut backoff = inner.retry_pause();
        loop {
            if *shutdown.borrow() {
                return;
            }
            match connect_and_register(&inner).await {
                Ok((c, sent)) => {
                    client = c;
                    epoch += 1;
                    publish(&inner, &client, sent, epoch);
                    break;
                }
                Err(e) => {
                    inner.problem(None, e);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => return,
                    }
                    backoff = (backoff * 2).min(inner.cfg.session_timeout);
                }
            }
        }
    }
}

/// Pings, watches the library's state and reports contact until the session is over.
async fn serve(inner: &Inner, client: &zk::Client, shutdown: &mut watch::Receiver<bool>) -> End {
    let t = client.session_timeout();
    let ping_every = inner.cfg.ping_interval_for(t);
    let suspect_after = inner.cfg.suspect_after_for(t);
    let mut states = client.state_watcher();
    let mut ticker = tokio::time::interval(ping_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pings: JoinSet<Result<Instant, zk::Error>> = JoinSet::new();
    let mut suspected = false;
    let ping = |pings: &mut JoinSet<Result<Instant, zk::Error>>| {
        if pings.len() < MAX_PINGS_IN_FLIGHT {
            let c = client.clone();
            let sent = Instant::now();
            pings.spawn(async move { c.sync("/").await.map(|()| sent) });
        }
    };
    loop {
        let last = inner.last_contact().unwrap_or_else(Instant::now);
        let suspect_at = tokio::time::Instant::from_std(last + suspect_after);
        tokio::select! {
            _ = ticker.tick() => ping(&mut pings),
            Some(done) = pings.join_next() => match done {
                Ok(Ok(sent)) => {
                    inner.counters.pings.fetch_add(1, Ordering::Relaxed);
                    let newer = inner.note_contact(sent);
                    if suspected {
                        // Only a fresh answer ends the suspicion (a late answer to an old ping
                        // is contact, but an old one).
                        if Instant::now() < sent + suspect_after {
                            suspected = false;
                            inner.emit(LeaseNotice::Reconnected { last_contact: sent });
                        }
                    } else if newer {
                        inner.emit(LeaseNotice::Heartbeat { last_contact: sent });
                    }
                }
                Ok(Err(e)) if session_over(&e) => {
                    let state = client.state();
                    if state_over(state) {
                        return End::Over(state);
                    }
                }
                Ok(Err(_)) | Err(_) => {}
            },
            state = states.changed() => match state {
                zk::SessionState::Disconnected | zk::SessionState::ConnectedReadOnly => {
                    if !suspected {
                        suspected = true;
                        let last_contact = inner.last_contact().unwrap_or(last);
                        inner.emit(LeaseNotice::Disconnected { last_contact });
                    }
                }
                zk::SessionState::SyncConnected => ping(&mut pings),
                s @ (zk::SessionState::Expired
                | zk::SessionState::Closed
                | zk::SessionState::AuthFailed) => return End::Over(s),
            },
            _ = tokio::time::sleep_until(suspect_at), if !suspected => {
                let now_last = inner.last_contact().unwrap_or(last);
                if Instant::now() >= now_last + suspect_after {
                    suspected = true;
                    inner.emit(LeaseNotice::Disconnected { last_contact: now_last });
                }
            }
            _ = shutdown.changed() => return End::Shutdown,
        }
    }
}

fn state_over(s: zk::SessionState) -> bool {
    matches!(
        s,
        zk::SessionState::Expired | zk::SessionState::Closed | zk::SessionState::AuthFailed
    )
}
