//! How a command ends: SCSI status codes, sense data (SPC-4), the [`Response`]
//! that carries them with any data-in, and REQUEST SENSE.

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
    /// NO SENSE: nothing to report.
    pub const NO_SENSE: Sense = Sense::new(0x00, 0x00, 0x00);
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
    /// ILLEGAL REQUEST, INVALID RELEASE OF PERSISTENT RESERVATION.
    pub const INVALID_RELEASE: Sense = Sense::new(0x05, 0x26, 0x04);
    /// ILLEGAL REQUEST, PARAMETER LIST LENGTH ERROR.
    pub const PARAM_LIST_LENGTH: Sense = Sense::new(0x05, 0x1a, 0x00);
    /// ILLEGAL REQUEST, SAVING PARAMETERS NOT SUPPORTED.
    pub const SAVING_NOT_SUPPORTED: Sense = Sense::new(0x05, 0x39, 0x00);
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
    /// UNIT ATTENTION, CAPACITY DATA HAS CHANGED (the volume was expanded).
    pub const CAPACITY_CHANGED: Sense = Sense::new(0x06, 0x2a, 0x09);
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
        Response::status(status::GOOD)
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
    /// GOOD with all of `buf` as data-in: a read's blocks, sent without a copy.
    pub fn blocks(buf: IoBuf) -> Response {
        let len = buf.len();
        Response {
            status: status::GOOD,
            sense: Vec::new(),
            data: Some((buf, len)),
        }
    }
    /// CHECK CONDITION with `sense`.
    pub fn check(sense: Sense) -> Response {
        Response::check_at(sense, None)
    }
    /// CHECK CONDITION with `sense`, and `info` in its INFORMATION field when given
    /// (MISCOMPARE says there where the first difference is).
    pub fn check_at(sense: Sense, info: Option<u32>) -> Response {
        Response {
            status: status::CHECK_CONDITION,
            sense: sense.fixed(info),
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

/// REQUEST SENSE. Sense data goes out with the command that raised it (autosense), and
/// unit attentions are told on the next command, so there is never any left to ask
/// for: NO SENSE, in the format asked for.
pub(super) fn request_sense(cdb: &[u8; 16]) -> Response {
    let alloc = cdb[4] as usize;
    if cdb[1] & 0x01 != 0 {
        // Descriptor format: no descriptors.
        return Response::data(&[0x72, 0, 0, 0, 0, 0, 0, 0], alloc);
    }
    Response::data(&Sense::NO_SENSE.fixed(None), alloc)
}
