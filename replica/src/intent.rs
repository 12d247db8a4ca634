//! The write-intent record (`intent.bits`): which regions of the volume may differ from
//! the other replicas because an engine wrote to them and has not yet confirmed that
//! every replica holds those writes durably.
//!
//! The volume is cut into regions of [`REGION_SIZE`] bytes, one bit each. The data
//! server sets a region's bit, durably, *before* it starts the first write, discard or
//! write-zeroes to that region; later writes to a marked region cost nothing. The engine
//! clears every bit from time to time, at a moment when it has no write in flight and
//! has flushed every replica. After an engine crash, the regions marked on *any*
//! replica are the only ones where the replicas can differ: the next engine compares and
//! copies just those (as md-raid's write-intent bitmap does) before it serves I/O.
//!
//! Format: pages of 4096 bytes.
//! - Page 0: `HORNINTN`, version u32 LE, log2 of the region size u32 LE, CRC-32C of those
//!   16 bytes u32 LE, zeros.
//! - Pages 1..: CRC-32C u32 LE of the page's bytes 4..4096, the page number u32 LE, then
//!   4088 bytes of bits (region `r` is bit `r % 8` of byte `r / 8`, counted across pages).
//!
//! Every page exists from creation on (written as zeros), so a page that is missing or
//! fails its CRC (a torn write) cannot be trusted: all its regions are taken as marked,
//! which costs a larger resync and never a missed one. A wrong header is corrupt
//! metadata and refused.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{ReplicaError, Result};

/// File name inside the replica directory.
pub const INTENT_FILE: &str = "intent.bits";
/// Bytes of volume per bit.
pub const REGION_SIZE: u64 = 4 << 20;
const REGION_SHIFT: u32 = 22;
const MAGIC: &[u8; 8] = b"HORNINTN";
const VERSION: u32 = 1;
const PAGE: usize = 4096;
const PAGE_HEADER: usize = 8;
const BITS_PER_PAGE: u64 = ((PAGE - PAGE_HEADER) * 8) as u64;

/// The write-intent bits of one replica, in memory and on disk.
#[derive(Debug)]
pub struct IntentLog {
    path: PathBuf,
    file: File,
    /// One bit per region.
    bits: Vec<u8>,
    regions: u64,
    marked: u64,
}

fn header() -> [u8; PAGE] {
    let mut p = [0u8; PAGE];
    p[..8].copy_from_slice(MAGIC);
    p[8..12].copy_from_slice(&VERSION.to_le_bytes());
    p[12..16].copy_from_slice(&REGION_SHIFT.to_le_bytes());
    let crc = crc32c::crc32c(&p[..16]);
    p[16..20].copy_from_slice(&crc.to_le_bytes());
    p
}

fn regions_for(size: u64) -> u64 {
    size.div_ceil(REGION_SIZE)
}

fn pages_for(regions: u64) -> u64 {
    regions.div_ceil(BITS_PER_PAGE).max(1)
}

impl IntentLog {
    /// Opens the record of the replica in `dir` for a volume of `size` bytes, creating
    /// it (nothing marked) where it is absent.
    pub fn open(dir: &Path, size: u64) -> Result<IntentLog> {
        let path = dir.join(INTENT_FILE);
        let regions = regions_for(size);
        let mut log = match std::fs::read(&path) {
            Ok(bytes) => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|e| ReplicaError::io("open", &path, e))?;
                let bits = parse(&bytes, &path, regions)?;
                IntentLog {
                    path,
                    file,
                    bits,
                    regions,
                    marked: 0,
                }
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .map_err(|e| ReplicaError::io("create", &path, e))?;
                let mut log = IntentLog {
                    path,
                    file,
                    bits: vec![0; (pages_for(regions) * BITS_PER_PAGE / 8) as usize],
                    regions,
                    marked: 0,
                };
                log.file
                    .write_all_at(&header(), 0)
                    .map_err(|e| ReplicaError::io("write", &log.path, e))?;
                log.write_pages(0..pages_for(regions))?;
                crate::meta::sync_dir(dir)?;
                log
            }
            Err(e) => return Err(ReplicaError::io("read", &path, e)),
        };
        log.marked = log.count();
        Ok(log)
    }

    fn count(&self) -> u64 {
        (0..self.regions).filter(|&r| self.is_marked(r)).count() as u64
    }

    fn is_marked(&self, region: u64) -> bool {
        self.bits[(region / 8) as usize] & (1 << (region % 8)) != 0
    }

    /// Regions marked now.
    pub fn marked(&self) -> u64 {
        self.marked
    }

    /// Indices of the marked regions, in order.
    pub fn marked_regions(&self) -> Vec<u64> {
        (0..self.regions).filter(|&r| self.is_marked(r)).collect()
    }

    /// Marks the regions `[offset, offset + len)` touches, durably, before the caller
    /// writes there. Costs nothing when they are marked already.
    pub fn mark(&mut self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let first = offset / REGION_SIZE;
        let last = ((offset.saturating_add(len) - 1) / REGION_SIZE).min(self.regions.saturating_sub(1));
        let mut pages: Option<(u64, u64)> = None;
        for r in first..=last {
            if !self.is_marked(r) {
                self.bits[(r / 8) as usize] |= 1 << (r % 8);
                self.marked += 1;
                let page = r / BITS_PER_PAGE;
                pages = Some(pages.map_or((page, page + 1), |(a, b)| (a.min(page), b.max(page + 1))));
            }
        }
        let Some((from, to)) = pages else {
            return Ok(());
        };
        self.write_pages(from..to)
    }

    /// Unmarks every region, durably. The caller knows that every write so far is
    /// durable on every replica of the set.
    pub fn clear(&mut self) -> Result<()> {
        if self.marked == 0 {
            return Ok(());
        }
        self.bits.fill(0);
        self.marked = 0;
        self.write_pages(0..pages_for(self.regions))
    }

    /// Follows the volume to `size` bytes (regions past the old end start unmarked).
    pub fn resize(&mut self, size: u64) -> Result<()> {
        let regions = regions_for(size);
        let pages = pages_for(regions);
        let old_pages = pages_for(self.regions);
        self.regions = regions;
        if pages > old_pages {
            self.bits.resize((pages * BITS_PER_PAGE / 8) as usize, 0);
            self.write_pages(old_pages..pages)?;
        }
        Ok(())
    }

    fn write_pages(&mut self, pages: std::ops::Range<u64>) -> Result<()> {
        for page in pages {
            let bytes = (PAGE - PAGE_HEADER) as u64;
            let from = (page * bytes) as usize;
            let mut p = [0u8; PAGE];
            p[PAGE_HEADER..].copy_from_slice(&self.bits[from..from + bytes as usize]);
            p[4..8].copy_from_slice(&(page as u32 + 1).to_le_bytes());
            let crc = crc32c::crc32c(&p[4..]);
            p[..4].copy_from_slice(&crc.to_le_bytes());
            self.file
                .write_all_at(&p, (page + 1) * PAGE as u64)
                .map_err(|e| ReplicaError::io("write", &self.path, e))?;
        }
        self.file
            .sync_data()
            .map_err(|e| ReplicaError::io("fdatasync", &self.path, e))
    }
}

/// The bits of an intent file's bytes (`path` names it in errors). Pages that are
/// missing or torn come back all marked.
pub fn parse(bytes: &[u8], path: &Path, regions: u64) -> Result<Vec<u8>> {
    let corrupt = |reason: String| ReplicaError::CorruptMetadata {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < 20 || bytes[..8] != MAGIC[..] {
        return Err(corrupt("not a write-intent file (no HORNINTN header)".into()));
    }
    let crc = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes"));
    if crc != crc32c::crc32c(&bytes[..16]) {
        return Err(corrupt("its header fails its checksum".into()));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(corrupt(format!(
            "version {version} is not the supported {VERSION}"
        )));
    }
    let shift = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    if shift != REGION_SHIFT {
        return Err(corrupt(format!(
            "region size 2^{shift} is not this version's 2^{REGION_SHIFT}"
        )));
    }
    let pages = pages_for(regions);
    let per_page = PAGE - PAGE_HEADER;
    let mut bits = vec![0u8; pages as usize * per_page];
    for page in 0..pages as usize {
        let at = (page + 1) * PAGE;
        let out = &mut bits[page * per_page..(page + 1) * per_page];
        let Some(p) = bytes.get(at..at + PAGE) else {
            tracing::warn!(path = %path.display(), page, "write-intent page missing: its regions count as marked");
            out.fill(0xff);
            continue;
        };
        let crc = u32::from_le_bytes(p[..4].try_into().expect("4 bytes"));
        let number = u32::from_le_bytes(p[4..8].try_into().expect("4 bytes"));
        if crc != crc32c::crc32c(&p[4..]) || number as usize != page + 1 {
            tracing::warn!(path = %path.display(), page, "write-intent page torn: its regions count as marked");
            out.fill(0xff);
            continue;
        }
        out.copy_from_slice(&p[PAGE_HEADER..]);
    }
    // Bits past the last region mean nothing: cleared a byte at a time, the first one
    // in part (a bit at a time, it was most of the intent_bits fuzz target's time).
    let first = (regions / 8) as usize;
    if let Some((partial, rest)) = bits.get_mut(first..).and_then(|b| b.split_first_mut()) {
        *partial &= (1u8 << (regions % 8)) - 1;
        rest.fill(0);
    }
    Ok(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_reopen_and_clear_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let size = 64 * REGION_SIZE + 4096;
        let mut log = IntentLog::open(dir.path(), size).unwrap();
        assert_eq!(log.marked(), 0);
        log.mark(REGION_SIZE - 512, 1024).unwrap();
        log.mark(64 * REGION_SIZE, 4096).unwrap();
        assert_eq!(log.marked_regions(), vec![0, 1, 64]);
        drop(log);
        let mut log = IntentLog::open(dir.path(), size).unwrap();
        assert_eq!(log.marked_regions(), vec![0, 1, 64]);
        log.clear().unwrap();
        drop(log);
        assert_eq!(IntentLog::open(dir.path(), size).unwrap().marked(), 0);
    }

    #[test]
    fn torn_or_missing_pages_count_as_marked() {
        let dir = tempfile::tempdir().unwrap();
        let regions = BITS_PER_PAGE + 10;
        let size = regions * REGION_SIZE;
        IntentLog::open(dir.path(), size).unwrap();
        let path = dir.path().join(INTENT_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[PAGE + 100] ^= 1; // page 1 torn
        bytes.truncate(2 * PAGE); // page 2 missing
        std::fs::write(&path, &bytes).unwrap();
        let log = IntentLog::open(dir.path(), size).unwrap();
        assert_eq!(log.marked(), regions);
    }

    #[test]
    fn a_wrong_header_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(INTENT_FILE), b"not an intent file at all").unwrap();
        let e = IntentLog::open(dir.path(), REGION_SIZE).unwrap_err();
        assert!(e.to_string().contains("HORNINTN"), "{e}");
    }

    #[test]
    fn growing_adds_unmarked_regions() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = IntentLog::open(dir.path(), REGION_SIZE).unwrap();
        log.mark(0, 1).unwrap();
        log.resize((BITS_PER_PAGE + 5) * REGION_SIZE).unwrap();
        log.mark(BITS_PER_PAGE * REGION_SIZE, 1).unwrap();
        drop(log);
        let log = IntentLog::open(dir.path(), (BITS_PER_PAGE + 5) * REGION_SIZE).unwrap();
        assert_eq!(log.marked_regions(), vec![0, BITS_PER_PAGE]);
    }
}
