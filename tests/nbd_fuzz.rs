//! Property test of the handshake against hostile servers: random and mutated bytes never panic.
//!
//! Properties, for every generated server transcript:
//! - the handshake returns (no panic, no unbounded allocation);
//! - pure random bytes always give an error (they cannot spell NBDMAGIC);
//! - a success is internally consistent (NBD_FLAG_HAS_FLAGS set, size < 2^63);
//! - over a real socket whose server then stalls, the error comes within the timeout.
//!
//! Cases are seeded: `NBD_FUZZ_SEED=S` replays one case, `NBD_FUZZ_CASES=N`
//! changes how many run (default 20,000 in memory, 200 over sockets). A
//! failing case prints its seed.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::thread;
use std::time::{Duration, Instant};

use nbd_failover::nbd::handshake::{
    self, HandshakeError, HandshakeOptions, HandshakeStream, Method,
};

/// xorshift64*: small, seeded, reproducible.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

fn reply(option: u32, kind: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// A plausible server transcript: GO with info replies, or EXPORT_NAME's answer.
fn valid_transcript(rng: &mut Rng) -> Vec<u8> {
    let mut v = b"NBDMAGICIHAVEOPT".to_vec();
    let flags: u16 = rng.below(4) as u16;
    v.extend_from_slice(&flags.to_be_bytes());
    if flags & 1 != 0 && rng.below(3) > 0 {
        if rng.below(4) == 0 {
            v.extend(reply(7, 0x8000_0001, b"unsupported"));
        } else {
            let mut info = 0u16.to_be_bytes().to_vec();
            info.extend_from_slice(&(rng.next() >> 20).to_be_bytes());
            info.extend_from_slice(&((rng.next() as u16) | 1).to_be_bytes());
            v.extend(reply(7, 3, &info));
            if rng.below(2) == 0 {
                let mut bs = 3u16.to_be_bytes().to_vec();
                for x in [512u32, 4096, 1 << 25] {
                    bs.extend_from_slice(&x.to_be_bytes());
                }
                v.extend(reply(7, 3, &bs));
            }
            v.extend(reply(7, 1, &[]));
            return v;
        }
    }
    v.extend_from_slice(&(rng.next() >> 20).to_be_bytes());
    v.extend_from_slice(&((rng.next() as u16) | 1).to_be_bytes());
    if flags & 2 == 0 {
        v.extend_from_slice(&[0u8; 124]);
    }
    v
}

/// Case generator: pure noise, a valid prefix with noise after it, or a mutated transcript.
fn case(seed: u64) -> (Vec<u8>, bool) {
    let mut rng = Rng::new(seed);
    match rng.below(3) {
        0 => {
            let n = rng.below(300);
            (rng.bytes(n), true)
        }
        1 => {
            let mut v = valid_transcript(&mut rng);
            let keep = rng.below(v.len() + 1);
            v.truncate(keep);
            let n = rng.below(200);
            v.extend(rng.bytes(n));
            (v, false)
        }
        _ => {
            let mut v = valid_transcript(&mut rng);
            for _ in 0..=rng.below(6) {
                if v.is_empty() {
                    break;
                }
                let i = rng.below(v.len());
                match rng.below(4) {
                    0 => v[i] = rng.next() as u8,
                    1 => v[i] ^= 1 << rng.below(8),
                    2 => v.truncate(i),
                    _ => {
                        let b = rng.next() as u8;
                        v.insert(i, b)
                    }
                }
            }
            (v, false)
        }
    }
}

/// In-memory server: its bytes, then end of stream.
struct Script {
    input: Vec<u8>,
    pos: usize,
}
impl Read for Script {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.input.len() - self.pos);
        buf[..n].copy_from_slice(&self.input[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
impl Write for Script {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
impl HandshakeStream for Script {
    fn set_io_timeout(&mut self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {v:?}")),
    )
}

fn check(seed: u64, result: &Result<handshake::Export, HandshakeError>, must_fail: bool) {
    match result {
        Ok(e) => {
            assert!(!must_fail, "seed {seed}: random bytes were accepted: {e:?}");
            assert!(
                e.transmission_flags & 1 != 0,
                "seed {seed}: success without HAS_FLAGS"
            );
            assert!(e.size <= i64::MAX as u64, "seed {seed}: size {}", e.size);
        }
        Err(e) => {
            // Every error renders (Display must not panic either).
            let _ = e.to_string();
        }
    }
}

#[test]
fn random_and_mutated_servers_never_panic() {
    let seeds: Vec<u64> = match env_u64("NBD_FUZZ_SEED") {
        Some(s) => vec![s],
        None => (1..=env_u64("NBD_FUZZ_CASES").unwrap_or(20_000)).collect(),
    };
    let (mut ok, mut err) = (0, 0);
    for seed in seeds {
        let (bytes, must_fail) = case(seed);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let mut s = Script {
                input: bytes.clone(),
                pos: 0,
            };
            let mut o = HandshakeOptions::new("fuzz");
            o.method = if seed % 5 == 0 {
                Method::ExportName
            } else {
                Method::Auto
            };
            handshake::handshake(&mut s, &o)
        }));
        let result = outcome.unwrap_or_else(|_| {
            panic!(
                "seed {seed}: the handshake panicked on {} server bytes {bytes:02x?}",
                bytes.len()
            )
        });
        check(seed, &result, must_fail);
        if result.is_ok() {
            ok += 1
        } else {
            err += 1
        }
    }
    eprintln!("fuzz: {ok} transcripts accepted, {err} rejected with a typed error, no panic");
    assert!(err > 0);
}

#[test]
fn stalling_random_servers_error_within_the_timeout() {
    const TIMEOUT: Duration = Duration::from_millis(100);
    let cases = env_u64("NBD_FUZZ_CASES").map_or(200, |n| n.min(2000));
    let seeds: Vec<u64> = match env_u64("NBD_FUZZ_SEED") {
        Some(s) => vec![s],
        None => (1_000_001..1_000_001 + cases).collect(),
    };
    // Eight at a time: most cases stall until the timeout.
    for chunk in seeds.chunks(8) {
        let handles: Vec<_> = chunk
            .iter()
            .map(|&seed| {
                thread::spawn(move || {
                    let (bytes, must_fail) = case(seed);
                    let (mut client, mut server) = UnixStream::pair().expect("socketpair");
                    let peer = thread::spawn(move || {
                        let _ = server.write_all(&bytes);
                        // Stall: hold the socket open, discard what the client sends,
                        // until the client closes its end.
                        let mut buf = [0u8; 512];
                        while matches!(server.read(&mut buf), Ok(n) if n > 0) {}
                    });
                    let mut o = HandshakeOptions::new("fuzz");
                    o.timeout = TIMEOUT;
                    let t0 = Instant::now();
                    let r =
                        catch_unwind(AssertUnwindSafe(|| handshake::handshake(&mut client, &o)))
                            .unwrap_or_else(|_| panic!("seed {seed}: panicked"));
                    let took = t0.elapsed();
                    check(seed, &r, must_fail);
                    assert!(
                        took < TIMEOUT + Duration::from_millis(900),
                        "seed {seed}: returned after {took:?} with a {TIMEOUT:?} bound"
                    );
                    if let Err(HandshakeError::Timeout { .. }) = r {
                        assert!(
                            took >= TIMEOUT - Duration::from_millis(5),
                            "seed {seed}: early timeout {took:?}"
                        );
                    }
                    drop(client);
                    peer.join().expect("peer");
                })
            })
            .collect();
        for h in handles {
            h.join().expect("a case failed (its seed is printed above)");
        }
    }
}
