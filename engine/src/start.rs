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

use horn_proto::control::{ClaimRequest, InfoRequest};
use horn_replica::control::record_from_wire;
use horn_replica::membership::MAX_GENERATION;

use crate::client::{self, ControlClient};
use crate::engine::{ClaimedReplica, Engine};
use crate::membership::{self, Candidate};
use crate::replica_set::Mode;
use crate::types::{ReplicaAddr, Result, StartReport, VolumeError};
use crate::{keeper, recovery};

/// Claims `replicas` for a new engine, decides by the membership rules which of them
/// serve ([`crate::membership::plan_start`]), records the new membership, reconciles
/// the members, and returns the engine the volume's queues will share, with what the
/// start found. A replica that misses a request for `timeout` is dropped once I/O runs.
pub fn start(replicas: &[ReplicaAddr], timeout: Duration) -> Result<(Arc<Engine>, StartReport)> {
    start_pinned(replicas, timeout, None)
}

/// [`start`], pinned to volume `pin` when given: the start is refused, before any
/// claim, unless the newest membership record among the replicas is that volume's, so
/// that replicas whose disks are not mounted (blank directories) never become a new,
/// empty volume in its place.
pub fn start_pinned(
    replicas: &[ReplicaAddr],
    timeout: Duration,
    pin: Option<&str>,
) -> Result<(Arc<Engine>, StartReport)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| VolumeError::System {
            op: "starting the control runtime",
            source,
        })?;
    let engine_id = membership::new_id();
    let mut skipped = Vec::new();
    // What each replica holds, to pick a generation above all and the volume to claim.
    let mut infos = Vec::new();
    for r in replicas {
        match call(&runtime, timeout, (&r.control, &engine_id), |mut c| async move {
            c.info(InfoRequest {}).await.map(|i| i.into_inner())
        }) {
            Ok(i) => infos.push((r.clone(), i)),
            Err(e) => skipped.push((r.data.clone(), format!("unreachable: {e}"))),
        }
    }
    let newest = infos.iter().map(|(_, i)| i.generation).max().unwrap_or(0);
    let generation = newest
        .checked_add(1)
        .filter(|g| *g <= MAX_GENERATION)
        .ok_or_else(|| {
            VolumeError::NoReplica(format!("a replica's generation ({newest}) is at its maximum"))
        })?;
    let volume = infos
        .iter()
        .filter_map(|(_, i)| i.record.as_ref())
        .max_by_key(|r| (r.generation, r.version))
        .map(|r| r.volume.clone())
        .unwrap_or_default();
    if let Some(pin) = pin.filter(|p| *p != volume) {
        let held: Vec<String> = infos
            .iter()
            .map(|(r, i)| match i.volume.as_str() {
                "" => format!("{} is blank", r.data),
                v => format!("{} holds volume {v}", r.data),
            })
            .collect();
        return Err(VolumeError::NoReplica(with_skipped(
            format!(
                "the start is pinned to volume {pin}, and no membership record of it was found ({}). \
                 A pinned start never makes a new volume: check that the replicas' disks are mounted",
                if held.is_empty() {
                    "no replica answered".to_string()
                } else {
                    held.join("; ")
                }
            ),
            &skipped,
        )));
    }
    // Claims first: from here no older engine can change these replicas, so the
    // records the claims return are the ones to decide by.
    let mut claimed = Vec::new();
    for (r, _) in infos {
        let request = ClaimRequest {
            generation,
            engine: engine_id.clone(),
            volume: volume.clone(),
        };
        match call(&runtime, timeout, (&r.control, &engine_id), |mut c| async move {
            c.claim(request).await.map(|i| i.into_inner())
        }) {
            Ok(info) => claimed.push((r, info)),
            Err(e) => skipped.push((r.data.clone(), format!("claim refused: {e}"))),
        }
    }
    let candidates: Vec<Candidate> = claimed
        .iter()
        .map(|(r, i)| Candidate {
            id: i.id.clone(),
            name: r.data.clone(),
            volume: (!i.volume.is_empty()).then(|| i.volume.clone()),
            record: i.record.clone().map(record_from_wire),
            rebuilding: i.mode == horn_proto::control::Mode::Wo as i32,
        })
        .collect();
    let plan = membership::plan_start(replicas.len(), &candidates, &membership::new_id())
        .map_err(|why| VolumeError::NoReplica(with_skipped(why, &skipped)))?;
    for (i, why) in &plan.left_out {
        skipped.push((claimed[*i].0.data.clone(), format!("left out: {why}")));
    }
    let size = claimed[plan.rw[0]].1.size;
    let mut members = Vec::new();
    for &i in &plan.rw {
        let (r, info) = &claimed[i];
        if info.size != size {
            return Err(VolumeError::NoReplica(format!(
                "the replicas that hold every acknowledged write differ in size: {} has {} bytes, \
                 {} has {size}",
                r.data, info.size, claimed[plan.rw[0]].0.data
            )));
        }
        members.push(i);
    }
    // The new generation's first record counts once a majority of the base's RW
    // members (every member, at a volume's first start) have stored it.
    let mut record = plan.first_record(&candidates, generation, &engine_id);
    // Stored on every claimed replica the record must reach a share of: its members,
    // and the members of the sets its base had to reach (left out or not).
    let witnesses = membership::witnesses(&record);
    let targets: Vec<(String, String)> = (0..claimed.len())
        .filter(|&i| witnesses.contains(&candidates[i].id))
        .map(|i| (claimed[i].0.control.clone(), candidates[i].id.clone()))
        .collect();
    let (stored, refused) = keeper::store(&runtime, &targets, &record, timeout);
    if !membership::counts(&record, &stored) {
        return Err(VolumeError::NoReplica(format!(
            "too few replicas stored the new membership record ({})",
            describe(&refused)
        )));
    }
    let not_stored: Vec<String> = record
        .rw
        .keys()
        .filter(|id| !stored.contains(*id))
        .cloned()
        .collect();
    if !not_stored.is_empty() {
        // A member that did not store it is dropped before anything is served.
        let next = membership::without(&record, &not_stored);
        let (again, more) = keeper::store(&runtime, &targets, &next, timeout);
        if !membership::counts(&next, &again) {
            return Err(VolumeError::NoReplica(format!(
                "too few replicas stored the new membership record ({})",
                describe(&more)
            )));
        }
        for (r, why) in &refused {
            skipped.push((r.clone(), format!("did not store the membership record: {why}")));
        }
        members.retain(|&i| next.rw.contains_key(&candidates[i].id));
        record = next;
    }
    let sector_size = claimed[members[0]].1.sector_size;
    let used: Vec<ClaimedReplica> = members
        .iter()
        .map(|&i| ClaimedReplica::new(&claimed[i].0, candidates[i].id.clone(), Mode::Rw))
        .collect();
    let mut report = StartReport {
        generation,
        volume: record.volume.clone(),
        engine: engine_id.clone(),
        size,
        sector_size,
        used: used.iter().map(|c| c.data.clone()).collect(),
        skipped: skipped.clone(),
        reconciled: Default::default(),
    };
    let engine = Engine::new(used, record, size, sector_size, timeout, skipped, runtime);
    // Before any queue opens: no I/O is served until the replicas agree. Every member
    // holds every acknowledged write, so any of them is a sound source.
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
    let engine = Arc::new(engine);
    keeper::spawn(&engine);
    Ok((engine, report))
}

/// One control call to the replica at `control` as engine `engine`, connect
/// included, within `timeout`.
fn call<T, F, Fut>(
    runtime: &tokio::runtime::Runtime,
    timeout: Duration,
    (control, engine): (&str, &str),
    f: F,
) -> std::result::Result<T, String>
where
    F: FnOnce(ControlClient) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, tonic::Status>>,
{
    runtime.block_on(async {
        let work = async {
            let c = client::connect(control, engine, client::Deadline::Call(timeout))
                .await
                .map_err(|e| e.to_string())?;
            f(c).await.map_err(|s| s.message().to_string())
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    })
}

fn with_skipped(why: String, skipped: &[(String, String)]) -> String {
    if skipped.is_empty() {
        why
    } else {
        format!("{why}; {}", describe(skipped))
    }
}

fn describe(skipped: &[(String, String)]) -> String {
    skipped
        .iter()
        .map(|(r, why)| format!("{r}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}
