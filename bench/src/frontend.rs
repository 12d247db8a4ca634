//! What the frontend benchmarks (`ublk`, `iscsi`) share: one replica in a scratch
//! directory, a peer on a file in the same directory, and how long each side runs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use horn_engine::Engine;
use horn_manager::format::{human_bytes, parse_size};

use crate::volume::ReplicaProcess;

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

/// What a frontend benchmark serves: its scratch directory, the replica process in it,
/// and the engine on that replica.
pub struct FrontendVolume {
    /// Removed when dropped.
    pub scratch: tempfile::TempDir,
    /// Kept running while the volume is served.
    pub replica: ReplicaProcess,
    /// The volume's engine.
    pub engine: Arc<Engine>,
}

impl FrontendRunArgs {
    /// Makes a scratch directory in `--dir` (named for `bench`), starts one replica
    /// process of `--size` with `--replica-cache` there, and an engine on it.
    /// `peer` says what else goes in the directory, for the opening line.
    pub fn start_volume(&self, bench: &str, peer: &str) -> Result<FrontendVolume> {
        let scratch = tempfile::Builder::new()
            .prefix(&format!("horn-bench-{bench}-"))
            .tempdir_in(&self.dir)
            .with_context(|| format!("cannot make a scratch directory in {}", self.dir.display()))?;
        eprintln!(
            "one replica process of {} in {}{peer}",
            human_bytes(self.size),
            self.dir.display()
        );
        let replica =
            ReplicaProcess::start_with(&scratch.path().join("replica"), self.size, self.replica_cache)?;
        let (engine, _) = Engine::start(std::slice::from_ref(&replica.addr), Duration::from_secs(8))?;
        Ok(FrontendVolume {
            scratch,
            replica,
            engine,
        })
    }
}
