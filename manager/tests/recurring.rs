//! The manager's side of backups, with real processes: `hornd manager` and two
//! `hornd node` agents running iSCSI-served volumes, a backup target in a directory.
//! Recurring jobs keep exactly their retain count of snapshots and backups, by hand
//! and on their cron schedule; a volume created from a backup holds its data; a
//! standby follows its source's backups and, activated, holds the newest.

mod common;

use std::path::Path;
use std::time::Duration;

use common::iscsi::Initiator;
use common::manager::{
    hornctl, init, json, login, ok, portal, refused, roomy, start_agent, Agent, KillInstances, ManagerDaemon,
};

/// A manager and agents on nodes n1 and n2, both ready, with a directory backup
/// target `t1` at `data/target`.
fn cluster(data: &Path) -> (ManagerDaemon, Vec<Agent>) {
    init(data);
    let mgr = ManagerDaemon::start(data, "127.0.0.1:0");
    let a = mgr.addr.clone();
    roomy(data, &a);
    let agents: Vec<Agent> = (1..=2).map(|n| start_agent(data, &a, n)).collect();
    common::eventually(Duration::from_secs(20), "two ready nodes", || {
        let nodes = json(hornctl(data, &a, &["node", "list", "--json"]));
        nodes
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["state"] == "ready")
            .count()
            == 2
    });
    let target = format!("file://{}", data.join("target").display());
    std::fs::create_dir_all(data.join("target")).unwrap();
    ok(hornctl(data, &a, &["backup-target", "add", "t1", &target]));
    (mgr, agents)
}

/// `hornctl backup ARGS` on the target directly, as an operator without the manager.
fn backup_cmd(data: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_hornctl"))
        .arg("backup")
        .args(args)
        .args(["--target", &target_url(data)])
        .output()
        .unwrap()
}

fn target_url(data: &Path) -> String {
    format!("file://{}", data.join("target").display())
}

/// Attaches `volume` to `node` and logs in to it.
fn attach(data: &Path, a: &str, volume: &str, node: &str) -> Initiator {
    ok(hornctl(data, a, &["volume", "attach", volume, node]));
    let v = json(hornctl(data, a, &["volume", "info", volume, "--json"]));
    let (p, iqn) = portal(v["endpoint"].as_str().unwrap());
    login(data, a, &p, &iqn).expect("login to the attached volume")
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) | 1)
        .collect()
}

/// The snapshots of `volume` that job `job` made, by name.
fn job_snapshots(data: &Path, a: &str, volume: &str, job: &str) -> Vec<String> {
    let list = json(hornctl(data, a, &["volume", "snapshots", volume, "--json"]));
    let mut names: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["labels"]["horn.job"] == job && s["removed"] != true)
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

/// Runs job `job` by hand; the run's JSON.
fn run(data: &Path, a: &str, job: &str) -> serde_json::Value {
    json(hornctl(data, a, &["job", "run", job, "--json"]))
}

#[test]
fn recurring_jobs_keep_exactly_their_retain_count_by_hand_and_on_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (mgr, _agents) = cluster(data);
    let _cleanup = KillInstances(data);
    let a = &mgr.addr;

    // Bad targets are refused before they are kept.
    let e = refused(hornctl(data, a, &["backup-target", "add", "bad", "ftp://host/x"]));
    assert!(e.contains("ftp://host/x"), "{e}");
    let keys = data.join("s3-keys");
    std::fs::write(&keys, "AWS_ACCESS_KEY_ID=GK00\nAWS_SECRET_ACCESS_KEY=00\n").unwrap();
    let e = refused(hornctl(
        data,
        a,
        &[
            "backup-target",
            "add",
            "bad",
            "s3://bucket",
            "--s3-endpoint",
            "http://127.0.0.1:1",
            "--s3-region",
            "garage",
            "--s3-credentials-file",
            keys.to_str().unwrap(),
        ],
    ));
    assert!(e.contains("does not answer"), "{e}");
    let targets = json(hornctl(data, a, &["backup-target", "list", "--json"]));
    assert_eq!(targets.as_array().unwrap().len(), 1, "{targets}");

    for (name, replicas, group) in [("v1", "2", "nightly"), ("v2", "1", "nightly")] {
        ok(hornctl(
            data,
            a,
            &[
                "volume",
                "create",
                name,
                "--size",
                "16M",
                "--replicas",
                replicas,
                "--frontend",
                "iscsi",
                "--group",
                group,
            ],
        ));
    }
    let mut s = attach(data, a, "v1", "n1");
    assert_eq!(s.write10(0, &pattern(1, 64 * 1024)).status, 0);

    // Bad jobs are refused and change nothing.
    for (args, says) in [
        (
            vec![
                "--task",
                "backup",
                "--cron",
                "* * * * *",
                "--retain",
                "1",
                "--volume",
                "v1",
            ],
            "target",
        ),
        (
            vec![
                "--task",
                "snapshot",
                "--cron",
                "61 * * * *",
                "--retain",
                "1",
                "--volume",
                "v1",
            ],
            "61",
        ),
        (
            vec!["--task", "snapshot", "--cron", "* * * * *", "--retain", "1"],
            "volume",
        ),
        (
            vec![
                "--task",
                "backup",
                "--cron",
                "* * * * *",
                "--retain",
                "1",
                "--volume",
                "v1",
                "--target",
                "nosuch",
            ],
            "nosuch",
        ),
        (
            vec![
                "--task",
                "copy",
                "--cron",
                "* * * * *",
                "--retain",
                "1",
                "--volume",
                "v1",
            ],
            "copy",
        ),
    ] {
        let mut cmd = vec!["job", "create", "bad"];
        cmd.extend(args);
        let e = refused(hornctl(data, a, &cmd));
        assert!(e.contains(says), "{cmd:?}: {e}");
    }
    assert_eq!(
        json(hornctl(data, a, &["job", "list", "--json"])),
        serde_json::json!([])
    );

    // A snapshot job on group nightly, every minute, retain 3.
    ok(hornctl(
        data,
        a,
        &[
            "job",
            "create",
            "snaps",
            "--task",
            "snapshot",
            "--cron",
            "* * * * *",
            "--retain",
            "3",
            "--group",
            "nightly",
        ],
    ));
    let mut made = Vec::new();
    for n in 1..=4u64 {
        let r = run(data, a, "snaps");
        assert_eq!(r["number"], n, "{r}");
        let on: Vec<&serde_json::Value> = r["volumes"].as_array().unwrap().iter().collect();
        assert_eq!(on.len(), 2, "{r}");
        let v1 = on.iter().find(|v| v["volume"] == "v1").unwrap();
        assert_eq!(v1["outcome"], "done", "{r}");
        made.push(v1["made"].as_str().unwrap().to_string());
        // v2 is detached: skipped, and said why.
        let v2 = on.iter().find(|v| v["volume"] == "v2").unwrap();
        assert_eq!(v2["outcome"], "skipped", "{r}");
        assert!(v2["message"].as_str().unwrap().contains("detached"), "{r}");
        if n == 4 {
            assert_eq!(v1["retired"], serde_json::json!([made[0]]), "{r}");
        }
    }
    let mut kept = made[1..].to_vec();
    kept.sort();
    assert_eq!(job_snapshots(data, a, "v1", "snaps"), kept);
    // A snapshot not made by the job is not the job's to retire.
    ok(hornctl(data, a, &["volume", "snapshot", "v1", "mine"]));

    // A backup job of v1, retain 2, which only runs by hand here (1 January).
    ok(hornctl(
        data,
        a,
        &[
            "job",
            "create",
            "bk",
            "--task",
            "backup",
            "--cron",
            "0 0 1 1 *",
            "--retain",
            "2",
            "--volume",
            "v1",
            "--target",
            "t1",
            "--label",
            "kind=test",
        ],
    ));
    let e = refused(hornctl(data, a, &["backup-target", "remove", "t1"]));
    assert!(e.contains("job bk"), "{e}");
    let mut backups = Vec::new();
    for n in 0..3u8 {
        assert_eq!(
            s.write10(256 * u32::from(n), &pattern(10 + n, 128 * 1024)).status,
            0
        );
        let r = run(data, a, "bk");
        assert_eq!(r["volumes"][0]["outcome"], "done", "{r}");
        backups.push(r["volumes"][0]["made"].as_str().unwrap().to_string());
    }
    let listed = json(backup_cmd(data, &["list", "v1", "--json"]));
    let mut names: Vec<String> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert_eq!(m["labels"]["horn.job"], "bk", "{m}");
            assert_eq!(m["labels"]["kind"], "test", "{m}");
            m["name"].as_str().unwrap().to_string()
        })
        .collect();
    names.sort();
    let mut want = backups[1..].to_vec();
    want.sort();
    assert_eq!(names, want, "retain 2 keeps the two newest backups");
    let mut kept_snaps = backups[1..].to_vec();
    kept_snaps.sort();
    assert_eq!(job_snapshots(data, a, "v1", "bk"), kept_snaps);
    // The retired backup's blocks were collected: a collection finds nothing more,
    // and every block the kept backups name is there.
    let gc = json(backup_cmd(data, &["gc", "--json"]));
    assert_eq!(gc["deleted"], 0, "{gc}");
    ok(backup_cmd(data, &["scrub"]));
    // The newest backup holds what was written.
    let image = data.join("image");
    ok(backup_cmd(
        data,
        &["restore", "v1", &backups[2], "--to-file", image.to_str().unwrap()],
    ));
    let bytes = std::fs::read(&image).unwrap();
    let got = s.read10(0, 128).data;
    assert_eq!(&bytes[..64 * 1024], &got[..64 * 1024]);
    assert_eq!(
        &bytes[2 * 256 * 512..2 * 256 * 512 + 128 * 1024],
        &pattern(12, 128 * 1024)[..]
    );

    // The snapshot job fires on its schedule (within a minute), as a run of its own,
    // and still keeps exactly 3.
    common::eventually(Duration::from_secs(90), "a scheduled run of snaps", || {
        let h = json(hornctl(data, a, &["job", "history", "snaps", "--json"]));
        h.as_array().unwrap().iter().any(|r| r["trigger"] == "schedule")
    });
    let h = json(hornctl(data, a, &["job", "history", "snaps", "--json"]));
    let scheduled = h
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["trigger"] == "schedule")
        .unwrap();
    assert_eq!(scheduled["number"], 5, "{h}");
    assert_eq!(job_snapshots(data, a, "v1", "snaps").len(), 3);
    let all = json(hornctl(data, a, &["volume", "snapshots", "v1", "--json"]));
    assert!(all.to_string().contains("\"mine\""), "{all}");
    let list = ok(hornctl(data, a, &["job", "list"]));
    assert!(
        list.contains("snaps") && list.contains("group:nightly") && list.contains("run 5 (schedule)"),
        "{list}"
    );

    ok(hornctl(data, a, &["job", "delete", "snaps"]));
    let e = refused(hornctl(data, a, &["job", "history", "snaps"]));
    assert!(e.contains("snaps"), "{e}");
    ok(hornctl(data, a, &["job", "delete", "bk"]));
    ok(hornctl(data, a, &["backup-target", "remove", "t1"]));
    s.logout();
    ok(hornctl(data, a, &["volume", "detach", "v1"]));
    for v in ["v1", "v2"] {
        ok(hornctl(data, a, &["volume", "delete", v]));
    }
}

/// Reads `len` bytes at byte `offset` of the volume `s` serves.
fn read(s: &mut Initiator, offset: u64, len: usize) -> Vec<u8> {
    let r = s.read10((offset / 512) as u32, (len / 512) as u16);
    assert_eq!(r.status, 0);
    r.data
}

#[test]
fn a_volume_restored_from_a_backup_and_a_standby_that_follows_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (mgr, _agents) = cluster(data);
    let _cleanup = KillInstances(data);
    let a = &mgr.addr;
    ok(hornctl(
        data,
        a,
        &["settings", "set", "backup-poll-interval-secs=1"],
    ));
    ok(hornctl(
        data,
        a,
        &[
            "volume",
            "create",
            "v1",
            "--size",
            "16M",
            "--replicas",
            "2",
            "--frontend",
            "iscsi",
        ],
    ));
    let mut s = attach(data, a, "v1", "n1");
    let (pa, pb, pc) = (
        pattern(1, 128 * 1024),
        pattern(2, 64 * 1024),
        pattern(3, 64 * 1024),
    );
    assert_eq!(s.write10(0, &pa).status, 0);
    ok(hornctl(
        data,
        a,
        &["volume", "backup", "v1", "--target", "t1", "--backup-name", "b1"],
    ));

    // Bad input: refused, and no volume is made.
    for (args, says) in [
        (vec!["--from-backup", "t1?volume=nosuch"], "no backup"),
        (vec!["--from-backup", "t9?volume=v1"], "no backup target"),
        (vec!["--from-backup", "t1?backup=b1"], "volume="),
        (vec!["--from-backup", "t1?volume=v1&backup=b9"], "b9"),
        (
            vec!["--from-backup", "t1?volume=v1", "--size", "4M"],
            "cannot hold",
        ),
        (
            vec!["--from-backup", "t1?volume=v1&backup=b1", "--standby"],
            "standby",
        ),
    ] {
        let mut cmd = vec![
            "volume",
            "create",
            "bad",
            "--replicas",
            "1",
            "--frontend",
            "iscsi",
        ];
        cmd.extend(args);
        let e = refused(hornctl(data, a, &cmd));
        assert!(e.contains(says), "{cmd:?}: {e}");
    }
    let e = refused(hornctl(data, a, &["volume", "info", "bad"]));
    assert!(e.contains("bad"), "{e}");

    // A plain restore: attached without a frontend, restored, detached; then it
    // serves the backup's data from both its replicas.
    let out = ok(hornctl(
        data,
        a,
        &[
            "volume",
            "create",
            "r1",
            "--from-backup",
            "t1?volume=v1",
            "--replicas",
            "2",
            "--frontend",
            "iscsi",
        ],
    ));
    assert!(out.contains("restoring from t1?volume=v1"), "{out}");
    let v = json(hornctl(data, a, &["volume", "info", "r1", "--json"]));
    assert_eq!(v["size"], 16 << 20, "the backup's size, none given");
    common::eventually(Duration::from_secs(60), "r1 restored", || {
        let v = json(hornctl(data, a, &["volume", "info", "r1", "--json"]));
        v["restore_from"].is_null() && v["state"] == "detached"
    });
    let mut r = attach(data, a, "r1", "n2");
    assert_eq!(read(&mut r, 0, pa.len()), pa);
    assert_eq!(read(&mut r, 1 << 20, 4096), vec![0; 4096]);
    ok(hornctl(data, a, &["volume", "verify", "r1"]));
    let e = refused(hornctl(data, a, &["volume", "activate", "r1"]));
    assert!(e.contains("not a standby"), "{e}");
    r.logout();

    // A standby: it follows each new backup of v1, and cannot be attached meanwhile.
    ok(hornctl(
        data,
        a,
        &[
            "volume",
            "create",
            "s1",
            "--from-backup",
            "t1?volume=v1",
            "--standby",
            "--replicas",
            "1",
            "--frontend",
            "iscsi",
        ],
    ));
    let applied = |want: &str| {
        common::eventually(Duration::from_secs(60), &format!("s1 holding {want}"), || {
            let v = json(hornctl(data, a, &["volume", "info", "s1", "--json"]));
            v["restored_backup"] == want
        })
    };
    applied("b1");
    let e = refused(hornctl(data, a, &["volume", "attach", "s1", "n2"]));
    assert!(e.contains("standby"), "{e}");
    let e = refused(hornctl(data, a, &["backup-target", "remove", "t1"]));
    assert!(e.contains("volume s1"), "{e}");
    assert_eq!(s.write10(2048, &pb).status, 0);
    ok(hornctl(
        data,
        a,
        &["volume", "backup", "v1", "--target", "t1", "--backup-name", "b2"],
    ));
    applied("b2");
    // The backup it holds deleted (as a job's retention would): the next one is
    // applied by comparing every block.
    ok(backup_cmd(data, &["delete", "v1", "b2"]));
    assert_eq!(s.write10(4096, &pc).status, 0);
    assert_eq!(s.write10(0, &pc).status, 0);
    ok(hornctl(
        data,
        a,
        &["volume", "backup", "v1", "--target", "t1", "--backup-name", "b3"],
    ));
    // Activated: it applies b3 (if it has not yet), and is a normal volume.
    let out = ok(hornctl(data, a, &["volume", "activate", "s1", "--timeout", "60"]));
    assert!(out.contains("activated"), "{out}");
    let v = json(hornctl(data, a, &["volume", "info", "s1", "--json"]));
    assert!(v["restore_from"].is_null(), "{v}");
    assert_eq!(v["state"], "detached", "{v}");
    let mut t = attach(data, a, "s1", "n2");
    assert_eq!(read(&mut t, 0, pc.len()), pc);
    assert_eq!(read(&mut t, 64 * 1024, 64 * 1024), pa[64 * 1024..]);
    assert_eq!(read(&mut t, 2048 * 512, pb.len()), pb);
    assert_eq!(read(&mut t, 4096 * 512, pc.len()), pc);
    // The same as its source now.
    for mib in 0..3u64 {
        assert_eq!(
            read(&mut t, mib << 20, 1 << 20),
            read(&mut s, mib << 20, 1 << 20),
            "MiB {mib}"
        );
    }
    t.logout();
    s.logout();
    for v in ["v1", "r1", "s1"] {
        ok(hornctl(data, a, &["volume", "detach", v]));
        ok(hornctl(data, a, &["volume", "delete", v]));
    }
}

/// Bytes allocated under `dir`, recursively.
fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => allocated(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

#[test]
fn a_restore_goes_on_after_the_manager_is_killed_halfway() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (mut mgr, _agents) = cluster(data);
    let _cleanup = KillInstances(data);
    let a = mgr.addr.clone();
    let a = &a;
    const SIZE: usize = 128 << 20;
    ok(hornctl(
        data,
        a,
        &[
            "volume",
            "create",
            "v1",
            "--size",
            "128M",
            "--replicas",
            "1",
            "--frontend",
            "iscsi",
        ],
    ));
    let mut s = attach(data, a, "v1", "n1");
    let chunk = 256 * 1024;
    for (i, offset) in (0..SIZE).step_by(chunk).enumerate() {
        assert_eq!(
            s.write10((offset / 512) as u32, &pattern(i as u8, chunk)).status,
            0
        );
    }
    ok(hornctl(
        data,
        a,
        &["volume", "backup", "v1", "--target", "t1", "--backup-name", "b1"],
    ));

    // The restore stopped mid-way: its engine frozen (SIGSTOP) once some of the
    // volume is written, and the manager SIGKILLed.
    let v = json(hornctl(
        data,
        a,
        &[
            "volume",
            "create",
            "r1",
            "--from-backup",
            "t1?volume=v1",
            "--replicas",
            "1",
            "--frontend",
            "iscsi",
            "--json",
        ],
    ));
    let p = &v["placements"][0];
    let n: u32 = p["node"].as_str().unwrap()[1..].parse().unwrap();
    let replica = Path::new(p["disk"].as_str().unwrap()).join("replicas/r1-r1");
    let since = std::time::Instant::now();
    while allocated(&replica) < 16 << 20 {
        assert!(
            since.elapsed() < Duration::from_secs(60),
            "the restore did not begin"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let engine = common::manager::recorded_pids(data, n)
        .into_iter()
        .find(|(name, _)| name == "engine-r1")
        .map(|(_, pid)| pid as i32)
        .expect("r1's engine");
    // SAFETY: killpg takes no pointers; the group is the engine supervisor's own.
    unsafe { libc::killpg(engine, libc::SIGSTOP) };
    let at_kill = allocated(&replica);
    mgr.kill();
    // SAFETY: as above.
    unsafe { libc::killpg(engine, libc::SIGCONT) };
    assert!(
        at_kill < SIZE as u64,
        "caught mid-way: {at_kill} bytes of {SIZE} written"
    );

    // A new manager on the same store and address goes on with it.
    let _restarted = ManagerDaemon::start(data, a);
    common::eventually(Duration::from_secs(120), "r1 restored after the restart", || {
        let v = json(hornctl(data, a, &["volume", "info", "r1", "--json"]));
        v["restore_from"].is_null() && v["state"] == "detached"
    });
    let mut r = attach(data, a, "r1", "n2");
    for offset in (0..SIZE).step_by(4 << 20) {
        assert_eq!(
            read(&mut r, offset as u64, 1 << 20),
            read(&mut s, offset as u64, 1 << 20),
            "at {offset}"
        );
    }
    r.logout();
    s.logout();
}
