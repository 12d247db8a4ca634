//! `Engine`: what every queue of one volume shares.
//!
//! A volume is served by one or more queues ([`crate::queue::EngineQueue`]), each an
//! io_uring loop on its own thread with its own connection to every replica. They share
//! only this: the claimed replica set (names, generation, size), which replicas have
//! failed, and the pause gate that chain operations use to quiesce every queue.
//!
//! Nothing here takes a lock on the I/O path. A queue reads one atomic per I/O to learn
//! of failures another queue found, and bumps its own in-flight counter around each I/O
//! so that a snapshot can wait for every queue to drain:
//! - **failures**: a queue that drops a replica publishes it here *before* it completes
//!   any I/O on the strength of the drop, so any I/O submitted afterwards, on any queue,
//!   sees the replica as failed and never reads from it;
//! - **pause**: the coordinator raises the gate and then reads each queue's counter; a
//!   queue raises its counter and then reads the gate (both sequentially consistent),
//!   so either the coordinator sees the I/O and waits for it, or the queue sees the gate
//!   and holds the I/O back until [`Engine::resume`].

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use horn_proto::control::{
    DeleteSnapshotRequest, ExpandRequest, InfoReply, InfoRequest, PurgeRequest, ReleaseRequest,
    RevertRequest, SnapshotRequest,
};

use crate::authority::Authority;
use crate::client::{self, control_err, Caller, Deadline};
use crate::crypt::VolumeCipher;
use crate::membership::Record;
use crate::replica_set::{Mode, ReplicaConfig};
use crate::stripes::Stripes;
use crate::types::{ChainOp, RebuildStatus, ReplicaAddr, Result, VolumeError};
use horn_proto::auth::GenerationKey;

/// One replica as the engine claimed it.
#[derive(Debug)]
pub(crate) struct ClaimedReplica {
    pub(crate) config: ReplicaConfig,
    /// The replica's own identity (its name in membership records).
    pub(crate) id: String,
    pub(crate) data: String,
    pub(crate) control: String,
    failed: AtomicBool,
    /// RW (true) or WO (false): a rebuilt replica turns RW once it holds everything.
    rw: AtomicBool,
}

impl ClaimedReplica {
    pub(crate) fn new(addr: &ReplicaAddr, id: String, mode: Mode) -> ClaimedReplica {
        ClaimedReplica {
            id,
            config: ReplicaConfig {
                name: addr.data.clone(),
                mode,
                local: addr.local,
            },
            data: addr.data.clone(),
            control: addr.control.clone(),
            failed: AtomicBool::new(false),
            rw: AtomicBool::new(mode == Mode::Rw),
        }
    }

    /// RW or WO (a failed replica keeps the mode it had).
    pub(crate) fn mode(&self) -> Mode {
        if self.rw.load(Ordering::Acquire) {
            Mode::Rw
        } else {
            Mode::Wo
        }
    }
}

/// What a queue publishes for the coordinator.
#[derive(Debug)]
pub(crate) struct QueueShared {
    /// I/Os this queue has let through and not yet completed.
    pub(crate) in_flight: AtomicUsize,
    /// Written to wake the queue (after a pause, or to stop it).
    pub(crate) wake: OwnedFd,
}

impl QueueShared {
    pub(crate) fn new() -> Result<Arc<QueueShared>> {
        // SAFETY: eventfd has no memory arguments; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(VolumeError::System {
                op: "eventfd for a queue",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Arc::new(QueueShared {
            in_flight: AtomicUsize::new(0),
            // SAFETY: `fd` was just created and is owned by nothing else.
            wake: unsafe { OwnedFd::from_raw_fd(fd) },
        }))
    }

    pub(crate) fn wake(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

/// The state every queue of one volume shares.
#[derive(Debug)]
pub struct Engine {
    /// Grows when a replica is added for a rebuild; never shrinks (a replica's index
    /// is its place here, in every queue).
    replicas: RwLock<Vec<Arc<ClaimedReplica>>>,
    /// Bumped when a replica is added or turns RW; queues catch up on their next I/O.
    membership_epoch: AtomicU64,
    generation: u64,
    size: AtomicU64,
    sector_size: u32,
    timeout: Duration,
    skipped: Vec<(String, String)>,
    /// Bumped each time a replica is marked failed.
    failure_epoch: AtomicU64,
    /// The volume's identity, and this engine's.
    volume: String,
    engine_id: String,
    /// The engine as it calls the replicas' control services.
    caller: Caller,
    /// The data wire's key of this generation, when the volume's replicas hold its
    /// secret ([`horn_proto::auth`]).
    key: Option<GenerationKey>,
    /// The membership record in force; held while a change is stored, so changes
    /// go one at a time.
    record: Mutex<Record>,
    /// Where records are stored besides the replicas, under a manager.
    authority: Option<Arc<dyn Authority>>,
    /// An encrypted volume's key: writes are encrypted as they start, reads
    /// decrypted as they complete (`queue.rs`).
    cipher: Option<Arc<VolumeCipher>>,
    /// The failure epoch whose drops the record in force includes: queues hand back
    /// no completion while it trails [`Engine::failure_epoch`].
    recorded_epoch: AtomicU64,
    /// Why the volume is faulted (a change of membership could not count).
    faulted: Mutex<Option<String>>,
    is_faulted: AtomicBool,
    /// Wakes the keeper ([`crate::keeper`]) when a replica fails.
    keeper: (Mutex<bool>, Condvar),
    failure_reasons: Mutex<Vec<Option<String>>>,
    paused: AtomicBool,
    queues: Mutex<Vec<Arc<QueueShared>>>,
    /// Which queue may have changes in flight where (overlapping changes across
    /// queues wait for each other).
    stripes: Stripes,
    /// One chain operation at a time.
    chain: Mutex<()>,
    rebuilds: Mutex<Rebuilds>,
    /// Until when (`CLOCK_BOOTTIME` nanoseconds) reads may be handed back: the read
    /// lease ([`crate::lease`]).
    lease_until: AtomicU64,
    /// A queue holds a read back for want of a lease: wake it when the lease runs again.
    lease_waiters: AtomicBool,
    /// Set when the engine releases its replicas: no more renewals.
    leases_closed: AtomicBool,
    /// Held by the lease thread through each round of renewals.
    lease_round: Mutex<()>,
    runtime: tokio::runtime::Runtime,
}

/// The rebuilds of an engine (kept after they end, for `info`), in the order they
/// began; each has its own id, so a replica rebuilt twice has two.
#[derive(Debug, Default)]
struct Rebuilds {
    /// The replica's index and the rebuild's status.
    all: Vec<(usize, RebuildStatus)>,
    running: bool,
}

impl Engine {
    /// The shared state of a volume whose replicas `claimed` were claimed with
    /// `generation` (see [`crate::start`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        claimed: Vec<ClaimedReplica>,
        record: Record,
        size: u64,
        sector_size: u32,
        timeout: Duration,
        skipped: Vec<(String, String)>,
        runtime: tokio::runtime::Runtime,
        authority: Option<Arc<dyn Authority>>,
        cipher: Option<Arc<VolumeCipher>>,
        (caller, key): (Caller, Option<GenerationKey>),
    ) -> Engine {
        let generation = record.generation;
        Engine {
            caller,
            key,
            authority,
            cipher,
            volume: record.volume.clone(),
            engine_id: record.engine.clone(),
            record: Mutex::new(record),
            recorded_epoch: AtomicU64::new(0),
            faulted: Mutex::new(None),
            is_faulted: AtomicBool::new(false),
            keeper: (Mutex::new(false), Condvar::new()),
            failure_reasons: Mutex::new(vec![None; claimed.len()]),
            replicas: RwLock::new(claimed.into_iter().map(Arc::new).collect()),
            membership_epoch: AtomicU64::new(0),
            generation,
            size: AtomicU64::new(size),
            sector_size,
            timeout,
            skipped,
            failure_epoch: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            queues: Mutex::new(Vec::new()),
            stripes: Stripes::default(),
            chain: Mutex::new(()),
            rebuilds: Mutex::default(),
            lease_until: AtomicU64::new(0),
            lease_waiters: AtomicBool::new(false),
            leases_closed: AtomicBool::new(false),
            lease_round: Mutex::new(()),
            runtime,
        }
    }

    pub(crate) fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.runtime
    }

    /// An encrypted volume's key.
    pub(crate) fn cipher(&self) -> Option<&Arc<VolumeCipher>> {
        self.cipher.as_ref()
    }

    /// Whether the volume is encrypted (its data on the replicas is ciphertext).
    pub fn is_encrypted(&self) -> bool {
        self.cipher.is_some()
    }

    /// The authority on membership besides the replicas, if the engine runs under one.
    pub(crate) fn authority(&self) -> Option<&dyn Authority> {
        self.authority.as_deref()
    }

    /// The replicas, in the order every queue indexes them.
    pub(crate) fn replicas(&self) -> Vec<Arc<ClaimedReplica>> {
        self.replicas.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn replica(&self, i: usize) -> Arc<ClaimedReplica> {
        self.replicas.read().unwrap_or_else(|e| e.into_inner())[i].clone()
    }

    pub(crate) fn membership_epoch(&self) -> u64 {
        self.membership_epoch.load(Ordering::SeqCst)
    }

    /// Adds a claimed replica (WO) to the set; every queue connects to it before its
    /// next I/O. The caller holds the volume paused, so no write misses it.
    pub(crate) fn add_replica(&self, r: ClaimedReplica) -> usize {
        let mut replicas = self.replicas.write().unwrap_or_else(|e| e.into_inner());
        replicas.push(Arc::new(r));
        lock(&self.failure_reasons).push(None);
        self.membership_epoch.fetch_add(1, Ordering::SeqCst);
        replicas.len() - 1
    }

    /// Records that a rebuild of replica `i` begins, and gives it its id (from 1);
    /// refused while another runs.
    pub(crate) fn begin_rebuild(&self, mut status: RebuildStatus, i: usize) -> Result<u64> {
        let mut r = lock(&self.rebuilds);
        if r.running {
            return Err(VolumeError::BadRequest(
                "a rebuild is already under way; wait for it to end".into(),
            ));
        }
        r.running = true;
        status.id = r.all.len() as u64 + 1;
        let id = status.id;
        r.all.push((i, status));
        Ok(id)
    }

    /// Changes the status of rebuild `id`.
    pub(crate) fn update_rebuild(&self, id: u64, f: impl FnOnce(&mut RebuildStatus)) {
        if let Some((_, s)) = lock(&self.rebuilds).all.iter_mut().find(|(_, s)| s.id == id) {
            f(s);
        }
    }

    pub(crate) fn end_rebuild(&self) {
        lock(&self.rebuilds).running = false;
    }

    /// Is a rebuild under way?
    pub fn is_rebuilding(&self) -> bool {
        lock(&self.rebuilds).running
    }

    /// Every rebuild this engine ran or runs, in the order they began.
    pub fn rebuilds(&self) -> Vec<RebuildStatus> {
        lock(&self.rebuilds).all.iter().map(|(_, s)| s.clone()).collect()
    }

    /// Rebuild `id` (see [`crate::rebuild::add_replica`]).
    pub fn rebuild(&self, id: u64) -> Option<RebuildStatus> {
        lock(&self.rebuilds)
            .all
            .iter()
            .find(|(_, s)| s.id == id)
            .map(|(_, s)| s.clone())
    }

    /// A rebuilt replica holds everything: it serves reads from now on.
    pub(crate) fn promote(&self, i: usize) {
        self.replica(i).rw.store(true, Ordering::Release);
        self.membership_epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Volume size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Sector size in bytes.
    pub fn sector_size(&self) -> u32 {
        self.sector_size
    }

    /// The generation this engine claimed the replicas with.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// How long a replica may leave a request unanswered.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Replicas left out at start, and why.
    pub fn skipped(&self) -> &[(String, String)] {
        &self.skipped
    }

    /// Each replica's data address and mode as all queues together know it.
    pub fn replica_modes(&self) -> Vec<(String, Mode)> {
        self.replicas()
            .iter()
            .map(|r| {
                let mode = if r.failed.load(Ordering::Acquire) {
                    Mode::Err
                } else {
                    r.mode()
                };
                (r.data.clone(), mode)
            })
            .collect()
    }

    /// Why each failed replica failed.
    pub fn failure_reasons(&self) -> Vec<Option<String>> {
        lock(&self.failure_reasons).clone()
    }

    /// Publishes that a queue dropped `replica`; true if this is news. Until the keeper
    /// has recorded the drop ([`crate::keeper`]), no queue hands back a completion.
    pub(crate) fn mark_failed(&self, replica: usize, reason: &str) -> bool {
        if self.replica(replica).failed.swap(true, Ordering::AcqRel) {
            return false;
        }
        lock(&self.failure_reasons)[replica] = Some(reason.to_string());
        self.failure_epoch.fetch_add(1, Ordering::SeqCst);
        let (flag, wake) = &self.keeper;
        *lock(flag) = true;
        wake.notify_all();
        true
    }

    /// Drops the replica at data address `data` now, for `reason` known outside the
    /// data path (its node is down), as its timeout would later: it is marked failed,
    /// every queue is woken to drop it too (an I/O waiting on it completes without
    /// it), and the keeper records the drop. False if no live replica has that address.
    pub fn drop_replica(&self, data: &str, reason: &str) -> bool {
        let replicas = self.replicas();
        let Some(i) = (0..replicas.len()).find(|&i| replicas[i].data == data && !self.is_failed(i)) else {
            return false;
        };
        let dropped = self.mark_failed(i, reason);
        self.wake_queues();
        dropped
    }

    /// Runs control call `call` to replica `index` on the engine's control runtime,
    /// given up as soon as the replica is dropped (by a queue, or on request because
    /// its node is down): a hung replica holds the engine's own thread no longer than
    /// it takes to drop it, not for the whole deadline.
    pub(crate) fn unless_dropped<T>(
        &self,
        index: usize,
        call: impl std::future::Future<Output = std::result::Result<T, tonic::Status>>,
    ) -> std::result::Result<T, tonic::Status> {
        self.runtime.block_on(async {
            let dropped = async {
                while !self.is_failed(index) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            };
            tokio::select! {
                r = call => r,
                () = dropped => Err(tonic::Status::unavailable("the replica was dropped meanwhile")),
            }
        })
    }

    /// The volume's identity.
    pub fn volume_id(&self) -> &str {
        &self.volume
    }

    /// This engine's identity.
    pub fn engine_id(&self) -> &str {
        &self.engine_id
    }

    /// The engine as it calls the replicas' control services.
    pub(crate) fn caller(&self) -> &Caller {
        &self.caller
    }

    /// The data wire's key of this generation, if the replicas want one.
    pub(crate) fn key(&self) -> Option<&GenerationKey> {
        self.key.as_ref()
    }

    /// The membership record in force.
    pub fn record(&self) -> Record {
        lock(&self.record).clone()
    }

    /// The record in force, locked: a change holds it while it is stored.
    pub(crate) fn record_lock(&self) -> MutexGuard<'_, Record> {
        lock(&self.record)
    }

    /// May queues hand back completions: every drop recorded, or the volume faulted
    /// (then they hand back failures).
    pub(crate) fn drops_settled(&self) -> bool {
        self.recorded_epoch.load(Ordering::SeqCst) == self.failure_epoch.load(Ordering::SeqCst)
            || self.is_faulted()
    }

    /// The drops up to failure epoch `epoch` are recorded: queues may go on.
    pub(crate) fn set_recorded(&self, epoch: u64) {
        self.recorded_epoch.store(epoch, Ordering::SeqCst);
        self.wake_queues();
    }

    /// Why the volume is faulted, if it is.
    pub fn faulted(&self) -> Option<String> {
        lock(&self.faulted).clone()
    }

    pub(crate) fn is_faulted(&self) -> bool {
        self.is_faulted.load(Ordering::SeqCst)
    }

    /// A change of membership could not count: nothing more is acknowledged.
    pub(crate) fn fault(&self, why: String) {
        tracing::error!(reason = %why, "volume faulted");
        lock(&self.faulted).get_or_insert(why);
        self.is_faulted.store(true, Ordering::SeqCst);
        self.wake_queues();
    }

    /// Waits until a replica fails or `timeout` passes (the keeper's sleep).
    pub(crate) fn wait_for_failure(&self, timeout: Duration) {
        let (flag, wake) = &self.keeper;
        let mut pending = lock(flag);
        if !*pending {
            pending = wake
                .wait_timeout(pending, timeout)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *pending = false;
    }

    /// May a read that has returned be handed back now: does the read lease run?
    pub(crate) fn reads_leased(&self) -> bool {
        boottime_ns() < self.lease_until.load(Ordering::SeqCst)
    }

    /// How long the read lease runs from now (zero: lapsed).
    pub fn read_lease_left(&self) -> Duration {
        let until = self.lease_until.load(Ordering::SeqCst);
        Duration::from_nanos(until.saturating_sub(boottime_ns()))
    }

    /// A queue holds a read back until the lease runs again: [`Engine::reads_leased`]
    /// checked after this sees any extension, or the extension wakes the queue.
    pub(crate) fn wait_for_lease(&self) {
        self.lease_waiters.store(true, Ordering::SeqCst);
    }

    /// The lease runs until `until` (`CLOCK_BOOTTIME` ns), if that is later than it did.
    pub(crate) fn extend_lease(&self, until: u64) {
        self.lease_until.fetch_max(until, Ordering::SeqCst);
        if self.lease_waiters.swap(false, Ordering::SeqCst) {
            self.wake_queues();
        }
    }

    /// The lease thread's round: held while renewals are under way.
    pub(crate) fn lease_round(&self) -> MutexGuard<'_, ()> {
        lock(&self.lease_round)
    }

    pub(crate) fn leases_closed(&self) -> bool {
        self.leases_closed.load(Ordering::SeqCst)
    }

    /// Which queue may have changes in flight where.
    pub(crate) fn stripes(&self) -> &Stripes {
        &self.stripes
    }

    /// Wakes every queue's loop (a change one of them waits for may start).
    pub(crate) fn wake_queues(&self) {
        for q in lock(&self.queues).iter() {
            q.wake();
        }
    }

    pub(crate) fn failure_epoch(&self) -> u64 {
        self.failure_epoch.load(Ordering::Acquire)
    }

    pub(crate) fn is_failed(&self, replica: usize) -> bool {
        self.replica(replica).failed.load(Ordering::Acquire)
    }

    pub(crate) fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    pub(crate) fn register(&self, queue: Arc<QueueShared>) {
        lock(&self.queues).push(queue);
    }

    /// Forgets a queue; returns how many are left.
    pub(crate) fn unregister(&self, queue: &Arc<QueueShared>) -> usize {
        let mut queues = lock(&self.queues);
        queues.retain(|q| !Arc::ptr_eq(q, queue));
        queues.len()
    }

    /// Holds new I/O back on every queue and waits until the queues other than `own`
    /// have nothing in flight. Returns a guard that keeps other chain operations out;
    /// call [`Engine::resume`] before dropping it.
    pub(crate) fn pause(&self, own: &Arc<QueueShared>) -> Result<MutexGuard<'_, ()>> {
        let guard = lock(&self.chain);
        self.paused.store(true, Ordering::SeqCst);
        // A queue's I/O ends within the replica timeout (the replica answers or is
        // dropped), so a queue that has not drained long after it is stuck.
        let deadline = Instant::now() + self.timeout * 2 + Duration::from_secs(1);
        let queues: Vec<Arc<QueueShared>> = lock(&self.queues).clone();
        for q in queues.iter().filter(|q| !Arc::ptr_eq(q, own)) {
            while q.in_flight.load(Ordering::SeqCst) > 0 {
                if Instant::now() > deadline {
                    self.resume();
                    return Err(VolumeError::BadRequest(
                        "another queue of this volume did not drain its I/O in time; nothing was changed"
                            .into(),
                    ));
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        Ok(guard)
    }

    /// Lets every queue go on, waking those holding I/O back.
    pub(crate) fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        self.wake_queues();
    }

    /// Runs a chain operation through the control service of every replica that has
    /// not failed; returns the first one's view of the chain. The caller has drained
    /// and flushed the volume where the operation needs it.
    ///
    /// It cannot half-happen: a refusal by the first replica (a bad name, a missing
    /// snapshot) changes nothing anywhere and is returned; once one replica has done
    /// its part, a replica that fails its part, or misses the call's deadline, no
    /// longer matches the others and is dropped, durably (the keeper records it), to be
    /// rebuilt. The operation fails only if no replica did it.
    pub(crate) fn run_chain_op(&self, op: &ChainOp) -> Result<InfoReply> {
        if let ChainOp::Expand(size) = *op {
            if size < self.size() {
                return Err(VolumeError::BadRequest(format!(
                    "cannot shrink the volume from {} to {size} bytes",
                    self.size()
                )));
            }
        }
        let generation = self.generation;
        let deadline = Deadline::Chain(self.timeout);
        let mut first = None;
        let mut failures = Vec::new();
        for (i, r) in self.replicas().iter().enumerate() {
            if self.is_failed(i) {
                continue;
            }
            let this_op = op.clone();
            let (control, caller) = (r.control.clone(), self.caller.clone());
            // A replica dropped meanwhile (its node is down) is not waited for.
            let info = self.unless_dropped(i, async move {
                let mut c = client::connect(&control, &caller, deadline)
                    .await
                    .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                let reply = match this_op {
                    ChainOp::Info => c.info(InfoRequest {}).await?.into_inner(),
                    ChainOp::Snapshot { name, labels } => c
                        .snapshot(SnapshotRequest {
                            generation,
                            name,
                            labels,
                        })
                        .await?
                        .into_inner(),
                    ChainOp::Delete(name) => c
                        .delete_snapshot(DeleteSnapshotRequest { generation, name })
                        .await?
                        .into_inner(),
                    ChainOp::Purge => {
                        let p = c.purge(PurgeRequest { generation }).await?.into_inner();
                        p.info.unwrap_or_default()
                    }
                    ChainOp::Revert(name) => c.revert(RevertRequest { generation, name }).await?.into_inner(),
                    ChainOp::Expand(size) => c.expand(ExpandRequest { generation, size }).await?.into_inner(),
                };
                Ok::<_, tonic::Status>(reply)
            });
            match info {
                Ok(info) => {
                    first.get_or_insert(info);
                    if matches!(op, ChainOp::Info) {
                        break;
                    }
                }
                Err(s) if first.is_none() && is_refusal(s.code()) => {
                    // Nothing was done anywhere: the request itself is wrong, or this
                    // engine is fenced.
                    return Err(control_err(&r.control)(s));
                }
                Err(s) => {
                    let why = format!("its part of {} failed: {}", op.describe(), s.message());
                    if self.mark_failed(i, &format!("replica {} failed: {why}", r.data)) {
                        tracing::warn!(replica = %r.data, %why, "replica dropped: a chain operation failed on it");
                    }
                    failures.push(format!("{}: {}", r.data, s.message()));
                }
            }
        }
        let Some(first) = first else {
            return Err(VolumeError::BadRequest(format!(
                "{} failed on every replica: {}",
                op.describe(),
                failures.join("; ")
            )));
        };
        if let ChainOp::Expand(size) = *op {
            // Every replica left in the set now has the new size: I/O may use it.
            self.size.store(size, Ordering::Release);
        }
        Ok(first)
    }

    /// Each live replica's chain (its `Info`), for comparing them; a replica that does
    /// not answer within the deadline is named with its error.
    pub fn chains(&self) -> Vec<(String, std::result::Result<InfoReply, String>)> {
        let deadline = Deadline::Call(self.timeout);
        self.replicas()
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.is_failed(*i))
            .map(|(_, r)| {
                let (control, caller) = (r.control.clone(), self.caller.clone());
                let info = self.runtime.block_on(async move {
                    let mut c = client::connect(&control, &caller, deadline)
                        .await
                        .map_err(|e| e.to_string())?;
                    c.info(InfoRequest {})
                        .await
                        .map(|i| i.into_inner())
                        .map_err(|s| s.message().to_string())
                });
                (r.data.clone(), info)
            })
            .collect()
    }

    /// Releases every replica that has not failed (marks it clean), each within the
    /// deadline.
    pub(crate) fn release(&self) {
        // No renewal may follow a release: the lease ends with it.
        self.leases_closed.store(true, Ordering::SeqCst);
        drop(self.lease_round());
        let generation = self.generation;
        let deadline = Deadline::Chain(self.timeout);
        for (i, r) in self.replicas().iter().enumerate() {
            if self.is_failed(i) {
                continue;
            }
            let (control, caller) = (r.control.clone(), self.caller.clone());
            let released = self.runtime.block_on(async move {
                let mut c = client::connect(&control, &caller, deadline)
                    .await
                    .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                c.release(ReleaseRequest { generation }).await
            });
            if let Err(s) = released {
                tracing::warn!(replica = %r.control, error = %s.message(), "release failed");
            }
        }
    }
}

/// A refusal that every replica would give alike (the request is wrong, or the engine
/// is fenced), as opposed to one replica failing.
fn is_refusal(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::InvalidArgument
            | tonic::Code::AlreadyExists
            | tonic::Code::NotFound
            | tonic::Code::FailedPrecondition
            | tonic::Code::OutOfRange
    )
}

/// Nanoseconds on `CLOCK_BOOTTIME`, the read lease's clock ([`crate::lease`]): it goes
/// on while the machine sleeps.
pub(crate) fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the live local `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    assert_eq!(rc, 0, "CLOCK_BOOTTIME is unavailable");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Locks a mutex that guards plain data; a panic elsewhere does not poison its use.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
