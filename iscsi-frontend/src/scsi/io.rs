//! The commands that move blocks: READ, WRITE, WRITE AND VERIFY, VERIFY, ORWRITE,
//! COMPARE AND WRITE, WRITE SAME, UNMAP, PRE-FETCH and SYNCHRONIZE CACHE, and the
//! [`WriteRanges`] that make COMPARE AND WRITE atomic against every session's writes.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use horn_engine::frontend::BlockVolume;
use horn_uring::IoBuf;

use super::cdb::{be, extent, Extent};
use super::opcode::{self, Medium};
use super::{status, Lun, Response, Sense};

/// Largest transfer in bytes (the data wire's largest I/O).
pub const MAX_TRANSFER: u32 = 8 << 20;
/// Largest COMPARE AND WRITE, in blocks.
pub(super) const MAX_COMPARE_AND_WRITE: u8 = 255;
/// Most descriptors in one UNMAP.
pub(super) const MAX_UNMAP_DESCRIPTORS: u32 = 255;

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
    held: Vec<Hold>,
    next_id: u64,
    /// Connections with a command waiting, woken at the next release.
    waiting: Vec<Wake>,
}

/// A block range a command holds.
struct Hold {
    blocks: Range<u64>,
    /// Which command's, to let it go.
    id: u64,
}

impl std::fmt::Debug for WriteRanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteRanges").field("held", &self.held()).finish()
    }
}

impl WriteRanges {
    /// Holds `blocks` unless a held range overlaps them. In that case `wake` is called
    /// when some range is let go.
    fn try_hold(&self, blocks: &Range<u64>, wake: &Wake) -> Option<u64> {
        let mut r = self.inner.lock().unwrap();
        if r.held
            .iter()
            .any(|h| h.blocks.start < blocks.end && blocks.start < h.blocks.end)
        {
            r.waiting.push(wake.clone());
            return None;
        }
        r.next_id += 1;
        let id = r.next_id;
        r.held.push(Hold {
            blocks: blocks.clone(),
            id,
        });
        Some(id)
    }

    fn release(&self, id: u64) {
        let waiting = {
            let mut r = self.inner.lock().unwrap();
            if let Some(i) = r.held.iter().position(|h| h.id == id) {
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

/// The blocks a command with `medium` may change, which it holds while it runs: for
/// UNMAP, whose ranges are in its data, the whole LUN.
pub(super) fn written_range(cdb: &[u8; 16], medium: Medium) -> Option<Range<u64>> {
    let to_end = match medium {
        Medium::Reads | Medium::Flushes => return None,
        Medium::WritesListed => return Some(0..u64::MAX),
        Medium::WritesBlocks => false,
        Medium::WritesToEnd => true,
    };
    let Extent { lba, blocks, .. } = named_blocks(cdb).ok()?;
    match blocks {
        0 if to_end => Some(lba..u64::MAX),
        0 => None,
        n => Some(lba..lba.saturating_add(n)),
    }
}

/// The blocks `cdb` names. Only commands whose table row has block fields are sent
/// here (the tests of the table and of the dispatch hold them to that); were another
/// sent, it would get INVALID OPERATION CODE in a release build rather than a panic.
fn named_blocks(cdb: &[u8; 16]) -> Result<Extent, Response> {
    let named = extent(cdb);
    debug_assert!(
        named.is_some(),
        "opcode {:#04x} reached a block command, but its row names no blocks",
        cdb[0]
    );
    named.ok_or_else(|| Response::check(Sense::INVALID_OPCODE))
}

/// The blocks `cdb` names, refused when it asks for protection information
/// (RDPROTECT or WRPROTECT, the top bits of byte 1): volumes keep none.
fn unprotected_blocks(cdb: &[u8; 16]) -> Result<Extent, Response> {
    let extent = named_blocks(cdb)?;
    if extent.flags & 0xe0 != 0 {
        return Err(Response::check(Sense::INVALID_FIELD_IN_CDB));
    }
    Ok(extent)
}

/// A write's arguments, checked: where it goes, and the data-out to put there.
struct CheckedWrite {
    lba: u64,
    blocks: u64,
    fua: bool,
    data: IoBuf,
}

impl<V: BlockVolume> Lun<V> {
    /// Waits until `blocks` are held by this command.
    pub(super) async fn hold(&self, blocks: Range<u64>) -> HeldRange<'_> {
        let ranges = &self.info.writing;
        let id = std::future::poll_fn(|_| match ranges.try_hold(&blocks, &self.wake) {
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

    /// Checks that `n` blocks move in one command: at most [`MAX_TRANSFER`] bytes, the
    /// MAXIMUM TRANSFER LENGTH the Block Limits page advertises. Past it: ILLEGAL
    /// REQUEST, INVALID FIELD IN CDB, before any buffer is allocated.
    fn transfer(&self, n: u64) -> Option<Response> {
        (n > (MAX_TRANSFER / self.info.block_size) as u64)
            .then(|| Response::check(Sense::INVALID_FIELD_IN_CDB))
    }

    /// SYNCHRONIZE CACHE(10) and (16): the whole volume is flushed, whatever range
    /// is named.
    pub(super) async fn sync_cache(&self, cdb: &[u8; 16]) -> Response {
        let (lba, n) = match named_blocks(cdb) {
            Ok(e) => (e.lba, e.blocks),
            Err(r) => return r,
        };
        if let Some(r) = self.range(lba, n) {
            return r;
        }
        match self.volume.flush().await {
            Ok(()) => Response::good(),
            Err(e) => {
                self.info.failures.failed("SYNCHRONIZE CACHE", &e);
                Response::check(Sense::WRITE_ERROR)
            }
        }
    }

    /// PRE-FETCH(10) and (16).
    pub(super) fn prefetch(&self, cdb: &[u8; 16]) -> Response {
        let (lba, n) = match named_blocks(cdb) {
            Ok(e) => (e.lba, e.blocks),
            Err(r) => return r,
        };
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
                self.info
                    .failures
                    .failed(&format!("a read of {n} blocks at LBA {lba}"), &e);
                Err(Response::check(Sense::READ_ERROR))
            }
        }
    }

    /// READ(6), (10), (12) and (16).
    pub(super) async fn read(&self, cdb: &[u8; 16]) -> Response {
        let (lba, n) = match unprotected_blocks(cdb) {
            Ok(e) => (e.lba, e.blocks),
            Err(r) => return r,
        };
        if let Some(r) = self.range(lba, n).or_else(|| self.transfer(n)) {
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
    fn write_args(&self, cdb: &[u8; 16], data: Option<IoBuf>) -> Result<Option<CheckedWrite>, Response> {
        let Extent { lba, blocks, flags } = unprotected_blocks(cdb)?;
        if self.info.read_only {
            return Err(Response::check(Sense::WRITE_PROTECTED));
        }
        if let Some(r) = self.range(lba, blocks).or_else(|| self.transfer(blocks)) {
            return Err(r);
        }
        // The transport delivers at most its expected transfer length: when that is
        // shorter than the CDB's, only the whole blocks received are written (the
        // transport reports the residual).
        let got = data.as_ref().map_or(0, |d| d.len() as u64) / self.info.block_size as u64;
        let blocks = blocks.min(got);
        let Some(data) = data.filter(|_| blocks > 0) else {
            return Ok(None);
        };
        Ok(Some(CheckedWrite {
            lba,
            blocks,
            fua: flags & 0x08 != 0,
            data,
        }))
    }

    async fn write_buf(&self, lba: u64, buf: IoBuf, fua: bool) -> Result<IoBuf, Response> {
        let (res, buf) = self
            .volume
            .write(lba * self.info.block_size as u64, buf, fua)
            .await;
        match res {
            Ok(()) => Ok(buf),
            Err(e) => {
                self.info.failures.failed(&format!("a write at LBA {lba}"), &e);
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

    /// WRITE, and WRITE AND VERIFY when `verify`: verification makes the write durable
    /// (FUA) before it completes.
    pub(super) async fn write(&self, cdb: &[u8; 16], data: Option<IoBuf>, verify: bool) -> Response {
        match self.write_args(cdb, data) {
            Err(r) => r,
            Ok(None) => Response::good(),
            Ok(Some(w)) => {
                let buf = self.exact(w.data, w.blocks);
                match self.write_buf(w.lba, buf, w.fua || verify).await {
                    Ok(_) => Response::good(),
                    Err(r) => r,
                }
            }
        }
    }

    /// VERIFY(10), (12) and (16).
    pub(super) async fn verify(&self, cdb: &[u8; 16], data: Option<IoBuf>) -> Response {
        let (lba, n, flags) = match unprotected_blocks(cdb) {
            Ok(e) => (e.lba, e.blocks, e.flags),
            Err(r) => return r,
        };
        if let Some(r) = self.range(lba, n).or_else(|| self.transfer(n)) {
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

    /// WRITE SAME(10) and (16), with UNMAP and, for (16), NDOB.
    pub(super) async fn write_same(&self, cdb: &[u8; 16], data: Option<IoBuf>) -> Response {
        let (lba, n, flags) = match unprotected_blocks(cdb) {
            Ok(e) => (e.lba, e.blocks, e.flags),
            Err(r) => return r,
        };
        let unmap = flags & 0x08 != 0;
        let anchor = flags & 0x10 != 0;
        let ndob = cdb[0] == opcode::WRITE_SAME_16 && flags & 0x01 != 0;
        if anchor {
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
                self.info.failures.failed("WRITE SAME", &e);
                Response::check(Sense::WRITE_ERROR)
            }
        }
    }

    /// UNMAP: the block ranges listed in the parameter data are discarded.
    pub(super) async fn unmap(&self, cdb: &[u8; 16], data: Option<IoBuf>) -> Response {
        if self.info.read_only {
            return Response::check(Sense::WRITE_PROTECTED);
        }
        if cdb[1] & 0x01 != 0 {
            return Response::check(Sense::INVALID_FIELD_IN_CDB); // ANCHOR
        }
        let plen = be(cdb, 7, 2) as usize;
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
        let desc_len = be(d, 2, 2) as usize;
        if desc_len % 16 != 0 || 8 + desc_len > d.len() {
            return Response::check(Sense::PARAM_LIST_LENGTH);
        }
        let mut ranges = Vec::new();
        for desc in d[8..8 + desc_len].chunks(16) {
            let (lba, n) = (be(desc, 0, 8), be(desc, 8, 4));
            if let Some(r) = self.range(lba, n) {
                return r;
            }
            ranges.push((lba, n));
        }
        let bs = self.info.block_size as u64;
        for (lba, n) in ranges.into_iter().filter(|(_, n)| *n > 0) {
            if let Err(e) = self.volume.discard(lba * bs, n * bs).await {
                self.info.failures.failed("UNMAP", &e);
                return Response::check(Sense::WRITE_ERROR);
            }
        }
        Response::good()
    }

    /// COMPARE AND WRITE: the blocks are written only if they hold the first half of
    /// the data.
    pub(super) async fn compare_and_write(&self, cdb: &[u8; 16], data: Option<IoBuf>) -> Response {
        let (lba, n, flags) = match unprotected_blocks(cdb) {
            Ok(e) => (e.lba, e.blocks, e.flags),
            Err(r) => return r,
        };
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
        match self.write_args(cdb, data) {
            Err(r) => r,
            Ok(None) => Response::good(),
            Ok(Some(w)) => {
                let mut blocks = match self.read_blocks(w.lba, w.blocks).await {
                    Ok(b) => b,
                    Err(r) => return r,
                };
                for (b, d) in blocks.as_mut_slice().iter_mut().zip(w.data.as_slice()) {
                    *b |= *d;
                }
                match self.write_buf(w.lba, blocks, w.fua).await {
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
