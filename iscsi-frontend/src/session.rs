//! `FullFeature`: one iSCSI connection in its full feature phase, on one io_uring
//! that carries the initiator's socket, this connection's engine queue (its own
//! connections to every replica, or a hosted replica's file I/O) and the SCSI
//! commands in flight as futures. A command goes from the initiator's socket to the
//! replicas and back on one thread.
//!
//! The loop: push what is ready (the engine queue's entries, a receive, a send of
//! the [`Outbox`]), wait ([`horn_uring::Waiter`]), reap and route each completion
//! to its owner (the engine queue, or this connection's receive and send), parse the
//! PDUs received and hand them to their handlers ([`Tasks`] for SCSI commands,
//! data-out and task management), poll the commands.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;

use horn_engine::frontend::QueueVolume;
use horn_engine::{EngineQueue, Token};
use horn_uring::{Ring, Route};
use io_uring::{opcode, types};

use crate::login::Negotiated;
use crate::outbox::{Outbox, Sent, Seq};
use crate::pdu::{self, op, reject, Bhs, Digests, RESERVED_TAG};
use crate::scsi::{Lun, Nexus};
use crate::target::Target;
use crate::task::Tasks;
use crate::text::{self, Params};

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

/// Result alias for a connection.
pub(crate) type Result<T, E = ConnError> = std::result::Result<T, E>;

/// A protocol error saying `why`.
pub(crate) fn protocol(why: impl Into<String>) -> ConnError {
    ConnError::Protocol(why.into())
}

/// A session in its full feature phase.
pub(crate) struct FullFeature {
    target: Arc<Target>,
    sock: TcpStream,
    ring: Ring,
    waiter: horn_uring::Waiter,
    volume: QueueVolume,
    tasks: Tasks,
    out: Outbox,
    params: Params,
    digests: Digests,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    recv_posted: bool,
    closing: bool,
}

impl FullFeature {
    /// Sets up the ring and the engine queue of a session that has just logged in.
    pub(crate) fn new(target: Arc<Target>, sock: TcpStream, seq: Seq, n: Negotiated) -> Result<FullFeature> {
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
        let digests = Digests {
            header: n.params.header_digest,
            data: n.params.data_digest,
        };
        Ok(FullFeature {
            target,
            sock,
            ring,
            waiter: Default::default(),
            volume,
            tasks: Tasks::new(lun, Rc::new(nexus)),
            out: Outbox::new(seq, digests),
            digests,
            params: n.params,
            rx: vec![0; rx_len.max(1 << 20)],
            rx_start: 0,
            rx_end: 0,
            recv_posted: false,
            closing: false,
        })
    }

    /// Serves the session until the initiator logs out or the connection drops, then
    /// waits for everything in flight.
    pub(crate) fn run(mut self) -> Result<()> {
        let result = self.serve();
        self.teardown();
        result
    }

    fn serve(&mut self) -> Result<()> {
        loop {
            self.push_entries()?;
            if self.closing && self.out.is_idle() {
                return Ok(());
            }
            self.wait()?;
            self.reap()?;
            self.tasks.poll(&mut self.out, &self.params);
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
        if let Some(e) = self.out.start_send(self.sock.as_raw_fd(), SEND) {
            self.push(&e)?;
        }
        // No submit here: the wait that follows submits and waits in one call.
        Ok(())
    }

    fn wait(&mut self) -> Result<()> {
        let (deadline, idle) = self.volume.with_queue(|q| (q.next_deadline(), q.pending() == 0));
        let idle = idle && !self.out.is_sending();
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
                        self.out.clear();
                        continue;
                    }
                    self.rx_end += res as usize;
                    self.parse()?;
                }
                SEND => match self.out.on_send(res, self.sock.as_raw_fd(), SEND) {
                    Sent::Done => {}
                    Sent::More(e) => self.push(&e)?,
                    Sent::Failed => {
                        self.closing = true;
                        self.out.clear();
                    }
                },
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

    /// Checks and advances CmdSN for a non-immediate request; false: drop it.
    fn in_window(&mut self, bhs: &Bhs) -> bool {
        if bhs.immediate() {
            return true;
        }
        let sn = bhs.cmd_sn();
        if sn == self.out.seq.exp_cmd_sn {
            self.out.seq.exp_cmd_sn = sn.wrapping_add(1);
            return true;
        }
        tracing::warn!(
            cmd_sn = sn,
            expected = self.out.seq.exp_cmd_sn,
            "command outside the CmdSN order; dropped"
        );
        false
    }

    fn handle(&mut self, bhs: Bhs, data: &[u8]) -> Result<()> {
        if bhs.ahs_len() > 0 && bhs.opcode() != op::SCSI_CMD {
            self.out.reject(&bhs, reject::PROTOCOL);
            return Ok(());
        }
        match bhs.opcode() {
            op::SCSI_CMD => {
                if self.in_window(&bhs) {
                    self.tasks.command(&mut self.out, &self.params, &bhs, data);
                }
            }
            op::DATA_OUT => {
                self.tasks.data_out(&mut self.out, &self.params, &bhs, data);
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
                    self.out.seq.stamp(&mut r, true);
                    self.out.send(&r, data);
                }
            }
            op::TEXT => {
                if !self.in_window(&bhs) {
                    return Ok(());
                }
                let Ok(reply) = text::reply(&self.target.info.name, &self.target.info.address, data) else {
                    self.out.reject(&bhs, reject::INVALID_FIELD);
                    return Ok(());
                };
                let mut r = Bhs::new(op::TEXT_RESP, 0x80);
                r.set_u32(16, bhs.itt()).set_u32(20, RESERVED_TAG);
                self.out.seq.stamp(&mut r, true);
                self.out.send(&r, &reply);
            }
            op::LOGOUT => {
                self.in_window(&bhs);
                let mut r = Bhs::new(op::LOGOUT_RESP, 0x80);
                r.set_u32(16, bhs.itt());
                self.out.seq.stamp(&mut r, true);
                self.out.send(&r, &[]);
                self.closing = true;
            }
            op::TASK_MGMT => {
                // TARGET COLD RESET closes the connection once answered.
                if self.in_window(&bhs) && self.tasks.task_mgmt(&mut self.out, &bhs) {
                    self.closing = true;
                }
            }
            op::LOGIN => self.out.reject(&bhs, reject::PROTOCOL),
            op::SNACK => self.out.reject(&bhs, reject::NOT_SUPPORTED),
            _ => self.out.reject(&bhs, reject::NOT_SUPPORTED),
        }
        Ok(())
    }

    /// Drops the tasks, and waits until the kernel is done with every entry.
    fn teardown(&mut self) {
        let nexus = self.tasks.nexus().clone();
        self.target.lun.leave(&nexus);
        // A RESERVE(6) reservation ends with its I_T nexus.
        {
            let mut r = self.target.lun.reservations.lock().unwrap();
            if r.reserve6.as_ref() == Some(&nexus) {
                r.reserve6 = None;
            }
        }
        self.closing = true;
        self.out.clear();
        self.tasks.clear();
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        // Futures dropped with I/O in flight leave it to finish in the queue.
        for _ in 0..10_000 {
            let busy = self.volume.pending() > 0 || self.recv_posted || self.out.is_sending();
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
                    SEND => self.out.forget_send(),
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
