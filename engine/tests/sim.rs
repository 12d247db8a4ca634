//! A deterministic simulation of the replication rules (in the manner of TigerBeetle's
//! VOPR): replicas are in-memory disks behind a simulated network, and a seed decides
//! the workload and the faults (lost and delayed messages, so replies arrive out of
//! order; disk errors; replicas that hang or crash; a newer engine taking over).
//!
//! Checked on every seed:
//! - every read returns the latest acknowledged data of its range;
//! - after the run, every replica still RW holds every acknowledged write;
//! - every I/O completes, within a bound set by the timeout: nothing hangs;
//! - with no RW replica left, I/O fails with an error.
//!
//! `HORN_SIM_SEEDS` sets how many seeds run (default 1,000); `HORN_SIM_SEED` runs one.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use horn_engine::replica_set::{
    Action, IoError, IoId, IoKind, IoRequest, Mode, ReplicaConfig, ReplicaId, ReplicaSet, Reply, ReqId,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const SECTOR: u64 = 512;
const BLOCKS: u64 = 64;
const TIMEOUT: u64 = 8_000_000_000; // 8 s, the engine's default
const IOS_PER_RUN: usize = 300;
const QUEUE_DEPTH: usize = 8;

#[derive(Debug)]
enum Event {
    /// A request reaches a replica.
    Deliver {
        replica: ReplicaId,
        req: ReqId,
        io: IoId,
        request: IoRequest,
    },
    /// A reply reaches the engine.
    Reply {
        replica: ReplicaId,
        req: ReqId,
        io: IoId,
        reply: Reply,
        data: Option<Vec<u8>>,
    },
    /// A replica's connection breaks.
    Disconnect { replica: ReplicaId },
}

struct SimReplica {
    disk: Vec<u8>,
    /// From this time on the replica answers nothing (hung, or crashed).
    dead_from: u64,
    error_rate: f64,
}

struct Faults {
    drop_rate: f64,
    max_delay: u64,
    stale_at: Option<u64>,
}

struct Sim {
    rng: SmallRng,
    now: u64,
    seq: u64,
    events: BinaryHeap<Reverse<(u64, u64)>>,
    payloads: BTreeMap<u64, Event>,
    replicas: Vec<SimReplica>,
    faults: Faults,
    set: ReplicaSet,
    // The workload and its model.
    model: Vec<u8>,
    /// Bytes whose contents are unknown after a failed write.
    unknown: Vec<bool>,
    busy: Vec<bool>,
    /// Data of every write of the run.
    writes: BTreeMap<IoId, Vec<u8>>,
    submitted: BTreeMap<IoId, (IoRequest, u64)>,
    read_data: BTreeMap<(IoId, ReplicaId), Vec<u8>>,
    completed: usize,
    failed_ios: usize,
    log: Vec<String>,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = SmallRng::seed_from_u64(seed);
        let n = rng.gen_range(1..=3);
        let size = (BLOCKS * SECTOR) as usize;
        let replicas: Vec<SimReplica> = (0..n)
            .map(|_| SimReplica {
                disk: vec![0; size],
                dead_from: if rng.gen_bool(0.3) {
                    rng.gen_range(0..200_000_000)
                } else {
                    u64::MAX
                },
                error_rate: if rng.gen_bool(0.3) {
                    rng.gen_range(0.0..0.05)
                } else {
                    0.0
                },
            })
            .collect();
        let faults = Faults {
            drop_rate: if rng.gen_bool(0.3) {
                rng.gen_range(0.0..0.02)
            } else {
                0.0
            },
            max_delay: rng.gen_range(1_000..2_000_000),
            stale_at: rng.gen_bool(0.05).then(|| rng.gen_range(0..100_000_000)),
        };
        let configs = (0..n)
            .map(|i| ReplicaConfig {
                name: format!("r{i}"),
                mode: Mode::Rw,
                local: i == 0 && rng.gen_bool(0.5),
            })
            .collect();
        Sim {
            rng,
            now: 0,
            seq: 0,
            events: BinaryHeap::new(),
            payloads: BTreeMap::new(),
            replicas,
            faults,
            set: ReplicaSet::new(configs, TIMEOUT),
            model: vec![0; size],
            unknown: vec![false; size],
            busy: vec![false; BLOCKS as usize],
            writes: BTreeMap::new(),
            submitted: BTreeMap::new(),
            read_data: BTreeMap::new(),
            completed: 0,
            failed_ios: 0,
            log: Vec::new(),
        }
    }

    fn schedule(&mut self, at: u64, e: Event) {
        self.seq += 1;
        self.events.push(Reverse((at, self.seq)));
        self.payloads.insert(self.seq, e);
    }

    fn delay(&mut self) -> u64 {
        self.rng.gen_range(500..self.faults.max_delay.max(501))
    }

    /// Submits a random I/O over blocks nothing else is using.
    fn submit_one(&mut self) -> bool {
        let first = self.rng.gen_range(0..BLOCKS);
        let count = self.rng.gen_range(1..=4).min(BLOCKS - first);
        if (first..first + count).any(|b| self.busy[b as usize]) {
            return false;
        }
        let kind = match self.rng.gen_range(0..10) {
            0..=3 => IoKind::Write,
            4..=7 => IoKind::Read,
            8 => IoKind::Flush,
            _ => {
                if self.rng.gen_bool(0.5) {
                    IoKind::Discard
                } else {
                    IoKind::WriteZeroes
                }
            }
        };
        let request = match kind {
            IoKind::Flush => IoRequest {
                kind,
                offset: 0,
                len: 0,
            },
            _ => IoRequest {
                kind,
                offset: first * SECTOR,
                len: (count * SECTOR) as u32,
            },
        };
        if kind != IoKind::Flush {
            for b in first..first + count {
                self.busy[b as usize] = true;
            }
        }
        let io = self.set.submit(self.now, request);
        self.submitted.insert(io, (request, self.now));
        if kind == IoKind::Write {
            let data: Vec<u8> = (0..request.len).map(|_| self.rng.gen()).collect();
            self.writes.insert(io, data);
        }
        true
    }

    fn range(r: &IoRequest) -> std::ops::Range<usize> {
        r.offset as usize..(r.offset + r.len as u64) as usize
    }

    fn handle_actions(&mut self) {
        while let Some(a) = self.set.poll_action() {
            match a {
                Action::Send {
                    replica,
                    req,
                    io,
                    request,
                } => {
                    self.log.push(format!(
                        "{}: send {req:?} ({io:?} {:?}) to r{replica}",
                        self.now, request.kind
                    ));
                    if self.rng.gen_bool(self.faults.drop_rate) {
                        self.log
                            .push(format!("{}: request {req:?} to r{replica} lost", self.now));
                        continue;
                    }
                    let at = self.now + self.delay();
                    self.schedule(
                        at,
                        Event::Deliver {
                            replica,
                            req,
                            io,
                            request,
                        },
                    );
                }
                Action::Complete { io, result } => {
                    self.log
                        .push(format!("{}: {io:?} completes: {result:?}", self.now));
                    self.on_complete(io, result)
                }
                Action::ReplicaFailed { replica, reason } => {
                    self.log
                        .push(format!("{}: r{replica} dropped: {reason}", self.now));
                }
            }
        }
    }

    fn on_complete(&mut self, io: IoId, result: Result<Option<ReplicaId>, IoError>) {
        let (request, at) = self.submitted.remove(&io).expect("completion of a submitted I/O");
        let bound = (self.replicas.len() as u64 + 1) * (TIMEOUT + self.faults.max_delay * 2) + 1;
        assert!(
            self.now - at <= bound,
            "I/O {io:?} took {} ns, more than the bound {bound}",
            self.now - at
        );
        self.completed += 1;
        let range = Self::range(&request);
        if request.kind != IoKind::Flush {
            for b in range.start / SECTOR as usize..range.end / SECTOR as usize {
                self.busy[b] = false;
            }
        }
        // Write data stays until the run ends: a request already on its way to a replica
        // that has been dropped may still arrive after its I/O completed (a real driver
        // likewise keeps a buffer until its send has finished).
        let data = self.writes.get(&io).cloned();
        match result {
            Ok(from) => match request.kind {
                IoKind::Write => {
                    let data = data.expect("write data");
                    // Acknowledged means held: some replica that is RW now has it.
                    let holders: Vec<usize> = (0..self.replicas.len())
                        .filter(|&r| {
                            self.set.modes()[r] == Mode::Rw
                                && self.replicas[r].disk[range.clone()] == data[..]
                        })
                        .collect();
                    assert!(
                        !holders.is_empty(),
                        "write {io:?} acknowledged but no RW replica holds it"
                    );
                    self.model[range.clone()].copy_from_slice(&data);
                    self.unknown[range].fill(false);
                }
                IoKind::Discard | IoKind::WriteZeroes => {
                    self.model[range.clone()].fill(0);
                    self.unknown[range].fill(false);
                }
                IoKind::Read => {
                    let r = from.expect("a read names its replica");
                    let got = self.read_data.remove(&(io, r)).expect("the read's data arrived");
                    for (i, at) in range.clone().enumerate() {
                        assert!(
                            self.unknown[at] || got[i] == self.model[at],
                            "read of {range:?} from r{r} returned stale data at byte {at}"
                        );
                    }
                }
                IoKind::Flush => {}
            },
            Err(e) => {
                self.failed_ios += 1;
                assert!(
                    matches!(e, IoError::NoHealthyReplica | IoError::Fenced),
                    "unexpected error {e}"
                );
                if e == IoError::NoHealthyReplica {
                    assert!(
                        !self.set.modes().contains(&Mode::Rw) || request.kind != IoKind::Read,
                        "a read failed while an RW replica was left"
                    );
                }
                if matches!(
                    request.kind,
                    IoKind::Write | IoKind::Discard | IoKind::WriteZeroes
                ) {
                    // A failed write may have reached some replicas.
                    self.unknown[range].fill(true);
                }
            }
        }
        self.read_data.retain(|(i, _), _| *i != io);
    }

    fn deliver(&mut self, e: Event) {
        match e {
            Event::Deliver {
                replica,
                req,
                io,
                request,
            } => {
                let rep = &mut self.replicas[replica];
                if self.now >= rep.dead_from {
                    return; // hung: the engine's timeout must notice
                }
                let range = Self::range(&request);
                let mut data = None;
                let reply = if self.faults.stale_at.is_some_and(|t| self.now >= t) {
                    Reply::StaleGeneration
                } else if self.rng.gen_bool(rep.error_rate) {
                    // A failing disk may or may not have done part of the write.
                    if request.kind == IoKind::Write && self.rng.gen_bool(0.5) {
                        let w = &self.writes[&io];
                        rep.disk[range.clone()].copy_from_slice(w);
                    }
                    Reply::Failed("injected disk error".into())
                } else {
                    match request.kind {
                        IoKind::Write => rep.disk[range].copy_from_slice(&self.writes[&io]),
                        IoKind::Discard | IoKind::WriteZeroes => rep.disk[range].fill(0),
                        IoKind::Read => data = Some(rep.disk[range].to_vec()),
                        IoKind::Flush => {}
                    }
                    Reply::Ok
                };
                if self.rng.gen_bool(self.faults.drop_rate) {
                    return; // the reply is lost
                }
                let at = self.now + self.delay();
                self.schedule(
                    at,
                    Event::Reply {
                        replica,
                        req,
                        io,
                        reply,
                        data,
                    },
                );
            }
            Event::Reply {
                replica,
                req,
                io,
                reply,
                data,
            } => {
                self.log.push(format!(
                    "{}: r{replica} answers {req:?} ({io:?}): {reply:?}",
                    self.now
                ));
                if let Some(d) = data {
                    self.read_data.insert((io, replica), d);
                }
                self.set.on_reply(self.now, req, reply);
            }
            Event::Disconnect { replica } => self.set.on_disconnect(self.now, replica),
        }
    }

    fn run(&mut self) {
        // Some dead replicas crash visibly (the connection breaks) rather than hang.
        for r in 0..self.replicas.len() {
            let t = self.replicas[r].dead_from;
            if t != u64::MAX && self.rng.gen_bool(0.5) {
                self.schedule(t, Event::Disconnect { replica: r });
            }
        }
        let mut issued = 0;
        let mut steps = 0u64;
        loop {
            steps += 1;
            assert!(
                steps < 5_000_000 && self.now < 10_000 * TIMEOUT,
                "the simulation does not finish: I/O hangs ({} in flight at {} ns)",
                self.set.in_flight(),
                self.now
            );
            while issued < IOS_PER_RUN && self.submitted.len() < QUEUE_DEPTH {
                if self.submit_one() {
                    issued += 1;
                } else if self.rng.gen_bool(0.5) {
                    break;
                }
            }
            self.handle_actions();
            let next_event = self.events.peek().map(|Reverse((t, _))| *t);
            let deadline = self.set.next_deadline();
            let next = match (next_event, deadline) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) | (None, Some(a)) => a,
                (None, None) => {
                    if issued < IOS_PER_RUN && self.submitted.len() < QUEUE_DEPTH {
                        continue;
                    }
                    break;
                }
            };
            self.now = self.now.max(next);
            if let Some(Reverse((t, seq))) = self.events.peek().copied() {
                if t <= self.now {
                    self.events.pop();
                    let e = self.payloads.remove(&seq).expect("scheduled");
                    self.deliver(e);
                }
            }
            self.set.on_tick(self.now);
            self.handle_actions();
        }
        assert_eq!(self.set.in_flight(), 0, "I/Os left hanging");
        assert!(
            self.submitted.is_empty(),
            "I/Os never completed: {:?}",
            self.submitted.keys()
        );
        assert_eq!(self.completed, issued);
        // Every RW replica holds every acknowledged write.
        for (r, mode) in self.set.modes().into_iter().enumerate() {
            if mode != Mode::Rw {
                continue;
            }
            for at in 0..self.model.len() {
                assert!(
                    self.unknown[at] || self.replicas[r].disk[at] == self.model[at],
                    "RW replica r{r} lacks acknowledged data at byte {at}"
                );
            }
        }
        if self.set.is_fenced() {
            assert!(self.failed_ios > 0 || self.faults.stale_at.is_some());
        }
    }
}

fn run_seed(seed: u64) {
    let mut sim = Sim::new(seed);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.run()));
    if let Err(e) = result {
        let tail: Vec<&String> = sim.log.iter().rev().take(40).collect();
        eprintln!("seed {seed} failed; last events (newest first): {tail:#?}");
        std::panic::resume_unwind(e);
    }
}

#[test]
fn replication_rules_hold_under_seeded_faults() {
    if let Some(seed) = std::env::var("HORN_SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return run_seed(seed);
    }
    let seeds: u64 = std::env::var("HORN_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    for seed in 0..seeds {
        run_seed(seed);
    }
}

/// A set of `n` RW replicas with the default timeout.
fn rw_set(n: usize) -> ReplicaSet {
    let configs = (0..n)
        .map(|i| ReplicaConfig {
            name: format!("r{i}"),
            mode: Mode::Rw,
            local: false,
        })
        .collect();
    ReplicaSet::new(configs, TIMEOUT)
}

/// The rules the simulation relies on, one by one.
#[test]
fn a_write_completes_only_when_every_replica_has_answered() {
    let mut set = rw_set(3);
    let io = set.submit(
        0,
        IoRequest {
            kind: IoKind::Write,
            offset: 0,
            len: 512,
        },
    );
    let sends: Vec<ReqId> = std::iter::from_fn(|| set.poll_action())
        .map(|a| match a {
            Action::Send { req, .. } => req,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(sends.len(), 3);
    set.on_reply(1, sends[0], Reply::Ok);
    set.on_reply(1, sends[1], Reply::Ok);
    assert_eq!(set.poll_action(), None, "two of three answers complete nothing");
    set.on_tick(TIMEOUT + 1);
    assert!(matches!(
        set.poll_action(),
        Some(Action::ReplicaFailed { replica: 2, .. })
    ));
    assert_eq!(set.poll_action(), Some(Action::Complete { io, result: Ok(None) }));
    assert_eq!(set.modes(), vec![Mode::Rw, Mode::Rw, Mode::Err]);
}

#[test]
fn a_write_acknowledged_only_by_replicas_that_failed_since_is_an_error() {
    let mut set = rw_set(2);
    let w = set.submit(
        0,
        IoRequest {
            kind: IoKind::Write,
            offset: 0,
            len: 512,
        },
    );
    let r = set.submit(
        0,
        IoRequest {
            kind: IoKind::Read,
            offset: 4096,
            len: 512,
        },
    );
    let sends: Vec<(ReplicaId, ReqId, IoId)> = std::iter::from_fn(|| set.poll_action())
        .filter_map(|a| match a {
            Action::Send { replica, req, io, .. } => Some((replica, req, io)),
            _ => None,
        })
        .collect();
    let write_to_0 = sends.iter().find(|s| s.0 == 0 && s.2 == w).unwrap().1;
    set.on_reply(1, write_to_0, Reply::Ok);
    // Replica 0 then fails, and replica 1 never answers the write.
    set.fail_replica(2, 0, "test".into());
    set.on_tick(TIMEOUT + 10);
    let results: Vec<Action> = std::iter::from_fn(|| set.poll_action()).collect();
    assert!(
        results.contains(&Action::Complete {
            io: w,
            result: Err(IoError::NoHealthyReplica)
        }),
        "{results:?}"
    );
    assert!(results.contains(&Action::Complete {
        io: r,
        result: Err(IoError::NoHealthyReplica)
    }));
}

#[test]
fn reads_go_to_the_local_replica_first() {
    let configs = (0..3)
        .map(|i| ReplicaConfig {
            name: format!("r{i}"),
            mode: Mode::Rw,
            local: i == 2,
        })
        .collect();
    let mut set = ReplicaSet::new(configs, TIMEOUT);
    for _ in 0..10 {
        set.submit(
            0,
            IoRequest {
                kind: IoKind::Read,
                offset: 0,
                len: 512,
            },
        );
        match set.poll_action() {
            Some(Action::Send { replica, .. }) => assert_eq!(replica, 2),
            other => panic!("unexpected {other:?}"),
        }
    }
}
