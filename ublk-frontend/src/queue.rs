//! One ublk queue's loop: block commands in, engine I/O out, on one ring.
//!
//! libublk runs the loop (`UblkQueue::wait_and_handle_io`) and calls
//! [`QueueServer::on_event`] for every completion on the queue's ring. Each event is
//! one of two steps, and every event ends with a third:
//! 1. **a command arrives** ([`QueueServer::on_command`]): a block command on a tag,
//!    handed to the engine queue (a read or write with the tag's buffer lent to it);
//!    with user copy, a write's data is first copied in from `/dev/ublkcN`;
//! 2. **a target I/O completes** ([`QueueServer::on_target_io`]): an entry of ours, an
//!    engine queue's socket or file operation, the timer, or a user copy;
//! 3. **completions are handed back** ([`QueueServer::hand_back`]): the engine's
//!    finished I/Os complete their commands (a read's data copied out first, with user
//!    copy), and the entries this produced are pushed on the ring.
//!
//! Our entries' user data carries the engine's token folded into libublk's 16-bit tag
//! field (see [`fold`]), with our own op code ([`TargetOp`]) to tell them apart.
//!
//! Data is not copied: a command's buffer (libublk's per-tag buffer, which the kernel
//! fills for writes and reads back for reads) is lent to the engine as an
//! [`IoBuf::borrowed`] for exactly the time the engine has the I/O.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use horn_engine::frontend::FailureLog;
use horn_engine::replica_set::IoKind;
use horn_engine::{Engine, EngineQueue, Token, VolumeError};
use horn_uring::IoBuf;
use io_uring::{opcode, squeue, types};
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{sys, BufDesc, UblkIORes};

/// Our own op codes in libublk's user data (its op field): what a target I/O was.
struct TargetOp;

impl TargetOp {
    /// An engine queue's entry; the tag field carries its folded token.
    const ENGINE: u32 = 0xf0;
    /// A read of the periodic timer.
    const TIMER: u32 = 0xf1;
    /// A user copy of a write command's data into our buffer.
    const COPY_IN: u32 = 0xf2;
    /// A user copy of a read command's data out of our buffer.
    const COPY_OUT: u32 = 0xf3;
}

/// The block operation of a command: the low byte of its descriptor's `op_flags`
/// (`UBLK_IO_OP_*`); the bits above it are flags such as [`FUA`].
const OP_MASK: u32 = 0xff;
/// Forced unit access: the write must be durable before it completes.
const FUA: u32 = sys::UBLK_IO_F_FUA;

/// How often the loop wakes to let the engine notice replicas past their timeout.
const TICK: std::time::Duration = std::time::Duration::from_millis(500);

/// Serves queue `qid` of `dev` until the device stops.
pub fn serve_queue(qid: u16, dev: &UblkDev, engine: &Arc<Engine>) {
    let mut server = match QueueServer::new(qid, dev, engine) {
        Ok(s) => s,
        Err(e) => return tracing::error!(queue = qid, error = %e, "cannot create the queue's timer"),
    };
    let queue = match UblkQueue::new(qid, dev) {
        Ok(q) => q,
        Err(e) => return tracing::error!(queue = qid, error = %e, "cannot set up the ublk queue"),
    };
    // Local replicas' file I/O runs on this ring too (engine/src/queue.rs).
    libublk::io::with_task_io_ring(horn_uring::widen_io_workers);
    let fetch = BufDescList::Slices((!server.user_copy).then_some(&server.bufs));
    let queue = match queue.submit_fetch_commands_unified(fetch) {
        Ok(q) => q,
        Err(e) => return tracing::error!(queue = qid, error = %e, "cannot fetch ublk commands"),
    };
    queue.wait_and_handle_io(|q, tag, ctx| server.on_event(q, tag, ctx));
    if let Some(eq) = server.engine_queue.as_mut() {
        eq.shutdown();
    }
}

/// One ublk queue's state between events.
struct QueueServer {
    qid: u16,
    /// The server copies commands' data itself (`UBLK_F_USER_COPY`).
    user_copy: bool,
    /// Each tag's buffer, alive for the queue's life.
    bufs: Vec<libublk::helpers::IoBuf<u8>>,
    ptrs: Vec<*mut u8>,
    /// `None` if the engine queue could not be opened: every command then fails.
    engine_queue: Option<EngineQueue>,
    /// Bytes each tag's command moves (its result on success).
    lens: Vec<i32>,
    timer: Ticker,
    /// User copies of commands' data, to push.
    copies: Vec<squeue::Entry>,
    /// Failed commands, logged a line per burst.
    failures: FailureLog,
}

impl QueueServer {
    fn new(qid: u16, dev: &UblkDev, engine: &Arc<Engine>) -> std::io::Result<QueueServer> {
        let mut bufs = dev.alloc_queue_io_bufs();
        let ptrs = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
        let engine_queue = match EngineQueue::open(engine) {
            Ok(q) => Some(q),
            Err(e) => {
                tracing::error!(queue = qid, error = %e, "cannot open the engine queue; every I/O will fail");
                None
            }
        };
        Ok(QueueServer {
            qid,
            user_copy: dev.dev_info.flags & sys::UBLK_F_USER_COPY as u64 != 0,
            bufs,
            ptrs,
            engine_queue,
            lens: vec![0; dev.dev_info.queue_depth as usize],
            timer: Ticker::new(TICK)?,
            copies: Vec::new(),
            failures: FailureLog::default(),
        })
    }

    /// One completion on the queue's ring: a step, then the hand-back.
    fn on_event(&mut self, q: &UblkQueue, tag: u16, ctx: &UblkIOCtx) {
        if self.engine_queue.is_none() {
            if !ctx.is_tgt_io() {
                self.complete(q, tag, -libc::EIO);
            }
            return;
        }
        if ctx.is_tgt_io() {
            self.on_target_io(q, ctx);
        } else {
            self.on_command(q, tag);
        }
        self.hand_back(q);
    }

    fn engine_queue(&mut self) -> &mut EngineQueue {
        self.engine_queue
            .as_mut()
            .expect("events reach the steps only with an engine queue")
    }

    /// A block command arrived on `tag`.
    fn on_command(&mut self, q: &UblkQueue, tag: u16) {
        let iod = q.get_iod(tag);
        let offset = iod.start_sector << 9;
        let bytes = (iod.nr_sectors as u64) << 9;
        let t = tag as usize;
        let kind = match iod.op_flags & OP_MASK {
            sys::UBLK_IO_OP_READ => IoKind::Read,
            sys::UBLK_IO_OP_WRITE => IoKind::Write,
            sys::UBLK_IO_OP_FLUSH => IoKind::Flush,
            sys::UBLK_IO_OP_DISCARD => IoKind::Discard,
            sys::UBLK_IO_OP_WRITE_ZEROES => IoKind::WriteZeroes,
            _ => return self.complete(q, tag, -libc::EOPNOTSUPP),
        };
        match kind {
            IoKind::Write if self.user_copy => {
                self.lens[t] = bytes as i32;
                let entry = user_copy_entry(self.qid, tag, self.ptrs[t], bytes as u32, TargetOp::COPY_IN);
                self.copies.push(entry);
            }
            IoKind::Read | IoKind::Write => {
                self.lens[t] = bytes as i32;
                self.submit_data(q, tag, kind);
            }
            _ => {
                self.lens[t] = 0;
                self.engine_queue()
                    .submit(kind, offset, bytes, None, tag as u64, false);
            }
        }
    }

    /// Hands command `tag`'s read or write to the engine, lending it the tag's buffer.
    fn submit_data(&mut self, q: &UblkQueue, tag: u16, kind: IoKind) {
        let iod = q.get_iod(tag);
        let fua = iod.op_flags & FUA != 0;
        let bytes = (iod.nr_sectors as usize) << 9;
        debug_assert!(
            bytes <= self.bufs[tag as usize].len(),
            "the driver sent more than a tag's buffer"
        );
        // SAFETY: the tag's buffer is ours, alive for the queue's life and
        // max_io_buf_bytes long (the driver never sends more); neither the kernel nor
        // a user copy touches it while the engine has the I/O, and the command is
        // completed only after the engine has handed the buffer back.
        let buf = unsafe { IoBuf::borrowed(self.ptrs[tag as usize], bytes) };
        self.engine_queue()
            .submit(kind, iod.start_sector << 9, 0, Some(buf), tag as u64, fua);
    }

    /// An entry of ours completed.
    fn on_target_io(&mut self, q: &UblkQueue, ctx: &UblkIOCtx) {
        let ud = ctx.user_data();
        // A command's tag for a user copy; an engine entry's folded token otherwise.
        let tag = UblkIOCtx::user_data_to_tag(ud) as u16;
        match UblkIOCtx::user_data_to_op(ud) {
            TargetOp::TIMER => self.timer.armed = false,
            op @ (TargetOp::COPY_IN | TargetOp::COPY_OUT) => {
                let expected = self.lens[tag as usize];
                match (op, ctx.result() == expected) {
                    (TargetOp::COPY_IN, true) => self.submit_data(q, tag, IoKind::Write),
                    (_, true) => self.complete(q, tag, expected),
                    (_, false) => {
                        tracing::warn!(
                            tag,
                            result = ctx.result(),
                            expected,
                            "user copy of a command's data failed",
                        );
                        self.complete(q, tag, -libc::EIO)
                    }
                }
            }
            _ => self.engine_queue().complete(unfold(tag), ctx.result()),
        }
    }

    /// Completes the commands whose engine I/O finished, and pushes the entries the
    /// steps produced.
    fn hand_back(&mut self, q: &UblkQueue) {
        self.engine_queue().tick();
        while let Some(c) = self.engine_queue().pop_completion() {
            let tag = c.tag as u16;
            let res = match &c.result {
                Ok(()) => self.lens[tag as usize],
                Err(VolumeError::BadRequest(why)) => {
                    self.failures.failed("a block request", why);
                    -libc::EINVAL
                }
                Err(e) => {
                    self.failures.failed("block I/O", e);
                    -libc::EIO
                }
            };
            // The engine is done with the tag's buffer.
            drop(c);
            let read = q.get_iod(tag).op_flags & OP_MASK == sys::UBLK_IO_OP_READ;
            if self.user_copy && res > 0 && read {
                let ptr = self.ptrs[tag as usize];
                self.copies.push(user_copy_entry(
                    self.qid,
                    tag,
                    ptr,
                    res as u32,
                    TargetOp::COPY_OUT,
                ));
            } else {
                self.complete(q, tag, res);
            }
        }
        self.push_entries();
    }

    /// Completes command `tag` with `res` (bytes moved, or a negated errno).
    fn complete(&self, q: &UblkQueue, tag: u16, res: i32) {
        let buf = if self.user_copy {
            &[][..]
        } else {
            self.bufs[tag as usize].as_slice()
        };
        if let Err(e) = q.complete_io_cmd_unified(tag, BufDesc::Slice(buf), Ok(UblkIORes::Result(res))) {
            tracing::debug!(tag, error = %e, "completing a ublk command failed (queue going down?)");
        }
    }

    /// Pushes the engine queue's entries, the user copies, and a read of the timer if
    /// none is posted, on this thread's queue ring.
    fn push_entries(&mut self) {
        let timer = &mut self.timer;
        let tick = (!timer.armed).then(|| {
            timer.armed = true;
            opcode::Read::new(
                types::Fd(timer.fd.as_raw_fd()),
                (&mut *timer.buf as *mut u64).cast(),
                8,
            )
            .build()
            .user_data(UblkIOCtx::build_user_data(0, TargetOp::TIMER, 0, true))
        });
        let engine = self.engine_queue.as_mut().into_iter().flat_map(|eq| {
            eq.entries().map(|e| {
                let token = Token(e.get_user_data() as u32);
                e.user_data(UblkIOCtx::build_user_data(fold(token), TargetOp::ENGINE, 0, true))
            })
        });
        let copies = self.copies.drain(..);
        libublk::io::with_task_io_ring_mut(|ring| {
            for e in engine.chain(tick).chain(copies) {
                // SAFETY: the engine queue keeps each entry's memory valid until its
                // completion is handed back, the timer's fd and buffer live as long as
                // the queue's loop, a user copy's buffer is the tag's own (alive for
                // the queue's life, its command not completed until the copy is), and
                // the queue outlives the ring's use of all of them.
                if let Err(err) = unsafe { horn_uring::push_or_submit(ring, &e) } {
                    tracing::error!(error = %err, "io_uring submit failed");
                }
            }
        });
    }
}

/// A read (`COPY_IN`: a write command's data into our buffer) or write (`COPY_OUT`: a
/// read command's data out of it) of `/dev/ublkcN` at command `tag`'s position: the
/// user copy. The char device is the ring's fixed file 0.
fn user_copy_entry(qid: u16, tag: u16, buf: *mut u8, len: u32, op: u32) -> squeue::Entry {
    let pos = UblkIOCtx::ublk_user_copy_pos(qid, tag, 0);
    let entry = if op == TargetOp::COPY_IN {
        opcode::Read::new(types::Fixed(0), buf, len).offset(pos).build()
    } else {
        opcode::Write::new(types::Fixed(0), buf, len).offset(pos).build()
    };
    entry.user_data(UblkIOCtx::build_user_data(tag, op, 0, true))
}

/// Folds an engine token into the 16 bits of libublk's tag field (its target-data
/// field keeps only 8 bits).
fn fold(token: Token) -> u16 {
    token.fold16()
}

fn unfold(tag: u16) -> Token {
    Token::unfold16(tag)
}

/// A periodic timerfd whose reads wake the queue's loop (a plain io_uring timeout
/// completes with -ETIME, which libublk logs as a failed I/O).
struct Ticker {
    fd: std::os::fd::OwnedFd,
    buf: Box<u64>,
    armed: bool,
}

impl Ticker {
    fn new(every: std::time::Duration) -> std::io::Result<Ticker> {
        use std::os::fd::FromRawFd;
        // SAFETY: timerfd_create takes no pointers; the result is checked.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let period = libc::timespec {
            tv_sec: every.as_secs() as libc::time_t,
            tv_nsec: every.subsec_nanos() as libc::c_long,
        };
        let spec = libc::itimerspec {
            it_interval: period,
            it_value: period,
        };
        // SAFETY: `spec` is a valid itimerspec; the old value is not asked for.
        if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Ticker {
            fd,
            buf: Box::new(0),
            armed: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_survive_the_fold_into_a_ublk_tag() {
        for kind in 1..5u32 {
            for index in [0u32, 1, 2, 1000, 0x1fff] {
                let t = Token((kind << 29) | index);
                let ud = UblkIOCtx::build_user_data(fold(t), TargetOp::ENGINE, 0, true);
                assert_eq!(unfold(UblkIOCtx::user_data_to_tag(ud) as u16), t);
                assert_eq!(UblkIOCtx::user_data_to_op(ud), TargetOp::ENGINE);
            }
        }
    }
}
