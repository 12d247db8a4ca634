//! SCSI commands (SBC-3 block commands, SPC-4 primary commands) on a
//! [`BlockVolume`]. Knows nothing of iSCSI: a command comes in as a CDB and its
//! data-out, and goes out as a status, sense data and data-in.
//!
//! [`opcode`] names every command served, in one table, and `cdb` reads a CDB's fields
//! through it. [`Lun::execute`] checks a command, as its row says, against unit
//! attentions, reservations and the block ranges being written, then hands it to the
//! module of its concern:
//! - `sense`: status codes, sense data, the [`Response`], REQUEST SENSE;
//! - `unit`: the LUN as every connection shares it ([`LunInfo`]), unit attentions;
//! - `inquiry`: what the LUN says of itself (INQUIRY and VPD pages, READ CAPACITY,
//!   REPORT LUNS, REPORT SUPPORTED OPERATION CODES);
//! - `mode`: mode pages, START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL;
//! - `reservations`: RESERVE and RELEASE(6), persistent reservations;
//! - `io`: the commands that read and write blocks, and the [`WriteRanges`] that make
//!   COMPARE AND WRITE atomic.

mod cdb;
mod inquiry;
mod io;
mod mode;
pub mod opcode;
mod reservations;
mod sense;
mod unit;

use std::sync::Arc;

use cdb::service_action_of;
use horn_engine::frontend::BlockVolume;
use horn_uring::IoBuf;
use opcode::{self as op, service_action as sa, Medium, RunsPast};

pub use cdb::data_out_len;
pub use io::{Wake, WriteRanges, MAX_TRANSFER};
pub use reservations::{pr_type, PersistentReservation, Registration, Reservations};
pub use sense::{status, Response, Sense};
pub use unit::{LoggedIn, LunInfo};

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
        let code = cdb[0];
        // An opcode outside the table is taken for a read that runs past nothing; the
        // dispatch below then answers INVALID OPERATION CODE.
        let (medium, runs_past) =
            opcode::describe(code).map_or((Medium::Reads, RunsPast::NOTHING), |d| (d.medium, d.runs_past));
        // The volume may have grown (an online expansion) since the last command.
        let size = self.volume.size();
        if size != self.info.size() {
            self.info.follow_size(size);
        }
        // A unit attention is reported once, on the first command that may carry it.
        if !runs_past.unit_attention {
            if let Some(ua) = self.info.take_attention(cmd.nexus) {
                return Response::check(ua);
            }
        }
        let allowed = self
            .info
            .reservations
            .lock()
            .unwrap()
            .allows(cmd.nexus, medium.writes(), runs_past);
        if !allowed {
            return Response::conflict();
        }
        let _held = match io::written_range(cdb, medium) {
            Some(blocks) => Some(self.hold(blocks).await),
            None => None,
        };
        let action = service_action_of(cdb);
        let data = cmd.data_out;
        match code {
            op::TEST_UNIT_READY => Response::good(),
            op::REQUEST_SENSE => sense::request_sense(cdb),
            op::INQUIRY => self.info.inquiry(cdb),
            op::REPORT_LUNS => inquiry::report_luns(cdb),
            op::READ_CAPACITY_10 => self.info.read_capacity10(),
            op::SERVICE_ACTION_IN_16 if action == sa::READ_CAPACITY_16 => self.info.read_capacity16(cdb),
            op::SERVICE_ACTION_IN_16 if action == sa::GET_LBA_STATUS => self.info.get_lba_status(cdb),
            op::MAINTENANCE_IN if action == sa::REPORT_SUPPORTED_OPERATION_CODES => {
                inquiry::report_opcodes(cdb)
            }
            op::READ_DEFECT_DATA_10 | op::READ_DEFECT_DATA_12 => inquiry::read_defect_data(cdb),
            op::MODE_SENSE_6 | op::MODE_SENSE_10 => self.info.mode_sense(cdb),
            op::MODE_SELECT_6 | op::MODE_SELECT_10 => mode::mode_select(),
            op::START_STOP_UNIT => self.info.start_stop(cdb),
            op::PREVENT_ALLOW_MEDIUM_REMOVAL => self.info.prevent_allow(cdb, cmd.nexus),
            op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16 => self.read(cdb).await,
            op::WRITE_6 | op::WRITE_10 | op::WRITE_12 | op::WRITE_16 => self.write(cdb, data, false).await,
            op::WRITE_AND_VERIFY_10 | op::WRITE_AND_VERIFY_12 | op::WRITE_AND_VERIFY_16 => {
                self.write(cdb, data, true).await
            }
            op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => self.verify(cdb, data).await,
            op::ORWRITE_16 => self.or_write(cdb, data).await,
            op::COMPARE_AND_WRITE => self.compare_and_write(cdb, data).await,
            op::WRITE_SAME_10 | op::WRITE_SAME_16 => self.write_same(cdb, data).await,
            op::UNMAP => self.unmap(cdb, data).await,
            op::PRE_FETCH_10 | op::PRE_FETCH_16 => self.prefetch(cdb),
            op::SYNCHRONIZE_CACHE_10 | op::SYNCHRONIZE_CACHE_16 => self.sync_cache(cdb).await,
            op::RESERVE_6 => self.info.reservations.lock().unwrap().reserve6(cmd.nexus),
            op::RELEASE_6 => self.info.reservations.lock().unwrap().release6(cmd.nexus),
            op::PERSISTENT_RESERVE_IN => self.info.reservations.lock().unwrap().pr_in(cdb),
            op::PERSISTENT_RESERVE_OUT => {
                let mut r = self.info.reservations.lock().unwrap();
                r.pr_out(cdb, data.as_ref(), cmd.nexus)
            }
            _ => Response::check(Sense::INVALID_OPCODE),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    use horn_engine::frontend::BufResult;

    use super::*;

    /// A volume whose every I/O succeeds at once, reading zeroes; its size can grow.
    struct Instant(std::cell::Cell<u64>);

    impl BlockVolume for Instant {
        fn size(&self) -> u64 {
            self.0.get()
        }
        fn block_size(&self) -> u32 {
            512
        }
        async fn read(&self, _offset: u64, buf: IoBuf) -> BufResult {
            (Ok(()), buf)
        }
        async fn write(&self, _offset: u64, buf: IoBuf, _fua: bool) -> BufResult {
            (Ok(()), buf)
        }
        async fn flush(&self) -> horn_engine::Result<()> {
            Ok(())
        }
        async fn discard(&self, _offset: u64, _len: u64) -> horn_engine::Result<()> {
            Ok(())
        }
        async fn write_zeroes(&self, _offset: u64, _len: u64) -> horn_engine::Result<()> {
            Ok(())
        }
    }

    fn lun() -> Lun<Instant> {
        Lun {
            info: Arc::new(LunInfo::new("vol", 1 << 20, 512, false)),
            volume: Instant(std::cell::Cell::new(1 << 20)),
            wake: Arc::new(|| {}),
        }
    }

    fn nexus() -> Nexus {
        Nexus {
            initiator: "iqn.2026-11.test:host".into(),
            isid: [0x80, 0, 0, 0, 0, 1],
        }
    }

    /// Runs `cdb` on a fresh LUN over [`Instant`]; nothing it does waits.
    fn run(cdb: [u8; 16]) -> Response {
        run_on(&lun(), &nexus(), cdb)
    }

    /// Runs `cdb` on `lun`; nothing it does waits.
    fn run_on(lun: &Lun<Instant>, nexus: &Nexus, cdb: [u8; 16]) -> Response {
        let command = Command {
            cdb: &cdb,
            data_out: None,
            nexus,
        };
        let mut future = std::pin::pin!(lun.execute(command));
        match future.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(r) => r,
            Poll::Pending => panic!("{:#04x} waited on a volume that never makes it wait", cdb[0]),
        }
    }

    #[test]
    fn a_volume_that_grows_gives_every_nexus_a_capacity_unit_attention_and_its_new_size() {
        let lun = lun();
        let (a, mut b) = (nexus(), nexus());
        b.isid[5] = 2;
        lun.info.join(&a);
        lun.info.join(&b);
        let read_capacity = || {
            let mut cdb = [0u8; 16];
            cdb[0] = op::READ_CAPACITY_10;
            cdb
        };
        assert_eq!(run_on(&lun, &a, read_capacity()).status, status::GOOD);
        lun.volume.0.set(2 << 20);
        for n in [&a, &b] {
            let r = run_on(&lun, n, [0u8; 16]);
            assert_eq!(r.status, status::CHECK_CONDITION);
            assert_eq!(
                r.sense,
                Sense::CAPACITY_CHANGED.fixed(None),
                "told once, to each nexus"
            );
            let r = run_on(&lun, n, read_capacity());
            assert_eq!(r.status, status::GOOD);
            let (data, len) = r.data.expect("READ CAPACITY has data");
            assert_eq!(len, 8);
            assert_eq!(data.as_slice()[..4], ((2u32 << 20) / 512 - 1).to_be_bytes());
        }
        assert_eq!(
            run_on(&lun, &a, [0u8; 16]).status,
            status::GOOD,
            "no second attention"
        );
    }

    #[test]
    fn every_command_in_the_table_is_dispatched_and_no_other() {
        let invalid_opcode = Sense::INVALID_OPCODE.fixed(None);
        for code in 0..=255u8 {
            for action in 0..32u8 {
                let mut cdb = [0u8; 16];
                cdb[0] = code;
                cdb[1] = action;
                let r = run(cdb);
                let served = r.sense != invalid_opcode;
                let rows = || opcode::TABLE.iter().filter(|d| d.code == code);
                let listed = rows().any(|d| d.service_action.is_none_or(|s| s == u16::from(action)));
                let here = format!("opcode {code:#04x}, byte 1 {action:#04x}");
                if listed || rows().next().is_none() {
                    assert_eq!(served, listed, "{here}");
                } else {
                    // A service action not in the table: some commands' own checks turn
                    // it away first (INVALID FIELD IN CDB), but it is always refused.
                    assert_eq!(r.status, status::CHECK_CONDITION, "{here}");
                    assert_eq!(r.sense[2], 0x05, "{here}: ILLEGAL REQUEST");
                }
            }
        }
    }
}
