//! # horn-engine: one volume's engine
//!
//! The engine owns a volume's replica set: it fans writes out to every replica,
//! reads from one, drops replicas that fail, and coordinates snapshots. Its rules live
//! in [`replica_set::ReplicaSet`], a state machine with no I/O (events in, actions
//! out) that a deterministic simulator drives with seeded faults in the tests.
//!
//! The modules form a ladder: each imports only from the floors below it.
//! 1. [`types`]: the vocabulary (addresses, errors, reports, chain operations);
//!    [`crypt`]: encrypting a volume's sectors (AES-256-XTS);
//! 2. [`replica_set`]: the replication rules, without I/O; [`authority`]: what a
//!    second authority on membership (a manager) is asked; [`membership`]: the
//!    membership rules (which replicas a start may serve from, when a change counts),
//!    without I/O; [`stripes`]: which queue may have changes in flight where;
//! 3. `client`: the replicas' control services as the engine calls them;
//! 4. [`engine`]: what a volume's queues share: the claimed replicas, the generation,
//!    the membership record in force, which replicas failed, and the pause gate for
//!    chain operations; then `keeper`: storing membership records on the replicas,
//!    and the thread that records each drop before any queue acknowledges past it;
//!    and `lease`: the read lease, renewed by a thread of its own, without which no
//!    read is handed back;
//! 5. [`queue`]: one queue's replica connections and I/Os, turned into io_uring
//!    entries for whichever ring the queue's thread runs ([`EngineQueue`]);
//! 6. `ring`: a queue driven on a ring of the engine's own (over `horn_uring`);
//! 7. [`recovery`]: reconciliation after a crash (write-intent records), and comparing
//!    replicas by checksum;
//! 8. [`start`](mod@start): claiming and reconciling the replicas of a new engine;
//! 9. [`volume`]: a queue on its own ring, with blocking helpers and the operations
//!    that pause the volume (chain operations, verify, intent clearing);
//! 10. [`rebuild`]: adding a replica to a running volume, synced online;
//! 11. [`frontend`]: the narrow async interface frontends serve, and [`control`]: the
//!     engine's gRPC control service.
//!
//! It must never acknowledge a write that no healthy replica holds, serve a read from
//! a replica that may have missed writes, or hang an I/O when replicas vanish.

#![warn(missing_docs)]

pub mod types;

pub mod crypt;

pub mod replica_set;

pub mod authority;

pub mod membership;

pub mod stripes;

mod client;

pub mod engine;

mod keeper;
mod lease;

pub mod queue;

mod ring;

pub mod recovery;

pub mod start;

pub mod volume;

pub mod rebuild;

pub mod control;
pub mod frontend;

pub use engine::Engine;
pub use queue::{EngineQueue, Token};
pub use start::{start, start_pinned, start_with, StartOptions};
pub use types::{
    ChainOp, Difference, IoError, RebuildState, RebuildStatus, ReconcileReport, ReplicaAddr, Result,
    StartReport, VerifyReport, VolumeCompletion, VolumeError, MAX_DIFFERENCES,
};
pub use volume::Volume;
