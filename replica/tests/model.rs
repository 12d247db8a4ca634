//! Random sequences of every store operation, checked against an in-memory model.
//!
//! After every step the whole volume is read back and compared with the model; the
//! allocated extents must cover every non-zero byte; reopening (which rebuilds the
//! index from the files) must change nothing. `PROPTEST_CASES` sets the case count.

use std::collections::BTreeMap;

use horn_replica::{Replica, ReplicaError};
use proptest::prelude::*;

const NAMES: [&str; 5] = ["s0", "s1", "s2", "s3", "s4"];
const START_SIZE: u64 = 64 * 1024;
const MAX_SIZE: u64 = 160 * 1024;

#[derive(Debug, Clone)]
enum Op {
    /// Offset and length in sectors, and a seed for the bytes.
    Write(u64, u64, u8),
    Discard(u64, u64),
    WriteZeroes(u64, u64),
    Snapshot(usize),
    Delete(usize),
    Purge,
    Revert(usize),
    /// Grow by this many 4 KiB blocks.
    Expand(u64),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u64..320, 1u64..48, any::<u8>()).prop_map(|(o, l, s)| Op::Write(o, l, s)),
        2 => (0u64..320, 1u64..64).prop_map(|(o, l)| Op::Discard(o, l)),
        1 => (0u64..320, 1u64..64).prop_map(|(o, l)| Op::WriteZeroes(o, l)),
        3 => (0..NAMES.len()).prop_map(Op::Snapshot),
        2 => (0..NAMES.len()).prop_map(Op::Delete),
        2 => Just(Op::Purge),
        2 => (0..NAMES.len()).prop_map(Op::Revert),
        1 => (1u64..6).prop_map(Op::Expand),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Default)]
struct Model {
    head: Vec<u8>,
    /// name -> (contents when taken, removed)
    snaps: BTreeMap<String, (Vec<u8>, bool)>,
}

/// Clamps a sector range to the volume; `None` when it starts past the end.
fn clamp(off: u64, len: u64, ss: u64, size: u64) -> Option<(u64, u64)> {
    let (off, len) = (off * ss, len * ss);
    if off >= size {
        return None;
    }
    Some((off, len.min(size - off)))
}

fn pattern(seed: u8, off: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (seed as u64)
                .wrapping_mul(31)
                .wrapping_add((off + i) / 512 * 7 + 1) as u8
                | 1
        })
        .collect()
}

fn check(r: &mut Replica, m: &Model, step: usize) -> Result<(), TestCaseError> {
    let size = r.size();
    prop_assert_eq!(size as usize, m.head.len());
    let mut got = vec![0u8; size as usize];
    r.read_at(0, &mut got).unwrap();
    if got != m.head {
        let first = got.iter().zip(&m.head).position(|(a, b)| a != b).unwrap();
        return Err(TestCaseError::fail(format!(
            "step {step}: byte {first} reads {} but the model has {}",
            got[first], m.head[first]
        )));
    }
    // Every non-zero byte lies in an allocated extent.
    let ext = r.allocated_extents(None).unwrap();
    for (i, b) in m.head.iter().enumerate() {
        if *b != 0 {
            let i = i as u64;
            prop_assert!(
                ext.iter().any(|e| e.offset <= i && i < e.end()),
                "step {}: byte {} is non-zero but not in {:?}",
                step,
                i,
                ext
            );
        }
    }
    Ok(())
}

fn run(ops: Vec<Op>, sector_size: u32) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    let mut r = Replica::create(&path, START_SIZE, sector_size).unwrap();
    let ss = sector_size as u64;
    let mut m = Model {
        head: vec![0; START_SIZE as usize],
        ..Default::default()
    };
    for (step, op) in ops.into_iter().enumerate() {
        let size = r.size();
        match op {
            Op::Write(o, l, seed) => {
                if let Some((off, len)) = clamp(o, l, ss, size) {
                    let data = pattern(seed, off, len);
                    r.write_at(off, &data).unwrap();
                    m.head[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
            }
            Op::Discard(o, l) | Op::WriteZeroes(o, l) => {
                if let Some((off, len)) = clamp(o, l, ss, size) {
                    if matches!(op, Op::Discard(..)) {
                        r.discard(off, len).unwrap();
                    } else {
                        r.write_zeroes(off, len).unwrap();
                    }
                    m.head[off as usize..(off + len) as usize].fill(0);
                }
            }
            Op::Snapshot(n) => {
                let name = NAMES[n];
                let res = r.snapshot(name, &BTreeMap::new());
                if m.snaps.contains_key(name) {
                    prop_assert!(matches!(res, Err(ReplicaError::SnapshotExists(_))), "{:?}", res);
                } else {
                    res.unwrap();
                    m.snaps.insert(name.to_string(), (m.head.clone(), false));
                }
            }
            Op::Delete(n) => {
                let name = NAMES[n];
                let res = r.delete_snapshot(name);
                match m.snaps.get_mut(name) {
                    Some(s) => {
                        res.unwrap();
                        s.1 = true;
                    }
                    None => prop_assert!(matches!(res, Err(ReplicaError::NoSuchSnapshot(_))), "{:?}", res),
                }
            }
            Op::Purge => {
                let report = r.purge().unwrap();
                for name in &report.purged {
                    let s = m.snaps.remove(name).expect("purged a snapshot the model knows");
                    prop_assert!(s.1, "purged {} which was not deleted", name);
                }
                let mut left: Vec<String> = r
                    .info()
                    .unwrap()
                    .layers
                    .into_iter()
                    .filter_map(|l| l.name)
                    .collect();
                left.sort();
                let want: Vec<String> = m.snaps.keys().cloned().collect();
                prop_assert_eq!(left, want);
            }
            Op::Revert(n) => {
                let name = NAMES[n];
                let res = r.revert(name);
                match m.snaps.get(name) {
                    None => prop_assert!(matches!(res, Err(ReplicaError::NoSuchSnapshot(_))), "{:?}", res),
                    Some((_, true)) => {
                        prop_assert!(matches!(res, Err(ReplicaError::SnapshotRemoved(_))), "{:?}", res)
                    }
                    Some((data, false)) => {
                        res.unwrap();
                        let mut head = data.clone();
                        head.resize(size as usize, 0);
                        m.head = head;
                    }
                }
            }
            Op::Expand(blocks) => {
                let new = size + blocks * 4096;
                if new <= MAX_SIZE {
                    r.expand(new).unwrap();
                    m.head.resize(new as usize, 0);
                }
            }
            Op::Reopen => {
                r.close().unwrap();
                r = Replica::open(&path).unwrap();
            }
        }
        check(&mut r, &m, step)?;
    }
    // The index rebuilt from the files agrees with the one built by the operations.
    drop(r);
    let mut r = Replica::open(&path).unwrap();
    check(&mut r, &m, usize::MAX)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
    ))]

    #[test]
    fn every_read_matches_the_model_with_512_byte_sectors(ops in prop::collection::vec(op(), 1..40)) {
        run(ops, 512)?;
    }

    #[test]
    fn every_read_matches_the_model_with_4096_byte_sectors(ops in prop::collection::vec(op(), 1..40)) {
        run(ops, 4096)?;
    }
}
