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
//! To come (issue 19): the S3 target, backups from a replica's snapshot diffs,
//! restore through an engine, verify and scrub, leases and garbage collection, DR
//! volumes, recurring jobs, and `hornctl backup`.
//!
//! Departures from the chosen crates: `lz4_flex` (pure Rust LZ4) and `zstd` compress
//! blocks, as the brief allows.

#![warn(missing_docs)]

pub mod format;
pub mod store;
