//! `Outbox`: the PDUs a connection sends in its full feature phase, and `Seq`, the
//! session's sequence numbers that every response carries.
//!
//! PDUs queue up while completions are handled and leave together: one `sendmsg` of
//! everything queued, at most one in the kernel per connection. A read's Data-In is
//! sent straight from the buffer the replicas filled, in bursts the initiator's
//! limits allow, with the status collapsed into the last one where RFC 7143 lets it.

use std::collections::VecDeque;
use std::rc::Rc;

use horn_uring::IoBuf;
use io_uring::{opcode, squeue, types};

use crate::pdu::{self, op, Bhs, Digests, BHS_LEN, RESERVED_TAG};
use crate::scsi::{self, Response};
use crate::text::Params;

/// Commands the initiator may have outstanding (the CmdSN window).
const WINDOW: u32 = 128;
/// Most iovecs in one `sendmsg` (`IOV_MAX`).
const MAX_IOVECS: usize = 1024;

/// Sequence numbers of a session (one connection per session).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seq {
    /// The next StatSN to give a response.
    pub(crate) stat_sn: u32,
    /// The CmdSN expected next.
    pub(crate) exp_cmd_sn: u32,
}

impl Seq {
    fn max_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn.wrapping_add(WINDOW - 1)
    }

    /// Fills StatSN (taking a new one if `advance`), ExpCmdSN and MaxCmdSN.
    pub(crate) fn stamp(&mut self, bhs: &mut Bhs, advance: bool) {
        bhs.set_u32(24, self.stat_sn);
        if advance {
            self.stat_sn = self.stat_sn.wrapping_add(1);
        }
        bhs.set_u32(28, self.exp_cmd_sn);
        bhs.set_u32(32, self.max_cmd_sn());
    }
}

/// Bytes to send: a header part and, for Data-In, a range of a shared buffer.
struct Out {
    head: Vec<u8>,
    data: Option<(Rc<IoBuf>, std::ops::Range<usize>)>,
    tail: Vec<u8>,
}

/// The send in the kernel.
struct Sending {
    /// Kept until the send completes: the iovecs point into them.
    _outs: Vec<Out>,
    iov: Vec<libc::iovec>,
    msg: Box<libc::msghdr>,
}

/// What became of the send in the kernel.
pub(crate) enum Sent {
    /// All of it went out.
    Done,
    /// Part of it went out: push this entry for the rest.
    More(squeue::Entry),
    /// The socket failed.
    Failed,
}

/// The PDUs a connection has to send.
pub(crate) struct Outbox {
    /// The session's sequence numbers.
    pub(crate) seq: Seq,
    digests: Digests,
    queue: VecDeque<Out>,
    sending: Option<Sending>,
}

impl Outbox {
    /// An empty outbox for a session at `seq`, with the digests negotiated.
    pub(crate) fn new(seq: Seq, digests: Digests) -> Outbox {
        Outbox {
            seq,
            digests,
            queue: VecDeque::new(),
            sending: None,
        }
    }

    /// Nothing queued and no send in the kernel.
    pub(crate) fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.sending.is_none()
    }

    /// A send is in the kernel.
    pub(crate) fn is_sending(&self) -> bool {
        self.sending.is_some()
    }

    /// Drops what is queued: the connection is closing.
    pub(crate) fn clear(&mut self) {
        self.queue.clear();
    }

    /// Forgets the send in the kernel, whose completion has come (teardown).
    pub(crate) fn forget_send(&mut self) {
        self.sending = None;
    }

    /// Queues a PDU.
    pub(crate) fn send(&mut self, bhs: &Bhs, data: &[u8]) {
        let mut head = Vec::with_capacity(BHS_LEN + data.len() + 8);
        pdu::encode(&mut head, bhs, data, self.digests);
        self.queue.push_back(Out {
            head,
            data: None,
            tail: Vec::new(),
        });
    }

    /// Queues a Reject of `bhs` for `reason`.
    pub(crate) fn reject(&mut self, bhs: &Bhs, reason: u8) {
        let mut r = Bhs::new(op::REJECT, 0x80);
        r.0[2] = reason;
        r.set_u32(16, RESERVED_TAG);
        self.seq.stamp(&mut r, true);
        let data = bhs.0;
        self.send(&r, &data);
    }

    /// Queues a command's data-in and status. The residual compares the expected
    /// transfer length with the data-out the CDB asks for (`out_len`), or else with
    /// the data-in produced.
    pub(crate) fn respond(
        &mut self,
        params: &Params,
        itt: u32,
        edtl: u32,
        out_len: Option<u64>,
        resp: Response,
    ) {
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
            let seg = params.initiator_max_recv as usize;
            let burst = params.max_burst as usize;
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

    /// Queues a Data-In PDU whose data is `range` of `buf`, sent from where it is.
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

    /// If no send is in the kernel and PDUs are queued, makes one send of all of
    /// them on socket `fd` and returns its entry (with `user_data`) to push. The
    /// memory it names stays here until [`Outbox::on_send`] hears it completed.
    pub(crate) fn start_send(&mut self, fd: i32, user_data: u64) -> Option<squeue::Entry> {
        if self.sending.is_some() || self.queue.is_empty() {
            return None;
        }
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
        let s = self.sending.insert(Sending {
            _outs: outs,
            iov,
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            msg: Box::new(unsafe { std::mem::zeroed() }),
        });
        Some(arm(s, 0, fd, user_data))
    }

    /// The send in the kernel completed with `res`.
    pub(crate) fn on_send(&mut self, res: i32, fd: i32, user_data: u64) -> Sent {
        let s = self.sending.take().expect("a send completion with no send");
        if res < 0 {
            return Sent::Failed;
        }
        let total: usize = s.iov.iter().take(s.msg.msg_iovlen).map(|v| v.iov_len).sum();
        debug_assert!(res as usize <= total, "the kernel sent more than it was given");
        if (res as usize) < total || s.iov.len() > s.msg.msg_iovlen {
            let s = self.sending.insert(s);
            return Sent::More(arm(s, res as usize, fd, user_data));
        }
        Sent::Done
    }
}

/// Points `s`'s message past the `done` bytes earlier sends took, and makes the
/// entry that sends the rest.
fn arm(s: &mut Sending, done: usize, fd: i32, user_data: u64) -> squeue::Entry {
    let mut skip = done;
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
    s.msg.msg_iov = s.iov.as_mut_ptr();
    s.msg.msg_iovlen = s.iov.len().min(MAX_IOVECS) as _;
    opcode::SendMsg::new(types::Fd(fd), &*s.msg)
        .flags(libc::MSG_NOSIGNAL as u32)
        .build()
        .user_data(user_data)
}

fn iovec(b: &[u8]) -> libc::iovec {
    libc::iovec {
        iov_base: b.as_ptr() as *mut _,
        iov_len: b.len(),
    }
}
