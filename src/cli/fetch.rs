//! `blobmgr fetch [--sock PATH] [--parallel N] ID...`: warms the cache with
//! whole blobs through the client library — GetBlob, then FetchRange over
//! the whole blob in chunks — N blobs at a time.
//!
//! When standard error is a terminal, each blob gets a progress bar there
//! (indicatif). Otherwise one plain line per finished blob goes to standard
//! output (`ID SIZE bytes in SECS s`), with no carriage returns, for logs
//! and scripts. Failures are named on standard error once every blob is
//! done; the exit status is 0 only if every blob was fetched.

use crate::cli::args::FetchArgs;
use crate::cli::Fail;
use blobmgr::client::Client;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bytes asked for by one FetchRange: the daemon splits it into fill jobs
/// that its workers run in parallel.
const CHUNK: u64 = 8 << 20;
/// Deadline of one call: a chunk from a slow registry can take a while, and
/// the daemon fails a stuck backend call on its own (--backend-timeout).
const CALL_TIMEOUT: Duration = Duration::from_secs(600);

/// How finished blobs are shown.
enum Progress {
    /// One bar per blob on standard error.
    Bars(MultiProgress),
    /// One line per finished blob on standard output.
    Lines,
}

/// One blob's display: its bar, when there are bars.
struct Reporter {
    bar: Option<ProgressBar>,
}

impl Progress {
    fn reporter(&self, id: &str) -> Reporter {
        let bar = match self {
            Progress::Bars(mp) => {
                let bar = mp.add(ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("{prefix} {spinner} {msg}")
                        .expect("a valid template"),
                );
                bar.set_prefix(id.to_string());
                bar.set_message("GetBlob");
                Some(bar)
            }
            Progress::Lines => None,
        };
        Reporter { bar }
    }
}

impl Reporter {
    fn start(&self, size: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(size);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_message("");
        }
    }

    fn advance(&self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }

    fn done(&self, id: &str, size: u64, secs: f64) {
        match &self.bar {
            Some(bar) => bar.finish_with_message(format!("done in {secs:.2} s")),
            // A closed standard output must not stop the fetches.
            None => {
                let _ = writeln!(std::io::stdout(), "{id} {size} bytes in {secs:.2} s");
            }
        }
    }

    fn failed(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon_with_message("failed");
        }
    }
}

/// Fetches every id; fails naming each blob that could not be fetched.
pub fn run(a: FetchArgs) -> Result<(), Fail> {
    let mut ids: Vec<String> = Vec::with_capacity(a.ids.len());
    for id in a.ids {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    let client = Client::builder()
        .connect_retries(1)
        .timeout(CALL_TIMEOUT)
        .connect(&a.sock.sock)?;
    let progress = if std::io::stderr().is_terminal() {
        Progress::Bars(MultiProgress::new())
    } else {
        Progress::Lines
    };
    let next = AtomicUsize::new(0);
    let failures: Mutex<Vec<(usize, String)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..(a.parallel as usize).min(ids.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = ids.get(i) else { break };
                if let Err(e) = fetch_one(&client, id, &progress) {
                    failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((i, e));
                }
            });
        }
    });
    let mut failures = failures.into_inner().unwrap_or_else(|p| p.into_inner());
    failures.sort();
    match failures.as_slice() {
        [] => Ok(()),
        [(i, e)] if ids.len() == 1 => Err(Fail(format!("fetch {}: {e}", ids[*i]))),
        all => {
            for (i, e) in all {
                eprintln!("blobmgr: fetch {}: {e}", ids[*i]);
            }
            Err(Fail(format!(
                "fetch: {} of {} blobs failed",
                all.len(),
                ids.len()
            )))
        }
    }
}

/// GetBlob, then FetchRange chunk by chunk to the blob's end.
fn fetch_one(client: &Client, id: &str, progress: &Progress) -> Result<(), String> {
    let t = Instant::now();
    let r = progress.reporter(id);
    let result = (|| {
        let blob = client.get_blob(id).map_err(|e| e.to_string())?;
        let size = blob.size();
        r.start(size);
        let mut at = 0;
        while at < size {
            let want = CHUNK.min(size - at);
            let n = client
                .fetch_range(&blob, at, want)
                .map_err(|e| format!("bytes {at}..{}: {e}", at + want))?;
            if n == 0 {
                return Err(format!("the daemon made no bytes valid at offset {at}"));
            }
            let n = n.min(size - at);
            r.advance(n);
            at += n;
        }
        Ok(size)
    })();
    match result {
        Ok(size) => {
            r.done(id, size, t.elapsed().as_secs_f64());
            Ok(())
        }
        Err(e) => {
            r.failed();
            Err(e)
        }
    }
}
