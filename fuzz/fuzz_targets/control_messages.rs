//! The control messages (`proto/replica.proto`, `proto/engine.proto`) and the replica's
//! control service (`horn_replica::control::ControlService`) that acts on them.
//!
//! Feeds: the input as a list of calls, each `[kind u8][caller u8][length u16 LE]` and
//! `length` bytes of protobuf. Kinds 0 to 19 are the replica service's calls, decoded
//! as their request message and made on a fresh replica (2 MiB, 512-byte sectors, in
//! the scratch directory, created at the first call that decodes) through the
//! service's own trait methods, with no network: the service runs its calls under the
//! lock of a `SharedReplica`, as it does for a replica hosted in the engine's process.
//! `caller` picks the `horn-engine` header: none, `engine-a`, `engine-b` or empty.
//! Left out: `SyncFrom` and `ReadLayer`, which open connections. Other kinds decode
//! the bytes as one of the replies an engine reads from a replica, or as an engine
//! control message. At most 64 calls an input; an `Info` straight after another from
//! the same caller is skipped (it reads the same replica: long runs had filled their
//! corpus with such runs of `Info`, a third of the time spent).
//!
//! Checks:
//! - every message that decodes re-encodes to bytes that decode to the same message;
//! - the replica's generation never goes down, nor its size;
//! - a call that changes the replica succeeds only through the generation fence: its
//!   generation is the replica's or newer, and at the replica's own, from the engine
//!   holding the claim (when one is named);
//! - a claim succeeds only above the replica's generation (or repeated by its
//!   holder), at most 2^62, and leaves that generation and engine in place; a lease is
//!   renewed only by the holder, at its generation;
//! - an expansion that succeeds leaves the size asked for; a snapshot that succeeds
//!   has a valid name;
//! - after calls of which one changed the replica, it closes and opens again with the
//!   same metadata, generation and holder: no sequence of control calls leaves a
//!   replica that does not open.

#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use horn_fuzz::Cursor;
use horn_proto::control::replica_control_server::ReplicaControl;
use horn_proto::control::*;
use horn_proto::engine_control as engine;
use horn_replica::control::{record_from_wire, ControlService};
use horn_replica::meta::MAX_VOLUME_SIZE;
use horn_replica::server::ServerHandle;
use horn_replica::{Replica, SharedReplica};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tonic::Request;

const SIZE: u64 = 2 << 20;
const MAX_GENERATION: u64 = 1 << 62;
/// Sizes past this are cut down to it (keeping their low bits) so that one input stays
/// under a millisecond; the 64 TiB limit itself is still reached by larger ones.
const EXPAND_CAP: u64 = 1 << 40;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .build()
            .unwrap()
    })
}

/// Decodes `bytes` as `M`, checks the round trip, and returns it.
fn decode<M: Message + Default + PartialEq + std::fmt::Debug>(bytes: &[u8]) -> Option<M> {
    let m = M::decode(bytes).ok()?;
    let again = M::decode(m.encode_to_vec().as_slice()).expect("a re-encoded message decodes");
    assert_eq!(again, m, "the round trip changed the message");
    Some(m)
}

/// A replica service call, decoded.
enum Call {
    Info(InfoRequest),
    Claim(ClaimRequest),
    RecordMembership(MembershipRequest),
    Salvage(SalvageRequest),
    Release(ReleaseRequest),
    RenewLease(RenewLeaseRequest),
    SetMode(SetModeRequest),
    Snapshot(SnapshotRequest),
    DeleteSnapshot(DeleteSnapshotRequest),
    Purge(PurgeRequest),
    Revert(RevertRequest),
    Expand(ExpandRequest),
    Checksums(ChecksumsRequest),
    ReadBlocks(BlocksRequest),
    WriteBlocks(BlocksData),
    Intents(IntentsRequest),
    ClearIntents(ClearIntentsRequest),
    LayerBlocks(LayerBlocksRequest),
    LayerZeros(LayerZerosRequest),
    FinishSync(FinishSyncRequest),
}

/// The call of `kind` in `body`, if it decodes; other kinds are decoded as the
/// messages an engine reads from a peer, and give no call.
fn decode_call(kind: u8, body: &[u8]) -> Option<Call> {
    Some(match kind {
        0 => Call::Info(decode(body)?),
        1 => Call::Claim(decode(body)?),
        2 => Call::RecordMembership(decode(body)?),
        3 => Call::Salvage(decode(body)?),
        4 => Call::Release(decode(body)?),
        5 => Call::RenewLease(decode(body)?),
        6 => Call::SetMode(decode(body)?),
        7 => Call::Snapshot(decode(body)?),
        8 => Call::DeleteSnapshot(decode(body)?),
        9 => Call::Purge(decode(body)?),
        10 => Call::Revert(decode(body)?),
        11 => {
            let mut m: ExpandRequest = decode(body)?;
            if m.size > EXPAND_CAP && m.size <= MAX_VOLUME_SIZE {
                m.size = EXPAND_CAP | (m.size & 0xfff);
            }
            Call::Expand(m)
        }
        12 => Call::Checksums(decode(body)?),
        13 => Call::ReadBlocks(decode(body)?),
        14 => Call::WriteBlocks(decode(body)?),
        15 => Call::Intents(decode(body)?),
        16 => Call::ClearIntents(decode(body)?),
        17 => Call::LayerBlocks(decode(body)?),
        18 => Call::LayerZeros(decode(body)?),
        19 => Call::FinishSync(decode(body)?),
        _ => {
            decode_only(kind, body);
            return None;
        }
    })
}

/// Messages the engine and `hornctl` decode from a peer: round trips only.
fn decode_only(kind: u8, body: &[u8]) {
    match kind % 16 {
        0 => drop(decode::<InfoReply>(body)),
        1 => drop(decode::<Membership>(body).map(record_from_wire)),
        2 => drop(decode::<PurgeReply>(body)),
        3 => drop(decode::<IntentsReply>(body)),
        4 => drop(decode::<LayerBlocksReply>(body)),
        5 => drop(decode::<LayerZerosReply>(body)),
        6 => drop(decode::<ChecksumsReply>(body)),
        7 => drop(decode::<FinishSyncReply>(body)),
        8 => drop(decode::<engine::EngineInfo>(body)),
        9 => drop(decode::<engine::SnapshotList>(body)),
        10 => drop(decode::<engine::VerifyReply>(body)),
        11 => drop(decode::<engine::EngineSnapshotRequest>(body)),
        12 => drop(decode::<engine::EngineExpandRequest>(body)),
        13 => drop(decode::<engine::AddReplicaRequest>(body)),
        14 => drop(decode::<engine::EngineRevertRequest>(body)),
        _ => drop(decode::<SyncReply>(body)),
    }
}

/// The replica's standing, as the checks compare it before and after a call.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Standing {
    generation: u64,
    holder: Option<String>,
    size: u64,
}

fn standing(r: &Replica) -> Standing {
    Standing {
        generation: r.generation(),
        holder: r.holder().map(str::to_string),
        size: r.size(),
    }
}

/// Would the generation fence admit a call at `generation` from `caller`?
fn fenced_in(before: &Standing, generation: u64, caller: Option<&str>) -> bool {
    if generation < before.generation {
        return false;
    }
    if generation > before.generation {
        return true;
    }
    match before.holder.as_deref().filter(|h| !h.is_empty()) {
        None => true,
        Some(h) => caller == Some(h),
    }
}

fn request<T>(msg: T, caller: Option<&str>) -> Request<T> {
    let mut req = Request::new(msg);
    if let Some(c) = caller {
        req.metadata_mut()
            .insert(ENGINE_HEADER, c.parse().expect("a valid header value"));
    }
    req
}

/// The fresh replica the calls go to, and the service in front of it.
struct Session {
    dir: PathBuf,
    shared: Arc<SharedReplica>,
    svc: ControlService,
    /// A call changed the replica: it is reopened at the end.
    changed: bool,
    /// The caller of the last call, if it was an `Info`: an `Info` right after
    /// another from the same caller reads the same replica and is skipped.
    last_info: Option<Option<&'static str>>,
}

impl Session {
    fn new() -> Session {
        let dir = horn_fuzz::fresh_dir("control_messages");
        let replica = Replica::create(dir.join("r"), SIZE, 512).expect("create the replica");
        let shared = SharedReplica::new(replica).unwrap();
        let svc = ControlService::new(ServerHandle::shared(shared.clone()));
        Session {
            dir,
            shared,
            svc,
            changed: false,
            last_info: None,
        }
    }

    fn standing(&self) -> Standing {
        self.shared.call(|r| standing(r))
    }

    /// Makes `call` and checks what it did.
    fn make(&mut self, call: Call, caller: Option<&'static str>) {
        let repeated_info = matches!(call, Call::Info(_)) && self.last_info == Some(caller);
        self.last_info = matches!(call, Call::Info(_)).then_some(caller);
        if repeated_info {
            return;
        }
        let before = self.standing();
        let svc = &self.svc;
        let rt = runtime();
        macro_rules! run {
            ($method:ident, $msg:expr) => {
                rt.block_on(svc.$method(request($msg, caller))).is_ok()
            };
        }
        // Calls that carry a generation and change the replica: (generation, succeeded).
        let fenced = match call {
            Call::Info(m) => {
                let _ = run!(info, m);
                None
            }
            Call::Claim(m) => {
                let (g, engine) = (m.generation, m.engine.clone());
                if run!(claim, m) {
                    self.changed = true;
                    let same = before.holder.as_deref() == Some(engine.as_str());
                    assert!(g <= MAX_GENERATION, "a claim at {g}");
                    assert!(
                        g > before.generation || (g == before.generation && same),
                        "a claim at {g} by {engine} taken from {before:?}"
                    );
                    let after = self.standing();
                    assert_eq!(
                        (after.generation, after.holder.as_deref()),
                        (g, Some(engine.as_str()))
                    );
                }
                None
            }
            Call::RecordMembership(m) => {
                self.changed |= run!(record_membership, m);
                None
            }
            Call::Salvage(m) => {
                self.changed |= run!(salvage, m);
                None
            }
            Call::Release(m) => Some((m.generation, run!(release, m))),
            Call::RenewLease(m) => {
                let g = m.generation;
                if run!(renew_lease, m) {
                    assert_eq!(g, before.generation, "a lease renewed at another generation");
                    assert!(caller.is_some() && before.holder.as_deref() == caller);
                }
                None
            }
            Call::SetMode(m) => Some((m.generation, run!(set_mode, m))),
            Call::Snapshot(m) => {
                let (g, name) = (m.generation, m.name.clone());
                let ok = run!(snapshot, m);
                if ok {
                    assert!(
                        horn_replica::meta::validate_name(&name).is_ok(),
                        "snapshot {name:?}"
                    );
                }
                Some((g, ok))
            }
            Call::DeleteSnapshot(m) => Some((m.generation, run!(delete_snapshot, m))),
            Call::Purge(m) => Some((m.generation, run!(purge, m))),
            Call::Revert(m) => Some((m.generation, run!(revert, m))),
            Call::Expand(m) => {
                let (g, size) = (m.generation, m.size);
                let ok = run!(expand, m);
                if ok {
                    assert_eq!(self.standing().size, size, "expanded to another size");
                    assert!(size <= MAX_VOLUME_SIZE && size % 4096 == 0, "expanded to {size}");
                }
                Some((g, ok))
            }
            Call::Checksums(m) => {
                let _ = run!(checksums, m);
                None
            }
            Call::ReadBlocks(m) => {
                let _ = run!(read_blocks, m);
                None
            }
            Call::WriteBlocks(m) => Some((m.generation, run!(write_blocks, m))),
            Call::Intents(m) => {
                let _ = run!(intents, m);
                None
            }
            Call::ClearIntents(m) => Some((m.generation, run!(clear_intents, m))),
            Call::LayerBlocks(m) => {
                let _ = run!(layer_blocks, m);
                None
            }
            Call::LayerZeros(m) => {
                let _ = run!(layer_zeros, m);
                None
            }
            Call::FinishSync(m) => Some((m.generation, run!(finish_sync, m))),
        };
        let after = self.standing();
        assert!(
            after.generation >= before.generation,
            "{before:?} went back to {after:?}"
        );
        assert!(after.size >= before.size, "{before:?} shrank to {after:?}");
        if let Some((g, true)) = fenced {
            self.changed = true;
            assert!(
                fenced_in(&before, g, caller),
                "a call at generation {g} from {caller:?} got past the fence of {before:?}"
            );
        }
    }

    /// Closes the replica and, if a call changed it, opens it again: it must stand
    /// where the calls left it.
    fn finish(self) {
        let Session {
            dir,
            shared,
            svc,
            changed,
            last_info: _,
        } = self;
        drop(svc);
        if changed {
            let (last, meta) = shared.call(|r| (standing(r), r.meta().clone()));
            assert_eq!(Arc::strong_count(&shared), 1, "the service let go of the replica");
            shared.close().expect("the replica closes");
            let reopened = Replica::open(dir.join("r")).expect("the replica opens again after the calls");
            assert_eq!(standing(&reopened), last, "the reopened replica stands elsewhere");
            assert_eq!(reopened.meta(), &meta, "the reopened replica has other metadata");
        } else {
            drop(shared);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Calls past this many in one input are not made: longer sequences add little that
/// shorter ones in the corpus do not reach, and cost the run most of its executions.
const MAX_CALLS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let mut session: Option<Session> = None;
    let mut input = Cursor::new(data);
    let mut calls = 0;
    while !input.is_empty() && calls < MAX_CALLS {
        calls += 1;
        let kind = input.u8();
        let caller = match input.u8() % 4 {
            0 => None,
            1 => Some("engine-a"),
            2 => Some("engine-b"),
            _ => Some(""),
        };
        let len = input.u16() as usize;
        let body = input.bytes(len);
        if let Some(call) = decode_call(kind, body) {
            session.get_or_insert_with(Session::new).make(call, caller);
        }
    }
    if let Some(s) = session {
        s.finish();
    }
});
