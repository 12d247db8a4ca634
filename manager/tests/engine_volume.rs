//! The engine against real replica processes (`hornd replica`) over real sockets:
//! a verified write stream while a replica is killed, a hung replica, all replicas
//! gone, an older engine fenced, a snapshot under writes.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Daemon;
use horn_engine::replica_set::{IoError, IoKind, Mode};
use horn_engine::{ReplicaAddr, Volume, VolumeCompletion, VolumeError};
use horn_replica::{IoBuf, Replica};
use rand::{rngs::SmallRng, Rng, SeedableRng};

const SIZE: u64 = 32 << 20;
const BLOCK: u64 = 4096;

struct Cluster {
    daemons: Vec<Daemon>,
    dirs: Vec<PathBuf>,
    _tmp: tempfile::TempDir,
}

impl Cluster {
    fn start(n: usize) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let dirs: Vec<PathBuf> = (0..n).map(|i| tmp.path().join(format!("r{i}"))).collect();
        let daemons = dirs
            .iter()
            .map(|d| Daemon::start(d, &["--size", "32M"]).unwrap())
            .collect();
        Cluster {
            daemons,
            dirs,
            _tmp: tmp,
        }
    }

    fn addrs(&self) -> Vec<ReplicaAddr> {
        self.daemons.iter().map(Daemon::replica_addr).collect()
    }

    fn volume(&self, timeout: Duration) -> Volume {
        let (v, report) = Volume::start(&self.addrs(), timeout).unwrap();
        assert_eq!(report.used.len(), self.daemons.len(), "{report:?}");
        v
    }
}

/// Reads a stopped replica's directory and checks it against the model.
fn verify_dir(dir: &Path, model: &BTreeMap<u64, u8>) {
    let mut r = Replica::open(dir).unwrap();
    let mut b = vec![0u8; BLOCK as usize];
    for (&blk, &v) in model {
        r.read_at(blk * BLOCK, &mut b).unwrap();
        assert!(
            b.iter().all(|&x| x == v),
            "{}: block {blk} is {} not {v}",
            dir.display(),
            b[0]
        );
    }
}

/// Random 4 KiB writes at QD16, each block's bytes its version; returns the model.
/// `during(i)` runs after the i-th completion.
fn write_stream(v: &mut Volume, ios: usize, seed: u64, mut during: impl FnMut(usize)) -> BTreeMap<u64, u8> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut model = BTreeMap::new();
    let mut pending: BTreeMap<u64, (u64, u8)> = BTreeMap::new();
    let mut out: Vec<VolumeCompletion> = Vec::new();
    let (mut issued, mut done, mut tag) = (0, 0, 0u64);
    while done < ios {
        while issued < ios && pending.len() < 16 {
            let blk = rng.gen_range(0..SIZE / BLOCK);
            if pending.values().any(|&(b, _)| b == blk) {
                continue;
            }
            let val = rng.gen_range(1..=255u8);
            tag += 1;
            pending.insert(tag, (blk, val));
            v.submit(
                IoKind::Write,
                blk * BLOCK,
                0,
                Some(IoBuf::from_slice(&[val; BLOCK as usize])),
                tag,
            );
            issued += 1;
        }
        out.clear();
        v.reap(1, &mut out).unwrap();
        for c in out.drain(..) {
            let (blk, val) = pending.remove(&c.tag).unwrap();
            if let Err(e) = c.result {
                panic!("write to block {blk} failed: {e}");
            }
            model.insert(blk, val);
            done += 1;
            during(done);
        }
    }
    model
}

#[test]
fn a_replica_killed_during_a_verified_write_stream_costs_no_io_error() {
    let mut cluster = Cluster::start(3);
    let mut v = cluster.volume(Duration::from_secs(8));
    let mut victim = Some(cluster.daemons.remove(1));
    let victim_dir = cluster.dirs.remove(1);
    let model = write_stream(&mut v, 3000, 1, |i| {
        if i == 1000 {
            let d = victim.take().unwrap();
            d.signal(libc::SIGKILL);
            drop(d);
        }
    });
    v.flush().unwrap();
    let modes: Vec<Mode> = v.replicas().into_iter().map(|(_, m)| m).collect();
    assert_eq!(modes.iter().filter(|m| **m == Mode::Err).count(), 1, "{modes:?}");
    // Every block reads back through the engine.
    let mut b = vec![0u8; BLOCK as usize];
    for (&blk, &val) in &model {
        v.read_at(blk * BLOCK, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == val), "block {blk}");
    }
    v.close().unwrap();
    // And from each surviving replica's files.
    for (d, dir) in cluster.daemons.iter_mut().zip(&cluster.dirs) {
        d.signal(libc::SIGTERM);
        assert!(d.wait_output().status.success());
        verify_dir(dir, &model);
    }
    drop(victim_dir);
}

#[test]
fn a_hung_replica_is_dropped_after_the_timeout_and_io_goes_on() {
    let cluster = Cluster::start(2);
    let mut v = cluster.volume(Duration::from_millis(500));
    v.write_at(0, &[1u8; 4096]).unwrap();
    cluster.daemons[0].signal(libc::SIGSTOP);
    let t = Instant::now();
    v.write_at(4096, &[2u8; 4096]).unwrap();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(400),
        "the write waited for the timeout ({took:?})"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(v.replicas()[0].1, Mode::Err);
    let mut b = vec![0u8; 4096];
    v.read_at(4096, &mut b).unwrap();
    assert_eq!(b, vec![2u8; 4096]);
    cluster.daemons[0].signal(libc::SIGCONT);
}

#[test]
fn with_every_replica_gone_io_fails_promptly_with_a_clear_error() {
    let mut cluster = Cluster::start(2);
    let mut v = cluster.volume(Duration::from_secs(8));
    v.write_at(0, &[1u8; 4096]).unwrap();
    for d in cluster.daemons.drain(..) {
        d.signal(libc::SIGKILL);
        drop(d);
    }
    let t = Instant::now();
    let err = v.write_at(0, &[2u8; 4096]).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "failing took {:?}",
        t.elapsed()
    );
    assert!(matches!(err, VolumeError::Io(IoError::NoHealthyReplica)), "{err}");
    assert!(err.to_string().contains("no healthy replica"), "{err}");
    let mut b = vec![0u8; 4096];
    assert!(v.read_at(0, &mut b).is_err());
}

#[test]
fn a_running_engine_keeps_its_replicas_and_a_crashed_ones_lease_lapses() {
    let cluster = Cluster::start(2);
    let mut old = cluster.volume(Duration::from_secs(8));
    old.write_at(0, &[1u8; 4096]).unwrap();
    // The old engine renews its read lease: a second engine cannot depose it (it may
    // be serving reads), and says why.
    let err = Volume::start(&cluster.addrs(), Duration::from_secs(8))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("holds a read lease") && err.contains("still running"),
        "{err}"
    );
    old.write_at(0, &[2u8; 4096]).unwrap();
    // Crashed (dropped without closing): its lease lapses, and the next engine waits
    // for that, then fences it.
    let generation = old.generation();
    drop(old);
    let waited = std::time::Instant::now();
    let mut new = cluster.volume(Duration::from_secs(8));
    let waited = waited.elapsed();
    println!("the next engine waited {waited:.1?} for the crashed one's lease");
    assert!(waited < Duration::from_secs(6), "{waited:?}");
    assert!(new.generation() > generation);
    let mut b = vec![0u8; 4096];
    new.read_at(0, &mut b).unwrap();
    assert_eq!(b, vec![2u8; 4096]);
    // Closed in order, it gives its lease up: the next start does not wait.
    new.close().unwrap();
    let at = std::time::Instant::now();
    let mut next = cluster.volume(Duration::from_secs(8));
    assert!(at.elapsed() < Duration::from_secs(2), "{:?}", at.elapsed());
    let report = next.verify(|_, _| {}).unwrap();
    assert!(report.differences.is_empty(), "{report:?}");
    next.close().unwrap();
}

#[test]
fn a_snapshot_under_writes_holds_exactly_what_was_acknowledged_before_it() {
    let mut cluster = Cluster::start(3);
    let mut v = cluster.volume(Duration::from_secs(8));
    let before = write_stream(&mut v, 500, 7, |_| {});
    v.snapshot("snap-1").unwrap();
    let after = write_stream(&mut v, 500, 8, |_| {});
    v.close().unwrap();
    for (d, dir) in cluster.daemons.iter_mut().zip(&cluster.dirs) {
        d.signal(libc::SIGTERM);
        d.wait_output();
        let mut r = Replica::open(dir).unwrap();
        let names: Vec<Option<String>> = r.info().unwrap().layers.into_iter().map(|l| l.name).collect();
        assert_eq!(names, vec![Some("snap-1".to_string()), None], "{}", dir.display());
        r.revert("snap-1").unwrap();
        drop(r);
        verify_dir(dir, &before);
        // Blocks first written after the snapshot are zero in it.
        let mut r = Replica::open(dir).unwrap();
        let mut b = vec![0u8; BLOCK as usize];
        for blk in after.keys().filter(|b| !before.contains_key(b)) {
            r.read_at(blk * BLOCK, &mut b).unwrap();
            assert!(b.iter().all(|&x| x == 0));
        }
    }
}

#[test]
fn a_snapshot_cuts_every_queue_of_the_volume_at_one_point() {
    use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
    use std::sync::Arc;

    let mut cluster = Cluster::start(2);
    let mut coordinator = cluster.volume(Duration::from_secs(8));
    // 0: before the snapshot call, 1: during it, 2: after it.
    let phase = Arc::new(AtomicU8::new(0));
    // Half the volume's blocks each; a writer stops 100 writes after the snapshot.
    const PER_WRITER: u64 = SIZE / BLOCK / 2;
    let started = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let mut q = coordinator.open_queue().unwrap();
            let phase = phase.clone();
            let started = started.clone();
            std::thread::spawn(move || {
                // Each writer fills its own blocks in order, each once: (submitted, acked) phases.
                let mut seen = Vec::new();
                for i in 0..PER_WRITER {
                    let at = phase.load(Ordering::SeqCst);
                    q.write_at((w * PER_WRITER + i) * BLOCK, &[w as u8 + 1; BLOCK as usize])
                        .unwrap();
                    seen.push((at, phase.load(Ordering::SeqCst)));
                    if i == 100 {
                        started.fetch_add(1, Ordering::SeqCst);
                    }
                    if at == 2 && seen.iter().filter(|s| s.0 == 2).count() > 100 {
                        break;
                    }
                }
                q.close().unwrap();
                seen
            })
        })
        .collect();
    while started.load(Ordering::SeqCst) < 2 {
        std::thread::sleep(Duration::from_millis(1));
    }
    phase.store(1, Ordering::SeqCst);
    coordinator.snapshot("cut").unwrap();
    phase.store(2, Ordering::SeqCst);
    let seen: Vec<Vec<(u8, u8)>> = writers.into_iter().map(|t| t.join().unwrap()).collect();
    coordinator.close().unwrap();
    let mut cuts = Vec::new();
    for (d, dir) in cluster.daemons.iter_mut().zip(&cluster.dirs) {
        d.signal(libc::SIGTERM);
        d.wait_output();
        let mut r = Replica::open(dir).unwrap();
        r.revert("cut").unwrap();
        let mut b = vec![0u8; BLOCK as usize];
        for (w, seen) in seen.iter().enumerate() {
            let mut present = Vec::new();
            for i in 0..seen.len() as u64 {
                r.read_at((w as u64 * PER_WRITER + i) * BLOCK, &mut b).unwrap();
                present.push(b[0] != 0);
            }
            let cut = present.iter().take_while(|p| **p).count();
            assert!(
                present[cut..].iter().all(|p| !p),
                "writer {w}: the snapshot holds a write after one it lacks (at {cut})"
            );
            for (i, &(submitted, acked)) in seen.iter().enumerate() {
                if acked == 0 {
                    assert!(
                        i < cut,
                        "writer {w}: write {i}, acknowledged before the snapshot, is missing"
                    );
                }
                if submitted == 2 {
                    assert!(
                        i >= cut,
                        "writer {w}: write {i}, submitted after the snapshot, is in it"
                    );
                }
            }
            assert!(
                cut > 0 && cut < seen.len(),
                "writer {w}: the cut fell inside the stream ({cut})"
            );
            cuts.push(cut);
        }
    }
    // Every replica's snapshot was cut at the same point of every writer's stream.
    assert_eq!(
        cuts[..2],
        cuts[2..],
        "the replicas' snapshots differ (writer cuts per replica)"
    );
}

#[test]
fn unreachable_mis_sized_and_blank_replicas_are_left_out_or_refused_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let good = Daemon::start(&tmp.path().join("good"), &["--size", "32M"]).unwrap();
    let small = Daemon::start(&tmp.path().join("small"), &["--size", "16M"]).unwrap();
    let addr = Daemon::replica_addr;
    let gone = ReplicaAddr {
        data: "127.0.0.1:1".into(),
        control: "127.0.0.1:1".into(),
        local: false,
    };
    // A volume's first start needs every replica listed, of one size.
    let err = Volume::start(&[addr(&good), gone.clone()], Duration::from_secs(8))
        .err()
        .unwrap();
    assert!(err.to_string().contains("first start"), "{err}");
    assert!(err.to_string().contains("unreachable"), "{err}");
    let err = Volume::start(&[addr(&good), addr(&small)], Duration::from_secs(8))
        .err()
        .unwrap();
    assert!(err.to_string().contains("differ in size"), "{err}");
    let (v, _) = Volume::start(&[addr(&good)], Duration::from_secs(8)).unwrap();
    drop(v);
    // Then the volume's member serves; the unreachable and the blank are reported.
    let (v, report) = Volume::start(&[addr(&good), gone, addr(&small)], Duration::from_secs(8)).unwrap();
    assert_eq!(report.used, vec![good.addr.clone()]);
    let why: Vec<&str> = report.skipped.iter().map(|(_, w)| w.as_str()).collect();
    assert!(why[0].contains("unreachable"), "{why:?}");
    assert!(why[1].contains("blank"), "{why:?}");
    drop(v);

    let err = Volume::start(
        &[ReplicaAddr {
            data: "127.0.0.1:1".into(),
            control: "127.0.0.1:1".into(),
            local: false,
        }],
        Duration::from_secs(1),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("no usable replica"), "{err}");
}

/// Unmounts a test filesystem when dropped.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_replica_whose_disk_fails_is_dropped_and_io_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let small = tmp.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1M", "tmpfs"])
        .arg(&small)
        .output();
    match mounted {
        Ok(o) if o.status.success() => {}
        other => {
            common::skip(
                "a_replica_whose_disk_fails_is_dropped_and_io_goes_on",
                &format!("cannot mount a 1 MiB tmpfs to fill up (needs root): {other:?}"),
            );
            return;
        }
    }
    let _mount = Mount(small.clone());
    let dirs = [tmp.path().join("r0"), tmp.path().join("r1"), small.join("r2")];
    let mut daemons: Vec<Daemon> = dirs
        .iter()
        .map(|d| Daemon::start(d, &["--size", "32M"]).unwrap())
        .collect();
    let addrs: Vec<ReplicaAddr> = daemons.iter().map(Daemon::replica_addr).collect();
    let (mut v, _) = Volume::start(&addrs, Duration::from_secs(8)).unwrap();
    // A second queue, idle meanwhile, connected to the full replica as well.
    let mut other = v.open_queue().unwrap();
    // 1,500 random 4 KiB writes: the third replica's 1 MiB fills up after about 256.
    let model = write_stream(&mut v, 1500, 3, |_| {});
    let modes: Vec<Mode> = v.replicas().into_iter().map(|(_, m)| m).collect();
    assert_eq!(
        modes,
        vec![Mode::Rw, Mode::Rw, Mode::Err],
        "the full replica was dropped"
    );
    // Every queue reads the latest data: the other queue never asks the dropped
    // replica (which lacks the later writes), though its own connection to it is fine.
    let mut b = vec![0u8; BLOCK as usize];
    for (&blk, &val) in &model {
        v.read_at(blk * BLOCK, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == val), "block {blk}");
        other.read_at(blk * BLOCK, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == val), "block {blk} through the other queue");
    }
    other.close().unwrap();
    v.close().unwrap();
    for (d, dir) in daemons.iter_mut().zip(&dirs).take(2) {
        d.signal(libc::SIGTERM);
        d.wait_output();
        verify_dir(dir, &model);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_replica_left_write_only_is_left_out_and_serves_no_reads() {
    use horn_proto::control::replica_control_client::ReplicaControlClient;
    use horn_proto::control::{Mode as WireMode, SetModeRequest};
    let cluster = Cluster::start(2);
    let mut ctl = ReplicaControlClient::connect(cluster.daemons[1].control.clone())
        .await
        .unwrap();
    ctl.set_mode(SetModeRequest {
        generation: 0,
        mode: WireMode::Wo as i32,
    })
    .await
    .unwrap();
    let addrs = cluster.addrs();
    tokio::task::spawn_blocking(move || {
        let (mut v, report) = Volume::start(&addrs, Duration::from_secs(8)).unwrap();
        assert_eq!(
            v.replicas().into_iter().map(|(_, m)| m).collect::<Vec<_>>(),
            vec![Mode::Rw]
        );
        assert!(
            report.skipped[0].1.contains("rebuild of it did not finish"),
            "{report:?}"
        );
        // Every read is served by the RW replica.
        for i in 0..50u64 {
            v.write_at(i * BLOCK, &[i as u8 + 1; BLOCK as usize]).unwrap();
        }
        let mut b = vec![0u8; BLOCK as usize];
        for i in 0..50u64 {
            v.read_at(i * BLOCK, &mut b).unwrap();
            assert!(b.iter().all(|&x| x == i as u8 + 1));
        }
    })
    .await
    .unwrap();
}
