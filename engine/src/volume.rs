//! `Volume`: one queue of a volume on a ring of its own, with blocking helpers and
//! the operations that pause the whole volume (chain operations, verify, clearing
//! the write-intent records).
//!
//! The queue's work (replica connections, the replica set, buffers) is an
//! [`EngineQueue`], driven here on a [`QueueRing`]. A frontend whose queues already
//! run a ring (ublk, iSCSI) drives an [`EngineQueue`] on that ring instead. Every
//! queue of a volume shares one [`Engine`]: [`Volume::start`] starts it
//! ([`crate::start`]: claims and reconciles the replicas) and opens the first queue,
//! and [`Volume::open_queue`] opens more, one per thread. Adding a replica to a
//! running volume is [`crate::rebuild::add_replica`].

use std::sync::Arc;
use std::time::Duration;

use horn_proto::control::InfoReply;
use horn_uring::IoBuf;

use crate::engine::Engine;
use crate::queue::EngineQueue;
use crate::recovery;
use crate::replica_set::{IoKind, Mode};
use crate::ring::QueueRing;
use crate::types::{
    ChainOp, ReplicaAddr, Result, StartReport, VerifyReport, VolumeCompletion, VolumeError, MAX_DIFFERENCES,
};

/// Bytes compared per pause during a verify.
const VERIFY_STEP: u64 = 8 << 20;

/// One queue of a volume, driven on its own ring.
pub struct Volume {
    ring: QueueRing,
    queue: EngineQueue,
    closed: bool,
}

impl Volume {
    /// Claims the replicas and opens the volume's first queue on this thread.
    pub fn start(replicas: &[ReplicaAddr], timeout: Duration) -> Result<(Volume, StartReport)> {
        Volume::start_pinned(replicas, timeout, None)
    }

    /// [`Volume::start`], refused unless the replicas hold volume `pin` when it is
    /// given ([`crate::start::start_pinned`]).
    pub fn start_pinned(
        replicas: &[ReplicaAddr],
        timeout: Duration,
        pin: Option<&str>,
    ) -> Result<(Volume, StartReport)> {
        Volume::start_with(
            replicas,
            timeout,
            crate::start::StartOptions {
                pin: pin.map(str::to_string),
                ..Default::default()
            },
        )
    }

    /// [`Volume::start`] with `options` ([`crate::start::start_with`]).
    pub fn start_with(
        replicas: &[ReplicaAddr],
        timeout: Duration,
        options: crate::start::StartOptions,
    ) -> Result<(Volume, StartReport)> {
        let (engine, report) = crate::start::start_with(replicas, timeout, options)?;
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

    /// Opens a queue of `engine` that moves the replicas' bytes as they are, never
    /// encrypting or decrypting ([`EngineQueue::set_raw`]): a restore's queue.
    pub fn open_raw(engine: &Arc<Engine>) -> Result<Volume> {
        let mut v = Volume::open(engine)?;
        v.queue.set_raw();
        Ok(v)
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
        let mut peers = recovery::peers(self.engine(), false)?;
        let mut offset = 0;
        loop {
            let size = self.size();
            if offset >= size {
                break;
            }
            let len = VERIFY_STEP.min(size - offset);
            let (names, diffs) =
                self.paused(false, |e| recovery::compare_range(e, &mut peers, offset, len))?;
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
        let mut peers = recovery::peers(self.engine(), true)?;
        let marked = recovery::intents_marked(self.engine(), &mut peers)?;
        if marked > 0 {
            // Each replica flushes itself before it unmarks.
            self.paused(false, |e| recovery::clear_intents(e, &mut peers))?;
        }
        Ok(marked)
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
            if let Err(e) =
                recovery::peers(&engine, true).and_then(|mut p| recovery::clear_intents(&engine, &mut p))
            {
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
