//! Daemons that look after themselves, with real processes: `hornd supervise` starts a
//! replica again after SIGKILL (same addresses, same data), passes SIGTERM on and ends
//! with it, and does not retry a daemon that fails as it starts; `hornd --log-file`
//! appends (a restarted daemon keeps its predecessor's lines) and rotates by size.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::eventually;
use horn_proto::client::BlockingClient;
use horn_proto::wire::Status;

fn hornd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hornd"))
}

/// A loopback address with a port free right now.
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn log_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The pids the supervisor noted starting, in order.
fn started_pids(log: &Path) -> Vec<i32> {
    log_text(log)
        .lines()
        .filter_map(|l| l.strip_prefix("hornd supervise: started pid "))
        .filter_map(|rest| rest.split(':').next()?.parse().ok())
        .collect()
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

struct Supervised {
    child: Child,
}

impl Drop for Supervised {
    fn drop(&mut self) {
        // SAFETY: kill takes no pointers; the group is the one our child leads.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

#[test]
fn a_killed_replica_is_started_again_with_its_data_and_a_stop_ends_both() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("replica.log");
    let (data, control) = (free_addr(), free_addr());
    let mut cmd = hornd();
    cmd.arg("--log-file")
        .arg(&log)
        .args(["supervise", "--"])
        .arg(env!("CARGO_BIN_EXE_hornd"))
        .arg("--log-file")
        .arg(&log)
        .args([
            "replica",
            "--size",
            "16M",
            "--listen",
            &data,
            "--control",
            &control,
            "--dir",
        ])
        .arg(tmp.path().join("r"));
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    let mut s = Supervised {
        child: cmd.stdin(Stdio::null()).spawn().unwrap(),
    };
    let serving = |n: usize| log_text(&log).matches("hornd replica: serving").count() >= n;
    eventually(Duration::from_secs(20), "the replica never served", || serving(1));
    let mut c = BlockingClient::connect(&data, Duration::from_secs(5)).unwrap();
    let (h, _) = c.write(1, 4096, &[7u8; 4096], 0).unwrap();
    assert_eq!(h.status, Status::Ok);
    let (h, _) = c
        .call(
            &horn_proto::wire::Header::request(horn_proto::wire::Op::Flush, 2, 0, 0, 0),
            &[],
        )
        .unwrap();
    assert_eq!(h.status, Status::Ok);
    drop(c);

    // Killed: started again, on the same addresses, with the same data, and the log
    // keeps what the first one wrote.
    let first = started_pids(&log)[0];
    assert!(alive(first));
    // SAFETY: kill takes no pointers; the pid is our grandchild's.
    unsafe { libc::kill(first, libc::SIGKILL) };
    eventually(
        Duration::from_secs(20),
        "the replica was not started again",
        || serving(2),
    );
    let pids = started_pids(&log);
    assert_eq!(pids.len(), 2, "{}", log_text(&log));
    assert!(
        log_text(&log).contains(&format!("pid {first} ended (signal: 9")),
        "{}",
        log_text(&log)
    );
    let mut c = BlockingClient::connect(&data, Duration::from_secs(5)).unwrap();
    let (h, got) = c.read(3, 4096, 4096, 0).unwrap();
    assert_eq!(h.status, Status::Ok);
    assert!(
        got.iter().all(|&b| b == 7),
        "the restarted replica lost the flushed write"
    );
    drop(c);

    // SIGTERM to the supervisor reaches the replica; both end, cleanly.
    let second = pids[1];
    // SAFETY: as above; the pid is our child's.
    unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{status:?}: {}", log_text(&log));
    eventually(
        Duration::from_secs(10),
        "the replica outlived its supervisor",
        || !alive(second),
    );
    assert_eq!(
        started_pids(&log).len(),
        2,
        "restarted after a stop: {}",
        log_text(&log)
    );
}

#[test]
fn a_daemon_failing_as_it_starts_is_not_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("x.log");
    // No replica in the directory and no --size: it cannot start.
    let out = hornd()
        .arg("--log-file")
        .arg(&log)
        .args(["supervise", "--"])
        .arg(env!("CARGO_BIN_EXE_hornd"))
        .arg("--log-file")
        .arg(&log)
        .args([
            "replica",
            "--listen",
            "127.0.0.1:0",
            "--control",
            "127.0.0.1:0",
            "--dir",
        ])
        .arg(tmp.path().join("none"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = log_text(&log);
    assert_eq!(started_pids(&log).len(), 1, "{text}");
    assert!(text.contains("it failed as it started"), "{text}");
    let out = hornd().args(["supervise"]).output().unwrap();
    assert!(!out.status.success());
}

#[test]
fn the_log_file_is_appended_to_and_rotated_by_size() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("logs/replica.log");
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    // An earlier run's 100 KiB: kept, then rotated away past the 64 KiB cap.
    std::fs::write(&log, "earlier line\n".repeat(8000)).unwrap();
    let d = hornd()
        .arg("--log-file")
        .arg(&log)
        .args(["--log-max-size", "64K", "--log-keep", "2"])
        .args([
            "replica",
            "--size",
            "16M",
            "--listen",
            "127.0.0.1:0",
            "--control",
            "127.0.0.1:0",
            "--dir",
        ])
        .arg(tmp.path().join("r"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rotated = tmp.path().join("logs/replica.log.1");
    eventually(Duration::from_secs(10), "the log was not rotated", || {
        rotated.exists()
    });
    let old = log_text(&rotated);
    assert!(
        old.starts_with("earlier line\n"),
        "the earlier lines were not kept"
    );
    assert!(
        old.contains("hornd replica: serving"),
        "{}",
        &old[old.len() - 200..]
    );
    // SAFETY: kill takes no pointers; the pid is our child's.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    let out = d.wait_with_output().unwrap();
    assert!(out.status.success());
    // Nothing went to the real stderr: it all went to the file.
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    // The stop is logged: in the new file, or in the rotated one when it was written
    // between the rename and the reopening of the log (rotation moves the file first,
    // then points the output at a new one; nothing is lost either way).
    let both = format!("{}{}", log_text(&rotated), log_text(&log));
    assert!(both.contains("stopping"), "{}", log_text(&log));
    // A bad path is a clear error.
    let out = hornd()
        .args(["--log-file", "/proc/no/such/dir/x.log", "replica"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot"), "{out:?}");
}
