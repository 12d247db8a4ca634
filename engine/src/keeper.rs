//! Keeping the volume's membership record on its replicas.
//!
//! [`store`] sends a record to replicas in parallel, each call under the engine's
//! timeout, and says which stored it. [`change`] makes a change of membership count by
//! the rules of [`crate::membership`] (stored by a majority of the previous record's RW
//! members), drops the members that did not store it, and faults the volume when it
//! cannot count.
//!
//! The keeper thread ([`spawn`]) does this for drops: a queue that drops a replica
//! publishes it ([`Engine::mark_failed`]) and hands back no completion until the
//! keeper has recorded the drop (or faulted the volume), so no write a dropped replica
//! missed is acknowledged before a later start would know it missed it.

use std::collections::BTreeSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use horn_proto::control::MembershipRequest;
use horn_replica::control::record_to_wire;

use crate::authority;
use crate::client::{self, Caller};
use crate::engine::Engine;
use crate::membership::{self, Record};

/// Stores `record` on the replicas `targets` (control
/// address, identity) in parallel, calling as `caller`, each within `timeout`; returns the identities that
/// stored it, and why the others did not.
pub(crate) fn store(
    runtime: &tokio::runtime::Runtime,
    targets: &[(String, String)],
    record: &Record,
    caller: &Caller,
    timeout: Duration,
) -> (BTreeSet<String>, Vec<(String, String)>) {
    let wire = record_to_wire(record);
    let results = runtime.block_on(async {
        let calls = targets.iter().map(|(control, id)| {
            let (wire, control, id) = (wire.clone(), control.clone(), id.clone());
            let caller = caller.clone();
            async move {
                let call = async {
                    let mut c = client::connect(&control, &caller, client::Deadline::Call(timeout))
                        .await
                        .map_err(|e| e.to_string())?;
                    c.record_membership(MembershipRequest { record: Some(wire) })
                        .await
                        .map_err(|s| s.message().to_string())?;
                    Ok::<_, String>(())
                };
                let r = match tokio::time::timeout(timeout, call).await {
                    Ok(r) => r,
                    Err(_) => Err(format!(
                        "it did not store the membership record within {timeout:?}"
                    )),
                };
                (id, control, r)
            }
        });
        let handles: Vec<_> = calls.map(tokio::spawn).collect();
        let mut out = Vec::new();
        for h in handles {
            if let Ok(r) = h.await {
                out.push(r);
            }
        }
        out
    });
    let mut stored = BTreeSet::new();
    let mut refused = Vec::new();
    for (id, control, r) in results {
        match r {
            Ok(()) => {
                stored.insert(id);
            }
            Err(why) => refused.push((control, why)),
        }
    }
    (stored, refused)
}

/// Makes `next` (following the record in force) the record in force if half the
/// current RW members (rounded up) store it; members of `next` that did not store it are
/// dropped (the keeper records that next). Faults the volume and returns the reason
/// when it cannot count.
pub(crate) fn change(engine: &Engine, make: impl FnOnce(&Record) -> Record) -> Result<Record, String> {
    let mut current = engine.record_lock();
    let next = make(&current);
    let witnesses = membership::witnesses(&next);
    let replicas = engine.replicas();
    let targets: Vec<(String, String)> = replicas
        .iter()
        .enumerate()
        .filter(|(i, r)| !engine.is_failed(*i) && witnesses.contains(&r.id))
        .map(|(_, r)| (r.control.clone(), r.id.clone()))
        .collect();
    let (stored, refused) = store(
        engine.runtime(),
        &targets,
        &next,
        engine.caller(),
        engine.timeout(),
    );
    let authority = engine.authority();
    if !membership::counts_under(&next, &stored, authority.is_some()) {
        let why = format!(
            "a change of membership to ({}) was stored by {} of the {} replicas that must \
             agree ({} needed){}",
            membership::describe(&next),
            current.rw.keys().filter(|id| stored.contains(*id)).count(),
            current.rw.len(),
            membership::half(&current),
            if refused.is_empty() {
                String::new()
            } else {
                format!(
                    "; {}",
                    refused
                        .iter()
                        .map(|(r, why)| format!("{r}: {why}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            }
        );
        engine.fault(why.clone());
        return Err(why);
    }
    // Under a manager, it counts once the manager has it too.
    if let Some(a) = authority {
        if let Err(e) = authority::put_patiently(a, &next, authority::PATIENCE) {
            let why = format!(
                "the membership authority did not store a change of membership to ({}): {e}",
                membership::describe(&next)
            );
            engine.fault(why.clone());
            return Err(why);
        }
    }
    *current = next.clone();
    drop(current);
    for (i, r) in replicas.iter().enumerate() {
        if !engine.is_failed(i) && targets.iter().any(|(_, id)| *id == r.id) && !stored.contains(&r.id) {
            let why = refused
                .iter()
                .find(|(c, _)| *c == r.control)
                .map_or("it did not store the membership record", |(_, w)| w.as_str());
            engine.mark_failed(i, &format!("replica {} failed: {why}", r.data));
        }
    }
    Ok(next)
}

/// Starts the keeper thread of `engine`; it ends when the engine is dropped.
pub(crate) fn spawn(engine: &Arc<Engine>) {
    let weak: Weak<Engine> = Arc::downgrade(engine);
    let spawned = std::thread::Builder::new()
        .name("horn-keeper".into())
        .spawn(move || keep(weak));
    if let Err(e) = spawned {
        engine.fault(format!("could not start the membership keeper: {e}"));
    }
}

fn keep(weak: Weak<Engine>) {
    loop {
        let Some(engine) = weak.upgrade() else {
            return;
        };
        let epoch = engine.failure_epoch();
        if engine.is_faulted() || engine.drops_settled() {
            let e = engine.clone();
            drop(engine);
            e.wait_for_failure(Duration::from_millis(500));
            continue;
        }
        let replicas = engine.replicas();
        // A replica dropped and added again (a rebuild) counts by its live entry.
        let live: BTreeSet<&str> = replicas
            .iter()
            .enumerate()
            .filter(|(i, _)| !engine.is_failed(*i))
            .map(|(_, r)| r.id.as_str())
            .collect();
        let failed: Vec<String> = replicas
            .iter()
            .enumerate()
            .filter(|(i, r)| engine.is_failed(*i) && !live.contains(r.id.as_str()))
            .map(|(_, r)| r.id.clone())
            .collect();
        let current = engine.record();
        let in_record = failed
            .iter()
            .any(|id| current.rw.contains_key(id) || current.wo.contains_key(id));
        if in_record {
            match change(&engine, |r| membership::without(r, &failed)) {
                Ok(r) => tracing::warn!(record = %membership::describe(&r), "recorded a replica's drop"),
                Err(_) => continue,
            }
        }
        engine.set_recorded(epoch);
    }
}
