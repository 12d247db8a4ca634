//! Writes the seed corpora, `seeds/<target>/`, from real sessions: the bytes the
//! crates' own encoders produce and their own code writes to disk, so that fuzzing
//! starts past the magic numbers, checksums and handshakes.
//!
//! - data wire: requests of an engine's session, sent to a real replica server
//!   (`served_replica`, the one `replica_requests` uses), and its replies as recorded;
//! - control: the calls an engine makes (claim, snapshots, blocks, membership, ...),
//!   prost-encoded, and a real replica's replies;
//! - iSCSI: logins as initiators make them (plain, CHAP, mutual CHAP, discovery and
//!   SendTargets, text over several PDUs, digests), and SCSI Command PDUs for every
//!   command the opcode table lists, in sessions (LUN discovery, writes and reads,
//!   UNMAP and WRITE SAME, reservations from two initiators, resets);
//! - files: `volume.json`, a zero log and `intent.bits` written by the replica code
//!   through snapshots, deletes, reverts, discards and marks.
//!
//! Run from `fuzz/`: `cargo run --example seeds`. It replaces `seeds/<target>/`;
//! crash reproducers live in `regressions/<target>/` and are left alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use horn_fuzz::served_replica;
use horn_iscsi::pdu::{self, op, Bhs, Digests};
use horn_iscsi::scsi::{data_out_len, opcode as sc};
use horn_proto::control::{self as c, Mode as WireMode};
use horn_proto::engine_control as e;
use horn_proto::wire::{Header, Op, FLAG_FUA};
use horn_replica::intent::{IntentLog, REGION_SIZE};
use horn_replica::meta::{VolumeMeta, META_FILE};
use horn_replica::Replica;
use prost::Message;

struct Seeds {
    root: PathBuf,
}

impl Seeds {
    fn target(&self, name: &str) -> PathBuf {
        let dir = self.root.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}

fn put(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).unwrap();
}

// ---- the data wire ----

fn req(op: Op, id: u64, offset: u64, len: u32, generation: u64) -> Vec<u8> {
    Header::request(op, id, offset, len, generation).encode().to_vec()
}

fn hello(id: u64, name: &[u8]) -> Vec<u8> {
    let mut b = req(Op::Hello, id, 0, 32 + name.len() as u32, 0);
    b.extend_from_slice(&[0x5a; 32]);
    b.extend_from_slice(name);
    b
}

fn write(id: u64, offset: u64, data: &[u8], fua: bool, generation: u64) -> Vec<u8> {
    let mut h = Header::request(Op::Write, id, offset, data.len() as u32, generation);
    if fua {
        h.flags = FLAG_FUA;
    }
    let mut b = h.encode().to_vec();
    b.extend_from_slice(data);
    b
}

/// Data-wire sessions, each the bytes a client sends on one connection.
fn wire_sessions() -> Vec<(&'static str, Vec<u8>)> {
    use served_replica::{GENERATION as G, HOLDER, SIZE};
    let engine_ops = |with_hello: bool| {
        let mut s = Vec::new();
        if with_hello {
            s.extend(hello(1, HOLDER.as_bytes()));
        }
        s.extend(write(2, 0, &[0xab; 4096], true, G));
        s.extend(write(3, 4096 + 512, &[0xcd; 512], false, G));
        s.extend(req(Op::Read, 4, 0, 8192, G));
        s.extend(req(Op::Flush, 5, 0, 0, G));
        s.extend(req(Op::Discard, 6, 8192, 4096, G));
        s.extend(req(Op::WriteZeroes, 7, 1 << 20, 8192, G));
        s.extend(req(Op::Read, 8, 1 << 20, 4096, G));
        s.extend(req(Op::Ping, 9, 0, 0, G));
        s
    };
    let mut generations = hello(1, HOLDER.as_bytes());
    generations.extend(req(Op::Read, 2, 0, 512, G - 1));
    generations.extend(req(Op::Read, 3, 0, 512, G + 1));
    generations.extend(req(Op::Ping, 4, 0, 0, G - 1));
    generations.extend(req(Op::Ping, 5, 0, 0, G + 1));
    generations.extend(req(Op::Flush, 6, 0, 0, G + 1));
    let mut ranges = hello(1, HOLDER.as_bytes());
    ranges.extend(req(Op::Read, 2, 100, 512, G));
    ranges.extend(req(Op::Read, 3, SIZE - 512, 1024, G));
    ranges.extend(req(Op::Discard, 4, 0, u32::MAX, G));
    ranges.extend(req(Op::WriteZeroes, 5, 512, 100, G));
    ranges.extend(write(6, SIZE, &[1; 512], false, G));
    let mut other_engine = hello(1, b"engine-b");
    other_engine.extend(write(2, 0, &[9; 512], false, G));
    other_engine.extend(req(Op::Read, 3, 0, 512, G));
    let mut malformed = hello(1, HOLDER.as_bytes());
    malformed.extend(req(Op::Ping, 2, 0, 0, G));
    let mut bad = req(Op::Ping, 3, 0, 0, G);
    bad[0] = b'X';
    malformed.extend(bad);
    malformed.extend(req(Op::Ping, 4, 0, 0, G));
    let mut reply = hello(1, HOLDER.as_bytes());
    let r = Header::reply_to(
        &Header::request(Op::Read, 2, 0, 512, G),
        horn_proto::wire::Status::Ok,
        0,
        G,
    );
    reply.extend(r.encode());
    let mut not_utf8 = hello(1, &[0xff, 0xfe, b'a']);
    not_utf8.extend(req(Op::Ping, 2, 0, 0, G));
    let mut cut = hello(1, HOLDER.as_bytes());
    cut.extend(&write(2, 0, &[7; 4096], false, G)[..140]);
    vec![
        ("engine_session", engine_ops(true)),
        ("unnamed_session_is_fenced", engine_ops(false)),
        ("generations", generations),
        ("bad_ranges", ranges),
        ("another_engine", other_engine),
        ("malformed_header_mid_stream", malformed),
        ("a_reply_sent_as_request", reply),
        ("hello_not_utf8", not_utf8),
        ("write_cut_short", cut),
    ]
}

fn data_wire(seeds: &Seeds) {
    let requests = seeds.target("replica_requests");
    let wire = seeds.target("data_wire");
    let dir = horn_fuzz::fresh_dir("seeds-wire");
    let served = served_replica::start(&dir);
    for (name, session) in wire_sessions() {
        put(&requests, name, &session);
        // The data_wire target's first byte picks partial send sizes.
        put(
            &wire,
            &format!("{name}.requests"),
            &[[3u8].as_slice(), &session].concat(),
        );
        let replies = served_replica::exchange(served.addr, &session);
        assert!(!served.thread.is_finished(), "the server stopped after {name}");
        put(
            &wire,
            &format!("{name}.replies"),
            &[[5u8].as_slice(), &replies].concat(),
        );
    }
}

// ---- control messages ----

/// One call as the control_messages target reads it.
fn call(kind: u8, caller: u8, msg: &impl Message) -> Vec<u8> {
    let body = msg.encode_to_vec();
    let mut b = vec![kind, caller];
    b.extend_from_slice(&(body.len() as u16).to_le_bytes());
    b.extend(body);
    b
}

const A: u8 = 1;
const B: u8 = 2;
const NONE: u8 = 0;

fn claim(generation: u64, engine: &str, volume: &str) -> c::ClaimRequest {
    c::ClaimRequest {
        generation,
        engine: engine.into(),
        volume: volume.into(),
        lease_ms: 0,
    }
}

fn control(seeds: &Seeds) {
    let dir = seeds.target("control_messages");
    let g = 1;
    let labels: std::collections::HashMap<String, String> = [("app".into(), "db".into())].into();
    let mut flow = Vec::new();
    flow.extend(call(1, A, &claim(g, "engine-a", "")));
    flow.extend(call(
        14,
        A,
        &c::BlocksData {
            generation: g,
            blocks: vec![0, 1],
            data: vec![0x5a; 8192],
        },
    ));
    flow.extend(call(
        7,
        A,
        &c::SnapshotRequest {
            generation: g,
            name: "s1".into(),
            labels,
        },
    ));
    flow.extend(call(
        14,
        A,
        &c::BlocksData {
            generation: g,
            blocks: vec![0],
            data: vec![0xa5; 4096],
        },
    ));
    flow.extend(call(
        12,
        NONE,
        &c::ChecksumsRequest {
            offset: 0,
            length: 65536,
        },
    ));
    flow.extend(call(
        13,
        NONE,
        &c::BlocksRequest {
            blocks: vec![0, 1, 5],
        },
    ));
    flow.extend(call(
        17,
        NONE,
        &c::LayerBlocksRequest {
            layer_id: 1,
            offset: 0,
            length: 2 << 20,
            extents_only: false,
        },
    ));
    flow.extend(call(18, NONE, &c::LayerZerosRequest { layer_id: 1 }));
    flow.extend(call(
        8,
        A,
        &c::DeleteSnapshotRequest {
            generation: g,
            name: "s1".into(),
        },
    ));
    flow.extend(call(9, A, &c::PurgeRequest { generation: g }));
    flow.extend(call(0, NONE, &c::InfoRequest {}));
    flow.extend(call(15, NONE, &c::IntentsRequest {}));
    flow.extend(call(16, A, &c::ClearIntentsRequest { generation: g }));
    flow.extend(call(
        6,
        A,
        &c::SetModeRequest {
            generation: g,
            mode: WireMode::Wo as i32,
        },
    ));
    flow.extend(call(
        6,
        A,
        &c::SetModeRequest {
            generation: g,
            mode: WireMode::Rw as i32,
        },
    ));
    flow.extend(call(
        11,
        A,
        &c::ExpandRequest {
            generation: g,
            size: 4 << 20,
        },
    ));
    flow.extend(call(
        5,
        A,
        &c::RenewLeaseRequest {
            generation: g,
            lease_ms: 1000,
        },
    ));
    flow.extend(call(19, A, &c::FinishSyncRequest { generation: g }));
    flow.extend(call(4, A, &c::ReleaseRequest { generation: g }));
    put(&dir, "engine_session", &flow);

    let mut revert = call(1, A, &claim(2, "engine-a", ""));
    for name in ["s1", "s2"] {
        revert.extend(call(
            7,
            A,
            &c::SnapshotRequest {
                generation: 2,
                name: name.into(),
                labels: Default::default(),
            },
        ));
    }
    revert.extend(call(
        10,
        A,
        &c::RevertRequest {
            generation: 2,
            name: "s1".into(),
        },
    ));
    revert.extend(call(
        8,
        A,
        &c::DeleteSnapshotRequest {
            generation: 2,
            name: "s2".into(),
        },
    ));
    revert.extend(call(9, A, &c::PurgeRequest { generation: 2 }));
    put(&dir, "snapshots_and_revert", &revert);

    let member = |id: &str, name: &str| c::Member {
        id: id.into(),
        name: name.into(),
    };
    let mut membership = call(1, A, &claim(2, "engine-a", "vol-1"));
    membership.extend(call(
        2,
        A,
        &c::MembershipRequest {
            record: Some(c::Membership {
                volume: "vol-1".into(),
                generation: 2,
                version: 0,
                engine: "engine-a".into(),
                rw: vec![member("00112233445566778899aabbccddeeff", "127.0.0.1:9500")],
                wo: vec![member("ffeeddccbbaa99887766554433221100", "127.0.0.1:9510")],
                after: vec![c::MemberSet {
                    members: vec![member("00112233445566778899aabbccddeeff", "127.0.0.1:9500")],
                }],
                authority: String::new(),
                cipher: String::new(),
            }),
        },
    ));
    membership.extend(call(
        3,
        NONE,
        &c::SalvageRequest {
            above_generation: 2,
            above_version: 0,
            name: "127.0.0.1:9500".into(),
        },
    ));
    put(&dir, "membership_and_salvage", &membership);

    let mut fenced = call(1, A, &claim(2, "engine-a", ""));
    let snap = |g: u64| c::SnapshotRequest {
        generation: g,
        name: "x".into(),
        labels: Default::default(),
    };
    fenced.extend(call(7, B, &snap(2)));
    fenced.extend(call(7, NONE, &snap(1)));
    fenced.extend(call(1, B, &claim(2, "engine-b", "")));
    fenced.extend(call(1, B, &claim(3, "engine-b", "")));
    fenced.extend(call(7, A, &snap(2)));
    fenced.extend(call(7, B, &snap(3)));
    put(&dir, "claims_and_the_fence", &fenced);

    // Replies the engine decodes, from a real replica (kinds 32 and on).
    let rdir = horn_fuzz::fresh_dir("seeds-control");
    let mut r = Replica::create(rdir.join("r"), 4 << 20, 512).unwrap();
    r.write_at(0, &[1; 4096]).unwrap();
    r.snapshot("s1", &BTreeMap::new()).unwrap();
    r.claim(4, "engine-a", None, 2000).unwrap();
    let info = horn_replica::control::info_reply(&r).unwrap();
    let mut replies = call(32, NONE, &info);
    replies.extend(call(
        33,
        NONE,
        &c::Membership {
            volume: "vol-1".into(),
            generation: 4,
            version: 2,
            engine: "engine-a".into(),
            rw: vec![member("00112233445566778899aabbccddeeff", "127.0.0.1:9500")],
            wo: vec![],
            after: vec![],
            authority: "manager:0123456789abcdef".into(),
            cipher: "aes-256-xts:0011223344556677".into(),
        },
    ));
    replies.extend(call(
        36,
        NONE,
        &c::LayerBlocksReply {
            offsets: vec![0],
            lengths: vec![4096],
            sums: vec![0x0123_4567_89ab_cdef],
        },
    ));
    replies.extend(call(
        40,
        NONE,
        &e::EngineInfo {
            size: 4 << 20,
            generation: 4,
            ..Default::default()
        },
    ));
    replies.extend(call(
        41,
        NONE,
        &e::SnapshotList {
            snapshots: vec![e::Snapshot {
                name: "s1".into(),
                ..Default::default()
            }],
            ..Default::default()
        },
    ));
    put(&dir, "replies_an_engine_reads", &replies);
    drop(r);
}

// ---- iSCSI ----

/// An iSCSI session being written: task tags and sequence numbers counted.
#[derive(Default)]
struct Initiator {
    bytes: Vec<u8>,
    itt: u32,
    cmd_sn: u32,
    digests: Digests,
}

impl Initiator {
    fn pdu(&mut self, mut bhs: Bhs, data: &[u8]) {
        self.itt += 1;
        bhs.set_u32(16, self.itt);
        if bhs.u32_at(24) == 0 {
            bhs.set_u32(24, self.cmd_sn);
        }
        pdu::encode(&mut self.bytes, &bhs, data, self.digests);
    }

    /// A Login Request from stage `csg` to `nsg` with `keys`.
    fn login(&mut self, csg: u8, nsg: u8, transit: bool, cont: bool, keys: &[(&str, &str)]) {
        let flags = (if transit { 0x80 } else { 0 }) | (if cont { 0x40 } else { 0 }) | (csg << 2) | nsg;
        let mut bhs = Bhs::new(op::LOGIN | 0x40, flags);
        bhs.0[8..14].copy_from_slice(&[0x80, 0x12, 0x34, 0x56, 0x78, 0x9a]);
        self.pdu(bhs, &text(keys));
    }

    fn text_request(&mut self, keys: &[(&str, &str)]) {
        let bhs = Bhs::new(op::TEXT | 0x40, 0x80);
        self.pdu(bhs, &text(keys));
    }

    /// A SCSI Command: `cdb`, with immediate `data` (a write) or reading `read_len`.
    fn command(&mut self, cdb: &[u8], data: &[u8], read_len: u32) {
        let write = !data.is_empty();
        let flags = 0x80 | if write { 0x20 } else { 0x40 } | 0x01;
        let mut bhs = Bhs::new(op::SCSI_CMD, flags);
        bhs.set_u32(20, if write { data.len() as u32 } else { read_len });
        let mut full = [0u8; 16];
        full[..cdb.len()].copy_from_slice(cdb);
        bhs.0[32..48].copy_from_slice(&full);
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        bhs.set_u32(24, self.cmd_sn);
        self.pdu(bhs, data);
    }

    /// The same, from the other session (the scsi_cdb target picks it by CmdSN parity).
    fn command_as_other(&mut self, cdb: &[u8], data: &[u8], read_len: u32) {
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        self.command(cdb, data, read_len);
    }

    fn task_mgmt(&mut self, function: u8) {
        let bhs = Bhs::new(op::TASK_MGMT | 0x40, 0x80 | function);
        self.pdu(bhs, &[]);
    }
}

fn text(keys: &[(&str, &str)]) -> Vec<u8> {
    let pairs: Vec<(String, String)> = keys.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    horn_iscsi::text::encode(&pairs)
}

const INITIATOR: (&str, &str) = ("InitiatorName", "iqn.1993-08.org.debian:01:abcdef");
const TARGET: (&str, &str) = ("TargetName", "iqn.2026-11.io.horn:vol1");

/// The operational keys open-iscsi sends.
const OPERATIONAL: &[(&str, &str)] = &[
    ("HeaderDigest", "None"),
    ("DataDigest", "None"),
    ("DefaultTime2Wait", "2"),
    ("DefaultTime2Retain", "0"),
    ("IFMarker", "No"),
    ("OFMarker", "No"),
    ("ErrorRecoveryLevel", "0"),
    ("InitialR2T", "No"),
    ("ImmediateData", "Yes"),
    ("MaxBurstLength", "16776192"),
    ("FirstBurstLength", "262144"),
    ("MaxOutstandingR2T", "1"),
    ("MaxConnections", "1"),
    ("DataPDUInOrder", "Yes"),
    ("DataSequenceInOrder", "Yes"),
    ("MaxRecvDataSegmentLength", "262144"),
];

fn logins() -> Vec<(&'static str, u8, Vec<u8>)> {
    let mut out = Vec::new();
    let normal = [INITIATOR, ("SessionType", "Normal"), TARGET];

    let mut s = Initiator::default();
    let mut keys = normal.to_vec();
    keys.extend_from_slice(OPERATIONAL);
    s.login(1, 3, true, false, &keys);
    out.push(("operational_only", 0, s.bytes));

    let mut s = Initiator::default();
    let mut keys = normal.to_vec();
    keys.push(("AuthMethod", "None"));
    s.login(0, 1, true, false, &keys);
    s.login(1, 3, true, false, OPERATIONAL);
    out.push(("security_then_operational", 0, s.bytes));

    let mut s = Initiator::default();
    s.login(
        0,
        3,
        true,
        false,
        &[INITIATOR, ("SessionType", "Discovery"), ("AuthMethod", "None")],
    );
    s.text_request(&[("SendTargets", "All")]);
    s.text_request(&[
        ("SendTargets", "iqn.2026-11.io.horn:vol1"),
        ("X-com.example.key", "1"),
    ]);
    out.push(("discovery_send_targets", 0, s.bytes));

    let chap = |s: &mut Initiator, session: &str, mutual: bool| {
        s.login(
            0,
            1,
            false,
            false,
            &[
                INITIATOR,
                ("SessionType", session),
                TARGET,
                ("AuthMethod", "CHAP,None"),
            ],
        );
        s.login(0, 1, false, false, &[("CHAP_A", "7,6,5")]);
        let mut answer = vec![("CHAP_N", "initiator-user"), ("CHAP_R", "*")];
        if mutual {
            answer.push(("CHAP_I", "77"));
            answer.push(("CHAP_C", "0x00112233445566778899aabbccddeeff"));
        }
        s.login(0, 1, true, false, &answer);
        s.login(1, 3, true, false, OPERATIONAL);
    };
    let mut s = Initiator::default();
    chap(&mut s, "Normal", false);
    out.push(("chap", 1, s.bytes));
    let mut s = Initiator::default();
    chap(&mut s, "Normal", true);
    out.push(("mutual_chap", 2, s.bytes));
    let mut s = Initiator::default();
    chap(&mut s, "Discovery", true);
    s.text_request(&[("SendTargets", "All")]);
    out.push(("discovery_with_chap", 3, s.bytes));
    let mut s = Initiator::default();
    chap(&mut s, "Normal", false);
    out.push(("chap_required_but_mutual_asked", 2, s.bytes));

    // Text continued over two PDUs (C bit), then digests negotiated.
    let mut s = Initiator::default();
    let mut keys = normal.to_vec();
    keys.push(("AuthMethod", "None"));
    let all = text(&keys);
    let (a, b) = all.split_at(all.len() / 2);
    let mut first = Bhs::new(op::LOGIN | 0x40, 0x40 | 1);
    first.0[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 1]);
    s.pdu(first, a);
    let mut second = Bhs::new(op::LOGIN | 0x40, 0x80 | 1);
    second.0[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 1]);
    s.pdu(second, b);
    s.login(
        0,
        3,
        true,
        false,
        &[
            ("HeaderDigest", "CRC32C,None"),
            ("DataDigest", "CRC32C"),
            ("MaxRecvDataSegmentLength", "0x2000"),
        ],
    );
    out.push(("continued_text_and_digests", 0, s.bytes));
    out
}

/// A CDB with the fields the opcode table's row names set to small valid values.
fn cdb_for(d: &sc::Descriptor) -> Vec<u8> {
    let mut cdb = vec![0u8; d.cdb_len as usize];
    cdb[0] = d.code;
    if let Some(action) = d.service_action {
        cdb[1] = action as u8;
    }
    // A transfer or allocation length of one block or 255 bytes, wherever the layout
    // keeps it.
    match d.cdb_len {
        6 => cdb[4] = 1,
        10 => cdb[8] = 1,
        12 => cdb[9] = 1,
        _ => cdb[13] = 1,
    }
    cdb
}

fn scsi_sessions() -> Vec<(&'static str, u8, Vec<u8>)> {
    let bs = 512u32;
    let mut out = Vec::new();

    let mut s = Initiator::default();
    for d in sc::TABLE {
        let cdb = cdb_for(d);
        let mut full = [0u8; 16];
        full[..cdb.len()].copy_from_slice(&cdb);
        let out_len = data_out_len(&full, bs).unwrap_or(0).min(4096) as usize;
        s.command(&cdb, &vec![0u8; out_len], 255);
    }
    out.push(("every_opcode_in_the_table", 0, s.bytes));

    let mut s = Initiator::default();
    s.command(&[sc::TEST_UNIT_READY, 0, 0, 0, 0, 0], &[], 0);
    s.command(&[sc::REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0], &[], 4096);
    s.command(&[sc::INQUIRY, 0, 0, 0, 0xff, 0], &[], 255);
    for page in [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2] {
        s.command(&[sc::INQUIRY, 1, page, 0, 0xff, 0], &[], 255);
    }
    s.command(&[sc::READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8);
    let mut rc16 = [0u8; 16];
    rc16[0] = sc::SERVICE_ACTION_IN_16;
    rc16[1] = sc::service_action::READ_CAPACITY_16 as u8;
    rc16[13] = 32;
    s.command(&rc16, &[], 32);
    s.command(&[sc::MODE_SENSE_6, 0, 0x3f, 0, 0xff, 0], &[], 255);
    s.command(&[sc::MODE_SENSE_10, 0, 0x08, 0, 0, 0, 0, 0x01, 0, 0], &[], 256);
    let mut rsoc = [0u8; 12];
    rsoc[0] = sc::MAINTENANCE_IN;
    rsoc[1] = sc::service_action::REPORT_SUPPORTED_OPERATION_CODES as u8;
    rsoc[8] = 0x10;
    s.command(&rsoc, &[], 4096);
    let mut lba_status = [0u8; 16];
    lba_status[0] = sc::SERVICE_ACTION_IN_16;
    lba_status[1] = sc::service_action::GET_LBA_STATUS as u8;
    lba_status[13] = 24;
    s.command(&lba_status, &[], 24);
    s.command(&[sc::REQUEST_SENSE, 0, 0, 0, 18, 0], &[], 18);
    out.push(("lun_discovery", 0, s.bytes.clone()));
    out.push(("lun_discovery_4k", 1, s.bytes));

    let mut s = Initiator::default();
    let block = |v: u8| vec![v; bs as usize];
    s.command(&[sc::WRITE_10, 0, 0, 0, 0, 8, 0, 0, 1, 0], &block(1), 0);
    s.command(&[sc::READ_10, 0, 0, 0, 0, 8, 0, 0, 1, 0], &[], bs);
    let mut w16 = [0u8; 16];
    w16[0] = sc::WRITE_16;
    w16[9] = 16;
    w16[13] = 2;
    s.command(&w16, &[block(2), block(3)].concat(), 0);
    let mut r16 = w16;
    r16[0] = sc::READ_16;
    s.command(&r16, &[], 2 * bs);
    s.command(&[sc::WRITE_6, 0, 0, 32, 1, 0], &block(4), 0);
    s.command(&[sc::READ_6, 0, 0, 32, 1, 0], &[], bs);
    s.command(&[sc::WRITE_12, 0, 0, 0, 0, 40, 0, 0, 0, 1, 0, 0], &block(5), 0);
    s.command(&[sc::READ_12, 0, 0, 0, 0, 40, 0, 0, 0, 1, 0, 0], &[], bs);
    s.command(&[sc::SYNCHRONIZE_CACHE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0);
    let mut verify = [0u8; 16];
    verify[0] = sc::VERIFY_16;
    verify[1] = 0x02; // BYTCHK
    verify[9] = 16;
    verify[13] = 1;
    s.command(&verify, &block(2), 0);
    s.command(
        &[sc::WRITE_AND_VERIFY_10, 0, 0, 0, 0, 48, 0, 0, 1, 0],
        &block(6),
        0,
    );
    let mut orw = [0u8; 16];
    orw[0] = sc::ORWRITE_16;
    orw[9] = 48;
    orw[13] = 1;
    s.command(&orw, &block(0x81), 0);
    let mut caw = [0u8; 16];
    caw[0] = sc::COMPARE_AND_WRITE;
    caw[9] = 8;
    caw[13] = 1;
    s.command(&caw, &[block(1), block(9)].concat(), 0);
    s.command(&[sc::PRE_FETCH_10, 0, 0, 0, 0, 8, 0, 0, 1, 0], &[], 0);
    let mut past = [0u8; 16];
    past[0] = sc::READ_16;
    past[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
    past[13] = 1;
    s.command(&past, &[], bs);
    s.command(
        &[sc::WRITE_10, 0, 0, 0, 0x07, 0xff, 0, 0, 2, 0],
        &[block(7), block(7)].concat(),
        0,
    );
    out.push(("writes_and_reads", 0, s.bytes.clone()));
    out.push(("writes_on_a_read_only_lun", 2, s.bytes));

    let mut s = Initiator::default();
    let mut unmap = vec![0u8; 8 + 32];
    unmap[1] = 6 + 32;
    unmap[3] = 32;
    unmap[8..16].copy_from_slice(&8u64.to_be_bytes());
    unmap[16..20].copy_from_slice(&2u32.to_be_bytes());
    unmap[24..32].copy_from_slice(&40u64.to_be_bytes());
    unmap[32..36].copy_from_slice(&1u32.to_be_bytes());
    s.command(&[sc::UNMAP, 0, 0, 0, 0, 0, 0, 0, unmap.len() as u8, 0], &unmap, 0);
    let mut ws16 = [0u8; 16];
    ws16[0] = sc::WRITE_SAME_16;
    ws16[1] = 0x08; // UNMAP
    ws16[9] = 64;
    ws16[13] = 16;
    s.command(&ws16, &block(0), 0);
    s.command(&[sc::WRITE_SAME_10, 0, 0, 0, 0, 96, 0, 0, 4, 0], &block(0x42), 0);
    s.command(&lba_status, &[], 24);
    out.push(("unmap_and_write_same", 0, s.bytes));

    let mut s = Initiator::default();
    let pr_out = |action: u16, kind: u8, key: u64, sa_key: u64| {
        let cdb = vec![
            sc::PERSISTENT_RESERVE_OUT,
            action as u8,
            kind,
            0,
            0,
            0,
            0,
            0,
            24,
            0,
        ];
        let mut params = vec![0u8; 24];
        params[..8].copy_from_slice(&key.to_be_bytes());
        params[8..16].copy_from_slice(&sa_key.to_be_bytes());
        (cdb, params)
    };
    use sc::service_action as sa;
    let (cdb, p) = pr_out(sa::REGISTER, 0, 0, 0x1111);
    s.command(&cdb, &p, 0);
    let (cdb, p) = pr_out(sa::REGISTER, 0, 0, 0x2222);
    s.command_as_other(&cdb, &p, 0);
    let (cdb, p) = pr_out(sa::RESERVE, 1, 0x1111, 0);
    s.command(&cdb, &p, 0);
    s.command_as_other(&[sc::WRITE_10, 0, 0, 0, 0, 8, 0, 0, 1, 0], &block(1), 0);
    for action in [
        sa::READ_KEYS,
        sa::READ_RESERVATION,
        sa::REPORT_CAPABILITIES,
        sa::READ_FULL_STATUS,
    ] {
        s.command(
            &[sc::PERSISTENT_RESERVE_IN, action as u8, 0, 0, 0, 0, 0, 1, 0, 0],
            &[],
            256,
        );
    }
    let (cdb, p) = pr_out(sa::PREEMPT, 3, 0x2222, 0x1111);
    s.command_as_other(&cdb, &p, 0);
    let (cdb, p) = pr_out(sa::RELEASE, 3, 0x2222, 0);
    s.command_as_other(&cdb, &p, 0);
    let (cdb, p) = pr_out(sa::CLEAR, 0, 0x2222, 0);
    s.command_as_other(&cdb, &p, 0);
    s.command(&[sc::RESERVE_6, 0, 0, 0, 0, 0], &[], 0);
    s.command_as_other(&[sc::READ_10, 0, 0, 0, 0, 8, 0, 0, 1, 0], &[], bs);
    s.command(&[sc::RELEASE_6, 0, 0, 0, 0, 0], &[], 0);
    s.command(&[sc::PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 1, 0], &[], 0);
    s.command(&[sc::START_STOP_UNIT, 0, 0, 0, 2, 0], &[], 0);
    out.push(("reservations_from_two_sessions", 0, s.bytes));

    let mut s = Initiator::default();
    s.command(&[sc::RESERVE_6, 0, 0, 0, 0, 0], &[], 0);
    s.task_mgmt(5);
    s.command(&[sc::TEST_UNIT_READY, 0, 0, 0, 0, 0], &[], 0);
    s.command_as_other(&[sc::TEST_UNIT_READY, 0, 0, 0, 0, 0], &[], 0);
    s.command(&[sc::REQUEST_SENSE, 0, 0, 0, 18, 0], &[], 18);
    s.task_mgmt(6);
    s.command(&[sc::INQUIRY, 0, 0, 0, 0xff, 0], &[], 255);
    out.push(("resets_and_unit_attentions", 0, s.bytes));
    out
}

fn iscsi(seeds: &Seeds) {
    let login_dir = seeds.target("iscsi_login_text");
    let pdu_dir = seeds.target("iscsi_pdu");
    for (name, mode, bytes) in logins() {
        put(&login_dir, name, &[[mode].as_slice(), &bytes].concat());
        put(
            &pdu_dir,
            &format!("login_{name}"),
            &[[0u8].as_slice(), &bytes].concat(),
        );
    }
    let scsi_dir = seeds.target("scsi_cdb");
    for (name, mode, bytes) in scsi_sessions() {
        put(&scsi_dir, name, &[[mode].as_slice(), &bytes].concat());
        put(
            &pdu_dir,
            &format!("scsi_{name}"),
            &[[0u8].as_slice(), &bytes].concat(),
        );
    }
    // The same commands with digests, as a session that negotiated CRC32C sends them.
    for (mode, label) in [(1u8, "header_digest"), (3, "both_digests")] {
        let mut s = Initiator {
            digests: Digests {
                header: mode & 1 != 0,
                data: mode & 2 != 0,
            },
            ..Default::default()
        };
        s.command(&[sc::WRITE_10, 0, 0, 0, 0, 8, 0, 0, 1, 0], &[0x5a; 512], 0);
        s.command(&[sc::READ_10, 0, 0, 0, 0, 8, 0, 0, 1, 0], &[], 512);
        s.command(&[sc::INQUIRY, 0, 0, 0, 0xff, 0], &[], 255);
        s.pdu(Bhs::new(op::NOP_OUT | 0x40, 0x80), b"ping");
        put(&pdu_dir, label, &[[mode].as_slice(), &s.bytes].concat());
    }
}

// ---- the replica's files ----

fn files(seeds: &Seeds) {
    let meta_dir = seeds.target("volume_json");
    let zeros_dir = seeds.target("zero_log");
    let intent_dir = seeds.target("intent_bits");
    let dir = horn_fuzz::fresh_dir("seeds-files").join("r");
    let size = 4u64 << 20;
    let mut r = Replica::create(&dir, size, 512).unwrap();
    // Snapshot times vary from run to run: the seeds carry a fixed one.
    let meta_now = |dir: &Path| {
        let mut m = VolumeMeta::load(dir).unwrap();
        for l in &mut m.layers {
            if l.created.is_some() {
                l.created = Some(1_795_000_000);
            }
        }
        m
    };
    let mut metas = vec![("fresh", meta_now(&dir))];
    r.write_at(0, &[1; 65536]).unwrap();
    let labels: BTreeMap<String, String> = [("app".to_string(), "db".to_string())].into();
    r.snapshot("daily.2026-11-21", &labels).unwrap();
    r.write_at(8192, &[2; 8192]).unwrap();
    r.snapshot("s2", &BTreeMap::new()).unwrap();
    // Discards and write-zeroes over the snapshots' data: the head's zero log.
    r.discard(0, 16384).unwrap();
    r.write_zeroes(32768, 8192).unwrap();
    r.discard(49152, 4096).unwrap();
    let head = r.meta().head;
    let zeros = std::fs::read(horn_replica::meta::zeros_path(&dir, head)).unwrap();
    metas.push(("two_snapshots", meta_now(&dir)));
    r.revert("daily.2026-11-21").unwrap();
    r.delete_snapshot("s2").unwrap();
    metas.push(("reverted_with_a_deleted_branch", meta_now(&dir)));
    r.expand(size * 2).unwrap();
    metas.push(("expanded", meta_now(&dir)));
    drop(r);
    let mut expanding = metas.last().unwrap().1.clone();
    expanding.expanding_to = Some(size * 4);
    metas.push(("expansion_under_way", expanding));
    for (name, m) in &metas {
        let mut body = serde_json::to_vec(m).unwrap();
        body.push(b'\n');
        put(
            &meta_dir,
            &format!("{name}.json"),
            &[[3u8].as_slice(), &body].concat(),
        );
        let file = horn_fuzz::with_checksum_line(&body);
        put(
            &meta_dir,
            &format!("{name}.file"),
            &[[2u8].as_slice(), &file].concat(),
        );
    }
    assert!(std::fs::read(dir.join(META_FILE)).is_ok());

    let blocks = ((size / 4096) as u16).to_le_bytes();
    let with = |mode: u8, bytes: &[u8]| [[mode].as_slice(), &blocks, bytes].concat();
    put(&zeros_dir, "head_after_discards", &with(2, &zeros));
    put(&zeros_dir, "head_after_discards_fixed", &with(3, &zeros));
    let mut torn = zeros.clone();
    torn.extend_from_slice(&[7; 10]);
    put(&zeros_dir, "torn_tail", &with(2, &torn));
    let mut bad = zeros.clone();
    bad[16] ^= 0xff;
    put(&zeros_dir, "bad_first_record", &with(0, &bad));

    // Mode bit 2: a region count around one page of bits (32,704 - 512 + the u16).
    for (name, regions, marks, large) in [
        ("one_page", 63u64, vec![0u64, 5, 62], 0u8),
        ("two_pages", 32_900, vec![0, 32_704, 32_899], 4),
    ] {
        let d = horn_fuzz::fresh_dir("seeds-intent");
        let mut log = IntentLog::open(&d, regions * REGION_SIZE).unwrap();
        for m in marks {
            log.mark(m * REGION_SIZE, 4096).unwrap();
        }
        drop(log);
        let bytes = std::fs::read(d.join(horn_replica::intent::INTENT_FILE)).unwrap();
        let pick = if large != 0 {
            regions - (32_704 - 512)
        } else {
            regions - 1
        };
        let prefix = (pick as u16).to_le_bytes();
        put(
            &intent_dir,
            name,
            &[[2 | large].as_slice(), &prefix, &bytes].concat(),
        );
        let mut torn = bytes.clone();
        torn[4096 + 100] ^= 1;
        put(
            &intent_dir,
            &format!("{name}_torn"),
            &[[2 | large].as_slice(), &prefix, &torn].concat(),
        );
        let mut cut = bytes;
        cut.truncate(4096 + 2048);
        put(
            &intent_dir,
            &format!("{name}_cut"),
            &[[3 | large].as_slice(), &prefix, &cut].concat(),
        );
    }
}

// ---- a backup target's objects ----

fn backup(seeds: &Seeds) {
    use horn_backup::format::{encode_block, BlockId, Compression, Manifest, DEFAULT_BLOCK_SIZE, FORMAT};
    let dir = seeds.target("backup_objects");
    let data: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
    for (label, c) in [("none", Compression::None), ("lz4", Compression::Lz4), ("zstd", Compression::Zstd)] {
        // Block size byte 6: 2^16 bytes, the block's own length.
        let obj = encode_block(&data, c);
        put(&dir, &format!("block-{label}"), &[[0u8, 6].as_slice(), &obj].concat());
    }
    let id = BlockId::of(&data);
    let m = Manifest {
        format: FORMAT,
        volume: "data".into(),
        name: "nightly-1".into(),
        snapshot: "nightly-1".into(),
        created_unix: 1_795_000_000,
        size: 5 << 20,
        block_size: DEFAULT_BLOCK_SIZE,
        compression: Compression::Lz4,
        parent: Some("nightly-0".into()),
        blocks: vec![Some(id), None, Some(id)],
        labels: [("job".to_string(), "nightly".to_string())].into(),
    };
    put(&dir, "manifest", &[[1u8].as_slice(), &m.to_bytes()].concat());
}

fn main() {
    let seeds = Seeds {
        root: Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds"),
    };
    data_wire(&seeds);
    control(&seeds);
    iscsi(&seeds);
    files(&seeds);
    backup(&seeds);
    println!("seeds written to {}", seeds.root.display());
}
