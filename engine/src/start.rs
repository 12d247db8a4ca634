//! Starting a volume's engine: claiming its replicas and reconciling them before any
//! queue opens.
//!
//! [`start`] reads each replica's state through its control service, picks a
//! generation above all of theirs, and leaves out replicas that are unreachable, of
//! another size, or behind (dirty with an older generation than the newest: they
//! missed the last engine's writes). The replicas it claims are then made identical
//! where their write-intent records say a crash may have left them apart
//! ([`crate::recovery::reconcile`]); only then may queues open.

use std::sync::Arc;
use std::time::Duration;

use horn_proto::control::replica_control_client::ReplicaControlClient;
use horn_proto::control::{ClaimRequest, InfoRequest};

use crate::engine::{ClaimedReplica, Engine};
use crate::recovery;
use crate::replica_set::Mode;
use crate::types::{ReplicaAddr, Result, StartReport, VolumeError};

/// Claims `replicas` for a new engine, reconciles them, and returns the engine the
/// volume's queues will share, with what the start found. A replica that misses a
/// request for `timeout` is dropped once I/O runs.
pub fn start(replicas: &[ReplicaAddr], timeout: Duration) -> Result<(Arc<Engine>, StartReport)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| VolumeError::System {
            op: "starting the control runtime",
            source,
        })?;
    let mut skipped = Vec::new();
    let mut infos = Vec::new();
    for r in replicas {
        let url = format!("http://{}", r.control);
        let info = runtime.block_on(async {
            let mut c = ReplicaControlClient::connect(url)
                .await
                .map_err(|e| e.to_string())?;
            c.info(InfoRequest {})
                .await
                .map(|i| i.into_inner())
                .map_err(|s| s.message().to_string())
        });
        match info {
            Ok(i) => infos.push((r.clone(), i)),
            Err(e) => skipped.push((r.data.clone(), format!("unreachable: {e}"))),
        }
    }
    let Some(size) = infos.first().map(|(_, i)| i.size) else {
        return Err(VolumeError::NoReplica(describe(&skipped)));
    };
    let newest = infos.iter().map(|(_, i)| i.generation).max().unwrap_or(0);
    let generation = newest + 1;
    let mut claimed = Vec::new();
    let mut sector_size = None;
    for (r, i) in infos {
        if i.size != size {
            skipped.push((r.data.clone(), format!("its size {} differs from {size}", i.size)));
            continue;
        }
        if i.dirty && i.generation < newest {
            let why = format!(
                "behind: left dirty at generation {} while others reached {newest}",
                i.generation
            );
            skipped.push((r.data.clone(), why));
            continue;
        }
        let url = format!("http://{}", r.control);
        let claim = runtime.block_on(async {
            let mut c = ReplicaControlClient::connect(url)
                .await
                .map_err(|e| e.to_string())?;
            c.claim(ClaimRequest { generation })
                .await
                .map_err(|s| s.message().to_string())
        });
        if let Err(e) = claim {
            skipped.push((r.data.clone(), format!("claim refused: {e}")));
            continue;
        }
        sector_size.get_or_insert(i.sector_size);
        // A replica being rebuilt stays write-only: it may lack data its peers have.
        let wo = i.mode == horn_proto::control::Mode::Wo as i32;
        claimed.push(ClaimedReplica::new(&r, if wo { Mode::Wo } else { Mode::Rw }));
    }
    if claimed.is_empty() {
        return Err(VolumeError::NoReplica(describe(&skipped)));
    }
    let mut report = StartReport {
        generation,
        size,
        sector_size: sector_size.unwrap_or(512),
        used: claimed.iter().map(|c| c.data.clone()).collect(),
        skipped: skipped.clone(),
        reconciled: Default::default(),
    };
    let engine = Engine::new(
        claimed,
        generation,
        size,
        report.sector_size,
        timeout,
        skipped,
        runtime,
    );
    // Before any queue opens: no I/O is served until the replicas agree.
    report.reconciled = recovery::reconcile(&engine)?;
    if report.reconciled.regions > 0 {
        let r = &report.reconciled;
        tracing::info!(
            regions = r.regions,
            compared = r.bytes_compared,
            differing_blocks = r.blocks_differing,
            copied = r.bytes_copied,
            source = r.source.as_deref().unwrap_or("-"),
            "reconciled the replicas where writes may have been in flight"
        );
    }
    Ok((Arc::new(engine), report))
}

fn describe(skipped: &[(String, String)]) -> String {
    skipped
        .iter()
        .map(|(r, why)| format!("{r}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}
