//! Starting a volume's engine: claiming its replicas and reconciling them before any
//! queue opens.
//!
//! [`start`] reads each replica's state through its control service, picks a
//! generation above all of theirs, and leaves out replicas that are unreachable, of
//! another size, or behind (dirty with an older generation than the newest: they
//! missed the last engine's writes). The replicas it claims are then made identical
//! where their write-intent records say a crash may have left them apart
//! ([`crate::recovery::reconcile`]); only then may queues open.
//!
//! Each claim asks for a read lease ([`crate::lease`]). A replica on which another
//! engine's lease still runs refuses the claim with the time left; the start waits
//! for it to lapse, and gives up on a lease that keeps being renewed (its engine is
//! running). A start that fails after its claims gives their leases up.

use std::sync::Arc;
use std::time::Duration;

use horn_proto::control::{ClaimRequest, InfoReply, InfoRequest, LEASE_LEFT_HEADER};
use horn_replica::control::record_from_wire;
use horn_replica::membership::MAX_GENERATION;

use crate::authority::{self, Authority, Grant};
use crate::client::{self, Caller, ControlClient};
use crate::crypt::VolumeCipher;
use crate::engine::{ClaimedReplica, Engine};
use crate::membership::{self, Candidate};
use crate::replica_set::Mode;
use crate::types::{ReplicaAddr, Result, StartReport, VolumeError};
use crate::{keeper, lease, recovery};
use horn_proto::auth::{GenerationKey, VolumeSecret};

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
    start_with(
        replicas,
        timeout,
        StartOptions {
            pin: pin.map(str::to_string),
            ..StartOptions::default()
        },
    )
}

/// What a start may be given besides its replicas.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Start only if the replicas hold this volume ([`start_pinned`]).
    pub pin: Option<String>,
    /// A membership authority besides the replicas (a manager: see
    /// [`crate::authority`]): the generation is begun there before any claim, its
    /// record joins the replicas' in deciding the start, and every record of this
    /// engine is stored there before it counts.
    pub authority: Option<Arc<dyn Authority>>,
    /// The volume's key ([`crate::crypt`]): the volume is encrypted, or becomes so at
    /// its first start. Checked against the record's check value before anything is
    /// served.
    pub cipher: Option<Arc<VolumeCipher>>,
    /// The volume's secret, held by its replicas too ([`horn_proto::auth`]): the
    /// engine proves the key of its generation to every replica, and serves only from
    /// replicas that prove it back. Under an authority that hands out generation keys,
    /// its key is used instead.
    pub secret: Option<VolumeSecret>,
    /// How to reach the replicas' control services over TLS (the node's
    /// certificate, checked against the cluster's CA), where they serve it.
    pub tls: Option<horn_proto::auth::ClientTls>,
    /// The data wire over TLS (`--data-tls`): where to connect for each replica's.
    pub data_tls: Option<horn_proto::auth::DataDial>,
}

/// [`start`], with `options` (see [`StartOptions`]).
pub fn start_with(
    replicas: &[ReplicaAddr],
    timeout: Duration,
    options: StartOptions,
) -> Result<(Arc<Engine>, StartReport)> {
    let StartOptions {
        pin,
        authority,
        cipher,
        secret,
        tls,
        data_tls,
    } = options;
    let pin = pin.as_deref();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| VolumeError::System {
            op: "starting the control runtime",
            source,
        })?;
    let engine_id = membership::new_id();
    // Info is open to every caller: no key is needed to learn the generation.
    let asker = Caller::new(&engine_id, None, tls.clone())?;
    let mut skipped = Vec::new();
    // What each replica holds, to pick a generation above all and the volume to claim.
    let mut infos = Vec::new();
    for r in replicas {
        match call(&runtime, timeout, (&r.control, &asker), |mut c| async move {
            c.info(InfoRequest {}).await.map(|i| i.into_inner())
        }) {
            Ok(i) => infos.push((r.clone(), i)),
            Err(e) => skipped.push((r.data.clone(), format!("unreachable: {e}"))),
        }
    }
    let newest = infos.iter().map(|(_, i)| i.generation).max().unwrap_or(0);
    let mut generation = newest
        .checked_add(1)
        .filter(|g| *g <= MAX_GENERATION)
        .ok_or_else(|| {
            VolumeError::NoReplica(format!("a replica's generation ({newest}) is at its maximum"))
        })?;
    // Under an authority, the generation begins there first: from here it takes
    // records from this engine only.
    let grant = match &authority {
        Some(a) => {
            let g = a.begin(generation, &engine_id).map_err(|e| {
                VolumeError::NoReplica(format!("the membership authority refused the start: {e}"))
            })?;
            if g.generation < generation || g.generation > MAX_GENERATION {
                return Err(VolumeError::NoReplica(format!(
                    "the membership authority began generation {}, not one from {generation} to \
                     {MAX_GENERATION}",
                    g.generation
                )));
            }
            generation = g.generation;
            Some(g)
        }
        None => None,
    };
    let key = generation_key(grant.as_ref(), secret.as_ref(), generation)?;
    let caller = Caller::new(&engine_id, key.as_ref(), tls)?.with_data(data_tls);
    let volume = infos
        .iter()
        .filter_map(|(_, i)| i.record.clone().map(record_from_wire))
        .chain(grant.as_ref().and_then(|g| g.record.clone()))
        .max_by_key(|r| r.epoch())
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
    // records the claims return are the ones to decide by. Each claim asks for a read
    // lease; the lease counts from the earliest claim that was granted.
    let mut claimed = Vec::new();
    let mut leased_since = u64::MAX;
    for (r, _) in infos {
        let request = ClaimRequest {
            generation,
            engine: engine_id.clone(),
            volume: volume.clone(),
            lease_ms: lease::lease_ms(),
        };
        match claim(&runtime, timeout, &r, &caller, request) {
            Ok((info, sent)) => {
                leased_since = leased_since.min(sent);
                claimed.push((r, info));
            }
            Err(e) => skipped.push((r.data.clone(), format!("claim refused: {e}"))),
        }
    }
    let controls: Vec<String> = claimed.iter().map(|(r, _)| r.control.clone()).collect();
    let started = serve(
        runtime,
        replicas.len(),
        claimed,
        skipped,
        (generation, &engine_id),
        timeout,
        leased_since,
        authority.zip(grant),
        cipher,
        (caller.clone(), key),
    );
    if let Err(e) = &started {
        // What was claimed is not served: the next engine need not wait for the leases.
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
        if let Ok(runtime) = runtime {
            lease::give_up(&runtime, &controls, generation, &caller, timeout);
        }
        tracing::debug!(error = %e, "the start failed after its claims; their leases were given up");
    }
    started
}

/// The rest of a start, once the replicas are claimed: which of them serve, the new
/// generation's first record, the engine with its lease, reconciliation.
#[allow(clippy::too_many_arguments)]
fn serve(
    runtime: tokio::runtime::Runtime,
    listed: usize,
    claimed: Vec<(ReplicaAddr, InfoReply)>,
    mut skipped: Vec<(String, String)>,
    (generation, engine_id): (u64, &str),
    timeout: Duration,
    leased_since: u64,
    authority: Option<(Arc<dyn Authority>, Grant)>,
    cipher: Option<Arc<VolumeCipher>>,
    (caller, key): (Caller, Option<GenerationKey>),
) -> Result<(Arc<Engine>, StartReport)> {
    let engine_id = engine_id.to_string();
    let managed = authority.is_some();
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
    let plan = membership::plan_start_under(
        listed,
        &candidates,
        &membership::new_id(),
        authority.as_ref().map(|(_, g)| g),
    )
    .map_err(|why| VolumeError::NoReplica(with_skipped(why, &skipped)))?;
    // The key before anything else: a wrong one would serve garbage, and none would
    // serve ciphertext and write plaintext beside it.
    let mine = cipher.as_ref().map_or("", |c| c.check_value());
    membership::check_cipher(plan.base.as_ref(), mine).map_err(VolumeError::NoReplica)?;
    let mut plan = plan;
    plan.cipher = mine.to_string();
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
    let (stored, refused) = keeper::store(&runtime, &targets, &record, &caller, timeout);
    if !membership::counts_under(&record, &stored, managed) {
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
        let (again, more) = keeper::store(&runtime, &targets, &next, &caller, timeout);
        if !membership::counts_under(&next, &again, managed) {
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
    // Under an authority the record counts once it is there too.
    if let Some((a, _)) = &authority {
        authority::put_patiently(a.as_ref(), &record, authority::PATIENCE).map_err(|e| {
            VolumeError::NoReplica(format!(
                "the membership authority did not store the new membership record: {e}"
            ))
        })?;
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
    let granted = record.rw.keys().cloned().collect();
    let lease_holds = membership::leased(&record, &granted);
    let engine = Arc::new(Engine::new(
        used,
        record,
        size,
        sector_size,
        timeout,
        skipped,
        runtime,
        authority.map(|(a, _)| a),
        cipher,
        (caller, key),
    ));
    if lease_holds {
        engine.extend_lease(leased_since.saturating_add(lease::LEASE_TRUSTED.as_nanos() as u64));
    }
    lease::spawn(&engine);
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
    keeper::spawn(&engine);
    Ok((engine, report))
}

/// Claims replica `r` with `request`; returns what it holds and when the granted claim
/// was sent (its lease counts from then). While another engine's read lease runs on
/// it, waits for the lease to lapse, polling; an engine that keeps renewing it is still
/// running, and the claim is refused.
fn claim(
    runtime: &tokio::runtime::Runtime,
    timeout: Duration,
    r: &ReplicaAddr,
    caller: &Caller,
    request: ClaimRequest,
) -> std::result::Result<(InfoReply, u64), String> {
    let mut waiting: Option<(std::time::Instant, Duration)> = None;
    loop {
        let sent = lease::now_ns();
        let request = request.clone();
        let answer = call_status(runtime, timeout, (&r.control, caller), |mut c| async move {
            c.claim(request).await.map(|i| i.into_inner())
        });
        let status = match answer {
            Ok(info) => return Ok((info, sent)),
            Err(s) => s,
        };
        let left = status
            .metadata()
            .get(LEASE_LEFT_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis);
        let Some(left) = left else {
            return Err(status.message().to_string());
        };
        let (since, limit) = *waiting.get_or_insert_with(|| {
            tracing::info!(
                replica = %r.data,
                left_ms = left.as_millis() as u64,
                "another engine's read lease runs on this replica; waiting for it to lapse"
            );
            (std::time::Instant::now(), left + lease::RENEW_EVERY)
        });
        if since.elapsed() > limit {
            return Err(format!(
                "{}; it was renewed while this engine waited {:.1?}: that engine is still running \
                 (stop it, or cut it off, first)",
                status.message(),
                since.elapsed()
            ));
        }
        std::thread::sleep(
            left.min(Duration::from_millis(200))
                .max(Duration::from_millis(10)),
        );
    }
}

/// The key of `generation` the engine proves to its replicas: the one the authority
/// handed over with its grant, or else the one derived from the volume's secret; none
/// when the engine has neither (its replicas must then be open to every caller).
fn generation_key(
    grant: Option<&Grant>,
    secret: Option<&VolumeSecret>,
    generation: u64,
) -> Result<Option<GenerationKey>> {
    match (grant.and_then(|g| g.key.clone()), secret) {
        (Some(k), _) if k.generation() != generation => Err(VolumeError::NoReplica(format!(
            "the membership authority handed over the key of generation {}, not of {generation}",
            k.generation()
        ))),
        (Some(k), _) => Ok(Some(k)),
        (None, Some(s)) => Ok(Some(s.generation_key(generation))),
        (None, None) => Ok(None),
    }
}

/// One control call to the replica at `control` as `caller`, connect included,
/// within `timeout`; a refusal as its message.
fn call<T, F, Fut>(
    runtime: &tokio::runtime::Runtime,
    timeout: Duration,
    replica: (&str, &Caller),
    f: F,
) -> std::result::Result<T, String>
where
    F: FnOnce(ControlClient) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, tonic::Status>>,
{
    call_status(runtime, timeout, replica, f).map_err(|s| s.message().to_string())
}

/// [`call`], with a refusal as the replica's whole status (its code and metadata, as
/// a claim refused for a running lease carries the time left).
fn call_status<T, F, Fut>(
    runtime: &tokio::runtime::Runtime,
    timeout: Duration,
    (control, caller): (&str, &Caller),
    f: F,
) -> std::result::Result<T, tonic::Status>
where
    F: FnOnce(ControlClient) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, tonic::Status>>,
{
    runtime.block_on(async {
        let work = async {
            let c = client::connect(control, caller, client::Deadline::Call(timeout))
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            f(c).await
        };
        tokio::time::timeout(timeout, work).await.unwrap_or_else(|_| {
            Err(tonic::Status::deadline_exceeded(format!(
                "no answer within {timeout:?}"
            )))
        })
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
