//! Restoring a backup into a volume (through its engine) or a file, and verifying a
//! backup where it is kept.
//!
//! A restore fetches each block once (one GET, however many replicas the volume
//! has: the engine fans the write out), checks it against its name, and writes it.
//! Fetchers run in parallel and hand blocks to the one writer through a bounded
//! queue, so memory is bounded by their number.
//!
//! - **Tolerant**: a block missing from the target or failing its check is reported
//!   with its offset and the others are restored; `strict` stops at the first.
//! - **Resumable**: with `check_existing`, each block the volume already holds (its
//!   content's name matches the manifest's) is skipped, so a restore that was
//!   interrupted goes on where it stopped, and a volume that already holds an older
//!   backup of the same volume (a DR volume) receives only what differs.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use horn_uring::{IoBuf, SpareBufs};

use crate::format::{decode_block_into, BlockId, Manifest};
use crate::store::ObjectStore;
use crate::BackupError;

/// Where a restore writes.
pub trait RestoreSink {
    /// The destination's size in bytes.
    fn size(&self) -> u64;
    /// Reads what the destination holds at `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String>;
    /// Writes `data` at `offset`.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), String>;
    /// Writes the block in `data` at `offset`, taking the buffer (a sink that
    /// queues its writes keeps it until the write is done, and copies nothing), and
    /// puts buffers whose writes are done into `spare`, for the restore to fetch
    /// into again.
    fn write_block(&mut self, offset: u64, data: IoBuf, spare: &mut Vec<IoBuf>) -> Result<(), String> {
        let r = self.write_at(offset, data.as_slice());
        spare.push(data);
        r
    }
    /// Called while the restore waits for fetched blocks: a sink with writes in
    /// flight waits until one of them is done (moving the others along meanwhile),
    /// puts the buffers of those done into `spare`, and says true. False: nothing
    /// was in flight (the default).
    fn progress(&mut self, spare: &mut Vec<IoBuf>) -> Result<bool, String> {
        let _ = spare;
        Ok(false)
    }
    /// Makes what was written durable.
    fn flush(&mut self) -> Result<(), String>;
    /// The ranges that may hold data, sorted (`None`: unknown, so every block is
    /// read to be compared). A block outside them reads as zeros without a read.
    fn written(&mut self) -> Option<Vec<(u64, u64)>> {
        None
    }
}

/// A plain file (or block device) as a restore's destination.
pub struct FileSink {
    file: std::fs::File,
    size: u64,
}

impl FileSink {
    /// `path`, created if missing, and grown (sparse) to `size` if smaller.
    pub fn create(path: &std::path::Path, size: u64) -> Result<FileSink, BackupError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| BackupError::Sink(format!("{}: {e}", path.display())))?;
        let have = file
            .metadata()
            .map_err(|e| BackupError::Sink(format!("{}: {e}", path.display())))?
            .len();
        if have < size {
            file.set_len(size)
                .map_err(|e| BackupError::Sink(format!("{}: {e}", path.display())))?;
        }
        Ok(FileSink {
            file,
            size: have.max(size),
        })
    }
}

impl RestoreSink for FileSink {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        self.file.read_exact_at(buf, offset).map_err(|e| e.to_string())
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(data, offset).map_err(|e| e.to_string())?;
        // Write-behind: the block goes to the disk while the next ones are fetched,
        // rather than all at the final sync. Only a hint (a failure here is seen by
        // the sync), so its result is not checked.
        // SAFETY: sync_file_range takes no pointers; the fd is this sink's open file.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset as i64,
                data.len() as i64,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        Ok(())
    }
    fn flush(&mut self) -> Result<(), String> {
        self.file.sync_all().map_err(|e| e.to_string())
    }

    /// The file's data ranges (SEEK_DATA, SEEK_HOLE): its holes read as zeros.
    fn written(&mut self) -> Option<Vec<(u64, u64)>> {
        use std::os::fd::AsRawFd;
        let fd = self.file.as_raw_fd();
        let mut out = Vec::new();
        let mut at: i64 = 0;
        loop {
            // SAFETY: lseek takes no pointers; fd is this sink's open file.
            let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
            if data < 0 {
                // ENXIO: no data past `at`. Anything else: unknown.
                let enxio = std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
                return enxio.then_some(out);
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            if hole <= data {
                return None;
            }
            out.push((data as u64, (hole - data) as u64));
            at = hole;
        }
    }
}

/// How to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Stop at the first bad block instead of restoring the others.
    pub strict: bool,
    /// Blocks fetched at once.
    pub parallel: usize,
    /// Compare each block with what the destination holds first (resume, follow).
    pub check_existing: bool,
    /// Only these blocks (by index); `None`: all.
    pub only: Option<Vec<u64>>,
}

impl Default for RestoreOptions {
    fn default() -> RestoreOptions {
        RestoreOptions {
            strict: false,
            parallel: 16,
            check_existing: true,
            only: None,
        }
    }
}

/// A block that could not be restored or verified.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BadBlock {
    /// Its index in the volume.
    pub index: u64,
    /// Its offset in the volume, bytes.
    pub offset: u64,
    /// Its length.
    pub len: u32,
    /// Its name (the SHA-256 of its content).
    pub block: String,
    /// What is wrong.
    pub reason: String,
}

impl std::fmt::Display for BadBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "block {} at offset {} ({} bytes, {}): {}",
            self.index, self.offset, self.len, self.block, self.reason
        )
    }
}

/// What a restore did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RestoreReport {
    /// The backup restored.
    pub backup: String,
    /// Blocks in the backup.
    pub blocks: u64,
    /// Blocks fetched and written.
    pub restored: u64,
    /// Blocks the destination already held.
    pub already_there: u64,
    /// Blocks of zeros written over other data.
    pub zeroed: u64,
    /// Bytes fetched from the target.
    pub fetched_bytes: u64,
    /// Bytes of the image written or found in place.
    pub size_bytes: u64,
    /// Blocks that could not be restored.
    pub bad: Vec<BadBlock>,
    /// Seconds it took.
    pub seconds: f64,
}

fn bad(m: &Manifest, index: u64, id: &BlockId, reason: String) -> BadBlock {
    BadBlock {
        index,
        offset: index * u64::from(m.block_size),
        len: m.block_len(index),
        block: id.to_hex(),
        reason,
    }
}

/// Fetches block `index` of `m`, checks it, and decodes it into `out` (as long as
/// the block). Returns the bytes fetched.
fn fetch_into(
    store: &dyn ObjectStore,
    m: &Manifest,
    index: u64,
    id: &BlockId,
    out: &mut [u8],
) -> Result<u64, BadBlock> {
    let obj = match store.get(&id.key()) {
        Ok(Some(o)) => o,
        Ok(None) => return Err(bad(m, index, id, "the block is not in the target".into())),
        Err(e) => return Err(bad(m, index, id, e.to_string())),
    };
    decode_block_into(&obj, id, out).map_err(|e| bad(m, index, id, e.to_string()))?;
    Ok(obj.len() as u64)
}

/// Buffers a restore fetches into, used again once the sink has written them: no
/// fresh (zeroed, faulted-in) block-sized buffer per block. Unbounded here: it holds
/// at most what the restore has in hand at once (fetchers, its queue, and the
/// sink's writes).
struct BufferPool(Mutex<SpareBufs>);

impl BufferPool {
    /// A buffer of `len` bytes, a spare one where there is one; the fetch fills it.
    fn take(&self, len: usize) -> IoBuf {
        self.0.lock().unwrap().take(len)
    }

    fn give_back(&self, spare: &mut Vec<IoBuf>) {
        let mut pool = self.0.lock().unwrap();
        spare.drain(..).for_each(|b| pool.keep(b));
    }
}

/// The blocks of backup `new` that differ from those of `old` (an older backup of
/// the same volume a destination holds): all of them if their block sizes differ,
/// and any not wholly within the older volume's size.
pub fn differing_blocks(old: &Manifest, new: &Manifest) -> Vec<u64> {
    let bs = u64::from(new.block_size);
    (0..new.blocks.len() as u64)
        .filter(|&i| {
            old.block_size != new.block_size
                || (i + 1) * bs > old.size
                || old.blocks.get(i as usize) != Some(&new.blocks[i as usize])
        })
        .collect()
}

/// Restores backup `m` from `store` into `sink`. Bad blocks are in the report
/// (`strict`: the first fails the restore).
pub fn restore(
    store: &dyn ObjectStore,
    m: &Manifest,
    sink: &mut dyn RestoreSink,
    opts: &RestoreOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<RestoreReport, BackupError> {
    let started = Instant::now();
    if sink.size() < m.size {
        return Err(BackupError::Invalid(format!(
            "backup {} of {} holds {} bytes and the destination has only {}: make it at least that large",
            m.name,
            m.volume,
            m.size,
            sink.size()
        )));
    }
    let mut report = RestoreReport {
        backup: m.name.clone(),
        blocks: m.blocks.len() as u64,
        size_bytes: m.size,
        ..Default::default()
    };
    let candidates: Vec<u64> = match &opts.only {
        Some(only) => only.iter().copied().filter(|&i| i < report.blocks).collect(),
        None => (0..report.blocks).collect(),
    };
    let bs = u64::from(m.block_size);

    // What the destination needs: each block compared with what it holds, or (on a
    // fresh destination) every stored block.
    let mut wanted: Vec<(u64, BlockId)> = Vec::new();
    let mut buf = vec![0u8; m.block_size as usize];
    let written = if opts.check_existing { sink.written() } else { None };
    let maybe_data = |start: u64, len: u64| match &written {
        None => true,
        Some(ranges) => {
            // The first range ending after `start` decides.
            let i = ranges.partition_point(|&(o, l)| o + l <= start);
            ranges.get(i).is_some_and(|&(o, _)| o < start + len)
        }
    };
    let total = candidates.len() as u64;
    for (n, &index) in candidates.iter().enumerate() {
        let len = m.block_len(index) as usize;
        let entry = m.blocks[index as usize];
        if !opts.check_existing {
            match entry {
                Some(id) => wanted.push((index, id)),
                None => report.already_there += 1,
            }
            continue;
        }
        let here = &mut buf[..len];
        let zero = if maybe_data(index * bs, len as u64) {
            sink.read_at(index * bs, here).map_err(BackupError::Sink)?;
            here.iter().all(|&b| b == 0)
        } else {
            here.fill(0);
            true
        };
        match entry {
            None if zero => report.already_there += 1,
            None => {
                here.fill(0);
                sink.write_at(index * bs, here).map_err(BackupError::Sink)?;
                report.zeroed += 1;
            }
            Some(id) if !zero && BlockId::of(here) == id => {
                report.already_there += 1;
                progress(n as u64 + 1, total);
            }
            Some(id) => wanted.push((index, id)),
        }
    }

    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        to_fetch = wanted.len(),
        already = report.already_there,
        "restore: the destination compared with the backup"
    );
    // Fetch in parallel, write here, in whatever order they come.
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let fetched = Arc::new(Mutex::new(0u64));
    let (tx, rx) = sync_channel::<Result<(u64, IoBuf), BadBlock>>(opts.parallel.max(1));
    let pool = BufferPool(Mutex::new(SpareBufs::new(usize::MAX)));
    let mut spare = Vec::new();
    let mut first_sink_error = None;
    let done_before = report.already_there + report.zeroed;
    std::thread::scope(|s| {
        for _ in 0..opts.parallel.max(1) {
            let tx = tx.clone();
            let (wanted, next, stop, fetched, pool) = (&wanted, &next, &stop, fetched.clone(), &pool);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Some(&(index, id)) = wanted.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        return;
                    };
                    let mut data = pool.take(m.block_len(index) as usize);
                    let r = fetch_into(store, m, index, &id, data.as_mut_slice()).map(|n| {
                        *fetched.lock().unwrap() += n;
                        (index, data)
                    });
                    if tx.send(r).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let mut done = done_before;
        loop {
            // While no block is in hand, the sink moves its writes along (an engine's
            // queue sends only while its thread drives it).
            let r = match rx.try_recv() {
                Ok(r) => r,
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    match sink.progress(&mut spare) {
                        Ok(true) => {
                            pool.give_back(&mut spare);
                            continue;
                        }
                        Ok(false) => {}
                        Err(e) => {
                            first_sink_error.get_or_insert(e);
                            stop.store(true, Ordering::Relaxed);
                            break;
                        }
                    }
                    match rx.recv() {
                        Ok(r) => r,
                        Err(_) => break,
                    }
                }
            };
            match r {
                Ok((index, data)) => {
                    let written = sink.write_block(index * bs, data, &mut spare);
                    pool.give_back(&mut spare);
                    if let Err(e) = written {
                        first_sink_error.get_or_insert(e);
                        stop.store(true, Ordering::Relaxed);
                        break;
                    }
                    report.restored += 1;
                }
                Err(b) => {
                    tracing::warn!(bad = %b, "a block of the backup cannot be restored");
                    report.bad.push(b);
                    if opts.strict {
                        stop.store(true, Ordering::Relaxed);
                        break;
                    }
                }
            }
            done += 1;
            progress(done, total);
        }
        // Let the fetchers see the stop, then drain what they still send.
        stop.store(true, Ordering::Relaxed);
        for _ in rx.iter() {}
    });
    if let Some(e) = first_sink_error {
        return Err(BackupError::Sink(e));
    }
    if opts.strict {
        if let Some(b) = report.bad.first() {
            return Err(BackupError::Invalid(format!(
                "restore of backup {} stopped (strict): {b}",
                m.name
            )));
        }
    }
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        "restore: blocks written; flushing"
    );
    sink.flush().map_err(BackupError::Sink)?;
    report.bad.sort_by_key(|b| b.index);
    report.fetched_bytes = *fetched.lock().unwrap();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// What a verify found.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct VerifyReport {
    /// Backups checked.
    pub backups: u64,
    /// Distinct blocks they name, each fetched and checked once.
    pub blocks: u64,
    /// Bytes fetched.
    pub fetched_bytes: u64,
    /// Blocks missing or failing their check, with the first backup naming each.
    pub bad: Vec<(String, BadBlock)>,
    /// Seconds it took.
    pub seconds: f64,
}

/// Fetches and re-hashes every block the backups `ms` name (each distinct block
/// once), `parallel` at a time.
pub fn verify(
    store: &dyn ObjectStore,
    ms: &[Manifest],
    parallel: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> VerifyReport {
    let started = Instant::now();
    let mut seen = std::collections::BTreeSet::new();
    let mut work: Vec<(usize, u64, BlockId)> = Vec::new();
    for (mi, m) in ms.iter().enumerate() {
        for (i, b) in m.blocks.iter().enumerate() {
            if let Some(id) = b {
                if seen.insert(*id) {
                    work.push((mi, i as u64, *id));
                }
            }
        }
    }
    let total = work.len() as u64;
    let next = AtomicUsize::new(0);
    let done = std::sync::atomic::AtomicU64::new(0);
    let report = Mutex::new(VerifyReport {
        backups: ms.len() as u64,
        blocks: total,
        ..Default::default()
    });
    std::thread::scope(|s| {
        for _ in 0..parallel.max(1) {
            s.spawn(|| {
                let mut buf = Vec::new();
                while let Some(&(mi, index, id)) = work.get(next.fetch_add(1, Ordering::Relaxed)) {
                    buf.resize(ms[mi].block_len(index) as usize, 0);
                    let r = fetch_into(store, &ms[mi], index, &id, &mut buf);
                    let mut rep = report.lock().unwrap();
                    match r {
                        Ok(n) => rep.fetched_bytes += n,
                        Err(b) => rep.bad.push((ms[mi].name.clone(), b)),
                    }
                    drop(rep);
                    progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
                }
            });
        }
    });
    let mut report = report.into_inner().unwrap();
    report
        .bad
        .sort_by(|a, b| (&a.0, a.1.index).cmp(&(&b.0, b.1.index)));
    report.seconds = started.elapsed().as_secs_f64();
    report
}
