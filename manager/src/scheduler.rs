//! Where a volume's replicas go.
//!
//! A pure function of the cluster as the manager sees it (nodes, their disks, what is
//! already scheduled on each), the volume's placement rules and the global
//! [`Settings`]: no I/O, no clock, no store. The reconciler asks it for one replica at
//! a time ([`place`]) and records the answer before it starts anything, so the rules
//! here are the whole of scheduling and are tested alone (unit and property tests
//! below).
//!
//! The rules, in order:
//! 1. **Eligibility** (hard). The node is ready and not cordoned, carries every tag of
//!    the volume's node selector, and, under hard node anti-affinity, holds no replica
//!    of the volume yet. The disk allows scheduling, carries every tag of the disk
//!    selector, and can take the replica's size within both allowances:
//!    - *over-provisioning*: what is scheduled on the disk plus this replica stays
//!      within `(capacity - reserved) × over_provisioning_percent / 100`;
//!    - *minimal free space*: the space measured free on the disk, less this replica,
//!      stays at or above `capacity × minimal_available_percent / 100`.
//!
//!    Strict-local data locality allows only the volume's attached node.
//! 2. **Preference** (soft), among the eligible pairs: the attached node under
//!    best-effort data locality; then a node with no replica of the volume (this is
//!    what soft node anti-affinity means); then a zone with no replica (zone
//!    anti-affinity is soft by default; hard, it is an eligibility rule); then the disk
//!    with the most room left in its over-provisioning allowance, so that replicas
//!    spread; then names, so that the answer is the same for the same inputs.
//!
//! When no pair is eligible, [`Unschedulable`] says, node by node, why.

use std::collections::BTreeSet;
use std::fmt;

use crate::format::human_bytes;

/// Whether a spreading rule must hold or is only preferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AntiAffinity {
    /// The rule must hold: a replica that would break it is not scheduled.
    Hard,
    /// The rule is preferred: broken only when nothing else is eligible.
    Soft,
}

/// The cluster-wide scheduling settings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Settings {
    /// Two replicas of one volume on one node: hard by default.
    pub node_anti_affinity: AntiAffinity,
    /// Two replicas of one volume in one zone: soft by default.
    pub zone_anti_affinity: AntiAffinity,
    /// How much may be scheduled on a disk, as a percentage of its capacity less its
    /// reservation (100: no over-provisioning).
    pub over_provisioning_percent: u32,
    /// The share of a disk's capacity that must stay free after a replica is placed.
    pub minimal_available_percent: u32,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            node_anti_affinity: AntiAffinity::Hard,
            zone_anti_affinity: AntiAffinity::Soft,
            over_provisioning_percent: 100,
            minimal_available_percent: 25,
        }
    }
}

/// A node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// The node's name.
    pub name: String,
    /// Its zone (empty: none given; nodes without a zone share the empty one).
    pub zone: String,
    /// Its tags.
    pub tags: BTreeSet<String>,
    /// Ready (its lease is current) and not cordoned.
    pub schedulable: bool,
    /// Its disks.
    pub disks: Vec<DiskView>,
}

/// A disk as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskView {
    /// The disk's id within its node (its path).
    pub id: String,
    /// Its tags.
    pub tags: BTreeSet<String>,
    /// Not disabled for scheduling by the operator.
    pub schedulable: bool,
    /// The filesystem's size, in bytes.
    pub capacity: u64,
    /// The space measured free on it, in bytes.
    pub available: u64,
    /// Bytes the operator keeps out of Horn's reach.
    pub reserved: u64,
    /// The sizes of the replicas already scheduled on it, summed.
    pub scheduled: u64,
}

impl DiskView {
    /// What may be scheduled on this disk in all under `settings`.
    pub fn allowance(&self, settings: &Settings) -> u64 {
        let usable = self.capacity.saturating_sub(self.reserved) as u128;
        (usable * settings.over_provisioning_percent as u128 / 100).min(u64::MAX as u128) as u64
    }

    /// The free space that must remain on this disk under `settings`.
    pub fn minimal_free(&self, settings: &Settings) -> u64 {
        (self.capacity as u128 * settings.minimal_available_percent as u128 / 100) as u64
    }

    /// Why a replica of `size` bytes does not fit, if it does not.
    fn misfit(&self, size: u64, settings: &Settings) -> Option<String> {
        let allowance = self.allowance(settings);
        if self.scheduled as u128 + size as u128 > allowance as u128 {
            return Some(format!(
                "{} scheduled + {} would pass its allowance of {} (over-provisioning {}%)",
                human_bytes(self.scheduled),
                human_bytes(size),
                human_bytes(allowance),
                settings.over_provisioning_percent
            ));
        }
        let floor = self.minimal_free(settings);
        if self.available < size || self.available - size < floor {
            return Some(format!(
                "{} free - {} would leave less than {} ({}% of its capacity)",
                human_bytes(self.available),
                human_bytes(size),
                human_bytes(floor),
                settings.minimal_available_percent
            ));
        }
        None
    }
}

/// Where a replica is placed: a node and one of its disks.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Placement {
    /// The node's name.
    pub node: String,
    /// The disk's id on that node.
    pub disk: String,
}

/// How close to its consumer a volume's data must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locality<'a> {
    /// No preference.
    Disabled,
    /// Prefer a replica on this node (the one the volume is attached to).
    BestEffort(&'a str),
    /// Only this node.
    StrictLocal(&'a str),
}

/// What a replica to place must satisfy.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The volume's size: what the replica takes on its disk.
    pub size: u64,
    /// Tags a node must carry.
    pub node_selector: &'a BTreeSet<String>,
    /// Tags a disk must carry.
    pub disk_selector: &'a BTreeSet<String>,
    /// The volume's replicas that are placed already (and not being replaced).
    pub existing: &'a [Placement],
    /// Data locality.
    pub locality: Locality<'a>,
}

/// No node can take the replica; `reasons` says why, node by node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unschedulable {
    /// `(node, why)` for every node, in name order.
    pub reasons: Vec<(String, String)>,
}

impl fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.reasons.is_empty() {
            return write!(f, "no replica can be scheduled: the cluster has no nodes");
        }
        write!(f, "no replica can be scheduled: ")?;
        for (i, (node, why)) in self.reasons.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "node {node}: {why}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Unschedulable {}

/// How much an eligible pair is preferred: lower is better, field by field in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Preference<'a> {
    /// Not the attached node (best-effort data locality).
    remote: bool,
    /// The node holds a replica of the volume already.
    node_taken: bool,
    /// The zone holds a replica of the volume already.
    zone_taken: bool,
    /// The room the disk's allowance would have left, inverted: more room is better.
    less_room: u64,
    node: &'a str,
    disk: &'a str,
}

/// "lacks the tag(s) ..." when `tags` does not hold all of `selector`.
fn lacks(selector: &BTreeSet<String>, tags: &BTreeSet<String>) -> Option<String> {
    let missing: Vec<&str> = selector.difference(tags).map(String::as_str).collect();
    (!missing.is_empty()).then(|| format!("lacks the tag(s) {}", missing.join(", ")))
}

/// Why `node` cannot take the replica at all (before its disks are looked at).
fn node_misfit(node: &NodeView, req: &Request<'_>, settings: &Settings) -> Option<String> {
    if !node.schedulable {
        return Some("not ready or cordoned".into());
    }
    if let Locality::StrictLocal(here) = req.locality {
        if node.name != here {
            return Some(format!("strict-local data locality allows only node {here}"));
        }
    }
    if let Some(why) = lacks(req.node_selector, &node.tags) {
        return Some(why);
    }
    if settings.node_anti_affinity == AntiAffinity::Hard && req.existing.iter().any(|p| p.node == node.name) {
        return Some("holds a replica of the volume already (node anti-affinity is hard)".into());
    }
    None
}

/// Why `disk` cannot take the replica, if it cannot.
fn disk_misfit(disk: &DiskView, req: &Request<'_>, settings: &Settings) -> Option<String> {
    if !disk.schedulable {
        return Some("scheduling disabled".into());
    }
    if let Some(why) = lacks(req.disk_selector, &disk.tags) {
        return Some(why);
    }
    disk.misfit(req.size, settings)
}

/// Chooses where the next replica of a volume goes, by the rules at the top of this
/// module. `nodes` may come in any order; the answer does not depend on it.
pub fn place(nodes: &[NodeView], req: &Request<'_>, settings: &Settings) -> Result<Placement, Unschedulable> {
    let zone_of = |name: &str| nodes.iter().find(|n| n.name == name).map(|n| n.zone.as_str());
    let used_zones: BTreeSet<&str> = req.existing.iter().filter_map(|p| zone_of(&p.node)).collect();
    let mut reasons = Vec::new();
    // The best pair so far and its sort key: lower is better.
    let mut best: Option<(Preference<'_>, Placement)> = None;
    let mut sorted: Vec<&NodeView> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    for node in sorted {
        if let Some(why) = node_misfit(node, req, settings) {
            reasons.push((node.name.clone(), why));
            continue;
        }
        let zone_taken = used_zones.contains(node.zone.as_str());
        if settings.zone_anti_affinity == AntiAffinity::Hard && zone_taken {
            reasons.push((
                node.name.clone(),
                format!(
                    "zone {:?} holds a replica of the volume already (zone anti-affinity is hard)",
                    node.zone
                ),
            ));
            continue;
        }
        let node_taken = req.existing.iter().any(|p| p.node == node.name);
        let local = match req.locality {
            Locality::BestEffort(here) | Locality::StrictLocal(here) => node.name == here,
            Locality::Disabled => true,
        };
        let mut disk_reasons = Vec::new();
        for disk in &node.disks {
            if let Some(why) = disk_misfit(disk, req, settings) {
                disk_reasons.push(format!("disk {}: {why}", disk.id));
                continue;
            }
            let room = disk.allowance(settings) - disk.scheduled - req.size;
            let key = Preference {
                remote: !local,
                node_taken,
                zone_taken,
                less_room: u64::MAX - room,
                node: node.name.as_str(),
                disk: disk.id.as_str(),
            };
            if best.as_ref().is_none_or(|(k, _)| key < *k) {
                best = Some((
                    key,
                    Placement {
                        node: node.name.clone(),
                        disk: disk.id.clone(),
                    },
                ));
            }
        }
        if node.disks.is_empty() {
            reasons.push((node.name.clone(), "has no disks".into()));
        } else if disk_reasons.len() == node.disks.len() {
            reasons.push((node.name.clone(), disk_reasons.join("; ")));
        }
    }
    best.map(|(_, p)| p).ok_or(Unschedulable { reasons })
}

/// Places `count` replicas of a new volume one after the other, each seeing the ones
/// before it (on their nodes, and in their disks' scheduled bytes). All or none.
pub fn place_all(
    nodes: &[NodeView],
    req: &Request<'_>,
    count: usize,
    settings: &Settings,
) -> Result<Vec<Placement>, Unschedulable> {
    let mut nodes = nodes.to_vec();
    let mut existing = req.existing.to_vec();
    let mut placed = Vec::with_capacity(count);
    for _ in 0..count {
        let p = place(
            &nodes,
            &Request {
                existing: &existing,
                ..req.clone()
            },
            settings,
        )?;
        commit(&mut nodes, &p, req.size);
        existing.push(p.clone());
        placed.push(p);
    }
    Ok(placed)
}

/// Counts a replica of `size` bytes placed at `p` in `nodes`' disks.
pub fn commit(nodes: &mut [NodeView], p: &Placement, size: u64) {
    if let Some(d) = nodes
        .iter_mut()
        .filter(|n| n.name == p.node)
        .flat_map(|n| n.disks.iter_mut())
        .find(|d| d.id == p.disk)
    {
        d.scheduled = d.scheduled.saturating_add(size);
        d.available = d.available.saturating_sub(size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    fn tags(t: &[&str]) -> BTreeSet<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    fn disk(id: &str, capacity: u64) -> DiskView {
        DiskView {
            id: id.into(),
            tags: BTreeSet::new(),
            schedulable: true,
            capacity,
            available: capacity,
            reserved: 0,
            scheduled: 0,
        }
    }

    fn node(name: &str, zone: &str, disks: Vec<DiskView>) -> NodeView {
        NodeView {
            name: name.into(),
            zone: zone.into(),
            tags: BTreeSet::new(),
            schedulable: true,
            disks,
        }
    }

    fn request<'a>(size: u64, existing: &'a [Placement], none: &'a BTreeSet<String>) -> Request<'a> {
        Request {
            size,
            node_selector: none,
            disk_selector: none,
            existing,
            locality: Locality::Disabled,
        }
    }

    #[test]
    fn three_replicas_go_to_three_nodes_and_a_fourth_is_refused_with_reasons() {
        let nodes: Vec<_> = ["n1", "n2", "n3"]
            .iter()
            .map(|n| node(n, "", vec![disk("/d", 100 * GIB)]))
            .collect();
        let none = BTreeSet::new();
        let placed = place_all(&nodes, &request(10 * GIB, &[], &none), 3, &Settings::default()).unwrap();
        let on: BTreeSet<_> = placed.iter().map(|p| p.node.as_str()).collect();
        assert_eq!(on, BTreeSet::from(["n1", "n2", "n3"]));
        let err = place_all(&nodes, &request(10 * GIB, &[], &none), 4, &Settings::default()).unwrap_err();
        assert_eq!(err.reasons.len(), 3);
        assert!(
            err.to_string()
                .contains("node n1: holds a replica of the volume already"),
            "{err}"
        );
    }

    #[test]
    fn soft_node_anti_affinity_doubles_up_only_when_it_must() {
        let nodes = vec![
            node("n1", "", vec![disk("/a", 100 * GIB), disk("/b", 100 * GIB)]),
            node("n2", "", vec![disk("/a", 100 * GIB)]),
        ];
        let none = BTreeSet::new();
        let settings = Settings {
            node_anti_affinity: AntiAffinity::Soft,
            ..Settings::default()
        };
        let placed = place_all(&nodes, &request(GIB, &[], &none), 3, &settings).unwrap();
        assert_ne!(placed[0].node, placed[1].node, "{placed:?}");
        assert_eq!(placed.iter().filter(|p| p.node == "n1").count(), 2, "{placed:?}");
        assert_ne!(placed[2], placed[0]);
        assert_ne!(placed[2], placed[1]);
    }

    #[test]
    fn zones_are_spread_first_when_they_can_be() {
        let nodes = vec![
            node("a1", "a", vec![disk("/d", 100 * GIB)]),
            node("a2", "a", vec![disk("/d", 100 * GIB)]),
            node("b1", "b", vec![disk("/d", 10 * GIB)]),
        ];
        let none = BTreeSet::new();
        let placed = place_all(&nodes, &request(GIB, &[], &none), 2, &Settings::default()).unwrap();
        let zones: BTreeSet<_> = placed.iter().map(|p| &p.node[..1]).collect();
        assert_eq!(zones.len(), 2, "{placed:?}");
    }

    #[test]
    fn a_disk_is_never_scheduled_past_its_allowance_or_its_free_space_floor() {
        let mut d = disk("/d", 100 * GIB);
        d.reserved = 20 * GIB;
        d.scheduled = 70 * GIB;
        let nodes = vec![node("n1", "", vec![d.clone()])];
        let none = BTreeSet::new();
        let s = Settings::default();
        // 80 GiB usable at 100%: 70 + 10 fits, 70 + 11 does not.
        assert!(place(&nodes, &request(10 * GIB, &[], &none), &s).is_ok());
        let err = place(&nodes, &request(11 * GIB, &[], &none), &s).unwrap_err();
        assert!(err.to_string().contains("allowance"), "{err}");
        // Over-provisioned to 200%, the free-space floor (25 GiB of 100) decides.
        let s = Settings {
            over_provisioning_percent: 200,
            ..Settings::default()
        };
        let mut full = d;
        full.available = 30 * GIB;
        let nodes = vec![node("n1", "", vec![full])];
        assert!(place(&nodes, &request(5 * GIB, &[], &none), &s).is_ok());
        let err = place(&nodes, &request(6 * GIB, &[], &none), &s).unwrap_err();
        assert!(err.to_string().contains("would leave less than"), "{err}");
    }

    #[test]
    fn selectors_cordons_and_locality_narrow_the_choice() {
        let mut fast = disk("/nvme", 100 * GIB);
        fast.tags = tags(&["ssd"]);
        let mut n1 = node("n1", "", vec![disk("/hdd", 100 * GIB)]);
        n1.tags = tags(&["storage"]);
        let mut n2 = node("n2", "", vec![fast]);
        n2.tags = tags(&["storage"]);
        let mut n3 = node("n3", "", vec![disk("/d", 100 * GIB)]);
        n3.schedulable = false;
        let nodes = vec![n1, n2, n3];
        let none = BTreeSet::new();
        let storage = tags(&["storage"]);
        let ssd = tags(&["ssd"]);
        let req = Request {
            node_selector: &storage,
            disk_selector: &ssd,
            ..request(GIB, &[], &none)
        };
        assert_eq!(place(&nodes, &req, &Settings::default()).unwrap().node, "n2");
        let err = place_all(&nodes, &req, 2, &Settings::default()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("node n1: disk /hdd: lacks the tag(s) ssd"),
            "{text}"
        );
        assert!(text.contains("node n3: not ready or cordoned"), "{text}");
        // Best-effort locality prefers the attached node; strict allows only it.
        let req = Request {
            locality: Locality::BestEffort("n2"),
            ..request(GIB, &[], &none)
        };
        assert_eq!(place(&nodes, &req, &Settings::default()).unwrap().node, "n2");
        let req = Request {
            locality: Locality::StrictLocal("n3"),
            ..request(GIB, &[], &none)
        };
        assert!(place(&nodes, &req, &Settings::default()).is_err());
    }

    /// A random cluster: up to 6 nodes in up to 3 zones, up to 3 disks each, some
    /// cordoned, some disks disabled, partly filled.
    fn cluster() -> impl Strategy<Value = Vec<NodeView>> {
        let disk = (
            1u64..=100,
            0u64..=100,
            0u64..=30,
            0u64..=100,
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(cap, free_pct, reserved_pct, sched_pct, schedulable, ssd)| {
                let capacity = cap * GIB;
                DiskView {
                    id: String::new(),
                    tags: if ssd { tags(&["ssd"]) } else { BTreeSet::new() },
                    schedulable: schedulable || cap % 3 != 0,
                    capacity,
                    available: capacity * free_pct / 100,
                    reserved: capacity * reserved_pct / 100,
                    scheduled: capacity * sched_pct / 100,
                }
            });
        let node = (
            0usize..3,
            proptest::collection::vec(disk, 0..=3),
            any::<bool>(),
            any::<bool>(),
        );
        proptest::collection::vec(node, 0..=6).prop_map(|nodes| {
            nodes
                .into_iter()
                .enumerate()
                .map(|(i, (zone, disks, ready, storage))| NodeView {
                    name: format!("n{i}"),
                    zone: format!("z{zone}"),
                    tags: if storage {
                        tags(&["storage"])
                    } else {
                        BTreeSet::new()
                    },
                    schedulable: ready || i % 2 == 0,
                    disks: disks
                        .into_iter()
                        .enumerate()
                        .map(|(j, d)| DiskView {
                            id: format!("/d{j}"),
                            ..d
                        })
                        .collect(),
                })
                .collect()
        })
    }

    fn settings() -> impl Strategy<Value = Settings> {
        (any::<bool>(), any::<bool>(), 50u32..=300, 0u32..=50).prop_map(|(hard_node, hard_zone, op, min)| {
            Settings {
                node_anti_affinity: if hard_node {
                    AntiAffinity::Hard
                } else {
                    AntiAffinity::Soft
                },
                zone_anti_affinity: if hard_zone {
                    AntiAffinity::Hard
                } else {
                    AntiAffinity::Soft
                },
                over_provisioning_percent: op,
                minimal_available_percent: min,
            }
        })
    }

    /// Is `p` an eligible pair for `req` by the rules, checked from scratch?
    fn eligible(nodes: &[NodeView], req: &Request<'_>, s: &Settings, p: &Placement) -> bool {
        let n = nodes.iter().find(|n| n.name == p.node).unwrap();
        let d = n.disks.iter().find(|d| d.id == p.disk).unwrap();
        let zone_of = |name: &str| nodes.iter().find(|n| n.name == name).unwrap().zone.clone();
        n.schedulable
            && d.schedulable
            && req.node_selector.is_subset(&n.tags)
            && req.disk_selector.is_subset(&d.tags)
            && !(s.node_anti_affinity == AntiAffinity::Hard && req.existing.iter().any(|e| e.node == n.name))
            && !(s.zone_anti_affinity == AntiAffinity::Hard
                && req.existing.iter().any(|e| zone_of(&e.node) == n.zone))
            && d.scheduled + req.size <= d.allowance(s)
            && d.available >= req.size + d.minimal_free(s)
    }

    proptest! {
        #[test]
        fn placements_keep_every_rule_and_a_refusal_means_nothing_was_eligible(
            nodes in cluster(),
            s in settings(),
            size_gib in 1u64..=40,
            count in 1usize..=4,
            select_storage in any::<bool>(),
            select_ssd in any::<bool>(),
        ) {
            let size = size_gib * GIB;
            let node_sel = if select_storage { tags(&["storage"]) } else { BTreeSet::new() };
            let disk_sel = if select_ssd { tags(&["ssd"]) } else { BTreeSet::new() };
            let mut state = nodes.clone();
            let mut existing: Vec<Placement> = Vec::new();
            for _ in 0..count {
                let req = Request {
                    size,
                    node_selector: &node_sel,
                    disk_selector: &disk_sel,
                    existing: &existing,
                    locality: Locality::Disabled,
                };
                let all: Vec<Placement> = state
                    .iter()
                    .flat_map(|n| n.disks.iter().map(|d| Placement { node: n.name.clone(), disk: d.id.clone() }))
                    .filter(|p| eligible(&state, &req, &s, p))
                    .collect();
                match place(&state, &req, &s) {
                    Ok(p) => {
                        prop_assert!(eligible(&state, &req, &s, &p), "{p:?} breaks a rule");
                        // Soft node anti-affinity: a fresh node whenever one is eligible.
                        let fresh = |q: &Placement| !existing.iter().any(|e| e.node == q.node);
                        if all.iter().any(fresh) {
                            prop_assert!(fresh(&p), "{p:?} doubles up while a fresh node was eligible");
                        }
                        // The answer does not depend on the order of the nodes.
                        let mut reversed = state.clone();
                        reversed.reverse();
                        prop_assert_eq!(place(&reversed, &req, &s).unwrap(), p.clone());
                        commit(&mut state, &p, size);
                        existing.push(p);
                    }
                    Err(e) => {
                        prop_assert!(all.is_empty(), "refused ({e}) while {all:?} were eligible");
                        prop_assert_eq!(e.reasons.len(), state.len(), "a reason per node: {}", e);
                        break;
                    }
                }
            }
            // Hard node anti-affinity: never two replicas on one node.
            if s.node_anti_affinity == AntiAffinity::Hard {
                let on: BTreeSet<_> = existing.iter().map(|p| &p.node).collect();
                prop_assert_eq!(on.len(), existing.len());
            }
            // No disk past its allowance, counting what was placed here.
            for (before, after) in nodes.iter().zip(&state) {
                for (d0, d) in before.disks.iter().zip(&after.disks) {
                    if d.scheduled != d0.scheduled {
                        prop_assert!(d.scheduled <= d.allowance(&s));
                    }
                }
            }
        }
    }
}
