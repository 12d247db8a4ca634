//! A second authority on membership, beside the replicas: a manager's store.
//!
//! Standalone, the replicas alone keep a volume's membership, and the rules of
//! [`crate::membership`] make a change count once half the RW members store it and a
//! start serve only from a strict majority of them. Under a manager the engine is
//! given an [`Authority`] too, and then:
//! - a start first **begins its generation** at the authority
//!   ([`Authority::begin`]), which from then on takes records from that engine only
//!   (every older engine is fenced there), and hands back the newest record it holds;
//! - every record (the start's first, every drop, every rebuild's join and promotion)
//!   is **put** to the authority ([`Authority::put`]) before it counts, and a record
//!   the authority refuses faults the volume;
//! - in exchange, a change counts once the authority and one RW member have stored it
//!   (two of three replicas lost at once leave the volume going on with the third),
//!   and a start on the node where the volume's last engine ran (so that engine has
//!   stopped: a node runs one engine per volume) may serve from any RW member of the
//!   authority's record: that is how a manager salvages a volume whose replicas all
//!   failed, from the replicas that hold every acknowledged write and never from a
//!   stale one. A start on another node keeps the strict-majority rule, since the
//!   last engine may still run there, cut off, and serve reads under its lease.
//!
//! Records made under an authority name it ([`Record::authority`]); an engine
//! started without it refuses such a volume, since its records no longer satisfy the
//! replicas-only rules.

use std::time::Duration;

use horn_replica::membership::Record;

/// What the authority answered when an engine began its generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The generation begun: at least the one asked for, and above every generation
    /// begun there before.
    pub generation: u64,
    /// The newest record the authority holds of the volume (`None`: none yet).
    pub record: Option<Record>,
    /// The engine that began the previous generation ran on this engine's node, so it
    /// has stopped (or there was none).
    pub same_node: bool,
    /// The authority's name, stamped on every record ([`Record::authority`]).
    pub name: String,
    /// The key of the generation begun, for the replicas that hold the volume's
    /// secret ([`horn_proto::auth`]); `None` when the authority keeps no secret of
    /// the volume.
    pub key: Option<horn_proto::auth::GenerationKey>,
}

/// Why the authority did not take a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A newer generation has begun there: this engine must not go on.
    #[error("{0}")]
    Fenced(String),
    /// It could not be reached or failed: the call may be tried again.
    #[error("{0}")]
    Unavailable(String),
}

/// Where an engine under a manager records its membership (see the module's
/// documentation). The calls block; they are made off the data path (at start, and
/// by the keeper thread for changes).
pub trait Authority: Send + Sync + std::fmt::Debug {
    /// Begins a generation of at least `generation` for engine `engine`, fencing every
    /// older one.
    fn begin(&self, generation: u64, engine: &str) -> Result<Grant, Refusal>;

    /// Stores `record` durably: it must come from the engine whose generation runs
    /// there and be newer than the record held.
    fn put(&self, record: &Record) -> Result<(), Refusal>;
}

/// How long a change waits for an authority that cannot be reached before the volume
/// faults (completions are held meanwhile).
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Puts `record` to `authority`, trying again while it cannot be reached, for up to
/// `patience`; the last refusal otherwise.
pub fn put_patiently(authority: &dyn Authority, record: &Record, patience: Duration) -> Result<(), Refusal> {
    let since = std::time::Instant::now();
    loop {
        match authority.put(record) {
            Ok(()) => return Ok(()),
            Err(Refusal::Unavailable(why)) if since.elapsed() < patience => {
                tracing::warn!(reason = %why, "the membership authority did not take a record; trying again");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e),
        }
    }
}
