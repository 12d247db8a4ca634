//! Join tokens: how a new machine becomes a node of the cluster without the cluster
//! token leaving the manager's machine.
//!
//! The admin asks for one (`hornctl cluster join-token`, [`create`]) and hands it to
//! the new machine (`hornd node --join TOKEN`); the node sends it with its signing
//! request, and the manager signs the node's certificate if the token is known,
//! unexpired, unused and, when it names a node, names this one ([`redeem`]). A token
//! joins once: redeeming it deletes it in the same transaction that checks it, so two
//! joins racing with one token get one certificate.
//!
//! The store keeps only a digest of each token's secret (`join-tokens/ID`), so a copy
//! of the store joins nobody. Expired tokens are swept whenever one is made.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::model::SpecError;
use crate::store::{Expect, Store, StoreError, Txn};

/// How long a token is good for unless asked otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// The longest a token may be good for: a token is for a join about to happen.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

const PREFIX: &str = "join-tokens/";
const SCHEME: &str = "hornjoin";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct JoinTokenSpec {
    /// SHA-256 of the token's secret, hex.
    digest: String,
    /// Unix seconds after which it is refused.
    expires_unix: u64,
    /// The only node it joins; empty: any.
    node: String,
}

/// A token just made: the only time its secret is seen.
#[derive(Debug, Clone)]
pub struct Issued {
    /// `hornjoin-ID-SECRET`.
    pub token: String,
    /// Unix seconds after which it is refused.
    pub expires_unix: u64,
    /// The only node it joins (empty: any).
    pub node: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn digest(secret: &str) -> String {
    hex(&sha2::Sha256::digest(secret.as_bytes()))
}

/// Whether `token` has a join token's form (the cluster token has not).
pub fn is_join_token(token: &str) -> bool {
    token.starts_with(&format!("{SCHEME}-"))
}

/// Makes a token good for `ttl` (at most [`MAX_TTL`]) from `now_unix`, for `node`
/// only if not empty; sweeps expired ones.
pub fn create(store: &impl Store, ttl: Duration, node: &str, now_unix: u64) -> Result<Issued, SpecError> {
    if ttl.is_zero() || ttl > MAX_TTL {
        return Err(SpecError::Invalid(format!(
            "a join token's time to live must be between 1 s and {} days; {} s was asked",
            MAX_TTL.as_secs() / 86400,
            ttl.as_secs()
        )));
    }
    if !node.is_empty() {
        crate::model::check_name("node", node).map_err(SpecError::Invalid)?;
    }
    sweep(store, now_unix)?;
    let random = horn_proto::auth::random()
        .map_err(|e| SpecError::Invalid(format!("cannot draw a join token: {e}")))?;
    let id = hex(&random[..8]);
    let secret = hex(&random[8..24]);
    let expires_unix = now_unix + ttl.as_secs();
    let spec = JoinTokenSpec {
        digest: digest(&secret),
        expires_unix,
        node: node.to_string(),
    };
    store.commit(Txn::new().check(format!("{PREFIX}{id}"), Expect::Absent).put(
        format!("{PREFIX}{id}"),
        serde_json::to_vec(&spec).expect("a join token serializes"),
    ))?;
    Ok(Issued {
        token: format!("{SCHEME}-{id}-{secret}"),
        expires_unix,
        node: node.to_string(),
    })
}

/// Takes `token` for node `node`'s join at `now_unix`: `Ok` once for a good token,
/// which is then used up; the refusal in words otherwise.
pub fn redeem(store: &impl Store, token: &str, node: &str, now_unix: u64) -> Result<(), SpecError> {
    let refused = |why: &str| SpecError::Refused(format!("the join token is refused: {why}"));
    let (id, secret) = token
        .strip_prefix(&format!("{SCHEME}-"))
        .and_then(|rest| rest.split_once('-'))
        .filter(|(id, s)| id.len() == 16 && s.len() == 32)
        .ok_or_else(|| refused("it is not of the form hornjoin-ID-SECRET"))?;
    let key = format!("{PREFIX}{id}");
    let entry = store
        .get(&key)?
        .ok_or_else(|| refused("it is unknown, or was used already"))?;
    let spec: JoinTokenSpec = serde_json::from_slice(&entry.value)
        .map_err(|e| SpecError::Invalid(format!("join token {id} in the store is malformed: {e}")))?;
    if !horn_proto::auth::equal(digest(secret).as_bytes(), spec.digest.as_bytes()) {
        return Err(refused("it is unknown, or was used already"));
    }
    if now_unix >= spec.expires_unix {
        let _ = store.commit(Txn::new().delete(key));
        return Err(refused(&format!(
            "it expired {} s ago",
            now_unix - spec.expires_unix
        )));
    }
    if !spec.node.is_empty() && spec.node != node {
        return Err(refused(&format!("it is for node {}, not {node}", spec.node)));
    }
    match store.commit(
        Txn::new()
            .check(key.clone(), Expect::At(entry.revision))
            .delete(key),
    ) {
        Ok(_) => Ok(()),
        Err(StoreError::Conflict { .. }) => Err(refused("it was used already")),
        Err(e) => Err(e.into()),
    }
}

/// Deletes the tokens expired at `now_unix`.
fn sweep(store: &impl Store, now_unix: u64) -> Result<(), SpecError> {
    let (_, tokens) = store.list(PREFIX)?;
    for (key, entry) in tokens {
        let expired = serde_json::from_slice::<JoinTokenSpec>(&entry.value)
            .map(|s| now_unix >= s.expires_unix)
            .unwrap_or(true);
        if expired {
            let _ = store.commit(
                Txn::new()
                    .check(key.clone(), Expect::At(entry.revision))
                    .delete(key),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    #[test]
    fn a_token_joins_once_its_node_before_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path().join("s.redb")).unwrap();
        let t = create(&store, Duration::from_secs(60), "", 1000).unwrap();
        assert!(is_join_token(&t.token));
        assert_eq!(t.expires_unix, 1060);
        redeem(&store, &t.token, "n1", 1001).unwrap();
        let e = redeem(&store, &t.token, "n2", 1002).unwrap_err().to_string();
        assert!(e.contains("used already"), "{e}");

        // Bound to a node: another name is refused and the token stays good.
        let t = create(&store, Duration::from_secs(60), "n3", 1000).unwrap();
        let e = redeem(&store, &t.token, "n4", 1001).unwrap_err().to_string();
        assert!(e.contains("for node n3, not n4"), "{e}");
        redeem(&store, &t.token, "n3", 1001).unwrap();

        // Expired: refused, and gone.
        let t = create(&store, Duration::from_secs(60), "", 1000).unwrap();
        let e = redeem(&store, &t.token, "n5", 1060).unwrap_err().to_string();
        assert!(e.contains("expired 0 s ago"), "{e}");
        assert!(redeem(&store, &t.token, "n5", 1000).is_err());

        // A wrong secret for a real id, and nonsense, are refused.
        let t = create(&store, Duration::from_secs(60), "", 1000).unwrap();
        let forged = format!("{}{}", &t.token[..t.token.len() - 32], "0".repeat(32));
        assert!(redeem(&store, &forged, "n6", 1001).is_err());
        assert!(redeem(&store, "hornjoin-x", "n6", 1001).is_err());
        redeem(&store, &t.token, "n6", 1001).unwrap();

        // Bounds on the time to live; expired tokens are swept at the next one.
        assert!(create(&store, Duration::ZERO, "", 1000).is_err());
        assert!(create(&store, MAX_TTL + Duration::from_secs(1), "", 1000).is_err());
        create(&store, Duration::from_secs(10), "", 1000).unwrap();
        create(&store, Duration::from_secs(10), "", 5000).unwrap();
        assert_eq!(store.list(PREFIX).unwrap().1.len(), 1);
    }
}
