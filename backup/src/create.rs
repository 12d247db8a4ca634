//! Making a backup: a snapshot's image, read from a replica's files, cut into blocks
//! and sent to a target.
//!
//! Only the blocks that may have changed since the parent backup's snapshot are
//! read (the replica's extent maps say which: [`SnapshotImage::changed_since`]);
//! the others are the parent's. A block of zeros is not stored; a block the target
//! already holds (by its content's name) is not sent again, unless the backup is
//! `full`, which reads and sends every block (and so replaces one that was
//! corrupted in the target). Readers run in parallel, each with one block in hand,
//! so memory is bounded by their number. The manifest is written last, once every
//! block it names is in the target, under a lease that keeps garbage collection
//! away ([`crate::lease`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use horn_replica::image::SnapshotImage;
use serde::{Deserialize, Serialize};

use crate::format::{check_block_size, check_name, encode_block, BlockId, Compression, Manifest, FORMAT};
use crate::lease::{Lease, LeaseKind};
use crate::store::ObjectStore;
use crate::BackupError;

/// What to back up, and how.
#[derive(Debug, Clone)]
pub struct BackupRequest {
    /// The volume's name (its backups' prefix in the target).
    pub volume: String,
    /// The backup's name.
    pub name: String,
    /// The snapshot backed up.
    pub snapshot: String,
    /// Bytes per block for a volume's first backup (later ones keep the parent's).
    pub block_size: u32,
    /// How new blocks are compressed.
    pub compression: Compression,
    /// Read and send every block, whatever the parent and the target hold.
    pub full: bool,
    /// Blocks read and sent at once.
    pub parallel: usize,
    /// Labels kept in the manifest.
    pub labels: BTreeMap<String, String>,
    /// How long to wait for a garbage collection holding the target.
    pub lease_wait: Duration,
}

impl BackupRequest {
    /// A backup of `snapshot` of `volume` named `name`, with the defaults.
    pub fn new(volume: &str, name: &str, snapshot: &str) -> BackupRequest {
        BackupRequest {
            volume: volume.to_string(),
            name: name.to_string(),
            snapshot: snapshot.to_string(),
            block_size: crate::format::DEFAULT_BLOCK_SIZE,
            compression: Compression::Lz4,
            full: false,
            parallel: 4,
            labels: BTreeMap::new(),
            lease_wait: Duration::from_secs(600),
        }
    }
}

/// What a backup did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BackupReport {
    /// The backup's name.
    pub name: String,
    /// The backup it was made incrementally from.
    pub parent: Option<String>,
    /// The volume's size.
    pub size_bytes: u64,
    /// Blocks in the volume.
    pub blocks: u64,
    /// Blocks read from the replica (the others were the parent's).
    pub blocks_read: u64,
    /// Bytes read from the replica.
    pub read_bytes: u64,
    /// Blocks sent to the target.
    pub blocks_uploaded: u64,
    /// Bytes sent (compressed, with headers; the manifest included).
    pub uploaded_bytes: u64,
    /// Blocks read that the target already held.
    pub blocks_deduplicated: u64,
    /// Blocks of zeros (not stored).
    pub zero_blocks: u64,
    /// Seconds it took.
    pub seconds: f64,
}

/// Where a backup is, for a progress bar: blocks done of blocks to read.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// The parent a backup of `image` can be made incrementally from: of the volume's
/// backups whose snapshot is still in `dir`'s chain below `image` (and of the same
/// size or smaller), the one whose snapshot is nearest `image` in the chain (the
/// least to read), opened; backups' clocks do not decide it, as several may be made
/// within a second. `None`: a full read.
pub fn find_parent(
    store: &dyn ObjectStore,
    volume: &str,
    dir: &std::path::Path,
    image: &SnapshotImage,
) -> Result<Option<(Manifest, SnapshotImage)>, BackupError> {
    let mut best: Option<(Manifest, SnapshotImage)> = None;
    for m in crate::list_backups(store, volume)? {
        if m.size > image.size() {
            continue;
        }
        let Ok(older) = SnapshotImage::open(dir, &m.snapshot) else {
            continue;
        };
        if !image.descends_from(&older) {
            continue;
        }
        let nearer = match &best {
            None => true,
            Some((b, bi)) => {
                older.descends_from(bi) || (m.snapshot == b.snapshot && m.created_unix > b.created_unix)
            }
        };
        if nearer {
            best = Some((m, older));
        }
    }
    Ok(best)
}

/// Backs up `image` (snapshot `req.snapshot` of a replica) to `store`, incrementally
/// from `parent` where given (a manifest of this volume and its snapshot's image in
/// the same chain).
pub fn backup(
    store: Arc<dyn ObjectStore>,
    image: &SnapshotImage,
    parent: Option<(&Manifest, &SnapshotImage)>,
    req: &BackupRequest,
    progress: Progress<'_>,
) -> Result<BackupReport, BackupError> {
    let started = Instant::now();
    check_name("volume", &req.volume)?;
    check_name("backup", &req.name)?;
    let key = Manifest::key(&req.volume, &req.name);
    if store.exists(&key)? {
        return Err(BackupError::Invalid(format!(
            "{}: volume {} already has a backup named {}",
            store.url(),
            req.volume,
            req.name
        )));
    }
    // The lease first: from here no collection runs until the manifest is written,
    // so the parent's blocks, and any block found in the target, stay there.
    let lease = Lease::take(
        store.clone(),
        LeaseKind::Backup,
        &format!("backup {}/{}", req.volume, req.name),
        req.lease_wait,
    )?;
    // A parent deleted before the lease was taken may have lost blocks already.
    let mut parent = parent.filter(|_| !req.full);
    if let Some((m, _)) = parent {
        if !store.exists(&Manifest::key(&m.volume, &m.name))? {
            tracing::info!(parent = %m.name, "the parent backup was deleted; reading every block");
            parent = None;
        }
    }
    let block_size = parent.map_or(req.block_size, |(m, _)| m.block_size);
    check_block_size(block_size)?;
    let size = image.size();
    let count = Manifest::block_count(size, block_size);
    let bs = u64::from(block_size);

    // Which blocks to read: those the changed ranges touch.
    let ranges = match (parent, req.full) {
        (_, true) | (None, _) => image.allocated(),
        (Some((_, older)), false) => image.changed_since(Some(older)),
    };
    let mut todo = BTreeSet::new();
    for r in &ranges {
        let first = r.offset / bs;
        let last = (r.offset + r.len - 1) / bs;
        todo.extend(first..=last.min(count - 1));
    }
    let todo: Vec<u64> = todo.into_iter().collect();

    // Every other block is the parent's (or zeros where there is none).
    let mut blocks: Vec<Option<BlockId>> = vec![None; count as usize];
    let known: BTreeSet<BlockId> = match parent {
        Some((m, _)) => {
            for (i, b) in m.blocks.iter().enumerate() {
                blocks[i] = *b;
            }
            m.referenced()
        }
        None => BTreeSet::new(),
    };

    let report = Mutex::new(BackupReport {
        name: req.name.clone(),
        parent: parent.map(|(m, _)| m.name.clone()),
        size_bytes: size,
        blocks: count,
        ..Default::default()
    });
    let results: Mutex<Vec<(u64, Option<BlockId>)>> = Mutex::new(Vec::with_capacity(todo.len()));
    let sent_here: Mutex<BTreeSet<BlockId>> = Mutex::new(BTreeSet::new());
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<BackupError>> = Mutex::new(None);
    let total = todo.len() as u64;
    progress(0, total);

    std::thread::scope(|s| {
        for _ in 0..req.parallel.max(1) {
            s.spawn(|| {
                let mut buf = vec![0u8; block_size as usize];
                while !failed.load(Ordering::Relaxed) {
                    let Some(&index) = todo.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        return;
                    };
                    let len = (size - index * bs).min(bs) as usize;
                    let r = (|| -> Result<(), BackupError> {
                        let data = &mut buf[..len];
                        image
                            .read_at(index * bs, data)
                            .map_err(|e| BackupError::Source(e.to_string()))?;
                        let mut rep = BackupReport {
                            blocks_read: 1,
                            read_bytes: len as u64,
                            ..Default::default()
                        };
                        let id = if data.iter().all(|&b| b == 0) {
                            rep.zero_blocks = 1;
                            None
                        } else {
                            let id = BlockId::of(data);
                            // The first reader of a content sends it (once per
                            // backup, even a full one); the others name it.
                            let first = sent_here.lock().unwrap().insert(id);
                            let have =
                                !first || (!req.full && (known.contains(&id) || store.exists(&id.key())?));
                            if have {
                                rep.blocks_deduplicated = 1;
                            } else {
                                let obj = encode_block(data, req.compression);
                                store.put(&id.key(), &obj)?;
                                rep.blocks_uploaded = 1;
                                rep.uploaded_bytes = obj.len() as u64;
                            }
                            Some(id)
                        };
                        results.lock().unwrap().push((index, id));
                        let mut all = report.lock().unwrap();
                        all.blocks_read += rep.blocks_read;
                        all.read_bytes += rep.read_bytes;
                        all.zero_blocks += rep.zero_blocks;
                        all.blocks_deduplicated += rep.blocks_deduplicated;
                        all.blocks_uploaded += rep.blocks_uploaded;
                        all.uploaded_bytes += rep.uploaded_bytes;
                        Ok(())
                    })();
                    match r {
                        Ok(()) => progress(done.fetch_add(1, Ordering::Relaxed) + 1, total),
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            first_error.lock().unwrap().get_or_insert(e);
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap() {
        return Err(e);
    }
    for (index, id) in results.into_inner().unwrap() {
        blocks[index as usize] = id;
    }
    let manifest = Manifest {
        format: FORMAT,
        volume: req.volume.clone(),
        name: req.name.clone(),
        snapshot: req.snapshot.clone(),
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        size,
        block_size,
        compression: req.compression,
        parent: parent.map(|(m, _)| m.name.clone()),
        blocks,
        labels: req.labels.clone(),
    };
    let bytes = manifest.to_bytes();
    // Every block named was in the target while the lease held: a collection could
    // not have removed one since.
    lease.check()?;
    store.put(&key, &bytes)?;
    drop(lease);
    let mut report = report.into_inner().unwrap();
    report.uploaded_bytes += bytes.len() as u64;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}
