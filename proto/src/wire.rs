//! The data wire: how an engine and a replica exchange reads, writes, flushes,
//! discards and pings over one TCP connection. Specified in `docs/wire-protocol.md`.
//!
//! Every message is a fixed 40-byte [`Header`] followed by a payload whose length the
//! header determines ([`Header::payload_len`]): the data of a write request or of a
//! successful read reply, or the UTF-8 message of an error reply. Many requests may be
//! in flight on a connection; replies carry the request's id and may come back in any
//! order. Decoding is strict: anything not exactly as specified is an error that names
//! the problem, and the receiver closes the connection after replying to it.

use std::fmt;

/// First four bytes of every header: `HORN`.
pub const MAGIC: [u8; 4] = *b"HORN";
/// The protocol version this code speaks.
pub const VERSION: u8 = 1;
/// Length of every header in bytes.
pub const HEADER_LEN: usize = 40;
/// Largest data payload (read or write) one request may carry.
pub const MAX_IO_LEN: u32 = 8 << 20;
/// Largest error message a reply may carry.
pub const MAX_MESSAGE_LEN: u32 = 4096;
/// Longest engine identity a [`Op::Hello`] may carry.
pub const MAX_IDENTITY_LEN: u32 = 128;
/// Bytes of a nonce and of a proof in the handshake ([`Op::Hello`], [`Op::Prove`]).
pub const NONCE_LEN: u32 = crate::auth::LEN as u32;
/// Bit set in the op byte of a reply.
const REPLY_BIT: u8 = 0x80;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// Read `length` bytes at `offset`.
    Read = 1,
    /// Write the `length`-byte payload at `offset`.
    Write = 2,
    /// Make every write answered before this request durable.
    Flush = 3,
    /// Deallocate `length` bytes at `offset`; they read as zeros afterwards.
    Discard = 4,
    /// Make `length` bytes at `offset` read as zeros.
    WriteZeroes = 5,
    /// Do nothing but answer (liveness and round-trip time).
    Ping = 6,
    /// Name the engine that sends on this connection and start the handshake: the
    /// payload is the engine's nonce ([`NONCE_LEN`] bytes) and its identity (UTF-8, 1 to
    /// [`MAX_IDENTITY_LEN`] bytes). A replica claimed by a named engine takes reads,
    /// writes, flushes and discards at the claim's generation only on a connection
    /// that has named that engine. A replica that holds its volume's secret answers
    /// with its own nonce and its proof (2 × [`NONCE_LEN`] bytes), and then serves
    /// nothing but pings until [`Op::Prove`].
    Hello = 7,
    /// The engine's proof over both nonces of the handshake ([`NONCE_LEN`] bytes), at
    /// the hello's generation (see [`crate::auth`]).
    Prove = 8,
}

impl Op {
    fn from_u8(b: u8) -> Option<Op> {
        Some(match b {
            1 => Op::Read,
            2 => Op::Write,
            3 => Op::Flush,
            4 => Op::Discard,
            5 => Op::WriteZeroes,
            6 => Op::Ping,
            7 => Op::Hello,
            8 => Op::Prove,
            _ => return None,
        })
    }

    /// Does the op carry an offset and a non-zero length?
    fn has_range(self) -> bool {
        matches!(self, Op::Read | Op::Write | Op::Discard | Op::WriteZeroes)
    }
}

/// Flag of a write: durable on the replica before the reply (forced unit access).
pub const FLAG_FUA: u16 = 1;
const KNOWN_FLAGS: u16 = FLAG_FUA;

/// Outcome codes of replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Status {
    /// Done.
    Ok = 0,
    /// The request was malformed; the replica closes the connection after this reply.
    BadRequest = 1,
    /// The range reaches past the end of the volume.
    OutOfRange = 2,
    /// Offset or length is not a multiple of the sector size.
    Misaligned = 3,
    /// The request carries an older generation than the replica has seen: it comes from
    /// an engine that has been replaced, and is refused.
    StaleGeneration = 4,
    /// The replica's disk failed the operation.
    IoError = 5,
    /// The replica does not take this request now (for example, not open for I/O).
    Unavailable = 6,
    /// The connection has not proven it holds the volume's key of the request's
    /// generation; the replica closes it after this reply.
    Unauthenticated = 7,
}

impl Status {
    fn from_u16(v: u16) -> Option<Status> {
        Some(match v {
            0 => Status::Ok,
            1 => Status::BadRequest,
            2 => Status::OutOfRange,
            3 => Status::Misaligned,
            4 => Status::StaleGeneration,
            5 => Status::IoError,
            6 => Status::Unavailable,
            7 => Status::Unauthenticated,
            _ => return None,
        })
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Ok => "ok",
            Status::BadRequest => "bad request",
            Status::OutOfRange => "out of range",
            Status::Misaligned => "misaligned",
            Status::StaleGeneration => "stale generation",
            Status::IoError => "I/O error",
            Status::Unavailable => "unavailable",
            Status::Unauthenticated => "unauthenticated",
        })
    }
}

/// Why bytes are not a valid header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The first four bytes are not `HORN`.
    #[error("bad magic {0:02x?}: not a Horn data-wire header")]
    BadMagic([u8; 4]),
    /// A version this code does not speak.
    #[error("protocol version {0} is not supported (this side speaks {VERSION})")]
    UnsupportedVersion(u8),
    /// An op byte that names no op.
    #[error("unknown op {0:#04x}")]
    UnknownOp(u8),
    /// Flag bits this version does not define, or a flag on an op it does not apply to.
    #[error("flags {flags:#06x} are not valid on {op:?}")]
    BadFlags {
        /// The op.
        op: Op,
        /// The flags given.
        flags: u16,
    },
    /// A status code that names no status, or a status on a request.
    #[error("status {0} is not valid here")]
    BadStatus(u16),
    /// Reserved bytes that are not zero.
    #[error("reserved bytes are not zero")]
    Reserved,
    /// A length the op does not allow (zero for a range op, non-zero for flush or ping,
    /// or larger than the maximum).
    #[error("length {length} is not valid for {op:?} (at most {max})")]
    BadLength {
        /// The op.
        op: Op,
        /// The length given.
        length: u32,
        /// The largest length allowed.
        max: u32,
    },
    /// An offset on an op that has none, or a range that overflows.
    #[error("offset {offset} is not valid for {op:?}")]
    BadOffset {
        /// The op.
        op: Op,
        /// The offset given.
        offset: u64,
    },
}

/// One message header, request or reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The operation.
    pub op: Op,
    /// Is this a reply?
    pub reply: bool,
    /// [`FLAG_FUA`] on writes; zero otherwise.
    pub flags: u16,
    /// Chosen by the requester; echoed in the reply.
    pub id: u64,
    /// Byte offset in the volume (range ops; zero otherwise).
    pub offset: u64,
    /// Requests: bytes to read, write, discard or zero. Replies: bytes of payload that
    /// follow (read data, or an error message).
    pub length: u32,
    /// Replies: the outcome. Requests: always [`Status::Ok`].
    pub status: Status,
    /// Requests: the sender's replica-set generation. Replies: the replica's.
    pub generation: u64,
}

impl Header {
    /// A request header.
    pub fn request(op: Op, id: u64, offset: u64, length: u32, generation: u64) -> Header {
        Header {
            op,
            reply: false,
            flags: 0,
            id,
            offset,
            length,
            status: Status::Ok,
            generation,
        }
    }

    /// The reply to `req` with `status` and `payload_len` bytes of payload.
    pub fn reply_to(req: &Header, status: Status, payload_len: u32, generation: u64) -> Header {
        Header {
            op: req.op,
            reply: true,
            flags: 0,
            id: req.id,
            offset: req.offset,
            length: payload_len,
            status,
            generation,
        }
    }

    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> usize {
        match (self.reply, self.op) {
            (false, Op::Write | Op::Hello | Op::Prove) => self.length as usize,
            (false, _) => 0,
            (true, _) => self.length as usize,
        }
    }

    /// The header's 40 bytes, little-endian.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = VERSION;
        b[5] = self.op as u8 | if self.reply { REPLY_BIT } else { 0 };
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..28].copy_from_slice(&self.length.to_le_bytes());
        b[28..30].copy_from_slice(&(self.status as u16).to_le_bytes());
        // 30..32 reserved
        b[32..40].copy_from_slice(&self.generation.to_le_bytes());
        b
    }

    /// Parses and checks a header.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let magic: [u8; 4] = b[0..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        if b[4] != VERSION {
            return Err(WireError::UnsupportedVersion(b[4]));
        }
        let reply = b[5] & REPLY_BIT != 0;
        let op = Op::from_u8(b[5] & !REPLY_BIT).ok_or(WireError::UnknownOp(b[5]))?;
        let flags = u16_at(6);
        let allowed = if op == Op::Write && !reply { KNOWN_FLAGS } else { 0 };
        if flags & !allowed != 0 {
            return Err(WireError::BadFlags { op, flags });
        }
        if u16_at(30) != 0 {
            return Err(WireError::Reserved);
        }
        let raw_status = u16_at(28);
        let status = Status::from_u16(raw_status).ok_or(WireError::BadStatus(raw_status))?;
        if !reply && status != Status::Ok {
            return Err(WireError::BadStatus(raw_status));
        }
        let h = Header {
            op,
            reply,
            flags,
            id: u64_at(8),
            offset: u64_at(16),
            length: u32_at(24),
            status,
            generation: u64_at(32),
        };
        h.check_lengths()?;
        Ok(h)
    }

    fn check_lengths(&self) -> Result<(), WireError> {
        let bad_len = |max| {
            Err(WireError::BadLength {
                op: self.op,
                length: self.length,
                max,
            })
        };
        if self.reply {
            let max = match (self.status, self.op) {
                (Status::Ok, Op::Read) => MAX_IO_LEN,
                (Status::Ok, Op::Hello) => 2 * NONCE_LEN,
                (Status::Ok, _) => 0,
                _ => MAX_MESSAGE_LEN,
            };
            if self.length > max {
                return bad_len(max);
            }
            // A hello is answered with nothing, or with a nonce and a proof.
            if (self.status, self.op) == (Status::Ok, Op::Hello) && !matches!(self.length, 0 | 64) {
                return bad_len(max);
            }
            return Ok(());
        }
        if self.op.has_range() {
            // Discard and write-zeroes carry no payload and may cover more than one I/O.
            let max = if matches!(self.op, Op::Read | Op::Write) {
                MAX_IO_LEN
            } else {
                u32::MAX
            };
            if self.length == 0 || self.length > max {
                return bad_len(max);
            }
            if self.offset.checked_add(self.length as u64).is_none() {
                return Err(WireError::BadOffset {
                    op: self.op,
                    offset: self.offset,
                });
            }
        } else {
            let (min, max) = match self.op {
                Op::Hello => (NONCE_LEN + 1, NONCE_LEN + MAX_IDENTITY_LEN),
                Op::Prove => (NONCE_LEN, NONCE_LEN),
                _ => (0, 0),
            };
            if self.length > max || self.length < min {
                return bad_len(max);
            }
            if self.offset != 0 {
                return Err(WireError::BadOffset {
                    op: self.op,
                    offset: self.offset,
                });
            }
        }
        Ok(())
    }
}

/// Points `iov` at what is left to send of a message after `sent` bytes went out:
/// the rest of the header, then the rest of the payload (`payload` as pointer and
/// length). Returns how many of the two iovecs are in use. A partial send resumes with
/// a second call.
pub fn frame_iovecs(
    header: &[u8; HEADER_LEN],
    payload: (*const u8, usize),
    sent: usize,
    iov: &mut [libc::iovec; 2],
) -> usize {
    let mut n = 0;
    if sent < HEADER_LEN {
        iov[0] = libc::iovec {
            iov_base: header[sent..].as_ptr() as *mut libc::c_void,
            iov_len: HEADER_LEN - sent,
        };
        n = 1;
    }
    let (ptr, len) = payload;
    let done = sent.saturating_sub(HEADER_LEN);
    if done < len {
        iov[n] = libc::iovec {
            // Pointer arithmetic only: `done < len` keeps it inside the payload.
            iov_base: ptr.wrapping_add(done) as *mut libc::c_void,
            iov_len: len - done,
        };
        n += 1;
    }
    n
}

/// Splits the first message off a byte stream: `Ok(None)` while the header or its
/// payload is incomplete, `Ok(Some((header, frame_len)))` once `buf` holds all of it.
pub fn split_frame(buf: &[u8]) -> Result<Option<(Header, usize)>, WireError> {
    let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let h = Header::decode(head)?;
    let total = HEADER_LEN + h.payload_len();
    Ok((buf.len() >= total).then_some((h, total)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn write_req() -> Header {
        Header {
            flags: FLAG_FUA,
            ..Header::request(Op::Write, 7, 4096, 8192, 3)
        }
    }

    #[test]
    fn headers_round_trip() {
        for h in [
            write_req(),
            Header::request(Op::Read, 1, 0, 512, 9),
            Header::request(Op::Flush, 2, 0, 0, 9),
            Header::request(Op::Ping, 3, 0, 0, 0),
            Header::request(Op::Hello, 4, 0, 48, 9),
            Header::request(Op::Prove, 5, 0, 32, 9),
            Header::reply_to(&Header::request(Op::Hello, 4, 0, 48, 9), Status::Ok, 64, 9),
            Header::reply_to(&write_req(), Status::StaleGeneration, 40, 4),
        ] {
            assert_eq!(Header::decode(&h.encode()), Ok(h));
        }
    }

    #[test]
    fn a_hello_carries_a_nonce_and_a_bounded_identity_and_a_proof_its_nonce() {
        assert_eq!(Header::request(Op::Hello, 1, 0, 48, 2).payload_len(), 48);
        for bad in [0, NONCE_LEN, NONCE_LEN + MAX_IDENTITY_LEN + 1] {
            let h = Header::request(Op::Hello, 1, 0, bad, 2);
            assert!(
                matches!(Header::decode(&h.encode()), Err(WireError::BadLength { .. })),
                "{bad}"
            );
        }
        for bad in [0, NONCE_LEN - 1, NONCE_LEN + 1] {
            let h = Header::request(Op::Prove, 1, 0, bad, 2);
            assert!(
                matches!(Header::decode(&h.encode()), Err(WireError::BadLength { .. })),
                "{bad}"
            );
        }
        let long = Header::reply_to(&Header::request(Op::Hello, 1, 0, 48, 2), Status::Ok, 65, 2);
        assert!(matches!(
            Header::decode(&long.encode()),
            Err(WireError::BadLength { .. })
        ));
        let at = Header::request(Op::Hello, 1, 4096, 48, 2);
        assert!(matches!(
            Header::decode(&at.encode()),
            Err(WireError::BadOffset { .. })
        ));
    }

    #[test]
    fn each_kind_of_damage_is_named() {
        let good = write_req().encode();
        let with = |i: usize, v: u8| {
            let mut b = good;
            b[i] = v;
            Header::decode(&b)
        };
        assert!(matches!(with(0, b'X'), Err(WireError::BadMagic(_))));
        assert_eq!(with(4, 2), Err(WireError::UnsupportedVersion(2)));
        assert_eq!(with(5, 0x7f), Err(WireError::UnknownOp(0x7f)));
        assert!(matches!(with(6, 0x04), Err(WireError::BadFlags { .. })));
        assert_eq!(with(30, 1), Err(WireError::Reserved));
        assert!(matches!(with(28, 1), Err(WireError::BadStatus(1))));
        assert!(matches!(with(27, 0xff), Err(WireError::BadLength { .. })));
        let flush_with_length = Header::request(Op::Flush, 1, 0, 512, 1).encode();
        assert!(matches!(
            Header::decode(&flush_with_length),
            Err(WireError::BadLength { .. })
        ));
        let zero_read = Header::request(Op::Read, 1, 0, 0, 1).encode();
        assert!(matches!(
            Header::decode(&zero_read),
            Err(WireError::BadLength { .. })
        ));
        let wrap = Header::request(Op::Read, 1, u64::MAX - 10, 512, 1).encode();
        assert!(matches!(Header::decode(&wrap), Err(WireError::BadOffset { .. })));
        assert!(WireError::UnknownOp(0x7f).to_string().contains("unknown op"));
    }

    #[test]
    fn frame_iovecs_resume_after_partial_sends() {
        let header = [7u8; HEADER_LEN];
        let payload = [9u8; 100];
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 2];
        let p = (payload.as_ptr(), payload.len());
        assert_eq!(frame_iovecs(&header, p, 0, &mut iov), 2);
        assert_eq!((iov[0].iov_len, iov[1].iov_len), (HEADER_LEN, 100));
        assert_eq!(frame_iovecs(&header, p, 10, &mut iov), 2);
        assert_eq!((iov[0].iov_len, iov[1].iov_len), (HEADER_LEN - 10, 100));
        assert_eq!(frame_iovecs(&header, p, HEADER_LEN + 60, &mut iov), 1);
        assert_eq!(iov[0].iov_len, 40);
        assert_eq!(iov[0].iov_base as usize, payload.as_ptr() as usize + 60);
        assert_eq!(frame_iovecs(&header, p, HEADER_LEN + 100, &mut iov), 0);
    }

    #[test]
    fn split_frame_waits_for_the_whole_payload() {
        let h = Header::request(Op::Write, 1, 0, 4096, 1);
        let mut stream = h.encode().to_vec();
        assert_eq!(split_frame(&stream[..10]), Ok(None));
        stream.extend_from_slice(&[0u8; 4000]);
        assert_eq!(split_frame(&stream), Ok(None));
        stream.extend_from_slice(&[0u8; 96]);
        assert_eq!(split_frame(&stream), Ok(Some((h, HEADER_LEN + 4096))));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
        ))]

        /// Arbitrary bytes: an error or a header that re-encodes to the same bytes.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let mut rest = &bytes[..];
            while let Ok(Some((h, n))) = split_frame(rest) {
                prop_assert_eq!(&h.encode()[..], &rest[..HEADER_LEN]);
                rest = &rest[n..];
            }
        }

        /// Valid headers with fields overwritten at random decode or fail cleanly.
        #[test]
        fn damaged_headers_decode_or_fail_cleanly(i in 0..HEADER_LEN, v in any::<u8>(), op in 1u8..=6) {
            let mut b = Header::request(Op::from_u8(op).unwrap(), 1, 0, 0, 1).encode();
            if Op::from_u8(op).unwrap().has_range() {
                b[24] = 1; // length 1
            }
            b[i] = v;
            if let Ok(h) = Header::decode(&b) {
                prop_assert_eq!(h.encode(), b);
            }
        }
    }
}
