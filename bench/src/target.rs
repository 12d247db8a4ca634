//! What a benchmark drives: the store in-process, or a volume through its engine. Both
//! take buffers with a tag and hand them back on completion; this trait lets one
//! driver loop measure either.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use horn_engine::replica_set::IoKind;
use horn_engine::Volume;
use horn_replica::{IoBuf, Replica};
use rand::{rngs::SmallRng, Rng, SeedableRng};

/// A block device a benchmark can keep I/O in flight on.
pub trait BlockTarget {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Submits a read (or write) of `buf` at `offset`.
    fn submit(&mut self, write: bool, offset: u64, buf: IoBuf, tag: u64);
    /// Waits for at least one completion; returns (tag, buffer) pairs, failing on
    /// the first error.
    fn reap(&mut self, out: &mut Vec<(u64, IoBuf)>) -> Result<()>;
    /// I/Os in flight.
    fn in_flight(&self) -> usize;
    /// Makes writes durable.
    fn flush(&mut self) -> Result<()>;
}

impl BlockTarget for Replica {
    fn size(&self) -> u64 {
        Replica::size(self)
    }
    fn submit(&mut self, write: bool, offset: u64, buf: IoBuf, tag: u64) {
        if write {
            self.submit_write(offset, buf, tag)
        } else {
            self.submit_read(offset, buf, tag)
        }
    }
    fn reap(&mut self, out: &mut Vec<(u64, IoBuf)>) -> Result<()> {
        let mut done = Vec::new();
        Replica::reap(self, 1, &mut done)?;
        for c in done {
            c.result.with_context(|| format!("I/O {} failed", c.tag))?;
            out.push((c.tag, c.buf.expect("reads and writes return their buffer")));
        }
        Ok(())
    }
    fn in_flight(&self) -> usize {
        Replica::in_flight(self)
    }
    fn flush(&mut self) -> Result<()> {
        Ok(Replica::flush(self)?)
    }
}

impl BlockTarget for Volume {
    fn size(&self) -> u64 {
        Volume::size(self)
    }
    fn submit(&mut self, write: bool, offset: u64, buf: IoBuf, tag: u64) {
        let kind = if write { IoKind::Write } else { IoKind::Read };
        Volume::submit(self, kind, offset, 0, Some(buf), tag)
    }
    fn reap(&mut self, out: &mut Vec<(u64, IoBuf)>) -> Result<()> {
        let mut done = Vec::new();
        Volume::reap(self, 1, &mut done)?;
        for c in done {
            c.result.with_context(|| format!("I/O {} failed", c.tag))?;
            out.push((c.tag, c.buf.expect("reads and writes return their buffer")));
        }
        Ok(())
    }
    fn in_flight(&self) -> usize {
        Volume::in_flight(self)
    }
    fn flush(&mut self) -> Result<()> {
        Ok(Volume::flush(self)?)
    }
}

/// A buffer of `len` non-zero bytes.
pub fn pattern_buf(len: u64, seed: u8) -> IoBuf {
    let mut b = IoBuf::zeroed(len as usize);
    for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(31).wrapping_add(seed) | 1;
    }
    b
}

/// Writes the whole target sequentially in 1 MiB writes at QD8, then flushes.
pub fn fill(t: &mut impl BlockTarget) -> Result<()> {
    const MIB: u64 = 1 << 20;
    let size = t.size();
    let mut next = 0u64;
    let mut out = Vec::new();
    let mut free: Vec<IoBuf> = (0..8).map(|i| pattern_buf(MIB, i)).collect();
    while next < size || t.in_flight() > 0 {
        while next < size {
            let Some(buf) = free.pop() else { break };
            t.submit(true, next, buf, next);
            next += MIB;
        }
        out.clear();
        t.reap(&mut out).context("filling")?;
        free.extend(out.drain(..).map(|(_, b)| b));
    }
    t.flush()
}

/// One workload: random or sequential, read or write, block size, queue depth.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// Name as printed.
    pub name: &'static str,
    /// fio's `--rw` for the same job.
    pub fio_rw: &'static str,
    /// Writes (else reads).
    pub write: bool,
    /// Random offsets (else sequential).
    pub random: bool,
    /// Block size in bytes.
    pub bs: u64,
    /// Queue depth.
    pub qd: usize,
}

/// The workloads every benchmark runs: 4 KiB random at QD32 and QD1, 1 MiB sequential.
pub const WORKLOADS: &[Workload] = &[
    Workload {
        name: "randread-4k-qd32",
        fio_rw: "randread",
        write: false,
        random: true,
        bs: 4096,
        qd: 32,
    },
    Workload {
        name: "randwrite-4k-qd32",
        fio_rw: "randwrite",
        write: true,
        random: true,
        bs: 4096,
        qd: 32,
    },
    Workload {
        name: "randread-4k-qd1",
        fio_rw: "randread",
        write: false,
        random: true,
        bs: 4096,
        qd: 1,
    },
    Workload {
        name: "randwrite-4k-qd1",
        fio_rw: "randwrite",
        write: true,
        random: true,
        bs: 4096,
        qd: 1,
    },
    Workload {
        name: "read-1m-qd8",
        fio_rw: "read",
        write: false,
        random: false,
        bs: 1 << 20,
        qd: 8,
    },
    Workload {
        name: "write-1m-qd8",
        fio_rw: "write",
        write: true,
        random: false,
        bs: 1 << 20,
        qd: 8,
    },
];

/// Keeps `w.qd` I/Os in flight for `runtime`; returns IOPS and mean latency in µs.
pub fn drive(t: &mut impl BlockTarget, w: &Workload, runtime: Duration) -> Result<(f64, f64)> {
    let blocks = t.size() / w.bs;
    let mut rng = SmallRng::seed_from_u64(42);
    let mut seq = 0u64;
    let mut next_offset = |rng: &mut SmallRng| {
        if w.random {
            rng.gen_range(0..blocks) * w.bs
        } else {
            seq = (seq + 1) % blocks;
            seq * w.bs
        }
    };
    let mut started = vec![Instant::now(); w.qd];
    let t0 = Instant::now();
    for (slot, at) in started.iter_mut().enumerate() {
        *at = Instant::now();
        let off = next_offset(&mut rng);
        t.submit(w.write, off, pattern_buf(w.bs, slot as u8), slot as u64);
    }
    let (mut done, mut lat_sum) = (0u64, Duration::ZERO);
    let mut out = Vec::with_capacity(w.qd);
    let mut stopping = false;
    while t.in_flight() > 0 {
        out.clear();
        t.reap(&mut out).with_context(|| format!("{} failed", w.name))?;
        let now = Instant::now();
        stopping |= now.duration_since(t0) >= runtime;
        for (tag, buf) in out.drain(..) {
            let slot = tag as usize;
            lat_sum += now.duration_since(started[slot]);
            done += 1;
            if !stopping {
                started[slot] = Instant::now();
                let off = next_offset(&mut rng);
                t.submit(w.write, off, buf, slot as u64);
            }
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    Ok((
        done as f64 / elapsed,
        lat_sum.as_secs_f64() * 1e6 / done.max(1) as f64,
    ))
}
