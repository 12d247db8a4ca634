//! `Ring`: one io_uring, as every loop of the data path drives it.
//!
//! A loop's life on a ring is always the same four steps, and they live here once:
//! 1. **set-up** ([`Ring::for_thread`]): a ring that one thread submits to and reaps
//!    from, so the kernel runs completion work when that thread asks for it instead
//!    of interrupting it;
//! 2. **push** ([`Ring::push`]): an entry into the submission queue, submitting what
//!    is queued when it is full;
//! 3. **wait** ([`Ring::wait`]): submit and sleep until a completion or a deadline;
//! 4. **reap and route** ([`Ring::reap`]): every completion copied out into a batch
//!    (handling one may push new entries), each carrying a [`Route`] and a token in
//!    its user data so that a ring shared by several owners (an iSCSI connection's
//!    socket and its engine queue's replica sockets) hands each its own.
//!
//! A ring whose owner is someone else's (libublk's per-queue ring) gets the push step
//! alone, through [`push_or_submit`].

use std::time::Duration;

use io_uring::{squeue, types, IoUring};

/// Workers the kernel may run at once for a ring's blocking file I/O.
pub const IO_WORKERS: u32 = 64;

/// Which owner of a ring an entry belongs to: the top byte of its user data. The
/// token, the low 32 bits, is the owner's own (an engine queue's `Token`, a store's
/// entry index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Route(pub u8);

const ROUTE_SHIFT: u32 = 56;

impl Route {
    /// The user data of an entry of this route's owner carrying `token`.
    pub const fn user_data(self, token: u32) -> u64 {
        ((self.0 as u64) << ROUTE_SHIFT) | token as u64
    }
}

/// One completion, copied out of the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cqe {
    /// The entry's user data.
    pub user_data: u64,
    /// The kernel's result: bytes moved, a descriptor, or a negated errno.
    pub result: i32,
}

impl Cqe {
    /// The owner the entry was pushed for.
    pub fn route(&self) -> Route {
        Route((self.user_data >> ROUTE_SHIFT) as u8)
    }

    /// The owner's token.
    pub fn token(&self) -> u32 {
        self.user_data as u32
    }
}

/// An io_uring and the batch its completions are reaped into.
pub struct Ring {
    ring: IoUring,
    /// Enabled by (and so belonging to) the first thread that uses it: a ring can be
    /// set up on one thread and driven from another.
    enabled: bool,
    /// Reused by [`Ring::reap`], so reaping does not allocate.
    batch: Vec<Cqe>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").field("enabled", &self.enabled).finish()
    }
}

impl Ring {
    /// A ring that one thread submits to and reaps from. The kernel runs completion
    /// work when that thread asks for completions instead of interrupting it
    /// (measured on the store: 4 KiB QD1 reads 0.87-0.91 of fio without these flags,
    /// 0.96-0.99 with them), and flags pending completion work so that a thread
    /// polling the ring sees it without a system call ([`crate::Waiter`]). Such a ring
    /// belongs to one thread: it is created disabled and enabled by the first thread
    /// that uses it. Kernels before 6.1 get a plain ring.
    pub fn for_thread(entries: u32) -> std::io::Result<Ring> {
        let (ring, enabled) = match IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .setup_r_disabled()
            .build(entries)
        {
            Ok(ring) => (ring, false),
            Err(_) => (IoUring::new(entries)?, true),
        };
        let ring = Ring {
            ring,
            enabled,
            batch: Vec::new(),
        };
        if ring.enabled {
            widen_io_workers(&ring.ring);
        }
        Ok(ring)
    }

    /// A plain ring any thread may drive, one at a time (a replica shared under a lock).
    pub fn shared(entries: u32) -> std::io::Result<Ring> {
        let ring = IoUring::new(entries)?;
        widen_io_workers(&ring);
        Ok(Ring {
            ring,
            enabled: true,
            batch: Vec::new(),
        })
    }

    /// Enables a ring made by [`Ring::for_thread`] for the calling thread, if that has
    /// not happened yet; every other method does it first.
    pub fn enable(&mut self) -> std::io::Result<()> {
        if !self.enabled {
            self.ring.submitter().register_enable_rings()?;
            self.enabled = true;
            widen_io_workers(&self.ring);
        }
        Ok(())
    }

    /// Queues `entry`, submitting what is queued first if the submission queue is full.
    ///
    /// # Safety
    /// Every buffer and descriptor the entry names must stay valid, and not move,
    /// until its completion has been reaped.
    pub unsafe fn push(&mut self, entry: &squeue::Entry) -> std::io::Result<()> {
        self.enable()?;
        // SAFETY: the caller's promise.
        unsafe { push_or_submit(&mut self.ring, entry) }
    }

    /// Queues every entry of `entries` in order (see [`Ring::push`]); returns how many.
    ///
    /// # Safety
    /// As for [`Ring::push`], for each entry.
    pub unsafe fn push_all(
        &mut self,
        entries: impl IntoIterator<Item = squeue::Entry>,
    ) -> std::io::Result<usize> {
        let mut n = 0;
        for e in entries {
            // SAFETY: the caller's promise.
            unsafe { self.push(&e)? };
            n += 1;
        }
        Ok(n)
    }

    /// Hands the queued entries to the kernel, if there are any (an empty submit
    /// would still cost a system call).
    pub fn submit(&mut self) -> std::io::Result<()> {
        self.enable()?;
        if !self.ring.submission().is_empty() {
            self.ring.submit()?;
        }
        Ok(())
    }

    /// Submits what is queued and sleeps until one completion arrives or `deadline`
    /// passes (`None`: no deadline). A deadline reached or a signal is not an error.
    pub fn wait(&mut self, deadline: Option<Duration>) -> std::io::Result<()> {
        self.enable()?;
        let res = match deadline {
            Some(w) => {
                let ts = types::Timespec::from(w.max(Duration::from_micros(1)));
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submit_and_wait(1),
        };
        match res {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Moves every completion out of the ring into a batch, which the caller may
    /// handle while pushing new entries. Give it back with [`Ring::recycle`], so the
    /// next reap reuses its memory.
    pub fn reap(&mut self) -> Vec<Cqe> {
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        batch.extend(self.ring.completion().map(|c| Cqe {
            user_data: c.user_data(),
            result: c.result(),
        }));
        batch
    }

    /// Returns a batch from [`Ring::reap`] for reuse.
    pub fn recycle(&mut self, batch: Vec<Cqe>) {
        if batch.capacity() > self.batch.capacity() {
            self.batch = batch;
        }
    }

    /// Are completions waiting to be reaped?
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Enters the kernel even with nothing queued, so that it runs the completion
    /// work waiting for this thread (see [`Ring::has_taskrun`]).
    pub fn run_completion_work(&mut self) -> std::io::Result<()> {
        self.enable()?;
        self.ring.submit().map(|_| ())
    }

    /// Does the kernel have completion work waiting for this thread to ask for it
    /// (a ring from [`Ring::for_thread`])? A submit runs it.
    pub fn has_taskrun(&mut self) -> bool {
        self.ring.submission().taskrun()
    }
}

/// Queues `entry` on a ring someone else owns, submitting what is queued first if the
/// submission queue is full.
///
/// # Safety
/// As for [`Ring::push`].
pub unsafe fn push_or_submit(ring: &mut IoUring, entry: &squeue::Entry) -> std::io::Result<()> {
    loop {
        // SAFETY: the caller's promise.
        if unsafe { ring.submission().push(entry) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
}

/// Lets the calling thread's io_uring run [`IO_WORKERS`] blocking file operations at
/// once. Buffered reads that miss the page cache, and buffered writes a filesystem
/// cannot start without blocking, go to the kernel's io-wq workers, which it caps at
/// four per CPU by default: 8 on a 2-CPU machine, which held cold random reads at
/// QD32 under a target whose 16 threads issue `pread`s. Best effort: a kernel without
/// the setting (before 5.15) keeps its default.
pub fn widen_io_workers(ring: &IoUring) {
    // [bounded (regular files), unbounded (sockets)]; 0 leaves one as it is.
    let mut max = [IO_WORKERS, 0];
    if let Err(e) = ring.submitter().register_iowq_max_workers(&mut max) {
        tracing::debug!(error = %e, "cannot raise the io_uring worker limit");
    }
}

#[cfg(test)]
mod tests {
    use io_uring::opcode;

    use super::*;

    #[test]
    fn routes_and_tokens_survive_the_user_data() {
        for route in [0u8, 1, 7, 255] {
            for token in [0u32, 1, 0x1fff, u32::MAX] {
                let c = Cqe {
                    user_data: Route(route).user_data(token),
                    result: 0,
                };
                assert_eq!(c.route(), Route(route));
                assert_eq!(c.token(), token);
            }
        }
    }

    #[test]
    fn a_full_submission_queue_is_submitted_rather_than_refused() {
        // A 4-entry ring takes 100 no-ops: each push past the fourth submits first,
        // and every one of them completes, with its route and token.
        let mut ring = Ring::for_thread(4).unwrap();
        let mut tokens = Vec::new();
        for i in 0..100u32 {
            let nop = opcode::Nop::new().build().user_data(Route(1).user_data(i));
            // SAFETY: a no-op names no memory.
            unsafe { ring.push(&nop).unwrap() };
        }
        for _ in 0..1000 {
            if tokens.len() == 100 {
                break;
            }
            ring.wait(Some(Duration::from_millis(10))).unwrap();
            let batch = ring.reap();
            for c in &batch {
                assert_eq!((c.route(), c.result), (Route(1), 0));
                tokens.push(c.token());
            }
            ring.recycle(batch);
        }
        tokens.sort_unstable();
        assert_eq!(tokens, (0..100).collect::<Vec<u32>>());
    }

    #[test]
    fn a_wait_past_its_deadline_is_not_an_error() {
        let mut ring = Ring::for_thread(4).unwrap();
        let start = std::time::Instant::now();
        ring.wait(Some(Duration::from_millis(20))).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(15));
        assert!(ring.reap().is_empty());
    }
}
