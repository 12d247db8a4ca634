//! Backups through real processes: `hornd replica`s, `hornd engine`s and `hornctl
//! backup`, against Garage (S3) on loopback and a directory. A backup taken while
//! the volume is written holds exactly its snapshot; restores through an engine,
//! and into a file, read back byte for byte; an engine killed halfway through a
//! restore is replaced and the restore goes on where it stopped; an encrypted
//! volume's backup holds only ciphertext and restores to the same plaintext.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::iscsi::Initiator;
use common::{Daemon, EngineDaemon};
use horn_backup::garage::Garage;
use horn_engine::{StartOptions, Volume};
use horn_replica::image::SnapshotImage;

const MIB: usize = 1 << 20;
const IQN: &str = "iqn.2026-11.io.horn:backup";

fn random(seed: u64, len: usize) -> Vec<u8> {
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

/// Where the backups go, as `hornctl backup` arguments.
struct Target {
    args: Vec<String>,
}

impl Target {
    fn s3(g: &Garage, dir: &Path) -> Target {
        let creds = dir.join("s3-credentials");
        std::fs::write(
            &creds,
            format!(
                "AWS_ACCESS_KEY_ID={}\nAWS_SECRET_ACCESS_KEY={}\n",
                g.access_key, g.secret_key
            ),
        )
        .unwrap();
        Target {
            args: vec![
                "--target".into(),
                g.url("cluster"),
                "--s3-endpoint".into(),
                g.endpoint.clone(),
                "--s3-region".into(),
                "garage".into(),
                "--s3-credentials-file".into(),
                creds.display().to_string(),
            ],
        }
    }

    fn dir(path: &Path) -> Target {
        std::fs::create_dir_all(path).unwrap();
        Target {
            args: vec!["--target".into(), format!("file://{}", path.display())],
        }
    }

    fn hornctl(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_hornctl"))
            .arg("backup")
            .args(args)
            .args(&self.args)
            .arg("--json")
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> serde_json::Value {
        let out = self.hornctl(args);
        assert!(
            out.status.success(),
            "hornctl backup {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// `hornd engine --frontend iscsi` (no CHAP: a test on loopback), with its control
/// and iSCSI addresses.
struct IscsiEngine {
    child: Child,
    control: String,
    iscsi: String,
}

impl Drop for IscsiEngine {
    fn drop(&mut self) {
        // SAFETY: kill takes no pointers; the pid is our child's (reaped below).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

fn iscsi_engine(replicas: &[&Daemon]) -> IscsiEngine {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hornd"));
    cmd.args([
        "engine",
        "--control",
        "127.0.0.1:0",
        "--frontend",
        "iscsi",
        "--listen",
        "127.0.0.1:0",
    ])
    .args(["--name", "backup", "--no-chap"]);
    for r in replicas {
        cmd.arg("--replica")
            .arg(format!("{},{}", r.addr, r.control.trim_start_matches("http://")));
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let (mut control, mut iscsi) = (None, None);
    let mut line = String::new();
    while control.is_none() || iscsi.is_none() {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "hornd engine stopped");
        if let Some((_, a)) = line.rsplit_once("control on ") {
            control = Some(a.trim().to_string());
        }
        if let Some((_, rest)) = line.split_once(&format!("serving iSCSI target {IQN} on ")) {
            iscsi = Some(rest.split_whitespace().next().unwrap().to_string());
        }
    }
    // Keep reading its output so that it never blocks on a full pipe.
    std::thread::spawn(move || for _ in out.lines() {});
    IscsiEngine {
        child,
        control: control.unwrap(),
        iscsi: iscsi.unwrap(),
    }
}

fn snapshot_bytes(dir: &Path, name: &str) -> Vec<u8> {
    let img = SnapshotImage::open(dir, name).unwrap();
    let mut out = vec![0u8; img.size() as usize];
    img.read_at(0, &mut out).unwrap();
    out
}

fn replica(dir: &Path, name: &str, size: &str) -> (Daemon, PathBuf) {
    let d = dir.join(name);
    (Daemon::start(&d, &["--size", size]).unwrap(), d)
}

#[test]
fn a_backup_taken_while_the_volume_is_written_restores_exactly_its_snapshot_through_an_engine() {
    let tmp = tempfile::tempdir().unwrap();
    let garage = Garage::start(&tmp.path().join("garage"), "horn-backups").unwrap();
    let target = Target::s3(&garage, tmp.path());
    let (r1, d1) = replica(tmp.path(), "r1", "32M");
    let (r2, d2) = replica(tmp.path(), "r2", "32M");
    let engine = iscsi_engine(&[&r1, &r2]);

    // 8 MiB of data, the rest never written.
    let mut i = Initiator::login(&engine.iscsi, IQN, None).unwrap();
    for (n, chunk) in random(1, 8 * MIB).chunks(256 << 10).enumerate() {
        assert_eq!(i.write10((n * 512) as u32, chunk).status, 0);
    }
    let b1 = target.ok(&[
        "create",
        "b1",
        "--volume",
        "data",
        "--block-size",
        "256K",
        "--engine",
        &engine.control,
    ]);
    assert_eq!(b1["parent"], serde_json::Value::Null);
    assert_eq!(b1["blocks_uploaded"], 32, "{b1}");

    // Writes go on, through another session, while b2 is taken.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, addr) = (stop.clone(), engine.iscsi.clone());
        std::thread::spawn(move || {
            let mut w = Initiator::login(&addr, IQN, None).unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let lba = (n * 7919 % 8000) as u32 * 8;
                assert_eq!(w.write10(lba, &random(100 + n, 4096)).status, 0);
                n += 1;
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let b2 = target.ok(&["create", "b2", "--volume", "data", "--engine", &engine.control]);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(
        writes > 10,
        "the volume was written during the backup ({writes} writes)"
    );
    assert_eq!(b2["parent"], "b1", "{b2}");
    assert!(
        b2["blocks_read"].as_u64().unwrap() < 128,
        "only changed blocks are read: {b2}"
    );

    // b2 holds exactly its snapshot (which both replicas hold alike).
    let want = snapshot_bytes(&d1, "backup-b2");
    assert!(want == snapshot_bytes(&d2, "backup-b2"));
    let file = tmp.path().join("b2.img");
    let r = target.ok(&["restore", "data", "b2", "--to-file", file.to_str().unwrap()]);
    assert_eq!(r["bad"], serde_json::json!([]));
    assert!(
        std::fs::read(&file).unwrap() == want,
        "b2 restores its snapshot byte for byte"
    );
    // And its snapshot is not what the volume holds now (writes went on).
    let now = {
        let mut all = Vec::new();
        for lba in (0..65536u32).step_by(512) {
            all.extend(i.read10(lba, 512).data);
        }
        all
    };
    assert!(now != want, "the volume moved on after the snapshot");

    // Listed, described, verified.
    let list = target.ok(&["list", "data"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["b1", "b2"]);
    let info = target.ok(&["info", "data", "b2"]);
    assert_eq!(
        (info["snapshot"].as_str(), info["block_size"].as_u64()),
        (Some("backup-b2"), Some(256 << 10))
    );
    let v = target.ok(&["verify", "data", "b2"]);
    assert_eq!(v["bad"], serde_json::json!([]));

    // Restored through a new volume's engine: one GET per block, written to both of
    // its replicas.
    let (r3, d3) = replica(tmp.path(), "r3", "32M");
    let (r4, d4) = replica(tmp.path(), "r4", "32M");
    let restorer = EngineDaemon::start(&[&r3, &r4]).unwrap();
    let r = target.ok(&["restore", "data", "b2", "--engine", &restorer.control]);
    assert_eq!(r["bad"], serde_json::json!([]));
    let stored = want
        .chunks(256 << 10)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count();
    assert_eq!(r["restored"].as_u64().unwrap() as usize, stored, "{r}");
    let out = restorer.hornctl(&["snapshot", "restored"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(snapshot_bytes(&d3, "restored") == want, "replica r3 holds b2");
    assert!(snapshot_bytes(&d4, "restored") == want, "replica r4 holds b2");
    // The two replicas agree block by block (hornctl engine verify, online).
    let out = restorer.hornctl(&["verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));

    // Restoring again fetches nothing: every block is in place.
    let again = target.ok(&["restore", "data", "b2", "--engine", &restorer.control]);
    assert_eq!(again["restored"], 0, "{again}");
}

#[test]
fn a_restore_whose_engine_is_killed_halfway_goes_on_where_it_stopped_with_a_new_engine() {
    let tmp = tempfile::tempdir().unwrap();
    let target = Target::dir(&tmp.path().join("target"));
    let (r1, d1) = replica(tmp.path(), "r1", "96M");
    // 64 MiB of data, written through an engine of this process, then closed.
    {
        let (mut v, _) = Volume::start(&[r1.replica_addr()], Duration::from_secs(5)).unwrap();
        for (n, chunk) in random(7, 64 * MIB).chunks(MIB).enumerate() {
            v.write_at((n * MIB) as u64, chunk).unwrap();
        }
        v.close().unwrap();
    }
    let source = EngineDaemon::start(&[&r1]).unwrap();
    target.ok(&[
        "create",
        "full",
        "--volume",
        "data",
        "--block-size",
        "256K",
        "--engine",
        &source.control,
    ]);
    let want = snapshot_bytes(&d1, "backup-full");
    drop(source);

    let (r2, d2) = replica(tmp.path(), "r2", "96M");
    let first = EngineDaemon::start(&[&r2]).unwrap();
    // The restore runs in the engine; kill the engine once some of it is written.
    let restore = Command::new(env!("CARGO_BIN_EXE_hornctl"))
        .args([
            "backup",
            "restore",
            "data",
            "full",
            "--parallel",
            "1",
            "--engine",
            &first.control,
        ])
        .args(&target.args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let used = |d: &Path| -> u64 {
        std::fs::read_dir(d)
            .unwrap()
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while used(&d2) < 16 * MIB as u64 {
        assert!(Instant::now() < deadline, "the restore wrote nothing");
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(first); // SIGKILL
    let mut restore = restore;
    let _ = restore.wait();
    let written = used(&d2);
    assert!(
        written < 60 * MIB as u64,
        "killed halfway, not at the end ({written} bytes used)"
    );

    // A new engine on the same replica, the same restore: it goes on.
    let second = EngineDaemon::start(&[&r2]).unwrap();
    let r = target.ok(&["restore", "data", "full", "--engine", &second.control]);
    let (restored, there) = (
        r["restored"].as_u64().unwrap(),
        r["already_there"].as_u64().unwrap(),
    );
    assert!(there >= 60, "blocks written before the kill are kept: {r}");
    assert!((1..256).contains(&restored), "the rest is fetched: {r}");
    let out = second.hornctl(&["snapshot", "done"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        snapshot_bytes(&d2, "done") == want,
        "the resumed restore holds the backup"
    );
}

/// A 4 KiB block of a pattern no ciphertext holds by chance.
fn plaintext(i: u64) -> Vec<u8> {
    format!("HORN-BACKUP-PLAINTEXT-{i:08}-")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(4096)
        .collect()
}

#[test]
fn an_encrypted_volume_backs_up_only_ciphertext_and_restores_to_the_same_plaintext() {
    let tmp = tempfile::tempdir().unwrap();
    let target_dir = tmp.path().join("target");
    let target = Target::dir(&target_dir);
    let hex: String = (0..64u8)
        .map(|i| format!("{:02x}", i.wrapping_mul(11).wrapping_add(5)))
        .collect();
    let key_file = tmp.path().join("key");
    std::fs::write(&key_file, format!("{hex}\n")).unwrap();
    let cipher = Arc::new(horn_engine::crypt::VolumeCipher::from_key_file(&key_file).unwrap());
    let key = key_file.to_str().unwrap();

    let (r1, _) = replica(tmp.path(), "r1", "32M");
    {
        let (mut v, _) = Volume::start_with(
            &[r1.replica_addr()],
            Duration::from_secs(5),
            StartOptions {
                cipher: Some(cipher.clone()),
                ..StartOptions::default()
            },
        )
        .unwrap();
        for i in 0..1024u64 {
            v.write_at(i * 4096, &plaintext(i)).unwrap();
        }
        v.close().unwrap();
    }
    let source = EngineDaemon::start_with(&[&r1], &["--key-file", key]).unwrap();
    target.ok(&[
        "create",
        "b1",
        "--volume",
        "secret",
        "--compression",
        "none",
        "--engine",
        &source.control,
    ]);
    drop(source);

    // The target holds no plaintext: not in any object, nor in any block decoded.
    let needle = b"HORN-BACKUP-PLAINTEXT-";
    let holds = |hay: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    let mut objects = 0;
    for e in walk(&target_dir) {
        let bytes = std::fs::read(&e).unwrap();
        assert!(!holds(&bytes), "{} holds plaintext", e.display());
        objects += 1;
    }
    assert!(objects > 1, "the backup wrote blocks");

    // Restored into a new encrypted volume with the same key: the same plaintext.
    let (r2, _) = replica(tmp.path(), "r2", "32M");
    let restorer = EngineDaemon::start_with(&[&r2], &["--key-file", key]).unwrap();
    let r = target.ok(&["restore", "secret", "b1", "--engine", &restorer.control]);
    assert_eq!(r["bad"], serde_json::json!([]));
    drop(restorer);
    let (mut v, _) = Volume::start_with(
        &[r2.replica_addr()],
        Duration::from_secs(5),
        StartOptions {
            cipher: Some(cipher),
            ..StartOptions::default()
        },
    )
    .unwrap();
    let mut back = vec![0u8; 4096];
    for i in 0..1024u64 {
        v.read_at(i * 4096, &mut back).unwrap();
        assert!(back == plaintext(i), "block {i} restores to its plaintext");
    }
    v.close().unwrap();
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_standby_follows_three_incremental_backups_and_activates_with_the_last_ones_data() {
    let tmp = tempfile::tempdir().unwrap();
    let garage = Garage::start(&tmp.path().join("garage"), "horn-backups").unwrap();
    let target = Target::s3(&garage, tmp.path());
    let (r1, d1) = replica(tmp.path(), "source", "32M");
    let source = iscsi_engine(&[&r1]);
    let (r2, d2) = replica(tmp.path(), "standby", "32M");
    let standby = EngineDaemon::start(&[&r2]).unwrap();
    let mut i = Initiator::login(&source.iscsi, IQN, None).unwrap();
    // Three rounds: writes touching known 256 KiB blocks, a backup, the standby
    // follows with --once.
    let rounds: [&[u32]; 3] = [&[0, 1, 2, 3, 4, 5, 6, 7, 40], &[2, 90], &[5, 6, 100]];
    let mut prev = String::new();
    for (n, blocks) in rounds.iter().enumerate() {
        for &b in *blocks {
            assert_eq!(
                i.write10(b * 512, &random(1000 * n as u64 + u64::from(b), 256 << 10))
                    .status,
                0
            );
        }
        let name = format!("b{}", n + 1);
        target.ok(&[
            "create",
            &name,
            "--volume",
            "data",
            "--block-size",
            "256K",
            "--engine",
            &source.control,
        ]);
        let applied = target.ok(&["follow", "data", "--once", "--engine", &standby.control]);
        assert_eq!(applied["applied"], name.as_str(), "{applied}");
        assert_eq!(applied["since"], prev.as_str(), "{applied}");
        if n > 0 {
            assert_eq!(
                applied["report"]["restored"].as_u64().unwrap() as usize,
                blocks.len(),
                "only the changed blocks are fetched: {applied}"
            );
        }
        prev = name;
    }
    // Nothing newer: nothing applied.
    let again = target.ok(&["follow", "data", "--once", "--engine", &standby.control]);
    assert_eq!(again["applied"], serde_json::Value::Null);
    // Activated (no more following), it holds the last backup's snapshot.
    let out = standby.hornctl(&["snapshot", "activated"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(snapshot_bytes(&d2, "activated") == snapshot_bytes(&d1, "backup-b3"));
}
