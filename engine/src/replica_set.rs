//! `ReplicaSet`: the replication rules of one volume, as a state machine without I/O.
//!
//! The driver (sockets and rings, or the deterministic simulator in the tests) feeds
//! it events (an I/O submitted, a reply, a lost connection, the passing of time) and
//! carries out the actions it emits (send this request to that replica, complete that
//! I/O, report that replica failed). Time is a number of nanoseconds the driver
//! supplies, so tests control it exactly.
//!
//! The rules:
//! - A write, discard, write-zeroes or flush goes to every replica in RW or WO mode at
//!   submission, and completes when each of them has answered or been dropped. It
//!   succeeds only if at least one RW replica answered "done": nothing is acknowledged
//!   that no healthy replica holds.
//! - A read goes to one RW replica: a local one first, else round-robin. If that
//!   replica fails, the read is retried on another RW replica.
//! - A replica that answers with an error, loses its connection, or leaves a request
//!   unanswered past the timeout is marked ERR and dropped: the requests it owes are
//!   settled without it, and nothing more is sent to it. I/O goes on while an RW replica
//!   is left; with none, every I/O fails at once, never hangs.
//! - A replica answering "stale generation" means a newer engine owns the volume: this
//!   engine is fenced, and every I/O in flight or to come fails.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

pub use crate::types::IoError;

/// Index of a replica in the set, in the order given at creation.
pub type ReplicaId = usize;

/// Identifies one I/O submitted to the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IoId(pub u64);

/// Identifies one request sent to one replica (the data wire's request id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReqId(pub u64);

/// A replica's standing in the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Healthy: takes writes, serves reads.
    Rw,
    /// Being rebuilt: takes writes, serves no reads.
    Wo,
    /// Failed and dropped: gets nothing.
    Err,
}

/// What an I/O does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// Read a range.
    Read,
    /// Write a range.
    Write,
    /// Make completed writes durable.
    Flush,
    /// Deallocate a range.
    Discard,
    /// Zero a range.
    WriteZeroes,
}

/// One I/O as the frontend submits it (the driver keeps the data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoRequest {
    /// What to do.
    pub kind: IoKind,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

/// How a replica answered a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Done.
    Ok,
    /// The replica failed it (its disk, or it cannot serve): drop the replica.
    Failed(String),
    /// The request itself is wrong (out of range, misaligned): fail the I/O, keep the
    /// replica, since every replica would say the same.
    Refused(String),
    /// A newer engine owns the replica.
    StaleGeneration,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send the I/O's request to a replica, under id `req`.
    Send {
        /// The replica.
        replica: ReplicaId,
        /// Id to put on the wire and to report the reply with.
        req: ReqId,
        /// The I/O it belongs to (for the data).
        io: IoId,
        /// The request.
        request: IoRequest,
    },
    /// The I/O is finished. For a successful read, `Ok(Some(replica))` names the
    /// replica whose data answers it.
    Complete {
        /// The I/O.
        io: IoId,
        /// Outcome.
        result: Result<Option<ReplicaId>, IoError>,
    },
    /// A replica has been marked ERR and dropped.
    ReplicaFailed {
        /// The replica.
        replica: ReplicaId,
        /// Why, for the operator.
        reason: String,
    },
}

/// A replica as configured at start.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// Name for messages (an address).
    pub name: String,
    /// Starting mode (RW, or WO when joining for a rebuild).
    pub mode: Mode,
    /// On this node: preferred for reads.
    pub local: bool,
}

struct Replica {
    config: ReplicaConfig,
    mode: Mode,
}

struct Io {
    request: IoRequest,
    /// Replicas still owing an answer (writes) or the one being asked (reads).
    waiting: BTreeSet<ReplicaId>,
    /// Replicas that answered "done" (success needs one of them still RW at the end).
    acked: Vec<ReplicaId>,
    /// Reads: replicas already tried.
    tried: Vec<ReplicaId>,
    /// A refusal to report instead of success.
    refused: Option<String>,
}

struct Outstanding {
    io: IoId,
    replica: ReplicaId,
    sent_at: u64,
}

/// The replication state machine of one volume.
pub struct ReplicaSet {
    replicas: Vec<Replica>,
    ios: BTreeMap<IoId, Io>,
    requests: BTreeMap<ReqId, Outstanding>,
    next_io: u64,
    next_req: u64,
    round_robin: usize,
    timeout_ns: u64,
    /// When the newest request was sent.
    last_sent: u64,
    fenced: bool,
    actions: VecDeque<Action>,
}

impl ReplicaSet {
    /// A set of replicas; requests unanswered for `timeout_ns` fail their replica.
    pub fn new(replicas: Vec<ReplicaConfig>, timeout_ns: u64) -> Self {
        ReplicaSet {
            replicas: replicas
                .into_iter()
                .map(|config| Replica {
                    mode: config.mode,
                    config,
                })
                .collect(),
            ios: BTreeMap::new(),
            requests: BTreeMap::new(),
            next_io: 1,
            next_req: 1,
            round_robin: 0,
            timeout_ns,
            last_sent: 0,
            fenced: false,
            actions: VecDeque::new(),
        }
    }

    /// Adds a replica joining for a rebuild (WO: it takes writes from now on, serves no
    /// reads) and returns its id.
    pub fn add_replica(&mut self, config: ReplicaConfig) -> ReplicaId {
        self.replicas.push(Replica {
            mode: config.mode,
            config,
        });
        self.replicas.len() - 1
    }

    /// A WO replica that now holds everything turns RW (it serves reads). A failed
    /// replica stays ERR.
    pub fn promote(&mut self, replica: ReplicaId) {
        if self.replicas[replica].mode == Mode::Wo {
            self.replicas[replica].mode = Mode::Rw;
        }
    }

    /// Each replica's mode.
    pub fn modes(&self) -> Vec<Mode> {
        self.replicas.iter().map(|r| r.mode).collect()
    }

    /// I/Os submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.ios.len()
    }

    /// Has a newer engine taken over?
    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// The next action for the driver, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When the driver must call [`ReplicaSet::on_tick`] next, if anything is waiting.
    pub fn next_deadline(&self) -> Option<u64> {
        // Request ids grow with the time they are sent at (see `send`): the oldest
        // request is the first.
        self.requests.values().next().map(|o| o.sent_at + self.timeout_ns)
    }

    /// Submits an I/O.
    pub fn submit(&mut self, now: u64, request: IoRequest) -> IoId {
        let id = IoId(self.next_io);
        self.next_io += 1;
        let io = Io {
            request,
            waiting: BTreeSet::new(),
            acked: Vec::new(),
            tried: Vec::new(),
            refused: None,
        };
        self.ios.insert(id, io);
        if self.fenced {
            self.complete(id, Err(IoError::Fenced));
        } else if request.kind == IoKind::Read {
            self.send_read(now, id);
        } else {
            let targets: Vec<ReplicaId> = (0..self.replicas.len())
                .filter(|&r| matches!(self.replicas[r].mode, Mode::Rw | Mode::Wo))
                .collect();
            if !targets.iter().any(|&r| self.replicas[r].mode == Mode::Rw) {
                self.complete(id, Err(IoError::NoHealthyReplica));
                return id;
            }
            for r in targets {
                self.send(now, id, r);
            }
        }
        id
    }

    fn send(&mut self, now: u64, io: IoId, replica: ReplicaId) {
        // Time never runs backwards, so requests in id order are in the order sent.
        let now = now.max(self.last_sent);
        self.last_sent = now;
        let req = ReqId(self.next_req);
        self.next_req += 1;
        let state = self.ios.get_mut(&io).expect("sending for a live I/O");
        state.waiting.insert(replica);
        let request = state.request;
        let earlier = self.requests.insert(
            req,
            Outstanding {
                io,
                replica,
                sent_at: now,
            },
        );
        debug_assert!(earlier.is_none(), "request id {req:?} issued twice");
        debug_assert!(
            self.replicas[replica].mode != Mode::Err,
            "a request was sent to replica {replica}, which is ERR"
        );
        self.actions.push_back(Action::Send {
            replica,
            req,
            io,
            request,
        });
    }

    /// Sends a read to the next RW replica it has not tried, or fails it.
    fn send_read(&mut self, now: u64, io: IoId) {
        let tried = &self.ios[&io].tried;
        let candidates: Vec<ReplicaId> = (0..self.replicas.len())
            .filter(|&r| self.replicas[r].mode == Mode::Rw && !tried.contains(&r))
            .collect();
        let pick = candidates
            .iter()
            .copied()
            .find(|&r| self.replicas[r].config.local)
            .or_else(|| {
                (!candidates.is_empty()).then(|| {
                    self.round_robin = self.round_robin.wrapping_add(1);
                    candidates[self.round_robin % candidates.len()]
                })
            });
        match pick {
            Some(r) => {
                debug_assert_eq!(
                    self.replicas[r].mode,
                    Mode::Rw,
                    "a read went to a replica that is not RW"
                );
                self.ios.get_mut(&io).expect("live").tried.push(r);
                self.send(now, io, r);
            }
            None => self.complete(io, Err(IoError::NoHealthyReplica)),
        }
    }

    fn complete(&mut self, io: IoId, result: Result<Option<ReplicaId>, IoError>) {
        let removed = self.ios.remove(&io);
        debug_assert!(removed.is_some(), "I/O {io:?} completed twice");
        debug_assert!(
            !self.requests.values().any(|o| o.io == io) || result.is_err() || self.fenced,
            "I/O {io:?} succeeded while a replica still owes it an answer"
        );
        self.actions.push_back(Action::Complete { io, result });
    }

    /// A replica answered request `req`.
    pub fn on_reply(&mut self, now: u64, req: ReqId, reply: Reply) {
        // Unknown ids are answers from a replica already dropped: ignored.
        let Some(out) = self.requests.remove(&req) else {
            return;
        };
        let (io, replica) = (out.io, out.replica);
        match reply {
            Reply::Ok => self.settle(now, io, replica, true),
            Reply::Refused(why) => {
                if let Some(state) = self.ios.get_mut(&io) {
                    state.refused.get_or_insert(why);
                }
                self.settle(now, io, replica, false);
            }
            Reply::Failed(why) => {
                // Settle this request as failed first, so a read moves on at once.
                self.requests.insert(req, out);
                self.fail_replica(now, replica, why);
            }
            Reply::StaleGeneration => {
                self.requests.insert(req, out);
                self.fence();
            }
        }
    }

    /// One replica's part of an I/O is over (`ok`: it did it).
    fn settle(&mut self, now: u64, io: IoId, replica: ReplicaId, ok: bool) {
        let Some(state) = self.ios.get_mut(&io) else {
            return;
        };
        state.waiting.remove(&replica);
        if state.request.kind == IoKind::Read {
            if ok {
                self.complete(io, Ok(Some(replica)));
            } else if let Some(why) = state.refused.clone() {
                self.complete(io, Err(IoError::Refused(why)));
            } else {
                self.send_read(now, io);
            }
            return;
        }
        if ok {
            state.acked.push(replica);
        }
        if state.waiting.is_empty() {
            let held = state.acked.iter().any(|&r| self.replicas[r].mode == Mode::Rw);
            let result = match (&state.refused, held) {
                (Some(why), _) => Err(IoError::Refused(why.clone())),
                (None, false) => Err(IoError::NoHealthyReplica),
                (None, true) => Ok(None),
            };
            self.complete(io, result);
        }
    }

    /// A replica's connection is gone.
    pub fn on_disconnect(&mut self, now: u64, replica: ReplicaId) {
        self.fail_replica(now, replica, "its connection was lost".into());
    }

    /// Time has passed: replicas owing an answer for longer than the timeout fail.
    pub fn on_tick(&mut self, now: u64) {
        let late: BTreeSet<ReplicaId> = self
            .requests
            .values()
            .take_while(|o| now >= o.sent_at + self.timeout_ns)
            .map(|o| o.replica)
            .collect();
        let secs = self.timeout_ns as f64 / 1e9;
        let failures = late
            .into_iter()
            .map(|r| (r, format!("it did not answer within {secs:.1} s")))
            .collect();
        self.fail_replicas(now, failures);
    }

    /// Marks a replica ERR and settles everything it owes without it.
    pub fn fail_replica(&mut self, now: u64, replica: ReplicaId, reason: String) {
        self.fail_replicas(now, vec![(replica, reason)]);
    }

    /// Marks replicas ERR, all of them before settling anything they owe: an I/O must
    /// not be acknowledged on the strength of a replica known to have failed at the
    /// same instant.
    fn fail_replicas(&mut self, now: u64, failures: Vec<(ReplicaId, String)>) {
        let mut failed = Vec::new();
        for (replica, reason) in failures {
            if self.replicas[replica].mode == Mode::Err {
                continue;
            }
            self.replicas[replica].mode = Mode::Err;
            self.actions.push_back(Action::ReplicaFailed {
                replica,
                reason: format!("replica {} failed: {reason}", self.replicas[replica].config.name),
            });
            failed.push(replica);
        }
        let owed: Vec<(ReqId, IoId, ReplicaId)> = self
            .requests
            .iter()
            .filter(|(_, o)| failed.contains(&o.replica))
            .map(|(&req, o)| (req, o.io, o.replica))
            .collect();
        for (req, io, replica) in owed {
            self.requests.remove(&req);
            self.settle(now, io, replica, false);
        }
        debug_assert!(
            !self.requests.values().any(|o| failed.contains(&o.replica)),
            "a dropped replica still owes requests"
        );
    }

    /// A newer engine owns the volume: fail everything from now on.
    fn fence(&mut self) {
        self.fenced = true;
        self.requests.clear();
        let ios: Vec<IoId> = self.ios.keys().copied().collect();
        for io in ios {
            self.complete(io, Err(IoError::Fenced));
        }
    }
}
