//! Read leases: an engine serves a read only while it holds a lease from enough of its
//! RW replicas that no newer engine can have started.
//!
//! A write learns that its engine was deposed (a newer engine claimed the replicas),
//! since a fenced replica refuses it. A read does not: an engine cut off with the one
//! replica a newer engine did not claim would go on reading from it, and return what
//! the newer engine has since overwritten. So every claim grants its engine a lease of
//! [`READ_LEASE`] on the replica, and the lease thread here renews it every
//! [`RENEW_EVERY`]. While a lease runs, the replica takes no other engine's claim
//! (`horn_replica::membership::check_claim`). A start needs a strict majority of the
//! record in force's RW members; the lease counts once half of them (rounded up) have
//! granted it ([`crate::membership::leased`]): the two sets share a replica, so no
//! newer engine can start while the lease runs.
//!
//! **Time.** The engine counts its lease from the moment it *sent* a round of renewals,
//! and trusts it for [`LEASE_TRUSTED`], a second less than the replicas grant, which
//! count from when each renewal arrived: the engine's lease ends before any replica's.
//! The engine's clock is `CLOCK_BOOTTIME`, which goes on while the machine sleeps (a
//! lease must not seem to last longer because the engine's machine was suspended); the
//! replica's is monotonic, which may only make its lease last longer.
//!
//! **Reads.** A queue hands back a read's completion only while the lease runs
//! ([`Engine::reads_leased`]); otherwise it holds it until a round of renewals sent
//! after the read returned succeeds (the replica served it before the renewal arrived,
//! when no newer engine could hold the replica), or the volume faults. A renewal that
//! a replica refuses because a newer engine holds its claim faults the volume at once
//! ("deposed"); a replica that renews nothing for the replica timeout (and at least a
//! lease) is dropped, like one that misses an I/O's deadline.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use horn_proto::control::RenewLeaseRequest;

use crate::client::{self, Caller, ControlClient, Deadline};
pub(crate) use crate::engine::boottime_ns as now_ns;
use crate::engine::Engine;
use crate::membership;

/// How long a replica holds a lease from each claim or renewal.
pub const READ_LEASE: Duration = Duration::from_secs(4);
/// How long the engine trusts a lease from the moment it asked for it.
pub const LEASE_TRUSTED: Duration = Duration::from_secs(3);
/// How often the engine renews (each renewal's own deadline too).
pub const RENEW_EVERY: Duration = Duration::from_secs(1);

/// The lease a claim asks for, in the claim's words.
pub(crate) fn lease_ms() -> u64 {
    READ_LEASE.as_millis() as u64
}

/// Starts the lease thread of `engine`; it ends when the engine is dropped, faulted
/// or released.
pub(crate) fn spawn(engine: &Arc<Engine>) {
    let weak: Weak<Engine> = Arc::downgrade(engine);
    let spawned = std::thread::Builder::new()
        .name("horn-lease".into())
        .spawn(move || renew(weak));
    if let Err(e) = spawned {
        engine.fault(format!("could not start the read-lease thread: {e}"));
    }
}

/// The outcome of one replica's renewal.
enum Renewal {
    Granted,
    /// A newer engine holds the replica: this one is deposed.
    Deposed(String),
    /// No answer, or not this engine's replica any more.
    Failed(String),
}

fn renew(weak: Weak<Engine>) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            if let Some(engine) = weak.upgrade() {
                engine.fault(format!("could not start the read-lease runtime: {e}"));
            }
            return;
        }
    };
    let mut clients: HashMap<String, ControlClient> = HashMap::new();
    // When each replica last granted the lease (by identity).
    let mut granted_at: HashMap<String, u64> = HashMap::new();
    loop {
        let Some(engine) = weak.upgrade() else {
            return;
        };
        let sent = now_ns();
        {
            let _round = engine.lease_round();
            if engine.is_faulted() || engine.leases_closed() {
                return;
            }
            let replicas = engine.replicas();
            let targets: Vec<(usize, String, String)> = replicas
                .iter()
                .enumerate()
                .filter(|(i, _)| !engine.is_failed(*i))
                .map(|(i, r)| (i, r.id.clone(), r.control.clone()))
                .collect();
            let outcomes = runtime.block_on(round(&engine, &targets, &mut clients));
            let mut granted = std::collections::BTreeSet::new();
            for ((i, id, _), outcome) in targets.iter().zip(outcomes) {
                let since = *granted_at.entry(id.clone()).or_insert(sent);
                match outcome {
                    Renewal::Granted => {
                        granted_at.insert(id.clone(), sent);
                        granted.insert(id.clone());
                    }
                    Renewal::Deposed(why) => {
                        engine.fault(format!(
                            "this engine was deposed: replica {} refused its read lease ({why}); a newer \
                             engine holds the volume, and nothing more is served here",
                            replicas[*i].data
                        ));
                        return;
                    }
                    Renewal::Failed(why) => {
                        let silent = Duration::from_nanos(sent.saturating_sub(since));
                        // No sooner than a lease: one slow round on a busy machine
                        // is not a failed replica.
                        if silent > engine.timeout().max(READ_LEASE) {
                            engine.mark_failed(
                                *i,
                                &format!(
                                    "replica {} failed: it renewed no read lease for {silent:.1?} ({why})",
                                    replicas[*i].data
                                ),
                            );
                        }
                    }
                }
            }
            if membership::leased(&engine.record(), &granted) {
                engine.extend_lease(sent + LEASE_TRUSTED.as_nanos() as u64);
            }
        }
        drop(engine);
        let next = sent + RENEW_EVERY.as_nanos() as u64;
        std::thread::sleep(Duration::from_nanos(next.saturating_sub(now_ns())));
    }
}

/// One round: every target renewed in parallel, each within [`RENEW_EVERY`].
async fn round(
    engine: &Engine,
    targets: &[(usize, String, String)],
    clients: &mut HashMap<String, ControlClient>,
) -> Vec<Renewal> {
    let request = RenewLeaseRequest {
        generation: engine.generation(),
        lease_ms: lease_ms(),
    };
    let handles: Vec<_> = targets
        .iter()
        .map(|(_, _, control)| {
            let (control, caller) = (control.clone(), engine.caller().clone());
            let cached = clients.get(&control).cloned();
            tokio::spawn(async move {
                let call = async {
                    let mut c = match cached {
                        Some(c) => c,
                        None => client::connect(&control, &caller, Deadline::Call(RENEW_EVERY))
                            .await
                            .map_err(|e| Renewal::Failed(e.to_string()))?,
                    };
                    match c.renew_lease(request).await {
                        Ok(_) => Ok(c),
                        Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                            Err(Renewal::Deposed(s.message().to_string()))
                        }
                        Err(s) => Err(Renewal::Failed(s.message().to_string())),
                    }
                };
                let outcome = match tokio::time::timeout(RENEW_EVERY, call).await {
                    Ok(r) => r,
                    Err(_) => Err(Renewal::Failed(format!("no answer within {RENEW_EVERY:?}"))),
                };
                (control, outcome)
            })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        match h.await {
            Ok((control, Ok(c))) => {
                clients.insert(control, c);
                out.push(Renewal::Granted);
            }
            Ok((control, Err(r))) => {
                clients.remove(&control);
                out.push(r);
            }
            Err(e) => out.push(Renewal::Failed(format!("the renewal panicked: {e}"))),
        }
    }
    out
}

/// Gives up the leases an engine's claims were granted on the replicas at `controls`
/// (a start that failed after claiming, an engine released): the next engine need
/// not wait for them to lapse. Best effort, each within the replica timeout.
pub(crate) fn give_up(
    runtime: &tokio::runtime::Runtime,
    controls: &[String],
    generation: u64,
    caller: &Caller,
    timeout: Duration,
) {
    runtime.block_on(async {
        for control in controls {
            let call = async {
                let mut c = client::connect(control, caller, Deadline::Call(timeout))
                    .await
                    .map_err(|e| e.to_string())?;
                c.renew_lease(RenewLeaseRequest {
                    generation,
                    lease_ms: 0,
                })
                .await
                .map_err(|s| s.message().to_string())
            };
            if let Ok(Err(why)) | Err(why) = tokio::time::timeout(timeout, call)
                .await
                .map_err(|_| format!("no answer within {timeout:?}"))
            {
                tracing::debug!(replica = %control, %why, "could not give up a read lease; it lapses on its own");
            }
        }
    });
}
