//! A loopback TCP proxy that can blackhole or cut one client's traffic, to partition one node without touching the server.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward both ways.
    Pass,
    /// Forward nothing either way; connections stay open (bytes already read are held and
    /// delivered after [`Proxy::heal`]). New connections are accepted but not forwarded.
    Blackhole,
    /// Close every connection and refuse new ones (the client process "died": its socket is
    /// closed, but nothing it would have sent on the way out reaches the server).
    Cut,
}

/// The proxy: listens on 127.0.0.1, forwards to one upstream address.
pub struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    accepted: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Starts a proxy to `upstream` (`host:port`) on its own thread and runtime.
    pub fn start(upstream: &str) -> Proxy {
        let upstream: SocketAddr = upstream.parse().expect("upstream address");
        let (mode, mode_rx) = watch::channel(Mode::Pass);
        let (stop, stop_rx) = oneshot::channel();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let accepted = Arc::new(AtomicU64::new(0));
        let acc = accepted.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            rt.block_on(async move {
                let l = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
                addr_tx
                    .send(l.local_addr().expect("proxy addr"))
                    .expect("send addr");
                let serve = async {
                    loop {
                        let Ok((client, _)) = l.accept().await else {
                            continue;
                        };
                        acc.fetch_add(1, Ordering::Relaxed);
                        let rx = mode_rx.clone();
                        tokio::spawn(connection(client, upstream, rx));
                    }
                };
                tokio::select! {
                    _ = serve => {}
                    _ = stop_rx => {}
                }
            });
            // Dropping the runtime drops every connection task and socket.
        });
        let addr = addr_rx.recv().expect("proxy address");
        Proxy {
            addr,
            mode,
            accepted,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `127.0.0.1:<port>` to give the client.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Stops forwarding both ways (a partition).
    pub fn blackhole(&self) {
        self.mode.send_replace(Mode::Blackhole);
    }

    /// Forwards again.
    pub fn heal(&self) {
        self.mode.send_replace(Mode::Pass);
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.mode.send_replace(Mode::Cut);
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits until traffic may pass; `false` once cut.
async fn may_pass(rx: &mut watch::Receiver<Mode>) -> bool {
    loop {
        let m = *rx.borrow_and_update();
        match m {
            Mode::Pass => return true,
            Mode::Cut => return false,
            Mode::Blackhole => {
                if rx.changed().await.is_err() {
                    return false;
                }
            }
        }
    }
}

/// Resolves when the proxy is cut.
async fn cut(mut rx: watch::Receiver<Mode>) {
    loop {
        if *rx.borrow_and_update() == Mode::Cut {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn connection(client: TcpStream, upstream: SocketAddr, mut rx: watch::Receiver<Mode>) {
    if !may_pass(&mut rx).await {
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, rx.clone());
    let down = pump(sr, cw, rx.clone());
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        _ = cut(rx) => {}
    }
    // Both halves drop here: the sockets close.
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut rx: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !may_pass(&mut rx).await {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        // Bytes read just before a blackhole are held until it heals.
        if !may_pass(&mut rx).await {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
