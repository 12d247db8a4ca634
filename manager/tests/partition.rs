//! A network partition, with real network stacks: three `hornd replica` processes, each
//! in a network namespace of its own, joined by veth pairs to the test's namespace
//! (where the first engine runs) and, for two of them, to a fourth namespace (where a
//! second engine runs). The links from the first engine to two replicas are cut; the
//! second engine serves those two. The first engine, left with one replica of three,
//! must stop acknowledging (before durable membership it went on, alone: split brain)
//! and must serve no read from its last replica once the second engine has written
//! (before read leases it served the old data); after the links heal, a new engine
//! serves the second engine's writes.
//!
//! Needs root and `ip netns`; without them it says why and is counted as skipped.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use horn_engine::{ReplicaAddr, Volume};

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 32;

/// The namespaces and links of one test, removed when dropped.
struct Net {
    prefix: String,
    namespaces: Vec<String>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Net {
    /// Namespaces r0, r1, r2 (a replica each) and e2 (the second engine); links
    /// test↔rI (10.77.I.0/24, the test side .1) and e2↔r1, e2↔r2 (10.78.I.0/24, e2 .1).
    fn build() -> Result<Net, String> {
        let prefix = format!("hp{}", std::process::id());
        let mut net = Net {
            prefix: prefix.clone(),
            namespaces: Vec::new(),
        };
        for name in ["r0", "r1", "r2", "e2"] {
            let ns = format!("{prefix}{name}");
            ip(&["netns", "add", &ns])?;
            net.namespaces.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        for i in 0..3 {
            let ns = net.ns(&format!("r{i}"));
            let (host, peer) = (format!("{prefix}h{i}"), format!("{prefix}p{i}"));
            ip(&[
                "link", "add", &host, "type", "veth", "peer", "name", &peer, "netns", &ns,
            ])?;
            ip(&["addr", "add", &format!("10.77.{i}.1/24"), "dev", &host])?;
            ip(&["link", "set", &host, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("10.77.{i}.2/24"), "dev", &peer])?;
            ip(&["-n", &ns, "link", "set", &peer, "up"])?;
        }
        let e2 = net.ns("e2");
        for i in 1..3 {
            let ns = net.ns(&format!("r{i}"));
            let (a, b) = (format!("{prefix}e{i}"), format!("{prefix}q{i}"));
            ip(&[
                "-n", &e2, "link", "add", &a, "type", "veth", "peer", "name", &b, "netns", &ns,
            ])?;
            ip(&["-n", &e2, "addr", "add", &format!("10.78.{i}.1/24"), "dev", &a])?;
            ip(&["-n", &e2, "link", "set", &a, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("10.78.{i}.2/24"), "dev", &b])?;
            ip(&["-n", &ns, "link", "set", &b, "up"])?;
        }
        Ok(net)
    }

    fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Cuts (or heals) the link between the test's namespace and replica `i`.
    fn link(&self, i: usize, up: bool) {
        let host = format!("{}h{i}", self.prefix);
        ip(&["link", "set", &host, if up { "up" } else { "down" }]).unwrap();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// `hornd replica` in namespace `ns`, listening on every address there, with the
/// volume's wire secret in `secret` (a replica refuses a network address without one).
struct NsReplica(Child);

impl NsReplica {
    fn start(ns: &str, dir: &Path, secret: &Path) -> NsReplica {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                env!("CARGO_BIN_EXE_hornd"),
                "replica",
                "--dir",
            ])
            .arg(dir)
            .args([
                "--size",
                "16M",
                "--listen",
                "0.0.0.0:9500",
                "--control",
                "0.0.0.0:9501",
                "--secret-file",
            ])
            .arg(secret)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.contains("serving"),
            "the replica in {ns} did not start: {line}"
        );
        NsReplica(child)
    }
}

impl Drop for NsReplica {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn addr(ip: &str) -> ReplicaAddr {
    ReplicaAddr {
        data: format!("{ip}:9500"),
        control: format!("{ip}:9501"),
        local: false,
    }
}

fn write_all(v: &mut Volume, pattern: u8) -> Result<(), horn_engine::VolumeError> {
    for b in 0..BLOCKS {
        v.write_at(b * BLOCK, &[pattern ^ b as u8; BLOCK as usize])?;
    }
    v.flush()
}

#[test]
fn an_engine_cut_off_with_one_replica_of_three_stops_acknowledging() {
    if unsafe { libc::geteuid() } != 0 {
        common::skip(
            "an_engine_cut_off_with_one_replica_of_three_stops_acknowledging",
            "the partition test needs root (network namespaces); CI runs it as root",
        );
        return;
    }
    let net = match Net::build() {
        Ok(n) => n,
        Err(e) => {
            common::skip(
                "an_engine_cut_off_with_one_replica_of_three_stops_acknowledging",
                &format!("network namespaces are not available here: {e}"),
            );
            return;
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..3).map(|i| tmp.path().join(format!("r{i}"))).collect();
    let secret = horn_proto::auth::VolumeSecret::generate().unwrap();
    let secret_file = tmp.path().join("volume.secret");
    std::fs::write(&secret_file, secret.to_hex()).unwrap();
    let _replicas: Vec<NsReplica> = (0..3)
        .map(|i| NsReplica::start(&net.ns(&format!("r{i}")), &dirs[i], &secret_file))
        .collect();
    // Every engine holds the volume's secret, as a standalone engine is given it.
    let start = move |replicas: &[ReplicaAddr], timeout: Duration| {
        let options = horn_engine::StartOptions {
            secret: Some(secret.clone()),
            ..Default::default()
        };
        Volume::start_with(replicas, timeout, options)
    };
    // Replica 0 is on the first engine's node (data locality): it serves that engine's
    // reads.
    let mut here: Vec<ReplicaAddr> = (0..3).map(|i| addr(&format!("10.77.{i}.2"))).collect();
    here[0].local = true;
    let timeout = Duration::from_secs(1);
    let (mut first, _) = start(&here, timeout).unwrap();
    write_all(&mut first, 1).unwrap();

    // The partition: the first engine keeps replica 0 only.
    net.link(1, false);
    net.link(2, false);
    // A second engine, in its own namespace, reaches replicas 1 and 2 and serves.
    let e2 = net.ns("e2");
    let start2 = start.clone();
    let second = std::thread::spawn(move || {
        let ns = File::open(format!("/var/run/netns/{e2}")).unwrap();
        // SAFETY: setns takes a namespace file descriptor we hold open; it moves only
        // this thread (and the threads it starts) into the namespace.
        assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let there = vec![addr("10.77.0.2"), addr("10.78.1.2"), addr("10.78.2.2")];
        let (mut v, report) = start2(&there, Duration::from_secs(1)).unwrap();
        assert_eq!(report.used.len(), 2, "{report:?}");
        write_all(&mut v, 2).unwrap();
        v.close().unwrap();
    });
    second.join().unwrap();

    // The first engine has not written since it was cut off, so no write has told it
    // that it is deposed. It must not serve reads from the one replica it still reaches:
    // that replica holds the first engine's data, which the second has overwritten.
    // (Before read leases it did, for every block.) A read either fails or returns the
    // second engine's data.
    let mut buf = vec![0u8; BLOCK as usize];
    let (mut stale, mut failed) = (0, 0);
    for b in 0..BLOCKS {
        match first.read_at(b * BLOCK, &mut buf) {
            Ok(()) if buf.iter().all(|&x| x == 1 ^ b as u8) => stale += 1,
            Ok(()) => assert!(
                buf.iter().all(|&x| x == 2 ^ b as u8),
                "block {b} read neither engine's data"
            ),
            Err(_) => failed += 1,
        }
    }
    println!("the deposed engine's reads: {stale} stale, {failed} failed, of {BLOCKS}");
    assert_eq!(
        stale, 0,
        "the deposed engine served {stale} stale reads of {BLOCKS} ({failed} failed)"
    );

    // The first engine must not acknowledge another write.
    let outcome = write_all(&mut first, 3);
    let err = outcome.expect_err("an engine left with one replica of three acknowledged writes");
    assert!(
        err.to_string().contains("faulted") || err.to_string().contains("fenced"),
        "{err}"
    );
    drop(first);

    // Healed: the next engine serves the second engine's writes, from the replicas
    // that hold them, and leaves the first engine's last replica out.
    net.link(1, true);
    net.link(2, true);
    let (mut v, report) = start(&here, timeout).unwrap();
    assert_eq!(
        report.used,
        vec![here[1].data.clone(), here[2].data.clone()],
        "{report:?}"
    );
    let mut buf = vec![0u8; BLOCK as usize];
    for b in 0..BLOCKS {
        v.read_at(b * BLOCK, &mut buf).unwrap();
        assert!(
            buf.iter().all(|&x| x == 2 ^ b as u8),
            "block {b} lost the second engine's write"
        );
    }
    let report = v.verify(|_, _| {}).unwrap();
    assert!(report.differences.is_empty(), "{report:?}");
}
