//! Blocking paths that fill whole 4 KiB blocks of the head: a write covering part of a
//! block an older layer holds (read the block, merge, write it whole), and discard and
//! write-zeroes. Each first drains the ring, so nothing in flight races them.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use crate::error::{ReplicaError, Result};
use crate::extent::Extent;
use crate::meta::BLOCK_SIZE;
use crate::replica::Replica;
use crate::state::Mode;
use horn_uring::IoBuf;

impl Replica {
    /// Reads with plain system calls, bypassing the ring (used under drained I/O).
    fn read_blocking(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        let mut result = Ok(());
        self.segments(offset, out.len() as u64, |bo, vo, n, pos| {
            if result.is_err() {
                return;
            }
            let dst = &mut out[bo..bo + n];
            match pos {
                None => dst.fill(0),
                Some(p) => {
                    let layer = &self.chain[p];
                    result = layer.buffered().and_then(|f| {
                        f.read_exact_at(dst, vo)
                            .map_err(|e| ReplicaError::io("read", &layer.path, e))
                    });
                }
            }
        });
        result
    }

    /// A write whose partial edge blocks are held by an older layer: drain, read
    /// those blocks, and write whole blocks to the head.
    pub(crate) fn write_filling_blocks(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.drain()?;
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
        if self.engine.mode == Mode::Wo {
            self.suspect.insert(first / BLOCK_SIZE);
            self.suspect.insert(end / BLOCK_SIZE - 1);
        }
        let head = self.head();
        head.buffered()?
            .write_all_at(whole.as_slice(), first)
            .map_err(|e| ReplicaError::io("write", &head.path, e))?;
        let v = self.head_value();
        self.index
            .set_range(first / BLOCK_SIZE, (end - first) / BLOCK_SIZE, v);
        Ok(())
    }

    /// Makes `offset .. offset + len` read as zeros and releases the head's space there.
    /// Durable once the call returns only for the parts recorded in the zero log; flush
    /// for the rest, as for writes.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_io(offset, len)?;
        self.drain()?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let first_full = offset.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        let last_full = end / BLOCK_SIZE * BLOCK_SIZE;
        if first_full >= last_full {
            // Within one block, or two partial blocks with no whole block between.
            let split = (offset / BLOCK_SIZE + 1) * BLOCK_SIZE;
            self.zero_partial(offset, end.min(split))?;
            if end > split {
                self.zero_partial(split, end)?;
            }
            return Ok(());
        }
        if offset < first_full {
            self.zero_partial(offset, first_full)?;
        }
        if last_full < end {
            self.zero_partial(last_full, end)?;
        }
        self.zero_whole_blocks(first_full / BLOCK_SIZE, (last_full - first_full) / BLOCK_SIZE)
    }

    /// Makes the range read as zeros. The store never needs to allocate for zeros, so
    /// this is the same operation as [`Replica::discard`].
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.discard(offset, len)
    }

    /// Zeroes `from .. to`, which lies inside one block.
    fn zero_partial(&mut self, from: u64, to: u64) -> Result<()> {
        let b = from / BLOCK_SIZE;
        let v = self.index.get(b);
        if self.engine.mode == Mode::Wo && v != self.head_value() {
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
        let hv = self.head_value();
        self.index.set_range(b, 1, hv);
        Ok(())
    }

    fn zero_whole_blocks(&mut self, first: u64, count: u64) -> Result<()> {
        let head_value = self.head_value();
        // Where anything is visible and the head has layers below it, a bare hole could
        // expose older data: record the range in the zero log first (durably).
        let mut held = Vec::new();
        // While rebuilt, the layers below may still lack what they will hold: record
        // the whole range.
        let wo = self.engine.mode == Mode::Wo;
        if self.chain.len() > 1 {
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
        if self.chain.len() > 1 {
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
