//! `hornctl cluster|volume|node`: the manager's commands, as `hornctl` parses and runs
//! them. Tables for people, `--json` for scripts; every call goes over mutual TLS with
//! the caller's certificate from the cluster's CA (the admin's, by default).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use horn_proto::manager_api as pb;
use horn_proto::manager_api::manager_client::ManagerClient;
use serde_json::json;
use tonic::transport::Channel;

use crate::api::rewire;
use crate::api::{ClusterIdentity, DEFAULT_MANAGER, TOKEN_FILE};
use crate::format::{human_bytes, parse_size, print_snapshots, print_verify, table};

/// A `KEY=VALUE` label.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label {s:?} is not KEY=VALUE"))
}

/// Where the manager is, and the credentials to call it with.
#[derive(Args, Debug, Clone)]
pub struct ManagerAddr {
    /// The manager's address (`hornd manager --listen`).
    #[arg(long, global = true, env = "HORN_MANAGER", default_value = DEFAULT_MANAGER)]
    pub manager: String,
    /// The file holding the cluster token (`hornctl cluster init` writes it). Only a
    /// joining node uses the token; `hornctl` finds its credentials beside it unless
    /// `--credentials` says where.
    #[arg(
        long,
        global = true,
        env = "HORN_TOKEN_FILE",
        default_value = "/var/lib/horn/cluster-token"
    )]
    pub token_file: PathBuf,
    /// The directory of the credentials to call with: `NAME.pem`, `NAME.key` and the
    /// cluster CA's `ca.pem` (default: the token file's directory, where `hornctl
    /// cluster init` wrote the admin's).
    #[arg(long, global = true, env = "HORN_CREDENTIALS")]
    pub credentials: Option<PathBuf>,
    /// The credentials' NAME in that directory.
    #[arg(long = "as", global = true, env = "HORN_IDENTITY", default_value = "admin")]
    pub identity: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// `hornctl cluster ...`
#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Create the cluster's identity (its id and token) in the manager's directory,
    /// before the first `hornd manager --data DIR`. Refused if one is there.
    Init {
        /// The manager's directory.
        #[arg(long, default_value = "/var/lib/horn")]
        data: PathBuf,
    },
    /// The cluster's id, store and object counts.
    Info,
    /// Issue credentials for a role (admin only) and write them to DIR as
    /// NAME.pem, NAME.key (0600) and ca.pem, for `hornctl --credentials DIR --as NAME`.
    Credentials {
        /// admin, read-only, or node:NAME.
        #[arg(long)]
        role: String,
        /// The directory to write them to.
        #[arg(long)]
        out: PathBuf,
        /// The files' NAME.
        #[arg(long)]
        name: String,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Make a join token (admin only): `hornd node --join TOKEN --ca-file ca.pem`
    /// on a new machine gets it a node certificate. Good for one join, within
    /// --ttl; the cluster token never has to leave the manager's machine.
    JoinToken {
        /// How long it is good for: NUMBER with s, m, h or d (at most 7d).
        #[arg(long, default_value = "1h", value_parser = parse_lifetime)]
        ttl: Duration,
        /// The only node name it joins (default: any).
        #[arg(long)]
        node: Option<String>,
    },
    /// Renew the credentials hornctl uses (--credentials DIR --as NAME) in place:
    /// a new key and a certificate for the same role, valid for the manager's
    /// certificate lifetime. Before they expire: an expired one is refused.
    Renew,
    /// Roll the cluster's CA (admin only), without stopping anything: `rotate`
    /// makes a new CA that every node comes to trust; once all do, it signs and
    /// every node renews from it (the manager's own and admin credentials in its
    /// directory too); `rotate --finish` then retires the old CA (refused while a
    /// node still holds an old certificate). Other credentials issued with
    /// `cluster credentials` must `cluster renew` before the finish.
    Rotate {
        /// Retire the old CA.
        #[arg(long, conflicts_with = "status")]
        finish: bool,
        /// Only say where a roll stands.
        #[arg(long)]
        status: bool,
    },
}

/// `hornctl volume ...`
#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Create a volume and place its replicas on distinct nodes.
    Create {
        /// The volume's name: 1-63 of A-Z a-z 0-9 . _ -
        name: String,
        /// Its size (a multiple of 4096; K, M, G, T units); from a backup, at least the
        /// backup's (its size if left out).
        #[arg(long, value_parser = parse_size, required_unless_present = "from_backup")]
        size: Option<u64>,
        /// Restore it from a backup: TARGET?volume=VOLUME[&backup=BACKUP], TARGET a
        /// backup target's name (`hornctl backup-target add`) or URL; without a backup,
        /// the newest. The manager attaches it without a frontend to restore it, then
        /// detaches it.
        #[arg(long, value_name = "TARGET?volume=VOLUME[&backup=BACKUP]")]
        from_backup: Option<String>,
        /// Keep following the source volume's newest backups (a disaster-recovery
        /// standby) until `hornctl volume activate`.
        #[arg(long, requires = "from_backup")]
        standby: bool,
        /// A job group (`hornctl job create --group`); repeat for more.
        #[arg(long = "group")]
        groups: Vec<String>,
        /// How many replicas.
        #[arg(long, default_value_t = 3)]
        replicas: u32,
        /// 512 or 4096.
        #[arg(long, default_value_t = 512)]
        sector_size: u32,
        /// ublk or iscsi.
        #[arg(long, default_value = "ublk")]
        frontend: String,
        /// disabled, best-effort (a replica is moved to the node the volume is
        /// attached to, when one fits there) or strict-local (one replica, placed on
        /// the node of the first attach, and served only there).
        #[arg(long, default_value = "disabled")]
        data_locality: String,
        /// A tag every replica's node must carry; repeat for more.
        #[arg(long = "node-selector")]
        node_selector: Vec<String>,
        /// A tag every replica's disk must carry; repeat for more.
        #[arg(long = "disk-selector")]
        disk_selector: Vec<String>,
        /// Encrypt the volume in its engine (AES-256-XTS): replicas and the data wire
        /// only see ciphertext. Needs `--key-secret`.
        #[arg(long, requires = "key_secret")]
        encrypted: bool,
        /// The secret holding the key (`hornctl secret create NAME`).
        #[arg(long, requires = "encrypted")]
        key_secret: Option<String>,
        /// Serve it over iSCSI without CHAP: any initiator that reaches the portal may
        /// read and write it. By default initiators log in with the volume's CHAP
        /// credentials (`hornctl volume credentials NAME`).
        #[arg(long)]
        no_chap: bool,
        /// Carry its data wire (engine to replicas) over mutual TLS, for a network
        /// where traffic may be read; costs IOPS and CPU (docs/benchmarks.md).
        #[arg(long)]
        data_tls: bool,
    },
    /// Make a standby volume a normal one: the newest backup of its source is applied,
    /// then it is detached, ready to attach. Waits until then (or --timeout).
    Activate {
        /// The volume's name.
        name: String,
        /// Seconds to wait (0: do not wait).
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Back up an attached volume to one of the cluster's backup targets: a snapshot,
    /// then only the blocks changed since its last backup there.
    Backup {
        /// The volume's name.
        name: String,
        /// The backup target's name (`hornctl backup-target list`).
        #[arg(long)]
        target: String,
        /// The backup's name (default: the volume's and the time).
        #[arg(long = "backup-name")]
        backup: Option<String>,
        /// Read and send every block, replacing any the target holds damaged.
        #[arg(long)]
        full: bool,
        /// lz4, zstd or none.
        #[arg(long, default_value = "lz4")]
        compression: String,
        /// A label KEY=VALUE; repeat for more.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Set a volume's job groups (none: it leaves every group).
    Groups {
        /// The volume's name.
        name: String,
        /// Its groups.
        groups: Vec<String>,
    },
    /// Every volume.
    List,
    /// One volume with its replicas' placements.
    Info {
        /// The volume's name.
        name: String,
    },
    /// The iSCSI CHAP credentials initiators log in to the volume with (its
    /// target refuses a login without them).
    Credentials {
        /// The volume's name.
        name: String,
    },
    /// Delete a volume (refused while it is attached): its replicas are stopped and
    /// their files removed on every node.
    Delete {
        /// The volume's name.
        name: String,
    },
    /// Attach a volume to a node: the node's agent starts its engine there, served
    /// through the volume's frontend. Waits until it is served (or --timeout).
    Attach {
        /// The volume's name.
        name: String,
        /// The node to serve it on.
        node: String,
        /// Seconds to wait for the volume to be served (0: do not wait).
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Maintenance mode: the engine runs without its frontend (for `revert`).
        #[arg(long)]
        maintenance: bool,
    },
    /// Take a snapshot of an attached volume on every replica (I/O paused and flushed).
    Snapshot {
        /// The volume's name.
        name: String,
        /// The snapshot's name.
        snapshot: String,
        /// A label, KEY=VALUE; repeat for more.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// An attached volume's snapshots.
    Snapshots {
        /// The volume's name.
        name: String,
    },
    /// Delete a snapshot of an attached volume and reclaim its space.
    DeleteSnapshot {
        /// The volume's name.
        name: String,
        /// The snapshot's name.
        snapshot: String,
    },
    /// Revert a volume attached in maintenance mode to a snapshot (the data written
    /// since is discarded).
    Revert {
        /// The volume's name.
        name: String,
        /// The snapshot's name.
        snapshot: String,
    },
    /// Grow an attached volume online (never shrink).
    Expand {
        /// The volume's name.
        name: String,
        /// The new size (a multiple of 4096; K, M, G, T units).
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Compare an attached volume's RW replicas block by block; fails if they differ.
    Verify {
        /// The volume's name.
        name: String,
    },
    /// Detach a volume: its engine is stopped cleanly. Waits until it is (or --timeout).
    Detach {
        /// The volume's name.
        name: String,
        /// Seconds to wait for the engine to stop (0: do not wait).
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Detach even while its ublk device is mounted or held open (its users
        /// then get I/O errors).
        #[arg(long)]
        force: bool,
    },
}

/// `hornctl secret ...`
#[derive(Subcommand, Debug)]
pub enum SecretCmd {
    /// Create a secret holding a volume key: 64 random bytes the manager makes, or
    /// the key in a file (64 bytes, raw or 128 hex digits).
    Create {
        /// The secret's name.
        name: String,
        /// The key's file.
        #[arg(long)]
        from_file: Option<std::path::PathBuf>,
    },
    /// Every secret's name and the volumes encrypted with it (never a value).
    List,
    /// Delete a secret (refused while a volume is encrypted with it).
    Delete {
        /// The secret's name.
        name: String,
    },
}

/// Runs `hornctl secret CMD`.
pub fn run_secret(addr: ManagerAddr, cmd: SecretCmd) -> Result<()> {
    runtime()?.block_on(async {
        let mut c = connect(&addr).await?;
        match cmd {
            SecretCmd::Create { name, from_file } => {
                let value = match from_file {
                    None => Vec::new(),
                    Some(f) => horn_engine::crypt::read_key(&f).map_err(anyhow::Error::msg)?,
                };
                let s = c
                    .create_secret(pb::CreateSecretRequest { name, value })
                    .await
                    .map_err(refused(&addr))?
                    .into_inner();
                if addr.json {
                    println!("{}", json!({ "name": s.name }));
                } else {
                    println!("secret {} created", s.name);
                }
            }
            SecretCmd::List => {
                let list = c
                    .list_secrets(pb::ListSecretsRequest {})
                    .await
                    .map_err(refused(&addr))?
                    .into_inner();
                if addr.json {
                    let v: Vec<_> = list
                        .secrets
                        .iter()
                        .map(|s| json!({ "name": s.name, "volumes": s.volumes }))
                        .collect();
                    println!("{}", json!(v));
                } else {
                    let rows: Vec<_> = list
                        .secrets
                        .iter()
                        .map(|s| {
                            vec![
                                s.name.clone(),
                                if s.volumes.is_empty() {
                                    "-".into()
                                } else {
                                    s.volumes.join(",")
                                },
                            ]
                        })
                        .collect();
                    print!("{}", table(&["SECRET", "VOLUMES"], &rows));
                }
            }
            SecretCmd::Delete { name } => {
                c.delete_secret(pb::SecretRef { name: name.clone() })
                    .await
                    .map_err(refused(&addr))?;
                if addr.json {
                    println!("{}", json!({ "deleted": name }));
                } else {
                    println!("secret {name} deleted");
                }
            }
        }
        Ok(())
    })
}

/// `hornctl settings ...`
#[derive(Subcommand, Debug)]
pub enum SettingsCmd {
    /// Every setting with its value.
    List,
    /// Change settings, all or none: `NAME=VALUE ...` (e.g.
    /// `replica-replenishment-wait-secs=120 node-anti-affinity=soft`).
    Set {
        /// NAME=VALUE pairs.
        #[arg(required = true)]
        pairs: Vec<String>,
    },
}

/// `hornctl node ...`
#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// Every node with its state and disks.
    List,
    /// One node with its disks.
    Info {
        /// The node's name.
        name: String,
    },
    /// Place no new replicas on the node.
    Cordon {
        /// The node's name.
        name: String,
    },
    /// Let new replicas be placed on the node again.
    Uncordon {
        /// The node's name.
        name: String,
    },
    /// Add or remove a node's disks.
    #[command(subcommand)]
    Disk(DiskCmd),
}

/// `hornctl node disk ...`
#[derive(Subcommand, Debug)]
pub enum DiskCmd {
    /// Add a disk (a directory on the node, created by its agent and measured).
    Add {
        /// The node's name.
        node: String,
        /// The directory, absolute.
        path: String,
        /// A tag of the disk; repeat for more.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Bytes kept out of Horn's reach (K, M, G, T units).
        #[arg(long, default_value = "0", value_parser = parse_size)]
        reserved: u64,
    },
    /// Remove a disk added with `disk add` (refused while it holds replicas).
    Remove {
        /// The node's name.
        node: String,
        /// The directory.
        path: String,
    },
}

impl ManagerAddr {
    /// Where the credentials to call with are: `--credentials`, or the token file's
    /// directory.
    pub fn credentials_dir(&self) -> PathBuf {
        match &self.credentials {
            Some(d) => d.clone(),
            None => self
                .token_file
                .parent()
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(".")),
        }
    }
}

/// A client of the manager, over mutual TLS.
pub type Client = ManagerClient<Channel>;

/// The credentials `addr` names: `--credentials` (or the token file's directory),
/// `--as`.
pub fn credentials(addr: &ManagerAddr) -> Result<horn_pki::Credentials> {
    let dir = addr.credentials_dir();
    horn_pki::Credentials::load(&dir, &addr.identity).with_context(|| {
        format!(
            "cannot read the credentials {} in {} (--credentials DIR, --as NAME; hornctl cluster init writes the admin's)",
            addr.identity,
            dir.display()
        )
    })
}

/// A client of the manager at `addr.manager` with `addr`'s credentials.
pub async fn connect(addr: &ManagerAddr) -> Result<Client> {
    connect_with(&addr.manager, &credentials(addr)?).await
}

/// A client of the manager at `manager` that proves itself with `credentials`
/// and checks the manager's certificate against their CA.
pub async fn connect_with(manager: &str, credentials: &horn_pki::Credentials) -> Result<Client> {
    connect_tls(manager, credentials.client_tls(horn_pki::MANAGER_NAME)).await
}

async fn connect_tls(manager: &str, tls: tonic::transport::ClientTlsConfig) -> Result<Client> {
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{manager}"))
        .with_context(|| format!("{manager:?} is not an address"))?
        .tls_config(tls)
        .context("the TLS configuration is refused")?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the manager at {manager} (--manager, HORN_MANAGER): {}",
                chain(&e)
            )
        })?;
    Ok(ManagerClient::new(channel))
}

/// An error and its causes, in one line (a TLS refusal is several levels down).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Joins node `node` to the cluster of the manager at `manager`: with no certificate
/// yet, it checks the manager against the CA in `ca_pem`, proves the cluster `token`,
/// and gets a certificate for a key made here. Returns the node's credentials.
pub async fn join(
    manager: &str,
    ca_pem: &str,
    token: &str,
    node: &str,
    ips: Vec<String>,
) -> Result<horn_pki::Credentials> {
    let (key, csr) = horn_pki::key_and_request()?;
    let mut c = connect_tls(
        manager,
        horn_pki::anonymous_client_tls(ca_pem, horn_pki::MANAGER_NAME),
    )
    .await?;
    let reply = c
        .join_node(pb::JoinRequest {
            token: token.to_string(),
            node: node.to_string(),
            csr,
            ips,
        })
        .await
        .map_err(|s| {
            anyhow::anyhow!(
                "the manager at {manager} refused node {node}'s join: {}",
                s.message()
            )
        })?
        .into_inner();
    Ok(horn_pki::Credentials {
        cert_pem: reply.cert,
        key_pem: key,
        ca_pem: reply.ca,
    })
}

/// New credentials for the role of `current`, from the manager on `client` (called
/// with `current`): a new key, made here, and its certificate (`ips` in it, for a
/// node's). Made before `current` expires, as a holder renews itself.
pub async fn renew(
    client: &mut Client,
    current: &horn_pki::Credentials,
    ips: Vec<String>,
) -> Result<horn_pki::Credentials> {
    let (key, csr) = horn_pki::key_and_request()?;
    let reply = client
        .renew_credentials(pb::RenewRequest { csr, ips })
        .await
        .map_err(|s| anyhow::anyhow!("the manager refused to renew the certificate: {}", s.message()))?
        .into_inner();
    let fresh = horn_pki::Credentials {
        cert_pem: reply.cert,
        key_pem: key,
        ca_pem: reply.ca,
    };
    if fresh.role()? != current.role()? {
        anyhow::bail!("the manager renewed the certificate for another role");
    }
    Ok(fresh)
}

/// The message of a refused call, with the manager named.
pub(crate) fn refused(addr: &ManagerAddr) -> impl Fn(tonic::Status) -> anyhow::Error + '_ {
    move |s| anyhow::anyhow!("the manager at {}: {}", addr.manager, s.message())
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Runs `hornctl cluster CMD`.
pub fn run_cluster(addr: ManagerAddr, cmd: ClusterCmd) -> Result<()> {
    match cmd {
        ClusterCmd::Init { data } => {
            let id = ClusterIdentity::init(&data)?;
            if addr.json {
                println!(
                    "{}",
                    json!({ "cluster_id": id.id, "token_file": data.join(TOKEN_FILE) })
                );
            } else {
                println!(
                    "cluster {} created in {}: its CA (ca.pem; ca.key stays here), the admin's credentials \
                     (admin.pem, admin.key: hornctl uses them), and the token nodes join with ({}: keep it secret)",
                    id.id,
                    data.display(),
                    data.join(TOKEN_FILE).display()
                );
            }
            Ok(())
        }
        ClusterCmd::Credentials {
            role,
            out,
            name,
            days,
        } => runtime()?.block_on(async {
            let mut c = connect(&addr).await?;
            let issued = c
                .issue_credentials(pb::IssueRequest {
                    role: role.clone(),
                    days,
                })
                .await
                .map_err(refused(&addr))?
                .into_inner();
            horn_pki::Credentials {
                cert_pem: issued.cert,
                key_pem: issued.key,
                ca_pem: issued.ca,
            }
            .save(&out, &name)?;
            if addr.json {
                println!(
                    "{}",
                    json!({ "role": role, "dir": out, "name": name, "days": days })
                );
            } else {
                println!(
                    "credentials for {role} written to {} as {name}.pem and {name}.key (valid {days} days)",
                    out.display()
                );
            }
            Ok(())
        }),
        ClusterCmd::JoinToken { ttl, node } => runtime()?.block_on(async {
            let mut c = connect(&addr).await?;
            let t = c
                .create_join_token(pb::JoinTokenRequest {
                    ttl_secs: u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX),
                    node: node.unwrap_or_default(),
                })
                .await
                .map_err(refused(&addr))?
                .into_inner();
            if addr.json {
                println!(
                    "{}",
                    json!({ "token": t.token, "expires_unix": t.expires_unix, "node": t.node })
                );
            } else {
                let who = if t.node.is_empty() {
                    "any node name".to_string()
                } else {
                    format!("node {}", t.node)
                };
                println!("{}", t.token);
                eprintln!(
                    "good for one join of {who}, until {}; on the new machine: hornd node --join TOKEN --ca-file ca.pem (the cluster CA's certificate)",
                    crate::format::utc_time(t.expires_unix)
                );
            }
            Ok(())
        }),
        ClusterCmd::Renew => runtime()?.block_on(async {
            let dir = addr.credentials_dir();
            let current = credentials(&addr)?;
            let mut c = connect(&addr).await?;
            let fresh = renew(&mut c, &current, Vec::new()).await?;
            fresh.save(&dir, &addr.identity)?;
            let until = fresh.not_after()?;
            if addr.json {
                println!(
                    "{}",
                    json!({ "dir": dir, "name": addr.identity, "role": fresh.role()?.to_string(),
                            "not_after_unix": until.unix_timestamp() })
                );
            } else {
                println!(
                    "renewed {} in {} ({}): valid until {until}",
                    addr.identity,
                    dir.display(),
                    fresh.role()?
                );
            }
            Ok(())
        }),
        ClusterCmd::Rotate { finish, status } => runtime()?.block_on(async {
            let step = match (finish, status) {
                (true, _) => "finish",
                (_, true) => "",
                _ => "begin",
            };
            let mut c = connect(&addr).await?;
            let s = c
                .rotate_ca(pb::RotateCaRequest { step: step.into() })
                .await
                .map_err(refused(&addr))?
                .into_inner();
            if addr.json {
                let nodes: Vec<_> = s
                    .nodes
                    .iter()
                    .map(|n| json!({ "node": n.node, "trusted": n.trusted, "issuer": n.issuer }))
                    .collect();
                println!(
                    "{}",
                    json!({ "phase": s.phase, "signer": s.signer, "next": s.next, "nodes": nodes })
                );
                return Ok(());
            }
            println!("CA roll: {} (signing: {})", s.phase, s.signer);
            let rows: Vec<Vec<String>> = s
                .nodes
                .iter()
                .map(|n| {
                    vec![
                        n.node.clone(),
                        if s.next.is_empty() || n.trusted.contains(&s.next) { "yes" } else { "not yet" }.into(),
                        if n.issuer.is_empty() {
                            "not seen".into()
                        } else if n.issuer == s.signer {
                            "yes".into()
                        } else {
                            "not yet".into()
                        },
                    ]
                })
                .collect();
            print!(
                "{}",
                crate::format::table(&["NODE", "TRUSTS NEW CA", "CERTIFICATE FROM SIGNER"], &rows)
            );
            Ok(())
        }),
        ClusterCmd::Info => runtime()?.block_on(async {
            let mut c = connect(&addr).await?;
            let i = c
                .cluster_info(pb::ClusterInfoRequest {})
                .await
                .map_err(refused(&addr))?
                .into_inner();
            if addr.json {
                println!(
                    "{}",
                    json!({ "cluster_id": i.cluster_id, "store": i.store, "revision": i.revision,
                            "nodes": i.nodes, "volumes": i.volumes })
                );
            } else {
                println!(
                    "cluster {}: {} nodes, {} volumes; specs in {} (revision {})",
                    i.cluster_id, i.nodes, i.volumes, i.store, i.revision
                );
            }
            Ok(())
        }),
    }
}

fn volume_json(v: &pb::Volume) -> serde_json::Value {
    json!({
        "name": v.name, "size": v.size, "replicas": v.replicas, "sector_size": v.sector_size,
        "frontend": v.frontend, "data_locality": v.data_locality,
        "node_selector": v.node_selector, "disk_selector": v.disk_selector,
        "attached_to": (!v.attached_to.is_empty()).then_some(&v.attached_to),
        "state": v.state, "robustness": v.robustness, "revision": v.revision,
        "maintenance": v.maintenance,
        "volume_id": (!v.volume_id.is_empty()).then_some(&v.volume_id),
        "endpoint": (!v.endpoint.is_empty()).then_some(&v.endpoint),
        "message": (!v.message.is_empty()).then_some(&v.message),
        "membership": (!v.membership.is_empty()).then_some(&v.membership),
        "key_secret": (!v.key_secret.is_empty()).then_some(&v.key_secret),
        "chap_user": (!v.chap_user.is_empty()).then_some(&v.chap_user),
        "no_chap": v.no_chap,
        "data_tls": v.data_tls,
        "groups": v.groups,
        "restore_from": (!v.restore_from.is_empty()).then_some(&v.restore_from),
        "standby": v.standby,
        "restored_backup": (!v.restored_backup.is_empty()).then_some(&v.restored_backup),
        "restore_error": (!v.restore_error.is_empty()).then_some(&v.restore_error),
        "placements": v.placements.iter().map(|p| json!({
            "id": p.id, "node": p.node, "disk": p.disk, "state": p.state,
            "mode": (!p.mode.is_empty()).then_some(&p.mode),
            "data_address": (!p.data_address.is_empty()).then_some(&p.data_address),
            "failed_at": (p.failed_at > 0).then_some(p.failed_at),
            "failure": (!p.failure.is_empty()).then_some(&p.failure),
        })).collect::<Vec<_>>(),
    })
}

fn volume_row(v: &pb::Volume) -> Vec<String> {
    vec![
        v.name.clone(),
        human_bytes(v.size),
        v.replicas.to_string(),
        v.frontend.clone(),
        v.state.clone(),
        v.robustness.clone(),
        if v.attached_to.is_empty() {
            "-".into()
        } else {
            v.attached_to.clone()
        },
        v.placements
            .iter()
            .map(|p| p.node.as_str())
            .collect::<Vec<_>>()
            .join(","),
    ]
}

const VOLUME_HEADER: [&str; 8] = [
    "NAME",
    "SIZE",
    "REPLICAS",
    "FRONTEND",
    "STATE",
    "ROBUSTNESS",
    "ATTACHED",
    "NODES",
];

/// Runs `hornctl volume CMD`.
pub fn run_volume(addr: ManagerAddr, cmd: VolumeCmd) -> Result<()> {
    runtime()?.block_on(async {
        let mut c = connect(&addr).await?;
        let revert = matches!(cmd, VolumeCmd::Revert { .. });
        match cmd {
            VolumeCmd::Create {
                name,
                size,
                replicas,
                sector_size,
                frontend,
                data_locality,
                node_selector,
                disk_selector,
                encrypted: _,
                key_secret,
                no_chap,
                data_tls,
                from_backup,
                standby,
                groups,
            } => {
                let restoring = from_backup.is_some();
                let v = c
                    .create_volume(pb::CreateVolumeRequest {
                        name,
                        size: size.unwrap_or(0),
                        from_backup: from_backup.unwrap_or_default(),
                        standby,
                        groups,
                        replicas,
                        sector_size,
                        frontend,
                        data_locality,
                        node_selector,
                        disk_selector,
                        key_secret: key_secret.unwrap_or_default(),
                        no_chap,
                        data_tls,
                    })
                    .await
                    .map_err(refused(&addr))?
                    .into_inner();
                if addr.json {
                    println!("{}", volume_json(&v));
                } else {
                    println!(
                        "volume {} created: {}, replicas on {}",
                        v.name,
                        human_bytes(v.size),
                        v.placements
                            .iter()
                            .map(|p| format!("{}:{}", p.node, p.disk))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    if restoring {
                        println!(
                            "restoring from {}{}: attached to {} without a frontend until then (`hornctl volume info {}`)",
                            v.restore_from,
                            if v.standby { ", then following it as a standby" } else { "" },
                            v.attached_to,
                            v.name
                        );
                    }
                }
            }
            VolumeCmd::Activate { name, timeout } => {
                let mut v = c
                    .activate_volume(pb::VolumeRef { name: name.clone() })
                    .await
                    .map_err(refused(&addr))?
                    .into_inner();
                let deadline = std::time::Instant::now() + Duration::from_secs(timeout);
                while timeout > 0 && !(v.restore_from.is_empty() && v.state == "detached") {
                    if std::time::Instant::now() >= deadline {
                        anyhow::bail!(
                            "volume {name} is still a standby after {timeout} s (backup applied last: {}){}",
                            if v.restored_backup.is_empty() { "none" } else { &v.restored_backup },
                            if v.restore_error.is_empty() {
                                String::new()
                            } else {
                                format!("; the last restore failed: {}", v.restore_error)
                            }
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    v = c
                        .get_volume(pb::VolumeRef { name: name.clone() })
                        .await
                        .map_err(refused(&addr))?
                        .into_inner();
                }
                if addr.json {
                    println!("{}", volume_json(&v));
                } else if v.restore_from.is_empty() {
                    println!("volume {name} activated: a normal volume now, detached (`hornctl volume attach {name} NODE`)");
                } else {
                    println!("volume {name} is to be activated once the newest backup of its source is applied");
                }
            }
            VolumeCmd::Backup {
                name,
                target,
                backup,
                full,
                compression,
                labels,
            } => {
                crate::backups::parse_compression(&compression).map_err(|e| anyhow::anyhow!(e))?;
                let stream = c
                    .backup_volume(pb::BackupVolumeRequest {
                        volume: name.clone(),
                        target,
                        name: backup.unwrap_or_default(),
                        full,
                        compression,
                        labels: labels.into_iter().collect(),
                    })
                    .await
                    .map_err(refused(&addr))?
                    .into_inner();
                let report = crate::backupctl::follow(
                    stream,
                    &crate::backupctl::bar(addr.json, &format!("backup of {name}")),
                )
                .await?;
                crate::backupctl::print_backup(&report, addr.json)?;
            }
            VolumeCmd::Groups { name, groups } => {
                let v = c
                    .set_volume_groups(pb::VolumeGroupsRequest {
                        name: name.clone(),
                        groups,
                    })
                    .await
                    .map_err(refused(&addr))?
                    .into_inner();
                if addr.json {
                    println!("{}", volume_json(&v));
                } else if v.groups.is_empty() {
                    println!("volume {name} is in no job group");
                } else {
                    println!("volume {name} is in job group(s) {}", v.groups.join(", "));
                }
            }
            VolumeCmd::List => {
                let list = c
                    .list_volumes(pb::ListVolumesRequest {})
                    .await
                    .map_err(refused(&addr))?
                    .into_inner();
                if addr.json {
                    println!(
                        "{}",
                        json!(list.volumes.iter().map(volume_json).collect::<Vec<_>>())
                    );
                } else {
                    let rows: Vec<_> = list.volumes.iter().map(volume_row).collect();
                    print!("{}", table(&VOLUME_HEADER, &rows));
                }
            }
            VolumeCmd::Credentials { name } => {
                let cr = c
                    .get_volume_credentials(pb::VolumeRef { name: name.clone() })
                    .await
                    .map_err(refused(&addr))?
                    .into_inner();
                if addr.json {
                    println!(
                        "{}",
                        json!({"chap_user": cr.chap_user, "chap_secret": cr.chap_secret, "no_chap": cr.no_chap})
                    );
                } else if cr.no_chap {
                    println!("volume {name} is served without CHAP (created with --no-chap)");
                } else {
                    println!("user: {}\nsecret: {}", cr.chap_user, cr.chap_secret);
                }
            }
            VolumeCmd::Info { name } => {
                let v = c
                    .get_volume(pb::VolumeRef { name })
                    .await
                    .map_err(refused(&addr))?
                    .into_inner();
                if addr.json {
                    println!("{}", volume_json(&v));
                } else {
                    print_volume(&v);
                }
            }
            VolumeCmd::Attach {
                name,
                node,
                timeout,
                maintenance,
            } => {
                let v = c
                    .attach_volume(pb::AttachRequest {
                        name: name.clone(),
                        node: node.clone(),
                        maintenance,
                    })
                    .await
                    .map_err(refused(&addr))?
                    .into_inner();
                let v = wait_for(&mut c, &addr, v, timeout, "attached").await?;
                if addr.json {
                    println!("{}", volume_json(&v));
                } else if v.state == "attached" && v.maintenance {
                    println!("volume {name} attached to {node} in maintenance mode (no frontend)");
                } else if v.state == "attached" {
                    println!("volume {name} attached to {node}: {}", v.endpoint);
                } else {
                    println!("volume {name} is attaching to {node}: {}", v.message);
                }
            }
            VolumeCmd::Snapshot {
                name,
                snapshot,
                labels,
            } => {
                let list = c
                    .snapshot_volume(pb::VolumeSnapshotRequest {
                        volume: name.clone(),
                        name: snapshot.clone(),
                        labels: labels.into_iter().collect(),
                    })
                    .await
                    .map_err(refused(&addr))?
                    .into_inner();
                chain_done(
                    &list,
                    addr.json,
                    format!("snapshot {snapshot} of volume {name} taken on every replica"),
                )?;
            }
            VolumeCmd::Snapshots { name } => {
                let list = c
                    .list_snapshots(pb::VolumeRef { name })
                    .await
                    .map_err(refused(&addr))?
                    .into_inner();
                print_snapshots(&rewire(&list), addr.json)?;
                if !addr.json && !list.differences.is_empty() {
                    eprintln!("warning: the replicas' chains differ:");
                    for d in &list.differences {
                        eprintln!("  {d}");
                    }
                }
            }
            VolumeCmd::DeleteSnapshot { name, snapshot } | VolumeCmd::Revert { name, snapshot } => {
                let at = pb::VolumeSnapshotRef {
                    volume: name.clone(),
                    name: snapshot.clone(),
                };
                let (list, done) = if revert {
                    (
                        c.revert_volume(at).await,
                        format!("volume {name} reverted to snapshot {snapshot}"),
                    )
                } else {
                    (
                        c.delete_snapshot(at).await,
                        format!("snapshot {snapshot} of volume {name} deleted, its space reclaimed"),
                    )
                };
                chain_done(&list.map_err(refused(&addr))?.into_inner(), addr.json, done)?;
            }
            VolumeCmd::Expand { name, size } => {
                let v = c
                    .expand_volume(pb::ExpandRequest {
                        volume: name.clone(),
                        size,
                    })
                    .await
                    .map_err(refused(&addr))?
                    .into_inner();
                if addr.json {
                    println!("{}", volume_json(&v));
                } else {
                    println!(
                        "volume {name} expanded to {} ({} bytes)",
                        human_bytes(v.size),
                        v.size
                    );
                }
            }
            VolumeCmd::Verify { name } => {
                let r = c
                    .verify_volume(pb::VolumeRef { name })
                    .await
                    .map_err(refused(&addr))?
                    .into_inner();
                print_verify(&rewire(&r), addr.json)?;
            }
            VolumeCmd::Detach { name, timeout, force } => {
                let v = c
                    .detach_volume(pb::DetachRequest {
                        name: name.clone(),
                        force,
                    })
                    .await
                    .map_err(refused(&addr))?
                    .into_inner();
                let v = wait_for(&mut c, &addr, v, timeout, "detached").await?;
                if addr.json {
                    println!("{}", volume_json(&v));
                } else {
                    println!("volume {name} {}", v.state);
                }
            }
            VolumeCmd::Delete { name } => {
                c.delete_volume(pb::VolumeRef { name: name.clone() })
                    .await
                    .map_err(refused(&addr))?;
                if addr.json {
                    println!("{}", json!({ "deleted": name }));
                } else {
                    println!("volume {name} deleted");
                }
            }
        }
        Ok(())
    })
}

/// A chain operation's result: the snapshot list with `--json`, else `done`.
fn chain_done(list: &pb::SnapshotList, json: bool, done: String) -> Result<()> {
    if json {
        print_snapshots(&rewire(list), true)
    } else {
        println!("{done}");
        Ok(())
    }
}

/// Polls the volume until its state is `want` or `timeout` seconds pass (then it is
/// an error, naming the state it is in and why).
async fn wait_for(
    c: &mut Client,
    addr: &ManagerAddr,
    mut v: pb::Volume,
    timeout: u64,
    want: &str,
) -> Result<pb::Volume> {
    if timeout == 0 {
        return Ok(v);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(timeout);
    while v.state != want {
        if std::time::Instant::now() >= deadline {
            anyhow::bail!(
                "volume {} is still {} after {timeout} s{}",
                v.name,
                v.state,
                if v.message.is_empty() {
                    String::new()
                } else {
                    format!(": {}", v.message)
                }
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        v = c
            .get_volume(pb::VolumeRef { name: v.name.clone() })
            .await
            .map_err(refused(addr))?
            .into_inner();
    }
    Ok(v)
}

fn print_volume(v: &pb::Volume) {
    print!("{}", table(&VOLUME_HEADER, &[volume_row(v)]));
    if !v.endpoint.is_empty() {
        println!("endpoint: {}", v.endpoint);
    }
    if !v.message.is_empty() {
        println!("{}: {}", v.state, v.message);
    }
    if !v.membership.is_empty() {
        println!("membership: {}", v.membership);
    }
    if !v.key_secret.is_empty() {
        println!("encrypted: AES-256-XTS, key in secret {}", v.key_secret);
    }
    if v.data_tls {
        println!("data wire: mutual TLS between the engine and its replicas");
    }
    if !v.groups.is_empty() {
        println!("job groups: {}", v.groups.join(", "));
    }
    if !v.restore_from.is_empty() {
        println!(
            "{} from {}; backup applied: {}",
            if v.standby {
                "standby, following"
            } else {
                "restoring"
            },
            v.restore_from,
            if v.restored_backup.is_empty() {
                "none yet"
            } else {
                &v.restored_backup
            }
        );
        if !v.restore_error.is_empty() {
            println!("the last restore failed: {}", v.restore_error);
        }
    }
    if v.frontend == "iscsi" {
        match v.no_chap {
            true => println!("iSCSI: no CHAP: any initiator that reaches the portal may read and write it"),
            false => println!(
                "iSCSI: CHAP as {} (the secret: hornctl volume credentials {})",
                v.chap_user, v.name
            ),
        }
    }
    println!();
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    let rows: Vec<_> = v
        .placements
        .iter()
        .map(|p| {
            vec![
                p.id.clone(),
                p.node.clone(),
                p.disk.clone(),
                dash(&p.state),
                dash(&p.mode),
                dash(&p.data_address),
                failed_for(p),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["REPLICA", "NODE", "DISK", "STATE", "MODE", "ADDRESS", "FAILED"],
            &rows
        )
    );
}

/// How long a replica has counted as failed, and why ("-" if it does not).
fn failed_for(p: &pb::ReplicaPlacement) -> String {
    if p.failure.is_empty() {
        return "-".into();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if p.failed_at == 0 {
        return p.failure.clone();
    }
    format!("{} s ago: {}", now.saturating_sub(p.failed_at), p.failure)
}

/// Runs `hornctl settings CMD`.
pub fn run_settings(addr: ManagerAddr, cmd: SettingsCmd) -> Result<()> {
    runtime()?.block_on(async {
        let mut c = connect(&addr).await?;
        let reply = match cmd {
            SettingsCmd::List => c.get_settings(pb::GetSettingsRequest {}).await,
            SettingsCmd::Set { pairs } => {
                let mut set = std::collections::HashMap::new();
                for p in pairs {
                    let Some((k, v)) = p.split_once('=') else {
                        anyhow::bail!("{p:?}: give NAME=VALUE");
                    };
                    set.insert(k.trim().to_string(), v.trim().to_string());
                }
                c.update_settings(pb::UpdateSettingsRequest { set }).await
            }
        }
        .map_err(refused(&addr))?
        .into_inner();
        let sorted: std::collections::BTreeMap<_, _> = reply.settings.into_iter().collect();
        if addr.json {
            println!("{}", json!(sorted));
        } else {
            let rows: Vec<_> = sorted.into_iter().map(|(k, v)| vec![k, v]).collect();
            print!("{}", table(&["SETTING", "VALUE"], &rows));
        }
        Ok(())
    })
}

fn node_json(n: &pb::Node) -> serde_json::Value {
    json!({
        "name": n.name, "address": n.address, "zone": n.zone, "tags": n.tags,
        "cordoned": n.cordoned, "state": n.state,
        "disks": n.disks.iter().map(|d| json!({
            "path": d.path, "tags": d.tags, "reserved": d.reserved,
            "allow_scheduling": d.allow_scheduling, "capacity": d.capacity,
            "available": d.available, "scheduled": d.scheduled,
        })).collect::<Vec<_>>(),
    })
}

fn print_nodes(nodes: &[pb::Node], json_out: bool) {
    if json_out {
        println!("{}", json!(nodes.iter().map(node_json).collect::<Vec<_>>()));
        return;
    }
    let rows: Vec<_> = nodes
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                n.state.clone(),
                if n.cordoned { "yes" } else { "no" }.into(),
                if n.zone.is_empty() {
                    "-".into()
                } else {
                    n.zone.clone()
                },
                n.address.clone(),
                n.disks.len().to_string(),
                human_bytes(n.disks.iter().map(|d| d.scheduled).sum()),
                human_bytes(n.disks.iter().map(|d| d.available).sum()),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "NAME",
                "STATE",
                "CORDONED",
                "ZONE",
                "ADDRESS",
                "DISKS",
                "SCHEDULED",
                "FREE"
            ],
            &rows
        )
    );
}

/// Runs `hornctl node CMD`.
pub fn run_node(addr: ManagerAddr, cmd: NodeCmd) -> Result<()> {
    runtime()?.block_on(async {
        let mut c = connect(&addr).await?;
        let nodes = match cmd {
            NodeCmd::List => {
                c.list_nodes(pb::ListNodesRequest {})
                    .await
                    .map_err(refused(&addr))?
                    .into_inner()
                    .nodes
            }
            NodeCmd::Info { name } => vec![c
                .get_node(pb::NodeRef {
                    name,
                    ..Default::default()
                })
                .await
                .map_err(refused(&addr))?
                .into_inner()],
            NodeCmd::Cordon { name } => vec![c
                .cordon_node(pb::CordonRequest { name, cordoned: true })
                .await
                .map_err(refused(&addr))?
                .into_inner()],
            NodeCmd::Uncordon { name } => vec![c
                .cordon_node(pb::CordonRequest {
                    name,
                    cordoned: false,
                })
                .await
                .map_err(refused(&addr))?
                .into_inner()],
            NodeCmd::Disk(DiskCmd::Add {
                node,
                path,
                tags,
                reserved,
            }) => {
                if !path.starts_with('/') {
                    anyhow::bail!("disk {path:?}: give an absolute path");
                }
                vec![c
                    .add_disk(pb::DiskRequest {
                        node,
                        path,
                        tags,
                        reserved,
                    })
                    .await
                    .map_err(refused(&addr))?
                    .into_inner()]
            }
            NodeCmd::Disk(DiskCmd::Remove { node, path }) => vec![c
                .remove_disk(pb::DiskRef { node, path })
                .await
                .map_err(refused(&addr))?
                .into_inner()],
        };
        print_nodes(&nodes, addr.json);
        if !addr.json && nodes.len() == 1 {
            let rows: Vec<_> = nodes[0]
                .disks
                .iter()
                .map(|d| {
                    vec![
                        d.path.clone(),
                        if d.allow_scheduling { "yes" } else { "no" }.into(),
                        d.tags.join(","),
                        human_bytes(d.capacity),
                        human_bytes(d.available),
                        human_bytes(d.reserved),
                        human_bytes(d.scheduled),
                    ]
                })
                .collect();
            println!();
            print!(
                "{}",
                table(
                    &[
                        "DISK",
                        "SCHEDULING",
                        "TAGS",
                        "CAPACITY",
                        "FREE",
                        "RESERVED",
                        "SCHEDULED"
                    ],
                    &rows
                )
            );
        }
        Ok(())
    })
}

/// A lifetime (of a certificate, a join token): NUMBER with s, m, h or d; from
/// 10 s to ten years.
pub fn parse_lifetime(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{s:?} is not a lifetime: give NUMBER with s, m, h or d (90d, 12h)");
    let unit = match s.chars().last() {
        Some('s') => 1,
        Some('m') => 60,
        Some('h') => 3600,
        Some('d') => 86400,
        _ => return Err(bad()),
    };
    let n: u64 = s[..s.len() - 1].parse().map_err(|_| bad())?;
    let secs = n.checked_mul(unit).ok_or_else(bad)?;
    if !(10..=10 * 366 * 86400).contains(&secs) {
        return Err(format!(
            "a lifetime of {s} is out of range: from 10 s to ten years"
        ));
    }
    Ok(std::time::Duration::from_secs(secs))
}

/// A client of the engine at `addr` whose calls fail after `timeout`.
pub async fn engine_client(
    addr: &str,
    tls: Option<tonic::transport::ClientTlsConfig>,
    timeout: std::time::Duration,
) -> Result<horn_proto::engine_control::engine_control_client::EngineControlClient<tonic::transport::Channel>>
{
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))
        .with_context(|| format!("{addr} is not an address"))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(timeout);
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls)
            .context("the TLS configuration is refused")?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the engine at {addr} (is `hornd engine` running?)"))?;
    Ok(horn_proto::engine_control::engine_control_client::EngineControlClient::new(channel))
}
