//! The manager's objects as it keeps them in its [`Store`]: the *specs* (what should
//! exist), checked before they are written, and [`Specs`], the typed access to them
//! with compare-and-swap on every change.
//!
//! Keys: `volumes/NAME`, `nodes/NAME`, `replicas/VOLUME/ID`, `membership/VOLUME`
//! and `settings`; values are JSON. Runtime state (what runs, replica modes, rebuild progress, node
//! readiness) is not here: the node agents report it and the manager rebuilds it
//! after a restart.

use std::collections::{BTreeMap, BTreeSet};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use horn_engine::membership::Record;

use crate::scheduler;
use crate::store::{Expect, Revision, Store, StoreError, Txn};

/// How a volume is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Frontend {
    /// A block device, `/dev/ublkbN`, on the attached node.
    Ublk,
    /// An iSCSI target on the attached node.
    Iscsi,
}

/// Where a volume's data should be relative to its consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataLocality {
    /// No preference.
    #[default]
    Disabled,
    /// Keep a replica on the attached node when one can be placed there.
    BestEffort,
    /// One replica, on the attached node only.
    StrictLocal,
}

/// A volume: what the user asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VolumeSpec {
    /// The volume's name (1 to 63 of `A-Z a-z 0-9 . _ -`).
    pub name: String,
    /// Its size in bytes: a multiple of 4096, at most 64 TiB.
    pub size: u64,
    /// How many replicas it keeps.
    pub replicas: u32,
    /// Its logical sector size: 512 or 4096.
    pub sector_size: u32,
    /// How it is served when attached.
    pub frontend: Frontend,
    /// Where its data should be.
    #[serde(default)]
    pub data_locality: DataLocality,
    /// Tags a node must carry to hold a replica.
    #[serde(default)]
    pub node_selector: BTreeSet<String>,
    /// Tags a disk must carry to hold a replica.
    #[serde(default)]
    pub disk_selector: BTreeSet<String>,
    /// The node it should be attached to, if any.
    #[serde(default)]
    pub attached_to: Option<String>,
    /// Attached in maintenance mode: its engine serves no frontend.
    #[serde(default)]
    pub maintenance: bool,
    /// The id its first engine gave the volume, as its replicas record it; later
    /// engines start only on replicas that hold it, so a replica whose disk is not
    /// mounted (blank) is never taken for the volume.
    #[serde(default)]
    pub volume_id: Option<String>,
    /// Encrypted with the key in this secret (`secrets/NAME`); `None`: not encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_secret: Option<String>,
    /// Served over iSCSI without CHAP (explicitly asked for): any initiator that
    /// reaches the portal may read and write the volume. By default initiators must
    /// log in with the volume's CHAP credentials ([`Specs::chap`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_chap: bool,
    /// Its data wire (engine to replicas) over mutual TLS with the nodes'
    /// certificates (`hornd replica|engine --data-tls`); fixed at creation.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub data_tls: bool,
    /// Its job groups: the recurring jobs of these groups run on it.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub groups: BTreeSet<String>,
    /// Created from a backup and not yet a normal volume: the manager restores it
    /// (and, for a standby, keeps following its source) while this is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreSpec>,
}

/// Where a volume created from a backup comes from, and how far it has got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RestoreSpec {
    /// The backup target's name ([`BackupTargetSpec`]).
    pub target: String,
    /// The backed-up volume's name in the target.
    pub volume: String,
    /// The backup to restore; `None`: the newest (and, for a standby, each newer one).
    pub backup: Option<String>,
    /// Keep following the source's backups until activated.
    pub standby: bool,
    /// The backup the volume holds, once one is fully restored.
    #[serde(default)]
    pub applied: Option<String>,
    /// Asked to activate: apply the newest backup, then become a normal volume.
    #[serde(default)]
    pub activate: bool,
    /// The last restore's error, until one succeeds.
    #[serde(default)]
    pub error: Option<String>,
}

impl RestoreSpec {
    /// Where it comes from, as `CreateVolumeRequest.from_backup` takes it.
    pub fn source(&self) -> String {
        match &self.backup {
            Some(b) => format!("{}?volume={}&backup={b}", self.target, self.volume),
            None => format!("{}?volume={}", self.target, self.volume),
        }
    }

    /// Parses `TARGET?volume=V[&backup=B]` (`standby`: follow on).
    pub fn parse(text: &str, standby: bool) -> Result<RestoreSpec, String> {
        let bad = || format!("backup {text:?}: give TARGET?volume=VOLUME[&backup=BACKUP]");
        let (target, query) = text.rsplit_once('?').ok_or_else(bad)?;
        let (mut volume, mut backup) = (None, None);
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("volume", v)) => volume = Some(v.to_string()),
                Some(("backup", b)) => backup = Some(b.to_string()),
                _ => return Err(bad()),
            }
        }
        let volume = volume.ok_or_else(bad)?;
        horn_backup::format::check_name("volume", &volume).map_err(|e| e.to_string())?;
        if let Some(b) = &backup {
            horn_backup::format::check_name("backup", b).map_err(|e| e.to_string())?;
        }
        if standby && backup.is_some() {
            return Err(format!(
                "backup {text:?}: a standby follows the newest backups; leave &backup= out"
            ));
        }
        Ok(RestoreSpec {
            target: target.to_string(),
            volume,
            backup,
            standby,
            applied: None,
            activate: false,
            error: None,
        })
    }
}

/// A backup target the cluster keeps: a directory or an S3 bucket, and how to reach
/// it. The secret key stays in the manager's store; an engine gets it per backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BackupTargetSpec {
    /// Its name (1 to 63 of `A-Z a-z 0-9 . _ -`).
    pub name: String,
    /// `file:///PATH` or `s3://BUCKET[/PREFIX]`.
    pub url: String,
    /// S3: the endpoint (empty: AWS), the region, and the credentials.
    #[serde(default)]
    pub endpoint: String,
    /// S3: the region.
    #[serde(default)]
    pub region: String,
    /// S3: the access key's id.
    #[serde(default)]
    pub access_key: String,
    /// S3: the secret key.
    #[serde(default)]
    pub secret_key: String,
}

impl BackupTargetSpec {
    /// Checks the name and the URL.
    pub fn check(&self) -> Result<(), String> {
        check_name("backup target", &self.name)?;
        self.url
            .parse::<horn_backup::store::TargetUrl>()
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The target as the wire carries it to an engine.
    pub fn wire(&self) -> horn_proto::control::BackupTarget {
        horn_proto::control::BackupTarget {
            url: self.url.clone(),
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            access_key: self.access_key.clone(),
            secret_key: self.secret_key.clone(),
        }
    }

    /// Opens the target here, in the manager.
    pub fn open(&self) -> Result<std::sync::Arc<dyn horn_backup::store::ObjectStore>, String> {
        crate::backups::open(Some(&self.wire())).map_err(|e| format!("backup target {}: {e}", self.name))
    }
}

/// What a recurring job makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobTask {
    /// A snapshot of each volume.
    Snapshot,
    /// A snapshot of each volume, backed up to the job's target.
    Backup,
}

/// The most a job may retain of each volume.
pub const MAX_RETAIN: u32 = 250;

/// A recurring job: what it makes, when, of which volumes, and how many it keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobSpec {
    /// Its name; the snapshots and backups it makes are labelled with it.
    pub name: String,
    /// Snapshot or backup.
    pub task: JobTask,
    /// Five-field cron, UTC ([`crate::jobs::Schedule`]).
    pub cron: String,
    /// How many of the snapshots or backups it made to keep, per volume (0: all).
    pub retain: u32,
    /// Volumes it runs on by name.
    #[serde(default)]
    pub volumes: BTreeSet<String>,
    /// And the volumes in any of these groups.
    #[serde(default)]
    pub groups: BTreeSet<String>,
    /// A backup job's target.
    #[serde(default)]
    pub target: Option<String>,
    /// Labels put on what it makes.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The label every snapshot and backup a job makes carries: the job's name.
pub const JOB_LABEL: &str = "horn.job";

impl JobSpec {
    /// Checks the spec on its own; the error says what to change.
    pub fn check(&self) -> Result<(), String> {
        check_name("job", &self.name)?;
        self.cron
            .parse::<crate::jobs::Schedule>()
            .map_err(|e| format!("cron {:?}: {e}", self.cron))?;
        if self.retain > MAX_RETAIN {
            return Err(format!(
                "retain {}: give 0 (keep all) to {MAX_RETAIN}",
                self.retain
            ));
        }
        if self.volumes.is_empty() && self.groups.is_empty() {
            return Err("name the volumes it runs on: a volume or a group (or both)".into());
        }
        for v in &self.volumes {
            check_name("volume", v)?;
        }
        for g in &self.groups {
            check_name("group", g)?;
        }
        match (self.task, &self.target) {
            (JobTask::Backup, None) => return Err("a backup job needs a backup target".into()),
            (JobTask::Snapshot, Some(t)) => {
                return Err(format!(
                    "a snapshot job makes no backup: leave the target ({t}) out, or make it a backup job"
                ))
            }
            (_, Some(t)) => check_name("backup target", t)?,
            _ => {}
        }
        if self.labels.contains_key(JOB_LABEL) {
            return Err(format!("the label {JOB_LABEL} is the job's own"));
        }
        Ok(())
    }

    /// Whether it runs on `volume`.
    pub fn selects(&self, volume: &VolumeSpec) -> bool {
        self.volumes.contains(&volume.name) || !self.groups.is_disjoint(&volume.groups)
    }
}

/// One volume's part of a job run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobVolumeRun {
    /// The volume.
    pub volume: String,
    /// `done`, `skipped` or `failed`.
    pub outcome: String,
    /// The snapshot or backup made.
    #[serde(default)]
    pub made: String,
    /// Those its retain count let go, deleted.
    #[serde(default)]
    pub retired: Vec<String>,
    /// Why it was skipped or failed (or what went wrong retiring).
    #[serde(default)]
    pub message: String,
}

/// One run of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobRun {
    /// Counted from 1 per job.
    pub number: u64,
    /// `schedule` or `manual`.
    pub trigger: String,
    /// When it began and ended, Unix seconds.
    pub started_unix: u64,
    /// When it ended.
    pub finished_unix: u64,
    /// Each volume it ran on.
    pub volumes: Vec<JobVolumeRun>,
}

/// How many runs a job's history keeps.
pub const JOB_HISTORY: usize = 32;

/// A job's runs so far: the last scheduled firing it has dealt with and its history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobState {
    /// The schedule's firings up to this time (Unix seconds) have been run (or were
    /// before the job existed).
    pub fired_through: u64,
    /// Runs so far.
    pub runs: u64,
    /// The last [`JOB_HISTORY`] runs, oldest first.
    pub history: Vec<JobRun>,
}

/// The most replicas a volume may ask for.
pub const MAX_REPLICAS: u32 = 16;

impl VolumeSpec {
    /// Checks the spec on its own; the error says what to change.
    pub fn check(&self) -> Result<(), String> {
        check_name("volume", &self.name)?;
        horn_replica::meta::check_size(self.size).map_err(|why| format!("size {}: {why}", self.size))?;
        if self.sector_size != 512 && self.sector_size != 4096 {
            return Err(format!("sector size {} is not 512 or 4096", self.sector_size));
        }
        if self.replicas == 0 || self.replicas > MAX_REPLICAS {
            return Err(format!(
                "{} replicas: a volume has 1 to {MAX_REPLICAS}",
                self.replicas
            ));
        }
        if self.data_locality == DataLocality::StrictLocal && self.replicas != 1 {
            return Err(format!(
                "strict-local data locality keeps one replica, on the attached node; this volume asks for {}",
                self.replicas
            ));
        }
        for t in self.node_selector.iter().chain(&self.disk_selector) {
            check_name("tag", t)?;
        }
        if let Some(s) = &self.key_secret {
            check_name("secret", s)?;
        }
        for g in &self.groups {
            check_name("group", g)?;
        }
        Ok(())
    }
}

/// A disk of a node: a directory on a filesystem where replicas live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DiskSpec {
    /// The directory (absolute).
    pub path: String,
    /// Its tags.
    #[serde(default)]
    pub tags: BTreeSet<String>,
    /// Bytes kept out of Horn's reach.
    #[serde(default)]
    pub reserved: u64,
    /// Whether new replicas may be placed on it.
    pub allow_scheduling: bool,
    /// Added with `hornctl node disk add` (kept when the agent registers again),
    /// rather than given on the agent's command line.
    #[serde(default)]
    pub added: bool,
}

/// A node: a machine running `hornd node`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct NodeSpec {
    /// The node's name.
    pub name: String,
    /// The address its agent serves at.
    pub address: String,
    /// Its zone (empty: none).
    #[serde(default)]
    pub zone: String,
    /// Its tags.
    #[serde(default)]
    pub tags: BTreeSet<String>,
    /// Cordoned: no new replicas or engines are placed on it.
    #[serde(default)]
    pub cordoned: bool,
    /// Its disks.
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
}

impl NodeSpec {
    /// Checks the spec on its own.
    pub fn check(&self) -> Result<(), String> {
        check_name("node", &self.name)?;
        if self.address.parse::<std::net::SocketAddr>().is_err() {
            return Err(format!(
                "node {}: address {:?} is not IP:PORT",
                self.name, self.address
            ));
        }
        if !self.zone.is_empty() {
            check_name("zone", &self.zone)?;
        }
        for t in self.tags.iter().chain(self.disks.iter().flat_map(|d| &d.tags)) {
            check_name("tag", t)?;
        }
        let mut paths = BTreeSet::new();
        for d in &self.disks {
            if !d.path.starts_with('/') {
                return Err(format!(
                    "node {}: disk path {:?} is not absolute",
                    self.name, d.path
                ));
            }
            if !paths.insert(d.path.as_str()) {
                return Err(format!("node {}: disk {} is listed twice", self.name, d.path));
            }
        }
        Ok(())
    }
}

/// A replica of a volume, placed on a node's disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ReplicaSpec {
    /// The replica's id, unique within its volume.
    pub id: String,
    /// Its volume.
    pub volume: String,
    /// Where it lives.
    pub node: String,
    /// The disk's path on that node.
    pub disk: String,
}

/// The cluster-wide settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Settings {
    /// The scheduler's rules.
    #[serde(flatten)]
    pub scheduling: scheduler::Settings,
    /// Seconds a failed replica is given to come back (then rebuilt by delta) before a
    /// new one is scheduled elsewhere.
    pub replica_replenishment_wait_secs: u64,
    /// Seconds a node's lease lasts without renewal before it is marked down.
    pub node_lease_secs: u64,
    /// Seconds between a standby volume's looks at its source's backups.
    #[serde(default = "default_backup_poll")]
    pub backup_poll_interval_secs: u64,
}

fn default_backup_poll() -> u64 {
    300
}

impl Settings {
    /// Every setting as text, by its name (`node-anti-affinity`, `node-lease-secs`, ...).
    pub fn to_pairs(&self) -> BTreeMap<String, String> {
        let value = serde_json::to_value(self).expect("settings always serialise");
        value
            .as_object()
            .expect("settings are an object")
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str().map_or_else(|| v.to_string(), str::to_string),
                )
            })
            .collect()
    }

    /// Sets the setting `key` from text; an unknown key, or a value of the wrong
    /// kind, is an error that says what is accepted. (Ranges are checked when the
    /// settings are stored.)
    pub fn set(&mut self, key: &str, text: &str) -> Result<(), String> {
        let mut value = serde_json::to_value(&*self).expect("settings always serialise");
        let map = value.as_object_mut().expect("settings are an object");
        let Some(old) = map.get(key) else {
            return Err(format!(
                "no setting {key:?}; the settings are {}",
                map.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        };
        let new = if old.is_number() {
            serde_json::Value::from(
                text.parse::<u64>()
                    .map_err(|_| format!("{key} takes a whole number, not {text:?}"))?,
            )
        } else {
            serde_json::Value::from(text)
        };
        map.insert(key.to_string(), new);
        *self = serde_json::from_value(value).map_err(|e| match key {
            "node-anti-affinity" | "zone-anti-affinity" => format!("{key} is hard or soft, not {text:?}"),
            _ => format!("{key}: {e}"),
        })?;
        Ok(())
    }
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            scheduling: scheduler::Settings::default(),
            replica_replenishment_wait_secs: 60,
            node_lease_secs: 15,
            backup_poll_interval_secs: default_backup_poll(),
        }
    }
}

/// Names of volumes, nodes, zones and tags: the same rule as snapshot names, as they
/// end up in paths and command lines too.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    horn_replica::meta::validate_name(name).map_err(|e| format!("{what} name: {e}"))
}

/// A spec as read, with the revision to hand back when changing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    /// The spec.
    pub spec: T,
    /// The revision that last wrote it.
    pub revision: Revision,
}

/// What the typed spec access refuses.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The spec is not valid.
    #[error("{0}")]
    Invalid(String),
    /// An object of that name exists already.
    #[error("{kind} {name} exists already")]
    Exists {
        /// volume, node...
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// No object of that name.
    #[error("no {kind} is named {name}")]
    NotFound {
        /// volume, node...
        kind: &'static str,
        /// The name asked for.
        name: String,
    },
    /// The operation is refused in the object's present state.
    #[error("{0}")]
    Refused(String),
    /// The store failed or refused (a conflict: read again and retry).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored value does not decode.
    #[error("the stored {key} is corrupt: {why}")]
    Corrupt {
        /// Its key.
        key: String,
        /// The decoder's complaint.
        why: String,
    },
}

fn volume_key(name: &str) -> String {
    format!("volumes/{name}")
}

fn backup_target_key(name: &str) -> String {
    format!("backup-targets/{name}")
}

fn job_key(name: &str) -> String {
    format!("jobs/{name}")
}

fn job_state_key(name: &str) -> String {
    format!("job-runs/{name}")
}

fn node_key(name: &str) -> String {
    format!("nodes/{name}")
}

fn replica_key(volume: &str, id: &str) -> String {
    format!("replicas/{volume}/{id}")
}

fn secret_key(name: &str) -> String {
    format!("secrets/{name}")
}

fn wire_secret_key(volume: &str) -> String {
    format!("wire-secrets/{volume}")
}

/// A volume's wire secret ([`horn_proto::auth`]): made with the volume, handed to its
/// replicas' node agents, and never to an engine, which gets each generation's key
/// from the manager as it begins the generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct WireSecretSpec {
    /// 64 hex digits.
    secret: String,
}

fn chap_key(volume: &str) -> String {
    format!("iscsi-chap/{volume}")
}

/// A volume's iSCSI CHAP credentials, made with the volume: its engine's target
/// requires them, and `hornctl volume credentials` hands them to whoever attaches an
/// initiator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChapSpec {
    /// The CHAP name: `horn-VOLUME`.
    pub user: String,
    /// The CHAP secret: 32 hex digits (128 random bits).
    pub secret: String,
}

/// A volume's new CHAP credentials, as stored.
fn new_chap(volume: &str) -> Result<Vec<u8>, SpecError> {
    let random = horn_proto::auth::random()
        .map_err(|e| SpecError::Invalid(format!("cannot draw a volume's CHAP secret: {e}")))?;
    let secret: String = random[..16].iter().map(|b| format!("{b:02x}")).collect();
    Ok(serde_json::to_vec(&ChapSpec {
        user: format!("horn-{volume}"),
        secret,
    })
    .expect("CHAP credentials serialize"))
}

/// A volume's new wire secret, as stored.
fn new_wire_secret() -> Result<Vec<u8>, SpecError> {
    let secret = horn_proto::auth::VolumeSecret::generate()
        .map_err(|e| SpecError::Invalid(format!("cannot draw a volume's wire secret: {e}")))?;
    Ok(serde_json::to_vec(&WireSecretSpec {
        secret: secret.to_hex(),
    })
    .expect("a wire secret serializes"))
}

/// A secret: a volume key, kept by the manager and handed only to the node agent
/// running the engine of a volume encrypted with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretSpec {
    /// Its name.
    pub name: String,
    /// The key, hex (64 bytes).
    pub value: String,
}

impl SecretSpec {
    /// The key's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        (0..self.value.len() / 2)
            .filter_map(|i| u8::from_str_radix(&self.value[2 * i..2 * i + 2], 16).ok())
            .collect()
    }
}

fn membership_key(volume: &str) -> String {
    format!("membership/{volume}")
}

const SETTINGS_KEY: &str = "settings";

/// A volume's membership as the manager keeps it, as the engines' second authority on
/// it (`horn_engine::authority`): the generation begun last, which fences every older
/// engine out, and the newest record an engine put, stored before it counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipSpec {
    /// The generation begun last.
    pub generation: u64,
    /// The engine that began it, and its node.
    pub engine: String,
    /// See [`MembershipSpec::engine`].
    pub node: String,
    /// The newest record put.
    pub record: Option<Record>,
    /// The node of the engine that put it: the only engine that may still serve the
    /// volume runs there.
    pub record_node: String,
}

/// How many times a change to a membership spec is tried against concurrent ones.
const MEMBERSHIP_TRIES: usize = 8;

/// Typed, checked access to the specs in a [`Store`].
pub struct Specs<S: Store> {
    store: S,
}

impl<S: Store> Specs<S> {
    /// Specs kept in `store`.
    pub fn new(store: S) -> Specs<S> {
        Specs { store }
    }

    /// Gives the store back.
    pub fn into_store(self) -> S {
        self.store
    }

    /// The store underneath (for watches).
    pub fn store(&self) -> &S {
        &self.store
    }

    fn read<T: DeserializeOwned>(&self, key: &str) -> Result<Option<Versioned<T>>, SpecError> {
        let Some(entry) = self.store.get(key)? else {
            return Ok(None);
        };
        let spec = serde_json::from_slice(&entry.value).map_err(|e| SpecError::Corrupt {
            key: key.to_string(),
            why: e.to_string(),
        })?;
        Ok(Some(Versioned {
            spec,
            revision: entry.revision,
        }))
    }

    fn read_all<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<Versioned<T>>, SpecError> {
        let (_, entries) = self.store.list(prefix)?;
        entries
            .into_iter()
            .map(|(key, e)| {
                let spec = serde_json::from_slice(&e.value).map_err(|err| SpecError::Corrupt {
                    key,
                    why: err.to_string(),
                })?;
                Ok(Versioned {
                    spec,
                    revision: e.revision,
                })
            })
            .collect()
    }

    fn json<T: Serialize>(spec: &T) -> Vec<u8> {
        serde_json::to_vec(spec).expect("specs always serialise")
    }

    /// Creates a volume; refused if the name is taken or the spec is invalid.
    pub fn create_volume(&self, spec: &VolumeSpec) -> Result<Revision, SpecError> {
        spec.check().map_err(SpecError::Invalid)?;
        let key = volume_key(&spec.name);
        let txn = Txn::new()
            .check(&key, Expect::Absent)
            .put(&key, Self::json(spec))
            .put(wire_secret_key(&spec.name), new_wire_secret()?)
            .put(chap_key(&spec.name), new_chap(&spec.name)?);
        match self.store.commit(txn) {
            Err(StoreError::Conflict { .. }) => Err(SpecError::Exists {
                kind: "volume",
                name: spec.name.clone(),
            }),
            other => Ok(other?),
        }
    }

    /// The volume named `name`.
    pub fn volume(&self, name: &str) -> Result<Versioned<VolumeSpec>, SpecError> {
        self.read(&volume_key(name))?.ok_or_else(|| SpecError::NotFound {
            kind: "volume",
            name: name.to_string(),
        })
    }

    /// Every volume, by name.
    pub fn volumes(&self) -> Result<Vec<Versioned<VolumeSpec>>, SpecError> {
        self.read_all("volumes/")
    }

    /// Replaces a volume's spec read at `revision` with `spec` (same name), after
    /// checking that the change is allowed: no shrinking, no change of sector size.
    pub fn update_volume(&self, spec: &VolumeSpec, revision: Revision) -> Result<Revision, SpecError> {
        spec.check().map_err(SpecError::Invalid)?;
        let old = self.volume(&spec.name)?;
        if spec.size < old.spec.size {
            return Err(SpecError::Refused(format!(
                "volume {} cannot shrink from {} to {} bytes",
                spec.name, old.spec.size, spec.size
            )));
        }
        if spec.sector_size != old.spec.sector_size {
            return Err(SpecError::Refused(format!(
                "volume {}: the sector size cannot change once data is written",
                spec.name
            )));
        }
        let key = volume_key(&spec.name);
        Ok(self.store.commit(
            Txn::new()
                .check(&key, Expect::At(revision))
                .put(&key, Self::json(spec)),
        )?)
    }

    /// Creates a volume together with its replicas' placements, in one transaction:
    /// refused if the name is taken, or if any node in `nodes` (name, revision read)
    /// changed since the placements were computed from it.
    pub fn create_volume_placed(
        &self,
        spec: &VolumeSpec,
        replicas: &[ReplicaSpec],
        nodes: &[(String, Revision)],
    ) -> Result<Revision, SpecError> {
        spec.check().map_err(SpecError::Invalid)?;
        let key = volume_key(&spec.name);
        let mut txn = Txn::new()
            .check(&key, Expect::Absent)
            .put(&key, Self::json(spec))
            .put(wire_secret_key(&spec.name), new_wire_secret()?)
            .put(chap_key(&spec.name), new_chap(&spec.name)?);
        for (node, revision) in nodes {
            txn = txn.check(node_key(node), Expect::At(*revision));
        }
        for r in replicas {
            check_name("replica", &r.id).map_err(SpecError::Invalid)?;
            let rk = replica_key(&spec.name, &r.id);
            txn = txn.check(&rk, Expect::Absent).put(rk, Self::json(r));
        }
        match self.store.commit(txn) {
            Err(StoreError::Conflict { key: k, .. }) if k == key => Err(SpecError::Exists {
                kind: "volume",
                name: spec.name.clone(),
            }),
            other => Ok(other?),
        }
    }

    /// Every replica of every volume.
    pub fn all_replicas(&self) -> Result<Vec<Versioned<ReplicaSpec>>, SpecError> {
        self.read_all("replicas/")
    }

    /// Deletes a volume and its replicas' specs; refused while it is attached.
    pub fn delete_volume(&self, name: &str) -> Result<Revision, SpecError> {
        let v = self.volume(name)?;
        if let Some(node) = &v.spec.attached_to {
            return Err(SpecError::Refused(format!(
                "volume {name} is attached to node {node}: detach it first"
            )));
        }
        let mut txn = Txn::new()
            .check(volume_key(name), Expect::At(v.revision))
            .delete(volume_key(name))
            .delete(membership_key(name))
            .delete(wire_secret_key(name))
            .delete(chap_key(name));
        for r in self.replicas(name)? {
            txn = txn
                .check(replica_key(name, &r.spec.id), Expect::At(r.revision))
                .delete(replica_key(name, &r.spec.id));
        }
        Ok(self.store.commit(txn)?)
    }

    /// Volume `volume`'s wire secret (`None`: the volume has none, and its replicas
    /// serve any peer).
    pub fn wire_secret(&self, volume: &str) -> Result<Option<horn_proto::auth::VolumeSecret>, SpecError> {
        let Some(spec) = self.read::<WireSecretSpec>(&wire_secret_key(volume))? else {
            return Ok(None);
        };
        horn_proto::auth::VolumeSecret::from_bytes(spec.spec.secret.as_bytes())
            .map(Some)
            .map_err(|e| SpecError::Invalid(format!("volume {volume}'s wire secret in the store: {e}")))
    }

    /// Volume `volume`'s iSCSI CHAP credentials (`None`: it has none, as a volume made
    /// before they were).
    pub fn chap(&self, volume: &str) -> Result<Option<ChapSpec>, SpecError> {
        Ok(self.read::<ChapSpec>(&chap_key(volume))?.map(|v| v.spec))
    }

    /// Volume `volume`'s membership as the manager holds it (`None`: no engine has
    /// begun a generation of it under the manager).
    pub fn membership(&self, volume: &str) -> Result<Option<Versioned<MembershipSpec>>, SpecError> {
        self.read(&membership_key(volume))
    }

    /// Reads `volume`'s membership, applies `change` (which may refuse), and writes it
    /// back if nothing else changed it meanwhile; tried again on a conflict.
    fn change_membership<T>(
        &self,
        volume: &str,
        change: impl Fn(&mut MembershipSpec) -> Result<T, SpecError>,
    ) -> Result<(T, MembershipSpec), SpecError> {
        let mut last = None;
        for _ in 0..MEMBERSHIP_TRIES {
            let v = self.volume(volume)?;
            let key = membership_key(volume);
            let (mut m, expect) = match self.membership(volume)? {
                Some(m) => (m.spec, Expect::At(m.revision)),
                None => (MembershipSpec::default(), Expect::Absent),
            };
            let before = m.clone();
            let out = change(&mut m)?;
            // The volume too must be the one read: a delete and re-create in between
            // starts a new membership.
            let txn = Txn::new()
                .check(volume_key(volume), Expect::At(v.revision))
                .check(&key, expect)
                .put(&key, Self::json(&m));
            match self.store.commit(txn) {
                Ok(_) => return Ok((out, before)),
                Err(e @ StoreError::Conflict { .. }) => last = Some(e),
                Err(e) => return Err(e.into()),
            }
        }
        Err(last.expect("tried at least once").into())
    }

    /// Begins a generation of at least `at_least` for engine `engine` on `node`: one
    /// above every generation begun before, from which the manager takes records from
    /// that engine only. Returns the generation and the membership as it was.
    pub fn begin_generation(
        &self,
        volume: &str,
        at_least: u64,
        engine: &str,
        node: &str,
    ) -> Result<(u64, MembershipSpec), SpecError> {
        if engine.is_empty() || node.is_empty() {
            return Err(SpecError::Invalid(
                "beginning a generation needs the engine's identity and its node".into(),
            ));
        }
        self.change_membership(volume, |m| {
            let next = m
                .generation
                .checked_add(1)
                .map(|g| g.max(at_least))
                .ok_or_else(|| {
                    SpecError::Refused(format!("volume {volume}: the generation is at its maximum"))
                })?;
            m.generation = next;
            m.engine = engine.to_string();
            m.node = node.to_string();
            Ok(next)
        })
    }

    /// Stores `record`, put by the engine on `node`: refused unless that engine began
    /// the generation in force and the record is newer than the one held.
    pub fn put_membership(&self, volume: &str, record: &Record, node: &str) -> Result<(), SpecError> {
        let spec = self.volume(volume)?.spec;
        if let Some(id) = spec.volume_id.as_deref().filter(|id| *id != record.volume) {
            return Err(SpecError::Refused(format!(
                "volume {volume} is {id}; the record is of {}",
                record.volume
            )));
        }
        self.change_membership(volume, |m| {
            if m.generation != record.generation || m.engine != record.engine {
                return Err(SpecError::Refused(format!(
                    "volume {volume}: generation {} has begun (engine {} on node {}); the record of \
                     generation {} (engine {}) is from an engine fenced out",
                    m.generation, m.engine, m.node, record.generation, record.engine
                )));
            }
            if let Some(held) = m.record.as_ref().filter(|h| h.epoch() >= record.epoch()) {
                return Err(SpecError::Refused(format!(
                    "volume {volume}: the record held (generation {} version {}) is not older than \
                     the one put (version {})",
                    held.generation, held.version, record.version
                )));
            }
            m.record = Some(record.clone());
            m.record_node = node.to_string();
            Ok(())
        })
        .map(|_| ())
    }

    /// Creates secret `spec`; refused if the name is taken.
    pub fn create_secret(&self, spec: &SecretSpec) -> Result<Revision, SpecError> {
        check_name("secret", &spec.name).map_err(SpecError::Invalid)?;
        let key = secret_key(&spec.name);
        match self
            .store
            .commit(Txn::new().check(&key, Expect::Absent).put(&key, Self::json(spec)))
        {
            Err(StoreError::Conflict { .. }) => Err(SpecError::Exists {
                kind: "secret",
                name: spec.name.clone(),
            }),
            other => Ok(other?),
        }
    }

    /// The secret named `name`.
    pub fn secret(&self, name: &str) -> Result<Versioned<SecretSpec>, SpecError> {
        self.read(&secret_key(name))?.ok_or_else(|| SpecError::NotFound {
            kind: "secret",
            name: name.to_string(),
        })
    }

    /// Every secret, by name.
    pub fn secrets(&self) -> Result<Vec<Versioned<SecretSpec>>, SpecError> {
        self.read_all("secrets/")
    }

    /// Deletes secret `name`; refused while a volume is encrypted with it.
    pub fn delete_secret(&self, name: &str) -> Result<Revision, SpecError> {
        let s = self.secret(name)?;
        let users: Vec<String> = self
            .volumes()?
            .into_iter()
            .filter(|v| v.spec.key_secret.as_deref() == Some(name))
            .map(|v| v.spec.name)
            .collect();
        if !users.is_empty() {
            return Err(SpecError::Refused(format!(
                "secret {name} is the key of volume(s) {}: delete them first (their data cannot be read without it)",
                users.join(", ")
            )));
        }
        Ok(self.store.commit(
            Txn::new()
                .check(secret_key(name), Expect::At(s.revision))
                .delete(secret_key(name)),
        )?)
    }

    /// Puts backup target `spec`, replacing the one of its name.
    pub fn put_backup_target(&self, spec: &BackupTargetSpec) -> Result<Revision, SpecError> {
        spec.check().map_err(SpecError::Invalid)?;
        Ok(self
            .store
            .commit(Txn::new().put(backup_target_key(&spec.name), Self::json(spec)))?)
    }

    /// The backup target named `name`.
    pub fn backup_target(&self, name: &str) -> Result<Versioned<BackupTargetSpec>, SpecError> {
        self.read(&backup_target_key(name))?
            .ok_or_else(|| SpecError::NotFound {
                kind: "backup target",
                name: name.to_string(),
            })
    }

    /// Every backup target, by name.
    pub fn backup_targets(&self) -> Result<Vec<Versioned<BackupTargetSpec>>, SpecError> {
        self.read_all("backup-targets/")
    }

    /// Deletes backup target `name`; refused while a job or a restoring volume uses it.
    pub fn delete_backup_target(&self, name: &str) -> Result<BackupTargetSpec, SpecError> {
        let t = self.backup_target(name)?;
        let mut users: Vec<String> = self
            .jobs()?
            .into_iter()
            .filter(|j| j.spec.target.as_deref() == Some(name))
            .map(|j| format!("job {}", j.spec.name))
            .collect();
        users.extend(
            self.volumes()?
                .into_iter()
                .filter(|v| v.spec.restore.as_ref().is_some_and(|r| r.target == name))
                .map(|v| format!("volume {} (restoring from it)", v.spec.name)),
        );
        if !users.is_empty() {
            return Err(SpecError::Refused(format!(
                "backup target {name} is used by {}",
                users.join(", ")
            )));
        }
        self.store.commit(
            Txn::new()
                .check(backup_target_key(name), Expect::At(t.revision))
                .delete(backup_target_key(name)),
        )?;
        Ok(t.spec)
    }

    /// Puts job `spec`, replacing the one of its name (its history stays); a backup
    /// job's target must exist.
    pub fn put_job(&self, spec: &JobSpec) -> Result<Revision, SpecError> {
        spec.check().map_err(SpecError::Invalid)?;
        let mut txn = Txn::new();
        if let Some(t) = &spec.target {
            let target = self.backup_target(t)?;
            txn = txn.check(backup_target_key(t), Expect::At(target.revision));
        }
        Ok(self
            .store
            .commit(txn.put(job_key(&spec.name), Self::json(spec)))?)
    }

    /// The job named `name`.
    pub fn job(&self, name: &str) -> Result<Versioned<JobSpec>, SpecError> {
        self.read(&job_key(name))?.ok_or_else(|| SpecError::NotFound {
            kind: "job",
            name: name.to_string(),
        })
    }

    /// Every job, by name.
    pub fn jobs(&self) -> Result<Vec<Versioned<JobSpec>>, SpecError> {
        self.read_all("jobs/")
    }

    /// Deletes job `name` and its history (what it made stays).
    pub fn delete_job(&self, name: &str) -> Result<JobSpec, SpecError> {
        let j = self.job(name)?;
        self.store.commit(
            Txn::new()
                .check(job_key(name), Expect::At(j.revision))
                .delete(job_key(name))
                .delete(job_state_key(name)),
        )?;
        Ok(j.spec)
    }

    /// Job `name`'s runs so far (none yet: the default).
    pub fn job_state(&self, name: &str) -> Result<Versioned<JobState>, SpecError> {
        Ok(self.read(&job_state_key(name))?.unwrap_or(Versioned {
            spec: JobState::default(),
            revision: 0,
        }))
    }

    /// Replaces job `name`'s state read at `revision` (0: none yet), while the job
    /// exists.
    pub fn put_job_state(
        &self,
        name: &str,
        state: &JobState,
        revision: Revision,
    ) -> Result<Revision, SpecError> {
        let job = self.job(name)?;
        let expect = if revision == 0 {
            Expect::Absent
        } else {
            Expect::At(revision)
        };
        Ok(self.store.commit(
            Txn::new()
                .check(job_key(name), Expect::At(job.revision))
                .check(job_state_key(name), expect)
                .put(job_state_key(name), Self::json(state)),
        )?)
    }

    /// Registers a node or replaces its spec (an agent registers at every start).
    pub fn put_node(&self, spec: &NodeSpec) -> Result<Revision, SpecError> {
        spec.check().map_err(SpecError::Invalid)?;
        Ok(self
            .store
            .commit(Txn::new().put(node_key(&spec.name), Self::json(spec)))?)
    }

    /// Replaces a node's spec read at `revision` (an operator's change: a disk
    /// added or removed).
    pub fn update_node(&self, spec: &NodeSpec, revision: Revision) -> Result<Revision, SpecError> {
        spec.check().map_err(SpecError::Invalid)?;
        let key = node_key(&spec.name);
        Ok(self.store.commit(
            Txn::new()
                .check(&key, Expect::At(revision))
                .put(&key, Self::json(spec)),
        )?)
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Result<Versioned<NodeSpec>, SpecError> {
        self.read(&node_key(name))?.ok_or_else(|| SpecError::NotFound {
            kind: "node",
            name: name.to_string(),
        })
    }

    /// Cordons or uncordons node `name` (read, changed, written if unchanged since:
    /// retried a few times against concurrent writers).
    pub fn set_cordoned(&self, name: &str, cordoned: bool) -> Result<Versioned<NodeSpec>, SpecError> {
        let mut tries = 0;
        loop {
            let mut n = self.node(name)?;
            n.spec.cordoned = cordoned;
            let key = node_key(name);
            match self.store.commit(
                Txn::new()
                    .check(&key, Expect::At(n.revision))
                    .put(&key, Self::json(&n.spec)),
            ) {
                Ok(revision) => {
                    return Ok(Versioned {
                        spec: n.spec,
                        revision,
                    })
                }
                Err(StoreError::Conflict { .. }) if tries < 5 => tries += 1,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Every node, by name.
    pub fn nodes(&self) -> Result<Vec<Versioned<NodeSpec>>, SpecError> {
        self.read_all("nodes/")
    }

    /// Records a replica of `spec.volume` placed by the scheduler, if the volume is
    /// still as read at `volume_revision` and the node exists.
    pub fn add_replica(&self, spec: &ReplicaSpec, volume_revision: Revision) -> Result<Revision, SpecError> {
        check_name("replica", &spec.id).map_err(SpecError::Invalid)?;
        let node = self.node(&spec.node)?;
        if !node.spec.disks.iter().any(|d| d.path == spec.disk) {
            return Err(SpecError::Invalid(format!(
                "node {} has no disk {}",
                spec.node, spec.disk
            )));
        }
        let key = replica_key(&spec.volume, &spec.id);
        Ok(self.store.commit(
            Txn::new()
                .check(volume_key(&spec.volume), Expect::At(volume_revision))
                .check(node_key(&spec.node), Expect::At(node.revision))
                .check(&key, Expect::Absent)
                .put(&key, Self::json(spec)),
        )?)
    }

    /// Removes replica `old` (as read) of a volume still as read at `volume_revision`
    /// (a best-effort volume's extra replica once one on its attached node is RW).
    pub fn remove_replica(
        &self,
        old: &Versioned<ReplicaSpec>,
        volume_revision: Revision,
    ) -> Result<Revision, SpecError> {
        let key = replica_key(&old.spec.volume, &old.spec.id);
        Ok(self.store.commit(
            Txn::new()
                .check(volume_key(&old.spec.volume), Expect::At(volume_revision))
                .check(&key, Expect::At(old.revision))
                .delete(key),
        )?)
    }

    /// Attaches a volume (as read at `revision`, now `spec`) and places its replica
    /// `replica` in one transaction, if the replica's node is unchanged since it was
    /// placed (`node_revision`): a strict-local volume gets its replica at its first
    /// attach, on the attached node.
    pub fn attach_placed(
        &self,
        spec: &VolumeSpec,
        revision: Revision,
        replica: &ReplicaSpec,
        node_revision: Revision,
    ) -> Result<Revision, SpecError> {
        spec.check().map_err(SpecError::Invalid)?;
        check_name("replica", &replica.id).map_err(SpecError::Invalid)?;
        let key = replica_key(&spec.name, &replica.id);
        Ok(self.store.commit(
            Txn::new()
                .check(volume_key(&spec.name), Expect::At(revision))
                .check(node_key(&replica.node), Expect::At(node_revision))
                .check(&key, Expect::Absent)
                .put(volume_key(&spec.name), Self::json(spec))
                .put(&key, Self::json(replica)),
        )?)
    }

    /// Replaces replica `old` (as read) with `new` of the same volume in one
    /// transaction, if the volume is still as read at `volume_revision` and `new`'s
    /// node is unchanged since it was placed (`node_revision`).
    pub fn replace_replica(
        &self,
        old: &Versioned<ReplicaSpec>,
        new: &ReplicaSpec,
        volume_revision: Revision,
        node_revision: Revision,
    ) -> Result<Revision, SpecError> {
        check_name("replica", &new.id).map_err(SpecError::Invalid)?;
        if old.spec.volume != new.volume {
            return Err(SpecError::Invalid(format!(
                "replica {} of {} cannot replace one of {}",
                new.id, new.volume, old.spec.volume
            )));
        }
        let old_key = replica_key(&old.spec.volume, &old.spec.id);
        let key = replica_key(&new.volume, &new.id);
        Ok(self.store.commit(
            Txn::new()
                .check(volume_key(&new.volume), Expect::At(volume_revision))
                .check(node_key(&new.node), Expect::At(node_revision))
                .check(&old_key, Expect::At(old.revision))
                .check(&key, Expect::Absent)
                .delete(old_key)
                .put(&key, Self::json(new)),
        )?)
    }

    /// The replicas of `volume`, by id.
    pub fn replicas(&self, volume: &str) -> Result<Vec<Versioned<ReplicaSpec>>, SpecError> {
        self.read_all(&format!("replicas/{volume}/"))
    }

    /// The settings (the defaults until someone changes them).
    pub fn settings(&self) -> Result<Versioned<Settings>, SpecError> {
        Ok(self.read(SETTINGS_KEY)?.unwrap_or(Versioned {
            spec: Settings::default(),
            revision: 0,
        }))
    }

    /// Replaces the settings read at `revision` (0: never written).
    pub fn put_settings(&self, settings: &Settings, revision: Revision) -> Result<Revision, SpecError> {
        let s = &settings.scheduling;
        if s.over_provisioning_percent == 0 || s.over_provisioning_percent > 1000 {
            return Err(SpecError::Invalid(format!(
                "over-provisioning {}%: give 1 to 1000",
                s.over_provisioning_percent
            )));
        }
        if s.minimal_available_percent > 100 {
            return Err(SpecError::Invalid(format!(
                "minimal available {}%: give 0 to 100",
                s.minimal_available_percent
            )));
        }
        if !(2..=3600).contains(&settings.node_lease_secs) {
            return Err(SpecError::Invalid(format!(
                "a node lease of {} s: give 2 to 3600 (the agent renews it every third)",
                settings.node_lease_secs
            )));
        }
        if settings.replica_replenishment_wait_secs > 7 * 86400 {
            return Err(SpecError::Invalid(format!(
                "a replica replenishment wait of {} s: give at most a week (604800)",
                settings.replica_replenishment_wait_secs
            )));
        }
        if !(1..=86400).contains(&settings.backup_poll_interval_secs) {
            return Err(SpecError::Invalid(format!(
                "a backup poll interval of {} s: give 1 to 86400",
                settings.backup_poll_interval_secs
            )));
        }
        let expect = if revision == 0 {
            Expect::Absent
        } else {
            Expect::At(revision)
        };
        Ok(self.store.commit(
            Txn::new()
                .check(SETTINGS_KEY, expect)
                .put(SETTINGS_KEY, Self::json(settings)),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    fn specs() -> (tempfile::TempDir, Specs<EmbeddedStore>) {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path().join("specs.redb")).unwrap();
        (dir, Specs::new(store))
    }

    fn volume(name: &str) -> VolumeSpec {
        VolumeSpec {
            name: name.into(),
            size: 1 << 30,
            replicas: 3,
            sector_size: 512,
            frontend: Frontend::Ublk,
            data_locality: DataLocality::Disabled,
            node_selector: BTreeSet::new(),
            disk_selector: BTreeSet::new(),
            attached_to: None,
            maintenance: false,
            volume_id: None,
            key_secret: None,
            no_chap: false,
            data_tls: false,
            groups: Default::default(),
            restore: None,
        }
    }

    fn node(name: &str) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            address: "10.0.0.1:9700".into(),
            zone: String::new(),
            tags: BTreeSet::new(),
            cordoned: false,
            disks: vec![DiskSpec {
                path: "/var/lib/horn".into(),
                tags: BTreeSet::new(),
                reserved: 0,
                allow_scheduling: true,
                added: false,
            }],
        }
    }

    #[test]
    fn bad_volume_specs_are_refused_with_what_to_change_and_nothing_is_written() {
        let (_d, s) = specs();
        let cases: Vec<(VolumeSpec, &str)> = vec![
            (
                VolumeSpec {
                    size: 1000,
                    ..volume("a")
                },
                "multiple of 4096",
            ),
            (
                VolumeSpec {
                    size: 0,
                    ..volume("a")
                },
                "cannot be empty",
            ),
            (
                VolumeSpec {
                    replicas: 0,
                    ..volume("a")
                },
                "1 to 16",
            ),
            (
                VolumeSpec {
                    sector_size: 1024,
                    ..volume("a")
                },
                "not 512 or 4096",
            ),
            (
                VolumeSpec {
                    name: "a/b".into(),
                    ..volume("a")
                },
                "volume name",
            ),
            (
                VolumeSpec {
                    data_locality: DataLocality::StrictLocal,
                    ..volume("a")
                },
                "keeps one replica",
            ),
        ];
        for (spec, says) in cases {
            let err = s.create_volume(&spec).unwrap_err().to_string();
            assert!(err.contains(says), "{spec:?}: {err}");
        }
        assert!(s.volumes().unwrap().is_empty());
    }

    #[test]
    fn a_duplicate_name_a_shrink_and_deleting_an_attached_volume_are_refused() {
        let (_d, s) = specs();
        s.create_volume(&volume("data")).unwrap();
        let err = s.create_volume(&volume("data")).unwrap_err();
        assert_eq!(err.to_string(), "volume data exists already");
        let v = s.volume("data").unwrap();
        let smaller = VolumeSpec {
            size: 1 << 29,
            ..v.spec.clone()
        };
        assert!(s
            .update_volume(&smaller, v.revision)
            .unwrap_err()
            .to_string()
            .contains("cannot shrink"));
        let attached = VolumeSpec {
            attached_to: Some("n1".into()),
            maintenance: false,
            volume_id: None,
            size: 2 << 30,
            ..v.spec.clone()
        };
        let r = s.update_volume(&attached, v.revision).unwrap();
        // A second writer that read the old revision loses.
        let other = VolumeSpec {
            size: 3 << 30,
            ..v.spec.clone()
        };
        assert!(matches!(
            s.update_volume(&other, v.revision),
            Err(SpecError::Store(StoreError::Conflict { .. }))
        ));
        assert!(s
            .delete_volume("data")
            .unwrap_err()
            .to_string()
            .contains("detach it first"));
        s.update_volume(&v.spec.clone(), r).unwrap_err(); // shrinking back is refused too
        let detached = VolumeSpec {
            attached_to: None,
            maintenance: false,
            volume_id: None,
            ..attached
        };
        s.update_volume(&detached, r).unwrap();
        s.delete_volume("data").unwrap();
        assert!(matches!(s.volume("data"), Err(SpecError::NotFound { .. })));
    }

    #[test]
    fn replicas_are_recorded_against_the_volume_and_node_as_read_and_go_with_the_volume() {
        let (_d, s) = specs();
        s.create_volume(&volume("data")).unwrap();
        s.put_node(&node("n1")).unwrap();
        let v = s.volume("data").unwrap();
        let r = ReplicaSpec {
            id: "r1".into(),
            volume: "data".into(),
            node: "n1".into(),
            disk: "/var/lib/horn".into(),
        };
        s.add_replica(&r, v.revision).unwrap();
        assert!(
            s.add_replica(&r, v.revision).is_err(),
            "a replica id is used once"
        );
        let elsewhere = ReplicaSpec {
            disk: "/nope".into(),
            id: "r2".into(),
            ..r.clone()
        };
        assert!(s
            .add_replica(&elsewhere, v.revision)
            .unwrap_err()
            .to_string()
            .contains("has no disk /nope"));
        // The volume changed since it was read: the placement is refused.
        let v2 = VolumeSpec {
            size: 2 << 30,
            ..v.spec.clone()
        };
        s.update_volume(&v2, v.revision).unwrap();
        let late = ReplicaSpec { id: "r3".into(), ..r };
        assert!(s.add_replica(&late, v.revision).is_err());
        assert_eq!(s.replicas("data").unwrap().len(), 1);
        s.delete_volume("data").unwrap();
        assert!(s.replicas("data").unwrap().is_empty());
    }

    #[test]
    fn settings_default_until_written_and_bad_ones_are_refused() {
        let (_d, s) = specs();
        let cur = s.settings().unwrap();
        assert_eq!(cur.spec, Settings::default());
        let mut bad = cur.spec.clone();
        bad.scheduling.over_provisioning_percent = 0;
        assert!(s.put_settings(&bad, cur.revision).is_err());
        let mut good = cur.spec.clone();
        good.replica_replenishment_wait_secs = 0;
        let r = s.put_settings(&good, cur.revision).unwrap();
        assert_eq!(
            s.settings().unwrap(),
            Versioned {
                spec: good.clone(),
                revision: r
            }
        );
        assert!(s.put_settings(&good, 0).is_err(), "a stale writer loses");
    }

    #[test]
    fn bad_node_specs_are_refused() {
        let (_d, s) = specs();
        let mut n = node("n1");
        n.address = "somewhere".into();
        assert!(s.put_node(&n).unwrap_err().to_string().contains("not IP:PORT"));
        let mut n = node("n1");
        n.disks.push(n.disks[0].clone());
        assert!(s.put_node(&n).unwrap_err().to_string().contains("listed twice"));
        let mut n = node("n1");
        n.disks[0].path = "relative".into();
        assert!(s.put_node(&n).unwrap_err().to_string().contains("not absolute"));
        assert!(s.nodes().unwrap().is_empty());
    }

    fn job(name: &str) -> JobSpec {
        JobSpec {
            name: name.into(),
            task: JobTask::Backup,
            cron: "0 2 * * *".into(),
            retain: 3,
            volumes: ["v1".to_string()].into(),
            groups: Default::default(),
            target: Some("t1".into()),
            labels: Default::default(),
        }
    }

    #[test]
    fn jobs_need_a_schedule_volumes_and_for_backups_an_existing_target() {
        let (dir, s) = specs();
        assert!(matches!(
            s.put_job(&job("j1")),
            Err(SpecError::NotFound {
                kind: "backup target",
                ..
            })
        ));
        let target = BackupTargetSpec {
            name: "t1".into(),
            url: format!("file://{}", dir.path().display()),
            endpoint: String::new(),
            region: String::new(),
            access_key: String::new(),
            secret_key: String::new(),
        };
        s.put_backup_target(&target).unwrap();
        s.put_job(&job("j1")).unwrap();
        for (change, says) in [
            (
                Box::new(|j: &mut JobSpec| j.cron = "* * *".into()) as Box<dyn Fn(&mut JobSpec)>,
                "cron",
            ),
            (Box::new(|j: &mut JobSpec| j.retain = MAX_RETAIN + 1), "retain"),
            (Box::new(|j: &mut JobSpec| j.volumes.clear()), "volume"),
            (Box::new(|j: &mut JobSpec| j.target = None), "target"),
            (
                Box::new(|j: &mut JobSpec| j.task = JobTask::Snapshot),
                "snapshot job",
            ),
            (
                Box::new(|j: &mut JobSpec| {
                    j.labels.insert(JOB_LABEL.into(), "x".into());
                }),
                JOB_LABEL,
            ),
        ] {
            let mut j = job("j2");
            change(&mut j);
            let e = s.put_job(&j).unwrap_err().to_string();
            assert!(e.contains(says), "{says}: {e}");
        }
        assert_eq!(s.jobs().unwrap().len(), 1);
        // A target a job uses stays; the job's state goes with the job.
        assert!(s
            .delete_backup_target("t1")
            .unwrap_err()
            .to_string()
            .contains("job j1"));
        s.put_job_state("j1", &JobState::default(), 0).unwrap();
        s.delete_job("j1").unwrap();
        assert_eq!(s.job_state("j1").unwrap().revision, 0);
        assert!(
            s.put_job_state("j1", &JobState::default(), 0).is_err(),
            "no state without its job"
        );
        s.delete_backup_target("t1").unwrap();
    }

    #[test]
    fn a_restore_source_reads_target_volume_and_backup() {
        let r = RestoreSpec::parse("t1?volume=v1&backup=b2", false).unwrap();
        assert_eq!(
            (r.target.as_str(), r.volume.as_str(), r.backup.as_deref()),
            ("t1", "v1", Some("b2"))
        );
        assert_eq!(r.source(), "t1?volume=v1&backup=b2");
        let r = RestoreSpec::parse("s3://bucket/pre?fix?volume=v1", true).unwrap();
        assert_eq!((r.target.as_str(), r.backup), ("s3://bucket/pre?fix", None));
        for bad in [
            "t1",
            "t1?vol=v1",
            "t1?volume=",
            "t1?volume=a/b",
            "t1?volume=v1&backup=b 1",
        ] {
            assert!(RestoreSpec::parse(bad, false).is_err(), "{bad}");
        }
        assert!(RestoreSpec::parse("t1?volume=v1&backup=b1", true)
            .unwrap_err()
            .contains("standby"));
    }
}
