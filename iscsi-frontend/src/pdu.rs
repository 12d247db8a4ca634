//! iSCSI PDUs (RFC 7143 §11): the 48-byte basic header segment, framing of a byte
//! stream into PDUs, and CRC32C digests.
//!
//! Parsing borrows: [`parse`] finds one whole PDU at the front of a buffer and says
//! where its data segment lies, so a write's data is copied once, from the receive
//! buffer into the I/O buffer.

/// Length of the basic header segment.
pub const BHS_LEN: usize = 48;

/// Task tag meaning "none" (unsolicited PDUs, no target transfer tag).
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// PDU op codes (the low six bits of byte 0).
pub mod op {
    /// NOP-Out (initiator ping).
    pub const NOP_OUT: u8 = 0x00;
    /// SCSI Command.
    pub const SCSI_CMD: u8 = 0x01;
    /// Task Management Function Request.
    pub const TASK_MGMT: u8 = 0x02;
    /// Login Request.
    pub const LOGIN: u8 = 0x03;
    /// Text Request.
    pub const TEXT: u8 = 0x04;
    /// SCSI Data-Out.
    pub const DATA_OUT: u8 = 0x05;
    /// Logout Request.
    pub const LOGOUT: u8 = 0x06;
    /// SNACK Request.
    pub const SNACK: u8 = 0x10;
    /// NOP-In.
    pub const NOP_IN: u8 = 0x20;
    /// SCSI Response.
    pub const SCSI_RESP: u8 = 0x21;
    /// Task Management Function Response.
    pub const TASK_MGMT_RESP: u8 = 0x22;
    /// Login Response.
    pub const LOGIN_RESP: u8 = 0x23;
    /// Text Response.
    pub const TEXT_RESP: u8 = 0x24;
    /// SCSI Data-In.
    pub const DATA_IN: u8 = 0x25;
    /// Logout Response.
    pub const LOGOUT_RESP: u8 = 0x26;
    /// Ready To Transfer.
    pub const R2T: u8 = 0x31;
    /// Asynchronous Message.
    pub const ASYNC: u8 = 0x32;
    /// Reject.
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (§11.17.1).
pub mod reject {
    /// Data (payload) digest error.
    pub const DATA_DIGEST: u8 = 0x02;
    /// Protocol error.
    pub const PROTOCOL: u8 = 0x04;
    /// Command not supported.
    pub const NOT_SUPPORTED: u8 = 0x05;
    /// Invalid PDU field.
    pub const INVALID_FIELD: u8 = 0x09;
}

/// A basic header segment.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bhs(pub [u8; BHS_LEN]);

impl std::fmt::Debug for Bhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Bhs(op {:#04x}, flags {:#04x}, itt {:#x}, data {})",
            self.opcode(),
            self.flags(),
            self.itt(),
            self.data_len()
        )
    }
}

impl Bhs {
    /// A zeroed header with op code `op` and flags byte `flags`.
    pub fn new(op: u8, flags: u8) -> Bhs {
        let mut b = [0u8; BHS_LEN];
        b[0] = op;
        b[1] = flags;
        Bhs(b)
    }
    /// Op code.
    pub fn opcode(&self) -> u8 {
        self.0[0] & 0x3f
    }
    /// The I (immediate delivery) bit.
    pub fn immediate(&self) -> bool {
        self.0[0] & 0x40 != 0
    }
    /// Byte 1: the F bit and op-code-specific flags.
    pub fn flags(&self) -> u8 {
        self.0[1]
    }
    /// The F (final) bit.
    pub fn final_bit(&self) -> bool {
        self.0[1] & 0x80 != 0
    }
    /// Total length of the additional header segments, in bytes.
    pub fn ahs_len(&self) -> usize {
        self.0[4] as usize * 4
    }
    /// Length of the data segment, without padding.
    pub fn data_len(&self) -> usize {
        u32::from_be_bytes([0, self.0[5], self.0[6], self.0[7]]) as usize
    }
    /// Sets the data segment length.
    pub fn set_data_len(&mut self, len: usize) {
        let b = (len as u32).to_be_bytes();
        self.0[5..8].copy_from_slice(&b[1..]);
    }
    /// Bytes 8..16: the LUN field (or ISID and TSIH in login PDUs).
    pub fn lun(&self) -> u64 {
        self.u64_at(8)
    }
    /// Initiator task tag.
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }
    /// A big-endian u32 at `at`.
    pub fn u32_at(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.0[at..at + 4].try_into().unwrap())
    }
    /// A big-endian u64 at `at`.
    pub fn u64_at(&self, at: usize) -> u64 {
        u64::from_be_bytes(self.0[at..at + 8].try_into().unwrap())
    }
    /// A big-endian u16 at `at`.
    pub fn u16_at(&self, at: usize) -> u16 {
        u16::from_be_bytes(self.0[at..at + 2].try_into().unwrap())
    }
    /// Sets a big-endian u32 at `at`.
    pub fn set_u32(&mut self, at: usize, v: u32) -> &mut Self {
        self.0[at..at + 4].copy_from_slice(&v.to_be_bytes());
        self
    }
    /// Sets a big-endian u64 at `at`.
    pub fn set_u64(&mut self, at: usize, v: u64) -> &mut Self {
        self.0[at..at + 8].copy_from_slice(&v.to_be_bytes());
        self
    }
    /// Sets a big-endian u16 at `at`.
    pub fn set_u16(&mut self, at: usize, v: u16) -> &mut Self {
        self.0[at..at + 2].copy_from_slice(&v.to_be_bytes());
        self
    }
    /// CmdSN (requests: bytes 24..28).
    pub fn cmd_sn(&self) -> u32 {
        self.u32_at(24)
    }
    /// ExpStatSN (requests: bytes 28..32).
    pub fn exp_stat_sn(&self) -> u32 {
        self.u32_at(28)
    }
}

/// Which digests a connection uses (negotiated at login; none before).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digests {
    /// CRC32C over the header segments.
    pub header: bool,
    /// CRC32C over the data segment and its padding.
    pub data: bool,
}

/// CRC32C as iSCSI sends it: little-endian (RFC 7143 §13.1, the examples of B.4).
pub fn digest(parts: &[&[u8]]) -> [u8; 4] {
    let mut crc = 0;
    for p in parts {
        crc = crc32c::crc32c_append(crc, p);
    }
    crc.to_le_bytes()
}

/// Padding after a data segment of `len` bytes, to a multiple of 4.
pub fn pad(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// Why a byte stream is not a valid PDU sequence. Every one ends the connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PduError {
    /// The header digest does not match.
    #[error("header digest mismatch (got {got:#010x}, computed {want:#010x})")]
    HeaderDigest {
        /// Received.
        got: u32,
        /// Computed.
        want: u32,
    },
    /// The data digest does not match.
    #[error("data digest mismatch on a PDU with ITT {itt:#x}")]
    DataDigest {
        /// The PDU's header.
        bhs: Box<Bhs>,
        /// Its initiator task tag.
        itt: u32,
    },
    /// The data segment is longer than this side declared it can receive.
    #[error("data segment of {len} bytes is over MaxRecvDataSegmentLength {max}")]
    TooLong {
        /// The PDU's header.
        bhs: Box<Bhs>,
        /// Its data segment length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// One PDU found at the front of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The basic header segment.
    pub bhs: Bhs,
    /// Where the data segment lies in the buffer (without padding or digest).
    pub data: std::ops::Range<usize>,
    /// Bytes the whole PDU takes (header, AHS, digests, data, padding).
    pub len: usize,
}

/// Finds the PDU at the front of `buf`: `Ok(None)` if `buf` holds only part of it.
/// Data segments over `max_data` bytes are refused before they are waited for.
pub fn parse(buf: &[u8], digests: Digests, max_data: usize) -> Result<Option<Frame>, PduError> {
    if buf.len() < BHS_LEN {
        return Ok(None);
    }
    let bhs = Bhs(buf[..BHS_LEN].try_into().unwrap());
    let header_end = BHS_LEN + bhs.ahs_len();
    let data_start = header_end + if digests.header { 4 } else { 0 };
    let data_len = bhs.data_len();
    if data_len > max_data {
        return Err(PduError::TooLong {
            bhs: Box::new(bhs),
            len: data_len,
            max: max_data,
        });
    }
    let padded = data_len + pad(data_len);
    let ddigest = if digests.data && data_len > 0 { 4 } else { 0 };
    let total = data_start + padded + ddigest;
    if buf.len() < total {
        return Ok(None);
    }
    if digests.header {
        let want = digest(&[&buf[..header_end]]);
        let got: [u8; 4] = buf[header_end..data_start].try_into().unwrap();
        if got != want {
            return Err(PduError::HeaderDigest {
                got: u32::from_le_bytes(got),
                want: u32::from_le_bytes(want),
            });
        }
    }
    if ddigest > 0 {
        let want = digest(&[&buf[data_start..data_start + padded]]);
        if buf[data_start + padded..total] != want {
            return Err(PduError::DataDigest {
                bhs: Box::new(bhs),
                itt: bhs.itt(),
            });
        }
    }
    Ok(Some(Frame {
        bhs,
        data: data_start..data_start + data_len,
        len: total,
    }))
}

/// Appends `bhs` and `data` as one PDU to `out`, with padding and digests.
pub fn encode(out: &mut Vec<u8>, bhs: &Bhs, data: &[u8], digests: Digests) {
    let mut bhs = *bhs;
    bhs.set_data_len(data.len());
    out.extend_from_slice(&bhs.0);
    if digests.header {
        out.extend_from_slice(&digest(&[&bhs.0]));
    }
    if !data.is_empty() {
        out.extend_from_slice(data);
        let p = pad(data.len());
        out.extend_from_slice(&[0u8; 3][..p]);
        if digests.data {
            out.extend_from_slice(&digest(&[data, &[0u8; 3][..p]]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_matches_the_rfc_example() {
        // RFC 3720 B.4: 32 bytes of zeroes give CRC 0x8a9136aa, sent aa 36 91 8a.
        assert_eq!(digest(&[&[0u8; 32]]), [0xaa, 0x36, 0x91, 0x8a]);
        assert_eq!(digest(&[&[0u8; 16], &[0u8; 16]]), [0xaa, 0x36, 0x91, 0x8a]);
    }

    #[test]
    fn a_pdu_round_trips_with_and_without_digests() {
        for (h, d) in [(false, false), (true, false), (false, true), (true, true)] {
            let digests = Digests { header: h, data: d };
            let mut bhs = Bhs::new(op::SCSI_CMD, 0x80);
            bhs.set_u32(16, 0x1234);
            let mut out = Vec::new();
            encode(&mut out, &bhs, b"hello", digests);
            encode(&mut out, &bhs, b"", digests);
            let f = parse(&out, digests, 8192).unwrap().unwrap();
            assert_eq!(f.bhs.itt(), 0x1234);
            assert_eq!(&out[f.data.clone()], b"hello");
            let g = parse(&out[f.len..], digests, 8192).unwrap().unwrap();
            assert_eq!(g.data.len(), 0);
            assert_eq!(f.len + g.len, out.len());
            // Any prefix is incomplete, never an error.
            for cut in 0..f.len {
                assert_eq!(parse(&out[..cut], digests, 8192), Ok(None));
            }
        }
    }

    #[test]
    fn bad_digests_and_long_segments_are_refused() {
        let digests = Digests {
            header: true,
            data: true,
        };
        let mut out = Vec::new();
        encode(&mut out, &Bhs::new(op::NOP_OUT, 0x80), b"ping", digests);
        let mut bad = out.clone();
        bad[3] ^= 1;
        assert!(matches!(
            parse(&bad, digests, 8192),
            Err(PduError::HeaderDigest { .. })
        ));
        let mut bad = out.clone();
        bad[BHS_LEN + 4] ^= 1;
        assert!(matches!(
            parse(&bad, digests, 8192),
            Err(PduError::DataDigest { .. })
        ));
        assert!(matches!(parse(&out, digests, 3), Err(PduError::TooLong { .. })));
    }

    proptest::proptest! {
        #[test]
        fn parsing_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400),
                                                h: bool, d: bool) {
            let digests = Digests { header: h, data: d };
            if let Ok(Some(f)) = parse(&bytes, digests, 256) {
                proptest::prop_assert!(f.len <= bytes.len());
                proptest::prop_assert!(f.data.end <= f.len);
            }
        }
    }
}
