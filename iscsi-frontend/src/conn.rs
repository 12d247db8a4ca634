//! One iSCSI connection: login and discovery with plain blocking socket calls, then
//! the full feature phase on one io_uring that carries the initiator's socket, this
//! connection's engine queue (its own connections to every replica) and the SCSI
//! commands in flight as futures. A command goes from the initiator's socket to the
//! replicas' sockets and back on one thread.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use horn_engine::frontend::QueueVolume;
use horn_engine::{EngineQueue, Token};
use horn_uring::{IoBuf, Ring, Route};
use io_uring::{opcode, types};

use crate::login::{Login, Negotiated, Outcome, SessionType};
use crate::pdu::{self, op, reject, Bhs, Digests, BHS_LEN, RESERVED_TAG};
use crate::scsi::{self, Command, Lun, Nexus, Response};
use crate::target::Target;
use crate::text::{self, Params};

/// Commands the initiator may have outstanding (the CmdSN window).
const WINDOW: u32 = 128;
/// Largest expected data transfer accepted for one command.
const MAX_TRANSFER: u32 = 16 << 20;
/// Most bytes of write buffers a connection keeps for data still to come.
const MAX_WAITING_DATA: usize = 64 << 20;
/// The ring's two owners: the engine queue (its tokens are the user data as they
/// are) and this connection's own socket entries.
const ENGINE: Route = Route(0);
const OWN: Route = Route(1);
/// The connection's receive and send, under [`OWN`].
const RECV: u64 = OWN.user_data(1);
const SEND: u64 = OWN.user_data(2);

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Socket error.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The initiator broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The engine could not be used.
    #[error("engine: {0}")]
    Engine(#[from] horn_engine::VolumeError),
}

type Result<T, E = ConnError> = std::result::Result<T, E>;

fn protocol(why: impl Into<String>) -> ConnError {
    ConnError::Protocol(why.into())
}

/// Reads one PDU with blocking calls (login and discovery).
fn read_pdu(sock: &mut TcpStream, digests: Digests, max: usize) -> Result<(Bhs, Vec<u8>)> {
    let mut buf = vec![0u8; BHS_LEN];
    sock.read_exact(&mut buf)?;
    loop {
        match pdu::parse(&buf, digests, max).map_err(|e| protocol(e.to_string()))? {
            Some(f) => return Ok((f.bhs, buf[f.data].to_vec())),
            None => {
                // Work out how much more the PDU needs, from its header.
                let bhs = Bhs(buf[..BHS_LEN].try_into().unwrap());
                let dl = bhs.data_len();
                let total = BHS_LEN
                    + bhs.ahs_len()
                    + if digests.header { 4 } else { 0 }
                    + dl
                    + pdu::pad(dl)
                    + if digests.data && dl > 0 { 4 } else { 0 };
                let have = buf.len();
                buf.resize(total, 0);
                sock.read_exact(&mut buf[have..])?;
            }
        }
    }
}

fn write_pdu(sock: &mut TcpStream, bhs: &Bhs, data: &[u8], digests: Digests) -> Result<()> {
    let mut out = Vec::with_capacity(BHS_LEN + data.len() + 8);
    pdu::encode(&mut out, bhs, data, digests);
    sock.write_all(&out)?;
    Ok(())
}

/// Sequence numbers of a session (one connection per session).
#[derive(Debug, Clone, Copy)]
struct Seq {
    stat_sn: u32,
    exp_cmd_sn: u32,
}

impl Seq {
    fn max_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn.wrapping_add(WINDOW - 1)
    }
    /// Fills StatSN (taking a new one if `advance`), ExpCmdSN and MaxCmdSN.
    fn stamp(&mut self, bhs: &mut Bhs, advance: bool) {
        bhs.set_u32(24, self.stat_sn);
        if advance {
            self.stat_sn = self.stat_sn.wrapping_add(1);
        }
        bhs.set_u32(28, self.exp_cmd_sn);
        bhs.set_u32(32, self.max_cmd_sn());
    }
}

/// The answer to a Text request: SendTargets answered, other keys NotUnderstood.
fn text_reply(target: &Target, data: &[u8]) -> Result<Vec<u8>, text::TextError> {
    let mut out = Vec::new();
    for (k, v) in text::parse(data)? {
        if k == "SendTargets" {
            out.extend(send_targets(target, &v));
        } else {
            out.extend(text::encode(&[(k, "NotUnderstood".into())]));
        }
    }
    Ok(out)
}

/// SendTargets' answer.
fn send_targets(target: &Target, value: &str) -> Vec<u8> {
    let name = &target.info.name;
    if value == "All" || value == *name || value.is_empty() {
        text::encode(&[
            ("TargetName".into(), name.clone()),
            ("TargetAddress".into(), format!("{},1", target.info.address)),
        ])
    } else {
        Vec::new()
    }
}

/// Serves one connection until the initiator logs out or it drops.
pub fn serve(target: Arc<Target>, mut sock: TcpStream) -> Result<()> {
    sock.set_nodelay(true)?;
    // Login may not take forever.
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut login = Login::new(target.info.clone());
    let mut seq = Seq {
        stat_sn: rand::random::<u32>() >> 8,
        exp_cmd_sn: 0,
    };
    let negotiated = loop {
        let (req, data) = read_pdu(&mut sock, Digests::default(), 64 * 1024)?;
        if req.opcode() == op::LOGIN {
            seq.exp_cmd_sn = req.cmd_sn();
        }
        let step = login.step(&req, &data, target.new_tsih());
        let mut bhs = step.bhs;
        seq.stamp(&mut bhs, true);
        write_pdu(&mut sock, &bhs, &step.data, Digests::default())?;
        match step.outcome {
            Outcome::Continue => {}
            Outcome::Failed => return Ok(()),
            Outcome::Complete(n) => break *n,
        }
    };
    sock.set_read_timeout(None)?;
    let digests = Digests {
        header: negotiated.params.header_digest,
        data: negotiated.params.data_digest,
    };
    tracing::info!(
        initiator = %negotiated.initiator,
        session = ?negotiated.session_type,
        header_digest = digests.header,
        data_digest = digests.data,
        "iSCSI login"
    );
    match negotiated.session_type {
        SessionType::Discovery => discovery(&target, sock, seq, digests, &negotiated.params),
        SessionType::Normal => {
            let _session = target.sessions.enter(&negotiated);
            FullFeature::new(target.clone(), sock, seq, negotiated)?.run()
        }
    }
}

fn discovery(
    target: &Target,
    mut sock: TcpStream,
    mut seq: Seq,
    digests: Digests,
    params: &Params,
) -> Result<()> {
    loop {
        let (req, data) = read_pdu(&mut sock, digests, params.target_max_recv as usize)?;
        if !req.immediate() && matches!(req.opcode(), op::TEXT | op::NOP_OUT | op::LOGOUT) {
            seq.exp_cmd_sn = req.cmd_sn().wrapping_add(1);
        }
        match req.opcode() {
            op::TEXT => {
                let out = text_reply(target, &data).map_err(|e| protocol(e.to_string()))?;
                let mut bhs = Bhs::new(op::TEXT_RESP, 0x80);
                bhs.set_u32(16, req.itt()).set_u32(20, RESERVED_TAG);
                seq.stamp(&mut bhs, true);
                write_pdu(&mut sock, &bhs, &out, digests)?;
            }
            op::NOP_OUT if req.itt() != RESERVED_TAG => {
                let mut bhs = Bhs::new(op::NOP_IN, 0x80);
                bhs.set_u64(8, req.lun())
                    .set_u32(16, req.itt())
                    .set_u32(20, RESERVED_TAG);
                seq.stamp(&mut bhs, true);
                write_pdu(&mut sock, &bhs, &data, digests)?;
            }
            op::NOP_OUT => {}
            op::LOGOUT => {
                let mut bhs = Bhs::new(op::LOGOUT_RESP, 0x80);
                bhs.set_u32(16, req.itt());
                seq.stamp(&mut bhs, true);
                write_pdu(&mut sock, &bhs, &[], digests)?;
                return Ok(());
            }
            _ => {
                let mut bhs = Bhs::new(op::REJECT, 0x80);
                bhs.0[2] = reject::PROTOCOL;
                bhs.set_u32(16, RESERVED_TAG);
                seq.stamp(&mut bhs, true);
                write_pdu(&mut sock, &bhs, &req.0, digests)?;
            }
        }
    }
}

/// Bytes to send: a header part and, for Data-In, a range of a shared buffer.
struct Out {
    head: Vec<u8>,
    data: Option<(Rc<IoBuf>, std::ops::Range<usize>)>,
    tail: Vec<u8>,
}

/// A write waiting for its data.
struct Transfer {
    cdb: [u8; 16],
    lun: u64,
    buf: IoBuf,
    received: usize,
    /// End of the data asked for by R2Ts so far.
    solicited: usize,
    /// R2Ts whose data has not all arrived.
    outstanding: u32,
    r2t_sn: u32,
    ttt: u32,
    /// Data-Out without R2T is allowed up to here.
    unsolicited_end: usize,
    /// DataSN expected next (from 0 in each sequence).
    data_sn: u32,
}

struct Task {
    itt: u32,
    edtl: u32,
    /// The data-out length the CDB asks for, for the residual.
    out_len: Option<u64>,
    future: Pin<Box<dyn Future<Output = Response>>>,
}

struct FullFeature {
    target: Arc<Target>,
    sock: TcpStream,
    ring: Ring,
    waiter: horn_uring::Waiter,
    volume: QueueVolume,
    lun: Rc<Lun<QueueVolume>>,
    nexus: Rc<Nexus>,
    seq: Seq,
    params: Params,
    digests: Digests,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    recv_posted: bool,
    queue: VecDeque<Out>,
    sending: Option<Sending>,
    tasks: Vec<Task>,
    transfers: HashMap<u32, Transfer>,
    next_ttt: u32,
    closing: bool,
}

struct Sending {
    /// Kept until the send completes: the iovecs point into them.
    _outs: Vec<Out>,
    iov: Vec<libc::iovec>,
    msg: Box<libc::msghdr>,
    /// Bytes of `outs` already sent by earlier partial sends.
    done: usize,
}

impl FullFeature {
    fn new(target: Arc<Target>, sock: TcpStream, seq: Seq, n: Negotiated) -> Result<FullFeature> {
        let mut ring = Ring::for_thread(256)?;
        ring.enable()?;
        let queue = EngineQueue::open(&target.engine)?;
        let wake = queue.waker();
        let volume = QueueVolume::new(queue);
        let lun = Rc::new(Lun {
            info: target.lun.clone(),
            volume: volume.clone(),
            wake: Arc::new(wake),
        });
        let rx_len = (n.params.target_max_recv as usize + 4096) * 4;
        let nexus = Nexus {
            initiator: n.initiator.clone(),
            isid: n.isid,
        };
        target.lun.join(&nexus);
        Ok(FullFeature {
            target,
            sock,
            ring,
            waiter: Default::default(),
            volume,
            lun,
            nexus: Rc::new(nexus),
            seq,
            digests: Digests {
                header: n.params.header_digest,
                data: n.params.data_digest,
            },
            params: n.params,
            rx: vec![0; rx_len.max(1 << 20)],
            rx_start: 0,
            rx_end: 0,
            recv_posted: false,
            queue: VecDeque::new(),
            sending: None,
            tasks: Vec::new(),
            transfers: HashMap::new(),
            next_ttt: 1,
            closing: false,
        })
    }

    fn run(mut self) -> Result<()> {
        let result = self.serve();
        self.teardown();
        result
    }

    fn serve(&mut self) -> Result<()> {
        loop {
            self.push_entries()?;
            if self.closing && self.queue.is_empty() && self.sending.is_none() {
                return Ok(());
            }
            self.wait()?;
            self.reap()?;
            self.poll_tasks();
        }
    }

    fn push(&mut self, e: &io_uring::squeue::Entry) -> Result<()> {
        // SAFETY: every entry's memory (the receive buffer, the send's iovecs,
        // message header and buffers) stays in place until its completion is
        // reaped: `rx` is not resized, `sending` is kept until its completion, and
        // teardown waits for everything.
        Ok(unsafe { self.ring.push(e) }?)
    }

    fn push_entries(&mut self) -> Result<()> {
        let ring = &mut self.ring;
        // SAFETY: the engine queue keeps its entries' memory valid until their
        // completions are handed back, and teardown waits for every one.
        self.volume
            .with_queue(|q| unsafe { ring.push_all(q.entries()) })?;
        if !self.recv_posted && !self.closing {
            if self.rx_end == self.rx.len() {
                // Compact: the unparsed tail moves to the front.
                self.rx.copy_within(self.rx_start..self.rx_end, 0);
                self.rx_end -= self.rx_start;
                self.rx_start = 0;
            }
            if self.rx_end == self.rx.len() {
                return Err(protocol("a PDU larger than the receive buffer"));
            }
            let e = opcode::Recv::new(
                types::Fd(self.sock.as_raw_fd()),
                self.rx[self.rx_end..].as_mut_ptr(),
                (self.rx.len() - self.rx_end) as u32,
            )
            .build()
            .user_data(RECV);
            self.push(&e)?;
            self.recv_posted = true;
        }
        if self.sending.is_none() && !self.queue.is_empty() {
            let outs: Vec<Out> = self.queue.drain(..).collect();
            let mut iov = Vec::with_capacity(outs.len() * 3);
            for o in &outs {
                iov.push(iovec(&o.head));
                if let Some((b, r)) = &o.data {
                    iov.push(iovec(&b.as_slice()[r.clone()]));
                }
                if !o.tail.is_empty() {
                    iov.push(iovec(&o.tail));
                }
            }
            let mut s = Sending {
                _outs: outs,
                iov,
                // SAFETY: msghdr is plain data; all-zero is a valid empty header.
                msg: Box::new(unsafe { std::mem::zeroed() }),
                done: 0,
            };
            self.arm_send(&mut s)?;
            self.sending = Some(s);
        }
        // No submit here: the wait that follows submits and waits in one call.
        Ok(())
    }

    fn arm_send(&mut self, s: &mut Sending) -> Result<()> {
        // Skip what earlier partial sends already sent.
        let mut skip = s.done;
        let mut first = 0;
        while first < s.iov.len() && skip >= s.iov[first].iov_len {
            skip -= s.iov[first].iov_len;
            first += 1;
        }
        s.iov.drain(..first);
        if skip > 0 {
            // SAFETY: `skip` is within the first iovec, which points into a live buffer.
            s.iov[0].iov_base = unsafe { (s.iov[0].iov_base as *mut u8).add(skip) }.cast();
            s.iov[0].iov_len -= skip;
        }
        s.done = 0;
        s.msg.msg_iov = s.iov.as_mut_ptr();
        s.msg.msg_iovlen = s.iov.len().min(1024) as _;
        let e = opcode::SendMsg::new(types::Fd(self.sock.as_raw_fd()), &*s.msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(SEND);
        self.push(&e)
    }

    fn wait(&mut self) -> Result<()> {
        let (deadline, idle) = self.volume.with_queue(|q| (q.next_deadline(), q.pending() == 0));
        let idle = idle && self.sending.is_none();
        Ok(self.waiter.wait(&mut self.ring, deadline, idle)?)
    }

    fn reap(&mut self) -> Result<()> {
        let done = self.ring.reap();
        for &c in &done {
            let res = c.result;
            if c.route() == ENGINE {
                self.volume.with_queue(|q| q.complete(Token(c.token()), res));
                continue;
            }
            match c.user_data {
                RECV => {
                    self.recv_posted = false;
                    if res <= 0 {
                        if res < 0 && res != -libc::ECONNRESET {
                            tracing::warn!(error = %std::io::Error::from_raw_os_error(-res), "iSCSI receive failed");
                        }
                        self.closing = true;
                        self.queue.clear();
                        continue;
                    }
                    self.rx_end += res as usize;
                    self.parse()?;
                }
                SEND => {
                    let mut s = self.sending.take().expect("a send completion with no send");
                    if res < 0 {
                        self.closing = true;
                        self.queue.clear();
                        continue;
                    }
                    let total: usize = s.iov.iter().take(s.msg.msg_iovlen).map(|v| v.iov_len).sum();
                    if (res as usize) < total || s.iov.len() > s.msg.msg_iovlen {
                        s.done = res as usize;
                        self.arm_send(&mut s)?;
                        self.sending = Some(s);
                    }
                }
                other => tracing::error!(user_data = other, "a completion this connection never asked for"),
            }
        }
        self.ring.recycle(done);
        self.engine_round();
        Ok(())
    }

    /// After the engine queue's completions: its timeouts, then the futures woken.
    fn engine_round(&mut self) {
        self.volume.with_queue(|q| q.tick());
        self.volume.dispatch();
    }

    fn parse(&mut self) -> Result<()> {
        // The receive buffer is lent out while its PDUs are handled (no receive is
        // posted meanwhile), so that their data is copied once, straight to where it
        // goes.
        let rx = std::mem::take(&mut self.rx);
        let result = self.parse_from(&rx);
        self.rx = rx;
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        }
        result
    }

    fn parse_from(&mut self, rx: &[u8]) -> Result<()> {
        loop {
            let buf = &rx[self.rx_start..self.rx_end];
            let frame = match pdu::parse(buf, self.digests, self.params.target_max_recv as usize) {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, "closing the connection");
                    return Err(protocol(e.to_string()));
                }
            };
            let data = &buf[frame.data.clone()];
            self.rx_start += frame.len;
            self.handle(frame.bhs, data)?;
            if self.closing {
                return Ok(());
            }
        }
    }

    fn send(&mut self, bhs: &Bhs, data: &[u8]) {
        let mut head = Vec::with_capacity(BHS_LEN + data.len() + 8);
        pdu::encode(&mut head, bhs, data, self.digests);
        self.queue.push_back(Out {
            head,
            data: None,
            tail: Vec::new(),
        });
    }

    fn reject(&mut self, bhs: &Bhs, reason: u8) {
        let mut r = Bhs::new(op::REJECT, 0x80);
        r.0[2] = reason;
        r.set_u32(16, RESERVED_TAG);
        self.seq.stamp(&mut r, true);
        let data = bhs.0;
        self.send(&r, &data);
    }

    /// Checks and advances CmdSN for a non-immediate request; false: drop it.
    fn in_window(&mut self, bhs: &Bhs) -> bool {
        if bhs.immediate() {
            return true;
        }
        let sn = bhs.cmd_sn();
        if sn == self.seq.exp_cmd_sn {
            self.seq.exp_cmd_sn = sn.wrapping_add(1);
            return true;
        }
        tracing::warn!(
            cmd_sn = sn,
            expected = self.seq.exp_cmd_sn,
            "command outside the CmdSN order; dropped"
        );
        false
    }

    fn handle(&mut self, bhs: Bhs, data: &[u8]) -> Result<()> {
        if bhs.ahs_len() > 0 && bhs.opcode() != op::SCSI_CMD {
            self.reject(&bhs, reject::PROTOCOL);
            return Ok(());
        }
        match bhs.opcode() {
            op::SCSI_CMD => {
                if self.in_window(&bhs) {
                    self.command(&bhs, data);
                }
            }
            op::DATA_OUT => {
                self.data_out(&bhs, data);
            }
            op::NOP_OUT => {
                if !self.in_window(&bhs) {
                    return Ok(());
                }
                if bhs.itt() != RESERVED_TAG {
                    let mut r = Bhs::new(op::NOP_IN, 0x80);
                    r.set_u64(8, bhs.lun())
                        .set_u32(16, bhs.itt())
                        .set_u32(20, RESERVED_TAG);
                    self.seq.stamp(&mut r, true);
                    self.send(&r, data);
                }
            }
            op::TEXT => {
                if !self.in_window(&bhs) {
                    return Ok(());
                }
                let Ok(out) = text_reply(&self.target, data) else {
                    self.reject(&bhs, reject::INVALID_FIELD);
                    return Ok(());
                };
                let mut r = Bhs::new(op::TEXT_RESP, 0x80);
                r.set_u32(16, bhs.itt()).set_u32(20, RESERVED_TAG);
                self.seq.stamp(&mut r, true);
                self.send(&r, &out);
            }
            op::LOGOUT => {
                self.in_window(&bhs);
                let mut r = Bhs::new(op::LOGOUT_RESP, 0x80);
                r.set_u32(16, bhs.itt());
                self.seq.stamp(&mut r, true);
                self.send(&r, &[]);
                self.closing = true;
            }
            op::TASK_MGMT => {
                if self.in_window(&bhs) {
                    self.task_mgmt(&bhs);
                }
            }
            op::LOGIN => self.reject(&bhs, reject::PROTOCOL),
            op::SNACK => self.reject(&bhs, reject::NOT_SUPPORTED),
            _ => self.reject(&bhs, reject::NOT_SUPPORTED),
        }
        Ok(())
    }

    fn command(&mut self, bhs: &Bhs, data: &[u8]) {
        let flags = bhs.flags();
        let write = flags & 0x20 != 0;
        let edtl = bhs.u32_at(20);
        let itt = bhs.itt();
        let lun = bhs.lun();
        let mut cdb = [0u8; 16];
        cdb.copy_from_slice(&bhs.0[32..48]);
        if lun != 0 && cdb[0] != 0xa0 && cdb[0] != 0x12 {
            self.respond(
                itt,
                edtl,
                None,
                scsi::Response::check(scsi::Sense::LUN_NOT_SUPPORTED),
            );
            return;
        }
        if !data.is_empty() && (!write || !self.params.immediate_data || data.len() > edtl as usize) {
            self.reject(bhs, reject::PROTOCOL);
            return;
        }
        if write && edtl > 0 {
            if edtl > MAX_TRANSFER {
                self.respond(
                    itt,
                    edtl,
                    None,
                    scsi::Response::check(scsi::Sense::INVALID_FIELD_IN_CDB),
                );
                return;
            }
            // Writes waiting for their data hold buffers: past a bound, new ones are
            // turned away with TASK SET FULL, so an initiator cannot make the target
            // allocate without limit. (A write whose data all came with it waits for
            // nothing, and is not counted.)
            let waits = data.len() < edtl as usize;
            if waits
                && self.transfers.values().map(|t| t.buf.len()).sum::<usize>() + edtl as usize
                    > MAX_WAITING_DATA
            {
                self.respond(
                    itt,
                    edtl,
                    None,
                    scsi::Response::status(scsi::status::TASK_SET_FULL),
                );
                return;
            }
            let mut buf = IoBuf::zeroed(edtl as usize);
            buf.as_mut_slice()[..data.len()].copy_from_slice(data);
            let unsolicited_end = if self.params.initial_r2t || flags & 0x80 != 0 {
                data.len()
            } else {
                (self.params.first_burst as usize).min(edtl as usize)
            };
            let ttt = self.next_ttt;
            self.next_ttt = self.next_ttt.wrapping_add(1).max(1);
            let t = Transfer {
                cdb,
                lun,
                buf,
                received: data.len(),
                solicited: unsolicited_end.max(data.len()),
                outstanding: 0,
                r2t_sn: 0,
                ttt,
                unsolicited_end,
                data_sn: 0,
            };
            if t.received == edtl as usize {
                self.start(itt, edtl, cdb, Some(t.buf));
            } else {
                self.transfers.insert(itt, t);
                self.solicit(itt);
            }
            return;
        }
        self.start(itt, edtl, cdb, None);
    }

    /// Sends R2Ts for `itt` up to MaxOutstandingR2T.
    fn solicit(&mut self, itt: u32) {
        let (max_burst, max_r2t) = (self.params.max_burst as usize, self.params.max_outstanding_r2t);
        let Some(t) = self.transfers.get_mut(&itt) else {
            return;
        };
        let mut r2ts = Vec::new();
        while t.outstanding < max_r2t && t.solicited < t.buf.len() {
            let len = (t.buf.len() - t.solicited).min(max_burst);
            let mut r = Bhs::new(op::R2T, 0x80);
            r.set_u64(8, t.lun)
                .set_u32(16, itt)
                .set_u32(20, t.ttt)
                .set_u32(36, t.r2t_sn)
                .set_u32(40, t.solicited as u32)
                .set_u32(44, len as u32);
            t.r2t_sn += 1;
            t.solicited += len;
            t.outstanding += 1;
            r2ts.push(r);
        }
        for mut r in r2ts {
            self.seq.stamp(&mut r, false);
            self.send(&r, &[]);
        }
    }

    fn data_out(&mut self, bhs: &Bhs, data: &[u8]) {
        let itt = bhs.itt();
        let ttt = bhs.u32_at(20);
        let offset = bhs.u32_at(40) as usize;
        let Some(t) = self.transfers.get_mut(&itt) else {
            // Data for a task that was aborted, or never was.
            tracing::debug!(itt, "Data-Out for no task");
            return;
        };
        if bhs.u32_at(36) != t.data_sn {
            // ERL 0 cannot recover a lost Data-Out: the command fails.
            tracing::warn!(
                itt,
                got = bhs.u32_at(36),
                expected = t.data_sn,
                "Data-Out out of DataSN order"
            );
            let t = self.transfers.remove(&itt).unwrap();
            let edtl = t.buf.len() as u32;
            let resp = Response::check(scsi::Sense::DATA_PHASE_ERROR);
            self.respond(itt, edtl, None, resp);
            return;
        }
        t.data_sn = if bhs.final_bit() { 0 } else { t.data_sn + 1 };
        let end = offset + data.len();
        let allowed = if ttt == RESERVED_TAG {
            t.unsolicited_end
        } else {
            t.solicited
        };
        if end > t.buf.len() || end > allowed || (ttt != RESERVED_TAG && ttt != t.ttt) {
            self.transfers.remove(&itt);
            self.reject(bhs, reject::INVALID_FIELD);
            return;
        }
        t.buf.as_mut_slice()[offset..end].copy_from_slice(data);
        t.received += data.len();
        if ttt != RESERVED_TAG && bhs.final_bit() {
            t.outstanding = t.outstanding.saturating_sub(1);
        }
        if t.received >= t.buf.len() {
            let t = self.transfers.remove(&itt).unwrap();
            let edtl = t.buf.len() as u32;
            self.start(itt, edtl, t.cdb, Some(t.buf));
        } else if bhs.final_bit() {
            // A solicited burst (or the unsolicited one) is complete: ask for more.
            self.solicit(itt);
        }
    }

    fn start(&mut self, itt: u32, edtl: u32, cdb: [u8; 16], data_out: Option<IoBuf>) {
        let out_len = scsi::data_out_len(&cdb, self.lun.info.block_size);
        let lun = self.lun.clone();
        let nexus = self.nexus.clone();
        let future = Box::pin(async move {
            lun.execute(Command {
                cdb: &cdb,
                data_out,
                nexus: &nexus,
            })
            .await
        });
        self.tasks.push(Task {
            itt,
            edtl,
            out_len,
            future,
        });
    }

    fn poll_tasks(&mut self) {
        let mut cx = Context::from_waker(Waker::noop());
        let mut i = 0;
        while i < self.tasks.len() {
            match self.tasks[i].future.as_mut().poll(&mut cx) {
                Poll::Ready(resp) => {
                    let t = self.tasks.swap_remove(i);
                    self.respond(t.itt, t.edtl, t.out_len, resp);
                }
                Poll::Pending => i += 1,
            }
        }
        // Futures woke by completions they caused themselves (a write after a read):
        // their new I/O is pushed on the next turn.
    }

    /// Sends a command's data-in and status. The residual compares the expected
    /// transfer length with the data-out the CDB asks for (`out_len`), or else with
    /// the data-in produced.
    fn respond(&mut self, itt: u32, edtl: u32, out_len: Option<u64>, resp: Response) {
        let (buf, len) = match resp.data {
            Some((b, n)) => (Some(b), n),
            None => (None, 0),
        };
        let send_len = len.min(edtl as usize);
        let moved = out_len.map_or(len, |l| l as usize);
        let (over, under) = (moved > edtl as usize, moved < edtl as usize);
        let residual = if over {
            moved - edtl as usize
        } else {
            edtl as usize - moved
        } as u32;
        let res_flags = if over {
            0x04
        } else if under {
            0x02
        } else {
            0
        };
        let mut data_sn = 0u32;
        let collapse = resp.status == scsi::status::GOOD && send_len > 0;
        if let Some(buf) = buf.filter(|_| send_len > 0) {
            let buf = Rc::new(buf);
            let seg = self.params.initiator_max_recv as usize;
            let burst = self.params.max_burst as usize;
            let mut off = 0;
            while off < send_len {
                let n = seg.min(send_len - off).min(burst - off % burst);
                let last = off + n == send_len;
                let end_of_burst = (off + n) % burst == 0;
                let mut b = Bhs::new(op::DATA_IN, 0);
                let mut flags = 0;
                if last || end_of_burst {
                    flags |= 0x80;
                }
                b.set_u32(16, itt).set_u32(20, RESERVED_TAG);
                b.set_u32(36, data_sn).set_u32(40, off as u32);
                if last && collapse {
                    flags |= 0x01 | res_flags;
                    b.0[3] = resp.status;
                    b.set_u32(44, residual);
                    self.seq.stamp(&mut b, true);
                } else {
                    self.seq.stamp(&mut b, false);
                    b.set_u32(24, 0);
                }
                b.0[1] = flags;
                self.send_data(&b, buf.clone(), off..off + n);
                data_sn += 1;
                off += n;
            }
            if collapse {
                return;
            }
        }
        let mut r = Bhs::new(op::SCSI_RESP, 0x80 | res_flags);
        r.0[2] = 0;
        r.0[3] = resp.status;
        r.set_u32(16, itt);
        self.seq.stamp(&mut r, true);
        r.set_u32(36, data_sn).set_u32(44, residual);
        let mut data = Vec::new();
        if !resp.sense.is_empty() {
            data.extend_from_slice(&(resp.sense.len() as u16).to_be_bytes());
            data.extend_from_slice(&resp.sense);
        }
        self.send(&r, &data);
    }

    fn send_data(&mut self, bhs: &Bhs, buf: Rc<IoBuf>, range: std::ops::Range<usize>) {
        let mut bhs = *bhs;
        let len = range.len();
        bhs.set_data_len(len);
        let mut head = bhs.0.to_vec();
        if self.digests.header {
            head.extend_from_slice(&pdu::digest(&[&bhs.0]));
        }
        let pad = pdu::pad(len);
        let mut tail = vec![0u8; pad];
        if self.digests.data {
            tail.extend_from_slice(&pdu::digest(&[&buf.as_slice()[range.clone()], &[0u8; 3][..pad]]));
        }
        self.queue.push_back(Out {
            head,
            data: Some((buf, range)),
            tail,
        });
    }

    fn task_mgmt(&mut self, bhs: &Bhs) {
        let function = bhs.flags() & 0x7f;
        let referenced = bhs.u32_at(20);
        let response = match function {
            // ABORT TASK
            1 => {
                let before = self.tasks.len() + self.transfers.len();
                self.tasks.retain(|t| t.itt != referenced);
                self.transfers.remove(&referenced);
                if self.tasks.len() + self.transfers.len() < before {
                    0
                } else {
                    // Already answered (or never seen): the function is complete.
                    0
                }
            }
            // ABORT TASK SET, CLEAR TASK SET, LUN RESET, TARGET WARM RESET
            2 | 4 | 5 | 6 => {
                self.tasks.clear();
                self.transfers.clear();
                if function == 5 || function == 6 {
                    self.target.lun.reservations.lock().unwrap().reserve6 = None;
                    self.target.lun.prevent.lock().unwrap().clear();
                    let sense = if function == 5 {
                        scsi::Sense::LUN_RESET_OCCURRED
                    } else {
                        scsi::Sense::RESET_OCCURRED
                    };
                    self.target.lun.reset(sense);
                }
                0
            }
            // TARGET COLD RESET: answered, then the connection is closed.
            7 => {
                self.tasks.clear();
                self.transfers.clear();
                self.target.lun.reservations.lock().unwrap().reserve6 = None;
                self.target.lun.prevent.lock().unwrap().clear();
                self.target.lun.reset(scsi::Sense::RESET_OCCURRED);
                self.closing = true;
                0
            }
            _ => 5,
        };
        let mut r = Bhs::new(op::TASK_MGMT_RESP, 0x80);
        r.0[2] = response;
        r.set_u32(16, bhs.itt());
        self.seq.stamp(&mut r, true);
        self.send(&r, &[]);
    }

    /// Drops the tasks, and waits until the kernel is done with every entry.
    fn teardown(&mut self) {
        self.target.lun.leave(&self.nexus);
        // A RESERVE(6) reservation ends with its I_T nexus.
        {
            let mut r = self.target.lun.reservations.lock().unwrap();
            if r.reserve6.as_ref() == Some(&*self.nexus) {
                r.reserve6 = None;
            }
        }
        self.closing = true;
        self.queue.clear();
        self.tasks.clear();
        self.transfers.clear();
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        // Futures dropped with I/O in flight leave it to finish in the queue.
        for _ in 0..10_000 {
            let busy = self.volume.pending() > 0 || self.recv_posted || self.sending.is_some();
            if !busy {
                break;
            }
            if self.push_entries().is_err() || self.wait().is_err() {
                break;
            }
            let done = self.ring.reap();
            for c in &done {
                match c.user_data {
                    _ if c.route() == ENGINE => {
                        self.volume.with_queue(|q| q.complete(Token(c.token()), c.result))
                    }
                    RECV => self.recv_posted = false,
                    SEND => self.sending = None,
                    _ => {}
                }
            }
            self.ring.recycle(done);
            self.engine_round();
        }
        self.volume.with_queue(|q| {
            q.shutdown();
        });
        while self.volume.with_queue(|q| q.raw_in_flight()) > 0 {
            let _ = self.push_entries();
            if self.ring.wait(None).is_err() {
                break;
            }
            let done = self.ring.reap();
            for c in done.iter().filter(|c| c.route() == ENGINE) {
                self.volume
                    .with_queue(|q| q.complete_after_shutdown(Token(c.token()), c.result));
            }
            self.ring.recycle(done);
        }
    }
}

fn iovec(b: &[u8]) -> libc::iovec {
    libc::iovec {
        iov_base: b.as_ptr() as *mut _,
        iov_len: b.len(),
    }
}
