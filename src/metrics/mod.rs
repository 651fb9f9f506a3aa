//! Counters and gauges of the daemon, rendered in the Prometheus text
//! exposition format by the metrics thread ([`http`]).
//!
//! Every value is an atomic. Those the reactor thread updates on the request
//! path ([`Counter::bump`]) have that one writer, so an update is a plain
//! load and store, never a lock or a locked instruction; the metrics thread
//! only reads. Backends keep their own per-endpoint counters and report them
//! through [`crate::backend::Backend::endpoint_stats`] at scrape time.

pub mod http;

use crate::backend::EndpointStats;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A value with a single writer thread.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one. Only one thread may write a given counter.
    #[inline]
    pub fn bump(&self) {
        self.add(1);
    }

    /// Adds `n`. Only one thread may write a given counter.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    /// Sets the value (gauges, and counters kept elsewhere).
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// The protocol operations counted by `blobmgr_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Noop,
    GetBlob,
    FetchRange,
    /// A FetchRange without NEED_REPLY.
    Prefetch,
}

/// How a request ended, the `result` label of `blobmgr_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// A FetchRange answered from the cache at once.
    Hit,
    /// A FetchRange that waited for fills and succeeded.
    Miss,
    Failed,
    Mismatch,
    Einval,
    Enoent,
    Eio,
    Eacces,
    Emfile,
}

const OPS: [(Op, &str); 4] = [
    (Op::Noop, "noop"),
    (Op::GetBlob, "get_blob"),
    (Op::FetchRange, "fetch_range"),
    (Op::Prefetch, "prefetch"),
];

const OUTCOMES: [(Outcome, &str); 10] = [
    (Outcome::Ok, "ok"),
    (Outcome::Hit, "hit"),
    (Outcome::Miss, "miss"),
    (Outcome::Failed, "failed"),
    (Outcome::Mismatch, "mismatch"),
    (Outcome::Einval, "einval"),
    (Outcome::Enoent, "enoent"),
    (Outcome::Eio, "eio"),
    (Outcome::Eacces, "eacces"),
    (Outcome::Emfile, "emfile"),
];

/// The outcomes each operation can have, in rendering order.
fn outcomes_of(op: Op) -> &'static [Outcome] {
    use Outcome::*;
    match op {
        Op::Noop => &[Ok],
        Op::GetBlob => &[Ok, Einval, Enoent, Eio, Eacces, Emfile],
        Op::FetchRange | Op::Prefetch => &[Hit, Miss, Failed, Mismatch],
    }
}

/// Upper bounds of the fetch-time histogram buckets, in seconds.
const BUCKETS: [f64; 7] = [0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 60.0];

/// A histogram of FetchRange times with one writer.
#[derive(Default, Debug)]
pub struct Histogram {
    buckets: [Counter; BUCKETS.len()],
    count: Counter,
    sum_ns: Counter,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| secs <= b) {
            self.buckets[i].bump();
        }
        self.count.bump();
        self.sum_ns.add(d.as_nanos().min(u64::MAX as u128) as u64);
    }

    /// Records an observation known to fall in the first bucket without
    /// reading a clock (cache hits are answered within the same read).
    #[inline]
    pub fn observe_instant(&self) {
        self.buckets[0].bump();
        self.count.bump();
    }
}

/// Gauges of the cache and the job table, published by the service.
#[derive(Default, Debug)]
pub struct CacheGauges {
    pub bytes: Counter,
    pub limit_bytes: Counter,
    pub blobs: Counter,
    pub fills_in_flight: Counter,
    pub jobs_in_flight: Counter,
    pub tokens_open: Counter,
    pub evictions_size: Counter,
    pub evictions_min_free: Counter,
    pub evictions_no_space: Counter,
}

/// Counters of the service's work.
#[derive(Default, Debug)]
pub struct WorkCounters {
    /// Requests decoded, counted as they arrive.
    pub received: Counter,
    pub fills_started: Counter,
    /// Fills started ahead of a sequential reader (also in `fills_started`).
    pub readahead_fills: Counter,
    pub fills_failed: Counter,
    pub jobs_timed_out: Counter,
    /// Upgrades whose new binary did not take over (the daemon goes on).
    pub upgrades_failed: Counter,
}

/// Counters of the reactor's connections.
#[derive(Default, Debug)]
pub struct ConnGauges {
    pub open: Counter,
    pub accepted: Counter,
    pub refused: Counter,
    pub closed_malformed: Counter,
    pub accept_backoffs: Counter,
}

/// Every metric of one daemon.
#[derive(Debug)]
pub struct Metrics {
    start: SystemTime,
    requests: [[Counter; OUTCOMES.len()]; OPS.len()],
    /// FetchRange times: `[0]` cached, `[1]` not.
    fetch: [Histogram; 2],
    pub conns: ConnGauges,
    pub cache: CacheGauges,
    pub work: WorkCounters,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            start: SystemTime::now(),
            requests: Default::default(),
            fetch: Default::default(),
            conns: ConnGauges::default(),
            cache: CacheGauges::default(),
            work: WorkCounters::default(),
        }
    }
}

fn op_index(op: Op) -> usize {
    OPS.iter().position(|(o, _)| *o == op).unwrap_or(0)
}

fn outcome_index(r: Outcome) -> usize {
    OUTCOMES.iter().position(|(o, _)| *o == r).unwrap_or(0)
}

impl Metrics {
    /// Counts one request of `op` that ended with `result`.
    #[inline]
    pub fn request(&self, op: Op, result: Outcome) {
        self.requests[op_index(op)][outcome_index(result)].bump();
    }

    /// The count of `op` requests that ended with `result`.
    pub fn requests(&self, op: Op, result: Outcome) -> u64 {
        self.requests[op_index(op)][outcome_index(result)].get()
    }

    /// The FetchRange time histogram, cached or not.
    pub fn fetch_time(&self, cached: bool) -> &Histogram {
        &self.fetch[usize::from(!cached)]
    }

    /// The exposition text, with the backend's endpoints.
    pub fn render(&self, endpoints: &[EndpointStats]) -> String {
        let mut out = String::with_capacity(8192);
        self.render_info(&mut out);
        self.render_requests(&mut out);
        self.render_fetch(&mut out);
        render_endpoints(&mut out, endpoints);
        self.render_gauges(&mut out);
        out
    }

    fn render_info(&self, out: &mut String) {
        let start = self.start.duration_since(UNIX_EPOCH).unwrap_or_default();
        header(
            out,
            "blobmgr_info",
            "gauge",
            "Build and process of this daemon.",
        );
        let _ = writeln!(
            out,
            "blobmgr_info{{version=\"{}\",commit=\"{}\",pid=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION"),
            option_env!("BLOBMGR_GIT_COMMIT").unwrap_or("unknown"),
            std::process::id()
        );
        header(
            out,
            "blobmgr_start_time_seconds",
            "gauge",
            "When the daemon started, in Unix time.",
        );
        let _ = writeln!(out, "blobmgr_start_time_seconds {:.3}", start.as_secs_f64());
    }

    fn render_requests(&self, out: &mut String) {
        header(
            out,
            "blobmgr_requests_total",
            "counter",
            "Protocol requests by operation and result.",
        );
        for (op, op_name) in OPS {
            for &r in outcomes_of(op) {
                let name = OUTCOMES[outcome_index(r)].1;
                let v = self.requests(op, r);
                let _ = writeln!(
                    out,
                    "blobmgr_requests_total{{op=\"{op_name}\",result=\"{name}\"}} {v}"
                );
            }
        }
    }

    fn render_fetch(&self, out: &mut String) {
        header(
            out,
            "blobmgr_fetch_seconds",
            "histogram",
            "Time from a FetchRange to its answer.",
        );
        for (h, cached) in self.fetch.iter().zip(["true", "false"]) {
            let mut cumulative = 0;
            for (b, le) in h.buckets.iter().zip(BUCKETS) {
                cumulative += b.get();
                let _ = writeln!(
                    out,
                    "blobmgr_fetch_seconds_bucket{{cached=\"{cached}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let count = h.count.get();
            let _ = writeln!(
                out,
                "blobmgr_fetch_seconds_bucket{{cached=\"{cached}\",le=\"+Inf\"}} {count}"
            );
            let sum = h.sum_ns.get() as f64 / 1e9;
            let _ = writeln!(
                out,
                "blobmgr_fetch_seconds_sum{{cached=\"{cached}\"}} {sum}"
            );
            let _ = writeln!(
                out,
                "blobmgr_fetch_seconds_count{{cached=\"{cached}\"}} {count}"
            );
        }
    }

    fn render_gauges(&self, out: &mut String) {
        for (name, kind, help, v) in self.conn_rows().into_iter().chain(self.cache_rows()) {
            header(out, name, kind, help);
            let _ = writeln!(out, "{name} {v}");
        }
        header(
            out,
            "blobmgr_evictions_total",
            "counter",
            "Blobs evicted, by cause.",
        );
        let k = &self.cache;
        let causes = [
            ("size", &k.evictions_size),
            ("min_free", &k.evictions_min_free),
            ("enospc", &k.evictions_no_space),
        ];
        for (cause, n) in causes {
            let n = n.get();
            let _ = writeln!(out, "blobmgr_evictions_total{{cause=\"{cause}\"}} {n}");
        }
    }

    /// Families without labels about connections and the daemon itself:
    /// (name, type, help, value).
    fn conn_rows(&self) -> Vec<Row> {
        let (c, w) = (&self.conns, &self.work);
        let uptime = self.start.elapsed().unwrap_or_default().as_secs();
        vec![
            (
                "blobmgr_connections",
                "gauge",
                "Open protocol connections.",
                c.open.get(),
            ),
            (
                "blobmgr_connections_accepted_total",
                "counter",
                "Protocol connections accepted.",
                c.accepted.get(),
            ),
            (
                "blobmgr_connections_refused_total",
                "counter",
                "Connections refused (uid not allowed, --max-conns).",
                c.refused.get(),
            ),
            (
                "blobmgr_connections_malformed_total",
                "counter",
                "Connections closed for a malformed message.",
                c.closed_malformed.get(),
            ),
            (
                "blobmgr_accept_backoffs_total",
                "counter",
                "Times accepting paused for lack of fds.",
                c.accept_backoffs.get(),
            ),
            (
                "blobmgr_requests_received_total",
                "counter",
                "Protocol requests decoded.",
                w.received.get(),
            ),
            (
                "blobmgr_upgrades_failed_total",
                "counter",
                "Upgrades whose new binary did not take over.",
                w.upgrades_failed.get(),
            ),
            (
                "blobmgr_uptime_seconds",
                "gauge",
                "Seconds since the daemon started.",
                uptime,
            ),
        ]
    }

    /// Families without labels about the cache and its jobs.
    fn cache_rows(&self) -> Vec<Row> {
        let (k, w) = (&self.cache, &self.work);
        vec![
            (
                "blobmgr_cache_bytes",
                "gauge",
                "Bytes of blob data in the cache.",
                k.bytes.get(),
            ),
            (
                "blobmgr_cache_limit_bytes",
                "gauge",
                "The cache's size limit (0: none).",
                k.limit_bytes.get(),
            ),
            (
                "blobmgr_cache_blobs",
                "gauge",
                "Blobs open in the cache.",
                k.blobs.get(),
            ),
            (
                "blobmgr_fills_in_flight",
                "gauge",
                "Fill jobs queued or running.",
                k.fills_in_flight.get(),
            ),
            (
                "blobmgr_jobs_in_flight",
                "gauge",
                "Backend and cache jobs queued or running.",
                k.jobs_in_flight.get(),
            ),
            (
                "blobmgr_tokens_open",
                "gauge",
                "Tokens held by connections.",
                k.tokens_open.get(),
            ),
            (
                "blobmgr_fills_started_total",
                "counter",
                "Fill jobs started (each one backend read).",
                w.fills_started.get(),
            ),
            (
                "blobmgr_readahead_fills_total",
                "counter",
                "Fill jobs started ahead of a sequential reader (counted in fills_started too).",
                w.readahead_fills.get(),
            ),
            (
                "blobmgr_fills_failed_total",
                "counter",
                "Fill jobs that failed or timed out.",
                w.fills_failed.get(),
            ),
            (
                "blobmgr_jobs_timed_out_total",
                "counter",
                "Jobs abandoned at --backend-timeout.",
                w.jobs_timed_out.get(),
            ),
        ]
    }
}

/// A family without labels: name, type, help, value.
type Row = (&'static str, &'static str, &'static str, u64);

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Escapes a label value: backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn render_endpoints(out: &mut String, endpoints: &[EndpointStats]) {
    header(
        out,
        "blobmgr_backend_requests_total",
        "counter",
        "Backend calls by endpoint and outcome.",
    );
    for e in endpoints {
        let ep = escape(&e.endpoint);
        let _ = writeln!(
            out,
            "blobmgr_backend_requests_total{{endpoint=\"{ep}\",outcome=\"ok\"}} {}",
            e.ok
        );
        let _ = writeln!(
            out,
            "blobmgr_backend_requests_total{{endpoint=\"{ep}\",outcome=\"error\"}} {}",
            e.errors
        );
    }
    header(
        out,
        "blobmgr_backend_bytes_total",
        "counter",
        "Blob bytes received from each endpoint.",
    );
    for e in endpoints {
        let _ = writeln!(
            out,
            "blobmgr_backend_bytes_total{{endpoint=\"{}\"}} {}",
            escape(&e.endpoint),
            e.bytes
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_render_as_samples() {
        let m = Metrics::default();
        m.request(Op::Noop, Outcome::Ok);
        m.request(Op::Noop, Outcome::Ok);
        m.request(Op::FetchRange, Outcome::Hit);
        m.fetch_time(true).observe_instant();
        m.fetch_time(false).observe(Duration::from_millis(5));
        m.cache.bytes.set(4096);
        let ep = EndpointStats {
            endpoint: "a\"b".into(),
            ok: 3,
            errors: 1,
            bytes: 99,
        };
        let text = m.render(&[ep]);
        assert!(text.contains("blobmgr_requests_total{op=\"noop\",result=\"ok\"} 2\n"));
        assert!(text.contains("blobmgr_requests_total{op=\"fetch_range\",result=\"hit\"} 1\n"));
        assert!(text.contains("blobmgr_fetch_seconds_bucket{cached=\"false\",le=\"0.01\"} 1\n"));
        assert!(text.contains("blobmgr_fetch_seconds_bucket{cached=\"false\",le=\"0.001\"} 0\n"));
        assert!(text.contains("blobmgr_fetch_seconds_count{cached=\"true\"} 1\n"));
        assert!(text.contains("blobmgr_cache_bytes 4096\n"));
        assert!(text.contains("blobmgr_backend_bytes_total{endpoint=\"a\\\"b\"} 99\n"));
    }
}
