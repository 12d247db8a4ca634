//! `horn-bench ublk`: fio on `/dev/ublkbN` backed by one local replica, against fio on a
//! kernel loop device (`losetup --direct-io=on`) over a file on the same filesystem, in
//! the same run. Needs root and ublk (run it inside the VM: `tests/vm/run --bench`).

use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use crate::fio;
use crate::frontend::{FrontendRunArgs, FrontendVolume};
use crate::report::Report;
use crate::store::{fill_plain, round2};

/// Arguments of `horn-bench ublk`.
#[derive(Debug, Args)]
pub struct UblkArgs {
    #[command(flatten)]
    run: FrontendRunArgs,
    /// ublk queues.
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// How command data moves: auto, user or buffer.
    #[arg(long, default_value = "auto")]
    copy: horn_ublk::CopyMode,
}

const WORKLOADS: &[(&str, &str, u32)] = &[
    ("randread-4k-qd32", "randread", 32),
    ("randwrite-4k-qd32", "randwrite", 32),
    ("randread-4k-qd1", "randread", 1),
    ("randwrite-4k-qd1", "randwrite", 1),
];

/// A loop device, detached when dropped.
struct LoopDevice(String);

impl LoopDevice {
    fn attach(file: &Path) -> Result<LoopDevice> {
        let out = Command::new("losetup")
            .args(["--direct-io=on", "--find", "--show"])
            .arg(file)
            .output()
            .context("cannot run losetup")?;
        if !out.status.success() {
            bail!("losetup failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(LoopDevice(
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        ))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// Writes the whole device sequentially, so that reads find data as on the loop file.
fn fill_device(dev: &Path, size: u64) -> Result<()> {
    let status = Command::new("fio")
        .args([
            "--name=fill",
            "--ioengine=io_uring",
            "--direct=1",
            "--rw=write",
            "--bs=1M",
        ])
        .args(["--iodepth=8", &format!("--size={size}"), "--output=/dev/null"])
        .arg(format!("--filename={}", dev.display()))
        .status()
        .context("cannot run fio")?;
    if !status.success() {
        bail!("filling {} failed", dev.display());
    }
    Ok(())
}

/// Runs the ublk benchmark.
pub fn run(args: UblkArgs) -> Result<()> {
    horn_ublk::check_available()?;
    if !fio::available() {
        bail!("fio is not installed: run scripts/install-deps (or apt-get install fio)");
    }
    let FrontendVolume {
        scratch,
        replica: _replica,
        engine,
    } = args.run.start_volume("ublk", "")?;
    let opts = horn_ublk::UblkOptions {
        queues: args.queues,
        depth: 128,
        volume: "bench".into(),
        copy: args.copy,
        ..Default::default()
    };
    let (tx, rx) = mpsc::channel();
    let serving = {
        let engine = engine.clone();
        std::thread::spawn(move || {
            horn_ublk::serve(engine, &opts, move |info| {
                let _ = tx.send((info.id, info.path.clone(), info.copy));
            })
        })
    };
    let (id, dev, copy) = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(d) => d,
        Err(_) => {
            let why = serving.join().map(|r| format!("{r:?}")).unwrap_or_default();
            bail!("the ublk device did not start: {why}");
        }
    };
    let result = measure(&args, scratch.path(), Path::new(&dev), copy);
    horn_ublk::device::stop(id)?;
    serving
        .join()
        .map_err(|_| anyhow::anyhow!("the ublk server panicked"))??;
    drop(engine);
    result
}

fn measure(args: &UblkArgs, scratch: &Path, dev: &Path, copy: &str) -> Result<()> {
    eprintln!("serving {}; filling it and the loop device's file", dev.display());
    fill_device(dev, args.run.size)?;
    let file = scratch.join("loop.img");
    fill_plain(&file, args.run.size)?;
    let lo = LoopDevice::attach(&file)?;
    let mut report = Report {
        json: args.run.json,
        rows: Vec::new(),
    };
    for &(name, rw, qd) in WORKLOADS {
        let horn = fio::run(dev, rw, 4096, qd, args.run.runtime, args.run.size)?;
        let peer = fio::run(Path::new(&lo.0), rw, 4096, qd, args.run.runtime, args.run.size)?;
        report.emit(json!({
            "bench": "ublk",
            "part": "io",
            "workload": name,
            "replicas": 1,
            "replica_cache": args.run.replica_cache.to_string(),
            "replica_host": args.run.replica_host.to_string(),
            "queues": args.queues,
            "copy": copy,
            "iops": horn.iops.round(),
            "lat_us_mean": round2(horn.lat_us_mean),
            "peer": "kernel loop device (direct I/O) over a file on the same filesystem",
            "peer_iops": peer.iops.round(),
            "peer_lat_us_mean": round2(peer.lat_us_mean),
            "ratio": round2(horn.iops / peer.iops),
            "size_bytes": args.run.size,
            "runtime_s": args.run.runtime,
        }));
    }
    report.finish();
    Ok(())
}
