//! Lease benchmark: N contenders (default 100) on one volume against a real ZooKeeper; watch notifications per release and acquire-after-release latency.
//!
//! ```text
//! cargo run --release --example lease_bench -- [--contenders N] [--releases R] [--hosts H:P]
//! ```
//!
//! Without `--hosts` it starts its own standalone ZooKeeper (Debian's `zookeeper`
//! package, the test harness's launcher) on a free loopback port and stops it at
//! the end. Each contender is a full [`LeaseService`] with its own session, as on
//! separate nodes. The holder releases cleanly; the time from the release call to
//! the next holder's `Won` is the acquire latency. Every contender counts the
//! predecessor-watch notifications it receives: a herd-free lock gets exactly one
//! per release. Exits non-zero if any release woke more or fewer than one.

#[path = "../tests/support/zk.rs"]
#[allow(dead_code)]
mod zk;

use std::time::{Duration, Instant};

use nbd_failover::core::Generation;
use nbd_failover::lease::{LeaseConfig, LeaseNotice, LeaseService};
use tokio::sync::mpsc;

struct Args {
    contenders: usize,
    releases: usize,
    hosts: Option<String>,
    session_timeout: Duration,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        contenders: 100,
        releases: 0,
        hosts: None,
        session_timeout: Duration::from_secs(10),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--contenders" => a.contenders = val()?.parse().map_err(|e| format!("{k}: {e}"))?,
            "--releases" => a.releases = val()?.parse().map_err(|e| format!("{k}: {e}"))?,
            "--hosts" => a.hosts = Some(val()?),
            "--session-timeout-ms" => {
                a.session_timeout =
                    Duration::from_millis(val()?.parse().map_err(|e| format!("{k}: {e}"))?)
            }
            "-h" | "--help" => {
                return Err(
                    "usage: lease_bench [--contenders N] [--releases R] [--hosts H:P,...] \
                            [--session-timeout-ms MS]"
                        .into(),
                )
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if a.contenders < 2 {
        return Err("--contenders must be at least 2".into());
    }
    if a.releases == 0 || a.releases >= a.contenders {
        a.releases = a.contenders - 1;
    }
    Ok(a)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("lease_bench: {e}");
            std::process::exit(2);
        }
    };
    let (server, hosts) = match &a.hosts {
        Some(h) => (None, h.clone()),
        None => {
            let s = zk::ZkServer::start();
            let h = s.address();
            (Some(s), h)
        }
    };
    let result = bench(&a, &hosts, server.as_ref()).await;
    // Stop our server before exiting, whatever happened.
    drop(server);
    match result {
        Ok(0) => {}
        Ok(bad) => {
            eprintln!("lease_bench: FAILED: {bad} releases did not wake exactly one contender");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("lease_bench: {e}");
            std::process::exit(1);
        }
    }
}

type Notices = mpsc::UnboundedReceiver<(usize, LeaseNotice)>;

async fn wait_won(rx: &mut Notices) -> Result<(usize, Generation), String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            Ok(Some((i, LeaseNotice::Won { generation, .. }))) => return Ok((i, generation)),
            Ok(Some((i, LeaseNotice::Problem { error, .. }))) => {
                eprintln!("contender {i}: problem: {error}")
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return Err("no Won within 30 s".into()),
        }
    }
}

/// Runs the benchmark; returns the number of releases that did not wake exactly one contender.
async fn bench(a: &Args, hosts: &str, server: Option<&zk::ZkServer>) -> Result<usize, String> {
    let chroot = format!("/bench-{}", std::process::id());
    println!(
        "lease_bench: {} contenders on one volume, {} releases, ZooKeeper {hosts}{}, session timeout {:?}",
        a.contenders,
        a.releases,
        if server.is_some() { " (started here, standalone)" } else { "" },
        a.session_timeout
    );

    // Start the contenders (one session each) and merge their notices.
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, LeaseNotice)>();
    let mut svcs = Vec::new();
    let t0 = Instant::now();
    for i in 0..a.contenders {
        let mut cfg = LeaseConfig::new(hosts, &chroot, format!("bench-{i}"), a.session_timeout)
            .map_err(|e| format!("config: {e}"))?;
        cfg.connect_timeout = Duration::from_secs(30);
        let (s, mut nrx) = LeaseService::start(cfg)
            .await
            .map_err(|e| format!("contender {i}: {e}"))?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(n) = nrx.recv().await {
                if tx.send((i, n)).is_err() {
                    return;
                }
            }
        });
        svcs.push(s);
    }
    for s in &svcs {
        s.contend("bench").map_err(|e| format!("contend: {e}"))?;
    }
    let (mut holder, mut generation) = wait_won(&mut rx).await?;
    // Let every contender join the queue and set its watch.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = svcs[holder]
            .status("bench")
            .await
            .map_err(|e| format!("status: {e}"))?;
        if st.queue.len() == a.contenders {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {} contenders queued",
                st.queue.len(),
                a.contenders
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    println!(
        "all {} contenders queued in {}",
        a.contenders,
        ms(t0.elapsed())
    );
    if let Some(s) = server {
        if let Ok(w) = zk::four_letter(s.client_port, "wchs") {
            println!(
                "server watch summary before the releases: {}",
                w.trim().replace('\n', "; ")
            );
        }
    }

    let fires = |svcs: &[LeaseService]| -> u64 {
        svcs.iter().map(|s| s.stats().predecessor_watch_fires).sum()
    };
    let mut latencies = Vec::new();
    let mut per_release = Vec::new();
    let mut before = fires(&svcs);
    for _ in 0..a.releases {
        let t = Instant::now();
        svcs[holder]
            .release("bench", generation, true)
            .map_err(|e| format!("release: {e}"))?;
        let (next, g) = wait_won(&mut rx).await?;
        latencies.push(t.elapsed());
        // Give stray notifications (there should be none) time to arrive before counting.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = fires(&svcs);
        per_release.push(now - before);
        before = now;
        holder = next;
        generation = g;
    }

    latencies.sort();
    let total: u64 = per_release.iter().sum();
    let bad = per_release.iter().filter(|n| **n != 1).count();
    println!("releases: {}", per_release.len());
    println!(
        "watch notifications per release: {:.2} (total {total}; min {}, max {}; releases with != 1: {bad})",
        total as f64 / per_release.len() as f64,
        per_release.iter().min().unwrap_or(&0),
        per_release.iter().max().unwrap_or(&0)
    );
    println!(
        "acquire-after-release latency: p50 {}, p99 {}, max {} (release call -> next holder's Won)",
        ms(percentile(&latencies, 50.0)),
        ms(percentile(&latencies, 99.0)),
        ms(*latencies.last().unwrap_or(&Duration::ZERO))
    );
    if let Some(s) = server {
        if let Ok(w) = zk::four_letter(s.client_port, "wchs") {
            println!(
                "server watch summary after the releases: {}",
                w.trim().replace('\n', "; ")
            );
        }
    }
    for s in svcs {
        s.shutdown(Duration::from_secs(2)).await;
    }
    Ok(bad)
}
