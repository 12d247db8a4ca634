//! Helpers shared by the integration tests: `hornd replica` as a child process.

// Each test binary uses some of these helpers, never all.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use horn_proto::client::BlockingClient;

pub mod iscsi;

/// A running `hornd replica`.
pub struct Daemon {
    pub child: Child,
    pub addr: String,
    pub control: String,
}

impl Daemon {
    /// Starts one on `dir` (ports chosen by the kernel unless `extra` gives them).
    pub fn start(dir: &Path, extra: &[&str]) -> Result<Daemon, String> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hornd"));
        cmd.args(["replica", "--dir"]).arg(dir).args(extra);
        if !extra.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        if !extra.contains(&"--control") {
            cmd.args(["--control", "127.0.0.1:0"]);
        }
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        // "hornd replica: serving DIR on DATA, control on CONTROL"
        let addrs = line
            .split_once(" on ")
            .and_then(|(_, rest)| rest.trim().split_once(", control on "));
        match addrs {
            Some((addr, control)) => Ok(Daemon {
                child,
                addr: addr.to_string(),
                control: format!("http://{control}"),
            }),
            None => {
                let out = child.wait_with_output().unwrap();
                Err(String::from_utf8_lossy(&out.stderr).into_owned())
            }
        }
    }

    /// Its addresses, as the engine takes them.
    pub fn replica_addr(&self) -> horn_engine::ReplicaAddr {
        horn_engine::ReplicaAddr {
            data: self.addr.clone(),
            control: self.control.trim_start_matches("http://").to_string(),
            local: false,
        }
    }

    /// A data-wire client.
    pub fn client(&self) -> BlockingClient {
        BlockingClient::connect(&self.addr, Duration::from_secs(10)).unwrap()
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill takes no pointers; the pid is our child's.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }
}

impl Daemon {
    /// Waits for the process to exit and collects what it printed after its first line.
    pub fn wait_output(&mut self) -> std::process::Output {
        use std::io::Read;
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        if let Some(mut s) = self.child.stdout.take() {
            let _ = s.read_to_end(&mut stdout);
        }
        if let Some(mut s) = self.child.stderr.take() {
            let _ = s.read_to_end(&mut stderr);
        }
        let status = self.child.wait().expect("the daemon was started");
        std::process::Output {
            status,
            stdout,
            stderr,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill takes no pointers; the pid is our child's (reaped below).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// A running `hornd engine` on some replicas.
pub struct EngineDaemon {
    pub child: Child,
    pub control: String,
    pub first_line: String,
}

impl EngineDaemon {
    /// Starts one on `replicas`, its control service on a port the kernel chooses.
    pub fn start(replicas: &[&Daemon]) -> Result<EngineDaemon, String> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hornd"));
        cmd.args(["engine", "--control", "127.0.0.1:0"]);
        for r in replicas {
            cmd.arg("--replica")
                .arg(format!("{},{}", r.addr, r.control.trim_start_matches("http://")));
        }
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        match line.rsplit_once("control on ") {
            Some((_, addr)) => Ok(EngineDaemon {
                child,
                control: addr.trim().to_string(),
                first_line: line.clone(),
            }),
            None => {
                let out = child.wait_with_output().unwrap();
                Err(String::from_utf8_lossy(&out.stderr).into_owned())
            }
        }
    }

    /// Runs `hornctl engine ARGS` against this engine.
    pub fn hornctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_hornctl"))
            .args(["engine", "--engine", &self.control])
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for EngineDaemon {
    fn drop(&mut self) {
        // SAFETY: kill takes no pointers; the pid is our child's (reaped below).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}
