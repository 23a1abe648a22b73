//! Lease lock tests against a real ZooKeeper: one holder among five, hand-over latency, clean vs unclean, herd-free watches, ACLs, garbage, stale nodes, node-id conflicts.

mod support;

use std::time::{Duration, Instant};

use nbd_failover::core::Generation;
use nbd_failover::lease::{
    Credentials, Incarnation, LeaseAdmin, LeaseConfig, LeaseError, LeaseNotice, LeaseService,
};
use support::{chroot, is_won, lease_config, won, Notices, Proxy, TempDir, ZkServer};
use zookeeper_client as zk;

const T: Duration = Duration::from_secs(4);
const WAIT: Duration = Duration::from_secs(15);

async fn start(
    cfg: LeaseConfig,
) -> (
    LeaseService,
    tokio::sync::mpsc::UnboundedReceiver<LeaseNotice>,
) {
    let id = cfg.node_id.clone();
    LeaseService::start(cfg)
        .await
        .unwrap_or_else(|e| panic!("lease service {id} did not start: {e}"))
}

/// Connects a raw client (for poking at nodes the way another tool would).
async fn raw(hosts: &str, chroot: &str, auth: Option<&str>) -> zk::Client {
    let mut c = zk::Client::connector().with_session_timeout(T);
    if let Some(a) = auth {
        c = c.with_auth("digest", a.as_bytes());
    }
    let root = c.connect(hosts).await.expect("raw connect");
    root.chroot(chroot).expect("chroot")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_holder_among_five_then_hand_over_clean_unclean_and_crash() {
    let zk = ZkServer::start();
    let root = chroot("five");
    let mut notices = Notices::new();
    let mut svcs: Vec<Option<LeaseService>> = Vec::new();
    for i in 0..5 {
        let (s, rx) = start(lease_config(&zk.address(), &root, &format!("n{i}"), T)).await;
        notices.add(i, rx);
        svcs.push(Some(s));
    }
    for s in svcs.iter().flatten() {
        s.contend("vol").expect("contend");
    }

    // Exactly one holder: one Won, and no second one while nobody releases.
    let (_, holder, n) = notices.wait("first Won", WAIT, |_, n| is_won(n)).await;
    let (g0, clean0) = won(&n);
    assert!(
        clean0,
        "the first holder ever counts as after a clean release"
    );
    let extra: Vec<_> = notices
        .collect_for(Duration::from_secs(2))
        .await
        .into_iter()
        .filter(|(_, _, n)| is_won(n))
        .collect();
    assert!(
        extra.is_empty(),
        "a second holder: {extra:?}\n{}",
        notices.history()
    );
    let st = svcs[holder]
        .as_ref()
        .unwrap()
        .status("vol")
        .await
        .expect("status");
    assert_eq!(st.queue.len(), 5, "{st:?}");
    let h = st
        .holder()
        .expect("holder record readable")
        .expect("a holder");
    assert_eq!(h.node_id, format!("n{holder}"));
    assert_eq!(
        st.queue[0].czxid, g0,
        "generation = czxid of the lowest node"
    );
    let rec = st
        .last_winner
        .clone()
        .expect("holder record")
        .expect("valid");
    assert_eq!(
        (rec.generation, rec.node_id.as_str()),
        (g0, h.node_id.as_str())
    );
    println!("exactly one holder among 5: n{holder}, generation {g0}");

    // Hand-over 1: clean release → the next one wins, told "clean".
    let t = Instant::now();
    svcs[holder]
        .as_ref()
        .unwrap()
        .release("vol", Generation(g0), true)
        .unwrap();
    let (at, h1, n) = notices
        .wait("Won after a clean release", WAIT, |_, n| is_won(n))
        .await;
    let (g1, clean1) = won(&n);
    println!(
        "acquire after clean release: {:.1} ms (n{holder} -> n{h1})",
        at.duration_since(t).as_secs_f64() * 1e3
    );
    assert!(
        clean1,
        "predecessor released cleanly: {}",
        notices.history()
    );
    assert!(g1 > g0 && h1 != holder);
    notices
        .seen_or_wait("Released clean", WAIT, |i, n| {
            i == holder && matches!(n, LeaseNotice::Released { clean: true, .. })
        })
        .await;

    // Hand-over 2: unclean release → the next one is told "unclean".
    let t = Instant::now();
    svcs[h1]
        .as_ref()
        .unwrap()
        .release("vol", Generation(g1), false)
        .unwrap();
    let (at, h2, n) = notices
        .wait("Won after an unclean release", WAIT, |_, n| is_won(n))
        .await;
    let (g2, clean2) = won(&n);
    println!(
        "acquire after unclean release: {:.1} ms (n{h1} -> n{h2})",
        at.duration_since(t).as_secs_f64() * 1e3
    );
    assert!(!clean2, "predecessor did not record a clean release");
    let st = svcs[h2].as_ref().unwrap().status("vol").await.unwrap();
    assert_eq!(st.queue.len(), 3);

    // Hand-over 3: the holder's daemon goes away without releasing (its session is closed,
    // the node vanishes, no record) → unclean.
    let t = Instant::now();
    let fires_gone = svcs[h2].take().unwrap().stats().predecessor_watch_fires;
    let (at, h3, n) = notices
        .wait("Won after the holder vanished", WAIT, |_, n| is_won(n))
        .await;
    let (g3, clean3) = won(&n);
    println!(
        "acquire after the holder's session closed: {:.1} ms (n{h2} -> n{h3})",
        at.duration_since(t).as_secs_f64() * 1e3
    );
    assert!(!clean3 && g3 > g2);

    // Herd-free: each of the three hand-overs fired exactly one predecessor watch.
    let fires: u64 = svcs
        .iter()
        .flatten()
        .map(|s| s.stats().predecessor_watch_fires)
        .sum::<u64>()
        + fires_gone;
    assert_eq!(fires, 3, "watch notifications for 3 releases");
    println!("watch notifications per release: {:.2}", fires as f64 / 3.0);

    // The last holder releases cleanly; the record says so.
    svcs[h3]
        .as_ref()
        .unwrap()
        .release("vol", Generation(g3), true)
        .unwrap();
    notices
        .wait("Won by the last contender", WAIT, |_, n| is_won(n))
        .await;
    let st = svcs[h3].as_ref().unwrap().status("vol").await.unwrap();
    assert_eq!(st.queue.len(), 1);
    let rec = st
        .last_winner
        .clone()
        .expect("holder record")
        .expect("valid");
    assert!(rec.generation > g3);
    let admin = LeaseAdmin::connect(&lease_config(&zk.address(), &root, "admin", T))
        .await
        .unwrap();
    let (_, stat) = admin
        .client()
        .get_data(&format!("/volumes/vol/released/{g3}"))
        .await
        .expect("clean-release record of the last clean release");
    assert_eq!(stat.ephemeral_owner, 0, "the record is persistent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdraw_leaves_the_queue_and_contend_is_idempotent() {
    let zk = ZkServer::start();
    let root = chroot("withdraw");
    let mut notices = Notices::new();
    let (a, rx) = start(lease_config(&zk.address(), &root, "a", T)).await;
    notices.add(0, rx);
    let (b, rx) = start(lease_config(&zk.address(), &root, "b", T)).await;
    notices.add(1, rx);
    a.contend("v").unwrap();
    let (_, _, n) = notices
        .wait("a wins", WAIT, |i, n| i == 0 && is_won(n))
        .await;
    let (ga, _) = won(&n);
    b.contend("v").unwrap();
    b.contend("v").unwrap(); // a second Contend keeps the place
    let deadline = Instant::now() + WAIT;
    while a.status("v").await.unwrap().queue.len() != 2 {
        assert!(Instant::now() < deadline, "b never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A Withdraw or Contend after a reported win is ignored: only Release gives it back.
    a.withdraw("v").unwrap();
    a.contend("v").unwrap();
    b.withdraw("v").unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let st = a.status("v").await.unwrap();
        if st.queue.len() == 1 {
            assert_eq!(st.queue[0].czxid, ga, "a still holds");
            break;
        }
        assert!(Instant::now() < deadline, "b never left: {st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.release("v", Generation(ga), true).unwrap();
    let got = notices.collect_for(Duration::from_millis(800)).await;
    assert!(
        !got.iter().any(|(_, _, n)| is_won(n)),
        "nobody contends: {got:?}"
    );
    b.contend("v").unwrap();
    let (_, _, n) = notices
        .wait("b wins", WAIT, |i, n| i == 1 && is_won(n))
        .await;
    assert!(won(&n).1, "a released cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acls_refuse_other_identities_and_admin_breaks_the_lock() {
    let zk = ZkServer::start();
    let root = chroot("acl");
    let dir = TempDir::new("creds");
    let user = dir.path().join("zk-credentials");
    let admin = dir.path().join("zk-admin-credentials");
    std::fs::write(&user, "nbdf:s3cret\n").unwrap();
    std::fs::write(&admin, "ops:r00t\n").unwrap();
    let cfg = |id: &str| {
        let mut c = lease_config(&zk.address(), &root, id, T);
        c.auth = Some(Credentials::from_file(&user).unwrap());
        c.admin = Some(Credentials::from_file(&admin).unwrap());
        c
    };
    let mut notices = Notices::new();
    let (a, rx) = start(cfg("a")).await;
    notices.add(0, rx);
    let (b, rx) = start(cfg("b")).await;
    notices.add(1, rx);
    a.contend("v").unwrap();
    notices
        .wait("a wins", WAIT, |i, n| i == 0 && is_won(n))
        .await;
    b.contend("v").unwrap();
    let st = a.status("v").await.unwrap();
    let lock = format!("/volumes/v/lock/{}", st.queue[0].name);

    // No identity: can read, cannot delete, overwrite or join the queue.
    let anon = raw(&zk.address(), &root, None).await;
    anon.get_data(&lock).await.expect("everyone may read");
    assert_eq!(anon.delete(&lock, None).await, Err(zk::Error::NoAuth));
    assert_eq!(
        anon.set_data(&lock, b"x", None).await.map(|_| ()),
        Err(zk::Error::NoAuth)
    );
    let open = zk::CreateMode::EphemeralSequential.with_acls(zk::Acls::anyone_all());
    assert_eq!(
        anon.create("/volumes/v/lock/lease-", b"x", &open)
            .await
            .map(|_| ()),
        Err(zk::Error::NoAuth)
    );
    assert_eq!(
        anon.set_data("/volumes/v/holder", b"x", None)
            .await
            .map(|_| ()),
        Err(zk::Error::NoAuth)
    );
    println!("unauthenticated delete of {lock}: refused (NoAuth)");
    // Another digest identity: the same.
    let other = raw(&zk.address(), &root, Some("mallory:guess")).await;
    assert_eq!(other.delete(&lock, None).await, Err(zk::Error::NoAuth));
    assert_eq!(
        other.set_data(&lock, b"x", None).await.map(|_| ()),
        Err(zk::Error::NoAuth)
    );
    // The ACL names exactly our identity and the admin's (with full rights) and world:read.
    let (acl, _) = anon.get_acl(&lock).await.unwrap();
    let ids: Vec<String> = acl
        .iter()
        .map(|a| format!("{}:{}", a.scheme(), a.id().split(':').next().unwrap_or("")))
        .collect();
    assert_eq!(
        ids,
        ["digest:nbdf", "digest:ops", "world:anyone"],
        "{acl:?}"
    );

    // The admin breaks the lock: a reports Lost at once, b wins (unclean predecessor).
    let adm = LeaseAdmin::connect(&cfg("admin")).await.unwrap();
    let broken = adm
        .break_lock("v")
        .await
        .unwrap()
        .expect("there was a holder");
    assert_eq!(broken.owner.as_ref().unwrap().node_id, "a");
    notices
        .wait("a Lost after break-lock", WAIT, |i, n| {
            i == 0 && matches!(n, LeaseNotice::Lost { .. })
        })
        .await;
    let (_, _, n) = notices
        .wait("b wins", WAIT, |i, n| i == 1 && is_won(n))
        .await;
    assert!(!won(&n).1, "a broken lock is not a clean release");

    // Wrong password: the session fails authentication with a clear error.
    let mut bad = cfg("c");
    bad.auth = Some(Credentials::new("nbdf", "wrong").unwrap());
    bad.admin = None;
    match LeaseService::start(bad).await {
        Err(e) => println!("wrong password: {e}"),
        Ok(_) => panic!("a wrong password must not pass"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_lock_nodes_and_records_gives_clear_errors() {
    let zk = ZkServer::start();
    let root = chroot("garbage");
    let mut notices = Notices::new();
    let (a, rx) = start(lease_config(&zk.address(), &root, "a", T)).await;
    notices.add(0, rx);
    let (b, rx) = start(lease_config(&zk.address(), &root, "b", T)).await;
    notices.add(1, rx);
    a.contend("v").unwrap();
    let (_, _, n) = notices
        .wait("a wins", WAIT, |i, n| i == 0 && is_won(n))
        .await;
    let (ga, _) = won(&n);
    let other = raw(&zk.address(), &root, None).await;
    let st = a.status("v").await.unwrap();
    let a_lock = format!("/volumes/v/lock/{}", st.queue[0].name);

    // Garbage written into the holder's lock node, and a foreign node full of garbage.
    other
        .set_data(&a_lock, b"\x00\xffgarbage", None)
        .await
        .unwrap();
    let persistent = zk::CreateMode::PersistentSequential.with_acls(zk::Acls::anyone_all());
    let (_, seq) = other
        .create("/volumes/v/lock/lease-", b"{\"node_id\": 42}", &persistent)
        .await
        .unwrap();
    let junk = format!("/volumes/v/lock/lease-{seq}");

    let st = a
        .status("v")
        .await
        .expect("status reads a queue with garbage");
    let err = st
        .holder()
        .expect_err("the holder's owner record is garbage");
    println!("status of a garbage lock node: {err}");
    assert!(matches!(err, LeaseError::BadRecord { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains(&a_lock) && msg.contains("owner record") && msg.contains("UTF-8"),
        "{msg}"
    );
    assert!(matches!(
        &st.queue[1].owner,
        Err(LeaseError::BadRecord { .. })
    ));

    // Another contender scans the queue: a clear Problem per garbage node, no panic.
    b.contend("v").unwrap();
    let (_, _, p) = notices
        .wait("a Problem about the foreign node", WAIT, |i, n| {
            i == 1
                && matches!(n, LeaseNotice::Problem { error: LeaseError::BadRecord { path, .. }, .. } if *path == junk)
        })
        .await;
    println!("contender sees: {p:?}");
    // The foreign node stays a contender (not ours to delete): remove it by hand.
    other.delete(&junk, None).await.unwrap();

    // Garbage in the holder record: the next winner cannot know how its predecessor ended,
    // so it is told "unclean", gets a Problem, and repairs the record.
    other
        .set_data("/volumes/v/holder", b"not json", None)
        .await
        .unwrap();
    a.release("v", Generation(ga), true).unwrap();
    let (_, _, n) = notices
        .wait("b wins", WAIT, |i, n| i == 1 && is_won(n))
        .await;
    assert!(!won(&n).1, "unknown predecessor counts as unclean");
    assert!(
        notices.seen.iter().any(|(_, i, n)| *i == 1
            && matches!(
                n,
                LeaseNotice::Problem {
                    error: LeaseError::BadRecord {
                        what: "holder record",
                        ..
                    },
                    ..
                }
            )),
        "{}",
        notices.history()
    );
    let st = b.status("v").await.unwrap();
    assert!(
        matches!(st.last_winner, Some(Ok(_))),
        "holder record repaired: {st:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_daemon_removes_its_stale_lock_node() {
    let zk = ZkServer::start();
    let root = chroot("stale");
    let mut notices = Notices::new();
    let proxy = Proxy::start(&zk.address());

    // The first incarnation of node n1 runs as a process that is dead by the time the next
    // one starts (a child we start and reap: same host and boot, its pid is gone).
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    let mut cfg1 = lease_config(&proxy.address(), &root, "n1", T);
    cfg1.incarnation = Incarnation {
        pid: dead_pid,
        start_ticks: 1,
        ..Incarnation::current().unwrap()
    };
    let (a1, rx) = start(cfg1).await;
    notices.add(0, rx);
    a1.contend("v").unwrap();
    let (_, _, n) = notices
        .wait("n1 wins", WAIT, |i, n| i == 0 && is_won(n))
        .await;
    let (g1, _) = won(&n);
    let (b, rx) = start(lease_config(&zk.address(), &root, "n2", T)).await;
    notices.add(1, rx);
    b.contend("v").unwrap();
    let deadline = Instant::now() + WAIT;
    while b.status("v").await.unwrap().queue.len() != 2 {
        assert!(Instant::now() < deadline, "n2 never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Crash: the connection dies, nothing more reaches the server; the session (and the lock
    // node) stays until ZooKeeper expires it, T later.
    proxy.cut();
    let crashed = Instant::now();
    drop(a1);

    // The restarted daemon (same node id, this live process) takes over the registration of
    // the dead incarnation and, when it contends, removes the stale lock node.
    let (a2, rx) = start(lease_config(&zk.address(), &root, "n1", T)).await;
    notices.add(2, rx);
    a2.contend("v").unwrap();
    let (_, _, n) = notices
        .wait("StaleNodeRemoved", WAIT, |i, n| {
            i == 2 && matches!(n, LeaseNotice::StaleNodeRemoved { .. })
        })
        .await;
    println!("restarted daemon: {n:?}");
    let (at, _, n) = notices
        .seen_or_wait("n2 wins", WAIT, |i, n| i == 1 && is_won(n))
        .await;
    let (g2, clean) = won(&n);
    let after = at.duration_since(crashed);
    println!(
        "n2 won {:.0} ms after n1 crashed (session timeout {} ms): the stale node did not wait for expiry",
        after.as_secs_f64() * 1e3,
        T.as_millis()
    );
    assert!(
        after < T,
        "waited for the session to expire instead of removing the stale node"
    );
    assert!(
        g2 > g1 && !clean,
        "a crashed holder is an unclean predecessor"
    );
    assert_eq!(a2.stats().stale_nodes_removed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_live_daemon_with_the_same_node_id_is_refused() {
    let zk = ZkServer::start();
    let root = chroot("dup");
    let (a, _rx) = start(lease_config(&zk.address(), &root, "n1", T)).await;

    // Same node id, this same live process (another service instance): refused.
    let err = LeaseService::start(lease_config(&zk.address(), &root, "n1", T))
        .await
        .err()
        .expect("a second daemon with node id n1 must be refused");
    println!("same host: {err}");
    assert!(matches!(err, LeaseError::NodeIdInUse { .. }));
    assert!(err.to_string().contains("alive on this host"), "{err}");

    // Same node id from another host: refused too (its liveness cannot be checked here).
    let mut other = lease_config(&zk.address(), &root, "n1", T);
    other.incarnation.host = "elsewhere".into();
    let err = LeaseService::start(other).await.err().expect("refused");
    println!("other host: {err}");
    assert!(err.to_string().contains("another host"), "{err}");

    // Once the first stops (its session closes, the registration goes), the id is free.
    a.shutdown(Duration::from_secs(5)).await;
    let (c, _rx) = start(lease_config(&zk.address(), &root, "n1", T)).await;
    assert!(c.session_id().is_some());
}
