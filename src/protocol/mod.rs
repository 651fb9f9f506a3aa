//! Wire protocol v1: the packed little-endian header, the three request codes,
//! their replies, and the validation that turns untrusted bytes into typed
//! messages without ever panicking.
//!
//! Decoding is stateless over a byte slice: [`decode_request`] returns a
//! message only once all its bytes are present, so a caller that keeps the
//! unconsumed tail resumes exactly where the last read stopped.

use byteorder::{ByteOrder, LittleEndian as LE};
use std::fmt;

mod blob_id;
pub use blob_id::{blob_id_text, parse_blob_id, validate_blob_id, BlobIdError};

/// Length of every message header.
pub const HEADER_SIZE: usize = 20;
/// Largest body a header may announce.
pub const MAX_BODY_SIZE: u32 = 4096;
/// Length of the blob id field of a GetBlob request.
pub const BLOB_ID_FIELD: usize = 256;
/// Longest blob id (the field must also hold the terminating NUL).
pub const MAX_BLOB_ID_LEN: usize = BLOB_ID_FIELD - 1;
/// Body length of a GetBlob request: generation u32 + id [u8; 256].
pub const GET_BLOB_REQUEST_SIZE: u32 = 4 + BLOB_ID_FIELD as u32;
/// Body length of a FetchRange request: token, start, count (u64 each).
pub const FETCH_RANGE_REQUEST_SIZE: u32 = 24;
/// Body length of a GetBlob reply: token u64, base u64, result u32.
pub const GET_BLOB_REPLY_SIZE: u32 = 20;
/// Body length of a FetchRange reply: token u64, count u64, result u32.
pub const FETCH_RANGE_REPLY_SIZE: u32 = 20;
/// Longest message of any kind, header included.
pub const MAX_MESSAGE_SIZE: usize = HEADER_SIZE + MAX_BODY_SIZE as usize;

/// The only protocol version; it lives in flag bits 0-1.
pub const VERSION: u32 = 1;
/// Flag bits holding the version.
pub const FLAG_VERSION_MASK: u32 = 0x3;
/// Set on every reply.
pub const FLAG_REPLY: u32 = 0x4;
/// Set by a requester that wants an answer.
pub const FLAG_NEED_REPLY: u32 = 0x8;
/// Every flag bit that is not reserved.
const FLAGS_KNOWN: u32 = FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY;

/// FetchRange result on the wire: the range is valid.
pub const FETCH_OK: u32 = FetchResult::Ok as u32;
/// FetchRange result on the wire: start past the end, or the backend failed.
pub const FETCH_FAILED: u32 = FetchResult::Failed as u32;
/// FetchRange result on the wire: the token is unknown or from another
/// generation.
pub const FETCH_GENERATION_MISMATCH: u32 = FetchResult::GenerationMismatch as u32;

/// The result of a FetchRange, as the daemon decides it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum FetchResult {
    /// `count` bytes from start are valid.
    Ok = 0,
    /// Start past the blob's end, or the backend failed.
    Failed = 1,
    /// The token is unknown on this connection or of another generation: the
    /// client repeats GetBlob.
    GenerationMismatch = 2,
}

/// The errno values a GetBlob reply carries, spelled out so the wire values
/// do not depend on the platform's headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    /// The blob does not exist.
    NoEnt = 2,
    /// The backend failed.
    Io = 5,
    /// The blob may not be reached with the daemon's credentials or rules.
    Access = 13,
    /// The id is not a valid blob id.
    Inval = 22,
    /// Too many open files. This daemon never answers it (past its token
    /// limit a connection's oldest token is retired instead); a client
    /// decodes it from other servers of the protocol.
    MFile = 24,
}

/// Request codes. Decoded with `TryFrom<u32>`; unknown values are an error,
/// never a value of this type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Code {
    Noop = 0,
    GetBlob = 1,
    FetchRange = 2,
}

impl TryFrom<u32> for Code {
    type Error = ProtocolError;

    fn try_from(v: u32) -> Result<Self, ProtocolError> {
        match v {
            0 => Ok(Code::Noop),
            1 => Ok(Code::GetBlob),
            2 => Ok(Code::FetchRange),
            other => Err(ProtocolError::UnknownCode(other)),
        }
    }
}

impl Code {
    /// Body length of a request with this code.
    pub fn request_size(self) -> u32 {
        match self {
            Code::Noop => 0,
            Code::GetBlob => GET_BLOB_REQUEST_SIZE,
            Code::FetchRange => FETCH_RANGE_REQUEST_SIZE,
        }
    }

    /// Body length of a reply with this code.
    pub fn reply_size(self) -> u32 {
        match self {
            Code::Noop => 0,
            Code::GetBlob => GET_BLOB_REPLY_SIZE,
            Code::FetchRange => FETCH_RANGE_REPLY_SIZE,
        }
    }
}

/// Why bytes from the peer are not a valid message. Every variant closes the
/// connection that sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    /// Request code 3 or above.
    UnknownCode(u32),
    /// Tag 0 is reserved.
    ZeroTag,
    /// The header announces a body longer than [`MAX_BODY_SIZE`].
    BodyTooLarge(u32),
    /// Flag bits 0-1 are not 1.
    BadVersion(u32),
    /// A reserved flag bit is set (the offending bits).
    ReservedFlags(u32),
    /// The body length is not the one its code requires.
    WrongBodySize { code: Code, expected: u32, got: u32 },
    /// A reply arrived where a request was expected, or the reverse.
    UnexpectedDirection { reply: bool },
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::UnknownCode(c) => write!(f, "unknown request code {c}"),
            ProtocolError::ZeroTag => write!(f, "tag 0 is reserved"),
            ProtocolError::BodyTooLarge(s) => {
                write!(f, "body size {s} exceeds the limit of {MAX_BODY_SIZE}")
            }
            ProtocolError::BadVersion(v) => write!(f, "protocol version {v}, expected {VERSION}"),
            ProtocolError::ReservedFlags(b) => write!(f, "reserved flag bits {b:#x} set"),
            ProtocolError::WrongBodySize {
                code,
                expected,
                got,
            } => write!(f, "{code:?} body of {got} bytes, expected {expected}"),
            ProtocolError::UnexpectedDirection { reply: true } => {
                write!(f, "a reply where a request was expected")
            }
            ProtocolError::UnexpectedDirection { reply: false } => {
                write!(f, "a request where a reply was expected")
            }
        }
    }
}

impl std::error::Error for ProtocolError {}

/// A validated header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub tag: u64,
    pub code: Code,
    pub flags: u32,
    pub size: u32,
}

impl Header {
    /// Parses and validates the first [`HEADER_SIZE`] bytes of `b`.
    /// `b` must hold at least that many bytes.
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Result<Header, ProtocolError> {
        let tag = LE::read_u64(&b[0..8]);
        let code = LE::read_u32(&b[8..12]);
        let flags = LE::read_u32(&b[12..16]);
        let size = LE::read_u32(&b[16..20]);
        let code = Code::try_from(code)?;
        if tag == 0 {
            return Err(ProtocolError::ZeroTag);
        }
        if size > MAX_BODY_SIZE {
            return Err(ProtocolError::BodyTooLarge(size));
        }
        if flags & FLAG_VERSION_MASK != VERSION {
            return Err(ProtocolError::BadVersion(flags & FLAG_VERSION_MASK));
        }
        if flags & !FLAGS_KNOWN != 0 {
            return Err(ProtocolError::ReservedFlags(flags & !FLAGS_KNOWN));
        }
        Ok(Header {
            tag,
            code,
            flags,
            size,
        })
    }

    /// Writes the header into `b`.
    pub fn encode(&self, b: &mut [u8; HEADER_SIZE]) {
        LE::write_u64(&mut b[0..8], self.tag);
        LE::write_u32(&mut b[8..12], self.code as u32);
        LE::write_u32(&mut b[12..16], self.flags);
        LE::write_u32(&mut b[16..20], self.size);
    }

    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_REPLY != 0
    }

    pub fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }
}

/// A request body, as sent by a client.
// GetBlob's id is kept inline: boxing it would allocate per message.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Noop,
    /// The id field is kept raw: an invalid id is answered with EINVAL, not a
    /// closed connection, so it is checked later by [`parse_blob_id`].
    GetBlob {
        generation: u32,
        id: [u8; BLOB_ID_FIELD],
    },
    FetchRange {
        token: u64,
        start: u64,
        count: u64,
    },
}

impl Request {
    pub fn code(&self) -> Code {
        match self {
            Request::Noop => Code::Noop,
            Request::GetBlob { .. } => Code::GetBlob,
            Request::FetchRange { .. } => Code::FetchRange,
        }
    }

    /// Builds a GetBlob request, or `None` if `id` is longer than
    /// [`MAX_BLOB_ID_LEN`] bytes. The id is copied into a zeroed field, so the
    /// result is always NUL-terminated whatever the id's length.
    pub fn get_blob(generation: u32, id: &str) -> Option<Request> {
        let bytes = id.as_bytes();
        if bytes.len() > MAX_BLOB_ID_LEN {
            return None;
        }
        let mut field = [0u8; BLOB_ID_FIELD];
        field[..bytes.len()].copy_from_slice(bytes);
        Some(Request::GetBlob {
            generation,
            id: field,
        })
    }
}

/// A message that the decoder produced: its header and its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub header: Header,
    pub request: Request,
}

/// Decodes the first request in `buf`.
///
/// Returns `Ok(None)` while `buf` holds only part of a message (an invalid
/// header is reported as soon as its 20 bytes are present, without waiting for
/// the body), or the message and the number of bytes it used.
pub fn decode_request(buf: &[u8]) -> Result<Option<(Message, usize)>, ProtocolError> {
    let Some(hb) = buf.first_chunk::<HEADER_SIZE>() else {
        return Ok(None);
    };
    let header = Header::decode(hb)?;
    if header.is_reply() {
        return Err(ProtocolError::UnexpectedDirection { reply: true });
    }
    let expected = header.code.request_size();
    if header.size != expected {
        return Err(ProtocolError::WrongBodySize {
            code: header.code,
            expected,
            got: header.size,
        });
    }
    let total = HEADER_SIZE + header.size as usize;
    let Some(body) = buf.get(HEADER_SIZE..total) else {
        return Ok(None);
    };
    let request = match header.code {
        Code::Noop => Request::Noop,
        Code::GetBlob => {
            let mut id = [0u8; BLOB_ID_FIELD];
            id.copy_from_slice(&body[4..]);
            Request::GetBlob {
                generation: LE::read_u32(&body[0..4]),
                id,
            }
        }
        Code::FetchRange => Request::FetchRange {
            token: LE::read_u64(&body[0..8]),
            start: LE::read_u64(&body[8..16]),
            count: LE::read_u64(&body[16..24]),
        },
    };
    Ok(Some((Message { header, request }, total)))
}

/// Appends a request with `tag` and `flags` (version added) to `out`.
pub fn encode_request(out: &mut Vec<u8>, tag: u64, need_reply: bool, req: &Request) {
    let code = req.code();
    let flags = VERSION | if need_reply { FLAG_NEED_REPLY } else { 0 };
    push_header(out, tag, code, flags, code.request_size());
    match req {
        Request::Noop => {}
        Request::GetBlob { generation, id } => {
            push_u32(out, *generation);
            out.extend_from_slice(id);
        }
        Request::FetchRange {
            token,
            start,
            count,
        } => {
            push_u64(out, *token);
            push_u64(out, *start);
            push_u64(out, *count);
        }
    }
}

/// A reply body, as sent by the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    Noop,
    /// When `result` is 0 the reply carries exactly one fd.
    GetBlob {
        token: u64,
        base: u64,
        result: u32,
    },
    FetchRange {
        token: u64,
        count: u64,
        result: u32,
    },
}

impl Reply {
    pub fn code(&self) -> Code {
        match self {
            Reply::Noop => Code::Noop,
            Reply::GetBlob { .. } => Code::GetBlob,
            Reply::FetchRange { .. } => Code::FetchRange,
        }
    }

    /// Whether this reply travels with a file descriptor.
    pub fn carries_fd(&self) -> bool {
        matches!(self, Reply::GetBlob { result: 0, .. })
    }

    /// A successful GetBlob reply (it travels with the blob's fd).
    pub fn blob(token: u64) -> Reply {
        Reply::GetBlob {
            token,
            base: 0,
            result: 0,
        }
    }

    /// A failed GetBlob reply.
    pub fn blob_error(errno: Errno) -> Reply {
        Reply::GetBlob {
            token: 0,
            base: 0,
            result: errno as u32,
        }
    }

    /// A FetchRange reply; `count` is reported only on success.
    pub fn fetch(token: u64, count: u64, result: FetchResult) -> Reply {
        let count = if result == FetchResult::Ok { count } else { 0 };
        Reply::FetchRange {
            token,
            count,
            result: result as u32,
        }
    }
}

/// Appends the reply to request `tag` to `out`: header (flags = version |
/// REPLY, size = the reply body's length) and body.
pub fn encode_reply(out: &mut Vec<u8>, tag: u64, reply: &Reply) {
    let code = reply.code();
    push_header(out, tag, code, VERSION | FLAG_REPLY, code.reply_size());
    match *reply {
        Reply::Noop => {}
        Reply::GetBlob {
            token,
            base,
            result,
        } => {
            push_u64(out, token);
            push_u64(out, base);
            push_u32(out, result);
        }
        Reply::FetchRange {
            token,
            count,
            result,
        } => {
            push_u64(out, token);
            push_u64(out, count);
            push_u32(out, result);
        }
    }
}

/// Decodes the first reply in `buf`, as [`decode_request`] does for requests.
pub fn decode_reply(buf: &[u8]) -> Result<Option<(u64, Reply, usize)>, ProtocolError> {
    let Some(hb) = buf.first_chunk::<HEADER_SIZE>() else {
        return Ok(None);
    };
    let header = Header::decode(hb)?;
    if !header.is_reply() {
        return Err(ProtocolError::UnexpectedDirection { reply: false });
    }
    let expected = header.code.reply_size();
    if header.size != expected {
        return Err(ProtocolError::WrongBodySize {
            code: header.code,
            expected,
            got: header.size,
        });
    }
    let total = HEADER_SIZE + header.size as usize;
    let Some(body) = buf.get(HEADER_SIZE..total) else {
        return Ok(None);
    };
    let reply = match header.code {
        Code::Noop => Reply::Noop,
        Code::GetBlob => Reply::GetBlob {
            token: LE::read_u64(&body[0..8]),
            base: LE::read_u64(&body[8..16]),
            result: LE::read_u32(&body[16..20]),
        },
        Code::FetchRange => Reply::FetchRange {
            token: LE::read_u64(&body[0..8]),
            count: LE::read_u64(&body[8..16]),
            result: LE::read_u32(&body[16..20]),
        },
    };
    Ok(Some((header.tag, reply, total)))
}

fn push_header(out: &mut Vec<u8>, tag: u64, code: Code, flags: u32, size: u32) {
    let mut b = [0u8; HEADER_SIZE];
    Header {
        tag,
        code,
        flags,
        size,
    }
    .encode(&mut b);
    out.extend_from_slice(&b);
}

fn push_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn push_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests;
