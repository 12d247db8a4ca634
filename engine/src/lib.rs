//! # horn-engine: one volume's engine
//!
//! The engine owns a volume's replica set: it fans writes out to every replica,
//! reads from one, drops replicas that fail, and coordinates snapshots. Its rules live
//! in [`replica_set::ReplicaSet`], a state machine with no I/O (events in, actions
//! out) that a deterministic simulator drives with seeded faults in the tests.
//!
//! - [`Engine`] (engine.rs): what a volume's queues share: the claimed replicas, the
//!   generation, which replicas failed, and the pause gate for chain operations;
//! - [`EngineQueue`] (queue.rs): one queue's replica connections and I/Os, turned into
//!   io_uring entries for whichever ring the queue's thread runs;
//! - [`volume::Volume`] (volume.rs): a queue driven on a ring of its own, with blocking
//!   helpers and the chain operations;
//! - [`frontend`] (frontend.rs): the narrow async interface frontends serve;
//! - [`rebuild`] (rebuild.rs): adding a replica to a running volume, synced online;
//! - [`recovery`] (recovery.rs): reconciliation after a crash (write-intent records),
//!   and comparing replicas by checksum;
//! - [`control`] (control.rs): the engine's gRPC control service.
//!
//! It must never acknowledge a write that no healthy replica holds, serve a read from
//! a replica that may have missed writes, or hang an I/O when replicas vanish.

#![warn(missing_docs)]

pub mod control;
pub mod engine;
pub mod frontend;
pub mod queue;
pub mod rebuild;
pub mod recovery;
pub mod replica_set;
pub mod volume;

pub use engine::Engine;
pub use queue::{EngineQueue, Token};
