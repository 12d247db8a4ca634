//! Replicas given their volume's secret (`hornd replica --secret-file`) serve only
//! the volume's current engine (`horn_proto::auth`), against real replica processes:
//! - an engine holding the secret serves from them, and every write it acknowledged
//!   reads back;
//! - a data-wire client without the generation's key can neither read nor write:
//!   nothing before the handshake, no handshake with another volume's key, no request
//!   after a forged proof, and the engine's data is unchanged afterwards;
//! - a control call without the proof, with another volume's, or claiming a
//!   generation other than the one it proves, is refused; `Info` stays open;
//! - after a new generation, the old generation's key works neither on the data wire
//!   nor on the control service;
//! - an engine refuses a replica that does not prove it holds the secret, and an
//!   engine without the key is told why the replicas refuse it;
//! - `hornd replica` refuses a non-loopback address without a secret (or `--open`).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::Daemon;
use horn_engine::{StartOptions, Volume};
use horn_proto::auth::{GenerationKey, VolumeSecret, AUTH_HEADER};
use horn_proto::client::BlockingClient;
use horn_proto::control::replica_control_client::ReplicaControlClient;
use horn_proto::control::{BlocksRequest, ClaimRequest, InfoRequest, ENGINE_HEADER};
use horn_proto::wire::{Header, Op, Status};

const TIMEOUT: Duration = Duration::from_secs(5);

fn secret_file(dir: &Path, name: &str) -> (VolumeSecret, PathBuf) {
    let s = VolumeSecret::generate().unwrap();
    let path = dir.join(name);
    std::fs::File::create(&path)
        .unwrap()
        .write_all(s.to_hex().as_bytes())
        .unwrap();
    (s, path)
}

fn start(replicas: &[&Daemon], secret: Option<&VolumeSecret>) -> Result<Volume, String> {
    let addrs: Vec<_> = replicas.iter().map(|d| d.replica_addr()).collect();
    Volume::start_with(
        &addrs,
        TIMEOUT,
        StartOptions {
            secret: secret.cloned(),
            ..StartOptions::default()
        },
    )
    .map(|(v, _)| v)
    .map_err(|e| e.to_string())
}

fn pattern(i: u64) -> Vec<u8> {
    format!("AUTH-{i:06}-")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(4096)
        .collect()
}

/// A control call to `d` with `header` as its proof (none if `None`), naming `engine`.
fn control<T>(
    d: &Daemon,
    engine: &str,
    header: Option<String>,
    call: impl FnOnce(
        ReplicaControlClient<tonic::transport::Channel>,
        tonic::metadata::MetadataMap,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, tonic::Status>>>>,
) -> Result<T, tonic::Status> {
    let mut meta = tonic::metadata::MetadataMap::new();
    meta.insert(ENGINE_HEADER, engine.parse().unwrap());
    if let Some(h) = header {
        meta.insert(AUTH_HEADER, h.parse().unwrap());
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let c = ReplicaControlClient::connect(d.control.clone()).await.unwrap();
            call(c, meta).await
        })
}

fn read_blocks(d: &Daemon, header: Option<String>) -> Result<Vec<u8>, tonic::Status> {
    control(d, "outsider", header, |mut c, meta| {
        Box::pin(async move {
            let req = tonic::Request::from_parts(meta, Default::default(), BlocksRequest { blocks: vec![0] });
            c.read_blocks(req).await.map(|r| r.into_inner().data)
        })
    })
}

fn claim(d: &Daemon, generation: u64, header: Option<String>) -> Result<u64, tonic::Status> {
    control(d, "outsider", header, move |mut c, meta| {
        Box::pin(async move {
            let req = tonic::Request::from_parts(
                meta,
                Default::default(),
                ClaimRequest {
                    generation,
                    engine: "outsider".into(),
                    volume: String::new(),
                    lease_ms: 0,
                },
            );
            c.claim(req).await.map(|r| r.into_inner().generation)
        })
    })
}

fn generation(d: &Daemon) -> u64 {
    control(d, "anyone", None, |mut c, _| {
        Box::pin(async move { c.info(InfoRequest {}).await.map(|r| r.into_inner().generation) })
    })
    .unwrap()
}

/// A raw hello; returns the reply's status and payload.
fn hello(c: &mut BlockingClient, generation: u64) -> (Status, Vec<u8>) {
    let (h, p) = c.hello(0, "outsider", generation).unwrap();
    (h.status, p)
}

#[test]
fn a_replica_with_its_volume_secret_serves_only_the_current_generations_engine() {
    let tmp = tempfile::tempdir().unwrap();
    let (secret, file) = secret_file(tmp.path(), "volume.secret");
    let (other, _) = secret_file(tmp.path(), "other.secret");
    let file = file.display().to_string();
    let d: Vec<Daemon> = (0..2)
        .map(|i| {
            Daemon::start(
                &tmp.path().join(format!("r{i}")),
                &["--size", "16M", "--secret-file", &file],
            )
            .unwrap()
        })
        .collect();

    // Without the key, the engine is told why; with it, it serves.
    let Err(refused) = start(&[&d[0], &d[1]], None) else {
        panic!("an engine without the key started");
    };
    assert!(
        refused.contains("takes control calls only with its volume's proof"),
        "{refused}"
    );
    let mut v = start(&[&d[0], &d[1]], Some(&secret)).unwrap();
    for i in 0..16u64 {
        v.write_at(i * 4096, &pattern(i)).unwrap();
    }
    v.flush().unwrap();
    let g = generation(&d[0]);
    assert!(g >= 1);

    for r in &d {
        // Data wire: nothing but a ping before the handshake; a read or a write is
        // refused and the connection closed.
        let mut c = r.client();
        let (status, answer) = hello(&mut c, g);
        assert_eq!((status, answer.len()), (Status::Ok, 64), "the replica challenges");
        let (h, msg) = c.read(1, 0, 4096, g).unwrap();
        assert_eq!(
            h.status,
            Status::Unauthenticated,
            "{}",
            String::from_utf8_lossy(&msg)
        );
        assert!(c.closed());
        let mut c = r.client();
        hello(&mut c, g);
        let (h, _) = c.write(1, 0, &[0xee; 4096], g).unwrap();
        assert_eq!(h.status, Status::Unauthenticated);
        // A forged proof closes the connection too.
        let mut c = r.client();
        hello(&mut c, g);
        let (h, _) = c
            .call(&Header::request(Op::Prove, 2, 0, 32, g), &[7u8; 32])
            .unwrap();
        assert_eq!(h.status, Status::Unauthenticated);
        assert!(c.closed());
        // Another volume's key: the client sees the replica's proof is wrong.
        let mut c = r.client();
        let e = c.open("outsider", 0, Some(&other.generation_key(g))).unwrap_err();
        assert!(e.contains("does not hold this volume's secret"), "{e}");
        // The right generation's key opens it: the handshake itself works from here.
        let mut c = r.client();
        c.open("prober", 0, Some(&secret.generation_key(g))).unwrap();
        let (h, _) = c.call(&Header::request(Op::Ping, 3, 0, 0, g), &[]).unwrap();
        assert_eq!(h.status, Status::Ok);

        // Control: no proof, another volume's, a claim beyond the proof: refused.
        for header in [None, Some(other.generation_key(g).control_header("outsider"))] {
            let e = read_blocks(r, header.clone()).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
            let e = claim(r, 1 << 40, header).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        }
        let proven = secret.generation_key(g + 1).control_header("outsider");
        let e = claim(r, 1 << 40, Some(proven)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        assert!(e.message().contains("its proof for"), "{e:?}");
        assert_eq!(generation(r), g, "nothing moved the generation");
    }
    // The engine's data is as it wrote it.
    for i in 0..16u64 {
        let mut back = vec![0u8; 4096];
        v.read_at(i * 4096, &mut back).unwrap();
        assert_eq!(back, pattern(i), "block {i}");
    }
    v.close().unwrap();

    // A new generation: the old key works nowhere any more.
    let old: GenerationKey = secret.generation_key(g);
    let mut v = start(&[&d[0], &d[1]], Some(&secret)).unwrap();
    let g2 = generation(&d[0]);
    assert!(g2 > g);
    for r in &d {
        let mut c = r.client();
        let e = c.open("old-engine", 0, Some(&old)).unwrap_err();
        assert!(e.contains("no longer works"), "{e}");
        let e = read_blocks(r, Some(old.control_header("outsider"))).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        assert!(e.message().contains("no longer works"), "{e:?}");
    }
    for i in 0..16u64 {
        let mut back = vec![0u8; 4096];
        v.read_at(i * 4096, &mut back).unwrap();
        assert_eq!(back, pattern(i), "block {i}");
    }
    v.close().unwrap();
}

#[test]
fn an_engine_with_the_secret_refuses_a_replica_that_cannot_prove_it_holds_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (secret, _) = secret_file(tmp.path(), "volume.secret");
    let open = Daemon::start(&tmp.path().join("open"), &["--size", "16M"]).unwrap();
    let Err(e) = start(&[&open], Some(&secret)) else {
        panic!("an engine served from a replica that holds no secret");
    };
    assert!(e.contains("does not prove it holds the volume's secret"), "{e}");
}

#[test]
fn hornd_replica_refuses_a_network_address_without_a_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let Err(e) = Daemon::start(&tmp.path().join("r"), &["--size", "16M", "--listen", "0.0.0.0:0"]) else {
        panic!("a replica served on every address without a secret");
    };
    assert!(e.contains("not a loopback address"), "{e}");
    let (_, file) = secret_file(tmp.path(), "volume.secret");
    let ok = Daemon::start(
        &tmp.path().join("r"),
        &[
            "--size",
            "16M",
            "--listen",
            "0.0.0.0:0",
            "--secret-file",
            file.to_str().unwrap(),
        ],
    );
    assert!(ok.is_ok());
    let bad = tmp.path().join("bad.secret");
    std::fs::write(&bad, "not a secret").unwrap();
    let Err(e) = Daemon::start(&tmp.path().join("r2"), &["--secret-file", bad.to_str().unwrap()]) else {
        panic!("a replica served with a malformed secret");
    };
    assert!(e.contains("32 bytes"), "{e}");
}
