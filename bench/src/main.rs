//! # horn-bench: Horn's benchmarks
//!
//! Every performance figure Horn claims comes from here, measured against a peer in
//! the same run on the same machine (fio on a plain file, for the store), so that
//! anyone can rerun it and compare ratios rather than absolute numbers.
//!
//! - `horn-bench store`: the replica store driven in-process (4 KiB random read and
//!   write at QD32 and QD1, 1 MiB sequential) against fio on a plain file; the extent
//!   index's memory for two write patterns; opening and using long snapshot chains.
//! - `horn-bench volume`: a volume through its engine with 1 and 3 replicas as
//!   separate processes on loopback, against fio on plain files.
//! - `horn-bench backup`: backups and restores to Garage against restic and a raw
//!   upload, and an incremental backup's size and time.
//! - `horn-bench cluster`: the time from `hornctl volume create` to a volume attached
//!   and written, on a cluster of network namespaces (`horn-cluster`), against the
//!   same daemons started by hand.
//!
//! Output: one JSON object per line with `--json`, a table otherwise. This crate
//! depends on `rand` (random offsets) and `tempfile` (scratch directories); it must
//! never be needed by anything that ships.

mod backup;
mod cluster;
mod cpu;
mod fio;
mod frontend;
mod iscsi;
mod rebuild;
mod report;
mod store;
mod target;
mod ublk;
mod volume;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "horn-bench",
    version,
    about = "Benchmarks for Horn, each against a peer in the same run"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The replica store in-process against fio on a plain file, plus index memory
    /// and long chains.
    Store(store::StoreArgs),
    /// A volume through its engine, replicas as processes on loopback, against fio.
    Volume(volume::VolumeArgs),
    /// fio on /dev/ublkbN (one local replica) against fio on a kernel loop device
    /// (root and ublk; `tests/vm/run --bench` runs it in the VM).
    Ublk(ublk::UblkArgs),
    /// Horn's iSCSI target (one replica) against tgt on a file: iscsi-perf, and fio
    /// through qemu-nbd.
    Iscsi(iscsi::IscsiArgs),
    /// Rebuilds: a full one against cp --sparse=always of the same files, a delta one
    /// after 1% changed, and the foreground IOPS while one runs.
    Rebuild(rebuild::RebuildArgs),
    /// Backups and restores to Garage (S3) against restic and a raw upload of the
    /// same bytes; an incremental backup after 1% of the blocks changed.
    Backup(backup::BackupArgs),
    /// Time from `hornctl volume create` to attached and writable, on a cluster of
    /// network namespaces (root), against the same daemons started by hand.
    Cluster(cluster::ClusterArgs),
    /// Serves one replica (what `hornd replica` does); the volume benchmark starts
    /// its replica processes with it.
    #[command(hide = true)]
    ServeReplica {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long)]
        size: u64,
        #[arg(long)]
        listen: String,
        #[arg(long)]
        control: String,
        #[arg(long, default_value = "direct")]
        cache: horn_replica::CacheMode,
        /// The node's credentials: control over mutual TLS.
        #[arg(long)]
        credentials: Option<std::path::PathBuf>,
        /// The data wire over TLS (with --credentials).
        #[arg(long)]
        data_tls: bool,
    },
}

fn main() -> anyhow::Result<()> {
    // Quiet unless asked (HORN_LOG=info): the figures go to stdout, progress to stderr.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("HORN_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    match Cli::parse().command {
        Command::Store(args) => store::run(args),
        Command::Volume(args) => volume::run(args),
        Command::Ublk(args) => ublk::run(args),
        Command::Iscsi(args) => iscsi::run(args),
        Command::Rebuild(args) => rebuild::run(args),
        Command::Cluster(args) => cluster::run(args),
        Command::Backup(args) => backup::run(args),
        Command::ServeReplica {
            dir,
            size,
            listen,
            control,
            cache,
            credentials,
            data_tls,
        } => horn_manager::daemon::serve_replica(
            dir,
            listen,
            control,
            horn_manager::daemon::ReplicaOptions {
                size: Some(size),
                sector_size: 512,
                cache,
                credentials: credentials
                    .map(|d| horn_pki::LiveCredentials::open(&d, "node"))
                    .transpose()?,
                data_tls,
                ..Default::default()
            },
        ),
    }
}
