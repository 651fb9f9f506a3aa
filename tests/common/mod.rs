//! The integration tests' one shared harness (`mod common;` in each test
//! file, `use common::*;`). By concept:
//!
//! - `daemon.rs`: [`Daemon`], the real binary in temp dirs, killed on drop.
//! - `raw.rs`: [`Raw`], a protocol client that sees exactly what the daemon
//!   sends (fds included), [`Blob`], hand-built [`header`]s, [`pread`].
//! - `inproc.rs`: [`InProc`], the server on a thread of this process, with
//!   any backend or driven by a host event loop.
//! - `http.rs`: [`FakeHttp`], a loopback HTTP server that logs every request.
//! - `registry.rs`: [`Registry`], a real OCI registry (`docker-registry`):
//!   anonymous, basic auth, a pull-through mirror or HTTPS; push, access-log
//!   counts, kill and restart.
//! - `access.rs`: [`Access`], a line of that registry's access log, parsed.
//! - `proxy.rs`: [`HttpProxy`], a forwarding HTTP proxy that counts per target.
//! - `regfiles.rs`: [`CredHelper`] (a `docker-credential-*` script),
//!   [`DockerConfig`] (config.json), [`HostsToml`] (containerd hosts.toml).
//! - `tls.rs`: [`TestCa`], a CA and a server certificate for 127.0.0.1
//!   made with `openssl`, and [`agent_trusting`] its CA.
//! - `rng.rs`: [`Rng`], the seeded generator (`BLOBMGR_TEST_SEED`), and
//!   [`pattern`], deterministic blob data.
//! - `tmpfs.rs`: [`Tmpfs`], a small tmpfs for full-disk tests,
//!   [`free_bytes`], and [`require_root`] for tests that need root.
//! - `notify.rs`: [`NotifySink`], a fake service manager's `NOTIFY_SOCKET`
//!   that records each [`Note`] with its sender's pid.
//! - `wait.rs`: [`wait_until`] and the blocking waits; no test sleeps to
//!   synchronise (see docs/TESTING.md).
//!
//! Each test binary uses part of it, hence the allows.
#![allow(dead_code, unused_imports)]

mod access;
mod daemon;
mod http;
mod inproc;
mod notify;
mod proxy;
mod raw;
mod regfiles;
mod registry;
mod rng;
mod tls;
mod tmpfs;
mod wait;

pub use access::Access;
pub use daemon::{bin, Daemon, DAEMON_WAIT, REACH_VARS};
pub use http::{serve_data, FakeHttp, Req, Resp};
pub use inproc::InProc;
pub use notify::{Note, NotifySink};
pub use proxy::{HttpProxy, Proxied};
pub use raw::{header, pread, unread_by_peer, Blob, Raw, REPLY_TIMEOUT};
pub use regfiles::{CredHelper, DockerConfig, HostsToml};
pub use registry::{
    agent, basic_header, bcrypt_entry, digest_hex, free_port, hex, malformed_references,
    registry_available, response_header, Registry, REGISTRY_WAIT,
};
pub use rng::{env_u64, mix, parse_u64, pattern, test_seed, Rng};
pub use tls::{agent_trusting, TestCa};
pub use tmpfs::{free_bytes, require_root, Tmpfs};
pub use wait::{wait_exit, wait_until, wait_writable, Gate};

pub fn sha256(data: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(data).to_vec()
}
