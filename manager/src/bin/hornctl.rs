//! `hornctl`: the operator's command-line tool.
//!
//! `hornctl replica ...` manages replica directories on this machine directly (the
//! replica must not be served by a running process meanwhile; the store's lock refuses
//! it if it is). `hornctl engine ...` talks to a running engine's control service.
//! `hornctl ublk ...` serves volumes as ublk block devices and lists and deletes them.
//! `hornctl cluster|volume|node ...` talk to the manager (`hornd manager`).
//! Tables for people, `--json` for scripts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use horn_manager::format::{human_bytes, labels, layer_state, parse_size, table, utc_time};
use horn_proto::engine_control::{
    AddReplicaRequest, DropReplicaRequest, EngineDeleteRequest, EngineExpandRequest, EngineInfoRequest,
    EnginePurgeRequest, EngineRevertRequest, EngineSnapshotRequest, ListSnapshotsRequest, RebuildStatus,
    ReplicaStatus, VerifyRequest,
};
use horn_replica::{Extent, Replica};

#[derive(Parser)]
#[command(
    name = "hornctl",
    version,
    about = "Manage Horn volumes, replicas and snapshots"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work on a replica directory on this machine (offline).
    #[command(subcommand)]
    Replica(ReplicaCmd),
    /// Ask a running engine (`hornd engine`) about its volume, or change its snapshots.
    Engine {
        /// The engine's control address (`hornd engine --control`).
        #[arg(long, global = true, default_value = "127.0.0.1:9600")]
        engine: String,
        /// Print JSON instead of tables.
        #[arg(long, global = true)]
        json: bool,
        /// Seconds to wait for the engine to answer a call (a verify gets longer, by
        /// the volume's size); past it, the command fails naming the engine.
        #[arg(long, global = true, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
        timeout: u64,
        /// Call over mutual TLS with the credentials NAME (`--as`) in this directory,
        /// as an engine a node agent runs requires (`hornctl cluster credentials`
        /// issues them; `hornctl cluster init` wrote the admin's).
        #[arg(long, global = true, env = "HORN_CREDENTIALS", value_name = "DIR")]
        credentials: Option<std::path::PathBuf>,
        /// The credentials' NAME in `--credentials`.
        #[arg(long = "as", global = true, default_value = "admin")]
        identity: String,
        #[command(subcommand)]
        cmd: EngineCmd,
    },
    /// The cluster's identity and the manager's state (`hornd manager`).
    Cluster {
        #[command(flatten)]
        manager: horn_manager::ctl::ManagerAddr,
        #[command(subcommand)]
        cmd: horn_manager::ctl::ClusterCmd,
    },
    /// Secrets kept by the manager: volume keys (`hornctl volume create --encrypted`).
    Secret {
        #[command(flatten)]
        manager: horn_manager::ctl::ManagerAddr,
        #[command(subcommand)]
        cmd: horn_manager::ctl::SecretCmd,
    },
    /// The cluster's settings (scheduling rules, replica replenishment wait, node lease).
    Settings {
        #[command(flatten)]
        manager: horn_manager::ctl::ManagerAddr,
        #[command(subcommand)]
        cmd: horn_manager::ctl::SettingsCmd,
    },
    /// Volumes kept by the manager: create, list, show, attach, detach, delete.
    Volume {
        #[command(flatten)]
        manager: horn_manager::ctl::ManagerAddr,
        #[command(subcommand)]
        cmd: horn_manager::ctl::VolumeCmd,
    },
    /// The manager's nodes: list, show, cordon.
    Node {
        #[command(flatten)]
        manager: horn_manager::ctl::ManagerAddr,
        #[command(subcommand)]
        cmd: horn_manager::ctl::NodeCmd,
    },
    /// The cluster's backup targets, which volume backups and backup jobs use.
    BackupTarget {
        #[command(flatten)]
        manager: horn_manager::ctl::ManagerAddr,
        #[command(subcommand)]
        cmd: horn_manager::jobctl::BackupTargetCmd,
    },
    /// Recurring snapshot and backup jobs: create, list, history, run, delete.
    Job {
        #[command(flatten)]
        manager: horn_manager::ctl::ManagerAddr,
        #[command(subcommand)]
        cmd: horn_manager::jobctl::JobCmd,
    },
    /// Backups of volumes to a target (a directory or S3): create, list, info,
    /// delete, restore, verify, scrub, gc.
    Backup {
        #[command(flatten)]
        target: horn_manager::backupctl::TargetArgs,
        #[command(flatten)]
        engine: horn_manager::backupctl::EngineArgs,
        /// Print JSON instead of tables.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        cmd: horn_manager::backupctl::BackupCmd,
    },
    /// Serve volumes as ublk block devices on this machine (root, kernel with ublk_drv).
    Ublk {
        /// Print JSON instead of tables.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        cmd: UblkCmd,
    },
}

/// The engine daemon `hornctl ublk add` and `recover` start.
#[derive(Args)]
struct UblkEngine {
    /// A replica as DATA_ADDR,CONTROL_ADDR[,local]; repeat for each.
    #[arg(long = "replica", required_unless_present = "host_replica")]
    replicas: Vec<String>,
    /// Host the replica in this directory inside the engine's process (`hornd engine
    /// --host-replica`): its I/O runs on the device's queue rings, with no socket hop.
    #[arg(long, value_name = "DIR")]
    host_replica: Option<PathBuf>,
    /// Address for the hosted replica's control service.
    #[arg(long, default_value = "127.0.0.1:9502", requires = "host_replica")]
    host_replica_control: String,
    /// Create the hosted replica with this size if its directory holds none yet.
    #[arg(long, requires = "host_replica")]
    host_replica_size: Option<String>,
    /// The hosted replica's cache mode: direct or page.
    #[arg(long, default_value = "direct", requires = "host_replica")]
    host_replica_cache: horn_replica::CacheMode,
    /// The volume's name.
    #[arg(long, default_value = "volume")]
    name: String,
    /// Address for the engine's control service.
    #[arg(long, default_value = "127.0.0.1:9600")]
    control: String,
    /// Directory for the daemon's log (`ublk-NAME.log`, appended to and rotated at
    /// 16 MiB; on disk, so it outlives a reboot).
    #[arg(long, default_value = "/var/log/horn")]
    log_dir: PathBuf,
    /// Run the engine on its own, without `hornd supervise` starting it again (and
    /// reattaching it to the device) when it dies.
    #[arg(long)]
    no_supervise: bool,
    /// Start only if the replicas hold this volume (`hornd engine --volume`).
    #[arg(long)]
    volume: Option<String>,
}

#[derive(Subcommand)]
enum UblkCmd {
    /// Serve a volume as a new device: starts `hornd engine --frontend ublk` in the
    /// background and prints the device path once it exists.
    Add {
        #[command(flatten)]
        engine: UblkEngine,
        /// Queues (default: one per CPU).
        #[arg(long)]
        queues: Option<u16>,
        /// Commands in flight per queue.
        #[arg(long, default_value_t = 128)]
        depth: u16,
        /// How command data moves: auto, user or buffer (see `hornd engine --help`).
        #[arg(long, default_value = "auto")]
        copy: horn_ublk::CopyMode,
    },
    /// Reattach a new engine to device ID whose engine died: the device, and any
    /// filesystem mounted on it, stay; I/O waiting on it resumes.
    Recover {
        /// The device id (N of /dev/ublkbN).
        id: u32,
        #[command(flatten)]
        engine: UblkEngine,
    },
    /// Every ublk device on this machine.
    List,
    /// Delete a device (or every one); a mounted device is refused.
    Del {
        /// The device id (N of /dev/ublkbN).
        id: Option<u32>,
        /// Delete every ublk device.
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
}

#[derive(Subcommand)]
enum EngineCmd {
    /// The volume's size, generation, and replicas with their modes.
    Info {
        /// Also list the replicas a later one at the same address replaced, and every
        /// rebuild (by default: each replica once, with its last rebuild).
        #[arg(long)]
        history: bool,
    },
    /// Snapshot the volume on every replica (I/O is paused and flushed first).
    Snapshot {
        /// Snapshot name: 1-63 of A-Z a-z 0-9 . _ -
        name: String,
        /// A label KEY=VALUE; repeat for more.
        #[arg(long = "label", value_parser = horn_manager::ctl::parse_label)]
        labels: Vec<(String, String)>,
    },
    /// List the volume's snapshots.
    Snapshots,
    /// Mark a snapshot deleted on every replica.
    Delete {
        /// Snapshot name.
        name: String,
    },
    /// Fold deleted snapshots away on every replica.
    Purge,
    /// Discard the volume's head on every replica and start anew over NAME.
    Revert {
        /// Snapshot name.
        name: String,
    },
    /// Grow the volume on every replica.
    Expand {
        /// New size, e.g. 20G.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Compare every RW replica block by block (checksums of 4 KiB blocks) while the
    /// volume stays online; exits 1 and lists the differing ranges if any differ.
    Verify,
    /// Add a replica to the running volume and rebuild it online: it joins write-only,
    /// copies the snapshot layers from a healthy replica (only the blocks it lacks or
    /// holds differently), then turns RW. Shows progress until it is done.
    AddReplica {
        /// The replica as DATA_ADDR,CONTROL_ADDR[,local] (`hornd replica --listen`
        /// and `--control`); same size as the volume.
        replica: String,
        /// Return once the replica has joined instead of following the rebuild.
        #[arg(long)]
        no_wait: bool,
    },
    /// Drop a replica from the running volume now, as its timeout would later (say,
    /// its machine is known dead): the drop is recorded in the volume's membership
    /// before any I/O completes without it, and I/O waiting on it goes on. Rebuild it
    /// with `add-replica` to bring it back.
    DropReplica {
        /// The replica's data address (as `info` lists it).
        replica: String,
        /// Why, for the engine's log and `info`.
        #[arg(long, default_value = "dropped by an operator")]
        reason: String,
    },
}

#[derive(Args)]
struct Dir {
    /// The replica directory.
    dir: PathBuf,
}

#[derive(Subcommand)]
enum ReplicaCmd {
    /// Create an empty replica (the directory must be empty or absent).
    Create {
        #[command(flatten)]
        dir: Dir,
        /// Volume size, e.g. 10G (a multiple of 4 KiB).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Sector size: 512 or 4096.
        #[arg(long, default_value_t = 512)]
        sector_size: u32,
    },
    /// Show size, space used and every layer.
    Info {
        #[command(flatten)]
        dir: Dir,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Snapshot the head under NAME.
    Snapshot {
        #[command(flatten)]
        dir: Dir,
        /// Snapshot name: 1-63 of A-Z a-z 0-9 . _ -
        name: String,
        /// A label KEY=VALUE; repeat for more.
        #[arg(long = "label", value_parser = horn_manager::ctl::parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Mark snapshot NAME deleted; `purge` reclaims its space.
    Delete {
        #[command(flatten)]
        dir: Dir,
        /// Snapshot name.
        name: String,
    },
    /// Fold deleted snapshots away and reclaim their space.
    Purge {
        #[command(flatten)]
        dir: Dir,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Discard the head and start a new one on top of snapshot NAME.
    Revert {
        #[command(flatten)]
        dir: Dir,
        /// Snapshot name.
        name: String,
    },
    /// Grow the volume.
    Expand {
        #[command(flatten)]
        dir: Dir,
        /// New size, e.g. 20G.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Make this replica the only RW member of its volume, knowing that writes only
    /// the other replicas held are lost: the next engine serves from it and the others
    /// are rebuilt from it. For when a start is refused because too few of the
    /// replicas holding every acknowledged write can come back.
    Salvage {
        #[command(flatten)]
        dir: Dir,
        /// The highest generation any replica of the volume shows (`hornctl replica
        /// info`): the salvage goes above it.
        #[arg(long, default_value_t = 0)]
        above: u64,
        /// The replica's data address, for messages.
        #[arg(long, default_value = "salvaged")]
        name: String,
    },
    /// List allocated extents: of the whole chain, of one layer, or changed between two.
    Extents {
        #[command(flatten)]
        dir: Dir,
        /// Only what changed after this snapshot.
        #[arg(long)]
        from: Option<String>,
        /// Up to this snapshot instead of the head.
        #[arg(long)]
        to: Option<String>,
        /// Only this layer's own extents (a snapshot name, or "head").
        #[arg(long, conflicts_with_all = ["from", "to"])]
        layer: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn open(dir: &Dir) -> Result<Replica> {
    Replica::open(&dir.dir).with_context(|| format!("cannot open replica {}", dir.dir.display()))
}

fn print_extents(extents: &[Extent], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(extents)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = extents
        .iter()
        .map(|e| vec![e.offset.to_string(), e.len.to_string(), human_bytes(e.len)])
        .collect();
    print!("{}", table(&["OFFSET", "LENGTH", "SIZE"], &rows));
    let total: u64 = extents.iter().map(|e| e.len).sum();
    println!("{} extents, {}", extents.len(), human_bytes(total));
    Ok(())
}

fn run(cmd: ReplicaCmd) -> Result<()> {
    match cmd {
        ReplicaCmd::Create {
            dir,
            size,
            sector_size,
        } => {
            Replica::create(&dir.dir, size, sector_size)
                .with_context(|| format!("cannot create replica {}", dir.dir.display()))?
                .close()?;
            println!("created replica {} ({})", dir.dir.display(), human_bytes(size));
        }
        ReplicaCmd::Salvage { dir, above, name } => {
            let mut r = open(&dir)?;
            let record = r
                .salvage((above, u64::MAX), &name)
                .with_context(|| format!("cannot salvage replica {}", dir.dir.display()))?;
            r.close()?;
            println!(
                "replica {} is now the only RW member of volume {} (generation {}): the next \
                 engine serves from it; rebuild the others from it",
                dir.dir.display(),
                record.volume,
                record.generation
            );
        }
        ReplicaCmd::Info { dir, json } => {
            let info = open(&dir)?.info()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
                return Ok(());
            }
            println!(
                "size {} ({} bytes), sector size {}, {} layers in the chain, {} on disk, index {}",
                human_bytes(info.size),
                info.size,
                info.sector_size,
                info.chain_length,
                human_bytes(info.used_bytes),
                human_bytes(info.index_bytes as u64)
            );
            let rows: Vec<Vec<String>> = info
                .layers
                .iter()
                .map(|l| {
                    vec![
                        l.id.to_string(),
                        l.name.clone().unwrap_or_else(|| "(head)".into()),
                        l.parent.clone().unwrap_or_else(|| "-".into()),
                        l.created.map(utc_time).unwrap_or_else(|| "-".into()),
                        layer_state(l.removed, l.in_chain).into(),
                        human_bytes(l.used_bytes),
                        labels(&l.labels),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &["ID", "NAME", "PARENT", "CREATED", "STATE", "USED", "LABELS"],
                    &rows
                )
            );
        }
        ReplicaCmd::Snapshot { dir, name, labels } => {
            let mut r = open(&dir)?;
            let labels: BTreeMap<String, String> = labels.into_iter().collect();
            r.snapshot(&name, &labels)?;
            r.close()?;
            println!("snapshot {name} taken");
        }
        ReplicaCmd::Delete { dir, name } => {
            open(&dir)?.delete_snapshot(&name)?;
            println!("snapshot {name} deleted; run `hornctl replica purge` to reclaim its space");
        }
        ReplicaCmd::Purge { dir, json } => {
            let report = open(&dir)?.purge()?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
                return Ok(());
            }
            if report.purged.is_empty() {
                println!("nothing to purge");
            } else {
                println!("purged {}", report.purged.join(", "));
            }
            for (name, why) in &report.kept {
                println!("kept deleted snapshot {name}: {why}");
            }
        }
        ReplicaCmd::Revert { dir, name } => {
            let mut r = open(&dir)?;
            r.revert(&name)?;
            r.close()?;
            println!("reverted to snapshot {name}");
        }
        ReplicaCmd::Expand { dir, size } => {
            let mut r = open(&dir)?;
            r.expand(size)?;
            r.close()?;
            println!("expanded to {} ({size} bytes)", human_bytes(size));
        }
        ReplicaCmd::Extents {
            dir,
            from,
            to,
            layer,
            json,
        } => {
            let mut r = open(&dir)?;
            if let Some(layer) = layer {
                let which = (layer != "head").then_some(layer.as_str());
                let ext = r.layer_extents(which)?;
                if json {
                    println!("{}", serde_json::to_string(&ext)?);
                } else {
                    println!("data:");
                    print_extents(&ext.data, false)?;
                    println!("zeroed over older layers:");
                    print_extents(&ext.zeros, false)?;
                }
            } else {
                print_extents(&r.changed_extents(from.as_deref(), to.as_deref())?, json)?;
            }
        }
    }
    Ok(())
}

fn rebuild_json(r: &RebuildStatus) -> serde_json::Value {
    serde_json::json!({
        "id": r.id, "replica": r.replica, "source": r.source, "state": r.state, "error": r.error,
        "bytes_done": r.bytes_done, "bytes_total": r.bytes_total, "bytes_copied": r.bytes_copied,
        "rate_bytes_per_second": r.rate_bytes_per_second,
        "eta_seconds": (r.eta_seconds >= 0.0).then_some(r.eta_seconds),
        "elapsed_seconds": r.elapsed_seconds,
    })
}

fn rebuild_line(r: &RebuildStatus) -> String {
    let rate = format!("{}/s", human_bytes(r.rate_bytes_per_second as u64));
    match r.state.as_str() {
        "syncing" => {
            let pct = if r.bytes_total > 0 {
                100.0 * r.bytes_done as f64 / r.bytes_total as f64
            } else {
                0.0
            };
            let eta = if r.eta_seconds >= 0.0 {
                format!("ETA {:.0} s", r.eta_seconds)
            } else {
                "ETA -".into()
            };
            format!(
                "rebuilding {} from {}: {} of {} ({pct:.0}%), {} copied, {rate}, {eta}",
                r.replica,
                if r.source.is_empty() { "-" } else { &r.source },
                human_bytes(r.bytes_done),
                human_bytes(r.bytes_total),
                human_bytes(r.bytes_copied),
            )
        }
        "done" => format!(
            "rebuilt {} from {} in {:.1} s: {} gone through, {} copied, {rate}; RW",
            r.replica,
            r.source,
            r.elapsed_seconds,
            human_bytes(r.bytes_total),
            human_bytes(r.bytes_copied)
        ),
        _ => format!(
            "rebuild of {} failed after {:.1} s: {}",
            r.replica, r.elapsed_seconds, r.error
        ),
    }
}

fn run_engine(
    addr: String,
    tls: Option<tonic::transport::ClientTlsConfig>,
    json: bool,
    timeout: u64,
    cmd: EngineCmd,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let timeout = std::time::Duration::from_secs(timeout);
        let mut c = horn_manager::ctl::engine_client(&addr, tls.clone(), timeout).await?;
        let status = |s: tonic::Status| {
            if s.message().contains("Timeout expired") {
                anyhow::anyhow!(
                    "the engine at {addr} did not answer within {} s (--timeout)",
                    timeout.as_secs()
                )
            } else {
                anyhow::anyhow!("{}", s.message())
            }
        };
        match cmd {
            EngineCmd::Info { history } => {
                let info = c.info(EngineInfoRequest {}).await.map_err(status)?.into_inner();
                let replicas: Vec<&ReplicaStatus> = info
                    .replicas
                    .iter()
                    .filter(|r| history || !r.superseded)
                    .collect();
                // By default each replica's last rebuild only.
                let rebuilds: Vec<&RebuildStatus> = info
                    .rebuilds
                    .iter()
                    .filter(|r| {
                        history
                            || !info
                                .rebuilds
                                .iter()
                                .any(|l| l.replica == r.replica && l.id > r.id)
                    })
                    .collect();
                if json {
                    let replicas: Vec<serde_json::Value> = replicas
                        .iter()
                        .map(|r| {
                            serde_json::json!({
                                "address": r.address, "mode": r.mode,
                                "failure": (!r.failure.is_empty()).then_some(&r.failure),
                                "superseded": r.superseded,
                            })
                        })
                        .collect();
                    println!(
                        "{}",
                        serde_json::json!({
                            "size": info.size, "sector_size": info.sector_size,
                            "generation": info.generation, "replicas": replicas, "skipped": info.skipped,
                            "rebuilds": rebuilds.iter().map(|r| rebuild_json(r)).collect::<Vec<_>>(),
                            "faulted": (!info.faulted.is_empty()).then_some(&info.faulted),
                            "read_lease_left_ms": info.read_lease_left_ms,
                        })
                    );
                    return Ok(());
                }
                println!(
                    "volume {} ({} bytes), sector size {}, generation {}",
                    human_bytes(info.size),
                    info.size,
                    info.sector_size,
                    info.generation
                );
                let rows: Vec<Vec<String>> = replicas
                    .iter()
                    .map(|r| {
                        let mut why = r.failure.clone();
                        if r.superseded {
                            why = format!("(replaced) {why}");
                        }
                        vec![r.address.clone(), r.mode.clone(), why]
                    })
                    .collect();
                if rows.iter().all(|r| r[2].is_empty()) {
                    let rows: Vec<Vec<String>> = rows.into_iter().map(|r| r[..2].to_vec()).collect();
                    print!("{}", table(&["REPLICA", "MODE"], &rows));
                } else {
                    print!("{}", table(&["REPLICA", "MODE", "FAILURE"], &rows));
                }
                if !info.faulted.is_empty() {
                    println!("FAULTED (every I/O fails): {}", info.faulted);
                } else if info.read_lease_left_ms == 0 {
                    println!("read lease lapsed: reads wait until half the RW replicas renew it");
                } else {
                    println!("read lease: {} ms left", info.read_lease_left_ms);
                }
                for s in &info.skipped {
                    println!("left out at start: {s}");
                }
                for r in rebuilds {
                    if history {
                        println!("rebuild {}: {}", r.id, rebuild_line(r));
                    } else {
                        println!("{}", rebuild_line(r));
                    }
                }
            }
            EngineCmd::DropReplica { replica, reason } => {
                let dropped = c
                    .drop_replica(DropReplicaRequest {
                        replica: replica.clone(),
                        reason,
                    })
                    .await
                    .map_err(status)?
                    .into_inner()
                    .dropped;
                if !dropped {
                    anyhow::bail!("the volume has no live replica at {replica} (see `hornctl engine info`)");
                }
                if json {
                    println!("{}", serde_json::json!({ "dropped": replica }));
                } else {
                    println!("replica {replica} dropped from the volume");
                }
            }
            EngineCmd::AddReplica { replica, no_wait } => {
                let rebuild = c
                    .add_replica(AddReplicaRequest {
                        replica: replica.clone(),
                    })
                    .await
                    .map_err(status)?
                    .into_inner()
                    .rebuild_id;
                let data = replica.split(',').next().unwrap_or_default().to_string();
                if !json {
                    println!("replica {data} joined the volume write-only; rebuilding");
                }
                if no_wait {
                    return Ok(());
                }
                let mut last = String::new();
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    let info = c.info(EngineInfoRequest {}).await.map_err(status)?.into_inner();
                    let Some(r) = info.rebuilds.iter().find(|r| r.id == rebuild) else {
                        anyhow::bail!(
                            "the engine reports no rebuild {rebuild} (of {data}); was it restarted?"
                        );
                    };
                    if json {
                        println!("{}", rebuild_json(r));
                    } else {
                        let line = rebuild_line(r);
                        if line != last {
                            println!("{line}");
                            last = line;
                        }
                    }
                    match r.state.as_str() {
                        "done" => break,
                        "failed" => anyhow::bail!("the rebuild of {data} failed: {}", r.error),
                        _ => {}
                    }
                }
            }
            EngineCmd::Snapshot { name, labels } => {
                let req = EngineSnapshotRequest {
                    name: name.clone(),
                    labels: labels.into_iter().collect(),
                };
                c.snapshot(req).await.map_err(status)?;
                println!("snapshot {name} taken on every replica");
            }
            EngineCmd::Snapshots => {
                let list = c
                    .list_snapshots(ListSnapshotsRequest {})
                    .await
                    .map_err(status)?
                    .into_inner();
                horn_manager::format::print_snapshots(&list, json)?;
                if !json && !list.differences.is_empty() {
                    eprintln!("warning: the replicas' chains differ:");
                    for d in &list.differences {
                        eprintln!("  {d}");
                    }
                }
            }
            EngineCmd::Delete { name } => {
                c.delete_snapshot(EngineDeleteRequest { name: name.clone() })
                    .await
                    .map_err(status)?;
                println!("snapshot {name} deleted; run `hornctl engine purge` to reclaim its space");
            }
            EngineCmd::Purge => {
                let list = c.purge(EnginePurgeRequest {}).await.map_err(status)?.into_inner();
                horn_manager::format::print_snapshots(&list, json)?;
            }
            EngineCmd::Revert { name } => {
                c.revert(EngineRevertRequest { name: name.clone() })
                    .await
                    .map_err(status)?;
                println!("reverted the volume to snapshot {name}");
            }
            EngineCmd::Expand { size } => {
                let info = c
                    .expand(EngineExpandRequest { size })
                    .await
                    .map_err(status)?
                    .into_inner();
                println!(
                    "volume expanded to {} ({} bytes)",
                    human_bytes(info.size),
                    info.size
                );
            }
            EngineCmd::Verify => {
                // Reading every replica whole takes time: 1 s more per 32 MiB.
                let size = c
                    .info(EngineInfoRequest {})
                    .await
                    .map_err(status)?
                    .into_inner()
                    .size;
                let mut c = horn_manager::ctl::engine_client(
                    &addr,
                    tls.clone(),
                    timeout + std::time::Duration::from_secs(size >> 25),
                )
                .await?;
                let r = c.verify(VerifyRequest {}).await.map_err(status)?.into_inner();
                horn_manager::format::print_verify(&r, json)?;
            }
        }
        Ok(())
    })
}

fn run_ublk(json: bool, cmd: UblkCmd) -> Result<()> {
    match cmd {
        UblkCmd::Add {
            engine,
            queues,
            depth,
            copy,
        } => {
            horn_ublk::check_available()?;
            let mut args = vec!["--depth".to_string(), depth.to_string()];
            args.extend(["--copy".to_string(), copy.to_string()]);
            if let Some(q) = queues {
                args.extend(["--queues".to_string(), q.to_string()]);
            }
            let path = start_engine(&engine, &args)?;
            if json {
                println!("{}", serde_json::json!({ "path": path, "volume": engine.name }));
            } else {
                println!("{path}");
            }
        }
        UblkCmd::Recover { id, engine } => {
            horn_ublk::check_available()?;
            let args = vec!["--recover".to_string(), id.to_string()];
            let path = start_engine(&engine, &args)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "path": path, "volume": engine.name, "recovered": true })
                );
            } else {
                println!("{path} recovered");
            }
        }
        UblkCmd::List => {
            let devices = horn_ublk::list()?;
            if json {
                println!("{}", serde_json::to_string(&devices)?);
            } else {
                let rows: Vec<Vec<String>> = devices
                    .iter()
                    .map(|d| {
                        vec![
                            d.id.to_string(),
                            d.path.clone(),
                            d.volume.clone(),
                            d.state.clone(),
                            d.queues.to_string(),
                            d.depth.to_string(),
                            d.pid.to_string(),
                            d.copy.to_string(),
                            d.features.join(","),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(
                        &["ID", "PATH", "VOLUME", "STATE", "QUEUES", "DEPTH", "PID", "COPY", "FEATURES"],
                        &rows
                    )
                );
            }
        }
        UblkCmd::Del { id, all } => {
            let ids: Vec<u32> = match (id, all) {
                (Some(id), _) => vec![id],
                (None, true) => horn_ublk::list()?.iter().map(|d| d.id).collect(),
                (None, false) => anyhow::bail!("name a device id, or --all"),
            };
            for id in ids {
                delete_device(id)?;
                println!("deleted /dev/ublkb{id}");
            }
        }
    }
    Ok(())
}

/// Deletes ublk device `id`, failing with a message rather than hanging when its
/// engine does not exit: the driver removes the device only once its server has
/// closed it. (Leaving the process ends the wait the driver was in.)
fn delete_device(id: u32) -> Result<()> {
    const WAIT: std::time::Duration = std::time::Duration::from_secs(30);
    let pid = horn_ublk::list()?.into_iter().find(|d| d.id == id).map(|d| d.pid);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(horn_ublk::delete(id));
    });
    match rx.recv_timeout(WAIT) {
        Ok(done) => Ok(done?),
        Err(_) => anyhow::bail!(
            "/dev/ublkb{id} is stopped, but its engine{} has not exited after {} s, so the driver \
             has not removed it yet (it will once the engine exits; see the engine's log)",
            pid.filter(|&p| p > 0)
                .map(|p| format!(" (pid {p})"))
                .unwrap_or_default(),
            WAIT.as_secs()
        ),
    }
}

/// Starts `hornd engine --frontend ublk ARGS` in its own process group, under `hornd
/// supervise` unless `--no-supervise`, appending to `log_dir/ublk-NAME.log`, and
/// waits for it to name its device.
fn start_engine(engine: &UblkEngine, args: &[String]) -> Result<String> {
    let UblkEngine {
        replicas,
        host_replica,
        host_replica_control,
        host_replica_size,
        host_replica_cache,
        name,
        control,
        log_dir,
        no_supervise,
        volume,
    } = engine;
    use std::os::unix::process::CommandExt;

    let log_path = log_dir.join(format!("ublk-{name}.log"));
    let log = horn_manager::logfile::open_append(&log_path)?;
    // What this start writes begins here: earlier runs' lines stay above it.
    let from = log.metadata().map_or(0, |m| m.len());
    let hornd = std::env::current_exe()?.with_file_name("hornd");
    let mut cmd = std::process::Command::new(&hornd);
    if !no_supervise {
        cmd.arg("--log-file")
            .arg(&log_path)
            .args(["supervise", "--"])
            .arg(&hornd);
    }
    cmd.arg("--log-file").arg(&log_path);
    cmd.args([
        "engine",
        "--frontend",
        "ublk",
        "--name",
        name,
        "--control",
        control,
    ])
    .args(args);
    for r in replicas {
        cmd.args(["--replica", r]);
    }
    if let Some(volume) = volume {
        cmd.args(["--volume", volume]);
    }
    if let Some(dir) = host_replica {
        cmd.arg("--host-replica").arg(dir);
        cmd.args(["--host-replica-control", host_replica_control]);
        cmd.args(["--host-replica-cache", &host_replica_cache.to_string()]);
        if let Some(size) = host_replica_size {
            cmd.args(["--host-replica-size", size]);
        }
    }
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", hornd.display()))?;
    let since_start = || {
        use std::io::{Read, Seek};
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&log_path) {
            let _ = f.seek(std::io::SeekFrom::Start(from));
            let _ = f.read_to_string(&mut text);
        }
        text
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let text = since_start();
        if let Some(path) = text
            .lines()
            .find_map(|l| l.strip_prefix("hornd engine: serving /dev/"))
            .and_then(|rest| rest.split_whitespace().next())
        {
            return Ok(format!("/dev/{path}"));
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!(
                "hornd engine exited ({status}) before serving a device:\n{}",
                text.trim_end()
            );
        }
        if std::time::Instant::now() > deadline {
            // SAFETY: kill takes no pointers; the group is the one the child leads.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            anyhow::bail!(
                "hornd engine did not serve a device within 60 s; its log: {}",
                log_path.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HORN_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Replica(cmd) => run(cmd),
        Command::Engine {
            engine,
            json,
            timeout,
            credentials,
            identity,
            cmd,
        } => (|| {
            let tls = credentials
                .map(|dir| {
                    horn_pki::Credentials::load(&dir, &identity)
                        .map(|c| c.client_tls(horn_pki::NODE_NAME))
                        .with_context(|| {
                            format!("cannot read the credentials {identity} in {}", dir.display())
                        })
                })
                .transpose()?;
            run_engine(engine, tls, json, timeout, cmd)
        })(),
        Command::Ublk { json, cmd } => run_ublk(json, cmd),
        Command::Backup {
            target,
            engine,
            json,
            cmd,
        } => horn_manager::backupctl::run_backup(target, engine, json, cmd),
        Command::Cluster { manager, cmd } => horn_manager::ctl::run_cluster(manager, cmd),
        Command::Volume { manager, cmd } => horn_manager::ctl::run_volume(manager, cmd),
        Command::Node { manager, cmd } => horn_manager::ctl::run_node(manager, cmd),
        Command::Settings { manager, cmd } => horn_manager::ctl::run_settings(manager, cmd),
        Command::Secret { manager, cmd } => horn_manager::ctl::run_secret(manager, cmd),
        Command::BackupTarget { manager, cmd } => horn_manager::jobctl::run_backup_target(manager, cmd),
        Command::Job { manager, cmd } => horn_manager::jobctl::run_job(manager, cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hornctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
