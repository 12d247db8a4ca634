//! Node faults in a cluster of network namespaces (`horn_cluster::Cluster`): a manager
//! and four node agents, each node with its own network stack, a volume of three
//! replicas attached on one node and written through its iSCSI target from the
//! test's side of the bridge. Each case cuts a node's link (and, when the node is
//! lost, kills its processes) under writes, and ends with every acknowledged write
//! read back and `hornctl volume verify`.
//!
//! Needs root and `ip netns`; without them each case says why and is counted as
//! skipped.

#[path = "../../../manager/tests/common/iscsi.rs"]
#[allow(dead_code)]
mod iscsi;

use std::time::{Duration, Instant};

use horn_cluster::Cluster;
use iscsi::Initiator;

/// Skips (printed, and counted by `scripts/test`) when no cluster can be built here.
fn cluster_or_skip(test: &str, nodes: usize) -> Option<Cluster> {
    if let Some(why) = Cluster::unavailable() {
        let line = format!("SKIPPED {test}: {why}");
        eprintln!("{line}");
        if let Ok(path) = std::env::var("HORN_SKIP_LOG") {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
                let _ = writeln!(f, "{line}");
            }
        }
        return None;
    }
    Some(Cluster::start(nodes).expect("the cluster starts"))
}

fn ok(c: &Cluster, args: &[&str]) -> String {
    let out = c.hornctl(args);
    assert!(
        out.status.success(),
        "hornctl {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn eventually(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let since = Instant::now();
    while !done() {
        assert!(since.elapsed() < within, "{what} (after {within:?})");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn block(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

fn node_of(v: &serde_json::Value, id: &str) -> usize {
    let p = v["placements"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id)
        .unwrap();
    p["node"].as_str().unwrap()[1..].parse().unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<String> {
    v["placements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect()
}

/// Creates volume `v` (64 MiB, three replicas, iSCSI), attaches it on the node of its
/// first replica, and logs in: (the volume's info, the engine's node, the session).
fn attached(c: &Cluster) -> (serde_json::Value, usize, Initiator) {
    let v = c
        .json(&[
            "volume",
            "create",
            "v",
            "--size",
            "64M",
            "--replicas",
            "3",
            "--frontend",
            "iscsi",
        ])
        .unwrap();
    let home = node_of(&v, "r1");
    ok(c, &["volume", "attach", "v", &format!("n{home}")]);
    let s = login_on(c, home);
    (c.json(&["volume", "info", "v"]).unwrap(), home, s)
}

/// Logs in to volume `v`'s iSCSI target, which must be served on node `node`.
fn login_on(c: &Cluster, node: usize) -> Initiator {
    let v = c.json(&["volume", "info", "v"]).unwrap();
    let endpoint = v["endpoint"]
        .as_str()
        .unwrap()
        .strip_prefix("iscsi://")
        .unwrap()
        .to_string();
    let (portal, iqn) = endpoint.split_once('/').unwrap();
    assert!(portal.starts_with(&c.net.node_ip(node)), "{endpoint}");
    // The target requires the volume's CHAP credentials.
    assert_eq!(
        Initiator::login(portal, iqn, None).err(),
        Some((2, 1)),
        "a login without CHAP"
    );
    let cr = c.json(&["volume", "credentials", "v"]).unwrap();
    let chap = iscsi::Chap {
        user: cr["chap_user"].as_str().unwrap(),
        secret: cr["chap_secret"].as_str().unwrap(),
        mutual: None,
    };
    Initiator::login(portal, iqn, Some(chap)).expect("login")
}

/// Writes `count` blocks of 4 KiB at `lba` (in 512-byte sectors, 8 a block) with
/// `seed`, each acknowledged; returns what was written.
fn write_blocks(s: &mut Initiator, lba: u32, count: u32, seed: u8) -> Vec<u8> {
    let data = block(seed, count as usize * 4096);
    for i in 0..count {
        let at = i as usize * 4096;
        assert_eq!(
            s.write10(lba + i * 8, &data[at..at + 4096]).status,
            0,
            "write at {}",
            lba + i * 8
        );
    }
    data
}

fn read_back(s: &mut Initiator, lba: u32, want: &[u8]) {
    for (i, chunk) in want.chunks(64 * 1024).enumerate() {
        let r = s.read10(lba + i as u32 * 128, (chunk.len() / 512) as u16);
        assert_eq!(r.status, 0);
        assert!(r.data == chunk, "the blocks at {} differ", lba + i as u32 * 128);
    }
}

#[test]
fn a_node_lost_under_writes_is_marked_down_and_its_replica_replaced_and_rebuilt() {
    let test = "a_node_lost_under_writes_is_marked_down_and_its_replica_replaced_and_rebuilt";
    let Some(c) = cluster_or_skip(test, 4) else { return };
    ok(&c, &["settings", "set", "replica-replenishment-wait-secs=5"]);
    let (v, home, mut s) = attached(&c);
    let before = write_blocks(&mut s, 0, 256, 1);
    eventually(Duration::from_secs(20), "a healthy volume", || {
        c.json(&["volume", "info", "v"]).unwrap()["robustness"] == "healthy"
    });

    // The node of r3 is lost: its processes killed and its link cut, under writes.
    let lost = node_of(&v, "r3");
    let mut c = c;
    c.kill_agent(lost);
    c.kill_instances(lost);
    c.net.link(lost, false).unwrap();
    let cut = Instant::now();
    let during = write_blocks(&mut s, 4096, 256, 2);
    // The engine goes on with two replicas; the node is down within its lease (15 s,
    // and a second for the manager to look).
    eventually(Duration::from_secs(17), "the lost node marked down", || {
        c.json(&["node", "info", &format!("n{lost}")]).unwrap()[0]["state"] == "down"
    });
    let down_after = cut.elapsed();
    // A replacement on the spare node, rebuilt online: healthy again.
    eventually(Duration::from_secs(90), "r3 replaced and rebuilt", || {
        let v = c.json(&["volume", "info", "v"]).unwrap();
        v["robustness"] == "healthy" && ids(&v) == ["r1", "r2", "r4"]
    });
    let v = c.json(&["volume", "info", "v"]).unwrap();
    let spare = node_of(&v, "r4");
    assert!(spare != lost && spare != home, "r4 on n{spare}");
    eprintln!(
        "{test}: node down {down_after:?} after the cut; healthy again after {:?}",
        cut.elapsed()
    );

    // Everything acknowledged reads back; the replicas are identical.
    let after = write_blocks(&mut s, 8192, 64, 3);
    read_back(&mut s, 0, &before);
    read_back(&mut s, 4096, &during);
    read_back(&mut s, 8192, &after);
    drop(s);
    let out = ok(&c, &["volume", "verify", "v"]);
    assert!(out.contains("identical"), "{out}");
}

#[test]
fn a_node_back_within_the_replenishment_wait_keeps_its_replica_and_copies_only_what_changed() {
    let test = "a_node_back_within_the_replenishment_wait_keeps_its_replica_and_copies_only_what_changed";
    let Some(c) = cluster_or_skip(test, 3) else { return };
    let (v, home, mut s) = attached(&c);
    // 32 MiB written before the cut.
    let before = write_blocks(&mut s, 0, 8192, 1);
    eventually(Duration::from_secs(20), "a healthy volume", || {
        c.json(&["volume", "info", "v"]).unwrap()["robustness"] == "healthy"
    });
    // r2's node cut off (its processes run on); 1 MiB changes meanwhile.
    let away = node_of(&v, "r2");
    c.net.link(away, false).unwrap();
    let changed = write_blocks(&mut s, 2048, 256, 2);
    eventually(Duration::from_secs(30), "r2 dropped by the engine", || {
        let v = c.json(&["volume", "info", "v"]).unwrap();
        v["robustness"] == "degraded"
    });
    // Back well within the 60 s wait: the same replica is added back and rebuilt.
    c.net.link(away, true).unwrap();
    eventually(Duration::from_secs(60), "r2 back, RW", || {
        let v = c.json(&["volume", "info", "v"]).unwrap();
        v["robustness"] == "healthy" && ids(&v) == ["r1", "r2", "r3"]
    });
    // The rebuild copied about what changed, not the volume: asked of the engine.
    let engine = std::fs::read(c.node_dir(home).join("state/instances/engine-v/instance.json")).unwrap();
    let engine: serde_json::Value = serde_json::from_slice(&engine).unwrap();
    let control = engine["control_address"].as_str().unwrap();
    // r2's data address as the engine knows it (its agent's record: id to addresses);
    // volume info may show r2's node down for a moment while it registers again after
    // the cut.
    let r2 = engine["replicas"]["r2"][0].clone();
    // The replica turns RW a moment before its rebuild's record says done: wait for it.
    let mut rebuild = serde_json::Value::Null;
    eventually(Duration::from_secs(20), "r2's rebuild done", || {
        let out = std::process::Command::new(horn_cluster::binaries().unwrap().join("hornctl"))
            .args(["engine", "--engine", control, "info", "--json", "--credentials"])
            // The engine serves mutual TLS: the admin's credentials, beside the token.
            .arg(c.data.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        rebuild = info["rebuilds"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["replica"] == r2)
            .max_by_key(|r| r["id"].as_u64())
            .cloned()
            .unwrap_or_else(|| panic!("no rebuild of {r2} in {info}"));
        rebuild["state"] == "done"
    });
    let copied = rebuild["bytes_copied"].as_u64().unwrap();
    eprintln!(
        "{test}: the returning replica's rebuild copied {copied} bytes; 1 MiB changed of 32 MiB written"
    );
    assert_eq!(rebuild["state"], "done", "{rebuild}");
    assert!(
        copied <= 8 << 20,
        "a delta rebuild copies about what changed, not {copied} bytes"
    );

    let mut written = before;
    written[2048 * 512..2048 * 512 + changed.len()].copy_from_slice(&changed);
    read_back(&mut s, 0, &written);
    drop(s);
    let out = ok(&c, &["volume", "verify", "v"]);
    assert!(out.contains("identical"), "{out}");
}

/// The lifecycle across machines, with the control plane's own faults:
/// create (three replicas on three distinct nodes), attach on n1, write; n1's agent
/// restarted (its instances adopted, not restarted); the manager SIGKILLed under
/// writes and started again on the same store (the volume never notices, every object
/// is there); detach, attach on n2 (the data intact); expand, snapshot, revert; delete
/// (every node's disk given back).
#[test]
fn a_volume_lives_across_nodes_while_the_manager_and_an_agent_restart() {
    let test = "a_volume_lives_across_nodes_while_the_manager_and_an_agent_restart";
    let Some(mut c) = cluster_or_skip(test, 3) else {
        return;
    };
    let (v, home, mut s) = attached(&c);
    let mut nodes: Vec<usize> = (1..=3).map(|i| node_of(&v, &format!("r{i}"))).collect();
    nodes.sort();
    assert_eq!(nodes, [1, 2, 3], "three replicas on three distinct nodes");
    let first = write_blocks(&mut s, 0, 128, 31);

    // The engine's node's agent killed and started again: it adopts its instances.
    let before = c.instances(home);
    assert_eq!(before.len(), 2, "an engine and a replica: {before:?}");
    c.kill_agent(home);
    let during = write_blocks(&mut s, 2048, 16, 32);
    c.start_agent(home).unwrap();
    eventually(Duration::from_secs(20), "the agent adopted its instances", || {
        std::fs::read_to_string(c.node_dir(home).join("agent.log"))
            .is_ok_and(|l| l.matches("adopted a running instance").count() >= 2)
    });
    assert_eq!(c.instances(home), before, "the same supervisors serve");

    // The manager SIGKILLed under writes, and started again on its store and address.
    let listed = c.json(&["volume", "list"]).unwrap();
    let addr = c.manager_addr.clone();
    c.kill_manager();
    let while_down = write_blocks(&mut s, 4096, 64, 33);
    c.start_manager(&addr).unwrap();
    let after = write_blocks(&mut s, 6144, 16, 34);
    eventually(Duration::from_secs(30), "the volume attached and healthy", || {
        c.json(&["volume", "info", "v"])
            .is_ok_and(|v| v["state"] == "attached" && v["robustness"] == "healthy")
    });
    let strip = |mut v: serde_json::Value| {
        for x in v.as_array_mut().unwrap() {
            x.as_object_mut().unwrap().remove("revision");
        }
        v
    };
    // Every agent reports again (the engine's node may be first, with the others a
    // poll later): then every object is as before.
    eventually(Duration::from_secs(30), "every agent reported again", || {
        c.json(&["volume", "list"])
            .is_ok_and(|l| strip(l) == strip(listed.clone()))
    });
    assert_eq!(
        strip(c.json(&["volume", "list"]).unwrap()),
        strip(listed),
        "every object as before"
    );
    assert_eq!(c.instances(home), before, "the engine never restarted");
    read_back(&mut s, 0, &first);
    read_back(&mut s, 2048, &during);
    read_back(&mut s, 4096, &while_down);
    read_back(&mut s, 6144, &after);
    drop(s);

    // Detached, attached on another node: everything acknowledged is there.
    ok(&c, &["volume", "detach", "v"]);
    let other = (1..=3).find(|n| *n != home).unwrap();
    ok(&c, &["volume", "attach", "v", &format!("n{other}")]);
    let mut s = login_on(&c, other);
    read_back(&mut s, 0, &first);
    read_back(&mut s, 4096, &while_down);

    // Expand, snapshot, write, revert to the snapshot.
    let out = ok(&c, &["volume", "expand", "v", "--size", "96M"]);
    assert!(out.contains("expanded to 96.0 MiB"), "{out}");
    // The session is told (CAPACITY DATA HAS CHANGED), then reads the new size.
    let capacity = [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let ua = s.command(&capacity, &[], 8);
    assert_eq!(
        (ua.status, ua.sense[12], ua.sense[13]),
        (2, 0x2a, 0x09),
        "{:?}",
        ua.sense
    );
    let cap = s.command(&capacity, &[], 8);
    assert_eq!(
        u32::from_be_bytes(cap.data[..4].try_into().unwrap()),
        (96 << 20) / 512 - 1
    );
    ok(&c, &["volume", "snapshot", "v", "s1"]);
    let later = write_blocks(&mut s, 0, 16, 35);
    assert_ne!(later, first[..later.len()]);
    let past_old_end = write_blocks(&mut s, (64 << 20) / 512, 4, 36);
    read_back(&mut s, (64 << 20) / 512, &past_old_end);
    drop(s);
    let out = ok(&c, &["volume", "verify", "v"]);
    assert!(out.contains("identical"), "{out}");
    ok(&c, &["volume", "detach", "v"]);
    ok(
        &c,
        &["volume", "attach", "v", &format!("n{other}"), "--maintenance"],
    );
    ok(&c, &["volume", "revert", "v", "s1"]);
    ok(&c, &["volume", "detach", "v"]);
    ok(&c, &["volume", "attach", "v", &format!("n{other}")]);
    let mut s = login_on(&c, other);
    read_back(&mut s, 0, &first);
    drop(s);

    // Deleted: every node's replica stops and its files go.
    ok(&c, &["volume", "detach", "v"]);
    ok(&c, &["volume", "delete", "v"]);
    eventually(
        Duration::from_secs(30),
        "every instance and replica file gone",
        || {
            (1..=3).all(|n| {
                c.instances(n).is_empty()
                    && std::fs::read_dir(c.node_dir(n).join("disk/replicas")).map_or(true, |d| d.count() == 0)
            })
        },
    );
}
