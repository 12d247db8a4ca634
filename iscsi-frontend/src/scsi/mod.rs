//! SCSI commands (SBC-3 block commands, SPC-4 primary commands) on a
//! [`BlockVolume`]. Knows nothing of iSCSI: a command comes in as a CDB and its
//! data-out, and goes out as a status, sense data and data-in.
//!
//! [`Lun::execute`] checks a command against unit attentions, reservations and the
//! block ranges being written, then hands it to the module of its concern:
//! - `sense`: status codes, sense data, the [`Response`], REQUEST SENSE;
//! - `unit`: the LUN as every connection shares it ([`LunInfo`]), unit attentions;
//! - `inquiry`: what the LUN says of itself (INQUIRY and VPD pages, READ CAPACITY,
//!   REPORT LUNS, REPORT SUPPORTED OPERATION CODES);
//! - `mode`: mode pages, START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL;
//! - `reservations`: RESERVE and RELEASE(6), persistent reservations;
//! - `io`: the commands that read and write blocks, and the [`WriteRanges`] that make
//!   COMPARE AND WRITE atomic.

mod inquiry;
mod io;
mod mode;
mod reservations;
mod sense;
mod unit;

use std::sync::Arc;

use horn_engine::frontend::BlockVolume;
use horn_uring::IoBuf;

pub use io::{data_out_len, Wake, WriteRanges};
pub use reservations::{pr_type, Reservations};
pub use sense::{status, Response, Sense};
pub use unit::LunInfo;

/// An I_T nexus: who sends a command (initiator name and ISID), for reservations.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Nexus {
    /// The initiator's name.
    pub initiator: String,
    /// Its session id.
    pub isid: [u8; 6],
}

/// A command as the transport hands it over.
pub struct Command<'a> {
    /// The CDB (16 bytes; shorter CDBs padded).
    pub cdb: &'a [u8; 16],
    /// Data-out received (what the initiator sent, up to its expected length).
    pub data_out: Option<IoBuf>,
    /// Who sent it.
    pub nexus: &'a Nexus,
}

/// Runs SCSI commands for one connection on `volume`.
pub struct Lun<V> {
    /// Shared description and state.
    pub info: Arc<LunInfo>,
    /// The volume, on this connection's engine queue.
    pub volume: V,
    /// Wakes this connection's loop (a command waiting for a block range).
    pub wake: Wake,
}

impl<V: BlockVolume> Lun<V> {
    /// Executes `cmd`.
    pub async fn execute(&self, cmd: Command<'_>) -> Response {
        let cdb = cmd.cdb;
        let op = cdb[0];
        // A unit attention is reported once, on the first command that may carry it
        // (PERSISTENT RESERVE IN is let through, as the reservation it reads outlives
        // resets).
        if !matches!(op, 0x12 | 0xa0 | 0x03 | 0x5e) {
            if let Some(ua) = self.info.take_attention(cmd.nexus) {
                return Response::check(ua);
            }
        }
        {
            let r = self.info.reservations.lock().unwrap();
            if !r.allows(cmd.nexus, io::writes(op), op) {
                return Response::conflict();
            }
        }
        let _held = match self.written_range(cdb) {
            Some((start, end)) => Some(self.hold(start, end).await),
            None => None,
        };
        match op {
            0x00 => Response::good(),
            0x03 => sense::request_sense(cdb),
            0x12 => self.info.inquiry(cdb),
            0xa0 => inquiry::report_luns(cdb),
            0x25 => self.info.read_capacity10(),
            0x9e if cdb[1] & 0x1f == 0x10 => self.info.read_capacity16(cdb),
            0x9e if cdb[1] & 0x1f == 0x12 => self.info.get_lba_status(cdb),
            0x1a | 0x5a => self.info.mode_sense(cdb),
            0x15 | 0x55 => mode::mode_select(),
            0x1b => self.info.start_stop(cdb),
            0x1e => self.info.prevent_allow(cdb, cmd.nexus),
            0x35 | 0x91 => self.sync_cache(cdb).await,
            0x08 | 0x28 | 0xa8 | 0x88 => self.read(cdb).await,
            0x0a | 0x2a | 0xaa | 0x8a => self.write(cdb, cmd.data_out).await,
            0x2e | 0xae | 0x8e => self.write_verify(cdb, cmd.data_out).await,
            0x2f | 0xaf | 0x8f => self.verify(cdb, cmd.data_out).await,
            0x34 | 0x90 => self.prefetch(cdb),
            0x41 | 0x93 => self.write_same(cdb, cmd.data_out).await,
            0x42 => self.unmap(cdb, cmd.data_out).await,
            0x89 => self.compare_and_write(cdb, cmd.data_out).await,
            0x8b => self.or_write(cdb, cmd.data_out).await,
            0x37 | 0xb7 => inquiry::read_defect_data(cdb),
            0x16 => self.info.reservations.lock().unwrap().reserve6(cmd.nexus),
            0x17 => self.info.reservations.lock().unwrap().release6(cmd.nexus),
            0x5e => self.info.reservations.lock().unwrap().pr_in(cdb),
            0x5f => {
                let mut r = self.info.reservations.lock().unwrap();
                r.pr_out(cdb, cmd.data_out.as_ref(), cmd.nexus)
            }
            0xa3 if cdb[1] & 0x1f == 0x0c => inquiry::report_opcodes(cdb),
            _ => Response::check(Sense::INVALID_OPCODE),
        }
    }
}
