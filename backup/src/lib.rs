//! # horn-backup: backups of volumes to S3 or a mounted share
//!
//! A folder of its own because a backup target is a concept apart from the data path:
//! it outlives volumes, replicas and clusters, is shared by many of them, and has a
//! versioned format of its own (docs/backup-format.md).
//!
//! Built so far:
//! - [`format`]: version 1 of a target's format: blocks named by the SHA-256 of their
//!   content and compressed one by one (lz4 by default, zstd, none), and a manifest
//!   per backup listing every block of the volume image. Everything read is checked
//!   (a corrupt block is named; a newer format is refused with both versions named).
//! - [`store`]: a target's objects by key, behind [`store::ObjectStore`]; targets
//!   are named by URL (`file:///PATH`, `s3://BUCKET[/PREFIX]`); the file target
//!   writes each object whole (temporary file, sync, rename).
//!
//! - [`s3`]: the S3 target (aws-sdk-s3), and [`garage`]: a Garage server on loopback,
//!   the real S3 service the tests and benchmarks run against.
//! - [`lease`]: leases that keep garbage collection and backups apart.
//! - [`create`]: a backup of a snapshot read from a replica's files, incremental from
//!   the parent backup's snapshot.
//!
//! - [`restore`]: restoring a backup into a volume or a file, tolerant of bad blocks
//!   and resumable; verifying backups block by block.
//! - [`gc`]: deleting backups, and collecting the blocks none names.
//!
//! To come (issue 19): DR volumes, recurring jobs.
//!
//! Departures from the chosen crates: `lz4_flex` (pure Rust LZ4) and `zstd` compress
//! blocks, as the brief allows.

#![warn(missing_docs)]

pub mod create;
pub mod format;
pub mod garage;
pub mod gc;
pub mod lease;
pub mod restore;
pub mod s3;
pub mod store;

use format::{FormatError, Manifest};
use store::{ObjectStore, StoreError};

/// What went wrong with a backup operation.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The target failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Something read from the target is not what the format says.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// A lease could not be taken or was lost.
    #[error(transparent)]
    Lease(#[from] lease::LeaseError),
    /// Reading the volume failed.
    #[error("reading the volume: {0}")]
    Source(String),
    /// Writing the volume failed.
    #[error("writing the volume: {0}")]
    Sink(String),
    /// A request that cannot be done.
    #[error("{0}")]
    Invalid(String),
}

/// The backups of `volume` in a target, in name order.
pub fn list_backups(store: &dyn ObjectStore, volume: &str) -> Result<Vec<Manifest>, BackupError> {
    format::check_name("volume", volume)?;
    let mut out = Vec::new();
    for key in store.list(&Manifest::prefix(volume))? {
        if !key.ends_with(".json") {
            continue;
        }
        // Deleted between the listing and now: not a backup any more.
        let Some(bytes) = store.get(&key)? else { continue };
        out.push(Manifest::from_bytes(&format!("{}/{key}", store.url()), &bytes)?);
    }
    Ok(out)
}

/// The backups of `volume` in a target, oldest first (by time, then name): the
/// newest is the last.
pub fn backups_by_age(store: &dyn ObjectStore, volume: &str) -> Result<Vec<Manifest>, BackupError> {
    let mut all = list_backups(store, volume)?;
    all.sort_by(|a, b| (a.created_unix, &a.name).cmp(&(b.created_unix, &b.name)));
    Ok(all)
}

/// Backup `name` of `volume`, read and checked.
pub fn read_backup(store: &dyn ObjectStore, volume: &str, name: &str) -> Result<Manifest, BackupError> {
    format::check_name("volume", volume)?;
    format::check_name("backup", name)?;
    let key = Manifest::key(volume, name);
    let bytes = store.get(&key)?.ok_or_else(|| {
        BackupError::Invalid(format!(
            "{}: volume {volume} has no backup named {name}",
            store.url()
        ))
    })?;
    Ok(Manifest::from_bytes(&format!("{}/{key}", store.url()), &bytes)?)
}

/// The volumes with backups in a target (one listing of `volumes/` one level deep:
/// their backups are not listed).
pub fn list_volumes(store: &dyn ObjectStore) -> Result<Vec<String>, BackupError> {
    Ok(store.list_dirs("volumes/")?)
}
