//! `Replica`: an open replica directory and its data path.
//!
//! Reads resolve each 4 KiB block through the extent index to the newest layer holding
//! it and go to that layer's file; never-written blocks are zero-filled without I/O.
//! Writes go to the head. I/O is submitted to the replica's own io_uring and completes
//! out of order through [`Replica::reap`]; the `*_at` methods are blocking conveniences
//! over the same path. Chain operations live in `chain.rs`.
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

use io_uring::{opcode, types, IoUring};

use crate::buf::IoBuf;
use crate::error::{ReplicaError, Result};
use crate::extent::{data_extents, Extent};
use crate::index::BlockIndex;
use crate::layer::LayerFile;
use crate::meta::{self, layer_path, zeros_path, VolumeMeta, BLOCK_SIZE};
use crate::zeros::{self, ZeroLog};

/// Largest single read or write.
pub const MAX_IO_BYTES: u64 = 64 << 20;
/// Submission queue depth of the replica's ring.
const RING_ENTRIES: u32 = 256;
/// Name of the lock file that keeps two processes from opening one replica.
pub(crate) const LOCK_FILE: &str = "volume.lock";

/// What an I/O was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    Read,
    Write,
    Flush,
}

impl OpKind {
    fn verb(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "fdatasync",
        }
    }
}

/// A finished I/O: the caller's tag, the outcome, and the buffer handed back.
#[derive(Debug)]
pub struct Completion {
    /// The tag given at submission.
    pub tag: u64,
    /// Success, or what went wrong.
    pub result: Result<()>,
    /// The buffer given at submission (reads: now holding the data); `None` for flushes.
    pub buf: Option<IoBuf>,
}

#[derive(Debug)]
struct Op {
    tag: u64,
    kind: OpKind,
    buf: Option<IoBuf>,
    /// Submission entries not yet completed.
    pending: u32,
    error: Option<ReplicaError>,
    /// For writes: the blocks that become the head's once the write lands.
    paint: (u64, u64),
}

/// One submission entry in flight: which op, which layer, how many bytes expected.
#[derive(Debug, Clone, Copy)]
struct Sqe {
    op: u32,
    layer: u32,
    expected: u32,
}

/// An open replica.
pub struct Replica {
    pub(crate) dir: PathBuf,
    pub(crate) meta: VolumeMeta,
    /// The active chain, root first, head last; index values are positions + 1.
    pub(crate) chain: Vec<LayerFile>,
    pub(crate) index: BlockIndex,
    pub(crate) zero_log: ZeroLog,
    dio_align: u64,
    ring: IoUring,
    ops: Vec<Option<Op>>,
    free_ops: Vec<u32>,
    sqes: Vec<Sqe>,
    free_sqes: Vec<u32>,
    ready: VecDeque<Completion>,
    in_flight: usize,
    /// Reused by `submit_read` so the hot path does not allocate.
    pieces: Vec<Piece>,
    _lock: File,
}

/// One piece of a read: buffer offset, volume offset, length, chain position.
type Piece = (usize, u64, usize, Option<usize>);

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
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(ReplicaError::Locked {
                path: dir.to_path_buf(),
            });
        }
        return Err(ReplicaError::io("lock", &path, err));
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
        let mut r = Replica {
            index: BlockIndex::new(m.size),
            chain: Vec::new(),
            zero_log,
            dio_align: BLOCK_SIZE,
            ring: new_ring().map_err(|e| ReplicaError::io("io_uring setup", &head_path, e))?,
            ops: Vec::new(),
            free_ops: Vec::new(),
            sqes: Vec::new(),
            free_sqes: Vec::new(),
            ready: VecDeque::new(),
            in_flight: 0,
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

    /// Heap bytes held by the extent index.
    pub fn index_bytes(&self) -> usize {
        self.index.heap_bytes()
    }

    /// I/Os submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight + self.ready.len()
    }

    pub(crate) fn head(&self) -> &LayerFile {
        self.chain.last().expect("a chain always has a head")
    }

    fn head_value(&self) -> u16 {
        self.chain.len() as u16
    }

    fn check_io(&self, offset: u64, len: u64) -> Result<()> {
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
    fn segments(&self, offset: u64, len: u64, mut f: impl FnMut(usize, u64, usize, Option<usize>)) {
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

    fn aligned(&self, file_off: u64, len: usize, ptr: *const u8) -> bool {
        let a = self.dio_align;
        file_off % a == 0 && len as u64 % a == 0 && (ptr as u64) % a == 0
    }

    fn new_op(&mut self, tag: u64, kind: OpKind, buf: Option<IoBuf>, paint: (u64, u64)) -> u32 {
        let op = Op {
            tag,
            kind,
            buf,
            pending: 0,
            error: None,
            paint,
        };
        self.in_flight += 1;
        match self.free_ops.pop() {
            Some(i) => {
                self.ops[i as usize] = Some(op);
                i
            }
            None => {
                self.ops.push(Some(op));
                (self.ops.len() - 1) as u32
            }
        }
    }

    fn op_mut(&mut self, i: u32) -> &mut Op {
        self.ops[i as usize].as_mut().expect("op in flight")
    }

    fn push_sqe(&mut self, entry: io_uring::squeue::Entry, rec: Sqe) -> Result<()> {
        let idx = match self.free_sqes.pop() {
            Some(i) => {
                self.sqes[i as usize] = rec;
                i
            }
            None => {
                self.sqes.push(rec);
                (self.sqes.len() - 1) as u32
            }
        };
        let entry = entry.user_data(idx as u64);
        loop {
            // SAFETY: every buffer and descriptor the entry names is owned by an op in
            // `self.ops` (buffers) or by `self.chain` (descriptors), and neither is
            // dropped or moved until the entry's completion has been reaped.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                break;
            }
            self.ring
                .submit()
                .map_err(|e| ReplicaError::io("io_uring submit", &self.dir, e))?;
        }
        self.op_mut(rec.op).pending += 1;
        Ok(())
    }

    /// Finishes an op whose entries have all completed: paints written blocks, queues
    /// the completion.
    fn finish_op(&mut self, i: u32) {
        let op = self.ops[i as usize].take().expect("op in flight");
        self.free_ops.push(i);
        self.in_flight -= 1;
        let result = match op.error {
            Some(e) => Err(e),
            None => {
                if op.kind == OpKind::Write {
                    let v = self.head_value();
                    self.index.set_range(op.paint.0, op.paint.1, v);
                }
                Ok(())
            }
        };
        self.ready.push_back(Completion {
            tag: op.tag,
            result,
            buf: op.buf,
        });
    }

    fn fail_now(&mut self, tag: u64, buf: Option<IoBuf>, e: ReplicaError) {
        self.ready.push_back(Completion {
            tag,
            result: Err(e),
            buf,
        });
    }

    /// Submits a read of `buf.len()` bytes at `offset`; the completion hands `buf` back.
    pub fn submit_read(&mut self, offset: u64, buf: IoBuf, tag: u64) {
        if let Err(e) = self.check_io(offset, buf.len() as u64) {
            return self.fail_now(tag, Some(buf), e);
        }
        let len = buf.len() as u64;
        let op = self.new_op(tag, OpKind::Read, Some(buf), (0, 0));
        let mut pieces = std::mem::take(&mut self.pieces);
        pieces.clear();
        self.segments(offset, len, |bo, vo, n, pos| pieces.push((bo, vo, n, pos)));
        for &(bo, vo, n, pos) in &pieces {
            let base = self
                .op_mut(op)
                .buf
                .as_mut()
                .expect("read has a buffer")
                .as_mut_ptr();
            // SAFETY: bo + n <= buf.len(), from `segments`.
            let ptr = unsafe { base.add(bo) };
            let Some(pos) = pos else {
                // SAFETY: as above; the bytes belong to the op's buffer.
                unsafe { std::ptr::write_bytes(ptr, 0, n) };
                continue;
            };
            let aligned = self.aligned(vo, n, ptr);
            let fd = match self.chain[pos].fd_for(aligned) {
                Ok(fd) => fd,
                Err(e) => {
                    self.op_mut(op).error.get_or_insert(e);
                    break;
                }
            };
            let entry = opcode::Read::new(types::Fd(fd), ptr, n as u32).offset(vo).build();
            let rec = Sqe {
                op,
                layer: pos as u32,
                expected: n as u32,
            };
            if let Err(e) = self.push_sqe(entry, rec) {
                self.op_mut(op).error.get_or_insert(e);
                break;
            }
        }
        self.pieces = pieces;
        if self.op_mut(op).pending == 0 {
            self.finish_op(op);
        }
        self.submit_eagerly(op);
    }

    /// Does block `b`, partly covered by an I/O, need its old contents read first?
    fn needs_fill(&self, b: u64) -> bool {
        let v = self.index.get(b);
        v != 0 && v != self.head_value()
    }

    /// Submits a write of `buf` at `offset` to the head; the completion hands `buf` back.
    pub fn submit_write(&mut self, offset: u64, buf: IoBuf, tag: u64) {
        let len = buf.len() as u64;
        if let Err(e) = self.check_io(offset, len) {
            return self.fail_now(tag, Some(buf), e);
        }
        if len == 0 {
            return self.ready.push_back(Completion {
                tag,
                result: Ok(()),
                buf: Some(buf),
            });
        }
        let first = offset / BLOCK_SIZE;
        let last = (offset + len).div_ceil(BLOCK_SIZE);
        let head_partial = offset % BLOCK_SIZE != 0 && self.needs_fill(first);
        let tail_partial = (offset + len) % BLOCK_SIZE != 0 && self.needs_fill(last - 1);
        if head_partial || tail_partial {
            let result = self.write_filling_blocks(offset, buf.as_slice());
            return self.ready.push_back(Completion {
                tag,
                result,
                buf: Some(buf),
            });
        }
        let op = self.new_op(tag, OpKind::Write, Some(buf), (first, last - first));
        let ptr = self
            .op_mut(op)
            .buf
            .as_mut()
            .expect("write has a buffer")
            .as_mut_ptr();
        let pos = self.chain.len() - 1;
        let fd = match self.head().fd_for(self.aligned(offset, len as usize, ptr)) {
            Ok(fd) => fd,
            Err(e) => {
                self.op_mut(op).error = Some(e);
                return self.finish_op(op);
            }
        };
        let entry = opcode::Write::new(types::Fd(fd), ptr, len as u32)
            .offset(offset)
            .build();
        let rec = Sqe {
            op,
            layer: pos as u32,
            expected: len as u32,
        };
        self.push_single(op, entry, rec);
    }

    /// Submits a flush: every write completed before it is durable when it completes.
    pub fn submit_flush(&mut self, tag: u64) {
        let op = self.new_op(tag, OpKind::Flush, None, (0, 0));
        let fd = match self.head().buffered() {
            Ok(f) => f.as_raw_fd(),
            Err(e) => {
                self.op_mut(op).error = Some(e);
                return self.finish_op(op);
            }
        };
        let entry = opcode::Fsync::new(types::Fd(fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        let rec = Sqe {
            op,
            layer: (self.chain.len() - 1) as u32,
            expected: 0,
        };
        self.push_single(op, entry, rec);
    }

    /// Queues the one entry of a single-entry op and submits it; if it cannot be
    /// queued, the op completes with that error.
    fn push_single(&mut self, op: u32, entry: io_uring::squeue::Entry, rec: Sqe) {
        match self.push_sqe(entry, rec) {
            Ok(()) => self.submit_eagerly(op),
            Err(e) => {
                self.op_mut(op).error = Some(e);
                self.finish_op(op);
            }
        }
    }

    /// Hands an op's entries to the kernel right away. Measured on the virtual disk
    /// here, getting each I/O to the device at once beat batching submissions until
    /// the next reap by about 25% at QD32 (docs/benchmarks.md), as fio's default does.
    /// A failure to submit fails the op.
    fn submit_eagerly(&mut self, op: u32) {
        if let Err(e) = self.submit_queued() {
            if let Some(o) = self.ops.get_mut(op as usize).and_then(Option::as_mut) {
                o.error.get_or_insert(e);
            }
        }
    }

    /// Submits queued entries and moves completions into `out` until it holds at least
    /// `min` of them or nothing is left in flight. Returns how many were added.
    pub fn reap(&mut self, min: usize, out: &mut Vec<Completion>) -> Result<usize> {
        let start = out.len();
        loop {
            out.extend(self.ready.drain(..));
            if out.len() - start >= min || self.in_flight == 0 {
                // Hand over anything queued so the kernel works while the caller does.
                self.submit_queued()?;
                return Ok(out.len() - start);
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(ReplicaError::io("io_uring wait", &self.dir, e)),
            }
            self.drain_cq();
        }
    }

    /// Passes queued submission entries to the kernel, if there are any (an empty
    /// `submit` would still cost a system call).
    pub fn submit_queued(&mut self) -> Result<()> {
        if !self.ring.submission().is_empty() {
            self.ring
                .submit()
                .map_err(|e| ReplicaError::io("io_uring submit", &self.dir, e))?;
        }
        Ok(())
    }

    fn drain_cq(&mut self) {
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (ud, res) in done {
            let rec = self.sqes[ud as usize];
            self.free_sqes.push(ud as u32);
            let err = if res < 0 {
                Some(std::io::Error::from_raw_os_error(-res))
            } else if rec.expected != 0 && res as u32 != rec.expected {
                Some(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("short transfer: {res} of {} bytes", rec.expected),
                ))
            } else {
                None
            };
            let kind = self.ops[rec.op as usize].as_ref().expect("op in flight").kind;
            if let Some(err) = err {
                let path = self.chain[rec.layer as usize].path.clone();
                let op = self.op_mut(rec.op);
                op.error.get_or_insert(ReplicaError::io(kind.verb(), path, err));
            }
            let op = self.op_mut(rec.op);
            op.pending -= 1;
            if op.pending == 0 {
                self.finish_op(rec.op);
            }
        }
    }

    /// Waits for every I/O in flight; their completions stay queued for `reap`.
    pub(crate) fn drain(&mut self) -> Result<()> {
        while self.in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(ReplicaError::io("io_uring wait", &self.dir, e)),
            }
            self.drain_cq();
        }
        Ok(())
    }

    /// Runs one submitted op to completion and returns it (the blocking API).
    fn wait_last(&mut self) -> Result<Completion> {
        self.drain()?;
        Ok(self.ready.pop_back().expect("the op just submitted completed"))
    }

    /// Reads `out.len()` bytes at `offset` (blocking).
    pub fn read_at(&mut self, offset: u64, out: &mut [u8]) -> Result<()> {
        self.drain()?;
        let buf = IoBuf::zeroed(out.len());
        self.submit_read(offset, buf, u64::MAX);
        let c = self.wait_last()?;
        c.result?;
        out.copy_from_slice(c.buf.expect("reads return their buffer").as_slice());
        Ok(())
    }

    /// Writes `data` at `offset` (blocking; durable only after [`Replica::flush`]).
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.drain()?;
        self.submit_write(offset, IoBuf::from_slice(data), u64::MAX);
        self.wait_last()?.result
    }

    /// Makes every completed write durable (blocking).
    pub fn flush(&mut self) -> Result<()> {
        self.drain()?;
        self.submit_flush(u64::MAX);
        self.wait_last()?.result
    }

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
    fn write_filling_blocks(&mut self, offset: u64, data: &[u8]) -> Result<()> {
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
        if v == 0 {
            return Ok(());
        }
        let block_start = b * BLOCK_SIZE;
        let mut block = vec![0u8; BLOCK_SIZE as usize];
        if v != self.head_value() {
            self.read_blocking(block_start, &mut block)?;
        } else {
            // Only the zeroed bytes need writing: the rest of the head's block stays.
            let head = self.head();
            return head
                .buffered()?
                .write_all_at(&block[..(to - from) as usize], from)
                .map_err(|e| ReplicaError::io("write", &head.path, e));
        }
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
        if self.chain.len() > 1 {
            self.index.runs(first, count, |b, n, v| {
                if v != 0 {
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

/// The replica's ring. One thread submits and reaps, so the kernel may run completion
/// work when that thread asks for completions instead of interrupting it (needs 6.1;
/// older kernels get a plain ring).
fn new_ring() -> std::io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_defer_taskrun()
        .build(RING_ENTRIES)
        .or_else(|_| IoUring::new(RING_ENTRIES))
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
