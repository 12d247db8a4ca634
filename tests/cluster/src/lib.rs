//! # horn-cluster: a Horn cluster on one machine, in network namespaces
//!
//! The cluster tests (`tests/cluster/tests/`) and `horn-bench cluster` need several
//! machines; this machine has one kernel but network namespaces. A [`Cluster`] is a
//! manager (`hornd manager`, in the caller's namespace) and N node agents
//! (`hornd node`), each in a namespace of its own with its own address, disk and state
//! directory. Every node namespace is joined to a bridge in the caller's namespace by a
//! veth pair, so the nodes reach the manager and one another, and the caller reaches
//! every node (an iSCSI initiator in a test, for one). [`Cluster::cut`] takes a node's
//! link down, as a pulled cable would: the node, its agent and every instance on it are
//! cut off from everything else at once.
//!
//! This is a folder of its own (`tests/cluster/`), not a module of the manager's
//! tests, because the benchmark builds the same cluster. It uses the `hornd` and
//! `hornctl` binaries next to the running executable (`target/debug` or
//! `target/release`), as built by `cargo build` or `cargo test`.
//!
//! Needs root and `ip netns`; [`Cluster::unavailable`] says why not when they are
//! missing, for the caller to skip with that reason.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Runs `ip ARGS`; the error holds what it printed.
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

/// The namespaces, veth pairs and bridge of one cluster, removed when dropped.
pub struct Net {
    prefix: String,
    subnet: u32,
    nodes: usize,
}

static NETS: AtomicU32 = AtomicU32::new(0);

impl Net {
    /// A bridge `PREFIXbr` at 10.79.S.1/24 and namespaces `PREFIXn1`.. with node I at
    /// 10.79.S.(10+I); S differs between the clusters of this process and, most
    /// likely, of others.
    pub fn build(nodes: usize) -> Result<Net, String> {
        let n = NETS.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("hc{}x{n}", std::process::id() % 100_000);
        let subnet = (std::process::id() % 60) * 4 + n % 4 + 1;
        let net = Net {
            prefix,
            subnet,
            nodes: 0,
        };
        let mut net = net;
        let br = net.bridge();
        ip(&["link", "add", &br, "type", "bridge"])?;
        ip(&["addr", "add", &format!("10.79.{subnet}.1/24"), "dev", &br])?;
        ip(&["link", "set", &br, "up"])?;
        for i in 1..=nodes {
            let ns = net.ns(i);
            ip(&["netns", "add", &ns])?;
            net.nodes = i;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let (host, peer) = (net.host_link(i), format!("{}p{i}", net.prefix));
            ip(&[
                "link", "add", &host, "type", "veth", "peer", "name", &peer, "netns", &ns,
            ])?;
            ip(&["link", "set", &host, "master", &br])?;
            ip(&["link", "set", &host, "up"])?;
            let addr = format!("{}/24", net.node_ip(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", &peer])?;
            ip(&["-n", &ns, "link", "set", &peer, "up"])?;
        }
        Ok(net)
    }

    fn bridge(&self) -> String {
        format!("{}br", self.prefix)
    }

    fn host_link(&self, i: usize) -> String {
        format!("{}h{i}", self.prefix)
    }

    /// Node `i`'s namespace (from 1).
    pub fn ns(&self, i: usize) -> String {
        format!("{}n{i}", self.prefix)
    }

    /// Node `i`'s address.
    pub fn node_ip(&self, i: usize) -> String {
        format!("10.79.{}.{}", self.subnet, 10 + i)
    }

    /// The bridge's address: the caller's side, where the manager listens.
    pub fn host_ip(&self) -> String {
        format!("10.79.{}.1", self.subnet)
    }

    /// Takes node `i`'s link down (`up`: back up).
    pub fn link(&self, i: usize, up: bool) -> Result<(), String> {
        ip(&["link", "set", &self.host_link(i), if up { "up" } else { "down" }])
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for i in 1..=self.nodes {
            // Deleting the host side deletes its peer; the namespace's own cleanup
            // may come later.
            let _ = ip(&["link", "del", &self.host_link(i)]);
            let _ = ip(&["netns", "del", &self.ns(i)]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}

/// Where `hornd` and `hornctl` are: next to the running executable, or one folder up
/// (a test binary runs from `target/PROFILE/deps`).
pub fn binaries() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        if d.join("hornd").is_file() && d.join("hornctl").is_file() {
            return Ok(d);
        }
        dir = d.parent().map(Path::to_path_buf);
        if dir.as_ref().is_some_and(|p| p.ends_with("target")) {
            break;
        }
    }
    Err(format!(
        "hornd and hornctl are not built next to {} (cargo build -p horn-manager)",
        exe.display()
    ))
}

/// A node agent's process, and the node's directories.
struct Node {
    agent: Option<Child>,
    dir: PathBuf,
}

/// A manager and N node agents, each node in a namespace of its own. Dropping it
/// kills every process it started and every instance the agents started, and
/// removes the namespaces.
pub struct Cluster {
    /// The namespaces and links.
    pub net: Net,
    /// The manager's directory (its store, token), and the nodes' under it.
    pub data: tempfile::TempDir,
    manager: Option<Child>,
    /// The manager's address.
    pub manager_addr: String,
    nodes: Vec<Node>,
    bin: PathBuf,
}

impl Cluster {
    /// Why a cluster cannot be built here (not root, no `ip netns`, no binaries), if
    /// it cannot.
    pub fn unavailable() -> Option<String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Some("a cluster of network namespaces needs root; CI runs it as root".into());
        }
        if let Err(e) = Command::new("ip").args(["netns", "list"]).output() {
            return Some(format!("`ip netns` is not available: {e}"));
        }
        binaries().err()
    }

    /// Creates the cluster's identity, starts the manager and `nodes` agents, and
    /// waits until every node is ready.
    pub fn start(nodes: usize) -> Result<Cluster, String> {
        Cluster::start_with(nodes, &[])
    }

    /// [`Cluster::start`] with `settings` (`NAME=VALUE`) set before the agents
    /// register (a node's lease length is taken at its registration).
    pub fn start_with(nodes: usize, settings: &[&str]) -> Result<Cluster, String> {
        let bin = binaries()?;
        let net = Net::build(nodes)?;
        let data = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut c = Cluster {
            net,
            data,
            manager: None,
            manager_addr: String::new(),
            nodes: (1..=nodes)
                .map(|_| Node {
                    agent: None,
                    dir: PathBuf::new(),
                })
                .collect(),
            bin,
        };
        let init = c.hornctl(&["cluster", "init", "--data", &c.data.path().display().to_string()]);
        if !init.status.success() {
            return Err(format!(
                "hornctl cluster init: {}",
                String::from_utf8_lossy(&init.stderr)
            ));
        }
        c.start_manager(&format!("{}:0", c.net.host_ip()))?;
        // The nodes' disks share this machine's disk with everything else: place
        // replicas however full it is (the default keeps 25% free).
        let mut set = vec!["settings", "set", "minimal-available-percent=0"];
        set.extend_from_slice(settings);
        c.json(&set)?;
        for i in 1..=nodes {
            c.nodes[i - 1].dir = c.data.path().join(format!("n{i}"));
            c.start_agent(i)?;
        }
        c.wait_ready(nodes, Duration::from_secs(30))?;
        Ok(c)
    }

    /// Starts the manager on `listen` and reads its address.
    pub fn start_manager(&mut self, listen: &str) -> Result<(), String> {
        let mut child = Command::new(self.bin.join("hornd"))
            .args(["manager", "--data"])
            .arg(self.data.path())
            .args(["--listen", listen])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start hornd manager: {e}"))?;
        let mut line = String::new();
        let _ = BufReader::new(child.stdout.as_mut().expect("piped")).read_line(&mut line);
        // "hornd manager: cluster ID on ADDR, specs in PATH"
        let addr = line
            .split_once(" on ")
            .and_then(|(_, rest)| rest.split_once(','))
            .map(|(a, _)| a.to_string())
            .ok_or_else(|| format!("hornd manager did not start: {line}"))?;
        self.manager_addr = addr;
        self.manager = Some(child);
        Ok(())
    }

    /// SIGKILLs the manager.
    pub fn kill_manager(&mut self) {
        if let Some(mut m) = self.manager.take() {
            let _ = m.kill();
            let _ = m.wait();
        }
    }

    /// Starts node `i`'s agent in its namespace (its output appended to `agent.log`
    /// in its directory).
    pub fn start_agent(&mut self, i: usize) -> Result<(), String> {
        let dir = self.nodes[i - 1].dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))
            .map_err(|e| e.to_string())?;
        let manager = self.manager_addr.clone();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.net.ns(i)])
            .arg(self.bin.join("hornd"))
            .args(["node", "--manager", &manager, "--name", &format!("n{i}")])
            .args(["--address", &format!("{}:9700", self.net.node_ip(i))])
            .arg("--token-file")
            .arg(self.data.path().join("cluster-token"))
            .arg("--disk")
            .arg(dir.join("disk"))
            .arg("--state")
            .arg(dir.join("state"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start node n{i}'s agent: {e}"))?;
        self.nodes[i - 1].agent = Some(child);
        Ok(())
    }

    /// SIGKILLs node `i`'s agent (its instances run on).
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut a) = self.nodes[i - 1].agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
    }

    /// Node `i`'s directory: `disk/`, `state/`, `agent.log`.
    pub fn node_dir(&self, i: usize) -> &Path {
        &self.nodes[i - 1].dir
    }

    /// The supervisors' pids in node `i`'s instance records, by instance name.
    pub fn instances(&self, i: usize) -> Vec<(String, u32)> {
        let dir = self.node_dir(i).join("state/instances");
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut out: Vec<(String, u32)> = entries
            .filter_map(|e| {
                let e = e.ok()?;
                let r: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(e.path().join("instance.json")).ok()?).ok()?;
                Some((
                    e.file_name().to_string_lossy().into_owned(),
                    r["pid"].as_u64()? as u32,
                ))
            })
            .collect();
        out.sort();
        out
    }

    /// SIGKILLs every instance on node `i` (each supervisor's process group).
    pub fn kill_instances(&self, i: usize) {
        for (_, pid) in self.instances(i) {
            // SAFETY: killpg takes no pointers; the group is the supervisor's own.
            unsafe { libc::killpg(pid as i32, libc::SIGKILL) };
        }
    }

    /// Runs `hornctl ARGS` against the manager.
    pub fn hornctl(&self, args: &[&str]) -> Output {
        Command::new(self.bin.join("hornctl"))
            .args(args)
            .args(["--manager", &self.manager_addr, "--token-file"])
            .arg(self.data.path().join("cluster-token"))
            .env_remove("HORN_TOKEN")
            .output()
            .expect("hornctl runs")
    }

    /// `hornctl ARGS --json`, parsed; an error holds what it printed.
    pub fn json(&self, args: &[&str]) -> Result<serde_json::Value, String> {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.hornctl(&all);
        if !out.status.success() {
            return Err(format!(
                "hornctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("hornctl {}: {e}", args.join(" ")))
    }

    /// Waits until `n` nodes are ready.
    pub fn wait_ready(&self, n: usize, within: Duration) -> Result<(), String> {
        let since = Instant::now();
        loop {
            let ready = self
                .json(&["node", "list"])
                .map(|v| {
                    v.as_array()
                        .map_or(0, |a| a.iter().filter(|n| n["state"] == "ready").count())
                })
                .unwrap_or(0);
            if ready >= n {
                return Ok(());
            }
            if since.elapsed() > within {
                return Err(format!("{ready} of {n} nodes ready after {within:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 1..=self.nodes.len() {
            self.kill_agent(i);
            self.kill_instances(i);
        }
        self.kill_manager();
    }
}
