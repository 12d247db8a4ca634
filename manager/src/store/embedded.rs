//! The default [`Store`]: one redb database file, for one manager, with no service to
//! run.
//!
//! redb (a pure-Rust, crash-safe B-tree file with ACID transactions) rather than a
//! format of ours: a committed transaction is durable (fsynced) and a torn one is never
//! seen, which is exactly what a spec store needs and nothing the manager should
//! reimplement. Version 2 keeps the workspace's minimum Rust version.
//!
//! Tables: `kv` (key → revision, lease, value), `changes` (revision → the events of
//! that transaction, the last [`Options::history`] kept for watches), `leases` (id → time to
//! live) and `meta` (the store revision, the last lease id granted). Writes, lease changes and watch
//! registration go through one mutex, so watchers see every change exactly once and
//! in order. A thread expires leases every 100 ms while the store is open.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::mpsc;

use super::leases::Leases;
use super::{Entry, Event, Expect, LeaseId, Revision, Store, StoreError, Txn, Watch, Write};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");
const LEASES: TableDefinition<u64, u64> = TableDefinition::new("leases");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// How long the store keeps history, and how far a watcher may fall behind.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// How many revisions of changes are kept for watches that start in the past.
    pub history: u64,
    /// Events a watcher may have unread before it is ended as fallen behind.
    pub watch_buffer: usize,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            history: 10_000,
            watch_buffer: 4096,
        }
    }
}

/// How often expired leases are collected.
const EXPIRY_TICK: Duration = Duration::from_millis(100);

/// Keys longer than this are refused (they are names, not data).
const MAX_KEY: usize = 1024;

/// A [`Store`] in one database file.
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    options: Options,
    db: Database,
    state: Mutex<State>,
}

struct State {
    revision: Revision,
    /// Changes up to and including this revision are no longer kept.
    compacted: Revision,
    leases: Leases,
    watchers: Vec<Watcher>,
}

struct Watcher {
    prefix: String,
    tx: mpsc::Sender<Event>,
}

impl EmbeddedStore {
    /// Opens the store at `path`, creating it if it does not exist. Leases from before
    /// get a full time to live from now (see [`Leases::restore`]).
    pub fn open(path: impl AsRef<Path>) -> Result<EmbeddedStore, StoreError> {
        EmbeddedStore::open_with(path, Options::default())
    }

    /// [`EmbeddedStore::open`] with other [`Options`].
    pub fn open_with(path: impl AsRef<Path>, options: Options) -> Result<EmbeddedStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        let fail = |what: String| StoreError::Backend {
            path: path.display().to_string(),
            what,
        };
        let db = Database::create(&path).map_err(|e| fail(e.to_string()))?;
        let tx = db.begin_write().map_err(|e| fail(e.to_string()))?;
        let (revision, compacted, leases) = {
            let kv = tx.open_table(KV).map_err(|e| fail(e.to_string()))?;
            drop(kv);
            let meta = tx.open_table(META).map_err(|e| fail(e.to_string()))?;
            let revision = meta
                .get("revision")
                .map_err(|e| fail(e.to_string()))?
                .map_or(0, |v| v.value());
            let changes = tx.open_table(CHANGES).map_err(|e| fail(e.to_string()))?;
            let first = changes
                .first()
                .map_err(|e| fail(e.to_string()))?
                .map(|(k, _)| k.value());
            let compacted = first.map_or(revision, |f| f - 1);
            let table = tx.open_table(LEASES).map_err(|e| fail(e.to_string()))?;
            let mut known = Vec::new();
            for row in table.iter().map_err(|e| fail(e.to_string()))? {
                let (id, ttl) = row.map_err(|e| fail(e.to_string()))?;
                known.push((id.value(), Duration::from_millis(ttl.value())));
            }
            // Ids are never reused, even those of leases revoked before the restart.
            let granted = meta
                .get("granted-leases")
                .map_err(|e| fail(e.to_string()))?
                .map_or(0, |v| v.value());
            let mut leases = Leases::new(known.iter().map(|(id, _)| *id).max().unwrap_or(0).max(granted));
            let now = Instant::now();
            for (id, ttl) in known {
                leases.restore(id, ttl, now);
            }
            (revision, compacted, leases)
        };
        tx.commit().map_err(|e| fail(e.to_string()))?;
        let inner = Arc::new(Inner {
            path,
            options,
            db,
            state: Mutex::new(State {
                revision,
                compacted,
                leases,
                watchers: Vec::new(),
            }),
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("horn-store-leases".into())
            .spawn(move || expire_loop(weak))
            .map_err(|e| StoreError::Backend {
                path: inner.path.display().to_string(),
                what: format!("cannot start the lease thread: {e}"),
            })?;
        Ok(EmbeddedStore { inner })
    }

    /// Deletes the keys of every lease expired at `now`; returns those leases. The
    /// store's own thread calls this; tests call it with a time of their choosing.
    pub fn expire_leases(&self, now: Instant) -> Result<Vec<LeaseId>, StoreError> {
        self.inner.expire(now)
    }

    /// The file the store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

fn expire_loop(store: Weak<Inner>) {
    loop {
        std::thread::sleep(EXPIRY_TICK);
        let Some(inner) = store.upgrade() else { return };
        if let Err(e) = inner.expire(Instant::now()) {
            tracing::warn!(error = %e, "cannot delete the keys of expired leases");
        }
    }
}

/// Stored form of a key's entry: revision, lease (0: none), value.
fn encode_entry(revision: Revision, lease: Option<LeaseId>, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + value.len());
    out.extend_from_slice(&revision.to_le_bytes());
    out.extend_from_slice(&lease.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(value);
    out
}

fn decode_entry(bytes: &[u8]) -> Option<Entry> {
    if bytes.len() < 16 {
        return None;
    }
    let revision = u64::from_le_bytes(bytes[..8].try_into().ok()?);
    let lease = u64::from_le_bytes(bytes[8..16].try_into().ok()?);
    Some(Entry {
        value: bytes[16..].to_vec(),
        revision,
        lease: (lease != 0).then_some(lease),
    })
}

/// Stored form of one revision's events: per event, a tag (1 put, 2 delete), the
/// key's length (u32) and bytes, and for a put the lease (u64, 0: none) and the
/// value's length (u32) and bytes.
fn encode_events(events: &[Event]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        let key = e.key().as_bytes();
        match e {
            Event::Put { entry, .. } => {
                out.push(1);
                out.extend_from_slice(&(key.len() as u32).to_le_bytes());
                out.extend_from_slice(key);
                out.extend_from_slice(&entry.lease.unwrap_or(0).to_le_bytes());
                out.extend_from_slice(&(entry.value.len() as u32).to_le_bytes());
                out.extend_from_slice(&entry.value);
            }
            Event::Delete { .. } => {
                out.push(2);
                out.extend_from_slice(&(key.len() as u32).to_le_bytes());
                out.extend_from_slice(key);
            }
        }
    }
    out
}

fn decode_events(revision: Revision, mut bytes: &[u8]) -> Option<Vec<Event>> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if bytes.len() < n {
            return None;
        }
        let (head, rest) = bytes.split_at(n);
        *bytes = rest;
        Some(head)
    }
    fn u32_at(bytes: &mut &[u8]) -> Option<usize> {
        Some(u32::from_le_bytes(take(bytes, 4)?.try_into().ok()?) as usize)
    }
    let mut events = Vec::new();
    while !bytes.is_empty() {
        let tag = take(&mut bytes, 1)?[0];
        let len = u32_at(&mut bytes)?;
        let key = String::from_utf8(take(&mut bytes, len)?.to_vec()).ok()?;
        match tag {
            1 => {
                let lease = u64::from_le_bytes(take(&mut bytes, 8)?.try_into().ok()?);
                let len = u32_at(&mut bytes)?;
                let value = take(&mut bytes, len)?.to_vec();
                events.push(Event::Put {
                    key,
                    entry: Entry {
                        value,
                        revision,
                        lease: (lease != 0).then_some(lease),
                    },
                });
            }
            2 => events.push(Event::Delete { key, revision }),
            _ => return None,
        }
    }
    Some(events)
}

fn describe(e: Option<&Entry>) -> String {
    match e {
        None => "absent".into(),
        Some(e) => format!("written at revision {}", e.revision),
    }
}

impl Inner {
    fn fail(&self, what: impl ToString) -> StoreError {
        StoreError::Backend {
            path: self.path.display().to_string(),
            what: what.to_string(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves no half-written state: the database
        // transaction it was in is dropped, and so aborted.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `writes` (the checks, if any, already hold in `tx`) at the next
    /// revision, records their events and compacts history; commits. Returns the
    /// events (none: nothing changed, and no revision was used).
    fn apply(
        &self,
        state: &mut State,
        tx: redb::WriteTransaction,
        writes: &[Write],
    ) -> Result<(Revision, Vec<Event>), StoreError> {
        let revision = state.revision + 1;
        let mut events = Vec::new();
        {
            let mut kv = tx.open_table(KV).map_err(|e| self.fail(e))?;
            for w in writes {
                match w {
                    Write::Put { key, value, lease } => {
                        kv.insert(key.as_str(), encode_entry(revision, *lease, value).as_slice())
                            .map_err(|e| self.fail(e))?;
                        events.push(Event::Put {
                            key: key.clone(),
                            entry: Entry {
                                value: value.clone(),
                                revision,
                                lease: *lease,
                            },
                        });
                    }
                    Write::Delete { key } => {
                        if kv.remove(key.as_str()).map_err(|e| self.fail(e))?.is_some() {
                            events.push(Event::Delete {
                                key: key.clone(),
                                revision,
                            });
                        }
                    }
                }
            }
        }
        if events.is_empty() {
            tx.abort().map_err(|e| self.fail(e))?;
            return Ok((state.revision, events));
        }
        let mut compacted = state.compacted;
        {
            let mut changes = tx.open_table(CHANGES).map_err(|e| self.fail(e))?;
            changes
                .insert(revision, encode_events(&events).as_slice())
                .map_err(|e| self.fail(e))?;
            let history = self.options.history.max(1);
            if revision > history {
                let keep_from = revision - history + 1;
                changes
                    .retain_in(..keep_from, |_, _| false)
                    .map_err(|e| self.fail(e))?;
                compacted = compacted.max(keep_from - 1);
            }
            let mut meta = tx.open_table(META).map_err(|e| self.fail(e))?;
            meta.insert("revision", revision).map_err(|e| self.fail(e))?;
        }
        tx.commit().map_err(|e| self.fail(e))?;
        state.revision = revision;
        state.compacted = compacted;
        Ok((revision, events))
    }

    /// Hands `events` to every watcher whose prefix they fall under; a watcher whose
    /// buffer is full or whose receiver is gone is ended.
    fn notify(state: &mut State, events: &[Event]) {
        state.watchers.retain(|w| {
            events
                .iter()
                .filter(|e| e.key().starts_with(&w.prefix))
                .all(|e| w.tx.try_send(e.clone()).is_ok())
        });
    }

    /// Deletes the keys of `leases` in one transaction, and their rows.
    fn delete_leased(&self, state: &mut State, leases: &[LeaseId]) -> Result<(), StoreError> {
        if leases.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(|e| self.fail(e))?;
        let mut doomed = Vec::new();
        {
            let kv = tx.open_table(KV).map_err(|e| self.fail(e))?;
            for row in kv.iter().map_err(|e| self.fail(e))? {
                let (k, v) = row.map_err(|e| self.fail(e))?;
                if decode_entry(v.value())
                    .and_then(|e| e.lease)
                    .is_some_and(|l| leases.contains(&l))
                {
                    doomed.push(Write::Delete {
                        key: k.value().to_string(),
                    });
                }
            }
            let mut table = tx.open_table(LEASES).map_err(|e| self.fail(e))?;
            for id in leases {
                table.remove(*id).map_err(|e| self.fail(e))?;
            }
        }
        if doomed.is_empty() {
            return tx.commit().map_err(|e| self.fail(e));
        }
        let (_, events) = self.apply(state, tx, &doomed)?;
        Self::notify(state, &events);
        Ok(())
    }

    fn expire(&self, now: Instant) -> Result<Vec<LeaseId>, StoreError> {
        let mut state = self.lock();
        let gone = state.leases.expired(now);
        self.delete_leased(&mut state, &gone)?;
        Ok(gone)
    }
}

fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(StoreError::Invalid(format!(
            "a key must have 1 to {MAX_KEY} bytes, not {}",
            key.len()
        )));
    }
    Ok(())
}

impl Store for EmbeddedStore {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let inner = &self.inner;
        let tx = inner.db.begin_read().map_err(|e| inner.fail(e))?;
        let kv = tx.open_table(KV).map_err(|e| inner.fail(e))?;
        let found = kv.get(key).map_err(|e| inner.fail(e))?;
        match found {
            None => Ok(None),
            Some(v) => decode_entry(v.value())
                .map(Some)
                .ok_or_else(|| inner.fail(format!("the entry of {key} is corrupt"))),
        }
    }

    fn list(&self, prefix: &str) -> Result<(Revision, Vec<(String, Entry)>), StoreError> {
        let inner = &self.inner;
        // The revision and the read are taken together: no commit falls between them.
        let (revision, tx) = {
            let state = inner.lock();
            (state.revision, inner.db.begin_read().map_err(|e| inner.fail(e))?)
        };
        let kv = tx.open_table(KV).map_err(|e| inner.fail(e))?;
        let mut out = Vec::new();
        for row in kv.range(prefix..).map_err(|e| inner.fail(e))? {
            let (k, v) = row.map_err(|e| inner.fail(e))?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            let entry = decode_entry(v.value())
                .ok_or_else(|| inner.fail(format!("the entry of {key} is corrupt")))?;
            out.push((key.to_string(), entry));
        }
        Ok((revision, out))
    }

    fn commit(&self, txn: Txn) -> Result<Revision, StoreError> {
        let inner = &self.inner;
        for (key, _) in &txn.checks {
            check_key(key)?;
        }
        let now = Instant::now();
        let mut state = inner.lock();
        for w in &txn.writes {
            match w {
                Write::Put { key, lease, .. } => {
                    check_key(key)?;
                    if let Some(l) = lease {
                        if !state.leases.is_live(*l, now) {
                            return Err(StoreError::NoLease(*l));
                        }
                    }
                }
                Write::Delete { key } => check_key(key)?,
            }
        }
        let tx = inner.db.begin_write().map_err(|e| inner.fail(e))?;
        {
            let kv = tx.open_table(KV).map_err(|e| inner.fail(e))?;
            for (key, expect) in &txn.checks {
                let found = kv
                    .get(key.as_str())
                    .map_err(|e| inner.fail(e))?
                    .and_then(|v| decode_entry(v.value()));
                let holds = match expect {
                    Expect::Absent => found.is_none(),
                    Expect::At(r) => found.as_ref().is_some_and(|e| e.revision == *r),
                };
                if !holds {
                    return Err(StoreError::Conflict {
                        key: key.clone(),
                        expected: match expect {
                            Expect::Absent => "absent".into(),
                            Expect::At(r) => format!("written at revision {r}"),
                        },
                        found: describe(found.as_ref()),
                    });
                }
            }
        }
        let (revision, events) = inner.apply(&mut state, tx, &txn.writes)?;
        Inner::notify(&mut state, &events);
        Ok(revision)
    }

    fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let inner = &self.inner;
        if ttl.is_zero() || ttl > Duration::from_secs(24 * 3600) {
            return Err(StoreError::Invalid(format!(
                "a lease's time to live must be above 0 and at most a day, not {ttl:?}"
            )));
        }
        let mut state = inner.lock();
        let id = state.leases.grant(ttl, Instant::now());
        let tx = inner.db.begin_write().map_err(|e| inner.fail(e))?;
        {
            let mut table = tx.open_table(LEASES).map_err(|e| inner.fail(e))?;
            table
                .insert(id, ttl.as_millis() as u64)
                .map_err(|e| inner.fail(e))?;
            let mut meta = tx.open_table(META).map_err(|e| inner.fail(e))?;
            meta.insert("granted-leases", id).map_err(|e| inner.fail(e))?;
        }
        if let Err(e) = tx.commit() {
            state.leases.revoke(id);
            return Err(inner.fail(e));
        }
        Ok(id)
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        if self.inner.lock().leases.renew(lease, Instant::now()) {
            Ok(())
        } else {
            Err(StoreError::NoLease(lease))
        }
    }

    fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let inner = &self.inner;
        let mut state = inner.lock();
        if !state.leases.revoke(lease) {
            return Err(StoreError::NoLease(lease));
        }
        inner.delete_leased(&mut state, &[lease])
    }

    fn watch(&self, prefix: &str, after: Revision) -> Result<Watch, StoreError> {
        let inner = &self.inner;
        let mut state = inner.lock();
        if after < state.compacted {
            return Err(StoreError::Compacted {
                asked: after,
                oldest: state.compacted + 1,
            });
        }
        let (tx, rx) = mpsc::channel(inner.options.watch_buffer.max(1));
        let mut behind = false;
        if after < state.revision {
            let read = inner.db.begin_read().map_err(|e| inner.fail(e))?;
            let changes = read.open_table(CHANGES).map_err(|e| inner.fail(e))?;
            'replay: for row in changes.range(after + 1..).map_err(|e| inner.fail(e))? {
                let (rev, bytes) = row.map_err(|e| inner.fail(e))?;
                let events = decode_events(rev.value(), bytes.value()).ok_or_else(|| {
                    inner.fail(format!("the changes of revision {} are corrupt", rev.value()))
                })?;
                for e in events.into_iter().filter(|e| e.key().starts_with(prefix)) {
                    if tx.try_send(e).is_err() {
                        behind = true;
                        break 'replay;
                    }
                }
            }
        }
        if !behind {
            state.watchers.push(Watcher {
                prefix: prefix.to_string(),
                tx,
            });
        }
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, EmbeddedStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path().join("specs.redb")).unwrap();
        (dir, s)
    }

    #[test]
    fn compare_and_swap_refuses_a_stale_writer_and_changes_nothing() {
        let (_d, s) = store();
        let r1 = s
            .commit(
                Txn::new()
                    .check("volumes/a", Expect::Absent)
                    .put("volumes/a", "v1"),
            )
            .unwrap();
        assert_eq!(r1, 1);
        let err = s
            .commit(
                Txn::new()
                    .check("volumes/a", Expect::Absent)
                    .put("volumes/a", "v2"),
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("volumes/a changed since it was read"),
            "{err}"
        );
        let r2 = s
            .commit(
                Txn::new()
                    .check("volumes/a", Expect::At(r1))
                    .put("volumes/a", "v2")
                    .put("volumes/b", "x"),
            )
            .unwrap();
        // The writer that read r1 is now stale: neither of its writes happens.
        let err = s
            .commit(
                Txn::new()
                    .check("volumes/a", Expect::At(r1))
                    .put("volumes/a", "v3")
                    .delete("volumes/b"),
            )
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict { .. }));
        let a = s.get("volumes/a").unwrap().unwrap();
        assert_eq!((a.value.as_slice(), a.revision), (&b"v2"[..], r2));
        assert!(s.get("volumes/b").unwrap().is_some());
        let (rev, all) = s.list("volumes/").unwrap();
        assert_eq!(rev, r2);
        assert_eq!(
            all.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["volumes/a", "volumes/b"]
        );
    }

    #[test]
    fn specs_and_revisions_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("specs.redb");
        {
            let s = EmbeddedStore::open(&path).unwrap();
            s.commit(Txn::new().put("nodes/n1", "a")).unwrap();
            s.commit(Txn::new().put("nodes/n2", "b").delete("nodes/n1"))
                .unwrap();
        }
        let s = EmbeddedStore::open(&path).unwrap();
        assert!(s.get("nodes/n1").unwrap().is_none());
        assert_eq!(s.get("nodes/n2").unwrap().unwrap().revision, 2);
        assert_eq!(s.commit(Txn::new().put("nodes/n3", "c")).unwrap(), 3);
        // History from before the reopen is still there for a watch.
        let mut w = s.watch("nodes/", 0).unwrap();
        let seen: Vec<_> = std::iter::from_fn(|| w.try_recv().ok())
            .map(|e| (e.key().to_string(), e.revision()))
            .collect();
        assert_eq!(
            seen,
            [
                ("nodes/n1".into(), 1),
                ("nodes/n2".into(), 2),
                ("nodes/n1".into(), 2),
                ("nodes/n3".into(), 3)
            ]
        );
    }

    #[test]
    fn a_watch_sees_history_then_live_changes_under_its_prefix_only() {
        let (_d, s) = store();
        s.commit(Txn::new().put("volumes/a", "1").put("nodes/x", "1"))
            .unwrap();
        let (rev, _) = s.list("volumes/").unwrap();
        s.commit(Txn::new().put("volumes/b", "2")).unwrap();
        let mut w = s.watch("volumes/", rev).unwrap();
        s.commit(Txn::new().put("nodes/y", "1").delete("volumes/a"))
            .unwrap();
        let e1 = w.try_recv().unwrap();
        assert_eq!((e1.key(), e1.revision()), ("volumes/b", 2));
        assert_eq!(
            w.try_recv().unwrap(),
            Event::Delete {
                key: "volumes/a".into(),
                revision: 3
            }
        );
        assert!(w.try_recv().is_err(), "nothing from nodes/");
    }

    #[test]
    fn a_watcher_that_falls_behind_is_ended_and_old_history_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            history: 50,
            watch_buffer: 20,
        };
        let s = EmbeddedStore::open_with(dir.path().join("specs.redb"), options).unwrap();
        let mut w = s.watch("k/", 0).unwrap();
        for i in 0..options.watch_buffer + 1 {
            s.commit(Txn::new().put(format!("k/{i}"), "v")).unwrap();
        }
        let mut n = 0;
        while w.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, options.watch_buffer);
        assert!(matches!(
            w.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        // Past HISTORY revisions, the oldest are compacted.
        for i in 0..options.history {
            s.commit(Txn::new().put("k/x", format!("{i}"))).unwrap();
        }
        let err = s.watch("k/", 1).unwrap_err();
        assert!(err.to_string().contains("list again"), "{err}");
        // The last `history` revisions are still there, across a reopen too.
        let (rev, _) = s.list("k/").unwrap();
        drop(s);
        let s = EmbeddedStore::open_with(dir.path().join("specs.redb"), options).unwrap();
        let mut w = s.watch("k/", rev - options.history).unwrap();
        assert_eq!(w.try_recv().unwrap().revision(), rev - options.history + 1);
        assert!(s.watch("k/", rev - options.history - 1).is_err());
    }

    #[test]
    fn a_leased_key_lives_while_renewed_and_goes_when_the_lease_expires() {
        let (_d, s) = store();
        let lease = s.grant_lease(Duration::from_secs(5)).unwrap();
        s.commit(
            Txn::new()
                .put_leased("leases/node/n1", "n1", lease)
                .put("volumes/a", "kept"),
        )
        .unwrap();
        let (rev, _) = s.list("").unwrap();
        let mut w = s.watch("leases/", rev).unwrap();
        s.keep_alive(lease).unwrap();
        assert!(s
            .expire_leases(Instant::now() + Duration::from_secs(4))
            .unwrap()
            .is_empty());
        assert_eq!(
            s.expire_leases(Instant::now() + Duration::from_secs(6)).unwrap(),
            vec![lease]
        );
        assert!(s.get("leases/node/n1").unwrap().is_none());
        assert!(s.get("volumes/a").unwrap().is_some());
        assert!(matches!(w.try_recv().unwrap(), Event::Delete { key, .. } if key == "leases/node/n1"));
        assert!(matches!(s.keep_alive(lease), Err(StoreError::NoLease(_))));
        let err = s
            .commit(Txn::new().put_leased("leases/node/n1", "n1", lease))
            .unwrap_err();
        assert!(err.to_string().contains("grant a new one"), "{err}");
    }

    #[test]
    fn leases_outlive_a_restart_by_one_ttl_and_revoke_deletes_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("specs.redb");
        let (kept, dropped) = {
            let s = EmbeddedStore::open(&path).unwrap();
            let a = s.grant_lease(Duration::from_secs(30)).unwrap();
            let b = s.grant_lease(Duration::from_secs(30)).unwrap();
            s.commit(Txn::new().put_leased("l/a", "", a).put_leased("l/b", "", b))
                .unwrap();
            s.revoke(b).unwrap();
            assert!(s.get("l/b").unwrap().is_none());
            (a, b)
        };
        let s = EmbeddedStore::open(&path).unwrap();
        assert!(s.get("l/a").unwrap().is_some());
        s.keep_alive(kept).unwrap();
        assert!(matches!(s.keep_alive(dropped), Err(StoreError::NoLease(_))));
        let fresh = s.grant_lease(Duration::from_secs(1)).unwrap();
        assert!(fresh > dropped, "ids are not reused");
        assert_eq!(
            s.expire_leases(Instant::now() + Duration::from_secs(31)).unwrap(),
            vec![kept, fresh]
        );
        assert!(s.get("l/a").unwrap().is_none());
    }

    #[test]
    fn bad_requests_get_clear_errors() {
        let (_d, s) = store();
        assert!(s
            .commit(Txn::new().put("", "x"))
            .unwrap_err()
            .to_string()
            .contains("1 to 1024 bytes"));
        assert!(s.grant_lease(Duration::ZERO).is_err());
        assert!(matches!(s.revoke(42), Err(StoreError::NoLease(42))));
        // A file that is not a database.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let err = EmbeddedStore::open(&path).err().unwrap();
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    }
}
