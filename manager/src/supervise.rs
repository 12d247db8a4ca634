//! `hornd supervise -- COMMAND...`: runs a daemon and starts it again when it dies.
//!
//! The rules are those of a service manager's `Restart=on-failure`, in a process of its
//! own so that `hornctl ublk add` gives a device a supervised engine on a machine
//! without systemd (deploy/ has the units for machines with it):
//! - a child that exits with status 0, or is stopped by SIGTERM or SIGINT (an
//!   operator's stop, `hornctl ublk del`), is not restarted, and the supervisor exits
//!   with it;
//! - a child killed by any other signal (SIGKILL, SIGSEGV, an abort) or exiting with
//!   another status is started again, after a pause that doubles from 1 s up to 30 s
//!   while the restarts keep failing fast (a run of 60 s or more resets it);
//! - the first run exiting with a failure status within its first 10 s is a start-up
//!   error (bad arguments, unreachable replicas): not retried, its status is the
//!   supervisor's (killed by a signal, it is restarted);
//! - after `max_restarts` restarts in a row that each lived under 60 s, it gives up;
//! - SIGTERM or SIGINT to the supervisor is passed on to the child, and the supervisor
//!   exits once the child has.
//!
//! The same command is run each time: an engine serving ublk reattaches to the device
//! its predecessor left (see `hornd engine --frontend ublk`). What happens is appended
//! to the log file given (the child's own output goes where the child sends it).

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How a supervisor behaves.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Restarts in a row, each after a run under [`Policy::healthy_after`], before it
    /// gives up.
    pub max_restarts: u32,
    /// A run this long resets the pause and the count.
    pub healthy_after: Duration,
    /// The first run ending sooner is a start-up error, not retried.
    pub startup: Duration,
    /// The first pause; it doubles up to [`Policy::max_pause`].
    pub first_pause: Duration,
    /// The longest pause.
    pub max_pause: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_restarts: 10,
            healthy_after: Duration::from_secs(60),
            startup: Duration::from_secs(10),
            first_pause: Duration::from_secs(1),
            max_pause: Duration::from_secs(30),
        }
    }
}

/// What to do when the child has ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Exit with the child's status.
    Stop(&'static str),
    /// Start it again after this pause.
    Restart(Duration),
}

/// The supervisor's memory across runs.
#[derive(Debug, Default)]
pub struct History {
    runs: u32,
    quick_failures: u32,
}

/// Decides what follows a run that lasted `lived` and ended with `status` (the rule
/// is apart from the processes, to be tested on its own).
pub fn decide(policy: &Policy, history: &mut History, status: ExitStatus, lived: Duration) -> Decision {
    history.runs += 1;
    if status.success() {
        return Decision::Stop("it exited cleanly");
    }
    if matches!(status.signal(), Some(libc::SIGTERM) | Some(libc::SIGINT)) {
        return Decision::Stop("it was stopped");
    }
    // A daemon that cannot start exits with a status; one killed is not that.
    if history.runs == 1 && lived < policy.startup && status.code().is_some() {
        return Decision::Stop("it failed as it started");
    }
    if lived >= policy.healthy_after {
        history.quick_failures = 0;
    }
    if history.quick_failures >= policy.max_restarts {
        return Decision::Stop("it kept failing: gave up");
    }
    let pause = policy
        .first_pause
        .saturating_mul(1 << history.quick_failures.min(16))
        .min(policy.max_pause);
    history.quick_failures += 1;
    Decision::Restart(pause)
}

/// Runs `command` under `policy` until it ends for good; returns its last status.
pub fn run(command: &[String], policy: &Policy, log: Option<PathBuf>) -> Result<ExitStatus> {
    let Some((program, args)) = command.split_first() else {
        bail!("name the command to supervise after --");
    };
    let note = |line: String| {
        let line = format!("hornd supervise: {line}\n");
        match &log {
            Some(path) => {
                if let Ok(mut f) = crate::logfile::open_append(path) {
                    let _ = f.write_all(line.as_bytes());
                }
            }
            None => eprint!("{line}"),
        }
    };
    // Stop signals go to one thread, which passes them on to the child.
    let stop_signals = crate::daemon::block_stop_signals()?;
    let child_pid = Arc::new(AtomicI32::new(0));
    let stopping = Arc::new(AtomicBool::new(false));
    {
        let (child_pid, stopping) = (child_pid.clone(), stopping.clone());
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                while let Ok(sig) = stop_signals.wait() {
                    stopping.store(true, Ordering::SeqCst);
                    let pid = child_pid.load(Ordering::SeqCst);
                    if pid > 0 {
                        // SAFETY: kill takes no pointers; the pid is our child's.
                        unsafe { libc::kill(pid, sig as i32) };
                    }
                }
            })?;
    }
    let mut history = History::default();
    loop {
        let started = Instant::now();
        // std resets the signal mask in the child: it gets SIGTERM as usual.
        let mut child = std::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {program}"))?;
        child_pid.store(child.id() as i32, Ordering::SeqCst);
        note(format!("started pid {}: {}", child.id(), command.join(" ")));
        let status = child.wait().context("waiting for the child")?;
        child_pid.store(0, Ordering::SeqCst);
        let lived = started.elapsed();
        if stopping.load(Ordering::SeqCst) {
            note(format!(
                "pid {} ended ({status}) after a stop signal; exiting",
                child.id()
            ));
            return Ok(status);
        }
        match decide(policy, &mut history, status, lived) {
            Decision::Stop(why) => {
                note(format!(
                    "pid {} ended ({status}) after {lived:.1?}: {why}",
                    child.id()
                ));
                return Ok(status);
            }
            Decision::Restart(pause) => {
                note(format!(
                    "pid {} ended ({status}) after {lived:.1?}; starting it again in {pause:?}",
                    child.id()
                ));
                let until = Instant::now() + pause;
                while Instant::now() < until {
                    if stopping.load(Ordering::SeqCst) {
                        return Ok(status);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    fn killed(sig: i32) -> ExitStatus {
        ExitStatus::from_raw(sig)
    }

    #[test]
    fn clean_exits_and_stops_end_supervision_crashes_restart_with_a_growing_pause() {
        let p = Policy::default();
        let long = Duration::from_secs(120);
        let short = Duration::from_secs(15);
        let mut h = History::default();
        assert_eq!(
            decide(&p, &mut h, exited(0), long),
            Decision::Stop("it exited cleanly")
        );
        let mut h = History::default();
        assert_eq!(
            decide(&p, &mut h, killed(libc::SIGTERM), long),
            Decision::Stop("it was stopped")
        );
        let mut h = History::default();
        assert_eq!(
            decide(&p, &mut h, exited(1), Duration::from_secs(1)),
            Decision::Stop("it failed as it started")
        );
        let mut h = History::default();
        assert_eq!(
            decide(&p, &mut h, killed(libc::SIGKILL), Duration::from_secs(1)),
            Decision::Restart(Duration::from_secs(1))
        );
        let mut h = History::default();
        assert_eq!(
            decide(&p, &mut h, killed(libc::SIGKILL), long),
            Decision::Restart(Duration::from_secs(1))
        );
        assert_eq!(
            decide(&p, &mut h, killed(libc::SIGSEGV), short),
            Decision::Restart(Duration::from_secs(2))
        );
        assert_eq!(
            decide(&p, &mut h, exited(1), short),
            Decision::Restart(Duration::from_secs(4))
        );
        // A long run resets the pause.
        assert_eq!(
            decide(&p, &mut h, killed(libc::SIGKILL), long),
            Decision::Restart(Duration::from_secs(1))
        );
        let mut pauses = Vec::new();
        while let Decision::Restart(d) = decide(&p, &mut h, killed(libc::SIGABRT), short) {
            pauses.push(d.as_secs());
        }
        assert_eq!(pauses, vec![2, 4, 8, 16, 30, 30, 30, 30, 30]);
    }
}
