//! `hornd manager` as a child process, driven by `hornctl` and by a gRPC client that
//! registers nodes as their agents will: mutual TLS and roles, placement across nodes,
//! refusals that change nothing, node leases, and specs that outlive a SIGKILL.

mod common;

use common::manager::{hornctl, init, json, ok, refused, ManagerDaemon};

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use horn_proto::manager_api as pb;
use horn_proto::manager_api::manager_client::ManagerClient;

/// Registers node `name` with one 100 GiB disk (half free), as its agent would (with
/// the admin's credentials in `data`).
async fn register(addr: &str, data: &std::path::Path, name: &str, zone: &str) -> pb::Node {
    let admin = horn_pki::Credentials::load(data, "admin").unwrap();
    let mut c = horn_manager::ctl::connect_with(addr, &admin).await.unwrap();
    c.register_node(pb::Node {
        name: name.into(),
        address: format!("127.0.0.1:{}", 9700 + name.len()),
        zone: zone.into(),
        tags: vec![],
        cordoned: false,
        disks: vec![pb::Disk {
            path: "/var/lib/horn".into(),
            tags: vec![],
            reserved: 0,
            allow_scheduling: true,
            capacity: 100 << 30,
            available: 50 << 30,
            scheduled: 0,
        }],
        state: String::new(),
        lease_secs: 0,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

/// `hornctl cluster init --data DATA`.
fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn volumes_are_placed_on_distinct_nodes_and_bad_requests_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    init(data);
    // A second init would lock out every client of the first.
    assert!(refused(hornctl(
        data,
        "127.0.0.1:1",
        &["cluster", "init", "--data", data.to_str().unwrap()]
    ))
    .contains("holds a cluster already"));
    let mgr = ManagerDaemon::start(data, "127.0.0.1:0");
    let a = mgr.addr.as_str();
    let rt = rt();
    for (n, zone) in [("n1", "a"), ("n2", "a"), ("n3", "b")] {
        let node = rt.block_on(register(a, data, n, zone));
        assert_eq!(node.state, "ready");
    }

    let created = json(hornctl(
        data,
        a,
        &["volume", "create", "data", "--size", "10G", "--json"],
    ));
    let nodes: std::collections::BTreeSet<_> = created["placements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["node"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(nodes.len(), 3, "three replicas on three nodes: {created}");

    // Each refusal says why and leaves the cluster as it was.
    let before = ok(hornctl(data, a, &["volume", "list", "--json"]));
    let e = refused(hornctl(data, a, &["volume", "create", "data", "--size", "1G"]));
    assert!(e.contains("volume data exists already"), "{e}");
    let e = refused(hornctl(data, a, &["volume", "create", "odd", "--size", "1000"]));
    assert!(e.contains("multiple of 4096"), "{e}");
    let e = refused(hornctl(
        data,
        a,
        &["volume", "create", "four", "--size", "1G", "--replicas", "4"],
    ));
    assert!(
        e.contains("node n1: holds a replica of the volume already"),
        "{e}"
    );
    let e = refused(hornctl(data, a, &["volume", "create", "huge", "--size", "60G"]));
    assert!(e.contains("would leave less than"), "{e}");
    let e = refused(hornctl(
        data,
        a,
        &["volume", "create", "x", "--size", "1G", "--frontend", "nbd"],
    ));
    assert!(e.contains("give ublk or iscsi"), "{e}");
    let e = refused(hornctl(data, a, &["volume", "info", "nope"]));
    assert!(e.contains("no volume is named nope"), "{e}");
    assert_eq!(ok(hornctl(data, a, &["volume", "list", "--json"])), before);

    // Scheduled bytes count against the disks: each has 10 GiB scheduled now.
    let n1 = json(hornctl(data, a, &["node", "info", "n1", "--json"]));
    assert_eq!(n1[0]["disks"][0]["scheduled"], 10u64 << 30);

    // A cordoned node gets no new replica: two replicas of a new volume avoid it.
    ok(hornctl(data, a, &["node", "cordon", "n1"]));
    let v = json(hornctl(
        data,
        a,
        &[
            "volume",
            "create",
            "two",
            "--size",
            "1G",
            "--replicas",
            "2",
            "--json",
        ],
    ));
    assert!(!v.to_string().contains("\"n1\""), "{v}");
    let e = refused(hornctl(data, a, &["volume", "create", "three", "--size", "1G"]));
    assert!(e.contains("node n1: not ready or cordoned"), "{e}");
    ok(hornctl(data, a, &["node", "uncordon", "n1"]));

    let table = ok(hornctl(data, a, &["volume", "list"]));
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("data") && table.contains("10.0 GiB"), "{table}");
    ok(hornctl(data, a, &["volume", "delete", "two"]));
    let n2 = json(hornctl(data, a, &["node", "info", "n2", "--json"]));
    assert_eq!(
        n2[0]["disks"][0]["scheduled"],
        10u64 << 30,
        "the deleted volume's bytes are returned"
    );
}

/// A client of the manager at `addr` over `tls` (or plaintext with `None`); the call
/// `ListVolumes`, or its refusal (a handshake the server refuses included).
fn list_with(addr: &str, tls: Option<tonic::transport::ClientTlsConfig>) -> Result<usize, String> {
    rt().block_on(async {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut e = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}")).unwrap();
        if let Some(tls) = tls {
            e = e.tls_config(tls).unwrap();
        }
        let channel = e.connect().await.map_err(|e| format!("connect: {e:?}"))?;
        ManagerClient::new(channel)
            .list_volumes(pb::ListVolumesRequest {})
            .await
            .map(|r| r.into_inner().volumes.len())
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    })
}

/// Every call goes over mutual TLS with a certificate from the cluster's CA, and the
/// certificate's role decides what it may do: no certificate, a plaintext client,
/// another CA's certificate, an expired one, and one of the wrong role are refused;
/// a node joins only with the cluster token, and acts for itself only.
#[test]
fn calls_need_a_current_certificate_of_the_cluster_with_the_role_for_them() {
    use horn_pki::{Ca, Role, Validity};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    init(data);
    let mgr = ManagerDaemon::start(data, "127.0.0.1:0");
    let a = mgr.addr.as_str();
    let ca = Ca::load(data).unwrap();
    let name = horn_pki::MANAGER_NAME;

    // The admin's credentials (hornctl cluster init wrote them) make every call.
    let admin = horn_pki::Credentials::load(data, "admin").unwrap();
    assert_eq!(list_with(a, Some(admin.client_tls(name))), Ok(0));
    // Plaintext: no TLS handshake, no call.
    let e = list_with(a, None).unwrap_err();
    assert!(!e.starts_with("Ok"), "{e}");
    // TLS without a certificate: refused before the call.
    let e = list_with(a, Some(horn_pki::anonymous_client_tls(ca.trust_pem(), name))).unwrap_err();
    assert!(
        e.contains("Unauthenticated") && e.contains("none was presented"),
        "{e}"
    );
    // Another cluster's CA: the handshake fails.
    let other = Ca::generate("other").unwrap();
    let stranger = other.issue(&Role::Admin, &[], Validity::Days(1)).unwrap();
    let mut stranger_here = stranger.clone();
    stranger_here.ca_pem = ca.trust_pem().to_string();
    let e = list_with(a, Some(stranger_here.client_tls(name))).unwrap_err();
    assert!(!e.contains("Ok"), "another CA's certificate was taken: {e}");
    // Expired (signed by the right CA): the handshake fails.
    let now = time::OffsetDateTime::now_utc();
    let expired = ca
        .issue(
            &Role::Admin,
            &[],
            Validity::Between(now - time::Duration::days(10), now - time::Duration::days(1)),
        )
        .unwrap();
    let e = list_with(a, Some(expired.client_tls(name))).unwrap_err();
    assert!(!e.contains("Ok"), "an expired certificate was taken: {e}");
    // A client that trusts another CA refuses the manager itself.
    let e = list_with(a, Some(stranger.client_tls(name))).unwrap_err();
    assert!(e.contains("connect"), "{e}");

    // Read-only: lists, and is refused anything that changes the cluster or shows a
    // secret, through hornctl too.
    let viewer = dir.path().join("viewer");
    ok(hornctl(
        data,
        a,
        &[
            "cluster",
            "credentials",
            "--role",
            "read-only",
            "--out",
            viewer.to_str().unwrap(),
            "--name",
            "v",
        ],
    ));
    let as_viewer = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_hornctl"))
            .args(args)
            .args([
                "--manager",
                a,
                "--credentials",
                viewer.to_str().unwrap(),
                "--as",
                "v",
            ])
            .output()
            .unwrap()
    };
    ok(as_viewer(&["volume", "list"]));
    let e = refused(as_viewer(&["volume", "create", "x", "--size", "16M"]));
    assert!(
        e.contains("needs the admin role") && e.contains("read-only"),
        "{e}"
    );
    let e = refused(as_viewer(&["secret", "create", "k"]));
    assert!(e.contains("needs the admin role"), "{e}");
    let e = refused(as_viewer(&[
        "cluster",
        "credentials",
        "--role",
        "admin",
        "--out",
        "/tmp/x",
        "--name",
        "y",
    ]));
    assert!(e.contains("needs the admin role"), "{e}");

    // A node: joins with the cluster token only, gets horn:node:NAME, and acts for
    // itself only.
    let token = std::fs::read_to_string(data.join("cluster-token")).unwrap();
    let e = rt()
        .block_on(horn_manager::ctl::join(
            a,
            ca.trust_pem(),
            "not-the-token",
            "n1",
            vec![],
        ))
        .unwrap_err();
    assert!(format!("{e:#}").contains("the cluster token is wrong"), "{e:#}");
    let n1 = rt()
        .block_on(horn_manager::ctl::join(
            a,
            ca.trust_pem(),
            token.trim(),
            "n1",
            vec!["127.0.0.1".into()],
        ))
        .unwrap();
    assert_eq!(n1.role().unwrap(), Role::Node("n1".into()));
    rt().block_on(async {
        let mut c = horn_manager::ctl::connect_with(a, &n1).await.unwrap();
        let node = |name: &str| pb::Node {
            name: name.into(),
            address: "127.0.0.1:9701".into(),
            disks: vec![],
            ..Default::default()
        };
        c.register_node(node("n1"))
            .await
            .expect("a node registers itself");
        let e = c.register_node(node("n2")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("is for node n1"), "{e:?}");
        let e = c
            .create_volume(pb::CreateVolumeRequest {
                name: "x".into(),
                size: 16 << 20,
                replicas: 1,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        let e = c
            .get_volume_credentials(pb::VolumeRef { name: "x".into() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    });

    // A manager without an identity does not start.
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hornd"))
        .args(["manager", "--data"])
        .arg(empty.path())
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("run `hornctl cluster init --data"));
}

#[test]
fn specs_outlive_a_sigkill_and_a_node_without_heartbeats_goes_down() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    init(data);
    let mut mgr = ManagerDaemon::start(data, "127.0.0.1:0");
    let rt = rt();
    for n in ["n1", "n2"] {
        rt.block_on(register(&mgr.addr, data, n, ""));
    }
    ok(hornctl(
        data,
        &mgr.addr,
        &["volume", "create", "kept", "--size", "1G", "--replicas", "2"],
    ));
    let before = json(hornctl(data, &mgr.addr, &["volume", "info", "kept", "--json"]));
    mgr.kill();

    let mgr = ManagerDaemon::start(data, "127.0.0.1:0");
    let after = json(hornctl(data, &mgr.addr, &["volume", "info", "kept", "--json"]));
    assert_eq!(
        after, before,
        "the volume and its placements come back as they were"
    );
    // The nodes are known, and their leases (restored with a full time to live at the
    // restart) lapse without heartbeats: the default lease is 15 s.
    let nodes = json(hornctl(data, &mgr.addr, &["node", "list", "--json"]));
    assert_eq!(nodes.as_array().unwrap().len(), 2);
    common::eventually(Duration::from_secs(25), "the nodes to go down", || {
        let nodes = json(hornctl(data, &mgr.addr, &["node", "list", "--json"]));
        nodes.as_array().unwrap().iter().all(|n| n["state"] == "down")
    });
    let e = refused(hornctl(
        data,
        &mgr.addr,
        &["volume", "create", "late", "--size", "1G", "--replicas", "1"],
    ));
    assert!(e.contains("not ready or cordoned"), "{e}");
}

#[test]
fn a_node_agent_registers_its_disks_keeps_its_lease_and_is_down_once_killed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    init(data);
    let mgr = ManagerDaemon::start(data, "127.0.0.1:0");
    let disk = dir.path().join("disk1");
    let agent = |name: &str| {
        Command::new(env!("CARGO_BIN_EXE_hornd"))
            .args([
                "node",
                "--manager",
                &mgr.addr,
                "--name",
                name,
                "--zone",
                "z1",
                "--tag",
                "storage",
            ])
            .arg("--token-file")
            .arg(data.join("cluster-token"))
            .arg("--disk")
            .arg(format!("{}:ssd", disk.display()))
            .arg("--state")
            .arg(data.join("node-state"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let state = |name: &str| {
        let nodes = json(hornctl(data, &mgr.addr, &["node", "list", "--json"]));
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .cloned()
    };
    let mut a = agent("n1");
    let mut line = String::new();
    BufReader::new(a.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("n1 registered"), "{line}");
    let n1 = state("n1").unwrap();
    assert_eq!(n1["state"], "ready");
    assert_eq!(n1["zone"], "z1");
    assert_eq!(n1["disks"][0]["tags"], serde_json::json!(["ssd"]));
    let capacity = n1["disks"][0]["capacity"].as_u64().unwrap();
    let free = n1["disks"][0]["available"].as_u64().unwrap();
    assert!(capacity > 0 && free <= capacity, "measured {free} of {capacity}");
    // Heartbeats keep it ready past the 15 s lease: checked every second for 17 s.
    let since = std::time::Instant::now();
    while since.elapsed() < Duration::from_secs(17) {
        assert_eq!(state("n1").unwrap()["state"], "ready", "at {:?}", since.elapsed());
        std::thread::sleep(Duration::from_secs(1));
    }
    // Killed, it goes down once its lease lapses.
    // SAFETY: kill takes no pointers; the pid is our child's (reaped below).
    unsafe { libc::kill(a.id() as i32, libc::SIGKILL) };
    let _ = a.wait();
    common::eventually(Duration::from_secs(20), "n1 to go down", || {
        state("n1").unwrap()["state"] == "down"
    });
    // Started again, it is ready again; SIGTERM ends it cleanly.
    let b = agent("n1");
    common::eventually(Duration::from_secs(10), "n1 to be ready again", || {
        state("n1").unwrap()["state"] == "ready"
    });
    // SAFETY: as above.
    unsafe { libc::kill(b.id() as i32, libc::SIGTERM) };
    let out = b.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("hornd node: stopped"));
    // A disk that is not absolute is refused at the command line.
    let out = Command::new(env!("CARGO_BIN_EXE_hornd"))
        .args(["node", "--manager", &mgr.addr, "--disk", "relative"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("give an absolute path"));
}
