//! `SharedReplica`: a replica hosted inside the engine's own process, so that the
//! engine's queues reach its files without a socket hop.
//!
//! A replica process serves its data over TCP from one thread that owns it. For the
//! replica on the engine's own node, that is two socket hops and a process switch per
//! I/O on a path whose only real work is a file read or write. Here the engine's queues
//! do the file I/O themselves, on their own rings, next to the frontend's sockets:
//!
//! 1. under the replica's lock, a queue *plans* an I/O: admits it as the data wire
//!    does, through the one admission (`admission.rs`: generation, mode, range,
//!    and the write-intent mark before a change), resolves each
//!    block through the index to a layer file, and takes a shared handle of each file
//!    it will touch. Never-written ranges of a read are zero-filled right there.
//! 2. it submits the reads, writes and fdatasyncs on its own ring, with no lock held;
//! 3. under the lock again, it *finishes* the I/O: a write's blocks become the head's
//!    in the index.
//!
//! The lock guards the index and the chain, held for a lookup or an update, never for
//! I/O on the fast path. The slow paths that the data wire also runs inline take their
//! I/O under it: the first write to a write-intent region (one fdatasync of
//! `intent.bits`), partial-block writes that merge with an older layer, discard and
//! write-zeroes.
//!
//! Chain operations (snapshot, revert, purge, expand, a rebuild's install) change which
//! file backs which block. They come through [`SharedReplica::call`] and are refused
//! while a queue has I/O of its own in flight (the engine pauses its queues around
//! them, so they never are); the file handles keep every descriptor in use open
//! whatever happens.
//!
//! Control operations (snapshots, checksums, rebuild syncs) run through the same lock
//! with [`SharedReplica::call`], and the gRPC control service serves this replica like
//! any other (see [`crate::server::ServerHandle::shared`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::admission::{Access, Caller};
use crate::error::{ReplicaError, Result};
use crate::extent::BlockRun;
use crate::replica::Replica;

/// One file operation of a planned I/O.
#[derive(Debug)]
pub struct FilePiece {
    /// The layer file (kept open while the piece is in flight).
    pub file: Arc<File>,
    /// Offset in the file (the same as in the volume).
    pub file_offset: u64,
    /// Offset in the caller's buffer.
    pub buf_offset: usize,
    /// Bytes (zero for an fdatasync).
    pub len: usize,
    /// The file is open with `O_DIRECT`: the I/O goes around the page cache.
    pub direct: bool,
}

/// What a planned I/O does with its pieces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalKind {
    /// Read each piece into the buffer.
    Read,
    /// Write the buffer to the one piece, the head.
    Write,
    /// fdatasync the one piece, the head.
    Flush,
}

/// An I/O planned on a shared replica: the caller submits its pieces and then hands
/// it back to [`SharedReplica::finish`], whatever their outcome.
#[derive(Debug)]
#[must_use = "a planned I/O must be finished"]
pub struct LocalIo {
    /// What to do with the pieces.
    pub kind: LocalKind,
    /// The file operations, all independent of one another.
    pub pieces: Vec<FilePiece>,
    /// For writes: what becomes the head's once the write lands.
    written: Option<HeadWrite>,
}

/// The blocks a planned write gives the head, and which head: if the head changed
/// meanwhile, the blocks are not painted.
#[derive(Debug, Clone, Copy)]
struct HeadWrite {
    /// The head's layer id when the write was planned.
    head: u64,
    /// The blocks the write covers.
    blocks: BlockRun,
}

/// The data address prefix of a replica hosted in this process: `inproc:DIR`.
pub const INPROC_PREFIX: &str = "inproc:";

/// The replicas hosted in this process, by data address.
static HOSTED: Mutex<BTreeMap<String, Arc<SharedReplica>>> = Mutex::new(BTreeMap::new());

fn hosted_map() -> MutexGuard<'static, BTreeMap<String, Arc<SharedReplica>>> {
    HOSTED.lock().unwrap_or_else(|p| p.into_inner())
}

/// A replica opened in this process and shared by the engine's queues.
#[derive(Debug)]
pub struct SharedReplica {
    replica: Mutex<Replica>,
    dir: PathBuf,
}

impl SharedReplica {
    /// Shares `replica` between threads. Its own ring (used by the blocking paths
    /// under the lock) becomes a plain one, since different threads take turns on it.
    pub fn new(mut replica: Replica) -> Result<Arc<SharedReplica>> {
        replica.make_ring_shareable()?;
        Ok(Arc::new(SharedReplica {
            dir: replica.dir().to_path_buf(),
            replica: Mutex::new(replica),
        }))
    }

    /// Makes the replica reachable by the engine's queues at the returned data
    /// address, `inproc:DIR`. Fails if a replica is hosted there already.
    pub fn host(self: &Arc<Self>) -> Result<String> {
        let addr = format!("{INPROC_PREFIX}{}", self.dir.display());
        let mut map = hosted_map();
        if map.contains_key(&addr) {
            return Err(ReplicaError::InvalidOperation(format!(
                "replica {} is hosted in this process already",
                self.dir.display()
            )));
        }
        map.insert(addr.clone(), self.clone());
        Ok(addr)
    }

    /// The hosted replica at data address `addr`: `Ok(None)` if `addr` is not an
    /// in-process address, an error if it is one but nothing is hosted there.
    pub fn hosted(addr: &str) -> Result<Option<Arc<SharedReplica>>> {
        if !addr.starts_with(INPROC_PREFIX) {
            return Ok(None);
        }
        match hosted_map().get(addr) {
            Some(r) => Ok(Some(r.clone())),
            None => Err(ReplicaError::Unavailable(format!(
                "no replica is hosted in this process at {addr}: an in-process replica is reachable only from the engine that hosts it"
            ))),
        }
    }

    /// Stops hosting the replica at `addr` (queues already holding it keep it).
    pub fn unhost(addr: &str) -> Option<Arc<SharedReplica>> {
        hosted_map().remove(addr)
    }

    /// The replica's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> MutexGuard<'_, Replica> {
        // A panic under the lock leaves no half-made change the replica's own checks
        // would not catch: its metadata changes are whole-file replacements.
        self.replica.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` with the replica, under its lock (control operations).
    pub fn call<T>(&self, f: impl FnOnce(&mut Replica) -> T) -> T {
        f(&mut self.lock())
    }

    /// Plans a read of `buf.len()` bytes at `offset` for an engine holding
    /// `generation`: fills the never-written parts of `buf` with zeros and returns the
    /// file reads that fill the rest, or `None` if nothing is left to read.
    pub fn plan_read(&self, generation: u64, offset: u64, buf: &mut [u8]) -> Result<Option<LocalIo>> {
        let mut r = self.lock();
        let len = buf.len() as u64;
        r.admit(generation, Caller::Host, Access::Read { offset, len })?;
        let mut pieces = std::mem::take(&mut r.pieces);
        pieces.clear();
        r.chain.segments(offset, len, |p| pieces.push(p));
        let mut out = Vec::new();
        let base = buf.as_ptr();
        let mut result = Ok(());
        for p in &pieces {
            let Some(pos) = p.layer else {
                buf[p.buf_offset..p.buf_offset + p.len].fill(0);
                continue;
            };
            // SAFETY: buf_offset + len <= buf.len(), from `segments`.
            let ptr = unsafe { base.add(p.buf_offset) };
            match r.chain.file_for(pos, p.volume_offset, p.len, ptr) {
                Ok(held) => out.push(FilePiece {
                    file: held.file,
                    file_offset: p.volume_offset,
                    buf_offset: p.buf_offset,
                    len: p.len,
                    direct: held.direct,
                }),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        r.pieces = pieces;
        result?;
        if out.is_empty() {
            return Ok(None);
        }
        r.external_io_started();
        Ok(Some(LocalIo {
            kind: LocalKind::Read,
            pieces: out,
            written: None,
        }))
    }

    /// Plans a write of `data` at `offset`: marks its write-intent region and returns
    /// the one write to the head, or `None` if the replica wrote it already (a partial
    /// block merged with an older layer, or nothing to write).
    pub fn plan_write(&self, generation: u64, offset: u64, data: &[u8]) -> Result<Option<LocalIo>> {
        let mut r = self.lock();
        let len = data.len() as u64;
        r.admit(generation, Caller::Host, Access::Change { offset, len })?;
        let Some(blocks) = r.prepare_write(offset, data)? else {
            return Ok(None);
        };
        let head = r.chain.head_position();
        let held = r.chain.file_for(head, offset, data.len(), data.as_ptr())?;
        r.external_io_started();
        Ok(Some(LocalIo {
            kind: LocalKind::Write,
            pieces: vec![FilePiece {
                file: held.file,
                file_offset: offset,
                buf_offset: 0,
                len: data.len(),
                direct: held.direct,
            }],
            written: Some(HeadWrite {
                head: r.meta().head,
                blocks,
            }),
        }))
    }

    /// Plans a flush: one fdatasync of the head, after which every write finished
    /// before it is durable.
    pub fn plan_flush(&self, generation: u64) -> Result<LocalIo> {
        let mut r = self.lock();
        r.admit(generation, Caller::Host, Access::Flush)?;
        let held = r.chain.head().file_for(false)?;
        r.external_io_started();
        Ok(LocalIo {
            kind: LocalKind::Flush,
            pieces: vec![FilePiece {
                file: held.file,
                file_offset: 0,
                buf_offset: 0,
                len: 0,
                direct: held.direct,
            }],
            written: None,
        })
    }

    /// Discards `[offset, offset + len)` (reads as zeros after), or writes zeros
    /// there (`zeroes`), on the caller's thread.
    pub fn discard(&self, generation: u64, offset: u64, len: u64, zeroes: bool) -> Result<()> {
        let mut r = self.lock();
        r.admit(generation, Caller::Host, Access::Change { offset, len })?;
        if zeroes {
            r.write_zeroes(offset, len)
        } else {
            r.discard(offset, len)
        }
    }

    /// Finishes a planned I/O whose pieces have all completed (`ok`: each moved all
    /// its bytes). A write's blocks become the head's, unless the chain changed under
    /// it, which the engine's pauses rule out and which fails the write here rather
    /// than leave the index pointing at the wrong layer.
    pub fn finish(&self, io: LocalIo, ok: bool) -> Result<()> {
        let mut r = self.lock();
        r.external_io_finished();
        if let (true, Some(write)) = (ok, io.written) {
            if r.meta().head != write.head {
                return Err(ReplicaError::InvalidOperation(format!(
                    "the head of replica {} changed while a write to it was in flight",
                    self.dir.display()
                )));
            }
            r.chain.paint(write.blocks);
        }
        Ok(())
    }

    /// Flushes and closes the replica, once every other holder has let it go.
    pub fn close(self: Arc<Self>) -> Result<()> {
        match Arc::try_unwrap(self) {
            Ok(s) => s.replica.into_inner().unwrap_or_else(|p| p.into_inner()).close(),
            Err(s) => {
                let r = &mut s.lock();
                r.flush()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::state::Mode;

    const GEN: u64 = 5;

    fn shared(dir: &Path) -> Arc<SharedReplica> {
        let mut r = Replica::create(dir, 4 << 20, 512).unwrap();
        r.set_generation(GEN).unwrap();
        SharedReplica::new(r).unwrap()
    }

    /// Does a planned I/O's file operations with plain system calls, as the engine's
    /// ring would; true if each moved all its bytes.
    fn run(io: &LocalIo, buf: &mut [u8]) -> bool {
        io.pieces.iter().all(|p| {
            let range = p.buf_offset..p.buf_offset + p.len;
            match io.kind {
                LocalKind::Read => p.file.read_exact_at(&mut buf[range], p.file_offset).is_ok(),
                LocalKind::Write => p.file.write_all_at(&buf[range], p.file_offset).is_ok(),
                LocalKind::Flush => p.file.sync_data().is_ok(),
            }
        })
    }

    fn write(s: &SharedReplica, offset: u64, data: &[u8]) {
        if let Some(io) = s.plan_write(GEN, offset, data).unwrap() {
            let ok = run(&io, &mut data.to_vec());
            s.finish(io, ok).unwrap();
        }
    }

    fn read(s: &SharedReplica, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0xee; len];
        if let Some(io) = s.plan_read(GEN, offset, &mut buf).unwrap() {
            let ok = run(&io, &mut buf);
            s.finish(io, ok).unwrap();
        }
        buf
    }

    #[test]
    fn planned_writes_read_back_and_holes_read_as_zeros() {
        let tmp = tempfile::tempdir().unwrap();
        let s = shared(tmp.path());
        assert_eq!(
            read(&s, 0, 8192),
            vec![0; 8192],
            "a never-written range is zero-filled"
        );
        write(&s, 4096, &[7; 4096]);
        let back = read(&s, 0, 12288);
        assert_eq!(&back[..4096], &[0; 4096][..]);
        assert_eq!(&back[4096..8192], &[7; 4096][..]);
        assert_eq!(&back[8192..], &[0; 4096][..]);
        // A sub-block write merges with what is there.
        write(&s, 4096 + 512, &[9; 512]);
        let back = read(&s, 4096, 4096);
        assert_eq!(&back[..512], &[7; 512][..]);
        assert_eq!(&back[512..1024], &[9; 512][..]);
        assert_eq!(&back[1024..], &[7; 3072][..]);
        let flush = s.plan_flush(GEN).unwrap();
        assert!(run(&flush, &mut []));
        s.finish(flush, true).unwrap();
        s.close().unwrap();
        // What the engine wrote is the replica's, for a plain open too.
        let mut r = Replica::open(tmp.path()).unwrap();
        let mut b = vec![0; 4096];
        r.read_at(4096, &mut b).unwrap();
        assert_eq!(&b[512..1024], &[9; 512][..]);
    }

    #[test]
    fn a_write_that_failed_is_not_painted() {
        let tmp = tempfile::tempdir().unwrap();
        let s = shared(tmp.path());
        let io = s.plan_write(GEN, 0, &[3; 4096]).unwrap().unwrap();
        s.finish(io, false).unwrap();
        assert_eq!(read(&s, 0, 4096), vec![0; 4096]);
    }

    #[test]
    fn chain_changes_wait_for_the_engine_io_in_flight() {
        let tmp = tempfile::tempdir().unwrap();
        let s = shared(tmp.path());
        write(&s, 0, &[1; 4096]);
        let io = s.plan_write(GEN, 0, &[2; 4096]).unwrap().unwrap();
        let refused = s.call(|r| r.snapshot("s1", &BTreeMap::new()));
        assert!(
            matches!(&refused, Err(ReplicaError::InvalidOperation(m)) if m.contains("in flight")),
            "{refused:?}"
        );
        assert!(run(&io, &mut vec![2; 4096]));
        s.finish(io, true).unwrap();
        s.call(|r| r.snapshot("s1", &BTreeMap::new())).unwrap();
        write(&s, 0, &[3; 4096]);
        assert_eq!(read(&s, 0, 4096), vec![3; 4096]);
        s.call(|r| r.revert("s1")).unwrap();
        assert_eq!(
            read(&s, 0, 4096),
            vec![2; 4096],
            "the snapshot holds the finished write"
        );
    }

    #[test]
    fn requests_are_checked_like_the_data_wire_checks_them() {
        let tmp = tempfile::tempdir().unwrap();
        let s = shared(tmp.path());
        let mut buf = vec![0; 4096];
        assert!(matches!(
            s.plan_read(GEN - 1, 0, &mut buf),
            Err(ReplicaError::StaleGeneration {
                current: GEN,
                given: 4
            })
        ));
        assert!(matches!(
            s.plan_write(GEN + 1, 0, &buf),
            Err(ReplicaError::Unavailable(_))
        ));
        let past = s.plan_write(GEN, (4 << 20) - 2048, &buf);
        assert!(matches!(past, Err(ReplicaError::OutOfRange { .. })), "{past:?}");
        s.call(|r| r.set_mode(Mode::Wo)).unwrap();
        assert!(matches!(
            s.plan_read(GEN, 0, &mut buf),
            Err(ReplicaError::Unavailable(_))
        ));
        write(&s, 0, &buf);
        // Nothing refused was left counted in flight.
        s.call(|r| r.snapshot("s1", &BTreeMap::new())).unwrap();
    }

    #[test]
    fn hosted_addresses() {
        let tmp = tempfile::tempdir().unwrap();
        let s = shared(tmp.path());
        assert!(SharedReplica::hosted("127.0.0.1:9500").unwrap().is_none());
        let addr = s.host().unwrap();
        assert!(addr.starts_with(INPROC_PREFIX));
        assert!(Arc::ptr_eq(&SharedReplica::hosted(&addr).unwrap().unwrap(), &s));
        assert!(s.host().is_err(), "one replica per address");
        SharedReplica::unhost(&addr);
        let gone = SharedReplica::hosted(&addr);
        assert!(matches!(&gone, Err(ReplicaError::Unavailable(m)) if m.contains("no replica is hosted")));
    }
}
