//! SCSI commands (SBC-3 block commands, SPC-4 primary commands) on a
//! [`BlockVolume`]. Knows nothing of iSCSI: a command comes in as a CDB and its
//! data-out, and goes out as a status, sense data and data-in.

use std::sync::{Arc, Mutex};

use horn_engine::frontend::BlockVolume;
use horn_uring::IoBuf;

/// SCSI status codes.
pub mod status {
    /// Good.
    pub const GOOD: u8 = 0x00;
    /// Check condition (sense data follows).
    pub const CHECK_CONDITION: u8 = 0x02;
    /// Condition met (PRE-FETCH).
    pub const CONDITION_MET: u8 = 0x04;
    /// Reservation conflict.
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    /// Task set full: try again later.
    pub const TASK_SET_FULL: u8 = 0x28;
}

/// A sense key with its additional sense code and qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    /// Sense key.
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Its qualifier.
    pub ascq: u8,
}

impl Sense {
    const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense { key, asc, ascq }
    }
    /// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE.
    pub const INVALID_OPCODE: Sense = Sense::new(0x05, 0x20, 0x00);
    /// ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(0x05, 0x21, 0x00);
    /// ILLEGAL REQUEST, INVALID FIELD IN CDB.
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(0x05, 0x24, 0x00);
    /// ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED.
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(0x05, 0x25, 0x00);
    /// ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST.
    pub const INVALID_FIELD_IN_PARAMS: Sense = Sense::new(0x05, 0x26, 0x00);
    /// ILLEGAL REQUEST, PARAMETER LIST LENGTH ERROR.
    pub const PARAM_LIST_LENGTH: Sense = Sense::new(0x05, 0x1a, 0x00);
    /// DATA PROTECT, WRITE PROTECTED.
    pub const WRITE_PROTECTED: Sense = Sense::new(0x07, 0x27, 0x00);
    /// MISCOMPARE, MISCOMPARE DURING VERIFY OPERATION.
    pub const MISCOMPARE: Sense = Sense::new(0x0e, 0x1d, 0x00);
    /// MEDIUM ERROR, UNRECOVERED READ ERROR.
    pub const READ_ERROR: Sense = Sense::new(0x03, 0x11, 0x00);
    /// MEDIUM ERROR, WRITE ERROR.
    pub const WRITE_ERROR: Sense = Sense::new(0x03, 0x0c, 0x00);
    /// UNIT ATTENTION, POWER ON, RESET, OR BUS DEVICE RESET OCCURRED.
    pub const RESET_OCCURRED: Sense = Sense::new(0x06, 0x29, 0x00);
    /// UNIT ATTENTION, BUS DEVICE RESET FUNCTION OCCURRED (a LUN reset).
    pub const LUN_RESET_OCCURRED: Sense = Sense::new(0x06, 0x29, 0x03);
    /// NOT READY, MEDIUM NOT PRESENT.
    pub const NO_MEDIUM: Sense = Sense::new(0x02, 0x3a, 0x00);
    /// ABORTED COMMAND, DATA PHASE ERROR.
    pub const DATA_PHASE_ERROR: Sense = Sense::new(0x0b, 0x4b, 0x00);
    /// ILLEGAL REQUEST, MEDIUM REMOVAL PREVENTED.
    pub const REMOVAL_PREVENTED: Sense = Sense::new(0x05, 0x53, 0x02);

    /// Fixed-format sense data (SPC-4 §4.5.3), with `info` in the INFORMATION field
    /// when given.
    pub fn fixed(&self, info: Option<u32>) -> Vec<u8> {
        let mut s = vec![0u8; 18];
        s[0] = 0x70 | if info.is_some() { 0x80 } else { 0 };
        s[2] = self.key;
        if let Some(i) = info {
            s[3..7].copy_from_slice(&i.to_be_bytes());
        }
        s[7] = 10;
        s[12] = self.asc;
        s[13] = self.ascq;
        s
    }
}

/// The outcome of a command.
#[derive(Debug)]
pub struct Response {
    /// SCSI status.
    pub status: u8,
    /// Sense data (with CHECK CONDITION).
    pub sense: Vec<u8>,
    /// Data-in: the buffer and how many of its bytes to send.
    pub data: Option<(IoBuf, usize)>,
}

impl Response {
    /// GOOD, no data.
    pub fn good() -> Response {
        Response {
            status: status::GOOD,
            sense: Vec::new(),
            data: None,
        }
    }
    /// GOOD with `bytes` of data-in, cut to `alloc` (the CDB's allocation length).
    pub fn data(bytes: &[u8], alloc: usize) -> Response {
        let n = bytes.len().min(alloc);
        Response {
            status: status::GOOD,
            sense: Vec::new(),
            data: (n > 0).then(|| (IoBuf::from_slice(&bytes[..n]), n)),
        }
    }
    /// CHECK CONDITION with `sense`.
    pub fn check(sense: Sense) -> Response {
        Response {
            status: status::CHECK_CONDITION,
            sense: sense.fixed(None),
            data: None,
        }
    }
    /// RESERVATION CONFLICT.
    pub fn conflict() -> Response {
        Response::status(status::RESERVATION_CONFLICT)
    }

    /// A bare status, without sense or data.
    pub fn status(status: u8) -> Response {
        Response {
            status,
            sense: Vec::new(),
            data: None,
        }
    }
}

/// An I_T nexus: who sends a command (initiator name and ISID), for reservations.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Nexus {
    /// The initiator's name.
    pub initiator: String,
    /// Its session id.
    pub isid: [u8; 6],
}

/// A persistent reservation's type (SPC-4 §6.15.4).
pub mod pr_type {
    /// Write Exclusive.
    pub const WE: u8 = 1;
    /// Exclusive Access.
    pub const EA: u8 = 3;
    /// Write Exclusive, Registrants Only.
    pub const WE_RO: u8 = 5;
    /// Exclusive Access, Registrants Only.
    pub const EA_RO: u8 = 6;
    /// Write Exclusive, All Registrants.
    pub const WE_AR: u8 = 7;
    /// Exclusive Access, All Registrants.
    pub const EA_AR: u8 = 8;
}

/// Reservations held on the LUN, shared by every session.
#[derive(Debug, Default)]
pub struct Reservations {
    /// Persistent reservation generation.
    pub generation: u32,
    /// Registered keys by nexus.
    pub keys: Vec<(Nexus, u64)>,
    /// The persistent reservation: holder (None for all-registrants types) and type.
    pub holder: Option<(Option<Nexus>, u8)>,
    /// A RESERVE(6) reservation.
    pub reserve6: Option<Nexus>,
}

impl Reservations {
    fn key_of(&self, n: &Nexus) -> Option<u64> {
        self.keys.iter().find(|(k, _)| k == n).map(|(_, v)| *v)
    }

    fn is_holder(&self, n: &Nexus) -> bool {
        match &self.holder {
            Some((Some(h), _)) => h == n,
            Some((None, _)) => self.key_of(n).is_some(),
            None => false,
        }
    }

    /// Whether `n` may run a command that `writes` (or only reads) the medium.
    fn allows(&self, n: &Nexus, writes: bool, op: u8) -> bool {
        if let Some(r) = &self.reserve6 {
            // SPC-2 reservations: everything but a few commands conflict.
            if r != n && !matches!(op, 0x12 | 0xa0 | 0x03 | 0x5e | 0x5f | 0x17) {
                return false;
            }
        }
        let Some((_, ty)) = &self.holder else { return true };
        if self.is_holder(n) || matches!(op, 0x12 | 0xa0 | 0x03 | 0x5e | 0x5f | 0x25 | 0x9e) {
            return true;
        }
        let registered = self.key_of(n).is_some();
        match *ty {
            pr_type::WE => !writes,
            pr_type::EA => false,
            pr_type::WE_RO | pr_type::WE_AR => !writes || registered,
            pr_type::EA_RO | pr_type::EA_AR => registered,
            _ => true,
        }
    }
}

/// What a LUN is, shared by every connection serving it.
#[derive(Debug)]
pub struct LunInfo {
    /// Size in bytes.
    pub size: u64,
    /// Logical block size.
    pub block_size: u32,
    /// Read-only LUN.
    pub read_only: bool,
    /// The volume's name (INQUIRY unit serial number).
    pub serial: String,
    /// A 64-bit NAA identifier derived from the volume's name (VPD page 83).
    pub naa: u64,
    /// Reservations.
    pub reservations: Mutex<Reservations>,
    /// Set by PREVENT ALLOW MEDIUM REMOVAL, per nexus.
    pub prevent: Mutex<Vec<Nexus>>,
    /// Nexuses logged in, each with the unit attention it has yet to be told of.
    pub nexuses: Mutex<Vec<(Nexus, Option<Sense>)>>,
    /// Some nexus has a unit attention pending (checked on every command).
    pub attention: std::sync::atomic::AtomicBool,
    /// Block ranges being written, from every session.
    pub writing: WriteRanges,
}

/// Wakes a connection's loop from another thread.
pub type Wake = Arc<dyn Fn() + Send + Sync>;

/// The block ranges commands are writing, from every session of the LUN, so that
/// COMPARE AND WRITE is atomic against every other write to its blocks (SBC-3 §5.2;
/// clustered filesystems take their locks with it). Each command that writes holds its
/// range while it runs. A command whose range overlaps a held one waits, without
/// blocking its connection's thread, until that range is let go. The connection is
/// woken through its engine queue's eventfd. Overlapping writes run one after the
/// other, in whatever order they got the range, which SCSI leaves open anyway.
#[derive(Default)]
pub struct WriteRanges {
    inner: Mutex<Ranges>,
}

#[derive(Default)]
struct Ranges {
    /// (first block, end block, id).
    held: Vec<(u64, u64, u64)>,
    next_id: u64,
    /// Connections with a command waiting, woken at the next release.
    waiting: Vec<Wake>,
}

impl std::fmt::Debug for WriteRanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteRanges").field("held", &self.held()).finish()
    }
}

impl WriteRanges {
    /// Holds blocks `[start, end)` unless a held range overlaps them. In that case
    /// `wake` is called when some range is let go.
    fn try_hold(&self, start: u64, end: u64, wake: &Wake) -> Option<u64> {
        let mut r = self.inner.lock().unwrap();
        if r.held.iter().any(|&(s, e, _)| s < end && start < e) {
            r.waiting.push(wake.clone());
            return None;
        }
        r.next_id += 1;
        let id = r.next_id;
        r.held.push((start, end, id));
        Some(id)
    }

    fn release(&self, id: u64) {
        let waiting = {
            let mut r = self.inner.lock().unwrap();
            if let Some(i) = r.held.iter().position(|h| h.2 == id) {
                r.held.swap_remove(i);
            }
            std::mem::take(&mut r.waiting)
        };
        for wake in waiting {
            wake();
        }
    }

    /// Ranges held now (for tests and diagnostics).
    pub fn held(&self) -> usize {
        self.inner.lock().unwrap().held.len()
    }
}

/// A held range, let go when dropped.
struct HeldRange<'a> {
    ranges: &'a WriteRanges,
    id: u64,
}

impl Drop for HeldRange<'_> {
    fn drop(&mut self) {
        self.ranges.release(self.id);
    }
}

impl LunInfo {
    /// A LUN over a volume of `size` bytes in blocks of `block_size`.
    pub fn new(name: &str, size: u64, block_size: u32, read_only: bool) -> LunInfo {
        // NAA 6 (registered extended) with an IEEE OUI of zero is for vendors; Horn
        // uses NAA 3 (locally assigned), from a hash of the name.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        LunInfo {
            size,
            block_size,
            read_only,
            serial: name.chars().filter(|c| c.is_ascii_graphic()).take(32).collect(),
            naa: (3u64 << 60) | (h >> 4),
            reservations: Mutex::new(Reservations::default()),
            prevent: Mutex::new(Vec::new()),
            nexuses: Mutex::new(Vec::new()),
            attention: std::sync::atomic::AtomicBool::new(false),
            writing: WriteRanges::default(),
        }
    }

    /// A nexus logs in.
    pub fn join(&self, n: &Nexus) {
        self.nexuses.lock().unwrap().push((n.clone(), None));
    }

    /// A nexus is gone (logout or connection loss).
    pub fn leave(&self, n: &Nexus) {
        let mut v = self.nexuses.lock().unwrap();
        if let Some(i) = v.iter().position(|(x, _)| x == n) {
            v.swap_remove(i);
        }
    }

    /// A reset: every nexus, the one that asked for it too, gets a unit attention
    /// (SAM-5 §6.3.3).
    pub fn reset(&self, sense: Sense) {
        let mut v = self.nexuses.lock().unwrap();
        for (_, ua) in v.iter_mut() {
            *ua = Some(sense);
        }
        self.attention.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Takes `n`'s pending unit attention, if any.
    fn take_attention(&self, n: &Nexus) -> Option<Sense> {
        if !self.attention.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let mut v = self.nexuses.lock().unwrap();
        let ua = v.iter_mut().find(|(x, _)| x == n).and_then(|(_, ua)| ua.take());
        if v.iter().all(|(_, ua)| ua.is_none()) {
            self.attention.store(false, std::sync::atomic::Ordering::SeqCst);
        }
        ua
    }

    fn blocks(&self) -> u64 {
        self.size / self.block_size as u64
    }
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

/// Where a read or write goes: (LBA, blocks), and the DPO/FUA byte.
fn rw_args(cdb: &[u8; 16]) -> Option<(u64, u64, u8)> {
    let be32 = |a: usize| u32::from_be_bytes(cdb[a..a + 4].try_into().unwrap()) as u64;
    let be16 = |a: usize| u16::from_be_bytes(cdb[a..a + 2].try_into().unwrap()) as u64;
    let be64 = |a: usize| u64::from_be_bytes(cdb[a..a + 8].try_into().unwrap());
    Some(match cdb[0] {
        // 6-byte: 21-bit LBA, 0 blocks means 256.
        0x08 | 0x0a => {
            let lba = (((cdb[1] & 0x1f) as u64) << 16) | be16(2);
            let n = if cdb[4] == 0 { 256 } else { cdb[4] as u64 };
            (lba, n, 0)
        }
        0x28 | 0x2a | 0x2e | 0x2f | 0x34 | 0x41 => (be32(2), be16(7), cdb[1]),
        0xa8 | 0xaa | 0xae | 0xaf => (be32(2), be32(6), cdb[1]),
        0x88 | 0x8a | 0x8e | 0x8f | 0x90 | 0x93 | 0x8b | 0x9c => (be64(2), be32(10), cdb[1]),
        0x89 => (be64(2), cdb[13] as u64, cdb[1]),
        _ => return None,
    })
}

/// Opcodes served, for REPORT SUPPORTED OPERATION CODES: (opcode, service action,
/// CDB length).
const SUPPORTED: &[(u8, Option<u16>, u8)] = &[
    (0x00, None, 6),
    (0x03, None, 6),
    (0x08, None, 6),
    (0x0a, None, 6),
    (0x12, None, 6),
    (0x15, None, 6),
    (0x16, None, 6),
    (0x17, None, 6),
    (0x1a, None, 6),
    (0x1b, None, 6),
    (0x1e, None, 6),
    (0x25, None, 10),
    (0x28, None, 10),
    (0x2a, None, 10),
    (0x2e, None, 10),
    (0x2f, None, 10),
    (0x34, None, 10),
    (0x37, None, 10),
    (0x35, None, 10),
    (0x41, None, 10),
    (0x42, None, 10),
    (0x55, None, 10),
    (0x5a, None, 10),
    (0x5e, Some(0), 10),
    (0x5e, Some(1), 10),
    (0x5e, Some(2), 10),
    (0x5e, Some(3), 10),
    (0x5f, Some(0), 10),
    (0x5f, Some(1), 10),
    (0x5f, Some(2), 10),
    (0x5f, Some(3), 10),
    (0x5f, Some(4), 10),
    (0x5f, Some(5), 10),
    (0x5f, Some(6), 10),
    (0x88, None, 16),
    (0x89, None, 16),
    (0x8a, None, 16),
    (0x8b, None, 16),
    (0x8e, None, 16),
    (0x8f, None, 16),
    (0x90, None, 16),
    (0x91, None, 16),
    (0x93, None, 16),
    (0x9e, Some(0x10), 16),
    (0x9e, Some(0x12), 16),
    (0xa0, None, 12),
    (0xa3, Some(0x0c), 12),
    (0xa8, None, 12),
    (0xaa, None, 12),
    (0xae, None, 12),
    (0xaf, None, 12),
    (0xb7, None, 12),
];

/// Largest transfer in bytes (the data wire's largest I/O).
const MAX_TRANSFER: u32 = 8 << 20;
/// Largest COMPARE AND WRITE, in blocks.
const MAX_COMPARE_AND_WRITE: u8 = 255;
/// Most descriptors in one UNMAP.
const MAX_UNMAP_DESCRIPTORS: u32 = 255;

/// Does command `op` write the medium (for reservations and read-only LUNs)?
fn writes(op: u8) -> bool {
    matches!(
        op,
        0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e | 0x41 | 0x93 | 0x42 | 0x89 | 0x8b | 0x35 | 0x91
    )
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
            if !r.allows(cmd.nexus, writes(op), op) {
                return Response::conflict();
            }
        }
        let _held = match self.written_range(cdb) {
            Some((start, end)) => Some(self.hold(start, end).await),
            None => None,
        };
        match op {
            0x00 => Response::good(),
            0x03 => self.request_sense(cdb),
            0x12 => self.inquiry(cdb),
            0xa0 => self.report_luns(cdb),
            0x25 => self.read_capacity10(cdb),
            0x9e if cdb[1] & 0x1f == 0x10 => self.read_capacity16(cdb),
            0x9e if cdb[1] & 0x1f == 0x12 => self.get_lba_status(cdb),
            0x1a | 0x5a => self.mode_sense(cdb),
            0x15 | 0x55 => self.mode_select(cdb, cmd.data_out.as_ref()),
            0x1b => self.start_stop(cdb),
            0x1e => self.prevent_allow(cdb, cmd.nexus),
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
            0x37 | 0xb7 => self.read_defect_data(cdb),
            0x16 => self.reserve6(cmd.nexus),
            0x17 => self.release6(cmd.nexus),
            0x5e => self.pr_in(cdb),
            0x5f => self.pr_out(cdb, cmd.data_out.as_ref(), cmd.nexus),
            0xa3 if cdb[1] & 0x1f == 0x0c => self.report_opcodes(cdb),
            _ => Response::check(Sense::INVALID_OPCODE),
        }
    }

    /// The blocks a writing command may change, `[start, end)`: for UNMAP, whose
    /// ranges are in its data, the whole LUN.
    fn written_range(&self, cdb: &[u8; 16]) -> Option<(u64, u64)> {
        let op = cdb[0];
        if !writes(op) || matches!(op, 0x35 | 0x91) {
            return None;
        }
        if op == 0x42 {
            return Some((0, u64::MAX));
        }
        let (lba, n, _) = rw_args(cdb)?;
        match n {
            // WRITE SAME of zero blocks runs to the end of the LUN.
            0 if matches!(op, 0x41 | 0x93) => Some((lba, u64::MAX)),
            0 => None,
            n => Some((lba, lba.saturating_add(n))),
        }
    }

    /// Waits until blocks `[start, end)` are held by this command.
    async fn hold(&self, start: u64, end: u64) -> HeldRange<'_> {
        let ranges = &self.info.writing;
        let id = std::future::poll_fn(|_| match ranges.try_hold(start, end, &self.wake) {
            Some(id) => std::task::Poll::Ready(id),
            None => std::task::Poll::Pending,
        })
        .await;
        HeldRange { ranges, id }
    }

    fn request_sense(&self, cdb: &[u8; 16]) -> Response {
        if cdb[1] & 0x01 != 0 {
            // Descriptor format: NO SENSE, no descriptors.
            return Response::data(&[0x72, 0, 0, 0, 0, 0, 0, 0], cdb[4] as usize);
        }
        let mut s = Sense::new(0, 0, 0).fixed(None);
        s[0] = 0x70;
        Response::data(&s, cdb[4] as usize)
    }

    fn inquiry(&self, cdb: &[u8; 16]) -> Response {
        let alloc = u16::from_be_bytes([cdb[3], cdb[4]]) as usize;
        let evpd = cdb[1] & 0x01 != 0;
        if cdb[1] & 0xfe != 0 || (!evpd && cdb[2] != 0) {
            return Response::check(Sense::INVALID_FIELD_IN_CDB);
        }
        if !evpd {
            let mut d = vec![0u8; 66];
            d[0] = 0x00; // direct access block device, connected
            d[2] = 0x06; // SPC-4
            d[3] = 0x02; // response data format 2
            d[4] = (d.len() - 5) as u8;
            d[5] = 0x00;
            d[7] = 0x02; // CMDQUE
            d[8..16].copy_from_slice(b"HORN    ");
            d[16..32].copy_from_slice(b"VOLUME          ");
            d[32..36].copy_from_slice(b"0001");
            // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
            for (i, v) in [0x00a0u16, 0x0960, 0x0460, 0x04c0].iter().enumerate() {
                d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
            }
            d[4] = (d.len() - 5) as u8;
            return Response::data(&d, alloc);
        }
        let page: Vec<u8> = match cdb[2] {
            0x00 => vec![0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2],
            0x80 => self.info.serial.as_bytes().to_vec(),
            0x83 => {
                let mut p = Vec::new();
                // NAA designator, associated with the LU.
                p.extend_from_slice(&[0x01, 0x03, 0x00, 0x08]);
                p.extend_from_slice(&self.info.naa.to_be_bytes());
                // T10 vendor id designator.
                let t10 = format!("HORN    {}", self.info.serial);
                p.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
                p.extend_from_slice(t10.as_bytes());
                p
            }
            0xb0 => {
                // Block limits (SBC-3 §6.5.3); offsets below are within the page body.
                let mut p = vec![0u8; 60];
                let max_blocks = MAX_TRANSFER / self.info.block_size;
                p[1] = MAX_COMPARE_AND_WRITE;
                let granularity = (4096 / self.info.block_size).max(1);
                p[2..4].copy_from_slice(&(granularity as u16).to_be_bytes());
                p[4..8].copy_from_slice(&max_blocks.to_be_bytes());
                p[8..12].copy_from_slice(&max_blocks.to_be_bytes());
                p[12..16].copy_from_slice(&max_blocks.to_be_bytes());
                p[16..20].copy_from_slice(&max_blocks.to_be_bytes());
                p[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
                p[24..28].copy_from_slice(&granularity.to_be_bytes());
                p[32..40].copy_from_slice(&(max_blocks as u64).to_be_bytes());
                p
            }
            0xb1 => {
                let mut p = vec![0u8; 60];
                p[1] = 0x01; // non-rotating medium
                p
            }
            // Logical block provisioning: UNMAP, WRITE SAME 16 and 10 with UNMAP,
            // unmapped blocks read as zeroes (LBPRZ); thin provisioned.
            0xb2 => vec![0, 0xe4, 0x02, 0],
            _ => return Response::check(Sense::INVALID_FIELD_IN_CDB),
        };
        let mut d = vec![0x00, cdb[2]];
        d.extend_from_slice(&(page.len() as u16).to_be_bytes());
        d.extend_from_slice(&page);
        Response::data(&d, alloc)
    }

    fn report_luns(&self, cdb: &[u8; 16]) -> Response {
        let alloc = u32::from_be_bytes(cdb[6..10].try_into().unwrap()) as usize;
        if alloc < 16 {
            return Response::check(Sense::INVALID_FIELD_IN_CDB);
        }
        let mut d = vec![0u8; 16];
        d[3] = 8; // one LUN: 0
        Response::data(&d, alloc)
    }

    fn read_capacity10(&self, _cdb: &[u8; 16]) -> Response {
        let last = self.info.blocks().saturating_sub(1).min(0xffff_ffff) as u32;
        let mut d = last.to_be_bytes().to_vec();
        d.extend_from_slice(&self.info.block_size.to_be_bytes());
        Response::data(&d, 8)
    }

    fn read_capacity16(&self, cdb: &[u8; 16]) -> Response {
        let alloc = u32::from_be_bytes(cdb[10..14].try_into().unwrap()) as usize;
        let mut d = vec![0u8; 32];
        d[0..8].copy_from_slice(&(self.info.blocks() - 1).to_be_bytes());
        d[8..12].copy_from_slice(&self.info.block_size.to_be_bytes());
        // Logical blocks per physical block exponent (4 KiB physical).
        d[13] = (4096 / self.info.block_size).trailing_zeros() as u8;
        // LBPME (thin provisioned) and LBPRZ (unmapped blocks read as zeroes).
        d[14] = 0xc0;
        Response::data(&d, alloc)
    }

    fn get_lba_status(&self, cdb: &[u8; 16]) -> Response {
        let lba = u64::from_be_bytes(cdb[2..10].try_into().unwrap());
        let alloc = u32::from_be_bytes(cdb[10..14].try_into().unwrap()) as usize;
        if lba >= self.info.blocks() {
            return Response::check(Sense::LBA_OUT_OF_RANGE);
        }
        // One descriptor: from `lba` to the end, mapped (the engine does not yet
        // report allocation).
        let mut d = vec![0u8; 24];
        d[0..4].copy_from_slice(&20u32.to_be_bytes());
        d[8..16].copy_from_slice(&lba.to_be_bytes());
        let n = (self.info.blocks() - lba).min(u32::MAX as u64) as u32;
        d[16..20].copy_from_slice(&n.to_be_bytes());
        d[20] = 0; // mapped
        Response::data(&d, alloc)
    }

    fn mode_pages(&self, page: u8, changeable: bool) -> Option<Vec<u8>> {
        let caching = || {
            let mut p = vec![0u8; 20];
            p[0] = 0x08;
            p[1] = 18;
            if !changeable {
                p[2] = 0x04; // WCE: write cache enabled (flush and FUA go through)
            }
            p
        };
        let control = || {
            let mut p = vec![0u8; 12];
            p[0] = 0x0a;
            p[1] = 10;
            if !changeable {
                p[2] = 0x00;
                p[3] = 0x10; // queue algorithm modifier 1: unrestricted reordering
            }
            p
        };
        match page {
            0x08 => Some(caching()),
            0x0a => Some(control()),
            0x3f => {
                let mut v = caching();
                v.extend(control());
                Some(v)
            }
            _ => None,
        }
    }

    fn mode_sense(&self, cdb: &[u8; 16]) -> Response {
        let ten = cdb[0] == 0x5a;
        let page = cdb[2] & 0x3f;
        let pc = cdb[2] >> 6;
        let subpage = cdb[3];
        let dbd = cdb[1] & 0x08 != 0;
        let alloc = if ten {
            u16::from_be_bytes([cdb[7], cdb[8]]) as usize
        } else {
            cdb[4] as usize
        };
        if pc == 3 {
            return Response::check(Sense::new(0x05, 0x39, 0x00)); // saving not supported
        }
        if subpage != 0 && subpage != 0xff {
            return Response::check(Sense::INVALID_FIELD_IN_CDB);
        }
        let Some(pages) = self.mode_pages(page, pc == 1) else {
            return Response::check(Sense::INVALID_FIELD_IN_CDB);
        };
        // Device-specific parameter: WP, and DPOFUA (DPO and FUA are honoured).
        let wp = if self.info.read_only { 0x80 } else { 0 } | 0x10;
        let mut block_desc = Vec::new();
        if !dbd {
            let mut b = vec![0u8; 8];
            let n = self.info.blocks().min(0xffff_ffff) as u32;
            b[0..4].copy_from_slice(&n.to_be_bytes());
            b[5..8].copy_from_slice(&self.info.block_size.to_be_bytes()[1..]);
            block_desc = b;
        }
        let mut d = Vec::new();
        if ten {
            let len = 6 + block_desc.len() + pages.len();
            d.extend_from_slice(&(len as u16).to_be_bytes());
            d.extend_from_slice(&[0, wp, 0, 0]);
            d.extend_from_slice(&(block_desc.len() as u16).to_be_bytes());
        } else {
            let len = 3 + block_desc.len() + pages.len();
            d.extend_from_slice(&[len.min(255) as u8, 0, wp, block_desc.len() as u8]);
        }
        d.extend(block_desc);
        d.extend(pages);
        Response::data(&d, alloc)
    }

    fn mode_select(&self, cdb: &[u8; 16], data: Option<&IoBuf>) -> Response {
        // Pages are accepted only as they already are (nothing is changeable).
        let _ = (cdb, data);
        Response::good()
    }

    fn start_stop(&self, cdb: &[u8; 16]) -> Response {
        let loej = cdb[4] & 0x02 != 0;
        let start = cdb[4] & 0x01 != 0;
        if loej && !start && !self.info.prevent.lock().unwrap().is_empty() {
            return Response::check(Sense::REMOVAL_PREVENTED);
        }
        Response::good()
    }

    fn prevent_allow(&self, cdb: &[u8; 16], nexus: &Nexus) -> Response {
        let mut p = self.info.prevent.lock().unwrap();
        p.retain(|n| n != nexus);
        if cdb[4] & 0x03 != 0 {
            p.push(nexus.clone());
        }
        Response::good()
    }

    /// Checks that blocks `lba..lba+n` are in the LUN.
    fn range(&self, lba: u64, n: u64) -> Option<Response> {
        match lba.checked_add(n) {
            Some(end) if end <= self.info.blocks() => None,
            _ => Some(Response::check(Sense::LBA_OUT_OF_RANGE)),
        }
    }

    async fn sync_cache(&self, cdb: &[u8; 16]) -> Response {
        let (lba, n) = if cdb[0] == 0x35 {
            (
                u32::from_be_bytes(cdb[2..6].try_into().unwrap()) as u64,
                u16::from_be_bytes([cdb[7], cdb[8]]) as u64,
            )
        } else {
            (
                u64::from_be_bytes(cdb[2..10].try_into().unwrap()),
                u32::from_be_bytes(cdb[10..14].try_into().unwrap()) as u64,
            )
        };
        if let Some(r) = self.range(lba, n) {
            return r;
        }
        match self.volume.flush().await {
            Ok(()) => Response::good(),
            Err(e) => {
                tracing::warn!(error = %e, "SYNCHRONIZE CACHE failed");
                Response::check(Sense::WRITE_ERROR)
            }
        }
    }

    fn prefetch(&self, cdb: &[u8; 16]) -> Response {
        let (lba, n, _) = rw_args(cdb).unwrap();
        if let Some(r) = self.range(lba, n) {
            return r;
        }
        // Nothing is cached, so nothing is fetched; CONDITION MET says the blocks
        // would fit in the cache.
        Response {
            status: status::CONDITION_MET,
            sense: Vec::new(),
            data: None,
        }
    }

    async fn read_blocks(&self, lba: u64, n: u64) -> Result<IoBuf, Response> {
        let bs = self.info.block_size as u64;
        let buf = IoBuf::zeroed((n * bs) as usize);
        let (res, buf) = self.volume.read(lba * bs, buf).await;
        match res {
            Ok(()) => Ok(buf),
            Err(e) => {
                tracing::warn!(error = %e, lba, blocks = n, "read failed");
                Err(Response::check(Sense::READ_ERROR))
            }
        }
    }

    async fn read(&self, cdb: &[u8; 16]) -> Response {
        let (lba, n, flags) = rw_args(cdb).unwrap();
        if cdb[0] != 0x08 && flags & 0xe0 != 0 {
            // RDPROTECT: no protection information here.
            return Response::check(Sense::INVALID_FIELD_IN_CDB);
        }
        if let Some(r) = self.range(lba, n) {
            return r;
        }
        if n == 0 {
            return Response::good();
        }
        match self.read_blocks(lba, n).await {
            Ok(buf) => {
                let len = buf.len();
                Response {
                    status: status::GOOD,
                    sense: Vec::new(),
                    data: Some((buf, len)),
                }
            }
            Err(r) => r,
        }
    }

    /// Checks a write's CDB and data: Ok(None) for nothing to write.
    fn write_args(&self, cdb: &[u8; 16], data: &Option<IoBuf>) -> Result<Option<(u64, u64, bool)>, Response> {
        let (lba, n, flags) = rw_args(cdb).unwrap();
        if cdb[0] != 0x0a && flags & 0xe0 != 0 {
            return Err(Response::check(Sense::INVALID_FIELD_IN_CDB));
        }
        if self.info.read_only {
            return Err(Response::check(Sense::WRITE_PROTECTED));
        }
        if let Some(r) = self.range(lba, n) {
            return Err(r);
        }
        // The transport delivers at most its expected transfer length: when that is
        // shorter than the CDB's, only the whole blocks received are written (the
        // transport reports the residual).
        let got = data.as_ref().map_or(0, |d| d.len() as u64) / self.info.block_size as u64;
        let n = n.min(got);
        if n == 0 {
            return Ok(None);
        }
        Ok(Some((lba, n, cdb[0] != 0x0a && flags & 0x08 != 0)))
    }

    async fn write_buf(&self, lba: u64, buf: IoBuf, fua: bool) -> Result<IoBuf, Response> {
        let (res, buf) = self
            .volume
            .write(lba * self.info.block_size as u64, buf, fua)
            .await;
        match res {
            Ok(()) => Ok(buf),
            Err(e) => {
                tracing::warn!(error = %e, lba, "write failed");
                Err(Response::check(Sense::WRITE_ERROR))
            }
        }
    }

    /// `data` cut to exactly `n` blocks.
    fn exact(&self, data: IoBuf, n: u64) -> IoBuf {
        let want = (n * self.info.block_size as u64) as usize;
        if data.len() == want {
            data
        } else {
            IoBuf::from_slice(&data.as_slice()[..want])
        }
    }

    async fn write(&self, cdb: &[u8; 16], data: Option<IoBuf>) -> Response {
        match self.write_args(cdb, &data) {
            Err(r) => r,
            Ok(None) => Response::good(),
            Ok(Some((lba, n, fua))) => {
                let buf = self.exact(data.unwrap(), n);
                match self.write_buf(lba, buf, fua).await {
                    Ok(_) => Response::good(),
                    Err(r) => r,
                }
            }
        }
    }

    async fn write_verify(&self, cdb: &[u8; 16], data: Option<IoBuf>) -> Response {
        match self.write_args(cdb, &data) {
            Err(r) => r,
            Ok(None) => Response::good(),
            Ok(Some((lba, n, _))) => {
                // Verification: the write is made durable (FUA) before it completes.
                let buf = self.exact(data.unwrap(), n);
                match self.write_buf(lba, buf, true).await {
                    Ok(_) => Response::good(),
                    Err(r) => r,
                }
            }
        }
    }

    async fn verify(&self, cdb: &[u8; 16], data: Option<IoBuf>) -> Response {
        let (lba, n, flags) = rw_args(cdb).unwrap();
        if flags & 0xe0 != 0 {
            return Response::check(Sense::INVALID_FIELD_IN_CDB);
        }
        if let Some(r) = self.range(lba, n) {
            return r;
        }
        let bytchk = (flags >> 1) & 0x03;
        if n == 0 || bytchk == 0 {
            // Without BYTCHK, the medium is checked: a read proves the blocks readable.
            if n > 0 {
                if let Err(r) = self.read_blocks(lba, n).await {
                    return r;
                }
            }
            return Response::good();
        }
        if bytchk != 1 {
            return Response::check(Sense::INVALID_FIELD_IN_CDB);
        }
        let want = (n * self.info.block_size as u64) as usize;
        let Some(data) = data.filter(|d| d.len() >= want) else {
            return Response::check(Sense::INVALID_FIELD_IN_CDB);
        };
        match self.read_blocks(lba, n).await {
            Err(r) => r,
            Ok(on_disk) => miscompare(on_disk.as_slice(), &data.as_slice()[..want]),
        }
    }

    async fn write_same(&self, cdb: &[u8; 16], data: Option<IoBuf>) -> Response {
        let (lba, n, flags) = rw_args(cdb).unwrap();
        let unmap = flags & 0x08 != 0;
        let anchor = flags & 0x10 != 0;
        let ndob = cdb[0] == 0x93 && flags & 0x01 != 0;
        if flags & 0xe0 != 0 || anchor {
            return Response::check(Sense::INVALID_FIELD_IN_CDB);
        }
        if self.info.read_only {
            return Response::check(Sense::WRITE_PROTECTED);
        }
        let bs = self.info.block_size as u64;
        let block: Vec<u8> = if ndob {
            vec![0; bs as usize]
        } else {
            match data {
                Some(d) if d.len() == bs as usize => d.as_slice().to_vec(),
                _ => return Response::check(Sense::INVALID_FIELD_IN_CDB),
            }
        };
        // Zero blocks means "to the end of the LUN".
        let n = if n == 0 {
            self.info.blocks().saturating_sub(lba)
        } else {
            n
        };
        if let Some(r) = self.range(lba, n) {
            return r;
        }
        if n > (MAX_TRANSFER / self.info.block_size) as u64 {
            return Response::check(Sense::INVALID_FIELD_IN_CDB);
        }
        if n == 0 {
            return Response::good();
        }
        let zero = block.iter().all(|&b| b == 0);
        let (off, len) = (lba * bs, n * bs);
        // With UNMAP the blocks are unmapped whatever the data block holds: they read
        // back as zeroes (LBPRZ), as SBC-3 allows.
        let res = if unmap {
            self.volume.discard(off, len).await
        } else if zero {
            self.volume.write_zeroes(off, len).await
        } else {
            // Written in chunks of up to 1 MiB of the repeated block.
            let per = ((1u64 << 20) / bs).max(1);
            let mut at = lba;
            let mut res = Ok(());
            while at < lba + n && res.is_ok() {
                let k = per.min(lba + n - at);
                let mut buf = IoBuf::zeroed((k * bs) as usize);
                for c in buf.as_mut_slice().chunks_mut(bs as usize) {
                    c.copy_from_slice(&block);
                }
                res = self.volume.write(at * bs, buf, false).await.0;
                at += k;
            }
            res
        };
        match res {
            Ok(()) => Response::good(),
            Err(e) => {
                tracing::warn!(error = %e, "WRITE SAME failed");
                Response::check(Sense::WRITE_ERROR)
            }
        }
    }

    async fn unmap(&self, cdb: &[u8; 16], data: Option<IoBuf>) -> Response {
        if self.info.read_only {
            return Response::check(Sense::WRITE_PROTECTED);
        }
        if cdb[1] & 0x01 != 0 {
            return Response::check(Sense::INVALID_FIELD_IN_CDB); // ANCHOR
        }
        let plen = u16::from_be_bytes([cdb[7], cdb[8]]) as usize;
        if plen == 0 {
            return Response::good();
        }
        let Some(data) = data else {
            return Response::check(Sense::PARAM_LIST_LENGTH);
        };
        let d = &data.as_slice()[..plen.min(data.len())];
        if d.len() < 8 {
            return Response::check(Sense::PARAM_LIST_LENGTH);
        }
        let desc_len = u16::from_be_bytes([d[2], d[3]]) as usize;
        if desc_len % 16 != 0 || 8 + desc_len > d.len() {
            return Response::check(Sense::PARAM_LIST_LENGTH);
        }
        let mut ranges = Vec::new();
        for desc in d[8..8 + desc_len].chunks(16) {
            let lba = u64::from_be_bytes(desc[0..8].try_into().unwrap());
            let n = u32::from_be_bytes(desc[8..12].try_into().unwrap()) as u64;
            if let Some(r) = self.range(lba, n) {
                return r;
            }
            ranges.push((lba, n));
        }
        let bs = self.info.block_size as u64;
        for (lba, n) in ranges.into_iter().filter(|(_, n)| *n > 0) {
            if let Err(e) = self.volume.discard(lba * bs, n * bs).await {
                tracing::warn!(error = %e, "UNMAP failed");
                return Response::check(Sense::WRITE_ERROR);
            }
        }
        Response::good()
    }

    async fn compare_and_write(&self, cdb: &[u8; 16], data: Option<IoBuf>) -> Response {
        let (lba, n, flags) = rw_args(cdb).unwrap();
        if flags & 0xe0 != 0 {
            return Response::check(Sense::INVALID_FIELD_IN_CDB);
        }
        if self.info.read_only {
            return Response::check(Sense::WRITE_PROTECTED);
        }
        if n > MAX_COMPARE_AND_WRITE as u64 {
            return Response::check(Sense::INVALID_FIELD_IN_CDB);
        }
        if let Some(r) = self.range(lba, n) {
            return r;
        }
        let len = (n * self.info.block_size as u64) as usize;
        let got = data.as_ref().map_or(0, |d| d.len());
        if got != 2 * len {
            return Response::check(Sense::INVALID_FIELD_IN_CDB);
        }
        let Some(data) = data.filter(|_| n > 0) else {
            return Response::good();
        };
        // Atomic: every write to these blocks, from any session, waits for this one's
        // range (`execute`).
        let on_disk = match self.read_blocks(lba, n).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let cmp = miscompare(on_disk.as_slice(), &data.as_slice()[..len]);
        if cmp.status != status::GOOD {
            return cmp;
        }
        let new = IoBuf::from_slice(&data.as_slice()[len..]);
        match self.write_buf(lba, new, flags & 0x08 != 0).await {
            Ok(_) => Response::good(),
            Err(r) => r,
        }
    }

    /// ORWRITE(16): the data is ORed into the blocks.
    async fn or_write(&self, cdb: &[u8; 16], data: Option<IoBuf>) -> Response {
        match self.write_args(cdb, &data) {
            Err(r) => r,
            Ok(None) => Response::good(),
            Ok(Some((lba, n, fua))) => {
                let mut blocks = match self.read_blocks(lba, n).await {
                    Ok(b) => b,
                    Err(r) => return r,
                };
                let data = data.unwrap();
                for (b, d) in blocks.as_mut_slice().iter_mut().zip(data.as_slice()) {
                    *b |= *d;
                }
                match self.write_buf(lba, blocks, fua).await {
                    Ok(_) => Response::good(),
                    Err(r) => r,
                }
            }
        }
    }

    /// READ DEFECT DATA(10) and (12): a volume has no defects; the list is empty, in
    /// the format asked for.
    fn read_defect_data(&self, cdb: &[u8; 16]) -> Response {
        if cdb[0] == 0x37 {
            let alloc = u16::from_be_bytes([cdb[7], cdb[8]]) as usize;
            Response::data(&[0, cdb[2] & 0x1f, 0, 0], alloc)
        } else {
            let alloc = u32::from_be_bytes(cdb[6..10].try_into().unwrap()) as usize;
            Response::data(&[0, cdb[1] & 0x1f, 0, 0, 0, 0, 0, 0], alloc)
        }
    }

    fn reserve6(&self, nexus: &Nexus) -> Response {
        let mut r = self.info.reservations.lock().unwrap();
        if r.holder.is_some() {
            return Response::conflict();
        }
        match &r.reserve6 {
            Some(h) if h != nexus => Response::conflict(),
            _ => {
                r.reserve6 = Some(nexus.clone());
                Response::good()
            }
        }
    }

    fn release6(&self, nexus: &Nexus) -> Response {
        let mut r = self.info.reservations.lock().unwrap();
        if r.reserve6.as_ref() == Some(nexus) {
            r.reserve6 = None;
        }
        Response::good()
    }

    fn pr_in(&self, cdb: &[u8; 16]) -> Response {
        let alloc = u16::from_be_bytes([cdb[7], cdb[8]]) as usize;
        let r = self.info.reservations.lock().unwrap();
        let mut d = r.generation.to_be_bytes().to_vec();
        match cdb[1] & 0x1f {
            0 => {
                // READ KEYS
                d.extend_from_slice(&((r.keys.len() * 8) as u32).to_be_bytes());
                for (_, k) in &r.keys {
                    d.extend_from_slice(&k.to_be_bytes());
                }
            }
            1 => {
                // READ RESERVATION
                match &r.holder {
                    None => d.extend_from_slice(&0u32.to_be_bytes()),
                    Some((holder, ty)) => {
                        d.extend_from_slice(&16u32.to_be_bytes());
                        let key = holder.as_ref().and_then(|h| r.key_of(h)).unwrap_or(0);
                        d.extend_from_slice(&key.to_be_bytes());
                        d.extend_from_slice(&[0, 0, 0, 0, 0, *ty, 0, 0]);
                    }
                }
            }
            2 => {
                // REPORT CAPABILITIES
                d = vec![0, 8, 0x00, 0x81, 0xea, 0x01, 0, 0];
                // type mask: WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX / EX_AC_AR
            }
            3 => {
                // READ FULL STATUS
                let mut body = Vec::new();
                for (n, k) in &r.keys {
                    let mut e = vec![0u8; 24];
                    e[0..8].copy_from_slice(&k.to_be_bytes());
                    if let Some((h, ty)) = &r.holder {
                        if h.as_ref().is_none_or(|h| h == n) {
                            e[12] = 0x01;
                            e[13] = *ty;
                        }
                    }
                    let tid = format!("{},i,0x{}", n.initiator, hexs(&n.isid));
                    let mut t = vec![0x45, 0, 0, 0];
                    let mut name = tid.into_bytes();
                    name.push(0);
                    while name.len() % 4 != 0 {
                        name.push(0);
                    }
                    t[2..4].copy_from_slice(&(name.len() as u16).to_be_bytes());
                    t.extend(name);
                    e[20..24].copy_from_slice(&(t.len() as u32).to_be_bytes());
                    e.extend(t);
                    body.extend(e);
                }
                d.extend_from_slice(&(body.len() as u32).to_be_bytes());
                d.extend(body);
            }
            _ => return Response::check(Sense::INVALID_FIELD_IN_CDB),
        }
        Response::data(&d, alloc)
    }

    fn pr_out(&self, cdb: &[u8; 16], data: Option<&IoBuf>, nexus: &Nexus) -> Response {
        let plen = u32::from_be_bytes(cdb[5..9].try_into().unwrap()) as usize;
        let sa = cdb[1] & 0x1f;
        let ty = cdb[2] & 0x0f;
        if plen != 24 {
            return Response::check(Sense::PARAM_LIST_LENGTH);
        }
        let Some(d) = data.filter(|d| d.len() >= 24) else {
            return Response::check(Sense::PARAM_LIST_LENGTH);
        };
        let d = d.as_slice();
        let key = u64::from_be_bytes(d[0..8].try_into().unwrap());
        let sa_key = u64::from_be_bytes(d[8..16].try_into().unwrap());
        let mut r = self.info.reservations.lock().unwrap();
        let mine = r.key_of(nexus);
        let valid_type = matches!(ty, 1 | 3 | 5 | 6 | 7 | 8);
        match sa {
            // REGISTER and REGISTER AND IGNORE EXISTING KEY
            0 | 6 => {
                if sa == 0 && mine.unwrap_or(0) != key {
                    return Response::conflict();
                }
                if sa_key == 0 {
                    if mine.is_some() {
                        r.keys.retain(|(n, _)| n != nexus);
                        if let Some((Some(h), _)) = &r.holder {
                            if h == nexus {
                                r.holder = None;
                            }
                        }
                        if r.keys.is_empty() {
                            r.holder = None;
                        }
                    }
                } else if let Some(e) = r.keys.iter_mut().find(|(n, _)| n == nexus) {
                    e.1 = sa_key;
                } else {
                    r.keys.push((nexus.clone(), sa_key));
                }
                r.generation = r.generation.wrapping_add(1);
                Response::good()
            }
            // RESERVE
            1 => {
                if mine != Some(key) {
                    return Response::conflict();
                }
                if !valid_type {
                    return Response::check(Sense::INVALID_FIELD_IN_CDB);
                }
                match &r.holder {
                    Some((_, t)) if *t != ty => Response::conflict(),
                    Some((Some(h), _)) if h != nexus => Response::conflict(),
                    _ => {
                        let all = matches!(ty, pr_type::WE_AR | pr_type::EA_AR);
                        r.holder = Some(((!all).then(|| nexus.clone()), ty));
                        Response::good()
                    }
                }
            }
            // RELEASE
            2 => {
                if mine != Some(key) {
                    return Response::conflict();
                }
                match r.holder.clone() {
                    None => Response::good(),
                    Some((h, t)) => {
                        if h.as_ref().is_some_and(|h| h != nexus) {
                            return Response::good();
                        }
                        if t != ty {
                            return Response::check(Sense::new(0x05, 0x26, 0x04));
                            // invalid release of PR
                        }
                        r.holder = None;
                        Response::good()
                    }
                }
            }
            // CLEAR
            3 => {
                if mine != Some(key) {
                    return Response::conflict();
                }
                r.keys.clear();
                r.holder = None;
                r.generation = r.generation.wrapping_add(1);
                Response::good()
            }
            // PREEMPT and PREEMPT AND ABORT
            4 | 5 => {
                if mine != Some(key) {
                    return Response::conflict();
                }
                let holder_key = r
                    .holder
                    .as_ref()
                    .and_then(|(h, _)| h.as_ref())
                    .and_then(|h| r.key_of(h));
                let all_regs = matches!(r.holder, Some((None, _)));
                if sa_key == 0 && !all_regs {
                    return Response::check(Sense::INVALID_FIELD_IN_PARAMS);
                }
                if r.holder.is_some() && (holder_key == Some(sa_key) || all_regs) {
                    r.keys.retain(|(n, k)| *k != sa_key || n == nexus);
                    if all_regs && sa_key == 0 {
                        r.keys.retain(|(n, _)| n == nexus);
                    }
                    let all = matches!(ty, pr_type::WE_AR | pr_type::EA_AR);
                    r.holder = Some(((!all).then(|| nexus.clone()), ty));
                } else {
                    let before = r.keys.len();
                    r.keys.retain(|(n, k)| *k != sa_key || n == nexus);
                    if r.keys.len() == before {
                        return Response::conflict();
                    }
                }
                r.generation = r.generation.wrapping_add(1);
                Response::good()
            }
            _ => Response::check(Sense::INVALID_FIELD_IN_CDB),
        }
    }

    fn report_opcodes(&self, cdb: &[u8; 16]) -> Response {
        let options = cdb[2] & 0x07;
        let rctd = cdb[2] & 0x80 != 0;
        let req_op = cdb[3];
        let req_sa = u16::from_be_bytes([cdb[4], cdb[5]]);
        let alloc = u32::from_be_bytes(cdb[6..10].try_into().unwrap()) as usize;
        let timeouts = |d: &mut Vec<u8>| {
            if rctd {
                d.extend_from_slice(&[0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            }
        };
        match options {
            0 => {
                let mut body = Vec::new();
                for &(op, sa, len) in SUPPORTED {
                    let mut e = vec![op, 0, 0, 0, 0, 0, 0, 0];
                    if let Some(sa) = sa {
                        e[2..4].copy_from_slice(&sa.to_be_bytes());
                        e[5] |= 0x01;
                    }
                    if rctd {
                        e[5] |= 0x02;
                    }
                    e[6..8].copy_from_slice(&(len as u16).to_be_bytes());
                    timeouts(&mut e);
                    body.extend(e);
                }
                let mut d = (body.len() as u32).to_be_bytes().to_vec();
                d.extend(body);
                Response::data(&d, alloc)
            }
            1..=3 => {
                let found = SUPPORTED.iter().find(|&&(op, sa, _)| {
                    op == req_op
                        && match (options, sa) {
                            (1, None) => true,
                            (2, Some(s)) => s == req_sa,
                            (3, s) => s.is_none_or(|s| s == req_sa),
                            _ => false,
                        }
                });
                if options == 1 && SUPPORTED.iter().any(|&(op, sa, _)| op == req_op && sa.is_some()) {
                    return Response::check(Sense::INVALID_FIELD_IN_CDB);
                }
                if options == 2 && !SUPPORTED.iter().any(|&(op, sa, _)| op == req_op && sa.is_some()) {
                    return Response::check(Sense::INVALID_FIELD_IN_CDB);
                }
                let mut d = vec![0u8, if found.is_some() { 3 } else { 1 }];
                if rctd {
                    d[1] |= 0x80;
                }
                match found {
                    Some(&(_, _, len)) => {
                        d.extend_from_slice(&(len as u16).to_be_bytes());
                        let mut usage = vec![0u8; len as usize];
                        usage[0] = req_op;
                        for b in usage.iter_mut().skip(1) {
                            *b = 0xff;
                        }
                        d.extend(usage);
                    }
                    None => d.extend_from_slice(&[0, 0]),
                }
                timeouts(&mut d);
                Response::data(&d, alloc)
            }
            _ => Response::check(Sense::INVALID_FIELD_IN_CDB),
        }
    }
}

fn hexs(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// GOOD if `a` equals `b`, else MISCOMPARE with the offset of the first difference.
fn miscompare(a: &[u8], b: &[u8]) -> Response {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        None => Response::good(),
        Some(at) => Response {
            status: status::CHECK_CONDITION,
            sense: Sense::MISCOMPARE.fixed(Some(at as u32)),
            data: None,
        },
    }
}

/// The data-out length a command carries, from its CDB (None: none).
pub fn data_out_len(cdb: &[u8; 16], block_size: u32) -> Option<u64> {
    let bs = block_size as u64;
    match cdb[0] {
        0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e | 0x8b => rw_args(cdb).map(|(_, n, _)| n * bs),
        0x2f | 0xaf | 0x8f => rw_args(cdb).and_then(|(_, n, f)| (f & 0x06 != 0).then_some(n * bs)),
        0x89 => rw_args(cdb).map(|(_, n, _)| 2 * n * bs),
        0x41 | 0x93 => Some(bs),
        0x42 => Some(u16::from_be_bytes([cdb[7], cdb[8]]) as u64),
        0x5f => Some(u32::from_be_bytes(cdb[5..9].try_into().unwrap()) as u64),
        0x15 => Some(cdb[4] as u64),
        0x55 => Some(u16::from_be_bytes([cdb[7], cdb[8]]) as u64),
        _ => None,
    }
}
