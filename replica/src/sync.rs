//! Rebuilding a replica from a healthy one, layer by layer.
//!
//! The engine adds the new replica write-only and, in the same pause, snapshots every
//! replica, the new one included. From then on the heads of all replicas receive the
//! same writes, and everything below the heads is immutable. This module makes the
//! new replica's layers below its head equal to the source's:
//! - [`plan`] matches the source's snapshots to the target's by name. A snapshot the
//!   target already has (it held an older copy of the volume, or it is the rebuild
//!   snapshot itself, which on the target holds whatever its old head had) is patched
//!   in place; any other gets a new layer file.
//! - For each layer, both sides list the blocks their data file holds and hash them
//!   (XXH3 per 4 KiB, [`layer_blocks`]). Blocks the source holds and the target lacks
//!   or holds differently are copied; blocks only the target holds are punched out
//!   (holes stay holes); the zero-extent log is copied whole. A delta rebuild therefore
//!   moves only the blocks that differ.
//! - [`crate::Replica::install_synced`] then swaps the new chain in under the head, on
//!   the data loop, with the engine's I/O paused.
//!
//! Partial-block writes and discards that reach the target while it syncs have to
//! merge with data from the layers below, which the target does not have yet. The
//! replica notes those blocks ("suspect"); the engine copies them whole from a healthy
//! replica, paused, before the target serves reads.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use horn_proto::control::replica_control_client::ReplicaControlClient;
use horn_proto::control::{InfoRequest, LayerBlocksRequest, LayerZerosRequest, ReadLayerRequest};

use crate::error::{ReplicaError, Result};
use crate::extent::{data_extents, Extent};
use crate::meta::{LayerMeta, VolumeMeta, BLOCK_SIZE};
use crate::server::ServerHandle;
use crate::state::Mode;

/// One snapshot layer of the source, as its control service describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceLayer {
    /// The source's layer id (to ask for its data).
    pub id: u64,
    /// Snapshot name (unique in a replica).
    pub name: String,
    /// Name of the snapshot below, if any.
    pub parent: Option<String>,
    /// Layer file length.
    pub size: u64,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    /// Labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Deleted by the user, not yet purged.
    pub removed: bool,
}

/// How the target's snapshots will mirror the source's.
///
/// Every synced layer, and the head above them, get new ids above all the target's
/// (a layer's parent is always older than it). A source snapshot the target already
/// has under the same name starts as a hard link to the target's file, so only the
/// blocks that differ are copied into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncPlan {
    /// (source layer id, target layer metadata) for every source snapshot, in the
    /// source's id order (parents first).
    pub layers: Vec<(u64, LayerMeta)>,
    /// (target layer id, new id) of the snapshots the target already had.
    pub reuse: Vec<(u64, u64)>,
    /// The head's new id.
    pub head: u64,
    /// New id of the layer under the head (the source head's parent).
    pub head_parent: Option<u64>,
    /// Target layers the new chain drops (their files go after the install), the old
    /// head included.
    pub obsolete: Vec<u64>,
    /// The target's next free id after the plan.
    pub next_id: u64,
}

/// Matches the source's snapshots (`layers`, any order; `head_parent` names the one
/// under its head) to the target's metadata.
pub fn plan(layers: &[SourceLayer], head_parent: Option<&str>, target: &VolumeMeta) -> Result<SyncPlan> {
    let mut layers: Vec<&SourceLayer> = layers.iter().collect();
    layers.sort_by_key(|l| l.id);
    let by_name: HashMap<&str, &LayerMeta> = target
        .layers
        .iter()
        .filter_map(|l| l.name.as_deref().map(|n| (n, l)))
        .collect();
    let mut next_id = target.next_id;
    let mut ids: HashMap<&str, u64> = HashMap::new();
    let mut reuse = Vec::new();
    for l in &layers {
        let id = next_id;
        next_id += 1;
        if let Some(t) = by_name.get(l.name.as_str()) {
            reuse.push((t.id, id));
        }
        ids.insert(&l.name, id);
    }
    let head = next_id;
    next_id += 1;
    let mut out = Vec::new();
    for l in &layers {
        let parent = match &l.parent {
            Some(p) => Some(*ids.get(p.as_str()).ok_or_else(|| {
                ReplicaError::InvalidOperation(format!(
                    "the source's snapshot {} has parent {p}, which it does not list",
                    l.name
                ))
            })?),
            None => None,
        };
        out.push((
            l.id,
            LayerMeta {
                id: ids[l.name.as_str()],
                parent,
                size: l.size,
                name: Some(l.name.clone()),
                created: Some(l.created),
                labels: l.labels.clone(),
                removed: l.removed,
            },
        ));
    }
    let head_parent = match head_parent {
        Some(p) => Some(*ids.get(p).ok_or_else(|| {
            ReplicaError::InvalidOperation(format!("the source's head sits on {p}, which it does not list"))
        })?),
        None => None,
    };
    Ok(SyncPlan {
        layers: out,
        reuse,
        head,
        head_parent,
        obsolete: target.layers.iter().map(|l| l.id).collect(),
        next_id,
    })
}

/// The blocks of `[offset, offset + len)` that a layer file holds (data extents,
/// clipped), and the XXH3-64 of each of those blocks in order (unless `extents_only`).
pub fn layer_blocks(
    file: &File,
    path: &Path,
    size: u64,
    offset: u64,
    len: u64,
    extents_only: bool,
) -> Result<(Vec<Extent>, Vec<u64>)> {
    let end = offset.saturating_add(len).min(size);
    let extents: Vec<Extent> = data_extents(file, path, size)?
        .into_iter()
        .filter_map(|e| {
            let s = e.offset.max(offset);
            let t = e.end().min(end);
            (s < t).then_some(Extent {
                offset: s,
                len: t - s,
            })
        })
        .collect();
    let mut sums = Vec::new();
    if extents_only {
        return Ok((extents, sums));
    }
    let mut buf = vec![0u8; 1 << 20];
    for e in &extents {
        let mut at = e.offset;
        while at < e.end() {
            let n = (buf.len() as u64).min(e.end() - at) as usize;
            file.read_exact_at(&mut buf[..n], at)
                .map_err(|err| ReplicaError::io("read", path, err))?;
            sums.extend(
                buf[..n]
                    .chunks(BLOCK_SIZE as usize)
                    .map(xxhash_rust::xxh3::xxh3_64),
            );
            at += n as u64;
        }
    }
    Ok((extents, sums))
}

/// Per-block view of [`layer_blocks`]: block number to checksum.
pub fn block_map(extents: &[Extent], sums: &[u64]) -> HashMap<u64, u64> {
    let mut map = HashMap::with_capacity(sums.len());
    let mut i = 0;
    for e in extents {
        for b in e.offset / BLOCK_SIZE..e.end() / BLOCK_SIZE {
            map.insert(b, sums[i]);
            i += 1;
        }
    }
    map
}

/// Runs of blocks: (first block, count).
pub type BlockRuns = Vec<(u64, u64)>;

/// What to do to the target's layer so that its data file matches the source's:
/// block runs to copy, and block runs to punch out.
pub fn diff_blocks(source: &HashMap<u64, u64>, target: &HashMap<u64, u64>) -> (BlockRuns, BlockRuns) {
    let mut copy: Vec<u64> = source
        .iter()
        .filter(|(b, s)| target.get(b) != Some(s))
        .map(|(b, _)| *b)
        .collect();
    let mut punch: Vec<u64> = target
        .keys()
        .filter(|b| !source.contains_key(b))
        .copied()
        .collect();
    copy.sort_unstable();
    punch.sort_unstable();
    (runs(&copy), runs(&punch))
}

fn runs(blocks: &[u64]) -> BlockRuns {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some((s, n)) if *s + *n == b => *n += 1,
            _ => out.push((b, 1)),
        }
    }
    out
}

/// How long a source waits for the asker to connect to a layer stream.
const STREAM_ACCEPT: std::time::Duration = std::time::Duration::from_secs(10);

/// Source side of a layer stream: listens on a port of its own, and on a thread sends
/// `ranges` of the file at `path` (sendfile: page cache to socket, no copy through
/// user space) to the first connection that presents the token. Returns the port and
/// the token.
pub fn serve_ranges(path: &Path, ranges: Vec<(u64, u64)>) -> Result<(u16, [u8; 16])> {
    let file = File::open(path).map_err(|e| ReplicaError::io("open", path, e))?;
    let listener =
        std::net::TcpListener::bind("0.0.0.0:0").map_err(|e| ReplicaError::io("listen for", path, e))?;
    let port = listener
        .local_addr()
        .map_err(|e| ReplicaError::io("listen for", path, e))?
        .port();
    let mut token = [0u8; 16];
    // SAFETY: getrandom writes at most token.len() bytes into the live array.
    let n = unsafe { libc::getrandom(token.as_mut_ptr().cast(), token.len(), 0) };
    if n != token.len() as isize {
        return Err(ReplicaError::io(
            "draw a token for",
            path,
            std::io::Error::last_os_error(),
        ));
    }
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        if let Err(e) = send_ranges(&listener, &token, &file, &ranges) {
            tracing::warn!(path = %path.display(), error = %e, "a layer stream for a rebuild ended early");
        }
    });
    Ok((port, token))
}

fn send_ranges(
    listener: &std::net::TcpListener,
    token: &[u8; 16],
    file: &File,
    ranges: &[(u64, u64)],
) -> std::io::Result<()> {
    use std::io::Read;
    listener.set_nonblocking(true)?;
    let deadline = std::time::Instant::now() + STREAM_ACCEPT;
    let mut conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    };
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(STREAM_ACCEPT))?;
    let mut given = [0u8; 16];
    conn.read_exact(&mut given)?;
    if &given != token {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "wrong token",
        ));
    }
    for &(offset, len) in ranges {
        let mut off = offset as libc::off_t;
        let end = offset + len;
        while (off as u64) < end {
            let n = ((end - off as u64) as usize).min(1 << 30);
            // SAFETY: both descriptors are open for the call; `off` is a live local the
            // kernel advances.
            let sent = unsafe { libc::sendfile(conn.as_raw_fd(), file.as_raw_fd(), &mut off, n) };
            if sent < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if sent == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the layer file ended early",
                ));
            }
        }
    }
    Ok(())
}

/// Target side of a layer stream: connects to `stream` on the source's host, and
/// writes the `ranges` it sends, in order, into `f`.
fn receive_ranges(
    source: &str,
    stream: &horn_proto::control::LayerStream,
    ranges: &[(u64, u64)],
    f: &File,
    path: &Path,
    copied: &AtomicU64,
) -> Result<()> {
    use std::io::{Read, Write};
    let host = source.rsplit_once(':').map_or(source, |(h, _)| h);
    let addr = format!("{host}:{}", stream.port);
    let failed = |e: std::io::Error| {
        ReplicaError::InvalidOperation(format!(
            "the layer stream from the source replica {addr} failed: {e}"
        ))
    };
    let mut conn = std::net::TcpStream::connect(&addr).map_err(failed)?;
    conn.set_read_timeout(Some(STREAM_ACCEPT)).map_err(failed)?;
    conn.write_all(&stream.token).map_err(failed)?;
    let mut buf = vec![0u8; CHUNK as usize];
    for &(offset, len) in ranges {
        let mut at = offset;
        while at < offset + len {
            let n = CHUNK.min(offset + len - at) as usize;
            conn.read_exact(&mut buf[..n]).map_err(failed)?;
            f.write_all_at(&buf[..n], at)
                .map_err(|e| ReplicaError::io("write", path, e))?;
            copied.fetch_add(n as u64, Ordering::Relaxed);
            at += n as u64;
        }
    }
    Ok(())
}

/// Gives layer `old`'s files (data, zero log) the names of layer `new` too, unless it
/// has them already (a sync that ran before).
pub fn link_layer(dir: &Path, old: u64, new: u64) -> Result<()> {
    use crate::meta::{layer_path, zeros_path};
    for (from, to) in [
        (layer_path(dir, old), layer_path(dir, new)),
        (zeros_path(dir, old), zeros_path(dir, new)),
    ] {
        if to.exists() || !from.exists() {
            continue;
        }
        std::fs::hard_link(&from, &to).map_err(|e| ReplicaError::io("link", &to, e))?;
    }
    Ok(())
}

/// Opens (creating sparse, of `size` bytes, if absent) a layer file for syncing into.
pub fn open_for_sync(path: &Path, size: u64) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| ReplicaError::io("open", path, e))?;
    let len = f.metadata().map_err(|e| ReplicaError::io("stat", path, e))?.len();
    if len != size {
        f.set_len(size)
            .map_err(|e| ReplicaError::io("truncate", path, e))?;
    }
    Ok(f)
}

/// Punches `count` blocks from `first` out of a layer file.
pub fn punch(f: &File, path: &Path, first: u64, count: u64) -> Result<()> {
    nix::fcntl::fallocate(
        f.as_raw_fd(),
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        (first * BLOCK_SIZE) as i64,
        (count * BLOCK_SIZE) as i64,
    )
    .map_err(|e| ReplicaError::io("punch hole", path, std::io::Error::from(e)))
}

/// A sync's progress and its result awaiting [`crate::Replica::install_synced`],
/// shared by the control service's calls.
#[derive(Debug, Default)]
pub struct SyncState {
    /// Bytes of source layer data gone through.
    pub done: AtomicU64,
    /// Bytes of source layer data in all.
    pub total: AtomicU64,
    /// Bytes copied (the rest was equal already).
    pub copied: AtomicU64,
    /// The plan of the last sync that finished, until it is installed.
    pub pending: Mutex<Option<SyncPlan>>,
    /// A sync is running.
    pub running: AtomicBool,
}

/// Bytes of layer examined per checksum call.
const WINDOW: u64 = 256 << 20;
/// Bytes the target receives and writes at a time.
pub const CHUNK: u64 = 4 << 20;

fn remote(source: &str) -> impl Fn(tonic::Status) -> ReplicaError + '_ {
    move |s| ReplicaError::InvalidOperation(format!("the source replica {source} failed: {}", s.message()))
}

/// The target's side of a rebuild, run on a thread of its own: makes every snapshot
/// layer of this replica (behind `handle`) equal to those of the replica whose control
/// service is at `source`, and leaves the plan in `state` for the install.
pub fn pull(handle: &ServerHandle, source: &str, state: &SyncState) -> Result<SyncPlan> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ReplicaError::io("start a runtime for", source, e))?;
    let url = format!("http://{source}");
    let mut src = rt
        .block_on(ReplicaControlClient::connect(url))
        .map_err(|e| {
            ReplicaError::InvalidOperation(format!("cannot reach the source replica {source}: {e}"))
        })?
        .max_decoding_message_size(64 << 20);
    let info = rt
        .block_on(src.info(InfoRequest {}))
        .map_err(remote(source))?
        .into_inner();
    let (dir, meta, mode) = handle.call(|r| (r.dir().to_path_buf(), r.meta().clone(), r.mode()))?;
    if mode != Mode::Wo {
        return Err(ReplicaError::InvalidOperation(
            "only a write-only (WO) replica can be synced into: it must not serve reads meanwhile".into(),
        ));
    }
    if info.size != meta.size {
        return Err(ReplicaError::InvalidOperation(format!(
            "the source holds {} bytes and this replica {}",
            info.size, meta.size
        )));
    }
    let head_parent = info
        .layers
        .iter()
        .find(|l| l.name.is_empty() && l.in_chain)
        .map(|l| l.parent.clone())
        .filter(|p| !p.is_empty());
    let layers: Vec<SourceLayer> = info
        .layers
        .iter()
        .filter(|l| !l.name.is_empty())
        .map(|l| SourceLayer {
            id: l.id,
            name: l.name.clone(),
            parent: (!l.parent.is_empty()).then(|| l.parent.clone()),
            size: l.size,
            created: l.created,
            labels: l.labels.clone().into_iter().collect(),
            removed: l.removed,
        })
        .collect();
    let plan = plan(&layers, head_parent.as_deref(), &meta)?;
    for &(old, new) in &plan.reuse {
        link_layer(&dir, old, new)?;
    }
    state.done.store(0, Ordering::Relaxed);
    state.copied.store(0, Ordering::Relaxed);
    let total: u64 = info
        .layers
        .iter()
        .filter(|l| !l.name.is_empty())
        .map(|l| l.used_bytes)
        .sum();
    state.total.store(total, Ordering::Relaxed);
    for (src_id, layer) in &plan.layers {
        let path = crate::meta::layer_path(&dir, layer.id);
        let f = open_for_sync(&path, layer.size)?;
        let mut offset = 0;
        while offset < layer.size {
            let len = WINDOW.min(layer.size - offset);
            let (ours_e, ours_s) = layer_blocks(&f, &path, layer.size, offset, len, false)?;
            // Holding nothing here, there is nothing to compare: the source need not
            // read its blocks twice.
            let extents_only = ours_e.is_empty();
            let reply = rt
                .block_on(src.layer_blocks(LayerBlocksRequest {
                    layer_id: *src_id,
                    offset,
                    length: len,
                    extents_only,
                }))
                .map_err(remote(source))?
                .into_inner();
            let extents: Vec<Extent> = reply
                .offsets
                .iter()
                .zip(&reply.lengths)
                .map(|(&offset, &len)| Extent { offset, len })
                .collect();
            let blocks: u64 = extents.iter().map(|e| e.len / BLOCK_SIZE).sum();
            if !extents_only && blocks != reply.sums.len() as u64 {
                return Err(ReplicaError::InvalidOperation(format!(
                    "the source replica {source} sent {} checksums for {blocks} blocks",
                    reply.sums.len()
                )));
            }
            let ours = block_map(&ours_e, &ours_s);
            let theirs = if extents_only {
                // Any value differs from "absent".
                let zeros = vec![0; blocks as usize];
                block_map(&extents, &zeros)
            } else {
                block_map(&extents, &reply.sums)
            };
            let (copy, holes) = diff_blocks(&theirs, &ours);
            for (first, count) in holes {
                punch(&f, &path, first, count)?;
            }
            if !copy.is_empty() {
                let req = ReadLayerRequest {
                    layer_id: *src_id,
                    offsets: copy.iter().map(|(b, _)| b * BLOCK_SIZE).collect(),
                    lengths: copy.iter().map(|(_, n)| n * BLOCK_SIZE).collect(),
                };
                let stream = rt
                    .block_on(src.read_layer(req.clone()))
                    .map_err(remote(source))?
                    .into_inner();
                let ranges: Vec<(u64, u64)> = req
                    .offsets
                    .iter()
                    .copied()
                    .zip(req.lengths.iter().copied())
                    .collect();
                receive_ranges(source, &stream, &ranges, &f, &path, &state.copied)?;
            }
            state.done.fetch_add(blocks * BLOCK_SIZE, Ordering::Relaxed);
            offset += len;
        }
        let zeros = rt
            .block_on(src.layer_zeros(LayerZerosRequest { layer_id: *src_id }))
            .map_err(remote(source))?
            .into_inner()
            .log;
        let zpath = crate::meta::zeros_path(&dir, layer.id);
        if zeros.is_empty() {
            match std::fs::remove_file(&zpath) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(ReplicaError::io("remove", &zpath, e));
                }
                _ => {}
            }
        } else {
            let name = zpath
                .file_name()
                .expect("a file name")
                .to_string_lossy()
                .into_owned();
            crate::meta::write_atomically(&dir, &name, &zeros)?;
        }
        f.sync_all().map_err(|e| ReplicaError::io("fsync", &path, e))?;
    }
    crate::meta::sync_dir(&dir)?;
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(id: u64, name: &str, parent: Option<&str>) -> SourceLayer {
        SourceLayer {
            id,
            name: name.into(),
            parent: parent.map(Into::into),
            size: 1 << 20,
            created: 7,
            labels: Default::default(),
            removed: false,
        }
    }

    #[test]
    fn every_synced_layer_and_the_head_get_new_ids_and_same_names_are_reused() {
        // Target: snapshot "a" (id 1), old snapshot "old" (id 2), rebuild snapshot
        // "r" (id 3), head 4.
        let mut t = VolumeMeta::new(1 << 20, 512);
        t.layers[0].name = Some("a".into());
        for (id, name, parent) in [(2, Some("old"), 1), (3, Some("r"), 2), (4, None, 3)] {
            t.layers.push(LayerMeta {
                id,
                parent: Some(parent),
                size: 1 << 20,
                name: name.map(Into::into),
                created: None,
                labels: Default::default(),
                removed: false,
            });
        }
        t.head = 4;
        t.next_id = 5;
        // Source: a (10) <- b (11) <- r (12) <- head.
        let layers = [
            src(12, "r", Some("b")),
            src(10, "a", None),
            src(11, "b", Some("a")),
        ];
        let p = plan(&layers, Some("r"), &t).unwrap();
        let ids: Vec<(u64, u64, Option<u64>)> = p.layers.iter().map(|(s, m)| (*s, m.id, m.parent)).collect();
        assert_eq!(ids, vec![(10, 5, None), (11, 6, Some(5)), (12, 7, Some(6))]);
        assert_eq!(p.reuse, vec![(1, 5), (3, 7)]);
        assert_eq!((p.head, p.head_parent, p.next_id), (8, Some(7), 9));
        assert_eq!(p.obsolete, vec![1, 2, 3, 4]);
    }

    #[test]
    fn differing_missing_and_extra_blocks() {
        let s: HashMap<u64, u64> = [(1, 10), (2, 20), (3, 30), (7, 70)].into();
        let t: HashMap<u64, u64> = [(1, 10), (2, 99), (5, 50), (6, 60)].into();
        let (copy, punch) = diff_blocks(&s, &t);
        assert_eq!(copy, vec![(2, 2), (7, 1)]);
        assert_eq!(punch, vec![(5, 2)]);
    }
}
