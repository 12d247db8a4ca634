//! A daemon's log file (`hornd --log-file PATH`): the process's standard output and
//! error go to it, so every line the daemon prints, its tracing and a panic's message
//! land there; it is appended to (a restarted daemon keeps what the crashed one wrote)
//! and rotated by size: past `max_bytes`, `PATH` becomes `PATH.1`, `PATH.1` becomes
//! `PATH.2`, and so on up to `PATH.{keep}`, the oldest dropped.
//!
//! Rotation checks the size once a second, from a thread of its own: a burst may
//! overshoot the cap by what it writes in that second. Writes are `O_APPEND`, so
//! several processes (a supervisor and its child) may append to one file.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

/// Default size at which a log file is rotated.
pub const DEFAULT_MAX_BYTES: u64 = 16 << 20;
/// Default number of rotated files kept.
pub const DEFAULT_KEEP: u32 = 3;

/// How a log file rotates.
#[derive(Debug, Clone)]
pub struct Rotation {
    /// Rotate once the file holds more than this.
    pub max_bytes: u64,
    /// Rotated files kept (`PATH.1` .. `PATH.keep`).
    pub keep: u32,
}

impl Default for Rotation {
    fn default() -> Self {
        Rotation {
            max_bytes: DEFAULT_MAX_BYTES,
            keep: DEFAULT_KEEP,
        }
    }
}

/// Opens `path` for appending (creating it and its directory) and points standard
/// output and error at it; a thread rotates it per `rotation`.
pub fn redirect(path: &Path, rotation: Rotation) -> Result<()> {
    point_stdio_at(path)?;
    let path = path.to_path_buf();
    // The thread takes no signals: the daemon's SIGTERM must reach the thread that
    // waits for it, not end the process here.
    let all = nix::sys::signal::SigSet::all();
    let before = all
        .thread_swap_mask(nix::sys::signal::SigmaskHow::SIG_BLOCK)
        .context("cannot block signals")?;
    let spawned = std::thread::Builder::new()
        .name("log-rotate".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            if let Err(e) = rotate_if_full(&path, &rotation) {
                eprintln!("hornd: cannot rotate the log {}: {e:#}", path.display());
            }
        });
    before
        .thread_set_mask()
        .context("cannot restore the signal mask")?;
    spawned.context("cannot start the log rotation thread")?;
    Ok(())
}

/// Opens `path` for appending, creating it and its directory.
pub fn open_append(path: &Path) -> Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open the log file {}", path.display()))
}

fn point_stdio_at(path: &Path) -> Result<()> {
    let file = open_append(path)?;
    for fd in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        // SAFETY: dup2 takes two descriptors; `file` is open, and 1 and 2 are ours to
        // replace (the old file is closed by the call).
        if unsafe { libc::dup2(file.as_raw_fd(), fd) } < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot point descriptor {fd} at {}", path.display()));
        }
    }
    Ok(())
}

fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// Rotates the file standard output writes to if it holds more than the cap.
fn rotate_if_full(path: &Path, rotation: &Rotation) -> Result<()> {
    // SAFETY: fstat fills the struct it is given, from our own descriptor 1.
    let size = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(libc::STDOUT_FILENO, &mut st) < 0 {
            return Err(std::io::Error::last_os_error()).context("fstat of standard output");
        }
        st.st_size as u64
    };
    if size <= rotation.max_bytes {
        return Ok(());
    }
    rotate(path, rotation.keep)?;
    point_stdio_at(path)
}

/// `PATH.{keep-1}` → `PATH.{keep}`, ..., `PATH` → `PATH.1`.
fn rotate(path: &Path, keep: u32) -> Result<()> {
    let keep = keep.max(1);
    for n in (1..keep).rev() {
        let from = rotated(path, n);
        if from.exists() {
            std::fs::rename(&from, rotated(path, n + 1))
                .with_context(|| format!("cannot rename {}", from.display()))?;
        }
    }
    std::fs::rename(path, rotated(path, 1)).with_context(|| format!("cannot rename {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_shifts_the_files_and_drops_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        for round in 0..5 {
            std::fs::write(&log, format!("round {round}")).unwrap();
            rotate(&log, 3).unwrap();
        }
        assert!(!log.exists());
        let read = |n| std::fs::read_to_string(rotated(&log, n)).unwrap();
        assert_eq!(
            (read(1), read(2), read(3)),
            ("round 4".into(), "round 3".into(), "round 2".into())
        );
        assert!(!rotated(&log, 4).exists());
    }
}
