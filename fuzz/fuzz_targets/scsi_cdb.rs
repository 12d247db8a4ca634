//! SCSI command dispatch (`horn_iscsi::scsi::Lun::execute`) against an in-memory LUN.
//!
//! Feeds: the first byte picks the LUN (512- or 4096-byte blocks; read-only or not);
//! the rest is a byte stream of iSCSI PDUs. Each SCSI Command PDU becomes a command as
//! the session's transport makes one (`task.rs`): its CDB, and for a write its
//! expected transfer length of data-out, immediate data first and zeros for what the
//! R2Ts would have brought; commands the transport answers itself (another LUN,
//! immediate data on a read, over 8 MiB) are skipped. Task Management PDUs for LUN
//! and target resets reset the LUN as the transport does. The CmdSN's low bit picks
//! one of two sessions (nexuses), so reservations and unit attentions meet a second
//! initiator. The LUN is 1 MiB of memory, fresh for each input.
//!
//! Checks:
//! - a command completes at once (nothing else holds its blocks);
//! - the volume is only asked for I/O inside it, aligned to its blocks, and a
//!   read-only LUN's volume is never written, discarded or zeroed;
//! - the status is one SCSI defines; sense data comes with CHECK CONDITION and only
//!   then, in fixed format; data-in comes with GOOD only and is as long as it says;
//! - a READ that succeeds returns the volume's bytes at the blocks its CDB names, and
//!   a WRITE that succeeds leaves its data-out there (the whole blocks of it that came,
//!   when the expected transfer length is shorter than the CDB's).

#![no_main]

use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use horn_engine::frontend::{BlockVolume, BufResult};
use horn_iscsi::pdu::{self, op, Digests};
use horn_iscsi::scsi::opcode as sc;
use horn_iscsi::scsi::{status, Command, Lun, LunInfo, Nexus, Response, Sense, MAX_TRANSFER};
use horn_uring::IoBuf;
use libfuzzer_sys::fuzz_target;

const SIZE: u64 = 1 << 20;

/// A volume in memory that checks every I/O it is asked for.
struct Memory {
    bytes: RefCell<Vec<u8>>,
    block_size: u32,
    read_only: bool,
}

impl Memory {
    fn check(&self, what: &str, offset: u64, len: u64) -> std::ops::Range<usize> {
        let bs = self.block_size as u64;
        assert!(
            offset % bs == 0 && len % bs == 0,
            "{what} of {len} bytes at {offset}, off the {bs}-byte blocks"
        );
        assert!(len > 0, "{what} of nothing at {offset}");
        let end = offset.checked_add(len).expect("the range overflows");
        assert!(
            end <= SIZE,
            "{what} of {len} bytes at {offset}, past the end ({SIZE})"
        );
        offset as usize..end as usize
    }

    fn change(&self, what: &str, offset: u64, len: u64) -> std::ops::Range<usize> {
        assert!(!self.read_only, "{what} reached a read-only LUN's volume");
        self.check(what, offset, len)
    }
}

impl BlockVolume for Memory {
    fn size(&self) -> u64 {
        SIZE
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    async fn read(&self, offset: u64, mut buf: IoBuf) -> BufResult {
        assert!(
            buf.len() <= MAX_TRANSFER as usize,
            "a read buffer of {}",
            buf.len()
        );
        let range = self.check("a read", offset, buf.len() as u64);
        buf.as_mut_slice().copy_from_slice(&self.bytes.borrow()[range]);
        (Ok(()), buf)
    }
    async fn write(&self, offset: u64, buf: IoBuf, _fua: bool) -> BufResult {
        assert!(
            buf.len() <= MAX_TRANSFER as usize,
            "a write buffer of {}",
            buf.len()
        );
        let range = self.change("a write", offset, buf.len() as u64);
        self.bytes.borrow_mut()[range].copy_from_slice(buf.as_slice());
        (Ok(()), buf)
    }
    async fn flush(&self) -> horn_engine::Result<()> {
        Ok(())
    }
    async fn discard(&self, offset: u64, len: u64) -> horn_engine::Result<()> {
        let range = self.change("a discard", offset, len);
        self.bytes.borrow_mut()[range].fill(0);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> horn_engine::Result<()> {
        let range = self.change("a write-zeroes", offset, len);
        self.bytes.borrow_mut()[range].fill(0);
        Ok(())
    }
}

fn be(b: &[u8]) -> u64 {
    b.iter().fold(0, |n, &x| (n << 8) | x as u64)
}

/// The blocks a READ or WRITE CDB names, read here from SBC-3's layouts.
fn read_write_extent(cdb: &[u8; 16]) -> Option<(u64, u64)> {
    Some(match cdb[0] {
        sc::READ_6 | sc::WRITE_6 => {
            let blocks = if cdb[4] == 0 { 256 } else { cdb[4] as u64 };
            (be(&cdb[1..4]) & 0x1f_ffff, blocks)
        }
        sc::READ_10 | sc::WRITE_10 => (be(&cdb[2..6]), be(&cdb[7..9])),
        sc::READ_12 | sc::WRITE_12 => (be(&cdb[2..6]), be(&cdb[6..10])),
        sc::READ_16 | sc::WRITE_16 => (be(&cdb[2..10]), be(&cdb[10..14])),
        _ => return None,
    })
}

fn run(lun: &Lun<Memory>, cdb: &[u8; 16], data_out: Option<IoBuf>, nexus: &Nexus) -> Response {
    let command = Command { cdb, data_out, nexus };
    let mut future = std::pin::pin!(lun.execute(command));
    match future.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(r) => r,
        Poll::Pending => panic!("command {:#04x} waited with nothing else running", cdb[0]),
    }
}

fn check_response(r: &Response, cdb: &[u8; 16]) {
    let known = [
        status::GOOD,
        status::CHECK_CONDITION,
        status::CONDITION_MET,
        status::RESERVATION_CONFLICT,
        status::TASK_SET_FULL,
    ];
    assert!(
        known.contains(&r.status),
        "status {:#04x} for {:#04x}",
        r.status,
        cdb[0]
    );
    if r.status == status::CHECK_CONDITION {
        assert_eq!(r.sense.len(), 18, "sense for {:#04x}", cdb[0]);
        assert_eq!(r.sense[0] & 0x7f, 0x70, "fixed-format sense for {:#04x}", cdb[0]);
        assert!(r.sense[2] <= 0x0f && r.sense[7] == 10);
    } else {
        assert!(r.sense.is_empty(), "sense with status {:#04x}", r.status);
    }
    if let Some((buf, n)) = &r.data {
        assert_eq!(r.status, status::GOOD, "data-in with status {:#04x}", r.status);
        assert!(*n > 0 && *n <= buf.len(), "{n} of {} bytes of data-in", buf.len());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let block_size = if mode & 1 == 0 { 512 } else { 4096 };
    let read_only = mode & 2 != 0;
    let lun = Lun {
        info: Arc::new(LunInfo::new("vol1", SIZE, block_size, read_only)),
        volume: Memory {
            bytes: RefCell::new(vec![0; SIZE as usize]),
            block_size,
            read_only,
        },
        wake: Arc::new(|| {}),
    };
    let nexuses = [0x01u8, 0x02].map(|n| Nexus {
        initiator: format!("iqn.2026-11.test:host{n}"),
        isid: [0x80, 0, 0, 0, 0, n],
    });
    for n in &nexuses {
        lun.info.join(n);
    }
    while let Ok(Some(f)) = pdu::parse(rest, Digests::default(), MAX_TRANSFER as usize) {
        let bhs = f.bhs;
        let immediate = &rest[f.data.clone()];
        rest = &rest[f.len..];
        let nexus = &nexuses[(bhs.cmd_sn() & 1) as usize];
        match bhs.opcode() {
            op::SCSI_CMD => {}
            op::TASK_MGMT => {
                let sense = match bhs.flags() & 0x7f {
                    5 => Sense::LUN_RESET_OCCURRED,
                    6 | 7 => Sense::RESET_OCCURRED,
                    _ => continue,
                };
                lun.info.reservations.lock().unwrap().reserve6 = None;
                lun.info.prevent.lock().unwrap().clear();
                lun.info.reset(sense);
                continue;
            }
            _ => continue,
        }
        let mut cdb = [0u8; 16];
        cdb.copy_from_slice(&bhs.0[32..48]);
        let write = bhs.flags() & 0x20 != 0;
        let edtl = bhs.u32_at(20);
        if bhs.lun() != 0 && cdb[0] != sc::REPORT_LUNS && cdb[0] != sc::INQUIRY {
            continue;
        }
        if !immediate.is_empty() && (!write || immediate.len() > edtl as usize) {
            continue;
        }
        if write && edtl > MAX_TRANSFER {
            continue;
        }
        let data_out = (write && edtl > 0).then(|| {
            let mut buf = IoBuf::zeroed(edtl as usize);
            buf.as_mut_slice()[..immediate.len()].copy_from_slice(immediate);
            buf
        });
        let is_write = matches!(cdb[0], sc::WRITE_6 | sc::WRITE_10 | sc::WRITE_12 | sc::WRITE_16);
        let written = data_out
            .as_ref()
            .filter(|_| is_write)
            .map(|b| b.as_slice().to_vec());
        let r = run(&lun, &cdb, data_out, nexus);
        check_response(&r, &cdb);
        if r.status != status::GOOD {
            continue;
        }
        let Some((lba, blocks)) = read_write_extent(&cdb) else {
            continue;
        };
        let (at, len) = (
            (lba * block_size as u64) as usize,
            (blocks * block_size as u64) as usize,
        );
        let volume = lun.volume.bytes.borrow();
        match cdb[0] {
            sc::READ_6 | sc::READ_10 | sc::READ_12 | sc::READ_16 => {
                let got = r.data.as_ref().map_or(&[][..], |(b, n)| &b.as_slice()[..*n]);
                assert_eq!(got.len(), len, "READ {lba}+{blocks} returned {} bytes", got.len());
                assert!(
                    got == &volume[at..at + len],
                    "READ {lba}+{blocks} returned other bytes"
                );
            }
            _ => {
                // Only the whole blocks the transport delivered are written (it reports
                // the residual); the rest stay as they were.
                let data = written.as_deref().unwrap_or(&[]);
                let len = len.min(data.len() / block_size as usize * block_size as usize);
                assert!(
                    data[..len] == volume[at..at + len],
                    "WRITE {lba}+{blocks} left other bytes"
                );
            }
        }
    }
});
