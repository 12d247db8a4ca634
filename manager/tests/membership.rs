//! Durable membership and strict fencing, against real replica processes: a replica
//! that missed acknowledged writes (dropped, sat out, or blank) never serves again
//! until it is rebuilt; a start that reaches too few of the replicas holding every
//! acknowledged write is refused; two engines never both acknowledge; a claim needs a
//! strictly newer, bounded generation. Each test fails on the engine before durable
//! membership (issue 15), and ends with a verify of the replicas that serve.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Daemon;
use horn_engine::replica_set::Mode;
use horn_engine::{ReplicaAddr, Volume};
use horn_proto::control::replica_control_client::ReplicaControlClient;
use horn_proto::control::{ClaimRequest, Member, Membership, MembershipRequest};
use rand::{Rng, SeedableRng};

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 96;
const TIMEOUT: Duration = Duration::from_secs(3);

struct Replicas {
    daemons: Vec<Option<Daemon>>,
    dirs: Vec<PathBuf>,
    _tmp: tempfile::TempDir,
}

impl Replicas {
    fn start(n: usize) -> Replicas {
        let tmp = tempfile::tempdir().unwrap();
        let dirs: Vec<PathBuf> = (0..n).map(|i| tmp.path().join(format!("r{i}"))).collect();
        let daemons = dirs
            .iter()
            .map(|d| Some(Daemon::start(d, &["--size", "16M"]).unwrap()))
            .collect();
        Replicas {
            daemons,
            dirs,
            _tmp: tmp,
        }
    }

    fn addr(&self, i: usize) -> ReplicaAddr {
        self.daemons[i].as_ref().expect("running").replica_addr()
    }

    fn addrs(&self, which: &[usize]) -> Vec<ReplicaAddr> {
        which.iter().map(|&i| self.addr(i)).collect()
    }

    fn kill(&mut self, i: usize) {
        let d = self.daemons[i].take().expect("running");
        d.signal(libc::SIGKILL);
        drop(d);
    }

    fn restart(&mut self, i: usize) {
        assert!(self.daemons[i].is_none());
        self.daemons[i] = Some(Daemon::start(&self.dirs[i], &[]).unwrap());
    }

    /// Wipes replica `i`'s directory and serves a blank replica there, as on an
    /// unmounted disk's mount point.
    fn blank(&mut self, i: usize) {
        if self.daemons[i].is_some() {
            self.kill(i);
        }
        std::fs::remove_dir_all(&self.dirs[i]).unwrap();
        self.daemons[i] = Some(Daemon::start(&self.dirs[i], &["--size", "16M"]).unwrap());
    }
}

fn write_all(v: &mut Volume, pattern: u8) {
    for b in 0..BLOCKS {
        v.write_at(b * BLOCK, &[pattern ^ b as u8; BLOCK as usize])
            .unwrap();
    }
    v.flush().unwrap();
}

/// Reads every block through the engine (reads spread over the RW replicas) and
/// counts the blocks that do not hold `pattern`.
fn wrong_reads(v: &mut Volume, pattern: u8) -> usize {
    let mut wrong = 0;
    let mut buf = vec![0u8; BLOCK as usize];
    for _ in 0..2 {
        for b in 0..BLOCKS {
            v.read_at(b * BLOCK, &mut buf).unwrap();
            if buf.iter().any(|&x| x != pattern ^ b as u8) {
                wrong += 1;
            }
        }
    }
    wrong
}

fn verified(v: &mut Volume) {
    let report = v.verify(|_, _| {}).unwrap();
    assert!(
        report.differences.is_empty(),
        "the serving replicas differ: {report:?}"
    );
}

fn skipped_reason<'a>(report: &'a horn_engine::StartReport, addr: &ReplicaAddr) -> &'a str {
    report
        .skipped
        .iter()
        .find(|(r, _)| *r == addr.data)
        .map(|(_, why)| why.as_str())
        .unwrap_or_else(|| panic!("{} was not left out: {report:?}", addr.data))
}

#[test]
fn a_replica_dropped_under_writes_stays_out_after_a_clean_restart() {
    let mut r = Replicas::start(3);
    let (mut v, _) = Volume::start(&r.addrs(&[0, 1, 2]), TIMEOUT).unwrap();
    write_all(&mut v, 1);
    r.kill(2);
    write_all(&mut v, 2);
    assert_eq!(v.replicas()[2].1, Mode::Err);
    v.close().unwrap();
    r.restart(2);
    // The stale replica listed first, where reads and reconciliation used to look first.
    let (mut v, report) = Volume::start(&r.addrs(&[2, 0, 1]), TIMEOUT).unwrap();
    assert!(
        skipped_reason(&report, &r.addr(2)).contains("missed acknowledged writes"),
        "{report:?}"
    );
    assert_eq!(report.used, vec![r.addr(0).data, r.addr(1).data]);
    assert_eq!(wrong_reads(&mut v, 2), 0);
    verified(&mut v);
}

#[test]
fn a_replica_that_sat_out_a_newer_engine_stays_out() {
    let r = Replicas::start(3);
    let (mut v, _) = Volume::start(&r.addrs(&[0, 1, 2]), TIMEOUT).unwrap();
    write_all(&mut v, 1);
    v.close().unwrap();
    // A newer engine runs without replica 2 and closes cleanly.
    let (mut v, _) = Volume::start(&r.addrs(&[0, 1]), TIMEOUT).unwrap();
    write_all(&mut v, 2);
    v.close().unwrap();
    let (mut v, report) = Volume::start(&r.addrs(&[2, 0, 1]), TIMEOUT).unwrap();
    assert!(
        skipped_reason(&report, &r.addr(2)).contains("missed acknowledged writes"),
        "{report:?}"
    );
    assert_eq!(wrong_reads(&mut v, 2), 0);
    verified(&mut v);
}

#[test]
fn a_blank_replica_in_a_members_place_never_serves() {
    let mut r = Replicas::start(3);
    let (mut v, _) = Volume::start(&r.addrs(&[0, 1, 2]), TIMEOUT).unwrap();
    write_all(&mut v, 3);
    v.close().unwrap();
    r.blank(2);
    let (mut v, report) = Volume::start(&r.addrs(&[2, 0, 1]), TIMEOUT).unwrap();
    assert!(
        skipped_reason(&report, &r.addr(2)).contains("blank"),
        "{report:?}"
    );
    assert_eq!(wrong_reads(&mut v, 3), 0);
    verified(&mut v);
}

#[test]
fn a_start_that_reaches_too_few_current_replicas_is_refused_and_names_them() {
    let mut r = Replicas::start(3);
    let (mut v, _) = Volume::start(&r.addrs(&[0, 1, 2]), TIMEOUT).unwrap();
    write_all(&mut v, 1);
    r.kill(2);
    write_all(&mut v, 4);
    v.close().unwrap();
    r.restart(2);
    // Only the stale replica: refused, naming the two it needs.
    let err = Volume::start(&r.addrs(&[2]), TIMEOUT).err().expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("Missing"), "{msg}");
    assert!(
        msg.contains(&r.addr(0).data) && msg.contains(&r.addr(1).data),
        "{msg}"
    );
    // The stale replica with one current one: one of two is not a majority.
    assert!(Volume::start(&r.addrs(&[2, 0]), TIMEOUT).is_err());
    // The refused starts gave the stale replica nothing to win with later.
    let (mut v, report) = Volume::start(&r.addrs(&[2, 0, 1]), TIMEOUT).unwrap();
    assert_eq!(report.used, vec![r.addr(0).data, r.addr(1).data], "{report:?}");
    assert_eq!(wrong_reads(&mut v, 4), 0);
    verified(&mut v);
}

#[test]
fn two_failures_at_once_fault_the_volume_instead_of_acknowledging() {
    let mut r = Replicas::start(3);
    let (mut v, _) = Volume::start(&r.addrs(&[0, 1, 2]), TIMEOUT).unwrap();
    write_all(&mut v, 1);
    // One replica of three left: it cannot tell a crash of the other two from a new
    // engine serving them, so it stops acknowledging.
    r.kill(1);
    r.kill(2);
    let err = (0..BLOCKS)
        .find_map(|b| v.write_at(b * BLOCK, &[9u8; BLOCK as usize]).err())
        .expect("a write fails");
    let msg = err.to_string();
    assert!(
        msg.contains("faulted") || msg.contains("no healthy replica"),
        "{msg}"
    );
    let err = v.write_at(0, &[9u8; BLOCK as usize]).unwrap_err();
    assert!(err.to_string().contains("faulted"), "{err}");
    drop(v);
    // Nor does a new engine start from it alone.
    assert!(Volume::start(&r.addrs(&[0]), TIMEOUT).is_err());
}

#[test]
fn failures_one_after_another_go_down_to_the_last_replica() {
    let mut r = Replicas::start(3);
    let (mut v, _) = Volume::start(&r.addrs(&[0, 1, 2]), TIMEOUT).unwrap();
    write_all(&mut v, 1);
    r.kill(2);
    write_all(&mut v, 2);
    r.kill(1);
    write_all(&mut v, 5);
    v.close().unwrap();
    r.restart(1);
    r.restart(2);
    let (mut v, report) = Volume::start(&r.addrs(&[1, 2, 0]), TIMEOUT).unwrap();
    assert_eq!(report.used, vec![r.addr(0).data], "{report:?}");
    assert_eq!(wrong_reads(&mut v, 5), 0);
}

#[test]
fn engines_started_together_never_both_acknowledge() {
    let r = Replicas::start(3);
    let addrs = r.addrs(&[0, 1, 2]);
    let rounds: u8 = 12;
    let mut both = 0;
    for round in 0..rounds {
        // Each engine writes its own byte to every block; acknowledged writes are logged
        // with the instant they were acknowledged.
        let log: Arc<Mutex<Vec<(Instant, u64, u8)>>> = Arc::default();
        let threads: Vec<_> = [0x40u8, 0x80u8]
            .into_iter()
            .map(|tag| {
                let (addrs, log) = (addrs.clone(), log.clone());
                let value = tag | round;
                std::thread::spawn(move || {
                    let Ok((mut v, _)) = Volume::start(&addrs, TIMEOUT) else {
                        return 0;
                    };
                    let mut acked = 0;
                    for b in 0..16u64 {
                        if v.write_at(b * BLOCK, &[value; BLOCK as usize]).is_ok() {
                            log.lock().unwrap().push((Instant::now(), b, value));
                            acked += 1;
                        }
                    }
                    let _ = v.close();
                    acked
                })
            })
            .collect();
        let acked: Vec<usize> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        if acked.iter().all(|&a| a > 0) {
            both += 1;
        }
        // A replica the winner could not claim is left out (to be rebuilt): a start
        // needs two of the three.
        let (mut v, _) = Volume::start(&addrs, TIMEOUT).unwrap();
        let mut log = log.lock().unwrap().clone();
        log.sort();
        let mut buf = vec![0u8; BLOCK as usize];
        for b in 0..16u64 {
            let Some(&(_, _, last)) = log.iter().rev().find(|(_, blk, _)| *blk == b) else {
                continue;
            };
            v.read_at(b * BLOCK, &mut buf).unwrap();
            assert_eq!(
                buf[0], last,
                "round {round}, block {b}: the last acknowledged write was lost ({log:?})"
            );
        }
        verified(&mut v);
        v.close().unwrap();
    }
    println!(
        "rounds where both engines acknowledged some writes (one after the other fenced): {both} of {rounds}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_need_a_strictly_newer_bounded_generation_for_the_same_volume() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("r"), &["--size", "16M"]).unwrap();
    let mut c = ReplicaControlClient::connect(d.control.clone()).await.unwrap();
    let claim = |generation: u64, engine: &str, volume: &str| ClaimRequest {
        generation,
        engine: engine.into(),
        volume: volume.into(),
        lease_ms: 0,
    };
    let id = c
        .claim(claim(7, "engine-a", "vol-1"))
        .await
        .unwrap()
        .into_inner()
        .id;
    // The replica joins vol-1 with the first record stored on it.
    let record = Membership {
        volume: "vol-1".into(),
        generation: 7,
        version: 0,
        engine: "engine-a".into(),
        rw: vec![Member {
            id,
            name: d.addr.clone(),
        }],
        wo: vec![],
        after: vec![],
        authority: String::new(),
        cipher: String::new(),
    };
    let request = || MembershipRequest {
        record: Some(record.clone()),
    };
    c.record_membership(request()).await.unwrap();
    // Only forward.
    let err = c.record_membership(request()).await.unwrap_err();
    assert!(err.message().contains("not newer"), "{}", err.message());
    // The same engine may repeat its claim; another engine at the same generation may not.
    c.claim(claim(7, "engine-a", "vol-1")).await.unwrap();
    let err = c.claim(claim(7, "engine-b", "vol-1")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("does not exceed"), "{}", err.message());
    // No generation that would leave nobody a next one.
    let err = c.claim(claim(u64::MAX, "engine-b", "vol-1")).await.unwrap_err();
    assert!(err.message().contains("beyond the largest"), "{}", err.message());
    // A replica of one volume is never claimed for another.
    let err = c.claim(claim(8, "engine-b", "vol-2")).await.unwrap_err();
    assert!(
        err.message().contains("belongs to volume vol-1"),
        "{}",
        err.message()
    );
    c.claim(claim(8, "engine-b", "vol-1")).await.unwrap();
    // The old engine may no longer record anything.
    let err = c.record_membership(request()).await.unwrap_err();
    assert!(err.message().contains("held by engine-b"), "{}", err.message());
}

#[test]
fn an_operator_salvages_a_volume_from_one_replica_knowingly() {
    let mut r = Replicas::start(3);
    let (mut v, _) = Volume::start(&r.addrs(&[0, 1, 2]), TIMEOUT).unwrap();
    write_all(&mut v, 1);
    v.close().unwrap();
    // Two replicas are gone for good: a start from the third alone is refused.
    r.kill(0);
    r.kill(1);
    assert!(Volume::start(&r.addrs(&[2]), TIMEOUT).is_err());
    r.kill(2);
    let salvage = |dir: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_hornctl"))
            .args(["replica", "salvage"])
            .arg(dir)
            .args(["--above", "10"])
            .output()
            .unwrap()
    };
    let out = salvage(&r.dirs[2]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("only RW member"));
    r.restart(2);
    let (mut v, report) = Volume::start(&r.addrs(&[2]), TIMEOUT).unwrap();
    assert!(report.generation > 11, "{report:?}");
    assert_eq!(wrong_reads(&mut v, 1), 0);
    v.close().unwrap();
    // The others come back: they follow the salvaged one, left out to be rebuilt.
    r.restart(0);
    r.restart(1);
    let (_v, report) = Volume::start(&r.addrs(&[0, 1, 2]), TIMEOUT).unwrap();
    assert_eq!(report.used, vec![r.addr(2).data], "{report:?}");
    // A blank replica has nothing to salvage.
    let blank = tempfile::tempdir().unwrap();
    horn_replica::Replica::create(blank.path().join("b"), 16 << 20, 512)
        .unwrap()
        .close()
        .unwrap();
    let out = salvage(&blank.path().join("b"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("blank"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_hung_replica_costs_intent_clearing_one_deadline_and_is_dropped_durably() {
    let r = Replicas::start(3);
    let timeout = Duration::from_secs(1);
    let (mut v, _) = Volume::start(&r.addrs(&[0, 1, 2]), timeout).unwrap();
    write_all(&mut v, 1);
    r.daemons[2].as_ref().unwrap().signal(libc::SIGSTOP);
    let t = Instant::now();
    v.clean_intents().unwrap();
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "intent clearing waited {took:?} on a hung replica"
    );
    write_all(&mut v, 2);
    assert_eq!(v.replicas()[2].1, Mode::Err);
    v.close().unwrap();
    r.daemons[2].as_ref().unwrap().signal(libc::SIGCONT);
    let (mut v, report) = Volume::start(&r.addrs(&[2, 0, 1]), TIMEOUT).unwrap();
    assert!(
        skipped_reason(&report, &r.addr(2)).contains("missed"),
        "{report:?}"
    );
    assert_eq!(wrong_reads(&mut v, 2), 0);
    verified(&mut v);
}

#[test]
fn a_chain_operation_that_fails_on_one_replica_drops_it_durably() {
    let r = Replicas::start(3);
    let (mut v, _) = Volume::start(&r.addrs(&[0, 1, 2]), TIMEOUT).unwrap();
    write_all(&mut v, 1);
    // The third replica already has a snapshot of that name: its part will fail.
    let generation = v.generation();
    let daemon = r.daemons[2].as_ref().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = daemon.control_as_holder().await;
        c.snapshot(horn_proto::control::SnapshotRequest {
            generation,
            name: "s".into(),
            labels: Default::default(),
        })
        .await
        .unwrap();
    });
    v.snapshot("s").unwrap();
    assert_eq!(
        v.replicas()[2].1,
        Mode::Err,
        "the replica whose part failed is dropped"
    );
    write_all(&mut v, 2);
    v.close().unwrap();
    let (mut v, report) = Volume::start(&r.addrs(&[2, 0, 1]), TIMEOUT).unwrap();
    assert!(
        skipped_reason(&report, &r.addr(2)).contains("missed"),
        "{report:?}"
    );
    assert_eq!(wrong_reads(&mut v, 2), 0);
    verified(&mut v);
    // A refusal every replica would give changes nothing and drops nobody.
    let err = v.snapshot("s").unwrap_err();
    assert!(err.to_string().contains("exists"), "{err}");
    assert!(v.replicas().iter().all(|(_, m)| *m == Mode::Rw));
}

#[test]
fn listing_snapshots_says_where_the_replicas_chains_differ() {
    let r = Replicas::start(2);
    let (v, _) = Volume::start(&r.addrs(&[0, 1]), TIMEOUT).unwrap();
    let generation = v.generation();
    let daemon = r.daemons[1].as_ref().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = daemon.control_as_holder().await;
        c.snapshot(horn_proto::control::SnapshotRequest {
            generation,
            name: "only-here".into(),
            labels: Default::default(),
        })
        .await
        .unwrap();
    });
    let differences = horn_engine::control::chain_differences(&v.engine().chains());
    assert_eq!(differences.len(), 1, "{differences:?}");
    assert!(
        differences[0].contains("has snapshot only-here"),
        "{differences:?}"
    );
}

#[test]
fn overlapping_writes_in_flight_land_in_submission_order_on_every_replica() {
    use horn_engine::replica_set::IoKind;
    use horn_replica::IoBuf;
    let (_r, _hosted, _tmp, mut v) = two_processes_and_one_hosted();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed());
    let mut expected = vec![0u8; 64 << 10];
    let mut out = Vec::new();
    for round in 0..200u32 {
        // Eight writes at once into 64 KiB, each 4-32 KiB: most overlap another.
        for i in 0..8u32 {
            let blocks = rng.gen_range(1..=8u64);
            let first = rng.gen_range(0..=16 - blocks);
            let value = (round * 8 + i) as u8 | 1;
            let mut buf = IoBuf::zeroed((blocks * BLOCK) as usize);
            buf.as_mut_slice().fill(value);
            let at = (first * BLOCK) as usize;
            expected[at..at + (blocks * BLOCK) as usize].fill(value);
            v.submit(IoKind::Write, first * BLOCK, blocks * BLOCK, Some(buf), i as u64);
        }
        out.clear();
        v.reap(8, &mut out).unwrap();
        assert!(out.iter().all(|c| c.result.is_ok()));
    }
    let mut got = vec![0u8; 64 << 10];
    v.read_at(0, &mut got).unwrap();
    assert!(
        got == expected,
        "the last write submitted to a block is not what it holds"
    );
    verified(&mut v);
}

#[test]
fn overlapping_writes_from_two_queues_leave_every_replica_the_same() {
    use horn_engine::replica_set::IoKind;
    use horn_replica::IoBuf;
    // As above, with the writes coming from two queues at once: each queue has its
    // own connections, so only the engine's stripes order them across queues.
    let (r, _hosted, _tmp, mut v) = two_processes_and_one_hosted();
    let seed = seed();
    let rounds = 500u32;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    // One replica process stops and goes on, again and again (well within the
    // timeout): while it is stopped both queues' writes pile up on its connections,
    // and it takes them in its own order, not in the order the others saw them.
    let stopped = r.daemons[1].as_ref().unwrap().child.id() as i32;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopper = {
        let done = done.clone();
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: kill takes no pointers; the pid is our child's.
                unsafe { libc::kill(stopped, libc::SIGSTOP) };
                std::thread::sleep(std::time::Duration::from_millis(3));
                // SAFETY: as above.
                unsafe { libc::kill(stopped, libc::SIGCONT) };
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        })
    };
    let writers: Vec<_> = (0..2u64)
        .map(|q| {
            let (engine, barrier) = (v.engine().clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut v = Volume::open(&engine).unwrap();
                let mut rng = rand::rngs::SmallRng::seed_from_u64(seed ^ (q + 1));
                let mut out = Vec::new();
                // Each block's last acknowledged write from this queue: (round, value).
                let mut last = [None::<(u32, u8)>; 16];
                for round in 0..rounds {
                    barrier.wait();
                    for i in 0..8u32 {
                        let blocks = rng.gen_range(1..=8u64);
                        let first = rng.gen_range(0..=16 - blocks);
                        let value = (round * 16 + q as u32 * 8 + i) as u8 | 1;
                        let mut buf = IoBuf::zeroed((blocks * BLOCK) as usize);
                        buf.as_mut_slice().fill(value);
                        for b in first..first + blocks {
                            last[b as usize] = Some((round, value));
                        }
                        v.submit(IoKind::Write, first * BLOCK, blocks * BLOCK, Some(buf), i as u64);
                    }
                    out.clear();
                    v.reap(8, &mut out).unwrap();
                    assert!(out.iter().all(|c| c.result.is_ok()));
                }
                v.close().unwrap();
                last
            })
        })
        .collect();
    let lasts: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    stopper.join().unwrap();
    // Every block holds the last acknowledged write to it: the one of the later round,
    // or either queue's when both wrote it last in the same round (they raced).
    let mut got = vec![0u8; 16 * BLOCK as usize];
    v.read_at(0, &mut got).unwrap();
    for (b, data) in got.chunks(BLOCK as usize).enumerate() {
        let latest = lasts.iter().filter_map(|l| l[b]).map(|(r, _)| r).max();
        let allowed: Vec<u8> = match latest {
            Some(round) => lasts
                .iter()
                .filter_map(|l| l[b])
                .filter(|&(r, _)| r == round)
                .map(|(_, v)| v)
                .collect(),
            None => vec![0],
        };
        assert!(
            allowed.iter().any(|&a| data.iter().all(|&x| x == a)),
            "block {b} holds {:?}, not the last acknowledged write to it (one of {allowed:?})",
            &data[..4]
        );
    }
    verified(&mut v);
}

/// A volume on two replica processes and one replica hosted in this process (its file
/// writes go on the queue's own ring, where two in flight complete in either order).
fn two_processes_and_one_hosted() -> (
    Replicas,
    horn_manager::daemon::HostedReplica,
    tempfile::TempDir,
    Volume,
) {
    let r = Replicas::start(2);
    let tmp = tempfile::tempdir().unwrap();
    let (hosted, local) =
        horn_manager::daemon::HostedReplica::start(&horn_manager::daemon::HostedReplicaOptions {
            dir: tmp.path().join("hosted"),
            control: "127.0.0.1:0".into(),
            size: Some(16 << 20),
            sector_size: 512,
            cache: horn_replica::CacheMode::Direct,
            secret: None,
        })
        .unwrap();
    let mut addrs = r.addrs(&[0, 1]);
    addrs.insert(0, local);
    let (v, _) = Volume::start(&addrs, TIMEOUT).unwrap();
    (r, hosted, tmp, v)
}

/// The seed of a randomised test: `HORN_TEST_SEED`, or a fresh one (printed).
fn seed() -> u64 {
    let seed = std::env::var("HORN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (HORN_TEST_SEED={seed} reruns it)");
    seed
}

/// A replica stopped with SIGTERM answers "stopped" while it shuts down. The engine
/// drops it and goes on; before, it took the answer for a newer engine's refusal of its
/// read lease and faulted the whole volume ("deposed").
#[test]
fn a_replica_stopped_with_sigterm_is_dropped_and_does_not_fault_the_volume() {
    let r = Replicas::start(3);
    let (mut v, _) = Volume::start(&r.addrs(&[0, 1, 2]), TIMEOUT).unwrap();
    v.write_at(0, &[7u8; 4096]).unwrap();
    v.flush().unwrap();
    r.daemons[1].as_ref().unwrap().signal(libc::SIGTERM);
    common::eventually(
        Duration::from_secs(30),
        "the stopped replica was never dropped",
        || v.replicas()[1].1 == Mode::Err,
    );
    assert_eq!(v.engine().faulted(), None, "the volume faulted");
    v.write_at(4096, &[8u8; 4096]).unwrap();
    let mut back = [0u8; 8192];
    v.read_at(0, &mut back).unwrap();
    assert!(back[..4096].iter().all(|&b| b == 7) && back[4096..].iter().all(|&b| b == 8));
    v.close().unwrap();
}
