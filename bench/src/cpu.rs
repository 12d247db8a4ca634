//! How busy the machine's CPUs were during a run (from `/proc/stat`): a run that keeps
//! every CPU busy is CPU bound, and CPU time per I/O compares the cost of two stacks.

/// Busy and total CPU time (in clock ticks) of the whole machine.
fn sample() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some((total - idle, total))
}

/// A measurement under way.
pub struct CpuMeter {
    start: Option<(u64, u64)>,
}

/// What a run used.
#[derive(Debug, Clone, Copy)]
pub struct CpuUse {
    /// Fraction of all CPUs busy (0 to 1).
    pub busy: f64,
    /// CPU seconds spent, all CPUs together.
    pub seconds: f64,
}

impl CpuMeter {
    /// Starts measuring.
    pub fn start() -> CpuMeter {
        CpuMeter { start: sample() }
    }

    /// What was used since the start (None where `/proc/stat` cannot be read).
    pub fn stop(self) -> Option<CpuUse> {
        let (b0, t0) = self.start?;
        let (b1, t1) = sample()?;
        // SAFETY: sysconf takes no pointers.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        Some(CpuUse {
            busy: (b1 - b0) as f64 / (t1 - t0).max(1) as f64,
            seconds: (b1 - b0) as f64 / hz,
        })
    }
}

impl CpuUse {
    /// CPU microseconds per I/O at `iops` over the run.
    pub fn us_per_io(&self, iops: f64, runtime_s: f64) -> f64 {
        self.seconds * 1e6 / (iops * runtime_s).max(1.0)
    }
}
