//! What the frontend benchmarks (`ublk`, `iscsi`) share: one replica in a scratch
//! directory, a peer on a file in the same directory, and how long each side runs.

use std::path::PathBuf;

use clap::Args;
use horn_manager::format::parse_size;

/// Arguments every frontend benchmark takes.
#[derive(Debug, Args)]
pub struct FrontendRunArgs {
    /// Print one JSON object per result line.
    #[arg(long)]
    pub json: bool,
    /// Directory for the replica and the peer's file (one filesystem).
    #[arg(long, default_value = "/var/tmp")]
    pub dir: PathBuf,
    /// Volume size (and the peer's file size).
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    pub size: u64,
    /// Seconds per workload, for each side.
    #[arg(long, default_value_t = 10)]
    pub runtime: u64,
    /// The replica's cache mode (`hornd replica --cache`): direct or page.
    #[arg(long, default_value = "direct")]
    pub replica_cache: horn_replica::CacheMode,
}
