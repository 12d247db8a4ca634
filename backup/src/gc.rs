//! Deleting backups and collecting the blocks no backup names.
//!
//! Deleting a backup removes its manifest, nothing else: a block may be named by
//! other backups, of this volume or another. Collection is mark and sweep under a
//! lease of its own ([`crate::lease`]): no backup runs while it does, so no block a
//! backup is about to name disappears. It marks every block named by every manifest
//! of the target (a manifest it cannot read stops it: it never deletes what it
//! cannot prove unnamed), then lists the blocks one of their 256 prefixes at a time
//! and deletes the unmarked. An interrupted delete or collection leaves only
//! unnamed blocks, which the next collection removes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::format::{BlockId, Manifest};
use crate::lease::{Lease, LeaseKind};
use crate::store::ObjectStore;
use crate::BackupError;

/// Removes backup `name` of `volume` (its manifest). Its blocks stay until a
/// collection finds them unnamed.
pub fn delete_backup(store: &dyn ObjectStore, volume: &str, name: &str) -> Result<Manifest, BackupError> {
    let m = crate::read_backup(store, volume, name)?;
    store.delete(&Manifest::key(volume, name))?;
    Ok(m)
}

/// What a collection did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GcReport {
    /// Backups whose blocks were marked.
    pub backups: u64,
    /// Distinct blocks they name.
    pub referenced: u64,
    /// Blocks found in the target.
    pub blocks_seen: u64,
    /// Unnamed blocks deleted.
    pub deleted: u64,
    /// Expired leases removed.
    pub expired_leases: u64,
    /// Seconds it took.
    pub seconds: f64,
}

/// Collects the blocks no backup names. Waits up to `wait` for running backups to
/// finish (they hold the target), then fails naming them.
pub fn collect(store: Arc<dyn ObjectStore>, wait: Duration) -> Result<GcReport, BackupError> {
    let started = Instant::now();
    let lease = Lease::take(store.clone(), LeaseKind::Gc, "garbage collection", wait)?;
    let mut report = GcReport::default();
    // Mark.
    let mut named: BTreeSet<BlockId> = BTreeSet::new();
    for volume in crate::list_volumes(store.as_ref())? {
        for m in crate::list_backups(store.as_ref(), &volume)? {
            report.backups += 1;
            named.extend(m.referenced());
        }
    }
    report.referenced = named.len() as u64;
    // Sweep, one prefix at a time.
    for p in 0..=255u8 {
        let prefix = format!("blocks/{p:02x}/");
        let keys = store.list(&prefix)?;
        lease.check()?;
        for key in keys {
            let Some(id) = key
                .strip_prefix(&prefix)
                .and_then(|h| BlockId::from_hex(h).ok())
                .filter(|id| id.key() == key)
            else {
                continue;
            };
            report.blocks_seen += 1;
            if !named.contains(&id) {
                store.delete(&key)?;
                report.deleted += 1;
            }
        }
    }
    drop(lease);
    report.expired_leases = crate::lease::sweep_expired(store.as_ref())? as u64;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}
