//! The target's listener: accepts connections and serves each on a thread of its own
//! ([`crate::conn::serve`]).
//!
//! Every connection is registered with the target while it lives (so that a stop can
//! shut it down) and leaves the register when its thread ends, whatever the state it
//! ended in: before login, during it, after a refused one, or in a session. No
//! descriptor outlives its connection. Past the target's limit a connection is answered
//! "out of resources" at login and closed; far past it (more than a burst of such
//! refusals in flight), closed at once. An accept that fails (out of descriptors, a
//! connection aborted before it was taken) is logged and tried again after a pause:
//! the listener ends only when the target stops.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::target::Target;

/// Connections past the limit that may be waiting for their refusal at once; beyond
/// them a connection is closed without a word.
const REFUSALS_IN_FLIGHT: usize = 16;

/// How long the listener waits after an accept failed for want of resources.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Accepts connections on `listener`, each served on its own thread, until the target
/// stops. Fails only when the listening socket itself is unusable.
pub fn serve(target: Arc<Target>, listener: TcpListener) -> std::io::Result<()> {
    let mut failures = 0u64;
    loop {
        match listener.accept() {
            Ok((sock, peer)) => {
                failures = 0;
                spawn_connection(target.clone(), sock, peer.to_string());
            }
            Err(e) if target.stopping.load(Ordering::SeqCst) => {
                tracing::debug!(error = %e, "the iSCSI listener ends with the target");
                return Ok(());
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP) => return Err(e),
                Some(libc::EINTR | libc::ECONNABORTED) => {}
                _ => {
                    failures += 1;
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(error = %e, failures, retry_in = ?ACCEPT_RETRY, "iSCSI accept failed; trying again");
                    }
                    std::thread::sleep(ACCEPT_RETRY);
                }
            },
        }
    }
}

/// A connection's place in the target's register, given up when its thread ends.
struct Registered {
    target: Arc<Target>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.target.conns.lock().unwrap().remove(&self.id);
    }
}

fn spawn_connection(target: Arc<Target>, sock: TcpStream, peer: String) {
    if target.stopping.load(Ordering::SeqCst) {
        return;
    }
    let clone = match sock.try_clone() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot keep a handle on the connection; refused");
            return;
        }
    };
    let (registered, busy) = {
        let mut conns = target.conns.lock().unwrap();
        let open = conns.len();
        if open >= target.max_connections + REFUSALS_IN_FLIGHT {
            tracing::warn!(%peer, open, "too many iSCSI connections; closed at once");
            return;
        }
        let id = target.next_conn.fetch_add(1, Ordering::Relaxed);
        conns.insert(id, clone);
        let registered = Registered {
            target: target.clone(),
            id,
        };
        (registered, open >= target.max_connections)
    };
    let spawned = std::thread::Builder::new()
        .name("horn-iscsi-conn".into())
        .spawn(move || {
            let _registered = registered;
            tracing::debug!(%peer, busy, "iSCSI connection");
            match crate::conn::serve(target, sock, busy) {
                Ok(()) => tracing::debug!(%peer, "iSCSI connection closed"),
                Err(e) => tracing::warn!(%peer, error = %e, "iSCSI connection ended"),
            }
        });
    if let Err(e) = spawned {
        // The closure, with the socket and the registration, is dropped: both close.
        tracing::error!(error = %e, "cannot start a connection thread");
    }
}
