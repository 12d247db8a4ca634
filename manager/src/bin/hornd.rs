//! `hornd`: Horn's daemons, one per subcommand.
//!
//! `hornd replica` serves one replica directory: the data wire, and the gRPC control
//! service (`proto/replica.proto`) on a separate address. `hornd engine` serves a
//! volume's engine on its replicas, with the engine control service
//! (`proto/engine.proto`), and a frontend: `--frontend ublk` as a block device
//! (`/dev/ublkbN`), `--frontend iscsi` as an iSCSI target; `--host-replica DIR` hosts
//! the local replica in the engine's own process. `hornd manager` serves the control
//! plane's volumes and nodes (`proto/manager.proto`); `hornd node` is the node agent
//! that registers a machine and its disks with it and runs the replicas and engines
//! placed there; `hornd all-in-one` is both, for one machine. (The CSI driver arrives as a
//! subcommand with its issue.)

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use horn_manager::daemon::{serve_engine, serve_replica};
use horn_manager::format::parse_size;

#[derive(Parser)]
#[command(name = "hornd", version, about = "Horn's daemons")]
struct Cli {
    /// Append the daemon's output (its log, every line it prints) to this file instead
    /// of standard output and error, rotated by size. For `supervise`: where it notes
    /// each start and end of its child.
    #[arg(long, global = true, value_name = "PATH")]
    log_file: Option<PathBuf>,
    /// Rotate the log file past this size (`PATH` becomes `PATH.1`, ...).
    #[arg(long, global = true, default_value = "16M", value_parser = parse_size)]
    log_max_size: u64,
    /// Rotated log files kept.
    #[arg(long, global = true, default_value_t = horn_manager::logfile::DEFAULT_KEEP,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    log_keep: u32,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at startup: the engine's many flags make its variant large, harmlessly.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Serve one replica directory (the data wire and its control service) until SIGINT
    /// or SIGTERM.
    Replica {
        /// The replica directory.
        #[arg(long, default_value = "/var/lib/horn/replica")]
        dir: PathBuf,
        /// Address for the data wire.
        #[arg(long, default_value = "127.0.0.1:9500")]
        listen: String,
        /// Address for the gRPC control service.
        #[arg(long, default_value = "127.0.0.1:9501")]
        control: String,
        /// Create the replica with this size if the directory holds none yet.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// How data I/O meets the page cache: `direct` bypasses it (O_DIRECT for
        /// aligned I/O; flat memory use), `page` goes through it (repeated reads from
        /// memory, hot data cached twice). Flushes are durable either way.
        #[arg(long, default_value = "direct")]
        cache: horn_replica::CacheMode,
        /// Sector size when creating: 512 or 4096.
        #[arg(long, default_value_t = 512)]
        sector_size: u32,
        /// Data-wire connections served at once; more are closed as they are
        /// accepted. (Each connection may also hold at most 1,024 unanswered requests
        /// and 32 MiB of their data: over that, its next requests wait.)
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65536))]
        max_connections: u32,
        /// The volume's wire secret (32 bytes, raw or as 64 hex digits; a node agent
        /// writes it): the data wire and the control service then serve only a peer
        /// that proves the key of a generation not behind the replica's. Without it,
        /// the replica serves anyone who reaches it, so it is refused an address other
        /// than loopback unless `--open` is given.
        #[arg(long, value_name = "FILE")]
        secret_file: Option<PathBuf>,
        /// Serve without a secret on an address other than loopback: anyone who
        /// reaches the replica may read and write it. For a network only the cluster
        /// reaches.
        #[arg(long, conflicts_with = "secret_file")]
        open: bool,
        /// The directory of the node's credentials (`node.pem`, `node.key`,
        /// `ca.pem`): the control service then serves mutual TLS only, to the admin
        /// and nodes (and `Info` to the read-only role), and a rebuild pulls from
        /// other replicas so.
        #[arg(long, value_name = "DIR")]
        credentials: Option<PathBuf>,
        /// Serve the data wire over TLS (mutual, with the node's certificate from
        /// --credentials), for a network where traffic may be read; its engine must
        /// connect with `hornd engine --data-tls`. Costs IOPS and CPU
        /// (docs/benchmarks.md).
        #[arg(long, requires = "credentials")]
        data_tls: bool,
    },
    /// Serve the manager: the cluster's volumes, nodes and their placement, for
    /// `hornctl` (`proto/manager.proto`), until SIGINT or SIGTERM. Every call must
    /// carry the cluster token that `hornctl cluster init --data DIR` wrote.
    Manager {
        /// The manager's directory: its cluster identity and its store
        /// (`manager.redb`).
        #[arg(long, default_value = "/var/lib/horn")]
        data: PathBuf,
        /// Address for the manager's service.
        #[arg(long, default_value = horn_manager::api::DEFAULT_MANAGER)]
        listen: String,
        /// How long the certificates it signs for nodes (at their join and each
        /// renewal) and issues are valid: NUMBER with s, m, h or d. Holders renew
        /// when a third of it is left.
        #[arg(long, default_value = "365d", value_parser = horn_manager::ctl::parse_lifetime)]
        certificate_lifetime: std::time::Duration,
    },
    /// Run the node agent: register this machine and its disks with the manager and
    /// keep its lease, until SIGINT or SIGTERM.
    Node {
        /// The manager's address.
        #[arg(long, env = "HORN_MANAGER", default_value = horn_manager::api::DEFAULT_MANAGER)]
        manager: String,
        /// The file holding the cluster token (`hornctl cluster init` wrote it on the
        /// manager's machine): the node joins with it once, and gets its certificate.
        /// Needed only for the first start (the certificate is kept in STATE/tls).
        #[arg(long, env = "HORN_TOKEN_FILE", default_value = "/var/lib/horn/cluster-token")]
        token_file: PathBuf,
        /// A join token (`hornctl cluster join-token`): good for one join, within its
        /// time to live; the way for a machine other than the manager's to join.
        #[arg(long, env = "HORN_JOIN_TOKEN", value_name = "TOKEN")]
        join: Option<String>,
        /// The cluster CA's certificate, to check the manager by at the join
        /// (default: `ca.pem` beside the token file; needed with --join).
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
        /// The node's name (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// The address this node is reached at, IP:PORT.
        #[arg(long, default_value = "127.0.0.1:9700")]
        address: String,
        /// The node's zone.
        #[arg(long, default_value = "")]
        zone: String,
        /// A tag of the node; repeat for more.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// A disk: a directory for replicas, PATH or PATH:TAG,TAG; repeat for more.
        #[arg(long = "disk", default_value = "/var/lib/horn/disk")]
        disks: Vec<horn_manager::agent::AgentDisk>,
        /// Where the agent keeps its instances' records and logs (a new agent adopts
        /// the instances recorded there).
        #[arg(long, default_value = "/var/lib/horn/node")]
        state: PathBuf,
    },
    /// Run the manager and a node agent in one process, for one machine: the cluster
    /// is created in DIR at the first start (its token in DIR/cluster-token, for
    /// `hornctl --token-file`), replicas go to DIR/disk, and replicas of one volume
    /// may share the node (soft node anti-affinity). Until SIGINT or SIGTERM; the
    /// volumes' engines and replicas keep running after it.
    AllInOne {
        /// The directory for everything: store, token, disk, instances.
        #[arg(long, default_value = "/var/lib/horn")]
        data: PathBuf,
        /// Address for the manager's service.
        #[arg(long, default_value = horn_manager::api::DEFAULT_MANAGER)]
        listen: String,
        /// The node's name (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// The node's address: its engines and replicas listen on its IP.
        #[arg(long, default_value = "127.0.0.1:9700")]
        address: String,
    },
    /// Run a daemon and start it again when it dies (killed, crashed): not when it
    /// exits cleanly or is stopped with SIGTERM/SIGINT, which the supervisor passes on.
    /// A first run exiting with a failure within 10 s is not retried; after 10 quick failures in a row
    /// it gives up. `hornctl ublk add` runs its engine under one.
    Supervise {
        /// Restarts in a row (each run shorter than 60 s) before giving up.
        #[arg(long, default_value_t = 10)]
        max_restarts: u32,
        /// The daemon's command line, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Serve a volume's engine on its replicas until SIGINT or SIGTERM: claims them,
    /// holds the volume open, and serves the engine control service (snapshots and
    /// replica modes, for `hornctl engine`).
    Engine {
        /// A replica as DATA_ADDR,CONTROL_ADDR[,local] (its `hornd replica --listen`
        /// and `--control`); repeat for each.
        #[arg(long = "replica", required_unless_present = "host_replica")]
        replicas: Vec<horn_engine::ReplicaAddr>,
        /// Start only if the replicas hold this volume (its ID, as `hornd engine`
        /// prints it at start): replicas whose disks are not mounted are then refused,
        /// never made into a new, empty volume.
        #[arg(long)]
        volume: Option<String>,
        /// Run under the manager at this address as the volume's membership authority
        /// (`--name` is the volume's name there): the engine begins its generation
        /// there, and stores every membership record there before it counts. Node
        /// agents start their engines so.
        #[arg(long, requires_all = ["node", "credentials"])]
        manager: Option<String>,
        /// The node this engine runs on (with `--manager`, or `--credentials`).
        #[arg(long)]
        node: Option<String>,
        /// The directory of the node's credentials (`node.pem`, `node.key`, `ca.pem`;
        /// the node agent keeps them in `STATE/tls`): the engine calls its replicas
        /// and the manager over mutual TLS with them, and serves its control service
        /// so, to the admin, the manager, its own node (`--node`) and, for reads, the
        /// read-only role.
        #[arg(long, value_name = "DIR")]
        credentials: Option<PathBuf>,
        /// Reach the replicas' data wires over TLS (`hornd replica --data-tls`), with
        /// the node's certificate from --credentials.
        #[arg(long, requires = "credentials")]
        data_tls: bool,
        /// The volume is encrypted with the key in this file (64 bytes, raw or as 128
        /// hex digits: AES-256-XTS). At a volume's first start it becomes encrypted;
        /// later starts are refused with another key, and an encrypted volume without one.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        /// The volume's wire secret, as its replicas were given it (`hornd replica
        /// --secret-file`): the engine proves its generation's key to every replica and
        /// serves only from replicas that prove it back. Under `--manager` the manager
        /// hands over the generation's key instead.
        #[arg(long, value_name = "FILE")]
        secret_file: Option<PathBuf>,
        /// Host the replica in this directory inside the engine's process: its reads
        /// and writes run on the engine's own rings, with no socket or process hop
        /// (the replica on the engine's node). Its control service is served at
        /// `--host-replica-control`.
        #[arg(long, value_name = "DIR")]
        host_replica: Option<PathBuf>,
        /// Address for the hosted replica's gRPC control service.
        #[arg(long, default_value = "127.0.0.1:9502", requires = "host_replica")]
        host_replica_control: String,
        /// Create the hosted replica with this size if its directory holds none yet.
        #[arg(long, value_parser = parse_size, requires = "host_replica")]
        host_replica_size: Option<u64>,
        /// The hosted replica's sector size when creating: 512 or 4096.
        #[arg(long, default_value_t = 512, requires = "host_replica")]
        host_replica_sector_size: u32,
        /// How the hosted replica's I/O meets the page cache (as `hornd replica --cache`).
        #[arg(long, default_value = "direct", requires = "host_replica")]
        host_replica_cache: horn_replica::CacheMode,
        /// Address for the engine control service.
        #[arg(long, default_value = "127.0.0.1:9600")]
        control: String,
        /// Seconds a replica may leave a request unanswered before it is dropped (1 or more).
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
        timeout: u64,
        /// Seconds between clearings of the replicas' write-intent records: the volume
        /// pauses briefly, every replica flushes, and the regions written since are
        /// unmarked. After a crash only marked regions are compared and copied, so a
        /// shorter interval means a shorter reconciliation and more frequent pauses.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
        clean_intents_every: u64,
        /// Serve the volume to this machine as a block device: `ublk` makes
        /// /dev/ublkbN (root, kernel with ublk_drv). Without it, only the control
        /// service is served.
        #[arg(long, value_enum)]
        frontend: Option<Frontend>,
        /// The volume's name (shown by `hornctl ublk list`).
        #[arg(long, default_value = "volume")]
        name: String,
        /// ublk: queues, each a thread with its own ring and replica connections
        /// (default: one per CPU).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
        queues: Option<u16>,
        /// ublk: commands in flight per queue.
        #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u16).range(1..=4096))]
        depth: u16,
        /// ublk: largest I/O (a multiple of 4 KiB, at most 8 MiB).
        #[arg(long, default_value = "1M", value_parser = parse_size)]
        max_io: u64,
        /// ublk: ask for this device id (default: the driver picks).
        #[arg(long)]
        id: Option<u32>,
        /// ublk: serve the device read-only.
        #[arg(long)]
        read_only: bool,
        /// ublk: reattach to existing device N whose engine died (user recovery: the
        /// device and what is mounted on it stayed); implies `--frontend ublk`.
        #[arg(long, value_name = "N")]
        recover: Option<u32>,
        /// ublk: how command data moves: `user` (the engine copies it through
        /// /dev/ublkcN; kernel 6.5+), `buffer` (the driver copies it into per-command
        /// buffers), or `auto` (user where the driver offers it).
        #[arg(long, default_value = "auto")]
        copy: horn_ublk::CopyMode,
        /// iscsi: the portal address to listen on. Loopback unless told otherwise: a
        /// target open to the network is a choice (a node agent gives its node's
        /// address).
        #[arg(long, default_value = "127.0.0.1:3260")]
        listen: String,
        /// iscsi: the target's IQN (default: iqn.2026-11.io.horn:NAME).
        #[arg(long)]
        iqn: Option<String>,
        /// iscsi: connections served at once; one more is refused at login with
        /// "out of resources" (status 3/2) and closed.
        #[arg(long, default_value_t = horn_iscsi::target::DEFAULT_MAX_CONNECTIONS as u32,
              value_parser = clap::value_parser!(u32).range(1..=4096))]
        max_connections: u32,
        /// iscsi: initiators must log in with CHAP as this user (CHAP is required:
        /// give this, or `--no-chap`)...
        #[arg(long, requires = "chap_secret_file", conflicts_with = "no_chap")]
        chap_user: Option<String>,
        /// ...proving the secret in this file (12 to 255 bytes; a final newline is dropped).
        #[arg(long, requires = "chap_user")]
        chap_secret_file: Option<PathBuf>,
        /// iscsi: mutual CHAP: the target proves itself as this user...
        #[arg(long, requires_all = ["mutual_secret_file", "chap_user"])]
        mutual_user: Option<String>,
        /// ...with the secret in this file.
        #[arg(long, requires = "mutual_user")]
        mutual_secret_file: Option<PathBuf>,
        /// iscsi: discovery sessions must log in with CHAP too (by default anyone
        /// may list the target).
        #[arg(long, requires = "chap_user")]
        discovery_auth: bool,
        /// iscsi: serve without CHAP: any initiator that reaches the portal may read
        /// and write the volume. Only for a portal on loopback or a network nobody
        /// else reaches.
        #[arg(long)]
        no_chap: bool,
    },
}

/// How the engine serves its volume to this machine.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Frontend {
    /// A ublk block device, /dev/ublkbN.
    Ublk,
    /// An iSCSI target with the volume as LUN 0 (`--listen`, `--iqn`, CHAP flags).
    Iscsi,
}

/// Reads a CHAP secret from `path`.
fn read_secret(path: &std::path::Path) -> anyhow::Result<String> {
    let s = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read the CHAP secret {}: {e}", path.display()))?;
    let s = s.strip_suffix('\n').unwrap_or(&s).to_string();
    if !(12..=255).contains(&s.len()) {
        anyhow::bail!(
            "the CHAP secret in {} is {} bytes; 12 to 255 are accepted (RFC 7143 §12.1.3)",
            path.display(),
            s.len()
        );
    }
    Ok(s)
}

/// The ublk device an engine of volume `name` left when it died, to reattach to
/// (user recovery) instead of making a new one: so the same `hornd engine` command,
/// run again by a supervisor or by hand, brings the device back. A device of that
/// volume still served by a live engine is refused.
fn adopt_device(name: &str) -> anyhow::Result<Option<u32>> {
    // Without ublk here, serving fails later with the reason.
    let Ok(devices) = horn_ublk::list() else {
        return Ok(None);
    };
    let Some(d) = devices.into_iter().find(|d| d.volume == name) else {
        return Ok(None);
    };
    horn_ublk::device::check_recoverable(d.id)
        .map_err(|e| anyhow::anyhow!("volume {name} already has a ublk device, {}: {e}", d.path))?;
    eprintln!(
        "hornd engine: volume {name} has {} (state {}) from an engine that died: reattaching to it",
        d.path, d.state
    );
    Ok(Some(d.id))
}

/// `name`, or the host name.
/// Does `addr` (IP:PORT or HOST:PORT) resolve to an address other machines may reach?
/// (One that does not resolve is left to the bind to report.)
fn off_loopback(addr: &str) -> bool {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .map(|mut all| all.any(|a| !a.ip().is_loopback()))
        .unwrap_or(false)
}

fn node_name(name: Option<String>) -> anyhow::Result<String> {
    Ok(match name {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map_err(|e| anyhow::anyhow!("cannot read the host name ({e}): give --name"))?
            .trim()
            .to_string(),
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            // libublk notes every control handle it opens; a node agent opens one per
            // device at each look.
            tracing_subscriber::EnvFilter::try_from_env("HORN_LOG")
                .unwrap_or_else(|_| "info,libublk::ctrl=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if let (Some(path), false) = (&cli.log_file, matches!(cli.command, Command::Supervise { .. })) {
        let rotation = horn_manager::logfile::Rotation {
            max_bytes: cli.log_max_size,
            keep: cli.log_keep,
        };
        if let Err(e) = horn_manager::logfile::redirect(path, rotation) {
            eprintln!("hornd: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    let result = match cli.command {
        Command::Supervise {
            max_restarts,
            command,
        } => {
            let policy = horn_manager::supervise::Policy {
                max_restarts,
                ..Default::default()
            };
            return match horn_manager::supervise::run(&command, &policy, cli.log_file) {
                Ok(status) => ExitCode::from(status.code().map_or(1, |c| c.clamp(0, 255) as u8)),
                Err(e) => {
                    eprintln!("hornd supervise: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Replica {
            dir,
            listen,
            control,
            size,
            sector_size,
            cache,
            max_connections,
            secret_file,
            open,
            credentials,
            data_tls,
        } => (|| {
            let credentials = credentials
                .map(|dir| {
                    horn_pki::LiveCredentials::open(&dir, horn_manager::agent::NODE_CREDENTIALS).map_err(
                        |e| anyhow::anyhow!("cannot read the node's credentials in {}: {e}", dir.display()),
                    )
                })
                .transpose()?;
            let secret = secret_file
                .map(|f| horn_proto::auth::VolumeSecret::read(&f))
                .transpose()
                .map_err(anyhow::Error::msg)?;
            if secret.is_none() && !open {
                for (what, addr) in [("--listen", &listen), ("--control", &control)] {
                    if off_loopback(addr) {
                        anyhow::bail!(
                            "{what} {addr} is not a loopback address, and without --secret-file anyone who reaches \
                             it could read and write the replica: give the volume's secret, or --open to serve \
                             without one"
                        );
                    }
                }
            }
            serve_replica(
                dir,
                listen,
                control,
                horn_manager::daemon::ReplicaOptions {
                    size,
                    sector_size,
                    cache,
                    limits: horn_replica::server::Limits {
                        connections: max_connections as usize,
                        ..Default::default()
                    },
                    secret,
                    credentials,
                    data_tls,
                },
            )
        })(),
        Command::Manager {
            data,
            listen,
            certificate_lifetime,
        } => horn_manager::daemon::serve_manager(data, listen, certificate_lifetime),
        Command::Node {
            manager,
            token_file,
            join,
            ca_file,
            name,
            address,
            zone,
            tags,
            disks,
            state,
        } => (|| {
            let name = node_name(name)?;
            // What the node joins with, read only if it has no certificate yet.
            let joining = || -> anyhow::Result<(String, String)> {
                let token = match &join {
                    Some(t) => t.clone(),
                    None => std::fs::read_to_string(&token_file).map_err(|e| {
                        anyhow::anyhow!(
                            "cannot read the cluster token from {} (or give a join token with --join): {e}",
                            token_file.display()
                        )
                    })?,
                };
                let ca_file = match (&ca_file, &join) {
                    (Some(f), _) => f.clone(),
                    (None, None) => token_file.with_file_name(horn_pki::CA_CERT),
                    (None, Some(_)) => anyhow::bail!(
                        "--join needs --ca-file: the cluster CA's certificate (ca.pem in the manager's directory), to check the manager by"
                    ),
                };
                let ca = std::fs::read_to_string(&ca_file).map_err(|e| {
                    anyhow::anyhow!(
                        "cannot read the cluster CA's certificate from {} (--ca-file): {e}",
                        ca_file.display()
                    )
                })?;
                Ok((ca, token.trim().to_string()))
            };
            let credentials =
                horn_manager::agent::node_credentials(&manager, joining, &name, &address, &state)?;
            horn_manager::daemon::serve_node(horn_manager::agent::AgentConfig {
                manager,
                credentials,
                name,
                address,
                zone,
                tags: tags.into_iter().collect(),
                disks,
                state,
                hornd: std::env::current_exe()?,
            })
        })(),
        Command::AllInOne {
            data,
            listen,
            name,
            address,
        } => (|| {
            let name = node_name(name)?;
            horn_manager::daemon::serve_all_in_one(data, listen, name, address, std::env::current_exe()?)
        })(),
        Command::Engine {
            replicas,
            volume,
            manager,
            node,
            credentials,
            data_tls,
            key_file,
            secret_file,
            host_replica,
            host_replica_control,
            host_replica_size,
            host_replica_sector_size,
            host_replica_cache,
            control,
            timeout,
            clean_intents_every,
            frontend,
            name,
            queues,
            depth,
            max_io,
            id,
            read_only,
            recover,
            copy,
            listen,
            iqn,
            max_connections,
            chap_user,
            chap_secret_file,
            discovery_auth,
            no_chap,
            mutual_user,
            mutual_secret_file,
        } => {
            let frontend = frontend.or(recover.map(|_| Frontend::Ublk));
            let iscsi = match frontend {
                Some(Frontend::Iscsi) => (|| -> anyhow::Result<_> {
                    if chap_user.is_none() && !no_chap {
                        anyhow::bail!(
                            "the iSCSI target requires CHAP: give --chap-user and --chap-secret-file, or --no-chap \
                             to let any initiator that reaches {listen} read and write the volume"
                        );
                    }
                    let secret = |user: Option<String>, file: Option<PathBuf>| -> anyhow::Result<_> {
                        Ok(match (user, file) {
                            (Some(user), Some(file)) => Some(horn_iscsi::login::ChapSecret {
                                user,
                                secret: read_secret(&file)?,
                            }),
                            _ => None,
                        })
                    };
                    Ok(Some(horn_manager::daemon::IscsiOptions {
                        listen,
                        iqn: iqn.unwrap_or_else(|| horn_iscsi::target::default_iqn(&name)),
                        auth: horn_iscsi::login::Auth {
                            chap: secret(chap_user, chap_secret_file)?,
                            mutual: secret(mutual_user, mutual_secret_file)?,
                            discovery: discovery_auth,
                        },
                        read_only,
                        max_connections: max_connections as usize,
                    }))
                })(),
                _ => Ok(None),
            };
            match (u32::try_from(max_io).ok().filter(|&m| m <= 8 << 20), iscsi) {
                (None, _) => Err(anyhow::anyhow!(
                    "--max-io {max_io} is over the 8 MiB the data wire carries"
                )),
                (_, Err(e)) => Err(e),
                (Some(max_io_bytes), Ok(iscsi)) => (|| {
                    let cipher = key_file
                        .map(|f| horn_engine::crypt::VolumeCipher::from_key_file(&f).map(std::sync::Arc::new))
                        .transpose()
                        .map_err(anyhow::Error::msg)?;
                    let secret = secret_file
                        .map(|f| horn_proto::auth::VolumeSecret::read(&f))
                        .transpose()
                        .map_err(anyhow::Error::msg)?;
                    let authority = match (manager, &node, &credentials) {
                        (Some(m), Some(n), Some(t)) => Some(std::sync::Arc::new(
                            horn_manager::authority::ManagerAuthority::new(&m, t, &name, n)?,
                        )
                            as std::sync::Arc<dyn horn_engine::authority::Authority>),
                        _ => None,
                    };
                    let tls = credentials
                        .map(|dir| {
                            horn_pki::LiveCredentials::open(&dir, horn_manager::agent::NODE_CREDENTIALS)
                                .map_err(|e| {
                                    anyhow::anyhow!(
                                        "cannot read the node's credentials in {}: {e}",
                                        dir.display()
                                    )
                                })
                        })
                        .transpose()?;
                    let recover = match (frontend, recover, id) {
                        (Some(Frontend::Ublk), None, None) => adopt_device(&name)?,
                        _ => recover,
                    };
                    let ublk = frontend.filter(|f| matches!(f, Frontend::Ublk)).map(|_| {
                        let defaults = horn_ublk::UblkOptions::default();
                        horn_ublk::UblkOptions {
                            queues: queues.unwrap_or(defaults.queues),
                            depth,
                            max_io_bytes,
                            id,
                            volume: name,
                            read_only,
                            recover,
                            copy,
                        }
                    });
                    serve_engine(
                        horn_manager::daemon::EngineStart {
                            replicas,
                            volume,
                            timeout: std::time::Duration::from_secs(timeout),
                            authority,
                            cipher,
                            secret: secret.clone(),
                            credentials: tls,
                            node,
                            data_tls,
                        },
                        control,
                        std::time::Duration::from_secs(clean_intents_every),
                        ublk,
                        iscsi,
                        host_replica.map(|dir| horn_manager::daemon::HostedReplicaOptions {
                            dir,
                            control: host_replica_control,
                            size: host_replica_size,
                            sector_size: host_replica_sector_size,
                            cache: host_replica_cache,
                            secret,
                        }),
                    )
                })(),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hornd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
