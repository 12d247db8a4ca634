//! Reconciliation after an engine crash, and online verification, against real replica
//! processes (`hornd replica`):
//! - a write that reached one replica only is found through the write-intent record
//!   and copied, and only the marked region is compared;
//! - an engine process killed with SIGKILL in the middle of a random write stream,
//!   many times: after each restart every replica is identical (checked by checksum)
//!   and every acknowledged write is there;
//! - `hornctl engine verify` reports identical replicas, and the offset of a block
//!   changed behind the engine's back.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{eventually, Daemon, EngineDaemon};
use horn_engine::replica_set::IoKind;
use horn_engine::{ReplicaAddr, Volume, VolumeCompletion};
use horn_proto::wire::Status;
use horn_replica::intent::REGION_SIZE;
use horn_replica::IoBuf;
use rand::{rngs::SmallRng, Rng, SeedableRng};

const SIZE: u64 = 128 << 20;
const BLOCK: u64 = 4096;
const TIMEOUT: Duration = Duration::from_secs(5);

struct Cluster {
    daemons: Vec<Daemon>,
    tmp: tempfile::TempDir,
}

impl Cluster {
    fn start(n: usize) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let daemons = (0..n)
            .map(|i| Daemon::start(&tmp.path().join(format!("r{i}")), &["--size", "128M"]).unwrap())
            .collect();
        Cluster { daemons, tmp }
    }

    fn addrs(&self) -> Vec<ReplicaAddr> {
        self.daemons.iter().map(Daemon::replica_addr).collect()
    }

    /// The replicas as the crash writer takes them.
    fn addr_list(&self) -> String {
        self.addrs()
            .iter()
            .map(|a| format!("{},{}", a.data, a.control))
            .collect::<Vec<_>>()
            .join(";")
    }

    /// Kills replica `k`'s process and serves its directory again (new ports).
    fn restart(&mut self, k: usize) {
        self.daemons[k].signal(libc::SIGKILL);
        let _ = self.daemons[k].child.wait();
        self.daemons[k] = Daemon::start(&self.tmp.path().join(format!("r{k}")), &[]).unwrap();
    }
}

/// A block's contents for `version`: the block number and version, then bytes derived
/// from both, so a torn or misplaced block is caught.
fn block_bytes(blk: u64, version: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    b[..8].copy_from_slice(&blk.to_le_bytes());
    b[8..16].copy_from_slice(&version.to_le_bytes());
    for (i, x) in b[16..].iter_mut().enumerate() {
        *x = (blk as u8) ^ (version as u8) ^ (i as u8);
    }
    b
}

/// The version a block holds, or an error naming what is wrong with it.
fn decode(blk: u64, b: &[u8]) -> Result<u64, String> {
    if b.iter().all(|&x| x == 0) {
        return Ok(0);
    }
    let got_blk = u64::from_le_bytes(b[..8].try_into().unwrap());
    let version = u64::from_le_bytes(b[8..16].try_into().unwrap());
    if got_blk != blk || b != block_bytes(blk, version) {
        return Err(format!(
            "block {blk} holds bytes no write put there (claims block {got_blk})"
        ));
    }
    Ok(version)
}

/// The writer's side of the crash test, run in a child process (this test binary,
/// re-executed): an engine of its own on the replicas, random writes of 4-256 KiB at QD16
/// into the regions given, each acknowledged write logged (`block version` lines)
/// as it completes, until it is killed.
fn run_writer(replicas: &str, regions: &str, first_version: u64, log: &str) -> ! {
    let addrs: Vec<ReplicaAddr> = replicas.split(';').map(|s| s.parse().unwrap()).collect();
    let regions: Vec<u64> = regions.split(',').map(|s| s.parse().unwrap()).collect();
    let mut log = std::fs::OpenOptions::new().append(true).open(log).unwrap();
    let (mut v, _) = Volume::start(&addrs, TIMEOUT).unwrap();
    // libtest may print its own words before ours on the line.
    println!("HORN-WRITER-READY");
    std::io::stdout().flush().unwrap();
    let mut rng = SmallRng::seed_from_u64(first_version);
    let mut version = first_version;
    // tag -> (first block, blocks, version)
    let mut pending: BTreeMap<u64, (u64, u64, u64)> = BTreeMap::new();
    let mut out: Vec<VolumeCompletion> = Vec::new();
    let blocks_per_region = REGION_SIZE / BLOCK;
    loop {
        while pending.len() < 16 {
            // Mostly 4 KiB, some up to 256 KiB: a large write still on its way to some
            // replicas when the process dies is how they come to differ.
            let n = if rng.gen_bool(0.7) {
                1
            } else {
                rng.gen_range(2..=64)
            };
            let region = regions[rng.gen_range(0..regions.len())];
            let blk = region * blocks_per_region + rng.gen_range(0..blocks_per_region - n + 1);
            if pending.values().any(|&(b, m, _)| b < blk + n && blk < b + m) {
                continue;
            }
            version += 1;
            pending.insert(version, (blk, n, version));
            let data: Vec<u8> = (blk..blk + n).flat_map(|b| block_bytes(b, version)).collect();
            v.submit(
                IoKind::Write,
                blk * BLOCK,
                0,
                Some(IoBuf::from_slice(&data)),
                version,
            );
        }
        out.clear();
        v.reap(1, &mut out).unwrap();
        let mut lines = String::new();
        for c in out.drain(..) {
            let (blk, n, ver) = pending.remove(&c.tag).unwrap();
            c.result.unwrap();
            for b in blk..blk + n {
                lines.push_str(&format!("{b} {ver}\n"));
            }
        }
        // The page cache keeps it when this process is killed.
        log.write_all(lines.as_bytes()).unwrap();
    }
}

/// Checks every replica is identical and every acknowledged write is there, with an
/// engine of the test's own; closes it cleanly. Returns what reconciliation did.
fn check(cluster: &Cluster, acked: &BTreeMap<u64, u64>) -> horn_engine::ReconcileReport {
    let (mut v, report) = Volume::start(&cluster.addrs(), TIMEOUT).unwrap();
    assert_eq!(report.used.len(), cluster.daemons.len(), "{report:?}");
    let verified = v.verify(|_, _| {}).unwrap();
    assert_eq!(verified.bytes_compared, SIZE);
    assert_eq!(verified.replicas.len(), 3);
    assert!(
        verified.differences.is_empty(),
        "replicas differ after reconciliation: {:?}",
        verified.differences
    );
    let mut b = vec![0u8; BLOCK as usize];
    for (&blk, &ver) in acked {
        v.read_at(blk * BLOCK, &mut b).unwrap();
        let got = decode(blk, &b).unwrap();
        assert!(
            got >= ver,
            "block {blk}: write {ver} was acknowledged, the volume holds {got}"
        );
    }
    v.close().unwrap();
    report.reconciled
}

#[test]
fn an_engine_killed_mid_write_stream_many_times_leaves_identical_replicas_with_every_acked_write() {
    // The child processes run this same test, which takes the writer's part.
    if let Ok(log) = std::env::var("HORN_CRASH_WRITER_LOG") {
        run_writer(
            &std::env::var("HORN_CRASH_REPLICAS").unwrap(),
            &std::env::var("HORN_CRASH_REGIONS").unwrap(),
            std::env::var("HORN_CRASH_VERSION").unwrap().parse().unwrap(),
            &log,
        );
    }
    let mut cluster = Cluster::start(3);
    let tmp = tempfile::tempdir().unwrap();
    let log_path: PathBuf = tmp.path().join("acked");
    let seed: u64 = std::env::var("HORN_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (HORN_CRASH_SEED replays it)");
    let mut rng = SmallRng::seed_from_u64(seed);
    // Block -> the newest version acknowledged.
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    let regions_total = SIZE / REGION_SIZE;
    let (mut differing, mut copied) = (0, 0);
    const CYCLES: u64 = 12;
    for cycle in 0..CYCLES {
        std::fs::write(&log_path, b"").unwrap();
        let a = rng.gen_range(0..regions_total);
        let b = (a + 1 + rng.gen_range(0..regions_total - 1)) % regions_total;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "an_engine_killed_mid_write_stream_many_times_leaves_identical_replicas_with_every_acked_write",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("HORN_CRASH_WRITER_LOG", &log_path)
            .env("HORN_CRASH_REPLICAS", cluster.addr_list())
            .env("HORN_CRASH_REGIONS", format!("{a},{b}"))
            .env("HORN_CRASH_VERSION", ((cycle + 1) << 32).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // Wait until it writes, then let it run a while.
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        loop {
            let line = lines.next().expect("the writer exited before writing").unwrap();
            if line.contains("HORN-WRITER-READY") {
                break;
            }
        }
        // Let it acknowledge a random number of block writes first.
        let target = rng.gen_range(100..3000);
        let acked_lines =
            || std::fs::read(&log_path).map_or(0, |t| t.iter().filter(|&&c| c == b'\n').count());
        eventually(
            Duration::from_secs(120),
            "the writer stopped acknowledging writes",
            || acked_lines() >= target,
        );
        // Every other time one replica is stalled (SIGSTOP) for the last moments, as a
        // slow replica is, and dies with the engine (the node went down): the writes
        // waiting in its socket are lost to it while the others hold them. Killed once
        // some wait there (or, if the engine sent it nothing more, after 2 s).
        let stalled = (cycle % 2 == 1).then(|| rng.gen_range(0..cluster.daemons.len()));
        if let Some(k) = stalled {
            cluster.daemons[k].signal(libc::SIGSTOP);
            let since = std::time::Instant::now();
            while common::unread_bytes(&cluster.daemons[k].addr) == 0
                && since.elapsed() < Duration::from_secs(2)
            {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        if let Some(k) = stalled {
            cluster.restart(k);
        }
        let text = std::fs::read_to_string(&log_path).unwrap();
        let mut n = 0;
        for line in text.lines() {
            let (blk, ver) = line.split_once(' ').unwrap();
            let (blk, ver): (u64, u64) = (blk.parse().unwrap(), ver.parse().unwrap());
            let e = acked.entry(blk).or_insert(0);
            *e = (*e).max(ver);
            n += 1;
        }
        assert!(
            n > 0,
            "cycle {cycle}: the writer acknowledged nothing before it was killed"
        );
        let report = check(&cluster, &acked);
        println!(
            "cycle {cycle}: killed after {n} acknowledged block writes in regions {a},{b} (stalled replica: \
             {stalled:?}); reconciled {} regions, {} blocks differed, {} bytes copied",
            report.regions, report.blocks_differing, report.bytes_copied
        );
        assert!(
            report.regions >= 1 && report.regions <= 2,
            "only the two regions written can be marked, found {}",
            report.regions
        );
        assert_eq!(report.bytes_compared, report.regions * REGION_SIZE);
        differing += report.blocks_differing;
        copied += report.bytes_copied;
    }
    println!(
        "{CYCLES} crashes: {differing} blocks differed between replicas and were copied ({copied} bytes)"
    );
    // The stalled replicas lose the writes in their sockets: without that the test
    // would not show that reconciliation repairs anything.
    assert!(
        differing > 0,
        "no crash left the replicas different; the test proved nothing"
    );
}

#[test]
fn a_write_that_reached_one_replica_only_is_copied_at_start_and_only_its_region_compared() {
    let cluster = Cluster::start(3);
    let (v, report) = Volume::start(&cluster.addrs(), TIMEOUT).unwrap();
    assert_eq!(report.reconciled.regions, 0, "{:?}", report.reconciled);
    let generation = v.generation();
    // The engine dies (dropped without closing: the replicas stay claimed and dirty).
    drop(v);
    // A write the dead engine had sent to the first replica only.
    let offset = 5 * REGION_SIZE + 12 * BLOCK;
    let data = block_bytes(offset / BLOCK, 7);
    let (h, msg) = cluster.daemons[0]
        .client_as_holder()
        .write(1, offset, &data, generation)
        .unwrap();
    assert_eq!(h.status, Status::Ok, "{}", String::from_utf8_lossy(&msg));

    let (mut v, report) = Volume::start(&cluster.addrs(), TIMEOUT).unwrap();
    let r = report.reconciled;
    assert_eq!(r.regions, 1, "{r:?}");
    assert_eq!(r.bytes_compared, REGION_SIZE);
    // One block differs on each of the two other replicas.
    assert_eq!(r.blocks_differing, 2, "{r:?}");
    assert_eq!(r.bytes_copied, 2 * BLOCK);
    assert_eq!(r.source.as_deref(), Some(cluster.daemons[0].addr.as_str()));
    let verified = v.verify(|_, _| {}).unwrap();
    assert!(verified.differences.is_empty(), "{:?}", verified.differences);
    let mut b = vec![0u8; BLOCK as usize];
    for _ in 0..3 {
        // Reads go round the replicas: each one holds the block now.
        v.read_at(offset, &mut b).unwrap();
        assert_eq!(b, data);
    }
    v.close().unwrap();
    // A clean close leaves nothing marked: the next start compares nothing.
    let (v, report) = Volume::start(&cluster.addrs(), TIMEOUT).unwrap();
    assert_eq!(report.reconciled.regions, 0, "{:?}", report.reconciled);
    v.close().unwrap();
}

#[test]
fn hornctl_verify_reports_identical_replicas_and_the_offset_of_a_difference() {
    let cluster = Cluster::start(2);
    let refs: Vec<&Daemon> = cluster.daemons.iter().collect();
    let mut engine = EngineDaemon::start(&refs).unwrap();
    let out = engine.hornctl(&["verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("verified 128.0 MiB on 2 replicas: identical"),
        "{text}"
    );

    // Change one block of the second replica behind the engine's back.
    let generation: u64 = {
        let info = engine.hornctl(&["--json", "info"]);
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        v["generation"].as_u64().unwrap()
    };
    let offset = 3 * REGION_SIZE + 40 * BLOCK;
    let (h, _) = cluster.daemons[1]
        .client_as_holder()
        .write(1, offset, &[0xee; BLOCK as usize], generation)
        .unwrap();
    assert_eq!(h.status, Status::Ok);
    let out = engine.hornctl(&["verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}{err}");
    assert!(text.contains(&format!("{offset} ")), "{text}");
    assert!(text.contains(&cluster.daemons[1].addr), "{text}");
    assert!(err.contains("differ in 4096 bytes"), "{err}");
    let out = engine.hornctl(&["--json", "verify"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["differences"][0]["offset"].as_u64(), Some(offset));
    assert_eq!(v["differences"][0]["length"].as_u64(), Some(BLOCK));
    engine.child.kill().unwrap();
    let _ = engine.child.wait();
}
