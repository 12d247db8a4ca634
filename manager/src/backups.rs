//! Backups as `hornd` runs them: a replica's server backs up its snapshots
//! ([`ReplicaBackups`]), an engine's server restores backups into its volume
//! ([`EngineRestores`]), both with horn-backup. The replica and engine crates only
//! know the traits; the targets' clients (S3) live here, in the daemon.

use std::path::Path;
use std::sync::Arc;

use horn_backup::create::{backup, find_parent, BackupRequest};
use horn_backup::format::{Compression, DEFAULT_BLOCK_SIZE};
use horn_backup::restore::{restore, RestoreOptions, RestoreSink};
use horn_backup::s3::S3Settings;
use horn_backup::store::{open_target, ObjectStore};
use horn_engine::replica_set::IoKind;
use horn_engine::{Engine, Volume};
use horn_proto::control::{BackupRequest as WireBackup, BackupTarget};
use horn_proto::engine_control::RestoreRequest;
use horn_proto::wire::MAX_IO_LEN;
use horn_replica::image::SnapshotImage;
use horn_replica::IoBuf;

/// The S3 settings a wire target carries (empty fields: the process's environment).
pub fn s3_settings(t: &BackupTarget) -> S3Settings {
    S3Settings {
        endpoint: t.endpoint.clone(),
        region: t.region.clone(),
        access_key: t.access_key.clone(),
        secret_key: t.secret_key.clone(),
    }
}

/// Opens the target a request names.
pub fn open(t: Option<&BackupTarget>) -> Result<Arc<dyn ObjectStore>, String> {
    let t = t.ok_or("no backup target given")?;
    open_target(&t.url, &s3_settings(t))
        .map(Arc::from)
        .map_err(|e| e.to_string())
}

/// Compression by name: `lz4` (also the empty default), `zstd`, `none`.
pub fn parse_compression(s: &str) -> Result<Compression, String> {
    match s {
        "" | "lz4" => Ok(Compression::Lz4),
        "zstd" => Ok(Compression::Zstd),
        "none" => Ok(Compression::None),
        other => Err(format!("{other:?} is not a compression: give lz4, zstd or none")),
    }
}

/// A replica server's backups: of its own snapshots, read from its files.
pub struct ReplicaBackups;

impl horn_replica::control::BackupRunner for ReplicaBackups {
    fn run(
        &self,
        dir: &Path,
        req: WireBackup,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<String, String> {
        let store = open(req.target.as_ref())?;
        let image = SnapshotImage::open(dir, &req.snapshot).map_err(|e| e.to_string())?;
        let mut r = BackupRequest::new(&req.volume, &req.name, &req.snapshot);
        r.block_size = if req.block_size == 0 {
            DEFAULT_BLOCK_SIZE
        } else {
            req.block_size
        };
        r.compression = parse_compression(&req.compression)?;
        r.full = req.full;
        if req.parallel > 0 {
            r.parallel = req.parallel.min(64) as usize;
        }
        r.labels = req.labels.into_iter().collect();
        let parent = if r.full {
            None
        } else {
            find_parent(store.as_ref(), &r.volume, dir, &image).map_err(|e| e.to_string())?
        };
        tracing::info!(
            backup = %r.name, snapshot = %r.snapshot, target = %store.url(),
            parent = ?parent.as_ref().map(|(m, _)| &m.name), "backup starts"
        );
        let report = backup(store, &image, parent.as_ref().map(|(m, i)| (m, i)), &r, progress)
            .map_err(|e| e.to_string())?;
        tracing::info!(backup = %r.name, uploaded = report.uploaded_bytes, seconds = report.seconds, "backup done");
        Ok(serde_json::to_string(&report).expect("a report serializes"))
    }
}

/// A volume's queue that moves the replicas' bytes as they are, as a restore's
/// destination. Its writes are pipelined: up to [`WRITES_IN_FLIGHT`] at once (each
/// holding its block's buffer, so at most that many blocks held), every one reaped
/// before a read or a flush; a failed write fails the next call. A fetched block's
/// buffer goes to the engine as it is, and comes back for the next fetch.
struct VolumeSink {
    volume: Volume,
    next_tag: u64,
    /// Buffers of finished writes, not yet handed back.
    done: Vec<IoBuf>,
}

/// Writes a restore keeps in flight on its queue.
const WRITES_IN_FLIGHT: usize = 8;

impl VolumeSink {
    /// Waits until at most `left` writes are in flight; the first failed one is an error.
    fn settle(&mut self, left: usize) -> Result<(), String> {
        let mut done = Vec::new();
        while self.volume.in_flight() > left {
            self.volume
                .reap(self.volume.in_flight() - left, &mut done)
                .map_err(|e| e.to_string())?;
            for c in done.drain(..) {
                self.done.extend(c.buf);
                c.result
                    .map_err(|e| format!("a write of the restore failed: {e}"))?;
            }
        }
        Ok(())
    }
}

impl RestoreSink for VolumeSink {
    fn size(&self) -> u64 {
        self.volume.size()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        self.settle(0)?;
        for (i, piece) in buf.chunks_mut(MAX_IO_LEN as usize).enumerate() {
            self.volume
                .read_at(offset + (i * MAX_IO_LEN as usize) as u64, piece)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        for (i, piece) in data.chunks(MAX_IO_LEN as usize).enumerate() {
            self.settle(WRITES_IN_FLIGHT - 1)?;
            self.next_tag += 1;
            self.volume.submit(
                IoKind::Write,
                offset + (i * MAX_IO_LEN as usize) as u64,
                0,
                Some(IoBuf::from_slice(piece)),
                self.next_tag,
            );
        }
        Ok(())
    }

    fn write_block(&mut self, offset: u64, data: IoBuf, spare: &mut Vec<IoBuf>) -> Result<(), String> {
        if data.len() > MAX_IO_LEN as usize {
            self.write_at(offset, data.as_slice())?;
            spare.push(data);
        } else {
            self.settle(WRITES_IN_FLIGHT - 1)?;
            self.next_tag += 1;
            self.volume
                .submit(IoKind::Write, offset, 0, Some(data), self.next_tag);
        }
        spare.append(&mut self.done);
        Ok(())
    }

    fn progress(&mut self, spare: &mut Vec<IoBuf>) -> Result<bool, String> {
        let in_flight = self.volume.in_flight();
        if in_flight == 0 {
            return Ok(false);
        }
        self.settle(in_flight - 1)?;
        spare.append(&mut self.done);
        Ok(true)
    }

    fn flush(&mut self) -> Result<(), String> {
        self.settle(0)?;
        self.volume.flush().map_err(|e| e.to_string())
    }

    /// Nothing, on a volume never written (every layer of the chain uses no space):
    /// a first restore then fetches without reading the volume first. Otherwise
    /// unknown, and every block is compared (a restore resumed).
    fn written(&mut self) -> Option<Vec<(u64, u64)>> {
        self.settle(0).ok()?;
        let info = self.volume.chain_op(horn_engine::ChainOp::Info).ok()?;
        info.layers.iter().all(|l| l.used_bytes == 0).then(Vec::new)
    }
}

/// An engine server's restores: into its own volume, through a raw queue.
pub struct EngineRestores;

impl horn_engine::control::RestoreRunner for EngineRestores {
    fn run(
        &self,
        engine: &Arc<Engine>,
        req: RestoreRequest,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<String, String> {
        let store = open(req.target.as_ref())?;
        let m =
            horn_backup::read_backup(store.as_ref(), &req.volume, &req.backup).map_err(|e| e.to_string())?;
        // Following: only what differs from the backup the volume holds already.
        let only = if req.since.is_empty() {
            None
        } else {
            let old = horn_backup::read_backup(store.as_ref(), &req.volume, &req.since)
                .map_err(|e| format!("the backup the volume holds: {e}"))?;
            Some(horn_backup::restore::differing_blocks(&old, &m))
        };
        let mut sink = VolumeSink {
            volume: Volume::open_raw(engine).map_err(|e| format!("cannot open a queue: {e}"))?,
            next_tag: 0,
            done: Vec::new(),
        };
        let opts = RestoreOptions {
            only,
            strict: req.strict,
            parallel: if req.parallel == 0 {
                RestoreOptions::default().parallel
            } else {
                req.parallel.min(64) as usize
            },
            ..RestoreOptions::default()
        };
        tracing::info!(backup = %m.name, volume = %m.volume, target = %store.url(), "restore starts");
        let report = restore(store.as_ref(), &m, &mut sink, &opts, progress);
        // A restore that failed still lets its writes in flight end before the queue goes.
        let settled = sink.settle(0);
        let closed = sink.volume.close();
        if report.is_ok() {
            settled?;
        }
        let report = report.map_err(|e| e.to_string())?;
        closed.map_err(|e| format!("closing the restore's queue: {e}"))?;
        tracing::info!(
            backup = %m.name, restored = report.restored, bad = report.bad.len(),
            seconds = report.seconds, "restore done"
        );
        Ok(serde_json::to_string(&report).expect("a report serializes"))
    }
}
