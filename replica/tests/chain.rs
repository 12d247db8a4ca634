//! Behaviour of the chain beyond the model test: long chains, the async path with
//! many I/Os in flight, extent listings, and space reclaimed by discard and purge.

use std::collections::BTreeMap;

use horn_replica::{Extent, IoBuf, Replica};
use rand::{rngs::SmallRng, Rng, SeedableRng};

const MIB: u64 = 1 << 20;

fn no_labels() -> BTreeMap<String, String> {
    BTreeMap::new()
}

/// A chain of `HORN_TEST_CHAIN_LAYERS` layers (default 1,000; Longhorn stops at 250)
/// opens, reads and writes correctly, and its index stays small.
#[test]
fn a_chain_of_a_thousand_layers_opens_reads_and_writes() {
    let layers: u64 = std::env::var("HORN_TEST_CHAIN_LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let mut r = Replica::create(dir.path(), size, 4096).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rng = SmallRng::seed_from_u64(7);
    for i in 0..layers {
        // Each layer writes one block somewhere and, every 10th, a 1 MiB extent.
        let b = rng.gen_range(0..size / 4096);
        let fill = (i % 251 + 1) as u8;
        r.write_at(b * 4096, &[fill; 4096]).unwrap();
        model[(b * 4096) as usize..(b * 4096 + 4096) as usize].fill(fill);
        if i % 10 == 0 {
            let m = rng.gen_range(0..size / MIB);
            r.write_at(m * MIB, &vec![fill; MIB as usize]).unwrap();
            model[(m * MIB) as usize..((m + 1) * MIB) as usize].fill(fill);
        }
        r.snapshot(&format!("snap-{i}"), &no_labels()).unwrap();
    }
    drop(r);
    let mut r = Replica::open(dir.path()).unwrap();
    assert_eq!(r.info().unwrap().chain_length as u64, layers + 1);
    let mut got = vec![0u8; size as usize];
    for (i, chunk) in got.chunks_mut(MIB as usize).enumerate() {
        r.read_at(i as u64 * MIB, chunk).unwrap();
    }
    assert!(
        got == model,
        "reads through {layers} layers differ from what was written"
    );
    r.write_at(0, &[0xee; 4096]).unwrap();
    let mut b = [0u8; 4096];
    r.read_at(0, &mut b).unwrap();
    assert_eq!(b, [0xee; 4096]);
    assert!(
        r.index_bytes() < 512 * 1024,
        "index {} bytes for 64 MiB",
        r.index_bytes()
    );
}

/// 32 reads and writes in flight at once complete (in any order) with the right data.
#[test]
fn many_ios_in_flight_complete_with_the_right_data() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let mut r = Replica::create(dir.path(), size, 512).unwrap();
    r.write_at(0, &vec![1u8; size as usize / 2]).unwrap();
    r.snapshot("half", &no_labels()).unwrap();
    let blocks = size / 4096;
    let mut model: Vec<u8> = (0..blocks).map(|b| if b < blocks / 2 { 1 } else { 0 }).collect();
    let mut rng = SmallRng::seed_from_u64(11);
    let mut out = Vec::new();
    let mut tag = 0u64;
    let mut pending_reads = BTreeMap::new();
    for _round in 0..200 {
        // Distinct blocks per round so the in-flight I/Os do not overlap.
        let mut picked = std::collections::BTreeSet::new();
        while picked.len() < 32 {
            picked.insert(rng.gen_range(0..blocks));
        }
        for b in picked {
            tag += 1;
            if rng.gen_bool(0.5) {
                let v = rng.gen_range(2..=255u8);
                r.submit_write(b * 4096, IoBuf::from_slice(&[v; 4096]), tag);
                model[b as usize] = v;
            } else {
                r.submit_read(b * 4096, IoBuf::zeroed(4096), tag);
                pending_reads.insert(tag, (b, model[b as usize]));
            }
        }
        out.clear();
        while r.in_flight() > 0 {
            r.reap(1, &mut out).unwrap();
        }
        assert_eq!(out.len(), 32);
        for c in &out {
            c.result.as_ref().unwrap();
            if let Some((b, want)) = pending_reads.remove(&c.tag) {
                let got = c.buf.as_ref().unwrap().as_slice();
                assert!(
                    got.iter().all(|&x| x == want),
                    "block {b}: want {want}, got {}",
                    got[0]
                );
            }
        }
    }
    r.flush().unwrap();
}

#[test]
fn extents_report_what_each_layer_changed() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Replica::create(dir.path(), 8 * MIB, 512).unwrap();
    r.write_at(0, &vec![1u8; MIB as usize]).unwrap();
    r.snapshot("a", &no_labels()).unwrap();
    r.write_at(4 * MIB, &vec![2u8; 8192]).unwrap();
    r.discard(0, 4096).unwrap();
    r.snapshot("b", &no_labels()).unwrap();
    r.write_at(6 * MIB, &[3u8; 512]).unwrap();

    let e = |offset, len| Extent { offset, len };
    assert_eq!(r.allocated_extents(Some("a")).unwrap(), vec![e(0, MIB)]);
    assert_eq!(
        r.changed_extents(Some("a"), Some("b")).unwrap(),
        vec![e(0, 4096), e(4 * MIB, 8192)]
    );
    assert_eq!(
        r.changed_extents(Some("b"), None).unwrap(),
        vec![e(6 * MIB, 4096)]
    );
    assert_eq!(
        r.allocated_extents(None).unwrap(),
        vec![e(0, MIB), e(4 * MIB, 8192), e(6 * MIB, 4096)]
    );
    let b = r.layer_extents(Some("b")).unwrap();
    assert_eq!(b.data, vec![e(4 * MIB, 8192)]);
    assert_eq!(b.zeros, vec![e(0, 4096)]);
    let err = r.changed_extents(Some("b"), Some("a")).unwrap_err().to_string();
    assert!(err.contains("not an ancestor"), "{err}");
}

#[test]
fn discard_and_purge_give_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Replica::create(dir.path(), 32 * MIB, 512).unwrap();
    r.write_at(0, &vec![5u8; 8 * MIB as usize]).unwrap();
    r.flush().unwrap();
    let used = |r: &Replica| r.info().unwrap().used_bytes;
    assert!(used(&r) >= 8 * MIB);
    r.discard(0, 6 * MIB).unwrap();
    assert!(used(&r) <= 2 * MIB + 64 * 1024, "discard left {} bytes", used(&r));

    r.snapshot("old", &no_labels()).unwrap();
    r.write_at(6 * MIB, &vec![6u8; 2 * MIB as usize]).unwrap(); // hides all of "old"
    r.flush().unwrap();
    let before = used(&r);
    r.delete_snapshot("old").unwrap();
    let report = r.purge().unwrap();
    assert_eq!(report.purged, vec!["old".to_string()]);
    assert!(
        used(&r) + 2 * MIB <= before + 64 * 1024,
        "purge kept {} of {before}",
        used(&r)
    );
    let mut b = vec![0u8; 2 * MIB as usize];
    r.read_at(6 * MIB, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 6));
}

#[test]
fn a_small_head_over_a_large_deleted_snapshot_is_folded_down_into_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Replica::create(dir.path(), 32 * MIB, 512).unwrap();
    r.write_at(0, &vec![1u8; 16 * MIB as usize]).unwrap();
    r.snapshot("base", &no_labels()).unwrap();
    r.snapshot("big", &no_labels()).unwrap();
    let ids = |r: &Replica| -> Vec<(Option<String>, u64)> {
        r.info()
            .unwrap()
            .layers
            .iter()
            .map(|l| (l.name.clone(), l.id))
            .collect()
    };
    // "big" holds 16 MiB over "base" (which holds zeros there), the head 4 KiB, a
    // 512-byte write, and a discard.
    r.write_at(16 * MIB, &vec![2u8; 16 * MIB as usize]).unwrap();
    r.snapshot("big2", &no_labels()).unwrap();
    r.write_at(8 * MIB, &[3u8; 4096]).unwrap();
    r.write_at(20 * MIB + 512, &[4u8; 512]).unwrap();
    r.discard(24 * MIB, 64 * 1024).unwrap();
    r.flush().unwrap();
    let big2 = ids(&r)
        .iter()
        .find(|(n, _)| n.as_deref() == Some("big2"))
        .unwrap()
        .1;
    r.delete_snapshot("big2").unwrap();
    let report = r.purge().unwrap();
    assert_eq!(report.purged, vec!["big2".to_string()]);
    // The snapshot's layer became the head: nothing of its 16 MiB was copied.
    let after = ids(&r);
    assert_eq!(after.last(), Some(&(None, big2)), "{after:?}");
    let mut expect = vec![1u8; 32 * MIB as usize];
    expect[16 * MIB as usize..].fill(2);
    expect[8 * MIB as usize..8 * MIB as usize + 4096].fill(3);
    expect[20 * MIB as usize + 512..20 * MIB as usize + 1024].fill(4);
    expect[24 * MIB as usize..24 * MIB as usize + 65536].fill(0);
    let check = |r: &mut Replica, expect: &[u8]| {
        let mut got = vec![0u8; 32 * MIB as usize];
        r.read_at(0, &mut got).unwrap();
        assert!(got == expect, "the volume reads differently after the purge");
    };
    check(&mut r, &expect);
    // The new head takes writes and discards, and keeps them across a reopen.
    r.write_at(0, &[5u8; 4096]).unwrap();
    r.discard(16 * MIB, 4096).unwrap();
    expect[..4096].fill(5);
    expect[16 * MIB as usize..16 * MIB as usize + 4096].fill(0);
    check(&mut r, &expect);
    r.close().unwrap();
    let mut r = Replica::open(dir.path()).unwrap();
    check(&mut r, &expect);
    r.revert("big").unwrap();
    let mut big = vec![1u8; 32 * MIB as usize];
    big[16 * MIB as usize..].fill(0);
    check(&mut r, &big);
}

#[test]
fn revert_keeps_newer_snapshots_as_a_branch_and_purge_explains_what_it_keeps() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Replica::create(dir.path(), 4 * MIB, 512).unwrap();
    r.write_at(0, &[1u8; 4096]).unwrap();
    r.snapshot("a", &no_labels()).unwrap();
    r.write_at(0, &[2u8; 4096]).unwrap();
    r.snapshot("b", &no_labels()).unwrap();
    r.revert("a").unwrap();
    let info = r.info().unwrap();
    let b = info
        .layers
        .iter()
        .find(|l| l.name.as_deref() == Some("b"))
        .unwrap();
    assert!(!b.in_chain && !b.removed);
    // "a" now has two children: b and the new head.
    r.delete_snapshot("a").unwrap();
    let report = r.purge().unwrap();
    assert!(report.purged.is_empty());
    assert_eq!(report.kept.len(), 1);
    assert!(report.kept[0].1.contains("parent of 2"), "{:?}", report.kept);
    // Deleting the branch lets both go.
    r.delete_snapshot("b").unwrap();
    let report = r.purge().unwrap();
    assert_eq!(report.purged, vec!["b".to_string(), "a".to_string()]);
    let mut buf = [0u8; 4096];
    r.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, [1u8; 4096]);
}
