//! [`FakeBlockDevices`]: an in-memory [`BlockDevices`] that records calls and injects failures.
//!
//! For the daemon's tests: attach hands out the lowest free index (or the one
//! asked for), detach honours [`DetachMode`] against mounts set with
//! [`FakeBlockDevices::set_mounted`], and [`FakeBlockDevices::fail_next`]
//! makes the next call of an operation fail.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;

use super::handshake::{Export, Method};
use super::{
    AttachRequest, Attachment, BackendId, BlockDevices, DetachMode, DetachOptions, Detached,
    DeviceChoice, DeviceStatus, NbdError,
};

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeCall {
    /// `attach` with this backend id.
    Attach(BackendId),
    /// `detach` of this index in this mode.
    Detach(u32, DetachMode),
    /// `status` of this index.
    Status(u32),
    /// `list`.
    List,
}

/// Which operation an injected failure applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FakeOp {
    /// `attach`.
    Attach,
    /// `detach`.
    Detach,
    /// `status` and `list`.
    Query,
}

#[derive(Debug, Default)]
struct State {
    devices: BTreeMap<u32, (BackendId, Vec<PathBuf>)>,
    calls: Vec<FakeCall>,
    failures: VecDeque<(FakeOp, String)>,
}

/// A recording fake of the kernel NBD devices.
#[derive(Debug, Default)]
pub struct FakeBlockDevices {
    state: Mutex<State>,
}

impl FakeBlockDevices {
    /// An empty fake.
    pub fn new() -> Self {
        FakeBlockDevices::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The calls so far, in order.
    pub fn calls(&self) -> Vec<FakeCall> {
        self.lock().calls.clone()
    }

    /// Makes the next call of `op` fail with `message`.
    pub fn fail_next(&self, op: FakeOp, message: impl Into<String>) {
        self.lock().failures.push_back((op, message.into()));
    }

    /// Pretends `index` is mounted at `mounts` (empty: unmounted).
    pub fn set_mounted(&self, index: u32, mounts: Vec<PathBuf>) {
        if let Some(d) = self.lock().devices.get_mut(&index) {
            d.1 = mounts;
        }
    }

    /// Pretends a previous incarnation left `backend` attached at `index`.
    pub fn leave_attached(&self, index: u32, backend: BackendId) {
        self.lock().devices.insert(index, (backend, Vec::new()));
    }

    fn injected(state: &mut State, op: FakeOp) -> Result<(), NbdError> {
        if let Some(pos) = state.failures.iter().position(|(o, _)| *o == op) {
            if let Some((_, m)) = state.failures.remove(pos) {
                return Err(NbdError::Injected(m));
            }
        }
        Ok(())
    }

    fn status_of(index: u32, entry: Option<&(BackendId, Vec<PathBuf>)>) -> DeviceStatus {
        DeviceStatus {
            index,
            device: PathBuf::from(format!("/dev/nbd{index}")),
            attached: entry.is_some(),
            pid: entry.map(|_| std::process::id()),
            backend: entry.map(|(b, _)| b.to_string()),
            size_bytes: if entry.is_some() { 1 << 30 } else { 0 },
            read_only: false,
            mounts: entry.map(|(_, m)| m.clone()).unwrap_or_default(),
            holders: Vec::new(),
        }
    }
}

impl BlockDevices for FakeBlockDevices {
    fn attach(&self, request: &AttachRequest) -> Result<Attachment, NbdError> {
        let mut s = self.lock();
        s.calls.push(FakeCall::Attach(request.backend.clone()));
        Self::injected(&mut s, FakeOp::Attach)?;
        let index = match request.device {
            DeviceChoice::Index(i) if s.devices.contains_key(&i) => {
                return Err(NbdError::DeviceBusy {
                    index: Some(i),
                    waited: request.attach_timeout,
                })
            }
            DeviceChoice::Index(i) => i,
            DeviceChoice::Any => (0..).find(|i| !s.devices.contains_key(i)).unwrap_or(0),
        };
        s.devices
            .insert(index, (request.backend.clone(), Vec::new()));
        Ok(Attachment {
            index,
            device: PathBuf::from(format!("/dev/nbd{index}")),
            export: Export {
                size: 1 << 30,
                transmission_flags: 1,
                block_sizes: None,
                handshake_flags: 3,
                method: Method::Go,
            },
            block_size: 512,
            connections: request.connections,
            backend: request.backend.clone(),
        })
    }

    fn detach(&self, index: u32, options: &DetachOptions) -> Result<Detached, NbdError> {
        let mut s = self.lock();
        s.calls.push(FakeCall::Detach(index, options.mode));
        Self::injected(&mut s, FakeOp::Detach)?;
        let Some((_, mounts)) = s.devices.get(&index).cloned() else {
            return Ok(Detached::AlreadyFree);
        };
        if !mounts.is_empty() {
            if options.mode == DetachMode::Safe {
                return Err(NbdError::InUse {
                    index,
                    mounts,
                    holders: Vec::new(),
                });
            }
            s.devices.remove(&index);
            return Ok(Detached::ShutDownHeldOpen { mounts });
        }
        s.devices.remove(&index);
        Ok(Detached::Free)
    }

    fn status(&self, index: u32) -> Result<DeviceStatus, NbdError> {
        let mut s = self.lock();
        s.calls.push(FakeCall::Status(index));
        Self::injected(&mut s, FakeOp::Query)?;
        Ok(Self::status_of(index, s.devices.get(&index)))
    }

    fn list(&self) -> Result<Vec<DeviceStatus>, NbdError> {
        let mut s = self.lock();
        s.calls.push(FakeCall::List);
        Self::injected(&mut s, FakeOp::Query)?;
        Ok(s.devices
            .iter()
            .map(|(i, e)| Self::status_of(*i, Some(e)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::{Generation, NbdAddress};

    #[test]
    fn records_refuses_mounted_and_discovers() {
        let f = FakeBlockDevices::new();
        let id = BackendId::new("db", Generation(9)).unwrap();
        let req = AttachRequest::new(NbdAddress::Tcp("127.0.0.1:1".into()), "db", id.clone());
        let a = f.attach(&req).unwrap();
        assert_eq!(a.index, 0);
        let found = f.discover().unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].backend, id);
        f.set_mounted(0, vec!["/srv/db".into()]);
        assert!(matches!(
            f.detach(0, &DetachOptions::safe()),
            Err(NbdError::InUse { .. })
        ));
        f.fail_next(FakeOp::Detach, "boom");
        assert!(matches!(
            f.detach(0, &DetachOptions::force()),
            Err(NbdError::Injected(_))
        ));
        assert!(matches!(
            f.detach(0, &DetachOptions::force()),
            Ok(Detached::ShutDownHeldOpen { .. })
        ));
        assert!(f.discover().unwrap().is_empty());
        assert_eq!(f.calls().len(), 6);
    }
}
