//! blobmgr: the per-host remote blob manager of a lazily-pulled container
//! image service.
//!
//! One daemon owns the blob cache and serves local clients over a Unix
//! socket. The control plane is the small binary protocol of [`protocol`];
//! the data plane is a file descriptor: GetBlob hands the client a read-only
//! fd of the blob's cache file, FetchRange makes a range of it valid.
//!
//! Data flows one way: socket → [`connection`] (decoder) → [`reactor`] →
//! [`service`] (the protocol's rules over the [`cache`] index) → replies →
//! [`reactor`] → [`connection`] (encoder) → socket; slow work leaves the
//! service as [`jobs`] for the [`worker`] pool, running on a [`backend`], and
//! comes back through one completion queue. [`server`] wires them and is
//! what a daemon or a host event loop drives. See docs/ARCHITECTURE.md.
//!
//! Blob references to any registry are read by [`reference`](mod@reference) (ids and
//! `--allow-registry`), [`hosts`] (containerd's hosts.toml: mirrors, TLS,
//! headers) and [`credentials`] (Docker's config.json and credential
//! helpers).
//!
//! Running under a service manager: [`systemd`] (socket activation and
//! readiness notification) and [`workdir`] (one daemon per work dir).
//! [`mount`](mod@mount) is a client of the daemon: the blobs as a read-only FUSE
//! file system (`blobmgr mount`).

pub mod backend;
pub mod cache;
pub mod client;
pub mod connection;
pub mod credentials;
pub mod hosts;
pub mod jobs;
pub mod listener;
pub mod metrics;
pub mod mount;
pub mod protocol;
pub mod reactor;
pub mod reference;
pub mod registry;
pub mod server;
pub mod service;
pub mod source;
pub mod systemd;
pub mod workdir;
pub mod worker;

pub use server::{Server, ServerConfig};
