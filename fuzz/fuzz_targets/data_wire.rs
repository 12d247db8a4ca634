//! The data wire's decoder (`horn_proto::wire`) and send batching (`batch`).
//!
//! Feeds: the input as a byte stream of data-wire messages, requests and replies mixed,
//! split with `split_frame` until it fails or runs out.
//!
//! Checks, for every message that decodes:
//! - it re-encodes to exactly the bytes it came from, and decodes again to itself;
//! - it keeps the protocol's rules (docs/wire-protocol.md): range ops have a length of
//!   1 to 8 MiB (reads, writes) or to 4 GiB - 1 (discard, write-zeroes) that does not
//!   overflow the offset; flush and ping carry no offset or length; a hello carries a
//!   32-byte nonce and an identity of 1 to 128 bytes, and is answered with nothing or
//!   a nonce and a proof (64 bytes); a proof is 32 bytes; requests carry status 0;
//!   only writes carry FUA; reply payloads are bounded;
//! - sent through a `SendBatch` with partial sends of sizes the input picks, the
//!   messages come out byte for byte as they went in, each reported sent once, in
//!   order.

#![no_main]

use horn_proto::batch::{Message, SendBatch, MAX_BATCH};
use horn_proto::wire::{
    split_frame, Header, Op, Status, FLAG_FUA, HEADER_LEN, MAX_IDENTITY_LEN, MAX_IO_LEN, MAX_MESSAGE_LEN, NONCE_LEN,
};
use libfuzzer_sys::fuzz_target;

struct Framed {
    header: [u8; HEADER_LEN],
    payload: Vec<u8>,
    index: usize,
}

impl Message for Framed {
    fn header(&self) -> &[u8; HEADER_LEN] {
        &self.header
    }
    fn payload(&self) -> (*const u8, usize) {
        (self.payload.as_ptr(), self.payload.len())
    }
}

fn check_rules(h: &Header) {
    if h.reply {
        let max = match (h.status, h.op) {
            (Status::Ok, Op::Read) => MAX_IO_LEN,
            (Status::Ok, Op::Hello) => 2 * NONCE_LEN,
            (Status::Ok, _) => 0,
            _ => MAX_MESSAGE_LEN,
        };
        assert!(h.length <= max, "{h:?}");
        if (h.status, h.op) == (Status::Ok, Op::Hello) {
            assert!(matches!(h.length, 0 | 64), "a hello's answer is nothing or a nonce and a proof: {h:?}");
        }
        assert_eq!(h.flags, 0, "{h:?}");
        assert_eq!(h.payload_len(), h.length as usize);
        return;
    }
    assert_eq!(h.status, Status::Ok, "a request carries status 0: {h:?}");
    assert!(
        h.flags == 0 || (h.op == Op::Write && h.flags == FLAG_FUA),
        "{h:?}"
    );
    match h.op {
        Op::Read | Op::Write => assert!((1..=MAX_IO_LEN).contains(&h.length), "{h:?}"),
        Op::Discard | Op::WriteZeroes => assert!(h.length >= 1, "{h:?}"),
        Op::Flush | Op::Ping => assert_eq!((h.offset, h.length), (0, 0), "{h:?}"),
        Op::Hello => {
            assert!((NONCE_LEN + 1..=NONCE_LEN + MAX_IDENTITY_LEN).contains(&h.length), "{h:?}");
            assert_eq!(h.offset, 0, "{h:?}");
        }
        Op::Prove => assert_eq!((h.offset, h.length), (0, NONCE_LEN), "{h:?}"),
    }
    assert!(h.offset.checked_add(h.length as u64).is_some(), "{h:?}");
    let carries = matches!(h.op, Op::Write | Op::Hello | Op::Prove);
    assert_eq!(h.payload_len(), if carries { h.length as usize } else { 0 });
}

/// Sends `msgs` through a batch, the kernel taking the sizes `steps` picks, and
/// returns the bytes sent and the order in which messages were reported sent.
fn send_all(msgs: Vec<Framed>, steps: &[u8]) -> (Vec<u8>, Vec<usize>) {
    let mut batch = SendBatch::default();
    for m in msgs {
        batch.push(Box::new(m));
    }
    let mut wire = Vec::new();
    let mut done = Vec::new();
    let mut step = steps.iter().cycle();
    while let Some((iov, n)) = batch.next_send() {
        assert!(n as usize <= 2 * MAX_BATCH, "{n} iovecs");
        assert!(batch.next_send().is_none(), "one send at a time");
        // SAFETY: the batch's iovecs point at the boxed messages it holds.
        let iov = unsafe { std::slice::from_raw_parts(iov, n as usize) };
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        assert!(total > 0, "a send of nothing");
        // The kernel takes 1 byte to all of it; a zero step means all of it.
        let take = match step.next().copied().unwrap_or(0) {
            0 => total,
            s => (s as usize * 7).min(total),
        };
        let mut left = take;
        for v in iov {
            let n = v.iov_len.min(left);
            // SAFETY: as above; `n` is within the iovec.
            wire.extend_from_slice(unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, n) });
            left -= n;
        }
        batch.sent(take, |m| done.push(m.index));
    }
    assert!(batch.is_idle());
    (wire, done)
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the partial send sizes' seed; the rest is the stream.
    let (steps, stream) = match data.split_first() {
        Some((&n, rest)) => (rest.get(..(n as usize % 8)).unwrap_or(&[]), rest),
        None => return,
    };
    let mut rest = stream;
    let mut msgs = Vec::new();
    while let Ok(Some((h, n))) = split_frame(rest) {
        assert_eq!(n, HEADER_LEN + h.payload_len());
        let raw: [u8; HEADER_LEN] = rest[..HEADER_LEN].try_into().unwrap();
        assert_eq!(h.encode(), raw, "{h:?} re-encodes to other bytes");
        assert_eq!(Header::decode(&h.encode()), Ok(h));
        check_rules(&h);
        msgs.push(Framed {
            header: raw,
            payload: rest[HEADER_LEN..n].to_vec(),
            index: msgs.len(),
        });
        rest = &rest[n..];
    }
    let consumed = stream.len() - rest.len();
    let count = msgs.len();
    let (wire, done) = send_all(msgs, steps);
    assert_eq!(wire, &stream[..consumed], "the batch sent other bytes");
    assert_eq!(
        done,
        (0..count).collect::<Vec<_>>(),
        "messages reported out of order"
    );
});
