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
//!
//! Two floors: the plan, the block diff and the file steps are plain data in
//! `sync_plan.rs` (re-exported here), below the chain, whose install takes the plan;
//! this module moves the bytes (layer streams, the target's pull over the source's
//! control service) and sits above the server, whose handle it runs calls through.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use horn_proto::auth::AUTH_HEADER;
use horn_proto::control::replica_control_client::ReplicaControlClient;
use horn_proto::control::ENGINE_HEADER;
use horn_proto::control::{InfoRequest, LayerBlocksRequest, LayerZerosRequest, ReadLayerRequest};
use tonic::metadata::AsciiMetadataValue;

use crate::error::{ReplicaError, Result};
use crate::extent::Extent;
use crate::handle::ServerHandle;
use crate::meta::BLOCK_SIZE;
use crate::state::Mode;
pub use crate::sync_plan::{
    block_map, diff_blocks, layer_blocks, link_layer, open_for_sync, plan, punch, BlockRuns, SourceLayer,
    SyncPlan,
};

/// How long a source waits for the asker to connect to a layer stream.
const STREAM_ACCEPT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a connection to a layer stream has to present its token.
const TOKEN_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A byte stream both ways: a layer stream's connection, plain or TLS.
pub trait ReadWrite: std::io::Read + std::io::Write + Send {}
impl<T: std::io::Read + std::io::Write + Send> ReadWrite for T {}

/// How layer streams are carried over TLS, for a replica whose data wire is
/// (`hornd replica --data-tls`); the daemon gives it, with the node's credentials.
pub trait StreamTls: Send + Sync {
    /// The source's side: the handshake on an accepted connection.
    fn accept(&self, tcp: std::net::TcpStream) -> std::io::Result<Box<dyn ReadWrite>>;
    /// The asker's side: the handshake on a new connection to the source.
    fn connect(&self, tcp: std::net::TcpStream) -> std::io::Result<Box<dyn ReadWrite>>;
}

/// Source side of a layer stream: listens on a port of its own at `bind` (the address
/// the asker reached the control service on), and on a thread sends `ranges` of the
/// file at `path` (sendfile: page cache to socket, no copy through user space; over
/// `tls`, read and written through it) to the first connection that presents the
/// token. A connection without it (a stray, a port scan, a failed handshake) is
/// dropped and the stream waits on for the real one. Returns the port and the token.
pub fn serve_ranges(
    bind: std::net::IpAddr,
    path: &Path,
    ranges: Vec<(u64, u64)>,
    tls: Option<std::sync::Arc<dyn StreamTls>>,
) -> Result<(u16, [u8; 16])> {
    let file = File::open(path).map_err(|e| ReplicaError::io("open", path, e))?;
    let listener =
        std::net::TcpListener::bind((bind, 0)).map_err(|e| ReplicaError::io("listen for", path, e))?;
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
        if let Err(e) = send_ranges(&listener, &token, &file, &ranges, tls.as_deref()) {
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
    tls: Option<&dyn StreamTls>,
) -> std::io::Result<()> {
    use std::io::Read;
    listener.set_nonblocking(true)?;
    let deadline = std::time::Instant::now() + STREAM_ACCEPT;
    let (conn, mut secured) = loop {
        match listener.accept() {
            Ok((c, peer)) => {
                c.set_nonblocking(false)?;
                c.set_read_timeout(Some(TOKEN_WAIT))?;
                c.set_write_timeout(Some(STREAM_ACCEPT))?;
                let mut secured = match tls {
                    Some(t) => match t.accept(c.try_clone()?) {
                        Ok(s) => Some(s),
                        Err(e) => {
                            tracing::warn!(%peer, error = %e, "a TLS handshake on a layer stream failed; dropped");
                            continue;
                        }
                    },
                    None => None,
                };
                let mut given = [0u8; 16];
                let read = match secured.as_mut() {
                    Some(s) => s.read_exact(&mut given),
                    None => (&c).read_exact(&mut given),
                };
                match read {
                    Ok(()) if &given == token => break (c, secured),
                    _ => tracing::warn!(%peer, "a connection to a layer stream without its token; dropped"),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no connection presented the stream's token in time",
                ));
            }
            Err(e) => return Err(e),
        }
    };
    conn.set_read_timeout(Some(STREAM_ACCEPT))?;
    if let Some(s) = secured.as_mut() {
        // Over TLS the bytes go through user space to be encrypted.
        let mut buf = vec![0u8; CHUNK as usize];
        for &(offset, len) in ranges {
            let mut at = offset;
            while at < offset + len {
                let n = CHUNK.min(offset + len - at) as usize;
                file.read_exact_at(&mut buf[..n], at)?;
                s.write_all(&buf[..n])?;
                at += n as u64;
            }
        }
        return s.flush();
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
    tls: Option<&dyn StreamTls>,
) -> Result<()> {
    use std::io::{Read, Write};
    let host = source.rsplit_once(':').map_or(source, |(h, _)| h);
    let addr = format!("{host}:{}", stream.port);
    let failed = |e: std::io::Error| {
        ReplicaError::InvalidOperation(format!(
            "the layer stream from the source replica {addr} failed: {e}"
        ))
    };
    let tcp = std::net::TcpStream::connect(&addr).map_err(failed)?;
    tcp.set_read_timeout(Some(STREAM_ACCEPT)).map_err(failed)?;
    tcp.set_write_timeout(Some(STREAM_ACCEPT)).map_err(failed)?;
    let mut conn: Box<dyn ReadWrite> = match (stream.tls, tls) {
        (false, _) => Box::new(tcp),
        (true, Some(t)) => t.connect(tcp).map_err(failed)?,
        (true, None) => {
            return Err(ReplicaError::InvalidOperation(format!(
                "the source replica {source} streams its layers over TLS, and this replica has no credentials for it (--credentials, --data-tls)"
            )))
        }
    };
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
///
/// `auth`: the proof header and the engine name to show the source, when the
/// replicas hold their volume's secret; `tls`: how to reach it over TLS, when the
/// cluster's services speak it.
pub fn pull(
    handle: &ServerHandle,
    source: &str,
    state: &SyncState,
    auth: Option<(String, String)>,
    tls: Option<horn_proto::auth::ClientTls>,
    stream_tls: Option<&dyn StreamTls>,
) -> Result<SyncPlan> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ReplicaError::io("start a runtime for", source, e))?;
    let unreachable = |e: &dyn std::fmt::Display| {
        ReplicaError::InvalidOperation(format!("cannot reach the source replica {source}: {e}"))
    };
    let auth = auth
        .map(|(header, engine)| {
            Ok::<_, ReplicaError>((
                AsciiMetadataValue::try_from(header).map_err(|e| unreachable(&e))?,
                AsciiMetadataValue::try_from(engine).map_err(|e| unreachable(&e))?,
            ))
        })
        .transpose()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{source}"))
        .map_err(|e| unreachable(&e))?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.config()).map_err(|e| unreachable(&e))?;
    }
    let channel = rt.block_on(endpoint.connect()).map_err(|e| unreachable(&e))?;
    let mut src = ReplicaControlClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        if let Some((header, engine)) = &auth {
            req.metadata_mut().insert(AUTH_HEADER, header.clone());
            req.metadata_mut().insert(ENGINE_HEADER, engine.clone());
        }
        Ok(req)
    })
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
                receive_ranges(source, &stream, &ranges, &f, &path, &state.copied, stream_tls)?;
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
    use std::io::{Read, Write};
    use std::net::TcpStream;

    use super::*;

    /// Strays that connect first (one says nothing, one sends a wrong token) are
    /// dropped, and the stream goes to the connection with the token. Before, the first
    /// connection took the stream, and a wrong token ended the rebuild.
    #[test]
    fn a_layer_stream_goes_to_the_token_not_to_whoever_connects_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layer");
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let localhost = std::net::IpAddr::from([127, 0, 0, 1]);
        let (port, token) = serve_ranges(localhost, &path, vec![(4096, 8192), (0, 100)], None).unwrap();
        let silent = TcpStream::connect((localhost, port)).unwrap();
        let mut wrong = TcpStream::connect((localhost, port)).unwrap();
        wrong.write_all(&[0u8; 16]).unwrap();
        let mut real = TcpStream::connect((localhost, port)).unwrap();
        real.write_all(&token).unwrap();
        let mut got = Vec::new();
        real.read_to_end(&mut got).unwrap();
        let mut want = data[4096..4096 + 8192].to_vec();
        want.extend_from_slice(&data[..100]);
        assert!(got == want, "the stream sent {} bytes, not the ranges", got.len());
        drop(silent);
    }
}
