//! Online rebuild: adding a replica to a running volume.
//!
//! 1. [`add_replica`] checks the new
//!    replica (reachable, same size and sector size), claims it with the engine's
//!    generation and makes it WO (durably: it refuses reads until it is whole).
//! 2. With the volume paused, it joins the set and every replica, the new one too,
//!    takes a snapshot `rebuild-<time>`. From that instant the heads of all replicas get
//!    the same writes, and everything under them is immutable.
//! 3. A background thread asks the new replica to pull every snapshot layer from a
//!    healthy one (`SyncFrom`, horn_replica::sync): block checksums on both sides, only
//!    differing blocks copied, holes kept. Progress comes from the replica's `Info`.
//!    If the source fails, another healthy replica takes over (what was copied stays;
//!    the checksums skip it). If the new replica fails, it is marked ERR and the
//!    volume goes on with the others.
//! 4. Paused again: the new replica installs the synced layers under its head
//!    (`FinishSync`); the blocks that partial writes touched while it lacked the layers
//!    below are copied whole from the source; then the replica turns RW and the
//!    rebuild snapshot is deleted and purged (folded into the head), so later
//!    rebuilds do not read through it.
//!
//! Chain operations (snapshot, delete, purge, revert, expand) are refused while a
//! rebuild runs.

use std::sync::Arc;
use std::time::Duration;

use horn_proto::control::{
    ClaimRequest, FinishSyncRequest, InfoRequest, Mode as WireMode, SetModeRequest, SyncFromRequest,
};

use crate::client::{connect, control_err, Deadline};
use crate::engine::{ClaimedReplica, Engine};
use crate::recovery::copy_blocks;
use crate::replica_set::Mode;
use crate::types::{ChainOp, RebuildState, RebuildStatus, ReplicaAddr, Result, VolumeError};
use crate::volume::Volume;
use crate::{keeper, membership};

/// Adds replica `addr` to the running volume and starts rebuilding it in the
/// background; returns once it is in the set, WO, and the rebuild snapshot is
/// taken, with the rebuild's id. A replica already in the set as WO (a rebuild
/// an engine restart cut short) is rebuilt where it stands. Follow it with
/// [`Engine::rebuild`].
pub fn add_replica(volume: &mut Volume, addr: ReplicaAddr) -> Result<u64> {
    if let Err(e) = horn_replica::SharedReplica::hosted(&addr.data) {
        return Err(VolumeError::BadRequest(e.to_string()));
    }
    let engine = volume.engine().clone();
    if engine.is_rebuilding() {
        return Err(VolumeError::BadRequest(
            "a rebuild is already under way; wait for it to end".into(),
        ));
    }
    // A replica already in the set as WO (its rebuild was cut short, by an engine
    // restart) is rebuilt where it stands.
    let mut resumed = None;
    for (i, r) in engine.replicas().iter().enumerate() {
        if (r.data == addr.data || r.control == addr.control) && !engine.is_failed(i) {
            if r.mode() != Mode::Wo {
                return Err(VolumeError::BadRequest(format!(
                    "replica {} is already in the volume, RW",
                    addr.data
                )));
            }
            resumed = Some(i);
        }
    }
    let generation = engine.generation();
    let control = addr.control.clone();
    let err = |s: tonic::Status| VolumeError::Control {
        replica: control.clone(),
        code: s.code(),
        message: s.message().to_string(),
    };
    let info = engine.runtime().block_on(async {
        let mut c = connect(&addr.control, engine.caller(), Deadline::Call(engine.timeout()))
            .await
            .map_err(|e| tonic::Status::unavailable(format!("unreachable: {e}")))?;
        let info = c.info(InfoRequest {}).await?.into_inner();
        if info.size != engine.size() || info.sector_size != engine.sector_size() {
            return Err(tonic::Status::invalid_argument(format!(
                "it holds {} bytes in {}-byte sectors; the volume has {} in {}-byte sectors",
                info.size,
                info.sector_size,
                engine.size(),
                engine.sector_size()
            )));
        }
        if info.generation > generation {
            return Err(tonic::Status::failed_precondition(format!(
                "it belongs to a newer engine (generation {} above this one's {generation})",
                info.generation
            )));
        }
        if resumed.is_some() {
            return Ok(info.id);
        }
        let claimed = c
            .claim(ClaimRequest {
                generation,
                engine: engine.engine_id().to_string(),
                volume: engine.volume_id().to_string(),
                lease_ms: crate::lease::lease_ms(),
            })
            .await?
            .into_inner();
        c.set_mode(SetModeRequest {
            generation,
            mode: WireMode::Wo as i32,
        })
        .await?;
        Ok(claimed.id)
    });
    let id = info.map_err(err)?;
    let snapshot = format!(
        "rebuild-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    );
    let joined = volume.paused(true, |e| {
        let i = match resumed {
            Some(i) => i,
            None => e.add_replica(ClaimedReplica::new(&addr, id.clone(), Mode::Wo)),
        };
        // In the membership as WO before it takes a write: a start after a crash
        // leaves it out until it is rebuilt.
        if !e.record().wo.contains_key(&id) {
            if let Err(why) = keeper::change(e, |r| membership::with_rebuilding(r, &id, &addr.data)) {
                e.mark_failed(i, &format!("its joining could not be recorded: {why}"));
                return Err(VolumeError::Io(crate::types::IoError::Faulted(why)));
            }
        }
        let labels = [("horn.system".to_string(), "rebuild".to_string())].into();
        match e.run_chain_op(&ChainOp::Snapshot {
            name: snapshot.clone(),
            labels,
        }) {
            Ok(_) => Ok(i),
            Err(err) => {
                e.mark_failed(i, &format!("the rebuild snapshot failed: {err}"));
                Err(err)
            }
        }
    })?;
    let status = RebuildStatus {
        id: 0,
        replica: addr.data.clone(),
        source: String::new(),
        state: RebuildState::Syncing,
        done: 0,
        total: 0,
        copied: 0,
        suspects: 0,
        started: std::time::Instant::now(),
        elapsed: None,
    };
    let rebuild = engine.begin_rebuild(status, joined)?;
    let thread_engine = engine.clone();
    let spawned = std::thread::Builder::new().name("rebuild".into()).spawn(move || {
        run(
            thread_engine,
            Rebuild {
                id: rebuild,
                target: joined,
            },
            snapshot,
        )
    });
    if let Err(e) = spawned {
        engine.end_rebuild();
        engine.mark_failed(joined, "the rebuild thread could not start");
        return Err(VolumeError::System {
            op: "starting the rebuild thread",
            source: e,
        });
    }
    Ok(rebuild)
}

/// A rebuild under way: its id, and the index of the replica it rebuilds.
#[derive(Clone, Copy)]
struct Rebuild {
    id: u64,
    target: usize,
}

/// Runs `rebuild` (its replica joined, WO, the snapshot taken) to its end, on the
/// calling thread.
fn run(engine: Arc<Engine>, rebuild: Rebuild, snapshot: String) {
    let target = rebuild.target;
    let outcome = sync_and_finish(&engine, rebuild);
    let replica = engine.replicas()[target].data.clone();
    match &outcome {
        Ok(()) => tracing::info!(%replica, "rebuild done: the replica is RW"),
        Err(e) => {
            tracing::error!(%replica, error = %e, "rebuild failed");
            engine.mark_failed(target, &format!("its rebuild failed: {e}"));
        }
    }
    discard_snapshot(&engine, &snapshot);
    engine.update_rebuild(rebuild.id, |s| {
        s.elapsed = Some(s.started.elapsed());
        match &outcome {
            Ok(()) => s.state = RebuildState::Done,
            Err(e) => s.state = RebuildState::Failed(e.to_string()),
        }
    });
    engine.end_rebuild();
}

/// Deletes and purges the rebuild snapshot, whatever became of the rebuild, so that
/// the next rebuild does not read through it (the purge also folds away snapshots the
/// operator deleted).
fn discard_snapshot(engine: &Engine, snapshot: &str) {
    match engine
        .run_chain_op(&ChainOp::Delete(snapshot.to_string()))
        .and_then(|_| engine.run_chain_op(&ChainOp::Purge))
    {
        Ok(_) => tracing::info!(snapshot, "rebuild: the rebuild snapshot is purged"),
        Err(e) => tracing::warn!(snapshot, error = %e, "rebuild: could not purge the rebuild snapshot"),
    }
}

fn sync_and_finish(engine: &Arc<Engine>, rebuild: Rebuild) -> Result<()> {
    let Rebuild { id, target } = rebuild;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| VolumeError::System {
            op: "starting the rebuild's runtime",
            source,
        })?;
    let replicas = engine.replicas();
    let t = replicas[target].clone();
    let mut tried: Vec<usize> = Vec::new();
    let source = loop {
        if engine.is_failed(target) {
            return Err(VolumeError::BadRequest(
                "the replica being rebuilt failed; the volume goes on without it".into(),
            ));
        }
        let Some(s) = (0..replicas.len()).find(|&i| {
            i != target && !tried.contains(&i) && !engine.is_failed(i) && replicas[i].mode() == Mode::Rw
        }) else {
            return Err(VolumeError::BadRequest(
                "no healthy replica is left to copy from".into(),
            ));
        };
        tried.push(s);
        let src = replicas[s].clone();
        engine.update_rebuild(id, |st| st.source = src.data.clone());
        tracing::info!(replica = %t.data, source = %src.data, "rebuild: syncing layers");
        let result = rt.block_on(async {
            let mut tc = connect(&t.control, engine.caller(), Deadline::Transfer(engine.timeout())).await?;
            let mut progress = connect(&t.control, engine.caller(), Deadline::Call(engine.timeout())).await?;
            let call = tc.sync_from(SyncFromRequest {
                generation: engine.generation(),
                source: src.control.clone(),
            });
            tokio::pin!(call);
            loop {
                tokio::select! {
                    r = &mut call => return r.map(|r| r.into_inner()).map_err(control_err(&t.control)),
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {
                        if let Ok(i) = progress.info(InfoRequest {}).await {
                            let i = i.into_inner();
                            engine.update_rebuild(id, |st| {
                                st.done = i.sync_done;
                                st.total = i.sync_total;
                                st.copied = i.sync_copied;
                            });
                        }
                    }
                }
            }
        });
        match result {
            Ok(reply) => {
                engine.update_rebuild(id, |st| {
                    st.done = reply.bytes_total;
                    st.total = reply.bytes_total;
                    st.copied = reply.bytes_copied;
                });
                break s;
            }
            Err(e) => {
                // Whose fault? A target that cannot answer its own Info is gone.
                let target_alive = rt.block_on(async {
                    connect(&t.control, engine.caller(), Deadline::Call(engine.timeout()))
                        .await?
                        .info(InfoRequest {})
                        .await
                        .map_err(control_err(&t.control))
                });
                if target_alive.is_err() || engine.is_failed(target) {
                    return Err(e);
                }
                tracing::warn!(source = %src.data, error = %e, "rebuild: the source failed; trying another");
            }
        }
    };
    // Install under a pause, from a queue of this thread's own.
    let mut v = Volume::open(engine)?;
    let generation = engine.generation();
    let finished = v.paused(false, |e| {
        rt.block_on(async {
            let mut tc = connect(&t.control, engine.caller(), Deadline::Chain(engine.timeout())).await?;
            let reply = tc
                .finish_sync(FinishSyncRequest { generation })
                .await
                .map_err(control_err(&t.control))?
                .into_inner();
            let mut suspects = reply.suspect_blocks.clone();
            suspects.sort_unstable();
            suspects.dedup();
            // Under the pause every healthy RW replica holds the suspects' current
            // data, so a source that died since the copy hands over to another.
            let mut last = None;
            for s in std::iter::once(source).chain((0..replicas.len()).filter(|&i| {
                i != source && i != target && !e.is_failed(i) && replicas[i].mode() == Mode::Rw
            })) {
                let sr = &replicas[s];
                let copied = async {
                    let mut sc = connect(&sr.control, engine.caller(), Deadline::Call(engine.timeout())).await?;
                    copy_blocks(
                        (&mut sc, &sr.control),
                        (&mut tc, &t.control),
                        &suspects,
                        generation,
                    )
                    .await
                }
                .await;
                match copied {
                    Ok(()) => {
                        engine.update_rebuild(id, |st| st.source = sr.data.clone());
                        return Ok::<_, VolumeError>(reply.suspect_blocks.len());
                    }
                    Err(err) => {
                        let target_alive = tc.info(InfoRequest {}).await.is_ok();
                        if !target_alive {
                            return Err(err);
                        }
                        tracing::warn!(source = %sr.data, error = %err, "rebuild: the source failed while copying suspects; trying another");
                        last = Some(err);
                    }
                }
            }
            Err(last.unwrap_or_else(|| {
                VolumeError::BadRequest("no healthy replica is left to copy from".into())
            }))
        })
        .and_then(|n| {
            // RW in the membership, durably, before it serves a read: a crash before
            // this leaves it WO, to be rebuilt again.
            keeper::change(e, |r| membership::with_promoted(r, &t.id))
                .map_err(|why| VolumeError::Io(crate::types::IoError::Faulted(why)))?;
            e.promote(target);
            Ok(n)
        })
    });
    let suspects = match finished {
        Ok(n) => {
            engine.update_rebuild(id, |st| st.suspects = n as u64);
            n
        }
        Err(e) => {
            let _ = v.close();
            return Err(e);
        }
    };
    tracing::info!(replica = %t.data, suspects, "rebuild: layers installed, the replica is RW");
    v.close()
}
