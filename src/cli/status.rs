//! `blobmgr status [--sock PATH | --metrics ADDR]`: a short human summary of
//! a running daemon, read from its Prometheus metrics.
//!
//! Every daemon serves `GET /metrics` on the Unix socket `<sock>.metrics`
//! whether or not it was started with `--metrics`, so `status --sock PATH`
//! reads `PATH.metrics`; `--metrics HOST:PORT` or `--metrics unix:PATH`
//! reads the endpoint given instead. The text is parsed with the
//! `prometheus-parse` crate; a family the daemon does not export shows as
//! `?`, so an older or newer daemon still gets a summary.

use crate::cli::args::{StatusArgs, DEFAULT_SOCK, SOCK_ENV};
use crate::cli::http::{self, Endpoint};
use crate::cli::size::human;
use crate::cli::{emit, Fail};
use prometheus_parse::{Labels, Scrape, Value};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

pub fn run(a: StatusArgs) -> Result<(), Fail> {
    let ep = match &a.metrics {
        Some(m) => Endpoint::parse(m).map_err(|e| Fail(format!("--metrics {e}")))?,
        None => {
            let sock = a
                .sock
                .or_else(|| std::env::var_os(SOCK_ENV).map(PathBuf::from))
                .unwrap_or_else(|| DEFAULT_SOCK.into());
            let mut path = sock.into_os_string();
            path.push(".metrics");
            Endpoint::Unix(path.into())
        }
    };
    let body = http::get(&ep, "/metrics")
        .map_err(|e| Fail(format!("status: GET /metrics from {ep}: {e}")))?;
    let text = String::from_utf8_lossy(&body);
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .map_err(|e| Fail(format!("status: metrics from {ep}: {e}")))?;
    if !scrape
        .samples
        .iter()
        .any(|s| s.metric.starts_with("blobmgr_"))
    {
        return Err(Fail(format!("status: {ep} has no blobmgr metrics")));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    emit(render(&Summary::of(&scrape), now).as_bytes())
}

/// Who the daemon is.
#[derive(Debug, Default)]
struct Info {
    version: Option<String>,
    commit: Option<String>,
    pid: Option<String>,
    start_time: Option<f64>,
}

/// The cache and what the clients get from it.
#[derive(Debug, Default)]
struct Cache {
    bytes: Option<f64>,
    limit: Option<f64>,
    blobs: Option<f64>,
    hits: f64,
    misses: f64,
    fills_in_flight: Option<f64>,
    evictions: Option<f64>,
}

/// One backend endpoint's counters.
#[derive(Debug, Default)]
struct Backend {
    ok: f64,
    errors: f64,
    bytes: f64,
}

/// What `status` prints, taken from one scrape.
#[derive(Debug, Default)]
struct Summary {
    info: Info,
    connections: Option<f64>,
    cache: Cache,
    backends: BTreeMap<String, Backend>,
}

/// A label's value. The crate keeps keys as written; a space after a comma
/// would stay in front of the next key, so keys are compared trimmed.
fn label<'a>(l: &'a Labels, name: &str) -> Option<&'a str> {
    l.get(name).or_else(|| {
        l.iter()
            .find(|(k, _)| k.trim() == name)
            .map(|(_, v)| v.as_str())
    })
}

/// The samples of a counter, gauge or untyped family, with their labels.
fn samples<'a>(s: &'a Scrape, name: &'a str) -> impl Iterator<Item = (&'a Labels, f64)> + 'a {
    s.samples
        .iter()
        .filter(move |x| x.metric == name)
        .filter_map(|x| match x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some((&x.labels, v)),
            _ => None,
        })
}

/// The sum of a family's samples, `None` when it has none.
fn total(s: &Scrape, name: &str) -> Option<f64> {
    samples(s, name).map(|(_, v)| v).reduce(|a, b| a + b)
}

impl Summary {
    fn of(s: &Scrape) -> Summary {
        let mut sum = Summary {
            connections: total(s, "blobmgr_connections"),
            ..Summary::default()
        };
        if let Some((l, _)) = samples(s, "blobmgr_info").next() {
            let get = |k| label(l, k).map(str::to_string);
            sum.info.version = get("version");
            sum.info.commit = get("commit").filter(|c| !c.is_empty() && c != "unknown");
            sum.info.pid = get("pid");
        }
        sum.info.start_time = total(s, "blobmgr_start_time_seconds");
        let c = &mut sum.cache;
        c.bytes = total(s, "blobmgr_cache_bytes");
        c.limit = total(s, "blobmgr_cache_limit_bytes");
        c.blobs = total(s, "blobmgr_cache_blobs");
        c.fills_in_flight = total(s, "blobmgr_fills_in_flight");
        c.evictions = total(s, "blobmgr_evictions_total");
        for (l, v) in samples(s, "blobmgr_requests_total") {
            match (label(l, "op"), label(l, "result")) {
                (Some("fetch_range"), Some("hit")) => c.hits += v,
                (Some("fetch_range"), Some("miss")) => c.misses += v,
                _ => {}
            }
        }
        for (l, v) in samples(s, "blobmgr_backend_requests_total") {
            let b = sum
                .backends
                .entry(label(l, "endpoint").unwrap_or("?").to_string())
                .or_default();
            match label(l, "outcome") {
                Some("ok") => b.ok += v,
                Some("error") => b.errors += v,
                _ => {}
            }
        }
        for (l, v) in samples(s, "blobmgr_backend_bytes_total") {
            let ep = label(l, "endpoint").unwrap_or("?").to_string();
            sum.backends.entry(ep).or_default().bytes += v;
        }
        sum
    }
}

/// A duration for people: `3d 4h`, `2h 5m`, `42s`.
fn uptime(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    let (d, h, m) = (s / 86400, s / 3600 % 24, s / 60 % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, m) => format!("{m}m {}s", s % 60),
        (0, h, m) => format!("{h}h {m}m"),
        (d, h, _) => format!("{d}d {h}h"),
    }
}

fn count(v: Option<f64>) -> String {
    v.map_or("?".into(), |v| format!("{v:.0}"))
}

fn bytes(v: Option<f64>) -> String {
    v.map_or("?".into(), |v| human(v.max(0.0) as u64))
}

/// The summary as printed, at unix time `now`.
fn render(s: &Summary, now: f64) -> String {
    let mut o = String::new();
    let i = &s.info;
    let mut who = format!("blobmgr {}", i.version.as_deref().unwrap_or("?"));
    if let Some(c) = &i.commit {
        let _ = write!(who, " (commit {c})");
    }
    let _ = write!(who, ", pid {}", i.pid.as_deref().unwrap_or("?"));
    if let Some(start) = i.start_time {
        let _ = write!(who, ", up {}", uptime(now - start));
    }
    let _ = writeln!(o, "{who}");
    let _ = writeln!(o, "connections      {}", count(s.connections));
    let c = &s.cache;
    let limit = match c.limit {
        Some(l) if l > 0.0 => format!("of {} limit", bytes(Some(l))),
        Some(_) => "no limit".into(),
        None => "limit ?".into(),
    };
    let _ = writeln!(
        o,
        "cache            {} ({limit}), {} blobs",
        bytes(c.bytes),
        count(c.blobs)
    );
    let ratio = if c.hits + c.misses > 0.0 {
        format!("{:.1}%", 100.0 * c.hits / (c.hits + c.misses))
    } else {
        "n/a".into()
    };
    let _ = writeln!(
        o,
        "hit ratio        {ratio} ({:.0} hits, {:.0} misses)",
        c.hits, c.misses
    );
    let _ = writeln!(o, "fills in flight  {}", count(c.fills_in_flight));
    let _ = writeln!(o, "evictions        {}", count(c.evictions));
    if s.backends.is_empty() {
        let _ = writeln!(o, "backend          no requests yet");
    }
    for (ep, b) in &s.backends {
        let _ = writeln!(
            o,
            "backend          {ep}: {:.0} errors of {:.0} requests, {}",
            b.errors,
            b.ok + b.errors,
            bytes(Some(b.bytes))
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPOSITION: &str = r#"# HELP blobmgr_info The daemon's build and process.
# TYPE blobmgr_info gauge
blobmgr_info{version="0.1.0",commit="1a2b3c4",pid="4242"} 1
# TYPE blobmgr_start_time_seconds gauge
blobmgr_start_time_seconds 1700000000
# TYPE blobmgr_connections gauge
blobmgr_connections 3
# TYPE blobmgr_requests_total counter
blobmgr_requests_total{op="noop",result="ok"} 5
blobmgr_requests_total{op="get_blob",result="ok"} 12
blobmgr_requests_total{op="fetch_range",result="hit"} 90
blobmgr_requests_total{op="fetch_range",result="miss"} 10
blobmgr_requests_total{op="fetch_range",result="failed"} 1
blobmgr_requests_total{op="prefetch",result="hit"} 1000
# TYPE blobmgr_fetch_seconds histogram
blobmgr_fetch_seconds_bucket{cached="true",le="0.001"} 80
blobmgr_fetch_seconds_bucket{cached="true",le="+Inf"} 90
blobmgr_fetch_seconds_sum{cached="true"} 0.05
blobmgr_fetch_seconds_count{cached="true"} 90
# TYPE blobmgr_backend_requests_total counter
blobmgr_backend_requests_total{endpoint="https://mirror.example",outcome="ok"} 7
blobmgr_backend_requests_total{endpoint="https://mirror.example",outcome="error"} 2
blobmgr_backend_requests_total{endpoint="https://registry.example",outcome="ok"} 4
# TYPE blobmgr_backend_bytes_total counter
blobmgr_backend_bytes_total{endpoint="https://mirror.example"} 1048576
blobmgr_backend_bytes_total{endpoint="https://registry.example"} 0
# TYPE blobmgr_cache_bytes gauge
blobmgr_cache_bytes 1610612736
# TYPE blobmgr_cache_limit_bytes gauge
blobmgr_cache_limit_bytes 10737418240
# TYPE blobmgr_cache_blobs gauge
blobmgr_cache_blobs 42
# TYPE blobmgr_fills_in_flight gauge
blobmgr_fills_in_flight 2
# TYPE blobmgr_evictions_total counter
blobmgr_evictions_total{cause="size"} 4
blobmgr_evictions_total{cause="min_free"} 1
"#;

    fn scrape(text: &str) -> Scrape {
        Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
    }

    #[test]
    fn renders_a_canned_exposition() {
        let s = Summary::of(&scrape(EXPOSITION));
        let out = render(&s, 1_700_000_000.0 + 2.0 * 3600.0 + 5.0 * 60.0);
        let want = "\
blobmgr 0.1.0 (commit 1a2b3c4), pid 4242, up 2h 5m
connections      3
cache            1.5 GiB (of 10.0 GiB limit), 42 blobs
hit ratio        90.0% (90 hits, 10 misses)
fills in flight  2
evictions        5
backend          https://mirror.example: 2 errors of 9 requests, 1.0 MiB
backend          https://registry.example: 0 errors of 4 requests, 0 B
";
        assert_eq!(out, want);
    }

    #[test]
    fn missing_families_show_as_unknown() {
        let s = Summary::of(&scrape(
            "blobmgr_connections 0\nblobmgr_cache_limit_bytes 0\n",
        ));
        let out = render(&s, 0.0);
        assert!(out.starts_with("blobmgr ?, pid ?\n"), "{out}");
        assert!(
            out.contains("cache            ? (no limit), ? blobs"),
            "{out}"
        );
        assert!(out.contains("hit ratio        n/a"), "{out}");
        assert!(out.contains("no requests yet"), "{out}");
    }

    #[test]
    fn spaces_after_commas_in_labels_are_tolerated() {
        let s = Summary::of(&scrape(
            "blobmgr_requests_total{op=\"fetch_range\", result=\"hit\"} 3\n",
        ));
        assert_eq!(s.cache.hits, 3.0);
    }

    #[test]
    fn uptimes() {
        assert_eq!(uptime(42.0), "42s");
        assert_eq!(uptime(125.0), "2m 5s");
        assert_eq!(uptime(3.0 * 86400.0 + 4.0 * 3600.0), "3d 4h");
        assert_eq!(uptime(-5.0), "0s");
    }
}
