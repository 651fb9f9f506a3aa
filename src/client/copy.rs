//! Blob bytes copied to another file descriptor in the kernel (`sendfile`),
//! for clients that forward a blob rather than look at it, such as
//! `blobmgr cat`: the bytes go from the daemon's cache file to the output
//! without passing through this process's memory.

use super::{Client, RemoteBlob};
use nix::errno::Errno;
use std::fs::File;
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::FileExt;

/// Largest single `sendfile` (the kernel caps one call near 2 GiB).
const MAX_SENDFILE: u64 = 1 << 30;
/// Buffer of the fallback copy.
const COPY_BUF: usize = 1 << 20;

impl Client {
    /// Writes blob bytes from `offset`, at most `len` (clipped at the blob's
    /// end), to `out` at its file position: fetches what is missing, then
    /// `sendfile`s from the cache fd, or reads and writes where the kernel
    /// cannot (an `O_APPEND` file, a file system without support). Returns
    /// how many bytes were written; 0 at or past the blob's end.
    pub fn copy_to(
        &self,
        blob: &RemoteBlob,
        offset: u64,
        len: u64,
        out: BorrowedFd<'_>,
    ) -> io::Result<u64> {
        let size = blob.size();
        if len == 0 || offset >= size {
            return Ok(0);
        }
        let want = len.min(size - offset);
        let (n, snap, pos) = self.valid_at(blob, offset, want)?;
        copy_fd(&snap.file, pos, n, out).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("copying blob {:?} at {offset}: {e}", blob.id),
            )
        })?;
        Ok(n)
    }
}

/// Copies `n` bytes of `file` from `pos` to `out`'s file position.
fn copy_fd(file: &File, pos: u64, n: u64, out: BorrowedFd<'_>) -> io::Result<()> {
    let mut done = 0u64;
    let mut kernel = true;
    let mut buf = Vec::new();
    while done < n {
        let at = pos + done;
        if kernel {
            let mut off = at as i64;
            let chunk = (n - done).min(MAX_SENDFILE) as usize;
            match nix::sys::sendfile::sendfile64(out, file, Some(&mut off), chunk) {
                Ok(0) => return Err(ended_at(at)),
                Ok(k) => done += k as u64,
                Err(Errno::EINTR) => {}
                Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => kernel = false,
                Err(e) => return Err(e.into()),
            }
            continue;
        }
        if buf.is_empty() {
            buf = vec![0u8; COPY_BUF];
        }
        let chunk = ((n - done) as usize).min(buf.len());
        let k = match file.read_at(&mut buf[..chunk], at) {
            Ok(0) => return Err(ended_at(at)),
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        write_all(out, &buf[..k])?;
        done += k as u64;
    }
    Ok(())
}

fn ended_at(at: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("the cache file ends at {at}"),
    )
}

fn write_all(out: BorrowedFd<'_>, mut b: &[u8]) -> io::Result<()> {
    while !b.is_empty() {
        match nix::unistd::write(out, b) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(k) => b = &b[k..],
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsFd;

    #[test]
    fn copies_through_the_kernel_and_through_a_buffer_where_it_cannot() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        let mut src = tempfile::tempfile().unwrap();
        src.write_all(&data).unwrap();
        // To a plain file: sendfile.
        let mut out = tempfile::tempfile().unwrap();
        copy_fd(&src, 1000, 2_000_000, out.as_fd()).unwrap();
        let mut got = Vec::new();
        out.seek(SeekFrom::Start(0)).unwrap();
        out.read_to_end(&mut got).unwrap();
        assert!(got == data[1000..2_001_000]);
        // To an O_APPEND file: sendfile refuses, the buffer copies.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("append");
        std::fs::write(&p, b"head").unwrap();
        let app = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        copy_fd(&src, 5, 1_500_000, app.as_fd()).unwrap();
        let got = std::fs::read(&p).unwrap();
        assert!(got[..4] == *b"head" && got[4..] == data[5..1_500_005]);
        // Past the end of the source: an error, not a hang.
        let e = copy_fd(&src, 2_999_000, 5000, out.as_fd()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
