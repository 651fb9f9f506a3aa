//! blobmgr: the per-host remote blob manager of a lazily-pulled container
//! image service.
//!
//! One daemon owns the blob cache and serves local clients over a Unix
//! socket. The control plane is the small binary protocol of [`protocol`];
//! the data plane is a file descriptor: GetBlob hands the client a read-only
//! fd of the blob's cache file, FetchRange makes a range of it valid.
//!
//! Data flows one way: socket → [`connection`] (decoder) → [`server`]
//! (handler, [`cache`] bookkeeping, [`worker`] jobs on a [`backend`]) →
//! reply → [`connection`] (encoder) → socket. See docs/ARCHITECTURE.md.

pub mod backend;
pub mod cache;
pub mod client;
pub mod connection;
pub mod listener;
pub mod protocol;
pub mod registry;
pub mod server;
pub mod worker;

pub use server::{Server, ServerConfig};
