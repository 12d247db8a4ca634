//! # horn-engine: one volume's engine
//!
//! The engine owns a volume's replica set: it fans writes out to every replica,
//! reads from one, drops replicas that fail, and coordinates snapshots. Its rules live
//! in [`replica_set::ReplicaSet`], a state machine with no I/O (events in, actions
//! out) that a deterministic simulator drives with seeded faults in the tests; the
//! io_uring driver that carries its actions over the data wire comes next.
//!
//! It must never acknowledge a write that no healthy replica holds, serve a read from
//! a replica that may have missed writes, or hang an I/O when replicas vanish.

#![warn(missing_docs)]

pub mod control;
pub mod replica_set;
pub mod volume;
