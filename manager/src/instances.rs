//! The instances a node agent runs: replica daemons (`hornd replica`) and volume
//! engines (`hornd engine`), each under a `hornd supervise` of its own.
//!
//! - **Supervised.** The supervisor restarts a crashed daemon with the same command
//!   line, so the same addresses (a replica keeps its ports, an engine serving ublk
//!   reattaches to its device). A supervisor that gives up, or a daemon that cannot
//!   start, is reported `failed` with the last line of its log, and started again
//!   after a pause that grows to a minute.
//! - **Outliving the agent.** Supervisors run in process groups of their own, so
//!   an agent that stops, crashes or is upgraded leaves them serving. Each instance
//!   has a directory, `STATE/instances/NAME/`, with its record (`instance.json`: the
//!   command, addresses and the supervisor's pid) and its logs. A new agent reads the
//!   records and adopts every supervisor still alive (its pid running a command line
//!   that names the instance's directory); it starts again only those that are gone.
//! - **Removed with their spec.** A replica that is no longer in the node's work (its
//!   volume was deleted, or it was replaced) is stopped and its files removed; an
//!   engine whose volume was detached is stopped with SIGTERM (it gives its replicas
//!   up cleanly), then SIGKILL after 20 s.
//!
//! The agent never chooses what runs: [`Instances::apply`] follows the manager's work
//! and [`Instances::status`] reports what runs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::ClientTlsConfig;

use anyhow::{bail, Context, Result};
use horn_proto::manager_api as pb;
use serde::{Deserialize, Serialize};

use crate::runtime::{ENGINE, REPLICA, RUNNING};

const RECORD: &str = "instance.json";
/// Where an instance's daemon writes its log, in its directory.
pub const DAEMON_LOG: &str = "daemon.log";
const SUPERVISOR_LOG: &str = "supervisor.log";

/// What an instance is, as kept in its record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    kind: String,
    volume: String,
    /// A replica's id (empty for an engine).
    replica: String,
    /// A replica's directory.
    replica_dir: Option<PathBuf>,
    /// A replica's data-wire address; unused for an engine.
    data_address: String,
    /// The control service's address.
    control_address: String,
    /// An engine's frontend, "iscsi" or "ublk".
    frontend: String,
    /// An iSCSI engine's portal and IQN.
    portal: String,
    iqn: String,
    /// An engine's replicas when it started: id to (data, control) address.
    replicas: BTreeMap<String, (String, String)>,
    /// The `hornd supervise` command line.
    command: Vec<String>,
    /// The supervisor's pid (0: not started).
    pid: u32,
}

/// An instance and what the agent knows of it.
struct Instance {
    dir: PathBuf,
    record: Record,
    /// The supervisor, when this agent started it (to reap it).
    child: Option<Child>,
    /// When it may be started again after failing, and the pause after the next failure.
    retry_at: Option<Instant>,
    pause: Duration,
    /// An engine's replicas this agent asked it to add, and when (one try each 2 s).
    added: BTreeMap<String, Instant>,
    /// An engine's replicas this agent asked it to drop (their node down), and when
    /// (one try each 2 s).
    dropped: BTreeMap<String, Instant>,
    /// Being stopped (no longer in the work): SIGTERM sent; SIGKILL at this time.
    stopping: Option<Instant>,
}

/// The node's instances.
pub struct Instances {
    /// `STATE/instances`.
    dir: PathBuf,
    hornd: PathBuf,
    ip: IpAddr,
    /// The agent's disks: a replica's directory must be under one.
    disks: Vec<PathBuf>,
    by_name: BTreeMap<String, Instance>,
    /// The flags that put an engine under the manager as its membership authority.
    authority: Vec<String>,
    /// The node's credentials and their directory, under a manager: replicas and
    /// engines serve their control services over mutual TLS with them, and the
    /// agent calls its engines so.
    tls: Option<horn_pki::LiveCredentials>,
}

fn name_of(kind: &str, volume: &str, replica: &str) -> String {
    if kind == ENGINE {
        format!("engine-{volume}")
    } else {
        format!("replica-{volume}-{replica}")
    }
}

/// Whether `pid` runs a command line that names `marker` (so a reused pid is not
/// taken for the instance, and a zombie, whose command line is empty, is dead).
fn alive(pid: u32, marker: &Path) -> bool {
    if pid == 0 {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let marker = marker.as_os_str().as_encoded_bytes();
    cmdline
        .split(|&b| b == 0)
        .any(|arg| arg.windows(marker.len()).any(|w| w == marker))
}

/// The last non-empty line of `path` (at most its last 4 KiB are read).
fn last_line(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(4096)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

/// Whether something accepts connections at `addr`.
fn listening(addr: &str) -> bool {
    addr.parse::<SocketAddr>()
        .is_ok_and(|a| TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_ok())
}

impl Instances {
    /// Reads the records under `state/instances` and adopts every supervisor still
    /// running; the others are started again by the next [`Instances::apply`] that
    /// still wants them.
    pub fn open(state: &Path, ip: IpAddr, hornd: PathBuf, disks: Vec<PathBuf>) -> Result<Instances> {
        let dir = state.join("instances");
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut by_name = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))? {
            let entry = entry?;
            let path = entry.path();
            let record: Record = match std::fs::read(path.join(RECORD))
                .map_err(anyhow::Error::from)
                .and_then(|b| Ok(serde_json::from_slice(&b)?))
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(dir = %path.display(), error = %e, "an instance directory without a readable record: left alone");
                    continue;
                }
            };
            let name = entry.file_name().to_string_lossy().into_owned();
            if alive(record.pid, &path) {
                tracing::info!(instance = %name, pid = record.pid, "adopted a running instance");
            } else {
                tracing::info!(instance = %name, "an instance's supervisor is gone: it starts again if still wanted");
            }
            by_name.insert(
                name,
                Instance {
                    dir: path,
                    record,
                    child: None,
                    retry_at: None,
                    pause: Duration::from_secs(1),
                    added: BTreeMap::new(),
                    dropped: BTreeMap::new(),
                    stopping: None,
                },
            );
        }
        Ok(Instances {
            dir,
            hornd,
            ip,
            disks,
            by_name,
            authority: Vec::new(),
            tls: None,
        })
    }

    /// Engines started from now on run under the manager at `manager` as their
    /// membership authority (`hornd engine --manager`), as node `node`, with the
    /// node's `credentials`, which go to `STATE/tls` (the key readable by root only)
    /// for them to read.
    pub fn under_manager(
        &mut self,
        manager: &str,
        node: &str,
        credentials: &horn_pki::Credentials,
    ) -> Result<()> {
        let state = self.dir.parent().unwrap_or(&self.dir);
        let dir = state.join("tls");
        credentials.save(&dir, crate::agent::NODE_CREDENTIALS)?;
        self.tls = Some(horn_pki::LiveCredentials::open(
            &dir,
            crate::agent::NODE_CREDENTIALS,
        )?);
        self.authority = vec![
            "--manager".into(),
            manager.into(),
            "--node".into(),
            node.into(),
            "--credentials".into(),
            dir.display().to_string(),
        ];
        Ok(())
    }

    /// The node's credentials, under a manager (as on disk now).
    pub fn credentials(&self) -> Option<&horn_pki::LiveCredentials> {
        self.tls.as_ref()
    }

    /// How the agent calls its engines: over mutual TLS with the node's credentials,
    /// under a manager.
    fn client_tls(&self) -> Option<ClientTlsConfig> {
        self.tls.as_ref().map(|c| c.client_tls(horn_pki::NODE_NAME))
    }

    /// The node's disks (as the manager has them now): a replica's directory must be
    /// under one.
    pub fn set_disks(&mut self, disks: Vec<PathBuf>) {
        self.disks = disks;
    }

    /// How many instances the agent holds.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The pids of the running supervisors, by instance name (for tests and logs).
    pub fn pids(&mut self) -> BTreeMap<String, u32> {
        let names: Vec<String> = self.by_name.keys().cloned().collect();
        let mut out = BTreeMap::new();
        for n in names {
            if self.is_alive(&n) {
                out.insert(n.clone(), self.by_name[&n].record.pid);
            }
        }
        out
    }

    fn is_alive(&mut self, name: &str) -> bool {
        let Some(i) = self.by_name.get_mut(name) else {
            return false;
        };
        if let Some(c) = i.child.as_mut() {
            // A child of this agent that has not exited is alive, even before it has
            // exec'd (its command line is still the agent's then).
            match c.try_wait() {
                Ok(None) => return true,
                Ok(Some(_)) => {
                    i.child = None;
                    return false;
                }
                Err(_) => {}
            }
        }
        alive(i.record.pid, &i.dir)
    }

    /// A port on the node's address that nothing listens on and no record holds.
    fn free_port(&self, taken: &mut BTreeSet<u16>) -> Result<String> {
        for r in self.by_name.values() {
            for a in [
                &r.record.data_address,
                &r.record.control_address,
                &r.record.portal,
            ] {
                if let Ok(a) = a.parse::<SocketAddr>() {
                    taken.insert(a.port());
                }
            }
        }
        for _ in 0..100 {
            let l = TcpListener::bind((self.ip, 0))
                .with_context(|| format!("cannot bind a port on {}", self.ip))?;
            let port = l.local_addr()?.port();
            if taken.insert(port) {
                return Ok(SocketAddr::new(self.ip, port).to_string());
            }
        }
        bail!("no free port on {}", self.ip)
    }

    /// Starts the instances `work` wants that do not run (new ones, and failed ones
    /// whose pause has passed) and stops those it no longer wants.
    pub fn apply(&mut self, work: &pb::NodeWork, rt: &tokio::runtime::Runtime) {
        let mut wanted = BTreeSet::new();
        for r in &work.replicas {
            let name = name_of(REPLICA, &r.volume, &r.id);
            wanted.insert(name.clone());
            if self.is_stopping(&name) {
                continue;
            }
            if let Err(e) = self.ensure_replica(&name, r) {
                tracing::warn!(instance = %name, error = %format!("{e:#}"), "cannot start a replica");
            }
        }
        for e in &work.engines {
            let name = name_of(ENGINE, &e.volume, "");
            wanted.insert(name.clone());
            if self.is_stopping(&name) {
                continue;
            }
            if let Err(err) = self.ensure_engine(&name, e) {
                tracing::warn!(instance = %name, error = %format!("{err:#}"), "cannot start an engine");
            } else if let Err(err) = self.follow_replicas(&name, e, rt) {
                tracing::warn!(instance = %name, error = %format!("{err:#}"), "cannot bring an engine's replicas in");
            }
        }
        let unwanted: Vec<String> = self
            .by_name
            .keys()
            .filter(|n| !wanted.contains(*n))
            .cloned()
            .collect();
        // Engines first: a replica of a volume being detached and deleted at once
        // outlives its engine.
        let (engines, replicas): (Vec<String>, Vec<String>) = unwanted
            .into_iter()
            .partition(|n| self.by_name[n].record.kind == ENGINE);
        for name in engines.into_iter().chain(replicas) {
            self.stop(&name);
        }
        self.reap();
    }

    /// Finishes the stops under way: an instance whose supervisor has exited is
    /// removed (its directory, and a replica's files); one still running at its
    /// deadline gets SIGKILL, its whole group.
    pub fn reap(&mut self) {
        let now = Instant::now();
        let stopping: Vec<String> = self
            .by_name
            .iter()
            .filter(|(_, i)| i.stopping.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        for name in stopping {
            if self.is_alive(&name) {
                let i = &self.by_name[&name];
                if i.stopping.is_some_and(|t| now >= t) {
                    tracing::warn!(instance = %name, "did not stop within 20 s of SIGTERM: killing it");
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(i.record.pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                continue;
            }
            if let Err(e) = self.remove(&name) {
                tracing::warn!(instance = %name, error = %format!("{e:#}"), "cannot remove an instance");
            }
        }
    }

    fn ensure_replica(&mut self, name: &str, w: &pb::ReplicaWork) -> Result<()> {
        let secret = self.secret_path(&format!("{}-{}.secret", w.volume, w.id));
        if !w.secret.is_empty() {
            self.write_secret(&secret, &w.secret)?;
        }
        if !self.by_name.contains_key(name) {
            let disk = PathBuf::from(&w.disk);
            if !self.disks.contains(&disk) {
                bail!("disk {} is not one of this node's disks", w.disk);
            }
            let replica_dir = disk.join("replicas").join(format!("{}-{}", w.volume, w.id));
            let mut taken = BTreeSet::new();
            let data = self.free_port(&mut taken)?;
            let control = self.free_port(&mut taken)?;
            let dir = self.dir.join(name);
            let mut command = vec![
                "replica".to_string(),
                "--dir".into(),
                replica_dir.display().to_string(),
                "--listen".into(),
                data.clone(),
                "--control".into(),
                control.clone(),
                "--size".into(),
                w.size.to_string(),
                "--sector-size".into(),
                w.sector_size.to_string(),
            ];
            if !w.secret.is_empty() {
                command.extend(["--secret-file".into(), secret.display().to_string()]);
            }
            if let Some(c) = &self.tls {
                command.extend(["--credentials".into(), c.dir().display().to_string()]);
                if w.data_tls {
                    command.push("--data-tls".into());
                }
            }
            let record = Record {
                kind: REPLICA.into(),
                volume: w.volume.clone(),
                replica: w.id.clone(),
                replica_dir: Some(replica_dir),
                data_address: data,
                control_address: control,
                frontend: String::new(),
                portal: String::new(),
                iqn: String::new(),
                replicas: BTreeMap::new(),
                command,
                pid: 0,
            };
            self.create(name, dir, record)?;
        }
        self.start_if_down(name)
    }

    /// The command line of volume `w`'s engine, with its control address and (iSCSI)
    /// portal and IQN.
    fn engine_command(
        &self,
        w: &pb::EngineWork,
        control: &str,
        portal: &str,
        iqn: &str,
    ) -> Result<Vec<String>> {
        let mut command = vec![
            "engine".to_string(),
            "--name".into(),
            w.volume.clone(),
            "--control".into(),
            control.to_string(),
        ];
        if !w.volume_id.is_empty() {
            command.extend(["--volume".into(), w.volume_id.clone()]);
        }
        command.extend(self.authority.iter().cloned());
        if w.data_tls && self.tls.is_some() {
            command.push("--data-tls".into());
        }
        if !w.key.is_empty() {
            command.extend([
                "--key-file".into(),
                self.secret_path(&format!("{}.key", w.volume))
                    .display()
                    .to_string(),
            ]);
        }
        if w.frontend == "iscsi" {
            match w.chap_user.as_str() {
                "" => command.push("--no-chap".into()),
                user => command.extend([
                    "--chap-user".into(),
                    user.to_string(),
                    "--chap-secret-file".into(),
                    self.secret_path(&format!("{}.chap", w.volume))
                        .display()
                        .to_string(),
                ]),
            }
        }
        for r in &w.replicas {
            let local = if r.local { ",local" } else { "" };
            command.push("--replica".into());
            command.push(format!("{},{}{local}", r.data_address, r.control_address));
        }
        match w.frontend.as_str() {
            "iscsi" => command.extend([
                "--frontend".into(),
                "iscsi".into(),
                "--listen".into(),
                portal.to_string(),
                "--iqn".into(),
                iqn.to_string(),
            ]),
            "ublk" => command.extend(["--frontend".into(), "ublk".into()]),
            // Maintenance: the control service only.
            "none" => {}
            other => bail!("frontend {other:?} is not one this agent knows"),
        }
        Ok(command)
    }

    /// Where a secret file of an instance is kept while it runs (an encrypted
    /// volume's key, `VOLUME.key`; a replica's wire secret, `VOLUME-ID.secret`): on a
    /// memory filesystem, never on a disk, readable by its owner only; one directory
    /// per agent (by its state directory). See [`key_dir`].
    fn secret_path(&self, file: &str) -> PathBuf {
        agent_key_dir(&self.dir).join(file)
    }

    /// Writes `secret` to `path` for an instance to read (again after a reboot
    /// emptied `/run`).
    fn write_secret(&self, path: &Path, secret: &[u8]) -> Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        if std::fs::read(path).is_ok_and(|k| k == secret) {
            return Ok(());
        }
        let dir = path.parent().expect("a directory");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        write_private(path, secret)
    }

    fn ensure_engine(&mut self, name: &str, w: &pb::EngineWork) -> Result<()> {
        if !w.key.is_empty() {
            self.write_secret(&self.secret_path(&format!("{}.key", w.volume)), &w.key)?;
        }
        if !w.chap_user.is_empty() {
            self.write_secret(&self.secret_path(&format!("{}.chap", w.volume)), &w.chap_secret)?;
        }
        let replicas: BTreeMap<String, (String, String)> = w
            .replicas
            .iter()
            .map(|r| (r.id.clone(), (r.data_address.clone(), r.control_address.clone())))
            .collect();
        // An engine that is down starts again on the replicas its work names now (one
        // that failed to start on those running then may start on those running now:
        // a salvage waits for a replica that holds every acknowledged write).
        if self.by_name.contains_key(name) && !self.is_alive(name) {
            let i = &self.by_name[name];
            let (control, portal, iqn) = (
                i.record.control_address.clone(),
                i.record.portal.clone(),
                i.record.iqn.clone(),
            );
            if i.record.frontend == w.frontend {
                let command = self.engine_command(w, &control, &portal, &iqn)?;
                let i = self.by_name.get_mut(name).expect("checked");
                if i.record.command != command {
                    tracing::info!(instance = %name, replicas = ?replicas.keys().collect::<Vec<_>>(), "an engine that is down starts again on its replicas as they are now");
                    i.record.command = command;
                    i.record.replicas = replicas.clone();
                    // New inputs: no reason to wait out the last failure's pause.
                    i.retry_at = None;
                    i.pause = Duration::from_secs(1);
                    self.save(name)?;
                }
            }
        }
        if !self.by_name.contains_key(name) {
            let mut taken = BTreeSet::new();
            let control = self.free_port(&mut taken)?;
            let (mut portal, mut iqn) = (String::new(), String::new());
            if w.frontend == "iscsi" {
                portal = self.free_port(&mut taken)?;
                iqn = horn_iscsi::target::default_iqn(&w.volume);
            }
            let command = self.engine_command(w, &control, &portal, &iqn)?;
            let record = Record {
                kind: ENGINE.into(),
                volume: w.volume.clone(),
                replica: String::new(),
                replica_dir: None,
                data_address: String::new(),
                control_address: control,
                frontend: w.frontend.clone(),
                portal,
                iqn,
                replicas,
                command,
                pid: 0,
            };
            self.create(name, self.dir.join(name), record)?;
        }
        self.start_if_down(name)
    }

    /// Asks a running engine to add (and rebuild) each replica of its work that it
    /// does not hold RW or WO: a replacement placed since it started, or one of its
    /// own that failed and runs again (a delta rebuild then copies what it missed).
    fn follow_replicas(
        &mut self,
        name: &str,
        w: &pb::EngineWork,
        rt: &tokio::runtime::Runtime,
    ) -> Result<()> {
        if !self.is_alive(name) || !listening(&self.by_name[name].record.control_address) {
            return Ok(());
        }
        let control = self.by_name[name].record.control_address.clone();
        // Replicas whose node is down first: the drop is answered at once, and it
        // frees the engine from waiting on them (Info itself may be waiting).
        let now = Instant::now();
        let tls = self.client_tls();
        for id in &w.down_replicas {
            let i = self.by_name.get_mut(name).expect("alive");
            let Some((data, _)) = i.record.replicas.get(id).cloned() else {
                continue;
            };
            if i.dropped
                .get(id)
                .is_some_and(|t| now < *t + Duration::from_secs(2))
            {
                continue;
            }
            i.dropped.insert(id.clone(), now);
            match rt.block_on(drop_replica(&control, tls.clone(), &data)) {
                Ok(true) => {
                    tracing::warn!(instance = %name, replica = %id, address = %data, "its node is down: the engine dropped the replica")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(instance = %name, replica = %id, error = %format!("{e:#}"), "the engine did not drop a replica whose node is down")
                }
            }
        }
        let info = rt.block_on(engine_info(&control, tls.clone()))?;
        let held = |data: &str| {
            info.replicas
                .iter()
                .any(|r| !r.superseded && r.address == data && (r.mode == "RW" || r.mode == "WO"))
        };
        for r in &w.replicas {
            if held(&r.data_address) {
                continue;
            }
            let i = self.by_name.get_mut(name).expect("alive");
            if i.added
                .get(&r.id)
                .is_some_and(|t| now < *t + Duration::from_secs(2))
            {
                continue;
            }
            i.added.insert(r.id.clone(), now);
            let local = if r.local { ",local" } else { "" };
            let spec = format!("{},{}{local}", r.data_address, r.control_address);
            match rt.block_on(add_replica(&control, tls.clone(), &spec)) {
                Ok(id) => {
                    tracing::info!(instance = %name, replica = %r.id, address = %r.data_address, rebuild = id, "replica added to the engine; rebuilding");
                    i.record
                        .replicas
                        .insert(r.id.clone(), (r.data_address.clone(), r.control_address.clone()));
                    self.save(name)?;
                }
                Err(e) => {
                    tracing::warn!(instance = %name, replica = %r.id, error = %format!("{e:#}"), "the engine did not take the replica; trying again in 2 s")
                }
            }
        }
        Ok(())
    }

    fn create(&mut self, name: &str, dir: PathBuf, record: Record) -> Result<()> {
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        self.by_name.insert(
            name.to_string(),
            Instance {
                dir,
                record,
                child: None,
                retry_at: None,
                pause: Duration::from_secs(1),
                added: BTreeMap::new(),
                dropped: BTreeMap::new(),
                stopping: None,
            },
        );
        self.save(name)
    }

    fn save(&self, name: &str) -> Result<()> {
        let i = &self.by_name[name];
        let path = i.dir.join(RECORD);
        let tmp = i.dir.join(format!("{RECORD}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(&i.record)?)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    /// Starts the instance's supervisor unless it runs, or it failed and its pause
    /// has not passed.
    fn start_if_down(&mut self, name: &str) -> Result<()> {
        if self.is_alive(name) {
            return Ok(());
        }
        let hornd = self.hornd.clone();
        let i = self.by_name.get_mut(name).expect("created above");
        let now = Instant::now();
        match i.retry_at {
            Some(t) if t > now => return Ok(()),
            // It ran a good while: the pause starts over.
            Some(t) if now > t + Duration::from_secs(120) => i.pause = Duration::from_secs(1),
            Some(_) => {
                tracing::warn!(instance = %name, reason = %last_line(&i.dir.join(DAEMON_LOG)), "an instance had stopped: starting it again");
                i.pause = (i.pause * 2).min(Duration::from_secs(60));
            }
            None => {}
        }
        i.retry_at = Some(now + i.pause);
        let mut cmd = Command::new(&hornd);
        cmd.arg("--log-file")
            .arg(i.dir.join(SUPERVISOR_LOG))
            .arg("supervise")
            .arg("--")
            .arg(&hornd)
            .arg("--log-file")
            .arg(i.dir.join(DAEMON_LOG))
            .args(&i.record.command)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own group: the agent's end, or a signal to the agent's group, leaves
            // it serving.
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot run {}", hornd.display()))?;
        i.record.pid = child.id();
        i.child = Some(child);
        tracing::info!(instance = %name, pid = i.record.pid, "started");
        self.save(name)
    }

    fn is_stopping(&self, name: &str) -> bool {
        self.by_name.get(name).is_some_and(|i| i.stopping.is_some())
    }

    /// Removes a stopped instance's directory (and a replica's files).
    fn remove(&mut self, name: &str) -> Result<()> {
        let i = self.by_name.remove(name).expect("present");
        if let Some(d) = &i.record.replica_dir {
            if d.exists() {
                std::fs::remove_dir_all(d).with_context(|| format!("cannot remove {}", d.display()))?;
            }
        }
        std::fs::remove_dir_all(&i.dir).with_context(|| format!("cannot remove {}", i.dir.display()))?;
        // An encrypted volume's key and a target's CHAP secret go with its engine, a
        // wire secret with its replica.
        let files = match i.record.kind.as_str() {
            ENGINE => vec![
                format!("{}.key", i.record.volume),
                format!("{}.chap", i.record.volume),
            ],
            _ => vec![format!("{}-{}.secret", i.record.volume, i.record.replica)],
        };
        for file in files {
            let _ = std::fs::remove_file(self.secret_path(&file));
        }
        tracing::info!(instance = %name, "stopped and removed");
        Ok(())
    }

    /// Begins stopping an instance: SIGTERM to its supervisor (which passes it on
    /// and waits for its daemon: an engine gives its replicas up cleanly). The agent
    /// does not wait; [`Instances::reap`] finishes the stop.
    fn stop(&mut self, name: &str) {
        if self.is_stopping(name) {
            return;
        }
        if self.is_alive(name) {
            let pid = self.by_name[name].record.pid as i32;
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
            tracing::info!(instance = %name, "stopping");
        }
        let i = self.by_name.get_mut(name).expect("present");
        i.stopping = Some(Instant::now() + Duration::from_secs(20));
    }

    /// What runs, for the manager.
    pub fn status(&mut self, rt: &tokio::runtime::Runtime) -> Vec<pb::InstanceStatus> {
        let names: Vec<String> = self.by_name.keys().cloned().collect();
        let ublk = horn_ublk::list().unwrap_or_default();
        let mut out = Vec::new();
        for n in names {
            let up = self.is_alive(&n);
            let i = &self.by_name[&n];
            let r = &i.record;
            let mut s = pb::InstanceStatus {
                kind: r.kind.clone(),
                volume: r.volume.clone(),
                replica: r.replica.clone(),
                data_address: r.data_address.clone(),
                control_address: r.control_address.clone(),
                ..Default::default()
            };
            if i.stopping.is_some() {
                s.state = "stopping".into();
            } else if !up {
                s.state = "failed".into();
                s.message = last_line(&i.dir.join(DAEMON_LOG));
            } else if !listening(&r.control_address) {
                s.state = "starting".into();
            } else {
                s.state = RUNNING.into();
            }
            if r.kind == ENGINE && s.state == RUNNING {
                s.endpoint = match r.frontend.as_str() {
                    "iscsi" => format!("iscsi://{}/{}", r.portal, r.iqn),
                    "none" => String::new(),
                    _ => ublk
                        .iter()
                        .find(|d| d.volume == r.volume)
                        .map(|d| d.path.clone())
                        .unwrap_or_default(),
                };
                match rt.block_on(engine_info(&r.control_address, self.client_tls())) {
                    Ok(info) => {
                        for rs in info.replicas.iter().filter(|x| !x.superseded) {
                            if let Some((id, _)) = r.replicas.iter().find(|(_, (d, _))| *d == rs.address) {
                                s.replica_modes.insert(id.clone(), rs.mode.clone());
                            }
                        }
                        s.faulted = info.faulted;
                        s.volume_id = info.volume_id;
                    }
                    Err(e) => {
                        s.state = "starting".into();
                        s.message = format!("{e:#}");
                    }
                }
                if let Some(d) = ublk.iter().find(|d| r.frontend == "ublk" && d.volume == r.volume) {
                    s.in_use = horn_ublk::device::in_use(d.id).unwrap_or_default();
                }
                // A ublk engine serves once its device is there.
                if r.frontend == "ublk" && s.endpoint.is_empty() && s.state == RUNNING {
                    s.state = "starting".into();
                    s.message = "waiting for its ublk device".into();
                }
            }
            out.push(s);
        }
        out
    }
}

/// A client of the engine control service at `control`: connected within `connect`,
/// each call within `call`. The agent's and the manager's calls to engines go
/// through it.
pub(crate) async fn engine_control(
    control: &str,
    tls: Option<ClientTlsConfig>,
    connect: Duration,
    call: Duration,
) -> Result<horn_proto::engine_control::engine_control_client::EngineControlClient<tonic::transport::Channel>>
{
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{control}"))?
        .connect_timeout(connect)
        .timeout(call);
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the engine at {control}"))?;
    Ok(horn_proto::engine_control::engine_control_client::EngineControlClient::new(channel))
}

/// Where agents keep volume keys: `/run/horn-keys` for root (a node agent runs as
/// root); for another user, the user's own runtime directory (`$XDG_RUNTIME_DIR`,
/// also a memory filesystem), so that tests run without root too.
pub fn key_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/run/horn-keys");
    }
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join("horn-keys")
}

/// The directory of [`key_dir`] for the agent whose instances are recorded in
/// `instances` (`STATE/instances`).
pub fn agent_key_dir(instances: &Path) -> PathBuf {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(instances, &mut h);
    key_dir().join(format!("{:016x}", std::hash::Hasher::finish(&h)))
}

/// Writes `bytes` to `path`, readable by its owner only, durably.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The engine control service's `DropReplica`, within a second: whether it dropped
/// the replica at data address `data`.
async fn drop_replica(control: &str, tls: Option<ClientTlsConfig>, data: &str) -> Result<bool> {
    let mut c = engine_control(control, tls, Duration::from_millis(500), Duration::from_secs(1)).await?;
    Ok(c.drop_replica(horn_proto::engine_control::DropReplicaRequest {
        replica: data.to_string(),
        reason: "its node is down (its agent's lease lapsed)".into(),
    })
    .await
    .map_err(|s| anyhow::anyhow!("{}", s.message()))?
    .into_inner()
    .dropped)
}

/// The engine control service's `AddReplica`: the rebuild's id.
async fn add_replica(control: &str, tls: Option<ClientTlsConfig>, replica: &str) -> Result<u64> {
    let mut c = engine_control(control, tls, Duration::from_secs(1), Duration::from_secs(60)).await?;
    Ok(c.add_replica(horn_proto::engine_control::AddReplicaRequest {
        replica: replica.to_string(),
    })
    .await
    .map_err(|s| anyhow::anyhow!("{}", s.message()))?
    .into_inner()
    .rebuild_id)
}

/// The engine control service's `Info`, within half a second (an engine still
/// starting is asked again on the agent's next round, 100 ms later).
async fn engine_info(
    control: &str,
    tls: Option<ClientTlsConfig>,
) -> Result<horn_proto::engine_control::EngineInfo> {
    let half = Duration::from_millis(500);
    let mut c = engine_control(control, tls, half, half).await?;
    Ok(c.info(horn_proto::engine_control::EngineInfoRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner())
}
