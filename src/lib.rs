//! nbd-failover: lease-gated failover of network block devices for stateful services.
//!
//! A node-local controller that wins a ZooKeeper lease for a volume, only then
//! attaches the device, checks and mounts the filesystem and starts the task,
//! and on (suspected) lease loss stops the task, unmounts and detaches — so a
//! volume is attached to one node at a time.
//!
//! # Layout
//!
//! - [`core`]: the pure per-volume state machine (no IO, no clock, no tokio):
//!   events in, effects and a reason out, `poll_timeout()` for timers.
//!   - `core::time`: the caller-supplied [`core::Instant`].
//!   - `core::policy`: timings, the fencing budget, restart and fsck policy.
//!   - `core::event`, `core::effect`: the machine's inputs and outputs.
//!   - `core::machine`: [`core::VolumeMachine`] itself.
//!   - `core::rng`: the seeded random source (jitter), never the OS's.
//! - [`config`]: the TOML config, its validation (file:line:column errors)
//!   and the `check-config` report.
//! - [`sim`]: the deterministic cluster simulation (nodes, a lease service with
//!   ZooKeeper's timing, a virtual clock, seeded faults, invariant checks).
//! - [`nbd`]: the NBD block-device backend: the client handshake, kernel
//!   attach/detach/status/list over generic netlink, discovery of our
//!   attachments by backend identifier, and the [`nbd::BlockDevices`] trait
//!   with its real ([`nbd::KernelNbd`]) and fake implementations.
//! - [`daemon`]: the daemon's driver: routes lease notices and effect
//!   completions to each volume's machine, runs effects, timers, the watchdog.
//! - [`lease`]: the ZooKeeper lease: one session per daemon, a herd-free lock
//!   per volume, generations (czxid), clean-release records, digest ACLs, TLS,
//!   and its own contact clock; [`lease::LeaseService`] turns the core's lease
//!   effects into ZooKeeper operations and reports [`lease::LeaseNotice`]s.
//! - [`exec`]: the executors carrying out effects on a real node — fsck
//!   (`e2fsck -p`, `xfs_repair -n`), mount/unmount (holders stopped), `exec`
//!   and systemd tasks, the `image` (loop device) and `dir` backends, the
//!   start-up recovery scan — each behind a trait with a recording fake, and
//!   the mapping of their results to core events.
//! - [`control`]: the daemon's root-only control socket: typed requests
//!   (status, release, drain, forced detach, on-demand acquire) and the
//!   durable reference table behind dvdcli and the Mesos hooks.
//! - [`metrics`]: the Prometheus endpoint (`/metrics`, `/healthz`).
//! - [`logging`]: tracing to stderr, or to journald under systemd.
//! - [`testkit`]: the record writer task and history checker behind the
//!   hidden `testkit` subcommands (end-to-end tests, fault campaign).
//! - [`cli`]: the command-line interface behind the `nbd-failover` binary.

pub mod cli;
pub mod config;
pub mod control;
pub mod core;
pub mod daemon;
pub mod exec;
pub mod lease;
pub mod logging;
pub mod metrics;
pub mod nbd;
pub mod sim;
pub mod testkit;
