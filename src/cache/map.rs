//! The readiness map's on-disk format: a header (magic, version, flags,
//! size, granule, boot id), one bit per granule, and a CRC-32 over it all.
//! Anything wrong with a stored map means "nothing is ready".

use byteorder::{ByteOrder, LittleEndian as LE};
use std::fmt;
use std::io;
use std::path::Path;

const MAGIC: &[u8; 8] = b"BLOBMAP\0";
const VERSION: u32 = 1;
const FLAG_SYNCED: u32 = 1;
/// The complete blob passed the backend's integrity check.
const FLAG_VERIFIED: u32 = 2;
/// Bytes before the bitmap.
pub(crate) const HEADER: usize = 48;

/// What a map says about its blob, besides the bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapHeader {
    pub size: u64,
    pub granule: u64,
    pub boot_id: [u8; 16],
    /// Written after the data was synced: trusted across reboots.
    pub synced: bool,
    pub verified: bool,
}

/// A map read back from disk and found valid.
#[derive(Debug)]
pub struct StoredMap {
    pub size: u64,
    pub bits: Vec<u64>,
    pub verified: bool,
}

/// Why a stored map is not trusted.
#[derive(Debug, PartialEq, Eq)]
pub enum MapError {
    TooShort(usize),
    BadMagic,
    Version(u32),
    Checksum,
    Granule { stored: u64, configured: u64 },
    Length { len: usize, size: u64 },
    Unsynced,
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapError::TooShort(n) => write!(f, "{n} bytes, too short"),
            MapError::BadMagic => write!(f, "bad magic"),
            MapError::Version(v) => write!(f, "version {v}"),
            MapError::Checksum => write!(f, "checksum mismatch (torn or corrupt)"),
            MapError::Granule { stored, configured } => {
                write!(f, "granule {stored}, configured {configured}")
            }
            MapError::Length { len, size } => write!(f, "{len} bytes for a {size}-byte blob"),
            MapError::Unsynced => write!(f, "written before a reboot and never synced"),
        }
    }
}

impl std::error::Error for MapError {}

/// Number of 64-bit words of bits for a blob of `size` bytes.
pub fn words_for(size: u64, granule: u64) -> usize {
    size.div_ceil(granule).div_ceil(64) as usize
}

/// Encodes a map of `words` under header `h`.
pub fn encode(h: &MapHeader, words: impl ExactSizeIterator<Item = u64>) -> Vec<u8> {
    let mut b = vec![0u8; HEADER + words.len() * 8 + 4];
    b[0..8].copy_from_slice(MAGIC);
    LE::write_u32(&mut b[8..12], VERSION);
    let mut flags = if h.synced { FLAG_SYNCED } else { 0 };
    if h.verified {
        flags |= FLAG_VERIFIED;
    }
    LE::write_u32(&mut b[12..16], flags);
    LE::write_u64(&mut b[16..24], h.size);
    LE::write_u64(&mut b[24..32], h.granule);
    b[32..48].copy_from_slice(&h.boot_id);
    for (i, w) in words.enumerate() {
        let at = HEADER + i * 8;
        LE::write_u64(&mut b[at..at + 8], w);
    }
    let crc_at = b.len() - 4;
    let crc = crc32fast::hash(&b[..crc_at]);
    LE::write_u32(&mut b[crc_at..], crc);
    b
}

/// Reads and checks a map file. A missing file is `Ok(None)`; a damaged or
/// untrusted one is an error the caller logs before treating the blob as
/// empty.
pub fn load(path: &Path, granule: u64, boot_id: &[u8; 16]) -> io::Result<Option<StoredMap>> {
    let Some(f) = super::files::open_ro(path)? else {
        return Ok(None);
    };
    let b = read_capped(&f)?;
    parse(&b, granule, boot_id)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The bytes of a map file, read no further than its header allows (one
/// byte more, so that a longer file fails the length check): a huge file
/// in the work dir never makes the daemon read or allocate more than the
/// map of a [`MAX_BLOB_SIZE`](super::MAX_BLOB_SIZE) blob.
fn read_capped(f: &std::fs::File) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut b = Vec::with_capacity(HEADER);
    f.take(HEADER as u64).read_to_end(&mut b)?;
    if b.len() < HEADER {
        return Ok(b);
    }
    let size = LE::read_u64(&b[16..24]);
    let granule = LE::read_u64(&b[24..32]);
    let words = if size <= super::MAX_BLOB_SIZE && granule >= 4096 {
        words_for(size, granule)
    } else {
        0
    };
    let rest = (words * 8 + 4 + 1) as u64;
    f.take(rest).read_to_end(&mut b)?;
    Ok(b)
}

/// Parses and checks a map's bytes.
pub fn parse(b: &[u8], granule: u64, boot_id: &[u8; 16]) -> Result<StoredMap, MapError> {
    if b.len() < HEADER + 4 {
        return Err(MapError::TooShort(b.len()));
    }
    if &b[0..8] != MAGIC {
        return Err(MapError::BadMagic);
    }
    let version = LE::read_u32(&b[8..12]);
    if version != VERSION {
        return Err(MapError::Version(version));
    }
    let crc_at = b.len() - 4;
    if crc32fast::hash(&b[..crc_at]) != LE::read_u32(&b[crc_at..]) {
        return Err(MapError::Checksum);
    }
    let flags = LE::read_u32(&b[12..16]);
    let size = LE::read_u64(&b[16..24]);
    let stored = LE::read_u64(&b[24..32]);
    if stored != granule {
        return Err(MapError::Granule {
            stored,
            configured: granule,
        });
    }
    let words = words_for(size, granule);
    if b.len() != HEADER + words * 8 + 4 {
        return Err(MapError::Length { len: b.len(), size });
    }
    let synced = flags & FLAG_SYNCED != 0;
    if !synced && (boot_id == &[0u8; 16] || &b[32..48] != boot_id) {
        return Err(MapError::Unsynced);
    }
    let mut bits: Vec<u64> = (0..words)
        .map(|i| LE::read_u64(&b[HEADER + i * 8..HEADER + i * 8 + 8]))
        .collect();
    // Bits past the last granule are meaningless; never let them count.
    let granules = size.div_ceil(granule);
    if granules % 64 != 0 {
        if let Some(last) = bits.last_mut() {
            *last &= (1u64 << (granules % 64)) - 1;
        }
    }
    Ok(StoredMap {
        size,
        bits,
        verified: flags & FLAG_VERIFIED != 0,
    })
}

/// The kernel's id of this boot, so a map written without a sync is trusted
/// only while the page cache it relies on is still the one it was written to.
/// All zeroes when it cannot be read: unsynced maps are then never trusted.
pub fn current_boot_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        let digits: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        if let Ok(bytes) = hex::decode(digits) {
            if let Ok(b) = <[u8; 16]>::try_from(bytes.as_slice()) {
                id = b;
            }
        }
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(synced: bool) -> MapHeader {
        MapHeader {
            size: 3 * 4096,
            granule: 4096,
            boot_id: [7; 16],
            synced,
            verified: false,
        }
    }

    #[test]
    fn round_trip_and_damage() {
        let b = encode(&header(false), [0b101u64].into_iter());
        let m = parse(&b, 4096, &[7; 16]).unwrap();
        assert_eq!(
            (m.size, m.bits.as_slice(), m.verified),
            (3 * 4096, &[0b101][..], false)
        );
        let mut bad = b.clone();
        bad[HEADER] ^= 0x40;
        assert_eq!(parse(&bad, 4096, &[7; 16]).unwrap_err(), MapError::Checksum);
        assert!(parse(&b[..b.len() - 3], 4096, &[7; 16]).is_err());
        assert!(matches!(
            parse(&b, 8192, &[7; 16]),
            Err(MapError::Granule { .. })
        ));
    }

    #[test]
    fn unsynced_map_from_another_boot_is_not_trusted() {
        let b = encode(&header(false), [1u64].into_iter());
        assert_eq!(parse(&b, 4096, &[8; 16]).unwrap_err(), MapError::Unsynced);
        let b = encode(&header(true), [1u64].into_iter());
        assert!(
            parse(&b, 4096, &[8; 16]).is_ok(),
            "synced maps survive reboots"
        );
    }

    #[test]
    fn bits_past_the_last_granule_never_count() {
        let b = encode(&header(true), [u64::MAX].into_iter());
        assert_eq!(parse(&b, 4096, &[7; 16]).unwrap().bits, vec![0b111]);
    }

    /// Review finding: a map file was read whole, however large. Now no
    /// more than its header allows is read, and a longer file is refused.
    #[test]
    fn a_map_file_is_read_no_further_than_its_header_allows() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m");
        let good = encode(&header(true), [1u64].into_iter());
        let mut long = good.clone();
        long.resize(good.len() + (1 << 20), 0xaa);
        std::fs::write(&p, &long).unwrap();
        let e = load(&p, 4096, &[7; 16]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        let f = std::fs::File::open(&p).unwrap();
        assert_eq!(read_capped(&f).unwrap().len(), good.len() + 1);
        std::fs::write(&p, &good).unwrap();
        assert!(load(&p, 4096, &[7; 16]).unwrap().is_some());
    }

    #[test]
    fn crc_is_ieee() {
        assert_eq!(crc32fast::hash(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn boot_id_is_read() {
        assert_ne!(current_boot_id(), [0u8; 16]);
    }
}
