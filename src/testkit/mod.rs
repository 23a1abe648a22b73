//! Test tooling shipped in the binary (hidden `testkit` subcommands): the checksummed record writer and its checker, and the typed node-config builder every lab and demo writes its configs with.
//!
//! The writer runs as a volume's task. It appends records tagged with its node
//! and lease generation to `records.log` on the volume, fsyncs, and only then
//! appends the same record to an acknowledgement log *outside* the volume. The
//! checker reads the volume's log and every ack log and asserts:
//! - every complete line parses and its checksum matches (a torn last line,
//!   never acknowledged, is tolerated and reported);
//! - generations never go backwards along the log (no record of an older
//!   generation after a newer one: that would be a stale writer);
//! - sequence numbers strictly increase;
//! - every acknowledged record is in the log (nothing acknowledged was lost).

pub mod node_config;
pub mod records;
pub mod writer;
