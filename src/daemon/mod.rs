//! The daemon: one ZooKeeper session, many volumes, each driven through its pure state machine.

pub mod devwatchdog;
pub mod driver;
pub mod run;
pub mod runner;
pub mod systemd;

pub use driver::{
    Completion, Driver, EffectRunner, Input, LeaseNotice, LeasePort, NoWatchdog, StatusBoard,
    VolumeSetup, VolumeStatus, Watchdog,
};
