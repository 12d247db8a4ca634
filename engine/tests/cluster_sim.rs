//! A seeded simulation of the membership rules across a volume's whole life, not one
//! engine's: engines start, crash, close, and start two at a time; any link between an
//! engine and a replica may be cut and healed; replicas crash, restart, lose power
//! (what was not flushed is gone) and come back blank; drops, rebuilds and
//! reconciliation run through the same rule functions the engine and the replicas use
//! (`horn_engine::membership`, `horn_replica::membership`).
//!
//! Checked on every seed:
//! - **no stale read**: a read returns the last acknowledged write to its block or a
//!   later one (once a replica has lost power, the last acknowledged write a flush
//!   covered or a later one), whichever engine serves it: also one that a newer engine
//!   has deposed and that has not written since, which learns it is fenced only at its
//!   next write, flush or lease renewal. Time passes between steps; claims grant read
//!   leases, engines renew them (unless stopped, as by SIGSTOP, or cut off) and serve
//!   a read only while theirs runs, and a replica that restarts holds off other
//!   engines' claims for a lease (`horn_engine::lease`);
//! - **one engine at a time**: once an engine acknowledges a write, no engine that
//!   acknowledged before it ever acknowledges again;
//! - **the survivors agree**: at the end, with every link healed and every replica
//!   up, an engine starts (or is refused with a reason) and every RW replica it takes
//!   holds the same data, which reads back fresh.
//!
//! Half the seeds run the volume under a manager, the second authority on membership
//! (`horn_engine::authority`): engines run on three nodes, one at a time on each (as a
//! node agent runs them), begin their generation at the manager and put every record
//! there before it counts; a change then counts with one RW member, and a start on
//! the node of the engine that put the manager's newest record may serve from one RW
//! member of it (a salvage). Any engine's link to the manager may be cut too.
//!
//! `HORN_CLUSTER_SEEDS` sets how many seeds run (default 5,000) from a base chosen at
//! random each run and printed (`HORN_CLUSTER_SEED_BASE` fixes it); a failure prints
//! its seed, and `HORN_CLUSTER_SEED` reruns that one.

use std::collections::{BTreeMap, BTreeSet};

use horn_engine::authority::Grant;
use horn_engine::membership::{self, Candidate, Record};
use horn_replica::membership::{check_claim, check_record, Lease, Standing};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const BLOCKS: u64 = 8;
const STEPS: usize = 400;
/// How long a replica holds a read lease from a claim or renewal, and how long the
/// engine trusts it, in milliseconds: `horn_engine::lease`'s 4 s and 3 s scaled down,
/// so that leases lapse within a few steps (a step takes up to 300 ms).
const LEASE: u64 = 1000;
const TRUSTED: u64 = 750;

#[derive(Clone, Default)]
struct Replica {
    id: String,
    up: bool,
    /// Bumped each time the replica process restarts (crash, power loss).
    incarnation: u64,
    standing: Standing,
    /// Block → the id of the write it holds (0: never written).
    data: BTreeMap<u64, u64>,
    /// What survives a power loss.
    flushed: BTreeMap<u64, u64>,
}

struct Engine {
    id: String,
    generation: u64,
    record: Record,
    alive: bool,
    /// Stopped (as by SIGSTOP): it neither renews nor serves until it goes on.
    stopped: bool,
    /// Until when it serves reads (its read lease, as it counts it).
    lease_until: u64,
    /// The node it runs on (under a manager: one engine of the volume per node).
    node: usize,
}

/// The manager's side, when the volume runs under one.
#[derive(Default)]
struct Manager {
    /// The generation begun last, and the engine that began it.
    generation: u64,
    engine: Option<usize>,
    /// The newest record put, and the node of the engine that put it.
    record: Option<Record>,
    record_node: Option<usize>,
}

const NODES: usize = 3;

struct Sim {
    rng: SmallRng,
    replicas: Vec<Replica>,
    engines: Vec<Engine>,
    /// links[e][r]: engine e reaches replica r.
    links: Vec<Vec<bool>>,
    /// connections[e][r]: the incarnation of replica r engine e connected to.
    connections: Vec<Vec<u64>>,
    next_write: u64,
    next_id: u64,
    /// Block → the last acknowledged write, and the last one a flush covered.
    last_acked: BTreeMap<u64, u64>,
    last_durable: BTreeMap<u64, u64>,
    /// Writes each engine acknowledged since its last flush (a flush covers only its
    /// own engine's writes: another engine's unflushed ones may be gone already).
    unflushed: BTreeMap<usize, BTreeMap<u64, u64>>,
    power_lost: bool,
    /// The volume the expectations belong to.
    volume: Option<String>,
    /// The time, in milliseconds.
    now: u64,
    /// Reads served (each checked fresh), and held back because the serving engine's
    /// lease had lapsed.
    served_reads: u64,
    held_reads: u64,
    last_acker: Option<usize>,
    retired: BTreeSet<usize>,
    log: Vec<String>,
    /// The volume runs under a manager.
    managed: bool,
    manager: Manager,
    /// manager_links[e]: engine e reaches the manager.
    manager_links: Vec<bool>,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = SmallRng::seed_from_u64(seed);
        let n = if rng.gen_bool(0.5) { 3 } else { 5 };
        let managed = rng.gen_bool(0.5);
        let replicas = (0..n)
            .map(|i| Replica {
                id: format!("r{i}"),
                up: true,
                ..Default::default()
            })
            .collect();
        Sim {
            rng,
            replicas,
            engines: Vec::new(),
            links: Vec::new(),
            connections: Vec::new(),
            next_write: 1,
            next_id: 1,
            last_acked: BTreeMap::new(),
            last_durable: BTreeMap::new(),
            unflushed: BTreeMap::new(),
            power_lost: false,
            volume: None,
            now: 0,
            served_reads: 0,
            held_reads: 0,
            last_acker: None,
            retired: BTreeSet::new(),
            log: Vec::new(),
            managed,
            manager: Manager::default(),
            manager_links: Vec::new(),
        }
    }

    fn reaches(&self, e: usize, r: usize) -> bool {
        self.links[e][r] && self.replicas[r].up
    }

    /// Is engine `e`'s connection to replica `r` the one it made? A replica that
    /// crashed, restarted or lost power since has broken it: the engine learns that at
    /// its next request, whatever the link does meanwhile.
    fn connected(&self, e: usize, r: usize) -> bool {
        self.reaches(e, r) && self.connections[e][r] == self.replicas[r].incarnation
    }

    /// Does replica `r` take data from engine `e` (its claim holder)?
    fn admits(&self, e: usize, r: usize) -> bool {
        let s = &self.replicas[r].standing;
        s.generation == self.engines[e].generation && s.engine.as_deref() == Some(&self.engines[e].id)
    }

    fn members(&self, e: usize) -> Vec<usize> {
        let rec = &self.engines[e].record;
        (0..self.replicas.len())
            .filter(|&r| {
                let id = &self.replicas[r].id;
                rec.rw.contains_key(id) || rec.wo.contains_key(id)
            })
            .collect()
    }

    fn rw_members(&self, e: usize) -> Vec<usize> {
        let rec = &self.engines[e].record;
        (0..self.replicas.len())
            .filter(|&r| rec.rw.contains_key(&self.replicas[r].id))
            .collect()
    }

    /// Stores `next` on the replicas engine `e` reaches; true if it counted by the rule.
    fn record(&mut self, e: usize, next: &Record) -> bool {
        let witnesses = membership::witnesses(next);
        let targets: Vec<usize> = (0..self.replicas.len())
            .filter(|&r| witnesses.contains(&self.replicas[r].id) && self.connected(e, r))
            .collect();
        let mut stored = BTreeSet::new();
        for &r in &targets {
            // A store may fail on its way (the link breaks).
            if self.rng.gen_bool(0.05) {
                self.links[e][r] = false;
                continue;
            }
            let rep = &mut self.replicas[r];
            if check_record(&rep.standing, next).is_ok() {
                rep.standing.volume = Some(next.volume.clone());
                rep.standing.record = Some(next.clone());
                stored.insert(rep.id.clone());
            }
        }
        let mut counted = membership::counts_under(next, &stored, self.managed);
        if counted && self.managed {
            // Then to the manager, which takes it from the engine of the generation
            // begun last only, and only forward.
            let m = &self.manager;
            let taken = self.manager_links[e]
                && self.rng.gen_bool(0.95)
                && m.generation == next.generation
                && m.engine == Some(e)
                && m.record.as_ref().is_none_or(|r| next.epoch() > r.epoch());
            if taken {
                self.manager.record = Some(next.clone());
                self.manager.record_node = Some(self.engines[e].node);
            }
            counted = taken;
        }
        self.log.push(format!(
            "{} record g{}v{} rw {:?}: stored on {stored:?}, counted {counted}",
            self.engines[e].id,
            next.generation,
            next.version,
            next.rw.keys().collect::<Vec<_>>()
        ));
        counted
    }

    fn start_engine(&mut self) {
        let links = (0..self.replicas.len()).map(|_| self.rng.gen_bool(0.8)).collect();
        self.start_engine_with(links);
    }

    fn start_engine_with(&mut self, links: Vec<bool>) {
        let node = self.rng.gen_range(0..NODES);
        if self.managed && self.engines.iter().any(|x| x.alive && x.node == node) {
            // The node's agent starts the volume's engine there only once the last one
            // has exited.
            return;
        }
        let e = self.engines.len();
        let id = format!("e{e}");
        self.links.push(links);
        self.manager_links.push(self.rng.gen_bool(0.9));
        self.connections
            .push(self.replicas.iter().map(|r| r.incarnation).collect());
        self.engines.push(Engine {
            id: id.clone(),
            generation: 0,
            record: Record {
                volume: String::new(),
                generation: 0,
                version: 0,
                engine: id.clone(),
                rw: BTreeMap::new(),
                wo: BTreeMap::new(),
                after: Vec::new(),
                authority: String::new(),
                cipher: String::new(),
            },
            alive: false,
            stopped: false,
            lease_until: 0,
            node,
        });
        let reach: Vec<usize> = (0..self.replicas.len()).filter(|&r| self.reaches(e, r)).collect();
        let newest = reach
            .iter()
            .map(|&r| self.replicas[r].standing.generation)
            .max()
            .unwrap_or(0);
        let mut generation = newest + 1;
        let grant = if self.managed {
            if !self.manager_links[e] {
                self.log
                    .push(format!("{id} on n{node}: the manager cannot be reached"));
                return;
            }
            let m = &mut self.manager;
            generation = generation.max(m.generation + 1);
            m.generation = generation;
            m.engine = Some(e);
            Some(Grant {
                generation,
                record: m.record.clone(),
                same_node: m.record_node.is_none_or(|n| n == node),
                name: "manager:sim".into(),
                key: None,
            })
        } else {
            None
        };
        let mut claimed = Vec::new();
        let now = self.now;
        for &r in &reach {
            if check_claim(&self.replicas[r].standing, now, generation, &id, None).is_ok() {
                let s = &mut self.replicas[r].standing;
                s.generation = generation;
                s.engine = Some(id.clone());
                s.lease = Some(Lease {
                    engine: id.clone(),
                    until: now + LEASE,
                });
                claimed.push(r);
            }
        }
        let candidates: Vec<Candidate> = claimed
            .iter()
            .map(|&r| Candidate {
                id: self.replicas[r].id.clone(),
                name: self.replicas[r].id.clone(),
                volume: self.replicas[r].standing.volume.clone(),
                record: self.replicas[r].standing.record.clone(),
                rebuilding: false,
            })
            .collect();
        let plan = match membership::plan_start_under(
            self.replicas.len(),
            &candidates,
            &format!("vol-{id}"),
            grant.as_ref(),
        ) {
            Ok(p) => p,
            Err(why) => {
                self.log.push(format!("{id} (g{generation}) refused: {why}"));
                self.give_up_leases(e, &claimed);
                return;
            }
        };
        let record = plan.first_record(&candidates, generation, &id);
        if !self.record(e, &record) {
            self.log
                .push(format!("{id} (g{generation}): its first record did not count"));
            self.give_up_leases(e, &claimed);
            return;
        }
        // As the engine does: members that did not commit it are dropped before anything
        // is served.
        let missing: Vec<String> = (0..self.replicas.len())
            .filter(|&r| {
                record.rw.contains_key(&self.replicas[r].id)
                    && self.replicas[r].standing.record.as_ref() != Some(&record)
            })
            .map(|r| self.replicas[r].id.clone())
            .collect();
        let record = if missing.is_empty() {
            record
        } else {
            let next = membership::without(&record, &missing);
            if !self.record(e, &next) {
                self.log
                    .push(format!("{id} (g{generation}): its first record did not count"));
                return;
            }
            next
        };
        self.engines[e].generation = generation;
        let granted: BTreeSet<String> = claimed.iter().map(|&r| self.replicas[r].id.clone()).collect();
        if membership::leased(&record, &granted) {
            self.engines[e].lease_until = now + TRUSTED;
        }
        self.engines[e].record = record;
        self.engines[e].alive = true;
        // Reconciliation: the members are made identical, from the first. A member it
        // cannot reach is dropped, as the engine's keeper records it.
        let members = self.rw_members(e);
        let reachable: Vec<usize> = members
            .iter()
            .copied()
            .filter(|&r| self.connected(e, r))
            .collect();
        let unreachable: Vec<usize> = members
            .iter()
            .copied()
            .filter(|r| !reachable.contains(r))
            .collect();
        if let Some(&src) = reachable.first() {
            // The copies land, and every member flushes before its intent records are
            // cleared, so what reconciliation settled is durable.
            let data = self.replicas[src].data.clone();
            for &r in &reachable {
                self.replicas[r].data = data.clone();
                self.replicas[r].flushed = data.clone();
            }
            self.log.push(format!(
                "{id} reconciled from {}: {data:?}",
                self.replicas[src].id
            ));
        }
        if !unreachable.is_empty() && !self.drop_members(e, &unreachable) {
            return;
        }
        let members = self.rw_members(e);
        self.log.push(format!(
            "{id} started at g{generation} on n{node} with {:?}",
            members.iter().map(|&r| &self.replicas[r].id).collect::<Vec<_>>()
        ));
    }

    /// A start that failed after its claims gives up their leases, where it still
    /// reaches them.
    fn give_up_leases(&mut self, e: usize, claimed: &[usize]) {
        for &r in claimed {
            if self.connected(e, r) {
                let s = &mut self.replicas[r].standing;
                if s.lease.as_ref().is_some_and(|l| l.engine == self.engines[e].id) {
                    s.lease = None;
                }
            }
        }
    }

    /// Engine `e` renews its read lease on the members it reaches: it runs again if
    /// half its RW members (rounded up) grant it. A member a newer engine holds deposes
    /// it (the volume faults).
    fn renew(&mut self, e: usize) {
        let now = self.now;
        let mut granted = BTreeSet::new();
        for r in self.members(e) {
            // Over the control service, which connects again after a replica restarts.
            if !self.reaches(e, r) {
                continue;
            }
            let (generation, id) = (self.engines[e].generation, self.engines[e].id.clone());
            let rid = self.replicas[r].id.clone();
            let s = &mut self.replicas[r].standing;
            if s.generation == generation && s.engine.as_deref() == Some(&id) {
                s.lease = Some(Lease {
                    engine: id,
                    until: now + LEASE,
                });
                granted.insert(rid);
            } else if s.generation >= generation {
                let why = format!(
                    "{} deposed: {rid} is held by {:?} at g{}",
                    id, s.engine, s.generation
                );
                self.log.push(why);
                self.engines[e].alive = false;
                return;
            }
        }
        if membership::leased(&self.engines[e].record, &granted) {
            self.engines[e].lease_until = now + TRUSTED;
        }
    }

    /// Replica `r` restarts: whoever held it may have renewed its lease just before,
    /// so it holds off other claims for a whole lease.
    fn restart_guard(&mut self, r: usize) {
        let now = self.now;
        let s = &mut self.replicas[r].standing;
        s.lease = s.engine.clone().map(|engine| Lease {
            engine,
            until: now + LEASE,
        });
    }

    /// Drops `failed` from engine `e`'s membership; false if the drop could not count
    /// (the engine faults and stops).
    fn drop_members(&mut self, e: usize, failed: &[usize]) -> bool {
        // Members whose disks were replaced are gone too: their connections broke.
        let present: BTreeSet<&str> = self.replicas.iter().map(|r| r.id.as_str()).collect();
        let rec = &self.engines[e].record;
        let ids: Vec<String> = failed
            .iter()
            .map(|&r| self.replicas[r].id.clone())
            .chain(
                rec.rw
                    .keys()
                    .chain(rec.wo.keys())
                    .filter(|id| !present.contains(id.as_str()))
                    .cloned(),
            )
            .collect();
        if ids.is_empty() {
            return true;
        }
        let current = self.engines[e].record.clone();
        let next = membership::without(&current, &ids);
        if self.record(e, &next) {
            self.engines[e].record = next;
            true
        } else {
            self.log
                .push(format!("{} faulted dropping {ids:?}", self.engines[e].id));
            self.engines[e].alive = false;
            false
        }
    }

    /// Expectations belong to one volume. When every replica of a volume has been
    /// replaced by a blank one, its data is gone with its disks and a later first start
    /// makes a new volume (docs/engine.md names this limit: a standalone engine cannot
    /// tell it from a volume's first start); the expectations start over with it.
    fn follow_volume(&mut self, e: usize) {
        let volume = self.engines[e].record.volume.clone();
        if self.volume.as_ref() != Some(&volume) {
            if self.volume.is_some() {
                self.log.push(format!("expectations now follow volume {volume}"));
            }
            self.volume = Some(volume);
            self.last_acked.clear();
            self.last_durable.clear();
            self.unflushed.clear();
            self.power_lost = false;
        }
    }

    fn acknowledge(&mut self, e: usize) {
        self.follow_volume(e);
        if self.retired.contains(&e) {
            panic!(
                "engine {} acknowledged after another engine had: two engines acknowledged at once",
                self.engines[e].id
            );
        }
        if let Some(prev) = self.last_acker {
            if prev != e {
                self.retired.insert(prev);
            }
        }
        self.last_acker = Some(e);
    }

    fn write(&mut self, e: usize) {
        let block = self.rng.gen_range(0..BLOCKS);
        let w = self.next_write;
        self.next_write += 1;
        let mut failed = Vec::new();
        let members = self.members(e);
        for &r in &members {
            if !self.connected(e, r) {
                failed.push(r);
            } else if !self.admits(e, r) {
                // A newer engine holds it: this one is fenced.
                self.log
                    .push(format!("{} fenced writing w{w}", self.engines[e].id));
                self.engines[e].alive = false;
                return;
            } else {
                self.replicas[r].data.insert(block, w);
            }
            // The engine may die with the write half sent.
            if self.rng.gen_bool(0.01) {
                self.log
                    .push(format!("{} crashed mid-write w{w}", self.engines[e].id));
                self.engines[e].alive = false;
                return;
            }
        }
        if !self.drop_members(e, &failed) {
            return;
        }
        if self.rw_members(e).is_empty() {
            self.engines[e].alive = false;
            return;
        }
        self.acknowledge(e);
        self.last_acked.insert(block, w);
        self.unflushed.entry(e).or_default().insert(block, w);
        self.log
            .push(format!("{} acked w{w} to block {block}", self.engines[e].id));
    }

    fn flush(&mut self, e: usize) {
        let mut failed = Vec::new();
        for r in self.members(e) {
            if !self.connected(e, r) {
                failed.push(r);
            } else if !self.admits(e, r) {
                self.engines[e].alive = false;
                return;
            } else {
                let rep = &mut self.replicas[r];
                rep.flushed = rep.data.clone();
            }
        }
        if !self.drop_members(e, &failed) {
            return;
        }
        self.acknowledge(e);
        self.log.push(format!("{} flushed", self.engines[e].id));
        for (b, w) in self.unflushed.remove(&e).unwrap_or_default() {
            self.last_durable.insert(b, w);
        }
    }

    fn read(&mut self, e: usize) {
        let block = self.rng.gen_range(0..BLOCKS);
        let rw: Vec<usize> = self
            .rw_members(e)
            .into_iter()
            .filter(|&r| self.connected(e, r) && self.admits(e, r))
            .collect();
        let Some(&r) = rw.get(self.rng.gen_range(0..rw.len().max(1))) else {
            return;
        };
        let got = self.replicas[r].data.get(&block).copied().unwrap_or(0);
        if self.now >= self.engines[e].lease_until {
            // Held back until a renewal sent after it succeeds; one that does tells
            // nothing older was served (no newer engine held the replicas until then).
            self.held_reads += 1;
            return;
        }
        self.follow_volume(e);
        self.served_reads += 1;
        self.check_fresh(
            block,
            got,
            &format!("{} read from {}", self.engines[e].id, self.replicas[r].id),
        );
    }

    fn check_fresh(&self, block: u64, got: u64, who: &str) {
        let floor = if self.power_lost {
            self.last_durable.get(&block).copied().unwrap_or(0)
        } else {
            self.last_acked.get(&block).copied().unwrap_or(0)
        };
        assert!(
            got >= floor,
            "{who}: block {block} holds w{got}, older than w{floor}, the last acknowledged write{}",
            if self.power_lost { " a flush covered" } else { "" }
        );
    }

    fn rebuild(&mut self, e: usize) {
        let members = self.members(e);
        let Some(target) = (0..self.replicas.len()).find(|r| !members.contains(r) && self.reaches(e, *r))
        else {
            return;
        };
        let generation = self.engines[e].generation;
        let id = self.engines[e].id.clone();
        let now = self.now;
        if check_claim(&self.replicas[target].standing, now, generation, &id, None).is_err() {
            return;
        }
        self.replicas[target].standing.generation = generation;
        self.replicas[target].standing.engine = Some(id.clone());
        self.replicas[target].standing.lease = Some(Lease {
            engine: id,
            until: now + LEASE,
        });
        // A new connection to it.
        self.connections[e][target] = self.replicas[target].incarnation;
        let tid = self.replicas[target].id.clone();
        let current = self.engines[e].record.clone();
        let joining = membership::with_rebuilding(&current, &tid, &tid);
        if !self.record(e, &joining) {
            self.engines[e].alive = false;
            return;
        }
        self.engines[e].record = joining.clone();
        let Some(src) = self
            .rw_members(e)
            .into_iter()
            .find(|&r| self.connected(e, r) && self.admits(e, r))
        else {
            return;
        };
        if !self.connected(e, target) {
            return;
        }
        // A sync writes the layers durably before the replica turns RW.
        self.replicas[target].data = self.replicas[src].data.clone();
        self.replicas[target].flushed = self.replicas[src].data.clone();
        let promoted = membership::with_promoted(&joining, &tid);
        if self.record(e, &promoted) {
            self.engines[e].record = promoted;
            self.log.push(format!("{} rebuilt {tid}", self.engines[e].id));
        } else {
            self.engines[e].alive = false;
        }
    }

    /// A replica that crashed or restarted: every engine's connection to it is gone
    /// (the engine learns it at its next request to it).
    fn break_connections(&mut self, r: usize) {
        self.replicas[r].incarnation += 1;
    }

    fn step(&mut self) {
        self.now += self.rng.gen_range(0..=300);
        for e in 0..self.engines.len() {
            if self.engines[e].stopped && self.rng.gen_bool(0.1) {
                self.engines[e].stopped = false;
                self.log
                    .push(format!("{} went on at {} ms", self.engines[e].id, self.now));
            }
        }
        // Each running engine's lease thread renews now and then.
        for e in 0..self.engines.len() {
            if self.engines[e].alive && !self.engines[e].stopped && self.rng.gen_bool(0.3) {
                self.renew(e);
            }
        }
        let live: Vec<usize> = (0..self.engines.len())
            .filter(|&e| self.engines[e].alive && !self.engines[e].stopped)
            .collect();
        let roll = self.rng.gen_range(0..100);
        match roll {
            0..=4 => self.start_engine(),
            5..=6 if !live.is_empty() => {
                let e = live[self.rng.gen_range(0..live.len())];
                self.engines[e].alive = false;
                self.log.push(format!("{} crashed", self.engines[e].id));
            }
            7 if !live.is_empty() => {
                // SIGSTOP: the engine goes on a few steps later, past its lease.
                let e = live[self.rng.gen_range(0..live.len())];
                self.engines[e].stopped = true;
                self.log
                    .push(format!("{} stopped at {} ms", self.engines[e].id, self.now));
            }
            8..=14 if !self.engines.is_empty() => {
                // Mostly a running engine's link: the others' matter less.
                let e = if !live.is_empty() && self.rng.gen_bool(0.8) {
                    live[self.rng.gen_range(0..live.len())]
                } else {
                    self.rng.gen_range(0..self.engines.len())
                };
                if self.managed && self.rng.gen_bool(0.2) {
                    self.manager_links[e] = !self.manager_links[e];
                } else {
                    let r = self.rng.gen_range(0..self.replicas.len());
                    self.links[e][r] = !self.links[e][r];
                }
            }
            15..=17 => {
                let r = self.rng.gen_range(0..self.replicas.len());
                self.replicas[r].up = !self.replicas[r].up;
                self.break_connections(r);
                self.restart_guard(r);
            }
            18 => {
                let r = self.rng.gen_range(0..self.replicas.len());
                self.break_connections(r);
                self.restart_guard(r);
                let rep = &mut self.replicas[r];
                rep.data = rep.flushed.clone();
                self.power_lost = true;
                self.log.push(format!("{} lost power", rep.id));
            }
            19 => {
                // A disk replaced, or a mount point left empty: a blank replica.
                let r = self.rng.gen_range(0..self.replicas.len());
                self.break_connections(r);
                let next = self.next_id;
                self.next_id += 1;
                self.replicas[r] = Replica {
                    id: format!("blank{next}"),
                    up: true,
                    incarnation: self.replicas[r].incarnation,
                    ..Default::default()
                };
                self.power_lost = true;
                self.log.push(format!("replica {r} came back blank"));
            }
            20..=22 if !live.is_empty() => {
                let e = live[self.rng.gen_range(0..live.len())];
                self.rebuild(e);
            }
            23..=29 if !live.is_empty() => {
                let e = live[self.rng.gen_range(0..live.len())];
                self.flush(e);
            }
            30..=64 if !live.is_empty() => {
                let e = live[self.rng.gen_range(0..live.len())];
                self.write(e);
            }
            65..=67 if !live.is_empty() => {
                // A partition: a running engine keeps a random part of the replicas.
                let e = live[self.rng.gen_range(0..live.len())];
                let kept: Vec<bool> = (0..self.replicas.len()).map(|_| self.rng.gen_bool(0.5)).collect();
                self.log
                    .push(format!("{} partitioned, keeping {kept:?}", self.engines[e].id));
                self.links[e] = kept;
            }
            68..=69 => {
                // A replica process crashes and restarts at once (its data is on disk).
                let r = self.rng.gen_range(0..self.replicas.len());
                self.break_connections(r);
                self.restart_guard(r);
                self.log.push(format!("{} restarted", self.replicas[r].id));
            }
            70..=99 if !live.is_empty() => {
                let e = live[self.rng.gen_range(0..live.len())];
                self.read(e);
            }
            _ => self.start_engine(),
        }
    }

    /// Heals everything and starts one more engine: what it serves must agree and be
    /// fresh.
    fn settle(&mut self) {
        for e in &mut self.engines {
            e.alive = false;
        }
        // The last engine waits out every lease (as a start does, polling).
        self.now += LEASE;
        for r in &mut self.replicas {
            r.up = true;
        }
        let e = self.engines.len();
        self.start_engine_with(vec![true; self.replicas.len()]);
        if !self.engines[e].alive {
            // Refused (a majority of the newest record is blank or gone): allowed.
            return;
        }
        self.follow_volume(e);
        let rw = self.rw_members(e);
        let first = self.replicas[rw[0]].data.clone();
        for &r in &rw {
            assert_eq!(
                self.replicas[r].data, first,
                "RW replicas differ after quiescence"
            );
        }
        for b in 0..BLOCKS {
            let got = first.get(&b).copied().unwrap_or(0);
            self.check_fresh(b, got, "the final engine");
        }
    }
}

/// Runs one seed; returns the reads it served and held back for want of a lease.
fn run_seed(seed: u64) -> (u64, u64) {
    let mut sim = Sim::new(seed);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for _ in 0..STEPS {
            sim.step();
        }
        sim.settle();
    }));
    if let Err(e) = result {
        let tail: Vec<&String> = sim.log.iter().rev().take(100000).collect();
        eprintln!("cluster simulation: seed {seed} failed (rerun: HORN_CLUSTER_SEED={seed}); last events, newest first: {tail:#?}");
        std::panic::resume_unwind(e);
    }
    (sim.served_reads, sim.held_reads)
}

#[test]
fn membership_rules_hold_across_engines_partitions_and_power_loss() {
    if let Some(seed) = std::env::var("HORN_CLUSTER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        run_seed(seed);
        return;
    }
    let seeds: u64 = std::env::var("HORN_CLUSTER_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);
    let base: u64 = std::env::var("HORN_CLUSTER_SEED_BASE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::random::<u32>() as u64);
    println!(
        "cluster simulation: seeds {base}..{} (HORN_CLUSTER_SEED_BASE={base})",
        base + seeds
    );
    let (mut served, mut held) = (0, 0);
    for seed in base..base + seeds {
        let (s, h) = run_seed(seed);
        served += s;
        held += h;
    }
    println!(
        "cluster simulation: {seeds} seeds passed; {served} reads served fresh, {held} held back for want of a read lease"
    );
}
