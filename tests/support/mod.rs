//! Shared harness for tests against real components: ZooKeeper servers and ensembles, a partitioning TCP proxy, TLS test certificates, lease helpers.
//!
//! Include it from a test file with `mod support;`. Nothing here skips: if ZooKeeper
//! cannot start, the test fails with the reason and the server's log.
#![allow(dead_code, unused_imports)]

pub mod core_driver;
pub mod lab;
pub mod proxy;
pub mod zk;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nbd_failover::lease::{LeaseConfig, LeaseNotice};
use tokio::sync::mpsc;

pub use core_driver::{test_timings, CoreDriver};
pub use proxy::Proxy;
pub use zk::{TempDir, ZkEnsemble, ZkServer};

/// Lease settings for tests: no auth, `T` as given, ping every `T/10`.
pub fn lease_config(hosts: &str, chroot: &str, node_id: &str, t: Duration) -> LeaseConfig {
    let mut c = LeaseConfig::new(hosts, chroot, node_id, t).expect("lease config");
    c.connect_timeout = Duration::from_secs(20);
    c
}

/// A unique chroot per test, so tests never see each other's nodes.
pub fn chroot(test: &str) -> String {
    format!("/t-{test}-{}", std::process::id())
}

/// Collects the notices of one or more services (tagged with the index given to
/// [`Notices::add`]), with timestamps, and waits for particular ones.
pub struct Notices {
    tx: mpsc::UnboundedSender<(usize, LeaseNotice)>,
    rx: mpsc::UnboundedReceiver<(usize, LeaseNotice)>,
    /// Everything seen so far: when it was taken off the channel, from which service.
    pub seen: Vec<(Instant, usize, LeaseNotice)>,
}

impl Default for Notices {
    fn default() -> Self {
        Self::new()
    }
}

impl Notices {
    /// An empty collector.
    pub fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Notices {
            tx,
            rx,
            seen: Vec::new(),
        }
    }

    /// Forwards a service's notices, tagged `tag`.
    pub fn add(&self, tag: usize, mut rx: mpsc::UnboundedReceiver<LeaseNotice>) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            while let Some(n) = rx.recv().await {
                if tx.send((tag, n)).is_err() {
                    return;
                }
            }
        });
    }

    /// Waits for the first notice (from now on) that `pred` accepts; panics with the history
    /// after `limit`.
    pub async fn wait(
        &mut self,
        what: &str,
        limit: Duration,
        pred: impl Fn(usize, &LeaseNotice) -> bool,
    ) -> (Instant, usize, LeaseNotice) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some((tag, n))) => {
                    let at = Instant::now();
                    self.seen.push((at, tag, n.clone()));
                    if pred(tag, &n) {
                        return (at, tag, n);
                    }
                }
                Ok(None) => panic!("notice channel closed while waiting for {what}"),
                Err(_) => panic!(
                    "no {what} within {limit:?}; notices so far:\n{}",
                    self.history()
                ),
            }
        }
    }

    /// The next notice within `limit` (recorded), or `None`.
    pub async fn next(&mut self, limit: Duration) -> Option<(Instant, usize, LeaseNotice)> {
        match tokio::time::timeout(limit, self.rx.recv()).await {
            Ok(Some((tag, n))) => {
                let e = (Instant::now(), tag, n);
                self.seen.push(e.clone());
                Some(e)
            }
            Ok(None) | Err(_) => None,
        }
    }

    /// Like [`Notices::wait`], but a matching notice already seen counts too.
    pub async fn seen_or_wait(
        &mut self,
        what: &str,
        limit: Duration,
        pred: impl Fn(usize, &LeaseNotice) -> bool,
    ) -> (Instant, usize, LeaseNotice) {
        if let Some(hit) = self.seen.iter().find(|(_, i, n)| pred(*i, n)) {
            return hit.clone();
        }
        self.wait(what, limit, pred).await
    }

    /// Collects for `d` and returns what arrived in that time (where the absence of a notice
    /// is the point).
    pub async fn collect_for(&mut self, d: Duration) -> Vec<(Instant, usize, LeaseNotice)> {
        let deadline = tokio::time::Instant::now() + d;
        let mut got = Vec::new();
        while let Ok(Some((tag, n))) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            let e = (Instant::now(), tag, n);
            self.seen.push(e.clone());
            got.push(e);
        }
        got
    }

    /// The notices seen, one per line (runs of heartbeats folded).
    pub fn history(&self) -> String {
        let mut out = Vec::new();
        let mut beats = 0;
        let t0 = self.seen.first().map(|(t, _, _)| *t);
        for (t, tag, n) in &self.seen {
            if matches!(n, LeaseNotice::Heartbeat { .. }) {
                beats += 1;
                continue;
            }
            if beats > 0 {
                out.push(format!("  ({beats} heartbeats)"));
                beats = 0;
            }
            let dt = t0.map(|t0| t.duration_since(t0)).unwrap_or_default();
            out.push(format!("  +{:>6}ms [{tag}] {n:?}", dt.as_millis()));
        }
        if beats > 0 {
            out.push(format!("  ({beats} heartbeats)"));
        }
        out.join("\n")
    }
}

/// `Won` of any volume.
pub fn is_won(n: &LeaseNotice) -> bool {
    matches!(n, LeaseNotice::Won { .. })
}

/// The generation and predecessor flag of a `Won`.
pub fn won(n: &LeaseNotice) -> (u64, bool) {
    match n {
        LeaseNotice::Won {
            generation,
            predecessor_clean,
            ..
        } => (generation.0, *predecessor_clean),
        other => panic!("expected Won, got {other:?}"),
    }
}

/// Test TLS material: a CA, a server certificate and a client certificate for 127.0.0.1.
pub struct TestPki {
    /// Holds the files.
    pub dir: TempDir,
    /// CA certificate (PEM).
    pub ca: PathBuf,
    /// Server certificate + key in one PEM file (ZooKeeper's PEM keystore).
    pub server_keystore: PathBuf,
    /// Client certificate (PEM).
    pub client_cert: PathBuf,
    /// Client key (PKCS#8 PEM).
    pub client_key: PathBuf,
    /// A CA that signed nothing here (to show verification fails).
    pub other_ca: PathBuf,
}

impl TestPki {
    /// Generates everything into a temp dir.
    pub fn generate() -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let dir = TempDir::new("pki");
        let ca = |name: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("ca params");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, name);
            let k = KeyPair::generate().expect("ca key");
            let c = p.self_signed(&k).expect("ca cert");
            (c, k)
        };
        let (ca_cert, ca_key) = ca("nbd-failover test CA");
        let (other_cert, _) = ca("unrelated CA");
        let leaf = |cn: &str| {
            let mut p =
                CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                    .expect("leaf params");
            p.distinguished_name.push(DnType::CommonName, cn);
            let k = KeyPair::generate().expect("leaf key");
            let c = p.signed_by(&k, &ca_cert, &ca_key).expect("leaf cert");
            (c.pem(), k.serialize_pem())
        };
        let (server_cert, server_key) = leaf("zookeeper");
        let (client_cert, client_key) = leaf("nbd-failover");
        let d = dir.path().to_path_buf();
        let write = |name: &str, text: &str| {
            let p = d.join(name);
            std::fs::write(&p, text).expect("write pem");
            p
        };
        TestPki {
            ca: write("ca.pem", &ca_cert.pem()),
            server_keystore: write("server.pem", &format!("{server_key}{server_cert}")),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client.key", &client_key),
            other_ca: write("other-ca.pem", &other_cert.pem()),
            dir,
        }
    }
}

/// Percentile (0..=100) of durations, nearest rank.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
