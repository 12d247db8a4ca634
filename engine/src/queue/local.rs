//! An engine queue's I/O on a replica hosted in this process ([`SharedReplica`], data
//! address `inproc:DIR`): planned under the replica's lock, then the file reads,
//! writes and fdatasyncs put on the queue's own ring, straight from and into the
//! caller's buffer.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use horn_replica::shared::{LocalIo, LocalKind, SharedReplica};
use io_uring::{opcode, types};

use super::{reply_for, EngineQueue, KIND_LOCAL};
use crate::replica_set::{IoId, IoKind, IoRequest, Reply, ReqId};

/// Largest write to an in-process replica's page cache made on the queue's thread
/// (see [`EngineQueue::inline_write`]).
const INLINE_WRITE_MAX: usize = 64 << 10;

/// An I/O on a replica hosted in this process, while its file operations run.
pub(super) struct LocalOp {
    pub(super) req: ReqId,
    pub(super) io: IoId,
    pub(super) replica: Arc<SharedReplica>,
    pub(super) planned: LocalIo,
    /// File operations still in the ring.
    pub(super) pending: usize,
    /// Bytes they moved, and the first error.
    pub(super) moved: usize,
    pub(super) error: Option<std::io::Error>,
}

impl EngineQueue {
    /// Runs a request on a replica hosted in this process: plans it under the
    /// replica's lock, then puts its file operations on the ring. Requests the replica
    /// answers at once (refusals, reads of holes, discards) are answered through
    /// `local_replies`.
    pub(super) fn send_local(
        &mut self,
        replica: Arc<SharedReplica>,
        req: ReqId,
        io: IoId,
        request: IoRequest,
    ) {
        let generation = self.engine.generation();
        let Some(slot) = self.slots.get_mut(&io) else {
            return;
        };
        let fua = slot.fua;
        let offset = request.offset;
        let planned = match request.kind {
            IoKind::Read => {
                let buf = slot.buf.as_mut().expect("reads carry a buffer");
                replica.plan_read(generation, offset, buf.as_mut_slice())
            }
            IoKind::Write => {
                let buf = slot.buf.as_ref().expect("writes carry a buffer");
                match replica.plan_write(generation, offset, buf.as_slice()) {
                    // Written under the replica's lock; FUA still owes an fdatasync.
                    Ok(None) if fua => replica.plan_flush(generation).map(Some),
                    other => other,
                }
            }
            IoKind::Flush => replica.plan_flush(generation).map(Some),
            IoKind::Discard | IoKind::WriteZeroes => replica
                .discard(
                    generation,
                    offset,
                    request.len as u64,
                    request.kind == IoKind::WriteZeroes,
                )
                .map(|()| None),
        };
        let planned = match planned {
            Ok(Some(p)) => p,
            Ok(None) => return self.local_reply(req, Reply::Ok),
            Err(e) => return self.local_reply(req, reply_for(e.wire_status(), e.to_string())),
        };
        let index = match self.local_free.pop() {
            Some(i) => i,
            None => {
                self.local_ops.push(None);
                (self.local_ops.len() - 1) as u32
            }
        };
        let token = (KIND_LOCAL | index) as u64;
        let buf = slot
            .buf
            .as_mut()
            .map_or(std::ptr::null_mut(), |b| b.as_mut_slice().as_mut_ptr());
        // A small page-cache write is made here and now; everything else goes on the ring.
        let inline = Self::inline_write(&planned, fua).map(|piece| {
            // SAFETY: the replica planned the piece within the buffer, which the slot
            // holds for the length of this call.
            let res = unsafe {
                libc::pwrite(
                    piece.file.as_raw_fd(),
                    buf.add(piece.buf_offset).cast(),
                    piece.len,
                    piece.file_offset as libc::off_t,
                )
            };
            if res < 0 {
                -std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO)
            } else {
                res as i32
            }
        });
        let flags = if fua { libc::RWF_DSYNC } else { 0 };
        let on_ring = if inline.is_some() {
            &[][..]
        } else {
            &planned.pieces[..]
        };
        for piece in on_ring {
            let fd = types::Fd(piece.file.as_raw_fd());
            // SAFETY (of the `add`s): the replica planned each piece within the buffer.
            let entry = match planned.kind {
                LocalKind::Read => {
                    opcode::Read::new(fd, unsafe { buf.add(piece.buf_offset) }, piece.len as u32)
                        .offset(piece.file_offset)
                        .build()
                }
                LocalKind::Write => {
                    opcode::Write::new(fd, unsafe { buf.add(piece.buf_offset) }, piece.len as u32)
                        .offset(piece.file_offset)
                        .rw_flags(flags)
                        .build()
                }
                LocalKind::Flush => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            };
            if planned.kind != LocalKind::Flush {
                slot.refs += 1;
            }
            // The file stays open in the op's pieces, and the bytes live in the I/O's
            // buffer, whose refs count this entry, until it completes.
            self.entries.push(entry.user_data(token));
        }
        let pending = if inline.is_some() { 1 } else { planned.pieces.len() };
        self.local_in_flight += pending;
        self.local_ops[index as usize] = Some(LocalOp {
            req,
            io,
            replica,
            pending,
            planned,
            moved: 0,
            error: None,
        });
        if let Some(res) = inline {
            if let Some((req, reply)) = self.local_entry_done(index as usize, res) {
                self.local_reply(req, reply);
            }
        }
    }

    /// The piece of a planned write to make at once, on this thread, instead of on the
    /// ring: a small write into the page cache. A buffered write on ext4 is never
    /// started without blocking, so the ring hands it to a kernel worker, and the
    /// hand-off (a wake-up, a thread switch each way) costs more than the copy into
    /// the page cache it carries; on 2 CPUs that CPU was the client's. Writes with
    /// FUA (an fdatasync each), around the page cache, larger than
    /// [`INLINE_WRITE_MAX`], or not in whole pages (the kernel would read the rest of
    /// a page from disk first) take the ring.
    fn inline_write(planned: &LocalIo, fua: bool) -> Option<&horn_replica::shared::FilePiece> {
        const PAGE: u64 = 4096;
        match planned.pieces.as_slice() {
            [piece]
                if planned.kind == LocalKind::Write
                    && !fua
                    && !piece.direct
                    && piece.len <= INLINE_WRITE_MAX
                    && piece.file_offset % PAGE == 0
                    && piece.len as u64 % PAGE == 0 =>
            {
                Some(piece)
            }
            _ => None,
        }
    }

    /// Queues an in-process replica's reply, unless its request was settled without it.
    fn local_reply(&mut self, req: ReqId, reply: Reply) {
        if self.reqs.remove(&req).is_some() {
            self.local_replies.push_back((req, reply));
        }
    }

    /// A file operation of local op `index` finished with `res`.
    pub(super) fn on_local(&mut self, index: usize, res: i32) {
        let Some(op) = self.local_ops.get(index).and_then(Option::as_ref) else {
            return tracing::error!(index, "completion for a local operation this queue never issued");
        };
        let (io, holds_buf) = (op.io, op.planned.kind != LocalKind::Flush);
        if let Some((req, reply)) = self.local_entry_done(index, res) {
            let closed = self.reqs.get(&req).is_none_or(|&(_, r)| self.conns[r].closed);
            if closed {
                self.reqs.remove(&req);
            } else {
                self.local_reply(req, reply);
            }
            self.run_actions();
        }
        if holds_buf {
            self.release(io);
        }
    }

    /// Counts a finished file operation of local op `index`; after its last one,
    /// finishes the I/O on the replica and returns the replica's answer.
    pub(super) fn local_entry_done(&mut self, index: usize, res: i32) -> Option<(ReqId, Reply)> {
        debug_assert!(
            self.local_in_flight > 0,
            "more local file completions than operations"
        );
        self.local_in_flight -= 1;
        let op = self.local_ops.get_mut(index)?.as_mut()?;
        match res {
            r if r < 0 => {
                op.error.get_or_insert(std::io::Error::from_raw_os_error(-r));
            }
            r => op.moved += r as usize,
        }
        debug_assert!(
            op.pending > 0,
            "local op {index}: more completions than file operations"
        );
        op.pending -= 1;
        if op.pending > 0 {
            return None;
        }
        let op = self.local_ops[index].take().expect("checked");
        self.local_free.push(index as u32);
        let expected: usize = op.planned.pieces.iter().map(|p| p.len).sum();
        let what = match op.planned.kind {
            LocalKind::Read => "read",
            LocalKind::Write => "write",
            LocalKind::Flush => "fdatasync",
        };
        let dir = op.replica.dir().display().to_string();
        let failure = match (op.error, op.moved) {
            (Some(e), _) => Some(format!("{what} of replica {dir}: {e}")),
            (None, moved) if moved != expected => Some(format!(
                "{what} of replica {dir}: short transfer: {moved} of {expected} bytes"
            )),
            (None, _) => None,
        };
        let finished = op.replica.finish(op.planned, failure.is_none());
        let reply = match (failure, finished) {
            (Some(why), _) => Reply::Failed(why),
            (None, Err(e)) => Reply::Failed(e.to_string()),
            (None, Ok(())) => Reply::Ok,
        };
        Some((op.req, reply))
    }
}
