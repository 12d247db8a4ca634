//! # horn-replica: one full copy of a Horn volume on local disk
//!
//! A replica is a directory holding the volume as sparse files: a writable **head**
//! and a chain of read-only **snapshot layers** (differencing disks: each layer holds
//! only the blocks written while it was the head), plus `volume.json`, the metadata
//! that says how the layers stack. `docs/replica-format.md` specifies the format.
//!
//! What this crate owns:
//! - the on-disk format and its crash safety ([`meta`], [`zeros`], the chain operations);
//! - the in-memory [`index::BlockIndex`], rebuilt from the files at open, that maps each
//!   4 KiB block to the newest layer holding it, in memory proportional to fragmentation;
//! - the data path: reads, writes, flush, discard and write-zeroes through the replica's
//!   own io_uring ([`Replica::submit_read`] and friends, or the blocking `*_at` methods);
//! - sharing one replica with an engine in the same process ([`shared`]): the engine's
//!   queues do its file I/O on their own rings, with no socket hop;
//! - serving one replica: the data wire ([`server`], on the replica's own ring) and
//!   the gRPC control service ([`control`], run on the data loop's thread).
//!
//! ## The ladder
//!
//! Each module imports only from the floors below it; no two import each other. As in
//! cloud-hypervisor's `block` crate, the format and the I/O engine are separate floors
//! that never reach into each other, and one floor above composes them.
//!
//! 1. Leaves: [`error`], [`crash`]; the format's files and structures: [`extent`] (byte
//!    extents, block runs), [`meta`] (`volume.json`), [`state`] (`engine.json`),
//!    [`zeros`] (zero-extent logs), [`membership`] (the volume's membership record
//!    and the replica's rules for claims and records), [`intent`] (`intent.bits`), [`index`] (the extent
//!    index), [`layer`] (one layer file's descriptors).
//! 2. Rules and engines that know nothing of each other: `io.rs` (`OpRing`, the I/O
//!    engine: the ring, the op and entry slabs, completions; no layer, no index),
//!    `admission.rs` (the one admission of a data request: generation fence, mode,
//!    intent before write) and `sync_plan.rs` (a rebuild's plan and block diff, as
//!    plain data).
//! 3. [`chain`] (`SnapshotChain`, the format in memory: metadata, layer files, index,
//!    zero log; read planning, the blocking fill paths, the chain operations, the
//!    listings). It never touches the ring.
//! 4. [`replica`] ([`Replica`]): the chain and the ring composed, with the engine state
//!    and the intent log; it settles the ring before the chain changes, and lands the
//!    ring's ops on the chain.
//! 5. The doors: [`shared`] ([`SharedReplica`], in the engine's process), then
//!    `handle.rs` ([`server::ServerHandle`], other threads' way in), then [`server`]
//!    (the data wire) and [`sync`] (a rebuild's transfer), then [`control`] (gRPC).
//!
//! What it must never do: know about other replicas, or let a read return bytes that
//! no sequence of acknowledged operations wrote. Replication is the engine's job.
//!
//! Crates beyond the brief's list: `crc32c` (checksums of metadata records), `tokio`
//! (the runtime tonic's control service needs), `xxhash-rust` (XXH3 block checksums for
//! comparing replicas: many GB/s, 64 bits).
//!
//! ```no_run
//! use horn_replica::Replica;
//! let mut r = Replica::create("/var/lib/horn/replicas/vol1", 1 << 30, 512)?;
//! r.write_at(0, &[7u8; 4096])?;
//! r.snapshot("before-upgrade", &Default::default())?;
//! r.write_at(0, &[8u8; 4096])?;
//! r.revert("before-upgrade")?;
//! let mut buf = [0u8; 4096];
//! r.read_at(0, &mut buf)?;
//! assert_eq!(buf, [7u8; 4096]);
//! # Ok::<(), horn_replica::ReplicaError>(())
//! ```

#![warn(missing_docs)]

mod admission;
pub mod chain;
pub mod control;
pub mod crash;
pub mod error;
pub mod extent;
mod handle;
pub mod image;
pub mod index;
pub mod intent;
mod io;
pub mod layer;
pub mod membership;
pub mod meta;
pub mod replica;
pub mod server;
pub mod shared;
pub mod state;
pub mod sync;
mod sync_plan;
pub mod zeros;

pub use chain::{LayerExtents, LayerInfo, PurgeReport, ReplicaInfo};
pub use error::{ReplicaError, Result};
pub use extent::Extent;
pub use horn_uring::IoBuf;
pub use io::{Completion, INTERNAL_TAG};
pub use replica::{CacheMode, Replica};
pub use shared::SharedReplica;
