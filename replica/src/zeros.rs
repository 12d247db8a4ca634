//! The zero-extent log of a layer (`layer-<id>.zeros`).
//!
//! A discard or write-zeroes punches a hole in the head. Where an older layer holds
//! data under that range, a bare hole would let the old data show through, so the
//! range is first recorded here: "in this layer, these blocks read as zeros even
//! though the file has a hole". The record is appended and fdatasync'ed *before* the
//! hole is punched, so a crash between the two leaves the old data or zeros, never
//! data from an older snapshot.
//!
//! Format: a 16-byte header (`HORNZERO`, version u32 LE, 4 zero bytes), then 24-byte
//! records: first block u64 LE, block count u64 LE, CRC-32C of those 16 bytes u32 LE,
//! 4 zero bytes. A torn last record (short, or failing its CRC) is a write that never
//! completed and is ignored; a bad record followed by good ones is corruption.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{ReplicaError, Result};
use crate::extent::{merge, Extent};
use crate::meta::{write_atomically, BLOCK_SIZE};

const MAGIC: &[u8; 8] = b"HORNZERO";
const VERSION: u32 = 1;
const HEADER: u64 = 16;
const RECORD: u64 = 24;
/// Past this many records the log is rewritten merged.
const COMPACT_AFTER: u64 = 4096;

/// An open zero-extent log, appended to by discards on the head.
#[derive(Debug)]
pub struct ZeroLog {
    path: PathBuf,
    file: Option<File>,
    records: u64,
}

fn header() -> [u8; HEADER as usize] {
    let mut h = [0u8; HEADER as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h
}

fn encode(e: Extent) -> [u8; RECORD as usize] {
    let mut r = [0u8; RECORD as usize];
    r[..8].copy_from_slice(&(e.offset / BLOCK_SIZE).to_le_bytes());
    r[8..16].copy_from_slice(&(e.len / BLOCK_SIZE).to_le_bytes());
    let crc = crc32c::crc32c(&r[..16]);
    r[16..20].copy_from_slice(&crc.to_le_bytes());
    r
}

/// Reads a layer's zero extents (merged, in bytes). A missing file means none.
pub fn load(path: &Path, limit: u64) -> Result<Vec<Extent>> {
    Ok(read_records(path, limit)?.0)
}

fn read_records(path: &Path, limit: u64) -> Result<(Vec<Extent>, u64)> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(ReplicaError::io("read", path, e)),
    };
    parse(&bytes, path, limit)
}

/// Parses a zero log's bytes: its merged extents and how many whole records it holds.
/// `path` names the file in errors; `limit` is the layer's size.
pub fn parse(bytes: &[u8], path: &Path, limit: u64) -> Result<(Vec<Extent>, u64)> {
    if bytes.is_empty() {
        // Created, but the header never made it to disk: no records were written.
        return Ok((Vec::new(), 0));
    }
    let corrupt = |reason: String| ReplicaError::CorruptMetadata {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < HEADER as usize || bytes[..8] != MAGIC[..] {
        return Err(corrupt("missing HORNZERO header".into()));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(corrupt(format!("zero-log version {version} is not supported")));
    }
    let body = &bytes[HEADER as usize..];
    let whole = body.len() / RECORD as usize;
    let mut out = Vec::with_capacity(whole);
    for (i, r) in body.chunks(RECORD as usize).enumerate() {
        let torn_tail = i + 1 >= whole;
        if r.len() < RECORD as usize {
            break; // a short last record: never completed
        }
        let crc = u32::from_le_bytes(r[16..20].try_into().expect("4 bytes"));
        if crc != crc32c::crc32c(&r[..16]) {
            if torn_tail {
                break;
            }
            return Err(corrupt(format!("record {i} fails its checksum")));
        }
        let start = u64::from_le_bytes(r[..8].try_into().expect("8 bytes"));
        let count = u64::from_le_bytes(r[8..16].try_into().expect("8 bytes"));
        let (offset, len) = (start.saturating_mul(BLOCK_SIZE), count.saturating_mul(BLOCK_SIZE));
        if count == 0 || offset.checked_add(len).is_none_or(|end| end > limit) {
            return Err(corrupt(format!(
                "record {i} ({start}+{count} blocks) lies outside the layer's {limit} bytes"
            )));
        }
        out.push(Extent { offset, len });
    }
    let records = out.len() as u64;
    Ok((merge(out), records))
}

/// Replaces a layer's zero log with `extents`, atomically (used by purge and compaction).
pub fn rewrite(dir: &Path, name: &str, extents: &[Extent]) -> Result<()> {
    let mut bytes = header().to_vec();
    for e in extents {
        bytes.extend_from_slice(&encode(*e));
    }
    write_atomically(dir, name, &bytes)
}

impl ZeroLog {
    /// Opens the head's log for appending (the file is created on first append),
    /// compacting it first when it has grown long, and returns its extents.
    pub fn open(path: PathBuf, limit: u64) -> Result<(Self, Vec<Extent>)> {
        let (extents, records) = read_records(&path, limit)?;
        let mut log = ZeroLog {
            path,
            file: None,
            records,
        };
        if records > COMPACT_AFTER || (records > 0 && !log.is_whole(records)?) {
            // Drop a torn tail and fold overlapping records: the set is unchanged.
            log.compact(&extents)?;
        }
        Ok((log, extents))
    }

    fn is_whole(&self, records: u64) -> Result<bool> {
        let len = std::fs::metadata(&self.path)
            .map_err(|e| ReplicaError::io("stat", &self.path, e))?
            .len();
        Ok(len == HEADER + records * RECORD)
    }

    fn compact(&mut self, extents: &[Extent]) -> Result<()> {
        let dir = self.path.parent().expect("log lives in the replica directory");
        let name = self
            .path
            .file_name()
            .expect("log has a name")
            .to_string_lossy()
            .into_owned();
        rewrite(dir, &name, extents)?;
        self.file = None;
        self.records = extents.len() as u64;
        Ok(())
    }

    /// Appends extents and makes them durable before returning.
    pub fn append(&mut self, extents: &[Extent]) -> Result<()> {
        if extents.is_empty() {
            return Ok(());
        }
        if self.file.is_none() {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&self.path)
                .map_err(|e| ReplicaError::io("open", &self.path, e))?;
            let len = f
                .metadata()
                .map_err(|e| ReplicaError::io("stat", &self.path, e))?
                .len();
            if len == 0 {
                f.write_all_at(&header(), 0)
                    .map_err(|e| ReplicaError::io("write", &self.path, e))?;
                crate::meta::sync_dir(self.path.parent().expect("log has a directory"))?;
            }
            self.file = Some(f);
        }
        let f = self.file.as_ref().expect("opened above");
        let mut bytes = Vec::with_capacity(extents.len() * RECORD as usize);
        for e in extents {
            bytes.extend_from_slice(&encode(*e));
        }
        f.write_all_at(&bytes, HEADER + self.records * RECORD)
            .map_err(|e| ReplicaError::io("write", &self.path, e))?;
        f.sync_data()
            .map_err(|e| ReplicaError::io("fdatasync", &self.path, e))?;
        self.records += extents.len() as u64;
        Ok(())
    }

    /// Where the log lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_extents_survive_reopen_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("layer-00000001.zeros");
        let (mut log, ex) = ZeroLog::open(p.clone(), 1 << 20).unwrap();
        assert!(ex.is_empty());
        log.append(&[Extent {
            offset: 4096,
            len: 8192,
        }])
        .unwrap();
        log.append(&[Extent {
            offset: 65536,
            len: 4096,
        }])
        .unwrap();
        // A torn third record.
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.extend_from_slice(&[7u8; 10]);
        std::fs::write(&p, &bytes).unwrap();
        let (_, ex) = ZeroLog::open(p.clone(), 1 << 20).unwrap();
        assert_eq!(
            ex,
            vec![
                Extent {
                    offset: 4096,
                    len: 8192
                },
                Extent {
                    offset: 65536,
                    len: 4096
                }
            ]
        );
        assert_eq!(std::fs::metadata(&p).unwrap().len(), HEADER + 2 * RECORD);
    }

    #[test]
    fn a_bad_record_in_the_middle_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("z");
        let (mut log, _) = ZeroLog::open(p.clone(), 1 << 20).unwrap();
        log.append(&[
            Extent { offset: 0, len: 4096 },
            Extent {
                offset: 8192,
                len: 4096,
            },
        ])
        .unwrap();
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[HEADER as usize] ^= 0xff;
        std::fs::write(&p, &bytes).unwrap();
        let err = load(&p, 1 << 20).unwrap_err().to_string();
        assert!(err.contains("record 0") && err.contains("/z"), "{err}");
    }
}
