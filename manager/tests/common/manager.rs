//! `hornd manager` as a child process and `hornctl` against it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

/// A running `hornd manager`.
pub struct ManagerDaemon {
    pub child: Child,
    pub addr: String,
}

impl ManagerDaemon {
    pub fn start(data: &Path, listen: &str) -> ManagerDaemon {
        ManagerDaemon::start_with(data, listen, &[])
    }

    /// With more flags.
    pub fn start_with(data: &Path, listen: &str, extra: &[&str]) -> ManagerDaemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hornd"))
            .args(["manager", "--data"])
            .arg(data)
            .args(["--listen", listen])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        // "hornd manager: cluster ID on ADDR, specs in PATH"
        let addr = line
            .split_once(" on ")
            .and_then(|(_, rest)| rest.split_once(','))
            .map(|(a, _)| a.to_string());
        match addr {
            Some(addr) => ManagerDaemon { child, addr },
            None => {
                let out = child.wait_with_output().unwrap();
                panic!(
                    "hornd manager did not start: {line}{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            }
        }
    }

    pub fn kill(&mut self) {
        // SAFETY: kill takes no pointers; the pid is our child's (reaped below).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for ManagerDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn hornctl(data: &Path, manager: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hornctl"))
        .args(args)
        .args(["--manager", manager, "--token-file"])
        .arg(data.join("cluster-token"))
        .env_remove("HORN_TOKEN")
        .output()
        .unwrap()
}

pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn refused(out: Output) -> String {
    assert!(
        !out.status.success(),
        "succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

pub fn json(out: Output) -> serde_json::Value {
    serde_json::from_str(&ok(out)).unwrap()
}

/// Creates the cluster's identity in `data`.
pub fn init(data: &Path) {
    ok(hornctl(
        data,
        "127.0.0.1:1",
        &["cluster", "init", "--data", data.to_str().unwrap()],
    ));
}
