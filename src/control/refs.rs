//! Durable references on on-demand volumes (dvdcli mounts, Mesos containers): who needs which volume, written to disk before acting.
//!
//! Order matters for crash safety (the failure mesos-module-dvdi's issue #93
//! describes is recording a mount only after making it):
//! - acquire: the reference is on disk *before* the daemon contends, so a
//!   crash after the mount cannot forget it (a restarted daemon re-acquires);
//! - release: the reference leaves the disk *before* the daemon drains, so a
//!   crash in between leaves the volume fenced by start-up recovery and not
//!   re-acquired for nobody.
//!
//! The file is JSON, replaced atomically (write, fsync, rename, fsync the
//! directory). A file that cannot be parsed stops the daemon with its path:
//! guessing would either leak a mount or release a volume in use.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File format version.
const VERSION: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    volumes: BTreeMap<String, BTreeMap<String, u32>>,
    /// alias → holder (e.g. a Mesos executor → its container).
    #[serde(default)]
    aliases: BTreeMap<String, String>,
}

/// The reference table and the file it lives in.
#[derive(Debug)]
pub struct References {
    path: PathBuf,
    volumes: BTreeMap<String, BTreeMap<String, u32>>,
    aliases: BTreeMap<String, String>,
}

/// What an add or remove did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    /// References on the volume before.
    pub before: u32,
    /// References on the volume after.
    pub after: u32,
}

impl References {
    /// Loads `path` (a missing file is an empty table).
    pub fn load(path: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let path = path.into();
        let (volumes, aliases) = match std::fs::read(&path) {
            Ok(bytes) => {
                let d: OnDisk = serde_json::from_slice(&bytes).map_err(|e| {
                    anyhow::anyhow!(
                        "{}: not a references file ({e}); it records which containers use which volumes: fix or remove it by hand after checking `nbd-failover status` on every node",
                        path.display()
                    )
                })?;
                if d.version != VERSION {
                    anyhow::bail!(
                        "{}: references file version {} is not {VERSION} (written by another nbd-failover version)",
                        path.display(),
                        d.version
                    );
                }
                (d.volumes, d.aliases)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
            Err(e) => anyhow::bail!("reading {}: {e}", path.display()),
        };
        Ok(References {
            path,
            volumes,
            aliases,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// References on `volume`: holder → count.
    pub fn of(&self, volume: &str) -> BTreeMap<String, u32> {
        self.volumes.get(volume).cloned().unwrap_or_default()
    }

    /// Total references on `volume`.
    pub fn count(&self, volume: &str) -> u32 {
        self.volumes.get(volume).map_or(0, |h| h.values().sum())
    }

    /// Volumes `holder` references.
    pub fn held_by(&self, holder: &str) -> Vec<String> {
        self.volumes
            .iter()
            .filter(|(_, h)| h.contains_key(holder))
            .map(|(v, _)| v.clone())
            .collect()
    }

    /// Volumes with at least one reference.
    pub fn referenced(&self) -> Vec<String> {
        self.volumes
            .iter()
            .filter(|(_, h)| h.values().sum::<u32>() > 0)
            .map(|(v, _)| v.clone())
            .collect()
    }

    /// The holder an alias stands for (or `name` itself).
    pub fn resolve(&self, name: &str) -> String {
        self.aliases
            .get(name)
            .cloned()
            .unwrap_or_else(|| name.to_string())
    }

    /// Adds a reference (`counted`: one more; otherwise at most one per holder) and writes the file.
    pub fn add(&mut self, volume: &str, holder: &str, counted: bool) -> anyhow::Result<Change> {
        self.add_with_alias(volume, holder, counted, None)
    }

    /// Like [`References::add`], also recording `alias` → `holder` in the same write.
    pub fn add_with_alias(
        &mut self,
        volume: &str,
        holder: &str,
        counted: bool,
        alias: Option<&str>,
    ) -> anyhow::Result<Change> {
        let before = self.count(volume);
        let mut next = self.volumes.clone();
        let h = next.entry(volume.to_string()).or_default();
        let n = h.entry(holder.to_string()).or_insert(0);
        *n = if counted { *n + 1 } else { 1 };
        if let Some(a) = alias {
            self.aliases.insert(a.to_string(), holder.to_string());
        }
        self.commit(next)?;
        Ok(Change {
            before,
            after: self.count(volume),
        })
    }

    /// Removes one reference of `holder` (all of them with `all`) and writes the file.
    pub fn remove(&mut self, volume: &str, holder: &str, all: bool) -> anyhow::Result<Change> {
        let before = self.count(volume);
        let mut next = self.volumes.clone();
        if let Some(h) = next.get_mut(volume) {
            if let Some(n) = h.get_mut(holder) {
                *n = if all { 0 } else { n.saturating_sub(1) };
                if *n == 0 {
                    h.remove(holder);
                }
            }
            if h.is_empty() {
                next.remove(volume);
            }
        }
        if next != self.volumes {
            self.commit(next)?;
        }
        Ok(Change {
            before,
            after: self.count(volume),
        })
    }

    fn commit(&mut self, next: BTreeMap<String, BTreeMap<String, u32>>) -> anyhow::Result<()> {
        // Aliases of holders that hold nothing any more go with them.
        let mut aliases = self.aliases.clone();
        aliases.retain(|_, h| next.values().any(|m| m.contains_key(h)));
        let d = OnDisk {
            version: VERSION,
            volumes: next,
            aliases,
        };
        let bytes = serde_json::to_vec_pretty(&d)?;
        write_atomically(&self.path, &bytes)?;
        self.volumes = d.volumes;
        self.aliases = d.aliases;
        Ok(())
    }
}

/// Write, fsync, rename over `path`, fsync the directory.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| anyhow::anyhow!("{} has no parent directory", path.display()))?;
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    res.map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "nbdf-refs-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d.join("references.json")
    }

    #[test]
    fn counted_and_idempotent_references_survive_a_reload() {
        let p = temp();
        let mut r = References::load(&p).unwrap();
        assert_eq!(
            r.add("db", "dvdcli", true).unwrap(),
            Change {
                before: 0,
                after: 1
            }
        );
        assert_eq!(
            r.add("db", "dvdcli", true).unwrap(),
            Change {
                before: 1,
                after: 2
            }
        );
        assert_eq!(r.add("db", "container:a", false).unwrap().after, 3);
        assert_eq!(r.add("db", "container:a", false).unwrap().after, 3);
        let mut r = References::load(&p).unwrap();
        assert_eq!(r.count("db"), 3);
        assert_eq!(r.held_by("container:a"), vec!["db".to_string()]);
        assert_eq!(r.remove("db", "dvdcli", false).unwrap().after, 2);
        assert_eq!(r.remove("db", "container:a", true).unwrap().after, 1);
        assert_eq!(
            r.remove("db", "nobody", false).unwrap(),
            Change {
                before: 1,
                after: 1
            }
        );
        assert_eq!(r.remove("db", "dvdcli", false).unwrap().after, 0);
        assert!(References::load(&p).unwrap().referenced().is_empty());
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it() {
        let p = temp();
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"{not json").unwrap();
        let e = References::load(&p).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
    }
}
