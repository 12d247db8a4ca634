//! Named crash points for the crash-consistency tests.
//!
//! Every step of a chain operation that changes files calls [`point`] with a name.
//! When the environment variable `HORN_CRASH_POINT` names that point (`name`, or
//! `name#N` for its N-th hit in the process), the process aborts right there, as
//! `kill -9` would stop it: no destructors, no flushing of anything the step had not
//! made durable itself. The tests run `hornctl` with the variable set to each point in
//! turn and check that the replica still opens in the state before or after the
//! operation. Points sit on chain operations only, never on the I/O path; unset, a
//! point costs one check of a `OnceLock`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// The environment variable naming the point to abort at.
pub const CRASH_POINT_VAR: &str = "HORN_CRASH_POINT";

/// Aborts the process if `HORN_CRASH_POINT` names this hit of point `name`.
pub fn point(name: &str) {
    static TARGET: OnceLock<Option<(String, u32)>> = OnceLock::new();
    static HITS: AtomicU32 = AtomicU32::new(0);
    let target = TARGET.get_or_init(|| {
        let v = std::env::var(CRASH_POINT_VAR).ok()?;
        Some(match v.split_once('#') {
            Some((n, k)) => (n.to_string(), k.parse().unwrap_or(1)),
            None => (v, 1),
        })
    });
    if let Some((want, nth)) = target {
        if want == name && HITS.fetch_add(1, Ordering::Relaxed) + 1 == *nth {
            eprintln!("horn: crash point {name} (hit {nth}) reached, aborting");
            std::process::abort();
        }
    }
}
