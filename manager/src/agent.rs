//! The node agent (`hornd node`): one per machine. It registers the node and its
//! disks with the manager (capacity and free space measured with statvfs), renews the
//! node's lease well within its time to live, and registers again when the manager
//! has lost it (a manager restart past the lease, a long partition). Between
//! renewals it reports the instances it runs and asks for its work (`SyncNode`, a
//! call that waits for the work to change), and runs the replica and engine
//! instances the work names ([`crate::instances`]).
//!
//! The agent never decides anything about placement; it reports what it sees and
//! does what the manager's work says. It acts only on work from the cluster it first
//! joined (the id is kept in its state directory): a node pointed at another
//! manager's store by mistake does not delete its replicas. If the manager cannot be
//! reached it keeps trying, every second, and says so in its log; its instances go on
//! serving meanwhile.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use horn_proto::manager_api as pb;

use crate::ctl::{connect_with, Client};

/// A disk the agent reports: a directory, with tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentDisk {
    /// The directory (created if missing).
    pub path: PathBuf,
    /// Its tags.
    pub tags: BTreeSet<String>,
}

impl std::str::FromStr for AgentDisk {
    type Err = String;

    /// `PATH` or `PATH:TAG,TAG`.
    fn from_str(s: &str) -> Result<AgentDisk, String> {
        let (path, tags) = match s.split_once(':') {
            Some((p, t)) => (
                p,
                t.split(',')
                    .filter(|t| !t.is_empty())
                    .map(str::to_string)
                    .collect(),
            ),
            None => (s, BTreeSet::new()),
        };
        if !path.starts_with('/') {
            return Err(format!(
                "disk {path:?}: give an absolute path (PATH or PATH:TAG,TAG)"
            ));
        }
        Ok(AgentDisk {
            path: PathBuf::from(path),
            tags,
        })
    }
}

/// The name of a node's credentials in its agent's `STATE/tls`.
pub const NODE_CREDENTIALS: &str = "node";

/// The node's credentials: those in `state/tls` if they are this node's, or else
/// new ones, got by joining the cluster at `manager` with the token `joining` gives
/// (with the CA's certificate, to check the manager by), and kept there.
pub fn node_credentials(
    manager: &str,
    joining: impl FnOnce() -> Result<(String, String)>,
    node: &str,
    address: &str,
    state: &Path,
) -> Result<horn_pki::Credentials> {
    let dir = state.join("tls");
    if let Ok(c) = horn_pki::Credentials::load(&dir, NODE_CREDENTIALS) {
        if c.role().ok() == Some(horn_pki::Role::Node(node.to_string())) {
            return Ok(c);
        }
        tracing::warn!(dir = %dir.display(), "the credentials kept are not this node's; joining again");
    }
    let ips = address
        .parse::<std::net::SocketAddr>()
        .map(|a| vec![a.ip().to_string()])
        .unwrap_or_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (ca_pem, token) = joining()?;
    let c = rt.block_on(crate::ctl::join(manager, &ca_pem, &token, node, ips))?;
    c.save(&dir, NODE_CREDENTIALS)?;
    tracing::info!(
        node,
        "joined the cluster: the node's certificate is kept in {}",
        dir.display()
    );
    Ok(c)
}

/// Renews the node's certificate through `client` once it is due, or `now` (`true`: it was)
/// ([`horn_pki::Credentials::renewal_due`]), and keeps the new one in its place.
fn renew_if_due(
    rt: &tokio::runtime::Runtime,
    client: &mut Client,
    live: &horn_pki::LiveCredentials,
    ips: &[String],
    now: bool,
) -> Result<bool> {
    let current = live.current();
    if !now && !current.renewal_due_now()? {
        return Ok(false);
    }
    let fresh = rt.block_on(crate::ctl::renew(client, &current, ips.to_vec()))?;
    live.replace(&fresh)?;
    tracing::info!(until = %fresh.not_after()?, "renewed the node's certificate");
    Ok(true)
}

/// Keeps the CA certificates the cluster trusts now (`trust_pem`, from a heartbeat's
/// reply; empty: no news) as the node's `ca.pem`: a CA roll adds a new CA there
/// before it signs, and retires the old one at its end.
fn keep_trust(live: &horn_pki::LiveCredentials, trust_pem: &str) -> Result<()> {
    let current = live.current();
    if trust_pem.is_empty() || trust_pem == current.ca_pem {
        return Ok(());
    }
    let updated = horn_pki::Credentials {
        ca_pem: trust_pem.to_string(),
        ..current
    };
    let trusted = updated.trusted()?;
    live.replace(&updated)?;
    tracing::info!(cas = ?trusted, "the cluster's CA certificates changed: the node trusts them now");
    Ok(())
}

/// What the agent says of its node.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The manager's address.
    pub manager: String,
    /// The node's credentials (its certificate says `horn:node:NAME`).
    pub credentials: horn_pki::Credentials,
    /// The node's name.
    pub name: String,
    /// The address the node's agent serves at (reported to the manager).
    pub address: String,
    /// Its zone (empty: none).
    pub zone: String,
    /// Its tags.
    pub tags: BTreeSet<String>,
    /// Its disks.
    pub disks: Vec<AgentDisk>,
    /// Where it keeps its instances' records and logs, and the cluster's id.
    pub state: PathBuf,
    /// The `hornd` binary its instances run.
    pub hornd: PathBuf,
}

/// The cluster id the agent joined, kept in `state/cluster-id`: work from another
/// cluster is refused.
fn check_cluster(state: &Path, id: &str) -> Result<()> {
    let path = state.join("cluster-id");
    match std::fs::read_to_string(&path) {
        Ok(known) if known.trim() == id => Ok(()),
        Ok(known) => anyhow::bail!(
            "this node belongs to cluster {} ({}), and the manager serves cluster {id}: its work is refused (remove {} to join the new cluster)",
            known.trim(),
            path.display(),
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(&path, format!("{id}\n")).with_context(|| format!("cannot write {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Capacity and free space of the filesystem holding `path`, in bytes.
fn measure(path: &std::path::Path) -> Result<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(path)
        .with_context(|| format!("cannot measure disk {}", path.display()))?;
    let unit = st.fragment_size();
    Ok((st.blocks() * unit, st.blocks_available() * unit))
}

fn registration(cfg: &AgentConfig) -> Result<pb::Node> {
    let mut disks = Vec::new();
    for d in &cfg.disks {
        std::fs::create_dir_all(&d.path)
            .with_context(|| format!("cannot create disk directory {}", d.path.display()))?;
        let (capacity, available) = measure(&d.path)?;
        disks.push(pb::Disk {
            path: d.path.display().to_string(),
            tags: d.tags.iter().cloned().collect(),
            reserved: 0,
            allow_scheduling: true,
            capacity,
            available,
            scheduled: 0,
        });
    }
    Ok(pb::Node {
        name: cfg.name.clone(),
        address: cfg.address.clone(),
        zone: cfg.zone.clone(),
        tags: cfg.tags.iter().cloned().collect(),
        cordoned: false,
        disks,
        state: String::new(),
        lease_secs: 0,
        ..Default::default()
    })
}

/// Each disk's capacity and free space now; a disk that cannot be measured (its
/// directory gone, its filesystem unmounted) is left out, and so cannot be scheduled.
fn measured_disks(disks: &[PathBuf]) -> Vec<pb::Disk> {
    disks
        .iter()
        .filter_map(|d| {
            let (capacity, available) = measure(d).ok()?;
            Some(pb::Disk {
                path: d.display().to_string(),
                capacity,
                available,
                ..Default::default()
            })
        })
        .collect()
}

/// How long to wait before the next heartbeat: a third of the lease, at least 1 s.
fn heartbeat_every(lease_secs: u32) -> Duration {
    Duration::from_millis((u64::from(lease_secs) * 1000 / 3).max(1000))
}

/// Registers the node, keeps its lease and runs its work until `stop` receives (or
/// its sender goes). A registration the manager refuses (a bad disk, a bad name) ends
/// the agent with that error; an unreachable manager is retried.
pub fn run(cfg: AgentConfig, stop: Receiver<()>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::fs::create_dir_all(&cfg.state).with_context(|| format!("cannot create {}", cfg.state.display()))?;
    let ip = cfg
        .address
        .parse::<std::net::SocketAddr>()
        .with_context(|| format!("--address {}: give IP:PORT", cfg.address))?
        .ip();
    let mut instances = crate::instances::Instances::open(
        &cfg.state,
        ip,
        cfg.hornd.clone(),
        cfg.disks.iter().map(|d| d.path.clone()).collect(),
    )?;
    instances.under_manager(&cfg.manager, &cfg.name, &cfg.credentials)?;
    // The node's credentials as kept in STATE/tls: renewed here before they expire,
    // and taken from there by its engines and replicas at each new connection.
    let live = instances
        .credentials()
        .cloned()
        .context("the node's credentials are not kept")?;
    let ips = vec![ip.to_string()];
    let mut disks: Vec<PathBuf> = cfg.disks.iter().map(|d| d.path.clone()).collect();
    let mut client: Option<Client> = None;
    let mut registered = false;
    let mut heartbeat_at = Instant::now();
    let mut seen = 0u64;
    let mut wait = Duration::ZERO;
    let mut reconnect = false;
    loop {
        match stop.recv_timeout(wait) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return Ok(()),
            Err(RecvTimeoutError::Timeout) => {}
        }
        wait = Duration::from_secs(1);
        if std::mem::take(&mut reconnect) {
            client = None;
        }
        let c = match client.as_mut() {
            Some(c) => c,
            None => match rt.block_on(connect_with(&cfg.manager, &live.current())) {
                Ok(c) => client.insert(c),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "the manager is unreachable; retrying");
                    continue;
                }
            },
        };
        if !registered || Instant::now() >= heartbeat_at {
            let reply = if registered {
                rt.block_on(c.node_heartbeat(pb::NodeRef {
                    name: cfg.name.clone(),
                    trusted: live.current().trusted().unwrap_or_default(),
                }))
            } else {
                rt.block_on(c.register_node(registration(&cfg)?))
            };
            match reply {
                Ok(node) => {
                    let node = node.into_inner();
                    if !registered {
                        tracing::info!(node = %cfg.name, disks = node.disks.len(), lease_secs = node.lease_secs, "registered");
                        println!("hornd node: {} registered with {}", cfg.name, cfg.manager);
                    }
                    registered = true;
                    heartbeat_at = Instant::now() + heartbeat_every(node.lease_secs);
                    if let Err(e) = keep_trust(&live, &node.trust_pem) {
                        tracing::warn!(error = %format!("{e:#}"), "cannot keep the cluster's CA certificates");
                    }
                    match renew_if_due(&rt, c, &live, &ips, node.renew_certificate) {
                        // Connect again, presenting the new certificate.
                        Ok(renewed) => reconnect = renewed,
                        Err(e) => {
                            tracing::warn!(error = %format!("{e:#}"), "renewing the node's certificate failed; trying again at the next heartbeat")
                        }
                    }
                }
                Err(s) if s.code() == tonic::Code::NotFound && registered => {
                    tracing::warn!(node = %cfg.name, "the manager lost the node's lease; registering again");
                    registered = false;
                    wait = Duration::ZERO;
                    continue;
                }
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::InvalidArgument
                            | tonic::Code::Unauthenticated
                            | tonic::Code::AlreadyExists
                    ) =>
                {
                    anyhow::bail!(
                        "the manager at {} refused node {}: {}",
                        cfg.manager,
                        cfg.name,
                        s.message()
                    );
                }
                Err(s) => {
                    tracing::warn!(error = %s.message(), "a call to the manager failed; retrying");
                    client = None;
                    continue;
                }
            }
        }
        // Report, and wait for new work: briefly while an instance is starting (its
        // state is news), else until the next heartbeat is due.
        instances.reap();
        let reported = instances.status(&rt);
        let settling = reported
            .iter()
            .any(|i| i.state == "starting" || i.state == "stopping");
        let until_heartbeat = heartbeat_at.saturating_duration_since(Instant::now());
        let wait_ms = if settling {
            100
        } else {
            until_heartbeat.min(Duration::from_secs(2)).as_millis() as u32
        };
        let status = pb::NodeStatus {
            node: cfg.name.clone(),
            instances: reported,
            seen_revision: seen,
            wait_ms,
            disks: measured_disks(&disks),
        };
        match rt.block_on(c.sync_node(status)) {
            Ok(work) => {
                let work = work.into_inner();
                match check_cluster(&cfg.state, &work.cluster_id) {
                    Ok(()) => {
                        // The node's disks as the manager has them: the command line's
                        // and those added with hornctl.
                        let wanted: Vec<PathBuf> = work.disks.iter().map(PathBuf::from).collect();
                        if !wanted.is_empty() && wanted != disks {
                            for d in &wanted {
                                if let Err(e) = std::fs::create_dir_all(d) {
                                    tracing::warn!(disk = %d.display(), error = %e, "cannot create a disk directory");
                                }
                            }
                            tracing::info!(disks = ?wanted, "the node's disks");
                            disks = wanted;
                            instances.set_disks(disks.clone());
                        }
                        instances.apply(&work, &rt);
                        seen = work.revision;
                        wait = if settling {
                            Duration::from_millis(100)
                        } else {
                            Duration::ZERO
                        };
                    }
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "work refused"),
                }
            }
            Err(s) if s.code() == tonic::Code::NotFound => {
                registered = false;
                wait = Duration::ZERO;
            }
            Err(s) => {
                tracing::warn!(error = %s.message(), "a call to the manager failed; retrying");
                client = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_parse_with_tags_and_must_be_absolute() {
        let d: AgentDisk = "/mnt/nvme:ssd,fast".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/mnt/nvme"));
        assert_eq!(d.tags, BTreeSet::from(["fast".to_string(), "ssd".to_string()]));
        assert!("relative".parse::<AgentDisk>().unwrap_err().contains("absolute"));
        assert_eq!(heartbeat_every(15), Duration::from_secs(5));
        assert_eq!(heartbeat_every(1), Duration::from_secs(1));
    }
}
