//! The server in this process, on a thread of its own, over real sockets.
//!
//! [`InProc::start`] runs `Server::run` with any `Backend` (tests use
//! instrumented or misbehaving ones). [`InProc::spawn`] takes the build and
//! drive steps from the caller, for a server driven some other way (the host
//! event loop of tests/host_loop.rs). Either way the server is stopped through
//! an eventfd and its thread joined on [`InProc::stop`] or on drop.

use super::raw::Raw;
use blobmgr::backend::Backend;
use blobmgr::server::Stats;
use blobmgr::{Server, ServerConfig};
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A server on its own thread; `T` is what its thread hands back when it
/// stops (the server's [`Stats`] for [`InProc::start`]).
pub struct InProc<T = Stats> {
    pub sock: PathBuf,
    dir: tempfile::TempDir,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<Option<T>>>,
    before_stop: Vec<Box<dyn FnOnce() + Send>>,
}

impl InProc<Stats> {
    /// `Server::new(cfg, backend)` then `Server::run` until stopped; `tweak`
    /// adjusts the config first (socket and work dir are in a temp dir).
    pub fn start(backend: Arc<dyn Backend>, tweak: impl FnOnce(&mut ServerConfig)) -> InProc {
        InProc::spawn(
            |cfg, _| tweak(cfg),
            move |cfg, _| Server::new(cfg, backend),
            |mut server, stop| {
                server.run(Some(stop)).expect("server run");
                server.stats()
            },
        )
    }
}

impl<T: Send + 'static> InProc<T> {
    /// A server thread that calls `build` (with the tweaked config and the
    /// temp dir), reports whether that worked (this call waits for it and
    /// panics on an error), then calls `drive` until the stop eventfd (its
    /// second argument) becomes readable, and returns what `drive` returned.
    pub fn spawn<S>(
        tweak: impl FnOnce(&mut ServerConfig, &Path),
        build: impl FnOnce(ServerConfig, &Path) -> io::Result<S> + Send + 'static,
        drive: impl FnOnce(S, BorrowedFd<'_>) -> T + Send + 'static,
    ) -> InProc<T> {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("inproc.sock");
        let mut cfg = ServerConfig::new(&sock, dir.path().join("work"));
        tweak(&mut cfg, dir.path());
        let stop = Arc::new(
            EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).expect("eventfd"),
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop2, path) = (stop.clone(), dir.path().to_path_buf());
        let thread = std::thread::spawn(move || {
            // The server is built on the thread that drives it.
            let server = match build(cfg, &path) {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return None;
                }
            };
            let _ = tx.send(Ok(()));
            Some(drive(server, stop2.as_fd()))
        });
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("in-process server did not start: {e}"),
            Err(_) => panic!(
                "in-process server thread died while starting: {:?}",
                thread.join().err()
            ),
        }
        InProc {
            sock,
            dir,
            stop,
            thread: Some(thread),
            before_stop: Vec::new(),
        }
    }

    /// The temp dir holding the socket and `work/`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn raw(&self) -> Raw {
        Raw::connect(&self.sock)
    }

    /// Runs `f` before the stop signal, on [`InProc::stop`] or drop: e.g. to
    /// release a backend that holds a worker, which the server joins.
    pub fn on_stop(mut self, f: impl FnOnce() + Send + 'static) -> InProc<T> {
        self.before_stop.push(Box::new(f));
        self
    }

    /// Stops the server and returns what its thread handed back.
    pub fn stop(mut self) -> T {
        self.signal_stop();
        self.thread
            .take()
            .expect("server thread")
            .join()
            .expect("server thread panicked")
            .expect("server started")
    }

    fn signal_stop(&mut self) {
        for f in self.before_stop.drain(..) {
            f();
        }
        self.stop.write(1).expect("write stop eventfd");
    }
}

impl<T> Drop for InProc<T> {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            for f in self.before_stop.drain(..) {
                f();
            }
            let _ = self.stop.write(1);
            let _ = t.join();
        }
    }
}
