//! Lease timing against real ZooKeeper: a partitioned holder suspends and fences on its own clock before the server lets another node win; a leader loss within T fences nothing.

mod support;

use std::time::{Duration, Instant};

use nbd_failover::core::Phase;
use nbd_failover::lease::{LeaseAdmin, LeaseNotice, LeaseService};
use support::{
    chroot, lease_config, test_timings, CoreDriver, Notices, Proxy, ZkEnsemble, ZkServer,
};

const T: Duration = Duration::from_secs(4);

/// The two tests measure timing: run them one at a time (an ensemble's JVMs starting next to
/// a partition measurement would only add noise on a 2-core machine).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

/// Pumps notices into the drivers (tag i → drivers[i]) and ticks them until `done` or `limit`.
async fn drive(
    notices: &mut Notices,
    drivers: &mut [&mut CoreDriver],
    svcs: &[&LeaseService],
    limit: Duration,
    mut done: impl FnMut(&Notices, &[&mut CoreDriver]) -> bool,
) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some((_, i, n)) = notices.next(Duration::from_millis(10)).await {
            if let Some(d) = drivers.get_mut(i) {
                d.notice(&n, svcs[i]);
            }
        }
        for (d, s) in drivers.iter_mut().zip(svcs) {
            d.tick(s);
        }
        if done(notices, drivers) {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_holder_fences_before_the_other_node_can_win() {
    let _serial = SERIAL.lock().await;
    let zk = ZkServer::start();
    let root = chroot("partition");
    let proxy = Proxy::start(&zk.address());
    let mut notices = Notices::new();
    let (a, rx) = LeaseService::start(lease_config(&proxy.address(), &root, "a", T))
        .await
        .expect("a starts");
    notices.add(0, rx);
    let timings = test_timings(T);
    let margin = timings.margin;
    let mut da = CoreDriver::new("vol", timings.clone());

    // a runs the volume; then b starts and waits in the queue.
    let ok = drive(
        &mut notices,
        &mut [&mut da],
        &[&a],
        Duration::from_secs(15),
        |_, d| d[0].running.is_some(),
    )
    .await;
    assert!(ok, "a never ran:\n{}\n{}", da.history(), notices.history());
    let (b, rx) = LeaseService::start(lease_config(&zk.address(), &root, "b", T))
        .await
        .expect("b starts");
    notices.add(1, rx);
    let mut db = CoreDriver::new("vol", timings);
    let svcs = [&a, &b];
    drive(
        &mut notices,
        &mut [&mut da, &mut db],
        &svcs,
        Duration::from_secs(1),
        |_, _| false,
    )
    .await;
    assert_eq!(a.status("vol").await.unwrap().queue.len(), 2, "b queued");

    // Partition a from ZooKeeper (the server stays up; b still reaches it).
    let cut = Instant::now();
    proxy.blackhole();
    let mut b_won: Option<Instant> = None;
    let ok = drive(
        &mut notices,
        &mut [&mut da, &mut db],
        &svcs,
        4 * T,
        |n, d| {
            if b_won.is_none() {
                b_won = n
                    .seen
                    .iter()
                    .find(|(t, i, n)| *i == 1 && *t > cut && matches!(n, LeaseNotice::Won { .. }))
                    .map(|e| e.0);
            }
            d[1].running.is_some()
        },
    )
    .await;
    assert!(ok, "b never ran:\n{}", notices.history());
    let b_won = b_won.expect("b's Won");

    // a's view: its last contact, when it said "disconnected", and its core's fence.
    let (dis_at, last_contact) = notices
        .seen
        .iter()
        .find_map(|(t, i, n)| match n {
            LeaseNotice::Disconnected { last_contact } if *i == 0 && *t > cut => {
                Some((*t, *last_contact))
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("a never reported Disconnected:\n{}", notices.history()));
    let newest_contact = notices
        .seen
        .iter()
        .filter_map(|(_, i, n)| match n {
            LeaseNotice::Heartbeat { last_contact } | LeaseNotice::Won { last_contact, .. }
                if *i == 0 =>
            {
                Some(*last_contact)
            }
            _ => None,
        })
        .max()
        .expect("a had contact");
    assert_eq!(
        last_contact, newest_contact,
        "Disconnected carries the last contact"
    );
    let suspended = da.suspended.expect("a's core suspended");
    let fence_deadline = last_contact + T - margin;
    let detached = da
        .detached
        .unwrap_or_else(|| panic!("a never fenced:\n{}", da.history()));
    println!(
        "partition at +0; a's last contact {} before it",
        ms(cut.saturating_duration_since(last_contact))
    );
    println!(
        "a reported Disconnected {} after its last contact (limit T/2 = {}), its core suspended at {}",
        ms(dis_at - last_contact),
        ms(T / 2),
        ms(suspended - last_contact)
    );
    println!(
        "a's fence: started {}, detached {} after last contact; fence deadline (T - margin) {}",
        ms(da.fence_started.unwrap() - last_contact),
        ms(detached - last_contact),
        ms(fence_deadline - last_contact)
    );
    println!(
        "b won {} after a's last contact (server-side expiry is >= T = {}), {} after a's fence deadline",
        ms(b_won - last_contact),
        ms(T),
        ms(b_won.saturating_duration_since(fence_deadline))
    );
    assert!(dis_at - last_contact <= T / 2, "suspended too late");
    assert!(suspended - last_contact <= T / 2, "core suspended too late");
    assert!(detached <= fence_deadline, "a's fence missed its deadline");
    assert!(
        b_won >= last_contact + T,
        "b won before a's session could have expired"
    );
    assert!(
        b_won > fence_deadline && b_won > detached,
        "b won before a was fenced"
    );
    // Only after server-side expiry: a's session (and its registration node) is gone.
    let admin = LeaseAdmin::connect(&lease_config(&zk.address(), &root, "x", T))
        .await
        .unwrap();
    assert!(
        admin
            .client()
            .check_stat("/nodes/a")
            .await
            .unwrap()
            .is_none(),
        "a's session is still alive on the server"
    );
    let b_clean = notices.seen.iter().find_map(|(_, i, n)| match n {
        LeaseNotice::Won {
            predecessor_clean, ..
        } if *i == 1 => Some(*predecessor_clean),
        _ => None,
    });
    assert_eq!(
        b_clean,
        Some(false),
        "a could not release through the partition"
    );

    // Heal: a learns its session expired (never a "reconnected" on a dead session), builds a
    // new one and queues again behind b.
    proxy.heal();
    let ok = drive(
        &mut notices,
        &mut [&mut da, &mut db],
        &svcs,
        4 * T,
        |n, _| {
            n.seen.iter().any(|(t, i, n)| {
                *i == 0 && *t > cut && matches!(n, LeaseNotice::SessionStarted { .. })
            })
        },
    )
    .await;
    assert!(ok, "a never got a new session:\n{}", notices.history());
    let a_after: Vec<&LeaseNotice> = notices
        .seen
        .iter()
        .filter(|(t, i, _)| *i == 0 && *t > dis_at)
        .map(|e| &e.2)
        .take_while(|n| !matches!(n, LeaseNotice::SessionStarted { .. }))
        .collect();
    assert!(
        !a_after.iter().any(|n| matches!(
            n,
            LeaseNotice::Reconnected { .. } | LeaseNotice::Heartbeat { .. }
        )),
        "contact reported on an expired session: {a_after:?}"
    );
    assert!(
        a_after
            .iter()
            .any(|n| matches!(n, LeaseNotice::SessionEnded { .. })),
        "{a_after:?}"
    );
    assert!(
        !matches!(da.m.phase(), Phase::Running),
        "a must not run again while b holds"
    );
    assert!(matches!(db.m.phase(), Phase::Running));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_ensemble_leader_does_not_fence_a_holder_that_reconnects() {
    let _serial = SERIAL.lock().await;
    let mut ens = ZkEnsemble::start(3);
    let hosts = ens.connect_string();
    let root = chroot("leader");
    let mut notices = Notices::new();
    let (a, rx) = LeaseService::start(lease_config(&hosts, &root, "a", T))
        .await
        .expect("a starts");
    notices.add(0, rx);
    let mut timings = test_timings(T);
    // The reconnect after a leader loss takes a leader election: give suspension room for it
    // (the budget still fits: 2.5 + 0.5 + 0.25 + 0.25 + 0.5 = 4 s).
    timings.suspend_grace = T * 5 / 8;
    let mut da = CoreDriver::new("vol", timings.clone());
    let ok = drive(
        &mut notices,
        &mut [&mut da],
        &[&a],
        Duration::from_secs(20),
        |_, d| d[0].running.is_some(),
    )
    .await;
    assert!(ok, "a never ran:\n{}\n{}", da.history(), notices.history());
    let (b, rx) = LeaseService::start(lease_config(&hosts, &root, "b", T))
        .await
        .expect("b starts");
    notices.add(1, rx);
    let mut db = CoreDriver::new("vol", timings);
    let svcs = [&a, &b];
    drive(
        &mut notices,
        &mut [&mut da, &mut db],
        &svcs,
        Duration::from_secs(1),
        |_, _| false,
    )
    .await;

    let leader = ens.leader().expect("a leader");
    let killed = Instant::now();
    ens.servers[leader].kill();
    println!("killed leader server {} (of 3)", leader + 1);
    drive(
        &mut notices,
        &mut [&mut da, &mut db],
        &svcs,
        2 * T,
        |_, _| false,
    )
    .await;
    let new_leader = ens.wait_leader(Duration::from_secs(30));

    let a_notes: Vec<(Instant, &LeaseNotice)> = notices
        .seen
        .iter()
        .filter(|(_, i, _)| *i == 0)
        .map(|(t, _, n)| (*t, n))
        .collect();
    let contacts: Vec<Instant> = a_notes
        .iter()
        .filter_map(|(_, n)| match n {
            LeaseNotice::Heartbeat { last_contact }
            | LeaseNotice::Reconnected { last_contact }
            | LeaseNotice::Won { last_contact, .. } => Some(*last_contact),
            _ => None,
        })
        .collect();
    let gap = contacts
        .windows(2)
        .map(|w| w[1].saturating_duration_since(w[0]))
        .max()
        .unwrap_or_default();
    let after = contacts.iter().filter(|c| **c > killed).count();
    let events: Vec<String> = a_notes
        .iter()
        .filter(|(t, n)| *t > killed && !matches!(n, LeaseNotice::Heartbeat { .. }))
        .map(|(t, n)| format!("+{} {n:?}", ms(*t - killed)))
        .collect();
    println!(
        "after the kill: new leader is server {}; a's notices: {events:?}",
        new_leader + 1
    );
    println!(
        "a's longest gap between contacts: {} (T = {})",
        ms(gap),
        ms(T)
    );
    assert!(
        after > 5,
        "a's heartbeats did not resume: {}",
        notices.history()
    );
    assert!(gap < T, "contact gap {gap:?} not within T");
    assert!(
        !a_notes.iter().any(|(_, n)| matches!(
            n,
            LeaseNotice::Lost { .. } | LeaseNotice::SessionEnded { .. }
        )),
        "a lost its lease: {}",
        notices.history()
    );
    assert!(
        da.fence_started.is_none(),
        "a's core fenced:\n{}",
        da.history()
    );
    assert!(
        matches!(da.m.phase(), Phase::Running),
        "a still runs: {:?}",
        da.m.phase()
    );
    assert!(db.running.is_none(), "b must not run");
}

/// Regression (found by the fault campaign, tests/campaign.rs, seed 2): a holder cut off
/// past T gets a new session when the cut heals. Its lease ended with the old session, and
/// that `Lost` must reach the core before any contact of the new session: the core takes a
/// heartbeat while suspended for "contact back within the session", and a late `Lost` let a
/// node in lock-delay resume and attach under the expired generation while another node
/// held the volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_lost_with_its_session_is_reported_before_the_next_sessions_contact() {
    let _serial = SERIAL.lock().await;
    let zk = ZkServer::start();
    let root = chroot("lost-order");
    let proxy = Proxy::start(&zk.address());
    let mut notices = Notices::new();
    let (a, rx) = LeaseService::start(lease_config(&proxy.address(), &root, "a", T))
        .await
        .expect("a starts");
    notices.add(0, rx);
    a.contend("vol").expect("contend");
    notices
        .wait("a's win", Duration::from_secs(15), |_, n| {
            matches!(n, LeaseNotice::Won { .. })
        })
        .await;
    let cut = Instant::now();
    proxy.blackhole();
    notices
        .wait("the session to be suspected", 2 * T, |_, n| {
            matches!(n, LeaseNotice::Disconnected { .. })
        })
        .await;
    // Past T (+ the library's own expiry notice): the server has expired the session.
    notices.collect_for(2 * T).await;
    proxy.heal();
    notices
        .wait("a new session", 4 * T, |_, n| {
            matches!(n, LeaseNotice::SessionStarted { .. })
        })
        .await;
    notices
        .wait("contact in the new session", 2 * T, |_, n| {
            matches!(
                n,
                LeaseNotice::Heartbeat { .. } | LeaseNotice::Reconnected { .. }
            )
        })
        .await;
    let after: Vec<&LeaseNotice> = notices
        .seen
        .iter()
        .filter(|(t, _, _)| *t > cut)
        .map(|e| &e.2)
        .collect();
    let lost = after
        .iter()
        .position(|n| matches!(n, LeaseNotice::Lost { volume, .. } if volume == "vol"))
        .unwrap_or_else(|| panic!("no Lost for vol:\n{}", notices.history()));
    let started = after
        .iter()
        .position(|n| matches!(n, LeaseNotice::SessionStarted { .. }))
        .expect("SessionStarted");
    assert!(
        lost < started,
        "Lost must come before the next session's notices:\n{}",
        notices.history()
    );
    assert_eq!(
        after
            .iter()
            .filter(|n| matches!(n, LeaseNotice::Lost { .. }))
            .count(),
        1,
        "one Lost, not two:\n{}",
        notices.history()
    );
}

/// Found by the fault campaign (device-watchdog runs): a volume whose lease went with an
/// expired session was never contended for again. The core answers `Lost` with a fence and
/// then `Contend`; that `Contend` reached the volume's actor while it still sat in its
/// held state (its request on the dead session had not failed yet), which ignores
/// contend/withdraw ("decided before the core saw the win"), and the actor then went idle
/// on its own: every node stayed `contending` with nothing in the queue. A `Contend` sent
/// the moment `Lost` arrives must lead to a new win.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contend_right_after_a_lost_session_is_not_dropped() {
    let _serial = SERIAL.lock().await;
    let zk = ZkServer::start();
    let root = chroot("lost-contend");
    let proxy = Proxy::start(&zk.address());
    let mut notices = Notices::new();
    let (a, rx) = LeaseService::start(lease_config(&proxy.address(), &root, "a", T))
        .await
        .expect("a starts");
    notices.add(0, rx);
    a.contend("vol").expect("contend");
    let (_, _, won) = notices
        .wait("a's win", Duration::from_secs(15), |_, n| {
            matches!(n, LeaseNotice::Won { .. })
        })
        .await;
    let LeaseNotice::Won {
        generation: first, ..
    } = won
    else {
        unreachable!()
    };
    let cut = Instant::now();
    proxy.blackhole();
    // Heal after 2 T (the session has expired on the server by then); answer the `Lost`
    // with a `Contend` the moment it arrives, as the core does when nothing was exposed.
    let mut healed = false;
    loop {
        assert!(
            cut.elapsed() < 6 * T,
            "no Lost within {:?}:\n{}",
            6 * T,
            notices.history()
        );
        if !healed && cut.elapsed() >= 2 * T {
            proxy.heal();
            healed = true;
        }
        if let Some((_, _, LeaseNotice::Lost { volume, .. })) =
            notices.next(Duration::from_millis(5)).await
        {
            if volume == "vol" {
                a.contend("vol").expect("contend again");
                break;
            }
        }
    }
    if !healed {
        proxy.heal();
    }
    let (_, _, again) = notices
        .wait("a new win after the loss", 4 * T, |_, n| {
            matches!(n, LeaseNotice::Won { .. })
        })
        .await;
    let LeaseNotice::Won { generation, .. } = again else {
        unreachable!()
    };
    assert!(
        generation > first,
        "a new generation: {generation:?} after {first:?}\n{}",
        notices.history()
    );
}
