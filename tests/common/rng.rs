//! The tests' one random generator and their deterministic data.
//!
//! [`Rng`] is xorshift64: tiny, fast, and reproducible. A test names a
//! *stream* (`Rng::new(17)`); the run's seed, `BLOBMGR_TEST_SEED`, is mixed
//! into every stream so that one variable changes every random choice of a
//! run. Unset (or 0), the streams are exactly the fixed ones the tests were
//! written against. `BLOBMGR_TEST_SEED=random` draws a seed from the clock.
//! When a test panics, each of its generators that is dropped on the way out
//! prints its stream and the run's seed, which is what it takes to replay the
//! run.
//!
//! [`pattern`] is blob data: a pure function of its arguments (it does not
//! follow `BLOBMGR_TEST_SEED`), so a test can regenerate a blob's bytes.

use std::sync::OnceLock;

/// The splitmix64 finaliser: spreads every bit of `x` over the result.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A number written in decimal or as `0x…` hex.
pub fn parse_u64(v: &str) -> Option<u64> {
    let v = v.trim();
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

/// The environment variable `name` as a number (see [`parse_u64`]).
pub fn env_u64(name: &str) -> Option<u64> {
    parse_u64(&std::env::var(name).ok()?)
}

/// This run's seed: `BLOBMGR_TEST_SEED`, 0 when unset. Read once per test
/// binary, so every generator of the run agrees.
pub fn test_seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| match std::env::var("BLOBMGR_TEST_SEED") {
        Err(_) => 0,
        Ok(v) if v.trim() == "random" => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            let s = mix(t ^ u64::from(std::process::id()));
            eprintln!("BLOBMGR_TEST_SEED=random: this run's seed is {s:#x}");
            s
        }
        Ok(v) => parse_u64(&v)
            .unwrap_or_else(|| panic!("BLOBMGR_TEST_SEED={v:?}: want a number or `random`")),
    })
}

/// xorshift64 with a nonzero state (zero is its one fixed point).
pub struct Rng {
    state: u64,
    stream: u64,
    /// Whether a panic while this generator is alive prints its seed.
    report: bool,
}

impl Rng {
    /// Stream `stream` of this run (see the module doc): with
    /// `BLOBMGR_TEST_SEED` unset, the generator starts at `stream` itself.
    pub fn new(stream: u64) -> Rng {
        let seed = test_seed();
        let state = if seed == 0 {
            stream
        } else {
            stream ^ mix(seed)
        };
        Rng {
            state: nonzero(state),
            stream,
            report: true,
        }
    }

    /// Starts exactly at `state`, whatever the run's seed, and prints nothing
    /// on a panic: for callers that derive and report their own seeds (the
    /// fuzzer's cases) and for [`pattern`].
    pub fn exact(state: u64) -> Rng {
        Rng {
            state: nonzero(state),
            stream: state,
            report: false,
        }
    }

    pub fn next(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    /// Uniform enough in `[0, n)`; 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    /// `len` bytes: the little-endian outputs of [`Rng::next`], concatenated.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

impl Drop for Rng {
    fn drop(&mut self) {
        if self.report && std::thread::panicking() {
            eprintln!(
                "test rng: stream {:#x}, BLOBMGR_TEST_SEED={:#x} (set it to replay this run's choices)",
                self.stream,
                test_seed()
            );
        }
    }
}

fn nonzero(state: u64) -> u64 {
    if state == 0 {
        0x9e37_79b9_7f4a_7c15
    } else {
        state
    }
}

/// `len` deterministic pseudo-random bytes named by `seed`: blob contents
/// that any test (or a later step of the same test) can regenerate.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    Rng::exact(seed | 1).bytes(len)
}
