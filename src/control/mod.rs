//! The local control interface: a root-only unix socket between the daemon and the CLI, dvdcli and the Mesos hooks.

pub mod client;
pub mod proto;
pub mod refs;
pub mod server;

pub use client::{call, ClientError};
pub use proto::{ErrorKind, Request, Response, StatusReport, VolumeReport};
pub use refs::References;
pub use server::{bind, serve, ControlContext};
