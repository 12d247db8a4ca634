//! `QueueRing`: an engine queue driven on a ring of the engine's own.
//!
//! A frontend whose thread already runs a ring (a ublk queue, an iSCSI connection)
//! pushes the queue's entries on that ring and hands the completions back itself.
//! Everyone else (the blocking [`crate::volume::Volume`], [`crate::frontend::run_local`],
//! a rebuild's install step) drives the queue on one of these: the queue's entries
//! pushed and submitted at once, completions routed back to it by token, and a wait
//! bounded by the queue's next replica deadline.

use horn_uring::Ring;

use crate::queue::{EngineQueue, Token};
use crate::types::{Result, VolumeError};

/// Submission queue depth of an engine queue's own ring.
const RING_ENTRIES: u32 = 256;

/// A ring carrying one engine queue's entries.
pub(crate) struct QueueRing {
    ring: Ring,
}

fn sys(op: &'static str) -> impl FnOnce(std::io::Error) -> VolumeError {
    move |source| VolumeError::System { op, source }
}

impl QueueRing {
    /// A ring for the thread that first drives it: a queue can be opened on one
    /// thread and run on another.
    pub(crate) fn new() -> Result<QueueRing> {
        Ok(QueueRing {
            ring: Ring::for_thread(RING_ENTRIES).map_err(sys("io_uring setup"))?,
        })
    }

    /// Pushes the queue's entries on the ring and submits them at once (eager
    /// submission, as in the store: docs/benchmarks.md).
    pub(crate) fn pump(&mut self, queue: &mut EngineQueue) -> Result<()> {
        // SAFETY: the queue keeps every entry's memory valid until its completion is
        // handed back (queue.rs), and the queue outlives the ring's use of it (close
        // and drop wait for every entry).
        let pushed = unsafe { self.ring.push_all(queue.entries()) }.map_err(sys("io_uring submit"))?;
        if pushed > 0 {
            self.ring.submit().map_err(sys("io_uring submit"))?;
        }
        Ok(())
    }

    /// Waits for at least one completion (or the queue's next deadline) and hands
    /// what completed back to the queue.
    pub(crate) fn wait(&mut self, queue: &mut EngineQueue) -> Result<()> {
        self.ring
            .wait(queue.next_deadline())
            .map_err(sys("io_uring wait"))?;
        let done = self.ring.reap();
        for c in &done {
            queue.complete(Token(c.token()), c.result);
        }
        self.ring.recycle(done);
        queue.tick();
        self.pump(queue)
    }

    /// Waits until the kernel is done with every entry of a queue that was shut down.
    pub(crate) fn wait_entries(&mut self, queue: &mut EngineQueue) -> Result<()> {
        // Entries never pushed (a queue that did no I/O) still count as in flight.
        self.pump(queue)?;
        while queue.raw_in_flight() > 0 {
            self.ring.wait(None).map_err(sys("io_uring wait"))?;
            let done = self.ring.reap();
            for c in &done {
                queue.complete_after_shutdown(Token(c.token()), c.result);
            }
            self.ring.recycle(done);
        }
        Ok(())
    }
}
