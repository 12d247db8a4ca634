//! `Replica`: an open replica directory. The format (`SnapshotChain`, `chain/`) and
//! the I/O engine (`OpRing`, `io.rs`) composed, with the engine-facing state
//! (`engine.json`) and the write-intent log.
//!
//! Floor: the top of the store. It imports `chain`, `io`, `admission`, `intent` and
//! `state`; neither `chain` nor `io` imports the other or this file, and what one needs
//! of the other passes through here:
//! - the ring's entries name their file by chain position, and an op that lands asks
//!   for its file's path or paints a written op's blocks the head's, through
//!   `Landing`, implemented here for the chain;
//! - the chain never waits for I/O: before a blocking fill path (partial writes over
//!   older data, discard, write-zeroes) or a chain operation, this file settles the
//!   ring: it drains it, and for chain operations first refuses while an in-process
//!   engine has I/O of its own in flight.
//!
//! The data path: [`Replica::submit_read`] and friends submit to the ring and return
//! at once; completions come back, out of order, from [`Replica::reap`]. The blocking
//! `*_at` methods are the same ops, waited for.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use io_uring::{opcode, types};

use crate::admission::{self, Access, Caller, Refusal};
use crate::chain::{
    lock_dir, recover, LayerExtents, PurgeReport, ReadPiece, ReplicaInfo, SnapshotChain, WritePath,
};
use crate::error::{ReplicaError, Result};
use crate::extent::{BlockRun, Extent};
use crate::intent::IntentLog;
use crate::io::{Completion, Landing, OpKind, OpRing, Target, INTERNAL_TAG};
use crate::membership::{self, Lease, Record, Standing};
use crate::meta::{self, layer_path, VolumeMeta, BLOCK_SIZE};
use crate::state::{EngineState, Mode};
use crate::sync_plan::SyncPlan;
use horn_uring::IoBuf;

pub use crate::chain::{CacheMode, MAX_IO_BYTES};

/// An open replica.
pub struct Replica {
    /// The format: metadata, layer files, index.
    pub(crate) chain: SnapshotChain,
    /// The I/O engine.
    ring: OpRing,
    engine: EngineState,
    intent: IntentLog,
    /// I/O an in-process engine has in flight on its own rings ([`crate::shared`]):
    /// the chain must not change under it.
    external_in_flight: usize,
    /// Reused by `submit_read` (and a shared replica's planned reads) so the hot path
    /// does not allocate.
    pub(crate) pieces: Vec<ReadPiece>,
    /// The read lease granted last (in memory: see [`Replica::open`]).
    lease: Option<Lease>,
    /// The replica's clock for leases: milliseconds since it was opened.
    opened: Instant,
    /// The volume's secret, when this replica serves only its volume's current engine
    /// (in memory only: given at each start, never written to the replica's disk).
    secret: Option<horn_proto::auth::VolumeSecret>,
    _lock: File,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("dir", &self.chain.dir())
            .field("size", &self.chain.size())
            .field("chain", &self.chain.meta().chain().len())
            .finish()
    }
}

/// The ring's entries name chain positions, and a landed write's blocks become the
/// head's. Implemented here, on the floor that composes the two, so that neither
/// `io` nor `chain` names the other.
impl Landing for SnapshotChain {
    fn path(&self, file: u32) -> &Path {
        &self.layer(file as usize).path
    }

    fn written(&mut self, blocks: BlockRun) {
        self.paint(blocks);
    }
}

impl Replica {
    /// Creates a replica of `size` bytes in `dir` (created if absent, must be empty).
    pub fn create(dir: impl AsRef<Path>, size: u64, sector_size: u32) -> Result<Replica> {
        SnapshotChain::create(dir.as_ref(), size, sector_size)?;
        Self::open(dir)
    }

    /// Opens an existing replica, finishing or discarding whatever a crash interrupted.
    pub fn open(dir: impl AsRef<Path>) -> Result<Replica> {
        let dir = dir.as_ref().to_path_buf();
        let meta_path = dir.join(meta::META_FILE);
        if !meta_path.exists() {
            // Checked before locking so that a wrong path leaves no lock file behind.
            return Err(ReplicaError::MissingMetadata { path: meta_path });
        }
        let lock = lock_dir(&dir)?;
        let recovered = recover(&dir)?;
        let (size, head) = (recovered.meta.size, recovered.meta.head);
        let mut engine = EngineState::load(&dir)?;
        if engine.id.is_empty() {
            // A new replica, or one from before identities: it gets its identity now.
            engine.id = membership::new_id();
            engine.store(&dir)?;
        }
        // A lease does not survive a restart, but its holder may have renewed it just
        // before, and may still be serving reads: an engine that held the replica open
        // keeps it from other engines' claims for a whole lease from now.
        let lease = (engine.dirty && engine.lease_ms > 0)
            .then(|| engine.engine.clone())
            .flatten()
            .map(|holder| Lease {
                engine: holder,
                until: engine.lease_ms,
            });
        let intent = IntentLog::open(&dir, size)?;
        let ring = OpRing::for_thread(&dir)
            .map_err(|e| ReplicaError::io("io_uring setup", layer_path(&dir, head), e))?;
        Ok(Replica {
            chain: SnapshotChain::load(dir, recovered)?,
            ring,
            engine,
            intent,
            external_in_flight: 0,
            pieces: Vec::new(),
            lease,
            opened: Instant::now(),
            secret: None,
            _lock: lock,
        })
    }

    /// Volume size in bytes.
    pub fn size(&self) -> u64 {
        self.chain.size()
    }

    /// Sector size in bytes.
    pub fn sector_size(&self) -> u32 {
        self.chain.meta().sector_size
    }

    /// The replica directory.
    pub fn dir(&self) -> &Path {
        self.chain.dir()
    }

    /// The metadata as last committed.
    pub fn meta(&self) -> &VolumeMeta {
        self.chain.meta()
    }

    /// The highest replica-set generation this replica has accepted.
    pub fn generation(&self) -> u64 {
        self.engine.generation
    }

    /// Is the replica marked open by an engine (or left so by a crash)?
    pub fn is_dirty(&self) -> bool {
        self.engine.dirty
    }

    /// Records a new replica-set generation, durably, held by no named engine; an
    /// older one is refused. (For tools and tests in this process: over the control
    /// service every claim names its engine.)
    pub fn set_generation(&mut self, generation: u64) -> Result<()> {
        if generation < self.engine.generation {
            return Err(ReplicaError::StaleGeneration {
                current: self.engine.generation,
                given: generation,
            });
        }
        if generation != self.engine.generation {
            self.store_engine(EngineState {
                generation,
                engine: None,
                lease_ms: 0,
                ..self.engine.clone()
            })?;
        }
        Ok(())
    }

    /// The replica's own identity.
    pub fn id(&self) -> &str {
        &self.engine.id
    }

    /// The volume this replica belongs to (`None` while blank).
    pub fn volume(&self) -> Option<&str> {
        self.engine.volume.as_deref()
    }

    /// The identity of the engine holding the claim.
    pub fn holder(&self) -> Option<&str> {
        self.engine.engine.as_deref()
    }

    /// The newest membership record an engine gave this replica.
    pub fn record(&self) -> Option<&Record> {
        self.engine.record.as_ref()
    }

    /// The replica's clock for leases, in milliseconds.
    fn now_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    /// The replica's side of membership, with the lease it granted.
    fn standing(&self) -> Standing {
        Standing {
            lease: self.lease.clone(),
            ..self.engine.standing()
        }
    }

    /// An engine claims the replica, durably ([`membership::check_claim`]), and is
    /// granted a read lease of `lease_ms` (none for 0). Refused while another engine's
    /// lease runs. A blank replica stays blank: it joins a volume with the first record
    /// committed on it.
    pub fn claim(
        &mut self,
        generation: u64,
        engine: &str,
        volume: Option<&str>,
        lease_ms: u64,
    ) -> Result<()> {
        check_lease_length(lease_ms)?;
        let now = self.now_ms();
        membership::check_claim(&self.standing(), now, generation, engine, volume)?;
        let next = EngineState {
            generation,
            engine: Some(engine.to_string()),
            lease_ms,
            ..self.engine.clone()
        };
        if next != self.engine {
            self.store_engine(next)?;
        }
        self.grant(engine, lease_ms, now);
        Ok(())
    }

    /// The engine holding the claim renews its read lease for `lease_ms` from now (0
    /// gives it up). The caller has checked that `engine` holds the claim.
    pub fn renew_lease(&mut self, engine: &str, lease_ms: u64) -> Result<()> {
        check_lease_length(lease_ms)?;
        let now = self.now_ms();
        self.grant(engine, lease_ms, now);
        Ok(())
    }

    fn grant(&mut self, engine: &str, lease_ms: u64, now: u64) {
        self.lease = (lease_ms > 0).then(|| Lease {
            engine: engine.to_string(),
            until: now + lease_ms,
        });
    }

    /// Gives the replica its volume's secret (`None`: serve any peer).
    pub fn set_secret(&mut self, secret: Option<horn_proto::auth::VolumeSecret>) {
        self.secret = secret;
    }

    /// The volume's secret, if the replica was given one: then its data wire and its
    /// control service serve only a peer that proves it holds the key of a generation
    /// not behind the replica's ([`horn_proto::auth`]).
    pub fn secret(&self) -> Option<&horn_proto::auth::VolumeSecret> {
        self.secret.as_ref()
    }

    /// Checks a control call's proof (`header`, naming `engine`) and that its
    /// generation is not behind the replica's, and returns that generation; open
    /// replicas take every call (`None`).
    pub fn authenticate(&self, header: Option<&str>, engine: &str) -> Result<Option<u64>> {
        let Some(secret) = &self.secret else {
            return Ok(None);
        };
        let generation = horn_proto::auth::check_control(secret, header, engine)
            .map_err(|e| ReplicaError::Unauthenticated(e.to_string()))?;
        if generation < self.generation() {
            return Err(ReplicaError::Unauthenticated(format!(
                "the call proves generation {generation}, and this replica has moved on to {}: that key no longer works here",
                self.generation()
            )));
        }
        Ok(Some(generation))
    }

    /// The engine holding a read lease that still runs, and the milliseconds it has left.
    pub fn lease(&self) -> Option<(&str, u64)> {
        let now = self.now_ms();
        self.lease
            .as_ref()
            .filter(|l| l.until > now)
            .map(|l| (l.engine.as_str(), l.until - now))
    }

    /// Stores a membership record from the engine holding the claim, durably
    /// ([`membership::check_record`]).
    pub fn record_membership(&mut self, record: Record) -> Result<()> {
        membership::check_record(&self.engine.standing(), &record)?;
        self.store_engine(EngineState {
            volume: Some(record.volume.clone()),
            record: Some(record),
            ..self.engine.clone()
        })
    }

    /// Makes this replica the only RW member of its volume, with a record newer than
    /// `above` (an operator's salvage: every other replica is rebuilt from this one).
    /// Refused for a blank replica.
    pub fn salvage(&mut self, above: (u64, u64), name: &str) -> Result<Record> {
        let Some(volume) = self.engine.volume.clone() else {
            return Err(ReplicaError::Refused(
                "this replica is blank: it holds no volume's data to salvage".into(),
            ));
        };

        let generation = above
            .0
            .max(self.engine.generation)
            .checked_add(1)
            .filter(|g| *g <= membership::MAX_GENERATION)
            .ok_or_else(|| ReplicaError::Refused("the generation is at its maximum".into()))?;
        let engine = format!("salvage-{}", membership::new_id());
        let record = Record {
            volume,
            generation,
            version: 0,
            engine: engine.clone(),
            rw: [(self.engine.id.clone(), name.to_string())].into(),
            wo: Default::default(),
            after: Vec::new(),
            // The operator's own decision, outside any manager.
            authority: String::new(),
            // Still encrypted with the same key: its data is ciphertext.
            cipher: self
                .engine
                .record
                .as_ref()
                .map(|r| r.cipher.clone())
                .unwrap_or_default(),
        };
        self.store_engine(EngineState {
            generation,
            engine: Some(engine),
            record: Some(record.clone()),
            lease_ms: 0,
            ..self.engine.clone()
        })?;
        Ok(record)
    }

    /// Read-write, or write-only while being rebuilt.
    pub fn mode(&self) -> Mode {
        self.engine.mode
    }

    /// Sets the mode, durably.
    pub fn set_mode(&mut self, mode: Mode) -> Result<()> {
        if mode != self.engine.mode {
            self.store_engine(EngineState {
                mode,
                ..self.engine.clone()
            })?;
        }
        Ok(())
    }

    /// Marks the replica as held open by an engine (`true`) or closed in order (`false`),
    /// durably. Marking it clean flushes first.
    pub fn set_dirty(&mut self, dirty: bool) -> Result<()> {
        if !dirty {
            self.flush()?;
        }
        if dirty != self.engine.dirty {
            self.store_engine(EngineState {
                dirty,
                ..self.engine.clone()
            })?;
        }
        Ok(())
    }

    /// Makes `next` the engine state, durably.
    fn store_engine(&mut self, next: EngineState) -> Result<()> {
        next.store(self.chain.dir())?;
        self.engine = next;
        Ok(())
    }

    /// Admits a data request from `caller`, an engine holding `generation`, as both doors do
    /// (the data wire and an in-process engine; see [`crate::admission`]): the
    /// generation fence and the mode rule, then the store's range check, and for a
    /// change its write-intent mark, durably, before any of its data may reach the disk.
    pub(crate) fn admit(
        &mut self,
        generation: u64,
        caller: Caller<'_>,
        access: Access,
    ) -> std::result::Result<(), Refusal> {
        let holder = admission::Holder {
            generation: self.engine.generation,
            engine: self.engine.engine.as_deref(),
            mode: self.engine.mode,
        };
        admission::fence(holder, caller, generation, access)?;
        match access {
            Access::Read { offset, len } => self.chain.check_io(offset, len)?,
            Access::Change { offset, len } => {
                self.chain.check_io(offset, len)?;
                self.intent.mark(offset, len)?;
            }
            Access::Ping | Access::Flush | Access::Control => {}
        }
        Ok(())
    }

    /// Marks the write-intent regions a write, discard or write-zeroes of
    /// `[offset, offset + len)` touches, durably, before it starts (see [`crate::intent`]).
    pub fn mark_intent(&mut self, offset: u64, len: u64) -> Result<()> {
        self.intent.mark(offset, len)
    }

    /// Unmarks every write-intent region: the engine has flushed every replica with no
    /// write in flight. Flushes this replica first, so the claim holds here too.
    pub fn clear_intents(&mut self) -> Result<()> {
        self.flush()?;
        self.intent.clear()
    }

    /// The marked write-intent regions (indices; each covers [`crate::intent::REGION_SIZE`] bytes).
    pub fn intent_regions(&self) -> Vec<u64> {
        self.intent.marked_regions()
    }

    /// How many write-intent regions are marked.
    pub fn intents_marked(&self) -> u64 {
        self.intent.marked()
    }

    /// Heap bytes held by the extent index.
    pub fn index_bytes(&self) -> usize {
        self.chain.index_bytes()
    }

    /// How the replica's I/O meets the page cache.
    pub fn cache_mode(&self) -> CacheMode {
        self.chain.cache_mode()
    }

    /// Chooses whether aligned I/O bypasses the page cache (see [`CacheMode`]). Waits
    /// for the I/O in flight; in page mode, closes the O_DIRECT descriptors open so far.
    pub fn set_cache_mode(&mut self, mode: CacheMode) -> Result<()> {
        self.quiesce()?;
        self.chain.set_cache_mode(mode);
        Ok(())
    }

    /// I/Os submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.ring.in_flight()
    }

    /// Waits for all I/O, makes it durable and closes the replica.
    pub fn close(mut self) -> Result<()> {
        self.flush()
    }

    // The data path.

    /// Submits a read of `buf.len()` bytes at `offset`; the completion hands `buf` back.
    pub fn submit_read(&mut self, offset: u64, buf: IoBuf, tag: u64) {
        let len = buf.len() as u64;
        if let Err(e) = self.chain.check_io(offset, len) {
            return self.ring.complete_now(tag, Err(e), Some(buf));
        }
        let op = self.ring.start(tag, OpKind::Read, Some(buf), None);
        let base = self.ring.buf_ptr(op);
        let mut pieces = std::mem::take(&mut self.pieces);
        pieces.clear();
        self.chain.segments(offset, len, |p| pieces.push(p));
        for p in &pieces {
            // SAFETY: buf_offset + len <= buf.len(), from `segments`.
            let ptr = unsafe { base.add(p.buf_offset) };
            let Some(pos) = p.layer else {
                // SAFETY: as above; the bytes belong to the op's buffer.
                unsafe { std::ptr::write_bytes(ptr, 0, p.len) };
                continue;
            };
            let fd = match self.chain.fd_for(pos, p.volume_offset, p.len, ptr) {
                Ok(fd) => fd,
                Err(e) => {
                    self.ring.fail(op, e);
                    break;
                }
            };
            let entry = opcode::Read::new(types::Fd(fd), ptr, p.len as u32)
                .offset(p.volume_offset)
                .build();
            let target = Target {
                file: pos as u32,
                expected: p.len as u32,
            };
            // SAFETY: the memory is the op's buffer, which the ring holds until the
            // op's last entry is reaped; the descriptor is the layer's, which the chain
            // keeps open until it changes, and a chain change drains the ring first.
            if !unsafe { self.ring.push(op, entry, target) } {
                break;
            }
        }
        self.pieces = pieces;
        self.ring.seal(op, &mut self.chain);
    }

    /// Checks a write of `data` at `offset` and does what must come before its data
    /// reaches the head: notes suspect blocks while WO, and writes whole blocks itself
    /// (blocking, with the ring drained) where a partial block must merge with an
    /// older layer. Returns the blocks the caller's write to the head then covers, or
    /// `None` when nothing is left to write.
    pub(crate) fn prepare_write(&mut self, offset: u64, data: &[u8]) -> Result<Option<BlockRun>> {
        let mode = self.engine.mode;
        match self.chain.write_path(offset, data.len() as u64, mode)? {
            WritePath::Empty => Ok(None),
            WritePath::Head(blocks) => Ok(Some(blocks)),
            WritePath::Fill => {
                self.drain()?;
                self.chain.write_filling_blocks(offset, data, mode)?;
                Ok(None)
            }
        }
    }

    /// Submits a write of `buf` at `offset` to the head; the completion hands `buf` back.
    pub fn submit_write(&mut self, offset: u64, buf: IoBuf, tag: u64) {
        let len = buf.len();
        let blocks = match self.prepare_write(offset, buf.as_slice()) {
            Err(e) => return self.ring.complete_now(tag, Err(e), Some(buf)),
            Ok(None) => return self.ring.complete_now(tag, Ok(()), Some(buf)),
            Ok(Some(blocks)) => blocks,
        };
        let op = self.ring.start(tag, OpKind::Write, Some(buf), Some(blocks));
        let ptr = self.ring.buf_ptr(op);
        let head = self.chain.head_position();
        match self.chain.fd_for(head, offset, len, ptr) {
            Err(e) => self.ring.fail(op, e),
            Ok(fd) => {
                let entry = opcode::Write::new(types::Fd(fd), ptr, len as u32)
                    .offset(offset)
                    .build();
                let target = Target {
                    file: head as u32,
                    expected: len as u32,
                };
                // SAFETY: as for a read: the op's buffer, the head's descriptor.
                unsafe { self.ring.push(op, entry, target) };
            }
        }
        self.ring.seal(op, &mut self.chain);
    }

    /// Submits a flush: every write completed before it is durable when it completes.
    pub fn submit_flush(&mut self, tag: u64) {
        let op = self.ring.start(tag, OpKind::Flush, None, None);
        match self.chain.head().buffered() {
            Err(e) => self.ring.fail(op, e),
            Ok(f) => {
                let entry = opcode::Fsync::new(types::Fd(std::os::fd::AsRawFd::as_raw_fd(f)))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build();
                let target = Target {
                    file: self.chain.head_position() as u32,
                    expected: 0,
                };
                // SAFETY: the entry names no memory; the head's descriptor stays open
                // until the chain changes, which drains the ring first.
                unsafe { self.ring.push(op, entry, target) };
            }
        }
        self.ring.seal(op, &mut self.chain);
    }

    /// Queues an entry the caller built (a socket accept, receive or send of a server
    /// that shares this ring, so socket and disk I/O need no thread hop) and submits it.
    /// Its completion comes back from [`Replica::reap`] with `tag` and the kernel's
    /// result in [`Completion::raw`]; the store interprets nothing.
    ///
    /// # Safety
    /// Every buffer and descriptor the entry names must stay valid, and not be moved
    /// or freed, until its completion has been reaped. Its user data is overwritten.
    pub unsafe fn submit_raw(&mut self, entry: io_uring::squeue::Entry, tag: u64) -> Result<()> {
        // SAFETY: the caller's promise.
        unsafe { self.ring.submit_raw(entry, tag) }
    }

    /// Submits queued entries and moves completions into `out` until it holds at least
    /// `min` of them or nothing is left in flight. Returns how many were added.
    pub fn reap(&mut self, min: usize, out: &mut Vec<Completion>) -> Result<usize> {
        self.ring.reap(min, out, &mut self.chain)
    }

    /// Passes queued submission entries to the kernel, if there are any (an empty
    /// `submit` would still cost a system call).
    pub fn submit_queued(&mut self) -> Result<()> {
        self.ring.submit_queued()
    }

    /// Waits for every store I/O in flight (not raw entries: an idle socket receive may
    /// never complete); their completions stay queued for `reap`.
    fn drain(&mut self) -> Result<()> {
        self.ring.drain(&mut self.chain)
    }

    /// Waits for the I/O on the replica's own ring; refuses while an in-process
    /// engine has I/O of its own in flight, whose buffers and layer positions a chain
    /// change would pull out from under it (the engine pauses its queues first).
    fn quiesce(&mut self) -> Result<()> {
        if self.external_in_flight > 0 {
            return Err(ReplicaError::InvalidOperation(format!(
                "{} I/Os of the in-process engine are in flight: pause the volume before changing the chain",
                self.external_in_flight
            )));
        }
        self.drain()
    }

    /// Gives the replica a ring any thread may submit to (one at a time), for a
    /// replica shared under a lock ([`crate::shared`]).
    pub(crate) fn make_ring_shareable(&mut self) -> Result<()> {
        self.ring.make_shareable(&mut self.chain)
    }

    /// An in-process engine planned I/O of its own ([`crate::shared`]): the chain
    /// must not change until it is finished.
    pub(crate) fn external_io_started(&mut self) {
        self.external_in_flight += 1;
    }

    /// An in-process engine's planned I/O is finished.
    pub(crate) fn external_io_finished(&mut self) {
        debug_assert!(
            self.external_in_flight > 0,
            "an in-process I/O finished that was never planned"
        );
        self.external_in_flight -= 1;
    }

    /// Reads `out.len()` bytes at `offset` (blocking).
    pub fn read_at(&mut self, offset: u64, out: &mut [u8]) -> Result<()> {
        self.drain()?;
        let buf = IoBuf::zeroed(out.len());
        self.submit_read(offset, buf, INTERNAL_TAG);
        let c = self.ring.take_internal(&mut self.chain)?;
        c.result?;
        out.copy_from_slice(c.buf.expect("reads return their buffer").as_slice());
        Ok(())
    }

    /// Writes `data` at `offset` (blocking; durable only after [`Replica::flush`]).
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.drain()?;
        self.submit_write(offset, IoBuf::from_slice(data), INTERNAL_TAG);
        self.ring.take_internal(&mut self.chain)?.result
    }

    /// Makes every completed write durable (blocking).
    pub fn flush(&mut self) -> Result<()> {
        self.drain()?;
        self.submit_flush(INTERNAL_TAG);
        self.ring.take_internal(&mut self.chain)?.result
    }

    /// Makes `offset .. offset + len` read as zeros and releases the head's space there.
    /// Durable once the call returns only for the parts recorded in the zero log; flush
    /// for the rest, as for writes.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.chain.check_io(offset, len)?;
        self.drain()?;
        self.chain.discard(offset, len, self.engine.mode)
    }

    /// Makes the range read as zeros. The store never needs to allocate for zeros, so
    /// this is the same operation as [`Replica::discard`].
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.discard(offset, len)
    }

    /// A checksum (XXH3-64) of each 4 KiB block of `[offset, offset + len)` as the
    /// volume reads now; both must be multiples of 4 KiB. Holes hash like zeros.
    pub fn block_checksums(&mut self, offset: u64, len: u64) -> Result<Vec<u64>> {
        self.chain.check_blocks(offset, len)?;
        const STEP: u64 = 1 << 20;
        let mut sums = Vec::with_capacity((len / BLOCK_SIZE) as usize);
        let mut buf = vec![0u8; STEP.min(len) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = STEP.min(offset + len - at) as usize;
            self.read_at(at, &mut buf[..n])?;
            sums.extend(
                buf[..n]
                    .chunks(BLOCK_SIZE as usize)
                    .map(xxhash_rust::xxh3::xxh3_64),
            );
            at += n as u64;
        }
        Ok(sums)
    }

    // The chain operations: each checks what it can first, then settles the ring.

    /// Takes a snapshot: the head becomes read-only layer `name` and a new empty head
    /// goes on top. Returns the new snapshot's id.
    pub fn snapshot(&mut self, name: &str, labels: &BTreeMap<String, String>) -> Result<u64> {
        self.chain.check_snapshot(name, labels)?;
        // The frozen layer must hold everything acknowledged so far, durably.
        self.quiesce()?;
        self.flush()?;
        self.chain.snapshot(name, labels)
    }

    /// Marks snapshot `name` removed. Its data stays, and reads are unchanged, until
    /// [`Replica::purge`] folds it away.
    pub fn delete_snapshot(&mut self, name: &str) -> Result<()> {
        self.chain.delete_snapshot(name)
    }

    /// Folds every removed snapshot away: a removed snapshot with one child is merged
    /// into that child (the child's data wins), one with no child is dropped, one with
    /// several children (after a revert) is kept until all but one are gone.
    pub fn purge(&mut self) -> Result<PurgeReport> {
        self.quiesce()?;
        self.chain.purge()
    }

    /// Drops the head and puts a new empty head over snapshot `name`. Snapshots newer
    /// than `name` are kept (they form a branch no longer read through).
    pub fn revert(&mut self, name: &str) -> Result<()> {
        let target = self.chain.revert_target(name)?;
        self.quiesce()?;
        self.chain.revert(target)
    }

    /// Grows the volume to `new_size` bytes; the new range reads as zeros.
    pub fn expand(&mut self, new_size: u64) -> Result<()> {
        self.chain.check_expand(new_size)?;
        if new_size == self.size() {
            return Ok(());
        }
        self.quiesce()?;
        self.chain.expand(new_size)?;
        self.intent.resize(new_size)
    }

    /// The file and length of snapshot layer `id`, for a rebuild to read. The head is
    /// refused: it changes under I/O.
    pub fn snapshot_layer(&self, id: u64) -> Result<(PathBuf, u64)> {
        let size = self.chain.snapshot_layer_size(id)?;
        Ok((layer_path(self.dir(), id), size))
    }

    /// Puts the layers a rebuild synced (`plan`, their files written) under the head,
    /// drops the layers the plan leaves out, and returns the suspect blocks (see
    /// [`crate::sync`]) for the engine to copy whole. The engine has paused its I/O.
    pub fn install_synced(&mut self, plan: &SyncPlan) -> Result<Vec<u64>> {
        self.quiesce()?;
        self.chain.install(plan)
    }

    /// Size, chain and space used.
    pub fn info(&self) -> Result<ReplicaInfo> {
        self.chain.info()
    }

    /// One layer's own data and zero extents (`None`: the head).
    pub fn layer_extents(&mut self, name: Option<&str>) -> Result<LayerExtents> {
        let id = self.chain.layer_id(name)?;
        if id == self.meta().head {
            self.drain()?;
        }
        self.chain.layer_extents(id)
    }

    /// The ranges that may differ between snapshot `from` and layer `to` (a snapshot
    /// name, or `None` for the head): the union of the extents of every layer above
    /// `from` up to `to`. With `from = None`, every allocated range of `to`'s chain.
    pub fn changed_extents(&mut self, from: Option<&str>, to: Option<&str>) -> Result<Vec<Extent>> {
        let layers = self.chain.changed_layers(from, to)?;
        if layers.contains(&self.meta().head) {
            self.drain()?;
        }
        self.chain.ownership(&layers)
    }

    /// Every allocated range of the chain ending at `of` (`None`: the head).
    pub fn allocated_extents(&mut self, of: Option<&str>) -> Result<Vec<Extent>> {
        self.changed_extents(None, of)
    }
}

/// A lease no longer than [`membership::MAX_LEASE_MS`].
fn check_lease_length(lease_ms: u64) -> Result<()> {
    if lease_ms > membership::MAX_LEASE_MS {
        return Err(ReplicaError::InvalidOperation(format!(
            "a read lease of {lease_ms} ms is longer than the {} ms a replica grants",
            membership::MAX_LEASE_MS
        )));
    }
    Ok(())
}
