//! The Linux watchdog device (`/dev/watchdog`, e.g. `softdog`): opened once, petted by writes, disarmed only on a clean stop.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

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

    /// Clean stop: the magic close character disarms the watchdog
    /// (unless the driver was loaded with `nowayout`).
    pub fn disarm(mut self) -> io::Result<()> {
        self.file.write_all(b"V")?;
        self.file.flush()
    }
}

impl Watchdog for DeviceWatchdog {
    fn pet(&mut self) {
        if let Err(e) = self.file.write_all(b"\0").and_then(|()| self.file.flush()) {
            tracing::error!(error = %e, "could not pet the watchdog device");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pets_by_writing_and_disarms_with_the_magic_character() {
        // A plain file stands in for the device: the protocol is just writes.
        let path = std::env::temp_dir().join(format!("nbdf-wd-{}", std::process::id()));
        std::fs::write(&path, b"").unwrap();
        let mut wd = DeviceWatchdog::open(&path).unwrap();
        wd.pet();
        wd.pet();
        wd.disarm().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"\0\0V");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_missing_device_says_what_to_check() {
        let e = DeviceWatchdog::open(Path::new("/nonexistent/watchdog")).unwrap_err();
        assert!(e.to_string().contains("is softdog loaded"), "{e}");
    }
}
