//! `blobmgr ping` and `blobmgr cat`: one request to the daemon each, through
//! the client library.

use crate::cli::args::{CatArgs, SockArg};
use crate::cli::{cli_client, emit, Fail};
use std::io::{self, Write};
use std::os::fd::AsFd;

/// One Noop round trip: prints `ok N us`.
pub fn ping(a: SockArg) -> Result<(), Fail> {
    let client = cli_client(&a.sock)?;
    let rtt = client.ping().map_err(|e| Fail(format!("ping: {e}")))?;
    emit(format!("ok {} us\n", rtt.as_micros()).as_bytes())
}

/// GetBlob, then FetchRange and reads through the fd, to standard output.
pub fn cat(a: CatArgs) -> Result<(), Fail> {
    let client = cli_client(&a.sock.sock)?;
    let id = &a.id;
    let blob = client
        .get_blob(id)
        .map_err(|e| Fail(format!("GetBlob {id}: {e}")))?;
    let offset = a.offset.0;
    let end = match a.length {
        Some(len) => offset.saturating_add(len.0).min(blob.size()),
        None => blob.size(),
    };
    if offset > blob.size() {
        return Err(Fail(format!(
            "--offset {offset} is past the end of {id} ({} bytes)",
            blob.size()
        )));
    }
    // Through the kernel, 4 MiB per FetchRange: the bytes go from the
    // cache file to standard output without a copy in this process.
    let stdout = io::stdout();
    let mut out = stdout.lock();
    out.flush()
        .map_err(|e| Fail(format!("write to stdout: {e}")))?;
    let mut at = offset;
    while at < end {
        let want = (end - at).min(4 << 20);
        let n = client
            .copy_to(&blob, at, want, out.as_fd())
            .map_err(|e| Fail(format!("read {id} at {at} to stdout: {e}")))?;
        if n == 0 {
            return Err(Fail(format!("{id}: no bytes at offset {at}")));
        }
        at += n;
    }
    Ok(())
}
