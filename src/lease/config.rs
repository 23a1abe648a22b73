//! Lease settings: ensemble, chroot, node id, timings, digest credentials, TLS files and the ACLs built from them.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use sha1::{Digest, Sha1};
use zookeeper_client as zk;

use super::error::LeaseError;
use super::identity::Incarnation;

/// How the lease module connects and times itself.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Client addresses, `host:port,host:port` (no chroot here).
    pub hosts: String,
    /// Absolute ZooKeeper path all nodes live under (`/nbd-failover`); created if missing.
    pub chroot: String,
    /// This node's id: it names the registration node and is written into every lock node.
    pub node_id: String,
    /// Requested session timeout `T` (the server may negotiate it; see
    /// [`LeaseService::session_timeout`](super::LeaseService::session_timeout)).
    pub session_timeout: Duration,
    /// How long to try to establish a session before giving up at start.
    pub connect_timeout: Duration,
    /// Interval of the module's own pings; `None`: negotiated `T / 10`.
    pub ping_interval: Option<Duration>,
    /// After this long without an answered request, report `Disconnected` without waiting for
    /// the client library; `None`: three ping intervals (`0.3 T`).
    pub suspect_after: Option<Duration>,
    /// Digest identity for normal operation; `None`: no authentication, open ACLs.
    pub auth: Option<Credentials>,
    /// Digest identity allowed to break locks (gets full rights on every node created);
    /// also used by [`LeaseAdmin`](super::LeaseAdmin).
    pub admin: Option<Credentials>,
    /// TLS to the ensemble; `None`: plain TCP.
    pub tls: Option<TlsFiles>,
    /// Who this process is, for the same-node-id check; [`Incarnation::current`] unless a test
    /// or tool plays another process.
    pub incarnation: Incarnation,
}

impl LeaseConfig {
    /// Settings with defaults: no auth, no TLS, `connect_timeout` = `T`, derived ping timings.
    pub fn new(
        hosts: impl Into<String>,
        chroot: impl Into<String>,
        node_id: impl Into<String>,
        session_timeout: Duration,
    ) -> Result<Self, LeaseError> {
        Ok(LeaseConfig {
            hosts: hosts.into(),
            chroot: chroot.into(),
            node_id: node_id.into(),
            session_timeout,
            connect_timeout: session_timeout,
            ping_interval: None,
            suspect_after: None,
            auth: None,
            admin: None,
            tls: None,
            incarnation: Incarnation::current()?,
        })
    }

    /// The lease settings of a validated config file (reads the credentials files).
    pub fn from_config(cfg: &crate::config::Config) -> Result<Self, LeaseError> {
        let zkc = &cfg.zookeeper;
        let hosts: Vec<String> = zkc.hosts.iter().map(ToString::to_string).collect();
        let mut out = LeaseConfig::new(
            hosts.join(","),
            zkc.chroot.clone(),
            cfg.node.id.clone(),
            zkc.session_timeout,
        )?;
        out.connect_timeout = zkc.connect_timeout;
        if let Some(a) = &zkc.auth {
            if a.scheme != "digest" {
                return Err(LeaseError::Config(format!(
                    "zookeeper.auth.scheme {:?}: only \"digest\" is supported",
                    a.scheme
                )));
            }
            out.auth = Some(Credentials::from_file(&a.credentials_file)?);
            if let Some(p) = &a.admin_credentials_file {
                out.admin = Some(Credentials::from_file(p)?);
            }
        }
        if let Some(t) = &zkc.tls {
            out.tls = Some(TlsFiles {
                ca_file: t.ca_file.clone(),
                cert_file: Some(t.cert_file.clone()),
                key_file: Some(t.key_file.clone()),
            });
        }
        Ok(out)
    }

    /// Checks what the module relies on: an absolute chroot, a usable node id, sane timings.
    pub fn validate(&self) -> Result<(), LeaseError> {
        if self.hosts.trim().is_empty() {
            return Err(LeaseError::Config("no ZooKeeper hosts".into()));
        }
        if self.hosts.contains('/') {
            return Err(LeaseError::Config(format!(
                "hosts {:?} contain a '/': give the chroot separately",
                self.hosts
            )));
        }
        if !self.chroot.starts_with('/')
            || (self.chroot.len() > 1 && self.chroot.ends_with('/'))
            || self.chroot.contains("//")
        {
            return Err(LeaseError::Config(format!(
                "chroot {:?} must be an absolute ZooKeeper path without a trailing '/'",
                self.chroot
            )));
        }
        check_name(&self.node_id).map_err(|reason| {
            LeaseError::Config(format!("node id {:?}: {reason}", self.node_id))
        })?;
        if self.session_timeout < Duration::from_millis(200) {
            return Err(LeaseError::Config(format!(
                "session timeout {:?} is too short",
                self.session_timeout
            )));
        }
        if let (Some(p), Some(s)) = (self.ping_interval, self.suspect_after) {
            if s <= p {
                return Err(LeaseError::Config(format!(
                    "suspect_after {s:?} must be longer than ping_interval {p:?}"
                )));
            }
        }
        Ok(())
    }

    /// The ping interval for a negotiated session timeout `t`.
    pub fn ping_interval_for(&self, t: Duration) -> Duration {
        self.ping_interval
            .unwrap_or(t / 10)
            .max(Duration::from_millis(20))
    }

    /// How long without an answer until `Disconnected` is reported, for a negotiated `t`.
    pub fn suspect_after_for(&self, t: Duration) -> Duration {
        self.suspect_after.unwrap_or(self.ping_interval_for(t) * 3)
    }

    /// The ACL of every node the module creates: full rights for our identity and the admin,
    /// read for everyone else; without auth, open.
    pub fn acl(&self) -> Vec<zk::Acl> {
        let Some(me) = &self.auth else {
            return vec![zk::Acl::new(zk::Permission::ALL, zk::AuthId::anyone())];
        };
        let mut acl = vec![zk::Acl::new(
            zk::Permission::ALL,
            zk::AuthId::new("digest", &me.digest_id()),
        )];
        if let Some(admin) = &self.admin {
            if admin.user != me.user {
                acl.push(zk::Acl::new(
                    zk::Permission::ALL,
                    zk::AuthId::new("digest", &admin.digest_id()),
                ));
            }
        }
        acl.push(zk::Acl::new(zk::Permission::READ, zk::AuthId::anyone()));
        acl
    }
}

/// Checks a node id or volume name used as one ZooKeeper path component.
pub(crate) fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > 200 {
        return Err("longer than 200 characters");
    }
    if name == "." || name == ".." {
        return Err("'.' and '..' are not allowed");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
    {
        return Err("only ASCII letters, digits and . _ - @ are allowed");
    }
    Ok(())
}

/// A digest identity (`user:password`). `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    user: String,
    password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({}:***)", self.user)
    }
}

impl Credentials {
    /// An identity from its parts; the user may not contain ':'.
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Result<Self, String> {
        let user = user.into();
        let password = password.into();
        if user.is_empty() {
            return Err("the user name is empty".into());
        }
        if user.contains(':') || user.chars().any(char::is_whitespace) {
            return Err("the user name contains ':' or white space".into());
        }
        if password.is_empty() {
            return Err("the password is empty".into());
        }
        Ok(Credentials { user, password })
    }

    /// Reads `user:password` (one line; a trailing newline is fine) from a file.
    pub fn from_file(path: &Path) -> Result<Self, LeaseError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| LeaseError::CredentialsUnreadable {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let malformed = |reason: &str| LeaseError::CredentialsMalformed {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.is_empty())
            .collect();
        let line = match lines.as_slice() {
            [one] => *one,
            [] => return Err(malformed("the file is empty")),
            _ => return Err(malformed("more than one non-empty line")),
        };
        let Some((user, password)) = line.split_once(':') else {
            return Err(malformed("no ':' between user and password"));
        };
        Credentials::new(user, password).map_err(|r| malformed(&r))
    }

    /// The user name.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// ZooKeeper's digest ACL id: `user:base64(sha1("user:password"))`.
    pub fn digest_id(&self) -> String {
        let mut h = Sha1::new();
        h.update(self.user.as_bytes());
        h.update(b":");
        h.update(self.password.as_bytes());
        let b64 = base64::engine::general_purpose::STANDARD.encode(h.finalize());
        format!("{}:{b64}", self.user)
    }

    /// The `addauth digest` payload.
    pub(crate) fn auth_bytes(&self) -> Vec<u8> {
        format!("{}:{}", self.user, self.password).into_bytes()
    }
}

/// TLS files (PEM). Without a client certificate the server must not require one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificate(s) that signed the servers' certificates.
    pub ca_file: PathBuf,
    /// This client's certificate (chain).
    pub cert_file: Option<PathBuf>,
    /// This client's private key.
    pub key_file: Option<PathBuf>,
}

impl TlsFiles {
    /// The client library's TLS options (files read now).
    pub(crate) fn options(&self) -> Result<zk::TlsOptions, LeaseError> {
        let read = |what: &'static str, p: &Path| {
            std::fs::read_to_string(p).map_err(|e| LeaseError::Tls {
                what,
                path: p.to_path_buf(),
                reason: e.to_string(),
            })
        };
        let ca = read("CA file", &self.ca_file)?;
        let mut o = zk::TlsOptions::new()
            .with_pem_ca(&ca)
            .map_err(|e| LeaseError::Tls {
                what: "CA file",
                path: self.ca_file.clone(),
                reason: e.to_string(),
            })?;
        match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => {
                let cert = read("certificate file", c)?;
                let key = read("key file", k)?;
                o = o
                    .with_pem_identity(&cert, &key)
                    .map_err(|e| LeaseError::Tls {
                        what: "certificate/key pair",
                        path: c.clone(),
                        reason: e.to_string(),
                    })?;
            }
            (None, None) => {}
            (Some(c), None) | (None, Some(c)) => {
                return Err(LeaseError::Tls {
                    what: "client identity",
                    path: c.clone(),
                    reason: "a certificate needs its key and a key its certificate".into(),
                })
            }
        }
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_id_matches_zookeepers_digest_authentication_provider() {
        // DigestAuthenticationProvider.generateDigest("super:test") from ZooKeeper's docs.
        let c = Credentials::new("super", "test").unwrap();
        assert_eq!(c.digest_id(), "super:D/InIHSb7yEEbrWz8b9l71RjZJU=");
        assert_eq!(format!("{c:?}"), "Credentials(super:***)");
    }

    #[test]
    fn credentials_files_are_checked() {
        let dir = std::env::temp_dir().join(format!("nbdf-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c");
        for (text, ok) in [
            ("u:S3CR3T\n", true),
            ("u:S3CR3T:q", true),
            ("", false),
            ("nocolon\n", false),
            (":S3CR3T", false),
            ("u:", false),
            ("a:S3CR3T\nc:S3CR3T\n", false),
        ] {
            std::fs::write(&f, text).unwrap();
            let r = Credentials::from_file(&f);
            assert_eq!(r.is_ok(), ok, "{text:?}: {r:?}");
            match r {
                Err(e) => assert!(!e.to_string().contains("S3CR3T"), "{e}"),
                Ok(c) => assert!(!format!("{c:?}").contains("S3CR3T")),
            }
        }
        let missing = Credentials::from_file(&dir.join("missing")).unwrap_err();
        assert!(missing.to_string().contains("cannot read"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lease_settings_come_from_the_config_file() {
        let dir = std::env::temp_dir().join(format!("nbdf-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let creds = dir.join("zk-credentials");
        std::fs::write(&creds, "nbdf:S3CR3T\n").unwrap();
        let example = include_str!("../../examples/nbd-failover.toml");
        let text = example.replacen(
            "# [zookeeper.auth]",
            &format!(
                "[zookeeper.auth]\ncredentials_file = {:?}",
                creds.display().to_string()
            ),
            1,
        );
        let cfg = crate::config::parse_with_hostname(&text, "test.toml", &|| Ok("h1".into()))
            .unwrap_or_else(|e| panic!("{e:?}"));
        let lc = LeaseConfig::from_config(&cfg).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(lc.hosts, "127.0.0.1:2181");
        assert_eq!(lc.chroot, "/nbd-failover");
        assert_eq!(lc.session_timeout, cfg.zookeeper.session_timeout);
        assert_eq!(lc.node_id, cfg.node.id);
        assert_eq!(lc.auth.as_ref().map(Credentials::user), Some("nbdf"));
        lc.validate().unwrap();
        assert_eq!(
            lc.ping_interval_for(Duration::from_secs(10)),
            Duration::from_secs(1)
        );
        assert_eq!(
            lc.suspect_after_for(Duration::from_secs(10)),
            Duration::from_secs(3)
        );
        let acl = lc.acl();
        assert_eq!(acl.len(), 2, "{acl:?}");
    }

    #[test]
    fn names_are_single_path_components() {
        assert!(check_name("mysql-1").is_ok());
        assert!(check_name("node_a.example").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "ä"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
