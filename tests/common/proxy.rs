//! A small forwarding HTTP proxy on 127.0.0.1, to put in front of the daemon
//! with `HTTP_PROXY`: it takes absolute-form requests (`GET
//! http://host:port/path HTTP/1.1`, what a client sends to an HTTP proxy),
//! forwards each to its target on a connection of its own, and streams the
//! response back (Content-Length, chunked, or until the target closes),
//! keeping the client's connection alive when it can. It counts requests
//! and response body bytes per target (`host:port`).
//!
//! Targets must be loopback addresses (anything else answers 403): tests
//! never send traffic off the machine. No CONNECT (tests use plain HTTP on
//! loopback; it answers 501), no request bodies other than Content-Length.
//! One thread per client connection; stopped accepting on drop.

use super::wait::wait_until;
use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A request the proxy got, with what came of it.
#[derive(Clone, Debug)]
pub struct Proxied {
    pub method: String,
    /// `host:port` of the target.
    pub target: String,
    /// Path and query at the target.
    pub path: String,
    /// The target's status, 0 while in flight; the proxy's own error status
    /// (400, 403, 501, 502) when it did not forward.
    pub status: u16,
    /// Response body bytes forwarded to the client.
    pub bytes: u64,
}

#[derive(Default)]
struct Shared {
    log: Mutex<Vec<Proxied>>,
    active: AtomicUsize,
    stop: AtomicBool,
}

pub struct HttpProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl HttpProxy {
    pub fn start() -> HttpProxy {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                std::thread::spawn(move || serve_client(conn, &s));
            }
        });
        HttpProxy { addr, shared }
    }

    /// `http://127.0.0.1:PORT`, for `HTTP_PROXY`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Proxied> {
        self.shared.log.lock().unwrap().clone()
    }

    /// Requests so far for `target` (`host:port`).
    pub fn count(&self, target: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.target == target)
            .count()
    }

    /// Response body bytes forwarded so far from `target`.
    pub fn bytes(&self, target: &str) -> u64 {
        self.requests()
            .iter()
            .filter(|r| r.target == target)
            .map(|r| r.bytes)
            .sum()
    }

    /// Requests per target.
    pub fn counts(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for r in self.requests() {
            *m.entry(r.target).or_default() += 1;
        }
        m
    }

    /// Waits until no request is being forwarded (the counts are final for
    /// what clients have received); true if so within `timeout`.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        wait_until(timeout, || self.shared.active.load(Ordering::SeqCst) == 0)
    }
}

impl Drop for HttpProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Header lines as (name, value).
type Headers = Vec<(String, String)>;

/// Reads a request or response head: the first line and the header lines,
/// without line ends. `None` on EOF before the first byte.
fn read_head(rd: &mut impl BufRead) -> io::Result<Option<(String, Headers)>> {
    let mut first = String::new();
    if rd.read_line(&mut first)? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if rd.read_line(&mut h)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (n, v) = h
            .split_once(':')
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad header"))?;
        headers.push((n.trim().to_string(), v.trim().to_string()));
    }
    Ok(Some((first.trim_end().to_string(), headers)))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn has_token(headers: &[(String, String)], name: &str, token: &str) -> bool {
    header(headers, name)
        .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Headers that belong to one hop and are not forwarded.
fn hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

fn answer(out: &mut TcpStream, status: u16, why: &str) -> io::Result<()> {
    write!(
        out,
        "HTTP/1.1 {status} {why}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{why}",
        why.len()
    )
}

fn serve_client(conn: TcpStream, shared: &Shared) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut rd = BufReader::new(conn);
    loop {
        let Ok(Some((line, headers))) = read_head(&mut rd) else {
            return;
        };
        shared.active.fetch_add(1, Ordering::SeqCst);
        let keep = forward(&line, &headers, &mut rd, &mut out, shared);
        shared.active.fetch_sub(1, Ordering::SeqCst);
        if !matches!(keep, Ok(true)) {
            return;
        }
    }
}

/// Handles one request; Ok(true) when the client connection may carry
/// another.
fn forward(
    line: &str,
    headers: &[(String, String)],
    rd: &mut BufReader<TcpStream>,
    out: &mut TcpStream,
    shared: &Shared,
) -> io::Result<bool> {
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut rec = Proxied {
        method: method.to_string(),
        target: String::new(),
        path: String::new(),
        status: 0,
        bytes: 0,
    };
    let refuse = |rec: &mut Proxied, out: &mut TcpStream, status, why| {
        rec.status = status;
        shared.log.lock().unwrap().push(rec.clone());
        answer(out, status, why).map(|_| false)
    };
    if method.eq_ignore_ascii_case("CONNECT") {
        return refuse(&mut rec, out, 501, "CONNECT is not supported");
    }
    let Some(url) = url::Url::parse(target)
        .ok()
        .filter(|u| u.scheme() == "http" && u.host_str().is_some())
    else {
        return refuse(&mut rec, out, 400, "not an absolute http URL");
    };
    let host = url.host_str().unwrap_or("").trim_matches(['[', ']']);
    let port = url.port_or_known_default().unwrap_or(80);
    rec.target = format!("{}:{port}", url.host_str().unwrap_or(""));
    rec.path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return refuse(&mut rec, out, 403, "only loopback targets");
    }
    if has_token(headers, "Transfer-Encoding", "chunked") {
        return refuse(
            &mut rec,
            out,
            501,
            "chunked request bodies are not supported",
        );
    }
    let body_len: u64 = header(headers, "Content-Length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = Vec::new();
    rd.by_ref().take(body_len).read_to_end(&mut body)?;
    let client_close = has_token(headers, "Connection", "close")
        || has_token(headers, "Proxy-Connection", "close");
    let index = {
        let mut log = shared.log.lock().unwrap();
        log.push(rec.clone());
        log.len() - 1
    };
    let set = |f: &dyn Fn(&mut Proxied)| f(&mut shared.log.lock().unwrap()[index]);

    let Ok(up) = TcpStream::connect((host, port)) else {
        set(&|r| r.status = 502);
        return answer(out, 502, "cannot connect").map(|_| false);
    };
    up.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut req = format!("{method} {} HTTP/1.1\r\n", rec.path);
    for (n, v) in headers.iter().filter(|(n, _)| !hop_by_hop(n)) {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("Connection: close\r\n\r\n");
    (&up).write_all(req.as_bytes())?;
    (&up).write_all(&body)?;
    let mut urd = BufReader::new(up);
    let (status_line, resp_headers, status) = loop {
        let Some((status_line, h)) = read_head(&mut urd)? else {
            set(&|r| r.status = 502);
            return answer(out, 502, "no response").map(|_| false);
        };
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if (100..200).contains(&status) {
            continue; // an interim response; the final one follows
        }
        set(&|r| r.status = status);
        break (status_line, h, status);
    };
    let no_body = method.eq_ignore_ascii_case("HEAD") || status == 204 || status == 304;
    let chunked = has_token(&resp_headers, "Transfer-Encoding", "chunked");
    let length: Option<u64> = header(&resp_headers, "Content-Length").and_then(|v| v.parse().ok());
    let until_eof = !no_body && !chunked && length.is_none();
    let mut head = format!("{status_line}\r\n");
    for (n, v) in resp_headers.iter().filter(|(n, _)| !hop_by_hop(n)) {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    if until_eof || client_close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    let counted = |n: u64| set(&|r| r.bytes += n);
    if no_body {
    } else if chunked {
        copy_chunked(&mut urd, out, &counted)?;
    } else {
        let mut src: Box<dyn Read> = match length {
            Some(n) => Box::new((&mut urd).take(n)),
            None => Box::new(&mut urd),
        };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = src.read(&mut buf)?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n])?;
            counted(n as u64);
        }
    }
    Ok(!until_eof && !client_close)
}

/// Copies a chunked body as it is (framing included), counting payload
/// bytes.
fn copy_chunked(
    rd: &mut BufReader<TcpStream>,
    out: &mut TcpStream,
    counted: &dyn Fn(u64),
) -> io::Result<()> {
    loop {
        let mut size_line = String::new();
        if rd.read_line(&mut size_line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        out.write_all(size_line.as_bytes())?;
        let hex = size_line.trim_end().split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(hex, 16)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
        if size == 0 {
            // Trailers, then the empty line.
            loop {
                let mut t = String::new();
                if rd.read_line(&mut t)? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                out.write_all(t.as_bytes())?;
                if t.trim_end().is_empty() {
                    return Ok(());
                }
            }
        }
        let n = io::copy(&mut rd.by_ref().take(size + 2), out)?;
        if n != size + 2 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        counted(size);
    }
}
