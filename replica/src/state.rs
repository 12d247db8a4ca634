//! `engine.json`: which engine may write to the replica, and whether one has it open.
//!
//! The **generation** is the replica-set generation of the newest engine that has
//! claimed the replica. It only grows, and it is durable before the claim is
//! acknowledged, so an engine that comes back after a partition with an older
//! generation is refused (the data wire answers its requests with "stale generation").
//! The **dirty** flag is set while an engine holds the replica open and cleared on an
//! orderly close: a dirty replica after a crash may differ from its peers where writes
//! were in flight. The **mode** is `rw`, or `wo` while the replica is being rebuilt:
//! it takes writes but refuses reads, because it may lack data its peers have; it is
//! durable so a rebuilding replica that restarts still refuses reads.
//!
//! It also holds the replica's place in its volume's membership
//! ([`crate::membership`]): the replica's own identity (given at creation), the volume
//! it belongs to (none while blank), the identity of the engine holding the claim, and
//! the newest membership record an engine gave it, and how long a read lease its
//! holder asked for.
//!
//! Same encoding as `volume.json` (JSON line, CRC-32C line), replaced atomically. A
//! missing file means generation 0, clean, blank.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ReplicaError, Result};
use crate::membership::{Record, Standing};
use crate::meta::{verify_checksum, with_checksum, write_atomically};

/// File name inside the replica directory.
pub const STATE_FILE: &str = "engine.json";

/// Whether the replica serves reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Reads and writes.
    #[default]
    Rw,
    /// Writes only: being rebuilt, may lack data.
    Wo,
}

/// The replica's engine-facing state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineState {
    /// The replica's own identity (empty in files written before identities: one is
    /// given at the next open).
    #[serde(default)]
    pub id: String,
    /// The volume this replica belongs to; `None` while blank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// Identity of the engine holding the claim at `generation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    /// The newest membership record an engine stored on this replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<Record>,
    /// Highest replica-set generation seen.
    pub generation: u64,
    /// An engine holds the replica open (or crashed while it did).
    pub dirty: bool,
    /// Read-write, or write-only while being rebuilt.
    #[serde(default)]
    pub mode: Mode,
    /// The read lease the holder's claim asked for, in milliseconds: after a restart
    /// while an engine held the replica open, no other engine's claim is taken for
    /// this long (the holder's last renewal may have been just before the restart).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lease_ms: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl EngineState {
    /// Reads the state of the replica in `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(STATE_FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(ReplicaError::io("read", path, e)),
        };
        let corrupt = |reason: String| ReplicaError::CorruptMetadata {
            path: path.clone(),
            reason,
        };
        let body = verify_checksum(&text).map_err(corrupt)?;
        serde_json::from_slice(body).map_err(|e| corrupt(format!("not valid engine state JSON: {e}")))
    }

    /// The replica's side of membership.
    pub fn standing(&self) -> Standing {
        Standing {
            volume: self.volume.clone(),
            generation: self.generation,
            engine: self.engine.clone(),
            record: self.record.clone(),
            lease: None,
        }
    }

    /// Replaces the state atomically and durably.
    pub fn store(&self, dir: &Path) -> Result<()> {
        write_atomically(dir, STATE_FILE, &with_checksum(self))
    }
}
