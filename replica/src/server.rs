//! The replica server's data loop: one replica served over the data wire
//! (`docs/wire-protocol.md`) to any number of connections.
//!
//! One thread owns the replica and every connection. Socket accepts, receives and
//! sends are entries on the replica's own io_uring, next to its file I/O, so a request
//! goes from socket to disk with no thread hop and no lock: a write's payload is
//! received straight into the buffer the store writes from, and a read's data is sent
//! from the buffer the store read into. Requests on a connection are pipelined;
//! replies go out as the store completes them, in any order. Every request passes
//! the replica's one admission (`admission.rs`, shared with the in-process engine)
//! before it reaches the store; a refusal is answered with its status and words.
//!
//! Control operations (generation, snapshots, info) come from other threads through a
//! [`ServerHandle`] (`handle.rs`): each is a closure run on the loop thread between
//! I/Os, with the replica in hand.
//!
//! **What a client may hold** ([`Limits`]). A connection's unanswered requests (read,
//! reply not yet sent) and the bytes of buffers they hold (a read's data, a write's
//! payload) are capped: over either cap, the server reads no further request from the
//! connection until replies have gone out. A client that sends read requests and never
//! reads the replies therefore holds at most one cap's worth of memory, and the
//! socket's own buffers do the rest of the pushing back. Connections beyond
//! [`Limits::connections`] are closed as they are accepted. An accept that fails for
//! want of descriptors or memory is retried after a pause, not in a busy loop.

use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::mpsc::Receiver;

use horn_proto::auth::{self, Challenge};
use horn_proto::batch::{Message, SendBatch, TwoPartRecv};
use horn_proto::wire::{Header, Op, Status, FLAG_FUA, HEADER_LEN, NONCE_LEN};
use io_uring::{opcode, types};

use crate::admission::{Access, Caller};
use crate::error::{ReplicaError, Result};
use crate::handle::Command;
pub use crate::handle::ServerHandle;
use crate::io::Completion;
use crate::replica::Replica;
use horn_uring::{IoBuf, SpareBufs};

const KIND_SHIFT: u32 = 56;
const TAG_ACCEPT: u64 = 1 << KIND_SHIFT;
const TAG_RECV: u64 = 2 << KIND_SHIFT;
const TAG_SEND: u64 = 3 << KIND_SHIFT;
const TAG_STORE: u64 = 4 << KIND_SHIFT;
const TAG_WAKE: u64 = 5 << KIND_SHIFT;
/// The pause before an accept is tried again after it failed for want of resources.
const TAG_ACCEPT_RETRY: u64 = 6 << KIND_SHIFT;
const INDEX_MASK: u64 = (1 << KIND_SHIFT) - 1;

/// How long a failed accept waits before it is tried again.
/// Bytes of large writes' buffers a server keeps for the next ones: enough for a
/// restore's or a sequential writer's 2 MiB writes in flight.
const SPARE_BYTES: usize = 16 << 20;
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// What the server lets its clients hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; one more is closed as soon as it is accepted.
    pub connections: usize,
    /// Requests a connection may have unanswered (received, reply not yet sent).
    pub requests_per_connection: usize,
    /// Bytes of read data and write payload a connection's unanswered requests may
    /// hold (one request may take it past the cap: at most 8 MiB).
    pub bytes_per_connection: usize,
}

impl Default for Limits {
    /// 64 connections (an engine opens one per queue), 1,024 requests and 32 MiB per
    /// connection: 2 GiB at worst for a replica, and far more than an engine's queue
    /// keeps in flight at 4 KiB (its depth) or needs at 1 MiB to keep a disk busy.
    fn default() -> Limits {
        Limits {
            connections: 64,
            requests_per_connection: 1024,
            bytes_per_connection: 32 << 20,
        }
    }
}

/// The bytes a request holds until it is answered: a read's data, a write's payload.
fn holds(req: &Header) -> usize {
    match req.op {
        Op::Read => req.length as usize,
        _ => req.payload_len(),
    }
}

/// A reply waiting to be sent.
struct Outgoing {
    header: [u8; HEADER_LEN],
    payload: Payload,
    /// The bytes its request held (`None`: the reply to no counted request, as the
    /// refusal of a malformed one).
    answers: Option<usize>,
}

enum Payload {
    None,
    Data(IoBuf),
    Message(Vec<u8>),
}

impl Outgoing {
    /// The reply to `req` (counted when it was received).
    fn answer(req: &Header, header: Header, payload: Payload) -> Box<Outgoing> {
        Box::new(Outgoing {
            header: header.encode(),
            payload,
            answers: Some(holds(req)),
        })
    }
}

impl Message for Outgoing {
    fn header(&self) -> &[u8; HEADER_LEN] {
        &self.header
    }

    /// On the heap (the buffer or the vector), so it stays in place as the boxed
    /// reply moves.
    fn payload(&self) -> (*const u8, usize) {
        let p: &[u8] = match &self.payload {
            Payload::None => &[],
            Payload::Data(b) => b.as_slice(),
            Payload::Message(m) => m,
        };
        (p.as_ptr(), p.len())
    }
}

/// The payload of a write being received.
struct Incoming {
    header: Header,
    buf: IoBuf,
    filled: usize,
}

struct Conn {
    stream: TcpStream,
    header: Box<[u8; HEADER_LEN]>,
    filled: usize,
    incoming: Option<Incoming>,
    /// The two-part receive of a write's data and the next header.
    rx_msg: Box<TwoPartRecv>,
    out: SendBatch<Outgoing>,
    /// Socket entries (one receive, one send at most) in the ring.
    raw_in_flight: usize,
    /// Store operations in flight for this connection.
    ops: usize,
    /// No more requests are read; the connection closes once its work is done.
    closing: bool,
    /// The engine this connection named in its `Hello`, if it did.
    engine: Option<String>,
    /// Where the connection's handshake stands (it matters only to a replica that
    /// holds its volume's secret).
    auth: Handshake,
    /// Requests received and not yet answered, and the bytes they hold.
    unanswered: usize,
    held: usize,
    /// Over a cap: no request is read until replies have gone out.
    paused: bool,
}

impl Conn {
    /// A receive or a send of the connection went into the ring.
    fn raw_started(&mut self) {
        self.raw_in_flight += 1;
        debug_assert!(self.raw_in_flight <= 2, "one receive and one send at most");
    }

    /// A receive or a send of the connection completed.
    fn raw_ended(&mut self) {
        debug_assert!(
            self.raw_in_flight > 0,
            "a socket completion with no entry in flight"
        );
        self.raw_in_flight -= 1;
    }
}

/// A connection's handshake ([`horn_proto::auth`]).
enum Handshake {
    /// No hello yet.
    None,
    /// The replica answered a hello at `generation` and waits for the engine's proof.
    Challenged {
        challenge: Box<Challenge>,
        generation: u64,
    },
    /// The engine proved it holds the key of `generation`: the connection serves
    /// requests at that generation.
    Proven { generation: u64 },
}

struct Pending {
    conn: u32,
    header: Header,
    /// A FUA write whose data is written and whose flush is still to come.
    flush_after: bool,
}

/// Serves one replica over the data wire.
pub struct DataServer {
    replica: Replica,
    listener: TcpListener,
    conns: Vec<Option<Conn>>,
    free_conns: Vec<u32>,
    pending: Vec<Option<Pending>>,
    free_pending: Vec<u32>,
    inbox: Receiver<Option<Command>>,
    handle: ServerHandle,
    wake_buf: Box<[u8; 8]>,
    stopping: bool,
    limits: Limits,
    /// Connections open now.
    live: usize,
    /// The pause of a failed accept, while it runs (the kernel reads it).
    accept_retry: Box<types::Timespec>,
    /// Connections refused since the last warning (warned once per burst).
    refused: u64,
    /// Large writes' buffers, kept for the next ones while any client is connected.
    spare: SpareBufs,
}

impl DataServer {
    /// A server for `replica` on `listener` (already bound), with the default
    /// [`Limits`].
    pub fn new(replica: Replica, listener: TcpListener) -> Result<DataServer> {
        Self::with_limits(replica, listener, Limits::default())
    }

    /// A server for `replica` on `listener` (already bound) that lets its clients hold
    /// at most `limits`.
    pub fn with_limits(replica: Replica, listener: TcpListener, limits: Limits) -> Result<DataServer> {
        let (handle, inbox) = ServerHandle::for_loop(replica.dir())?;
        Ok(DataServer {
            replica,
            listener,
            conns: Vec::new(),
            free_conns: Vec::new(),
            pending: Vec::new(),
            free_pending: Vec::new(),
            inbox,
            handle,
            wake_buf: Box::new([0; 8]),
            stopping: false,
            limits,
            live: 0,
            accept_retry: Box::new(
                types::Timespec::new()
                    .sec(ACCEPT_RETRY.as_secs())
                    .nsec(ACCEPT_RETRY.subsec_nanos()),
            ),
            refused: 0,
            spare: SpareBufs::new(SPARE_BYTES),
        })
    }

    /// A handle for control operations from other threads.
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// Serves until [`ServerHandle::stop`]; then finishes the I/O in flight, closes the
    /// connections, and closes the replica (flushed). The replica's I/O stays on the
    /// thread that runs this.
    pub fn run(mut self) -> Result<()> {
        self.post_accept()?;
        self.post_wake()?;
        let mut out: Vec<Completion> = Vec::new();
        while !self.stopping {
            out.clear();
            self.replica.reap(1, &mut out)?;
            for c in out.drain(..) {
                self.on_completion(c)?;
            }
        }
        // Shutting the sockets down completes every accept and receive still in the ring;
        // reap until nothing is left, so no buffer is freed under the kernel.
        // SAFETY: shutdown takes no pointers; the listener is ours.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for conn in self.conns.iter_mut().flatten() {
            conn.closing = true;
            let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        }
        while self.replica.in_flight() > 0 {
            out.clear();
            self.replica.reap(1, &mut out)?;
            for c in out.drain(..) {
                self.on_completion(c)?;
            }
        }
        self.replica.flush()
    }

    fn post_accept(&mut self) -> Result<()> {
        let entry = opcode::Accept::new(
            types::Fd(self.listener.as_raw_fd()),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
        .flags(libc::SOCK_CLOEXEC)
        .build();
        // SAFETY: the listener lives as long as the server; no buffers are named.
        unsafe { self.replica.submit_raw(entry, TAG_ACCEPT) }
    }

    fn post_wake(&mut self) -> Result<()> {
        let fd = self.handle.waker_fd();
        let entry = opcode::Read::new(types::Fd(fd), self.wake_buf.as_mut_ptr(), 8).build();
        // SAFETY: wake_buf is boxed and owned by the server (leaked, not freed, at stop);
        // the eventfd lives in the handle's Arc, which the server holds.
        unsafe { self.replica.submit_raw(entry, TAG_WAKE) }
    }

    fn on_completion(&mut self, c: Completion) -> Result<()> {
        let index = (c.tag & INDEX_MASK) as u32;
        match c.tag & !INDEX_MASK {
            TAG_ACCEPT => self.on_accept(c.raw)?,
            TAG_RECV => self.on_recv(index, c.raw)?,
            TAG_SEND => self.on_send(index, c.raw)?,
            TAG_STORE => self.on_store(index, c)?,
            TAG_WAKE => self.on_wake()?,
            TAG_ACCEPT_RETRY if !self.stopping => self.post_accept()?,
            TAG_ACCEPT_RETRY => {}
            _ => unreachable!("tag {:#x} was not issued by the server", c.tag),
        }
        Ok(())
    }

    fn on_wake(&mut self) -> Result<()> {
        while let Ok(cmd) = self.inbox.try_recv() {
            match cmd {
                Some(cmd) => cmd(&mut self.replica),
                None => self.stopping = true,
            }
        }
        if !self.stopping {
            self.post_wake()?;
        }
        Ok(())
    }

    fn on_accept(&mut self, res: i32) -> Result<()> {
        if self.stopping {
            if res >= 0 {
                // SAFETY: the kernel just created this descriptor; closing it is ours to do.
                drop(unsafe { TcpStream::from_raw_fd(res) });
            }
            return Ok(());
        }
        if res < 0 {
            let error = std::io::Error::from_raw_os_error(-res);
            if matches!(-res, libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) {
                // Out of descriptors or memory: try again after a pause, not at once.
                tracing::warn!(%error, retry_in = ?ACCEPT_RETRY, "accept failed for want of resources");
                let entry = opcode::Timeout::new(&*self.accept_retry).build();
                // SAFETY: the timespec is boxed and owned by the server, which outlives
                // the ring's entries (it reaps them all before it ends).
                return unsafe { self.replica.submit_raw(entry, TAG_ACCEPT_RETRY) };
            }
            tracing::warn!(%error, "accept failed");
        } else if self.live >= self.limits.connections {
            // SAFETY: the kernel just created this descriptor for us; closing it is ours.
            drop(unsafe { TcpStream::from_raw_fd(res) });
            self.refused += 1;
            if self.refused == 1 || self.refused.is_power_of_two() {
                tracing::warn!(
                    limit = self.limits.connections,
                    refused = self.refused,
                    "a connection over the limit was closed"
                );
            }
        } else {
            // SAFETY: the kernel just created this descriptor for us.
            let stream = unsafe { TcpStream::from_raw_fd(res) };
            let _ = stream.set_nodelay(true);
            tracing::debug!(peer = ?stream.peer_addr().ok(), "connection accepted");
            let conn = Conn {
                stream,
                header: Box::new([0; HEADER_LEN]),
                filled: 0,
                incoming: None,
                rx_msg: TwoPartRecv::new(),
                out: SendBatch::default(),
                raw_in_flight: 0,
                ops: 0,
                closing: false,
                engine: None,
                auth: Handshake::None,
                unanswered: 0,
                held: 0,
                paused: false,
            };
            self.live += 1;
            self.refused = 0;
            let id = match self.free_conns.pop() {
                Some(i) => {
                    self.conns[i as usize] = Some(conn);
                    i
                }
                None => {
                    self.conns.push(Some(conn));
                    (self.conns.len() - 1) as u32
                }
            };
            self.post_recv(id)?;
        }
        self.post_accept()
    }

    fn conn(&mut self, id: u32) -> &mut Conn {
        self.conns[id as usize]
            .as_mut()
            .expect("completion for a live connection")
    }

    fn post_recv(&mut self, id: u32) -> Result<()> {
        let limits = self.limits;
        let conn = self.conn(id);
        if conn.closing {
            return Ok(());
        }
        // Between requests, over a cap: read nothing more until replies go out.
        if conn.incoming.is_none()
            && (conn.unanswered >= limits.requests_per_connection || conn.held >= limits.bytes_per_connection)
        {
            conn.paused = true;
            return Ok(());
        }
        let fd = types::Fd(conn.stream.as_raw_fd());
        let entry = match &mut conn.incoming {
            // The rest of a write's data, and the next request's header with it.
            Some(inc) => {
                let rest = &mut inc.buf.as_mut_slice()[inc.filled..];
                let msg = conn.rx_msg.prepare(
                    (rest.as_mut_ptr(), rest.len()),
                    (conn.header.as_mut_ptr(), HEADER_LEN),
                );
                opcode::RecvMsg::new(fd, msg).build()
            }
            None => {
                let rest = &mut conn.header[conn.filled..];
                opcode::Recv::new(fd, rest.as_mut_ptr(), rest.len() as u32).build()
            }
        };
        conn.raw_started();
        // SAFETY: the buffers (boxed header, the incoming IoBuf, the boxed msghdr) and the
        // socket belong to the connection, which is freed only when no entry of it is in
        // flight.
        unsafe { self.replica.submit_raw(entry, TAG_RECV | id as u64) }
    }

    fn on_recv(&mut self, id: u32, res: i32) -> Result<()> {
        let conn = self.conn(id);
        conn.raw_ended();
        if res <= 0 {
            if res < 0 {
                tracing::debug!(error = %std::io::Error::from_raw_os_error(-res), "receive failed; closing");
            }
            conn.closing = true;
            return self.maybe_close(id);
        }
        let mut n = res as usize;
        if let Some(inc) = &mut conn.incoming {
            let took = n.min(inc.buf.len() - inc.filled);
            inc.filled += took;
            if inc.filled < inc.buf.len() {
                return self.post_recv(id);
            }
            let inc = conn.incoming.take().expect("checked above");
            // Whatever came after the data is the start of the next header.
            n -= took;
            conn.filled = 0;
            self.dispatch(id, inc.header, Some(inc.buf))?;
            if n == 0 || self.conn(id).closing {
                return self.post_recv(id);
            }
        }
        let conn = self.conn(id);
        conn.filled += n;
        if conn.filled < HEADER_LEN {
            return self.post_recv(id);
        }
        conn.filled = 0;
        let raw = *conn.header;
        match Header::decode(&raw) {
            Ok(h) if !h.reply => {
                let len = h.payload_len();
                // The receive fills all of it before it is read.
                let buf = (len > 0).then(|| self.spare.take(len));
                let conn = self.conn(id);
                // Counted until its reply has gone out.
                conn.unanswered += 1;
                conn.held += holds(&h);
                match buf {
                    Some(buf) => {
                        conn.incoming = Some(Incoming {
                            header: h,
                            buf,
                            filled: 0,
                        })
                    }
                    None => self.dispatch(id, h, None)?,
                }
                self.post_recv(id)
            }
            Ok(_) => self.refuse(id, &raw, "a replica takes requests, not replies".into()),
            Err(e) => self.refuse(id, &raw, e.to_string()),
        }
    }

    /// Answers a malformed request with "bad request" (echoing its id) and stops
    /// reading from the connection, which closes once the answer is sent.
    fn refuse(&mut self, id: u32, raw: &[u8; HEADER_LEN], why: String) -> Result<()> {
        tracing::warn!(reason = %why, "malformed request; closing the connection");
        let req_id = u64::from_le_bytes(raw[8..16].try_into().expect("8 bytes"));
        let req = Header::request(Op::Ping, req_id, 0, 0, 0);
        self.conn(id).closing = true;
        let mut out = self.error_reply(&req, Status::BadRequest, why);
        // It answers no request that was counted: the header did not decode.
        out.answers = None;
        self.queue_send(id, out)
    }

    fn reply_error(&mut self, id: u32, req: &Header, status: Status, message: String) -> Result<()> {
        let out = self.error_reply(req, status, message);
        self.queue_send(id, out)
    }

    fn error_reply(&self, req: &Header, status: Status, message: String) -> Box<Outgoing> {
        let mut msg = message.into_bytes();
        msg.truncate(horn_proto::wire::MAX_MESSAGE_LEN as usize);
        let h = Header::reply_to(req, status, msg.len() as u32, self.replica.generation());
        Outgoing::answer(req, h, Payload::Message(msg))
    }

    fn dispatch(&mut self, id: u32, h: Header, payload: Option<IoBuf>) -> Result<()> {
        let (off, len) = (h.offset, h.length as u64);
        match h.op {
            Op::Hello => return self.on_hello(id, h, payload),
            Op::Prove => return self.on_prove(id, h, payload),
            _ => {}
        }
        if let Err(why) = self.check_proven(id, &h) {
            self.conn(id).closing = true;
            return self.reply_error(id, &h, Status::Unauthenticated, why);
        }
        let access = match h.op {
            Op::Hello | Op::Prove => unreachable!("answered above"),
            Op::Ping => Access::Ping,
            Op::Read => Access::Read { offset: off, len },
            Op::Write | Op::Discard | Op::WriteZeroes => Access::Change { offset: off, len },
            Op::Flush => Access::Flush,
        };
        let conn = &self.conns[id as usize];
        let caller = match conn.as_ref().and_then(|c| c.engine.as_deref()) {
            Some(engine) => Caller::Named(engine),
            None => Caller::Unnamed,
        };
        if let Err(refusal) = self.replica.admit(h.generation, caller, access) {
            return self.reply_error(id, &h, refusal.wire_status(), refusal.to_string());
        }
        match h.op {
            Op::Ping => {
                let reply = Header::reply_to(&h, Status::Ok, 0, self.replica.generation());
                return self.queue_send(id, Outgoing::answer(&h, reply, Payload::None));
            }
            Op::Discard | Op::WriteZeroes => {
                let result = if h.op == Op::Discard {
                    self.replica.discard(off, len)
                } else {
                    self.replica.write_zeroes(off, len)
                };
                return self.reply(id, &h, result, None);
            }
            Op::Read | Op::Write | Op::Flush | Op::Hello | Op::Prove => {}
        }
        let slot = Pending {
            conn: id,
            header: h,
            flush_after: h.op == Op::Write && h.flags & FLAG_FUA != 0,
        };
        let p = match self.free_pending.pop() {
            Some(i) => {
                self.pending[i as usize] = Some(slot);
                i
            }
            None => {
                self.pending.push(Some(slot));
                (self.pending.len() - 1) as u32
            }
        };
        self.conn(id).ops += 1;
        let tag = TAG_STORE | p as u64;
        match h.op {
            Op::Read => self.replica.submit_read(off, IoBuf::zeroed(len as usize), tag),
            Op::Write => self
                .replica
                .submit_write(off, payload.expect("writes carry a payload"), tag),
            _ => self.replica.submit_flush(tag),
        }
        Ok(())
    }

    /// A hello names the engine; to a replica that holds its volume's secret it is
    /// also the engine's challenge, answered with the replica's own nonce and proof.
    fn on_hello(&mut self, id: u32, h: Header, payload: Option<IoBuf>) -> Result<()> {
        let bytes = payload.as_ref().map_or(&[][..], IoBuf::as_slice);
        let (nonce, name) = bytes.split_at(bytes.len().min(NONCE_LEN as usize));
        let engine = match std::str::from_utf8(name) {
            Ok(e) if !e.is_empty() && nonce.len() == NONCE_LEN as usize => e.to_string(),
            _ => {
                self.conn(id).closing = true;
                let why = "a hello carries a 32-byte nonce and names its engine in UTF-8";
                return self.reply_error(id, &h, Status::BadRequest, why.into());
            }
        };
        let Some(secret) = self.replica.secret() else {
            self.conn(id).engine = Some(engine);
            let reply = Header::reply_to(&h, Status::Ok, 0, self.replica.generation());
            return self.queue_send(id, Outgoing::answer(&h, reply, Payload::None));
        };
        let replica_nonce =
            auth::random().map_err(|e| ReplicaError::io("draw a nonce for", self.replica.dir(), e))?;
        let challenge = Challenge {
            engine_nonce: nonce.try_into().expect("checked length"),
            replica_nonce,
            identity: name.to_vec(),
        };
        let mut answer = replica_nonce.to_vec();
        answer.extend_from_slice(&challenge.replica_proof(&secret.generation_key(h.generation)));
        let conn = self.conn(id);
        conn.engine = Some(engine);
        conn.auth = Handshake::Challenged {
            challenge: Box::new(challenge),
            generation: h.generation,
        };
        let reply = Header::reply_to(&h, Status::Ok, answer.len() as u32, self.replica.generation());
        self.queue_send(id, Outgoing::answer(&h, reply, Payload::Message(answer)))
    }

    /// The engine's proof over the handshake's nonces: right, and the connection
    /// serves requests at the hello's generation; wrong, and it closes.
    fn on_prove(&mut self, id: u32, h: Header, payload: Option<IoBuf>) -> Result<()> {
        let proof = payload.as_ref().map_or(&[][..], IoBuf::as_slice);
        let handshake = &self.conns[id as usize].as_ref().expect("a live connection").auth;
        let verdict = match (self.replica.secret(), handshake) {
            (None, _) => Ok(()),
            (
                Some(secret),
                Handshake::Challenged {
                    challenge,
                    generation,
                },
            ) if *generation == h.generation => {
                let expected = challenge.engine_proof(&secret.generation_key(*generation));
                if !auth::equal(&expected, proof) {
                    Err(format!(
                        "the engine's proof for generation {generation} is wrong: it does not hold that generation's key of this volume"
                    ))
                } else if *generation < self.replica.generation() {
                    Err(format!(
                        "generation {generation} is behind this replica's {}: that key no longer works here",
                        self.replica.generation()
                    ))
                } else {
                    Ok(())
                }
            }
            (Some(_), Handshake::Challenged { generation, .. }) => Err(format!(
                "the proof is for generation {}, the hello was at {generation}",
                h.generation
            )),
            (Some(_), _) => {
                Err("a proof answers this replica's reply to a hello: send the hello first".into())
            }
        };
        match verdict {
            Ok(()) => {
                if self.replica.secret().is_some() {
                    self.conn(id).auth = Handshake::Proven {
                        generation: h.generation,
                    };
                }
                let reply = Header::reply_to(&h, Status::Ok, 0, self.replica.generation());
                self.queue_send(id, Outgoing::answer(&h, reply, Payload::None))
            }
            Err(why) => {
                tracing::warn!(reason = %why, "a data-wire peer failed the handshake; closing the connection");
                self.conn(id).closing = true;
                self.reply_error(id, &h, Status::Unauthenticated, why)
            }
        }
    }

    /// Is the connection allowed request `h`? Always on a replica without a secret;
    /// otherwise pings always, and everything else only at the generation whose key
    /// the connection proved.
    fn check_proven(&mut self, id: u32, h: &Header) -> std::result::Result<(), String> {
        if self.replica.secret().is_none() || h.op == Op::Ping {
            return Ok(());
        }
        match self.conn(id).auth {
            Handshake::Proven { generation } if generation == h.generation => Ok(()),
            Handshake::Proven { generation } => Err(format!(
                "this connection proved the key of generation {generation}, not of {}: connect again",
                h.generation
            )),
            _ => Err(
                "this replica serves only its volume's engine: open the connection with a hello and prove the generation's key"
                    .into(),
            ),
        }
    }

    fn on_store(&mut self, p: u32, c: Completion) -> Result<()> {
        let pending = self.pending[p as usize]
            .as_mut()
            .expect("store completion for a live request");
        if pending.flush_after && c.result.is_ok() {
            pending.flush_after = false;
            self.replica.submit_flush(TAG_STORE | p as u64);
            return Ok(());
        }
        let pending = self.pending[p as usize].take().expect("checked above");
        self.free_pending.push(p);
        let id = pending.conn;
        let conn = self.conn(id);
        debug_assert!(
            conn.ops > 0,
            "a store completion for a connection with none in flight"
        );
        conn.ops -= 1;
        let data = if pending.header.op == Op::Read {
            c.buf
        } else {
            if let Some(written) = c.buf {
                self.spare.keep(written);
            }
            None
        };
        self.reply(id, &pending.header, c.result, data)?;
        self.maybe_close(id)
    }

    fn reply(&mut self, id: u32, req: &Header, result: Result<()>, data: Option<IoBuf>) -> Result<()> {
        match result {
            Ok(()) => {
                let len = data.as_ref().map_or(0, IoBuf::len) as u32;
                let h = Header::reply_to(req, Status::Ok, len, self.replica.generation());
                let payload = data.map_or(Payload::None, Payload::Data);
                self.queue_send(id, Outgoing::answer(req, h, payload))
            }
            Err(e) => self.reply_error(id, req, e.wire_status(), e.to_string()),
        }
    }

    fn queue_send(&mut self, id: u32, out: Box<Outgoing>) -> Result<()> {
        self.conn(id).out.push(out);
        self.start_send(id)
    }

    /// Sends the replies queued up on the connection, unless a send is in the kernel.
    fn start_send(&mut self, id: u32) -> Result<()> {
        let conn = self.conn(id);
        let Some((iov, n)) = conn.out.next_send() else {
            return Ok(());
        };
        let entry = opcode::Writev::new(types::Fd(conn.stream.as_raw_fd()), iov, n).build();
        conn.raw_started();
        // SAFETY: the iovecs live in the conn's batch and point into its boxed replies
        // and their heap payloads, all kept until this entry completes; the socket lives
        // with the conn.
        unsafe { self.replica.submit_raw(entry, TAG_SEND | id as u64) }
    }

    fn on_send(&mut self, id: u32, res: i32) -> Result<()> {
        let conn = self.conn(id);
        conn.raw_ended();
        let Conn {
            out,
            unanswered,
            held,
            ..
        } = conn;
        let mut answered = |m: Box<Outgoing>| {
            if let Some(bytes) = m.answers {
                *unanswered -= 1;
                *held -= bytes;
            }
        };
        if res < 0 {
            tracing::debug!(error = %std::io::Error::from_raw_os_error(-res), "send failed; closing");
            out.take_all().for_each(&mut answered);
            conn.closing = true;
            return self.maybe_close(id);
        }
        out.sent(res as usize, answered);
        if conn.paused {
            // Replies went out: read requests again if the connection is under its caps.
            conn.paused = false;
            self.post_recv(id)?;
        }
        if !self.conn(id).out.is_idle() {
            return self.start_send(id);
        }
        self.maybe_close(id)
    }

    /// Frees a closing connection once nothing of it is in flight or queued.
    fn maybe_close(&mut self, id: u32) -> Result<()> {
        let conn = self.conn(id);
        if conn.closing && conn.raw_in_flight == 0 && conn.ops == 0 && conn.out.is_idle() {
            let _ = conn.stream.shutdown(std::net::Shutdown::Both);
            self.conns[id as usize] = None;
            self.free_conns.push(id);
            self.live -= 1;
            // No client left (its engine went): nothing keeps spare buffers for it.
            if self.live == 0 {
                self.spare.release();
            }
        }
        Ok(())
    }
}
