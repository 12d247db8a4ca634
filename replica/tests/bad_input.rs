//! Every kind of bad input gets an error that names the problem, and loses nothing.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use horn_replica::{IoBuf, Replica, ReplicaError};

const SIZE: u64 = 1 << 20;

fn replica_with_data(dir: &Path) -> Replica {
    let mut r = Replica::create(dir, SIZE, 512).unwrap();
    r.write_at(0, &[9u8; 8192]).unwrap();
    r.snapshot("base", &BTreeMap::new()).unwrap();
    r.write_at(8192, &[7u8; 4096]).unwrap();
    r
}

/// The first 12 KiB as written by `replica_with_data` are intact.
fn assert_data_intact(r: &mut Replica) {
    let mut buf = vec![0u8; 12288];
    r.read_at(0, &mut buf).unwrap();
    assert!(buf[..8192].iter().all(|&b| b == 9) && buf[8192..].iter().all(|&b| b == 7));
}

#[test]
fn io_past_the_end_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = replica_with_data(dir.path());
    let err = r.write_at(SIZE - 512, &[1u8; 1024]).unwrap_err();
    assert!(matches!(err, ReplicaError::OutOfRange { .. }), "{err}");
    assert!(err.to_string().contains("past the end"), "{err}");
    let mut buf = [0u8; 512];
    assert!(matches!(
        r.read_at(SIZE, &mut buf),
        Err(ReplicaError::OutOfRange { .. })
    ));
    assert!(matches!(
        r.discard(SIZE - 4096, 8192),
        Err(ReplicaError::OutOfRange { .. })
    ));
    assert!(matches!(
        r.read_at(u64::MAX - 511, &mut buf),
        Err(ReplicaError::OutOfRange { .. })
    ));
    r.read_at(SIZE - 512, &mut buf).unwrap();
    assert_eq!(buf, [0u8; 512], "the refused write left nothing behind");
    assert_data_intact(&mut r);
}

#[test]
fn lengths_and_offsets_off_the_sector_size_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = replica_with_data(dir.path());
    let err = r.write_at(100, &[1u8; 512]).unwrap_err();
    assert!(
        err.to_string().contains("not a multiple of the sector size 512"),
        "{err}"
    );
    assert!(matches!(
        r.write_at(0, &[1u8; 100]),
        Err(ReplicaError::Misaligned { .. })
    ));
    assert!(matches!(
        r.discard(512, 100),
        Err(ReplicaError::Misaligned { .. })
    ));
    assert_data_intact(&mut r);

    let dir4k = tempfile::tempdir().unwrap();
    let mut r4k = Replica::create(dir4k.path(), SIZE, 4096).unwrap();
    assert!(matches!(
        r4k.write_at(512, &[1u8; 4096]),
        Err(ReplicaError::Misaligned {
            sector_size: 4096,
            ..
        })
    ));
}

#[test]
fn async_errors_arrive_as_completions_with_the_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = replica_with_data(dir.path());
    r.submit_write(SIZE, IoBuf::zeroed(4096), 42);
    let mut out = Vec::new();
    r.reap(1, &mut out).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].tag, 42);
    assert!(matches!(out[0].result, Err(ReplicaError::OutOfRange { .. })));
    assert_eq!(out[0].buf.as_ref().unwrap().len(), 4096);
}

#[test]
fn a_missing_metadata_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    drop(replica_with_data(dir.path()));
    fs::remove_file(dir.path().join("volume.json")).unwrap();
    let err = Replica::open(dir.path()).unwrap_err();
    assert!(matches!(err, ReplicaError::MissingMetadata { .. }));
    assert!(err.to_string().contains("volume.json"), "{err}");
}

#[test]
fn corrupt_metadata_is_named_and_nothing_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    drop(replica_with_data(dir.path()));
    let files_before = fs::read_dir(dir.path()).unwrap().count();
    let meta = dir.path().join("volume.json");
    let good = fs::read(&meta).unwrap();
    for (what, bytes) in [
        ("truncated", good[..good.len() / 2].to_vec()),
        ("flipped", {
            let mut b = good.clone();
            b[20] ^= 0x20;
            b
        }),
        ("garbage", b"not json\ncrc32c 00000000\n".to_vec()),
        ("empty", Vec::new()),
    ] {
        fs::write(&meta, &bytes).unwrap();
        let err = Replica::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, ReplicaError::CorruptMetadata { .. }),
            "{what}: {err}"
        );
        assert!(err.to_string().contains("volume.json"), "{what}: {err}");
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            files_before,
            "{what}: files were touched"
        );
    }
    // A well-formed file whose values break the invariants, with a valid checksum.
    let body = String::from_utf8(good.clone()).unwrap();
    let json = body
        .lines()
        .next()
        .unwrap()
        .replace("\"sector_size\":512", "\"sector_size\":1000");
    let mut text = json.into_bytes();
    text.push(b'\n');
    let trailer = format!("crc32c {:08x}\n", crc32c::crc32c(&text));
    text.extend_from_slice(trailer.as_bytes());
    fs::write(&meta, &text).unwrap();
    let err = Replica::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("sector size 1000"), "{err}");
    fs::write(&meta, &good).unwrap();
    assert_data_intact(&mut Replica::open(dir.path()).unwrap());
}

#[test]
fn a_missing_layer_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    drop(replica_with_data(dir.path()));
    let layer = dir.path().join("layer-00000001.img");
    let saved = dir.path().join("saved");
    fs::rename(&layer, &saved).unwrap();
    let err = Replica::open(dir.path()).unwrap_err();
    assert!(matches!(err, ReplicaError::MissingLayer { .. }), "{err}");
    assert!(
        err.to_string().contains("layer-00000001.img") && err.to_string().contains("base"),
        "{err}"
    );
    fs::rename(&saved, &layer).unwrap();
    assert_data_intact(&mut Replica::open(dir.path()).unwrap());
}

#[test]
fn a_layer_file_of_the_wrong_size_is_named() {
    let dir = tempfile::tempdir().unwrap();
    drop(replica_with_data(dir.path()));
    let layer = dir.path().join("layer-00000002.img");
    let f = fs::OpenOptions::new().write(true).open(&layer).unwrap();
    f.set_len(SIZE / 2).unwrap();
    let err = Replica::open(dir.path()).unwrap_err();
    assert!(
        matches!(err, ReplicaError::LayerSizeMismatch { expected: SIZE, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("layer-00000002.img"), "{err}");
}

#[test]
fn a_corrupt_zero_log_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = replica_with_data(dir.path());
    r.discard(0, 4096).unwrap(); // over "base": recorded in the head's zero log
    r.discard(4096, 4096).unwrap();
    drop(r);
    let log = dir.path().join("layer-00000002.zeros");
    let mut bytes = fs::read(&log).unwrap();
    bytes[16] ^= 1; // first record, followed by a good one
    fs::write(&log, &bytes).unwrap();
    let err = Replica::open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("layer-00000002.zeros") && err.contains("checksum"),
        "{err}"
    );
}

#[test]
fn bad_snapshot_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = replica_with_data(dir.path());
    for bad in ["", "a/b", "../x", ".hidden", "with space", &"n".repeat(64)] {
        let err = r.snapshot(bad, &BTreeMap::new()).unwrap_err();
        assert!(matches!(err, ReplicaError::InvalidName { .. }), "{bad:?}: {err}");
    }
    let err = r.snapshot("base", &BTreeMap::new()).unwrap_err();
    assert!(matches!(err, ReplicaError::SnapshotExists(_)));
    assert_eq!(err.to_string(), "a snapshot named \"base\" exists already");
    let labels = BTreeMap::from([("ok".to_string(), "bad\nvalue".to_string())]);
    assert!(matches!(
        r.snapshot("s", &labels),
        Err(ReplicaError::InvalidName { .. })
    ));
    assert_eq!(r.info().unwrap().chain_length, 2, "no snapshot was taken");
    assert_data_intact(&mut r);
}

#[test]
fn reverting_to_a_deleted_or_unknown_snapshot_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = replica_with_data(dir.path());
    assert!(matches!(r.revert("nope"), Err(ReplicaError::NoSuchSnapshot(_))));
    r.delete_snapshot("base").unwrap();
    let err = r.revert("base").unwrap_err();
    assert!(matches!(err, ReplicaError::SnapshotRemoved(_)), "{err}");
    assert!(err.to_string().contains("deleted"), "{err}");
    assert_data_intact(&mut r);
}

#[test]
fn bad_sizes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (size, ss, want) in [
        (0, 512, "empty"),
        (1000, 512, "multiple of 4096"),
        (1 << 60, 512, "64 TiB"),
    ] {
        let err = Replica::create(dir.path().join(format!("r{size}")), size, ss)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{size}: {err}");
    }
    assert!(matches!(
        Replica::create(dir.path().join("ss"), SIZE, 1024),
        Err(ReplicaError::InvalidSectorSize(1024))
    ));
    let mut r = replica_with_data(&dir.path().join("r"));
    assert!(r.expand(SIZE / 2).unwrap_err().to_string().contains("shrinking"));
    assert!(r
        .expand(SIZE + 100)
        .unwrap_err()
        .to_string()
        .contains("multiple of 4096"));
    assert_eq!(r.size(), SIZE);
    assert_data_intact(&mut r);
}

#[test]
fn create_refuses_a_directory_that_holds_files() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("precious"), b"keep me").unwrap();
    let err = Replica::create(dir.path(), SIZE, 512).unwrap_err();
    assert!(matches!(err, ReplicaError::DirectoryNotEmpty { .. }), "{err}");
    assert_eq!(fs::read(dir.path().join("precious")).unwrap(), b"keep me");
}

#[test]
fn a_second_opener_is_refused_while_the_first_holds_the_replica() {
    let dir = tempfile::tempdir().unwrap();
    let r = replica_with_data(dir.path());
    let err = Replica::open(dir.path()).unwrap_err();
    assert!(matches!(err, ReplicaError::Locked { .. }), "{err}");
    drop(r);
    Replica::open(dir.path()).unwrap();
}

#[test]
fn orphans_of_an_interrupted_operation_are_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    drop(replica_with_data(dir.path()));
    fs::write(dir.path().join("layer-00000099.img"), b"").unwrap();
    fs::write(dir.path().join("volume.json.tmp"), b"half").unwrap();
    fs::write(dir.path().join("notes.txt"), b"operator's file").unwrap();
    let mut r = Replica::open(dir.path()).unwrap();
    assert!(!dir.path().join("layer-00000099.img").exists());
    assert!(!dir.path().join("volume.json.tmp").exists());
    assert!(
        dir.path().join("notes.txt").exists(),
        "files that are not ours stay"
    );
    assert_data_intact(&mut r);
}
