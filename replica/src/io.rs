//! `OpRing`: the replica's I/O engine. Reads, writes and fdatasyncs are submitted to
//! the replica's own io_uring and complete out of order; a server sharing the ring
//! adds its socket entries ([`OpRing::submit_raw`]).
//!
//! Each I/O is an *op* in a slab, with the caller's tag and buffer; it becomes one or
//! more submission entries (a read spanning several layers has one per layer piece),
//! and completes when all of them have. Errors come back as completions, never as
//! panics.
//!
//! Floor: above `error`, `extent` and horn-uring; below `replica.rs`, which composes it
//! with the snapshot chain. It knows no layer and no index, and must never learn them:
//! an entry names its file by the number its owner gave it ([`Target`]), and an op
//! that lands asks its owner ([`Landing`]) for what only the owner knows: the path of
//! a file to name in an error, and what a landed write means (its blocks become the
//! head's, so a read racing a write of the same block sees the old or the new data,
//! never a hole).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use io_uring::squeue;

use crate::error::{ReplicaError, Result};
use crate::extent::BlockRun;
use horn_uring::{IoBuf, Ring};

/// Submission queue depth of the replica's ring.
const RING_ENTRIES: u32 = 256;

/// What an op does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    /// Reads into the op's buffer (one entry per piece).
    Read,
    /// Writes the op's buffer (one entry).
    Write,
    /// An fdatasync (one entry).
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
    /// For entries given to [`crate::Replica::submit_raw`]: the kernel's result (bytes,
    /// a descriptor, or a negated errno). Zero for the store's own I/O.
    pub raw: i32,
}

/// Tag of the blocking helpers' own I/O; callers of the `submit_*` methods must not use it.
pub const INTERNAL_TAG: u64 = u64::MAX;

/// An op's slot in the ring's slab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpId(u32);

#[derive(Debug)]
struct Op {
    tag: u64,
    kind: OpKind,
    buf: Option<IoBuf>,
    /// Submission entries not yet completed.
    pending: u32,
    /// The kernel's result, for raw entries.
    raw: i32,
    error: Option<ReplicaError>,
    /// For writes: the blocks that become the head's once the write lands.
    written: Option<BlockRun>,
}

/// Where a submission entry goes: the file, by the number its owner gave it (the
/// replica gives chain positions), and the bytes it must move (0: whatever it moves).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target {
    /// The owner's number for the file, handed back to [`Landing::path`] on an error.
    pub file: u32,
    /// Bytes the entry must move; fewer is a short transfer, an error.
    pub expected: u32,
}

/// One submission entry in flight: its op and its target.
#[derive(Debug, Clone, Copy)]
struct Entry {
    op: OpId,
    target: Target,
}

/// What the ring asks of its owner as ops land: the owner knows the files and what a
/// landed write means; the ring knows neither.
pub(crate) trait Landing {
    /// The path of file `file` (as given in an entry's [`Target`]), to name in an error.
    fn path(&self, file: u32) -> &Path;
    /// A write op landed whole: `blocks`, given when it started, now hold its data.
    fn written(&mut self, blocks: BlockRun);
}

/// The replica's io_uring and the ops in flight on it.
pub(crate) struct OpRing {
    /// Belongs to the first thread that does I/O (see [`Ring::for_thread`]), or to any
    /// thread in turn after [`OpRing::make_shareable`].
    ring: Ring,
    /// The replica directory, to name in the ring's own errors.
    owner: PathBuf,
    ops: Vec<Option<Op>>,
    free_ops: Vec<u32>,
    entries: Vec<Entry>,
    free_entries: Vec<u32>,
    /// Finished ops, until reaped.
    ready: VecDeque<Completion>,
    /// Store ops (reads, writes, flushes) in the slab.
    in_flight: usize,
    /// Raw ops (a server's socket entries) in the slab.
    raw_in_flight: usize,
}

impl OpRing {
    /// A ring that belongs to the first thread doing I/O on it; `owner` (the replica
    /// directory) names it in errors.
    pub(crate) fn for_thread(owner: &Path) -> std::io::Result<OpRing> {
        Ok(OpRing {
            ring: Ring::for_thread(RING_ENTRIES)?,
            owner: owner.to_path_buf(),
            ops: Vec::new(),
            free_ops: Vec::new(),
            entries: Vec::new(),
            free_entries: Vec::new(),
            ready: VecDeque::new(),
            in_flight: 0,
            raw_in_flight: 0,
        })
    }

    /// Waits for the store I/O in flight, then replaces the ring with one any thread
    /// may submit to (one at a time), for a replica shared under a lock.
    pub(crate) fn make_shareable(&mut self, landing: &mut impl Landing) -> Result<()> {
        self.drain(landing)?;
        debug_assert_eq!(
            self.raw_in_flight, 0,
            "raw entries would be lost with the old ring"
        );
        self.ring =
            Ring::shared(RING_ENTRIES).map_err(|e| ReplicaError::io("io_uring setup", &self.owner, e))?;
        Ok(())
    }

    /// I/Os submitted and not yet reaped.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight + self.raw_in_flight + self.ready.len()
    }

    /// Starts an op: a slot in the slab, counted in flight until it finishes. A write
    /// carries the blocks it `written` to its landing.
    pub(crate) fn start(
        &mut self,
        tag: u64,
        kind: OpKind,
        buf: Option<IoBuf>,
        written: Option<BlockRun>,
    ) -> OpId {
        debug_assert!(
            written.is_none() || kind == OpKind::Write,
            "only a write paints blocks"
        );
        let op = Op {
            tag,
            kind,
            buf,
            pending: 0,
            raw: 0,
            error: None,
            written,
        };
        if kind == OpKind::Raw {
            self.raw_in_flight += 1;
        } else {
            self.in_flight += 1;
        }
        match self.free_ops.pop() {
            Some(i) => {
                debug_assert!(self.ops[i as usize].is_none(), "op slot {i} is free and taken");
                self.ops[i as usize] = Some(op);
                OpId(i)
            }
            None => {
                self.ops.push(Some(op));
                OpId((self.ops.len() - 1) as u32)
            }
        }
    }

    fn op_mut(&mut self, op: OpId) -> &mut Op {
        self.ops[op.0 as usize].as_mut().expect("op in flight")
    }

    /// The start of `op`'s buffer, which its entries read into or write from. The
    /// buffer is on the heap, where it stays while the op is in the slab however the
    /// slab grows.
    pub(crate) fn buf_ptr(&mut self, op: OpId) -> *mut u8 {
        self.op_mut(op)
            .buf
            .as_mut()
            .expect("the op has a buffer")
            .as_mut_ptr()
    }

    /// Records that `op` failed (the first error is the one reported). It finishes
    /// once the entries queued so far have completed.
    pub(crate) fn fail(&mut self, op: OpId, e: ReplicaError) {
        self.op_mut(op).error.get_or_insert(e);
    }

    /// Queues one entry of `op` toward `target`. If it cannot be queued the op carries
    /// the error, and `false` says to queue no more of it.
    ///
    /// # Safety
    /// Every buffer and descriptor the entry names must stay valid, and not move,
    /// until its completion has been reaped. Its user data is overwritten.
    pub(crate) unsafe fn push(&mut self, op: OpId, entry: squeue::Entry, target: Target) -> bool {
        // SAFETY: the caller's promise.
        match unsafe { self.queue(op, entry, target) } {
            Ok(()) => true,
            Err(e) => {
                self.fail(op, e);
                false
            }
        }
    }

    /// # Safety
    /// As for [`OpRing::push`].
    unsafe fn queue(&mut self, op: OpId, entry: squeue::Entry, target: Target) -> Result<()> {
        let rec = Entry { op, target };
        let idx = match self.free_entries.pop() {
            Some(i) => {
                self.entries[i as usize] = rec;
                i
            }
            None => {
                self.entries.push(rec);
                (self.entries.len() - 1) as u32
            }
        };
        let entry = entry.user_data(idx as u64);
        // SAFETY: the caller's promise.
        if let Err(e) = unsafe { self.ring.push(&entry) } {
            self.free_entries.push(idx);
            return Err(self.ring_error("io_uring submit", e));
        }
        self.op_mut(op).pending += 1;
        Ok(())
    }

    /// Ends the submission of `op`: finishes it now if none of its entries is queued
    /// (a read of holes only, or a failure), and hands what is queued to the kernel
    /// right away. Measured on the virtual disk here, getting each I/O to the device at
    /// once beat batching submissions until the next reap by about 25% at QD32
    /// (docs/benchmarks.md), as fio's default does. A failure to submit fails the op.
    pub(crate) fn seal(&mut self, op: OpId, landing: &mut impl Landing) {
        if self.op_mut(op).pending == 0 {
            self.finish(op, landing);
        }
        if let Err(e) = self.submit_queued() {
            if let Some(o) = self.ops.get_mut(op.0 as usize).and_then(Option::as_mut) {
                o.error.get_or_insert(e);
            }
        }
    }

    /// Completes an I/O that needed no entry (refused before it started, or with
    /// nothing to do): its completion queues behind the others.
    pub(crate) fn complete_now(&mut self, tag: u64, result: Result<()>, buf: Option<IoBuf>) {
        self.ready.push_back(Completion {
            tag,
            result,
            buf,
            raw: 0,
        });
    }

    /// Queues an entry the caller built (a socket accept, receive or send of a server
    /// that shares this ring, so socket and disk I/O need no thread hop) and submits it.
    /// Its completion comes back from [`OpRing::reap`] with `tag` and the kernel's
    /// result in [`Completion::raw`]; the ring interprets nothing.
    ///
    /// # Safety
    /// Every buffer and descriptor the entry names must stay valid, and not be moved
    /// or freed, until its completion has been reaped. Its user data is overwritten.
    pub(crate) unsafe fn submit_raw(&mut self, entry: squeue::Entry, tag: u64) -> Result<()> {
        let op = self.start(tag, OpKind::Raw, None, None);
        let target = Target { file: 0, expected: 0 };
        // SAFETY: the caller's promise.
        if let Err(e) = unsafe { self.queue(op, entry, target) } {
            self.release(op);
            return Err(e);
        }
        self.submit_queued()
    }

    /// Takes `op` out of the slab and out of the count in flight.
    fn release(&mut self, op: OpId) -> Op {
        let o = self.ops[op.0 as usize].take().expect("op in flight");
        self.free_ops.push(op.0);
        let count = if o.kind == OpKind::Raw {
            &mut self.raw_in_flight
        } else {
            &mut self.in_flight
        };
        debug_assert!(*count > 0, "a {:?} op ends with none counted in flight", o.kind);
        *count -= 1;
        o
    }

    /// Finishes an op whose entries have all completed: lands a written op's blocks
    /// and queues the completion.
    fn finish(&mut self, op: OpId, landing: &mut impl Landing) {
        let o = self.release(op);
        debug_assert_eq!(o.pending, 0, "an op finishes with entries in the kernel");
        let result = match o.error {
            Some(e) => Err(e),
            None => {
                if let Some(blocks) = o.written {
                    landing.written(blocks);
                }
                Ok(())
            }
        };
        self.ready.push_back(Completion {
            tag: o.tag,
            result,
            buf: o.buf,
            raw: o.raw,
        });
    }

    /// Submits queued entries and moves completions into `out` until it holds at least
    /// `min` of them or nothing is left in flight. Returns how many were added.
    pub(crate) fn reap(
        &mut self,
        min: usize,
        out: &mut Vec<Completion>,
        landing: &mut impl Landing,
    ) -> Result<usize> {
        let start = out.len();
        loop {
            out.extend(self.ready.drain(..));
            if out.len() - start >= min || self.in_flight + self.raw_in_flight == 0 {
                // Hand over anything queued so the kernel works while the caller does.
                self.submit_queued()?;
                return Ok(out.len() - start);
            }
            self.wait_some(landing)?;
        }
    }

    /// Passes queued submission entries to the kernel, if there are any (an empty
    /// `submit` would still cost a system call).
    pub(crate) fn submit_queued(&mut self) -> Result<()> {
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
                self.owner.display()
            ));
        }
        ReplicaError::io(op, &self.owner, e)
    }

    /// Submits what is queued, waits for at least one completion, and processes all
    /// that have arrived.
    fn wait_some(&mut self, landing: &mut impl Landing) -> Result<()> {
        if let Err(e) = self.ring.wait(None) {
            return Err(self.ring_error("io_uring wait", e));
        }
        self.drain_cq(landing);
        Ok(())
    }

    fn drain_cq(&mut self, landing: &mut impl Landing) {
        // Copied out first: finishing an op needs `&mut self`.
        let done = self.ring.reap();
        for c in &done {
            let res = c.result;
            let Entry { op: id, target } = self.entries[c.token() as usize];
            debug_assert!(
                !self.free_entries.contains(&c.token()),
                "a completion for an entry that is not in flight"
            );
            self.free_entries.push(c.token());
            let err = if res < 0 {
                Some(std::io::Error::from_raw_os_error(-res))
            } else if target.expected != 0 && res as u32 != target.expected {
                Some(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("short transfer: {res} of {} bytes", target.expected),
                ))
            } else {
                None
            };
            let op = self.op_mut(id);
            if op.kind == OpKind::Raw {
                op.raw = res;
            } else if let Some(err) = err {
                if op.error.is_none() {
                    op.error = Some(ReplicaError::io(op.kind.verb(), landing.path(target.file), err));
                }
            }
            debug_assert!(op.pending > 0, "a completion for an op with no entry pending");
            op.pending -= 1;
            if op.pending == 0 {
                self.finish(id, landing);
            }
        }
        self.ring.recycle(done);
    }

    /// Waits for every store I/O in flight (not raw entries: an idle socket receive may
    /// never complete); their completions stay queued for `reap`.
    pub(crate) fn drain(&mut self, landing: &mut impl Landing) -> Result<()> {
        while self.in_flight > 0 {
            self.wait_some(landing)?;
        }
        self.check_counts();
        Ok(())
    }

    /// Runs the blocking API's op (tagged [`INTERNAL_TAG`]) to completion and returns
    /// it; the others' completions stay queued for `reap`.
    pub(crate) fn take_internal(&mut self, landing: &mut impl Landing) -> Result<Completion> {
        self.drain(landing)?;
        let at = self
            .ready
            .iter()
            .rposition(|c| c.tag == INTERNAL_TAG)
            .expect("the op just submitted completed");
        Ok(self.ready.remove(at).expect("position is in range"))
    }

    /// The counts in flight are the ops in the slab, by kind, and every slot is either
    /// taken or free (debug builds: walks the slab).
    fn check_counts(&self) {
        if cfg!(debug_assertions) {
            let live = self.ops.iter().flatten().count();
            let raw = self
                .ops
                .iter()
                .flatten()
                .filter(|o| o.kind == OpKind::Raw)
                .count();
            debug_assert_eq!(raw, self.raw_in_flight, "raw ops counted in flight");
            debug_assert_eq!(live - raw, self.in_flight, "store ops counted in flight");
            debug_assert_eq!(live + self.free_ops.len(), self.ops.len(), "op slots");
        }
    }
}
