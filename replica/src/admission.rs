//! One admission for every data request, whichever door it comes in by: the data wire
//! ([`crate::server`]) or an in-process engine ([`crate::shared`]). Both call
//! `Replica::admit`, which applies the rules here and then the store's own checks; the
//! control service ([`crate::control`]) fences its calls through it too.
//!
//! The rules, in the order they are checked:
//! 1. the **generation fence**: a request of an older generation than the replica's is
//!    refused, since a newer engine owns the replica; one of a newer generation is
//!    refused until its engine has claimed the replica (a ping or a control call
//!    excepted: a new engine reaches a replica, and claims it, through those); one of
//!    the replica's own generation is refused unless it comes from the engine holding
//!    the claim (its identity: a data-wire connection names it with a `Hello`, a
//!    control call in its `horn-engine` header), so that two engines that reached the
//!    same generation on different replicas can never both write to one;
//! 2. a **write-only** replica (being rebuilt) refuses reads: it may lack data;
//! 3. the store refuses I/O off the sector size or past the end;
//! 4. **intent before write**: a write, discard or write-zeroes marks its write-intent
//!    region, durably, before its data may reach the disk (`intent.rs`).
//!
//! Floor: above `error` and `state`; below `replica.rs`. The rules are plain data in,
//! a verdict out ([`fence`]); a refusal says itself in the data wire's words
//! ([`Refusal::wire_status`] and its `Display`) and becomes a typed [`ReplicaError`]
//! for callers in the process.

use horn_proto::wire::Status;

use crate::error::ReplicaError;
use crate::state::Mode;

/// What a data request asks of the replica, as admission sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// A liveness check: fenced against older generations only.
    Ping,
    /// A read of `len` bytes at `offset`.
    Read {
        /// Start in bytes.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A write, discard or write-zeroes of `len` bytes at `offset`.
    Change {
        /// Start in bytes.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A flush.
    Flush,
    /// A control call (release, mode, snapshots, ...): fenced against older
    /// generations only, since a newer engine claims the replica through one.
    Control,
}

/// Who sends a request, as far as the replica can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Caller<'a> {
    /// An engine that named itself: a data-wire connection after its `Hello`, or a
    /// control call with the `horn-engine` header.
    Named(&'a str),
    /// A sender that did not name itself.
    Unnamed,
    /// The engine in this process that opened the replica and hosts it.
    Host,
}

/// Why a data request was refused before it reached the store's I/O.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    /// The request's generation is older than the replica's.
    #[error("generation {given} is older than the replica's {current}: a newer engine owns this replica")]
    Stale {
        /// The replica's generation.
        current: u64,
        /// The request's.
        given: u64,
    },
    /// The request's generation is newer than the replica's: not claimed yet.
    #[error("generation {given} has not been set on this replica (it is at {current}): claim it first")]
    Unclaimed {
        /// The replica's generation.
        current: u64,
        /// The request's.
        given: u64,
    },
    /// The request's generation is the replica's, but another engine holds the claim.
    #[error("generation {generation} on this replica belongs to engine {holder}, not to {caller}: another engine owns this replica")]
    Foreign {
        /// The replica's (and the request's) generation.
        generation: u64,
        /// The engine holding the claim.
        holder: String,
        /// Who sent the request.
        caller: String,
    },
    /// A read from a replica that is write-only while it is rebuilt.
    #[error("the replica is write-only while it is rebuilt: read from another replica")]
    WriteOnly,
    /// The store refused it (its range), or could not mark its write intent.
    #[error(transparent)]
    Store(#[from] ReplicaError),
}

/// The replica's side of the fence: its generation, the engine holding the claim at
/// it (none before the first claim), and its mode.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Holder<'a> {
    pub(crate) generation: u64,
    pub(crate) engine: Option<&'a str>,
    pub(crate) mode: Mode,
}

/// The generation fence and the mode rule for `access` from `caller`, an engine
/// holding generation `given`, on a replica standing as `holder`.
pub(crate) fn fence(
    holder: Holder<'_>,
    caller: Caller<'_>,
    given: u64,
    access: Access,
) -> Result<(), Refusal> {
    let current = holder.generation;
    if given < current {
        return Err(Refusal::Stale { current, given });
    }
    if given > current && !matches!(access, Access::Ping | Access::Control) {
        return Err(Refusal::Unclaimed { current, given });
    }
    if given == current && access != Access::Ping {
        if let Some(engine) = holder.engine.filter(|e| !e.is_empty()) {
            let named = match caller {
                Caller::Host => None,
                Caller::Named(n) if n == engine => None,
                Caller::Named(n) => Some(n.to_string()),
                Caller::Unnamed => Some("an unnamed sender".to_string()),
            };
            if let Some(caller) = named {
                return Err(Refusal::Foreign {
                    generation: current,
                    holder: engine.to_string(),
                    caller,
                });
            }
        }
    }
    let mode = holder.mode;
    if matches!(access, Access::Read { .. }) && mode == Mode::Wo {
        return Err(Refusal::WriteOnly);
    }
    Ok(())
}

impl Refusal {
    /// The data wire's status for the refusal (its message is the `Display` text).
    pub(crate) fn wire_status(&self) -> Status {
        match self {
            Refusal::Stale { .. } | Refusal::Foreign { .. } => Status::StaleGeneration,
            Refusal::Unclaimed { .. } | Refusal::WriteOnly => Status::Unavailable,
            Refusal::Store(e) => e.wire_status(),
        }
    }
}

impl From<Refusal> for ReplicaError {
    /// The typed error an in-process caller gets; its [`ReplicaError::wire_status`] is
    /// the refusal's.
    fn from(r: Refusal) -> ReplicaError {
        match r {
            Refusal::Stale { current, given } => ReplicaError::StaleGeneration { current, given },
            Refusal::Unclaimed { .. } | Refusal::WriteOnly => ReplicaError::Unavailable(r.to_string()),
            Refusal::Foreign { .. } => ReplicaError::Refused(r.to_string()),
            Refusal::Store(e) => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READ: Access = Access::Read { offset: 0, len: 4096 };
    const WRITE: Access = Access::Change { offset: 0, len: 4096 };

    /// The fence of a replica at `current` in `mode` claimed by engine "a", for a
    /// request from "a".
    fn fence_a(current: u64, mode: Mode, given: u64, access: Access) -> Result<(), Refusal> {
        let holder = Holder {
            generation: current,
            engine: Some("a"),
            mode,
        };
        fence(holder, Caller::Named("a"), given, access)
    }

    #[test]
    fn at_the_replicas_generation_only_the_claim_holder_is_admitted() {
        let holder = Holder {
            generation: 5,
            engine: Some("a"),
            mode: Mode::Rw,
        };
        for access in [READ, WRITE, Access::Flush, Access::Control] {
            assert!(fence(holder, Caller::Named("a"), 5, access).is_ok());
            assert!(fence(holder, Caller::Host, 5, access).is_ok());
            for caller in [Caller::Named("b"), Caller::Unnamed] {
                let e = fence(holder, caller, 5, access).unwrap_err();
                assert!(matches!(e, Refusal::Foreign { generation: 5, .. }), "{e}");
                assert_eq!(e.wire_status(), Status::StaleGeneration);
            }
            // A newer engine still reaches the replica to claim it.
            assert!(fence(holder, Caller::Named("b"), 6, Access::Control).is_ok());
        }
        assert!(fence(holder, Caller::Unnamed, 5, Access::Ping).is_ok());
        // Before any named claim, anyone at the replica's generation is admitted.
        let unclaimed = Holder {
            engine: None,
            ..holder
        };
        assert!(fence(unclaimed, Caller::Unnamed, 5, WRITE).is_ok());
    }

    #[test]
    fn older_generations_are_fenced_and_newer_ones_must_claim_first_but_may_ping_or_call() {
        for access in [Access::Ping, READ, WRITE, Access::Flush, Access::Control] {
            assert!(matches!(
                fence_a(5, Mode::Rw, 4, access),
                Err(Refusal::Stale { current: 5, given: 4 })
            ));
            assert!(fence_a(5, Mode::Rw, 5, access).is_ok());
        }
        for access in [READ, WRITE, Access::Flush] {
            assert!(matches!(
                fence_a(5, Mode::Rw, 6, access),
                Err(Refusal::Unclaimed { current: 5, given: 6 })
            ));
        }
        assert!(fence_a(5, Mode::Rw, 6, Access::Ping).is_ok());
        assert!(fence_a(5, Mode::Rw, 6, Access::Control).is_ok());
    }

    #[test]
    fn a_write_only_replica_refuses_reads_alone() {
        assert!(matches!(fence_a(5, Mode::Wo, 5, READ), Err(Refusal::WriteOnly)));
        for access in [Access::Ping, WRITE, Access::Flush, Access::Control] {
            assert!(fence_a(5, Mode::Wo, 5, access).is_ok());
        }
    }

    #[test]
    fn refusals_read_the_same_on_the_wire_and_in_the_process() {
        let cases = [
            (
                Refusal::Stale { current: 5, given: 4 },
                Status::StaleGeneration,
                "generation 4 is older than the replica's 5: a newer engine owns this replica",
            ),
            (
                Refusal::Unclaimed { current: 5, given: 6 },
                Status::Unavailable,
                "generation 6 has not been set on this replica (it is at 5): claim it first",
            ),
            (
                Refusal::WriteOnly,
                Status::Unavailable,
                "the replica is write-only while it is rebuilt: read from another replica",
            ),
        ];
        for (refusal, status, text) in cases {
            assert_eq!(
                (refusal.wire_status(), refusal.to_string().as_str()),
                (status, text)
            );
            let e = ReplicaError::from(refusal);
            assert_eq!(e.wire_status(), status, "{e}");
        }
        let stale = ReplicaError::from(Refusal::Stale { current: 5, given: 4 });
        assert!(matches!(
            stale,
            ReplicaError::StaleGeneration { current: 5, given: 4 }
        ));
        let store = Refusal::from(ReplicaError::OutOfRange {
            offset: 0,
            len: 1,
            size: 0,
        });
        assert_eq!(store.wire_status(), Status::OutOfRange);
    }
}
