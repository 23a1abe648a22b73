//! systemd integration without libsystemd: `sd_notify` datagrams (READY, STATUS, WATCHDOG, STOPPING) and `WATCHDOG_USEC`.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

use super::driver::Watchdog;

/// Where `sd_notify` messages go: the socket named by `$NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    target: Target,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    Path(PathBuf),
    /// Linux abstract namespace (`@name` in `$NOTIFY_SOCKET`).
    Abstract(Vec<u8>),
}

impl Notifier {
    /// The notifier systemd asked for, or `None` when not started by systemd with `Type=notify`.
    pub fn from_env() -> io::Result<Option<Notifier>> {
        match std::env::var_os("NOTIFY_SOCKET") {
            None => Ok(None),
            Some(s) => Notifier::to(&s.to_string_lossy()).map(Some),
        }
    }

    /// A notifier sending to `addr` (a path, or `@name` for an abstract socket).
    pub fn to(addr: &str) -> io::Result<Notifier> {
        let target = match addr.strip_prefix('@') {
            Some(name) => Target::Abstract(name.as_bytes().to_vec()),
            None if addr.starts_with('/') => Target::Path(PathBuf::from(addr)),
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "NOTIFY_SOCKET={addr:?} is neither an absolute path nor an @abstract name"
                    ),
                ))
            }
        };
        Ok(Notifier {
            socket: UnixDatagram::unbound()?,
            target,
        })
    }

    /// Sends one message (`KEY=value` lines).
    pub fn send(&self, msg: &str) -> io::Result<()> {
        match &self.target {
            Target::Path(p) => self.socket.send_to(msg.as_bytes(), p).map(|_| ()),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                self.socket.send_to_addr(msg.as_bytes(), &addr).map(|_| ())
            }
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) -> io::Result<()> {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)))
    }

    /// `STATUS=…`.
    pub fn status(&self, status: &str) -> io::Result<()> {
        self.send(&format!("STATUS={}", one_line(status)))
    }

    /// `STOPPING=1` with a status line.
    pub fn stopping(&self, status: &str) -> io::Result<()> {
        self.send(&format!("STOPPING=1\nSTATUS={}", one_line(status)))
    }
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

/// The watchdog timeout systemd set (`WatchdogSec=` → `$WATCHDOG_USEC`), if any,
/// and only when `$WATCHDOG_PID` (if set) names this process.
pub fn watchdog_from_env() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_string_lossy().trim() != std::process::id().to_string() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// The systemd watchdog: `WATCHDOG=1` on every pet.
#[derive(Debug)]
pub struct SystemdWatchdog(pub Notifier);

impl Watchdog for SystemdWatchdog {
    fn pet(&mut self) {
        if let Err(e) = self.0.send("WATCHDOG=1") {
            tracing::warn!(error = %e, "could not pet the systemd watchdog");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_ready_status_and_watchdog_datagrams() {
        let dir = std::env::temp_dir().join(format!("nbdf-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::to(path.to_str().unwrap()).unwrap();
        n.ready("3 volumes\nall good").unwrap();
        let mut wd = SystemdWatchdog(Notifier::to(path.to_str().unwrap()).unwrap());
        wd.pet();
        let mut buf = [0u8; 256];
        let k = server.recv(&mut buf).unwrap();
        assert_eq!(
            std::str::from_utf8(&buf[..k]).unwrap(),
            "READY=1\nSTATUS=3 volumes all good"
        );
        let k = server.recv(&mut buf).unwrap();
        assert_eq!(std::str::from_utf8(&buf[..k]).unwrap(), "WATCHDOG=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn abstract_socket_names_work() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("nbdf-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        Notifier::to(&format!("@{name}"))
            .unwrap()
            .status("ok")
            .unwrap();
        let mut buf = [0u8; 64];
        let k = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"STATUS=ok");
    }

    #[test]
    fn a_relative_notify_socket_is_refused() {
        let e = Notifier::to("relative/path").unwrap_err();
        assert!(e.to_string().contains("neither an absolute path"), "{e}");
    }
}
