//! Scenario tests of the pure core: each drives one volume's machine and asserts its sequence of reasons and effects.

use std::time::Duration;

use nbd_failover::core::{
    Decision, Effect, Event, ExitStatus, FsckOutcome, Generation, Instant, Leftovers, Phase,
    TaskSignal, VolumeMachine, VolumePolicy,
};

const G: Generation = Generation(7);

struct Drive {
    m: VolumeMachine,
    now: Instant,
    log: Vec<Decision>,
}

impl Drive {
    fn new() -> Self {
        Drive::with(VolumePolicy::default())
    }

    fn with(policy: VolumePolicy) -> Self {
        Drive {
            m: VolumeMachine::new("mysql", policy, 1),
            now: Instant::ZERO,
            log: Vec::new(),
        }
    }

    fn ev(&mut self, e: Event) -> Vec<Effect> {
        let d = self.m.handle(self.now, e);
        let fx = d.effects.clone();
        self.log.push(d);
        fx
    }

    /// Moves the clock forward by `d`, firing every timer that falls due on the way.
    fn wait(&mut self, d: Duration) -> Vec<Effect> {
        let end = self.now + d;
        let mut fx = Vec::new();
        while let Some(t) = self.m.poll_timeout() {
            if t > end {
                break;
            }
            self.now = t.max(self.now);
            fx.extend(self.ev(Event::Timer));
        }
        self.now = end;
        fx
    }

    /// Heartbeats every 500 ms for `d` (a healthy ZooKeeper connection).
    fn healthy(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.wait(Duration::from_millis(500));
            let at = self.now;
            self.ev(Event::LeaseHeartbeat { last_contact: at });
        }
    }

    fn reasons(&self) -> Vec<&str> {
        self.log.iter().map(|d| d.reason.as_str()).collect()
    }

    /// Asserts that the reasons contain these fragments, in this order.
    fn assert_reasons(&self, fragments: &[&str]) {
        let reasons = self.reasons();
        let mut i = 0;
        for f in fragments {
            match reasons[i..].iter().position(|r| r.contains(f)) {
                Some(p) => i += p + 1,
                None => panic!(
                    "no reason containing {f:?} after position {i}; reasons:\n{}",
                    reasons.join("\n")
                ),
            }
        }
    }

    fn won(&mut self, clean: bool) -> Vec<Effect> {
        let at = self.now;
        self.ev(Event::LeaseWon {
            generation: G,
            predecessor_clean: clean,
            last_contact: at,
        })
    }

    /// Start → contend → win cleanly → attach → fsck → mount → task started.
    fn bring_up(&mut self) {
        assert_eq!(
            self.ev(Event::Start {
                leftovers: Leftovers::default()
            }),
            vec![Effect::Contend]
        );
        assert_eq!(self.won(true), vec![Effect::Attach { generation: G }]);
        assert_eq!(
            self.ev(Event::Attached(Ok(()))),
            vec![Effect::Fsck {
                generation: G,
                force: false
            }]
        );
        assert_eq!(
            self.ev(Event::FsckDone(FsckOutcome::Clean)),
            vec![Effect::Mount { generation: G }]
        );
        assert_eq!(
            self.ev(Event::Mounted(Ok(()))),
            vec![Effect::StartTask { generation: G }]
        );
        assert_eq!(self.ev(Event::TaskStarted(Ok(()))), vec![]);
        assert_eq!(self.m.phase(), Phase::Running);
    }

    /// Task stops on TERM, unmount and detach succeed.
    fn complete_fence(&mut self) -> Vec<Effect> {
        assert_eq!(
            self.ev(Event::TaskExited(ExitStatus::Signal(15))),
            vec![Effect::Unmount { force: false }]
        );
        assert_eq!(self.ev(Event::Unmounted(Ok(()))), vec![Effect::Detach]);
        self.ev(Event::Detached(Ok(())))
    }
}

#[test]
fn clean_start() {
    let mut d = Drive::new();
    d.bring_up();
    d.assert_reasons(&[
        "started with nothing left over: contending for the lease",
        "lease won (generation 7, predecessor released cleanly): attaching under generation 7",
        "device attached: checking the filesystem",
        "filesystem clean: mounting",
        "mounted: starting the task",
        "task started",
    ]);
    // A healthy connection keeps it running, with nothing to do.
    d.healthy(Duration::from_secs(30));
    assert_eq!(d.m.phase(), Phase::Running);
    assert!(d.log.iter().skip(6).all(|x| x.effects.is_empty()));
}

#[test]
fn clean_hand_over() {
    let mut d = Drive::new();
    d.bring_up();
    assert_eq!(
        d.ev(Event::Release { rejoin: true }),
        vec![Effect::SignalTask(TaskSignal::Term)]
    );
    let fx = d.complete_fence();
    assert_eq!(
        fx,
        vec![
            Effect::Release {
                generation: G,
                clean: true
            },
            Effect::Contend
        ]
    );
    d.assert_reasons(&[
        "release (hand-over) requested: fencing, then releasing cleanly: sending SIGTERM to the task group",
        "task stopped (signal 15): unmounting",
        "unmounted: detaching",
        "device detached: fence complete (operator release); releasing generation 7 cleanly; contending for the lease",
    ]);
}

#[test]
fn holder_partitioned_from_zookeeper_fences_on_its_own_clock() {
    let mut d = Drive::new();
    d.bring_up();
    d.healthy(Duration::from_secs(5));
    let last = d.now;
    // No more heartbeats. The core fences at last contact + suspend_grace (2 s)
    // without any disconnect event: time, not events, decides.
    let fx = d.wait(Duration::from_millis(1999));
    assert!(fx.is_empty(), "nothing before suspend_grace: {fx:?}");
    let fx = d.wait(Duration::from_millis(1));
    assert_eq!(fx, vec![Effect::SignalTask(TaskSignal::Term)]);
    assert_eq!(d.m.fence_deadline(), Some(last + Duration::from_secs(9)));
    // The task ignores SIGTERM: KILL after stop_grace (3 s).
    let fx = d.wait(Duration::from_secs(3));
    assert_eq!(fx, vec![Effect::SignalTask(TaskSignal::Kill)]);
    // The client library's Disconnected arrives late (2/3 T) and changes nothing.
    let fx = d.ev(Event::LeaseDisconnected { last_contact: last });
    assert!(fx.is_empty());
    assert_eq!(
        d.ev(Event::TaskExited(ExitStatus::Signal(9))),
        vec![Effect::Unmount { force: false }]
    );
    assert_eq!(d.ev(Event::Unmounted(Ok(()))), vec![Effect::Detach]);
    let fence_done = d.now;
    assert!(
        fence_done < last + Duration::from_secs(9),
        "fence completed before the deadline"
    );
    // The fence completed while disconnected: release (the lease module delivers
    // it on reconnect) and contend again.
    let fx = d.ev(Event::Detached(Ok(())));
    assert_eq!(
        fx,
        vec![
            Effect::Release {
                generation: G,
                clean: true
            },
            Effect::Contend
        ]
    );
    // Expiry comes later still: the queue entry went with the session, so it
    // contends again on the new session.
    assert_eq!(d.ev(Event::LeaseLost), vec![Effect::Contend]);
    d.assert_reasons(&[
        "no answer from ZooKeeper since t+5s (suspend_grace 2s): suspended, deadline t+14s; no ZooKeeper contact within suspend_grace: fencing; sending SIGTERM to the task group (SIGKILL at t+10s)",
        "stop_grace over: sending SIGKILL to the task group",
        "ZooKeeper disconnected (last contact t+5s)",
        "task stopped (signal 9): unmounting",
        "unmounted: detaching",
        "device detached: fence complete (suspended past suspend_grace); releasing generation 7 cleanly; contending for the lease",
        "session lost while queued: contending for the lease",
    ]);
}

#[test]
fn contact_back_within_suspend_grace_cancels_the_suspension() {
    let mut d = Drive::new();
    d.bring_up();
    let last = d.now;
    d.wait(Duration::from_millis(900));
    assert!(d
        .ev(Event::LeaseDisconnected { last_contact: last })
        .is_empty());
    assert_eq!(d.m.phase(), Phase::Suspended);
    d.wait(Duration::from_millis(900));
    let at = d.now;
    assert!(d
        .ev(Event::LeaseReconnected { last_contact: at })
        .is_empty());
    assert_eq!(d.m.phase(), Phase::Running);
    d.healthy(Duration::from_secs(10));
    assert_eq!(d.m.phase(), Phase::Running);
    d.assert_reasons(&[
        "ZooKeeper disconnected",
        "ZooKeeper contact back within the session: suspension cancelled",
    ]);
}

#[test]
fn fsck_failure_never_mounts_releases_and_backs_off() {
    let mut d = Drive::new();
    d.ev(Event::Start {
        leftovers: Leftovers::default(),
    });
    d.won(true);
    d.ev(Event::Attached(Ok(())));
    let fx = d.ev(Event::FsckDone(FsckOutcome::Refused(
        "e2fsck exit 4: errors left uncorrected".into(),
    )));
    assert_eq!(
        fx,
        vec![Effect::Detach],
        "refused fsck: detach, never mount"
    );
    let fx = d.ev(Event::Detached(Ok(())));
    assert_eq!(
        fx,
        vec![Effect::Release {
            generation: G,
            clean: true
        }]
    );
    assert_eq!(d.m.phase(), Phase::Out);
    // Back-off: 2 s ± 10 %, then contend again.
    assert!(d.wait(Duration::from_millis(1799)).is_empty());
    assert_eq!(d.wait(Duration::from_millis(402)), vec![Effect::Contend]);
    assert!(d
        .log
        .iter()
        .all(|x| !x.effects.iter().any(|e| matches!(e, Effect::Mount { .. }))));
    d.assert_reasons(&[
        "ALERT: fsck refused the filesystem (e2fsck exit 4: errors left uncorrected): not mounting; releasing and backing off",
        "device detached: fence complete (fsck refused the filesystem); releasing generation 7 cleanly; staying out until",
        "contending for the lease",
    ]);
}

#[test]
fn task_crash_loop_restarts_then_hands_over() {
    let mut d = Drive::new();
    d.bring_up();
    for i in 1..=3 {
        let fx = d.ev(Event::TaskExited(ExitStatus::Code(1)));
        assert!(fx.is_empty());
        assert_eq!(d.m.phase(), Phase::RestartWait);
        let fx = d.wait(Duration::from_secs(1));
        assert_eq!(fx, vec![Effect::StartTask { generation: G }], "restart {i}");
        let at = d.now;
        d.ev(Event::LeaseHeartbeat { last_contact: at });
        d.ev(Event::TaskStarted(Ok(())));
    }
    let fx = d.ev(Event::TaskExited(ExitStatus::Code(1)));
    assert_eq!(fx, vec![Effect::Unmount { force: false }]);
    assert_eq!(d.ev(Event::Unmounted(Ok(()))), vec![Effect::Detach]);
    assert_eq!(
        d.ev(Event::Detached(Ok(()))),
        vec![Effect::Release {
            generation: G,
            clean: true
        }]
    );
    assert_eq!(d.m.phase(), Phase::Out);
    // Stays out for handover_backoff (30 s), then contends again.
    assert!(d.wait(Duration::from_millis(29_999)).is_empty());
    assert_eq!(d.wait(Duration::from_millis(1)), vec![Effect::Contend]);
    d.assert_reasons(&[
        "task exited (exit code 1): restart 1/3",
        "restarting the task",
        "task exited (exit code 1): restart 2/3",
        "task exited (exit code 1): restart 3/3",
        "task exited (exit code 1) after 3 restart(s): handing the volume over, staying out 30s: unmounting",
        "device detached: fence complete (task crash loop); releasing generation 7 cleanly; staying out until t+",
        "contending for the lease",
    ]);
}

#[test]
fn lock_delay_after_an_unclean_predecessor() {
    let mut d = Drive::new();
    d.ev(Event::Start {
        leftovers: Leftovers::default(),
    });
    assert!(d.won(false).is_empty(), "no attach during lock-delay");
    assert_eq!(d.m.phase(), Phase::LockDelay);
    d.healthy(Duration::from_millis(4500));
    assert!(d
        .log
        .iter()
        .all(|x| x.effects.is_empty() || x.effects == vec![Effect::Contend]));
    let fx = d.wait(Duration::from_millis(500));
    assert_eq!(fx, vec![Effect::Attach { generation: G }]);
    d.assert_reasons(&[
        "lease won (generation 7) after an unclean predecessor: lock-delay 5s until t+5s",
        "attaching under generation 7",
    ]);
}

#[test]
fn releasing_during_lock_delay_does_not_launder_the_unclean_predecessor() {
    let mut d = Drive::new();
    d.ev(Event::Start {
        leftovers: Leftovers::default(),
    });
    d.won(false);
    d.wait(Duration::from_secs(1));
    let fx = d.ev(Event::Shutdown);
    assert_eq!(
        fx,
        vec![Effect::Release {
            generation: G,
            clean: false
        }]
    );
    assert_eq!(d.m.phase(), Phase::Stopped);
}

#[test]
fn leftovers_are_fenced_before_contending() {
    let mut d = Drive::new();
    let leftovers = Leftovers {
        attached: Some(Some(Generation(3))),
        mounted: true,
        task_running: true,
    };
    let fx = d.ev(Event::Start { leftovers });
    assert_eq!(fx, vec![Effect::SignalTask(TaskSignal::Term)]);
    assert_eq!(d.m.phase(), Phase::Recovering);
    assert_eq!(
        d.ev(Event::TaskExited(ExitStatus::Signal(15))),
        vec![Effect::Unmount { force: false }]
    );
    assert_eq!(d.ev(Event::Unmounted(Ok(()))), vec![Effect::Detach]);
    assert_eq!(
        d.ev(Event::Detached(Ok(()))),
        vec![Effect::Contend],
        "contend only after the fence, no release"
    );
    d.assert_reasons(&[
        "found leftovers (device attached under generation 3, mounted, task running): fencing them before contending",
        "fence complete (leftovers of an earlier run); contending for the lease",
    ]);
}

#[test]
fn shutdown_goes_through_the_same_fence() {
    let mut d = Drive::new();
    d.bring_up();
    assert_eq!(
        d.ev(Event::Shutdown),
        vec![Effect::SignalTask(TaskSignal::Term)]
    );
    let fx = d.complete_fence();
    assert_eq!(
        fx,
        vec![Effect::Release {
            generation: G,
            clean: true
        }]
    );
    assert_eq!(d.m.phase(), Phase::Stopped);
    d.assert_reasons(&[
        "shutdown: fencing, then releasing cleanly",
        "fence complete (shutdown); releasing generation 7 cleanly; stopped",
    ]);
}

#[test]
fn a_busy_unmount_is_retried_then_forced() {
    let mut d = Drive::new();
    d.bring_up();
    d.ev(Event::Release { rejoin: false });
    assert_eq!(
        d.ev(Event::TaskExited(ExitStatus::Signal(15))),
        vec![Effect::Unmount { force: false }]
    );
    for attempt in 1..=3 {
        assert!(d
            .ev(Event::Unmounted(Err("target is busy".into())))
            .is_empty());
        let want = Effect::Unmount {
            force: attempt >= 3,
        };
        assert_eq!(
            d.wait(Duration::from_millis(200)),
            vec![want],
            "attempt {attempt}"
        );
    }
    assert_eq!(d.ev(Event::Unmounted(Ok(()))), vec![Effect::Detach]);
    assert_eq!(
        d.ev(Event::Detached(Ok(()))),
        vec![Effect::Release {
            generation: G,
            clean: true
        }]
    );
    assert_eq!(d.m.phase(), Phase::Out);
    d.assert_reasons(&[
        "unmount failed (target is busy), attempt 1",
        "unmounting (forced)",
        "staying out until resumed",
    ]);
}

#[test]
fn forced_detach_kills_at_once_and_releases_as_unclean() {
    let mut d = Drive::new();
    d.bring_up();
    assert_eq!(
        d.ev(Event::ForceDetach),
        vec![Effect::SignalTask(TaskSignal::Kill)]
    );
    assert_eq!(
        d.ev(Event::TaskExited(ExitStatus::Signal(9))),
        vec![Effect::Unmount { force: true }]
    );
    assert_eq!(d.ev(Event::Unmounted(Ok(()))), vec![Effect::Detach]);
    assert_eq!(
        d.ev(Event::Detached(Ok(()))),
        vec![Effect::Release {
            generation: G,
            clean: false
        }]
    );
    assert_eq!(d.m.phase(), Phase::Out);
    assert_eq!(d.ev(Event::Resume), vec![Effect::Contend]);
}

#[test]
fn lease_lost_while_running_kills_at_once() {
    let mut d = Drive::new();
    d.bring_up();
    assert_eq!(
        d.ev(Event::LeaseLost),
        vec![Effect::SignalTask(TaskSignal::Kill)]
    );
    let fx = d.ev(Event::TaskExited(ExitStatus::Signal(9)));
    assert_eq!(fx, vec![Effect::Unmount { force: false }]);
    d.ev(Event::Unmounted(Ok(())));
    assert_eq!(
        d.ev(Event::Detached(Ok(()))),
        vec![Effect::Contend],
        "nothing to release: the lease is gone"
    );
}

#[test]
fn the_watchdog_is_petted_only_while_the_fence_can_still_finish_in_time() {
    let mut p = VolumePolicy::default();
    p.timings.watchdog_timeout = Some(Duration::from_secs(4));
    let mut d = Drive::with(p);
    d.bring_up();
    let last = d.now;
    assert!(d.m.watchdog_ok(d.now));
    // Deadline = last + T − margin = last + 9 s; petting stops at deadline − 4 s.
    assert!(d.m.watchdog_ok(last + Duration::from_secs(5)));
    assert!(!d.m.watchdog_ok(last + Duration::from_millis(5001)));
    d.wait(Duration::from_secs(2));
    assert!(!d.m.watchdog_ok(last + Duration::from_millis(5001)));
    // Once the fence completes nothing is exposed: petting resumes.
    d.ev(Event::TaskExited(ExitStatus::Signal(15)));
    d.ev(Event::Unmounted(Ok(())));
    d.ev(Event::Detached(Ok(())));
    assert!(d.m.watchdog_ok(last + Duration::from_secs(60)));
}

#[test]
fn a_lease_won_while_not_contending_is_given_back() {
    let mut d = Drive::new();
    d.ev(Event::Start {
        leftovers: Leftovers::default(),
    });
    d.ev(Event::Release { rejoin: false });
    let fx = d.won(false);
    assert_eq!(
        fx,
        vec![Effect::Release {
            generation: G,
            clean: false
        }]
    );
}

#[test]
fn an_on_demand_volume_starts_out_and_contends_only_when_resumed() {
    let mut d = Drive::with(VolumePolicy {
        start_out: true,
        has_task: false,
        ..VolumePolicy::default()
    });
    assert!(d
        .ev(Event::Start {
            leftovers: Leftovers::default()
        })
        .is_empty());
    assert_eq!(d.m.phase(), Phase::Out);
    assert_eq!(d.ev(Event::Resume), vec![Effect::Contend]);
    assert_eq!(d.won(true), vec![Effect::Attach { generation: G }]);
    // The last reference dropped: drain fences, releases cleanly and stays out.
    d.ev(Event::Attached(Ok(())));
    d.ev(Event::FsckDone(FsckOutcome::Clean));
    d.ev(Event::Mounted(Ok(())));
    assert_eq!(d.m.phase(), Phase::Running);
    assert_eq!(
        d.ev(Event::Release { rejoin: false }),
        vec![Effect::Unmount { force: false }]
    );
    assert_eq!(d.ev(Event::Unmounted(Ok(()))), vec![Effect::Detach]);
    let fx = d.ev(Event::Detached(Ok(())));
    assert!(fx.contains(&Effect::Release {
        generation: G,
        clean: true
    }));
    assert!(!fx.contains(&Effect::Contend));
    assert_eq!(d.m.phase(), Phase::Out);
}

#[test]
fn on_demand_leftovers_are_fenced_and_a_resume_during_that_fence_contends_after_it() {
    let mut d = Drive::with(VolumePolicy {
        start_out: true,
        has_task: false,
        ..VolumePolicy::default()
    });
    let fx = d.ev(Event::Start {
        leftovers: Leftovers {
            attached: Some(Some(G)),
            mounted: true,
            task_running: false,
        },
    });
    assert_eq!(fx, vec![Effect::Unmount { force: false }]);
    assert_eq!(d.m.phase(), Phase::Recovering);
    // A reference recorded before the restart resumes it while the fence runs.
    assert!(d.ev(Event::Resume).is_empty());
    assert_eq!(d.ev(Event::Unmounted(Ok(()))), vec![Effect::Detach]);
    let fx = d.ev(Event::Detached(Ok(())));
    assert_eq!(
        fx,
        vec![Effect::Contend],
        "contends after the leftover fence"
    );
    // Without the resume it would have stayed out.
    let mut d = Drive::with(VolumePolicy {
        start_out: true,
        has_task: false,
        ..VolumePolicy::default()
    });
    d.ev(Event::Start {
        leftovers: Leftovers {
            attached: Some(Some(G)),
            mounted: true,
            task_running: false,
        },
    });
    d.ev(Event::Unmounted(Ok(())));
    assert!(d.ev(Event::Detached(Ok(()))).is_empty());
    assert_eq!(d.m.phase(), Phase::Out);
}
