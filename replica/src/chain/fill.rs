//! Writes that must fill whole 4 KiB blocks of the head, done with blocking system
//! calls: a write covering part of a block an older layer holds (read the block,
//! merge, write it whole), and discard and write-zeroes. [`SnapshotChain::write_path`]
//! tells a write whether it needs this.
//!
//! Each such path reads and writes layer files outside the ring: the caller drains
//! the ring first, so nothing in flight races them. While the replica is write-only
//! (being rebuilt), every block they merge with lower layers is noted as suspect.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use super::SnapshotChain;
use crate::error::{ReplicaError, Result};
use crate::extent::{BlockRun, Extent};
use crate::meta::BLOCK_SIZE;
use crate::state::Mode;
use horn_uring::IoBuf;

/// How a write's data reaches the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WritePath {
    /// Nothing to write: the write is empty.
    Empty,
    /// Straight to the head; the blocks it covers become the head's when it lands.
    Head(BlockRun),
    /// A partial edge block is held by an older layer: the write goes through
    /// [`SnapshotChain::write_filling_blocks`], with the ring drained.
    Fill,
}

impl SnapshotChain {
    /// Reads with plain system calls, bypassing the ring (used under drained I/O).
    fn read_blocking(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        let mut result = Ok(());
        self.segments(offset, out.len() as u64, |p| {
            if result.is_err() {
                return;
            }
            let dst = &mut out[p.buf_offset..p.buf_offset + p.len];
            match p.layer {
                None => dst.fill(0),
                Some(pos) => {
                    let layer = &self.layers[pos];
                    result = layer.buffered().and_then(|f| {
                        f.read_exact_at(dst, p.volume_offset)
                            .map_err(|e| ReplicaError::io("read", &layer.path, e))
                    });
                }
            }
        });
        result
    }

    /// Does block `b`, partly covered by an I/O, need its old contents read first?
    fn needs_fill(&self, b: u64) -> bool {
        let v = self.index.get(b);
        v != 0 && v != self.head_value()
    }

    /// Checks a write of `len` bytes at `offset` and says how its data reaches the
    /// head. While the replica is write-only (`mode`), notes the partial edge blocks
    /// the head does not hold as suspect.
    pub(crate) fn write_path(&mut self, offset: u64, len: u64, mode: Mode) -> Result<WritePath> {
        self.check_io(offset, len)?;
        if len == 0 {
            return Ok(WritePath::Empty);
        }
        let first = offset / BLOCK_SIZE;
        let last = (offset + len).div_ceil(BLOCK_SIZE);
        if mode == Mode::Wo {
            // Being rebuilt: a partial block the head does not hold merges with layers
            // the rebuild may not have brought yet (sync.rs).
            let hv = self.head_value();
            if offset % BLOCK_SIZE != 0 && self.index.get(first) != hv {
                self.suspect.insert(first);
            }
            if (offset + len) % BLOCK_SIZE != 0 && self.index.get(last - 1) != hv {
                self.suspect.insert(last - 1);
            }
        }
        let head_partial = offset % BLOCK_SIZE != 0 && self.needs_fill(first);
        let tail_partial = (offset + len) % BLOCK_SIZE != 0 && self.needs_fill(last - 1);
        if head_partial || tail_partial {
            return Ok(WritePath::Fill);
        }
        Ok(WritePath::Head(BlockRun {
            first,
            count: last - first,
        }))
    }

    /// A write whose partial edge blocks are held by an older layer: reads those
    /// blocks and writes whole blocks to the head. The caller has drained the ring.
    pub(crate) fn write_filling_blocks(&mut self, offset: u64, data: &[u8], mode: Mode) -> Result<()> {
        let first = offset / BLOCK_SIZE * BLOCK_SIZE;
        let end = (offset + data.len() as u64).div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        let mut whole = IoBuf::zeroed((end - first) as usize);
        let bytes = whole.as_mut_slice();
        let bs = BLOCK_SIZE as usize;
        self.read_blocking(first, &mut bytes[..bs])?;
        let tail = bytes.len() - bs;
        self.read_blocking(end - BLOCK_SIZE, &mut bytes[tail..])?;
        let at = (offset - first) as usize;
        bytes[at..at + data.len()].copy_from_slice(data);
        if mode == Mode::Wo {
            self.suspect.insert(first / BLOCK_SIZE);
            self.suspect.insert(end / BLOCK_SIZE - 1);
        }
        let head = self.head();
        head.buffered()?
            .write_all_at(whole.as_slice(), first)
            .map_err(|e| ReplicaError::io("write", &head.path, e))?;
        self.paint(BlockRun {
            first: first / BLOCK_SIZE,
            count: (end - first) / BLOCK_SIZE,
        });
        Ok(())
    }

    /// Makes `offset .. offset + len` read as zeros and releases the head's space there.
    /// Durable once the call returns only for the parts recorded in the zero log; flush
    /// for the rest, as for writes. The caller has checked the range and drained the
    /// ring.
    pub(crate) fn discard(&mut self, offset: u64, len: u64, mode: Mode) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let first_full = offset.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        let last_full = end / BLOCK_SIZE * BLOCK_SIZE;
        if first_full >= last_full {
            // Within one block, or two partial blocks with no whole block between.
            let split = (offset / BLOCK_SIZE + 1) * BLOCK_SIZE;
            self.zero_partial(offset, end.min(split), mode)?;
            if end > split {
                self.zero_partial(split, end, mode)?;
            }
            return Ok(());
        }
        if offset < first_full {
            self.zero_partial(offset, first_full, mode)?;
        }
        if last_full < end {
            self.zero_partial(last_full, end, mode)?;
        }
        self.zero_whole_blocks(
            first_full / BLOCK_SIZE,
            (last_full - first_full) / BLOCK_SIZE,
            mode,
        )
    }

    /// Zeroes `from .. to`, which lies inside one block.
    fn zero_partial(&mut self, from: u64, to: u64, mode: Mode) -> Result<()> {
        let b = from / BLOCK_SIZE;
        let v = self.index.get(b);
        if mode == Mode::Wo && v != self.head_value() {
            // Merges with lower layers a rebuild may not have brought yet.
            self.suspect.insert(b);
        }
        if v == 0 {
            return Ok(());
        }
        if v == self.head_value() {
            // The head holds the block: zeroing the bytes asked for is enough.
            let head = self.head();
            let zeros = vec![0u8; (to - from) as usize];
            return head
                .buffered()?
                .write_all_at(&zeros, from)
                .map_err(|e| ReplicaError::io("write", &head.path, e));
        }
        // An older layer holds it: the head gets the whole block, partly zeroed.
        let block_start = b * BLOCK_SIZE;
        let mut block = vec![0u8; BLOCK_SIZE as usize];
        self.read_blocking(block_start, &mut block)?;
        block[(from - block_start) as usize..(to - block_start) as usize].fill(0);
        let head = self.head();
        head.buffered()?
            .write_all_at(&block, block_start)
            .map_err(|e| ReplicaError::io("write", &head.path, e))?;
        self.paint(BlockRun { first: b, count: 1 });
        Ok(())
    }

    fn zero_whole_blocks(&mut self, first: u64, count: u64, mode: Mode) -> Result<()> {
        let head_value = self.head_value();
        // Where anything is visible and the head has layers below it, a bare hole could
        // expose older data: record the range in the zero log first (durably).
        let mut held = Vec::new();
        // While rebuilt, the layers below may still lack what they will hold: record
        // the whole range.
        let wo = mode == Mode::Wo;
        if self.layers.len() > 1 {
            self.index.runs(first, count, |b, n, v| {
                if v != 0 || wo {
                    held.push(Extent {
                        offset: b * BLOCK_SIZE,
                        len: n * BLOCK_SIZE,
                    });
                }
            });
            self.zero_log.append(&held)?;
        }
        let head = self.head();
        let f = head.buffered()?;
        nix::fcntl::fallocate(
            f.as_raw_fd(),
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            (first * BLOCK_SIZE) as i64,
            (count * BLOCK_SIZE) as i64,
        )
        .map_err(|e| ReplicaError::io("punch hole", &head.path, std::io::Error::from(e)))?;
        if self.layers.len() > 1 {
            for e in held {
                self.index
                    .set_range(e.offset / BLOCK_SIZE, e.len / BLOCK_SIZE, head_value);
            }
        } else {
            self.index.set_range(first, count, 0);
        }
        Ok(())
    }
}
