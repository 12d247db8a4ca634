//! Online rebuild against real replica processes (`hornd replica`): a replica added
//! under concurrent random writes (partial-sector ones too) comes out identical, with
//! the snapshots; a replica that was away copies only what changed; the source dying
//! mid-rebuild hands over to another; the new replica dying leaves the volume healthy;
//! and `hornctl engine add-replica` shows the progress. Every test ends with a verify.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{eventually, Daemon, EngineDaemon};
use horn_engine::rebuild::add_replica;
use horn_engine::replica_set::{IoKind, Mode};
use horn_engine::{RebuildState, RebuildStatus};
use horn_engine::{Volume, VolumeCompletion};
use horn_proto::control::replica_control_client::ReplicaControlClient;
use horn_proto::control::InfoRequest;
use horn_replica::IoBuf;
use rand::{rngs::SmallRng, Rng, SeedableRng};

const SIZE: u64 = 128 << 20;
const TIMEOUT: Duration = Duration::from_secs(5);

fn replica(dir: &std::path::Path) -> Daemon {
    Daemon::start(dir, &["--size", "128M"]).unwrap()
}

/// Fills `[from, to)` with 1 MiB writes whose bytes are `tag`.
fn fill(v: &mut Volume, from: u64, to: u64, tag: u8) {
    let mut at = from;
    while at < to {
        v.write_at(at, &vec![tag; (1 << 20).min(to - at) as usize])
            .unwrap();
        at += 1 << 20;
    }
}

/// Waits for rebuild `id` to end and returns its last status.
fn wait_rebuild(v: &Volume, id: u64) -> RebuildStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = v.engine().rebuild(id).expect("the rebuild is listed");
        if s.state != RebuildState::Syncing {
            return s;
        }
        assert!(Instant::now() < deadline, "the rebuild did not end: {s:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the replica being rebuilt has copied some bytes.
fn wait_copying(d: &Daemon) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut c = rt
        .block_on(ReplicaControlClient::connect(d.control.clone()))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let i = rt.block_on(c.info(InfoRequest {})).unwrap().into_inner();
        if i.sync_copied > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "the sync never started");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn assert_identical(v: &mut Volume, replicas: usize) {
    let r = v.verify(|_, _| {}).unwrap();
    assert_eq!(r.replicas.len(), replicas, "{r:?}");
    assert!(r.differences.is_empty(), "replicas differ: {:?}", r.differences);
}

/// The snapshot names a replica lists.
fn snapshot_names(d: &Daemon) -> Vec<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = ReplicaControlClient::connect(d.control.clone()).await.unwrap();
        let info = c.info(InfoRequest {}).await.unwrap().into_inner();
        info.layers
            .into_iter()
            .map(|l| l.name)
            .filter(|n| !n.is_empty())
            .collect()
    })
}

/// Random writes on their own queue until `stop`: 4 KiB ones, and 512-byte ones that
/// land inside blocks older layers hold, counted in `acked` as they are acknowledged.
/// Returns the model: sector -> byte.
fn write_until(mut q: Volume, stop: Arc<AtomicBool>, acked: Arc<AtomicU64>, seed: u64) -> BTreeMap<u64, u8> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut model = BTreeMap::new();
    let mut pending: BTreeMap<u64, (u64, u64, u8)> = BTreeMap::new();
    let mut out: Vec<VolumeCompletion> = Vec::new();
    let mut tag = 0;
    loop {
        while !stop.load(Ordering::Relaxed) && pending.len() < 8 {
            let (sector, sectors) = if rng.gen_bool(0.3) {
                (rng.gen_range(0..SIZE / 512), 1)
            } else {
                (rng.gen_range(0..SIZE / 4096) * 8, 8)
            };
            if pending
                .values()
                .any(|&(s, n, _)| s < sector + sectors && sector < s + n)
            {
                continue;
            }
            let val = rng.gen_range(1..=255u8);
            tag += 1;
            pending.insert(tag, (sector, sectors, val));
            let buf = IoBuf::from_slice(&vec![val; (sectors * 512) as usize]);
            q.submit(IoKind::Write, sector * 512, 0, Some(buf), tag);
        }
        if pending.is_empty() {
            q.close().unwrap();
            return model;
        }
        out.clear();
        q.reap(1, &mut out).unwrap();
        for c in out.drain(..) {
            let (sector, n, val) = pending.remove(&c.tag).unwrap();
            c.result.unwrap();
            for s in sector..sector + n {
                model.insert(s, val);
            }
            acked.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[test]
fn a_replica_added_under_random_writes_is_rebuilt_online_with_its_snapshots() {
    let tmp = tempfile::tempdir().unwrap();
    let a = replica(&tmp.path().join("a"));
    let b = replica(&tmp.path().join("b"));
    let c = replica(&tmp.path().join("c"));
    let (mut v, _) = Volume::start(&[a.replica_addr(), b.replica_addr()], TIMEOUT).unwrap();
    fill(&mut v, 0, 32 << 20, 1);
    v.snapshot("s1").unwrap();
    fill(&mut v, 16 << 20, 48 << 20, 2);
    v.snapshot("s2").unwrap();
    fill(&mut v, 40 << 20, 64 << 20, 3);

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let writer = {
        let q = v.open_queue().unwrap();
        let (stop, acked) = (stop.clone(), acked.clone());
        std::thread::spawn(move || write_until(q, stop, acked, 42))
    };
    // The writes are under way before the replica joins, and go on after it is RW.
    let writes = || acked.load(Ordering::Relaxed);
    eventually(Duration::from_secs(30), "the writer acknowledged nothing", || {
        writes() >= 200
    });
    let rebuild = add_replica(&mut v, c.replica_addr()).unwrap();
    // Chain operations wait for the rebuild.
    let e = v.snapshot("during").unwrap_err();
    assert!(e.to_string().contains("being rebuilt"), "{e}");
    let status = wait_rebuild(&v, rebuild);
    let after = writes();
    eventually(Duration::from_secs(30), "no write after the rebuild", || {
        writes() >= after + 200
    });
    stop.store(true, Ordering::Relaxed);
    let model = writer.join().unwrap();
    assert_eq!(status.state, RebuildState::Done, "{status:?}");
    assert_eq!(status.source, a.addr);
    assert!(status.copied >= 64 << 20, "{status:?}");
    // Partial-sector writes landed during the sync: their blocks were made whole.
    assert!(status.suspects > 0, "{status:?}");
    println!("{status:?}");
    assert_eq!(v.replicas()[2], (c.addr.clone(), Mode::Rw));

    assert_identical(&mut v, 3);
    // Every read goes round the three replicas.
    let mut sector = vec![0u8; 512];
    for (&s, &val) in model.iter().step_by(7) {
        for _ in 0..3 {
            v.read_at(s * 512, &mut sector).unwrap();
            assert!(
                sector.iter().all(|&x| x == val),
                "sector {s}: {} not {val}",
                sector[0]
            );
        }
    }
    let names = snapshot_names(&c);
    for s in ["s1", "s2"] {
        assert!(names.contains(&s.to_string()), "{names:?}");
    }
    // The rebuild snapshot is purged everywhere; chain operations work again.
    for d in [&a, &b, &c] {
        let names = snapshot_names(d);
        assert!(!names.iter().any(|n| n.starts_with("rebuild-")), "{names:?}");
    }
    v.snapshot("after").unwrap();
    v.close().unwrap();
}

#[test]
fn a_replica_that_was_away_copies_only_the_blocks_that_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let a = replica(&tmp.path().join("a"));
    let b = replica(&tmp.path().join("b"));
    let (mut v, _) = Volume::start(&[a.replica_addr(), b.replica_addr()], TIMEOUT).unwrap();
    fill(&mut v, 0, SIZE, 1);
    // b goes away (dropped, durably) while 1% of the volume changes.
    b.signal(libc::SIGKILL);
    drop(b);
    let mut rng = SmallRng::seed_from_u64(7);
    let changed = SIZE / 100 / 4096;
    for _ in 0..changed {
        let blk = rng.gen_range(0..SIZE / 4096);
        v.write_at(blk * 4096, &[9; 4096]).unwrap();
    }
    let b = Daemon::start(&tmp.path().join("b"), &[]).unwrap();
    let rebuild = add_replica(&mut v, b.replica_addr()).unwrap();
    let status = wait_rebuild(&v, rebuild);
    assert_eq!(status.state, RebuildState::Done, "{status:?}");
    assert!(
        status.copied <= changed * 4096,
        "copied {} bytes for {} changed",
        status.copied,
        changed * 4096
    );
    assert!(status.copied > 0);
    assert!(status.done >= SIZE, "{status:?}");
    assert_identical(&mut v, 2);
    v.close().unwrap();
}

#[test]
fn a_replica_left_write_only_by_a_cut_rebuild_is_rebuilt_where_it_stands() {
    let tmp = tempfile::tempdir().unwrap();
    let a = replica(&tmp.path().join("a"));
    let b = replica(&tmp.path().join("b"));
    let (mut v, _) = Volume::start(&[a.replica_addr()], TIMEOUT).unwrap();
    fill(&mut v, 0, 8 << 20, 4);
    let generation = v.generation();
    v.close().unwrap();
    // An engine made b WO for a rebuild and stopped before it ended.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(b.control.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = ReplicaControlClient::with_interceptor(channel, |mut req: tonic::Request<()>| {
            let name = "an-engine".parse().unwrap();
            req.metadata_mut()
                .insert(horn_proto::control::ENGINE_HEADER, name);
            Ok(req)
        });
        c.claim(horn_proto::control::ClaimRequest {
            generation,
            engine: "an-engine".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        c.set_mode(horn_proto::control::SetModeRequest {
            generation,
            mode: horn_proto::control::Mode::Wo as i32,
        })
        .await
        .unwrap();
        c.release(horn_proto::control::ReleaseRequest { generation })
            .await
            .unwrap();
    });
    // The next engine leaves it out (it may lack data) until it is rebuilt.
    let (mut v, report) = Volume::start(&[a.replica_addr(), b.replica_addr()], TIMEOUT).unwrap();
    assert_eq!(v.replicas().len(), 1, "{report:?}");
    assert!(report.skipped[0].1.contains("blank"), "{report:?}");
    let rebuild = add_replica(&mut v, b.replica_addr()).unwrap();
    let status = wait_rebuild(&v, rebuild);
    assert_eq!(status.state, RebuildState::Done, "{status:?}");
    assert_eq!(v.replicas()[1].1, Mode::Rw);
    assert_identical(&mut v, 2);
    let e = add_replica(&mut v, b.replica_addr()).unwrap_err();
    assert!(e.to_string().contains("already in the volume, RW"), "{e}");
    v.close().unwrap();
}

#[test]
fn the_source_dying_mid_rebuild_hands_over_to_another() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = replica(&tmp.path().join("a"));
    let b = replica(&tmp.path().join("b"));
    let c = replica(&tmp.path().join("c"));
    let (mut v, _) = Volume::start(&[a.replica_addr(), b.replica_addr()], TIMEOUT).unwrap();
    fill(&mut v, 0, SIZE, 5);
    let rebuild = add_replica(&mut v, c.replica_addr()).unwrap();
    // Kill the source as soon as the new replica has copied something from it.
    wait_copying(&c);
    a.signal(libc::SIGKILL);
    let _ = a.child.wait();
    // Writes go on meanwhile (and find the source gone).
    fill(&mut v, 0, 4 << 20, 6);
    let status = wait_rebuild(&v, rebuild);
    assert_eq!(status.state, RebuildState::Done, "{status:?}");
    assert_eq!(status.source, b.addr, "{status:?}");
    assert_eq!(v.replicas()[0].1, Mode::Err);
    assert_identical(&mut v, 2);
    v.close().unwrap();
}

#[test]
fn the_new_replica_dying_mid_rebuild_leaves_the_volume_healthy() {
    let tmp = tempfile::tempdir().unwrap();
    let a = replica(&tmp.path().join("a"));
    let b = replica(&tmp.path().join("b"));
    let mut c = replica(&tmp.path().join("c"));
    let (mut v, _) = Volume::start(&[a.replica_addr(), b.replica_addr()], TIMEOUT).unwrap();
    fill(&mut v, 0, SIZE, 5);
    let rebuild = add_replica(&mut v, c.replica_addr()).unwrap();
    wait_copying(&c);
    c.signal(libc::SIGKILL);
    let _ = c.child.wait();
    fill(&mut v, 0, 4 << 20, 6);
    let status = wait_rebuild(&v, rebuild);
    assert!(matches!(status.state, RebuildState::Failed(_)), "{status:?}");
    assert_eq!(v.replicas()[2].1, Mode::Err);
    assert_identical(&mut v, 2);
    // Chain operations work again.
    v.snapshot("after").unwrap();
    v.close().unwrap();
}

#[test]
fn hornctl_add_replica_shows_progress_and_refuses_bad_replicas() {
    let tmp = tempfile::tempdir().unwrap();
    let a = replica(&tmp.path().join("a"));
    let b = replica(&tmp.path().join("b"));
    let small = Daemon::start(&tmp.path().join("small"), &["--size", "64M"]).unwrap();
    let engine = EngineDaemon::start(&[&a]).unwrap();
    let arg = |d: &Daemon| format!("{},{}", d.addr, d.control.trim_start_matches("http://"));

    let out = engine.hornctl(&["add-replica", &arg(&small)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("it holds 67108864 bytes"), "{err}");
    let out = engine.hornctl(&["add-replica", "not-an-address"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("DATA_ADDR,CONTROL_ADDR"));
    let out = engine.hornctl(&["add-replica", &arg(&a)]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already in the volume"));

    let out = engine.hornctl(&["add-replica", &arg(&b)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("replica {} joined the volume write-only", b.addr)),
        "{text}"
    );
    assert!(
        text.contains(&format!("rebuilt {} from {}", b.addr, a.addr)),
        "{text}"
    );
    let info = engine.hornctl(&["--json", "info"]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["replicas"][1]["address"].as_str(), Some(b.addr.as_str()));
    assert_eq!(v["replicas"][1]["mode"].as_str(), Some("RW"));
    assert_eq!(v["rebuilds"][0]["state"].as_str(), Some("done"));
    let out = engine.hornctl(&["verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

/// `hornctl engine --json info`, parsed.
fn info_json(engine: &EngineDaemon, extra: &[&str]) -> serde_json::Value {
    let out = engine.hornctl(&[&["--json", "info"], extra].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_replica_rebuilt_again_is_followed_listed_once_and_leaves_no_rebuild_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let a = replica(&tmp.path().join("a"));
    let b = replica(&tmp.path().join("b"));
    let c_dir = tmp.path().join("c");
    let mut c = replica(&c_dir);
    // Data for the rebuilds to copy, written by an engine that then closes.
    let (mut v, _) = Volume::start(&[a.replica_addr(), b.replica_addr()], TIMEOUT).unwrap();
    fill(&mut v, 0, SIZE, 1);
    v.close().unwrap();
    let engine = EngineDaemon::start(&[&a, &b]).unwrap();
    let arg = |d: &Daemon| format!("{},{}", d.addr, d.control.trim_start_matches("http://"));
    let (c_addr, c_control) = (
        c.addr.clone(),
        c.control.trim_start_matches("http://").to_string(),
    );

    // Rebuild 1 fails: c dies while it copies.
    let out = engine.hornctl(&["add-replica", "--no-wait", &arg(&c)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_copying(&c);
    c.signal(libc::SIGKILL);
    let _ = c.child.wait();
    eventually(Duration::from_secs(60), "rebuild 1 fails", || {
        info_json(&engine, &[])["rebuilds"][0]["state"] == "failed"
    });

    // c comes back at the same address; rebuild 2 is followed, not rebuild 1's
    // failure.
    drop(c);
    let c = Daemon::start(&c_dir, &["--listen", &c_addr, "--control", &c_control]).unwrap();
    let out = engine.hornctl(&["add-replica", &arg(&c)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("rebuilt {c_addr} from")), "{text}");

    // Rebuild 3 after c fails again, this time once it is RW: the earlier rebuild
    // snapshots are gone, so it reads through no more than the volume's data.
    let mut c = c;
    c.signal(libc::SIGKILL);
    let _ = c.child.wait();
    // It grants no more lease renewals: the engine drops it.
    eventually(Duration::from_secs(60), "c is dropped", || {
        info_json(&engine, &[])["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["address"] == c_addr.as_str() && r["mode"] == "ERR")
    });
    drop(c);
    let c = Daemon::start(&c_dir, &["--listen", &c_addr, "--control", &c_control]).unwrap();
    let out = engine.hornctl(&["--json", "add-replica", &arg(&c)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let last: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(last["id"], 3, "{last}");
    assert_eq!(last["state"], "done", "{last}");
    // It went through the volume's data about once (layer files round up to the
    // filesystem's extents), not once per earlier rebuild.
    assert!(
        last["bytes_total"].as_u64().unwrap() <= SIZE + (1 << 20),
        "{last}"
    );

    // Each replica once by default, RW; the history lists c's three incarnations.
    let info = info_json(&engine, &[]);
    let rows = info["replicas"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{info}");
    assert!(rows.iter().all(|r| r["mode"] == "RW"), "{info}");
    assert_eq!(info["rebuilds"].as_array().unwrap().len(), 1, "{info}");
    let history = info_json(&engine, &["--history"]);
    let c_rows: Vec<_> = history["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["address"] == c_addr.as_str())
        .collect();
    assert_eq!(c_rows.len(), 3, "{history}");
    assert!(
        c_rows[..2]
            .iter()
            .all(|r| r["mode"] == "ERR" && r["superseded"] == true),
        "{history}"
    );
    assert!(
        c_rows[0]["failure"].as_str().unwrap().contains("rebuild"),
        "{history}"
    );
    assert_eq!(history["rebuilds"].as_array().unwrap().len(), 3, "{history}");
    let text = String::from_utf8_lossy(&engine.hornctl(&["info"]).stdout).into_owned();
    assert_eq!(
        text.matches(c_addr.as_str()).count(),
        2,
        "the row and the rebuild line: {text}"
    );
    for d in [&a, &b, &c] {
        let names = snapshot_names(d);
        assert!(!names.iter().any(|n| n.starts_with("rebuild-")), "{names:?}");
    }
    let out = engine.hornctl(&["verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

/// `hornctl engine drop-replica`: a replica that hangs (SIGSTOP: no reset, no answer)
/// holds up the engine until its timeout, here a minute; dropped by hand, the engine
/// records the drop and goes on at once, and the replica can be rebuilt back.
#[test]
fn a_hung_replica_dropped_by_hand_frees_the_engine_before_its_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let a = replica(&tmp.path().join("a"));
    let b = replica(&tmp.path().join("b"));
    let c = replica(&tmp.path().join("c"));
    let engine =
        EngineDaemon::start_with(&[&a, &b, &c], &["--timeout", "60", "--clean-intents-every", "1"]).unwrap();
    let out = engine.hornctl(&["drop-replica", "127.0.0.1:1"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no live replica at 127.0.0.1:1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.signal(libc::SIGSTOP);
    // The next clearing of the write-intent records flushes every replica: it waits on c.
    std::thread::sleep(Duration::from_secs(2));
    let since = Instant::now();
    let out = engine.hornctl(&["drop-replica", &c.addr, "--reason", "its machine is gone"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("replica {} dropped", c.addr)));
    // Info runs on the volume's own thread, behind the stuck flush: it answers once the
    // drop has freed it, long before the minute's timeout.
    let v = info_json(&engine, &[]);
    let waited = since.elapsed();
    assert!(
        waited < Duration::from_secs(20),
        "the engine answered after {waited:?}"
    );
    let modes: Vec<(String, String)> = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["address"].as_str().unwrap().to_string(),
                r["mode"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(modes.contains(&(c.addr.clone(), "ERR".into())), "{modes:?}");
    assert_eq!(modes.iter().filter(|(_, m)| m == "RW").count(), 2, "{modes:?}");
    let out = engine.hornctl(&["drop-replica", &c.addr]);
    assert!(!out.status.success(), "dropped twice");
    // Back from its stop, it is rebuilt into the volume.
    c.signal(libc::SIGCONT);
    let arg = format!("{},{}", c.addr, c.control.trim_start_matches("http://"));
    let out = engine.hornctl(&["add-replica", &arg]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = engine.hornctl(&["verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

/// The data path under the same fault: writes waiting on a hung replica (SIGSTOP, a
/// one-minute timeout) complete once it is dropped on request (as a node agent does
/// for a replica whose node is down), long before the timeout; every write
/// acknowledged before, during and after reads back; rebuilt back in, the replicas
/// verify identical.
#[test]
fn writes_waiting_on_a_hung_replica_complete_once_it_is_dropped_and_none_is_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let a = replica(&tmp.path().join("a"));
    let b = replica(&tmp.path().join("b"));
    let c = replica(&tmp.path().join("c"));
    let addrs = [&a, &b, &c].map(|d| d.replica_addr());
    let (mut v, _) = Volume::start(&addrs, Duration::from_secs(60)).unwrap();
    let mut acked: BTreeMap<u64, u8> = BTreeMap::new();
    let mut write = |v: &mut Volume, blk: u64, val: u8| {
        v.write_at(blk * 4096, &[val; 4096]).unwrap();
        acked.insert(blk, val);
    };
    for blk in 0..64 {
        write(&mut v, blk, blk as u8 + 1);
    }
    c.signal(libc::SIGSTOP);
    let engine = v.engine().clone();
    let hung = c.addr.clone();
    let dropper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        assert!(engine.drop_replica(&hung, "its machine is gone"), "c was live");
    });
    let since = Instant::now();
    // The first of these waits on c until the drop.
    for blk in 32..96 {
        write(&mut v, blk, blk as u8 + 101);
    }
    let waited = since.elapsed();
    dropper.join().unwrap();
    assert!(
        waited < Duration::from_secs(20),
        "the writes waited {waited:?}: for the timeout, not the drop"
    );
    let modes = v.replicas();
    assert!(modes.contains(&(c.addr.clone(), Mode::Err)), "{modes:?}");
    for (&blk, &val) in &acked {
        let mut got = vec![0u8; 4096];
        v.read_at(blk * 4096, &mut got).unwrap();
        assert!(
            got.iter().all(|&x| x == val),
            "block {blk}: not the acknowledged {val}"
        );
    }
    // Back from its stop, c is rebuilt in, and every replica holds the same.
    c.signal(libc::SIGCONT);
    let id = add_replica(&mut v, c.replica_addr()).unwrap();
    assert_eq!(wait_rebuild(&v, id).state, RebuildState::Done);
    assert_identical(&mut v, 3);
    v.close().unwrap();
}
