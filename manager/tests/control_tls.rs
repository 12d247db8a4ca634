//! The replicas' and engines' control services over mutual TLS (`--credentials`),
//! against real `hornd replica` and `hornd engine` processes: an engine with its
//! node's certificate drives its replica; a client without a certificate, with one of
//! another CA, or an expired one, gets nothing; a certificate's role decides the
//! rest (read-only reads, another node's certificate cannot drive an engine, the
//! admin and the manager can).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use horn_pki::{Ca, Credentials, Role, Validity, NODE_NAME};
use horn_proto::control::replica_control_client::ReplicaControlClient;
use horn_proto::control::{BlocksRequest, InfoRequest};
use horn_proto::engine_control::engine_control_client::EngineControlClient;
use horn_proto::engine_control::{DropReplicaRequest, EngineInfoRequest};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// A daemon that is killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `hornd ARGS` and returns it with its first line.
fn hornd(args: &[&str]) -> (Running, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hornd"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    if line.is_empty() {
        let out = child.wait_with_output().unwrap();
        panic!(
            "hornd {args:?} did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (Running(child), line)
}

/// The data and control addresses in `hornd replica`'s first line ("hornd replica:
/// serving DIR on DATA, control on CONTROL").
fn replica_addresses(line: &str) -> (String, String) {
    let (data, control) = line
        .trim()
        .split_once(" on ")
        .unwrap()
        .1
        .split_once(", control on ")
        .unwrap();
    (data.to_string(), control.to_string())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A channel to `addr` over `tls`, or plaintext.
async fn channel(addr: &str, tls: Option<ClientTlsConfig>) -> Result<Channel, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut e = Endpoint::from_shared(format!("{scheme}://{addr}")).unwrap();
    if let Some(tls) = tls {
        e = e.tls_config(tls).unwrap();
    }
    e.connect().await.map_err(|e| format!("connect: {e:?}"))
}

fn replica_info(addr: &str, tls: Option<ClientTlsConfig>) -> Result<u64, String> {
    rt().block_on(async {
        let mut c = ReplicaControlClient::new(channel(addr, tls).await?);
        c.info(InfoRequest {})
            .await
            .map(|r| r.into_inner().size)
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    })
}

fn engine_info(addr: &str, tls: Option<ClientTlsConfig>) -> Result<u64, String> {
    rt().block_on(async {
        let mut c = EngineControlClient::new(channel(addr, tls).await?);
        c.info(EngineInfoRequest {})
            .await
            .map(|r| r.into_inner().size)
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    })
}

fn tls(c: &Credentials) -> Option<ClientTlsConfig> {
    Some(c.client_tls(NODE_NAME))
}

#[test]
fn replica_and_engine_control_take_only_current_certificates_of_the_right_role() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("tls");
    let ca = Ca::generate("c1").unwrap();
    let issue = |role: Role| ca.issue(&role, &[], Validity::Days(1)).unwrap();
    let n1 = issue(Role::Node("n1".into()));
    n1.save(&creds, "node").unwrap();
    let c = creds.to_str().unwrap();

    let (_replica, data, control) = replica(&dir.path().join("r"), &["--credentials", c]);
    // The engine drives the replica with its node's certificate, and serves its own
    // control service so.
    let (_engine, line) = hornd(&[
        "engine",
        "--replica",
        &format!("{data},{control}"),
        "--control",
        "127.0.0.1:0",
        "--credentials",
        c,
        "--node",
        "n1",
    ]);
    let engine = line.trim().rsplit("control on ").next().unwrap().to_string();

    let now = time::OffsetDateTime::now_utc();
    let expired = ca
        .issue(
            &Role::Admin,
            &[],
            Validity::Between(now - time::Duration::days(9), now - time::Duration::days(1)),
        )
        .unwrap();
    let other_ca = Ca::generate("other").unwrap();
    let mut stranger = other_ca.issue(&Role::Admin, &[], Validity::Days(1)).unwrap();
    stranger.ca_pem = ca.trust_pem().to_string();
    let anonymous = Some(horn_pki::anonymous_client_tls(ca.trust_pem(), NODE_NAME));

    for (service, info) in [
        (
            "replica",
            replica_info as fn(&str, Option<ClientTlsConfig>) -> Result<u64, String>,
        ),
        ("engine", engine_info),
    ] {
        let addr = if service == "replica" { &control } else { &engine };
        assert_eq!(
            info(addr, tls(&issue(Role::Admin))),
            Ok(16 << 20),
            "{service}: the admin"
        );
        for (who, t) in [
            ("plaintext", None),
            ("no certificate", anonymous.clone()),
            ("another CA's", tls(&stranger)),
            ("expired", tls(&expired)),
        ] {
            let e = info(addr, t).unwrap_err();
            assert!(!e.is_empty(), "{service}: {who} was served");
        }
        assert_eq!(
            info(addr, tls(&issue(Role::ReadOnly))),
            Ok(16 << 20),
            "{service}: read-only reads"
        );
    }

    // Roles: read-only reads no data and drives nothing; another node's certificate
    // cannot drive this node's engine; the manager's can.
    let read_only = issue(Role::ReadOnly);
    let e = rt().block_on(async {
        let mut c = ReplicaControlClient::new(channel(&control, tls(&read_only)).await.unwrap());
        c.read_blocks(BlocksRequest { blocks: vec![0] })
            .await
            .unwrap_err()
    });
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("needs the admin or a node role"), "{e:?}");
    let drop_as = |c: &Credentials| {
        rt().block_on(async {
            let mut e = EngineControlClient::new(channel(&engine, tls(c)).await.unwrap());
            e.drop_replica(DropReplicaRequest {
                replica: "127.0.0.1:1".into(),
                reason: "test".into(),
            })
            .await
            .map(|r| r.into_inner().dropped)
        })
    };
    let e = drop_as(&read_only).unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = drop_as(&issue(Role::Node("n2".into()))).unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("node n1"), "{e:?}");
    assert_eq!(drop_as(&issue(Role::Manager)).map_err(|e| e.code()), Ok(false));
    assert_eq!(drop_as(&n1).map_err(|e| e.code()), Ok(false));
    let e = engine_info(&engine, tls(&issue(Role::Node("n2".into())))).unwrap_err();
    assert!(e.starts_with("PermissionDenied"), "{e}");

    // hornctl engine: with credentials it is served, without it is not.
    let admin_dir = dir.path().join("admin");
    issue(Role::Admin).save(&admin_dir, "admin").unwrap();
    let hornctl = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_hornctl"))
            .args(["engine", "info", "--engine", &engine])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = hornctl(&["--credentials", admin_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        !hornctl(&[]).status.success(),
        "hornctl engine without credentials was served"
    );
}

/// The credentials' directory must hold the node's files.
#[test]
fn a_replica_with_missing_credentials_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hornd"))
        .args(["replica", "--dir"])
        .arg(dir.path().join("r"))
        .args(["--size", "16M", "--credentials"])
        .arg(dir.path().join("nothing-here"))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("cannot read the node's credentials"),
        "{e}"
    );
}

/// A TCP proxy from a loopback port to `to` that keeps every byte it carries, both
/// ways: what a reader of the network sees.
fn recording_proxy(to: String) -> (String, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    use std::io::{Read, Write};
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let kept = seen.clone();
    std::thread::spawn(move || {
        for inbound in l.incoming() {
            let Ok(inbound) = inbound else { return };
            let Ok(outbound) = std::net::TcpStream::connect(&to) else {
                continue;
            };
            for (mut from, mut into) in [
                (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                (outbound, inbound),
            ] {
                let kept = kept.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || into.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        kept.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    let _ = into.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    (addr, seen)
}

/// Starts `hornd engine ARGS --frontend iscsi` and returns it with its portal and
/// its control address.
fn iscsi_engine(args: &[&str]) -> (Running, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hornd"))
        .arg("engine")
        .args(args)
        .args(["--control", "127.0.0.1:0", "--frontend", "iscsi", "--no-chap"])
        .args(["--listen", "127.0.0.1:0", "--iqn", "iqn.2026-11.io.horn:tls"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let mut control = String::new();
    while out.read_line(&mut line).unwrap() > 0 {
        if let Some((_, c)) = line.trim().rsplit_once("control on ") {
            control = c.to_string();
        }
        if let Some(rest) = line.trim().split_once("iqn.2026-11.io.horn:tls on ") {
            let portal = rest.1.split_whitespace().next().unwrap().to_string();
            return (Running(child), portal, control);
        }
        line.clear();
    }
    let out = child.wait_with_output().unwrap();
    panic!(
        "hornd engine {args:?} did not serve: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Node `n1`'s credentials from a fresh CA, and a volume secret, under `dir`; an
/// admin's credentials from the same CA go in `dir/admin`, for `hornctl`.
fn node_credentials(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let creds = dir.join("tls");
    let ca = Ca::generate("c1").unwrap();
    ca.issue(&Role::Node("n1".into()), &[], Validity::Days(1))
        .unwrap()
        .save(&creds, "node")
        .unwrap();
    ca.issue(&Role::Admin, &[], Validity::Days(1))
        .unwrap()
        .save(&dir.join("admin"), "admin")
        .unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, "ab".repeat(32)).unwrap();
    (creds, secret)
}

/// A 16 MiB `hornd replica` in `dir` on loopback ports, with `extra` options, and its
/// data and control addresses.
fn replica(dir: &std::path::Path, extra: &[&str]) -> (Running, String, String) {
    let mut args = vec![
        "replica",
        "--dir",
        dir.to_str().unwrap(),
        "--size",
        "16M",
        "--listen",
        "127.0.0.1:0",
        "--control",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let (replica, line) = hornd(&args);
    let (data, control) = replica_addresses(&line);
    (replica, data, control)
}

/// A replica (as [`replica`]) on the TLS data wire.
fn tls_replica(dir: &std::path::Path, creds: &str, secret: &str) -> (Running, String, String) {
    replica(
        dir,
        &["--credentials", creds, "--secret-file", secret, "--data-tls"],
    )
}

#[test]
fn the_data_wire_over_tls_carries_no_plaintext_and_takes_only_tls_peers() {
    let dir = tempfile::tempdir().unwrap();
    let (creds, secret) = node_credentials(dir.path());
    let (c, s) = (creds.to_str().unwrap(), secret.to_str().unwrap());
    let pattern: Vec<u8> = b"HORN-DATA-TLS-PLAINTEXT-"
        .iter()
        .copied()
        .cycle()
        .take(4096)
        .collect();
    let holds = |hay: &[u8]| hay.windows(24).any(|w| w == &pattern[..24]);

    for tls in [false, true] {
        let rdir = dir.path().join(format!("r-{tls}"));
        let (_replica, data, control) = if tls {
            tls_replica(&rdir, c, s)
        } else {
            replica(&rdir, &["--credentials", c, "--secret-file", s])
        };
        if tls {
            // A plain client gets no answer from the TLS port.
            let plain = horn_proto::client::BlockingClient::connect(&data, std::time::Duration::from_secs(5))
                .and_then(|mut c| c.read(1, 0, 4096, 0).map(|_| ()));
            assert!(plain.is_err(), "a plain client was answered on the TLS port");
            // An engine without --data-tls cannot start on it.
            let out = Command::new(env!("CARGO_BIN_EXE_hornd"))
                .args([
                    "engine",
                    "--replica",
                    &format!("{data},{control}"),
                    "--control",
                    "127.0.0.1:0",
                ])
                .args([
                    "--credentials",
                    c,
                    "--node",
                    "n1",
                    "--secret-file",
                    s,
                    "--timeout",
                    "2",
                ])
                .output()
                .unwrap();
            assert!(
                !out.status.success(),
                "an engine without TLS started on a TLS replica"
            );
        }
        // The engine reaches its replica through a proxy that keeps what it sees.
        let (proxy, seen) = recording_proxy(data.clone());
        let mut args = vec![
            "--replica".to_string(),
            format!("{proxy},{control}"),
            "--credentials".into(),
            c.into(),
            "--node".into(),
            "n1".into(),
            "--secret-file".into(),
            s.into(),
        ];
        if tls {
            args.push("--data-tls".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (_engine, portal, engine) = iscsi_engine(&args);
        let mut i = common::iscsi::Initiator::login(&portal, "iqn.2026-11.io.horn:tls", None).unwrap();
        for lba in [0u32, 8, 800] {
            assert_eq!(i.write10(lba, &pattern).status, 0);
        }
        assert_eq!(i.read10(8, 8).data, pattern);
        let wire = seen.lock().unwrap().clone();
        assert!(wire.len() > 3 * 4096, "the proxy saw {} bytes", wire.len());
        assert_eq!(
            holds(&wire),
            !tls,
            "with data TLS {tls}, plaintext on the wire: {}",
            holds(&wire)
        );
        if !tls {
            continue;
        }
        // A snapshot of it rebuilt onto a second TLS replica: the layer streams between
        // the replicas run over TLS too, and the new replica holds the data.
        let r2 = dir.path().join("r2");
        let (_r2, d2, c2) = tls_replica(&r2, c, s);
        let node = Some(
            horn_pki::Credentials::load(&creds, "node")
                .unwrap()
                .client_tls(NODE_NAME),
        );
        let done = rt().block_on(async {
            let mut e = EngineControlClient::new(channel(&engine, node).await.unwrap());
            e.snapshot(horn_proto::engine_control::EngineSnapshotRequest {
                name: "s1".into(),
                ..Default::default()
            })
            .await
            .unwrap();
            let id = e
                .add_replica(horn_proto::engine_control::AddReplicaRequest {
                    replica: format!("{d2},{c2}"),
                })
                .await
                .unwrap()
                .into_inner()
                .rebuild_id;
            for _ in 0..300 {
                let info = e.info(EngineInfoRequest {}).await.unwrap().into_inner();
                let r = info.rebuilds.iter().find(|r| r.id == id).unwrap().clone();
                if r.state != "syncing" {
                    return r;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            panic!("the rebuild did not end");
        });
        assert_eq!(done.state, "done", "{done:?}");
        assert!(done.bytes_copied >= 3 * 4096, "{done:?}");
        let copied: Vec<u8> = std::fs::read_dir(&r2)
            .unwrap()
            .flatten()
            .filter(|f| f.file_type().unwrap().is_file())
            .flat_map(|f| std::fs::read(f.path()).unwrap())
            .collect();
        assert!(holds(&copied), "the rebuilt replica does not hold the data");
    }
}

#[test]
fn a_tls_replica_killed_mid_write_stream_costs_no_acknowledged_write() {
    // Two replicas behind the TLS data wire; one is SIGKILLed a third of the way
    // through a stream of writes. Every write the initiator saw acknowledged must
    // read back, through the engine and from the survivor's own files. The victim,
    // started again on its directory, is rebuilt over TLS, and the replicas then
    // agree block by block (`hornctl engine verify`) and both hold every write.
    use rand::{rngs::SmallRng, Rng, SeedableRng};
    let seed = std::env::var("HORN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("seed {seed} (HORN_TEST_SEED={seed} reruns it)");
    let dir = tempfile::tempdir().unwrap();
    let (creds, secret) = node_credentials(dir.path());
    let (c, s) = (creds.to_str().unwrap(), secret.to_str().unwrap());
    let mut replicas = Vec::new();
    let mut args = Vec::new();
    for i in 0..2 {
        let (replica, data, control) = tls_replica(&dir.path().join(format!("r{i}")), c, s);
        args.extend(["--replica".to_string(), format!("{data},{control}")]);
        replicas.push(Some(replica));
    }
    args.extend(
        [
            "--credentials",
            c,
            "--node",
            "n1",
            "--secret-file",
            s,
            "--data-tls",
        ]
        .iter()
        .map(|a| a.to_string()),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (engine, portal, control) = iscsi_engine(&args);
    let mut i = common::iscsi::Initiator::login(&portal, "iqn.2026-11.io.horn:tls", None).unwrap();

    // 16 MiB of 512-byte LBAs, written 4 KiB at a time, each block filled with its
    // write's number.
    const WRITES: u32 = 600;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut acked = std::collections::BTreeMap::new();
    for n in 1..=WRITES {
        if n == WRITES / 3 {
            // Dropping a `Running` SIGKILLs it (and reaps it).
            drop(replicas[1].take());
        }
        let lba = rng.gen_range(0..(16u32 << 20) / 4096) * 8;
        let fill = (n as u16).to_le_bytes().repeat(2048);
        let r = i.write10(lba, &fill);
        assert_eq!(r.status, 0, "write {n} at LBA {lba} failed after the kill");
        acked.insert(lba, fill);
    }
    let read_back = |i: &mut common::iscsi::Initiator, when: &str| {
        for (&lba, want) in &acked {
            assert!(
                i.read10(lba, 8).data == *want,
                "LBA {lba} does not read back what was acknowledged ({when})"
            );
        }
    };
    read_back(&mut i, "after the kill");

    // The victim comes back on its own directory and is rebuilt over TLS.
    let hornctl = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_hornctl"))
            .arg("engine")
            .args(args)
            .args(["--engine", &control, "--credentials"])
            .arg(dir.path().join("admin"))
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "hornctl engine {args:?}: {text}");
        text
    };
    let (back, data, rcontrol) = tls_replica(&dir.path().join("r1"), c, s);
    replicas[1] = Some(back);
    let text = hornctl(&["add-replica", &format!("{data},{rcontrol}")]);
    assert!(text.contains(&format!("rebuilt {data} from ")), "{text}");
    let text = hornctl(&["verify"]);
    assert!(text.contains("on 2 replicas: identical"), "{text}");
    read_back(&mut i, "after the rebuild");
    drop(i);
    drop(engine);

    // Each replica's own files hold every acknowledged write.
    for (n, replica) in replicas.iter_mut().enumerate() {
        let mut running = replica.take().unwrap();
        // SAFETY: kill takes no pointers; the pid is our child's.
        unsafe { libc::kill(running.0.id() as i32, libc::SIGTERM) };
        running.0.wait().unwrap();
        let mut r = horn_replica::Replica::open(dir.path().join(format!("r{n}"))).unwrap();
        let mut got = vec![0u8; 4096];
        for (&lba, want) in &acked {
            r.read_at(u64::from(lba) * 512, &mut got).unwrap();
            assert!(got == *want, "replica r{n}'s files lack the write at LBA {lba}");
        }
    }
}
