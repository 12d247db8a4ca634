//! Volumes served by node agents: `hornd manager` and three `hornd node` agents as
//! child processes, each node on a loopback address of its own (127.0.0.11 to 13)
//! with its own disk and state directory; the agents run the replicas and engines
//! (`hornd supervise`, `hornd replica`, `hornd engine --frontend iscsi`) as real
//! processes, and the volume is read and written through its iSCSI endpoint.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::iscsi::Initiator;
use common::manager::{
    hornctl, init, json, login, node_dir, ok, portal, recorded_pids, refused, roomy, start_agent,
    start_agent_joining, Agent, KillInstances, ManagerDaemon,
};

fn pid_alive(pid: u64) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

fn block(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn agents_serve_a_volume_through_attach_detach_reattach_and_an_agent_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    init(data);
    let mut mgr = ManagerDaemon::start(data, "127.0.0.1:0");
    let _cleanup = KillInstances(data);
    let addr = mgr.addr.clone();
    let a = &addr;
    roomy(data, a);
    let mut agents: Vec<Agent> = (1..=3).map(|n| start_agent(data, a, n)).collect();
    common::eventually(Duration::from_secs(20), "three ready nodes", || {
        let nodes = json(hornctl(data, a, &["node", "list", "--json"]));
        nodes
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["state"] == "ready")
            .count()
            == 3
    });

    let v = json(hornctl(
        data,
        a,
        &[
            "volume",
            "create",
            "v1",
            "--size",
            "64M",
            "--replicas",
            "3",
            "--frontend",
            "iscsi",
            "--json",
        ],
    ));
    assert_eq!(v["placements"].as_array().unwrap().len(), 3);
    // Every node runs its replica: each replica reports its own node's address.
    common::eventually(Duration::from_secs(30), "three running replicas", || {
        let v = json(hornctl(data, a, &["volume", "info", "v1", "--json"]));
        v["placements"].as_array().unwrap().iter().all(|p| {
            p["state"] == "running"
                && p["data_address"].as_str().is_some_and(|d| {
                    d.starts_with(&format!(
                        "127.0.0.{}:",
                        10 + p["node"].as_str().unwrap()[1..].parse::<u32>().unwrap()
                    ))
                })
        })
    });

    // Bad input changes nothing.
    let e = refused(hornctl(data, a, &["volume", "attach", "v1", "n9"]));
    assert!(e.contains("n9"), "{e}");
    let e = refused(hornctl(data, a, &["volume", "attach", "nosuch", "n1"]));
    assert!(e.contains("nosuch"), "{e}");

    // Attached on n1: served by an engine on n1's address, healthy on three RW replicas.
    let out = ok(hornctl(data, a, &["volume", "attach", "v1", "n1"]));
    assert!(out.contains("attached to n1"), "{out}");
    let v = json(hornctl(data, a, &["volume", "info", "v1", "--json"]));
    assert_eq!(v["state"], "attached");
    let endpoint = v["endpoint"].as_str().unwrap().to_string();
    let (p1, iqn) = portal(&endpoint);
    assert!(p1.starts_with("127.0.0.11:"), "{endpoint}");
    common::eventually(Duration::from_secs(10), "a healthy volume", || {
        let v = json(hornctl(data, a, &["volume", "info", "v1", "--json"]));
        v["robustness"] == "healthy"
            && v["placements"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["mode"] == "RW")
    });
    // Its replicas serve only its engine: each was given the volume's secret (0600,
    // on /run), and a client without the generation's key can neither read nor write.
    let v = json(hornctl(data, a, &["volume", "info", "v1", "--json"]));
    for p in v["placements"].as_array().unwrap() {
        let addr = p["data_address"].as_str().unwrap();
        let mut c = horn_proto::client::BlockingClient::connect(addr, Duration::from_secs(5)).unwrap();
        for generation in [0, 1, 2, 3] {
            let (h, _) = c.read(1, 0, 4096, generation).unwrap();
            assert_eq!(h.status, horn_proto::wire::Status::Unauthenticated, "{addr}");
            c = horn_proto::client::BlockingClient::connect(addr, Duration::from_secs(5)).unwrap();
        }
        let (h, _) = c.write(1, 0, &[0xee; 4096], 1).unwrap();
        assert_eq!(h.status, horn_proto::wire::Status::Unauthenticated, "{addr}");
    }
    let secrets = secret_files(data, "v1", &placement_ids(&v));
    assert_eq!(secrets.len(), 3, "{secrets:?}");
    assert!(secrets.iter().all(|(_, mode)| *mode == 0o600), "{secrets:?}");
    let e = refused(hornctl(data, a, &["volume", "attach", "v1", "n2"]));
    assert!(e.contains("attached to node n1"), "{e}");
    let e = refused(hornctl(data, a, &["volume", "delete", "v1"]));
    assert!(e.contains("detach it first"), "{e}");

    let first = block(1, 64 * 1024);
    // The target requires the volume's CHAP credentials: none, or a wrong secret,
    // fail authentication (2/1).
    assert_eq!(
        Initiator::login(&p1, &iqn, None).err(),
        Some((2, 1)),
        "a login without CHAP"
    );
    let wrong = common::iscsi::Chap {
        user: "horn-v1",
        secret: "not-the-secret-0000",
        mutual: None,
    };
    assert_eq!(Initiator::login(&p1, &iqn, Some(wrong)).err(), Some((2, 1)));
    let shown = ok(hornctl(data, a, &["volume", "info", "v1"]));
    assert!(shown.contains("iSCSI: CHAP as horn-v1"), "{shown}");
    let mut s = login(data, a, &p1, &iqn).expect("login to the attached volume");
    assert_eq!(s.write10(0, &first).status, 0);
    assert_eq!(s.write10(100_000, &first[..4096]).status, 0);

    // The agent on n1 killed and started again: it adopts the engine and replica
    // (the same supervisors run), and the session goes on.
    let before = recorded_pids(data, 1);
    assert_eq!(before.len(), 2, "n1 runs the engine and a replica: {before:?}");
    agents.remove(0);
    agents.insert(0, start_agent(data, a, 1));
    let since = std::time::Instant::now();
    while json(hornctl(data, a, &["node", "info", "n1", "--json"]))[0]["state"] != "ready" {
        assert!(
            since.elapsed() < Duration::from_secs(20),
            "n1 is not ready again: {}",
            std::fs::read_to_string(node_dir(data, 1).join("agent.log")).unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        recorded_pids(data, 1),
        before,
        "the new agent adopted its instances"
    );
    assert!(before.iter().all(|(_, p)| pid_alive(*p)));
    let log = std::fs::read_to_string(node_dir(data, 1).join("agent.log")).unwrap();
    assert_eq!(log.matches("adopted a running instance").count(), 2, "{log}");
    let second = block(2, 8192);
    assert_eq!(s.write10(200, &second).status, 0);
    assert_eq!(s.read10(0, 128).data, first);

    // The manager SIGKILLed while the volume is written, and started again on the same
    // store and address: the volume never notices (every write goes on being
    // acknowledged, the engine is the same process), and every object is there.
    let volumes_before = json(hornctl(data, a, &["volume", "list", "--json"]));
    let engine_before = recorded_pids(data, 1);
    mgr.kill();
    let mut lba = 1000;
    let since = std::time::Instant::now();
    while since.elapsed() < Duration::from_secs(2) {
        let r = s.write10(lba, &first[..4096]);
        assert_eq!(r.status, 0, "a write while the manager is down: {:02x?}", r.sense);
        // Round the volume (64 MiB: 131072 sectors) as often as the writes take.
        lba = 1000 + (lba - 1000 + 8) % 120_000;
    }
    let _restarted = ManagerDaemon::start(data, a);
    for _ in 0..20 {
        assert_eq!(
            s.write10(lba, &first[..4096]).status,
            0,
            "a write after the restart"
        );
        lba += 8;
        std::thread::sleep(Duration::from_millis(100));
    }
    common::eventually(
        Duration::from_secs(20),
        "the volume attached and healthy again",
        || {
            let v = json(hornctl(data, a, &["volume", "info", "v1", "--json"]));
            v["state"] == "attached" && v["robustness"] == "healthy"
        },
    );
    let strip = |mut v: serde_json::Value| {
        for x in v.as_array_mut().unwrap() {
            x.as_object_mut().unwrap().remove("revision");
        }
        v
    };
    assert_eq!(
        strip(json(hornctl(data, a, &["volume", "list", "--json"]))),
        strip(volumes_before),
        "the specs and the state after the restart"
    );
    assert_eq!(recorded_pids(data, 1), engine_before, "the same engine serves");
    assert!(engine_before.iter().all(|(_, p)| pid_alive(*p)));
    for i in 0..(lba - 1000) / 8 {
        assert_eq!(
            s.read10(1000 + i * 8, 8).data,
            first[..4096],
            "block {}",
            1000 + i * 8
        );
    }
    drop(s);

    // Detached: the engine stops and its portal closes.
    let out = ok(hornctl(data, a, &["volume", "detach", "v1"]));
    assert!(out.contains("detached"), "{out}");
    assert!(
        std::net::TcpStream::connect(&p1).is_err(),
        "the portal still accepts"
    );
    assert_eq!(recorded_pids(data, 1).len(), 1, "only the replica runs on n1");

    // Attached on n2: everything acknowledged on n1 reads back there.
    let out = ok(hornctl(data, a, &["volume", "attach", "v1", "n2"]));
    assert!(out.contains("attached to n2"), "{out}");
    let v = json(hornctl(data, a, &["volume", "info", "v1", "--json"]));
    let (p2, iqn2) = portal(v["endpoint"].as_str().unwrap());
    assert!(p2.starts_with("127.0.0.12:"), "{v}");
    let mut s = login(data, a, &p2, &iqn2).expect("login on n2");
    assert_eq!(s.read10(0, 128).data, first);
    assert_eq!(s.read10(100_000, 8).data, first[..4096]);
    assert_eq!(s.read10(200, 16).data, second);

    // Chain operations through the manager: a snapshot, writes after it, an online
    // expansion, a verify; a revert only in maintenance mode, and it brings back
    // what the snapshot held.
    let out = ok(hornctl(
        data,
        a,
        &["volume", "snapshot", "v1", "s1", "--label", "by=test"],
    ));
    assert!(out.contains("snapshot s1 of volume v1 taken"), "{out}");
    let snaps = json(hornctl(data, a, &["volume", "snapshots", "v1", "--json"]));
    assert!(
        snaps
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["name"] == "s1" && x["labels"]["by"] == "test"),
        "{snaps}"
    );
    let later = block(3, 64 * 1024);
    assert_eq!(s.write10(0, &later).status, 0);
    let e = refused(hornctl(data, a, &["volume", "expand", "v1", "--size", "32M"]));
    assert!(e.contains("cannot shrink"), "{e}");
    let out = ok(hornctl(data, a, &["volume", "expand", "v1", "--size", "96M"]));
    assert!(out.contains("expanded to 96.0 MiB"), "{out}");
    // The session is told (UNIT ATTENTION, CAPACITY DATA HAS CHANGED), then reads the
    // new capacity.
    let ua = s.command(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8);
    assert_eq!(ua.status, 2, "CHECK CONDITION");
    assert_eq!(
        (ua.sense[2] & 0x0f, ua.sense[12], ua.sense[13]),
        (0x06, 0x2a, 0x09),
        "{:?}",
        ua.sense
    );
    let cap = s.command(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8);
    assert_eq!(cap.status, 0);
    assert_eq!(
        u32::from_be_bytes(cap.data[..4].try_into().unwrap()),
        (96 << 20) / 512 - 1,
        "the LUN's last block"
    );
    assert_eq!(
        json(hornctl(data, a, &["volume", "info", "v1", "--json"]))["size"],
        96 << 20
    );
    let out = ok(hornctl(data, a, &["volume", "verify", "v1"]));
    assert!(out.contains("identical"), "{out}");
    let e = refused(hornctl(data, a, &["volume", "revert", "v1", "s1"]));
    assert!(e.contains("maintenance mode"), "{e}");
    drop(s);
    ok(hornctl(data, a, &["volume", "detach", "v1"]));
    let out = ok(hornctl(
        data,
        a,
        &["volume", "attach", "v1", "n2", "--maintenance"],
    ));
    assert!(out.contains("maintenance mode"), "{out}");
    let v = json(hornctl(data, a, &["volume", "info", "v1", "--json"]));
    assert_eq!(
        (v["maintenance"].as_bool(), v["endpoint"].is_null()),
        (Some(true), true),
        "{v}"
    );
    let out = ok(hornctl(data, a, &["volume", "revert", "v1", "s1"]));
    assert!(out.contains("reverted to snapshot s1"), "{out}");
    ok(hornctl(data, a, &["volume", "detach", "v1"]));
    ok(hornctl(data, a, &["volume", "attach", "v1", "n2"]));
    let v = json(hornctl(data, a, &["volume", "info", "v1", "--json"]));
    let (p2, iqn2) = portal(v["endpoint"].as_str().unwrap());
    let mut s = login(data, a, &p2, &iqn2).expect("login after the revert");
    assert_eq!(
        s.read10(0, 128).data,
        first,
        "the snapshot's data, not what was written after it"
    );
    drop(s);
    let out = ok(hornctl(data, a, &["volume", "delete-snapshot", "v1", "s1"]));
    assert!(out.contains("deleted"), "{out}");
    let snaps = json(hornctl(data, a, &["volume", "snapshots", "v1", "--json"]));
    assert!(
        snaps.as_array().unwrap().iter().all(|x| x["name"] != "s1"),
        "{snaps}"
    );
    let e = refused(hornctl(data, a, &["volume", "snapshot", "nosuch", "s2"]));
    assert!(e.contains("nosuch"), "{e}");

    // The engines after the first start only on replicas that hold the volume's id:
    // with every replica's files gone (disks not mounted, say) and the replicas started
    // again blank, the volume is not served as a new, empty one.
    let v = json(hornctl(data, a, &["volume", "info", "v1", "--json"]));
    let id = v["volume_id"]
        .as_str()
        .expect("the volume id is recorded")
        .to_string();
    let engine: serde_json::Value = serde_json::from_slice(
        &std::fs::read(node_dir(data, 2).join("state/instances/engine-v1/instance.json")).unwrap(),
    )
    .unwrap();
    let command: Vec<String> = serde_json::from_value(engine["command"].clone()).unwrap();
    assert!(
        command.windows(2).any(|w| w[0] == "--volume" && w[1] == id),
        "{command:?}"
    );
    ok(hornctl(data, a, &["volume", "detach", "v1"]));
    for n in 1..=3 {
        for (_, pid) in recorded_pids(data, n) {
            // SAFETY: killpg takes no pointers; the group is the supervisor's own.
            unsafe { libc::killpg(pid as i32, libc::SIGKILL) };
        }
        std::fs::remove_dir_all(node_dir(data, n).join("disk/replicas")).unwrap();
    }
    common::eventually(Duration::from_secs(30), "blank replicas running again", || {
        let v = json(hornctl(data, a, &["volume", "info", "v1", "--json"]));
        v["placements"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["state"] == "running")
    });
    let e = refused(hornctl(
        data,
        a,
        &["volume", "attach", "v1", "n3", "--timeout", "15"],
    ));
    assert!(e.contains("still attaching"), "{e}");
    eprintln!("attach on blank replicas: {e}");
    ok(hornctl(data, a, &["volume", "detach", "v1"]));

    // Detached and deleted: every replica stops and its files go, on every node.
    ok(hornctl(data, a, &["volume", "detach", "v1"]));
    ok(hornctl(data, a, &["volume", "delete", "v1"]));
    common::eventually(Duration::from_secs(20), "every instance removed", || {
        (1..=3).all(|n| recorded_pids(data, n).is_empty())
    });
    for n in 1..=3 {
        let replicas = node_dir(data, n).join("disk/replicas");
        let left: Vec<_> = std::fs::read_dir(&replicas)
            .map(|d| d.collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "n{n} keeps {left:?}");
    }
    drop(agents);
}

/// The pids whose parent is `pid`.
fn children(pid: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u64>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after its ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1));
        if ppid.and_then(|x| x.parse::<u64>().ok()) == Some(pid) {
            out.push(p);
        }
    }
    out
}

fn volume(data: &Path, a: &str) -> serde_json::Value {
    json(hornctl(data, a, &["volume", "info", "v2", "--json"]))
}

fn placement_ids(v: &serde_json::Value) -> Vec<String> {
    v["placements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect()
}

fn node_of(v: &serde_json::Value, id: &str) -> u32 {
    let p = v["placements"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id)
        .unwrap();
    p["node"].as_str().unwrap()[1..].parse().unwrap()
}

#[test]
fn a_failed_replica_back_within_the_wait_is_reused_and_a_lost_nodes_is_replaced_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    init(data);
    let mgr = ManagerDaemon::start(data, "127.0.0.1:0");
    let _cleanup = KillInstances(data);
    let a = &mgr.addr;
    roomy(data, a);
    // Settings: bad ones are refused and change nothing; a short lease for this test.
    let e = refused(hornctl(data, a, &["settings", "set", "nosuch=1"]));
    assert!(e.contains("no setting \"nosuch\""), "{e}");
    let e = refused(hornctl(
        data,
        a,
        &[
            "settings",
            "set",
            "node-lease-secs=0",
            "replica-replenishment-wait-secs=5",
        ],
    ));
    assert!(e.contains("give 2 to 3600"), "{e}");
    let e = refused(hornctl(data, a, &["settings", "set", "node-anti-affinity=maybe"]));
    assert!(e.contains("hard or soft"), "{e}");
    let s = json(hornctl(data, a, &["settings", "list", "--json"]));
    assert_eq!(s["replica-replenishment-wait-secs"], "60");
    let s = json(hornctl(
        data,
        a,
        &["settings", "set", "node-lease-secs=3", "--json"],
    ));
    assert_eq!(s["node-lease-secs"], "3");

    let mut agents: Vec<Agent> = (1..=4).map(|n| start_agent(data, a, n)).collect();
    common::eventually(Duration::from_secs(20), "four ready nodes", || {
        let nodes = json(hornctl(data, a, &["node", "list", "--json"]));
        nodes
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["state"] == "ready")
            .count()
            == 4
    });
    let v = json(hornctl(
        data,
        a,
        &[
            "volume",
            "create",
            "v2",
            "--size",
            "32M",
            "--replicas",
            "3",
            "--frontend",
            "iscsi",
            "--json",
        ],
    ));
    let home = node_of(&v, "r1");
    ok(hornctl(data, a, &["volume", "attach", "v2", &format!("n{home}")]));
    let v = volume(data, a);
    let (p, iqn) = portal(v["endpoint"].as_str().unwrap());
    let mut s = login(data, a, &p, &iqn).expect("login");
    let first = block(7, 32 * 1024);
    assert_eq!(s.write10(0, &first).status, 0);
    common::eventually(Duration::from_secs(10), "a healthy volume", || {
        volume(data, a)["robustness"] == "healthy"
    });

    // r2's daemon killed: its supervisor starts it again within seconds, well within
    // the 60 s wait, and the engine's agent adds it back: the same replica, rebuilt.
    let n2 = node_of(&v, "r2");
    let sup = recorded_pids(data, n2)
        .into_iter()
        .find(|(name, _)| name == "replica-v2-r2")
        .unwrap()
        .1;
    let daemon = children(sup);
    assert_eq!(daemon.len(), 1, "the supervisor runs one daemon");
    // SAFETY: kill takes no pointers; the pid is the replica daemon's.
    unsafe { libc::kill(daemon[0] as i32, libc::SIGKILL) };
    let second = block(8, 16 * 1024);
    assert_eq!(s.write10(64, &second).status, 0, "a write goes on without r2");
    // The engine's agent adds it back (its log says so), and it turns RW again.
    let agent_log = || std::fs::read_to_string(node_dir(data, home).join("agent.log")).unwrap();
    common::eventually(Duration::from_secs(30), "r2 added back to the engine", || {
        agent_log()
            .lines()
            .any(|l| l.contains("replica added to the engine; rebuilding") && l.contains("replica=r2"))
    });
    common::eventually(Duration::from_secs(30), "r2 back, RW", || {
        let v = volume(data, a);
        v["robustness"] == "healthy" && placement_ids(&v) == ["r1", "r2", "r3"]
    });

    // r3's node lost: its agent and instances killed. The engine goes on with two,
    // the node goes down, and after the (now short) wait a replacement on the spare
    // node is rebuilt online.
    ok(hornctl(
        data,
        a,
        &["settings", "set", "replica-replenishment-wait-secs=2"],
    ));
    let lost = node_of(&v, "r3");
    agents[lost as usize - 1].child.kill().unwrap();
    for (_, pid) in recorded_pids(data, lost) {
        // SAFETY: killpg takes no pointers; the group is the supervisor's own.
        unsafe { libc::killpg(pid as i32, libc::SIGKILL) };
    }
    let third = block(9, 16 * 1024);
    assert_eq!(s.write10(128, &third).status, 0, "a write goes on without r3");
    common::eventually(
        Duration::from_secs(60),
        "r3 replaced and the volume healthy again",
        || {
            let v = volume(data, a);
            v["robustness"] == "healthy" && placement_ids(&v) == ["r1", "r2", "r4"]
        },
    );
    let v = volume(data, a);
    let spare = node_of(&v, "r4");
    assert!(![home, n2, lost].contains(&spare), "r4 on n{spare}");
    assert_eq!(
        json(hornctl(data, a, &["node", "info", &format!("n{lost}"), "--json"]))[0]["state"],
        "down"
    );
    // Everything acknowledged reads back, and keeps being written.
    assert_eq!(s.read10(0, 64).data, first);
    assert_eq!(s.read10(64, 32).data, second);
    assert_eq!(s.read10(128, 32).data, third);
    drop(s);

    // The lost node's agent back: its stale replica is no longer wanted and goes.
    agents[lost as usize - 1] = start_agent(data, a, lost);
    common::eventually(Duration::from_secs(20), "the stale replica removed", || {
        recorded_pids(data, lost).is_empty()
            && std::fs::read_dir(node_dir(data, lost).join("disk/replicas")).map_or(true, |d| d.count() == 0)
    });
    ok(hornctl(data, a, &["volume", "detach", "v2"]));
    ok(hornctl(data, a, &["volume", "delete", "v2"]));
    common::eventually(Duration::from_secs(20), "every instance removed", || {
        (1..=4).all(|n| recorded_pids(data, n).is_empty())
    });
    drop(agents);
}

#[test]
fn disks_added_with_hornctl_are_measured_used_kept_and_removed_only_when_empty() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    init(data);
    let mgr = ManagerDaemon::start(data, "127.0.0.1:0");
    let _cleanup = KillInstances(data);
    let a = &mgr.addr;
    roomy(data, a);
    let mut agent = start_agent(data, a, 1);
    common::eventually(Duration::from_secs(20), "n1 ready", || {
        let nodes = json(hornctl(data, a, &["node", "list", "--json"]));
        nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == "n1" && n["state"] == "ready")
    });
    let fast = node_dir(data, 1).join("fast");
    let fast_s = fast.to_str().unwrap();
    // Bad input changes nothing.
    let e = refused(hornctl(data, a, &["node", "disk", "add", "n1", "relative/path"]));
    assert!(e.contains("absolute"), "{e}");
    let e = refused(hornctl(data, a, &["node", "disk", "add", "n9", fast_s]));
    assert!(e.contains("n9"), "{e}");
    let out = ok(hornctl(
        data,
        a,
        &[
            "node",
            "disk",
            "add",
            "n1",
            fast_s,
            "--tag",
            "fast",
            "--reserved",
            "1M",
        ],
    ));
    assert!(out.contains(fast_s), "{out}");
    let e = refused(hornctl(data, a, &["node", "disk", "add", "n1", fast_s]));
    assert!(e.contains("already"), "{e}");
    // The agent creates and measures it.
    let disk = |path: &str| {
        json(hornctl(data, a, &["node", "info", "n1", "--json"]))[0]["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["path"] == path)
            .cloned()
    };
    common::eventually(Duration::from_secs(10), "the new disk measured", || {
        disk(fast_s).is_some_and(|d| d["capacity"].as_u64().unwrap_or(0) > 0)
    });
    assert!(fast.is_dir());
    let d = disk(fast_s).unwrap();
    assert_eq!(
        (d["tags"].clone(), d["reserved"].as_u64()),
        (serde_json::json!(["fast"]), Some(1 << 20))
    );

    // A volume that asks for a fast disk gets it, and its replica's files are there.
    let v = json(hornctl(
        data,
        a,
        &[
            "volume",
            "create",
            "f",
            "--size",
            "16M",
            "--replicas",
            "1",
            "--frontend",
            "iscsi",
            "--disk-selector",
            "fast",
            "--json",
        ],
    ));
    assert_eq!(v["placements"][0]["disk"], fast_s);
    common::eventually(
        Duration::from_secs(20),
        "the replica running on the fast disk",
        || {
            fast.join("replicas/f-r1").is_dir()
                && json(hornctl(data, a, &["volume", "info", "f", "--json"]))["placements"][0]["state"]
                    == "running"
        },
    );
    let e = refused(hornctl(data, a, &["node", "disk", "remove", "n1", fast_s]));
    assert!(e.contains("holds replicas (r1 of f)"), "{e}");
    let flag_disk = node_dir(data, 1).join("disk");
    let e = refused(hornctl(
        data,
        a,
        &["node", "disk", "remove", "n1", flag_disk.to_str().unwrap()],
    ));
    assert!(e.contains("command line"), "{e}");

    // The agent started again registers its command-line disk; the added one stays.
    drop(agent);
    agent = start_agent(data, a, 1);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        disk(fast_s).is_some(),
        "the added disk is kept across registrations"
    );

    ok(hornctl(data, a, &["volume", "delete", "f"]));
    common::eventually(Duration::from_secs(20), "the replica removed", || {
        recorded_pids(data, 1).is_empty()
    });
    let out = ok(hornctl(data, a, &["node", "disk", "remove", "n1", fast_s]));
    assert!(!out.contains(fast_s), "{out}");
    assert!(disk(fast_s).is_none());
    drop(agent);
}

/// Node `n` lost at once: its agent and every instance it runs killed (SIGKILL).
fn lose_node(data: &Path, agents: &mut [Option<Agent>], n: u32) {
    if let Some(mut agent) = agents[n as usize - 1].take() {
        let _ = agent.child.kill();
        let _ = agent.child.wait();
    }
    for (_, pid) in recorded_pids(data, n) {
        // SAFETY: killpg takes no pointers; the group is the supervisor's own.
        unsafe { libc::killpg(pid as i32, libc::SIGKILL) };
    }
}

/// Agents for nodes n1 to n`count`, once every one of them is ready.
fn ready_agents(data: &Path, a: &str, count: u32) -> Vec<Agent> {
    let agents: Vec<Agent> = (1..=count).map(|n| start_agent(data, a, n)).collect();
    common::eventually(Duration::from_secs(20), "every node ready", || {
        (1..=count).all(|n| node_state(data, a, n) == "ready")
    });
    agents
}

/// Node `n`'s state ("unknown" before it registers).
fn node_state(data: &Path, a: &str, n: u32) -> String {
    let nodes = json(hornctl(data, a, &["node", "list", "--json"]));
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == format!("n{n}"))
        .and_then(|x| x["state"].as_str())
        .unwrap_or("unknown")
        .to_string()
}

/// The manager is the engines' membership authority: every record is stored there
/// before it counts, so a volume whose replicas all failed is salvaged from one that
/// holds every acknowledged write (even one of three), never from a stale one, and two
/// of three replicas lost at once leave the volume going on with the third.
#[test]
fn the_manager_salvages_a_volume_only_from_current_replicas_and_keeps_it_going_on_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    init(data);
    let mgr = ManagerDaemon::start(data, "127.0.0.1:0");
    let _cleanup = KillInstances(data);
    let a = &mgr.addr;
    roomy(data, a);
    // No replacement in this test: which replicas come back is the point.
    ok(hornctl(
        data,
        a,
        &[
            "settings",
            "set",
            "node-lease-secs=3",
            "replica-replenishment-wait-secs=3600",
        ],
    ));
    let mut agents: Vec<Option<Agent>> = ready_agents(data, a, 3).into_iter().map(Some).collect();
    ok(hornctl(
        data,
        a,
        &[
            "volume",
            "create",
            "v3",
            "--size",
            "32M",
            "--replicas",
            "3",
            "--frontend",
            "iscsi",
        ],
    ));
    let info = || json(hornctl(data, a, &["volume", "info", "v3", "--json"]));
    let v = info();
    let home = node_of(&v, "r1");
    ok(hornctl(data, a, &["volume", "attach", "v3", &format!("n{home}")]));
    common::eventually(Duration::from_secs(20), "a healthy volume", || {
        info()["robustness"] == "healthy"
    });
    let v = info();
    let membership = v["membership"].as_str().unwrap().to_string();
    assert!(
        membership.contains("RW:") && membership.matches("127.0.0.").count() == 3,
        "the manager holds the engine's record with three RW members: {membership}"
    );
    let (p, iqn) = portal(v["endpoint"].as_str().unwrap());
    let mut s = login(data, a, &p, &iqn).expect("login");
    let first = block(11, 32 * 1024);
    assert_eq!(s.write10(0, &first).status, 0);
    drop(s);

    // The whole cluster loses power: every node at once. Only the volume's own node
    // comes back. Its engine starts on r1 alone: one of the three replicas the
    // manager's record names as holding every acknowledged write, on the node of the
    // last engine (so that engine is gone). The replicas alone would need two.
    for n in 1..=3 {
        lose_node(data, &mut agents, n);
    }
    agents[home as usize - 1] = Some(start_agent(data, a, home));
    let others: Vec<u32> = (1..=3).filter(|n| *n != home).collect();
    common::eventually(Duration::from_secs(20), "the other nodes down", || {
        others.iter().all(|n| node_state(data, a, *n) == "down")
    });
    common::eventually(Duration::from_secs(60), "the volume served again on r1", || {
        let v = info();
        v["state"] == "attached" && v["robustness"] == "degraded"
    });
    let v = info();
    let r1 = v["placements"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "r1")
        .unwrap()["data_address"]
        .as_str()
        .unwrap()
        .to_string();
    let membership = v["membership"].as_str().unwrap().to_string();
    assert!(
        membership.contains(&format!("RW: {r1}")) && membership.matches("127.0.0.").count() == 1,
        "salvaged from r1 alone: {membership}"
    );
    let (p, iqn) = portal(v["endpoint"].as_str().unwrap());
    let mut s = login(data, a, &p, &iqn).expect("login after the salvage");
    assert_eq!(
        s.read10(0, 64).data,
        first,
        "what was acknowledged before the outage"
    );
    let second = block(12, 16 * 1024);
    assert_eq!(s.write10(64, &second).status, 0, "a write on r1 alone");
    drop(s);

    // Now r1's node is lost, and the other two come back: they missed `second`.
    // Attached elsewhere, the volume is not served from them, and says why.
    lose_node(data, &mut agents, home);
    for &n in &others {
        agents[n as usize - 1] = Some(start_agent(data, a, n));
    }
    common::eventually(Duration::from_secs(20), "the nodes swapped", || {
        node_state(data, a, home) == "down" && others.iter().all(|n| node_state(data, a, *n) == "ready")
    });
    ok(hornctl(data, a, &["volume", "detach", "v3"]));
    let there = others[0];
    let e = refused(hornctl(
        data,
        a,
        &["volume", "attach", "v3", &format!("n{there}"), "--timeout", "20"],
    ));
    assert!(e.contains("still attaching"), "{e}");
    let v = info();
    let why = v["message"].as_str().unwrap();
    assert_ne!(v["state"], "attached");
    assert!(
        why.contains(&r1) && why.contains("hold every acknowledged write"),
        "the volume says which replica it waits for: {v}"
    );
    eprintln!("attach on stale replicas only: {why}");

    // r1's node back: the engine on the other node starts on r1 (a majority of the
    // one replica that holds every write), then rebuilds the stale two.
    agents[home as usize - 1] = Some(start_agent(data, a, home));
    common::eventually(
        Duration::from_secs(90),
        "served from r1 on the other node",
        || info()["state"] == "attached",
    );
    let v = info();
    let (p, iqn) = portal(v["endpoint"].as_str().unwrap());
    assert!(p.starts_with(&format!("127.0.0.{}:", 10 + there)), "{v}");
    let mut s = login(data, a, &p, &iqn).expect("login on the other node");
    assert_eq!(s.read10(0, 64).data, first);
    assert_eq!(s.read10(64, 32).data, second, "the write only r1 held");
    common::eventually(Duration::from_secs(60), "the stale replicas rebuilt", || {
        info()["robustness"] == "healthy"
    });
    let out = ok(hornctl(data, a, &["volume", "verify", "v3"]));
    assert!(out.contains("identical"), "{out}");

    // Two of three replicas lost at once, under writes: the engine records both
    // drops with the manager and goes on with the third.
    let (r1_node, r3_node) = (node_of(&v, "r1"), node_of(&v, "r3"));
    let keep = (1..=3).find(|n| ![r1_node, r3_node].contains(n)).unwrap();
    assert_eq!(keep, there, "the engine's node keeps r2");
    lose_node(data, &mut agents, r1_node);
    lose_node(data, &mut agents, r3_node);
    let third = block(13, 16 * 1024);
    assert_eq!(
        s.write10(128, &third).status,
        0,
        "a write with one of three replicas left"
    );
    assert_eq!(s.read10(0, 64).data, first);
    assert_eq!(s.read10(64, 32).data, second);
    assert_eq!(s.read10(128, 32).data, third);
    common::eventually(Duration::from_secs(20), "the drops recorded", || {
        let v = info();
        v["robustness"] == "degraded" && v["membership"].as_str().unwrap().matches("127.0.0.").count() == 1
    });
    // The lost replicas say since when and why they count as failed.
    common::eventually(Duration::from_secs(20), "the failures shown", || {
        let v = info();
        v["placements"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["id"] != "r2")
            .all(|p| {
                p["failed_at"].as_u64().is_some_and(|t| t > 1_700_000_000)
                    && p["failure"].as_str().is_some_and(|f| !f.is_empty())
            })
    });
    let table = ok(hornctl(data, a, &["volume", "info", "v3"]));
    assert!(table.contains("FAILED") && table.contains(" s ago: "), "{table}");
    drop(s);
    ok(hornctl(data, a, &["volume", "detach", "v3"]));
    drop(agents);
}

/// Data locality: a best-effort volume attached where it has no replica gets one
/// there (rebuilt online) and gives one up elsewhere; a strict-local volume's one
/// replica is placed on the node of its first attach, and it is served only there.
#[test]
fn data_locality_moves_a_replica_to_the_attached_node_and_keeps_a_strict_local_one_there() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    init(data);
    let mgr = ManagerDaemon::start(data, "127.0.0.1:0");
    let _cleanup = KillInstances(data);
    let a = &mgr.addr;
    roomy(data, a);
    let mut agents = ready_agents(data, a, 3);

    // Best-effort, two replicas on three nodes: attached on the third.
    ok(hornctl(
        data,
        a,
        &[
            "volume",
            "create",
            "near",
            "--size",
            "32M",
            "--replicas",
            "2",
            "--frontend",
            "iscsi",
            "--data-locality",
            "best-effort",
        ],
    ));
    let info = |name: &str| json(hornctl(data, a, &["volume", "info", name, "--json"]));
    let nodes_of = |v: &serde_json::Value| -> Vec<u32> {
        v["placements"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["node"].as_str().unwrap()[1..].parse().unwrap())
            .collect()
    };
    let placed = nodes_of(&info("near"));
    let away = (1..=3).find(|n| !placed.contains(n)).unwrap();
    ok(hornctl(
        data,
        a,
        &["volume", "attach", "near", &format!("n{away}")],
    ));
    let v = info("near");
    let (p, iqn) = portal(v["endpoint"].as_str().unwrap());
    let mut s = login(data, a, &p, &iqn).expect("login");
    let before = block(21, 64 * 1024);
    assert_eq!(s.write10(0, &before).status, 0);
    common::eventually(
        Duration::from_secs(60),
        "a replica on the attached node, two in all",
        || {
            let v = info("near");
            let nodes = nodes_of(&v);
            v["robustness"] == "healthy" && nodes.len() == 2 && nodes.contains(&away)
        },
    );
    let during = block(22, 16 * 1024);
    assert_eq!(s.write10(256, &during).status, 0);
    assert_eq!(s.read10(0, 128).data, before);
    assert_eq!(s.read10(256, 32).data, during);
    drop(s);
    let out = ok(hornctl(data, a, &["volume", "verify", "near"]));
    assert!(out.contains("identical"), "{out}");
    let v = info("near");
    assert!(
        v["placements"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == "r3" && p["mode"] == "RW"),
        "the new replica r3 is RW: {v}"
    );

    // Strict-local: one replica only; placed at the first attach, on that node.
    let e = refused(hornctl(
        data,
        a,
        &[
            "volume",
            "create",
            "here",
            "--size",
            "16M",
            "--replicas",
            "2",
            "--data-locality",
            "strict-local",
        ],
    ));
    assert!(e.contains("strict-local data locality keeps one replica"), "{e}");
    ok(hornctl(
        data,
        a,
        &[
            "volume",
            "create",
            "here",
            "--size",
            "16M",
            "--replicas",
            "1",
            "--frontend",
            "iscsi",
            "--data-locality",
            "strict-local",
            // Served without CHAP, as asked explicitly: any initiator logs in.
            "--no-chap",
        ],
    ));
    assert!(info("here")["placements"].as_array().unwrap().is_empty());
    assert_eq!(info("here")["no_chap"], true);
    ok(hornctl(data, a, &["volume", "attach", "here", "n2"]));
    let v = info("here");
    assert_eq!(nodes_of(&v), [2]);
    let (p, iqn) = portal(v["endpoint"].as_str().unwrap());
    let mut s = Initiator::login(&p, &iqn, None).expect("login to the strict-local volume, without CHAP");
    let local = block(23, 8192);
    assert_eq!(s.write10(0, &local).status, 0);
    drop(s);
    ok(hornctl(data, a, &["volume", "detach", "here"]));
    let e = refused(hornctl(data, a, &["volume", "attach", "here", "n3"]));
    assert!(e.contains("strict-local: its replica is on node n2"), "{e}");
    ok(hornctl(data, a, &["volume", "attach", "here", "n2"]));
    let v = info("here");
    let (p, iqn) = portal(v["endpoint"].as_str().unwrap());
    let mut s = login(data, a, &p, &iqn).expect("login again");
    assert_eq!(s.read10(0, 16).data, local);
    drop(s);
    for name in ["near", "here"] {
        ok(hornctl(data, a, &["volume", "detach", name]));
        ok(hornctl(data, a, &["volume", "delete", name]));
    }
    common::eventually(Duration::from_secs(20), "every instance removed", || {
        (1..=3).all(|n| recorded_pids(data, n).is_empty())
    });
    agents.clear();
}

/// Every file under `dir`, read whole.
fn all_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(all_files(&p));
        } else if let Ok(b) = std::fs::read(&p) {
            out.push((p, b));
        }
    }
    out
}

/// The wire-secret files of volume `volume`'s replicas `ids` the agents keep, with
/// their modes.
fn secret_files(data: &Path, volume: &str, ids: &[String]) -> Vec<(PathBuf, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    // This test's agents' directories only (other tests run beside it).
    for n in 1..=4 {
        let d = horn_manager::instances::agent_key_dir(&node_dir(data, n).join("state/instances"));
        for f in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if ids.iter().any(|id| name == format!("{volume}-{id}.secret")) {
                let m = f.metadata().unwrap();
                out.push((f.path(), m.permissions().mode() & 0o777));
            }
        }
    }
    out
}

/// The key files of volume `volume` the agents keep (on /run, as root), with their
/// modes.
fn key_files(volume: &str) -> Vec<(PathBuf, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    for d in std::fs::read_dir(horn_manager::instances::key_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let p = d.path().join(format!("{volume}.key"));
        if let Ok(m) = std::fs::metadata(&p) {
            out.push((p, m.permissions().mode() & 0o777));
        }
    }
    out
}

/// An encrypted volume through the manager: the key lives in a secret, reaches only
/// the engine's node (on /run, root only), and the replicas on every node hold no
/// plaintext; attached elsewhere, the key follows and the data reads back.
#[test]
fn an_encrypted_volume_keeps_its_key_in_a_secret_and_only_ciphertext_on_the_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    init(data);
    let mgr = ManagerDaemon::start(data, "127.0.0.1:0");
    let _cleanup = KillInstances(data);
    let a = &mgr.addr;
    roomy(data, a);
    let mut agents = ready_agents(data, a, 3);
    // A volume name no other test uses: the key files on /run are named by it.
    let vol = format!("enc-{}", std::process::id());
    let create = |secret: &str| {
        hornctl(
            data,
            a,
            &[
                "volume",
                "create",
                &vol,
                "--size",
                "32M",
                "--replicas",
                "3",
                "--frontend",
                "iscsi",
                "--encrypted",
                "--key-secret",
                secret,
            ],
        )
    };
    let e = refused(create("nokey"));
    assert!(e.contains("hornctl secret create nokey"), "{e}");
    std::fs::write(data.join("short.key"), "00ff").unwrap();
    let short = data.join("short.key").display().to_string();
    let e = refused(hornctl(
        data,
        a,
        &["secret", "create", "bad", "--from-file", &short],
    ));
    assert!(e.contains("64 bytes"), "{e}");
    let out = ok(hornctl(data, a, &["secret", "create", "k1"]));
    assert!(out.contains("secret k1 created"), "{out}");
    let e = refused(hornctl(data, a, &["secret", "create", "k1"]));
    assert!(e.contains("exists already"), "{e}");
    ok(create("k1"));
    let info = || json(hornctl(data, a, &["volume", "info", &vol, "--json"]));
    assert_eq!(info()["key_secret"], "k1");
    let e = refused(hornctl(data, a, &["secret", "delete", "k1"]));
    assert!(e.contains(&format!("is the key of volume(s) {vol}")), "{e}");

    let secret = |i: u32| -> Vec<u8> {
        format!("SECRET-PLAINTEXT-{i:06}-")
            .into_bytes()
            .into_iter()
            .cycle()
            .take(4096)
            .collect()
    };
    ok(hornctl(data, a, &["volume", "attach", &vol, "n1"]));
    let v = info();
    let (p, iqn) = portal(v["endpoint"].as_str().unwrap());
    let mut s = login(data, a, &p, &iqn).expect("login");
    for i in 0..32 {
        assert_eq!(s.write10(i * 16, &secret(i)).status, 0);
    }
    assert_eq!(s.read10(31 * 16, 8).data, secret(31));
    drop(s);
    // The key is on n1's /run only, for root only; no node's files hold plaintext.
    let keys = key_files(&vol);
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(keys[0].1, 0o600, "{keys:?}");
    let table = ok(hornctl(data, a, &["volume", "info", &vol]));
    assert!(
        table.contains("encrypted: AES-256-XTS, key in secret k1"),
        "{table}"
    );
    for n in 1..=3 {
        for (path, bytes) in all_files(&node_dir(data, n).join("disk")) {
            assert!(
                !bytes.windows(17).any(|w| w == b"SECRET-PLAINTEXT-"),
                "{} holds plaintext",
                path.display()
            );
        }
    }

    // Attached on n2: the key goes there, leaves n1, and the data reads back.
    ok(hornctl(data, a, &["volume", "detach", &vol]));
    ok(hornctl(data, a, &["volume", "attach", &vol, "n2"]));
    let v = info();
    let (p, iqn) = portal(v["endpoint"].as_str().unwrap());
    let mut s = login(data, a, &p, &iqn).expect("login on n2");
    for i in [0, 17, 31] {
        assert_eq!(s.read10(i * 16, 8).data, secret(i), "block {i} on n2");
    }
    drop(s);
    common::eventually(Duration::from_secs(20), "the key on n2 only", || {
        let k = key_files(&vol);
        k.len() == 1 && k[0].0 != keys[0].0
    });
    ok(hornctl(data, a, &["volume", "detach", &vol]));
    common::eventually(Duration::from_secs(20), "the key gone with the engine", || {
        key_files(&vol).is_empty()
    });
    ok(hornctl(data, a, &["volume", "delete", &vol]));
    ok(hornctl(data, a, &["secret", "delete", "k1"]));
    let list = json(hornctl(data, a, &["secret", "list", "--json"]));
    assert_eq!(list, serde_json::json!([]));
    agents.clear();
}

/// Node `n`'s credentials, as its agent keeps them.
fn node_certificate(data: &Path, n: u32) -> horn_pki::Credentials {
    horn_pki::Credentials::load(&node_dir(data, n).join("state/tls"), "node").unwrap()
}

#[test]
fn a_join_token_joins_one_node_once_and_certificates_are_renewed_before_they_expire() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    init(data);
    // Certificates of 45 s: renewed once 30 s have passed, at an agent's heartbeat.
    let _mgr = ManagerDaemon::start_with(data, "127.0.0.1:0", &["--certificate-lifetime", "45s"]);
    let _cleanup = KillInstances(data);
    let a = &_mgr.addr.clone();
    roomy(data, a);
    let ca = data.join("ca.pem");
    let ca = ca.to_str().unwrap();

    // A join token for n1 only; bad lifetimes are refused.
    let e = refused(hornctl(data, a, &["cluster", "join-token", "--ttl", "30d"]));
    assert!(e.contains("7 days"), "{e}");
    let t = json(hornctl(
        data,
        a,
        &["cluster", "join-token", "--node", "n1", "--ttl", "10m", "--json"],
    ));
    let token = t["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("hornjoin-"), "{t}");

    // n2 cannot join with it (it names n1), and it stays good for n1.
    let mut n2 = start_agent_joining(data, a, 2, &["--join", &token, "--ca-file", ca]);
    let status = n2.child.wait().unwrap();
    assert!(!status.success());
    let log = std::fs::read_to_string(node_dir(data, 2).join("agent.log")).unwrap();
    assert!(log.contains("it is for node n1, not n2"), "{log}");
    // Without the CA's certificate the join is refused before it starts.
    let mut n3 = start_agent_joining(data, a, 3, &["--join", &token]);
    assert!(!n3.child.wait().unwrap().success());
    let log = std::fs::read_to_string(node_dir(data, 3).join("agent.log")).unwrap();
    assert!(log.contains("--join needs --ca-file"), "{log}");

    let _n1 = start_agent_joining(data, a, 1, &["--join", &token, "--ca-file", ca]);
    common::eventually(Duration::from_secs(20), "n1 ready", || {
        let out = hornctl(data, a, &["node", "list", "--json"]);
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains(r#""state":"ready""#)
    });
    let joined = node_certificate(data, 1);
    assert_eq!(joined.role().unwrap(), horn_pki::Role::Node("n1".into()));
    let (from, until) = joined.validity().unwrap();
    assert!(until - from <= time::Duration::seconds(45 + 60), "{from} {until}");

    // Used once: the same token joins nobody else.
    let mut again = start_agent_joining(data, a, 4, &["--join", &token, "--ca-file", ca]);
    assert!(!again.child.wait().unwrap().success());
    let log = std::fs::read_to_string(node_dir(data, 4).join("agent.log")).unwrap();
    assert!(log.contains("unknown, or was used already"), "{log}");

    // A volume served on n1: its engine and replica speak mutual TLS with n1's
    // certificate, and must go on doing so past its expiry.
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
            "1",
            "--frontend",
            "iscsi",
        ],
    ));
    ok(hornctl(data, a, &["volume", "attach", "v1", "n1"]));
    ok(hornctl(data, a, &["volume", "snapshot", "v1", "before"]));

    // Renewed before it expires: a new certificate (and key), for n1 again.
    common::eventually(Duration::from_secs(40), "n1's certificate renewed", || {
        node_certificate(data, 1).cert_pem != joined.cert_pem
    });
    let renewed = node_certificate(data, 1);
    assert_ne!(renewed.key_pem, joined.key_pem);
    assert_eq!(renewed.role().unwrap(), horn_pki::Role::Node("n1".into()));
    assert!(renewed.not_after().unwrap() > until);

    // Past the first certificate's expiry: the node keeps its lease, and a snapshot
    // (the manager calling the engine, the engine calling its replica, each a new
    // connection) still works, so every process took the renewed certificate
    // without a restart.
    let left = until - time::OffsetDateTime::now_utc();
    if left.is_positive() {
        std::thread::sleep(Duration::from_millis(left.whole_milliseconds() as u64 + 2000));
    }
    assert!(renewed.not_after().unwrap() > time::OffsetDateTime::now_utc());
    assert_eq!(
        json(hornctl(data, a, &["node", "info", "n1", "--json"]))[0]["state"],
        "ready"
    );
    let out = ok(hornctl(data, a, &["volume", "snapshot", "v1", "after"]));
    assert!(out.contains("after"), "{out}");
    let snaps = ok(hornctl(data, a, &["volume", "snapshots", "v1"]));
    assert!(snaps.contains("before") && snaps.contains("after"), "{snaps}");
    ok(hornctl(data, a, &["volume", "detach", "v1"]));
    ok(hornctl(data, a, &["volume", "delete", "v1"]));
}

#[test]
fn the_cluster_ca_rolls_while_a_volume_is_served_and_the_old_ca_is_then_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    init(data);
    let _mgr = ManagerDaemon::start(data, "127.0.0.1:0");
    let _cleanup = KillInstances(data);
    let a = &_mgr.addr.clone();
    roomy(data, a);
    let _agents: Vec<Agent> = (1..=2).map(|n| start_agent(data, a, n)).collect();
    common::eventually(Duration::from_secs(20), "two ready nodes", || {
        let out = hornctl(data, a, &["node", "list", "--json"]);
        out.status.success()
            && String::from_utf8_lossy(&out.stdout)
                .matches(r#""state":"ready""#)
                .count()
                == 2
    });
    // Its data wire over TLS too: the engine reaches both replicas (one on each
    // node) through the tunnels, with the certificates being rolled.
    let create = [
        "volume",
        "create",
        "v1",
        "--size",
        "16M",
        "--replicas",
        "2",
        "--frontend",
        "iscsi",
        "--data-tls",
    ];
    ok(hornctl(data, a, &create));
    ok(hornctl(data, a, &["volume", "attach", "v1", "n1"]));
    let v = json(hornctl(data, a, &["volume", "info", "v1", "--json"]));
    assert_eq!(v["data_tls"], true, "{v}");
    let rw = |v: &serde_json::Value| {
        v["placements"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["mode"] == "RW")
            .count()
    };
    assert_eq!(rw(&v), 2, "{v}");
    for p in v["placements"].as_array().unwrap() {
        // A plain data-wire client gets nothing from a TLS port.
        let addr = p["data_address"].as_str().unwrap();
        let plain = horn_proto::client::BlockingClient::connect(addr, Duration::from_secs(5))
            .and_then(|mut c| c.read(1, 0, 4096, 0).map(|_| ()));
        assert!(plain.is_err(), "{addr} answered a plain client");
    }
    ok(hornctl(data, a, &["volume", "snapshot", "v1", "s1"]));
    // The admin's credentials as they were: from the old CA.
    let old_admin = data.join("old-admin");
    horn_pki::Credentials::load(data, "admin")
        .unwrap()
        .save(&old_admin, "admin")
        .unwrap();
    let status = |data: &Path| json(hornctl(data, a, &["cluster", "rotate", "--status", "--json"]));
    let before = status(data);
    assert_eq!(before["phase"], "idle");
    let old_ca = before["signer"].as_str().unwrap().to_string();

    // Begin: the new CA is trusted first; finishing now is refused.
    let s = json(hornctl(data, a, &["cluster", "rotate", "--json"]));
    assert_eq!(s["phase"], "trusting", "{s}");
    let new_ca = s["next"].as_str().unwrap().to_string();
    assert_ne!(new_ca, old_ca);
    let e = refused(hornctl(data, a, &["cluster", "rotate"]));
    assert!(e.contains("under way already"), "{e}");
    let e = refused(hornctl(data, a, &["cluster", "rotate", "--finish"]));
    assert!(e.contains("not reissuing"), "{e}");

    // Every node comes to trust it, then it signs and every node renews from it;
    // the volume is served throughout.
    common::eventually(
        Duration::from_secs(60),
        "both nodes renewed from the new CA",
        || {
            let s = status(data);
            s["phase"] == "reissuing"
                && s["signer"] == new_ca.as_str()
                && s["nodes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|n| n["issuer"] == new_ca.as_str())
        },
    );
    ok(hornctl(data, a, &["volume", "snapshot", "v1", "s2"]));
    for n in 1..=2 {
        let c = node_certificate(data, n);
        assert_eq!(c.issuer().unwrap(), new_ca);
        assert_eq!(c.trusted().unwrap(), vec![old_ca.clone(), new_ca.clone()]);
    }
    // The old admin certificate still works until the finish (with the bundle the
    // manager hands out, which trusts the manager's new certificate).
    std::fs::copy(data.join("ca.pem"), old_admin.join("ca.pem")).unwrap();
    let with_old = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_hornctl"))
            .args(args)
            .args(["--manager", a, "--credentials"])
            .arg(&old_admin)
            .output()
            .unwrap()
    };
    ok(with_old(&["volume", "list"]));

    // Finish: the old CA is retired everywhere; the volume is still served, and a
    // certificate of the old CA is refused.
    let s = json(hornctl(data, a, &["cluster", "rotate", "--finish", "--json"]));
    assert_eq!(s["phase"], "idle", "{s}");
    common::eventually(Duration::from_secs(30), "nodes trusting the new CA alone", || {
        (1..=2).all(|n| node_certificate(data, n).trusted().unwrap() == vec![new_ca.clone()])
    });
    ok(hornctl(data, a, &["volume", "snapshot", "v1", "s3"]));
    let e = refused(with_old(&["volume", "list"]));
    assert!(e.contains("certificate") || e.contains("transport"), "{e}");
    // The engine started again (detached and attached) reaches its replicas over
    // TLS with the new certificates alone.
    ok(hornctl(data, a, &["volume", "detach", "v1"]));
    ok(hornctl(data, a, &["volume", "attach", "v1", "n1"]));
    common::eventually(Duration::from_secs(30), "both replicas RW again", || {
        rw(&json(hornctl(data, a, &["volume", "info", "v1", "--json"]))) == 2
    });
    let snaps = ok(hornctl(data, a, &["volume", "snapshots", "v1"]));
    assert!(["s1", "s2", "s3"].iter().all(|s| snaps.contains(s)), "{snaps}");
    ok(hornctl(data, a, &["volume", "detach", "v1"]));
    ok(hornctl(data, a, &["volume", "delete", "v1"]));
}
