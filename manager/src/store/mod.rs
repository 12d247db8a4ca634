//! Where the manager keeps its specs: what should exist (volumes, nodes, disks,
//! replicas, engines, settings), never what is running (that comes from the node
//! agents and is rebuilt after a restart).
//!
//! [`Store`] is a versioned key-value map with the three things a control plane
//! needs from its database, shaped after etcd's API so that a second implementation
//! on etcd (for several managers) is a translation, not a redesign:
//! - **compare-and-swap**: every change is a [`Txn`] whose checks (a key absent, or at
//!   the revision the caller read) must all hold, or nothing is written and the
//!   caller learns which key moved ([`StoreError::Conflict`]); two managers, or two
//!   tasks of one, never overwrite each other's decision unseen;
//! - **revisions**: each committed transaction gets the next store revision, and each
//!   key remembers the revision that last wrote it;
//! - **leases**: a key written under a lease is deleted when the lease is not renewed
//!   within its time to live (a node's registration, a lock);
//! - **watches**: every change under a prefix after a revision, in order, so that a
//!   reader can list once and then follow; a watcher that falls behind is ended (its
//!   receiver yields `None`) and relists, and a revision older than the store keeps
//!   history for is refused ([`StoreError::Compacted`]).
//!
//! [`embedded::EmbeddedStore`] is the default: one database file (redb), no service
//! to run. The lease rules are plain data ([`leases::Leases`]), apart from the clock.

pub mod embedded;
pub mod leases;

use std::time::Duration;

/// A store revision: 1 for the first transaction, one more for each after it.
pub type Revision = u64;

/// A lease's id (never 0).
pub type LeaseId = u64;

/// A key's value and what last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The value.
    pub value: Vec<u8>,
    /// The revision of the transaction that last wrote this key.
    pub revision: Revision,
    /// The lease the key lives under, if any.
    pub lease: Option<LeaseId>,
}

/// What a transaction requires of a key before it writes anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key does not exist.
    Absent,
    /// The key exists and was last written at this revision.
    At(Revision),
}

/// One write of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Set `key` to `value`, under `lease` if given.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
        /// The lease the key will live under.
        lease: Option<LeaseId>,
    },
    /// Remove `key` (nothing happens if it is absent).
    Delete {
        /// The key.
        key: String,
    },
}

/// Checks and writes applied together: all writes if every check holds, none
/// otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    /// What must hold first.
    pub checks: Vec<(String, Expect)>,
    /// What to write then.
    pub writes: Vec<Write>,
}

impl Txn {
    /// An empty transaction.
    pub fn new() -> Txn {
        Txn::default()
    }

    /// Requires `key` to be as `expect` says.
    pub fn check(mut self, key: impl Into<String>, expect: Expect) -> Txn {
        self.checks.push((key.into(), expect));
        self
    }

    /// Sets `key` to `value`.
    pub fn put(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Txn {
        self.writes.push(Write::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        });
        self
    }

    /// Sets `key` to `value` under `lease`.
    pub fn put_leased(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>, lease: LeaseId) -> Txn {
        self.writes.push(Write::Put {
            key: key.into(),
            value: value.into(),
            lease: Some(lease),
        });
        self
    }

    /// Removes `key`.
    pub fn delete(mut self, key: impl Into<String>) -> Txn {
        self.writes.push(Write::Delete { key: key.into() });
        self
    }
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `key` was written.
    Put {
        /// The key.
        key: String,
        /// Its new value and revision.
        entry: Entry,
    },
    /// `key` was deleted at `revision` (by a transaction, or by its lease's expiry).
    Delete {
        /// The key.
        key: String,
        /// The revision of the deletion.
        revision: Revision,
    },
}

impl Event {
    /// The key the event is about.
    pub fn key(&self) -> &str {
        match self {
            Event::Put { key, .. } | Event::Delete { key, .. } => key,
        }
    }

    /// The revision of the change.
    pub fn revision(&self) -> Revision {
        match self {
            Event::Put { entry, .. } => entry.revision,
            Event::Delete { revision, .. } => *revision,
        }
    }
}

/// The events after a revision under a prefix, in revision order. `None` from the
/// receiver: the watch ended (the watcher fell behind, or the store closed): list
/// again and watch from the list's revision.
pub type Watch = tokio::sync::mpsc::Receiver<Event>;

/// What a store refuses.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A check of a transaction did not hold.
    #[error("{key} changed since it was read (expected {expected}, found {found}): read it again and retry")]
    Conflict {
        /// The key.
        key: String,
        /// What the transaction expected, for people.
        expected: String,
        /// What the store holds, for people.
        found: String,
    },
    /// A watch asked for history the store no longer keeps.
    #[error("the store keeps changes from revision {oldest} on; revision {asked} is gone: list again")]
    Compacted {
        /// The revision asked for.
        asked: Revision,
        /// The oldest revision still kept.
        oldest: Revision,
    },
    /// A lease that does not exist (never granted, expired or revoked).
    #[error("lease {0} does not exist (it expired or was revoked): grant a new one")]
    NoLease(LeaseId),
    /// A malformed request.
    #[error("{0}")]
    Invalid(String),
    /// The database failed.
    #[error("the store at {path}: {what}")]
    Backend {
        /// The database's location.
        path: String,
        /// What failed.
        what: String,
    },
}

/// The manager's specs, versioned (see the module's documentation).
pub trait Store: Send + Sync {
    /// The key's entry, if it exists.
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError>;

    /// Every key starting with `prefix`, in key order, and the store revision they
    /// were read at (watch from it to follow on).
    fn list(&self, prefix: &str) -> Result<(Revision, Vec<(String, Entry)>), StoreError>;

    /// Applies `txn` if all its checks hold; returns the new revision.
    fn commit(&self, txn: Txn) -> Result<Revision, StoreError>;

    /// A new lease that lasts `ttl` unless renewed.
    fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;

    /// Renews `lease` for its full time to live.
    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Ends `lease` now, deleting its keys.
    fn revoke(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Follows the changes of keys under `prefix` after revision `after`.
    fn watch(&self, prefix: &str, after: Revision) -> Result<Watch, StoreError>;
}
