//! `horn-bench cluster`: how long a user waits for a volume, how long a dead node
//! takes to be noticed and its replica replaced, and how many volume specs the
//! manager takes a second. On a cluster of network
//! namespaces on this machine (a manager and three node agents, `horn_cluster`), the
//! time from `hornctl volume create` to the volume attached and taking a write through
//! its iSCSI target (`hornctl volume attach`, then `qemu-io` writing 4 KiB), a fresh
//! volume each round, median of the rounds. The peer, measured in the same run in the
//! same namespaces: the same daemons started by hand with no manager (three
//! `hornd replica`, then `hornd engine --frontend iscsi`), timed from the first start
//! to the same first write: the floor the manager's scheduling, reporting and
//! supervision add to.
//!
//! Then, on the same cluster (node lease 5 s): a node's death (its agent and instances
//! SIGKILLed and its link cut) to the node marked down with its replica counted
//! failed (target: lease + 2 s), and to a replacement replica rebuilding with the
//! replenishment wait at 0 (target: lease + 5 s). Last, on a manager of its own with
//! three nodes registered by hand: 10,000 volume specs created by 32 callers at once
//! (target: 1,000 a second) and one list of them all (target: 500 ms).
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
    /// Volume specs created for the control-plane scale workload.
    #[arg(long, default_value_t = 10_000)]
    specs: usize,
    /// Which workloads to run: `create` (create to writable), `death` (a node's
    /// death), `scale` (specs created and listed; needs no root).
    #[arg(long, value_delimiter = ',', default_value = "create,death,scale")]
    workloads: Vec<String>,
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

/// Volume `name`'s iSCSI `endpoint` with the CHAP credentials its target requires
/// (`iscsi://USER%SECRET@PORTAL/IQN`, as qemu's initiator takes them).
fn with_chap(c: &horn_cluster::Cluster, name: &str, endpoint: &str) -> Result<String> {
    let cr = c
        .json(&["volume", "credentials", name])
        .map_err(anyhow::Error::msg)?;
    let (user, secret) = (
        cr["chap_user"].as_str().context("no CHAP user")?,
        cr["chap_secret"].as_str().context("no CHAP secret")?,
    );
    Ok(endpoint.replacen("iscsi://", &format!("iscsi://{user}%{secret}@"), 1))
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
    first_write(
        &format!("{}/0", with_chap(c, name, endpoint)?),
        Duration::from_secs(30),
    )?;
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
    // As the manager would: the volume's wire secret for replicas and engine, and
    // CHAP credentials for the target (written before the clock starts).
    std::fs::create_dir_all(&dir)?;
    let (secret, chap) = (dir.join("volume.secret"), dir.join("chap"));
    std::fs::write(&secret, horn_proto::auth::VolumeSecret::generate()?.to_hex())?;
    std::fs::write(&chap, "by-hand-chap-secret-0001")?;
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
            "--secret-file".into(),
            secret.display().to_string(),
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
        "--secret-file".into(),
        secret.display().to_string(),
        "--chap-user".into(),
        "by-hand".into(),
        "--chap-secret-file".into(),
        chap.display().to_string(),
    ]);
    let engine = by_hand(&c.net.ns(1), hornd, &args)?;
    first_write(
        &format!("iscsi://by-hand%by-hand-chap-secret-0001@{ip}:3260/iqn.2026-11.io.horn:p{round}/0"),
        Duration::from_secs(30),
    )?;
    let took = start.elapsed().as_secs_f64();
    drop(engine);
    drop(replicas);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(took)
}

/// A node's death under an attached volume: its agent and instances killed and its
/// link cut at once. Returns (seconds to the node marked down, its replica counted
/// failed; seconds to a replacement replica rebuilding), with the replenishment wait
/// at 0.
fn node_death(c: &mut horn_cluster::Cluster) -> Result<(f64, f64)> {
    let run = |c: &horn_cluster::Cluster, args: &[&str]| -> Result<serde_json::Value> {
        c.json(args).map_err(anyhow::Error::msg)
    };
    run(c, &["settings", "set", "replica-replenishment-wait-secs=0"])?;
    let v = run(
        c,
        &[
            "volume",
            "create",
            "dying",
            "--size",
            "64M",
            "--replicas",
            "3",
            "--frontend",
            "iscsi",
        ],
    )?;
    let node_of = |v: &serde_json::Value, id: &str| -> Result<usize> {
        let p = v["placements"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["id"] == id))
            .context("no such replica")?;
        Ok(p["node"].as_str().unwrap_or("n0")[1..].parse()?)
    };
    let home = node_of(&v, "r1")?;
    let victim = node_of(&v, "r3")?;
    let v = run(c, &["volume", "attach", "dying", &format!("n{home}")])?;
    let endpoint = v["endpoint"].as_str().context("no endpoint")?.to_string();
    first_write(
        &format!("{}/0", with_chap(c, "dying", &endpoint)?),
        Duration::from_secs(30),
    )?;
    let since = Instant::now();
    while run(c, &["volume", "info", "dying"])?["robustness"] != "healthy" {
        if since.elapsed() > Duration::from_secs(30) {
            bail!("the volume did not become healthy");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    c.kill_agent(victim);
    c.kill_instances(victim);
    c.net.link(victim, false).map_err(anyhow::Error::msg)?;
    let death = Instant::now();
    let (mut down, mut rebuilding) = (None, None);
    while down.is_none() || rebuilding.is_none() {
        if death.elapsed() > Duration::from_secs(120) {
            bail!("after 120 s: node down after {down:?}, replacement rebuilding after {rebuilding:?}");
        }
        if down.is_none() {
            let n = run(c, &["node", "info", &format!("n{victim}")])?;
            let v = run(c, &["volume", "info", "dying"])?;
            let r3 = v["placements"]
                .as_array()
                .and_then(|a| a.iter().find(|p| p["id"] == "r3").cloned());
            // The node down, and its replica with it (or already replaced).
            if n[0]["state"] == "down" && r3.is_none_or(|p| p["state"] == "node down") {
                down = Some(death.elapsed().as_secs_f64());
            }
        }
        if rebuilding.is_none() {
            let v = run(c, &["volume", "info", "dying"])?;
            let replaced = v["placements"].as_array().is_some_and(|a| {
                a.iter().any(|p| {
                    !["r1", "r2", "r3"].contains(&p["id"].as_str().unwrap_or(""))
                        && (p["mode"] == "WO" || p["mode"] == "RW")
                })
            });
            if replaced {
                rebuilding = Some(death.elapsed().as_secs_f64());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if std::env::var_os("HORN_BENCH_STEPS").is_some() {
        eprintln!("    the death at {:?} after the start of n{home}'s log", death);
        for path in [
            c.node_dir(home).join("agent.log"),
            c.node_dir(home).join("state/instances/engine-dying/daemon.log"),
        ] {
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("    {}:", path.display());
            for l in &lines[lines.len().saturating_sub(14)..] {
                eprintln!("      {l}");
            }
        }
    }
    Ok((down.unwrap_or_default(), rebuilding.unwrap_or_default()))
}

/// Control-plane scale: a manager of its own (no agents: three nodes registered and
/// kept ready by hand, with room for everything), `creates` volume specs of three
/// replicas created by 32 callers at once, then one `ListVolumes`. Returns (creates a
/// second, milliseconds to list).
fn scale(creates: usize) -> Result<(f64, f64)> {
    use horn_proto::manager_api as pb;
    let dir = tempfile::tempdir()?;
    horn_manager::api::ClusterIdentity::init(dir.path())?;
    let admin = horn_pki::Credentials::load(dir.path(), horn_manager::api::ADMIN_CREDENTIALS)?;
    let hornd = horn_cluster::binaries()
        .map_err(anyhow::Error::msg)?
        .join("hornd");
    let mut child = Command::new(hornd)
        .args(["manager", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("piped")).read_line(&mut line)?;
    let manager = ByHand(child);
    let addr = line
        .split_once(" on ")
        .and_then(|(_, r)| r.split_once(','))
        .map(|(a, _)| a.to_string())
        .with_context(|| format!("hornd manager did not start: {line}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let client = horn_manager::ctl::connect_with(&addr, &admin).await?;
        for n in 1..=3 {
            client
                .clone()
                .register_node(pb::Node {
                    name: format!("s{n}"),
                    address: format!("127.0.0.1:{}", 9700 + n),
                    disks: vec![pb::Disk {
                        path: "/srv/horn".into(),
                        allow_scheduling: true,
                        capacity: 1 << 50,
                        available: 1 << 50,
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .await?;
        }
        let beat = {
            let c = client.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    for n in 1..=3 {
                        let _ = c
                            .clone()
                            .node_heartbeat(pb::NodeRef {
                                name: format!("s{n}"),
                                ..Default::default()
                            })
                            .await;
                    }
                }
            })
        };
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let start = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..32 {
            let (c, next) = (client.clone(), next.clone());
            workers.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i >= creates {
                        return Ok::<(), anyhow::Error>(());
                    }
                    c.clone()
                        .create_volume(pb::CreateVolumeRequest {
                            name: format!("s{i}"),
                            size: 1 << 30,
                            replicas: 3,
                            frontend: "iscsi".into(),
                            ..Default::default()
                        })
                        .await
                        .map_err(|s| anyhow::anyhow!("create s{i}: {}", s.message()))?;
                }
            }));
        }
        for w in workers {
            w.await??;
        }
        let rate = creates as f64 / start.elapsed().as_secs_f64();
        let t = Instant::now();
        let list = client
            .clone()
            .list_volumes(pb::ListVolumesRequest {})
            .await?
            .into_inner();
        let list_ms = t.elapsed().as_secs_f64() * 1000.0;
        beat.abort();
        if list.volumes.len() != creates {
            bail!("listed {} volumes of {creates}", list.volumes.len());
        }
        Ok::<(f64, f64), anyhow::Error>((rate, list_ms))
    });
    drop(manager);
    result
}

/// Runs the benchmark.
pub fn run(args: ClusterArgs) -> Result<()> {
    if let Some(w) = args
        .workloads
        .iter()
        .find(|w| !["create", "death", "scale"].contains(&w.as_str()))
    {
        bail!("--workloads: {w:?} is not create, death or scale");
    }
    let mut report = Report {
        json: args.json,
        rows: Vec::new(),
    };
    let wants = |w: &str| args.workloads.iter().any(|x| x == w);
    if wants("create") || wants("death") {
        cluster_workloads(&args, &mut report, wants("create"), wants("death"))?;
    }
    if wants("scale") {
        scale_workload(&args, &mut report)?;
    }
    if !args.json {
        for r in &report.rows {
            println!(
                "{:<40} {:>12.3} {:<12} target {}",
                r["workload"].as_str().unwrap_or(""),
                r["value"].as_f64().unwrap_or(0.0),
                r["unit"].as_str().unwrap_or(""),
                r["target"]
            );
        }
    }
    Ok(())
}

/// The workloads on a cluster of network namespaces (root).
fn cluster_workloads(args: &ClusterArgs, report: &mut Report, create: bool, death: bool) -> Result<()> {
    if let Some(why) = horn_cluster::Cluster::unavailable() {
        bail!("horn-bench cluster cannot run here: {why}");
    }
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let hornd = horn_cluster::binaries()
        .map_err(anyhow::Error::msg)?
        .join("hornd");
    eprintln!("== a cluster of four nodes in network namespaces (node lease 5 s)");
    let mut c = horn_cluster::Cluster::start_with(4, &["node-lease-secs=5"]).map_err(anyhow::Error::msg)?;
    if create {
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
            "value": m,
            "unit": "s (median)",
            "target": 2.0,
            "rounds": args.rounds,
            "size_bytes": args.size,
            "seconds_max": max(&managed),
            "peer": "the same daemons started by hand (3 hornd replica, hornd engine --frontend iscsi)",
            "peer_value": p,
            "peer_seconds_max": max(&manual),
            "ratio": m / p,
        }));
    }
    if death {
        eprintln!("== a node's death (processes killed, link cut), replenishment wait 0");
        let (down, rebuilding) = node_death(&mut c)?;
        report.emit(json!({
            "workload": "node-death-to-down",
            "value": down,
            "unit": "s",
            "target": 5.0 + 2.0,
            "note": "node lease 5 s; the node marked down and its replica failed",
            "peer": "Longhorn: about 60 s to NotReady",
        }));
        report.emit(json!({
            "workload": "node-death-to-replacement-rebuilding",
            "value": rebuilding,
            "unit": "s",
            "target": 5.0 + 5.0,
            "note": "replica-replenishment-wait-secs 0; a new replica on the spare node, WO or RW in the engine",
            "peer": "Longhorn: about 60 s to NotReady plus a 600 s wait",
        }));
    }
    Ok(())
}

/// Specs created and listed, on a manager of its own.
fn scale_workload(args: &ClusterArgs, report: &mut Report) -> Result<()> {
    eprintln!("== control-plane scale: {} volume specs, then a list", args.specs);
    let (rate, list_ms) = scale(args.specs)?;
    report.emit(json!({
        "workload": "volume-creates",
        "value": rate,
        "unit": "creates/s",
        "target": 1000.0,
        "volumes": args.specs,
        "note": "32 callers at once, three nodes registered without agents",
    }));
    report.emit(json!({
        "workload": "volume-list",
        "value": list_ms,
        "unit": "ms",
        "target": 500.0,
        "volumes": args.specs,
    }));
    Ok(())
}
