//! Backups of a real replica's snapshots to real targets (a directory, and Garage
//! for S3): full and incremental, restored byte for byte, verified, repaired,
//! resumed, deleted and collected while a backup runs.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use horn_backup::create::{backup, find_parent, BackupRequest};
use horn_backup::format::{BlockId, Manifest};
use horn_backup::garage::Garage;
use horn_backup::restore::{restore, verify, FileSink, RestoreOptions, RestoreSink};
use horn_backup::s3::S3Settings;
use horn_backup::store::{open_target, ObjectStore};
use horn_backup::{gc, list_backups, read_backup};
use horn_replica::image::SnapshotImage;
use horn_replica::Replica;

const MIB: u64 = 1 << 20;
const BLOCK: u32 = 256 << 10;

fn fill(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn image_bytes(dir: &Path, snap: &str) -> Vec<u8> {
    let img = SnapshotImage::open(dir, snap).unwrap();
    let mut out = vec![0u8; img.size() as usize];
    img.read_at(0, &mut out).unwrap();
    out
}

/// A directory target in `dir`.
fn dir_target(dir: &Path) -> Arc<dyn ObjectStore> {
    Arc::from(open_target(&format!("file://{}", dir.display()), &S3Settings::default()).unwrap())
}

fn req(name: &str, snap: &str) -> BackupRequest {
    BackupRequest {
        block_size: BLOCK,
        lease_wait: Duration::from_secs(30),
        ..BackupRequest::new("data", name, snap)
    }
}

/// Backs up `snap` of the replica in `dir`, incrementally where a parent is found.
fn back_up(
    store: &Arc<dyn ObjectStore>,
    dir: &Path,
    name: &str,
    snap: &str,
    full: bool,
) -> horn_backup::create::BackupReport {
    let img = SnapshotImage::open(dir, snap).unwrap();
    let parent = find_parent(store.as_ref(), "data", dir, &img).unwrap();
    let r = BackupRequest {
        full,
        ..req(name, snap)
    };
    backup(
        store.clone(),
        &img,
        parent.as_ref().map(|(m, i)| (m, i)),
        &r,
        &|_, _| {},
    )
    .unwrap()
}

fn restored(
    store: &dyn ObjectStore,
    name: &str,
    opts: &RestoreOptions,
) -> (Vec<u8>, horn_backup::restore::RestoreReport) {
    let m = read_backup(store, "data", name).unwrap();
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut sink = FileSink::create(out.path(), m.size).unwrap();
    let rep = restore(store, &m, &mut sink, opts, &|_, _| {}).unwrap();
    (std::fs::read(out.path()).unwrap(), rep)
}

/// A replica with history: a (random data, zeros, a repeated block), b (1% changed).
fn history(dir: &Path) -> Replica {
    let none = BTreeMap::new();
    let mut r = Replica::create(dir, 32 * MIB, 512).unwrap();
    r.write_at(0, &fill(1, 8 * MIB as usize)).unwrap();
    // The same block twice: stored once.
    let same = fill(2, BLOCK as usize);
    r.write_at(16 * MIB, &same).unwrap();
    r.write_at(20 * MIB, &same).unwrap();
    r.snapshot("a", &none).unwrap();
    // Changes: an overwrite inside one block, zeros over another, new data far off.
    r.write_at(MIB + 4096, &fill(3, 8192)).unwrap();
    r.write_zeroes(2 * MIB, BLOCK as u64).unwrap();
    r.write_at(30 * MIB, &fill(4, 4096)).unwrap();
    r.snapshot("b", &none).unwrap();
    r.write_at(0, &fill(5, MIB as usize)).unwrap();
    r.flush().unwrap();
    r
}

fn full_incremental_restore(store: Arc<dyn ObjectStore>) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("r");
    let r = history(&d);

    let full = back_up(&store, &d, "b1", "a", false);
    assert_eq!(full.parent, None);
    assert_eq!(full.blocks, 128);
    // 8 MiB of data (32 blocks) + the repeated block twice; stored once.
    assert_eq!(full.blocks_read, 34, "{full:?}");
    assert_eq!(full.blocks_uploaded, 33, "{full:?}");
    assert_eq!(full.blocks_deduplicated, 1, "{full:?}");

    let inc = back_up(&store, &d, "b2", "b", false);
    assert_eq!(inc.parent.as_deref(), Some("b1"));
    // Three blocks changed: the overwrite, the zeroed one, the new one.
    assert_eq!(inc.blocks_read, 3, "{inc:?}");
    assert_eq!(inc.blocks_uploaded, 2, "{inc:?}");
    assert_eq!(inc.zero_blocks, 1, "{inc:?}");
    assert!(inc.uploaded_bytes < 2 * u64::from(BLOCK) + 64 * 1024, "{inc:?}");

    let names: Vec<String> = list_backups(store.as_ref(), "data")
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, ["b1", "b2"]);

    for (name, snap) in [("b1", "a"), ("b2", "b")] {
        let want = image_bytes(&d, snap);
        let (got, rep) = restored(store.as_ref(), name, &RestoreOptions::default());
        assert!(
            got == want,
            "backup {name} restores snapshot {snap} byte for byte"
        );
        assert!(rep.bad.is_empty());
    }
    // Each restores on its own: with b1 gone, b2 still restores.
    gc::delete_backup(store.as_ref(), "data", "b1").unwrap();
    let report = gc::collect(store.clone(), Duration::from_secs(10)).unwrap();
    assert!(report.deleted >= 1, "b1's own blocks are collected: {report:?}");
    let (got, _) = restored(store.as_ref(), "b2", &RestoreOptions::default());
    assert!(got == image_bytes(&d, "b"));
    let v = verify(
        store.as_ref(),
        &list_backups(store.as_ref(), "data").unwrap(),
        4,
        &|_, _| {},
    );
    assert!(v.bad.is_empty(), "{v:?}");
    r.close().unwrap();
}

#[test]
fn full_and_incremental_backups_restore_byte_for_byte_to_a_directory() {
    let t = tempfile::tempdir().unwrap();
    full_incremental_restore(dir_target(t.path()));
}

#[test]
fn full_and_incremental_backups_restore_byte_for_byte_to_s3() {
    let g = tempfile::tempdir().unwrap();
    let garage = Garage::start(g.path(), "horn-backups").unwrap();
    full_incremental_restore(Arc::from(
        open_target(&garage.url("c1"), &garage.settings()).unwrap(),
    ));
}

#[test]
fn a_corrupt_block_is_found_reported_by_offset_and_repaired_by_a_full_backup() {
    let g = tempfile::tempdir().unwrap();
    let garage = Garage::start(g.path(), "horn-backups").unwrap();
    let store: Arc<dyn ObjectStore> = Arc::from(open_target(&garage.url(""), &garage.settings()).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("r");
    let r = history(&d);
    back_up(&store, &d, "b1", "a", false);
    let m = read_backup(store.as_ref(), "data", "b1").unwrap();
    // Corrupt block 5's object in the target: flip a byte of its body.
    let id: BlockId = m.blocks[5].unwrap();
    let mut obj = store.get(&id.key()).unwrap().unwrap();
    let last = obj.len() - 1;
    obj[last] ^= 0xff;
    store.put(&id.key(), &obj).unwrap();

    let v = verify(store.as_ref(), std::slice::from_ref(&m), 4, &|_, _| {});
    assert_eq!(v.bad.len(), 1, "{v:?}");
    assert_eq!(v.bad[0].1.index, 5);

    // Tolerant: reported with its offset, every other block restored.
    let want = image_bytes(&d, "a");
    let (got, rep) = restored(store.as_ref(), "b1", &RestoreOptions::default());
    assert_eq!(rep.bad.len(), 1, "{rep:?}");
    assert_eq!(rep.bad[0].offset, 5 * u64::from(BLOCK));
    assert!(
        rep.bad[0].to_string().contains(&format!("offset {}", 5 * BLOCK)),
        "{}",
        rep.bad[0]
    );
    let b = BLOCK as usize;
    assert!(got[..5 * b] == want[..5 * b] && got[6 * b..] == want[6 * b..]);
    // Strict: fails, naming it.
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut sink = FileSink::create(out.path(), m.size).unwrap();
    let strict = RestoreOptions {
        strict: true,
        ..Default::default()
    };
    let e = restore(store.as_ref(), &m, &mut sink, &strict, &|_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("strict") && e.contains(&id.to_hex()), "{e}");

    // An incremental backup trusts the target's block; a full one replaces it.
    let inc = back_up(&store, &d, "b2", "a", false);
    assert_eq!(inc.blocks_read, 0, "nothing changed since b1: {inc:?}");
    let full = back_up(&store, &d, "b3", "a", true);
    assert_eq!(
        full.blocks_uploaded, 33,
        "every block sent again, the repeated one once: {full:?}"
    );
    let all = list_backups(store.as_ref(), "data").unwrap();
    let v = verify(store.as_ref(), &all, 4, &|_, _| {});
    assert!(v.bad.is_empty(), "repaired: {v:?}");
    let (got, rep) = restored(store.as_ref(), "b1", &RestoreOptions::default());
    assert!(rep.bad.is_empty() && got == want);
    r.close().unwrap();
}

/// A destination that fails after some writes: a restore cut off halfway.
struct CutOff<'a> {
    inner: &'a mut FileSink,
    writes_left: usize,
}

impl RestoreSink for CutOff<'_> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        if self.writes_left == 0 {
            return Err("cut off".into());
        }
        self.writes_left -= 1;
        self.inner.write_at(offset, data)
    }
    fn flush(&mut self) -> Result<(), String> {
        self.inner.flush()
    }
}

#[test]
fn a_restore_cut_off_halfway_resumes_with_what_is_missing() {
    let t = tempfile::tempdir().unwrap();
    let store = dir_target(t.path());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("r");
    let r = history(&d);
    back_up(&store, &d, "b1", "a", false);
    let m = read_backup(store.as_ref(), "data", "b1").unwrap();
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut file = FileSink::create(out.path(), m.size).unwrap();
    let e = restore(
        store.as_ref(),
        &m,
        &mut CutOff {
            inner: &mut file,
            writes_left: 15,
        },
        &RestoreOptions::default(),
        &|_, _| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("cut off"), "{e}");
    let rep = restore(
        store.as_ref(),
        &m,
        &mut file,
        &RestoreOptions::default(),
        &|_, _| {},
    )
    .unwrap();
    assert_eq!(rep.already_there, 15 + (128 - 34), "{rep:?}");
    assert_eq!(rep.restored, 34 - 15, "{rep:?}");
    assert!(std::fs::read(out.path()).unwrap() == image_bytes(&d, "a"));
    r.close().unwrap();
}

#[test]
fn deletes_and_a_backup_at_once_leave_no_orphaned_and_no_missing_block() {
    let g = tempfile::tempdir().unwrap();
    let garage = Garage::start(g.path(), "horn-backups").unwrap();
    let store: Arc<dyn ObjectStore> = Arc::from(open_target(&garage.url(""), &garage.settings()).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("r");
    let mut r = history(&d);
    back_up(&store, &d, "b1", "a", false);
    back_up(&store, &d, "b2", "b", false);
    r.write_at(10 * MIB, &fill(9, 2 * MIB as usize)).unwrap();
    r.snapshot("c", &BTreeMap::new()).unwrap();
    std::thread::scope(|s| {
        let st = &store;
        let d = &d;
        s.spawn(move || back_up(st, d, "b3", "c", false));
        for name in ["b1", "b2"] {
            s.spawn(move || {
                gc::delete_backup(st.as_ref(), "data", name).unwrap();
                gc::collect(st.clone(), Duration::from_secs(60)).unwrap();
            });
        }
    });
    // Nothing orphaned: every block in the target is named by b3; nothing missing:
    // b3 verifies and restores snapshot c.
    let all = list_backups(store.as_ref(), "data").unwrap();
    assert_eq!(all.len(), 1);
    let named = all[0].referenced();
    let mut stored = std::collections::BTreeSet::new();
    for p in 0..=255u8 {
        for k in store.list(&format!("blocks/{p:02x}/")).unwrap() {
            stored.insert(k);
        }
    }
    let named_keys: std::collections::BTreeSet<String> = named.iter().map(|b| b.key()).collect();
    assert_eq!(stored, named_keys, "the target holds exactly the blocks b3 names");
    let v = verify(store.as_ref(), &all, 4, &|_, _| {});
    assert!(v.bad.is_empty(), "{v:?}");
    let (got, _) = restored(store.as_ref(), "b3", &RestoreOptions::default());
    assert!(got == image_bytes(&d, "c"));
    assert!(
        store.list("locks/").unwrap().is_empty(),
        "every lease was released"
    );
    r.close().unwrap();
}

#[test]
fn a_manifest_of_a_newer_format_is_refused_by_every_reader_and_changes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let store = dir_target(t.path());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("r");
    let r = history(&d);
    back_up(&store, &d, "b1", "a", false);
    let mut m: serde_json::Value =
        serde_json::from_slice(&store.get(&Manifest::key("data", "b1")).unwrap().unwrap()).unwrap();
    m["format"] = 2.into();
    m["name"] = "future".into();
    store
        .put(&Manifest::key("data", "future"), &serde_json::to_vec(&m).unwrap())
        .unwrap();
    let before = store.list("blocks/").unwrap_or_default();
    let mut blocks_before = 0;
    for p in 0..=255u8 {
        blocks_before += store.list(&format!("blocks/{p:02x}/")).unwrap().len();
    }
    let e = read_backup(store.as_ref(), "data", "future")
        .unwrap_err()
        .to_string();
    assert!(e.contains("format 2") && e.contains("upgrade Horn"), "{e}");
    let e = gc::collect(store.clone(), Duration::from_secs(5))
        .unwrap_err()
        .to_string();
    assert!(e.contains("format 2"), "{e}");
    let mut blocks_after = 0;
    for p in 0..=255u8 {
        blocks_after += store.list(&format!("blocks/{p:02x}/")).unwrap().len();
    }
    assert_eq!(
        blocks_before, blocks_after,
        "the collection stopped before deleting anything"
    );
    assert_eq!(before, store.list("blocks/").unwrap_or_default());
    r.close().unwrap();
}

#[test]
fn an_incremental_backup_starts_from_the_nearest_snapshot_whatever_the_names_and_clocks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("r");
    let mut r = history(&d);
    std::fs::create_dir(dir.path().join("t")).unwrap();
    let store = dir_target(&dir.path().join("t"));
    back_up(&store, &d, "a-old", "a", false);
    back_up(&store, &d, "z-new", "b", false);
    // Made within one second (as a job run twice by hand): their clocks agree.
    let old = read_backup(store.as_ref(), "data", "a-old").unwrap();
    let mut new = read_backup(store.as_ref(), "data", "z-new").unwrap();
    new.created_unix = old.created_unix;
    store
        .put(
            &horn_backup::format::Manifest::key("data", "z-new"),
            &new.to_bytes(),
        )
        .unwrap();
    r.snapshot("c", &BTreeMap::new()).unwrap();
    r.flush().unwrap();
    // From z-new (snapshot b): only the megabyte written since b is read (4 blocks).
    let inc = back_up(&store, &d, "next", "c", false);
    assert_eq!(inc.parent.as_deref(), Some("z-new"), "{inc:?}");
    assert_eq!(inc.blocks_read, u64::from(MIB as u32 / BLOCK), "{inc:?}");
    let (got, _) = restored(store.as_ref(), "next", &RestoreOptions::default());
    assert!(got == image_bytes(&d, "c"));
    r.close().unwrap();
}
