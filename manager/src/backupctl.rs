//! `hornctl backup ...`: backups of volumes to a target (a directory or S3).
//!
//! `create` and `restore` go through a volume's engine (`--engine`): it snapshots
//! the volume and has a replica read the snapshot; it restores into its volume. The
//! others read and write the target directly: `list`, `info`, `verify`, `scrub`,
//! `delete`, `gc`, and `restore --to-file` (a backup as a raw image file).
//! Progress bars on a terminal, `--json` for scripts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use horn_backup::format::Manifest;
use horn_backup::restore::{restore, verify, FileSink, RestoreOptions, RestoreReport, VerifyReport};
use horn_backup::s3::S3Settings;
use horn_backup::store::{open_target, ObjectStore};
use horn_proto::control::{BackupProgress, BackupRequest, BackupTarget};
use horn_proto::engine_control::RestoreRequest;
use serde_json::json;

use crate::format::{human_bytes, parse_size, table, utc_time};

/// Where backups are kept, and how to reach it.
#[derive(Args, Debug, Clone)]
pub struct TargetArgs {
    /// The backup target: file:///PATH (a local disk or a mounted NFS/CIFS share) or
    /// s3://BUCKET[/PREFIX].
    #[arg(long, global = true, env = "HORN_BACKUP_TARGET")]
    pub target: Option<String>,
    /// S3: the service's endpoint (e.g. http://127.0.0.1:3900); default AWS.
    #[arg(long, global = true, env = "AWS_ENDPOINT_URL")]
    pub s3_endpoint: Option<String>,
    /// S3: the region (Garage's is `garage`).
    #[arg(long, global = true, env = "AWS_REGION")]
    pub s3_region: Option<String>,
    /// S3: a file of AWS_ACCESS_KEY_ID=... and AWS_SECRET_ACCESS_KEY=... lines
    /// (otherwise those variables of the environment).
    #[arg(long, global = true, value_name = "FILE")]
    pub s3_credentials_file: Option<PathBuf>,
}

impl TargetArgs {
    /// The target as the wire carries it to an engine or replica.
    pub fn wire(&self) -> Result<BackupTarget> {
        let url = self.target.clone().ok_or_else(|| {
            anyhow!("name the backup target: --target file:///PATH or s3://BUCKET[/PREFIX]")
        })?;
        let s3 = self.s3()?;
        Ok(BackupTarget {
            url,
            endpoint: s3.endpoint,
            region: s3.region,
            access_key: s3.access_key,
            secret_key: s3.secret_key,
        })
    }

    /// The S3 settings the flags give, the credentials file's keys, and the
    /// environment's `AWS_*` for what they leave out.
    pub(crate) fn s3(&self) -> Result<S3Settings> {
        let mut s = S3Settings {
            endpoint: self.s3_endpoint.clone().unwrap_or_default(),
            region: self.s3_region.clone().unwrap_or_default(),
            ..Default::default()
        };
        if let Some(path) = &self.s3_credentials_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the S3 credentials file {}", path.display()))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (k, v) = line
                    .split_once('=')
                    .ok_or_else(|| anyhow!("{} line {}: not KEY=VALUE", path.display(), n + 1))?;
                match k.trim() {
                    "AWS_ACCESS_KEY_ID" | "access_key" => s.access_key = v.trim().to_string(),
                    "AWS_SECRET_ACCESS_KEY" | "secret_key" => s.secret_key = v.trim().to_string(),
                    other => bail!(
                        "{} line {}: {other:?} is not AWS_ACCESS_KEY_ID or AWS_SECRET_ACCESS_KEY",
                        path.display(),
                        n + 1
                    ),
                }
            }
        }
        Ok(s.with_env())
    }

    /// Opens the target here.
    pub fn open(&self) -> Result<Arc<dyn ObjectStore>> {
        let t = self.wire()?;
        let s = S3Settings {
            endpoint: t.endpoint,
            region: t.region,
            access_key: t.access_key,
            secret_key: t.secret_key,
        };
        Ok(Arc::from(open_target(&t.url, &s)?))
    }
}

/// The engine a backup or restore goes through.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// The engine's control address (`hornd engine --control`).
    #[arg(long, global = true, default_value = "127.0.0.1:9600")]
    pub engine: String,
    /// Call the engine over mutual TLS with the credentials NAME (`--as`) in DIR.
    #[arg(long, global = true, env = "HORN_CREDENTIALS", value_name = "DIR")]
    pub credentials: Option<PathBuf>,
    /// The credentials' NAME in `--credentials`.
    #[arg(long = "as", global = true, default_value = "admin")]
    pub identity: String,
}

/// `hornctl backup` subcommands.
#[derive(Subcommand, Debug)]
pub enum BackupCmd {
    /// Back up a volume through its engine: a snapshot is taken (unless one is named)
    /// and a replica reads it; only blocks changed since the last backup are read.
    Create {
        /// The backup's name: 1-63 of A-Z a-z 0-9 . _ -
        name: String,
        /// The volume's name in the target (default: the engine's volume).
        #[arg(long)]
        volume: Option<String>,
        /// Back up this existing snapshot instead of taking one.
        #[arg(long)]
        snapshot: Option<String>,
        /// Read and send every block, replacing any the target holds damaged.
        #[arg(long)]
        full: bool,
        /// lz4, zstd or none.
        #[arg(long, default_value = "lz4")]
        compression: String,
        /// Block size for the volume's first backup (64K to 64M, a power of two).
        #[arg(long, value_parser = parse_size, default_value = "2M")]
        block_size: u64,
        /// Blocks read and sent at once.
        #[arg(long, default_value_t = 4)]
        parallel: u32,
        /// A label KEY=VALUE; repeat for more.
        #[arg(long = "label", value_parser = crate::ctl::parse_label)]
        labels: Vec<(String, String)>,
    },
    /// List the volumes with backups, or a volume's backups.
    List {
        /// The volume (default: every volume with backups).
        volume: Option<String>,
    },
    /// One backup: its snapshot, size, blocks, parent, labels.
    Info {
        /// The volume.
        volume: String,
        /// The backup.
        name: String,
    },
    /// Delete a backup, then collect the blocks no other backup names.
    Delete {
        /// The volume.
        volume: String,
        /// The backup.
        name: String,
        /// Leave the collection to a later `hornctl backup gc`.
        #[arg(long)]
        no_gc: bool,
    },
    /// Restore a backup into a volume through its engine (`--engine`), or into a raw
    /// image file (`--to-file`). Bad blocks are reported with their offsets and the
    /// rest restored; exits 1 if there were any.
    Restore {
        /// The backed-up volume.
        volume: String,
        /// The backup.
        name: String,
        /// Write a raw image file instead of a volume.
        #[arg(long, value_name = "PATH")]
        to_file: Option<PathBuf>,
        /// Stop at the first bad block.
        #[arg(long)]
        strict: bool,
        /// Blocks fetched at once (each up to two blocks in memory).
        #[arg(long, default_value_t = 16)]
        parallel: u32,
        /// The volume holds this older backup of VOL already (a standby): only the
        /// blocks that differ from it are compared and fetched.
        #[arg(long, value_name = "BACKUP")]
        since: Option<String>,
    },
    /// Keep a standby volume (the one `--engine` serves) up to date with VOL's
    /// backups: each new backup is applied, fetching only the blocks that differ from
    /// the one applied last, which the standby records as a snapshot labelled
    /// `horn.backup`. `--once` applies the newest and exits: a last `--once` then
    /// stopping is how a standby is activated.
    Follow {
        /// The source volume, as its backups name it.
        volume: String,
        /// Seconds between looks at the target.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
        interval: u64,
        /// Apply the newest backup (if not applied yet) and exit.
        #[arg(long)]
        once: bool,
        /// Blocks fetched at once.
        #[arg(long, default_value_t = 16)]
        parallel: u32,
    },
    /// Fetch and re-hash every block of a backup; exits 1 if any is missing or bad.
    Verify {
        /// The volume.
        volume: String,
        /// The backup.
        name: String,
    },
    /// Verify every backup of the target (each block once).
    Scrub,
    /// Delete the blocks no backup names (waits for running backups).
    Gc,
}

pub(crate) fn bar(json: bool, what: &str) -> indicatif::ProgressBar {
    if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(0);
    b.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} blocks, {per_sec}, eta {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    b.set_message(what.to_string());
    b
}

/// Follows a progress stream to its report.
pub(crate) async fn follow(
    mut stream: tonic::Streaming<BackupProgress>,
    bar: &indicatif::ProgressBar,
) -> Result<String> {
    while let Some(msg) = stream.message().await.map_err(|s| anyhow!("{}", s.message()))? {
        if !msg.report_json.is_empty() {
            bar.finish_and_clear();
            return Ok(msg.report_json);
        }
        bar.set_length(msg.total);
        bar.set_position(msg.done);
    }
    bar.finish_and_clear();
    bail!("the stream ended without a report (the engine or replica stopped?)")
}

/// Prints a backup's report (JSON, as the engine sends it) for people or as JSON.
pub(crate) fn print_backup(report: &str, json: bool) -> Result<()> {
    let r: serde_json::Value = serde_json::from_str(report)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "backup {}: {} of {} blocks read ({}), {} sent ({}), {} already in the target, {} of zeros, in {:.1} s (incremental from: {})",
            r["name"].as_str().unwrap_or_default(),
            r["blocks_read"],
            r["blocks"],
            human_bytes(r["read_bytes"].as_u64().unwrap_or(0)),
            r["blocks_uploaded"],
            human_bytes(r["uploaded_bytes"].as_u64().unwrap_or(0)),
            r["blocks_deduplicated"],
            r["zero_blocks"],
            r["seconds"].as_f64().unwrap_or(0.0),
            r["parent"].as_str().unwrap_or("none, a full read"),
        );
    }
    Ok(())
}

fn summary_row(m: &Manifest) -> Vec<String> {
    let stored = m.blocks.iter().filter(|b| b.is_some()).count();
    vec![
        m.name.clone(),
        m.snapshot.clone(),
        utc_time(m.created_unix),
        human_bytes(m.size),
        human_bytes(u64::from(m.block_size)),
        format!("{stored}/{}", m.blocks.len()),
        m.parent.clone().unwrap_or_else(|| "-".into()),
    ]
}

fn summary_json(m: &Manifest) -> serde_json::Value {
    json!({
        "volume": m.volume,
        "name": m.name,
        "snapshot": m.snapshot,
        "created_unix": m.created_unix,
        "size_bytes": m.size,
        "block_size": m.block_size,
        "compression": m.compression,
        "blocks": m.blocks.len(),
        "stored_blocks": m.blocks.iter().filter(|b| b.is_some()).count(),
        "distinct_blocks": m.referenced().len(),
        "parent": m.parent,
        "labels": m.labels,
        "format": m.format,
    })
}

fn print_restore(r: &RestoreReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        println!(
            "restored backup {}: {} blocks fetched ({} read from the target), {} already in place, {} zeroed, in {:.1} s",
            r.backup,
            r.restored,
            human_bytes(r.fetched_bytes),
            r.already_there,
            r.zeroed,
            r.seconds
        );
        for b in &r.bad {
            println!("bad: {b}");
        }
    }
    if !r.bad.is_empty() {
        bail!(
            "{} block(s) could not be restored (listed above); every other block was",
            r.bad.len()
        );
    }
    Ok(())
}

fn print_verify(r: &VerifyReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        println!(
            "{} backup(s), {} distinct blocks fetched and checked ({}) in {:.1} s",
            r.backups,
            r.blocks,
            human_bytes(r.fetched_bytes),
            r.seconds
        );
        for (backup, b) in &r.bad {
            println!("bad in {backup}: {b}");
        }
    }
    if !r.bad.is_empty() {
        bail!(
            "{} block(s) missing or damaged: a `hornctl backup create --full` of the volume sends them again",
            r.bad.len()
        );
    }
    Ok(())
}

/// Runs `hornctl backup CMD`.
pub fn run_backup(target: TargetArgs, engine: EngineArgs, json: bool, cmd: BackupCmd) -> Result<()> {
    match cmd {
        BackupCmd::Create {
            name,
            volume,
            snapshot,
            full,
            compression,
            block_size,
            parallel,
            labels,
        } => {
            crate::backups::parse_compression(&compression).map_err(|e| anyhow!(e))?;
            let block_size = u32::try_from(block_size)
                .ok()
                .filter(|b| horn_backup::format::check_block_size(*b).is_ok())
                .ok_or_else(|| anyhow!("--block-size must be a power of two from 64K to 64M"))?;
            let req = BackupRequest {
                snapshot: snapshot.unwrap_or_default(),
                volume: volume.unwrap_or_default(),
                name: name.clone(),
                target: Some(target.wire()?),
                block_size,
                compression,
                full,
                parallel,
                labels: labels
                    .into_iter()
                    .collect::<BTreeMap<_, _>>()
                    .into_iter()
                    .collect(),
            };
            let report = with_engine(&engine, |mut c| async move {
                let stream = c
                    .backup(req)
                    .await
                    .map_err(|s| anyhow!("{}", s.message()))?
                    .into_inner();
                follow(stream, &bar(json, &format!("backup {name}"))).await
            })?;
            print_backup(&report, json)
        }
        BackupCmd::List { volume } => {
            let store = target.open()?;
            match volume {
                None => {
                    let vols = horn_backup::list_volumes(store.as_ref())?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&vols)?);
                    } else {
                        for v in vols {
                            println!("{v}");
                        }
                    }
                }
                Some(v) => {
                    let all = horn_backup::backups_by_age(store.as_ref(), &v)?;
                    if json {
                        let rows: Vec<_> = all.iter().map(summary_json).collect();
                        println!("{}", serde_json::to_string_pretty(&rows)?);
                    } else {
                        let rows: Vec<Vec<String>> = all.iter().map(summary_row).collect();
                        print!(
                            "{}",
                            table(
                                &["NAME", "SNAPSHOT", "CREATED", "SIZE", "BLOCK", "STORED", "PARENT"],
                                &rows
                            )
                        );
                    }
                }
            }
            Ok(())
        }
        BackupCmd::Info { volume, name } => {
            let store = target.open()?;
            let m = horn_backup::read_backup(store.as_ref(), &volume, &name)?;
            let j = summary_json(&m);
            if json {
                println!("{}", serde_json::to_string_pretty(&j)?);
            } else {
                for (k, v) in j.as_object().expect("an object") {
                    println!(
                        "{k:16} {}",
                        v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())
                    );
                }
            }
            Ok(())
        }
        BackupCmd::Delete { volume, name, no_gc } => {
            let store = target.open()?;
            horn_backup::gc::delete_backup(store.as_ref(), &volume, &name)?;
            let gc = if no_gc {
                None
            } else {
                Some(horn_backup::gc::collect(store, Duration::from_secs(600))?)
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({"deleted": name, "gc": gc}))?
                );
            } else {
                println!("deleted backup {name} of {volume}");
                if let Some(g) = gc {
                    println!(
                        "collected {} unnamed block(s) of {} ({} named by {} backup(s))",
                        g.deleted, g.blocks_seen, g.referenced, g.backups
                    );
                }
            }
            Ok(())
        }
        BackupCmd::Gc => {
            let g = horn_backup::gc::collect(target.open()?, Duration::from_secs(600))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&g)?);
            } else {
                println!(
                    "collected {} unnamed block(s) of {} ({} named by {} backup(s)), {} expired lease(s), in {:.1} s",
                    g.deleted, g.blocks_seen, g.referenced, g.backups, g.expired_leases, g.seconds
                );
            }
            Ok(())
        }
        BackupCmd::Verify { volume, name } => {
            let store = target.open()?;
            let m = horn_backup::read_backup(store.as_ref(), &volume, &name)?;
            let b = bar(json, &format!("verify {name}"));
            let r = verify(store.as_ref(), std::slice::from_ref(&m), 8, &|d, t| {
                b.set_length(t);
                b.set_position(d);
            });
            b.finish_and_clear();
            print_verify(&r, json)
        }
        BackupCmd::Scrub => {
            let store = target.open()?;
            let mut all = Vec::new();
            for v in horn_backup::list_volumes(store.as_ref())? {
                all.extend(horn_backup::list_backups(store.as_ref(), &v)?);
            }
            let b = bar(json, "scrub");
            let r = verify(store.as_ref(), &all, 8, &|d, t| {
                b.set_length(t);
                b.set_position(d);
            });
            b.finish_and_clear();
            print_verify(&r, json)
        }
        BackupCmd::Follow {
            volume,
            interval,
            once,
            parallel,
        } => loop {
            let applied = follow_once(&target, &engine, &volume, parallel, json)?;
            if once {
                if applied.is_none() {
                    if json {
                        println!("{}", json!({"applied": null}));
                    } else {
                        println!("the standby holds the newest backup of {volume} already");
                    }
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_secs(interval));
        },
        BackupCmd::Restore {
            volume,
            name,
            to_file: Some(path),
            strict,
            parallel,
            since: _,
        } => {
            let store = target.open()?;
            let m = horn_backup::read_backup(store.as_ref(), &volume, &name)?;
            let mut sink = FileSink::create(&path, m.size)?;
            let b = bar(json, &format!("restore {name}"));
            let opts = RestoreOptions {
                strict,
                parallel: parallel.clamp(1, 64) as usize,
                ..Default::default()
            };
            let r = restore(store.as_ref(), &m, &mut sink, &opts, &|d, t| {
                b.set_length(t);
                b.set_position(d);
            })?;
            b.finish_and_clear();
            print_restore(&r, json)
        }
        BackupCmd::Restore {
            volume,
            name,
            to_file: None,
            strict,
            parallel,
            since,
        } => {
            let req = RestoreRequest {
                target: Some(target.wire()?),
                volume,
                backup: name.clone(),
                strict,
                parallel,
                since: since.unwrap_or_default(),
            };
            let report = with_engine(&engine, |mut c| async move {
                let stream = c
                    .restore(req)
                    .await
                    .map_err(|s| anyhow!("{}", s.message()))?
                    .into_inner();
                follow(stream, &bar(json, &format!("restore {name}"))).await
            })?;
            print_restore(&serde_json::from_str(&report)?, json)
        }
    }
}

/// The label a standby's snapshot carries: the backup it holds.
pub const APPLIED_LABEL: &str = "horn.backup";

/// Applies the newest backup of `volume` to the standby `engine` serves, if it is
/// not the one applied last; returns its name if one was applied.
fn follow_once(
    target: &TargetArgs,
    engine: &EngineArgs,
    volume: &str,
    parallel: u32,
    json: bool,
) -> Result<Option<String>> {
    let store = target.open()?;
    let backups = horn_backup::backups_by_age(store.as_ref(), volume)?;
    let Some(newest) = backups.last().map(|m| m.name.clone()) else {
        return Ok(None);
    };
    // The backup applied last: the newest snapshot of the standby labelled so.
    let snaps = with_engine(engine, |mut c| async move {
        Ok(
            c.list_snapshots(horn_proto::engine_control::ListSnapshotsRequest {})
                .await
                .map_err(|s| anyhow!("{}", s.message()))?
                .into_inner()
                .snapshots,
        )
    })?;
    let applied = snaps
        .iter()
        .filter(|s| s.in_chain && !s.removed)
        .filter_map(|s| Some((s.created, s.name.clone(), s.labels.get(APPLIED_LABEL)?.clone())))
        .max();
    if applied.as_ref().is_some_and(|(_, _, b)| *b == newest) {
        return Ok(None);
    }
    let since = applied
        .as_ref()
        .map(|(_, _, b)| b.clone())
        .filter(|b| backups.iter().any(|m| &m.name == b))
        .unwrap_or_default();
    let req = RestoreRequest {
        target: Some(target.wire()?),
        volume: volume.to_string(),
        backup: newest.clone(),
        strict: true,
        parallel,
        since: since.clone(),
    };
    let what = format!("apply {newest}");
    let report = with_engine(engine, |mut c| async move {
        let stream = c
            .restore(req)
            .await
            .map_err(|s| anyhow!("{}", s.message()))?
            .into_inner();
        follow(stream, &bar(json, &what)).await
    })?;
    let r: RestoreReport = serde_json::from_str(&report)?;
    // Recorded on the standby itself, so that any later `follow` knows; the marker
    // of the backup applied before goes.
    let marker = format!(
        "standby-{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    let labels = [(APPLIED_LABEL.to_string(), newest.clone())]
        .into_iter()
        .collect();
    let old = applied.map(|(_, name, _)| name);
    with_engine(engine, |mut c| async move {
        c.snapshot(horn_proto::engine_control::EngineSnapshotRequest { name: marker, labels })
            .await
            .map_err(|s| anyhow!("{}", s.message()))?;
        if let Some(old) = old {
            c.delete_snapshot(horn_proto::engine_control::EngineDeleteRequest { name: old })
                .await
                .map_err(|s| anyhow!("{}", s.message()))?;
        }
        Ok(())
    })?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&json!({"applied": r.backup, "since": since, "report": r}))?
        );
    } else {
        println!(
            "applied backup {} ({} blocks fetched, {} already in place, {} zeroed; since {})",
            r.backup,
            r.restored,
            r.already_there,
            r.zeroed,
            if since.is_empty() {
                "nothing: a full compare"
            } else {
                &since
            }
        );
    }
    Ok(Some(r.backup))
}

/// Runs `f` with a client of the engine, on a runtime of its own. The calls have no
/// deadline: a backup or restore takes as long as its data does.
fn with_engine<T, F, Fut>(engine: &EngineArgs, f: F) -> Result<T>
where
    F: FnOnce(
        horn_proto::engine_control::engine_control_client::EngineControlClient<tonic::transport::Channel>,
    ) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let tls = engine
        .credentials
        .as_ref()
        .map(|dir| {
            horn_pki::Credentials::load(dir, &engine.identity)
                .map(|c| c.client_tls(horn_pki::NODE_NAME))
                .with_context(|| {
                    format!(
                        "cannot read the credentials {} in {}",
                        engine.identity,
                        dir.display()
                    )
                })
        })
        .transpose()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let c = crate::ctl::engine_client(&engine.engine, tls, Duration::from_secs(365 * 86400)).await?;
        f(c).await
    })
}
