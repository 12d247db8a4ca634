//! `SnapshotChain`: the replica's format in memory. The directory, its metadata, the
//! active chain's layer files, the extent index that maps each 4 KiB block to the
//! newest layer holding it, the head's zero log, and how I/O meets the page cache.
//!
//! Reads resolve each block through the index to a layer and go to that layer's file;
//! never-written blocks read as zeros without I/O (`SnapshotChain::segments` plans
//! the pieces). Writes go to the head.
//!
//! Ownership rule that keeps 512-byte sectors correct on a 4 KiB index: a layer that
//! holds any byte of a block holds the whole block's correct contents. A write that
//! covers part of a block held by an older layer therefore reads the block first
//! (read-modify-write) so the head gets the whole block (`fill.rs`).
//!
//! Floor: above the format's leaves (`meta`, `layer`, `index`, `zeros`, `extent`,
//! `sync_plan`); below `replica.rs`. It never touches the ring (`io.rs`): it hands out
//! descriptors and plans, the replica submits them, and where an operation must not
//! race I/O in flight (the blocking fill paths, the chain operations) the replica
//! settles the ring before it calls in; each such method says so.
//!
//! One type, its methods split by idea, each file importing this one and the floors
//! below, and this file none of them (it only re-exports what the floors above use):
//! - here: the state, read planning, descriptors, painting written blocks;
//! - `open.rs`: creating a replica directory, recovering what a crash interrupted,
//!   loading the layer files into the index;
//! - `fill.rs`: the blocking paths that fill whole blocks of the head (partial writes
//!   over older data, discard, write-zeroes);
//! - `ops.rs`: the chain operations (snapshot, delete, purge, revert, expand, install);
//! - `listing.rs`: what the chain reports (info, a layer's extents, changed ranges).

use std::collections::BTreeSet;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use crate::error::{ReplicaError, Result};
use crate::extent::BlockRun;
use crate::index::BlockIndex;
use crate::layer::{HeldFile, LayerFile};
use crate::meta::{LayerMeta, VolumeMeta, BLOCK_SIZE};
use crate::zeros::ZeroLog;

mod fill;
mod listing;
mod open;
mod ops;

pub(crate) use fill::WritePath;
pub use listing::{LayerExtents, LayerInfo, ReplicaInfo};
pub(crate) use open::{lock_dir, recover};
pub use ops::PurgeReport;

/// Largest single read or write.
pub const MAX_IO_BYTES: u64 = 64 << 20;

/// How the replica's data I/O meets the page cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// Aligned reads and writes bypass it (O_DIRECT): memory use stays flat, and the
    /// cache above (the guest's, the filesystem's on the volume) is the only one.
    #[default]
    Direct,
    /// Every read and write goes through it: repeated reads come from memory, at the
    /// price of a second copy of hot data in RAM. Durability is the same: a flush
    /// still fdatasyncs the head.
    Page,
}

impl std::str::FromStr for CacheMode {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "direct" => Ok(CacheMode::Direct),
            "page" => Ok(CacheMode::Page),
            _ => Err(format!("cache mode {s:?} is not direct or page")),
        }
    }
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CacheMode::Direct => "direct",
            CacheMode::Page => "page",
        })
    }
}

/// One piece of a read that a single layer holds, or none.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadPiece {
    /// Where the piece starts in the caller's buffer.
    pub buf_offset: usize,
    /// Where it starts in the volume (and in the layer file).
    pub volume_offset: u64,
    /// Its length in bytes.
    pub len: usize,
    /// The chain position of the layer holding it; `None`: no layer, it reads as zeros.
    pub layer: Option<usize>,
}

/// The replica's format state: metadata, layer files, index, zero log.
#[derive(Debug)]
pub(crate) struct SnapshotChain {
    dir: PathBuf,
    meta: VolumeMeta,
    /// The active chain, root first, head last; index values are positions + 1.
    layers: Vec<LayerFile>,
    index: BlockIndex,
    /// The head's zero-extent log.
    zero_log: ZeroLog,
    /// Blocks a partial write or discard changed while the replica was WO, merging
    /// with lower layers it may not have yet (sync.rs).
    suspect: BTreeSet<u64>,
    /// The smallest alignment O_DIRECT accepts on the head's filesystem.
    dio_align: u64,
    /// Whether aligned I/O bypasses the page cache.
    cache: CacheMode,
}

impl SnapshotChain {
    /// The replica directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The metadata as last committed.
    pub(crate) fn meta(&self) -> &VolumeMeta {
        &self.meta
    }

    /// Volume size in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.meta.size
    }

    /// The snapshot named `name`.
    pub(crate) fn find_snapshot(&self, name: &str) -> Result<&LayerMeta> {
        self.meta
            .snapshot(name)
            .ok_or_else(|| ReplicaError::NoSuchSnapshot(name.to_string()))
    }

    /// The layer at chain position `pos` (0: the root).
    pub(crate) fn layer(&self, pos: usize) -> &LayerFile {
        &self.layers[pos]
    }

    pub(crate) fn head(&self) -> &LayerFile {
        self.layers.last().expect("a chain always has a head")
    }

    /// The head's chain position.
    pub(crate) fn head_position(&self) -> usize {
        self.layers.len() - 1
    }

    /// The head's value in the index (its position + 1).
    pub(crate) fn head_value(&self) -> u16 {
        self.layers.len() as u16
    }

    /// Heap bytes held by the extent index.
    pub(crate) fn index_bytes(&self) -> usize {
        self.index.heap_bytes()
    }

    /// How the replica's I/O meets the page cache.
    pub(crate) fn cache_mode(&self) -> CacheMode {
        self.cache
    }

    /// Chooses whether aligned I/O bypasses the page cache; in page mode, closes the
    /// O_DIRECT descriptors open so far. The caller has drained the I/O in flight.
    pub(crate) fn set_cache_mode(&mut self, mode: CacheMode) {
        self.cache = mode;
        if mode == CacheMode::Page {
            self.layers = self.layers.iter().map(LayerFile::closed_copy).collect();
        }
    }

    /// Refuses I/O off the sector size, past the end, or larger than [`MAX_IO_BYTES`].
    pub(crate) fn check_io(&self, offset: u64, len: u64) -> Result<()> {
        let ss = self.meta.sector_size as u64;
        if offset % ss != 0 || len % ss != 0 {
            return Err(ReplicaError::Misaligned {
                offset,
                len,
                sector_size: self.meta.sector_size,
            });
        }
        if offset.checked_add(len).is_none_or(|end| end > self.meta.size) {
            return Err(ReplicaError::OutOfRange {
                offset,
                len,
                size: self.meta.size,
            });
        }
        if len > MAX_IO_BYTES {
            return Err(ReplicaError::InvalidOperation(format!(
                "I/O of {len} bytes at offset {offset} is larger than the {MAX_IO_BYTES}-byte maximum"
            )));
        }
        Ok(())
    }

    /// Refuses a range of whole 4 KiB blocks that is not one, or reaches past the end.
    pub(crate) fn check_blocks(&self, offset: u64, len: u64) -> Result<()> {
        if offset % BLOCK_SIZE != 0 || len % BLOCK_SIZE != 0 {
            return Err(ReplicaError::Misaligned {
                offset,
                len,
                sector_size: BLOCK_SIZE as u32,
            });
        }
        if offset.checked_add(len).is_none_or(|end| end > self.meta.size) {
            return Err(ReplicaError::OutOfRange {
                offset,
                len,
                size: self.meta.size,
            });
        }
        Ok(())
    }

    /// Calls `f` for each piece of `offset .. offset + len` held by one layer (or by
    /// none), in order; the pieces cover the range.
    pub(crate) fn segments(&self, offset: u64, len: u64, mut f: impl FnMut(ReadPiece)) {
        if len == 0 {
            return;
        }
        let first = offset / BLOCK_SIZE;
        let last = (offset + len).div_ceil(BLOCK_SIZE);
        self.index.runs(first, last - first, |b, n, v| {
            let a = (b * BLOCK_SIZE).max(offset);
            let z = ((b + n) * BLOCK_SIZE).min(offset + len);
            debug_assert!(a < z && z <= offset + len, "a piece lies inside the range");
            debug_assert!(
                v as usize <= self.layers.len(),
                "the index names a layer of the chain"
            );
            f(ReadPiece {
                buf_offset: (a - offset) as usize,
                volume_offset: a,
                len: (z - a) as usize,
                layer: (v as usize).checked_sub(1),
            });
        });
    }

    /// May I/O of `len` bytes at `file_off` from or to memory at `ptr` bypass the
    /// page cache?
    fn aligned(&self, file_off: u64, len: usize, ptr: *const u8) -> bool {
        if self.cache == CacheMode::Page {
            return false;
        }
        let a = self.dio_align;
        file_off % a == 0 && len as u64 % a == 0 && (ptr as u64) % a == 0
    }

    /// The descriptor of the layer at `pos` for I/O of `len` bytes at `file_off` from
    /// or to memory at `ptr`: the O_DIRECT one where the I/O is aligned for it. It stays
    /// open until the chain changes, which waits for the I/O in flight.
    pub(crate) fn fd_for(&self, pos: usize, file_off: u64, len: usize, ptr: *const u8) -> Result<RawFd> {
        self.layers[pos].fd_for(self.aligned(file_off, len, ptr))
    }

    /// As [`SnapshotChain::fd_for`], but held: it stays open while the caller holds
    /// it, whatever happens to the chain meanwhile (I/O on an in-process engine's ring).
    pub(crate) fn file_for(&self, pos: usize, file_off: u64, len: usize, ptr: *const u8) -> Result<HeldFile> {
        self.layers[pos].file_for(self.aligned(file_off, len, ptr))
    }

    /// A write to the head covering `blocks` has landed: they become the head's.
    pub(crate) fn paint(&mut self, blocks: BlockRun) {
        debug_assert!(
            blocks.first + blocks.count <= self.index.blocks(),
            "a landed write lies inside the volume"
        );
        let v = self.head_value();
        self.index.set_range(blocks.first, blocks.count, v);
    }
}
