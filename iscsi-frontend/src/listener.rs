//! The target's listener: accepts connections and serves each on a thread of its own
//! ([`crate::conn::serve`]).

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::target::Target;

/// Accepts connections on `listener` until it fails, each served on its own thread.
pub fn serve(target: Arc<Target>, listener: TcpListener) -> std::io::Result<()> {
    loop {
        let (sock, peer) = listener.accept()?;
        spawn_connection(target.clone(), sock, peer.to_string());
    }
}

fn spawn_connection(target: Arc<Target>, sock: TcpStream, peer: String) {
    if target.stopping.load(Ordering::SeqCst) {
        return;
    }
    match sock.try_clone() {
        Ok(c) => {
            let mut conns = target.conns.lock().unwrap();
            // Forget sockets of connections that have ended.
            conns.retain(|c| c.peer_addr().is_ok());
            conns.push(c);
        }
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot keep a handle on the connection; refused");
            return;
        }
    }
    let spawned = std::thread::Builder::new()
        .name("horn-iscsi-conn".into())
        .spawn(move || {
            tracing::debug!(%peer, "iSCSI connection");
            match crate::conn::serve(target, sock) {
                Ok(()) => tracing::debug!(%peer, "iSCSI connection closed"),
                Err(e) => tracing::warn!(%peer, error = %e, "iSCSI connection ended"),
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start a connection thread");
    }
}
