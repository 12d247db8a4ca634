//! `hornd replica` as a real process: serves the data wire, stops cleanly on SIGTERM,
//! survives kill -9, refuses a second server on the same directory.

mod common;

use std::time::Duration;

use common::Daemon;

use horn_proto::client::BlockingClient;
use horn_proto::control::replica_control_client::ReplicaControlClient;
use horn_proto::control::{
    ClaimRequest, InfoRequest, Mode, ReleaseRequest, RevertRequest, SetModeRequest, SnapshotRequest,
};
use horn_proto::control::{RenewLeaseRequest, ENGINE_HEADER, LEASE_LEFT_HEADER};
use horn_proto::wire::{Header, Op, Status};
use horn_replica::Replica;
use tonic::transport::Endpoint;

#[test]
fn serves_the_data_wire_and_stops_cleanly_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let mut d = Daemon::start(&dir, &["--size", "8M"]).unwrap();
    let mut c = d.client();
    let (h, _) = c.write(1, 4096, &[7u8; 8192], 0).unwrap();
    assert_eq!(h.status, Status::Ok);
    let (h, p) = c.read(2, 4096, 8192, 0).unwrap();
    assert_eq!(h.status, Status::Ok);
    assert!(p.iter().all(|&b| b == 7));
    assert_eq!(
        c.call(&Header::request(Op::Ping, 3, 0, 0, 0), &[]).unwrap().0.id,
        3
    );

    d.signal(libc::SIGTERM);
    let out = d.wait_output();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("closed cleanly"));
    assert!(c.closed());
    let mut r = Replica::open(&dir).unwrap();
    let mut b = vec![0u8; 8192];
    r.read_at(4096, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 7));
}

/// The open flags of the process's descriptors on layer files.
fn layer_fd_flags(pid: u32) -> Vec<u32> {
    let mut flags = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if !target.to_string_lossy().contains("layer-") {
            continue;
        }
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy()));
        if let Some(line) = info.unwrap_or_default().lines().find(|l| l.starts_with("flags:")) {
            flags.push(u32::from_str_radix(line["flags:".len()..].trim(), 8).unwrap());
        }
    }
    flags
}

#[test]
fn the_cache_mode_decides_whether_aligned_io_bypasses_the_page_cache() {
    let tmp = tempfile::tempdir().unwrap();
    for (mode, direct) in [(None, true), (Some("page"), false), (Some("direct"), true)] {
        let dir = tmp.path().join(mode.unwrap_or("default"));
        let mut args = vec!["--size", "8M"];
        if let Some(m) = mode {
            args.extend(["--cache", m]);
        }
        let d = Daemon::start(&dir, &args).unwrap();
        let mut c = d.client();
        let (h, _) = c.write(1, 8192, &[9u8; 8192], 0).unwrap();
        assert_eq!(h.status, Status::Ok);
        let (h, p) = c.read(2, 8192, 8192, 0).unwrap();
        assert_eq!(h.status, Status::Ok);
        assert!(p.iter().all(|&b| b == 9));
        let flags = layer_fd_flags(d.child.id());
        assert!(!flags.is_empty(), "{mode:?}: no layer file open");
        let o_direct = flags.iter().any(|f| f & libc::O_DIRECT as u32 != 0);
        assert_eq!(o_direct, direct, "{mode:?}: layer descriptors' flags {flags:?}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hornd"))
        .args(["replica", "--cache", "fast"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not direct or page"));
}

#[test]
fn a_replica_killed_mid_stream_reopens_with_its_flushed_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let mut d = Daemon::start(&dir, &["--size", "8M"]).unwrap();
    let mut c = d.client();
    for i in 0..64u64 {
        c.write(i, i * 4096, &[i as u8 + 1; 4096], 0).unwrap();
    }
    assert_eq!(
        c.call(&Header::request(Op::Flush, 99, 0, 0, 0), &[])
            .unwrap()
            .0
            .status,
        Status::Ok
    );
    // More writes in flight when it dies.
    for i in 0..64u64 {
        c.send(
            &Header::request(Op::Write, 100 + i, (64 + i) * 4096, 4096, 0),
            &[0xee; 4096],
        )
        .unwrap();
    }
    d.signal(libc::SIGKILL);
    d.child.wait().unwrap();

    let d2 = Daemon::start(&dir, &[]).unwrap();
    let mut c = d2.client();
    for i in 0..64u64 {
        let (h, p) = c.read(i, i * 4096, 4096, 0).unwrap();
        assert_eq!(h.status, Status::Ok);
        assert!(p.iter().all(|&b| b == i as u8 + 1), "flushed block {i} lost");
    }
    d2.signal(libc::SIGTERM);
}

#[test]
fn a_second_server_on_the_same_replica_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let d = Daemon::start(&dir, &["--size", "8M"]).unwrap();
    let err = Daemon::start(&dir, &[]).err().expect("a second server started");
    assert!(err.contains("in use by another process"), "{err}");
    d.signal(libc::SIGTERM);
}

#[test]
fn a_missing_replica_or_a_bad_address_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let err = Daemon::start(&tmp.path().join("none"), &[]).err().unwrap();
    assert!(err.contains("not a Horn replica"), "{err}");
    let err = Daemon::start(
        &tmp.path().join("r"),
        &["--size", "8M", "--listen", "256.0.0.1:1"],
    )
    .err()
    .unwrap();
    assert!(err.contains("cannot listen on 256.0.0.1:1"), "{err}");
}

#[tokio::test(flavor = "current_thread")]
async fn the_control_service_claims_fences_snapshots_and_switches_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("r"), &["--size", "8M"]).unwrap();
    let channel = Endpoint::from_shared(d.control.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    // Every call names its engine, as an engine's do.
    let named = |engine: &'static str| {
        move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert(ENGINE_HEADER, engine.parse().unwrap());
            Ok(req)
        }
    };
    let mut ctl = ReplicaControlClient::with_interceptor(channel.clone(), named("engine-a"));
    let mut other = ReplicaControlClient::with_interceptor(channel.clone(), named("engine-b"));
    let mut unnamed = ReplicaControlClient::new(channel);

    let err = unnamed
        .claim(ClaimRequest {
            generation: 3,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("names its engine"), "{err}");
    let info = ctl
        .claim(ClaimRequest {
            generation: 3,
            engine: "engine-a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.generation, info.dirty, info.size), (3, true, 8 << 20));
    assert_eq!(info.mode, Mode::Rw as i32);

    // At the claim's generation only the engine holding it is admitted, on the data
    // wire and on the control service.
    let addr = d.addr.clone();
    let data = tokio::task::spawn_blocking(move || {
        let mut foreign = BlockingClient::connect(&addr, Duration::from_secs(10)).unwrap();
        let unnamed = foreign.write(1, 0, &[1u8; 4096], 3).unwrap();
        assert_eq!(foreign.hello(2, "engine-b", 3).unwrap().0.status, Status::Ok);
        let named_b = foreign.write(3, 0, &[1u8; 4096], 3).unwrap();
        let mut c = BlockingClient::connect(&addr, Duration::from_secs(10)).unwrap();
        assert_eq!(c.hello(4, "engine-a", 3).unwrap().0.status, Status::Ok);
        let stale = c.write(5, 0, &[1u8; 4096], 2).unwrap().0.status;
        let ok = c.write(6, 0, &[1u8; 4096], 3).unwrap().0.status;
        (unnamed, named_b, stale, ok, c)
    })
    .await
    .unwrap();
    for (h, message) in [&data.0, &data.1] {
        assert_eq!(h.status, Status::StaleGeneration);
        let message = String::from_utf8_lossy(message);
        assert!(message.contains("belongs to engine engine-a"), "{message}");
    }
    assert_eq!((data.2, data.3), (Status::StaleGeneration, Status::Ok));
    let mut c = data.4;
    let err = other
        .set_mode(SetModeRequest {
            generation: 3,
            mode: Mode::Wo as i32,
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("belongs to engine engine-a"), "{err}");
    let err = unnamed
        .release(ReleaseRequest { generation: 3 })
        .await
        .unwrap_err();
    assert!(err.message().contains("not to an unnamed sender"), "{err}");

    let snap = SnapshotRequest {
        generation: 3,
        name: "s1".into(),
        labels: [("why".to_string(), "test".to_string())].into(),
    };
    let info = ctl.snapshot(snap).await.unwrap().into_inner();
    assert_eq!(info.layers.len(), 2);
    assert_eq!(info.layers[0].name, "s1");
    assert_eq!(info.layers[0].labels["why"], "test");

    // Write-only: writes go on, reads are refused.
    ctl.set_mode(SetModeRequest {
        generation: 3,
        mode: Mode::Wo as i32,
    })
    .await
    .unwrap();
    let (w, r) = tokio::task::spawn_blocking(move || {
        let w = c.write(3, 0, &[2u8; 4096], 3).unwrap().0.status;
        let r = c.read(4, 0, 4096, 3).unwrap();
        (w, r)
    })
    .await
    .unwrap();
    assert_eq!(w, Status::Ok);
    assert_eq!(r.0.status, Status::Unavailable);
    assert!(String::from_utf8_lossy(&r.1).contains("write-only"));
    ctl.set_mode(SetModeRequest {
        generation: 3,
        mode: Mode::Rw as i32,
    })
    .await
    .unwrap();

    // Errors come back with the right codes and the store's words.
    let bad = ctl
        .snapshot(SnapshotRequest {
            generation: 3,
            name: "no/slash".into(),
            labels: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(
        bad.message().contains("invalid snapshot name"),
        "{}",
        bad.message()
    );
    let missing = ctl
        .revert(RevertRequest {
            generation: 3,
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let stale = ctl
        .claim(ClaimRequest {
            generation: 2,
            engine: "engine-a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition);
    assert!(stale.message().contains("does not exceed"), "{}", stale.message());
    let bad_mode = ctl
        .set_mode(SetModeRequest {
            generation: 3,
            mode: 9,
        })
        .await
        .unwrap_err();
    assert_eq!(bad_mode.code(), tonic::Code::InvalidArgument);

    let info = ctl
        .release(ReleaseRequest { generation: 3 })
        .await
        .unwrap()
        .into_inner();
    assert!(!info.dirty);
    let info = ctl.info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info.generation, info.dirty), (3, false));
    d.signal(libc::SIGTERM);
}

/// Read leases as a replica process keeps them: a claim grants one; another engine's
/// claim waits for it (told how long), however new its generation; only the holder
/// renews it; once it lapses the other engine claims, and the old holder's renewal is
/// refused as deposed. A replica killed while an engine held it open keeps other
/// claims off for the lease's length after it restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_lease_holds_off_other_claims_until_it_lapses_even_across_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let mut d = Daemon::start(&dir, &["--size", "8M"]).unwrap();
    let named = |engine: &'static str| {
        move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert(ENGINE_HEADER, engine.parse().unwrap());
            Ok(req)
        }
    };
    let connect =
        |control: String| async move { Endpoint::from_shared(control).unwrap().connect().await.unwrap() };
    let channel = connect(d.control.clone()).await;
    let mut a = ReplicaControlClient::with_interceptor(channel.clone(), named("engine-a"));
    let mut b = ReplicaControlClient::with_interceptor(channel.clone(), named("engine-b"));
    let claim = |generation: u64, engine: &str, lease_ms: u64| ClaimRequest {
        generation,
        engine: engine.into(),
        volume: String::new(),
        lease_ms,
    };
    let renew = |generation: u64, lease_ms: u64| RenewLeaseRequest { generation, lease_ms };

    let info = a.claim(claim(3, "engine-a", 1500)).await.unwrap().into_inner();
    assert_eq!(info.lease_holder, "engine-a");
    assert!(
        info.lease_left_ms > 1000 && info.lease_left_ms <= 1500,
        "{info:?}"
    );
    let err = b.claim(claim(9, "engine-b", 1500)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(err.message().contains("holds a read lease"), "{err}");
    let left: u64 = err
        .metadata()
        .get(LEASE_LEFT_HEADER)
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(left > 0 && left <= 1500, "{left}");
    // Only the holder renews, at its own generation.
    let err = b.renew_lease(renew(3, 1500)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    let renewed = std::time::Instant::now();
    a.renew_lease(renew(3, 1500)).await.unwrap();
    let err = a.renew_lease(renew(3, 600_000)).await.unwrap_err();
    assert!(err.message().contains("longer than"), "{err}");
    // Refused while the renewed lease runs; once it lapses, the other engine claims,
    // and the old holder is deposed.
    while let Err(e) = b.claim(claim(9, "engine-b", 2000)).await {
        assert!(e.message().contains("holds a read lease"), "{e}");
        assert!(
            renewed.elapsed() < Duration::from_secs(5),
            "the lease never lapsed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        renewed.elapsed() >= Duration::from_millis(1500),
        "claimed {:?} after a 1500 ms renewal",
        renewed.elapsed()
    );
    let err = a.renew_lease(renew(3, 1500)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("newer engine"), "{err}");

    // Killed while engine-b held it open (a claim marks it so): after the restart,
    // another engine's claim waits a whole lease.
    d.signal(libc::SIGKILL);
    d.wait_output();
    let mut d = Daemon::start(&dir, &[]).unwrap();
    let restarted = std::time::Instant::now();
    let channel = connect(d.control.clone()).await;
    let mut c = ReplicaControlClient::with_interceptor(channel.clone(), named("engine-c"));
    let err = c.claim(claim(10, "engine-c", 2000)).await.unwrap_err();
    assert!(err.message().contains("engine-b holds a read lease"), "{err}");
    while c.claim(claim(10, "engine-c", 2000)).await.is_err() {
        assert!(
            restarted.elapsed() < Duration::from_secs(5),
            "the guard never lapsed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        restarted.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        restarted.elapsed()
    );
    // Giving the lease up (0) lets the next engine in at once.
    c.renew_lease(renew(10, 0)).await.unwrap();
    let mut e = ReplicaControlClient::with_interceptor(channel, named("engine-e"));
    e.claim(claim(11, "engine-e", 2000)).await.unwrap();
    d.signal(libc::SIGTERM);
    d.wait_output();
}

/// A process's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The abuse from issue 16: one connection sends 8 MiB read requests and never reads
/// the replies. Before the caps, the replica read every request, read its data and
/// queued the reply, and grew by 8 MiB a request (7 MiB to 8.4 GiB in 25 s). Now it
/// stops reading the connection once its unanswered requests hold 32 MiB, so the
/// client's own sends stall, the replica's memory stays flat, and other clients are
/// served meanwhile.
#[test]
fn a_client_that_never_reads_its_replies_holds_a_bounded_amount_of_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("r"), &["--size", "64M"]).unwrap();
    let pid = d.child.id();
    let before = rss_kib(pid);
    let mut abuser = std::net::TcpStream::connect(&d.addr).unwrap();
    abuser.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let len = horn_proto::wire::MAX_IO_LEN;
    // 400 requests would hold 3.2 GiB: their headers fit in the sockets' buffers, so
    // they are all sent, and only the replica's caps keep it from reading them all.
    let mut sent = 0u64;
    for i in 0..400u64 {
        let h = Header::request(Op::Read, i, (i % 8) * len as u64, len, 0);
        if std::io::Write::write_all(&mut abuser, &h.encode()).is_err() {
            break;
        }
        sent += 1;
    }
    // The replica has stopped reading the connection: requests wait in its socket.
    common::eventually(Duration::from_secs(10), "the replica read every request", || {
        common::unread_bytes(&d.addr) > 0
    });
    let grown_mib = rss_kib(pid).saturating_sub(before) / 1024;
    println!("{sent} read requests of 8 MiB sent, no reply read; the replica grew by {grown_mib} MiB");
    assert!(grown_mib < 128, "the replica grew by {grown_mib} MiB");
    // Another client is served meanwhile.
    let mut c = d.client();
    let (h, _) = c.call(&Header::request(Op::Ping, 1, 0, 0, 0), &[]).unwrap();
    assert_eq!(h.status, Status::Ok);
    let (h, data) = c.read(2, 0, 4096, 0).unwrap();
    assert_eq!((h.status, data.len()), (Status::Ok, 4096));
    // The abuser gives up: its connection goes, and so does what it held.
    let files = common::open_sockets(pid);
    drop(abuser);
    common::eventually(Duration::from_secs(10), "the connection was never closed", || {
        common::open_sockets(pid) < files
    });
}

/// Connections over `--max-connections` are closed as they are accepted; those
/// within are served, and once some close, new ones are taken again. Thousands of
/// connections that end leave the count of open sockets where it started.
#[test]
fn connections_over_the_limit_are_closed_and_ended_ones_leave_no_descriptor() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("r"), &["--size", "8M", "--max-connections", "8"]).unwrap();
    let pid = d.child.id();
    let ping = |c: &mut BlockingClient| {
        c.call(&Header::request(Op::Ping, 7, 0, 0, 0), &[])
            .map(|(h, _)| h.status)
    };
    let baseline = common::open_sockets(pid);
    let mut held: Vec<BlockingClient> = (0..8).map(|_| d.client()).collect();
    for c in &mut held {
        assert_eq!(ping(c).unwrap(), Status::Ok);
    }
    let mut over = d.client();
    assert!(ping(&mut over).is_err(), "a ninth connection was served");
    for c in &mut held {
        assert_eq!(ping(c).unwrap(), Status::Ok);
    }
    held.truncate(4);
    // Once the replica has seen those close, a new connection is served.
    let mut again = None;
    common::eventually(
        Duration::from_secs(10),
        "no connection served after four closed",
        || {
            let mut c = d.client();
            let served = matches!(ping(&mut c), Ok(Status::Ok));
            if served {
                again = Some(c);
            }
            served
        },
    );
    drop((held, over, again));
    // Connections that end in every way: at once, after a ping, after half a header.
    for i in 0..3000u64 {
        let mut s = std::net::TcpStream::connect(&d.addr).unwrap();
        match i % 3 {
            0 => {}
            1 => {
                let mut c = BlockingClient::over(s, Duration::from_secs(5)).unwrap();
                assert_eq!(ping(&mut c).unwrap(), Status::Ok);
            }
            _ => {
                let h = Header::request(Op::Ping, i, 0, 0, 0).encode();
                std::io::Write::write_all(&mut s, &h[..10]).unwrap();
            }
        }
    }
    let open = common::wait_for_sockets(pid, baseline);
    assert_eq!(open, baseline, "{open} sockets open, {baseline} before");
    println!("3,000 ended connections later: {open} sockets open, {baseline} before");
}
