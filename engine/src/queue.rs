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

use std::collections::{BTreeMap, VecDeque};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use horn_proto::batch::{Message, SendBatch, TwoPartRecv};
use horn_proto::wire::{Header, Op, Status, FLAG_FUA, HEADER_LEN, MAX_IO_LEN};
use horn_replica::shared::{LocalIo, LocalKind, SharedReplica};
use horn_uring::IoBuf;
use io_uring::{opcode, squeue, types};

use crate::engine::{Engine, QueueShared};
use crate::replica_set::{Action, IoId, IoKind, IoRequest, Mode, ReplicaConfig, ReplicaSet, Reply, ReqId};
use crate::types::{Result, VolumeCompletion, VolumeError};

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

/// Largest write to an in-process replica's page cache made on the queue's thread
/// (see [`EngineQueue::inline_write`]).
const INLINE_WRITE_MAX: usize = 64 << 10;

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

/// A request on its way out.
struct Outgoing {
    header: [u8; HEADER_LEN],
    /// Writes: the payload lives in this I/O's buffer.
    io: Option<IoId>,
    ptr: *const u8,
    len: usize,
}

// SAFETY: `ptr` names the I/O's heap buffer, kept alive and in place (refs counted)
// until the send finishes; nothing else aliases it.
unsafe impl Send for Outgoing {}

impl Message for Outgoing {
    fn header(&self) -> &[u8; HEADER_LEN] {
        &self.header
    }

    fn payload(&self) -> (*const u8, usize) {
        (self.ptr, self.len)
    }
}

enum Receiving {
    /// Reply headers, into the conn's `rx`.
    Header,
    /// Read data, into the I/O's buffer.
    Data {
        req: ReqId,
        header: Header,
        io: IoId,
        filled: usize,
    },
    /// An error message, or the data of a reply nobody waits for any more.
    Discard {
        req: ReqId,
        header: Header,
        bytes: Vec<u8>,
        filled: usize,
    },
}

/// Bytes of reply headers received ahead (many replies to writes in one receive).
const RX_LEN: usize = 64 * HEADER_LEN;

struct Conn {
    /// None for a replica that had failed before this queue opened, or one hosted in
    /// this process.
    stream: Option<TcpStream>,
    /// The replica, when it is hosted in this process.
    local: Option<Arc<SharedReplica>>,
    /// Received bytes not yet parsed are `rx[rx_start..rx_end]`.
    rx: Box<[u8; RX_LEN]>,
    rx_start: usize,
    rx_end: usize,
    /// The two-part receive in the kernel: the rest of a payload, then the next header.
    rx_msg: Box<TwoPartRecv>,
    /// Reads sent on this connection and not answered yet.
    reads: usize,
    receiving: Receiving,
    out: SendBatch<Outgoing>,
    raw_in_flight: usize,
    closed: bool,
}

impl Conn {
    /// A connection to the replica at `data` (none for a replica already failed), and
    /// why it could not be made.
    fn connect(data: &str, failed: bool) -> (Conn, Option<String>) {
        let (stream, local, why) = match SharedReplica::hosted(data) {
            _ if failed => (None, None, None),
            Ok(Some(r)) => (None, Some(r), None),
            Err(e) => (None, None, Some(e.to_string())),
            Ok(None) => match TcpStream::connect(data) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    (Some(s), None, None)
                }
                Err(e) => (None, None, Some(format!("its data wire is unreachable: {e}"))),
            },
        };
        let closed = stream.is_none() && local.is_none();
        let conn = Conn {
            stream,
            local,
            rx: Box::new([0; RX_LEN]),
            rx_start: 0,
            rx_end: 0,
            rx_msg: TwoPartRecv::new(),
            reads: 0,
            receiving: Receiving::Header,
            out: SendBatch::default(),
            raw_in_flight: 0,
            closed,
        };
        (conn, why)
    }

    /// The socket; only asked of an open conn, which always has one.
    fn fd(&self) -> i32 {
        self.stream.as_ref().map_or(-1, |s| s.as_raw_fd())
    }
}

struct Slot {
    tag: u64,
    buf: Option<IoBuf>,
    fua: bool,
    /// Socket operations pointing into `buf`.
    refs: usize,
    result: Option<Result<()>>,
}

/// An I/O on a replica hosted in this process, while its file operations run.
struct LocalOp {
    req: ReqId,
    io: IoId,
    replica: Arc<SharedReplica>,
    planned: LocalIo,
    /// File operations still in the ring.
    pending: usize,
    /// Bytes they moved, and the first error.
    moved: usize,
    error: Option<std::io::Error>,
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
    ready: VecDeque<VolumeCompletion>,
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
    start: Instant,
}

impl EngineQueue {
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
            let (conn, why) = Conn::connect(&r.data, engine.is_failed(i));
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
            ready: VecDeque::new(),
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
            start,
        };
        for (i, why) in unreachable {
            q.set.fail_replica(0, i, why);
        }
        q.run_actions();
        if q.set.modes().iter().all(|m| *m != Mode::Rw) {
            return Err(VolumeError::NoReplica(
                "no replica of the volume is reachable and healthy for a new queue".into(),
            ));
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
                let (conn, why) = Conn::connect(&r.data, self.engine.is_failed(i));
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
        self.slots.len() + self.held.len() + self.ready.len()
    }

    /// I/Os the replicas still owe (held ones excluded).
    pub fn pending(&self) -> usize {
        self.slots.len() + self.held.len()
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
        self.ready.push_front(c);
    }

    /// A finished I/O, if any.
    pub fn pop_completion(&mut self) -> Option<VolumeCompletion> {
        self.ready.pop_front()
    }

    /// How long the driver may wait before calling [`EngineQueue::tick`].
    pub fn next_deadline(&self) -> Option<Duration> {
        let now = self.now();
        self.set
            .next_deadline()
            .map(|d| Duration::from_nanos(d.saturating_sub(now)))
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
        if let Err(e) = checked {
            self.ready.push_back(VolumeCompletion {
                tag,
                result: Err(e),
                buf,
            });
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
        let (offset, len) = if kind == IoKind::Flush {
            (0, 0)
        } else {
            (offset, len)
        };
        let io = self.set.submit(
            self.now(),
            IoRequest {
                kind,
                offset,
                len: len as u32,
            },
        );
        self.slots.insert(
            io,
            Slot {
                tag,
                buf,
                fua: fua && kind == IoKind::Write,
                refs: 0,
                result: None,
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
            self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.ready.push_back(VolumeCompletion {
                tag: slot.tag,
                result: slot.result.expect("checked"),
                buf: slot.buf,
            });
        }
    }

    fn send(&mut self, replica: usize, req: ReqId, io: IoId, request: IoRequest) {
        let op = match request.kind {
            IoKind::Read => Op::Read,
            IoKind::Write => Op::Write,
            IoKind::Flush => Op::Flush,
            IoKind::Discard => Op::Discard,
            IoKind::WriteZeroes => Op::WriteZeroes,
        };
        if let Some(replica_here) = self.conns[replica].local.clone() {
            if !self.conns[replica].closed {
                self.reqs.insert(req, (io, replica));
                self.send_local(replica_here, req, io, request);
            }
            return;
        }
        let mut header = Header::request(op, req.0, request.offset, request.len, self.engine.generation());
        let (payload_io, ptr, len) = match (request.kind, self.slots.get_mut(&io)) {
            (IoKind::Write, Some(slot)) => {
                slot.refs += 1;
                if slot.fua {
                    header.flags |= FLAG_FUA;
                }
                let b = slot.buf.as_ref().expect("writes carry a buffer");
                (Some(io), b.as_slice().as_ptr(), b.len())
            }
            _ => (None, std::ptr::null(), 0),
        };
        self.reqs.insert(req, (io, replica));
        if op == Op::Read {
            self.conns[replica].reads += 1;
        }
        let out = Box::new(Outgoing {
            header: header.encode(),
            io: payload_io,
            ptr,
            len,
        });
        self.conns[replica].out.push(out);
        self.start_send(replica);
    }

    /// Sends what has queued up on the connection, unless a send is in the kernel.
    fn start_send(&mut self, c: usize) {
        let conn = &mut self.conns[c];
        if conn.closed {
            return;
        }
        let Some((iov, n)) = conn.out.next_send() else {
            return;
        };
        let entry = opcode::Writev::new(types::Fd(conn.fd()), iov, n)
            .build()
            .user_data((KIND_SEND | c as u32) as u64);
        conn.raw_in_flight += 1;
        // The iovecs live in the conn's batch, the headers in its boxed messages, the
        // payloads in I/O buffers whose refs count this send; all stay until this entry
        // completes.
        self.entries.push(entry);
    }

    fn on_send(&mut self, c: usize, res: i32) {
        let conn = &mut self.conns[c];
        conn.raw_in_flight -= 1;
        if res <= 0 || conn.closed {
            let sent: Vec<Box<Outgoing>> = conn.out.take_all().collect();
            for io in sent.into_iter().filter_map(|o| o.io) {
                self.release(io);
            }
            if !self.conns[c].closed {
                let now = self.now();
                self.set.on_disconnect(now, c);
                self.run_actions();
            }
            return;
        }
        let mut finished = Vec::new();
        conn.out.sent(res as usize, |o| finished.extend(o.io));
        for io in finished {
            self.release(io);
        }
        self.start_send(c);
    }

    /// A socket operation no longer points into the I/O's buffer.
    fn release(&mut self, io: IoId) {
        if let Some(slot) = self.slots.get_mut(&io) {
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

    /// Posts the connection's next receive:
    /// - between replies, into `rx`: as much as fits while no read is outstanding
    ///   (replies to writes are bare headers, many to a receive), one header's worth
    ///   otherwise, so that read data never lands in `rx`;
    /// - within a payload, one `recvmsg` of the rest of it (read data straight into
    ///   the I/O's buffer) followed by the next header into `rx`.
    fn post_recv(&mut self, c: usize) {
        let conn = &mut self.conns[c];
        if conn.closed || conn.local.is_some() {
            return;
        }
        let fd = conn.fd();
        let token = (KIND_RECV | c as u32) as u64;
        let (ptr, len) = match &mut conn.receiving {
            Receiving::Header => {
                if conn.rx_start > 0 {
                    conn.rx.copy_within(conn.rx_start..conn.rx_end, 0);
                    conn.rx_end -= conn.rx_start;
                    conn.rx_start = 0;
                }
                let want = if conn.reads == 0 {
                    RX_LEN - conn.rx_end
                } else {
                    HEADER_LEN - conn.rx_end
                };
                let ptr = conn.rx[conn.rx_end..].as_mut_ptr();
                // The parser leaves less than one header in `rx`.
                conn.raw_in_flight += 1;
                let entry = opcode::Recv::new(types::Fd(fd), ptr, want as u32)
                    .build()
                    .user_data(token);
                // `rx` is boxed in the conn and stays until this entry completes.
                self.entries.push(entry);
                return;
            }
            Receiving::Data {
                io, filled, header, ..
            } => {
                let slot = self.slots.get_mut(io).expect("a read waiting for data is live");
                slot.refs += 1;
                let buf = slot.buf.as_mut().expect("reads carry a buffer");
                (
                    buf.as_mut_slice()[*filled..].as_mut_ptr(),
                    header.length as usize - *filled,
                )
            }
            Receiving::Discard { bytes, filled, .. } => {
                (bytes[*filled..].as_mut_ptr(), bytes.len() - *filled)
            }
        };
        // `rx` is empty while a payload is being received (see `parse`).
        conn.rx_start = 0;
        conn.rx_end = 0;
        let msg = conn
            .rx_msg
            .prepare((ptr, len), (conn.rx.as_mut_ptr(), HEADER_LEN));
        let entry = opcode::RecvMsg::new(types::Fd(fd), msg).build().user_data(token);
        conn.raw_in_flight += 1;
        // The msghdr and iovecs are boxed in the conn, `rx` too, the discard vector
        // belongs to the conn, and read data goes into an I/O buffer whose refs count
        // this receive; all stay until this entry completes.
        self.entries.push(entry);
    }

    fn on_recv(&mut self, c: usize, res: i32) {
        self.conns[c].raw_in_flight -= 1;
        if let Receiving::Data { io, .. } = &self.conns[c].receiving {
            let io = *io;
            self.release(io);
        }
        if res <= 0 || self.conns[c].closed {
            if !self.conns[c].closed {
                let now = self.now();
                self.set.on_disconnect(now, c);
                self.run_actions();
            }
            return;
        }
        let n = res as usize;
        let conn = &mut self.conns[c];
        let finished = match &mut conn.receiving {
            Receiving::Header => {
                conn.rx_end += n;
                None
            }
            Receiving::Data {
                req, header, filled, ..
            } => {
                let took = n.min(header.length as usize - *filled);
                *filled += took;
                conn.rx_end = n - took;
                (*filled == header.length as usize).then(|| (*req, *header, Vec::new()))
            }
            Receiving::Discard {
                req,
                header,
                bytes,
                filled,
            } => {
                let took = n.min(bytes.len() - *filled);
                *filled += took;
                conn.rx_end = n - took;
                (*filled == bytes.len()).then(|| (*req, *header, std::mem::take(bytes)))
            }
        };
        if let Some((req, header, message)) = finished {
            self.conns[c].receiving = Receiving::Header;
            self.on_reply(c, req, header, message);
        }
        if self.parse(c) {
            self.post_recv(c);
        }
    }

    /// Handles the whole replies in `rx`, and starts the payload of a partial one.
    /// Returns false if the connection was dropped for a protocol violation.
    fn parse(&mut self, c: usize) -> bool {
        loop {
            let conn = &mut self.conns[c];
            if conn.closed {
                return false;
            }
            if !matches!(conn.receiving, Receiving::Header) || conn.rx_end - conn.rx_start < HEADER_LEN {
                return true;
            }
            let raw: &[u8; HEADER_LEN] = conn.rx[conn.rx_start..conn.rx_start + HEADER_LEN]
                .try_into()
                .expect("one header");
            conn.rx_start += HEADER_LEN;
            let h = match Header::decode(raw) {
                Ok(h) if h.reply => h,
                other => {
                    let why = match other {
                        Err(e) => e.to_string(),
                        Ok(_) => "it sent a request instead of a reply".into(),
                    };
                    let now = self.now();
                    self.set
                        .fail_replica(now, c, format!("protocol violation: {why}"));
                    self.run_actions();
                    return false;
                }
            };
            if let Some((req, header, message)) = self.start_reply(c, h) {
                self.on_reply(c, req, header, message);
            }
        }
    }

    /// A reply header has arrived: returns the reply if it is complete (no payload, or
    /// all of it already in `rx`), or sets the connection to receive the payload (read
    /// data straight into the waiting I/O's buffer; anything else, such as an error
    /// message or a reply nobody waits for, into a scratch vector).
    fn start_reply(&mut self, c: usize, h: Header) -> Option<(ReqId, Header, Vec<u8>)> {
        let req = ReqId(h.id);
        let len = h.payload_len();
        if len == 0 {
            return Some((req, h, Vec::new()));
        }
        let reader = self.reqs.get(&req).map(|&(io, _)| io).filter(|io| {
            h.status == Status::Ok
                && h.op == Op::Read
                && self.slots.get(io).and_then(|s| s.buf.as_ref()).map(IoBuf::len) == Some(len)
        });
        let conn = &mut self.conns[c];
        // Bytes of the payload already in `rx` (read data only when a bulk receive was
        // in the kernel as the read went out: copied, the one case that copies).
        let ahead = (conn.rx_end - conn.rx_start).min(len);
        let early = &conn.rx[conn.rx_start..conn.rx_start + ahead];
        conn.rx_start += ahead;
        match reader {
            Some(io) => {
                let buf = self
                    .slots
                    .get_mut(&io)
                    .and_then(|s| s.buf.as_mut())
                    .expect("checked");
                buf.as_mut_slice()[..ahead].copy_from_slice(early);
                if ahead == len {
                    return Some((req, h, Vec::new()));
                }
                conn.receiving = Receiving::Data {
                    req,
                    header: h,
                    io,
                    filled: ahead,
                };
            }
            None => {
                let mut bytes = vec![0; len];
                bytes[..ahead].copy_from_slice(early);
                if ahead == len {
                    return Some((req, h, bytes));
                }
                conn.receiving = Receiving::Discard {
                    req,
                    header: h,
                    bytes,
                    filled: ahead,
                };
            }
        }
        None
    }

    fn on_reply(&mut self, c: usize, req: ReqId, h: Header, message: Vec<u8>) {
        if h.op == Op::Read {
            let reads = &mut self.conns[c].reads;
            *reads = reads.saturating_sub(1);
        }
        // A reply whose read data did not land in the I/O's buffer cannot answer it.
        let discarded_read = h.op == Op::Read && h.status == Status::Ok && !message.is_empty();
        if self.reqs.remove(&req).is_none() {
            return; // for a request already settled without this replica
        }
        let text = String::from_utf8_lossy(&message).into_owned();
        let reply = match h.status {
            Status::Ok if discarded_read => Reply::Failed("read reply of the wrong length".into()),
            status => reply_for(status, text),
        };
        let now = self.now();
        self.set.on_reply(now, req, reply);
        self.run_actions();
    }

    fn close_conn(&mut self, c: usize) {
        let conn = &mut self.conns[c];
        if conn.closed {
            return;
        }
        conn.closed = true;
        // Wakes the receive (and any send) still in the ring; they finish with errors.
        if let Some(s) = &conn.stream {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        // Messages no send has touched go at once; those of a send in the kernel go
        // when it completes.
        let queued: Vec<Box<Outgoing>> = if conn.out.is_busy() {
            conn.out.take_queued().collect()
        } else {
            conn.out.take_all().collect()
        };
        for io in queued.into_iter().filter_map(|o| o.io) {
            self.release(io);
        }
    }

    /// Closes every connection and leaves the engine; the driver must then wait until
    /// [`EngineQueue::raw_in_flight`] is zero before dropping the queue.
    pub fn shutdown(&mut self) -> usize {
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
            KIND_SEND | KIND_RECV => self.conns[c].raw_in_flight -= 1,
            KIND_WAKE => self.wake_posted = false,
            KIND_LOCAL => {
                let _ = self.local_entry_done(c, res);
            }
            _ => {}
        }
    }

    /// Runs a request on a replica hosted in this process: plans it under the
    /// replica's lock, then puts its file operations on the ring. Requests the replica
    /// answers at once (refusals, reads of holes, discards) are answered through
    /// `local_replies`.
    fn send_local(&mut self, replica: Arc<SharedReplica>, req: ReqId, io: IoId, request: IoRequest) {
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
    fn on_local(&mut self, index: usize, res: i32) {
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
    fn local_entry_done(&mut self, index: usize, res: i32) -> Option<(ReqId, Reply)> {
        self.local_in_flight -= 1;
        let op = self.local_ops.get_mut(index)?.as_mut()?;
        match res {
            r if r < 0 => {
                op.error.get_or_insert(std::io::Error::from_raw_os_error(-r));
            }
            r => op.moved += r as usize,
        }
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

impl Drop for EngineQueue {
    /// Lets in-process replicas know of I/Os a driver dropped without waiting for
    /// (their writes count as never made), so their chain operations are not refused
    /// for ever.
    fn drop(&mut self) {
        for op in self.local_ops.drain(..).flatten() {
            let _ = op.replica.finish(op.planned, false);
        }
    }
}

/// What a replica's answer means to the replica set.
fn reply_for(status: Status, text: String) -> Reply {
    match status {
        Status::Ok => Reply::Ok,
        Status::StaleGeneration => Reply::StaleGeneration,
        Status::OutOfRange | Status::Misaligned | Status::BadRequest => Reply::Refused(text),
        Status::IoError | Status::Unavailable => Reply::Failed(text),
    }
}
