//! Online rebuild: adding a replica to a running volume.
//!
//! 1. [`Volume::add_replica`](crate::volume::Volume::add_replica) checks the new
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
//!    rebuild snapshot is marked deleted (a purge folds it away).
//!
//! Chain operations (snapshot, delete, purge, revert, expand) are refused while a
//! rebuild runs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use horn_proto::control::{FinishSyncRequest, InfoRequest, SyncFromRequest};

use crate::engine::{control_err, Engine};
use crate::recovery::{connect, copy_blocks};
use crate::replica_set::Mode;
use crate::volume::{ChainOp, Result, Volume, VolumeError};

/// Where a rebuild is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebuildState {
    /// Copying layers.
    Syncing,
    /// The replica is RW.
    Done,
    /// Given up; why.
    Failed(String),
}

/// One rebuild's progress, for `hornctl engine info` and `add-replica`.
#[derive(Debug, Clone)]
pub struct RebuildStatus {
    /// The replica being rebuilt (data address).
    pub replica: String,
    /// The replica it copies from (data address).
    pub source: String,
    /// Where it is.
    pub state: RebuildState,
    /// Bytes of the source's layers gone through.
    pub done: u64,
    /// Bytes of the source's layers in all.
    pub total: u64,
    /// Bytes copied (the rest the replica held already).
    pub copied: u64,
    /// Blocks partial writes touched during the sync, copied whole at the end.
    pub suspects: u64,
    /// When it began.
    pub started: Instant,
    /// How long it took, once over.
    pub elapsed: Option<Duration>,
}

impl RebuildStatus {
    /// Bytes per second so far.
    pub fn rate(&self) -> f64 {
        let secs = self
            .elapsed
            .unwrap_or_else(|| self.started.elapsed())
            .as_secs_f64();
        if secs > 0.0 {
            self.done as f64 / secs
        } else {
            0.0
        }
    }

    /// Seconds left at the rate so far, while syncing.
    pub fn eta(&self) -> Option<f64> {
        let rate = self.rate();
        (self.state == RebuildState::Syncing && rate > 0.0)
            .then(|| self.total.saturating_sub(self.done) as f64 / rate)
    }
}

/// Runs a rebuild of replica `target` (joined, WO, snapshot taken) to its end, on
/// the calling thread.
pub(crate) fn run(engine: Arc<Engine>, target: usize, snapshot: String) {
    let outcome = sync_and_finish(&engine, target, &snapshot);
    engine.update_rebuild(target, |s| {
        s.elapsed = Some(s.started.elapsed());
        match &outcome {
            Ok(()) => s.state = RebuildState::Done,
            Err(e) => s.state = RebuildState::Failed(e.to_string()),
        }
    });
    match outcome {
        Ok(()) => {
            tracing::info!(replica = %engine.replicas()[target].data, "rebuild done: the replica is RW")
        }
        Err(e) => {
            tracing::error!(replica = %engine.replicas()[target].data, error = %e, "rebuild failed");
            engine.mark_failed(target, &format!("its rebuild failed: {e}"));
        }
    }
    engine.end_rebuild();
}

fn sync_and_finish(engine: &Arc<Engine>, target: usize, snapshot: &str) -> Result<()> {
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
        engine.update_rebuild(target, |st| st.source = src.data.clone());
        tracing::info!(replica = %t.data, source = %src.data, "rebuild: syncing layers");
        let result = rt.block_on(async {
            let mut tc = connect(&t.control).await?;
            let mut progress = connect(&t.control).await?;
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
                            engine.update_rebuild(target, |st| {
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
                engine.update_rebuild(target, |st| {
                    st.done = reply.bytes_total;
                    st.total = reply.bytes_total;
                    st.copied = reply.bytes_copied;
                });
                break s;
            }
            Err(e) => {
                // Whose fault? A target that cannot answer its own Info is gone.
                let target_alive = rt.block_on(async {
                    connect(&t.control)
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
    let src = replicas[source].clone();
    let mut v = Volume::open(engine)?;
    let generation = engine.generation();
    let finished = v.paused(false, |e| {
        rt.block_on(async {
            let mut tc = connect(&t.control).await?;
            let reply = tc
                .finish_sync(FinishSyncRequest { generation })
                .await
                .map_err(control_err(&t.control))?
                .into_inner();
            let mut sc = connect(&src.control).await?;
            let mut suspects = reply.suspect_blocks.clone();
            suspects.sort_unstable();
            suspects.dedup();
            copy_blocks(
                (&mut sc, &src.control),
                (&mut tc, &t.control),
                &suspects,
                generation,
            )
            .await?;
            Ok::<_, VolumeError>(reply.suspect_blocks.len())
        })
        .inspect(|_| e.promote(target))
    });
    let suspects = match finished {
        Ok(n) => {
            engine.update_rebuild(target, |st| st.suspects = n as u64);
            n
        }
        Err(e) => {
            let _ = v.close();
            return Err(e);
        }
    };
    tracing::info!(replica = %t.data, suspects, "rebuild: layers installed, the replica is RW");
    if let Err(e) = engine.run_chain_op(&ChainOp::Delete(snapshot.to_string())) {
        tracing::warn!(snapshot, error = %e, "rebuild: could not mark the rebuild snapshot deleted");
    }
    v.close()
}

/// The rebuilds of an engine, newest last (kept after they end, for `info`).
#[derive(Debug, Default)]
pub(crate) struct Rebuilds {
    pub(crate) by_replica: HashMap<usize, RebuildStatus>,
    pub(crate) running: bool,
}
