//! Credentials that follow their files: a long-running service or client picks up a
//! renewed certificate (or a rolled CA) as soon as it is written, without a restart.
//!
//! - [`LiveCredentials`]: a holder's credentials in a directory, read again when
//!   its files change; a half-written or mismatched set is ignored until whole, so
//!   a reader keeps the last good one.
//! - [`serve_tls`]: the TLS side of a gRPC service, done here rather than by tonic
//!   (whose server configuration is fixed at start): every new connection's handshake
//!   uses the credentials current at that moment, and the peer's certificates still
//!   reach [`crate::peer_role`] through tonic's connection info.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::ClientTlsConfig;

use crate::{Credentials, PkiError, Result, CA_CERT};

/// How long a client may take over its TLS handshake before it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A holder's credentials in a directory, as they are now.
#[derive(Clone)]
pub struct LiveCredentials {
    dir: PathBuf,
    name: String,
    cached: Arc<Mutex<Cached>>,
}

struct Cached {
    /// The files' change times and sizes when `credentials` were read.
    stamp: Vec<Option<(SystemTime, u64)>>,
    credentials: Credentials,
    /// The server configuration made from them, with client certificates required
    /// (`[0]`) or optional (`[1]`), made when first asked for.
    server: [Option<Arc<rustls::ServerConfig>>; 2],
}

impl std::fmt::Debug for LiveCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LiveCredentials({}/{})", self.dir.display(), self.name)
    }
}

impl LiveCredentials {
    /// The credentials `name` in `dir` ([`Credentials::load`]); they must be there and
    /// whole now.
    pub fn open(dir: &Path, name: &str) -> Result<LiveCredentials> {
        let files = files(dir, name);
        let stamp = stamps(&files);
        let credentials = Credentials::load(dir, name)?;
        server_config(&credentials, false)?;
        Ok(LiveCredentials {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            cached: Arc::new(Mutex::new(Cached {
                stamp,
                credentials,
                server: [None, None],
            })),
        })
    }

    /// Where they are kept.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Their name in [`LiveCredentials::dir`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The credentials as their files hold them now (the last whole set read).
    pub fn current(&self) -> Credentials {
        self.refreshed(|c| c.credentials.clone())
    }

    /// A client's TLS with the current credentials ([`Credentials::client_tls`]).
    pub fn client_tls(&self, server: &str) -> ClientTlsConfig {
        self.current().client_tls(server)
    }

    /// Replaces them with `credentials`, written to their files.
    pub fn replace(&self, credentials: &Credentials) -> Result<()> {
        server_config(credentials, false)?;
        credentials.save(&self.dir, &self.name)?;
        let mut c = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        c.stamp = stamps(&files(&self.dir, &self.name));
        c.credentials = credentials.clone();
        c.server = [None, None];
        Ok(())
    }

    fn server_config(&self, optional: bool) -> Result<Arc<rustls::ServerConfig>> {
        let slot = usize::from(optional);
        let cached = self.refreshed(|c| c.server[slot].clone());
        if let Some(s) = cached {
            return Ok(s);
        }
        let credentials = self.current();
        let made = server_config(&credentials, optional)?;
        let mut c = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        c.server[slot] = Some(made.clone());
        Ok(made)
    }

    /// Reads the files again if they changed since the last read, then `f` of what
    /// is cached. A set that does not load or does not make a server configuration
    /// (a renewal half written) is left for the next time.
    fn refreshed<T>(&self, f: impl FnOnce(&Cached) -> T) -> T {
        let files = files(&self.dir, &self.name);
        let now = stamps(&files);
        let mut c = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if now != c.stamp {
            match Credentials::load(&self.dir, &self.name)
                .and_then(|fresh| server_config(&fresh, false).map(|_| fresh))
            {
                Ok(fresh) => {
                    tracing::info!(dir = %self.dir.display(), name = %self.name, "credentials changed on disk: using the new ones");
                    c.stamp = now;
                    c.credentials = fresh;
                    c.server = [None, None];
                }
                Err(e) => {
                    tracing::debug!(error = %e, "credentials changing on disk; keeping the last whole set")
                }
            }
        }
        f(&c)
    }
}

fn files(dir: &Path, name: &str) -> [PathBuf; 3] {
    [
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
        dir.join(CA_CERT),
    ]
}

fn stamps(files: &[PathBuf]) -> Vec<Option<(SystemTime, u64)>> {
    files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

fn invalid(what: &str) -> impl FnOnce(rustls::Error) -> PkiError + '_ {
    move |e| PkiError::Invalid(format!("{what}: {e}"))
}

/// ring's provider, as tonic's own TLS (`tls-ring`) uses: rustls deprecates it for
/// lacking post-quantum key exchange, which only aws-lc-rs (C, built with cmake)
/// offers today.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The CAs of `c.ca_pem` (several while a CA is rolled).
fn roots(c: &Credentials) -> Result<Arc<rustls::RootCertStore>> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(c.ca_pem.as_bytes()) {
        let ca = ca.map_err(|e| PkiError::Invalid(format!("the CA certificate is malformed: {e}")))?;
        roots.add(ca).map_err(invalid("the CA certificate is refused"))?;
    }
    Ok(Arc::new(roots))
}

/// `c`'s certificate chain and key.
fn identity(c: &Credentials) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let chain = CertificateDer::pem_slice_iter(c.cert_pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Invalid(format!("the certificate is malformed: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes())
        .map_err(|e| PkiError::Invalid(format!("the key is malformed: {e}")))?;
    Ok((chain, key))
}

/// A rustls server configuration from `c`: its certificate and key, client
/// certificates from any CA in `c.ca_pem` (several while a CA is rolled), required
/// unless `optional`; HTTP/2 only, as gRPC speaks.
fn server_config(c: &Credentials, optional: bool) -> Result<Arc<rustls::ServerConfig>> {
    server_config_with(c, optional, b"h2")
}

/// [`server_config`] for protocol `alpn`.
pub(crate) fn server_config_with(
    c: &Credentials,
    optional: bool,
    alpn: &[u8],
) -> Result<Arc<rustls::ServerConfig>> {
    let provider = provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(c)?, provider.clone());
    let verifier = if optional {
        verifier.allow_unauthenticated()
    } else {
        verifier
    }
    .build()
    .map_err(|e| PkiError::Invalid(format!("no client verifier from the CA: {e}")))?;
    let (chain, key) = identity(c)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(invalid("no TLS versions"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(invalid("the certificate and key do not make a server identity"))?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

/// A rustls client configuration from `c`: its certificate and key, a server's
/// checked against the CAs of `c.ca_pem`; for protocol `alpn`.
pub(crate) fn client_config_with(c: &Credentials, alpn: &[u8]) -> Result<Arc<rustls::ClientConfig>> {
    let (chain, key) = identity(c)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(invalid("no TLS versions"))?
        .with_root_certificates(roots(c)?)
        .with_client_auth_cert(chain, key)
        .map_err(invalid("the certificate and key do not make a client identity"))?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

/// A server's TLS: these credentials, with client certificates required unless
/// `optional` (where a service has calls open to clients without one).
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The server's credentials.
    pub credentials: LiveCredentials,
    /// Whether a client may come without a certificate.
    pub optional: bool,
}

/// The TLS connections to serve from `listener`, each handshaken with the
/// credentials current when it arrived; handshakes run side by side (one slow client
/// holds up no other), and failed ones are logged and dropped. For tonic's
/// `serve_with_incoming`.
pub fn serve_tls(
    listener: tokio::net::TcpListener,
    tls: ServerTls,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>>
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a control connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let config = match tls.credentials.server_config(tls.optional) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "no TLS configuration for a new connection");
                    continue;
                }
            };
            let handed = tx.clone();
            tokio::spawn(async move {
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = handed.send(Ok(stream)).await;
                    }
                    // A peer that connects and closes (a probe that the port
                    // listens) is no news.
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        tracing::debug!(%peer, "a connection closed before its TLS handshake")
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "a TLS handshake failed"),
                    Err(_) => tracing::info!(%peer, "a TLS handshake took too long"),
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Ca, Role, Validity};

    #[test]
    fn a_renewal_on_disk_is_picked_up_and_a_half_written_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("t").unwrap();
        let first = ca
            .issue(&Role::Node("n1".into()), &[], Validity::Days(1))
            .unwrap();
        first.save(dir.path(), "node").unwrap();
        let live = LiveCredentials::open(dir.path(), "node").unwrap();
        assert_eq!(live.current().cert_pem, first.cert_pem);

        // A new certificate written without its key yet: the old set is kept.
        let second = ca
            .issue(&Role::Node("n1".into()), &[], Validity::Days(2))
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(dir.path().join("node.pem"), &second.cert_pem).unwrap();
        assert_eq!(live.current().cert_pem, first.cert_pem);
        // Its key arrives: the new set is used.
        std::fs::write(dir.path().join("node.key"), &second.key_pem).unwrap();
        assert_eq!(live.current().cert_pem, second.cert_pem);
        assert!(live.server_config(false).is_ok());
    }
}
