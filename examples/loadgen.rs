//! Load generator for blobmgr, with raw baseline servers measured in the
//! same run.
//!
//! ```text
//! cargo run --release --example loadgen -- MODE [options]
//!
//! noop     --sock PATH [--conns 8] [--depth 1] [--secs 5] [--warmup 1]
//!          [--repeat 1] [--baselines]
//!     N connections, D Noop requests in flight on each. With --baselines,
//!     the two raw servers below run in child processes and are measured
//!     with the same client code, interleaved with the daemon, and the
//!     ratios are printed.
//! fetch    --sock PATH --blob ID [--len 4096] [--conns 8] [--depth 16]
//!          [--secs 5] [--warmup 1] [--repeat 1] [--compare-noop]
//!     FetchRange cache hits: each connection does GetBlob, warms the whole
//!     blob once, then asks for --len-byte ranges all over it. With
//!     --compare-noop the daemon's Noop at the same N x D is measured in
//!     the same run and the ratio printed.
//! cold     --sock PATH --backend-dir DIR --blob FILE [--conns 1] [--depth 8]
//!          [--chunk 1048576] [--repeat 1] [--cp] [--probe]
//!     Cold fill: per repetition a new hard link of DIR/FILE (so the daemon
//!     sees a blob it never cached, while the backend bytes stay in the page
//!     cache); the connections stripe the blob in --chunk pieces, D
//!     FetchRange in flight each, and pread every byte of every chunk
//!     through the received fd. --cp times `cp DIR/FILE` to a new file in
//!     the same run; --probe runs another client doing one Noop every
//!     200 us and reports its latency.
//! idle     --sock PATH [--conns 15000] [--pid PID] [--hold 2]
//!     Opens K idle connections, reports the daemon's RSS (PID from
//!     SO_PEERCRED unless given), then sends one Noop on each and checks
//!     every one is answered.
//! baseline --style tpc|batch --sock PATH
//!     A minimal raw Noop server: `tpc` is a thread per connection doing one
//!     read and one write per request; `batch` is one mio thread answering
//!     every complete header of a read with one write.
//! probe    --sock PATH (--secs S | --until-file FILE) [--interval-us 200]
//!          [--label L] [--connect-timeout 10]
//!     The --probe client of `cold` on its own, against the daemon or a
//!     `baseline` server: one Noop at a time, a pause of --interval-us
//!     after each reply, until S seconds have passed or FILE exists.
//!     Prints "probe: running" once connected (a script starts its load
//!     then), and at the end p50/p99/p999/max in a SUMMARY line.
//! random   --sock PATH --blob ID [--len 4096] [--count 32] [--seed 1]
//!          [--offsets A,B,...] [--check FILE] [--label L]
//!     Cold random reads: GetBlob of ID (a plain id or a blob reference),
//!     then one at a time a FetchRange of --len bytes and a pread of them
//!     through the fd, each pair timed. The offsets are --offsets, or
//!     --count drawn from --seed, each in a different MiB of the blob;
//!     they are printed first ("offsets A,B,...") so a baseline can read
//!     the same ranges. Prints the median and mean per read; --check
//!     compares the bytes read with FILE, after the timed part.
//! ```

use blobmgr::protocol::{self, Code, Header, Reply, Request, HEADER_SIZE};
use nix::sys::socket::{self, ControlMessageOwned, MsgFlags};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(mode) = args.first().cloned() else {
        eprintln!("usage: loadgen noop|fetch|cold|idle|baseline|probe|random [options]; see the source header");
        std::process::exit(2);
    };
    let opts = match Opts::parse(&args[1..]) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(2);
        }
    };
    raise_fd_limit();
    let r = match mode.as_str() {
        "noop" => cmd_noop(&opts),
        "fetch" => cmd_fetch(&opts),
        "cold" => cmd_cold(&opts),
        "idle" => cmd_idle(&opts),
        "baseline" => cmd_baseline(&opts),
        "probe" => cmd_probe(&opts),
        "random" => cmd_random(&opts),
        other => Err(format!("unknown mode {other:?}").into()),
    };
    if let Err(e) = r {
        eprintln!("loadgen {mode}: {e}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------- options

struct Opts {
    kv: HashMap<String, String>,
    flags: Vec<String>,
}

impl Opts {
    fn parse(args: &[String]) -> Res<Opts> {
        let mut kv = HashMap::new();
        let mut flags = Vec::new();
        let mut it = args.iter().peekable();
        while let Some(a) = it.next() {
            let Some(name) = a.strip_prefix("--") else {
                return Err(format!("unexpected argument {a:?}").into());
            };
            if let Some((k, v)) = name.split_once('=') {
                kv.insert(k.to_string(), v.to_string());
            } else if it.peek().is_some_and(|n| !n.starts_with("--")) {
                kv.insert(name.to_string(), it.next().unwrap().clone());
            } else {
                flags.push(name.to_string());
            }
        }
        Ok(Opts { kv, flags })
    }

    fn str(&self, k: &str) -> Res<&str> {
        self.kv
            .get(k)
            .map(String::as_str)
            .ok_or_else(|| format!("--{k} is required").into())
    }

    fn num<T: std::str::FromStr>(&self, k: &str, default: T) -> Res<T> {
        match self.kv.get(k) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{k}: {v:?} is not a number").into()),
        }
    }

    fn flag(&self, k: &str) -> bool {
        self.flags.iter().any(|f| f == k)
    }

    fn sock(&self) -> Res<PathBuf> {
        Ok(PathBuf::from(self.str("sock")?))
    }
}

fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

// -------------------------------------------------------------- histogram

/// Log-linear latency histogram in nanoseconds: 32 sub-buckets per power of
/// two (about 3 % resolution), mergeable across threads.
#[derive(Clone)]
struct Hist {
    b: Vec<u64>,
    n: u64,
}

const SUB: u32 = 5;

impl Hist {
    fn new() -> Hist {
        Hist {
            b: vec![0; (64 - SUB as usize + 1) << SUB],
            n: 0,
        }
    }

    fn idx(v: u64) -> usize {
        if v < (1 << SUB) {
            return v as usize;
        }
        let e = 63 - v.leading_zeros();
        let sub = (v >> (e - SUB)) & ((1 << SUB) - 1);
        (((e - SUB + 1) as u64) << SUB | sub) as usize
    }

    /// Middle of bucket `i`.
    fn value(i: usize) -> u64 {
        if i < (1 << SUB) {
            return i as u64;
        }
        let e = (i >> SUB) as u32 + SUB - 1;
        let sub = (i & ((1 << SUB) - 1)) as u64;
        let lo = ((1 << SUB) + sub) << (e - SUB);
        lo + (1u64 << (e - SUB)) / 2
    }

    fn record(&mut self, d: Duration) {
        self.b[Hist::idx(d.as_nanos() as u64)] += 1;
        self.n += 1;
    }

    fn merge(&mut self, o: &Hist) {
        for (a, b) in self.b.iter_mut().zip(&o.b) {
            *a += b;
        }
        self.n += o.n;
    }

    /// Latency at quantile `q`, in microseconds.
    fn q_us(&self, q: f64) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        let want = ((self.n as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.b.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Hist::value(i) as f64 / 1000.0;
            }
        }
        0.0
    }
}

// ------------------------------------------------------------- statistics

#[derive(Clone)]
struct RunResult {
    ops: u64,
    bytes: u64,
    secs: f64,
    hist: Hist,
    errors: u64,
}

impl RunResult {
    fn ops_s(&self) -> f64 {
        self.ops as f64 / self.secs
    }
    fn mb_s(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e6
    }
    fn line(&self) -> String {
        format!(
            "{:>10.0} ops/s {:>9.1} MB/s  p50 {:>8.1} us  p99 {:>8.1} us  p999 {:>8.1} us  errors {}",
            self.ops_s(),
            self.mb_s(),
            self.hist.q_us(0.5),
            self.hist.q_us(0.99),
            self.hist.q_us(0.999),
            self.errors
        )
    }
}

/// Median, min and max.
fn mmm(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (med, v[0], v[n - 1])
}

fn fmt_mmm(v: Vec<f64>, digits: usize) -> String {
    let (m, lo, hi) = mmm(v);
    format!("{m:.digits$} [{lo:.digits$} .. {hi:.digits$}]")
}

/// Prints the summary of one series of runs: median [min .. max] of ops/s,
/// MB/s and p99, as a `SUMMARY` line the bench script collects.
fn summarize(scenario: &str, server: &str, runs: &[RunResult]) -> f64 {
    let ops: Vec<f64> = runs.iter().map(RunResult::ops_s).collect();
    let (med, _, _) = mmm(ops.clone());
    println!(
        "SUMMARY {scenario} {server}: ops/s {}  MB/s {}  p50 us {}  p99 us {}  p999 us {}  (n={})",
        fmt_mmm(ops, 0),
        fmt_mmm(runs.iter().map(RunResult::mb_s).collect(), 1),
        fmt_mmm(runs.iter().map(|r| r.hist.q_us(0.5)).collect(), 1),
        fmt_mmm(runs.iter().map(|r| r.hist.q_us(0.99)).collect(), 1),
        fmt_mmm(runs.iter().map(|r| r.hist.q_us(0.999)).collect(), 1),
        runs.len()
    );
    med
}

// ------------------------------------------------------- protocol helpers

fn noop_reply_ok(tag: u64, r: &Reply) -> bool {
    tag != 0 && matches!(r, Reply::Noop)
}

/// GetBlob on a blocking stream: returns the token and the received fd.
fn get_blob(s: &UnixStream, id: &str) -> Res<(u64, OwnedFd)> {
    let mut out = Vec::new();
    let req = Request::get_blob(1, id).ok_or("blob id too long")?;
    protocol::encode_request(&mut out, 1, true, &req);
    (&*s).write_all(&out)?;
    let want = HEADER_SIZE + protocol::GET_BLOB_REPLY_SIZE as usize;
    let mut buf = vec![0u8; want];
    let mut have = 0;
    let mut fd = None;
    while have < want {
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 2]);
        let mut iov = [IoSliceMut::new(&mut buf[have..])];
        let msg = socket::recvmsg::<()>(
            s.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        if msg.bytes == 0 {
            return Err("daemon closed the connection during GetBlob".into());
        }
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for f in fds {
                    // SAFETY: the fd was just received and is owned by no one else.
                    let owned = unsafe { OwnedFd::from_raw_fd(f) };
                    if fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
        }
        have += msg.bytes;
    }
    match protocol::decode_reply(&buf)? {
        Some((
            1,
            Reply::GetBlob {
                token, result: 0, ..
            },
            _,
        )) => Ok((token, fd.ok_or("GetBlob reply without an fd")?)),
        Some((_, r, _)) => Err(format!("GetBlob {id}: {r:?}").into()),
        None => Err("short GetBlob reply".into()),
    }
}

/// One blocking request/reply on `s` (no fd expected).
fn call(s: &UnixStream, tag: u64, req: &Request) -> Res<Reply> {
    let mut out = Vec::new();
    protocol::encode_request(&mut out, tag, true, req);
    (&*s).write_all(&out)?;
    let mut buf = Vec::new();
    let mut tmp = [0u8; 256];
    loop {
        if let Some((t, r, _)) = protocol::decode_reply(&buf)? {
            if t != tag {
                return Err(format!("reply tag {t}, expected {tag}").into());
            }
            return Ok(r);
        }
        let n = (&*s).read(&mut tmp)?;
        if n == 0 {
            return Err("daemon closed the connection".into());
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

fn connect(sock: &Path) -> Res<UnixStream> {
    UnixStream::connect(sock).map_err(|e| format!("connect {}: {e}", sock.display()).into())
}

// ------------------------------------------------- closed-loop load (noop, fetch)

#[derive(Clone)]
enum Load {
    Noop,
    /// FetchRange hits of `len` bytes over `[0, span)` of the blob.
    Fetch {
        blob: String,
        len: u64,
    },
}

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// Drives `sock` with `conns` connections keeping `depth` requests in flight
/// on each: the first `depth` go out in one write; after that every read of
/// replies is answered by one write of as many new requests.
fn run_load(
    sock: &Path,
    conns: usize,
    depth: usize,
    warmup: f64,
    secs: f64,
    load: &Load,
) -> Res<RunResult> {
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let barrier = Arc::new(Barrier::new(conns + 1));
    let mut threads = Vec::new();
    for c in 0..conns {
        let (phase, barrier, load) = (phase.clone(), barrier.clone(), load.clone());
        let s = connect(sock)?;
        threads.push(std::thread::spawn(move || {
            let r = client_loop(s, c, depth, &load, &phase, &barrier);
            if r.is_err() {
                // Never leave the others waiting at the barrier.
                phase.store(STOP, Ordering::Relaxed);
            }
            r
        }));
    }
    barrier.wait();
    std::thread::sleep(Duration::from_secs_f64(warmup));
    phase.store(MEASURE, Ordering::Relaxed);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    phase.store(STOP, Ordering::Relaxed);
    let el = t0.elapsed().as_secs_f64();
    let mut total = RunResult {
        ops: 0,
        bytes: 0,
        secs: el,
        hist: Hist::new(),
        errors: 0,
    };
    for t in threads {
        let r = t.join().map_err(|_| "client thread panicked")??;
        total.ops += r.ops;
        total.bytes += r.bytes;
        total.errors += r.errors;
        total.hist.merge(&r.hist);
    }
    Ok(total)
}

fn client_loop(
    s: UnixStream,
    conn: usize,
    depth: usize,
    load: &Load,
    phase: &AtomicU8,
    barrier: &Barrier,
) -> Res<RunResult> {
    let setup = (|| -> Res<(u64, u64)> {
        match load {
            Load::Noop => Ok((0, 0)),
            Load::Fetch { blob, .. } => {
                let (token, fd) = get_blob(&s, blob)?;
                let size = File::from(fd).metadata()?.len();
                let warm = Request::FetchRange {
                    token,
                    start: 0,
                    count: u64::MAX,
                };
                match call(&s, 2, &warm)? {
                    Reply::FetchRange { result: 0, .. } => Ok((token, size)),
                    r => Err(format!("warming FetchRange: {r:?}").into()),
                }
            }
        }
    })();
    barrier.wait();
    let (token, size) = setup?;
    let mut res = RunResult {
        ops: 0,
        bytes: 0,
        secs: 0.0,
        hist: Hist::new(),
        errors: 0,
    };
    let mut sent_at = vec![Instant::now(); depth];
    let mut out = Vec::with_capacity(depth * 48);
    let mut seq: u64 = conn as u64 * 7919;
    let mut encode = |out: &mut Vec<u8>, slot: usize| match load {
        Load::Noop => protocol::encode_request(out, slot as u64 + 1, true, &Request::Noop),
        Load::Fetch { len, .. } => {
            seq = seq.wrapping_add(1);
            let pages = (size.saturating_sub(*len) / 4096).max(1);
            let start = (seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 11) % pages * 4096;
            let req = Request::FetchRange {
                token,
                start,
                count: *len,
            };
            protocol::encode_request(out, slot as u64 + 1, true, &req)
        }
    };
    for slot in 0..depth {
        encode(&mut out, slot);
    }
    let now = Instant::now();
    sent_at.fill(now);
    (&s).write_all(&out)?;
    let mut outstanding = depth;
    let mut buf = vec![0u8; 64 * 1024];
    let mut have = 0;
    while outstanding > 0 {
        let n = (&s).read(&mut buf[have..])?;
        if n == 0 {
            return Err("daemon closed the connection".into());
        }
        have += n;
        let now = Instant::now();
        let ph = phase.load(Ordering::Relaxed);
        out.clear();
        let mut at = 0;
        while let Some((tag, r, used)) = protocol::decode_reply(&buf[at..have])? {
            at += used;
            let slot = (tag - 1) as usize;
            if slot >= depth {
                return Err(format!("unexpected reply tag {tag}").into());
            }
            let ok = match (&r, load) {
                (Reply::FetchRange { result, count, .. }, Load::Fetch { .. }) => {
                    if ph == MEASURE {
                        res.bytes += count;
                    }
                    *result == 0
                }
                _ => noop_reply_ok(tag, &r),
            };
            if ph == MEASURE {
                res.ops += 1;
                res.hist.record(now - sent_at[slot]);
                res.errors += u64::from(!ok);
            }
            if ph == STOP {
                outstanding -= 1;
            } else {
                encode(&mut out, slot);
                sent_at[slot] = now;
            }
        }
        buf.copy_within(at..have, 0);
        have -= at;
        if !out.is_empty() {
            (&s).write_all(&out)?;
        }
    }
    Ok(res)
}

// -------------------------------------------------------- baseline servers

/// A baseline server in a child process, killed on drop.
struct ChildServer {
    child: Child,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl ChildServer {
    fn start(style: &str) -> Res<ChildServer> {
        let dir = tempfile::tempdir()?;
        let sock = dir.path().join(format!("{style}.sock"));
        let child = Command::new(std::env::current_exe()?)
            .args(["baseline", "--style", style, "--sock"])
            .arg(&sock)
            .stdin(Stdio::null())
            .spawn()?;
        connect_within(&sock, Duration::from_secs(10))
            .map_err(|e| format!("baseline {style} did not start: {e}"))?;
        Ok(ChildServer {
            child,
            sock,
            _dir: dir,
        })
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cmd_baseline(o: &Opts) -> Res<()> {
    let sock = o.sock()?;
    let _ = std::fs::remove_file(&sock);
    match o.str("style")? {
        "tpc" => baseline_tpc(&sock),
        "batch" => baseline_batch(&sock),
        s => Err(format!("unknown --style {s:?} (tpc or batch)").into()),
    }
}

/// The reply to a Noop header, or `None` if the header is not a Noop.
fn noop_answer(h: &[u8; HEADER_SIZE]) -> Option<[u8; HEADER_SIZE]> {
    let h = Header::decode(h).ok()?;
    if h.code != Code::Noop || h.size != 0 {
        return None;
    }
    let mut b = [0u8; HEADER_SIZE];
    Header {
        tag: h.tag,
        code: Code::Noop,
        flags: protocol::VERSION | protocol::FLAG_REPLY,
        size: 0,
    }
    .encode(&mut b);
    Some(b)
}

/// Thread per connection: one read of a header, one write of its reply.
fn baseline_tpc(sock: &Path) -> Res<()> {
    let l = UnixListener::bind(sock)?;
    for s in l.incoming() {
        let mut s = match s {
            Ok(s) => s,
            Err(e) if e.raw_os_error() == Some(nix::libc::EMFILE) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || {
                let mut h = [0u8; HEADER_SIZE];
                while s.read_exact(&mut h).is_ok() {
                    let Some(r) = noop_answer(&h) else { return };
                    if s.write_all(&r).is_err() {
                        return;
                    }
                }
            })?;
    }
    Ok(())
}

/// One mio thread: each readiness edge is answered by reading the socket
/// (until a short read) and one write of the replies to every complete
/// header read.
fn baseline_batch(sock: &Path) -> Res<()> {
    use mio::net::{UnixListener as MioListener, UnixStream as MioStream};
    use mio::{Events, Interest, Poll, Token};
    let mut l = MioListener::bind(sock)?;
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut l, Token(usize::MAX), Interest::READABLE)?;
    let mut conns: slab::Slab<(MioStream, Vec<u8>)> = slab::Slab::new();
    let mut events = Events::with_capacity(1024);
    let mut scratch = vec![0u8; 64 * 1024];
    let mut out = Vec::with_capacity(64 * 1024);
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        for ev in events.iter() {
            if ev.token().0 == usize::MAX {
                loop {
                    match l.accept() {
                        Ok((mut s, _)) => {
                            let e = conns.vacant_entry();
                            poll.registry()
                                .register(&mut s, Token(e.key()), Interest::READABLE)?;
                            e.insert((s, Vec::new()));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => break,
                    }
                }
                continue;
            }
            let key = ev.token().0;
            let mut close = false;
            if let Some((s, tail)) = conns.get_mut(key) {
                loop {
                    match s.read(&mut scratch) {
                        Ok(0) => {
                            close = true;
                            break;
                        }
                        Ok(n) => {
                            out.clear();
                            let data: &[u8] = if tail.is_empty() {
                                &scratch[..n]
                            } else {
                                tail.extend_from_slice(&scratch[..n]);
                                tail
                            };
                            let mut at = 0;
                            while let Some(h) = data[at..].first_chunk::<HEADER_SIZE>() {
                                match noop_answer(h) {
                                    Some(r) => out.extend_from_slice(&r),
                                    None => {
                                        close = true;
                                        break;
                                    }
                                }
                                at += HEADER_SIZE;
                            }
                            let rest = data[at..].to_vec();
                            *tail = rest;
                            if !out.is_empty() && write_all_nb(s, &out).is_err() {
                                close = true;
                            }
                            // A short read drained the socket: the next
                            // bytes bring a new edge.
                            if close || n < scratch.len() {
                                break;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => {
                            close = true;
                            break;
                        }
                    }
                }
            }
            if close {
                if let Some((mut s, _)) = conns.try_remove(key) {
                    let _ = poll.registry().deregister(&mut s);
                }
            }
        }
    }
}

/// Writes all of `b` to a nonblocking socket, waiting in poll(2) when full.
fn write_all_nb(s: &mut mio::net::UnixStream, mut b: &[u8]) -> io::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    while !b.is_empty() {
        match s.write(b) {
            Ok(n) => b = &b[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLOUT)];
                poll(&mut fds, PollTimeout::from(1000u16))?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ modes

fn cmd_noop(o: &Opts) -> Res<()> {
    let sock = o.sock()?;
    let conns = o.num("conns", 8usize)?;
    let depth = o.num("depth", 1usize)?;
    let secs = o.num("secs", 5.0f64)?;
    let warmup = o.num("warmup", 1.0f64)?;
    let repeat = o.num("repeat", 1usize)?;
    let scenario = format!("noop-{conns}x{depth}");
    let mut servers: Vec<(String, PathBuf, Option<ChildServer>)> =
        vec![("daemon".into(), sock.clone(), None)];
    if o.flag("baselines") {
        for style in ["tpc", "batch"] {
            let c = ChildServer::start(style)?;
            servers.push((format!("baseline-{style}"), c.sock.clone(), Some(c)));
        }
    }
    let mut results: Vec<Vec<RunResult>> = vec![Vec::new(); servers.len()];
    for rep in 1..=repeat {
        for (i, (name, path, _)) in servers.iter().enumerate() {
            let r = run_load(path, conns, depth, warmup, secs, &Load::Noop)?;
            println!("run {scenario} {name:<15} rep {rep}: {}", r.line());
            results[i].push(r);
        }
    }
    let meds: Vec<f64> = servers
        .iter()
        .zip(&results)
        .map(|((name, _, _), r)| summarize(&scenario, name, r))
        .collect();
    for (i, (name, _, _)) in servers.iter().enumerate().skip(1) {
        println!(
            "RATIO {scenario} daemon/{name}: {:.2} (medians {:.0} / {:.0} ops/s)",
            meds[0] / meds[i],
            meds[0],
            meds[i]
        );
    }
    Ok(())
}

fn cmd_fetch(o: &Opts) -> Res<()> {
    let sock = o.sock()?;
    let blob = o.str("blob")?.to_string();
    let len = o.num("len", 4096u64)?;
    let conns = o.num("conns", 8usize)?;
    let depth = o.num("depth", 16usize)?;
    let secs = o.num("secs", 5.0f64)?;
    let warmup = o.num("warmup", 1.0f64)?;
    let repeat = o.num("repeat", 1usize)?;
    let scenario = format!("fetch-{conns}x{depth}");
    let mut fetch = Vec::new();
    let mut noop = Vec::new();
    for rep in 1..=repeat {
        let r = run_load(
            &sock,
            conns,
            depth,
            warmup,
            secs,
            &Load::Fetch {
                blob: blob.clone(),
                len,
            },
        )?;
        println!("run {scenario} daemon-fetch    rep {rep}: {}", r.line());
        fetch.push(r);
        if o.flag("compare-noop") {
            let r = run_load(&sock, conns, depth, warmup, secs, &Load::Noop)?;
            println!("run {scenario} daemon-noop     rep {rep}: {}", r.line());
            noop.push(r);
        }
    }
    let f = summarize(&scenario, "daemon-fetch", &fetch);
    if !noop.is_empty() {
        let n = summarize(&scenario, "daemon-noop", &noop);
        println!(
            "RATIO {scenario} fetch/noop: {:.2} (medians {f:.0} / {n:.0} ops/s)",
            f / n
        );
    }
    Ok(())
}

/// Makes a new name for `dir/file` that the daemon has never seen.
fn fresh_link(dir: &Path, file: &str, tag: &str) -> Res<String> {
    let id = format!("{file}.{tag}.{}", std::process::id());
    let p = dir.join(&id);
    let _ = std::fs::remove_file(&p);
    std::fs::hard_link(dir.join(file), &p)?;
    Ok(id)
}

struct ColdResult {
    bytes: u64,
    secs: f64,
    fetch: Hist,
    probe: Option<Hist>,
    errors: u64,
}

fn cold_once(
    sock: &Path,
    backend_file: &Path,
    id: &str,
    conns: usize,
    depth: usize,
    chunk: u64,
    probe: bool,
) -> Res<ColdResult> {
    let size = std::fs::metadata(backend_file)?.len();
    let chunks = size.div_ceil(chunk);
    let barrier = Arc::new(Barrier::new(conns + 1));
    let stop = Arc::new(AtomicU8::new(0));
    let mut threads = Vec::new();
    for c in 0..conns {
        let s = connect(sock)?;
        let barrier = barrier.clone();
        let id = id.to_string();
        let src = File::open(backend_file)?;
        threads.push(std::thread::spawn(move || -> Res<(u64, Hist, u64)> {
            let setup = get_blob(&s, &id);
            barrier.wait();
            let (token, fd) = setup?;
            let f = File::from(fd);
            let mut hist = Hist::new();
            let mut errors = 0;
            let mut bytes = 0;
            let mut mine = (c as u64..chunks).step_by(conns);
            let mut sent_at: HashMap<u64, Instant> = HashMap::new();
            let mut out = Vec::new();
            let mut buf = vec![0u8; chunk as usize];
            let mut check = vec![0u8; 4096];
            let mut send = |out: &mut Vec<u8>, sent_at: &mut HashMap<u64, Instant>| {
                if let Some(k) = mine.next() {
                    let req = Request::FetchRange {
                        token,
                        start: k * chunk,
                        count: chunk,
                    };
                    protocol::encode_request(out, k + 1, true, &req);
                    sent_at.insert(k + 1, Instant::now());
                }
            };
            for _ in 0..depth {
                send(&mut out, &mut sent_at);
            }
            (&s).write_all(&out)?;
            let mut rbuf = vec![0u8; 4096];
            let mut have = 0;
            while !sent_at.is_empty() {
                let n = (&s).read(&mut rbuf[have..])?;
                if n == 0 {
                    return Err("daemon closed the connection".into());
                }
                have += n;
                let now = Instant::now();
                let mut at = 0;
                out.clear();
                while let Some((tag, r, used)) = protocol::decode_reply(&rbuf[at..have])? {
                    at += used;
                    let t = sent_at.remove(&tag).ok_or("unexpected reply tag")?;
                    hist.record(now - t);
                    let start = (tag - 1) * chunk;
                    let want = chunk.min(size - start);
                    match r {
                        Reply::FetchRange {
                            result: 0, count, ..
                        } if count == want => {
                            // Read every byte through the fd; spot-check the
                            // first page against the backend file.
                            f.read_exact_at(&mut buf[..want as usize], start)?;
                            let p = (want as usize).min(4096);
                            src.read_exact_at(&mut check[..p], start)?;
                            if check[..p] != buf[..p] {
                                return Err(format!("wrong bytes at {start}").into());
                            }
                            bytes += want;
                        }
                        _ => errors += 1,
                    }
                    send(&mut out, &mut sent_at);
                }
                rbuf.copy_within(at..have, 0);
                have -= at;
                if !out.is_empty() {
                    (&s).write_all(&out)?;
                }
            }
            Ok((bytes, hist, errors))
        }));
    }
    let prober = if probe {
        let s = connect(sock)?;
        let stop = stop.clone();
        Some(std::thread::spawn(move || -> Res<Hist> {
            probe_loop(&s, PROBE_INTERVAL, || stop.load(Ordering::Relaxed) != 0)
        }))
    } else {
        None
    };
    barrier.wait();
    let t0 = Instant::now();
    let mut res = ColdResult {
        bytes: 0,
        secs: 0.0,
        fetch: Hist::new(),
        probe: None,
        errors: 0,
    };
    let mut first_err = None;
    for t in threads {
        match t.join().map_err(|_| "client thread panicked")? {
            Ok((b, h, e)) => {
                res.bytes += b;
                res.fetch.merge(&h);
                res.errors += e;
            }
            Err(e) => first_err = first_err.or(Some(e)),
        }
    }
    res.secs = t0.elapsed().as_secs_f64();
    stop.store(1, Ordering::Relaxed);
    if let Some(p) = prober {
        res.probe = Some(p.join().map_err(|_| "probe thread panicked")??);
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    if res.bytes != size {
        return Err(format!("read {} of {size} bytes ({} errors)", res.bytes, res.errors).into());
    }
    Ok(res)
}

/// How long the Noop prober sleeps after each reply.
const PROBE_INTERVAL: Duration = Duration::from_micros(200);

/// The responsiveness probe: one Noop at a time on `s`, then a pause of
/// `interval`, until `stop()` is true; the latency of every Noop.
fn probe_loop(s: &UnixStream, interval: Duration, mut stop: impl FnMut() -> bool) -> Res<Hist> {
    let mut h = Hist::new();
    let mut tag = 0u64;
    while !stop() {
        tag += 1;
        let t = Instant::now();
        match call(s, tag, &Request::Noop)? {
            Reply::Noop => h.record(t.elapsed()),
            r => return Err(format!("probe: {r:?}").into()),
        }
        std::thread::sleep(interval);
    }
    Ok(h)
}

/// Times `cp src dst` (dst a new file next to src, removed afterwards),
/// then fdatasync of the copy: returns both durations.
fn time_cp(src: &Path) -> Res<(f64, f64)> {
    let dst = src.with_extension(format!("cp.{}", std::process::id()));
    let t = Instant::now();
    let st = Command::new("cp").arg(src).arg(&dst).status()?;
    let secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let synced = File::open(&dst).and_then(|f| f.sync_data());
    let sync_secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&dst);
    if !st.success() {
        return Err(format!("cp failed: {st}").into());
    }
    synced?;
    Ok((secs, sync_secs))
}

fn cmd_cold(o: &Opts) -> Res<()> {
    let sock = o.sock()?;
    let dir = PathBuf::from(o.str("backend-dir")?);
    let file = o.str("blob")?;
    let conns = o.num("conns", 1usize)?;
    let depth = o.num("depth", 8usize)?;
    let chunk = o.num("chunk", 1u64 << 20)?;
    let repeat = o.num("repeat", 1usize)?;
    let probe = o.flag("probe");
    let label = o.kv.get("label").cloned().unwrap_or_default();
    let src = dir.join(file);
    let size = std::fs::metadata(&src)?.len();
    // The backend bytes come from the page cache in every run, as for cp.
    std::io::copy(&mut File::open(&src)?, &mut io::sink())?;
    let scenario = format!("cold-{conns}x{depth}{label}");
    let (mut mbs, mut cps, mut p99s, mut fetch_p99) = (vec![], vec![], vec![], vec![]);
    let mut cps_sync = vec![];
    for rep in 1..=repeat {
        let id = fresh_link(&dir, file, &format!("r{rep}{label}"))?;
        // Start from no dirty pages, so no run pays for an earlier one's
        // writeback.
        nix::unistd::sync();
        let r = cold_once(&sock, &src, &id, conns, depth, chunk, probe);
        let _ = std::fs::remove_file(dir.join(&id));
        let r = r?;
        let mb = r.bytes as f64 / r.secs / 1e6;
        mbs.push(mb);
        fetch_p99.push(r.fetch.q_us(0.99));
        let mut line = format!(
            "run {scenario} daemon rep {rep}: {} MiB in {:.3} s = {mb:.1} MB/s  FetchRange p50 {:.0} us p99 {:.0} us  errors {}",
            r.bytes >> 20,
            r.secs,
            r.fetch.q_us(0.5),
            r.fetch.q_us(0.99),
            r.errors
        );
        if let Some(p) = &r.probe {
            p99s.push(p.q_us(0.99));
            line += &format!(
                "  probe Noop n={} p50 {:.1} us p99 {:.1} us p999 {:.1} us max {:.1} us",
                p.n,
                p.q_us(0.5),
                p.q_us(0.99),
                p.q_us(0.999),
                p.q_us(1.0)
            );
        }
        println!("{line}");
        if o.flag("cp") {
            nix::unistd::sync();
            let (s, sync) = time_cp(&src)?;
            let mb = size as f64 / s / 1e6;
            let mb_sync = size as f64 / (s + sync) / 1e6;
            println!(
                "run {scenario} cp     rep {rep}: {size} bytes in {s:.3} s = {mb:.1} MB/s; with fdatasync of the copy (+{sync:.3} s) {mb_sync:.1} MB/s"
            );
            cps.push(mb);
            cps_sync.push(mb_sync);
        }
    }
    let (m, _, _) = mmm(mbs.clone());
    println!(
        "SUMMARY {scenario} daemon: MB/s {}  FetchRange p99 us {}  (n={repeat})",
        fmt_mmm(mbs, 1),
        fmt_mmm(fetch_p99, 0)
    );
    if !p99s.is_empty() {
        println!("SUMMARY {scenario} probe: Noop p99 us {}", fmt_mmm(p99s, 1));
    }
    if !cps.is_empty() {
        let (c, _, _) = mmm(cps.clone());
        println!("SUMMARY {scenario} cp: MB/s {}", fmt_mmm(cps, 1));
        println!(
            "RATIO {scenario} daemon/cp: {:.2} (medians {m:.1} / {c:.1} MB/s)",
            m / c
        );
        let (cs, _, _) = mmm(cps_sync.clone());
        println!(
            "SUMMARY {scenario} cp+fdatasync: MB/s {}",
            fmt_mmm(cps_sync, 1)
        );
        println!(
            "RATIO {scenario} daemon/cp+fdatasync: {:.2} (medians {m:.1} / {cs:.1} MB/s; the daemon syncs a blob's data once it is complete)",
            m / cs
        );
    }
    Ok(())
}

fn status_kib(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn cmd_idle(o: &Opts) -> Res<()> {
    let sock = o.sock()?;
    let k = o.num("conns", 15_000usize)?;
    let hold = o.num("hold", 2.0f64)?;
    let first = connect(&sock)?;
    let pid = match o.kv.get("pid") {
        Some(p) => p.parse()?,
        None => socket::getsockopt(&first, socket::sockopt::PeerCredentials)?.pid(),
    };
    let before = status_kib(pid, "VmRSS:");
    let t = Instant::now();
    let mut conns = vec![first];
    while conns.len() < k {
        conns.push(connect(&sock).map_err(|e| format!("connection {}: {e}", conns.len()))?);
    }
    let connect_s = t.elapsed().as_secs_f64();
    // Let the daemon accept and register every one.
    std::thread::sleep(Duration::from_secs_f64(hold));
    let rss = status_kib(pid, "VmRSS:");
    let hwm = status_kib(pid, "VmHWM:");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    println!(
        "run idle-{k}: pid {pid}  {k} connections opened in {connect_s:.2} s  daemon fds {fds}  VmRSS {before} KiB before, {rss} KiB with {k} idle (VmHWM {hwm} KiB)  {:.0} bytes/conn",
        (rss.saturating_sub(before) * 1024) as f64 / k as f64
    );
    // One Noop on every connection, all sent before any reply is read.
    let t = Instant::now();
    let mut msg = Vec::new();
    for (i, s) in conns.iter().enumerate() {
        msg.clear();
        protocol::encode_request(&mut msg, i as u64 + 1, true, &Request::Noop);
        (&*s).write_all(&msg)?;
    }
    let mut answered = 0;
    let mut hist = Hist::new();
    for (i, s) in conns.iter().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut b = [0u8; HEADER_SIZE];
        if (&*s).read_exact(&mut b).is_ok() {
            if let Ok(Some((tag, Reply::Noop, _))) = protocol::decode_reply(&b) {
                if tag == i as u64 + 1 {
                    answered += 1;
                }
            }
        }
        if i % 100 == 0 {
            hist.record(t.elapsed());
        }
    }
    let rss_after = status_kib(pid, "VmRSS:");
    println!(
        "SUMMARY idle-{k}: daemon VmRSS {rss} KiB ({:.1} MiB) with {k} idle connections; {answered}/{k} answered a Noop in {:.2} s; VmRSS after {rss_after} KiB",
        rss as f64 / 1024.0,
        t.elapsed().as_secs_f64()
    );
    if answered != k {
        return Err(format!("only {answered} of {k} connections answered").into());
    }
    Ok(())
}

/// Connects to `sock`, retrying until `within` has passed (the server may
/// still be starting).
fn connect_within(sock: &Path, within: Duration) -> Res<UnixStream> {
    let deadline = Instant::now() + within;
    loop {
        match UnixStream::connect(sock) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("connect {}: {e}", sock.display()).into())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// The `cold --probe` prober on its own, against any Noop server (the
/// daemon or a `baseline`), so a script can run it next to load that
/// loadgen does not generate.
fn cmd_probe(o: &Opts) -> Res<()> {
    let sock = o.sock()?;
    let interval = Duration::from_micros(o.num("interval-us", 200u64)?);
    let secs = match o.kv.get("secs") {
        Some(v) => Some(
            v.parse::<f64>()
                .map_err(|_| format!("--secs: {v:?} is not a number"))?,
        ),
        None => None,
    };
    let until = o.kv.get("until-file").map(PathBuf::from);
    if secs.is_none() && until.is_none() {
        return Err("--secs or --until-file is required".into());
    }
    let label = o.kv.get("label").cloned().unwrap_or_default();
    let within = Duration::from_secs_f64(o.num("connect-timeout", 10.0f64)?);
    let s = connect_within(&sock, within)?;
    // A script waits for this line before it starts the load.
    println!("probe{label}: running against {}", sock.display());
    let t0 = Instant::now();
    let end = secs.map(|s| t0 + Duration::from_secs_f64(s));
    // A stat of the stop file every 10 ms, not after every Noop.
    let mut next_check = t0;
    let h = probe_loop(&s, interval, || {
        let now = Instant::now();
        if end.is_some_and(|e| now >= e) {
            return true;
        }
        match &until {
            Some(f) if now >= next_check => {
                next_check = now + Duration::from_millis(10);
                f.exists()
            }
            _ => false,
        }
    })?;
    println!(
        "SUMMARY probe{label}: Noop p50 us {:.1}  p99 us {:.1}  p999 us {:.1}  max us {:.1}  (n={} in {:.2} s)",
        h.q_us(0.5),
        h.q_us(0.99),
        h.q_us(0.999),
        h.q_us(1.0),
        h.n,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// splitmix64: a small deterministic generator, so the same seed gives the
/// same offsets on every machine.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `count` offsets of `len`-byte reads in a blob of `size` bytes, each in a
/// different MiB: the MiBs are spread evenly over the blob (one drawn from
/// each of `count` equal stretches), the offset within the MiB is drawn
/// too (4 KiB-aligned, the read inside the MiB), and the order is shuffled
/// so the reads never look sequential.
fn scattered_offsets(size: u64, len: u64, count: usize, seed: u64) -> Res<Vec<u64>> {
    const MIB: u64 = 1 << 20;
    let mibs = size / MIB;
    if len == 0 || len > MIB || count == 0 || count as u64 > mibs {
        return Err(format!(
            "cannot place {count} reads of {len} bytes in different MiBs of a {size}-byte blob"
        )
        .into());
    }
    let mut rng = seed;
    let slots = (MIB - len) / 4096 + 1;
    let mut v: Vec<u64> = (0..count as u64)
        .map(|i| {
            let lo = i * mibs / count as u64;
            let hi = (i + 1) * mibs / count as u64;
            let mib = lo + splitmix(&mut rng) % (hi - lo);
            mib * MIB + splitmix(&mut rng) % slots * 4096
        })
        .collect();
    for i in (1..v.len()).rev() {
        let j = (splitmix(&mut rng) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    Ok(v)
}

/// Cold random reads, one at a time on one connection: each is a
/// FetchRange of `len` bytes and a pread of them through the fd, timed
/// together, as an application reading a lazily pulled image would.
fn cmd_random(o: &Opts) -> Res<()> {
    let sock = o.sock()?;
    let blob = o.str("blob")?;
    let len = o.num("len", 4096u64)?;
    let label = o.kv.get("label").cloned().unwrap_or_default();
    let s = connect(&sock)?;
    let t = Instant::now();
    let (token, fd) = get_blob(&s, blob)?;
    let get_blob_ms = t.elapsed().as_secs_f64() * 1e3;
    let f = File::from(fd);
    let size = f.metadata()?.len();
    let offsets = match o.kv.get("offsets") {
        Some(list) => list
            .split(',')
            .map(|x| x.trim().parse::<u64>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| format!("--offsets: {list:?} is not a list of numbers"))?,
        None => scattered_offsets(size, len, o.num("count", 32usize)?, o.num("seed", 1u64)?)?,
    };
    if let Some(&bad) = offsets.iter().find(|&&x| x + len > size) {
        return Err(format!("offset {bad} + {len} is past the blob's end ({size})").into());
    }
    // Printed first, so a baseline can read exactly the same ranges.
    let list: Vec<String> = offsets.iter().map(u64::to_string).collect();
    println!("offsets {}", list.join(","));
    let mut buf = vec![0u8; len as usize * offsets.len()];
    let (mut reads, mut fetches) = (Hist::new(), Hist::new());
    let (mut read_us, mut fetch_us) = (Vec::new(), Vec::new());
    for (i, (&off, out)) in offsets.iter().zip(buf.chunks_mut(len as usize)).enumerate() {
        let req = Request::FetchRange {
            token,
            start: off,
            count: len,
        };
        let t = Instant::now();
        let r = call(&s, i as u64 + 1, &req)?;
        let fetched = t.elapsed();
        match r {
            Reply::FetchRange {
                result: 0, count, ..
            } if count == len => {}
            r => return Err(format!("FetchRange at {off}: {r:?}").into()),
        }
        f.read_exact_at(out, off)?;
        let read = t.elapsed();
        reads.record(read);
        fetches.record(fetched);
        read_us.push(read.as_secs_f64() * 1e6);
        fetch_us.push(fetched.as_secs_f64() * 1e6);
    }
    if let Some(check) = o.kv.get("check") {
        let src = File::open(check)?;
        let mut want = vec![0u8; len as usize];
        for (&off, got) in offsets.iter().zip(buf.chunks(len as usize)) {
            src.read_exact_at(&mut want, off)?;
            if want != got {
                return Err(format!("wrong bytes at {off} (compared with {check})").into());
            }
        }
    }
    let n = offsets.len();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (med, lo, hi) = mmm(read_us.clone());
    println!(
        "run random{label}: GetBlob {get_blob_ms:.1} ms; {n} reads of {len} bytes: median {med:.0} us [{lo:.0} .. {hi:.0}]  mean {:.0} us  p99 {:.0} us; FetchRange alone: median {:.0} us  mean {:.0} us{}",
        mean(&read_us),
        reads.q_us(0.99),
        fetches.q_us(0.5),
        mean(&fetch_us),
        if o.kv.contains_key("check") { "; bytes checked" } else { "" }
    );
    println!(
        "SUMMARY random{label} daemon: read median us {med:.1}  mean us {:.1}  (n={n})",
        mean(&read_us)
    );
    Ok(())
}
