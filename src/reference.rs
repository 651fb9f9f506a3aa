//! OCI blob references: GetBlob ids of the form
//! `HOST[:PORT]/REPOSITORY@sha256:<64 lowercase hex>`.
//!
//! One daemon serves every image on its host, so a GetBlob id may name a
//! blob in any repository of any registry. This module parses such ids
//! strictly into a [`Reference`]; nothing here touches the network.
//!
//! - HOST ([`Host`]): a DNS name (labels of `[A-Za-z0-9-]`, not starting or
//!   ending with `-`, at most 63 bytes each and 253 in all), an IPv4 dotted
//!   quad or a bracketed IPv6 address, then an optional `:PORT` (1..=65535,
//!   digits only, no leading zero). A DNS name without a dot must be
//!   `localhost` or have a port: Docker reads `team/app@…` as
//!   `docker.io/team/app@…`, so guessing a host there would contact the
//!   wrong registry. Names are lowercased.
//! - REPOSITORY: the OCI distribution grammar, path components
//!   `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` separated by `/`, at most 255
//!   bytes. A tag (`repo:tag@sha256:…`) is refused: the digest alone names
//!   the blob.
//! - the digest ([`Digest`]): `sha256:` and exactly 64 lowercase hex digits;
//!   [`Digest::hex`] is the only part of a reference that may ever become a
//!   path component.
//! - the whole id: at most 255 bytes (the protocol's field), ASCII without
//!   NUL, whitespace or control characters.
//!
//! Docker Hub (`docker.io`, also written `index.docker.io`) is normalised as
//! containerd does: its host is `docker.io` (the key for configuration), its
//! API server `registry-1.docker.io` ([`Host::registry_authority`]), and a
//! one-component repository lives under `library/` (`docker.io/alpine` is
//! `docker.io/library/alpine`).
//!
//! [`AllowList`] implements `--allow-registry`.

mod allow;
mod host;

pub use allow::{AllowList, HostPattern, PatternError};
pub use host::{Host, HostName, DOCKER_HUB, DOCKER_HUB_REGISTRY, MAX_HOST_LEN, MAX_LABEL_LEN};

use std::fmt;

/// Longest reference: the protocol's id field holds 255 bytes and a NUL.
pub const MAX_REFERENCE_LEN: usize = 255;
/// Longest repository name (after Docker Hub's `library/` is added).
pub const MAX_REPOSITORY_LEN: usize = 255;
/// The only digest algorithm accepted.
pub const DIGEST_ALGORITHM: &str = "sha256";
/// Hex digits of a sha256 digest.
pub const DIGEST_HEX_LEN: usize = 64;

/// Whether a GetBlob id is meant as a reference rather than a plain id:
/// plain ids never contain `/` or `@`, references always do. The daemon
/// parses such an id with [`Reference::parse`] and answers EINVAL when that
/// fails.
pub fn looks_like_reference(id: &str) -> bool {
    id.contains(['/', '@'])
}

/// Why an id is not a valid reference. Each variant says what is wrong;
/// payloads are the offending part of the id (never more than 255 bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReferenceError {
    /// The id is empty.
    Empty,
    /// The id is longer than [`MAX_REFERENCE_LEN`] bytes (its length).
    TooLong(usize),
    /// The id contains a NUL byte.
    Nul,
    /// The id contains whitespace.
    Whitespace,
    /// The id contains a control character or a non-ASCII character.
    BadChar(char),
    /// There is no `@` before the digest.
    MissingDigest,
    /// There is no `/` between host and repository.
    MissingRepository,
    /// The host part is empty.
    EmptyHost,
    /// The DNS name is longer than [`MAX_HOST_LEN`] bytes (its length).
    HostTooLong(usize),
    /// A DNS label is empty, too long, has a character outside
    /// `[A-Za-z0-9-]` or a `-` at either end, or is an `xn--` label that is
    /// not valid IDNA (the label; the whole name when only the whole fails).
    BadHostLabel(String),
    /// A name whose last label is numeric is not a valid dotted quad.
    BadIpv4(String),
    /// A bracketed IPv6 address does not parse, or an IPv6 address is not
    /// bracketed.
    BadIpv6(String),
    /// A DNS name without a dot that is not `localhost` and has no port
    /// (Docker would read it as a Docker Hub path).
    UnqualifiedHost(String),
    /// The port is not 1..=65535 written as plain digits without a leading
    /// zero (the port as written).
    BadPort(String),
    /// A repository path component does not follow the OCI grammar (the
    /// component; empty for an empty repository or `//`).
    BadRepository(String),
    /// The repository is longer than [`MAX_REPOSITORY_LEN`] bytes.
    RepositoryTooLong(usize),
    /// The repository carries a tag (the tag).
    Tag(String),
    /// The digest algorithm is not `sha256` (the algorithm).
    UnsupportedAlgorithm(String),
    /// The digest is not `sha256:` and 64 lowercase hex digits.
    BadDigest,
}

impl fmt::Display for ReferenceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ReferenceError::*;
        match self {
            Empty => write!(f, "empty reference"),
            TooLong(n) => write!(f, "reference is {n} bytes, at most {MAX_REFERENCE_LEN}"),
            Nul => write!(f, "reference contains a NUL byte"),
            Whitespace => write!(f, "reference contains whitespace"),
            BadChar(c) => write!(f, "reference contains character {c:?}"),
            MissingDigest => write!(f, "reference has no @sha256:<digest>"),
            MissingRepository => write!(f, "reference has no /repository after its host"),
            EmptyHost => write!(f, "reference has an empty host"),
            HostTooLong(n) => write!(f, "host name is {n} bytes, at most {MAX_HOST_LEN}"),
            BadHostLabel(l) => write!(f, "bad host name label {l:?}"),
            BadIpv4(h) => write!(f, "{h:?} is numeric but not an IPv4 dotted quad"),
            BadIpv6(h) => write!(f, "bad IPv6 host {h}"),
            UnqualifiedHost(h) => write!(
                f,
                "host {h:?} has no dot and no port and is not localhost \
                 (write docker.io/{h}/... for Docker Hub)"
            ),
            BadPort(p) => write!(f, "bad port {p:?}: 1 to 65535, no sign or leading zero"),
            BadRepository(c) => write!(f, "bad repository path component {c:?}"),
            RepositoryTooLong(n) => {
                write!(f, "repository is {n} bytes, at most {MAX_REPOSITORY_LEN}")
            }
            Tag(t) => write!(
                f,
                "reference has a tag {t:?}; only a digest may name a blob"
            ),
            UnsupportedAlgorithm(a) => write!(f, "digest algorithm {a:?} is not sha256"),
            BadDigest => write!(f, "digest is not sha256: and 64 lowercase hex digits"),
        }
    }
}

impl std::error::Error for ReferenceError {}

/// A sha256 digest: 64 lowercase hex digits.
///
/// [`hex`](Digest::hex) is the only part of a reference that may become a
/// path component (the cache file's name is derived from it); its alphabet
/// is `[0-9a-f]`, so it can never name another directory.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: [u8; DIGEST_HEX_LEN],
}

impl Digest {
    /// Parses `sha256:<64 lowercase hex>`.
    pub fn parse(s: &str) -> Result<Digest, ReferenceError> {
        let (algorithm, hex) = s.split_once(':').ok_or(ReferenceError::BadDigest)?;
        if algorithm != DIGEST_ALGORITHM {
            return Err(ReferenceError::UnsupportedAlgorithm(algorithm.to_string()));
        }
        Digest::from_hex(hex)
    }

    /// Takes 64 lowercase hex digits (without `sha256:`).
    pub fn from_hex(hex: &str) -> Result<Digest, ReferenceError> {
        let bytes: [u8; DIGEST_HEX_LEN] = hex
            .as_bytes()
            .try_into()
            .map_err(|_| ReferenceError::BadDigest)?;
        if !bytes.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(ReferenceError::BadDigest);
        }
        Ok(Digest { hex: bytes })
    }

    /// The 64 lowercase hex digits: safe as a file name.
    pub fn hex(&self) -> &str {
        // Only ASCII hex digits are ever stored.
        std::str::from_utf8(&self.hex).expect("digest hex is ASCII")
    }
}

impl fmt::Display for Digest {
    /// `sha256:<hex>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{DIGEST_ALGORITHM}:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl std::str::FromStr for Digest {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Digest, ReferenceError> {
        Digest::parse(s)
    }
}

/// A parsed blob reference: which registry, which repository, which blob.
///
/// Its `Display` form is canonical (`docker.io/library/alpine@sha256:…`), so
/// two ids naming the same blob the same way print the same; the cache is
/// keyed by [`digest`](Reference::digest) alone.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    host: Host,
    repository: String,
    digest: Digest,
}

impl Reference {
    /// Parses `HOST[:PORT]/REPOSITORY@sha256:<hex>` (see the
    /// [module docs](self) for the exact rules).
    pub fn parse(id: &str) -> Result<Reference, ReferenceError> {
        check_id(id)?;
        let (name, digest) = id.split_once('@').ok_or(ReferenceError::MissingDigest)?;
        let (host, repository) = name
            .split_once('/')
            .ok_or(ReferenceError::MissingRepository)?;
        let host = Host::parse(host)?;
        check_qualified(&host)?;
        let repository = parse_repository(&host, repository)?;
        let digest = Digest::parse(digest)?;
        Ok(Reference {
            host,
            repository,
            digest,
        })
    }

    /// The registry host (with its port, if any).
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The repository, e.g. `library/alpine`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The blob's digest.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.host, self.repository, self.digest)
    }
}

impl std::str::FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Reference, ReferenceError> {
        Reference::parse(s)
    }
}

/// Whole-id checks: length and characters.
fn check_id(id: &str) -> Result<(), ReferenceError> {
    if id.is_empty() {
        return Err(ReferenceError::Empty);
    }
    if id.len() > MAX_REFERENCE_LEN {
        return Err(ReferenceError::TooLong(id.len()));
    }
    if id.contains('\0') {
        return Err(ReferenceError::Nul);
    }
    if id.contains(char::is_whitespace) {
        return Err(ReferenceError::Whitespace);
    }
    match id.chars().find(|c| !c.is_ascii() || c.is_ascii_control()) {
        Some(c) => Err(ReferenceError::BadChar(c)),
        None => Ok(()),
    }
}

/// A dotless DNS name is a host only as `localhost` or with a port.
fn check_qualified(host: &Host) -> Result<(), ReferenceError> {
    match host.name() {
        HostName::Domain(d) if host.port().is_none() && d != "localhost" && !d.contains('.') => {
            Err(ReferenceError::UnqualifiedHost(d.clone()))
        }
        _ => Ok(()),
    }
}

/// Checks the repository grammar and adds Docker Hub's `library/`.
fn parse_repository(host: &Host, repository: &str) -> Result<String, ReferenceError> {
    if let Some((_, tag)) = repository.rsplit_once(':') {
        return Err(ReferenceError::Tag(tag.to_string()));
    }
    if let Some(bad) = repository.split('/').find(|c| !is_path_component(c)) {
        return Err(ReferenceError::BadRepository(bad.to_string()));
    }
    let repository = if host.is_docker_hub() && !repository.contains('/') {
        format!("library/{repository}")
    } else {
        repository.to_string()
    };
    if repository.len() > MAX_REPOSITORY_LEN {
        return Err(ReferenceError::RepositoryTooLong(repository.len()));
    }
    Ok(repository)
}

/// One path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn is_path_component(component: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let b = component.as_bytes();
    let mut i = 0;
    loop {
        // A run of [a-z0-9]+.
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == b.len() {
            return true;
        }
        // A separator: '.', '_', '__' or '-'+, followed by another run.
        let sep = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => i += if b.get(i + 1) == Some(&b'_') { 2 } else { 1 },
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        debug_assert!(i > sep);
    }
}

#[cfg(test)]
mod tests;
