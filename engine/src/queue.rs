//! `EngineQueue`: one queue's share of the engine, without a ring of its own.
//!
//! A queue holds its own connection to every replica and its own [`ReplicaSet`], which
//! decides what to send where and when an I/O is done. The queue turns those decisions
//! into io_uring entries (socket sends and receives) that its driver pushes on whatever
//! ring the queue's thread runs: the engine's own ([`crate::volume::Volume`]), or a
//! frontend's (a ublk queue's ring carries its replica sockets, so no thread hop sits
//! between the block command and the replica). The driver hands back each completion
//! by the entry's [`Token`].
//!
//! A replica hosted in the engine's own process ([`SharedReplica`], data address
//! `inproc:DIR`) gets no socket: the queue plans each I/O with it and puts the file
//! reads, writes and fdatasyncs on its own ring, straight from and into the caller's
//! buffer, so the local replica costs a file operation and no hop.
//!
//! Payload bytes are not copied: a write is sent to every replica straight from the
//! caller's buffer (one `writev` of header and data per replica), and a read reply's
//! data is received straight into the caller's buffer. A buffer goes back to the
//! caller only when the replica set has completed the I/O *and* no socket operation
//! still points into it (a send to a replica dropped meanwhile finishes, or fails,
//! first).
//!
//! The code is split by what a queue talks to: this file holds the queue's own
//! bookkeeping (its I/Os, the replica set's actions, pauses, membership); `wire.rs`
//! the connections to replica processes (sends, receives, reply parsing); `local.rs`
//! the file operations on a replica hosted in this process. Both extend
//! [`EngineQueue`] with the steps of their kind of link.

mod local;
mod wire;

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use horn_proto::wire::{Status, MAX_IO_LEN};
use horn_uring::IoBuf;
use io_uring::{opcode, squeue, types};

use crate::engine::{Engine, QueueShared};
use crate::replica_set::{Action, IoId, IoKind, IoRequest, Mode, ReplicaConfig, ReplicaSet, Reply, ReqId};
use crate::stripes::Released;
use crate::types::{IoError, Result, VolumeCompletion, VolumeError};

use local::LocalOp;
use wire::Conn;

/// Names one of the queue's ring entries; the driver gives it back with the entry's
/// result. It fits in 32 bits so a frontend can fold it into its own user data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token(pub u32);

const KIND_SHIFT: u32 = 29;
const KIND_SEND: u32 = 1 << KIND_SHIFT;
const KIND_RECV: u32 = 2 << KIND_SHIFT;
const KIND_WAKE: u32 = 3 << KIND_SHIFT;
/// A file operation on an in-process replica; the index names the local op.
const KIND_LOCAL: u32 = 4 << KIND_SHIFT;
const INDEX_MASK: u32 = (1 << KIND_SHIFT) - 1;

/// Bits of a token's index that survive [`Token::fold16`].
const FOLD_INDEX_BITS: u32 = 13;

impl Token {
    /// The token in 16 bits (kind in the top 3, index in the low 13), for a driver
    /// whose user data has little room. Indexes stay far below 2^13: one per replica
    /// connection, one per local file operation in flight.
    pub fn fold16(self) -> u16 {
        let index = self.0 & INDEX_MASK;
        debug_assert!(index < 1 << FOLD_INDEX_BITS, "token index {index} does not fold");
        (((self.0 >> KIND_SHIFT) << FOLD_INDEX_BITS) | (index & ((1 << FOLD_INDEX_BITS) - 1))) as u16
    }

    /// The token [`Token::fold16`] folded.
    pub fn unfold16(folded: u16) -> Token {
        let v = folded as u32;
        Token(((v >> FOLD_INDEX_BITS) << KIND_SHIFT) | (v & ((1 << FOLD_INDEX_BITS) - 1)))
    }
}

struct Slot {
    tag: u64,
    /// Where it starts: a change's key in `changes`, and where a read of an
    /// encrypted volume is decrypted.
    offset: u64,
    /// A change (in `changes`, holding its stripes until it completes).
    change: bool,
    buf: Option<IoBuf>,
    fua: bool,
    /// A read: handed back only while the engine's read lease runs.
    read: bool,
    /// Socket operations pointing into `buf`.
    refs: usize,
    result: Option<Result<()>>,
}

/// An I/O held back while a chain operation has the volume paused.
struct Held {
    kind: IoKind,
    offset: u64,
    len: u64,
    buf: Option<IoBuf>,
    tag: u64,
    fua: bool,
}

/// One queue of a volume: its replica connections, its replica set and its I/Os.
pub struct EngineQueue {
    engine: Arc<Engine>,
    shared: Arc<QueueShared>,
    set: ReplicaSet,
    conns: Vec<Conn>,
    slots: BTreeMap<IoId, Slot>,
    reqs: BTreeMap<ReqId, (IoId, usize)>,
    held: VecDeque<Held>,
    /// Changes (writes, discards, write-zeroes) in flight, by (offset, I/O): their
    /// ends. A change that overlaps one waits in `ordered`, so that every replica
    /// applies overlapping changes in the order they were submitted. Each holds its
    /// stripes in the engine's [`crate::stripes::Stripes`], so that another queue's
    /// overlapping change waits too.
    changes: BTreeMap<(u64, u64), u64>,
    /// Changes waiting for an overlapping one (of this queue or another) to complete,
    /// in submission order (each is counted in flight already).
    ordered: VecDeque<Held>,
    /// This queue's name in the engine's stripes.
    stripe_owner: u32,
    /// Finished I/Os, each with whether it is a read that needs the read lease.
    ready: VecDeque<(VolumeCompletion, bool)>,
    /// A read is held back for want of the read lease ([`crate::lease`]).
    awaiting_lease: bool,
    entries: Vec<squeue::Entry>,
    wake_buf: Box<u64>,
    wake_posted: bool,
    /// In-process replicas' I/Os, by the index their tokens carry.
    local_ops: Vec<Option<LocalOp>>,
    local_free: Vec<u32>,
    /// Their file operations in the ring.
    local_in_flight: usize,
    /// Their replies, handed to the replica set once the current actions are done.
    local_replies: VecDeque<(ReqId, Reply)>,
    failures_seen: u64,
    /// The engine's membership epoch this queue has caught up with.
    membership_seen: u64,
    /// Running a chain operation: this queue's own I/O passes the pause it raised.
    coordinating: bool,
    /// Moves the replicas' bytes as they are, never encrypting or decrypting: what a
    /// restore writes (a backup holds what the replicas held).
    raw: bool,
    start: Instant,
}

impl EngineQueue {
    /// Makes this queue move the replicas' bytes as they are: an encrypted volume's
    /// ciphertext is written and read unchanged (a restore writes what a backup
    /// read from a replica).
    pub fn set_raw(&mut self) {
        self.raw = true;
    }

    /// Connects a new queue to every replica of `engine` that has not failed.
    pub fn open(engine: &Arc<Engine>) -> Result<EngineQueue> {
        let shared = QueueShared::new()?;
        // Read before the replicas: a replica added meanwhile is caught up on later.
        let membership_seen = engine.membership_epoch();
        let replicas = engine.replicas();
        let mut set = ReplicaSet::new(
            replicas
                .iter()
                .map(|r| ReplicaConfig {
                    mode: r.mode(),
                    ..r.config.clone()
                })
                .collect(),
            engine.timeout().as_nanos() as u64,
        );
        let mut conns = Vec::new();
        let mut unreachable = Vec::new();
        for (i, r) in replicas.iter().enumerate() {
            let (conn, why) = Conn::connect(&r.data, engine.is_failed(i), engine);
            if let Some(why) = why {
                unreachable.push((i, why));
            }
            conns.push(conn);
        }
        let start = Instant::now();
        for i in 0..conns.len() {
            if engine.is_failed(i) {
                set.fail_replica(0, i, "dropped before this queue opened".into());
            }
        }
        let mut q = EngineQueue {
            engine: engine.clone(),
            shared,
            set,
            conns,
            slots: BTreeMap::new(),
            reqs: BTreeMap::new(),
            held: VecDeque::new(),
            changes: BTreeMap::new(),
            ordered: VecDeque::new(),
            stripe_owner: engine.stripes().new_owner(),
            ready: VecDeque::new(),
            awaiting_lease: false,
            entries: Vec::new(),
            wake_buf: Box::new(0),
            wake_posted: false,
            local_ops: Vec::new(),
            local_free: Vec::new(),
            local_in_flight: 0,
            local_replies: VecDeque::new(),
            failures_seen: engine.failure_epoch(),
            membership_seen,
            coordinating: false,
            raw: false,
            start,
        };
        let reasons: Vec<String> = unreachable
            .iter()
            .map(|(i, why)| format!("{}: {why}", replicas[*i].data))
            .collect();
        for (i, why) in unreachable {
            q.set.fail_replica(0, i, why);
        }
        q.run_actions();
        if q.set.modes().iter().all(|m| *m != Mode::Rw) {
            let mut why = "no replica of the volume is reachable and healthy for a new queue".to_string();
            if !reasons.is_empty() {
                why = format!("{why} ({})", reasons.join("; "));
            }
            return Err(VolumeError::NoReplica(why));
        }
        for i in 0..q.conns.len() {
            q.post_recv(i);
        }
        q.post_wake();
        engine.register(q.shared.clone());
        Ok(q)
    }

    /// Connects to replicas added to the volume since this queue last looked (a
    /// rebuild), and lets rebuilt replicas serve reads.
    fn sync_membership(&mut self) {
        let epoch = self.engine.membership_epoch();
        if epoch == self.membership_seen {
            return;
        }
        self.membership_seen = epoch;
        let replicas = self.engine.replicas();
        for (i, r) in replicas.iter().enumerate() {
            if i >= self.conns.len() {
                let (conn, why) = Conn::connect(&r.data, self.engine.is_failed(i), &self.engine);
                self.conns.push(conn);
                let id = self.set.add_replica(ReplicaConfig {
                    mode: Mode::Wo,
                    ..r.config.clone()
                });
                debug_assert_eq!(id, i);
                let failed = self
                    .engine
                    .is_failed(i)
                    .then(|| "dropped before this queue connected".to_string());
                match why.or(failed) {
                    Some(why) => {
                        let now = self.now();
                        self.set.fail_replica(now, i, why);
                    }
                    None => self.post_recv(i),
                }
            }
            if r.mode() == Mode::Rw {
                self.set.promote(i);
            }
        }
        self.run_actions();
    }

    /// The engine this queue belongs to.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub(crate) fn shared(&self) -> &Arc<QueueShared> {
        &self.shared
    }

    /// Ring entries to push (in order) on the queue's ring. Their memory stays valid
    /// until their completions are handed back with [`EngineQueue::complete`].
    pub fn entries(&mut self) -> std::vec::Drain<'_, squeue::Entry> {
        self.entries.drain(..)
    }

    /// Each replica's name and mode as this queue sees it.
    pub fn modes(&self) -> Vec<Mode> {
        self.set.modes()
    }

    /// I/Os submitted and not yet taken with [`EngineQueue::pop_completion`].
    pub fn in_flight(&self) -> usize {
        self.slots.len() + self.held.len() + self.ordered.len() + self.ready.len()
    }

    /// I/Os the replicas still owe (held ones excluded).
    pub fn pending(&self) -> usize {
        self.slots.len() + self.held.len() + self.ordered.len()
    }

    /// Socket and file operations still in the kernel.
    pub fn raw_in_flight(&self) -> usize {
        self.conns.iter().map(|c| c.raw_in_flight).sum::<usize>()
            + usize::from(self.wake_posted)
            + self.local_in_flight
    }

    /// Wakes this queue's driver from any thread: the queue's eventfd, whose read the
    /// queue keeps posted, completes.
    pub fn waker(&self) -> impl Fn() + Send + Sync + 'static {
        let shared = self.shared.clone();
        move || shared.wake()
    }

    pub(crate) fn set_coordinating(&mut self, on: bool) {
        self.coordinating = on;
    }

    /// Puts a completion back at the front, for the next [`EngineQueue::pop_completion`].
    pub(crate) fn push_front_completion(&mut self, c: VolumeCompletion) {
        self.ready.push_front((c, false));
    }

    /// A finished I/O, if any. While a replica's drop is not yet recorded in the
    /// volume's membership ([`crate::keeper`]) none is handed back, since it may be a
    /// write the dropped replica missed; once the volume is faulted, each is handed
    /// back failed. A read is handed back only while the read lease runs: without it a
    /// newer engine may have written since the replica served it ([`crate::lease`]).
    pub fn pop_completion(&mut self) -> Option<VolumeCompletion> {
        if !self.engine.drops_settled() {
            return None;
        }
        let (mut c, read) = self.ready.pop_front()?;
        if self.engine.is_faulted() && c.result.is_ok() {
            c.result = Err(self.faulted_error());
        } else if read && c.result.is_ok() && !self.engine.reads_leased() {
            // Asked to be woken first, then checked again: either this sees a renewal
            // or the renewal wakes the queue.
            self.engine.wait_for_lease();
            if !self.engine.reads_leased() {
                self.awaiting_lease = true;
                self.ready.push_front((c, read));
                return None;
            }
        }
        self.awaiting_lease = false;
        Some(c)
    }

    fn faulted_error(&self) -> VolumeError {
        VolumeError::Io(IoError::Faulted(self.engine.faulted().unwrap_or_default()))
    }

    /// How long the driver may wait before calling [`EngineQueue::tick`].
    pub fn next_deadline(&self) -> Option<Duration> {
        let now = self.now();
        let deadline = self
            .set
            .next_deadline()
            .map(|d| Duration::from_nanos(d.saturating_sub(now)));
        if self.awaiting_lease {
            // A renewal wakes the queue; this only bounds a missed wake-up.
            let soon = Duration::from_millis(50);
            return Some(deadline.map_or(soon, |d| d.min(soon)));
        }
        deadline
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        let ss = self.engine.sector_size() as u64;
        if offset % ss != 0 || len % ss != 0 {
            return Err(VolumeError::BadRequest(format!(
                "I/O at offset {offset} length {len} is not a multiple of the sector size {ss}"
            )));
        }
        let size = self.engine.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(VolumeError::BadRequest(format!(
                "I/O at offset {offset} length {len} reaches past the end of the volume ({size} bytes)"
            )));
        }
        Ok(())
    }

    /// Submits an I/O. `buf` is the data to write or the buffer to read into (its
    /// length is the I/O's); flushes take none, discard and write-zeroes take `len`.
    /// `fua` asks for a write to be durable before it completes.
    pub fn submit(&mut self, kind: IoKind, offset: u64, len: u64, buf: Option<IoBuf>, tag: u64, fua: bool) {
        let len = buf.as_ref().map_or(len, |b| b.len() as u64);
        let checked = match kind {
            IoKind::Flush => Ok(()),
            IoKind::Read | IoKind::Write if len > MAX_IO_LEN as u64 => Err(VolumeError::BadRequest(format!(
                "I/O of {len} bytes is larger than the {MAX_IO_LEN}-byte maximum"
            ))),
            _ => self.check(offset, len),
        };
        let checked = checked.and_then(|()| match self.engine.is_faulted() {
            true => Err(self.faulted_error()),
            false => Ok(()),
        });
        if let Err(e) = checked {
            self.ready.push_back((
                VolumeCompletion {
                    tag,
                    result: Err(e),
                    buf,
                },
                false,
            ));
            return;
        }
        // Seen by a coordinator pausing the volume, or we see its pause (engine.rs).
        self.shared.in_flight.fetch_add(1, Ordering::SeqCst);
        if (self.engine.is_paused() && !self.coordinating) || !self.held.is_empty() {
            self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.held.push_back(Held {
                kind,
                offset,
                len,
                buf,
                tag,
                fua,
            });
            return;
        }
        self.sync_failures();
        self.sync_membership();
        let held = Held {
            kind,
            offset,
            len,
            buf,
            tag,
            fua,
        };
        if is_change(kind) && !self.may_start_change(offset, len, self.ordered.len()) {
            self.ordered.push_back(held);
            return;
        }
        self.start(held);
    }

    /// May a change of `[offset, offset + len)` start now, ahead of all but the first
    /// `waiting` changes waiting in order? Not while it overlaps one of this queue's
    /// (in flight, or waiting ahead of it); otherwise when this queue takes its stripes
    /// (another queue's overlapping change in flight holds them).
    fn may_start_change(&self, offset: u64, len: u64, waiting: usize) -> bool {
        !self.overlaps_change(offset, len, waiting)
            && self.engine.stripes().try_acquire(self.stripe_owner, offset, len)
    }

    /// Does `[offset, offset + len)` overlap a change in flight, or one of the first
    /// `waiting` changes waiting in order?
    fn overlaps_change(&self, offset: u64, len: u64, waiting: usize) -> bool {
        let end = offset + len;
        let in_flight = self
            .changes
            .range((offset.saturating_sub(MAX_CHANGE_LEN), 0)..(end, 0))
            .any(|(&(start, _), &stop)| start < end && stop > offset);
        in_flight
            || self
                .ordered
                .iter()
                .take(waiting)
                .any(|h| h.offset < end && h.offset + h.len > offset)
    }

    /// Starts the changes waiting in order whose overlaps have completed.
    fn start_ordered(&mut self) {
        let mut i = 0;
        while i < self.ordered.len() {
            let h = &self.ordered[i];
            if !self.may_start_change(h.offset, h.len, i) {
                i += 1;
                continue;
            }
            let h = self.ordered.remove(i).expect("in range");
            self.start(h);
        }
    }

    /// Hands an admitted I/O (counted in flight) to the replica set.
    fn start(&mut self, h: Held) {
        let Held {
            kind,
            offset,
            len,
            buf,
            tag,
            fua,
        } = h;
        let (offset, len) = if kind == IoKind::Flush {
            (0, 0)
        } else {
            (offset, len)
        };
        let mut buf = buf;
        if kind == IoKind::Write {
            // Encrypted once, as it starts, before any replica sees it (a held or
            // ordered write comes here once too); the buffer holds ciphertext from
            // here on, and is handed back so.
            if let (Some(c), Some(b), false) = (self.engine.cipher(), buf.as_mut(), self.raw) {
                c.encrypt(offset, self.engine.sector_size() as usize, b.as_mut_slice());
            }
        }
        let io = self.set.submit(
            self.now(),
            IoRequest {
                kind,
                offset,
                len: len as u32,
            },
        );
        if is_change(kind) {
            self.changes.insert((offset, io.0), offset + len);
        }
        self.slots.insert(
            io,
            Slot {
                tag,
                offset,
                buf,
                fua: fua && kind == IoKind::Write,
                read: kind == IoKind::Read,
                refs: 0,
                result: None,
                change: is_change(kind),
            },
        );
        self.run_actions();
    }

    /// Hands back the completion of an entry this queue issued.
    pub fn complete(&mut self, token: Token, res: i32) {
        let conn = (token.0 & INDEX_MASK) as usize;
        match token.0 & !INDEX_MASK {
            KIND_SEND => self.on_send(conn, res),
            KIND_RECV => self.on_recv(conn, res),
            KIND_WAKE => {
                self.wake_posted = false;
                self.post_wake();
            }
            KIND_LOCAL => self.on_local(conn, res),
            _ => tracing::error!(token = token.0, "completion for a token this queue never issued"),
        }
    }

    /// Lets time pass (replicas late past the timeout are dropped), learns of replicas
    /// other queues dropped, and lets held I/O go once the volume is no longer paused.
    /// The driver calls it after each batch of completions and at the deadline.
    pub fn tick(&mut self) {
        let now = self.now();
        self.set.on_tick(now);
        self.run_actions();
        self.sync_failures();
        self.sync_membership();
        if !self.ordered.is_empty() {
            self.start_ordered();
        }
        if !self.held.is_empty() && !self.engine.is_paused() {
            let held: Vec<Held> = self.held.drain(..).collect();
            for h in held {
                self.submit(h.kind, h.offset, h.len, h.buf, h.tag, h.fua);
            }
        }
    }

    /// Drops, in this queue too, the replicas other queues have dropped.
    fn sync_failures(&mut self) {
        let epoch = self.engine.failure_epoch();
        if epoch == self.failures_seen {
            return;
        }
        self.failures_seen = epoch;
        let modes = self.set.modes();
        let reasons = self.engine.failure_reasons();
        let now = self.now();
        for (i, mode) in modes.into_iter().enumerate() {
            if mode != Mode::Err && self.engine.is_failed(i) {
                let why = reasons[i].clone().unwrap_or_default();
                self.set
                    .fail_replica(now, i, format!("dropped by another queue: {why}"));
            }
        }
        self.run_actions();
    }

    fn run_actions(&mut self) {
        loop {
            self.run_set_actions();
            let Some((req, reply)) = self.local_replies.pop_front() else {
                return;
            };
            let now = self.now();
            self.set.on_reply(now, req, reply);
        }
    }

    fn run_set_actions(&mut self) {
        while let Some(a) = self.set.poll_action() {
            match a {
                Action::Send {
                    replica,
                    req,
                    io,
                    request,
                } => self.send(replica, req, io, request),
                Action::Complete { io, result } => {
                    if let Some(slot) = self.slots.get_mut(&io) {
                        slot.result = Some(result.map(|_| ()).map_err(VolumeError::Io));
                    }
                    self.try_finish(io);
                }
                Action::ReplicaFailed { replica, reason } => {
                    // Published before any I/O completes on the strength of the drop.
                    if self.engine.mark_failed(replica, &reason) {
                        tracing::warn!(%reason, "replica dropped");
                    }
                    self.close_conn(replica);
                }
            }
        }
    }

    fn try_finish(&mut self, io: IoId) {
        let done = self
            .slots
            .get(&io)
            .is_some_and(|s| s.result.is_some() && s.refs == 0);
        if done {
            let slot = self.slots.remove(&io).expect("checked");
            if slot.change {
                let offset = slot.offset;
                let removed = self.changes.remove(&(offset, io.0));
                debug_assert!(removed.is_some(), "change {io:?} left the overlap map twice");
                if let Some(end) = removed {
                    self.release_stripes(offset, end);
                }
            }
            let before = self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            debug_assert!(
                before > 0,
                "I/O {io:?} left the queue's in-flight count, which was already 0"
            );
            let result = slot.result.expect("checked");
            let mut buf = slot.buf;
            if slot.read && result.is_ok() {
                if let (Some(c), Some(b), false) = (self.engine.cipher(), buf.as_mut(), self.raw) {
                    c.decrypt(slot.offset, self.engine.sector_size() as usize, b.as_mut_slice());
                }
            }
            self.ready.push_back((
                VolumeCompletion {
                    tag: slot.tag,
                    result,
                    buf,
                },
                slot.read,
            ));
        }
    }

    fn send(&mut self, replica: usize, req: ReqId, io: IoId, request: IoRequest) {
        if let Some(replica_here) = self.conns[replica].local.clone() {
            if !self.conns[replica].closed {
                self.reqs.insert(req, (io, replica));
                self.send_local(replica_here, req, io, request);
            }
            return;
        }
        self.send_wire(replica, req, io, request);
    }

    /// A socket operation no longer points into the I/O's buffer.
    fn release(&mut self, io: IoId) {
        if let Some(slot) = self.slots.get_mut(&io) {
            debug_assert!(
                slot.refs > 0,
                "I/O {io:?}: a socket or file operation released a buffer it did not hold"
            );
            slot.refs -= 1;
        }
        self.try_finish(io);
    }

    fn post_wake(&mut self) {
        if self.wake_posted {
            return;
        }
        let entry = opcode::Read::new(
            types::Fd(self.shared.wake.as_raw_fd()),
            (&mut *self.wake_buf as *mut u64).cast(),
            8,
        )
        .build()
        .user_data(KIND_WAKE as u64);
        self.wake_posted = true;
        // The eventfd and the boxed counter live as long as the queue.
        self.entries.push(entry);
    }

    /// Gives back a finished change's stripes; wakes the queues when another waits
    /// for one of them.
    fn release_stripes(&mut self, offset: u64, end: u64) {
        if self.engine.stripes().release(offset, end - offset) == Released::Waited {
            self.engine.wake_queues();
        }
    }

    /// Gives back the stripes of changes that will never finish (the queue is going),
    /// or other queues would wait for them forever.
    fn abandon_changes(&mut self) {
        for ((offset, _), end) in std::mem::take(&mut self.changes) {
            self.release_stripes(offset, end);
        }
    }

    /// Closes every connection and leaves the engine; the driver must then wait until
    /// [`EngineQueue::raw_in_flight`] is zero before dropping the queue.
    pub fn shutdown(&mut self) -> usize {
        self.abandon_changes();
        for i in 0..self.conns.len() {
            self.close_conn(i);
        }
        self.shared.in_flight.store(0, Ordering::SeqCst);
        // Wakes the eventfd read so it completes too.
        self.shared.wake();
        self.engine.unregister(&self.shared)
    }

    /// After [`EngineQueue::shutdown`]: an entry finished; only counts it (and lets an
    /// in-process replica know its I/O is over).
    pub fn complete_after_shutdown(&mut self, token: Token, res: i32) {
        let c = (token.0 & INDEX_MASK) as usize;
        match token.0 & !INDEX_MASK {
            KIND_SEND | KIND_RECV => {
                debug_assert!(
                    self.conns[c].raw_in_flight > 0,
                    "replica {c}: more socket completions than entries"
                );
                self.conns[c].raw_in_flight -= 1
            }
            KIND_WAKE => self.wake_posted = false,
            KIND_LOCAL => {
                let _ = self.local_entry_done(c, res);
            }
            _ => {}
        }
    }
}

impl Drop for EngineQueue {
    /// Lets in-process replicas know of I/Os a driver dropped without waiting for
    /// (their writes count as never made), so their chain operations are not refused
    /// for ever, and gives back the stripes of changes that will never finish.
    fn drop(&mut self) {
        for op in self.local_ops.drain(..).flatten() {
            let _ = op.replica.finish(op.planned, false);
        }
        self.abandon_changes();
    }
}

/// The longest change: overlap lookups start this far before a range.
const MAX_CHANGE_LEN: u64 = u32::MAX as u64;

/// Writes, discards and write-zeroes change the volume; reads and flushes do not.
fn is_change(kind: IoKind) -> bool {
    matches!(kind, IoKind::Write | IoKind::Discard | IoKind::WriteZeroes)
}

/// What a replica's answer means to the replica set.
fn reply_for(status: Status, text: String) -> Reply {
    match status {
        Status::Ok => Reply::Ok,
        Status::StaleGeneration => Reply::StaleGeneration,
        Status::OutOfRange | Status::Misaligned | Status::BadRequest => Reply::Refused(text),
        Status::IoError | Status::Unavailable | Status::Unauthenticated => Reply::Failed(text),
    }
}
