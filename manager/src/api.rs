//! The manager's gRPC service (`proto/manager.proto`): volumes and nodes for `hornctl`
//! and, later, the CSI driver and the node agents.
//!
//! Every call must carry the cluster token ([`ClusterIdentity`], written by
//! `hornctl cluster init`); [`authenticate`] refuses the others before the service
//! sees them. Specs go through [`Specs`] (checked, compare-and-swap); placements come
//! from the [`scheduler`]; what agents measure (disk capacity and free space) is kept
//! in memory, never in the store: after a restart it arrives again with the agents'
//! next registration. A node is ready while its lease in the store is renewed.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use horn_proto::manager_api as pb;
use horn_proto::manager_api::manager_server::Manager;
use tonic::{Request, Response, Status};

use crate::model::{DataLocality, DiskSpec, Frontend, NodeSpec, ReplicaSpec, SpecError, Specs, VolumeSpec};

mod recurring;
mod restoring;
use crate::runtime::{self, Reports};
use crate::scheduled::ScheduledIndex;
use crate::scheduler::{self, DiskView, Locality, NodeView};
use crate::store::{LeaseId, Store, StoreError, Txn};

/// The cluster's id and token, in files of the manager's data directory, beside its
/// CA (`ca.pem`, `ca.key`) and the credentials it issued at init: the manager's
/// (`manager.pem`) and the first admin's (`admin.pem`, for `hornctl`).
#[derive(Debug, Clone)]
pub struct ClusterIdentity {
    /// A random id naming the cluster.
    pub id: String,
    /// The token a node joins with.
    pub token: String,
}

/// The name of the manager's own credentials in its directory.
pub const MANAGER_CREDENTIALS: &str = "manager";
/// The name of the admin credentials `hornctl cluster init` writes.
pub const ADMIN_CREDENTIALS: &str = "admin";

const ID_FILE: &str = "cluster-id";

/// Where `hornd manager` listens, and `hornctl` calls, by default.
pub const DEFAULT_MANAGER: &str = "127.0.0.1:9400";
/// The token's file name in the manager's data directory (mode 0600).
pub const TOKEN_FILE: &str = "cluster-token";

fn random_hex(bytes: usize) -> std::io::Result<String> {
    let mut buf = vec![0u8; bytes];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

impl ClusterIdentity {
    /// Creates a new cluster identity in `dir`; refused if one is there already (a
    /// second init would lock every client of the first out).
    pub fn init(dir: &Path) -> anyhow::Result<ClusterIdentity> {
        use anyhow::Context;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let token_path = dir.join(TOKEN_FILE);
        if token_path.exists() {
            anyhow::bail!(
                "{} exists: this directory holds a cluster already (its token is there)",
                token_path.display()
            );
        }
        let identity = ClusterIdentity {
            id: random_hex(8)?,
            token: random_hex(32)?,
        };
        std::fs::write(dir.join(ID_FILE), format!("{}\n", identity.id))
            .with_context(|| format!("cannot write {}", dir.join(ID_FILE).display()))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&token_path)
            .with_context(|| format!("cannot create {}", token_path.display()))?;
        writeln!(f, "{}", identity.token)?;
        f.sync_all()?;
        identity.ensure_pki(dir)?;
        Ok(identity)
    }

    /// Makes the cluster's CA, and the manager's and the first admin's credentials,
    /// in `dir` where they are missing (a directory made before them gets them at its
    /// next start).
    pub fn ensure_pki(&self, dir: &Path) -> anyhow::Result<()> {
        if !dir.join(horn_pki::CA_CERT).exists() {
            horn_pki::Ca::generate(&self.id)?.save(dir)?;
            tracing::info!(dir = %dir.display(), "made the cluster's CA");
        }
        let ca = horn_pki::Ca::load(dir)?;
        for (name, role) in [
            (MANAGER_CREDENTIALS, horn_pki::Role::Manager),
            (ADMIN_CREDENTIALS, horn_pki::Role::Admin),
        ] {
            if !dir.join(format!("{name}.pem")).exists() {
                ca.issue(&role, &[], horn_pki::Validity::Days(horn_pki::LEAF_DAYS))?
                    .save(dir, name)?;
            }
        }
        Ok(())
    }

    /// The identity `hornctl cluster init` wrote in `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<ClusterIdentity> {
        let read = |name: &str| -> anyhow::Result<String> {
            let path = dir.join(name);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                anyhow::anyhow!(
                    "cannot read {}: {e}; run `hornctl cluster init --data {}` first",
                    path.display(),
                    dir.display()
                )
            })?;
            let t = text.trim().to_string();
            if t.is_empty() {
                anyhow::bail!("{} is empty", path.display());
            }
            Ok(t)
        };
        Ok(ClusterIdentity {
            id: read(ID_FILE)?,
            token: read(TOKEN_FILE)?,
        })
    }
}

/// Refuses a call a node's certificate makes for another node.
fn acting_for<T>(req: &Request<T>, node: &str) -> Result<(), Status> {
    match horn_pki::caller_role(req) {
        Some(horn_pki::Role::Node(mine)) if mine != node => Err(Status::permission_denied(format!(
            "the caller's certificate is for node {mine}, and the call acts for node {node}"
        ))),
        _ => Ok(()),
    }
}

/// Seconds since the Unix epoch, now.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What a node's agent measured of a disk.
#[derive(Debug, Clone, Copy, Default)]
struct Measured {
    capacity: u64,
    available: u64,
}

/// The manager's service over a store.
pub struct ManagerService<S: Store + 'static> {
    specs: Arc<Specs<S>>,
    cluster_id: String,
    /// The token a node joins with.
    token: String,
    /// The cluster's CA, which signs a joining node's certificate and issued
    /// credentials (`None`: this manager issues none).
    ca_dir: Option<PathBuf>,
    /// Per node: the CAs it trusts and the issuer of its certificate, as its last
    /// heartbeat showed (a CA roll advances on them).
    trust: Mutex<BTreeMap<String, (Vec<String>, String)>>,
    /// The manager's credentials: it calls engines over mutual TLS with them.
    credentials: Option<horn_pki::LiveCredentials>,
    /// How long the certificates it signs are valid.
    certificate_lifetime: Duration,
    store_path: String,
    /// Disk measurements by (node, path), as last reported.
    measured: Mutex<BTreeMap<(String, String), Measured>>,
    /// Each node's lease in the store.
    leases: Mutex<BTreeMap<String, LeaseId>>,
    /// What the agents last reported of their instances.
    reports: Mutex<Reports>,
    /// Per node: how many reports have arrived, and the number of fresh reports
    /// asked for (it goes into the node's work, so a waiting agent answers at once).
    rounds: Mutex<BTreeMap<String, (u64, u64)>>,
    /// Bumped whenever a spec or a report changes: `SyncNode` calls waiting for new
    /// work watch it.
    changes: tokio::sync::watch::Sender<u64>,
    /// Since when each failed replica (volume, id) has been failed, as the
    /// reconciler saw it.
    failed_since: Mutex<BTreeMap<(String, String), std::time::Instant>>,
    /// Bytes scheduled on each disk (built at first use).
    scheduled: Mutex<Option<ScheduledIndex>>,
    /// The jobs running a run, with its number.
    jobs_running: Mutex<BTreeMap<String, u64>>,
    /// The volumes being restored: `None` while a step runs, else when the last ended.
    restores: Mutex<BTreeMap<String, Option<std::time::Instant>>>,
}

/// The longest a `SyncNode` call waits for its node's work to change.
const MAX_SYNC_WAIT: Duration = Duration::from_secs(10);

fn lease_key(node: &str) -> String {
    format!("leases/nodes/{node}")
}

fn to_status(e: SpecError) -> Status {
    match &e {
        SpecError::Invalid(_) => Status::invalid_argument(e.to_string()),
        SpecError::Exists { .. } => Status::already_exists(e.to_string()),
        SpecError::NotFound { .. } => Status::not_found(e.to_string()),
        SpecError::Refused(_) => Status::failed_precondition(e.to_string()),
        SpecError::Store(StoreError::Conflict { .. }) => Status::aborted(e.to_string()),
        SpecError::Store(StoreError::Invalid(_)) => Status::invalid_argument(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

fn parse_frontend(s: &str) -> Result<Frontend, Status> {
    match s {
        "" | "ublk" => Ok(Frontend::Ublk),
        "iscsi" => Ok(Frontend::Iscsi),
        other => Err(Status::invalid_argument(format!(
            "frontend {other:?}: give ublk or iscsi"
        ))),
    }
}

fn parse_locality(s: &str) -> Result<DataLocality, Status> {
    match s {
        "" | "disabled" => Ok(DataLocality::Disabled),
        "best-effort" => Ok(DataLocality::BestEffort),
        "strict-local" => Ok(DataLocality::StrictLocal),
        other => Err(Status::invalid_argument(format!(
            "data locality {other:?}: give disabled, best-effort or strict-local"
        ))),
    }
}

fn locality_name(l: DataLocality) -> &'static str {
    match l {
        DataLocality::Disabled => "disabled",
        DataLocality::BestEffort => "best-effort",
        DataLocality::StrictLocal => "strict-local",
    }
}

impl<S: Store + 'static> ManagerService<S> {
    /// A service over `store` (kept at `store_path`, for `ClusterInfo`).
    pub fn new(store: S, identity: &ClusterIdentity, store_path: &Path) -> ManagerService<S> {
        // The CA lives beside the store, in the manager's directory.
        let ca_dir = store_path
            .parent()
            .filter(|dir| horn_pki::Ca::load(dir).is_ok())
            .map(Path::to_path_buf);
        let credentials = store_path
            .parent()
            .and_then(|dir| horn_pki::LiveCredentials::open(dir, MANAGER_CREDENTIALS).ok());
        ManagerService {
            specs: Arc::new(Specs::new(store)),
            cluster_id: identity.id.clone(),
            token: identity.token.clone(),
            ca_dir,
            trust: Mutex::new(BTreeMap::new()),
            credentials,
            certificate_lifetime: Duration::from_secs(horn_pki::LEAF_DAYS as u64 * 86400),
            store_path: store_path.display().to_string(),
            measured: Mutex::new(BTreeMap::new()),
            leases: Mutex::new(BTreeMap::new()),
            reports: Mutex::new(Reports::default()),
            rounds: Mutex::new(BTreeMap::new()),
            changes: tokio::sync::watch::channel(0).0,
            failed_since: Mutex::new(BTreeMap::new()),
            scheduled: Mutex::new(None),
            jobs_running: Mutex::new(BTreeMap::new()),
            restores: Mutex::new(BTreeMap::new()),
        }
    }

    /// The service, signing certificates valid for `lifetime` (default
    /// [`horn_pki::LEAF_DAYS`]).
    pub fn with_certificate_lifetime(mut self, lifetime: Duration) -> ManagerService<S> {
        self.certificate_lifetime = lifetime;
        self
    }

    /// The validity of a certificate signed now.
    fn validity(&self) -> horn_pki::Validity {
        horn_pki::Validity::For(self.certificate_lifetime)
    }

    /// Renews the manager's own server certificate from its CA once it is due
    /// ([`horn_pki::Credentials::renewal_due`]); its service takes the new one at
    /// the next connection.
    pub fn renew_own_certificate(&self) -> anyhow::Result<()> {
        let (Ok(ca), Some(live)) = (self.ca(), &self.credentials) else {
            return Ok(());
        };
        let current = live.current();
        if !current.renewal_due_now()? && current.issuer()? == ca.subject()? {
            return Ok(());
        }
        let fresh = ca.issue(&horn_pki::Role::Manager, &[], self.validity())?;
        live.replace(&fresh)?;
        tracing::info!(until = %fresh.not_after()?, "renewed the manager's certificate");
        Ok(())
    }

    /// The cluster's CA, as its files in the manager's directory hold it now (a
    /// roll changes them).
    fn ca(&self) -> Result<horn_pki::Ca, Status> {
        let dir = self
            .ca_dir
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("this manager has no CA"))?;
        horn_pki::Ca::load(dir).map_err(|e| Status::internal(format!("the cluster's CA: {e}")))
    }

    /// A certificate for `role` on the key of signing request `csr`, with `ips` (text)
    /// in it, from the CA that signs now, and the bundle its holder should trust.
    fn sign(&self, csr: &str, role: &horn_pki::Role, ips: &[String]) -> Result<pb::JoinReply, Status> {
        let ca = self.ca()?;
        let ips = ips
            .iter()
            .map(|ip| {
                ip.parse()
                    .map_err(|_| Status::invalid_argument(format!("{ip} is not an IP address")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let cert = ca
            .sign_request(csr, role, &ips, self.validity())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(pb::JoinReply {
            cert,
            ca: ca.trust_pem().to_string(),
        })
    }

    /// Where a CA roll stands, and each node's trust as last seen.
    fn rotation_status(&self) -> Result<pb::RotationStatus, Status> {
        let dir = self
            .ca_dir
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("this manager has no CA"))?;
        let internal = |e: horn_pki::PkiError| Status::internal(format!("the cluster's CA: {e}"));
        let (phase, next) = match horn_pki::Rotation::read(dir).map_err(internal)? {
            horn_pki::Rotation::Idle => ("idle", String::new()),
            horn_pki::Rotation::Trusting { next } => ("trusting", next),
            horn_pki::Rotation::Reissuing { current } => ("reissuing", current),
        };
        let trust = self.trust.lock().unwrap_or_else(|p| p.into_inner());
        let nodes = self
            .specs
            .nodes()
            .map_err(to_status)?
            .into_iter()
            .map(|n| {
                let (trusted, issuer) = trust.get(&n.spec.name).cloned().unwrap_or_default();
                pb::NodeTrust {
                    node: n.spec.name,
                    trusted,
                    issuer,
                }
            })
            .collect();
        Ok(pb::RotationStatus {
            phase: phase.into(),
            signer: self.ca()?.subject().map_err(internal)?,
            next,
            nodes,
        })
    }

    /// Records what node `node`'s heartbeat showed of its trust, moves a CA roll on
    /// when every node trusts the new CA (it then signs, and the manager's own
    /// credentials in its directory are reissued from it), and says what the node
    /// must do: the trust bundle to keep, and whether to renew now.
    fn follow_rotation(
        &self,
        node: &str,
        trusted: Vec<String>,
        issuer: String,
    ) -> Result<(String, bool), Status> {
        let Some(dir) = &self.ca_dir else {
            return Ok((String::new(), false));
        };
        let internal = |e: horn_pki::PkiError| Status::internal(format!("the cluster's CA: {e}"));
        self.trust
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.to_string(), (trusted, issuer.clone()));
        let mut rotation = horn_pki::Rotation::read(dir).map_err(internal)?;
        if let horn_pki::Rotation::Trusting { next } = rotation.clone() {
            let nodes = self.specs.nodes().map_err(to_status)?;
            let all_trust = {
                let trust = self.trust.lock().unwrap_or_else(|p| p.into_inner());
                nodes
                    .iter()
                    .all(|n| trust.get(&n.spec.name).is_some_and(|(t, _)| t.contains(&next)))
            };
            if all_trust {
                rotation = horn_pki::Rotation::switch(dir).map_err(internal)?;
                let ca = self.ca()?;
                for (name, role) in [
                    (MANAGER_CREDENTIALS, horn_pki::Role::Manager),
                    (ADMIN_CREDENTIALS, horn_pki::Role::Admin),
                ] {
                    ca.issue(&role, &[], self.validity())
                        .and_then(|c| c.save(dir, name))
                        .map_err(internal)?;
                }
                tracing::info!(signer = %next, "every node trusts the new CA: it signs from now on, and holders renew");
            }
        }
        let ca = self.ca()?;
        let renew = match rotation {
            horn_pki::Rotation::Reissuing { current } => !issuer.is_empty() && issuer != current,
            _ => false,
        };
        Ok((ca.trust_pem().to_string(), renew))
    }

    /// How the manager calls engines: over mutual TLS with its credentials, which
    /// engines on nodes serve.
    fn engine_tls(&self) -> Option<tonic::transport::ClientTlsConfig> {
        self.credentials
            .as_ref()
            .map(|c| c.client_tls(horn_pki::NODE_NAME))
    }

    /// Attaches strict-local volume `v` (as read), which has no replica yet, to `node`,
    /// placing its replica there in the same transaction.
    fn attach_strict_local(
        &self,
        v: crate::model::Versioned<VolumeSpec>,
        node: &str,
        maintenance: bool,
    ) -> Result<pb::Volume, Status> {
        let settings = self.specs.settings().map_err(to_status)?.spec;
        let (replica, node_revision) = self
            .place_replica(
                &v.spec,
                &[],
                &[],
                Locality::StrictLocal(node),
                &settings.scheduling,
            )?
            .map_err(|e| {
                Status::failed_precondition(format!(
                    "volume {} is strict-local, so its replica must go on node {node}: {e}",
                    v.spec.name
                ))
            })?;
        let mut spec = v.spec;
        spec.attached_to = Some(node.to_string());
        spec.maintenance = maintenance;
        self.specs
            .attach_placed(&spec, v.revision, &replica, node_revision)
            .map_err(to_status)?;
        self.changed();
        tracing::info!(volume = %spec.name, node, disk = %replica.disk, "strict-local volume attached; its replica placed there");
        self.volume_reply(&spec.name)
    }

    /// The name engines stamp their records with under this manager.
    fn authority_name(&self) -> String {
        format!("manager:{}", self.cluster_id)
    }

    /// Starts the manager's loops: the reconciler, the recurring jobs
    /// ([`recurring`]) and the restores of volumes created from backups
    /// ([`restoring`]). They end when the service is dropped.
    pub fn spawn_loops(self: &Arc<Self>) -> std::io::Result<()> {
        self.spawn_reconciler()?;
        self.spawn_jobs()?;
        self.spawn_restorer()
    }

    /// Starts the reconciler: a thread that looks at every volume each second and
    /// replaces the replicas that have been failed for the replenishment wait.
    fn spawn_reconciler(self: &Arc<Self>) -> std::io::Result<()> {
        let me = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("reconciler".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(1));
                let Some(m) = me.upgrade() else { return };
                if let Err(e) = m.reconcile(std::time::Instant::now()) {
                    tracing::warn!(error = %e.message(), "reconciling failed; trying again");
                }
                if let Err(e) = m.renew_own_certificate() {
                    tracing::warn!(error = %format!("{e:#}"), "renewing the manager's certificate failed; trying again");
                }
            })?;
        Ok(())
    }

    /// One pass of the reconciler at `now`. A replica counts as failed while
    /// [`runtime::replica_failure`] says so; once it has been failed for the
    /// `replica-replenishment-wait` setting, and its volume is served by an engine
    /// with a replica RW ([`runtime::may_replace`]), a replacement is scheduled on
    /// another eligible node in the same transaction that removes it. The engine's
    /// agent then adds the new replica and the engine rebuilds it online. A replica
    /// that comes back within the wait is not replaced: its agent adds it back, and
    /// the rebuild copies only what it missed.
    pub fn reconcile(&self, now: std::time::Instant) -> Result<(), Status> {
        let settings = self.specs.settings().map_err(to_status)?.spec;
        let wait = Duration::from_secs(settings.replica_replenishment_wait_secs);
        let ready = self.ready_nodes()?;
        let reports = self.reports();
        let volumes = self.specs.volumes().map_err(to_status)?;
        let mut failing = BTreeMap::new();
        let mut due = Vec::new();
        let mut locality = Vec::new();
        {
            let mut since = self.failed_since.lock().unwrap_or_else(|p| p.into_inner());
            for v in &volumes {
                let replicas = self.specs.replicas(&v.spec.name).map_err(to_status)?;
                for r in &replicas {
                    let Some(why) = runtime::replica_failure(&v.spec, &r.spec, &ready, &reports) else {
                        continue;
                    };
                    let key = (v.spec.name.clone(), r.spec.id.clone());
                    let at = *since.entry(key.clone()).or_insert(now);
                    failing.insert(key, ());
                    if now.duration_since(at) >= wait && runtime::may_replace(&v.spec, &ready, &reports) {
                        due.push((v.clone(), r.clone(), replicas.clone(), why));
                    }
                }
                let specs: Vec<ReplicaSpec> = replicas.iter().map(|r| r.spec.clone()).collect();
                if let Some(step) = runtime::locality_step(&v.spec, &specs, &ready, &reports) {
                    locality.push((v.clone(), replicas.clone(), step));
                }
            }
            since.retain(|k, _| failing.contains_key(k));
        }
        for (v, old, replicas, why) in due {
            // A replacement goes to the attached node first, where locality asks for one.
            let locality = match (v.spec.data_locality, v.spec.attached_to.as_deref()) {
                (DataLocality::Disabled, _) | (_, None) => Locality::Disabled,
                (_, Some(n)) => Locality::BestEffort(n),
            };
            let specs: Vec<ReplicaSpec> = replicas.iter().map(|r| r.spec.clone()).collect();
            let placed = self.place_replica(
                &v.spec,
                &specs,
                std::slice::from_ref(&old.spec.id),
                locality,
                &settings.scheduling,
            )?;
            let (new, node_revision) = match placed {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(volume = %v.spec.name, replica = %old.spec.id, reason = %why, error = %e, "a failed replica cannot be replaced yet");
                    continue;
                }
            };
            match self.specs.replace_replica(&old, &new, v.revision, node_revision) {
                Ok(_) => {
                    tracing::info!(volume = %v.spec.name, failed = %old.spec.id, reason = %why, replacement = %new.id, node = %new.node, disk = %new.disk, "replaced a failed replica");
                    self.failed_since
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&(v.spec.name.clone(), old.spec.id.clone()));
                    self.changed();
                }
                Err(e) => {
                    tracing::warn!(volume = %v.spec.name, error = %e, "replacing a replica lost a race; next pass")
                }
            }
        }
        for (v, replicas, step) in locality {
            self.follow_locality(&v, &replicas, step, &settings.scheduling)?;
        }
        Ok(())
    }

    /// One more replica of volume `v`, beside `replicas`, placed by the scheduler on
    /// the cluster as it is now, with an id none of them (nor `also_taken`) has: the
    /// replica and its node's revision as read (to check at commit), or why it cannot
    /// be placed.
    fn place_replica(
        &self,
        v: &VolumeSpec,
        replicas: &[ReplicaSpec],
        also_taken: &[String],
        locality: Locality<'_>,
        scheduling: &scheduler::Settings,
    ) -> Result<Result<(ReplicaSpec, crate::store::Revision), scheduler::Unschedulable>, Status> {
        let view = self.cluster_view()?;
        let existing: Vec<scheduler::Placement> = replicas
            .iter()
            .map(|r| scheduler::Placement {
                node: r.node.clone(),
                disk: r.disk.clone(),
            })
            .collect();
        let request = scheduler::Request {
            size: v.size,
            node_selector: &v.node_selector,
            disk_selector: &v.disk_selector,
            existing: &existing,
            locality,
        };
        Ok(scheduler::place(&view.nodes, &request, scheduling).map(|p| {
            let id = (1..)
                .map(|i| format!("r{i}"))
                .find(|id| replicas.iter().all(|r| &r.id != id) && !also_taken.contains(id))
                .expect("an unused id");
            let revision = view
                .revisions
                .iter()
                .find(|(n, _)| *n == p.node)
                .map_or(0, |(_, r)| *r);
            (
                ReplicaSpec {
                    id,
                    volume: v.name.clone(),
                    node: p.node,
                    disk: p.disk,
                },
                revision,
            )
        }))
    }

    /// Takes one step of best-effort data locality ([`runtime::locality_step`]).
    fn follow_locality(
        &self,
        v: &crate::model::Versioned<VolumeSpec>,
        replicas: &[crate::model::Versioned<ReplicaSpec>],
        step: runtime::LocalityStep,
        scheduling: &scheduler::Settings,
    ) -> Result<(), Status> {
        match step {
            runtime::LocalityStep::PlaceLocal(node) => {
                let specs: Vec<ReplicaSpec> = replicas.iter().map(|r| r.spec.clone()).collect();
                let new = match self.place_replica(
                    &v.spec,
                    &specs,
                    &[],
                    Locality::StrictLocal(&node),
                    scheduling,
                )? {
                    Ok((new, _)) => new,
                    // Best effort: the volume is served from where its replicas are.
                    Err(e) => {
                        tracing::debug!(volume = %v.spec.name, node = %node, error = %e, "no local replica for a best-effort volume");
                        return Ok(());
                    }
                };
                match self.specs.add_replica(&new, v.revision) {
                    Ok(_) => {
                        tracing::info!(volume = %v.spec.name, replica = %new.id, node = %new.node, disk = %new.disk, "data locality: a replica placed on the attached node");
                        self.changed();
                    }
                    Err(e) => {
                        tracing::warn!(volume = %v.spec.name, error = %e, "placing a local replica lost a race; next pass")
                    }
                }
            }
            runtime::LocalityStep::RemoveExtra(id) => {
                let Some(old) = replicas.iter().find(|r| r.spec.id == id) else {
                    return Ok(());
                };
                match self.specs.remove_replica(old, v.revision) {
                    Ok(_) => {
                        tracing::info!(volume = %v.spec.name, replica = %id, node = %old.spec.node, "data locality: the replica on the attached node is RW; one elsewhere removed");
                        self.changed();
                    }
                    Err(e) => {
                        tracing::warn!(volume = %v.spec.name, error = %e, "removing an extra replica lost a race; next pass")
                    }
                }
            }
        }
        Ok(())
    }

    /// The control address of the engine serving `volume`, or why there is none.
    fn engine_of(&self, volume: &str) -> Result<(String, VolumeSpec), Status> {
        let v = self.specs.volume(volume).map_err(to_status)?.spec;
        let Some(node) = v.attached_to.clone() else {
            return Err(Status::failed_precondition(format!(
                "volume {volume} is detached: attach it first (`hornctl volume attach {volume} NODE`)"
            )));
        };
        let reply = self.volume_reply(volume)?;
        if reply.state != "attached" {
            return Err(Status::failed_precondition(format!(
                "volume {volume} is {} on node {node}: {}",
                reply.state, reply.message
            )));
        }
        let reports = self.reports();
        let control = reports
            .engine_on(&node, volume)
            .map(|e| e.control_address.clone())
            .ok_or_else(|| {
                Status::failed_precondition(format!("volume {volume}: node {node} reports no engine"))
            })?;
        Ok((control, v))
    }

    /// Wakes the `SyncNode` calls waiting for a change.
    fn changed(&self) {
        self.changes.send_modify(|c| *c += 1);
    }

    fn reports(&self) -> Reports {
        self.reports.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The nodes whose lease is current.
    fn ready_nodes(&self) -> Result<BTreeSet<String>, Status> {
        let mut ready = BTreeSet::new();
        for n in self.specs.nodes().map_err(to_status)? {
            if self.is_ready(&n.spec.name)? {
                ready.insert(n.spec.name);
            }
        }
        Ok(ready)
    }

    /// What `node` should run now.
    fn node_work(&self, node: &str) -> Result<pb::NodeWork, Status> {
        let volumes: Vec<VolumeSpec> = self
            .specs
            .volumes()
            .map_err(to_status)?
            .into_iter()
            .map(|v| v.spec)
            .collect();
        let replicas: Vec<ReplicaSpec> = self
            .specs
            .all_replicas()
            .map_err(to_status)?
            .into_iter()
            .map(|r| r.spec)
            .collect();
        let disks: Vec<String> = self
            .specs
            .node(node)
            .map_err(to_status)?
            .spec
            .disks
            .into_iter()
            .map(|d| d.path)
            .collect();
        let mut work = runtime::node_work(
            node,
            &self.cluster_id,
            &disks,
            &volumes,
            &replicas,
            &self.ready_nodes()?,
            &self.reports(),
        );
        // Each replica gets its volume's wire secret: only the nodes that hold one do.
        for r in &mut work.replicas {
            if let Some(s) = self.specs.wire_secret(&r.volume).map_err(to_status)? {
                r.secret = s.as_bytes().to_vec();
            }
        }
        // An encrypted volume's engine gets its key, and an iSCSI target its CHAP
        // credentials: only the node it runs on does.
        for e in &mut work.engines {
            let Some(v) = volumes.iter().find(|v| v.name == e.volume) else {
                continue;
            };
            if let Some(s) = &v.key_secret {
                e.key = self.specs.secret(s).map_err(to_status)?.spec.bytes();
            }
            if e.frontend == "iscsi" && !v.no_chap {
                let chap = self.specs.chap(&v.name).map_err(to_status)?.ok_or_else(|| {
                    Status::failed_precondition(format!(
                        "volume {} has no CHAP credentials in the store",
                        v.name
                    ))
                })?;
                e.chap_user = chap.user;
                e.chap_secret = chap.secret.into_bytes();
            }
        }
        let asked = self
            .rounds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .map_or(0, |r| r.1);
        // The keys and a request for a fresh report are part of the work, so of its
        // digest.
        work.report = asked;
        work.revision = 0;
        work.revision = runtime::digest(&work);
        Ok(work)
    }

    /// Keeps in each volume's spec the id its engine on `node` reports, the first
    /// time one does.
    fn record_volume_ids(&self, node: &str) -> Result<(), Status> {
        let reported: Vec<(String, String)> = self
            .reports()
            .engines_of_node(node)
            .filter(|e| !e.volume_id.is_empty())
            .map(|e| (e.volume.clone(), e.volume_id.clone()))
            .collect();
        for (volume, id) in reported {
            let Ok(v) = self.specs.volume(&volume) else {
                continue;
            };
            match &v.spec.volume_id {
                Some(known) if *known == id => {}
                Some(known) => {
                    tracing::error!(volume = %volume, known = %known, reported = %id, "an engine serves another volume id than the spec's")
                }
                None => {
                    let mut spec = v.spec;
                    spec.volume_id = Some(id.clone());
                    if self.specs.update_volume(&spec, v.revision).is_ok() {
                        tracing::info!(volume = %volume, id = %id, "volume id recorded");
                    }
                }
            }
        }
        Ok(())
    }

    /// Asks `node`'s agent for a fresh report and waits (up to 5 s) until one has
    /// arrived that it made after the asking; true if one did. A decision that must
    /// not rest on a report up to a long poll old (is the device still mounted?)
    /// calls this first.
    fn fresh_report(&self, node: &str) -> bool {
        let before = {
            let mut rounds = self.rounds.lock().unwrap_or_else(|p| p.into_inner());
            let r = rounds.entry(node.to_string()).or_default();
            r.1 += 1;
            r.0
        };
        self.changed();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        // The call under way when we asked carries a report made before; the one after
        // it is fresh.
        while std::time::Instant::now() < deadline {
            let now = self
                .rounds
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(node)
                .map_or(0, |r| r.0);
            if now >= before + 2 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn is_ready(&self, node: &str) -> Result<bool, Status> {
        Ok(self
            .specs
            .store()
            .get(&lease_key(node))
            .map_err(|e| Status::internal(e.to_string()))?
            .is_some())
    }

    /// The cluster as the scheduler sees it: each node with its disks, what its agent
    /// measured of them, and the sizes of the replicas scheduled on each; with each
    /// node's revision, to check at commit.
    fn cluster_view(&self) -> Result<ClusterView, Status> {
        let nodes = self.specs.nodes().map_err(to_status)?;
        let mut index = self.scheduled.lock().unwrap_or_else(|p| p.into_inner());
        if !index.as_mut().is_some_and(ScheduledIndex::catch_up) {
            let store: &dyn crate::store::Store = self.specs.store();
            *index = Some(ScheduledIndex::build(store).map_err(|e| to_status(e.into()))?);
        }
        let scheduled = index.as_ref().expect("built above");
        let measured = self.measured.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut views = Vec::new();
        let mut revisions = Vec::new();
        let mut ready_nodes = std::collections::BTreeSet::new();
        for n in nodes {
            let ready = self.is_ready(&n.spec.name)?;
            if ready {
                ready_nodes.insert(n.spec.name.clone());
            }
            let disks = n
                .spec
                .disks
                .iter()
                .map(|d| {
                    let key = (n.spec.name.clone(), d.path.clone());
                    let m = measured.get(&key).copied().unwrap_or_default();
                    DiskView {
                        id: d.path.clone(),
                        tags: d.tags.clone(),
                        schedulable: d.allow_scheduling,
                        capacity: m.capacity,
                        available: m.available,
                        reserved: d.reserved,
                        scheduled: scheduled.scheduled(&key.0, &key.1),
                    }
                })
                .collect();
            revisions.push((n.spec.name.clone(), n.revision));
            views.push(NodeView {
                name: n.spec.name.clone(),
                zone: n.spec.zone.clone(),
                tags: n.spec.tags.clone(),
                schedulable: ready && !n.spec.cordoned,
                disks,
            });
        }
        Ok(ClusterView {
            nodes: views,
            revisions,
            ready: ready_nodes,
        })
    }

    fn volume_reply(&self, name: &str) -> Result<pb::Volume, Status> {
        let v = self.specs.volume(name).map_err(to_status)?;
        let placements: Vec<pb::ReplicaPlacement> = self
            .specs
            .replicas(name)
            .map_err(to_status)?
            .into_iter()
            .map(|r| pb::ReplicaPlacement {
                id: r.spec.id,
                node: r.spec.node,
                disk: r.spec.disk,
                ..Default::default()
            })
            .collect();
        let specs: Vec<ReplicaSpec> = self
            .specs
            .replicas(name)
            .map_err(to_status)?
            .into_iter()
            .map(|r| r.spec)
            .collect();
        let (ready, reports) = (self.ready_nodes()?, self.reports());
        let st = runtime::volume_state(&v.spec, &specs, &ready, &reports);
        let since = self
            .failed_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let placements = placements
            .into_iter()
            .map(|mut p: pb::ReplicaPlacement| {
                if let Some((state, mode, address)) = st.replicas.get(&p.id) {
                    p.state = state.clone();
                    p.mode = mode.clone();
                    p.data_address = address.clone();
                }
                let spec = specs.iter().find(|r| r.id == p.id);
                if let Some(why) = spec.and_then(|r| runtime::replica_failure(&v.spec, r, &ready, &reports)) {
                    p.failure = why;
                    p.failed_at = since
                        .get(&(name.to_string(), p.id.clone()))
                        .and_then(|at| std::time::SystemTime::now().checked_sub(at.elapsed()))
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_secs());
                }
                p
            })
            .collect();
        let membership = self
            .specs
            .membership(name)
            .map_err(to_status)?
            .and_then(|m| m.spec.record)
            .map(|r| describe_membership(&r))
            .unwrap_or_default();
        let s = v.spec;
        let chap_user = match s.no_chap {
            true => String::new(),
            false => self
                .specs
                .chap(name)
                .map_err(to_status)?
                .map(|c| c.user)
                .unwrap_or_default(),
        };
        let restore = s.restore.clone();
        Ok(pb::Volume {
            groups: s.groups.iter().cloned().collect(),
            restore_from: restore.as_ref().map(|r| r.source()).unwrap_or_default(),
            standby: restore.as_ref().is_some_and(|r| r.standby),
            restored_backup: restore
                .as_ref()
                .and_then(|r| r.applied.clone())
                .unwrap_or_default(),
            restore_error: restore.as_ref().and_then(|r| r.error.clone()).unwrap_or_default(),
            membership,
            chap_user,
            no_chap: s.no_chap,
            data_tls: s.data_tls,
            key_secret: s.key_secret.clone().unwrap_or_default(),
            state: st.state.into(),
            robustness: st.robustness.into(),
            endpoint: st.endpoint,
            message: st.message,
            name: s.name,
            size: s.size,
            replicas: s.replicas,
            sector_size: s.sector_size,
            frontend: runtime::frontend_name(s.frontend).into(),
            data_locality: locality_name(s.data_locality).into(),
            node_selector: s.node_selector.into_iter().collect(),
            disk_selector: s.disk_selector.into_iter().collect(),
            attached_to: s.attached_to.unwrap_or_default(),
            maintenance: s.maintenance,
            volume_id: s.volume_id.clone().unwrap_or_default(),
            placements,
            revision: v.revision,
        })
    }

    /// Changes volume `name`'s spec with `change`, tried again on a conflict; the spec
    /// as it stands after.
    fn change_volume(&self, name: &str, change: impl Fn(&mut VolumeSpec)) -> Result<VolumeSpec, SpecError> {
        loop {
            let v = self.specs.volume(name)?;
            let mut spec = v.spec.clone();
            change(&mut spec);
            if spec == v.spec {
                return Ok(spec);
            }
            match self.specs.update_volume(&spec, v.revision) {
                Ok(_) => {
                    self.changed();
                    return Ok(spec);
                }
                Err(SpecError::Store(StoreError::Conflict { .. })) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Job `name` as listed: its spec, when it fires next, and its last run.
    fn job_reply(&self, name: &str) -> Result<pb::Job, Status> {
        let j = self.specs.job(name).map_err(to_status)?.spec;
        let state = self.specs.job_state(name).map_err(to_status)?.spec;
        let next = j
            .cron
            .parse::<crate::jobs::Schedule>()
            .ok()
            .and_then(|s| s.next_after(state.fired_through.max(unix_now())));
        let last_run = match (self.running_run(name), state.history.last()) {
            (Some(n), _) => format!("run {n} running"),
            (None, Some(r)) => {
                let count = |o: &str| r.volumes.iter().filter(|v| v.outcome == o).count();
                format!(
                    "run {} ({}) at {}: {} done, {} skipped, {} failed",
                    r.number,
                    r.trigger,
                    crate::format::utc_time(r.started_unix),
                    count("done"),
                    count("skipped"),
                    count("failed")
                )
            }
            (None, None) => String::new(),
        };
        Ok(pb::Job {
            name: j.name,
            task: job_task_name(j.task).into(),
            cron: j.cron,
            retain: j.retain,
            volumes: j.volumes.into_iter().collect(),
            groups: j.groups.into_iter().collect(),
            target: j.target.unwrap_or_default(),
            labels: j.labels.into_iter().collect(),
            next_unix: next.unwrap_or(0),
            last_run,
        })
    }

    fn node_reply(&self, spec: NodeSpec) -> Result<pb::Node, Status> {
        Ok(self.node_replies(vec![spec])?.remove(0))
    }

    /// The replies for `specs`, from one view of the cluster and one read of the
    /// settings.
    fn node_replies(&self, specs: Vec<NodeSpec>) -> Result<Vec<pb::Node>, Status> {
        let view = self.cluster_view()?;
        let lease_secs = self.specs.settings().map_err(to_status)?.spec.node_lease_secs as u32;
        Ok(specs
            .into_iter()
            .map(|spec| {
                let nv = view.nodes.iter().find(|n| n.name == spec.name);
                pb::Node {
                    state: if view.ready.contains(&spec.name) {
                        "ready"
                    } else {
                        "down"
                    }
                    .into(),
                    disks: spec
                        .disks
                        .iter()
                        .map(|d| {
                            let dv = nv.and_then(|v| v.disks.iter().find(|x| x.id == d.path));
                            pb::Disk {
                                path: d.path.clone(),
                                tags: d.tags.iter().cloned().collect(),
                                reserved: d.reserved,
                                allow_scheduling: d.allow_scheduling,
                                capacity: dv.map_or(0, |x| x.capacity),
                                available: dv.map_or(0, |x| x.available),
                                scheduled: dv.map_or(0, |x| x.scheduled),
                            }
                        })
                        .collect(),
                    name: spec.name,
                    address: spec.address,
                    zone: spec.zone,
                    tags: spec.tags.into_iter().collect(),
                    cordoned: spec.cordoned,
                    lease_secs,
                    ..Default::default()
                }
            })
            .collect())
    }

    /// Runs `f` off the async runtime: the store's calls block (they fsync).
    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Self) -> Result<T, Status> + Send + 'static,
    ) -> Result<Response<T>, Status> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| Status::internal(format!("the call panicked: {e}")))?
            .map(Response::new)
    }
}

/// The cluster as the scheduler sees it, and each node's revision as read.
struct ClusterView {
    nodes: Vec<NodeView>,
    /// (node, revision): a placement is committed only if its nodes are unchanged.
    revisions: Vec<(String, crate::store::Revision)>,
    /// The nodes whose lease is current.
    ready: std::collections::BTreeSet<String>,
}

/// An engine's refusal, as the manager's: the same code, naming the volume.
fn engine_refused(volume: &str) -> impl Fn(Status) -> Status + '_ {
    move |s| Status::new(s.code(), format!("volume {volume}'s engine: {}", s.message()))
}

/// A membership record as the manager's API carries it (the replica's message, field
/// for field).
pub fn membership_to_wire(r: &horn_engine::membership::Record) -> pb::MembershipRecord {
    rewire(&horn_replica::control::record_to_wire(r))
}

/// A membership record from the manager's API.
pub fn membership_from_wire(m: pb::MembershipRecord) -> horn_engine::membership::Record {
    horn_replica::control::record_from_wire(rewire(&m))
}

/// A record in words, WO members included.
fn describe_membership(r: &horn_engine::membership::Record) -> String {
    let mut s = horn_engine::membership::describe(r);
    if !r.wo.is_empty() {
        s += &format!("; WO: {}", r.wo.values().cloned().collect::<Vec<_>>().join(", "));
    }
    s
}

/// `a` as message `B`: for the manager's messages that carry the engine's fields
/// under the same numbers (snapshots, verify), so either side's code serves both.
pub(crate) fn rewire<A: prost::Message, B: prost::Message + Default>(a: &A) -> B {
    B::decode(a.encode_to_vec().as_slice()).expect("the messages share their fields")
}

/// The engine control service at `control`, for a chain operation (connected within
/// 2 s; a chain operation may take minutes).
async fn engine_client(
    control: &str,
    tls: Option<tonic::transport::ClientTlsConfig>,
) -> Result<
    horn_proto::engine_control::engine_control_client::EngineControlClient<tonic::transport::Channel>,
    Status,
> {
    crate::instances::engine_control(control, tls, Duration::from_secs(2), Duration::from_secs(300))
        .await
        .map_err(|e| Status::unavailable(format!("{e:#}")))
}

/// Runs `f` to its end on a runtime of its own (for the manager's loops, which run
/// on threads of their own).
fn on_runtime<T>(f: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?
        .block_on(f)
}

/// The engine control service at `control`, for a backup or a restore: no deadline,
/// as those take as long as their data does.
async fn long_engine_client(
    control: &str,
    tls: Option<tonic::transport::ClientTlsConfig>,
) -> Result<
    horn_proto::engine_control::engine_control_client::EngineControlClient<tonic::transport::Channel>,
    String,
> {
    crate::instances::engine_control(
        control,
        tls,
        Duration::from_secs(2),
        Duration::from_secs(7 * 86400),
    )
    .await
    .map_err(|e| format!("the engine at {control}: {e:#}"))
}

/// A target as listed: without its secret.
fn target_info(t: &crate::model::BackupTargetSpec) -> pb::BackupTargetInfo {
    pb::BackupTargetInfo {
        name: t.name.clone(),
        url: t.url.clone(),
        endpoint: t.endpoint.clone(),
        region: t.region.clone(),
        access_key: t.access_key.clone(),
    }
}

fn job_task_name(t: crate::model::JobTask) -> &'static str {
    match t {
        crate::model::JobTask::Snapshot => "snapshot",
        crate::model::JobTask::Backup => "backup",
    }
}

fn run_reply(job: &str, r: &crate::model::JobRun) -> pb::JobRun {
    pb::JobRun {
        job: job.to_string(),
        number: r.number,
        trigger: r.trigger.clone(),
        started_unix: r.started_unix,
        finished_unix: r.finished_unix,
        volumes: r
            .volumes
            .iter()
            .map(|v| pb::JobVolumeRun {
                volume: v.volume.clone(),
                outcome: v.outcome.clone(),
                made: v.made.clone(),
                retired: v.retired.clone(),
                message: v.message.clone(),
            })
            .collect(),
    }
}

/// The service as tonic serves it: an `Arc` so that calls can run on blocking threads.
pub struct Service<S: Store + 'static>(pub Arc<ManagerService<S>>);

#[tonic::async_trait]
impl<S: Store + 'static> Manager for Service<S> {
    async fn cluster_info(
        &self,
        _: Request<pb::ClusterInfoRequest>,
    ) -> Result<Response<pb::ClusterInfoReply>, Status> {
        self.0
            .blocking(|m| {
                let (revision, _) = m
                    .specs
                    .store()
                    .list("settings")
                    .map_err(|e| Status::internal(e.to_string()))?;
                Ok(pb::ClusterInfoReply {
                    cluster_id: m.cluster_id.clone(),
                    store: m.store_path.clone(),
                    revision,
                    nodes: m.specs.nodes().map_err(to_status)?.len() as u32,
                    volumes: m.specs.volumes().map_err(to_status)?.len() as u32,
                })
            })
            .await
    }

    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        let (from_backup, standby) = (r.from_backup.clone(), r.standby);
        if standby && from_backup.is_empty() {
            return Err(Status::invalid_argument(
                "a standby follows a volume's backups: say which (--from-backup TARGET?volume=VOLUME)",
            ));
        }
        let mut spec = VolumeSpec {
            name: r.name,
            size: r.size,
            replicas: r.replicas,
            sector_size: if r.sector_size == 0 { 512 } else { r.sector_size },
            frontend: parse_frontend(&r.frontend)?,
            data_locality: parse_locality(&r.data_locality)?,
            node_selector: r.node_selector.into_iter().collect(),
            disk_selector: r.disk_selector.into_iter().collect(),
            attached_to: None,
            maintenance: false,
            volume_id: None,
            key_secret: (!r.key_secret.is_empty()).then_some(r.key_secret),
            no_chap: r.no_chap,
            data_tls: r.data_tls,
            groups: r.groups.into_iter().collect(),
            restore: None,
        };
        if from_backup.is_empty() {
            spec.check().map_err(Status::invalid_argument)?;
        }
        self.0
            .blocking(move |m| {
                if !from_backup.is_empty() {
                    if spec.data_locality == DataLocality::StrictLocal {
                        return Err(Status::invalid_argument(format!(
                            "volume {}: a strict-local volume's replica is placed at its first attach, so it cannot be \
                             restored into before; create it best-effort",
                            spec.name
                        )));
                    }
                    let targets: Vec<_> = m
                        .specs
                        .backup_targets()
                        .map_err(to_status)?
                        .into_iter()
                        .map(|t| t.spec)
                        .collect();
                    let (restore, manifest) = restoring::resolve(&from_backup, standby, &targets)?;
                    if spec.size == 0 {
                        spec.size = manifest.size;
                    }
                    if spec.size < manifest.size {
                        return Err(Status::invalid_argument(format!(
                            "volume {} of {} cannot hold backup {} of {}, which is {}: give at least its size, or leave the size out",
                            spec.name,
                            crate::format::human_bytes(spec.size),
                            manifest.name,
                            manifest.volume,
                            crate::format::human_bytes(manifest.size)
                        )));
                    }
                    spec.restore = Some(restore);
                    spec.check().map_err(Status::invalid_argument)?;
                }
                if let Some(s) = &spec.key_secret {
                    m.specs.secret(s).map_err(|e| {
                        Status::failed_precondition(format!(
                            "volume {} is to be encrypted with secret {s}: {e} (hornctl secret create {s})",
                            spec.name
                        ))
                    })?;
                }
                if m.specs.volume(&spec.name).is_ok() {
                    return Err(to_status(SpecError::Exists {
                        kind: "volume",
                        name: spec.name.clone(),
                    }));
                }
                if spec.data_locality == DataLocality::StrictLocal {
                    // Its one replica is placed at its first attach, on that node.
                    m.specs.create_volume_placed(&spec, &[], &[]).map_err(to_status)?;
                    m.changed();
                    tracing::info!(volume = %spec.name, size = spec.size, "strict-local volume created; its replica is placed when it is first attached");
                    return m.volume_reply(&spec.name);
                }
                let settings = m.specs.settings().map_err(to_status)?.spec;
                let ClusterView {
                    nodes: views,
                    revisions,
                    ..
                } = m.cluster_view()?;
                let placed = scheduler::place_all(
                    &views,
                    &scheduler::Request {
                        size: spec.size,
                        node_selector: &spec.node_selector,
                        disk_selector: &spec.disk_selector,
                        existing: &[],
                        locality: Locality::Disabled,
                    },
                    spec.replicas as usize,
                    &settings.scheduling,
                )
                .map_err(|e| Status::failed_precondition(format!("volume {}: {e}", spec.name)))?;
                let replicas: Vec<ReplicaSpec> = placed
                    .into_iter()
                    .enumerate()
                    .map(|(i, p)| ReplicaSpec {
                        id: format!("r{}", i + 1),
                        volume: spec.name.clone(),
                        node: p.node,
                        disk: p.disk,
                    })
                    .collect();
                if spec.restore.is_some() {
                    // Restored through an engine without a frontend, on a node that
                    // holds one of its replicas; detached once restored.
                    spec.attached_to = replicas.first().map(|r| r.node.clone());
                    spec.maintenance = true;
                }
                let used: Vec<(String, u64)> = revisions
                    .into_iter()
                    .filter(|(n, _)| replicas.iter().any(|r| &r.node == n))
                    .collect();
                m.specs.create_volume_placed(&spec, &replicas, &used).map_err(to_status)?;
                m.changed();
                tracing::info!(volume = %spec.name, size = spec.size, replicas = ?replicas.iter().map(|r| &r.node).collect::<Vec<_>>(), "volume created");
                m.volume_reply(&spec.name)
            })
            .await
    }

    async fn get_volume(&self, req: Request<pb::VolumeRef>) -> Result<Response<pb::Volume>, Status> {
        let name = req.into_inner().name;
        self.0.blocking(move |m| m.volume_reply(&name)).await
    }

    async fn put_backup_target(
        &self,
        req: Request<pb::BackupTargetSpec>,
    ) -> Result<Response<pb::BackupTargetInfo>, Status> {
        let r = req.into_inner();
        let spec = crate::model::BackupTargetSpec {
            name: r.name,
            url: r.url,
            endpoint: r.endpoint,
            region: r.region,
            access_key: r.access_key,
            secret_key: r.secret_key,
        };
        spec.check().map_err(Status::invalid_argument)?;
        self.0
            .blocking(move |m| {
                // Reached before it is kept: a target that cannot be listed is refused.
                let store = spec.open().map_err(Status::failed_precondition)?;
                horn_backup::list_volumes(store.as_ref()).map_err(|e| {
                    Status::failed_precondition(format!("backup target {} ({}): {e}", spec.name, spec.url))
                })?;
                m.specs.put_backup_target(&spec).map_err(to_status)?;
                tracing::info!(target = %spec.name, url = %spec.url, "backup target set");
                Ok(target_info(&spec))
            })
            .await
    }

    async fn list_backup_targets(
        &self,
        _: Request<pb::ListBackupTargetsRequest>,
    ) -> Result<Response<pb::BackupTargetList>, Status> {
        self.0
            .blocking(|m| {
                Ok(pb::BackupTargetList {
                    targets: m
                        .specs
                        .backup_targets()
                        .map_err(to_status)?
                        .iter()
                        .map(|t| target_info(&t.spec))
                        .collect(),
                })
            })
            .await
    }

    async fn delete_backup_target(
        &self,
        req: Request<pb::BackupTargetRef>,
    ) -> Result<Response<pb::BackupTargetInfo>, Status> {
        let name = req.into_inner().name;
        self.0
            .blocking(move |m| {
                let t = m.specs.delete_backup_target(&name).map_err(to_status)?;
                tracing::info!(target = %name, "backup target deleted (its backups stay in it)");
                Ok(target_info(&t))
            })
            .await
    }

    type BackupVolumeStream = tonic::Streaming<horn_proto::control::BackupProgress>;

    async fn backup_volume(
        &self,
        req: Request<pb::BackupVolumeRequest>,
    ) -> Result<Response<Self::BackupVolumeStream>, Status> {
        let r = req.into_inner();
        let (volume, target) = (r.volume.clone(), r.target.clone());
        let (control, target) = self
            .0
            .blocking(move |m| {
                let t = m.specs.backup_target(&target).map_err(to_status)?.spec;
                let (control, _) = m.engine_of(&volume)?;
                Ok((control, t))
            })
            .await?
            .into_inner();
        let name = if r.name.is_empty() {
            format!(
                "{}-{}",
                r.volume.chars().take(45).collect::<String>(),
                crate::format::utc_stamp(unix_now())
            )
        } else {
            r.name
        };
        let mut c = long_engine_client(&control, self.0.engine_tls())
            .await
            .map_err(Status::unavailable)?;
        let stream = c
            .backup(horn_proto::control::BackupRequest {
                snapshot: String::new(),
                volume: r.volume.clone(),
                name: name.clone(),
                target: Some(target.wire()),
                compression: r.compression,
                full: r.full,
                labels: r.labels,
                ..Default::default()
            })
            .await
            .map_err(engine_refused(&r.volume))?
            .into_inner();
        tracing::info!(volume = %r.volume, backup = %name, target = %target.name, "backup started");
        Ok(Response::new(stream))
    }

    async fn activate_volume(&self, req: Request<pb::VolumeRef>) -> Result<Response<pb::Volume>, Status> {
        let name = req.into_inner().name;
        self.0
            .blocking(move |m| {
                let v = m.specs.volume(&name).map_err(to_status)?;
                match &v.spec.restore {
                    None => {
                        return Err(Status::failed_precondition(format!(
                            "volume {name} is not a standby (it is a normal volume)"
                        )))
                    }
                    Some(r) if !r.standby => {
                        return Err(Status::failed_precondition(format!(
                            "volume {name} is being restored from {}, not following it: it is a normal volume once restored",
                            r.source()
                        )))
                    }
                    Some(_) => {}
                }
                m.change_volume(&name, |spec| {
                    if let Some(r) = spec.restore.as_mut() {
                        r.activate = true;
                    }
                })
                .map_err(to_status)?;
                tracing::info!(volume = %name, "standby to be activated: a last look at its source's backups");
                m.volume_reply(&name)
            })
            .await
    }

    async fn set_volume_groups(
        &self,
        req: Request<pb::VolumeGroupsRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        for g in &r.groups {
            crate::model::check_name("group", g).map_err(Status::invalid_argument)?;
        }
        self.0
            .blocking(move |m| {
                let groups: BTreeSet<String> = r.groups.into_iter().collect();
                m.change_volume(&r.name, |spec| spec.groups = groups.clone())
                    .map_err(to_status)?;
                m.volume_reply(&r.name)
            })
            .await
    }

    async fn put_job(&self, req: Request<pb::Job>) -> Result<Response<pb::Job>, Status> {
        let r = req.into_inner();
        let spec = crate::model::JobSpec {
            name: r.name,
            task: match r.task.as_str() {
                "snapshot" => crate::model::JobTask::Snapshot,
                "backup" => crate::model::JobTask::Backup,
                other => {
                    return Err(Status::invalid_argument(format!(
                        "a job's task is snapshot or backup, not {other:?}"
                    )))
                }
            },
            cron: r.cron,
            retain: r.retain,
            volumes: r.volumes.into_iter().collect(),
            groups: r.groups.into_iter().collect(),
            target: (!r.target.is_empty()).then_some(r.target),
            labels: r.labels.into_iter().collect(),
        };
        spec.check().map_err(Status::invalid_argument)?;
        self.0
            .blocking(move |m| {
                m.specs.put_job(&spec).map_err(to_status)?;
                // A new job fires from now on, not for the times before it.
                let state = m.specs.job_state(&spec.name).map_err(to_status)?;
                if state.revision == 0 {
                    let fresh = crate::model::JobState {
                        fired_through: unix_now(),
                        ..Default::default()
                    };
                    m.specs.put_job_state(&spec.name, &fresh, 0).map_err(to_status)?;
                }
                tracing::info!(job = %spec.name, cron = %spec.cron, retain = spec.retain, "job set");
                m.job_reply(&spec.name)
            })
            .await
    }

    async fn list_jobs(&self, _: Request<pb::ListJobsRequest>) -> Result<Response<pb::JobList>, Status> {
        self.0
            .blocking(|m| {
                let jobs = m.specs.jobs().map_err(to_status)?;
                Ok(pb::JobList {
                    jobs: jobs
                        .iter()
                        .map(|j| m.job_reply(&j.spec.name))
                        .collect::<Result<_, _>>()?,
                })
            })
            .await
    }

    async fn delete_job(&self, req: Request<pb::JobRef>) -> Result<Response<pb::Job>, Status> {
        let name = req.into_inner().name;
        self.0
            .blocking(move |m| {
                let reply = m.job_reply(&name)?;
                m.specs.delete_job(&name).map_err(to_status)?;
                tracing::info!(job = %name, "job deleted (what it made stays)");
                Ok(reply)
            })
            .await
    }

    async fn run_job(&self, req: Request<pb::JobRef>) -> Result<Response<pb::JobRun>, Status> {
        let name = req.into_inner().name;
        let me = Arc::downgrade(&self.0);
        self.0
            .blocking(move |m| {
                let number = m.start_run(&name, "manual", &me)?;
                Ok(pb::JobRun {
                    job: name,
                    number,
                    trigger: "manual".into(),
                    started_unix: unix_now(),
                    ..Default::default()
                })
            })
            .await
    }

    async fn job_history(&self, req: Request<pb::JobRef>) -> Result<Response<pb::JobRunList>, Status> {
        let name = req.into_inner().name;
        self.0
            .blocking(move |m| {
                m.specs.job(&name).map_err(to_status)?;
                let state = m.specs.job_state(&name).map_err(to_status)?.spec;
                Ok(pb::JobRunList {
                    runs: state.history.iter().map(|r| run_reply(&name, r)).collect(),
                })
            })
            .await
    }

    async fn join_node(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        let r = req.into_inner();
        crate::model::check_name("node", &r.node).map_err(Status::invalid_argument)?;
        let token = r.token.trim().to_string();
        if crate::join::is_join_token(&token) {
            let node = r.node.clone();
            self.0
                .blocking(move |m| {
                    crate::join::redeem(m.specs.store(), &token, &node, unix_now())
                        .map_err(|e| Status::unauthenticated(e.to_string()))
                })
                .await?;
        } else if !horn_iscsi::login::equal_in_constant_time(token.as_bytes(), self.0.token.as_bytes()) {
            return Err(Status::unauthenticated(
                "the cluster token is wrong: the node cannot join",
            ));
        }
        let reply = self
            .0
            .sign(&r.csr, &horn_pki::Role::Node(r.node.clone()), &r.ips)?;
        tracing::info!(node = %r.node, "a node joined: its certificate is signed");
        Ok(Response::new(reply))
    }

    async fn renew_credentials(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::JoinReply>, Status> {
        let role = horn_pki::caller_role(&req)
            .cloned()
            .ok_or_else(|| Status::unauthenticated("a renewal needs the certificate being renewed"))?;
        let r = req.into_inner();
        let reply = self.0.sign(&r.csr, &role, &r.ips)?;
        tracing::info!(role = %role, "renewed a certificate");
        Ok(Response::new(reply))
    }

    async fn create_join_token(
        &self,
        req: Request<pb::JoinTokenRequest>,
    ) -> Result<Response<pb::JoinToken>, Status> {
        let r = req.into_inner();
        let ttl = match r.ttl_secs {
            0 => crate::join::DEFAULT_TTL,
            s => Duration::from_secs(s.into()),
        };
        let t = self
            .0
            .blocking(move |m| {
                crate::join::create(m.specs.store(), ttl, &r.node, unix_now()).map_err(to_status)
            })
            .await?
            .into_inner();
        tracing::info!(node = %t.node, expires_unix = t.expires_unix, "made a join token");
        Ok(Response::new(pb::JoinToken {
            token: t.token,
            expires_unix: t.expires_unix,
            node: t.node,
        }))
    }

    async fn issue_credentials(
        &self,
        req: Request<pb::IssueRequest>,
    ) -> Result<Response<pb::IssuedCredentials>, Status> {
        let r = req.into_inner();
        let role = match r.role.as_str() {
            "admin" => horn_pki::Role::Admin,
            "read-only" => horn_pki::Role::ReadOnly,
            other => match other.strip_prefix("node:") {
                Some(n) if crate::model::check_name("node", n).is_ok() => horn_pki::Role::Node(n.to_string()),
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "role {other:?} is not admin, read-only or node:NAME"
                    )))
                }
            },
        };
        let ca = self.0.ca()?;
        let days = if r.days == 0 {
            horn_pki::LEAF_DAYS
        } else {
            r.days as i64
        };
        let validity = if r.days == 0 {
            self.0.validity()
        } else {
            horn_pki::Validity::Days(days)
        };
        let c = ca
            .issue(&role, &[], validity)
            .map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(role = %role, days, "issued credentials");
        Ok(Response::new(pb::IssuedCredentials {
            cert: c.cert_pem,
            key: c.key_pem,
            ca: c.ca_pem,
        }))
    }

    async fn get_volume_credentials(
        &self,
        req: Request<pb::VolumeRef>,
    ) -> Result<Response<pb::VolumeCredentials>, Status> {
        let name = req.into_inner().name;
        self.0
            .blocking(move |m| {
                let v = m.specs.volume(&name).map_err(to_status)?.spec;
                if v.no_chap {
                    return Ok(pb::VolumeCredentials {
                        no_chap: true,
                        ..Default::default()
                    });
                }
                let chap = m.specs.chap(&name).map_err(to_status)?.ok_or_else(|| {
                    Status::failed_precondition(format!("volume {name} has no CHAP credentials in the store"))
                })?;
                Ok(pb::VolumeCredentials {
                    chap_user: chap.user,
                    chap_secret: chap.secret,
                    no_chap: false,
                })
            })
            .await
    }

    async fn list_volumes(
        &self,
        _: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::VolumeList>, Status> {
        self.0
            .blocking(|m| {
                let names: Vec<String> = m
                    .specs
                    .volumes()
                    .map_err(to_status)?
                    .into_iter()
                    .map(|v| v.spec.name)
                    .collect();
                let volumes = names
                    .iter()
                    .map(|n| m.volume_reply(n))
                    .collect::<Result<_, _>>()?;
                Ok(pb::VolumeList { volumes })
            })
            .await
    }

    async fn delete_volume(
        &self,
        req: Request<pb::VolumeRef>,
    ) -> Result<Response<pb::DeleteVolumeReply>, Status> {
        let name = req.into_inner().name;
        self.0
            .blocking(move |m| {
                if m.volume_reply(&name)?.state == "detaching" {
                    return Err(Status::failed_precondition(format!(
                        "volume {name} is detaching: its engine still runs; try again once `hornctl volume info {name}` says detached"
                    )));
                }
                m.specs.delete_volume(&name).map_err(to_status)?;
                m.changed();
                tracing::info!(volume = %name, "volume deleted");
                Ok(pb::DeleteVolumeReply {})
            })
            .await
    }

    async fn register_node(&self, req: Request<pb::Node>) -> Result<Response<pb::Node>, Status> {
        acting_for(&req, &req.get_ref().name)?;
        let n = req.into_inner();
        self.0
            .blocking(move |m| {
                let old = m.specs.node(&n.name).ok().map(|o| o.spec);
                let mut disks: Vec<DiskSpec> = n
                    .disks
                    .iter()
                    .map(|d| DiskSpec {
                        path: d.path.clone(),
                        tags: d.tags.iter().cloned().collect(),
                        reserved: d.reserved,
                        allow_scheduling: d.allow_scheduling,
                        added: false,
                    })
                    .collect();
                // A re-registration keeps the disks the operator added with hornctl.
                for d in old.iter().flat_map(|o| &o.disks).filter(|d| d.added) {
                    if !disks.iter().any(|x| x.path == d.path) {
                        disks.push(d.clone());
                    }
                }
                let spec = NodeSpec {
                    name: n.name.clone(),
                    address: n.address,
                    zone: n.zone,
                    tags: n.tags.into_iter().collect(),
                    // A re-registration keeps the operator's cordon.
                    cordoned: old.as_ref().is_some_and(|o| o.cordoned),
                    disks,
                };
                spec.check().map_err(Status::invalid_argument)?;
                for d in &n.disks {
                    if d.available > d.capacity {
                        return Err(Status::invalid_argument(format!(
                            "node {}: disk {} has {} B free of {} B",
                            n.name, d.path, d.available, d.capacity
                        )));
                    }
                }
                let settings = m.specs.settings().map_err(to_status)?.spec;
                let store = m.specs.store();
                let lease = store
                    .grant_lease(Duration::from_secs(settings.node_lease_secs))
                    .map_err(|e| Status::internal(e.to_string()))?;
                m.specs.put_node(&spec).map_err(to_status)?;
                store
                    .commit(Txn::new().put_leased(lease_key(&spec.name), spec.address.clone(), lease))
                    .map_err(|e| Status::internal(e.to_string()))?;
                let old = m
                    .leases
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(spec.name.clone(), lease);
                if let Some(old) = old {
                    // Its key now lives under the new lease; the old one just ends.
                    let _ = store.revoke(old);
                }
                {
                    let mut measured = m.measured.lock().unwrap_or_else(|p| p.into_inner());
                    measured.retain(|(node, _), _| node != &spec.name);
                    for d in &n.disks {
                        measured.insert(
                            (spec.name.clone(), d.path.clone()),
                            Measured {
                                capacity: d.capacity,
                                available: d.available,
                            },
                        );
                    }
                }
                tracing::info!(node = %spec.name, address = %spec.address, disks = spec.disks.len(), "node registered");
                m.changed();
                m.node_reply(spec)
            })
            .await
    }

    async fn node_heartbeat(&self, req: Request<pb::NodeRef>) -> Result<Response<pb::Node>, Status> {
        acting_for(&req, &req.get_ref().name)?;
        let issuer = req
            .peer_certs()
            .and_then(|c| c.first().and_then(|leaf| horn_pki::issuer_of_der(leaf)))
            .unwrap_or_default();
        let pb::NodeRef { name, trusted } = req.into_inner();
        self.0
            .blocking(move |m| {
                let lease = m.leases.lock().unwrap_or_else(|p| p.into_inner()).get(&name).copied();
                let renewed = lease.is_some_and(|l| m.specs.store().keep_alive(l).is_ok());
                if !renewed {
                    return Err(Status::not_found(format!(
                        "node {name} has no lease (never registered with this manager, or it lapsed): register again"
                    )));
                }
                let spec = m.specs.node(&name).map_err(to_status)?.spec;
                let mut reply = m.node_reply(spec)?;
                (reply.trust_pem, reply.renew_certificate) = m.follow_rotation(&name, trusted, issuer)?;
                Ok(reply)
            })
            .await
    }

    async fn rotate_ca(
        &self,
        req: Request<pb::RotateCaRequest>,
    ) -> Result<Response<pb::RotationStatus>, Status> {
        let step = req.into_inner().step;
        self.0
            .blocking(move |m| {
                let dir = m
                    .ca_dir
                    .clone()
                    .ok_or_else(|| Status::failed_precondition("this manager has no CA"))?;
                let refused = |e: horn_pki::PkiError| Status::failed_precondition(e.to_string());
                match step.as_str() {
                    "" => {}
                    "begin" => {
                        horn_pki::Rotation::begin(&dir, &m.cluster_id).map_err(refused)?;
                        tracing::info!("a CA roll began: nodes fetch the new CA at their next heartbeat");
                    }
                    "finish" => {
                        let status = m.rotation_status()?;
                        if status.phase != "reissuing" {
                            return Err(Status::failed_precondition(format!(
                                "the CA roll is {}, not reissuing: there is no old CA to retire yet",
                                status.phase
                            )));
                        }
                        let behind: Vec<String> = status
                            .nodes
                            .iter()
                            .filter(|n| n.issuer != status.signer)
                            .map(|n| n.node.clone())
                            .collect();
                        if !behind.is_empty() {
                            return Err(Status::failed_precondition(format!(
                                "nodes {} have not renewed their certificates from the new CA yet: finishing now would lock them out",
                                behind.join(", ")
                            )));
                        }
                        horn_pki::Rotation::finish(&dir).map_err(refused)?;
                        tracing::info!("the CA roll finished: the old CA is trusted no more");
                    }
                    other => {
                        return Err(Status::invalid_argument(format!(
                            "{other:?} is not a step of a CA roll: begin or finish"
                        )))
                    }
                }
                m.rotation_status()
            })
            .await
    }

    async fn get_node(&self, req: Request<pb::NodeRef>) -> Result<Response<pb::Node>, Status> {
        let name = req.into_inner().name;
        self.0
            .blocking(move |m| {
                let spec = m.specs.node(&name).map_err(to_status)?.spec;
                m.node_reply(spec)
            })
            .await
    }

    async fn list_nodes(&self, _: Request<pb::ListNodesRequest>) -> Result<Response<pb::NodeList>, Status> {
        self.0
            .blocking(|m| {
                let specs = m
                    .specs
                    .nodes()
                    .map_err(to_status)?
                    .into_iter()
                    .map(|n| n.spec)
                    .collect();
                let nodes = m.node_replies(specs)?;
                Ok(pb::NodeList { nodes })
            })
            .await
    }

    async fn cordon_node(&self, req: Request<pb::CordonRequest>) -> Result<Response<pb::Node>, Status> {
        let r = req.into_inner();
        self.0
            .blocking(move |m| {
                let n = m.specs.set_cordoned(&r.name, r.cordoned).map_err(to_status)?;
                tracing::info!(node = %r.name, cordoned = r.cordoned, "node cordon changed");
                m.changed();
                m.node_reply(n.spec)
            })
            .await
    }
    async fn attach_volume(&self, req: Request<pb::AttachRequest>) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        self.0
            .blocking(move |m| {
                let v = m.specs.volume(&r.name).map_err(to_status)?;
                if let (Some(restore), false) = (&v.spec.restore, r.maintenance) {
                    return Err(Status::failed_precondition(format!(
                        "volume {} is being restored from {}{}: it is served once restored (attach it with \
                         --maintenance to go on restoring)",
                        r.name,
                        restore.source(),
                        if restore.standby {
                            " as a standby (`hornctl volume activate` makes it a normal volume)"
                        } else {
                            ""
                        }
                    )));
                }
                match &v.spec.attached_to {
                    Some(n) if *n == r.node && v.spec.maintenance == r.maintenance => {
                        return m.volume_reply(&r.name)
                    }
                    Some(n) if *n == r.node => {
                        return Err(Status::failed_precondition(format!(
                            "volume {} is attached to node {n} {}: detach it first",
                            r.name,
                            if v.spec.maintenance {
                                "in maintenance mode"
                            } else {
                                "with its frontend"
                            }
                        )))
                    }
                    Some(n) => {
                        return Err(Status::failed_precondition(format!(
                            "volume {} is attached to node {n}: detach it first",
                            r.name
                        )))
                    }
                    None => {}
                }
                m.specs.node(&r.node).map_err(to_status)?;
                if !m.is_ready(&r.node)? {
                    return Err(Status::failed_precondition(format!(
                        "node {} is down (its agent has not renewed its lease)",
                        r.node
                    )));
                }
                let state = m.volume_reply(&r.name)?;
                if state.state == "detaching" {
                    return Err(Status::failed_precondition(format!(
                        "volume {} is still detaching: its engine runs on",
                        r.name
                    )));
                }
                if v.spec.data_locality == DataLocality::StrictLocal {
                    if let Some(p) = state.placements.iter().find(|p| p.node != r.node) {
                        return Err(Status::failed_precondition(format!(
                            "volume {} is strict-local: its replica is on node {}, and it is served \
                             only there: attach it to {}",
                            r.name, p.node, p.node
                        )));
                    }
                    if state.placements.is_empty() {
                        return m.attach_strict_local(v, &r.node, r.maintenance);
                    }
                }
                if state.placements.iter().all(|p| p.state == "node down") {
                    return Err(Status::failed_precondition(format!(
                        "volume {}: every node holding one of its replicas is down",
                        r.name
                    )));
                }
                let mut spec = v.spec;
                spec.attached_to = Some(r.node.clone());
                spec.maintenance = r.maintenance;
                m.specs.update_volume(&spec, v.revision).map_err(to_status)?;
                m.changed();
                tracing::info!(volume = %r.name, node = %r.node, "volume attached");
                m.volume_reply(&r.name)
            })
            .await
    }

    async fn detach_volume(&self, req: Request<pb::DetachRequest>) -> Result<Response<pb::Volume>, Status> {
        let pb::DetachRequest { name, force } = req.into_inner();
        self.0
            .blocking(move |m| {
                let v = m.specs.volume(&name).map_err(to_status)?;
                if let (Some(restore), false) = (&v.spec.restore, force) {
                    return Err(Status::failed_precondition(format!(
                        "volume {name} is being restored from {}: it is detached once restored \
                         (--force detaches it now, and the restore waits; `hornctl volume delete` then drops it)",
                        restore.source()
                    )));
                }
                if let Some(node) = &v.spec.attached_to {
                    let in_use = |m: &ManagerService<S>| {
                        m.reports()
                            .engine_on(node, &name)
                            .map(|e| e.in_use.clone())
                            .unwrap_or_default()
                    };
                    let mut busy = in_use(m);
                    // Its user may have just unmounted it: ask the node again.
                    if !busy.is_empty() && !force && m.fresh_report(node) {
                        busy = in_use(m);
                    }
                    if !busy.is_empty() && !force {
                        return Err(Status::failed_precondition(format!(
                            "volume {name} is in use on node {node}: {busy} (--force detaches anyway: its users get I/O errors)"
                        )));
                    }
                }
                if v.spec.attached_to.is_some() {
                    let mut spec = v.spec;
                    spec.attached_to = None;
                    spec.maintenance = false;
                    m.specs.update_volume(&spec, v.revision).map_err(to_status)?;
                    m.changed();
                    tracing::info!(volume = %name, "volume detached");
                }
                m.volume_reply(&name)
            })
            .await
    }

    async fn snapshot_volume(
        &self,
        req: Request<pb::VolumeSnapshotRequest>,
    ) -> Result<Response<pb::SnapshotList>, Status> {
        let r = req.into_inner();
        let volume = r.volume.clone();
        let (control, _) = self.0.blocking(move |m| m.engine_of(&volume)).await?.into_inner();
        let list = engine_client(&control, self.0.engine_tls())
            .await?
            .snapshot(horn_proto::engine_control::EngineSnapshotRequest {
                name: r.name.clone(),
                labels: r.labels,
            })
            .await
            .map_err(engine_refused(&r.volume))?
            .into_inner();
        tracing::info!(volume = %r.volume, snapshot = %r.name, "snapshot taken");
        Ok(Response::new(rewire(&list)))
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::VolumeRef>,
    ) -> Result<Response<pb::SnapshotList>, Status> {
        let name = req.into_inner().name;
        let volume = name.clone();
        let (control, _) = self.0.blocking(move |m| m.engine_of(&volume)).await?.into_inner();
        let list = engine_client(&control, self.0.engine_tls())
            .await?
            .list_snapshots(horn_proto::engine_control::ListSnapshotsRequest {})
            .await
            .map_err(engine_refused(&name))?
            .into_inner();
        Ok(Response::new(rewire(&list)))
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::VolumeSnapshotRef>,
    ) -> Result<Response<pb::SnapshotList>, Status> {
        let r = req.into_inner();
        let volume = r.volume.clone();
        let (control, _) = self.0.blocking(move |m| m.engine_of(&volume)).await?.into_inner();
        let mut c = engine_client(&control, self.0.engine_tls()).await?;
        c.delete_snapshot(horn_proto::engine_control::EngineDeleteRequest { name: r.name.clone() })
            .await
            .map_err(engine_refused(&r.volume))?;
        // The space comes back once the deleted layer is folded away.
        let list = c
            .purge(horn_proto::engine_control::EnginePurgeRequest {})
            .await
            .map_err(engine_refused(&r.volume))?
            .into_inner();
        tracing::info!(volume = %r.volume, snapshot = %r.name, "snapshot deleted and purged");
        Ok(Response::new(rewire(&list)))
    }

    async fn revert_volume(
        &self,
        req: Request<pb::VolumeSnapshotRef>,
    ) -> Result<Response<pb::SnapshotList>, Status> {
        let r = req.into_inner();
        let volume = r.volume.clone();
        let (control, spec) = self.0.blocking(move |m| m.engine_of(&volume)).await?.into_inner();
        if !spec.maintenance {
            return Err(Status::failed_precondition(format!(
                "volume {v} is attached with its frontend: a revert changes the data under every reader; detach it and attach it in maintenance mode (`hornctl volume attach {v} NODE --maintenance`) first",
                v = r.volume
            )));
        }
        let list = engine_client(&control, self.0.engine_tls())
            .await?
            .revert(horn_proto::engine_control::EngineRevertRequest { name: r.name.clone() })
            .await
            .map_err(engine_refused(&r.volume))?
            .into_inner();
        tracing::info!(volume = %r.volume, snapshot = %r.name, "volume reverted");
        Ok(Response::new(rewire(&list)))
    }

    async fn expand_volume(&self, req: Request<pb::ExpandRequest>) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        let volume = r.volume.clone();
        let (control, spec) = self.0.blocking(move |m| m.engine_of(&volume)).await?.into_inner();
        if r.size < spec.size {
            return Err(Status::failed_precondition(format!(
                "volume {} cannot shrink from {} to {} bytes",
                r.volume, spec.size, r.size
            )));
        }
        if spec.frontend == Frontend::Ublk && !spec.maintenance && r.size > spec.size {
            return Err(Status::failed_precondition(format!(
                "volume {v} is served as a ublk device, which cannot grow while served (Horn does not resize a live ublk device; newer kernels have a command for it that Horn does not use yet): detach it, attach it with --maintenance, expand, and attach it again",
                v = r.volume
            )));
        }
        let mut grown = spec.clone();
        grown.size = r.size;
        grown.check().map_err(Status::invalid_argument)?;
        if r.size > spec.size {
            engine_client(&control, self.0.engine_tls())
                .await?
                .expand(horn_proto::engine_control::EngineExpandRequest { size: r.size })
                .await
                .map_err(engine_refused(&r.volume))?;
        }
        let name = r.volume.clone();
        self.0
            .blocking(move |m| {
                // The engine has grown every replica; the spec follows (retried on a
                // race with another change of the spec).
                for _ in 0..10 {
                    let v = m.specs.volume(&name).map_err(to_status)?;
                    if v.spec.size >= r.size {
                        break;
                    }
                    let mut s = v.spec;
                    s.size = r.size;
                    match m.specs.update_volume(&s, v.revision) {
                        Ok(_) => break,
                        Err(SpecError::Store(StoreError::Conflict { .. })) => continue,
                        Err(e) => return Err(to_status(e)),
                    }
                }
                m.changed();
                tracing::info!(volume = %name, size = r.size, "volume expanded");
                m.volume_reply(&name)
            })
            .await
    }

    async fn verify_volume(&self, req: Request<pb::VolumeRef>) -> Result<Response<pb::VerifyReply>, Status> {
        let name = req.into_inner().name;
        let volume = name.clone();
        let (control, _) = self.0.blocking(move |m| m.engine_of(&volume)).await?.into_inner();
        let reply = engine_client(&control, self.0.engine_tls())
            .await?
            .verify(horn_proto::engine_control::VerifyRequest {})
            .await
            .map_err(engine_refused(&name))?
            .into_inner();
        Ok(Response::new(rewire(&reply)))
    }

    async fn add_disk(&self, req: Request<pb::DiskRequest>) -> Result<Response<pb::Node>, Status> {
        let r = req.into_inner();
        self.0
            .blocking(move |m| {
                let n = m.specs.node(&r.node).map_err(to_status)?;
                let mut spec = n.spec;
                if spec.disks.iter().any(|d| d.path == r.path) {
                    return Err(Status::already_exists(format!(
                        "node {} has disk {} already",
                        r.node, r.path
                    )));
                }
                spec.disks.push(DiskSpec {
                    path: r.path.clone(),
                    tags: r.tags.into_iter().collect(),
                    reserved: r.reserved,
                    allow_scheduling: true,
                    added: true,
                });
                spec.check().map_err(Status::invalid_argument)?;
                m.specs.update_node(&spec, n.revision).map_err(to_status)?;
                m.changed();
                tracing::info!(node = %r.node, disk = %r.path, "disk added");
                m.node_reply(spec)
            })
            .await
    }

    async fn remove_disk(&self, req: Request<pb::DiskRef>) -> Result<Response<pb::Node>, Status> {
        let r = req.into_inner();
        self.0
            .blocking(move |m| {
                let n = m.specs.node(&r.node).map_err(to_status)?;
                let mut spec = n.spec;
                let Some(disk) = spec.disks.iter().find(|d| d.path == r.path) else {
                    return Err(Status::not_found(format!("node {} has no disk {}", r.node, r.path)));
                };
                if !disk.added {
                    return Err(Status::failed_precondition(format!(
                        "disk {} is on node {}'s agent's command line (--disk): remove it there and restart the agent",
                        r.path, r.node
                    )));
                }
                let on_it: Vec<String> = m
                    .specs
                    .all_replicas()
                    .map_err(to_status)?
                    .into_iter()
                    .filter(|x| x.spec.node == r.node && x.spec.disk == r.path)
                    .map(|x| format!("{} of {}", x.spec.id, x.spec.volume))
                    .collect();
                if !on_it.is_empty() {
                    return Err(Status::failed_precondition(format!(
                        "disk {} of node {} holds replicas ({}): delete their volumes, or let them be replaced elsewhere, first",
                        r.path,
                        r.node,
                        on_it.join(", ")
                    )));
                }
                spec.disks.retain(|d| d.path != r.path);
                m.specs.update_node(&spec, n.revision).map_err(to_status)?;
                m.measured
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&(r.node.clone(), r.path.clone()));
                m.changed();
                tracing::info!(node = %r.node, disk = %r.path, "disk removed");
                m.node_reply(spec)
            })
            .await
    }

    async fn get_settings(
        &self,
        _: Request<pb::GetSettingsRequest>,
    ) -> Result<Response<pb::SettingsReply>, Status> {
        self.0
            .blocking(|m| {
                let s = m.specs.settings().map_err(to_status)?;
                Ok(pb::SettingsReply {
                    settings: s.spec.to_pairs().into_iter().collect(),
                    revision: s.revision,
                })
            })
            .await
    }

    async fn update_settings(
        &self,
        req: Request<pb::UpdateSettingsRequest>,
    ) -> Result<Response<pb::SettingsReply>, Status> {
        let set = req.into_inner().set;
        self.0
            .blocking(move |m| {
                let current = m.specs.settings().map_err(to_status)?;
                let mut settings = current.spec;
                for (k, v) in &set {
                    settings.set(k, v).map_err(Status::invalid_argument)?;
                }
                let revision = m
                    .specs
                    .put_settings(&settings, current.revision)
                    .map_err(to_status)?;
                tracing::info!(changed = ?set, "settings changed");
                m.changed();
                Ok(pb::SettingsReply {
                    settings: settings.to_pairs().into_iter().collect(),
                    revision,
                })
            })
            .await
    }

    async fn create_secret(
        &self,
        req: Request<pb::CreateSecretRequest>,
    ) -> Result<Response<pb::Secret>, Status> {
        let r = req.into_inner();
        let value = if r.value.is_empty() {
            random_hex(64).map_err(|e| Status::internal(format!("cannot read /dev/urandom: {e}")))?
        } else {
            horn_engine::crypt::VolumeCipher::from_key(&r.value)
                .map_err(|e| Status::invalid_argument(format!("secret {}: {e}", r.name)))?;
            r.value.iter().map(|b| format!("{b:02x}")).collect()
        };
        self.0
            .blocking(move |m| {
                m.specs
                    .create_secret(&crate::model::SecretSpec {
                        name: r.name.clone(),
                        value,
                    })
                    .map_err(to_status)?;
                tracing::info!(secret = %r.name, "secret created");
                Ok(pb::Secret {
                    name: r.name,
                    volumes: Vec::new(),
                })
            })
            .await
    }

    async fn list_secrets(
        &self,
        _: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::SecretList>, Status> {
        self.0
            .blocking(|m| {
                let volumes = m.specs.volumes().map_err(to_status)?;
                let secrets = m
                    .specs
                    .secrets()
                    .map_err(to_status)?
                    .into_iter()
                    .map(|s| pb::Secret {
                        volumes: volumes
                            .iter()
                            .filter(|v| v.spec.key_secret.as_deref() == Some(s.spec.name.as_str()))
                            .map(|v| v.spec.name.clone())
                            .collect(),
                        name: s.spec.name,
                    })
                    .collect();
                Ok(pb::SecretList { secrets })
            })
            .await
    }

    async fn delete_secret(&self, req: Request<pb::SecretRef>) -> Result<Response<pb::Secret>, Status> {
        let name = req.into_inner().name;
        self.0
            .blocking(move |m| {
                m.specs.delete_secret(&name).map_err(to_status)?;
                tracing::info!(secret = %name, "secret deleted");
                Ok(pb::Secret {
                    name,
                    volumes: Vec::new(),
                })
            })
            .await
    }

    async fn begin_generation(
        &self,
        req: Request<pb::BeginGenerationRequest>,
    ) -> Result<Response<pb::BeginGenerationReply>, Status> {
        acting_for(&req, &req.get_ref().node)?;
        let r = req.into_inner();
        self.0
            .blocking(move |m| {
                let (generation, before) = m
                    .specs
                    .begin_generation(&r.volume, r.at_least, &r.engine, &r.node)
                    .map_err(to_status)?;
                tracing::info!(volume = %r.volume, generation, engine = %r.engine, node = %r.node, "an engine began its generation");
                // The engine gets this generation's key, never the volume's secret:
                // once a newer generation begins, its key speaks for a stale one.
                let key = m
                    .specs
                    .wire_secret(&r.volume)
                    .map_err(to_status)?
                    .map_or_else(Vec::new, |s| s.generation_key(generation).bytes().to_vec());
                Ok(pb::BeginGenerationReply {
                    generation,
                    same_node: before.record_node.is_empty() || before.record_node == r.node,
                    record: before.record.as_ref().map(membership_to_wire),
                    authority: m.authority_name(),
                    key,
                })
            })
            .await
    }

    async fn record_membership(
        &self,
        req: Request<pb::RecordMembershipRequest>,
    ) -> Result<Response<pb::RecordMembershipReply>, Status> {
        acting_for(&req, &req.get_ref().node)?;
        let r = req.into_inner();
        let record = r
            .record
            .map(membership_from_wire)
            .ok_or_else(|| Status::invalid_argument("a membership record is needed"))?;
        self.0
            .blocking(move |m| {
                m.specs
                    .put_membership(&r.volume, &record, &r.node)
                    .map_err(to_status)?;
                tracing::info!(volume = %r.volume, record = %describe_membership(&record), node = %r.node, "recorded a volume's membership");
                Ok(pb::RecordMembershipReply {})
            })
            .await
    }

    async fn sync_node(&self, req: Request<pb::NodeStatus>) -> Result<Response<pb::NodeWork>, Status> {
        acting_for(&req, &req.get_ref().node)?;
        let status = req.into_inner();
        let node = status.node.clone();
        let mut changes = self.0.changes.subscribe();
        let first = {
            let node = node.clone();
            self.0
                .blocking(move |m| {
                    m.specs.node(&node).map_err(to_status)?;
                    {
                        let mut measured = m.measured.lock().unwrap_or_else(|p| p.into_inner());
                        for d in &status.disks {
                            measured.insert(
                                (node.clone(), d.path.clone()),
                                Measured {
                                    capacity: d.capacity,
                                    available: d.available.min(d.capacity),
                                },
                            );
                        }
                    }
                    let changed = m
                        .reports
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .put(&node, status.instances);
                    m.rounds
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(node.clone())
                        .or_default()
                        .0 += 1;
                    m.record_volume_ids(&node)?;
                    if changed {
                        m.changed();
                    }
                    m.node_work(&node)
                })
                .await?
                .into_inner()
        };
        if first.revision != status.seen_revision || status.wait_ms == 0 {
            tracing::debug!(node = %node, engines = first.engines.len(), "sync: new work at once");
            return Ok(Response::new(first));
        }
        let wait = Duration::from_millis(status.wait_ms.into()).min(MAX_SYNC_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        // `changes` was subscribed before the work was computed: a change since wakes
        // it (our own report's included, which costs one more look).
        loop {
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    tracing::debug!(node = %node, waited_ms = wait.as_millis() as u64, "sync: no change");
                    return Ok(Response::new(first));
                }
            }
            let n = node.clone();
            let work = self.0.blocking(move |m| m.node_work(&n)).await?.into_inner();
            if work.revision != status.seen_revision {
                tracing::debug!(node = %node, engines = work.engines.len(), "sync: new work after a wait");
                return Ok(Response::new(work));
            }
        }
    }
}

/// Where `hornd manager` keeps its files.
pub fn store_path(data: &Path) -> PathBuf {
    data.join("manager.redb")
}
