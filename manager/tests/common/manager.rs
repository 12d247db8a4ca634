//! `hornd manager` as a child process and `hornctl` against it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};

use super::iscsi::Initiator;

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

/// A `hornd node` agent, killed when dropped (its instances are not: they belong to
/// the node, and the test removes them through the manager).
pub struct Agent {
    pub child: Child,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lets replicas be placed however full this machine's disk is: the tests' disks
/// share it with everything else, and the default keeps 25% of it free.
pub fn roomy(data: &Path, a: &str) {
    ok(hornctl(
        data,
        a,
        &["settings", "set", "minimal-available-percent=0"],
    ));
}

pub fn node_dir(data: &Path, n: u32) -> PathBuf {
    data.join(format!("n{n}"))
}

pub fn start_agent(data: &Path, manager: &str, n: u32) -> Agent {
    let token = data.join("cluster-token");
    start_agent_joining(data, manager, n, &["--token-file", token.to_str().unwrap()])
}

/// An agent joining with `join` (`--token-file FILE`, or `--join TOKEN --ca-file
/// FILE`).
pub fn start_agent_joining(data: &Path, manager: &str, n: u32, join: &[&str]) -> Agent {
    let dir = node_dir(data, n);
    std::fs::create_dir_all(&dir).unwrap();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("agent.log"))
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_hornd"))
        .args(["node", "--manager", manager, "--name", &format!("n{n}")])
        .args(["--address", &format!("127.0.0.{}:9700", 10 + n)])
        .args(join)
        .env_remove("HORN_TOKEN_FILE")
        .arg("--disk")
        .arg(dir.join("disk"))
        .arg("--state")
        .arg(dir.join("state"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    Agent { child }
}

/// The supervisor pids in the node's instance records, by instance.
pub fn recorded_pids(data: &Path, n: u32) -> Vec<(String, u64)> {
    let dir = node_dir(data, n).join("state/instances");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, u64)> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let r: serde_json::Value =
                serde_json::from_slice(&std::fs::read(e.path().join("instance.json")).ok()?).ok()?;
            Some((e.file_name().to_string_lossy().into_owned(), r["pid"].as_u64()?))
        })
        .collect();
    out.sort();
    out
}

/// Kills every instance the nodes recorded (their supervisors' process groups), so
/// that a failed test leaves no daemon behind.
pub struct KillInstances<'a>(pub &'a Path);

impl Drop for KillInstances<'_> {
    fn drop(&mut self) {
        for n in 1..=4 {
            for (_, pid) in recorded_pids(self.0, n) {
                // SAFETY: killpg takes no pointers; the group is the supervisor's own.
                unsafe { libc::killpg(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

/// (portal, iqn) of an `iscsi://PORTAL/IQN` endpoint.
/// Logs in to the volume whose target is `iqn` at portal `p`, with the volume's CHAP
/// credentials from the manager (its target requires them).
pub fn login(data: &Path, a: &str, p: &str, iqn: &str) -> Result<Initiator, (u8, u8)> {
    let volume = iqn.rsplit(':').next().unwrap();
    let cr = json(hornctl(data, a, &["volume", "credentials", volume, "--json"]));
    if cr["no_chap"] == true {
        return Initiator::login(p, iqn, None);
    }
    let chap = super::iscsi::Chap {
        user: cr["chap_user"].as_str().unwrap(),
        secret: cr["chap_secret"].as_str().unwrap(),
        mutual: None,
    };
    Initiator::login(p, iqn, Some(chap))
}

pub fn portal(endpoint: &str) -> (String, String) {
    let rest = endpoint.strip_prefix("iscsi://").expect("an iSCSI endpoint");
    let (p, iqn) = rest.split_once('/').unwrap();
    (p.to_string(), iqn.to_string())
}
