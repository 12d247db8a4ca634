//! `Replica`: an open replica directory: creating and opening it, its layers and index.
//!
//! Reads resolve each 4 KiB block through the extent index to the newest layer holding
//! it and go to that layer's file; never-written blocks are zero-filled without I/O.
//! Writes go to the head. The data path is split by idea: `io.rs` submits to the
//! replica's own io_uring and reaps completions (out of order, through
//! [`Replica::reap`]); `fill.rs` holds the blocking paths that fill whole blocks
//! (discard, write-zeroes, partial writes over older data); `chain.rs` the chain
//! operations.
//!
//! Ownership rule that keeps 512-byte sectors correct on a 4 KiB index: a layer that
//! holds any byte of a block holds the whole block's correct contents. A write that
//! covers part of a block held by an older layer therefore reads the block first
//! (read-modify-write) so the head gets the whole block.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{ReplicaError, Result};
use crate::extent::{data_extents, Extent};
use crate::index::BlockIndex;
use crate::intent::IntentLog;
use crate::io::{Completion, Op, Sqe};
use crate::layer::LayerFile;
use crate::meta::{self, layer_path, zeros_path, LayerMeta, VolumeMeta, BLOCK_SIZE};
use crate::state::{EngineState, Mode};
use crate::zeros::{self, ZeroLog};
use horn_uring::{IoBuf, Ring};

/// Largest single read or write.
pub const MAX_IO_BYTES: u64 = 64 << 20;
/// Submission queue depth of the replica's ring.
const RING_ENTRIES: u32 = 256;
/// How long `open` waits for a replica's lock before calling it in use.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_millis(500);
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

/// Name of the lock file that keeps two processes from opening one replica.
pub(crate) const LOCK_FILE: &str = "volume.lock";

/// An open replica.
pub struct Replica {
    pub(crate) dir: PathBuf,
    pub(crate) meta: VolumeMeta,
    /// The active chain, root first, head last; index values are positions + 1.
    pub(crate) chain: Vec<LayerFile>,
    pub(crate) index: BlockIndex,
    pub(crate) zero_log: ZeroLog,
    pub(crate) intent: IntentLog,
    /// Blocks a partial write or discard changed while the replica was WO, merging
    /// with lower layers it may not have yet (sync.rs).
    pub(crate) suspect: std::collections::BTreeSet<u64>,
    pub(crate) engine: EngineState,
    pub(crate) dio_align: u64,
    /// Whether aligned I/O bypasses the page cache.
    pub(crate) cache: CacheMode,
    /// Belongs to the first thread that does I/O (see [`Ring::for_thread`]).
    pub(crate) ring: Ring,
    pub(crate) ops: Vec<Option<Op>>,
    pub(crate) free_ops: Vec<u32>,
    pub(crate) sqes: Vec<Sqe>,
    pub(crate) free_sqes: Vec<u32>,
    pub(crate) ready: VecDeque<Completion>,
    /// Store I/Os (reads, writes, flushes) in flight.
    pub(crate) in_flight: usize,
    /// Raw entries (a server's socket I/O) in flight.
    pub(crate) raw_in_flight: usize,
    /// I/O an in-process engine has in flight on its own rings ([`crate::shared`]):
    /// the chain must not change under it.
    pub(crate) external_in_flight: usize,
    /// Reused by `submit_read` so the hot path does not allocate.
    pub(crate) pieces: Vec<Piece>,
    pub(crate) _lock: File,
}

/// One piece of a read: buffer offset, volume offset, length, chain position.
pub(crate) type Piece = (usize, u64, usize, Option<usize>);

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("dir", &self.dir)
            .field("size", &self.meta.size)
            .field("chain", &self.chain.len())
            .finish()
    }
}

fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| ReplicaError::io("open", &path, e))?;
    // A lock is refused briefly while another thread of this process is spawning a
    // child: between fork and exec the child holds a copy of every descriptor, and
    // with it the flock of a replica closed meanwhile. Such a copy goes away within
    // milliseconds; a replica really held by another opener stays locked.
    let deadline = std::time::Instant::now() + LOCK_PATIENCE;
    loop {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(ReplicaError::io("lock", &path, err));
        }
        if std::time::Instant::now() >= deadline {
            return Err(ReplicaError::Locked {
                path: dir.to_path_buf(),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(f)
}

/// Refuses filesystems whose allocation unit is larger than the index's 4 KiB block:
/// SEEK_DATA would report whole large blocks as written and hide older layers' data.
fn check_filesystem(dir: &Path) -> Result<()> {
    let st = nix::sys::statfs::statfs(dir)
        .map_err(|e| ReplicaError::io("statfs", dir, std::io::Error::from(e)))?;
    let bsize = st.block_size() as u64;
    if bsize > BLOCK_SIZE {
        return Err(ReplicaError::UnsuitableFilesystem {
            path: dir.to_path_buf(),
            reason: format!("its block size is {bsize} bytes; Horn needs 4096 or less"),
        });
    }
    Ok(())
}

/// Creates a sparse file of `size` bytes and makes it durable.
pub(crate) fn create_layer_file(path: &Path, size: u64) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| ReplicaError::io("create", path, e))?;
    f.set_len(size)
        .map_err(|e| ReplicaError::io("truncate", path, e))?;
    f.sync_all().map_err(|e| ReplicaError::io("fsync", path, e))
}

impl Replica {
    /// Creates a replica of `size` bytes in `dir` (created if absent, must be empty).
    pub fn create(dir: impl AsRef<Path>, size: u64, sector_size: u32) -> Result<Replica> {
        let dir = dir.as_ref();
        if sector_size != 512 && sector_size != 4096 {
            return Err(ReplicaError::InvalidSectorSize(sector_size));
        }
        meta::check_size(size).map_err(|reason| ReplicaError::InvalidSize {
            size,
            reason: reason.into(),
        })?;
        std::fs::create_dir_all(dir).map_err(|e| ReplicaError::io("create directory", dir, e))?;
        let mut entries = std::fs::read_dir(dir).map_err(|e| ReplicaError::io("list", dir, e))?;
        if entries.next().is_some() {
            return Err(ReplicaError::DirectoryNotEmpty {
                path: dir.to_path_buf(),
            });
        }
        check_filesystem(dir)?;
        let m = VolumeMeta::new(size, sector_size);
        create_layer_file(&layer_path(dir, m.head), size)?;
        m.store(dir)?;
        Self::open(dir)
    }

    /// Opens an existing replica, finishing or discarding whatever a crash interrupted.
    pub fn open(dir: impl AsRef<Path>) -> Result<Replica> {
        let dir = dir.as_ref().to_path_buf();
        let meta_path = dir.join(meta::META_FILE);
        if !meta_path.exists() {
            // Checked before locking so that a wrong path leaves no lock file behind.
            return Err(ReplicaError::MissingMetadata { path: meta_path });
        }
        let lock = lock_dir(&dir)?;
        check_filesystem(&dir)?;
        let mut m = VolumeMeta::load(&dir)?;
        crate::chain::finish_interrupted(&dir, &mut m)?;
        check_layer_files(&dir, &m)?;
        let head_path = layer_path(&dir, m.head);
        let (zero_log, _) = ZeroLog::open(zeros_path(&dir, m.head), m.size)?;
        let engine = EngineState::load(&dir)?;
        let intent = IntentLog::open(&dir, m.size)?;
        let ring =
            Ring::for_thread(RING_ENTRIES).map_err(|e| ReplicaError::io("io_uring setup", &head_path, e))?;
        let mut r = Replica {
            ring,
            engine,
            index: BlockIndex::new(m.size),
            chain: Vec::new(),
            zero_log,
            intent,
            suspect: Default::default(),
            dio_align: BLOCK_SIZE,
            cache: CacheMode::Direct,
            ops: Vec::new(),
            free_ops: Vec::new(),
            sqes: Vec::new(),
            free_sqes: Vec::new(),
            ready: VecDeque::new(),
            in_flight: 0,
            raw_in_flight: 0,
            external_in_flight: 0,
            pieces: Vec::new(),
            dir,
            meta: m,
            _lock: lock,
        };
        r.load_chain()?;
        r.dio_align = probe_dio_align(r.head())?;
        Ok(r)
    }

    /// (Re)builds the active chain's layer list and the extent index from the files.
    pub(crate) fn load_chain(&mut self) -> Result<()> {
        let ids = self.meta.chain();
        if ids.len() > crate::index::MAX_VALUE as usize - 1 {
            return Err(ReplicaError::ChainFull(ids.len()));
        }
        raise_fd_limit(ids.len() as u64 * 2 + 256);
        self.chain = ids
            .iter()
            .map(|&id| {
                let l = self.meta.layer(id).expect("chain ids come from the metadata");
                LayerFile::new(id, layer_path(&self.dir, id), l.size, id == self.meta.head)
            })
            .collect();
        self.index = BlockIndex::new(self.meta.size);
        for (pos, layer) in self.chain.iter().enumerate() {
            let value = (pos + 1) as u16;
            for e in layer_ownership(&self.dir, layer.id, layer.size)? {
                self.index
                    .set_range(e.offset / BLOCK_SIZE, e.len / BLOCK_SIZE, value);
            }
        }
        let (log, _) = ZeroLog::open(zeros_path(&self.dir, self.meta.head), self.meta.size)?;
        self.zero_log = log;
        Ok(())
    }

    /// Volume size in bytes.
    pub fn size(&self) -> u64 {
        self.meta.size
    }

    /// Sector size in bytes.
    pub fn sector_size(&self) -> u32 {
        self.meta.sector_size
    }

    /// The replica directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The metadata as last committed.
    pub fn meta(&self) -> &VolumeMeta {
        &self.meta
    }

    /// The highest replica-set generation this replica has accepted.
    pub fn generation(&self) -> u64 {
        self.engine.generation
    }

    /// Is the replica marked open by an engine (or left so by a crash)?
    pub fn is_dirty(&self) -> bool {
        self.engine.dirty
    }

    /// Records a new replica-set generation, durably; an older one is refused.
    pub fn set_generation(&mut self, generation: u64) -> Result<()> {
        if generation < self.engine.generation {
            return Err(ReplicaError::StaleGeneration {
                current: self.engine.generation,
                given: generation,
            });
        }
        if generation != self.engine.generation {
            let next = EngineState {
                generation,
                ..self.engine
            };
            next.store(&self.dir)?;
            self.engine = next;
        }
        Ok(())
    }

    /// Read-write, or write-only while being rebuilt.
    pub fn mode(&self) -> Mode {
        self.engine.mode
    }

    /// Sets the mode, durably.
    pub fn set_mode(&mut self, mode: Mode) -> Result<()> {
        if mode != self.engine.mode {
            let next = EngineState { mode, ..self.engine };
            next.store(&self.dir)?;
            self.engine = next;
        }
        Ok(())
    }

    /// Marks the replica as held open by an engine (`true`) or closed in order (`false`),
    /// durably. Marking it clean flushes first.
    pub fn set_dirty(&mut self, dirty: bool) -> Result<()> {
        if !dirty {
            self.flush()?;
        }
        if dirty != self.engine.dirty {
            let next = EngineState { dirty, ..self.engine };
            next.store(&self.dir)?;
            self.engine = next;
        }
        Ok(())
    }

    /// Marks the write-intent regions a write, discard or write-zeroes of
    /// `[offset, offset + len)` touches, durably, before it starts (see [`crate::intent`]).
    pub fn mark_intent(&mut self, offset: u64, len: u64) -> Result<()> {
        self.intent.mark(offset, len)
    }

    /// Unmarks every write-intent region: the engine has flushed every replica with no
    /// write in flight. Flushes this replica first, so the claim holds here too.
    pub fn clear_intents(&mut self) -> Result<()> {
        self.flush()?;
        self.intent.clear()
    }

    /// The marked write-intent regions (indices; each covers [`crate::intent::REGION_SIZE`] bytes).
    pub fn intent_regions(&self) -> Vec<u64> {
        self.intent.marked_regions()
    }

    /// The file and length of snapshot layer `id`, for a rebuild to read. The head is
    /// refused: it changes under I/O.
    pub fn snapshot_layer(&self, id: u64) -> Result<(PathBuf, u64)> {
        let l = self
            .meta
            .layer(id)
            .ok_or_else(|| ReplicaError::InvalidOperation(format!("this replica has no layer {id}")))?;
        if id == self.meta.head {
            return Err(ReplicaError::InvalidOperation(format!(
                "layer {id} is the head, which changes under I/O; only snapshot layers are synced"
            )));
        }
        Ok((layer_path(&self.dir, id), l.size))
    }

    /// Puts the layers a rebuild synced (`plan`, their files written) under the head,
    /// drops the layers the plan leaves out, and returns the suspect blocks (see
    /// [`crate::sync`]) for the engine to copy whole. The engine has paused its I/O.
    pub fn install_synced(&mut self, plan: &crate::sync::SyncPlan) -> Result<Vec<u64>> {
        self.quiesce()?;
        let old_head = self.meta.head;
        let mut m = self.meta.clone();
        let mut head = m.layer(old_head).cloned().expect("the head is in the metadata");
        head.id = plan.head;
        head.parent = plan.head_parent;
        let mut layers: Vec<LayerMeta> = plan.layers.iter().map(|(_, l)| l.clone()).collect();
        layers.push(head);
        layers.sort_by_key(|l| l.id);
        m.layers = layers;
        m.head = plan.head;
        m.next_id = m.next_id.max(plan.next_id);
        m.validate().map_err(|reason| ReplicaError::CorruptMetadata {
            path: self.dir.join(meta::META_FILE),
            reason: format!("the synced chain would be invalid: {reason}"),
        })?;
        // The head keeps its files under a second name until the new metadata names
        // them: a crash on the way leaves one valid chain or the other.
        crate::sync::link_layer(&self.dir, old_head, plan.head)?;
        meta::sync_dir(&self.dir)?;
        m.store(&self.dir)?;
        self.meta = m;
        self.load_chain()?;
        for id in &plan.obsolete {
            for path in [layer_path(&self.dir, *id), zeros_path(&self.dir, *id)] {
                if let Err(e) = std::fs::remove_file(&path) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(path = %path.display(), error = %e, "cannot remove a layer the rebuild replaced");
                    }
                }
            }
        }
        Ok(std::mem::take(&mut self.suspect).into_iter().collect())
    }

    /// How many write-intent regions are marked.
    pub fn intents_marked(&self) -> u64 {
        self.intent.marked()
    }

    /// A checksum (XXH3-64) of each 4 KiB block of `[offset, offset + len)` as the
    /// volume reads now; both must be multiples of 4 KiB. Holes hash like zeros.
    pub fn block_checksums(&mut self, offset: u64, len: u64) -> Result<Vec<u64>> {
        if offset % BLOCK_SIZE != 0 || len % BLOCK_SIZE != 0 {
            return Err(ReplicaError::Misaligned {
                offset,
                len,
                sector_size: BLOCK_SIZE as u32,
            });
        }
        if offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return Err(ReplicaError::OutOfRange {
                offset,
                len,
                size: self.size(),
            });
        }
        const STEP: u64 = 1 << 20;
        let mut sums = Vec::with_capacity((len / BLOCK_SIZE) as usize);
        let mut buf = vec![0u8; STEP.min(len) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = STEP.min(offset + len - at) as usize;
            self.read_at(at, &mut buf[..n])?;
            sums.extend(
                buf[..n]
                    .chunks(BLOCK_SIZE as usize)
                    .map(xxhash_rust::xxh3::xxh3_64),
            );
            at += n as u64;
        }
        Ok(sums)
    }

    /// Chooses whether aligned I/O bypasses the page cache (see [`CacheMode`]). Waits
    /// for the I/O in flight; in page mode, closes the O_DIRECT descriptors open so far.
    pub fn set_cache_mode(&mut self, mode: CacheMode) -> Result<()> {
        self.quiesce()?;
        self.cache = mode;
        if mode == CacheMode::Page {
            self.chain = self.chain.iter().map(LayerFile::closed_copy).collect();
        }
        Ok(())
    }

    /// How the replica's I/O meets the page cache.
    pub fn cache_mode(&self) -> CacheMode {
        self.cache
    }

    /// Heap bytes held by the extent index.
    pub fn index_bytes(&self) -> usize {
        self.index.heap_bytes()
    }

    /// I/Os submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight + self.raw_in_flight + self.ready.len()
    }

    /// Gives the replica a ring any thread may submit to (one at a time), for a
    /// replica shared under a lock ([`crate::shared`]).
    pub(crate) fn make_ring_shareable(&mut self) -> Result<()> {
        self.drain()?;
        self.ring =
            Ring::shared(RING_ENTRIES).map_err(|e| ReplicaError::io("io_uring setup", &self.dir, e))?;
        Ok(())
    }

    /// Waits for the I/O on the replica's own ring; refuses while an in-process
    /// engine has I/O of its own in flight, whose buffers and layer positions a chain
    /// change would pull out from under it (the engine pauses its queues first).
    pub(crate) fn quiesce(&mut self) -> Result<()> {
        if self.external_in_flight > 0 {
            return Err(ReplicaError::InvalidOperation(format!(
                "{} I/Os of the in-process engine are in flight: pause the volume before changing the chain",
                self.external_in_flight
            )));
        }
        self.drain()
    }

    pub(crate) fn head(&self) -> &LayerFile {
        self.chain.last().expect("a chain always has a head")
    }

    pub(crate) fn head_value(&self) -> u16 {
        self.chain.len() as u16
    }

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

    /// Calls `f(buf_offset, volume_offset, len, chain_position)` for each piece of
    /// `offset .. offset + len` held by one layer (`None`: no layer, reads as zeros).
    pub(crate) fn segments(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(usize, u64, usize, Option<usize>),
    ) {
        if len == 0 {
            return;
        }
        let first = offset / BLOCK_SIZE;
        let last = (offset + len).div_ceil(BLOCK_SIZE);
        self.index.runs(first, last - first, |b, n, v| {
            let a = (b * BLOCK_SIZE).max(offset);
            let z = ((b + n) * BLOCK_SIZE).min(offset + len);
            f(
                (a - offset) as usize,
                a,
                (z - a) as usize,
                (v as usize).checked_sub(1),
            );
        });
    }

    pub(crate) fn aligned(&self, file_off: u64, len: usize, ptr: *const u8) -> bool {
        if self.cache == CacheMode::Page {
            return false;
        }
        let a = self.dio_align;
        file_off % a == 0 && len as u64 % a == 0 && (ptr as u64) % a == 0
    }

    /// Waits for all I/O, makes it durable and closes the replica.
    pub fn close(mut self) -> Result<()> {
        self.flush()
    }
}

/// The blocks a layer holds: its file's data extents and its zero-log extents.
pub(crate) fn layer_ownership(dir: &Path, id: u64, size: u64) -> Result<Vec<Extent>> {
    let path = layer_path(dir, id);
    let f = File::open(&path).map_err(|e| ReplicaError::io("open", &path, e))?;
    let mut v = data_extents(&f, &path, size)?;
    v.extend(zeros::load(&zeros_path(dir, id), size)?);
    Ok(crate::extent::merge(v))
}

/// Every layer file the metadata names exists and has the recorded size.
fn check_layer_files(dir: &Path, m: &VolumeMeta) -> Result<()> {
    for l in &m.layers {
        let path = layer_path(dir, l.id);
        let md = match std::fs::metadata(&path) {
            Ok(md) => md,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ReplicaError::MissingLayer {
                    path,
                    layer: meta::display_name(l),
                })
            }
            Err(e) => return Err(ReplicaError::io("stat", &path, e)),
        };
        if md.len() != l.size {
            return Err(ReplicaError::LayerSizeMismatch {
                path,
                expected: l.size,
                actual: md.len(),
            });
        }
    }
    Ok(())
}

/// Every layer read from keeps a descriptor or two open: raise the soft limit toward
/// the hard one when a long chain needs it. Best effort: failure shows up later, as
/// an error naming the layer file that could not be opened.
fn raise_fd_limit(wanted: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < wanted {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, wanted.min(hard), hard);
        }
    }
}

/// The smallest alignment O_DIRECT accepts on the head's filesystem: 512 or 4096.
fn probe_dio_align(head: &LayerFile) -> Result<u64> {
    let Some(f) = head.direct()? else {
        return Ok(BLOCK_SIZE);
    };
    let mut buf = IoBuf::zeroed(1024);
    match f.read_at(&mut buf.as_mut_slice()[512..], 512) {
        Ok(_) => Ok(512),
        Err(_) => Ok(BLOCK_SIZE),
    }
}
