//! One ublk queue's loop: block commands in, engine I/O out, on one ring.
//!
//! libublk runs the loop (`UblkQueue::wait_and_handle_io`) and calls us for every
//! completion on the queue's ring: a new block command on a tag, or an entry of ours.
//! Our entries are the engine queue's socket operations and a periodic timer; their
//! user data carries the engine's token folded into libublk's 16-bit tag field (see
//! [`fold`]), with our own op code to tell them apart.
//!
//! Data is not copied: a command's buffer (libublk's per-tag buffer, which the kernel
//! fills for writes and reads back for reads) is lent to the engine as an
//! [`IoBuf::borrowed`] for exactly the time the engine has the I/O.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use horn_engine::replica_set::IoKind;
use horn_engine::volume::VolumeError;
use horn_engine::{Engine, EngineQueue, Token};
use horn_replica::IoBuf;
use io_uring::{opcode, squeue, types};
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{sys, BufDesc, UblkIORes};

/// Op code of our entries carrying an engine token.
const OP_ENGINE: u32 = 0xf0;
/// Op code of the periodic timer.
const OP_TIMER: u32 = 0xf1;
/// Op code of a user copy of a write command's data into our buffer.
const OP_COPY_IN: u32 = 0xf2;
/// Op code of a user copy of a read command's data from our buffer.
const OP_COPY_OUT: u32 = 0xf3;

/// How often the loop wakes to let the engine notice replicas past their timeout.
const TICK: std::time::Duration = std::time::Duration::from_millis(500);

/// Serves queue `qid` of `dev` until the device stops.
pub fn serve_queue(qid: u16, dev: &UblkDev, engine: &Arc<Engine>) {
    let user_copy = dev.dev_info.flags & sys::UBLK_F_USER_COPY as u64 != 0;
    let mut bufs = dev.alloc_queue_io_bufs();
    let ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
    let mut engine_queue = match EngineQueue::open(engine) {
        Ok(q) => Some(q),
        Err(e) => {
            tracing::error!(queue = qid, error = %e, "cannot open the engine queue; every I/O will fail");
            None
        }
    };
    let depth = dev.dev_info.queue_depth as usize;
    // Bytes each tag's command moves (its result on success).
    let mut lens = vec![0i32; depth];
    let mut timer = match Ticker::new(TICK) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(queue = qid, error = %e, "cannot create the queue's timer");
            return;
        }
    };
    // User copy: reads and writes of the command's data on the char device, to push.
    let mut copies: Vec<squeue::Entry> = Vec::new();

    let queue = match UblkQueue::new(qid, dev) {
        Ok(q) => q,
        Err(e) => {
            tracing::error!(queue = qid, error = %e, "cannot set up the ublk queue");
            return;
        }
    };
    // Local replicas' file I/O runs on this ring too (engine/src/queue.rs).
    libublk::io::with_task_io_ring(horn_replica::widen_io_workers);
    let fetch = BufDescList::Slices((!user_copy).then_some(&bufs));
    let queue = match queue.submit_fetch_commands_unified(fetch) {
        Ok(q) => q,
        Err(e) => {
            tracing::error!(queue = qid, error = %e, "cannot fetch ublk commands");
            return;
        }
    };
    let complete = |q: &UblkQueue, tag: u16, res: i32| {
        let buf = if user_copy {
            &[][..]
        } else {
            bufs[tag as usize].as_slice()
        };
        if let Err(e) = q.complete_io_cmd_unified(tag, BufDesc::Slice(buf), Ok(UblkIORes::Result(res))) {
            tracing::debug!(tag, error = %e, "completing a ublk command failed (queue going down?)");
        }
    };
    // Hands command `tag`'s read or write to the engine, lending it the tag's buffer.
    let submit_data = |eq: &mut EngineQueue, q: &UblkQueue, tag: u16, kind: IoKind| {
        let iod = q.get_iod(tag);
        let fua = iod.op_flags & sys::UBLK_IO_F_FUA != 0;
        let bytes = (iod.nr_sectors as usize) << 9;
        // SAFETY: the tag's buffer is ours, alive for the queue's life and
        // max_io_buf_bytes long (the driver never sends more); neither the kernel nor
        // a user copy touches it while the engine has the I/O, and the command is
        // completed only after the engine has handed the buffer back.
        let buf = unsafe { IoBuf::borrowed(ptrs[tag as usize], bytes) };
        eq.submit(kind, iod.start_sector << 9, 0, Some(buf), tag as u64, fua);
    };
    let handler = |q: &UblkQueue, tag: u16, ctx: &UblkIOCtx| {
        let Some(eq) = engine_queue.as_mut() else {
            if !ctx.is_tgt_io() {
                complete(q, tag, -libc::EIO);
            }
            return;
        };
        if ctx.is_tgt_io() {
            let ud = ctx.user_data();
            let tag = UblkIOCtx::user_data_to_tag(ud) as u16;
            match UblkIOCtx::user_data_to_op(ud) {
                OP_TIMER => timer.armed = false,
                OP_COPY_IN if ctx.result() == lens[tag as usize] => submit_data(eq, q, tag, IoKind::Write),
                OP_COPY_OUT if ctx.result() == lens[tag as usize] => complete(q, tag, lens[tag as usize]),
                OP_COPY_IN | OP_COPY_OUT => {
                    tracing::warn!(
                        tag,
                        result = ctx.result(),
                        expected = lens[tag as usize],
                        "user copy of a command's data failed",
                    );
                    complete(q, tag, -libc::EIO)
                }
                _ => eq.complete(unfold(tag), ctx.result()),
            }
        } else {
            let iod = q.get_iod(tag);
            let op = iod.op_flags & 0xff;
            let offset = iod.start_sector << 9;
            let bytes = (iod.nr_sectors as u64) << 9;
            let t = tag as usize;
            let kind = match op {
                sys::UBLK_IO_OP_READ => Some(IoKind::Read),
                sys::UBLK_IO_OP_WRITE => Some(IoKind::Write),
                sys::UBLK_IO_OP_FLUSH => Some(IoKind::Flush),
                sys::UBLK_IO_OP_DISCARD => Some(IoKind::Discard),
                sys::UBLK_IO_OP_WRITE_ZEROES => Some(IoKind::WriteZeroes),
                _ => None,
            };
            match kind {
                None => complete(q, tag, -libc::EOPNOTSUPP),
                Some(IoKind::Write) if user_copy => {
                    lens[t] = bytes as i32;
                    copies.push(user_copy_entry(qid, tag, ptrs[t], bytes as u32, OP_COPY_IN));
                }
                Some(kind @ (IoKind::Read | IoKind::Write)) => {
                    lens[t] = bytes as i32;
                    submit_data(eq, q, tag, kind);
                }
                Some(kind) => {
                    lens[t] = 0;
                    eq.submit(kind, offset, bytes, None, tag as u64, false);
                }
            }
        }
        eq.tick();
        while let Some(c) = eq.pop_completion() {
            let tag = c.tag as u16;
            let res = match &c.result {
                Ok(()) => lens[tag as usize],
                Err(VolumeError::BadRequest(why)) => {
                    tracing::warn!(%why, "block request refused");
                    -libc::EINVAL
                }
                Err(e) => {
                    tracing::warn!(error = %e, "block I/O failed");
                    -libc::EIO
                }
            };
            drop(c);
            if user_copy && res > 0 && q.get_iod(tag).op_flags & 0xff == sys::UBLK_IO_OP_READ {
                let ptr = ptrs[tag as usize];
                copies.push(user_copy_entry(qid, tag, ptr, res as u32, OP_COPY_OUT));
            } else {
                complete(q, tag, res);
            }
        }
        push_entries(eq, &mut timer, &mut copies);
    };
    queue.wait_and_handle_io(handler);
    if let Some(eq) = engine_queue.as_mut() {
        eq.shutdown();
    }
}

/// A read (`OP_COPY_IN`: a write command's data into our buffer) or write
/// (`OP_COPY_OUT`: a read command's data out of it) of `/dev/ublkcN` at command
/// `tag`'s position: the user copy. The char device is the ring's fixed file 0.
fn user_copy_entry(qid: u16, tag: u16, buf: *mut u8, len: u32, op: u32) -> squeue::Entry {
    let pos = UblkIOCtx::ublk_user_copy_pos(qid, tag, 0);
    let entry = if op == OP_COPY_IN {
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

/// Pushes the engine queue's entries, and a read of the timer if none is posted, on
/// this thread's queue ring.
fn push_entries(eq: &mut EngineQueue, timer: &mut Ticker, copies: &mut Vec<squeue::Entry>) {
    let tick = (!timer.armed).then(|| {
        timer.armed = true;
        opcode::Read::new(
            types::Fd(timer.fd.as_raw_fd()),
            (&mut *timer.buf as *mut u64).cast(),
            8,
        )
        .build()
        .user_data(UblkIOCtx::build_user_data(0, OP_TIMER, 0, true))
    });
    let entries: Vec<squeue::Entry> = eq
        .entries()
        .map(|e| {
            let token = Token(e.get_user_data() as u32);
            e.user_data(UblkIOCtx::build_user_data(fold(token), OP_ENGINE, 0, true))
        })
        .chain(tick)
        .chain(copies.drain(..))
        .collect();
    if entries.is_empty() {
        return;
    }
    libublk::io::with_task_io_ring_mut(|ring| {
        for e in &entries {
            loop {
                // SAFETY: the engine queue keeps each entry's memory valid until its
                // completion is handed back, the timer's fd and buffer live as long as
                // the queue's loop, a user copy's buffer is the tag's own (alive for
                // the queue's life, its command not completed until the copy is), and
                // the queue outlives the ring's use of all of them.
                if unsafe { ring.submission().push(e) }.is_ok() {
                    break;
                }
                if let Err(err) = ring.submit() {
                    tracing::error!(error = %err, "io_uring submit failed");
                    break;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_survive_the_fold_into_a_ublk_tag() {
        for kind in 1..5u32 {
            for index in [0u32, 1, 2, 1000, 0x1fff] {
                let t = Token((kind << 29) | index);
                let ud = UblkIOCtx::build_user_data(fold(t), OP_ENGINE, 0, true);
                assert_eq!(unfold(UblkIOCtx::user_data_to_tag(ud) as u16), t);
                assert_eq!(UblkIOCtx::user_data_to_op(ud), OP_ENGINE);
            }
        }
    }
}
