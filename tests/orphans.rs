//! Work a client leaves behind when it closes: the pool's queued jobs that
//! only its requests waited for are cancelled, so a client that queues a
//! thousand cold requests, closes and does it again cannot grow the queue
//! without bound. The server is driven by hand from the test thread (no
//! `Server::run`), so what the reactor has read is known exactly.
mod common;
use blobmgr::backend::{Backend, BackendError};
use blobmgr::connection::ConnId;
use blobmgr::protocol::{Reply, Request};
use blobmgr::{Server, ServerConfig};
use common::*;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const GRANULE: u64 = 64 * 1024;

/// Blobs in memory. `read_into` waits at `gate` (counted in `entered`
/// first, so the test knows a worker holds it); every `blob_size` and every
/// read that passed the gate is logged.
struct Gated {
    blobs: HashMap<String, Vec<u8>>,
    gate: Gate,
    entered: AtomicUsize,
    sized: Mutex<Vec<String>>,
    reads: Mutex<Vec<(String, u64)>>,
}

impl Backend for Gated {
    fn blob_size(&self, id: &str) -> Result<u64, BackendError> {
        self.sized.lock().unwrap().push(id.to_string());
        let b = self.blobs.get(id).ok_or(BackendError::NotFound)?;
        Ok(b.len() as u64)
    }

    fn read_into(&self, id: &str, offset: u64, len: u64, dst: &File) -> Result<(), BackendError> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        assert!(self.gate.wait_open(Duration::from_secs(60)), "held 60 s");
        self.reads.lock().unwrap().push((id.to_string(), offset));
        let data = self.blobs.get(id).ok_or(BackendError::NotFound)?;
        let (s, e) = (offset as usize, (offset + len) as usize);
        dst.write_all_at(&data[s..e], offset)
            .map_err(|e| BackendError::Io("write cache".into(), e))
    }

    fn describe(&self) -> String {
        "gated memory (test)".into()
    }
}

/// Opens the gate when dropped, so a failed assertion cannot leave the
/// worker (which the server's drop joins) held.
struct Release(Arc<Gated>);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.gate.set(true);
    }
}

/// Waits (up to 10 s) for worker completions and hands them to the server.
fn complete(server: &mut Server) {
    let mut fds = [PollFd::new(server.completion_fd(), PollFlags::POLLIN)];
    assert_eq!(poll(&mut fds, PollTimeout::from(10_000u16)).unwrap(), 1);
    server.handle_completions();
}

fn fetch(token: u64, granule: u64) -> Request {
    Request::FetchRange {
        token,
        start: granule * GRANULE,
        count: GRANULE,
    }
}

/// Review finding: when a client closed, its queued opens and fills stayed
/// in the pool's queue, and other clients' requests waited behind them.
/// Now the ones only it waited for are cancelled at its close: the queue
/// shrinks back to the job another client shares, the backend is never
/// asked for the abandoned ids or ranges, and the other clients are
/// answered (a cancelled open's id opens again).
#[test]
fn a_closed_clients_queued_jobs_are_cancelled_and_others_still_served() {
    const OPENS: usize = 50;
    const FILLS: u64 = 100;
    let mut blobs = HashMap::new();
    blobs.insert(
        "big".to_string(),
        pattern((FILLS + 8) as usize * GRANULE as usize, 5),
    );
    for i in 0..OPENS {
        blobs.insert(format!("o{i}"), pattern(1000, i as u64));
    }
    let be = Arc::new(Gated {
        blobs,
        gate: Gate::new(false),
        entered: AtomicUsize::new(0),
        sized: Mutex::new(Vec::new()),
        reads: Mutex::new(Vec::new()),
    });
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let mut cfg = ServerConfig::new(&sock, dir.path().join("work"));
    cfg.workers = 1;
    cfg.cache.granule = GRANULE;
    cfg.cache.max_job = GRANULE;
    cfg.cache.readahead = 0;
    let mut server = Server::new(cfg, be.clone()).unwrap();
    let _release = Release(be.clone());
    // Connections get generations 1, 2, 3 in slots 0, 1, then 1 again.
    let (kb, ka, kc) = (
        ConnId::new(1, 0).event(),
        ConnId::new(2, 1).event(),
        ConnId::new(3, 1).event(),
    );

    // The keeper opens "big" and holds the only worker with a fill.
    let mut keeper = Raw::connect(&sock);
    server.handle_incoming_connection();
    keeper.send(&Request::get_blob(1, "big").unwrap(), true);
    server.handle_event(kb);
    complete(&mut server);
    let Ok((
        _,
        Reply::GetBlob {
            token: tk,
            result: 0,
            ..
        },
    )) = keeper.recv()
    else {
        panic!("keeper's GetBlob");
    };
    let held = keeper.send(&fetch(tk, 0), true);
    server.handle_event(kb);
    assert!(
        wait_until(Duration::from_secs(10), || be
            .entered
            .load(Ordering::SeqCst)
            == 1),
        "the worker took the keeper's fill"
    );
    assert_eq!(server.queued_jobs(), 0);

    // The abuser queues distinct cold fills and opens behind it; the
    // keeper then asks for one of the same ranges (a shared job).
    let mut abuser = Raw::connect(&sock);
    server.handle_incoming_connection();
    let ta = abuser.send(&Request::get_blob(1, "big").unwrap(), true);
    server.handle_event(ka);
    let Ok((
        t,
        Reply::GetBlob {
            token: ta_token,
            result: 0,
            ..
        },
    )) = abuser.recv()
    else {
        panic!("abuser's GetBlob of an open blob is answered at once");
    };
    assert_eq!(t, ta);
    for g in 1..=FILLS {
        abuser.send(&fetch(ta_token, g), true);
    }
    for i in 0..OPENS {
        abuser.send(&Request::get_blob(1, &format!("o{i}")).unwrap(), true);
    }
    server.handle_event(ka);
    // What the read budget left for later is read now.
    server.handle_timeout();
    let shared = keeper.send(&fetch(tk, 7), true);
    server.handle_event(kb);
    assert_eq!(server.queued_jobs(), FILLS as usize + OPENS);

    // It closes: only the shared fill stays queued.
    drop(abuser);
    server.handle_event(ka);
    assert_eq!(server.connections(), 1);
    assert_eq!(
        server.queued_jobs(),
        1,
        "the abuser's own jobs are cancelled"
    );
    assert_eq!(server.metrics().cache.jobs_in_flight.get(), 2);
    assert_eq!(server.stats().fills_failed, 0);

    // Another client opens one of the ids whose open was cancelled.
    let mut other = Raw::connect(&sock);
    server.handle_incoming_connection();
    let asked = other.send(&Request::get_blob(1, "o3").unwrap(), true);
    server.handle_event(kc);
    assert_eq!(server.queued_jobs(), 2);

    // Once every job is done, every reply has been written.
    be.gate.set(true);
    while server.metrics().cache.jobs_in_flight.get() > 0 {
        complete(&mut server);
    }
    let mut answered = Vec::new();
    for _ in 0..2 {
        answered.push(keeper.recv().expect("keeper's replies"));
    }
    answered.push(other.recv().expect("the other client's reply"));
    answered.sort_by_key(|(t, _)| *t);
    let mut want = vec![held, shared, asked];
    want.sort_unstable();
    assert_eq!(answered.iter().map(|(t, _)| *t).collect::<Vec<_>>(), want);
    for (t, r) in &answered {
        let ok = match r {
            Reply::FetchRange { result, count, .. } => *result == 0 && *count == GRANULE,
            Reply::GetBlob { result, .. } => *result == 0,
            _ => false,
        };
        assert!(ok, "request {t}: {r:?}");
    }
    // The backend was asked for nothing the abuser alone wanted.
    let mut reads: Vec<u64> = be.reads.lock().unwrap().iter().map(|r| r.1).collect();
    reads.sort_unstable();
    assert_eq!(reads, vec![0, 7 * GRANULE]);
    let sized = be.sized.lock().unwrap().clone();
    assert_eq!(sized, vec!["big".to_string(), "o3".to_string()]);
    assert_eq!(server.queued_jobs(), 0);
}
