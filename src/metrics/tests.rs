//! Tests of the metrics: a strict parser of the text format checks every render; the HTTP endpoint is scraped over TCP.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::core::Generation;

// ---------------------------------------------------------------------------
// A strict parser of the text exposition format 0.0.4.

#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Sample {
    fn label(&self, k: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Default)]
struct Family {
    help: Option<String>,
    kind: Option<String>,
    samples: Vec<Sample>,
}

#[derive(Debug, Default)]
struct Exposition {
    families: BTreeMap<String, Family>,
}

impl Exposition {
    fn samples(&self, family: &str) -> &[Sample] {
        &self.families[family].samples
    }

    /// The value of the only sample of `name` with exactly these labels.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let fam = self.families.values().flat_map(|f| &f.samples);
        let mut hits = fam.filter(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| s.label(k) == Some(v))
        });
        let first = hits.next().map(|s| s.value);
        assert!(hits.next().is_none(), "duplicate series {name} {labels:?}");
        first
    }
}

fn is_metric_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_' || c == b':')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
}

fn is_label_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s
            .parse::<f64>()
            .map_err(|e| format!("bad value {s:?}: {e}")),
    }
}

type Labels = Vec<(String, String)>;

/// Parses `{k="v",...}` (after the metric name); returns the labels and the rest.
fn parse_labels(s: &str) -> Result<(Labels, &str), String> {
    let Some(mut rest) = s.strip_prefix('{') else {
        return Ok((Vec::new(), s));
    };
    let mut labels = Vec::new();
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let name = &rest[..eq];
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some((_, '\n')) => return Err("raw newline in label value".into()),
                Some((_, c)) => value.push(c),
            }
        };
        if labels.iter().any(|(n, _): &(String, String)| n == name) {
            return Err(format!("label {name} repeated"));
        }
        labels.push((name.to_string(), value));
        rest = &rest[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err("expected , or } after a label".into());
        }
    }
}

fn unescape_help(s: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('\\') => out.push('\\'),
                Some('n') => out.push('\n'),
                other => return Err(format!("bad escape in HELP: {other:?}")),
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// The family a sample name belongs to, given the families declared so far.
fn family_of<'a>(name: &'a str, current: Option<(&str, &str)>) -> &'a str {
    if let Some((fam, "histogram")) = current {
        for suffix in ["_bucket", "_sum", "_count"] {
            if name.strip_suffix(suffix) == Some(fam) {
                return &name[..fam.len()];
            }
        }
    }
    name
}

/// Parses an exposition and checks the rules of the format: HELP and TYPE
/// once per family and before its samples, samples of a family contiguous,
/// valid names, escapes and values, no duplicate series, histograms complete
/// and consistent.
fn parse(text: &str) -> Result<Exposition, String> {
    if !text.ends_with('\n') {
        return Err("exposition does not end with a newline".into());
    }
    let mut exp = Exposition::default();
    let mut current: Option<String> = None;
    let mut done: HashSet<String> = HashSet::new();
    let mut series: HashSet<String> = HashSet::new();
    for (no, line) in text.lines().enumerate() {
        let ctx = |e: String| format!("line {}: {e}: {line:?}", no + 1);
        if line.is_empty() {
            return Err(ctx("empty line".into()));
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut parts = comment.splitn(4, ' ');
            let (_, keyword, name) = (parts.next(), parts.next(), parts.next());
            let rest = parts.next().unwrap_or("");
            let (Some(keyword @ ("HELP" | "TYPE")), Some(name)) = (keyword, name) else {
                continue; // an ordinary comment
            };
            if !is_metric_name(name) {
                return Err(ctx(format!("bad metric name {name:?}")));
            }
            if current.as_deref() != Some(name) {
                if let Some(prev) = current.take() {
                    done.insert(prev);
                }
                if done.contains(name) {
                    return Err(ctx(format!("family {name} declared again")));
                }
                current = Some(name.to_string());
            }
            let fam = exp.families.entry(name.to_string()).or_default();
            if !fam.samples.is_empty() {
                return Err(ctx(format!("{keyword} of {name} after its samples")));
            }
            if keyword == "HELP" {
                if fam.help.is_some() {
                    return Err(ctx("second HELP".into()));
                }
                fam.help = Some(unescape_help(rest).map_err(ctx)?);
            } else {
                if fam.kind.is_some() {
                    return Err(ctx("second TYPE".into()));
                }
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&rest) {
                    return Err(ctx(format!("bad type {rest:?}")));
                }
                fam.kind = Some(rest.to_string());
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| ctx("no value".into()))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(ctx(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = parse_labels(&line[name_end..]).map_err(ctx)?;
        let rest = rest
            .strip_prefix(' ')
            .ok_or_else(|| ctx("no space before the value".into()))?;
        let mut fields = rest.split(' ');
        let value = parse_value(fields.next().unwrap_or("")).map_err(ctx)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .map_err(|e| ctx(format!("bad timestamp: {e}")))?;
        }
        if fields.next().is_some() {
            return Err(ctx("trailing fields".into()));
        }
        let cur = current.as_deref().map(|c| {
            let kind = exp.families[c].kind.as_deref().unwrap_or("");
            (c, kind)
        });
        let family = family_of(name, cur).to_string();
        if current.as_deref() != Some(family.as_str()) {
            return Err(ctx(format!(
                "sample of {family} outside its family (HELP/TYPE first, samples contiguous)"
            )));
        }
        let fam = exp
            .families
            .get_mut(&family)
            .expect("current family exists");
        if fam.help.is_none() || fam.kind.is_none() {
            return Err(ctx("sample before HELP and TYPE".into()));
        }
        let mut key_labels = labels.clone();
        key_labels.sort();
        if !series.insert(format!("{name}{key_labels:?}")) {
            return Err(ctx("duplicate series".into()));
        }
        fam.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    for (name, fam) in &exp.families {
        if fam.help.is_none() || fam.kind.is_none() {
            return Err(format!("{name}: HELP or TYPE missing"));
        }
        if fam.kind.as_deref() == Some("histogram") {
            check_histogram(name, &fam.samples)?;
        }
        if fam.kind.as_deref() == Some("counter") {
            if let Some(s) = fam
                .samples
                .iter()
                .find(|s| s.value.is_nan() || s.value < 0.0)
            {
                return Err(format!("{name}: negative counter {s:?}"));
            }
        }
    }
    Ok(exp)
}

/// Each histogram series: buckets with ascending `le` ending at `+Inf`,
/// cumulative counts, `+Inf` bucket == `_count`, a `_sum`.
fn check_histogram(name: &str, samples: &[Sample]) -> Result<(), String> {
    type Key = Vec<(String, String)>;
    let mut buckets: BTreeMap<Key, Vec<(f64, f64)>> = BTreeMap::new();
    let mut sums: BTreeMap<Key, f64> = BTreeMap::new();
    let mut counts: BTreeMap<Key, f64> = BTreeMap::new();
    for s in samples {
        let key: Key = s
            .labels
            .iter()
            .filter(|(k, _)| k != "le")
            .cloned()
            .collect();
        if s.name == format!("{name}_bucket") {
            let le = s.label("le").ok_or(format!("{name}: bucket without le"))?;
            buckets
                .entry(key)
                .or_default()
                .push((parse_value(le)?, s.value));
        } else if s.name == format!("{name}_sum") {
            sums.insert(key, s.value);
        } else if s.name == format!("{name}_count") {
            counts.insert(key, s.value);
        } else {
            return Err(format!("{name}: stray sample {}", s.name));
        }
    }
    if buckets.is_empty() {
        return Ok(());
    }
    for (key, bs) in &buckets {
        let mut prev: Option<(f64, f64)> = None;
        for &(le, v) in bs {
            if let Some((ple, pv)) = prev {
                if le <= ple {
                    return Err(format!("{name}{key:?}: le not ascending ({ple} then {le})"));
                }
                if v < pv {
                    return Err(format!("{name}{key:?}: buckets not cumulative"));
                }
            }
            prev = Some((le, v));
        }
        let (last_le, last_v) = prev.expect("non-empty");
        if last_le != f64::INFINITY {
            return Err(format!("{name}{key:?}: no +Inf bucket"));
        }
        match counts.get(key) {
            Some(&c) if c == last_v => {}
            other => {
                return Err(format!(
                    "{name}{key:?}: _count {other:?} != +Inf bucket {last_v}"
                ))
            }
        }
        let sum = sums.get(key).ok_or(format!("{name}{key:?}: no _sum"))?;
        if last_v == 0.0 && *sum != 0.0 {
            return Err(format!("{name}{key:?}: _sum without observations"));
        }
    }
    if sums.len() != buckets.len() || counts.len() != buckets.len() {
        return Err(format!("{name}: _sum/_count series without buckets"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Fixtures.

fn status(name: &str, phase: Phase, generation: Option<u64>) -> VolumeStatus {
    VolumeStatus {
        name: name.to_string(),
        phase,
        generation: generation.map(Generation),
        since: Duration::from_secs(10),
        exposed: generation.is_some(),
        fence_deadline: None,
        last_reason: String::new(),
    }
}

/// Walks `volume` through one acquisition up to running.
fn bring_up(m: &Metrics, volume: &str) {
    let ms = Duration::from_millis;
    m.phase_changed(volume, Phase::Init, Phase::Contending, ms(1));
    m.phase_changed(volume, Phase::Contending, Phase::Attaching, ms(500));
    m.phase_changed(volume, Phase::Attaching, Phase::Checking, ms(30));
    m.phase_changed(volume, Phase::Checking, Phase::Mounting, ms(2_000));
    m.phase_changed(volume, Phase::Mounting, Phase::Starting, ms(4));
    m.phase_changed(volume, Phase::Starting, Phase::Running, ms(200));
}

fn render_parsed(m: &Metrics, board: &[VolumeStatus], age: Option<f64>) -> Exposition {
    let text = m.render(board, age);
    parse(&text).unwrap_or_else(|e| panic!("{e}\n--- exposition ---\n{text}"))
}

// ---------------------------------------------------------------------------
// Render tests.

#[test]
fn every_phase_is_listed_once_in_order() {
    for (i, p) in ALL_PHASES.iter().enumerate() {
        assert_eq!(ALL_PHASES.iter().position(|q| q == p), Some(i));
        // The exhaustive matches classify every phase (a new one breaks the build there).
        let _ = (timed_index(*p), failover_step(*p, *p));
    }
    for (i, p) in TIMED_PHASES.iter().enumerate() {
        assert_eq!(timed_index(*p), Some(i));
    }
}

#[test]
fn render_of_a_fresh_daemon_parses_and_has_every_family() {
    let m = Metrics::new("node-a");
    let exp = render_parsed(&m, &[], None);
    for fam in [
        "volume_state",
        "volume_generation",
        "volume_lease_held",
        "volume_exposed",
        "volume_fence_pending",
        "zookeeper_last_contact_age_seconds",
        "zookeeper_session_state",
        "fences_total",
        "failovers_total",
        "phase_duration_seconds",
        "build_info",
        "node_info",
    ] {
        assert!(
            exp.families.contains_key(&format!("{PREFIX}{fam}")),
            "family {fam} missing"
        );
    }
    assert!(exp
        .samples("nbd_failover_zookeeper_last_contact_age_seconds")
        .is_empty());
    assert_eq!(
        exp.value("nbd_failover_node_info", &[("node", "node-a")]),
        Some(1.0)
    );
    assert_eq!(
        exp.value(
            "nbd_failover_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    for st in SESSION_STATES {
        assert_eq!(
            exp.value("nbd_failover_zookeeper_session_state", &[("state", st)]),
            Some(0.0)
        );
    }
}

#[test]
fn render_shows_board_state_and_session() {
    let m = Metrics::new("node-a");
    m.session_state("connected");
    let mut suspended = status("db", Phase::Suspended, Some(4_294_967_301));
    suspended.fence_deadline = Some(Duration::from_millis(12_500));
    let board = vec![status("web", Phase::Contending, None), suspended];
    let exp = render_parsed(&m, &board, Some(0.25));

    for (vol, phase) in [("db", Phase::Suspended), ("web", Phase::Contending)] {
        let states: Vec<&Sample> = exp
            .samples("nbd_failover_volume_state")
            .iter()
            .filter(|s| s.label("volume") == Some(vol))
            .collect();
        assert_eq!(states.len(), ALL_PHASES.len());
        let on: Vec<&str> = states
            .iter()
            .filter(|s| s.value == 1.0)
            .map(|s| s.label("state").unwrap())
            .collect();
        assert_eq!(on, vec![phase.name()]);
        assert!(states.iter().all(|s| s.value == 0.0 || s.value == 1.0));
    }
    assert_eq!(
        exp.value("nbd_failover_volume_generation", &[("volume", "db")]),
        Some(4_294_967_301.0)
    );
    assert_eq!(
        exp.value("nbd_failover_volume_generation", &[("volume", "web")]),
        None
    );
    assert_eq!(
        exp.value("nbd_failover_volume_lease_held", &[("volume", "db")]),
        Some(1.0)
    );
    assert_eq!(
        exp.value("nbd_failover_volume_lease_held", &[("volume", "web")]),
        Some(0.0)
    );
    assert_eq!(
        exp.value("nbd_failover_volume_exposed", &[("volume", "db")]),
        Some(1.0)
    );
    assert_eq!(
        exp.value("nbd_failover_volume_fence_pending", &[("volume", "db")]),
        Some(1.0)
    );
    assert_eq!(
        exp.value("nbd_failover_volume_fence_pending", &[("volume", "web")]),
        Some(0.0)
    );
    assert_eq!(
        exp.value("nbd_failover_zookeeper_last_contact_age_seconds", &[]),
        Some(0.25)
    );
    assert_eq!(
        exp.value(
            "nbd_failover_zookeeper_session_state",
            &[("state", "connected")]
        ),
        Some(1.0)
    );
    assert_eq!(
        exp.value(
            "nbd_failover_zookeeper_session_state",
            &[("state", "expired")]
        ),
        Some(0.0)
    );
    // Counters and (empty) histograms exist for every board volume.
    assert_eq!(
        exp.value("nbd_failover_fences_total", &[("volume", "web")]),
        Some(0.0)
    );
    assert_eq!(
        exp.value(
            "nbd_failover_phase_duration_seconds_count",
            &[("volume", "web"), ("phase", "checking")]
        ),
        Some(0.0)
    );
    // Without a driver clock, no deadline/age families.
    assert!(!exp
        .families
        .contains_key("nbd_failover_volume_fence_deadline_seconds"));
}

#[test]
fn driver_clock_adds_deadline_and_phase_age() {
    let m = Metrics::new("n");
    m.set_driver_clock(Arc::new(|| Duration::from_millis(11_000)));
    let mut db = status("db", Phase::Suspended, Some(7));
    db.fence_deadline = Some(Duration::from_millis(12_500));
    let exp = render_parsed(&m, &[db], None);
    assert_eq!(
        exp.value(
            "nbd_failover_volume_fence_deadline_seconds",
            &[("volume", "db")]
        ),
        Some(1.5)
    );
    assert_eq!(
        exp.value("nbd_failover_volume_phase_age_seconds", &[("volume", "db")]),
        Some(1.0)
    );
}

#[test]
fn durations_land_in_the_right_buckets() {
    let m = Metrics::new("n");
    bring_up(&m, "db");
    let exp = render_parsed(&m, &[status("db", Phase::Running, Some(1))], None);
    let b = |phase: &str, le: &str| {
        exp.value(
            "nbd_failover_phase_duration_seconds_bucket",
            &[("volume", "db"), ("phase", phase), ("le", le)],
        )
        .unwrap_or_else(|| panic!("no bucket {phase} {le}"))
    };
    // attaching: 30 ms
    assert_eq!(b("attaching", "0.025"), 0.0);
    assert_eq!(b("attaching", "0.05"), 1.0);
    assert_eq!(b("attaching", "+Inf"), 1.0);
    // checking: 2 s
    assert_eq!(b("checking", "1"), 0.0);
    assert_eq!(b("checking", "2.5"), 1.0);
    // mounting: 4 ms; starting: 200 ms (exactly on no bound: 0.25)
    assert_eq!(b("mounting", "0.0025"), 0.0);
    assert_eq!(b("mounting", "0.005"), 1.0);
    assert_eq!(b("starting", "0.1"), 0.0);
    assert_eq!(b("starting", "0.25"), 1.0);
    assert_eq!(b("fencing", "+Inf"), 0.0);
    let sum = exp
        .value(
            "nbd_failover_phase_duration_seconds_sum",
            &[("volume", "db"), ("phase", "checking")],
        )
        .unwrap();
    assert!((sum - 2.0).abs() < 1e-9);
    // Contending is not a measured phase: no series for it.
    assert!(exp
        .samples("nbd_failover_phase_duration_seconds")
        .iter()
        .all(|s| s.label("phase") != Some("contending")));
    // A duration beyond the last bound counts only in +Inf.
    m.phase_changed("db", Phase::Running, Phase::Fencing, Duration::from_secs(5));
    m.phase_changed(
        "db",
        Phase::Fencing,
        Phase::Contending,
        Duration::from_secs(300),
    );
    let exp = render_parsed(&m, &[], None);
    assert_eq!(
        exp.value(
            "nbd_failover_phase_duration_seconds_bucket",
            &[("volume", "db"), ("phase", "fencing"), ("le", "120")]
        ),
        Some(0.0)
    );
    assert_eq!(
        exp.value(
            "nbd_failover_phase_duration_seconds_count",
            &[("volume", "db"), ("phase", "fencing")]
        ),
        Some(1.0)
    );
}

#[test]
fn fences_count_when_fencing_is_left() {
    let m = Metrics::new("n");
    bring_up(&m, "db");
    assert_eq!(m.fences("db"), 0);
    m.phase_changed("db", Phase::Running, Phase::Fencing, Duration::ZERO);
    assert_eq!(m.fences("db"), 0, "a fence counts when it is done");
    m.phase_changed(
        "db",
        Phase::Fencing,
        Phase::Contending,
        Duration::from_secs(1),
    );
    assert_eq!(m.fences("db"), 1);
    // Recovering (leftovers of an earlier run) is not counted as a fence.
    m.phase_changed("db", Phase::Init, Phase::Recovering, Duration::ZERO);
    m.phase_changed("db", Phase::Recovering, Phase::Contending, Duration::ZERO);
    assert_eq!(m.fences("db"), 1);
    let exp = render_parsed(&m, &[], None);
    assert_eq!(
        exp.value("nbd_failover_fences_total", &[("volume", "db")]),
        Some(1.0)
    );
}

#[test]
fn failovers_count_first_running_after_a_won_lease_only() {
    let ms = Duration::from_millis;
    let m = Metrics::new("n");
    bring_up(&m, "db");
    assert_eq!(m.failovers("db"), 1, "the first acquisition counts");

    // Task restart: not a failover.
    m.phase_changed("db", Phase::Running, Phase::RestartWait, ms(1));
    m.phase_changed("db", Phase::RestartWait, Phase::Starting, ms(1));
    m.phase_changed("db", Phase::Starting, Phase::Running, ms(1));
    // Reconnect: not a failover.
    m.phase_changed("db", Phase::Running, Phase::Suspended, ms(1));
    m.phase_changed("db", Phase::Suspended, Phase::Running, ms(1));
    assert_eq!(m.failovers("db"), 1);

    // Lease lost, fenced, won again (with lock-delay): a failover.
    m.phase_changed("db", Phase::Running, Phase::Suspended, ms(1));
    m.phase_changed("db", Phase::Suspended, Phase::Fencing, ms(1));
    m.phase_changed("db", Phase::Fencing, Phase::Contending, ms(1));
    m.phase_changed("db", Phase::Contending, Phase::LockDelay, ms(1));
    m.phase_changed("db", Phase::LockDelay, Phase::Attaching, ms(1));
    m.phase_changed("db", Phase::Attaching, Phase::Suspended, ms(1));
    m.phase_changed("db", Phase::Suspended, Phase::Attaching, ms(1));
    m.phase_changed("db", Phase::Attaching, Phase::Mounting, ms(1));
    m.phase_changed("db", Phase::Mounting, Phase::Running, ms(1));
    assert_eq!(m.failovers("db"), 2);

    // An acquisition whose mount failed never served: not a failover.
    m.phase_changed("db", Phase::Running, Phase::Fencing, ms(1));
    m.phase_changed("db", Phase::Fencing, Phase::Contending, ms(1));
    m.phase_changed("db", Phase::Contending, Phase::Attaching, ms(1));
    m.phase_changed("db", Phase::Attaching, Phase::Mounting, ms(1));
    m.phase_changed("db", Phase::Mounting, Phase::Fencing, ms(1));
    m.phase_changed("db", Phase::Fencing, Phase::Out, ms(1));
    m.phase_changed("db", Phase::Out, Phase::Contending, ms(1));
    assert_eq!(m.failovers("db"), 2);

    // A directory volume without a task may go straight from contending to running.
    m.phase_changed("dir", Phase::Contending, Phase::Running, ms(1));
    assert_eq!(m.failovers("dir"), 1);

    // from == to is no change at all.
    m.phase_changed("db", Phase::Fencing, Phase::Fencing, ms(1));
    assert_eq!(m.fences("db"), 3);

    let exp = render_parsed(&m, &[], None);
    assert_eq!(
        exp.value("nbd_failover_failovers_total", &[("volume", "db")]),
        Some(2.0)
    );
}

#[test]
fn label_values_are_escaped_and_round_trip() {
    let weird = "we\"ird\\vol\nume";
    let m = Metrics::new("node \"x\"\\y");
    m.session_state("odd\nstate");
    bring_up(&m, weird);
    let text = m.render(&[status(weird, Phase::Running, Some(3))], None);
    assert!(text.contains(r#"volume="we\"ird\\vol\nume""#), "{text}");
    let exp = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(
        exp.value(
            "nbd_failover_volume_state",
            &[("volume", weird), ("state", "running")]
        ),
        Some(1.0)
    );
    assert_eq!(
        exp.value("nbd_failover_node_info", &[("node", "node \"x\"\\y")]),
        Some(1.0)
    );
    assert_eq!(
        exp.value(
            "nbd_failover_zookeeper_session_state",
            &[("state", "odd\nstate")]
        ),
        Some(1.0)
    );
    assert_eq!(
        exp.value("nbd_failover_failovers_total", &[("volume", weird)]),
        Some(1.0)
    );
}

#[test]
fn counters_survive_a_volume_leaving_the_board_and_duplicates_are_merged() {
    let m = Metrics::new("n");
    bring_up(&m, "gone");
    let board = vec![
        status("b", Phase::Out, None),
        status("a", Phase::Running, Some(1)),
        status("b", Phase::Out, None),
    ];
    let exp = render_parsed(&m, &board, None);
    assert_eq!(
        exp.value("nbd_failover_failovers_total", &[("volume", "gone")]),
        Some(1.0)
    );
    assert_eq!(
        exp.value("nbd_failover_failovers_total", &[("volume", "a")]),
        Some(0.0)
    );
}

#[test]
fn the_parser_rejects_broken_expositions() {
    let good = "# HELP x_total X.\n# TYPE x_total counter\nx_total{a=\"1\"} 3\n";
    assert!(parse(good).is_ok());
    for bad in [
        // sample before HELP/TYPE
        "x_total 1\n# HELP x_total X.\n# TYPE x_total counter\n",
        // no trailing newline
        "# HELP x X.\n# TYPE x gauge\nx 1",
        // bad escape
        "# HELP x X.\n# TYPE x gauge\nx{a=\"\\t\"} 1\n",
        // duplicate series
        "# HELP x X.\n# TYPE x gauge\nx 1\nx 2\n",
        // family split
        "# HELP x X.\n# TYPE x gauge\nx 1\n# HELP y Y.\n# TYPE y gauge\ny 1\nx{a=\"b\"} 1\n",
        // histogram without +Inf
        "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
        // histogram le descending
        "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"2\"} 1\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        // _count inconsistent
        "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n",
        // bad value
        "# HELP x X.\n# TYPE x gauge\nx one\n",
    ] {
        assert!(parse(bad).is_err(), "accepted:\n{bad}");
    }
}

// ---------------------------------------------------------------------------
// HTTP tests.

struct Server {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
    healthy: Arc<AtomicBool>,
}

async fn start_server(read_timeout: Duration) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(Metrics::new("node-a"));
    metrics.session_state("connected");
    bring_up(&metrics, "db");
    let board: crate::daemon::StatusBoard =
        Arc::new(Mutex::new(vec![status("db", Phase::Running, Some(42))]));
    let healthy = Arc::new(AtomicBool::new(true));
    let h = healthy.clone();
    let health: Arc<dyn Fn() -> Result<(), String> + Send + Sync> = Arc::new(move || {
        if h.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err("zookeeper session expired".to_string())
        }
    });
    let task = tokio::spawn(http::serve_for_test(
        listener,
        metrics,
        board,
        Arc::new(|| Some(0.5)),
        health,
        read_timeout,
    ));
    Server {
        addr,
        task,
        healthy,
    }
}

/// Sends raw bytes, reads the whole response (the server closes); returns (status, headers, body).
async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("response in time")
        .unwrap();
    split_response(&out)
}

fn split_response(out: &[u8]) -> (u16, String, String) {
    let text = String::from_utf8(out.to_vec()).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    let content_length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("Content-Length")
        .parse()
        .unwrap();
    // HEAD answers carry the GET's length and no body.
    assert!(body.is_empty() || body.len() == content_length);
    (status, head.to_string(), body.to_string())
}

#[tokio::test]
async fn http_serves_metrics_and_health() {
    let srv = start_server(Duration::from_secs(5)).await;

    let (status, head, body) = raw(srv.addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status, 200, "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    let exp = parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    assert_eq!(
        exp.value("nbd_failover_volume_generation", &[("volume", "db")]),
        Some(42.0)
    );
    assert_eq!(
        exp.value("nbd_failover_zookeeper_last_contact_age_seconds", &[]),
        Some(0.5)
    );
    assert_eq!(
        exp.value("nbd_failover_failovers_total", &[("volume", "db")]),
        Some(1.0)
    );
    let content_length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(content_length, body.len());

    // HEAD: the same headers, no body; a query string is ignored.
    let (status, head, body) = raw(srv.addr, b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n").await;
    assert_eq!(status, 200);
    assert!(body.is_empty());
    assert!(head.contains(&format!("Content-Length: {content_length}")));

    let (status, _, body) = raw(srv.addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    srv.healthy.store(false, Ordering::SeqCst);
    let (status, _, body) = raw(srv.addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, 503);
    assert_eq!(body, "zookeeper session expired\n");

    let (status, _, _) = raw(srv.addr, b"GET /nope HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, 404);
    let (status, head, _) = raw(
        srv.addr,
        b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 405);
    assert!(head.contains("Allow: GET, HEAD"));
    srv.task.abort();
}

#[tokio::test]
async fn http_refuses_garbage_and_survives_it() {
    let srv = start_server(Duration::from_millis(300)).await;
    for garbage in [
        &b"\x00\xff\xfe garbage\r\n\r\n"[..],
        b"GET /metrics\r\n\r\n",
        b"GET /metrics HTTP/9.9\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
        b"\r\n\r\n",
    ] {
        let (status, _, _) = raw(srv.addr, garbage).await;
        assert_eq!(status, 400, "{garbage:?}");
    }
    // A head that never ends is cut off at the size limit.
    let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    huge.extend(std::iter::repeat(b'a').take(64 * 1024));
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    // The server may close before we finish writing: ignore write errors.
    let _ = s.write_all(&huge).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    if !out.is_empty() {
        assert_eq!(split_response(&out).0, 400);
    }

    // Half a request, then close: 400 (or nothing if the close wins); the server lives on.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET /metr").await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    if !out.is_empty() {
        assert_eq!(split_response(&out).0, 400);
    }

    // A client that sends nothing gets 408 after the read timeout.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the server times the client out")
        .unwrap();
    assert_eq!(split_response(&out).0, 408);

    // Connecting and closing at once is no request at all.
    drop(TcpStream::connect(srv.addr).await.unwrap());

    let (status, _, body) = raw(srv.addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    srv.task.abort();
}

#[tokio::test]
async fn aborting_the_server_closes_the_listener() {
    let srv = start_server(Duration::from_secs(5)).await;
    // An idle connection in flight must not keep anything alive.
    let mut idle = TcpStream::connect(srv.addr).await.unwrap();
    let (status, _, _) = raw(srv.addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, 200);
    srv.task.abort();
    let _ = srv.task.await;
    assert!(TcpStream::connect(srv.addr).await.is_err());
    let mut out = Vec::new();
    // EOF or a reset, either way promptly.
    let _ = tokio::time::timeout(Duration::from_secs(2), idle.read_to_end(&mut out))
        .await
        .expect("the idle connection is closed with the server");
    assert!(out.is_empty());
}
