//! The Linux watchdog device (`/dev/watchdog`, e.g. `softdog`): opened once with its timeout set, petted by writes, disarmed only on a clean stop.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::Duration;

// <linux/watchdog.h>: WDIOC_SETTIMEOUT = _IOWR('W', 6, int), WDIOC_GETTIMEOUT = _IOR('W', 7, int).
const WDIOC_SETTIMEOUT: u32 = (3 << 30) | (4 << 16) | ((b'W' as u32) << 8) | 6;
const WDIOC_GETTIMEOUT: u32 = (2 << 30) | (4 << 16) | ((b'W' as u32) << 8) | 7;

/// One int-argument watchdog ioctl.
fn wd_ioctl(file: &File, request: u32, value: &mut nix::libc::c_int) -> io::Result<()> {
    // SAFETY: a valid open fd and a pointer to a live c_int, as both ioctls expect.
    let r = unsafe {
        nix::libc::ioctl(
            file.as_raw_fd(),
            request as nix::libc::Ioctl,
            std::ptr::from_mut(value),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

use super::driver::Watchdog;

/// An open watchdog device. Dropping it without [`DeviceWatchdog::disarm`]
/// leaves it armed: if the daemon dies, the node is reset when it expires.
#[derive(Debug)]
pub struct DeviceWatchdog {
    file: File,
}

impl DeviceWatchdog {
    /// Opens the device (this arms it). The timeout is the driver's (`softdog
    /// soft_margin=`, or the hardware's), set outside this process.
    pub fn open(path: &Path) -> io::Result<DeviceWatchdog> {
        let file = OpenOptions::new().write(true).open(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot open watchdog device {}: {e} (is softdog loaded? is another process, e.g. systemd's RuntimeWatchdogSec, holding it?)",
                    path.display()
                ),
            )
        })?;
        Ok(DeviceWatchdog { file })
    }

    /// Opens the device (arming it) and sets its timeout to `timeout` (whole
    /// seconds, `WDIOC_SETTIMEOUT`). The device may round the value: what it
    /// reports back must not be longer than `timeout`, or the machine would be
    /// reset after the fence deadline it is there to enforce — then the device
    /// is disarmed again and the error says what to change. A path that is not
    /// a character device (a test setup's file or FIFO) gets no ioctl.
    pub fn arm(path: &Path, timeout: Duration) -> io::Result<DeviceWatchdog> {
        let wd = DeviceWatchdog::open(path)?;
        let is_char = wd.file.metadata()?.file_type().is_char_device();
        if !is_char {
            tracing::warn!(device = %path.display(), "the watchdog device is not a character device (a test setup?): its timeout is not set");
            return Ok(wd);
        }
        let want = timeout.as_secs().max(1);
        let mut secs = nix::libc::c_int::try_from(want).unwrap_or(nix::libc::c_int::MAX);
        let set = wd_ioctl(&wd.file, WDIOC_SETTIMEOUT, &mut secs);
        let actual = match set {
            Ok(_) => Ok(secs),
            Err(e) => {
                let mut got: nix::libc::c_int = 0;
                match wd_ioctl(&wd.file, WDIOC_GETTIMEOUT, &mut got) {
                    Ok(_) => {
                        tracing::warn!(device = %path.display(), error = %e, timeout_s = got, "the watchdog device does not take a timeout: it keeps its own");
                        Ok(got)
                    }
                    Err(e2) => Err(format!(
                        "it neither takes a timeout ({e}) nor reports one ({e2})"
                    )),
                }
            }
        };
        let problem = match actual {
            Ok(s) if u64::try_from(s).is_ok_and(|s| s >= 1 && s <= want) => {
                tracing::info!(device = %path.display(), timeout_s = s, "watchdog device armed");
                return Ok(wd);
            }
            Ok(s) => format!(
                "it runs with a {s}s timeout, longer than watchdog.timeout = {want}s, so the machine \
                 would be reset after the fence deadline it enforces (this device rounds the \
                 timeout up or cannot do {want}s: pick a timeout it supports, below the session \
                 timeout minus the margin)"
            ),
            Err(m) => m,
        };
        let mut wd = wd;
        wd.disarm();
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("watchdog device {}: {problem}", path.display()),
        ))
    }
}

impl Watchdog for DeviceWatchdog {
    fn pet(&mut self) {
        if let Err(e) = self.file.write_all(b"\0").and_then(|()| self.file.flush()) {
            tracing::error!(error = %e, "could not pet the watchdog device");
        }
    }

    /// Clean stop: the magic close character disarms the watchdog when the
    /// file is closed (unless the driver was loaded with `nowayout`).
    fn disarm(&mut self) {
        if let Err(e) = self.file.write_all(b"V").and_then(|()| self.file.flush()) {
            tracing::error!(error = %e, "could not disarm the watchdog device (magic close)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pets_by_writing_and_disarms_with_the_magic_character() {
        // A plain file stands in for the device: the protocol is just writes (and a
        // file that is no character device gets no timeout ioctl).
        let path = std::env::temp_dir().join(format!("nbdf-wd-{}", std::process::id()));
        std::fs::write(&path, b"").unwrap();
        let mut wd = DeviceWatchdog::arm(&path, Duration::from_secs(8)).unwrap();
        wd.pet();
        wd.pet();
        wd.disarm();
        drop(wd);
        assert_eq!(std::fs::read(&path).unwrap(), b"\0\0V");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_character_device_that_is_no_watchdog_is_refused_and_named() {
        // /dev/null takes writes but no watchdog ioctl: the timeout cannot be set or read.
        let e = DeviceWatchdog::arm(Path::new("/dev/null"), Duration::from_secs(8)).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("/dev/null") && m.contains("neither takes a timeout"),
            "{m}"
        );
    }

    #[test]
    fn a_missing_device_says_what_to_check() {
        let e = DeviceWatchdog::open(Path::new("/nonexistent/watchdog")).unwrap_err();
        assert!(e.to_string().contains("is softdog loaded"), "{e}");
    }
}
