//! `horn-bench cluster`: how long a user waits for a volume. On a cluster of network
//! namespaces on this machine (a manager and three node agents, `horn_cluster`), the
//! time from `hornctl volume create` to the volume attached and taking a write through
//! its iSCSI target (`hornctl volume attach`, then `qemu-io` writing 4 KiB), a fresh
//! volume each round, median of the rounds. The peer, measured in the same run in the
//! same namespaces: the same daemons started by hand with no manager (three
//! `hornd replica`, then `hornd engine --frontend iscsi`), timed from the first start
//! to the same first write: the floor the manager's scheduling, reporting and
//! supervision add to.
//!
//! `HORN_BENCH_STEPS=1` prints each round's steps, and the agents' last log lines for
//! a round whose attach took over 1.5 s.
//!
//! Needs root (network namespaces), `qemu-io` (qemu-utils, with qemu-block-extra's
//! iSCSI driver) and `hornd`/`hornctl` built next to horn-bench.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use crate::report::Report;

/// `horn-bench cluster` options.
#[derive(Args)]
pub struct ClusterArgs {
    /// Print one JSON object per result line.
    #[arg(long)]
    json: bool,
    /// Volumes created, attached and written, for each side.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Each volume's size.
    #[arg(long, default_value = "256M", value_parser = horn_manager::format::parse_size)]
    size: u64,
}

/// Writes 4 KiB at the start of the iSCSI LUN at `url` (iscsi://PORTAL/IQN/0).
fn write_once(url: &str) -> Result<()> {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 0 4k", url])
        .output()
        .context("cannot run qemu-io (scripts/install-deps installs qemu-utils)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && text.contains("wrote") {
        Ok(())
    } else {
        bail!(
            "qemu-io could not write to {url}: {}{}",
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    }
}

/// Retries [`write_once`] every 20 ms until it succeeds (the target may not listen
/// yet), for at most `within`.
fn first_write(url: &str, within: Duration) -> Result<()> {
    let since = Instant::now();
    loop {
        match write_once(url) {
            Ok(()) => return Ok(()),
            Err(e) if since.elapsed() > within => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One round through the manager: create, attach on n1, first write; then detach and
/// delete (not timed).
fn managed_round(c: &horn_cluster::Cluster, name: &str, size: u64) -> Result<f64> {
    let run = |args: &[&str]| -> Result<serde_json::Value> { c.json(args).map_err(anyhow::Error::msg) };
    let size = size.to_string();
    let start = Instant::now();
    run(&[
        "volume",
        "create",
        name,
        "--size",
        &size,
        "--replicas",
        "3",
        "--frontend",
        "iscsi",
    ])?;
    let created = start.elapsed();
    let v = run(&["volume", "attach", name, "n1"])?;
    let attached = start.elapsed();
    let endpoint = v["endpoint"]
        .as_str()
        .context("the attached volume has no endpoint")?;
    first_write(&format!("{endpoint}/0"), Duration::from_secs(30))?;
    if std::env::var_os("HORN_BENCH_STEPS").is_some() {
        eprintln!(
            "    created {created:?}, attached {attached:?}, written {:?}",
            start.elapsed()
        );
        if attached > Duration::from_millis(1500) {
            for n in 1..=3 {
                let log = std::fs::read_to_string(c.node_dir(n).join("agent.log")).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                eprintln!("    n{n}'s agent, last lines:");
                for l in &lines[lines.len().saturating_sub(8)..] {
                    eprintln!("      {l}");
                }
            }
        }
    }
    let took = start.elapsed().as_secs_f64();
    run(&["volume", "detach", name])?;
    run(&["volume", "delete", name])?;
    Ok(took)
}

/// A daemon started by hand in a namespace, stopped with SIGTERM when dropped.
struct ByHand(Child);

impl Drop for ByHand {
    fn drop(&mut self) {
        // SAFETY: kill takes no pointers; the pid is our child's (reaped below).
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// Starts `hornd ARGS` in namespace `ns` and waits for its first line (it serves).
fn by_hand(ns: &str, hornd: &Path, args: &[String]) -> Result<ByHand> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(hornd)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start hornd")?;
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("piped")).read_line(&mut line)?;
    if line.is_empty() {
        bail!("hornd {} did not start", args.join(" "));
    }
    Ok(ByHand(child))
}

/// One round by hand: three replicas and the engine started directly, first write.
fn manual_round(c: &horn_cluster::Cluster, hornd: &Path, round: usize, size: u64) -> Result<f64> {
    let dir = c.data.path().join(format!("by-hand-{round}"));
    let start = Instant::now();
    let mut replicas = Vec::new();
    let mut flags = Vec::new();
    for i in 1..=3 {
        let ip = c.net.node_ip(i);
        let args: Vec<String> = vec![
            "replica".into(),
            "--dir".into(),
            dir.join(format!("r{i}")).display().to_string(),
            "--listen".into(),
            format!("{ip}:9500"),
            "--control".into(),
            format!("{ip}:9501"),
            "--size".into(),
            size.to_string(),
        ];
        replicas.push(by_hand(&c.net.ns(i), hornd, &args)?);
        flags.push("--replica".to_string());
        flags.push(format!(
            "{ip}:9500,{ip}:9501{}",
            if i == 1 { ",local" } else { "" }
        ));
    }
    let ip = c.net.node_ip(1);
    let mut args: Vec<String> = vec!["engine".into(), "--name".into(), format!("p{round}")];
    args.extend(flags);
    args.extend([
        "--control".into(),
        format!("{ip}:9600"),
        "--frontend".into(),
        "iscsi".into(),
        "--listen".into(),
        format!("{ip}:3260"),
    ]);
    let engine = by_hand(&c.net.ns(1), hornd, &args)?;
    first_write(
        &format!("iscsi://{ip}:3260/iqn.2026-11.io.horn:p{round}/0"),
        Duration::from_secs(30),
    )?;
    let took = start.elapsed().as_secs_f64();
    drop(engine);
    drop(replicas);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(took)
}

/// Runs the benchmark.
pub fn run(args: ClusterArgs) -> Result<()> {
    if let Some(why) = horn_cluster::Cluster::unavailable() {
        bail!("horn-bench cluster cannot run here: {why}");
    }
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let hornd = horn_cluster::binaries()
        .map_err(anyhow::Error::msg)?
        .join("hornd");
    eprintln!("== a cluster of three nodes in network namespaces");
    let c = horn_cluster::Cluster::start(3).map_err(anyhow::Error::msg)?;
    let mut report = Report {
        json: args.json,
        rows: Vec::new(),
    };
    let (mut managed, mut manual) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        // Alternate the sides so that neither gets the quieter moments.
        managed.push(managed_round(&c, &format!("b{round}"), args.size)?);
        manual.push(manual_round(&c, &hornd, round, args.size)?);
        eprintln!(
            "  round {}: through the manager {:.3} s, by hand {:.3} s",
            round + 1,
            managed[round],
            manual[round]
        );
    }
    let (m, p) = (median(managed.clone()), median(manual.clone()));
    let max = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    report.emit(json!({
        "workload": "create-to-writable",
        "rounds": args.rounds,
        "size_bytes": args.size,
        "seconds_median": m,
        "seconds_max": max(&managed),
        "peer": "the same daemons started by hand (3 hornd replica, hornd engine --frontend iscsi)",
        "peer_seconds_median": p,
        "peer_seconds_max": max(&manual),
        "ratio": m / p,
        "target_seconds": 2.0,
    }));
    if !args.json {
        println!(
            "create to attached and writable: median {m:.3} s (max {:.3} s) over {} volumes; by hand: median {p:.3} s (max {:.3} s); target 2 s",
            max(&managed),
            args.rounds,
            max(&manual)
        );
    }
    Ok(())
}
