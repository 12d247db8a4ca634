//! The engine's vocabulary: the names every other module of the crate speaks in, and
//! the ones its users see. The ground floor: this module imports nothing of the
//! crate's own, so any module may import it without a circle.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use horn_uring::IoBuf;

/// Where a replica is served.
#[derive(Debug, Clone)]
pub struct ReplicaAddr {
    /// Data wire address (`hornd replica --listen`), or `inproc:DIR` for a replica
    /// hosted in the engine's own process.
    pub data: String,
    /// Control service address (`hornd replica --control`).
    pub control: String,
    /// On this node: preferred for reads.
    pub local: bool,
}

impl std::str::FromStr for ReplicaAddr {
    type Err = String;

    /// `DATA,CONTROL` or `DATA,CONTROL,local`.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(',').collect();
        match parts.as_slice() {
            [data, control] | [data, control, "local"] if !data.is_empty() && !control.is_empty() => {
                Ok(ReplicaAddr {
                    data: data.to_string(),
                    control: control.to_string(),
                    local: parts.len() == 3,
                })
            }
            _ => Err(format!("replica {s:?} is not DATA_ADDR,CONTROL_ADDR[,local]")),
        }
    }
}

/// Why an I/O failed, as the replication rules decide it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    /// No replica in RW mode is left.
    #[error("no healthy replica left: every replica has failed")]
    NoHealthyReplica,
    /// The replicas refused the request itself.
    #[error("refused by the replica: {0}")]
    Refused(String),
    /// A newer engine has taken over the volume.
    #[error("a newer engine has taken over this volume; this engine is fenced")]
    Fenced,
    /// A replica was dropped and the drop could not be recorded on a majority of the
    /// replicas: nothing more is acknowledged.
    #[error("the volume is faulted: {0}")]
    Faulted(String),
}

/// Why the engine failed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// No replica could be used at start.
    #[error("no usable replica: {0}")]
    NoReplica(String),
    /// The replica set failed the I/O.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The request was refused before it was sent.
    #[error("{0}")]
    BadRequest(String),
    /// A control call failed.
    #[error("control call to {replica} failed: {message}")]
    Control {
        /// The replica's control address.
        replica: String,
        /// The gRPC code it answered with.
        code: tonic::Code,
        /// What it said.
        message: String,
    },
    /// The engine's own ring or sockets failed.
    #[error("{op}: {source}")]
    System {
        /// What was being done.
        op: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

/// Result alias for the engine.
pub type Result<T, E = VolumeError> = std::result::Result<T, E>;

/// A finished I/O.
#[derive(Debug)]
pub struct VolumeCompletion {
    /// The caller's tag.
    pub tag: u64,
    /// Outcome.
    pub result: Result<()>,
    /// The caller's buffer (reads: holding the data).
    pub buf: Option<IoBuf>,
}

/// A chain operation run on every replica of the volume.
#[derive(Debug, Clone)]
pub enum ChainOp {
    /// Read the chain (from one replica).
    Info,
    /// Take a snapshot.
    Snapshot {
        /// Its name.
        name: String,
        /// Its labels.
        labels: HashMap<String, String>,
    },
    /// Mark a snapshot deleted.
    Delete(String),
    /// Fold deleted snapshots away.
    Purge,
    /// Put a new head over a snapshot.
    Revert(String),
    /// Grow the volume to this many bytes.
    Expand(u64),
}

impl ChainOp {
    /// The operation in words, for messages.
    pub fn describe(&self) -> String {
        match self {
            ChainOp::Info => "reading the chain".into(),
            ChainOp::Snapshot { name, .. } => format!("snapshot {name:?}"),
            ChainOp::Delete(name) => format!("deleting snapshot {name:?}"),
            ChainOp::Purge => "the purge".into(),
            ChainOp::Revert(name) => format!("the revert to {name:?}"),
            ChainOp::Expand(size) => format!("the expansion to {size} bytes"),
        }
    }
}

/// What starting the volume found.
#[derive(Debug, Clone)]
pub struct StartReport {
    /// Generation this engine claimed the replicas with.
    pub generation: u64,
    /// The volume's identity.
    pub volume: String,
    /// This engine's identity.
    pub engine: String,
    /// Volume size in bytes.
    pub size: u64,
    /// Sector size in bytes.
    pub sector_size: u32,
    /// Replicas in use.
    pub used: Vec<String>,
    /// Replicas left out, and why.
    pub skipped: Vec<(String, String)>,
    /// What reconciling the replicas found and copied.
    pub reconciled: ReconcileReport,
}

/// What reconciliation found and did.
#[derive(Debug, Clone, Default)]
pub struct ReconcileReport {
    /// Regions marked on at least one replica, compared.
    pub regions: u64,
    /// Bytes compared.
    pub bytes_compared: u64,
    /// Blocks found different on some replica (counted once per replica).
    pub blocks_differing: u64,
    /// Bytes copied from the chosen replica to the others.
    pub bytes_copied: u64,
    /// The replica the others were made equal to.
    pub source: Option<String>,
}

/// What a verify of the volume found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Bytes of the volume compared on every replica.
    pub bytes_compared: u64,
    /// The replicas compared (data addresses); differences are against the first.
    pub replicas: Vec<String>,
    /// Runs of blocks that differ, in offset order (at most [`MAX_DIFFERENCES`]).
    pub differences: Vec<Difference>,
    /// Bytes that differ on some replica, all of them counted.
    pub differing_bytes: u64,
}

/// Differences a verify report lists; the byte count covers the rest.
pub const MAX_DIFFERENCES: usize = 1000;

/// Blocks of one range whose checksum differs from the first replica's, as runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// Byte offset of the run.
    pub offset: u64,
    /// Byte length of the run.
    pub len: u64,
    /// Data addresses of the replicas whose blocks differ from the first one's.
    pub replicas: Vec<String>,
}

/// Where a rebuild is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebuildState {
    /// Copying layers.
    Syncing,
    /// The replica is RW.
    Done,
    /// Given up; why.
    Failed(String),
}

/// One rebuild's progress, for `hornctl engine info` and `add-replica`.
#[derive(Debug, Clone)]
pub struct RebuildStatus {
    /// This engine's number for the rebuild, from 1 in the order they began.
    pub id: u64,
    /// The replica being rebuilt (data address).
    pub replica: String,
    /// The replica it copies from (data address).
    pub source: String,
    /// Where it is.
    pub state: RebuildState,
    /// Bytes of the source's layers gone through.
    pub done: u64,
    /// Bytes of the source's layers in all.
    pub total: u64,
    /// Bytes copied (the rest the replica held already).
    pub copied: u64,
    /// Blocks partial writes touched during the sync, copied whole at the end.
    pub suspects: u64,
    /// When it began.
    pub started: Instant,
    /// How long it took, once over.
    pub elapsed: Option<Duration>,
}

impl RebuildStatus {
    /// Bytes per second so far.
    pub fn rate(&self) -> f64 {
        let secs = self
            .elapsed
            .unwrap_or_else(|| self.started.elapsed())
            .as_secs_f64();
        if secs > 0.0 {
            self.done as f64 / secs
        } else {
            0.0
        }
    }

    /// Seconds left at the rate so far, while syncing.
    pub fn eta(&self) -> Option<f64> {
        let rate = self.rate();
        (self.state == RebuildState::Syncing && rate > 0.0)
            .then(|| self.total.saturating_sub(self.done) as f64 / rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_addresses_parse_and_bad_ones_are_named() {
        let a: ReplicaAddr = "127.0.0.1:9500,127.0.0.1:9501,local".parse().unwrap();
        assert_eq!(
            (a.data.as_str(), a.control.as_str(), a.local),
            ("127.0.0.1:9500", "127.0.0.1:9501", true)
        );
        let b: ReplicaAddr = "inproc:/d,127.0.0.1:9501".parse().unwrap();
        assert!(!b.local);
        for bad in ["", "only-one", ",x", "a,b,remote", "a,b,local,extra"] {
            let e = bad.parse::<ReplicaAddr>().unwrap_err();
            assert!(e.contains("DATA_ADDR,CONTROL_ADDR"), "{bad}: {e}");
        }
    }
}
