//! The replica server's request handling (`horn_replica::server::DataServer`), on a real
//! replica.
//!
//! Feeds: the input as the bytes one client sends on one data-wire connection, then
//! closes its sending side. The server is the real one, started once per process on
//! loopback, its replica in the scratch directory (tmpfs): 2 MiB of 512-byte sectors,
//! a snapshot under the head (so discards log zero extents and partial writes merge
//! with an older layer), claimed at generation 3 by engine `engine-a`. The replica
//! keeps what earlier inputs wrote; nothing checked depends on its data.
//!
//! Checks, with a model of the protocol's rules (docs/wire-protocol.md) computed from
//! the input alone:
//! - the server answers with well-formed replies only, and ends the stream on a reply
//!   boundary;
//! - it answers exactly the requests the model says it reads: every whole request up to
//!   the first malformed header (answered "bad request", echoing its id, then the
//!   connection closes) or the first hello that is not UTF-8 (the same). Where the
//!   client sent more after that, the server closes with bytes unread, its kernel
//!   resets the connection and may drop replies not yet delivered: then every answer
//!   must be owed, but not every one owed must come;
//! - each answer's status is the one the rules give: stale or unclaimed generations,
//!   a claim held by another engine than the connection's hello named (the fence that
//!   keeps two engines from writing one replica), misaligned or out-of-range I/O, and
//!   otherwise success, a read carrying exactly the bytes asked for;
//! - the server thread is still serving after every input.

#![no_main]

use std::sync::OnceLock;

use horn_proto::wire::{split_frame, Header, Op, Status, HEADER_LEN, NONCE_LEN};
use libfuzzer_sys::fuzz_target;

use horn_fuzz::served_replica::{self, Served, GENERATION, HOLDER, SECTOR, SIZE};

fn served() -> &'static Served {
    static SERVED: OnceLock<Served> = OnceLock::new();
    SERVED.get_or_init(|| served_replica::start(&horn_fuzz::fresh_dir("replica_requests")))
}

/// What the server must answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Expected {
    id: u64,
    op: u8,
    offset: u64,
    status: u16,
    /// Bytes of payload of a successful read.
    data: u32,
}

/// The status the rules give `h`, sent on a connection whose hello named `engine`.
fn status_of(h: &Header, engine: Option<&str>) -> Status {
    if h.op == Op::Ping {
        return if h.generation < GENERATION {
            Status::StaleGeneration
        } else {
            Status::Ok
        };
    }
    if h.generation < GENERATION {
        return Status::StaleGeneration;
    }
    if h.generation > GENERATION {
        return Status::Unavailable;
    }
    if engine != Some(HOLDER) {
        return Status::StaleGeneration;
    }
    if h.op == Op::Flush {
        return Status::Ok;
    }
    let (offset, len) = (h.offset, h.length as u64);
    if offset % SECTOR != 0 || len % SECTOR != 0 {
        return Status::Misaligned;
    }
    if offset + len > SIZE {
        return Status::OutOfRange;
    }
    Status::Ok
}

/// The answers the server owes to `input`, in the order it reads the requests, and
/// whether it stops reading before the end (a refusal with bytes after it).
fn model(input: &[u8]) -> (Vec<Expected>, bool) {
    let mut out = Vec::new();
    let mut engine: Option<String> = None;
    let mut rest = input;
    let refusal = |raw: &[u8]| Expected {
        id: u64::from_le_bytes(raw[8..16].try_into().unwrap()),
        op: Op::Ping as u8,
        offset: 0,
        status: Status::BadRequest as u16,
        data: 0,
    };
    // The server decodes a header as soon as its 40 bytes are in, and waits for a
    // payload only for a request that carries one.
    while let Some(head) = rest.first_chunk::<HEADER_LEN>() {
        let h = match Header::decode(head) {
            Ok(h) if !h.reply => h,
            _ => {
                out.push(refusal(rest));
                return (out, rest.len() > HEADER_LEN);
            }
        };
        let n = HEADER_LEN + h.payload_len();
        if rest.len() < n {
            break;
        }
        let mut e = Expected {
            id: h.id,
            op: h.op as u8,
            offset: h.offset,
            status: 0,
            data: 0,
        };
        if h.op == Op::Prove {
            // This replica holds no secret: a proof is taken and changes nothing.
            e.status = Status::Ok as u16;
        } else if h.op == Op::Hello {
            // A 32-byte nonce, then the engine's name.
            match std::str::from_utf8(&rest[HEADER_LEN + NONCE_LEN as usize..n]) {
                Ok(name) => engine = Some(name.to_string()),
                Err(_) => {
                    e.status = Status::BadRequest as u16;
                    out.push(e);
                    return (out, rest.len() > n);
                }
            }
        } else {
            let status = status_of(&h, engine.as_deref());
            e.status = status as u16;
            if h.op == Op::Read && status == Status::Ok {
                e.data = h.length;
            }
        }
        out.push(e);
        rest = &rest[n..];
    }
    (out, false)
}

fuzz_target!(|data: &[u8]| {
    let served = served();
    let (want, stops_early) = model(data);
    let replies = served_replica::exchange(served.addr, data);
    assert!(!served.thread.is_finished(), "the server stopped");
    let mut got = Vec::new();
    let mut rest = &replies[..];
    while !rest.is_empty() {
        let (h, n) = match split_frame(rest) {
            Ok(Some(f)) => f,
            // Reset after a refusal: a reply may be cut (see above).
            Ok(None) if stops_early => break,
            other => panic!("the server sent a malformed or cut reply: {other:?}"),
        };
        assert!(h.reply, "the server sent a request: {h:?}");
        assert_eq!(h.generation, GENERATION);
        let read_data = if h.op == Op::Read && h.status == Status::Ok {
            h.length
        } else {
            0
        };
        got.push(Expected {
            id: h.id,
            op: h.op as u8,
            offset: h.offset,
            status: h.status as u16,
            data: read_data,
        });
        rest = &rest[n..];
    }
    let (mut want, mut got) = (want, got);
    want.sort_unstable();
    got.sort_unstable();
    if stops_early {
        // Closing with our bytes unread, the server's kernel resets the connection and
        // may drop replies still in its send buffer: none may be extra or wrong.
        for g in &got {
            let i = want.iter().position(|w| w == g);
            let i = i.unwrap_or_else(|| panic!("an answer the rules do not give: {g:?} (owed {want:?})"));
            want.remove(i);
        }
    } else {
        assert_eq!(got, want, "the server's answers differ from the rules'");
    }
});
