//! The commands that move blocks: READ, WRITE, WRITE AND VERIFY, VERIFY, ORWRITE,
//! COMPARE AND WRITE, WRITE SAME, UNMAP, PRE-FETCH and SYNCHRONIZE CACHE, and the
//! [`WriteRanges`] that make COMPARE AND WRITE atomic against every session's writes.

use std::sync::{Arc, Mutex};

use horn_engine::frontend::BlockVolume;
use horn_uring::IoBuf;

use super::{status, Lun, Response, Sense};

/// Largest transfer in bytes (the data wire's largest I/O).
pub(super) const MAX_TRANSFER: u32 = 8 << 20;
/// Largest COMPARE AND WRITE, in blocks.
pub(super) const MAX_COMPARE_AND_WRITE: u8 = 255;
/// Most descriptors in one UNMAP.
pub(super) const MAX_UNMAP_DESCRIPTORS: u32 = 255;

/// Does command `op` write the medium (for reservations and read-only LUNs)?
pub(super) fn writes(op: u8) -> bool {
    matches!(
        op,
        0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e | 0x41 | 0x93 | 0x42 | 0x89 | 0x8b | 0x35 | 0x91
    )
}

/// Wakes a connection's loop from another thread.
pub type Wake = Arc<dyn Fn() + Send + Sync>;

/// The block ranges commands are writing, from every session of the LUN, so that
/// COMPARE AND WRITE is atomic against every other write to its blocks (SBC-3 §5.2;
/// clustered filesystems take their locks with it). Each command that writes holds its
/// range while it runs. A command whose range overlaps a held one waits, without
/// blocking its connection's thread, until that range is let go. The connection is
/// woken through its engine queue's eventfd. Overlapping writes run one after the
/// other, in whatever order they got the range, which SCSI leaves open anyway.
#[derive(Default)]
pub struct WriteRanges {
    inner: Mutex<Ranges>,
}

#[derive(Default)]
struct Ranges {
    /// (first block, end block, id).
    held: Vec<(u64, u64, u64)>,
    next_id: u64,
    /// Connections with a command waiting, woken at the next release.
    waiting: Vec<Wake>,
}

impl std::fmt::Debug for WriteRanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteRanges").field("held", &self.held()).finish()
    }
}

impl WriteRanges {
    /// Holds blocks `[start, end)` unless a held range overlaps them. In that case
    /// `wake` is called when some range is let go.
    fn try_hold(&self, start: u64, end: u64, wake: &Wake) -> Option<u64> {
        let mut r = self.inner.lock().unwrap();
        if r.held.iter().any(|&(s, e, _)| s < end && start < e) {
            r.waiting.push(wake.clone());
            return None;
        }
        r.next_id += 1;
        let id = r.next_id;
        r.held.push((start, end, id));
        Some(id)
    }

    fn release(&self, id: u64) {
        let waiting = {
            let mut r = self.inner.lock().unwrap();
            if let Some(i) = r.held.iter().position(|h| h.2 == id) {
                r.held.swap_remove(i);
            }
            std::mem::take(&mut r.waiting)
        };
        for wake in waiting {
            wake();
        }
    }

    /// Ranges held now (for tests and diagnostics).
    pub fn held(&self) -> usize {
        self.inner.lock().unwrap().held.len()
    }
}

/// A held range, let go when dropped.
pub(super) struct HeldRange<'a> {
    ranges: &'a WriteRanges,
    id: u64,
}

impl Drop for HeldRange<'_> {
    fn drop(&mut self) {
        self.ranges.release(self.id);
    }
}

/// Where a read or write goes: (LBA, blocks), and the DPO/FUA byte.
fn rw_args(cdb: &[u8; 16]) -> Option<(u64, u64, u8)> {
    let be32 = |a: usize| u32::from_be_bytes(cdb[a..a + 4].try_into().unwrap()) as u64;
    let be16 = |a: usize| u16::from_be_bytes(cdb[a..a + 2].try_into().unwrap()) as u64;
    let be64 = |a: usize| u64::from_be_bytes(cdb[a..a + 8].try_into().unwrap());
    Some(match cdb[0] {
        // 6-byte: 21-bit LBA, 0 blocks means 256.
        0x08 | 0x0a => {
            let lba = (((cdb[1] & 0x1f) as u64) << 16) | be16(2);
            let n = if cdb[4] == 0 { 256 } else { cdb[4] as u64 };
            (lba, n, 0)
        }
        0x28 | 0x2a | 0x2e | 0x2f | 0x34 | 0x41 => (be32(2), be16(7), cdb[1]),
        0xa8 | 0xaa | 0xae | 0xaf => (be32(2), be32(6), cdb[1]),
        0x88 | 0x8a | 0x8e | 0x8f | 0x90 | 0x93 | 0x8b | 0x9c => (be64(2), be32(10), cdb[1]),
        0x89 => (be64(2), cdb[13] as u64, cdb[1]),
        _ => return None,
    })
}

/// The data-out length a command carries, from its CDB (None: none).
pub fn data_out_len(cdb: &[u8; 16], block_size: u32) -> Option<u64> {
    let bs = block_size as u64;
    match cdb[0] {
        0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e | 0x8b => rw_args(cdb).map(|(_, n, _)| n * bs),
        0x2f | 0xaf | 0x8f => rw_args(cdb).and_then(|(_, n, f)| (f & 0x06 != 0).then_some(n * bs)),
        0x89 => rw_args(cdb).map(|(_, n, _)| 2 * n * bs),
        0x41 | 0x93 => Some(bs),
        0x42 => Some(u16::from_be_bytes([cdb[7], cdb[8]]) as u64),
        0x5f => Some(u32::from_be_bytes(cdb[5..9].try_into().unwrap()) as u64),
        0x15 => Some(cdb[4] as u64),
        0x55 => Some(u16::from_be_bytes([cdb[7], cdb[8]]) as u64),
        _ => None,
    }
}

impl<V: BlockVolume> Lun<V> {
    /// The blocks a writing command may change, `[start, end)`: for UNMAP, whose
    /// ranges are in its data, the whole LUN.
    pub(super) fn written_range(&self, cdb: &[u8; 16]) -> Option<(u64, u64)> {
        let op = cdb[0];
        if !writes(op) || matches!(op, 0x35 | 0x91) {
            return None;
        }
        if op == 0x42 {
            return Some((0, u64::MAX));
        }
        let (lba, n, _) = rw_args(cdb)?;
        match n {
            // WRITE SAME of zero blocks runs to the end of the LUN.
            0 if matches!(op, 0x41 | 0x93) => Some((lba, u64::MAX)),
            0 => None,
            n => Some((lba, lba.saturating_add(n))),
        }
    }

    /// Waits until blocks `[start, end)` are held by this command.
    pub(super) async fn hold(&self, start: u64, end: u64) -> HeldRange<'_> {
        let ranges = &self.info.writing;
        let id = std::future::poll_fn(|_| match ranges.try_hold(start, end, &self.wake) {
            Some(id) => std::task::Poll::Ready(id),
            None => std::task::Poll::Pending,
        })
        .await;
        HeldRange { ranges, id }
    }

    /// Checks that blocks `lba..lba+n` are in the LUN.
    fn range(&self, lba: u64, n: u64) -> Option<Response> {
        match lba.checked_add(n) {
            Some(end) if end <= self.info.blocks() => None,
            _ => Some(Response::check(Sense::LBA_OUT_OF_RANGE)),
        }
    }

    pub(super) async fn sync_cache(&self, cdb: &[u8; 16]) -> Response {
        let (lba, n) = if cdb[0] == 0x35 {
            (
                u32::from_be_bytes(cdb[2..6].try_into().unwrap()) as u64,
                u16::from_be_bytes([cdb[7], cdb[8]]) as u64,
            )
        } else {
            (
                u64::from_be_bytes(cdb[2..10].try_into().unwrap()),
                u32::from_be_bytes(cdb[10..14].try_into().unwrap()) as u64,
            )
        };
        if let Some(r) = self.range(lba, n) {
            return r;
        }
        match self.volume.flush().await {
            Ok(()) => Response::good(),
            Err(e) => {
                tracing::warn!(error = %e, "SYNCHRONIZE CACHE failed");
                Response::check(Sense::WRITE_ERROR)
            }
        }
    }

    pub(super) fn prefetch(&self, cdb: &[u8; 16]) -> Response {
        let (lba, n, _) = rw_args(cdb).unwrap();
        if let Some(r) = self.range(lba, n) {
            return r;
        }
        // Nothing is cached, so nothing is fetched; CONDITION MET says the blocks
        // would fit in the cache.
        Response::status(status::CONDITION_MET)
    }

    async fn read_blocks(&self, lba: u64, n: u64) -> Result<IoBuf, Response> {
        let bs = self.info.block_size as u64;
        let buf = IoBuf::zeroed((n * bs) as usize);
        let (res, buf) = self.volume.read(lba * bs, buf).await;
        match res {
            Ok(()) => Ok(buf),
            Err(e) => {
                tracing::warn!(error = %e, lba, blocks = n, "read failed");
                Err(Response::check(Sense::READ_ERROR))
            }
        }
    }

    pub(super) async fn read(&self, cdb: &[u8; 16]) -> Response {
        let (lba, n, flags) = rw_args(cdb).unwrap();
        if cdb[0] != 0x08 && flags & 0xe0 != 0 {
            // RDPROTECT: no protection information here.
            return Response::check(Sense::INVALID_FIELD_IN_CDB);
        }
        if let Some(r) = self.range(lba, n) {
            return r;
        }
        if n == 0 {
            return Response::good();
        }
        match self.read_blocks(lba, n).await {
            Ok(buf) => Response::blocks(buf),
            Err(r) => r,
        }
    }

    /// Checks a write's CDB and data: Ok(None) for nothing to write.
    fn write_args(&self, cdb: &[u8; 16], data: &Option<IoBuf>) -> Result<Option<(u64, u64, bool)>, Response> {
        let (lba, n, flags) = rw_args(cdb).unwrap();
        if cdb[0] != 0x0a && flags & 0xe0 != 0 {
            return Err(Response::check(Sense::INVALID_FIELD_IN_CDB));
        }
        if self.info.read_only {
            return Err(Response::check(Sense::WRITE_PROTECTED));
        }
        if let Some(r) = self.range(lba, n) {
            return Err(r);
        }
        // The transport delivers at most its expected transfer length: when that is
        // shorter than the CDB's, only the whole blocks received are written (the
        // transport reports the residual).
        let got = data.as_ref().map_or(0, |d| d.len() as u64) / self.info.block_size as u64;
        let n = n.min(got);
        if n == 0 {
            return Ok(None);
        }
        Ok(Some((lba, n, cdb[0] != 0x0a && flags & 0x08 != 0)))
    }

    async fn write_buf(&self, lba: u64, buf: IoBuf, fua: bool) -> Result<IoBuf, Response> {
        let (res, buf) = self
            .volume
            .write(lba * self.info.block_size as u64, buf, fua)
            .await;
        match res {
            Ok(()) => Ok(buf),
            Err(e) => {
                tracing::warn!(error = %e, lba, "write failed");
                Err(Response::check(Sense::WRITE_ERROR))
            }
        }
    }

    /// `data` cut to exactly `n` blocks.
    fn exact(&self, data: IoBuf, n: u64) -> IoBuf {
        let want = (n * self.info.block_size as u64) as usize;
        if data.len() == want {
            data
        } else {
            IoBuf::from_slice(&data.as_slice()[..want])
        }
    }

    pub(super) async fn write(&self, cdb: &[u8; 16], data: Option<IoBuf>) -> Response {
        match self.write_args(cdb, &data) {
            Err(r) => r,
            Ok(None) => Response::good(),
            Ok(Some((lba, n, fua))) => {
                let buf = self.exact(data.unwrap(), n);
                match self.write_buf(lba, buf, fua).await {
                    Ok(_) => Response::good(),
                    Err(r) => r,
                }
            }
        }
    }

    pub(super) async fn write_verify(&self, cdb: &[u8; 16], data: Option<IoBuf>) -> Response {
        match self.write_args(cdb, &data) {
            Err(r) => r,
            Ok(None) => Response::good(),
            Ok(Some((lba, n, _))) => {
                // Verification: the write is made durable (FUA) before it completes.
                let buf = self.exact(data.unwrap(), n);
                match self.write_buf(lba, buf, true).await {
                    Ok(_) => Response::good(),
                    Err(r) => r,
                }
            }
        }
    }

    pub(super) async fn verify(&self, cdb: &[u8; 16], data: Option<IoBuf>) -> Response {
        let (lba, n, flags) = rw_args(cdb).unwrap();
        if flags & 0xe0 != 0 {
            return Response::check(Sense::INVALID_FIELD_IN_CDB);
        }
        if let Some(r) = self.range(lba, n) {
            return r;
        }
        let bytchk = (flags >> 1) & 0x03;
        if n == 0 || bytchk == 0 {
            // Without BYTCHK, the medium is checked: a read proves the blocks readable.
            if n > 0 {
                if let Err(r) = self.read_blocks(lba, n).await {
                    return r;
                }
            }
            return Response::good();
        }
        if bytchk != 1 {
            return Response::check(Sense::INVALID_FIELD_IN_CDB);
        }
        let want = (n * self.info.block_size as u64) as usize;
        let Some(data) = data.filter(|d| d.len() >= want) else {
            return Response::check(Sense::INVALID_FIELD_IN_CDB);
        };
        match self.read_blocks(lba, n).await {
            Err(r) => r,
            Ok(on_disk) => miscompare(on_disk.as_slice(), &data.as_slice()[..want]),
        }
    }

    pub(super) async fn write_same(&self, cdb: &[u8; 16], data: Option<IoBuf>) -> Response {
        let (lba, n, flags) = rw_args(cdb).unwrap();
        let unmap = flags & 0x08 != 0;
        let anchor = flags & 0x10 != 0;
        let ndob = cdb[0] == 0x93 && flags & 0x01 != 0;
        if flags & 0xe0 != 0 || anchor {
            return Response::check(Sense::INVALID_FIELD_IN_CDB);
        }
        if self.info.read_only {
            return Response::check(Sense::WRITE_PROTECTED);
        }
        let bs = self.info.block_size as u64;
        let block: Vec<u8> = if ndob {
            vec![0; bs as usize]
        } else {
            match data {
                Some(d) if d.len() == bs as usize => d.as_slice().to_vec(),
                _ => return Response::check(Sense::INVALID_FIELD_IN_CDB),
            }
        };
        // Zero blocks means "to the end of the LUN".
        let n = if n == 0 {
            self.info.blocks().saturating_sub(lba)
        } else {
            n
        };
        if let Some(r) = self.range(lba, n) {
            return r;
        }
        if n > (MAX_TRANSFER / self.info.block_size) as u64 {
            return Response::check(Sense::INVALID_FIELD_IN_CDB);
        }
        if n == 0 {
            return Response::good();
        }
        let zero = block.iter().all(|&b| b == 0);
        let (off, len) = (lba * bs, n * bs);
        // With UNMAP the blocks are unmapped whatever the data block holds: they read
        // back as zeroes (LBPRZ), as SBC-3 allows.
        let res = if unmap {
            self.volume.discard(off, len).await
        } else if zero {
            self.volume.write_zeroes(off, len).await
        } else {
            // Written in chunks of up to 1 MiB of the repeated block.
            let per = ((1u64 << 20) / bs).max(1);
            let mut at = lba;
            let mut res = Ok(());
            while at < lba + n && res.is_ok() {
                let k = per.min(lba + n - at);
                let mut buf = IoBuf::zeroed((k * bs) as usize);
                for c in buf.as_mut_slice().chunks_mut(bs as usize) {
                    c.copy_from_slice(&block);
                }
                res = self.volume.write(at * bs, buf, false).await.0;
                at += k;
            }
            res
        };
        match res {
            Ok(()) => Response::good(),
            Err(e) => {
                tracing::warn!(error = %e, "WRITE SAME failed");
                Response::check(Sense::WRITE_ERROR)
            }
        }
    }

    pub(super) async fn unmap(&self, cdb: &[u8; 16], data: Option<IoBuf>) -> Response {
        if self.info.read_only {
            return Response::check(Sense::WRITE_PROTECTED);
        }
        if cdb[1] & 0x01 != 0 {
            return Response::check(Sense::INVALID_FIELD_IN_CDB); // ANCHOR
        }
        let plen = u16::from_be_bytes([cdb[7], cdb[8]]) as usize;
        if plen == 0 {
            return Response::good();
        }
        let Some(data) = data else {
            return Response::check(Sense::PARAM_LIST_LENGTH);
        };
        let d = &data.as_slice()[..plen.min(data.len())];
        if d.len() < 8 {
            return Response::check(Sense::PARAM_LIST_LENGTH);
        }
        let desc_len = u16::from_be_bytes([d[2], d[3]]) as usize;
        if desc_len % 16 != 0 || 8 + desc_len > d.len() {
            return Response::check(Sense::PARAM_LIST_LENGTH);
        }
        let mut ranges = Vec::new();
        for desc in d[8..8 + desc_len].chunks(16) {
            let lba = u64::from_be_bytes(desc[0..8].try_into().unwrap());
            let n = u32::from_be_bytes(desc[8..12].try_into().unwrap()) as u64;
            if let Some(r) = self.range(lba, n) {
                return r;
            }
            ranges.push((lba, n));
        }
        let bs = self.info.block_size as u64;
        for (lba, n) in ranges.into_iter().filter(|(_, n)| *n > 0) {
            if let Err(e) = self.volume.discard(lba * bs, n * bs).await {
                tracing::warn!(error = %e, "UNMAP failed");
                return Response::check(Sense::WRITE_ERROR);
            }
        }
        Response::good()
    }

    pub(super) async fn compare_and_write(&self, cdb: &[u8; 16], data: Option<IoBuf>) -> Response {
        let (lba, n, flags) = rw_args(cdb).unwrap();
        if flags & 0xe0 != 0 {
            return Response::check(Sense::INVALID_FIELD_IN_CDB);
        }
        if self.info.read_only {
            return Response::check(Sense::WRITE_PROTECTED);
        }
        if n > MAX_COMPARE_AND_WRITE as u64 {
            return Response::check(Sense::INVALID_FIELD_IN_CDB);
        }
        if let Some(r) = self.range(lba, n) {
            return r;
        }
        let len = (n * self.info.block_size as u64) as usize;
        let got = data.as_ref().map_or(0, |d| d.len());
        if got != 2 * len {
            return Response::check(Sense::INVALID_FIELD_IN_CDB);
        }
        let Some(data) = data.filter(|_| n > 0) else {
            return Response::good();
        };
        // Atomic: every write to these blocks, from any session, waits for this one's
        // range (`execute`).
        let on_disk = match self.read_blocks(lba, n).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let cmp = miscompare(on_disk.as_slice(), &data.as_slice()[..len]);
        if cmp.status != status::GOOD {
            return cmp;
        }
        let new = IoBuf::from_slice(&data.as_slice()[len..]);
        match self.write_buf(lba, new, flags & 0x08 != 0).await {
            Ok(_) => Response::good(),
            Err(r) => r,
        }
    }

    /// ORWRITE(16): the data is ORed into the blocks.
    pub(super) async fn or_write(&self, cdb: &[u8; 16], data: Option<IoBuf>) -> Response {
        match self.write_args(cdb, &data) {
            Err(r) => r,
            Ok(None) => Response::good(),
            Ok(Some((lba, n, fua))) => {
                let mut blocks = match self.read_blocks(lba, n).await {
                    Ok(b) => b,
                    Err(r) => return r,
                };
                let data = data.unwrap();
                for (b, d) in blocks.as_mut_slice().iter_mut().zip(data.as_slice()) {
                    *b |= *d;
                }
                match self.write_buf(lba, blocks, fua).await {
                    Ok(_) => Response::good(),
                    Err(r) => r,
                }
            }
        }
    }
}

/// GOOD if `a` equals `b`, else MISCOMPARE with the offset of the first difference.
fn miscompare(a: &[u8], b: &[u8]) -> Response {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        None => Response::good(),
        Some(at) => Response::check_at(Sense::MISCOMPARE, Some(at as u32)),
    }
}
