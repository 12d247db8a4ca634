//! The asynchronous data path: reads, writes and flushes submitted to the replica's
//! io_uring and completed out of order.
//!
//! Each I/O is an *op* in a slab, with the caller's tag and buffer; it becomes one or
//! more submission entries (a read spanning several layers has one per layer piece),
//! and completes when all of them have. Errors come back as completions, never as
//! panics. Written blocks become the head's in the index when the write completes, so
//! a read racing a write of the same block sees the old or the new data, never a hole.

use std::os::fd::AsRawFd;

use io_uring::{opcode, types};

use crate::error::{ReplicaError, Result};
use crate::meta::BLOCK_SIZE;
use crate::replica::Replica;
use horn_uring::IoBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    Read,
    Write,
    Flush,
    /// An entry built by the caller (socket I/O of a server sharing the ring).
    Raw,
}

impl OpKind {
    fn verb(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "fdatasync",
            OpKind::Raw => "raw",
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
    /// The buffer given at submission (reads: now holding the data); `None` for flushes
    /// and raw entries.
    pub buf: Option<IoBuf>,
    /// For entries given to [`Replica::submit_raw`]: the kernel's result (bytes, a
    /// descriptor, or a negated errno). Zero for the store's own I/O.
    pub raw: i32,
}

/// Tag of the blocking helpers' own I/O; callers of the `submit_*` methods must not use it.
pub const INTERNAL_TAG: u64 = u64::MAX;

#[derive(Debug)]
pub(crate) struct Op {
    tag: u64,
    kind: OpKind,
    buf: Option<IoBuf>,
    /// Submission entries not yet completed.
    pending: u32,
    /// The kernel's result, for raw entries.
    raw: i32,
    error: Option<ReplicaError>,
    /// For writes: the blocks that become the head's once the write lands.
    paint: (u64, u64),
}

/// One submission entry in flight: which op, which layer, how many bytes expected.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sqe {
    op: u32,
    layer: u32,
    expected: u32,
}

impl Replica {
    fn new_op(&mut self, tag: u64, kind: OpKind, buf: Option<IoBuf>, paint: (u64, u64)) -> u32 {
        let op = Op {
            tag,
            kind,
            buf,
            pending: 0,
            raw: 0,
            error: None,
            paint,
        };
        if kind == OpKind::Raw {
            self.raw_in_flight += 1;
        } else {
            self.in_flight += 1;
        }
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
        // SAFETY: every buffer and descriptor the entry names is owned by an op in
        // `self.ops` (buffers) or by `self.chain` (descriptors), and neither is
        // dropped or moved until the entry's completion has been reaped.
        if let Err(e) = unsafe { self.ring.push(&entry) } {
            self.free_sqes.push(idx);
            return Err(self.ring_error("io_uring submit", e));
        }
        self.op_mut(rec.op).pending += 1;
        Ok(())
    }

    /// Finishes an op whose entries have all completed: paints written blocks, queues
    /// the completion.
    fn finish_op(&mut self, i: u32) {
        let op = self.ops[i as usize].take().expect("op in flight");
        self.free_ops.push(i);
        if op.kind == OpKind::Raw {
            self.raw_in_flight -= 1;
        } else {
            self.in_flight -= 1;
        }
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
            raw: op.raw,
        });
    }

    fn fail_now(&mut self, tag: u64, buf: Option<IoBuf>, e: ReplicaError) {
        self.ready.push_back(Completion {
            tag,
            result: Err(e),
            buf,
            raw: 0,
        });
    }

    /// Queues an entry the caller built (a socket accept, receive or send of a server
    /// that shares this ring, so socket and disk I/O need no thread hop) and submits it.
    /// Its completion comes back from [`Replica::reap`] with `tag` and the kernel's
    /// result in [`Completion::raw`]; the store interprets nothing.
    ///
    /// # Safety
    /// Every buffer and descriptor the entry names must stay valid, and not be moved
    /// or freed, until its completion has been reaped. Its user data is overwritten.
    pub unsafe fn submit_raw(&mut self, entry: io_uring::squeue::Entry, tag: u64) -> Result<()> {
        let op = self.new_op(tag, OpKind::Raw, None, (0, 0));
        let rec = Sqe {
            op,
            layer: 0,
            expected: 0,
        };
        if let Err(e) = self.push_sqe(entry, rec) {
            self.ops[op as usize] = None;
            self.free_ops.push(op);
            self.raw_in_flight -= 1;
            return Err(e);
        }
        self.submit_queued()
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

    /// Checks a write of `data` at `offset` and does what must come before its data
    /// reaches the head: notes suspect blocks while WO, and writes whole blocks itself
    /// where a partial block must merge with an older layer. Returns the blocks
    /// (first, count) the caller's write to the head then covers, or `None` when
    /// nothing is left to write.
    pub(crate) fn prepare_write(&mut self, offset: u64, data: &[u8]) -> Result<Option<(u64, u64)>> {
        let len = data.len() as u64;
        self.check_io(offset, len)?;
        if len == 0 {
            return Ok(None);
        }
        let first = offset / BLOCK_SIZE;
        let last = (offset + len).div_ceil(BLOCK_SIZE);
        if self.engine.mode == crate::state::Mode::Wo {
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
            self.write_filling_blocks(offset, data)?;
            return Ok(None);
        }
        Ok(Some((first, last - first)))
    }

    /// Submits a write of `buf` at `offset` to the head; the completion hands `buf` back.
    pub fn submit_write(&mut self, offset: u64, buf: IoBuf, tag: u64) {
        let len = buf.len() as u64;
        let (first, count) = match self.prepare_write(offset, buf.as_slice()) {
            Err(e) => return self.fail_now(tag, Some(buf), e),
            Ok(None) => {
                return self.ready.push_back(Completion {
                    tag,
                    result: Ok(()),
                    buf: Some(buf),
                    raw: 0,
                })
            }
            Ok(Some(blocks)) => blocks,
        };
        let op = self.new_op(tag, OpKind::Write, Some(buf), (first, count));
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
            if out.len() - start >= min || self.in_flight + self.raw_in_flight == 0 {
                // Hand over anything queued so the kernel works while the caller does.
                self.submit_queued()?;
                return Ok(out.len() - start);
            }
            self.wait_some()?;
        }
    }

    /// Passes queued submission entries to the kernel, if there are any (an empty
    /// `submit` would still cost a system call).
    pub fn submit_queued(&mut self) -> Result<()> {
        self.ring
            .submit()
            .map_err(|e| self.ring_error("io_uring submit", e))
    }

    /// A ring error, with the one cause a person cannot guess spelled out.
    fn ring_error(&self, op: &'static str, e: std::io::Error) -> ReplicaError {
        if e.raw_os_error() == Some(libc::EEXIST) {
            return ReplicaError::InvalidOperation(format!(
                "replica {}: I/O submitted from a thread other than the one that started its I/O \
                 (a replica's I/O must stay on one thread)",
                self.dir.display()
            ));
        }
        ReplicaError::io(op, &self.dir, e)
    }

    /// Submits what is queued, waits for at least one completion, and processes all
    /// that have arrived.
    fn wait_some(&mut self) -> Result<()> {
        if let Err(e) = self.ring.wait(None) {
            return Err(self.ring_error("io_uring wait", e));
        }
        self.drain_cq();
        Ok(())
    }

    fn drain_cq(&mut self) {
        // Copied out first: finishing an op needs `&mut self`.
        let done = self.ring.reap();
        for c in &done {
            let res = c.result;
            let rec = self.sqes[c.token() as usize];
            self.free_sqes.push(c.token());
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
            if kind == OpKind::Raw {
                self.op_mut(rec.op).raw = res;
            } else if let Some(err) = err {
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
        self.ring.recycle(done);
    }

    /// Waits for every store I/O in flight (not raw entries: an idle socket receive may
    /// never complete); their completions stay queued for `reap`.
    pub(crate) fn drain(&mut self) -> Result<()> {
        while self.in_flight > 0 {
            self.wait_some()?;
        }
        Ok(())
    }

    /// Runs the blocking API's op (tagged [`INTERNAL_TAG`]) to completion and returns it.
    fn wait_internal(&mut self) -> Result<Completion> {
        self.drain()?;
        let at = self
            .ready
            .iter()
            .rposition(|c| c.tag == INTERNAL_TAG)
            .expect("the op just submitted completed");
        Ok(self.ready.remove(at).expect("position is in range"))
    }

    /// Reads `out.len()` bytes at `offset` (blocking).
    pub fn read_at(&mut self, offset: u64, out: &mut [u8]) -> Result<()> {
        self.drain()?;
        let buf = IoBuf::zeroed(out.len());
        self.submit_read(offset, buf, INTERNAL_TAG);
        let c = self.wait_internal()?;
        c.result?;
        out.copy_from_slice(c.buf.expect("reads return their buffer").as_slice());
        Ok(())
    }

    /// Writes `data` at `offset` (blocking; durable only after [`Replica::flush`]).
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.drain()?;
        self.submit_write(offset, IoBuf::from_slice(data), INTERNAL_TAG);
        self.wait_internal()?.result
    }

    /// Makes every completed write durable (blocking).
    pub fn flush(&mut self) -> Result<()> {
        self.drain()?;
        self.submit_flush(INTERNAL_TAG);
        self.wait_internal()?.result
    }
}
