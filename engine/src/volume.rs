//! `Volume`: one queue of a volume on a ring of its own.
//!
//! The queue's work (replica connections, the replica set, buffers) is an
//! [`EngineQueue`]; this driver owns an io_uring for it, pushes the queue's entries,
//! and hands their completions back. A frontend whose queues already run a ring (ublk)
//! drives an [`EngineQueue`] on that ring instead. Every queue of a volume shares one
//! [`Engine`]: [`Volume::start`] claims the replicas and opens the first queue, and
//! [`Volume::open_queue`] opens more, one per thread.
//!
//! Starting a volume claims its replicas through their control services: it reads
//! each one's state, picks a generation above all of theirs, and leaves out replicas
//! that are unreachable, of another size, or behind (dirty with an older generation
//! than the newest: they missed the last engine's writes).

use std::io::ErrorKind;
use std::sync::Arc;
use std::time::{Duration, Instant};

use horn_proto::control::InfoReply;
use horn_replica::IoBuf;
use io_uring::types;
use io_uring::IoUring;

use crate::engine::Engine;
use crate::queue::{EngineQueue, Token};
use crate::replica_set::{IoError, IoKind, Mode};

/// Where a replica is served.
#[derive(Debug, Clone)]
pub struct ReplicaAddr {
    /// Data wire address (`hornd replica --listen`).
    pub data: String,
    /// Control service address (`hornd replica --control`).
    pub control: String,
    /// On this node: preferred for reads.
    pub local: bool,
}

impl std::str::FromStr for ReplicaAddr {
    type Err = String;

    /// `DATA,CONTROL` or `DATA,CONTROL,local`.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(',').collect();
        match parts.as_slice() {
            [data, control] | [data, control, "local"] if !data.is_empty() && !control.is_empty() => {
                Ok(ReplicaAddr {
                    data: data.to_string(),
                    control: control.to_string(),
                    local: parts.len() == 3,
                })
            }
            _ => Err(format!("replica {s:?} is not DATA_ADDR,CONTROL_ADDR[,local]")),
        }
    }
}

/// Why the engine failed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// No replica could be used at start.
    #[error("no usable replica: {0}")]
    NoReplica(String),
    /// The replica set failed the I/O.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The request was refused before it was sent.
    #[error("{0}")]
    BadRequest(String),
    /// A control call failed.
    #[error("control call to {replica} failed: {message}")]
    Control {
        /// The replica's control address.
        replica: String,
        /// The gRPC code it answered with.
        code: tonic::Code,
        /// What it said.
        message: String,
    },
    /// The engine's own ring or sockets failed.
    #[error("{op}: {source}")]
    System {
        /// What was being done.
        op: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

/// Result alias for the engine.
pub type Result<T, E = VolumeError> = std::result::Result<T, E>;

/// What starting the volume found.
#[derive(Debug, Clone)]
pub struct StartReport {
    /// Generation this engine claimed the replicas with.
    pub generation: u64,
    /// Volume size in bytes.
    pub size: u64,
    /// Sector size in bytes.
    pub sector_size: u32,
    /// Replicas in use.
    pub used: Vec<String>,
    /// Replicas left out, and why.
    pub skipped: Vec<(String, String)>,
    /// What reconciling the replicas found and copied.
    pub reconciled: crate::recovery::ReconcileReport,
}

/// What [`Volume::verify`] found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Bytes of the volume compared on every replica.
    pub bytes_compared: u64,
    /// The replicas compared (data addresses); differences are against the first.
    pub replicas: Vec<String>,
    /// Runs of blocks that differ, in offset order (at most [`MAX_DIFFERENCES`]).
    pub differences: Vec<crate::recovery::Difference>,
    /// Bytes that differ on some replica, all of them counted.
    pub differing_bytes: u64,
}

/// Differences a verify report lists; the byte count covers the rest.
pub const MAX_DIFFERENCES: usize = 1000;
/// Bytes compared per pause during a verify.
const VERIFY_STEP: u64 = 8 << 20;

/// A chain operation run on every replica of the volume.
#[derive(Debug, Clone)]
pub enum ChainOp {
    /// Read the chain (from one replica).
    Info,
    /// Take a snapshot.
    Snapshot {
        /// Its name.
        name: String,
        /// Its labels.
        labels: std::collections::HashMap<String, String>,
    },
    /// Mark a snapshot deleted.
    Delete(String),
    /// Fold deleted snapshots away.
    Purge,
    /// Put a new head over a snapshot.
    Revert(String),
    /// Grow the volume to this many bytes.
    Expand(u64),
}

/// A finished I/O.
#[derive(Debug)]
pub struct VolumeCompletion {
    /// The caller's tag.
    pub tag: u64,
    /// Outcome.
    pub result: Result<()>,
    /// The caller's buffer (reads: holding the data).
    pub buf: Option<IoBuf>,
}

/// A ring of the engine's own carrying one queue's entries.
/// Submits what is queued on `ring` and waits for one completion, or until
/// `deadline` (an engine queue's next timeout) passes; a timeout or a signal is not
/// an error. For whoever drives an engine queue on a ring of its own.
pub fn submit_and_wait(ring: &IoUring, deadline: Option<Duration>) -> std::io::Result<()> {
    let res = match deadline {
        Some(w) => {
            let ts = types::Timespec::from(w.max(Duration::from_micros(1)));
            let args = types::SubmitArgs::new().timespec(&ts);
            ring.submitter().submit_with_args(1, &args)
        }
        None => ring.submit_and_wait(1),
    };
    match res {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Longest a [`Waiter`] polls its ring before it sleeps in it.
pub const SPIN: Duration = Duration::from_micros(50);

/// A wait that returns within this counts as traffic: the next wait polls first.
const BUSY_GAP: Duration = Duration::from_micros(500);

/// Waits for completions like [`submit_and_wait`], but while they have been coming
/// quickly, first polls the ring for up to [`SPIN`]: a request that arrives meanwhile
/// is picked up without the thread going to sleep and being woken, which on a
/// virtual machine is an interrupt to another CPU and tens of microseconds of a QD1
/// request's latency (iscsi-perf QD1 reads: 1.05 of tgt's IOPS sleeping, 2.5 polling).
/// A quiet ring sleeps at once, and so does a driver whose own I/O is in flight: its
/// completions come from replicas and kernel workers that need the CPU the poll would
/// take. The poll yields the CPU at each turn, to any thread that wants it: a busy
/// pause-and-spin loop took a quarter of the IOPS of 4 KiB random writes at QD32 on
/// 2 CPUs, where the client (qemu-nbd) wanted the CPU.
#[derive(Debug, Default)]
pub struct Waiter {
    busy: bool,
}

impl Waiter {
    /// Submits what is queued and waits for one completion, or until `deadline`;
    /// polls first only if `idle` (nothing of the driver's own in flight: it waits for
    /// its client). The ring must flag pending completion work (`setup_taskrun_flag`,
    /// as [`horn_replica::new_thread_ring`] makes it) for the poll to see it.
    pub fn wait(
        &mut self,
        ring: &mut IoUring,
        deadline: Option<Duration>,
        idle: bool,
    ) -> std::io::Result<()> {
        if self.busy && idle {
            ring.submit()?;
            let start = Instant::now();
            loop {
                if !ring.completion().is_empty() {
                    return Ok(());
                }
                if ring.submission().taskrun() {
                    // Runs the completion work (the submit asks for events when flagged).
                    ring.submit()?;
                    continue;
                }
                if start.elapsed() >= SPIN {
                    break;
                }
                // Polite: a thread waiting for this CPU (a client, a kernel worker
                // doing this driver's file I/O) runs first.
                std::thread::yield_now();
            }
        }
        let start = Instant::now();
        submit_and_wait(ring, deadline)?;
        self.busy = start.elapsed() < BUSY_GAP;
        Ok(())
    }
}

pub(crate) struct QueueRing {
    ring: IoUring,
    /// Enabled by (and so belonging to) the first thread that submits: a queue can be
    /// opened on one thread and run on another.
    enabled: bool,
    /// Reused by the completion loop: (user data, result) pairs.
    reaped: Vec<(u64, i32)>,
}

impl QueueRing {
    pub(crate) fn new() -> Result<QueueRing> {
        let (ring, enabled) = horn_replica::new_thread_ring(256).map_err(sys("io_uring setup"))?;
        Ok(QueueRing {
            ring,
            enabled,
            reaped: Vec::new(),
        })
    }

    /// Pushes the queue's entries on the ring and submits them at once (eager
    /// submission, as in the store: docs/benchmarks.md).
    pub(crate) fn pump(&mut self, queue: &mut EngineQueue) -> Result<()> {
        if !self.enabled {
            self.ring
                .submitter()
                .register_enable_rings()
                .map_err(sys("io_uring enable"))?;
            self.enabled = true;
            horn_replica::widen_io_workers(&self.ring);
        }
        let mut pushed = false;
        for entry in queue.entries() {
            loop {
                // SAFETY: the queue keeps every entry's memory valid until its
                // completion is handed back (queue.rs), and the queue outlives the ring's
                // use of it (close and drop wait for every entry).
                if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                    break;
                }
                self.ring.submit().map_err(sys("io_uring submit"))?;
            }
            pushed = true;
        }
        if pushed {
            self.ring.submit().map_err(sys("io_uring submit"))?;
        }
        Ok(())
    }

    /// Waits for at least one completion (or the queue's next deadline) and hands
    /// what completed back to the queue.
    pub(crate) fn wait(&mut self, queue: &mut EngineQueue) -> Result<()> {
        submit_and_wait(&self.ring, queue.next_deadline()).map_err(sys("io_uring wait"))?;
        // Copied out first: handling a completion pushes entries. The vector is reused.
        let mut done = std::mem::take(&mut self.reaped);
        done.clear();
        done.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(ud, res) in &done {
            queue.complete(Token(ud as u32), res);
        }
        self.reaped = done;
        queue.tick();
        self.pump(queue)
    }

    /// Waits until the kernel is done with every entry of a queue that was shut down.
    pub(crate) fn wait_entries(&mut self, queue: &mut EngineQueue) -> Result<()> {
        // Entries never pushed (a queue that did no I/O) still count as in flight.
        self.pump(queue)?;
        while queue.raw_in_flight() > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(sys("io_uring wait")(e)),
            }
            let done: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (ud, res) in done {
                queue.complete_after_shutdown(Token(ud as u32), res);
            }
        }
        Ok(())
    }
}

/// One queue of a volume, driven on its own ring.
pub struct Volume {
    ring: QueueRing,
    queue: EngineQueue,
    closed: bool,
}

fn sys(op: &'static str) -> impl FnOnce(std::io::Error) -> VolumeError {
    move |source| VolumeError::System { op, source }
}

impl Volume {
    /// Claims the replicas and opens the volume's first queue on this thread.
    pub fn start(replicas: &[ReplicaAddr], timeout: Duration) -> Result<(Volume, StartReport)> {
        let (engine, report) = Engine::start(replicas, timeout)?;
        let v = Volume::open(&engine)?;
        Ok((v, report))
    }

    /// Opens another queue of the same volume (for another thread): its own ring and
    /// its own connection to every replica.
    pub fn open_queue(&self) -> Result<Volume> {
        Volume::open(self.queue.engine())
    }

    /// Opens a queue of `engine` on a new ring. The queue belongs to the first thread
    /// that does I/O on it.
    pub fn open(engine: &Arc<Engine>) -> Result<Volume> {
        Ok(Volume {
            ring: QueueRing::new()?,
            queue: EngineQueue::open(engine)?,
            closed: false,
        })
    }

    /// The engine shared by the volume's queues.
    pub fn engine(&self) -> &Arc<Engine> {
        self.queue.engine()
    }

    /// Volume size in bytes.
    pub fn size(&self) -> u64 {
        self.engine().size()
    }

    /// Sector size in bytes.
    pub fn sector_size(&self) -> u32 {
        self.engine().sector_size()
    }

    /// The generation this engine holds.
    pub fn generation(&self) -> u64 {
        self.engine().generation()
    }

    /// Each replica's name and mode, as all queues together know it.
    pub fn replicas(&self) -> Vec<(String, Mode)> {
        self.engine().replica_modes()
    }

    /// Replicas left out at start, and why.
    pub fn skipped(&self) -> &[(String, String)] {
        self.engine().skipped()
    }

    /// I/Os submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.queue.in_flight()
    }

    /// Submits an I/O. `buf` is the data to write or the buffer to read into (its
    /// length is the I/O's); flushes take none, discard and write-zeroes take `len`.
    pub fn submit(&mut self, kind: IoKind, offset: u64, len: u64, buf: Option<IoBuf>, tag: u64) {
        self.submit_with(kind, offset, len, buf, tag, false);
    }

    /// [`Volume::submit`], with `fua` asking a write to be durable before it completes.
    pub fn submit_with(
        &mut self,
        kind: IoKind,
        offset: u64,
        len: u64,
        buf: Option<IoBuf>,
        tag: u64,
        fua: bool,
    ) {
        self.queue.submit(kind, offset, len, buf, tag, fua);
        if let Err(e) = self.pump() {
            tracing::error!(error = %e, "io_uring submit failed");
        }
    }

    fn pump(&mut self) -> Result<()> {
        self.ring.pump(&mut self.queue)
    }

    /// Submits pending work and moves finished I/Os into `out` until it holds `min` of
    /// them or nothing is in flight. Replicas that stay silent past the timeout are
    /// dropped meanwhile.
    pub fn reap(&mut self, min: usize, out: &mut Vec<VolumeCompletion>) -> Result<usize> {
        let start = out.len();
        loop {
            while let Some(c) = self.queue.pop_completion() {
                out.push(c);
            }
            if out.len() - start >= min || self.queue.pending() == 0 {
                return Ok(out.len() - start);
            }
            self.wait()?;
        }
    }

    fn wait(&mut self) -> Result<()> {
        self.ring.wait(&mut self.queue)
    }

    /// Waits for every I/O in flight; their completions stay queued for `reap`.
    fn drain(&mut self) -> Result<()> {
        while self.queue.pending() > 0 {
            self.wait()?;
        }
        Ok(())
    }

    fn run_one(&mut self, kind: IoKind, offset: u64, len: u64, buf: Option<IoBuf>) -> Result<Option<IoBuf>> {
        const TAG: u64 = u64::MAX;
        // Ordered after every I/O already submitted (a flush covers them all).
        self.drain()?;
        self.submit(kind, offset, len, buf, TAG);
        let mut held = Vec::new();
        loop {
            while let Some(c) = self.queue.pop_completion() {
                if c.tag == TAG {
                    // Others go back to the front for `reap`, in their order.
                    for other in held.into_iter().rev() {
                        self.queue.push_front_completion(other);
                    }
                    return c.result.map(|()| c.buf);
                }
                held.push(c);
            }
            self.wait()?;
        }
    }

    /// Reads `out.len()` bytes at `offset` (blocking).
    pub fn read_at(&mut self, offset: u64, out: &mut [u8]) -> Result<()> {
        let buf = self.run_one(IoKind::Read, offset, 0, Some(IoBuf::zeroed(out.len())))?;
        out.copy_from_slice(buf.expect("reads return their buffer").as_slice());
        Ok(())
    }

    /// Writes `data` at `offset` (blocking).
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.run_one(IoKind::Write, offset, 0, Some(IoBuf::from_slice(data)))
            .map(|_| ())
    }

    /// Makes completed writes durable on every replica (blocking).
    pub fn flush(&mut self) -> Result<()> {
        self.run_one(IoKind::Flush, 0, 0, None).map(|_| ())
    }

    /// Runs a chain operation on every replica still in the set and returns the first
    /// one's view of the chain. Snapshot, revert and expand first pause every queue of
    /// the volume (new I/O is held back), wait for the I/O in flight, and flush; the
    /// queues go on when the operation is done.
    pub fn chain_op(&mut self, op: ChainOp) -> Result<InfoReply> {
        if !matches!(op, ChainOp::Info) && self.engine().is_rebuilding() {
            return Err(VolumeError::BadRequest(
                "a replica is being rebuilt: snapshots, deletes, purges, reverts and expansions wait until it is done"
                    .into(),
            ));
        }
        if !matches!(
            op,
            ChainOp::Snapshot { .. } | ChainOp::Revert(_) | ChainOp::Expand(_)
        ) {
            return self.engine().clone().run_chain_op(&op);
        }
        self.paused(true, |e| e.run_chain_op(&op))
    }

    /// Runs `f` with every queue of the volume paused and nothing in flight, after
    /// flushing every replica if `flush`.
    pub(crate) fn paused<T>(&mut self, flush: bool, f: impl FnOnce(&Engine) -> Result<T>) -> Result<T> {
        let engine = self.engine().clone();
        self.drain()?;
        let guard = engine.pause(self.queue.shared())?;
        // Our own flush must pass the gate we just raised.
        self.queue.set_coordinating(true);
        let flushed = if flush { self.flush() } else { Ok(()) };
        let result = flushed.and_then(|()| f(&engine));
        self.queue.set_coordinating(false);
        engine.resume();
        drop(guard);
        result
    }

    /// Compares every RW replica block by block (XXH3 of each 4 KiB) while the volume
    /// stays online: each 8 MiB step is compared with the volume paused, so no write
    /// lands between one replica's checksums and the next's. `progress` hears bytes
    /// done and the total after each step.
    pub fn verify(&mut self, mut progress: impl FnMut(u64, u64)) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        // Connected once, outside the pauses.
        let mut peers = self.engine().rw_peers()?;
        let mut offset = 0;
        loop {
            let size = self.size();
            if offset >= size {
                break;
            }
            let len = VERIFY_STEP.min(size - offset);
            let (names, diffs) = self.paused(false, |e| e.compare_range(&mut peers, offset, len))?;
            if names.len() < 2 {
                return Err(VolumeError::BadRequest(format!(
                    "verify needs two RW replicas or more; this volume has {}",
                    names.len()
                )));
            }
            report.replicas = names;
            for d in diffs {
                report.differing_bytes += d.len;
                let full = report.differences.len() >= MAX_DIFFERENCES;
                match report.differences.last_mut() {
                    Some(last) if last.offset + last.len == d.offset && last.replicas == d.replicas => {
                        last.len += d.len
                    }
                    _ if !full => report.differences.push(d),
                    _ => {}
                }
            }
            offset += len;
            report.bytes_compared = offset;
            progress(offset, size);
        }
        Ok(report)
    }

    /// Clears the replicas' write-intent records if any region is marked: pauses the
    /// volume, waits for the I/O in flight, and has every replica flush and unmark. Returns
    /// how many regions were marked (on the replica with the most).
    pub fn clean_intents(&mut self) -> Result<u64> {
        let mut peers = self.engine().peers(true)?;
        let marked = self.engine().intents_marked(&mut peers)?;
        if marked > 0 {
            // Each replica flushes itself before it unmarks.
            self.paused(false, |e| e.clear_intents(&mut peers))?;
        }
        Ok(marked)
    }

    /// Adds replica `addr` to the running volume and starts rebuilding it in the
    /// background (see [`crate::rebuild`]); returns once it is in the set, WO, and
    /// the rebuild snapshot is taken. A replica already in the set as WO (a rebuild
    /// an engine restart cut short) is rebuilt where it stands. Follow it with
    /// [`Engine::rebuilds`].
    pub fn add_replica(&mut self, addr: ReplicaAddr) -> Result<()> {
        use horn_proto::control::replica_control_client::ReplicaControlClient;
        use horn_proto::control::{ClaimRequest, InfoRequest, Mode as WireMode, SetModeRequest};

        if let Err(e) = horn_replica::SharedReplica::hosted(&addr.data) {
            return Err(VolumeError::BadRequest(e.to_string()));
        }
        let engine = self.engine().clone();
        if engine.is_rebuilding() {
            return Err(VolumeError::BadRequest(
                "a rebuild is already under way; wait for it to end".into(),
            ));
        }
        // A replica already in the set as WO (its rebuild was cut short, by an engine
        // restart) is rebuilt where it stands.
        let mut resumed = None;
        for (i, r) in engine.replicas().iter().enumerate() {
            if (r.data == addr.data || r.control == addr.control) && !engine.is_failed(i) {
                if r.mode() != Mode::Wo {
                    return Err(VolumeError::BadRequest(format!(
                        "replica {} is already in the volume, RW",
                        addr.data
                    )));
                }
                resumed = Some(i);
            }
        }
        let generation = engine.generation();
        let control = addr.control.clone();
        let err = |s: tonic::Status| VolumeError::Control {
            replica: control.clone(),
            code: s.code(),
            message: s.message().to_string(),
        };
        let info = engine.runtime().block_on(async {
            let mut c = ReplicaControlClient::connect(format!("http://{}", addr.control))
                .await
                .map_err(|e| tonic::Status::unavailable(format!("unreachable: {e}")))?;
            let info = c.info(InfoRequest {}).await?.into_inner();
            if info.size != engine.size() || info.sector_size != engine.sector_size() {
                return Err(tonic::Status::invalid_argument(format!(
                    "it holds {} bytes in {}-byte sectors; the volume has {} in {}-byte sectors",
                    info.size,
                    info.sector_size,
                    engine.size(),
                    engine.sector_size()
                )));
            }
            if info.generation > generation {
                return Err(tonic::Status::failed_precondition(format!(
                    "it belongs to a newer engine (generation {} above this one's {generation})",
                    info.generation
                )));
            }
            if resumed.is_some() {
                return Ok(());
            }
            c.claim(ClaimRequest { generation }).await?;
            c.set_mode(SetModeRequest {
                generation,
                mode: WireMode::Wo as i32,
            })
            .await?;
            Ok(())
        });
        info.map_err(err)?;
        let snapshot = format!(
            "rebuild-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis())
        );
        let joined = self.paused(true, |e| {
            let i = match resumed {
                Some(i) => i,
                None => e.add_replica(crate::engine::ClaimedReplica::new(&addr, Mode::Wo)),
            };
            let labels = [("horn.system".to_string(), "rebuild".to_string())].into();
            match e.run_chain_op(&ChainOp::Snapshot {
                name: snapshot.clone(),
                labels,
            }) {
                Ok(_) => Ok(i),
                Err(err) => {
                    e.mark_failed(i, &format!("the rebuild snapshot failed: {err}"));
                    Err(err)
                }
            }
        })?;
        let status = crate::rebuild::RebuildStatus {
            replica: addr.data.clone(),
            source: String::new(),
            state: crate::rebuild::RebuildState::Syncing,
            done: 0,
            total: 0,
            copied: 0,
            suspects: 0,
            started: std::time::Instant::now(),
            elapsed: None,
        };
        engine.begin_rebuild(status, joined)?;
        let thread_engine = engine.clone();
        let spawned = std::thread::Builder::new()
            .name("rebuild".into())
            .spawn(move || crate::rebuild::run(thread_engine, joined, snapshot));
        if let Err(e) = spawned {
            engine.end_rebuild();
            engine.mark_failed(joined, "the rebuild thread could not start");
            return Err(VolumeError::System {
                op: "starting the rebuild thread",
                source: e,
            });
        }
        Ok(())
    }

    /// Takes snapshot `name` on every replica (see [`Volume::chain_op`]).
    pub fn snapshot(&mut self, name: &str) -> Result<()> {
        self.chain_op(ChainOp::Snapshot {
            name: name.to_string(),
            labels: Default::default(),
        })
        .map(|_| ())
    }

    /// Waits for all I/O and flushes; the last queue of the volume to close also
    /// releases the replicas (marks them clean).
    pub fn close(mut self) -> Result<()> {
        self.flush()?;
        self.closed = true;
        let left = self.queue.shutdown();
        self.wait_entries()?;
        if left == 0 {
            // Every write is flushed everywhere and nothing is in flight.
            let engine = self.engine().clone();
            if let Err(e) = engine.peers(true).and_then(|mut p| engine.clear_intents(&mut p)) {
                tracing::warn!(error = %e, "clearing the write-intent records at close failed");
            }
            self.engine().release();
        }
        Ok(())
    }

    fn wait_entries(&mut self) -> Result<()> {
        self.ring.wait_entries(&mut self.queue)
    }
}

impl Drop for Volume {
    /// A queue dropped without [`Volume::close`] still lets the kernel finish with its
    /// buffers before they go.
    fn drop(&mut self) {
        if !self.closed {
            self.queue.shutdown();
            if let Err(e) = self.wait_entries() {
                tracing::error!(error = %e, "a dropped queue could not wait for its entries");
            }
        }
    }
}
