//! The membership rules of a volume's engine, without I/O: which replicas a start may
//! serve from, and when a change of membership counts.
//!
//! The authority standalone is the replicas themselves (`horn_replica::membership`
//! holds the record and the replica's side). The rules, with their proof sketch in
//! `docs/engine.md`:
//!
//! 1. **Start**: the engine first *claims* every replica it reaches, with a generation
//!    above every one it saw (a claim fences older engines out of that replica for
//!    good), and only then reads the records the claims returned. It takes the newest
//!    record among them as the base; it may serve only if it claimed a strict majority
//!    of the base's RW members *and* of the RW members of the record the base follows
//!    (the base may be a change that never counted), and then the base's RW members it
//!    claimed serve RW. Every other replica (blank, of another volume, WO or dropped in
//!    the base) is left out, to be rebuilt. A volume's first start (no record anywhere)
//!    needs every listed replica, blank.
//! 2. **Changes** (the start's own record, a replica dropped, a rebuilt one added or
//!    promoted): a new record counts once at least half (rounded up) of the previous
//!    record's RW members have stored it; until then nothing is acknowledged on its
//!    strength. Members that fail to store it are dropped in the next record. A change
//!    that cannot reach that many leaves the volume faulted: it fails I/O rather than
//!    acknowledge a write a later start might not find.
//!
//! Why these numbers: any strict majority of a record's RW members (a start) and any
//! half of them rounded up (a change) share a replica. So a start either sees the
//! change (that replica holds it) or fenced the replica before the change reached it
//! (the change then cannot count, and its engine faults): no engine acknowledges a
//! write that a later start would not find, and two engines never both acknowledge. A
//! change stored by too few to count is still seen by later starts (as in Paxos, a
//! start adopts the newest record it finds); asking a majority of the members before
//! it too keeps an engine cut off with one replica from leaving a record that a later
//! start with that replica alone would trust.
//!
//! What it costs: failures one after another leave the volume going down to its last
//! replica (3 → 2 → 1), but two of three replicas lost at once, or a partition that
//! leaves the engine with one of three, fault it: the other side may be a new engine.

use std::collections::{BTreeMap, BTreeSet};

pub use horn_replica::membership::{new_id, Record};

use crate::authority::Grant;

/// A claimed replica, as the start sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The replica's own identity.
    pub id: String,
    /// Its data address (for messages and records).
    pub name: String,
    /// The volume it belongs to (`None`: blank).
    pub volume: Option<String>,
    /// The newest record it holds.
    pub record: Option<Record>,
    /// Its own mode is WO: a rebuild of it has not finished, so it may lack data.
    pub rebuilding: bool,
}

/// What a start may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The volume's identity (a new one at a volume's first start).
    pub volume: String,
    /// The newest record found; `None` at a volume's first start.
    pub base: Option<Record>,
    /// Candidates (by index) that serve RW.
    pub rw: Vec<usize>,
    /// Candidates left out, and why.
    pub left_out: Vec<(usize, String)>,
    /// The authority the engine's records are stamped with (empty: the replicas alone).
    pub authority: String,
    /// The key check value the engine's records carry (empty: not encrypted); the
    /// start sets it once it has checked it against the base's.
    pub cipher: String,
}

impl Plan {
    /// The first record of the engine at `generation`, identity `engine`.
    pub fn first_record(&self, candidates: &[Candidate], generation: u64, engine: &str) -> Record {
        Record {
            volume: self.volume.clone(),
            generation,
            version: 0,
            engine: engine.to_string(),
            rw: self
                .rw
                .iter()
                .map(|&i| (candidates[i].id.clone(), candidates[i].name.clone()))
                .collect(),
            wo: BTreeMap::new(),
            // The base may never have counted: this record must reach what it had to
            // reach, and its RW members.
            after: self
                .base
                .as_ref()
                .map(|b| {
                    std::iter::once(b.rw.clone())
                        .chain(b.after.iter().cloned())
                        .collect()
                })
                .unwrap_or_default(),
            authority: self.authority.clone(),
            cipher: self.cipher.clone(),
        }
    }
}

/// Decides a start from the replicas claimed, with the replicas alone as the authority
/// on membership. `listed` is how many replicas the engine was given; `new_volume`
/// names the volume should this be its first start.
pub fn plan_start(listed: usize, claimed: &[Candidate], new_volume: &str) -> Result<Plan, String> {
    plan_start_under(listed, claimed, new_volume, None)
}

/// [`plan_start`], under the authority that gave `grant` when it is given (see
/// [`crate::authority`]): the base is the newest record among the replicas' and the
/// authority's, and a start on the node of the volume's last engine may serve from
/// any RW member of it.
pub fn plan_start_under(
    listed: usize,
    claimed: &[Candidate],
    new_volume: &str,
    grant: Option<&Grant>,
) -> Result<Plan, String> {
    let among_replicas = claimed
        .iter()
        .filter_map(|c| c.record.as_ref())
        .max_by_key(|r| r.epoch());
    let name = grant.map_or("", |g| g.name.as_str());
    if let Some(r) = among_replicas.filter(|r| !r.authority.is_empty() && r.authority != name) {
        return Err(if name.is_empty() {
            format!(
                "the volume's membership is kept by {} as well as by its replicas ({}): start its \
                 engine through that manager, not by hand",
                r.authority,
                describe(r)
            )
        } else {
            format!(
                "the volume's membership is kept by {}, not by {name} ({})",
                r.authority,
                describe(r)
            )
        });
    }
    if let Some(g) = grant {
        if g.record.is_none() && among_replicas.is_some_and(|r| !r.authority.is_empty()) {
            return Err(format!(
                "{name} holds no membership record of this volume, yet its replicas' newest record \
                 was stored there ({}): was the manager's store replaced? Restore it",
                describe(among_replicas.expect("checked"))
            ));
        }
    }
    let base = among_replicas
        .into_iter()
        .chain(grant.and_then(|g| g.record.as_ref()))
        .max_by_key(|r| r.epoch())
        .cloned();
    let Some(base) = base else {
        let mut plan = plan_creation(listed, claimed, new_volume)?;
        plan.authority = name.to_string();
        return Ok(plan);
    };
    // The last engine has stopped, and the authority's record is at least as new as
    // every record that counted: each of its RW members holds every acknowledged write.
    let salvage = grant.is_some_and(|g| g.same_node && g.record.is_some());
    let mut rw = Vec::new();
    let mut left_out = Vec::new();
    for (i, c) in claimed.iter().enumerate() {
        let why = match &c.volume {
            Some(v) if *v != base.volume => Some(format!("it belongs to another volume ({v})")),
            None => Some("it is blank: it holds none of this volume's data".to_string()),
            _ if c.rebuilding => Some(REBUILDING.to_string()),
            _ if base.rw.contains_key(&c.id) => None,
            _ if base.wo.contains_key(&c.id) => Some(format!(
                "it was still being rebuilt in the newest membership record ({})",
                describe(&base)
            )),
            _ => Some(format!(
                "it is not RW in the newest membership record ({}): it missed acknowledged writes",
                describe(&base)
            )),
        };
        match why {
            None => rw.push(i),
            Some(why) => left_out.push((i, why)),
        }
    }
    // A strict majority of the record's RW members, and of each set it had to reach
    // to count: it may have been stored by too few to count, and a start must still
    // meet every replica a counted change could have reached.
    let claimed_ids: BTreeSet<&str> = claimed.iter().map(|c| c.id.as_str()).collect();
    let short_after = base
        .after
        .iter()
        .any(|set| set.keys().filter(|id| claimed_ids.contains(id.as_str())).count() < set.len() / 2 + 1);
    if salvage && rw.is_empty() {
        let missing: Vec<&str> = base.rw.values().map(String::as_str).collect();
        return Err(format!(
            "none of the replicas that hold every acknowledged write ({}) answered; a start \
             needs one of them, and never serves from a replica that missed writes. Missing: {}",
            describe(&base),
            missing.join(", ")
        ));
    }
    if !salvage && (rw.len() < base.majority() || short_after) {
        let have: BTreeSet<&str> = rw.iter().map(|&i| claimed[i].id.as_str()).collect();
        let missing: BTreeSet<&str> = base
            .rw
            .iter()
            .filter(|(id, _)| !have.contains(id.as_str()))
            .chain(
                base.after
                    .iter()
                    .flatten()
                    .filter(|(id, _)| !claimed_ids.contains(id.as_str())),
            )
            .map(|(_, name)| name.as_str())
            .collect();
        return Err(format!(
            "only {} of the {} replicas that hold every acknowledged write ({}) answered; a \
             start needs {} of them{}. Missing: {}. Bring them back, or, knowing what is lost, \
             salvage the volume from one replica (`hornctl replica salvage`)",
            rw.len(),
            base.rw.len(),
            describe(&base),
            base.majority(),
            if short_after {
                ", and a majority of the replicas the record had to reach"
            } else {
                ""
            },
            missing.into_iter().collect::<Vec<_>>().join(", ")
        ) + if grant.is_some_and(|g| !g.same_node) {
            " (the volume's last engine ran on another node, where it may still run cut off: \
             one replica is enough only on that node)"
        } else {
            ""
        });
    }
    Ok(Plan {
        volume: base.volume.clone(),
        base: Some(base),
        rw,
        left_out,
        authority: name.to_string(),
        cipher: String::new(),
    })
}

fn plan_creation(listed: usize, claimed: &[Candidate], new_volume: &str) -> Result<Plan, String> {
    let volumes: BTreeSet<&str> = claimed.iter().filter_map(|c| c.volume.as_deref()).collect();
    if volumes.len() > 1 {
        return Err(format!(
            "the replicas hold no membership record and belong to different volumes ({})",
            volumes.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    if claimed.len() < listed {
        return Err(format!(
            "no replica holds a membership record, so this is the volume's first start, and that \
             needs every replica listed; {} of {} answered",
            claimed.len(),
            listed
        ));
    }
    let (rw, rebuilding): (Vec<usize>, Vec<usize>) =
        (0..claimed.len()).partition(|&i| !claimed[i].rebuilding);
    if rw.is_empty() {
        return Err(format!("every replica is still being rebuilt ({REBUILDING})"));
    }
    Ok(Plan {
        volume: volumes
            .into_iter()
            .next()
            .map_or_else(|| new_volume.to_string(), str::to_string),
        base: None,
        rw,
        left_out: rebuilding
            .into_iter()
            .map(|i| (i, REBUILDING.to_string()))
            .collect(),
        authority: String::new(),
        cipher: String::new(),
    })
}

const REBUILDING: &str = "its own mode is WO: a rebuild of it did not finish, so it may lack data";

/// The record after `failed` (identities) are dropped from `current`.
pub fn without(current: &Record, failed: &[String]) -> Record {
    let mut next = successor(current);
    for id in failed {
        next.rw.remove(id);
        next.wo.remove(id);
    }
    next
}

/// The record after `id` (named `name`) joins `current` as WO for a rebuild.
pub fn with_rebuilding(current: &Record, id: &str, name: &str) -> Record {
    let mut next = successor(current);
    next.rw.remove(id);
    next.wo.insert(id.to_string(), name.to_string());
    next
}

/// The record after the rebuilt `id` turns RW in `current`.
pub fn with_promoted(current: &Record, id: &str) -> Record {
    let mut next = successor(current);
    if let Some(name) = next.wo.remove(id) {
        next.rw.insert(id.to_string(), name);
    }
    next
}

fn successor(current: &Record) -> Record {
    Record {
        version: current
            .version
            .checked_add(1)
            .expect("a record's version counts changes within one engine's life: it cannot reach 2^64"),
        after: vec![current.rw.clone()],
        ..current.clone()
    }
}

/// Does a record count, given the replicas (identities) that stored it? Half (rounded
/// up) of each set in its `after` must have stored it; a volume's first record (no
/// `after`), every RW member.
pub fn counts(next: &Record, stored: &BTreeSet<String>) -> bool {
    if next.after.is_empty() {
        return next.rw.keys().all(|id| stored.contains(id));
    }
    next.after
        .iter()
        .all(|set| set.keys().filter(|id| stored.contains(*id)).count() >= set.len().div_ceil(2))
}

/// Checks the key an engine was given (`mine`: its check value, empty without a key)
/// against the volume's newest record `base` (none at a volume's first start).
pub fn check_cipher(base: Option<&Record>, mine: &str) -> Result<(), String> {
    let Some(base) = base else {
        return Ok(());
    };
    match (base.cipher.as_str(), mine) {
        (theirs, ours) if theirs == ours => Ok(()),
        (theirs, "") => Err(format!(
            "volume {} is encrypted ({}): start its engine with its key (--key-file)",
            base.volume,
            theirs.split(':').next().unwrap_or(theirs)
        )),
        ("", _) => Err(format!(
            "volume {} is not encrypted, and a key was given: a volume is encrypted from its \
             first start only (make a new encrypted volume and copy the data over)",
            base.volume
        )),
        (theirs, ours) => Err(format!(
            "the key given is not volume {}'s: the volume's check value is {theirs}, the key's {ours}",
            base.volume
        )),
    }
}

/// [`counts`], under an authority when `managed`: once the authority has it too
/// (the caller puts it there next), one RW member storing a change is enough. A
/// volume's first record still needs every RW member.
pub fn counts_under(next: &Record, stored: &BTreeSet<String>, managed: bool) -> bool {
    if !managed || next.after.is_empty() {
        return counts(next, stored);
    }
    next.rw.keys().any(|id| stored.contains(id))
}

/// Every replica a record must reach a share of (its members and its `after` sets).
pub fn witnesses(next: &Record) -> BTreeSet<String> {
    next.rw
        .keys()
        .chain(next.wo.keys())
        .chain(next.after.iter().flat_map(|s| s.keys()))
        .cloned()
        .collect()
}

/// At least half of a record's RW members, rounded up: the replicas a change needs.
pub fn half(r: &Record) -> usize {
    r.rw.len().div_ceil(2)
}

/// Does a read lease granted by `granted` (identities) hold off every newer engine
/// while it runs? A start needs a strict majority of the record in force's RW members
/// (or of a newer record's, which only this engine writes while it holds its claims),
/// and any such majority shares a member with half of them rounded up.
pub fn leased(r: &Record, granted: &BTreeSet<String>) -> bool {
    let held = r.rw.keys().filter(|id| granted.contains(*id)).count();
    held > 0 && held >= half(r)
}

/// A record in words: its generation, version and RW members' names.
pub fn describe(r: &Record) -> String {
    format!(
        "generation {} version {}, RW: {}",
        r.generation,
        r.version,
        r.rw.values().cloned().collect::<Vec<_>>().join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(g: u64, v: u64, rw: &[&str]) -> Record {
        Record {
            volume: "vol".into(),
            generation: g,
            version: v,
            engine: format!("e{g}"),
            rw: rw.iter().map(|s| (s.to_string(), format!("addr-{s}"))).collect(),
            wo: BTreeMap::new(),
            after: Vec::new(),
            authority: String::new(),
            cipher: String::new(),
        }
    }

    fn cand(id: &str, record: Option<Record>) -> Candidate {
        Candidate {
            id: id.into(),
            name: format!("addr-{id}"),
            volume: record.as_ref().map(|r| r.volume.clone()),
            record,
            rebuilding: false,
        }
    }

    #[test]
    fn a_lease_needs_half_of_the_rw_members_rounded_up() {
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<String>>();
        let three = rec(4, 0, &["a", "b", "c"]);
        assert!(!leased(&three, &ids(&["a"])));
        assert!(leased(&three, &ids(&["a", "c"])));
        let two = rec(4, 1, &["a", "b"]);
        assert!(leased(&two, &ids(&["b"])));
        // Only RW members count, and nobody's grant is no lease.
        let mut with_wo = three.clone();
        with_wo.wo.insert("d".into(), "d".into());
        assert!(!leased(&with_wo, &ids(&["a", "d"])));
        assert!(!leased(&rec(4, 0, &[]), &ids(&[])));
    }

    #[test]
    fn a_start_takes_the_newest_record_and_only_its_rw_members() {
        let old = rec(3, 0, &["a", "b", "c"]);
        let new = rec(3, 1, &["a", "b"]);
        let c = vec![
            cand("a", Some(new.clone())),
            cand("b", Some(new)),
            cand("c", Some(old)),
        ];
        let plan = plan_start(3, &c, "x").unwrap();
        assert_eq!(plan.rw, vec![0, 1]);
        assert_eq!(plan.left_out.len(), 1);
        assert!(
            plan.left_out[0].1.contains("missed acknowledged writes"),
            "{:?}",
            plan.left_out
        );
    }

    #[test]
    fn a_start_without_a_majority_of_the_newest_rw_members_is_refused_and_names_them() {
        let new = rec(3, 1, &["a", "b"]);
        let c = vec![cand("a", Some(new)), cand("c", Some(rec(3, 0, &["a", "b", "c"])))];
        let err = plan_start(3, &c, "x").unwrap_err();
        assert!(err.contains("Missing: addr-b"), "{err}");
        // The stale replica alone: its own record wants a majority of three.
        let c = vec![cand("c", Some(rec(3, 0, &["a", "b", "c"])))];
        assert!(plan_start(3, &c, "x").is_err());
    }

    fn grant(record: Option<Record>, same_node: bool) -> Grant {
        Grant {
            generation: 9,
            record: record.map(|r| Record {
                authority: "manager:c1".into(),
                ..r
            }),
            same_node,
            name: "manager:c1".into(),
            key: None,
        }
    }

    fn managed(mut r: Record) -> Record {
        r.authority = "manager:c1".into();
        r
    }

    #[test]
    fn under_a_manager_the_node_of_the_last_engine_salvages_from_one_current_replica() {
        // The manager's record is newer than anything the replicas hold: two of three
        // were dropped at once, and only the manager and `a` stored that.
        let before = managed(rec(4, 0, &["a", "b", "c"]));
        let after = rec(4, 1, &["a"]);
        let c = vec![cand("a", Some(managed(after.clone())))];
        let plan = plan_start_under(3, &c, "x", Some(&grant(Some(after.clone()), true))).unwrap();
        assert_eq!(plan.rw, vec![0]);
        assert_eq!(plan.authority, "manager:c1");
        assert_eq!(plan.first_record(&c, 9, "e9").authority, "manager:c1");
        // The stale ones come back without `a`: never served, and the reason says who
        // holds the writes.
        let c = vec![cand("b", Some(before.clone())), cand("c", Some(before.clone()))];
        let err = plan_start_under(3, &c, "x", Some(&grant(Some(after.clone()), true))).unwrap_err();
        assert!(
            err.contains("none of the replicas that hold every acknowledged write"),
            "{err}"
        );
        assert!(err.contains("addr-a"), "{err}");
        // With `a` among them, `a` serves and the stale ones are left out.
        let c = vec![
            cand("a", Some(managed(after.clone()))),
            cand("b", Some(before.clone())),
            cand("c", Some(before)),
        ];
        let plan = plan_start_under(3, &c, "x", Some(&grant(Some(after), true))).unwrap();
        assert_eq!(plan.rw, vec![0]);
        assert!(plan
            .left_out
            .iter()
            .all(|(_, why)| why.contains("missed acknowledged writes")));
    }

    #[test]
    fn under_a_manager_another_node_keeps_the_majority_rule() {
        // The last engine ran elsewhere and may still serve there, cut off.
        let r = rec(4, 0, &["a", "b", "c"]);
        let c = vec![cand("a", Some(managed(r.clone())))];
        let err = plan_start_under(3, &c, "x", Some(&grant(Some(r.clone()), false))).unwrap_err();
        assert!(err.contains("another node"), "{err}");
        let c = vec![
            cand("a", Some(managed(r.clone()))),
            cand("b", Some(managed(r.clone()))),
        ];
        assert_eq!(
            plan_start_under(3, &c, "x", Some(&grant(Some(r), false)))
                .unwrap()
                .rw,
            vec![0, 1]
        );
    }

    #[test]
    fn a_managed_volume_is_refused_without_its_manager() {
        let r = managed(rec(4, 0, &["a", "b"]));
        let c = vec![cand("a", Some(r.clone())), cand("b", Some(r.clone()))];
        let err = plan_start(2, &c, "x").unwrap_err();
        assert!(err.contains("kept by manager:c1"), "{err}");
        // Nor by a manager that lost its record of it.
        let err = plan_start_under(2, &c, "x", Some(&grant(None, true))).unwrap_err();
        assert!(err.contains("holds no membership record"), "{err}");
    }

    #[test]
    fn under_a_manager_a_change_counts_with_one_rw_member() {
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<String>>();
        let drop_two = without(&rec(4, 0, &["a", "b", "c"]), &["b".into(), "c".into()]);
        assert!(!counts(&drop_two, &ids(&["a"])));
        assert!(counts_under(&drop_two, &ids(&["a"]), true));
        assert!(!counts_under(&drop_two, &ids(&["b"]), true));
        // A volume's first record still needs every member.
        let first = rec(1, 0, &["a", "b"]);
        assert!(!counts_under(&first, &ids(&["a"]), true));
    }

    #[test]
    fn blank_and_foreign_replicas_never_serve() {
        let r = rec(2, 0, &["a", "b"]);
        let mut foreign = cand("f", None);
        foreign.volume = Some("other".into());
        let c = vec![
            cand("a", Some(r.clone())),
            cand("b", Some(r)),
            cand("n", None),
            foreign,
        ];
        let plan = plan_start(4, &c, "x").unwrap();
        assert_eq!(plan.rw, vec![0, 1]);
        assert!(plan.left_out[0].1.contains("blank"));
        assert!(plan.left_out[1].1.contains("another volume"));
    }

    #[test]
    fn a_first_start_needs_every_listed_replica() {
        let c = vec![cand("a", None), cand("b", None)];
        let plan = plan_start(2, &c, "new").unwrap();
        assert_eq!((plan.volume.as_str(), plan.rw.len()), ("new", 2));
        assert!(plan_start(3, &c, "new").is_err());
    }

    #[test]
    fn a_change_counts_with_a_majority_of_the_previous_rw_members() {
        let e = rec(4, 0, &["a", "b", "c"]);
        let n = without(&e, &["c".to_string()]);
        assert_eq!(n.version, 1);
        let stored = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert!(counts(&n, &stored(&["a", "b"])));
        assert!(!counts(&n, &stored(&["a"])));
        // From two, one is half: a drop counts on the survivor alone.
        let n2 = without(&n, &["b".to_string()]);
        assert!(counts(&n2, &stored(&["a"])));
        // The last one cannot be dropped.
        let n3 = without(&n2, &["a".to_string()]);
        assert!(!counts(&n3, &stored(&[])));
        // A rebuilt replica restores the margin.
        let w = with_rebuilding(&n, "d", "addr-d");
        let p = with_promoted(&w, "d");
        assert_eq!(p.rw.len(), 3);
        assert!(counts(&rec(1, 0, &["a"]), &stored(&["a"])));
        assert!(!counts(&rec(1, 0, &["a", "b"]), &stored(&["a"])));
    }
}
