//! The writer task: appends fsync'd records to the volume, then acknowledges each outside it.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::Path;
use std::time::Duration;

use super::records::Record;

/// Runs until killed: one record every `interval`. Resumes the sequence from the
/// volume's log. Returns only on an IO error (the task then exits non-zero).
pub fn run(
    volume_dir: &Path,
    ack: &Path,
    node: &str,
    generation: u64,
    interval: Duration,
) -> io::Result<()> {
    let log_path = volume_dir.join("records.log");
    let mut seq = match std::fs::read_to_string(&log_path) {
        Ok(s) => s
            .lines()
            .filter_map(Record::parse)
            .map(|r| r.seq)
            .max()
            .unwrap_or(0),
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let mut acks = OpenOptions::new().create(true).append(true).open(ack)?;
    loop {
        seq += 1;
        let line = Record {
            generation,
            seq,
            node: node.to_string(),
        }
        .line()
            + "\n";
        log.write_all(line.as_bytes())?;
        log.sync_data()?;
        acks.write_all(line.as_bytes())?;
        acks.sync_data()?;
        std::thread::sleep(interval);
    }
}
