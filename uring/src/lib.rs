//! # horn-uring: the io_uring floor of Horn's data path
//!
//! Every loop on the data path (a replica's store and server, an engine queue on a
//! ring of its own, an iSCSI connection, a ublk queue) drives one io_uring. This
//! crate is what they share, so that none of them re-implements it:
//!
//! - [`Ring`] (ring.rs): setting a ring up for one thread, pushing entries (submitting
//!   when the submission queue is full), waiting with a deadline, reaping completions
//!   into a reused batch, and routing each by the [`Route`] and token folded into its
//!   user data;
//! - [`Waiter`] (wait.rs): the wait that polls briefly before it sleeps, for loops
//!   whose latency is a client's;
//! - [`IoBuf`] (buf.rs): the heap buffer, aligned for O_DIRECT, that an I/O owns while
//!   the kernel reads or writes it, and [`SpareBufs`], large ones kept for the next
//!   I/O that overwrites them wholly.
//!
//! It sits below every other crate of the workspace and knows nothing of replicas,
//! engines or protocols: it must never interpret an entry it pushes. The model is
//! cloud-hypervisor's `block` crate, whose one `AsyncIo` boundary no disk format
//! re-implements.
//!
//! Why a crate of its own: the replica, the engine and both frontends drive rings;
//! the lowest of them (the replica) owned the ring set-up before, so the frontends
//! imported the replica crate for it.

#![warn(missing_docs)]

pub mod buf;
pub mod ring;
pub mod wait;

pub use buf::{IoBuf, SpareBufs};
pub use ring::{push_or_submit, widen_io_workers, Cqe, Ring, Route, IO_WORKERS};
pub use wait::Waiter;
