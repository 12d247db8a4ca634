//! The replica control service (gRPC, `proto/replica.proto`): info, claim and release,
//! mode, snapshot, delete, purge, revert, expand.
//!
//! Each call runs on the data loop's thread through a [`ServerHandle`], between I/Os,
//! so control and data never touch the replica at the same time and the data path
//! takes no lock. Calls that change the replica carry the caller's generation; an
//! older one than the replica's is refused, as on the data wire.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use horn_proto::auth::AUTH_HEADER;
use horn_proto::control::replica_control_server::ReplicaControl;
use horn_proto::control::{
    BlocksData, BlocksRequest, ChecksumsReply, ChecksumsRequest, ClaimRequest, ClearIntentsRequest,
    DeleteSnapshotRequest, ExpandRequest, FinishSyncReply, FinishSyncRequest, InfoReply, InfoRequest,
    IntentsReply, IntentsRequest, Layer, LayerBlocksReply, LayerBlocksRequest, LayerStream, LayerZerosReply,
    LayerZerosRequest, Member, MemberSet, Membership, MembershipRequest, Mode as WireMode, PurgeReply,
    PurgeRequest, ReadLayerRequest, ReleaseRequest, RenewLeaseReply, RenewLeaseRequest, RevertRequest,
    SalvageRequest, SetModeRequest, SnapshotRequest, SyncFromRequest, SyncReply, WriteBlocksReply,
    ENGINE_HEADER, LEASE_LEFT_HEADER,
};
use tonic::{Request, Response, Status};

use crate::admission::{Access, Caller};
use crate::error::ReplicaError;
use crate::handle::ServerHandle;
use crate::membership::{Record, Refused};
use crate::meta::BLOCK_SIZE;
use crate::replica::Replica;
use crate::state::Mode;
use crate::sync::SyncState;

/// The gRPC service of one served replica.
pub struct ControlService {
    handle: ServerHandle,
    sync: Arc<SyncState>,
    /// How this replica calls another's control service (a rebuild's source): over
    /// TLS with this configuration, or plaintext (`None`).
    client_tls: Option<horn_proto::auth::ClientTls>,
    /// How layer streams go over TLS, when the data wire does (both ways: this
    /// replica's streams to others, and others' to it).
    stream_tls: Option<Arc<dyn crate::sync::StreamTls>>,
    /// Makes backups of this replica's snapshots (hornd gives it one: horn-backup);
    /// `None`: backups are refused.
    backups: Option<Arc<dyn BackupRunner>>,
    /// Backups reading this replica's snapshots now: deletions, purges and syncs,
    /// which change snapshot layers, wait until none is.
    backing_up: Arc<std::sync::atomic::AtomicUsize>,
}

/// Makes a backup of one of a replica's snapshots, read from its files in `dir`,
/// reporting progress (blocks done of blocks to read) and returning the report as
/// JSON. A trait so that the replica's crate needs none of the targets' clients.
pub trait BackupRunner: Send + Sync {
    /// Runs `req` to the end (on a thread of its own: it blocks).
    fn run(
        &self,
        dir: &std::path::Path,
        req: horn_proto::control::BackupRequest,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<String, String>;
}

impl ControlService {
    /// A service that runs its calls on the data loop behind `handle`.
    pub fn new(handle: ServerHandle) -> Self {
        ControlService {
            handle,
            sync: Arc::default(),
            client_tls: None,
            stream_tls: None,
            backups: None,
            backing_up: Arc::default(),
        }
    }

    /// The service, making backups with `runner`.
    pub fn with_backups(mut self, runner: Option<Arc<dyn BackupRunner>>) -> Self {
        self.backups = runner;
        self
    }

    /// Refuses a change to the snapshot layers while a backup reads them.
    fn check_no_backup(&self, what: &str) -> Result<(), Status> {
        match self.backing_up.load(Ordering::SeqCst) {
            0 => Ok(()),
            n => Err(Status::failed_precondition(format!(
                "{n} backup(s) are reading this replica's snapshots: {what} waits until they are done"
            ))),
        }
    }

    /// The service, streaming layers over TLS with `tls` (`--data-tls`).
    pub fn with_stream_tls(mut self, tls: Option<Arc<dyn crate::sync::StreamTls>>) -> Self {
        self.stream_tls = tls;
        self
    }

    /// The service, calling other replicas over TLS with `tls` (the cluster's
    /// credentials), as they serve it.
    pub fn with_client_tls(mut self, tls: Option<horn_proto::auth::ClientTls>) -> Self {
        self.client_tls = tls;
        self
    }

    /// A snapshot layer's file and length, checked on the loop.
    async fn snapshot_layer(&self, id: u64) -> Result<(std::path::PathBuf, u64), Status> {
        Ok(self.run(move |r| r.snapshot_layer(id)).await?.into_inner())
    }

    /// Checks the call's proof ([`horn_proto::auth::AUTH_HEADER`]) when this replica
    /// holds its volume's secret; returns the generation proven (`None`: the replica
    /// is open to every caller). Every call but `Info` goes through here first.
    async fn authenticate<T>(&self, req: &Request<T>) -> Result<Option<u64>, Status> {
        let header = req
            .metadata()
            .get(AUTH_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let engine = caller_of(req).unwrap_or_default();
        Ok(self
            .run(move |r| r.authenticate(header.as_deref(), &engine))
            .await?
            .into_inner())
    }

    /// Runs `f` on the loop thread (blocking this task's worker briefly).
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Replica) -> Result<T, ReplicaError> + Send + 'static,
    ) -> Result<Response<T>, Status> {
        let handle = self.handle.clone();
        let joined = tokio::task::spawn_blocking(move || handle.call(f))
            .await
            .map_err(|e| Status::internal(format!("control call panicked: {e}")))?;
        match joined {
            Ok(Ok(v)) => Ok(Response::new(v)),
            Ok(Err(e)) | Err(e) => Err(to_status(e)),
        }
    }
}

/// Maps a store error to a gRPC status with the error's own message.
pub fn to_status(e: ReplicaError) -> Status {
    let msg = e.to_string();
    match e {
        ReplicaError::Membership(Refused::Leased { left_ms, .. }) => {
            // Not a refusal for good: the claimant waits for the lease to lapse.
            let mut status = Status::unavailable(msg);
            if let Ok(v) = left_ms.to_string().parse() {
                status.metadata_mut().insert(LEASE_LEFT_HEADER, v);
            }
            status
        }
        ReplicaError::NoSuchSnapshot(_) => Status::not_found(msg),
        ReplicaError::SnapshotExists(_) => Status::already_exists(msg),
        ReplicaError::InvalidName { .. }
        | ReplicaError::InvalidSize { .. }
        | ReplicaError::InvalidSectorSize(_)
        | ReplicaError::OutOfRange { .. }
        | ReplicaError::Misaligned { .. } => Status::invalid_argument(msg),
        ReplicaError::StaleGeneration { .. }
        | ReplicaError::SnapshotRemoved(_)
        | ReplicaError::ChainFull(_)
        | ReplicaError::Membership(_)
        | ReplicaError::Refused(_)
        | ReplicaError::InvalidOperation(_) => Status::failed_precondition(msg),
        ReplicaError::Locked { .. } | ReplicaError::Unavailable(_) => Status::unavailable(msg),
        ReplicaError::Unauthenticated(_) => Status::unauthenticated(msg),
        _ => Status::internal(msg),
    }
}

/// The most a block call moves.
pub const MAX_RANGE: u64 = 1 << 20;

/// A run of consecutive block numbers in a request's list: one read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ListRun {
    /// Where the run starts in the list (and so in the request's data, in blocks).
    index: usize,
    /// Its first block number.
    first: u64,
    /// How many blocks it has.
    count: usize,
}

/// The runs of consecutive block numbers in `blocks`, in order.
fn block_runs(blocks: &[u64]) -> Vec<ListRun> {
    let mut runs: Vec<ListRun> = Vec::new();
    for (index, &b) in blocks.iter().enumerate() {
        match runs.last_mut() {
            Some(run) if run.first.checked_add(run.count as u64) == Some(b) => run.count += 1,
            _ => runs.push(ListRun {
                index,
                first: b,
                count: 1,
            }),
        }
    }
    runs
}

/// The most a checksum call covers.
pub const MAX_CHECKSUM_RANGE: u64 = 64 << 20;

fn check_range_len(len: u64, max: u64) -> Result<(), ReplicaError> {
    if len > max {
        return Err(ReplicaError::InvalidOperation(format!(
            "a range of {len} bytes is larger than the {max}-byte maximum of one call"
        )));
    }
    Ok(())
}

fn intents_reply(r: &Replica) -> IntentsReply {
    IntentsReply {
        region_size: crate::intent::REGION_SIZE,
        regions: r.intent_regions(),
    }
}

/// Refuses a call from an engine older than the replica's generation, or from one
/// that is not the claim's holder at it, by the data path's own fence
/// ([`crate::admission`]).
fn check_generation(r: &mut Replica, generation: u64, caller: Option<&str>) -> Result<(), ReplicaError> {
    let caller = caller.map_or(Caller::Unnamed, Caller::Named);
    r.admit(generation, caller, Access::Control)
        .map_err(ReplicaError::from)
}

/// Is `engine`, at `generation`, the holder of the replica's claim? A newer engine's
/// claim (or a claim by another at the same generation) deposes it: refused as stale,
/// for good. A replica behind the engine (replaced, or reset) is not the one it
/// claimed: refused as unavailable.
fn check_holder(r: &Replica, generation: u64, engine: &str) -> Result<(), ReplicaError> {
    let current = r.generation();
    if generation < current {
        return Err(ReplicaError::StaleGeneration {
            current,
            given: generation,
        });
    }
    if generation > current {
        return Err(ReplicaError::Unavailable(format!(
            "this replica is at generation {current}, below the engine's {generation}: it is not the replica that engine claimed"
        )));
    }
    match r.holder() {
        Some(holder) if holder == engine => Ok(()),
        holder => Err(ReplicaError::Refused(format!(
            "generation {current} on this replica belongs to engine {}, not to {engine}: another engine owns this replica",
            holder.unwrap_or("(unnamed)")
        ))),
    }
}

/// The engine a control call names in its [`ENGINE_HEADER`], if it names one.
fn caller_of<T>(req: &Request<T>) -> Option<String> {
    req.metadata()
        .get(ENGINE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The replica as the service reports it.
pub fn info_reply(r: &Replica) -> Result<InfoReply, ReplicaError> {
    let info = r.info()?;
    Ok(InfoReply {
        size: info.size,
        sector_size: info.sector_size,
        generation: r.generation(),
        dirty: r.is_dirty(),
        mode: match r.mode() {
            Mode::Rw => WireMode::Rw,
            Mode::Wo => WireMode::Wo,
        } as i32,
        layers: info
            .layers
            .into_iter()
            .map(|l| Layer {
                id: l.id,
                name: l.name.unwrap_or_default(),
                parent: l.parent.unwrap_or_default(),
                created: l.created.unwrap_or(0),
                labels: l.labels.into_iter().collect(),
                removed: l.removed,
                in_chain: l.in_chain,
                size: l.size,
                used_bytes: l.used_bytes,
            })
            .collect(),
        used_bytes: info.used_bytes,
        index_bytes: info.index_bytes as u64,
        intents_marked: r.intents_marked(),
        sync_done: 0,
        sync_total: 0,
        sync_copied: 0,
        id: r.id().to_string(),
        volume: r.volume().unwrap_or_default().to_string(),
        holder: r.holder().unwrap_or_default().to_string(),
        lease_holder: r.lease().map(|(e, _)| e.to_string()).unwrap_or_default(),
        lease_left_ms: r.lease().map_or(0, |(_, left)| left),
        record: r.record().map(record_to_wire),
    })
}

/// A membership record as the control service sends it.
pub fn record_to_wire(r: &Record) -> Membership {
    let members = |m: &std::collections::BTreeMap<String, String>| {
        m.iter()
            .map(|(id, name)| Member {
                id: id.clone(),
                name: name.clone(),
            })
            .collect()
    };
    Membership {
        volume: r.volume.clone(),
        generation: r.generation,
        version: r.version,
        engine: r.engine.clone(),
        rw: members(&r.rw),
        wo: members(&r.wo),
        after: r
            .after
            .iter()
            .map(|m| MemberSet { members: members(m) })
            .collect(),
        authority: r.authority.clone(),
        cipher: r.cipher.clone(),
    }
}

/// A membership record from the wire.
pub fn record_from_wire(m: Membership) -> Record {
    let members = |v: Vec<Member>| v.into_iter().map(|m| (m.id, m.name)).collect();
    Record {
        volume: m.volume,
        generation: m.generation,
        version: m.version,
        engine: m.engine,
        rw: members(m.rw),
        wo: members(m.wo),
        after: m.after.into_iter().map(|s| members(s.members)).collect(),
        authority: m.authority,
        cipher: m.cipher,
    }
}

#[tonic::async_trait]
impl ReplicaControl for ControlService {
    type BackupStream = horn_proto::progress::ProgressStream;

    async fn backup(
        &self,
        req: Request<horn_proto::control::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        self.authenticate(&req).await?;
        let runner = self
            .backups
            .clone()
            .ok_or_else(|| Status::unimplemented("this replica's server makes no backups"))?;
        let req = req.into_inner();
        let snapshot = req.snapshot.clone();
        // Checked and counted on the loop, so a deletion after it sees the count.
        let backing_up = self.backing_up.clone();
        let dir = self
            .run(move |r| {
                if r.mode() != Mode::Rw {
                    return Err(ReplicaError::InvalidOperation(format!(
                        "this replica is in mode {:?}: only one in mode RW holds whole snapshots to back up",
                        r.mode()
                    )));
                }
                let info = r.info()?;
                if !info
                    .layers
                    .iter()
                    .any(|l| l.name.as_deref() == Some(snapshot.as_str()) && !l.removed)
                {
                    return Err(ReplicaError::NoSuchSnapshot(snapshot));
                }
                backing_up.fetch_add(1, Ordering::SeqCst);
                Ok(r.dir().to_path_buf())
            })
            .await?
            .into_inner();
        let (tx, stream) = horn_proto::progress::channel();
        let backing_up = self.backing_up.clone();
        std::thread::Builder::new()
            .name("horn-backup".into())
            .spawn(move || {
                let r = runner.run(&dir, req, &|d, t| tx.progress(d, t));
                backing_up.fetch_sub(1, Ordering::SeqCst);
                tx.finish(r.map_err(Status::failed_precondition));
            })
            .map_err(|e| Status::internal(format!("cannot start the backup's thread: {e}")))?;
        Ok(Response::new(stream))
    }

    async fn info(&self, _req: Request<InfoRequest>) -> Result<Response<InfoReply>, Status> {
        let mut reply = self.run(|r| info_reply(r)).await?;
        let i = reply.get_mut();
        i.sync_done = self.sync.done.load(Ordering::Relaxed);
        i.sync_total = self.sync.total.load(Ordering::Relaxed);
        i.sync_copied = self.sync.copied.load(Ordering::Relaxed);
        Ok(reply)
    }

    async fn claim(&self, req: Request<ClaimRequest>) -> Result<Response<InfoReply>, Status> {
        let proven = self.authenticate(&req).await?;
        let req = req.into_inner();
        if let Some(g) = proven.filter(|&g| g != req.generation) {
            // Only the holder of a generation's key may claim it: nobody pushes a
            // replica's generation anywhere the manager did not begin.
            return Err(Status::unauthenticated(format!(
                "the claim is for generation {} and its proof for {g}",
                req.generation
            )));
        }
        if req.engine.is_empty() {
            return Err(Status::invalid_argument(
                "a claim names its engine (ClaimRequest.engine)",
            ));
        }
        self.run(move |r| {
            let volume = (!req.volume.is_empty()).then_some(req.volume.as_str());
            r.claim(req.generation, &req.engine, volume, req.lease_ms)?;
            r.set_dirty(true)?;
            info_reply(r)
        })
        .await
    }

    async fn record_membership(
        &self,
        req: Request<MembershipRequest>,
    ) -> Result<Response<InfoReply>, Status> {
        self.authenticate(&req).await?;
        let record = req
            .into_inner()
            .record
            .ok_or_else(|| Status::invalid_argument("a membership request needs a record"))?;
        let record = record_from_wire(record);
        if record.volume.is_empty() || record.engine.is_empty() || record.rw.is_empty() {
            return Err(Status::invalid_argument(
                "a membership record needs a volume, an engine and at least one RW member",
            ));
        }
        self.run(move |r| {
            r.record_membership(record)?;
            info_reply(r)
        })
        .await
    }

    async fn salvage(&self, req: Request<SalvageRequest>) -> Result<Response<InfoReply>, Status> {
        self.authenticate(&req).await?;
        let req = req.into_inner();
        self.run(move |r| {
            // A running replica may be serving an engine that holds its read lease:
            // salvage waits for it to lapse (offline, on a stopped replica, none runs).
            if let Some((holder, left_ms)) = r.lease() {
                return Err(ReplicaError::Membership(Refused::Leased {
                    holder: holder.to_string(),
                    left_ms,
                }));
            }
            let record = r.salvage((req.above_generation, req.above_version), &req.name)?;
            tracing::warn!(
                generation = record.generation,
                volume = %record.volume,
                "salvaged: this replica is now the only RW member of its volume"
            );
            info_reply(r)
        })
        .await
    }

    async fn release(&self, req: Request<ReleaseRequest>) -> Result<Response<InfoReply>, Status> {
        self.authenticate(&req).await?;
        let caller = caller_of(&req);
        let g = req.into_inner().generation;
        self.run(move |r| {
            check_generation(r, g, caller.as_deref())?;
            r.set_dirty(false)?;
            // Closed in order: the next engine need not wait for this one's lease.
            if let Some(engine) = caller.as_deref().filter(|c| r.holder() == Some(*c)) {
                r.renew_lease(engine, 0)?;
            }
            info_reply(r)
        })
        .await
    }

    async fn renew_lease(
        &self,
        req: Request<RenewLeaseRequest>,
    ) -> Result<Response<RenewLeaseReply>, Status> {
        self.authenticate(&req).await?;
        let Some(caller) = caller_of(&req) else {
            return Err(Status::invalid_argument(format!(
                "a lease renewal names its engine (the {ENGINE_HEADER} header)"
            )));
        };
        let req = req.into_inner();
        self.run(move |r| {
            check_holder(r, req.generation, &caller)?;
            r.renew_lease(&caller, req.lease_ms)?;
            Ok(RenewLeaseReply {})
        })
        .await
    }

    async fn set_mode(&self, req: Request<SetModeRequest>) -> Result<Response<InfoReply>, Status> {
        self.authenticate(&req).await?;
        let caller = caller_of(&req);
        let req = req.into_inner();
        let mode = match WireMode::try_from(req.mode) {
            Ok(WireMode::Rw) => Mode::Rw,
            Ok(WireMode::Wo) => Mode::Wo,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "mode {} is not RW (1) or WO (2)",
                    req.mode
                )))
            }
        };
        self.run(move |r| {
            check_generation(r, req.generation, caller.as_deref())?;
            r.set_mode(mode)?;
            info_reply(r)
        })
        .await
    }

    async fn snapshot(&self, req: Request<SnapshotRequest>) -> Result<Response<InfoReply>, Status> {
        self.authenticate(&req).await?;
        let caller = caller_of(&req);
        let req = req.into_inner();
        self.run(move |r| {
            check_generation(r, req.generation, caller.as_deref())?;
            let labels: BTreeMap<String, String> = req.labels.into_iter().collect();
            r.snapshot(&req.name, &labels)?;
            info_reply(r)
        })
        .await
    }

    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<InfoReply>, Status> {
        self.authenticate(&req).await?;
        self.check_no_backup("deleting a snapshot")?;
        let caller = caller_of(&req);
        let req = req.into_inner();
        self.run(move |r| {
            check_generation(r, req.generation, caller.as_deref())?;
            r.delete_snapshot(&req.name)?;
            info_reply(r)
        })
        .await
    }

    async fn purge(&self, req: Request<PurgeRequest>) -> Result<Response<PurgeReply>, Status> {
        self.authenticate(&req).await?;
        self.check_no_backup("a purge")?;
        let caller = caller_of(&req);
        let g = req.into_inner().generation;
        self.run(move |r| {
            check_generation(r, g, caller.as_deref())?;
            let report = r.purge()?;
            Ok(PurgeReply {
                purged: report.purged,
                kept: report
                    .kept
                    .into_iter()
                    .map(|(n, why)| format!("{n}: {why}"))
                    .collect(),
                info: Some(info_reply(r)?),
            })
        })
        .await
    }

    async fn revert(&self, req: Request<RevertRequest>) -> Result<Response<InfoReply>, Status> {
        self.authenticate(&req).await?;
        let caller = caller_of(&req);
        let req = req.into_inner();
        self.run(move |r| {
            check_generation(r, req.generation, caller.as_deref())?;
            r.revert(&req.name)?;
            info_reply(r)
        })
        .await
    }

    async fn expand(&self, req: Request<ExpandRequest>) -> Result<Response<InfoReply>, Status> {
        self.authenticate(&req).await?;
        let caller = caller_of(&req);
        let req = req.into_inner();
        self.run(move |r| {
            check_generation(r, req.generation, caller.as_deref())?;
            r.expand(req.size)?;
            info_reply(r)
        })
        .await
    }

    async fn checksums(&self, req: Request<ChecksumsRequest>) -> Result<Response<ChecksumsReply>, Status> {
        self.authenticate(&req).await?;
        let req = req.into_inner();
        self.run(move |r| {
            check_range_len(req.length, MAX_CHECKSUM_RANGE)?;
            Ok(ChecksumsReply {
                block_size: crate::meta::BLOCK_SIZE as u32,
                sums: r.block_checksums(req.offset, req.length)?,
            })
        })
        .await
    }

    async fn read_blocks(&self, req: Request<BlocksRequest>) -> Result<Response<BlocksData>, Status> {
        self.authenticate(&req).await?;
        let blocks = req.into_inner().blocks;
        self.run(move |r| {
            check_range_len(blocks.len() as u64 * BLOCK_SIZE, MAX_RANGE)?;
            let mut data = vec![0u8; blocks.len() * BLOCK_SIZE as usize];
            for run in block_runs(&blocks) {
                let at = run.index * BLOCK_SIZE as usize;
                r.read_at(
                    run.first.saturating_mul(BLOCK_SIZE),
                    &mut data[at..at + run.count * BLOCK_SIZE as usize],
                )?;
            }
            Ok(BlocksData {
                generation: r.generation(),
                blocks,
                data,
            })
        })
        .await
    }

    async fn write_blocks(&self, req: Request<BlocksData>) -> Result<Response<WriteBlocksReply>, Status> {
        self.authenticate(&req).await?;
        let caller = caller_of(&req);
        let req = req.into_inner();
        self.run(move |r| {
            check_generation(r, req.generation, caller.as_deref())?;
            check_range_len(req.data.len() as u64, MAX_RANGE)?;
            if req.data.len() as u64 != req.blocks.len() as u64 * BLOCK_SIZE {
                return Err(ReplicaError::InvalidOperation(format!(
                    "{} bytes for {} blocks of {BLOCK_SIZE}",
                    req.data.len(),
                    req.blocks.len()
                )));
            }
            for run in block_runs(&req.blocks) {
                let (offset, len) = (
                    run.first.saturating_mul(BLOCK_SIZE),
                    run.count as u64 * BLOCK_SIZE,
                );
                let at = run.index * BLOCK_SIZE as usize;
                r.mark_intent(offset, len)?;
                r.write_at(offset, &req.data[at..at + len as usize])?;
            }
            Ok(WriteBlocksReply {})
        })
        .await
    }

    async fn intents(&self, _req: Request<IntentsRequest>) -> Result<Response<IntentsReply>, Status> {
        self.authenticate(&_req).await?;
        self.run(|r| Ok(intents_reply(r))).await
    }

    async fn clear_intents(
        &self,
        req: Request<ClearIntentsRequest>,
    ) -> Result<Response<IntentsReply>, Status> {
        self.authenticate(&req).await?;
        let caller = caller_of(&req);
        let g = req.into_inner().generation;
        self.run(move |r| {
            check_generation(r, g, caller.as_deref())?;
            r.clear_intents()?;
            Ok(intents_reply(r))
        })
        .await
    }

    async fn layer_blocks(
        &self,
        req: Request<LayerBlocksRequest>,
    ) -> Result<Response<LayerBlocksReply>, Status> {
        self.authenticate(&req).await?;
        let req = req.into_inner();
        if req.length > 256 << 20 {
            return Err(Status::invalid_argument(format!(
                "a range of {} bytes is larger than the 256 MiB one call covers",
                req.length
            )));
        }
        let (path, size) = self.snapshot_layer(req.layer_id).await?;
        let blocks = tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(&path).map_err(|e| ReplicaError::io("open", &path, e))?;
            crate::sync::layer_blocks(&f, &path, size, req.offset, req.length, req.extents_only)
        })
        .await
        .map_err(|e| Status::internal(format!("layer read panicked: {e}")))?;
        let (extents, sums) = blocks.map_err(to_status)?;
        Ok(Response::new(LayerBlocksReply {
            offsets: extents.iter().map(|e| e.offset).collect(),
            lengths: extents.iter().map(|e| e.len).collect(),
            sums,
        }))
    }

    async fn read_layer(&self, req: Request<ReadLayerRequest>) -> Result<Response<LayerStream>, Status> {
        self.authenticate(&req).await?;
        // The stream listens where the asker reached this service, not everywhere.
        let bind = req
            .local_addr()
            .map_or(std::net::IpAddr::from([127, 0, 0, 1]), |a| a.ip());
        let req = req.into_inner();
        if req.offsets.len() != req.lengths.len() {
            return Err(Status::invalid_argument("offsets and lengths differ in number"));
        }
        let (path, size) = self.snapshot_layer(req.layer_id).await?;
        if let Some((o, l)) = req
            .offsets
            .iter()
            .zip(&req.lengths)
            .find(|(&o, &l)| o.checked_add(l).is_none_or(|end| end > size))
        {
            return Err(Status::invalid_argument(format!(
                "range {o}+{l} reaches past the layer's {size} bytes"
            )));
        }
        let ranges: Vec<(u64, u64)> = req.offsets.into_iter().zip(req.lengths).collect();
        let tls = self.stream_tls.clone();
        let secured = tls.is_some();
        let (port, token) = crate::sync::serve_ranges(bind, &path, ranges, tls).map_err(to_status)?;
        Ok(Response::new(LayerStream {
            port: port as u32,
            token: token.to_vec(),
            tls: secured,
        }))
    }

    async fn layer_zeros(
        &self,
        req: Request<LayerZerosRequest>,
    ) -> Result<Response<LayerZerosReply>, Status> {
        self.authenticate(&req).await?;
        let id = req.into_inner().layer_id;
        self.snapshot_layer(id).await?;
        let dir = self.run(|r| Ok(r.dir().to_path_buf())).await?.into_inner();
        let path = crate::meta::zeros_path(&dir, id);
        let log = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(to_status(ReplicaError::io("read", &path, e))),
        };
        Ok(Response::new(LayerZerosReply { log }))
    }

    async fn sync_from(&self, req: Request<SyncFromRequest>) -> Result<Response<SyncReply>, Status> {
        self.check_no_backup("a sync, which replaces the chain,")?;
        let proven = self.authenticate(&req).await?;
        let caller = caller_of(&req);
        let req = req.into_inner();
        let c = caller.clone();
        let secret = self
            .run(move |r| {
                check_generation(r, req.generation, c.as_deref())?;
                Ok(r.secret().cloned())
            })
            .await?
            .into_inner();
        // The source holds the same secret: this replica proves itself to it at the
        // generation the caller proved here.
        let auth = match (secret, proven) {
            (Some(secret), Some(g)) => {
                let engine = caller.unwrap_or_else(|| "sync".into());
                Some((secret.generation_key(g).control_header(&engine), engine))
            }
            _ => None,
        };
        if self.sync.running.swap(true, Ordering::AcqRel) {
            return Err(Status::failed_precondition(
                "a sync into this replica is already running",
            ));
        }
        let (handle, state, source) = (self.handle.clone(), self.sync.clone(), req.source.clone());
        let client_tls = self.client_tls.clone();
        let stream_tls = self.stream_tls.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let result = crate::sync::pull(&handle, &source, &state, auth, client_tls, stream_tls.as_deref());
            if let Ok(plan) = &result {
                *state.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some(plan.clone());
            }
            state.running.store(false, Ordering::Release);
            let _ = tx.send(result);
        });
        let plan = rx
            .await
            .map_err(|_| Status::internal("the sync thread ended without an answer"))?
            .map_err(to_status)?;
        Ok(Response::new(SyncReply {
            bytes_total: self.sync.total.load(Ordering::Relaxed),
            bytes_copied: self.sync.copied.load(Ordering::Relaxed),
            layers: plan.layers.len() as u32,
        }))
    }

    async fn finish_sync(
        &self,
        req: Request<FinishSyncRequest>,
    ) -> Result<Response<FinishSyncReply>, Status> {
        self.authenticate(&req).await?;
        let caller = caller_of(&req);
        let g = req.into_inner().generation;
        let plan = self
            .sync
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| Status::failed_precondition("no finished sync awaits installing"))?;
        self.run(move |r| {
            check_generation(r, g, caller.as_deref())?;
            let suspect_blocks = r.install_synced(&plan)?;
            r.set_mode(Mode::Rw)?;
            Ok(FinishSyncReply {
                suspect_blocks,
                info: Some(info_reply(r)?),
            })
        })
        .await
    }
}
