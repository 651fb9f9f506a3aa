//! The client's errors: [`ClientError`], the typed payload of every
//! `io::Error` the client returns, and [`ConnFailure`], why one connection
//! died, as handed to every call that was waiting on it.

use crate::protocol;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The typed error carried inside the `io::Error`s this module returns; get
/// it with `err.get_ref().and_then(|e| e.downcast_ref::<ClientError>())`.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClientError {
    /// The daemon could not be reached.
    Connect {
        /// The daemon's socket path.
        path: PathBuf,
        /// How many connection attempts were made.
        attempts: u32,
        /// The last attempt's error.
        source: io::Error,
    },
    /// The call's deadline passed.
    TimedOut {
        /// The call (or the step of it) that was running.
        op: &'static str,
        /// The configured per-call timeout.
        after: Duration,
    },
    /// The connection broke (daemon gone or restarted) before the reply.
    Disconnected(String),
    /// The daemon sent something that is not a valid reply; the connection
    /// was dropped and is re-established by the next call.
    Protocol(String),
    /// GetBlob was refused with this errno (ENOENT, EINVAL, EIO, EMFILE...).
    Refused {
        /// The blob id asked for.
        id: String,
        /// The daemon's errno.
        errno: i32,
    },
    /// FetchRange answered failure (start past the end, or backend error).
    FetchFailed {
        /// First blob byte of the range asked for.
        start: u64,
        /// Length of the range asked for.
        len: u64,
    },
    /// The blob id cannot be sent (longer than 255 bytes).
    InvalidId(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect {
                path,
                attempts,
                source,
            } => write!(
                f,
                "cannot connect to {} ({attempts} attempt{}): {source}",
                path.display(),
                if *attempts == 1 { "" } else { "s" }
            ),
            ClientError::TimedOut { op, after } => {
                write!(f, "{op} timed out after {after:?}")
            }
            ClientError::Disconnected(why) => write!(f, "connection to the daemon lost: {why}"),
            ClientError::Protocol(why) => write!(f, "protocol error from the daemon: {why}"),
            ClientError::Refused { id, errno } => write!(
                f,
                "blob {id:?} refused by the daemon: {}",
                io::Error::from_raw_os_error(*errno)
            ),
            ClientError::FetchFailed { start, len } => write!(
                f,
                "daemon failed to fetch {len} bytes at {start} (past the end, or backend error)"
            ),
            ClientError::InvalidId(id) => write!(
                f,
                "blob id of {} bytes is longer than {} bytes",
                id.len(),
                protocol::MAX_BLOB_ID_LEN
            ),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Connect { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl ClientError {
    fn kind(&self) -> io::ErrorKind {
        match self {
            ClientError::Connect { source, .. } => source.kind(),
            ClientError::TimedOut { .. } => io::ErrorKind::TimedOut,
            ClientError::Disconnected(_) => io::ErrorKind::ConnectionAborted,
            ClientError::Protocol(_) => io::ErrorKind::InvalidData,
            ClientError::Refused { errno, .. } => io::Error::from_raw_os_error(*errno).kind(),
            ClientError::FetchFailed { .. } => io::ErrorKind::Other,
            ClientError::InvalidId(_) => io::ErrorKind::InvalidInput,
        }
    }

    /// The errno of a GetBlob refusal, if `err` is one.
    pub fn refused_errno(err: &io::Error) -> Option<i32> {
        match err.get_ref()?.downcast_ref::<ClientError>()? {
            ClientError::Refused { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

impl From<ClientError> for io::Error {
    fn from(e: ClientError) -> io::Error {
        io::Error::new(e.kind(), e)
    }
}

/// Whether `e` is a [`ClientError::Disconnected`]: the call may be tried
/// again on a new connection.
pub(super) fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.get_ref().and_then(|i| i.downcast_ref::<ClientError>()),
        Some(ClientError::Disconnected(_))
    )
}

/// Why a connection is dead, copied to every call that was waiting on it.
#[derive(Clone, Debug)]
pub(super) enum ConnFailure {
    /// The socket broke or was shut down: calls may retry on a new one.
    Disconnected(Arc<str>),
    /// The daemon broke the protocol: calls fail with `InvalidData`.
    Protocol(Arc<str>),
}

impl ConnFailure {
    pub(super) fn disconnected(why: impl fmt::Display) -> ConnFailure {
        ConnFailure::Disconnected(why.to_string().into())
    }

    pub(super) fn protocol(why: impl fmt::Display) -> ConnFailure {
        ConnFailure::Protocol(why.to_string().into())
    }

    /// The error a waiting call returns.
    pub(super) fn to_io(&self) -> io::Error {
        match self {
            ConnFailure::Disconnected(s) => ClientError::Disconnected(s.to_string()).into(),
            ConnFailure::Protocol(s) => ClientError::Protocol(s.to_string()).into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_typed() {
        let e: io::Error = ClientError::Refused {
            id: "x".into(),
            errno: 2,
        }
        .into();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert_eq!(ClientError::refused_errno(&e), Some(2));
        let t: io::Error = ClientError::TimedOut {
            op: "Noop",
            after: Duration::from_secs(1),
        }
        .into();
        assert_eq!(t.kind(), io::ErrorKind::TimedOut);
        assert!(!is_disconnect(&t));
        assert!(is_disconnect(&ConnFailure::disconnected("x").to_io()));
    }
}
