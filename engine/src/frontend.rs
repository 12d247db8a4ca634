//! The interface frontends serve: one narrow async trait, [`BlockVolume`].
//!
//! A frontend (ublk, iSCSI) turns its protocol's commands into calls on a
//! [`BlockVolume`] and answers when the future resolves. Buffers are owned and handed
//! back with the result, as io_uring needs: the engine sends a write straight from the
//! buffer and receives a read straight into it, so the caller cannot touch it meanwhile.
//!
//! [`QueueVolume`] implements it on one [`EngineQueue`]. Its futures run on the queue's
//! thread (they are not `Send`); whoever drives the queue's ring calls
//! [`QueueVolume::dispatch`] after handing completions back, which wakes the futures
//! whose I/O finished. [`run_local`] is such a driver on a ring of the engine's own; a
//! ublk queue drives the same queue on the ring that carries its block commands.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use horn_uring::IoBuf;

use crate::engine::Engine;
use crate::queue::EngineQueue;
use crate::replica_set::IoKind;
use crate::ring::QueueRing;
use crate::types::{Result, VolumeCompletion, VolumeError};

/// An I/O's outcome and its buffer, handed back whether it succeeded or not.
pub type BufResult = (Result<()>, IoBuf);

/// A block volume as a frontend sees it.
pub trait BlockVolume {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Logical block size in bytes; offsets and lengths are multiples of it.
    fn block_size(&self) -> u32;
    /// Reads `buf.len()` bytes at `offset` into `buf`.
    fn read(&self, offset: u64, buf: IoBuf) -> impl Future<Output = BufResult>;
    /// Writes `buf` at `offset`; with `fua`, durable before it completes.
    fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> impl Future<Output = BufResult>;
    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = Result<()>>;
    /// Deallocates a range (reads of it return zeros).
    fn discard(&self, offset: u64, len: u64) -> impl Future<Output = Result<()>>;
    /// Zeroes a range.
    fn write_zeroes(&self, offset: u64, len: u64) -> impl Future<Output = Result<()>>;
}

struct Shared {
    queue: EngineQueue,
    next_tag: u64,
    done: HashMap<u64, VolumeCompletion>,
    wakers: HashMap<u64, Waker>,
    /// I/Os whose futures were dropped in flight: their completions are dropped.
    abandoned: HashSet<u64>,
}

impl Shared {
    /// Moves finished I/Os to `done` and wakes their futures.
    fn dispatch(&mut self) {
        while let Some(c) = self.queue.pop_completion() {
            if self.abandoned.remove(&c.tag) {
                continue;
            }
            if let Some(w) = self.wakers.remove(&c.tag) {
                w.wake();
            }
            self.done.insert(c.tag, c);
        }
    }
}

/// A [`BlockVolume`] on one queue of the engine, for the queue's own thread.
#[derive(Clone)]
pub struct QueueVolume {
    shared: Rc<RefCell<Shared>>,
}

impl QueueVolume {
    /// Serves `queue` to futures on this thread.
    pub fn new(queue: EngineQueue) -> QueueVolume {
        QueueVolume {
            shared: Rc::new(RefCell::new(Shared {
                queue,
                next_tag: 0,
                done: HashMap::new(),
                wakers: HashMap::new(),
                abandoned: HashSet::new(),
            })),
        }
    }

    /// Runs `f` on the queue (for its driver: entries, completions, ticks).
    pub fn with_queue<T>(&self, f: impl FnOnce(&mut EngineQueue) -> T) -> T {
        f(&mut self.shared.borrow_mut().queue)
    }

    /// Wakes the futures whose I/O has finished. The driver calls it after handing the
    /// queue its completions.
    pub fn dispatch(&self) {
        self.shared.borrow_mut().dispatch();
    }

    /// I/Os submitted and not finished.
    pub fn pending(&self) -> usize {
        self.shared.borrow().queue.pending()
    }

    fn io(&self, kind: IoKind, offset: u64, len: u64, buf: Option<IoBuf>, fua: bool) -> IoFuture {
        IoFuture {
            shared: self.shared.clone(),
            state: State::Ready {
                kind,
                offset,
                len,
                buf,
                fua,
            },
        }
    }
}

enum State {
    Ready {
        kind: IoKind,
        offset: u64,
        len: u64,
        buf: Option<IoBuf>,
        fua: bool,
    },
    Submitted(u64),
    Done,
}

/// One I/O in flight on a [`QueueVolume`]: submitted at its first poll.
pub struct IoFuture {
    shared: Rc<RefCell<Shared>>,
    state: State,
}

impl Future for IoFuture {
    type Output = (Result<()>, Option<IoBuf>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let mut s = this.shared.borrow_mut();
        match std::mem::replace(&mut this.state, State::Done) {
            State::Ready {
                kind,
                offset,
                len,
                buf,
                fua,
            } => {
                let tag = s.next_tag;
                s.next_tag += 1;
                s.queue.submit(kind, offset, len, buf, tag, fua);
                // Refused at once (bad range): the completion is already there. Others
                // that finished meanwhile are handed on with a wake-up, as by the driver.
                s.dispatch();
                this.state = State::Submitted(tag);
                if let Some(c) = s.done.remove(&tag) {
                    this.state = State::Done;
                    return Poll::Ready((c.result, c.buf));
                }
                s.wakers.insert(tag, cx.waker().clone());
                Poll::Pending
            }
            State::Submitted(tag) => match s.done.remove(&tag) {
                Some(c) => Poll::Ready((c.result, c.buf)),
                None => {
                    this.state = State::Submitted(tag);
                    s.wakers.insert(tag, cx.waker().clone());
                    Poll::Pending
                }
            },
            State::Done => panic!("an I/O future was polled after it completed"),
        }
    }
}

impl Drop for IoFuture {
    fn drop(&mut self) {
        // A future dropped in flight: its completion is dropped when it arrives. The
        // buffer stays with the queue until the kernel is done with it.
        if let State::Submitted(tag) = self.state {
            if let Ok(mut s) = self.shared.try_borrow_mut() {
                s.wakers.remove(&tag);
                if s.done.remove(&tag).is_none() {
                    s.abandoned.insert(tag);
                }
            }
        }
    }
}

fn with_buf(out: (Result<()>, Option<IoBuf>)) -> BufResult {
    let (result, buf) = out;
    (result, buf.expect("reads and writes hand their buffer back"))
}

impl BlockVolume for QueueVolume {
    fn size(&self) -> u64 {
        self.shared.borrow().queue.engine().size()
    }

    fn block_size(&self) -> u32 {
        self.shared.borrow().queue.engine().sector_size()
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> BufResult {
        with_buf(self.io(IoKind::Read, offset, 0, Some(buf), false).await)
    }

    async fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> BufResult {
        with_buf(self.io(IoKind::Write, offset, 0, Some(buf), fua).await)
    }

    async fn flush(&self) -> Result<()> {
        self.io(IoKind::Flush, 0, 0, None, false).await.0
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.io(IoKind::Discard, offset, len, None, false).await.0
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.io(IoKind::WriteZeroes, offset, len, None, false).await.0
    }
}

/// Opens a queue of `engine` on a ring of its own on this thread and runs `body` with
/// it as a [`BlockVolume`] until the future returned resolves. The queue is closed
/// afterwards (the replicas stay claimed by the engine).
pub fn run_local<T, F, Fut>(engine: &Arc<Engine>, body: F) -> Result<T>
where
    F: FnOnce(QueueVolume) -> Fut,
    Fut: Future<Output = T>,
{
    let mut ring = QueueRing::new()?;
    let volume = QueueVolume::new(EngineQueue::open(engine)?);
    volume.with_queue(|q| ring.pump(q))?;
    let mut fut = std::pin::pin!(body(volume.clone()));
    // Every wake-up comes from this thread's own ring, so the loop re-polls after each
    // batch of completions and needs no waker of its own.
    let mut cx = Context::from_waker(Waker::noop());
    let out = loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            break out;
        }
        volume.with_queue(|q| ring.pump(q))?;
        if volume.pending() == 0 {
            // Pending on nothing of ours: a future waiting on something else entirely.
            return Err(VolumeError::BadRequest(
                "the frontend's future waits on something other than the volume".into(),
            ));
        }
        volume.with_queue(|q| ring.wait(q))?;
        volume.dispatch();
    };
    // I/O whose futures were dropped still owns buffers the kernel may use.
    while volume.pending() > 0 {
        volume.with_queue(|q| ring.wait(q))?;
        volume.dispatch();
    }
    volume.with_queue(|q| {
        q.shutdown();
        ring.wait_entries(q)
    })?;
    Ok(out)
}

/// Logs failed I/Os without flooding the log: when a volume faults, every I/O fails,
/// thousands a second. The first failure is logged with its error; the ones after it
/// within [`FailureLog::EVERY`] are only counted, and the next failure past that logs
/// one line with the count and its own error. Lock-free: frontends call it from any
/// queue.
#[derive(Debug, Default)]
pub struct FailureLog {
    /// When the last line went out (`CLOCK_BOOTTIME` ms; 0: never).
    last_ms: std::sync::atomic::AtomicU64,
    /// Failures counted since, not logged.
    unlogged: std::sync::atomic::AtomicU64,
}

impl FailureLog {
    /// At most one line per this.
    pub const EVERY: std::time::Duration = std::time::Duration::from_secs(5);

    /// Notes that `what` failed with `error`; logs it, or counts it for the next line.
    /// Returns whether it logged.
    pub fn failed(&self, what: &str, error: &dyn std::fmt::Display) -> bool {
        use std::sync::atomic::Ordering;
        let now = (crate::engine::boottime_ns() / 1_000_000).max(1);
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= Self::EVERY.as_millis() as u64;
        if due
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            match self.unlogged.swap(0, Ordering::AcqRel) {
                0 => tracing::warn!(error = %error, "{what} failed"),
                n => tracing::warn!(
                    error = %error,
                    "{what} failed, and {n} more I/Os failed since the last such line"
                ),
            }
            return true;
        }
        self.unlogged.fetch_add(1, Ordering::Relaxed);
        false
    }
}

#[cfg(test)]
mod failure_log_tests {
    use super::FailureLog;

    #[test]
    fn a_storm_of_failures_logs_one_line_then_counts() {
        let log = FailureLog::default();
        assert!(log.failed("read", &"faulted"));
        let logged = (0..10_000).filter(|_| log.failed("read", &"faulted")).count();
        assert_eq!(logged, 0);
        assert_eq!(log.unlogged.load(std::sync::atomic::Ordering::Relaxed), 10_000);
        // Past the interval the next failure logs, with the count, which starts over.
        log.last_ms.store(1, std::sync::atomic::Ordering::Relaxed);
        assert!(log.failed("read", &"faulted"));
        assert_eq!(log.unlogged.load(std::sync::atomic::Ordering::Relaxed), 0);
    }
}
