//! Blob ids as the GetBlob request carries them: a NUL-terminated field of
//! 256 bytes whose id must be a single safe path component.

use super::{BLOB_ID_FIELD, MAX_BLOB_ID_LEN};
use std::fmt;

/// Why a GetBlob id is refused (answered with EINVAL).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobIdError {
    Empty,
    NotTerminated,
    NotUtf8,
    BadChar(u8),
    LeadingDot,
}

impl fmt::Display for BlobIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlobIdError::Empty => write!(f, "empty blob id"),
            BlobIdError::NotTerminated => write!(f, "blob id not NUL-terminated within 256 bytes"),
            BlobIdError::NotUtf8 => write!(f, "blob id is not UTF-8"),
            BlobIdError::BadChar(c) => write!(f, "blob id contains byte {c:#04x}"),
            BlobIdError::LeadingDot => write!(f, "blob id starts with '.'"),
        }
    }
}

/// Extracts and validates the id of a GetBlob request: non-empty,
/// NUL-terminated within the field (so at most 255 bytes), made only of
/// `[A-Za-z0-9._:-]`, not starting with `.`. Such an id is a single path
/// component that is neither `.` nor `..`, so it can never name a path outside
/// the directory it is joined to.
pub fn parse_blob_id(field: &[u8; BLOB_ID_FIELD]) -> Result<&str, BlobIdError> {
    let len = field
        .iter()
        .position(|&b| b == 0)
        .ok_or(BlobIdError::NotTerminated)?;
    validate_blob_id(&field[..len])
}

/// The id text of a GetBlob field, before any rule about its alphabet:
/// NUL-terminated within the field, non-empty, UTF-8. References (with `/`
/// and `@`) are checked by their own parser; plain ids by
/// [`validate_blob_id`].
pub fn blob_id_text(field: &[u8; BLOB_ID_FIELD]) -> Result<&str, BlobIdError> {
    let len = field
        .iter()
        .position(|&b| b == 0)
        .ok_or(BlobIdError::NotTerminated)?;
    if len == 0 {
        return Err(BlobIdError::Empty);
    }
    std::str::from_utf8(&field[..len]).map_err(|_| BlobIdError::NotUtf8)
}

/// Validates an id given as bytes without its terminator (see [`parse_blob_id`]).
pub fn validate_blob_id(id: &[u8]) -> Result<&str, BlobIdError> {
    if id.is_empty() {
        return Err(BlobIdError::Empty);
    }
    if id.len() > MAX_BLOB_ID_LEN {
        return Err(BlobIdError::NotTerminated);
    }
    if let Some(&c) = id
        .iter()
        .find(|&&c| !(c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-')))
    {
        // A byte >= 0x80 is part of a multi-byte sequence or invalid UTF-8;
        // either way it is outside the allowed alphabet.
        if c >= 0x80 && std::str::from_utf8(id).is_err() {
            return Err(BlobIdError::NotUtf8);
        }
        return Err(BlobIdError::BadChar(c));
    }
    if id[0] == b'.' {
        return Err(BlobIdError::LeadingDot);
    }
    // Only ASCII is left, so this cannot fail.
    std::str::from_utf8(id).map_err(|_| BlobIdError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Request;

    #[test]
    fn blob_ids_are_validated() {
        let field = |s: &[u8]| {
            let mut f = [0u8; BLOB_ID_FIELD];
            f[..s.len()].copy_from_slice(s);
            f
        };
        assert_eq!(
            parse_blob_id(&field(b"blob-1.tar:v2_x")),
            Ok("blob-1.tar:v2_x")
        );
        assert_eq!(parse_blob_id(&field(b"a..b")), Ok("a..b"));
        assert_eq!(parse_blob_id(&field(&[b'z'; 255])).unwrap().len(), 255);
        assert_eq!(parse_blob_id(&field(b"")), Err(BlobIdError::Empty));
        assert_eq!(
            parse_blob_id(&field(b"../x")),
            Err(BlobIdError::BadChar(b'/'))
        );
        assert_eq!(
            parse_blob_id(&field(b"a/b")),
            Err(BlobIdError::BadChar(b'/'))
        );
        assert_eq!(parse_blob_id(&field(b".x")), Err(BlobIdError::LeadingDot));
        assert_eq!(parse_blob_id(&field(b"..")), Err(BlobIdError::LeadingDot));
        assert_eq!(parse_blob_id(&field(b".")), Err(BlobIdError::LeadingDot));
        assert_eq!(
            parse_blob_id(&field(b"a b")),
            Err(BlobIdError::BadChar(b' '))
        );
        assert_eq!(
            parse_blob_id(&field(b"\xff\xfe")),
            Err(BlobIdError::NotUtf8)
        );
        assert_eq!(
            parse_blob_id(&field("é".as_bytes())),
            Err(BlobIdError::BadChar(0xc3))
        );
        assert_eq!(
            parse_blob_id(&[b'a'; BLOB_ID_FIELD]),
            Err(BlobIdError::NotTerminated)
        );
        assert!(Request::get_blob(1, &"y".repeat(256)).is_none());
    }
}
