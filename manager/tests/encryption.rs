//! Encrypted volumes (`horn_engine::crypt`) against real replica processes: what the
//! replicas store is ciphertext (a known pattern written through the engine appears
//! in none of their files), the engine reads back the plaintext, a start with another
//! key or none is refused before anything is served, zeroes read back as zeros, and a
//! replica rebuilt from another serves the same plaintext alone.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{Daemon, EngineDaemon};
use horn_engine::crypt::VolumeCipher;
use horn_engine::replica_set::IoKind;
use horn_engine::{StartOptions, Volume};
use horn_replica::IoBuf;

const TIMEOUT: Duration = Duration::from_secs(5);

fn key(seed: u8) -> Arc<VolumeCipher> {
    let k: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(29).wrapping_add(seed)).collect();
    Arc::new(VolumeCipher::from_key(&k).unwrap())
}

fn encrypted(replicas: &[&Daemon], cipher: Option<Arc<VolumeCipher>>) -> Result<Volume, String> {
    let addrs: Vec<_> = replicas.iter().map(|d| d.replica_addr()).collect();
    Volume::start_with(
        &addrs,
        TIMEOUT,
        StartOptions {
            cipher,
            ..StartOptions::default()
        },
    )
    .map(|(v, _)| v)
    .map_err(|e| e.to_string())
}

/// A block of a pattern no ciphertext will hold by chance.
fn pattern(i: u64) -> Vec<u8> {
    format!("HORN-PLAINTEXT-{i:08}-")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(4096)
        .collect()
}

/// Every file under `dir`, read whole.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
        }
    }
    out
}

fn holds(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn an_encrypted_volume_stores_only_ciphertext_and_reads_back_its_plaintext() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<_> = (0..3).map(|i| tmp.path().join(format!("r{i}"))).collect();
    let d: Vec<Daemon> = dirs
        .iter()
        .map(|p| Daemon::start(p, &["--size", "32M"]).unwrap())
        .collect();
    let mut v = encrypted(&[&d[0], &d[1]], Some(key(1))).unwrap();
    assert!(v.engine().is_encrypted());
    for i in 0..64u64 {
        v.write_at(i * 8192, &pattern(i)).unwrap();
    }
    // Zeroes written over a written block read back as zeros, as does a block never
    // written (the replica holds zeros there, not ciphertext of zeros).
    v.write_at(1 << 20, &pattern(999)).unwrap();
    v.submit(IoKind::WriteZeroes, 1 << 20, 4096, None, 1);
    let mut done = Vec::new();
    v.reap(1, &mut done).unwrap();
    assert!(done[0].result.is_ok(), "{:?}", done[0].result);
    let mut zeros = vec![1u8; 8192];
    v.read_at(1 << 20, &mut zeros).unwrap();
    assert!(zeros.iter().all(|&b| b == 0));
    for i in 0..64u64 {
        let mut back = vec![0u8; 4096];
        v.read_at(i * 8192, &mut back).unwrap();
        assert_eq!(back, pattern(i), "block {i}");
    }
    // A write's buffer comes back as ciphertext (it was encrypted where it stood).
    v.submit(
        IoKind::Write,
        2 << 20,
        4096,
        Some(IoBuf::from_slice(&pattern(5))),
        2,
    );
    done.clear();
    v.reap(1, &mut done).unwrap();
    assert_ne!(done[0].buf.as_ref().unwrap().as_slice(), &pattern(5)[..]);
    v.flush().unwrap();
    v.close().unwrap();

    // The replicas' files hold none of it.
    for dir in &dirs[..2] {
        for (path, bytes) in files(dir) {
            assert!(!holds(&bytes, b"HORN-PLAINTEXT-"), "{path} holds plaintext");
        }
    }

    // Another key, or none, is refused, naming why; the right key reads it all.
    let e = encrypted(&[&d[0], &d[1]], Some(key(2))).err().unwrap();
    assert!(e.contains("the key given is not volume"), "{e}");
    let e = encrypted(&[&d[0], &d[1]], None).err().unwrap();
    assert!(e.contains("is encrypted (aes-256-xts)"), "{e}");
    let mut v = encrypted(&[&d[0], &d[1]], Some(key(1))).unwrap();
    let mut back = vec![0u8; 4096];
    v.read_at(63 * 8192, &mut back).unwrap();
    assert_eq!(back, pattern(63));

    // A third replica rebuilt online from the others, then serving alone: the same
    // plaintext (the rebuild copied ciphertext).
    let id = horn_engine::rebuild::add_replica(&mut v, d[2].replica_addr()).unwrap();
    common::eventually(Duration::from_secs(30), "the rebuild done", || {
        v.engine()
            .rebuilds()
            .iter()
            .any(|r| r.id == id && r.state == horn_engine::RebuildState::Done)
    });
    v.close().unwrap();
    for (path, bytes) in files(&dirs[2]) {
        assert!(!holds(&bytes, b"HORN-PLAINTEXT-"), "{path} holds plaintext");
    }
    // The rebuilt replica, read by itself (its daemon stopped): ciphertext that the
    // key turns into the plaintext written before it joined.
    drop(d);
    let mut r = horn_replica::Replica::open(&dirs[2]).unwrap();
    let cipher = key(1);
    for i in [0u64, 31, 63] {
        let mut back = vec![0u8; 4096];
        r.read_at(i * 8192, &mut back).unwrap();
        assert_ne!(back, pattern(i));
        cipher.decrypt(i * 8192, 512, &mut back);
        assert_eq!(back, pattern(i), "block {i} of the rebuilt replica");
    }
}

#[test]
fn a_plain_volume_refuses_a_key_and_hornd_engine_takes_one_from_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Daemon::start(&tmp.path().join("a"), &["--size", "32M"]).unwrap();
    let mut v = encrypted(&[&a], None).unwrap();
    v.write_at(0, &pattern(1)).unwrap();
    v.close().unwrap();
    let e = encrypted(&[&a], Some(key(1))).err().unwrap();
    assert!(e.contains("is not encrypted, and a key was given"), "{e}");

    // hornd engine --key-file: a bad file is refused with the reason; a good one
    // serves, and says the volume is encrypted.
    let b = Daemon::start(&tmp.path().join("b"), &["--size", "32M"]).unwrap();
    std::fs::write(tmp.path().join("short"), "0123").unwrap();
    let short = tmp.path().join("short").display().to_string();
    let e = EngineDaemon::start_with(&[&b], &["--key-file", &short])
        .err()
        .unwrap();
    assert!(e.contains("64 bytes"), "{e}");
    let hex: String = (0..64u8)
        .map(|i| format!("{:02x}", i.wrapping_mul(7).wrapping_add(3)))
        .collect();
    std::fs::write(tmp.path().join("key"), format!("{hex}\n")).unwrap();
    let file = tmp.path().join("key").display().to_string();
    let engine = EngineDaemon::start_with(&[&b], &["--key-file", &file]).unwrap();
    assert!(
        engine.first_line.contains("encrypted: AES-256-XTS"),
        "{}",
        engine.first_line
    );
}
