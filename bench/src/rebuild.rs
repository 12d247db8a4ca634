//! `horn-bench rebuild`: how fast a replica is rebuilt, how little a delta rebuild
//! copies, and what a rebuild costs the writes going on meanwhile.
//!
//! 1. **full**: a volume of `--size` is written whole (1 MiB writes) on one replica,
//!    then a fresh replica is added (`rebuild::add_replica`). Its throughput (source
//!    layer bytes gone through per second) is set against `cp --sparse=always` of the
//!    same layer files to the same filesystem, followed by `sync` of the copies (the
//!    rebuild fsyncs what it wrote too), in the same run: `ratio` = rebuild / cp. Both
//!    run `--repeat` times, alternated, each after a `sync`; the best of each counts.
//! 2. **delta**: the rebuilt replica goes away, 1% of the volume changes (random 4 KiB
//!    writes), it comes back: `copied_fraction` = bytes copied / volume size.
//! 3. **under_load**: random 4 KiB writes at QD16 on their own queue, alone and then
//!    while a third replica is rebuilt: `iops_drop` = 1 - during / before.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use horn_engine::rebuild::add_replica;
use horn_engine::replica_set::IoKind;
use horn_engine::{RebuildState, RebuildStatus};
use horn_engine::{Volume, VolumeCompletion};
use horn_manager::format::{human_bytes, parse_size};
use horn_replica::IoBuf;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use serde_json::json;

use crate::store::round2;
use crate::volume::ReplicaProcess;

/// Arguments of `horn-bench rebuild`.
#[derive(Args)]
pub struct RebuildArgs {
    /// Print one JSON object per result line.
    #[arg(long)]
    json: bool,
    /// Directory for the replicas and cp's copies (one filesystem).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Volume size.
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    size: u64,
    /// Seconds of foreground writes measured before the rebuild under load.
    #[arg(long, default_value_t = 5)]
    load_seconds: u64,
    /// Full rebuilds and cp runs, alternated; the best of each counts (the disk's
    /// writeback makes single runs vary).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=10))]
    repeat: u32,
}

const TIMEOUT: Duration = Duration::from_secs(30);

fn wait_rebuild(v: &Volume, id: u64) -> Result<RebuildStatus> {
    loop {
        let s = v
            .engine()
            .rebuild(id)
            .context("the engine lists no rebuild of the replica it just added")?;
        match &s.state {
            RebuildState::Syncing => std::thread::sleep(Duration::from_millis(10)),
            RebuildState::Done => return Ok(s),
            RebuildState::Failed(why) => bail!("the rebuild of {} failed: {why}", s.replica),
        }
    }
}

/// Waits until the engine has dropped replica `data` (it was killed).
fn wait_dropped(v: &Volume, data: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !v
        .replicas()
        .iter()
        .any(|(d, m)| d == data && *m == horn_engine::replica_set::Mode::Err)
    {
        if Instant::now() > deadline {
            bail!("the engine did not drop {data} within 60 s of its end");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Writes the whole volume, 1 MiB at a time, 8 in flight; each MiB differs.
fn fill(v: &mut Volume, size: u64) -> Result<()> {
    let mut out: Vec<VolumeCompletion> = Vec::new();
    let (mut at, mut in_flight) = (0u64, 0usize);
    while at < size || in_flight > 0 {
        while at < size && in_flight < 8 {
            let mut buf = IoBuf::zeroed((1 << 20).min(size - at) as usize);
            for (i, chunk) in buf.as_mut_slice().chunks_mut(4096).enumerate() {
                chunk[..8].copy_from_slice(&(at + i as u64 * 4096).to_le_bytes());
                chunk[8..16].copy_from_slice(&0x686f726e_u64.to_le_bytes());
            }
            v.submit(IoKind::Write, at, 0, Some(buf), at);
            at += 1 << 20;
            in_flight += 1;
        }
        out.clear();
        v.reap(1, &mut out)?;
        for c in out.drain(..) {
            c.result
                .with_context(|| format!("filling the volume at {}", c.tag))?;
            in_flight -= 1;
        }
    }
    v.flush()?;
    Ok(())
}

/// Random 4 KiB writes at QD16 on queue `q` until `stop`; `done` counts completions.
fn random_writes(mut q: Volume, size: u64, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) -> Result<()> {
    let mut rng = SmallRng::seed_from_u64(11);
    let mut out: Vec<VolumeCompletion> = Vec::new();
    let mut in_flight = 0;
    let data = vec![0x5a; 4096];
    loop {
        while !stop.load(Ordering::Relaxed) && in_flight < 16 {
            let blk = rng.gen_range(0..size / 4096);
            q.submit(IoKind::Write, blk * 4096, 0, Some(IoBuf::from_slice(&data)), blk);
            in_flight += 1;
        }
        if in_flight == 0 {
            return q.close().context("closing the writers' queue");
        }
        out.clear();
        q.reap(1, &mut out)?;
        for c in out.drain(..) {
            c.result.context("a foreground write failed")?;
            in_flight -= 1;
            done.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `cp --sparse=always` of every layer file of `from` into `to`, then `sync` of the
/// copies; returns the seconds it took and the bytes the files hold.
fn cp_layers(from: &Path, to: &Path) -> Result<(f64, u64)> {
    std::fs::create_dir_all(to)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(from)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "img"))
        .collect();
    files.sort();
    let bytes: u64 = files
        .iter()
        .map(|f| std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(f).unwrap()) * 512)
        .sum();
    let start = Instant::now();
    let status = Command::new("cp")
        .arg("--sparse=always")
        .args(&files)
        .arg(to)
        .status()?;
    if !status.success() {
        bail!("cp --sparse=always failed: {status}");
    }
    let copies: Vec<PathBuf> = files.iter().map(|f| to.join(f.file_name().unwrap())).collect();
    let status = Command::new("sync").args(&copies).status()?;
    if !status.success() {
        bail!("sync of the copies failed: {status}");
    }
    Ok((start.elapsed().as_secs_f64(), bytes))
}

/// Runs the three measurements.
pub fn run(args: RebuildArgs) -> Result<()> {
    let scratch = tempfile::Builder::new()
        .prefix("horn-bench-rebuild-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("cannot make a directory in {}", args.dir.display()))?;
    let size = args.size;
    eprintln!("volume of {} in {}", human_bytes(size), scratch.path().display());
    let a = ReplicaProcess::start(&scratch.path().join("a"), size)?;
    let (mut v, _) = Volume::start(std::slice::from_ref(&a.addr), TIMEOUT)?;
    eprintln!("writing the whole volume");
    fill(&mut v, size)?;

    // 1. Full rebuilds against cp, alternated; each rebuild into a fresh replica.
    let mut best: Option<RebuildStatus> = None;
    let (mut runs, mut cp_runs) = (Vec::new(), Vec::new());
    let (mut cp_best, mut cp_bytes) = (f64::MAX, 0);
    let mut b: Option<ReplicaProcess> = None;
    for rep in 0..args.repeat {
        eprintln!("full rebuild {}", rep + 1);
        // The replica the last round rebuilt goes: the engine drops it (durably), and
        // the volume has `a` alone again.
        if let Some(old) = b.take() {
            let data = old.addr.data.clone();
            drop(old);
            wait_dropped(&v, &data)?;
        }
        let fresh = ReplicaProcess::start(&scratch.path().join(format!("b{rep}")), size)?;
        // SAFETY: sync takes no arguments; it starts each measurement with no dirty
        // pages left by the one before.
        unsafe { libc::sync() };
        let rebuild = add_replica(&mut v, fresh.addr.clone())?;
        let full = wait_rebuild(&v, rebuild)?;
        runs.push(round2(full.rate() / (1 << 20) as f64));
        if best.as_ref().is_none_or(|s| full.rate() > s.rate()) {
            best = Some(full);
        }
        eprintln!("cp --sparse=always of the same layer files {}", rep + 1);
        // SAFETY: as above.
        unsafe { libc::sync() };
        let (secs, bytes) = cp_layers(&scratch.path().join("a"), &scratch.path().join("cp"))?;
        std::fs::remove_dir_all(scratch.path().join("cp"))?;
        cp_runs.push(round2(bytes as f64 / secs / (1 << 20) as f64));
        if secs < cp_best {
            (cp_best, cp_bytes) = (secs, bytes);
        }
        // The last one stays, for the delta rebuild.
        b = Some(fresh);
    }
    let b = b.expect("at least one repetition");
    let full = best.expect("at least one repetition");
    let secs = full.elapsed.unwrap_or_default().as_secs_f64();
    let rebuild_bps = full.done as f64 / secs;
    let cp_bps = cp_bytes as f64 / cp_best;
    let result = json!({
        "part": "full",
        "size_bytes": size,
        "repeat": args.repeat,
        "bytes": full.done,
        "copied_bytes": full.copied,
        "seconds": round2(secs),
        "mib_per_s": round2(rebuild_bps / (1 << 20) as f64),
        "peer": "cp --sparse=always + sync",
        "peer_bytes": cp_bytes,
        "peer_seconds": round2(cp_best),
        "peer_mib_per_s": round2(cp_bps / (1 << 20) as f64),
        "ratio": round2(rebuild_bps / cp_bps),
        "runs_mib_per_s": runs,
        "peer_runs_mib_per_s": cp_runs,
    });
    emit(&args, &result);

    // 2. Delta: b away (killed, dropped) while 1% changes, then back on its directory.
    eprintln!("delta rebuild after 1% changed");
    let b_dir = scratch.path().join(format!("b{}", args.repeat - 1));
    let b_data = b.addr.data.clone();
    drop(b);
    wait_dropped(&v, &b_data)?;
    let mut rng = SmallRng::seed_from_u64(3);
    let changed = size / 100 / 4096;
    let mut out = Vec::new();
    let data = vec![0xa5; 4096];
    for i in 0..changed {
        let blk = rng.gen_range(0..size / 4096);
        v.submit(IoKind::Write, blk * 4096, 0, Some(IoBuf::from_slice(&data)), i);
        if v.in_flight() >= 16 {
            out.clear();
            v.reap(1, &mut out)?;
            for c in out.drain(..) {
                c.result?;
            }
        }
    }
    out.clear();
    v.reap(usize::MAX, &mut out)?;
    for c in out.drain(..) {
        c.result?;
    }
    let b = ReplicaProcess::start(&b_dir, size)?;
    let rebuild = add_replica(&mut v, b.addr.clone())?;
    let delta = wait_rebuild(&v, rebuild)?;
    let r = json!({
        "part": "delta",
        "size_bytes": size,
        "changed_bytes": changed * 4096,
        "copied_bytes": delta.copied,
        "copied_fraction": delta.copied as f64 / size as f64,
        "seconds": round2(delta.elapsed.unwrap_or_default().as_secs_f64()),
    });
    emit(&args, &r);

    // 3. Under load: foreground IOPS before and during the rebuild of a third replica.
    eprintln!("rebuild under random writes");
    let c = ReplicaProcess::start(&scratch.path().join("c"), size)?;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = {
        let (q, stop, done) = (v.open_queue()?, stop.clone(), done.clone());
        std::thread::spawn(move || random_writes(q, size, stop, done))
    };
    std::thread::sleep(Duration::from_secs(1));
    let (n0, t0) = (done.load(Ordering::Relaxed), Instant::now());
    std::thread::sleep(Duration::from_secs(args.load_seconds));
    let before = (done.load(Ordering::Relaxed) - n0) as f64 / t0.elapsed().as_secs_f64();
    let (n1, t1) = (done.load(Ordering::Relaxed), Instant::now());
    let rebuild = add_replica(&mut v, c.addr.clone())?;
    let loaded = wait_rebuild(&v, rebuild)?;
    let during = (done.load(Ordering::Relaxed) - n1) as f64 / t1.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("the writer thread")?;
    let r = json!({
        "part": "under_load",
        "size_bytes": size,
        "iops_before": before.round(),
        "iops_during": during.round(),
        "iops_drop": round2(1.0 - during / before),
        "rebuild_seconds": round2(loaded.elapsed.unwrap_or_default().as_secs_f64()),
        "rebuild_mib_per_s": round2(loaded.rate() / (1 << 20) as f64),
    });
    emit(&args, &r);
    v.close()?;
    Ok(())
}

fn emit(args: &RebuildArgs, v: &serde_json::Value) {
    if args.json {
        println!("{v}");
    } else {
        println!("{}", serde_json::to_string_pretty(v).expect("plain JSON"));
    }
}
