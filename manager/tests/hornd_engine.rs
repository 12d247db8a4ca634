//! `hornd engine` and `hornctl engine` as real processes, on two `hornd replica`s.

mod common;

use common::{Daemon, EngineDaemon};
use horn_replica::state::EngineState;

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn hornctl_shows_the_engines_replicas_and_manages_snapshots_and_size_through_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = [tmp.path().join("a"), tmp.path().join("b")];
    let mut replicas: Vec<Daemon> = dirs
        .iter()
        .map(|d| Daemon::start(d, &["--size", "16M"]).unwrap())
        .collect();
    let mut engine = EngineDaemon::start(&[&replicas[0], &replicas[1]]).unwrap();
    assert!(
        engine
            .first_line
            .contains("16.0 MiB on 2 replicas (generation 1)"),
        "{}",
        engine.first_line
    );

    let out = engine.hornctl(&["info"]);
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains(&replicas[0].addr) && t.contains(&replicas[1].addr),
        "{t}"
    );
    assert_eq!(t.matches(" RW").count(), 2, "{t}");
    // The engine renews its read lease; the volume is not faulted.
    assert!(t.contains("read lease: ") && t.contains(" ms left"), "{t}");
    let out = engine.hornctl(&["--json", "info"]);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let left = info["read_lease_left_ms"].as_u64().unwrap();
    assert!(left > 0 && left <= 3000, "{info}");
    assert!(info["faulted"].is_null(), "{info}");

    let out = engine.hornctl(&["snapshot", "nightly", "--label", "kind=cron"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = engine.hornctl(&["snapshots", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "nightly");
    assert_eq!(list[0]["labels"]["kind"], "cron");

    // Bad input: the replica's words come back, and nothing changes.
    let out = engine.hornctl(&["snapshot", "no good"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("invalid snapshot name"), "{}", text(&out));
    let out = engine.hornctl(&["revert", "nope"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("no snapshot named"), "{}", text(&out));

    assert!(engine.hornctl(&["delete", "nightly"]).status.success());
    let out = engine.hornctl(&["purge", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
        serde_json::json!([])
    );

    let out = engine.hornctl(&["expand", "--size", "32M"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("32.0 MiB"), "{}", text(&out));
    let out = engine.hornctl(&["expand", "--size", "8M"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("cannot shrink"), "{}", text(&out));

    // A clean stop releases the replicas: they are marked clean.
    // SAFETY: kill takes no pointers; the pid is our child's.
    unsafe { libc::kill(engine.child.id() as i32, libc::SIGTERM) };
    let status = engine.child.wait().unwrap();
    assert!(status.success());
    for (r, dir) in replicas.iter_mut().zip(&dirs) {
        r.signal(libc::SIGTERM);
        r.wait_output();
        let state = EngineState::load(dir).unwrap();
        assert_eq!((state.generation, state.dirty), (1, false), "{}", dir.display());
        assert_eq!(
            horn_replica::Replica::open(dir).unwrap().size(),
            32 << 20,
            "expanded on every replica"
        );
    }
}

#[test]
fn hornctl_says_so_when_no_engine_answers_and_hornd_engine_when_no_replica_does() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hornctl"))
        .args(["engine", "--engine", "127.0.0.1:1", "info"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("cannot reach the engine at 127.0.0.1:1"),
        "{}",
        text(&out)
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hornd"))
        .args([
            "engine",
            "--control",
            "127.0.0.1:0",
            "--replica",
            "127.0.0.1:1,127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("no usable replica"), "{}", text(&out));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hornd"))
        .args(["engine", "--replica", "nonsense"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("is not DATA_ADDR,CONTROL_ADDR"),
        "{}",
        text(&out)
    );
}

#[test]
fn hornd_engine_pinned_to_its_volume_refuses_blank_replicas_in_its_place() {
    let tmp = tempfile::tempdir().unwrap();
    let start = |name: &str| Daemon::start(&tmp.path().join(name), &["--size", "16M"]).unwrap();
    let (a, b) = (start("a"), start("b"));
    let engine = EngineDaemon::start(&[&a, &b]).unwrap();
    // "hornd engine: volume ID of 16.0 MiB on 2 replicas ..."
    let id = engine.first_line.split_whitespace().nth(3).unwrap().to_string();
    assert_eq!(id.len(), 32, "{}", engine.first_line);
    drop(engine);
    // Pinned to its volume, the same replicas start again.
    let engine = EngineDaemon::start_with(&[&a, &b], &["--volume", &id]).unwrap();
    assert!(engine.first_line.contains(&id), "{}", engine.first_line);
    drop(engine);
    // Blank replicas in their place (the disks not mounted) are refused, named.
    let (c, d) = (start("c"), start("d"));
    let err = EngineDaemon::start_with(&[&c, &d], &["--volume", &id])
        .err()
        .expect("a pinned start on blank replicas is refused");
    assert!(err.contains(&format!("pinned to volume {id}")), "{err}");
    assert!(err.contains(&format!("{} is blank", c.addr)), "{err}");
    assert!(err.contains("disks are mounted"), "{err}");
    // Nothing was claimed on them: unpinned, they make a new volume.
    let engine = EngineDaemon::start(&[&c, &d]).unwrap();
    assert!(!engine.first_line.contains(&id), "{}", engine.first_line);
}
