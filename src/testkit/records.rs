//! The record format (`node gen seq crc`) and the checker over a volume log and its ack logs.

use std::collections::BTreeSet;
use std::fmt;

/// One record as written by the writer task.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Record {
    /// Lease generation the writer ran under.
    pub generation: u64,
    /// Sequence number, continuing across generations.
    pub seq: u64,
    /// Node that wrote it.
    pub node: String,
}

impl Record {
    /// The line written for this record (with its checksum, without the newline).
    pub fn line(&self) -> String {
        let body = format!("{} {} {}", self.node, self.generation, self.seq);
        format!("{body} {:08x}", crc32(body.as_bytes()))
    }

    /// Parses a line; `None` when malformed or the checksum does not match.
    pub fn parse(line: &str) -> Option<Record> {
        let mut parts = line.split(' ');
        let node = parts.next()?;
        let generation = parts.next()?.parse().ok()?;
        let seq = parts.next()?.parse().ok()?;
        let crc = u32::from_str_radix(parts.next()?, 16).ok()?;
        if parts.next().is_some() || node.is_empty() {
            return None;
        }
        let body = format!("{node} {generation} {seq}");
        (crc32(body.as_bytes()) == crc).then(|| Record {
            generation,
            seq,
            node: node.to_string(),
        })
    }
}

/// CRC-32 (IEEE), bitwise: small and dependency-free.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

/// What the checker found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Good records in the volume log.
    pub records: usize,
    /// Distinct generations seen, in log order.
    pub generations: Vec<u64>,
    /// Acknowledged records checked.
    pub acked: usize,
    /// A torn (incomplete, unacknowledged) final line was found.
    pub torn_tail: bool,
    /// Every problem found; empty means the history is good.
    pub problems: Vec<String>,
}

impl Verdict {
    /// No problem found.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} records over {} generation(s) {:?}, {} acknowledged, torn tail: {}; ",
            self.records,
            self.generations.len(),
            self.generations,
            self.acked,
            self.torn_tail
        )?;
        if self.ok() {
            write!(f, "history OK")
        } else {
            write!(
                f,
                "{} PROBLEM(S): {}",
                self.problems.len(),
                self.problems.join("; ")
            )
        }
    }
}

/// Checks a volume log against the ack logs.
pub fn check(log: &str, acks: &[&str]) -> Verdict {
    let mut v = Verdict::default();
    let mut seen = BTreeSet::new();
    let mut last: Option<Record> = None;
    let lines: Vec<&str> = log.split('\n').collect();
    for (i, line) in lines.iter().enumerate() {
        // `split` leaves an empty last element after a final newline.
        if line.is_empty() && i + 1 == lines.len() {
            break;
        }
        let is_last_unterminated = i + 1 == lines.len() && !log.ends_with('\n');
        let Some(r) = Record::parse(line) else {
            if is_last_unterminated {
                v.torn_tail = true;
            } else {
                v.problems
                    .push(format!("line {}: corrupt record {line:?}", i + 1));
            }
            continue;
        };
        if let Some(prev) = &last {
            if r.generation < prev.generation {
                v.problems.push(format!(
                    "line {}: generation {} (node {}) after generation {} (node {}): a stale writer",
                    i + 1,
                    r.generation,
                    r.node,
                    prev.generation,
                    prev.node
                ));
            }
            if r.seq <= prev.seq {
                v.problems.push(format!(
                    "line {}: sequence {} after {}",
                    i + 1,
                    r.seq,
                    prev.seq
                ));
            }
        }
        if v.generations.last() != Some(&r.generation) {
            v.generations.push(r.generation);
        }
        v.records += 1;
        seen.insert(r.clone());
        last = Some(r);
    }
    for ack in acks {
        for line in ack.lines() {
            let Some(r) = Record::parse(line) else {
                // An ack line torn by a crash of the writer was never acknowledged.
                continue;
            };
            v.acked += 1;
            if !seen.contains(&r) {
                v.problems
                    .push(format!("acknowledged record lost: {}", r.line()));
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(node: &str, generation: u64, seq: u64) -> String {
        Record {
            generation,
            seq,
            node: node.into(),
        }
        .line()
            + "\n"
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn a_good_history_passes() {
        let log = [rec("a", 5, 1), rec("a", 5, 2), rec("b", 9, 3)].concat();
        let acks = [rec("a", 5, 1), rec("a", 5, 2)].concat();
        let v = check(&log, &[&acks, &rec("b", 9, 3)]);
        assert!(v.ok(), "{v}");
        assert_eq!(v.generations, vec![5, 9]);
        assert_eq!(v.acked, 3);
    }

    #[test]
    fn a_stale_writer_is_caught() {
        let log = [rec("a", 5, 1), rec("b", 9, 2), rec("a", 5, 3)].concat();
        let v = check(&log, &[]);
        assert!(v.problems.iter().any(|p| p.contains("stale writer")), "{v}");
    }

    #[test]
    fn a_lost_acknowledged_record_is_caught() {
        let log = rec("a", 5, 1);
        let v = check(&log, &[&[rec("a", 5, 1), rec("a", 5, 2)].concat()]);
        assert_eq!(
            v.problems,
            vec![format!(
                "acknowledged record lost: {}",
                rec("a", 5, 2).trim_end()
            )]
        );
    }

    #[test]
    fn a_torn_tail_is_tolerated_but_corruption_inside_is_not() {
        let torn = [rec("a", 5, 1), "a 5 2 dead".to_string()].concat();
        let v = check(&torn, &[]);
        assert!(v.ok() && v.torn_tail, "{v}");
        let inside = [rec("a", 5, 1), "garbage\n".to_string(), rec("a", 5, 3)].concat();
        assert!(!check(&inside, &[]).ok());
    }

    #[test]
    fn a_bad_checksum_is_corruption() {
        let mut line = rec("a", 5, 1);
        line.replace_range(0..1, "b");
        assert!(Record::parse(line.trim_end()).is_none());
    }
}
