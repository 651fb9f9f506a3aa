//! Where a blob's bytes come from, decided once per GetBlob: a plain id is a
//! blob of the `--backend`; a reference (`HOST[:PORT]/REPO@sha256:HEX`) is
//! a blob of a registry reached through the reference backend. Both end in a
//! cache key (the file name in the work dir): the backend's canonical id, or
//! `sha256:HEX` for a reference, so every reference to one digest shares
//! one cache entry with a registry `--backend` serving the same digest.

use crate::backend::Backend;
use crate::protocol::{self, BlobIdError, Errno};
use crate::reference::{looks_like_reference, AllowList, Reference};
use std::fmt;
use std::sync::Arc;

/// Which backend fills a blob, and under which id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The `--backend`, asked for the cache key itself.
    Backend,
    /// The `--backend`, asked for this id (its cache key differs).
    BackendAs(Arc<str>),
    /// The reference backend, asked for this reference (canonical text).
    Reference(Arc<str>),
}

/// A backend shared by the daemon, printed by its description.
#[derive(Clone)]
pub struct SharedBackend(pub Arc<dyn Backend>);

impl fmt::Debug for SharedBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.describe())
    }
}

/// The backends and the rules that map ids to them.
pub struct Sources {
    default: Arc<dyn Backend>,
    references: Option<Arc<dyn Backend>>,
    allow: AllowList,
}

/// Why an id cannot be served, before any backend is asked.
#[derive(Debug)]
pub enum ResolveError {
    BadId(BlobIdError),
    BadReference(crate::reference::ReferenceError),
    /// The backend does not accept this plain id.
    NotAnId,
    /// The reference names a host `--allow-registry` does not allow.
    NotAllowed(String),
    /// References are not served (no reference backend).
    NoReferences,
}

impl ResolveError {
    /// What GetBlob answers.
    pub fn errno(&self) -> Errno {
        match self {
            ResolveError::NotAllowed(_) => Errno::Access,
            ResolveError::NoReferences => Errno::Io,
            _ => Errno::Inval,
        }
    }
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResolveError::BadId(e) => write!(f, "{e}"),
            ResolveError::BadReference(e) => write!(f, "bad reference: {e}"),
            ResolveError::NotAnId => write!(f, "not a blob id of this backend"),
            ResolveError::NotAllowed(h) => {
                write!(f, "registry {h} is not allowed (--allow-registry)")
            }
            ResolveError::NoReferences => write!(f, "this daemon serves no references"),
        }
    }
}

impl std::error::Error for ResolveError {}

impl Sources {
    pub fn new(
        default: Arc<dyn Backend>,
        references: Option<Arc<dyn Backend>>,
        allow: AllowList,
    ) -> Sources {
        Sources {
            default,
            references,
            allow,
        }
    }

    /// The default backend (for logs and metrics).
    pub fn default_backend(&self) -> &Arc<dyn Backend> {
        &self.default
    }

    /// Per-endpoint counters of every backend.
    pub fn endpoint_stats(&self) -> Vec<crate::backend::EndpointStats> {
        let mut all = self.default.endpoint_stats();
        if let Some(r) = &self.references {
            all.extend(r.endpoint_stats());
        }
        all
    }

    /// The cache key and source of the id in a GetBlob's id field.
    pub fn resolve(
        &self,
        field: &[u8; protocol::BLOB_ID_FIELD],
    ) -> Result<(String, Source), ResolveError> {
        let text = protocol::blob_id_text(field).map_err(ResolveError::BadId)?;
        if !looks_like_reference(text) {
            let id = protocol::validate_blob_id(text.as_bytes()).map_err(ResolveError::BadId)?;
            let key = self.default.canonical_id(id).ok_or(ResolveError::NotAnId)?;
            if key.starts_with("sha256:") && self.default.expected_sha256(&key).is_none() {
                // A plain id of a backend that does not check digests must
                // not share the cache entry of the digest it spells: a
                // reference's bytes are verified, a local file's are not.
                return Ok((format!("local-{key}"), Source::BackendAs(key.into())));
            }
            return Ok((key, Source::Backend));
        }
        let r = Reference::parse(text).map_err(ResolveError::BadReference)?;
        if !self.allow.allows(r.host()) {
            return Err(ResolveError::NotAllowed(r.host().authority()));
        }
        if self.references.is_none() {
            return Err(ResolveError::NoReferences);
        }
        let key = format!("sha256:{}", r.digest().hex());
        Ok((key, Source::Reference(r.to_string().into())))
    }

    /// The backend to fill from and the id to ask it for.
    pub fn backend<'a>(&'a self, source: &'a Source, key: &'a str) -> (&'a dyn Backend, &'a str) {
        match (source, &self.references) {
            (Source::Reference(r), Some(b)) => (b.as_ref(), r),
            (Source::BackendAs(id), _) => (self.default.as_ref(), id),
            _ => (self.default.as_ref(), key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalFs;

    fn field(id: &str) -> [u8; protocol::BLOB_ID_FIELD] {
        let mut f = [0u8; protocol::BLOB_ID_FIELD];
        f[..id.len()].copy_from_slice(id.as_bytes());
        f
    }

    #[test]
    fn an_unverified_plain_id_never_shares_a_digest_key() {
        let refs: Arc<dyn Backend> = Arc::new(LocalFs::new("/nonexistent"));
        let s = Sources::new(
            Arc::new(LocalFs::new("/nonexistent")),
            Some(refs),
            AllowList::new(),
        );
        let hex = "ab".repeat(32);
        let (plain, src) = s.resolve(&field(&format!("sha256:{hex}"))).unwrap();
        assert_eq!(plain, format!("local-sha256:{hex}"));
        assert_eq!(s.backend(&src, &plain).1, format!("sha256:{hex}"));
        let (by_ref, _) = s
            .resolve(&field(&format!("127.0.0.1:5000/a/b@sha256:{hex}")))
            .unwrap();
        assert_eq!(by_ref, format!("sha256:{hex}"));
        assert_ne!(plain, by_ref);
        let (other, src) = s.resolve(&field("layer.tar")).unwrap();
        assert_eq!((other.as_str(), src), ("layer.tar", Source::Backend));
    }
}
