//! `horn-bench iscsi`: Horn's iSCSI target (an engine on one replica, hosted in its
//! process unless `--replica-host process`) against tgt serving a plain file on the
//! same filesystem, in the same run. Two clients, with no kernel initiator needed:
//! libiscsi's `iscsi-perf` (4 KiB random reads at QD32 and QD1), and fio through
//! `qemu-nbd`, which bridges each LUN to fio's nbd engine (4 KiB random reads and
//! writes at QD32). Both sides start from a dropped page cache, and each workload runs
//! `--rounds` times per side, alternating which goes first.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use crate::frontend::{drop_page_cache, FrontendRunArgs, FrontendVolume};
use crate::report::Report;
use crate::store::{fill_plain, round2};

/// Arguments of `horn-bench iscsi`.
#[derive(Debug, Args)]
pub struct IscsiArgs {
    #[command(flatten)]
    run: FrontendRunArgs,
    /// Rounds per workload: each round runs both sides, which goes first alternating;
    /// the figures are each side's median (this machine's throughput drifts by up to
    /// 2x between runs seconds apart).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=15))]
    rounds: u32,
}

/// Each side's median IOPS, and every round's pair (Horn, peer).
type Figures = (f64, f64, Vec<(f64, f64)>);

/// Runs `horn` and `peer` for `rounds` rounds, alternating which goes first, and
/// returns each side's median and every round's pair.
fn rounds(
    rounds: u32,
    mut horn: impl FnMut() -> Result<f64>,
    mut peer: impl FnMut() -> Result<f64>,
) -> Result<Figures> {
    let mut pairs = Vec::new();
    for r in 0..rounds {
        let pair = if r % 2 == 0 {
            let h = horn()?;
            (h, peer()?)
        } else {
            let p = peer()?;
            (horn()?, p)
        };
        pairs.push(pair);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    };
    let h = median(pairs.iter().map(|p| p.0).collect());
    let p = median(pairs.iter().map(|p| p.1).collect());
    Ok((h, p, pairs))
}

/// A child process killed when dropped.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn need(tool: &str, package: &str) -> Result<()> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        bail!("{tool} is not installed: apt-get install {package} (scripts/install-deps)");
    }
    Ok(())
}

/// A private tgtd serving `file` as LUN 1 of `iqn` on `port`.
fn start_tgt(scratch: &Path, file: &Path, port: u16, iqn: &str) -> Result<Kill> {
    let socket = scratch.join("tgt.socket");
    let child = Command::new("tgtd")
        .args(["-f", "--iscsi", &format!("portal=127.0.0.1:{port}")])
        .env("TGT_IPC_SOCKET", &socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start tgtd")?;
    let tgtd = Kill(child);
    let ipc = PathBuf::from(format!("{}.0", socket.display()));
    for _ in 0..100 {
        if ipc.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let file = file.display().to_string();
    for args in [
        vec!["--op", "new", "--mode", "target", "--tid", "1", "-T", iqn],
        vec![
            "--op",
            "new",
            "--mode",
            "logicalunit",
            "--tid",
            "1",
            "--lun",
            "1",
            "-b",
            &file,
        ],
        vec!["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"],
    ] {
        let st = Command::new("tgtadm")
            .args(["--lld", "iscsi"])
            .args(&args)
            .env("TGT_IPC_SOCKET", &socket)
            .status()
            .context("cannot run tgtadm")?;
        if !st.success() {
            bail!("tgtadm {args:?} failed");
        }
    }
    Ok(tgtd)
}

/// `iscsi-perf` random 4 KiB reads at `depth`: its average IOPS.
fn iscsi_perf(url: &str, depth: u32, runtime: u64) -> Result<f64> {
    let out = Command::new("iscsi-perf")
        .args([
            "-t",
            &runtime.to_string(),
            "-m",
            &depth.to_string(),
            "-b",
            "8",
            "-r",
            url,
        ])
        .output()
        .context("cannot run iscsi-perf")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let iops = text
        .rsplit("iops average ")
        .next()
        .filter(|_| text.contains("iops average "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok());
    match iops {
        Some(n) => Ok(n),
        None => bail!(
            "iscsi-perf on {url} printed no average: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// `qemu-nbd` exporting the LUN at `url` on `port`.
fn nbd_bridge(url: &str, port: u16) -> Result<Kill> {
    let child = Command::new("qemu-nbd")
        .args([
            "--persistent",
            "--shared=8",
            "-f",
            "raw",
            "--cache=none",
            "-b",
            "127.0.0.1",
        ])
        .args(["-p", &port.to_string(), "-x", "lun", url])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start qemu-nbd")?;
    let bridge = Kill(child);
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(bridge);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("qemu-nbd did not start for {url}")
}

/// fio's nbd engine on the bridge at `port`: IOPS.
fn fio_nbd(port: u16, rw: &str, bs: &str, depth: u32, runtime: Option<u64>, size: u64) -> Result<f64> {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=nbd",
        "--ioengine=nbd",
        "--output-format=json",
        "--norandommap",
        "--randrepeat=0",
    ])
    .arg(format!("--uri=nbd://127.0.0.1:{port}/lun"))
    .arg(format!("--rw={rw}"))
    .arg(format!("--bs={bs}"))
    .arg(format!("--iodepth={depth}"))
    .arg(format!("--size={size}"));
    if let Some(r) = runtime {
        cmd.args([format!("--runtime={r}"), "--time_based".into()]);
    }
    let out = cmd.output().context("cannot run fio")?;
    if !out.status.success() {
        bail!("fio over nbd failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    // fio's nbd engine may print notes before the JSON.
    let text = String::from_utf8_lossy(&out.stdout);
    let json = text.find("\n{").map_or(&text[..], |at| &text[at + 1..]);
    let v: serde_json::Value = serde_json::from_str(json).with_context(|| {
        format!(
            "fio printed no JSON: {}",
            text.chars().take(200).collect::<String>()
        )
    })?;
    let side = if rw.contains("read") { "read" } else { "write" };
    v["jobs"][0][side]["iops"]
        .as_f64()
        .context("fio JSON has no iops")
}

/// Runs the iSCSI benchmark.
pub fn run(args: IscsiArgs) -> Result<()> {
    for (tool, package) in [
        ("iscsi-perf", "libiscsi-bin"),
        ("tgtd", "tgt"),
        ("qemu-nbd", "qemu-utils qemu-block-extra"),
        ("fio", "fio"),
    ] {
        need(tool, package)?;
    }
    let FrontendVolume {
        scratch,
        replica: _replica,
        engine,
    } = args.run.start_volume("iscsi", ", and tgt on a file there")?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let horn_addr = listener.local_addr()?;
    let iqn = "iqn.2026-11.io.horn:bench".to_string();
    let target = Arc::new(horn_iscsi::target::Target::new(
        engine.clone(),
        iqn.clone(),
        horn_addr.to_string(),
        Default::default(),
        false,
    ));
    {
        let target = target.clone();
        std::thread::spawn(move || horn_iscsi::listener::serve(target, listener));
    }
    let horn_url = format!("iscsi://{horn_addr}/{iqn}/0");

    let file = scratch.path().join("tgt.img");
    fill_plain(&file, args.run.size)?;
    let tgt_port = free_port()?;
    let tgt_iqn = "iqn.2026-11.io.horn:bench-tgt";
    let _tgtd = start_tgt(scratch.path(), &file, tgt_port, tgt_iqn)?;
    let tgt_url = format!("iscsi://127.0.0.1:{tgt_port}/{tgt_iqn}/1");

    // fio through qemu-nbd; Horn's volume is written once first, so that reads find
    // data as they do in tgt's file.
    let (horn_nbd, tgt_nbd) = (free_port()?, free_port()?);
    let horn_bridge = nbd_bridge(&horn_url, horn_nbd)?;
    let tgt_bridge = nbd_bridge(&tgt_url, tgt_nbd)?;
    eprintln!("filling the volume through the target");
    fio_nbd(horn_nbd, "write", "1M", 8, None, args.run.size)?;
    // tgt's file was written around the page cache, Horn's volume through it.
    drop_page_cache();

    let mut report = Report {
        json: args.run.json,
        rows: Vec::new(),
    };
    let mut emit = |workload: &str, client: &str, (horn, peer, pairs): Figures| {
        report.emit(json!({
            "bench": "iscsi",
            "part": "io",
            "workload": workload,
            "client": client,
            "replicas": 1,
            "replica_cache": args.run.replica_cache.to_string(),
            "replica_host": args.run.replica_host.to_string(),
            "iops": horn.round(),
            "peer": "tgt (Debian's tgtd) serving a plain file on the same filesystem",
            "peer_iops": peer.round(),
            "ratio": round2(horn / peer),
            "rounds": pairs.iter().map(|&(h, p)| json!({"iops": h.round(), "peer_iops": p.round()})).collect::<Vec<_>>(),
            "size_bytes": args.run.size,
            "runtime_s": args.run.runtime,
        }));
    };
    for (name, rw, depth) in [
        ("randread-4k-qd32", "randread", 32),
        ("randwrite-4k-qd32", "randwrite", 32),
    ] {
        let run = |port| fio_nbd(port, rw, "4k", depth, Some(args.run.runtime), args.run.size);
        let figures = rounds(args.rounds, || run(horn_nbd), || run(tgt_nbd))?;
        emit(name, "fio nbd engine through qemu-nbd", figures);
    }
    drop(horn_bridge);
    drop(tgt_bridge);
    for (name, depth) in [("randread-4k-qd32", 32), ("randread-4k-qd1", 1)] {
        let run = |url: &str| iscsi_perf(url, depth, args.run.runtime);
        let figures = rounds(args.rounds, || run(&horn_url), || run(&tgt_url))?;
        emit(name, "iscsi-perf", figures);
    }
    report.finish();
    target.stop(Duration::from_secs(5));
    Ok(())
}
