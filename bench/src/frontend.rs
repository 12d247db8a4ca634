//! What the frontend benchmarks (`ublk`, `iscsi`) share: one replica in a scratch
//! directory (hosted in the engine's process, or a replica process of its own), a
//! peer on a file in the same directory, and how long each side runs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use horn_engine::Engine;
use horn_manager::daemon::{HostedReplica, HostedReplicaOptions};
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
    /// Where the replica runs: `engine` hosts it in the engine's process (`hornd
    /// engine --host-replica`: file I/O on the frontend's rings, as a target serving a
    /// local file does), `process` runs it as a replica process of its own (`hornd
    /// replica`: a socket hop each way).
    #[arg(long, default_value = "engine")]
    pub replica_host: ReplicaHost,
}

/// Where a benchmark's replica runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReplicaHost {
    /// In the engine's process.
    Engine,
    /// In a replica process of its own.
    Process,
}

impl std::fmt::Display for ReplicaHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReplicaHost::Engine => "engine",
            ReplicaHost::Process => "process",
        })
    }
}

/// A benchmark's replica, stopped when dropped (after the engine on it).
pub enum BenchReplica {
    /// A replica process (held for its `Drop`, which stops it).
    Process(#[allow(dead_code)] ReplicaProcess),
    /// Hosted in this process.
    Hosted(Option<HostedReplica>),
}

impl Drop for BenchReplica {
    fn drop(&mut self) {
        if let BenchReplica::Hosted(h) = self {
            if let Some(Err(e)) = h.take().map(HostedReplica::close) {
                eprintln!("closing the hosted replica: {e:#}");
            }
        }
    }
}

/// What a frontend benchmark serves: its scratch directory, the replica process in it,
/// and the engine on that replica.
pub struct FrontendVolume {
    /// Removed when dropped.
    pub scratch: tempfile::TempDir,
    /// Kept running while the volume is served.
    pub replica: BenchReplica,
    /// The volume's engine.
    pub engine: Arc<Engine>,
}

impl FrontendRunArgs {
    /// Makes a scratch directory in `--dir` (named for `bench`), starts one replica of
    /// `--size` with `--replica-cache` there (where `--replica-host` says), and an
    /// engine on it.
    /// `peer` says what else goes in the directory, for the opening line.
    pub fn start_volume(&self, bench: &str, peer: &str) -> Result<FrontendVolume> {
        let scratch = tempfile::Builder::new()
            .prefix(&format!("horn-bench-{bench}-"))
            .tempdir_in(&self.dir)
            .with_context(|| format!("cannot make a scratch directory in {}", self.dir.display()))?;
        eprintln!(
            "one replica of {} ({}, hosted in the {}) in {}{peer}",
            human_bytes(self.size),
            self.replica_cache,
            match self.replica_host {
                ReplicaHost::Engine => "engine's process",
                ReplicaHost::Process => "replica's own process",
            },
            self.dir.display()
        );
        let dir = scratch.path().join("replica");
        let (replica, addr) = match self.replica_host {
            ReplicaHost::Process => {
                let p = ReplicaProcess::start_with(&dir, self.size, self.replica_cache)?;
                let addr = p.addr.clone();
                (BenchReplica::Process(p), addr)
            }
            ReplicaHost::Engine => {
                let (h, addr) = HostedReplica::start(&HostedReplicaOptions {
                    dir,
                    control: "127.0.0.1:0".into(),
                    size: Some(self.size),
                    sector_size: 512,
                    cache: self.replica_cache,
                    secret: None,
                })?;
                (BenchReplica::Hosted(Some(h)), addr)
            }
        };
        let (engine, _) = horn_engine::start(std::slice::from_ref(&addr), Duration::from_secs(8))?;
        Ok(FrontendVolume {
            scratch,
            replica,
            engine,
        })
    }
}

/// Writes back and drops the page cache, so that Horn and its peer start a workload
/// with the same (cold) cache whatever wrote their data. Needs root; without it, says
/// so and goes on.
pub fn drop_page_cache() {
    // SAFETY: sync takes no arguments.
    unsafe { libc::sync() };
    if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", "3") {
        eprintln!(
            "note: cannot drop the page cache ({e}; it needs root): a side whose data is still cached reads faster"
        );
    }
}
