//! Kill `hornctl` at every step of every chain operation; the replica must open with
//! the chain and every read as they were before the operation or as they are after.
//!
//! The child is the real `hornctl` binary; `HORN_CRASH_POINT` makes it abort (SIGABRT,
//! no clean-up, as `kill -9`) at the named step. Each case then checks the head's
//! contents, the snapshot list, and the contents of every live snapshot (by reverting
//! to it), and finally runs the operation again to completion.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

use horn_replica::Replica;

const SIZE: u64 = 4 << 20;
const MIB: usize = 1 << 20;

/// What a replica should look like: head contents, volume size, snapshots with their
/// contents and removed flags.
#[derive(Clone, Debug, PartialEq)]
struct State {
    head: Vec<u8>,
    snaps: BTreeMap<String, (Vec<u8>, bool)>,
}

fn hornctl(dir: &Path, args: &[&str], crash_at: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hornctl"));
    cmd.arg("replica").arg(args[0]).arg(dir).args(&args[1..]);
    if let Some(p) = crash_at {
        cmd.env("HORN_CRASH_POINT", p);
    }
    cmd.output().expect("hornctl runs")
}

/// s1 holds `a`s, s2 adds `b`s and zeroes 64 KiB of s1's data, the head adds `c`s and
/// a 512-byte write inside a block s1 holds (so the head got a whole block).
fn prepare(dir: &Path) -> State {
    prepare_with(dir, true)
}

/// [`prepare`], but the head holds less than s2: only the 512-byte write and 64 KiB
/// zeroed inside s2's `b`s (a purge of s2 then folds the head down into s2).
fn prepare_small_head(dir: &Path) -> State {
    prepare_with(dir, false)
}

fn prepare_with(dir: &Path, big_head: bool) -> State {
    let mut r = Replica::create(dir, SIZE, 512).unwrap();
    let mut v = vec![0u8; SIZE as usize];
    let mut snaps = BTreeMap::new();
    r.write_at(0, &vec![b'a'; MIB]).unwrap();
    v[..MIB].fill(b'a');
    r.snapshot("s1", &BTreeMap::new()).unwrap();
    snaps.insert("s1".to_string(), (v.clone(), false));
    r.write_at(MIB as u64 / 2, &vec![b'b'; MIB]).unwrap();
    v[MIB / 2..MIB / 2 + MIB].fill(b'b');
    r.discard(0, 65536).unwrap();
    v[..65536].fill(0);
    r.snapshot("s2", &BTreeMap::new()).unwrap();
    snaps.insert("s2".to_string(), (v.clone(), false));
    if big_head {
        r.write_at(MIB as u64, &vec![b'c'; MIB]).unwrap();
        v[MIB..2 * MIB].fill(b'c');
    } else {
        r.discard(MIB as u64, 65536).unwrap();
        v[MIB..MIB + 65536].fill(0);
    }
    r.write_at(65536 + 4096 + 512, &[b'x'; 512]).unwrap();
    v[65536 + 4096 + 512..65536 + 4096 + 1024].fill(b'x');
    r.close().unwrap();
    State { head: v, snaps }
}

fn read_all(r: &mut Replica) -> Vec<u8> {
    let mut v = vec![0u8; r.size() as usize];
    r.read_at(0, &mut v).unwrap();
    v
}

/// Reads the replica's state; reverting to each live snapshot checks its contents
/// (and discards the head, so this is the last thing done to a replica).
fn observe(dir: &Path, expected_snaps: &BTreeMap<String, (Vec<u8>, bool)>) -> State {
    let mut r = Replica::open(dir).unwrap_or_else(|e| panic!("replica does not open after the crash: {e}"));
    let head = read_all(&mut r);
    let mut snaps = BTreeMap::new();
    for l in r.info().unwrap().layers {
        if let Some(name) = l.name {
            snaps.insert(name, (Vec::new(), l.removed));
        }
    }
    for (name, (data, removed)) in snaps.iter_mut() {
        if *removed {
            // Deleted snapshots cannot be read; compare with what the test expects.
            *data = expected_snaps.get(name).map(|s| s.0.clone()).unwrap_or_default();
            continue;
        }
        r.revert(name).unwrap();
        let mut got = read_all(&mut r);
        got.truncate(expected_snaps.get(name).map_or(got.len(), |s| s.0.len()));
        *data = got;
    }
    State { head, snaps }
}

struct Case {
    args: &'static [&'static str],
    /// Deletes done before the operation (for purge).
    deleted: &'static [&'static str],
    points: &'static [&'static str],
    after: fn(State) -> State,
}

fn run_case(case: &Case) {
    run_case_on(case, prepare)
}

fn run_case_on(case: &Case, prepare: fn(&Path) -> State) {
    for point in case.points {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("replica");
        let mut before = prepare(&dir);
        if !case.deleted.is_empty() {
            let mut r = Replica::open(&dir).unwrap();
            for d in case.deleted {
                r.delete_snapshot(d).unwrap();
                before.snaps.get_mut(*d).unwrap().1 = true;
            }
        }
        let after = (case.after)(before.clone());

        let out = hornctl(&dir, case.args, Some(point));
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGABRT),
            "{:?} at {point}: hornctl was not stopped at the crash point (stderr: {})",
            case.args,
            String::from_utf8_lossy(&out.stderr)
        );
        let mut all_snaps = before.snaps.clone();
        all_snaps.extend(after.snaps.clone());
        let seen = observe(&dir, &all_snaps);
        assert!(
            seen == before || seen == after,
            "{:?} killed at {point}: the replica is in neither the before nor the after state \
             (snapshots {:?}, head {} bytes)",
            case.args,
            seen.snaps
                .iter()
                .map(|(k, v)| (k.clone(), v.1))
                .collect::<Vec<_>>(),
            seen.head.len()
        );

        // And the operation can still be carried out from the recovered state.
        let tmp2 = tempfile::tempdir().unwrap();
        let dir2 = tmp2.path().join("replica");
        prepare(&dir2);
        let mut r = Replica::open(&dir2).unwrap();
        for d in case.deleted {
            r.delete_snapshot(d).unwrap();
        }
        drop(r);
        let crashed = hornctl(&dir2, case.args, Some(point));
        assert_eq!(crashed.status.signal(), Some(libc::SIGABRT));
        let rerun = hornctl(&dir2, case.args, None);
        let seen_after = observe(&dir2, &all_snaps);
        if seen_after != after {
            panic!(
                "{:?} killed at {point}, then run again ({}): not in the after state",
                case.args,
                String::from_utf8_lossy(&rerun.stderr)
            );
        }
    }
}

#[test]
fn snapshot_survives_a_kill_at_every_step() {
    run_case(&Case {
        args: &["snapshot", "s3"],
        deleted: &[],
        points: &[
            "snapshot:new-head-created",
            "meta:before-rename",
            "snapshot:committed",
        ],
        after: |mut s| {
            s.snaps.insert("s3".into(), (s.head.clone(), false));
            s
        },
    });
}

#[test]
fn delete_survives_a_kill_at_every_step() {
    run_case(&Case {
        args: &["delete", "s1"],
        deleted: &[],
        points: &["meta:before-rename"],
        after: |mut s| {
            s.snaps.get_mut("s1").unwrap().1 = true;
            s
        },
    });
}

#[test]
fn purge_into_a_snapshot_survives_a_kill_at_every_step() {
    run_case(&Case {
        args: &["purge"],
        deleted: &["s1"],
        points: &[
            "purge:copying",
            "purge:copied",
            "meta:before-rename",
            "purge:committed",
        ],
        after: |mut s| {
            s.snaps.remove("s1");
            s
        },
    });
}

#[test]
fn purge_into_the_head_survives_a_kill_at_every_step() {
    run_case(&Case {
        args: &["purge"],
        deleted: &["s2"],
        points: &[
            "purge:copying",
            "purge:copied",
            "meta:before-rename",
            "purge:committed",
        ],
        after: |mut s| {
            s.snaps.remove("s2");
            s
        },
    });
}

#[test]
fn purge_of_the_head_into_its_snapshot_survives_a_kill_at_every_step() {
    run_case_on(
        &Case {
            args: &["purge"],
            deleted: &["s2"],
            points: &[
                "purge:copying",
                "purge:copied",
                "meta:before-rename",
                "purge:committed",
            ],
            after: |mut s| {
                s.snaps.remove("s2");
                s
            },
        },
        prepare_small_head,
    );
}

#[test]
fn revert_survives_a_kill_at_every_step() {
    run_case(&Case {
        args: &["revert", "s1"],
        deleted: &[],
        points: &[
            "revert:new-head-created",
            "meta:before-rename",
            "revert:committed",
        ],
        after: |mut s| {
            s.head = s.snaps["s1"].0.clone();
            s
        },
    });
}

#[test]
fn expand_survives_a_kill_at_every_step() {
    run_case(&Case {
        args: &["expand", "--size", "8M"],
        deleted: &[],
        points: &[
            "meta:before-rename#1",
            "expand:intent-recorded",
            "expand:head-grown",
            "meta:before-rename#2",
        ],
        after: |mut s| {
            s.head.resize(8 << 20, 0);
            s
        },
    });
}
