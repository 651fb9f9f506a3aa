//! `blobmgr cache ls [--workdir DIR] [--json]`: the blobs of a work dir,
//! read straight from its files (layout and map format: docs/CACHE.md).
//!
//! Read-only and safe beside a running daemon: it takes no lock, writes
//! nothing, opens the maps with `O_NOATIME` where it may, and only stats the
//! data files. It trusts nothing: a map is checked exactly as the daemon
//! checks it (`blobmgr::cache::map::parse`, with the granule the map
//! records), and a damaged, torn, or unsynced-from-another-boot map is
//! reported on its blob's row — as the daemon would read it, nothing of that
//! blob is cached — never fatal.
//!
//! Last use is the data file's modification time: when bytes were last
//! written to it, which is also the order in which the daemon evicts after a
//! restart. Cache hits do not change it; the access time would, but
//! `relatime` and `noatime` mounts make it unreliable.
//!
//! `--json` prints an array of objects: `id`, `size` (bytes, null if
//! unknown), `cached` (bytes valid), `verified`, `complete`, `disk` (bytes
//! allocated to the data file), `last_use` (unix seconds), `problem` (null
//! or why the cached bytes do not count).

use crate::cli::args::CacheLsArgs;
use crate::cli::size::human;
use crate::cli::{emit, Fail};
use blobmgr::cache::map::{self, MapError, StoredMap};
use blobmgr::cache::DEFAULT_GRANULE;
use serde::Serialize;
use std::collections::BTreeSet;
use std::fs::Metadata;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Largest map read: a 1 TiB blob at 4 KiB granules has a 32 MiB map.
const MAX_MAP: u64 = 256 << 20;

/// One blob of the work dir.
#[derive(Debug, Serialize, PartialEq)]
struct Row {
    id: String,
    size: Option<u64>,
    cached: u64,
    verified: bool,
    complete: bool,
    disk: u64,
    last_use: Option<i64>,
    problem: Option<String>,
}

pub fn run(a: CacheLsArgs) -> Result<(), Fail> {
    let rows = scan(&a.workdir)?;
    let text = if a.json {
        serde_json::to_string_pretty(&rows)? + "\n"
    } else {
        table(&rows, now())
    };
    emit(text.as_bytes())
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Every blob that has a data file or a map, by id.
fn scan(workdir: &Path) -> Result<Vec<Row>, Fail> {
    let (data_dir, map_dir) = (workdir.join("data"), workdir.join("map"));
    if !data_dir.is_dir() && !map_dir.is_dir() {
        return Err(Fail(format!(
            "--workdir {}: not a blobmgr work dir (no data/ or map/ in it)",
            workdir.display()
        )));
    }
    let mut ids = BTreeSet::new();
    for dir in [&data_dir, &map_dir] {
        ids.extend(regular_files(dir)?);
    }
    let boot_id = map::current_boot_id();
    Ok(ids
        .into_iter()
        .map(|id| row(&id, &data_dir, &map_dir, &boot_id))
        .collect())
}

/// Names of the regular files of `dir` (none if it does not exist).
fn regular_files(dir: &Path) -> Result<Vec<String>, Fail> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Fail(format!("{}: {e}", dir.display()))),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Fail(format!("{}: {e}", dir.display())))?;
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Ok(names)
}

/// One blob's row from its two files.
fn row(id: &str, data_dir: &Path, map_dir: &Path, boot_id: &[u8; 16]) -> Row {
    let data = std::fs::symlink_metadata(data_dir.join(id)).ok();
    let last_use = data.as_ref().map(Metadata::mtime).or_else(|| {
        std::fs::symlink_metadata(map_dir.join(id))
            .ok()
            .map(|m| m.mtime())
    });
    let mut row = Row {
        id: id.to_string(),
        size: data.as_ref().map(Metadata::len),
        cached: 0,
        verified: false,
        complete: false,
        disk: data.as_ref().map_or(0, |m| m.blocks() * 512),
        last_use,
        problem: None,
    };
    let (stored, granule) = match read_map(&map_dir.join(id), boot_id) {
        Ok(m) => m,
        Err(problem) => {
            row.problem = Some(problem);
            return row;
        }
    };
    row.size = Some(stored.size);
    row.problem = match &data {
        None => Some("data file missing".into()),
        Some(m) if m.len() != stored.size => Some(format!(
            "data file is {} bytes, the map says {}",
            m.len(),
            stored.size
        )),
        Some(_) => None,
    };
    if row.problem.is_none() {
        row.cached = cached_bytes(&stored, granule);
        row.complete = row.cached == stored.size;
        row.verified = stored.verified;
    }
    row
}

/// The map of a blob, checked, and its granule; or what is wrong with it.
fn read_map(path: &Path, boot_id: &[u8; 16]) -> Result<(StoredMap, u64), String> {
    // The daemon rewrites maps in place: a read that races a write fails its
    // checksum, so a mismatch is read once more before it is reported.
    let mut last = String::new();
    for _ in 0..2 {
        let bytes = read_untouched(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => "map missing".to_string(),
            _ => format!("map: {e}"),
        })?;
        match parse_any_granule(&bytes, boot_id) {
            Ok(m) => return Ok(m),
            Err(MapError::Checksum) => last = format!("map: {}", MapError::Checksum),
            Err(e) => return Err(format!("map: {e}")),
        }
    }
    Err(last)
}

/// Checks a map with the granule it records (the work dir's daemon may run
/// with any `--granule`); only a granule the daemon could use is tried.
fn parse_any_granule(b: &[u8], boot_id: &[u8; 16]) -> Result<(StoredMap, u64), MapError> {
    match map::parse(b, DEFAULT_GRANULE, boot_id) {
        Ok(m) => Ok((m, DEFAULT_GRANULE)),
        Err(MapError::Granule { stored, .. }) if stored.is_power_of_two() && stored >= 4096 => {
            map::parse(b, stored, boot_id).map(|m| (m, stored))
        }
        Err(e) => Err(e),
    }
}

/// Reads a map file without updating its access time when we may, opened
/// as the daemon opens cache files (no symlink followed, no FIFO waited
/// on, a regular file only).
fn read_untouched(path: &Path) -> io::Result<Vec<u8>> {
    let f = blobmgr::cache::files::open_ro_untouched(path)?
        .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
    let len = f.metadata()?.len();
    if len > MAX_MAP {
        return Err(io::Error::other(format!(
            "{len} bytes, too large for a map"
        )));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(MAX_MAP + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Bytes of the blob in ready granules (the last granule ends at the blob's
/// end).
fn cached_bytes(m: &StoredMap, granule: u64) -> u64 {
    let granules = m.size.div_ceil(granule);
    let set: u64 = m.bits.iter().map(|w| u64::from(w.count_ones())).sum();
    let mut bytes = u128::from(set) * u128::from(granule);
    if granules > 0 {
        let last = granules - 1;
        let word = m.bits.get((last / 64) as usize).copied().unwrap_or(0);
        if word & (1 << (last % 64)) != 0 {
            bytes -= u128::from(granules) * u128::from(granule) - u128::from(m.size);
        }
    }
    bytes.min(u128::from(m.size)) as u64
}

/// How long ago, for people: `12s ago`, `3h ago`.
fn ago(now: i64, then: i64) -> String {
    let s = now - then;
    match s {
        ..=0 => "just now".into(),
        1..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// The human table: one line per blob, then a total.
fn table(rows: &[Row], now: i64) -> String {
    let mut cells =
        vec![["ID", "SIZE", "CACHED", "VERIFIED", "LAST USE", "PROBLEM"].map(String::from)];
    for r in rows {
        let cached = match r.size {
            Some(size) if size > 0 => format!("{} {}%", human(r.cached), r.cached * 100 / size),
            _ => human(r.cached),
        };
        cells.push([
            r.id.clone(),
            r.size.map_or("?".into(), human),
            cached,
            if r.verified { "yes" } else { "no" }.into(),
            r.last_use.map_or("?".into(), |t| ago(now, t)),
            r.problem.clone().unwrap_or_default(),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|c| {
            cells
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in &cells {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    let total: u64 = rows.iter().map(|r| r.cached).sum();
    out.push_str(&format!("{} blobs, {} cached\n", rows.len(), human(total)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use blobmgr::cache::map::{encode, MapHeader};

    fn header(size: u64, granule: u64, synced: bool) -> MapHeader {
        MapHeader {
            size,
            granule,
            boot_id: [9; 16],
            synced,
            verified: false,
        }
    }

    #[test]
    fn cached_bytes_clip_the_last_granule() {
        let m = |size, bits: Vec<u64>| StoredMap {
            size,
            bits,
            verified: false,
        };
        assert_eq!(cached_bytes(&m(10_000, vec![0b111]), 4096), 10_000);
        assert_eq!(cached_bytes(&m(10_000, vec![0b011]), 4096), 8192);
        assert_eq!(cached_bytes(&m(10_000, vec![0b100]), 4096), 10_000 - 8192);
        assert_eq!(cached_bytes(&m(0, vec![]), 4096), 0);
        assert_eq!(
            cached_bytes(&m(65 * 4096, vec![u64::MAX, 1]), 4096),
            65 * 4096
        );
    }

    #[test]
    fn any_daemon_granule_is_read_and_damage_is_named() {
        let b = encode(&header(3 * 65536, 65536, true), [0b101u64].into_iter());
        let (m, g) = parse_any_granule(&b, &[1; 16]).unwrap();
        assert_eq!((g, cached_bytes(&m, g)), (65536, 2 * 65536));
        let mut bad = b.clone();
        bad[50] ^= 1;
        assert_eq!(
            parse_any_granule(&bad, &[1; 16]).unwrap_err(),
            MapError::Checksum
        );
        let odd = encode(&header(100, 1000, true), [1u64].into_iter());
        assert!(matches!(
            parse_any_granule(&odd, &[1; 16]),
            Err(MapError::Granule { stored: 1000, .. })
        ));
        let unsynced = encode(&header(100, DEFAULT_GRANULE, false), [1u64].into_iter());
        assert_eq!(
            parse_any_granule(&unsynced, &[1; 16]).unwrap_err(),
            MapError::Unsynced
        );
        assert!(parse_any_granule(&unsynced, &[9; 16]).is_ok(), "same boot");
    }

    #[test]
    fn a_work_dir_with_good_bad_and_lonely_files() {
        let dir = tempfile::tempdir().unwrap();
        let (data, maps) = (dir.path().join("data"), dir.path().join("map"));
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(&maps).unwrap();
        let g = 4096;
        std::fs::write(data.join("good"), vec![0u8; 3 * 4096]).unwrap();
        let verified = MapHeader {
            verified: true,
            ..header(3 * 4096, g, true)
        };
        std::fs::write(maps.join("good"), encode(&verified, [0b011].into_iter())).unwrap();
        std::fs::write(data.join("torn"), vec![0u8; 10]).unwrap();
        let mut torn = encode(&header(10, g, true), [1].into_iter());
        torn[48] ^= 0x80;
        std::fs::write(maps.join("torn"), torn).unwrap();
        std::fs::write(data.join("nomap"), b"x").unwrap();
        std::fs::write(
            maps.join("nodata"),
            encode(&header(5, g, true), [1].into_iter()),
        )
        .unwrap();
        std::fs::create_dir(data.join("a-directory")).unwrap();
        let rows = scan(dir.path()).unwrap();
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["good", "nodata", "nomap", "torn"]);
        assert_eq!(
            (rows[0].cached, rows[0].size, rows[0].problem.as_deref()),
            (8192, Some(12288), None)
        );
        assert!(rows[0].verified && !rows[0].complete);
        assert_eq!(rows[1].problem.as_deref(), Some("data file missing"));
        assert_eq!(rows[2].problem.as_deref(), Some("map missing"));
        assert!(rows[3]
            .problem
            .as_deref()
            .unwrap()
            .starts_with("map: checksum mismatch"));
        assert_eq!(rows[3].cached, 0);
        let t = table(&rows, rows[0].last_use.unwrap() + 90);
        assert!(t.lines().nth(1).unwrap().starts_with("good "), "{t}");
        assert!(t.contains("8.0 KiB 66%") && t.contains("1m ago"), "{t}");
        assert!(t.ends_with("4 blobs, 8.0 KiB cached\n"), "{t}");
        assert!(scan(&dir.path().join("nowhere")).is_err());
    }
}
