//! `horn-bench volume`: a volume through its engine, replicas as separate processes on
//! loopback, against fio on plain files in the same run.
//!
//! For each replica count (`--replicas`, default 1 and 3): start that many replica
//! processes (this binary's hidden `serve-replica`, the same code as `hornd replica`),
//! start the engine in-process, fill the volume, then run each workload through the
//! engine and the same job with fio. The peer of a read is fio on one plain file (a
//! read goes to one replica); the peer of a write to N replicas is fio writing N plain
//! files in parallel at the same total depth. All files live in `--dir`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use horn_engine::{ReplicaAddr, Volume};
use horn_manager::format::{human_bytes, parse_size};
use serde_json::json;

use crate::cpu::CpuMeter;
use crate::fio;
use crate::report::Report;
use crate::store::{fill_plain, round2};
use crate::target::{drive, fill, Workload, WORKLOADS};

/// Arguments of `horn-bench volume`.
#[derive(Debug, Args)]
pub struct VolumeArgs {
    /// Print one JSON object per result line.
    #[arg(long)]
    json: bool,
    /// Directory for the replicas and fio's files (one filesystem).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Volume size (and size of each of fio's files).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Seconds per workload, for the engine and for fio alike.
    #[arg(long, default_value_t = 10)]
    runtime: u64,
    /// Replica counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    replicas: Vec<usize>,
    /// Only these workloads (names as printed), default all.
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Use these running replicas (`DATA,CONTROL`, as for `hornd replica --listen` and
    /// `--control`; repeat) instead of starting replica processes. Their data is
    /// overwritten.
    #[arg(long = "replica")]
    running: Vec<ReplicaAddr>,
    /// Engine queues, each a thread with its own ring and replica connections; the
    /// queue depth is shared among them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: u16,
    /// Measure an encrypted volume (AES-256-XTS in the engine) against an unencrypted
    /// one on replicas of their own, the two taking turns workload by workload, instead
    /// of the engine against fio.
    #[arg(long, conflicts_with = "running")]
    encrypted: bool,
    /// Measure the data wire over TLS (`--data-tls`: mutual TLS between the engine
    /// and its replica processes) against the same replicas' plain data wire, in turns
    /// workload by workload; control over mutual TLS on both sides.
    #[arg(long, conflicts_with_all = ["running", "encrypted"])]
    data_tls: bool,
}

/// What a paired run compares: the same engine with one thing on and off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compared {
    /// AES-256-XTS in the engine.
    Encrypted,
    /// The data wire over TLS.
    DataTls,
}

/// A replica process, killed when dropped.
pub(crate) struct ReplicaProcess {
    child: Child,
    pub(crate) addr: ReplicaAddr,
}

impl ReplicaProcess {
    pub(crate) fn start(dir: &Path, size: u64) -> Result<ReplicaProcess> {
        Self::start_with(dir, size, horn_replica::CacheMode::Direct)
    }

    /// [`ReplicaProcess::start`] with a cache mode (`hornd replica --cache`).
    pub(crate) fn start_with(
        dir: &Path,
        size: u64,
        cache: horn_replica::CacheMode,
    ) -> Result<ReplicaProcess> {
        Self::start_full(dir, size, cache, &[])
    }

    /// [`ReplicaProcess::start_with`] with more `serve-replica` flags.
    fn start_full(
        dir: &Path,
        size: u64,
        cache: horn_replica::CacheMode,
        extra: &[&str],
    ) -> Result<ReplicaProcess> {
        let exe = std::env::current_exe().context("cannot find horn-bench's own binary")?;
        let mut child = Command::new(exe)
            .args([
                "serve-replica",
                "--listen",
                "127.0.0.1:0",
                "--control",
                "127.0.0.1:0",
                "--size",
            ])
            .arg(size.to_string())
            .arg("--dir")
            .arg(dir)
            .arg("--cache")
            .arg(cache.to_string())
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start a replica process")?;
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("piped")).read_line(&mut line)?;
        let Some((data, control)) = line
            .split_once(" on ")
            .and_then(|(_, rest)| rest.trim().split_once(", control on "))
        else {
            bail!("the replica process did not start: {line:?}");
        };
        Ok(ReplicaProcess {
            addr: ReplicaAddr {
                data: data.to_string(),
                control: control.to_string(),
                local: false,
            },
            child,
        })
    }
}

impl Drop for ReplicaProcess {
    fn drop(&mut self) {
        // SAFETY: kill takes no pointers; the pid is our child's, reaped just after.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        // A replica still serving an engine's connections may not stop on SIGTERM.
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Drives the workload on `queues` queues of the volume at once (the first on this
/// thread), the depth shared among them; returns total IOPS and mean latency.
/// [`drive_queues`] with the machine's CPU metered: (IOPS, mean latency, CPU).
fn metered(
    volume: &mut Volume,
    w: &Workload,
    runtime: Duration,
    queues: u16,
) -> Result<(f64, f64, Option<crate::cpu::CpuUse>)> {
    let meter = CpuMeter::start();
    let (iops, lat) = drive_queues(volume, w, runtime, queues as usize)?;
    Ok((iops, lat, meter.stop()))
}

fn drive_queues(volume: &mut Volume, w: &Workload, runtime: Duration, queues: usize) -> Result<(f64, f64)> {
    let queues = queues.min(w.qd).max(1);
    if queues == 1 {
        return drive(volume, w, runtime);
    }
    let others = (1..queues)
        .map(|i| {
            let mut q = volume.open_queue()?;
            let share = Workload {
                qd: w.qd / queues + usize::from(i < w.qd % queues),
                ..*w
            };
            Ok(std::thread::spawn(move || {
                let r = drive(&mut q, &share, runtime);
                q.close()?;
                r
            }))
        })
        .collect::<Result<Vec<_>>>()?;
    let own = Workload {
        qd: w.qd / queues + usize::from(w.qd % queues > 0),
        ..*w
    };
    let mut results = vec![drive(volume, &own, runtime)?];
    for t in others {
        results.push(
            t.join()
                .map_err(|_| anyhow::anyhow!("a queue thread panicked"))??,
        );
    }
    let iops: f64 = results.iter().map(|r| r.0).sum();
    let lat = results.iter().map(|r| r.0 * r.1).sum::<f64>() / iops.max(1.0);
    Ok((iops, lat))
}

/// `--encrypted`, `--data-tls`: for each replica count, a volume without and one with
/// the thing compared, on replica processes of their own, measured in turns, workload
/// by workload.
fn run_paired(args: &VolumeArgs, compared: Compared) -> Result<()> {
    let mut report = Report {
        json: args.json,
        rows: Vec::new(),
    };
    // A fixed key: the cost of AES-XTS does not depend on it.
    let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(41).wrapping_add(7)).collect();
    let cipher =
        std::sync::Arc::new(horn_engine::crypt::VolumeCipher::from_key(&key).map_err(anyhow::Error::msg)?);
    // For --data-tls: a CA of the run's own, and one node's credentials for the
    // engine and every replica (control over mutual TLS on both sides).
    let pki = tempfile::tempdir()?;
    let ca = horn_pki::Ca::generate("bench")?;
    ca.issue(
        &horn_pki::Role::Node("bench".into()),
        &[],
        horn_pki::Validity::Days(1),
    )?
    .save(pki.path(), "node")?;
    let live = horn_pki::LiveCredentials::open(pki.path(), "node")?;
    let creds = pki
        .path()
        .to_str()
        .context("a temporary path is not UTF-8")?
        .to_string();
    let (part, peer) = match compared {
        Compared::Encrypted => (
            "encrypted",
            "the same engine on an unencrypted volume, in turns in the same run",
        ),
        Compared::DataTls => (
            "data-tls",
            "the same engine on the plain data wire (control over mutual TLS both times), in turns in the same run",
        ),
    };
    for &n in &args.replicas {
        if n == 0 {
            bail!("--replicas takes counts of at least 1");
        }
        let scratch = tempfile::Builder::new()
            .prefix("horn-bench-volume-")
            .tempdir_in(&args.dir)
            .with_context(|| format!("cannot make a scratch directory in {}", args.dir.display()))?;
        eprintln!(
            "starting 2 x {n} replica process(es) of {} in {}",
            human_bytes(args.size),
            args.dir.display()
        );
        let start = |side: &str, on: bool| -> Result<(Vec<ReplicaProcess>, Volume)> {
            let mut extra = Vec::new();
            if compared == Compared::DataTls {
                extra.extend(["--credentials", creds.as_str()]);
                if on {
                    extra.push("--data-tls");
                }
            }
            let replicas: Vec<ReplicaProcess> = (0..n)
                .map(|i| {
                    ReplicaProcess::start_full(
                        &scratch.path().join(format!("{side}-{i}")),
                        args.size,
                        horn_replica::CacheMode::Direct,
                        &extra,
                    )
                })
                .collect::<Result<_>>()?;
            let addrs: Vec<ReplicaAddr> = replicas.iter().map(|r| r.addr.clone()).collect();
            let mut options = horn_engine::StartOptions::default();
            match compared {
                Compared::Encrypted => options.cipher = on.then(|| cipher.clone()),
                Compared::DataTls => {
                    options.tls = Some(horn_manager::daemon::node_client_tls(&live));
                    if on {
                        let dialer = horn_pki::DataTlsDialer::new(live.clone());
                        options.data_tls =
                            Some(horn_proto::auth::DataDial::new(move |r| dialer.local_for(r)));
                    }
                }
            }
            let (mut volume, started) = Volume::start_with(&addrs, Duration::from_secs(8), options)?;
            if started.used.len() != n {
                bail!(
                    "only {} of {n} replicas could be used: {:?}",
                    started.used.len(),
                    started.skipped
                );
            }
            eprintln!("filling the {side} volume");
            fill(&mut volume)?;
            Ok((replicas, volume))
        };
        let (plain_replicas, mut plain) = start("plain", false)?;
        let (enc_replicas, mut enc) = start(part, true)?;
        let runtime = Duration::from_secs(args.runtime);
        let secs = args.runtime as f64;
        for w in WORKLOADS {
            if !args.workloads.is_empty() && !args.workloads.iter().any(|x| x == w.name) {
                continue;
            }
            let (p_iops, p_lat, p_cpu) = metered(&mut plain, w, runtime, args.queues)?;
            let (e_iops, e_lat, e_cpu) = metered(&mut enc, w, runtime, args.queues)?;
            report.emit(json!({
                "bench": "volume",
                "part": part,
                "workload": w.name,
                "replicas": n,
                "iops": e_iops.round(),
                "lat_us_mean": round2(e_lat),
                "peer": peer,
                "peer_iops": p_iops.round(),
                "peer_lat_us_mean": round2(p_lat),
                "added_lat_us": round2(e_lat - p_lat),
                "ratio": round2(e_iops / p_iops),
                "target": (compared == Compared::Encrypted && w.bs == 4096 && w.qd == 32).then_some(0.85),
                "cpu_us_per_io": e_cpu.map(|c| round2(c.us_per_io(e_iops, secs))),
                "peer_cpu_us_per_io": p_cpu.map(|c| round2(c.us_per_io(p_iops, secs))),
                "queues": args.queues,
                "runtime_s": args.runtime,
            }));
        }
        plain.close()?;
        enc.close()?;
        drop((plain_replicas, enc_replicas));
    }
    report.finish();
    Ok(())
}

/// Runs the volume benchmark.
pub fn run(args: VolumeArgs) -> Result<()> {
    if args.encrypted {
        return run_paired(&args, Compared::Encrypted);
    }
    if args.data_tls {
        return run_paired(&args, Compared::DataTls);
    }
    if !fio::available() {
        bail!("fio is not installed: run scripts/install-deps (or apt-get install fio)");
    }
    let mut report = Report {
        json: args.json,
        rows: Vec::new(),
    };
    let counts = if args.running.is_empty() {
        args.replicas.clone()
    } else {
        vec![args.running.len()]
    };
    for n in counts {
        if n == 0 {
            bail!("--replicas takes counts of at least 1");
        }
        let scratch = tempfile::Builder::new()
            .prefix("horn-bench-volume-")
            .tempdir_in(&args.dir)
            .with_context(|| format!("cannot make a scratch directory in {}", args.dir.display()))?;
        let replicas: Vec<ReplicaProcess> = if args.running.is_empty() {
            eprintln!(
                "starting {n} replica process(es) of {} in {}",
                human_bytes(args.size),
                args.dir.display()
            );
            (0..n)
                .map(|i| ReplicaProcess::start(&scratch.path().join(format!("replica-{i}")), args.size))
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        let addrs: Vec<ReplicaAddr> = if args.running.is_empty() {
            replicas.iter().map(|r| r.addr.clone()).collect()
        } else {
            args.running.clone()
        };
        let (mut volume, started) = Volume::start(&addrs, Duration::from_secs(8))?;
        if started.used.len() != n {
            bail!(
                "only {} of {n} replicas could be used: {:?}",
                started.used.len(),
                started.skipped
            );
        }
        eprintln!(
            "engine started: generation {}, {} on replicas {}",
            started.generation,
            human_bytes(started.size),
            started.used.join(", ")
        );
        let size = volume.size().min(args.size);
        eprintln!("filling the volume and {n} plain file(s)");
        fill(&mut volume)?;
        let plains: Vec<PathBuf> = (0..n)
            .map(|i| scratch.path().join(format!("plain-{i}.img")))
            .collect();
        for p in &plains {
            fill_plain(p, size)?;
        }
        let runtime = Duration::from_secs(args.runtime);
        for w in WORKLOADS {
            if !args.workloads.is_empty() && !args.workloads.iter().any(|x| x == w.name) {
                continue;
            }
            let (iops, lat, cpu) = metered(&mut volume, w, runtime, args.queues)?;
            let peer_meter = CpuMeter::start();
            // A write to n replicas against fio writing n files at the same total depth,
            // where that depth can be shared; otherwise one file at the same depth.
            let (peer, peer_desc) = if w.write && n > 1 && w.qd >= n {
                let files: Vec<&Path> = plains.iter().map(PathBuf::as_path).collect();
                (
                    fio::run_many(&files, w.fio_rw, w.bs, w.qd as u32, args.runtime, size)?,
                    format!("fio writing {n} plain files in parallel at total depth {}", w.qd),
                )
            } else {
                (
                    fio::run(&plains[0], w.fio_rw, w.bs, w.qd as u32, args.runtime, size)?,
                    "fio io_uring O_DIRECT on one plain file".to_string(),
                )
            };
            let peer_cpu = peer_meter.stop();
            let secs = args.runtime as f64;
            report.emit(json!({
                "bench": "volume",
                "part": "io",
                "workload": w.name,
                "replicas": n,
                "iops": iops.round(),
                "lat_us_mean": round2(lat),
                "peer": peer_desc,
                "peer_iops": peer.iops.round(),
                "peer_lat_us_mean": round2(peer.lat_us_mean),
                "added_lat_us": round2(lat - peer.lat_us_mean),
                "ratio": round2(iops / peer.iops),
                "cpu_busy": cpu.map(|c| round2(c.busy)),
                "cpu_us_per_io": cpu.map(|c| round2(c.us_per_io(iops, secs))),
                "peer_cpu_busy": peer_cpu.map(|c| round2(c.busy)),
                "peer_cpu_us_per_io": peer_cpu.map(|c| round2(c.us_per_io(peer.iops, secs))),
                "queues": args.queues,
                "size_bytes": volume.size(),
                "runtime_s": args.runtime,
            }));
        }
        volume.close()?;
        drop(replicas);
    }
    report.finish();
    Ok(())
}
