//! The reactor: the listener, a slab of connections, and the rules of
//! reading and writing them without ever blocking. It admits connections,
//! reads with a per-event budget, hands each decoded message to the
//! [`Service`], delivers the service's replies to their connections, pauses
//! reading under backpressure and asks for WRITABLE only while output waits.
//!
//! It never decides what a request means, and it never calls back into the
//! read path from the write path: a connection whose backpressure clears is
//! put on the backlog, served before the next wait.

use crate::connection::{ConnError, ConnId, Connection, Peer, ReadStatus};
use crate::listener::Listener;
use crate::metrics::Metrics;
use crate::protocol::Message;
use crate::service::{Output, Service};
use mio::unix::SourceFd;
use mio::{Interest, Token};
use slab::Slab;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Event id of the listening socket.
pub const LISTENER_ID: usize = usize::MAX;

/// How long accepting pauses after running out of fds.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Read buffer lent to every connection in turn.
const SCRATCH_SIZE: usize = 64 * 1024;
/// Reads one readiness event may do before the connection goes to the back
/// of the line, so one busy client cannot starve the others.
const READ_BUDGET: usize = 16;

/// Where a host registers the server's fds. Ids are opaque to the host: it
/// passes them back when the fd is ready. The server drains every fd until
/// it would block, so edge-triggered registration is right; WRITABLE is
/// asked for only while output is pending.
pub trait Registrar {
    fn register(&self, fd: BorrowedFd<'_>, id: usize, interest: Interest) -> io::Result<()>;
    fn reregister(&self, fd: BorrowedFd<'_>, id: usize, interest: Interest) -> io::Result<()>;
    fn deregister(&self, fd: BorrowedFd<'_>) -> io::Result<()>;
}

impl Registrar for mio::Registry {
    fn register(&self, fd: BorrowedFd<'_>, id: usize, interest: Interest) -> io::Result<()> {
        let raw = fd.as_raw_fd();
        mio::Registry::register(self, &mut SourceFd(&raw), Token(id), interest)
    }
    fn reregister(&self, fd: BorrowedFd<'_>, id: usize, interest: Interest) -> io::Result<()> {
        let raw = fd.as_raw_fd();
        mio::Registry::reregister(self, &mut SourceFd(&raw), Token(id), interest)
    }
    fn deregister(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        mio::Registry::deregister(self, &mut SourceFd(&fd.as_raw_fd()))
    }
}

/// How far a readiness event lets the reactor trust a short read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadHint {
    /// Read until the socket says WouldBlock (the safe default for hosts).
    UntilWouldBlock,
    /// The event did not report a hang-up: a short read means the socket is
    /// empty and later bytes bring a new edge, so reading may stop there.
    ShortReadDrains,
}

/// Who may connect and how much a connection may have outstanding.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_conns: usize,
    /// Peers whose uid is not listed are closed before any request is read.
    pub allow_uids: Vec<u32>,
    /// Requests per connection waiting on jobs before reading pauses.
    pub max_inflight: usize,
    /// Queued reply bytes per connection before reading pauses.
    pub max_output: usize,
}

struct Slot {
    id: ConnId,
    conn: Connection,
    /// Reading stopped because of backpressure; resumed when it clears.
    paused: bool,
    /// On the list of connections to flush at the end of this turn.
    listed: bool,
}

/// The reactor. See the module docs.
pub struct Reactor {
    registrar: Box<dyn Registrar>,
    listener: Listener,
    limits: Limits,
    conns: Slab<Slot>,
    next_generation: usize,
    /// Connections with replies queued this turn, each listed once.
    listed: Vec<usize>,
    /// Connections to serve again before the next wait: their read budget
    /// ran out, or their backpressure cleared (no new edge would come).
    backlog: Vec<ConnId>,
    scratch: Vec<u8>,
    msgs: Vec<Message>,
    accept_paused_until: Option<Instant>,
    metrics: Arc<Metrics>,
    /// Handing over to a new process: no accepting, no reading; what was
    /// read is answered, then every connection is closed.
    draining: bool,
    /// Warnings about clients (refused, malformed) allowed now. (Thirteen
    /// fields: each is the reactor's own state, read on every turn.)
    warnings: LogBudget,
}

/// Warnings the reactor writes about clients, at most [`Self::PER_SECOND`]
/// a second: a client that connects and misbehaves in a loop would
/// otherwise have the reactor writing to stderr (a pipe to a journal that
/// may block) for every connection. What is left out is counted and said
/// once the second is over; the metrics count every event anyway.
struct LogBudget {
    since: Instant,
    written: u32,
    dropped: u64,
}

impl LogBudget {
    const PER_SECOND: u32 = 100;

    fn new(now: Instant) -> LogBudget {
        LogBudget {
            since: now,
            written: 0,
            dropped: 0,
        }
    }

    /// Whether a warning may be written at `now`.
    fn allow(&mut self, now: Instant) -> bool {
        self.roll(now);
        if self.written < Self::PER_SECOND {
            self.written += 1;
            return true;
        }
        self.dropped += 1;
        false
    }

    /// Starts a new second if this one is over, saying how many warnings
    /// were left out of it.
    fn roll(&mut self, now: Instant) {
        if now.duration_since(self.since) >= Duration::from_secs(1) {
            if self.dropped > 0 {
                log::warn!("{} more warnings about clients left out", self.dropped);
            }
            *self = LogBudget::new(now);
        }
    }

    /// When the count of left-out warnings is due to be said, if any were.
    fn due(&self) -> Option<Instant> {
        (self.dropped > 0).then(|| self.since + Duration::from_secs(1))
    }
}

impl Reactor {
    /// A reactor accepting on `listener`, registered through `registrar`.
    pub fn new(
        registrar: Box<dyn Registrar>,
        listener: Listener,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> io::Result<Reactor> {
        registrar.register(listener.inner().as_fd(), LISTENER_ID, Interest::READABLE)?;
        Ok(Reactor {
            registrar,
            listener,
            limits,
            conns: Slab::new(),
            next_generation: 1,
            listed: Vec::new(),
            backlog: Vec::new(),
            scratch: vec![0u8; SCRATCH_SIZE],
            msgs: Vec::new(),
            accept_paused_until: None,
            metrics,
            draining: false,
            warnings: LogBudget::new(Instant::now()),
        })
    }

    pub fn registrar(&self) -> &dyn Registrar {
        self.registrar.as_ref()
    }

    pub fn listener_fd(&self) -> BorrowedFd<'_> {
        self.listener.inner().as_fd()
    }

    /// Whether the listener's socket file is this process's to remove
    /// ([`Listener::owns_file`]).
    pub fn listener_owns_file(&self) -> bool {
        self.listener.owns_file()
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Connections listed for flushing (for tests of its bound).
    pub fn listed(&self) -> usize {
        self.listed.len()
    }

    /// When [`Reactor::handle_timeout`] is due (zero: before the next wait).
    pub fn next_deadline(&self) -> Option<Instant> {
        if !self.backlog.is_empty() {
            return Some(Instant::now());
        }
        match (self.accept_paused_until, self.warnings.due()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Serves the backlog and resumes accepting after an fd-exhaustion
    /// backoff.
    pub fn handle_timeout(&mut self, svc: &mut Service) {
        for id in std::mem::take(&mut self.backlog) {
            self.handle_event(id.event(), ReadHint::UntilWouldBlock, svc);
        }
        if matches!(self.accept_paused_until, Some(t) if Instant::now() >= t) {
            self.accept_paused_until = None;
            self.accept(svc);
        }
        // The count of warnings left out is said once their second is over.
        self.warnings.roll(Instant::now());
    }

    /// Stops accepting and reading: only replies to what was read go out.
    /// With `handover`, the socket file stays for the process taking over
    /// (the listener's backlog is its to serve).
    pub fn begin_drain(&mut self, handover: bool) {
        self.draining = true;
        self.backlog.clear();
        let _ = self.registrar.deregister(self.listener.inner().as_fd());
        if handover {
            self.listener.keep_file();
        }
    }

    /// Whether every queued reply has been written.
    pub fn flushed(&self) -> bool {
        self.conns.iter().all(|(_, s)| s.conn.pending_output() == 0)
    }

    /// Closes every connection (the end of a drain).
    pub fn close_all(&mut self, svc: &mut Service) {
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close(key, None, svc);
        }
    }

    /// Accepts every pending connection.
    pub fn accept(&mut self, svc: &mut Service) {
        if self.accept_paused_until.is_some() || self.draining {
            return;
        }
        loop {
            match self.listener.inner().accept() {
                Ok((stream, _)) => self.admit(stream, svc),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS, ENOMEM: temporary. Keep serving
                    // the connections we have and retry after a pause.
                    let backoffs = &self.metrics.conns.accept_backoffs;
                    backoffs.bump();
                    if backoffs.get().is_power_of_two() {
                        log::warn!(
                            "accept failed ({e}); pausing accepts for {ACCEPT_BACKOFF:?} ({} times so far)",
                            backoffs.get()
                        );
                    }
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    break;
                }
            }
        }
    }

    fn admit(&mut self, stream: mio::net::UnixStream, svc: &mut Service) {
        let peer = match Peer::of(&stream) {
            Ok(p) => p,
            Err(e) => {
                log::warn!("closing a new connection: cannot read peer credentials: {e}");
                return;
            }
        };
        if !self.limits.allow_uids.contains(&peer.uid) {
            self.metrics.conns.refused.bump();
            if self.warnings.allow(Instant::now()) {
                log::warn!("refused connection from {peer}: uid not allowed");
            }
            return;
        }
        if self.conns.len() >= self.limits.max_conns {
            self.metrics.conns.refused.bump();
            if self.warnings.allow(Instant::now()) {
                log::warn!(
                    "refused connection from {peer}: {} connections open (--max-conns)",
                    self.conns.len()
                );
            }
            return;
        }
        let entry = self.conns.vacant_entry();
        if entry.key() > ConnId::MAX_KEY {
            log::warn!("refused connection from {peer}: connection table full");
            return;
        }
        let id = ConnId::new(self.next_generation, entry.key());
        self.next_generation = (self.next_generation + 1) % ConnId::GENERATION_LIMIT;
        if let Err(e) = self
            .registrar
            .register(stream.as_fd(), id.event(), Interest::READABLE)
        {
            log::warn!("closing connection from {peer}: register: {e}");
            return;
        }
        log::debug!("connection {id} from {peer}");
        entry.insert(Slot {
            id,
            conn: Connection::new(stream, peer),
            paused: false,
            listed: false,
        });
        svc.open_session(id);
        self.metrics.conns.accepted.bump();
        self.metrics.conns.open.set(self.conns.len() as u64);
        // Bytes that arrived before registration are reported by the first
        // poll after it: epoll checks readiness when an fd is added.
    }

    fn live_key(&self, id: ConnId) -> Option<usize> {
        let key = id.key();
        self.conns.get(key).filter(|s| s.id == id).map(|_| key)
    }

    /// Handles readiness of the connection with event id `event`: reads and
    /// answers everything available, then writes what it can. Stale ids
    /// are ignored.
    pub fn handle_event(&mut self, event: usize, hint: ReadHint, svc: &mut Service) {
        if let Some(key) = self.live_key(ConnId::from_event(event)) {
            if self.draining {
                self.flush(key, svc);
            } else {
                self.serve(key, hint, svc);
            }
        }
        self.flush_listed(svc);
    }

    /// Reads, answers and writes until the connection would block, resuming
    /// reads whenever writing clears backpressure.
    fn serve(&mut self, key: usize, hint: ReadHint, svc: &mut Service) {
        let mut budget = READ_BUDGET;
        loop {
            if !self.read_requests(key, &mut budget, hint, svc) {
                return;
            }
            if !self.flush(key, svc) || !self.resume_reading(key, svc) {
                return;
            }
        }
    }

    fn over_limit(&self, key: usize, svc: &mut Service) -> bool {
        let s = &self.conns[key];
        svc.waiting(s.id) >= self.limits.max_inflight
            || s.conn.pending_output() >= self.limits.max_output
    }

    /// Clears a backpressure pause once the connection is under its limits;
    /// returns whether reading should go on.
    fn resume_reading(&mut self, key: usize, svc: &mut Service) -> bool {
        if self.conns[key].paused && !self.over_limit(key, svc) {
            self.conns[key].paused = false;
            return true;
        }
        false
    }

    /// Reads until the socket would block, backpressure stops it or the
    /// budget is spent, handing each message to the service and queueing
    /// its replies. Returns false if the connection was closed.
    fn read_requests(
        &mut self,
        key: usize,
        budget: &mut usize,
        hint: ReadHint,
        svc: &mut Service,
    ) -> bool {
        loop {
            let slot = &mut self.conns[key];
            if slot.paused {
                return true;
            }
            if *budget == 0 {
                // A duplicate entry costs one EAGAIN read at most.
                self.backlog.push(slot.id);
                return true;
            }
            *budget -= 1;
            self.msgs.clear();
            match slot.conn.read_messages(&mut self.scratch, &mut self.msgs) {
                Ok(ReadStatus::Data) => {}
                Ok(ReadStatus::WouldBlock) => return true,
                Ok(ReadStatus::Eof) => {
                    self.close(key, None, svc);
                    return false;
                }
                Err(e) => {
                    self.close(key, Some(e), svc);
                    return false;
                }
            }
            let id = slot.id;
            let drained = slot.conn.drained();
            for m in self.msgs.drain(..) {
                svc.request(id, m);
            }
            self.deliver(svc);
            if self.over_limit(key, svc) {
                let slot = &mut self.conns[key];
                slot.paused = true;
                log::debug!(
                    "connection from {}: backpressure, reading paused",
                    slot.conn.peer()
                );
                return true;
            }
            if hint == ReadHint::ShortReadDrains && drained {
                return true;
            }
        }
    }

    /// Queues the service's output on its connections (output for closed
    /// connections is dropped) and lists them for flushing.
    pub fn deliver(&mut self, svc: &mut Service) {
        for out in svc.take_output() {
            let (id, reply) = match out {
                Output::Reply {
                    conn,
                    tag,
                    reply,
                    fd,
                } => (conn, Some((tag, reply, fd))),
                Output::Progress(conn) => (conn, None),
            };
            let key = id.key();
            let Some(slot) = self.conns.get_mut(key).filter(|s| s.id == id) else {
                continue;
            };
            if let Some((tag, reply, fd)) = reply {
                slot.conn.queue_reply(tag, &reply, fd);
            }
            if !slot.listed {
                slot.listed = true;
                self.listed.push(key);
            }
        }
    }

    /// Writes what every listed connection has queued; a connection whose
    /// backpressure cleared goes on the backlog.
    pub fn flush_listed(&mut self, svc: &mut Service) {
        let mut listed = std::mem::take(&mut self.listed);
        for key in listed.drain(..) {
            let Some(slot) = self.conns.get_mut(key) else {
                continue;
            };
            slot.listed = false;
            if self.flush(key, svc) && !self.draining && self.resume_reading(key, svc) {
                self.backlog.push(self.conns[key].id);
            }
        }
        if self.listed.is_empty() {
            self.listed = listed;
        }
    }

    /// Writes what a connection has queued and adjusts its WRITABLE
    /// interest. Returns false if the connection was closed.
    fn flush(&mut self, key: usize, svc: &mut Service) -> bool {
        let slot = &mut self.conns[key];
        if let Err(e) = slot.conn.flush() {
            self.close(key, Some(e), svc);
            return false;
        }
        let want_write = slot.conn.pending_output() > 0;
        if want_write != slot.conn.write_registered {
            let interest = if want_write {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            let fd = slot.conn.stream().as_fd();
            if let Err(e) = self.registrar.reregister(fd, slot.id.event(), interest) {
                self.close(key, Some(ConnError::Io(e)), svc);
                return false;
            }
            slot.conn.write_registered = want_write;
        }
        true
    }

    fn close(&mut self, key: usize, why: Option<ConnError>, svc: &mut Service) {
        let slot = self.conns.remove(key);
        let _ = self.registrar.deregister(slot.conn.stream().as_fd());
        log_close(&slot, why.as_ref(), &self.metrics, &mut self.warnings);
        self.metrics.conns.open.set(self.conns.len() as u64);
        svc.close_session(slot.id);
    }
}

fn log_close(slot: &Slot, why: Option<&ConnError>, metrics: &Metrics, warnings: &mut LogBudget) {
    let peer = slot.conn.peer();
    match why {
        Some(e @ ConnError::Protocol(_)) => {
            metrics.conns.closed_malformed.bump();
            if warnings.allow(Instant::now()) {
                log::warn!("closing connection from {peer}: {e}");
            }
        }
        Some(e) => log::info!("closing connection from {peer}: {e}"),
        None => log::debug!("connection from {peer} closed by peer"),
    }
}

impl Drop for Reactor {
    fn drop(&mut self) {
        for (_, slot) in self.conns.iter() {
            let _ = self.registrar.deregister(slot.conn.stream().as_fd());
        }
        let _ = self.registrar.deregister(self.listener.inner().as_fd());
        // The listener's own Drop removes the socket file after this.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_about_clients_are_bounded_per_second() {
        let t0 = Instant::now();
        let mut b = LogBudget::new(t0);
        let allowed = (0..1000).filter(|_| b.allow(t0)).count();
        assert_eq!(allowed, LogBudget::PER_SECOND as usize);
        assert_eq!(b.dropped, 1000 - allowed as u64);
        let later = t0 + Duration::from_millis(999);
        assert!(!b.allow(later), "still the same second");
        assert_eq!(b.due(), Some(t0 + Duration::from_secs(1)));
        let next = t0 + Duration::from_secs(1);
        assert!(b.allow(next), "a new second");
        assert_eq!((b.written, b.dropped), (1, 0));
        assert_eq!(b.due(), None, "nothing left out to say");
        // Without a further warning, the timer's roll says the count.
        for _ in 0..LogBudget::PER_SECOND {
            b.allow(next);
        }
        assert_eq!(b.dropped, 1);
        b.roll(next + Duration::from_secs(1));
        assert_eq!((b.dropped, b.due()), (0, None));
    }
}
