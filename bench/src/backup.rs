//! `horn-bench backup`: backups and restores to a real S3 service (Garage on
//! loopback, started here), against restic and against a raw upload of the same
//! bytes, in the same run.
//!
//! The volume (`--size`, 4 GiB by default) is half random data and half zeros, in
//! alternating 64 MiB stretches, written to a replica and snapshotted.
//! 1. **full_backup**: Horn backs the snapshot up (read from the replica's files,
//!    as `hornd replica` does) to a fresh bucket; restic 0.14 (`restic backup`) backs
//!    up the same image as a file to another bucket of the same Garage. `mib_per_s`
//!    is the volume's size over the seconds each took.
//! 2. **full_backup_vs_raw**: the same Horn backup against the raw upload rate of
//!    the image's non-zero 2 MiB pieces (the least any block backup must send: no
//!    hashing, no compression) with the same SDK and parallelism.
//! 3. **restore**: Horn restores the backup into an image file (as `hornctl backup
//!    restore --to-file`, synced at the end); restic restores its snapshot (`restic
//!    restore`, then `sync` of the file, as restic does not sync).
//!    **restore_through_engine**: the same backup restored through a `hornd engine`
//!    into a new volume of two `hornd replica` processes (each block fetched once,
//!    written to both), against the same restic restore.
//! 4. **incremental_backup**: 1% of the blocks change (one 4 KiB write in each) and
//!    a new snapshot is backed up from the first: `uploaded_bytes` against
//!    `size_bytes`, and its seconds against the full backup's.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use horn_backup::create::{backup, BackupRequest};
use horn_backup::garage::Garage;
use horn_backup::restore::{restore, FileSink, RestoreOptions};
use horn_backup::store::{open_target, ObjectStore};
use horn_manager::format::{human_bytes, parse_size};
use horn_replica::image::SnapshotImage;
use horn_replica::Replica;
use rand::{rngs::SmallRng, Rng, RngCore, SeedableRng};
use serde_json::json;

use crate::report::Report;
use crate::store::round2;

/// Arguments of `horn-bench backup`.
#[derive(Args)]
pub struct BackupArgs {
    /// Print one JSON object per result line.
    #[arg(long)]
    json: bool,
    /// Directory for the replica, Garage's data and the images (one filesystem).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Volume size.
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    size: u64,
}

const MIB: u64 = 1 << 20;
const STRETCH: u64 = 64 * MIB;
const BLOCK: u64 = 2 * MIB;

fn s3(g: &Garage, bucket: &str) -> Result<Arc<dyn ObjectStore>> {
    g.create_bucket(bucket).map_err(anyhow::Error::msg)?;
    g.allow(bucket).map_err(anyhow::Error::msg)?;
    Ok(Arc::from(open_target(&format!("s3://{bucket}/"), &g.settings())?))
}

fn restic(g: &Garage, repo: &str, args: &[&str]) -> Result<f64> {
    let start = Instant::now();
    let out = Command::new("restic")
        .args(["-r", repo, "--quiet"])
        .args(args)
        .env("AWS_ACCESS_KEY_ID", &g.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &g.secret_key)
        .env("AWS_DEFAULT_REGION", "garage")
        .env("RESTIC_PASSWORD", "horn-bench")
        .output()
        .context("restic is not installed (scripts/install-deps installs it)")?;
    if !out.status.success() {
        bail!("restic {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Whether stretch `i` of the volume holds data (the others are zeros).
fn data_stretch(i: u64) -> bool {
    i % 2 == 0
}

/// Runs `horn-bench backup`.
pub fn run(args: BackupArgs) -> Result<()> {
    let mut report = Report {
        json: args.json,
        rows: Vec::new(),
    };
    let size = args.size.div_ceil(STRETCH) * STRETCH;
    let work = tempfile::Builder::new()
        .prefix("horn-bench-backup")
        .tempdir_in(&args.dir)
        .with_context(|| format!("cannot make a directory in {}", args.dir.display()))?;
    let garage = Garage::start(&work.path().join("garage"), "horn-bench").map_err(anyhow::Error::msg)?;

    // The volume: a replica with alternate stretches of random data and zeros.
    eprintln!("writing a {} volume (half random data)...", human_bytes(size));
    let rdir = work.path().join("replica");
    let mut r = Replica::create(&rdir, size, 512)?;
    let image = work.path().join("image.raw");
    let image_file = std::fs::File::create(&image)?;
    image_file.set_len(size)?;
    let mut rng = SmallRng::seed_from_u64(19);
    let mut buf = vec![0u8; 8 * MIB as usize];
    for s in 0..size / STRETCH {
        if !data_stretch(s) {
            continue;
        }
        for c in 0..STRETCH / buf.len() as u64 {
            rng.fill_bytes(&mut buf);
            let at = s * STRETCH + c * buf.len() as u64;
            r.write_at(at, &buf)?;
            std::os::unix::fs::FileExt::write_all_at(&image_file, &buf, at)?;
        }
    }
    r.snapshot("full", &Default::default())?;
    r.flush()?;
    image_file.sync_all()?;
    drop(image_file);

    // 1. Horn's full backup, and restic's of the same image.
    let horn_store = s3(&garage, "horn")?;
    let img = SnapshotImage::open(&rdir, "full")?;
    eprintln!("horn: full backup...");
    let full = backup(
        horn_store.clone(),
        &img,
        None,
        &BackupRequest::new("bench", "full", "full"),
        &|_, _| {},
    )?;
    garage.create_bucket("restic").map_err(anyhow::Error::msg)?;
    garage.allow("restic").map_err(anyhow::Error::msg)?;
    let repo = format!("s3:{}/restic", garage.endpoint);
    restic(&garage, &repo, &["init"])?;
    eprintln!("restic: backup...");
    let restic_backup = restic(&garage, &repo, &["backup", image.to_str().unwrap()])?;
    let mib = size as f64 / MIB as f64;
    let horn_rate = mib / full.seconds;
    let restic_rate = mib / restic_backup;
    report.emit(json!({
        "workload": "full_backup",
        "size_bytes": size,
        "seconds": round2(full.seconds),
        "mib_per_s": round2(horn_rate),
        "uploaded_bytes": full.uploaded_bytes,
        "peer": "restic 0.14 backup of the image file",
        "peer_seconds": round2(restic_backup),
        "peer_mib_per_s": round2(restic_rate),
        "ratio": round2(horn_rate / restic_rate),
    }));

    // 2. The raw upload of the image's non-zero 2 MiB pieces, 4 at a time.
    let raw_store = s3(&garage, "raw")?;
    let pieces: Vec<u64> = (0..size / BLOCK)
        .filter(|b| data_stretch(b * BLOCK / STRETCH))
        .collect();
    let next = AtomicUsize::new(0);
    eprintln!("raw upload...");
    let start = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let mut piece = vec![0u8; BLOCK as usize];
                    let f = std::fs::File::open(&image)?;
                    while let Some(&b) = pieces.get(next.fetch_add(1, Ordering::Relaxed)) {
                        std::os::unix::fs::FileExt::read_exact_at(&f, &mut piece, b * BLOCK)?;
                        raw_store.put(&format!("raw/{b:08}"), &piece)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().expect("an uploader")?;
        }
        Ok(())
    })?;
    let raw_seconds = start.elapsed().as_secs_f64();
    for b in &pieces {
        raw_store.delete(&format!("raw/{b:08}"))?;
    }
    let raw_rate = mib / raw_seconds;
    report.emit(json!({
        "workload": "full_backup_vs_raw",
        "size_bytes": size,
        "mib_per_s": round2(horn_rate),
        "peer": "raw PUTs of the non-zero 2 MiB pieces (aws-sdk-s3, 4 at a time)",
        "peer_seconds": round2(raw_seconds),
        "peer_mib_per_s": round2(raw_rate),
        "ratio": round2(horn_rate / raw_rate),
    }));

    // 3. Restores: Horn's into an image file, restic's of its snapshot.
    let m = horn_backup::read_backup(horn_store.as_ref(), "bench", "full")?;
    let out = work.path().join("horn-restored.raw");
    eprintln!("horn: restore...");
    let restored = {
        let mut sink = FileSink::create(&out, m.size)?;
        let r = restore(
            horn_store.as_ref(),
            &m,
            &mut sink,
            &RestoreOptions::default(),
            &|_, _| {},
        )?;
        if !r.bad.is_empty() {
            bail!("the restore found bad blocks: {:?}", r.bad);
        }
        r
    };
    check_same(&image, &out)?;
    std::fs::remove_file(&out)?;
    let restic_target = work.path().join("restic-restored");
    eprintln!("restic: restore...");
    // Horn's restore syncs what it wrote; restic's does not, so its time includes a
    // sync of the restored file.
    let restic_restore = restic(
        &garage,
        &repo,
        &["restore", "latest", "--target", restic_target.to_str().unwrap()],
    )? + {
        let start = Instant::now();
        let restored_file = restic_target.join(image.strip_prefix("/").unwrap_or(&image));
        let ok = Command::new("sync").arg(&restored_file).status()?.success();
        if !ok {
            bail!("sync {} failed", restored_file.display());
        }
        start.elapsed().as_secs_f64()
    };
    let horn_restore_rate = mib / restored.seconds;
    let restic_restore_rate = mib / restic_restore;
    report.emit(json!({
        "workload": "restore",
        "size_bytes": size,
        "seconds": round2(restored.seconds),
        "mib_per_s": round2(horn_restore_rate),
        "peer": "restic 0.14 restore of the image file",
        "peer_seconds": round2(restic_restore),
        "peer_mib_per_s": round2(restic_restore_rate),
        "ratio": round2(horn_restore_rate / restic_restore_rate),
    }));
    let _ = std::fs::remove_dir_all(&restic_target);

    // 3b. Horn's restore through an engine into a new volume of two replicas, each
    // block fetched once and written to both (`hornctl backup restore --engine`).
    eprintln!("horn: restore through an engine, two replicas...");
    let through = restore_through_engine(&garage, work.path(), size)?;
    report.emit(json!({
        "workload": "restore_through_engine",
        "size_bytes": size,
        "replicas": 2,
        "seconds": round2(through),
        "mib_per_s": round2(mib / through),
        "peer": "restic 0.14 restore of the image file",
        "peer_seconds": round2(restic_restore),
        "peer_mib_per_s": round2(restic_restore_rate),
        "ratio": round2((mib / through) / restic_restore_rate),
    }));

    // 4. 1% of the blocks change; an incremental backup.
    let blocks = size / BLOCK;
    let changed = (blocks / 100).max(1);
    let mut rng = SmallRng::seed_from_u64(23);
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < changed {
        chosen.insert(rng.gen_range(0..blocks));
    }
    let mut page = vec![0u8; 4096];
    for &b in &chosen {
        rng.fill_bytes(&mut page);
        r.write_at(b * BLOCK + rng.gen_range(0..BLOCK / 4096) * 4096, &page)?;
    }
    r.snapshot("next", &Default::default())?;
    r.flush()?;
    let next_img = SnapshotImage::open(&rdir, "next")?;
    eprintln!("horn: incremental backup...");
    let inc = backup(
        horn_store,
        &next_img,
        Some((&m, &img)),
        &BackupRequest::new("bench", "next", "next"),
        &|_, _| {},
    )?;
    report.emit(json!({
        "workload": "incremental_backup",
        "size_bytes": size,
        "changed_blocks": changed,
        "uploaded_bytes": inc.uploaded_bytes,
        "uploaded_fraction": (inc.uploaded_bytes as f64 / size as f64 * 10000.0).round() / 10000.0,
        "seconds": round2(inc.seconds),
        "full_seconds": round2(full.seconds),
        "seconds_fraction": (inc.seconds / full.seconds * 1000.0).round() / 1000.0,
        "mib_per_s": round2(mib / inc.seconds),
    }));
    r.close()?;
    let _ = std::io::stderr().flush();
    report.finish();
    Ok(())
}

/// A `hornd` process, killed when dropped.
struct Hornd(std::process::Child);

impl Drop for Hornd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `hornd ARGS` and returns it with the first line it prints that holds
/// `marker` (it serves then).
fn hornd(bin: &Path, args: &[String], marker: &str) -> Result<(Hornd, String)> {
    let mut child = Command::new(bin.join("hornd"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("cannot start hornd")?;
    let mut out = std::io::BufReader::new(child.stdout.take().expect("piped"));
    let mut line = String::new();
    loop {
        line.clear();
        if std::io::BufRead::read_line(&mut out, &mut line)? == 0 {
            let _ = child.kill();
            bail!("hornd {} stopped before serving", args.join(" "));
        }
        if line.contains(marker) {
            return Ok((Hornd(child), line.trim().to_string()));
        }
    }
}

/// Seconds `hornctl backup restore --engine` takes to restore backup `full` of
/// `bench` (bucket `horn`) into a fresh volume of two `hornd replica` processes.
fn restore_through_engine(garage: &Garage, work: &Path, size: u64) -> Result<f64> {
    let bin = horn_cluster::binaries().map_err(anyhow::Error::msg)?;
    let mut replicas = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..2 {
        let dir = work.join(format!("restored-{i}"));
        let args: Vec<String> = [
            "replica",
            "--dir",
            dir.to_str().unwrap(),
            "--size",
            &size.to_string(),
            "--listen",
            "127.0.0.1:0",
            "--control",
            "127.0.0.1:0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // "hornd replica: serving DIR on DATA, control on CONTROL"
        let (p, line) = hornd(&bin, &args, "control on ")?;
        let (data, control) = line
            .split_once(" on ")
            .and_then(|(_, rest)| rest.split_once(", control on "))
            .with_context(|| format!("hornd replica said {line:?}"))?;
        addrs.push(format!("{data},{control}"));
        replicas.push(p);
    }
    let mut args: Vec<String> = ["engine", "--control", "127.0.0.1:0"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for a in &addrs {
        args.push("--replica".into());
        args.push(a.clone());
    }
    let (_engine, line) = hornd(&bin, &args, "control on ")?;
    let control = line
        .rsplit_once("control on ")
        .map(|(_, a)| a.trim().to_string())
        .unwrap_or_default();
    let s = garage.settings();
    let out = Command::new(bin.join("hornctl"))
        .args([
            "backup",
            "restore",
            "bench",
            "full",
            "--json",
            "--engine",
            &control,
            "--target",
            "s3://horn",
        ])
        .args(["--s3-endpoint", &s.endpoint, "--s3-region", &s.region])
        .env("AWS_ACCESS_KEY_ID", &s.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &s.secret_key)
        .output()?;
    if !out.status.success() {
        bail!(
            "hornctl backup restore --engine failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    if r["bad"].as_array().is_some_and(|b| !b.is_empty()) {
        bail!("the restore through the engine found bad blocks: {}", r["bad"]);
    }
    r["seconds"]
        .as_f64()
        .context("the restore's report has no seconds")
}

/// Fails unless the two files hold the same bytes.
fn check_same(a: &Path, b: &Path) -> Result<()> {
    use std::io::Read;
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
    let mut at = 0u64;
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(());
        }
        fb.read_exact(&mut bb[..n])
            .with_context(|| format!("{} is shorter than {}", b.display(), a.display()))?;
        if ba[..n] != bb[..n] {
            bail!("the restored image differs from the volume near offset {at}");
        }
        at += n as u64;
    }
}
