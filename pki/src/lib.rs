//! # horn-pki: the cluster's identity
//!
//! Every gRPC service of a cluster speaks mutual TLS, with certificates signed by the
//! cluster's own CA, and every certificate says what its holder may do: its [`Role`],
//! as a URI in its subject alternative names (`horn:role:admin`, `horn:node:n1`).
//! - [`Ca`]: the cluster CA. `hornctl cluster init` makes it; its key stays in the
//!   manager's directory and signs every other certificate.
//! - [`Credentials`]: a holder's certificate, its key and the CA's certificate, as
//!   files in a directory (`NAME.pem`, `NAME.key` (0600), `ca.pem`), and the TLS
//!   configuration of a server or a client made from them.
//! - [`peer_role`]: the role of the peer of a call, from the certificate it presented.
//! - [`LiveCredentials`] and [`serve_tls`] (`live.rs`): credentials that follow their
//!   files, so that a renewed certificate or a rolled CA takes effect without a restart.
//!
//! Departures from the chosen crates: `rcgen` makes keys, certificates and signing
//! requests (the brief names it); `x509-parser` reads the role back from a peer's
//! certificate, which rustls has already verified; tonic's `tls-ring` feature brings
//! rustls with ring, so no OpenSSL.

mod live;
mod rotation;
mod tunnel;
pub use live::{serve_tls, LiveCredentials, ServerTls};
pub use rotation::{issuer_of_der, Rotation};
pub use tunnel::{accept_blocking, connect_blocking, serve_data_tls, DataTlsDialer, DATA_ALPN};

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The DNS name every manager certificate carries, which clients check.
pub const MANAGER_NAME: &str = "manager.horn";
/// The DNS name every node certificate carries, which clients of a node's services
/// check.
pub const NODE_NAME: &str = "node.horn";

/// How long a certificate the CA issues is valid, by default.
pub const LEAF_DAYS: i64 = 365;
/// How long the CA's own certificate is valid.
pub const CA_DAYS: i64 = 3650;

/// What a certificate's holder may do.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Role {
    /// Everything (`hornctl` of the cluster's operator).
    Admin,
    /// Listing and reading, nothing that changes the cluster.
    ReadOnly,
    /// The manager itself (its server certificate).
    Manager,
    /// The node agent of this node, and the engines and replicas it runs.
    Node(String),
}

impl Role {
    /// The URI that carries the role in a certificate.
    pub fn uri(&self) -> String {
        match self {
            Role::Admin => "horn:role:admin".into(),
            Role::ReadOnly => "horn:role:read-only".into(),
            Role::Manager => "horn:role:manager".into(),
            Role::Node(n) => format!("horn:node:{n}"),
        }
    }

    /// The role a URI names, if it names one.
    pub fn from_uri(uri: &str) -> Option<Role> {
        match uri {
            "horn:role:admin" => Some(Role::Admin),
            "horn:role:read-only" => Some(Role::ReadOnly),
            "horn:role:manager" => Some(Role::Manager),
            _ => uri
                .strip_prefix("horn:node:")
                .filter(|n| !n.is_empty())
                .map(|n| Role::Node(n.to_string())),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Admin => f.write_str("admin"),
            Role::ReadOnly => f.write_str("read-only"),
            Role::Manager => f.write_str("manager"),
            Role::Node(n) => write!(f, "node {n}"),
        }
    }
}

/// What went wrong making, reading or checking credentials.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A key or certificate could not be made or parsed.
    #[error("{what}: {source}")]
    Cert {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    /// A file could not be read or written.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Something else, in words.
    #[error("{0}")]
    Invalid(String),
}

type Result<T> = std::result::Result<T, PkiError>;

fn cert_err(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> PkiError {
    let what = what.into();
    move |source| PkiError::Cert { what, source }
}

/// When a certificate is valid: from a minute ago (clocks differ a little) for
/// `days`; tests make expired ones with [`Validity::Between`].
#[derive(Debug, Clone, Copy)]
pub enum Validity {
    /// From a minute ago, for this many days.
    Days(i64),
    /// From a minute ago, for this long.
    For(std::time::Duration),
    /// Exactly between these instants.
    Between(OffsetDateTime, OffsetDateTime),
}

impl Validity {
    fn range(self) -> (OffsetDateTime, OffsetDateTime) {
        match self {
            Validity::Days(d) => {
                let now = OffsetDateTime::now_utc();
                (now - time::Duration::minutes(1), now + time::Duration::days(d))
            }
            Validity::For(d) => {
                let now = OffsetDateTime::now_utc();
                let d = time::Duration::try_from(d).unwrap_or(time::Duration::days(CA_DAYS));
                (now - time::Duration::minutes(1), now + d)
            }
            Validity::Between(a, b) => (a, b),
        }
    }
}

/// The cluster's CA: the certificate and key it signs with, and the certificates
/// every holder trusts (the signer's alone, or the old and new CA's while a CA is
/// rolled: see `rotation.rs`), in PEM.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    trust_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca(..)")
    }
}

/// The CA's files in a directory.
pub const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";

impl Ca {
    /// A new CA for cluster `cluster`.
    pub fn generate(cluster: &str) -> Result<Ca> {
        let key = KeyPair::generate().map_err(cert_err("cannot make the CA's key"))?;
        let mut params = CertificateParams::default();
        // A tag of the key's own makes each CA's name its own, so that which CA
        // issued a certificate can be told from its issuer's name (as a rolled CA's
        // progress is).
        let tag: String = key
            .public_key_raw()
            .iter()
            .take(4)
            .map(|b| format!("{b:02x}"))
            .collect();
        params.distinguished_name = name(&format!("Horn cluster {cluster} CA {tag}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        (params.not_before, params.not_after) = Validity::Days(CA_DAYS).range();
        let cert = params
            .self_signed(&key)
            .map_err(cert_err("cannot sign the CA's certificate"))?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            trust_pem: cert.pem(),
        })
    }

    /// Writes the CA to `dir` (`ca.pem`, and `ca.key` readable by its owner only);
    /// refused if one is there.
    pub fn save(&self, dir: &Path) -> Result<()> {
        write_new(&dir.join(CA_CERT), self.trust_pem.as_bytes(), 0o644)?;
        write_new(&dir.join(CA_KEY), self.key_pem.as_bytes(), 0o600)
    }

    /// The CA in `dir`: it signs with `ca.key` and the certificate of `ca.pem` that
    /// matches it, and holders trust all of `ca.pem`.
    pub fn load(dir: &Path) -> Result<Ca> {
        Ca::load_signer(dir, CA_KEY)
    }

    /// The CA of `dir` that signs with key file `key`.
    fn load_signer(dir: &Path, key: &str) -> Result<Ca> {
        let trust_pem = read(&dir.join(CA_CERT))?;
        let key_pem = read(&dir.join(key))?;
        let cert_pem = rotation::matching_cert(&trust_pem, &key_pem)?;
        Ok(Ca {
            cert_pem,
            key_pem,
            trust_pem,
        })
    }

    /// The certificates a holder trusts (the CA's; the old and new CA's while a CA
    /// is rolled), in PEM: what goes in every holder's `ca.pem`.
    pub fn trust_pem(&self) -> &str {
        &self.trust_pem
    }

    /// The name of the CA that signs, as the certificates it issues name their
    /// issuer.
    pub fn subject(&self) -> Result<String> {
        rotation::subjects(&self.cert_pem)?
            .pop()
            .ok_or_else(|| PkiError::Invalid("the CA's certificate is missing".into()))
    }

    /// New credentials for `role`, with a key made here, valid for `validity`.
    pub fn issue(&self, role: &Role, ips: &[IpAddr], validity: Validity) -> Result<Credentials> {
        let key = KeyPair::generate().map_err(cert_err("cannot make a key"))?;
        let cert_pem = self.sign(role, ips, validity, &key)?;
        Ok(Credentials {
            cert_pem,
            key_pem: key.serialize_pem(),
            ca_pem: self.trust_pem.clone(),
        })
    }

    /// A certificate for `role` on the public key of the signing request `csr_pem`
    /// (its holder made the key and keeps it). Nothing else of the request is taken:
    /// the role and names are the CA's to give.
    pub fn sign_request(
        &self,
        csr_pem: &str,
        role: &Role,
        ips: &[IpAddr],
        validity: Validity,
    ) -> Result<String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(cert_err("the certificate signing request is malformed"))?;
        self.sign(role, ips, validity, &csr.public_key)
    }

    fn sign(
        &self,
        role: &Role,
        ips: &[IpAddr],
        validity: Validity,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<String> {
        let ca_key = KeyPair::from_pem(&self.key_pem).map_err(cert_err("the CA's key is unreadable"))?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, ca_key)
            .map_err(cert_err("the CA's certificate is unreadable"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&format!("Horn {role}"));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let ia5 = |s: String| s.try_into().map_err(cert_err("a name is not ASCII"));
        let mut sans = vec![SanType::URI(ia5(role.uri())?)];
        match role {
            Role::Manager => sans.push(SanType::DnsName(ia5(MANAGER_NAME.into())?)),
            Role::Node(n) => {
                sans.push(SanType::DnsName(ia5(NODE_NAME.into())?));
                sans.push(SanType::DnsName(ia5(format!("{n}.{NODE_NAME}"))?));
            }
            Role::Admin | Role::ReadOnly => {}
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.subject_alt_names = sans;
        (params.not_before, params.not_after) = validity.range();
        let cert = params
            .signed_by(public_key, &issuer)
            .map_err(cert_err(format!("cannot sign a certificate for {role}")))?;
        Ok(cert.pem())
    }
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// A new key and a signing request for it, as a holder sends it to the CA: the key
/// (PEM, to keep) and the request (PEM, to send).
pub fn key_and_request() -> Result<(String, String)> {
    let key = KeyPair::generate().map_err(cert_err("cannot make a key"))?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .map_err(cert_err("cannot make a signing request"))?;
    let csr = csr.pem().map_err(cert_err("cannot encode a signing request"))?;
    Ok((key.serialize_pem(), csr))
}

/// A holder's certificate and key, and the CA's certificate it trusts.
#[derive(Clone)]
pub struct Credentials {
    /// Its certificate, PEM.
    pub cert_pem: String,
    /// Its key, PEM.
    pub key_pem: String,
    /// The cluster CA's certificate, PEM.
    pub ca_pem: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({:?})", self.role().map(|r| r.to_string()))
    }
}

impl Credentials {
    /// The credentials `name` in `dir`: `NAME.pem`, `NAME.key` and `ca.pem`.
    pub fn load(dir: &Path, name: &str) -> Result<Credentials> {
        Ok(Credentials {
            cert_pem: read(&dir.join(format!("{name}.pem")))?,
            key_pem: read(&dir.join(format!("{name}.key")))?,
            ca_pem: read(&dir.join(CA_CERT))?,
        })
    }

    /// Writes them to `dir` as `name` (the key readable by its owner only), replacing
    /// what is there.
    pub fn save(&self, dir: &Path, name: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            op: "create",
            path: dir.to_path_buf(),
            source,
        })?;
        write_replace(&dir.join(CA_CERT), self.ca_pem.as_bytes(), 0o644)?;
        write_replace(&dir.join(format!("{name}.key")), self.key_pem.as_bytes(), 0o600)?;
        write_replace(&dir.join(format!("{name}.pem")), self.cert_pem.as_bytes(), 0o644)
    }

    /// The role its certificate carries.
    pub fn role(&self) -> Result<Role> {
        let der = pem_der(&self.cert_pem)?;
        role_of(&der).ok_or_else(|| PkiError::Invalid("the certificate carries no Horn role".into()))
    }

    /// Until when its certificate is valid.
    pub fn not_after(&self) -> Result<OffsetDateTime> {
        Ok(self.validity()?.1)
    }

    /// The name of the CA that issued its certificate.
    pub fn issuer(&self) -> Result<String> {
        let der = pem_der(&self.cert_pem)?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| PkiError::Invalid(format!("the certificate is malformed: {e}")))?;
        Ok(cert.issuer().to_string())
    }

    /// The names of the CAs it trusts (its `ca.pem`).
    pub fn trusted(&self) -> Result<Vec<String>> {
        rotation::subjects(&self.ca_pem)
    }

    /// From and until when its certificate is valid.
    pub fn validity(&self) -> Result<(OffsetDateTime, OffsetDateTime)> {
        let der = pem_der(&self.cert_pem)?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| PkiError::Invalid(format!("the certificate is malformed: {e}")))?;
        let v = cert.validity();
        Ok((v.not_before.to_datetime(), v.not_after.to_datetime()))
    }

    /// Whether its certificate is due for renewal at `now`: when less than a third
    /// of its lifetime is left (four months of a year's certificate), so a holder
    /// that misses a few tries still renews in time.
    pub fn renewal_due(&self, now: OffsetDateTime) -> Result<bool> {
        let (from, until) = self.validity()?;
        Ok(now >= until - (until - from) / 3)
    }

    /// [`Credentials::renewal_due`] now.
    pub fn renewal_due_now(&self) -> Result<bool> {
        self.renewal_due(OffsetDateTime::now_utc())
    }

    /// A server's TLS: this certificate, and client certificates from the CA.
    /// Clients without one get through the handshake (`optional`) only where a
    /// service has calls open to them (a node's join); [`peer_role`] refuses them
    /// everywhere else.
    pub fn server_tls(&self, optional: bool) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(optional)
    }

    /// A client's TLS: this certificate, and a server certificate from the CA naming
    /// `server` ([`MANAGER_NAME`], [`NODE_NAME`]).
    pub fn client_tls(&self, server: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(server)
    }
}

/// A client's TLS with no certificate of its own (a node joining): it checks the
/// server against `ca_pem`.
pub fn anonymous_client_tls(ca_pem: &str, server: &str) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(server)
}

/// The role in a certificate (DER), if it carries one.
pub fn role_of(der: &[u8]) -> Option<Role> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Role::from_uri(u),
        _ => None,
    })
}

/// The role of the peer of a call, from the certificate it presented (TLS has
/// verified it against the CA); refused, in words, when it presented none or one
/// without a role.
pub fn peer_role<T>(req: &tonic::Request<T>) -> std::result::Result<Role, tonic::Status> {
    let certs = req.peer_certs().ok_or_else(|| {
        tonic::Status::unauthenticated(
            "this service takes calls only with a client certificate from the cluster's CA; none was presented",
        )
    })?;
    let leaf = certs
        .first()
        .ok_or_else(|| tonic::Status::unauthenticated("the client presented an empty certificate chain"))?;
    role_of(leaf).ok_or_else(|| {
        tonic::Status::permission_denied(
            "the client's certificate carries no Horn role (horn:role:... or horn:node:...)",
        )
    })
}

/// Who may make which call of a service: given the call's path
/// (`/package.Service/Method`) and the caller's role (`None`: it presented no
/// certificate with one), `Ok` or the refusal.
pub type Policy =
    std::sync::Arc<dyn Fn(&str, Option<&Role>) -> std::result::Result<(), tonic::Status> + Send + Sync>;

/// A gRPC service behind its [`Policy`]: every call is checked before it reaches the
/// service, in one place, and the caller's [`Role`] goes in the request's extensions
/// for calls that check more (a node acting for itself only).
#[derive(Clone)]
pub struct Guarded<S> {
    inner: S,
    policy: Policy,
}

impl<S> Guarded<S> {
    /// `inner`, checked by `policy`.
    pub fn new(inner: S, policy: Policy) -> Guarded<S> {
        Guarded { inner, policy }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for Guarded<S>
where
    S: tonic::codegen::Service<
            tonic::codegen::http::Request<B>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Send,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::result::Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: tonic::codegen::http::Request<B>) -> Self::Future {
        use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
        let role = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|i| i.peer_certs())
            .and_then(|certs| certs.first().and_then(|c| role_of(c)));
        match (self.policy)(req.uri().path(), role.as_ref()) {
            Ok(()) => {
                if let Some(r) = role {
                    req.extensions_mut().insert(r);
                }
                Box::pin(self.inner.call(req))
            }
            Err(status) => {
                tracing::warn!(call = %req.uri().path(), role = ?role, reason = %status.message(), "refused a call");
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// The refusal of a call that needs a role the caller lacks.
pub fn refuse(path: &str, role: Option<&Role>, needs: &str) -> tonic::Status {
    match role {
        None => tonic::Status::unauthenticated(format!(
            "{path} takes calls only with a client certificate from the cluster's CA ({needs}); none was presented"
        )),
        Some(r) => tonic::Status::permission_denied(format!("{path} needs {needs}; the caller's certificate is for {r}")),
    }
}

/// The role the [`Guarded`] service put in a call's extensions.
pub fn caller_role<T>(req: &tonic::Request<T>) -> Option<&Role> {
    req.extensions().get::<Role>()
}

fn pem_der(pem: &str) -> Result<Vec<u8>> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map(|(_, p)| p.contents)
        .map_err(|e| PkiError::Invalid(format!("the certificate is not PEM: {e}")))
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        op: "read",
        path: path.to_path_buf(),
        source,
    })
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    write_with(path, bytes, mode, true)
}

fn write_replace(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    write_with(path, bytes, mode, false)
}

fn write_with(path: &Path, bytes: &[u8], mode: u32, new: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |op| {
        move |source| PkiError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    // A new file, renamed over the old one: a reader never sees half a key.
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io("create"))?;
    f.write_all(bytes).map_err(io("write"))?;
    f.sync_all().map_err(io("sync"))?;
    if new && path.exists() {
        let _ = std::fs::remove_file(&tmp);
        return Err(PkiError::Invalid(format!("{} exists already", path.display())));
    }
    std::fs::rename(&tmp, path).map_err(io("rename"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_through_certificates() {
        let ca = Ca::generate("c1").unwrap();
        for role in [
            Role::Admin,
            Role::ReadOnly,
            Role::Manager,
            Role::Node("n7".into()),
        ] {
            let c = ca.issue(&role, &[], Validity::Days(1)).unwrap();
            assert_eq!(c.role().unwrap(), role);
            assert!(c.not_after().unwrap() > OffsetDateTime::now_utc());
        }
        assert_eq!(Role::from_uri("horn:node:"), None);
        assert_eq!(Role::from_uri("horn:role:root"), None);
    }

    #[test]
    fn a_signing_request_gets_the_role_the_ca_gives_not_one_it_asks_for() {
        let ca = Ca::generate("c1").unwrap();
        let (key, csr) = key_and_request().unwrap();
        let cert = ca
            .sign_request(&csr, &Role::Node("n1".into()), &[], Validity::Days(1))
            .unwrap();
        let c = Credentials {
            cert_pem: cert,
            key_pem: key,
            ca_pem: ca.trust_pem().into(),
        };
        assert_eq!(c.role().unwrap(), Role::Node("n1".into()));
        assert!(ca
            .sign_request("not a request", &Role::Admin, &[], Validity::Days(1))
            .is_err());
    }

    #[test]
    fn credentials_are_saved_with_a_private_key_and_the_ca_once() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("c1").unwrap();
        ca.save(dir.path()).unwrap();
        assert!(ca.save(dir.path()).is_err(), "a second CA over the first");
        let mode = |f: &str| {
            std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("ca.key"), 0o600);
        let admin = ca.issue(&Role::Admin, &[], Validity::Days(1)).unwrap();
        admin.save(dir.path(), "admin").unwrap();
        assert_eq!(mode("admin.key"), 0o600);
        let back = Credentials::load(dir.path(), "admin").unwrap();
        assert_eq!(back.role().unwrap(), Role::Admin);
        assert_eq!(Ca::load(dir.path()).unwrap().trust_pem(), ca.trust_pem());
    }
}
