//! Runtime state: what the node agents report of the instances they run, and the rules
//! that turn specs and those reports into each node's work and each volume's state.
//!
//! Nothing here is stored: the manager keeps the agents' last reports in memory, and
//! after a restart it learns them again from the agents' next `SyncNode` calls. The
//! functions are pure (specs, reports and the set of ready nodes in; work and states
//! out), so the rules are tested without processes.
//!
//! The rules:
//! - a node runs a replica instance for every replica spec placed on it;
//! - the node a volume is attached to runs its engine, once every replica of it on a
//!   ready node reports running (a first start needs them all, and an engine started
//!   on fewer would only rebuild the rest at once); the engine is given the replicas
//!   that run, and keeps running while its volume stays attached there;
//! - a report from a node that is down counts for nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

use horn_proto::manager_api as pb;

use crate::model::{DataLocality, Frontend, ReplicaSpec, VolumeSpec};

/// Instance kinds, as reported.
pub const REPLICA: &str = "replica";
/// See [`REPLICA`].
pub const ENGINE: &str = "engine";
/// An instance that serves.
pub const RUNNING: &str = "running";

/// The agents' last reports, by node.
#[derive(Debug, Default, Clone)]
pub struct Reports {
    by_node: BTreeMap<String, Vec<pb::InstanceStatus>>,
}

impl Reports {
    /// Replaces `node`'s report; true if it differs from the last.
    pub fn put(&mut self, node: &str, instances: Vec<pb::InstanceStatus>) -> bool {
        let old = self.by_node.insert(node.to_string(), instances.clone());
        old.as_ref() != Some(&instances)
    }

    /// `node`'s report of replica `id` of `volume`.
    fn replica(&self, node: &str, volume: &str, id: &str) -> Option<&pb::InstanceStatus> {
        self.by_node
            .get(node)?
            .iter()
            .find(|i| i.kind == REPLICA && i.volume == volume && i.replica == id)
    }

    /// The engines `node` reports.
    pub fn engines_of_node<'a>(&'a self, node: &str) -> impl Iterator<Item = &'a pb::InstanceStatus> + 'a {
        self.by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter(|i| i.kind == ENGINE)
    }

    /// `node`'s report of the engine of `volume`.
    pub fn engine_on(&self, node: &str, volume: &str) -> Option<&pb::InstanceStatus> {
        self.by_node
            .get(node)?
            .iter()
            .find(|i| i.kind == ENGINE && i.volume == volume)
    }

    /// The engines of `volume` reported by the ready nodes, with their node.
    fn engines<'a>(
        &'a self,
        volume: &'a str,
        ready: &'a BTreeSet<String>,
    ) -> impl Iterator<Item = (&'a str, &'a pb::InstanceStatus)> + 'a {
        self.by_node
            .iter()
            .filter(|(n, _)| ready.contains(*n))
            .flat_map(move |(n, is)| {
                is.iter()
                    .filter(move |i| i.kind == ENGINE && i.volume == volume)
                    .map(move |i| (n.as_str(), i))
            })
    }
}

/// A frontend's name, as the API and the agents spell it.
pub fn frontend_name(f: Frontend) -> &'static str {
    match f {
        Frontend::Ublk => "ublk",
        Frontend::Iscsi => "iscsi",
    }
}

/// What `node` should run, given its disks, every volume and replica spec, the ready
/// nodes and the reports. Its `revision` is a digest of the rest: it changes when the work does.
pub fn node_work(
    node: &str,
    cluster_id: &str,
    disks: &[String],
    volumes: &[VolumeSpec],
    replicas: &[ReplicaSpec],
    ready: &BTreeSet<String>,
    reports: &Reports,
) -> pb::NodeWork {
    let by_name: BTreeMap<&str, &VolumeSpec> = volumes.iter().map(|v| (v.name.as_str(), v)).collect();
    let mut work = pb::NodeWork {
        cluster_id: cluster_id.to_string(),
        revision: 0,
        replicas: replicas
            .iter()
            .filter(|r| r.node == node)
            .filter_map(|r| {
                let v = by_name.get(r.volume.as_str())?;
                Some(pb::ReplicaWork {
                    volume: r.volume.clone(),
                    id: r.id.clone(),
                    disk: r.disk.clone(),
                    size: v.size,
                    sector_size: v.sector_size,
                    // Filled in by the manager, which holds the secrets.
                    secret: Vec::new(),
                    data_tls: v.data_tls,
                })
            })
            .collect(),
        engines: Vec::new(),
        disks: disks.to_vec(),
        report: 0,
    };
    for v in volumes.iter().filter(|v| v.attached_to.as_deref() == Some(node)) {
        let mine: Vec<&ReplicaSpec> = replicas.iter().filter(|r| r.volume == v.name).collect();
        let running: Vec<pb::EngineReplica> = mine
            .iter()
            .filter(|r| ready.contains(&r.node))
            .filter_map(|r| {
                let s = reports.replica(&r.node, &v.name, &r.id)?;
                (s.state == RUNNING && !s.data_address.is_empty()).then(|| pb::EngineReplica {
                    id: r.id.clone(),
                    node: r.node.clone(),
                    data_address: s.data_address.clone(),
                    control_address: s.control_address.clone(),
                    local: r.node == node,
                })
            })
            .collect();
        let on_ready = mine.iter().filter(|r| ready.contains(&r.node)).count();
        // An engine this node runs for the volume stays in its work whatever the
        // others report (after a manager restart they report one by one): only a
        // detach stops it.
        let already = reports
            .by_node
            .get(node)
            .is_some_and(|is| is.iter().any(|i| i.kind == ENGINE && i.volume == v.name));
        if !already && (running.is_empty() || running.len() < on_ready) {
            continue;
        }
        work.engines.push(pb::EngineWork {
            volume: v.name.clone(),
            frontend: if v.maintenance {
                "none".into()
            } else {
                frontend_name(v.frontend).into()
            },
            replicas: running,
            volume_id: v.volume_id.clone().unwrap_or_default(),
            down_replicas: mine
                .iter()
                .filter(|r| !ready.contains(&r.node))
                .map(|r| r.id.clone())
                .collect(),
            data_tls: v.data_tls,
            // An encrypted volume's key and a target's CHAP credentials are added by
            // the caller, from the store.
            key: Vec::new(),
            chap_user: String::new(),
            chap_secret: Vec::new(),
        });
    }
    work.revision = digest(&work);
    work
}

/// Why replica `r` of volume `v` counts as failed now, if it does: its node is down,
/// its daemon failed, or the engine serving the volume holds it as ERR. (A replica
/// the engine does not hold at all, running, is being brought in by the agent.)
pub fn replica_failure(
    v: &VolumeSpec,
    r: &ReplicaSpec,
    ready: &BTreeSet<String>,
    reports: &Reports,
) -> Option<String> {
    if !ready.contains(&r.node) {
        return Some(format!("node {} is down", r.node));
    }
    if let Some(s) = reports.replica(&r.node, &v.name, &r.id) {
        if s.state == "failed" {
            return Some(format!("its daemon failed: {}", s.message));
        }
    }
    let engine = serving_engine(v, ready, reports)?;
    (engine.replica_modes.get(&r.id).map(String::as_str) == Some("ERR"))
        .then(|| "the volume's engine dropped it".to_string())
}

/// The engine serving `v` on the node it is attached to, if one runs there.
fn serving_engine<'a>(
    v: &'a VolumeSpec,
    ready: &'a BTreeSet<String>,
    reports: &'a Reports,
) -> Option<&'a pb::InstanceStatus> {
    reports
        .engines(&v.name, ready)
        .find(|(n, e)| Some(*n) == v.attached_to.as_deref() && e.state == RUNNING)
        .map(|(_, e)| e)
}

/// Whether a replica of `v` may be replaced now: the volume is served by an engine
/// that holds a replica RW (the replacement's rebuild source) and is not faulted. A
/// detached volume's replicas are never replaced: which of them hold every
/// acknowledged write is known only to the replicas, and a replica replaced (its
/// files removed) might be the only one that does.
pub fn may_replace(v: &VolumeSpec, ready: &BTreeSet<String>, reports: &Reports) -> bool {
    serving_engine(v, ready, reports)
        .is_some_and(|e| e.faulted.is_empty() && e.replica_modes.values().any(|m| m == "RW"))
}

/// What best-effort data locality asks of a volume now ([`locality_step`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalityStep {
    /// Place one more replica on the attached node (named): it is rebuilt online.
    PlaceLocal(String),
    /// Remove this replica (by id), one too many now that the attached node's is RW.
    RemoveExtra(String),
}

/// The next step of best-effort data locality for `v` with replicas `replicas`: while
/// it is attached, served by a healthy engine with every replica RW (no rebuild or
/// failure under way), a volume with no replica on its node gets one more there, and
/// once that one is RW the newest replica elsewhere goes, back to the count asked for.
/// Replacements of failed replicas go first (they have their own timer).
pub fn locality_step(
    v: &VolumeSpec,
    replicas: &[ReplicaSpec],
    ready: &BTreeSet<String>,
    reports: &Reports,
) -> Option<LocalityStep> {
    if v.data_locality != DataLocality::BestEffort {
        return None;
    }
    let node = v.attached_to.as_deref()?;
    let engine = serving_engine(v, ready, reports)?;
    let all_rw = replicas
        .iter()
        .all(|r| engine.replica_modes.get(&r.id).map(String::as_str) == Some("RW"));
    if !engine.faulted.is_empty() || !all_rw {
        return None;
    }
    let wanted = v.replicas as usize;
    let local = replicas.iter().any(|r| r.node == node);
    if !local && replicas.len() == wanted {
        return Some(LocalityStep::PlaceLocal(node.to_string()));
    }
    if local && replicas.len() > wanted {
        // Ids are r1, r2...: the newest is the longest, then the greatest.
        return replicas
            .iter()
            .filter(|r| r.node != node)
            .max_by_key(|r| (r.id.len(), r.id.clone()))
            .map(|r| LocalityStep::RemoveExtra(r.id.clone()));
    }
    None
}

/// The revision of `work` (whose own revision is 0): a digest of everything else.
pub fn digest(work: &pb::NodeWork) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    prost::Message::encode_to_vec(work).hash(&mut h);
    // 0 means "nothing seen yet" to the agent.
    h.finish().max(1)
}

/// A volume's runtime state, as `hornctl volume info` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeState {
    /// detached, attaching, attached or detaching.
    pub state: &'static str,
    /// healthy, degraded, faulted, or unknown (detached).
    pub robustness: &'static str,
    /// Where it is served, while attached.
    pub endpoint: String,
    /// What an attaching volume waits for, or why it is faulted.
    pub message: String,
    /// Each replica's (state, mode, data address), by id.
    pub replicas: BTreeMap<String, (String, String, String)>,
}

/// The state of volume `v` with replicas `replicas`.
pub fn volume_state(
    v: &VolumeSpec,
    replicas: &[ReplicaSpec],
    ready: &BTreeSet<String>,
    reports: &Reports,
) -> VolumeState {
    let engines: Vec<(&str, &pb::InstanceStatus)> = reports.engines(&v.name, ready).collect();
    let serving = engines
        .iter()
        .find(|(n, e)| Some(*n) == v.attached_to.as_deref() && e.state == RUNNING)
        .map(|(_, e)| *e);
    let mut out = VolumeState {
        state: "detached",
        robustness: "unknown",
        endpoint: String::new(),
        message: String::new(),
        replicas: BTreeMap::new(),
    };
    for r in replicas {
        let (state, address) = match reports.replica(&r.node, &v.name, &r.id) {
            Some(s) if ready.contains(&r.node) => (s.state.clone(), s.data_address.clone()),
            _ if !ready.contains(&r.node) => ("node down".to_string(), String::new()),
            _ => ("unknown".to_string(), String::new()),
        };
        let mode = serving
            .and_then(|e| e.replica_modes.get(&r.id).cloned())
            .unwrap_or_default();
        out.replicas.insert(r.id.clone(), (state, mode, address));
    }
    match (&v.attached_to, serving) {
        (Some(_), Some(e)) => {
            out.state = "attached";
            out.endpoint = e.endpoint.clone();
            let rw = out.replicas.values().filter(|(_, m, _)| m == "RW").count();
            out.robustness = if !e.faulted.is_empty() || rw == 0 {
                out.message = e.faulted.clone();
                "faulted"
            } else if rw >= v.replicas as usize {
                "healthy"
            } else {
                "degraded"
            };
        }
        (Some(node), None) => {
            out.state = "attaching";
            out.message = if !ready.contains(node) {
                format!("node {node} is down")
            } else if let Some((_, e)) = engines.iter().find(|(n, _)| n == node) {
                format!("engine {}: {}", e.state, e.message)
            } else {
                let waiting: Vec<&str> = out
                    .replicas
                    .iter()
                    .filter(|(_, (s, _, _))| s != RUNNING)
                    .map(|(id, _)| id.as_str())
                    .collect();
                if waiting.is_empty() {
                    format!("waiting for node {node} to start the engine")
                } else {
                    format!("waiting for replicas {} to run", waiting.join(", "))
                }
            };
        }
        (None, _) if !engines.is_empty() => out.state = "detaching",
        (None, _) => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DataLocality;

    fn volume(attached: Option<&str>) -> VolumeSpec {
        VolumeSpec {
            name: "v".into(),
            size: 1 << 30,
            replicas: 3,
            sector_size: 512,
            frontend: Frontend::Iscsi,
            data_locality: DataLocality::Disabled,
            node_selector: BTreeSet::new(),
            disk_selector: BTreeSet::new(),
            attached_to: attached.map(str::to_string),
            maintenance: false,
            volume_id: None,
            key_secret: None,
            no_chap: false,
            data_tls: false,
            groups: Default::default(),
            restore: None,
        }
    }

    fn replicas() -> Vec<ReplicaSpec> {
        (1..=3)
            .map(|i| ReplicaSpec {
                id: format!("r{i}"),
                volume: "v".into(),
                node: format!("n{i}"),
                disk: "/d".into(),
            })
            .collect()
    }

    fn running_replica(i: u32) -> pb::InstanceStatus {
        pb::InstanceStatus {
            kind: REPLICA.into(),
            volume: "v".into(),
            replica: format!("r{i}"),
            state: RUNNING.into(),
            data_address: format!("10.0.0.{i}:1000"),
            control_address: format!("10.0.0.{i}:1001"),
            ..Default::default()
        }
    }

    fn engine(modes: &[(&str, &str)]) -> pb::InstanceStatus {
        pb::InstanceStatus {
            kind: ENGINE.into(),
            volume: "v".into(),
            state: RUNNING.into(),
            endpoint: "iscsi://10.0.0.1:3260/iqn.x".into(),
            replica_modes: modes
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn all_ready() -> BTreeSet<String> {
        ["n1", "n2", "n3"].into_iter().map(String::from).collect()
    }

    #[test]
    fn every_node_runs_its_replicas_and_the_engine_waits_for_all_of_them() {
        let v = [volume(Some("n1"))];
        let rs = replicas();
        let ready = all_ready();
        let mut reports = Reports::default();
        let w = node_work("n2", "c", &[], &v, &rs, &ready, &reports);
        assert_eq!(w.replicas.len(), 1);
        assert_eq!(w.replicas[0].id, "r2");
        assert!(w.engines.is_empty());
        reports.put("n1", vec![running_replica(1)]);
        reports.put("n2", vec![running_replica(2)]);
        let before = node_work("n1", "c", &[], &v, &rs, &ready, &reports);
        assert!(before.engines.is_empty(), "r3 is not running yet");
        assert_eq!(
            volume_state(&v[0], &rs, &ready, &reports).message,
            "waiting for replicas r3 to run"
        );
        reports.put("n3", vec![running_replica(3)]);
        let after = node_work("n1", "c", &[], &v, &rs, &ready, &reports);
        assert_ne!(before.revision, after.revision);
        assert_eq!(after.engines.len(), 1);
        let e = &after.engines[0];
        assert_eq!(e.replicas.len(), 3);
        assert!(e.replicas.iter().find(|r| r.id == "r1").unwrap().local);
        assert!(!e.replicas.iter().find(|r| r.id == "r2").unwrap().local);
        assert_eq!(
            after,
            node_work("n1", "c", &[], &v, &rs, &ready, &reports),
            "the same work, the same revision"
        );
    }

    #[test]
    fn a_down_node_counts_for_nothing_and_a_running_engine_keeps_its_work() {
        let v = [volume(Some("n1"))];
        let rs = replicas();
        let mut ready = all_ready();
        ready.remove("n3");
        let mut reports = Reports::default();
        reports.put("n1", vec![running_replica(1)]);
        reports.put("n2", vec![running_replica(2)]);
        reports.put("n3", vec![running_replica(3)]);
        let w = node_work("n1", "c", &[], &v, &rs, &ready, &reports);
        assert_eq!(w.engines[0].replicas.len(), 2, "r3's node is down");
        // r2 fails while the engine runs: the engine stays in the work.
        reports.put(
            "n1",
            vec![running_replica(1), engine(&[("r1", "RW"), ("r2", "ERR")])],
        );
        reports.put("n2", vec![]);
        let w = node_work("n1", "c", &[], &v, &rs, &ready, &reports);
        assert_eq!(w.engines.len(), 1);
        assert_eq!(w.engines[0].replicas.len(), 1);
        let s = volume_state(&v[0], &rs, &ready, &reports);
        assert_eq!((s.state, s.robustness), ("attached", "degraded"));
        assert_eq!(s.replicas["r3"].0, "node down");
        // After a manager restart the engine's node may report before any replica's,
        // and even while its own lease is being renewed: its engine stays.
        let mut fresh = Reports::default();
        fresh.put("n1", vec![engine(&[])]);
        let w = node_work("n1", "c", &[], &v, &rs, &BTreeSet::new(), &fresh);
        assert_eq!(
            w.engines.len(),
            1,
            "a running engine is never dropped from the work"
        );
        assert!(w.engines[0].replicas.is_empty());
    }

    #[test]
    fn volume_states_follow_the_engine() {
        let rs = replicas();
        let ready = all_ready();
        let mut reports = Reports::default();
        assert_eq!(
            volume_state(&volume(None), &rs, &ready, &reports).state,
            "detached"
        );
        let all_rw = engine(&[("r1", "RW"), ("r2", "RW"), ("r3", "RW")]);
        reports.put("n1", vec![all_rw.clone()]);
        let s = volume_state(&volume(Some("n1")), &rs, &ready, &reports);
        assert_eq!((s.state, s.robustness), ("attached", "healthy"));
        assert_eq!(s.endpoint, "iscsi://10.0.0.1:3260/iqn.x");
        assert_eq!(
            volume_state(&volume(None), &rs, &ready, &reports).state,
            "detaching"
        );
        assert_eq!(
            volume_state(&volume(Some("n2")), &rs, &ready, &reports).state,
            "attaching"
        );
        let mut faulted = all_rw;
        faulted.faulted = "deposed".into();
        reports.put("n1", vec![faulted]);
        let s = volume_state(&volume(Some("n1")), &rs, &ready, &reports);
        assert_eq!((s.robustness, s.message.as_str()), ("faulted", "deposed"));
        assert!(
            !reports.put("n1", reports.by_node["n1"].clone()),
            "an unchanged report"
        );
    }

    #[test]
    fn replicas_fail_by_node_daemon_or_engine_and_only_served_volumes_replace_them() {
        let rs = replicas();
        let v = volume(Some("n1"));
        let mut ready = all_ready();
        let mut reports = Reports::default();
        let mut dead = running_replica(3);
        dead.state = "failed".into();
        dead.message = "disk gone".into();
        reports.put(
            "n1",
            vec![running_replica(1), engine(&[("r1", "RW"), ("r2", "ERR")])],
        );
        reports.put("n2", vec![running_replica(2)]);
        reports.put("n3", vec![dead]);
        assert_eq!(replica_failure(&v, &rs[0], &ready, &reports), None);
        assert_eq!(
            replica_failure(&v, &rs[1], &ready, &reports).as_deref(),
            Some("the volume's engine dropped it")
        );
        assert_eq!(
            replica_failure(&v, &rs[2], &ready, &reports).as_deref(),
            Some("its daemon failed: disk gone")
        );
        assert!(may_replace(&v, &ready, &reports));
        assert!(!may_replace(&volume(None), &ready, &reports), "a detached volume");
        ready.remove("n2");
        assert_eq!(
            replica_failure(&volume(None), &rs[1], &ready, &reports).as_deref(),
            Some("node n2 is down")
        );
        reports.put("n1", vec![engine(&[("r1", "ERR"), ("r2", "ERR")])]);
        assert!(!may_replace(&v, &ready, &reports), "no RW source");
    }

    #[test]
    fn best_effort_locality_adds_a_replica_on_the_attached_node_then_drops_one_elsewhere() {
        let mut v = volume(Some("n4"));
        v.data_locality = DataLocality::BestEffort;
        let mut ready = all_ready();
        ready.insert("n4".into());
        let mut rs = replicas();
        let mut reports = Reports::default();
        let rw3 = engine(&[("r1", "RW"), ("r2", "RW"), ("r3", "RW")]);
        reports.put("n4", vec![rw3.clone()]);
        assert_eq!(
            locality_step(&v, &rs, &ready, &reports),
            Some(LocalityStep::PlaceLocal("n4".into()))
        );
        // Not while a replica is failed or rebuilding, nor for other localities, nor
        // detached.
        reports.put("n4", vec![engine(&[("r1", "RW"), ("r2", "ERR"), ("r3", "RW")])]);
        assert_eq!(locality_step(&v, &rs, &ready, &reports), None);
        reports.put("n4", vec![rw3]);
        let mut off = v.clone();
        off.data_locality = DataLocality::Disabled;
        assert_eq!(locality_step(&off, &rs, &ready, &reports), None);
        off = v.clone();
        off.attached_to = None;
        assert_eq!(locality_step(&off, &rs, &ready, &reports), None);
        // The local one placed: nothing until it is RW, then the newest elsewhere goes.
        rs.push(ReplicaSpec {
            id: "r10".into(),
            volume: "v".into(),
            node: "n4".into(),
            disk: "/d".into(),
        });
        reports.put(
            "n4",
            vec![engine(&[("r1", "RW"), ("r2", "RW"), ("r3", "RW"), ("r10", "WO")])],
        );
        assert_eq!(locality_step(&v, &rs, &ready, &reports), None);
        reports.put(
            "n4",
            vec![engine(&[("r1", "RW"), ("r2", "RW"), ("r3", "RW"), ("r10", "RW")])],
        );
        assert_eq!(
            locality_step(&v, &rs, &ready, &reports),
            Some(LocalityStep::RemoveExtra("r3".into()))
        );
        rs.remove(2);
        assert_eq!(locality_step(&v, &rs, &ready, &reports), None, "settled");
    }
}
