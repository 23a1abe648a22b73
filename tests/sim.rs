//! Deterministic simulation: many seeded runs of a 3-node cluster under faults, invariants checked every step.
//!
//! `SIM_SEEDS=N` runs N seeds (default 30,000); `SIM_SEED=S` replays one seed
//! and prints its whole trace. A failure prints the seed and the end of its trace.

use std::time::{Duration, Instant};

use nbd_failover::core::machine::TestKnobs;
use nbd_failover::sim::{self, SimConfig, SweepStats};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

fn explain_failure(seed: u64, cfg: &SimConfig) -> String {
    let mut traced = cfg.clone();
    traced.trace = true;
    let o = sim::run(seed, &traced);
    let v = o
        .violation
        .as_ref()
        .expect("the failing seed fails again when replayed");
    let tail: Vec<&String> = o.trace.iter().rev().take(80).collect();
    let mut s = format!(
        "seed {seed} broke an invariant at {}: {}\n--- last {} trace lines ---\n",
        v.at,
        v.what,
        tail.len()
    );
    for l in tail.into_iter().rev() {
        s.push_str(l);
        s.push('\n');
    }
    s.push_str(&format!(
        "replay: SIM_SEED={seed} cargo test --release --test sim -- --nocapture\n"
    ));
    s
}

/// Runs `count` seeds from `first` on all cores; returns stats and the lowest failing seed.
fn parallel_sweep(first: u64, count: u64, cfg: &SimConfig) -> (SweepStats, Option<u64>) {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let chunk = count.div_ceil(threads);
    let results: Vec<(SweepStats, Option<u64>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let start = first + i * chunk;
                let n = chunk.min((first + count).saturating_sub(start));
                scope.spawn(move || {
                    let (ran, failed, stats) = sim::sweep(start, n, cfg);
                    (stats, failed.map(|_| start + ran - 1))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("sweep thread"))
            .collect()
    });
    let mut total = SweepStats::default();
    let mut failed: Option<u64> = None;
    for (s, f) in results {
        total.merge(&s);
        if let Some(f) = f {
            failed = Some(failed.map_or(f, |g: u64| g.min(f)));
        }
    }
    (total, failed)
}

#[test]
fn invariants_hold_over_many_seeds() {
    let cfg = SimConfig::standard();
    if let Some(seed) = env_u64("SIM_SEED") {
        let mut traced = cfg.clone();
        traced.trace = true;
        let o = sim::run(seed, &traced);
        for l in &o.trace {
            println!("{l}");
        }
        assert!(o.violation.is_none(), "{}", explain_failure(seed, &cfg));
        println!(
            "simulation: seed {seed} passed ({} steps, {} faults)",
            o.steps, o.faults
        );
        return;
    }
    let seeds = env_u64("SIM_SEEDS").unwrap_or(30_000);
    let first = env_u64("SIM_FIRST_SEED").unwrap_or(1);
    let started = Instant::now();
    let (stats, failed) = parallel_sweep(first, seeds, &cfg);
    let wall = started.elapsed();
    println!(
        "simulation: {} seeds ({}..{}) in {:.1}s wall: {} steps, {} faults, {} failovers, {} watchdog resets; \
         3 nodes, T={}s, {}s of faults, liveness bound {}s",
        stats.runs,
        first,
        first + seeds - 1,
        wall.as_secs_f64(),
        stats.steps,
        stats.faults,
        stats.failovers,
        stats.watchdog_resets,
        cfg.policy.timings.session_timeout.as_secs(),
        cfg.fault_window.as_secs(),
        cfg.liveness_bound.as_secs(),
    );
    if let Some(seed) = failed {
        panic!("{}", explain_failure(seed, &cfg));
    }
    assert_eq!(stats.runs, seeds, "every seed ran");
    assert!(
        stats.failovers > 0,
        "the faults never caused a failover: the simulation is not exercising anything"
    );
}

#[test]
fn a_deliberately_late_fence_is_caught() {
    // The test of the test: the core fences (and stops petting the watchdog) as
    // if ZooKeeper had been heard from much later than it was. The simulation
    // must notice two nodes attached at once.
    let mut cfg = SimConfig::standard();
    let t = &cfg.policy.timings;
    cfg.knobs = TestKnobs {
        late_fence: t.session_timeout + t.lock_delay + Duration::from_secs(5),
    };
    let started = Instant::now();
    let mut caught = None;
    for seed in 1..=2_000 {
        let o = sim::run(seed, &cfg);
        if let Some(v) = o.violation {
            caught = Some((seed, v));
            break;
        }
    }
    let (seed, v) = caught.expect(
        "a fence 20s late went unnoticed in 2,000 seeds: the simulation cannot see overlaps",
    );
    println!(
        "deliberate late fence: caught at seed {seed} after {:.2}s: {}",
        started.elapsed().as_secs_f64(),
        v.what
    );
    assert!(
        v.what.contains("OVERLAP"),
        "expected an overlap, got: {}",
        v.what
    );
}

#[test]
fn without_faults_a_node_runs_the_task_promptly_and_keeps_it() {
    let mut cfg = SimConfig::standard();
    cfg.faults.weights = [0, 0, 0, 0, 0];
    cfg.faults.mean_gap = Duration::from_secs(1_000_000);
    cfg.fault_window = Duration::ZERO;
    cfg.liveness_bound = Duration::from_secs(3);
    cfg.trace = true;
    let o = sim::run(42, &cfg);
    assert!(
        o.violation.is_none(),
        "{:?}\n{}",
        o.violation,
        o.trace.join("\n")
    );
    assert_eq!(
        o.failovers,
        0,
        "no failover without faults:\n{}",
        o.trace.join("\n")
    );
    let running = o
        .trace
        .iter()
        .filter(|l| l.contains("running under generation"))
        .count();
    assert_eq!(
        running,
        1,
        "exactly one task start:\n{}",
        o.trace.join("\n")
    );
}

/// Finds the first seed in `1..=limit` that breaks an invariant.
fn first_violation(cfg: &SimConfig, limit: u64) -> Option<(u64, String)> {
    (1..=limit).find_map(|seed| sim::run(seed, cfg).violation.map(|v| (seed, v.what)))
}

#[test]
fn the_watchdog_is_what_makes_daemon_pauses_safe() {
    // Without the watchdog, a daemon paused (SIGSTOP) past T keeps its device
    // attached and its task writing while another node takes over: the
    // simulation must see that. Without pauses, the core alone is enough.
    let mut cfg = SimConfig::standard();
    cfg.policy.timings.watchdog_timeout = None;
    let (seed, what) =
        first_violation(&cfg, 2_000).expect("pauses without a watchdog must be caught");
    println!("no watchdog, pauses: overlap at seed {seed}: {what}");
    assert!(what.contains("OVERLAP"), "{what}");

    cfg.faults.weights[3] = 0; // no pauses
    let (ran, failed, _) = sim::sweep(1, 2_000, &cfg);
    assert!(
        failed.is_none(),
        "no watchdog, no pauses must be safe: {:?}",
        failed.map(|o| (o.seed, o.violation))
    );
    println!("no watchdog, no pauses: {ran} seeds clean");
}

#[test]
fn lock_delay_covers_a_fence_that_overruns_its_budget() {
    // An unmount that hangs for seconds pushes the fence past its deadline.
    // With neither watchdog nor lock-delay that is an overlap; the lock-delay
    // alone absorbs it.
    let mut cfg = SimConfig::standard();
    cfg.policy.timings.watchdog_timeout = None;
    cfg.faults.weights[3] = 0;
    cfg.policy.timings.lock_delay = Duration::ZERO;
    let (seed, what) =
        first_violation(&cfg, 5_000).expect("hangs without lock-delay or watchdog must be caught");
    println!("no watchdog, no lock-delay: overlap at seed {seed}: {what}");
    assert!(what.contains("OVERLAP"), "{what}");
}

#[test]
fn the_demo_fails_over_four_times_and_a_clean_hand_over_skips_the_lock_delay() {
    let (lines, o) = sim::demo::demo(1);
    assert!(o.violation.is_none(), "{}", lines.join("\n"));
    assert_eq!(o.failovers, 4, "{}", lines.join("\n"));
    assert_eq!(o.downtimes.len(), 4, "{}", lines.join("\n"));
    let lock_delay = SimConfig::standard().policy.timings.lock_delay;
    // Partition, kill -9 and pause end uncleanly: the next holder waits lock_delay.
    for d in &o.downtimes[..3] {
        assert!(
            *d > lock_delay,
            "unclean failover faster than the lock-delay: {d:?}"
        );
    }
    // The operator hand-over releases cleanly: no lock-delay.
    assert!(
        o.downtimes[3] < lock_delay,
        "clean hand-over waited: {:?}",
        o.downtimes[3]
    );
    assert_eq!(
        o.watchdog_resets, 1,
        "the paused holder is reset by the watchdog"
    );
    println!("demo downtimes: {:?}", o.downtimes);
}
