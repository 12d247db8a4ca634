//! The data wire over TLS (`--data-tls`), for networks where traffic may be read.
//!
//! The data wire's own loops (the engine's queues, the replica's server) drive plain
//! sockets from io_uring, and this machine's kernel has no kernel TLS to hand the
//! records to. So TLS is done beside them, by one tunnel thread a process:
//! - on the replica's side, [`serve_data_tls`] takes connections on the public
//!   address, does the TLS handshake (mutual: a certificate of the cluster's CA on
//!   both sides), and forwards the plaintext to the data server listening on
//!   loopback;
//! - on the engine's side, [`DataTlsDialer::local_for`] gives, for each replica, a
//!   loopback address whose connections it carries to the replica over TLS;
//! - a rebuild's layer streams, replica to replica, run over blocking TLS sessions
//!   ([`accept_blocking`], [`connect_blocking`]) on their own threads.
//!
//! Everything above (the hello, the challenge–response, the requests) is unchanged,
//! end to end. The cost, two more socket hops and a copy each way, is measured by
//! `horn-bench volume --data-tls` (docs/benchmarks.md).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::{LiveCredentials, NODE_NAME};

/// The ALPN protocol of the data wire, which a gRPC client cannot mistake for its own.
pub const DATA_ALPN: &[u8] = b"horn-data/1";

/// Each direction's buffer in a tunnel.
const SPLICE_BUF: usize = 256 << 10;

/// How long a TLS handshake may take.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// The tunnel thread's runtime: one a process, started at first use.
fn runtime() -> std::io::Result<tokio::runtime::Handle> {
    static HANDLE: Mutex<Option<tokio::runtime::Handle>> = Mutex::new(None);
    let mut h = HANDLE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(h) = h.as_ref() {
        return Ok(h.clone());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("data-tls".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))?;
    *h = Some(handle.clone());
    Ok(handle)
}

/// Carries bytes both ways between `a` and `b` until either closes.
async fn splice<A, B>(mut a: A, mut b: B)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    // Buffers large enough for a 1 MiB request in few reads and writes (the default
    // 8 KiB made a large I/O cost ten times the system calls).
    if let Err(e) = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, SPLICE_BUF, SPLICE_BUF).await {
        tracing::debug!(error = %e, "a data TLS tunnel closed");
    }
}

/// Serves the data wire over TLS on `public`, forwarding each connection's
/// plaintext to the data server on `inner` (loopback); with `credentials` (client
/// certificates from the cluster CA required). Runs on the tunnel thread.
pub fn serve_data_tls(
    public: std::net::TcpListener,
    inner: SocketAddr,
    credentials: LiveCredentials,
) -> std::io::Result<()> {
    public.set_nonblocking(true)?;
    let rt = runtime()?;
    let _entered = rt.enter();
    let listener = tokio::net::TcpListener::from_std(public)?;
    rt.spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a data TLS connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let config = match credentials.data_server_config() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "no TLS configuration for a data connection");
                    continue;
                }
            };
            tokio::spawn(async move {
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                let tls = match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return tracing::info!(%peer, error = %e, "a data TLS handshake failed"),
                    Err(_) => return tracing::info!(%peer, "a data TLS handshake took too long"),
                };
                match tokio::net::TcpStream::connect(inner).await {
                    Ok(plain) => {
                        let _ = plain.set_nodelay(true);
                        splice(tls, plain).await
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the data server behind the TLS tunnel is unreachable")
                    }
                }
            });
        }
    });
    Ok(())
}

/// The engine's side: a loopback address a replica, each carried over TLS.
pub struct DataTlsDialer {
    credentials: LiveCredentials,
    tunnels: Mutex<HashMap<SocketAddr, SocketAddr>>,
}

impl DataTlsDialer {
    /// A dialer presenting `credentials`, and checking each replica's certificate
    /// against their CA (as a node's).
    pub fn new(credentials: LiveCredentials) -> Arc<DataTlsDialer> {
        Arc::new(DataTlsDialer {
            credentials,
            tunnels: Mutex::new(HashMap::new()),
        })
    }

    /// The loopback address whose connections reach `replica`'s data wire over
    /// TLS; made at the first call for `replica`.
    pub fn local_for(&self, replica: SocketAddr) -> std::io::Result<SocketAddr> {
        let mut tunnels = self.tunnels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(local) = tunnels.get(&replica) {
            return Ok(*local);
        }
        let rt = runtime()?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let local = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let _entered = rt.enter();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let credentials = self.credentials.clone();
        rt.spawn(async move {
            loop {
                let Ok((plain, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let _ = plain.set_nodelay(true);
                let config = match credentials.data_client_config() {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(error = %e, "no TLS configuration for a data connection");
                        continue;
                    }
                };
                tokio::spawn(async move {
                    let connector = tokio_rustls::TlsConnector::from(config);
                    let name = ServerName::try_from(NODE_NAME).expect("a valid DNS name");
                    let tls = async {
                        let tcp = tokio::net::TcpStream::connect(replica).await?;
                        let _ = tcp.set_nodelay(true);
                        connector.connect(name, tcp).await
                    };
                    match tokio::time::timeout(HANDSHAKE, tls).await {
                        Ok(Ok(tls)) => splice(plain, tls).await,
                        // The engine's hello then fails on the closed connection,
                        // and the replica is counted unreachable.
                        Ok(Err(e)) => tracing::warn!(%replica, error = %e, "a data TLS connection failed"),
                        Err(_) => tracing::warn!(%replica, "a data TLS handshake took too long"),
                    }
                });
            }
        });
        tunnels.insert(replica, local);
        Ok(local)
    }
}

/// A blocking TLS session as the server on `tcp` (its timeouts bound the
/// handshake), with the credentials current now: a rebuild's layer stream from a
/// replica whose data wire is TLS.
pub fn accept_blocking(
    credentials: &LiveCredentials,
    mut tcp: std::net::TcpStream,
) -> std::io::Result<rustls::StreamOwned<rustls::ServerConnection, std::net::TcpStream>> {
    let config = credentials.data_server_config().map_err(std::io::Error::other)?;
    let mut conn = rustls::ServerConnection::new(config).map_err(std::io::Error::other)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    Ok(rustls::StreamOwned::new(conn, tcp))
}

/// A blocking TLS session as the client on `tcp`, checking the peer as a node of
/// the cluster: the asker's side of a layer stream.
pub fn connect_blocking(
    credentials: &LiveCredentials,
    mut tcp: std::net::TcpStream,
) -> std::io::Result<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>> {
    let config = credentials.data_client_config().map_err(std::io::Error::other)?;
    let name = ServerName::try_from(NODE_NAME).expect("a valid DNS name");
    let mut conn = rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    Ok(rustls::StreamOwned::new(conn, tcp))
}

impl LiveCredentials {
    /// The data wire's server configuration: [`DATA_ALPN`], client certificates
    /// required.
    fn data_server_config(&self) -> crate::Result<Arc<rustls::ServerConfig>> {
        crate::live::server_config_with(&self.current(), false, DATA_ALPN)
    }

    /// The data wire's client configuration: this certificate, and a replica's
    /// (a node's) checked against the CA.
    fn data_client_config(&self) -> crate::Result<Arc<rustls::ClientConfig>> {
        crate::live::client_config_with(&self.current(), DATA_ALPN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Ca, Role, Validity};
    use std::io::{Read, Write};

    /// An echo server on loopback behind the TLS side, reached through the dialer:
    /// bytes go through; a dialer of another CA gets nothing.
    #[test]
    fn bytes_cross_the_tunnel_and_a_stranger_gets_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("t").unwrap();
        let save = |name: &str, ca: &Ca, role: Role| {
            let d = dir.path().join(name);
            ca.issue(&role, &[], Validity::Days(1))
                .unwrap()
                .save(&d, "node")
                .unwrap();
            LiveCredentials::open(&d, "node").unwrap()
        };
        let server = save("s", &ca, Role::Node("n1".into()));
        let client = save("c", &ca, Role::Node("n2".into()));
        let stranger = save("x", &Ca::generate("other").unwrap(), Role::Node("n2".into()));

        let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let inner = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in echo.incoming() {
                let mut s = s.unwrap();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let public = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = public.local_addr().unwrap();
        serve_data_tls(public, inner, server).unwrap();

        let local = DataTlsDialer::new(client).local_for(addr).unwrap();
        let mut c = std::net::TcpStream::connect(local).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let msg = vec![0x5a; 100_000];
        c.write_all(&msg).unwrap();
        let mut back = vec![0; msg.len()];
        c.read_exact(&mut back).unwrap();
        assert_eq!(back, msg);

        let local = DataTlsDialer::new(stranger).local_for(addr).unwrap();
        let mut c = std::net::TcpStream::connect(local).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = c.write_all(b"hello");
        let mut buf = [0u8; 5];
        assert!(
            matches!(c.read(&mut buf), Ok(0) | Err(_)),
            "a stranger got an answer"
        );
    }
}
