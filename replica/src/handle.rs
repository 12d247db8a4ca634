//! `ServerHandle`: how other threads reach a replica that one thread owns, to run
//! control operations (generation, snapshots, info, a rebuild's calls) on it.
//!
//! A replica is owned either by a data loop ([`crate::server::DataServer`]), which runs
//! each call as a closure on its own thread between I/Os, woken through an eventfd it
//! keeps a read posted on; or by an in-process engine's [`SharedReplica`], whose calls
//! run on the caller's thread under the replica's lock. The control service
//! ([`crate::control`]) and a rebuild's pull ([`crate::sync`]) speak only this handle,
//! never the loop.
//!
//! Floor: above `replica` and `shared`; below `server`, `control` and `sync`.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use crate::error::{ReplicaError, Result};
use crate::replica::Replica;
use crate::shared::SharedReplica;

/// A control operation: run on the loop thread with the replica.
pub(crate) type Command = Box<dyn FnOnce(&mut Replica) + Send>;

/// Wakes the loop: an eventfd the loop keeps a read posted on.
struct Waker {
    fd: File,
}

impl Waker {
    fn wake(&self) {
        // An eventfd write of 1 only fails when the counter would overflow, which means
        // the loop is already due to wake.
        let _ = (&self.fd).write(&1u64.to_ne_bytes());
    }
}

/// A handle other threads use to run control operations on a replica: on a server's
/// loop, or under the lock of a replica shared with an in-process engine.
#[derive(Clone)]
pub struct ServerHandle {
    inner: HandleInner,
}

#[derive(Clone)]
enum HandleInner {
    Loop {
        tx: Sender<Option<Command>>,
        waker: Arc<Waker>,
    },
    Shared(Arc<SharedReplica>),
}

impl ServerHandle {
    /// A handle on a replica shared with an in-process engine: calls run on the
    /// caller's thread, under the replica's lock.
    pub fn shared(replica: Arc<SharedReplica>) -> ServerHandle {
        ServerHandle {
            inner: HandleInner::Shared(replica),
        }
    }

    /// A handle on a data loop serving the replica in `dir`, and the loop's inbox: a
    /// command to run, or `None` to stop.
    pub(crate) fn for_loop(dir: &Path) -> Result<(ServerHandle, Receiver<Option<Command>>)> {
        // SAFETY: eventfd takes no pointers; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(ReplicaError::io("eventfd", dir, std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a new descriptor that nothing else owns.
        let waker = Arc::new(Waker {
            fd: unsafe { File::from_raw_fd(fd) },
        });
        let (tx, inbox) = mpsc::channel();
        let handle = ServerHandle {
            inner: HandleInner::Loop { tx, waker },
        };
        Ok((handle, inbox))
    }

    /// Runs `f` with the replica (on the loop thread, or under the shared replica's
    /// lock) and returns its result. Fails only if the loop has stopped.
    pub fn call<T: Send + 'static>(&self, f: impl FnOnce(&mut Replica) -> T + Send + 'static) -> Result<T> {
        let (tx, waker) = match &self.inner {
            HandleInner::Shared(r) => return Ok(r.call(f)),
            HandleInner::Loop { tx, waker } => (tx, waker),
        };
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        let cmd: Command = Box::new(move |r| {
            let _ = reply_tx.send(f(r));
        });
        // Going away, not refusing: callers treat it as a replica that does not answer
        // (an engine must not take it for a newer engine's refusal).
        let stopped = || ReplicaError::Unavailable("the replica server has stopped".into());
        tx.send(Some(cmd)).map_err(|_| stopped())?;
        waker.wake();
        reply_rx.recv().map_err(|_| stopped())
    }

    /// Asks the loop to stop after the I/O in flight; `run` then returns. A shared
    /// replica has no loop: its owner closes it.
    pub fn stop(&self) {
        if let HandleInner::Loop { tx, waker } = &self.inner {
            let _ = tx.send(None);
            waker.wake();
        }
    }

    /// The eventfd the loop keeps a read posted on (-1 for a shared replica, which
    /// has no loop). It lives as long as any clone of the handle.
    pub(crate) fn waker_fd(&self) -> RawFd {
        match &self.inner {
            HandleInner::Loop { waker, .. } => waker.fd.as_raw_fd(),
            HandleInner::Shared(_) => -1,
        }
    }
}
