//! What a name in the mounted tree means, decided without I/O.
//!
//! The root holds plain blob ids (`MOUNTPOINT/layer.tar`) and the first
//! component of blob references (`MOUNTPOINT/HOST:PORT/...`). Below a host,
//! every component but the last is a repository path component, and the
//! last, `NAME@sha256:HEX`, completes the reference: the whole path below the
//! root is then the GetBlob id, exactly as the daemon takes it
//! (`HOST:PORT/REPO/.../NAME@sha256:HEX`).
//!
//! Directories are virtual: they exist because a reference could continue
//! below them, and are checked with the same parser the daemon uses
//! ([`Reference::parse`]) on the path completed with a placeholder digest,
//! so a directory is shown exactly when some reference below it would parse.

use crate::protocol::validate_blob_id;
use crate::protocol::MAX_BLOB_ID_LEN;
use crate::reference::{Reference, DIGEST_HEX_LEN};

/// What looking up one name should do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// A root name that is a valid plain id: GetBlob it. When the daemon
    /// does not know it and `host_dir` is true, the name is also a registry
    /// host, so it is shown as the (virtual) directory of that host.
    Plain { id: String, host_dir: bool },
    /// A virtual directory, named by its path below the root.
    Dir(String),
    /// A complete reference: GetBlob with this id.
    Reference(String),
    /// No such name (ENOENT), or a name too long to ever be an id.
    Missing { too_long: bool },
}

/// The path of a virtual directory completed into a reference that names
/// no blob, to ask the reference parser whether the directory can hold one.
fn probe(dir: &str) -> String {
    format!("{dir}/x@sha256:{}", "0".repeat(DIGEST_HEX_LEN))
}

/// Whether a reference could continue below the directory `dir`.
fn is_reference_dir(dir: &str) -> bool {
    Reference::parse(&probe(dir)).is_ok()
}

/// What `name` means in the directory whose path below the root is `parent`
/// (`None` for the root itself).
pub fn lookup(parent: Option<&str>, name: &str) -> Lookup {
    match parent {
        None => lookup_root(name),
        Some(dir) => lookup_below(dir, name),
    }
}

fn lookup_root(name: &str) -> Lookup {
    let host_dir = !name.contains('/') && !name.contains('@') && is_reference_dir(name);
    if validate_blob_id(name.as_bytes()).is_ok() {
        return Lookup::Plain {
            id: name.to_string(),
            host_dir,
        };
    }
    if host_dir {
        // e.g. a bracketed IPv6 host, which is no plain id.
        return Lookup::Dir(name.to_string());
    }
    Lookup::Missing {
        too_long: name.len() > MAX_BLOB_ID_LEN,
    }
}

fn lookup_below(dir: &str, name: &str) -> Lookup {
    let path = format!("{dir}/{name}");
    if name.is_empty() || name.contains('/') {
        return Lookup::Missing { too_long: false };
    }
    if name.contains('@') {
        return match Reference::parse(&path) {
            Ok(_) => Lookup::Reference(path),
            Err(_) => Lookup::Missing {
                too_long: path.len() > MAX_BLOB_ID_LEN,
            },
        };
    }
    if is_reference_dir(&path) {
        Lookup::Dir(path)
    } else {
        Lookup::Missing {
            too_long: probe(&path).len() > MAX_BLOB_ID_LEN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn plain(id: &str, host_dir: bool) -> Lookup {
        Lookup::Plain {
            id: id.into(),
            host_dir,
        }
    }

    #[test]
    fn root_names_are_plain_ids_and_maybe_hosts() {
        assert_eq!(lookup(None, "layer.tar"), plain("layer.tar", true));
        assert_eq!(lookup(None, "blob-1"), plain("blob-1", false));
        assert_eq!(lookup(None, "localhost"), plain("localhost", true));
        assert_eq!(
            lookup(None, "127.0.0.1:5000"),
            plain("127.0.0.1:5000", true)
        );
        assert_eq!(lookup(None, "[::1]:5000"), Lookup::Dir("[::1]:5000".into()));
        assert_eq!(lookup(None, ".hidden"), Lookup::Missing { too_long: false });
        assert_eq!(lookup(None, "a b"), Lookup::Missing { too_long: false });
        let long = "a".repeat(300);
        assert_eq!(lookup(None, &long), Lookup::Missing { too_long: true });
    }

    #[test]
    fn components_below_a_host_spell_a_reference() {
        let host = "127.0.0.1:5000";
        assert_eq!(
            lookup(Some(host), "team"),
            Lookup::Dir("127.0.0.1:5000/team".into())
        );
        assert_eq!(
            lookup(Some("127.0.0.1:5000/team"), "app"),
            Lookup::Dir("127.0.0.1:5000/team/app".into())
        );
        let file = format!("img@sha256:{HEX}");
        assert_eq!(
            lookup(Some("127.0.0.1:5000/team"), &file),
            Lookup::Reference(format!("127.0.0.1:5000/team/img@sha256:{HEX}"))
        );
        // Repository components are lowercase; digests are sha256 with 64 hex.
        assert_eq!(
            lookup(Some(host), "Team"),
            Lookup::Missing { too_long: false }
        );
        assert_eq!(
            lookup(Some(host), "img@sha256:abc"),
            Lookup::Missing { too_long: false }
        );
        assert_eq!(
            lookup(Some(host), &format!("img:tag@sha256:{HEX}")),
            Lookup::Missing { too_long: false }
        );
    }

    #[test]
    fn paths_too_long_for_an_id_say_so() {
        let deep = format!("127.0.0.1:5000/{}", "a".repeat(170));
        assert!(matches!(
            lookup(Some(&deep), "b"),
            Lookup::Missing { too_long: true }
        ));
        let name = format!("{}@sha256:{HEX}", "b".repeat(180));
        assert!(matches!(
            lookup(Some("127.0.0.1:5000/team"), &name),
            Lookup::Missing { too_long: true }
        ));
    }
}
