//! Blob digests: the one canonical form of an id (`sha256:<hex>`), and the
//! bytes it names (the cache checks a completed blob against them).
//!
//! Only sha256 is accepted, the algorithm of every OCI image layer in use.
//! The hashing itself is the cache's (`cache::checksum`); hex decoding is
//! the `hex` crate.

/// `sha256:<64 lowercase hex>` or the bare hex → `sha256:<hex>`; anything
/// else (other algorithms, uppercase, wrong length, a tag) → `None`.
pub fn canonical_digest(id: &str) -> Option<String> {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    let ok = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    ok.then(|| format!("sha256:{hex}"))
}

/// The 32 bytes a canonical `sha256:<hex>` digest names; `None` for any
/// other string.
pub fn sha256_bytes(digest: &str) -> Option<[u8; 32]> {
    let hex = canonical_digest(digest)?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(&hex["sha256:".len()..], &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

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
    fn digests_name_their_bytes() {
        let want: [u8; 32] = Sha256::digest(b"abc").into();
        // FIPS 180-2's first example.
        let d = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_bytes(d), Some(want));
        assert_eq!(sha256_bytes(&d.to_uppercase()), None);
        assert_eq!(sha256_bytes("sha256:xyz"), None);
        assert_eq!(sha256_bytes(HEX).map(hex::encode).as_deref(), Some(HEX));
    }
}
