//! Running fio as the peer and reading its JSON output.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// What one fio job measured.
#[derive(Debug, Clone, Copy)]
pub struct FioResult {
    /// I/Os per second.
    pub iops: f64,
    /// Mean completion latency in microseconds.
    pub lat_us_mean: f64,
}

/// One fio job on `file`: `rw` (randread, randwrite, read, write), block size in
/// bytes, queue depth, runtime in seconds, over the first `size` bytes of the file.
pub fn run(file: &Path, rw: &str, bs: u64, iodepth: u32, runtime: u64, size: u64) -> Result<FioResult> {
    run_many(&[file], rw, bs, iodepth, runtime, size)
}

/// One fio job per file, in parallel, sharing `total_depth` between them, reported
/// together (IOPS summed, latency averaged): the peer of a write to N replicas.
pub fn run_many(
    files: &[&Path],
    rw: &str,
    bs: u64,
    total_depth: u32,
    runtime: u64,
    size: u64,
) -> Result<FioResult> {
    let depth = total_depth.div_ceil(files.len() as u32).max(1);
    let mut cmd = Command::new("fio");
    cmd.args(["--group_reporting", "--output-format=json"]);
    for (i, f) in files.iter().enumerate() {
        cmd.arg(format!("--name=peer{i}"))
            .arg(format!("--filename={}", f.display()))
            .args([
                "--ioengine=io_uring",
                "--direct=1",
                &format!("--rw={rw}"),
                &format!("--bs={bs}"),
                &format!("--iodepth={depth}"),
                &format!("--size={size}"),
                &format!("--runtime={runtime}"),
                "--time_based",
                "--norandommap",
                "--randrepeat=0",
            ]);
    }
    parse(cmd, rw)
}

fn parse(mut cmd: Command, rw: &str) -> Result<FioResult> {
    let out = cmd
        .output()
        .context("cannot run fio (install it with scripts/install-deps)")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("fio printed no JSON")?;
    let side = if rw.contains("read") { "read" } else { "write" };
    let job = &v["jobs"][0][side];
    let iops = job["iops"].as_f64().context("fio JSON has no iops")?;
    let lat_ns = job["lat_ns"]["mean"]
        .as_f64()
        .context("fio JSON has no mean latency")?;
    Ok(FioResult {
        iops,
        lat_us_mean: lat_ns / 1000.0,
    })
}

/// Is fio installed?
pub fn available() -> bool {
    Command::new("fio")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}
