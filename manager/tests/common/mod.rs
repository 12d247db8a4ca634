//! Helpers shared by the integration tests: `hornd replica` as a child process.

// Each test binary uses some of these helpers, never all.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use horn_proto::client::BlockingClient;
use horn_proto::control::replica_control_client::ReplicaControlClient;
use horn_proto::control::{InfoRequest, ENGINE_HEADER};
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Names an engine in every control call's `horn-engine` header.
#[derive(Clone)]
pub struct Named(pub AsciiMetadataValue);

impl tonic::service::Interceptor for Named {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert(ENGINE_HEADER, self.0.clone());
        Ok(req)
    }
}

pub mod iscsi;
pub mod manager;

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

    /// A data-wire client that names itself as the engine holding the replica's claim,
    /// as a test standing in for that engine must (a replica admits no one else at
    /// its generation).
    pub fn client_as_holder(&self) -> BlockingClient {
        let holder = self.holder();
        let mut c = self.client();
        let (h, msg) = c.hello(0, &holder, 0).unwrap();
        assert_eq!(
            h.status,
            horn_proto::wire::Status::Ok,
            "{}",
            String::from_utf8_lossy(&msg)
        );
        c
    }

    /// A control client whose calls name the engine holding the replica's claim.
    pub async fn control_as_holder(&self) -> ReplicaControlClient<InterceptedService<Channel, Named>> {
        let channel = Endpoint::from_shared(self.control.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut plain = ReplicaControlClient::new(channel.clone());
        let holder = plain.info(InfoRequest {}).await.unwrap().into_inner().holder;
        ReplicaControlClient::with_interceptor(channel, Named(holder.parse().unwrap()))
    }

    /// The engine holding the replica's claim, from its `Info`.
    pub fn holder(&self) -> String {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let mut c = ReplicaControlClient::connect(self.control.clone()).await.unwrap();
                c.info(InfoRequest {}).await.unwrap().into_inner().holder
            })
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
        EngineDaemon::start_with(replicas, &[])
    }

    /// [`EngineDaemon::start`] with more `hornd engine` arguments.
    pub fn start_with(replicas: &[&Daemon], args: &[&str]) -> Result<EngineDaemon, String> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hornd"));
        cmd.args(["engine", "--control", "127.0.0.1:0"]).args(args);
        for r in replicas {
            cmd.arg("--replica")
                .arg(format!("{},{}", r.addr, r.control.trim_start_matches("http://")));
        }
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        // Lines before the one naming the control address say what the start waits
        // for (another engine's read lease to lapse); none: it failed.
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.as_mut().unwrap());
        loop {
            line.clear();
            if out.read_line(&mut line).unwrap() == 0 || line.contains("control on ") {
                break;
            }
        }
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

/// How many sockets process `pid` has open (its other descriptors come and go with its
/// runtimes' threads).
pub fn open_sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count()
}

/// Bytes that arrived on established TCP connections to local `addr` (IP:PORT) and
/// wait unread (the receive queues in /proc/net/tcp): a stopped or capped server's
/// backlog.
pub fn unread_bytes(addr: &str) -> u64 {
    let port = addr
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .unwrap();
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit_once(':')?.1, 16).ok()?;
            let established = *f.get(3)? == "01";
            let rx = u64::from_str_radix(f.get(4)?.split_once(':')?.1, 16).ok()?;
            (local_port == port && established).then_some(rx)
        })
        .sum()
}

/// Waits up to 10 s for process `pid` to have at most `n` sockets open; the count it
/// had when it stopped waiting.
pub fn wait_for_sockets(pid: u32, n: usize) -> usize {
    let since = std::time::Instant::now();
    loop {
        let open = open_sockets(pid);
        if open <= n || since.elapsed() > Duration::from_secs(10) {
            return open;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Skips the test that calls it, saying why: printed, and counted as skipped (not
/// passed) by `scripts/test`, which names a file in `HORN_SKIP_LOG` for such lines.
pub fn skip(test: &str, reason: &str) {
    let line = format!("SKIPPED {test}: {reason}");
    eprintln!("{line}");
    if let Ok(path) = std::env::var("HORN_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// Polls `done` every 50 ms until it holds; fails the test with `what` if it has not
/// within `within`.
pub fn eventually(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let since = std::time::Instant::now();
    while !done() {
        assert!(since.elapsed() < within, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
