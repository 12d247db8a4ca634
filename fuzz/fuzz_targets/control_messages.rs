//! The control messages (`proto/replica.proto`, `proto/engine.proto`) and the replica's
//! control service (`horn_replica::control::ControlService`) that acts on them.
//!
//! Feeds: the input as a list of calls, each `[kind u8][caller u8][length u16 LE]` and
//! `length` bytes of protobuf. Kinds 0 to 19 are the replica service's calls, decoded
//! as their request message and made on a fresh replica (2 MiB, 512-byte sectors, in
//! the scratch directory) through the service's own trait methods, with no network:
//! the service runs its calls under the lock of a `SharedReplica`, as it does for a
//! replica hosted in the engine's process. `caller` picks the `horn-engine` header:
//! none, `engine-a`, `engine-b` or empty. Left out: `SyncFrom` and `ReadLayer`, which
//! open connections. Other kinds decode the bytes as one of the replies an engine
//! reads from a replica, or as an engine control message.
//!
//! Checks:
//! - every message that decodes re-encodes to bytes that decode to the same message;
//! - the replica's generation never goes down, nor its size;
//! - a call that changes the replica succeeds only through the generation fence: its
//!   generation is the replica's or newer, and at the replica's own, from the engine
//!   holding the claim (when one is named);
//! - a claim succeeds only above the replica's generation (or repeated by its
//!   holder), at most 2^62, and leaves that generation and engine in place;
//! - an expansion that succeeds leaves the size asked for;
//! - after the calls, the replica closes and opens again with the same metadata,
//!   generation and holder: no sequence of control calls leaves a replica that does
//!   not open.

#![no_main]

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

/// Makes one call of `kind` (nothing if `body` does not decode as its message) and
/// checks what it did.
fn call(svc: &ControlService, shared: &SharedReplica, kind: u8, caller: Option<&str>, body: &[u8]) {
    let Some(fenced) = make_call(svc, shared, kind, caller, body) else {
        return;
    };
    let after = shared.call(|r| standing(r));
    let before = fenced.before;
    assert!(
        after.generation >= before.generation,
        "{before:?} went back to {after:?}"
    );
    assert!(after.size >= before.size, "{before:?} shrank to {after:?}");
    if let Some((g, true)) = fenced.changed {
        assert!(
            fenced_in(&before, g, caller),
            "call {kind} at generation {g} from {caller:?} got past the fence of {before:?}"
        );
    }
}

/// A call made: the replica before it, and for calls that carry a generation and
/// change the replica, that generation and whether the call succeeded.
struct Made {
    before: Standing,
    changed: Option<(u64, bool)>,
}

fn make_call(
    svc: &ControlService,
    shared: &SharedReplica,
    kind: u8,
    caller: Option<&str>,
    body: &[u8],
) -> Option<Made> {
    let rt = runtime();
    let before = shared.call(|r| standing(r));
    macro_rules! run {
        ($method:ident, $msg:expr) => {
            rt.block_on(svc.$method(request($msg, caller))).is_ok()
        };
    }
    let changed = match kind {
        0 => {
            let m: InfoRequest = decode(body)?;
            let _ = run!(info, m);
            None
        }
        1 => {
            let m: ClaimRequest = decode(body)?;
            let (g, engine) = (m.generation, m.engine.clone());
            if run!(claim, m) {
                let same = before.holder.as_deref() == Some(engine.as_str());
                assert!(g <= MAX_GENERATION, "a claim at {g}");
                assert!(
                    g > before.generation || (g == before.generation && same),
                    "a claim at {g} by {engine} taken from {before:?}"
                );
                let after = shared.call(|r| standing(r));
                assert_eq!(
                    (after.generation, after.holder.as_deref()),
                    (g, Some(engine.as_str()))
                );
            }
            None
        }
        2 => {
            let m: MembershipRequest = decode(body)?;
            let _ = run!(record_membership, m);
            None
        }
        3 => {
            let m: SalvageRequest = decode(body)?;
            let _ = run!(salvage, m);
            None
        }
        4 => {
            let m: ReleaseRequest = decode(body)?;
            Some((m.generation, run!(release, m)))
        }
        5 => {
            let m: RenewLeaseRequest = decode(body)?;
            let g = m.generation;
            if run!(renew_lease, m) {
                assert_eq!(g, before.generation, "a lease renewed at another generation");
                assert!(caller.is_some() && before.holder.as_deref() == caller);
            }
            None
        }
        6 => {
            let m: SetModeRequest = decode(body)?;
            Some((m.generation, run!(set_mode, m)))
        }
        7 => {
            let m: SnapshotRequest = decode(body)?;
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
        8 => {
            let m: DeleteSnapshotRequest = decode(body)?;
            Some((m.generation, run!(delete_snapshot, m)))
        }
        9 => {
            let m: PurgeRequest = decode(body)?;
            Some((m.generation, run!(purge, m)))
        }
        10 => {
            let m: RevertRequest = decode(body)?;
            Some((m.generation, run!(revert, m)))
        }
        11 => {
            let mut m: ExpandRequest = decode(body)?;
            if m.size > EXPAND_CAP && m.size <= MAX_VOLUME_SIZE {
                m.size = EXPAND_CAP | (m.size & 0xfff);
            }
            let (g, size) = (m.generation, m.size);
            let ok = run!(expand, m);
            if ok {
                assert_eq!(shared.call(|r| r.size()), size, "expanded to another size");
                assert!(size <= MAX_VOLUME_SIZE && size % 4096 == 0, "expanded to {size}");
            }
            Some((g, ok))
        }
        12 => {
            let m: ChecksumsRequest = decode(body)?;
            let _ = run!(checksums, m);
            None
        }
        13 => {
            let m: BlocksRequest = decode(body)?;
            let _ = run!(read_blocks, m);
            None
        }
        14 => {
            let m: BlocksData = decode(body)?;
            Some((m.generation, run!(write_blocks, m)))
        }
        15 => {
            let m: IntentsRequest = decode(body)?;
            let _ = run!(intents, m);
            None
        }
        16 => {
            let m: ClearIntentsRequest = decode(body)?;
            Some((m.generation, run!(clear_intents, m)))
        }
        17 => {
            let m: LayerBlocksRequest = decode(body)?;
            let _ = run!(layer_blocks, m);
            None
        }
        18 => {
            let m: LayerZerosRequest = decode(body)?;
            let _ = run!(layer_zeros, m);
            None
        }
        19 => {
            let m: FinishSyncRequest = decode(body)?;
            Some((m.generation, run!(finish_sync, m)))
        }
        _ => {
            decode_only(kind, body);
            None
        }
    };
    Some(Made { before, changed })
}

/// Messages the engine and `hornctl` decode from a peer: round trips only.
fn decode_only(kind: u8, body: &[u8]) {
    match kind % 16 {
        0 => {
            let _: Option<InfoReply> = decode(body);
        }
        1 => {
            if let Some(m) = decode::<Membership>(body) {
                let _ = record_from_wire(m);
            }
        }
        2 => {
            let _: Option<PurgeReply> = decode(body);
        }
        3 => {
            let _: Option<IntentsReply> = decode(body);
        }
        4 => {
            let _: Option<LayerBlocksReply> = decode(body);
        }
        5 => {
            let _: Option<LayerZerosReply> = decode(body);
        }
        6 => {
            let _: Option<ChecksumsReply> = decode(body);
        }
        7 => {
            let _: Option<FinishSyncReply> = decode(body);
        }
        8 => {
            let _: Option<engine::EngineInfo> = decode(body);
        }
        9 => {
            let _: Option<engine::SnapshotList> = decode(body);
        }
        10 => {
            let _: Option<engine::VerifyReply> = decode(body);
        }
        11 => {
            let _: Option<engine::EngineSnapshotRequest> = decode(body);
        }
        12 => {
            let _: Option<engine::EngineExpandRequest> = decode(body);
        }
        13 => {
            let _: Option<engine::AddReplicaRequest> = decode(body);
        }
        14 => {
            let _: Option<engine::EngineRevertRequest> = decode(body);
        }
        _ => {
            let _: Option<SyncReply> = decode(body);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let dir = horn_fuzz::fresh_dir("control_messages");
    let replica = Replica::create(dir.join("r"), SIZE, 512).expect("create the replica");
    let shared = SharedReplica::new(replica).unwrap();
    let svc = ControlService::new(ServerHandle::shared(shared.clone()));
    let mut input = Cursor::new(data);
    while !input.is_empty() {
        let kind = input.u8();
        let caller = match input.u8() % 4 {
            0 => None,
            1 => Some("engine-a"),
            2 => Some("engine-b"),
            _ => Some(""),
        };
        let len = input.u16() as usize;
        let body = input.bytes(len);
        call(&svc, &shared, kind, caller, body);
    }
    drop(svc);
    let (last, meta) = shared.call(|r| (standing(r), r.meta().clone()));
    assert_eq!(Arc::strong_count(&shared), 1, "the service let go of the replica");
    shared.close().expect("the replica closes");
    let reopened = Replica::open(dir.join("r")).expect("the replica opens again after the calls");
    assert_eq!(standing(&reopened), last, "the reopened replica stands elsewhere");
    assert_eq!(reopened.meta(), &meta, "the reopened replica has other metadata");
    drop(reopened);
    let _ = std::fs::remove_dir_all(&dir);
});
