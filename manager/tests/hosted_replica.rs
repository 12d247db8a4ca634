//! A replica hosted in the engine's process (`hornd engine --host-replica`), whose file
//! I/O the engine's queues make on their own rings, next to a replica process reached
//! over the data wire: both must end up holding exactly what was acknowledged, through
//! a snapshot and every kind of request; and `hornd engine` serves such a volume over
//! iSCSI and closes it cleanly.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::iscsi::Initiator;
use common::Daemon;
use horn_engine::replica_set::IoKind;
use horn_engine::{Volume, VolumeCompletion};
use horn_manager::daemon::{HostedReplica, HostedReplicaOptions};
use horn_replica::{CacheMode, IoBuf, Replica};
use rand::{rngs::SmallRng, Rng, SeedableRng};

const SIZE: u64 = 32 << 20;
const SECTOR: u64 = 512;

fn hosted(dir: &std::path::Path, cache: CacheMode) -> (HostedReplica, horn_engine::ReplicaAddr) {
    HostedReplica::start(&HostedReplicaOptions {
        dir: dir.to_path_buf(),
        control: "127.0.0.1:0".into(),
        size: Some(SIZE),
        sector_size: SECTOR as u32,
        cache,
        secret: None,
    })
    .unwrap()
}

/// One request in flight: what it is and the range it covers.
struct InFlight {
    kind: IoKind,
    offset: u64,
    len: u64,
    /// For writes, the byte every sector was written with (0 for discard and zeroes).
    value: u8,
}

/// A seeded mix at QD16 of reads (checked against the model), writes (whole blocks,
/// single sectors, 64 KiB runs, some with FUA), discards, write-zeroes and flushes,
/// never two at once on one range; a snapshot after `snapshot_at` completions.
/// Returns the model: every sector's byte.
fn mixed_stream(v: &mut Volume, ios: usize, seed: u64, snapshot_at: usize) -> Vec<u8> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut model = vec![0u8; SIZE as usize];
    let mut pending: BTreeMap<u64, InFlight> = BTreeMap::new();
    let mut out: Vec<VolumeCompletion> = Vec::new();
    let (mut issued, mut done, mut tag, mut snapshotted) = (0, 0, 0u64, false);
    while done < ios {
        if done >= snapshot_at && !snapshotted && pending.is_empty() {
            v.snapshot("mid").unwrap();
            snapshotted = true;
        }
        while issued < ios && pending.len() < 16 && (done < snapshot_at || snapshotted) {
            let len = match rng.gen_range(0..10) {
                0 => SECTOR,
                1 => 64 << 10,
                _ => 4096,
            };
            let offset = rng.gen_range(0..(SIZE - len) / SECTOR) * SECTOR;
            let offset = if len == SECTOR {
                offset
            } else {
                offset / 4096 * 4096
            };
            let overlaps = pending
                .values()
                .any(|p| p.offset < offset + len.max(1) && offset < p.offset + p.len.max(1));
            if overlaps {
                continue;
            }
            let kind = match rng.gen_range(0..20) {
                0 => IoKind::Discard,
                1 => IoKind::WriteZeroes,
                2 => IoKind::Flush,
                3..=9 => IoKind::Read,
                _ => IoKind::Write,
            };
            let value = rng.gen_range(1..=255u8);
            tag += 1;
            let (buf, fua) = match kind {
                IoKind::Write => (
                    Some(IoBuf::from_slice(&vec![value; len as usize])),
                    rng.gen_bool(0.1),
                ),
                IoKind::Read => (Some(IoBuf::from_slice(&vec![0xee; len as usize])), false),
                _ => (None, false),
            };
            let (offset, len) = if kind == IoKind::Flush {
                (0, 0)
            } else {
                (offset, len)
            };
            pending.insert(
                tag,
                InFlight {
                    kind,
                    offset,
                    len,
                    value,
                },
            );
            v.submit_with(kind, offset, len, buf, tag, fua);
            issued += 1;
        }
        out.clear();
        v.reap(1, &mut out).unwrap();
        for c in out.drain(..) {
            let p = pending.remove(&c.tag).unwrap();
            let range = p.offset as usize..(p.offset + p.len) as usize;
            if let Err(e) = c.result {
                panic!("{:?} at {} of {} bytes failed: {e}", p.kind, p.offset, p.len);
            }
            match p.kind {
                IoKind::Write => model[range].fill(p.value),
                IoKind::Discard | IoKind::WriteZeroes => model[range].fill(0),
                IoKind::Read => {
                    let got = c.buf.unwrap();
                    if let Some(at) = got.as_slice().iter().zip(&model[range]).position(|(a, b)| a != b) {
                        panic!(
                            "read at {} of {} bytes: byte {at} is {} not {}",
                            p.offset,
                            p.len,
                            got.as_slice()[at],
                            model[p.offset as usize + at]
                        );
                    }
                }
                IoKind::Flush => {}
            }
            done += 1;
        }
    }
    assert!(snapshotted);
    model
}

fn check_dir(dir: &std::path::Path, model: &[u8]) {
    let mut r = Replica::open(dir).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for off in (0..SIZE).step_by(buf.len()) {
        r.read_at(off, &mut buf).unwrap();
        let want = &model[off as usize..off as usize + buf.len()];
        if let Some(at) = buf.iter().zip(want).position(|(a, b)| a != b) {
            panic!(
                "{}: byte {} is {} not {}",
                dir.display(),
                off as usize + at,
                buf[at],
                want[at]
            );
        }
    }
}

fn hosted_next_to_a_process(cache: CacheMode, seed: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let (here, here_addr) = hosted(&tmp.path().join("here"), cache);
    let mut there = Daemon::start(&tmp.path().join("there"), &["--size", "32M"]).unwrap();
    let (mut v, report) =
        Volume::start(&[here_addr.clone(), there.replica_addr()], Duration::from_secs(8)).unwrap();
    assert_eq!(report.used.len(), 2, "{report:?}");
    let model = mixed_stream(&mut v, 4000, seed, 2000);
    v.flush().unwrap();
    let verified = v.verify(|_, _| {}).unwrap();
    assert_eq!(verified.differing_bytes, 0, "{:?}", verified.differences);
    assert_eq!(verified.bytes_compared, SIZE);
    v.close().unwrap();
    here.close().unwrap();
    there.signal(libc::SIGTERM);
    let out = there.wait_output();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    check_dir(&tmp.path().join("here"), &model);
    check_dir(&tmp.path().join("there"), &model);
    // Both hold the snapshot, at the same point.
    for d in ["here", "there"] {
        let r = Replica::open(tmp.path().join(d)).unwrap();
        assert!(r.meta().snapshot("mid").is_some(), "{d} has the snapshot");
    }
}

#[test]
fn a_hosted_replica_and_a_replica_process_hold_the_same_data_page_cache() {
    hosted_next_to_a_process(CacheMode::Page, 11);
}

#[test]
fn a_hosted_replica_and_a_replica_process_hold_the_same_data_direct() {
    hosted_next_to_a_process(CacheMode::Direct, 12);
}

#[test]
fn hornd_engine_serves_a_hosted_replica_over_iscsi_and_closes_it_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let iqn = "iqn.2026-11.io.horn:hosted";
    let mut child = Command::new(env!("CARGO_BIN_EXE_hornd"))
        .args([
            "engine",
            "--control",
            "127.0.0.1:0",
            "--frontend",
            "iscsi",
            "--no-chap",
        ])
        .args(["--listen", "127.0.0.1:0", "--iqn", iqn, "--host-replica"])
        .arg(&dir)
        .args([
            "--host-replica-size",
            "8M",
            "--host-replica-control",
            "127.0.0.1:0",
        ])
        .args(["--host-replica-cache", "page"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut addr = None;
    let mut seen = String::new();
    for _ in 0..3 {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        seen.push_str(&line);
        if let Some((_, rest)) = line.split_once(&format!("serving iSCSI target {iqn} on ")) {
            addr = Some(rest.split_whitespace().next().unwrap().to_string());
            break;
        }
    }
    let addr = addr.unwrap_or_else(|| panic!("no portal in {seen:?}"));
    assert!(seen.contains("on 1 replicas"), "{seen}");
    let mut i = Initiator::login(&addr, iqn, None).unwrap();
    let data: Vec<u8> = (0..64 * 1024).map(|n| (n * 7 % 251) as u8).collect();
    assert_eq!(i.write10(16, &data).status, 0);
    let back = i.read10(16, 128);
    assert_eq!(back.status, 0);
    assert!(back.data == data, "what was written reads back");
    i.logout();
    // SAFETY: kill takes no pointers; the pid is our child's.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(status.success(), "{rest}");
    assert!(rest.contains("stopped; replicas flushed and released"), "{rest}");
    let mut r = Replica::open(&dir).unwrap();
    assert!(!r.is_dirty(), "the hosted replica was closed cleanly");
    let mut got = vec![0; data.len()];
    r.read_at(16 * 512, &mut got).unwrap();
    assert!(got == data);
}

#[test]
fn hornd_engine_with_a_hosted_replica_that_cannot_be_opened_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hornd"))
        .args(["engine", "--control", "127.0.0.1:0", "--host-replica"])
        .arg(tmp.path().join("missing"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot open replica") && err.contains("missing"),
        "{err}"
    );
}
