//! Named crash points for the crash-consistency tests.
//!
//! Every step of a chain operation that changes files calls [`point`] with a name.
//! When the environment variable `HORN_CRASH_POINT` names that point, the process
//! aborts right there, as `kill -9` would stop it: no destructors, no flushing of
//! anything the step had not made durable itself. The tests run a child process with
//! the variable set to each point in turn and check that the replica still opens in
//! the state before or after the operation. The variable is read once; unset, a point
//! costs one relaxed load. Points sit on control operations only, never on the I/O path.

use std::sync::OnceLock;

/// The environment variable naming the point to abort at.
pub const CRASH_POINT_VAR: &str = "HORN_CRASH_POINT";

/// Aborts the process if `HORN_CRASH_POINT` equals `name`.
pub fn point(name: &str) {
    static TARGET: OnceLock<Option<String>> = OnceLock::new();
    let target = TARGET.get_or_init(|| std::env::var(CRASH_POINT_VAR).ok());
    if target.as_deref() == Some(name) {
        eprintln!("horn: crash point {name} reached, aborting");
        std::process::abort();
    }
}
