//! Rolling the cluster's CA while everything keeps running.
//!
//! A holder trusts every CA in its `ca.pem`, and services take a changed `ca.pem`
//! at their next connection (`live.rs`), so a CA is replaced in three steps, each
//! safe whatever mix of old and new the holders have reached:
//! 1. [`Rotation::begin`]: a new CA is made and added to the trust bundle; the old
//!    one still signs. Holders fetch the bundle (the manager hands it out) and
//!    trust both.
//! 2. [`Rotation::switch`], once every holder trusts the new CA: the new CA signs,
//!    and holders renew their certificates from it. Old and new certificates are
//!    both accepted everywhere meanwhile.
//! 3. [`Rotation::finish`], once every holder has a new certificate: the old CA
//!    leaves the bundle; a certificate it issued is refused from then on.
//!
//! The step a directory is at is read from its files alone ([`Rotation::read`]):
//! `ca-next.key` exists during step 1; `ca.pem` holds two CAs during step 2.

use std::path::Path;

use rcgen::{KeyPair, PublicKeyData};

use crate::{write_new, write_replace, Ca, PkiError, Result, CA_CERT, CA_KEY};

/// The new CA's key during step 1.
const NEXT_KEY: &str = "ca-next.key";

/// Where a CA's roll stands in a manager's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rotation {
    /// No roll: one CA signs and is trusted.
    Idle,
    /// Step 1: the new CA (`next`, its name) is trusted, the old one signs.
    Trusting {
        /// The new CA's name.
        next: String,
    },
    /// Step 2: the new CA (`current`) signs; certificates of the old one are
    /// still accepted until [`Rotation::finish`].
    Reissuing {
        /// The new CA's name.
        current: String,
    },
}

impl Rotation {
    /// The step the CA of `dir` is at.
    pub fn read(dir: &Path) -> Result<Rotation> {
        if dir.join(NEXT_KEY).exists() {
            let next = Ca::load_signer(dir, NEXT_KEY)?;
            return Ok(Rotation::Trusting {
                next: next.subject()?,
            });
        }
        let ca = Ca::load(dir)?;
        if subjects(&ca.trust_pem)?.len() > 1 {
            Ok(Rotation::Reissuing {
                current: ca.subject()?,
            })
        } else {
            Ok(Rotation::Idle)
        }
    }

    /// Step 1: makes a new CA for `cluster` and adds it to the trust bundle of
    /// `dir`; refused unless no roll is under way.
    pub fn begin(dir: &Path, cluster: &str) -> Result<Rotation> {
        match Rotation::read(dir)? {
            Rotation::Idle => {}
            other => {
                return Err(PkiError::Invalid(format!(
                    "a CA roll is under way already ({other:?}): finish it first"
                )))
            }
        }
        let old = Ca::load(dir)?;
        let next = Ca::generate(cluster)?;
        // The bundle first, the key second: a crash between leaves a bundle with a
        // CA nobody signs with, which the next finish drops.
        let bundle = format!("{}{}", ensure_newline(&old.trust_pem), next.cert_pem);
        write_replace(&dir.join(CA_CERT), bundle.as_bytes(), 0o644)?;
        write_new(&dir.join(NEXT_KEY), next.key_pem.as_bytes(), 0o600)?;
        Rotation::read(dir)
    }

    /// Step 2: the new CA signs from now on; refused unless at step 1.
    pub fn switch(dir: &Path) -> Result<Rotation> {
        if !matches!(Rotation::read(dir)?, Rotation::Trusting { .. }) {
            return Err(PkiError::Invalid("no new CA is waiting to sign".into()));
        }
        std::fs::rename(dir.join(NEXT_KEY), dir.join(CA_KEY)).map_err(|source| PkiError::Io {
            op: "rename",
            path: dir.join(NEXT_KEY),
            source,
        })?;
        Rotation::read(dir)
    }

    /// Step 3: only the signing CA stays trusted; refused unless at step 2.
    pub fn finish(dir: &Path) -> Result<Rotation> {
        if !matches!(Rotation::read(dir)?, Rotation::Reissuing { .. }) {
            return Err(PkiError::Invalid("no old CA is left to retire".into()));
        }
        let ca = Ca::load(dir)?;
        write_replace(&dir.join(CA_CERT), ca.cert_pem.as_bytes(), 0o644)?;
        Rotation::read(dir)
    }
}

fn ensure_newline(s: &str) -> String {
    if s.ends_with('\n') {
        s.to_string()
    } else {
        format!("{s}\n")
    }
}

/// The certificates of a PEM bundle, each as its own PEM text.
fn blocks(bundle: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    bundle
        .split_inclusive(END)
        .filter(|b| b.contains("-----BEGIN CERTIFICATE-----"))
        .map(|b| format!("{}\n", b.trim_start()))
        .collect()
}

/// The certificate of `bundle` whose public key is `key_pem`'s.
pub(crate) fn matching_cert(bundle: &str, key_pem: &str) -> Result<String> {
    let key = KeyPair::from_pem(key_pem).map_err(|source| PkiError::Cert {
        what: "the CA's key is unreadable".into(),
        source,
    })?;
    let spki = key.subject_public_key_info();
    for block in blocks(bundle) {
        let der = crate::pem_der(&block)?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| PkiError::Invalid(format!("a CA certificate is malformed: {e}")))?;
        if cert.public_key().raw == spki.as_slice() {
            return Ok(block);
        }
    }
    Err(PkiError::Invalid(
        "no CA certificate in ca.pem matches the CA's key".into(),
    ))
}

/// The names of the certificates of a PEM bundle.
pub(crate) fn subjects(bundle: &str) -> Result<Vec<String>> {
    blocks(bundle)
        .iter()
        .map(|b| {
            let der = crate::pem_der(b)?;
            let (_, cert) = x509_parser::parse_x509_certificate(&der)
                .map_err(|e| PkiError::Invalid(format!("a CA certificate is malformed: {e}")))?;
            Ok(cert.subject().to_string())
        })
        .collect()
}

/// The issuer's name of a certificate (DER), as a peer presented it.
pub fn issuer_of_der(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.issuer().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Role, Validity};

    #[test]
    fn a_ca_rolls_in_three_steps_and_each_is_read_back_from_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let old = Ca::generate("c").unwrap();
        old.save(d).unwrap();
        let old_name = old.subject().unwrap();
        assert_eq!(Rotation::read(d).unwrap(), Rotation::Idle);
        let holder = old.issue(&Role::Admin, &[], Validity::Days(1)).unwrap();
        assert!(Rotation::switch(d).is_err());
        assert!(Rotation::finish(d).is_err());

        // 1: both trusted, the old one signs.
        let Rotation::Trusting { next } = Rotation::begin(d, "c").unwrap() else {
            panic!("not trusting")
        };
        assert_ne!(next, old_name);
        assert!(Rotation::begin(d, "c").is_err());
        let ca = Ca::load(d).unwrap();
        assert_eq!(ca.subject().unwrap(), old_name);
        let issued = ca.issue(&Role::Admin, &[], Validity::Days(1)).unwrap();
        assert_eq!(issued.trusted().unwrap(), vec![old_name.clone(), next.clone()]);
        assert_eq!(issued.issuer().unwrap(), old_name);

        // 2: the new one signs; both trusted.
        assert_eq!(
            Rotation::switch(d).unwrap(),
            Rotation::Reissuing {
                current: next.clone()
            }
        );
        let ca = Ca::load(d).unwrap();
        let renewed = ca.issue(&Role::Admin, &[], Validity::Days(1)).unwrap();
        assert_eq!(renewed.issuer().unwrap(), next);
        assert_eq!(renewed.trusted().unwrap().len(), 2);
        assert_eq!(holder.issuer().unwrap(), old_name);

        // 3: the new one alone.
        assert_eq!(Rotation::finish(d).unwrap(), Rotation::Idle);
        let ca = Ca::load(d).unwrap();
        assert_eq!(ca.subject().unwrap(), next);
        assert_eq!(subjects(ca.trust_pem()).unwrap(), vec![next]);
        assert!(!d.join(NEXT_KEY).exists());
    }
}
