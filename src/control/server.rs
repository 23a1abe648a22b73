//! The control socket's daemon side: a root-only unix socket answering status, hand-over, drain, forced detach and on-demand acquire/release.
//!
//! Access: the socket is created mode 0600 and every connection's peer
//! credentials are checked (root, or the daemon's own user). Each connection
//! carries one request line and gets one response line.
//!
//! Operator requests become driver inputs; after sending one the server waits
//! for the driver to have processed it ([`Input::Sync`]) so the answer reflects
//! the request, never a stale board.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{Activation, Config};
use crate::core::{Event, Phase};
use crate::daemon::{Input, SessionView, StatusBoard, VolumeStatus};
use crate::lease::LeaseService;

use super::proto::{Envelope, ErrorKind, Request, Response, StatusReport, VolumeReport, PROTOCOL};
use super::refs::References;

/// Everything the server needs from the daemon.
pub struct ControlContext {
    /// The daemon's config.
    pub cfg: Arc<Config>,
    /// The driver's input.
    pub tx: mpsc::UnboundedSender<Input>,
    /// The driver's status board.
    pub board: StatusBoard,
    /// Changes whenever the board does.
    pub changes: watch::Receiver<u64>,
    /// The session as the driver last heard of it.
    pub session: Arc<Mutex<SessionView>>,
    /// Negotiated session timeout.
    pub session_timeout: Duration,
    /// The instant the board's times count from.
    pub origin: std::time::Instant,
    /// Durable references on on-demand volumes.
    pub refs: Arc<Mutex<References>>,
    /// The lease service (to name a holder elsewhere when a wait runs out);
    /// weak, so that connections in flight never keep it from shutting down.
    pub lease: Option<std::sync::Weak<LeaseService>>,
}

/// Binds the socket at `path`: refuses if a live daemon answers there, replaces a stale one, mode 0600.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            anyhow::bail!(
                "control socket {} exists and is not a socket: remove it or set control.socket",
                path.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another daemon answers on the control socket {}: stop it first, or give this one its own control.socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .map_err(|e| anyhow::anyhow!("removing the stale socket {}: {e}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("binding the control socket {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| anyhow::anyhow!("chmod 0600 {}: {e}", path.display()))?;
    Ok(listener)
}

/// Serves connections until the task is aborted; removes the socket file when dropped.
pub async fn serve(listener: UnixListener, path: PathBuf, ctx: Arc<ControlContext>) {
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _cleanup = Cleanup(path);
    let me = nix::unistd::geteuid().as_raw();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "control socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(c) if c.uid() == 0 || c.uid() == me => {}
            Ok(c) => {
                tracing::warn!(
                    uid = c.uid(),
                    pid = c.pid(),
                    "control socket: refused a connection from a non-root user"
                );
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket: no peer credentials; refused");
                continue;
            }
        }
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, &ctx).await {
                tracing::debug!(error = %e, "control connection ended");
            }
        });
    }
}

async fn connection(stream: UnixStream, ctx: &ControlContext) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r.take(64 * 1024));
    let mut line = String::new();
    let n = tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request line"))??;
    let response = if n == 0 {
        return Ok(());
    } else {
        match serde_json::from_str::<Envelope>(&line) {
            Ok(env) if env.protocol != PROTOCOL => error(
                ErrorKind::BadRequest,
                format!(
                    "protocol version {} is not this daemon's {PROTOCOL}: use the CLI of the same release",
                    env.protocol
                ),
            ),
            Ok(env) => {
                tracing::info!(request = ?env.request, "control request");
                // The client keeps its side open until it has the answer: EOF
                // (or an error) before that means it is gone.
                let gone = async {
                    let mut buf = [0u8; 64];
                    loop {
                        match reader.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                    }
                };
                match handle_or_abandon(ctx, env.request, gone).await {
                    Some(r) => r,
                    None => return Ok(()),
                }
            }
            Err(e) => error(ErrorKind::BadRequest, format!("not a request: {e}")),
        }
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_else(|_| b"{}".to_vec());
    out.push(b'\n');
    w.write_all(&out).await?;
    w.shutdown().await
}

fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
    Response::Error {
        kind,
        message: message.into(),
    }
}

/// Handles one request.
pub async fn handle(ctx: &ControlContext, req: Request) -> Response {
    if let Some(v) = req.volume() {
        if ctx.cfg.volume(v).is_none() {
            let names: Vec<&str> = ctx.cfg.volumes.iter().map(|v| v.name.as_str()).collect();
            return error(
                ErrorKind::UnknownVolume,
                format!(
                    "no volume {v:?} in {} (volumes: {})",
                    ctx.cfg.file,
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                ),
            );
        }
    }
    match req {
        Request::Status => Response::Status(status(ctx)),
        Request::Release { volume } => {
            operator(ctx, &[volume], Event::Release { rejoin: true }).await
        }
        Request::Drain { volume } => {
            operator(ctx, &targets(ctx, volume), Event::Release { rejoin: false }).await
        }
        Request::Resume { volume } => {
            let vs = targets(ctx, volume);
            for v in &vs {
                if let Err(e) = crate::daemon::run::set_held_out(&ctx.cfg.node.state_dir, v, false)
                {
                    return error(
                        ErrorKind::Unavailable,
                        format!("{v}: could not clear the held-out marker: {e}"),
                    );
                }
            }
            // An on-demand volume nobody references stays out: resuming it
            // would hold a lease (and block other nodes) for nobody.
            let (held, idle): (Vec<String>, Vec<String>) = vs.into_iter().partition(|v| {
                ctx.cfg
                    .volume(v)
                    .map_or(true, |c| c.activation != Activation::OnDemand)
                    || ctx.refs.lock().unwrap_or_else(|p| p.into_inner()).count(v) > 0
            });
            let mut r = operator(ctx, &held, Event::Resume).await;
            if let Response::Ok { message } = &mut r {
                for v in &idle {
                    if !message.is_empty() {
                        message.push('\n');
                    }
                    message.push_str(&format!(
                        "{v}: on demand with no references: stays out until acquired"
                    ));
                }
            }
            r
        }
        Request::ForceDetach { volume } => {
            // On disk first: a restarted daemon keeps the volume out too.
            if let Err(e) = crate::daemon::run::set_held_out(&ctx.cfg.node.state_dir, &volume, true)
            {
                return error(
                    ErrorKind::Unavailable,
                    format!("{volume}: could not record the held-out marker: {e}"),
                );
            }
            operator(ctx, &[volume], Event::ForceDetach).await
        }
        Request::Acquire {
            volume,
            holder,
            counted,
            wait_ms,
            alias,
        } => {
            acquire(
                ctx,
                &volume,
                &holder,
                counted,
                alias.as_deref(),
                Duration::from_millis(wait_ms),
            )
            .await
        }
        Request::Unacquire {
            volume,
            holder,
            wait_ms,
        } => {
            let holder = ctx
                .refs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .resolve(&holder);
            unacquire(ctx, volume, &holder, Duration::from_millis(wait_ms)).await
        }
    }
}

fn targets(ctx: &ControlContext, volume: Option<String>) -> Vec<String> {
    match volume {
        Some(v) => vec![v],
        None => ctx.cfg.volumes.iter().map(|v| v.name.clone()).collect(),
    }
}

/// Sends inputs and waits until the driver has processed them.
async fn send(ctx: &ControlContext, inputs: Vec<Input>) -> Result<(), Response> {
    let gone = || {
        error(
            ErrorKind::Unavailable,
            "the daemon is shutting down: request not carried out",
        )
    };
    for i in inputs {
        ctx.tx.send(i).map_err(|_| gone())?;
    }
    let (tx, rx) = oneshot::channel();
    ctx.tx.send(Input::Sync(tx)).map_err(|_| gone())?;
    rx.await.map_err(|_| gone())
}

fn volume_status(ctx: &ControlContext, volume: &str) -> Option<VolumeStatus> {
    ctx.board
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find(|s| s.name == volume)
        .cloned()
}

async fn operator(ctx: &ControlContext, volumes: &[String], event: Event) -> Response {
    let inputs = volumes
        .iter()
        .map(|v| Input::Operator {
            volume: v.clone(),
            event: event.clone(),
        })
        .collect();
    if let Err(r) = send(ctx, inputs).await {
        return r;
    }
    let lines: Vec<String> = volumes
        .iter()
        .map(|v| match volume_status(ctx, v) {
            Some(s) => format!("{v}: {} ({})", s.last_reason, s.phase.name()),
            None => format!("{v}: not started yet"),
        })
        .collect();
    Response::Ok {
        message: lines.join("\n"),
    }
}

fn epoch_ms(t: std::time::Instant) -> u64 {
    let age = std::time::Instant::now().saturating_duration_since(t);
    SystemTime::now()
        .checked_sub(age)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// The status report.
pub fn status(ctx: &ControlContext) -> StatusReport {
    let session = *ctx.session.lock().unwrap_or_else(|p| p.into_inner());
    let board = ctx.board.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let refs = ctx.refs.lock().unwrap_or_else(|p| p.into_inner());
    let elapsed = ctx.origin.elapsed();
    let volumes = ctx
        .cfg
        .volumes
        .iter()
        .map(|v| {
            let s = board.iter().find(|s| s.name == v.name);
            VolumeReport {
                name: v.name.clone(),
                phase: s.map_or("init", |s| s.phase.name()).to_string(),
                generation: s.and_then(|s| s.generation).map(|g| g.0),
                since_ms: s.map_or(0, |s| epoch_ms(ctx.origin + s.since)),
                exposed: s.is_some_and(|s| s.exposed),
                fence_deadline_in_ms: s.and_then(|s| s.fence_deadline).map(|d| {
                    let d = d.as_millis() as i64;
                    d - elapsed.as_millis() as i64
                }),
                last_reason: s.map(|s| s.last_reason.clone()).unwrap_or_default(),
                activation: match v.activation {
                    Activation::Always => "always",
                    Activation::OnDemand => "on-demand",
                }
                .to_string(),
                mount_path: v.mount_path.display().to_string(),
                references: refs.of(&v.name),
            }
        })
        .collect();
    StatusReport {
        node: ctx.cfg.node.id.clone(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        session_state: session.state.to_string(),
        last_contact_age_ms: session.last_contact.map(|t| t.elapsed().as_millis() as u64),
        session_timeout_ms: ctx.session_timeout.as_millis() as u64,
        volumes,
    }
}

fn is_progress(p: Phase) -> bool {
    matches!(
        p,
        Phase::LockDelay | Phase::Attaching | Phase::Checking | Phase::Mounting | Phase::Starting
    )
}

async fn acquire(
    ctx: &ControlContext,
    volume: &str,
    holder: &str,
    counted: bool,
    alias: Option<&str>,
    wait: Duration,
) -> Response {
    let Some(vcfg) = ctx.cfg.volume(volume) else {
        return error(ErrorKind::UnknownVolume, format!("no volume {volume:?}"));
    };
    if vcfg.activation != Activation::OnDemand {
        return error(
            ErrorKind::NotApplicable,
            format!(
                "volume {volume} has activation = \"always\": the daemon holds it whenever it can and runs its own task; set activation = \"on-demand\" in {} to hand it out through dvdcli or Mesos",
                ctx.cfg.file
            ),
        );
    }
    if crate::daemon::run::held_out(&ctx.cfg.node.state_dir, volume) {
        return error(
            ErrorKind::NotApplicable,
            format!("volume {volume} was force-detached on this node and is held out: run `nbd-failover resume {volume}` first"),
        );
    }
    let deadline = tokio::time::Instant::now() + wait;
    // On disk before anything is acquired.
    let change = {
        let mut refs = ctx.refs.lock().unwrap_or_else(|p| p.into_inner());
        refs.add_with_alias(volume, holder, counted, alias)
    };
    let change = match change {
        Ok(c) => c,
        Err(e) => {
            return error(
                ErrorKind::Unavailable,
                format!("could not record the reference: {e:#}"),
            )
        }
    };
    tracing::info!(volume, holder, references = change.after, "reference taken");
    let mut inputs = Vec::new();
    if change.before == 0 {
        inputs.push(Input::Operator {
            volume: volume.to_string(),
            event: Event::Resume,
        });
    }
    if let Err(r) = send(ctx, inputs).await {
        return r;
    }
    let mut changes = ctx.changes.clone();
    let mut saw_progress = false;
    let failure = loop {
        changes.borrow_and_update();
        let Some(s) = volume_status(ctx, volume) else {
            break None;
        };
        match s.phase {
            Phase::Running => {
                return Response::Acquired {
                    volume: volume.to_string(),
                    mount_path: vcfg.mount_path.display().to_string(),
                    generation: s.generation.map_or(0, |g| g.0),
                    references: change.after,
                };
            }
            p if is_progress(p) => saw_progress = true,
            Phase::Fencing | Phase::Out if saw_progress => {
                break Some(error(
                    ErrorKind::Failed,
                    format!(
                        "volume {volume} did not come up on node {}: {}",
                        ctx.cfg.node.id, s.last_reason
                    ),
                ));
            }
            Phase::Stopped => {
                break Some(error(
                    ErrorKind::Unavailable,
                    "the daemon is shutting down".to_string(),
                ))
            }
            _ => {}
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { break None },
            _ = tokio::time::sleep_until(deadline) => break None,
        }
    };
    // Not acquired: take the reference back so nothing stays half-acquired.
    undo_acquire(ctx, volume, holder, counted).await;
    if let Some(f) = failure {
        return f;
    }
    let now = volume_status(ctx, volume);
    let mut why = match &now {
        Some(s) => format!("it is {} here ({})", s.phase.name(), s.last_reason),
        None => "it has not started here".to_string(),
    };
    if let Some(lease) = ctx.lease.as_ref().and_then(std::sync::Weak::upgrade) {
        if let Ok(Ok(st)) = tokio::time::timeout(Duration::from_secs(2), lease.status(volume)).await
        {
            if let Ok(Some(h)) = st.holder() {
                if h.node_id != ctx.cfg.node.id {
                    why = format!(
                        "the lease is held by node {} (host {}, pid {}); {why}",
                        h.node_id, h.host, h.pid
                    );
                }
            }
        }
    }
    error(
        ErrorKind::Timeout,
        format!(
            "volume {volume} not mounted within {}s: {why}",
            wait.as_secs_f64().round()
        ),
    )
}

/// Takes back the reference an acquire added; the last one drains the volume.
async fn undo_acquire(ctx: &ControlContext, volume: &str, holder: &str, counted: bool) {
    let undo = {
        let mut refs = ctx.refs.lock().unwrap_or_else(|p| p.into_inner());
        refs.remove(volume, holder, !counted)
    };
    match undo {
        Ok(c) if c.before > 0 && c.after == 0 => {
            tracing::info!(volume, holder, "reference taken back: draining");
            let _ = send(
                ctx,
                vec![Input::Operator {
                    volume: volume.to_string(),
                    event: Event::Release { rejoin: false },
                }],
            )
            .await;
        }
        Ok(_) => {}
        Err(e) => {
            tracing::error!(volume, holder, error = %e, "could not take the reference back")
        }
    }
}

/// Runs `req`; an acquire whose client goes away before the answer (killed by
/// the module's timeout, SIGTERM, a crash) has its reference taken back, so
/// nothing stays half-acquired. `None`: nobody is left to answer.
async fn handle_or_abandon(
    ctx: &ControlContext,
    req: Request,
    client_gone: impl std::future::Future<Output = ()>,
) -> Option<Response> {
    let Request::Acquire {
        volume,
        holder,
        counted,
        ..
    } = &req
    else {
        return Some(handle(ctx, req).await);
    };
    let (volume, holder, counted) = (volume.clone(), holder.clone(), *counted);
    tokio::select! {
        r = handle(ctx, req) => Some(r),
        _ = client_gone => {
            tracing::warn!(volume = %volume, holder = %holder, "the client went away while waiting for the volume: taking its reference back");
            undo_acquire(ctx, &volume, &holder, counted).await;
            None
        }
    }
}

async fn unacquire(
    ctx: &ControlContext,
    volume: Option<String>,
    holder: &str,
    wait: Duration,
) -> Response {
    let volumes = match volume {
        Some(v) => vec![v],
        None => ctx
            .refs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .held_by(holder),
    };
    if volumes.is_empty() {
        tracing::info!(
            holder,
            "release of a holder with no references: nothing to do"
        );
        return Response::Ok {
            message: format!("{holder} holds no references: nothing to do"),
        };
    }
    let deadline = tokio::time::Instant::now() + wait;
    let mut lines = Vec::new();
    let mut draining = Vec::new();
    for v in volumes {
        // Off the disk before the drain.
        let change = {
            let mut refs = ctx.refs.lock().unwrap_or_else(|p| p.into_inner());
            refs.remove(&v, holder, false)
        };
        match change {
            Err(e) => {
                return error(
                    ErrorKind::Unavailable,
                    format!("could not record the release of {v}: {e:#}"),
                )
            }
            Ok(c) if c.before == 0 || c.before == c.after => {
                tracing::info!(volume = %v, holder, "release of a reference not held: nothing to do");
                lines.push(format!("{v}: {holder} held no reference: nothing to do"));
            }
            Ok(c) if c.after > 0 => {
                lines.push(format!(
                    "{v}: reference dropped, {} left: stays mounted",
                    c.after
                ));
            }
            Ok(_) => draining.push(v),
        }
    }
    if draining.is_empty() {
        return Response::Ok {
            message: lines.join("\n"),
        };
    }
    let inputs = draining
        .iter()
        .map(|v| Input::Operator {
            volume: v.clone(),
            event: Event::Release { rejoin: false },
        })
        .collect();
    if let Err(r) = send(ctx, inputs).await {
        return r;
    }
    let mut changes = ctx.changes.clone();
    loop {
        changes.borrow_and_update();
        let pending: Vec<VolumeStatus> = draining
            .iter()
            .filter_map(|v| volume_status(ctx, v))
            .filter(|s| s.exposed || !matches!(s.phase, Phase::Out | Phase::Stopped))
            .collect();
        if pending.is_empty() {
            break;
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { break },
            _ = tokio::time::sleep_until(deadline) => {
                let what: Vec<String> = pending.iter().map(|s| format!("{} is still {} ({})", s.name, s.phase.name(), s.last_reason)).collect();
                return error(ErrorKind::Timeout, format!("last reference dropped, but the fence did not finish within {}s: {}", wait.as_secs(), what.join("; ")));
            }
        }
    }
    for v in draining {
        lines.push(format!(
            "{v}: last reference dropped: unmounted, detached and released cleanly"
        ));
    }
    Response::Ok {
        message: lines.join("\n"),
    }
}
