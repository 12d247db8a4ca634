//! Who may talk to a replica: the volume's secret, the key of each generation, and
//! the proofs made with them (`docs/security.md`, "The data path").
//!
//! A replica that is given its volume's [`VolumeSecret`] takes data and control
//! requests only from a peer that proves it holds the [`GenerationKey`] of the
//! generation it acts at, and never from one whose generation the replica has left
//! behind:
//! - the **generation key** is HMAC-SHA256 of the volume secret over the generation.
//!   A manager hands an engine the key of the generation it began, and never the
//!   volume secret, so an engine that has been replaced holds a key that only ever
//!   speaks for an old generation, which every replica refuses;
//! - on the **data wire**, a connection starts with a mutual challenge–response
//!   ([`Challenge`]): the engine sends a nonce with its hello, the replica answers with
//!   its own nonce and a proof over both, and the engine proves itself over the same
//!   nonces before anything but a ping is served. Each side thus knows the other holds
//!   the key, and a recorded handshake is worth nothing on a new connection;
//! - on the **control service**, every call carries [`AUTH_HEADER`]: the generation
//!   and a proof bound to it and to the engine named in the call ([`control_proof`]).
//!
//! Without encryption of the wire (`--data-tls`), an attacker who can read the traffic
//! sees the data and the control proofs; authentication keeps out every peer that
//! can only connect. Keys are compared in constant time.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of a nonce, a proof and a key.
pub const LEN: usize = 32;

/// gRPC metadata key of a control call's proof: `GENERATION:HEX`, where HEX is
/// [`control_proof`] of the generation's key and the engine named in the call.
pub const AUTH_HEADER: &str = "horn-auth";

const GENERATION_LABEL: &[u8] = b"horn/1 generation key";
const REPLICA_LABEL: &[u8] = b"horn/1 replica proof";
const ENGINE_LABEL: &[u8] = b"horn/1 engine proof";
const CONTROL_LABEL: &[u8] = b"horn/1 control proof";

/// Why a secret or a proof is not good.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// A secret of the wrong size or form.
    #[error("a volume secret is 32 bytes, raw or as 64 hex digits; this one is {0}")]
    BadSecret(String),
    /// A proof that does not verify.
    #[error("{0}")]
    Refused(String),
}

/// The secret of one volume, held by its replicas (and by a manager, or a standalone
/// engine), never by a replica's disk.
#[derive(Clone, PartialEq, Eq)]
pub struct VolumeSecret([u8; LEN]);

impl std::fmt::Debug for VolumeSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VolumeSecret(..)")
    }
}

impl VolumeSecret {
    /// A new random secret.
    pub fn generate() -> std::io::Result<VolumeSecret> {
        Ok(VolumeSecret(random()?))
    }

    /// The secret in `bytes`: 32 raw bytes, or 64 hex digits (surrounding whitespace
    /// ignored).
    pub fn from_bytes(bytes: &[u8]) -> Result<VolumeSecret, AuthError> {
        if bytes.len() == LEN {
            return Ok(VolumeSecret(bytes.try_into().expect("checked length")));
        }
        let text = std::str::from_utf8(bytes)
            .map(str::trim)
            .map_err(|_| AuthError::BadSecret(format!("{} bytes of binary", bytes.len())))?;
        from_hex(text).map(VolumeSecret).ok_or_else(|| {
            AuthError::BadSecret(format!(
                "{} characters that are not {} hex digits",
                text.len(),
                LEN * 2
            ))
        })
    }

    /// Reads the secret from the file at `path`.
    pub fn read(path: &std::path::Path) -> Result<VolumeSecret, String> {
        let bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read the volume secret {}: {e}", path.display()))?;
        VolumeSecret::from_bytes(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The secret's 32 bytes (for an agent's secret file).
    pub fn as_bytes(&self) -> &[u8; LEN] {
        &self.0
    }

    /// The secret as 64 hex digits (for a manager's store and a secret file).
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// The key of generation `generation`.
    pub fn generation_key(&self, generation: u64) -> GenerationKey {
        GenerationKey {
            generation,
            key: mac(&self.0, &[GENERATION_LABEL, &generation.to_le_bytes()]),
        }
    }
}

/// The key an engine uses at one generation, derived from the volume secret.
#[derive(Clone, PartialEq, Eq)]
pub struct GenerationKey {
    generation: u64,
    key: [u8; LEN],
}

impl std::fmt::Debug for GenerationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GenerationKey(generation {})", self.generation)
    }
}

impl GenerationKey {
    /// The key as a manager hands it over: its generation and 32 bytes.
    pub fn from_parts(generation: u64, key: &[u8]) -> Result<GenerationKey, AuthError> {
        let key = key
            .try_into()
            .map_err(|_| AuthError::BadSecret(format!("a generation key of {} bytes", key.len())))?;
        Ok(GenerationKey { generation, key })
    }

    /// The generation this key speaks for.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The key's bytes (for a manager's reply).
    pub fn bytes(&self) -> &[u8; LEN] {
        &self.key
    }

    /// The [`AUTH_HEADER`] value of a control call by `engine`.
    pub fn control_header(&self, engine: &str) -> String {
        format!("{}:{}", self.generation, hex(&control_proof(self, engine)))
    }
}

/// The proof a control call by `engine` carries at `key`'s generation.
pub fn control_proof(key: &GenerationKey, engine: &str) -> [u8; LEN] {
    mac(&key.key, &[CONTROL_LABEL, engine.as_bytes()])
}

/// Checks an [`AUTH_HEADER`] value of a call naming `engine` against `secret`, and
/// returns the generation it proves.
pub fn check_control(secret: &VolumeSecret, header: Option<&str>, engine: &str) -> Result<u64, AuthError> {
    let header = header.ok_or_else(|| {
        AuthError::Refused(format!(
            "this replica takes control calls only with its volume's proof (the {AUTH_HEADER} header); none was given"
        ))
    })?;
    let bad = || AuthError::Refused(format!("the {AUTH_HEADER} header is not GENERATION:PROOF"));
    let (generation, proof) = header.split_once(':').ok_or_else(bad)?;
    let generation: u64 = generation.parse().map_err(|_| bad())?;
    let proof = from_hex(proof).ok_or_else(bad)?;
    let key = secret.generation_key(generation);
    if !equal(&control_proof(&key, engine), &proof) {
        return Err(AuthError::Refused(format!(
            "the control call's proof for generation {generation} is wrong: the caller does not hold that generation's key of this volume"
        )));
    }
    Ok(generation)
}

/// One side's view of a data-wire handshake: the two nonces and the engine's identity,
/// over which both proofs are made.
#[derive(Debug, Clone)]
pub struct Challenge {
    /// The engine's nonce, sent with its hello.
    pub engine_nonce: [u8; LEN],
    /// The replica's nonce, sent with its answer.
    pub replica_nonce: [u8; LEN],
    /// The engine's identity, as named in the hello.
    pub identity: Vec<u8>,
}

impl Challenge {
    /// The replica's proof that it holds `key`.
    pub fn replica_proof(&self, key: &GenerationKey) -> [u8; LEN] {
        self.proof(key, REPLICA_LABEL)
    }

    /// The engine's proof that it holds `key`.
    pub fn engine_proof(&self, key: &GenerationKey) -> [u8; LEN] {
        self.proof(key, ENGINE_LABEL)
    }

    fn proof(&self, key: &GenerationKey, label: &[u8]) -> [u8; LEN] {
        mac(
            &key.key,
            &[label, &self.engine_nonce, &self.replica_nonce, &self.identity],
        )
    }
}

/// Do `a` and `b` hold the same bytes? In time that does not depend on where they
/// differ.
pub fn equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh random nonce (or key) from the kernel.
pub fn random() -> std::io::Result<[u8; LEN]> {
    let mut b = [0u8; LEN];
    // SAFETY: getrandom writes at most b.len() bytes into the live array.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != LEN as isize {
        return Err(std::io::Error::last_os_error());
    }
    Ok(b)
}

fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; LEN] {
    let mut m = <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC takes a key of any length");
    for p in parts {
        // Each part's length first, so that parts cannot slide into each other.
        m.update(&(p.len() as u64).to_le_bytes());
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn from_hex(s: &str) -> Option<[u8; LEN]> {
    if s.len() != LEN * 2 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; LEN];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

/// How a control client gets the TLS configuration of a new connection: asked
/// afresh at each connect, so that credentials renewed on disk take effect in a
/// long-running engine or replica without a restart (the manager makes these from
/// the node's live credentials).
#[derive(Clone)]
pub struct ClientTls(std::sync::Arc<dyn Fn() -> tonic::transport::ClientTlsConfig + Send + Sync>);

impl ClientTls {
    /// The configuration `make` returns at each connect.
    pub fn new(make: impl Fn() -> tonic::transport::ClientTlsConfig + Send + Sync + 'static) -> ClientTls {
        ClientTls(std::sync::Arc::new(make))
    }

    /// Always `config`.
    pub fn fixed(config: tonic::transport::ClientTlsConfig) -> ClientTls {
        ClientTls::new(move || config.clone())
    }

    /// The configuration for a connection made now.
    pub fn config(&self) -> tonic::transport::ClientTlsConfig {
        (self.0)()
    }
}

/// Where an engine connects for a replica's data wire: the local end of a TLS
/// tunnel to it (`--data-tls`), given the replica's address.
#[derive(Clone)]
pub struct DataDial(
    std::sync::Arc<dyn Fn(std::net::SocketAddr) -> std::io::Result<std::net::SocketAddr> + Send + Sync>,
);

impl DataDial {
    /// The address `route` gives for each replica.
    pub fn new(
        route: impl Fn(std::net::SocketAddr) -> std::io::Result<std::net::SocketAddr> + Send + Sync + 'static,
    ) -> DataDial {
        DataDial(std::sync::Arc::new(route))
    }

    /// Where to connect for `replica`.
    pub fn route(&self, replica: std::net::SocketAddr) -> std::io::Result<std::net::SocketAddr> {
        (self.0)(replica)
    }
}

impl std::fmt::Debug for DataDial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataDial(..)")
    }
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(b: u8) -> VolumeSecret {
        VolumeSecret([b; LEN])
    }

    #[test]
    fn hmac_sha256_matches_rfc_4231_case_2() {
        // Our framing adds lengths, so check the primitive itself once.
        let mut m = <HmacSha256 as KeyInit>::new_from_slice(b"Jefe").unwrap();
        m.update(b"what do ya want for nothing?");
        let got: [u8; LEN] = m.finalize().into_bytes().into();
        assert_eq!(
            hex(&got),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn each_generation_has_its_own_key_and_proofs_bind_it() {
        let s = secret(7);
        let (k1, k2) = (s.generation_key(1), s.generation_key(2));
        assert_ne!(k1.bytes(), k2.bytes());
        assert_eq!(k1, s.generation_key(1));
        assert_ne!(secret(8).generation_key(1), k1);
        let header = k2.control_header("engine-a");
        assert_eq!(check_control(&s, Some(&header), "engine-a"), Ok(2));
        // Another engine's name, another volume's secret, a forged generation, none.
        assert!(check_control(&s, Some(&header), "engine-b").is_err());
        assert!(check_control(&secret(8), Some(&header), "engine-a").is_err());
        let forged = header.replacen("2:", "3:", 1);
        assert!(check_control(&s, Some(&forged), "engine-a").is_err());
        assert!(check_control(&s, None, "engine-a").is_err());
        assert!(check_control(&s, Some("2:zz"), "engine-a").is_err());
    }

    #[test]
    fn the_two_sides_prove_differently_over_the_same_nonces() {
        let k = secret(1).generation_key(5);
        let c = Challenge {
            engine_nonce: [1; LEN],
            replica_nonce: [2; LEN],
            identity: b"e".to_vec(),
        };
        assert_ne!(c.replica_proof(&k), c.engine_proof(&k));
        let mut other = c.clone();
        other.replica_nonce = [3; LEN];
        assert_ne!(other.engine_proof(&k), c.engine_proof(&k));
    }

    #[test]
    fn secrets_are_read_raw_or_hex_and_bad_ones_refused() {
        let s = secret(0xab);
        assert_eq!(VolumeSecret::from_bytes(&[0xab; LEN]).unwrap(), s);
        assert_eq!(
            VolumeSecret::from_bytes(format!("{}\n", s.to_hex()).as_bytes()).unwrap(),
            s
        );
        assert!(VolumeSecret::from_bytes(b"short").is_err());
        assert!(VolumeSecret::from_bytes(&[0xff; 40]).is_err());
        assert!(VolumeSecret::from_bytes("g".repeat(64).as_bytes()).is_err());
        assert!(!format!("{s:?}").contains("ab"));
    }
}
