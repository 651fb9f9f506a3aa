//! A minimal HTTP/1.1 GET for `blobmgr status`: one request over TCP or a
//! Unix socket, `Connection: close`, with a body sized by Content-Length,
//! chunked encoding, or the end of the connection. Enough for a metrics
//! endpoint on this host; not a general client (no TLS, no redirects).

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// Deadline of connecting, and of each read or write.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response accepted.
const MAX_RESPONSE: u64 = 64 << 20;

/// Where a metrics endpoint listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `HOST:PORT`
    Tcp(String),
    /// `unix:PATH`
    Unix(PathBuf),
}

impl Endpoint {
    /// `HOST:PORT` or `unix:PATH`, as `--metrics` takes it.
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("{s:?}: unix: needs a path"));
            }
            return Ok(Endpoint::Unix(path.into()));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Endpoint::Tcp(s.to_string()))
            }
            _ => Err(format!("{s:?} is not HOST:PORT or unix:PATH")),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// GETs `path` from `ep`; the body of a 200 answer, else an error.
pub fn get(ep: &Endpoint, path: &str) -> io::Result<Vec<u8>> {
    let host = match ep {
        Endpoint::Tcp(a) => a.as_str(),
        Endpoint::Unix(_) => "localhost",
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    );
    let response = match ep {
        Endpoint::Tcp(addr) => {
            let mut s = connect_tcp(addr)?;
            s.set_read_timeout(Some(TIMEOUT))?;
            s.set_write_timeout(Some(TIMEOUT))?;
            exchange(&mut s, &request)?
        }
        Endpoint::Unix(p) => {
            let mut s = UnixStream::connect(p)?;
            s.set_read_timeout(Some(TIMEOUT))?;
            s.set_write_timeout(Some(TIMEOUT))?;
            exchange(&mut s, &request)?
        }
    };
    body_of(&response)
}

fn connect_tcp(addr: &str) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Sends the request and reads the whole response (to the end of the
/// connection, which `Connection: close` asks the server for).
fn exchange<S: Read + Write>(s: &mut S, request: &str) -> io::Result<Vec<u8>> {
    s.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    s.take(MAX_RESPONSE + 1).read_to_end(&mut response)?;
    if response.len() as u64 > MAX_RESPONSE {
        return Err(io::Error::other("response larger than 64 MiB"));
    }
    Ok(response)
}

fn bad(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

/// The body of a complete response, checked for status 200.
pub fn body_of(response: &[u8]) -> io::Result<Vec<u8>> {
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no complete HTTP header in the answer"))?;
    let head = String::from_utf8_lossy(&response[..end]);
    let body = &response[end + 4..];
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let mut parts = status.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !version.starts_with("HTTP/1.") {
        return Err(bad(format!("not an HTTP/1 answer: {status:?}")));
    }
    if code != "200" {
        return Err(bad(format!(
            "HTTP {}",
            status.trim_start_matches(version).trim()
        )));
    }
    let header = |name: &str| {
        head.split("\r\n").skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    if header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        return dechunk(body);
    }
    match header("content-length") {
        Some(len) => {
            let len: usize = len
                .parse()
                .map_err(|_| bad(format!("Content-Length {len:?}")))?;
            body.get(..len)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| bad(format!("body cut short: {} of {len} bytes", body.len())))
        }
        None => Ok(body.to_vec()),
    }
}

/// Decodes a chunked body.
fn dechunk(mut b: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| bad("chunked body cut short"))?;
        let size_text = String::from_utf8_lossy(&b[..eol]);
        let size_hex = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| bad(format!("chunk size {size_hex:?}")))?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = b.get(..size).ok_or_else(|| bad("chunked body cut short"))?;
        out.extend_from_slice(chunk);
        b = b
            .get(size + 2..)
            .ok_or_else(|| bad("chunked body cut short"))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            Endpoint::parse("127.0.0.1:9100"),
            Ok(Endpoint::Tcp("127.0.0.1:9100".into()))
        );
        assert_eq!(
            Endpoint::parse("[::1]:9100"),
            Ok(Endpoint::Tcp("[::1]:9100".into()))
        );
        assert_eq!(
            Endpoint::parse("unix:/run/m.sock"),
            Ok(Endpoint::Unix("/run/m.sock".into()))
        );
        for bad in ["9100", "host", ":80", "h:99999", "unix:"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bodies() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef";
        assert_eq!(body_of(r).unwrap(), b"abc");
        let r = b"HTTP/1.0 200 OK\r\n\r\nto the end";
        assert_eq!(body_of(r).unwrap(), b"to the end");
        let r = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(body_of(r).unwrap(), b"abcde");
        let e = body_of(b"HTTP/1.1 404 Not Found\r\n\r\n").unwrap_err();
        assert_eq!(e.to_string(), "HTTP 404 Not Found");
        assert!(body_of(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc").is_err());
        assert!(body_of(b"SSH-2.0\r\n\r\n").is_err());
        assert!(body_of(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
