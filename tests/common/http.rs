//! A small HTTP/1.1 server on a loopback address, for backends that talk
//! HTTP (the registry backend): every request is logged, in arrival order,
//! before the handler answers it, so a test that got its reply can count the
//! requests at once.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A request as the server read it (a body, if any, is skipped).
#[derive(Clone, Debug)]
pub struct Req {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Req {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn path_only(&self) -> &str {
        self.path.split('?').next().unwrap_or("")
    }

    pub fn query(&self) -> HashMap<String, String> {
        let q = self.path.split_once('?').map_or("", |(_, q)| q);
        url::form_urlencoded::parse(q.as_bytes())
            .into_owned()
            .collect()
    }
}

/// What a handler answers; `Content-Length` is added.
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn new(status: u16) -> Resp {
        Resp {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn header(mut self, n: &str, v: &str) -> Resp {
        self.headers.push((n.into(), v.into()));
        self
    }

    pub fn body(mut self, b: Vec<u8>) -> Resp {
        self.body = b;
        self
    }
}

/// Serves `data` for a GET or HEAD: honouring Range (206) when `ranges`,
/// else the whole body (200).
pub fn serve_data(req: &Req, data: &[u8], ranges: bool) -> Resp {
    if ranges {
        if let Some(r) = req.header("Range").and_then(|r| r.strip_prefix("bytes=")) {
            let (a, b) = r.split_once('-').expect("range");
            let a: usize = a.parse().expect("range start");
            let b: usize = b.parse::<usize>().expect("range end").min(data.len() - 1);
            return Resp::new(206)
                .header("Content-Range", &format!("bytes {a}-{b}/{}", data.len()))
                .body(data[a..=b].to_vec());
        }
    }
    Resp::new(200).body(data.to_vec())
}

pub type Handler = dyn Fn(&Req) -> Resp + Send + Sync;

/// An HTTP/1.1 server on a loopback address (`ip` may be any of 127/8, to
/// play a second host): every request is logged and answered by the
/// handler; connections are kept alive. It stops accepting on drop.
pub struct FakeHttp {
    pub addr: SocketAddr,
    reqs: Arc<Mutex<Vec<Req>>>,
    stop: Arc<AtomicBool>,
}

impl FakeHttp {
    pub fn start(ip: &str, handler: impl Fn(&Req) -> Resp + Send + Sync + 'static) -> FakeHttp {
        let listener = TcpListener::bind((ip, 0)).expect("bind fake server");
        let addr = listener.local_addr().expect("addr");
        let reqs = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let (r2, s2) = (reqs.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (h, r) = (handler.clone(), r2.clone());
                std::thread::spawn(move || serve_conn(conn, &*h, &r));
            }
        });
        FakeHttp { addr, reqs, stop }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Req> {
        self.reqs.lock().unwrap().clone()
    }

    /// Requests so far with this method and a path starting with `path_prefix`.
    pub fn count(&self, method: &str, path_prefix: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method == method && r.path.starts_with(path_prefix))
            .count()
    }
}

impl Drop for FakeHttp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve_conn(conn: TcpStream, handler: &Handler, log: &Mutex<Vec<Req>>) {
    // Idle keep-alive connections end on their own.
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut rd = BufReader::new(conn);
    loop {
        let mut line = String::new();
        match rd.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut parts = line.split_whitespace();
        let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
            return;
        };
        let mut req = Req {
            method: method.to_string(),
            path: path.to_string(),
            headers: Vec::new(),
        };
        loop {
            let mut h = String::new();
            if rd.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((n, v)) = h.split_once(':') {
                req.headers
                    .push((n.trim().to_string(), v.trim().to_string()));
            }
        }
        // Requests with a body are not expected; skip one if present.
        if let Some(n) = req
            .header("Content-Length")
            .and_then(|v| v.parse::<u64>().ok())
        {
            let _ = std::io::copy(&mut (&mut rd).take(n), &mut std::io::sink());
        }
        log.lock().unwrap().push(req.clone());
        let resp = handler(&req);
        let mut head = format!("HTTP/1.1 {} X\r\n", resp.status);
        for (n, v) in &resp.headers {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", resp.body.len()));
        if out.write_all(head.as_bytes()).is_err() {
            return;
        }
        if req.method != "HEAD" && out.write_all(&resp.body).is_err() {
            return;
        }
    }
}
