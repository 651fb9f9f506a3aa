//! Blob digests: the one canonical form of an id (`sha256:<hex>`), and the
//! check of a completed cache file against it.
//!
//! Only sha256 is accepted, the algorithm of every OCI image layer in use.
//! Hashing is `sha2`, hex encoding the `hex` crate.

use crate::backend::BackendError;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Read size when hashing a cache file.
const HASH_BUF: usize = 1 << 20;

/// `sha256:<64 lowercase hex>` or the bare hex → `sha256:<hex>`; anything
/// else (other algorithms, uppercase, wrong length, a tag) → `None`.
pub fn canonical_digest(id: &str) -> Option<String> {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    let ok = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    ok.then(|| format!("sha256:{hex}"))
}

/// Checks that the first `size` bytes of `data` hash to `digest` (canonical
/// form); `id` names the blob in the error.
pub(super) fn check_file(
    id: &str,
    digest: &str,
    data: &File,
    size: u64,
) -> Result<(), BackendError> {
    let got = sha256_file(data, size)?;
    if digest.strip_prefix("sha256:") == Some(got.as_str()) {
        Ok(())
    } else {
        Err(BackendError::Integrity(format!(
            "{id}: the {size} bytes received hash to sha256:{got}"
        )))
    }
}

/// sha256 of the first `size` bytes of `data`, in lowercase hex.
fn sha256_file(data: &File, size: u64) -> Result<String, BackendError> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; HASH_BUF];
    let mut at = 0u64;
    while at < size {
        let want = ((size - at) as usize).min(buf.len());
        match data.read_at(&mut buf[..want], at) {
            Ok(0) => {
                return Err(BackendError::ShortRead {
                    expected: size,
                    got: at,
                })
            }
            Ok(n) => {
                h.update(&buf[..n]);
                at += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(BackendError::Io(format!("read cache at {at}"), e)),
        }
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sha256 of the empty blob.
    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn digests_have_one_canonical_form() {
        let c = format!("sha256:{HEX}");
        assert_eq!(canonical_digest(HEX).as_deref(), Some(c.as_str()));
        assert_eq!(canonical_digest(&c).as_deref(), Some(c.as_str()));
        assert_eq!(canonical_digest(&HEX.to_uppercase()), None);
        assert_eq!(canonical_digest(&HEX[1..]), None);
        assert_eq!(canonical_digest(&format!("sha512:{HEX}")), None);
        assert_eq!(canonical_digest(&format!("sha256:{HEX}0")), None);
        assert_eq!(canonical_digest("sha256:"), None);
        assert_eq!(canonical_digest("blob"), None);
    }

    #[test]
    fn files_hash_to_lowercase_hex() {
        let f = tempfile::tempfile().unwrap();
        assert_eq!(sha256_file(&f, 0).unwrap(), HEX);
        f.write_all_at(b"abc", 0).unwrap();
        // FIPS 180-2's first example.
        assert_eq!(
            sha256_file(&f, 3).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
