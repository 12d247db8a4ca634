//! The replica control service (gRPC, `proto/replica.proto`): info, claim and release,
//! mode, snapshot, delete, purge, revert, expand.
//!
//! Each call runs on the data loop's thread through a [`ServerHandle`], between I/Os,
//! so control and data never touch the replica at the same time and the data path
//! takes no lock. Calls that change the replica carry the caller's generation; an
//! older one than the replica's is refused, as on the data wire.

use std::collections::BTreeMap;

use horn_proto::control::replica_control_server::ReplicaControl;
use horn_proto::control::{
    ChecksumsReply, ChecksumsRequest, ClaimRequest, ClearIntentsRequest, DeleteSnapshotRequest,
    ExpandRequest, InfoReply, InfoRequest, IntentsReply, IntentsRequest, Layer, Mode as WireMode, PurgeReply,
    PurgeRequest, RangeData, ReadRangeRequest, ReleaseRequest, RevertRequest, SetModeRequest,
    SnapshotRequest, WriteRangeReply, WriteRangeRequest,
};
use tonic::{Request, Response, Status};

use crate::error::ReplicaError;
use crate::replica::Replica;
use crate::server::ServerHandle;
use crate::state::Mode;

/// The gRPC service of one served replica.
pub struct ControlService {
    handle: ServerHandle,
}

impl ControlService {
    /// A service that runs its calls on the data loop behind `handle`.
    pub fn new(handle: ServerHandle) -> Self {
        ControlService { handle }
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
        | ReplicaError::InvalidOperation(_) => Status::failed_precondition(msg),
        ReplicaError::Locked { .. } => Status::unavailable(msg),
        _ => Status::internal(msg),
    }
}

/// The most a range call moves (checksums: the range they cover).
pub const MAX_RANGE: u64 = 1 << 20;
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

/// Refuses a call from an engine older than the replica's generation.
fn check_generation(r: &Replica, generation: u64) -> Result<(), ReplicaError> {
    if generation < r.generation() {
        return Err(ReplicaError::StaleGeneration {
            current: r.generation(),
            given: generation,
        });
    }
    Ok(())
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
    })
}

#[tonic::async_trait]
impl ReplicaControl for ControlService {
    async fn info(&self, _req: Request<InfoRequest>) -> Result<Response<InfoReply>, Status> {
        self.run(|r| info_reply(r)).await
    }

    async fn claim(&self, req: Request<ClaimRequest>) -> Result<Response<InfoReply>, Status> {
        let g = req.into_inner().generation;
        self.run(move |r| {
            r.set_generation(g)?;
            r.set_dirty(true)?;
            info_reply(r)
        })
        .await
    }

    async fn release(&self, req: Request<ReleaseRequest>) -> Result<Response<InfoReply>, Status> {
        let g = req.into_inner().generation;
        self.run(move |r| {
            check_generation(r, g)?;
            r.set_dirty(false)?;
            info_reply(r)
        })
        .await
    }

    async fn set_mode(&self, req: Request<SetModeRequest>) -> Result<Response<InfoReply>, Status> {
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
            check_generation(r, req.generation)?;
            r.set_mode(mode)?;
            info_reply(r)
        })
        .await
    }

    async fn snapshot(&self, req: Request<SnapshotRequest>) -> Result<Response<InfoReply>, Status> {
        let req = req.into_inner();
        self.run(move |r| {
            check_generation(r, req.generation)?;
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
        let req = req.into_inner();
        self.run(move |r| {
            check_generation(r, req.generation)?;
            r.delete_snapshot(&req.name)?;
            info_reply(r)
        })
        .await
    }

    async fn purge(&self, req: Request<PurgeRequest>) -> Result<Response<PurgeReply>, Status> {
        let g = req.into_inner().generation;
        self.run(move |r| {
            check_generation(r, g)?;
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
        let req = req.into_inner();
        self.run(move |r| {
            check_generation(r, req.generation)?;
            r.revert(&req.name)?;
            info_reply(r)
        })
        .await
    }

    async fn expand(&self, req: Request<ExpandRequest>) -> Result<Response<InfoReply>, Status> {
        let req = req.into_inner();
        self.run(move |r| {
            check_generation(r, req.generation)?;
            r.expand(req.size)?;
            info_reply(r)
        })
        .await
    }

    async fn checksums(&self, req: Request<ChecksumsRequest>) -> Result<Response<ChecksumsReply>, Status> {
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

    async fn read_range(&self, req: Request<ReadRangeRequest>) -> Result<Response<RangeData>, Status> {
        let req = req.into_inner();
        self.run(move |r| {
            check_range_len(req.length, MAX_RANGE)?;
            let mut data = vec![0u8; req.length as usize];
            r.read_at(req.offset, &mut data)?;
            Ok(RangeData { data })
        })
        .await
    }

    async fn write_range(
        &self,
        req: Request<WriteRangeRequest>,
    ) -> Result<Response<WriteRangeReply>, Status> {
        let req = req.into_inner();
        self.run(move |r| {
            check_generation(r, req.generation)?;
            check_range_len(req.data.len() as u64, MAX_RANGE)?;
            r.mark_intent(req.offset, req.data.len() as u64)?;
            r.write_at(req.offset, &req.data)?;
            Ok(WriteRangeReply {})
        })
        .await
    }

    async fn intents(&self, _req: Request<IntentsRequest>) -> Result<Response<IntentsReply>, Status> {
        self.run(|r| Ok(intents_reply(r))).await
    }

    async fn clear_intents(
        &self,
        req: Request<ClearIntentsRequest>,
    ) -> Result<Response<IntentsReply>, Status> {
        let g = req.into_inner().generation;
        self.run(move |r| {
            check_generation(r, g)?;
            r.clear_intents()?;
            Ok(intents_reply(r))
        })
        .await
    }
}
