//! `Waiter`: a wait on a ring that polls briefly before it sleeps.

use std::time::{Duration, Instant};

use crate::ring::Ring;

/// Longest a [`Waiter`] polls its ring before it sleeps in it.
pub const SPIN: Duration = Duration::from_micros(50);

/// A wait that returns within this counts as traffic: the next wait polls first.
const BUSY_GAP: Duration = Duration::from_micros(500);

/// Waits for completions like [`Ring::wait`], but while they have been coming
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
    /// its client). The ring must flag pending completion work (as
    /// [`Ring::for_thread`] makes it) for the poll to see it.
    pub fn wait(&mut self, ring: &mut Ring, deadline: Option<Duration>, idle: bool) -> std::io::Result<()> {
        if self.busy && idle {
            ring.submit()?;
            let start = Instant::now();
            loop {
                if ring.has_completions() {
                    return Ok(());
                }
                if ring.has_taskrun() {
                    // Runs the completion work (the submit asks for events when flagged).
                    ring.run_completion_work()?;
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
        ring.wait(deadline)?;
        self.busy = start.elapsed() < BUSY_GAP;
        Ok(())
    }
}
