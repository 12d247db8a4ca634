//! The engine control service (gRPC, `proto/engine.proto`): the volume's replicas and
//! their modes, and the snapshot chain operated across every replica.
//!
//! Calls arrive on a tokio thread and run on the engine's own thread, which owns the
//! [`Volume`], through an [`EngineHandle`]: a closure and a reply channel per call.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use horn_proto::control::InfoReply;
use horn_proto::engine_control::engine_control_server::EngineControl;
use horn_proto::engine_control::{
    AddReplicaReply, AddReplicaRequest, Difference, DropReplicaReply, DropReplicaRequest,
    EngineDeleteRequest, EngineExpandRequest, EngineInfo, EngineInfoRequest, EnginePurgeRequest,
    EngineRevertRequest, EngineSnapshotRequest, ListSnapshotsRequest, RebuildStatus, ReplicaStatus, Snapshot,
    SnapshotList, VerifyReply, VerifyRequest,
};
use tonic::{Request, Response, Status};

use crate::engine::Engine;
use crate::rebuild;
use crate::replica_set::Mode;
use crate::types::{ChainOp, RebuildState, ReplicaAddr, VolumeError};
use crate::volume::Volume;

/// A call to run on the engine's thread.
pub type EngineCommand = Box<dyn FnOnce(&mut Volume) + Send>;

/// Sends calls to the engine's thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: Sender<Option<EngineCommand>>,
}

impl EngineHandle {
    /// A handle and the receiving end the engine's thread serves with [`serve_commands`].
    pub fn new() -> (EngineHandle, Receiver<Option<EngineCommand>>) {
        let (tx, rx) = mpsc::channel();
        (EngineHandle { tx }, rx)
    }

    /// Runs `f` with the volume on the engine's thread and returns its result.
    pub fn call<T: Send + 'static>(&self, f: impl FnOnce(&mut Volume) -> T + Send + 'static) -> Option<T> {
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        self.tx
            .send(Some(Box::new(move |v| {
                let _ = reply_tx.send(f(v));
            })))
            .ok()?;
        reply_rx.recv().ok()
    }

    /// Asks the engine's thread to stop serving.
    pub fn stop(&self) {
        let _ = self.tx.send(None);
    }
}

/// Serves calls on this thread until [`EngineHandle::stop`]. Between calls, every
/// `clean_every`, clears the replicas' write-intent records where regions are marked
/// ([`Volume::clean_intents`]).
pub fn serve_commands(volume: &mut Volume, rx: &Receiver<Option<EngineCommand>>, clean_every: Duration) {
    let mut next_clean = Instant::now() + clean_every;
    loop {
        match rx.recv_timeout(next_clean.saturating_duration_since(Instant::now())) {
            Ok(Some(cmd)) => cmd(volume),
            Ok(None) | Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() >= next_clean {
            if let Err(e) = volume.clean_intents() {
                tracing::warn!(error = %e, "clearing the write-intent records failed; they stay marked");
            }
            next_clean = Instant::now() + clean_every;
        }
    }
}

/// The gRPC service of one engine.
pub struct EngineControlService {
    handle: EngineHandle,
    /// For the calls that must not wait behind the volume's thread (a drop).
    engine: Arc<Engine>,
    /// Restores backups into the volume (hornd gives it one: horn-backup); `None`:
    /// restores are refused.
    restores: Option<Arc<dyn RestoreRunner>>,
    /// A restore is running (one at a time).
    restoring: Arc<std::sync::atomic::AtomicBool>,
}

/// Restores a backup into a volume through a queue of its own that writes the
/// backup's bytes as they are ([`Volume::open_raw`]: an encrypted volume's backup
/// holds ciphertext), reporting progress (blocks done of blocks) and returning the
/// report as JSON. A trait so that the engine's crate needs none of the targets'
/// clients.
pub trait RestoreRunner: Send + Sync {
    /// Runs `req` to the end (on a thread of its own: it blocks).
    fn run(
        &self,
        engine: &Arc<Engine>,
        req: horn_proto::engine_control::RestoreRequest,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<String, String>;
}

impl EngineControlService {
    /// A service running its calls through `handle`, on `engine`.
    pub fn new(handle: EngineHandle, engine: Arc<Engine>) -> Self {
        EngineControlService {
            handle,
            engine,
            restores: None,
            restoring: Arc::default(),
        }
    }

    /// The service, restoring backups with `runner`.
    pub fn with_restores(mut self, runner: Option<Arc<dyn RestoreRunner>>) -> Self {
        self.restores = runner;
        self
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Volume) -> Result<T, VolumeError> + Send + 'static,
    ) -> Result<Response<T>, Status> {
        let handle = self.handle.clone();
        let out = tokio::task::spawn_blocking(move || handle.call(f))
            .await
            .map_err(|e| Status::internal(format!("engine call panicked: {e}")))?;
        match out {
            None => Err(Status::unavailable("the engine has stopped")),
            Some(Ok(v)) => Ok(Response::new(v)),
            Some(Err(e)) => Err(to_status(e)),
        }
    }
}

/// Maps an engine error to a gRPC status, keeping a replica's own code and words.
fn to_status(e: VolumeError) -> Status {
    match e {
        VolumeError::Control {
            replica,
            code,
            message,
        } => Status::new(code, format!("replica {replica}: {message}")),
        VolumeError::BadRequest(why) => Status::invalid_argument(why),
        other => Status::unavailable(other.to_string()),
    }
}

fn engine_info(v: &Volume) -> EngineInfo {
    EngineInfo {
        size: v.size(),
        sector_size: v.sector_size(),
        generation: v.generation(),
        replicas: replica_rows(v.replicas(), v.engine().failure_reasons()),
        skipped: v.skipped().iter().map(|(r, why)| format!("{r}: {why}")).collect(),
        faulted: v.engine().faulted().unwrap_or_default(),
        read_lease_left_ms: v.engine().read_lease_left().as_millis() as u64,
        volume_id: v.engine().volume_id().to_string(),
        rebuilds: v
            .engine()
            .rebuilds()
            .into_iter()
            .map(|r| {
                let (state, error) = match &r.state {
                    RebuildState::Syncing => ("syncing", String::new()),
                    RebuildState::Done => ("done", String::new()),
                    RebuildState::Failed(why) => ("failed", why.clone()),
                };
                RebuildStatus {
                    id: r.id,
                    replica: r.replica.clone(),
                    source: r.source.clone(),
                    state: state.into(),
                    error,
                    bytes_done: r.done,
                    bytes_total: r.total,
                    bytes_copied: r.copied,
                    rate_bytes_per_second: r.rate(),
                    eta_seconds: r.eta().unwrap_or(-1.0),
                    elapsed_seconds: r.elapsed.unwrap_or_else(|| r.started.elapsed()).as_secs_f64(),
                }
            })
            .collect(),
    }
}

/// One row per replica the engine has held, in its order. A replica re-added at an
/// address (after it failed) gets a new row; the earlier ones are marked superseded,
/// so a listing can show each replica once and its history on request.
fn replica_rows(modes: Vec<(String, Mode)>, failures: Vec<Option<String>>) -> Vec<ReplicaStatus> {
    let mut rows: Vec<ReplicaStatus> = modes
        .into_iter()
        .enumerate()
        .map(|(i, (address, mode))| ReplicaStatus {
            address,
            mode: match mode {
                Mode::Rw => "RW",
                Mode::Wo => "WO",
                Mode::Err => "ERR",
            }
            .into(),
            failure: failures.get(i).cloned().flatten().unwrap_or_default(),
            superseded: false,
        })
        .collect();
    for i in 0..rows.len() {
        let later = rows[i + 1..].iter().any(|r| r.address == rows[i].address);
        rows[i].superseded = later;
    }
    rows
}

/// How each replica's chain differs from the first one's: snapshots it lacks or has
/// beyond it, or that differ in parent or deletion, and replicas that did not answer.
pub fn chain_differences(views: &[(String, std::result::Result<InfoReply, String>)]) -> Vec<String> {
    type Shape = std::collections::BTreeMap<String, (String, bool)>;
    let shape = |i: &InfoReply| -> Shape {
        i.layers
            .iter()
            .filter(|l| !l.name.is_empty())
            .map(|l| (l.name.clone(), (l.parent.clone(), l.removed)))
            .collect()
    };
    let mut out = Vec::new();
    let Some((first_name, first)) = views
        .iter()
        .find_map(|(n, v)| v.as_ref().ok().map(|i| (n, shape(i))))
    else {
        return views
            .iter()
            .map(|(n, v)| format!("{n}: {}", v.as_ref().err().cloned().unwrap_or_default()))
            .collect();
    };
    for (name, view) in views {
        let theirs = match view {
            Ok(i) => shape(i),
            Err(e) => {
                out.push(format!("{name}: did not answer: {e}"));
                continue;
            }
        };
        for (snap, mine) in &first {
            match theirs.get(snap) {
                None => out.push(format!("{name}: lacks snapshot {snap} (which {first_name} has)")),
                Some(t) if t != mine => out.push(format!(
                    "{name}: snapshot {snap} differs (parent {:?}, deleted {}; {first_name}: parent {:?}, deleted {})",
                    t.0, t.1, mine.0, mine.1
                )),
                _ => {}
            }
        }
        for snap in theirs.keys().filter(|s| !first.contains_key(*s)) {
            out.push(format!("{name}: has snapshot {snap}, which {first_name} lacks"));
        }
    }
    out
}

fn snapshots(info: InfoReply) -> SnapshotList {
    SnapshotList {
        differences: Vec::new(),
        snapshots: info
            .layers
            .into_iter()
            .filter(|l| !l.name.is_empty())
            .map(|l| Snapshot {
                name: l.name,
                parent: l.parent,
                created: l.created,
                labels: l.labels,
                removed: l.removed,
                in_chain: l.in_chain,
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl EngineControl for EngineControlService {
    type BackupStream = horn_proto::progress::ProgressStream;
    type RestoreStream = horn_proto::progress::ProgressStream;

    async fn backup(
        &self,
        req: Request<horn_proto::control::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let mut req = req.into_inner();
        if req.name.is_empty() {
            return Err(Status::invalid_argument("name the backup"));
        }
        if req.volume.is_empty() {
            req.volume = self.engine.volume_id().to_string();
        }
        if req.volume.is_empty() {
            return Err(Status::invalid_argument(
                "this engine serves no named volume (hornd engine --volume): name the volume the backup is of",
            ));
        }
        if req.snapshot.is_empty() {
            let snap = format!("backup-{}", req.name);
            req.snapshot = snap.clone();
            self.run(move |v| v.snapshot(&snap)).await?;
        }
        // A replica that holds the whole volume, one on this machine first.
        let replicas = self.engine.replicas();
        let source = (0..replicas.len())
            .filter(|&i| !self.engine.is_failed(i) && replicas[i].mode() == Mode::Rw)
            .max_by_key(|&i| replicas[i].config.local)
            .map(|i| replicas[i].clone())
            .ok_or_else(|| Status::unavailable("no replica in mode RW to read the backup from"))?;
        let mut client = crate::client::connect(
            &source.control,
            self.engine.caller(),
            crate::client::Deadline::Transfer(self.engine.timeout()),
        )
        .await
        .map_err(to_status)?;
        tracing::info!(backup = %req.name, snapshot = %req.snapshot, replica = %source.data, "backing up");
        let stream = client
            .backup(req)
            .await
            .map_err(|s| Status::new(s.code(), format!("replica {}: {}", source.data, s.message())))?
            .into_inner();
        Ok(Response::new(Box::pin(stream)))
    }

    async fn restore(
        &self,
        req: Request<horn_proto::engine_control::RestoreRequest>,
    ) -> Result<Response<Self::RestoreStream>, Status> {
        let runner = self
            .restores
            .clone()
            .ok_or_else(|| Status::unimplemented("this engine's server restores no backups"))?;
        if self.restoring.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(Status::failed_precondition(
                "a restore into this volume is running already",
            ));
        }
        let req = req.into_inner();
        let (tx, stream) = horn_proto::progress::channel();
        let (engine, restoring) = (self.engine.clone(), self.restoring.clone());
        let spawned = std::thread::Builder::new()
            .name("horn-restore".into())
            .spawn(move || {
                let r = runner.run(&engine, req, &|d, t| tx.progress(d, t));
                restoring.store(false, std::sync::atomic::Ordering::SeqCst);
                tx.finish(r.map_err(Status::failed_precondition));
            });
        if let Err(e) = spawned {
            self.restoring.store(false, std::sync::atomic::Ordering::SeqCst);
            return Err(Status::internal(format!(
                "cannot start the restore's thread: {e}"
            )));
        }
        Ok(Response::new(stream))
    }

    async fn info(&self, _req: Request<EngineInfoRequest>) -> Result<Response<EngineInfo>, Status> {
        self.run(|v| Ok(engine_info(v))).await
    }

    async fn expand(&self, req: Request<EngineExpandRequest>) -> Result<Response<EngineInfo>, Status> {
        let size = req.into_inner().size;
        self.run(move |v| {
            v.chain_op(ChainOp::Expand(size))?;
            Ok(engine_info(v))
        })
        .await
    }

    async fn snapshot(&self, req: Request<EngineSnapshotRequest>) -> Result<Response<SnapshotList>, Status> {
        let req = req.into_inner();
        self.run(move |v| {
            v.chain_op(ChainOp::Snapshot {
                name: req.name,
                labels: req.labels,
            })
            .map(snapshots)
        })
        .await
    }

    async fn list_snapshots(
        &self,
        _req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<SnapshotList>, Status> {
        self.run(|v| {
            let views = v.engine().chains();
            let mut list = v.chain_op(ChainOp::Info).map(snapshots)?;
            list.differences = chain_differences(&views);
            Ok(list)
        })
        .await
    }

    async fn delete_snapshot(
        &self,
        req: Request<EngineDeleteRequest>,
    ) -> Result<Response<SnapshotList>, Status> {
        let name = req.into_inner().name;
        self.run(move |v| v.chain_op(ChainOp::Delete(name)).map(snapshots))
            .await
    }

    async fn purge(&self, _req: Request<EnginePurgeRequest>) -> Result<Response<SnapshotList>, Status> {
        self.run(|v| v.chain_op(ChainOp::Purge).map(snapshots)).await
    }

    async fn revert(&self, req: Request<EngineRevertRequest>) -> Result<Response<SnapshotList>, Status> {
        let name = req.into_inner().name;
        self.run(move |v| v.chain_op(ChainOp::Revert(name)).map(snapshots))
            .await
    }

    async fn verify(&self, _req: Request<VerifyRequest>) -> Result<Response<VerifyReply>, Status> {
        self.run(|v| {
            let r = v.verify(|_, _| {})?;
            Ok(VerifyReply {
                bytes_compared: r.bytes_compared,
                replicas: r.replicas,
                differences: r
                    .differences
                    .into_iter()
                    .map(|d| Difference {
                        offset: d.offset,
                        length: d.len,
                        replicas: d.replicas,
                    })
                    .collect(),
                differing_bytes: r.differing_bytes,
            })
        })
        .await
    }

    async fn drop_replica(
        &self,
        req: Request<DropReplicaRequest>,
    ) -> Result<Response<DropReplicaReply>, Status> {
        let r = req.into_inner();
        if r.replica.is_empty() {
            return Err(Status::invalid_argument("name the replica by its data address"));
        }
        let reason = if r.reason.is_empty() {
            "dropped on request".to_string()
        } else {
            r.reason
        };
        let dropped = self
            .engine
            .drop_replica(&r.replica, &format!("replica {} failed: {reason}", r.replica));
        if dropped {
            tracing::warn!(replica = %r.replica, %reason, "replica dropped on request");
        }
        Ok(Response::new(DropReplicaReply { dropped }))
    }

    async fn add_replica(
        &self,
        req: Request<AddReplicaRequest>,
    ) -> Result<Response<AddReplicaReply>, Status> {
        let addr: ReplicaAddr = req
            .into_inner()
            .replica
            .parse()
            .map_err(Status::invalid_argument)?;
        self.run(move |v| {
            let rebuild_id = rebuild::add_replica(v, addr)?;
            Ok(AddReplicaReply {
                rebuild_id,
                info: Some(engine_info(v)),
            })
        })
        .await
    }
}
