//! Leases on a target: who is backing up, who is collecting garbage.
//!
//! A backup may name a block that already exists (it deduplicates) before its
//! manifest is written; a garbage collection that ran meanwhile would see that block
//! unreferenced and delete it. So the two never overlap: each writes its lease first
//! and then looks for leases of the other kind, and backs off if it finds one. With a
//! target that reads its own writes and lists what was written (S3 today, a
//! directory), at least one of two that start together sees the other.
//!
//! A lease is an object `locks/backup/HOLDER.json` or `locks/gc/HOLDER.json` holding
//! its expiry (Unix seconds, the writer's clock). Its holder renews it every third of
//! its life on a thread of its own; a holder that dies leaves a lease that expires,
//! so nothing waits on it forever. A holder that could not renew in time (paused,
//! cut off) learns it before it relies on the lease ([`Lease::check`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::store::{ObjectStore, StoreError};

/// How long a lease lasts unless renewed.
pub const LEASE_TTL: Duration = Duration::from_secs(60);

/// What a lease is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseKind {
    /// A backup being made.
    Backup,
    /// A garbage collection.
    Gc,
}

impl LeaseKind {
    fn prefix(self) -> &'static str {
        match self {
            LeaseKind::Backup => "locks/backup/",
            LeaseKind::Gc => "locks/gc/",
        }
    }

    fn other(self) -> LeaseKind {
        match self {
            LeaseKind::Backup => LeaseKind::Gc,
            LeaseKind::Gc => LeaseKind::Backup,
        }
    }
}

/// A lease as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Who holds it (host, process, and a random part).
    pub holder: String,
    /// What for, in words ("backup data/b1").
    pub purpose: String,
    /// When it expires unless renewed, Unix seconds.
    pub expires_unix: u64,
}

/// Why a lease was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The target failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Leases of the other kind are live.
    #[error("{0}")]
    Busy(String),
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn new_holder() -> String {
    use std::io::Read;
    let mut r = [0u8; 6];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut r));
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    let rand: String = r.iter().map(|b| format!("{b:02x}")).collect();
    format!("{host}-{}-{rand}", std::process::id())
}

/// The live leases of `kind` on a target, with their keys.
pub fn live(store: &dyn ObjectStore, kind: LeaseKind) -> Result<Vec<(String, LeaseRecord)>, StoreError> {
    let now = now_unix();
    let mut out = Vec::new();
    for key in store.list(kind.prefix())? {
        let Some(bytes) = store.get(&key)? else { continue };
        // An unreadable lease is treated as live until it is old: it was written by
        // someone, and only its expiry could tell otherwise.
        match serde_json::from_slice::<LeaseRecord>(&bytes) {
            Ok(r) if r.expires_unix < now => {}
            Ok(r) => out.push((key, r)),
            Err(_) => out.push((
                key.clone(),
                LeaseRecord {
                    holder: key,
                    purpose: "an unreadable lease".into(),
                    expires_unix: now + LEASE_TTL.as_secs(),
                },
            )),
        }
    }
    Ok(out)
}

/// Removes expired leases of both kinds (what a dead holder left). Returns how many.
pub fn sweep_expired(store: &dyn ObjectStore) -> Result<usize, StoreError> {
    let now = now_unix();
    let mut n = 0;
    for kind in [LeaseKind::Backup, LeaseKind::Gc] {
        for key in store.list(kind.prefix())? {
            let expired = store
                .get(&key)?
                .and_then(|b| serde_json::from_slice::<LeaseRecord>(&b).ok())
                .is_some_and(|r| r.expires_unix + LEASE_TTL.as_secs() < now);
            if expired {
                store.delete(&key)?;
                n += 1;
            }
        }
    }
    Ok(n)
}

/// A lease held, renewed by a thread until dropped (then deleted).
pub struct Lease {
    store: Arc<dyn ObjectStore>,
    key: String,
    /// Until when the last successful write holds it, as milliseconds from `epoch`.
    valid_until_ms: Arc<AtomicU64>,
    epoch: Instant,
    stop: Arc<AtomicBool>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lease({})", self.key)
    }
}

impl Lease {
    /// Takes a lease of `kind` for `purpose`, once no lease of the other kind is live;
    /// tries again (after a random pause of up to two seconds) until `wait` has
    /// passed, then fails naming who holds the target.
    pub fn take(
        store: Arc<dyn ObjectStore>,
        kind: LeaseKind,
        purpose: &str,
        wait: Duration,
    ) -> Result<Lease, LeaseError> {
        let holder = new_holder();
        let key = format!("{}{holder}.json", kind.prefix());
        let deadline = Instant::now() + wait;
        let epoch = Instant::now();
        loop {
            let written = Instant::now();
            write(store.as_ref(), &key, &holder, purpose)?;
            let others = live(store.as_ref(), kind.other())?;
            if others.is_empty() {
                let valid_until_ms =
                    Arc::new(AtomicU64::new((written - epoch + LEASE_TTL).as_millis() as u64));
                let stop = Arc::new(AtomicBool::new(false));
                let renewer = {
                    let (store, key, holder, purpose) =
                        (store.clone(), key.clone(), holder.clone(), purpose.to_string());
                    let (valid, stop) = (valid_until_ms.clone(), stop.clone());
                    std::thread::Builder::new()
                        .name("horn-lease".into())
                        .spawn(move || renew(store.as_ref(), &key, &holder, &purpose, &valid, epoch, &stop))
                        .expect("a thread starts")
                };
                return Ok(Lease {
                    store,
                    key,
                    valid_until_ms,
                    epoch,
                    stop,
                    renewer: Some(renewer),
                });
            }
            store.delete(&key)?;
            if Instant::now() >= deadline {
                let who: Vec<String> = others
                    .iter()
                    .map(|(_, r)| format!("{} ({})", r.purpose, r.holder))
                    .collect();
                return Err(LeaseError::Busy(format!(
                    "{}: the target is busy with {}",
                    store.url(),
                    who.join(", ")
                )));
            }
            let pause = 200 + u64::from(rand_byte()) * 7;
            std::thread::sleep(Duration::from_millis(pause).min(deadline - Instant::now()));
        }
    }

    /// Fails if the lease may have lapsed (its renewals did not get through in time):
    /// what depends on it must not be trusted then. Keeps a margin of a tenth of
    /// its life.
    pub fn check(&self) -> Result<(), LeaseError> {
        let now = (Instant::now() - self.epoch).as_millis() as u64;
        let margin = (LEASE_TTL / 10).as_millis() as u64;
        if now + margin >= self.valid_until_ms.load(Ordering::SeqCst) {
            return Err(LeaseError::Busy(format!(
                "{}: this holder's lease {} was not renewed in time (was the process paused, or the target unreachable?)",
                self.store.url(),
                self.key
            )));
        }
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.renewer.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        let _ = self.store.delete(&self.key);
    }
}

fn rand_byte() -> u8 {
    use std::io::Read;
    let mut b = [0u8; 1];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    b[0]
}

fn write(store: &dyn ObjectStore, key: &str, holder: &str, purpose: &str) -> Result<(), StoreError> {
    let rec = LeaseRecord {
        holder: holder.to_string(),
        purpose: purpose.to_string(),
        expires_unix: now_unix() + LEASE_TTL.as_secs(),
    };
    store.put(key, &serde_json::to_vec(&rec).expect("a lease serializes"))
}

fn renew(
    store: &dyn ObjectStore,
    key: &str,
    holder: &str,
    purpose: &str,
    valid_until_ms: &AtomicU64,
    epoch: Instant,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::SeqCst) {
        std::thread::park_timeout(LEASE_TTL / 3);
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let written = Instant::now();
        match write(store, key, holder, purpose) {
            Ok(()) => {
                valid_until_ms.store((written - epoch + LEASE_TTL).as_millis() as u64, Ordering::SeqCst)
            }
            Err(e) => tracing::warn!(error = %e, "renewing a backup target lease failed; trying again"),
        }
    }
}
