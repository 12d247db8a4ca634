//! `Volume`: a volume's engine loop. One io_uring carries the data-wire connections to
//! every replica; the [`ReplicaSet`] decides what to send where and when an I/O is
//! done, and this driver carries that out.
//!
//! Payload bytes are not copied: a write is sent to every replica straight from the
//! caller's buffer (one `writev` of header and data per replica), and a read reply's
//! data is received straight into the caller's buffer. A buffer goes back to the
//! caller only when the replica set has completed the I/O *and* no socket operation
//! still points into it (a send to a replica dropped meanwhile finishes, or fails,
//! first).
//!
//! Starting a volume claims its replicas through their control services: it reads
//! each one's state, picks a generation above all of theirs, and leaves out replicas
//! that are unreachable, of another size, or behind (dirty with an older generation
//! than the newest: they missed the last engine's writes).

use std::collections::{BTreeMap, VecDeque};
use std::io::ErrorKind;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use horn_proto::control::replica_control_client::ReplicaControlClient;
use horn_proto::control::{
    ClaimRequest, DeleteSnapshotRequest, ExpandRequest, InfoReply, InfoRequest, PurgeRequest, ReleaseRequest,
    RevertRequest, SnapshotRequest,
};
use horn_proto::wire::{frame_iovecs, Header, Op, Status, HEADER_LEN, MAX_IO_LEN};
use horn_replica::IoBuf;
use io_uring::{opcode, types, IoUring};

use crate::replica_set::{
    Action, IoError, IoId, IoKind, IoRequest, Mode, ReplicaConfig, ReplicaSet, Reply, ReqId,
};

/// Where a replica is served.
#[derive(Debug, Clone)]
pub struct ReplicaAddr {
    /// Data wire address (`hornd replica --listen`).
    pub data: String,
    /// Control service address (`hornd replica --control`).
    pub control: String,
    /// On this node: preferred for reads.
    pub local: bool,
}

impl std::str::FromStr for ReplicaAddr {
    type Err = String;

    /// `DATA,CONTROL` or `DATA,CONTROL,local`.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(',').collect();
        match parts.as_slice() {
            [data, control] | [data, control, "local"] if !data.is_empty() && !control.is_empty() => {
                Ok(ReplicaAddr {
                    data: data.to_string(),
                    control: control.to_string(),
                    local: parts.len() == 3,
                })
            }
            _ => Err(format!("replica {s:?} is not DATA_ADDR,CONTROL_ADDR[,local]")),
        }
    }
}

/// Why the engine failed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// No replica could be used at start.
    #[error("no usable replica: {0}")]
    NoReplica(String),
    /// The replica set failed the I/O.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The request was refused before it was sent.
    #[error("{0}")]
    BadRequest(String),
    /// A control call failed.
    #[error("control call to {replica} failed: {message}")]
    Control {
        /// The replica's control address.
        replica: String,
        /// The gRPC code it answered with.
        code: tonic::Code,
        /// What it said.
        message: String,
    },
    /// The engine's own ring or sockets failed.
    #[error("{op}: {source}")]
    System {
        /// What was being done.
        op: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

/// Result alias for the engine.
pub type Result<T, E = VolumeError> = std::result::Result<T, E>;

/// What starting the volume found.
#[derive(Debug, Clone)]
pub struct StartReport {
    /// Generation this engine claimed the replicas with.
    pub generation: u64,
    /// Volume size in bytes.
    pub size: u64,
    /// Sector size in bytes.
    pub sector_size: u32,
    /// Replicas in use.
    pub used: Vec<String>,
    /// Replicas left out, and why.
    pub skipped: Vec<(String, String)>,
}

/// A chain operation run on every replica of the volume.
#[derive(Debug, Clone)]
pub enum ChainOp {
    /// Read the chain (from one replica).
    Info,
    /// Take a snapshot.
    Snapshot {
        /// Its name.
        name: String,
        /// Its labels.
        labels: std::collections::HashMap<String, String>,
    },
    /// Mark a snapshot deleted.
    Delete(String),
    /// Fold deleted snapshots away.
    Purge,
    /// Put a new head over a snapshot.
    Revert(String),
    /// Grow the volume to this many bytes.
    Expand(u64),
}

/// A finished I/O.
#[derive(Debug)]
pub struct VolumeCompletion {
    /// The caller's tag.
    pub tag: u64,
    /// Outcome.
    pub result: Result<()>,
    /// The caller's buffer (reads: holding the data).
    pub buf: Option<IoBuf>,
}

const KIND_SHIFT: u32 = 56;
const TAG_SEND: u64 = 1 << KIND_SHIFT;
const TAG_RECV: u64 = 2 << KIND_SHIFT;
const INDEX_MASK: u64 = (1 << KIND_SHIFT) - 1;

/// A request on its way out, with its iovecs (kept in place while in the kernel).
struct Outgoing {
    header: [u8; HEADER_LEN],
    /// Writes: the payload lives in this I/O's buffer.
    io: Option<IoId>,
    ptr: *const u8,
    len: usize,
    sent: usize,
    iov: [libc::iovec; 2],
}

// SAFETY: the pointers name the Outgoing's own boxed header and the I/O's heap buffer,
// which is kept alive (refs counted) until the send finishes; nothing else aliases them.
unsafe impl Send for Outgoing {}

enum Receiving {
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

struct Conn {
    name: String,
    stream: TcpStream,
    header: Box<[u8; HEADER_LEN]>,
    filled: usize,
    receiving: Receiving,
    queue: VecDeque<Box<Outgoing>>,
    sending: Option<Box<Outgoing>>,
    raw_in_flight: usize,
    closed: bool,
}

struct Slot {
    tag: u64,
    buf: Option<IoBuf>,
    /// Socket operations pointing into `buf`.
    refs: usize,
    result: Option<Result<()>>,
}

/// One engine loop serving a volume from its replicas.
pub struct Volume {
    ring: IoUring,
    set: ReplicaSet,
    conns: Vec<Conn>,
    controls: Vec<String>,
    skipped: Vec<(String, String)>,
    slots: BTreeMap<IoId, Slot>,
    reqs: BTreeMap<ReqId, (IoId, usize)>,
    ready: VecDeque<VolumeCompletion>,
    /// Reused by the completion loop: (user data, result) pairs.
    reaped: Vec<(u64, i32)>,
    generation: u64,
    size: u64,
    sector_size: u32,
    start: Instant,
    runtime: tokio::runtime::Runtime,
}

fn sys(op: &'static str) -> impl FnOnce(std::io::Error) -> VolumeError {
    move |source| VolumeError::System { op, source }
}

fn control_err(replica: &str) -> impl FnOnce(tonic::Status) -> VolumeError + '_ {
    move |s| VolumeError::Control {
        replica: replica.to_string(),
        code: s.code(),
        message: s.message().to_string(),
    }
}

impl Volume {
    /// Claims the replicas and connects to them.
    pub fn start(replicas: &[ReplicaAddr], timeout: Duration) -> Result<(Volume, StartReport)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(sys("starting the control runtime"))?;
        let mut skipped = Vec::new();
        let mut infos = Vec::new();
        for r in replicas {
            let url = format!("http://{}", r.control);
            let info = runtime.block_on(async {
                let mut c = ReplicaControlClient::connect(url)
                    .await
                    .map_err(|e| e.to_string())?;
                c.info(InfoRequest {})
                    .await
                    .map(|i| i.into_inner())
                    .map_err(|s| s.message().to_string())
            });
            match info {
                Ok(i) => infos.push((r.clone(), i)),
                Err(e) => skipped.push((r.data.clone(), format!("unreachable: {e}"))),
            }
        }
        let Some(size) = infos.first().map(|(_, i)| i.size) else {
            return Err(VolumeError::NoReplica(format!("{skipped:?}")));
        };
        let newest = infos.iter().map(|(_, i)| i.generation).max().unwrap_or(0);
        let mut chosen = Vec::new();
        for (r, i) in infos {
            if i.size != size {
                skipped.push((r.data.clone(), format!("its size {} differs from {size}", i.size)));
            } else if i.dirty && i.generation < newest {
                skipped.push((
                    r.data.clone(),
                    format!(
                        "behind: left dirty at generation {} while others reached {newest}",
                        i.generation
                    ),
                ));
            } else {
                chosen.push((r, i));
            }
        }
        let generation = newest + 1;
        let sector_size = chosen.first().map_or(512, |(_, i)| i.sector_size);
        let mut conns = Vec::new();
        let mut configs = Vec::new();
        let mut controls = Vec::new();
        for (r, info) in chosen {
            let url = format!("http://{}", r.control);
            let claimed = runtime.block_on(async {
                let mut c = ReplicaControlClient::connect(url)
                    .await
                    .map_err(|e| e.to_string())?;
                c.claim(ClaimRequest { generation })
                    .await
                    .map_err(|s| s.message().to_string())
            });
            if let Err(e) = claimed {
                skipped.push((r.data.clone(), format!("claim refused: {e}")));
                continue;
            }
            let stream = match TcpStream::connect(&r.data) {
                Ok(s) => s,
                Err(e) => {
                    skipped.push((r.data.clone(), format!("data wire unreachable: {e}")));
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            conns.push(Conn {
                name: r.data.clone(),
                stream,
                header: Box::new([0; HEADER_LEN]),
                filled: 0,
                receiving: Receiving::Header,
                queue: VecDeque::new(),
                sending: None,
                raw_in_flight: 0,
                closed: false,
            });
            // A replica being rebuilt stays write-only: it may lack data its peers have.
            let wo = info.mode == horn_proto::control::Mode::Wo as i32;
            configs.push(ReplicaConfig {
                name: r.data.clone(),
                mode: if wo { Mode::Wo } else { Mode::Rw },
                local: r.local,
            });
            controls.push(r.control.clone());
        }
        if conns.is_empty() {
            return Err(VolumeError::NoReplica(
                skipped
                    .iter()
                    .map(|(r, why)| format!("{r}: {why}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            ));
        }
        let report = StartReport {
            generation,
            size,
            sector_size,
            used: conns.iter().map(|c| c.name.clone()).collect(),
            skipped: skipped.clone(),
        };
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_defer_taskrun()
            .build(256)
            .or_else(|_| IoUring::new(256))
            .map_err(sys("io_uring setup"))?;
        let mut v = Volume {
            ring,
            set: ReplicaSet::new(configs, timeout.as_nanos() as u64),
            conns,
            controls,
            skipped,
            slots: BTreeMap::new(),
            reqs: BTreeMap::new(),
            ready: VecDeque::new(),
            reaped: Vec::new(),
            generation,
            size,
            sector_size,
            start: Instant::now(),
            runtime,
        };
        for i in 0..v.conns.len() {
            v.post_recv(i)?;
        }
        Ok((v, report))
    }

    /// Volume size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Sector size in bytes.
    pub fn sector_size(&self) -> u32 {
        self.sector_size
    }

    /// The generation this engine holds.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Each replica's name and mode.
    pub fn replicas(&self) -> Vec<(String, Mode)> {
        self.conns
            .iter()
            .map(|c| c.name.clone())
            .zip(self.set.modes())
            .collect()
    }

    /// I/Os submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.slots.len() + self.ready.len()
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        let ss = self.sector_size as u64;
        if offset % ss != 0 || len % ss != 0 {
            return Err(VolumeError::BadRequest(format!(
                "I/O at offset {offset} length {len} is not a multiple of the sector size {ss}"
            )));
        }
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(VolumeError::BadRequest(format!(
                "I/O at offset {offset} length {len} reaches past the end of the volume ({} bytes)",
                self.size
            )));
        }
        Ok(())
    }

    /// Submits an I/O. `buf` is the data to write or the buffer to read into (its
    /// length is the I/O's); flushes take none, discard and write-zeroes take `len`.
    pub fn submit(&mut self, kind: IoKind, offset: u64, len: u64, buf: Option<IoBuf>, tag: u64) {
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
                refs: 0,
                result: None,
            },
        );
        self.run_actions();
    }

    /// Submits pending work and moves finished I/Os into `out` until it holds `min` of
    /// them or nothing is in flight. Replicas that stay silent past the timeout are
    /// dropped meanwhile.
    pub fn reap(&mut self, min: usize, out: &mut Vec<VolumeCompletion>) -> Result<usize> {
        let start = out.len();
        loop {
            out.extend(self.ready.drain(..));
            if out.len() - start >= min || self.slots.is_empty() {
                // Entries are submitted as they are queued; an empty submit would still
                // cost a system call (measured on the store: docs/benchmarks.md).
                if !self.ring.submission().is_empty() {
                    self.ring.submit().map_err(sys("io_uring submit"))?;
                }
                return Ok(out.len() - start);
            }
            self.wait()?;
        }
    }

    fn wait(&mut self) -> Result<()> {
        let now = self.now();
        let wait = self
            .set
            .next_deadline()
            .map(|d| Duration::from_nanos(d.saturating_sub(now)));
        let res = match wait {
            Some(w) => {
                let ts = types::Timespec::from(w.max(Duration::from_micros(1)));
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submit_and_wait(1),
        };
        match res {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR)) => {}
            Err(e) => return Err(sys("io_uring wait")(e)),
        }
        // Copied out first: handling a completion needs `&mut self`. The vector is reused.
        let mut done = std::mem::take(&mut self.reaped);
        done.clear();
        done.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(ud, res) in &done {
            let conn = (ud & INDEX_MASK) as usize;
            match ud & !INDEX_MASK {
                TAG_SEND => self.on_send(conn, res)?,
                TAG_RECV => self.on_recv(conn, res)?,
                _ => unreachable!("tag {ud:#x} was not issued by the engine"),
            }
        }
        self.reaped = done;
        let now = self.now();
        self.set.on_tick(now);
        self.run_actions();
        Ok(())
    }

    fn run_actions(&mut self) {
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
                    tracing::warn!(%reason, "replica dropped");
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
        let header = Header::request(op, req.0, request.offset, request.len, self.generation).encode();
        let (payload_io, ptr, len) = match (request.kind, self.slots.get_mut(&io)) {
            (IoKind::Write, Some(slot)) => {
                slot.refs += 1;
                let b = slot.buf.as_ref().expect("writes carry a buffer");
                (Some(io), b.as_slice().as_ptr(), b.len())
            }
            _ => (None, std::ptr::null(), 0),
        };
        self.reqs.insert(req, (io, replica));
        let out = Box::new(Outgoing {
            header,
            io: payload_io,
            ptr,
            len,
            sent: 0,
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; 2],
        });
        let conn = &mut self.conns[replica];
        conn.queue.push_back(out);
        if conn.sending.is_none() {
            self.start_send(replica);
        }
    }

    fn start_send(&mut self, c: usize) {
        let conn = &mut self.conns[c];
        if conn.closed {
            return;
        }
        let Some(mut out) = conn.sending.take().or_else(|| conn.queue.pop_front()) else {
            return;
        };
        let n = frame_iovecs(&out.header, (out.ptr, out.len), out.sent, &mut out.iov);
        let entry = opcode::Writev::new(types::Fd(conn.stream.as_raw_fd()), out.iov.as_ptr(), n as u32)
            .build()
            .user_data(TAG_SEND | c as u64);
        conn.sending = Some(out);
        conn.raw_in_flight += 1;
        // SAFETY: the iovecs live in the boxed Outgoing held in `conn.sending`, the
        // payload in the I/O's buffer whose refs count this send, the socket in the
        // conn; all stay until this entry completes.
        self.push(entry);
    }

    fn push(&mut self, entry: io_uring::squeue::Entry) {
        loop {
            // SAFETY: see the callers: every entry's memory outlives its completion.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                break;
            }
            if let Err(e) = self.ring.submit() {
                tracing::error!(error = %e, "io_uring submit failed");
            }
        }
        // Eager submission, as in the store (docs/benchmarks.md).
        let _ = self.ring.submit();
    }

    fn on_send(&mut self, c: usize, res: i32) -> Result<()> {
        let conn = &mut self.conns[c];
        conn.raw_in_flight -= 1;
        let mut out = conn.sending.take().expect("a send was in flight");
        if res <= 0 || conn.closed {
            if let Some(io) = out.io {
                self.release(io);
            }
            if !self.conns[c].closed {
                let now = self.now();
                self.set.on_disconnect(now, c);
                self.run_actions();
            }
            return Ok(());
        }
        out.sent += res as usize;
        if out.sent < HEADER_LEN + out.len {
            conn.sending = Some(out);
            self.start_send(c);
            return Ok(());
        }
        if let Some(io) = out.io {
            self.release(io);
        }
        self.start_send(c);
        Ok(())
    }

    /// A socket operation no longer points into the I/O's buffer.
    fn release(&mut self, io: IoId) {
        if let Some(slot) = self.slots.get_mut(&io) {
            slot.refs -= 1;
        }
        self.try_finish(io);
    }

    fn post_recv(&mut self, c: usize) -> Result<()> {
        let conn = &mut self.conns[c];
        if conn.closed {
            return Ok(());
        }
        let (ptr, len) = match &mut conn.receiving {
            Receiving::Header => (conn.header[conn.filled..].as_mut_ptr(), HEADER_LEN - conn.filled),
            Receiving::Data {
                io, filled, header, ..
            } => {
                let slot = self.slots.get_mut(io).expect("a read waiting for data is live");
                slot.refs += 1;
                let buf = slot.buf.as_mut().expect("reads carry a buffer");
                // SAFETY (arithmetic): filled < the reply's length = the buffer's length.
                let p = unsafe { buf.as_mut_slice().as_mut_ptr().add(*filled) };
                (p, header.length as usize - *filled)
            }
            Receiving::Discard { bytes, filled, .. } => {
                (bytes[*filled..].as_mut_ptr(), bytes.len() - *filled)
            }
        };
        let entry = opcode::Recv::new(types::Fd(conn.stream.as_raw_fd()), ptr, len as u32)
            .build()
            .user_data(TAG_RECV | c as u64);
        conn.raw_in_flight += 1;
        // SAFETY: the header box and discard vectors belong to the conn; read data goes
        // into an I/O buffer whose refs count this receive.
        self.push(entry);
        Ok(())
    }

    fn on_recv(&mut self, c: usize, res: i32) -> Result<()> {
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
            return Ok(());
        }
        let n = res as usize;
        let conn = &mut self.conns[c];
        let finished = match &mut conn.receiving {
            Receiving::Header => {
                conn.filled += n;
                if conn.filled < HEADER_LEN {
                    None
                } else {
                    conn.filled = 0;
                    let decoded = Header::decode(&conn.header);
                    match decoded {
                        Ok(h) if h.reply => self.start_reply(c, h),
                        other => {
                            let why = match other {
                                Err(e) => e.to_string(),
                                Ok(_) => "it sent a request instead of a reply".into(),
                            };
                            let now = self.now();
                            self.set
                                .fail_replica(now, c, format!("protocol violation: {why}"));
                            self.run_actions();
                            return Ok(());
                        }
                    }
                }
            }
            Receiving::Data {
                req, header, filled, ..
            } => {
                *filled += n;
                if *filled < header.length as usize {
                    None
                } else {
                    let done = Some((*req, *header, Vec::new()));
                    conn.receiving = Receiving::Header;
                    done
                }
            }
            Receiving::Discard {
                req,
                header,
                bytes,
                filled,
            } => {
                *filled += n;
                if *filled < bytes.len() {
                    None
                } else {
                    let done = Some((*req, *header, std::mem::take(bytes)));
                    conn.receiving = Receiving::Header;
                    done
                }
            }
        };
        if let Some((req, header, message)) = finished {
            self.on_reply(req, header, message);
        }
        self.post_recv(c)
    }

    /// A reply header has arrived: returns the reply if it has no payload, or sets the
    /// connection to receive the payload (read data straight into the waiting I/O's
    /// buffer; anything else, such as an error message or a reply nobody waits for,
    /// into a scratch vector).
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
        self.conns[c].receiving = match reader {
            Some(io) => Receiving::Data {
                req,
                header: h,
                io,
                filled: 0,
            },
            None => Receiving::Discard {
                req,
                header: h,
                bytes: vec![0; len],
                filled: 0,
            },
        };
        None
    }

    fn on_reply(&mut self, req: ReqId, h: Header, message: Vec<u8>) {
        // A reply whose read data did not land in the I/O's buffer cannot answer it.
        let discarded_read = h.op == Op::Read && h.status == Status::Ok && !message.is_empty();
        if self.reqs.remove(&req).is_none() {
            return; // for a request already settled without this replica
        }
        let text = String::from_utf8_lossy(&message).into_owned();
        let reply = match h.status {
            Status::Ok if discarded_read => Reply::Failed("read reply of the wrong length".into()),
            Status::Ok => Reply::Ok,
            Status::StaleGeneration => Reply::StaleGeneration,
            Status::OutOfRange | Status::Misaligned | Status::BadRequest => Reply::Refused(text),
            Status::IoError | Status::Unavailable => Reply::Failed(text),
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
        let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        let queued: Vec<Box<Outgoing>> = conn.queue.drain(..).collect();
        for out in queued {
            if let Some(io) = out.io {
                self.release(io);
            }
        }
    }

    /// Waits for every I/O in flight; their completions stay queued for `reap`.
    fn drain(&mut self) -> Result<()> {
        while !self.slots.is_empty() {
            self.wait()?;
        }
        Ok(())
    }

    fn run_one(&mut self, kind: IoKind, offset: u64, len: u64, buf: Option<IoBuf>) -> Result<Option<IoBuf>> {
        const TAG: u64 = u64::MAX;
        self.drain()?;
        self.submit(kind, offset, len, buf, TAG);
        self.drain()?;
        let at = self
            .ready
            .iter()
            .rposition(|c| c.tag == TAG)
            .expect("the I/O completed");
        let c = self.ready.remove(at).expect("in range");
        c.result.map(|()| c.buf)
    }

    /// Reads `out.len()` bytes at `offset` (blocking).
    pub fn read_at(&mut self, offset: u64, out: &mut [u8]) -> Result<()> {
        let buf = self.run_one(IoKind::Read, offset, 0, Some(IoBuf::zeroed(out.len())))?;
        out.copy_from_slice(buf.expect("reads return their buffer").as_slice());
        Ok(())
    }

    /// Writes `data` at `offset` (blocking).
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.run_one(IoKind::Write, offset, 0, Some(IoBuf::from_slice(data)))
            .map(|_| ())
    }

    /// Makes completed writes durable on every replica (blocking).
    pub fn flush(&mut self) -> Result<()> {
        self.run_one(IoKind::Flush, 0, 0, None).map(|_| ())
    }

    /// Runs a chain operation on every replica still in the set and returns the first
    /// one's view of the chain. Snapshot and revert first wait for the I/O in flight and
    /// flush; new I/O waits meanwhile (this loop does nothing else).
    pub fn chain_op(&mut self, op: ChainOp) -> Result<InfoReply> {
        if matches!(
            op,
            ChainOp::Snapshot { .. } | ChainOp::Revert(_) | ChainOp::Expand(_)
        ) {
            self.flush()?;
        }
        if let ChainOp::Expand(size) = op {
            if size < self.size {
                return Err(VolumeError::BadRequest(format!(
                    "cannot shrink the volume from {} to {size} bytes",
                    self.size
                )));
            }
        }
        let generation = self.generation;
        let mut first = None;
        for (i, mode) in self.set.modes().into_iter().enumerate() {
            if mode == Mode::Err {
                continue;
            }
            let control = self.controls[i].clone();
            let url = format!("http://{control}");
            let this_op = op.clone();
            let info = self
                .runtime
                .block_on(async move {
                    let mut c = ReplicaControlClient::connect(url)
                        .await
                        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                    let reply = match this_op {
                        ChainOp::Info => c.info(InfoRequest {}).await?.into_inner(),
                        ChainOp::Snapshot { name, labels } => c
                            .snapshot(SnapshotRequest {
                                generation,
                                name,
                                labels,
                            })
                            .await?
                            .into_inner(),
                        ChainOp::Delete(name) => c
                            .delete_snapshot(DeleteSnapshotRequest { generation, name })
                            .await?
                            .into_inner(),
                        ChainOp::Purge => {
                            let p = c.purge(PurgeRequest { generation }).await?.into_inner();
                            p.info.unwrap_or_default()
                        }
                        ChainOp::Revert(name) => {
                            c.revert(RevertRequest { generation, name }).await?.into_inner()
                        }
                        ChainOp::Expand(size) => {
                            c.expand(ExpandRequest { generation, size }).await?.into_inner()
                        }
                    };
                    Ok::<_, tonic::Status>(reply)
                })
                .map_err(control_err(&control))?;
            first.get_or_insert(info);
            if matches!(op, ChainOp::Info) {
                break;
            }
        }
        let first = first.ok_or(VolumeError::Io(IoError::NoHealthyReplica))?;
        if let ChainOp::Expand(size) = op {
            // Every replica in the set now has the new size: I/O may use it.
            self.size = size;
        }
        Ok(first)
    }

    /// Takes snapshot `name` on every replica (see [`Volume::chain_op`]).
    pub fn snapshot(&mut self, name: &str) -> Result<()> {
        self.chain_op(ChainOp::Snapshot {
            name: name.to_string(),
            labels: Default::default(),
        })
        .map(|_| ())
    }

    /// Replicas left out at start, and why.
    pub fn skipped(&self) -> &[(String, String)] {
        &self.skipped
    }

    /// Waits for all I/O, flushes, and releases the replicas (marks them clean).
    pub fn close(mut self) -> Result<()> {
        self.flush()?;
        let generation = self.generation;
        for (i, mode) in self.set.modes().into_iter().enumerate() {
            if mode == Mode::Err {
                continue;
            }
            let control = self.controls[i].clone();
            let url = format!("http://{control}");
            let released = self.runtime.block_on(async {
                let mut c = ReplicaControlClient::connect(url)
                    .await
                    .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                c.release(ReleaseRequest { generation }).await
            });
            if let Err(s) = released {
                tracing::warn!(replica = %control, error = %s.message(), "release failed");
            }
        }
        for i in 0..self.conns.len() {
            self.close_conn(i);
        }
        // Let the receives woken by the shutdowns finish before the buffers go.
        while self.conns.iter().any(|c| c.raw_in_flight > 0) {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(sys("io_uring wait")(e)),
            }
            let done: Vec<u64> = self.ring.completion().map(|c| c.user_data()).collect();
            for ud in done {
                let c = (ud & INDEX_MASK) as usize;
                self.conns[c].raw_in_flight -= 1;
            }
        }
        Ok(())
    }
}
