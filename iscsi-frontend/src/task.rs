//! `Tasks`: the SCSI commands of one session, from their Command PDU to their status.
//!
//! A write whose data has not all come waits as a [`Transfer`], asking for the rest
//! with R2Ts (up to MaxOutstandingR2T, each at most MaxBurstLength) and checking
//! every Data-Out against what was asked; a command with its data runs as a future on
//! the LUN, polled after each batch of completions; Task Management Functions abort
//! and reset them. Answers go to the connection's [`Outbox`].

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use horn_engine::frontend::QueueVolume;
use horn_uring::IoBuf;

use crate::outbox::Outbox;
use crate::pdu::{op, reject, Bhs, RESERVED_TAG};
use crate::scsi::{self, Command, Lun, LunInfo, Nexus, Response};
use crate::text::Params;

/// Largest expected data transfer accepted for one command.
const MAX_TRANSFER: u32 = scsi::MAX_TRANSFER;
/// Most bytes of write buffers a connection keeps for data still to come.
const MAX_WAITING_DATA: usize = 64 << 20;
/// Most bytes of such buffers all the LUN's connections keep together.
const MAX_WAITING_DATA_TOTAL: usize = 256 << 20;

/// A share of the LUN's budget for write data still to come, given back when dropped
/// (the write has its data, or ended).
struct Reserved {
    info: Arc<LunInfo>,
    bytes: usize,
}

impl Reserved {
    /// `bytes` of the budget, if they fit under its cap.
    fn take(info: &Arc<LunInfo>, bytes: usize) -> Option<Reserved> {
        info.waiting_data
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                held.checked_add(bytes)
                    .filter(|&total| total <= MAX_WAITING_DATA_TOTAL)
            })
            .ok()
            .map(|_| Reserved {
                info: info.clone(),
                bytes,
            })
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.info.waiting_data.fetch_sub(self.bytes, Ordering::SeqCst);
    }
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
    /// Its share of the LUN's budget for waiting data (none when it waits for nothing).
    _reserved: Option<Reserved>,
}

/// A command running on the LUN.
struct Task {
    itt: u32,
    edtl: u32,
    /// The data-out length the CDB asks for, for the residual.
    out_len: Option<u64>,
    future: Pin<Box<dyn Future<Output = Response>>>,
}

/// The commands of one session.
pub(crate) struct Tasks {
    lun: Rc<Lun<QueueVolume>>,
    nexus: Rc<Nexus>,
    running: Vec<Task>,
    transfers: HashMap<u32, Transfer>,
    /// Tasks whose data transfer ended before all its data came (aborted, failed), the
    /// newest [`ENDED_KEPT`]: Data-Out still in flight for them is dropped quietly;
    /// Data-Out for any other unknown task gets a Reject.
    ended: VecDeque<u32>,
    next_ttt: u32,
}

/// How many ended transfers are remembered.
const ENDED_KEPT: usize = 256;

impl Tasks {
    /// No commands yet, for `nexus` on `lun`.
    pub(crate) fn new(lun: Rc<Lun<QueueVolume>>, nexus: Rc<Nexus>) -> Tasks {
        Tasks {
            lun,
            nexus,
            running: Vec::new(),
            transfers: HashMap::new(),
            ended: VecDeque::new(),
            next_ttt: 1,
        }
    }

    /// The I_T nexus the commands come from.
    pub(crate) fn nexus(&self) -> &Nexus {
        &self.nexus
    }

    /// Drops every command: the futures with I/O in flight leave it to finish in the
    /// engine queue.
    pub(crate) fn clear(&mut self) {
        self.running.clear();
        self.end_all_transfers();
    }

    /// A transfer ends before its data has all come: later Data-Out for it is dropped.
    fn end_transfer(&mut self, itt: u32) -> Option<Transfer> {
        let t = self.transfers.remove(&itt)?;
        if self.ended.len() == ENDED_KEPT {
            self.ended.pop_front();
        }
        self.ended.push_back(itt);
        Some(t)
    }

    fn end_all_transfers(&mut self) {
        let itts: Vec<u32> = self.transfers.keys().copied().collect();
        for itt in itts {
            self.end_transfer(itt);
        }
    }

    /// A SCSI Command PDU (`data`: its immediate data): answered at once, started, or
    /// held for its data-out.
    pub(crate) fn command(&mut self, out: &mut Outbox, params: &Params, bhs: &Bhs, data: &[u8]) {
        let flags = bhs.flags();
        let write = flags & 0x20 != 0;
        let edtl = bhs.u32_at(20);
        let itt = bhs.itt();
        let lun = bhs.lun();
        let mut cdb = [0u8; 16];
        cdb.copy_from_slice(&bhs.0[32..48]);
        // Only REPORT LUNS and INQUIRY answer for a LUN that does not exist.
        if lun != 0 && cdb[0] != scsi::opcode::REPORT_LUNS && cdb[0] != scsi::opcode::INQUIRY {
            out.respond(
                params,
                itt,
                edtl,
                None,
                scsi::Response::check(scsi::Sense::LUN_NOT_SUPPORTED),
            );
            return;
        }
        if !data.is_empty() && (!write || !params.immediate_data || data.len() > edtl as usize) {
            out.reject(bhs, reject::PROTOCOL);
            return;
        }
        if write && edtl > 0 {
            if edtl > MAX_TRANSFER {
                out.respond(
                    params,
                    itt,
                    edtl,
                    None,
                    scsi::Response::check(scsi::Sense::INVALID_FIELD_IN_CDB),
                );
                return;
            }
            // Writes waiting for their data hold buffers: past a bound per connection,
            // or past the LUN's across connections, new ones are turned away with TASK
            // SET FULL, so initiators cannot make the target allocate without limit. (A
            // write whose data all came with it waits for nothing, and is not counted.)
            let waits = data.len() < edtl as usize;
            let over_connection = waits
                && self.transfers.values().map(|t| t.buf.len()).sum::<usize>() + edtl as usize
                    > MAX_WAITING_DATA;
            let reserved = if waits && !over_connection {
                Reserved::take(&self.lun.info, edtl as usize)
            } else {
                None
            };
            if waits && reserved.is_none() {
                out.respond(
                    params,
                    itt,
                    edtl,
                    None,
                    scsi::Response::status(scsi::status::TASK_SET_FULL),
                );
                return;
            }
            let mut buf = IoBuf::zeroed(edtl as usize);
            buf.as_mut_slice()[..data.len()].copy_from_slice(data);
            let unsolicited_end = if params.initial_r2t || flags & 0x80 != 0 {
                data.len()
            } else {
                (params.first_burst as usize).min(edtl as usize)
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
                _reserved: reserved,
            };
            if t.received == edtl as usize {
                self.start(itt, edtl, cdb, Some(t.buf));
            } else {
                self.transfers.insert(itt, t);
                self.solicit(out, params, itt);
            }
            return;
        }
        self.start(itt, edtl, cdb, None);
    }

    /// Sends R2Ts for `itt` up to MaxOutstandingR2T.
    fn solicit(&mut self, out: &mut Outbox, params: &Params, itt: u32) {
        let (max_burst, max_r2t) = (params.max_burst as usize, params.max_outstanding_r2t);
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
            out.seq.stamp(&mut r, false);
            out.send(&r, &[]);
        }
    }

    /// A Data-Out PDU: the data lands in its write's buffer; a write with all its data
    /// starts.
    pub(crate) fn data_out(&mut self, out: &mut Outbox, params: &Params, bhs: &Bhs, data: &[u8]) {
        let itt = bhs.itt();
        let ttt = bhs.u32_at(20);
        let offset = bhs.u32_at(40) as usize;
        let Some(t) = self.transfers.get_mut(&itt) else {
            if self.ended.contains(&itt) {
                // Still in flight when its task ended (aborted, failed): dropped.
                tracing::debug!(itt, "Data-Out for a task that has ended");
            } else {
                tracing::debug!(itt, "Data-Out for no task; rejected");
                out.reject(bhs, reject::INVALID_FIELD);
            }
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
            let t = self.end_transfer(itt).expect("found above");
            let edtl = t.buf.len() as u32;
            let resp = Response::check(scsi::Sense::DATA_PHASE_ERROR);
            out.respond(params, itt, edtl, None, resp);
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
            self.end_transfer(itt);
            out.reject(bhs, reject::INVALID_FIELD);
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
            self.solicit(out, params, itt);
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
        self.running.push(Task {
            itt,
            edtl,
            out_len,
            future,
        });
    }

    /// Polls the running commands; those done are answered.
    pub(crate) fn poll(&mut self, out: &mut Outbox, params: &Params) {
        let mut cx = Context::from_waker(Waker::noop());
        let mut i = 0;
        while i < self.running.len() {
            match self.running[i].future.as_mut().poll(&mut cx) {
                Poll::Ready(resp) => {
                    let t = self.running.swap_remove(i);
                    out.respond(params, t.itt, t.edtl, t.out_len, resp);
                }
                Poll::Pending => i += 1,
            }
        }
        // Futures woke by completions they caused themselves (a write after a read):
        // their new I/O is pushed on the next turn.
    }

    /// A Task Management Function request, answered; returns true if the connection
    /// must close after the answer (TARGET COLD RESET).
    pub(crate) fn task_mgmt(&mut self, out: &mut Outbox, bhs: &Bhs) -> bool {
        let mut close = false;
        let function = bhs.flags() & 0x7f;
        let referenced = bhs.u32_at(20);
        let response = match function {
            // ABORT TASK
            1 => {
                // Aborted here, or already answered (or never seen): either way the
                // function is complete.
                self.running.retain(|t| t.itt != referenced);
                self.end_transfer(referenced);
                0
            }
            // ABORT TASK SET, CLEAR TASK SET, LUN RESET, TARGET WARM RESET
            2 | 4 | 5 | 6 => {
                self.running.clear();
                self.end_all_transfers();
                if function == 5 || function == 6 {
                    self.lun.info.reservations.lock().unwrap().reserve6 = None;
                    self.lun.info.prevent.lock().unwrap().clear();
                    let sense = if function == 5 {
                        scsi::Sense::LUN_RESET_OCCURRED
                    } else {
                        scsi::Sense::RESET_OCCURRED
                    };
                    self.lun.info.reset(sense);
                }
                0
            }
            // TARGET COLD RESET: answered, then the connection is closed.
            7 => {
                self.running.clear();
                self.end_all_transfers();
                self.lun.info.reservations.lock().unwrap().reserve6 = None;
                self.lun.info.prevent.lock().unwrap().clear();
                self.lun.info.reset(scsi::Sense::RESET_OCCURRED);
                close = true;
                0
            }
            _ => 5,
        };
        let mut r = Bhs::new(op::TASK_MGMT_RESP, 0x80);
        r.0[2] = response;
        r.set_u32(16, bhs.itt());
        out.seq.stamp(&mut r, true);
        out.send(&r, &[]);
        close
    }
}
