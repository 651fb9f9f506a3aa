//! Where a blob's bytes come from, decided once per GetBlob: a plain id is a
//! blob of the `--backend`; a reference (`HOST[:PORT]/REPO@sha256:HEX`) is
//! a blob of a registry reached through the reference backend. Both end in a
//! cache key (the file name in the work dir): the backend's canonical id, or
//! `sha256:HEX` for a reference, so every reference to one digest shares
//! one cache entry with a registry `--backend` serving the same digest.
//!
//! Keys are one-to-one with what they name, and always a valid file name:
//! a plain `sha256:…` id of a backend that checks no digest gets
//! `local-sha256:…` (not the digest's entry); a plain id that itself starts
//! with `local-sha256:` is escaped to `plain@…` (plain ids never contain
//! `@`); a derived key longer than `NAME_MAX` becomes `long@sha256:` and the
//! sha256 of the key. Every other id is its own key, as before.

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

/// Longest name a file in the work dir may have (Linux NAME_MAX).
const NAME_MAX: usize = 255;

/// Prefix of the key of a plain digest id whose bytes are not checked.
const UNVERIFIED: &str = "local-";

/// The cache key and source of a plain id whose backend calls it `id`
/// (`verified`: the backend checks the digest `id` names, if any). See
/// the module docs for why every key is distinct and a valid file name.
fn plain_key(id: String, verified: bool) -> (String, Source) {
    let key = if id.starts_with("sha256:") && !verified {
        // A plain id of a backend that does not check digests must not
        // share the cache entry of the digest it spells: a reference's
        // bytes are verified, a local file's are not.
        format!("{UNVERIFIED}{id}")
    } else if id.starts_with("local-sha256:") {
        // Would be taken for the key of the unverified id above.
        format!("plain@{id}")
    } else {
        return (id, Source::Backend);
    };
    let key = if key.len() > NAME_MAX {
        // Keys of ids the protocol accepts must be names the file system
        // accepts; the hash of the key keeps them apart.
        use sha2::Digest;
        let digest = sha2::Sha256::digest(key.as_bytes());
        format!("long@sha256:{}", hex::encode(digest))
    } else {
        key
    };
    (key, Source::BackendAs(id.into()))
}

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
            let verified = self.default.expected_sha256(&key).is_some();
            return Ok(plain_key(key, verified));
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

    /// Review finding: the plain id `local-sha256:H` had the key the plain
    /// id `sha256:H` got on a backend that checks no digest, so two blobs
    /// shared a cache file; and the `local-` prefix pushed a 250-255 byte
    /// id past NAME_MAX (always EIO). Keys are now distinct and fit.
    #[test]
    fn distinct_ids_never_share_a_key_and_every_key_is_a_file_name() {
        let s = Sources::new(
            Arc::new(LocalFs::new("/nonexistent")),
            Some(Arc::new(LocalFs::new("/nonexistent"))),
            AllowList::new(),
        );
        let hex = "cd".repeat(32);
        let long = format!("sha256:{}", "e".repeat(248));
        let ids = [
            format!("sha256:{hex}"),
            format!("local-sha256:{hex}"),
            format!("plain@local-sha256:{hex}").replace('@', "-"),
            long.clone(),
            format!("local-{long}")[..255].to_string(),
            format!("local-sha256:{}", "f".repeat(242)),
            "x".repeat(255),
            format!("127.0.0.1:5000/a/b@sha256:{hex}"),
        ];
        let mut keys = std::collections::HashSet::new();
        for id in &ids {
            let (key, src) = s.resolve(&field(id)).unwrap();
            assert!(key.len() <= NAME_MAX, "{id}: key of {} bytes", key.len());
            assert!(!key.contains('/') && !key.starts_with('.'), "{key}");
            assert!(keys.insert(key.clone()), "{id} shares key {key}");
            if !id.contains('@') {
                assert_eq!(s.backend(&src, &key).1, id.as_str(), "asked as itself");
            }
        }
        // Existing keys stay: ordinary ids and unverified digest ids.
        assert_eq!(s.resolve(&field("x")).unwrap().0, "x");
        let plain = s.resolve(&field(&format!("sha256:{hex}"))).unwrap().0;
        assert_eq!(plain, format!("local-sha256:{hex}"));
    }
}
