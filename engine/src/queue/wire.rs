//! An engine queue's connections to replica processes: requests sent many to a
//! `writev` straight from the I/Os' buffers, replies received and parsed, read data
//! received straight into the waiting I/O's buffer (docs/wire-protocol.md).

use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use horn_proto::batch::{Message, SendBatch, TwoPartRecv};
use horn_proto::client::BlockingClient;
use horn_proto::wire::{Header, Op, Status, FLAG_FUA, HEADER_LEN};
use horn_replica::shared::SharedReplica;
use horn_uring::IoBuf;
use io_uring::{opcode, types};

use super::{reply_for, EngineQueue, KIND_RECV, KIND_SEND};
use crate::engine::Engine;
use crate::replica_set::{IoId, IoKind, IoRequest, Reply, ReqId};

/// A request on its way out.
pub(super) struct Outgoing {
    pub(super) header: [u8; HEADER_LEN],
    /// Writes: the payload lives in this I/O's buffer.
    pub(super) io: Option<IoId>,
    pub(super) ptr: *const u8,
    pub(super) len: usize,
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

pub(super) enum Receiving {
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

pub(super) struct Conn {
    /// None for a replica that had failed before this queue opened, or one hosted in
    /// this process.
    pub(super) stream: Option<TcpStream>,
    /// The replica, when it is hosted in this process.
    pub(super) local: Option<Arc<SharedReplica>>,
    /// Received bytes not yet parsed are `rx[rx_start..rx_end]`.
    pub(super) rx: Box<[u8; RX_LEN]>,
    pub(super) rx_start: usize,
    pub(super) rx_end: usize,
    /// The two-part receive in the kernel: the rest of a payload, then the next header.
    pub(super) rx_msg: Box<TwoPartRecv>,
    /// Reads sent on this connection and not answered yet.
    pub(super) reads: usize,
    pub(super) receiving: Receiving,
    pub(super) out: SendBatch<Outgoing>,
    pub(super) raw_in_flight: usize,
    pub(super) closed: bool,
}

impl Conn {
    /// A connection to the replica at `data` (none for a replica already failed),
    /// named as `engine`'s, and why it could not be made.
    pub(super) fn connect(data: &str, failed: bool, engine: &Engine) -> (Conn, Option<String>) {
        let (stream, local, why) = match SharedReplica::hosted(data) {
            _ if failed => (None, None, None),
            Ok(Some(r)) => (None, Some(r), None),
            Err(e) => (None, None, Some(e.to_string())),
            Ok(None) => match hello(data, engine) {
                Ok(s) => (Some(s), None, None),
                Err(why) => (None, None, Some(why)),
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

/// Connects to a replica's data wire and opens the connection as the engine (`Hello`,
/// and the handshake of [`horn_proto::auth`] when the engine has its generation's key),
/// waiting for the answers within the engine's timeout: a replica claimed by another
/// engine at the same generation then refuses every request on the connection.
fn hello(data: &str, engine: &Engine) -> std::result::Result<TcpStream, String> {
    let unreachable = |e: std::io::Error| format!("its data wire is unreachable: {e}");
    let addr = data
        .to_socket_addrs()
        .map_err(unreachable)?
        .next()
        .ok_or_else(|| format!("its data address {data} resolves to nothing"))?;
    let addr = match &engine.caller().data {
        Some(dial) => dial.route(addr).map_err(unreachable)?,
        None => addr,
    };
    let s = TcpStream::connect_timeout(&addr, engine.timeout()).map_err(unreachable)?;
    let mut c = BlockingClient::over(s, engine.timeout()).map_err(unreachable)?;
    c.open(engine.engine_id(), engine.generation(), engine.key())?;
    c.into_stream().map_err(unreachable)
}

impl EngineQueue {
    /// Queues request `req` of I/O `io` on replica `replica`'s connection, the
    /// write's data sent straight from the I/O's buffer.
    pub(super) fn send_wire(&mut self, replica: usize, req: ReqId, io: IoId, request: IoRequest) {
        let op = match request.kind {
            IoKind::Read => Op::Read,
            IoKind::Write => Op::Write,
            IoKind::Flush => Op::Flush,
            IoKind::Discard => Op::Discard,
            IoKind::WriteZeroes => Op::WriteZeroes,
        };
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

    pub(super) fn on_send(&mut self, c: usize, res: i32) {
        let conn = &mut self.conns[c];
        debug_assert!(
            conn.raw_in_flight > 0,
            "replica {c}: a send completed that was never posted"
        );
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

    /// Posts the connection's next receive:
    /// - between replies, into `rx`: as much as fits while no read is outstanding
    ///   (replies to writes are bare headers, many to a receive), one header's worth
    ///   otherwise, so that read data never lands in `rx`;
    /// - within a payload, one `recvmsg` of the rest of it (read data straight into
    ///   the I/O's buffer) followed by the next header into `rx`.
    pub(super) fn post_recv(&mut self, c: usize) {
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

    pub(super) fn on_recv(&mut self, c: usize, res: i32) {
        debug_assert!(
            self.conns[c].raw_in_flight > 0,
            "replica {c}: a receive completed that was never posted"
        );
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

    pub(super) fn close_conn(&mut self, c: usize) {
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
}
