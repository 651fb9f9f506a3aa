//! The metrics endpoint: a thread of its own, with its own mio `Poll`, that
//! answers `GET /metrics` over HTTP/1.1 on TCP and Unix sockets. It never
//! touches the reactor: it renders from atomics. Requests are parsed by
//! `httparse` under strict limits (request size, header count, idle time,
//! connection count), so a slow, idle or garbage-sending client costs this
//! thread a slot and nothing else. Each listener has its own slots, so a
//! flood on a TCP address never shuts out the local Unix socket that
//! `blobmgr status` and `blobmgr upgrade` use; when a listener's slots are
//! full, its connection idle longest is closed for the new one, so idle
//! connections delay a scrape instead of refusing it.

use crate::listener::Listener;
use mio::net::{TcpListener, TcpStream, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Connections served at once per listener.
const MAX_CONNS: usize = 64;
/// Largest request (line and headers) accepted.
const MAX_REQUEST: usize = 8192;
const MAX_HEADERS: usize = 32;
/// A connection with nothing to do for this long is closed.
const IDLE: Duration = Duration::from_secs(10);
const WAKER: Token = Token(usize::MAX);
/// Tokens below this are listeners.
const FIRST_CONN: usize = 1024;

/// Where the metrics endpoint listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetricsAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for MetricsAddr {
    type Err = String;

    /// `HOST:PORT` (resolved once, first address) or `unix:PATH`.
    fn from_str(s: &str) -> Result<MetricsAddr, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path".into());
            }
            return Ok(MetricsAddr::Unix(PathBuf::from(path)));
        }
        let mut addrs = s
            .to_socket_addrs()
            .map_err(|e| format!("{s:?} is not HOST:PORT or unix:PATH ({e})"))?;
        addrs
            .next()
            .map(MetricsAddr::Tcp)
            .ok_or_else(|| format!("{s:?} resolves to no address"))
    }
}

impl fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsAddr::Tcp(a) => write!(f, "{a}"),
            MetricsAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Produces the exposition text; runs on the metrics thread.
pub type Render = Box<dyn Fn() -> String + Send>;

enum Acceptor {
    Tcp(TcpListener),
    Unix(Listener),
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Stream::Tcp(s) => s,
            Stream::Unix(s) => s,
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
}

struct Client {
    stream: Stream,
    /// Index of the acceptor it came from.
    listener: usize,
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    deadline: Instant,
    close_after: bool,
}

/// The running endpoint; dropping it stops the thread and removes its Unix
/// socket files.
pub struct MetricsServer {
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds every address (Unix sockets with `mode` and `group`, like the
    /// protocol socket) and starts the thread.
    pub fn start(
        addrs: &[MetricsAddr],
        mode: u32,
        group: Option<u32>,
        render: Render,
    ) -> io::Result<MetricsServer> {
        let poll = Poll::new()?;
        let mut acceptors = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let ctx = |e: io::Error| io::Error::new(e.kind(), format!("metrics {addr}: {e}"));
            let mut a = match addr {
                MetricsAddr::Tcp(sa) => Acceptor::Tcp(TcpListener::bind(*sa).map_err(ctx)?),
                MetricsAddr::Unix(p) => {
                    Acceptor::Unix(Listener::bind(p, mode, group, 128).map_err(ctx)?)
                }
            };
            let src: &mut dyn mio::event::Source = match &mut a {
                Acceptor::Tcp(l) => l,
                Acceptor::Unix(l) => l.inner_mut(),
            };
            poll.registry()
                .register(src, Token(i), Interest::READABLE)?;
            acceptors.push(a);
            log::info!("metrics on {addr}");
        }
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("blobmgr-metrics".into())
            .spawn(move || Endpoint::new(poll, acceptors, render).run(&stop2))?;
        Ok(MetricsServer {
            waker,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The thread's state.
struct Endpoint {
    poll: Poll,
    acceptors: Vec<Acceptor>,
    clients: Slab<Client>,
    render: Render,
}

impl Endpoint {
    fn new(poll: Poll, acceptors: Vec<Acceptor>, render: Render) -> Endpoint {
        Endpoint {
            poll,
            acceptors,
            clients: Slab::new(),
            render,
        }
    }

    fn run(mut self, stop: &AtomicBool) {
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = self
                .clients
                .iter()
                .map(|(_, c)| c.deadline)
                .min()
                .map(|d| d.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("metrics endpoint stopped: {e}");
                return;
            }
            for ev in events.iter() {
                match ev.token() {
                    WAKER if stop.load(Ordering::Acquire) => return,
                    WAKER => {}
                    Token(i) if i < FIRST_CONN => self.accept(i),
                    Token(t) => self.serve(t - FIRST_CONN),
                }
            }
            self.expire();
        }
    }

    fn accept(&mut self, i: usize) {
        loop {
            let stream = match &self.acceptors[i] {
                Acceptor::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
                Acceptor::Unix(l) => l.inner().accept().map(|(s, _)| Stream::Unix(s)),
            };
            let mut stream = match stream {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("metrics accept: {e}");
                    return;
                }
            };
            self.make_room(i);
            let entry = self.clients.vacant_entry();
            let token = Token(FIRST_CONN + entry.key());
            let interest = Interest::READABLE | Interest::WRITABLE;
            if self
                .poll
                .registry()
                .register(stream.source(), token, interest)
                .is_ok()
            {
                entry.insert(Client {
                    stream,
                    listener: i,
                    input: Vec::new(),
                    output: Vec::new(),
                    written: 0,
                    deadline: Instant::now() + IDLE,
                    close_after: false,
                });
            }
        }
    }

    /// Closes listener `i`'s connection idle longest (the earliest
    /// deadline) if its slots are full.
    fn make_room(&mut self, i: usize) {
        let mine = || self.clients.iter().filter(|(_, c)| c.listener == i);
        if mine().count() < MAX_CONNS {
            return;
        }
        if let Some(key) = mine().min_by_key(|(_, c)| c.deadline).map(|(k, _)| k) {
            self.close(key);
        }
    }

    fn serve(&mut self, key: usize) {
        let Some(c) = self.clients.get_mut(key) else {
            return;
        };
        let keep = c.pump(&self.render);
        if !keep {
            self.close(key);
        }
    }

    fn close(&mut self, key: usize) {
        let mut c = self.clients.remove(key);
        let _ = self.poll.registry().deregister(c.stream.source());
    }

    fn expire(&mut self) {
        let now = Instant::now();
        let idle: Vec<usize> = self
            .clients
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(k, _)| k)
            .collect();
        for key in idle {
            self.close(key);
        }
    }
}

impl Client {
    /// Writes, reads and answers until the socket would block; false when
    /// the connection is done.
    fn pump(&mut self, render: &Render) -> bool {
        loop {
            if !self.flush() {
                return false;
            }
            if self.written < self.output.len() {
                return true; // wait for WRITABLE
            }
            if self.close_after {
                return false;
            }
            if self.answer(render) {
                continue;
            }
            match self.read_more() {
                Some(true) => continue,
                Some(false) => return true,
                None => return false,
            }
        }
    }

    fn flush(&mut self) -> bool {
        while self.written < self.output.len() {
            match self.stream.write(&self.output[self.written..]) {
                Ok(0) => return false,
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        self.output.clear();
        self.written = 0;
        true
    }

    /// Reads what is there: `Some(true)` if bytes came, `Some(false)` if
    /// none, `None` on EOF or error.
    fn read_more(&mut self) -> Option<bool> {
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => {
                    self.input.extend_from_slice(&buf[..n]);
                    return Some(true);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
    }

    /// Answers the request at the front of the input, if it is complete (or
    /// hopeless); returns whether a response was queued.
    fn answer(&mut self, render: &Render) -> bool {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let (status, body, used, close) = match req.parse(&self.input) {
            Ok(httparse::Status::Complete(used)) => {
                let (status, body) = route(&req, render);
                (status, body, used, wants_close(&req))
            }
            Ok(httparse::Status::Partial) if self.input.len() <= MAX_REQUEST => return false,
            Ok(httparse::Status::Partial) => ("431 Request Header Fields Too Large", None, 0, true),
            Err(httparse::Error::TooManyHeaders) => {
                ("431 Request Header Fields Too Large", None, 0, true)
            }
            Err(_) => ("400 Bad Request", None, 0, true),
        };
        let is_head = req.method == Some("HEAD");
        self.input.drain(..used.min(self.input.len()));
        self.close_after = close || used == 0;
        let body = body.unwrap_or_else(|| format!("{status}\n"));
        let _ = write!(
            self.output,
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\n{}\r\n",
            body.len(),
            if self.close_after { "Connection: close\r\n" } else { "" }
        );
        if !is_head {
            self.output.extend_from_slice(body.as_bytes());
        }
        self.deadline = Instant::now() + IDLE;
        true
    }
}

/// The status and body for a parsed request.
fn route(req: &httparse::Request<'_, '_>, render: &Render) -> (&'static str, Option<String>) {
    let has_body = req.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            || (h.name.eq_ignore_ascii_case("content-length") && h.value != b"0")
    });
    if has_body {
        return ("400 Bad Request", None);
    }
    match (req.method, req.path) {
        (Some("GET" | "HEAD"), Some("/metrics")) => ("200 OK", Some(render())),
        (Some("GET" | "HEAD"), _) => ("404 Not Found", None),
        _ => ("405 Method Not Allowed", None),
    }
}

/// HTTP/1.0 closes unless asked to keep alive; HTTP/1.1 keeps alive unless
/// asked to close.
fn wants_close(req: &httparse::Request<'_, '_>) -> bool {
    let conn = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("connection"))
        .map(|h| h.value.to_ascii_lowercase());
    match req.version {
        Some(1) => conn.as_deref() == Some(b"close"),
        _ => conn.as_deref() != Some(b"keep-alive"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    fn get(stream: &mut std::os::unix::net::UnixStream, req: &str) -> (String, String) {
        stream.write_all(req.as_bytes()).unwrap();
        let mut r = BufReader::new(stream.try_clone().unwrap());
        let mut status = String::new();
        r.read_line(&mut status).unwrap();
        let mut len = 0;
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length: ") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).unwrap();
        (status, String::from_utf8(body).unwrap())
    }

    #[test]
    fn serves_metrics_keeps_alive_and_refuses_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.sock");
        let addr = MetricsAddr::Unix(path.clone());
        let n = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let n2 = n.clone();
        let render: Render =
            Box::new(move || format!("x {}\n", n2.fetch_add(1, Ordering::Relaxed)));
        let server = MetricsServer::start(&[addr], 0o600, None, render).unwrap();
        let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let (st, body) = get(&mut s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(st.starts_with("HTTP/1.1 200"), "{st}");
        assert_eq!(body, "x 0\n");
        // Same connection again (keep-alive), then a wrong path and method.
        assert_eq!(get(&mut s, "GET /metrics HTTP/1.1\r\n\r\n").1, "x 1\n");
        assert!(get(&mut s, "GET /other HTTP/1.1\r\n\r\n").0.contains("404"));
        assert!(get(&mut s, "POST /metrics HTTP/1.1\r\n\r\n")
            .0
            .contains("405"));
        // Garbage: 400 and the connection is closed.
        let mut g = std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert!(get(&mut g, "\x01\x02garbage\r\n\r\n").0.contains("400"));
        let mut rest = Vec::new();
        assert_eq!(g.read_to_end(&mut rest).unwrap(), 0);
        // An endless header: 431 once past the limit.
        let mut big = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let long = format!(
            "GET /metrics HTTP/1.1\r\nX: {}",
            "a".repeat(MAX_REQUEST + 10)
        );
        assert!(get(&mut big, &long).0.contains("431"));
        drop(server);
        assert!(!path.exists(), "the socket file goes with the server");
    }

    #[test]
    fn addresses_parse() {
        assert_eq!(
            "unix:/run/m.sock".parse::<MetricsAddr>(),
            Ok(MetricsAddr::Unix("/run/m.sock".into()))
        );
        assert_eq!(
            "127.0.0.1:9100".parse::<MetricsAddr>(),
            Ok(MetricsAddr::Tcp("127.0.0.1:9100".parse().unwrap()))
        );
        assert!("unix:".parse::<MetricsAddr>().is_err());
        assert!("nonsense".parse::<MetricsAddr>().is_err());
    }
}
