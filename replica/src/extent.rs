//! Byte extents, and finding the allocated ones of a sparse file; runs of 4 KiB blocks.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{ReplicaError, Result};
use crate::meta::BLOCK_SIZE;

/// A range of bytes of the volume: `offset .. offset + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Extent {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// A run of 4 KiB blocks of the volume: `count` blocks from block `first` (the blocks
/// a write covers, which become the head's in the index when it lands).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlockRun {
    /// First block.
    pub first: u64,
    /// Number of blocks.
    pub count: u64,
}

/// Sorts extents and joins the ones that touch or overlap.
pub fn merge(mut v: Vec<Extent>) -> Vec<Extent> {
    v.retain(|e| e.len > 0);
    v.sort_unstable();
    let mut out: Vec<Extent> = Vec::with_capacity(v.len());
    for e in v {
        match out.last_mut() {
            Some(last) if e.offset <= last.end() => {
                last.len = last.end().max(e.end()) - last.offset;
            }
            _ => out.push(e),
        }
    }
    out
}

/// `a` minus `b`; both sorted and merged.
pub fn subtract(a: &[Extent], b: &[Extent]) -> Vec<Extent> {
    let mut out = Vec::new();
    let mut j = 0;
    for e in a {
        let mut start = e.offset;
        let end = e.end();
        while j < b.len() && b[j].end() <= start {
            j += 1;
        }
        let mut k = j;
        while start < end && k < b.len() && b[k].offset < end {
            if b[k].offset > start {
                out.push(Extent {
                    offset: start,
                    len: b[k].offset - start,
                });
            }
            start = start.max(b[k].end());
            k += 1;
        }
        if start < end {
            out.push(Extent {
                offset: start,
                len: end - start,
            });
        }
    }
    out
}

/// The allocated ranges of a sparse file up to `limit` bytes, found with
/// SEEK_DATA/SEEK_HOLE and widened to whole 4 KiB blocks.
pub fn data_extents(file: &File, path: &Path, limit: u64) -> Result<Vec<Extent>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < limit {
        // SAFETY: lseek on an fd we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // no data past pos
            }
            return Err(ReplicaError::io("seek data", path, err));
        }
        let data = data as u64;
        if data >= limit {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(ReplicaError::io(
                "seek hole",
                path,
                std::io::Error::last_os_error(),
            ));
        }
        let start = data / BLOCK_SIZE * BLOCK_SIZE;
        let end = (hole as u64).min(limit).div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        out.push(Extent {
            offset: start,
            len: end - start,
        });
        pos = hole as u64;
    }
    Ok(merge(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(offset: u64, len: u64) -> Extent {
        Extent { offset, len }
    }

    #[test]
    fn merge_joins_touching_extents() {
        assert_eq!(
            merge(vec![e(10, 5), e(0, 10), e(30, 1), e(12, 1)]),
            vec![e(0, 15), e(30, 1)]
        );
    }

    #[test]
    fn subtract_cuts_holes() {
        let a = [e(0, 100), e(200, 50)];
        let b = [e(10, 10), e(90, 120), e(240, 100)];
        assert_eq!(subtract(&a, &b), vec![e(0, 10), e(20, 70), e(210, 30)]);
    }

    #[test]
    fn data_extents_finds_written_blocks() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[1; 4096], 8192).unwrap();
        f.write_all_at(&[1; 10], 65536 + 100).unwrap();
        f.sync_all().unwrap();
        assert_eq!(
            data_extents(&f, &p, 1 << 20).unwrap(),
            vec![e(8192, 4096), e(65536, 4096)]
        );
    }
}
