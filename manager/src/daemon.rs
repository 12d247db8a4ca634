//! The daemons' bodies, shared by `hornd` and by the benchmarks, which start replica
//! processes of their own.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use horn_engine::control::{serve_commands, EngineControlService, EngineHandle};
use horn_engine::{ReplicaAddr, Volume};
use horn_proto::control::replica_control_server::ReplicaControlServer;
use horn_proto::engine_control::engine_control_server::EngineControlServer;
use horn_replica::control::ControlService;
use horn_replica::server::DataServer;
use horn_replica::Replica;
use nix::sys::signal::{SigSet, Signal};

use crate::format::human_bytes;

/// How `hornd replica` serves its directory, besides its addresses.
#[derive(Debug, Clone)]
pub struct ReplicaOptions {
    /// Create the replica with this size if its directory holds none.
    pub size: Option<u64>,
    /// Sector size when creating.
    pub sector_size: u32,
    /// How its I/O meets the page cache.
    pub cache: horn_replica::CacheMode,
    /// What its data-wire clients may hold.
    pub limits: horn_replica::server::Limits,
    /// The volume's wire secret: the data wire and the control service then serve
    /// only a peer that proves a current generation's key ([`horn_proto::auth`]).
    pub secret: Option<horn_proto::auth::VolumeSecret>,
    /// The node's credentials: the control service then serves mutual TLS only, to
    /// the roles [`crate::policy::replica`] allows, and calls other replicas so.
    pub credentials: Option<horn_pki::LiveCredentials>,
    /// Serve the data wire over TLS with `credentials` ([`horn_pki::serve_data_tls`]).
    pub data_tls: bool,
}

impl Default for ReplicaOptions {
    /// An existing replica (no size), 512-byte sectors when creating, direct I/O, the
    /// default limits, no secret.
    fn default() -> ReplicaOptions {
        ReplicaOptions {
            size: None,
            sector_size: 512,
            cache: Default::default(),
            limits: Default::default(),
            secret: None,
            credentials: None,
            data_tls: false,
        }
    }
}

/// Serves one replica directory on the data wire at `listen` and the control service
/// at `control`, as `options` say, until SIGINT or SIGTERM.
/// Prints `hornd replica: serving DIR on ADDR, control on ADDR` once serving.
pub fn serve_replica(dir: PathBuf, listen: String, control: String, options: ReplicaOptions) -> Result<()> {
    let ReplicaOptions {
        size,
        sector_size,
        cache,
        limits,
        secret,
        credentials,
        data_tls,
    } = options;
    // Before any thread starts, so that only the signal waiter receives them.
    let stop_signals = block_stop_signals()?;

    let mut replica = open_replica(&dir, size, sector_size, cache)?;
    replica.set_secret(secret);
    let mut listener = TcpListener::bind(&listen).with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    if data_tls {
        // The public address speaks TLS; the data server listens on loopback behind
        // the tunnel.
        let credentials = credentials
            .clone()
            .context("--data-tls needs the node's credentials (--credentials)")?;
        let inner =
            TcpListener::bind("127.0.0.1:0").context("cannot listen on loopback for the data server")?;
        horn_pki::serve_data_tls(listener, inner.local_addr()?, credentials)
            .context("cannot serve the data wire over TLS")?;
        listener = inner;
    }
    let control_listener =
        TcpListener::bind(&control).with_context(|| format!("cannot listen on {control} for control"))?;
    let control_addr = control_listener.local_addr()?;
    let server = DataServer::with_limits(replica, listener, limits)?;
    let handle = server.handle();
    let service = ControlService::new(handle.clone())
        .with_client_tls(credentials.as_ref().map(node_client_tls))
        .with_backups(Some(Arc::new(crate::backups::ReplicaBackups)));
    // Over --data-tls, a rebuild's layer streams go over TLS too.
    let service = service.with_stream_tls(match (&credentials, data_tls) {
        (Some(c), true) => Some(Arc::new(NodeStreamTls(c.clone())) as Arc<dyn horn_replica::sync::StreamTls>),
        _ => None,
    });
    let (routes, tls) = match &credentials {
        Some(c) => (
            tonic::service::Routes::new(horn_pki::Guarded::new(
                ReplicaControlServer::new(service),
                crate::policy::replica(),
            )),
            Some(horn_pki::ServerTls {
                credentials: c.clone(),
                optional: false,
            }),
        ),
        None => (
            tonic::service::Routes::new(ReplicaControlServer::new(service)),
            None,
        ),
    };
    let grpc =
        serve_control_until_signal(control_listener, routes, tls, stop_signals, move || handle.stop())?;
    // Scripts wait for this line to know the replica is being served.
    println!(
        "hornd replica: serving {} on {addr}, control on {control_addr}",
        dir.display()
    );
    server.run().context("the replica server failed")?;
    if grpc.join().is_err() {
        tracing::warn!("the control service thread panicked");
    }
    println!("hornd replica: stopped; {} closed cleanly", dir.display());
    Ok(())
}

/// Opens the replica in `dir`, creating it with `size` if it holds none, and sets its
/// cache mode.
fn open_replica(
    dir: &std::path::Path,
    size: Option<u64>,
    sector_size: u32,
    cache: horn_replica::CacheMode,
) -> Result<Replica> {
    let mut replica = match size {
        Some(size) if !dir.join(horn_replica::meta::META_FILE).exists() => {
            tracing::info!(dir = %dir.display(), size = %human_bytes(size), "creating replica");
            Replica::create(dir, size, sector_size)
        }
        _ => Replica::open(dir),
    }
    .with_context(|| format!("cannot open replica {}", dir.display()))?;
    replica
        .set_cache_mode(cache)
        .with_context(|| format!("cannot set the cache mode of replica {}", dir.display()))?;
    tracing::info!(dir = %dir.display(), cache = %cache, "replica I/O cache mode");
    Ok(replica)
}

/// A replica the engine hosts in its own process (`hornd engine --host-replica`): its
/// data I/O runs on the engine's rings, without a socket hop.
#[derive(Debug, Clone)]
pub struct HostedReplicaOptions {
    /// The replica directory.
    pub dir: PathBuf,
    /// Address for its gRPC control service (the engine's claims and snapshots go
    /// through it, like any replica's).
    pub control: String,
    /// Create it with this size if the directory holds none yet.
    pub size: Option<u64>,
    /// Sector size when creating.
    pub sector_size: u32,
    /// How its data I/O meets the page cache.
    pub cache: horn_replica::CacheMode,
    /// The volume's wire secret: its control service then serves only the volume's
    /// current engine.
    pub secret: Option<horn_proto::auth::VolumeSecret>,
}

/// A replica hosted in this process, served until [`HostedReplica::close`].
pub struct HostedReplica {
    replica: Arc<horn_replica::SharedReplica>,
    data: String,
    grpc: std::thread::JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl HostedReplica {
    /// Opens (or creates) the replica, makes it reachable by this process's engine at
    /// `inproc:DIR`, and serves its control service. Returns it and its address for
    /// the engine (local, so preferred for reads).
    pub fn start(opts: &HostedReplicaOptions) -> Result<(HostedReplica, ReplicaAddr)> {
        let mut replica = open_replica(&opts.dir, opts.size, opts.sector_size, opts.cache)?;
        replica.set_secret(opts.secret.clone());
        let replica = horn_replica::SharedReplica::new(replica)
            .with_context(|| format!("cannot share replica {}", opts.dir.display()))?;
        let listener = TcpListener::bind(&opts.control).with_context(|| {
            format!(
                "cannot listen on {} for the hosted replica's control",
                opts.control
            )
        })?;
        let control = listener.local_addr()?.to_string();
        let data = replica.host()?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let handle = horn_replica::server::ServerHandle::shared(replica.clone());
        let routes = tonic::service::Routes::new(ReplicaControlServer::new(
            ControlService::new(handle).with_backups(Some(Arc::new(crate::backups::ReplicaBackups))),
        ));
        let grpc = match spawn_control_service(listener, routes, None, stopped, false) {
            Ok(g) => g,
            Err(e) => {
                horn_replica::SharedReplica::unhost(&data);
                return Err(e);
            }
        };
        tracing::info!(dir = %opts.dir.display(), control = %control, "hosting the replica in this process");
        let addr = ReplicaAddr {
            data: data.clone(),
            control,
            local: true,
        };
        Ok((
            HostedReplica {
                replica,
                data,
                grpc,
                stop,
            },
            addr,
        ))
    }

    /// Stops its control service, and flushes and closes it (after the engine that
    /// used it closed).
    pub fn close(self) -> Result<()> {
        let _ = self.stop.send(());
        if self.grpc.join().is_err() {
            tracing::warn!("the hosted replica's control service thread panicked");
        }
        horn_replica::SharedReplica::unhost(&self.data);
        let dir = self.replica.dir().display().to_string();
        self.replica
            .close()
            .with_context(|| format!("cannot close the hosted replica {dir}"))
    }
}

/// The replicas an engine starts on, and what it asks of them.
#[derive(Debug, Clone)]
pub struct EngineStart {
    /// The replicas' addresses.
    pub replicas: Vec<ReplicaAddr>,
    /// Start only if the replicas hold this volume (`hornd engine --volume`): never
    /// make a new, empty volume out of blank replicas (disks not mounted).
    pub volume: Option<String>,
    /// How long a replica may take to answer before it is dropped.
    pub timeout: Duration,
    /// The membership authority besides the replicas (a manager), if any.
    pub authority: Option<Arc<dyn horn_engine::authority::Authority>>,
    /// The volume's key, for an encrypted volume.
    pub cipher: Option<Arc<horn_engine::crypt::VolumeCipher>>,
    /// The volume's wire secret, held by its replicas too (standalone; under a
    /// manager the engine gets its generation's key from the manager instead).
    pub secret: Option<horn_proto::auth::VolumeSecret>,
    /// The node's credentials: the engine calls its replicas over mutual TLS, and
    /// serves its control service so, to the roles [`crate::policy::engine`] allows
    /// for node `node`.
    pub credentials: Option<horn_pki::LiveCredentials>,
    /// The node the engine runs on, if it knows it.
    pub node: Option<String>,
    /// Reach the replicas' data wires over TLS with `credentials`.
    pub data_tls: bool,
}

/// Serves a volume's engine on `start`'s replicas (and on the replica it `hosted` in its own
/// process, if any) until SIGINT or SIGTERM: holds the volume open and serves the
/// engine control service at `control`; with `ublk`, also serves the volume as a ublk
/// block device. On stop, deletes the device, flushes and
/// releases the replicas. Prints `hornd engine: ...` lines once serving.
pub fn serve_engine(
    start: EngineStart,
    control: String,
    clean_intents_every: Duration,
    ublk: Option<horn_ublk::UblkOptions>,
    iscsi: Option<IscsiOptions>,
    hosted: Option<HostedReplicaOptions>,
) -> Result<()> {
    let stop_signals = block_stop_signals()?;
    if let Some(opts) = &ublk {
        horn_ublk::check_available()?;
        own_mount_namespace()?;
        // Before any claim: a recovery that cannot happen must not fence the engine
        // that still serves the device.
        if let Some(id) = opts.recover {
            horn_ublk::device::check_recoverable(id)?;
        }
    }
    let EngineStart {
        mut replicas,
        volume: pin,
        timeout,
        authority,
        cipher,
        secret,
        credentials,
        node,
        data_tls,
    } = start;
    let data_tls = match (data_tls, &credentials) {
        (false, _) => None,
        (true, Some(c)) => {
            let dialer = horn_pki::DataTlsDialer::new(c.clone());
            Some(horn_proto::auth::DataDial::new(move |replica| {
                dialer.local_for(replica)
            }))
        }
        (true, None) => anyhow::bail!("--data-tls needs the node's credentials (--credentials)"),
    };
    let hosted = match hosted {
        Some(opts) => {
            let (h, addr) = HostedReplica::start(&opts)?;
            replicas.insert(0, addr);
            Some(h)
        }
        None => None,
    };
    let started = Volume::start_with(
        &replicas,
        timeout,
        horn_engine::StartOptions {
            pin,
            authority,
            cipher,
            secret,
            tls: credentials.as_ref().map(node_client_tls),
            data_tls,
        },
    )
    .context("cannot start the engine");
    let (mut volume, report) = match started {
        Ok(v) => v,
        Err(e) => {
            if let Some(h) = hosted {
                h.close()?;
            }
            return Err(e);
        }
    };
    for (r, why) in &report.skipped {
        tracing::warn!(replica = %r, reason = %why, "replica left out");
    }
    let rec = &report.reconciled;
    if rec.regions > 0 {
        println!(
            "hornd engine: reconciled {} write-intent regions ({} compared, {} blocks differed, {} copied from {})",
            rec.regions,
            human_bytes(rec.bytes_compared),
            rec.blocks_differing,
            human_bytes(rec.bytes_copied),
            rec.source.as_deref().unwrap_or("-")
        );
    }
    let listener =
        TcpListener::bind(&control).with_context(|| format!("cannot listen on {control} for control"))?;
    let control_addr = listener.local_addr()?;
    let (handle, commands) = EngineHandle::new();
    let service = EngineControlServer::new(
        EngineControlService::new(handle.clone(), volume.engine().clone())
            .with_restores(Some(Arc::new(crate::backups::EngineRestores))),
    );
    let (routes, tls) = match &credentials {
        Some(c) => (
            tonic::service::Routes::new(horn_pki::Guarded::new(service, crate::policy::engine(node))),
            Some(horn_pki::ServerTls {
                credentials: c.clone(),
                optional: false,
            }),
        ),
        None => (tonic::service::Routes::new(service), None),
    };
    let grpc = serve_control_until_signal(listener, routes, tls, stop_signals, move || handle.stop())?;
    println!(
        "hornd engine: volume {} of {} on {} replicas (generation {}{}), control on {control_addr}",
        report.volume,
        human_bytes(report.size),
        report.used.len(),
        report.generation,
        if volume.engine().is_encrypted() {
            ", encrypted: AES-256-XTS"
        } else {
            ""
        }
    );
    let device = Arc::new(AtomicI64::new(-1));
    let ublk_thread = match ublk {
        Some(opts) => {
            let engine = volume.engine().clone();
            let id = device.clone();
            Some(std::thread::Builder::new().name("ublk".into()).spawn(move || {
                let served = horn_ublk::serve(engine, &opts, move |info| {
                    id.store(info.id as i64, Ordering::SeqCst);
                    // `hornctl ublk add` waits for this line.
                    println!("hornd engine: serving {} (ublk id {})", info.path, info.id);
                });
                if let Err(e) = &served {
                    eprintln!("hornd engine: {e}");
                }
                // The device is gone (deleted, or never made): the daemon stops.
                // SAFETY: kill takes no pointers; it signals this process.
                unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
                served
            })?)
        }
        None => None,
    };
    let iscsi_target = match iscsi {
        Some(opts) => Some(start_iscsi(volume.engine().clone(), opts)?),
        None => None,
    };
    serve_commands(&mut volume, &commands, clean_intents_every);
    if let Some(t) = iscsi_target {
        t.stop(Duration::from_secs(10));
    }
    if grpc.join().is_err() {
        tracing::warn!("the control service thread panicked");
    }
    let mut result = Ok(());
    if let Some(t) = ublk_thread {
        let id = device.load(Ordering::SeqCst);
        if id >= 0 {
            if let Some(why) = horn_ublk::device::in_use(id as u32) {
                // Never pull a device out from under a filesystem. The process ends
                // as a crash would: the driver holds the device (user recovery) and
                // queues its I/O until a new engine attaches; the replicas stay
                // claimed, and the next engine reconciles them.
                println!(
                    "hornd engine: stopped; /dev/ublkb{id} stays ({why}): `hornctl ublk recover {id}` \
                     serves it again"
                );
                std::process::exit(0);
            }
            if let Err(e) = horn_ublk::device::stop(id as u32) {
                tracing::warn!(error = %e, "stopping the ublk device");
            }
        }
        match t.join() {
            Ok(Err(e)) => result = Err(anyhow::Error::new(e).context("the ublk frontend failed")),
            Err(_) => result = Err(anyhow::anyhow!("the ublk frontend panicked")),
            Ok(Ok(())) => {}
        }
    }
    volume.close().context("closing the volume")?;
    if let Some(h) = hosted {
        h.close()?;
    }
    println!("hornd engine: stopped; replicas flushed and released");
    result
}

/// How `hornd engine --frontend iscsi` serves the volume.
#[derive(Debug, Clone)]
pub struct IscsiOptions {
    /// Portal address to listen on.
    pub listen: String,
    /// Target name.
    pub iqn: String,
    /// CHAP settings.
    pub auth: horn_iscsi::login::Auth,
    /// Serve the LUN read-only.
    pub read_only: bool,
    /// Connections served at once (one more is refused at login, "out of resources").
    pub max_connections: usize,
}

fn start_iscsi(
    engine: Arc<horn_engine::Engine>,
    opts: IscsiOptions,
) -> Result<Arc<horn_iscsi::target::Target>> {
    horn_iscsi::target::check_iqn(&opts.iqn).map_err(anyhow::Error::msg)?;
    let listener = TcpListener::bind(&opts.listen)
        .with_context(|| format!("cannot listen on {} for iSCSI", opts.listen))?;
    let addr = listener.local_addr()?;
    let chap = match (&opts.auth.chap, &opts.auth.mutual) {
        (Some(_), Some(_)) => "mutual CHAP",
        (Some(_), None) => "CHAP",
        _ => "no authentication",
    };
    let target = Arc::new(
        horn_iscsi::target::Target::new(
            engine,
            opts.iqn.clone(),
            addr.to_string(),
            opts.auth,
            opts.read_only,
        )
        .with_max_connections(opts.max_connections),
    );
    let t = target.clone();
    std::thread::Builder::new()
        .name("iscsi-listen".into())
        .spawn(move || {
            if let Err(e) = horn_iscsi::listener::serve(t, listener) {
                tracing::error!(error = %e, "the iSCSI listener failed");
            }
        })?;
    println!(
        "hornd engine: serving iSCSI target {} on {addr} ({chap})",
        opts.iqn
    );
    Ok(target)
}

/// Moves this process into a mount namespace of its own (mounts still propagate in
/// from the host, none out). libublk's documentation asks this of ublk servers: a
/// server that shares the namespace in which its device is mounted can deadlock when
/// the device is torn down.
fn own_mount_namespace() -> Result<()> {
    // SAFETY: unshare and mount take only constant arguments here.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(std::io::Error::last_os_error()).context("cannot enter a mount namespace of its own");
        }
        let root = c"/";
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        ) != 0
        {
            return Err(std::io::Error::last_os_error()).context("cannot make / a slave mount");
        }
    }
    // Where the host's mounts are private (no propagation), this namespace's copies of
    // filesystems on ublk devices would outlive their unmount on the host and keep
    // those devices busy forever (a recovered engine would pin its own device's
    // filesystem). The engine uses none of them: let go of each.
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    for target in ublk_mount_points(&mountinfo).into_iter().rev() {
        let Ok(path) = std::ffi::CString::new(target.clone()) else {
            continue;
        };
        // SAFETY: umount2 reads a NUL-terminated path we own; MNT_DETACH affects only
        // this process's own mount namespace.
        if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
            tracing::warn!(mount = %target, error = %std::io::Error::last_os_error(), "could not let go of a ublk filesystem in the engine's mount namespace");
        }
    }
    Ok(())
}

/// Mount points (in mount order) of filesystems on ublk block devices, from the text
/// of `/proc/self/mountinfo` (octal escapes such as `\040` decoded).
fn ublk_mount_points(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (fields, after) = line.split_once(" - ")?;
            let source = after.split_whitespace().nth(1)?;
            let target = fields.split_whitespace().nth(4)?;
            source
                .starts_with("/dev/ublkb")
                .then(|| unescape_mount_field(target))
        })
        .collect()
}

fn unescape_mount_field(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Serves the manager (`proto/manager.proto`) at `listen` with its specs in `data`
/// (the store file and the cluster identity `hornctl cluster init` wrote there) until
/// SIGINT or SIGTERM. Prints `hornd manager: ...` once serving.
pub fn serve_manager(data: PathBuf, listen: String, certificate_lifetime: Duration) -> Result<()> {
    let path = crate::api::store_path(&data);
    let store = crate::store::embedded::EmbeddedStore::open(&path)?;
    serve_manager_on(data, listen, store, certificate_lifetime, || {})
}

/// [`serve_manager`] on an open store; `on_stop` runs when a stop signal arrives.
fn serve_manager_on(
    data: PathBuf,
    listen: String,
    store: crate::store::embedded::EmbeddedStore,
    certificate_lifetime: Duration,
    on_stop: impl FnOnce() + Send + 'static,
) -> Result<()> {
    use crate::api::{ClusterIdentity, ManagerService, Service};
    let stop_signals = block_stop_signals()?;
    let identity = ClusterIdentity::load(&data)?;
    identity.ensure_pki(&data)?;
    let credentials = horn_pki::LiveCredentials::open(&data, crate::api::MANAGER_CREDENTIALS)?;
    let path = crate::api::store_path(&data);
    let listener = TcpListener::bind(&listen).with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let manager = std::sync::Arc::new(
        ManagerService::new(store, &identity, &path).with_certificate_lifetime(certificate_lifetime),
    );
    manager.spawn_loops()?;
    let service = Service(manager);
    // Mutual TLS: every call but a node's join presents a certificate from the
    // cluster's CA, and the policy checks its role before the call is served.
    let routes = tonic::service::Routes::new(horn_pki::Guarded::new(
        horn_proto::manager_api::manager_server::ManagerServer::new(service),
        crate::policy::manager(),
    ));
    let tls = horn_pki::ServerTls {
        credentials,
        optional: true,
    };
    let (stopped_tx, stopped) = std::sync::mpsc::channel();
    let grpc = serve_control_until_signal(listener, routes, Some(tls), stop_signals, move || {
        on_stop();
        let _ = stopped_tx.send(());
    })?;
    println!(
        "hornd manager: cluster {} on {addr}, specs in {}",
        identity.id,
        path.display()
    );
    let _ = stopped.recv();
    if grpc.join().is_err() {
        tracing::warn!("the manager service thread panicked");
    }
    println!("hornd manager: stopped");
    Ok(())
}

/// Runs the manager and a node agent in one process (`hornd all-in-one`): creates the
/// cluster in `data` at the first start, with soft node anti-affinity (one machine
/// holds every replica), and gives the node the disk `data/disk`.
pub fn serve_all_in_one(
    data: PathBuf,
    listen: String,
    name: String,
    address: String,
    hornd: PathBuf,
) -> Result<()> {
    use crate::api::{ClusterIdentity, TOKEN_FILE};
    let _ = block_stop_signals()?;
    let path = crate::api::store_path(&data);
    let fresh = !data.join(TOKEN_FILE).exists();
    if fresh {
        ClusterIdentity::init(&data)?;
    }
    let mut store = crate::store::embedded::EmbeddedStore::open(&path)?;
    if fresh {
        let specs = crate::model::Specs::new(store);
        let current = specs.settings()?;
        let mut settings = current.spec;
        settings.scheduling.node_anti_affinity = crate::scheduler::AntiAffinity::Soft;
        specs.put_settings(&settings, current.revision)?;
        store = specs.into_store();
        println!(
            "hornd all-in-one: created cluster in {} (token in {}); replicas of a volume may share this node",
            data.display(),
            data.join(TOKEN_FILE).display()
        );
    }
    let identity = ClusterIdentity::load(&data)?;
    identity.ensure_pki(&data)?;
    // The node's credentials, from the CA here: no join needed in one process.
    let tls = data.join("node").join("tls");
    let credentials = match horn_pki::Credentials::load(&tls, crate::agent::NODE_CREDENTIALS) {
        Ok(c) if c.role().ok() == Some(horn_pki::Role::Node(name.clone())) => c,
        _ => {
            let ip = address.parse::<std::net::SocketAddr>().map(|a| a.ip()).ok();
            let c = horn_pki::Ca::load(&data)?.issue(
                &horn_pki::Role::Node(name.clone()),
                &ip.into_iter().collect::<Vec<_>>(),
                horn_pki::Validity::Days(horn_pki::LEAF_DAYS),
            )?;
            c.save(&tls, crate::agent::NODE_CREDENTIALS)?;
            c
        }
    };
    let manager = listen.clone();
    let cfg = crate::agent::AgentConfig {
        manager: if manager.starts_with("0.0.0.0:") {
            manager.replacen("0.0.0.0", "127.0.0.1", 1)
        } else {
            manager
        },
        credentials,
        name,
        address,
        zone: String::new(),
        tags: Default::default(),
        disks: vec![crate::agent::AgentDisk {
            path: data.join("disk"),
            tags: Default::default(),
        }],
        state: data.join("node"),
        hornd,
    };
    let (stop_tx, stop) = std::sync::mpsc::channel();
    let agent = std::thread::Builder::new()
        .name("agent".into())
        .spawn(move || crate::agent::run(cfg, stop))?;
    let lifetime = Duration::from_secs(horn_pki::LEAF_DAYS as u64 * 86400);
    serve_manager_on(data, listen, store, lifetime, move || {
        let _ = stop_tx.send(());
    })?;
    match agent.join() {
        Ok(r) => r?,
        Err(_) => anyhow::bail!("the node agent panicked"),
    }
    println!("hornd all-in-one: stopped (the volumes' engines and replicas run on)");
    Ok(())
}

/// Runs the node agent ([`crate::agent`]) until SIGINT or SIGTERM.
pub fn serve_node(cfg: crate::agent::AgentConfig) -> Result<()> {
    let stop_signals = block_stop_signals()?;
    let (stop_tx, stop) = std::sync::mpsc::channel();
    on_stop_signal(stop_signals, move || {
        let _ = stop_tx.send(());
    })?;
    crate::agent::run(cfg, stop)?;
    println!("hornd node: stopped");
    Ok(())
}

/// Blocks SIGINT and SIGTERM in this thread (and the threads it starts) and returns
/// them for a waiter thread: only that thread then receives them.
pub(crate) fn block_stop_signals() -> Result<SigSet> {
    let mut stop_signals = SigSet::empty();
    stop_signals.add(Signal::SIGINT);
    stop_signals.add(Signal::SIGTERM);
    stop_signals
        .thread_block()
        .context("cannot block SIGINT/SIGTERM")?;
    Ok(stop_signals)
}

/// Serves `routes` on `listener` (its own thread) until one of `signals` arrives,
/// then stops the service and calls `on_stop` (which stops the daemon's main loop).
fn serve_control_until_signal(
    listener: TcpListener,
    routes: tonic::service::Routes,
    tls: Option<horn_pki::ServerTls>,
    signals: SigSet,
    on_stop: impl FnOnce() + Send + 'static,
) -> Result<std::thread::JoinHandle<()>> {
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let grpc = spawn_control_service(listener, routes, tls, shutdown_rx, true)?;
    on_stop_signal(signals, move || {
        let _ = shutdown_tx.send(());
        on_stop();
    })?;
    Ok(grpc)
}

/// How an engine or replica calls others with the node's credentials: the ones on
/// disk at each connect (renewed ones without a restart), checking a node's name.
pub fn node_client_tls(c: &horn_pki::LiveCredentials) -> horn_proto::auth::ClientTls {
    let c = c.clone();
    horn_proto::auth::ClientTls::new(move || c.client_tls(horn_pki::NODE_NAME))
}

/// A rebuild's layer streams over TLS with the node's credentials, for replicas
/// whose data wire is TLS.
struct NodeStreamTls(horn_pki::LiveCredentials);

impl horn_replica::sync::StreamTls for NodeStreamTls {
    fn accept(&self, tcp: std::net::TcpStream) -> std::io::Result<Box<dyn horn_replica::sync::ReadWrite>> {
        Ok(Box::new(horn_pki::accept_blocking(&self.0, tcp)?))
    }

    fn connect(&self, tcp: std::net::TcpStream) -> std::io::Result<Box<dyn horn_replica::sync::ReadWrite>> {
        Ok(Box::new(horn_pki::connect_blocking(&self.0, tcp)?))
    }
}

/// Calls `f` on a thread of its own once one of `signals` arrives.
fn on_stop_signal(signals: SigSet, f: impl FnOnce() + Send + 'static) -> Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = signals.wait() {
                tracing::info!(signal = ?sig, "stopping");
            }
            f();
        })?;
    Ok(())
}

/// Runs a gRPC service on its own tokio runtime thread until `shutdown`.
/// With `graceful`, open connections are served until their clients close them;
/// without, the service stops at once (for a service whose clients live in this
/// process and may outlast it).
fn spawn_control_service(
    listener: TcpListener,
    routes: tonic::service::Routes,
    tls: Option<horn_pki::ServerTls>,
    shutdown: tokio::sync::oneshot::Receiver<()>,
    graceful: bool,
) -> Result<std::thread::JoinHandle<()>> {
    let mut builder = tonic::transport::Server::builder();
    listener.set_nonblocking(true)?;
    let thread = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the control service runtime");
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot use the control listener");
                        return;
                    }
                };
                let server = builder.add_routes(routes);
                // TLS is done by horn_pki::serve_tls, whose handshakes take the
                // credentials current on disk (renewed ones without a restart).
                let served = match tls {
                    Some(tls) => {
                        serve_until(server, horn_pki::serve_tls(listener, tls), shutdown, graceful).await
                    }
                    None => {
                        let incoming = tonic::transport::server::TcpIncoming::from(listener);
                        serve_until(server, incoming, shutdown, graceful).await
                    }
                };
                if let Err(e) = served {
                    tracing::error!(error = %e, "the control service failed");
                }
            });
        })?;
    Ok(thread)
}

/// Serves `server` on the connections of `incoming` until `shutdown`: with
/// `graceful`, open connections are served until their clients close them.
async fn serve_until<I, IO, IE>(
    server: tonic::transport::server::Router,
    incoming: I,
    shutdown: tokio::sync::oneshot::Receiver<()>,
    graceful: bool,
) -> std::result::Result<(), tonic::transport::Error>
where
    I: tonic::codegen::tokio_stream::Stream<Item = std::result::Result<IO, IE>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if graceful {
        server
            .serve_with_incoming_shutdown(incoming, async {
                let _ = shutdown.await;
            })
            .await
    } else {
        tokio::select! {
            served = server.serve_with_incoming(incoming) => served,
            _ = shutdown => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ublk_filesystems_are_found_in_mountinfo() {
        let mountinfo = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
98 22 259:0 / /var/tmp/a\\040b/mnt rw,relatime - ext4 /dev/ublkb0 rw
99 22 259:1 / /srv/data rw - xfs /dev/ublkb12 rw
100 22 0:50 / /proc rw - proc proc rw
";
        assert_eq!(ublk_mount_points(mountinfo), ["/var/tmp/a b/mnt", "/srv/data"]);
        assert!(ublk_mount_points("garbage without separator\n").is_empty());
    }
}
