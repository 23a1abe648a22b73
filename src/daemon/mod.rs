//! The daemon: one ZooKeeper session, many volumes, each driven through its pure state machine.

pub mod devwatchdog;
pub mod driver;
pub mod offline;
pub mod run;
pub mod runner;
pub mod systemd;
pub mod wrapper;

pub use driver::{
    Completion, Driver, EffectRunner, Input, LeaseNotice, LeasePort, NoWatchdog, PhaseObserver,
    SessionView, StatusBoard, VolumeSetup, VolumeStatus, Watchdog,
};
